//! What every subtask reports while the pipeline runs: counters, gauges and
//! latency histograms, readable at any time without stopping anything.
//!
//! # Shape
//! Each subtask owns one [`TaskMetrics`]: plain atomics that the runtime and
//! the components update once per batch (never per record), so keeping them
//! costs nothing measurable on the hot path. Sinks also own two hdrhistogram
//! latency histograms, recorded per batch under a lock only the sink and a
//! scrape ever take. Nothing is aggregated or formatted on the data path:
//! readers (the Prometheus endpoint in [`export`], the CLI's status line,
//! `/v1/pipeline`) walk the [`MetricsRegistry`] when they are asked, and
//! derive what they show (rates, lags, channel fill) at that moment.
//!
//! Channel fill is read off the channels themselves: the registry keeps a
//! weak handle on each one, so it neither keeps a finished edge open nor
//! costs the senders anything.

pub mod export;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use parking_lot::Mutex;
use tokio::sync::mpsc;

use crate::message::Message;

/// What kind of node a subtask belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeRole {
    /// Reads records into the pipeline.
    Source,
    /// Transforms records.
    Operator,
    /// Writes records out.
    Sink,
}

impl NodeRole {
    /// `source`, `operator` or `sink`.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeRole::Source => "source",
            NodeRole::Operator => "operator",
            NodeRole::Sink => "sink",
        }
    }
}

/// Size of the state an operator subtask holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StateSize {
    /// Distinct keys (groups, sessions' keys, join keys, incidents).
    pub keys: u64,
    /// Estimated heap bytes of keys, accumulators and buffered rows.
    pub bytes: u64,
}

/// Highest latency a histogram distinguishes: an hour, in microseconds.
/// Longer latencies count as an hour.
const LATENCY_MAX_US: u64 = 3_600_000_000;

/// Latency histograms of one sink subtask, in microseconds.
#[derive(Debug)]
pub struct SinkLatency {
    /// From a row's event time to the sink receiving it (wall clock).
    pub event_time: Mutex<Histogram<u64>>,
    /// From a source reading a record to the sink receiving what follows
    /// it on the same path (latency markers; queues and processing).
    pub ingest: Mutex<Histogram<u64>>,
}

fn latency_histogram() -> Histogram<u64> {
    // Two significant digits: 1 % resolution, about 30 kB per histogram.
    Histogram::new_with_bounds(1, LATENCY_MAX_US, 2).expect("constant bounds hdrhistogram accepts")
}

impl Default for SinkLatency {
    fn default() -> Self {
        Self {
            event_time: Mutex::new(latency_histogram()),
            ingest: Mutex::new(latency_histogram()),
        }
    }
}

/// Percentiles of one latency histogram.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Percentiles {
    /// Values recorded.
    pub count: u64,
    /// Median, seconds.
    pub p50: f64,
    /// 99th percentile, seconds.
    pub p99: f64,
    /// 99.9th percentile, seconds.
    pub p999: f64,
    /// Largest, seconds.
    pub max: f64,
}

impl Percentiles {
    /// The percentiles of `h` (microseconds).
    pub fn of(h: &Histogram<u64>) -> Self {
        let s = |us: u64| us as f64 / 1e6;
        Self {
            count: h.len(),
            p50: s(h.value_at_quantile(0.5)),
            p99: s(h.value_at_quantile(0.99)),
            p999: s(h.value_at_quantile(0.999)),
            max: s(h.max()),
        }
    }
}

