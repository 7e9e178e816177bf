//! The typed contents of a pipeline file.
//!
//! ```yaml
//! name: demo                  # names the pipeline (and, later, its consumer group)
//! parallelism: 2              # default subtasks per transform
//! sources:
//!   auth:
//!     type: generator         # or file, kafka
//!     stream: auth
//!     watermark: { out_of_orderness: 2s, idle_timeout: 30s }
//! transforms:
//!   failed:
//!     type: filter            # or project, threshold
//!     input: auth
//!     where: "outcome = 'failure'"
//! sinks:
//!   alerts:
//!     type: stdout            # or file, kafka, null
//!     input: [failed]
//! ```
//!
//! Sources may also be declared as SQL tables under `tables:` (a script of
//! `CREATE TABLE … WITH ('connector' = …)` statements, see
//! [`super::query`]).
//!
//! Keys common to every node (`type`, `input`, `parallelism`, `watermark`)
//! are read here; the rest of each node goes to the connector's or operator's
//! own config type, which rejects unknown keys.

use std::time::Duration;

use marked_yaml::types::MarkedMappingNode;
use marked_yaml::Node;
use serde::Deserialize;
use vigil_connectors::file::{FileSinkConfig, FileSourceConfig};
use vigil_connectors::generator::GeneratorConfig;
use vigil_connectors::incident_log::EventLogConfig;
use vigil_connectors::kafka::{KafkaSinkConfig, KafkaSourceConfig};
use vigil_connectors::lookup::LookupConfig;
use vigil_connectors::read_model::ReadModelSinkConfig;
use vigil_connectors::stdout::StdoutSinkConfig;
use vigil_operators::correlate::CorrelateConfig;
use vigil_operators::filter::FilterConfig;
use vigil_operators::incident::IncidentsConfig;
use vigil_operators::project::ProjectConfig;
use vigil_operators::sql::SqlConfig;
use vigil_operators::threshold::ThresholdConfig;

use super::diagnostic::{did_you_mean, Diagnostic, Diagnostics, Location};
use super::env::{substitute, Env};
use super::yaml::{self, loc};

/// Source types, in one explicit list.
pub const SOURCE_TYPES: &[&str] = &["generator", "file", "kafka"];
/// Transform types.
pub const TRANSFORM_TYPES: &[&str] = &[
    "filter",
    "project",
    "threshold",
    "sql",
    "correlate",
    "lookup",
    "incidents",
];
/// Sink types.
pub const SINK_TYPES: &[&str] = &["stdout", "file", "kafka", "read_model", "null"];

const TOP_KEYS: &[&str] = &[
    "name",
    "description",
    "parallelism",
    "tables",
    "sources",
    "transforms",
    "sinks",
    "scale_out",
];

/// Event-time settings of a source.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatermarkConfig {
    /// How far records may arrive out of event-time order (default: the
    /// generator's own disorder, 5s for files).
    #[serde(default, with = "humantime_serde")]
    pub out_of_orderness: Option<Duration>,
    /// A partition silent this long stops holding the watermark back.
    #[serde(default = "default_idle", with = "humantime_serde")]
    pub idle_timeout: Duration,
}

fn default_idle() -> Duration {
    Duration::from_secs(30)
}

impl Default for WatermarkConfig {
    fn default() -> Self {
        Self {
            out_of_orderness: None,
            idle_timeout: default_idle(),
        }
    }
}

/// A source's own settings.
#[derive(Debug, Clone)]
pub enum SourceKind {
    /// Generated telemetry.
    Generator(Box<GeneratorConfig>),
    /// A JSON or NDJSON file.
    File(Box<FileSourceConfig>),
    /// Kafka topics.
    Kafka(Box<KafkaSourceConfig>),
}

/// A transform's own settings.
#[derive(Debug, Clone)]
pub enum TransformKind {
    /// `filter`.
    Filter(FilterConfig),
    /// `project`.
    Project(ProjectConfig),
    /// `threshold`.
    Threshold(ThresholdConfig),
    /// `sql`.
    Sql(SqlConfig),
    /// `correlate`.
    Correlate(Box<CorrelateConfig>),
    /// `lookup`.
    Lookup(Box<LookupConfig>),
    /// `incidents`.
    Incidents(Box<IncidentsStep>),
}

