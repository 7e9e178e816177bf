//! A stalled sink stops the sources (bounded memory) and loses nothing once
//! it resumes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::{SchemaRef, UInt64Type};
use async_trait::async_trait;
use parking_lot::Mutex;
use tokio::sync::watch;
use vigil_connectors::generator::{GeneratorConfig, GeneratorSourceFactory, Stream};
use vigil_engine::{
    start, Graph, NodeRole, Port, RuntimeOptions, Sink, SinkFactory, TaskContext, WatermarkSpec,
};
use vigil_operators::filter::{FilterConfig, FilterFactory};

/// A sink that waits while its gate is closed, as a stuck downstream would.
struct GatedSinkFactory {
    open: watch::Receiver<bool>,
    ids: Arc<Mutex<Vec<u64>>>,
    written: Arc<AtomicU64>,
}

struct GatedSink {
    open: watch::Receiver<bool>,
    ids: Arc<Mutex<Vec<u64>>>,
    written: Arc<AtomicU64>,
}

impl SinkFactory for GatedSinkFactory {
    fn create(
        &self,
        _ctx: &TaskContext,
        _schema: SchemaRef,
    ) -> vigil_engine::Result<Box<dyn Sink>> {
        Ok(Box::new(GatedSink {
            open: self.open.clone(),
            ids: self.ids.clone(),
            written: self.written.clone(),
        }))
    }
    fn describe(&self) -> String {
        "gated".into()
    }
}

#[async_trait]
impl Sink for GatedSink {
    async fn write(&mut self, batch: RecordBatch) -> vigil_engine::Result<()> {
        while !*self.open.borrow() {
            if self.open.changed().await.is_err() {
                break;
            }
        }
        self.ids.lock().extend(
            batch
                .column(0)
                .as_primitive::<UInt64Type>()
                .values()
                .iter()
                .copied(),
        );
        self.written
            .fetch_add(batch.num_rows() as u64, Ordering::SeqCst);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_sink_bounds_memory_and_loses_nothing() {
    const BATCH: usize = 1024;
    const EVENTS: u64 = 2_000_000;
    let mut cfg = GeneratorConfig::new(Stream::Network);
    cfg.count = Some(EVENTS);
    cfg.batch_size = BATCH;
    cfg.partitions = 2;
    let source = Arc::new(GeneratorSourceFactory::new(cfg, 0).expect("generator"));
    let mut g = Graph::new();
    let src = g
        .add_source(
            "flows",
            source.clone(),
            2,
            WatermarkSpec {
                out_of_orderness_ms: 2000,
                ..WatermarkSpec::default()
            },
        )
        .expect("source");
    let filter = FilterFactory::new(
        &FilterConfig {
            condition: "bytes >= 0".into(),
        },
        source_schema(&g, src),
    )
    .expect("filter");
    let f = g
        .add_operator("all", Arc::new(filter), 2, &[(src, Port::Main)])
        .expect("filter");
    let (gate, open) = watch::channel(false);
    let ids = Arc::new(Mutex::new(Vec::new()));
    let written = Arc::new(AtomicU64::new(0));
    let sink = GatedSinkFactory {
        open,
        ids: ids.clone(),
        written: written.clone(),
    };
    g.add_sink("stuck", Arc::new(sink), 1, &[(f, Port::Main)])
        .expect("sink");

    let capacity = 4;
    let running = start(
        &g,
        RuntimeOptions {
            channel_capacity: capacity,
            ..RuntimeOptions::default()
        },
    )
    .expect("start");
    let metrics = running.metrics();
    let read = || metrics.totals(NodeRole::Source).records_in;

    tokio::time::sleep(Duration::from_millis(700)).await;
    let stalled_at = read();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        read(),
        stalled_at,
        "sources stop reading while the sink is stuck"
    );
    assert_eq!(written.load(Ordering::SeqCst), 0);
    // In flight: 2 source→filter channels, 2 filter→sink channels, each
    // `capacity` batches, plus one batch held by each of the 5 tasks.
    let bound = ((4 * capacity + 5) * BATCH) as u64;
    assert!(
        stalled_at <= bound,
        "{stalled_at} records in flight, bound {bound}"
    );
    assert!(stalled_at < EVENTS / 10);

    gate.send(true).expect("open the gate");
    tokio::time::timeout(Duration::from_secs(240), running.wait())
        .await
        .expect("drains")
        .expect("runs");
    let mut seen = ids.lock().clone();
    assert_eq!(seen.len() as u64, EVENTS, "every record arrived");
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen.len() as u64, EVENTS, "no record twice");
}

fn source_schema(g: &Graph, id: usize) -> SchemaRef {
    g.nodes()[id].output_schema(Port::Main).expect("schema")
}
