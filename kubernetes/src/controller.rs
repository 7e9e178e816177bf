//! The controller: reconciles each `VigilPipeline` with its children.
//!
//! Every reconcile reads the resource, its StatefulSet and its own status,
//! and takes at most one step toward what the spec asks for, recording it
//! in status before the next: deploy, upgrade (with a savepoint first in
//! `savepoint` mode), roll back an upgrade that missed its deadline,
//! suspend with a savepoint, resume from it, take a savepoint on demand,
//! and take a final one before the resource goes. Status is written with
//! the resourceVersion it was read at, so a step is never recorded on top
//! of another process's; a conflict just means another reconcile.
//!
//! Bad input never reaches the pods: the spec and the pipeline file are
//! checked first (the file by the same validator as `vigil validate`), and
//! a problem becomes the `Degraded` condition and a Warning event while
//! the running version stays as it is. Failed reconciles are retried with
//! exponential backoff per resource, from 5 s up to 5 minutes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use parking_lot::Mutex;
use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry};

use crate::admin::{Admin, PodAddress};
use crate::render::{self, Shape};
use crate::resource::{
    CheckpointInfo, Condition, Deployed, DesiredState, SavepointInfo, Upgrade, UpgradeMode,
    VigilPipeline, VigilPipelineSpec, VigilPipelineStatus,
};
use crate::Error;

/// The finalizer that holds a resource until its final savepoint.
pub const FINALIZER: &str = "vigil.dev/final-savepoint";

/// Checks a pipeline file as `vigil validate` does: `(where, text, env)`
/// gives the diagnostics (`file:line:column: ...`) if it is invalid. `env`
/// answers `${VAR}` as the pod's environment will.
pub type Validator = Arc<dyn Fn(&str, &str, PodEnv) -> Result<(), String> + Send + Sync>;

/// `${VAR}` as a pod will see it.
pub type PodEnv = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// How the operator runs.
#[derive(Clone)]
pub struct Options {
    /// Watch only this namespace (default: all).
    pub namespace: Option<String>,
    /// How to reach a pod's API.
    pub pod_address: PodAddress,
    /// Where to serve `/metrics` and `/healthz` (none: nowhere).
    pub metrics: Option<SocketAddr>,
    /// Lease to hold before reconciling: namespace, name and identity.
    pub leader: Option<(String, String, String)>,
    /// How long the lease lasts unrenewed.
    pub lease_duration: Duration,
    /// How often a resource that is changing is looked at again.
    pub poll: Duration,
    /// How often a resource at rest is looked at again (checkpoint status).
    pub resync: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            namespace: None,
            pod_address: PodAddress::default(),
            metrics: None,
            leader: None,
            lease_duration: Duration::from_secs(15),
            poll: Duration::from_secs(5),
            resync: Duration::from_secs(30),
        }
    }
}

/// The operator's own Prometheus metrics.
pub struct Metrics {
    /// Where they are registered.
    pub registry: Registry,
    reconciles: IntCounterVec,
    errors: IntCounterVec,
    duration: Histogram,
    savepoints: IntCounterVec,
    leader: IntGauge,
}

impl Metrics {
    fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let reconciles = IntCounterVec::new(
            Opts::new("vigil_operator_reconciles_total", "Reconciles, by result"),
            &["result"],
        )?;
        let errors = IntCounterVec::new(
            Opts::new(
                "vigil_operator_reconcile_errors_total",
                "Failed reconciles, by reason",
            ),
            &["reason"],
        )?;
        let duration = Histogram::with_opts(
            HistogramOpts::new(
                "vigil_operator_reconcile_duration_seconds",
                "Time a reconcile takes (savepoints included)",
            )
            .buckets(vec![0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0]),
        )?;
        let savepoints = IntCounterVec::new(
            Opts::new(
                "vigil_operator_savepoints_total",
                "Savepoints asked of pipelines, by reason and result",
            ),
            &["reason", "result"],
        )?;
        let leader = IntGauge::new(
            "vigil_operator_leader",
            "1 while this replica holds the leader lease",
        )?;
        registry.register(Box::new(reconciles.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(savepoints.clone()))?;
        registry.register(Box::new(leader.clone()))?;
        Ok(Self {
            registry,
            reconciles,
            errors,
            duration,
            savepoints,
            leader,
        })
    }

    /// Prometheus text.
    pub fn text(&self) -> String {
        let encoder = prometheus::TextEncoder::new();
        encoder
            .encode_to_string(&self.registry.gather())
            .unwrap_or_default()
    }
}

/// What every reconcile shares.
pub struct Context {
    client: Client,
    validator: Validator,
    admin: Admin,
    options: Options,
    reporter: Reporter,
    /// Failed reconciles in a row, per resource: the backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// The operator's metrics.
    pub metrics: Metrics,
}

impl Context {
    /// A context for reconciling through `client`.
    pub fn new(client: Client, validator: Validator, options: Options) -> Result<Self, Error> {
        let instance = options.leader.as_ref().map(|(_, _, id)| id.clone());
        Ok(Self {
            client,
            validator,
            admin: Admin::default(),
            options,
            reporter: Reporter {
                controller: "vigil-operator".to_string(),
                instance,
            },
            failures: Mutex::new(HashMap::new()),
            metrics: Metrics::new().map_err(|e| Error::Io(format!("metrics: {e}")))?,
        })
    }
}

/// The spec as it should run.
struct Desired {
    view: serde_json::Value,
    pipeline: String,
    hash: String,
    deadline: Duration,
}

fn now() -> Timestamp {
    Timestamp::now()
}

fn invalid(reason: &'static str, message: impl Into<String>) -> Error {
    Error::Invalid {
        reason,
        message: message.into(),
    }
}

