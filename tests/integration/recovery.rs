//! Checkpoints and recovery: the same pipeline run three ways gives the same
//! committed output.
//!
//! 1. **straight**: parallelism 1, no checkpoints;
//! 2. **checkpointed**: parallelism 2, a checkpoint every few milliseconds
//!    while the data flows (barriers interleaved with every kind of state);
//! 3. **restored**: parallelism 2 until the sources have handed out part of
//!    their input, a checkpoint, more input that no checkpoint covers, then
//!    a crash (every task aborted); then a restart at parallelism 3 from the
//!    stored checkpoint, which redistributes keyed state by key group.
//!
//! Output goes through the real file sink, so what is compared is what a
//! reader of the output files sees: committed records only. The windowed,
//! join, sequence and incident tests call [`three_modes`] with their
//! pipelines; this module also tests the checkpoint store on its own.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use tokio::task::JoinSet;
use vigil::pipeline::{load_str, Plan};

use crate::free_port;
use vigil_connectors::file::{FileSinkConfig, FileSinkFactory};
use vigil_engine::graph::NodeKind;
use vigil_engine::{
    start, CheckpointStore, OperatorState, RuntimeOptions, Source, SourceEvent, SourceFactory,
    TaskContext,
};

use crate::options_with;

/// Batches handed out by every gated source of one run, and how many they
/// may hand out before they pause.
#[derive(Debug, Default)]
struct Gate {
    handed: AtomicUsize,
    limit: AtomicUsize,
}

struct GatedFactory {
    inner: Arc<dyn SourceFactory>,
    gate: Arc<Gate>,
}

impl SourceFactory for GatedFactory {
    fn output_schema(&self) -> SchemaRef {
        self.inner.output_schema()
    }
    fn event_time_column(&self) -> usize {
        self.inner.event_time_column()
    }
    fn create(&self, ctx: &TaskContext) -> vigil_engine::Result<Box<dyn Source>> {
        Ok(Box::new(Gated {
            inner: self.inner.create(ctx)?,
            gate: self.gate.clone(),
        }))
    }
    fn side_outputs(&self) -> Vec<(&'static str, SchemaRef)> {
        self.inner.side_outputs()
    }
    fn max_parallelism(&self) -> Option<usize> {
        self.inner.max_parallelism()
    }
    fn describe(&self) -> String {
        format!("gated {}", self.inner.describe())
    }
}

/// A source that pauses once the run has handed out `limit` batches.
struct Gated {
    inner: Box<dyn Source>,
    gate: Arc<Gate>,
}

#[async_trait]
impl Source for Gated {
    fn partitions(&self) -> usize {
        self.inner.partitions()
    }
    async fn next(&mut self) -> vigil_engine::Result<SourceEvent> {
        if self.gate.handed.load(Ordering::SeqCst) >= self.gate.limit.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(5)).await;
            return Ok(SourceEvent::Pending);
        }
        let e = self.inner.next().await?;
        if matches!(e, SourceEvent::Data { .. }) {
            self.gate.handed.fetch_add(1, Ordering::SeqCst);
        }
        Ok(e)
    }
    fn snapshot(&mut self, c: vigil_engine::CheckpointId) -> vigil_engine::Result<OperatorState> {
        self.inner.snapshot(c)
    }
    fn on_checkpoint_complete(
        &mut self,
        c: vigil_engine::CheckpointId,
    ) -> vigil_engine::Result<()> {
        self.inner.on_checkpoint_complete(c)
    }
    fn restore(&mut self, state: OperatorState) -> vigil_engine::Result<()> {
        self.inner.restore(state)
    }
}

/// Plans `yaml` and sends each of `sinks` to a file `<dir>/<sink>.ndjson`.
fn plan(yaml: &str, sinks: &[&str], dir: &std::path::Path) -> Plan {
    let mut plan = load_str("recovery.yaml", yaml, &options_with(&[]))
        .unwrap_or_else(|e| panic!("valid pipeline: {e}"));
    for s in sinks {
        let config = FileSinkConfig {
            path: dir.join(format!("{s}.ndjson")),
            append: false,
        };
        plan.graph
            .replace_sink(s, Arc::new(FileSinkFactory::new(&config)))
            .expect("sink");
    }
    plan
}

