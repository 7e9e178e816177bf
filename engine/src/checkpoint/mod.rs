//! Checkpoint coordination: barriers in, acknowledgements back, durable
//! completion, then commits.
//!
//! A checkpoint is triggered by asking every source subtask to inject a
//! [`Barrier`](crate::Barrier) into its outputs. Each operator and sink
//! snapshots its state once the barrier has arrived on all of its inputs
//! (aligned barriers, Chandy–Lamport style) and acknowledges it here with the
//! state; a sink's acknowledgement is also its pre-commit (the file sink has
//! renamed its part, the Kafka sink has flushed its transaction). When every
//! subtask has acknowledged, the checkpoint is *acknowledged*; the pipeline's
//! driver then writes it to the [`CheckpointStore`] (if there is one) and only
//! once that write has finished is it *complete*: visible through
//! [`CheckpointHandle::latest`], and announced to sources and sinks
//! ([`Source::on_checkpoint_complete`](crate::Source::on_checkpoint_complete),
//! [`Sink::on_checkpoint_complete`](crate::Sink::on_checkpoint_complete)),
//! which is when Kafka offsets are committed and sink transactions commit.
//! A crash before that point leaves the previous checkpoint as the latest, and
//! its sinks' uncommitted work is rolled back on restore.
//!
//! A subtask that has finished (a file read to its end, an operator whose
//! inputs all ended) registers its final state; later checkpoints take it
//! without a barrier, so bounded sources do not stop a pipeline from
//! checkpointing.

mod store;

pub use store::{CheckpointStore, Manifest, PartitionPointer, StoredSize};

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::{mpsc, Notify};

use crate::error::{EngineError, Result};
use crate::message::CheckpointId;
use crate::operator::OperatorState;

/// Identifies a subtask: node name and subtask index.
pub type TaskKey = (String, usize);

/// A checkpoint every subtask acknowledged.
#[derive(Debug, Clone, Default)]
pub struct CompletedCheckpoint {
    /// Its id.
    pub id: CheckpointId,
    /// State of each subtask.
    pub states: HashMap<TaskKey, OperatorState>,
    /// Parallelism of each node when it was taken.
    pub parallelism: BTreeMap<String, usize>,
    /// Set for a savepoint: the name it is kept under.
    pub savepoint: Option<String>,
    /// Every sink is known to have committed it (read back from the store's
    /// commit marker): a restore must not commit its pre-commits again.
    pub committed: bool,
}

impl CompletedCheckpoint {
    /// The state of one subtask, if it had any.
    pub fn state(&self, node: &str, subtask: usize) -> Option<&OperatorState> {
        self.states.get(&(node.to_string(), subtask))
    }

    /// Rows of state held, over every subtask.
    pub fn rows(&self) -> usize {
        self.states
            .values()
            .flat_map(|s| s.batches.iter())
            .map(|b| b.num_rows())
            .sum()
    }
}

/// What the coordinator tells a source or sink subtask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Control {
    /// Inject a barrier for this checkpoint (sources only).
    Barrier(CheckpointId),
    /// This checkpoint completed everywhere and is durable.
    Complete(CheckpointId),
}

/// Health of a pipeline's checkpoints, for status reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct CheckpointStats {
    /// Checkpoints completed (acknowledged everywhere and stored).
    pub completed: u64,
    /// Checkpoints that could not be taken or stored.
    pub failed: u64,
    /// Id of the latest completed checkpoint.
    pub latest_id: Option<CheckpointId>,
    /// When the latest completed (epoch ms, wall clock).
    pub latest_completed_ms: Option<i64>,
    /// From trigger to durable, for the latest, in ms.
    pub latest_duration_ms: Option<u64>,
    /// Bytes stored for the latest.
    pub latest_bytes: Option<u64>,
    /// The last failure, if any.
    pub last_failure: Option<String>,
}

#[derive(Debug, Default)]
struct Pending {
    acks: HashMap<TaskKey, OperatorState>,
    savepoint: Option<String>,
    started_ms: i64,
}

