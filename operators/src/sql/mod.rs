//! SQL over streams.
//!
//! A SQL step is one `SELECT` over a source or an earlier step. DataFusion
//! parses, resolves and type-checks it and makes its expressions and
//! aggregate accumulators; Vigil's own operators run it, because
//! DataFusion's executors read bounded inputs to the end while a stream
//! never ends and must emit a window's rows when the watermark closes it.
//!
//! * [`rewrite`]: Flink's window syntax (`GROUP BY TUMBLE(…)`, window
//!   table functions) into tables DataFusion can plan;
//! * [`planner`]: the logical plan cut into stateless stages around a
//!   windowed aggregate or an interval join (`interval`), and everything a
//!   stream cannot answer refused;
//! * [`stages`]: the stateless part, run per batch;
//! * [`error`]: errors with their position in the query and a hint.

pub mod config;
pub mod error;
pub mod planner;
pub mod rewrite;
pub mod stages;

pub use config::SqlConfig;
pub use error::SqlError;
pub use planner::{
    plan_query, tables_of, Catalog, OneTable, PlannedQuery, PrepareStep, QueryOptions, StepInput,
    TableInfo,
};
pub use stages::{Stage, Stages, StatelessFactory};

#[cfg(test)]
mod tests;
