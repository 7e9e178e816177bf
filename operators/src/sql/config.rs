//! What pipeline authors write for a SQL step.
//!
//! ```yaml
//! failures_per_minute:
//!   type: sql
//!   query: |
//!     SELECT window_start, window_end, tenant_id, src_ip, count(*) AS failures
//!     FROM auth
//!     WHERE outcome = 'failure'
//!     GROUP BY TUMBLE(ts, INTERVAL '1' MINUTE), tenant_id, src_ip
//!   allowed_lateness: 30s
//! ```
//!
//! The step reads the tables its query names (sources and earlier steps, by
//! name), so it has no `input`.

use std::time::Duration;

use serde::Deserialize;

/// Configuration of a `sql` step.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlConfig {
    /// One `SELECT` over sources and earlier steps.
    pub query: String,
    /// How long after a window's end a late row still updates it (an
    /// `update` row follows, and the output gains an `op` column). Rows
    /// later than that go to the step's `late` output. Default 0s.
    #[serde(default, with = "humantime_serde")]
    pub allowed_lateness: Option<Duration>,
    /// Let a join pair rows of different tenants. By default, when both
    /// tables have `tenant_id`, it is part of the join's key.
    #[serde(default)]
    pub cross_tenant: bool,
}

impl SqlConfig {
    /// The allowed lateness in milliseconds.
    pub fn lateness_ms(&self) -> i64 {
        self.allowed_lateness.map_or(0, |d| d.as_millis() as i64)
    }
}
