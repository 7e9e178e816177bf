//! The Kubernetes operator against an API server double.
//!
//! No Kubernetes API server can run here: [`crate::kube_api::FakeApi`] is
//! an in-process double that kube-rs's real client and the real
//! controller talk to over HTTP (watches included). The StatefulSet
//! controller and the kubelet are played by [`Kubelet`]: it runs each pod
//! of each StatefulSet as a real local `vigil` process, from the rendered
//! container's command line, environment and ConfigMap file (the only
//! rewriting: the mounted paths become directories of the test, and the
//! pod's port a free loopback one), and reports readiness from the
//! process's own `/ready`. Savepoints are taken from those processes over
//! their real admin HTTP API. An image other than [`IMAGE`] cannot be
//! pulled, as a mistyped tag cannot.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::task::JoinSet;
use vigil_kubernetes::admin::PodAddress;

use crate::free_port;
use crate::kube_api::FakeApi;

/// The image the kubelet double can run: the `vigil` under test.
const IMAGE: &str = "vigil:test";
const NS: &str = "detections";
const PIPELINES: &str = "vigil.dev/v1alpha1/vigilpipelines";
const STATEFULSETS: &str = "apps/v1/statefulsets";
const CONFIGMAPS: &str = "/v1/configmaps";
const SERVICES: &str = "/v1/services";
const EVENTS: &str = "events.k8s.io/v1/events";

/// A pod: a `vigil` process, killed on drop.
struct Pod {
    child: Option<Child>,
    template: String,
    port: u16,
    ready: bool,
    /// Readiness probes failed in a row.
    failures: u32,
}

impl Drop for Pod {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Plays the StatefulSet controller and the kubelet (see the module doc).
struct Kubelet {
    dir: PathBuf,
    pods: Mutex<BTreeMap<String, Pod>>,
    /// Pod name to port, kept across restarts (the pod's DNS name).
    ports: Mutex<BTreeMap<String, u16>>,
}

impl Kubelet {
    fn new(dir: &Path) -> Arc<Self> {
        Arc::new(Self {
            dir: dir.to_path_buf(),
            pods: Mutex::new(BTreeMap::new()),
            ports: Mutex::new(BTreeMap::new()),
        })
    }

    fn address(&self, pod: &str) -> String {
        let port = *self
            .ports
            .lock()
            .entry(pod.to_string())
            .or_insert_with(free_port);
        format!("127.0.0.1:{port}")
    }

    fn pod_dir(&self, pod: &str) -> PathBuf {
        self.dir.join("pods").join(pod)
    }

    /// Starts pod `pod` of `sts` from its template, as a kubelet would.
    fn start(&self, api: &FakeApi, sts: &Value, pod: &str, template: &str) -> Pod {
        let ns = sts["metadata"]["namespace"].as_str().unwrap_or("");
        let spec = &sts["spec"]["template"]["spec"];
        let container = &spec["containers"][0];
        let port: u16 = self
            .address(pod)
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port");
        let pending = Pod {
            child: None,
            template: template.to_string(),
            port,
            ready: false,
            failures: 0,
        };
        if container["image"] != IMAGE {
            return pending;
        }
        let dir = self.pod_dir(pod);
        let state = dir.join("state");
        let etc = dir.join("etc");
        std::fs::create_dir_all(&state).expect("pod state");
        std::fs::create_dir_all(&etc).expect("pod etc");
        // The ConfigMap volume.
        let volume = spec["volumes"]
            .as_array()
            .and_then(|v| v.iter().find(|v| v["name"] == "pipeline"))
            .expect("a pipeline volume");
        let map = volume["configMap"]["name"].as_str().expect("its ConfigMap");
        let Some(map) = api.get(CONFIGMAPS, ns, map) else {
            return pending;
        };
        for (k, v) in map["data"].as_object().expect("data") {
            std::fs::write(etc.join(k), v.as_str().unwrap_or("")).expect("mount the file");
        }
        let args: Vec<String> = container["args"]
            .as_array()
            .expect("args")
            .iter()
            .map(|a| {
                let a = a.as_str().unwrap_or("");
                if a == "0.0.0.0:8686" {
                    format!("127.0.0.1:{port}")
                } else if let Some(rest) = a.strip_prefix("/etc/vigil") {
                    format!("{}{rest}", etc.display())
                } else if let Some(rest) = a.strip_prefix("/var/lib/vigil") {
                    format!("{}{rest}", state.display())
                } else {
                    a.to_string()
                }
            })
            .collect();
        assert_eq!(container["command"], json!(["vigil"]));
        let mut command = Command::new(env!("CARGO_BIN_EXE_vigil"));
        command.args(&args).env_remove("RUST_LOG");
        for e in container["env"].as_array().into_iter().flatten() {
            let name = e["name"].as_str().expect("env name");
            let value = match (
                &e["value"],
                e["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
            ) {
                (Value::String(v), _) => v.clone(),
                (_, Some("metadata.name")) => pod.to_string(),
                (_, Some("metadata.namespace")) => ns.to_string(),
                other => panic!("the kubelet double does not fill {name} from {other:?}"),
            };
            command.env(name, value);
        }
        let log = |name: &str| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join(name))
                .map_or(Stdio::null(), Stdio::from)
        };
        let child = command
            .stdout(log("stdout.log"))
            .stderr(log("vigil.log"))
            .spawn()
            .expect("start the pod's vigil");
        std::fs::write(dir.join("args"), args.join(" ")).expect("record the command");
        let mut pod = pending;
        pod.child = Some(child);
        pod
    }