fn gate(plan: &mut Plan, limit: usize) -> Arc<Gate> {
    let gate = Arc::new(Gate {
        handed: AtomicUsize::new(0),
        limit: AtomicUsize::new(limit),
    });
    let sources: Vec<(String, Arc<dyn SourceFactory>)> = plan
        .graph
        .nodes()
        .iter()
        .filter_map(|n| match &n.kind {
            NodeKind::Source(f) => Some((n.name.clone(), f.clone())),
            _ => None,
        })
        .collect();
    for (name, inner) in sources {
        let wrapped = Arc::new(GatedFactory {
            inner,
            gate: gate.clone(),
        });
        plan.graph.replace_source(&name, wrapped).expect("gate");
    }
    gate
}

/// The committed output of each sink, as sorted lines.
fn output(sinks: &[&str], dir: &std::path::Path) -> Vec<Vec<String>> {
    sinks
        .iter()
        .map(|s| {
            let text = std::fs::read_to_string(dir.join(format!("{s}.ndjson"))).unwrap_or_default();
            let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
            lines.sort();
            lines
        })
        .collect()
}

async fn run(plan: &Plan, options: RuntimeOptions) {
    let running = start(&plan.graph, options).expect("start");
    tokio::time::timeout(Duration::from_secs(120), running.wait())
        .await
        .expect("the pipeline ends in time")
        .expect("the pipeline runs");
}

