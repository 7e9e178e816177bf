//! Integration tests: real pipeline files, real operators, real sources and
//! sinks, run by the real runtime. One test binary (each links DataFusion).

mod backpressure;
mod demo;
mod kafka;
mod pipeline_errors;
mod runtime;
mod sensor_files;
mod tansu;

use std::collections::HashMap;
use std::sync::Arc;

use vigil::pipeline::PlanOptions;

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
