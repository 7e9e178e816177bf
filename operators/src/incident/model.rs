//! The incident aggregate: its events, its state, and the fold between them.
//!
//! [`Incident::apply`] is the only way state changes, live or in a replay,
//! so a replay of the log reproduces the live state exactly. It reads no
//! clock and draws no random numbers: an event's time is its own field and
//! ids are UUIDv5 of the incident's identity ([`event_id`]).

use std::collections::BTreeSet;

use ahash::AHashSet as HashSet;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, ListBuilder, RecordBatch, StringBuilder, TimestampMillisecondArray,
    UInt64Array,
};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use uuid::Uuid;
use vigil_engine::{EngineError, Result};

/// Namespace of Vigil's incident UUIDs (UUIDv5 of the DNS name
/// `incidents.vigil.dev`), fixed so ids are the same in every run.
const NAMESPACE: Uuid = Uuid::from_u128(0x5c1e_7d0a_41c3_5d3e_9a2b_6f8e_1d4c_7b90);

/// A UUIDv5 of `parts`, joined with NUL (which no part contains).
pub fn event_id(parts: &[&str]) -> String {
    Uuid::new_v5(&NAMESPACE, parts.join("\0").as_bytes()).to_string()
}

/// How severe an incident or alert is; ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    /// `low`.
    Low,
    /// `medium`.
    Medium,
    /// `high`.
    High,
    /// `critical`.
    Critical,
}

impl Severity {
    /// Every severity, lowest first.
    pub const ALL: [Severity; 4] = [
        Severity::Low,
        Severity::Medium,
        Severity::High,
        Severity::Critical,
    ];

    /// Parses `low`, `medium`, `high` or `critical` (any case).
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "low" => Some(Self::Low),
            "medium" => Some(Self::Medium),
            "high" => Some(Self::High),
            "critical" => Some(Self::Critical),
            _ => None,
        }
    }

    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Low => "low",
            Self::Medium => "medium",
            Self::High => "high",
            Self::Critical => "critical",
        }
    }
}

/// The six incident events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// A first alert for an entity opened an incident.
    Created,
    /// Another alert joined it as evidence.
    AlertAttached,
    /// Its severity rose.
    Escalated,
    /// An analyst took it.
    Assigned,
    /// It was closed.
    Resolved,
    /// It was opened again.
    Reopened,
}

impl EventKind {
    /// Every kind, in schema order.
    pub const ALL: [EventKind; 6] = [
        EventKind::Created,
        EventKind::AlertAttached,
        EventKind::Escalated,
        EventKind::Assigned,
        EventKind::Resolved,
        EventKind::Reopened,
    ];

    /// The event's type name, as in `schemas/incidents.avsc`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "IncidentCreated",
            Self::AlertAttached => "AlertAttached",
            Self::Escalated => "IncidentEscalated",
            Self::Assigned => "IncidentAssigned",
            Self::Resolved => "IncidentResolved",
            Self::Reopened => "IncidentReopened",
        }
    }

    /// Parses a type name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// One incident event: a row of [`event_schema`].
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Unique id; an id already applied to the incident is ignored.
    pub event_id: String,
    /// Which event.
    pub kind: EventKind,
    /// The incident.
    pub incident_id: String,
    /// The incident's version once this event is applied (1 for
    /// `IncidentCreated`); 0 on a command not yet applied.
    pub version: u64,
    /// When it happened (event time, ms).
    pub time_ms: i64,
    /// Whose incident.
    pub tenant_id: String,
    /// Who made the change: an analyst, or `vigil`.
    pub actor: String,
    /// `user`, `host` or `ip`: what the incident is about.
    pub entity_type: String,
    /// The entity's id.
    pub entity_id: String,
    /// Created: initial; AlertAttached: the alert's; Escalated: the new one.
    pub severity: Option<Severity>,
    /// Escalated: the severity before.
    pub previous_severity: Option<Severity>,
    /// Created, AlertAttached: the detection that fired.
    pub detection: Option<String>,
    /// Created, AlertAttached: the alert.
    pub alert_id: Option<String>,
    /// Created: a title.
    pub title: Option<String>,
    /// Escalated: the rule that escalated it.
    pub rule: Option<String>,
    /// Assigned: to whom.
    pub assignee: Option<String>,
    /// Resolved: `true_positive`, `false_positive`, `benign`, ...
    pub resolution: Option<String>,
    /// Resolved, Reopened, Escalated by hand: why.
    pub reason: Option<String>,
}