/// Runs `plan` with gated sources until they have handed out `batches`
/// batches, takes a checkpoint into `store` (a savepoint when named), lets
/// as many batches again through that no checkpoint covers, and crashes the
/// pipeline (every task aborted). Returns the checkpoint's id.
async fn crash_after_checkpoint(
    mut plan: Plan,
    store: &CheckpointStore,
    batches: usize,
    savepoint: Option<&str>,
) -> u64 {
    let gate = gate(&mut plan, batches);
    let running = start(
        &plan.graph,
        RuntimeOptions {
            store: Some(store.clone()),
            ..RuntimeOptions::default()
        },
    )
    .expect("start");
    let handle = running.checkpoints();
    let mut tasks = JoinSet::new();
    tasks.spawn(running.wait());
    tokio::time::timeout(Duration::from_secs(60), async {
        while gate.handed.load(Ordering::SeqCst) < batches {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the sources hand out their first batches");
    let id = match savepoint {
        Some(name) => handle.savepoint(name).expect("savepoint"),
        None => handle.trigger().expect("trigger"),
    };
    tokio::time::timeout(Duration::from_secs(60), handle.wait_for(id))
        .await
        .expect("the checkpoint is stored");
    // More input that no checkpoint covers, then the crash.
    gate.limit.store(2 * batches, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(50)).await;
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    id
}

/// Runs the pipeline `yaml(parallelism)` straight, checkpointed at
/// parallelism 2, and crashed and restored at parallelism 3; asserts that
/// the committed outputs of `sinks` are the same, and returns them (one
/// sorted list of lines per sink), so a test can check them further.
pub async fn three_modes(yaml: impl Fn(usize) -> String, sinks: &[&str]) -> Vec<Vec<String>> {
    crate::init_logs();
    // 1. Straight through.
    let straight_dir = tempfile::tempdir().expect("tempdir");
    run(
        &plan(&yaml(1), sinks, straight_dir.path()),
        RuntimeOptions::default(),
    )
    .await;
    let straight = output(sinks, straight_dir.path());
    assert!(
        straight.iter().any(|s| !s.is_empty()),
        "the pipeline has output to compare"
    );

    // 2. Checkpoints while the data flows, at parallelism 2.
    let dir = tempfile::tempdir().expect("tempdir");
    let store_dir = tempfile::tempdir().expect("tempdir");
    let store = CheckpointStore::open(&store_dir.path().display().to_string(), 2).expect("store");
    let p2 = plan(&yaml(2), sinks, dir.path());
    let running = start(
        &p2.graph,
        RuntimeOptions {
            checkpoint_interval: Some(Duration::from_millis(3)),
            store: Some(store.clone()),
            ..RuntimeOptions::default()
        },
    )
    .expect("start");
    let handle = running.checkpoints();
    tokio::time::timeout(Duration::from_secs(120), running.wait())
        .await
        .expect("in time")
        .expect("runs");
    assert!(handle.stats().completed >= 1, "checkpoints were taken");
    assert_eq!(
        output(sinks, dir.path()),
        straight,
        "checkpointed at parallelism 2"
    );

    // 3. A crash after a checkpoint, then a restore at parallelism 3.
    let dir = tempfile::tempdir().expect("tempdir");
    let store_dir = tempfile::tempdir().expect("tempdir");
    let store = CheckpointStore::open(&store_dir.path().display().to_string(), 2).expect("store");
    let first = plan(&yaml(2), sinks, dir.path());
    let id = crash_after_checkpoint(first, &store, 3, None).await;
    let restored = store.latest().await.expect("read").expect("a checkpoint");
    assert_eq!(restored.id, id);
    assert!(
        restored.parallelism.values().any(|&p| p == 2),
        "taken at parallelism 2"
    );
    let second = plan(&yaml(3), sinks, dir.path());
    run(
        &second,
        RuntimeOptions {
            restore: Some(Arc::new(restored)),
            store: Some(store),
            ..RuntimeOptions::default()
        },
    )
    .await;
    let got = output(sinks, dir.path());
    for (g, s) in got.iter().zip(&straight) {
        let missing: Vec<&String> = s.iter().filter(|l| !g.contains(l)).take(3).collect();
        let extra: Vec<&String> = g.iter().filter(|l| !s.contains(l)).take(3).collect();
        assert!(
            missing.is_empty() && extra.is_empty() && g.len() == s.len(),
            "crashed at parallelism 2, restored at parallelism 3: {} lines, not {}; missing {missing:?}, extra {extra:?}",
            g.len(),
            s.len()
        );
    }
    straight
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_without_its_manifest_is_not_one_and_old_ones_are_pruned() {
    use vigil_engine::CompletedCheckpoint;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = CheckpointStore::open(&dir.path().display().to_string(), 2).expect("store");
    assert!(store.latest().await.expect("list").is_none());
    let batch = arrow::record_batch::RecordBatch::try_new(
        Arc::new(arrow::datatypes::Schema::new(vec![
            arrow::datatypes::Field::new("n", arrow::datatypes::DataType::Int64, false),
        ])),
        vec![Arc::new(arrow::array::Int64Array::from(vec![1, 2, 3]))],
    )
    .expect("batch");
    let checkpoint = |id| {
        let mut c = CompletedCheckpoint {
            id,
            ..CompletedCheckpoint::default()
        };
        c.parallelism.insert("w".into(), 1);
        c.states.insert(
            ("w".into(), 0),
            OperatorState {
                batches: vec![batch.clone()],
            },
        );
        c
    };
    for id in 1..=3 {
        store.write(&checkpoint(id)).await.expect("write");
    }
    let ids: Vec<u64> = store
        .list()
        .await
        .expect("list")
        .iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(ids, vec![2, 3], "the newest two are kept");
    // A crash half-way through checkpoint 4: its files, no manifest.
    store.write(&checkpoint(4)).await.expect("write");
    let manifest = dir
        .path()
        .join("checkpoints/chk-00000000000000000004/_manifest.json");
    std::fs::remove_file(&manifest).expect("remove the manifest");
    let latest = store.latest().await.expect("read").expect("one");
    assert_eq!(
        latest.id, 3,
        "a checkpoint without a manifest does not count"
    );
    assert_eq!(
        latest.state("w", 0).expect("state").batches,
        vec![batch.clone()]
    );
    // The next one prunes the leftover.
    store.write(&checkpoint(5)).await.expect("write");
    assert!(!dir
        .path()
        .join("checkpoints/chk-00000000000000000004")
        .exists());
    let ids: Vec<u64> = store
        .list()
        .await
        .expect("list")
        .iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(ids, vec![3, 5]);
    // A savepoint stays when checkpoints are cleared.
    let mut sp = checkpoint(6);
    sp.savepoint = Some("before-upgrade".into());
    store.write(&sp).await.expect("write");
    store.clear().await.expect("clear");
    assert!(store.latest().await.expect("read").is_none());
    assert_eq!(
        store
            .savepoint("before-upgrade")
            .await
            .expect("savepoint")
            .id,
        6
    );
    let e = store
        .savepoint("nope")
        .await
        .expect_err("no such savepoint");
    assert!(e.to_string().contains("no savepoint \"nope\""), "{e}");
}

/// Detections (a threshold window, Sigma value counts, EQL sequences) feeding
/// event-sourced incidents and their read models, as the shipped incidents
/// pipeline has them, on generated logins with the attacks injected.
fn detections(parallelism: usize) -> String {
    format!(
        r#"
name: detections
parallelism: {parallelism}
sources:
  auth:
    type: generator
    stream: auth
    seed: 11
    partitions: 4
    event_rate: 2000
    count: 600000
    start_time: 2026-01-01T00:00:00Z
    out_of_orderness: 2s
    attacks:
      - {{ kind: brute_force, at: 30s, every: 3m }}
      - {{ kind: password_spray, at: 70s }}
      - {{ kind: account_takeover, at: 2m }}
    watermark: {{ out_of_orderness: 2s, idle_timeout: 30s }}
transforms:
  failed_logins: {{ type: filter, input: auth, where: "outcome = 'failure'" }}
  logins: {{ type: filter, input: auth, where: "outcome = 'success'" }}
  brute_force:
    type: threshold
    input: failed_logins
    key: [tenant_id, src_ip, user]
    window: 1m
    min_count: 20
  password_spray:
    type: correlate
    correlation: value_count
    rules: [failed_logins]
    group-by: [src_ip]
    timespan: 2m
    condition: {{ field: user, gte: 10 }}
  sprayed_login:
    type: correlate
    correlation: temporal_ordered
    rules: [password_spray, logins]
    group-by: [src_ip]
    timespan: 10m
    fields: {{ logins: [user, host] }}
  lateral_movement:
    type: correlate
    correlation: value_count
    rules: [logins]
    group-by: [user]
    timespan: 5m
    condition: {{ field: host, gte: 5 }}
  account_takeover:
    type: correlate
    correlation: temporal_ordered
    rules: [sprayed_login, lateral_movement]
    group-by: [user]
    aliases:
      user: {{ sprayed_login: logins_user }}
    timespan: 30m
  incidents:
    type: incidents
    alerts:
      - input: brute_force
        id: "concat(rule, ':', user, ':', src_ip, ':', CAST(window_end AS VARCHAR))"
        detection: rule
        severity: "'high'"
        entity_type: "'user'"
        entity_id: user
      - input: password_spray
        id: id
        detection: rule
        severity: "'medium'"
        entity_type: "'ip'"
        entity_id: src_ip
      - input: account_takeover
        id: id
        detection: rule
        severity: "'critical'"
        entity_type: "'user'"
        entity_id: user
    window: 30m
    escalate:
      - {{ alerts: 3, severity: high }}
sinks:
  brute_force_alerts: {{ type: stdout, input: brute_force }}
  spray_alerts: {{ type: stdout, input: password_spray }}
  takeover_alerts: {{ type: stdout, input: account_takeover }}
  incident_events: {{ type: stdout, input: incidents }}
  incident_summary: {{ type: stdout, input: incidents.summary }}
  entity_risk: {{ type: stdout, input: incidents.entity_risk }}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detections_and_incidents_give_the_same_output_in_three_modes() {
    let sinks = [
        "brute_force_alerts",
        "spray_alerts",
        "takeover_alerts",
        "incident_events",
        "incident_summary",
        "entity_risk",
    ];
    let out = three_modes(detections, &sinks).await;
    for (name, lines) in sinks.iter().zip(&out) {
        // The takeover chain is compared in all three modes but may be
        // empty: its last stage needs lateral movement the input may not hold.
        assert!(
            !lines.is_empty() || *name == "takeover_alerts",
            "{name} has output"
        );
    }
}

/// The crash test's pipeline: generated logins paced at 40k a second (about
/// six seconds of wall time), a threshold window and a correlation into
/// files, and incidents into a file and a read model.
fn crash_pipeline(out: &std::path::Path) -> String {
    format!(
        r#"
name: crash
parallelism: 2
sources:
  auth:
    type: generator
    stream: auth
    seed: 7
    partitions: 4
    rate: 40000
    event_rate: 2000
    count: 240000
    start_time: 2026-01-01T00:00:00Z
    out_of_orderness: 2s
    attacks:
      - {{ kind: brute_force, at: 20s, every: 20s }}
      - {{ kind: password_spray, at: 50s }}
    watermark: {{ out_of_orderness: 2s, idle_timeout: 30s }}
transforms:
  failed_logins: {{ type: filter, input: auth, where: "outcome = 'failure'" }}
  brute_force:
    type: threshold
    input: failed_logins
    key: [tenant_id, src_ip, user]
    window: 1m
    min_count: 20
  password_spray:
    type: correlate
    correlation: value_count
    rules: [failed_logins]
    group-by: [src_ip]
    timespan: 2m
    condition: {{ field: user, gte: 10 }}
  incidents:
    type: incidents
    alerts:
      - input: brute_force
        id: "concat(rule, ':', user, ':', src_ip, ':', CAST(window_end AS VARCHAR))"
        detection: rule
        severity: "'high'"
        entity_type: "'user'"
        entity_id: user
      - input: password_spray
        id: id
        detection: rule
        severity: "'medium'"
        entity_type: "'ip'"
        entity_id: src_ip
sinks:
  alerts: {{ type: file, input: brute_force, path: {out}/alerts.ndjson }}
  sprays: {{ type: file, input: password_spray, path: {out}/sprays.ndjson }}
  events: {{ type: file, input: incidents, path: {out}/events.ndjson }}
  incident_summary: {{ type: read_model, input: incidents.summary, key: incident_id }}
"#,
        out = out.display()
    )
}

/// The highest id of a complete checkpoint in the crash test's store.
fn stored_checkpoints(dir: &std::path::Path) -> u64 {
    let root = dir.join("checkpoints/crash/checkpoints");
    std::fs::read_dir(root)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.path().join("_manifest.json").exists())
                .filter_map(|e| e.file_name().to_str()?.strip_prefix("chk-")?.parse().ok())
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(0)
}

/// A `vigil run` of the crash pipeline, killed on drop.
struct Vigil(std::process::Child);

impl Drop for Vigil {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_vigil(dir: &std::path::Path, port: u16) -> Vigil {
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_vigil"))
        .arg("run")
        .arg(dir.join("crash.yaml"))
        .arg("--checkpoints")
        .arg(dir.join("checkpoints"))
        .args(["--checkpoint-interval", "200ms", "--progress", "off"])
        .args(["--http", &format!("127.0.0.1:{port}"), "--keep-serving"])
        .arg("--dead-letter-dir")
        .arg(dir)
        .stdout(std::process::Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join("vigil.log"))
                .map_or(std::process::Stdio::null(), std::process::Stdio::from),
        )
        .spawn()
        .expect("start vigil");
    Vigil(child)
}

/// Waits until the run behind `port` has ended its input, then returns
/// every tenant's incident summaries and the committed output files.
async fn finished_output(dir: &std::path::Path, port: u16) -> (Vec<Vec<String>>, Vec<String>) {
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            if tokio::net::TcpStream::connect(addr).await.is_err() {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            let (status, body) = crate::incidents::get(addr, "/v1/checkpoints", None).await;
            if status == 200 && body.contains("\"running\":false") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the run ends its input");
    let mut models = Vec::new();
    for t in crate::incidents::TENANTS {
        let (status, body) =
            crate::incidents::get(addr, "/v1/read-models/incident_summary?limit=1000", Some(t))
                .await;
        assert_eq!(status, 200, "{body}");
        models.push(body);
    }
    (output(&["alerts", "sprays", "events"], dir), models)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_killed_with_sigkill_again_and_again_commits_what_an_uninterrupted_run_does() {
    let reference_dir = tempfile::tempdir().expect("tempdir");
    let dir = tempfile::tempdir().expect("tempdir");
    for d in [reference_dir.path(), dir.path()] {
        std::fs::write(d.join("crash.yaml"), crash_pipeline(d)).expect("write the pipeline");
    }
    let port = free_port();
    let reference = {
        let _run = spawn_vigil(reference_dir.path(), port);
        // `vigil savepoint` against the running process.
        tokio::time::timeout(Duration::from_secs(60), async {
            while stored_checkpoints(reference_dir.path()) == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("a checkpoint is stored");
        let saved = std::process::Command::new(env!("CARGO_BIN_EXE_vigil"))
            .args([
                "savepoint",
                "mid-run",
                "--http",
                &format!("127.0.0.1:{port}"),
            ])
            .output()
            .expect("run vigil savepoint");
        let answer = String::from_utf8_lossy(&saved.stdout);
        assert!(
            saved.status.success() && answer.contains("\"savepoint\":\"mid-run\""),
            "{answer} {}",
            String::from_utf8_lossy(&saved.stderr)
        );
        assert!(reference_dir
            .path()
            .join("checkpoints/crash/savepoints/mid-run/_manifest.json")
            .exists());
        finished_output(reference_dir.path(), port).await
    };
    assert!(
        reference.0.iter().all(|f| !f.is_empty()),
        "every sink has output"
    );

    // Killed at pseudo-random points, restarted each time.
    let mut seed = 0x5eed_u64;
    let mut kills = 0;
    for _ in 0..3 {
        let port = free_port();
        let before = stored_checkpoints(dir.path());
        let run = spawn_vigil(dir.path(), port);
        // Killed at a random point after this run has stored a checkpoint
        // of its own (a loaded machine starts slowly).
        tokio::time::timeout(Duration::from_secs(60), async {
            while stored_checkpoints(dir.path()) <= before {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("a checkpoint is stored");
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let wait_ms = 50 + (seed >> 33) % 700;
        tokio::time::sleep(Duration::from_millis(wait_ms)).await;
        drop(run); // SIGKILL
        kills += 1;
    }
    assert_eq!(kills, 3);
    let log = std::fs::read_to_string(dir.path().join("vigil.log")).unwrap_or_default();
    let port = free_port();
    let after = {
        let _run = spawn_vigil(dir.path(), port);
        finished_output(dir.path(), port).await
    };
    assert!(
        log.contains("restoring state"),
        "a killed run left a checkpoint the next one restored: {log}"
    );
    for (name, (got, want)) in ["alerts", "sprays", "events"]
        .iter()
        .zip(after.0.iter().zip(&reference.0))
    {
        assert_eq!(
            got.len(),
            want.len(),
            "{name}: nothing lost, nothing doubled"
        );
        assert_eq!(got, want, "{name}");
    }
    assert_eq!(after.1, reference.1, "the read models");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_record_goes_to_dead_letters_and_the_rest_flows_on() {
    // A step that fails on one record (a cast no row but it rejects) would
    // fail the pipeline, and after each restart fail it again on the same
    // record. The runtime retries the failing batch in halves until the
    // record is alone, and sends it to dead letters with the error.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut lines: Vec<String> = (0..1000)
        .map(|i| {
            format!(
                r#"{{"ts":{},"code":"{}"}}"#,
                1_767_225_600_000i64 + i,
                i % 50
            )
        })
        .collect();
    lines[637] = r#"{"ts":1767225600637,"code":"not-a-number"}"#.to_string();
    std::fs::write(dir.path().join("in.ndjson"), lines.join("\n")).expect("write");
    let yaml = format!(
        r#"
name: poison
sources:
  events:
    type: file
    path: {}
    batch_size: 256
    schema:
      fields:
        - {{ name: ts, type: timestamp }}
        - {{ name: code, type: string }}
      event_time: {{ field: ts, format: epoch_ms }}
transforms:
  big:
    type: filter
    input: events
    where: "CAST(code AS INT) >= 40"
sinks:
  out: {{ type: null, input: big }}
"#,
        dir.path().join("in.ndjson").display()
    );
    let mut options = options_with(&[]);
    options.dead_letter_dir = dir.path().to_path_buf();
    let mut plan = load_str("poison.yaml", &yaml, &options).expect("valid");
    let out = plan.capture("out").expect("sink");
    let summary = crate::run_to_end(&plan).await;
    let rows: usize = out.lock().iter().map(|b| b.num_rows()).sum();
    assert_eq!(rows, 200, "every other record passes or not by its code");
    assert_eq!(summary.dead_letters, 1, "{summary:?}");
    assert_eq!(
        summary.dead_letters_by_error.get("processing_failed"),
        Some(&1)
    );
    let dead = std::fs::read_to_string(dir.path().join("poison.dlq.ndjson")).expect("dead letters");
    assert!(dead.contains("not-a-number"), "{dead}");
    assert!(dead.contains("big"), "names the step: {dead}");
}

/// An S3-compatible server for the duration of a test: moto's, from PyPI
/// (`pip install "moto[server]"`; `.ci/run` installs it). A real S3 protocol
/// implementation over HTTP, since no object store can run here otherwise.
struct Moto(std::process::Child);

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_round_trip_through_s3_compatible_storage() {
    let port = free_port();
    let child = std::process::Command::new("python3")
        .args([
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    let Ok(child) = child else {
        panic!("python3 is needed for the S3 test");
    };
    let _moto = Moto(child);
    let endpoint = format!("http://127.0.0.1:{port}");
    // Wait for the server, then create the bucket (moto takes unsigned requests).
    let client = reqwest::Client::new();
    let mut created = false;
    for _ in 0..200 {
        if let Ok(r) = client
            .put(format!("{endpoint}/vigil-checkpoints"))
            .send()
            .await
        {
            created = r.status().is_success();
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        created || std::env::var_os("CI").is_none(),
        "moto is missing in CI: .ci/run installs moto[server]"
    );
    if !created {
        eprintln!("skipping: no S3-compatible server (pip install \"moto[server]\")");
        return;
    }
    let options = vec![
        ("aws_endpoint".to_string(), endpoint.clone()),
        ("aws_allow_http".to_string(), "true".to_string()),
        ("aws_region".to_string(), "us-east-1".to_string()),
        ("aws_access_key_id".to_string(), "test".to_string()),
        ("aws_secret_access_key".to_string(), "test".to_string()),
    ];
    let store = CheckpointStore::open_with("s3://vigil-checkpoints/pipelines/demo", 2, options)
        .expect("store");
    // A real pipeline's checkpoint: the window pipeline of the SQL tests at
    // parallelism 2, restored from S3 at parallelism 3.
    let rows_dir = tempfile::tempdir().expect("tempdir");
    let lines: Vec<String> = (0..3000)
        .map(|i| {
            format!(
                r#"{{"ts":{},"user":"u{}","bytes":{}}}"#,
                1_767_225_600_000i64 + i * 100,
                i % 37,
                i
            )
        })
        .collect();
    std::fs::write(rows_dir.path().join("in.ndjson"), lines.join("\n")).expect("write");
    let yaml = |p: usize| {
        format!(
            r#"
name: s3
parallelism: {p}
sources:
  t:
    type: file
    path: {}
    batch_size: 100
    schema:
      fields:
        - {{ name: ts, type: timestamp }}
        - {{ name: user, type: string }}
        - {{ name: bytes, type: int64 }}
      event_time: {{ field: ts, format: epoch_ms }}
transforms:
  w:
    type: sql
    query: "SELECT window_start, user, count(*) AS n, sum(bytes) AS b FROM t GROUP BY TUMBLE(ts, INTERVAL '1' MINUTE), user"
sinks:
  out: {{ type: null, input: w }}
"#,
            rows_dir.path().join("in.ndjson").display()
        )
    };
    let out_dir = tempfile::tempdir().expect("tempdir");
    let straight_dir = tempfile::tempdir().expect("tempdir");
    run(
        &plan(&yaml(1), &["out"], straight_dir.path()),
        RuntimeOptions::default(),
    )
    .await;
    let first = plan(&yaml(2), &["out"], out_dir.path());
    let id = crash_after_checkpoint(first, &store, 5, Some("mid-run")).await;
    let ids: Vec<u64> = store
        .list()
        .await
        .expect("list")
        .iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(ids, vec![id]);
    let saved = store.savepoint("mid-run").await.expect("the savepoint");
    assert!(saved.rows() > 0, "window state was stored");
    run(
        &plan(&yaml(3), &["out"], out_dir.path()),
        RuntimeOptions {
            restore: Some(Arc::new(saved)),
            store: Some(store.clone()),
            ..RuntimeOptions::default()
        },
    )
    .await;
    assert_eq!(
        output(&["out"], out_dir.path()),
        output(&["out"], straight_dir.path()),
        "restored from S3 at parallelism 3"
    );
}