    /// One pass over every StatefulSet: pods to start, replace or stop,
    /// readiness, and the StatefulSet's status.
    async fn sync(&self, api: &FakeApi) {
        let sets = api.list(STATEFULSETS);
        let mut wanted = std::collections::BTreeSet::new();
        for sts in &sets {
            let ns = sts["metadata"]["namespace"]
                .as_str()
                .unwrap_or("")
                .to_string();
            let name = sts["metadata"]["name"].as_str().unwrap_or("").to_string();
            let replicas = sts["spec"]["replicas"].as_i64().unwrap_or(1);
            let template = sts["spec"]["template"].to_string();
            for i in 0..replicas {
                let pod = format!("{name}-{i}");
                wanted.insert(pod.clone());
                let stale = self
                    .pods
                    .lock()
                    .get(&pod)
                    .is_none_or(|p| p.template != template);
                if stale {
                    // Stop the old pod before its replacement starts.
                    drop(self.pods.lock().remove(&pod));
                    let started = self.start(api, sts, &pod, &template);
                    self.pods.lock().insert(pod.clone(), started);
                }
            }
            self.pods
                .lock()
                .retain(|p, _| !p.starts_with(&format!("{name}-")) || wanted.contains(p));
            let ports: Vec<(String, u16, bool)> = self
                .pods
                .lock()
                .iter()
                .filter(|(p, _)| p.starts_with(&format!("{name}-")))
                .map(|(p, pod)| (p.clone(), pod.port, pod.child.is_some()))
                .collect();
            let mut ready = 0;
            for (pod, port, running) in &ports {
                let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
                let answer = if *running {
                    try_get(addr, "/ready").await
                } else {
                    None
                };
                let ok = answer.as_ref().is_some_and(|(s, _)| *s == 200);
                if let Some(p) = self.pods.lock().get_mut(pod) {
                    // As the rendered probe: not ready after 3 failures in a row.
                    p.failures = if ok { 0 } else { p.failures + 1 };
                    let ok = ok || (p.ready && p.failures < 3);
                    if p.ready != ok {
                        use std::io::Write;
                        if let Ok(mut f) = std::fs::OpenOptions::new()
                            .create(true)
                            .append(true)
                            .open(self.pod_dir(pod).join("readiness.log"))
                        {
                            let _ = writeln!(
                                f,
                                "{} ready={ok} {answer:?}",
                                k8s_openapi::jiff::Timestamp::now()
                            );
                        }
                    }
                    p.ready = ok;
                    ready += i64::from(ok);
                }
            }
            let running = ports.iter().filter(|p| p.2).count() as i64;
            api.set_status(
                STATEFULSETS,
                &ns,
                &name,
                json!({
                    "observedGeneration": sts["metadata"]["generation"],
                    "replicas": running,
                    "readyReplicas": ready,
                    "updatedReplicas": ports.len(),
                    "currentRevision": crate::kubernetes::revision(&template),
                    "updateRevision": crate::kubernetes::revision(&template),
                }),
            );
        }
        self.pods.lock().retain(|p, _| wanted.contains(p));
    }
}

/// `GET path`: status and body, or nothing if no one answers.
async fn try_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let response = reqwest::Client::new()
        .get(format!("http://{addr}{path}"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().await.ok()?))
}

/// A short stand-in for a controller-revision hash.
pub fn revision(template: &str) -> String {
    vigil_kubernetes::render::hash(template.as_bytes())
}

/// The double, the kubelet and the operator, running.
struct Cluster {
    api: Arc<FakeApi>,
    kubelet: Arc<Kubelet>,
    dir: tempfile::TempDir,
    /// The operator's own /metrics.
    metrics: SocketAddr,
    _tasks: JoinSet<()>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // VIGIL_KEEP_TEST_DIR keeps the pods' directories (logs, state) for a look.
        if std::env::var_os("VIGIL_KEEP_TEST_DIR").is_some() {
            let kept = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir"));
            eprintln!("kept {}", kept.keep().display());
        }
    }
}

fn options(kubelet: &Arc<Kubelet>, metrics: Option<SocketAddr>) -> vigil_kubernetes::Options {
    let k = kubelet.clone();
    vigil_kubernetes::Options {
        namespace: None,
        pod_address: PodAddress::Resolve(Arc::new(move |_, _, pod| k.address(pod))),
        metrics,
        leader: Some((
            NS.to_string(),
            "vigil-operator".to_string(),
            "test-operator".to_string(),
        )),
        lease_duration: Duration::from_secs(3),
        poll: Duration::from_millis(300),
        resync: Duration::from_secs(2),
    }
}

impl Cluster {
    async fn start(with_pods: bool) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let api = Arc::new(FakeApi::start().await);
        let kubelet = Kubelet::new(dir.path());
        let mut tasks = JoinSet::new();
        let client = api.client();
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let opts = options(&kubelet, Some(metrics));
        tasks.spawn(async move {
            if let Err(e) = vigil_kubernetes::run(client, vigil::operator::validator(), opts).await
            {
                panic!("the operator stopped: {e}");
            }
        });
        if with_pods {
            let (a, k) = (api.clone(), kubelet.clone());
            tasks.spawn(async move {
                loop {
                    k.sync(&a).await;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            });
        }
        Self {
            api,
            kubelet,
            dir,
            metrics,
            _tasks: tasks,
        }
    }

