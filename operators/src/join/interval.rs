//! The interval join: rows of two streams with equal keys whose event times
//! are at most a given distance apart.
//!
//! # Semantics
//! A left row `a` and a right row `b` pair when their keys are equal (a null
//! key never equals anything) and `lower <= b.ts - a.ts <= upper`, and the
//! residual condition, if any, holds for the pair. A pair is emitted as soon
//! as its second row arrives, whatever order the rows come in.
//!
//! In a left outer join, a left row that no right row paired with is emitted
//! once, with nulls for the right side, when the watermark has passed
//! `a.ts + upper` (no right row that could pair with it can still come).
//!
//! # State
//! Each side keeps the batches it received (rows stay in Arrow) and, per
//! key, the rows' event times and positions. A left row is kept while
//! `a.ts + upper >= watermark`, a right row while `b.ts - lower >=
//! watermark`: past that, nothing that can still arrive pairs with it. Each
//! side also queues (event time, key) of its rows in arrival order (the
//! left side of a left join in event-time order, a heap); as the watermark
//! advances, the expired front is popped and those keys' expired rows are
//! dropped, so the cost is per expired row, not per key held. A batch is
//! freed when its last row is, a key's slot when its last row is (and
//! reused). So state holds about `span × rate` rows and returns to nothing
//! when the stream ends.
//!
//! # Late rows
//! A row whose event time is behind the watermark when it arrives goes to
//! the `late` output, is counted, and pairs with nothing: rows it should
//! have paired with may already be gone, and a join that answered from part
//! of its state would be silently wrong.
//!
//! # Event time of the output
//! Pairs keep both rows' columns, so their event time may be a buffered
//! row's. While it buffers rows, the operator holds its output watermark
//! the join's reach (`max(upper, -lower)`) behind its input watermark
//! ([`Operator::watermark_hold`]), which no row it can still emit is earlier
//! than; so nothing it emits is late downstream.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::Arc;

use ahash::HashMap;
use arrow::array::{
    new_null_array, Array, ArrayRef, AsArray, BooleanArray, DictionaryArray, Int32Array,
    RecordBatch, UInt32Array,
};
use arrow::compute::{filter_record_batch, interleave, take};
use arrow::datatypes::{Int32Type, SchemaRef, TimestampMillisecondType};
use arrow::row::{RowConverter, SortField};
use datafusion::physical_expr::PhysicalExpr;
use vigil_engine::{
    Collector, EngineError, EventTime, Operator, OperatorFactory, OperatorState, TaskContext,
    TaskMetrics, LATE,
};

use crate::late::split_late;
use crate::sql::{stages::one_line, Stages};

/// Which rows a join emits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinKind {
    /// Pairs only.
    Inner,
    /// Pairs, and left rows that never paired (right side null).
    Left,
}

/// What an interval join does, checked when the pipeline is planned.
#[derive(Debug, Clone)]
pub struct IntervalJoinSpec {
    /// Step name, for errors and `vigil explain`.
    pub name: String,
    /// Text shown by `vigil explain`.
    pub describe: String,
    /// Schema of input 0 (the left side).
    pub left: SchemaRef,
    /// Schema of input 1 (the right side).
    pub right: SchemaRef,
    /// Key columns of the left input, paired with `right_keys`; both sides'
    /// key columns have the same names and types, and the inputs are
    /// hash-partitioned by them.
    pub left_keys: Vec<usize>,
    /// Key columns of the right input.
    pub right_keys: Vec<usize>,
    /// Names of the key columns (the same on both sides).
    pub key_names: Vec<String>,
    /// Event-time column of the left input (millisecond timestamps).
    pub left_time: usize,
    /// Event-time column of the right input.
    pub right_time: usize,
    /// How many leading left columns go to the output.
    pub left_width: usize,
    /// How many leading right columns go to the output.
    pub right_width: usize,
    /// Smallest `b.ts - a.ts` that pairs, ms.
    pub lower_ms: i64,
    /// Largest `b.ts - a.ts` that pairs, ms.
    pub upper_ms: i64,
    /// Inner or left outer.
    pub kind: JoinKind,
    /// Further condition on a pair, over `joined`.
    pub residual: Option<Arc<dyn PhysicalExpr>>,
    /// The pairs' schema: the left's output columns, then the right's.
    pub joined: SchemaRef,
    /// What runs on every batch of pairs before it leaves.
    pub post: Stages,
}

