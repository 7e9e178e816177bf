//! The `VigilPipeline` custom resource (`vigil.dev/v1alpha1`).
//!
//! The Rust types are the source of the CRD: `vigil operator crd` prints it
//! from them, and a test fails when the checked-in copies under `deploy/`
//! differ. The API server enforces the schema (enums, `parallelism >= 1`),
//! but the controller does not rely on it: a resource written before the
//! CRD was installed, or under an older one, still deserializes, so a bad
//! value becomes a condition on the resource rather than an object the
//! controller cannot read. That is why the two enums keep what they do not
//! know instead of failing.

use std::borrow::Cow;
use std::fmt;

use k8s_openapi::api::core::v1::{EnvFromSource, EnvVar, ResourceRequirements};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The image pods run unless the resource names one.
pub const DEFAULT_IMAGE: &str = "ghcr.io/vigil-streaming/vigil:0.1.0";

/// A detection pipeline deployed on Kubernetes.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "vigil.dev",
    version = "v1alpha1",
    kind = "VigilPipeline",
    plural = "vigilpipelines",
    shortname = "vp",
    namespaced,
    status = "VigilPipelineStatus",
    derive = "PartialEq",
    doc = "A Vigil pipeline: its file, the pods that run it and how it is upgraded",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Replicas","type":"integer","jsonPath":".spec.replicas"}"#,
    printcolumn = r#"{"name":"Parallelism","type":"integer","jsonPath":".spec.parallelism"}"#,
    printcolumn = r#"{"name":"Upgrade","type":"string","jsonPath":".spec.upgradeMode"}"#,
    printcolumn = r#"{"name":"Savepoint","type":"string","jsonPath":".status.lastSavepoint.name","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct VigilPipelineSpec {
    /// The pipeline file: inline, or a key of a ConfigMap in the namespace.
    #[serde(default)]
    pub pipeline: PipelineSource,
    /// The container image with the `vigil` binary.
    #[serde(default = "default_image")]
    pub image: String,
    /// Pods. Pods of a pipeline that reads Kafka share its partitions
    /// through the consumer group; more than one needs shared (S3)
    /// checkpoint storage.
    #[serde(default = "one")]
    #[schemars(range(min = 0))]
    pub replicas: i32,
    /// Subtasks per node in each pod (`vigil run --parallelism`).
    #[serde(default = "one")]
    #[schemars(range(min = 1))]
    pub parallelism: i32,
    /// CPU and memory of the `vigil` container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Where checkpoints and savepoints are kept.
    #[serde(default)]
    pub checkpoints: CheckpointStorage,
    /// How a change of the spec reaches the running pipeline.
    #[serde(default)]
    pub upgrade_mode: UpgradeMode,
    /// How long a new version may take to become ready before the
    /// previous one is restored (e.g. `5m`).
    #[serde(default = "default_deadline")]
    pub upgrade_deadline: String,
    /// Whether the pipeline runs (`running`) or is stopped with a
    /// savepoint (`suspended`).
    #[serde(default)]
    pub state: DesiredState,
    /// Change this value to take a savepoint now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub savepoint_nonce: Option<i64>,
    /// Environment of the `vigil` container (`${VAR}` in the pipeline file
    /// reads it); values from Secrets through `valueFrom.secretKeyRef`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// Whole Secrets or ConfigMaps as environment.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env_from: Vec<EnvFromSource>,
}

fn default_image() -> String {
    DEFAULT_IMAGE.to_string()
}

fn one() -> i32 {
    1
}

fn default_deadline() -> String {
    "5m".to_string()
}

/// Where the pipeline file comes from: exactly one of the two.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PipelineSource {
    /// The pipeline file itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inline: Option<String>,
    /// A ConfigMap key holding it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_ref: Option<ConfigMapKey>,
}

/// A key of a ConfigMap in the resource's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConfigMapKey {
    /// The ConfigMap.
    pub name: String,
    /// Its key (default `pipeline.yaml`).
    #[serde(default = "default_key")]
    pub key: String,
}

fn default_key() -> String {
    "pipeline.yaml".to_string()
}

