//! The logical dataflow graph: named nodes, their parallelism, and how records
//! are partitioned on each edge.
//!
//! A graph is built once, validated, and then handed to the
//! [`runtime`](crate::runtime), which turns every node into `parallelism`
//! tokio tasks and every edge into bounded channels. How an edge distributes
//! records is decided here, from what the downstream node needs:
//!
//! | downstream needs            | edge               |
//! |-----------------------------|--------------------|
//! | keyed state (`key_columns`) | hash of the key    |
//! | nothing, same parallelism   | forward (1:1)      |
//! | nothing, other parallelism  | round robin        |
//!
//! Hashing uses DataFusion's repartitioning hash with a fixed seed, so the same
//! key lands on the same subtask in every run.

use std::fmt::Write as _;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;

use crate::error::{EngineError, Result};
use crate::operator::{OperatorFactory, SidePort, SinkFactory, SourceFactory};
use crate::watermark::WatermarkSpec;

/// Index of a node in a [`Graph`].
pub type NodeId = usize;

/// Which output of a node an edge reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Port {
    /// The main output.
    Main,
    /// A side output (dead letters, late records).
    Side(SidePort),
}

impl std::fmt::Display for Port {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Port::Main => f.write_str("main"),
            Port::Side(s) => f.write_str(s),
        }
    }
}

/// What a node does.
#[derive(Clone)]
pub enum NodeKind {
    /// Reads records in.
    Source(Arc<dyn SourceFactory>),
    /// Transforms records.
    Operator(Arc<dyn OperatorFactory>),
    /// Writes records out.
    Sink(Arc<dyn SinkFactory>),
}

/// How an edge distributes records over the downstream subtasks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Partitioning {
    /// Subtask *i* sends to subtask *i*.
    Forward,
    /// By hash of these columns.
    Hash(Vec<String>),
    /// Batches in turn to each subtask.
    RoundRobin,
}

/// One input of a node.
#[derive(Debug, Clone)]
pub struct Edge {
    /// Upstream node.
    pub from: NodeId,
    /// Which of its outputs.
    pub port: Port,
    /// How records are spread.
    pub partitioning: Partitioning,
}

/// A node of the graph.
#[derive(Clone)]
pub struct Node {
    /// Unique name, as in the pipeline file.
    pub name: String,
    /// What it does.
    pub kind: NodeKind,
    /// Number of subtasks.
    pub parallelism: usize,
    /// Its inputs, in logical input order.
    pub inputs: Vec<Edge>,
    /// How watermarks are made (sources only).
    pub watermark: WatermarkSpec,
}

impl Node {
    /// Schema of one of this node's outputs.
    pub fn output_schema(&self, port: Port) -> Option<SchemaRef> {
        match (&self.kind, port) {
            (NodeKind::Source(f), Port::Main) => Some(f.output_schema()),
            (NodeKind::Operator(f), Port::Main) => Some(f.output_schema()),
            (NodeKind::Source(f), Port::Side(p)) => side(f.side_outputs(), p),
            (NodeKind::Operator(f), Port::Side(p)) => side(f.side_outputs(), p),
            (NodeKind::Sink(_), _) => None,
        }
    }

    fn role(&self) -> &'static str {
        match self.kind {
            NodeKind::Source(_) => "source",
            NodeKind::Operator(_) => "operator",
            NodeKind::Sink(_) => "sink",
        }
    }

    fn describe(&self) -> String {
        match &self.kind {
            NodeKind::Source(f) => f.describe(),
            NodeKind::Operator(f) => f.describe(),
            NodeKind::Sink(f) => f.describe(),
        }
    }
}

fn side(outputs: Vec<(SidePort, SchemaRef)>, port: SidePort) -> Option<SchemaRef> {
    outputs
        .into_iter()
        .find(|(p, _)| *p == port)
        .map(|(_, s)| s)
}

/// A dataflow graph.
#[derive(Clone, Default)]
pub struct Graph {
    nodes: Vec<Node>,
}

impl Graph {
    /// An empty graph.
    pub fn new() -> Self {
        Self::default()
    }