/// Counters and gauges of one subtask.
#[derive(Debug)]
pub struct TaskMetrics {
    /// Records received (sources: records read).
    pub records_in: AtomicU64,
    /// Records emitted on the main output (sinks: records written).
    pub records_out: AtomicU64,
    /// Batches received (sources: batches read).
    pub batches_in: AtomicU64,
    /// Batches emitted, on every output.
    pub batches_out: AtomicU64,
    /// Arrow buffer bytes of the batches received.
    pub bytes_in: AtomicU64,
    /// Arrow buffer bytes of the batches emitted on the main output.
    pub bytes_out: AtomicU64,
    /// Nanoseconds spent processing (operators: batches and watermarks;
    /// sinks: writes and commits; sources: reading and decoding).
    pub busy_ns: AtomicU64,
    /// Nanoseconds spent waiting for room in a full output channel.
    pub backpressure_ns: AtomicU64,
    /// Records sent to the dead-letter output.
    pub dead_letters: AtomicU64,
    /// Records behind the watermark that no window could take.
    pub late_records: AtomicU64,
    /// Current event-time watermark in ms; `i64::MIN` when none yet.
    pub watermark_ms: AtomicI64,
    /// Keys held in state (operators), sampled about once a second.
    pub state_keys: AtomicU64,
    /// Estimated bytes of state (operators), sampled about once a second.
    pub state_bytes: AtomicU64,
    /// Partitions this subtask reads now (sources).
    pub partitions: AtomicU64,
    /// When the subtask last came back for input (sources), wall-clock ms.
    /// A source blocked by a full channel or a hung read stops moving it.
    pub last_poll_ms: AtomicI64,
    /// The subtask has ended (its input did).
    pub finished: AtomicBool,
    /// Records a producer could not deliver (Kafka sinks).
    pub producer_errors: AtomicU64,
    /// Requests a producer retried (Kafka sinks).
    pub producer_retries: AtomicU64,
    /// Dead letters by error class (the `error` column of dead-letter
    /// records); updated per dead-letter batch, off the hot path.
    pub dead_letters_by_error: Mutex<BTreeMap<String, u64>>,
    /// Records behind the end of each partition, by (topic, partition),
    /// as the Kafka client last reported (sources).
    pub consumer_lag: Mutex<BTreeMap<(String, i32), i64>>,
    /// The (topic, partition)s assigned to this subtask's consumer, as it
    /// last reported (Kafka sources).
    pub owned_partitions: Mutex<std::collections::BTreeSet<(String, i32)>>,
    /// Latency histograms (sinks only).
    pub latency: Option<SinkLatency>,
}

impl Default for TaskMetrics {
    fn default() -> Self {
        Self::new(false)
    }
}

