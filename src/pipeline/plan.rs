//! From a checked [`PipelineSpec`] to an engine [`Graph`].
//!
//! Every reference is resolved and every connector and operator is built
//! against its input's schema here, so errors that depend on more than one
//! node (an unknown input, a column the input lacks, a cycle) are caught before
//! anything runs, and located in the file.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use vigil_connectors::file::{FileSinkFactory, FileSourceFactory};
use vigil_connectors::generator::GeneratorSourceFactory;
use vigil_connectors::incident_log::KafkaEventLog;
use vigil_connectors::kafka::model_log::{self, ModelLog};
use vigil_connectors::kafka::{KafkaDeadLetterSinkFactory, KafkaSinkFactory, KafkaSourceFactory};
use vigil_connectors::lookup::{LookupConfig, LookupHow, LookupMatch};
use vigil_connectors::memory::{Collected, MemorySinkFactory};
use vigil_connectors::null::NullSinkFactory;
use vigil_connectors::read_model::{ReadModelSinkFactory, ReadModels};
use vigil_connectors::stdout::StdoutSinkFactory;
use vigil_connectors::ConnectorError;
use vigil_engine::{
    ConfigError, Graph, NodeId, OperatorFactory, Port, SharedClock, SinkFactory, SourceFactory,
    SystemClock, WatermarkSpec, DEAD_LETTER, LATE,
};
use vigil_operators::correlate::{plan_correlation, CorrelateFactory};
use vigil_operators::filter::FilterFactory;
use vigil_operators::incident::{
    event_schema, plan_incidents, state_schema, IncidentFactory, OPEN, RISK, SUMMARY,
};
use vigil_operators::join::{IntervalJoinFactory, LookupJoinFactory, LookupSpec, MatchMode};
use vigil_operators::project::ProjectFactory;
use vigil_operators::sql::{
    plan_query, Catalog, PlannedQuery, PrepareStep, QueryOptions, SqlError, StatelessFactory,
    StepInput, TableInfo,
};
use vigil_operators::threshold::ThresholdFactory;
use vigil_operators::window::WindowAggregateFactory;
use vigil_operators::OperatorError;

use super::diagnostic::{did_you_mean, Diagnostic, Diagnostics};
use super::env::{process_env, Env};
use super::spec::{PipelineSpec, SinkKind, SourceKind, TransformKind};

/// Default out-of-orderness of file and Kafka sources.
const FILE_DISORDER: std::time::Duration = std::time::Duration::from_secs(5);

/// What planning needs from outside the file.
#[derive(Clone)]
pub struct PlanOptions {
    /// Environment for `${VAR}` substitution.
    pub env: Arc<Env>,
    /// Wall clock (generators without a start time start "now").
    pub clock: SharedClock,
    /// Directory for the default dead-letter file.
    pub dead_letter_dir: PathBuf,
    /// Subtasks of every node that does not set its own, in place of the
    /// file's `parallelism` (`vigil run --parallelism`, the Kubernetes
    /// resource's per-pod parallelism).
    pub parallelism: Option<usize>,
}

impl Default for PlanOptions {
    fn default() -> Self {
        Self {
            env: Arc::new(process_env),
            clock: Arc::new(SystemClock),
            dead_letter_dir: PathBuf::from("."),
            parallelism: None,
        }
    }
}

/// A planned pipeline, ready to run.
pub struct Plan {
    /// Pipeline name.
    pub name: String,
    /// The dataflow graph.
    pub graph: Graph,
    /// Generator sources by name (their ground truth is known).
    pub generators: HashMap<String, Arc<GeneratorSourceFactory>>,
    /// Where dead letters go when no sink takes them.
    pub default_dead_letters: Option<PathBuf>,
    /// Names of the user's sinks.
    pub sinks: Vec<String>,
    /// Read models the `read_model` sinks keep, for the HTTP API.
    pub read_models: Arc<ReadModels>,
    /// Kafka topics the pipeline reads or writes (with `--embedded-kafka`,
    /// the in-process broker creates them).
    pub kafka_topics: Vec<String>,
    /// Fingerprint of the definition ([`fingerprint`](super::fingerprint)).
    pub definition: String,
    /// The Kafka sources by name, for `vigil status`.
    pub kafka_sources: Vec<(String, Arc<KafkaSourceFactory>)>,
    /// Changelog topics of the read models, shared by the processes of a
    /// pipeline with `scale_out`.
    pub changelogs: Vec<ModelLog>,
    /// Internal topics re-keying keyed steps (`scale_out`), in plan order.
    pub repartitions: Vec<super::rekey::Repartition>,
}

