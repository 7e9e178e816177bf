//! Interval joins against a nested-loop reference, on random out-of-order
//! input delivered in random batches with watermarks as the engine sends
//! them; and lookup joins on exact keys and CIDR blocks.

use crate::testing::Rng;
use std::sync::Arc;

use arrow::array::{
    Array, AsArray, Int64Array, RecordBatch, StringArray, TimestampMillisecondArray,
};
use arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef, TimeUnit};
use vigil_engine::{Collector, Operator, TaskContext, LATE};

use super::interval::{IntervalJoinFactory, IntervalJoinSpec, JoinKind};
use crate::sql::Stages;

fn side_schema(prefix: &str) -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(
            format!("{prefix}_ts"),
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            false,
        ),
        Field::new(format!("{prefix}_id"), DataType::Int64, false),
        Field::new("__vigil_key_0", DataType::Utf8, true),
    ]))
}

fn spec(kind: JoinKind, lower_ms: i64, upper_ms: i64) -> IntervalJoinSpec {
    let left = side_schema("l");
    let right = side_schema("r");
    let nullable = kind == JoinKind::Left;
    let joined = Arc::new(Schema::new(vec![
        left.field(0).clone(),
        left.field(1).clone(),
        right.field(0).clone().with_nullable(nullable),
        right.field(1).clone().with_nullable(nullable),
    ]));
    IntervalJoinSpec {
        name: "j".into(),
        describe: String::new(),
        left,
        right,
        left_keys: vec![2],
        right_keys: vec![2],
        key_names: vec!["__vigil_key_0".into()],
        left_time: 0,
        right_time: 0,
        left_width: 2,
        right_width: 2,
        lower_ms,
        upper_ms,
        kind,
        residual: None,
        joined: joined.clone(),
        post: Stages::identity(joined),
    }
}

/// A row of either side: (event time, id, key).
#[derive(Debug, Clone)]
struct Row {
    ts: i64,
    id: i64,
    key: Option<String>,
}

fn batch(schema: &SchemaRef, rows: &[Row]) -> RecordBatch {
    RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(
                TimestampMillisecondArray::from_iter_values(rows.iter().map(|r| r.ts))
                    .with_timezone("UTC"),
            ),
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.id))),
            Arc::new(StringArray::from_iter(rows.iter().map(|r| r.key.clone()))),
        ],
    )
    .expect("test batch")
}

fn random_side(rng: &mut Rng, n: usize, id_base: i64, keys: u64, span: i64) -> Vec<Row> {
    (0..n)
        .map(|i| Row {
            ts: rng.below(span as u64) as i64,
            id: id_base + i as i64,
            key: (rng.below(20) != 0).then(|| format!("k{}", rng.below(keys))),
        })
        .collect()
}

/// (left id, right id or None) pairs the nested-loop reference finds.
fn reference(
    left: &[Row],
    right: &[Row],
    kind: JoinKind,
    lower: i64,
    upper: i64,
) -> Vec<(i64, Option<i64>)> {
    let mut out = Vec::new();
    for a in left {
        let mut any = false;
        for b in right {
            let d = b.ts - a.ts;
            if a.key.is_some() && a.key == b.key && d >= lower && d <= upper {
                out.push((a.id, Some(b.id)));
                any = true;
            }
        }
        if !any && kind == JoinKind::Left {
            out.push((a.id, None));
        }
    }
    out.sort();
    out
}

