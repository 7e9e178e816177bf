//! The `incidents` operator: alerts and analysts' actions in, incident
//! events out, read models beside them.
//!
//! A [`Projection`] holds one shard's incidents (those of the entities
//! hashed to it) and is the aggregate's whole logic, with no I/O:
//!
//! * an alert joins its entity's latest incident when that one is open and
//!   its latest alert is at most `window` earlier; otherwise it opens a new
//!   incident. Escalation rules run after each alert;
//! * an action (an event written by a person) gets the incident's next
//!   version and is applied if it fits;
//! * every event goes through [`Incident::apply`], the fold a replay uses.
//!
//! Events apply in the order they arrive per entity, and the log keeps that
//! order, so a replay is exact. The operator appends the events it applies
//! to its [`EventLog`], and after `snapshot_every` events snapshots the
//! incidents it changed; at start it folds the log's latest snapshot and
//! tail into the state before any input. After each batch it emits the read
//! models' changes: the incident summary, the open incidents (a delete when
//! one is resolved) and each entity's risk (a delete when it has no open
//! incident).

use std::collections::BTreeSet;

use ahash::{AHashMap as HashMap, AHashSet as HashSet};
use std::sync::{Arc, OnceLock};

use arrow::array::{ArrayRef, Float64Array, RecordBatch, StringBuilder, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::json::LineDelimitedWriter;
use vigil_engine::dead_letter::DeadLetters;
use vigil_engine::event_log::split_by_key;
use vigil_engine::operator::SidePort;
use vigil_engine::{
    Collector, EngineError, EventLog, Operator, OperatorFactory, OperatorState, Recovery, Result,
    TaskContext, DEAD_LETTER,
};

use super::model::{
    event_id, events_from_batch, events_to_batch, state_from_batch, state_to_batch, Applied,
    Columns, Event, EventKind, Incident, Severity, Status,
};

/// Side output: the incident summary read model.
pub const SUMMARY: SidePort = "summary";
/// Side output: the open-incidents read model.
pub const OPEN: SidePort = "open_incidents";
/// Side output: the entity-risk read model.
pub const RISK: SidePort = "entity_risk";

/// Columns that route an alert or action to its shard.
pub const KEYS: [&str; 3] = ["tenant_id", "entity_type", "entity_id"];

/// When an escalation rule holds.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    /// At least this many alerts.
    Alerts(u64),
    /// At least this many distinct detections.
    Detections(usize),
    /// An alert at least this severe.
    AlertSeverity(Severity),
}

/// An escalation rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// When it holds.
    pub condition: Condition,
    /// The severity it raises the incident to.
    pub severity: Severity,
}

impl Rule {
    fn holds(&self, inc: &Incident) -> bool {
        match self.condition {
            Condition::Alerts(n) => inc.alert_count >= n,
            Condition::Detections(n) => inc.detections.len() >= n,
            Condition::AlertSeverity(s) => inc.max_alert_severity >= s,
        }
    }

    fn describe(&self) -> String {
        match self.condition {
            Condition::Alerts(n) => format!("alerts >= {n}"),
            Condition::Detections(n) => format!("detections >= {n}"),
            Condition::AlertSeverity(s) => format!("alert severity >= {}", s.as_str()),
        }
    }
}

/// What the operator needs: its rules, checked.
#[derive(Debug, Clone)]
pub struct IncidentSpec {
    /// Step name.
    pub name: String,
    /// How long after an incident's latest alert another one still joins it.
    pub window_ms: i64,
    /// Escalation rules.
    pub rules: Vec<Rule>,
    /// Events between a shard's snapshots.
    pub snapshot_every: usize,
    /// Inputs `0..alert_inputs` are alerts; the one after, if any, actions.
    pub alert_inputs: usize,
}

/// One alert, read from a prepared alert row.
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    /// Whose.
    pub tenant_id: String,
    /// About what.
    pub entity_type: String,
    /// About which.
    pub entity_id: String,
    /// Its id.
    pub alert_id: String,
    /// The rule that fired.
    pub detection: String,
    /// How severe.
    pub severity: Severity,
    /// A title for an incident it opens.
    pub title: String,
    /// When (ms).
    pub time_ms: i64,
}

