//! The contracts every dataflow component implements: [`Source`], [`Operator`]
//! and [`Sink`].
//!
//! Operators have a **synchronous core**: they take a batch or a watermark and
//! push results into a [`Collector`]; the runtime's async task around them
//! does all channel I/O and back-pressure. That keeps operator logic plain,
//! testable with `#[test]`, and free of `await` points in the hot path.
//! Sources and sinks do I/O, so theirs are async.
//!
//! # Watermarks
//! [`Operator::on_watermark`] is called with the operator's *merged* input
//! watermark (minimum over active inputs, see [`crate::watermark`]) each time
//! it advances. After it returns, the runtime forwards the same watermark
//! downstream, so anything the operator emits for a closed window is ahead of
//! the watermark that closes it.
//!
//! An operator that buffers rows and emits them later with their own event
//! time (an interval join) reports [`Operator::watermark_hold`]; the runtime
//! then forwards the smaller of the two, so its output is never late.
//!
//! # Checkpointing
//! When a barrier has arrived on every input (aligned barriers), the runtime
//! calls [`Operator::snapshot`]; the returned [`OperatorState`] is the
//! operator's whole state as Arrow batches. On restart,
//! [`Operator::restore`] receives the same batches before any data; after
//! a rescale, the rows of the key groups each subtask now owns. Sinks take
//! part as the second phase of a two-phase commit: [`Sink::snapshot`]
//! pre-commits, [`Sink::on_checkpoint_complete`] commits.
//!
//! # End of input
//! When every input has ended, [`Operator::on_end`] may flush what remains.
//! Inputs end with a `Watermark::EventTime(i64::MAX)` first, so event-time
//! operators have already closed every window by then.
//!
//! # Errors
//! An error from any method fails the pipeline; an operator never panics on
//! bad data. Records it cannot handle go to a side output (dead letters, late
//! data) through [`Collector::emit_side`], and are counted.

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;

use crate::clock::SharedClock;
use crate::error::Result;
use crate::message::{CheckpointId, EventTime};
use crate::metrics::TaskMetrics;
use std::sync::Arc;

/// Names a side output of a node: records that leave the main flow.
pub type SidePort = &'static str;

/// Side output for records that could not be decoded or processed.
pub const DEAD_LETTER: SidePort = "dead_letter";

/// Side output for records behind the watermark that no window can take.
pub const LATE: SidePort = "late";

/// Where an operator or source puts its output during one call.
#[derive(Debug, Default)]
pub struct Collector {
    main: Vec<RecordBatch>,
    side: Vec<(SidePort, RecordBatch)>,
}

impl Collector {
    /// An empty collector.
    pub fn new() -> Self {
        Self::default()
    }

    /// Emits a batch on the main output. Empty batches are dropped.
    pub fn emit(&mut self, batch: RecordBatch) {
        if batch.num_rows() > 0 {
            self.main.push(batch);
        }
    }

    /// Emits a batch on a side output.
    pub fn emit_side(&mut self, port: SidePort, batch: RecordBatch) {
        if batch.num_rows() > 0 {
            self.side.push((port, batch));
        }
    }

    /// Moves everything `other` collected into this collector.
    pub fn absorb(&mut self, mut other: Collector) {
        self.main.append(&mut other.main);
        self.side.append(&mut other.side);
    }

    /// True when nothing was emitted.
    pub fn is_empty(&self) -> bool {
        self.main.is_empty() && self.side.is_empty()
    }

    /// Takes the main-output batches.
    pub fn take_main(&mut self) -> Vec<RecordBatch> {
        std::mem::take(&mut self.main)
    }

    /// Takes the side-output batches.
    pub fn take_side(&mut self) -> Vec<(SidePort, RecordBatch)> {
        std::mem::take(&mut self.side)
    }
}

/// The state of one operator subtask at a checkpoint, as Arrow batches.
#[derive(Debug, Clone, Default)]
pub struct OperatorState {
    /// State tables; their meaning is the operator's own.
    pub batches: Vec<RecordBatch>,
}

impl OperatorState {
    /// What subtask `subtask` of `parallelism` restores from this state:
    /// the rows of keyed tables in its key groups, without the key-group
    /// column, and the other tables whole (as the runtime hands it over).
    pub fn owned_by(&self, subtask: usize, parallelism: usize) -> Result<OperatorState> {
        Ok(OperatorState {
            batches: self
                .batches
                .iter()
                .map(|b| crate::key_group::owned(b, subtask, parallelism))
                .collect::<Result<Vec<_>>>()?,
        })
    }
}