/// Open or resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Being worked on, or waiting to be.
    Open,
    /// Closed.
    Resolved,
}

impl Status {
    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Resolved => "resolved",
        }
    }
}

/// What applying an event did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The state changed; the version rose by one.
    Applied,
    /// The event's id was already applied: nothing changed.
    Duplicate,
    /// The event's version is already in the state (a snapshot holds it).
    Stale,
}

/// The state of one incident.
#[derive(Debug, Clone, PartialEq)]
pub struct Incident {
    /// Its id.
    pub id: String,
    /// Whose.
    pub tenant_id: String,
    /// About what.
    pub entity_type: String,
    /// About which.
    pub entity_id: String,
    /// A title.
    pub title: String,
    /// Open or resolved.
    pub status: Status,
    /// Current severity.
    pub severity: Severity,
    /// Highest severity of its alerts.
    pub max_alert_severity: Severity,
    /// Events applied; the last event's version.
    pub version: u64,
    /// Alerts attached (the first one included).
    pub alert_count: u64,
    /// Detections among its alerts, sorted.
    pub detections: BTreeSet<String>,
    /// Who works it.
    pub assignee: Option<String>,
    /// How it was resolved.
    pub resolution: Option<String>,
    /// Time of the first alert.
    pub created_ms: i64,
    /// Latest event time applied.
    pub updated_ms: i64,
    /// Latest alert time.
    pub last_alert_ms: i64,
    /// Ids of the alerts attached, so a redelivered alert is ignored.
    pub alerts: HashSet<String>,
    /// Ids of the events applied, so a redelivered event is ignored.
    pub applied: HashSet<String>,
}

fn rejected(ev: &Event, why: impl std::fmt::Display) -> EngineError {
    EngineError::User(format!(
        "{} {} on incident {}: {why}",
        ev.kind.as_str(),
        ev.event_id,
        ev.incident_id
    ))
}

impl Incident {
    /// A new incident from its `IncidentCreated` event.
    pub fn create(ev: &Event) -> Result<Self> {
        if ev.kind != EventKind::Created {
            return Err(rejected(ev, "the incident does not exist"));
        }
        if ev.version > 1 {
            return Err(rejected(
                ev,
                format!("the log skips from no version to {}", ev.version),
            ));
        }
        let severity = ev.severity.unwrap_or(Severity::Low);
        let mut inc = Incident {
            id: ev.incident_id.clone(),
            tenant_id: ev.tenant_id.clone(),
            entity_type: ev.entity_type.clone(),
            entity_id: ev.entity_id.clone(),
            title: ev.title.clone().unwrap_or_default(),
            status: Status::Open,
            severity,
            max_alert_severity: severity,
            version: 1,
            alert_count: 0,
            detections: BTreeSet::new(),
            assignee: None,
            resolution: None,
            created_ms: ev.time_ms,
            updated_ms: ev.time_ms,
            last_alert_ms: ev.time_ms,
            alerts: HashSet::new(),
            applied: HashSet::from_iter([ev.event_id.clone()]),
        };
        inc.add_alert(ev);
        Ok(inc)
    }

    fn add_alert(&mut self, ev: &Event) {
        if let Some(a) = &ev.alert_id {
            self.alerts.insert(a.clone());
        }
        if let Some(d) = &ev.detection {
            if !self.detections.contains(d) {
                self.detections.insert(d.clone());
            }
        }
        if let Some(s) = ev.severity {
            self.max_alert_severity = self.max_alert_severity.max(s);
        }
        self.alert_count += 1;
        self.last_alert_ms = self.last_alert_ms.max(ev.time_ms);
    }

