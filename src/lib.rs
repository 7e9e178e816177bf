//! Vigil: event-time stream processing for security telemetry.
//!
//! This crate is the `vigil` command and the glue it needs: [`pipeline`]
//! turns pipeline files into dataflow graphs (checking everything before
//! anything starts), [`run`] runs a graph while reporting progress,
//! [`observe`] says whether it is ready and how it is doing, [`http`]
//! serves that, its metrics and its read models while it runs, and
//! [`members`] lets the processes of one pipeline see each other, and
//! [`operator`] gives the Kubernetes operator the planner's checks. The
//! runtime itself is `vigil-engine`; sources and sinks are
//! `vigil-connectors`; transforms and detections are `vigil-operators`.

pub mod http;
pub mod members;
pub mod observe;
pub mod operator;
pub mod pipeline;
pub mod run;

/// The demo pipeline shipped in `pipelines/demo.yaml`, embedded so that
/// `vigil demo` works from any directory.
pub const DEMO_PIPELINE: &str = include_str!("../pipelines/demo.yaml");
