//! The chunk decoder; see the module docs of [`crate::json`].

use std::ops::Range;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BooleanArray, RecordBatch};
use arrow::compute::{concat_batches, filter_record_batch};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow_json::reader::{Decoder, ReaderBuilder};

use crate::dead_letter::{DeadLetterError, DeadLetters};
use crate::error::{ConnectorError, Result};
use crate::event_time::{parse_column, TimeFormat};

/// One record in a chunk: its bytes in the buffer and its line in the file.
#[derive(Debug, Clone)]
pub struct RecordSpan {
    /// Byte range in the chunk buffer.
    pub bytes: Range<usize>,
    /// 1-based line number where the record starts.
    pub line: u64,
}

/// Decodes JSON records of a declared schema into batches.
#[derive(Debug)]
pub struct JsonDecoder {
    decode_schema: SchemaRef,
    output_schema: SchemaRef,
    /// Columns declared as timestamps, parsed from text after decoding.
    timestamps: Vec<usize>,
    event_time: usize,
    event_time_name: String,
    format: TimeFormat,
    /// Struct columns flattened into this schema, if asked for.
    flat_schema: Option<SchemaRef>,
}

impl JsonDecoder {
    /// A decoder producing `output_schema`, whose column `event_time` holds
    /// event time written in `format`.
    pub fn new(output_schema: SchemaRef, event_time: usize, format: TimeFormat) -> Result<Self> {
        let mut timestamps = Vec::new();
        let fields: Vec<Field> = output_schema
            .fields()
            .iter()
            .enumerate()
            .map(|(i, f)| {
                if matches!(f.data_type(), DataType::Timestamp(_, _)) {
                    timestamps.push(i);
                    Field::new(f.name(), DataType::Utf8, true)
                } else {
                    f.as_ref().clone()
                }
            })
            .collect();
        if !timestamps.contains(&event_time) {
            return Err(ConnectorError::config(
                "event_time.field",
                "the event-time field must be declared with type timestamp",
            ));
        }
        let event_time_name = output_schema.field(event_time).name().clone();
        Ok(Self {
            decode_schema: Arc::new(Schema::new(fields)),
            output_schema,
            timestamps,
            event_time,
            event_time_name,
            format,
            flat_schema: None,
        })
    }

    /// The same decoder, with struct columns replaced by their leaves
    /// (`a.b`) in what it produces.
    pub fn flattened(mut self) -> Result<Self> {
        self.flat_schema = Some(crate::file::flattened(&self.output_schema)?);
        Ok(self)
    }

    /// Schema of the batches produced.
    pub fn schema(&self) -> SchemaRef {
        self.flat_schema
            .clone()
            .unwrap_or_else(|| self.output_schema.clone())
    }

    /// Index of the event-time column in [`JsonDecoder::schema`].
    pub fn event_time_column(&self) -> usize {
        self.schema()
            .index_of(&self.event_time_name)
            .unwrap_or(self.event_time)
    }

    fn raw_decoder(&self, rows: usize) -> Result<Decoder> {
        Ok(ReaderBuilder::new(self.decode_schema.clone())
            .with_batch_size(rows.max(1))
            .with_coerce_primitive(true)
            .build_decoder()?)
    }

    /// Decodes the records `spans` of `buf`. Records that fail go to `dead`
    /// with `location` and their line. Returns the good records, if any.
    pub fn decode(
        &self,
        buf: &[u8],
        spans: &[RecordSpan],
        location: &str,
        dead: &mut DeadLetters,
    ) -> Result<Option<RecordBatch>> {
        Ok(self
            .decode_indexed(buf, spans, location, dead)?
            .map(|(b, _)| b))
    }

    /// Like [`decode`](Self::decode), also returning, for each output row, the
    /// index in `spans` of the record it came from (to attach per-record
    /// metadata such as Kafka offsets).
    pub fn decode_indexed(
        &self,
        buf: &[u8],
        spans: &[RecordSpan],
        location: &str,
        dead: &mut DeadLetters,
    ) -> Result<Option<(RecordBatch, Vec<usize>)>> {
        if spans.is_empty() {
            return Ok(None);
        }
        let (raw, rows) = match self.decode_all(buf, spans) {
            Some(batch) => (batch, (0..spans.len()).collect::<Vec<_>>()),
            None => self.decode_each(buf, spans, location, dead)?,
        };
        if raw.num_rows() == 0 {
            return Ok(None);
        }
        self.finish_timestamps(raw, &rows, buf, spans, location, dead)
    }

