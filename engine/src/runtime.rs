//! Runs a [`Graph`]: one tokio task per subtask, bounded channels per edge.
//!
//! # Back-pressure
//! Every edge is a set of bounded `tokio::sync::mpsc` channels (capacity
//! [`RuntimeOptions::channel_capacity`] batches). A slow sink fills its input
//! channels, its upstream waits in `send`, and so on up to the sources, which
//! stop reading. Memory in flight is bounded by
//! `edges × capacity × batch size`; nothing is buffered without limit and
//! nothing is dropped.
//!
//! # Control messages
//! Watermarks, barriers and end-of-input travel in the same channels as data
//! ([`Message`]). Watermarks and barriers are broadcast to every downstream
//! subtask of every output edge; batches are routed by the edge's
//! [`Partitioning`].
//!
//! # Failure and cancellation
//! Tasks live in one `JoinSet`. The first task to fail aborts all others and
//! its error is what [`RunningPipeline::wait`] returns, so a pipeline never
//! keeps running half-dead.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, TimeUnit, TimestampMillisecondType};
use arrow::record_batch::RecordBatch;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::checkpoint::{
    CheckpointHandle, CheckpointStore, CompletedCheckpoint, Control, Coordinator,
};
use crate::clock::{SharedClock, SystemClock};
use crate::error::{EngineError, Result};
use crate::graph::{Graph, NodeKind, Partitioning, Port};
use crate::message::{Barrier, CheckpointId, EventTime, Message, Watermark};
use crate::metrics::{MetricsRegistry, NodeRole, TaskMetrics};
use crate::operator::{Collector, OperatorState, SourceEvent, TaskContext};
use crate::watermark::{InputWatermarks, PartitionWatermarks};

/// How a pipeline runs.
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    /// Capacity of each channel, in batches.
    pub channel_capacity: usize,
    /// Wall clock handed to every subtask.
    pub clock: SharedClock,
    /// Checkpoint to restore state from before any data flows.
    pub restore: Option<Arc<CompletedCheckpoint>>,
    /// Take a checkpoint this often (none: only when triggered).
    pub checkpoint_interval: Option<std::time::Duration>,
    /// Where completed checkpoints are written before they count as complete
    /// (none: kept in memory only).
    pub store: Option<CheckpointStore>,
    /// Time processing, count bytes, sample state sizes, send latency
    /// markers and record sink latencies. Off: only the record, batch,
    /// dead-letter and watermark counters (what measuring the rest costs).
    pub detailed_metrics: bool,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        Self {
            channel_capacity: 4,
            clock: Arc::new(SystemClock),
            restore: None,
            checkpoint_interval: None,
            store: None,
            detailed_metrics: true,
        }
    }
}

/// How often a source sends a latency marker.
const LATENCY_MARKER_INTERVAL_MS: i64 = 200;

/// How often an operator's state size is sampled.
const STATE_SAMPLE_INTERVAL_MS: i64 = 1000;

/// Monotonic time for metrics (busy time, back-pressure, latency markers);
/// never for event-time logic, which reads the injected clock.
#[allow(clippy::disallowed_methods)]
fn now() -> std::time::Instant {
    std::time::Instant::now()
}

/// How long a stop waits for its final checkpoint before cancelling anyway.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Stops a running pipeline from anywhere (a signal handler, a deadline).
#[derive(Debug, Clone, Default)]
pub struct StopHandle {
    notify: Arc<tokio::sync::Notify>,
}

impl StopHandle {
    /// Asks the pipeline to stop: a last checkpoint is taken (so sources
    /// commit their positions, bounded by a few seconds), then every task is
    /// cancelled.
    pub fn stop(&self) {
        self.notify.notify_one();
    }
}

/// A pipeline whose tasks are running.
#[derive(Debug)]
pub struct RunningPipeline {
    tasks: JoinSet<Result<()>>,
    checkpoints: CheckpointHandle,
    metrics: Arc<MetricsRegistry>,
    stop: StopHandle,
    checkpoint_interval: Option<std::time::Duration>,
    store: Option<CheckpointStore>,
}

impl RunningPipeline {
    /// Counters of every subtask.
    pub fn metrics(&self) -> Arc<MetricsRegistry> {
        self.metrics.clone()
    }

    /// Triggers and reads checkpoints.
    pub fn checkpoints(&self) -> CheckpointHandle {
        self.checkpoints.clone()
    }

