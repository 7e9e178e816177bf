//! `vigil sql`: one query, run against tables, its rows printed as windows
//! close — the Flink SQL client's or ksqlDB's interactive experience.
//!
//! The tables are a pipeline file's sources and transforms, the embedded
//! demo's sources when nothing else is given, and any declared in the script
//! itself with DDL:
//!
//! ```sql
//! CREATE TABLE logins (ts TIMESTAMP, user STRING, outcome STRING) WITH (
//!   'connector' = 'file', 'path' = 'logins.ndjson',
//!   'event_time' = 'ts', 'watermark.out_of_orderness' = '10s');
//! SELECT window_start, user, count(*) AS failures FROM logins
//! WHERE outcome = 'failure' GROUP BY TUMBLE(ts, INTERVAL '1' MINUTE), user;
//! ```
//!
//! A `CREATE TABLE` becomes a source of the same connector a pipeline file
//! would declare, its columns the source's `schema.fields` and its options
//! the source's settings (dotted keys nest: `'schema.flatten' = 'true'`;
//! `'properties.<librdkafka key>'` are Kafka client settings), so
//! DDL and pipeline files accept exactly the same things and report the
//! same errors. The query becomes a `sql` step printing to stdout; steps of
//! the pipeline that the query does not read are left out.

use std::collections::HashSet;

use datafusion::sql::parser::{DFParser, Statement as DFStatement};
use datafusion::sql::sqlparser::ast::{
    CreateTableOptions, DataType as SqlType, Expr, SqlOption, Statement, Value,
};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};
use serde_json::{json, Map, Value as Json};
use vigil_connectors::stdout::StdoutSinkConfig;
use vigil_operators::sql::{tables_of, SqlConfig};

use super::diagnostic::{Diagnostic, Diagnostics};
use super::plan::{self, Plan, PlanOptions};
use super::spec::{NodeSpec, PipelineSpec, SinkKind, TransformKind, WatermarkConfig};

/// What `vigil sql` was asked.
pub struct QueryRequest<'a> {
    /// The script: `CREATE TABLE` statements, then one `SELECT`.
    pub script: &'a str,
    /// A pipeline whose sources and steps are tables: (file name, text).
    pub pipeline: Option<(&'a str, &'a str)>,
    /// How long after a window's end late rows still update it.
    pub allowed_lateness: Option<std::time::Duration>,
    /// Print JSON lines instead of tables.
    pub json: bool,
    /// Let a join pair rows of different tenants.
    pub cross_tenant: bool,
}

/// Name the query's step has in the pipeline.
pub const QUERY_STEP: &str = "query";

const SCRIPT: &str = "<sql>";

fn error(message: impl Into<String>, hint: Option<String>) -> Diagnostics {
    Diagnostic::new(SCRIPT, None, message).hint(hint).into()
}

/// Splits a script at its top-level `;` (found by sqlparser's tokenizer, so
/// not inside strings or comments), keeping each statement's exact text.
fn statements(script: &str) -> Result<Vec<String>, Diagnostics> {
    let tokens = Tokenizer::new(&GenericDialect {}, script)
        .tokenize_with_location()
        .map_err(|e| error(format!("cannot read the script: {e}"), None))?;
    // Byte offset of every (line, column).
    let mut line_starts = vec![0usize];
    for (i, c) in script.char_indices() {
        if c == '\n' {
            line_starts.push(i + 1);
        }
    }
    let offset = |line: u64, column: u64| -> usize {
        let start = line_starts
            .get(line.saturating_sub(1) as usize)
            .copied()
            .unwrap_or(0);
        script[start..]
            .char_indices()
            .nth(column.saturating_sub(1) as usize)
            .map_or(script.len(), |(i, _)| start + i)
    };
    let mut out = Vec::new();
    let mut from = 0;
    for t in tokens.iter().filter(|t| t.token == Token::SemiColon) {
        let at = offset(t.span.start.line, t.span.start.column);
        out.push(script[from..at].to_string());
        from = at + 1;
    }
    out.push(script[from.min(script.len())..].to_string());
    Ok(out.into_iter().filter(|s| !s.trim().is_empty()).collect())
}

/// A script's DDL as a pipeline's `sources` section, and its query (which
/// must be the last statement, when there is one).
fn split(script: &str) -> Result<(Map<String, Json>, Option<String>), Diagnostics> {
    let mut sources = Map::new();
    let mut query = None;
    let parts = statements(script)?;
    let count = parts.len();
    for (i, text) in parts.into_iter().enumerate() {
        let first = text
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_ascii_uppercase();
        if first != "CREATE" {
            if i + 1 != count {
                return Err(error(
                    "the query must be the script's last statement",
                    Some("declare tables with CREATE TABLE first, then one SELECT".into()),
                ));
            }
            query = Some(text);
            continue;
        }
        let mut parsed =
            DFParser::parse_sql_with_dialect(&text, &GenericDialect {}).map_err(|e| {
                error(
                    format!("statement {}: {}", i + 1, e.strip_backtrace()),
                    None,
                )
            })?;
        match parsed.pop_front() {
            Some(DFStatement::Statement(s)) => match *s {
                Statement::CreateTable(t) => {
                    let name = t.name.to_string().trim_matches('"').to_string();
                    let source = source_of(&name, &t.columns, &t.table_options)?;
                    sources.insert(name, source);
                }
                other => {
                    return Err(error(
                        format!(
                            "statement {}: only CREATE TABLE and one SELECT are accepted, not {}",
                            i + 1,
                            other
                                .to_string()
                                .split_whitespace()
                                .take(2)
                                .collect::<Vec<_>>()
                                .join(" ")
                        ),
                        None,
                    ))
                }
            },
            _ => {
                return Err(error(
                    format!(
                        "statement {}: use CREATE TABLE name (...) WITH ('connector' = ...)",
                        i + 1
                    ),
                    None,
                ))
            }
        }
    }
    Ok((sources, query))
}

