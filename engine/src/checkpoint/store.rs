//! Durable checkpoints: Arrow IPC state files plus a manifest, in a local
//! directory or S3-compatible object storage (through `object_store`).
//!
//! # Layout
//! ```text
//! <root>/checkpoints/chk-00000000000000000012/<task>-<node>-<subtask>/<n>.arrow
//! <root>/checkpoints/chk-00000000000000000012/_manifest.json
//! <root>/savepoints/<name>/...            (same shape, never pruned)
//! <root>/members/<member>.json            (a process's lease)
//! <root>/members/<member>/checkpoints/... (a process's own checkpoints)
//! <root>/partitions/<topic>/<n>           (a partition's pointer)
//! ```
//! A partition's [pointer](PartitionPointer) names the member checkpoint
//! its last committed offset belongs to; the member's pruning keeps every
//! checkpoint a pointer names, so a partition's next owner finds it.
//! A store opened [`for a member`](CheckpointStore::for_member), one of
//! several processes sharing the storage, keeps its checkpoints apart from
//! the others'; one that has none yet restores the shared `checkpoints/`
//! of a single process that ran before.
//! Each state table of each subtask is one Arrow IPC file, so a restore reads
//! the columns back without decoding rows, and a table may have any schema.
//!
//! # Atomic completion
//! The manifest is written last, with a single `put` (atomic on every
//! object store, and a write-then-rename on a local disk). A checkpoint
//! without a manifest is not a checkpoint: a crash half-way through leaves
//! files no reader looks at, and the next prune removes them. Pruning
//! deletes a checkpoint's manifest before its files for the same reason.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::ipc::reader::FileReader;
use arrow::ipc::writer::FileWriter;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

use super::CompletedCheckpoint;
use crate::error::{EngineError, Result};
use crate::key_group::KEY_GROUPS;
use crate::message::CheckpointId;
use crate::operator::OperatorState;

const MANIFEST: &str = "_manifest.json";
/// Written once every sink has committed a checkpoint.
const COMMITTED: &str = "_committed";
const FORMAT: u32 = 1;
/// Files written or read at once.
const CONCURRENCY: usize = 16;

/// The manifest of a stored checkpoint: what it holds and where.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// Layout version.
    pub format: u32,
    /// Checkpoint id.
    pub id: CheckpointId,
    /// Savepoint name, for a savepoint.
    pub savepoint: Option<String>,
    /// Number of key groups keyed state was divided into.
    pub key_groups: usize,
    /// Parallelism of each node when the checkpoint was taken.
    pub parallelism: BTreeMap<String, usize>,
    /// State files of each subtask: `(node, subtask, files)`.
    pub tasks: Vec<TaskFiles>,
    /// Bytes of state files.
    pub bytes: u64,
}

/// The state files of one subtask.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TaskFiles {
    /// Node name.
    pub node: String,
    /// Subtask index.
    pub subtask: usize,
    /// Files, relative to the checkpoint, in table order.
    pub files: Vec<String>,
}

/// Size of a stored checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredSize {
    /// Bytes of state files.
    pub bytes: u64,
    /// Number of state files.
    pub files: usize,
}

/// Where a pipeline's checkpoints and savepoints are kept.
#[derive(Debug, Clone)]
pub struct CheckpointStore {
    store: Arc<dyn ObjectStore>,
    root: Path,
    location: String,
    retain: usize,
    /// The directory, for a local store (emptied directories are removed).
    local: Option<std::path::PathBuf>,
    /// The process whose checkpoints these are, when several share it.
    member: Option<String>,
    /// Savepoints written by this process, by checkpoint id, so their
    /// commit marker goes beside them too.
    savepoints: Arc<parking_lot::Mutex<BTreeMap<CheckpointId, String>>>,
    /// Checkpoints that pruning keeps whatever their age: those a partition
    /// handed to another process was committed with, until its new owner
    /// has committed a position of its own.
    pinned: Arc<parking_lot::Mutex<std::collections::BTreeSet<CheckpointId>>>,
}