/// Runs the join on rows arriving in time order with up to `disorder` ms of
/// shuffling, in random batches alternating sides at random, with the
/// engine's watermark: the smaller of the sides' `max seen - disorder`.
/// Checks that nothing emitted is behind the watermark forwarded before it.
fn run(
    rng: &mut Rng,
    left: &[Row],
    right: &[Row],
    spec: IntervalJoinSpec,
    disorder: i64,
) -> (Vec<(i64, Option<i64>)>, usize) {
    let factory = IntervalJoinFactory::new(spec.clone());
    let mut join = factory
        .build(&TaskContext::detached("j", 0, 1, 0))
        .expect("join");
    let order = |rows: &[Row], rng: &mut Rng| {
        let mut keyed: Vec<(i64, Row)> = rows
            .iter()
            .map(|r| (r.ts + rng.below(disorder as u64 + 1) as i64, r.clone()))
            .collect();
        keyed.sort_by_key(|(k, _)| *k);
        keyed.into_iter().map(|(_, r)| r).collect::<Vec<_>>()
    };
    let sides = [order(left, rng), order(right, rng)];
    let schemas = [spec.left.clone(), spec.right.clone()];
    let mut at = [0usize, 0usize];
    let mut max_seen = [i64::MIN, i64::MIN];
    let mut forwarded = i64::MIN;
    let mut out = Collector::new();
    let mut pairs = Vec::new();
    let mut peak = 0;
    let collect = |out: &mut Collector, forwarded: i64, pairs: &mut Vec<(i64, Option<i64>)>| {
        for b in out.take_main() {
            let lt = b
                .column(0)
                .as_primitive::<arrow::datatypes::TimestampMillisecondType>();
            let rt = b
                .column(2)
                .as_primitive::<arrow::datatypes::TimestampMillisecondType>();
            let l = b.column(1).as_primitive::<Int64Type>();
            let r = b.column(3).as_primitive::<Int64Type>();
            for i in 0..b.num_rows() {
                assert!(
                    lt.value(i) >= forwarded,
                    "left row emitted behind the watermark"
                );
                if rt.is_valid(i) {
                    assert!(
                        rt.value(i) >= forwarded,
                        "right row emitted behind the watermark"
                    );
                }
                pairs.push((l.value(i), r.is_valid(i).then(|| r.value(i))));
            }
        }
        assert!(out.take_side().is_empty(), "no row is late in this run");
    };
    while at[0] < sides[0].len() || at[1] < sides[1].len() {
        let s = if at[0] == sides[0].len() {
            1
        } else if at[1] == sides[1].len() {
            0
        } else {
            rng.below(2) as usize
        };
        let n = (1 + rng.below(40) as usize).min(sides[s].len() - at[s]);
        let rows = &sides[s][at[s]..at[s] + n];
        at[s] += n;
        join.process_batch(s, batch(&schemas[s], rows), &mut out)
            .expect("batch");
        collect(&mut out, forwarded, &mut pairs);
        for r in rows {
            max_seen[s] = max_seen[s].max(r.ts);
        }
        // A side that has ended no longer holds the watermark back.
        let w = |i: usize| {
            if at[i] == sides[i].len() {
                i64::MAX
            } else {
                max_seen[i].saturating_sub(disorder)
            }
        };
        let watermark = w(0).min(w(1));
        if watermark > i64::MIN && watermark < i64::MAX {
            join.on_watermark(watermark, &mut out).expect("watermark");
            collect(&mut out, forwarded, &mut pairs);
            let held = join
                .watermark_hold()
                .map_or(watermark, |h| h.min(watermark));
            forwarded = forwarded.max(held);
        }
        peak = peak.max(join.state_rows());
    }
    join.on_watermark(i64::MAX, &mut out).expect("end");
    collect(&mut out, forwarded, &mut pairs);
    assert_eq!(
        join.state_rows(),
        0,
        "state is empty once the watermark has passed everything"
    );
    assert_eq!(join.state_keys(), 0);
    assert_eq!(join.watermark_hold(), None);
    pairs.sort();
    (pairs, peak)
}