type EntityKey = (String, String, String);

#[derive(Debug, Clone, Default, PartialEq)]
struct EntityState {
    /// The entity's most recent incident.
    latest: String,
    /// Its open incidents.
    open: BTreeSet<String>,
    /// All its incidents, oldest first (by creation time, then id): an
    /// alert redelivered after a newer incident opened is found in the one
    /// it joined.
    all: Vec<String>,
}

/// Counts of what a projection ignored or refused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ignored {
    /// Events or alerts already applied.
    pub duplicates: u64,
    /// Log events a snapshot already held.
    pub stale: u64,
}

/// One shard's incidents and the logic that changes them.
#[derive(Debug, Clone)]
pub struct Projection {
    spec: Arc<IncidentSpec>,
    incidents: HashMap<String, Incident>,
    entities: HashMap<EntityKey, EntityState>,
    dirty_snapshot: HashSet<String>,
    dirty_models: HashSet<String>,
    dirty_entities: HashSet<EntityKey>,
    since_snapshot: usize,
    /// What was ignored.
    pub ignored: Ignored,
}

impl Projection {
    /// Incidents and entities held, and an estimate of their bytes (the
    /// entries themselves and their keys; strings inside are not walked).
    pub fn size(&self) -> vigil_engine::StateSize {
        let incidents: usize = self
            .incidents
            .keys()
            .map(|k| 2 * k.len() + std::mem::size_of::<Incident>() + 16)
            .sum();
        let entities = self.entities.len()
            * (std::mem::size_of::<EntityKey>() + std::mem::size_of::<EntityState>() + 16);
        vigil_engine::StateSize {
            keys: (self.incidents.len() + self.entities.len()) as u64,
            bytes: (incidents + entities) as u64,
        }
    }

    /// An empty shard.
    pub fn new(spec: Arc<IncidentSpec>) -> Self {
        Self {
            spec,
            incidents: HashMap::new(),
            entities: HashMap::new(),
            dirty_snapshot: HashSet::new(),
            dirty_models: HashSet::new(),
            dirty_entities: HashSet::new(),
            since_snapshot: 0,
            ignored: Ignored::default(),
        }
    }

    /// The incidents, by id.
    pub fn incidents(&self) -> &HashMap<String, Incident> {
        &self.incidents
    }

    fn entity_key(inc: &Incident) -> EntityKey {
        (
            inc.tenant_id.clone(),
            inc.entity_type.clone(),
            inc.entity_id.clone(),
        )
    }

    fn touched(&mut self, id: &str) {
        let Some(inc) = self.incidents.get(id) else {
            return;
        };
        let key = Self::entity_key(inc);
        let open = inc.status == Status::Open;
        let e = self.entities.entry(key.clone()).or_default();
        if open {
            e.open.insert(id.to_string());
        } else {
            e.open.remove(id);
        }
        self.dirty_snapshot.insert(id.to_string());
        self.dirty_models.insert(id.to_string());
        self.dirty_entities.insert(key);
    }

    /// Applies one event (from the log, or decided here). Errors name the
    /// event and change nothing.
    pub fn apply(&mut self, ev: &Event) -> Result<Applied> {
        let outcome = match self.incidents.get_mut(&ev.incident_id) {
            Some(inc) => inc.apply(ev)?,
            None => {
                let inc = Incident::create(ev)?;
                self.insert(inc);
                Applied::Applied
            }
        };
        match outcome {
            Applied::Applied => {
                self.since_snapshot += 1;
                self.touched(&ev.incident_id);
            }
            Applied::Duplicate => self.ignored.duplicates += 1,
            Applied::Stale => self.ignored.stale += 1,
        }
        Ok(outcome)
    }

