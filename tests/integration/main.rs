//! Integration tests: real pipeline files, real operators, real sources and
//! sinks, run by the real runtime. One test binary (each links DataFusion).

mod avro;
mod backpressure;
mod broker;
mod correlation;
mod demo;
mod incidents;
mod kafka;
mod kube_api;
mod kubernetes;
mod observability;
mod pipeline_errors;
mod recovery;
mod registry;
mod runtime;
mod scale_out;
mod sensor_files;
mod sql;
mod tansu;

use std::collections::HashMap;
use std::sync::Arc;

use tokio::task::JoinSet;
use vigil::pipeline::PlanOptions;
use vigil_engine::{start, Graph, MetricsRegistry, RuntimeOptions, StopHandle};

/// Runs a planned pipeline to its end, without progress output.
pub async fn run_to_end(plan: &vigil::pipeline::Plan) -> vigil::run::Summary {
    vigil::run::run(
        plan,
        vigil::run::RunOptions {
            progress: vigil::run::Progress::Off,
            ..vigil::run::RunOptions::default()
        },
    )
    .await
    .expect("runs")
}

/// A loopback port nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Plan options with a fixed environment instead of the process's.
pub fn options_with(env: &[(&str, &str)]) -> PlanOptions {
    let map: HashMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    PlanOptions {
        env: Arc::new(move |k: &str| map.get(k).cloned()),
        dead_letter_dir: std::env::temp_dir(),
        ..PlanOptions::default()
    }
}

/// A pipeline running in the background of a test.
pub struct Launched {
    /// Its counters.
    pub metrics: Arc<MetricsRegistry>,
    stop: StopHandle,
    task: JoinSet<vigil_engine::Result<()>>,
}

/// Logs of the pipelines under test, shown for a failing test when
/// `RUST_LOG` is set (e.g. `RUST_LOG=vigil_connectors=debug`).
fn init_logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_default_env() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_test_writer()
                .try_init();
        }
    });
}

/// Starts `graph` in the background.
pub fn launch(graph: &Graph, options: RuntimeOptions) -> Launched {
    init_logs();
    let running = start(graph, options).expect("start");
    let (stop, metrics) = (running.stop_handle(), running.metrics());
    let mut task = JoinSet::new();
    task.spawn(running.wait());
    Launched {
        metrics,
        stop,
        task,
    }
}

impl Launched {
    /// Stops the pipeline and checks that it stopped cleanly.
    pub async fn finish(mut self) {
        self.stop.stop();
        self.task
            .join_next()
            .await
            .expect("the pipeline task")
            .expect("join")
            .expect("stopped cleanly");
    }
}