#[test]
fn interval_join_matches_nested_loop_on_random_out_of_order_input() {
    let mut rng = Rng(0x5EED_1234_ABCD_0001);
    let mut paired = 0;
    for round in 0..60 {
        let kind = if round % 2 == 0 {
            JoinKind::Inner
        } else {
            JoinKind::Left
        };
        let lower = -(rng.below(3_000) as i64);
        let upper = rng.below(5_000) as i64 - 1_000;
        let (lower, upper) = (lower.min(upper), lower.max(upper));
        let span = 20_000 + rng.below(60_000) as i64;
        let keys = 1 + rng.below(12);
        let (nl, nr) = (50 + rng.below(300) as usize, 50 + rng.below(300) as usize);
        let left = random_side(&mut rng, nl, 0, keys, span);
        let right = random_side(&mut rng, nr, 100_000, keys, span);
        let disorder = rng.below(4_000) as i64;
        let expected = reference(&left, &right, kind, lower, upper);
        let (got, _) = run(&mut rng, &left, &right, spec(kind, lower, upper), disorder);
        paired += got.iter().filter(|(_, r)| r.is_some()).count();
        assert_eq!(
            got, expected,
            "round {round}: {kind:?} join, {lower}..={upper} ms, disorder {disorder} ms"
        );
    }
    assert!(
        paired > 1_000,
        "the rounds pair rows, not only miss: {paired}"
    );
}

#[test]
fn interval_join_state_stays_bounded_on_a_long_stream() {
    // 200 s of rows on each side at 50 rows per second; the join spans 2 s.
    // The sides take turns at random, so one runs up to several seconds
    // ahead and its rows wait for the other's watermark: still a few
    // seconds of rows, not the 20,000 of the stream.
    let mut rng = Rng(42);
    let rows = |rng: &mut Rng, base: i64| -> Vec<Row> {
        (0..10_000)
            .map(|i| Row {
                ts: i * 20 + rng.below(20) as i64,
                id: base + i,
                key: Some(format!("k{}", rng.below(50))),
            })
            .collect()
    };
    let left = rows(&mut rng, 0);
    let right = rows(&mut rng, 100_000);
    let expected = reference(&left, &right, JoinKind::Inner, -1_000, 1_000);
    let (got, peak) = run(
        &mut rng,
        &left,
        &right,
        spec(JoinKind::Inner, -1_000, 1_000),
        500,
    );
    assert_eq!(got, expected);
    assert!(
        peak < 2_000,
        "peak state {peak} rows: more than the span and disorder can explain"
    );
}

#[test]
fn late_rows_leave_on_the_late_output_and_pair_with_nothing() {
    let spec = spec(JoinKind::Inner, -1_000, 1_000);
    let join_schema = spec.left.clone();
    let mut join = IntervalJoinFactory::new(spec)
        .build(&TaskContext::detached("j", 0, 1, 0))
        .expect("join");
    let mut out = Collector::new();
    let row = |ts, id| Row {
        ts,
        id,
        key: Some("k".into()),
    };
    join.process_batch(1, batch(&join_schema, &[row(10_000, 1)]), &mut out)
        .expect("right");
    join.on_watermark(9_500, &mut out).expect("watermark");
    join.process_batch(
        0,
        batch(&join_schema, &[row(9_000, 2), row(9_600, 3)]),
        &mut out,
    )
    .expect("left");
    let main = out.take_main();
    let ids: Vec<i64> = main
        .iter()
        .flat_map(|b| b.column(1).as_primitive::<Int64Type>().values().to_vec())
        .collect();
    assert_eq!(ids, vec![3], "only the row on time pairs");
    let late = out.take_side();
    assert_eq!(late.len(), 1);
    assert_eq!(late[0].0, LATE);
    assert_eq!(
        late[0]
            .1
            .column(1)
            .as_primitive::<Int64Type>()
            .values()
            .to_vec(),
        vec![2]
    );
}