    /// Applies `ev`. An event already applied (by id, or by version for a
    /// log event) changes nothing; an event that does not fit the state (a
    /// gap in versions, another tenant, a transition that is not allowed)
    /// is an error naming it, and changes nothing either.
    pub fn apply(&mut self, ev: &Event) -> Result<Applied> {
        if self.applied.contains(&ev.event_id) {
            return Ok(Applied::Duplicate);
        }
        if ev.version != 0 && ev.version <= self.version {
            return Ok(Applied::Stale);
        }
        if ev.version > self.version + 1 {
            return Err(rejected(
                ev,
                format!(
                    "the log skips from version {} to {}",
                    self.version, ev.version
                ),
            ));
        }
        if ev.tenant_id != self.tenant_id {
            return Err(rejected(ev, "the incident belongs to another tenant"));
        }
        if ev.entity_type != self.entity_type || ev.entity_id != self.entity_id {
            return Err(rejected(
                ev,
                format!(
                    "the incident is about {} {}, not {} {}",
                    self.entity_type, self.entity_id, ev.entity_type, ev.entity_id
                ),
            ));
        }
        let open = self.status == Status::Open;
        match ev.kind {
            EventKind::Created => return Err(rejected(ev, "the incident already exists")),
            EventKind::AlertAttached => {
                if !open {
                    return Err(rejected(ev, "the incident is resolved"));
                }
                self.add_alert(ev);
            }
            EventKind::Escalated => {
                let Some(to) = ev.severity else {
                    return Err(rejected(ev, "an escalation needs a severity"));
                };
                if !open {
                    return Err(rejected(ev, "the incident is resolved"));
                }
                if to <= self.severity {
                    return Err(rejected(
                        ev,
                        format!(
                            "severity {} is not above {}",
                            to.as_str(),
                            self.severity.as_str()
                        ),
                    ));
                }
                self.severity = to;
            }
            EventKind::Assigned => {
                let Some(who) = ev.assignee.as_ref().filter(|a| !a.is_empty()) else {
                    return Err(rejected(ev, "an assignment needs an assignee"));
                };
                if !open {
                    return Err(rejected(ev, "the incident is resolved"));
                }
                self.assignee = Some(who.clone());
            }
            EventKind::Resolved => {
                if !open {
                    return Err(rejected(ev, "the incident is already resolved"));
                }
                self.status = Status::Resolved;
                self.resolution = Some(ev.resolution.clone().unwrap_or_else(|| "resolved".into()));
            }
            EventKind::Reopened => {
                if open {
                    return Err(rejected(ev, "the incident is open"));
                }
                self.status = Status::Open;
                self.resolution = None;
            }
        }
        self.version += 1;
        self.updated_ms = self.updated_ms.max(ev.time_ms);
        self.applied.insert(ev.event_id.clone());
        Ok(Applied::Applied)
    }
}

fn ts_type() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

fn utf8(name: &str, nullable: bool) -> Field {
    Field::new(name, DataType::Utf8, nullable)
}

/// Columns of the incident event stream (the log's rows), flat: the
/// payload fields of every event type, null where a type has none.
pub fn event_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        utf8("event_id", false),
        utf8("event_type", false),
        utf8("incident_id", false),
        Field::new("incident_version", DataType::UInt64, false),
        Field::new("time", ts_type(), false),
        utf8("tenant_id", false),
        utf8("actor", false),
        utf8("entity_type", false),
        utf8("entity_id", false),
        utf8("severity", true),
        utf8("previous_severity", true),
        utf8("detection", true),
        utf8("alert_id", true),
        utf8("title", true),
        utf8("rule", true),
        utf8("assignee", true),
        utf8("resolution", true),
        utf8("reason", true),
    ]))
}

