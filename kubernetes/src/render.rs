//! What a `VigilPipeline` becomes: a ConfigMap with the pipeline file, a
//! headless Service and a StatefulSet, each owned by the resource.
//!
//! Rendering is a pure function of the deployed spec, the pipeline text and
//! where the pods' state comes from, so the controller can compare what it
//! would write with what is there and write nothing when they agree. Every
//! child carries the hash of its rendered form in an annotation: that is
//! the comparison, which fields the API server defaults cannot upset.
//!
//! The StatefulSet gives pods stable names, which are their member names
//! (`VIGIL_MEMBER`): a process's checkpoints are kept under it, and a pod
//! replaced after a crash or an upgrade goes on from its own. Pods start in
//! parallel: processes of a Kafka pipeline share the partitions through
//! the consumer group, with no order among them.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec, StatefulSetUpdateStrategy};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource,
    EnvFromSource, EnvVar, EnvVarSource, HTTPGetAction, ObjectFieldSelector, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    SecretEnvSource, SecurityContext, Service, ServicePort, ServiceSpec, Volume, VolumeMount,
    VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::resource::VigilPipelineSpec;

/// Where pods find the pipeline file.
pub const PIPELINE_DIR: &str = "/etc/vigil";
/// The file's name in the ConfigMap and in [`PIPELINE_DIR`].
pub const PIPELINE_FILE: &str = "pipeline.yaml";
/// The pods' state volume: checkpoints (with volume storage) and dead letters.
pub const STATE_DIR: &str = "/var/lib/vigil";
/// The port of the pods' HTTP API (metrics, probes, read models, savepoints).
pub const HTTP_PORT: i32 = 8686;
/// Annotation with the hash of a child's rendered form.
pub const RENDERED: &str = "vigil.dev/rendered";
/// Annotation on the StatefulSet and its pods: the spec hash they run.
pub const SPEC_HASH: &str = "vigil.dev/spec-hash";
/// Label naming the `VigilPipeline` of a child.
pub const PIPELINE_LABEL: &str = "vigil.dev/pipeline";

/// Everything a rendering depends on.
pub struct Shape<'a> {
    /// The resource's name (and so its children's).
    pub name: &'a str,
    /// Its namespace.
    pub namespace: &'a str,
    /// The owner reference every child carries.
    pub owner: OwnerReference,
    /// The spec to deploy.
    pub spec: &'a VigilPipelineSpec,
    /// Its hash.
    pub hash: &'a str,
    /// The pipeline file.
    pub pipeline: &'a str,
    /// `--initial-savepoint` of the pods, if they start from one.
    pub savepoint: Option<&'a str>,
    /// State epoch: a `stateless` upgrade starts a new one.
    pub epoch: i64,
    /// Pods (0 while suspended).
    pub replicas: i32,
}

/// The children of a resource.
#[derive(Debug, Clone)]
pub struct Children {
    /// The pipeline file.
    pub config_map: ConfigMap,
    /// Headless: a DNS name per pod for the operator's savepoint requests,
    /// and the port Prometheus scrapes.
    pub service: Service,
    /// The pods.
    pub stateful_set: StatefulSet,
}

/// A stable hash (hex) of `bytes`: stored in status and annotations, so it
/// must not change between builds.
pub fn hash(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex()[..16].to_string()
}

/// The name of the ConfigMap holding `name`'s pipeline file (a name that
/// the ConfigMap a resource reads its file from is unlikely to have).
pub fn config_map_name(name: &str) -> String {
    format!("{name}-vigil-pipeline")
}

/// The name of pod `ordinal` of `name`'s StatefulSet.
pub fn pod_name(name: &str, ordinal: i32) -> String {
    format!("{name}-{ordinal}")
}

fn labels(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "vigil".to_string()),
        ("app.kubernetes.io/instance".to_string(), name.to_string()),
        (
            "app.kubernetes.io/managed-by".to_string(),
            "vigil-operator".to_string(),
        ),
        (PIPELINE_LABEL.to_string(), name.to_string()),
    ])
}

fn meta(shape: &Shape<'_>, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(shape.namespace.to_string()),
        labels: Some(labels(shape.name)),
        owner_references: Some(vec![shape.owner.clone()]),
        ..ObjectMeta::default()
    }
}