/// An `incidents` step: the aggregate's rules, and where its event log is.
#[derive(Debug, Clone)]
pub struct IncidentsStep {
    /// Alerts, actions, window, escalation, snapshots.
    pub config: IncidentsConfig,
    /// The Kafka event log (`log:`); without one, state lives in memory.
    pub log: Option<EventLogConfig>,
}

/// A sink's own settings.
#[derive(Debug, Clone)]
pub enum SinkKind {
    /// `stdout`.
    Stdout(StdoutSinkConfig),
    /// `file`.
    File(FileSinkConfig),
    /// `kafka`.
    Kafka(KafkaSinkConfig),
    /// `read_model`.
    ReadModel(ReadModelSinkConfig),
    /// `null`.
    Null,
}

/// One node of the file.
#[derive(Debug, Clone)]
pub struct NodeSpec<K> {
    /// Its name.
    pub name: String,
    /// Section path in the file (`sources.auth`), for locating errors.
    pub path: String,
    /// Inputs (`name` or `name.port`); empty for sources.
    pub inputs: Vec<String>,
    /// Subtasks, if set.
    pub parallelism: Option<usize>,
    /// Event-time settings (sources only).
    pub watermark: WatermarkConfig,
    /// Type-specific settings.
    pub kind: K,
}

/// A parsed pipeline file.
#[derive(Debug, Clone)]
pub struct PipelineSpec {
    /// File name, for diagnostics.
    pub file: String,
    /// The parsed YAML, for locating fields in later diagnostics.
    pub root: Node,
    /// Pipeline name.
    pub name: String,
    /// Default parallelism of transforms.
    pub parallelism: usize,
    /// Sources, in file order.
    pub sources: Vec<NodeSpec<SourceKind>>,
    /// Transforms, in file order.
    pub transforms: Vec<NodeSpec<TransformKind>>,
    /// Sinks, in file order.
    pub sinks: Vec<NodeSpec<SinkKind>>,
    /// How keyed steps are re-keyed when several processes share the work.
    pub scale_out: Option<ScaleOutSpec>,
}

/// `scale_out:`: keyed steps read their input through internal repartition
/// topics, so several processes can share a pipeline with keyed state.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScaleOutSpec {
    /// Partitions of every repartition topic (1 to 128): the most processes
    /// a keyed step can be spread over.
    #[serde(default = "default_scale_out_partitions")]
    pub partitions: usize,
    /// Brokers of the repartition topics (default: the first Kafka
    /// source's, with its `properties`).
    #[serde(default)]
    pub brokers: Option<String>,
}

fn default_scale_out_partitions() -> usize {
    12
}

struct Ctx<'a> {
    file: &'a str,
    errors: Vec<Diagnostic>,
}

impl Ctx<'_> {
    fn err(
        &mut self,
        location: Option<Location>,
        message: impl Into<String>,
        hint: Option<String>,
    ) {
        self.errors
            .push(Diagnostic::new(self.file, location, message).hint(hint));
    }
}

fn scalar_usize(ctx: &mut Ctx, node: &Node, what: &str) -> Option<usize> {
    match node.as_scalar().map(|s| s.as_str().trim().parse::<usize>()) {
        Some(Ok(n)) if n >= 1 => Some(n),
        _ => {
            ctx.err(
                loc(node.span()),
                format!("{what} must be a whole number of at least 1"),
                None,
            );
            None
        }
    }
}

