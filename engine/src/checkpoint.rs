//! Checkpoint coordination: barriers in, acknowledgements back.
//!
//! A checkpoint is triggered by asking every source subtask to inject a
//! [`Barrier`](crate::Barrier) into its outputs. Each operator and sink
//! snapshots its state once the barrier has arrived on all of its inputs
//! (aligned barriers, Chandy–Lamport style) and acknowledges it here with the
//! state. The checkpoint is complete when every subtask has acknowledged it;
//! only then is it visible through [`CheckpointHandle::latest`], and only
//! then are sources told ([`Source::on_checkpoint_complete`](crate::Source::on_checkpoint_complete)),
//! which is when a Kafka source may commit its offsets. Completed checkpoints
//! live in memory in this version; durable storage is layered on the same
//! acknowledgements.

use std::collections::HashMap;
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
#[derive(Debug, Clone)]
pub struct CompletedCheckpoint {
    /// Its id.
    pub id: CheckpointId,
    /// State of each subtask.
    pub states: HashMap<TaskKey, OperatorState>,
}

impl CompletedCheckpoint {
    /// The state of one subtask, if it had any.
    pub fn state(&self, node: &str, subtask: usize) -> Option<&OperatorState> {
        self.states.get(&(node.to_string(), subtask))
    }
}

/// What the coordinator tells a source subtask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Control {
    /// Inject a barrier for this checkpoint.
    Barrier(CheckpointId),
    /// This checkpoint completed everywhere.
    Complete(CheckpointId),
}

#[derive(Debug)]
pub(crate) struct Coordinator {
    expected: usize,
    next_id: AtomicU64,
    sources: Vec<mpsc::Sender<Control>>,
    pending: Mutex<HashMap<CheckpointId, HashMap<TaskKey, OperatorState>>>,
    /// Per checkpoint, source subtasks that have acted on its completion.
    handled: Mutex<HashMap<CheckpointId, usize>>,
    completed: Mutex<Vec<Arc<CompletedCheckpoint>>>,
    notify: Notify,
}

impl Coordinator {
    pub(crate) fn new(
        expected: usize,
        sources: Vec<mpsc::Sender<Control>>,
        first_id: CheckpointId,
    ) -> Self {
        Self {
            expected,
            next_id: AtomicU64::new(first_id),
            sources,
            pending: Mutex::new(HashMap::new()),
            handled: Mutex::new(HashMap::new()),
            completed: Mutex::new(Vec::new()),
            notify: Notify::new(),
        }
    }

    pub(crate) fn ack(&self, id: CheckpointId, node: &str, subtask: usize, state: OperatorState) {
        let done = {
            let mut pending = self.pending.lock();
            let acks = pending.entry(id).or_default();
            acks.insert((node.to_string(), subtask), state);
            if acks.len() == self.expected {
                pending.remove(&id)
            } else {
                None
            }
        };
        if let Some(states) = done {
            self.completed
                .lock()
                .push(Arc::new(CompletedCheckpoint { id, states }));
            tracing::debug!(checkpoint = id, "checkpoint complete");
            for tx in &self.sources {
                // A full control queue means a later completion is coming
                // anyway; positions only move forward.
                let _ = tx.try_send(Control::Complete(id));
            }
            self.notify.notify_waiters();
        }
    }
}

impl Coordinator {
    /// A source subtask has acted on checkpoint `id`'s completion (committed).
    pub(crate) fn handled(&self, id: CheckpointId) {
        *self.handled.lock().entry(id).or_insert(0) += 1;
        self.notify.notify_waiters();
    }
}

/// Triggers checkpoints of a running pipeline and reads the completed ones.
#[derive(Debug, Clone)]
pub struct CheckpointHandle {
    pub(crate) inner: Arc<Coordinator>,
}

impl CheckpointHandle {
    /// Asks every source to inject a barrier; returns the checkpoint's id.
    ///
    /// Fails when a source has already finished: a barrier can no longer cut
    /// its stream.
    pub fn trigger(&self) -> Result<CheckpointId> {
        let id = self.inner.next_id.fetch_add(1, Ordering::SeqCst);
        for tx in &self.inner.sources {
            tx.try_send(Control::Barrier(id)).map_err(|e| {
                EngineError::Checkpoint(format!("cannot inject barrier {id}: source {e}"))
            })?;
        }
        Ok(id)
    }

    /// The most recent completed checkpoint.
    pub fn latest(&self) -> Option<Arc<CompletedCheckpoint>> {
        self.inner.completed.lock().last().cloned()
    }

    /// Waits until checkpoint `id` has completed and every source subtask has
    /// acted on it (committed its positions).
    pub async fn wait_handled(&self, id: CheckpointId) {
        loop {
            let notified = self.inner.notify.notified();
            let done = self.inner.handled.lock().get(&id).copied().unwrap_or(0);
            if done >= self.inner.sources.len() {
                return;
            }
            notified.await;
        }
    }

    /// Waits until checkpoint `id` has completed.
    pub async fn wait_for(&self, id: CheckpointId) -> Arc<CompletedCheckpoint> {
        loop {
            let notified = self.inner.notify.notified();
            if let Some(c) = self.inner.completed.lock().iter().find(|c| c.id == id) {
                return c.clone();
            }
            notified.await;
        }
    }
}
