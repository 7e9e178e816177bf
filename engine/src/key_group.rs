//! Key groups: the unit keyed state moves in when a pipeline is rescaled.
//!
//! A key hashes to one of [`KEY_GROUPS`] groups, and a node of parallelism
//! `p` gives subtask `s` the contiguous range of groups `g` with
//! `g * p / KEY_GROUPS == s`. Routing records and tagging state rows use the
//! same two functions, so after a restore at another parallelism every state
//! row lands on the subtask that will receive its key's records. This is
//! Flink's scheme: the number of groups is the maximum parallelism of a keyed
//! node, fixed for the life of its state, while the parallelism itself can
//! change from one run to the next.
//!
//! Keyed state tables carry their group in a [`KEY_GROUP_COLUMN`] column
//! ([`tag`]); the runtime keeps the rows of the groups a subtask owns and
//! drops the column before the operator sees the table.
//!
//! Hashing is DataFusion's, with its fixed repartitioning seed, over the key
//! columns in order, so it is stable across runs and processes. View string
//! and binary arrays are hashed as their plain counterparts, so a key hashes
//! the same whichever of the two layouts carries it.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, UInt16Array, UInt32Array};
use arrow::compute::{cast, filter_record_batch, take_record_batch};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use datafusion::common::hash_utils::create_hashes;
use datafusion::physical_plan::repartition::REPARTITION_RANDOM_STATE;

use crate::error::{EngineError, Result};

/// Number of key groups, which is also the highest parallelism of a keyed node.
pub const KEY_GROUPS: usize = 128;

/// Name of the key-group column of a keyed state table.
pub const KEY_GROUP_COLUMN: &str = "__key_group";

fn plain(array: &ArrayRef) -> Result<ArrayRef> {
    Ok(match array.data_type() {
        DataType::Utf8View => cast(array, &DataType::Utf8)?,
        DataType::BinaryView => cast(array, &DataType::Binary)?,
        _ => array.clone(),
    })
}

/// The key group of every row whose key columns are `keys`.
pub fn groups(keys: &[ArrayRef], rows: usize) -> Result<Vec<u16>> {
    let arrays = keys.iter().map(plain).collect::<Result<Vec<_>>>()?;
    let mut hashes = vec![0u64; rows];
    create_hashes(
        &arrays,
        REPARTITION_RANDOM_STATE.random_state(),
        &mut hashes,
    )?;
    Ok(hashes
        .into_iter()
        .map(|h| (h % KEY_GROUPS as u64) as u16)
        .collect())
}

/// The subtask of a node of `parallelism` that owns key group `group`.
pub fn subtask_of(group: u16, parallelism: usize) -> usize {
    group as usize * parallelism / KEY_GROUPS
}

/// Checks that a keyed node's parallelism fits the key groups.
pub fn check_parallelism(node: &str, parallelism: usize) -> Result<()> {
    if parallelism > KEY_GROUPS {
        return Err(EngineError::User(format!(
            "node {node:?}: a keyed step runs at most {KEY_GROUPS} subtasks, not {parallelism}"
        )));
    }
    Ok(())
}

/// Row indices of `batch` per subtask of `parallelism`, by the key columns
/// at `key_columns`.
pub fn route(
    batch: &RecordBatch,
    key_columns: &[usize],
    parallelism: usize,
) -> Result<Vec<Vec<u32>>> {
    let keys: Vec<ArrayRef> = key_columns
        .iter()
        .map(|&i| batch.column(i).clone())
        .collect();
    let mut out = vec![Vec::new(); parallelism.max(1)];
    for (row, g) in groups(&keys, batch.num_rows())?.into_iter().enumerate() {
        out[subtask_of(g, parallelism)].push(row as u32);
    }
    Ok(out)
}

/// `batch` split into one batch per subtask of `parallelism` by the key
/// columns named `keys` (empty batches for subtasks that get nothing).
pub fn split(batch: &RecordBatch, keys: &[&str], parallelism: usize) -> Result<Vec<RecordBatch>> {
    let idx = keys
        .iter()
        .map(|k| batch.schema().index_of(k).map_err(EngineError::from))
        .collect::<Result<Vec<_>>>()?;
    route(batch, &idx, parallelism)?
        .into_iter()
        .map(|rows| Ok(take_record_batch(batch, &UInt32Array::from(rows))?))
        .collect()
}

