use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, AsArray, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, TimestampMillisecondType};
use arrow_avro::schema::{AvroSchema, FingerprintStrategy, SCHEMA_METADATA_KEY};
use arrow_avro::writer::format::AvroSoeFormat;
use arrow_avro::writer::WriterBuilder;

use super::{arrow_schema, AvroDecoder, Lookup};
use crate::dead_letter::DeadLetterError;

const V1: &str = r#"{"type":"record","name":"Auth","namespace":"vigil.test","fields":[
  {"name":"time","type":{"type":"long","logicalType":"timestamp-millis"}},
  {"name":"user","type":"string"},
  {"name":"attempts","type":"long"}]}"#;

/// V1 plus an optional field, as a producer's next version adds it.
const V2: &str = r#"{"type":"record","name":"Auth","namespace":"vigil.test","fields":[
  {"name":"time","type":{"type":"long","logicalType":"timestamp-millis"}},
  {"name":"user","type":"string"},
  {"name":"attempts","type":"long"},
  {"name":"mfa","type":["null","string"],"default":null}]}"#;

/// `user` changed type: not readable as V1.
const BROKEN: &str = r#"{"type":"record","name":"Auth","namespace":"vigil.test","fields":[
  {"name":"time","type":{"type":"long","logicalType":"timestamp-millis"}},
  {"name":"user","type":"long"},
  {"name":"attempts","type":"long"}]}"#;

/// Confluent-framed records of `batch` written with `writer` under `id`.
fn encode(writer: &str, id: u32, batch: &RecordBatch) -> Vec<Vec<u8>> {
    let mut md = HashMap::new();
    md.insert(SCHEMA_METADATA_KEY.to_string(), writer.to_string());
    let schema = Schema::new(batch.schema().fields().clone()).with_metadata(md);
    let mut encoder = WriterBuilder::new(schema)
        .with_fingerprint_strategy(FingerprintStrategy::Id(id))
        .build_encoder::<AvroSoeFormat>()
        .expect("encoder");
    encoder.encode(batch).expect("encode");
    let rows = encoder.flush();
    rows.iter().map(|b| b.to_vec()).collect()
}

fn v1_batch(users: &[&str]) -> RecordBatch {
    let n = users.len() as i64;
    let schema = arrow_schema(&AvroSchema::new(V1.into())).expect("schema");
    RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("time", schema.field(0).data_type().clone(), false),
            Field::new("user", DataType::Utf8, false),
            Field::new("attempts", DataType::Int64, false),
        ])),
        vec![
            Arc::new(
                arrow::array::TimestampMillisecondArray::from_iter_values(
                    (0..n).map(|i| 1_767_225_600_000 + i),
                )
                .with_timezone("UTC"),
            ),
            Arc::new(StringArray::from(users.to_vec())),
            Arc::new(Int64Array::from_iter_values(0..n)),
        ],
    )
    .expect("batch")
}

fn v2_batch(users: &[&str], mfa: &[Option<&str>]) -> RecordBatch {
    let v1 = v1_batch(users);
    let mut fields: Vec<Field> = v1
        .schema()
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    fields.push(Field::new("mfa", DataType::Utf8, true));
    let mut cols = v1.columns().to_vec();
    cols.push(Arc::new(StringArray::from(mfa.to_vec())));
    RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).expect("batch")
}

fn decoder(reader: &str) -> AvroDecoder {
    let mut d = AvroDecoder::new(AvroSchema::new(reader.into()), 1024).expect("decoder");
    d.insert_writer(1, Lookup::Found(V1.into()));
    d.insert_writer(2, Lookup::Found(V2.into()));
    d.insert_writer(3, Lookup::Found(BROKEN.into()));
    d.insert_writer(9, Lookup::Unknown("schema id 9: not found".into()));
    d
}

fn users(batch: &RecordBatch) -> Vec<String> {
    let col = batch.column_by_name("user").expect("user");
    col.as_string::<i32>()
        .iter()
        .map(|u| u.unwrap_or("").to_string())
        .collect()
}

#[test]
fn the_reader_schema_is_arrow_with_utc_millisecond_time() {
    let schema = arrow_schema(&AvroSchema::new(V2.into())).expect("schema");
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    assert_eq!(names, ["time", "user", "attempts", "mfa"]);
    assert_eq!(
        schema.field(0).data_type(),
        &crate::schema::timestamp_type()
    );
    assert!(schema.field(3).is_nullable());
    assert!(arrow_schema(&AvroSchema::new("\"string\"".into())).is_err());
}

