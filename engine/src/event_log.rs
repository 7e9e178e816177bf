//! Durable logs for event-sourced operators: the incident aggregate.
//!
//! An event-sourced operator decides events, appends them to an
//! [`EventLog`] and folds them into its state. The log is the truth: the
//! state is a cache of it that the operator snapshots now and then, so a
//! restart reads the latest snapshot and only the events after it
//! ([`EventLog::recover`]) instead of the whole history.
//!
//! The trait lives here, with the other contracts, so connectors can provide
//! logs (a Kafka topic and its snapshot topic) and operators can use them
//! without knowing each other. Events and snapshots are Arrow batches; their
//! encoding on the wire is the log's business. [`MemoryEventLog`] keeps both
//! in memory, for tests and for pipelines that need no durability.
//!
//! # Snapshots and positions
//! A snapshot is written by one shard (operator subtask) and covers every
//! event that shard appended before it. A log records with each snapshot the
//! position of the log at that moment, and [`EventLog::recover`] returns the
//! events from the earliest position any shard's latest snapshot recorded,
//! so every event newer than some snapshot is in the tail. The operator
//! skips tail events its snapshot already holds (by the aggregate's version),
//! which makes recovery exact whatever the shards did in between.

use std::sync::Arc;

use arrow::compute::concat_batches;
use arrow::record_batch::RecordBatch;
use parking_lot::Mutex;

use crate::error::Result;

/// What a log holds for a restart.
#[derive(Debug, Clone, Default)]
pub struct Recovery {
    /// The latest snapshot rows of every aggregate that has one (state
    /// schema), newest per key.
    pub snapshot: Vec<RecordBatch>,
    /// Events from the earliest position a snapshot records, in log order
    /// per key (event schema).
    pub tail: Vec<RecordBatch>,
    /// Events read from the log in all.
    pub events_read: usize,
}

/// Where one shard's latest snapshot stands in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marker {
    /// The run that wrote it: one more than the highest epoch recovered.
    pub epoch: u64,
    /// Shards (subtasks) of that run.
    pub parallelism: usize,
    /// The shard.
    pub shard: usize,
    /// Per log partition, the offset of the first event the snapshot does
    /// not cover.
    pub positions: Vec<i64>,
}

/// Where a restart must start reading each of `partitions` log partitions.
///
/// A marker promises that every event its shard appended before its
/// positions is in the snapshot rows. That covers the log only when every
/// shard of a run has a marker, so the start is the minimum over the latest
/// complete set (by epoch); events of later runs all lie after it. Without
/// a complete set the whole log is read.
pub fn start_positions(markers: &[Marker], partitions: usize) -> Vec<i64> {
    use std::collections::BTreeMap;
    let mut sets: BTreeMap<usize, Vec<&Marker>> = BTreeMap::new();
    for m in markers {
        sets.entry(m.parallelism).or_default().push(m);
    }
    let best = sets
        .values()
        .filter(|ms| {
            let p = ms[0].parallelism;
            (0..p).all(|s| ms.iter().any(|m| m.shard == s))
        })
        .max_by_key(|ms| ms.iter().map(|m| m.epoch).max().unwrap_or(0));
    let mut start = vec![0; partitions];
    if let Some(ms) = best {
        for (p, slot) in start.iter_mut().enumerate() {
            *slot = ms
                .iter()
                .map(|m| m.positions.get(p).copied().unwrap_or(0))
                .min()
                .unwrap_or(0);
        }
    }
    start
}

/// An append-only log of events with snapshots of the state folded from it.
///
/// Shared by the subtasks of one operator: every method takes `&self`.
pub trait EventLog: Send + Sync {
    /// Reads the latest snapshot of every aggregate and the events after the
    /// start positions ([`start_positions`]). May wait (bounded) while it
    /// reads. Called once, before anything is appended.
    fn recover(&self) -> Result<Recovery>;
    /// Appends events; they are durable after the next [`EventLog::flush`].
    fn append(&self, events: &RecordBatch) -> Result<()>;
    /// Records the state rows that shard `shard` of `parallelism` changed
    /// since its previous snapshot, and its marker. The snapshot covers
    /// every event the shard appended before the call.
    fn snapshot(&self, shard: usize, parallelism: usize, state: &RecordBatch) -> Result<()>;
    /// Waits until every appended event and snapshot is durable.
    fn flush(&self) -> Result<()>;
    /// One line for `vigil explain`.
    fn describe(&self) -> String;
}

/// An [`EventLog`] in memory: for tests, and for embedding without a broker.
///
/// Like a Kafka topic keyed by `key`, it keeps events in partitions (by a
/// hash of the key), and a recovery returns the tail partition after
/// partition: order holds per key only, as it would on a broker.
#[derive(Debug)]
pub struct MemoryEventLog {
    inner: Mutex<MemoryInner>,
    key: String,
    partitions: usize,
}