#[derive(Debug)]
pub(crate) struct Coordinator {
    expected: usize,
    /// Checkpoints are written to a store (by the pipeline's driver,
    /// [`crate::RunningPipeline::wait`]) before they complete.
    durable: bool,
    next_id: AtomicU64,
    parallelism: BTreeMap<String, usize>,
    sources: Vec<(TaskKey, mpsc::Sender<Control>)>,
    sinks: Vec<(TaskKey, mpsc::Sender<Control>)>,
    /// Final states of subtasks that have finished. Locked before `pending`.
    finished: Mutex<HashMap<TaskKey, OperatorState>>,
    pending: Mutex<BTreeMap<CheckpointId, Pending>>,
    /// Acknowledged everywhere, waiting to be stored.
    acknowledged: Mutex<VecDeque<(Arc<CompletedCheckpoint>, i64)>>,
    /// Committed by every live source and sink, waiting for the store's
    /// commit marker.
    committed: Mutex<Vec<CheckpointId>>,
    /// Per checkpoint, source and sink subtasks that have acted on its completion.
    handled: Mutex<HashMap<CheckpointId, usize>>,
    completed: Mutex<VecDeque<Arc<CompletedCheckpoint>>>,
    /// The latest completed savepoints, kept apart from `completed` so one
    /// is still found after periodic checkpoints have completed behind it.
    savepoints: Mutex<VecDeque<Arc<CompletedCheckpoint>>>,
    stats: Mutex<CheckpointStats>,
    clock: crate::clock::SharedClock,
    notify: Notify,
    pub(crate) acknowledged_notify: Notify,
}

/// Completed checkpoints kept in memory (the store keeps its own number).
const KEEP_IN_MEMORY: usize = 2;

/// Checkpoints that may be in flight at once; a trigger beyond that is
/// refused (the pipeline is slower than the interval).
const MAX_IN_FLIGHT: usize = 3;

impl Coordinator {
    pub(crate) fn new(
        parallelism: BTreeMap<String, usize>,
        sources: Vec<(TaskKey, mpsc::Sender<Control>)>,
        sinks: Vec<(TaskKey, mpsc::Sender<Control>)>,
        first_id: CheckpointId,
        clock: crate::clock::SharedClock,
        durable: bool,
    ) -> Self {
        Self {
            expected: parallelism.values().sum(),
            durable,
            next_id: AtomicU64::new(first_id),
            parallelism,
            sources,
            sinks,
            finished: Mutex::new(HashMap::new()),
            pending: Mutex::new(BTreeMap::new()),
            acknowledged: Mutex::new(VecDeque::new()),
            committed: Mutex::new(Vec::new()),
            handled: Mutex::new(HashMap::new()),
            completed: Mutex::new(VecDeque::new()),
            savepoints: Mutex::new(VecDeque::new()),
            stats: Mutex::new(CheckpointStats::default()),
            clock,
            notify: Notify::new(),
            acknowledged_notify: Notify::new(),
        }
    }

    pub(crate) fn ack(&self, id: CheckpointId, node: &str, subtask: usize, state: OperatorState) {
        let mut pending = self.pending.lock();
        self.ack_locked(&mut pending, id, (node.to_string(), subtask), state);
    }

    fn ack_locked(
        &self,
        pending: &mut BTreeMap<CheckpointId, Pending>,
        id: CheckpointId,
        key: TaskKey,
        state: OperatorState,
    ) {
        // Unknown ids belong to a trigger that failed half-way.
        let Some(p) = pending.get_mut(&id) else {
            return;
        };
        p.acks.insert(key, state);
        if p.acks.len() < self.expected {
            return;
        }
        let Some(p) = pending.remove(&id) else {
            return;
        };
        let checkpoint = Arc::new(CompletedCheckpoint {
            id,
            states: p.acks,
            parallelism: self.parallelism.clone(),
            savepoint: p.savepoint,
            committed: false,
        });
        tracing::debug!(checkpoint = id, "checkpoint acknowledged by every subtask");
        if !self.durable {
            // Nothing to write: complete at once.
            self.complete(checkpoint, p.started_ms, None);
            return;
        }
        self.acknowledged
            .lock()
            .push_back((checkpoint, p.started_ms));
        self.acknowledged_notify.notify_one();
    }

