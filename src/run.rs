//! Running a planned pipeline: progress while it runs, a summary when it ends.
//!
//! Progress goes to stderr, so stdout stays clean for the pipeline's own
//! output: on a terminal, one status line rewritten in place every second;
//! otherwise, a plain log line every ten seconds. Both read the engine's
//! counters; nothing here touches the data path.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vigil_engine::{
    start, EngineError, MetricsRegistry, NodeRole, RuntimeOptions, SharedClock, SystemClock,
};

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

/// How to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Progress display.
    pub progress: Progress,
    /// Stop after this long (endless sources run until stopped otherwise).
    pub duration: Option<Duration>,
    /// Wall clock.
    pub clock: SharedClock,
    /// Channel capacity in batches.
    pub channel_capacity: usize,
    /// Take a checkpoint this often; completed checkpoints are when Kafka
    /// offsets are committed.
    pub checkpoint_interval: Option<Duration>,
    /// Where to serve the read models over HTTP, when the pipeline has any.
    pub http: Option<std::net::SocketAddr>,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            progress: Progress::detect(),
            duration: None,
            clock: Arc::new(SystemClock),
            channel_capacity: RuntimeOptions::default().channel_capacity,
            checkpoint_interval: Some(Duration::from_secs(10)),
            http: None,
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
    }
}

fn status_line(s: &Snapshot, rate: f64, elapsed: Duration, now_ms: i64) -> String {
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
    format!(
        "{:>6.1}s | in {} ({}/s) | out {} | dead letters {} | late {} | {}",
        elapsed.as_secs_f64(),
        human(s.events_in as f64),
        human(rate),
        s.out,
        s.dead,
        s.late,
        wm
    )
}

/// Runs `plan` to completion (or until `options.duration` passes, or Ctrl-C).
#[allow(clippy::disallowed_methods)] // elapsed time and rates for people, outside the data path
pub async fn run(plan: &Plan, options: RunOptions) -> Result<Summary, EngineError> {
    let runtime = RuntimeOptions {
        channel_capacity: options.channel_capacity,
        clock: options.clock.clone(),
        checkpoint_interval: options.checkpoint_interval,
        ..RuntimeOptions::default()
    };
    // Bound first, so a port in use stops the run before anything starts.
    let listener = match options.http.filter(|_| !plan.read_models.is_empty()) {
        Some(addr) => {
            let l = crate::http::bind(addr)
                .await
                .map_err(|e| EngineError::io(format!("cannot serve read models on {addr}"), e))?;
            let at = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
            tracing::info!(address = %at, models = ?plan.read_models.names(), "read models served on http://{at}/v1/read-models");
            Some(l)
        }
        None => None,
    };
    let serving = listener.is_some();
    let server = async {
        match listener {
            Some(l) => crate::http::serve(l, plan.read_models.clone()).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(server);
    let running = start(&plan.graph, runtime)?;
    let metrics = running.metrics();
    let stop = running.stop_handle();
    let started = Instant::now();
    let wait = running.wait();
    tokio::pin!(wait);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let deadline = options.duration.map(|d| tokio::time::Instant::now() + d);
    let mut stopped = false;
    let mut last_in = 0u64;
    let mut last_at = Instant::now();
    let mut last_line = Instant::now();
    let result = loop {
        tokio::select! {
            r = &mut wait => break r,
            r = &mut server, if serving => {
                if let Err(e) = r {
                    stop.stop();
                    break Err(EngineError::io("the read-model API stopped", e));
                }
            }
            _ = tick.tick() => {
                let s = snapshot(&metrics, &plan.sinks);
                let dt = last_at.elapsed().as_secs_f64().max(1e-3);
                let rate = (s.events_in - last_in) as f64 / dt;
                last_in = s.events_in;
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
            _ = tokio::signal::ctrl_c(), if !stopped => {
                stopped = true;
                stop.stop();
            }
        }
    };
    if options.progress == Progress::Live {
        eprintln!();
    }
    result?;
    let s = snapshot(&metrics, &plan.sinks);
    Ok(Summary {
        elapsed: started.elapsed(),
        events_in: s.events_in,
        records_out: s.out,
        dead_letters: s.dead,
        dead_letters_by_error: metrics.dead_letters_by_error(),
        late: s.late,
        stopped,
    })
}