impl Plan {
    /// Replaces sink `name` by a memory sink and returns what it collects;
    /// for tests and embedding.
    pub fn capture(&mut self, name: &str) -> Option<Collected> {
        let (factory, collected) = MemorySinkFactory::new();
        self.graph.replace_sink(name, Arc::new(factory)).ok()?;
        Some(collected)
    }
}

struct Built {
    id: NodeId,
    event_time: Option<String>,
}

fn port_of(name: &str) -> Option<Port> {
    match name {
        "dead_letter" => Some(Port::Side(DEAD_LETTER)),
        "late" => Some(Port::Side(LATE)),
        "summary" => Some(Port::Side(SUMMARY)),
        "open_incidents" => Some(Port::Side(OPEN)),
        "entity_risk" => Some(Port::Side(RISK)),
        _ => None,
    }
}

/// A connector's or operator's build error: a field at fault, or something else.
enum BuildError {
    Field(ConfigError),
    Other(String),
}

impl From<ConnectorError> for BuildError {
    fn from(e: ConnectorError) -> Self {
        match e {
            ConnectorError::Config(c) => BuildError::Field(c),
            other => BuildError::Other(other.to_string()),
        }
    }
}

impl From<OperatorError> for BuildError {
    fn from(e: OperatorError) -> Self {
        match e {
            OperatorError::Config(c) => BuildError::Field(c),
            OperatorError::Sql(s) => s.into(),
            other => BuildError::Other(other.to_string()),
        }
    }
}

impl From<SqlError> for BuildError {
    fn from(e: SqlError) -> Self {
        BuildError::Field(ConfigError {
            field: "query".into(),
            message: format!("invalid query: {}{}", e.position(), e.message),
            hint: e.hint,
        })
    }
}

/// The tables a SQL step reads, under the names its query uses.
struct InputTables {
    tables: Vec<(String, SchemaRef)>,
    others: Vec<String>,
}

impl Catalog for InputTables {
    fn table(&self, name: &str) -> Option<TableInfo> {
        self.tables
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, schema)| TableInfo {
                schema: schema.clone(),
            })
    }
    fn names(&self) -> Vec<String> {
        self.others.clone()
    }
}

/// The event-time column of a SQL step's output: a window's `window_time`
/// (its last instant, so a downstream window puts the row in the window it
/// belongs to), else its end or start, else the input's if it passes through.
fn sql_event_time(output: &SchemaRef, upstream: Option<String>) -> Option<String> {
    ["window_time", "window_end", "window_start"]
        .iter()
        .map(|c| c.to_string())
        .chain(upstream)
        .find(|c| {
            output.field_with_name(c).is_ok_and(|f| {
                matches!(
                    f.data_type(),
                    arrow::datatypes::DataType::Timestamp(
                        arrow::datatypes::TimeUnit::Millisecond,
                        _
                    )
                )
            })
        })
}

struct Planner<'a> {
    spec: &'a PipelineSpec,
    errors: Vec<Diagnostic>,
}

impl Planner<'_> {
    fn at(&mut self, path: &str, message: impl Into<String>, hint: Option<String>) {
        let location = self.spec.locate(path);
        self.errors
            .push(Diagnostic::new(&self.spec.file, location, message).hint(hint));
    }

    /// Reports a connector's or operator's build error, at the field it names.
    fn build_error(&mut self, node_path: &str, what: &str, e: impl Into<BuildError>) {
        match e.into() {
            BuildError::Field(c) => self.at(
                &format!("{node_path}.{}", c.field),
                format!("{what}: {}", c.message),
                c.hint,
            ),
            BuildError::Other(message) => self.at(node_path, format!("{what}: {message}"), None),
        }
    }
}

