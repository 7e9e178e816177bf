//! The lookup join: each row of a stream looks its key up in a table that
//! changes while the stream runs (threat intel, asset inventory).
//!
//! # Semantics
//! A row matches the table row whose key equals its key (`exact`), or whose
//! key is the longest CIDR block containing its address (`cidr`; a bare
//! address in the table is a /32 or /128). A row sees the table as it is
//! when the row is processed: an indicator that arrives at 10:02 applies to
//! rows processed after 10:02, whatever their event time. That is what a
//! feed of indicators means (nobody can know an indicator before it is
//! published), and it keeps the join stateless over the stream.
//!
//! Left joins (the default) keep unmatched rows with nulls in the table's
//! columns; inner joins drop them. When both the stream and the table have
//! `tenant_id`, a row only matches its own tenant's table rows; a table
//! without `tenant_id` is global (one intel list for every tenant).
//!
//! # State
//! The table is shared by the join's subtasks: its rows stay in the Arrow
//! batches they arrived in, indexed by a hash of (tenant, key) and, for
//! `cidr`, one hash map per prefix length present, probed longest first.
//! Upserts and deletes from a compacted topic change the index in place;
//! rows they replace are compacted away once they outnumber the live ones.
//! Table rows whose key cannot be used (an invalid CIDR) are skipped with a
//! warning naming the table and key, and counted as dead letters.

use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

use ahash::{HashMap, RandomState};
use arrow::array::{
    new_null_array, Array, ArrayRef, AsArray, RecordBatch, StringArray, UInt32Array,
};
use arrow::compute::{cast, interleave, take};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use parking_lot::{Mutex, RwLock};
use vigil_engine::{
    Collector, EngineError, Operator, OperatorFactory, TableFeed, TableUpdate, TaskContext,
};

use crate::error::{OperatorError, Result};

/// How a row's key finds its table row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MatchMode {
    /// Equal keys.
    Exact,
    /// The row's address inside the table's CIDR block (longest prefix).
    Cidr,
}

/// What a lookup join does, checked when the pipeline is planned.
#[derive(Debug, Clone)]
pub struct LookupSpec {
    /// Step name.
    pub name: String,
    /// The stream's columns.
    pub stream: SchemaRef,
    /// The stream's key column.
    pub on: usize,
    /// Exact or CIDR.
    pub mode: MatchMode,
    /// Drop rows without a match.
    pub inner: bool,
    /// The table's columns.
    pub table: SchemaRef,
    /// The table's key column.
    pub table_key: usize,
    /// Tenant columns of the stream and the table, when both have one.
    pub tenant: Option<(usize, usize)>,
    /// Table columns added to each row.
    pub table_columns: Vec<usize>,
    /// The stream's columns, then the added ones (nullable).
    pub output: SchemaRef,
}

impl LookupSpec {
    /// Checks the columns; `prefix` goes before every added column's name.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: &str,
        stream: SchemaRef,
        on: &str,
        mode: MatchMode,
        inner: bool,
        table: SchemaRef,
        key: &str,
        prefix: &str,
        cross_tenant: bool,
    ) -> Result<Self> {
        let on_idx = stream
            .index_of(on)
            .map_err(|_| OperatorError::unknown_column("on", on, &stream))?;
        let table_key = table
            .index_of(key)
            .map_err(|_| OperatorError::unknown_column("table.key", key, &table))?;
        let tenant = match (
            stream.index_of(crate::correlate::TENANT),
            table.index_of(crate::correlate::TENANT),
        ) {
            (Ok(s), Ok(t)) if !cross_tenant => Some((s, t)),
            _ => None,
        };
        let table_columns: Vec<usize> = (0..table.fields().len())
            .filter(|&i| tenant.is_none_or(|(_, t)| t != i))
            .collect();
        let mut fields: Vec<Field> = stream.fields().iter().map(|f| f.as_ref().clone()).collect();
        for &i in &table_columns {
            let f = table.field(i);
            let out = format!("{prefix}{}", f.name());
            if fields.iter().any(|s| s.name() == &out) {
                return Err(OperatorError::config(
                    "prefix",
                    format!(
                        "table column {:?} would become {out:?}, which the stream already has",
                        f.name()
                    ),
                    Some("set a prefix for the table's columns, e.g. prefix: intel_".into()),
                ));
            }
            fields.push(Field::new(out, f.data_type().clone(), true));
        }
        Ok(Self {
            name: name.to_string(),
            stream,
            on: on_idx,
            mode,
            inner,
            table,
            table_key,
            tenant,
            table_columns,
            output: Arc::new(Schema::new(fields)),
        })
    }
}