    /// Decides what `alert` does, applies it, and appends the events to
    /// `out`. A redelivered alert does nothing.
    pub fn on_alert(&mut self, a: &Alert, out: &mut Vec<Event>) -> Result<()> {
        let key = (
            a.tenant_id.clone(),
            a.entity_type.clone(),
            a.entity_id.clone(),
        );
        let entity = self.entities.get(&key);
        let seen = entity.is_some_and(|e| {
            e.all
                .iter()
                .rev()
                .filter_map(|i| self.incidents.get(i))
                .any(|i| i.alerts.contains(&a.alert_id))
        });
        if seen {
            self.ignored.duplicates += 1;
            return Ok(());
        }
        let latest = entity.and_then(|e| self.incidents.get(&e.latest));
        let base = |kind, incident_id: &str, id: String, version| Event {
            event_id: id,
            kind,
            incident_id: incident_id.to_string(),
            version,
            time_ms: a.time_ms,
            tenant_id: a.tenant_id.clone(),
            actor: "vigil".into(),
            entity_type: a.entity_type.clone(),
            entity_id: a.entity_id.clone(),
            severity: Some(a.severity),
            previous_severity: None,
            detection: Some(a.detection.clone()),
            alert_id: Some(a.alert_id.clone()),
            title: None,
            rule: None,
            assignee: None,
            resolution: None,
            reason: None,
        };
        let ev = match latest {
            Some(inc)
                if inc.status == Status::Open
                    && a.time_ms <= inc.last_alert_ms.saturating_add(self.spec.window_ms)
                    && a.time_ms >= inc.created_ms.saturating_sub(self.spec.window_ms) =>
            {
                let id = event_id(&[&inc.id, "alert", &a.alert_id]);
                base(EventKind::AlertAttached, &inc.id, id, inc.version + 1)
            }
            _ => {
                let incident = event_id(&[&a.tenant_id, &a.entity_type, &a.entity_id, &a.alert_id]);
                let id = event_id(&[&incident, "created"]);
                let mut ev = base(EventKind::Created, &incident, id, 1);
                ev.title = Some(a.title.clone());
                ev
            }
        };
        let incident = ev.incident_id.clone();
        if self.apply(&ev)? == Applied::Applied {
            out.push(ev);
        }
        self.escalate(&incident, a.time_ms, out)
    }

    fn escalate(&mut self, id: &str, time_ms: i64, out: &mut Vec<Event>) -> Result<()> {
        let Some(inc) = self.incidents.get(id) else {
            return Ok(());
        };
        let Some(rule) = self
            .spec
            .rules
            .iter()
            .filter(|r| r.holds(inc) && r.severity > inc.severity)
            .max_by_key(|r| r.severity)
        else {
            return Ok(());
        };
        let version = inc.version + 1;
        let ev = Event {
            event_id: event_id(&[id, "escalated", &version.to_string()]),
            kind: EventKind::Escalated,
            incident_id: id.to_string(),
            version,
            time_ms,
            tenant_id: inc.tenant_id.clone(),
            actor: "vigil".into(),
            entity_type: inc.entity_type.clone(),
            entity_id: inc.entity_id.clone(),
            severity: Some(rule.severity),
            previous_severity: Some(inc.severity),
            detection: None,
            alert_id: None,
            title: None,
            rule: Some(rule.describe()),
            assignee: None,
            resolution: None,
            reason: None,
        };
        if self.apply(&ev)? == Applied::Applied {
            out.push(ev);
        }
        Ok(())
    }

    /// Applies an action written by a person: it gets the incident's next
    /// version. Incidents are opened by alerts, so `IncidentCreated` and
    /// `AlertAttached` are refused here.
    pub fn on_action(&mut self, mut ev: Event, out: &mut Vec<Event>) -> Result<Applied> {
        if matches!(ev.kind, EventKind::Created | EventKind::AlertAttached) {
            return Err(EngineError::User(format!(
                "{} {}: incidents are opened and fed by alerts, not by actions",
                ev.kind.as_str(),
                ev.event_id
            )));
        }
        let Some(inc) = self.incidents.get(&ev.incident_id) else {
            return Err(EngineError::User(format!(
                "{} {}: no incident {} for {} {} in tenant {}",
                ev.kind.as_str(),
                ev.event_id,
                ev.incident_id,
                ev.entity_type,
                ev.entity_id,
                ev.tenant_id
            )));
        };
        if inc.applied.contains(&ev.event_id) {
            self.ignored.duplicates += 1;
            return Ok(Applied::Duplicate);
        }
        match ev.kind {
            EventKind::Escalated => ev.previous_severity = Some(inc.severity),
            // The log's record says how; "resolved" when the action does not.
            EventKind::Resolved if ev.resolution.is_none() => {
                ev.resolution = Some("resolved".into())
            }
            _ => {}
        }
        ev.version = inc.version + 1;
        let outcome = self.apply(&ev)?;
        if outcome == Applied::Applied {
            out.push(ev);
        }
        Ok(outcome)
    }

