//! Tests of JSON decoding: the fast path, and isolation of bad records at every batch size.

use std::sync::Arc;

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema, TimestampMillisecondType};

use super::*;
use crate::dead_letter::DeadLetters;
use crate::event_time::TimeFormat;
use crate::schema::timestamp_type;

fn decoder() -> JsonDecoder {
    let schema = Arc::new(Schema::new(vec![
        Field::new("ts", timestamp_type(), true),
        Field::new("user", DataType::Utf8, true),
        Field::new("port", DataType::Int64, true),
    ]));
    JsonDecoder::new(schema, 0, TimeFormat::Auto).expect("valid decoder")
}

/// Splits text into one span per non-blank line, as the file source does.
fn spans(text: &str) -> Vec<RecordSpan> {
    let mut out = Vec::new();
    let mut pos = 0;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        if !line.trim().is_empty() {
            out.push(RecordSpan {
                bytes: pos..pos + line.len(),
                line: i as u64 + 1,
            });
        }
        pos += line.len();
    }
    out
}

fn run(text: &str, batch_sizes: &[usize]) -> (Vec<RecordBatch>, Option<RecordBatch>) {
    let d = decoder();
    let mut dead = DeadLetters::new("auth");
    let all = spans(text);
    let mut out = Vec::new();
    for chunk in batch_sizes.iter().scan(0usize, |at, n| {
        let s = *at;
        *at = (*at + n).min(all.len());
        Some(s..*at)
    }) {
        if let Some(b) = d
            .decode(text.as_bytes(), &all[chunk], "auth.json", &mut dead)
            .expect("decode")
        {
            out.push(b);
        }
    }
    (out, dead.finish().expect("dead letters"))
}

#[test]
fn clean_input_decodes_in_one_pass() {
    let text = "{\"ts\":\"2018-03-24T17:16:39.739Z\",\"user\":\"alice\",\"port\":22}\n\n{\"ts\":1521911800.5,\"user\":\"bob\"}\n";
    let (out, dead) = run(text, &[10]);
    assert!(dead.is_none());
    assert_eq!(out.len(), 1);
    let b = &out[0];
    assert_eq!(b.num_rows(), 2);
    let ts = b.column(0).as_primitive::<TimestampMillisecondType>();
    assert_eq!(ts.values(), &[1_521_911_799_739, 1_521_911_800_500]);
    assert!(b.column(2).is_null(1), "absent field is null");
}

#[test]
fn bad_lines_are_isolated_with_line_numbers_at_every_batch_size() {
    let text = concat!(
        "{\"ts\":\"2018-03-24T17:16:39Z\",\"user\":\"a\"}\n",
        "{\"ts\":\"2018-03-24T17:16:40Z\",\"user\":\n", // truncated
        "{\"ts\":\"2018-03-24T17:16:41Z\",\"user\":\"c\"}\n",
        "{\"user\":\"d\"}\n",                         // no event time
        "{\"ts\":\"last tuesday\",\"user\":\"e\"}\n", // unparsable
        "[1,2]\n",                                    // not an object
        "{\"ts\":\"2018-03-24T17:16:42Z\",\"user\":\"g\",\"port\":\"x\"}\n", // wrong type
        "{\"ts\":\"2018-03-24T17:16:43Z\",\"user\":\"h\"}\n",
    );
    for sizes in [vec![8], vec![1; 8], vec![2, 2, 2, 2], vec![3, 5]] {
        let (out, dead) = run(text, &sizes);
        let users: Vec<String> = out
            .iter()
            .flat_map(|b| {
                b.column(1)
                    .as_string::<i32>()
                    .iter()
                    .map(|v| v.unwrap_or("").to_string())
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(users, ["a", "c", "h"], "batch sizes {sizes:?}");
        let dead = dead.expect("dead letters");
        let lines = dead
            .column(2)
            .as_primitive::<arrow::datatypes::UInt64Type>();
        let reasons = dead
            .column_by_name("reason")
            .expect("reason")
            .as_string::<i32>();
        let errors = dead
            .column_by_name("error")
            .expect("error")
            .as_string::<i32>();
        let mut by_line: Vec<(u64, String, String)> = (0..dead.num_rows())
            .map(|i| {
                (
                    lines.value(i),
                    reasons.value(i).to_string(),
                    errors.value(i).to_string(),
                )
            })
            .collect();
        by_line.sort();
        let numbers: Vec<u64> = by_line.iter().map(|(l, _, _)| *l).collect();
        let classes: Vec<&str> = by_line.iter().map(|(_, _, e)| e.as_str()).collect();
        assert_eq!(
            classes,
            [
                "invalid_json",
                "missing_event_time",
                "invalid_timestamp",
                "not_an_object",
                "wrong_type"
            ],
            "{by_line:?}"
        );
        assert_eq!(numbers, [2, 4, 5, 6, 7], "batch sizes {sizes:?}");
        assert!(by_line[0].1.starts_with("invalid JSON"), "{}", by_line[0].1);
        assert_eq!(by_line[1].1, "missing event time field \"ts\"");
        assert_eq!(by_line[2].1, "cannot parse timestamp field \"ts\"");
        assert!(
            by_line[4]
                .1
                .starts_with("wrong type: whilst decoding field 'port'"),
            "{}",
            by_line[4].1
        );
        assert_eq!(dead.column(1).as_string::<i32>().value(0), "auth.json");
    }
}