/// Builds interval join subtasks.
#[derive(Debug)]
pub struct IntervalJoinFactory {
    spec: Arc<IntervalJoinSpec>,
}

impl IntervalJoinFactory {
    /// A factory for `spec`.
    pub fn new(spec: IntervalJoinSpec) -> Self {
        Self {
            spec: Arc::new(spec),
        }
    }

    /// Builds one subtask directly (tests, benchmarks).
    pub fn build(&self, ctx: &TaskContext) -> crate::Result<IntervalJoin> {
        let fields = self
            .spec
            .left_keys
            .iter()
            .map(|&k| SortField::new(self.spec.left.field(k).data_type().clone()))
            .collect();
        Ok(IntervalJoin {
            spec: self.spec.clone(),
            converter: RowConverter::new(fields)?,
            keys: HashMap::default(),
            hasher: ahash::RandomState::with_seeds(1, 2, 3, 4),
            slab: Vec::new(),
            free_keys: Vec::new(),
            queues: [VecDeque::new(), VecDeque::new()],
            left_heap: BinaryHeap::new(),
            sides: [Side::default(), Side::default()],
            watermark: EventTime::MIN,
            metrics: ctx.metrics.clone(),
        })
    }
}

impl OperatorFactory for IntervalJoinFactory {
    fn output_schema(&self) -> SchemaRef {
        self.spec.post.output_schema()
    }
    fn create(&self, ctx: &TaskContext) -> vigil_engine::Result<Box<dyn Operator>> {
        Ok(Box::new(self.build(ctx)?))
    }
    fn key_columns(&self) -> Vec<String> {
        self.spec.key_names.clone()
    }
    fn side_outputs(&self) -> Vec<(vigil_engine::operator::SidePort, SchemaRef)> {
        // Late rows of either side leave with the left's schema or the
        // right's; a sink reading `late` takes both.
        vec![(LATE, self.spec.left.clone())]
    }
    fn describe(&self) -> String {
        format!(
            "interval join {} ({} <= right - left <= {} ms) {}",
            match self.spec.kind {
                JoinKind::Inner => "inner",
                JoinKind::Left => "left",
            },
            self.spec.lower_ms,
            self.spec.upper_ms,
            one_line(&self.spec.describe)
        )
    }
}

/// A buffered row: its event time and where it is.
#[derive(Debug, Clone, Copy)]
struct Entry {
    ts: i64,
    slot: u32,
    row: u32,
}

/// No slot.
const NONE: u32 = u32::MAX;

/// Most rows in one output batch.
const OUT_ROWS: usize = 8192;

/// One key's buffered rows. Slots are reused with their allocations, so a
/// key that comes and goes (most addresses do) costs no allocation.
#[derive(Debug)]
struct KeyRows {
    /// The key in arrow's row format; empty in a free slot.
    key: Vec<u8>,
    hash: u64,
    /// The next slot whose key has the same hash.
    next: u32,
    rows: [Vec<Entry>; 2],
}

impl Default for KeyRows {
    fn default() -> Self {
        Self {
            key: Vec::new(),
            hash: 0,
            next: NONE,
            rows: [Vec::new(), Vec::new()],
        }
    }
}

#[derive(Debug)]
struct Stored {
    batch: RecordBatch,
    live: u32,
    /// Left side of a left join: which rows have paired.
    matched: Vec<bool>,
}

/// One side's buffered batches.
#[derive(Debug, Default)]
struct Side {
    slots: Vec<Option<Stored>>,
    free: Vec<u32>,
    rows: usize,
}

impl Side {
    fn store(&mut self, batch: RecordBatch, track_matches: bool) -> u32 {
        let matched = if track_matches {
            vec![false; batch.num_rows()]
        } else {
            Vec::new()
        };
        let stored = Stored {
            batch,
            live: 0,
            matched,
        };
        match self.free.pop() {
            Some(s) => {
                self.slots[s as usize] = Some(stored);
                s
            }
            None => {
                self.slots.push(Some(stored));
                (self.slots.len() - 1) as u32
            }
        }
    }

    fn stored(&self, slot: u32) -> &Stored {
        self.slots[slot as usize]
            .as_ref()
            .expect("an entry's batch is alive while the entry is")
    }

    fn stored_mut(&mut self, slot: u32) -> &mut Stored {
        self.slots[slot as usize]
            .as_mut()
            .expect("an entry's batch is alive while the entry is")
    }