/// Builds the graph of `spec`.
pub fn build(spec: &PipelineSpec, options: &PlanOptions) -> Result<Plan, Diagnostics> {
    let mut p = Planner {
        spec,
        errors: Vec::new(),
    };
    let definition = super::fingerprint::of(&spec.root);
    let default_parallelism = options.parallelism.unwrap_or(spec.parallelism).max(1);
    let mut kafka_sources = Vec::new();
    let mut graph = Graph::new();
    let mut built: HashMap<String, Built> = HashMap::new();
    let mut generators = HashMap::new();

    // Names are unique across sections.
    let mut seen: HashMap<&str, &str> = HashMap::new();
    let all = spec
        .sources
        .iter()
        .map(|s| (s.name.as_str(), s.path.as_str()))
        .chain(
            spec.transforms
                .iter()
                .map(|t| (t.name.as_str(), t.path.as_str())),
        )
        .chain(
            spec.sinks
                .iter()
                .map(|s| (s.name.as_str(), s.path.as_str())),
        );
    for (name, path) in all {
        if let Some(first) = seen.insert(name, path) {
            p.at(
                path,
                format!("name {name:?} is already used by {first}"),
                Some("node names are unique across sources, transforms and sinks".into()),
            );
        }
    }

    for s in &spec.sources {
        let what = format!("source {:?}", s.name);
        let parallelism = s.parallelism.unwrap_or(default_parallelism);
        // A generator knows its own disorder; files and Kafka default to 5 s.
        let default_disorder = match &s.kind {
            SourceKind::Generator(cfg) => cfg.out_of_orderness,
            _ => FILE_DISORDER,
        };
        let watermark = WatermarkSpec {
            out_of_orderness_ms: s
                .watermark
                .out_of_orderness
                .unwrap_or(default_disorder)
                .as_millis() as i64,
            idle_timeout_ms: s.watermark.idle_timeout.as_millis() as i64,
        };
        let factory: Result<Arc<dyn SourceFactory>, ConnectorError> = match &s.kind {
            SourceKind::Generator(cfg) => {
                GeneratorSourceFactory::new((**cfg).clone(), options.clock.now_ms()).map(|f| {
                    let f = Arc::new(f);
                    generators.insert(s.name.clone(), f.clone());
                    f as Arc<dyn SourceFactory>
                })
            }
            SourceKind::Kafka(cfg) => KafkaSourceFactory::new(&spec.name, &s.name, cfg).map(|f| {
                let f = Arc::new(f.with_definition(&definition));
                kafka_sources.push((s.name.clone(), f.clone()));
                f as Arc<dyn SourceFactory>
            }),
            SourceKind::File(cfg) => {
                FileSourceFactory::new(&s.name, cfg).map(|f| Arc::new(f) as Arc<dyn SourceFactory>)
            }
        };
        match factory.map(|f| {
            // Downstream steps find event time by the column's name.
            let event_time = f
                .output_schema()
                .field(f.event_time_column())
                .name()
                .clone();
            (
                graph.add_source(&s.name, f, parallelism, watermark),
                event_time,
            )
        }) {
            Ok((Ok(id), event_time)) => {
                built.insert(
                    s.name.clone(),
                    Built {
                        id,
                        event_time: Some(event_time),
                    },
                );
            }
            Ok((Err(e), _)) => p.at(&s.path, format!("{what}: {e}"), None),
            Err(e) => p.build_error(&s.path, &what, e),
        }
    }

    let order = topological(&mut p);
    let names: Vec<&str> = spec
        .sources
        .iter()
        .map(|s| s.name.as_str())
        .chain(spec.transforms.iter().map(|t| t.name.as_str()))
        .collect();

    for ti in order {
        let t = &spec.transforms[ti];
        let what = format!("transform {:?}", t.name);
        let Some(inputs) = resolve(&mut p, &graph, &built, &names, &t.path, &t.inputs) else {
            continue;
        };
        let parallelism = t.parallelism.unwrap_or(default_parallelism);
        if let TransformKind::Incidents(step) = &t.kind {
            let input_of = |name: &str| step_input(&graph, &built, name);
            let planned = match plan_incidents(&t.name, &step.config, &input_of) {
                Ok(planned) => planned,
                Err(e) => {
                    p.build_error(&t.path, &what, e);
                    continue;
                }
            };
            let log = match &step.log {
                Some(cfg) => {
                    match KafkaEventLog::new(cfg, event_schema(), state_schema(), "incident_id") {
                        Ok(l) => Some(l as Arc<dyn vigil_engine::EventLog>),
                        Err(e) => {
                            p.build_error(&format!("{}.log", t.path), &what, e);
                            continue;
                        }
                    }
                }
                None => None,
            };
            let added =
                add_prepare_steps(&mut graph, &built, &t.name, &planned.prepared, parallelism)
                    .and_then(|prepared| {
                        graph.add_operator(
                            &t.name,
                            Arc::new(IncidentFactory::new(planned.spec, log)),
                            parallelism,
                            &prepared,
                        )
                    });
            match added {
                Ok(id) => {
                    built.insert(
                        t.name.clone(),
                        Built {
                            id,
                            event_time: Some("time".into()),
                        },
                    );
                }
                Err(e) => p.at(&t.path, format!("{what}: {e}"), None),
            }
            continue;
        }
        if let TransformKind::Correlate(c) = &t.kind {
            let input_of = |name: &str| step_input(&graph, &built, name);
            let planned = match plan_correlation(&t.name, c, &input_of) {
                Ok(planned) => planned,
                Err(e) => {
                    p.build_error(&t.path, &what, e);
                    continue;
                }
            };
            // Without a group, one subtask must see every event.
            let parallelism = if planned.spec.group_by.is_empty() {
                1
            } else {
                parallelism
            };
            let added = add_prepare_steps(&mut graph, &built, &t.name, &planned.rules, parallelism)
                .and_then(|prepared| {
                    graph.add_operator(
                        &t.name,
                        Arc::new(CorrelateFactory::new(planned.spec)),
                        parallelism,
                        &prepared,
                    )
                });
            match added {
                Ok(id) => {
                    built.insert(
                        t.name.clone(),
                        Built {
                            id,
                            event_time: Some("last_ts".into()),
                        },
                    );
                }
                Err(e) => p.at(&t.path, format!("{what}: {e}"), None),
            }
            continue;
        }
        let upstream_time = inputs
            .first()
            .and_then(|(id, _)| built.values().find(|b| b.id == *id))
            .and_then(|b| b.event_time.clone());
        if let TransformKind::Sql(c) = &t.kind {
            let catalog = InputTables {
                tables: t
                    .inputs
                    .iter()
                    .zip(&inputs)
                    .filter_map(|(name, (id, port))| {
                        Some((name.clone(), graph.nodes()[*id].output_schema(*port)?))
                    })
                    .collect(),
                others: names.iter().map(|n| n.to_string()).collect(),
            };
            let options = QueryOptions {
                name: t.name.clone(),
                lateness_ms: c.lateness_ms(),
                cross_tenant: c.cross_tenant,
            };
            let planned = match plan_query(&c.query, &catalog, &options) {
                Ok(p) => p,
                Err(e) => {
                    p.build_error(&t.path, &what, e);
                    continue;
                }
            };
            let added = match planned {
                PlannedQuery::Stateless { stages, .. } => {
                    // Rows keep their own event time when it passes through.
                    let output = stages.output_schema();
                    let event_time = upstream_time
                        .filter(|c| output.field_with_name(c).is_ok())
                        .or_else(|| sql_event_time(&output, None));
                    let factory = Arc::new(StatelessFactory::new(&c.query, stages));
                    graph
                        .add_operator(&t.name, factory, parallelism, &inputs)
                        .map(|id| (id, event_time))
                }
                PlannedQuery::Join {
                    left_table,
                    right_table,
                    left,
                    right,
                    join,
                } => {
                    let input_of =
                        |table: &str| t.inputs.iter().position(|n| n == table).map(|i| inputs[i]);
                    let (Some(l), Some(r)) = (input_of(&left_table), input_of(&right_table)) else {
                        p.at(
                            &t.path,
                            format!("{what}: the join's tables are not its inputs"),
                            None,
                        );
                        continue;
                    };
                    // The output's event time: the left's, else the right's.
                    let time_of = |id: NodeId| {
                        built
                            .values()
                            .find(|b| b.id == id)
                            .and_then(|b| b.event_time.clone())
                    };
                    let output = join.post.output_schema();
                    let event_time = [time_of(l.0), time_of(r.0)]
                        .into_iter()
                        .flatten()
                        .find(|c| output.field_with_name(c).is_ok());
                    let left_prep = Arc::new(StatelessFactory::new(&c.query, left));
                    let right_prep = Arc::new(StatelessFactory::new(&c.query, right));
                    graph
                        .add_operator(&format!("{}/left", t.name), left_prep, parallelism, &[l])
                        .and_then(|lp| {
                            graph
                                .add_operator(
                                    &format!("{}/right", t.name),
                                    right_prep,
                                    parallelism,
                                    &[r],
                                )
                                .map(|rp| (lp, rp))
                        })
                        .and_then(|(lp, rp)| {
                            graph.add_operator(
                                &t.name,
                                Arc::new(IntervalJoinFactory::new(*join)),
                                parallelism,
                                &[(lp, Port::Main), (rp, Port::Main)],
                            )
                        })
                        .map(|id| (id, event_time))
                }
                PlannedQuery::Windowed {
                    prepare, aggregate, ..
                } => {
                    let factory = WindowAggregateFactory::new(aggregate);
                    let event_time = sql_event_time(&factory.spec().output_schema(), None);
                    // Without keys, one subtask must see every row.
                    let agg_parallelism = if factory.spec().key_columns.is_empty() {
                        1
                    } else {
                        parallelism
                    };
                    let prep = Arc::new(StatelessFactory::new(&c.query, prepare));
                    graph
                        .add_operator(&format!("{}/prepare", t.name), prep, parallelism, &inputs)
                        .and_then(|prep_id| {
                            graph.add_operator(
                                &t.name,
                                Arc::new(factory),
                                agg_parallelism,
                                &[(prep_id, Port::Main)],
                            )
                        })
                        .map(|id| (id, event_time))
                }
            };
            match added {
                Ok((id, event_time)) => {
                    built.insert(t.name.clone(), Built { id, event_time });
                }
                Err(e) => p.at(&t.path, format!("{what}: {e}"), None),
            }
            continue;
        }
        let Some(schema) = common_schema(&mut p, &graph, &t.path, &inputs) else {
            continue;
        };
        let made: Result<(Arc<dyn OperatorFactory>, Option<String>), OperatorError> = match &t.kind
        {
            TransformKind::Filter(c) => FilterFactory::new(c, schema)
                .map(|f| (Arc::new(f) as Arc<dyn OperatorFactory>, upstream_time)),
            TransformKind::Project(c) => ProjectFactory::new(c, schema).map(|f| {
                let keeps = upstream_time.filter(|n| f.output_schema().index_of(n).is_ok());
                (Arc::new(f) as Arc<dyn OperatorFactory>, keeps)
            }),
            TransformKind::Threshold(c) => {
                ThresholdFactory::new(&t.name, c, schema, upstream_time.as_deref()).map(|f| {
                    (
                        Arc::new(f) as Arc<dyn OperatorFactory>,
                        Some("window_end".to_string()),
                    )
                })
            }
            TransformKind::Lookup(c) => lookup(&t.name, c, schema)
                .map(|f| (Arc::new(f) as Arc<dyn OperatorFactory>, upstream_time)),
            TransformKind::Sql(_) | TransformKind::Correlate(_) | TransformKind::Incidents(_) => {
                continue
            }
        };
        match made {
            Ok((factory, event_time)) => {
                match graph.add_operator(&t.name, factory, parallelism, &inputs) {
                    Ok(id) => {
                        built.insert(t.name.clone(), Built { id, event_time });
                    }
                    Err(e) => p.at(&t.path, format!("{what}: {e}"), None),
                }
            }
            Err(e) => p.build_error(&t.path, &what, e),
        }
    }

    let mut consumed: HashSet<(NodeId, Port)> = HashSet::new();
    let mut sinks = Vec::new();
    let read_models = ReadModels::new();
    let mut changelogs = Vec::new();
    for s in &spec.sinks {
        let what = format!("sink {:?}", s.name);
        let Some(inputs) = resolve(&mut p, &graph, &built, &names, &s.path, &s.inputs) else {
            continue;
        };
        consumed.extend(inputs.iter().copied());
        let factory: Arc<dyn SinkFactory> = match &s.kind {
            SinkKind::Stdout(c) => Arc::new(StdoutSinkFactory::new(c)),
            SinkKind::File(c) => Arc::new(FileSinkFactory::new(c)),
            SinkKind::Kafka(c) => match KafkaSinkFactory::new(c) {
                Ok(f) => Arc::new(f),
                Err(e) => {
                    p.build_error(&s.path, &what, e);
                    continue;
                }
            },
            SinkKind::ReadModel(c) => {
                let mut f = ReadModelSinkFactory::new(c, &s.name, &read_models);
                // With scale_out the processes share the model through a
                // changelog (a missing broker is scale_out's error, below).
                if let Some((scale, Ok((brokers, properties)))) = spec
                    .scale_out
                    .as_ref()
                    .map(|scale| (scale, super::rekey::kafka_of(spec, scale)))
                {
                    let log = ModelLog {
                        brokers,
                        properties,
                        topic: model_log::topic_name(
                            &super::rekey::topic_safe(&spec.name),
                            &super::rekey::topic_safe(f.model_name()),
                        ),
                        partitions: scale.partitions,
                    };
                    changelogs.push(log.clone());
                    f = f.shared(&spec.name, log);
                }
                Arc::new(f)
            }
            SinkKind::Null => Arc::new(NullSinkFactory),
        };
        let mut fits = true;
        for (id, port) in &inputs {
            if let Some(schema) = graph.nodes()[*id].output_schema(*port) {
                if let Err(e) = factory.check_input(&schema) {
                    let field = if matches!(s.kind, SinkKind::Kafka(_)) {
                        "key"
                    } else {
                        "input"
                    };
                    p.at(&format!("{}.{field}", s.path), format!("{what}: {e}"), None);
                    fits = false;
                }
            }
        }
        if !fits {
            continue;
        }
        match graph.add_sink(
            &s.name,
            factory,
            s.parallelism.unwrap_or(default_parallelism),
            &inputs,
        ) {
            Ok(_) => sinks.push(s.name.clone()),
            Err(e) => p.at(&s.path, format!("{what}: {e}"), None),
        }
    }

    if !p.errors.is_empty() {
        return Err(Diagnostics(p.errors));
    }

    let repartitions = match &spec.scale_out {
        Some(scale) => super::rekey::plan(spec, scale, &mut graph, &definition, &mut kafka_sources)
            .map_err(|e| {
                Diagnostics::from(Diagnostic::new(
                    &spec.file,
                    spec.locate("scale_out"),
                    format!("scale_out: {e}"),
                ))
            })?,
        None => Vec::new(),
    };

    // Dead letters nobody consumes go to `<topic>.dlq` for Kafka sources and
    // to a file for the others, never nowhere.
    let mut orphans: Vec<(NodeId, Port)> = Vec::new();
    for s in &spec.sources {
        let Some(b) = built.get(&s.name) else {
            continue;
        };
        let input = (b.id, Port::Side(DEAD_LETTER));
        if consumed.contains(&input) || graph.nodes()[b.id].output_schema(input.1).is_none() {
            continue;
        }
        match &s.kind {
            SourceKind::Kafka(cfg) => {
                let factory = KafkaDeadLetterSinkFactory::new(
                    &spec.name,
                    &cfg.brokers,
                    &cfg.properties,
                    cfg.dead_letter_topic.clone(),
                );
                graph
                    .add_sink(
                        &format!("_dead_letters_{}", s.name),
                        Arc::new(factory),
                        1,
                        &[input],
                    )
                    .map_err(|e| {
                        Diagnostics::from(Diagnostic::new(&spec.file, None, e.to_string()))
                    })?;
            }
            _ => orphans.push(input),
        }
    }
    // Operators that reject records (an incidents step refusing an action,
    // a poison record a SQL step cannot evaluate), the steps a transform is
    // planned into included.
    let operators: Vec<NodeId> = graph
        .nodes()
        .iter()
        .enumerate()
        .filter(|(_, n)| matches!(n.kind, vigil_engine::graph::NodeKind::Operator(_)))
        .map(|(id, _)| id)
        .collect();
    for id in operators {
        let input = (id, Port::Side(DEAD_LETTER));
        if !consumed.contains(&input) && graph.nodes()[id].output_schema(input.1).is_some() {
            orphans.push(input);
        }
    }
    let mut default_dead_letters = None;
    if !orphans.is_empty() {
        let path = options
            .dead_letter_dir
            .join(format!("{}.dlq.ndjson", spec.name));
        let factory = Arc::new(FileSinkFactory::dead_letters(path.clone()));
        graph
            .add_sink("_dead_letters", factory, 1, &orphans)
            .map_err(|e| Diagnostics::from(Diagnostic::new(&spec.file, None, e.to_string())))?;
        default_dead_letters = Some(path);
    }

    Ok(Plan {
        name: spec.name.clone(),
        graph,
        generators,
        default_dead_letters,
        sinks,
        read_models,
        kafka_topics: kafka_topics(spec),
        definition,
        kafka_sources,
        repartitions,
        changelogs,
    })
}

