//! Tests of the file source: gzip, JSON arrays, bad lines, replay pacing, config errors.

use std::io::Write;

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::{TimestampMillisecondType, UInt64Type};
use vigil_engine::{ManualClock, SourceEvent, SourceFactory, TaskContext};

use super::*;
use crate::event_time::TimeFormat;
use crate::schema::FieldConfig;

fn field(name: &str, t: &str) -> FieldConfig {
    FieldConfig {
        name: name.into(),
        data_type: t.into(),
        fields: Vec::new(),
    }
}

fn config(path: PathList, fields: Vec<FieldConfig>) -> FileSourceConfig {
    FileSourceConfig {
        path,
        format: FileFormat::Auto,
        schema: SchemaConfig {
            fields,
            avro: None,
            avro_record: None,
            event_time: EventTimeConfig {
                field: "ts".into(),
                format: TimeFormat::Auto,
            },
            flatten: false,
        },
        replay_speed: None,
        batch_size: 2,
    }
}

fn ctx() -> TaskContext {
    TaskContext::detached("zeek", 0, 1, 0)
}

async fn read_all(f: &FileSourceFactory) -> (Vec<RecordBatch>, Vec<RecordBatch>) {
    let mut src = f.create(&ctx()).expect("create");
    let (mut data, mut dead) = (Vec::new(), Vec::new());
    let mut ended = 0;
    while ended < src.partitions() {
        match src.next().await.expect("next") {
            SourceEvent::Data { batch, .. } => data.push(batch),
            SourceEvent::DeadLetters(b) => dead.push(b),
            SourceEvent::PartitionEnd(_) => ended += 1,
            other => assert!(matches!(other, SourceEvent::Pending), "{other:?}"),
        }
    }
    (data, dead)
}

fn rows(b: &[RecordBatch]) -> usize {
    b.iter().map(|b| b.num_rows()).sum()
}

#[tokio::test]
async fn gzipped_ndjson_with_bad_lines_keeps_the_good_and_reports_the_bad() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ssh.json.gz");
    let mut gz = flate2::write::GzEncoder::new(
        std::fs::File::create(&path).expect("create"),
        flate2::Compression::fast(),
    );
    writeln!(gz, "{{\"ts\":\"2018-03-24T17:16:39.739898Z\",\"id.orig_h\":\"10.0.0.227\",\"auth_success\":true}}").expect("w");
    writeln!(gz, "{{\"ts\":1521911801.5,\"id.orig_h\":\"10.0.0.228\"}}").expect("w");
    writeln!(gz, "not json at all").expect("w");
    writeln!(gz).expect("w");
    writeln!(gz, "{{\"id.orig_h\":\"10.0.0.229\"}}").expect("w");
    writeln!(
        gz,
        "{{\"ts\":\"2018-03-24T17:16:45Z\",\"id.orig_h\":\"10.0.0.230\",\"auth_success\":false}}"
    )
    .expect("w");
    gz.finish().expect("finish");
    let f = FileSourceFactory::new(
        "zeek",
        &config(
            PathList::One(path.clone()),
            vec![
                field("ts", "timestamp"),
                field("id.orig_h", "string"),
                field("auth_success", "boolean"),
            ],
        ),
    )
    .expect("factory");
    let (data, dead) = read_all(&f).await;
    assert_eq!(rows(&data), 3);
    assert_eq!(rows(&dead), 2);
    let lines: Vec<u64> = dead
        .iter()
        .flat_map(|d| d.column(2).as_primitive::<UInt64Type>().values().to_vec())
        .collect();
    assert_eq!(lines, [3, 5]);
    let ts: Vec<i64> = data
        .iter()
        .flat_map(|b| {
            b.column(0)
                .as_primitive::<TimestampMillisecondType>()
                .values()
                .to_vec()
        })
        .collect();
    assert_eq!(
        ts,
        [1_521_911_799_739, 1_521_911_801_500, 1_521_911_805_000]
    );
}

