//! Generator subtasks: per-partition event sequences built as Arrow columns.
//!
//! Every random choice for background event `i` of partition `p` is a hash of
//! `(seed, p, i)`; there is no generator state to carry, so output does not
//! depend on batch sizes, parallelism, or where a restore resumed. A batch
//! covers background events `[i0, i1)` and every injected attack event whose
//! time falls before the nominal time of event `i1`.

use std::collections::VecDeque;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, AsArray, DictionaryArray, Int32Array, RecordBatch, TimestampMillisecondArray,
    UInt16Array, UInt32Array, UInt64Array,
};
use arrow::datatypes::{DataType, Field, Int32Type, Schema, SchemaRef, UInt64Type};
use async_trait::async_trait;
use vigil_engine::{OperatorState, SharedClock, Source, SourceEvent, SourceFactory, TaskContext};

use super::config::{GeneratorConfig, Stream};
use super::scenario::{mix, plans, InjectedAttack, Plan, Row};
use super::world::{World, BACKGROUND_PORTS, BACKGROUND_PROCESSES, EXPLORER, FAILURE, SERVICES};
use crate::error::Result;
use crate::schema::timestamp_type;

fn dict_type() -> DataType {
    DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8))
}

/// The schema of a generated stream.
pub fn stream_schema(stream: Stream) -> SchemaRef {
    let f = |name: &str, t: DataType| Field::new(name, t, false);
    let mut fields = vec![
        f("event_id", DataType::UInt64),
        f("ts", timestamp_type()),
        f("tenant_id", dict_type()),
    ];
    match stream {
        Stream::Auth => fields.extend([
            f("user", dict_type()),
            f("src_ip", dict_type()),
            f("host", dict_type()),
            f("auth_method", dict_type()),
            f("outcome", dict_type()),
        ]),
        Stream::Network => fields.extend([
            f("src_ip", dict_type()),
            f("dst_ip", dict_type()),
            f("dst_port", DataType::UInt16),
            f("protocol", dict_type()),
            f("bytes", DataType::UInt64),
            f("packets", DataType::UInt32),
        ]),
        Stream::Process => fields.extend([
            f("host", dict_type()),
            f("user", dict_type()),
            f("process", dict_type()),
            f("parent_process", dict_type()),
        ]),
    }
    Arc::new(Schema::new(fields))
}

/// Builds generator subtasks; partitions are spread over subtasks round robin.
#[derive(Debug)]
pub struct GeneratorSourceFactory {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    cfg: GeneratorConfig,
    world: World,
    schema: SchemaRef,
    start_ms: i64,
    event_rate: u64,
    disorder_ms: u64,
    failure_threshold: u64,
}

impl Shared {
    /// Nominal event time of background event `i` of partition `p`.
    fn nominal(&self, p: usize, i: u64) -> i64 {
        let j = i as u128 * self.cfg.partitions as u128 + p as u128;
        self.start_ms + (j * 1000 / self.event_rate as u128) as i64
    }

    /// Background events partition `p` produces in total (None: endless).
    fn partition_len(&self, p: usize) -> Option<u64> {
        let parts = self.cfg.partitions as u64;
        self.cfg.count.map(|c| (c + parts - 1 - p as u64) / parts)
    }

    fn end_ms(&self) -> Option<i64> {
        self.cfg
            .count
            .map(|c| self.start_ms + (c as u128 * 1000 / self.event_rate as u128) as i64)
    }
}

impl GeneratorSourceFactory {
    /// Validates `cfg`; `now_ms` resolves a relative or absent start time.
    pub fn new(cfg: GeneratorConfig, now_ms: i64) -> Result<Self> {
        cfg.validate()?;
        let start_ms = cfg.start_time_ms(now_ms)?;
        let world = World::new(cfg.tenants, cfg.users, cfg.hosts);
        let shared = Shared {
            schema: stream_schema(cfg.stream),
            start_ms,
            event_rate: cfg.effective_event_rate(),
            disorder_ms: cfg.out_of_orderness.as_millis() as u64,
            failure_threshold: (cfg.failure_rate * 65536.0) as u64,
            world,
            cfg,
        };
        Ok(Self {
            shared: Arc::new(shared),
        })
    }

    /// Event time of the first event, ms.
    pub fn start_ms(&self) -> i64 {
        self.shared.start_ms
    }

    /// Every attack injected with all its events before `until_ms` (and, for
    /// a bounded stream, before its end).
    pub fn ground_truth(&self, until_ms: i64) -> Vec<InjectedAttack> {
        let s = &self.shared;
        let until = s.end_ms().map_or(until_ms, |e| e.min(until_ms));
        plans(&s.cfg, &s.world, s.start_ms, until)
            .into_iter()
            .filter(|p| p.end_ms < until)
            .map(|p| p.describe(&s.world))
            .collect()
    }
}

