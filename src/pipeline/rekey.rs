//! Planning of repartitions: with `scale_out:`, every keyed step whose
//! input is not already divided by its key reads that input through an
//! internal Kafka topic keyed by it (see `docs/scale-out.md`).
//!
//! The planner takes the graph the steps were planned into and, in front of
//! each such step, puts a writer (a sink, `<step>/rekey-out`, that sends
//! each row to the partition of its key group) and a reader (a Kafka
//! source in the pipeline's group, `<step>/rekey-in`) whose output the step
//! reads instead. A join's two inputs share one topic: writers
//! `<step>/rekey-out-1` and `-2`, the second's rows tagged, and one reader
//! whose side output carries them, so both inputs of a key group are always
//! in the same process. Graph surgery after the fact, rather than in each step's
//! planning, keeps the steps unaware of how many processes run them: a
//! single-process pipeline is the same graph without the pairs.

use std::sync::Arc;

use arrow::datatypes::{DataType, TimeUnit};
use vigil_connectors::kafka::repartition::{
    topic_name, OriginSpec, RepartitionSinkFactory, ORIGIN_OFFSET, ORIGIN_PARTITION, ORIGIN_TOPIC,
    SECOND_INPUT,
};
use vigil_connectors::kafka::{KafkaSourceFactory, Properties};
use vigil_engine::graph::NodeKind;
use vigil_engine::{Graph, NodeId, Port, WatermarkSpec};

use super::spec::{PipelineSpec, ScaleOutSpec, SourceKind};

/// One repartition topic of a plan.
#[derive(Debug, Clone)]
pub struct Repartition {
    /// The keyed step it feeds.
    pub step: String,
    /// The internal topic.
    pub topic: String,
    /// Its brokers and client settings.
    pub brokers: String,
    /// Client settings (security) for its admin, writer and reader.
    pub properties: Properties,
    /// Its partitions.
    pub partitions: usize,
    /// The key it divides rows by.
    pub keys: Vec<String>,
}

/// A name Kafka accepts as a topic: `[A-Za-z0-9._-]`.
pub(super) fn topic_safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '.'
            }
        })
        .collect()
}

/// The brokers and client properties of a scaled-out pipeline's internal
/// topics: `scale_out.brokers`, else its first Kafka source's.
pub(super) fn kafka_of(
    spec: &PipelineSpec,
    scale: &ScaleOutSpec,
) -> Result<(String, Properties), String> {
    let first_kafka = spec.sources.iter().find_map(|s| match &s.kind {
        SourceKind::Kafka(c) => Some(c),
        _ => None,
    });
    match (&scale.brokers, first_kafka) {
        (Some(b), k) => Ok((
            b.clone(),
            k.map(|c| c.properties.clone()).unwrap_or_default(),
        )),
        (None, Some(k)) => Ok((k.brokers.clone(), k.properties.clone())),
        (None, None) => Err(
            "scale_out needs Kafka for its internal topics: set scale_out.brokers, or read a Kafka source"
                .into(),
        ),
    }
}

