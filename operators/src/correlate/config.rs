//! What pipeline authors write for a `correlate` step: the fields of a Sigma
//! correlation rule, plus EQL's `until`.
//!
//! ```yaml
//! intrusion:
//!   type: correlate
//!   correlation: temporal_ordered   # EQL: sequence by tenant_id, src_ip with maxspan=10m
//!   rules:
//!     - password_spray                       # an earlier step
//!     - { name: success, input: auth, where: "outcome = 'success'" }
//!   until: { name: blocked, input: firewall, where: "action = 'block'" }
//!   group-by: [src_ip]
//!   fields: { success: [user, host] }      # carried out as success_user, success_host
//!   aliases:
//!     src_ip: { password_spray: src_ip, success: src_ip }
//!   timespan: 10m
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

/// Which correlation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CorrelationType {
    /// At least N events per group within the timespan.
    EventCount,
    /// At least N distinct values of a field per group within the timespan.
    ValueCount,
    /// Every rule matched, in any order, within the timespan.
    Temporal,
    /// Every rule matched in the order listed within the timespan (an EQL
    /// sequence with `maxspan`).
    #[serde(alias = "sequence")]
    TemporalOrdered,
}

/// One rule a correlation reads: a step or source by name, or a source with
/// a filter of its own.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RuleRef {
    /// A source or earlier step; the rule's name is the step's.
    Name(String),
    /// A filtered input.
    Inline {
        /// The rule's name, used in the output columns (`<name>_id`).
        name: String,
        /// The source or step it reads.
        input: String,
        /// A SQL condition on the input's rows.
        #[serde(default, rename = "where")]
        condition: Option<String>,
        /// Column holding the event's id (default `event_id`, then `id`).
        #[serde(default)]
        id: Option<String>,
    },
}

impl RuleRef {
    /// The rule's name.
    pub fn name(&self) -> &str {
        match self {
            RuleRef::Name(n) => n,
            RuleRef::Inline { name, .. } => name,
        }
    }

    /// The step or source it reads.
    pub fn input(&self) -> &str {
        match self {
            RuleRef::Name(n) => n,
            RuleRef::Inline { input, .. } => input,
        }
    }
}

/// When a count correlation fires. Only lower bounds: a count that must stay
/// small is only known once the span has passed, which is a window, not a
/// correlation (use a `sql` step with `HAVING`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    /// At least this many.
    #[serde(default)]
    pub gte: Option<u64>,
    /// More than this many.
    #[serde(default)]
    pub gt: Option<u64>,
    /// The field whose distinct values `value_count` counts.
    #[serde(default)]
    pub field: Option<String>,
}

/// Configuration of a `correlate` step.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorrelateConfig {
    /// Which correlation.
    pub correlation: CorrelationType,
    /// The rules it correlates, in order for `temporal_ordered`.
    pub rules: Vec<RuleRef>,
    /// Fields that must be equal across the correlated events.
    #[serde(rename = "group-by", alias = "group_by", default)]
    pub group_by: Vec<String>,
    /// Per group-by field, the column it is in for each rule that names it
    /// differently.
    #[serde(default)]
    pub aliases: BTreeMap<String, BTreeMap<String, String>>,
    /// How far apart the first and last correlated events may be.
    #[serde(with = "humantime_serde")]
    pub timespan: Duration,
    /// For `event_count` and `value_count`: when to fire.
    #[serde(default)]
    pub condition: Option<Condition>,
    /// For `temporal_ordered` and `temporal`: an event that cancels the
    /// group's pending matches.
    #[serde(default)]
    pub until: Option<RuleRef>,
    /// For counts: after an alert, how long the group stays quiet (default:
    /// the timespan). Events keep counting meanwhile, so a burst that goes
    /// on alerts again once per timespan.
    #[serde(default, with = "humantime_serde")]
    pub suppress: Option<Duration>,
    /// Correlate events of different tenants (default false: `tenant_id`
    /// joins the group-by when every rule has it).
    #[serde(default)]
    pub cross_tenant: bool,
    /// For `temporal_ordered` and `temporal`: columns of each rule's matched
    /// event to carry into the output, as `<rule>_<column>` (text).
    #[serde(default)]
    pub fields: BTreeMap<String, Vec<String>>,
    /// Value of the `rule` column of the output (default: the step's name).
    #[serde(default)]
    pub rule: Option<String>,
}