impl PipelineSpec {
    /// Parses pipeline text: environment substitution, YAML, typed configs.
    pub fn parse(file: &str, text: &str, env: &Env) -> Result<Self, Diagnostics> {
        let text = substitute(file, text, env)?;
        let root = yaml::parse(file, &text)?;
        let mut ctx = Ctx {
            file,
            errors: Vec::new(),
        };
        let Some(top) = root.as_mapping() else {
            return Err(Diagnostic::new(
                file,
                loc(root.span()),
                "a pipeline file must be a mapping",
            )
            .into());
        };
        for (k, _) in top.iter() {
            if !TOP_KEYS.contains(&k.as_str()) {
                let hint = did_you_mean(k.as_str(), TOP_KEYS.iter().copied());
                ctx.err(
                    loc(k.span()),
                    format!("unknown top-level key {:?}", k.as_str()),
                    hint,
                );
            }
        }
        let name = match top.get_scalar("name") {
            Some(n) if !n.as_str().trim().is_empty() => n.as_str().trim().to_string(),
            Some(n) => {
                ctx.err(loc(n.span()), "name must not be empty", None);
                String::new()
            }
            None => {
                ctx.err(
                    loc(root.span()),
                    "missing key \"name\"",
                    Some("every pipeline has a name: name: my-pipeline".into()),
                );
                String::new()
            }
        };
        let parallelism = top
            .get_node("parallelism")
            .and_then(|n| scalar_usize(&mut ctx, n, "parallelism"))
            .unwrap_or(1);
        let scale_out = top.get_node("scale_out").and_then(|n| {
            match yaml::from_node::<ScaleOutSpec>(file, n, "scale_out") {
                Ok(s) if (1..=128).contains(&s.partitions) => Some(s),
                Ok(s) => {
                    ctx.err(
                        loc(n.span()),
                        format!(
                            "scale_out.partitions must be 1 to 128 (one key group each at most), not {}",
                            s.partitions
                        ),
                        None,
                    );
                    None
                }
                Err(d) => {
                    ctx.errors.push(d);
                    None
                }
            }
        });
        let mut sources = section(
            &mut ctx,
            top,
            &root,
            "sources",
            top.get_node("tables").is_none(),
            SOURCE_TYPES,
            parse_source,
            no_derived_inputs,
        );
        tables(&mut ctx, top, env, &mut sources);
        let transforms = section(
            &mut ctx,
            top,
            &root,
            "transforms",
            false,
            TRANSFORM_TYPES,
            parse_transform,
            sql_inputs,
        );
        let sinks = section(
            &mut ctx,
            top,
            &root,
            "sinks",
            true,
            SINK_TYPES,
            parse_sink,
            no_derived_inputs,
        );
        if !ctx.errors.is_empty() {
            return Err(Diagnostics(ctx.errors));
        }
        Ok(Self {
            file: file.to_string(),
            root,
            name,
            parallelism,
            sources,
            transforms,
            sinks,
            scale_out,
        })
    }

    /// Where `field` (a dotted path such as `transforms.x.where`) is.
    pub fn locate(&self, path: &str) -> Option<Location> {
        yaml::locate(&self.root, path)
    }
}

/// Sources declared as SQL tables (`tables:`), added to `sources`.
fn tables(
    ctx: &mut Ctx,
    top: &MarkedMappingNode,
    env: &Env,
    sources: &mut Vec<NodeSpec<SourceKind>>,
) {
    if let Some(node) = top.get_node("tables") {
        match node.as_scalar() {
            Some(script) => match super::query::ddl_tables(script.as_str(), env) {
                Ok(tables) => {
                    for t in tables {
                        if sources.iter().any(|s| s.name == t.name) {
                            ctx.err(
                                loc(node.span()),
                                format!("table {:?} is also a source", t.name),
                                None,
                            );
                        } else {
                            sources.push(t);
                        }
                    }
                }
                Err(d) => {
                    for e in d.0 {
                        ctx.err(
                            loc(node.span()),
                            format!("in tables: {}", e.message),
                            e.hint,
                        );
                    }
                }
            },
            None => ctx.err(
                loc(node.span()),
                "tables must be SQL text: CREATE TABLE statements",
                Some(
                    "tables: |\n  CREATE TABLE auth (...) WITH ('connector' = 'file', ...);".into(),
                ),
            ),
        }
    }
}

type Parser<K> = fn(&mut Ctx, &str, &str, &Node) -> Option<K>;

/// Inputs a node derives from its own settings rather than an `input` key.
type InputsOf<K> = fn(&mut Ctx, &K, &Node, &str) -> Option<Vec<String>>;

fn no_derived_inputs<K>(_: &mut Ctx, _: &K, _: &Node, _: &str) -> Option<Vec<String>> {
    None
}

