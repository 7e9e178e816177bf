//! Confluent-framed Avro records → Arrow batches, one record's failure
//! isolated from the others.

use std::collections::HashMap;

use arrow::array::{ArrayRef, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::SchemaRef;
use arrow_avro::reader::{Decoder, ReaderBuilder};
use arrow_avro::schema::{AvroSchema, Fingerprint, FingerprintAlgorithm, SchemaStore};

use super::registry::{Lookup, Registry};
use crate::dead_letter::DeadLetterError;
use crate::error::Result;

/// Bytes before the Avro body: magic byte and schema id.
const PREFIX: usize = 5;

/// The outcome of decoding a set of records.
#[derive(Debug, Default)]
pub struct Decoded {
    /// Batches in the reader schema (normalized, see [`super::arrow_schema`]),
    /// each with the index of the record each row came from.
    pub batches: Vec<(RecordBatch, Vec<usize>)>,
    /// Records that could not be decoded: index, class, reason.
    pub rejected: Vec<(usize, DeadLetterError, String)>,
}

/// What is known of a writer schema id.
enum Writer {
    /// Readable with the reader schema.
    Readable,
    /// Not usable; records written with it are rejected with this class.
    Rejected(DeadLetterError, String),
}

/// Decodes Confluent-framed Avro through one reader schema. Writer schemas
/// come from the registry the first time their id is seen.
pub struct AvroDecoder {
    reader: AvroSchema,
    /// The normalized output schema.
    schema: SchemaRef,
    writers: HashMap<u32, Writer>,
    store: SchemaStore,
    decoder: Option<Decoder>,
    capacity: usize,
}

impl std::fmt::Debug for AvroDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AvroDecoder")
            .field("writers", &self.writers.len())
            .finish()
    }
}

/// The schema id of a framed record, if it is framed.
fn schema_id(record: &[u8]) -> Option<u32> {
    match record {
        [0, a, b, c, d, ..] => Some(u32::from_be_bytes([*a, *b, *c, *d])),
        _ => None,
    }
}

impl AvroDecoder {
    /// A decoder producing rows of `reader`, at most `capacity` per call.
    pub fn new(reader: AvroSchema, capacity: usize) -> std::result::Result<Self, String> {
        let schema = super::arrow_schema(&reader)?;
        Ok(Self {
            reader,
            schema,
            writers: HashMap::new(),
            store: SchemaStore::new_with_type(FingerprintAlgorithm::Id),
            decoder: None,
            capacity: capacity.max(1),
        })
    }