    /// A handle that stops the pipeline.
    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
    }

    /// Waits until every task has finished, or the pipeline was stopped
    /// through its [`StopHandle`]. The first failure aborts the others and is
    /// returned.
    pub async fn wait(mut self) -> Result<()> {
        let mut first: Option<EngineError> = None;
        let notify = self.stop.notify.clone();
        let mut stopped = false;
        let mut final_checkpoint: Option<crate::message::CheckpointId> = None;
        let period = self
            .checkpoint_interval
            .unwrap_or(std::time::Duration::from_secs(3600));
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        let coordinator = self.checkpoints.inner.clone();
        loop {
            let joined = tokio::select! {
                _ = ticks.tick(), if self.checkpoint_interval.is_some() && !stopped => {
                    if let Err(e) = self.checkpoints.trigger() {
                        tracing::debug!(error = %e, "periodic checkpoint not taken");
                        if !matches!(&e, EngineError::Checkpoint(m) if m.starts_with("every task")) {
                            coordinator.failed(0, e.to_string());
                        }
                    }
                    continue;
                }
                _ = coordinator.acknowledged_notify.notified() => {
                    if let Some(store) = &self.store {
                        for id in coordinator.take_committed() {
                            if let Err(e) = store.mark_committed(id).await {
                                tracing::warn!(checkpoint = id, error = %e, "commit marker not written; a restore from it repeats its sinks' last commit");
                            }
                        }
                    }
                    store_acknowledged(&coordinator, self.store.as_ref()).await;
                    continue;
                }
                j = self.tasks.join_next() => match j {
                    Some(j) => j,
                    None => break,
                },
                _ = notify.notified(), if !stopped => {
                    stopped = true;
                    // A last checkpoint first, so sources commit what the
                    // sinks already have; then cancel everything.
                    match self.checkpoints.trigger() {
                        Ok(id) => final_checkpoint = Some(id),
                        Err(_) => self.tasks.abort_all(),
                    }
                    continue;
                }
                _ = async {
                    match final_checkpoint {
                        Some(id) => {
                            let _ = tokio::time::timeout(STOP_GRACE, self.checkpoints.wait_handled(id)).await;
                        }
                        None => std::future::pending::<()>().await,
                    }
                } => {
                    final_checkpoint = None;
                    self.tasks.abort_all();
                    continue;
                }
            };
            let err = match joined {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => e,
                Err(j) if j.is_cancelled() => continue,
                Err(j) => EngineError::Internal(format!("task panicked: {j}")),
            };
            let secondary = matches!(err, EngineError::ChannelClosed(_));
            if secondary && stopped {
                continue; // a neighbour was cancelled first
            }
            match &first {
                None => first = Some(err),
                Some(EngineError::ChannelClosed(_)) if !secondary => first = Some(err),
                Some(_) => {}
            }
            self.tasks.abort_all();
        }
        // A checkpoint every task acknowledged as it finished still
        // completes; commits that finished as the tasks did get their marker.
        if first.is_none() {
            store_acknowledged(&coordinator, self.store.as_ref()).await;
        }
        if let Some(store) = &self.store {
            for id in coordinator.take_committed() {
                if let Err(e) = store.mark_committed(id).await {
                    tracing::warn!(checkpoint = id, error = %e, "commit marker not written");
                }
            }
        }
        first.map_or(Ok(()), Err)
    }
}

/// Counts a batch of dead letters by their error class (the `error`
/// column), once per batch.
fn count_dead_letters(metrics: &TaskMetrics, batch: &RecordBatch) {
    let Some(errors) = batch
        .column_by_name("error")
        .and_then(|c| c.as_string_opt::<i32>())
    else {
        metrics.dead_lettered("unknown", batch.num_rows() as u64);
        return;
    };
    let mut by: std::collections::BTreeMap<&str, u64> = std::collections::BTreeMap::new();
    for e in errors.iter() {
        *by.entry(e.unwrap_or("unknown")).or_insert(0) += 1;
    }
    for (error, n) in by {
        metrics.dead_lettered(error, n);
    }
}

/// Stores the checkpoints every subtask has acknowledged (when there is a
/// store) and completes them, so sources and sinks commit.
async fn store_acknowledged(coordinator: &Coordinator, store: Option<&CheckpointStore>) {
    for (checkpoint, started) in coordinator.take_acknowledged() {
        let stored = match store {
            Some(store) => store.write(&checkpoint).await.map(|s| Some(s.bytes)),
            None => Ok(None),
        };
        match stored {
            Ok(bytes) => {
                if let (Some(store), Some(b)) = (store, bytes) {
                    tracing::debug!(
                        checkpoint = checkpoint.id,
                        bytes = b,
                        location = store.location(),
                        "checkpoint stored"
                    );
                }
                coordinator.complete(checkpoint, started, bytes);
            }
            Err(e) => coordinator.failed(checkpoint.id, e.to_string()),
        }
    }
}

enum Router {
    Forward,
    RoundRobin(usize),
    /// By key group of these columns, over this many subtasks.
    Hash(Vec<usize>, usize),
}

struct Output {
    port: Port,
    target: String,
    router: Router,
    senders: Vec<mpsc::Sender<Message>>,
    /// The channel the next latency marker takes.
    next_marker: usize,
    metrics: Arc<TaskMetrics>,
}

impl Output {
    async fn send_to(&self, i: usize, msg: Message) -> Result<()> {
        let closed = |_| EngineError::ChannelClosed(self.target.clone());
        match self.senders[i].try_send(msg) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(msg)) => {
                // Only a full channel is timed: back-pressure.
                let blocked = now();
                let sent = self.senders[i].send(msg).await.map_err(closed);
                TaskMetrics::add_time(&self.metrics.backpressure_ns, blocked.elapsed());
                sent
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                Err(EngineError::ChannelClosed(self.target.clone()))
            }
        }
    }

    async fn marker(&mut self, m: crate::message::LatencyMarker) -> Result<()> {
        let i = self.next_marker % self.senders.len();
        self.next_marker = self.next_marker.wrapping_add(1);
        self.send_to(i, Message::Latency(m)).await
    }

    async fn send_batch(&mut self, batch: RecordBatch) -> Result<()> {
        match &mut self.router {
            Router::Forward => self.send_to(0, Message::Batch(batch)).await,
            Router::RoundRobin(next) => {
                let i = *next % self.senders.len();
                *next = next.wrapping_add(1);
                self.send_to(i, Message::Batch(batch)).await
            }
            Router::Hash(keys, n) => {
                let routes = crate::key_group::route(&batch, keys, *n)?;
                for (i, rows) in routes.into_iter().enumerate() {
                    if rows.len() == batch.num_rows() {
                        return self.send_to(i, Message::Batch(batch)).await;
                    }
                    if !rows.is_empty() {
                        let b = arrow::compute::take_record_batch(
                            &batch,
                            &arrow::array::UInt32Array::from(rows),
                        )?;
                        self.send_to(i, Message::Batch(b)).await?;
                    }
                }
                Ok(())
            }
        }
    }

    async fn broadcast(&self, msg: &Message) -> Result<()> {
        for i in 0..self.senders.len() {
            self.send_to(i, msg.clone()).await?;
        }
        Ok(())
    }
}