/// Checks the spec and the pipeline file, and hashes what the pods run.
async fn resolve(vp: &VigilPipeline, ctx: &Context) -> Result<Desired, Error> {
    let spec = &vp.spec;
    let ns = vp.namespace().unwrap_or_default();
    let deadline = check_spec(spec)?;
    let (label, text) = match (&spec.pipeline.inline, &spec.pipeline.config_map_ref) {
        (None, Some(r)) => {
            let maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
            let map = maps.get_opt(&r.name).await?.ok_or_else(|| {
                invalid(
                    "ConfigMapNotFound",
                    format!(
                        "spec.pipeline.configMapRef: ConfigMap {ns}/{} does not exist",
                        r.name
                    ),
                )
            })?;
            let text = map
                .data
                .as_ref()
                .and_then(|d| d.get(&r.key))
                .cloned()
                .ok_or_else(|| {
                    invalid(
                        "ConfigMapNotFound",
                        format!(
                            "spec.pipeline.configMapRef: ConfigMap {ns}/{} has no key {:?}",
                            r.name, r.key
                        ),
                    )
                })?;
            (format!("configmap/{}/{}", r.name, r.key), text)
        }
        _ => (
            format!("VigilPipeline {ns}/{}: spec.pipeline.inline", vp.name_any()),
            inline(spec)?.to_string(),
        ),
    };
    desired(spec, &label, text, deadline, &ctx.validator)
}

/// The inline pipeline file, or why there is none.
fn inline(spec: &VigilPipelineSpec) -> Result<&str, Error> {
    match (&spec.pipeline.inline, &spec.pipeline.config_map_ref) {
        (Some(_), Some(_)) => Err(invalid(
            "InvalidSpec",
            "spec.pipeline: give inline or configMapRef, not both",
        )),
        (None, None) => Err(invalid(
            "MissingPipeline",
            "spec.pipeline: give the pipeline file inline or as a configMapRef",
        )),
        (Some(text), None) => Ok(text),
        (None, Some(_)) => Err(invalid(
            "InvalidSpec",
            "spec.pipeline.configMapRef is read from the cluster; give the file inline here",
        )),
    }
}

/// Validates `text` and hashes it with the spec.
fn desired(
    spec: &VigilPipelineSpec,
    label: &str,
    text: String,
    deadline: Duration,
    validator: &Validator,
) -> Result<Desired, Error> {
    validator(label, &text, pod_env(spec)).map_err(|d| invalid("InvalidPipeline", d))?;
    let view = spec.deployment_view();
    let mut hashed = serde_json::to_vec(&view).unwrap_or_default();
    hashed.extend_from_slice(text.as_bytes());
    Ok(Desired {
        hash: render::hash(&hashed),
        view,
        pipeline: text,
        deadline,
    })
}

/// What `vigil operator render` prints: the children of `vp` as the
/// controller would first deploy them, after the same checks. The pipeline
/// must be inline (a ConfigMap is read from the cluster).
pub fn render_offline(
    vp: &VigilPipeline,
    validator: &Validator,
) -> Result<render::Children, Error> {
    let spec = &vp.spec;
    let deadline = check_spec(spec)?;
    let name = vp.name_any();
    let ns = vp.namespace().unwrap_or_else(|| "default".to_string());
    let label = format!("VigilPipeline {ns}/{name}: spec.pipeline.inline");
    let d = desired(spec, &label, inline(spec)?.to_string(), deadline, validator)?;
    let mut owner = vp.controller_owner_ref(&()).unwrap_or_default();
    if owner.uid.is_empty() {
        // Not created yet: the API server gives the uid.
        owner = k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
            api_version: "vigil.dev/v1alpha1".to_string(),
            kind: "VigilPipeline".to_string(),
            name: name.clone(),
            uid: "00000000-0000-0000-0000-000000000000".to_string(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        };
    }
    Ok(render::render(&Shape {
        name: &name,
        namespace: &ns,
        owner,
        spec,
        hash: &d.hash,
        pipeline: &d.pipeline,
        savepoint: None,
        epoch: 0,
        replicas: if spec.state == DesiredState::Suspended {
            0
        } else {
            spec.replicas
        },
    }))
}

/// The checks of the spec that need nothing but the spec; gives the
/// upgrade deadline.
fn check_spec(spec: &VigilPipelineSpec) -> Result<Duration, Error> {
    if let UpgradeMode::Unknown(m) = &spec.upgrade_mode {
        return Err(invalid(
            "InvalidSpec",
            format!(
                "spec.upgradeMode {m:?}: use one of {}",
                UpgradeMode::ALLOWED.join(", ")
            ),
        ));
    }
    if let DesiredState::Unknown(s) = &spec.state {
        return Err(invalid(
            "InvalidSpec",
            format!(
                "spec.state {s:?}: use one of {}",
                DesiredState::ALLOWED.join(", ")
            ),
        ));
    }
    if spec.parallelism < 1 {
        return Err(invalid(
            "InvalidSpec",
            format!(
                "spec.parallelism is {}: it must be at least 1",
                spec.parallelism
            ),
        ));
    }
    if spec.replicas < 0 {
        return Err(invalid(
            "InvalidSpec",
            format!("spec.replicas is {}: it cannot be negative", spec.replicas),
        ));
    }
    if spec.replicas > 1 && spec.checkpoints.s3.is_none() {
        return Err(invalid(
            "InvalidSpec",
            format!(
                "spec.replicas is {}: pods that share a pipeline share its checkpoint storage; set spec.checkpoints.s3",
                spec.replicas
            ),
        ));
    }
    if spec.checkpoints.s3.is_some() && spec.checkpoints.volume.is_some() {
        return Err(invalid(
            "InvalidSpec",
            "spec.checkpoints: give volume or s3, not both",
        ));
    }
    if let Some(s3) = &spec.checkpoints.s3 {
        if !s3.url.starts_with("s3://") {
            return Err(invalid(
                "InvalidSpec",
                format!(
                    "spec.checkpoints.s3.url {:?}: use s3://bucket/prefix",
                    s3.url
                ),
            ));
        }
    }
    if let Some(i) = &spec.checkpoints.interval {
        humantime::parse_duration(i).map_err(|e| {
            invalid(
                "InvalidSpec",
                format!("spec.checkpoints.interval {i:?}: {e}"),
            )
        })?;
    }
    humantime::parse_duration(&spec.upgrade_deadline).map_err(|e| {
        invalid(
            "InvalidSpec",
            format!("spec.upgradeDeadline {:?}: {e}", spec.upgrade_deadline),
        )
    })
}

