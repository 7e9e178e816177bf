//! What pipeline authors write for a `threshold` detection.

use std::time::Duration;

use serde::Deserialize;

/// Configuration of a `threshold` step.
///
/// ```yaml
/// brute_force:
///   type: threshold
///   input: failed_logins
///   key: [tenant_id, src_ip, user]
///   window: 1m
///   min_count: 20
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThresholdConfig {
    /// Columns that identify what is counted (always include the tenant:
    /// detections never mix tenants).
    pub key: Vec<String>,
    /// Width of the tumbling event-time window.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Fire when a key has at least this many rows in a window.
    #[serde(default)]
    pub min_count: Option<u64>,
    /// Count distinct values of this column instead of rows.
    #[serde(default)]
    pub distinct: Option<String>,
    /// Fire when a key has at least this many distinct values in a window.
    #[serde(default)]
    pub min_distinct: Option<u64>,
    /// Column holding event time (default: the input's event-time column).
    #[serde(default)]
    pub time: Option<String>,
    /// Value of the `rule` column of the alerts (default: the step's name).
    #[serde(default)]
    pub rule: Option<String>,
}