    /// Frees the slot if it holds no rows.
    fn release_if_empty(&mut self, slot: u32) {
        if self.slots[slot as usize]
            .as_ref()
            .is_some_and(|s| s.live == 0)
        {
            self.slots[slot as usize] = None;
            self.free.push(slot);
        }
    }

    /// Bytes the buffered batches hold. A dictionary's values shared by
    /// many batches (as sources hand strings over) count once.
    fn bytes(&self) -> usize {
        let mut shared: ahash::HashSet<*const ()> = ahash::HashSet::default();
        let mut total = 0;
        for s in self.slots.iter().flatten() {
            total += s.matched.len();
            for c in s.batch.columns() {
                total += match c.as_dictionary_opt::<Int32Type>() {
                    Some(d) => {
                        let values = Arc::as_ptr(d.values()) as *const ();
                        d.keys().get_array_memory_size()
                            + if shared.insert(values) {
                                d.values().get_array_memory_size()
                            } else {
                                0
                            }
                    }
                    None => c.get_array_memory_size(),
                };
            }
        }
        total
    }
}

/// Rows of buffered batches, gathered into columns.
fn gather(side: &Side, width: usize, at: &[(u32, u32)]) -> Result<Vec<ArrayRef>, EngineError> {
    // Number the slots used, so interleave sees only those batches.
    let mut used: Vec<u32> = at.iter().map(|&(s, _)| s).collect();
    used.sort_unstable();
    used.dedup();
    let indices: Vec<(usize, usize)> = at
        .iter()
        .map(|&(s, r)| (used.binary_search(&s).unwrap_or(0), r as usize))
        .collect();
    (0..width)
        .map(|c| {
            let arrays: Vec<&dyn Array> = used
                .iter()
                .map(|&s| side.stored(s).batch.column(c).as_ref())
                .collect();
            Ok(match shared_dictionary(&arrays) {
                Some(values) => {
                    // One dictionary under every batch (as sources hand
                    // strings over): gather the keys only. Arrow's
                    // interleave would merge the dictionaries on each call.
                    let keys: Vec<Int32Array> = arrays
                        .iter()
                        .map(|a| a.as_dictionary::<Int32Type>().keys().clone())
                        .collect();
                    let keys: Vec<&dyn Array> = keys.iter().map(|k| k as &dyn Array).collect();
                    let keys = interleave(&keys, &indices)?;
                    Arc::new(DictionaryArray::<Int32Type>::try_new(
                        keys.as_primitive::<Int32Type>().clone(),
                        values,
                    )?)
                }
                None => interleave(&arrays, &indices)?,
            })
        })
        .collect()
}

/// The values of `arrays` if they are all `Int32` dictionaries over one
/// values array.
fn shared_dictionary(arrays: &[&dyn Array]) -> Option<ArrayRef> {
    let first = arrays.first()?.as_dictionary_opt::<Int32Type>()?.values();
    arrays
        .iter()
        .all(|a| {
            a.as_dictionary_opt::<Int32Type>()
                .is_some_and(|d| Arc::ptr_eq(d.values(), first))
        })
        .then(|| first.clone())
}

/// One subtask of an interval join.
pub struct IntervalJoin {
    spec: Arc<IntervalJoinSpec>,
    converter: RowConverter,
    /// Hash of a key → the first slot in `slab` with that hash (the rest
    /// are chained through `KeyRows::next`).
    keys: HashMap<u64, u32>,
    hasher: ahash::RandomState,
    slab: Vec<KeyRows>,
    free_keys: Vec<u32>,
    /// Per side, (event time, key slot) of every buffered row in arrival
    /// order: what a sweep pops as the watermark passes.
    queues: [VecDeque<(i64, u32)>; 2],
    /// The left side of a left join instead pops in event-time order, so a
    /// left row that never paired is emitted as soon as the watermark
    /// passes its bound, even if it arrived out of order.
    left_heap: BinaryHeap<Reverse<(i64, u32)>>,
    sides: [Side; 2],
    watermark: EventTime,
    metrics: Arc<TaskMetrics>,
}

/// Pairs found for one arriving batch: the arriving row and the buffered one.
#[derive(Default)]
struct Pairs {
    arriving: Vec<u32>,
    buffered: Vec<(u32, u32)>,
}

impl IntervalJoin {
    /// Rows buffered on both sides.
    pub fn state_rows(&self) -> usize {
        self.sides[0].rows + self.sides[1].rows
    }