/// `${VAR}` as the pod will see it: values given in the spec; variables
/// filled from Secrets or ConfigMaps validate as a placeholder.
pub fn pod_env(spec: &VigilPipelineSpec) -> PodEnv {
    let mut known: HashMap<String, Option<String>> = HashMap::new();
    for e in &spec.env {
        known.insert(e.name.clone(), e.value.clone());
    }
    let open = !spec.env_from.is_empty();
    Arc::new(move |name: &str| match known.get(name) {
        Some(Some(v)) => Some(v.clone()),
        Some(None) => Some("from-secret".to_string()),
        None if name == "VIGIL_MEMBER" || name == "POD_NAMESPACE" => Some("pod".to_string()),
        None if open => Some("from-secret".to_string()),
        None => None,
    })
}

fn set_condition(
    status: &mut VigilPipelineStatus,
    generation: Option<i64>,
    type_: &str,
    value: bool,
    reason: &str,
    message: &str,
) {
    let value = if value { "True" } else { "False" };
    match status.conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            if c.status != value {
                c.last_transition_time = now().to_string();
            }
            c.status = value.to_string();
            c.reason = reason.to_string();
            c.message = message.to_string();
            c.observed_generation = generation;
        }
        None => status.conditions.push(Condition {
            type_: type_.to_string(),
            status: value.to_string(),
            reason: reason.to_string(),
            message: message.to_string(),
            last_transition_time: now().to_string(),
            observed_generation: generation,
        }),
    }
}

fn condition<'a>(status: &'a VigilPipelineStatus, type_: &str) -> Option<&'a Condition> {
    status.conditions.iter().find(|c| c.type_ == type_)
}

/// Whether `sts` runs `hash` with every pod ready.
fn rolled_out(sts: Option<&StatefulSet>, hash: &str, replicas: i32) -> bool {
    let Some(sts) = sts else {
        return false;
    };
    let runs = sts
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(render::SPEC_HASH))
        .is_some_and(|h| h == hash);
    let wanted = sts.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let Some(status) = &sts.status else {
        return false;
    };
    let observed = status.observed_generation.unwrap_or(0) >= sts.metadata.generation.unwrap_or(0);
    runs && observed
        && wanted == replicas
        && status.ready_replicas.unwrap_or(0) >= replicas
        && status.updated_replicas.unwrap_or(0) >= replicas
        && (replicas > 0 || status.replicas == 0)
}

/// The pods `deployed` asks for (`fallback` if its spec cannot be read).
fn replicas_of(deployed: &Deployed, fallback: i32) -> i32 {
    serde_json::from_value::<VigilPipelineSpec>(deployed.spec.clone())
        .map_or(fallback, |s| s.replicas)
}

/// Pods of `sts` as it is now.
fn pods_of(sts: Option<&StatefulSet>) -> i32 {
    sts.and_then(|s| s.spec.as_ref())
        .and_then(|s| s.replicas)
        .unwrap_or(0)
}

/// One reconcile's view and effects.
struct Step<'a> {
    vp: &'a VigilPipeline,
    ctx: &'a Context,
    ns: String,
    name: String,
    status: VigilPipelineStatus,
    recorder: Recorder,
}