impl SourceFactory for GeneratorSourceFactory {
    fn output_schema(&self) -> SchemaRef {
        self.shared.schema.clone()
    }
    fn event_time_column(&self) -> usize {
        1
    }
    fn max_parallelism(&self) -> Option<usize> {
        Some(self.shared.cfg.partitions)
    }
    fn create(&self, ctx: &TaskContext) -> vigil_engine::Result<Box<dyn Source>> {
        let parts: Vec<PartitionGen> = (0..self.shared.cfg.partitions)
            .filter(|p| p % ctx.parallelism == ctx.subtask)
            .map(|p| PartitionGen {
                p,
                next: 0,
                next_plan: 0,
                pending: VecDeque::new(),
                drained: false,
                ended: false,
            })
            .collect();
        let share = parts.len() as f64 / self.shared.cfg.partitions as f64;
        let rate = self.shared.cfg.rate.map(|r| (r as f64 * share).max(1.0));
        let batch = match rate {
            Some(r) => ((r / 20.0) as usize).clamp(1, self.shared.cfg.batch_size),
            None => self.shared.cfg.batch_size,
        };
        Ok(Box::new(GeneratorSource {
            shared: self.shared.clone(),
            parts,
            turn: 0,
            batch,
            rate,
            clock: ctx.clock.clone(),
            wall_start: None,
            emitted: 0,
        }))
    }
    fn describe(&self) -> String {
        let c = &self.shared.cfg;
        format!(
            "generator {:?} ({} partitions, {}, {} attack spec(s))",
            c.stream,
            c.partitions,
            c.rate
                .map_or("flat out".to_string(), |r| format!("{r} events/s")),
            c.attacks.len()
        )
        .to_lowercase()
    }
}

struct PartitionGen {
    p: usize,
    /// Next background event index.
    next: u64,
    /// Next attack ordinal not yet considered.
    next_plan: usize,
    /// Attack events waiting for their time.
    pending: VecDeque<Row>,
    /// Every event has been handed out; the partition's end is next.
    drained: bool,
    ended: bool,
}

struct GeneratorSource {
    shared: Arc<Shared>,
    parts: Vec<PartitionGen>,
    turn: usize,
    batch: usize,
    rate: Option<f64>,
    clock: SharedClock,
    wall_start: Option<i64>,
    emitted: u64,
}

/// Column vectors of one batch.
#[derive(Default)]
struct Columns {
    id: Vec<u64>,
    ts: Vec<i64>,
    c: [Vec<i32>; 6],
    port: Vec<u16>,
    bytes: Vec<u64>,
    packets: Vec<u32>,
}

impl Columns {
    fn with_capacity(n: usize) -> Self {
        let v = || Vec::with_capacity(n);
        Self {
            id: Vec::with_capacity(n),
            ts: Vec::with_capacity(n),
            c: [v(), v(), v(), v(), v(), v()],
            port: Vec::new(),
            bytes: Vec::new(),
            packets: Vec::new(),
        }
    }
}

const ATTACK_ID_BASE: u64 = 1 << 62;