    /// Bytes held: buffered batches, plus the key index.
    pub fn state_bytes(&self) -> usize {
        let index: usize = self
            .slab
            .iter()
            .map(|v| {
                2 * v.key.len()
                    + std::mem::size_of::<KeyRows>()
                    + std::mem::size_of::<u32>()
                    + (v.rows[0].capacity() + v.rows[1].capacity()) * std::mem::size_of::<Entry>()
            })
            .sum();
        let queues =
            (self.queues[0].capacity() + self.queues[1].capacity() + self.left_heap.capacity())
                * std::mem::size_of::<(i64, u32)>();
        self.sides[0].bytes() + self.sides[1].bytes() + index + queues
    }

    /// Keys with buffered rows.
    pub fn state_keys(&self) -> usize {
        self.slab.len() - self.free_keys.len()
    }

    /// The slot of `key`, if it has one.
    fn find(&self, hash: u64, key: &[u8]) -> Option<u32> {
        let mut id = *self.keys.get(&hash)?;
        while id != NONE {
            let k = &self.slab[id as usize];
            if k.key == key {
                return Some(id);
            }
            id = k.next;
        }
        None
    }

    /// A slot for a new key.
    fn add_key(&mut self, hash: u64, key: &[u8]) -> u32 {
        let id = match self.free_keys.pop() {
            Some(id) => id,
            None => {
                self.slab.push(KeyRows::default());
                (self.slab.len() - 1) as u32
            }
        };
        let next = self.keys.insert(hash, id).unwrap_or(NONE);
        let k = &mut self.slab[id as usize];
        k.key.extend_from_slice(key);
        k.hash = hash;
        k.next = next;
        id
    }

    fn width(&self, side: usize) -> usize {
        if side == 0 {
            self.spec.left_width
        } else {
            self.spec.right_width
        }
    }

    /// Joined rows for `pairs` of an arriving batch on `side`.
    fn joined(
        &self,
        side: usize,
        batch: &RecordBatch,
        pairs: &Pairs,
    ) -> Result<RecordBatch, EngineError> {
        let idx = UInt32Array::from(pairs.arriving.clone());
        let arriving: Vec<ArrayRef> = (0..self.width(side))
            .map(|c| take(batch.column(c), &idx, None))
            .collect::<Result<_, _>>()?;
        let other = 1 - side;
        let buffered = gather(&self.sides[other], self.width(other), &pairs.buffered)?;
        let columns = if side == 0 {
            [arriving, buffered].concat()
        } else {
            [buffered, arriving].concat()
        };
        Ok(RecordBatch::try_new(self.spec.joined.clone(), columns)?)
    }

    fn emit(&self, joined: RecordBatch, out: &mut Collector) -> vigil_engine::Result<()> {
        let batch = self
            .spec
            .post
            .run(joined)
            .map_err(|e| EngineError::DataFusion(Box::new(e)))?;
        out.emit(batch);
        Ok(())
    }

    /// Left rows that will never pair, with nulls on the right.
    fn unmatched(&self, mut columns: Vec<ArrayRef>) -> Result<RecordBatch, EngineError> {
        let n = columns.first().map_or(0, |c| c.len());
        for f in self.spec.joined.fields().iter().skip(self.spec.left_width) {
            columns.push(new_null_array(f.data_type(), n));
        }
        Ok(RecordBatch::try_new(self.spec.joined.clone(), columns)?)
    }