impl Step<'_> {
    fn generation(&self) -> Option<i64> {
        self.vp.metadata.generation
    }

    fn condition(&mut self, type_: &str, value: bool, reason: &str, message: &str) {
        let generation = self.generation();
        set_condition(&mut self.status, generation, type_, value, reason, message);
    }

    async fn event(&self, warning: bool, reason: &str, note: String) {
        let event = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.to_string(),
            note: Some(note.chars().take(1000).collect()),
            action: reason.to_string(),
            secondary: None,
        };
        let reference = self.vp.object_ref(&());
        if let Err(e) = self.recorder.publish(&event, &reference).await {
            tracing::warn!(pipeline = %self.name, error = %e, "cannot publish an event");
        }
    }

    /// Writes the status if it changed, at the resourceVersion read.
    async fn save(&mut self) -> Result<(), Error> {
        self.status.observed_generation = self.generation();
        if self.vp.status.as_ref() == Some(&self.status) {
            return Ok(());
        }
        let api: Api<VigilPipeline> = Api::namespaced(self.ctx.client.clone(), &self.ns);
        let mut object = self.vp.clone();
        object.status = Some(self.status.clone());
        api.replace_status(&self.name, &PostParams::default(), &object)
            .await?;
        Ok(())
    }

    fn pod_addresses(&self, pods: i32) -> Vec<(String, String)> {
        (0..pods)
            .map(|i| {
                let pod = render::pod_name(&self.name, i);
                let address = self.ctx.options.pod_address.of(&self.ns, &self.name, &pod);
                (pod, address)
            })
            .collect()
    }

    /// Takes savepoint `base` of every pod (`<base>.<pod>`), records it,
    /// and gives the name the pods start from (`<base>.{member}`).
    async fn savepoint(&mut self, reason: &str, pods: i32) -> Result<String, Error> {
        let base = format!(
            "{reason}-{}-{}",
            self.generation().unwrap_or(0),
            now().as_second()
        );
        let mut checkpoints = Vec::new();
        for (pod, address) in self.pod_addresses(pods) {
            let name = format!("{base}.{pod}");
            match self.ctx.admin.savepoint(&address, &name).await {
                Ok(stored) => checkpoints.push(stored.checkpoint),
                Err(e) => {
                    self.ctx
                        .metrics
                        .savepoints
                        .with_label_values(&[reason, "failed"])
                        .inc();
                    return Err(e);
                }
            }
        }
        self.ctx
            .metrics
            .savepoints
            .with_label_values(&[reason, "taken"])
            .inc();
        self.status.last_savepoint = Some(SavepointInfo {
            name: format!("{base}.{{member}}"),
            reason: reason.to_string(),
            checkpoints,
            taken_at: now().to_string(),
        });
        self.event(
            false,
            "SavepointTaken",
            format!("savepoint {base} of {pods} pod(s) ({reason})"),
        )
        .await;
        Ok(format!("{base}.{{member}}"))
    }

    /// A savepoint of the `pods` running pods, if they can give one. When
    /// they are not all ready and the savepoint fails, the step goes on
    /// without one (from the latest checkpoint) and says so in an event;
    /// when they are, the failure stops the step, to be tried again.
    async fn try_savepoint(
        &mut self,
        reason: &str,
        pods: i32,
        healthy: bool,
    ) -> Result<Option<String>, Error> {
        if pods == 0 {
            return Ok(None);
        }
        match self.savepoint(reason, pods).await {
            Ok(s) => Ok(Some(s)),
            Err(e) if healthy => Err(e),
            Err(e) => {
                self.event(
                    true,
                    "NoSavepoint",
                    format!("pods are not ready and gave no {reason} savepoint ({e}): going on from the latest checkpoint"),
                )
                .await;
                Ok(None)
            }
        }
    }

    /// Writes the children of `deployed` at `replicas` pods where they
    /// differ from what is there.
    async fn apply(&self, deployed: &Deployed, replicas: i32) -> Result<bool, Error> {
        let spec: VigilPipelineSpec = serde_json::from_value(deployed.spec.clone())
            .map_err(|e| invalid("InvalidStatus", format!("status.running.spec: {e}")))?;
        let owner = self
            .vp
            .controller_owner_ref(&())
            .ok_or_else(|| invalid("InvalidSpec", "the resource has no uid yet"))?;
        let children = render::render(&Shape {
            name: &self.name,
            namespace: &self.ns,
            owner,
            spec: &spec,
            hash: &deployed.hash,
            pipeline: &deployed.pipeline,
            savepoint: deployed.savepoint.as_deref(),
            epoch: deployed.epoch,
            replicas,
        });
        let client = &self.ctx.client;
        let mut changed = apply_one(
            Api::<ConfigMap>::namespaced(client.clone(), &self.ns),
            &children.config_map,
        )
        .await?;
        changed |= apply_one(
            Api::<Service>::namespaced(client.clone(), &self.ns),
            &children.service,
        )
        .await?;
        changed |= apply_one(
            Api::<StatefulSet>::namespaced(client.clone(), &self.ns),
            &children.stateful_set,
        )
        .await?;
        Ok(changed)
    }
}

/// Creates `desired`, or replaces what is there if its rendered hash
/// differs; true if it wrote.
async fn apply_one<K>(api: Api<K>, desired: &K) -> Result<bool, Error>
where
    K: Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let name = desired.meta().name.clone().unwrap_or_default();
    let rendered = |k: &K| {
        k.meta()
            .annotations
            .as_ref()
            .and_then(|a| a.get(render::RENDERED))
            .cloned()
    };
    match api.get_opt(&name).await? {
        None => {
            api.create(&PostParams::default(), desired).await?;
            Ok(true)
        }
        Some(current) if !same_owner(&current, desired) => Err(invalid(
            "NameConflict",
            format!("{name} exists and is not this resource's; rename one of them",),
        )),
        Some(current)
            if rendered(&current) == rendered(desired) && unchanged(desired, &current) =>
        {
            Ok(false)
        }
        Some(current) => {
            let mut next = desired.clone();
            next.meta_mut().resource_version = current.meta().resource_version.clone();
            match api.replace(&name, &PostParams::default(), &next).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 422 => Err(invalid(
                    "Rejected",
                    format!("the API server refused the new {name}: {}", e.message),
                )),
                Err(e) => Err(e.into()),
            }
        }
    }
}

/// Whether every field `desired` sets has that value in `current` (what
/// the API server adds, its defaults and status, does not count): a child
/// someone edited (`kubectl scale`, an image changed by hand) is put back.
fn unchanged<K: serde::Serialize>(desired: &K, current: &K) -> bool {
    fn within(d: &serde_json::Value, c: &serde_json::Value) -> bool {
        use serde_json::Value;
        match (d, c) {
            (Value::Object(d), Value::Object(c)) => d
                .iter()
                .all(|(k, v)| v.is_null() || c.get(k).is_some_and(|cv| within(v, cv))),
            (Value::Array(d), Value::Array(c)) => {
                d.len() == c.len() && d.iter().zip(c).all(|(d, c)| within(d, c))
            }
            (d, c) => d == c,
        }
    }
    match (serde_json::to_value(desired), serde_json::to_value(current)) {
        (Ok(d), Ok(c)) => within(&d, &c),
        _ => false,
    }
}

