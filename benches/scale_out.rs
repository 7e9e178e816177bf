//! Scale-out throughput: one pipeline run by 1, 2 and 3 `vigil` processes
//! sharing a topic through a separate broker process (tansu), and the cost
//! of re-keying through Kafka.
//!
//! The topic `auth` (6 partitions, not divided by user) is pre-loaded with
//! JSON logins of 10 k users. Each configuration counts logins per user and
//! minute (a tumbling window) into files, one per process, and is timed
//! from the first record any process reads to the moment the committed
//! counts of all processes add up to every login:
//!
//! * `co-partitioned`: one process, no `scale_out`: the window reads the
//!   topic directly, which is what a topic already partitioned by user
//!   allows;
//! * `scale_out xN`: `scale_out: { partitions: 6 }` with N processes: every
//!   row goes through the repartition topic, and N processes share both
//!   topics' partitions.
//!
//! The topic holds minutes of event time per second of reading, and the
//! processes' start moves partitions between them: the out-of-orderness
//! covers the whole input, so no row is late where a partition's backlog
//! lands (docs/scale-out.md, "per-partition event time") and every run
//! counts every login.
//!
//! The repartition overhead is the ratio of `scale_out x1` to
//! `co-partitioned`. On a 2-core machine the broker and the processes
//! share the cores, so the absolute scaling is capped; the per-process
//! figure is what one process adds.
//!
//! `cargo bench --bench scale_out` (add `-- --events N --runs R`, and
//! `--only LABEL` for the configurations whose label starts with it; the
//! processes log at `VIGIL_BENCH_LOG`, `warn` by default, into `vigil.log`
//! of their directory).

#[path = "../tests/integration/broker.rs"]
mod broker;
mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use support::{arg, spread};

const PARTITIONS: i32 = 6;
const BASE_MS: i64 = 1_767_225_600_000;

/// The benchmark's directory: removed on drop, unless the benchmark is
/// failing, when it is kept for its logs.
struct KeepOnPanic(Option<tempfile::TempDir>);

impl Drop for KeepOnPanic {
    fn drop(&mut self) {
        if let (true, Some(dir)) = (std::thread::panicking(), self.0.take()) {
            eprintln!("logs kept in {}", dir.keep().display());
        }
    }
}

/// A `vigil run`; killed on drop.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Writes `n` logins (one every 10 ms of event time, users spread over all
/// partitions), then one login per partition a day later so every window
/// closes.
async fn preload(brokers: &str, n: i64) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "20")
        .set("batch.size", "1000000")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .expect("producer");
    let mut pending = Vec::with_capacity(10_000);
    let send = |i: i64, ts: i64, user: String| {
        let value = format!(
            r#"{{"ts":{ts},"user":"{user}","src_ip":"10.0.{}.{}"}}"#,
            i % 200,
            i % 250
        );
        let producer = producer.clone();
        async move {
            producer
                .send(
                    FutureRecord::<(), _>::to("auth")
                        .partition((i % PARTITIONS as i64) as i32)
                        .payload(&value),
                    Duration::from_secs(30),
                )
                .await
                .expect("delivered");
        }
    };
    for i in 0..n {
        pending.push(send(
            i,
            BASE_MS + i * 10,
            format!("user-{}", (i * 7919) % 10_000),
        ));
        if pending.len() == 10_000 {
            futures::future::join_all(std::mem::take(&mut pending)).await;
        }
    }
    for p in 0..PARTITIONS as i64 {
        pending.push(send(p, BASE_MS + n * 10 + 86_400_000, "end".into()));
    }
    futures::future::join_all(pending).await;
}