/// The sources a script of `CREATE TABLE` statements declares, checked as a
/// pipeline file's sources are (`tables:` in a pipeline file, and the DDL
/// of `vigil sql`).
pub fn ddl_tables(
    script: &str,
    env: &super::env::Env,
) -> Result<Vec<NodeSpec<super::spec::SourceKind>>, Diagnostics> {
    let (ddl, query) = split(script)?;
    if query.is_some() {
        return Err(error(
            "tables holds only CREATE TABLE statements",
            Some("queries are sql steps under transforms".into()),
        ));
    }
    tables_spec(ddl, env).map(|t| t.map(|t| t.sources).unwrap_or_default())
}

/// DDL tables as a pipeline file of their own (JSON is YAML), so they are
/// checked exactly as a file's sources are.
fn tables_spec(
    ddl: Map<String, Json>,
    env: &super::env::Env,
) -> Result<Option<PipelineSpec>, Diagnostics> {
    if ddl.is_empty() {
        return Ok(None);
    }
    let first = ddl.keys().next().cloned().unwrap_or_default();
    let text = json!({
        "name": "sql",
        "sources": ddl,
        "sinks": { "_": { "type": "null", "input": first } },
    })
    .to_string();
    // Positions in that generated text would mislead: name the table.
    PipelineSpec::parse(SCRIPT, &text, env)
        .map(Some)
        .map_err(|d| {
            Diagnostics(
                d.0.into_iter()
                    .map(|mut e| {
                        e.location = None;
                        e.message = e.message.replace("in source \"", "in table \"");
                        e
                    })
                    .collect(),
            )
        })
}

fn field_type(t: &SqlType) -> Option<&'static str> {
    let name = t.to_string().to_ascii_uppercase();
    let base = name.split('(').next().unwrap_or_default().trim();
    Some(match base {
        "STRING" | "VARCHAR" | "TEXT" | "CHAR" => "string",
        "BIGINT" | "INT8" | "LONG" => "int64",
        "INT" | "INTEGER" | "INT4" => "int32",
        "DOUBLE" | "FLOAT8" | "DOUBLE PRECISION" => "float64",
        "FLOAT" | "REAL" | "FLOAT4" => "float32",
        "BOOLEAN" | "BOOL" => "boolean",
        "TIMESTAMP" | "TIMESTAMP_LTZ" | "TIMESTAMPTZ" => "timestamp",
        _ => return None,
    })
}

/// Puts `value` at a dotted `key` of `map`.
fn insert(map: &mut Map<String, Json>, key: &str, value: Json) {
    match key.split_once('.') {
        Some((head, rest)) => {
            let entry = map
                .entry(head.to_string())
                .or_insert_with(|| Json::Object(Map::new()));
            if !entry.is_object() {
                *entry = Json::Object(Map::new());
            }
            if let Json::Object(inner) = entry {
                insert(inner, rest, value);
            }
        }
        None => {
            map.insert(key.to_string(), value);
        }
    }
}