#[test]
fn snapshot_and_restore_keep_pending_rows_and_their_pairing_marks() {
    let spec = spec(JoinKind::Left, 0, 5_000);
    let schema = spec.left.clone();
    let factory = IntervalJoinFactory::new(spec);
    let ctx = TaskContext::detached("j", 0, 1, 0);
    let mut join = factory.build(&ctx).expect("join");
    let mut out = Collector::new();
    let row = |ts, id, k: &str| Row {
        ts,
        id,
        key: Some(k.into()),
    };
    join.process_batch(
        0,
        batch(&schema, &[row(1_000, 1, "a"), row(1_000, 2, "b")]),
        &mut out,
    )
    .expect("left");
    join.process_batch(1, batch(&schema, &[row(2_000, 10, "a")]), &mut out)
        .expect("right");
    assert_eq!(
        out.take_main().iter().map(|b| b.num_rows()).sum::<usize>(),
        1
    );
    let state = join.snapshot().expect("snapshot");
    let mut restored = factory.build(&ctx).expect("join");
    restored
        .restore(state.owned_by(0, 1).expect("owned"))
        .expect("restore");
    restored
        .process_batch(1, batch(&schema, &[row(3_000, 11, "a")]), &mut out)
        .expect("right");
    restored.on_watermark(i64::MAX, &mut out).expect("end");
    let mut got: Vec<(i64, Option<i64>)> = Vec::new();
    for b in out.take_main() {
        let l = b.column(1).as_primitive::<Int64Type>();
        let r = b.column(3).as_primitive::<Int64Type>();
        for i in 0..b.num_rows() {
            got.push((l.value(i), r.is_valid(i).then(|| r.value(i))));
        }
    }
    got.sort();
    // Left 1 paired before the snapshot and again after; left 2 never did.
    assert_eq!(got, vec![(1, Some(11)), (2, None)]);
}

#[test]
fn the_states_of_two_subtasks_restore_into_one_with_their_pairing_marks() {
    let spec = spec(JoinKind::Left, 0, 5_000);
    let schema = spec.left.clone();
    let factory = IntervalJoinFactory::new(spec);
    let ctx = TaskContext::detached("j", 0, 1, 0);
    let row = |ts, id, k: &str| Row {
        ts,
        id,
        key: Some(k.into()),
    };
    let mut out = Collector::new();
    // Old subtask 0 holds "a" (paired) and "b" (not); old subtask 1 "c" (paired) and "d".
    let mut states = Vec::new();
    for (paired, alone) in [("a", "b"), ("c", "d")] {
        let mut join = factory.build(&ctx).expect("join");
        join.process_batch(
            0,
            batch(&schema, &[row(1_000, 1, paired), row(1_000, 2, alone)]),
            &mut out,
        )
        .expect("left");
        join.process_batch(1, batch(&schema, &[row(2_000, 10, paired)]), &mut out)
            .expect("right");
        states.push(join.snapshot().expect("snapshot"));
    }
    out.take_main();
    let mut restored = factory.build(&ctx).expect("join");
    // An old subtask with nothing buffered comes first: its empty tables
    // take slots that are freed at once and reused.
    let empty = factory
        .build(&ctx)
        .expect("join")
        .snapshot()
        .expect("snapshot");
    states.insert(0, empty);
    for s in states {
        restored
            .restore(s.owned_by(0, 1).expect("owned"))
            .expect("restore");
    }
    restored.on_watermark(i64::MAX, &mut out).expect("end");
    let unmatched: usize = out.take_main().iter().map(|b| b.num_rows()).sum();
    assert_eq!(unmatched, 2, "only b and d never paired");

    // Many keys, split over three new subtasks by key group.
    let keys: Vec<String> = (0..60).map(|i| format!("k{i}")).collect();
    let mut join = factory.build(&ctx).expect("join");
    let lefts: Vec<Row> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| row(1_000, i as i64, k))
        .collect();
    join.process_batch(0, batch(&schema, &lefts), &mut out)
        .expect("left");
    let rights: Vec<Row> = keys
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 2 == 0)
        .map(|(i, k)| row(2_000, 100 + i as i64, k))
        .collect();
    join.process_batch(1, batch(&schema, &rights), &mut out)
        .expect("right");
    out.take_main();
    let state = join.snapshot().expect("snapshot");
    let mut unmatched = 0;
    for s in 0..3 {
        let mut part = factory.build(&ctx).expect("join");
        part.restore(state.owned_by(s, 3).expect("owned"))
            .expect("restore");
        part.on_watermark(i64::MAX, &mut out).expect("end");
        unmatched += out.take_main().iter().map(|b| b.num_rows()).sum::<usize>();
    }
    assert_eq!(unmatched, 30, "the odd keys never paired");
}