/// Events as a batch of [`event_schema`].
pub fn events_to_batch(events: &[Event]) -> Result<RecordBatch> {
    let n = events.len();
    let strings = |f: &dyn Fn(&Event) -> Option<&str>| -> ArrayRef {
        let mut b = StringBuilder::with_capacity(n, n * 16);
        for e in events {
            b.append_option(f(e));
        }
        Arc::new(b.finish())
    };
    let columns: Vec<ArrayRef> = vec![
        strings(&|e| Some(&e.event_id)),
        strings(&|e| Some(e.kind.as_str())),
        strings(&|e| Some(&e.incident_id)),
        Arc::new(UInt64Array::from_iter_values(
            events.iter().map(|e| e.version),
        )),
        Arc::new(
            TimestampMillisecondArray::from_iter_values(events.iter().map(|e| e.time_ms))
                .with_timezone("UTC"),
        ),
        strings(&|e| Some(&e.tenant_id)),
        strings(&|e| Some(&e.actor)),
        strings(&|e| Some(&e.entity_type)),
        strings(&|e| Some(&e.entity_id)),
        strings(&|e| e.severity.map(Severity::as_str)),
        strings(&|e| e.previous_severity.map(Severity::as_str)),
        strings(&|e| e.detection.as_deref()),
        strings(&|e| e.alert_id.as_deref()),
        strings(&|e| e.title.as_deref()),
        strings(&|e| e.rule.as_deref()),
        strings(&|e| e.assignee.as_deref()),
        strings(&|e| e.resolution.as_deref()),
        strings(&|e| e.reason.as_deref()),
    ];
    Ok(RecordBatch::try_new(event_schema(), columns)?)
}

/// Reads columns by name, as text, whatever string type they arrived in.
pub(crate) struct Columns {
    cols: Vec<Option<ArrayRef>>,
}

impl Columns {
    pub(crate) fn new(batch: &RecordBatch, names: &[&str]) -> Result<Self> {
        let mut cols = Vec::with_capacity(names.len());
        for n in names {
            cols.push(match batch.column_by_name(n) {
                Some(c) if c.data_type() == &DataType::Utf8 => Some(c.clone()),
                Some(c)
                    if matches!(
                        c.data_type(),
                        DataType::UInt64 | DataType::Timestamp(..) | DataType::Int64
                    ) =>
                {
                    Some(c.clone())
                }
                Some(c) => Some(cast(c, &DataType::Utf8)?),
                None => None,
            });
        }
        Ok(Self { cols })
    }

    pub(crate) fn str(&self, col: usize, row: usize) -> Option<&str> {
        let c = self.cols[col].as_ref()?;
        if c.data_type() != &DataType::Utf8 || c.is_null(row) {
            return None;
        }
        Some(c.as_string::<i32>().value(row))
    }

    pub(crate) fn u64(&self, col: usize, row: usize) -> Option<u64> {
        let c = self.cols[col].as_ref()?;
        if c.is_null(row) {
            return None;
        }
        match c.data_type() {
            DataType::UInt64 => Some(c.as_primitive::<arrow::datatypes::UInt64Type>().value(row)),
            DataType::Int64 => {
                u64::try_from(c.as_primitive::<arrow::datatypes::Int64Type>().value(row)).ok()
            }
            _ => None,
        }
    }

    pub(crate) fn time(&self, col: usize, row: usize) -> Option<i64> {
        let c = self.cols[col].as_ref()?;
        if c.is_null(row) {
            return None;
        }
        match c.data_type() {
            DataType::Timestamp(TimeUnit::Millisecond, _) => Some(
                c.as_primitive::<arrow::datatypes::TimestampMillisecondType>()
                    .value(row),
            ),
            DataType::Int64 => Some(c.as_primitive::<arrow::datatypes::Int64Type>().value(row)),
            _ => None,
        }
    }
}

const EVENT_COLUMNS: [&str; 18] = [
    "event_id",
    "event_type",
    "incident_id",
    "incident_version",
    "time",
    "tenant_id",
    "actor",
    "entity_type",
    "entity_id",
    "severity",
    "previous_severity",
    "detection",
    "alert_id",
    "title",
    "rule",
    "assignee",
    "resolution",
    "reason",
];

/// Reads the events of a batch with [`event_schema`]'s columns (the
/// version may be missing, for commands); a row that is not a valid event
/// is an error naming the row and the field, returned in its place.
pub fn events_from_batch(batch: &RecordBatch) -> Result<Vec<std::result::Result<Event, String>>> {
    let c = Columns::new(batch, &EVENT_COLUMNS)?;
    let mut out = Vec::with_capacity(batch.num_rows());
    for row in 0..batch.num_rows() {
        out.push(event_at(&c, row));
    }
    Ok(out)
}