/// The main output of the source or step `name`, for a step that plans
/// prepare queries over it.
fn step_input(graph: &Graph, built: &HashMap<String, Built>, name: &str) -> Option<StepInput> {
    let b = built.get(name)?;
    Some(StepInput {
        schema: graph.nodes()[b.id].output_schema(Port::Main)?,
        event_time: b.event_time.clone(),
    })
}

/// Adds a step's prepare queries as nodes `<step>/<name>`, each reading
/// its input; returns them, in order, as the step's inputs.
fn add_prepare_steps(
    graph: &mut Graph,
    built: &HashMap<String, Built>,
    step: &str,
    steps: &[PrepareStep],
    parallelism: usize,
) -> vigil_engine::Result<Vec<(NodeId, Port)>> {
    let mut out = Vec::with_capacity(steps.len());
    for r in steps {
        let Some(from) = built.get(&r.input).map(|b| b.id) else {
            continue;
        };
        let factory = Arc::new(StatelessFactory::new(&r.sql, r.stages.clone()));
        let id = graph.add_operator(
            &format!("{step}/{}", r.name),
            factory,
            parallelism,
            &[(from, Port::Main)],
        )?;
        out.push((id, Port::Main));
    }
    Ok(out)
}

/// Every Kafka topic the pipeline names, in file order, once each.
fn kafka_topics(spec: &PipelineSpec) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut add = |t: &str| {
        if !out.iter().any(|o| o == t) {
            out.push(t.to_string());
        }
    };
    for s in &spec.sources {
        if let SourceKind::Kafka(c) = &s.kind {
            c.topics.iter().for_each(|t| add(t));
            match &c.dead_letter_topic {
                Some(d) => add(d),
                None => c.topics.iter().for_each(|t| add(&format!("{t}.dlq"))),
            }
        }
    }
    for t in &spec.transforms {
        if let TransformKind::Incidents(step) = &t.kind {
            if let Some(l) = &step.log {
                add(&l.topic);
                add(&l.snapshots);
            }
        }
    }
    for s in &spec.sinks {
        if let SinkKind::Kafka(c) = &s.kind {
            add(&c.topic);
        }
    }
    out
}

