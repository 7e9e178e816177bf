//! The shipped incidents pipeline on a Kafka-protocol broker (librdkafka's
//! mock cluster, over TCP): incidents from the generator's injected attacks,
//! read models over HTTP while it runs (tenant-scoped), analysts' actions
//! through Kafka, and restarts that rebuild the same state from the event
//! log, from its snapshots or from its first record.
//!
//! The HTTP client here is a few lines of HTTP/1.1 over a TCP stream: the
//! server under test is the real one (axum, on a real socket).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;
use vigil::pipeline::{load, Plan};
use vigil_connectors::generator::AttackKind;
use vigil_engine::RuntimeOptions;

use crate::{launch, options_with};

pub(crate) const TENANTS: [&str; 3] = ["acme", "globex", "initech"];

/// `GET path` with the tenant header: status and body.
pub(crate) async fn get(addr: SocketAddr, path: &str, tenant: Option<&str>) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let tenant = tenant.map_or(String::new(), |t| format!("X-Tenant-Id: {t}\r\n"));
    let req = format!("GET {path} HTTP/1.1\r\nHost: vigil\r\n{tenant}Connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("send");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("read");
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

async fn get_json(addr: SocketAddr, path: &str, tenant: &str) -> (u16, serde_json::Value) {
    let (status, body) = get(addr, path, Some(tenant)).await;
    let v = serde_json::from_str(&body).unwrap_or(serde_json::Value::Null);
    (status, v)
}

/// Polls `check` every 5 ms until it holds; how long that took (wall
/// time, which a test of freshness measures).
#[allow(clippy::disallowed_methods)]
async fn until<F, Fut>(what: &str, limit: Duration, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Every tenant's incident summaries, by incident id.
async fn summaries(addr: SocketAddr) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for t in TENANTS {
        let (status, page) = get_json(addr, "/v1/read-models/incident_summary?limit=1000", t).await;
        assert_eq!(status, 200, "{page}");
        for item in page["items"].as_array().expect("items") {
            out.insert(
                item["incident_id"].as_str().expect("id").to_string(),
                item.to_string(),
            );
        }
    }
    out
}

fn plan(brokers: &str, events: &str, snapshots: &str) -> Plan {
    let options = options_with(&[
        ("KAFKA_BROKERS", brokers),
        ("VIGIL_INCIDENTS_START", "2026-01-01T00:00:00Z"),
        ("VIGIL_INCIDENTS_EVENTS", events),
        ("VIGIL_INCIDENTS_SNAPSHOTS", snapshots),
    ]);
    let mut plan = load(std::path::Path::new("pipelines/incidents.yaml"), &options)
        .expect("the shipped pipeline is valid");
    // The events go to stdout in the shipped file; here they are kept.
    plan.capture("incident_events").expect("the events sink");
    plan
}

async fn serve(plan: &Plan, tasks: &mut JoinSet<std::io::Result<()>>) -> SocketAddr {
    let listener = vigil::http::bind("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let control = std::sync::Arc::new(vigil::http::Control::for_plan(plan));
    tasks.spawn(vigil::http::serve(
        listener,
        plan.read_models.clone(),
        control,
    ));
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incidents_are_served_per_tenant_take_actions_and_survive_restarts() {
    let cluster = MockCluster::new(1).expect("mock cluster");
    let brokers = cluster.bootstrap_servers();
    let first = plan(&brokers, "1440000", "incidents.snapshots");
    for t in first
        .kafka_topics
        .iter()
        .chain(["incidents.snapshots.fresh".to_string()].iter())
    {
        cluster.create_topic(t, 4, 1).expect("topic");
    }
    let chain = first.generators["auth"]
        .ground_truth(i64::MAX)
        .into_iter()
        .find(|a| a.kind == AttackKind::AccountTakeover);
    let chain = chain.unwrap_or_else(|| {
        panic!(
            "the chain is injected: {:#?}",
            first.generators["auth"].ground_truth(i64::MAX)
        )
    });
    let (tenant, user) = (chain.tenant.clone(), chain.user.clone().expect("a user"));
    let other = TENANTS
        .iter()
        .find(|t| **t != tenant)
        .expect("another tenant");

    let mut http = JoinSet::new();
    let addr = serve(&first, &mut http).await;
    let run = launch(&first.graph, RuntimeOptions::default());

    // Without a tenant, nothing.
    let (status, _) = get(addr, "/v1/read-models", None).await;
    assert_eq!(status, 400);

    // The taken-over account: lateral movement (high) and the chain
    // (critical) on one incident, escalated by the second detection.
    let risk_path = format!("/v1/read-models/entity_risk/user:{user}");
    until(
        "the account takeover's incident",
        Duration::from_secs(240),
        || async {
            let (s, v) = get_json(addr, &risk_path, &tenant).await;
            s == 200 && v["max_severity"] == "critical"
        },
    )
    .await;
    let (_, risk) = get_json(addr, &risk_path, &tenant).await;
    let incident = risk["incident_ids"].as_str().expect("ids").to_string();
    assert!(!incident.contains(','), "one open incident: {risk}");
    let summary_path = format!("/v1/read-models/incident_summary/{incident}");
    let (_, summary) = get_json(addr, &summary_path, &tenant).await;
    assert_eq!(summary["severity"], "critical", "{summary}");
    let detections = summary["detections"].as_str().expect("detections");
    assert!(
        detections.contains("account_takeover") && detections.contains("lateral_movement"),
        "{summary}"
    );

    // Another tenant sees none of it, by key or by listing.
    let (s, _) = get_json(addr, &risk_path, other).await;
    assert_eq!(s, 404);
    let (s, _) = get_json(addr, &summary_path, other).await;
    assert_eq!(s, 404);
    for t in TENANTS.iter().filter(|t| **t != tenant) {
        let (_, page) = get_json(addr, "/v1/read-models/open_incidents?limit=1000", t).await;
        for item in page["items"].as_array().expect("items") {
            assert_eq!(item["tenant_id"], *t, "{item}");
            assert_ne!(item["incident_id"], incident.as_str());
        }
    }
    // A filter on the tenant column cannot widen the scope.
    let (s, _) = get_json(
        addr,
        &format!("/v1/read-models/open_incidents?tenant_id={tenant}"),
        other,
    )
    .await;
    assert_eq!(s, 400);

    // Analysts act through Kafka; the read models follow.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .expect("producer");
    let action = |id: &str, kind: &str, extra: &str| {
        format!(
            r#"{{"event_id":"{id}","event_type":"{kind}","incident_id":"{incident}","tenant_id":"{tenant}","entity_type":"user","entity_id":"{user}","actor":"alice@soc",{extra}"time":"2026-01-01T00:06:00Z"}}"#
        )
    };
    let send = |value: String| {
        let producer = producer.clone();
        let key = incident.clone();
        async move {
            producer
                .send(
                    FutureRecord::to("incidents.actions")
                        .key(&key)
                        .payload(&value),
                    Duration::from_secs(5),
                )
                .await
                .expect("sent");
        }
    };
    send(action(
        "analyst-1",
        "IncidentAssigned",
        r#""assignee":"alice@soc","#,
    ))
    .await;
    let assigned = until(
        "the assignment in the summary",
        Duration::from_secs(30),
        || async {
            let (_, v) = get_json(addr, &summary_path, &tenant).await;
            v["assignee"] == "alice@soc"
        },
    )
    .await;
    send(action(
        "analyst-2",
        "IncidentResolved",
        r#""resolution":"true_positive","#,
    ))
    .await;
    let resolved = until(
        "the resolution in the open incidents",
        Duration::from_secs(30),
        || async {
            let open = format!("/v1/read-models/open_incidents/{incident}");
            get_json(addr, &open, &tenant).await.0 == 404
        },
    )
    .await;
    // No open incident: the entity leaves the risk model.
    until(
        "the entity's risk to go",
        Duration::from_secs(30),
        || async { get_json(addr, &risk_path, &tenant).await.0 == 404 },
    )
    .await;
    // Redelivered: ignored, the version stays.
    let (_, before) = get_json(addr, &summary_path, &tenant).await;
    send(action(
        "analyst-2",
        "IncidentResolved",
        r#""resolution":"true_positive","#,
    ))
    .await;
    send(action(
        "analyst-1",
        "IncidentAssigned",
        r#""assignee":"alice@soc","#,
    ))
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, after) = get_json(addr, &summary_path, &tenant).await;
    assert_eq!(after["status"], "resolved");
    assert_eq!(after["version"], before["version"], "{after}");
    eprintln!(
        "read model freshness over Kafka: assignment {} ms, resolution {} ms",
        assigned.as_millis(),
        resolved.as_millis()
    );
    assert!(resolved < Duration::from_secs(5));

    // The run's last state, once the generator is done.
    until(
        "the generator to finish",
        Duration::from_secs(240),
        || async { run.metrics.node_totals("auth").records_in >= 1_440_000 },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let state = summaries(addr).await;
    assert!(state.len() >= 5, "{state:#?}");
    run.finish().await;
    http.abort_all();

    // A restart (no new telemetry): the latest snapshots plus the tail.
    // The actions topic is read again from the start: all duplicates.
    for (snapshots, what) in [
        ("incidents.snapshots", "snapshot + tail"),
        ("incidents.snapshots.fresh", "full replay"),
    ] {
        let again = plan(&brokers, "1", snapshots);
        let mut http = JoinSet::new();
        let addr = serve(&again, &mut http).await;
        let run = launch(&again.graph, RuntimeOptions::default());
        until(what, Duration::from_secs(60), || async {
            summaries(addr).await == state
        })
        .await;
        run.finish().await;
        http.abort_all();
    }
}