/// The outputs of one subtask.
struct Outputs {
    edges: Vec<Output>,
    metrics: Arc<TaskMetrics>,
    detailed: bool,
}

impl Outputs {
    async fn emit(&mut self, out: &mut Collector) -> Result<()> {
        for batch in out.take_main() {
            TaskMetrics::add(&self.metrics.records_out, batch.num_rows());
            TaskMetrics::add(&self.metrics.batches_out, 1);
            if self.detailed {
                TaskMetrics::add(&self.metrics.bytes_out, batch.get_array_memory_size());
            }
            for e in self.edges.iter_mut().filter(|e| e.port == Port::Main) {
                // Columns are reference-counted: a clone per consumer copies no data.
                e.send_batch(batch.clone()).await?;
            }
        }
        for (port, batch) in out.take_side() {
            if port == crate::operator::DEAD_LETTER {
                count_dead_letters(&self.metrics, &batch);
            }
            self.emit_side(port, batch).await?;
        }
        Ok(())
    }

    async fn emit_side(&mut self, port: &'static str, batch: RecordBatch) -> Result<()> {
        TaskMetrics::add(&self.metrics.batches_out, 1);
        for e in self.edges.iter_mut() {
            if e.port == Port::Side(port) {
                e.send_batch(batch.clone()).await?;
            }
        }
        Ok(())
    }

    async fn broadcast(&self, msg: Message) -> Result<()> {
        for e in &self.edges {
            e.broadcast(&msg).await?;
        }
        Ok(())
    }

    /// Passes a latency marker on: one channel of each edge.
    async fn marker(&mut self, m: crate::message::LatencyMarker) -> Result<()> {
        for e in self.edges.iter_mut() {
            e.marker(m).await?;
        }
        Ok(())
    }

    async fn watermark(&self, w: Watermark) -> Result<()> {
        if let Watermark::EventTime(t) = w {
            self.metrics.watermark_ms.store(t, Ordering::Relaxed);
        }
        self.broadcast(Message::Watermark(w)).await
    }
}

struct Slot {
    logical: usize,
    rx: mpsc::Receiver<Message>,
    blocked: bool,
    finished: bool,
}

enum InputEvent {
    Batch(usize, RecordBatch),
    Watermark(Watermark),
    Barrier(Barrier),
    Latency(crate::message::LatencyMarker),
    KeyGroups(Arc<crate::message::KeyGroupChange>),
    End,
}

/// The inputs of one subtask: fair polling, watermark merge, barrier alignment.
struct Inputs {
    slots: Vec<Slot>,
    watermarks: InputWatermarks,
    pending_barrier: Option<Barrier>,
    ready: VecDeque<InputEvent>,
    next_slot: usize,
    ended: bool,
}

impl Inputs {
    fn new(slots: Vec<Slot>) -> Self {
        Self {
            watermarks: InputWatermarks::new(slots.len()),
            slots,
            pending_barrier: None,
            ready: VecDeque::new(),
            next_slot: 0,
            ended: false,
        }
    }

    async fn recv(&mut self) -> Option<(usize, Option<Message>)> {
        let n = self.slots.len();
        let start = self.next_slot;
        let slots = &mut self.slots;
        let got = poll_fn(|cx| {
            let mut any_open = false;
            for k in 0..n {
                let i = (start + k) % n;
                let s = &mut slots[i];
                if s.blocked || s.finished {
                    continue;
                }
                any_open = true;
                if let Poll::Ready(m) = s.rx.poll_recv(cx) {
                    return Poll::Ready(Some((i, m)));
                }
            }
            if any_open {
                Poll::Pending
            } else {
                Poll::Ready(None)
            }
        })
        .await;
        if let Some((i, _)) = &got {
            self.next_slot = i + 1;
        }
        got
    }

    fn aligned(&self) -> bool {
        self.slots.iter().all(|s| s.blocked || s.finished)
    }

    fn release_barrier_if_aligned(&mut self) {
        if self.pending_barrier.is_some() && self.aligned() {
            for s in &mut self.slots {
                s.blocked = false;
            }
            if let Some(b) = self.pending_barrier.take() {
                self.ready.push_back(InputEvent::Barrier(b));
            }
        }
    }

    async fn next(&mut self, me: &str) -> Result<InputEvent> {
        loop {
            if let Some(e) = self.ready.pop_front() {
                return Ok(e);
            }
            if self.ended {
                return Ok(InputEvent::End);
            }
            let Some((i, msg)) = self.recv().await else {
                self.ended = true;
                continue;
            };
            match msg {
                Some(Message::Batch(b)) => return Ok(InputEvent::Batch(self.slots[i].logical, b)),
                Some(Message::Latency(m)) => return Ok(InputEvent::Latency(m)),
                Some(Message::KeyGroups(c)) => return Ok(InputEvent::KeyGroups(c)),
                Some(Message::Watermark(w)) => {
                    if let Some(m) = self.watermarks.update(i, w) {
                        return Ok(InputEvent::Watermark(m));
                    }
                }
                Some(Message::Barrier(b)) => {
                    self.slots[i].blocked = true;
                    self.pending_barrier = Some(b);
                    self.release_barrier_if_aligned();
                }
                Some(Message::EndOfInput) => {
                    self.slots[i].finished = true;
                    if let Some(m) = self.watermarks.finish(i) {
                        self.ready.push_back(InputEvent::Watermark(m));
                    }
                    self.release_barrier_if_aligned();
                    if self.slots.iter().all(|s| s.finished) {
                        self.ended = true;
                    }
                }
                None => return Err(EngineError::ChannelClosed(format!("input of {me}"))),
            }
        }
    }
}

fn hash_router(keys: &[String], schema: &arrow::datatypes::Schema, n: usize) -> Result<Router> {
    let idx = keys
        .iter()
        .map(|k| schema.index_of(k).map_err(EngineError::from))
        .collect::<Result<Vec<_>>>()?;
    Ok(Router::Hash(idx, n))
}