/// A lookup join and its table's feed; the table file is read here, so a
/// malformed table stops the pipeline before it starts.
fn lookup(
    name: &str,
    c: &LookupConfig,
    stream: SchemaRef,
) -> Result<LookupJoinFactory, OperatorError> {
    let feed = c.table.open(name).map_err(|e| match e {
        ConnectorError::Config(c) => OperatorError::Config(c),
        other => OperatorError::config("table", other.to_string(), None),
    })?;
    let spec = LookupSpec::new(
        name,
        stream,
        &c.on,
        match c.mode {
            LookupMatch::Exact => MatchMode::Exact,
            LookupMatch::Cidr => MatchMode::Cidr,
        },
        c.how == LookupHow::Inner,
        feed.schema(),
        c.table.key(),
        &c.prefix,
        c.cross_tenant,
    )?;
    Ok(LookupJoinFactory::new(spec, feed))
}

/// Transforms in an order where inputs come first; reports cycles.
fn topological(p: &mut Planner) -> Vec<usize> {
    let spec = p.spec;
    let index: HashMap<&str, usize> = spec
        .transforms
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.as_str(), i))
        .collect();
    let deps: Vec<Vec<usize>> = spec
        .transforms
        .iter()
        .map(|t| {
            t.inputs
                .iter()
                .filter_map(|i| index.get(i.split('.').next().unwrap_or(i)).copied())
                .collect()
        })
        .collect();
    // 0 = unvisited, 1 = on the stack, 2 = done
    let mut state = vec![0u8; deps.len()];
    let mut order = Vec::new();
    let mut cyclic = Vec::new();
    fn visit(
        i: usize,
        deps: &[Vec<usize>],
        state: &mut [u8],
        order: &mut Vec<usize>,
        cyclic: &mut Vec<usize>,
    ) {
        match state[i] {
            2 => return,
            1 => {
                cyclic.push(i);
                return;
            }
            _ => {}
        }
        state[i] = 1;
        for &d in &deps[i] {
            visit(d, deps, state, order, cyclic);
        }
        state[i] = 2;
        order.push(i);
    }
    for i in 0..deps.len() {
        visit(i, &deps, &mut state, &mut order, &mut cyclic);
    }
    for i in cyclic {
        let t = &spec.transforms[i];
        p.at(
            &format!("{}.input", t.path),
            format!("transform {:?} is part of a cycle", t.name),
            Some("inputs must not lead back to the transform itself".into()),
        );
    }
    order
}