    /// Subtask `key` has finished with `state`: it acknowledges every pending
    /// checkpoint it has not, and every later one at its trigger.
    pub(crate) fn finished(&self, node: &str, subtask: usize, state: OperatorState) {
        let key = (node.to_string(), subtask);
        let mut finished = self.finished.lock();
        finished.insert(key.clone(), state.clone());
        let mut pending = self.pending.lock();
        let ids: Vec<CheckpointId> = pending
            .iter()
            .filter(|(_, p)| !p.acks.contains_key(&key))
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.ack_locked(&mut pending, id, key.clone(), state.clone());
        }
    }

    fn trigger(&self, savepoint: Option<String>) -> Result<CheckpointId> {
        let finished = self.finished.lock();
        let mut pending = self.pending.lock();
        let live = self
            .sources
            .iter()
            .filter(|(k, _)| !finished.contains_key(k))
            .count();
        if live == 0 && finished.len() == self.expected {
            return Err(EngineError::Checkpoint(
                "every task has finished; nothing is left to checkpoint".into(),
            ));
        }
        // A savepoint is asked for by a person: it is never refused for
        // the periodic ones still in flight.
        if savepoint.is_none() && pending.len() >= MAX_IN_FLIGHT {
            let waiting = pending
                .iter()
                .next()
                .map(|(id, p)| {
                    let missing: Vec<String> = self
                        .parallelism
                        .iter()
                        .flat_map(|(node, n)| (0..*n).map(move |s| (node.clone(), s)))
                        .filter(|k| !p.acks.contains_key(k))
                        .map(|(node, s)| format!("{node}[{s}]"))
                        .collect();
                    format!("; checkpoint {id} waits for {}", missing.join(", "))
                })
                .unwrap_or_default();
            return Err(EngineError::Checkpoint(format!(
                "{} checkpoints are still in flight{waiting}",
                pending.len()
            )));
        }
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        pending.insert(
            id,
            Pending {
                acks: HashMap::new(),
                savepoint,
                started_ms: self.clock.now_ms(),
            },
        );
        for (key, tx) in &self.sources {
            if finished.contains_key(key) {
                continue;
            }
            if let Err(e) = tx.try_send(Control::Barrier(id)) {
                pending.remove(&id);
                return Err(EngineError::Checkpoint(format!(
                    "cannot inject barrier {id} into {}[{}]: {e}",
                    key.0, key.1
                )));
            }
        }
        for (key, state) in finished.iter() {
            self.ack_locked(&mut pending, id, key.clone(), state.clone());
        }
        Ok(id)
    }

    /// Takes the checkpoints acknowledged everywhere, oldest first.
    pub(crate) fn take_acknowledged(&self) -> Vec<(Arc<CompletedCheckpoint>, i64)> {
        self.acknowledged.lock().drain(..).collect()
    }

    /// `checkpoint` is durable: make it the latest and tell sources and sinks.
    pub(crate) fn complete(
        &self,
        checkpoint: Arc<CompletedCheckpoint>,
        started_ms: i64,
        bytes: Option<u64>,
    ) {
        let id = checkpoint.id;
        if checkpoint.savepoint.is_some() {
            let mut savepoints = self.savepoints.lock();
            savepoints.push_back(checkpoint.clone());
            while savepoints.len() > KEEP_IN_MEMORY {
                savepoints.pop_front();
            }
        }
        {
            let mut completed = self.completed.lock();
            completed.push_back(checkpoint);
            while completed.len() > KEEP_IN_MEMORY {
                completed.pop_front();
            }
        }
        {
            let now = self.clock.now_ms();
            let mut s = self.stats.lock();
            s.completed += 1;
            s.latest_id = Some(id);
            s.latest_completed_ms = Some(now);
            s.latest_duration_ms = Some((now - started_ms).max(0) as u64);
            s.latest_bytes = bytes;
        }
        tracing::debug!(checkpoint = id, "checkpoint complete");
        for (_, tx) in self.sources.iter().chain(&self.sinks) {
            // A finished task is gone; a full queue means a later completion
            // is already on its way, and completions cover everything before.
            let _ = tx.try_send(Control::Complete(id));
        }
        self.notify.notify_waiters();
    }

    pub(crate) fn failed(&self, id: CheckpointId, why: String) {
        tracing::warn!(checkpoint = id, error = %why, "checkpoint failed");
        let mut s = self.stats.lock();
        s.failed += 1;
        s.last_failure = Some(format!("checkpoint {id}: {why}"));
    }

    /// A source or sink subtask has acted on checkpoint `id`'s completion.
    pub(crate) fn handled(&self, id: CheckpointId) {
        let done = {
            let mut handled = self.handled.lock();
            let n = handled.entry(id).or_insert(0);
            *n += 1;
            *n
        };
        if self.durable && done == self.live_participants() {
            self.committed.lock().push(id);
            self.acknowledged_notify.notify_one();
        }
        self.notify.notify_waiters();
    }

    /// Source and sink subtasks that have not finished.
    fn live_participants(&self) -> usize {
        let finished = self.finished.lock();
        self.sources
            .iter()
            .chain(&self.sinks)
            .filter(|(k, _)| !finished.contains_key(k))
            .count()
    }

    /// Checkpoints every live source and sink has committed.
    pub(crate) fn take_committed(&self) -> Vec<CheckpointId> {
        std::mem::take(&mut *self.committed.lock())
    }
}