    /// The nodes, indexed by [`NodeId`].
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Looks a node up by name.
    pub fn find(&self, name: &str) -> Option<NodeId> {
        self.nodes.iter().position(|n| n.name == name)
    }

    fn push(&mut self, node: Node) -> Result<NodeId> {
        if node.parallelism == 0 {
            return Err(EngineError::User(format!(
                "node {:?}: parallelism must be at least 1",
                node.name
            )));
        }
        if self.find(&node.name).is_some() {
            return Err(EngineError::User(format!(
                "node {:?} defined twice",
                node.name
            )));
        }
        self.nodes.push(node);
        Ok(self.nodes.len() - 1)
    }

    /// Adds a source node whose watermarks follow `watermark`.
    pub fn add_source(
        &mut self,
        name: &str,
        factory: Arc<dyn SourceFactory>,
        parallelism: usize,
        watermark: WatermarkSpec,
    ) -> Result<NodeId> {
        let parallelism = factory
            .max_parallelism()
            .map_or(parallelism, |m| parallelism.min(m.max(1)));
        self.push(Node {
            name: name.to_string(),
            kind: NodeKind::Source(factory),
            parallelism,
            inputs: Vec::new(),
            watermark,
        })
    }

    /// Adds an operator reading the given upstream outputs, in order.
    pub fn add_operator(
        &mut self,
        name: &str,
        factory: Arc<dyn OperatorFactory>,
        parallelism: usize,
        inputs: &[(NodeId, Port)],
    ) -> Result<NodeId> {
        let keys = factory.key_columns();
        let edges = self.edges(inputs, parallelism, &keys)?;
        self.push(Node {
            name: name.to_string(),
            kind: NodeKind::Operator(factory),
            parallelism,
            inputs: edges,
            watermark: WatermarkSpec::default(),
        })
    }

    /// Adds a sink reading the given upstream outputs (their schemas may differ).
    pub fn add_sink(
        &mut self,
        name: &str,
        factory: Arc<dyn SinkFactory>,
        parallelism: usize,
        inputs: &[(NodeId, Port)],
    ) -> Result<NodeId> {
        let parallelism = factory
            .max_parallelism()
            .map_or(parallelism, |m| parallelism.min(m.max(1)));
        let edges = self.edges(inputs, parallelism, &[])?;
        self.push(Node {
            name: name.to_string(),
            kind: NodeKind::Sink(factory),
            parallelism,
            inputs: edges,
            watermark: WatermarkSpec::default(),
        })
    }

    /// Replaces the factory of sink `name`, keeping its inputs (tests and
    /// embedders capture a pipeline's output this way).
    pub fn replace_sink(&mut self, name: &str, factory: Arc<dyn SinkFactory>) -> Result<()> {
        let id = self
            .find(name)
            .ok_or_else(|| EngineError::User(format!("no sink named {name:?}")))?;
        if !matches!(self.nodes[id].kind, NodeKind::Sink(_)) {
            return Err(EngineError::User(format!("{name:?} is not a sink")));
        }
        // The new sink may run fewer subtasks (a file sink runs one).
        let parallelism = factory
            .max_parallelism()
            .map_or(self.nodes[id].parallelism, |m| {
                self.nodes[id].parallelism.min(m.max(1))
            });
        let inputs: Vec<(NodeId, Port)> = self.nodes[id]
            .inputs
            .iter()
            .map(|e| (e.from, e.port))
            .collect();
        let edges = self.edges(&inputs, parallelism, &[])?;
        let node = &mut self.nodes[id];
        node.kind = NodeKind::Sink(factory);
        node.parallelism = parallelism;
        node.inputs = edges;
        Ok(())
    }

    /// Replaces the factory of source `name` (tests wrap sources this way;
    /// the schema must stay the same).
    pub fn replace_source(&mut self, name: &str, factory: Arc<dyn SourceFactory>) -> Result<()> {
        let id = self
            .find(name)
            .ok_or_else(|| EngineError::User(format!("no source named {name:?}")))?;
        let node = &mut self.nodes[id];
        if !matches!(node.kind, NodeKind::Source(_)) {
            return Err(EngineError::User(format!("{name:?} is not a source")));
        }
        node.kind = NodeKind::Source(factory);
        Ok(())
    }