/// Where a table row is: chunk and row.
type Pos = (u32, u32);

/// The blocks of one family and prefix length: (network, tenant hash) → rows.
type Blocks = HashMap<(u128, u64), Vec<Pos>>;

/// One parsed CIDR block: family, prefix length, masked network.
fn parse_cidr(text: &str) -> Option<(bool, u8, u128)> {
    let (addr, len) = match text.split_once('/') {
        Some((a, l)) => (a, Some(l.trim().parse::<u8>().ok()?)),
        None => (text, None),
    };
    let ip = IpAddr::from_str(addr.trim()).ok()?;
    let (v6, bits, value) = match ip {
        IpAddr::V4(a) => (false, 32u8, u32::from(a) as u128),
        IpAddr::V6(a) => (true, 128u8, u128::from(a)),
    };
    let len = len.unwrap_or(bits);
    if len > bits {
        return None;
    }
    Some((v6, len, mask(value, bits, len)))
}

fn mask(value: u128, bits: u8, len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        let shift = bits - len;
        (value >> shift) << shift
    }
}

fn address(text: &str) -> Option<(bool, u128)> {
    match IpAddr::from_str(text.trim()).ok()? {
        IpAddr::V4(a) => Some((false, u32::from(a) as u128)),
        IpAddr::V6(a) => Some((true, u128::from(a))),
    }
}

/// The table and its indexes.
#[derive(Default)]
pub struct LookupTable {
    chunks: Vec<RecordBatch>,
    keys: Vec<StringArray>,
    tenants: Vec<Option<StringArray>>,
    /// hash(tenant, key) → rows with that hash (verified on use).
    exact: HashMap<u64, Vec<Pos>>,
    /// Per (family, prefix length), longest first: (network, tenant hash) → row.
    cidr: Vec<((bool, u8), Blocks)>,
    live: usize,
    dead: usize,
    rejected: usize,
}

/// A fixed hasher, so the index does not depend on the process.
fn hasher() -> RandomState {
    RandomState::with_seeds(0x7669_6769_6c00_0001, 2, 3, 4)
}

