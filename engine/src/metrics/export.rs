//! The Prometheus view of a pipeline's metrics.
//!
//! Built at scrape time from the [`MetricsRegistry`] (and the checkpoint
//! statistics), then written in the text exposition format by the
//! `prometheus` crate's encoder. Building families on demand, rather than
//! keeping `prometheus` counters on the data path, leaves the hot path with
//! its plain atomics and lets gauges that are differences (watermark lag,
//! channel fill) be computed at the moment they are read.
//!
//! Names follow Prometheus conventions: a `vigil_` prefix, base units
//! (seconds, bytes), `_total` on counters. Every series carries `pipeline`;
//! per-subtask series carry `node`, `role` (source, operator, sink) and
//! `subtask`.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use prometheus::proto::{
    Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType,
};

use super::{MetricsRegistry, NodeRole};
use crate::checkpoint::CheckpointStats;

/// Upper bounds of the exported latency histograms, in seconds.
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Metric families under construction, by name.
#[derive(Default)]
pub struct Families {
    families: BTreeMap<&'static str, MetricFamily>,
}

fn labels(pairs: &[(&str, &str)]) -> Vec<LabelPair> {
    pairs
        .iter()
        .map(|(k, v)| {
            let mut l = LabelPair::default();
            l.set_name(k.to_string());
            l.set_value(v.to_string());
            l
        })
        .collect()
}

impl Families {
    fn family(&mut self, name: &'static str, help: &str, kind: MetricType) -> &mut MetricFamily {
        self.families.entry(name).or_insert_with(|| {
            let mut f = MetricFamily::default();
            f.set_name(name.to_string());
            f.set_help(help.to_string());
            f.set_field_type(kind);
            f
        })
    }

    /// Adds one counter sample.
    pub fn counter(&mut self, name: &'static str, help: &str, l: &[(&str, &str)], v: f64) {
        let mut c = Counter::default();
        c.set_value(v);
        let mut m = Metric::from_label(labels(l));
        m.set_counter(c);
        self.family(name, help, MetricType::COUNTER)
            .mut_metric()
            .push(m);
    }

    /// Adds one gauge sample.
    pub fn gauge(&mut self, name: &'static str, help: &str, l: &[(&str, &str)], v: f64) {
        let mut g = Gauge::default();
        g.set_value(v);
        let mut m = Metric::from_label(labels(l));
        m.set_gauge(g);
        self.family(name, help, MetricType::GAUGE)
            .mut_metric()
            .push(m);
    }

    /// Adds one histogram sample from an hdrhistogram of microseconds.
    fn histogram(
        &mut self,
        name: &'static str,
        help: &str,
        l: &[(&str, &str)],
        h: &hdrhistogram::Histogram<u64>,
    ) {
        let mut out = Histogram::default();
        out.set_sample_count(h.len());
        out.set_sample_sum(if h.is_empty() {
            0.0
        } else {
            h.mean() * h.len() as f64 / 1e6
        });
        out.set_bucket(
            LATENCY_BUCKETS
                .iter()
                .map(|le| {
                    let mut b = Bucket::default();
                    b.set_upper_bound(*le);
                    b.set_cumulative_count(h.count_between(0, (*le * 1e6) as u64));
                    b
                })
                .collect(),
        );
        let mut m = Metric::from_label(labels(l));
        m.set_histogram(out);
        self.family(name, help, MetricType::HISTOGRAM)
            .mut_metric()
            .push(m);
    }

    /// The families, in name order, without empty ones.
    pub fn finish(self) -> Vec<MetricFamily> {
        self.families
            .into_values()
            .filter(|f| !f.get_metric().is_empty())
            .collect()
    }

    /// The text exposition format of the families.
    pub fn render(self) -> String {
        let families = self.finish();
        prometheus::TextEncoder::new()
            .encode_to_string(&families)
            .unwrap_or_else(|e| format!("# metrics could not be encoded: {e}\n"))
    }
}