/// What a running subtask knows about its place in the graph.
#[derive(Debug, Clone)]
pub struct TaskContext {
    /// Name of the node in the pipeline.
    pub node: String,
    /// This subtask's index, `0..parallelism`.
    pub subtask: usize,
    /// Number of subtasks of this node.
    pub parallelism: usize,
    /// Wall clock; the only one an operator may read.
    pub clock: SharedClock,
    /// Counters of this subtask.
    pub metrics: Arc<TaskMetrics>,
}

impl TaskContext {
    /// A context for running a component outside a pipeline (tests,
    /// embedding): subtask `subtask` of `parallelism`, a manual clock at
    /// `now_ms`, and counters of its own.
    pub fn detached(node: &str, subtask: usize, parallelism: usize, now_ms: i64) -> Self {
        Self {
            node: node.to_string(),
            subtask,
            parallelism,
            clock: crate::clock::ManualClock::new(now_ms),
            metrics: Arc::new(TaskMetrics::default()),
        }
    }
}

/// A transforming step: filter, projection, window, join, detection.
pub trait Operator: Send {
    /// Processes one batch that arrived on logical input `input`.
    fn process_batch(
        &mut self,
        input: usize,
        batch: RecordBatch,
        out: &mut Collector,
    ) -> Result<()>;

    /// The merged input watermark advanced to `watermark`.
    fn on_watermark(&mut self, _watermark: EventTime, _out: &mut Collector) -> Result<()> {
        Ok(())
    }

    /// Every input that has not ended is idle (its partitions are quiet,
    /// or it was given none). Event time does not move, but an operator
    /// may emit what does not wait for it (a restored projection's read
    /// models).
    fn on_idle(&mut self, _out: &mut Collector) -> Result<()> {
        Ok(())
    }

    /// The earliest event time this operator may still emit, if that is
    /// behind its input watermark. A join that keeps rows to pair them later
    /// emits them with their own event time; the runtime forwards
    /// `min(input watermark, hold)` so those rows are not late downstream.
    fn watermark_hold(&self) -> Option<EventTime> {
        None
    }

    /// Returns the operator's state for a checkpoint. Tables of keyed state
    /// carry each row's key group ([`crate::key_group::tag`]).
    fn snapshot(&mut self) -> Result<OperatorState> {
        Ok(OperatorState::default())
    }

    /// Adds checkpointed state, before any data. Called once per subtask
    /// state of the checkpoint that holds keys this subtask owns: once when
    /// the parallelism is unchanged, several times (one per old subtask,
    /// with only the rows of this subtask's key groups, and the key-group
    /// column removed) when the pipeline was rescaled. Tables without key
    /// groups (an operator-wide watermark) come from every old subtask.
    fn restore(&mut self, _state: OperatorState) -> Result<()> {
        Ok(())
    }

    /// How much state the operator holds; sampled by the runtime about
    /// once a second, so it may walk its tables.
    fn state_size(&self) -> crate::metrics::StateSize {
        crate::metrics::StateSize::default()
    }

    /// True when the operator keeps no state between batches, so a batch
    /// that fails can be retried in parts to isolate a poison record.
    fn is_stateless(&self) -> bool {
        false
    }

    /// Every input has ended; flush what remains.
    fn on_end(&mut self, _out: &mut Collector) -> Result<()> {
        Ok(())
    }
}

/// Builds the subtasks of an operator node.
pub trait OperatorFactory: Send + Sync {
    /// Schema of the main output.
    fn output_schema(&self) -> SchemaRef;
    /// Builds subtask `ctx.subtask`.
    fn create(&self, ctx: &TaskContext) -> Result<Box<dyn Operator>>;
    /// Key expressions the input must be hash-partitioned by (empty: any).
    fn key_columns(&self) -> Vec<String> {
        Vec::new()
    }
    /// Side outputs this operator may emit, with their schemas.
    fn side_outputs(&self) -> Vec<(SidePort, SchemaRef)> {
        Vec::new()
    }
    /// The output column holding each row's event time (a millisecond
    /// timestamp), which sinks measure event-time latency on. `None`: the
    /// input's event-time column if the output keeps it, else `window_end`.
    fn event_time_column(&self) -> Option<String> {
        None
    }
    /// One-line description for `vigil explain`.
    fn describe(&self) -> String;
}

