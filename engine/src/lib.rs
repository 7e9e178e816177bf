//! Vigil's dataflow runtime.
//!
//! A pipeline is a [`Graph`] of sources, operators and sinks. The runtime runs
//! each node as `parallelism` tokio tasks joined by bounded channels that
//! carry Arrow record batches interleaved with control messages (watermarks,
//! checkpoint barriers, end of input). The pieces, in the order data meets
//! them:
//!
//! * [`operator`]: the contracts sources, operators and sinks implement;
//! * [`graph`]: nodes, parallelism and edge partitioning;
//! * [`runtime`]: tasks, channels, back-pressure, barrier alignment;
//! * [`watermark`]: per-partition watermarks, idleness, merging;
//! * [`checkpoint`]: barrier coordination, durable checkpoints, commits;
//! * [`key_group`]: how keyed state is divided, so it can be rescaled;
//! * [`event_log`]: durable event logs for event-sourced operators;
//! * [`metrics`]: per-subtask counters, gauges and latency histograms, and
//!   their Prometheus form;
//! * [`clock`]: the injected wall clock.
//!
//! The engine knows nothing of particular connectors or operators; those live
//! in `vigil-connectors` and `vigil-operators` and plug in through the
//! factory traits.

pub mod checkpoint;
pub mod clock;
pub mod dead_letter;
pub mod error;
pub mod event_log;
pub mod graph;
pub mod key_group;
pub mod lookup;
pub mod message;
pub mod metrics;
pub mod operator;
pub mod runtime;
pub mod watermark;

pub use checkpoint::{
    CheckpointHandle, CheckpointStats, CheckpointStore, CompletedCheckpoint, PartitionPointer,
};
pub use clock::{Clock, ManualClock, SharedClock, SystemClock};
pub use error::{ConfigError, EngineError, ErrorDomain, Result};
pub use event_log::{EventLog, MemoryEventLog, Recovery};
pub use graph::{Graph, NodeId, Partitioning, Port};
pub use lookup::{TableFeed, TableUpdate};
pub use message::{
    Barrier, CheckpointId, EventTime, KeyGroupChange, LatencyMarker, Message, Watermark,
};
pub use metrics::{MetricsRegistry, NodeRole, Percentiles, StateSize, TaskMetrics};
pub use operator::{
    Collector, Operator, OperatorFactory, OperatorState, Sink, SinkFactory, Source, SourceEvent,
    SourceFactory, TaskContext, DEAD_LETTER, LATE,
};
pub use runtime::{event_time_columns, start, RunningPipeline, RuntimeOptions, StopHandle};
pub use watermark::WatermarkSpec;