/// Whether `current` is controlled by the resource `desired` names as its owner.
fn same_owner<K: Resource>(current: &K, desired: &K) -> bool {
    let controller = |k: &K| {
        k.meta()
            .owner_references
            .as_ref()
            .and_then(|o| o.iter().find(|r| r.controller == Some(true)))
            .map(|r| r.uid.clone())
    };
    controller(current) == controller(desired)
}

fn deadline_passed(upgrade: &Upgrade) -> bool {
    upgrade
        .deadline
        .parse::<Timestamp>()
        .map_or(true, |d| now() > d)
}

/// Reconciles one resource.
pub async fn reconcile(vp: Arc<VigilPipeline>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = tokio::time::Instant::now();
    let key = format!("{}/{}", vp.namespace().unwrap_or_default(), vp.name_any());
    // The watch cache can be behind this controller's own last write (the
    // status of the step it just took); acting on it would take the step
    // again. Every reconcile starts from the object as the API server has it.
    let api: Api<VigilPipeline> =
        Api::namespaced(ctx.client.clone(), &vp.namespace().unwrap_or_default());
    let result = match api.get_opt(&vp.name_any()).await {
        Ok(Some(fresh)) => reconcile_inner(&fresh, &ctx).await,
        Ok(None) => Ok(Action::await_change()),
        Err(e) => Err(e.into()),
    };
    ctx.metrics
        .duration
        .observe(started.elapsed().as_secs_f64());
    match &result {
        Ok(_) => {
            ctx.metrics.reconciles.with_label_values(&["ok"]).inc();
            ctx.failures.lock().remove(&key);
        }
        Err(e) => {
            ctx.metrics.reconciles.with_label_values(&["error"]).inc();
            let reason = match e {
                Error::Invalid { reason, .. } => reason,
                Error::Kube(_) => "Kubernetes",
                Error::Admin(_) => "PipelineApi",
                _ => "Other",
            };
            ctx.metrics.errors.with_label_values(&[reason]).inc();
            tracing::warn!(pipeline = %key, error = %e, "reconcile failed");
        }
    }
    result
}

/// The backoff after a failed reconcile: 5 s, doubling to 5 minutes.
pub fn error_policy(vp: Arc<VigilPipeline>, _error: &Error, ctx: Arc<Context>) -> Action {
    let key = format!("{}/{}", vp.namespace().unwrap_or_default(), vp.name_any());
    let mut failures = ctx.failures.lock();
    let n = failures.entry(key).or_insert(0);
    *n = n.saturating_add(1);
    Action::requeue(backoff(*n))
}

/// Wait after `failures` failed reconciles in a row.
pub fn backoff(failures: u32) -> Duration {
    Duration::from_secs(5)
        .saturating_mul(1 << failures.saturating_sub(1).min(10))
        .min(Duration::from_secs(300))
}