/// Adds the series of every subtask and channel of `registry`, and of its
/// checkpoints, labelled with `pipeline`; `now_ms` is the wall clock lags
/// are measured against.
pub fn collect(
    out: &mut Families,
    registry: &MetricsRegistry,
    pipeline: &str,
    now_ms: i64,
    checkpoints: Option<&CheckpointStats>,
) {
    for t in registry.tasks() {
        let m = &t.metrics;
        let subtask = t.subtask.to_string();
        let l = [
            ("pipeline", pipeline),
            ("node", t.node.as_str()),
            ("role", t.role.as_str()),
            ("subtask", subtask.as_str()),
        ];
        let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed) as f64;
        // (name, help, counter, divisor to base units)
        let counters = [
            (
                "vigil_records_in_total",
                "Records received (sources: records read).",
                &m.records_in,
                1.0,
            ),
            (
                "vigil_records_out_total",
                "Records emitted on the main output (sinks: records written).",
                &m.records_out,
                1.0,
            ),
            (
                "vigil_batches_in_total",
                "Arrow record batches received.",
                &m.batches_in,
                1.0,
            ),
            (
                "vigil_batches_out_total",
                "Arrow record batches emitted.",
                &m.batches_out,
                1.0,
            ),
            (
                "vigil_bytes_in_total",
                "Arrow buffer bytes of the batches received.",
                &m.bytes_in,
                1.0,
            ),
            (
                "vigil_bytes_out_total",
                "Arrow buffer bytes of the batches emitted on the main output.",
                &m.bytes_out,
                1.0,
            ),
            (
                "vigil_busy_seconds_total",
                "Time spent processing.",
                &m.busy_ns,
                1e9,
            ),
            (
                "vigil_backpressure_seconds_total",
                "Time spent waiting for room in a full output channel.",
                &m.backpressure_ns,
                1e9,
            ),
        ];
        for (name, help, c, unit) in counters {
            out.counter(name, help, &l, load(c) / unit);
        }
        if t.role != NodeRole::Sink {
            out.counter(
                "vigil_late_records_total",
                "Records behind the watermark that no window could take.",
                &l,
                load(&m.late_records),
            );
            let by = m.dead_letters_by_error.lock().clone();
            for (reason, n) in by {
                let lr = [
                    ("pipeline", pipeline),
                    ("node", t.node.as_str()),
                    ("role", t.role.as_str()),
                    ("subtask", subtask.as_str()),
                    ("reason", reason.as_str()),
                ];
                out.counter(
                    "vigil_dead_letters_total",
                    "Records sent to dead letters, by reason.",
                    &lr,
                    n as f64,
                );
            }
        }
        if let Some(w) = m.watermark().filter(|w| *w != i64::MAX) {
            out.gauge(
                "vigil_watermark_seconds",
                "Current event-time watermark (Unix time).",
                &l,
                w as f64 / 1e3,
            );
            out.gauge(
                "vigil_watermark_lag_seconds",
                "How far the watermark is behind the wall clock.",
                &l,
                (now_ms - w) as f64 / 1e3,
            );
        }
        match t.role {
            NodeRole::Operator => {
                out.gauge(
                    "vigil_state_keys",
                    "Keys held in state, sampled about once a second.",
                    &l,
                    load(&m.state_keys),
                );
                out.gauge(
                    "vigil_state_bytes",
                    "Estimated bytes of state, sampled about once a second.",
                    &l,
                    load(&m.state_bytes),
                );
            }
            NodeRole::Source => {
                out.gauge(
                    "vigil_source_partitions",
                    "Partitions the subtask reads now.",
                    &l,
                    load(&m.partitions),
                );
                let last = m.last_poll_ms.load(Ordering::Relaxed);
                if last != i64::MIN && !m.finished.load(Ordering::Relaxed) {
                    out.gauge(
                        "vigil_source_idle_poll_seconds",
                        "Time since the source last came back for input (a blocked source grows it).",
                        &l,
                        (now_ms - last).max(0) as f64 / 1e3,
                    );
                }
                let lags = m.consumer_lag.lock().clone();
                for ((topic, partition), lag) in lags {
                    let p = partition.to_string();
                    let lp = [
                        ("pipeline", pipeline),
                        ("node", t.node.as_str()),
                        ("role", t.role.as_str()),
                        ("subtask", subtask.as_str()),
                        ("topic", topic.as_str()),
                        ("partition", p.as_str()),
                    ];
                    out.gauge(
                        "vigil_kafka_consumer_lag_records",
                        "Records between the consumer's position and the end of the partition.",
                        &lp,
                        lag.max(0) as f64,
                    );
                }
            }
            NodeRole::Sink => {
                out.counter(
                    "vigil_producer_errors_total",
                    "Records the sink's producer could not deliver.",
                    &l,
                    load(&m.producer_errors),
                );
                out.counter(
                    "vigil_producer_retries_total",
                    "Requests the sink's producer retried.",
                    &l,
                    load(&m.producer_retries),
                );
                if let Some(lat) = &m.latency {
                    out.histogram(
                        "vigil_sink_event_time_latency_seconds",
                        "From a row's event time to the sink receiving it.",
                        &l,
                        &lat.event_time.lock(),
                    );
                    out.histogram(
                        "vigil_sink_ingest_latency_seconds",
                        "From a source reading a record to the sink receiving what follows it (latency markers).",
                        &l,
                        &lat.ingest.lock(),
                    );
                }
            }
        }
    }
    for c in registry.channels() {
        let Some(queued) = c.queued() else {
            continue;
        };
        let (fs, ts) = (c.from_subtask.to_string(), c.to_subtask.to_string());
        let l = [
            ("pipeline", pipeline),
            ("from", c.from.as_str()),
            ("from_subtask", fs.as_str()),
            ("to", c.to.as_str()),
            ("to_subtask", ts.as_str()),
        ];
        out.gauge(
            "vigil_channel_queued_batches",
            "Messages waiting in a channel between two subtasks (full: back-pressure).",
            &l,
            queued as f64,
        );
        out.gauge(
            "vigil_channel_capacity_batches",
            "Capacity of a channel between two subtasks.",
            &l,
            c.capacity as f64,
        );
    }
    if let Some(s) = checkpoints {
        let l = [("pipeline", pipeline)];
        out.counter(
            "vigil_checkpoints_completed_total",
            "Checkpoints acknowledged everywhere and stored.",
            &l,
            s.completed as f64,
        );
        out.counter(
            "vigil_checkpoints_failed_total",
            "Checkpoints that could not be taken or stored.",
            &l,
            s.failed as f64,
        );
        if let Some(d) = s.latest_duration_ms {
            out.gauge(
                "vigil_checkpoint_duration_seconds",
                "From trigger to durable, for the latest checkpoint.",
                &l,
                d as f64 / 1e3,
            );
        }
        if let Some(b) = s.latest_bytes {
            out.gauge(
                "vigil_checkpoint_size_bytes",
                "Bytes stored for the latest checkpoint.",
                &l,
                b as f64,
            );
        }
        if let Some(t) = s.latest_completed_ms {
            out.gauge(
                "vigil_checkpoint_last_completed_timestamp_seconds",
                "When the latest checkpoint completed (Unix time).",
                &l,
                t as f64 / 1e3,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_gauges_and_histograms() {
        let reg = MetricsRegistry::default();
        let src = reg.register("auth", 0, NodeRole::Source);
        let sink = reg.register("alerts", 0, NodeRole::Sink);
        src.records_in.store(42, Ordering::Relaxed);
        src.watermark_ms.store(9_000, Ordering::Relaxed);
        src.dead_lettered("decode_failed", 3);
        src.consumer_lag.lock().insert(("auth".into(), 1), 17);
        if let Some(l) = &sink.latency {
            l.event_time.lock().record(2_000).expect("in range");
            l.event_time.lock().record(200_000).expect("in range");
        }
        let mut f = Families::default();
        collect(&mut f, &reg, "p", 10_000, None);
        let text = f.render();
        for line in [
            "vigil_records_in_total{pipeline=\"p\",node=\"auth\",role=\"source\",subtask=\"0\"} 42",
            "vigil_dead_letters_total{pipeline=\"p\",node=\"auth\",role=\"source\",subtask=\"0\",reason=\"decode_failed\"} 3",
            "vigil_watermark_lag_seconds{pipeline=\"p\",node=\"auth\",role=\"source\",subtask=\"0\"} 1",
            "vigil_kafka_consumer_lag_records{pipeline=\"p\",node=\"auth\",role=\"source\",subtask=\"0\",topic=\"auth\",partition=\"1\"} 17",
            "vigil_sink_event_time_latency_seconds_bucket{pipeline=\"p\",node=\"alerts\",role=\"sink\",subtask=\"0\",le=\"0.001\"} 0",
            "vigil_sink_event_time_latency_seconds_bucket{pipeline=\"p\",node=\"alerts\",role=\"sink\",subtask=\"0\",le=\"0.0025\"} 1",
            "vigil_sink_event_time_latency_seconds_bucket{pipeline=\"p\",node=\"alerts\",role=\"sink\",subtask=\"0\",le=\"0.25\"} 2",
            "vigil_sink_event_time_latency_seconds_count{pipeline=\"p\",node=\"alerts\",role=\"sink\",subtask=\"0\"} 2",
            "# TYPE vigil_records_in_total counter",
            "# TYPE vigil_sink_ingest_latency_seconds histogram",
        ] {
            assert!(text.lines().any(|l| l == line), "{line}\nnot in\n{text}");
        }
    }
}
