//! Running a planned pipeline: checkpoints, restarts from them when a task
//! fails, progress while it runs, a summary when it ends.
//!
//! A run restores the latest complete checkpoint of its store (or a named
//! savepoint) before any data flows. When a task fails, the whole pipeline
//! is torn down and started again from the latest complete checkpoint after
//! a back-off that doubles with each failure in a row; a run that fails
//! [`RestartPolicy::max_failures`] times without completing a checkpoint in
//! between gives up, so a failure that repeats is reported rather than
//! retried for ever. A run whose input ended clears its checkpoints: there
//! is nothing left to resume.
//!
//! Progress goes to stderr, so stdout stays clean for the pipeline's own
//! output: on a terminal, one status line rewritten in place every second;
//! otherwise, a plain log line every ten seconds. Both read the engine's
//! counters; nothing here touches the data path. Sinks' latency
//! percentiles are printed at the end, and on demand when the process gets
//! SIGUSR1.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vigil_engine::{
    start, CheckpointStats, CheckpointStore, CompletedCheckpoint, EngineError, MetricsRegistry,
    NodeRole, Percentiles, RuntimeOptions, SharedClock, SystemClock,
};

use crate::observe::Observer;

use crate::pipeline::Plan;

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// A status line rewritten in place (for terminals).
    Live,
    /// A log line every ten seconds (for logs and pipes).
    Lines,
    /// Nothing.
    Off,
}

impl Progress {
    /// `Live` on a terminal, `Lines` otherwise.
    pub fn detect() -> Self {
        if std::io::stderr().is_terminal() {
            Progress::Live
        } else {
            Progress::Lines
        }
    }
}

/// Which state a run starts from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Restore {
    /// The latest complete checkpoint in the store, if there is one.
    #[default]
    Latest,
    /// A named savepoint.
    Savepoint(String),
    /// A named savepoint the first time this process starts with it, its
    /// latest checkpoint on every start after a checkpoint was taken from
    /// it (how a deployment that names a savepoint in a pod's arguments
    /// survives a pod restart). `{member}` in the name stands for the
    /// process's member name; a member without such a savepoint (one a
    /// rescale added) starts as a new member does.
    InitialSavepoint(String),
    /// Nothing: ignore the store's checkpoints (they are replaced).
    Fresh,
}

/// How a failed pipeline is restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartPolicy {
    /// Failures in a row (with no checkpoint completing in between) after
    /// which the run gives up; 0 never restarts.
    pub max_failures: u32,
    /// Wait before the first restart; doubled for each failure in a row.
    pub backoff: Duration,
    /// Longest wait between restarts.
    pub max_backoff: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            max_failures: 5,
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
        }
    }
}

/// How to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Progress display.
    pub progress: Progress,
    /// This process's member name among the processes of a Kafka pipeline
    /// (default: the host name); it names the process's checkpoints.
    pub member: Option<String>,
    /// Stop after this long (endless sources run until stopped otherwise).
    pub duration: Option<Duration>,
    /// Wall clock.
    pub clock: SharedClock,
    /// Channel capacity in batches.
    pub channel_capacity: usize,
    /// Take a checkpoint this often; completed checkpoints are when Kafka
    /// offsets are committed and sinks commit.
    pub checkpoint_interval: Option<Duration>,
    /// Where checkpoints are stored (none: in memory, lost with the process).
    pub checkpoints: Option<CheckpointStore>,
    /// Which state the run starts from.
    pub restore: Restore,
    /// How failures are retried.
    pub restarts: RestartPolicy,
    /// Where to serve the HTTP API (read models, checkpoints, savepoints).
    pub http: Option<std::net::SocketAddr>,
    /// After the input ends, keep serving the API until stopped.
    pub keep_serving: bool,
    /// A source that has not come back for input this long makes the run
    /// unready (`/ready`).
    pub stall_timeout: Duration,
    /// Busy time, bytes, state sizes and latency histograms (see
    /// [`RuntimeOptions::detailed_metrics`]).
    pub detailed_metrics: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            progress: Progress::detect(),
            member: None,
            duration: None,
            clock: Arc::new(SystemClock),
            channel_capacity: RuntimeOptions::default().channel_capacity,
            checkpoint_interval: Some(Duration::from_secs(10)),
            checkpoints: None,
            restore: Restore::Latest,
            restarts: RestartPolicy::default(),
            http: None,
            keep_serving: false,
            stall_timeout: Duration::from_secs(30),
            detailed_metrics: true,
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Wall time.
    pub elapsed: Duration,
    /// Records read by sources.
    pub events_in: u64,
    /// Records written by the pipeline's own sinks.
    pub records_out: u64,
    /// Records sent to dead letters.
    pub dead_letters: u64,
    /// Dead letters by error class.
    pub dead_letters_by_error: std::collections::BTreeMap<String, u64>,
    /// Records behind the watermark that no window took.
    pub late: u64,
    /// Stopped by a deadline or a signal rather than by its sources ending.
    pub stopped: bool,
    /// Times the pipeline failed and was restarted from a checkpoint.
    pub restarts: u32,
    /// Health of the checkpoints of the last attempt.
    pub checkpoints: CheckpointStats,
    /// Latency percentiles of each sink of the last attempt: (event time →
    /// emit, ingest → emit).
    pub latency: std::collections::BTreeMap<String, (Percentiles, Percentiles)>,
}