    fn pipeline(&self) -> Value {
        self.api
            .get(PIPELINES, NS, "demo")
            .expect("the VigilPipeline")
    }

    fn status(&self) -> Value {
        self.pipeline()["status"].clone()
    }

    fn condition(&self, type_: &str) -> (String, String, String) {
        let s = self.status();
        let c = s["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == type_).cloned())
            .unwrap_or(Value::Null);
        (
            c["status"].as_str().unwrap_or("").to_string(),
            c["reason"].as_str().unwrap_or("").to_string(),
            c["message"].as_str().unwrap_or("").to_string(),
        )
    }

    fn sts(&self) -> Value {
        self.api
            .get(STATEFULSETS, NS, "demo")
            .expect("the StatefulSet")
    }

    fn args(&self) -> Vec<String> {
        self.sts()["spec"]["template"]["spec"]["containers"][0]["args"]
            .as_array()
            .expect("args")
            .iter()
            .map(|a| a.as_str().unwrap_or("").to_string())
            .collect()
    }

    /// Changes the spec as `kubectl apply` would.
    async fn patch_spec(&self, patch: Value) {
        let api: kube::Api<vigil_kubernetes::VigilPipeline> =
            kube::Api::namespaced(self.api.client(), NS);
        api.patch(
            "demo",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({ "spec": patch })),
        )
        .await
        .expect("patch the spec");
    }

