//! Leases: how the processes of one pipeline see each other without a
//! cluster protocol.
//!
//! Processes of a pipeline share its partitions through Kafka's group
//! protocol, and its checkpoint storage (a shared directory or an S3
//! bucket). Each one has a member name, stable across its restarts (the
//! host name by default, which for a Kubernetes StatefulSet pod is its
//! stable name; `--member` when one host runs several), and keeps its
//! checkpoints under `members/<member>/` so that processes never write
//! over each other's. It also keeps a small lease object in that storage,
//! `members/<member>.json`, rewritten every [`RENEW_EVERY`]: which
//! definition it runs, where it serves its API, and which partitions it owns
//! with their lag. A lease not renewed for [`LEASE_TTL`] belongs to a process
//! that is gone (killed, or cut off); one that stops cleanly removes its own.
//!
//! The leases serve three purposes:
//! * a process refuses to start under a member name that a live process
//!   holds (it would share that process's checkpoints);
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
    /// Its member name: stable across restarts, unique among the processes.
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

    /// Whether the lease was left by an earlier run of the process now
    /// starting on `host` as `pid`: the same host, and either the same pid
    /// (a container restarted, pid 1 again) or a pid no longer running.
    fn is_previous_run_of(&self, host: &str, pid: u32) -> bool {
        self.host == host
            && (self.pid == pid || !std::path::Path::new(&format!("/proc/{}", self.pid)).exists())
    }
}