/// The states subtask `subtask` of `node` restores from `restore`.
///
/// At the parallelism the checkpoint was taken with, its own state. At
/// another parallelism: for an operator, the rows of every old subtask's
/// keyed tables whose key groups it now owns (and their operator-wide
/// tables); for a source, every old subtask's positions (each source keeps
/// the partitions it reads); for a sink, the states of the old subtasks
/// `s` with `s % parallelism == subtask`, so each pending commit is
/// finished exactly once.
fn restored(
    restore: &Option<Arc<CompletedCheckpoint>>,
    node: &crate::graph::Node,
    subtask: usize,
) -> Result<Vec<OperatorState>> {
    let Some(c) = restore else {
        return Ok(Vec::new());
    };
    let Some(&old) = c.parallelism.get(&node.name) else {
        // A node the checkpoint did not have starts empty.
        return Ok(Vec::new());
    };
    let p = node.parallelism;
    let strip = |state: &OperatorState| state.owned_by(subtask, p);
    let olds: Vec<usize> = match node.kind {
        _ if old == p => vec![subtask],
        NodeKind::Sink(_) => (0..old).filter(|s| s % p == subtask).collect(),
        _ => (0..old).collect(),
    };
    olds.into_iter()
        .filter_map(|s| c.state(&node.name, s))
        .map(strip)
        .collect()
}

/// Starts every task of `graph`. Must be called inside a tokio runtime.
pub fn start(graph: &Graph, opts: RuntimeOptions) -> Result<RunningPipeline> {
    let nodes = graph.nodes();
    let metrics = Arc::new(MetricsRegistry::default());
    let cap = opts.channel_capacity.max(1);
    // Counters of every subtask, first: its outputs time back-pressure
    // into them as the channels are wired.
    let task_metrics: Vec<Vec<Arc<TaskMetrics>>> = nodes
        .iter()
        .map(|n| {
            let role = match n.kind {
                NodeKind::Source(_) => NodeRole::Source,
                NodeKind::Operator(_) => NodeRole::Operator,
                NodeKind::Sink(_) => NodeRole::Sink,
            };
            (0..n.parallelism)
                .map(|s| metrics.register(&n.name, s, role))
                .collect()
        })
        .collect();

    // Wire channels: inputs[node][subtask], outputs[node][subtask].
    let mut inputs: Vec<Vec<Vec<Slot>>> = nodes
        .iter()
        .map(|n| (0..n.parallelism).map(|_| Vec::new()).collect())
        .collect();
    let mut outputs: Vec<Vec<Vec<Output>>> = nodes
        .iter()
        .map(|n| (0..n.parallelism).map(|_| Vec::new()).collect())
        .collect();
    for (d, node) in nodes.iter().enumerate() {
        for (logical, edge) in node.inputs.iter().enumerate() {
            let up = &nodes[edge.from];
            let schema = up.output_schema(edge.port).ok_or_else(|| {
                EngineError::Internal(format!("{} has no port {}", up.name, edge.port))
            })?;
            for (u, upstream_outputs) in outputs[edge.from].iter_mut().enumerate() {
                let targets: Vec<usize> = match edge.partitioning {
                    Partitioning::Forward => {
                        if up.parallelism != node.parallelism {
                            return Err(EngineError::Internal(format!(
                                "forward edge {} -> {} with different parallelism",
                                up.name, node.name
                            )));
                        }
                        vec![u]
                    }
                    _ => (0..node.parallelism).collect(),
                };
                let mut senders = Vec::with_capacity(targets.len());
                for &t in &targets {
                    let (tx, rx) = mpsc::channel(cap);
                    metrics.register_channel((&up.name, u), (&node.name, t), &tx);
                    senders.push(tx);
                    inputs[d][t].push(Slot {
                        logical,
                        rx,
                        blocked: false,
                        finished: false,
                    });
                }
                let router = match &edge.partitioning {
                    Partitioning::Forward => Router::Forward,
                    Partitioning::RoundRobin => Router::RoundRobin(u),
                    Partitioning::Hash(keys) => hash_router(keys, &schema, node.parallelism)?,
                };
                upstream_outputs.push(Output {
                    port: edge.port,
                    target: node.name.clone(),
                    router,
                    senders,
                    next_marker: u,
                    metrics: task_metrics[edge.from][u].clone(),
                });
            }
        }
    }

    let mut parallelism = std::collections::BTreeMap::new();
    let mut source_controls = Vec::new();
    let mut source_rx = Vec::new();
    let mut sink_controls = Vec::new();
    let mut sink_rx = Vec::new();
    for n in nodes {
        parallelism.insert(n.name.clone(), n.parallelism);
        if let NodeKind::Operator(f) = &n.kind {
            if !f.key_columns().is_empty() {
                crate::key_group::check_parallelism(&n.name, n.parallelism)?;
            }
        }
        for subtask in 0..n.parallelism {
            let (tx, rx) = mpsc::channel::<Control>(64);
            match n.kind {
                NodeKind::Source(_) => {
                    source_controls.push(((n.name.clone(), subtask), tx));
                    source_rx.push(rx);
                }
                NodeKind::Sink(_) => {
                    sink_controls.push(((n.name.clone(), subtask), tx));
                    sink_rx.push(rx);
                }
                NodeKind::Operator(_) => {}
            }
        }
    }
    let first_id = opts.restore.as_ref().map_or(1, |c| c.id + 1);
    let coordinator = Arc::new(Coordinator::new(
        parallelism,
        source_controls,
        sink_controls,
        first_id,
        opts.clock.clone(),
        opts.store.is_some(),
    ));
    let mut sink_rx = sink_rx.into_iter();
    let mut source_rx = source_rx.into_iter();

    let event_columns = event_time_columns(nodes);
    let mut tasks = JoinSet::new();
    for (id, node) in nodes.iter().enumerate() {
        let node_inputs = std::mem::take(&mut inputs[id]);
        let node_outputs = std::mem::take(&mut outputs[id]);
        for (subtask, (slots, outs)) in node_inputs.into_iter().zip(node_outputs).enumerate() {
            let ctx = TaskContext {
                node: node.name.clone(),
                subtask,
                parallelism: node.parallelism,
                clock: opts.clock.clone(),
                metrics: task_metrics[id][subtask].clone(),
            };
            let outs = Outputs {
                edges: outs,
                metrics: ctx.metrics.clone(),
                detailed: opts.detailed_metrics,
            };
            let states = restored(&opts.restore, node, subtask)?;
            let coord = coordinator.clone();
            let wrap = {
                let name = node.name.clone();
                move |e: EngineError| match e {
                    EngineError::ChannelClosed(_) => e,
                    e => EngineError::Operator {
                        operator: name,
                        subtask,
                        source: Box::new(e),
                    },
                }
            };
            match &node.kind {
                NodeKind::Source(f) => {
                    let mut source = f.create(&ctx)?;
                    for s in states {
                        source.restore(s).map_err(wrap.clone())?;
                    }
                    let et = f.event_time_column();
                    let schema = f.output_schema();
                    if !matches!(
                        schema.fields().get(et).map(|f| f.data_type()),
                        Some(DataType::Timestamp(TimeUnit::Millisecond, _))
                    ) {
                        return Err(EngineError::Internal(format!(
                            "source {}: event-time column must be a millisecond timestamp",
                            node.name
                        )));
                    }
                    let mut wm = PartitionWatermarks::new(
                        source.partitions(),
                        node.watermark.out_of_orderness_ms,
                        node.watermark.idle_timeout_ms,
                        ctx.clock.now_ms(),
                    );
                    if f.announces_watermarks() {
                        wm = wm.announced_only();
                    }
                    if f.assigned_by_group() {
                        wm = wm.awaiting_assignment();
                    }
                    let control = source_rx
                        .next()
                        .ok_or_else(|| EngineError::Internal("source control missing".into()))?;
                    tasks.spawn(async move {
                        run_source(ctx, source, et, wm, control, outs, coord)
                            .await
                            .map_err(wrap)
                    });
                }
                NodeKind::Operator(f) => {
                    let mut op = f.create(&ctx)?;
                    for s in states {
                        op.restore(s).map_err(wrap.clone())?;
                    }
                    let ins = Inputs::new(slots);
                    let factory = f.clone();
                    tasks.spawn(async move {
                        run_operator(ctx, factory, op, ins, outs, coord)
                            .await
                            .map_err(wrap)
                    });
                }
                NodeKind::Sink(f) => {
                    let schema = node
                        .inputs
                        .first()
                        .and_then(|e| nodes[e.from].output_schema(e.port))
                        .ok_or_else(|| {
                            EngineError::Internal(format!("sink {} has no input", node.name))
                        })?;
                    let mut sink = f.create(&ctx, schema.clone())?;
                    let committed = opts.restore.as_ref().is_some_and(|c| c.committed);
                    for s in states {
                        if committed {
                            sink.restore_committed(s).map_err(wrap.clone())?;
                        } else {
                            sink.restore(s).map_err(wrap.clone())?;
                        }
                    }
                    let ins = Inputs::new(slots);
                    let control = sink_rx
                        .next()
                        .ok_or_else(|| EngineError::Internal("sink control missing".into()))?;
                    let latency = SinkLatencyRecorder {
                        detailed: opts.detailed_metrics,
                        event_time_column: event_columns[id]
                            .as_deref()
                            .and_then(|c| schema.index_of(c).ok()),
                    };
                    tasks.spawn(async move {
                        run_sink(ctx, sink, ins, control, coord, latency)
                            .await
                            .map_err(wrap)
                    });
                }
            }
        }
    }
    Ok(RunningPipeline {
        tasks,
        checkpoints: CheckpointHandle { inner: coordinator },
        metrics,
        stop: StopHandle::default(),
        checkpoint_interval: opts.checkpoint_interval,
        store: opts.store,
    })
}

