//! What a run says about itself while it runs: whether it is ready (for
//! Kubernetes probes), how fast each node goes, the Prometheus text, and
//! the graph with its live counters.
//!
//! One [`Observer`] lives for the whole run; each start of the pipeline
//! attaches its metrics registry. Everything here reads the engine's
//! counters when asked (or once a second, for rates) and never touches the
//! data path.
//!
//! # Readiness
//! A run is ready when the pipeline is running (its state restored: the
//! engine restores before any task starts), every source node reads at
//! least one partition (or has read all of its input), and no source
//! subtask is stalled: it has come back for input within the stall timeout.
//! A source that cannot hand its records on (every channel after it full,
//! because a sink stopped) or whose read hangs stops coming back, so
//! `/ready` turns false and Kubernetes takes the pod out of service.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Serialize;
use vigil_engine::graph::NodeSummary;
use vigil_engine::metrics::export::{self, Families};
use vigil_engine::{CheckpointStats, Graph, MetricsRegistry, NodeRole, Percentiles, SharedClock};

/// Records per second in and out of one node over the last sample.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Rates {
    /// Records received per second.
    pub in_per_s: f64,
    /// Records emitted per second.
    pub out_per_s: f64,
}

#[derive(Default)]
struct Sampled {
    at: Option<Instant>,
    last: BTreeMap<String, (u64, u64)>,
    rates: BTreeMap<String, Rates>,
}

/// Whether the run can take traffic, and if not, why.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Readiness {
    /// All checks pass.
    pub ready: bool,
    /// What fails, one line each.
    pub reasons: Vec<String>,
}

/// A run's view of itself.
pub struct Observer {
    pipeline: String,
    graph: Vec<NodeSummary>,
    clock: SharedClock,
    stall_timeout: Duration,
    registry: Mutex<Option<Arc<MetricsRegistry>>>,
    running: std::sync::atomic::AtomicBool,
    sampled: Mutex<Sampled>,
}

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observer")
            .field("pipeline", &self.pipeline)
            .finish_non_exhaustive()
    }
}

/// Sum of in/out records per node.
fn node_counts(reg: &MetricsRegistry) -> BTreeMap<String, (u64, u64)> {
    let mut out: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for t in reg.tasks() {
        let e = out.entry(t.node.clone()).or_default();
        e.0 += t.metrics.records_in.load(Ordering::Relaxed);
        e.1 += t.metrics.records_out.load(Ordering::Relaxed);
    }
    out
}

impl Observer {
    /// For pipeline `pipeline` with graph `graph`; a source that has not
    /// come back for input for `stall_timeout` makes the run unready.
    pub fn new(pipeline: &str, graph: &Graph, clock: SharedClock, stall_timeout: Duration) -> Self {
        Self {
            pipeline: pipeline.to_string(),
            graph: graph.summary(),
            clock,
            stall_timeout,
            registry: Mutex::new(None),
            running: std::sync::atomic::AtomicBool::new(false),
            sampled: Mutex::new(Sampled::default()),
        }
    }

    /// The pipeline's name.
    pub fn pipeline(&self) -> &str {
        &self.pipeline
    }

    /// A start of the pipeline is running with these counters.
    pub fn attach(&self, registry: Arc<MetricsRegistry>) {
        *self.registry.lock() = Some(registry);
        *self.sampled.lock() = Sampled::default();
        self.running.store(true, Ordering::Release);
    }

    /// The pipeline stopped; its last counters stay readable.
    pub fn detach(&self) {
        self.running.store(false, Ordering::Release);
    }

    fn registry(&self) -> Option<Arc<MetricsRegistry>> {
        self.registry.lock().clone()
    }

    /// Updates the rates; called about once a second.
    #[allow(clippy::disallowed_methods)] // rates for people, outside the data path
    pub fn sample(&self) {
        let Some(reg) = self.registry() else {
            return;
        };
        let counts = node_counts(&reg);
        let now = Instant::now();
        let mut s = self.sampled.lock();
        if let Some(at) = s.at {
            let dt = now.duration_since(at).as_secs_f64().max(1e-3);
            let rates = counts
                .iter()
                .map(|(node, (i, o))| {
                    let (li, lo) = s.last.get(node).copied().unwrap_or_default();
                    let r = Rates {
                        in_per_s: i.saturating_sub(li) as f64 / dt,
                        out_per_s: o.saturating_sub(lo) as f64 / dt,
                    };
                    (node.clone(), r)
                })
                .collect();
            s.rates = rates;
        }
        s.at = Some(now);
        s.last = counts;
    }

