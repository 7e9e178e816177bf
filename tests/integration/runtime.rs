//! The runtime gives the same results at every parallelism, and checkpoints
//! are consistent cuts.

use std::collections::BTreeSet;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::util::pretty::pretty_format_batches;
use vigil::pipeline::load_str;
use vigil_engine::{start, RuntimeOptions};

use crate::options_with;

fn pipeline(parallelism: usize) -> String {
    format!(
        "\
name: par
parallelism: {parallelism}
sources:
  auth:
    type: generator
    stream: auth
    count: 200000
    partitions: 6
    event_rate: 2000
    users: 600
    failure_rate: 0.3
    batch_size: 512
    start_time: 2026-01-01T00:00:00Z
    attacks:
      - {{ kind: brute_force, at: 10s, every: 20s }}
transforms:
  failed:
    type: filter
    input: auth
    where: \"outcome = 'failure'\"
  counts:
    type: threshold
    input: failed
    key: [tenant_id, src_ip, user]
    window: 10s
    min_count: 3
sinks:
  out:
    type: stdout
    input: counts
"
    )
}

fn sorted_rows(batches: &[RecordBatch]) -> Vec<String> {
    let table = pretty_format_batches(batches).expect("format").to_string();
    let mut rows: Vec<String> = table
        .lines()
        .filter(|l| l.starts_with("| ") && !l.contains("rule"))
        .map(String::from)
        .collect();
    rows.sort();
    rows
}

