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

pub mod error;
pub mod expr;
pub mod filter;
pub mod project;
pub mod threshold;

pub use error::{OperatorError, Result};