/// This process's membership: its lease, kept in the checkpoint storage.
pub struct Membership {
    /// The storage, opened for this member's checkpoints.
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

/// The default member name: the host name.
pub fn default_member() -> String {
    sanitize(&host_name())
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
    /// Joins the pipeline's processes as `member`: refuses if a live
    /// process holds that name or runs another definition of the pipeline,
    /// then writes this one's lease (`keyed_state`: the pipeline has keyed
    /// steps, which are warned about when another process runs too). [`Membership::store`] is then the
    /// storage opened for the member's own checkpoints.
    pub async fn join(
        store: CheckpointStore,
        member: &str,
        pipeline: &str,
        definition: &str,
        keyed_state: bool,
        http: Option<String>,
        clock: SharedClock,
    ) -> Result<Self, EngineError> {
        let now = clock.now_ms();
        let others = leases(&store).await?;
        let host = host_name();
        let pid = std::process::id();
        if let Some(other) = others
            .iter()
            .find(|o| o.member == member && o.live(now) && !o.is_previous_run_of(&host, pid))
        {
            return Err(EngineError::User(format!(
                "member name {member:?} is held by process {} on {} (lease renewed {} s ago): every process of a pipeline needs its own, since it names the process's checkpoints. Give this one another with --member NAME (or VIGIL_MEMBER)",
                other.pid,
                other.host,
                (now - other.updated_ms).max(0) / 1000,
            )));
        }
        for other in &others {
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
        if keyed_state {
            if let Some(other) = others
                .iter()
                .find(|o| o.pipeline == pipeline && o.member != member && o.live(now))
            {
                tracing::warn!(
                    other = %other.member,
                    "another process runs this pipeline; it has keyed steps, whose state follows partitions between processes only with scale_out (docs/scale-out.md): add it, or run one process"
                );
            }
        }
        let lease = Lease {
            member: member.to_string(),
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
            store: store.for_member(member)?,
            clock,
            lease: parking_lot::Mutex::new(lease),
        };
        me.write().await?;
        tracing::info!(member = %me.member(), definition, "joined the pipeline's processes");
        Ok(me)
    }

    /// The storage, opened for this member's checkpoints.
    pub fn store(&self) -> &CheckpointStore {
        &self.store
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

    async fn join(
        store: &CheckpointStore,
        clock: &SharedClock,
        member: &str,
        pipeline: &str,
        definition: &str,
    ) -> Result<Membership, EngineError> {
        Membership::join(
            store.clone(),
            member,
            pipeline,
            definition,
            false,
            None,
            clock.clone(),
        )
        .await
    }

    #[tokio::test]
    async fn a_live_process_with_another_definition_keeps_newcomers_out() {
        let dir = tempfile::tempdir().expect("dir");
        let store = CheckpointStore::open(dir.path().to_str().expect("utf-8"), 3).expect("store");
        let manual = ManualClock::new(1_000_000);
        let clock: SharedClock = manual.clone();
        let first = join(&store, &clock, "one", "p", "aaaa")
            .await
            .expect("first joins");
        // The same definition joins beside it (another pid in real life).
        let listed = leases(&store).await.expect("leases");
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].definition, "aaaa");
        let err = join(&store, &clock, "two", "p", "bbbb")
            .await
            .err()
            .expect("refused");
        let msg = err.to_string();
        assert!(
            msg.contains("another definition") && msg.contains("aaaa") && msg.contains("bbbb"),
            "{msg}"
        );
        // Another pipeline in the same storage is none of its business.
        join(&store, &clock, "three", "q", "bbbb")
            .await
            .expect("another pipeline");
        // Once the first process's lease has expired, the new definition may start.
        manual.advance(LEASE_TTL.as_millis() as i64 + 1);
        join(&store, &clock, "two", "p", "bbbb")
            .await
            .expect("after the lease expired");
        first.leave().await;
        assert!(leases(&store)
            .await
            .expect("leases")
            .iter()
            .all(|l| l.definition == "bbbb"));
    }

    #[tokio::test]
    async fn a_member_name_is_held_by_one_live_process_and_names_its_checkpoints() {
        let dir = tempfile::tempdir().expect("dir");
        let store = CheckpointStore::open(dir.path().to_str().expect("utf-8"), 3).expect("store");
        let manual = ManualClock::new(1_000_000);
        let clock: SharedClock = manual.clone();
        // A process on another host holds "sensor-a".
        let held = Lease {
            member: "sensor-a".into(),
            pipeline: "p".into(),
            definition: "aaaa".into(),
            host: "elsewhere".into(),
            pid: 1,
            http: None,
            started_ms: 999_000,
            updated_ms: 999_000,
            partitions: Vec::new(),
        };
        let lease = |l: &Lease| store.put_member("sensor-a", serde_json::to_vec(l).expect("json"));
        lease(&held).await.expect("lease");
        let err = join(&store, &clock, "sensor-a", "p", "aaaa")
            .await
            .err()
            .expect("name taken");
        assert!(err.to_string().contains("--member"), "{err}");
        // This process's own earlier run (same host, same pid) is not in the way.
        let again = Lease {
            host: host_name(),
            pid: std::process::id(),
            ..held
        };
        lease(&again).await.expect("lease");
        // A single process ran before, in the shared directory.
        store
            .write(&vigil_engine::CompletedCheckpoint {
                id: 7,
                ..Default::default()
            })
            .await
            .expect("shared checkpoint");
        let me = join(&store, &clock, "sensor-a", "p", "aaaa")
            .await
            .expect("restarted");
        // The member starts from it, and checkpoints in its own directory.
        assert_eq!(
            me.store().latest().await.expect("latest").map(|c| c.id),
            Some(7)
        );
        me.store()
            .write(&vigil_engine::CompletedCheckpoint {
                id: 8,
                ..Default::default()
            })
            .await
            .expect("member checkpoint");
        assert!(dir
            .path()
            .join("members/sensor-a/checkpoints/chk-00000000000000000008/_manifest.json")
            .exists());
        assert_eq!(
            me.store().latest().await.expect("latest").map(|c| c.id),
            Some(8)
        );
        assert_eq!(store.latest().await.expect("latest").map(|c| c.id), Some(7));
        // The lease listing is not confused by what is in the directories.
        assert_eq!(leases(&store).await.expect("leases").len(), 1);
        // An ended run clears its own checkpoints and the shared ones.
        me.store().clear().await.expect("clear");
        assert!(me.store().latest().await.expect("latest").is_none());
    }
}
