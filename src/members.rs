//! Leases: how the processes of one pipeline see each other without a
//! cluster protocol.
//!
//! Processes of a pipeline share its partitions through Kafka's group
//! protocol, and its checkpoint storage (a shared directory or an S3
//! bucket). Each one keeps a small lease object in that storage,
//! `members/<member>.json`, rewritten every [`RENEW_EVERY`]: which
//! definition it runs, where it serves its API, and which partitions it owns
//! with their lag. A lease not renewed for [`LEASE_TTL`] belongs to a process
//! that is gone (killed, or cut off); one that stops cleanly removes its own.
//!
//! The leases serve two purposes:
//! * a process refuses to start while a live lease of the same pipeline
//!   carries another definition fingerprint: two definitions sharing a group
//!   would share partitions and state and compute neither pipeline (Kafka's
//!   own description of the group is checked too, by the Kafka source, but
//!   not every Kafka-compatible broker answers it);
//! * `vigil status` shows, per process, what it owns and how far behind it
//!   is, including processes on other machines.
//!
//! Freshness is judged by the writer's own clock (`updated_ms`), so the
//! processes' clocks must agree to well within [`LEASE_TTL`], as NTP gives.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use vigil_engine::{CheckpointStore, EngineError, MetricsRegistry, NodeRole, SharedClock};

/// How often a process rewrites its lease.
pub const RENEW_EVERY: Duration = Duration::from_secs(5);

/// A lease older than this is a process that is gone.
pub const LEASE_TTL: Duration = Duration::from_secs(30);

/// What one process says about itself.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Lease {
    /// Its name in the storage: host, process id and run in the process.
    pub member: String,
    /// The pipeline's name.
    pub pipeline: String,
    /// Fingerprint of the definition it runs.
    pub definition: String,
    /// Host it runs on.
    pub host: String,
    /// Process id.
    pub pid: u32,
    /// Its HTTP API, if served.
    pub http: Option<String>,
    /// When it started, ms since the epoch.
    pub started_ms: i64,
    /// When it last renewed the lease, ms since the epoch.
    pub updated_ms: i64,
    /// Partitions it owns now.
    pub partitions: Vec<Owned>,
}

/// A partition a process owns.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Owned {
    /// The source node reading it.
    pub source: String,
    /// Its subtask in that process.
    pub subtask: usize,
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Records between the consumer's position and the partition's end
    /// (unknown before the first read or commit).
    pub lag: Option<i64>,
}

impl Lease {
    /// Whether the lease was renewed within [`LEASE_TTL`] of `now_ms`.
    pub fn live(&self, now_ms: i64) -> bool {
        now_ms - self.updated_ms <= LEASE_TTL.as_millis() as i64
    }
}

/// This process's membership: its lease, kept in the checkpoint storage.
pub struct Membership {
    store: CheckpointStore,
    clock: SharedClock,
    lease: parking_lot::Mutex<Lease>,
}

/// Every lease in `store`, oldest member first; unreadable ones are logged
/// and skipped (a lease is advisory, never state).
pub async fn leases(store: &CheckpointStore) -> Result<Vec<Lease>, EngineError> {
    let mut out = Vec::new();
    for (member, bytes) in store.members().await? {
        match serde_json::from_slice::<Lease>(&bytes) {
            Ok(l) => out.push(l),
            Err(e) => tracing::warn!(member, error = %e, "unreadable member lease; ignored"),
        }
    }
    out.sort_by_key(|l| (l.started_ms, l.member.clone()));
    Ok(out)
}

fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

/// `text` reduced to the characters a member name may hold.
fn sanitize(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .collect::<String>()
        .trim_start_matches('.')
        .to_string()
}