fn pipeline(brokers: &str, name: &str, scale_out: bool) -> String {
    let scale = if scale_out {
        "scale_out: { partitions: 6 }\n"
    } else {
        ""
    };
    format!(
        "\
name: {name}
{scale}sources:
  auth:
    type: kafka
    brokers: {brokers}
    topics: [auth]
    properties: {{ session.timeout.ms: \"6000\", fetch.wait.max.ms: \"10\" }}
    watermark: {{ out_of_orderness: 2h }}
    schema:
      fields:
        - {{ name: ts, type: timestamp }}
        - {{ name: user, type: string }}
        - {{ name: src_ip, type: string }}
      event_time: {{ field: ts, format: epoch_ms }}
transforms:
  per_user:
    type: sql
    query: \"SELECT window_start, user, count(*) AS logins FROM auth GROUP BY TUMBLE(ts, INTERVAL '1' MINUTE), user\"
sinks:
  counts:
    type: file
    input: per_user
    path: counts.ndjson
"
    )
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Records the `auth` source of the process behind `port` has read.
fn read_so_far(port: u16) -> u64 {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return 0;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let req = "GET /metrics HTTP/1.1\r\nHost: vigil\r\nConnection: close\r\n\r\n";
    if s.write_all(req.as_bytes()).is_err() {
        return 0;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.lines()
        .filter(|l| l.starts_with("vigil_records_in_total{") && l.contains("node=\"auth\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Logins counted in the committed `counts.ndjson` files of `dirs`.
fn counted(dirs: &[PathBuf]) -> i64 {
    dirs.iter()
        .filter_map(|d| std::fs::read_to_string(d.join("counts.ndjson")).ok())
        .flat_map(|t| {
            t.lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter_map(|v| v["logins"].as_i64())
                .collect::<Vec<_>>()
        })
        .sum()
}

/// Runs `processes` processes of a fresh pipeline over the topic; returns
/// the seconds from the first record read to every login counted.
#[allow(clippy::disallowed_methods)] // a benchmark times itself
fn run(brokers: &str, root: &Path, name: &str, processes: usize, scale_out: bool, n: i64) -> f64 {
    let shared = root.join(name).join("checkpoints");
    let mut dirs = Vec::new();
    let mut ports = Vec::new();
    let mut running = Vec::new();
    for m in 0..processes {
        let dir = root.join(name).join(format!("p{m}"));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(
            dir.join("pipeline.yaml"),
            pipeline(brokers, name, scale_out),
        )
        .expect("write");
        let port = free_port();
        let log = std::fs::File::create(dir.join("vigil.log")).expect("log");
        running.push(Process(
            Command::new(env!("CARGO_BIN_EXE_vigil"))
                .args(["run", "pipeline.yaml", "--checkpoints"])
                .arg(&shared)
                .args(["--member", &format!("p{m}"), "--progress", "off"])
                .args(["--checkpoint-interval", "1s"])
                .args(["--http", &format!("127.0.0.1:{port}")])
                .current_dir(&dir)
                .env(
                    "RUST_LOG",
                    std::env::var("VIGIL_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
                )
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("start vigil"),
        ));
        dirs.push(dir);
        ports.push(port);
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut first = None;
    loop {
        assert!(
            Instant::now() < deadline,
            "{name}: {} of {n} logins counted in 10 minutes (logs in {})",
            counted(&dirs),
            root.join(name).display()
        );
        if first.is_none() && ports.iter().any(|&p| read_so_far(p) > 0) {
            first = Some(Instant::now());
        }
        if first.is_some() && counted(&dirs) >= n {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let secs = first.map_or(0.0, |f| f.elapsed().as_secs_f64());
    drop(running);
    secs
}

fn main() {
    let n = arg("--events", 300_000) as i64;
    let runs = arg("--runs", 3) as usize;
    let Some(tansu) = broker::start_tansu() else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        broker::create_topics(&tansu.brokers, &[("auth", PARTITIONS)]).await;
        preload(&tansu.brokers, n).await;
    });
    // Kept when a run fails, with every process's log in it: a run that
    // stops counting is diagnosed from those logs.
    let root = tempfile::tempdir().expect("tempdir");
    let kept = root.path().to_path_buf();
    let _root = KeepOnPanic(Some(root));
    let configs: [(&str, usize, bool); 4] = [
        ("co-partitioned", 1, false),
        ("scale_out x1", 1, true),
        ("scale_out x2", 2, true),
        ("scale_out x3", 3, true),
    ];
    // `--only LABEL` runs the configurations whose label starts with it.
    let args: Vec<String> = std::env::args().collect();
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let mut medians = Vec::new();
    for (label, processes, scale_out) in configs {
        if only
            .as_ref()
            .is_some_and(|o| !label.starts_with(o.as_str()))
        {
            medians.push(f64::NAN);
            continue;
        }
        let mut rates = Vec::new();
        for r in 0..runs {
            let name = format!(
                "bench{}{}r{r}",
                processes,
                if scale_out { "s" } else { "c" }
            );
            let secs = run(&tansu.brokers, &kept, &name, processes, scale_out, n);
            rates.push(n as f64 / secs);
        }
        let (median, min, max) = spread(rates);
        println!(
            "{label:<15} x{processes}  median {:>7.1} k events/s (min {:.1}, max {:.1}); {:>7.1} k events/s per process",
            median / 1e3,
            min / 1e3,
            max / 1e3,
            median / 1e3 / processes as f64
        );
        medians.push(median);
    }
    println!(
        "repartition overhead: scale_out x1 runs at {:.2} of the co-partitioned rate; x2 {:.2} and x3 {:.2} of x1",
        medians[1] / medians[0],
        medians[2] / medians[1],
        medians[3] / medians[1]
    );
}