impl Shared {
    /// Background events `[i0, i1)` of partition `p`. The hot loop of every
    /// benchmark: no divisions, no allocation, table lookups only.
    fn background(&self, p: usize, i0: u64, i1: u64, cols: &mut Columns) {
        let w = &self.world;
        let seed = mix(self.cfg.seed, p as u64);
        let seed2 = mix(seed, 0xA5A5);
        let users = w.users as u64;
        let parts = self.cfg.partitions as u64;
        let per_tenant_hosts = (w.hosts / w.tenants) as u64;
        let disorder = self.disorder_ms + 1;
        let roaming = w.roaming() as u64;
        // Nominal time start + j * 1000 / rate for j = i * parts + p, stepped
        // exactly in integers.
        let rate = self.event_rate as u128;
        let j0 = i0 as u128 * parts as u128 + p as u128;
        let mut q = (j0 * 1000 / rate) as i64;
        let mut r = (j0 * 1000 % rate) as u64;
        let step = parts as u128 * 1000;
        let (step_q, step_r) = ((step / rate) as i64, (step % rate) as u64);
        let rate = rate as u64;
        let scale = |bits: u64, n: u64| ((bits & 0xFFFF_FFFF) * n) >> 32;
        for i in i0..i1 {
            let r1 = mix(seed, i);
            let r2 = mix(seed2, i);
            let u = scale(r1, users) as usize;
            let tenant = w.user_tenants[u];
            let jitter = scale(r2 >> 8, disorder) as i64;
            cols.id.push(i * parts + p as u64);
            cols.ts.push(self.start_ms + q - jitter);
            q += step_q;
            r += step_r;
            if r >= rate {
                q += 1;
                r -= rate;
            }
            cols.c[0].push(tenant);
            match self.cfg.stream {
                Stream::Auth => {
                    let roams = (r1 >> 48) & 0x3FF < 10;
                    let ip = if roams {
                        w.roaming_ip(scale(r2 >> 32, roaming) as usize)
                    } else {
                        w.home_ip(u)
                    };
                    let failed = (r1 >> 32) & 0xFFFF < self.failure_threshold;
                    cols.c[1].push(u as i32);
                    cols.c[2].push(ip as i32);
                    cols.c[3].push(w.user_hosts[u][(r2 & 1) as usize]);
                    cols.c[4].push(((r2 >> 1) & 3) as i32);
                    cols.c[5].push(if failed { FAILURE } else { 0 });
                }
                Stream::Network => {
                    let server =
                        w.tenant_host(tenant as usize, scale(r2 >> 16, per_tenant_hosts) as usize);
                    let bytes = 200 + scale(r2 >> 40, 2_000_000);
                    cols.c[1].push(w.home_ip(u) as i32);
                    cols.c[2].push(w.host_ip(server) as i32);
                    cols.port
                        .push(BACKGROUND_PORTS[((r1 >> 32) as usize) % BACKGROUND_PORTS.len()]);
                    cols.c[3].push(((r1 >> 40) & 1) as i32);
                    cols.bytes.push(bytes);
                    cols.packets.push((bytes / 1200 + 1) as u32);
                }
                Stream::Process => {
                    cols.c[1].push(w.user_hosts[u][(r2 & 1) as usize]);
                    cols.c[2].push(u as i32);
                    cols.c[3].push(scale(r1 >> 32, BACKGROUND_PROCESSES as u64) as i32);
                    cols.c[4].push(if (r1 >> 48) & 7 == 0 {
                        SERVICES
                    } else {
                        EXPLORER
                    });
                }
            }
        }
    }

    fn attack_row(&self, r: &Row, cols: &mut Columns) {
        cols.id.push(r.id);
        cols.ts.push(r.ts);
        cols.c[0].push(r.tenant);
        match self.cfg.stream {
            Stream::Auth => {
                cols.c[1].push(r.user);
                cols.c[2].push(r.src_ip);
                cols.c[3].push(r.host);
                cols.c[4].push(r.method);
                cols.c[5].push(r.outcome);
            }
            Stream::Network => {
                cols.c[1].push(r.src_ip);
                cols.c[2].push(r.dst_ip);
                cols.port.push(r.port);
                cols.c[3].push(r.proto);
                cols.bytes.push(r.bytes);
                cols.packets.push(r.packets);
            }
            Stream::Process => {
                cols.c[1].push(r.host);
                cols.c[2].push(r.user);
                cols.c[3].push(r.process);
                cols.c[4].push(r.parent);
            }
        }
    }

    fn batch(&self, cols: Columns) -> std::result::Result<RecordBatch, arrow::error::ArrowError> {
        let w = &self.world;
        let [c0, c1, c2, c3, c4, c5] = cols.c;
        let d = |keys: Vec<i32>,
                 values: &ArrayRef|
         -> std::result::Result<ArrayRef, arrow::error::ArrowError> {
            Ok(Arc::new(DictionaryArray::<Int32Type>::try_new(
                Int32Array::from(keys),
                values.clone(),
            )?))
        };
        let mut columns: Vec<ArrayRef> = vec![
            Arc::new(UInt64Array::from(cols.id)),
            Arc::new(TimestampMillisecondArray::from(cols.ts).with_timezone("UTC")),
            d(c0, &w.tenant_names)?,
        ];
        match self.cfg.stream {
            Stream::Auth => columns.extend([
                d(c1, &w.user_names)?,
                d(c2, &w.ips)?,
                d(c3, &w.host_names)?,
                d(c4, &w.methods)?,
                d(c5, &w.outcomes)?,
            ]),
            Stream::Network => columns.extend([
                d(c1, &w.ips)?,
                d(c2, &w.ips)?,
                Arc::new(UInt16Array::from(cols.port)) as ArrayRef,
                d(c3, &w.protocols)?,
                Arc::new(UInt64Array::from(cols.bytes)),
                Arc::new(UInt32Array::from(cols.packets)),
            ]),
            Stream::Process => columns.extend([
                d(c1, &w.host_names)?,
                d(c2, &w.user_names)?,
                d(c3, &w.processes)?,
                d(c4, &w.processes)?,
            ]),
        }
        RecordBatch::try_new(self.schema.clone(), columns)
    }
}