/// Triggers checkpoints of a running pipeline and reads the completed ones.
#[derive(Debug, Clone)]
pub struct CheckpointHandle {
    pub(crate) inner: Arc<Coordinator>,
}

impl CheckpointHandle {
    /// Asks every source to inject a barrier; returns the checkpoint's id.
    pub fn trigger(&self) -> Result<CheckpointId> {
        self.inner.trigger(None)
    }

    /// Takes a savepoint: a checkpoint kept under `name` until deleted,
    /// which a later run can be started from.
    pub fn savepoint(&self, name: &str) -> Result<CheckpointId> {
        store::check_savepoint_name(name)?;
        self.inner.trigger(Some(name.to_string()))
    }

    /// The most recent completed checkpoint.
    pub fn latest(&self) -> Option<Arc<CompletedCheckpoint>> {
        self.inner.completed.lock().back().cloned()
    }

    /// Health of the checkpoints so far.
    pub fn stats(&self) -> CheckpointStats {
        self.inner.stats.lock().clone()
    }

    /// Waits until checkpoint `id` has completed and every live source and
    /// sink subtask has acted on it (committed).
    pub async fn wait_handled(&self, id: CheckpointId) {
        loop {
            let notified = self.inner.notify.notified();
            let live = self.inner.live_participants();
            let done = self.inner.handled.lock().get(&id).copied().unwrap_or(0);
            if done >= live {
                return;
            }
            notified.await;
        }
    }

    /// Waits until checkpoint `id` has completed (or a later one has, when
    /// `id` failed): returns `id` itself if it is still in memory (always,
    /// for a savepoint), else the earliest later one.
    pub async fn wait_for(&self, id: CheckpointId) -> Arc<CompletedCheckpoint> {
        loop {
            let notified = self.inner.notify.notified();
            if let Some(c) = self.inner.savepoints.lock().iter().find(|c| c.id == id) {
                return c.clone();
            }
            if let Some(c) = self.inner.completed.lock().iter().find(|c| c.id >= id) {
                return c.clone();
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_savepoint_is_found_after_periodic_checkpoints_completed_behind_it() {
        let (tx, mut rx) = mpsc::channel(16);
        let key: TaskKey = ("src".into(), 0);
        let coordinator = Arc::new(Coordinator::new(
            BTreeMap::from([("src".to_string(), 1)]),
            vec![(key, tx)],
            Vec::new(),
            1,
            Arc::new(crate::clock::SystemClock),
            false,
        ));
        let handle = CheckpointHandle {
            inner: coordinator.clone(),
        };
        let saved = handle.savepoint("before-upgrade").expect("savepoint");
        let later = [handle.trigger().expect("2"), handle.trigger().expect("3")];
        for id in std::iter::once(saved).chain(later) {
            assert!(matches!(rx.recv().await, Some(Control::Barrier(b)) if b == id));
            coordinator.ack(id, "src", 0, OperatorState::default());
        }
        // Only two completed checkpoints are kept in memory; the savepoint
        // is still the one its waiter gets, not a later periodic one.
        let done = handle.wait_for(saved).await;
        assert_eq!(done.id, saved);
        assert_eq!(done.savepoint.as_deref(), Some("before-upgrade"));
        assert_eq!(handle.wait_for(later[0]).await.id, later[0]);
    }
}