async fn run_source(
    ctx: TaskContext,
    mut source: Box<dyn crate::operator::Source>,
    event_time_column: usize,
    mut wm: PartitionWatermarks,
    mut control: mpsc::Receiver<Control>,
    mut outs: Outputs,
    coord: Arc<Coordinator>,
) -> Result<()> {
    let clock = ctx.clock.clone();
    let m = ctx.metrics.clone();
    let detailed = outs.detailed;
    let mut last_marker = i64::MIN;
    m.partitions.store(wm.active() as u64, Ordering::Relaxed);
    loop {
        let now_ms = clock.now_ms();
        m.last_poll_ms.store(now_ms, Ordering::Relaxed);
        if detailed && now_ms.saturating_sub(last_marker) >= LATENCY_MARKER_INTERVAL_MS {
            last_marker = now_ms;
            outs.marker(crate::message::LatencyMarker { sent: now() })
                .await?;
        }
        while let Ok(c) = control.try_recv() {
            match c {
                Control::Barrier(id) => {
                    let state = source.snapshot(id)?;
                    coord.ack(id, &ctx.node, ctx.subtask, state);
                    outs.broadcast(Message::Barrier(Barrier { checkpoint: id }))
                        .await?;
                    if let Some(groups) = source.released_at_barrier() {
                        let id = crate::message::KeyGroupChange::next_id();
                        let change = crate::message::KeyGroupChange::Release { id, groups };
                        outs.broadcast(Message::KeyGroups(Arc::new(change))).await?;
                    }
                }
                Control::Complete(id) => {
                    source.on_checkpoint_complete(id)?;
                    coord.handled(id);
                }
            }
        }
        if wm.all_finished() {
            if let Some(w) = wm.poll(clock.now_ms()) {
                outs.watermark(w).await?;
            }
            // Later checkpoints take this final position without a barrier.
            let last = source.snapshot(CheckpointId::MAX)?;
            coord.finished(&ctx.node, ctx.subtask, last);
            m.partitions.store(0, Ordering::Relaxed);
            m.finished.store(true, Ordering::Relaxed);
            outs.broadcast(Message::EndOfInput).await?;
            return Ok(());
        }
        match source.next().await? {
            SourceEvent::Data { partition, batch } => {
                let ts = batch
                    .column(event_time_column)
                    .as_primitive::<TimestampMillisecondType>();
                if let Some(max) = arrow::compute::max(ts) {
                    wm.observe(partition, max, clock.now_ms());
                } else {
                    wm.touch(partition, clock.now_ms());
                }
                TaskMetrics::add(&m.records_in, batch.num_rows());
                TaskMetrics::add(&m.batches_in, 1);
                if detailed {
                    TaskMetrics::add(&m.bytes_in, batch.get_array_memory_size());
                }
                let mut c = Collector::new();
                c.emit(batch);
                outs.emit(&mut c).await?;
            }
            SourceEvent::DeadLetters(batch) => {
                count_dead_letters(&m, &batch);
                outs.emit_side(crate::operator::DEAD_LETTER, batch).await?;
            }
            SourceEvent::Side { port, batch } => {
                TaskMetrics::add(&m.records_in, batch.num_rows());
                TaskMetrics::add(&m.batches_in, 1);
                outs.emit_side(port, batch).await?;
            }
            SourceEvent::Pending => {}
            SourceEvent::PartitionEnd(p) => wm.finish(p),
            SourceEvent::PartitionAssigned(p) => wm.assign(p, clock.now_ms()),
            SourceEvent::GroupAssigned => wm.assignment_came(),
            SourceEvent::PartitionRevoked(p) => wm.revoke(p),
            SourceEvent::KeyGroups(change) => {
                outs.broadcast(Message::KeyGroups(Arc::new(change))).await?;
            }
            SourceEvent::Watermark {
                partition,
                watermark,
            } => wm.announce(partition, watermark, clock.now_ms()),
            SourceEvent::CheckpointRequested => {
                let handle = CheckpointHandle {
                    inner: coord.clone(),
                };
                if let Err(e) = handle.trigger() {
                    tracing::warn!(node = %ctx.node, subtask = ctx.subtask, error = %e, "requested checkpoint not taken");
                }
            }
        }
        m.partitions.store(wm.active() as u64, Ordering::Relaxed);
        let next = wm.poll(clock.now_ms());
        for p in wm.take_went_idle() {
            tracing::info!(node = %ctx.node, subtask = ctx.subtask, partition = p, "partition idle: it no longer holds the watermark back");
        }
        if let Some(w) = next {
            tracing::debug!(node = %ctx.node, subtask = ctx.subtask, watermark = ?w, "source watermark");
            outs.watermark(w).await?;
        }
    }
}