async fn reconcile_inner(vp: &VigilPipeline, ctx: &Context) -> Result<Action, Error> {
    let ns = vp
        .namespace()
        .ok_or_else(|| invalid("InvalidSpec", "VigilPipeline is namespaced"))?;
    let name = vp.name_any();
    let api: Api<VigilPipeline> = Api::namespaced(ctx.client.clone(), &ns);
    let mut step = Step {
        vp,
        ctx,
        ns: ns.clone(),
        name: name.clone(),
        status: vp.status.clone().unwrap_or_default(),
        recorder: Recorder::new(ctx.client.clone(), ctx.reporter.clone()),
    };
    let sts_api: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &ns);
    let sts = sts_api.get_opt(&name).await?;

    if vp.metadata.deletion_timestamp.is_some() {
        return finalize(&mut step, &api, sts.as_ref()).await;
    }
    if !vp.finalizers().iter().any(|f| f == FINALIZER) {
        let mut finalizers = vp.finalizers().to_vec();
        finalizers.push(FINALIZER.to_string());
        let patch = serde_json::json!({
            "metadata": {
                "finalizers": finalizers,
                "resourceVersion": vp.resource_version(),
            }
        });
        api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        // The patch is a change: the next reconcile sees the finalizer.
        return Ok(Action::requeue(Duration::ZERO));
    }

    // An upgrade in progress: done, out of time, or still going. This
    // comes before the checks of the spec, so that a spec edited into
    // something invalid mid-upgrade cannot keep a failed version running.
    if let (Some(upgrade), Some(running)) =
        (step.status.upgrade.clone(), step.status.running.clone())
    {
        let replicas = replicas_of(&running, vp.spec.replicas);
        if rolled_out(sts.as_ref(), &running.hash, replicas) {
            step.status.upgrade = None;
            step.status.last_good = Some(running.clone());
            step.status.phase = Some("Running".to_string());
            step.condition("Ready", true, "Running", "every pod is ready");
            step.condition(
                "Progressing",
                false,
                "UpgradeComplete",
                &format!("running {}", running.hash),
            );
            step.condition("Degraded", false, "AsExpected", "");
            step.save().await?;
            step.event(
                false,
                "Upgraded",
                format!("version {} is ready on every pod", running.hash),
            )
            .await;
            return Ok(Action::requeue(ctx.options.resync));
        }
        if !deadline_passed(&upgrade) {
            return Ok(Action::requeue(ctx.options.poll));
        }
        return roll_back(&mut step, &upgrade).await;
    }

    let desired = match resolve(vp, ctx).await {
        Ok(d) => d,
        Err(Error::Invalid { reason, message }) => {
            let fresh = condition(&step.status, "Degraded")
                .is_none_or(|c| c.status != "True" || c.message != message);
            step.condition("Degraded", true, reason, &message);
            if step.status.running.is_none() {
                step.status.phase = Some("Failed".to_string());
                step.condition("Ready", false, reason, "nothing is deployed");
                step.condition("Progressing", false, reason, &message);
            }
            step.save().await?;
            if fresh {
                step.event(true, reason, message.clone()).await;
            }
            return Err(Error::Invalid { reason, message });
        }
        Err(e) => return Err(e),
    };
    let spec = &vp.spec;
    let suspended = spec.state == DesiredState::Suspended;
    let replicas = spec.replicas;
    let poll = Action::requeue(ctx.options.poll);

    // First deployment.
    let Some(running) = step.status.running.clone() else {
        let deployed = Deployed {
            hash: desired.hash.clone(),
            spec: desired.view.clone(),
            pipeline: desired.pipeline.clone(),
            savepoint: None,
            epoch: 0,
        };
        step.apply(&deployed, if suspended { 0 } else { replicas })
            .await?;
        step.status.running = Some(deployed);
        step.status.spec_hash = Some(desired.hash.clone());
        step.status.phase = Some(if suspended { "Suspended" } else { "Deploying" }.to_string());
        step.condition("Ready", false, "Deploying", "pods are starting");
        step.condition(
            "Progressing",
            true,
            "Deploying",
            &format!("deploying {}", desired.hash),
        );
        step.condition("Degraded", false, "AsExpected", "");
        step.save().await?;
        step.event(
            false,
            "Deploying",
            format!("deploying version {} on {replicas} pod(s)", desired.hash),
        )
        .await;
        return Ok(poll);
    };

    if suspended {
        if step.status.phase.as_deref() != Some("Suspended") {
            let pods = pods_of(sts.as_ref());
            let mut next = running.clone();
            let healthy = rolled_out(sts.as_ref(), &running.hash, pods);
            next.savepoint = step.try_savepoint("suspend", pods, healthy).await?;
            step.apply(&next, 0).await?;
            step.status.running = Some(next);
            step.status.phase = Some("Suspended".to_string());
            step.condition("Ready", false, "Suspended", "spec.state is suspended");
            step.condition("Progressing", false, "Suspended", "");
            step.save().await?;
            step.event(false, "Suspended", "pods stopped".to_string())
                .await;
        } else {
            step.apply(&running, 0).await?;
            step.save().await?;
        }
        return Ok(Action::requeue(ctx.options.resync));
    }

    if step.status.phase.as_deref() == Some("Suspended") {
        // Resume: the running version (or the new spec) from the suspend
        // savepoint.
        let mut next = running.clone();
        let failed = step.status.failed_spec_hash.as_deref() == Some(desired.hash.as_str());
        if desired.hash != running.hash && !failed {
            next.hash = desired.hash.clone();
            next.spec = desired.view.clone();
            next.pipeline = desired.pipeline.clone();
            if spec.upgrade_mode == UpgradeMode::Stateless {
                next.epoch += 1;
                next.savepoint = None;
            }
        }
        step.apply(&next, replicas_of(&next, replicas)).await?;
        step.status.running = Some(next.clone());
        step.status.spec_hash = Some(next.hash.clone());
        step.status.phase = Some("Deploying".to_string());
        step.condition(
            "Progressing",
            true,
            "Resuming",
            &format!(
                "resuming {}{}",
                next.hash,
                next.savepoint
                    .as_deref()
                    .map(|s| format!(" from savepoint {s}"))
                    .unwrap_or_default()
            ),
        );
        step.save().await?;
        step.event(false, "Resumed", format!("resuming on {replicas} pod(s)"))
            .await;
        return Ok(poll);
    }

    // A new version.
    if desired.hash != running.hash
        && step.status.failed_spec_hash.as_deref() != Some(desired.hash.as_str())
    {
        let pods = pods_of(sts.as_ref());
        let healthy = rolled_out(sts.as_ref(), &running.hash, pods);
        let savepoint = match spec.upgrade_mode {
            UpgradeMode::Savepoint => match step.try_savepoint("upgrade", pods, healthy).await {
                Ok(s) => s,
                Err(e) => {
                    let message = format!("upgrade to {} waits: {e}", desired.hash);
                    step.condition("Degraded", true, "SavepointFailed", &message);
                    step.save().await?;
                    step.event(true, "SavepointFailed", message).await;
                    return Err(e);
                }
            },
            _ => None,
        };
        let epoch = running.epoch + i64::from(spec.upgrade_mode == UpgradeMode::Stateless);
        // Each pod restores the savepoint of the pod of its name. When the
        // number of pods changes, some would have none and some would be
        // left over: the pods then go on from their latest checkpoints,
        // whose partitions' state moves between processes through the
        // shared storage; the savepoint stays for a rollback.
        let before = replicas_of(&running, replicas);
        let start = match &savepoint {
            Some(_) if before != replicas && before.max(replicas) > 1 => {
                step.event(
                    false,
                    "RescaleFromCheckpoints",
                    format!(
                        "{before} to {replicas} pods: the pods go on from their latest checkpoints; the savepoint is kept for a rollback"
                    ),
                )
                .await;
                None
            }
            s => s.clone(),
        };
        let next = Deployed {
            hash: desired.hash.clone(),
            spec: desired.view.clone(),
            pipeline: desired.pipeline.clone(),
            savepoint: start,
            epoch,
        };
        let started = now();
        let deadline = started
            .checked_add(
                k8s_openapi::jiff::SignedDuration::try_from(desired.deadline).unwrap_or_default(),
            )
            .unwrap_or(started);
        step.apply(&next, replicas).await?;
        if step.status.last_good.is_none() && healthy {
            step.status.last_good = Some(running.clone());
        }
        step.status.upgrade = Some(Upgrade {
            from_hash: running.hash.clone(),
            to_hash: desired.hash.clone(),
            savepoint: savepoint.clone(),
            started_at: started.to_string(),
            deadline: deadline.to_string(),
        });
        step.status.running = Some(next);
        step.status.spec_hash = Some(desired.hash.clone());
        step.status.failed_spec_hash = None;
        step.status.phase = Some("Upgrading".to_string());
        let message = format!(
            "{} to {} ({}{})",
            running.hash,
            desired.hash,
            spec.upgrade_mode,
            savepoint
                .as_deref()
                .map(|s| format!(", from savepoint {s}"))
                .unwrap_or_default()
        );
        step.condition("Progressing", true, "Upgrading", &message);
        step.condition("Degraded", false, "AsExpected", "");
        step.save().await?;
        step.event(false, "Upgrading", message).await;
        return Ok(poll);
    }

    // At rest: keep the children as rendered, report health. The pods
    // are the running version's (after a rollback, not the spec's).
    let replicas = replicas_of(&running, replicas);
    step.apply(&running, replicas).await?;
    let ready = rolled_out(sts.as_ref(), &running.hash, replicas);
    let failed_again = step.status.failed_spec_hash.as_deref() == Some(desired.hash.as_str());
    if ready {
        if step.status.phase.as_deref() != Some("Running") {
            step.event(
                false,
                "Running",
                format!("version {} is ready on every pod", running.hash),
            )
            .await;
        }
        step.status.phase = Some("Running".to_string());
        step.status.last_good = Some(running.clone());
        step.condition("Ready", true, "Running", "every pod is ready");
        if condition(&step.status, "Progressing").is_some_and(|c| c.status == "True") {
            step.condition(
                "Progressing",
                false,
                "Deployed",
                &format!("running {}", running.hash),
            );
        }
    } else {
        step.condition(
            "Ready",
            false,
            "PodsNotReady",
            "waiting for every pod to be ready",
        );
    }
    if !failed_again && condition(&step.status, "Degraded").is_some_and(|c| c.status == "True") {
        step.condition("Degraded", false, "AsExpected", "");
    }
    if ready && replicas > 0 {
        // Savepoint on demand.
        if spec.savepoint_nonce.is_some()
            && spec.savepoint_nonce != step.status.observed_savepoint_nonce
        {
            step.savepoint("manual", replicas).await?;
            step.status.observed_savepoint_nonce = spec.savepoint_nonce;
        }
        report_checkpoints(&mut step, replicas).await;
    }
    step.save().await?;
    Ok(if ready {
        Action::requeue(ctx.options.resync)
    } else {
        poll
    })
}