/// What a source hands the runtime on one poll.
#[derive(Debug)]
pub enum SourceEvent {
    /// Records from partition `partition` (index into the subtask's partitions).
    Data {
        /// Partition index within this subtask.
        partition: usize,
        /// The records.
        batch: RecordBatch,
    },
    /// Records that could not be decoded, in the dead-letter schema.
    DeadLetters(RecordBatch),
    /// Records for side output `port` (one of [`SourceFactory::side_outputs`]),
    /// in its schema: a repartition topic that carries both inputs of a join
    /// hands the second input's rows out here. They do not move the
    /// watermark; such a source announces it.
    Side {
        /// The side output.
        port: SidePort,
        /// The records.
        batch: RecordBatch,
    },
    /// Nothing available right now; poll again.
    Pending,
    /// Partition `partition` has ended (a file read to its end).
    PartitionEnd(usize),
    /// This subtask now reads partition `partition` (a Kafka rebalance gave
    /// it one); indices may grow past [`Source::partitions`].
    PartitionAssigned(usize),
    /// The group's assignment for this subtask has come, its partitions
    /// (if any) announced just before: a subtask given none stops waiting
    /// for one (see [`SourceFactory::assigned_by_group`]).
    GroupAssigned,
    /// The watermark of partition `partition` is `watermark`, as its
    /// producers announced it (a repartition topic carries its writers'
    /// watermarks): the partition is held there from now on, not at its
    /// records' event times.
    Watermark {
        /// Partition index within this subtask.
        partition: usize,
        /// The announced watermark.
        watermark: EventTime,
    },
    /// This subtask no longer reads partition `partition`; it stops holding
    /// the watermark back, but the source has not ended.
    PartitionRevoked(usize),
    /// Key groups change owner: sent on to every operator downstream, in
    /// order with the records (see [`crate::KeyGroupChange`]).
    KeyGroups(crate::KeyGroupChange),
    /// The source needs a checkpoint now: a Kafka partition being revoked
    /// is handed over only once what was read from it has reached the sinks
    /// and its offset is committed. The runtime triggers one for the whole
    /// pipeline; [`Source::on_checkpoint_complete`] follows.
    CheckpointRequested,
}

/// A source subtask: reads its share of a source's partitions.
///
/// `next` must return within about 100 ms ([`SourceEvent::Pending`] when
/// nothing is there) so the runtime can inject barriers and detect idleness.
///
/// # Checkpointing
/// [`Source::snapshot`] is called when a barrier is injected, between two
/// calls to `next`: the position returned covers exactly what `next` has
/// handed out. [`Source::on_checkpoint_complete`] is called once every
/// subtask of the pipeline has acknowledged that checkpoint, i.e. every
/// record before the barrier has been processed and every sink has flushed;
/// a source that commits positions upstream (Kafka offsets) does it there.
#[async_trait]
pub trait Source: Send {
    /// Number of partitions this subtask reads when it starts (more may be
    /// assigned later, see [`SourceEvent::PartitionAssigned`]).
    fn partitions(&self) -> usize;
    /// Next event; see [`SourceEvent`].
    async fn next(&mut self) -> Result<SourceEvent>;
    /// Position of this subtask (offsets, generator progress) for checkpoint
    /// `checkpoint`.
    fn snapshot(&mut self, _checkpoint: CheckpointId) -> Result<OperatorState> {
        Ok(OperatorState::default())
    }
    /// Key groups this subtask hands over at the checkpoint whose barrier
    /// it has just injected (the groups of partitions being revoked). The
    /// runtime sends their release right behind the barrier, so the
    /// checkpoint still holds their state and nothing after it does.
    fn released_at_barrier(&mut self) -> Option<Vec<u16>> {
        None
    }
    /// Checkpoint `checkpoint` is complete everywhere in the pipeline.
    fn on_checkpoint_complete(&mut self, _checkpoint: CheckpointId) -> Result<()> {
        Ok(())
    }
    /// Restores positions taken by [`Source::snapshot`]. After a rescale,
    /// every old subtask's state is offered in turn: a source takes the
    /// positions of the partitions it reads and ignores the others.
    fn restore(&mut self, _state: OperatorState) -> Result<()> {
        Ok(())
    }
}

