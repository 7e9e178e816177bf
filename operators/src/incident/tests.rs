use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch, StringArray, TimestampMillisecondArray};
use arrow::compute::concat_batches;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use vigil_engine::event_log::split_by_key;
use vigil_engine::{
    Collector, EventLog, MemoryEventLog, Operator, OperatorFactory, TaskContext, DEAD_LETTER,
};

use super::model::{events_from_batch, Event, EventKind};
use super::operator::{Condition, IncidentFactory, IncidentSpec, Rule, KEYS, OPEN, RISK, SUMMARY};
use super::Severity;
use crate::testing::Rng;

const MIN: i64 = 60_000;

fn spec(snapshot_every: usize, rules: Vec<Rule>) -> IncidentSpec {
    IncidentSpec {
        name: "incidents".into(),
        window_ms: 30 * MIN,
        rules,
        snapshot_every,
        alert_inputs: 1,
    }
}

fn default_rules() -> Vec<Rule> {
    vec![
        Rule {
            condition: Condition::Alerts(3),
            severity: Severity::High,
        },
        Rule {
            condition: Condition::Detections(2),
            severity: Severity::Critical,
        },
        Rule {
            condition: Condition::AlertSeverity(Severity::High),
            severity: Severity::High,
        },
    ]
}

fn ts() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

fn alert_schema() -> SchemaRef {
    let s = |n: &str| Field::new(n, DataType::Utf8, true);
    Arc::new(Schema::new(vec![
        s("tenant_id"),
        s("entity_type"),
        s("entity_id"),
        s("alert_id"),
        s("detection"),
        s("severity"),
        s("title"),
        Field::new("time", ts(), false),
    ]))
}

fn action_schema() -> SchemaRef {
    let s = |n: &str| Field::new(n, DataType::Utf8, true);
    Arc::new(Schema::new(vec![
        s("event_id"),
        s("event_type"),
        s("incident_id"),
        s("tenant_id"),
        s("actor"),
        s("entity_type"),
        s("entity_id"),
        s("severity"),
        s("assignee"),
        s("resolution"),
        s("reason"),
        Field::new("time", ts(), false),
    ]))
}