    /// Buffers an arriving batch and emits what it pairs with; `probe`
    /// false only buffers (a restored snapshot, whose pairs were emitted).
    fn insert(
        &mut self,
        side: usize,
        batch: RecordBatch,
        probe: bool,
        out: &mut Collector,
    ) -> vigil_engine::Result<()> {
        let spec = self.spec.clone();
        let (time, key_cols) = if side == 0 {
            (spec.left_time, &spec.left_keys)
        } else {
            (spec.right_time, &spec.right_keys)
        };
        let key_arrays: Vec<ArrayRef> = key_cols.iter().map(|&k| batch.column(k).clone()).collect();
        let rows = self.converter.convert_columns(&key_arrays)?;
        let has_nulls = key_arrays.iter().any(|a| a.null_count() > 0);
        let times = batch
            .column(time)
            .as_primitive::<TimestampMillisecondType>();
        let track = side == 0 && spec.kind == JoinKind::Left;
        let slot = self.sides[side].store(batch.clone(), track);
        let other = 1 - side;
        let mut pairs = Pairs::default();
        let mut keyless: Vec<u32> = Vec::new();
        let mut stored = 0u32;
        for i in 0..batch.num_rows() {
            if has_nulls && key_arrays.iter().any(|a| a.is_null(i)) {
                if track {
                    keyless.push(i as u32);
                }
                continue;
            }
            let ts = times.value(i);
            let key = rows.row(i);
            let entry = Entry {
                ts,
                slot,
                row: i as u32,
            };
            let hash = self.hasher.hash_one(key.as_ref());
            let id = match self.find(hash, key.as_ref()) {
                Some(id) => id,
                None => self.add_key(hash, key.as_ref()),
            };
            if track {
                self.left_heap.push(Reverse((ts, id)));
            } else {
                self.queues[side].push_back((ts, id));
            }
            let k = &mut self.slab[id as usize];
            for e in k.rows[other].iter().filter(|_| probe) {
                let d = if side == 0 { e.ts - ts } else { ts - e.ts };
                if d >= spec.lower_ms && d <= spec.upper_ms {
                    pairs.arriving.push(i as u32);
                    pairs.buffered.push((e.slot, e.row));
                }
            }
            k.rows[side].push(entry);
            stored += 1;
        }
        let s = &mut self.sides[side];
        s.stored_mut(slot).live = stored;
        s.rows += stored as usize;
        if !keyless.is_empty() && probe {
            // A null key pairs with nothing: the row is unmatched already.
            let idx = UInt32Array::from(keyless);
            let columns = (0..spec.left_width)
                .map(|c| take(batch.column(c), &idx, None))
                .collect::<Result<_, _>>()?;
            let batch = self.unmatched(columns)?;
            self.emit(batch, out)?;
        }
        self.sides[side].release_if_empty(slot);
        // Pairs leave in batches of a bounded size: a burst of matches
        // neither makes one huge batch downstream nor churns huge buffers.
        for (a, b) in pairs
            .arriving
            .chunks(OUT_ROWS)
            .zip(pairs.buffered.chunks(OUT_ROWS))
        {
            let chunk = Pairs {
                arriving: a.to_vec(),
                buffered: b.to_vec(),
            };
            self.emit_pairs(side, slot, &batch, chunk, out)?;
        }
        Ok(())
    }

    /// Builds, checks and emits one batch of pairs of an arriving batch.
    fn emit_pairs(
        &mut self,
        side: usize,
        slot: u32,
        batch: &RecordBatch,
        mut pairs: Pairs,
        out: &mut Collector,
    ) -> vigil_engine::Result<()> {
        let spec = self.spec.clone();
        let mut joined = self.joined(side, batch, &pairs)?;
        if let Some(residual) = &spec.residual {
            let keep = residual
                .evaluate(&joined)
                .and_then(|v| v.into_array(joined.num_rows()))
                .map_err(|e| EngineError::DataFusion(Box::new(e)))?;
            let keep = keep.as_boolean().clone();
            if keep.true_count() < joined.num_rows() {
                joined = filter_record_batch(&joined, &keep)?;
                let mut kept = Pairs::default();
                for (i, k) in keep.iter().enumerate() {
                    if k == Some(true) {
                        kept.arriving.push(pairs.arriving[i]);
                        kept.buffered.push(pairs.buffered[i]);
                    }
                }
                pairs = kept;
            }
        }
        if spec.kind == JoinKind::Left {
            if side == 0 {
                let s = self.sides[0].stored_mut(slot);
                for &i in &pairs.arriving {
                    s.matched[i as usize] = true;
                }
            } else {
                for &(slot, row) in &pairs.buffered {
                    self.sides[0].stored_mut(slot).matched[row as usize] = true;
                }
            }
        }
        self.emit(joined, out)
    }