/// Samples an operator's state size into its gauges, at most once per
/// [`STATE_SAMPLE_INTERVAL_MS`] unless `force`d.
struct StateSampler {
    last_ms: i64,
}

impl StateSampler {
    fn sample(&mut self, ctx: &TaskContext, op: &dyn crate::operator::Operator, force: bool) {
        let now_ms = ctx.clock.now_ms();
        if force || now_ms.saturating_sub(self.last_ms) >= STATE_SAMPLE_INTERVAL_MS {
            self.last_ms = now_ms;
            ctx.metrics.set_state_size(op.state_size());
        }
    }
}

async fn run_operator(
    ctx: TaskContext,
    factory: Arc<dyn crate::operator::OperatorFactory>,
    mut op: Box<dyn crate::operator::Operator>,
    mut ins: Inputs,
    mut outs: Outputs,
    coord: Arc<Coordinator>,
) -> Result<()> {
    let mut out = Collector::new();
    let m = ctx.metrics.clone();
    let detailed = outs.detailed;
    let stateless = op.is_stateless();
    let mut sampler = StateSampler { last_ms: i64::MIN };
    // The last event-time watermark sent on; held back by the operator's
    // hold and never decreasing.
    let mut forwarded = EventTime::MIN;
    // Key-group changes already applied (one can arrive on several inputs).
    let mut applied: VecDeque<u64> = VecDeque::new();
    loop {
        match ins.next(&ctx.node).await? {
            InputEvent::KeyGroups(change) => {
                if applied.contains(&change.id()) {
                    continue;
                }
                if applied.len() >= 256 {
                    applied.pop_front();
                }
                applied.push_back(change.id());
                if !stateless {
                    op = change_key_groups(&ctx, factory.as_ref(), op, &change)?;
                    sampler.sample(&ctx, op.as_ref(), true);
                }
                outs.broadcast(Message::KeyGroups(change)).await?;
            }
            InputEvent::Batch(input, batch) => {
                TaskMetrics::add(&m.records_in, batch.num_rows());
                TaskMetrics::add(&m.batches_in, 1);
                let started = detailed.then(now);
                if detailed {
                    TaskMetrics::add(&m.bytes_in, batch.get_array_memory_size());
                }
                if stateless {
                    process_isolating(&ctx, op.as_mut(), input, batch, &mut out)?;
                } else {
                    op.process_batch(input, batch, &mut out)?;
                }
                if let Some(t) = started {
                    TaskMetrics::add_time(&m.busy_ns, t.elapsed());
                    if !stateless {
                        sampler.sample(&ctx, op.as_ref(), false);
                    }
                }
                outs.emit(&mut out).await?;
            }
            InputEvent::Watermark(Watermark::EventTime(t)) => {
                let started = detailed.then(now);
                op.on_watermark(t, &mut out)?;
                if let Some(s) = started {
                    TaskMetrics::add_time(&m.busy_ns, s.elapsed());
                    if !stateless {
                        sampler.sample(&ctx, op.as_ref(), false);
                    }
                }
                outs.emit(&mut out).await?;
                let held = op.watermark_hold().map_or(t, |h| h.min(t));
                if held > forwarded {
                    forwarded = held;
                    outs.watermark(Watermark::EventTime(held)).await?;
                }
            }
            InputEvent::Watermark(Watermark::Idle) => {
                op.on_idle(&mut out)?;
                outs.emit(&mut out).await?;
                outs.watermark(Watermark::Idle).await?;
            }
            InputEvent::Latency(marker) => outs.marker(marker).await?,
            InputEvent::Barrier(b) => {
                let state = op.snapshot()?;
                coord.ack(b.checkpoint, &ctx.node, ctx.subtask, state);
                outs.broadcast(Message::Barrier(b)).await?;
            }
            InputEvent::End => {
                op.on_end(&mut out)?;
                outs.emit(&mut out).await?;
                let last = op.snapshot()?;
                coord.finished(&ctx.node, ctx.subtask, last);
                if detailed && !stateless {
                    sampler.sample(&ctx, op.as_ref(), true);
                }
                m.finished.store(true, Ordering::Relaxed);
                outs.broadcast(Message::EndOfInput).await?;
                return Ok(());
            }
        }
    }
}