fn event_at(c: &Columns, row: usize) -> std::result::Result<Event, String> {
    let req = |i: usize| -> std::result::Result<String, String> {
        match c.str(i, row) {
            Some(s) if !s.is_empty() => Ok(s.to_string()),
            _ => Err(format!("{} is missing", EVENT_COLUMNS[i])),
        }
    };
    let opt = |i: usize| c.str(i, row).filter(|s| !s.is_empty()).map(str::to_string);
    let sev = |i: usize| -> std::result::Result<Option<Severity>, String> {
        match c.str(i, row).filter(|s| !s.is_empty()) {
            None => Ok(None),
            Some(s) => Severity::parse(s).map(Some).ok_or_else(|| {
                format!(
                    "{} {s:?} is not low, medium, high or critical",
                    EVENT_COLUMNS[i]
                )
            }),
        }
    };
    let kind_name = req(1)?;
    let kind = EventKind::parse(&kind_name).ok_or_else(|| {
        format!(
            "event_type {kind_name:?} is not one of {}",
            EventKind::ALL.map(EventKind::as_str).join(", ")
        )
    })?;
    Ok(Event {
        event_id: req(0)?,
        kind,
        incident_id: req(2)?,
        version: c.u64(3, row).unwrap_or(0),
        time_ms: c.time(4, row).ok_or("time is missing")?,
        tenant_id: req(5)?,
        actor: req(6)?,
        entity_type: req(7)?,
        entity_id: req(8)?,
        severity: sev(9)?,
        previous_severity: sev(10)?,
        detection: opt(11),
        alert_id: opt(12),
        title: opt(13),
        rule: opt(14),
        assignee: opt(15),
        resolution: opt(16),
        reason: opt(17),
    })
}

/// Columns of a snapshot row: one incident's whole state.
pub fn state_schema() -> SchemaRef {
    let list = || DataType::List(Arc::new(Field::new("item", DataType::Utf8, true)));
    Arc::new(Schema::new(vec![
        utf8("incident_id", false),
        utf8("tenant_id", false),
        utf8("entity_type", false),
        utf8("entity_id", false),
        utf8("title", false),
        utf8("status", false),
        utf8("severity", false),
        utf8("max_alert_severity", false),
        Field::new("version", DataType::UInt64, false),
        Field::new("alert_count", DataType::UInt64, false),
        Field::new("detections", list(), false),
        utf8("assignee", true),
        utf8("resolution", true),
        Field::new("created_at", ts_type(), false),
        Field::new("updated_at", ts_type(), false),
        Field::new("last_alert_at", ts_type(), false),
        Field::new("alerts", list(), false),
        Field::new("applied", list(), false),
    ]))
}

/// Incidents as snapshot rows. Sets are written sorted, so equal states
/// give equal rows.
pub fn state_to_batch<'a>(
    incidents: impl IntoIterator<Item = &'a Incident>,
) -> Result<RecordBatch> {
    let incidents: Vec<&Incident> = incidents.into_iter().collect();
    let n = incidents.len();
    let strings = |f: &dyn Fn(&Incident) -> Option<&str>| -> ArrayRef {
        let mut b = StringBuilder::with_capacity(n, n * 16);
        for i in &incidents {
            b.append_option(f(i));
        }
        Arc::new(b.finish())
    };
    let lists = |f: &dyn Fn(&Incident) -> Vec<&str>| -> ArrayRef {
        let mut b = ListBuilder::new(StringBuilder::new());
        for i in &incidents {
            let mut v = f(i);
            v.sort_unstable();
            for s in v {
                b.values().append_value(s);
            }
            b.append(true);
        }
        Arc::new(b.finish())
    };
    let times = |f: &dyn Fn(&Incident) -> i64| -> ArrayRef {
        Arc::new(
            TimestampMillisecondArray::from_iter_values(incidents.iter().map(|i| f(i)))
                .with_timezone("UTC"),
        )
    };
    let columns: Vec<ArrayRef> = vec![
        strings(&|i| Some(&i.id)),
        strings(&|i| Some(&i.tenant_id)),
        strings(&|i| Some(&i.entity_type)),
        strings(&|i| Some(&i.entity_id)),
        strings(&|i| Some(&i.title)),
        strings(&|i| Some(i.status.as_str())),
        strings(&|i| Some(i.severity.as_str())),
        strings(&|i| Some(i.max_alert_severity.as_str())),
        Arc::new(UInt64Array::from_iter_values(
            incidents.iter().map(|i| i.version),
        )),
        Arc::new(UInt64Array::from_iter_values(
            incidents.iter().map(|i| i.alert_count),
        )),
        lists(&|i| i.detections.iter().map(String::as_str).collect()),
        strings(&|i| i.assignee.as_deref()),
        strings(&|i| i.resolution.as_deref()),
        times(&|i| i.created_ms),
        times(&|i| i.updated_ms),
        times(&|i| i.last_alert_ms),
        lists(&|i| i.alerts.iter().map(String::as_str).collect()),
        lists(&|i| i.applied.iter().map(String::as_str).collect()),
    ];
    Ok(RecordBatch::try_new(state_schema(), columns)?)
}