    /// Drops rows nothing can pair with any more; a left join emits the
    /// left ones that never paired.
    fn sweep(&mut self, watermark: EventTime, out: &mut Collector) -> vigil_engine::Result<()> {
        let (lower, upper) = (self.spec.lower_ms, self.spec.upper_ms);
        let left_join = self.spec.kind == JoinKind::Left;
        let mut unmatched: Vec<(u32, u32)> = Vec::new();
        let mut dropped: [Vec<u32>; 2] = [Vec::new(), Vec::new()];
        let expired = |side: usize, ts: i64| {
            if side == 0 {
                ts.saturating_add(upper) < watermark
            } else {
                ts.saturating_sub(lower) < watermark
            }
        };
        let Self {
            keys,
            slab,
            free_keys,
            queues,
            left_heap,
            sides,
            ..
        } = self;
        for side in 0..2 {
            let heap = side == 0 && left_join;
            loop {
                let next = if heap {
                    left_heap.peek().map(|r| r.0)
                } else {
                    queues[side].front().copied()
                };
                let Some((_, id)) = next.filter(|(ts, _)| expired(side, *ts)) else {
                    break;
                };
                if heap {
                    left_heap.pop();
                } else {
                    queues[side].pop_front();
                }
                let k = &mut slab[id as usize];
                let rows = &mut k.rows[side];
                if side == 0 && left_join {
                    // Every expired row of the key, to emit the unmatched
                    // ones now.
                    rows.retain(|e| {
                        if !expired(side, e.ts) {
                            return true;
                        }
                        if !sides[0].stored(e.slot).matched[e.row as usize] {
                            unmatched.push((e.slot, e.row));
                        }
                        dropped[side].push(e.slot);
                        false
                    });
                } else {
                    // A key's rows are in arrival order, which is event-time
                    // order up to the sources' disorder: the expired ones are
                    // a prefix, and one held behind a later row goes with it
                    // (it can no longer pair: probes check the bounds).
                    let n = rows.iter().take_while(|e| expired(side, e.ts)).count();
                    dropped[side].extend(rows.drain(..n).map(|e| e.slot));
                }
                if k.rows[0].is_empty() && k.rows[1].is_empty() && !k.key.is_empty() {
                    k.key.clear();
                    let (hash, next) = (k.hash, k.next);
                    // Unlink from its hash chain.
                    if keys.get(&hash) == Some(&id) {
                        if next == NONE {
                            keys.remove(&hash);
                        } else {
                            keys.insert(hash, next);
                        }
                    } else if let Some(&head) = keys.get(&hash) {
                        let mut at = head;
                        while at != NONE && slab[at as usize].next != id {
                            at = slab[at as usize].next;
                        }
                        if at != NONE {
                            slab[at as usize].next = next;
                        }
                    }
                    free_keys.push(id);
                }
            }
        }
        unmatched.sort_unstable();
        for chunk in unmatched.chunks(OUT_ROWS) {
            let columns = gather(&self.sides[0], self.spec.left_width, chunk)?;
            let batch = self.unmatched(columns)?;
            self.emit(batch, out)?;
        }
        for (s, dropped) in self.sides.iter_mut().zip(dropped.iter_mut()) {
            s.rows -= dropped.len();
            for &slot in dropped.iter() {
                s.stored_mut(slot).live -= 1;
            }
            dropped.sort_unstable();
            dropped.dedup();
            for &slot in dropped.iter() {
                s.release_if_empty(slot);
            }
            if s.rows == 0 {
                s.slots.clear();
                s.free.clear();
            }
        }
        if self.keys.capacity() > 64 && self.keys.len() < self.keys.capacity() / 4 {
            self.keys.shrink_to_fit();
        }
        if self.keys.is_empty() {
            self.slab.clear();
            self.free_keys.clear();
        }
        Ok(())
    }
}

impl Operator for IntervalJoin {
    fn process_batch(
        &mut self,
        input: usize,
        batch: RecordBatch,
        out: &mut Collector,
    ) -> vigil_engine::Result<()> {
        if input > 1 {
            return Err(EngineError::Internal(format!(
                "join {}: input {input} of 2",
                self.spec.name
            )));
        }
        let time = if input == 0 {
            self.spec.left_time
        } else {
            self.spec.right_time
        };
        let batch = split_late(batch, time, self.watermark, &self.metrics, out)?;
        if batch.num_rows() == 0 {
            return Ok(());
        }
        self.insert(input, batch, true, out)
    }

    fn on_watermark(
        &mut self,
        watermark: EventTime,
        out: &mut Collector,
    ) -> vigil_engine::Result<()> {
        if watermark > self.watermark {
            self.watermark = watermark;
            self.sweep(watermark, out)?;
        }
        Ok(())
    }

