//! What the Kubernetes operator (`vigil operator`, crate
//! `vigil-kubernetes`) takes from the planner: the check of a pipeline
//! file, the same as `vigil validate`'s, handed to the controller so the
//! operator crate need not depend on the planner.

use std::sync::Arc;

use crate::pipeline::{self, PlanOptions};

/// Plans the file with the pod's environment and gives its diagnostics
/// (`file:line:column: ...`) if it is invalid.
pub fn validator() -> vigil_kubernetes::Validator {
    Arc::new(|file: &str, text: &str, env: vigil_kubernetes::PodEnv| {
        let opts = PlanOptions {
            env: Arc::new(move |name: &str| env(name)),
            dead_letter_dir: std::env::temp_dir(),
            ..PlanOptions::default()
        };
        pipeline::load_str(file, text, &opts)
            .map(|_| ())
            .map_err(|d| d.to_string())
    })
}
