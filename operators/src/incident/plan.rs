//! From an `incidents` step's configuration to its prepare steps and the
//! operator's spec, checked against the inputs' schemas.
//!
//! Each alert input gets a generated SQL prepare step that maps its columns
//! to an alert (`SELECT CAST(tenant_id AS VARCHAR) AS tenant_id, 'user' AS
//! entity_type, … FROM brute_force`), so the mapping runs as DataFusion
//! expressions on whole batches and every input arrives in one shape. The
//! actions input gets one that picks the event columns. Errors name the
//! field (`alerts[1].entity_id`, `escalate[0]`).

use arrow::datatypes::{DataType, SchemaRef, TimeUnit};

use super::config::{AlertInput, IncidentsConfig};
use super::model::Severity;
use super::operator::{Condition, IncidentSpec, Rule};
use crate::error::{OperatorError, Result};
use crate::expr::SqlExpr;
use crate::sql::{
    plan_query, OneTable, PlannedQuery, PrepareStep, QueryOptions, Stages, StepInput,
};

/// The tenant column; incidents never mix tenants.
pub const TENANT: &str = "tenant_id";

/// An `incidents` step planned: prepare steps (alerts first, then
/// actions), and the operator.
#[derive(Debug)]
pub struct PlannedIncidents {
    /// Prepare steps, in the operator's input order.
    pub prepared: Vec<PrepareStep>,
    /// The operator.
    pub spec: IncidentSpec,
}

fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn stateless(sql: &str, table: &str, schema: &SchemaRef, name: String) -> Result<Stages> {
    let catalog = OneTable {
        name: table,
        schema: schema.clone(),
    };
    let options = QueryOptions {
        name,
        ..QueryOptions::default()
    };
    match plan_query(sql, &catalog, &options)? {
        PlannedQuery::Stateless { stages, .. } => Ok(stages),
        _ => Err(OperatorError::config(
            "alerts",
            "internal: a prepare step planned as a window or a join",
            None,
        )),
    }
}

fn event_time(field: &str, input: &StepInput, name: &str) -> Result<String> {
    let Some(t) = &input.event_time else {
        return Err(OperatorError::config(
            field,
            format!("{name:?} has no event time"),
            Some("give the alert's time: time: <column>".into()),
        ));
    };
    Ok(quote(t))
}

fn severity(field: &str, s: &str) -> Result<Severity> {
    Severity::parse(s).ok_or_else(|| {
        OperatorError::config(
            field,
            format!("severity {s:?} is not low, medium, high or critical"),
            None,
        )
    })
}

fn alert_sql(i: usize, a: &AlertInput, input: &StepInput) -> Result<String> {
    let at = |f: &str| format!("alerts[{i}].{f}");
    if input.schema.index_of(TENANT).is_err() {
        return Err(OperatorError::config(
            at("input"),
            format!("{:?} has no column {TENANT:?}", a.input),
            Some("incidents are kept per tenant; alerts need tenant_id".into()),
        ));
    }
    let mut select = vec![format!("CAST({} AS VARCHAR) AS tenant_id", quote(TENANT))];
    let title = a.title.clone().unwrap_or_else(|| {
        format!(
            "concat({}, ' on ', {}, ' ', {})",
            a.detection, a.entity_type, a.entity_id
        )
    });
    for (field, expr, out) in [
        ("entity_type", &a.entity_type, "entity_type"),
        ("entity_id", &a.entity_id, "entity_id"),
        ("id", &a.id, "alert_id"),
        ("detection", &a.detection, "detection"),
        ("severity", &a.severity, "severity"),
        ("title", &title, "title"),
    ] {
        // Checked on its own first, so an error points at the field.
        SqlExpr::compile(expr, &input.schema, &at(field))?;
        select.push(format!("CAST({expr} AS VARCHAR) AS {out}"));
    }
    let time = match &a.time {
        Some(t) => {
            SqlExpr::compile(t, &input.schema, &at("time"))?;
            t.clone()
        }
        None => event_time(&at("time"), input, &a.input)?,
    };
    select.push(format!("{time} AS time"));
    let mut sql = format!("SELECT {} FROM {}", select.join(", "), quote(&a.input));
    if let Some(w) = &a.condition {
        SqlExpr::compile(w, &input.schema, &at("where"))?;
        sql.push_str(&format!(" WHERE {w}"));
    }
    Ok(sql)
}

/// Columns an actions input must have, and those it may have.
const ACTION_REQUIRED: [&str; 7] = [
    "event_id",
    "event_type",
    "incident_id",
    "tenant_id",
    "actor",
    "entity_type",
    "entity_id",
];
const ACTION_OPTIONAL: [&str; 4] = ["severity", "assignee", "resolution", "reason"];