fn resolve(
    p: &mut Planner,
    graph: &Graph,
    built: &HashMap<String, Built>,
    names: &[&str],
    path: &str,
    inputs: &[String],
) -> Option<Vec<(NodeId, Port)>> {
    let mut out = Vec::new();
    let mut ok = true;
    for (i, input) in inputs.iter().enumerate() {
        let field = if inputs.len() == 1 {
            format!("{path}.input")
        } else {
            format!("{path}.input[{i}]")
        };
        let (name, port) = match input.split_once('.') {
            Some((n, port_name)) => match port_of(port_name) {
                Some(port) => (n, port),
                None => {
                    p.at(
                        &field,
                        format!("unknown output {port_name:?} of {n:?}"),
                        Some("side outputs are dead_letter (sources) and late (windows)".into()),
                    );
                    ok = false;
                    continue;
                }
            },
            None => (input.as_str(), Port::Main),
        };
        match built.get(name) {
            Some(b) => {
                if graph.nodes()[b.id].output_schema(port).is_none() {
                    p.at(&field, format!("{name:?} has no {port} output"), None);
                    ok = false;
                } else {
                    out.push((b.id, port));
                }
            }
            None if names.contains(&name) => ok = false, // failed earlier, already reported
            None => {
                let hint = did_you_mean(name, names.iter().copied());
                p.at(
                    &field,
                    format!("unknown input {name:?}"),
                    hint.or_else(|| {
                        Some(format!(
                            "inputs are sources or transforms: {}",
                            names.join(", ")
                        ))
                    }),
                );
                ok = false;
            }
        }
    }
    (ok && !out.is_empty()).then_some(out)
}

fn common_schema(
    p: &mut Planner,
    graph: &Graph,
    path: &str,
    inputs: &[(NodeId, Port)],
) -> Option<SchemaRef> {
    let schemas: Vec<SchemaRef> = inputs
        .iter()
        .filter_map(|(id, port)| graph.nodes()[*id].output_schema(*port))
        .collect();
    let first = schemas.first()?.clone();
    if schemas.iter().any(|s| s.fields() != first.fields()) {
        p.at(
            &format!("{path}.input"),
            "inputs have different schemas",
            Some("a transform with several inputs needs them to have the same columns".into()),
        );
        return None;
    }
    Some(first)
}