#[test]
fn a_writer_with_an_added_optional_field_is_read_with_the_older_reader_schema() {
    let mut d = decoder(V1);
    let old = encode(V1, 1, &v1_batch(&["alice", "bob"]));
    let new = encode(V2, 2, &v2_batch(&["carol", "dave"], &[Some("totp"), None]));
    let records: Vec<&[u8]> = old.iter().chain(new.iter()).map(Vec::as_slice).collect();
    let out = d.decode(&records).expect("decode");
    assert!(out.rejected.is_empty(), "{:?}", out.rejected);
    let mut all = Vec::new();
    let mut rows = Vec::new();
    for (b, r) in &out.batches {
        assert_eq!(b.num_columns(), 3, "the reader's columns only");
        all.extend(users(b));
        rows.extend(r.iter().copied());
        let t = b.column(0).as_primitive::<TimestampMillisecondType>();
        assert!(t.value(0) >= 1_767_225_600_000);
    }
    assert_eq!(all, ["alice", "bob", "carol", "dave"]);
    assert_eq!(rows, [0, 1, 2, 3]);
}

#[test]
fn an_old_writer_read_with_a_newer_reader_gets_the_default() {
    let mut d = decoder(V2);
    let old = encode(V1, 1, &v1_batch(&["alice"]));
    let new = encode(V2, 2, &v2_batch(&["bob"], &[Some("push")]));
    let records: Vec<&[u8]> = old.iter().chain(new.iter()).map(Vec::as_slice).collect();
    let out = d.decode(&records).expect("decode");
    let mfa: Vec<Option<String>> = out
        .batches
        .iter()
        .flat_map(|(b, _)| {
            let c = b
                .column_by_name("mfa")
                .expect("mfa")
                .as_string::<i32>()
                .clone();
            (0..c.len())
                .map(|i| c.is_valid(i).then(|| c.value(i).to_string()))
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(mfa, [None, Some("push".to_string())]);
}

#[test]
fn each_bad_record_is_rejected_with_its_class_and_the_rest_decode() {
    let mut d = decoder(V1);
    let good = encode(V1, 1, &v1_batch(&["alice", "bob", "carol"]));
    let mut truncated = good[1].clone();
    truncated.truncate(truncated.len() - 2);
    let unknown = {
        let mut r = good[0].clone();
        r[1..5].copy_from_slice(&9u32.to_be_bytes());
        r
    };
    let broken = encode(BROKEN, 3, &{
        let b = v1_batch(&["x"]);
        RecordBatch::try_new(
            Arc::new(Schema::new(vec![
                b.schema().field(0).clone(),
                Field::new("user", DataType::Int64, false),
                b.schema().field(2).clone(),
            ])),
            vec![
                b.column(0).clone(),
                Arc::new(Int64Array::from(vec![7])),
                b.column(2).clone(),
            ],
        )
        .expect("batch")
    });
    let records: Vec<&[u8]> = vec![
        &good[0],
        b"{\"user\":\"json\"}",
        &truncated,
        &unknown,
        &broken[0],
        &good[2],
    ];
    let out = d.decode(&records).expect("decode");
    let classes: Vec<(usize, DeadLetterError)> =
        out.rejected.iter().map(|(i, c, _)| (*i, *c)).collect();
    assert_eq!(
        classes,
        [
            (1, DeadLetterError::InvalidAvro),
            (2, DeadLetterError::AvroMismatch),
            (3, DeadLetterError::UnknownSchemaId),
            (4, DeadLetterError::IncompatibleSchema),
        ]
    );
    let got: Vec<String> = out.batches.iter().flat_map(|(b, _)| users(b)).collect();
    assert_eq!(got, ["alice", "carol"]);
    let rows: Vec<usize> = out.batches.iter().flat_map(|(_, r)| r.clone()).collect();
    assert_eq!(rows, [0, 5]);
}

#[test]
fn a_record_of_the_shipped_schema_file_stands_alone() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../schemas/security-events.avsc"
    );
    for record in [
        "AuthenticationEvent",
        "NetworkFlowEvent",
        "ProcessEvent",
        "AlertEvent",
        "vigil.security.IncidentEvent",
    ] {
        let schema = super::load_schema_file(path, Some(record), "schema.avro").expect(record);
        let arrow = arrow_schema(&schema).expect("arrow");
        let names: Vec<&str> = arrow.fields().iter().map(|f| f.name().as_str()).collect();
        // Incident events also name their incident, after the envelope.
        assert_eq!(
            names[..9],
            [
                "id",
                "type",
                "version",
                "time",
                "source",
                "tenant",
                "correlation",
                "security",
                "data"
            ],
            "{record}"
        );
        assert_eq!(arrow.field(3).data_type(), &crate::schema::timestamp_type());
        assert!(
            matches!(arrow.field(5).data_type(), DataType::Struct(f) if f[0].name() == "tenantId")
        );
    }
    let e = super::load_schema_file(path, Some("Login"), "schema.avro").expect_err("unknown");
    assert!(e.to_string().contains("defines no type \"Login\""), "{e}");
    let e = super::load_schema_file(path, None, "schema.avro").expect_err("ambiguous");
    assert!(e.to_string().contains("say which record"), "{e}");
}