/// Stamps `meta` with the hash of the object it belongs to, computed
/// without the stamp.
fn stamp<T: serde::Serialize>(object: &mut T, meta: impl Fn(&mut T) -> &mut ObjectMeta) {
    let rendered = hash(&serde_json::to_vec(object).unwrap_or_default());
    meta(object)
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(RENDERED.to_string(), rendered);
}

/// Where the pods keep checkpoints.
pub fn checkpoint_location(spec: &VigilPipelineSpec, epoch: i64) -> String {
    match &spec.checkpoints.s3 {
        Some(s3) => format!("{}/epoch-{epoch}", s3.url.trim_end_matches('/')),
        None => format!("{STATE_DIR}/checkpoints/epoch-{epoch}"),
    }
}

/// The `vigil` command line of the pods.
pub fn args(shape: &Shape<'_>) -> Vec<String> {
    let spec = shape.spec;
    let mut args: Vec<String> = [
        "run",
        &format!("{PIPELINE_DIR}/{PIPELINE_FILE}"),
        "--http",
        &format!("0.0.0.0:{HTTP_PORT}"),
        "--checkpoints",
        &checkpoint_location(spec, shape.epoch),
        "--checkpoint-interval",
        spec.checkpoints.interval.as_deref().unwrap_or("10s"),
        "--parallelism",
        &spec.parallelism.max(1).to_string(),
        "--dead-letter-dir",
        &format!("{STATE_DIR}/dead-letters"),
        "--progress",
        "lines",
        "--log-format",
        "json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Some(sp) = shape.savepoint {
        args.push("--initial-savepoint".to_string());
        args.push(sp.to_string());
    }
    args
}

