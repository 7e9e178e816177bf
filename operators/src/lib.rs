//! Vigil's dataflow operators.
//!
//! Each operator is a synchronous, I/O-free core behind the engine's
//! [`Operator`](vigil_engine::Operator) trait, built by a factory that checks
//! its configuration against the input schema before the pipeline starts.
//!
//! | operator    | what it does |
//! |-------------|--------------|
//! | `filter`    | keeps rows matching a SQL condition |
//! | `project`   | computes columns with SQL expressions |
//! | `threshold` | fires when a key reaches a count or a distinct count in a window |
//! | `sql`       | a SQL query: row by row, a windowed aggregate (`window`), or an interval join (`join`) |
//! | `correlate` | Sigma correlations (event and value counts over a sliding span, temporal) and EQL sequences |
//! | `incidents` | alerts into event-sourced incidents, with read models (summary, open incidents, entity risk) |
//! | `join`      | interval joins of two streams; lookup joins against a changing table (exact or CIDR) |

pub mod correlate;
pub mod error;
pub mod expr;
pub mod filter;
pub mod incident;
pub mod join;
mod late;
pub mod project;
pub mod sql;
mod state;
pub mod threshold;
pub mod window;

#[cfg(test)]
mod testing;

pub use error::{OperatorError, Result};