fn store_error(what: impl std::fmt::Display, e: impl std::fmt::Display) -> EngineError {
    EngineError::Checkpoint(format!("{what}: {e}"))
}

pub(crate) fn check_savepoint_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(EngineError::User(format!(
            "savepoint name {name:?}: use letters, digits, '-', '_' and '.', not starting with '.'"
        )))
    }
}

impl CheckpointStore {
    /// Opens `location`: an `s3://bucket/prefix` URL (credentials, region and
    /// endpoint from the usual `AWS_*` variables, e.g. `AWS_ENDPOINT_URL` for
    /// MinIO or other S3-compatible stores) or a local directory, created if
    /// missing. Keeps the newest `retain` checkpoints (at least 1).
    pub fn open(location: &str, retain: usize) -> Result<Self> {
        let options: Vec<(String, String)> = std::env::vars()
            .filter(|(k, _)| k.starts_with("AWS_"))
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .collect();
        Self::open_with(location, retain, options)
    }

    /// [`CheckpointStore::open`] with the object store's settings given
    /// (`aws_endpoint`, `aws_region`, `aws_access_key_id`, ...) instead of
    /// read from the environment.
    pub fn open_with(
        location: &str,
        retain: usize,
        options: Vec<(String, String)>,
    ) -> Result<Self> {
        let local = (!location.contains("://")).then(|| std::path::PathBuf::from(location));
        let (store, root): (Arc<dyn ObjectStore>, Path) = if location.contains("://") {
            let url = url::Url::parse(location)
                .map_err(|e| EngineError::User(format!("checkpoint storage {location:?}: {e}")))?;
            let (store, path) = object_store::parse_url_opts(&url, options)
                .map_err(|e| EngineError::User(format!("checkpoint storage {location:?}: {e}")))?;
            (Arc::from(store), path)
        } else {
            std::fs::create_dir_all(location).map_err(|e| {
                EngineError::io(format!("cannot create checkpoint directory {location}"), e)
            })?;
            let fs = LocalFileSystem::new_with_prefix(location)
                .map_err(|e| store_error(format!("checkpoint directory {location}"), e))?;
            (Arc::new(fs), Path::default())
        };
        Ok(Self {
            store,
            root,
            location: location.to_string(),
            retain: retain.max(1),
            local,
            member: None,
            savepoints: Arc::default(),
            pinned: Arc::default(),
        })
    }

    /// Where the checkpoints are, as given.
    pub fn location(&self) -> &str {
        &self.location
    }

    /// The same storage, holding the checkpoints of process `member` apart
    /// from those of the other processes sharing it. Savepoints stay shared,
    /// so any process can start from one.
    pub fn for_member(&self, member: &str) -> Result<Self> {
        check_savepoint_name(member).map_err(|_| {
            EngineError::User(format!(
                "member name {member:?}: use letters, digits, '-', '_' and '.', not starting with '.'"
            ))
        })?;
        Ok(Self {
            member: Some(member.to_string()),
            ..self.clone()
        })
    }

    /// The member whose checkpoints these are, if several share the storage.
    pub fn member(&self) -> Option<&str> {
        self.member.as_deref()
    }

    /// Keeps checkpoint `id` of this store's member from being pruned
    /// until [`CheckpointStore::unpin`].
    pub fn pin(&self, id: CheckpointId) {
        self.pinned.lock().insert(id);
    }

    /// Lets pruning take checkpoint `id` again.
    pub fn unpin(&self, id: CheckpointId) {
        self.pinned.lock().remove(&id);
    }

    /// Checkpoint `id` of process `member`, if it is stored and complete.
    pub async fn checkpoint_of(
        &self,
        member: &str,
        id: CheckpointId,
    ) -> Result<Option<CompletedCheckpoint>> {
        let dir = self
            .checkpoints_of(Some(member))
            .join(format!("chk-{id:020}").as_str());
        match self.manifest_at(&dir).await? {
            Some(m) => Ok(Some(self.read(&dir, m).await?)),
            None => Ok(None),
        }
    }