    /// The rates of the last sample, by node.
    pub fn rates(&self) -> BTreeMap<String, Rates> {
        self.sampled.lock().rates.clone()
    }

    /// Whether the run is ready; see the module docs.
    pub fn readiness(&self) -> Readiness {
        let mut reasons = Vec::new();
        let reg = self.registry();
        match (&reg, self.running.load(Ordering::Acquire)) {
            (Some(reg), true) => {
                let now_ms = self.clock.now_ms();
                let mut partitions: BTreeMap<String, (u64, bool)> = BTreeMap::new();
                for t in reg.tasks().iter().filter(|t| t.role == NodeRole::Source) {
                    let m = &t.metrics;
                    let finished = m.finished.load(Ordering::Relaxed);
                    let e = partitions.entry(t.node.clone()).or_default();
                    e.0 += m.partitions.load(Ordering::Relaxed);
                    e.1 |= finished;
                    let last = m.last_poll_ms.load(Ordering::Relaxed);
                    let idle = now_ms.saturating_sub(last);
                    if !finished && last != i64::MIN && idle > self.stall_timeout.as_millis() as i64
                    {
                        reasons.push(format!(
                            "source {}[{}] stalled: no read for {:.1}s (downstream full or the read hangs)",
                            t.node,
                            t.subtask,
                            idle as f64 / 1e3
                        ));
                    }
                }
                for (node, (n, finished)) in partitions {
                    if n == 0 && !finished {
                        reasons.push(format!("source {node} has no partitions assigned"));
                    }
                }
            }
            (Some(_), false) => reasons.push("the pipeline is not running".to_string()),
            (None, _) => reasons.push("the pipeline has not started (restoring state)".to_string()),
        }
        Readiness {
            ready: reasons.is_empty(),
            reasons,
        }
    }

    /// Latency percentiles of each sink: (event time → emit, ingest → emit).
    pub fn latencies(&self) -> BTreeMap<String, (Percentiles, Percentiles)> {
        let Some(reg) = self.registry() else {
            return BTreeMap::new();
        };
        self.graph
            .iter()
            .filter(|n| n.role == "sink")
            .filter_map(|n| reg.sink_latency(&n.name).map(|l| (n.name.clone(), l)))
            .collect()
    }

    /// The Prometheus text of the run.
    pub fn prometheus(&self, checkpoints: Option<&CheckpointStats>, restarts: u32) -> String {
        let mut f = Families::default();
        let l = [("pipeline", self.pipeline.as_str())];
        let ready = self.readiness().ready;
        f.gauge(
            "vigil_pipeline_ready",
            "1 when the run is ready (running, sources assigned, not stalled).",
            &l,
            if ready { 1.0 } else { 0.0 },
        );
        f.counter(
            "vigil_pipeline_restarts_total",
            "Times the pipeline failed and was restarted from a checkpoint.",
            &l,
            restarts as f64,
        );
        if let Some(reg) = self.registry() {
            export::collect(
                &mut f,
                &reg,
                &self.pipeline,
                self.clock.now_ms(),
                checkpoints,
            );
        }
        f.render()
    }

