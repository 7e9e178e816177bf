//! Counters every subtask keeps, readable while the pipeline runs.
//!
//! Plain atomics, updated once per batch (never per record), so keeping them
//! costs nothing measurable on the hot path. The CLI's live status line and
//! the end-of-run summary read them through [`MetricsRegistry`].

use std::collections::BTreeMap;

use parking_lot::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

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

/// Counters of one subtask.
#[derive(Debug)]
pub struct TaskMetrics {
    /// Records received (sources: records read).
    pub records_in: AtomicU64,
    /// Records emitted on the main output (sinks: records written).
    pub records_out: AtomicU64,
    /// Batches received.
    pub batches_in: AtomicU64,
    /// Records sent to the dead-letter output.
    pub dead_letters: AtomicU64,
    /// Records behind the watermark that no window could take.
    pub late_records: AtomicU64,
    /// Current event-time watermark in ms; `i64::MIN` when none yet.
    pub watermark_ms: AtomicI64,
    /// Dead letters by error class (the `error` column of dead-letter
    /// records); updated per dead-letter batch, off the hot path.
    pub dead_letters_by_error: Mutex<BTreeMap<String, u64>>,
}

impl Default for TaskMetrics {
    fn default() -> Self {
        Self {
            records_in: AtomicU64::new(0),
            records_out: AtomicU64::new(0),
            batches_in: AtomicU64::new(0),
            dead_letters: AtomicU64::new(0),
            late_records: AtomicU64::new(0),
            watermark_ms: AtomicI64::new(i64::MIN),
            dead_letters_by_error: Mutex::new(BTreeMap::new()),
        }
    }
}

impl TaskMetrics {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// The current watermark, if any.
    pub fn watermark(&self) -> Option<i64> {
        match self.watermark_ms.load(Ordering::Relaxed) {
            i64::MIN => None,
            w => Some(w),
        }
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
}

impl MetricsRegistry {
    /// Registers a subtask and returns its counters.
    pub fn register(&self, node: &str, subtask: usize, role: NodeRole) -> Arc<TaskMetrics> {
        let metrics = Arc::new(TaskMetrics::default());
        self.tasks.lock().push(TaskEntry {
            node: node.to_string(),
            subtask,
            role,
            metrics: metrics.clone(),
        });
        metrics
    }

    /// A copy of the registered subtasks.
    pub fn tasks(&self) -> Vec<TaskEntry> {
        self.tasks.lock().clone()
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