/// The pods' checkpoint health, best effort.
async fn report_checkpoints(step: &mut Step<'_>, pods: i32) {
    let mut restarts = 0;
    let mut first = None;
    for (i, (_, address)) in step.pod_addresses(pods).into_iter().enumerate() {
        match step.ctx.admin.health(&address).await {
            Ok(h) => {
                restarts += h.restarts;
                if i == 0 {
                    first = h.checkpoints;
                }
            }
            Err(e) => tracing::debug!(pipeline = %step.name, error = %e, "no checkpoint health"),
        }
    }
    step.status.restarts = restarts;
    if let Some(s) = first.filter(|s| s.latest_id.is_some()) {
        step.status.last_checkpoint = Some(CheckpointInfo {
            id: s.latest_id.unwrap_or(0),
            completed: s.completed,
            failed: s.failed,
        });
    }
}

async fn roll_back(step: &mut Step<'_>, upgrade: &Upgrade) -> Result<Action, Error> {
    let failed = upgrade.to_hash.clone();
    let resync = Action::requeue(step.ctx.options.poll);
    let Some(good) = step.status.last_good.clone() else {
        let message = format!(
            "version {failed} was not ready by {}; no earlier version was ever ready to roll back to",
            upgrade.deadline
        );
        step.status.upgrade = None;
        step.status.failed_spec_hash = Some(failed);
        step.status.phase = Some("Failed".to_string());
        step.condition("Degraded", true, "UpgradeFailed", &message);
        step.condition("Progressing", false, "UpgradeFailed", &message);
        step.save().await?;
        step.event(true, "UpgradeFailed", message).await;
        return Ok(resync);
    };
    // At the last good version's shape: a failed rescale goes back too.
    let replicas = replicas_of(&good, step.vp.spec.replicas);
    let mut back = good.clone();
    // A start from the savepoint taken before the upgrade, told apart
    // from the failed version's start from it.
    back.savepoint = upgrade
        .savepoint
        .as_ref()
        .map(|s| format!("{s}#rollback-{}", step.generation().unwrap_or(0)));
    step.apply(&back, replicas).await?;
    let message = format!(
        "version {failed} was not ready by {}; rolled back to {}{}",
        upgrade.deadline,
        back.hash,
        upgrade
            .savepoint
            .as_deref()
            .map(|s| format!(" from savepoint {s}"))
            .unwrap_or_else(|| " from the latest checkpoint".to_string())
    );
    step.status.running = Some(back.clone());
    step.status.spec_hash = Some(back.hash.clone());
    step.status.upgrade = None;
    step.status.failed_spec_hash = Some(failed);
    step.status.phase = Some("RolledBack".to_string());
    step.condition("Degraded", true, "UpgradeFailed", &message);
    step.condition("Progressing", true, "RollingBack", &message);
    step.condition(
        "Ready",
        false,
        "RollingBack",
        "the previous version is starting",
    );
    step.save().await?;
    step.event(true, "RolledBack", message).await;
    Ok(resync)
}