#[allow(clippy::too_many_arguments)]
fn section<K>(
    ctx: &mut Ctx,
    top: &MarkedMappingNode,
    root: &Node,
    key: &str,
    required: bool,
    types: &[&str],
    parse: Parser<K>,
    inputs_of: InputsOf<K>,
) -> Vec<NodeSpec<K>> {
    let singular = key.trim_end_matches('s');
    let Some(node) = top.get_node(key) else {
        if required {
            ctx.err(
                loc(root.span()),
                format!("missing section {key:?}"),
                Some(format!("a pipeline needs at least one {singular}")),
            );
        }
        return Vec::new();
    };
    let Some(map) = node.as_mapping() else {
        ctx.err(
            loc(node.span()),
            format!("{key} must be a mapping of names to {key}"),
            None,
        );
        return Vec::new();
    };
    if required && map.is_empty() {
        ctx.err(
            loc(node.span()),
            format!("{key} is empty"),
            Some(format!("a pipeline needs at least one {singular}")),
        );
    }
    let mut out = Vec::new();
    for (name_node, body) in map.iter() {
        let name = name_node.as_str().to_string();
        let what = format!("{singular} {name:?}");
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            ctx.err(
                loc(name_node.span()),
                format!("invalid name {name:?}"),
                Some("names use letters, digits, _ and -".into()),
            );
            continue;
        }
        let Some(body_map) = body.as_mapping() else {
            ctx.err(loc(body.span()), format!("{what} must be a mapping"), None);
            continue;
        };
        let Some(type_node) = body_map.get_scalar("type") else {
            ctx.err(
                loc(name_node.span()),
                format!("missing key \"type\" in {what}"),
                Some(format!("types are: {}", types.join(", "))),
            );
            continue;
        };
        let ty = type_node.as_str();
        if !types.contains(&ty) {
            let hint = did_you_mean(ty, types.iter().copied())
                .or_else(|| Some(format!("{singular} types are: {}", types.join(", "))));
            ctx.err(
                loc(type_node.span()),
                format!("unknown {singular} type {ty:?} in {what}"),
                hint,
            );
            continue;
        }
        let mut rest = body_map.clone();
        let mut common: Vec<(String, Node)> = Vec::new();
        for k in ["type", "input", "parallelism", "watermark"] {
            if let Some(v) = rest.remove(k) {
                common.push((k.to_string(), v));
            }
        }
        let get = |k: &str| common.iter().find(|(n, _)| n == k).map(|(_, v)| v);
        let inputs: Vec<String> = match (get("input"), key) {
            (Some(v), "transforms") if matches!(ty, "sql" | "correlate" | "incidents") => {
                ctx.err(
                    loc(v.span()),
                    format!("unknown field \"input\" in {what}"),
                    Some(match ty {
                        "sql" => "a sql transform reads the tables its query names".into(),
                        "incidents" => {
                            "an incidents step reads its alerts' inputs and its actions".into()
                        }
                        _ => "a correlation reads the inputs its rules name".into(),
                    }),
                );
                Vec::new()
            }
            (Some(v), "sources") => {
                ctx.err(
                    loc(v.span()),
                    format!("unknown field \"input\" in {what}"),
                    Some("sources have no input".into()),
                );
                Vec::new()
            }
            (Some(Node::Scalar(s)), _) => vec![s.as_str().to_string()],
            (Some(Node::Sequence(items)), _) => items
                .iter()
                .filter_map(|i| match i.as_scalar() {
                    Some(s) => Some(s.as_str().to_string()),
                    None => {
                        ctx.err(
                            loc(i.span()),
                            format!("inputs of {what} must be names"),
                            None,
                        );
                        None
                    }
                })
                .collect(),
            (Some(v), _) => {
                ctx.err(
                    loc(v.span()),
                    format!("input of {what} must be a name or a list of names"),
                    None,
                );
                Vec::new()
            }
            (None, "sources") => Vec::new(),
            (None, "transforms") if matches!(ty, "sql" | "correlate" | "incidents") => Vec::new(),
            (None, _) => {
                ctx.err(
                    loc(name_node.span()),
                    format!("missing key \"input\" in {what}"),
                    None,
                );
                Vec::new()
            }
        };
        let parallelism = get("parallelism")
            .and_then(|v| scalar_usize(ctx, v, &format!("parallelism of {what}")));
        let watermark = match get("watermark") {
            Some(v) if key == "sources" => match yaml::from_node::<WatermarkConfig>(
                ctx.file,
                v,
                &format!("watermark of {what}"),
            ) {
                Ok(w) => w,
                Err(d) => {
                    ctx.errors.push(d);
                    WatermarkConfig::default()
                }
            },
            Some(v) => {
                ctx.err(
                    loc(v.span()),
                    format!("unknown field \"watermark\" in {what}"),
                    Some("watermarks are set on sources".into()),
                );
                WatermarkConfig::default()
            }
            None => WatermarkConfig::default(),
        };
        let rest_node = Node::from(rest);
        let Some(kind) = parse(ctx, ty, &what, &rest_node) else {
            continue;
        };
        let inputs = match inputs_of(ctx, &kind, &rest_node, &what) {
            Some(tables) => tables,
            None => inputs,
        };
        out.push(NodeSpec {
            name: name.clone(),
            path: format!("{key}.{name}"),
            inputs,
            parallelism,
            watermark,
            kind,
        });
    }
    out
}

