//! The Vigil Kubernetes operator: the `VigilPipeline` custom resource and
//! the controller that deploys it.
//!
//! A `VigilPipeline` names a pipeline file, the image, the pods and how a
//! change reaches them. The controller renders a ConfigMap (the validated
//! file), a headless Service (metrics, health, read models) and a
//! StatefulSet (stable pod names are the processes' member names, and a
//! volume per pod keeps its checkpoints), all owned by the resource. It is
//! level-triggered: every reconcile compares what should run with what
//! does, writes only what differs, and records what it did in `status`, so
//! a restarted or newly elected operator carries on where the last stopped.
//! Savepoints go through the running pods' own admin HTTP API, as `vigil
//! savepoint` does; the controller never reads checkpoint storage itself.
//!
//! The pipeline file is validated by the same function as `vigil validate`,
//! handed in by the `vigil` binary ([`controller::Validator`]), so this
//! crate does not depend on the planner.

pub mod admin;
pub mod controller;
pub mod leader;
pub mod render;
pub mod resource;

pub use controller::{pod_env, reconcile, run, Context, Options, PodEnv, Validator};
pub use resource::{VigilPipeline, VigilPipelineSpec, VigilPipelineStatus};

/// What can go wrong in the operator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Kubernetes API refused or failed a request.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The resource cannot be deployed as it is; the message says why, and
    /// it is on the resource's `Degraded` condition.
    #[error("{reason}: {message}")]
    Invalid {
        /// CamelCase reason of the condition.
        reason: &'static str,
        /// For people.
        message: String,
    },
    /// A running pipeline's admin API refused or failed a request.
    #[error("pipeline admin API: {0}")]
    Admin(String),
    /// YAML could not be written.
    #[error("YAML: {0}")]
    Yaml(String),
    /// The leader lease was lost or could not be kept.
    #[error("leader election: {0}")]
    Leader(String),
    /// The operator's own HTTP endpoint or metrics failed.
    #[error("{0}")]
    Io(String),
}
