//! From a `correlate` step's configuration to the rules' prepare steps and
//! the operator's spec, checked against the inputs' schemas.
//!
//! Each rule's prepare step is a generated SQL query planned like any SQL
//! step (`SELECT ts AS __vigil_ts, CAST(src_ip AS VARCHAR) AS src_ip, … FROM
//! auth WHERE …`), so filters and casts run as DataFusion expressions on
//! whole batches. Errors name the configuration field (`rules[1].where`,
//! `group-by`, `aliases.src_ip.success`) before anything is generated.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, TimeUnit};

use super::config::{CorrelateConfig, CorrelationType, RuleRef};
use super::operator::CorrelationSpec;
use crate::error::{column_hint, OperatorError, Result};
use crate::expr::SqlExpr;
use crate::sql::{plan_query, OneTable, PlannedQuery, PrepareStep, QueryOptions, StepInput};

/// The tenant column that keeps correlations within a tenant.
pub const TENANT: &str = "tenant_id";

/// A correlation planned: one prepare step per rule (the `until` rule
/// last), then the operator.
#[derive(Debug)]
pub struct PlannedCorrelation {
    /// Prepare steps, in input order.
    pub rules: Vec<PrepareStep>,
    /// The operator.
    pub spec: CorrelationSpec,
}

fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn is_ms_timestamp(t: &DataType) -> bool {
    matches!(t, DataType::Timestamp(TimeUnit::Millisecond, _))
}

