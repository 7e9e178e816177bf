//! Event-time windowed aggregation: `GROUP BY` over tumbling, hopping and
//! session windows of an endless, out-of-order stream.
//!
//! The [SQL planner](crate::sql) turns a windowed query into a
//! [`WindowAggregateSpec`]: which window, which key columns, which
//! DataFusion aggregates, and the stateless steps before and after. This
//! module keeps the state and decides when a window's rows are final:
//!
//! * [`fixed`]: tumbling and hopping windows, state per window holding
//!   DataFusion `GroupValues` and `GroupsAccumulator`s;
//! * [`session`]: session windows per key, merging when a row bridges two;
//! * [`operator`]: the engine operator and its factory.
//!
//! # Watermarks
//! A window's row is emitted when the watermark reaches its end
//! (`window_end <= watermark`). Rows for an emitted window are *late*: within
//! the allowed lateness they update it and an `update` row follows (the
//! output then has an [`OP_COLUMN`]); past it they go to the `late` side
//! output and are counted. A window's state is freed once its end plus the
//! lateness has passed, so state holds only what can still change.
//!
//! # Checkpointing
//! State is snapshotted as Arrow tables: per window (or session) its bounds,
//! its keys and DataFusion's intermediate accumulator state, the same state
//! DataFusion's partial aggregates exchange, so every aggregate DataFusion
//! can merge can be checkpointed.

pub mod fixed;
pub mod operator;
pub mod session;
pub mod spec;

pub use operator::{WindowAggregate, WindowAggregateFactory};
pub use spec::{AggregateCall, GroupColumn, Op, WindowAggregateSpec, WindowKind, OP_COLUMN};

#[cfg(test)]
pub(crate) mod tests;