async fn finalize(
    step: &mut Step<'_>,
    api: &Api<VigilPipeline>,
    sts: Option<&StatefulSet>,
) -> Result<Action, Error> {
    if !step.vp.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(Action::await_change());
    }
    let pods = pods_of(sts);
    let hash = step
        .status
        .running
        .as_ref()
        .map(|r| r.hash.clone())
        .unwrap_or_default();
    let key = format!("{}/{}", step.ns, step.name);
    let tries = step.ctx.failures.lock().get(&key).copied().unwrap_or(0);
    // A few tries while pods are ready, then let the resource go: its
    // checkpoints stay in storage either way.
    let healthy = rolled_out(sts, &hash, pods) && tries < 3;
    // The savepoint is in the event; the status goes with the resource.
    match step.try_savepoint("final", pods, healthy).await? {
        Some(_) => {}
        None if pods == 0 => {
            step.event(
                false,
                "DeletedWithoutSavepoint",
                "no pod runs to take a final savepoint from; the checkpoints stay in storage"
                    .to_string(),
            )
            .await
        }
        None => {}
    }
    let finalizers: Vec<String> = step
        .vp
        .finalizers()
        .iter()
        .filter(|f| f.as_str() != FINALIZER)
        .cloned()
        .collect();
    let patch = serde_json::json!({
        "metadata": {
            "finalizers": finalizers,
            "resourceVersion": step.vp.resource_version(),
        }
    });
    api.patch(&step.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(Action::await_change())
}

async fn serve_metrics(at: SocketAddr, ctx: Arc<Context>) -> Result<(), Error> {
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind(at)
        .await
        .map_err(|e| Error::Io(format!("cannot listen on {at}: {e}")))?;
    tracing::info!(address = %at, "operator metrics on /metrics, liveness on /healthz");
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let ctx = ctx.clone();
                async move { ctx.metrics.text() }
            }),
        )
        .route("/healthz", get(|| async { "ok" }));
    axum::serve(listener, app)
        .await
        .map_err(|e| Error::Io(format!("metrics endpoint: {e}")))
}

/// Runs the operator until SIGTERM, or until it loses its lease.
pub async fn run(client: Client, validator: Validator, options: Options) -> Result<(), Error> {
    let ctx = Arc::new(Context::new(client.clone(), validator, options.clone())?);
    let metrics = async {
        match options.metrics {
            Some(at) => serve_metrics(at, ctx.clone()).await,
            None => std::future::pending().await,
        }
    };
    let lease = options.leader.as_ref().map(|(ns, name, identity)| {
        crate::leader::LeaderLease::new(
            Api::<Lease>::namespaced(client.clone(), ns),
            name,
            identity,
            options.lease_duration,
        )
    });
    let work = async {
        if let Some(lease) = &lease {
            lease.acquire().await;
        }
        ctx.metrics.leader.set(1);
        let (pipelines, children) = match &options.namespace {
            Some(ns) => (
                Api::<VigilPipeline>::namespaced(client.clone(), ns),
                Api::<StatefulSet>::namespaced(client.clone(), ns),
            ),
            None => (Api::all(client.clone()), Api::all(client.clone())),
        };
        tracing::info!(namespace = ?options.namespace, "reconciling VigilPipelines");
        let controller = Controller::new(pipelines, watcher::Config::default())
            .owns(
                children,
                watcher::Config::default().labels(render::PIPELINE_LABEL),
            )
            .shutdown_on_signal()
            .run(reconcile, error_policy, ctx.clone())
            .for_each(|r| async move {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "reconcile not run");
                }
            });
        match &lease {
            Some(lease) => tokio::select! {
                () = controller => Ok(()),
                lost = lease.keep() => Err(lost),
            },
            None => {
                controller.await;
                Ok(())
            }
        }
    };
    tokio::select! {
        r = work => r,
        r = metrics => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_reconciles_back_off_from_5_seconds_to_5_minutes() {
        let waits: Vec<u64> = (1..=9).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(waits, [5, 10, 20, 40, 80, 160, 300, 300, 300]);
    }

    #[test]
    fn a_spec_is_refused_with_the_field_it_gets_wrong() {
        let check = |v: serde_json::Value| {
            let spec: VigilPipelineSpec = serde_json::from_value(v).expect("spec");
            match check_spec(&spec) {
                Err(Error::Invalid { message, .. }) => message,
                other => format!("{other:?}"),
            }
        };
        assert!(check(serde_json::json!({ "parallelism": 0 })).contains("spec.parallelism is 0"));
        assert!(check(serde_json::json!({ "replicas": 2 })).contains("spec.checkpoints.s3"));
        assert!(check(serde_json::json!({ "upgradeDeadline": "soon" }))
            .contains("spec.upgradeDeadline"));
        assert!(
            check(serde_json::json!({ "checkpoints": { "s3": { "url": "bucket" } } }))
                .contains("s3://bucket/prefix")
        );
        assert_eq!(check(serde_json::json!({})), "Ok(300s)");
    }

    #[test]
    fn the_pods_environment_answers_for_values_and_references() {
        let spec: VigilPipelineSpec = serde_json::from_value(serde_json::json!({
            "env": [
                { "name": "RATE", "value": "5" },
                { "name": "PASSWORD", "valueFrom": { "secretKeyRef": { "name": "s", "key": "k" } } },
            ],
        }))
        .expect("spec");
        let env = pod_env(&spec);
        assert_eq!(env("RATE").as_deref(), Some("5"));
        assert_eq!(env("PASSWORD").as_deref(), Some("from-secret"));
        assert_eq!(env("VIGIL_MEMBER").as_deref(), Some("pod"));
        assert_eq!(env("UNSET"), None);
    }
}