/// One `CREATE TABLE` as a source node of a pipeline file.
fn source_of(
    name: &str,
    columns: &[datafusion::sql::sqlparser::ast::ColumnDef],
    options: &CreateTableOptions,
) -> Result<Json, Diagnostics> {
    let what = format!("table {name:?}");
    let options = match options {
        CreateTableOptions::With(o) | CreateTableOptions::Options(o) => o.as_slice(),
        _ => &[],
    };
    let mut node = Map::new();
    let mut connector = None;
    for o in options {
        let SqlOption::KeyValue { key, value } = o else {
            return Err(error(format!("{what}: options are 'key' = 'value'"), None));
        };
        let value = match value {
            Expr::Value(v) => match &v.value {
                Value::SingleQuotedString(s) | Value::DoubleQuotedString(s) => {
                    Json::String(s.clone())
                }
                Value::Number(n, _) => serde_json::from_str(n).unwrap_or(Json::String(n.clone())),
                Value::Boolean(b) => Json::Bool(*b),
                other => Json::String(other.to_string()),
            },
            other => Json::String(other.to_string()),
        };
        let key = key.value.trim_matches('\'').to_string();
        match key.as_str() {
            "connector" => connector = value.as_str().map(str::to_string),
            "event_time" => insert(&mut node, "schema.event_time.field", value),
            // librdkafka settings are dotted themselves.
            k if k.starts_with("properties.") => {
                let props = node
                    .entry("properties")
                    .or_insert_with(|| Json::Object(Map::new()));
                if let Json::Object(m) = props {
                    m.insert(k["properties.".len()..].to_string(), value);
                }
            }
            "topics" => {
                let list: Vec<Json> = value
                    .as_str()
                    .unwrap_or_default()
                    .split(',')
                    .map(|t| Json::String(t.trim().to_string()))
                    .collect();
                node.insert("topics".into(), Json::Array(list));
            }
            _ => insert(&mut node, &key, value),
        }
    }
    let connector = connector.ok_or_else(|| {
        error(
            format!("{what} has no 'connector' option"),
            Some("WITH ('connector' = 'file' | 'generator' | 'kafka', ...)".into()),
        )
    })?;
    if connector != "generator" {
        let mut fields = Vec::new();
        for c in columns {
            let t = field_type(&c.data_type).ok_or_else(|| {
                error(
                    format!(
                        "{what}: column {} has type {}, which sources do not read",
                        c.name, c.data_type
                    ),
                    Some("types are STRING, BIGINT, INT, DOUBLE, FLOAT, BOOLEAN, TIMESTAMP".into()),
                )
            })?;
            fields.push(json!({ "name": c.name.value, "type": t }));
        }
        insert(&mut node, "schema.fields", Json::Array(fields));
    } else if !columns.is_empty() {
        return Err(error(
            format!("{what}: a generator's columns are fixed; declare it without columns"),
            Some("CREATE TABLE auth WITH ('connector' = 'generator', 'stream' = 'auth')".into()),
        ));
    }
    node.insert("type".into(), Json::String(connector));
    Ok(Json::Object(node))
}

/// Plans `request`: its tables, its query as a step, stdout as the sink.
pub fn plan_query_script(
    request: &QueryRequest,
    options: &PlanOptions,
) -> Result<Plan, Diagnostics> {
    let (ddl, query) = split(request.script)?;
    let query = query.ok_or_else(|| error("the script has no SELECT", None))?;
    let tables = tables_spec(ddl, &*options.env)?;
    let (mut spec, tables) = match (request.pipeline, tables) {
        (Some((file, text)), tables) => (PipelineSpec::parse(file, text, &*options.env)?, tables),
        (None, None) => (
            PipelineSpec::parse("pipelines/demo.yaml", crate::DEMO_PIPELINE, &*options.env)?,
            None,
        ),
        (None, Some(tables)) => (tables, None),
    };
    if let Some(tables) = tables {
        for s in tables.sources {
            if spec.sources.iter().any(|x| x.name == s.name) {
                return Err(error(format!("table {:?} is declared twice", s.name), None));
            }
            spec.sources.push(s);
        }
    }
    let inputs = tables_of(&query).map_err(|e| {
        Diagnostic::new(SCRIPT, None, format!("invalid query: {e}")).hint(e.hint.clone())
    })?;
    // Keep only the steps the query reads, directly or not.
    let mut needed: HashSet<String> = inputs.iter().cloned().collect();
    loop {
        let before = needed.len();
        for t in &spec.transforms {
            if needed.contains(&t.name) {
                for i in &t.inputs {
                    needed.insert(i.split('.').next().unwrap_or(i).to_string());
                }
            }
        }
        if needed.len() == before {
            break;
        }
    }
    spec.transforms.retain(|t| needed.contains(&t.name));
    spec.sources.retain(|s| needed.contains(&s.name));
    let step = if spec.transforms.iter().any(|t| t.name == QUERY_STEP) {
        format!("{QUERY_STEP}_sql")
    } else {
        QUERY_STEP.to_string()
    };
    spec.transforms.push(NodeSpec {
        name: step.clone(),
        path: format!("transforms.{step}"),
        inputs,
        parallelism: None,
        watermark: WatermarkConfig::default(),
        kind: TransformKind::Sql(SqlConfig {
            query: query.trim().to_string(),
            allowed_lateness: request.allowed_lateness,
            cross_tenant: request.cross_tenant,
        }),
    });
    let stdout: StdoutSinkConfig = serde_json::from_value(json!({
        "format": if request.json { "json" } else { "table" }
    }))
    .map_err(|e| error(format!("internal: {e}"), None))?;
    spec.sinks = vec![NodeSpec {
        name: "rows".into(),
        path: "sinks.rows".into(),
        inputs: vec![step.clone()],
        parallelism: None,
        watermark: WatermarkConfig::default(),
        kind: SinkKind::Stdout(stdout),
    }];
    plan::build(&spec, options).map_err(|d| {
        // The query's step is not in any file: its errors belong to the script.
        let ours = format!("transform {step:?}: ");
        Diagnostics(
            d.0.into_iter()
                .map(|mut e| {
                    if let Some(rest) = e.message.strip_prefix(&ours) {
                        e.message = rest.to_string();
                        e.file = SCRIPT.into();
                        e.location = None;
                    }
                    e
                })
                .collect(),
        )
    })
}