    /// Ids of the checkpoints of process `member` (complete or not), oldest
    /// first.
    pub async fn ids_of(&self, member: &str) -> Result<Vec<CheckpointId>> {
        self.checkpoint_dirs_in(&self.checkpoints_of(Some(member)))
            .await
    }

    /// The directory of checkpoints of `member` (None: the shared one).
    fn checkpoints_of(&self, member: Option<&str>) -> Path {
        match member {
            Some(m) => self
                .root
                .clone()
                .join("members")
                .join(m)
                .join("checkpoints"),
            None => self.root.clone().join("checkpoints"),
        }
    }

    fn dir_of(&self, id: CheckpointId, savepoint: Option<&str>) -> Path {
        match savepoint {
            Some(name) => self.root.clone().join("savepoints").join(name),
            None => self
                .checkpoints_of(self.member.as_deref())
                .join(format!("chk-{id:020}").as_str()),
        }
    }

    /// Writes `checkpoint`; when this returns, it is complete and durable.
    /// A savepoint is also stored as a checkpoint, so it is the latest one.
    pub async fn write(&self, checkpoint: &CompletedCheckpoint) -> Result<StoredSize> {
        let size = self
            .write_at(checkpoint, self.dir_of(checkpoint.id, None))
            .await?;
        if let Some(name) = &checkpoint.savepoint {
            self.write_at(checkpoint, self.dir_of(checkpoint.id, Some(name)))
                .await?;
            self.savepoints.lock().insert(checkpoint.id, name.clone());
        }
        self.prune(checkpoint.id).await?;
        Ok(size)
    }

