//! Pipeline files: what users write, how it is checked, and how it becomes a
//! dataflow graph.
//!
//! Loading goes through four steps, each of which can only fail with a
//! [`Diagnostic`] that names the file, line and column:
//!
//! 1. [`env`]: `${VAR}` substitution in the raw text;
//! 2. YAML parsing into a tree that remembers where every node came from;
//! 3. [`spec`]: typed configuration of every source, transform and sink,
//!    unknown keys rejected with a near-miss suggestion;
//! 4. [`plan`]: references resolved, cycles rejected, every connector and
//!    operator built against its input schema (expressions compiled, columns
//!    checked), producing the engine [`Graph`](vigil_engine::Graph).
//!
//! Nothing runs until all four have succeeded, so a bad file never starts
//! half a pipeline. [`query`] builds the pipeline of `vigil sql` the same way.

pub mod diagnostic;
pub mod env;
pub mod fingerprint;
pub mod plan;
pub mod query;
pub mod rekey;
pub mod spec;
mod yaml;

pub use diagnostic::{Diagnostic, Diagnostics};
pub use env::process_env;
pub use plan::{Plan, PlanOptions};
pub use spec::PipelineSpec;

/// Loads, checks and plans a pipeline file in one go.
pub fn load(path: &std::path::Path, options: &PlanOptions) -> Result<Plan, Diagnostics> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Diagnostics::from(Diagnostic::new(
            path.display().to_string(),
            None,
            format!("cannot read pipeline file: {e}"),
        ))
    })?;
    load_str(&path.display().to_string(), &text, options)
}

/// Loads a pipeline from text; `file` names it in diagnostics.
pub fn load_str(file: &str, text: &str, options: &PlanOptions) -> Result<Plan, Diagnostics> {
    let spec = PipelineSpec::parse(file, text, &*options.env)?;
    plan::build(&spec, options)
}
