//! Avro through a broker and the Schema Registry: librdkafka's mock cluster
//! (a real Kafka-protocol broker over TCP) and the registry test double of
//! [`crate::registry`].

use std::collections::HashMap;
use std::time::Duration;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{Schema, TimestampMillisecondType};
use arrow_avro::schema::{AvroSchema, FingerprintStrategy, SCHEMA_METADATA_KEY};
use arrow_avro::writer::format::AvroSoeFormat;
use arrow_avro::writer::WriterBuilder;
use rdkafka::config::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use vigil::pipeline::load_str;
use vigil_connectors::avro::{arrow_schema, load_schema_file, AvroDecoder, Lookup};
use vigil_engine::RuntimeOptions;

use crate::kafka::{read_dead_letters, read_raw};
use crate::options_with;
use crate::registry::Registry;

const SCHEMAS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/schemas/security-events.avsc");
const START: i64 = 1_767_225_600_000;

/// The shipped authentication event, and a next version of it whose
/// producer added an optional field to `data`.
fn writer_schemas() -> (String, String) {
    let v1 = load_schema_file(SCHEMAS, Some("AuthenticationEvent"), "schema.avro")
        .expect("schema")
        .json_string;
    let mut v2: serde_json::Value = serde_json::from_str(&v1).expect("json");
    let data = v2["fields"]
        .as_array_mut()
        .expect("fields")
        .iter_mut()
        .find(|f| f["name"] == "data")
        .expect("data");
    data["type"]["fields"]
        .as_array_mut()
        .expect("data fields")
        .push(
            serde_json::json!({"name": "mfaMethod", "type": ["null", "string"], "default": null}),
        );
    (v1, v2.to_string())
}

/// Event `i` as JSON: users u0..u9, every third a failure.
fn event(i: i64, with_mfa: bool) -> String {
    let outcome = if i % 3 == 0 { "failure" } else { "success" };
    let mfa = if with_mfa {
        r#","mfaMethod":"totp""#
    } else {
        ""
    };
    format!(
        r#"{{"id":"evt-{i}","type":"auth.user.login","version":"1.0.0","time":{},
"source":{{"service":"idp","version":"4.2","instance":"idp-1"}},
"tenant":{{"tenantId":"t{}","organizationId":null}},
"correlation":{{"correlationId":"c-{i}","traceId":null,"spanId":null,"causationId":null}},
"security":{{"classification":"internal","sensitivity":null}},
"data":{{"userId":"u{}","sessionId":null,"authMethod":"password","outcome":"{outcome}",
"clientIp":"203.0.113.{}","userAgent":null,"deviceId":null,"country":"NL","riskScore":0.5,
"anomalies":["new_device"]{mfa}}}}}"#,
        START + i * 1000,
        i % 2,
        i % 10,
        i % 250,
    )
    .replace('\n', "")
}