    /// Adds an incident to its entity. An entity's latest incident is the
    /// one created last in event time (ties by id), a choice that does not
    /// depend on the order the log's partitions are read in.
    fn insert(&mut self, inc: Incident) {
        let key = Self::entity_key(&inc);
        let id = inc.id.clone();
        let rank = (inc.created_ms, inc.id.clone());
        let e = self.entities.entry(key.clone()).or_default();
        if inc.status == Status::Open {
            e.open.insert(id.clone());
        }
        self.incidents.insert(id.clone(), inc);
        let incidents = &self.incidents;
        let at = e.all.partition_point(|i| {
            incidents
                .get(i)
                .is_some_and(|x| (x.created_ms, x.id.clone()) < rank)
        });
        e.all.insert(at, id.clone());
        if let Some(last) = e.all.last() {
            e.latest = last.clone();
        }
        self.dirty_models.insert(id);
        self.dirty_entities.insert(key);
    }

    /// Puts snapshot rows in place (before any event).
    pub fn load(&mut self, incidents: Vec<Incident>) {
        for inc in incidents {
            self.insert(inc);
        }
    }

    /// The rows of every incident (a full snapshot), sorted by id.
    pub fn state(&self) -> Result<RecordBatch> {
        let mut all: Vec<&Incident> = self.incidents.values().collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        state_to_batch(all)
    }

    /// The rows of the incidents changed since the last call, if it is time
    /// for a snapshot; with `force`, now (possibly no rows: the snapshot
    /// then only moves the shard's marker).
    pub fn take_snapshot(&mut self, force: bool) -> Result<Option<RecordBatch>> {
        if !force
            && (self.dirty_snapshot.is_empty() || self.since_snapshot < self.spec.snapshot_every)
        {
            return Ok(None);
        }
        let mut ids: Vec<String> = self.dirty_snapshot.drain().collect();
        ids.sort_unstable();
        self.since_snapshot = 0;
        let rows = state_to_batch(ids.iter().filter_map(|id| self.incidents.get(id)))?;
        Ok(Some(rows))
    }

    /// The read models' changes since the last call.
    pub fn take_models(&mut self) -> Result<Models> {
        let mut ids: Vec<String> = self.dirty_models.drain().collect();
        ids.sort_unstable();
        let changed: Vec<&Incident> = ids.iter().filter_map(|i| self.incidents.get(i)).collect();
        let summary = summary_rows(&changed, |_| "upsert")?;
        let open = summary_rows(&changed, |i| {
            if i.status == Status::Open {
                "upsert"
            } else {
                "delete"
            }
        })?;
        let mut entities: Vec<EntityKey> = self.dirty_entities.drain().collect();
        entities.sort_unstable();
        let risk = risk_rows(&entities, &self.entities, &self.incidents)?;
        Ok(Models {
            summary,
            open,
            risk,
        })
    }
}

/// One batch of read-model changes.
#[derive(Debug)]
pub struct Models {
    /// Incident summaries.
    pub summary: RecordBatch,
    /// Open incidents; `op = delete` when one is resolved.
    pub open: RecordBatch,
    /// Entity risk; `op = delete` when an entity has no open incident.
    pub risk: RecordBatch,
}

fn ts_type() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

/// Columns of the incident summary and open-incident read models.
pub fn summary_schema() -> SchemaRef {
    static S: OnceLock<SchemaRef> = OnceLock::new();
    S.get_or_init(|| {
        let s = |n: &str, null: bool| Field::new(n, DataType::Utf8, null);
        Arc::new(Schema::new(vec![
            s("op", false),
            s("incident_id", false),
            s("tenant_id", false),
            s("status", false),
            s("severity", false),
            s("title", false),
            s("entity_type", false),
            s("entity_id", false),
            Field::new("alert_count", DataType::UInt64, false),
            s("detections", false),
            s("assignee", true),
            s("resolution", true),
            Field::new("created_at", ts_type(), false),
            Field::new("updated_at", ts_type(), false),
            Field::new("version", DataType::UInt64, false),
        ]))
    })
    .clone()
}