/// The tables a `sql` transform's query reads are its inputs, and a
/// correlation's are its rules'.
fn sql_inputs(ctx: &mut Ctx, kind: &TransformKind, node: &Node, what: &str) -> Option<Vec<String>> {
    if let TransformKind::Incidents(step) = kind {
        let mut inputs: Vec<String> = Vec::new();
        let names = step.config.alerts.iter().map(|a| &a.input);
        for n in names.chain(&step.config.actions) {
            if !inputs.contains(n) {
                inputs.push(n.clone());
            }
        }
        return Some(inputs);
    }
    if let TransformKind::Correlate(cfg) = kind {
        let mut inputs: Vec<String> = Vec::new();
        for r in cfg.rules.iter().chain(&cfg.until) {
            if !inputs.iter().any(|i| i == r.input()) {
                inputs.push(r.input().to_string());
            }
        }
        return Some(inputs);
    }
    let TransformKind::Sql(cfg) = kind else {
        return None;
    };
    match vigil_operators::sql::tables_of(&cfg.query) {
        Ok(tables) => Some(tables),
        Err(e) => {
            let at = node
                .as_mapping()
                .and_then(|m| m.get_node("query"))
                .and_then(|q| loc(q.span()));
            ctx.err(at, format!("{what}: invalid query: {e}"), e.hint.clone());
            Some(Vec::new())
        }
    }
}

fn typed<T: serde::de::DeserializeOwned>(ctx: &mut Ctx, node: &Node, what: &str) -> Option<T> {
    match yaml::from_node::<T>(ctx.file, node, what) {
        Ok(t) => Some(t),
        Err(d) => {
            ctx.errors.push(d);
            None
        }
    }
}

fn parse_source(ctx: &mut Ctx, ty: &str, what: &str, node: &Node) -> Option<SourceKind> {
    Some(match ty {
        "generator" => SourceKind::Generator(Box::new(typed(ctx, node, what)?)),
        "kafka" => SourceKind::Kafka(Box::new(typed(ctx, node, what)?)),
        _ => SourceKind::File(Box::new(typed(ctx, node, what)?)),
    })
}

fn parse_transform(ctx: &mut Ctx, ty: &str, what: &str, node: &Node) -> Option<TransformKind> {
    Some(match ty {
        "filter" => TransformKind::Filter(typed(ctx, node, what)?),
        "project" => TransformKind::Project(typed(ctx, node, what)?),
        "sql" => TransformKind::Sql(typed(ctx, node, what)?),
        "correlate" => TransformKind::Correlate(Box::new(typed(ctx, node, what)?)),
        "lookup" => TransformKind::Lookup(Box::new(typed(ctx, node, what)?)),
        "incidents" => {
            // `log` is the connector's; the rest is the operator's.
            let (config_node, log) = match node.as_mapping() {
                Some(m) => {
                    let mut rest = m.clone();
                    let log = rest.remove("log");
                    (Node::from(rest), log)
                }
                None => (node.clone(), None),
            };
            let config = typed(ctx, &config_node, what)?;
            let log = match log {
                Some(l) => Some(typed(ctx, &l, &format!("log of {what}"))?),
                None => None,
            };
            TransformKind::Incidents(Box::new(IncidentsStep { config, log }))
        }
        _ => TransformKind::Threshold(typed(ctx, node, what)?),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NullSinkConfig {}

fn parse_sink(ctx: &mut Ctx, ty: &str, what: &str, node: &Node) -> Option<SinkKind> {
    Some(match ty {
        "stdout" => SinkKind::Stdout(typed(ctx, node, what)?),
        "file" => SinkKind::File(typed(ctx, node, what)?),
        "kafka" => SinkKind::Kafka(typed(ctx, node, what)?),
        "read_model" => SinkKind::ReadModel(typed(ctx, node, what)?),
        _ => {
            let _: NullSinkConfig = typed(ctx, node, what)?;
            SinkKind::Null
        }
    })
}