    async fn write_at(&self, checkpoint: &CompletedCheckpoint, dir: Path) -> Result<StoredSize> {
        let mut tasks: Vec<TaskFiles> = Vec::new();
        let mut puts = Vec::new();
        let mut keys: Vec<_> = checkpoint.states.keys().collect();
        keys.sort();
        for (task, key) in keys.into_iter().enumerate() {
            let state = &checkpoint.states[key];
            let mut files = Vec::new();
            for (n, batch) in state.batches.iter().enumerate() {
                let name = format!("{task:04}-{}-{}/{n}.arrow", encode(&key.0), key.1);
                let mut buf = Vec::new();
                let mut w = FileWriter::try_new(&mut buf, &batch.schema())?;
                w.write(batch)?;
                w.finish()?;
                drop(w);
                puts.push((child(&dir, &name), Bytes::from(buf)));
                files.push(name);
            }
            tasks.push(TaskFiles {
                node: key.0.clone(),
                subtask: key.1,
                files,
            });
        }
        let bytes: u64 = puts.iter().map(|(_, b)| b.len() as u64).sum();
        let files = puts.len();
        futures::stream::iter(puts)
            .map(|(path, data)| async move {
                self.store
                    .put(&path, PutPayload::from_bytes(data))
                    .await
                    .map_err(|e| store_error(format!("cannot write {path}"), e))
            })
            .buffer_unordered(CONCURRENCY)
            .try_for_each(|_| async { Ok(()) })
            .await?;
        let manifest = Manifest {
            format: FORMAT,
            id: checkpoint.id,
            savepoint: checkpoint.savepoint.clone(),
            key_groups: KEY_GROUPS,
            parallelism: checkpoint.parallelism.clone(),
            tasks,
            bytes,
        };
        let json = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| store_error("cannot encode the manifest", e))?;
        let path = dir.clone().join(MANIFEST);
        self.store
            .put(&path, PutPayload::from(json))
            .await
            .map_err(|e| store_error(format!("cannot write {path}"), e))?;
        Ok(StoredSize { bytes, files })
    }

    /// Records that every sink has committed checkpoint `id`, so a restore
    /// from it does not commit its sinks' pre-commits a second time.
    pub async fn mark_committed(&self, id: CheckpointId) -> Result<()> {
        let savepoint = self.savepoints.lock().remove(&id);
        let mut dirs = vec![self.dir_of(id, None)];
        dirs.extend(savepoint.map(|name| self.dir_of(id, Some(&name))));
        for dir in dirs {
            let path = dir.join(COMMITTED);
            self.store
                .put(&path, PutPayload::from_static(b"committed"))
                .await
                .map_err(|e| store_error(format!("cannot write {path}"), e))?;
        }
        Ok(())
    }

    /// Ids of checkpoint directories, complete or not, oldest first.
    async fn checkpoint_dirs(&self) -> Result<Vec<CheckpointId>> {
        self.checkpoint_dirs_in(&self.checkpoints_of(self.member.as_deref()))
            .await
    }

    async fn checkpoint_dirs_in(&self, prefix: &Path) -> Result<Vec<CheckpointId>> {
        let listed = self
            .store
            .list_with_delimiter(Some(prefix))
            .await
            .map_err(|e| store_error(format!("cannot list {}", self.location), e))?;
        let mut ids: Vec<CheckpointId> = listed
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename()?.strip_prefix("chk-")?.parse().ok())
            .collect();
        ids.sort_unstable();
        Ok(ids)
    }

    /// The object at `path`, or None if there is none.
    async fn get_if_present(&self, path: &Path) -> Result<Option<Bytes>> {
        match self.store.get(path).await {
            Ok(got) => {
                Ok(Some(got.bytes().await.map_err(|e| {
                    store_error(format!("cannot read {path}"), e)
                })?))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(store_error(format!("cannot read {path}"), e)),
        }
    }

    async fn manifest_at(&self, dir: &Path) -> Result<Option<Manifest>> {
        let path = dir.clone().join(MANIFEST);
        let Some(bytes) = self.get_if_present(&path).await? else {
            return Ok(None);
        };
        let m: Manifest = serde_json::from_slice(&bytes)
            .map_err(|e| store_error(format!("{path} is not a manifest"), e))?;
        if m.format != FORMAT {
            return Err(EngineError::Checkpoint(format!(
                "{path}: layout version {} is not {FORMAT}",
                m.format
            )));
        }
        Ok(Some(m))
    }

    /// Manifests of the complete checkpoints, oldest first.
    pub async fn list(&self) -> Result<Vec<Manifest>> {
        let mut out = Vec::new();
        for id in self.checkpoint_dirs().await? {
            if let Some(m) = self.manifest_at(&self.dir_of(id, None)).await? {
                out.push(m);
            }
        }
        Ok(out)
    }

    /// The latest complete checkpoint, if any. A member without
    /// checkpoints of its own takes the shared directory's latest, left by
    /// the single process that ran the pipeline before.
    pub async fn latest(&self) -> Result<Option<CompletedCheckpoint>> {
        let mut bases = vec![self.checkpoints_of(self.member.as_deref())];
        if self.member.is_some() {
            bases.push(self.checkpoints_of(None));
        }
        for base in bases {
            for id in self.checkpoint_dirs_in(&base).await?.into_iter().rev() {
                let dir = base.clone().join(format!("chk-{id:020}").as_str());
                if let Some(m) = self.manifest_at(&dir).await? {
                    return Ok(Some(self.read(&dir, m).await?));
                }
            }
        }
        Ok(None)
    }

    /// The savepoint called `name`.
    pub async fn savepoint(&self, name: &str) -> Result<CompletedCheckpoint> {
        check_savepoint_name(name)?;
        let dir = self.dir_of(0, Some(name));
        match self.manifest_at(&dir).await? {
            Some(m) => self.read(&dir, m).await,
            None => Err(EngineError::User(format!(
                "no savepoint {name:?} in {}",
                self.location
            ))),
        }
    }

    async fn read(&self, dir: &Path, m: Manifest) -> Result<CompletedCheckpoint> {
        if m.key_groups != KEY_GROUPS {
            return Err(EngineError::Checkpoint(format!(
                "checkpoint {} divides keyed state into {} key groups, this build into {KEY_GROUPS}",
                m.id, m.key_groups
            )));
        }
        // Owned reads and a cloned store: the futures borrow nothing, so a
        // read can be awaited inside a source's `Send` future.
        let reads: Vec<_> = m
            .tasks
            .iter()
            .flat_map(|t| {
                t.files
                    .iter()
                    .enumerate()
                    .map(move |(n, f)| ((t.node.clone(), t.subtask, n), child(dir, f)))
            })
            .collect();
        let store = self.store.clone();
        let tables: Vec<((String, usize, usize), arrow::record_batch::RecordBatch)> =
            futures::stream::iter(reads)
                .map(move |(key, path)| {
                    let store = store.clone();
                    async move {
                        let got = store
                            .get(&path)
                            .await
                            .map_err(|e| store_error(format!("cannot read {path}"), e))?;
                        let bytes = got
                            .bytes()
                            .await
                            .map_err(|e| store_error(format!("cannot read {path}"), e))?;
                        let reader = FileReader::try_new(std::io::Cursor::new(bytes), None)?;
                        let schema = reader.schema();
                        let batches = reader.collect::<std::result::Result<Vec<_>, _>>()?;
                        let table = arrow::compute::concat_batches(&schema, &batches)?;
                        Ok::<_, EngineError>((key, table))
                    }
                })
                .buffer_unordered(CONCURRENCY)
                .try_collect()
                .await?;
        let mut by_task: BTreeMap<(String, usize), Vec<(usize, arrow::record_batch::RecordBatch)>> =
            BTreeMap::new();
        for ((node, subtask, n), t) in tables {
            by_task.entry((node, subtask)).or_default().push((n, t));
        }
        let mut states = std::collections::HashMap::new();
        for t in &m.tasks {
            let mut tables = by_task
                .remove(&(t.node.clone(), t.subtask))
                .unwrap_or_default();
            tables.sort_by_key(|(n, _)| *n);
            states.insert(
                (t.node.clone(), t.subtask),
                OperatorState {
                    batches: tables.into_iter().map(|(_, b)| b).collect(),
                },
            );
        }
        let committed = match self.store.head(&dir.clone().join(COMMITTED)).await {
            Ok(_) => true,
            Err(object_store::Error::NotFound { .. }) => false,
            Err(e) => return Err(store_error(format!("cannot read {dir}"), e)),
        };
        Ok(CompletedCheckpoint {
            id: m.id,
            states,
            parallelism: m.parallelism,
            savepoint: m.savepoint,
            committed,
        })
    }

    /// Where the name of the savepoint process `member` last started from
    /// is kept (`vigil run --initial-savepoint`).
    fn started_from_path(&self, member: &str) -> Result<Path> {
        check_savepoint_name(member)?;
        Ok(self.root.clone().join("started-from").join(member))
    }

    /// The savepoint process `member` started from, once a checkpoint taken
    /// after it completed: a restart of the same process goes on from its
    /// latest checkpoint instead of going back to the savepoint.
    pub async fn started_from(&self, member: &str) -> Result<Option<String>> {
        let path = self.started_from_path(member)?;
        Ok(self
            .get_if_present(&path)
            .await?
            .map(|b| String::from_utf8_lossy(&b).into_owned()))
    }

    /// Records that process `member` has gone past savepoint `start`.
    pub async fn set_started_from(&self, member: &str, start: &str) -> Result<()> {
        let path = self.started_from_path(member)?;
        self.store
            .put(&path, PutPayload::from(Bytes::from(start.to_string())))
            .await
            .map_err(|e| store_error(format!("cannot write {path}"), e))?;
        Ok(())
    }

    /// Writes the lease of process `member` (see `vigil::members`): one
    /// small object per process of the pipeline, beside its checkpoints, so
    /// every process sharing the storage can see who else runs.
    pub async fn put_member(&self, member: &str, body: Vec<u8>) -> Result<()> {
        let path = self.member_path(member)?;
        self.store
            .put(&path, PutPayload::from(Bytes::from(body)))
            .await
            .map_err(|e| store_error(format!("cannot write {path}"), e))?;
        Ok(())
    }

    /// Where the pointer of partition `partition` of `topic` is kept.
    fn pointer_path(topic: &str, partition: i32) -> String {
        format!("partitions/{}/{partition}", encode(topic))
    }

    /// Writes the pointer of a partition: which process's checkpoint holds
    /// its state at its last committed offset. Shared by all members.
    pub async fn put_pointer(
        &self,
        topic: &str,
        partition: i32,
        pointer: &PartitionPointer,
    ) -> Result<()> {
        let path = child(&self.root, &Self::pointer_path(topic, partition));
        self.store
            .put(&path, PutPayload::from(Bytes::from(pointer.to_string())))
            .await
            .map_err(|e| store_error(format!("cannot write {path}"), e))?;
        Ok(())
    }

    /// The pointer of a partition, if one was written (and is one).
    pub async fn pointer(&self, topic: &str, partition: i32) -> Result<Option<PartitionPointer>> {
        let path = child(&self.root, &Self::pointer_path(topic, partition));
        Ok(self
            .get_if_present(&path)
            .await?
            .and_then(|b| PartitionPointer::parse(&String::from_utf8_lossy(&b))))
    }

    /// The pointers of every partition of `topic` that has one.
    pub async fn pointers(&self, topic: &str) -> Result<Vec<(i32, PartitionPointer)>> {
        let prefix = child(&self.root, &format!("partitions/{}", encode(topic)));
        let mut out: Vec<(i32, PartitionPointer)> = self
            .pointers_under(&prefix)
            .await?
            .into_iter()
            .filter_map(|(path, p)| Some((path.filename()?.parse().ok()?, p)))
            .collect();
        out.sort_by_key(|(p, _)| *p);
        Ok(out)
    }

    /// Checkpoints of this store's member that a partition's pointer names.
    async fn pointed(&self) -> Result<std::collections::BTreeSet<CheckpointId>> {
        let Some(member) = &self.member else {
            return Ok(Default::default());
        };
        let prefix = self.root.clone().join("partitions");
        Ok(self
            .pointers_under(&prefix)
            .await?
            .into_iter()
            .filter(|(_, p)| &p.member == member)
            .map(|(_, p)| p.checkpoint)
            .collect())
    }

    /// Every pointer under `prefix`, with its path.
    async fn pointers_under(&self, prefix: &Path) -> Result<Vec<(Path, PartitionPointer)>> {
        let paths: Vec<Path> = self
            .store
            .list(Some(prefix))
            .map_ok(|meta| meta.location)
            .try_collect()
            .await
            .map_err(|e| store_error(format!("cannot list {prefix}"), e))?;
        let mut out = Vec::new();
        for path in paths {
            let Some(body) = self.get_if_present(&path).await? else {
                continue;
            };
            if let Some(p) = PartitionPointer::parse(&String::from_utf8_lossy(&body)) {
                out.push((path, p));
            }
        }
        Ok(out)
    }

    /// Every lease in the storage, by member.
    pub async fn members(&self) -> Result<Vec<(String, Vec<u8>)>> {
        let prefix = self.root.clone().join("members");
        // Only the leases beside the members' directories, not what is in them.
        let listed: Vec<Path> = self
            .store
            .list_with_delimiter(Some(&prefix))
            .await
            .map_err(|e| store_error(format!("cannot list {prefix}"), e))?
            .objects
            .into_iter()
            .map(|m| m.location)
            .collect();
        let mut out = Vec::new();
        for path in listed {
            let Some(member) = path.filename().and_then(|f| f.strip_suffix(".json")) else {
                continue;
            };
            // None: removed between the listing and the read, so gone.
            if let Some(bytes) = self.get_if_present(&path).await? {
                out.push((member.to_string(), bytes.to_vec()));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Every object under `prefix`.
    async fn files_under(&self, prefix: &Path) -> Result<Vec<Path>> {
        self.store
            .list(Some(prefix))
            .map_ok(|m| m.location)
            .try_collect()
            .await
            .map_err(|e| store_error(format!("cannot list {prefix}"), e))
    }

    /// Removes the lease of `member` (a process stopping cleanly).
    pub async fn remove_member(&self, member: &str) -> Result<()> {
        let path = self.member_path(member)?;
        match self.store.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(store_error(format!("cannot delete {path}"), e)),
        }
    }

    fn member_path(&self, member: &str) -> Result<Path> {
        check_savepoint_name(member).map_err(|_| {
            EngineError::User(format!(
                "member name {member:?}: use letters, digits, '-', '_' and '.'"
            ))
        })?;
        Ok(self
            .root
            .clone()
            .join("members")
            .join(format!("{member}.json").as_str()))
    }

    /// Deletes every checkpoint (savepoints stay): for a run whose input
    /// ended, or one told to start fresh.
    /// A member's also clears the shared checkpoints it may have started
    /// from.
    pub async fn clear(&self) -> Result<()> {
        let mut stores = vec![self.clone()];
        if self.member.is_some() {
            stores.push(Self {
                member: None,
                ..self.clone()
            });
        }
        for store in stores {
            for id in store.checkpoint_dirs().await? {
                store.delete_dir(id).await?;
            }
        }
        Ok(())
    }

    async fn delete_dir(&self, id: CheckpointId) -> Result<()> {
        let dir = self.dir_of(id, None);
        // The manifest first: a half-deleted checkpoint must not look complete.
        match self.store.delete(&dir.clone().join(MANIFEST)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(store_error(format!("cannot delete {dir}"), e)),
        }
        let files = self.files_under(&dir).await?;
        for f in files {
            match self.store.delete(&f).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(store_error(format!("cannot delete {f}"), e)),
            }
        }
        if let Some(root) = &self.local {
            // A local store's object paths are relative to its directory.
            let path = root.join(dir.as_ref());
            match std::fs::remove_dir_all(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(EngineError::io(
                        format!("cannot remove {}", path.display()),
                        e,
                    ))
                }
            }
        }
        Ok(())
    }

    /// Deletes checkpoints beyond the newest `retain`, and incomplete ones
    /// older than `latest` (left by a crash).
    async fn prune(&self, latest: CheckpointId) -> Result<()> {
        let mut complete = Vec::new();
        let mut doomed = Vec::new();
        for id in self.checkpoint_dirs().await? {
            if id >= latest {
                if id == latest {
                    complete.push(id);
                }
                continue;
            }
            match self.manifest_at(&self.dir_of(id, None)).await? {
                Some(_) => complete.push(id),
                None => doomed.push(id),
            }
        }
        let keep_from = complete.len().saturating_sub(self.retain);
        let mut pinned = self.pinned.lock().clone();
        if keep_from > 0 {
            pinned.extend(self.pointed().await?);
        }
        doomed.extend(
            complete[..keep_from]
                .iter()
                .filter(|id| !pinned.contains(id)),
        );
        for id in doomed {
            self.delete_dir(id).await?;
        }
        Ok(())
    }
}

