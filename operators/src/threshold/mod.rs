//! `threshold`: a detection that fires when a key is seen too often (or with
//! too many distinct values) within an event-time window.
//!
//! ```text
//!  rows ──► window_start = ts - ts mod width ──► state[(window, key)] += row
//!                                                   │
//!  watermark ≥ window_end ───────────────────────────┴─► emit keys over threshold,
//!                                                        free the window
//! ```
//!
//! Two conditions, as in Sigma correlation rules: `min_count` (an
//! `event_count` rule: "20 failed logins for one user from one address in a
//! minute") and `distinct` + `min_distinct` (a `value_count` rule: "one
//! address failing against 10 distinct users in a minute"). Windows are
//! tumbling and closed by the watermark, so results are the same however the
//! input is batched, ordered within the allowed disorder, or parallelised
//! (state is partitioned by key: the engine hash-partitions input on `key`).
//!
//! A row whose window has already closed is *late*: it is counted and sent to
//! the `late` side output, never silently folded into a wrong answer.
//!
//! State is one accumulator per (window, key) plus the distinct values seen,
//! all freed as soon as the watermark passes the window; it is checkpointed as
//! two Arrow tables (accumulators, distinct values) with keys in Arrow's row
//! format.

mod config;
mod operator;

pub use config::ThresholdConfig;
pub use operator::ThresholdFactory;

#[cfg(test)]
mod tests;