impl LookupTable {
    /// Rows the table holds.
    pub fn len(&self) -> usize {
        self.live
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Rows held, and the bytes of their batches and indexes.
    pub fn size(&self) -> vigil_engine::StateSize {
        let chunks: usize = self.chunks.iter().map(|c| c.get_array_memory_size()).sum();
        let exact = self.exact.len() * (8 + 24) + self.live * std::mem::size_of::<Pos>();
        let cidr: usize = self.cidr.iter().map(|(_, b)| b.len() * 64).sum();
        vigil_engine::StateSize {
            keys: self.live as u64,
            bytes: (chunks + exact + cidr) as u64,
        }
    }

    fn key_at(&self, (c, r): Pos) -> &str {
        self.keys[c as usize].value(r as usize)
    }

    fn tenant_at(&self, (c, r): Pos) -> Option<&str> {
        self.tenants[c as usize]
            .as_ref()
            .map(|t| t.value(r as usize))
    }

    fn find(&self, h: u64, tenant: Option<&str>, key: &str) -> Option<(usize, Pos)> {
        self.exact.get(&h).and_then(|v| {
            v.iter()
                .enumerate()
                .find(|(_, p)| self.key_at(**p) == key && self.tenant_at(**p) == tenant)
                .map(|(i, p)| (i, *p))
        })
    }

    fn remove(&mut self, spec: &LookupSpec, h: u64, tenant: Option<&str>, key: &str) {
        let Some((i, pos)) = self.find(h, tenant, key) else {
            return;
        };
        if let Some(v) = self.exact.get_mut(&h) {
            v.swap_remove(i);
            if v.is_empty() {
                self.exact.remove(&h);
            }
        }
        if spec.mode == MatchMode::Cidr {
            if let Some((v6, len, net)) = parse_cidr(key) {
                let th = tenant_hash(tenant);
                if let Some((_, m)) = self.cidr.iter_mut().find(|(k, _)| *k == (v6, len)) {
                    if let Some(v) = m.get_mut(&(net, th)) {
                        v.retain(|p| *p != pos);
                        if v.is_empty() {
                            m.remove(&(net, th));
                        }
                    }
                }
            }
        }
        self.live -= 1;
        self.dead += 1;
    }

    /// Inserts a batch of rows, each replacing the row with its key.
    fn upsert(&mut self, spec: &LookupSpec, batch: RecordBatch) -> Result<(), EngineError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let keys = cast(batch.column(spec.table_key), &DataType::Utf8)?;
        let keys = keys.as_string::<i32>().clone();
        let tenants = match spec.tenant {
            Some((_, t)) => Some(
                cast(batch.column(t), &DataType::Utf8)?
                    .as_string::<i32>()
                    .clone(),
            ),
            None => None,
        };
        let chunk = self.chunks.len() as u32;
        self.chunks.push(batch);
        self.keys.push(keys);
        self.tenants.push(tenants);
        let state = hasher();
        let n = self.keys[chunk as usize].len();
        for r in 0..n {
            let pos = (chunk, r as u32);
            if self.keys[chunk as usize].is_null(r) {
                self.rejected += 1;
                self.dead += 1;
                continue;
            }
            let key = self.key_at(pos).to_string();
            let tenant = self.tenant_at(pos).map(str::to_string);
            let cidr = if spec.mode == MatchMode::Cidr {
                match parse_cidr(&key) {
                    Some(c) => Some(c),
                    None => {
                        tracing::trace!(step = %spec.name, key = %key, "lookup table row skipped: its key is not an address or CIDR block");
                        self.rejected += 1;
                        self.dead += 1;
                        continue;
                    }
                }
            } else {
                None
            };
            let h = state.hash_one((tenant.as_deref(), key.as_str()));
            self.remove(spec, h, tenant.as_deref(), &key);
            self.exact.entry(h).or_default().push(pos);
            if let Some((v6, len, net)) = cidr {
                let at = match self.cidr.iter().position(|(k, _)| *k == (v6, len)) {
                    Some(i) => i,
                    None => {
                        self.cidr.push(((v6, len), HashMap::default()));
                        // Longest prefixes first.
                        self.cidr.sort_by_key(|c| std::cmp::Reverse(c.0 .1));
                        self.cidr
                            .iter()
                            .position(|(k, _)| *k == (v6, len))
                            .unwrap_or(0)
                    }
                };
                self.cidr[at]
                    .1
                    .entry((net, tenant_hash(tenant.as_deref())))
                    .or_default()
                    .push(pos);
            }
            self.live += 1;
        }
        Ok(())
    }

    fn delete(&mut self, spec: &LookupSpec, keys: &[(Option<String>, String)]) {
        let state = hasher();
        for (tenant, key) in keys {
            let tenant = tenant.as_deref().filter(|_| spec.tenant.is_some());
            let h = state.hash_one((tenant, key.as_str()));
            self.remove(spec, h, tenant, key);
        }
    }