fn actions_sql(name: &str, input: &StepInput) -> Result<String> {
    let mut select = Vec::new();
    for c in ACTION_REQUIRED {
        if input.schema.index_of(c).is_err() {
            return Err(OperatorError::config(
                "actions",
                format!("{name:?} has no column {c:?}"),
                Some(format!(
                    "actions are incident events with columns {}",
                    ACTION_REQUIRED.join(", ")
                )),
            ));
        }
        select.push(format!("CAST({} AS VARCHAR) AS {c}", quote(c)));
    }
    for c in ACTION_OPTIONAL {
        select.push(if input.schema.index_of(c).is_ok() {
            format!("CAST({} AS VARCHAR) AS {c}", quote(c))
        } else {
            format!("CAST(NULL AS VARCHAR) AS {c}")
        });
    }
    select.push(format!("{} AS time", event_time("actions", input, name)?));
    Ok(format!("SELECT {} FROM {}", select.join(", "), quote(name)))
}

fn rules(config: &IncidentsConfig) -> Result<Vec<Rule>> {
    let Some(list) = &config.escalate else {
        return Ok([Severity::Medium, Severity::High, Severity::Critical]
            .into_iter()
            .map(|s| Rule {
                condition: Condition::AlertSeverity(s),
                severity: s,
            })
            .collect());
    };
    let mut out = Vec::with_capacity(list.len());
    for (i, r) in list.iter().enumerate() {
        let field = format!("escalate[{i}]");
        let target = severity(&format!("{field}.severity"), &r.severity)?;
        let condition = match (r.alerts, r.detections, &r.alert_severity) {
            (Some(n), None, None) if n >= 1 => Condition::Alerts(n),
            (None, Some(n), None) if n >= 1 => Condition::Detections(n),
            (None, None, Some(s)) => {
                Condition::AlertSeverity(severity(&format!("{field}.alert_severity"), s)?)
            }
            _ => {
                return Err(OperatorError::config(
                    field,
                    "a rule needs exactly one of alerts, detections or alert_severity (counts at least 1)",
                    Some("escalate: [{ alerts: 5, severity: high }]".into()),
                ))
            }
        };
        out.push(Rule {
            condition,
            severity: target,
        });
    }
    Ok(out)
}

fn is_ms_timestamp(t: &DataType) -> bool {
    matches!(t, DataType::Timestamp(TimeUnit::Millisecond, _))
}

/// Plans `config` for step `name`; `input_of` looks an input up by name.
pub fn plan_incidents(
    name: &str,
    config: &IncidentsConfig,
    input_of: &dyn Fn(&str) -> Option<StepInput>,
) -> Result<PlannedIncidents> {
    if config.alerts.is_empty() {
        return Err(OperatorError::config(
            "alerts",
            "an incidents step needs at least one alert input",
            Some("alerts: [{ input: detections }]".into()),
        ));
    }
    if config.snapshot_every == 0 {
        return Err(OperatorError::config(
            "snapshot_every",
            "snapshot_every must be at least 1",
            None,
        ));
    }
    let missing = |field: String, what: &str| {
        OperatorError::config(field, format!("no source or step named {what:?}"), None)
    };
    let mut prepared = Vec::new();
    for (i, a) in config.alerts.iter().enumerate() {
        let input =
            input_of(&a.input).ok_or_else(|| missing(format!("alerts[{i}].input"), &a.input))?;
        let sql = alert_sql(i, a, &input)?;
        let stages = stateless(
            &sql,
            &a.input,
            &input.schema,
            format!("{name}/alerts/{}", a.input),
        )?;
        let time = stages.output_schema();
        if let Ok(f) = time.field_with_name("time") {
            if !is_ms_timestamp(f.data_type()) {
                return Err(OperatorError::config(
                    format!("alerts[{i}].time"),
                    format!("the alert's time is {}, not a timestamp", f.data_type()),
                    Some("a timestamp column, or CAST(… AS TIMESTAMP)".into()),
                ));
            }
        }
        prepared.push(PrepareStep {
            name: format!("alerts/{}", a.input),
            input: a.input.clone(),
            sql,
            stages,
        });
    }
    if let Some(actions) = &config.actions {
        let input = input_of(actions).ok_or_else(|| missing("actions".into(), actions))?;
        let sql = actions_sql(actions, &input)?;
        let stages = stateless(&sql, actions, &input.schema, format!("{name}/actions"))?;
        prepared.push(PrepareStep {
            name: "actions".into(),
            input: actions.clone(),
            sql,
            stages,
        });
    }
    let spec = IncidentSpec {
        name: name.to_string(),
        window_ms: config.window.as_millis() as i64,
        rules: rules(config)?,
        snapshot_every: config.snapshot_every,
        alert_inputs: config.alerts.len(),
    };
    Ok(PlannedIncidents { prepared, spec })
}