    /// The schema of decoded batches.
    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    /// Looks up the writer schemas of `records` not seen before.
    pub async fn learn<'a>(
        &mut self,
        registry: &Registry,
        records: impl Iterator<Item = &'a [u8]>,
    ) -> Result<()> {
        let mut new_ids: Vec<u32> = records
            .filter_map(schema_id)
            .filter(|id| !self.writers.contains_key(id))
            .collect();
        new_ids.sort_unstable();
        new_ids.dedup();
        for id in new_ids {
            let lookup = registry.schema(id).await?;
            self.insert_writer(id, lookup);
        }
        Ok(())
    }

    /// Records what the registry said of writer schema `id`.
    pub fn insert_writer(&mut self, id: u32, lookup: Lookup) {
        let writer = match lookup {
            Lookup::Found(json) => self.add_writer(id, AvroSchema::new(json)),
            Lookup::Unknown(reason) => Writer::Rejected(DeadLetterError::UnknownSchemaId, reason),
        };
        self.writers.insert(id, writer);
    }

    /// Adds a writer schema; checks it resolves against the reader schema.
    fn add_writer(&mut self, id: u32, writer: AvroSchema) -> Writer {
        let mut store = self.store.clone();
        if let Err(e) = store.set(Fingerprint::Id(id), writer.clone()) {
            return Writer::Rejected(
                DeadLetterError::IncompatibleSchema,
                format!("writer schema {id} is not valid Avro: {e}"),
            );
        }
        // Resolution is checked on its own first, so one incompatible
        // writer cannot stop the others from being read.
        let mut alone = SchemaStore::new_with_type(FingerprintAlgorithm::Id);
        let check = alone
            .set(Fingerprint::Id(id), writer)
            .map_err(|e| e.to_string())
            .and_then(|_| self.build(alone).map_err(|e| e.to_string()));
        if let Err(e) = check {
            return Writer::Rejected(
                DeadLetterError::IncompatibleSchema,
                format!("writer schema {id} cannot be read with the pipeline's schema: {e}"),
            );
        }
        self.store = store;
        self.decoder = None;
        Writer::Readable
    }

    fn build(&self, store: SchemaStore) -> std::result::Result<Decoder, arrow::error::ArrowError> {
        ReaderBuilder::new()
            .with_batch_size(self.capacity)
            .with_reader_schema(self.reader.clone())
            .with_writer_schema_store(store)
            .build_decoder()
    }

    fn decoder(&mut self) -> std::result::Result<&mut Decoder, String> {
        if self.decoder.is_none() {
            self.decoder = Some(self.build(self.store.clone()).map_err(|e| e.to_string())?);
        }
        self.decoder
            .as_mut()
            .ok_or_else(|| "no Avro decoder".to_string())
    }

    /// Decodes `records` (call [`AvroDecoder::learn`] on them first).
    pub fn decode(&mut self, records: &[&[u8]]) -> Result<Decoded> {
        let mut out = Decoded::default();
        // Records in the decoder's unflushed batch.
        let mut pending: Vec<usize> = Vec::new();
        for (i, record) in records.iter().enumerate() {
            let Some(id) = schema_id(record) else {
                out.rejected.push((
                    i,
                    DeadLetterError::InvalidAvro,
                    "not in the Confluent wire format (magic byte 0, then a 4-byte schema id)"
                        .into(),
                ));
                continue;
            };
            match self.writers.get(&id) {
                Some(Writer::Readable) => {}
                Some(Writer::Rejected(class, reason)) => {
                    out.rejected.push((i, *class, reason.clone()));
                    continue;
                }
                None => {
                    out.rejected.push((
                        i,
                        DeadLetterError::UnknownSchemaId,
                        format!("schema id {id} was not looked up"),
                    ));
                    continue;
                }
            }
            if pending.len() >= self.capacity {
                self.flush(&mut pending, &mut out)?;
            }
            match self.decode_one(record, &mut pending, &mut out)? {
                Ok(()) => pending.push(i),
                Err(reason) => {
                    out.rejected
                        .push((i, DeadLetterError::AvroMismatch, reason));
                    // The decoder may hold part of the bad row: start over
                    // with the good rows of this batch.
                    self.decoder = None;
                    let replay = std::mem::take(&mut pending);
                    for r in replay {
                        if let Err(reason) = self.decode_one(records[r], &mut pending, &mut out)? {
                            return Err(crate::error::ConnectorError::Io {
                                path: "avro decoder".into(),
                                source: std::io::Error::other(format!(
                                    "a record decoded once failed on replay: {reason}"
                                )),
                            });
                        }
                        pending.push(r);
                    }
                }
            }
        }
        self.flush(&mut pending, &mut out)?;
        Ok(out)
    }

    /// Feeds one whole record to the decoder. The outer error is a failure
    /// of the decoder itself; the inner one is the record's fault.
    fn decode_one(
        &mut self,
        record: &[u8],
        pending: &mut Vec<usize>,
        out: &mut Decoded,
    ) -> Result<std::result::Result<(), String>> {
        let decoder = match self.decoder() {
            Ok(d) => d,
            Err(e) => return Ok(Err(e)),
        };
        let mut used = match decoder.decode(record) {
            Ok(n) => n,
            Err(e) => return Ok(Err(e.to_string())),
        };
        if used == PREFIX && used < record.len() && decoder.batch_is_full() {
            // A new writer schema: the rows before it are flushed first.
            self.flush(pending, out)?;
            let decoder = match self.decoder() {
                Ok(d) => d,
                Err(e) => return Ok(Err(e)),
            };
            used += match decoder.decode(&record[used..]) {
                Ok(n) => n,
                Err(e) => return Ok(Err(e.to_string())),
            };
        }
        if used != record.len() {
            return Ok(Err(format!(
                "the Avro body is {} bytes but its schema reads {}",
                record.len() - PREFIX,
                used.saturating_sub(PREFIX)
            )));
        }
        Ok(Ok(()))
    }

    /// Takes the decoded rows as a batch in the output schema.
    fn flush(&mut self, pending: &mut Vec<usize>, out: &mut Decoded) -> Result<()> {
        let Some(decoder) = self.decoder.as_mut() else {
            return Ok(());
        };
        let batch = decoder
            .flush()
            .map_err(|e| crate::error::ConnectorError::Io {
                path: "avro decoder".into(),
                source: std::io::Error::other(e.to_string()),
            })?;
        let rows = std::mem::take(pending);
        if let Some(batch) = batch {
            let columns = batch
                .columns()
                .iter()
                .zip(self.schema.fields())
                .map(|(c, f)| {
                    if c.data_type() == f.data_type() {
                        Ok(c.clone())
                    } else {
                        cast(c, f.data_type())
                    }
                })
                .collect::<std::result::Result<Vec<ArrayRef>, _>>()?;
            out.batches
                .push((RecordBatch::try_new(self.schema.clone(), columns)?, rows));
        }
        Ok(())
    }
}