impl TaskMetrics {
    fn new(with_latency: bool) -> Self {
        Self {
            records_in: AtomicU64::new(0),
            records_out: AtomicU64::new(0),
            batches_in: AtomicU64::new(0),
            batches_out: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            busy_ns: AtomicU64::new(0),
            backpressure_ns: AtomicU64::new(0),
            dead_letters: AtomicU64::new(0),
            late_records: AtomicU64::new(0),
            watermark_ms: AtomicI64::new(i64::MIN),
            state_keys: AtomicU64::new(0),
            state_bytes: AtomicU64::new(0),
            partitions: AtomicU64::new(0),
            last_poll_ms: AtomicI64::new(i64::MIN),
            finished: AtomicBool::new(false),
            producer_errors: AtomicU64::new(0),
            producer_retries: AtomicU64::new(0),
            dead_letters_by_error: Mutex::new(BTreeMap::new()),
            consumer_lag: Mutex::new(BTreeMap::new()),
            owned_partitions: Mutex::new(std::collections::BTreeSet::new()),
            latency: with_latency.then(SinkLatency::default),
        }
    }

    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Adds the time `d` to a nanosecond counter.
    pub fn add_time(counter: &AtomicU64, d: Duration) {
        counter.fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Counts `n` dead letters of class `error`.
    pub fn dead_lettered(&self, error: &str, n: u64) {
        if n == 0 {
            return;
        }
        self.dead_letters.fetch_add(n, Ordering::Relaxed);
        *self
            .dead_letters_by_error
            .lock()
            .entry(error.to_string())
            .or_insert(0) += n;
    }

    /// The current watermark, if any.
    pub fn watermark(&self) -> Option<i64> {
        match self.watermark_ms.load(Ordering::Relaxed) {
            i64::MIN => None,
            w => Some(w),
        }
    }

    /// Sets the state-size gauges.
    pub fn set_state_size(&self, s: StateSize) {
        self.state_keys.store(s.keys, Ordering::Relaxed);
        self.state_bytes.store(s.bytes, Ordering::Relaxed);
    }

    /// Total consumer lag over the partitions this subtask reads.
    pub fn total_consumer_lag(&self) -> i64 {
        self.consumer_lag.lock().values().map(|l| (*l).max(0)).sum()
    }
}

/// One registered subtask.
#[derive(Debug, Clone)]
pub struct TaskEntry {
    /// Node name.
    pub node: String,
    /// Subtask index.
    pub subtask: usize,
    /// Node kind.
    pub role: NodeRole,
    /// Its counters.
    pub metrics: Arc<TaskMetrics>,
}

/// One channel between two subtasks.
#[derive(Debug, Clone)]
pub struct ChannelEntry {
    /// Upstream node.
    pub from: String,
    /// Upstream subtask.
    pub from_subtask: usize,
    /// Downstream node.
    pub to: String,
    /// Downstream subtask.
    pub to_subtask: usize,
    /// Capacity in messages.
    pub capacity: usize,
    sender: mpsc::WeakSender<Message>,
}

impl ChannelEntry {
    /// Messages waiting in the channel now; `None` once it is closed.
    pub fn queued(&self) -> Option<usize> {
        let tx = self.sender.upgrade()?;
        Some(tx.max_capacity() - tx.capacity())
    }
}

/// Totals over the subtasks of one role.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Sum of `records_in`.
    pub records_in: u64,
    /// Sum of `records_out`.
    pub records_out: u64,
    /// Sum of `dead_letters`.
    pub dead_letters: u64,
    /// Sum of `late_records`.
    pub late_records: u64,
    /// Minimum watermark over subtasks that have one.
    pub min_watermark: Option<i64>,
}

/// All subtasks' counters of one running pipeline.
#[derive(Debug, Default)]
pub struct MetricsRegistry {
    tasks: Mutex<Vec<TaskEntry>>,
    channels: Mutex<Vec<ChannelEntry>>,
}

impl MetricsRegistry {
    /// Registers a subtask and returns its counters (with latency
    /// histograms for sinks).
    pub fn register(&self, node: &str, subtask: usize, role: NodeRole) -> Arc<TaskMetrics> {
        let metrics = Arc::new(TaskMetrics::new(role == NodeRole::Sink));
        self.tasks.lock().push(TaskEntry {
            node: node.to_string(),
            subtask,
            role,
            metrics: metrics.clone(),
        });
        metrics
    }

    /// Registers the channel `from[from_subtask] -> to[to_subtask]`.
    pub fn register_channel(
        &self,
        from: (&str, usize),
        to: (&str, usize),
        sender: &mpsc::Sender<Message>,
    ) {
        self.channels.lock().push(ChannelEntry {
            from: from.0.to_string(),
            from_subtask: from.1,
            to: to.0.to_string(),
            to_subtask: to.1,
            capacity: sender.max_capacity(),
            sender: sender.downgrade(),
        });
    }

    /// A copy of the registered subtasks.
    pub fn tasks(&self) -> Vec<TaskEntry> {
        self.tasks.lock().clone()
    }

    /// A copy of the registered channels.
    pub fn channels(&self) -> Vec<ChannelEntry> {
        self.channels.lock().clone()
    }

    /// Totals over every subtask of `role`.
    pub fn totals(&self, role: NodeRole) -> Totals {
        self.totals_where(|t| t.role == role)
    }