fn env(spec: &VigilPipelineSpec) -> (Vec<EnvVar>, Vec<EnvFromSource>) {
    let field = |name: &str, path: &str| EnvVar {
        name: name.to_string(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.to_string(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    };
    let value = |name: &str, value: &str| EnvVar {
        name: name.to_string(),
        value: Some(value.to_string()),
        ..EnvVar::default()
    };
    let mut env = vec![
        field("VIGIL_MEMBER", "metadata.name"),
        field("POD_NAMESPACE", "metadata.namespace"),
    ];
    let mut env_from = Vec::new();
    if let Some(s3) = &spec.checkpoints.s3 {
        env.push(value(
            "AWS_REGION",
            s3.region.as_deref().unwrap_or("us-east-1"),
        ));
        if let Some(endpoint) = &s3.endpoint {
            env.push(value("AWS_ENDPOINT", endpoint));
            if endpoint.starts_with("http://") {
                env.push(value("AWS_ALLOW_HTTP", "true"));
            }
        }
        if let Some(secret) = &s3.credentials_secret {
            env_from.push(EnvFromSource {
                secret_ref: Some(SecretEnvSource {
                    name: secret.clone(),
                    optional: Some(false),
                }),
                ..EnvFromSource::default()
            });
        }
    }
    env.extend(spec.env.iter().cloned());
    env_from.extend(spec.env_from.iter().cloned());
    (env, env_from)
}

/// Renders the children of `shape`.
pub fn render(shape: &Shape<'_>) -> Children {
    let name = shape.name;
    let spec = shape.spec;

    let mut config_map = ConfigMap {
        metadata: meta(shape, config_map_name(name)),
        data: Some(BTreeMap::from([(
            PIPELINE_FILE.to_string(),
            shape.pipeline.to_string(),
        )])),
        ..ConfigMap::default()
    };
    stamp(&mut config_map, |c| &mut c.metadata);

    let selector = BTreeMap::from([(PIPELINE_LABEL.to_string(), name.to_string())]);
    let http = ServicePort {
        name: Some("http".to_string()),
        port: HTTP_PORT,
        target_port: Some(IntOrString::String("http".to_string())),
        protocol: Some("TCP".to_string()),
        ..ServicePort::default()
    };
    let mut service = Service {
        metadata: meta(shape, name.to_string()),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_string()),
            selector: Some(selector.clone()),
            ports: Some(vec![http]),
            // Savepoint requests reach a pod that is not ready (stuck, or
            // starting) by its DNS name.
            publish_not_ready_addresses: Some(true),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    };
    stamp(&mut service, |s| &mut s.metadata);

    let probe = |path: &str, period: i32, failures: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::String("http".to_string()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        ..Probe::default()
    };
    let (env, env_from) = env(spec);
    let container = Container {
        name: "vigil".to_string(),
        image: Some(spec.image.clone()),
        command: Some(vec!["vigil".to_string()]),
        args: Some(args(shape)),
        env: Some(env),
        env_from: (!env_from.is_empty()).then_some(env_from),
        ports: Some(vec![ContainerPort {
            name: Some("http".to_string()),
            container_port: HTTP_PORT,
            protocol: Some("TCP".to_string()),
            ..ContainerPort::default()
        }]),
        readiness_probe: Some(probe("/ready", 5, 3)),
        liveness_probe: Some(probe("/health", 10, 6)),
        resources: spec.resources.clone(),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "pipeline".to_string(),
                mount_path: PIPELINE_DIR.to_string(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: "state".to_string(),
                mount_path: STATE_DIR.to_string(),
                ..VolumeMount::default()
            },
        ]),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_string()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    };
    let mut volumes = vec![Volume {
        name: "pipeline".to_string(),
        config_map: Some(ConfigMapVolumeSource {
            name: config_map_name(name),
            ..ConfigMapVolumeSource::default()
        }),
        ..Volume::default()
    }];
    let volume_claims = match (&spec.checkpoints.s3, &spec.checkpoints.volume) {
        // Shared storage: the pod's own volume holds only dead letters.
        (Some(_), _) => {
            volumes.push(Volume {
                name: "state".to_string(),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Volume::default()
            });
            None
        }
        (None, volume) => {
            let size = volume.as_ref().map_or("1Gi", |v| v.size.as_str());
            Some(vec![PersistentVolumeClaim {
                metadata: ObjectMeta {
                    name: Some("state".to_string()),
                    labels: Some(labels(name)),
                    ..ObjectMeta::default()
                },
                spec: Some(PersistentVolumeClaimSpec {
                    access_modes: Some(vec!["ReadWriteOnce".to_string()]),
                    storage_class_name: volume.as_ref().and_then(|v| v.storage_class_name.clone()),
                    resources: Some(VolumeResourceRequirements {
                        requests: Some(BTreeMap::from([(
                            "storage".to_string(),
                            Quantity(size.to_string()),
                        )])),
                        ..VolumeResourceRequirements::default()
                    }),
                    ..PersistentVolumeClaimSpec::default()
                }),
                ..PersistentVolumeClaim::default()
            }])
        }
    };
    let mut pod_labels = labels(name);
    pod_labels.extend(selector.clone());
    let mut stateful_set = StatefulSet {
        metadata: ObjectMeta {
            annotations: Some(BTreeMap::from([(
                SPEC_HASH.to_string(),
                shape.hash.to_string(),
            )])),
            ..meta(shape, name.to_string())
        },
        spec: Some(StatefulSetSpec {
            replicas: Some(shape.replicas),
            service_name: Some(name.to_string()),
            pod_management_policy: Some("Parallel".to_string()),
            selector: LabelSelector {
                match_labels: Some(selector),
                ..LabelSelector::default()
            },
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("RollingUpdate".to_string()),
                ..StatefulSetUpdateStrategy::default()
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(BTreeMap::from([
                        (SPEC_HASH.to_string(), shape.hash.to_string()),
                        ("prometheus.io/scrape".to_string(), "true".to_string()),
                        ("prometheus.io/port".to_string(), HTTP_PORT.to_string()),
                    ])),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    volumes: Some(volumes),
                    // vigil stops on SIGTERM after its sinks commit.
                    termination_grace_period_seconds: Some(60),
                    automount_service_account_token: Some(false),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(65532),
                        run_as_group: Some(65532),
                        fs_group: Some(65532),
                        ..PodSecurityContext::default()
                    }),
                    ..PodSpec::default()
                }),
            },
            volume_claim_templates: volume_claims,
            ..StatefulSetSpec::default()
        }),
        ..StatefulSet::default()
    };
    stamp(&mut stateful_set, |s| &mut s.metadata);
    Children {
        config_map,
        service,
        stateful_set,
    }
}