    /// The graph with each node's counters and rates, for `/v1/pipeline`.
    pub fn pipeline_json(&self) -> serde_json::Value {
        let reg = self.registry();
        let rates = self.rates();
        let now_ms = self.clock.now_ms();
        let tasks = reg.as_ref().map(|r| r.tasks()).unwrap_or_default();
        let latencies = self.latencies();
        let nodes: Vec<serde_json::Value> = self
            .graph
            .iter()
            .map(|n| {
                let subtasks: Vec<serde_json::Value> = tasks
                    .iter()
                    .filter(|t| t.node == n.name)
                    .map(|t| {
                        let m = &t.metrics;
                        let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
                        serde_json::json!({
                            "subtask": t.subtask,
                            "records_in": load(&m.records_in),
                            "records_out": load(&m.records_out),
                            "dead_letters": load(&m.dead_letters),
                            "late_records": load(&m.late_records),
                            "watermark_ms": m.watermark().filter(|w| *w != i64::MAX),
                            "watermark_lag_ms": m.watermark().filter(|w| *w != i64::MAX).map(|w| now_ms - w),
                            "state_keys": load(&m.state_keys),
                            "state_bytes": load(&m.state_bytes),
                            "busy_seconds": load(&m.busy_ns) as f64 / 1e9,
                            "backpressure_seconds": load(&m.backpressure_ns) as f64 / 1e9,
                            "consumer_lag": (t.role == NodeRole::Source).then(|| m.total_consumer_lag()),
                            "partitions": (t.role == NodeRole::Source).then(|| {
                                let lag = m.consumer_lag.lock().clone();
                                m.owned_partitions
                                    .lock()
                                    .iter()
                                    .map(|(topic, partition)| serde_json::json!({
                                        "topic": topic,
                                        "partition": partition,
                                        "lag": lag.get(&(topic.clone(), *partition)),
                                    }))
                                    .collect::<Vec<_>>()
                            }),
                            "finished": m.finished.load(Ordering::Relaxed),
                        })
                    })
                    .collect();
                let mut v = serde_json::to_value(n).unwrap_or_default();
                if let serde_json::Value::Object(o) = &mut v {
                    o.insert("rates".into(), serde_json::json!(rates.get(&n.name).copied().unwrap_or_default()));
                    o.insert("subtasks".into(), serde_json::Value::Array(subtasks));
                    if let Some((event, ingest)) = latencies.get(&n.name) {
                        o.insert(
                            "latency".into(),
                            serde_json::json!({ "event_time": event, "ingest": ingest }),
                        );
                    }
                }
                v
            })
            .collect();
        let channels: Vec<serde_json::Value> = reg
            .map(|r| r.channels())
            .unwrap_or_default()
            .iter()
            .filter_map(|c| {
                let q = c.queued()?;
                Some(serde_json::json!({
                    "from": c.from, "from_subtask": c.from_subtask,
                    "to": c.to, "to_subtask": c.to_subtask,
                    "queued": q, "capacity": c.capacity,
                }))
            })
            .collect();
        serde_json::json!({
            "pipeline": self.pipeline,
            "running": self.running.load(Ordering::Acquire),
            "ready": self.readiness(),
            "nodes": nodes,
            "channels": channels,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vigil_engine::{ManualClock, NodeRole};

    fn observer(clock: Arc<ManualClock>) -> Observer {
        Observer::new("p", &Graph::new(), clock, Duration::from_secs(2))
    }

    #[test]
    fn ready_needs_a_running_pipeline_assigned_sources_and_no_stall() {
        let clock = ManualClock::new(10_000);
        let obs = observer(clock.clone());
        assert!(!obs.readiness().ready, "not started");

        let reg = Arc::new(MetricsRegistry::default());
        let a = reg.register("auth", 0, NodeRole::Source);
        let b = reg.register("auth", 1, NodeRole::Source);
        obs.attach(reg.clone());
        for m in [&a, &b] {
            m.last_poll_ms.store(10_000, Ordering::Relaxed);
        }
        let r = obs.readiness();
        assert_eq!(r.reasons, vec!["source auth has no partitions assigned"]);

        // One subtask with a partition is enough for the node.
        a.partitions.store(1, Ordering::Relaxed);
        assert!(obs.readiness().ready);

        // Subtask 1 stops coming back for input.
        clock.advance(3_000);
        a.last_poll_ms.store(13_000, Ordering::Relaxed);
        let r = obs.readiness();
        assert!(!r.ready);
        assert!(r.reasons[0].starts_with("source auth[1] stalled"), "{r:?}");

        // A finished source is never stalled.
        b.finished.store(true, Ordering::Relaxed);
        assert!(obs.readiness().ready);

        obs.detach();
        assert_eq!(obs.readiness().reasons, vec!["the pipeline is not running"]);
    }

    #[test]
    fn rates_are_per_node_over_the_last_sample() {
        let obs = observer(ManualClock::new(0));
        let reg = Arc::new(MetricsRegistry::default());
        let m = reg.register("f", 0, NodeRole::Operator);
        obs.attach(reg);
        obs.sample();
        m.records_in.store(1_000, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(50));
        obs.sample();
        let r = obs.rates()["f"];
        assert!(r.in_per_s > 1_000.0 && r.out_per_s == 0.0, "{r:?}");
    }
}
