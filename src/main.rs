//! The `vigil` command.
//!
//! `validate`, `explain` and `run` take a pipeline file; `demo` runs the
//! embedded demo pipeline; `sql` runs one query and prints its rows;
//! `savepoint` asks a running pipeline for a savepoint. Exit codes: 0 success, 1 the pipeline failed while
//! running, 2 the pipeline file is invalid (nothing was started).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use vigil::pipeline::{self, Diagnostics, Plan, PlanOptions};
use vigil::run::{run, Progress, RestartPolicy, Restore, RunOptions, Summary};

/// Where `vigil run` keeps checkpoints unless told otherwise.
const DEFAULT_CHECKPOINTS: &str = ".vigil/checkpoints";

#[derive(Parser)]
#[command(
    name = "vigil",
    version,
    about = "Event-time stream processing for security telemetry"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    /// Log level (error, warn, info, debug, trace), or a RUST_LOG-style filter.
    #[arg(long, default_value = "info", global = true)]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Check a pipeline file without running it.
    Validate {
        /// The pipeline file.
        file: PathBuf,
    },
    /// Print the operator graph of a pipeline with its parallelism.
    Explain {
        /// The pipeline file.
        file: PathBuf,
    },
    /// Show which process owns which of a pipeline's Kafka partitions, and
    /// their lag, as the pipeline's consumer groups report it.
    Status {
        /// The pipeline file.
        file: PathBuf,
        /// The pipeline's checkpoint storage (as given to `vigil run`), where
        /// its processes keep their leases.
        #[arg(long, default_value = DEFAULT_CHECKPOINTS)]
        checkpoints: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Run a pipeline.
    Run {
        /// The pipeline file.
        file: PathBuf,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Take a savepoint of a running pipeline (through its HTTP API) and
    /// print where it is stored; `vigil run --from-savepoint NAME` starts
    /// from it.
    Savepoint {
        /// Name to keep it under (letters, digits, '-', '_', '.').
        name: String,
        /// The running pipeline's API address (its `--http`).
        #[arg(long, default_value = "127.0.0.1:8686")]
        http: String,
    },
    /// The Kubernetes operator: the VigilPipeline resource and its controller.
    Operator {
        #[command(subcommand)]
        command: OperatorCommand,
    },
    /// Run the embedded demo: generated logins with injected attacks, detected live.
    Demo {
        #[command(flatten)]
        run: RunArgs,
    },
    /// Run one SQL query over a stream and print its rows as windows close.
    ///
    /// Tables are the sources and steps of --pipeline (by default the
    /// embedded demo's generated `auth` stream), and any the script declares
    /// with CREATE TABLE ... WITH ('connector' = 'file' | 'generator' | 'kafka', ...).
    Sql {
        /// The query (or `CREATE TABLE ...; SELECT ...`).
        query: Option<String>,
        /// Read the script from this file instead.
        #[arg(long, short = 'f')]
        file: Option<PathBuf>,
        /// A pipeline file whose sources and steps are the tables.
        #[arg(long)]
        pipeline: Option<PathBuf>,
        /// Late rows update windows this long after their end.
        #[arg(long, value_parser = humantime_duration)]
        allowed_lateness: Option<Duration>,
        /// Print JSON lines instead of tables.
        #[arg(long)]
        json: bool,
        /// Let joins pair rows of different tenants (by default `tenant_id`
        /// is part of every join's key when both tables have it).
        #[arg(long)]
        cross_tenant: bool,
        /// Print the plan instead of running it.
        #[arg(long)]
        explain: bool,
        #[command(flatten)]
        run: RunArgs,
    },
}

#[derive(Subcommand)]
enum OperatorCommand {
    /// Reconcile VigilPipelines until stopped (SIGTERM) or the leader lease is lost.
    Run {
        /// Watch only this namespace (default: all namespaces).
        #[arg(long, env = "VIGIL_OPERATOR_NAMESPACE")]
        namespace: Option<String>,
        /// Serve the operator's /metrics and /healthz here, or `off`.
        #[arg(long, default_value = "0.0.0.0:8080")]
        metrics: String,
        /// Hold this Lease (in --lease-namespace) before reconciling, so one
        /// replica of the operator works at a time.
        #[arg(long)]
        leader_election: bool,
        /// Namespace of the leader Lease (default: $POD_NAMESPACE).
        #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
        lease_namespace: String,
        /// Name of the leader Lease.
        #[arg(long, default_value = "vigil-operator")]
        lease_name: String,
        /// This replica's identity in the Lease (default: $POD_NAME, else the host name).
        #[arg(long, env = "POD_NAME")]
        identity: Option<String>,
        /// Address of a pipeline pod's API: {pod}, {service}, {namespace}, {port}.
        #[arg(long, default_value = "{pod}.{service}.{namespace}.svc:{port}")]
        pod_address: String,
        /// Talk to this API server over plain HTTP with no credentials
        /// (`kubectl proxy`'s address) instead of the in-cluster or
        /// kubeconfig one.
        #[arg(long)]
        api_server: Option<String>,
    },
    /// Print the VigilPipeline CustomResourceDefinition (YAML), generated from the types.
    Crd,
    /// Print the ConfigMap, Service and StatefulSet a VigilPipeline file
    /// becomes, after the operator's checks (the pipeline must be inline).
    Render {
        /// A VigilPipeline manifest (YAML).
        file: PathBuf,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Stop after this long (e.g. 30s, 5m).
    #[arg(long = "for", value_parser = humantime_duration)]
    duration: Option<Duration>,
    /// Progress on stderr: auto (live on a terminal, log lines otherwise), live, lines, off.
    #[arg(long, default_value = "auto")]
    progress: String,
    /// Directory for the default dead-letter file.
    #[arg(long, default_value = ".")]
    dead_letter_dir: PathBuf,
    /// Take a checkpoint this often (Kafka offsets are committed and sinks
    /// commit when one completes).
    #[arg(long, value_parser = humantime_duration, default_value = "10s")]
    checkpoint_interval: Duration,
    /// Where checkpoints are kept: a directory, an s3://bucket/prefix URL
    /// (AWS_* variables configure it), or `off` (in memory). Each pipeline
    /// uses a subdirectory named after it. Default for `run`:
    /// `.vigil/checkpoints`; for `demo` and `sql`: off.
    #[arg(long)]
    checkpoints: Option<String>,
    /// Complete checkpoints to keep.
    #[arg(long, default_value_t = 3)]
    retain: usize,
    /// Start from this savepoint instead of the latest checkpoint.
    #[arg(long, conflicts_with = "fresh")]
    from_savepoint: Option<String>,
    /// Start from this savepoint unless this process has already taken a
    /// checkpoint after starting from it (then from the latest checkpoint):
    /// for a savepoint named in a deployment's pod arguments, which a pod
    /// restart must not go back to. `{member}` stands for the member name;
    /// text after '#' makes a new start from the same savepoint.
    #[arg(long, conflicts_with_all = ["fresh", "from_savepoint"])]
    initial_savepoint: Option<String>,
    /// Subtasks per node, in place of the pipeline file's `parallelism`
    /// (nodes that set their own keep it).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    parallelism: Option<u16>,
    /// This process's name among the processes of a Kafka pipeline sharing
    /// one checkpoint storage (default: $VIGIL_MEMBER, else the host name);
    /// it names the process's checkpoints, so it must stay the same across
    /// restarts and differ between processes.
    #[arg(long)]
    member: Option<String>,
    /// Start from nothing, ignoring (and replacing) existing checkpoints.
    #[arg(long)]
    fresh: bool,
    /// Give up after this many failures in a row with no checkpoint
    /// completing in between (0: never restart).
    #[arg(long, default_value_t = 5)]
    max_restarts: u32,
    /// After the input ends, keep serving the HTTP API until stopped.
    #[arg(long)]
    keep_serving: bool,
    /// Serve the HTTP API on this address, or `off`: /metrics
    /// (Prometheus), /health and /ready (probes), /v1/pipeline, the read
    /// models, checkpoints and savepoints.
    #[arg(long, default_value = "127.0.0.1:8686")]
    http: String,
    /// `/ready` turns false when a source has not come back for input this
    /// long (its output is full, or its read hangs).
    #[arg(long, value_parser = humantime_duration, default_value = "30s")]
    stall_timeout: Duration,
    /// Run a Kafka broker inside the process (librdkafka's mock cluster) and
    /// point `${KAFKA_BROKERS}` at it, with the pipeline's topics created:
    /// for trying Kafka pipelines without a cluster. Nothing it holds
    /// outlives the process.
    #[arg(long)]
    embedded_kafka: bool,
}

fn humantime_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

fn init_logs(cli: &Cli) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&cli.log_level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

enum Failure {
    Invalid(Diagnostics),
    Failed(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Failed(e)
    }
}

fn plan_file(file: &Path, options: &PlanOptions) -> Result<Plan, Failure> {
    pipeline::load(file, options).map_err(Failure::Invalid)
}

fn print_summary(plan: &Plan, s: &Summary) {
    eprintln!(
        "{}: {} events in {:.1}s ({:.0} events/s), {} records out, {} dead letters, {} late{}",
        plan.name,
        s.events_in,
        s.elapsed.as_secs_f64(),
        s.rate(),
        s.records_out,
        s.dead_letters,
        s.late,
        if s.stopped { " (stopped)" } else { "" }
    );
    if s.restarts > 0 || s.checkpoints.failed > 0 {
        eprintln!(
            "restarts {}, checkpoints completed {}, failed {}{}",
            s.restarts,
            s.checkpoints.completed,
            s.checkpoints.failed,
            s.checkpoints
                .last_failure
                .as_ref()
                .map(|f| format!(" (last: {f})"))
                .unwrap_or_default()
        );
    }
    for line in vigil::run::latency_lines(&s.latency) {
        eprintln!("{line}");
    }
    if s.dead_letters > 0 {
        let classes: Vec<String> = s
            .dead_letters_by_error
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        eprintln!("dead letters by error: {}", classes.join(", "));
        if let Some(p) = &plan.default_dead_letters {
            eprintln!("dead letters written to {}", p.display());
        }
    }
}

/// The checkpoint store of `plan` for `args`; `default` is the command's
/// default location (None: in memory).
fn checkpoint_store(
    plan: &Plan,
    args: &RunArgs,
    default: Option<&str>,
) -> Result<Option<vigil_engine::CheckpointStore>, Failure> {
    let location = match args.checkpoints.as_deref().or(default) {
        None | Some("off") => return Ok(None),
        Some(l) => l,
    };
    let at = format!("{}/{}", location.trim_end_matches('/'), plan.name);
    let store = vigil_engine::CheckpointStore::open(&at, args.retain)
        .with_context(|| format!("cannot open checkpoint storage {at}"))?;
    Ok(Some(store))
}

fn run_plan(plan: Plan, args: &RunArgs) -> Result<(), Failure> {
    run_plan_with(plan, args, None)
}

fn run_plan_with(plan: Plan, args: &RunArgs, default_store: Option<&str>) -> Result<(), Failure> {
    let progress = match args.progress.as_str() {
        "auto" => Progress::detect(),
        "live" => Progress::Live,
        "lines" => Progress::Lines,
        "off" => Progress::Off,
        other => {
            return Err(Failure::Failed(anyhow::anyhow!(
                "unknown --progress {other:?}: use auto, live, lines or off"
            )))
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    let http = match args.http.as_str() {
        "off" => None,
        a => Some(a.parse().map_err(|e| {
            Failure::Failed(anyhow::anyhow!(
                "--http {a:?} is not an address (127.0.0.1:8686) or off: {e}"
            ))
        })?),
    };
    let checkpoints = checkpoint_store(&plan, args, default_store)?;
    let restore = match (&args.from_savepoint, &args.initial_savepoint, args.fresh) {
        (Some(name), _, _) => Restore::Savepoint(name.clone()),
        (None, Some(name), _) => Restore::InitialSavepoint(name.clone()),
        (None, None, true) => Restore::Fresh,
        (None, None, false) => Restore::Latest,
    };
    let member = args
        .member
        .clone()
        .or_else(|| std::env::var("VIGIL_MEMBER").ok().filter(|m| !m.is_empty()));
    if let (Some(store), Restore::Fresh) = (&checkpoints, &restore) {
        // A Kafka pipeline's process keeps its checkpoints under its member name.
        let store = if plan.kafka_sources.is_empty() {
            store.clone()
        } else {
            store
                .for_member(
                    &member
                        .clone()
                        .unwrap_or_else(vigil::members::default_member),
                )
                .context("--member")?
        };
        runtime
            .block_on(store.clear())
            .with_context(|| format!("cannot clear {}", store.location()))?;
    }
    if let Some(store) = &checkpoints {
        tracing::info!(storage = store.location(), every = %humantime::format_duration(args.checkpoint_interval), "checkpoints");
    }
    let options = RunOptions {
        progress,
        member,
        duration: args.duration,
        checkpoint_interval: Some(args.checkpoint_interval),
        checkpoints,
        restore,
        restarts: RestartPolicy {
            max_failures: args.max_restarts,
            ..RestartPolicy::default()
        },
        http,
        keep_serving: args.keep_serving,
        stall_timeout: args.stall_timeout,
        ..RunOptions::default()
    };
    tracing::info!(pipeline = %plan.name, "starting");
    let summary = runtime
        .block_on(run(&plan, options))
        .with_context(|| format!("pipeline {} failed", plan.name))?;
    print_summary(&plan, &summary);
    Ok(())
}

/// Asks the pipeline serving `http` for a savepoint called `name`.
#[allow(clippy::disallowed_methods)] // the age of leases, for people
fn status(file: &Path, checkpoints: &str, json: bool) -> Result<(), Failure> {
    let plan = plan_file(file, &PlanOptions::default())?;
    if plan.kafka_sources.is_empty() {
        return Err(Failure::Failed(anyhow::anyhow!(
            "pipeline {:?} reads no Kafka topics: its processes share no partitions",
            plan.name
        )));
    }
    let at = format!("{}/{}", checkpoints.trim_end_matches('/'), plan.name);
    // A local directory that does not exist holds no leases; opening it
    // would create it, and a status query changes nothing.
    let leases = if !at.contains("://") && !Path::new(&at).exists() {
        Vec::new()
    } else {
        let store = vigil_engine::CheckpointStore::open(&at, 1)
            .with_context(|| format!("cannot open checkpoint storage {at}"))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the tokio runtime")?;
        runtime
            .block_on(vigil::members::leases(&store))
            .with_context(|| format!("cannot read the leases in {at}"))?
    };
    let now = vigil_engine::Clock::now_ms(&vigil_engine::SystemClock);
    // A broker that does not answer is reported per source: the leases
    // are worth printing without it.
    let groups: Vec<(String, Result<vigil_connectors::kafka::GroupStatus, String>)> = plan
        .kafka_sources
        .iter()
        .map(|(name, source)| {
            (
                name.clone(),
                source
                    .group_status(Duration::from_secs(10))
                    .map_err(|e| e.to_string()),
            )
        })
        .collect();
    if json {
        let sources: Vec<serde_json::Value> = groups
            .iter()
            .map(|(name, g)| match g {
                Ok(g) => serde_json::json!({ "source": name, "group": g }),
                Err(e) => serde_json::json!({ "source": name, "error": e }),
            })
            .collect();
        let processes: Vec<serde_json::Value> = leases
            .iter()
            .map(|l| serde_json::json!({ "live": l.live(now), "lease": l }))
            .collect();
        let out = serde_json::json!({
            "pipeline": plan.name,
            "definition": plan.definition,
            "processes": processes,
            "sources": sources,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&out).context("cannot encode the status")?
        );
        return Ok(());
    }
    println!("pipeline {} (definition {})", plan.name, plan.definition);
    println!("processes (leases in {at})");
    if leases.is_empty() {
        println!("  none");
    }
    for l in &leases {
        let age = (now - l.updated_ms).max(0) / 1000;
        let state = if !l.live(now) {
            format!("GONE (lease {age} s old)")
        } else if l.definition != plan.definition {
            format!("ANOTHER DEFINITION {}", l.definition)
        } else {
            format!("live (renewed {age} s ago)")
        };
        println!(
            "  {} pid {} on {}{}: {state}",
            l.member,
            l.pid,
            l.host,
            l.http
                .as_deref()
                .map(|h| format!(" http {h}"))
                .unwrap_or_default()
        );
        for p in &l.partitions {
            println!(
                "    {} [{}] {}/{}  lag {}",
                p.source,
                p.subtask,
                p.topic,
                p.partition,
                p.lag.map_or("-".to_string(), |l| l.to_string())
            );
        }
    }
    for (name, g) in &groups {
        let g = match g {
            Ok(g) => g,
            Err(e) => {
                println!("source {name}: {e}");
                continue;
            }
        };
        println!(
            "source {name}: group {} ({}), {} member(s)",
            g.group,
            if g.state.is_empty() {
                "the broker describes no members"
            } else {
                &g.state
            },
            g.members.len()
        );
        let position = |p: &vigil_connectors::kafka::PartitionStatus| {
            let show = |o: Option<i64>| o.map_or("-".to_string(), |o| o.to_string());
            format!(
                "    {}/{}  committed {}  end {}  lag {}",
                p.topic,
                p.partition,
                show(p.committed),
                show(p.end),
                show(p.lag)
            )
        };
        for m in &g.members {
            let other = match (
                &m.definition,
                m.definition.as_deref() == Some(&plan.definition),
            ) {
                (Some(_), true) => "",
                (Some(_), false) => "  [ANOTHER DEFINITION]",
                (None, _) => "  [not a Vigil consumer]",
            };
            println!("  {} on {}{other}", m.client_id, m.host);
            println!("    member {}", m.member);
            for p in &m.partitions {
                println!("{}", position(p));
            }
        }
        if !g.unassigned.is_empty() {
            println!(
                "  {}",
                if g.members.is_empty() {
                    "partitions (no owner known to the broker)"
                } else {
                    "unassigned"
                }
            );
            for p in &g.unassigned {
                println!("{}", position(p));
            }
        }
    }
    Ok(())
}

fn take_savepoint(name: &str, http: &str) -> Result<(), Failure> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    let url = format!("http://{http}/v1/savepoints");
    let (status, body) = runtime.block_on(async {
        let response = reqwest::Client::new()
            .post(&url)
            .query(&[("name", name)])
            .send()
            .await
            .with_context(|| format!("no pipeline answers on {http}"))?;
        let status = response.status();
        let body = response.text().await.context("cannot read the answer")?;
        anyhow::Ok((status, body))
    })?;
    if !status.is_success() {
        let reason = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or(body);
        return Err(Failure::Failed(anyhow::anyhow!(
            "savepoint {name:?} not taken: {reason}"
        )));
    }
    println!("{body}");
    Ok(())
}

fn operator(command: &OperatorCommand) -> Result<(), Failure> {
    match command {
        OperatorCommand::Crd => {
            print!("{}", vigil_kubernetes::resource::crd_yaml().context("CRD")?);
            Ok(())
        }
        OperatorCommand::Render { file } => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let vp: vigil_kubernetes::VigilPipeline = serde_saphyr::from_str(&text)
                .with_context(|| format!("{} is not a VigilPipeline", file.display()))?;
            let children =
                vigil_kubernetes::controller::render_offline(&vp, &vigil::operator::validator())
                    .with_context(|| file.display().to_string())?;
            print!(
                "{}",
                vigil_kubernetes::render::to_yaml(&children).context("YAML")?
            );
            Ok(())
        }
        OperatorCommand::Run {
            namespace,
            metrics,
            leader_election,
            lease_namespace,
            lease_name,
            identity,
            pod_address,
            api_server,
        } => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("cannot start the tokio runtime")?;
            let metrics = match metrics.as_str() {
                "off" => None,
                a => Some(a.parse().with_context(|| format!("--metrics {a:?}"))?),
            };
            let identity = identity
                .clone()
                .unwrap_or_else(vigil::members::default_member);
            let options = vigil_kubernetes::Options {
                namespace: namespace.clone(),
                pod_address: vigil_kubernetes::admin::PodAddress::Template(pod_address.clone()),
                metrics,
                leader: leader_election
                    .then(|| (lease_namespace.clone(), lease_name.clone(), identity)),
                ..vigil_kubernetes::Options::default()
            };
            runtime.block_on(async {
                let config = match api_server {
                    Some(url) => kube::Config::new(
                        url.parse()
                            .with_context(|| format!("--api-server {url:?} is not a URL"))?,
                    ),
                    None => kube::Config::infer()
                        .await
                        .context("no Kubernetes API to talk to (in-cluster or kubeconfig)")?,
                };
                let client = kube::Client::try_from(config).context("Kubernetes client")?;
                vigil_kubernetes::run(client, vigil::operator::validator(), options)
                    .await
                    .context("operator")?;
                anyhow::Ok(())
            })?;
            Ok(())
        }
    }
}

fn options(run: &RunArgs) -> PlanOptions {
    PlanOptions {
        dead_letter_dir: run.dead_letter_dir.clone(),
        parallelism: run.parallelism.map(usize::from),
        ..PlanOptions::default()
    }
}

fn execute(cli: &Cli) -> Result<(), Failure> {
    match &cli.command {
        Command::Validate { file } => {
            let plan = plan_file(file, &PlanOptions::default())?;
            println!(
                "{}: pipeline {:?} is valid ({} nodes)",
                file.display(),
                plan.name,
                plan.graph.nodes().len()
            );
            Ok(())
        }
        Command::Explain { file } => {
            let plan = plan_file(file, &PlanOptions::default())?;
            println!("pipeline {}", plan.name);
            print!("{}", plan.graph.explain());
            Ok(())
        }
        Command::Status {
            file,
            checkpoints,
            json,
        } => status(file, checkpoints, *json),
        Command::Run { file, run } if run.embedded_kafka => {
            let cluster = rdkafka::mocking::MockCluster::new(1)
                .context("cannot start the embedded Kafka broker")?;
            let brokers = cluster.bootstrap_servers();
            let mut opts = options(run);
            let at = brokers.clone();
            opts.env = Arc::new(move |name: &str| match name {
                "KAFKA_BROKERS" => Some(at.clone()),
                _ => pipeline::process_env(name),
            });
            let plan = plan_file(file, &opts)?;
            for t in &plan.kafka_topics {
                cluster
                    .create_topic(t, 4, 1)
                    .with_context(|| format!("cannot create topic {t} on the embedded broker"))?;
            }
            eprintln!(
                "embedded Kafka broker at {brokers} with topics {}",
                plan.kafka_topics.join(", ")
            );
            run_plan_with(plan, run, Some(DEFAULT_CHECKPOINTS))
        }
        Command::Run { file, run } => run_plan_with(
            plan_file(file, &options(run))?,
            run,
            Some(DEFAULT_CHECKPOINTS),
        ),
        Command::Savepoint { name, http } => take_savepoint(name, http),
        Command::Operator { command } => operator(command),
        Command::Sql {
            query,
            file,
            pipeline,
            allowed_lateness,
            json,
            cross_tenant,
            explain,
            run,
        } => {
            let script = match (query, file) {
                (Some(q), None) => q.clone(),
                (None, Some(f)) => std::fs::read_to_string(f)
                    .with_context(|| format!("cannot read {}", f.display()))?,
                _ => {
                    return Err(Failure::Failed(anyhow::anyhow!(
                        "give the query as an argument or with --file, not both"
                    )))
                }
            };
            let pipeline_text = pipeline
                .as_ref()
                .map(|p| {
                    std::fs::read_to_string(p)
                        .with_context(|| format!("cannot read {}", p.display()))
                        .map(|t| (p.display().to_string(), t))
                })
                .transpose()?;
            let request = pipeline::query::QueryRequest {
                script: &script,
                pipeline: pipeline_text
                    .as_ref()
                    .map(|(f, t)| (f.as_str(), t.as_str())),
                allowed_lateness: *allowed_lateness,
                json: *json,
                cross_tenant: *cross_tenant,
            };
            let plan = pipeline::query::plan_query_script(&request, &options(run))
                .map_err(Failure::Invalid)?;
            if *explain {
                println!("pipeline {}", plan.name);
                print!("{}", plan.graph.explain());
                return Ok(());
            }
            run_plan(plan, run)
        }
        Command::Demo { run } => {
            let plan =
                pipeline::load_str("pipelines/demo.yaml", vigil::DEMO_PIPELINE, &options(run))
                    .map_err(Failure::Invalid)?;
            run_plan(plan, run)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(&cli);
    match execute(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Invalid(d)) => {
            eprintln!("{d}");
            ExitCode::from(2)
        }
        Err(Failure::Failed(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