/// Columns of the entity-risk read model.
pub fn risk_schema() -> SchemaRef {
    static S: OnceLock<SchemaRef> = OnceLock::new();
    S.get_or_init(|| {
        let s = |n: &str, null: bool| Field::new(n, DataType::Utf8, null);
        Arc::new(Schema::new(vec![
            s("op", false),
            s("entity", false),
            s("id", false),
            s("tenant_id", false),
            s("entity_type", false),
            s("entity_id", false),
            Field::new("risk_score", DataType::Float64, false),
            Field::new("open_incidents", DataType::UInt64, false),
            s("max_severity", true),
            s("incident_ids", false),
            Field::new("updated_at", ts_type(), true),
        ]))
    })
    .clone()
}

fn summary_rows(
    incidents: &[&Incident],
    op: impl Fn(&Incident) -> &'static str,
) -> Result<RecordBatch> {
    let n = incidents.len();
    let strings = |f: &dyn Fn(&Incident) -> Option<&str>| -> ArrayRef {
        let mut b = StringBuilder::with_capacity(n, n * 16);
        for i in incidents {
            b.append_option(f(i));
        }
        Arc::new(b.finish())
    };
    let times = |f: &dyn Fn(&Incident) -> i64| -> ArrayRef {
        Arc::new(
            arrow::array::TimestampMillisecondArray::from_iter_values(
                incidents.iter().map(|i| f(i)),
            )
            .with_timezone("UTC"),
        )
    };
    let columns: Vec<ArrayRef> = vec![
        strings(&|i| Some(op(i))),
        strings(&|i| Some(&i.id)),
        strings(&|i| Some(&i.tenant_id)),
        strings(&|i| Some(i.status.as_str())),
        strings(&|i| Some(i.severity.as_str())),
        strings(&|i| Some(&i.title)),
        strings(&|i| Some(&i.entity_type)),
        strings(&|i| Some(&i.entity_id)),
        Arc::new(UInt64Array::from_iter_values(
            incidents.iter().map(|i| i.alert_count),
        )),
        {
            let mut b = StringBuilder::with_capacity(n, n * 16);
            for i in incidents {
                let mut first = true;
                let mut text = String::new();
                for d in &i.detections {
                    if !first {
                        text.push(',');
                    }
                    text.push_str(d);
                    first = false;
                }
                b.append_value(text);
            }
            Arc::new(b.finish())
        },
        strings(&|i| i.assignee.as_deref()),
        strings(&|i| i.resolution.as_deref()),
        times(&|i| i.created_ms),
        times(&|i| i.updated_ms),
        Arc::new(UInt64Array::from_iter_values(
            incidents.iter().map(|i| i.version),
        )),
    ];
    Ok(RecordBatch::try_new(summary_schema(), columns)?)
}

/// Weight of an open incident in its entity's risk score (0-100).
fn weight(s: Severity) -> f64 {
    match s {
        Severity::Low => 10.0,
        Severity::Medium => 25.0,
        Severity::High => 50.0,
        Severity::Critical => 80.0,
    }
}

