//! Partitions that move between processes take their position, and for a
//! repartition topic their keyed state, with them (see `docs/scale-out.md`,
//! "State follows partitions").
//!
//! Every offset a process commits comes with a **pointer**,
//! `<member>/<checkpoint>/<fingerprint>`: the checkpoint of the committing
//! process that holds the partition's state at that offset. The pointer is
//! written to the shared checkpoint storage (`partitions/<topic>/<n>`) once
//! the Kafka commit has succeeded, and also rides in the commit's metadata
//! for brokers that keep it (tansu does not, which is why the storage holds
//! the copy that is read). Kafka refuses commits from a member that has
//! lost its place in the group, and a refused commit writes no pointer, so
//! the pointer names the last rightful owner.
//!
//! A process that is assigned a partition reads the pointer and takes the
//! partition from the **latest** checkpoint of the named member that still
//! holds the partition, if it is at or after the named one: a process can
//! die after storing a checkpoint and before committing it, and its
//! successor under the same member name finishes that checkpoint's sink
//! commits, so the partition must go on from there. A member's checkpoint
//! holds a partition only while the member owns it: the hand-over
//! checkpoint is the last one.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::AsArray;
use arrow::datatypes::{Int32Type, Int64Type};
use vigil_engine::{CheckpointId, CheckpointStore, CompletedCheckpoint};

use crate::error::{ConnectorError, Result};

/// Who this process is, for the pointers it commits and reads.
#[derive(Debug, Clone)]
pub struct Ownership {
    /// The shared checkpoint storage, as this process's member store.
    pub store: CheckpointStore,
    /// This process's member name.
    pub member: String,
    /// Fingerprint of the pipeline's definition.
    pub definition: String,
}

/// A commit's pointer to the checkpoint holding the partition's state.
pub use vigil_engine::PartitionPointer as Pointer;

/// The next offset of `topic`/`partition` in the position table of source
/// `node` in `checkpoint`, if it holds the partition.
pub fn position_in(
    checkpoint: &CompletedCheckpoint,
    node: &str,
    topic: &str,
    partition: i32,
) -> Option<i64> {
    let (_, &old) = checkpoint.parallelism.get_key_value(node)?;
    (0..old).find_map(|s| {
        let table = checkpoint.state(node, s)?.batches.first()?;
        let topics = table.column_by_name("topic")?.as_string_opt::<i32>()?;
        let parts = table
            .column_by_name("partition")?
            .as_primitive_opt::<Int32Type>()?;
        let next = table
            .column_by_name("next_offset")?
            .as_primitive_opt::<Int64Type>()?;
        (0..table.num_rows())
            .find(|&r| parts.value(r) == partition && topics.value(r) == topic)
            .map(|r| next.value(r))
    })
}

/// Finds the checkpoints pointers name, reading each at most once per
/// round of assignments.
pub struct Resolver<'a> {
    ownership: &'a Ownership,
    latest: HashMap<String, Option<Arc<CompletedCheckpoint>>>,
    named: HashMap<(String, CheckpointId), Option<Arc<CompletedCheckpoint>>>,
}

impl<'a> Resolver<'a> {
    /// A resolver over `ownership`'s storage.
    pub fn new(ownership: &'a Ownership) -> Self {
        Self {
            ownership,
            latest: HashMap::new(),
            named: HashMap::new(),
        }
    }

    /// The checkpoint partition `topic`/`partition` of source `node` goes
    /// on from, given its commit's pointer: the named member's latest that
    /// still holds the partition, else the named one. None when the named
    /// checkpoint is gone (the partition then starts without state).
    pub async fn resolve(
        &mut self,
        pointer: &Pointer,
        node: &str,
        topic: &str,
        partition: i32,
    ) -> Result<Option<Arc<CompletedCheckpoint>>> {
        if pointer.definition != self.ownership.definition {
            return Err(ConnectorError::config(
                "definition",
                format!(
                    "partition {topic}/{partition} was last committed by member {:?} running definition {}, not this process's {}: another pipeline definition shares this consumer group; stop it, or give this pipeline another name",
                    pointer.member, pointer.definition, self.ownership.definition
                ),
            ));
        }
        if !self.latest.contains_key(&pointer.member) {
            let got = read(&self.ownership.store, &pointer.member, None).await?;
            self.latest
                .insert(pointer.member.clone(), got.map(Arc::new));
        }
        if let Some(Some(latest)) = self.latest.get(&pointer.member) {
            if latest.id >= pointer.checkpoint
                && position_in(latest, node, topic, partition).is_some()
            {
                return Ok(Some(latest.clone()));
            }
        }
        let key = (pointer.member.clone(), pointer.checkpoint);
        if !self.named.contains_key(&key) {
            let got = read(
                &self.ownership.store,
                &pointer.member,
                Some(pointer.checkpoint),
            )
            .await?;
            self.named.insert(key.clone(), got.map(Arc::new));
        }
        Ok(self.named.get(&key).cloned().flatten())
    }
}

/// The pointer of `topic`/`partition` in the shared storage, if any.
pub fn read_pointer(
    store: &CheckpointStore,
    topic: &str,
    partition: i32,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Option<Pointer>>> + Send>> {
    let (store, topic) = (store.clone(), topic.to_string());
    Box::pin(async move {
        store
            .pointer(&topic, partition)
            .await
            .map_err(|e| ConnectorError::config("checkpoints", e.to_string()))
    })
}

/// Writes pointers of partitions just committed.
pub fn write_pointers(
    store: &CheckpointStore,
    pointers: Vec<(String, i32, Pointer)>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send>> {
    let store = store.clone();
    Box::pin(async move {
        for (topic, partition, pointer) in pointers {
            store
                .put_pointer(&topic, partition, &pointer)
                .await
                .map_err(|e| ConnectorError::config("checkpoints", e.to_string()))?;
        }
        Ok(())
    })
}

/// Checkpoint `id` of `member`, or its latest. A boxed `'static` future:
/// the store's reads borrow in ways the compiler cannot prove `Send` inside
/// a source's `next`, and a future owning its inputs can be.
fn read(
    store: &CheckpointStore,
    member: &str,
    id: Option<CheckpointId>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Option<CompletedCheckpoint>>> + Send>>
{
    let (store, member) = (store.clone(), member.to_string());
    Box::pin(async move {
        let got = match id {
            Some(id) => store.checkpoint_of(&member, id).await,
            None => store.latest_of(&member).await,
        };
        got.map_err(|e| ConnectorError::config("checkpoints", e.to_string()))
    })
}