/// An alert: tenant, entity, alert id, detection, severity, time.
#[derive(Debug, Clone)]
struct A(String, String, String, String, &'static str, i64);

fn alerts(rows: &[A]) -> RecordBatch {
    let col = |f: &dyn Fn(&A) -> Option<String>| -> Arc<dyn Array> {
        Arc::new(StringArray::from(rows.iter().map(f).collect::<Vec<_>>()))
    };
    RecordBatch::try_new(
        alert_schema(),
        vec![
            col(&|a| Some(a.0.clone())),
            col(&|_| Some("user".into())),
            col(&|a| Some(a.1.clone())),
            col(&|a| Some(a.2.clone())),
            col(&|a| Some(a.3.clone())),
            col(&|a| Some(a.4.to_string())),
            col(&|a| Some(format!("{} on {}", a.3, a.1))),
            Arc::new(
                TimestampMillisecondArray::from(rows.iter().map(|a| a.5).collect::<Vec<_>>())
                    .with_timezone("UTC"),
            ),
        ],
    )
    .expect("test data")
}

/// An action: event id, type, incident, tenant, entity, assignee, time.
#[derive(Debug, Clone)]
struct Act(
    String,
    &'static str,
    String,
    String,
    String,
    Option<String>,
    i64,
);

fn actions(rows: &[Act]) -> RecordBatch {
    let col = |f: &dyn Fn(&Act) -> Option<String>| -> Arc<dyn Array> {
        Arc::new(StringArray::from(rows.iter().map(f).collect::<Vec<_>>()))
    };
    RecordBatch::try_new(
        action_schema(),
        vec![
            col(&|a| Some(a.0.clone())),
            col(&|a| Some(a.1.to_string())),
            col(&|a| Some(a.2.clone())),
            col(&|a| Some(a.3.clone())),
            col(&|_| Some("analyst@soc".into())),
            col(&|_| Some("user".into())),
            col(&|a| Some(a.4.clone())),
            col(&|a| (a.1 == "IncidentEscalated").then(|| "critical".into())),
            col(&|a| a.5.clone()),
            col(&|a| (a.1 == "IncidentResolved").then(|| "true_positive".into())),
            col(&|_| None),
            Arc::new(
                TimestampMillisecondArray::from(rows.iter().map(|a| a.6).collect::<Vec<_>>())
                    .with_timezone("UTC"),
            ),
        ],
    )
    .expect("test data")
}

/// One subtask of a factory, recovering from `log`.
fn subtask(
    spec: &IncidentSpec,
    log: &Arc<MemoryEventLog>,
    i: usize,
    p: usize,
) -> Box<dyn Operator> {
    let log: Arc<dyn EventLog> = log.clone();
    let f = IncidentFactory::new(spec.clone(), Some(log));
    f.create(&TaskContext::detached("incidents", i, p, 0))
        .expect("test data")
}

fn full_state(ops: &mut [Box<dyn Operator>]) -> RecordBatch {
    let batches: Vec<RecordBatch> = ops
        .iter_mut()
        .flat_map(|o| o.snapshot().expect("test data").batches)
        .collect();
    let all = concat_batches(&super::state_schema(), &batches).expect("test data");
    // Sorted by incident id, so shards' states compare as one.
    let ids = all.column(0).as_string::<i32>();
    let mut order: Vec<u32> = (0..all.num_rows() as u32).collect();
    order.sort_by_key(|i| ids.value(*i as usize).to_string());
    arrow::compute::take_record_batch(&all, &arrow::array::UInt32Array::from(order))
        .expect("test data")
}

/// Events appended after the first `batches` batches.
fn events_since(log: &MemoryEventLog, batches: usize) -> Vec<Event> {
    log.events()[batches..]
        .iter()
        .flat_map(|b| events_from_batch(b).expect("test data"))
        .map(|e| e.expect("test data"))
        .collect()
}

fn all_events(log: &MemoryEventLog) -> Vec<Event> {
    log.events()
        .iter()
        .flat_map(|b| events_from_batch(b).expect("test data"))
        .map(|e| e.expect("test data"))
        .collect()
}

/// Feeds one batch to the subtasks it routes to, as the runtime would.
fn feed(ops: &mut [Box<dyn Operator>], input: usize, batch: &RecordBatch) -> Collector {
    let mut out = Collector::new();
    let parts = split_by_key(batch, &KEYS, ops.len()).expect("test data");
    for (op, part) in ops.iter_mut().zip(parts) {
        if part.num_rows() > 0 {
            op.process_batch(input, part, &mut out).expect("test data");
        }
    }
    out
}

/// A random stream of alerts and actions with redeliveries, run with
/// crashes and restarts (sometimes at another parallelism): the live state
/// equals the state rebuilt from the latest snapshots plus the tail, and the
/// state replayed from the first event; versions are gap-free, and no
/// redelivered alert or action adds an event.
#[test]
fn replay_from_snapshot_equals_full_replay_and_live_state() {
    let mut rng = Rng(0x1dc1_de27);
    let mut rounds = 0;
    let mut total_events = 0;
    let mut restarts = 0;
    let mut redelivered = 0;
    for round in 0..2000 {
        let every = 1 + rng.below(12) as usize;
        let spec = spec(every, default_rules());
        let log = MemoryEventLog::new("incident_id");
        let mut p = 1 + rng.below(3) as usize;
        let mut ops: Vec<Box<dyn Operator>> = (0..p).map(|i| subtask(&spec, &log, i, p)).collect();
        let tenants = ["acme", "globex"];
        let users = 1 + rng.below(4);
        let steps = 4 + rng.below(28);
        let mut t = 0i64;
        let mut sent_alerts: Vec<A> = Vec::new();
        let mut sent_actions: Vec<Act> = Vec::new();
        let mut known: Vec<(String, String, String)> = Vec::new();
        let mut expect_events = 0usize;
        let mut applied_ids: HashSet<String> = HashSet::new();
        for step in 0..steps {
            t += rng.below(20 * MIN as u64) as i64;
            let before = log.events().len();
            match rng.below(10) {
                0..=5 => {
                    let n = 1 + rng.below(4);
                    let rows: Vec<A> = (0..n)
                        .map(|k| {
                            A(
                                tenants[rng.below(2) as usize].into(),
                                format!("u{}", rng.below(users)),
                                format!("a{round}-{step}-{k}"),
                                ["brute_force", "spray", "lateral"][rng.below(3) as usize].into(),
                                ["low", "medium", "high"][rng.below(3) as usize],
                                t + rng.below(MIN as u64) as i64,
                            )
                        })
                        .collect();
                    sent_alerts.extend(rows.iter().cloned());
                    feed(&mut ops, 0, &alerts(&rows));
                }
                6..=7 if !known.is_empty() => {
                    let (inc, tenant, user) = known[rng.below(known.len() as u64) as usize].clone();
                    let kind = [
                        "IncidentAssigned",
                        "IncidentResolved",
                        "IncidentReopened",
                        "IncidentEscalated",
                    ][rng.below(4) as usize];
                    // Sometimes the wrong tenant: refused, never applied.
                    let tenant = if rng.below(10) == 0 {
                        "initech".to_string()
                    } else {
                        tenant
                    };
                    let act = Act(
                        format!("act-{round}-{step}"),
                        kind,
                        inc,
                        tenant,
                        user,
                        Some(format!("analyst{}", rng.below(3))),
                        t,
                    );
                    sent_actions.push(act.clone());
                    feed(&mut ops, 1, &actions(&[act]));
                }
                8 => {
                    // Redelivery: what was sent before comes again.
                    if !sent_alerts.is_empty() {
                        let from = rng.below(sent_alerts.len() as u64) as usize;
                        feed(&mut ops, 0, &alerts(&sent_alerts[from..]));
                    }
                    if !sent_actions.is_empty() {
                        let from = rng.below(sent_actions.len() as u64) as usize;
                        feed(&mut ops, 1, &actions(&sent_actions[from..]));
                    }
                    // Nothing applied before applies again, and no alert adds
                    // anything; an action refused before is decided anew.
                    for e in events_since(&log, before) {
                        assert!(
                            e.actor != "vigil" && !applied_ids.contains(&e.event_id),
                            "round {round}: a redelivery added {e:?}"
                        );
                    }
                    redelivered += 1;
                }
                _ => {
                    // Crash: the subtasks die without a word and start again,
                    // maybe at another parallelism.
                    drop(ops);
                    p = 1 + rng.below(3) as usize;
                    ops = (0..p).map(|i| subtask(&spec, &log, i, p)).collect();
                    restarts += 1;
                }
            }
            for e in events_since(&log, before) {
                if e.kind == EventKind::Created {
                    known.push((
                        e.incident_id.clone(),
                        e.tenant_id.clone(),
                        e.entity_id.clone(),
                    ));
                }
                applied_ids.insert(e.event_id);
                expect_events += 1;
            }
        }
        let live = full_state(&mut ops);

        // Snapshot plus tail, at yet another parallelism.
        let q = 1 + rng.below(3) as usize;
        let mut restored: Vec<Box<dyn Operator>> =
            (0..q).map(|i| subtask(&spec, &log, i, q)).collect();
        assert_eq!(
            full_state(&mut restored),
            live,
            "round {round}: snapshot + tail"
        );

        // Everything from the first event.
        log.forget_snapshots();
        let mut replayed = vec![subtask(&spec, &log, 0, 1)];
        assert_eq!(
            full_state(&mut replayed),
            live,
            "round {round}: full replay"
        );

        // Versions 1, 2, 3, ... per incident; event ids unique.
        let events = all_events(&log);
        assert_eq!(events.len(), expect_events);
        let mut versions: HashMap<&str, u64> = HashMap::new();
        let mut ids = HashSet::new();
        for e in &events {
            let v = versions.entry(&e.incident_id).or_insert(0);
            assert_eq!(
                e.version,
                *v + 1,
                "round {round}: version gap on {}",
                e.incident_id
            );
            *v = e.version;
            assert!(
                ids.insert(&e.event_id),
                "round {round}: event id {} twice",
                e.event_id
            );
        }
        total_events += events.len();
        rounds += 1;
    }
    assert_eq!(rounds, 2000);
    // The rounds did real work.
    assert!(total_events > 20_000, "{total_events} events");
    assert!(restarts > 300, "{restarts} restarts");
    assert!(redelivered > 300, "{redelivered} redeliveries");
}

fn run(
    spec: &IncidentSpec,
    batches: &[(usize, RecordBatch)],
) -> (Vec<Event>, Vec<(&'static str, RecordBatch)>) {
    let log = MemoryEventLog::new("incident_id");
    let mut op = subtask(spec, &log, 0, 1);
    let mut side = Vec::new();
    for (input, b) in batches {
        let mut out = Collector::new();
        op.process_batch(*input, b.clone(), &mut out)
            .expect("test data");
        side.extend(out.take_side());
    }
    (all_events(&log), side)
}

fn user_alert(id: &str, user: &str, detection: &str, sev: &'static str, t: i64) -> A {
    A(
        "acme".into(),
        user.into(),
        id.into(),
        detection.into(),
        sev,
        t,
    )
}

#[test]
fn alerts_within_the_window_join_one_incident_and_escalate_by_rules() {
    let spec = spec(100, default_rules());
    let (events, _) = run(
        &spec,
        &[
            (
                0,
                alerts(&[user_alert("a1", "bob", "brute_force", "low", 0)]),
            ),
            (
                0,
                alerts(&[user_alert("a2", "bob", "brute_force", "low", 10 * MIN)]),
            ),
            // Third alert: alerts >= 3 raises it to high.
            (
                0,
                alerts(&[user_alert("a3", "bob", "brute_force", "low", 35 * MIN)]),
            ),
            // A second detection: critical.
            (
                0,
                alerts(&[user_alert("a4", "bob", "spray", "low", 40 * MIN)]),
            ),
            // More than 30 minutes after the latest alert: a new incident.
            (
                0,
                alerts(&[user_alert("a5", "bob", "spray", "low", 71 * MIN)]),
            ),
            // Another entity: its own incident.
            (
                0,
                alerts(&[user_alert("a6", "eve", "spray", "low", 71 * MIN)]),
            ),
        ],
    );
    let kinds: Vec<(&str, Option<Severity>)> = events
        .iter()
        .map(|e| (e.kind.as_str(), e.severity))
        .collect();
    assert_eq!(
        kinds,
        vec![
            ("IncidentCreated", Some(Severity::Low)),
            ("AlertAttached", Some(Severity::Low)),
            ("AlertAttached", Some(Severity::Low)),
            ("IncidentEscalated", Some(Severity::High)),
            ("AlertAttached", Some(Severity::Low)),
            ("IncidentEscalated", Some(Severity::Critical)),
            ("IncidentCreated", Some(Severity::Low)),
            ("IncidentCreated", Some(Severity::Low)),
        ]
    );
    assert_eq!(events[3].rule.as_deref(), Some("alerts >= 3"));
    assert_eq!(events[5].rule.as_deref(), Some("detections >= 2"));
    assert_eq!(events[5].previous_severity, Some(Severity::High));
    let first = &events[0].incident_id;
    assert!(events[..6].iter().all(|e| &e.incident_id == first));
    assert_ne!(&events[6].incident_id, first);
    assert_ne!(events[6].incident_id, events[7].incident_id);
}

#[test]
fn ids_are_the_same_in_every_run() {
    let spec = spec(100, default_rules());
    let input = [(
        0,
        alerts(&[user_alert("a1", "bob", "brute_force", "high", 0)]),
    )];
    let (one, _) = run(&spec, &input);
    let (two, _) = run(&spec, &input);
    assert_eq!(one, two);
    assert_eq!(
        one[0].incident_id.len(),
        36,
        "a UUID: {}",
        one[0].incident_id
    );
}

#[test]
fn a_resolved_incident_leaves_the_open_model_and_the_next_alert_opens_another() {
    let spec = spec(100, default_rules());
    let (events, _) = run(
        &spec,
        &[(0, alerts(&[user_alert("a1", "bob", "spray", "medium", 0)]))],
    );
    let inc = events[0].incident_id.clone();
    let resolve = Act(
        "r1".into(),
        "IncidentResolved",
        inc.clone(),
        "acme".into(),
        "bob".into(),
        None,
        MIN,
    );
    let (events, side) = run(
        &spec,
        &[
            (0, alerts(&[user_alert("a1", "bob", "spray", "medium", 0)])),
            (1, actions(std::slice::from_ref(&resolve))),
            // Redelivered: ignored.
            (1, actions(&[resolve])),
            (
                0,
                alerts(&[user_alert("a2", "bob", "spray", "medium", 2 * MIN)]),
            ),
        ],
    );
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(
        kinds,
        ["IncidentCreated", "IncidentResolved", "IncidentCreated"]
    );
    assert_eq!(events[1].version, 2);
    assert_eq!(events[1].resolution.as_deref(), Some("true_positive"));
    assert_ne!(events[2].incident_id, inc);
    let ops = |port: &str| -> Vec<(String, String)> {
        side.iter()
            .filter(|(p, _)| *p == port)
            .flat_map(|(_, b)| {
                let op = b
                    .column_by_name("op")
                    .expect("test data")
                    .as_string::<i32>()
                    .clone();
                let key = b.column(1).as_string::<i32>().clone();
                (0..b.num_rows())
                    .map(move |i| (op.value(i).to_string(), key.value(i).to_string()))
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let open = ops(OPEN);
    assert_eq!(open[0], ("upsert".to_string(), inc.clone()));
    assert_eq!(open[1], ("delete".to_string(), inc.clone()));
    assert_eq!(open[2].0, "upsert");
    // The summary keeps the resolved incident.
    assert!(ops(SUMMARY).iter().all(|(op, _)| op == "upsert"));
    // bob's risk: one open incident, then none (a delete), then one again.
    let risk: Vec<String> = ops(RISK).into_iter().map(|(op, _)| op).collect();
    assert_eq!(risk, ["upsert", "delete", "upsert"]);
}

#[test]
fn actions_that_do_not_fit_go_to_dead_letters_with_the_reason() {
    let spec = spec(100, default_rules());
    let (events, _) = run(
        &spec,
        &[(0, alerts(&[user_alert("a1", "bob", "spray", "medium", 0)]))],
    );
    let inc = events[0].incident_id.clone();
    let bad = [
        Act(
            "x1".into(),
            "IncidentReopened",
            inc.clone(),
            "acme".into(),
            "bob".into(),
            None,
            MIN,
        ),
        Act(
            "x2".into(),
            "IncidentAssigned",
            inc.clone(),
            "globex".into(),
            "bob".into(),
            Some("mallory".into()),
            MIN,
        ),
        Act(
            "x3".into(),
            "IncidentAssigned",
            "nope".into(),
            "acme".into(),
            "bob".into(),
            Some("a".into()),
            MIN,
        ),
        Act(
            "x4".into(),
            "IncidentAssigned",
            inc.clone(),
            "acme".into(),
            "bob".into(),
            None,
            MIN,
        ),
        Act(
            "x5".into(),
            "IncidentCreated",
            inc.clone(),
            "acme".into(),
            "bob".into(),
            None,
            MIN,
        ),
    ];
    let (events, side) = run(
        &spec,
        &[
            (0, alerts(&[user_alert("a1", "bob", "spray", "medium", 0)])),
            (1, actions(&bad)),
        ],
    );
    assert_eq!(events.len(), 1, "nothing applied");
    let dead: Vec<String> = side
        .iter()
        .filter(|(p, _)| *p == DEAD_LETTER)
        .flat_map(|(_, b)| {
            let r = b
                .column_by_name("reason")
                .expect("test data")
                .as_string::<i32>()
                .clone();
            (0..b.num_rows())
                .map(move |i| r.value(i).to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(dead.len(), 5, "{dead:?}");
    assert!(dead[0].contains("the incident is open"), "{}", dead[0]);
    // Another tenant's request does not reach the incident.
    assert!(
        dead[1].contains("no incident") || dead[1].contains("another tenant"),
        "{}",
        dead[1]
    );
    assert!(dead[2].contains("no incident nope"), "{}", dead[2]);
    assert!(dead[3].contains("needs an assignee"), "{}", dead[3]);
    assert!(dead[4].contains("opened and fed by alerts"), "{}", dead[4]);
    let raw = side
        .iter()
        .find(|(p, _)| *p == DEAD_LETTER)
        .map(|(_, b)| {
            b.column_by_name("raw")
                .expect("test data")
                .as_string::<i32>()
                .value(0)
                .to_string()
        })
        .expect("test data");
    assert!(raw.contains("\"event_id\":\"x1\""), "{raw}");
}

#[test]
fn a_restart_reads_only_the_tail_after_the_snapshots() {
    let spec = spec(10, default_rules());
    let log = MemoryEventLog::new("incident_id");
    let mut op = subtask(&spec, &log, 0, 1);
    let rows: Vec<A> = (0..200)
        .map(|i| {
            user_alert(
                &format!("a{i}"),
                &format!("u{}", i % 50),
                "spray",
                "low",
                i * 1000,
            )
        })
        .collect();
    for chunk in rows.chunks(7) {
        op.process_batch(0, alerts(chunk), &mut Collector::new())
            .expect("test data");
    }
    let total = all_events(&log).len();
    drop(op);
    let rec = log.recover().expect("test data");
    assert!(
        rec.events_read < 20,
        "{} of {total} events read",
        rec.events_read
    );
    let snap: usize = rec.snapshot.iter().map(|b| b.num_rows()).sum();
    assert_eq!(snap, 50, "one row per incident");
    // Counts per entity survive: 4 alerts each.
    let mut op = subtask(&spec, &log, 0, 1);
    let state = full_state(std::slice::from_mut(&mut op));
    let counts = state
        .column_by_name("alert_count")
        .expect("test data")
        .as_primitive::<arrow::datatypes::UInt64Type>();
    assert!(counts.iter().all(|c| c == Some(4)));
    let by_entity: BTreeMap<String, u64> = (0..state.num_rows())
        .map(|i| {
            (
                state
                    .column_by_name("entity_id")
                    .expect("test data")
                    .as_string::<i32>()
                    .value(i)
                    .to_string(),
                counts.value(i),
            )
        })
        .collect();
    assert_eq!(by_entity.len(), 50);
}

#[test]
fn a_resolution_without_a_reason_says_resolved_in_the_log() {
    let spec = spec(100, default_rules());
    let (events, _) = run(
        &spec,
        &[(0, alerts(&[user_alert("a1", "bob", "spray", "medium", 0)]))],
    );
    let inc = events[0].incident_id.clone();
    let mut batch = actions(&[Act(
        "r1".into(),
        "IncidentResolved",
        inc,
        "acme".into(),
        "bob".into(),
        None,
        MIN,
    )]);
    // No resolution column value at all.
    let i = batch.schema().index_of("resolution").expect("column");
    let mut cols = batch.columns().to_vec();
    cols[i] = Arc::new(StringArray::from(vec![None::<&str>]));
    batch = RecordBatch::try_new(batch.schema(), cols).expect("batch");
    let (events, _) = run(
        &spec,
        &[
            (0, alerts(&[user_alert("a1", "bob", "spray", "medium", 0)])),
            (1, batch),
        ],
    );
    assert_eq!(events[1].kind, EventKind::Resolved);
    assert_eq!(events[1].resolution.as_deref(), Some("resolved"));
}