fn risk_rows(
    keys: &[EntityKey],
    entities: &HashMap<EntityKey, EntityState>,
    incidents: &HashMap<String, Incident>,
) -> Result<RecordBatch> {
    let n = keys.len();
    let mut op = StringBuilder::with_capacity(n, n * 6);
    let mut entity = StringBuilder::with_capacity(n, n * 24);
    let mut id = StringBuilder::with_capacity(n, n * 32);
    let mut tenant = StringBuilder::with_capacity(n, n * 8);
    let mut etype = StringBuilder::with_capacity(n, n * 4);
    let mut eid = StringBuilder::with_capacity(n, n * 16);
    let mut max_sev = StringBuilder::with_capacity(n, n * 6);
    let mut ids = StringBuilder::with_capacity(n, n * 36);
    let mut score = Vec::with_capacity(n);
    let mut open = Vec::with_capacity(n);
    let mut updated = Vec::with_capacity(n);
    for k in keys {
        let list: Vec<&Incident> = entities
            .get(k)
            .map(|e| e.open.iter().filter_map(|i| incidents.get(i)).collect())
            .unwrap_or_default();
        op.append_value(if list.is_empty() { "delete" } else { "upsert" });
        entity.append_value(format!("{}:{}", k.1, k.2));
        id.append_value(format!("{}/{}:{}", k.0, k.1, k.2));
        tenant.append_value(&k.0);
        etype.append_value(&k.1);
        eid.append_value(&k.2);
        max_sev.append_option(list.iter().map(|i| i.severity).max().map(Severity::as_str));
        ids.append_value(
            list.iter()
                .map(|i| i.id.as_str())
                .collect::<Vec<_>>()
                .join(","),
        );
        score.push(
            list.iter()
                .map(|i| weight(i.severity))
                .sum::<f64>()
                .min(100.0),
        );
        open.push(list.len() as u64);
        updated.push(list.iter().map(|i| i.updated_ms).max());
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(op.finish()),
        Arc::new(entity.finish()),
        Arc::new(id.finish()),
        Arc::new(tenant.finish()),
        Arc::new(etype.finish()),
        Arc::new(eid.finish()),
        Arc::new(Float64Array::from(score)),
        Arc::new(UInt64Array::from(open)),
        Arc::new(max_sev.finish()),
        Arc::new(ids.finish()),
        Arc::new(arrow::array::TimestampMillisecondArray::from(updated).with_timezone("UTC")),
    ];
    Ok(RecordBatch::try_new(risk_schema(), columns)?)
}

/// Reads the alerts of a prepared alert batch; a row that is not a valid
/// alert is returned as the reason in its place.
pub fn alerts_from_batch(batch: &RecordBatch) -> Result<Vec<std::result::Result<Alert, String>>> {
    let names = [
        "tenant_id",
        "entity_type",
        "entity_id",
        "alert_id",
        "detection",
        "severity",
        "title",
        "time",
    ];
    let c = Columns::new(batch, &names)?;
    let mut out = Vec::with_capacity(batch.num_rows());
    for row in 0..batch.num_rows() {
        let req = |i: usize| match c.str(i, row) {
            Some(s) if !s.is_empty() => Ok(s.to_string()),
            _ => Err(format!("{} is missing", names[i])),
        };
        let alert = (|| {
            let severity = req(5)?;
            Ok(Alert {
                tenant_id: req(0)?,
                entity_type: req(1)?,
                entity_id: req(2)?,
                alert_id: req(3)?,
                detection: req(4)?,
                severity: Severity::parse(&severity).ok_or_else(|| {
                    format!("severity {severity:?} is not low, medium, high or critical")
                })?,
                title: c.str(6, row).unwrap_or_default().to_string(),
                time_ms: c.time(7, row).ok_or("time is missing")?,
            })
        })();
        out.push(alert);
    }
    Ok(out)
}

/// Builds `incidents` subtasks. They share the event log, which is read
/// once, by the first subtask created, and split by shard.
pub struct IncidentFactory {
    spec: Arc<IncidentSpec>,
    log: Option<Arc<dyn EventLog>>,
    recovered: OnceLock<std::result::Result<Arc<Recovery>, String>>,
}

impl std::fmt::Debug for IncidentFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IncidentFactory")
            .field("spec", &self.spec)
            .finish()
    }
}

impl IncidentFactory {
    /// A factory for `spec`, with its event log (none: state lives only in
    /// memory and checkpoints).
    pub fn new(spec: IncidentSpec, log: Option<Arc<dyn EventLog>>) -> Self {
        Self {
            spec: Arc::new(spec),
            log,
            recovered: OnceLock::new(),
        }
    }

    fn recovery(&self) -> Result<Option<Arc<Recovery>>> {
        let Some(log) = &self.log else {
            return Ok(None);
        };
        match self
            .recovered
            .get_or_init(|| log.recover().map(Arc::new).map_err(|e| e.to_string()))
        {
            Ok(r) => Ok(Some(r.clone())),
            Err(e) => Err(EngineError::User(format!(
                "{}: cannot recover from {}: {e}",
                self.spec.name,
                log.describe()
            ))),
        }
    }
}