/// Builds the subtasks of a source node.
pub trait SourceFactory: Send + Sync {
    /// Schema of the records.
    fn output_schema(&self) -> SchemaRef;
    /// Column holding event time (a millisecond timestamp), used for watermarks.
    fn event_time_column(&self) -> usize;
    /// Builds subtask `ctx.subtask`.
    fn create(&self, ctx: &TaskContext) -> Result<Box<dyn Source>>;
    /// Side outputs, with their schemas (dead letters).
    fn side_outputs(&self) -> Vec<(SidePort, SchemaRef)> {
        Vec::new()
    }
    /// Largest useful parallelism (number of partitions), if bounded.
    fn max_parallelism(&self) -> Option<usize> {
        None
    }
    /// True when the source's partitions carry their watermarks
    /// ([`SourceEvent::Watermark`]) and their records' event times say
    /// nothing about what may follow: a repartition topic, whose rows of
    /// many writers are in no event-time order. Such a partition holds the
    /// watermark back until its first announcement instead of being
    /// derived from the rows it delivered.
    fn announces_watermarks(&self) -> bool {
        false
    }
    /// True when a subtask's partitions come from a consumer group after
    /// it starts: until the group's first assignment
    /// ([`SourceEvent::GroupAssigned`]), or for its idle timeout, a subtask
    /// without partitions holds the watermark back instead of being idle,
    /// because the partitions it is about to get may hold the oldest rows.
    fn assigned_by_group(&self) -> bool {
        false
    }
    /// One-line description for `vigil explain`.
    fn describe(&self) -> String;
}

/// A sink subtask: writes batches out of the pipeline.
#[async_trait]
pub trait Sink: Send {
    /// Writes one batch. May wait: waiting here is how back-pressure reaches
    /// the sources.
    async fn write(&mut self, batch: RecordBatch) -> Result<()>;
    /// The merged watermark advanced (sinks that report lag use it).
    async fn on_watermark(&mut self, _watermark: EventTime) -> Result<()> {
        Ok(())
    }
    /// Makes everything written so far durable.
    async fn flush(&mut self) -> Result<()> {
        Ok(())
    }
    /// A barrier for `checkpoint` arrived on every input: pre-commit what was
    /// written since the last one (flush it, close a transaction's writes)
    /// and return what a restore needs to finish or roll back that commit.
    /// By default: flush, no state.
    async fn snapshot(&mut self, _checkpoint: CheckpointId) -> Result<OperatorState> {
        self.flush().await?;
        Ok(OperatorState::default())
    }
    /// Checkpoint `checkpoint` is complete and durable: commit what its
    /// snapshot pre-committed (and anything older).
    async fn on_checkpoint_complete(&mut self, _checkpoint: CheckpointId) -> Result<()> {
        Ok(())
    }
    /// Before any data: the state of the checkpoint the pipeline restarts
    /// from (called once per restored subtask state). Work committed after
    /// it is kept; work pre-committed by it and not yet committed is
    /// committed now; anything later is rolled back.
    fn restore(&mut self, _state: OperatorState) -> Result<()> {
        Ok(())
    }
    /// [`Sink::restore`] from a checkpoint every sink is known to have
    /// committed: its pre-commits must not be committed again. By default
    /// the same as `restore` (for sinks whose commit is idempotent).
    fn restore_committed(&mut self, state: OperatorState) -> Result<()> {
        self.restore(state)
    }
    /// Every input has ended: commit everything (by default, flush).
    async fn finish(&mut self) -> Result<()> {
        self.flush().await
    }
}

/// Builds the subtasks of a sink node.
pub trait SinkFactory: Send + Sync {
    /// Checks that the sink can take records of `schema` (a key column
    /// exists, ...), when the pipeline is planned.
    fn check_input(&self, _schema: &SchemaRef) -> Result<()> {
        Ok(())
    }
    /// Builds subtask `ctx.subtask` for input records of `schema`.
    fn create(&self, ctx: &TaskContext, schema: SchemaRef) -> Result<Box<dyn Sink>>;
    /// Highest parallelism the sink supports (stdout: 1).
    fn max_parallelism(&self) -> Option<usize> {
        None
    }
    /// One-line description for `vigil explain`.
    fn describe(&self) -> String;
}
