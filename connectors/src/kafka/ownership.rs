//! Partitions that move between processes take their position, and for a
//! repartition topic their keyed state, with them (see `docs/scale-out.md`,
//! "State follows partitions").
//!
//! Every offset a process commits comes with a **pointer**,
//! `<member>/<checkpoint>/<fingerprint>`: the checkpoint of the committing
//! process that holds the partition's state at that offset. The pointer is
//! written to the shared checkpoint storage (`partitions/<topic>/<n>`) when
//! the checkpoint completes, and also rides in the commit's metadata for
//! brokers that keep it (tansu does not, which is why the storage holds the
//! copy that is read). Kafka refuses the commits of a rebalancing group's
//! members, including of partitions they keep, so a refused commit still
//! writes its pointers: the checkpoint's output is committed, and the
//! partition must go on from it. The storage fences instead: a process
//! writes over a pointer only if it is the one the partition had when the
//! process took it, or one of its own member's, so a zombie cannot write
//! over its successor's.
//!
//! A process that is assigned a partition reads the pointer and takes the
//! partition from the **newest** checkpoint of the named member, at or
//! after the named one, that still holds the partition: a process can die
//! after storing a checkpoint and before committing it (its successor
//! under the same member name finishes that checkpoint's sink commits), or
//! have its hand-over commit refused by a rebalance, and either way its
//! sinks' output reaches that checkpoint, so the partition must go on from
//! there. A member's checkpoint holds a partition only while the member
//! owns it: the hand-over checkpoint is the last one.
//!
//! A repartition reader's pointers also publish each partition's
//! watermark at the checkpoint, which the other readers are held below
//! (see `KafkaSource::read_floor`).

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::AsArray;
use arrow::datatypes::{Int32Type, Int64Type};
use vigil_engine::{CheckpointId, CheckpointStore, CompletedCheckpoint};

use crate::error::{ConnectorError, Result};

/// A boxed `'static` future of the storage (see [`read`]).
type Boxed<T> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<T>> + Send>>;

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

/// Whether a process of `member`, which took the partition when its
/// pointer was `taken_from`, may write over the partition's `current`
/// pointer: only if nobody has written one, or it is still the one the
/// process took the partition from, or one of `member`'s own (a restart
/// under the same member name is the same owner). Anything else was
/// written by a process that has taken the partition since.
pub fn may_write_over(
    current: Option<&Pointer>,
    taken_from: Option<&Pointer>,
    member: &str,
) -> bool {
    match current {
        None => true,
        Some(c) => c.member == member || taken_from == Some(c),
    }
}

/// Finds the checkpoints pointers name, reading each at most once per
/// round of assignments.
pub struct Resolver<'a> {
    ownership: &'a Ownership,
    ids: HashMap<String, Vec<CheckpointId>>,
    named: HashMap<(String, CheckpointId), Option<Arc<CompletedCheckpoint>>>,
}

impl<'a> Resolver<'a> {
    /// A resolver over `ownership`'s storage.
    pub fn new(ownership: &'a Ownership) -> Self {
        Self {
            ownership,
            ids: HashMap::new(),
            named: HashMap::new(),
        }
    }

    /// The checkpoint partition `topic`/`partition` of source `node` goes
    /// on from, given its commit's pointer: the named member's newest
    /// checkpoint at or after the named one that still holds the
    /// partition. None when the named checkpoint is gone (the partition
    /// then starts without state).
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
        if !self.ids.contains_key(&pointer.member) {
            let got = ids(&self.ownership.store, &pointer.member).await?;
            self.ids.insert(pointer.member.clone(), got);
        }
        let later: Vec<CheckpointId> = self.ids[&pointer.member]
            .iter()
            .rev()
            .copied()
            .filter(|&id| id > pointer.checkpoint)
            .collect();
        // Newest first: the member may have stored later checkpoints that
        // still hold the partition (it died before committing them), and
        // after those, ones that no longer do (it handed the partition over).
        for id in later.into_iter().chain([pointer.checkpoint]) {
            let key = (pointer.member.clone(), id);
            if !self.named.contains_key(&key) {
                let got = read(&self.ownership.store, &pointer.member, id).await?;
                self.named.insert(key.clone(), got.map(Arc::new));
            }
            if let Some(Some(c)) = self.named.get(&key) {
                if id == pointer.checkpoint || position_in(c, node, topic, partition).is_some() {
                    return Ok(Some(c.clone()));
                }
            }
        }
        Ok(None)
    }
}

/// Ids of `member`'s checkpoints, oldest first.
fn ids(store: &CheckpointStore, member: &str) -> Boxed<Vec<CheckpointId>> {
    let (store, member) = (store.clone(), member.to_string());
    Box::pin(async move {
        store
            .ids_of(&member)
            .await
            .map_err(|e| ConnectorError::config("checkpoints", e.to_string()))
    })
}

/// The pointer of `topic`/`partition` in the shared storage, if any.
pub fn read_pointer(
    store: &CheckpointStore,
    topic: &str,
    partition: i32,
) -> Boxed<Option<Pointer>> {
    let (store, topic) = (store.clone(), topic.to_string());
    Box::pin(async move {
        store
            .pointer(&topic, partition)
            .await
            .map_err(|e| ConnectorError::config("checkpoints", e.to_string()))
    })
}

/// The pointers of every partition of `topic` that has one.
pub fn read_pointers(store: &CheckpointStore, topic: &str) -> Boxed<Vec<(i32, Pointer)>> {
    let (store, topic) = (store.clone(), topic.to_string());
    Box::pin(async move {
        store
            .pointers(&topic)
            .await
            .map_err(|e| ConnectorError::config("checkpoints", e.to_string()))
    })
}

/// Writes pointers of partitions just committed.
pub fn write_pointers(store: &CheckpointStore, pointers: Vec<(String, i32, Pointer)>) -> Boxed<()> {
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

/// Checkpoint `id` of `member`. A boxed `'static` future: the store's
/// reads borrow in ways the compiler cannot prove `Send` inside a source's
/// `next`, and a future owning its inputs can be.
fn read(
    store: &CheckpointStore,
    member: &str,
    id: CheckpointId,
) -> Boxed<Option<CompletedCheckpoint>> {
    let (store, member) = (store.clone(), member.to_string());
    Box::pin(async move {
        store
            .checkpoint_of(&member, id)
            .await
            .map_err(|e| ConnectorError::config("checkpoints", e.to_string()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pointer(text: &str) -> Pointer {
        Pointer::parse(text).expect("a pointer")
    }

    #[test]
    fn a_pointer_is_written_over_only_by_its_owner_or_the_process_that_took_it_over() {
        let a7 = pointer("a/7/f");
        let b3 = pointer("b/3/f");
        let b9 = pointer("b/9/f");
        // The first owner of a partition nobody has checkpointed.
        assert!(may_write_over(None, None, "a"));
        // Its own pointers, including a predecessor's under the same name.
        assert!(may_write_over(Some(&a7), None, "a"));
        // The process that took the partition from b/3 goes on over it.
        assert!(may_write_over(Some(&b3), Some(&b3), "a"));
        // a took the partition from b/3, and b has written b/9 since: b
        // took it back (b -> a -> b), and a, now a zombie, leaves it alone.
        assert!(!may_write_over(Some(&b9), Some(&b3), "a"));
        // b, which took the partition from nobody, is fenced by a's.
        assert!(!may_write_over(Some(&a7), None, "b"));
    }
}