/// Inserts the repartitions of `spec`'s `scale_out` into `graph`; the
/// readers are also added to `kafka_sources`. Returns them, or a message
/// naming the step that cannot be re-keyed.
pub fn plan(
    spec: &PipelineSpec,
    scale: &ScaleOutSpec,
    graph: &mut Graph,
    definition: &str,
    kafka_sources: &mut Vec<(String, Arc<KafkaSourceFactory>)>,
) -> Result<Vec<Repartition>, String> {
    let (brokers, properties) = kafka_of(spec, scale)?;
    // Writers stop holding a partition back when silent this long: the
    // longest idle timeout of the sources, so a writer whose process died
    // holds it until its successor has taken its input over.
    let idle = spec
        .sources
        .iter()
        .map(|s| s.watermark.idle_timeout)
        .max()
        .unwrap_or(std::time::Duration::from_secs(30));
    let keyed: Vec<(NodeId, Vec<String>)> = graph
        .nodes()
        .iter()
        .enumerate()
        .filter_map(|(id, n)| match &n.kind {
            NodeKind::Operator(f) if !f.key_columns().is_empty() => Some((id, f.key_columns())),
            _ => None,
        })
        .collect();
    let times = vigil_engine::event_time_columns(graph.nodes());
    // Keyed nodes whose input is divided by their key, with that key.
    let mut divided: Vec<(NodeId, Vec<String>)> = Vec::new();
    let mut out = Vec::new();
    for (id, keys) in keyed {
        let node = graph.nodes()[id].clone();
        if node.inputs.is_empty() || node.inputs.len() > 2 {
            return Err(format!(
                "step {:?} has {} inputs; with scale_out, a keyed step of one or two inputs is re-keyed",
                node.name,
                node.inputs.len()
            ));
        }
        // Co-partitioned: every input already divided by this key.
        if node
            .inputs
            .iter()
            .all(|e| is_divided_by(graph, &divided, e.from, &keys))
        {
            divided.push((id, keys));
            continue;
        }
        // Both inputs of a join go through one topic, the second tagged,
        // so partition p of both is one process's (Kafka's assignors do
        // not promise that for two topics).
        let join = node.inputs.len() == 2;
        let mut schemas = Vec::new();
        for (i, edge) in node.inputs.iter().enumerate() {
            let up = &graph.nodes()[edge.from];
            let schema = up
                .output_schema(edge.port)
                .ok_or_else(|| format!("step {:?}: input {i} has no schema", node.name))?;
            for c in [ORIGIN_TOPIC, ORIGIN_PARTITION, ORIGIN_OFFSET] {
                if schema.index_of(c).is_err() {
                    return Err(format!(
                        "step {:?} is re-keyed across processes and needs the Kafka column {c:?} in {}, to drop rows sent twice; keep kafka_topic, kafka_partition and kafka_offset in the steps before it",
                        node.name,
                        if join { format!("input {}", i + 1) } else { "its input".to_string() }
                    ));
                }
            }
            schemas.push(schema);
        }
        let first = &node.inputs[0];
        let is_ts = |i: usize| {
            matches!(
                schemas[0].field(i).data_type(),
                DataType::Timestamp(TimeUnit::Millisecond, _)
            )
        };
        let event_time = times[first.from]
            .as_deref()
            .and_then(|c| schemas[0].index_of(c).ok())
            .filter(|&i| is_ts(i))
            .or_else(|| (0..schemas[0].fields().len()).find(|&i| is_ts(i)))
            .ok_or_else(|| {
                format!(
                    "step {:?}: its input has no millisecond timestamp column to carry event time",
                    node.name
                )
            })?;
        let topic = topic_name(&topic_safe(&spec.name), &topic_safe(&node.name));
        // The Kafka topics whose partitions the writers announce bounds
        // for: a fresh reader waits until each has been announced.
        let mut origin_topics: Vec<String> = Vec::new();
        for (i, edge) in node.inputs.iter().enumerate() {
            let mut writer = RepartitionSinkFactory::new(
                &brokers,
                properties.clone(),
                &topic,
                keys.clone(),
                scale.partitions,
            )
            .map_err(|e| format!("step {:?}: {e}", node.name))?;
            if i == 1 {
                writer = writer.second_input();
            }
            // A bound per input partition, for readers to hold while the
            // partition changes writers (docs/scale-out.md).
            let column = times[edge.from].clone().filter(|c| {
                schemas[i].field_with_name(c).is_ok_and(|f| {
                    matches!(f.data_type(), DataType::Timestamp(TimeUnit::Millisecond, _))
                })
            });
            if let (Some(column), Some(source)) = (column, source_of(graph, edge.from)) {
                let w = graph.nodes()[source].watermark;
                writer = writer.with_origins(OriginSpec {
                    event_time: column,
                    out_of_orderness_ms: w.out_of_orderness_ms,
                    idle_timeout_ms: w.idle_timeout_ms,
                });
                let source_name = &graph.nodes()[source].name;
                if let Some(SourceKind::Kafka(c)) = spec
                    .sources
                    .iter()
                    .find(|s| &s.name == source_name)
                    .map(|s| &s.kind)
                {
                    origin_topics.extend(c.topics.iter().cloned());
                }
            }
            let writer_name = match join {
                false => format!("{}/rekey-out", node.name),
                true => format!("{}/rekey-out-{}", node.name, i + 1),
            };
            let up = graph.nodes()[edge.from].parallelism;
            graph
                .add_sink(
                    &writer_name,
                    Arc::new(writer),
                    up,
                    &[(edge.from, edge.port)],
                )
                .map_err(|e| format!("step {:?}: {e}", node.name))?;
        }
        let reader_name = format!("{}/rekey-in", node.name);
        let reader = KafkaSourceFactory::repartition_reader(
            &spec.name,
            &reader_name,
            &brokers,
            &properties,
            &topic,
            schemas[0].clone(),
            schemas.get(1).cloned(),
            event_time,
            scale.partitions,
            idle,
        )
        .map_err(|e| format!("step {:?}: {e}", node.name))?;
        origin_topics.sort_unstable();
        origin_topics.dedup();
        let reader = Arc::new(
            reader
                .expect_origins(origin_topics)
                .with_definition(definition),
        );
        kafka_sources.push((reader_name.clone(), reader.clone()));
        let reader_id = graph
            .add_source(
                &reader_name,
                reader,
                node.parallelism.min(scale.partitions),
                WatermarkSpec {
                    out_of_orderness_ms: 0,
                    idle_timeout_ms: idle.as_millis() as i64,
                },
            )
            .map_err(|e| format!("step {:?}: {e}", node.name))?;
        graph
            .reroute(id, 0, (reader_id, Port::Main))
            .map_err(|e| format!("step {:?}: {e}", node.name))?;
        if join {
            graph
                .reroute(id, 1, (reader_id, Port::Side(SECOND_INPUT)))
                .map_err(|e| format!("step {:?}: {e}", node.name))?;
        }
        divided.push((id, keys.clone()));
        out.push(Repartition {
            step: node.name.clone(),
            topic,
            brokers: brokers.clone(),
            properties: properties.clone(),
            partitions: scale.partitions,
            keys,
        });
    }
    Ok(out)
}

/// The source whose rows reach `from` through steps of one input: whose
/// watermarks bound them.
fn source_of(graph: &Graph, mut from: NodeId) -> Option<NodeId> {
    for _ in 0..graph.nodes().len() {
        let n = &graph.nodes()[from];
        match &n.kind {
            NodeKind::Source(_) => return Some(from),
            NodeKind::Operator(_) if n.inputs.len() == 1 => from = n.inputs[0].from,
            _ => return None,
        }
    }
    None
}

/// True when the rows leaving `from` are already divided between
/// processes by `keys`: `from` is, or follows through steps of one input
/// and no key, a step that was itself divided by the same key columns.
fn is_divided_by(
    graph: &Graph,
    divided: &[(NodeId, Vec<String>)],
    mut from: NodeId,
    keys: &[String],
) -> bool {
    for _ in 0..graph.nodes().len() {
        if divided.iter().any(|(id, k)| *id == from && k == keys) {
            return true;
        }
        let n = &graph.nodes()[from];
        match &n.kind {
            NodeKind::Operator(f) if f.key_columns().is_empty() && n.inputs.len() == 1 => {
                from = n.inputs[0].from;
            }
            _ => return false,
        }
    }
    false
}