#[derive(Debug, Default)]
struct MemoryInner {
    /// Every event batch, in append order.
    events: Vec<RecordBatch>,
    /// Per partition, the events in it: (batch, row).
    parts: Vec<Vec<(usize, usize)>>,
    markers: Vec<Marker>,
    snapshots: Vec<RecordBatch>,
    epoch: u64,
}

impl MemoryEventLog {
    /// An empty log of four partitions, keyed (events and state rows) by
    /// the Utf8 column `key`.
    pub fn new(key: &str) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(MemoryInner {
                parts: vec![Vec::new(); 4],
                ..MemoryInner::default()
            }),
            key: key.to_string(),
            partitions: 4,
        })
    }

    /// Every event appended, in order.
    pub fn events(&self) -> Vec<RecordBatch> {
        self.inner.lock().events.clone()
    }

    /// Drops every snapshot, so the next recovery replays from the start.
    pub fn forget_snapshots(&self) {
        let mut g = self.inner.lock();
        g.snapshots.clear();
        g.markers.clear();
    }

    fn partition_of(&self, key: &str) -> usize {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut h);
        (h.finish() % self.partitions as u64) as usize
    }
}

impl EventLog for MemoryEventLog {
    fn recover(&self) -> Result<Recovery> {
        let mut g = self.inner.lock();
        g.epoch = g.markers.iter().map(|m| m.epoch).max().unwrap_or(0) + 1;
        let start = start_positions(&g.markers, self.partitions);
        let mut tail = Vec::new();
        for (p, rows) in g.parts.iter().enumerate() {
            let from = (start[p].max(0) as usize).min(rows.len());
            for (b, r) in &rows[from..] {
                tail.push(g.events[*b].slice(*r, 1));
            }
        }
        let snapshot = latest_per_key(&g.snapshots, &self.key)?;
        let tail = match tail.first() {
            Some(first) => vec![concat_batches(&first.schema(), &tail)?],
            None => Vec::new(),
        };
        Ok(Recovery {
            snapshot,
            events_read: tail.iter().map(|b| b.num_rows()).sum(),
            tail,
        })
    }

    fn append(&self, events: &RecordBatch) -> Result<()> {
        use arrow::array::AsArray;
        let keys = events.column_by_name(&self.key).ok_or_else(|| {
            crate::EngineError::User(format!("events have no {:?} column", self.key))
        })?;
        let keys = arrow::compute::cast(keys, &arrow::datatypes::DataType::Utf8)?;
        let keys = keys.as_string::<i32>();
        let parts: Vec<usize> = keys
            .iter()
            .map(|k| self.partition_of(k.unwrap_or("")))
            .collect();
        let mut g = self.inner.lock();
        let b = g.events.len();
        g.events.push(events.clone());
        for (r, p) in parts.into_iter().enumerate() {
            g.parts[p].push((b, r));
        }
        Ok(())
    }

    fn snapshot(&self, shard: usize, parallelism: usize, state: &RecordBatch) -> Result<()> {
        let mut g = self.inner.lock();
        let marker = Marker {
            epoch: g.epoch,
            parallelism,
            shard,
            positions: g.parts.iter().map(|p| p.len() as i64).collect(),
        };
        g.snapshots.push(state.clone());
        g.markers
            .retain(|m| (m.parallelism, m.shard) != (parallelism, shard));
        g.markers.push(marker);
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn describe(&self) -> String {
        "in-memory event log".into()
    }
}

/// The last row per value of `key` (a Utf8 column) across `batches`, as a
/// compacted topic would keep them.
pub fn latest_per_key(batches: &[RecordBatch], key: &str) -> Result<Vec<RecordBatch>> {
    use arrow::array::{Array, AsArray};
    use std::collections::HashMap;
    let Some(first) = batches.first() else {
        return Ok(Vec::new());
    };
    let all = concat_batches(&first.schema(), batches)?;
    let col = all
        .column_by_name(key)
        .ok_or_else(|| crate::EngineError::User(format!("snapshot rows have no {key:?} column")))?;
    let keys = arrow::compute::cast(col, &arrow::datatypes::DataType::Utf8)?;
    let keys = keys.as_string::<i32>();
    let mut last: HashMap<&str, u32> = HashMap::with_capacity(all.num_rows());
    for i in 0..all.num_rows() {
        if keys.is_valid(i) {
            last.insert(keys.value(i), i as u32);
        }
    }
    let mut rows: Vec<u32> = last.into_values().collect();
    rows.sort_unstable();
    let idx = arrow::array::UInt32Array::from(rows);
    Ok(vec![arrow::compute::take_record_batch(&all, &idx)?])
}

/// Splits `batch` into `n` parts by the hash of `keys`, exactly as the
/// runtime routes a hash-partitioned edge: part `i` holds the rows subtask
/// `i` receives. An operator recovering from a shared log keeps its part.
pub fn split_by_key(batch: &RecordBatch, keys: &[&str], n: usize) -> Result<Vec<RecordBatch>> {
    crate::key_group::split(batch, keys, n)
}