impl Membership {
    /// Joins the pipeline's processes: refuses if a live process of the
    /// same pipeline runs another definition, then writes this one's lease.
    pub async fn join(
        store: CheckpointStore,
        pipeline: &str,
        definition: &str,
        http: Option<String>,
        clock: SharedClock,
    ) -> Result<Self, EngineError> {
        let now = clock.now_ms();
        let others = leases(&store).await?;
        if let Some(other) = others
            .iter()
            .find(|o| o.pipeline == pipeline && o.live(now))
        {
            tracing::warn!(
                other = %other.member,
                storage = store.location(),
                "another process of this pipeline checkpoints to the same storage; checkpoints are not yet kept apart per process, so a restore may take the other's offsets (records are then re-read, not lost). Keyed state does not follow partitions between processes yet: see docs/scale-out.md"
            );
        }
        for other in others {
            if other.pipeline == pipeline && other.definition != definition && other.live(now) {
                return Err(EngineError::User(format!(
                    "pipeline {pipeline:?} already runs with another definition: process {} on {} (fingerprint {}, lease renewed {} s ago) runs it, while this file's fingerprint is {definition}. Processes of one pipeline name share partitions and state, so they must run the same file: stop the other processes first (or wait {} s after they died), or give this pipeline another name",
                    other.pid,
                    other.host,
                    other.definition,
                    (now - other.updated_ms).max(0) / 1000,
                    LEASE_TTL.as_secs(),
                )));
            }
        }
        let host = host_name();
        let pid = std::process::id();
        // Several runs in one process (tests, embedding) get their own names.
        static RUNS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let lease = Lease {
            member: sanitize(&format!("{host}-{pid}-{run}")),
            pipeline: pipeline.to_string(),
            definition: definition.to_string(),
            host,
            pid,
            http,
            started_ms: now,
            updated_ms: now,
            partitions: Vec::new(),
        };
        let me = Self {
            store,
            clock,
            lease: parking_lot::Mutex::new(lease),
        };
        me.write().await?;
        tracing::info!(member = %me.member(), definition, "joined the pipeline's processes");
        Ok(me)
    }

    /// This process's member name.
    pub fn member(&self) -> String {
        self.lease.lock().member.clone()
    }

    async fn write(&self) -> Result<(), EngineError> {
        let (member, body) = {
            let l = self.lease.lock();
            (
                l.member.clone(),
                serde_json::to_vec_pretty(&*l).map_err(|e| {
                    EngineError::Checkpoint(format!("cannot encode the member lease: {e}"))
                })?,
            )
        };
        self.store.put_member(&member, body).await
    }

    /// Rewrites the lease with the partitions the sources own now. A
    /// failure is logged: the storage may be briefly unreachable, and the
    /// lease is advisory.
    pub async fn renew(&self, metrics: &MetricsRegistry) {
        let mut owned = Vec::new();
        for t in metrics.tasks() {
            if t.role != NodeRole::Source {
                continue;
            }
            let lag = t.metrics.consumer_lag.lock().clone();
            for (topic, partition) in t.metrics.owned_partitions.lock().iter() {
                owned.push(Owned {
                    source: t.node.clone(),
                    subtask: t.subtask,
                    topic: topic.clone(),
                    partition: *partition,
                    lag: lag.get(&(topic.clone(), *partition)).copied(),
                });
            }
        }
        {
            let mut l = self.lease.lock();
            l.partitions = owned;
            l.updated_ms = self.clock.now_ms();
        }
        if let Err(e) = self.write().await {
            tracing::warn!(error = %e, "cannot renew the member lease");
        }
    }

    /// Removes the lease: this process is leaving.
    pub async fn leave(&self) {
        if let Err(e) = self.store.remove_member(&self.member()).await {
            tracing::warn!(error = %e, "cannot remove the member lease; it expires by itself");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vigil_engine::ManualClock;

    #[tokio::test]
    async fn a_live_process_with_another_definition_keeps_newcomers_out() {
        let dir = tempfile::tempdir().expect("dir");
        let store = CheckpointStore::open(dir.path().to_str().expect("utf-8"), 3).expect("store");
        let manual = ManualClock::new(1_000_000);
        let clock: SharedClock = manual.clone();
        let first = Membership::join(store.clone(), "p", "aaaa", None, clock.clone())
            .await
            .expect("first joins");
        // The same definition joins beside it (another pid in real life).
        let listed = leases(&store).await.expect("leases");
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].definition, "aaaa");
        let err = Membership::join(store.clone(), "p", "bbbb", None, clock.clone())
            .await
            .err()
            .expect("refused");
        let msg = err.to_string();
        assert!(
            msg.contains("another definition") && msg.contains("aaaa") && msg.contains("bbbb"),
            "{msg}"
        );
        // Another pipeline in the same storage is none of its business.
        Membership::join(store.clone(), "q", "bbbb", None, clock.clone())
            .await
            .expect("another pipeline");
        // Once the first process's lease has expired, the new definition may start.
        manual.advance(LEASE_TTL.as_millis() as i64 + 1);
        Membership::join(store.clone(), "p", "bbbb", None, clock.clone())
            .await
            .expect("after the lease expired");
        first.leave().await;
        assert!(leases(&store)
            .await
            .expect("leases")
            .iter()
            .all(|l| l.definition == "bbbb"));
    }
}
