//! The `incidents` step's configuration, as written in a pipeline file.
//!
//! ```yaml
//! incidents:
//!   type: incidents
//!   alerts:                       # alert streams, each mapped to an alert
//!     - input: brute_force
//!       entity_type: "'user'"     # SQL expressions over the input's columns
//!       entity_id: user
//!       severity: "'high'"
//!       detection: rule
//!       id: "concat(rule, ':', user, ':', CAST(window_end AS VARCHAR))"
//!   actions: analyst_actions      # incident events from people: assign, resolve, ...
//!   window: 30m                   # an alert within this of the latest joins the incident
//!   escalate:
//!     - { alerts: 5, severity: high }
//!     - { detections: 3, severity: critical }
//!   snapshot_every: 100
//!   log: { brokers: ..., topic: incidents.events, snapshots: incidents.snapshots }
//! ```
//!
//! `log` is the connector's and is read by the pipeline loader; everything
//! else is here.

use std::time::Duration;

use serde::Deserialize;

/// One alert stream and how its columns make an alert. Every field is a
/// SQL expression over the input's columns.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertInput {
    /// The source or step the alerts come from.
    pub input: String,
    /// The alert's id (default: column `alert_id`); a redelivered alert
    /// with the same id is ignored.
    #[serde(default = "default_id")]
    pub id: String,
    /// The rule that fired (default: column `detection`).
    #[serde(default = "default_detection")]
    pub detection: String,
    /// `low`, `medium`, `high` or `critical` (default: column `severity`).
    #[serde(default = "default_severity")]
    pub severity: String,
    /// `user`, `host`, `ip`, ... (default: column `entity_type`).
    #[serde(default = "default_entity_type")]
    pub entity_type: String,
    /// The entity (default: column `entity_id`).
    #[serde(default = "default_entity_id")]
    pub entity_id: String,
    /// A title for incidents this alert opens (default: detection and entity).
    #[serde(default)]
    pub title: Option<String>,
    /// The alert's time (default: the input's event time).
    #[serde(default)]
    pub time: Option<String>,
    /// Keeps only rows matching this condition.
    #[serde(default, rename = "where")]
    pub condition: Option<String>,
}

fn default_id() -> String {
    "alert_id".into()
}
fn default_detection() -> String {
    "detection".into()
}
fn default_severity() -> String {
    "severity".into()
}
fn default_entity_type() -> String {
    "entity_type".into()
}
fn default_entity_id() -> String {
    "entity_id".into()
}

/// Raises an incident's severity when its condition holds. Exactly one of
/// `alerts`, `detections` and `alert_severity` is set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EscalationRule {
    /// At least this many alerts attached.
    #[serde(default)]
    pub alerts: Option<u64>,
    /// At least this many distinct detections among them.
    #[serde(default)]
    pub detections: Option<usize>,
    /// An alert at least this severe attached.
    #[serde(default)]
    pub alert_severity: Option<String>,
    /// The severity the incident rises to.
    pub severity: String,
}

/// The `incidents` step.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IncidentsConfig {
    /// Alert streams.
    pub alerts: Vec<AlertInput>,
    /// A source or step of incident events from people (assignments,
    /// resolutions, reopenings, manual escalations).
    #[serde(default)]
    pub actions: Option<String>,
    /// An alert for an entity joins the entity's open incident when it is at
    /// most this long after the incident's latest alert.
    #[serde(default = "default_window", with = "humantime_serde")]
    pub window: Duration,
    /// Escalation rules (default: an incident is as severe as its most
    /// severe alert).
    #[serde(default)]
    pub escalate: Option<Vec<EscalationRule>>,
    /// A shard snapshots the incidents it changed after this many events.
    #[serde(default = "default_snapshot_every")]
    pub snapshot_every: usize,
}

fn default_window() -> Duration {
    Duration::from_secs(30 * 60)
}

fn default_snapshot_every() -> usize {
    100
}