    fn watermark_hold(&self) -> Option<EventTime> {
        // A buffered row still emitted is at most `reach` behind the
        // watermark: a pair's buffered row is within the bounds of a row on
        // time, and a left row that never paired is emitted by the sweep
        // that runs as soon as the watermark passes ts + upper.
        let reach = self.spec.upper_ms.max(-self.spec.lower_ms).max(0);
        (self.state_rows() > 0).then(|| self.watermark.saturating_sub(reach))
    }

    fn state_size(&self) -> vigil_engine::StateSize {
        let batches: usize = self
            .sides
            .iter()
            .flat_map(|s| s.slots.iter().flatten())
            .map(|s| s.batch.get_array_memory_size() + s.matched.len())
            .sum();
        let keys: usize = self
            .slab
            .iter()
            .map(|k| {
                k.key.capacity()
                    + std::mem::size_of::<KeyRows>()
                    + (k.rows[0].capacity() + k.rows[1].capacity()) * std::mem::size_of::<Entry>()
            })
            .sum();
        let queues = (self.queues[0].len() + self.queues[1].len() + self.left_heap.len()) * 16;
        vigil_engine::StateSize {
            keys: self.keys.len() as u64,
            bytes: (batches + keys + queues) as u64,
        }
    }

    fn snapshot(&mut self) -> vigil_engine::Result<OperatorState> {
        // Each side's buffered rows as one table; the left's pairing marks
        // ride along as a boolean column.
        let mut batches = Vec::with_capacity(2);
        for side in 0..2 {
            let mut at: Vec<(u32, u32)> = self
                .slab
                .iter()
                .flat_map(|k| k.rows[side].iter().map(|e| (e.slot, e.row)))
                .collect();
            at.sort_unstable();
            let schema = if side == 0 {
                &self.spec.left
            } else {
                &self.spec.right
            };
            let mut columns = if at.is_empty() {
                schema
                    .fields()
                    .iter()
                    .map(|f| new_null_array(f.data_type(), 0))
                    .collect()
            } else {
                gather(&self.sides[side], schema.fields().len(), &at)?
            };
            let matched: BooleanArray = at
                .iter()
                .map(|&(s, r)| {
                    let m = &self.sides[side].stored(s).matched;
                    Some(m.get(r as usize).copied().unwrap_or(false))
                })
                .collect();
            columns.push(Arc::new(matched));
            let mut fields: Vec<_> = schema.fields().iter().cloned().collect();
            fields.push(Arc::new(arrow::datatypes::Field::new(
                "__vigil_matched",
                arrow::datatypes::DataType::Boolean,
                false,
            )));
            let schema = Arc::new(arrow::datatypes::Schema::new(fields));
            let table = RecordBatch::try_new(schema, columns)?;
            let key_cols = if side == 0 {
                &self.spec.left_keys
            } else {
                &self.spec.right_keys
            };
            let keys: Vec<ArrayRef> = key_cols.iter().map(|&k| table.column(k).clone()).collect();
            batches.push(vigil_engine::key_group::tag(table, &keys)?);
        }
        Ok(OperatorState { batches })
    }

    fn restore(&mut self, state: OperatorState) -> vigil_engine::Result<()> {
        if state.batches.len() != 2 {
            return Err(EngineError::Internal(format!(
                "join {}: a snapshot has 2 tables, this one {}",
                self.spec.name,
                state.batches.len()
            )));
        }
        // Restores add up (one per old subtask after a rescale).
        let mut sink = Collector::new();
        for (side, table) in state.batches.into_iter().enumerate() {
            let width = table.num_columns() - 1;
            let matched = table.column(width).as_boolean().clone();
            let schema = if side == 0 {
                self.spec.left.clone()
            } else {
                self.spec.right.clone()
            };
            let batch = RecordBatch::try_new(schema, table.columns()[..width].to_vec())?;
            // Buffer without pairing: the pairs were emitted before.
            // The slot `store` gives the batch: a freed one first (an empty
            // table restored before is freed at once).
            let s = &self.sides[side];
            let slot = s.free.last().copied().unwrap_or(s.slots.len() as u32);
            self.insert(side, batch, false, &mut sink)?;
            if side == 0 && self.spec.kind == JoinKind::Left {
                for k in &self.slab {
                    for e in k.rows[0].iter().filter(|e| e.slot == slot) {
                        let m = matched.value(e.row as usize);
                        self.sides[0].stored_mut(e.slot).matched[e.row as usize] = m;
                    }
                }
            }
        }
        Ok(())
    }
}