/// Incidents from snapshot rows.
pub fn state_from_batch(batch: &RecordBatch) -> Result<Vec<Incident>> {
    let names = [
        "incident_id",
        "tenant_id",
        "entity_type",
        "entity_id",
        "title",
        "status",
        "severity",
        "max_alert_severity",
        "version",
        "alert_count",
        "assignee",
        "resolution",
        "created_at",
        "updated_at",
        "last_alert_at",
    ];
    let c = Columns::new(batch, &names)?;
    let list = |name: &str| -> Result<arrow::array::ListArray> {
        let col = batch
            .column_by_name(name)
            .ok_or_else(|| EngineError::User(format!("snapshot rows have no {name:?} column")))?;
        let col = cast(
            col,
            &DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
        )?;
        Ok(col.as_list::<i32>().clone())
    };
    let (detections, alerts, applied) = (list("detections")?, list("alerts")?, list("applied")?);
    let items = |l: &arrow::array::ListArray, row: usize| -> Vec<String> {
        let v = l.value(row);
        let v = v.as_string::<i32>();
        (0..v.len())
            .filter(|i| v.is_valid(*i))
            .map(|i| v.value(i).to_string())
            .collect()
    };
    let bad = |row: usize, what: &str| {
        EngineError::User(format!("snapshot row {row}: {what} is missing or invalid"))
    };
    let mut out = Vec::with_capacity(batch.num_rows());
    for row in 0..batch.num_rows() {
        let s = |i: usize| {
            c.str(i, row)
                .map(str::to_string)
                .ok_or_else(|| bad(row, names[i]))
        };
        let sev = |i: usize| {
            c.str(i, row)
                .and_then(Severity::parse)
                .ok_or_else(|| bad(row, names[i]))
        };
        let t = |i: usize| c.time(i, row).ok_or_else(|| bad(row, names[i]));
        out.push(Incident {
            id: s(0)?,
            tenant_id: s(1)?,
            entity_type: s(2)?,
            entity_id: s(3)?,
            title: s(4)?,
            status: match c.str(5, row) {
                Some("open") => Status::Open,
                Some("resolved") => Status::Resolved,
                _ => return Err(bad(row, "status")),
            },
            severity: sev(6)?,
            max_alert_severity: sev(7)?,
            version: c.u64(8, row).ok_or_else(|| bad(row, "version"))?,
            alert_count: c.u64(9, row).ok_or_else(|| bad(row, "alert_count"))?,
            detections: items(&detections, row).into_iter().collect(),
            assignee: c.str(10, row).map(str::to_string),
            resolution: c.str(11, row).map(str::to_string),
            created_ms: t(12)?,
            updated_ms: t(13)?,
            last_alert_ms: t(14)?,
            alerts: items(&alerts, row).into_iter().collect(),
            applied: items(&applied, row).into_iter().collect(),
        });
    }
    Ok(out)
}
