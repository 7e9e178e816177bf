//! Correlations driven through their planned prepare steps: Elastic's
//! documented EQL examples, counts against a brute-force reference on
//! random out-of-order input, tenant isolation, late rows and state.

use crate::testing::Rng;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{AsArray, Int64Array, RecordBatch, StringArray, TimestampMillisecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit, UInt64Type};
use vigil_engine::{Collector, Operator, TaskContext, LATE};

use super::config::{Condition, CorrelateConfig, CorrelationType, RuleRef};
use super::operator::{CorrelateFactory, Correlation};
use super::plan::{plan_correlation, PlannedCorrelation};
use crate::sql::StepInput;

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            false,
        ),
        Field::new("tenant_id", DataType::Utf8, false),
        Field::new("user", DataType::Utf8, true),
        Field::new("process", DataType::Utf8, false),
        Field::new("event_id", DataType::Int64, false),
    ]))
}

/// An event: (ms, tenant, user, process, id).
type Ev<'a> = (i64, &'a str, &'a str, &'a str, i64);

fn batch(rows: &[Ev]) -> RecordBatch {
    RecordBatch::try_new(
        schema(),
        vec![
            Arc::new(
                TimestampMillisecondArray::from_iter_values(rows.iter().map(|r| r.0))
                    .with_timezone("UTC"),
            ),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.1))),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.2))),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.3))),
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.4))),
        ],
    )
    .expect("batch")
}

fn rule(name: &str, condition: &str) -> RuleRef {
    RuleRef::Inline {
        name: name.into(),
        input: "events".into(),
        condition: Some(condition.into()),
        id: None,
    }
}

fn config(
    kind: CorrelationType,
    rules: Vec<RuleRef>,
    group_by: &[&str],
    span_ms: u64,
) -> CorrelateConfig {
    CorrelateConfig {
        correlation: kind,
        rules,
        group_by: group_by.iter().map(|g| g.to_string()).collect(),
        aliases: BTreeMap::new(),
        timespan: Duration::from_millis(span_ms),
        condition: None,
        until: None,
        suppress: None,
        cross_tenant: false,
        fields: BTreeMap::new(),
        rule: None,
    }
}

/// A planned correlation and one subtask of it.
struct Harness {
    planned: PlannedCorrelation,
    op: Correlation,
    out: Collector,
}

impl Harness {
    fn new(config: &CorrelateConfig) -> Self {
        let planned = plan_correlation("c", config, &|name| {
            (name == "events").then(|| StepInput {
                schema: schema(),
                event_time: Some("ts".into()),
            })
        })
        .expect("plan");
        let op = CorrelateFactory::new(planned.spec.clone())
            .build(&TaskContext::detached("c", 0, 1, 0))
            .expect("build");
        Self {
            planned,
            op,
            out: Collector::new(),
        }
    }

    /// Sends source rows to every rule, through its prepare step.
    fn push(&mut self, rows: &[Ev]) {
        let b = batch(rows);
        for (i, r) in self.planned.rules.iter().enumerate() {
            let prepared = r.stages.run(b.clone()).expect("prepare");
            self.op
                .process_batch(i, prepared, &mut self.out)
                .expect("batch");
        }
    }

    fn watermark(&mut self, w: i64) {
        self.op.on_watermark(w, &mut self.out).expect("watermark");
    }

    fn rows(&mut self) -> Vec<RecordBatch> {
        self.out.take_main()
    }
}

/// Each alert's step ids, as "a,b,c".
fn sequences(batches: &[RecordBatch], steps: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for b in batches {
        for i in 0..b.num_rows() {
            let ids: Vec<String> = steps
                .iter()
                .map(|s| {
                    let c = b.column_by_name(&format!("{s}_id")).expect("step id");
                    c.as_string::<i32>().value(i).to_string()
                })
                .collect();
            out.push(ids.join(","));
        }
    }
    out.sort();
    out
}