/// Applies a key-group change to a keyed operator subtask.
///
/// An adoption adds the rows of the groups this subtask owns, from every
/// subtask state the checkpoint holds for this node, through
/// [`Operator::restore`](crate::operator::Operator::restore) (restores add
/// up); operator-wide tables are passed empty, so the subtask keeps its own
/// watermark. A release takes a snapshot, drops the groups' rows, and
/// restores what remains into a fresh subtask: operators have no other way
/// to forget keys, and this one keeps the semantics of a restore.
fn change_key_groups(
    ctx: &TaskContext,
    factory: &dyn crate::operator::OperatorFactory,
    mut op: Box<dyn crate::operator::Operator>,
    change: &crate::message::KeyGroupChange,
) -> Result<Box<dyn crate::operator::Operator>> {
    use crate::key_group::{is_keyed, owned, select};
    use crate::message::KeyGroupChange;
    match change {
        KeyGroupChange::Adopt {
            groups, checkpoint, ..
        } => {
            let Some(&old) = checkpoint.parallelism.get(&ctx.node) else {
                return Ok(op);
            };
            for s in 0..old {
                let Some(state) = checkpoint.state(&ctx.node, s) else {
                    continue;
                };
                let batches = state
                    .batches
                    .iter()
                    .map(|b| {
                        if is_keyed(b) {
                            let b = select(b, |g| groups.binary_search(&g).is_ok())?;
                            owned(&b, ctx.subtask, ctx.parallelism)
                        } else {
                            Ok(b.slice(0, 0))
                        }
                    })
                    .collect::<Result<Vec<_>>>()?;
                op.restore(OperatorState { batches })?;
            }
            tracing::debug!(node = %ctx.node, subtask = ctx.subtask, groups = groups.len(), checkpoint = checkpoint.id, "key groups adopted");
            Ok(op)
        }
        KeyGroupChange::Release { groups, .. } => {
            let state = op.snapshot()?;
            if !state.batches.iter().any(is_keyed) {
                return Ok(op);
            }
            let kept = OperatorState {
                batches: state
                    .batches
                    .iter()
                    .map(|b| select(b, |g| groups.binary_search(&g).is_err()))
                    .collect::<Result<Vec<_>>>()?,
            };
            let mut fresh = factory.create(ctx)?;
            fresh.restore(kept.owned_by(ctx.subtask, ctx.parallelism)?)?;
            tracing::debug!(node = %ctx.node, subtask = ctx.subtask, groups = groups.len(), "key groups released");
            Ok(fresh)
        }
    }
}

/// Processes `batch` through a stateless operator; when it fails on data
/// (an expression that cannot be evaluated for some row), retries the halves
/// until the failing rows are alone and sends those to dead letters with the
/// error, so one poison record neither fails the pipeline nor, after a
/// restart, fails it again.
fn process_isolating(
    ctx: &TaskContext,
    op: &mut dyn crate::operator::Operator,
    input: usize,
    batch: RecordBatch,
    out: &mut Collector,
) -> Result<()> {
    let mut attempt = Collector::new();
    let err = match op.process_batch(input, batch.clone(), &mut attempt) {
        Ok(()) => {
            out.absorb(attempt);
            return Ok(());
        }
        Err(e) if e.domain() == crate::error::ErrorDomain::User => e,
        Err(e) => return Err(e),
    };
    if batch.num_rows() == 1 {
        // Per record, so below debug; the dead letter and its counter are
        // what operators watch.
        tracing::trace!(node = %ctx.node, subtask = ctx.subtask, error = %err, "record sent to dead letters: the step fails on it");
        let mut raw = Vec::new();
        {
            let mut w = arrow::json::LineDelimitedWriter::new(&mut raw);
            w.write(&batch)?;
            w.finish()?;
        }
        let raw = raw.trim_ascii_end();
        let mut dead = crate::dead_letter::DeadLetters::new(&ctx.node);
        dead.push(&ctx.node, None, "processing_failed", &err.to_string(), raw);
        if let Some(d) = dead.finish()? {
            out.emit_side(crate::operator::DEAD_LETTER, d);
        }
        return Ok(());
    }
    let half = batch.num_rows() / 2;
    process_isolating(ctx, op, input, batch.slice(0, half), out)?;
    process_isolating(
        ctx,
        op,
        input,
        batch.slice(half, batch.num_rows() - half),
        out,
    )
}