impl Summary {
    /// Events read per second of wall time.
    pub fn rate(&self) -> f64 {
        self.events_in as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

fn human(n: f64) -> String {
    if n >= 1e9 {
        format!("{:.2}G", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.2}M", n / 1e6)
    } else if n >= 1e4 {
        format!("{:.1}k", n / 1e3)
    } else {
        format!("{n:.0}")
    }
}

/// `HH:MM:SSZ` (UTC) of an epoch-millisecond time.
fn format_time(ms: i64) -> String {
    let s = ms.div_euclid(1000);
    let day = s.rem_euclid(86_400);
    format!(
        "{:02}:{:02}:{:02}Z",
        day / 3600,
        (day % 3600) / 60,
        day % 60
    )
}

struct Snapshot {
    events_in: u64,
    out: u64,
    dead: u64,
    late: u64,
    watermark: Option<i64>,
    consumer_lag: i64,
}

fn snapshot(m: &MetricsRegistry, sinks: &[String]) -> Snapshot {
    let src = m.totals(NodeRole::Source);
    let ops = m.totals(NodeRole::Operator);
    let out = sinks.iter().map(|s| m.node_totals(s).records_in).sum();
    Snapshot {
        events_in: src.records_in,
        out,
        dead: src.dead_letters + ops.dead_letters,
        late: ops.late_records,
        watermark: src.min_watermark.filter(|w| *w != i64::MAX),
        consumer_lag: m.consumer_lag(),
    }
}

/// Records in and out per second over the last sample.
#[derive(Debug, Clone, Copy, Default)]
struct Throughput {
    in_per_s: f64,
    out_per_s: f64,
}

/// One line per sink: its latency percentiles.
pub fn latency_lines(
    latency: &std::collections::BTreeMap<String, (Percentiles, Percentiles)>,
) -> Vec<String> {
    let ms = |s: f64| format!("{:.1}ms", s * 1e3);
    let one = |name: &str, p: &Percentiles| {
        if p.count == 0 {
            format!("{name} -")
        } else {
            format!(
                "{name} p50 {} p99 {} p99.9 {}",
                ms(p.p50),
                ms(p.p99),
                ms(p.p999)
            )
        }
    };
    latency
        .iter()
        .filter(|(_, (e, i))| e.count > 0 || i.count > 0)
        .map(|(sink, (event, ingest))| {
            format!(
                "latency {sink}: {} | {}",
                one("event time→emit", event),
                one("ingest→emit", ingest)
            )
        })
        .collect()
}

fn status_line(s: &Snapshot, rate: Throughput, elapsed: Duration, now_ms: i64) -> String {
    let wm = match s.watermark {
        Some(w) => {
            let lag = (now_ms - w) as f64 / 1000.0;
            let lag = if lag >= 0.0 {
                format!("lag {lag:.1}s")
            } else {
                format!("{:.1}s ahead", -lag)
            };
            format!("watermark {} ({lag})", format_time(w))
        }
        None => "watermark -".to_string(),
    };
    let lag = if s.consumer_lag > 0 {
        format!(" | kafka lag {}", human(s.consumer_lag as f64))
    } else {
        String::new()
    };
    format!(
        "{:>6.1}s | in {} ({}/s) | out {} ({}/s) | dead letters {} | late {} | {}{lag}",
        elapsed.as_secs_f64(),
        human(s.events_in as f64),
        human(rate.in_per_s),
        s.out,
        human(rate.out_per_s),
        s.dead,
        s.late,
        wm
    )
}

/// How one attempt ended.
enum Attempt {
    /// The input ended, or the run was stopped.
    Done(Summary),
    /// A task failed; `progressed` when a checkpoint completed meanwhile.
    Failed {
        error: EngineError,
        progressed: bool,
        latest: Option<Arc<CompletedCheckpoint>>,
    },
}

/// Waits for Ctrl-C or SIGTERM (how Kubernetes stops a pod).
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
        match term {
            Ok(mut t) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = t.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Runs `plan` to completion (or until `options.duration` passes, or Ctrl-C
/// or SIGTERM), restarting it from its latest checkpoint when a task fails.
#[allow(clippy::disallowed_methods)] // elapsed time for people, outside the data path
pub async fn run(plan: &Plan, mut options: RunOptions) -> Result<Summary, EngineError> {
    let observer = Observer::new(
        &plan.name,
        &plan.graph,
        options.clock.clone(),
        options.stall_timeout,
    );
    let control = Arc::new(crate::http::Control::new(
        options
            .checkpoints
            .as_ref()
            .map(|s| s.location().to_string()),
        Arc::new(observer),
    ));
    // Bound first, so a port in use stops the run before anything starts.
    let listener = match options.http {
        Some(addr) => match crate::http::bind(addr).await {
            Ok(l) => {
                let at = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
                tracing::info!(address = %at, models = ?plan.read_models.names(), "HTTP API on http://{at}/ (/metrics, /health, /ready, /v1/pipeline, read models, checkpoints, savepoints)");
                Some(l)
            }
            Err(e) if plan.read_models.is_empty() => {
                tracing::warn!(address = %addr, error = %e, "HTTP API not served");
                None
            }
            Err(e) => {
                return Err(EngineError::io(
                    format!("cannot serve read models on {addr}"),
                    e,
                ))
            }
        },
        None => None,
    };
    // Processes of a pipeline that reads Kafka share its partitions, and so
    // its checkpoint storage: they see each other through leases in it.
    let membership = match &options.checkpoints {
        Some(store) if !plan.kafka_sources.is_empty() => Some(
            crate::members::Membership::join(
                store.clone(),
                &options
                    .member
                    .clone()
                    .unwrap_or_else(crate::members::default_member),
                &plan.name,
                &plan.definition,
                // With scale_out, keyed state moves with partitions.
                plan.repartitions.is_empty()
                    && plan.graph.nodes().iter().any(|n| match &n.kind {
                        vigil_engine::graph::NodeKind::Operator(f) => !f.key_columns().is_empty(),
                        _ => false,
                    }),
                listener
                    .as_ref()
                    .and_then(|l| l.local_addr().ok())
                    .map(|a| a.to_string()),
                options.clock.clone(),
            )
            .await?,
        ),
        _ => None,
    };
    if let Some(m) = &membership {
        // Its own checkpoints, apart from the other processes'.
        options.checkpoints = Some(m.store().clone());
        // Partitions go on from the checkpoint their commit names, whoever
        // wrote it.
        let ownership = vigil_connectors::kafka::Ownership {
            store: m.store().clone(),
            member: m.member(),
            definition: plan.definition.clone(),
        };
        for (_, f) in &plan.kafka_sources {
            f.set_ownership(ownership.clone());
        }
    }
    if !plan.repartitions.is_empty() {
        if membership.is_none() {
            return Err(EngineError::User(format!(
                "pipeline {:?} has scale_out: keyed state moves between processes through checkpoint storage; give --checkpoints",
                plan.name
            )));
        }
        for r in &plan.repartitions {
            let mut config = rdkafka::ClientConfig::new();
            config.set("bootstrap.servers", &r.brokers);
            for (k, v) in r.properties.iter() {
                config.set(k, v);
            }
            vigil_connectors::kafka::repartition::ensure_topic(
                &config,
                &plan.name,
                &r.topic,
                r.partitions,
            )
            .await?;
        }
    }
    for log in &plan.changelogs {
        log.ensure(&plan.name).await?;
    }
    let result = supervise(plan, &options, control, listener, membership.as_ref()).await;
    if let Some(m) = &membership {
        m.leave().await;
    }
    result
}

/// What a process sharing its pipeline restores from its own checkpoint:
/// not the Kafka sources' positions, which come with each partition from
/// the checkpoint its commit names (this process's or another's), and not
/// the state of steps behind a repartition reader, which comes with the
/// key groups of the partitions assigned here. The rest (sinks' pending
/// commits, other sources, steps fed by them) is this process's own.
fn owned_here(plan: &Plan, mut c: CompletedCheckpoint) -> CompletedCheckpoint {
    use vigil_engine::graph::NodeKind;
    let nodes = plan.graph.nodes();
    let kafka: std::collections::HashSet<&str> =
        plan.kafka_sources.iter().map(|(n, _)| n.as_str()).collect();
    let readers: Vec<usize> = plan
        .repartitions
        .iter()
        .filter_map(|r| plan.graph.find(&format!("{}/rekey-in", r.step)))
        .collect();
    // Operators downstream of a reader (readers are added after the steps
    // they feed, so node order is not input order: iterate until settled).
    let mut behind: Vec<bool> = (0..nodes.len()).map(|id| readers.contains(&id)).collect();
    loop {
        let mut changed = false;
        for (id, n) in nodes.iter().enumerate() {
            if !behind[id]
                && matches!(n.kind, NodeKind::Operator(_))
                && n.inputs.iter().any(|e| behind[e.from])
            {
                behind[id] = true;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    let dropped: std::collections::HashSet<&str> = nodes
        .iter()
        .enumerate()
        .filter(|(id, n)| {
            kafka.contains(n.name.as_str())
                || (behind[*id] && matches!(n.kind, NodeKind::Operator(_)))
        })
        .map(|(_, n)| n.name.as_str())
        .collect();
    c.states
        .retain(|(node, _), _| !dropped.contains(node.as_str()));
    c.parallelism
        .retain(|node, _| !dropped.contains(node.as_str()));
    c
}

/// Runs attempts of the pipeline until one ends or gives up.
#[allow(clippy::disallowed_methods)] // elapsed time for people, outside the data path
async fn supervise(
    plan: &Plan,
    options: &RunOptions,
    control: Arc<crate::http::Control>,
    listener: Option<tokio::net::TcpListener>,
    membership: Option<&crate::members::Membership>,
) -> Result<Summary, EngineError> {
    let serving = listener.is_some();
    // Set when the run starts from an --initial-savepoint: once a checkpoint
    // is taken after it, later starts go on from their latest checkpoint.
    let mut first_savepoint: Option<(String, String, u64)> = None;
    let deadline = options.duration.map(|d| tokio::time::Instant::now() + d);
    let started = Instant::now();
    let shared = |c: CompletedCheckpoint| match membership {
        Some(_) => Arc::new(owned_here(plan, c)),
        None => Arc::new(c),
    };
    let mut restore = match (&options.checkpoints, &options.restore) {
        (Some(store), Restore::Latest) => store.latest().await?.map(shared),
        (Some(store), Restore::Savepoint(name)) => Some(Arc::new(store.savepoint(name).await?)),
        (Some(store), Restore::InitialSavepoint(name)) => {
            let per_member = name.contains("{member}");
            let who = store
                .member()
                .map(str::to_string)
                .or_else(|| options.member.clone())
                .unwrap_or_else(crate::members::default_member);
            // What follows '#' tells apart two starts from one savepoint
            // (a rollback to the savepoint a failed upgrade started from).
            let start = name.replace("{member}", &who);
            let name = start.split('#').next().unwrap_or_default().to_string();
            if store.started_from(&who).await?.as_deref() == Some(start.as_str()) {
                tracing::info!(savepoint = %start, "started from this savepoint before; going on from the latest checkpoint");
                store.latest().await?.map(shared)
            } else {
                match store.savepoint(&name).await {
                    Ok(c) => {
                        first_savepoint = Some((who.clone(), start, c.id));
                        Some(Arc::new(c))
                    }
                    Err(EngineError::User(e)) if per_member => {
                        tracing::warn!(savepoint = %name, error = %e, "no savepoint for this member; starting as a new member");
                        first_savepoint = Some((who.clone(), start, 0));
                        store.latest().await?.map(shared)
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        (None, Restore::Savepoint(name) | Restore::InitialSavepoint(name)) => {
            return Err(EngineError::User(format!(
                "savepoint {name:?}: no checkpoint storage to read it from"
            )))
        }
        (_, _) => None,
    };
    if let Some(c) = &restore {
        tracing::info!(checkpoint = c.id, savepoint = ?c.savepoint, rows = c.rows(), "restoring state");
    }
    let marker = async {
        let (Some((member, name, after)), Some(store)) = (&first_savepoint, &options.checkpoints)
        else {
            return std::future::pending().await;
        };
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            if control.latest_checkpoint().is_some_and(|id| id > *after) {
                match store.set_started_from(member, name).await {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot record the savepoint this process started from")
                    }
                }
            }
        }
        std::future::pending().await
    };
    let server = async {
        let serve = async {
            match listener {
                Some(l) => crate::http::serve(l, plan.read_models.clone(), control.clone()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = serve => r,
            never = marker => never,
        }
    };
    tokio::pin!(server);
    let mut failures = 0u32;
    let mut restarts = 0u32;
    loop {
        let attempt = run_once(
            plan,
            options,
            membership,
            restore.clone(),
            &control,
            deadline,
            &mut server,
            serving,
            started,
        );
        match attempt.await? {
            Attempt::Done(mut summary) => {
                summary.restarts = restarts;
                summary.elapsed = started.elapsed();
                if !summary.stopped {
                    if let Some(store) = &options.checkpoints {
                        // A run whose input ended has nothing to resume.
                        store.clear().await?;
                    }
                    if options.keep_serving && serving {
                        tracing::info!("input ended; serving the API until stopped");
                        tokio::select! {
                            r = &mut server => {
                                if let Err(e) = r {
                                    return Err(EngineError::io("the HTTP API stopped", e));
                                }
                            }
                            _ = shutdown_signal() => {}
                        }
                    }
                }
                return Ok(summary);
            }
            Attempt::Failed {
                error,
                progressed,
                latest,
            } => {
                failures = if progressed { 1 } else { failures + 1 };
                if failures > options.restarts.max_failures {
                    tracing::error!(failures, error = %error, "pipeline failed; giving up");
                    return Err(error);
                }
                restarts += 1;
                control.restarted(&error);
                let wait = options
                    .restarts
                    .backoff
                    .saturating_mul(1 << (failures - 1).min(16))
                    .min(options.restarts.max_backoff);
                restore = match &options.checkpoints {
                    Some(store) => store.latest().await?.map(shared),
                    None => latest.or(restore),
                };
                tracing::warn!(
                    error = %error,
                    restart = restarts,
                    from_checkpoint = ?restore.as_ref().map(|c| c.id),
                    in_ms = wait.as_millis() as u64,
                    "pipeline failed; restarting from the latest checkpoint"
                );
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown_signal() => return Err(error),
                }
            }
        }
    }
}

/// One start of the pipeline, until it ends, is stopped or fails.
#[allow(clippy::disallowed_methods)] // elapsed time and rates for people, outside the data path
#[allow(clippy::too_many_arguments)]
async fn run_once<S>(
    plan: &Plan,
    options: &RunOptions,
    membership: Option<&crate::members::Membership>,
    restore: Option<Arc<CompletedCheckpoint>>,
    control: &crate::http::Control,
    deadline: Option<tokio::time::Instant>,
    server: &mut std::pin::Pin<&mut S>,
    serving: bool,
    started: Instant,
) -> Result<Attempt, EngineError>
where
    S: std::future::Future<Output = std::io::Result<()>>,
{
    let runtime = RuntimeOptions {
        channel_capacity: options.channel_capacity,
        clock: options.clock.clone(),
        checkpoint_interval: options.checkpoint_interval,
        store: options.checkpoints.clone(),
        restore,
        detailed_metrics: options.detailed_metrics,
    };
    let running = start(&plan.graph, runtime)?;
    let metrics = running.metrics();
    let stop = running.stop_handle();
    let checkpoints = running.checkpoints();
    control.attach(checkpoints.clone(), metrics.clone());
    let wait = running.wait();
    tokio::pin!(wait);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut stopped = false;
    let mut last_in = 0u64;
    let mut last_out = 0u64;
    let mut last_at = Instant::now();
    let mut last_line = Instant::now();
    let mut last_renew: Option<Instant> = None;
    let mut usr1 = latency_signal();
    let result = loop {
        tokio::select! {
            r = &mut wait => break r,
            r = server.as_mut(), if serving => {
                if let Err(e) = r {
                    stop.stop();
                    break Err(EngineError::io("the HTTP API stopped", e));
                }
            }
            _ = usr1.recv() => {
                for line in latency_lines(&control.observer.latencies()) {
                    tracing::info!(target: "vigil::latency", "{line}");
                }
            }
            _ = tick.tick() => {
                control.observer.sample();
                if let Some(m) = membership {
                    if last_renew.is_none_or(|at: Instant| at.elapsed() >= crate::members::RENEW_EVERY) {
                        last_renew = Some(Instant::now());
                        m.renew(&metrics).await;
                    }
                }
                let s = snapshot(&metrics, &plan.sinks);
                let dt = last_at.elapsed().as_secs_f64().max(1e-3);
                let rate = Throughput {
                    in_per_s: s.events_in.saturating_sub(last_in) as f64 / dt,
                    out_per_s: s.out.saturating_sub(last_out) as f64 / dt,
                };
                last_in = s.events_in;
                last_out = s.out;
                last_at = Instant::now();
                let line = status_line(&s, rate, started.elapsed(), options.clock.now_ms());
                match options.progress {
                    Progress::Live => {
                        let mut err = std::io::stderr().lock();
                        let _ = write!(err, "\r\x1b[2K{line}");
                        let _ = err.flush();
                    }
                    Progress::Lines if last_line.elapsed() >= Duration::from_secs(10) => {
                        last_line = Instant::now();
                        tracing::info!(target: "vigil::progress", "{line}");
                    }
                    _ => {}
                }
            }
            _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } }, if !stopped => {
                stopped = true;
                stop.stop();
            }
            _ = shutdown_signal(), if !stopped => {
                stopped = true;
                stop.stop();
            }
        }
    };
    if options.progress == Progress::Live {
        eprintln!();
    }
    let latency = control.observer.latencies();
    control.detach();
    let stats = checkpoints.stats();
    if let Err(error) = result {
        if stopped {
            return Err(error);
        }
        return Ok(Attempt::Failed {
            error,
            progressed: stats.completed > 0,
            latest: checkpoints.latest(),
        });
    }
    let s = snapshot(&metrics, &plan.sinks);
    Ok(Attempt::Done(Summary {
        elapsed: started.elapsed(),
        events_in: s.events_in,
        records_out: s.out,
        dead_letters: s.dead,
        dead_letters_by_error: metrics.dead_letters_by_error(),
        late: s.late,
        stopped,
        restarts: 0,
        checkpoints: stats,
        latency,
    }))
}

/// SIGUSR1, which asks for the sinks' latency percentiles (never fires
/// where there is no such signal).
struct LatencySignal(Option<tokio::signal::unix::Signal>);

fn latency_signal() -> LatencySignal {
    LatencySignal(
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1()).ok(),
    )
}

impl LatencySignal {
    async fn recv(&mut self) {
        match &mut self.0 {
            Some(s) => {
                if s.recv().await.is_none() {
                    self.0 = None;
                }
            }
            None => std::future::pending().await,
        }
    }
}