    /// Fast path: the whole chunk at once. `None` if anything in it is bad.
    fn decode_all(&self, buf: &[u8], spans: &[RecordSpan]) -> Option<RecordBatch> {
        let mut d = self.raw_decoder(spans.len()).ok()?;
        let start = spans.first()?.bytes.start;
        let end = spans.last()?.bytes.end;
        let region = buf.get(start..end)?;
        let used = d.decode(region).ok()?;
        if !only_whitespace(&region[used..]) {
            return None;
        }
        let batch = d.flush().ok()??;
        (batch.num_rows() == spans.len()).then_some(batch)
    }

    /// Slow path: record by record, isolating the bad ones.
    fn decode_each(
        &self,
        buf: &[u8],
        spans: &[RecordSpan],
        location: &str,
        dead: &mut DeadLetters,
    ) -> Result<(RecordBatch, Vec<usize>)> {
        let mut good = Vec::new();
        let mut rows = Vec::new();
        for (i, span) in spans.iter().enumerate() {
            let bytes = &buf[span.bytes.clone()];
            let mut d = self.raw_decoder(1)?;
            let res = d.decode(bytes).and_then(|used| {
                if !only_whitespace(&bytes[used..]) {
                    Err(arrow::error::ArrowError::JsonError(
                        "more than one JSON value on the line".into(),
                    ))
                } else {
                    d.flush()
                }
            });
            match res {
                Ok(Some(b)) if b.num_rows() == 1 => {
                    good.push(b);
                    rows.push(i);
                }
                Ok(_) => dead.push(
                    location,
                    Some(span.line),
                    DeadLetterError::NotAnObject,
                    "not a JSON object",
                    bytes,
                ),
                Err(e) => {
                    let (class, reason) = classify(&e);
                    dead.push(location, Some(span.line), class, &reason, bytes)
                }
            }
        }
        let batch = if good.is_empty() {
            RecordBatch::new_empty(self.decode_schema.clone())
        } else {
            concat_batches(&self.decode_schema, &good)?
        };
        Ok((batch, rows))
    }

    /// Parses timestamp columns; records whose event time is missing or whose
    /// timestamps do not parse go to the dead letters.
    fn finish_timestamps(
        &self,
        raw: RecordBatch,
        rows: &[usize],
        buf: &[u8],
        spans: &[RecordSpan],
        location: &str,
        dead: &mut DeadLetters,
    ) -> Result<Option<(RecordBatch, Vec<usize>)>> {
        let n = raw.num_rows();
        let mut columns: Vec<ArrayRef> = raw.columns().to_vec();
        let mut keep = vec![true; n];
        for &c in &self.timestamps {
            let (ts, failed) = parse_column(raw.column(c).as_ref(), self.format);
            let name = self.output_schema.field(c).name();
            for row in 0..n {
                if !keep[row] {
                    continue;
                }
                let reason = if failed[row] {
                    Some((
                        DeadLetterError::InvalidTimestamp,
                        format!("cannot parse timestamp field {name:?}"),
                    ))
                } else if c == self.event_time && ts.is_null(row) {
                    Some((
                        DeadLetterError::MissingEventTime,
                        format!("missing event time field {:?}", self.event_time_name),
                    ))
                } else {
                    None
                };
                if let Some((class, reason)) = reason {
                    keep[row] = false;
                    let span = &spans[rows[row]];
                    dead.push(
                        location,
                        Some(span.line),
                        class,
                        &reason,
                        &buf[span.bytes.clone()],
                    );
                }
            }
            columns[c] = Arc::new(ts);
        }
        let mut batch = RecordBatch::try_new(self.output_schema.clone(), columns)?;
        if self.flat_schema.is_some() {
            batch = batch.normalize(".", None)?;
        }
        if keep.iter().all(|k| *k) {
            return Ok(Some((batch, rows.to_vec())));
        }
        let kept_rows: Vec<usize> = rows
            .iter()
            .zip(&keep)
            .filter(|(_, k)| **k)
            .map(|(r, _)| *r)
            .collect();
        let mask = BooleanArray::from(keep);
        let kept = filter_record_batch(&batch, &mask)?;
        Ok((kept.num_rows() > 0).then_some((kept, kept_rows)))
    }
}

fn only_whitespace(b: &[u8]) -> bool {
    b.iter().all(u8::is_ascii_whitespace)
}

/// The class and the message of a decoding error. arrow-json says which
/// field failed to parse and when a value is not an object; anything else is
/// broken JSON.
fn classify(e: &arrow::error::ArrowError) -> (DeadLetterError, String) {
    let msg = e.to_string();
    let detail = msg.strip_prefix("Json error: ").unwrap_or(&msg);
    if detail.contains("whilst decoding field") {
        (DeadLetterError::WrongType, format!("wrong type: {detail}"))
    } else if detail.starts_with("expected {") {
        (
            DeadLetterError::NotAnObject,
            format!("not a JSON object: {detail}"),
        )
    } else {
        (
            DeadLetterError::InvalidJson,
            format!("invalid JSON: {detail}"),
        )
    }
}