/// A partition's pointer, `<member>/<checkpoint>/<fingerprint>[/<watermark>]`:
/// the checkpoint of the process that committed the partition's offset
/// which holds its state at that offset, the definition it ran, and for a
/// repartition topic the partition's watermark at that checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionPointer {
    /// The committing process.
    pub member: String,
    /// Its checkpoint.
    pub checkpoint: CheckpointId,
    /// Fingerprint of its pipeline definition.
    pub definition: String,
    /// The event-time watermark (ms) its reader had reached in the
    /// partition at that checkpoint.
    pub watermark: Option<i64>,
}

impl PartitionPointer {
    /// Reads a pointer; None for text Vigil did not write (an empty
    /// string, another tool's commit metadata).
    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.splitn(4, '/');
        let member = parts.next()?.to_string();
        let checkpoint = parts.next()?.parse().ok()?;
        let definition = parts.next()?.to_string();
        let watermark = match parts.next() {
            Some(w) => Some(w.parse().ok()?),
            None => None,
        };
        (!member.is_empty() && !definition.is_empty()).then_some(Self {
            member,
            checkpoint,
            definition,
            watermark,
        })
    }
}

impl std::fmt::Display for PartitionPointer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.member, self.checkpoint, self.definition)?;
        if let Some(w) = self.watermark {
            write!(f, "/{w}")?;
        }
        Ok(())
    }
}