#[test]
fn eql_documented_state_machine_example() {
    // Elastic's "How sequence queries handle matches": eleven process events
    // for root and elkbee; the documented result is [2, 4, 9] and [6, 8, 10].
    let c = config(
        CorrelationType::TemporalOrdered,
        vec![
            rule("attrib", "process = 'attrib'"),
            rule("bash", "process = 'bash'"),
            rule("cat", "process = 'cat'"),
        ],
        &["user"],
        3_600_000,
    );
    let mut h = Harness::new(&c);
    let names = [
        "root attrib",
        "root attrib",
        "elkbee bash",
        "root bash",
        "root bash",
        "elkbee attrib",
        "root attrib",
        "elkbee bash",
        "root cat",
        "elkbee cat",
        "root cat",
    ];
    let events: Vec<(i64, String, String, i64)> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let (u, p) = n.split_once(' ').expect("user process");
            (
                (i as i64 + 1) * 1000,
                u.to_string(),
                p.to_string(),
                i as i64 + 1,
            )
        })
        .collect();
    // Delivered newest first, in one batch: order comes from event time.
    let rows: Vec<Ev> = events
        .iter()
        .rev()
        .map(|(t, u, p, id)| (*t, "acme", u.as_str(), p.as_str(), *id))
        .collect();
    h.push(&rows);
    assert!(h.rows().is_empty(), "nothing before the watermark passes");
    h.watermark(20_000);
    let got = h.rows();
    assert_eq!(
        sequences(&got, &["attrib", "bash", "cat"]),
        vec!["2,4,9", "6,8,10"]
    );
    let b = &got[0];
    assert!(
        b.column_by_name("tenant_id").is_some(),
        "tenant joins the group"
    );
}

