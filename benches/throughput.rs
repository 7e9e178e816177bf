//! Throughput benchmark: generator → filter → null sink on one core.
//!
//! Runs the real runtime on a single-threaded tokio runtime (one core), with
//! the generator flat out, and reports the median events/s over several runs.
//! Run with `cargo bench --bench throughput` (add `-- --events N --runs R`).
//!
//! Three shapes separate the costs: the generator alone, generator + filter on
//! a dictionary column (the common `outcome = 'failure'` case), and generator +
//! filter + a computed projection.

mod support;

use std::sync::Arc;
use std::time::Instant;

use support::{arg, spread};

use vigil_connectors::generator::{GeneratorConfig, GeneratorSourceFactory, Stream};
use vigil_connectors::null::NullSinkFactory;
use vigil_engine::{start, Graph, OperatorFactory, Port, RuntimeOptions, WatermarkSpec};
use vigil_operators::filter::{FilterConfig, FilterFactory};
use vigil_operators::project::{ProjectConfig, ProjectFactory};

#[derive(Clone, Copy)]
enum Shape {
    GeneratorOnly,
    Filter,
    FilterProject,
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::GeneratorOnly => "generator -> null",
            Shape::Filter => "generator -> filter -> null",
            Shape::FilterProject => "generator -> filter -> project -> null",
        }
    }
}

fn graph(shape: Shape, events: u64) -> Graph {
    let mut cfg = GeneratorConfig::new(Stream::Auth);
    cfg.count = Some(events);
    cfg.partitions = 1;
    cfg.batch_size = 8192;
    let source = Arc::new(GeneratorSourceFactory::new(cfg, 0).expect("generator"));
    let schema = vigil_engine::SourceFactory::output_schema(source.as_ref());
    let mut g = Graph::new();
    let mut last = g
        .add_source(
            "auth",
            source,
            1,
            WatermarkSpec {
                out_of_orderness_ms: 2000,
                ..WatermarkSpec::default()
            },
        )
        .expect("source");
    if matches!(shape, Shape::Filter | Shape::FilterProject) {
        let f = FilterFactory::new(
            &FilterConfig {
                condition: "outcome = 'failure'".into(),
            },
            schema.clone(),
        )
        .expect("filter");
        last = g
            .add_operator("failed", Arc::new(f), 1, &[(last, Port::Main)])
            .expect("filter");
    }
    if matches!(shape, Shape::FilterProject) {
        let mut columns = indexmap::IndexMap::new();
        columns.insert("tenant_id".to_string(), "tenant_id".to_string());
        columns.insert("user".to_string(), "user".to_string());
        columns.insert("minute".to_string(), "date_trunc('minute', ts)".to_string());
        let p = ProjectFactory::new(
            &ProjectConfig {
                columns,
                keep_input: false,
            },
            schema,
        )
        .expect("project");
        let _ = p.output_schema();
        last = g
            .add_operator("shape", Arc::new(p), 1, &[(last, Port::Main)])
            .expect("project");
    }
    g.add_sink("null", Arc::new(NullSinkFactory), 1, &[(last, Port::Main)])
        .expect("sink");
    g
}

#[allow(clippy::disallowed_methods)] // a benchmark measures wall time
/// One run: events/s, and the rows that reached the sink (a check that the
/// filter really ran).
fn run_once(shape: Shape, events: u64) -> (f64, u64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let g = graph(shape, events);
    let started = Instant::now();
    let sunk = rt.block_on(async {
        let running = start(&g, RuntimeOptions::default()).expect("start");
        let metrics = running.metrics();
        running.wait().await.expect("run");
        metrics.node_totals("null").records_in
    });
    (events as f64 / started.elapsed().as_secs_f64(), sunk)
}

fn main() {
    let events = arg("--events", 20_000_000);
    let runs = arg("--runs", 5) as usize;
    println!("vigil throughput, one core (current-thread runtime), {events} events per run, median of {runs} runs");
    for shape in [Shape::GeneratorOnly, Shape::Filter, Shape::FilterProject] {
        run_once(shape, events / 10); // warm-up
        let results: Vec<(f64, u64)> = (0..runs).map(|_| run_once(shape, events)).collect();
        let sunk = results[0].1;
        let (median, min, max) = spread(results.into_iter().map(|r| r.0).collect());
        println!(
            "{:<42} median {:>7.2} M events/s   (min {:.2}, max {:.2}; {:.1}% of rows reach the sink)",
            shape.name(),
            median / 1e6,
            min / 1e6,
            max / 1e6,
            100.0 * sunk as f64 / events as f64
        );
    }
}
