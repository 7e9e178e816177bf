//! Correlation rules in the shape of Sigma correlations and EQL sequences:
//! counts of events or of distinct values per group over a sliding span,
//! "all of these within T", and "A, then B, then C within T, until D".
//!
//! A `correlate` step names its rules (sources or earlier steps, or a
//! source with a `where`), the fields that group them and a timespan:
//!
//! ```yaml
//! spray:
//!   type: correlate
//!   correlation: value_count        # event_count | value_count | temporal | temporal_ordered
//!   rules: [failed_logins]
//!   group-by: [src_ip]
//!   timespan: 5m
//!   condition: { field: user, gte: 10 }
//! ```
//!
//! # Shape
//! Each rule becomes a small stateless step (`<step>/<rule>`) that filters
//! its input and projects the same narrow row from every rule: event time,
//! the group-by fields as text, the event's id and, for `value_count`, the
//! counted value. The engine hash-partitions those rows by group, so one
//! subtask owns a group across every rule. The operator ([`operator`])
//! buffers rows until the watermark passes them and then runs each group's
//! state machine in event-time order, so the answer does not depend on the
//! order rows arrive in, on parallelism, or on how batches were cut.
//!
//! # Tenants
//! When every rule's input has a `tenant_id` column it joins the group-by,
//! so nothing correlates across tenants unless the rule says
//! `cross_tenant: true`.

pub mod config;
pub mod operator;
pub mod plan;

pub use config::{Condition, CorrelateConfig, CorrelationType, RuleRef};
pub use operator::{CorrelateFactory, Correlation, CorrelationSpec};
pub use plan::{plan_correlation, PlannedCorrelation, TENANT};

#[cfg(test)]
mod tests;
