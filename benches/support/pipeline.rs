//! Running pipeline files from a benchmark: on one core, without progress
//! output or checkpoints.

use vigil::pipeline::Plan;
use vigil::run::{run, Progress, RunOptions};

/// A current-thread runtime: everything a benchmark runs shares one core.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Runs `plan` to its end on a runtime of its own.
pub fn run_plan(plan: &Plan) {
    run_plan_metrics(plan, true)
}

/// [`run_plan`], with the engine's detailed metrics (busy time, bytes,
/// state sizes, latency markers and histograms) on or off.
pub fn run_plan_metrics(plan: &Plan, detailed_metrics: bool) {
    runtime().block_on(async {
        run(
            plan,
            RunOptions {
                progress: Progress::Off,
                checkpoint_interval: None,
                detailed_metrics,
                ..RunOptions::default()
            },
        )
        .await
        .expect("runs")
    });
}