    /// Makes input `input` of node `node` read `from` instead, partitioned
    /// as the node needs it (a planner inserting a step in front of it).
    pub fn reroute(&mut self, node: NodeId, input: usize, from: (NodeId, Port)) -> Result<()> {
        let n = self
            .nodes
            .get(node)
            .ok_or_else(|| EngineError::Internal(format!("no node {node}")))?;
        if input >= n.inputs.len() {
            return Err(EngineError::Internal(format!(
                "node {:?} has no input {input}",
                n.name
            )));
        }
        let keys = match &n.kind {
            NodeKind::Operator(f) => f.key_columns(),
            _ => Vec::new(),
        };
        let edge = self.edges(&[from], n.parallelism, &keys)?.remove(0);
        self.nodes[node].inputs[input] = edge;
        Ok(())
    }

    fn edges(
        &self,
        inputs: &[(NodeId, Port)],
        parallelism: usize,
        keys: &[String],
    ) -> Result<Vec<Edge>> {
        inputs
            .iter()
            .map(|&(from, port)| {
                let up = self
                    .nodes
                    .get(from)
                    .ok_or_else(|| EngineError::Internal(format!("no node {from}")))?;
                let schema = up.output_schema(port).ok_or_else(|| {
                    EngineError::User(format!("node {:?} has no output {port}", up.name))
                })?;
                for k in keys {
                    if schema.index_of(k).is_err() {
                        return Err(EngineError::User(format!(
                            "key column {k:?} is not in the output of {:?}",
                            up.name
                        )));
                    }
                }
                let partitioning = if !keys.is_empty() && parallelism > 1 {
                    Partitioning::Hash(keys.to_vec())
                } else if up.parallelism == parallelism {
                    Partitioning::Forward
                } else {
                    Partitioning::RoundRobin
                };
                Ok(Edge {
                    from,
                    port,
                    partitioning,
                })
            })
            .collect()
    }

    /// The nodes and edges, for `vigil explain` and the HTTP API.
    pub fn summary(&self) -> Vec<NodeSummary> {
        self.nodes
            .iter()
            .map(|n| NodeSummary {
                name: n.name.clone(),
                role: n.role(),
                parallelism: n.parallelism,
                description: n.describe(),
                inputs: n
                    .inputs
                    .iter()
                    .map(|e| EdgeSummary {
                        from: self.nodes[e.from].name.clone(),
                        port: match e.port {
                            Port::Main => None,
                            Port::Side(p) => Some(p),
                        },
                        partitioning: match &e.partitioning {
                            Partitioning::Forward => "forward".to_string(),
                            Partitioning::RoundRobin => "round-robin".to_string(),
                            Partitioning::Hash(k) => format!("hash({})", k.join(", ")),
                        },
                    })
                    .collect(),
            })
            .collect()
    }

    /// The operator graph as text, one node a line, for `vigil explain`.
    pub fn explain(&self) -> String {
        let mut out = String::new();
        for n in self.summary() {
            let _ = writeln!(
                out,
                "{:<8} {:<24} x{:<3} {}",
                n.role, n.name, n.parallelism, n.description
            );
            for e in &n.inputs {
                let port = e.port.map(|p| format!(".{p}")).unwrap_or_default();
                let _ = writeln!(
                    out,
                    "{:<8}   <- {}{} [{}]",
                    "", e.from, port, e.partitioning
                );
            }
        }
        out
    }
}

/// One node of a graph, as `vigil explain` and `/v1/pipeline` show it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeSummary {
    /// Node name.
    pub name: String,
    /// `source`, `operator` or `sink`.
    pub role: &'static str,
    /// Subtasks.
    pub parallelism: usize,
    /// What it does, in one line.
    pub description: String,
    /// Its inputs.
    pub inputs: Vec<EdgeSummary>,
}

/// One input of a node.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EdgeSummary {
    /// Upstream node.
    pub from: String,
    /// Upstream side output, if not the main one.
    pub port: Option<&'static str>,
    /// How records are spread over the subtasks.
    pub partitioning: String,
}