#[test]
fn eql_documented_until_example() {
    // `sequence by ID A B until C` over A,B / A,B,C / A,C,B matches the
    // first two and not the third.
    let mut c = config(
        CorrelationType::TemporalOrdered,
        vec![rule("a", "process = 'A'"), rule("b", "process = 'B'")],
        &["user"],
        60_000,
    );
    c.until = Some(rule("c", "process = 'C'"));
    let mut h = Harness::new(&c);
    let mut rows = Vec::new();
    for (id, seq) in [("1", "AB"), ("2", "ABC"), ("3", "ACB")] {
        for (k, p) in seq.chars().enumerate() {
            rows.push((1_000 * (k as i64 + 1), id, p));
        }
    }
    let owned: Vec<(i64, String, String, i64)> = rows
        .iter()
        .enumerate()
        .map(|(i, (ts, id, p))| (*ts, id.to_string(), p.to_string(), i as i64))
        .collect();
    let evs: Vec<Ev> = owned
        .iter()
        .map(|(t, u, p, i)| (*t, "acme", u.as_str(), p.as_str(), *i))
        .collect();
    h.push(&evs);
    h.watermark(i64::MAX);
    let got = h.rows();
    let users: Vec<String> = got
        .iter()
        .flat_map(|b| {
            let u = b.column_by_name("user").expect("user").as_string::<i32>();
            (0..b.num_rows())
                .map(|i| u.value(i).to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(users, vec!["1", "2"]);
    assert_eq!(
        h.op.state_groups(),
        0,
        "the watermark at the end clears everything"
    );
}

#[test]
fn maxspan_counts_from_the_first_event() {
    let c = config(
        CorrelationType::TemporalOrdered,
        vec![rule("a", "process = 'A'"), rule("b", "process = 'B'")],
        &["user"],
        10_000,
    );
    let mut h = Harness::new(&c);
    h.push(&[
        (0, "acme", "u1", "A", 1),
        (10_000, "acme", "u1", "B", 2), // exactly maxspan: matches
        (20_000, "acme", "u2", "A", 3),
        (30_001, "acme", "u2", "B", 4), // 1 ms too late
        (40_000, "acme", "u3", "B", 5), // B before A never matches
        (41_000, "acme", "u3", "A", 6),
    ]);
    h.watermark(i64::MAX);
    assert_eq!(sequences(&h.rows(), &["a", "b"]), vec!["1,2"]);
}

#[test]
fn sequences_never_cross_tenants_unless_told() {
    let rows: [Ev; 2] = [(0, "acme", "u", "A", 1), (1_000, "globex", "u", "B", 2)];
    let mut c = config(
        CorrelationType::TemporalOrdered,
        vec![rule("a", "process = 'A'"), rule("b", "process = 'B'")],
        &["user"],
        10_000,
    );
    let mut h = Harness::new(&c);
    h.push(&rows);
    h.watermark(i64::MAX);
    assert!(h.rows().is_empty(), "same user name, different tenants");
    c.cross_tenant = true;
    let mut h = Harness::new(&c);
    h.push(&rows);
    h.watermark(i64::MAX);
    assert_eq!(sequences(&h.rows(), &["a", "b"]), vec!["1,2"]);
}

#[test]
fn sequences_carry_fields_of_their_events() {
    let mut c = config(
        CorrelationType::TemporalOrdered,
        vec![rule("a", "process = 'A'"), rule("b", "process = 'B'")],
        &["tenant_id"],
        10_000,
    );
    c.fields
        .insert("b".into(), vec!["user".into(), "event_id".into()]);
    let mut h = Harness::new(&c);
    h.push(&[(0, "acme", "alice", "A", 1), (1_000, "acme", "bob", "B", 2)]);
    h.watermark(i64::MAX);
    let got = h.rows();
    assert_eq!(
        got[0]
            .column_by_name("b_user")
            .expect("carried")
            .as_string::<i32>()
            .value(0),
        "bob"
    );
    assert_eq!(
        got[0]
            .column_by_name("b_event_id")
            .expect("carried")
            .as_string::<i32>()
            .value(0),
        "2"
    );
    assert!(got[0].column_by_name("a_user").is_none());
}

#[test]
fn temporal_matches_in_any_order_within_the_span() {
    let c = config(
        CorrelationType::Temporal,
        vec![rule("a", "process = 'A'"), rule("b", "process = 'B'")],
        &["user"],
        5_000,
    );
    let mut h = Harness::new(&c);
    h.push(&[
        (0, "acme", "u1", "B", 1),
        (4_000, "acme", "u1", "A", 2),
        (0, "acme", "u2", "A", 3),
        (6_000, "acme", "u2", "B", 4),
    ]);
    h.watermark(i64::MAX);
    assert_eq!(sequences(&h.rows(), &["a", "b"]), vec!["2,1"]);
}

#[test]
fn late_rows_go_to_the_late_output() {
    let c = config(
        CorrelationType::TemporalOrdered,
        vec![rule("a", "process = 'A'"), rule("b", "process = 'B'")],
        &["user"],
        10_000,
    );
    let mut h = Harness::new(&c);
    h.push(&[(5_000, "acme", "u", "A", 1)]);
    h.watermark(6_000);
    h.push(&[(5_500, "acme", "u", "B", 2), (7_000, "acme", "u", "B", 3)]);
    h.watermark(i64::MAX);
    assert_eq!(sequences(&h.rows(), &["a", "b"]), vec!["1,3"]);
    let late = h.out.take_side();
    assert_eq!(late.len(), 1);
    assert_eq!(late[0].0, LATE);
    assert_eq!(late[0].1.num_rows(), 1);
}

/// Brute force: per group, at each distinct event time in order, count the
/// events of the last span not consumed by an earlier alert; fire when the
/// count reaches `min` and the group is not quiet.
fn reference(
    events: &[(i64, String, String)],
    span: i64,
    min: u64,
    suppress: i64,
    distinct: bool,
) -> Vec<(String, u64, i64, i64)> {
    let mut groups: BTreeMap<&str, Vec<(i64, &str)>> = BTreeMap::new();
    for (t, g, v) in events {
        groups.entry(g).or_default().push((*t, v));
    }
    let mut out = Vec::new();
    for (g, mut evs) in groups {
        evs.sort();
        let mut consumed_to = i64::MIN;
        let mut quiet_until = i64::MIN;
        let mut times: Vec<i64> = evs.iter().map(|e| e.0).collect();
        times.dedup();
        for t in times {
            let window: Vec<&(i64, &str)> = evs
                .iter()
                .filter(|(x, _)| *x <= t && *x >= t - span && *x > consumed_to)
                .collect();
            let n = if distinct {
                let mut v: Vec<&str> = window.iter().map(|e| e.1).collect();
                v.sort();
                v.dedup();
                v.len() as u64
            } else {
                window.len() as u64
            };
            if n >= min && t >= quiet_until {
                out.push((g.to_string(), n, window[0].0, t));
                consumed_to = t;
                quiet_until = t + suppress;
            }
        }
    }
    out.sort();
    out
}

#[test]
fn counts_match_brute_force_on_random_out_of_order_input() {
    let mut rng = Rng(0xC0FF_EE00_1234_5678);
    let mut fired = 0;
    for round in 0..80 {
        let distinct = round % 2 == 1;
        let span = 1_000 + rng.below(20_000) as i64;
        let min = 2 + rng.below(6);
        let suppress = rng.below(2 * span as u64) as i64;
        let groups = 1 + rng.below(5);
        let n = 50 + rng.below(400) as usize;
        let horizon = 5_000 + rng.below(120_000) as i64;
        let events: Vec<(i64, String, String)> = (0..n)
            .map(|_| {
                (
                    // Coarse times, so equal event times are common.
                    rng.below(horizon as u64 / 100) as i64 * 100,
                    format!("g{}", rng.below(groups)),
                    format!("v{}", rng.below(8)),
                )
            })
            .collect();
        let mut c = config(
            if distinct {
                CorrelationType::ValueCount
            } else {
                CorrelationType::EventCount
            },
            vec![RuleRef::Name("events".into())],
            &["user"],
            span as u64,
        );
        c.condition = Some(Condition {
            gte: Some(min),
            gt: None,
            field: distinct.then(|| "process".into()),
        });
        c.suppress = Some(Duration::from_millis(suppress as u64));
        let mut h = Harness::new(&c);
        // Arrival: event time plus up to `disorder` ms, in random batches,
        // with the watermark at max seen - disorder.
        let disorder = rng.below(3_000) as i64;
        let mut arrival: Vec<(i64, usize)> = events
            .iter()
            .enumerate()
            .map(|(i, e)| (e.0 + rng.below(disorder as u64 + 1) as i64, i))
            .collect();
        arrival.sort();
        let mut at = 0;
        let mut max_seen = i64::MIN;
        let mut got = Vec::new();
        while at < arrival.len() {
            let k = (1 + rng.below(30) as usize).min(arrival.len() - at);
            let owned: Vec<&(i64, String, String)> = arrival[at..at + k]
                .iter()
                .map(|(_, i)| &events[*i])
                .collect();
            let rows: Vec<Ev> = owned
                .iter()
                .map(|(t, g, v)| (*t, "acme", g.as_str(), v.as_str(), 0))
                .collect();
            at += k;
            h.push(&rows);
            max_seen = max_seen.max(rows.iter().map(|r| r.0).max().unwrap_or(i64::MIN));
            h.watermark(max_seen - disorder);
            got.extend(h.rows());
        }
        h.watermark(i64::MAX);
        got.extend(h.rows());
        assert!(h.out.take_side().is_empty(), "nothing is late");
        let mut alerts = Vec::new();
        for b in &got {
            let g = b.column_by_name("user").expect("user").as_string::<i32>();
            let count = b.column(3).as_primitive::<UInt64Type>();
            let first = b
                .column_by_name("first_ts")
                .expect("first")
                .as_primitive::<arrow::datatypes::TimestampMillisecondType>();
            let last = b
                .column_by_name("last_ts")
                .expect("last")
                .as_primitive::<arrow::datatypes::TimestampMillisecondType>();
            for i in 0..b.num_rows() {
                alerts.push((
                    g.value(i).to_string(),
                    count.value(i),
                    first.value(i),
                    last.value(i),
                ));
            }
        }
        alerts.sort();
        let expected = reference(&events, span, min, suppress, distinct);
        assert_eq!(
            alerts,
            expected,
            "round {round}: {} span {span} min {min} suppress {suppress} disorder {disorder}",
            if distinct {
                "value_count"
            } else {
                "event_count"
            }
        );
        assert_eq!(
            h.op.state_groups(),
            0,
            "round {round}: state left at the end"
        );
        assert_eq!(h.op.pending_rows(), 0);
        fired += alerts.len();
    }
    assert!(
        fired > 200,
        "the rounds exercise alerts, not only silence: {fired}"
    );
}

#[test]
fn a_burst_across_a_minute_boundary_is_one_alert() {
    // Ten failures from 00:55 to 01:04: two tumbling minutes would see five
    // each and never fire at ten; a sliding minute fires once.
    let mut c = config(
        CorrelationType::EventCount,
        vec![RuleRef::Name("events".into())],
        &["user"],
        60_000,
    );
    c.condition = Some(Condition {
        gte: Some(10),
        gt: None,
        field: None,
    });
    let mut h = Harness::new(&c);
    let rows: Vec<Ev> = (0..20)
        .map(|i| (55_000 + i * 1_000, "acme", "u", "login", i))
        .collect();
    h.push(&rows);
    h.watermark(i64::MAX);
    let got = h.rows();
    assert_eq!(
        got.iter().map(|b| b.num_rows()).sum::<usize>(),
        1,
        "then quiet for the span"
    );
    let count = got[0].column(3).as_primitive::<UInt64Type>().value(0);
    assert_eq!(count, 10);
}

#[test]
fn bad_configurations_name_the_field() {
    let input = |name: &str| {
        (name == "events").then(|| StepInput {
            schema: schema(),
            event_time: Some("ts".into()),
        })
    };
    let mut c = config(
        CorrelationType::ValueCount,
        vec![RuleRef::Name("events".into())],
        &["usr"],
        1_000,
    );
    c.condition = Some(Condition {
        gte: Some(3),
        gt: None,
        field: Some("process".into()),
    });
    let field = |e: crate::OperatorError| match e {
        crate::OperatorError::Config(c) => c.field,
        other => panic!("not a configuration error: {other}"),
    };
    let e = plan_correlation("c", &c, &input).expect_err("unknown column");
    assert_eq!(field(e), "group-by");
    c.group_by = vec!["user".into()];
    c.condition = None;
    let e = plan_correlation("c", &c, &input).expect_err("no condition");
    assert_eq!(field(e), "condition");
    c.correlation = CorrelationType::TemporalOrdered;
    let e = plan_correlation("c", &c, &input).expect_err("one rule");
    assert!(e.to_string().contains("at least two rules"), "{e}");
    c.rules = vec![rule("a", "proces = 'A'"), rule("b", "true")];
    let e = plan_correlation("c", &c, &input).expect_err("bad where");
    assert_eq!(field(e), "rules[0].where");
}

#[test]
fn snapshot_and_restore_keep_pending_rows_and_sequences() {
    let mut c = config(
        CorrelationType::TemporalOrdered,
        vec![
            rule("a", "process = 'A'"),
            rule("b", "process = 'B'"),
            rule("c", "process = 'C'"),
        ],
        &["user"],
        60_000,
    );
    c.fields.insert("a".into(), vec!["process".into()]);
    let mut h = Harness::new(&c);
    h.push(&[
        (0, "acme", "u", "A", 1),
        (1_000, "acme", "u", "B", 2),
        (9_000, "acme", "u", "C", 3),
    ]);
    // A and B have run; C waits for the watermark.
    h.watermark(5_000);
    let state = h.op.snapshot().expect("snapshot");
    let mut restored = Harness::new(&c);
    restored
        .op
        .restore(state.owned_by(0, 1).expect("owned"))
        .expect("restore");
    restored.watermark(i64::MAX);
    let got = restored.rows();
    assert_eq!(sequences(&got, &["a", "b", "c"]), vec!["1,2,3"]);
    assert_eq!(
        got[0]
            .column_by_name("a_process")
            .expect("carried")
            .as_string::<i32>()
            .value(0),
        "A"
    );
}