/// Confluent-framed records of `events` written with `schema` under `id`.
fn framed(schema: &str, id: u32, events: &[String]) -> Vec<Vec<u8>> {
    let arrow = arrow_schema(&AvroSchema::new(schema.to_string())).expect("arrow");
    let mut decoder = arrow_json::ReaderBuilder::new(arrow.clone())
        .build_decoder()
        .expect("json decoder");
    decoder.decode(events.join("\n").as_bytes()).expect("json");
    let batch = decoder.flush().expect("flush").expect("rows");
    let mut md = HashMap::new();
    md.insert(SCHEMA_METADATA_KEY.to_string(), schema.to_string());
    let mut encoder = WriterBuilder::new(Schema::new(arrow.fields().clone()).with_metadata(md))
        .with_fingerprint_strategy(FingerprintStrategy::Id(id))
        .build_encoder::<AvroSoeFormat>()
        .expect("encoder");
    encoder.encode(&batch).expect("encode");
    encoder.flush().iter().map(|b| b.to_vec()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn avro_in_avro_out_through_the_registry_with_evolution_and_dead_letters() {
    let cluster = MockCluster::new(1).expect("mock cluster");
    for (t, n) in [("auth-avro", 2), ("failures-avro", 2), ("auth-avro.dlq", 1)] {
        cluster.create_topic(t, n, 1).expect("topic");
    }
    let brokers = cluster.bootstrap_servers();
    let registry = Registry::start().await;
    let (v1, v2) = writer_schemas();
    let id1 = registry.register("auth-avro-value", &v1);
    let id2 = registry.register("auth-avro-value", &v2);
    assert_ne!(id1, id2);

    // 120 events from producers of both versions, then one of each kind of
    // bad record.
    let old: Vec<String> = (0..60).map(|i| event(i, false)).collect();
    let new: Vec<String> = (60..120).map(|i| event(i, true)).collect();
    let mut records = framed(&v1, id1, &old);
    records.extend(framed(&v2, id2, &new));
    let mut truncated = records[3].clone();
    truncated.truncate(20);
    let mut unknown = records[4].clone();
    unknown[1..5].copy_from_slice(&999u32.to_be_bytes());
    let bad: Vec<(Vec<u8>, &str)> = vec![
        (br#"{"id":"json-not-avro"}"#.to_vec(), "invalid_avro"),
        (unknown, "unknown_schema_id"),
        (truncated, "avro_mismatch"),
    ];
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .expect("producer");
    for (i, value) in records.iter().chain(bad.iter().map(|(b, _)| b)).enumerate() {
        let record = FutureRecord::<str, [u8]>::to("auth-avro")
            .partition((i % 2) as i32)
            .payload(value);
        producer
            .send(record, Duration::from_secs(10))
            .await
            .expect("delivered");
    }

    let text = format!(
        "\
name: avro-it
sources:
  auth:
    type: kafka
    brokers: {brokers}
    topics: [auth-avro]
    format: avro
    registry: {{ url: \"{url}\" }}
    properties: {{ session.timeout.ms: \"6000\" }}
    schema:
      avro: {SCHEMAS}
      avro_record: AuthenticationEvent
      event_time: {{ field: time }}
      flatten: true
transforms:
  failed:
    type: filter
    input: auth
    where: \"\\\"data.outcome\\\" = 'failure'\"
sinks:
  out:
    type: kafka
    input: failed
    brokers: {brokers}
    topic: failures-avro
    format: avro
    registry: {{ url: \"{url}\" }}
    key: data.userId
",
        url = registry.url
    );
    let plan = load_str("avro.yaml", &text, &options_with(&[])).expect("valid");
    let launched = crate::launch(
        &plan.graph,
        RuntimeOptions {
            checkpoint_interval: Some(Duration::from_millis(300)),
            ..RuntimeOptions::default()
        },
    );
    let failures = (0..120).filter(|i| i % 3 == 0).count();
    let got = read_raw(&brokers, "failures-avro", failures, Duration::from_secs(60)).await;
    let metrics = launched.metrics.clone();
    launched.finish().await;

    // The sink registered the schema it derived, and every record names it.
    let registered = registry.subject("failures-avro-value");
    assert_eq!(registered.len(), 1, "one schema for the output topic");
    let (out_id, out_schema) = registered[0].clone();
    let mut decoder = AvroDecoder::new(AvroSchema::new(out_schema), 1024).expect("decoder");
    decoder.insert_writer(
        out_id,
        Lookup::Found(registry.subject("failures-avro-value")[0].1.clone()),
    );
    let values: Vec<&[u8]> = got.iter().map(|(_, v)| v.as_slice()).collect();
    let decoded = decoder.decode(&values).expect("decode");
    assert!(decoded.rejected.is_empty(), "{:?}", decoded.rejected);

    // Record by record: each failure once, with its fields intact, keyed by user.
    let mut seen = HashMap::new();
    for (batch, rows) in &decoded.batches {
        check_columns(batch);
        let ids = batch.column_by_name("id").expect("id").as_string::<i32>();
        let users = batch
            .column_by_name("data_userId")
            .expect("user")
            .as_string::<i32>();
        let times = batch
            .column_by_name("time")
            .expect("time")
            .as_primitive::<TimestampMillisecondType>();
        let tenants = batch
            .column_by_name("tenant_tenantId")
            .expect("tenant")
            .as_string::<i32>();
        for (k, &r) in rows.iter().enumerate() {
            let i: i64 = ids
                .value(k)
                .trim_start_matches("evt-")
                .parse()
                .expect("event id");
            assert_eq!(i % 3, 0, "only failures pass the filter");
            assert_eq!(users.value(k), format!("u{}", i % 10));
            assert_eq!(got[r].0.as_deref(), Some(users.value(k)), "keyed by user");
            assert_eq!(times.value(k), START + i * 1000);
            assert_eq!(tenants.value(k), format!("t{}", i % 2));
            *seen.entry(i).or_insert(0) += 1;
        }
    }
    assert_eq!(
        seen.len(),
        failures,
        "every failure, old and new writers alike"
    );

    // Each bad record is in the DLQ with its class; nothing else is.
    let dlq = read_dead_letters(&brokers, "auth-avro.dlq", 3).await;
    let mut classes: Vec<&str> = dlq.iter().map(|(_, h)| h["vigil.error"].as_str()).collect();
    classes.sort_unstable();
    let mut expected: Vec<&str> = bad.iter().map(|(_, c)| *c).collect();
    expected.sort_unstable();
    assert_eq!(classes, expected);
    for (_, headers) in &dlq {
        assert_eq!(headers["vigil.topic"], "auth-avro");
        assert_eq!(headers["vigil.pipeline"], "avro-it");
    }
    let by_error = metrics.dead_letters_by_error();
    assert_eq!(by_error.values().sum::<u64>(), 3, "{by_error:?}");
}

/// The output holds the flattened reader columns (dots become underscores
/// in Avro names) and the Kafka metadata.
fn check_columns(batch: &RecordBatch) {
    let names: Vec<String> = batch
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    for expected in [
        "id",
        "time",
        "source_service",
        "data_outcome",
        "data_anomalies",
        "kafka_offset",
        "kafka_headers",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} in {names:?}"
        );
    }
    assert!(
        !names.iter().any(|n| n.contains("mfaMethod")),
        "the reader schema decides the columns: {names:?}"
    );
    let anomalies = batch.column_by_name("data_anomalies").expect("anomalies");
    assert_eq!(anomalies.null_count(), 0);
}