impl OperatorFactory for IncidentFactory {
    fn output_schema(&self) -> SchemaRef {
        super::model::event_schema()
    }

    /// An incident event happens when the alert or action behind it did.
    fn event_time_column(&self) -> Option<String> {
        Some("time".to_string())
    }

    fn create(&self, ctx: &TaskContext) -> Result<Box<dyn Operator>> {
        let mut op = IncidentOperator {
            spec: self.spec.clone(),
            projection: Projection::new(self.spec.clone()),
            log: self.log.clone(),
            ctx: ctx.clone(),
            publish: true,
        };
        if let Some(rec) = self.recovery()? {
            op.recover(&rec)?;
        }
        Ok(Box::new(op))
    }

    fn key_columns(&self) -> Vec<String> {
        KEYS.iter().map(|s| s.to_string()).collect()
    }

    fn side_outputs(&self) -> Vec<(SidePort, SchemaRef)> {
        vec![
            (SUMMARY, summary_schema()),
            (OPEN, summary_schema()),
            (RISK, risk_schema()),
            (DEAD_LETTER, vigil_engine::dead_letter::schema()),
        ]
    }

    fn describe(&self) -> String {
        let log = self
            .log
            .as_ref()
            .map_or("no event log".to_string(), |l| l.describe());
        format!(
            "incidents by {} within {} ({} escalation rules), snapshot every {} events, {log}",
            KEYS.join(", "),
            humantime::format_duration(std::time::Duration::from_millis(
                self.spec.window_ms.max(0) as u64
            )),
            self.spec.rules.len(),
            self.spec.snapshot_every
        )
    }
}

struct IncidentOperator {
    spec: Arc<IncidentSpec>,
    projection: Projection,
    log: Option<Arc<dyn EventLog>>,
    ctx: TaskContext,
    /// The read models are published whole once (after a restart they are
    /// rebuilt downstream from this).
    publish: bool,
}

impl IncidentOperator {
    fn shard(&self, batches: &[RecordBatch]) -> Result<Vec<RecordBatch>> {
        let p = self.ctx.parallelism;
        let mut out = Vec::with_capacity(batches.len());
        for b in batches {
            let parts = split_by_key(b, &KEYS, p)?;
            if let Some(mine) = parts.into_iter().nth(self.ctx.subtask) {
                out.push(mine);
            }
        }
        Ok(out)
    }

    /// Folds this shard's part of the log's snapshot and tail.
    fn recover(&mut self, rec: &Recovery) -> Result<()> {
        for b in self.shard(&rec.snapshot)? {
            self.projection.load(state_from_batch(&b)?);
        }
        let mut dead = DeadLetters::new(&self.ctx.node);
        for b in self.shard(&rec.tail)? {
            for (row, ev) in events_from_batch(&b)?.into_iter().enumerate() {
                let outcome = ev
                    .map_err(EngineError::User)
                    .and_then(|ev| self.projection.apply(&ev));
                if let Err(e) = outcome {
                    tracing::trace!(operator = %self.ctx.node, error = %e, "event log record not applied");
                    dead.push(
                        "event log",
                        Some(row as u64),
                        "rejected_event",
                        &e.to_string(),
                        b"",
                    );
                }
            }
        }
        if let Some(rows) = dead.finish()? {
            self.ctx
                .metrics
                .dead_lettered("rejected_event", rows.num_rows() as u64);
        }
        tracing::info!(
            operator = %self.ctx.node,
            subtask = self.ctx.subtask,
            incidents = self.projection.incidents.len(),
            events = rec.events_read,
            "incidents recovered from the event log"
        );
        Ok(())
    }