impl GeneratorSource {
    /// Builds the next batch of partition slot `k`; None when it has ended.
    fn generate(
        &mut self,
        k: usize,
    ) -> std::result::Result<Option<RecordBatch>, arrow::error::ArrowError> {
        let s = self.shared.clone();
        let part = &mut self.parts[k];
        let p = part.p;
        let len = s.partition_len(p);
        let i0 = part.next;
        let i1 = len.map_or(i0 + self.batch as u64, |l| l.min(i0 + self.batch as u64));
        let last = len.is_some_and(|l| i1 >= l);
        // Attack events due before the next background event (or all, at the end).
        let horizon = if last {
            s.end_ms().unwrap_or(i64::MAX)
        } else {
            s.nominal(p, i1)
        };
        let floor = s.nominal(p, i0);
        let parts = s.cfg.partitions;
        let plan_list: Vec<Plan> = if s.cfg.attacks.is_empty() {
            Vec::new()
        } else {
            plans(&s.cfg, &s.world, s.start_ms, horizon.saturating_add(1))
        };
        for plan in plan_list.iter().skip(part.next_plan) {
            part.next_plan = plan.ordinal + 1;
            if plan.ordinal % parts != p || s.end_ms().is_some_and(|e| plan.end_ms >= e) {
                continue;
            }
            for (n, r) in plan.rows(s.cfg.stream, &s.world).into_iter().enumerate() {
                if r.ts >= floor {
                    let id = ATTACK_ID_BASE + ((plan.ordinal as u64) << 16) + n as u64;
                    part.pending.push_back(Row { id, ..r });
                }
            }
        }
        if i0 >= i1 && part.pending.is_empty() {
            return Ok(None);
        }
        let mut cols = Columns::with_capacity((i1 - i0) as usize + part.pending.len());
        s.background(p, i0, i1, &mut cols);
        let mut due: Vec<Row> = part.pending.drain(..).collect();
        due.sort_by_key(|r| r.ts);
        for r in due {
            if last || r.ts < horizon {
                s.attack_row(&r, &mut cols);
            } else {
                part.pending.push_back(r);
            }
        }
        part.next = i1;
        part.drained = last;
        Ok(Some(s.batch(cols)?))
    }
}

#[async_trait]
impl Source for GeneratorSource {
    fn partitions(&self) -> usize {
        self.parts.len()
    }

    async fn next(&mut self) -> vigil_engine::Result<SourceEvent> {
        if let Some(rate) = self.rate {
            let now = self.clock.now_ms();
            let start = *self.wall_start.get_or_insert(now);
            let due = start + (self.emitted as f64 * 1000.0 / rate) as i64;
            if due > now {
                let wait = (due - now).min(100) as u64;
                tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
                return Ok(SourceEvent::Pending);
            }
        }
        let n = self.parts.len();
        for step in 0..n {
            let k = (self.turn + step) % n;
            if self.parts[k].ended {
                continue;
            }
            self.turn = k + 1;
            if self.parts[k].drained {
                self.parts[k].ended = true;
                return Ok(SourceEvent::PartitionEnd(k));
            }
            return match self.generate(k)? {
                Some(batch) => {
                    self.emitted += batch.num_rows() as u64;
                    Ok(SourceEvent::Data {
                        partition: k,
                        batch,
                    })
                }
                None => {
                    self.parts[k].ended = true;
                    Ok(SourceEvent::PartitionEnd(k))
                }
            };
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        Ok(SourceEvent::Pending)
    }

    fn snapshot(
        &mut self,
        _checkpoint: vigil_engine::CheckpointId,
    ) -> vigil_engine::Result<OperatorState> {
        let schema = Arc::new(Schema::new(vec![
            Field::new("partition", DataType::UInt64, false),
            Field::new("next", DataType::UInt64, false),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(UInt64Array::from_iter_values(
                    self.parts.iter().map(|p| p.p as u64),
                )),
                Arc::new(UInt64Array::from_iter_values(
                    self.parts.iter().map(|p| p.next),
                )),
            ],
        )?;
        Ok(OperatorState {
            batches: vec![batch],
        })
    }

    fn restore(&mut self, state: OperatorState) -> vigil_engine::Result<()> {
        let Some(b) = state.batches.first() else {
            return Ok(());
        };
        let parts = b.column(0).as_primitive::<UInt64Type>();
        let next = b.column(1).as_primitive::<UInt64Type>();
        // After a rescale every old subtask's positions are offered: take
        // the partitions this subtask generates.
        for (p, n) in parts.values().iter().zip(next.values()) {
            if let Some(slot) = self.parts.iter_mut().find(|g| g.p as u64 == *p) {
                slot.next = *n;
            }
        }
        Ok(())
    }
}