    async fn wait(&self, what: &str, within: Duration, done: impl Fn(&Self) -> bool) {
        let started = tokio::time::Instant::now();
        let deadline = started + within;
        while !done(self) {
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "{what}: not within {within:?}\nstatus: {:#}\nevents: {:#?}\npod logs: {}",
                    self.api
                        .get(PIPELINES, NS, "demo")
                        .map(|p| p["status"].clone())
                        .unwrap_or_default(),
                    self.events(),
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // How long each step took, for people (`--nocapture`).
        eprintln!("{what}: {:.1} s", started.elapsed().as_secs_f64());
    }

    fn events(&self) -> Vec<(String, String, String)> {
        self.api
            .list(EVENTS)
            .iter()
            .map(|e| {
                (
                    e["type"].as_str().unwrap_or("").to_string(),
                    e["reason"].as_str().unwrap_or("").to_string(),
                    e["note"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for pod in ["demo-0", "demo-1"] {
            if let Ok(l) = std::fs::read_to_string(self.kubelet.pod_dir(pod).join("vigil.log")) {
                let tail: Vec<&str> = l.lines().rev().take(15).collect();
                out.push_str(&format!(
                    "\n--- {pod}\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                ));
            }
        }
        out
    }

    fn phase(&self) -> String {
        self.status()["phase"].as_str().unwrap_or("").to_string()
    }

    fn running_hash(&self) -> String {
        self.status()["running"]["hash"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    /// The savepoints stored in pod `pod`'s volume.
    fn savepoints(&self, pod: &str) -> Vec<String> {
        let dir = self
            .kubelet
            .pod_dir(pod)
            .join("state/checkpoints/epoch-0/demo/savepoints");
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map(|d| {
                d.filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }
}

/// The example resource with the pipeline file in its ConfigMap, the test
/// image, quick checkpoints and a slow generator.
async fn create_demo(api: &FakeApi) -> Value {
    let client = api.client();
    let maps: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
        kube::Api::namespaced(client.clone(), NS);
    let map: k8s_openapi::api::core::v1::ConfigMap = serde_json::from_value(json!({
        "metadata": { "name": "demo-pipeline" },
        "data": { "pipeline.yaml": vigil::DEMO_PIPELINE },
    }))
    .expect("ConfigMap");
    maps.create(&kube::api::PostParams::default(), &map)
        .await
        .expect("create the ConfigMap");
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes/examples/demo.yaml"),
    )
    .expect("the example");
    let mut vp: vigil_kubernetes::VigilPipeline =
        serde_saphyr::from_str(&text).expect("the example is a VigilPipeline");
    vp.spec.image = IMAGE.to_string();
    vp.spec.parallelism = 1;
    vp.spec.resources = None;
    vp.spec.checkpoints.interval = Some("1s".to_string());
    for e in &mut vp.spec.env {
        if e.name == "VIGIL_DEMO_RATE" {
            e.value = Some("2000".to_string());
        }
    }
    let pipelines: kube::Api<vigil_kubernetes::VigilPipeline> = kube::Api::namespaced(client, NS);
    let created = pipelines
        .create(&kube::api::PostParams::default(), &vp)
        .await
        .expect("create the VigilPipeline");
    serde_json::to_value(created).expect("json")
}

/// Records the sources of the pipeline behind `addr` have sent on.
async fn processed(addr: SocketAddr) -> u64 {
    let Some((_, body)) = try_get(addr, "/v1/pipeline").await else {
        return 0;
    };
    let v: Value = serde_json::from_str(&body).unwrap_or_default();
    v["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| n["name"] == "auth")
        .flat_map(|n| n["subtasks"].as_array().cloned().unwrap_or_default())
        .map(|t| t["records_out"].as_u64().unwrap_or(0))
        .sum()
}

fn owned_by(object: &Value, uid: &Value) -> bool {
    object["metadata"]["ownerReferences"]
        .as_array()
        .is_some_and(|o| {
            o.iter()
                .any(|r| &r["uid"] == uid && r["controller"] == true)
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vigil_pipeline_is_deployed_upgraded_from_a_savepoint_rolled_back_suspended_resumed_and_deleted_with_a_final_savepoint(
) {
    tokio::time::timeout(Duration::from_secs(300), async {
        let c = Cluster::start(true).await;
        let created = create_demo(&c.api).await;
        let uid = created["metadata"]["uid"].clone();

        // Children, owned by the resource; the pod runs and processes data.
        c.wait("deployed and ready", Duration::from_secs(60), |c| {
            c.api.get(STATEFULSETS, NS, "demo").is_some() && c.phase() == "Running"
        })
        .await;
        for (kind, name) in [
            (CONFIGMAPS, "demo-vigil-pipeline"),
            (SERVICES, "demo"),
            (STATEFULSETS, "demo"),
        ] {
            let child = c.api.get(kind, NS, name).expect("a child");
            assert!(
                owned_by(&child, &uid),
                "{kind} {name} is owned by the VigilPipeline: {child:#}"
            );
        }
        assert_eq!(c.condition("Ready").0, "True");
        assert!(c.pipeline()["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| f
                .iter()
                .any(|f| f == vigil_kubernetes::controller::FINALIZER)));
        let addr: SocketAddr = c.kubelet.address("demo-0").parse().expect("addr");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while processed(addr).await == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the pod's pipeline takes events:{}",
                c.logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        c.wait(
            "the last checkpoint in status",
            Duration::from_secs(30),
            |c| c.status()["lastCheckpoint"]["id"].as_i64().unwrap_or(0) > 0,
        )
        .await;
        assert_eq!(c.status()["restarts"], 0);
        let v1 = c.running_hash();

        // An upgrade in savepoint mode: a rescale to parallelism 2.
        c.patch_spec(json!({ "parallelism": 2 })).await;
        c.wait("upgraded", Duration::from_secs(90), |c| {
            c.running_hash() != v1 && c.phase() == "Running"
        })
        .await;
        let v2 = c.running_hash();
        let upgrade = c.status()["lastSavepoint"].clone();
        assert_eq!(upgrade["reason"], "upgrade", "{upgrade:#}");
        let name = upgrade["name"]
            .as_str()
            .expect("a savepoint name")
            .to_string();
        let base = name.trim_end_matches(".{member}");
        let args = c.args();
        assert!(
            args.windows(2)
                .any(|w| w[0] == "--initial-savepoint" && w[1] == name),
            "{args:?}"
        );
        assert!(
            args.windows(2)
                .any(|w| w[0] == "--parallelism" && w[1] == "2"),
            "{args:?}"
        );
        assert!(
            c.savepoints("demo-0").contains(&format!("{base}.demo-0")),
            "{:?}",
            c.savepoints("demo-0")
        );
        let log =
            std::fs::read_to_string(c.kubelet.pod_dir("demo-0").join("vigil.log")).expect("log");
        assert!(
            log.lines()
                .any(|l| l.contains("restoring state") && l.contains(&format!("{base}.demo-0"))),
            "the new version restored the savepoint:{}",
            c.logs()
        );

        // An upgrade whose image cannot be pulled: rolled back, from the
        // savepoint taken before it, and not tried again.
        c.patch_spec(json!({ "image": "registry.invalid/vigil:typo", "upgradeDeadline": "3s" }))
            .await;
        c.wait("rolled back", Duration::from_secs(90), |c| {
            c.condition("Degraded").1 == "UpgradeFailed" && c.phase() == "Running"
        })
        .await;
        assert_eq!(c.running_hash(), v2, "back on the version before");
        let before = c.status()["lastSavepoint"]["name"]
            .as_str()
            .unwrap_or("")
            .to_string();
        assert!(before.starts_with("upgrade-"), "{before}");
        let args = c.args();
        assert!(
            args.windows(2).any(|w| w[0] == "--initial-savepoint"
                && w[1].starts_with(&before)
                && w[1].contains("#rollback-")),
            "{args:?}"
        );
        assert_eq!(
            c.sts()["spec"]["template"]["spec"]["containers"][0]["image"],
            IMAGE
        );
        assert!(
            c.events()
                .iter()
                .any(|e| e.0 == "Warning" && e.1 == "RolledBack"),
            "{:?}",
            c.events()
        );
        let failed = c.status()["failedSpecHash"]
            .as_str()
            .unwrap_or("")
            .to_string();
        assert!(!failed.is_empty());
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(
            c.running_hash(),
            v2,
            "the failed version is not tried again"
        );

        // A fixed spec goes through; then suspend and resume.
        c.patch_spec(json!({ "image": IMAGE, "upgradeDeadline": "2m" }))
            .await;
        c.wait("the fixed spec runs", Duration::from_secs(90), |c| {
            c.running_hash() != v2 && c.phase() == "Running" && c.condition("Degraded").0 == "False"
        })
        .await;
        c.patch_spec(json!({ "state": "suspended" })).await;
        c.wait("suspended", Duration::from_secs(60), |c| {
            c.phase() == "Suspended" && c.sts()["spec"]["replicas"] == 0
        })
        .await;
        let suspend = c.status()["lastSavepoint"].clone();
        assert_eq!(
            suspend["reason"],
            "suspend",
            "{suspend:#}\n{:#?}\n{:#}",
            c.events(),
            c.sts()["status"]
        );
        c.wait("the pod stops", Duration::from_secs(20), |c| {
            c.kubelet.pods.lock().is_empty()
        })
        .await;
        c.patch_spec(json!({ "state": "running" })).await;
        c.wait("resumed", Duration::from_secs(60), |c| {
            c.phase() == "Running" && c.sts()["spec"]["replicas"] == 1
        })
        .await;
        let args = c.args();
        let resumed_from = suspend["name"].as_str().expect("name");
        assert!(
            args.windows(2)
                .any(|w| w[0] == "--initial-savepoint" && w[1] == resumed_from),
            "{args:?}"
        );

        // A savepoint on demand.
        c.patch_spec(json!({ "savepointNonce": 7 })).await;
        c.wait("savepoint on demand", Duration::from_secs(30), |c| {
            c.status()["observedSavepointNonce"] == 7
        })
        .await;
        assert_eq!(c.status()["lastSavepoint"]["reason"], "manual");

        // Deletion: a final savepoint, then the resource and its children go.
        let pipelines: kube::Api<vigil_kubernetes::VigilPipeline> =
            kube::Api::namespaced(c.api.client(), NS);
        pipelines
            .delete("demo", &kube::api::DeleteParams::default())
            .await
            .expect("delete");
        c.wait("deleted", Duration::from_secs(60), |c| {
            c.api.get(PIPELINES, NS, "demo").is_none()
        })
        .await;
        assert!(
            c.savepoints("demo-0")
                .iter()
                .any(|s| s.starts_with("final-")),
            "{:?}",
            c.savepoints("demo-0")
        );
        assert!(c.api.get(STATEFULSETS, NS, "demo").is_none());
        assert!(c.api.get(CONFIGMAPS, NS, "demo-vigil-pipeline").is_none());
        assert!(c.api.get(SERVICES, NS, "demo").is_none());
        assert!(
            c.api.get(CONFIGMAPS, NS, "demo-pipeline").is_some(),
            "the user's ConfigMap stays"
        );
        let _ = &c.dir;
    })
    .await
    .expect("the lifecycle test bounds its time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciling_again_writes_nothing_and_every_child_is_owned_by_its_resource() {
    tokio::time::timeout(Duration::from_secs(60), async {
        // No operator in the background: each reconcile is called here.
        let api = FakeApi::start().await;
        let created = create_demo(&api).await;
        let uid = created["metadata"]["uid"].clone();
        let dir = tempfile::tempdir().expect("tempdir");
        let kubelet = Kubelet::new(dir.path());
        let ctx = Arc::new(
            vigil_kubernetes::Context::new(
                api.client(),
                vigil::operator::validator(),
                options(&kubelet, None),
            )
                .expect("context"),
        );
        let pipelines: kube::Api<vigil_kubernetes::VigilPipeline> = kube::Api::namespaced(api.client(), NS);
        let once = || async {
            let vp = pipelines.get("demo").await.expect("get");
            vigil_kubernetes::reconcile(Arc::new(vp), ctx.clone()).await.expect("reconcile");
        };
        // A variable from a Secret: the pods get the reference; the
        // operator never reads the Secret.
        pipelines
            .patch(
                "demo",
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(json!({ "spec": { "env": [
                    { "name": "VIGIL_DEMO_RATE", "value": "2000" },
                    { "name": "KAFKA_PASSWORD", "valueFrom": { "secretKeyRef": { "name": "kafka", "key": "password" } } },
                ] } })),
            )
            .await
            .expect("patch");
        // The finalizer, then the children and status, then the pods'
        // readiness as status.
        for _ in 0..3 {
            once().await;
        }
        let vp = api.get(PIPELINES, NS, "demo").expect("vp");
        assert_eq!(vp["status"]["phase"], "Deploying", "{:#}", vp["status"]);
        assert_eq!(vp["status"]["observedGeneration"], vp["metadata"]["generation"]);
        for (kind, name) in [(CONFIGMAPS, "demo-vigil-pipeline"), (SERVICES, "demo"), (STATEFULSETS, "demo")] {
            let child = api.get(kind, NS, name).expect("a child");
            assert!(owned_by(&child, &uid), "{kind} {name}: {child:#}");
            assert!(child["metadata"]["annotations"][vigil_kubernetes::render::RENDERED].is_string());
        }
        let env = api.get(STATEFULSETS, NS, "demo").expect("sts")["spec"]["template"]["spec"]["containers"][0]["env"].clone();
        assert!(
            env.as_array().is_some_and(|e| e.iter().any(|v| v["name"] == "KAFKA_PASSWORD"
                && v["valueFrom"]["secretKeyRef"] == json!({ "name": "kafka", "key": "password" }))),
            "{env:#}"
        );
        assert!(
            !api.requests().iter().any(|r| r.contains("/secrets")),
            "the operator reads no Secret"
        );
        let map = api.get(CONFIGMAPS, NS, "demo-vigil-pipeline").expect("ConfigMap");
        assert_eq!(map["data"]["pipeline.yaml"], vigil::DEMO_PIPELINE, "the validated file, as it is");
        let writes = api.writes();
        once().await;
        once().await;
        assert_eq!(api.writes(), writes, "reconciling twice more changed nothing");

        // A StatefulSet scaled by hand is put back.
        let statefulsets: kube::Api<k8s_openapi::api::apps::v1::StatefulSet> =
            kube::Api::namespaced(api.client(), NS);
        statefulsets
            .patch("demo", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(json!({ "spec": { "replicas": 5 } })))
            .await
            .expect("scale by hand");
        once().await;
        assert_eq!(api.get(STATEFULSETS, NS, "demo").expect("sts")["spec"]["replicas"], 1);
        once().await;

        // Pods ready (as the StatefulSet controller would report them).
        let sts = api.get(STATEFULSETS, NS, "demo").expect("sts");
        api.set_status(
            STATEFULSETS,
            NS,
            "demo",
            json!({ "observedGeneration": sts["metadata"]["generation"], "replicas": 1, "readyReplicas": 1, "updatedReplicas": 1 }),
        );
        once().await;
        let vp = api.get(PIPELINES, NS, "demo").expect("vp");
        assert_eq!(vp["status"]["phase"], "Running", "{:#}", vp["status"]);
        assert_eq!(vp["status"]["lastGood"]["hash"], vp["status"]["running"]["hash"]);
        let writes = api.writes();
        once().await;
        once().await;
        assert_eq!(api.writes(), writes, "at rest, a reconcile writes nothing");
    })
    .await
    .expect("bounded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_resource_gets_a_condition_and_an_event_backs_off_and_leaves_the_running_pipeline_alone(
) {
    tokio::time::timeout(Duration::from_secs(180), async {
        let c = Cluster::start(true).await;
        create_demo(&c.api).await;
        c.wait("running", Duration::from_secs(60), |c| c.phase() == "Running").await;
        let sts = c.sts();
        let pid = |c: &Cluster| c.kubelet.pods.lock().get("demo-0").and_then(|p| p.child.as_ref().map(Child::id));
        let before = pid(&c);
        let hash = c.running_hash();
        let cases = [
            (json!({ "upgradeMode": "sideways" }), "InvalidSpec", "spec.upgradeMode \"sideways\""),
            (json!({ "upgradeMode": "savepoint", "parallelism": 0 }), "InvalidSpec", "spec.parallelism is 0"),
            (json!({ "parallelism": 1, "pipeline": { "configMapRef": null } }), "MissingPipeline", "spec.pipeline"),
            (json!({ "pipeline": { "configMapRef": { "name": "nope" } } }), "ConfigMapNotFound", "ConfigMap detections/nope does not exist"),
            (
                json!({ "pipeline": { "configMapRef": null, "inline": "name: demo\nsources:\n  auth:\n    type: generator\n    stream: auth\n    rat: 5\n" } }),
                "InvalidPipeline",
                "VigilPipeline detections/demo: spec.pipeline.inline:6:5: unknown field \"rat\"",
            ),
        ];
        for (patch, reason, message) in cases {
            c.patch_spec(patch.clone()).await;
            c.wait(&format!("{patch} is reported"), Duration::from_secs(30), |c| {
                let (status, r, m) = c.condition("Degraded");
                status == "True" && r == reason && m.contains(message)
            })
            .await;
            // The event follows the status write.
            c.wait(&format!("an event for {patch}"), Duration::from_secs(10), |c| {
                c.events().iter().any(|e| e.0 == "Warning" && e.1 == reason && e.2.contains(message))
            })
            .await;
            assert_eq!(c.condition("Ready").0, "True", "the running pipeline stays ready");
            assert_eq!(c.running_hash(), hash);
            assert_eq!(c.sts()["metadata"]["resourceVersion"], sts["metadata"]["resourceVersion"], "the StatefulSet is untouched");
            assert_eq!(pid(&c), before, "the pod is untouched");
        }

        // No hot loop: reconciles of the bad resource back off (5 s, 10 s, ...).
        let reads = |c: &Cluster| {
            c.api
                .requests()
                .iter()
                .filter(|r| r.as_str() == "GET /apis/apps/v1/namespaces/detections/statefulsets/demo")
                .count()
        };
        let start = reads(&c);
        tokio::time::sleep(Duration::from_secs(12)).await;
        let tries = reads(&c) - start;
        assert!(tries <= 4, "{tries} reconciles in 12 s");

        let (status, text) = try_get(c.metrics, "/metrics").await.expect("operator metrics");
        assert_eq!(status, 200);
        for line in [
            "vigil_operator_reconcile_errors_total{reason=\"InvalidSpec\"}",
            "vigil_operator_reconcile_errors_total{reason=\"InvalidPipeline\"}",
            "vigil_operator_reconcile_errors_total{reason=\"ConfigMapNotFound\"}",
            "vigil_operator_reconciles_total{result=\"ok\"}",
            "vigil_operator_reconcile_duration_seconds_count",
            "vigil_operator_leader 1",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }

        // Put right, the same version runs on without a restart.
        c.patch_spec(json!({ "pipeline": { "inline": null, "configMapRef": { "name": "demo-pipeline", "key": "pipeline.yaml" } } })).await;
        c.wait("healthy again", Duration::from_secs(60), |c| c.condition("Degraded").0 == "False").await;
        assert_eq!(c.running_hash(), hash);
        assert_eq!(pid(&c), before);
    })
    .await
    .expect("bounded");
}

/// A tool the manifests' checks need: on PATH, or at `$VIGIL_<NAME>`. In
/// CI a missing one fails the test; elsewhere the test says so and stops.
fn tool(name: &str) -> Option<PathBuf> {
    let var = format!("VIGIL_{}", name.to_uppercase().replace('-', "_"));
    if let Some(p) = std::env::var_os(&var) {
        return Some(PathBuf::from(p));
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{name} is missing (set {var} or put it on PATH; .ci/run installs it)"
        );
        eprintln!("skipped: {name} is not installed");
    }
    found
}

fn run_tool(program: &Path, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .expect("run the tool");
    assert!(
        out.status.success(),
        "{} {args:?} failed:\n{}\n{}",
        program.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_crd_and_manifests_are_generated_from_the_code_and_valid_for_kubernetes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let crd = vigil_kubernetes::resource::crd_yaml().expect("the CRD");
    for path in [
        "deploy/helm/vigil-operator/crds/vigilpipelines.yaml",
        "deploy/kubernetes/crd.yaml",
    ] {
        let checked_in = std::fs::read_to_string(root.join(path)).expect("the checked-in CRD");
        assert!(
            checked_in == crd,
            "{path} is stale: run `cargo run -- operator crd > deploy/helm/vigil-operator/crds/vigilpipelines.yaml`"
        );
    }
    let dir = tempfile::tempdir().expect("tempdir");

    // The children of the example, rendered by the command the README shows.
    let text = std::fs::read_to_string(root.join("deploy/kubernetes/examples/demo.yaml"))
        .expect("example");
    let mut example: Value = serde_saphyr::from_str(&text).expect("the example parses");
    example["spec"]["pipeline"] = json!({ "inline": vigil::DEMO_PIPELINE });
    let inline = dir.path().join("demo-inline.json");
    std::fs::write(&inline, example.to_string()).expect("write");
    let rendered = run_tool(
        Path::new(env!("CARGO_BIN_EXE_vigil")),
        &["operator", "render", inline.to_str().expect("path")],
    );
    let children = dir.path().join("children.yaml");
    std::fs::write(&children, &rendered).expect("write");
    assert!(rendered.contains("kind: StatefulSet") && !rendered.contains("--initial-savepoint"));

    let Some(validate) = tool("kubernetes-validate") else {
        return;
    };
    let Some(helm) = tool("helm") else {
        return;
    };
    let chart = root.join("deploy/helm/vigil-operator");
    let chart = chart.to_str().expect("path");
    run_tool(&helm, &["lint", "--strict", chart]);
    let template = |extra: &[&str]| {
        let mut args = vec![
            "template",
            "vigil-operator",
            chart,
            "--namespace",
            "vigil-system",
        ];
        args.extend_from_slice(extra);
        run_tool(&helm, &args)
    };
    let manifest = template(&[]);
    let plain = std::fs::read_to_string(root.join("deploy/kubernetes/operator.yaml"))
        .expect("operator.yaml");
    assert!(
        plain.ends_with(&manifest),
        "deploy/kubernetes/operator.yaml is stale: its part below the Namespace is `helm template vigil-operator deploy/helm/vigil-operator --namespace vigil-system`"
    );
    let namespaced = dir.path().join("namespaced.yaml");
    std::fs::write(
        &namespaced,
        template(&["--set", "watchNamespace=detections"]),
    )
    .expect("write");
    let files = [
        root.join("deploy/kubernetes/crd.yaml"),
        root.join("deploy/kubernetes/operator.yaml"),
        namespaced,
        children,
    ];
    let mut args = vec!["--strict", "-k", "1.33.0"];
    args.extend(files.iter().map(|f| f.to_str().expect("path")));
    let report = run_tool(&validate, &args);
    assert!(
        !report.contains("ERROR") && !report.contains("WARN"),
        "{report}"
    );
    for kind in [
        "customresourcedefinition/",
        "deployment/",
        "clusterrole/",
        "role/",
        "statefulset/",
        "service/",
        "configmap/",
    ] {
        assert!(
            report.contains(&format!("passed for resource {kind}")),
            "{kind} checked:\n{report}"
        );
    }

    // The example against the CRD's own schema (kubernetes-validate has no
    // schema for a custom kind; its jsonschema package checks it).
    let crd: Value = serde_saphyr::from_str(
        crd.trim_start_matches(|c| c != '-')
            .trim_start_matches("---\n"),
    )
    .expect("the CRD parses");
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    let check = dir.path().join("check.py");
    std::fs::write(
        &check,
        "import json, sys, jsonschema\nschema, doc = (json.load(open(p)) for p in sys.argv[1:3])\njsonschema.validate(doc, schema)\nbad = dict(doc); bad['spec'] = dict(doc['spec'], upgradeMode='sideways', parallelism=0)\ntry:\n    jsonschema.validate(bad, schema)\n    sys.exit('a bad spec passed')\nexcept jsonschema.ValidationError:\n    print('ok')\n",
    )
    .expect("write");
    let schema_file = dir.path().join("schema.json");
    std::fs::write(&schema_file, schema.to_string()).expect("write");
    let python = validate
        .parent()
        .map(|d| d.join("python3"))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("python3"));
    let out = run_tool(
        &python,
        &[
            check.to_str().expect("path"),
            schema_file.to_str().expect("path"),
            inline.to_str().expect("path"),
        ],
    );
    assert_eq!(out.trim(), "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_operator_leads_at_a_time_and_another_takes_over_a_lease_left_to_expire() {
    tokio::time::timeout(Duration::from_secs(30), async {
        use k8s_openapi::api::coordination::v1::Lease;
        use vigil_kubernetes::leader::LeaderLease;
        let api = FakeApi::start().await;
        let leases = || kube::Api::<Lease>::namespaced(api.client(), "vigil-system");
        let a = LeaderLease::new(
            leases(),
            "vigil-operator",
            "operator-a",
            Duration::from_secs(2),
        );
        let b = LeaderLease::new(
            leases(),
            "vigil-operator",
            "operator-b",
            Duration::from_secs(2),
        );
        assert!(
            a.try_hold().await.expect("a"),
            "the first candidate takes the free lease"
        );
        assert!(
            !b.try_hold().await.expect("b"),
            "the second waits while it is held"
        );
        assert!(a.try_hold().await.expect("a renews"));
        assert!(!b.try_hold().await.expect("b"));
        // a stops renewing (its process died): once the lease has run out, b leads.
        tokio::time::sleep(Duration::from_millis(2300)).await;
        assert!(b.try_hold().await.expect("b takes over"));
        assert!(
            !a.try_hold().await.expect("a"),
            "the old leader does not take it back"
        );
        let lease = api
            .get(
                "coordination.k8s.io/v1/leases",
                "vigil-system",
                "vigil-operator",
            )
            .expect("lease");
        assert_eq!(lease["spec"]["holderIdentity"], "operator-b");
        assert_eq!(lease["spec"]["leaseTransitions"], 1);
        // A leader that loses the lease stops: keep() returns.
        let lost = tokio::time::timeout(Duration::from_secs(5), a.keep())
            .await
            .expect("a notices");
        assert!(lost.to_string().contains("taken over"), "{lost}");
    })
    .await
    .expect("bounded");
}

/// `vigil run --initial-savepoint`: the savepoint on the first start, the
/// latest checkpoint on a restart after a checkpoint (a pod restarted after
/// an upgrade must not go back to the savepoint), and the savepoint again
/// for a new start told apart with `#`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_initial_savepoint_is_restored_once_and_a_restart_goes_on_from_the_latest_checkpoint() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("demo.yaml");
        std::fs::write(&file, vigil::DEMO_PIPELINE).expect("write");
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let start = |extra: &[&str], log: &str| {
            let mut args: Vec<String> = [
                "run",
                file.to_str().expect("path"),
                "--checkpoints",
                dir.path().join("checkpoints").to_str().expect("path"),
                "--checkpoint-interval",
                "1s",
                "--http",
                &addr.to_string(),
                "--progress",
                "off",
                "--log-format",
                "json",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            args.extend(extra.iter().map(|s| s.to_string()));
            let child = Command::new(env!("CARGO_BIN_EXE_vigil"))
                .args(&args)
                .env("VIGIL_DEMO_RATE", "2000")
                .env("VIGIL_DEMO_EVENTS", "100000000")
                .env("VIGIL_MEMBER", "demo-0")
                .env_remove("RUST_LOG")
                .stdout(Stdio::null())
                .stderr(
                    std::fs::File::create(dir.path().join(log)).map_or(Stdio::null(), Stdio::from),
                )
                .spawn()
                .expect("start vigil");
            Pod {
                child: Some(child),
                template: String::new(),
                port,
                ready: false,
                failures: 0,
            }
        };
        let checkpoint = || async {
            let (_, body) = try_get(addr, "/v1/checkpoints").await?;
            serde_json::from_str::<Value>(&body).ok()?["checkpoints"]["latest_id"].as_u64()
        };
        let until_checkpoint = |after: u64| async move {
            loop {
                if checkpoint().await.is_some_and(|id| id > after) {
                    return checkpoint().await.unwrap_or(0);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        let log = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap_or_default();
        let restored = |name: &str| {
            log(name)
                .lines()
                .find(|l| l.contains("restoring state"))
                .map(|l| {
                    serde_json::from_str::<Value>(l).expect("a JSON log line")["fields"].clone()
                })
        };

        let first = start(&[], "1.log");
        until_checkpoint(0).await;
        let admin = vigil_kubernetes::admin::Admin::default();
        let sp = admin
            .savepoint(&addr.to_string(), "up.demo-0")
            .await
            .expect("savepoint");
        drop(first);

        let second = start(&["--initial-savepoint", "up.{member}"], "2.log");
        let after = until_checkpoint(sp.checkpoint as u64).await;
        // The run records that it went past the savepoint once a checkpoint
        // after it is complete (beside its checkpoints).
        let marker = dir.path().join("checkpoints/demo/started-from/demo-0");
        while std::fs::read_to_string(&marker).ok().as_deref() != Some("up.demo-0") {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let r = restored("2.log").expect("a restore");
        assert_eq!(r["savepoint"], "Some(\"up.demo-0\")", "{r}");
        assert_eq!(r["checkpoint"], sp.checkpoint);
        drop(second);

        let third = start(&["--initial-savepoint", "up.{member}"], "3.log");
        until_checkpoint(after).await;
        assert!(
            log("3.log").contains("started from this savepoint before"),
            "{}",
            log("3.log")
        );
        let r = restored("3.log").expect("a restore");
        assert!(
            r["checkpoint"].as_u64().unwrap_or(0) >= after,
            "the latest checkpoint, not the savepoint: {r}"
        );
        drop(third);

        let fourth = start(&["--initial-savepoint", "up.{member}#rollback-1"], "4.log");
        until_checkpoint(0).await;
        let r = restored("4.log").expect("a restore");
        assert_eq!(
            r["savepoint"], "Some(\"up.demo-0\")",
            "a new start from the savepoint: {r}"
        );
        drop(fourth);
    })
    .await
    .expect("bounded");
}