/// Checkpoint storage: a volume per pod (the default) or S3-compatible
/// object storage shared by all pods.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointStorage {
    /// A PersistentVolumeClaim per pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<VolumeStorage>,
    /// An S3-compatible bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Storage>,
    /// How often a checkpoint is taken (default `10s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
}

/// A volume claimed per pod.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeStorage {
    /// Requested size (default `1Gi`).
    #[serde(default = "default_size")]
    pub size: String,
    /// Storage class (the cluster's default if unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
}

fn default_size() -> String {
    "1Gi".to_string()
}

/// An S3-compatible bucket; credentials come from a Secret, never from the
/// resource.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct S3Storage {
    /// `s3://bucket/prefix`.
    pub url: String,
    /// Endpoint of an S3-compatible service other than AWS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Region (default `us-east-1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// A Secret with `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
}

/// Lenient string enums: what the schema allows, and what anything else
/// read from the API server becomes.
macro_rules! lenient_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $text:literal),+ $(,)? } default $default:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq)]
        pub enum $name {
            $($(#[$vdoc])* $variant,)+
            /// A value the schema does not allow (a resource stored without it).
            Unknown(String),
        }

        impl Default for $name {
            fn default() -> Self {
                Self::$default
            }
        }

        impl $name {
            /// Every value the schema allows.
            pub const ALLOWED: &'static [&'static str] = &[$($text),+];

            /// The value as the resource spells it.
            pub fn as_str(&self) -> &str {
                match self {
                    $(Self::$variant => $text,)+
                    Self::Unknown(s) => s,
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Ok(match s.as_str() {
                    $($text => Self::$variant,)+
                    _ => Self::Unknown(s),
                })
            }
        }

        impl JsonSchema for $name {
            fn schema_name() -> Cow<'static, str> {
                stringify!($name).into()
            }

            fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
                schemars::json_schema!({
                    "type": "string",
                    "enum": [$($text),+],
                })
            }
        }
    };
}

lenient_enum!(
    /// How a change of the spec reaches the running pipeline.
    UpgradeMode {
        /// Start the new version without state.
        Stateless = "stateless",
        /// Take a savepoint, stop, start the new version from it; roll back
        /// to it if the new version does not become ready.
        Savepoint = "savepoint",
        /// Start the new version from the latest checkpoint.
        LastState = "last-state",
    } default Savepoint
);

lenient_enum!(
    /// Whether the pipeline should run.
    DesiredState {
        /// Pods run the pipeline.
        Running = "running",
        /// A savepoint is taken and the pods are stopped; `running` resumes
        /// from it.
        Suspended = "suspended",
    } default Running
);

/// What the controller observed and did.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VigilPipelineStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Deploying, Running, Upgrading, RolledBack, Suspending, Suspended or
    /// Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// Hash of the spec the pods run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec_hash: Option<String>,
    /// The deployment the pods run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<Deployed>,
    /// The last deployment that became ready: what a failed upgrade rolls
    /// back to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_good: Option<Deployed>,
    /// The upgrade in progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrade: Option<Upgrade>,
    /// A spec hash that failed to become ready and was rolled back: not
    /// tried again until the spec changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_spec_hash: Option<String>,
    /// The latest completed checkpoint the first pod reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_checkpoint: Option<CheckpointInfo>,
    /// The latest savepoint the controller took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_savepoint: Option<SavepointInfo>,
    /// The `savepointNonce` last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_savepoint_nonce: Option<i64>,
    /// Restarts of the pipeline inside its pods, as they report them.
    #[serde(default)]
    pub restarts: i64,
    /// `Ready`, `Progressing` and `Degraded`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// A deployment of the pipeline: the spec it runs and where its state
/// came from.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Deployed {
    /// Hash of the spec.
    pub hash: String,
    /// The spec (without `state` and `savepointNonce`).
    #[schemars(schema_with = "preserve_unknown")]
    pub spec: serde_json::Value,
    /// The pipeline file it runs (a ConfigMap's may have changed since).
    pub pipeline: String,
    /// The savepoint the pods start from, if any (`--initial-savepoint`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub savepoint: Option<String>,
    /// Increases when the state is dropped (a `stateless` upgrade): the
    /// pods' checkpoints live under it.
    #[serde(default)]
    pub epoch: i64,
}