/// Node names as one path segment.
fn encode(node: &str) -> String {
    node.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn child(dir: &Path, relative: &str) -> Path {
    relative
        .split('/')
        .fold(dir.clone(), |p, part| p.join(part))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointers_round_trip_and_foreign_metadata_is_not_one() {
        let mut p = PartitionPointer {
            member: "vigil-1".into(),
            checkpoint: 42,
            definition: "0123456789ab".into(),
            watermark: None,
        };
        assert_eq!(p.to_string(), "vigil-1/42/0123456789ab");
        assert_eq!(PartitionPointer::parse(&p.to_string()), Some(p.clone()));
        p.watermark = Some(-5);
        assert_eq!(p.to_string(), "vigil-1/42/0123456789ab/-5");
        assert_eq!(PartitionPointer::parse(&p.to_string()), Some(p));
        for other in ["", "x", "a/b/c", "/1/f", "m/1/", "m/1/f/x"] {
            assert_eq!(PartitionPointer::parse(other), None, "{other:?}");
        }
    }

    #[tokio::test]
    async fn pruning_keeps_the_checkpoints_partition_pointers_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let shared = CheckpointStore::open(dir.path().to_str().expect("utf-8"), 1).expect("open");
        let a = shared.for_member("a").expect("a");
        let b = shared.for_member("b").expect("b");
        let pointer = |member: &str, checkpoint| PartitionPointer {
            member: member.into(),
            checkpoint,
            definition: "f".into(),
            watermark: None,
        };
        for id in 1..=2 {
            a.write(&CompletedCheckpoint {
                id,
                ..Default::default()
            })
            .await
            .expect("write");
        }
        // Partition 0 was last committed with a's checkpoint 2; partition 1
        // with b's 2, which says nothing about a's.
        a.put_pointer("auth", 0, &pointer("a", 2))
            .await
            .expect("put");
        a.put_pointer("auth", 1, &pointer("b", 1))
            .await
            .expect("put");
        for id in 3..=5 {
            a.write(&CompletedCheckpoint {
                id,
                ..Default::default()
            })
            .await
            .expect("write");
        }
        let kept: Vec<CheckpointId> = a.list().await.expect("list").iter().map(|m| m.id).collect();
        assert_eq!(kept, vec![2, 5]);
        assert!(a.checkpoint_of("a", 2).await.expect("read").is_some());
        assert_eq!(
            b.pointer("auth", 0).await.expect("read"),
            Some(pointer("a", 2))
        );
        assert_eq!(b.pointer("auth", 7).await.expect("read"), None);
        let all = b.pointers("auth").await.expect("list");
        assert_eq!(all, vec![(0, pointer("a", 2)), (1, pointer("b", 1))]);
        assert!(b.pointers("dns").await.expect("list").is_empty());
    }
}