    fn rejected(
        &self,
        batch: &RecordBatch,
        rows: &[(usize, String)],
        what: &str,
        out: &mut Collector,
    ) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut json = Vec::new();
        {
            let mut w = LineDelimitedWriter::new(&mut json);
            w.write(batch)?;
            w.finish()?;
        }
        let lines: Vec<&[u8]> = json.split(|b| *b == b'\n').collect();
        let mut dead = DeadLetters::new(&self.ctx.node);
        for (row, reason) in rows {
            let raw = lines.get(*row).copied().unwrap_or_default();
            dead.push(what, Some(*row as u64), "rejected_event", reason, raw);
        }
        if let Some(b) = dead.finish()? {
            // The runtime counts what goes out on the dead-letter port.
            out.emit_side(DEAD_LETTER, b);
        }
        Ok(())
    }

    /// Publishes the read models whole if this run has not yet.
    fn publish_restored(&mut self, out: &mut Collector) -> Result<()> {
        if self.publish {
            self.finish_batch(Vec::new(), false, out)?;
        }
        Ok(())
    }

    fn finish_batch(
        &mut self,
        events: Vec<Event>,
        force_snapshot: bool,
        out: &mut Collector,
    ) -> Result<()> {
        if !events.is_empty() {
            let batch = events_to_batch(&events)?;
            if let Some(log) = &self.log {
                log.append(&batch)?;
            }
            out.emit(batch);
        }
        if let Some(log) = &self.log {
            // A shard's first batch of a run snapshots what recovery changed,
            // so every shard has a marker from this run.
            let force = force_snapshot || self.publish;
            if let Some(rows) = self.projection.take_snapshot(force)? {
                log.snapshot(self.ctx.subtask, self.ctx.parallelism, &rows)?;
            }
        }
        let models = self.projection.take_models()?;
        out.emit_side(SUMMARY, models.summary);
        out.emit_side(OPEN, models.open);
        out.emit_side(RISK, models.risk);
        self.publish = false;
        Ok(())
    }
}

impl Operator for IncidentOperator {
    fn process_batch(
        &mut self,
        input: usize,
        batch: RecordBatch,
        out: &mut Collector,
    ) -> Result<()> {
        let mut events = Vec::new();
        let mut bad = Vec::new();
        if input < self.spec.alert_inputs {
            for (row, alert) in alerts_from_batch(&batch)?.into_iter().enumerate() {
                let done = alert
                    .map_err(EngineError::User)
                    .and_then(|a| self.projection.on_alert(&a, &mut events));
                if let Err(e) = done {
                    bad.push((row, e.to_string()));
                }
            }
            self.rejected(&batch, &bad, "alerts", out)?;
        } else {
            for (row, ev) in events_from_batch(&batch)?.into_iter().enumerate() {
                let done = ev
                    .map_err(EngineError::User)
                    .and_then(|ev| self.projection.on_action(ev, &mut events));
                if let Err(e) = done {
                    bad.push((row, e.to_string()));
                }
            }
            self.rejected(&batch, &bad, "actions", out)?;
        }
        self.finish_batch(events, false, out)
    }

    fn on_watermark(
        &mut self,
        _watermark: vigil_engine::EventTime,
        out: &mut Collector,
    ) -> Result<()> {
        self.publish_restored(out)
    }

    fn on_idle(&mut self, out: &mut Collector) -> Result<()> {
        // A restart whose inputs bring nothing still serves what it
        // restored.
        self.publish_restored(out)
    }

    fn state_size(&self) -> vigil_engine::StateSize {
        self.projection.size()
    }

    fn snapshot(&mut self) -> Result<OperatorState> {
        if let Some(log) = &self.log {
            log.flush()?;
        }
        let table = self.projection.state()?;
        let keys = KEYS
            .iter()
            .map(|k| Ok(table.column(table.schema().index_of(k)?).clone()))
            .collect::<Result<Vec<_>>>()?;
        Ok(OperatorState {
            batches: vec![vigil_engine::key_group::tag(table, &keys)?],
        })
    }

    fn restore(&mut self, state: OperatorState) -> Result<()> {
        // Restores add up (one per old subtask after a rescale).
        for b in &state.batches {
            self.projection.load(state_from_batch(b)?);
        }
        self.publish = true;
        Ok(())
    }

    fn on_end(&mut self, out: &mut Collector) -> Result<()> {
        self.finish_batch(Vec::new(), true, out)?;
        if let Some(log) = &self.log {
            log.flush()?;
        }
        Ok(())
    }
}