/// `table` with a [`KEY_GROUP_COLUMN`] column computed from `keys`, one key
/// per row of the table: the runtime then gives each row to the subtask that
/// owns its key when state is restored.
pub fn tag(table: RecordBatch, keys: &[ArrayRef]) -> Result<RecordBatch> {
    let groups = UInt16Array::from(groups(keys, table.num_rows())?);
    let mut fields: Vec<Arc<Field>> = table.schema().fields().iter().cloned().collect();
    fields.push(Arc::new(Field::new(
        KEY_GROUP_COLUMN,
        DataType::UInt16,
        false,
    )));
    let mut columns = table.columns().to_vec();
    columns.push(Arc::new(groups));
    Ok(RecordBatch::try_new(
        Arc::new(Schema::new_with_metadata(
            fields,
            table.schema().metadata().clone(),
        )),
        columns,
    )?)
}

/// The rows of a state table that subtask `subtask` of `parallelism` owns,
/// without the key-group column; tables without one (operator-wide state)
/// are returned whole.
pub fn owned(table: &RecordBatch, subtask: usize, parallelism: usize) -> Result<RecordBatch> {
    let Ok(i) = table.schema().index_of(KEY_GROUP_COLUMN) else {
        return Ok(table.clone());
    };
    let groups = table
        .column(i)
        .as_primitive::<arrow::datatypes::UInt16Type>();
    let keep: arrow::array::BooleanArray = groups
        .iter()
        .map(|g| Some(g.is_some_and(|g| subtask_of(g, parallelism) == subtask)))
        .collect();
    let mut kept = filter_record_batch(table, &keep)?;
    kept.remove_column(i);
    Ok(kept)
}

/// The rows of a keyed state table whose key group satisfies `keep`, with
/// the key-group column kept; tables without one are returned whole.
pub fn select(table: &RecordBatch, keep: impl Fn(u16) -> bool) -> Result<RecordBatch> {
    let Ok(i) = table.schema().index_of(KEY_GROUP_COLUMN) else {
        return Ok(table.clone());
    };
    let groups = table
        .column(i)
        .as_primitive::<arrow::datatypes::UInt16Type>();
    let mask: arrow::array::BooleanArray =
        groups.iter().map(|g| Some(g.is_some_and(&keep))).collect();
    Ok(filter_record_batch(table, &mask)?)
}

/// True when a state table carries key groups.
pub fn is_keyed(table: &RecordBatch) -> bool {
    table.schema().index_of(KEY_GROUP_COLUMN).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray, StringViewArray};

    #[test]
    fn every_group_has_one_owner_and_ranges_are_contiguous() {
        for p in [1, 2, 3, 5, 7, 128] {
            let owners: Vec<usize> = (0..KEY_GROUPS as u16).map(|g| subtask_of(g, p)).collect();
            assert!(owners.windows(2).all(|w| w[0] <= w[1]));
            assert_eq!(owners[0], 0);
            assert_eq!(owners[KEY_GROUPS - 1], p - 1);
            for s in 0..p {
                assert!(owners.contains(&s), "subtask {s} of {p} owns no group");
            }
        }
    }

    #[test]
    fn tagged_state_follows_routed_records_at_any_parallelism() {
        let users: Vec<String> = (0..500).map(|i| format!("user{i}")).collect();
        let schema = Arc::new(Schema::new(vec![
            Field::new("user", DataType::Utf8, false),
            Field::new("n", DataType::Int64, false),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(users.clone())),
                Arc::new(Int64Array::from_iter_values(0..500)),
            ],
        )
        .expect("batch");
        // State keyed by the same values, carried as a view array.
        let view: ArrayRef = Arc::new(StringViewArray::from_iter_values(users.iter()));
        let tagged = tag(batch.clone(), &[view]).expect("tag");
        for p in [1, 2, 3] {
            let routed = split(&batch, &["user"], p).expect("split");
            for (s, part) in routed.iter().enumerate() {
                let mine = owned(&tagged, s, p).expect("owned");
                assert_eq!(mine.num_columns(), 2);
                assert_eq!(mine, *part, "subtask {s} of {p}");
            }
            assert_eq!(routed.iter().map(|b| b.num_rows()).sum::<usize>(), 500);
        }
    }
}