/// Plans `config` for step `name`; `input` looks up a rule's input by name.
pub fn plan_correlation(
    name: &str,
    config: &CorrelateConfig,
    input: &dyn Fn(&str) -> Option<StepInput>,
) -> Result<PlannedCorrelation> {
    let temporal = matches!(
        config.correlation,
        CorrelationType::Temporal | CorrelationType::TemporalOrdered
    );
    let timespan_ms = config.timespan.as_millis() as i64;
    if timespan_ms <= 0 {
        return Err(OperatorError::config(
            "timespan",
            "timespan must be at least 1ms",
            None,
        ));
    }
    if config.rules.is_empty() || (temporal && config.rules.len() < 2) {
        return Err(OperatorError::config(
            "rules",
            if temporal {
                "a temporal correlation needs at least two rules"
            } else {
                "a correlation needs at least one rule"
            },
            None,
        ));
    }
    let mut all: Vec<(&RuleRef, String)> = config
        .rules
        .iter()
        .enumerate()
        .map(|(i, r)| (r, format!("rules[{i}]")))
        .collect();
    if let Some(u) = &config.until {
        if !temporal {
            return Err(OperatorError::config(
                "until",
                "`until` cancels pending sequences; counts have none",
                Some("use correlation: temporal_ordered or temporal".into()),
            ));
        }
        all.push((u, "until".to_string()));
    }
    for (i, (r, field)) in all.iter().enumerate() {
        if all[..i].iter().any(|(o, _)| o.name() == r.name()) {
            return Err(OperatorError::config(
                field.clone(),
                format!("rule name {:?} is used twice", r.name()),
                Some("give inline rules a `name` of their own".into()),
            ));
        }
    }
    let (min_count, value_field) = match config.correlation {
        CorrelationType::EventCount | CorrelationType::ValueCount => {
            let Some(c) = &config.condition else {
                return Err(OperatorError::config(
                    "condition",
                    "a count correlation needs a condition",
                    Some("condition: { gte: 10 }".into()),
                ));
            };
            let min = match (c.gte, c.gt) {
                (Some(n), None) => n,
                (None, Some(n)) => n + 1,
                _ => {
                    return Err(OperatorError::config(
                        "condition",
                        "give exactly one of gte or gt",
                        Some("counts fire as they rise; an upper bound is a windowed query (a sql step with HAVING)".into()),
                    ))
                }
            };
            let field = match (config.correlation, &c.field) {
                (CorrelationType::ValueCount, Some(f)) => Some(f.clone()),
                (CorrelationType::ValueCount, None) => {
                    return Err(OperatorError::config(
                        "condition.field",
                        "value_count counts the distinct values of a field",
                        Some("condition: { field: user, gte: 10 }".into()),
                    ))
                }
                (_, Some(_)) => {
                    return Err(OperatorError::config(
                        "condition.field",
                        "event_count counts events; a field is counted by value_count",
                        None,
                    ))
                }
                (_, None) => None,
            };
            (min.max(1), field)
        }
        _ => {
            if config.condition.is_some() {
                return Err(OperatorError::config(
                    "condition",
                    "a temporal correlation fires when every rule matched; it has no condition",
                    None,
                ));
            }
            (1, None)
        }
    };

    let mut inputs = Vec::with_capacity(all.len());
    for (r, field) in &all {
        let Some(info) = input(r.input()) else {
            return Err(OperatorError::config(
                match r {
                    RuleRef::Name(_) => field.clone(),
                    RuleRef::Inline { .. } => format!("{field}.input"),
                },
                format!("no source or earlier step named {:?}", r.input()),
                None,
            ));
        };
        inputs.push(info);
    }
    let mut group_by = config.group_by.clone();
    let column = |g: &str, rule: &str| -> String {
        config
            .aliases
            .get(g)
            .and_then(|m| m.get(rule))
            .cloned()
            .unwrap_or_else(|| g.to_string())
    };
    for (g, per_rule) in &config.aliases {
        if !group_by.contains(g) && value_field.as_deref() != Some(g) {
            return Err(OperatorError::config(
                format!("aliases.{g}"),
                format!("{g:?} is neither a group-by field nor the counted field"),
                None,
            ));
        }
        for rule in per_rule.keys() {
            if !all.iter().any(|(r, _)| r.name() == rule) {
                return Err(OperatorError::config(
                    format!("aliases.{g}.{rule}"),
                    format!("no rule named {rule:?}"),
                    None,
                ));
            }
        }
    }
    // Tenants never mix unless the rule says so.
    if !config.cross_tenant
        && !group_by.iter().any(|g| g == TENANT)
        && all
            .iter()
            .zip(&inputs)
            .all(|((r, _), i)| i.schema.index_of(&column(TENANT, r.name())).is_ok())
    {
        group_by.insert(0, TENANT.to_string());
    }

    // Columns carried from each step's event into the output.
    let mut carried: Vec<(usize, String, String)> = Vec::new();
    for (rule, columns) in &config.fields {
        let Some(step) = config.rules.iter().position(|r| r.name() == rule) else {
            return Err(OperatorError::config(
                format!("fields.{rule}"),
                format!("no rule named {rule:?}"),
                None,
            ));
        };
        if !temporal {
            return Err(OperatorError::config(
                "fields",
                "a count's output is the group and the count; fields are carried from matched events of temporal correlations",
                None,
            ));
        }
        for (i, c) in columns.iter().enumerate() {
            if inputs[step].schema.index_of(c).is_err() {
                return Err(OperatorError::unknown_column(
                    format!("fields.{rule}[{i}]"),
                    c,
                    &inputs[step].schema,
                ));
            }
            carried.push((step, c.clone(), format!("{rule}_{c}")));
        }
    }
    carried.sort_by_key(|(s, _, _)| *s);

    let mut rules = Vec::with_capacity(all.len());
    for (at, ((r, field), info)) in all.iter().zip(&inputs).enumerate() {
        let schema = &info.schema;
        let time = info.event_time.clone().ok_or_else(|| {
            OperatorError::config(
                field.clone(),
                format!("{:?} has no event-time column", r.input()),
                None,
            )
        })?;
        match schema.field_with_name(&time) {
            Ok(f) if is_ms_timestamp(f.data_type()) => {}
            _ => {
                return Err(OperatorError::config(
                    field.clone(),
                    format!(
                        "event time {time:?} of {:?} is not a millisecond timestamp",
                        r.input()
                    ),
                    None,
                ))
            }
        }
        let mut select = vec![format!("{} AS \"__vigil_ts\"", quote(&time))];
        for g in &group_by {
            let c = column(g, r.name());
            if schema.index_of(&c).is_err() {
                let at = if c == *g {
                    "group-by".to_string()
                } else {
                    format!("aliases.{g}.{}", r.name())
                };
                return Err(OperatorError::config(
                    at,
                    format!(
                        "rule {:?}: column {c:?} is not in {:?}",
                        r.name(),
                        r.input()
                    ),
                    column_hint(&c, schema).map(|h| {
                        format!(
                            "{h} (or name it per rule: aliases: {{ {g}: {{ {}: <column> }} }})",
                            r.name()
                        )
                    }),
                ));
            }
            select.push(format!("CAST({} AS VARCHAR) AS {}", quote(&c), quote(g)));
        }
        let id = match r {
            RuleRef::Inline { id: Some(id), .. } => {
                if schema.index_of(id).is_err() {
                    return Err(OperatorError::unknown_column(
                        format!("{field}.id"),
                        id,
                        schema,
                    ));
                }
                Some(id.clone())
            }
            _ => ["event_id", "id"]
                .iter()
                .find(|c| schema.index_of(c).is_ok())
                .map(|c| c.to_string()),
        };
        select.push(match id {
            Some(id) => format!("CAST({} AS VARCHAR) AS \"__vigil_id\"", quote(&id)),
            None => "CAST(NULL AS VARCHAR) AS \"__vigil_id\"".to_string(),
        });
        let is_until = *field == "until";
        select.push(match (&value_field, is_until) {
            (Some(f), false) => {
                let c = column(f, r.name());
                if schema.index_of(&c).is_err() {
                    return Err(OperatorError::unknown_column("condition.field", &c, schema));
                }
                format!("CAST({} AS VARCHAR) AS \"__vigil_value\"", quote(&c))
            }
            _ => "CAST(NULL AS VARCHAR) AS \"__vigil_value\"".to_string(),
        });
        for (step, c, out) in &carried {
            select.push(if *step == at {
                format!("CAST({} AS VARCHAR) AS {}", quote(c), quote(out))
            } else {
                format!("CAST(NULL AS VARCHAR) AS {}", quote(out))
            });
        }
        let mut sql = format!("SELECT {} FROM {}", select.join(", "), quote(r.input()));
        if let RuleRef::Inline {
            condition: Some(w), ..
        } = r
        {
            // Checked on its own first, so an error points at the field.
            SqlExpr::compile(w, schema, &format!("{field}.where"))?;
            sql.push_str(&format!(" WHERE {w}"));
        }
        let catalog = OneTable {
            name: r.input(),
            schema: schema.clone(),
        };
        let options = QueryOptions {
            name: format!("{name}/{}", r.name()),
            lateness_ms: 0,
            cross_tenant: false,
        };
        let stages = match plan_query(&sql, &catalog, &options)? {
            PlannedQuery::Stateless { stages, .. } => stages,
            PlannedQuery::Windowed { .. } | PlannedQuery::Join { .. } => {
                return Err(OperatorError::config(
                    field.clone(),
                    "internal: a rule's prepare step planned as a window or a join",
                    None,
                ))
            }
        };
        rules.push(PrepareStep {
            name: r.name().to_string(),
            input: r.input().to_string(),
            sql,
            stages,
        });
    }
    // Text columns arrive as DataFusion makes them (string views); the
    // operator reads them as plain UTF-8.
    let prepared = rules[0].stages.output_schema();
    let input = Arc::new(Schema::new(
        prepared
            .fields()
            .iter()
            .enumerate()
            .map(|(i, f)| {
                if i == 0 {
                    f.as_ref().clone()
                } else {
                    Field::new(f.name(), DataType::Utf8, true)
                }
            })
            .collect::<Vec<_>>(),
    ));
    let spec = CorrelationSpec {
        name: name.to_string(),
        rule: config.rule.clone().unwrap_or_else(|| name.to_string()),
        kind: config.correlation,
        steps: rules.iter().map(|r| r.name.clone()).collect(),
        until: config.until.is_some(),
        group_by,
        carried: carried.into_iter().map(|(s, _, out)| (s, out)).collect(),
        timespan_ms,
        min_count,
        suppress_ms: config
            .suppress
            .map_or(timespan_ms, |d| d.as_millis() as i64),
        input,
    };
    Ok(PlannedCorrelation { rules, spec })
}