    /// Dead letters by error class, over every subtask.
    pub fn dead_letters_by_error(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for e in self.tasks.lock().iter() {
            for (k, v) in e.metrics.dead_letters_by_error.lock().iter() {
                *out.entry(k.clone()).or_insert(0) += v;
            }
        }
        out
    }

    /// Totals over every subtask of node `node`.
    pub fn node_totals(&self, node: &str) -> Totals {
        self.totals_where(|t| t.node == node)
    }

    /// Consumer lag summed over every source subtask.
    pub fn consumer_lag(&self) -> i64 {
        self.tasks
            .lock()
            .iter()
            .filter(|t| t.role == NodeRole::Source)
            .map(|t| t.metrics.total_consumer_lag())
            .sum()
    }

    /// Latency percentiles over every subtask of sink `node`:
    /// (event time → emit, ingest → emit).
    pub fn sink_latency(&self, node: &str) -> Option<(Percentiles, Percentiles)> {
        let mut event: Option<Histogram<u64>> = None;
        let mut ingest: Option<Histogram<u64>> = None;
        for t in self.tasks.lock().iter().filter(|t| t.node == node) {
            let Some(l) = &t.metrics.latency else {
                continue;
            };
            for (acc, h) in [(&mut event, &l.event_time), (&mut ingest, &l.ingest)] {
                let h = h.lock();
                match acc {
                    Some(a) => {
                        // Same bounds on both sides: adding cannot fail.
                        let _ = a.add(&*h);
                    }
                    None => *acc = Some(h.clone()),
                }
            }
        }
        Some((Percentiles::of(&event?), Percentiles::of(&ingest?)))
    }

    fn totals_where(&self, pred: impl Fn(&TaskEntry) -> bool) -> Totals {
        let mut t = Totals::default();
        for e in self.tasks.lock().iter().filter(|e| pred(e)) {
            let m = &e.metrics;
            t.records_in += m.records_in.load(Ordering::Relaxed);
            t.records_out += m.records_out.load(Ordering::Relaxed);
            t.dead_letters += m.dead_letters.load(Ordering::Relaxed);
            t.late_records += m.late_records.load(Ordering::Relaxed);
            if let Some(w) = m.watermark() {
                t.min_watermark = Some(t.min_watermark.map_or(w, |x: i64| x.min(w)));
            }
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sink_latency_merges_subtasks() {
        let reg = MetricsRegistry::default();
        let a = reg.register("out", 0, NodeRole::Sink);
        let b = reg.register("out", 1, NodeRole::Sink);
        reg.register("in", 0, NodeRole::Source);
        for v in 1..=900u64 {
            let _ = a.latency.as_ref().map(|l| l.ingest.lock().record(v * 1000));
        }
        for v in 901..=1000u64 {
            let _ = b.latency.as_ref().map(|l| l.ingest.lock().record(v * 1000));
        }
        let (event, ingest) = reg.sink_latency("out").expect("a sink");
        assert_eq!(event.count, 0);
        assert_eq!(ingest.count, 1000);
        assert!((ingest.p50 - 0.5).abs() < 0.01, "{ingest:?}");
        assert!((ingest.p99 - 0.99).abs() < 0.01, "{ingest:?}");
        assert!(reg.sink_latency("in").is_none());
    }

    #[tokio::test]
    async fn channel_fill_is_read_off_the_channel() {
        let reg = MetricsRegistry::default();
        let (tx, mut rx) = mpsc::channel(4);
        reg.register_channel(("a", 0), ("b", 1), &tx);
        tx.send(Message::EndOfInput).await.expect("open");
        tx.send(Message::EndOfInput).await.expect("open");
        let ch = &reg.channels()[0];
        assert_eq!((ch.capacity, ch.queued()), (4, Some(2)));
        rx.recv().await;
        assert_eq!(ch.queued(), Some(1));
        drop(tx);
        assert_eq!(ch.queued(), None, "the registry does not keep it open");
    }
}