mod lookup {
    //! Lookup joins against a table fed by hand (the file and Kafka feeds
    //! are the connectors' and have tests of their own).

    use std::sync::Arc;

    use arrow::array::{Array, AsArray, RecordBatch, StringArray};
    use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
    use parking_lot::Mutex;
    use vigil_engine::{Collector, ManualClock, Operator, TableFeed, TableUpdate, TaskContext};

    use crate::join::lookup::{LookupJoinFactory, LookupSpec, MatchMode};

    fn strings(names: &[&str]) -> SchemaRef {
        Arc::new(Schema::new(
            names
                .iter()
                .map(|n| Field::new(*n, DataType::Utf8, true))
                .collect::<Vec<_>>(),
        ))
    }

    fn rows(schema: &SchemaRef, rows: &[&[&str]]) -> RecordBatch {
        let columns = (0..schema.fields().len())
            .map(|c| {
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r[c])))
                    as arrow::array::ArrayRef
            })
            .collect();
        RecordBatch::try_new(schema.clone(), columns).expect("rows")
    }

    /// A feed whose changes the test queues.
    struct Queued {
        schema: SchemaRef,
        initial: Vec<RecordBatch>,
        queue: Arc<Mutex<Vec<TableUpdate>>>,
    }

    impl TableFeed for Queued {
        fn schema(&self) -> SchemaRef {
            self.schema.clone()
        }
        fn load(&mut self) -> vigil_engine::Result<Vec<TableUpdate>> {
            Ok(vec![TableUpdate::Replace(self.initial.clone())])
        }
        fn poll(&mut self, _now_ms: i64) -> vigil_engine::Result<Vec<TableUpdate>> {
            Ok(std::mem::take(&mut *self.queue.lock()))
        }
        fn describe(&self) -> String {
            "queued".into()
        }
    }

    fn column(batches: &[RecordBatch], name: &str) -> Vec<Option<String>> {
        batches
            .iter()
            .flat_map(|b| {
                let c = b.column_by_name(name).expect("column");
                let c = c.as_string::<i32>();
                (0..c.len())
                    .map(|i| c.is_valid(i).then(|| c.value(i).to_string()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn cidr_lookup_takes_the_longest_prefix_and_sees_new_indicators() {
        let stream = strings(&["tenant_id", "dst_ip"]);
        let table = strings(&["cidr", "label"]);
        let queue = Arc::new(Mutex::new(Vec::new()));
        let feed = Queued {
            schema: table.clone(),
            initial: vec![rows(
                &table,
                &[
                    &["10.0.0.0/8", "corp"],
                    &["10.1.2.0/24", "dmz"],
                    &["2001:db8::/32", "v6"],
                    &["bad/99", "x"],
                ],
            )],
            queue: queue.clone(),
        };
        let spec = LookupSpec::new(
            "intel",
            stream.clone(),
            "dst_ip",
            MatchMode::Cidr,
            false,
            table.clone(),
            "cidr",
            "intel_",
            false,
        )
        .expect("spec");
        let factory = LookupJoinFactory::new(spec, Box::new(feed));
        let clock = ManualClock::new(0);
        let mut ctx = TaskContext::detached("intel", 0, 1, 0);
        ctx.clock = clock.clone();
        let mut join = factory.build(&ctx).expect("join");
        assert_eq!(
            ctx.metrics
                .dead_letters
                .load(std::sync::atomic::Ordering::Relaxed),
            1,
            "the bad CIDR is counted"
        );
        let mut out = Collector::new();
        let input = rows(
            &stream,
            &[
                &["acme", "10.1.2.3"],
                &["acme", "10.9.9.9"],
                &["acme", "192.0.2.1"],
                &["acme", "2001:db8::1"],
                &["acme", "not-an-ip"],
            ],
        );
        join.process_batch(0, input.clone(), &mut out)
            .expect("batch");
        let got = out.take_main();
        assert_eq!(
            column(&got, "intel_label"),
            vec![
                Some("dmz".into()),
                Some("corp".into()),
                None,
                Some("v6".into()),
                None
            ]
        );
        // A new indicator applies to rows processed after it arrives.
        queue.lock().push(TableUpdate::Upsert(rows(
            &table,
            &[&["192.0.2.0/24", "new"]],
        )));
        queue
            .lock()
            .push(TableUpdate::Delete(vec![(None, "10.1.2.0/24".into())]));
        clock.advance(1_000);
        join.process_batch(0, input, &mut out).expect("batch");
        assert_eq!(
            column(&out.take_main(), "intel_label"),
            vec![
                Some("corp".into()),
                Some("corp".into()),
                Some("new".into()),
                Some("v6".into()),
                None
            ]
        );
    }

    #[test]
    fn exact_lookup_stays_within_the_tenant_unless_told() {
        let stream = strings(&["tenant_id", "host"]);
        let table = strings(&["tenant_id", "host", "owner"]);
        let initial = vec![rows(
            &table,
            &[&["acme", "db1", "alice"], &["globex", "db1", "bob"]],
        )];
        let make = |cross: bool, inner: bool| {
            let spec = LookupSpec::new(
                "assets",
                stream.clone(),
                "host",
                MatchMode::Exact,
                inner,
                table.clone(),
                "host",
                "asset_",
                cross,
            )
            .expect("spec");
            LookupJoinFactory::new(
                spec,
                Box::new(Queued {
                    schema: table.clone(),
                    initial: initial.clone(),
                    queue: Arc::new(Mutex::new(Vec::new())),
                }),
            )
        };
        let input = rows(
            &stream,
            &[
                &["acme", "db1"],
                &["globex", "db1"],
                &["initech", "db1"],
                &["acme", "web"],
            ],
        );
        let ctx = TaskContext::detached("assets", 0, 1, 0);
        let mut out = Collector::new();
        make(false, false)
            .build(&ctx)
            .expect("join")
            .process_batch(0, input.clone(), &mut out)
            .expect("batch");
        let got = out.take_main();
        assert_eq!(
            column(&got, "asset_owner"),
            vec![Some("alice".into()), Some("bob".into()), None, None]
        );
        assert!(
            got[0].column_by_name("asset_tenant_id").is_none(),
            "the tenant is the stream's"
        );
        make(false, true)
            .build(&ctx)
            .expect("join")
            .process_batch(0, input.clone(), &mut out)
            .expect("batch");
        assert_eq!(
            column(&out.take_main(), "host"),
            vec![Some("db1".into()), Some("db1".into())],
            "inner drops misses"
        );
        // Cross-tenant: the table's tenant is an ordinary column, and a key
        // matches the last row loaded with it.
        make(true, false)
            .build(&ctx)
            .expect("join")
            .process_batch(0, input, &mut out)
            .expect("batch");
        let got = out.take_main();
        assert_eq!(column(&got, "asset_tenant_id")[2], Some("globex".into()));
    }

    #[test]
    fn a_table_column_that_collides_needs_a_prefix() {
        let stream = strings(&["host"]);
        let table = strings(&["host", "owner"]);
        let e = LookupSpec::new(
            "a",
            stream,
            "host",
            MatchMode::Exact,
            false,
            table,
            "host",
            "",
            false,
        )
        .expect_err("collision");
        assert!(e.to_string().contains("already has"), "{e}");
    }
}