/// The children as one YAML stream (`vigil operator render`).
pub fn to_yaml(children: &Children) -> Result<String, crate::Error> {
    let docs = [
        typed("v1", "ConfigMap", &children.config_map)?,
        typed("v1", "Service", &children.service)?,
        typed("apps/v1", "StatefulSet", &children.stateful_set)?,
    ];
    Ok(docs.iter().map(|d| format!("---\n{d}")).collect())
}

/// `object` as YAML with its `apiVersion` and `kind`, which k8s-openapi's
/// types leave out when a bare struct is serialized.
fn typed<T: serde::Serialize>(
    api_version: &str,
    kind: &str,
    object: &T,
) -> Result<String, crate::Error> {
    let mut v = serde_json::to_value(object).map_err(|e| crate::Error::Yaml(e.to_string()))?;
    if let Some(m) = v.as_object_mut() {
        m.insert("apiVersion".into(), api_version.into());
        m.insert("kind".into(), kind.into());
    }
    serde_saphyr::to_string(&v).map_err(|e| crate::Error::Yaml(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_do_not_change_between_builds() {
        // Stored in status: a different hash would upgrade every pipeline
        // when the operator is upgraded.
        assert_eq!(hash(b"vigil"), "0246024e6e3f4ef2");
    }

    fn shape<'a>(spec: &'a VigilPipelineSpec, savepoint: Option<&'a str>) -> Shape<'a> {
        Shape {
            name: "demo",
            namespace: "detections",
            owner: OwnerReference {
                api_version: "vigil.dev/v1alpha1".into(),
                kind: "VigilPipeline".into(),
                name: "demo".into(),
                uid: "u".into(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            },
            spec,
            hash: "h",
            pipeline: "name: demo\n",
            savepoint,
            epoch: 2,
            replicas: 3,
        }
    }

    #[test]
    fn pods_get_the_savepoint_the_shape_and_their_storage() {
        let spec: VigilPipelineSpec = serde_json::from_value(serde_json::json!({
            "parallelism": 4,
            "checkpoints": { "s3": { "url": "s3://bucket/vigil/", "endpoint": "http://minio:9000", "credentialsSecret": "s3" } },
        }))
        .expect("spec");
        let c = render(&shape(&spec, Some("up-1.{member}")));
        let sts = c.stateful_set.spec.expect("spec");
        assert_eq!(sts.replicas, Some(3));
        assert!(
            sts.volume_claim_templates.is_none(),
            "shared storage: no volume per pod"
        );
        let pod = sts.template.spec.expect("pod");
        let container = &pod.containers[0];
        let args = container.args.clone().expect("args");
        let pair = |flag: &str| {
            args.windows(2)
                .find(|w| w[0] == flag)
                .map(|w| w[1].clone())
                .unwrap_or_default()
        };
        assert_eq!(pair("--parallelism"), "4");
        assert_eq!(pair("--checkpoints"), "s3://bucket/vigil/epoch-2");
        assert_eq!(pair("--initial-savepoint"), "up-1.{member}");
        let env = container.env.clone().expect("env");
        assert!(env.iter().any(|e| e.name == "AWS_ALLOW_HTTP"));
        assert_eq!(
            container.env_from.as_ref().expect("envFrom")[0]
                .secret_ref
                .as_ref()
                .map(|s| s.name.as_str()),
            Some("s3")
        );
        let member = env
            .iter()
            .find(|e| e.name == "VIGIL_MEMBER")
            .expect("member");
        assert_eq!(
            member
                .value_from
                .as_ref()
                .and_then(|v| v.field_ref.as_ref())
                .map(|f| f.field_path.as_str()),
            Some("metadata.name")
        );
        assert_eq!(
            c.config_map.data.expect("data")[PIPELINE_FILE],
            "name: demo\n"
        );
    }

    #[test]
    fn the_rendered_hash_follows_every_change() {
        let spec = VigilPipelineSpec {
            pipeline: Default::default(),
            ..serde_json::from_value(serde_json::json!({})).expect("spec")
        };
        let rendered = |sp| {
            render(&shape(&spec, sp))
                .stateful_set
                .metadata
                .annotations
                .expect("a")[RENDERED]
                .clone()
        };
        assert_eq!(rendered(None), rendered(None));
        assert_ne!(rendered(None), rendered(Some("x.{member}")));
    }
}