async fn run_at(parallelism: usize) -> Vec<String> {
    let mut plan = load_str("par.yaml", &pipeline(parallelism), &options_with(&[])).expect("valid");
    let out = plan.capture("out").expect("sink");
    let running = start(&plan.graph, RuntimeOptions::default()).expect("start");
    running.wait().await.expect("run");
    let batches = out.lock().clone();
    sorted_rows(&batches)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_results_do_not_depend_on_parallelism() {
    let one = run_at(1).await;
    assert!(
        one.len() > 50,
        "the workload produces alerts: {}",
        one.len()
    );
    assert_eq!(one, run_at(3).await);
    assert_eq!(one, run_at(2).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_is_acknowledged_by_every_subtask_and_restores_to_the_same_output() {
    // Slow the source so the checkpoint lands mid-stream.
    let text = pipeline(2).replace(
        "    batch_size: 512\n",
        "    batch_size: 512\n    rate: 100000\n",
    );
    let mut plan = load_str("par.yaml", &text, &options_with(&[])).expect("valid");
    let out = plan.capture("out").expect("sink");
    let running = start(&plan.graph, RuntimeOptions::default()).expect("start");
    let checkpoints = running.checkpoints();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let id = checkpoints.trigger().expect("trigger");
    let done = tokio::time::timeout(std::time::Duration::from_secs(30), checkpoints.wait_for(id))
        .await
        .expect("checkpoint completes");
    running.wait().await.expect("run");
    let tasks: usize = plan.graph.nodes().iter().map(|n| n.parallelism).sum();
    assert_eq!(done.states.len(), tasks, "every subtask acknowledged");
    let before_cut = {
        let all = out.lock().clone();
        sorted_rows(&all)
    };

    // Restore: run again from the checkpoint; output before the cut plus
    // output after it equals the whole.
    let mut plan2 = load_str("par.yaml", &text, &options_with(&[])).expect("valid");
    let out2 = plan2.capture("out").expect("sink");
    let restored = start(
        &plan2.graph,
        RuntimeOptions {
            restore: Some(Arc::clone(&done)),
            ..RuntimeOptions::default()
        },
    )
    .expect("start restored");
    restored.wait().await.expect("run restored");
    let after: BTreeSet<String> = sorted_rows(&out2.lock().clone()).into_iter().collect();
    let whole: BTreeSet<String> = before_cut.iter().cloned().collect();
    assert!(!after.is_empty());
    assert!(
        after.is_subset(&whole),
        "a restored run reproduces the alerts after the cut"
    );
}

mod idleness {
    use std::sync::Arc;
    use std::time::Duration;

    use arrow::array::{ArrayRef, RecordBatch, StringArray, TimestampMillisecondArray};
    use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
    use async_trait::async_trait;
    use vigil_connectors::memory::MemorySinkFactory;
    use vigil_engine::{
        Graph, ManualClock, Port, RuntimeOptions, Source, SourceEvent, SourceFactory, TaskContext,
        WatermarkSpec,
    };
    use vigil_operators::threshold::{ThresholdConfig, ThresholdFactory};

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new(
                "ts",
                DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
                false,
            ),
            Field::new("k", DataType::Utf8, false),
        ]))
    }

    /// `source` → a 10 s window per key that emits every window with a
    /// record → a memory sink, and what the sink collects.
    fn windows_of(
        name: &str,
        source: Arc<dyn SourceFactory>,
        watermark: WatermarkSpec,
    ) -> (Graph, vigil_connectors::memory::Collected) {
        let mut g = Graph::new();
        let src = g.add_source(name, source, 1, watermark).expect("source");
        let cfg = ThresholdConfig {
            key: vec!["k".into()],
            window: Duration::from_secs(10),
            min_count: Some(1),
            distinct: None,
            min_distinct: None,
            time: None,
            rule: None,
        };
        let t = ThresholdFactory::new("w", &cfg, schema(), Some("ts")).expect("threshold");
        let w = g
            .add_operator("w", Arc::new(t), 1, &[(src, Port::Main)])
            .expect("operator");
        let (sink, out) = MemorySinkFactory::new();
        g.add_sink("out", Arc::new(sink), 1, &[(w, Port::Main)])
            .expect("sink");
        (g, out)
    }

    /// Two partitions: partition 0 sends one event a second of event time on
    /// every poll; partition 1 never sends anything, like a quiet Kafka
    /// partition.
    struct OneQuietPartition;

    struct Talker {
        next_ts: i64,
    }

    impl SourceFactory for OneQuietPartition {
        fn output_schema(&self) -> SchemaRef {
            schema()
        }
        fn event_time_column(&self) -> usize {
            0
        }
        fn create(&self, _ctx: &TaskContext) -> vigil_engine::Result<Box<dyn Source>> {
            Ok(Box::new(Talker { next_ts: 0 }))
        }
        fn describe(&self) -> String {
            "one quiet partition".into()
        }
    }

    #[async_trait]
    impl Source for Talker {
        fn partitions(&self) -> usize {
            2
        }
        async fn next(&mut self) -> vigil_engine::Result<SourceEvent> {
            tokio::time::sleep(Duration::from_millis(2)).await;
            let ts = self.next_ts;
            self.next_ts += 1_000;
            let cols: Vec<ArrayRef> = vec![
                Arc::new(TimestampMillisecondArray::from(vec![ts]).with_timezone("UTC")),
                Arc::new(StringArray::from(vec!["k"])),
            ];
            Ok(SourceEvent::Data {
                partition: 0,
                batch: RecordBatch::try_new(schema(), cols)?,
            })
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_quiet_partition_holds_windows_until_its_idle_timeout_then_not() {
        let clock = ManualClock::new(1_000_000);
        let (g, out) = windows_of(
            "talker",
            Arc::new(OneQuietPartition),
            WatermarkSpec {
                out_of_orderness_ms: 0,
                idle_timeout_ms: 5_000,
            },
        );
        let launched = crate::launch(
            &g,
            RuntimeOptions {
                clock: clock.clone(),
                ..RuntimeOptions::default()
            },
        );
        let metrics = launched.metrics.clone();

        while metrics.node_totals("talker").records_in < 50 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            out.lock().is_empty(),
            "partition 1 has not spoken and is not idle yet: nothing"
        );

        clock.advance(5_000); // partition 0 keeps talking; partition 1 is now idle
        let mut waited = 0;
        while out.lock().is_empty() && waited < 200 {
            tokio::time::sleep(Duration::from_millis(10)).await;
            waited += 1;
        }
        let closed: usize = out.lock().iter().map(|b| b.num_rows()).sum();
        assert!(
            closed >= 5,
            "windows closed on partition 0's watermark alone: {closed}"
        );
        launched.finish().await;
    }

    /// One partition whose records run ahead while its announced watermark
    /// stays where the test puts it, like a repartition topic's partition
    /// whose slowest writer is behind.
    struct Announcing(Arc<std::sync::atomic::AtomicI64>);

    struct Announcer {
        next_ts: i64,
        announced: Arc<std::sync::atomic::AtomicI64>,
        data_next: bool,
    }

    impl SourceFactory for Announcing {
        fn output_schema(&self) -> SchemaRef {
            schema()
        }
        fn event_time_column(&self) -> usize {
            0
        }
        fn create(&self, _ctx: &TaskContext) -> vigil_engine::Result<Box<dyn Source>> {
            Ok(Box::new(Announcer {
                next_ts: 0,
                announced: self.0.clone(),
                data_next: true,
            }))
        }
        fn describe(&self) -> String {
            "announcing".into()
        }
    }

    #[async_trait]
    impl Source for Announcer {
        fn partitions(&self) -> usize {
            1
        }
        async fn next(&mut self) -> vigil_engine::Result<SourceEvent> {
            tokio::time::sleep(Duration::from_millis(2)).await;
            self.data_next = !self.data_next;
            if !self.data_next {
                let ts = self.next_ts;
                self.next_ts += 1_000;
                let cols: Vec<ArrayRef> = vec![
                    Arc::new(TimestampMillisecondArray::from(vec![ts]).with_timezone("UTC")),
                    Arc::new(StringArray::from(vec!["k"])),
                ];
                return Ok(SourceEvent::Data {
                    partition: 0,
                    batch: RecordBatch::try_new(schema(), cols)?,
                });
            }
            Ok(SourceEvent::Watermark {
                partition: 0,
                watermark: self.announced.load(std::sync::atomic::Ordering::Relaxed),
            })
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_announced_watermark_holds_windows_whatever_the_records_say() {
        let announced = Arc::new(std::sync::atomic::AtomicI64::new(0));
        let (g, out) = windows_of(
            "announcing",
            Arc::new(Announcing(announced.clone())),
            WatermarkSpec::default(),
        );
        let launched = crate::launch(&g, RuntimeOptions::default());
        let metrics = launched.metrics.clone();
        while metrics.node_totals("announcing").records_in < 50 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // 50 s of records, but the partition is announced at 0: no window
        // has closed.
        assert!(
            out.lock().is_empty(),
            "a window closed ahead of the announced watermark"
        );
        announced.store(30_000, std::sync::atomic::Ordering::Relaxed);
        let closed = || out.lock().iter().map(|b| b.num_rows()).sum::<usize>();
        let mut waited = 0;
        while closed() < 3 && waited < 300 {
            tokio::time::sleep(Duration::from_millis(10)).await;
            waited += 1;
        }
        // More records keep coming; give a wrongly closing window time to show.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let closed = closed();
        // Windows [0,10), [10,20) and [20,30) close at 30 s, and no later one.
        assert_eq!(closed, 3, "windows closed at the announced 30 s");
        launched.finish().await;
    }
}