async fn run_sink(
    ctx: TaskContext,
    mut sink: Box<dyn crate::operator::Sink>,
    mut ins: Inputs,
    mut control: mpsc::Receiver<Control>,
    coord: Arc<Coordinator>,
    latency: SinkLatencyRecorder,
) -> Result<()> {
    let m = ctx.metrics.clone();
    loop {
        let event = tokio::select! {
            biased;
            Some(c) = control.recv() => {
                if let Control::Complete(id) = c {
                    let started = latency.detailed.then(now);
                    sink.on_checkpoint_complete(id).await?;
                    if let Some(t) = started {
                        TaskMetrics::add_time(&m.busy_ns, t.elapsed());
                    }
                    coord.handled(id);
                }
                continue;
            }
            e = ins.next(&ctx.node) => e?,
        };
        match event {
            InputEvent::Batch(_, batch) => {
                let n = batch.num_rows();
                TaskMetrics::add(&m.records_in, n);
                TaskMetrics::add(&m.batches_in, 1);
                let started = latency.detailed.then(now);
                if latency.detailed {
                    TaskMetrics::add(&m.bytes_in, batch.get_array_memory_size());
                    latency.event_time(&ctx, &batch);
                }
                sink.write(batch).await?;
                if let Some(t) = started {
                    TaskMetrics::add_time(&m.busy_ns, t.elapsed());
                }
                TaskMetrics::add(&m.records_out, n);
            }
            InputEvent::Watermark(w) => {
                if let Watermark::EventTime(t) = w {
                    m.watermark_ms.store(t, Ordering::Relaxed);
                    sink.on_watermark(t).await?;
                }
            }
            InputEvent::Latency(marker) => latency.ingest(&ctx, marker),
            // A sink's output is committed per checkpoint, not per key.
            InputEvent::KeyGroups(_) => {}
            InputEvent::Barrier(b) => {
                let started = latency.detailed.then(now);
                let state = sink.snapshot(b.checkpoint).await?;
                if let Some(t) = started {
                    TaskMetrics::add_time(&m.busy_ns, t.elapsed());
                }
                coord.ack(b.checkpoint, &ctx.node, ctx.subtask, state);
            }
            InputEvent::End => {
                sink.finish().await?;
                // What later checkpoints hold for this sink: everything
                // committed (a file sink's full length, so a restore keeps it).
                let last = sink.snapshot(CheckpointId::MAX).await?;
                coord.finished(&ctx.node, ctx.subtask, last);
                m.finished.store(true, Ordering::Relaxed);
                return Ok(());
            }
        }
    }
}

/// Records a sink subtask's latencies into its histograms.
struct SinkLatencyRecorder {
    detailed: bool,
    /// The input column holding event time, if any.
    event_time_column: Option<usize>,
}

impl SinkLatencyRecorder {
    /// Wall clock minus each row's event time (clamped at zero: rows from
    /// the future count as on time).
    fn event_time(&self, ctx: &TaskContext, batch: &RecordBatch) {
        let (Some(col), Some(lat)) = (self.event_time_column, &ctx.metrics.latency) else {
            return;
        };
        let Some(ts) = batch
            .columns()
            .get(col)
            .and_then(|c| c.as_primitive_opt::<TimestampMillisecondType>())
        else {
            return;
        };
        let now_ms = ctx.clock.now_ms();
        let mut h = lat.event_time.lock();
        let us = |t: i64| (now_ms.saturating_sub(t).max(0) as u64).saturating_mul(1000);
        if ts.null_count() == 0 {
            for t in ts.values().iter() {
                h.saturating_record(us(*t));
            }
        } else {
            for t in ts.iter().flatten() {
                h.saturating_record(us(t));
            }
        }
    }

    fn ingest(&self, ctx: &TaskContext, marker: crate::message::LatencyMarker) {
        if let Some(lat) = &ctx.metrics.latency {
            let us = marker.sent.elapsed().as_micros() as u64;
            lat.ingest.lock().saturating_record(us.max(1));
        }
    }
}

/// The event-time column of each node's main output, by name: a source's
/// declared column; an operator's own choice, or its input's column if the
/// output keeps it, or `window_end`; a sink's input's.
pub fn event_time_columns(nodes: &[crate::graph::Node]) -> Vec<Option<String>> {
    fn is_ts(schema: &arrow::datatypes::Schema, name: &str) -> bool {
        schema
            .field_with_name(name)
            .is_ok_and(|f| matches!(f.data_type(), DataType::Timestamp(TimeUnit::Millisecond, _)))
    }
    fn resolve(
        nodes: &[crate::graph::Node],
        i: usize,
        memo: &mut Vec<Option<Option<String>>>,
        depth: usize,
    ) -> Option<String> {
        if let Some(known) = &memo[i] {
            return known.clone();
        }
        if depth > nodes.len() {
            return None;
        }
        let node = &nodes[i];
        let upstream = node
            .inputs
            .first()
            .filter(|e| e.port == Port::Main)
            .and_then(|e| resolve(nodes, e.from, memo, depth + 1));
        let col = match &node.kind {
            NodeKind::Source(f) => f
                .output_schema()
                .fields()
                .get(f.event_time_column())
                .map(|f| f.name().clone()),
            NodeKind::Operator(f) => {
                let schema = f.output_schema();
                f.event_time_column()
                    .or(upstream.filter(|c| is_ts(&schema, c)))
                    .or_else(|| is_ts(&schema, "window_end").then(|| "window_end".to_string()))
            }
            NodeKind::Sink(_) => upstream,
        };
        memo[i] = Some(col.clone());
        col
    }
    let mut memo = vec![None; nodes.len()];
    (0..nodes.len())
        .map(|i| resolve(nodes, i, &mut memo, 0))
        .collect()
}