    /// Rebuilds the chunks from the live rows once dead ones dominate.
    fn compact(&mut self, spec: &LookupSpec) -> Result<(), EngineError> {
        if self.dead <= self.live.max(1024) {
            return Ok(());
        }
        let mut at: Vec<Pos> = self.exact.values().flatten().copied().collect();
        at.sort_unstable();
        let indices: Vec<(usize, usize)> =
            at.iter().map(|&(c, r)| (c as usize, r as usize)).collect();
        let columns = (0..spec.table.fields().len())
            .map(|c| {
                let arrays: Vec<&dyn Array> =
                    self.chunks.iter().map(|b| b.column(c).as_ref()).collect();
                interleave(&arrays, &indices)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let batch = RecordBatch::try_new(spec.table.clone(), columns)?;
        let rejected = self.rejected;
        *self = LookupTable::default();
        self.upsert(spec, batch)?;
        self.rejected = rejected;
        Ok(())
    }

    /// Applies a feed's changes.
    pub fn apply(
        &mut self,
        spec: &LookupSpec,
        updates: Vec<TableUpdate>,
    ) -> Result<(), EngineError> {
        for u in updates {
            match u {
                TableUpdate::Replace(batches) => {
                    let rejected = self.rejected;
                    *self = LookupTable::default();
                    self.rejected = rejected;
                    for b in batches {
                        self.upsert(spec, b)?;
                    }
                }
                TableUpdate::Upsert(b) => self.upsert(spec, b)?,
                TableUpdate::Delete(keys) => self.delete(spec, &keys),
            }
        }
        self.compact(spec)
    }

    /// The table row for each stream row, if any.
    fn probe(
        &self,
        spec: &LookupSpec,
        keys: &StringArray,
        tenants: Option<&StringArray>,
    ) -> Vec<Option<Pos>> {
        let state = hasher();
        (0..keys.len())
            .map(|i| {
                if keys.is_null(i) {
                    return None;
                }
                let key = keys.value(i);
                let tenant = tenants.map(|t| t.value(i));
                match spec.mode {
                    MatchMode::Exact => {
                        let h = state.hash_one((tenant, key));
                        self.find(h, tenant, key).map(|(_, p)| p)
                    }
                    MatchMode::Cidr => {
                        let (v6, value) = address(key)?;
                        let th = tenant_hash(tenant);
                        let bits = if v6 { 128 } else { 32 };
                        self.cidr
                            .iter()
                            .filter(|((f, _), _)| *f == v6)
                            .find_map(|((_, len), m)| {
                                m.get(&(mask(value, bits, *len), th)).and_then(|v| {
                                    v.iter().copied().find(|p| self.tenant_at(*p) == tenant)
                                })
                            })
                    }
                }
            })
            .collect()
    }
}

fn tenant_hash(tenant: Option<&str>) -> u64 {
    hasher().hash_one(tenant)
}

/// Builds lookup join subtasks; they share one table and one feed.
pub struct LookupJoinFactory {
    spec: Arc<LookupSpec>,
    table: Arc<RwLock<LookupTable>>,
    feed: Arc<Mutex<Feed>>,
    describe: String,
}

struct Feed {
    feed: Box<dyn TableFeed>,
    loaded: bool,
}

impl std::fmt::Debug for LookupJoinFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LookupJoinFactory")
            .field("spec", &self.spec.name)
            .finish()
    }
}

impl LookupJoinFactory {
    /// A factory for `spec` whose table comes from `feed`.
    pub fn new(spec: LookupSpec, feed: Box<dyn TableFeed>) -> Self {
        let describe = feed.describe();
        Self {
            spec: Arc::new(spec),
            table: Arc::new(RwLock::new(LookupTable::default())),
            feed: Arc::new(Mutex::new(Feed {
                feed,
                loaded: false,
            })),
            describe,
        }
    }

    /// Builds one subtask directly (tests); the first loads the table.
    pub fn build(&self, ctx: &TaskContext) -> Result<LookupJoin, EngineError> {
        {
            let mut feed = self.feed.lock();
            if !feed.loaded {
                let updates = feed.feed.load()?;
                let mut table = self.table.write();
                table.apply(&self.spec, updates)?;
                ctx.metrics
                    .dead_lettered("lookup_row_rejected", table.rejected as u64);
                feed.loaded = true;
            }
        }
        Ok(LookupJoin {
            spec: self.spec.clone(),
            table: self.table.clone(),
            feed: self.feed.clone(),
            ctx: ctx.clone(),
            next_poll: i64::MIN,
        })
    }

    /// Rows the table holds now.
    pub fn table_len(&self) -> usize {
        self.table.read().len()
    }
}