#[tokio::test]
async fn json_arrays_with_nested_objects_and_offsets_without_colons() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("alerts.json");
    std::fs::write(
        &path,
        r#"[
  {
    "timestamp": "2018-03-24T11:16:39.739898-0600",
    "src_ip": "8.42.77.171",
    "alert": { "signature": "ET SCAN Potential SSH Scan", "severity": 2 }
  },
  {
    "timestamp": "2018-03-24T17:16:40.000000",
    "src_ip": "8.42.77.172",
    "alert": { "signature": "ET POLICY", "severity": 3 }
  }
]"#,
    )
    .expect("write");
    let mut alert = field("alert", "struct");
    alert.fields = vec![field("signature", "string"), field("severity", "int64")];
    let mut cfg = config(
        PathList::One(path),
        vec![
            field("timestamp", "timestamp"),
            field("src_ip", "string"),
            alert,
        ],
    );
    cfg.schema.event_time.field = "timestamp".into();
    let f = FileSourceFactory::new("suricata", &cfg).expect("factory");
    let (data, dead) = read_all(&f).await;
    assert!(dead.is_empty());
    assert_eq!(rows(&data), 2);
    let ts = data[0].column(0).as_primitive::<TimestampMillisecondType>();
    assert_eq!(ts.value(0), 1_521_911_799_739);
    let sig = data[0]
        .column(2)
        .as_struct()
        .column(0)
        .as_string::<i32>()
        .value(0)
        .to_string();
    assert_eq!(sig, "ET SCAN Potential SSH Scan");
}

#[tokio::test]
async fn a_broken_json_array_becomes_one_dead_letter_with_its_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("broken.json");
    std::fs::write(&path, "[\n  {\"ts\": 1},\n  {\"ts\": \n").expect("write");
    let f = FileSourceFactory::new(
        "s",
        &config(PathList::One(path), vec![field("ts", "timestamp")]),
    )
    .expect("factory");
    let (data, dead) = read_all(&f).await;
    assert!(data.is_empty());
    assert_eq!(rows(&dead), 1);
    assert!(dead[0]
        .column_by_name("reason")
        .expect("reason")
        .as_string::<i32>()
        .value(0)
        .contains("invalid JSON array"));
}

#[test]
fn configuration_errors_name_the_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("x.json");
    std::fs::write(&path, "").expect("write");
    let e = FileSourceFactory::new(
        "s",
        &config(PathList::One(path.clone()), vec![field("tss", "timestamp")]),
    )
    .expect_err("bad field");
    match e {
        crate::ConnectorError::Config(vigil_engine::ConfigError { field, hint, .. }) => {
            assert_eq!(field, "schema.event_time.field");
            assert_eq!(hint.as_deref(), Some("did you mean \"tss\"?"));
        }
        other => panic!("{other}"),
    }
    let e = FileSourceFactory::new(
        "s",
        &config(PathList::One(path.clone()), vec![field("ts", "timestmp")]),
    )
    .expect_err("bad type");
    assert!(e.to_string().contains("unknown type"), "{e}");
    let e = FileSourceFactory::new(
        "s",
        &config(
            PathList::One(dir.path().join("missing.json")),
            vec![field("ts", "timestamp")],
        ),
    )
    .expect_err("missing file");
    assert!(e.to_string().contains("missing.json"), "{e}");
}

#[tokio::test]
async fn replay_paces_records_by_their_event_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("r.json");
    std::fs::write(&path, "{\"ts\": 1000000}\n{\"ts\": 1000010}\n").expect("write");
    let mut cfg = config(PathList::One(path), vec![field("ts", "timestamp")]);
    cfg.schema.event_time.format = TimeFormat::EpochS;
    cfg.batch_size = 1;
    cfg.replay_speed = Some(2.0);
    let f = FileSourceFactory::new("r", &cfg).expect("factory");
    let clock = ManualClock::new(5_000);
    let mut c = ctx();
    c.clock = clock.clone();
    let mut src = f.create(&c).expect("create");
    assert!(
        next_data(&mut src).await.is_none(),
        "decoded, held for pacing"
    );
    assert!(next_data(&mut src).await.is_some(), "first record: at once");
    // the second is 10 s of event time later: 5 s of wall time at speed 2
    for _ in 0..3 {
        assert!(next_data(&mut src).await.is_none());
    }
    clock.advance(4_999);
    assert!(next_data(&mut src).await.is_none());
    clock.advance(1);
    assert!(next_data(&mut src).await.is_some());
}

async fn next_data(src: &mut Box<dyn vigil_engine::Source>) -> Option<RecordBatch> {
    loop {
        match src.next().await.expect("next") {
            SourceEvent::Data { batch, .. } => return Some(batch),
            SourceEvent::Pending => return None,
            _ => {}
        }
    }
}