fn preserve_unknown(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

/// An upgrade in progress.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Upgrade {
    /// Spec hash before.
    pub from_hash: String,
    /// Spec hash after.
    pub to_hash: String,
    /// The savepoint taken before, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub savepoint: Option<String>,
    /// When it started (RFC 3339).
    pub started_at: String,
    /// When it is rolled back unless ready (RFC 3339).
    pub deadline: String,
}

/// A completed checkpoint.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointInfo {
    /// Its id.
    pub id: i64,
    /// Checkpoints completed and failed since the pod started.
    #[serde(default)]
    pub completed: i64,
    /// Failed since the pod started.
    #[serde(default)]
    pub failed: i64,
}

/// A savepoint the controller took.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SavepointInfo {
    /// Its name (per pod: `<name>.<pod>` when there are several).
    pub name: String,
    /// Why: `upgrade`, `suspend`, `manual` or `delete`.
    pub reason: String,
    /// The checkpoint ids it stored, one per pod.
    #[serde(default)]
    pub checkpoints: Vec<i64>,
    /// When it was taken (RFC 3339).
    pub taken_at: String,
}

/// A Kubernetes-style condition.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Ready`, `Progressing` or `Degraded`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// One CamelCase word.
    pub reason: String,
    /// For people.
    #[serde(default)]
    pub message: String,
    /// When `status` last changed (RFC 3339).
    pub last_transition_time: String,
    /// The generation it was set for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

impl VigilPipelineSpec {
    /// The spec that decides what the pods run: without `state` and
    /// `savepointNonce`, which are acted on without a new version.
    pub fn deployment_view(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or(serde_json::Value::Null);
        if let Some(m) = v.as_object_mut() {
            m.remove("state");
            m.remove("savepointNonce");
        }
        v
    }
}

/// The CRD as YAML, as `vigil operator crd` prints it and `deploy/` holds it.
pub fn crd_yaml() -> Result<String, crate::Error> {
    use kube::CustomResourceExt;
    let crd = VigilPipeline::crd();
    let body = serde_saphyr::to_string(&crd).map_err(|e| crate::Error::Yaml(e.to_string()))?;
    Ok(format!(
        "# Generated from the Rust types by `vigil operator crd`: do not edit.\n---\n{body}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_the_schema_refuses_is_kept_not_failed_on() {
        let spec: VigilPipelineSpec = serde_json::from_value(serde_json::json!({
            "upgradeMode": "sideways",
            "state": "paused",
            "parallelism": 0,
        }))
        .expect("still a spec");
        assert_eq!(spec.upgrade_mode, UpgradeMode::Unknown("sideways".into()));
        assert_eq!(spec.state, DesiredState::Unknown("paused".into()));
        assert_eq!(spec.parallelism, 0);
        let round = serde_json::to_value(&spec).expect("json");
        assert_eq!(round["upgradeMode"], "sideways");
    }

    #[test]
    fn defaults_are_what_the_docs_say() {
        let spec: VigilPipelineSpec =
            serde_json::from_value(serde_json::json!({})).expect("an empty spec");
        assert_eq!(spec.upgrade_mode, UpgradeMode::Savepoint);
        assert_eq!(spec.state, DesiredState::Running);
        assert_eq!((spec.replicas, spec.parallelism), (1, 1));
        assert_eq!(spec.upgrade_deadline, "5m");
        assert_eq!(spec.image, DEFAULT_IMAGE);
        let view = spec.deployment_view();
        assert!(view.get("state").is_none() && view.get("savepointNonce").is_none());
    }

    #[test]
    fn the_crd_validates_enums_and_parallelism_and_has_printer_columns() {
        let yaml = crd_yaml().expect("the CRD");
        for needle in [
            "- last-state",
            "- suspended",
            "minimum: 1.0",
            "name: Phase",
            "shortNames:",
            "status: {}",
        ] {
            assert!(yaml.contains(needle), "{needle}");
        }
    }
}
