//! What flows on the edges of a dataflow graph.
//!
//! Data travels as Arrow [`RecordBatch`]es; control travels in-band, in the same
//! channel and so in order with the data: a watermark promises that no later
//! record on this edge is older than it, a barrier cuts the stream for a
//! consistent checkpoint, and end-of-input says the edge is finished. Keeping
//! control in-band is what makes barrier alignment and watermark ordering
//! correct without any side protocol.

use arrow::record_batch::RecordBatch;

/// Event time in milliseconds since the Unix epoch (UTC).
pub type EventTime = i64;

/// A watermark on one edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watermark {
    /// No record with an event time below this value will follow on this edge.
    EventTime(EventTime),
    /// The sender has had no data for its idle timeout: it must not hold back
    /// the receiver's watermark until it sends data or a watermark again.
    Idle,
}

/// Identifies one checkpoint; increases by one per checkpoint of a pipeline.
pub type CheckpointId = u64;

/// A checkpoint barrier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Barrier {
    /// The checkpoint this barrier belongs to.
    pub checkpoint: CheckpointId,
}

/// A latency marker: when a source sent it. It travels one path from a
/// source to a sink (one channel of each output edge, in turn), in order
/// with the data, so the time a sink receives it says how long records
/// spend in channels and behind other records' processing on that path.
#[derive(Debug, Clone, Copy)]
pub struct LatencyMarker {
    /// When the source sent it (monotonic).
    pub sent: std::time::Instant,
}

/// One message on an edge.
#[derive(Debug, Clone)]
pub enum Message {
    /// A batch of records.
    Batch(RecordBatch),
    /// A watermark; see [`Watermark`].
    Watermark(Watermark),
    /// A checkpoint barrier; see [`Barrier`].
    Barrier(Barrier),
    /// A latency marker; see [`LatencyMarker`].
    Latency(LatencyMarker),
    /// Key groups change owner (a repartition partition was assigned to or
    /// revoked from this process); see [`KeyGroupChange`].
    KeyGroups(std::sync::Arc<KeyGroupChange>),
    /// The sender will send nothing more.
    EndOfInput,
}

/// Key groups whose state arrives in, or leaves, this process.
///
/// When a source hands out a partition that carries the records of a set of
/// key groups (a repartition topic's partition), every keyed operator
/// downstream must hold those groups' state before the first record, and
/// must drop it once the partition has gone to another process. The change
/// travels in-band, like a barrier, so it is ordered with the records: an
/// adoption before the partition's first record, a release right after the
/// barrier of the checkpoint that hands the partition over.
#[derive(Debug)]
pub enum KeyGroupChange {
    /// Take these key groups' state from `checkpoint` (another process's,
    /// or this process's own from an earlier run) and add it to what is
    /// held. Only keyed tables are taken; operator-wide tables stay this
    /// process's own.
    Adopt {
        /// Unique among the changes a process makes: operators reached by
        /// several paths apply it once.
        id: u64,
        /// The key groups.
        groups: Vec<u16>,
        /// Where their state is.
        checkpoint: std::sync::Arc<crate::checkpoint::CompletedCheckpoint>,
    },
    /// Drop these key groups' state: the partition that carries them now
    /// belongs to another process.
    Release {
        /// Unique among the changes a process makes.
        id: u64,
        /// The key groups.
        groups: Vec<u16>,
    },
}

impl KeyGroupChange {
    /// Its id.
    pub fn id(&self) -> u64 {
        match self {
            Self::Adopt { id, .. } | Self::Release { id, .. } => *id,
        }
    }

    /// A fresh id for a change made by this process.
    pub fn next_id() -> u64 {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }
}