impl OperatorFactory for LookupJoinFactory {
    fn output_schema(&self) -> SchemaRef {
        self.spec.output.clone()
    }
    fn create(&self, ctx: &TaskContext) -> vigil_engine::Result<Box<dyn Operator>> {
        Ok(Box::new(self.build(ctx)?))
    }
    fn describe(&self) -> String {
        format!(
            "lookup {} {} on {} in {}",
            if self.spec.inner { "inner" } else { "left" },
            match self.spec.mode {
                MatchMode::Exact => "exact",
                MatchMode::Cidr => "cidr",
            },
            self.spec.stream.field(self.spec.on).name(),
            self.describe
        )
    }
}

/// How often a subtask asks the feed for changes, ms of wall time.
const POLL_EVERY_MS: i64 = 200;

/// One subtask of a lookup join.
pub struct LookupJoin {
    spec: Arc<LookupSpec>,
    table: Arc<RwLock<LookupTable>>,
    feed: Arc<Mutex<Feed>>,
    ctx: TaskContext,
    next_poll: i64,
}

impl LookupJoin {
    /// Asks the feed for changes, unless another subtask is doing it.
    pub fn refresh(&mut self) -> vigil_engine::Result<()> {
        let now = self.ctx.clock.now_ms();
        if now < self.next_poll {
            return Ok(());
        }
        self.next_poll = now + POLL_EVERY_MS;
        let Some(mut feed) = self.feed.try_lock() else {
            return Ok(());
        };
        let updates = feed.feed.poll(now)?;
        if !updates.is_empty() {
            let mut table = self.table.write();
            let before = table.rejected;
            table.apply(&self.spec, updates)?;
            self.ctx
                .metrics
                .dead_lettered("lookup_row_rejected", (table.rejected - before) as u64);
        }
        Ok(())
    }
}

impl Operator for LookupJoin {
    fn state_size(&self) -> vigil_engine::StateSize {
        // One table serves every subtask: the first reports it.
        if self.ctx.subtask == 0 {
            self.table.read().size()
        } else {
            vigil_engine::StateSize::default()
        }
    }

    fn process_batch(
        &mut self,
        _input: usize,
        batch: RecordBatch,
        out: &mut Collector,
    ) -> vigil_engine::Result<()> {
        self.refresh()?;
        let spec = &self.spec;
        let keys = cast(batch.column(spec.on), &DataType::Utf8)?;
        let tenants = match spec.tenant {
            Some((s, _)) => Some(cast(batch.column(s), &DataType::Utf8)?),
            None => None,
        };
        let table = self.table.read();
        let found = table.probe(
            spec,
            keys.as_string::<i32>(),
            tenants.as_ref().map(|t| t.as_string::<i32>()),
        );
        let (rows, found): (Vec<u32>, Vec<Option<Pos>>) = if spec.inner {
            found
                .into_iter()
                .enumerate()
                .filter_map(|(i, p)| p.map(|p| (i as u32, Some(p))))
                .unzip()
        } else {
            ((0..batch.num_rows() as u32).collect(), found)
        };
        if rows.is_empty() {
            return Ok(());
        }
        let mut columns: Vec<ArrayRef> = if rows.len() == batch.num_rows() {
            batch.columns().to_vec()
        } else {
            let idx = UInt32Array::from(rows);
            batch
                .columns()
                .iter()
                .map(|c| take(c, &idx, None))
                .collect::<Result<_, _>>()?
        };
        // The last source is one null row, for rows without a match.
        let null_source = table.chunks.len();
        let indices: Vec<(usize, usize)> = found
            .iter()
            .map(|p| p.map_or((null_source, 0), |(c, r)| (c as usize, r as usize)))
            .collect();
        for &c in &spec.table_columns {
            let nulls = new_null_array(spec.table.field(c).data_type(), 1);
            let mut arrays: Vec<&dyn Array> =
                table.chunks.iter().map(|b| b.column(c).as_ref()).collect();
            arrays.push(nulls.as_ref());
            columns.push(interleave(&arrays, &indices)?);
        }
        drop(table);
        out.emit(RecordBatch::try_new(spec.output.clone(), columns)?);
        Ok(())
    }
}
