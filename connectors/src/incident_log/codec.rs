//! Incident events between Vigil's flat rows and the Avro `IncidentEvent`
//! of `schemas/security-events.avsc`.
//!
//! On the log an event is the security envelope (`id`, `type`, `version`,
//! `time`, `source`, `tenant`, `correlation`, `security`), the payload as a
//! union of the six event records (`data`), and the incident it changes
//! (`incident`). Inside Vigil it is one flat row
//! ([`vigil_operators::incident::event_schema`]-shaped, named here by
//! column). Records are Avro single-object encoded (the `C3 01` marker and
//! the schema's Rabin fingerprint before the body), so a reader knows the
//! schema without a registry; arrow-avro does the encoding both ways on
//! whole batches.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{
    new_null_array, Array, ArrayRef, AsArray, RecordBatch, StringArray, StructArray, UInt32Array,
    UnionArray,
};
use arrow::buffer::ScalarBuffer;
use arrow::compute::{cast, interleave, take};
use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef};
use arrow_avro::reader::{Decoder, ReaderBuilder};
use arrow_avro::schema::{AvroSchema, SchemaStore, SCHEMA_METADATA_KEY};
use arrow_avro::writer::format::AvroSoeFormat;
use arrow_avro::writer::{Encoder, WriterBuilder};
use bytes::Bytes;

use crate::error::{ConnectorError, Result};

/// The schema file, built in: the log's format is part of the binary.
const SCHEMAS: &str = include_str!("../../../schemas/security-events.avsc");

/// Payload fields of each event type: (Avro field, flat column).
const PAYLOADS: [(&str, &[(&str, &str)]); 6] = [
    (
        "IncidentCreated",
        &[
            ("title", "title"),
            ("severity", "severity"),
            ("detection", "detection"),
            ("alertId", "alert_id"),
        ],
    ),
    (
        "AlertAttached",
        &[
            ("alertId", "alert_id"),
            ("detection", "detection"),
            ("severity", "severity"),
        ],
    ),
    (
        "IncidentEscalated",
        &[
            ("fromSeverity", "previous_severity"),
            ("toSeverity", "severity"),
            ("rule", "rule"),
            ("reason", "reason"),
        ],
    ),
    ("IncidentAssigned", &[("assignee", "assignee")]),
    (
        "IncidentResolved",
        &[("resolution", "resolution"), ("reason", "reason")],
    ),
    ("IncidentReopened", &[("reason", "reason")]),
];

/// Flat payload columns, in the flat schema's order.
const PAYLOAD_COLUMNS: [&str; 9] = [
    "severity",
    "previous_severity",
    "detection",
    "alert_id",
    "title",
    "rule",
    "assignee",
    "resolution",
    "reason",
];

/// Encodes and decodes incident events.
pub struct EventCodec {
    avro: AvroSchema,
    /// The Arrow shape of an `IncidentEvent` (what arrow-avro reads and writes).
    nested: SchemaRef,
    /// The flat rows.
    flat: SchemaRef,
    encoder: Encoder,
    store: SchemaStore,
}

impl std::fmt::Debug for EventCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventCodec").finish()
    }
}

fn avro_err(e: impl std::fmt::Display) -> ConnectorError {
    ConnectorError::config("log", format!("incident events as Avro: {e}"))
}

fn decoder_for(avro: &AvroSchema, store: &SchemaStore, batch: usize) -> Result<Decoder> {
    ReaderBuilder::new()
        .with_reader_schema(avro.clone())
        .with_writer_schema_store(store.clone())
        .with_batch_size(batch)
        .build_decoder()
        .map_err(avro_err)
}

impl EventCodec {
    /// A codec producing and reading rows of `flat`.
    pub fn new(flat: SchemaRef) -> Result<Self> {
        let avro = crate::avro::schema_from_text(
            SCHEMAS,
            "schemas/security-events.avsc",
            Some("IncidentEvent"),
            "log",
        )?;
        let mut store = SchemaStore::new();
        store.register(avro.clone()).map_err(avro_err)?;
        let nested = decoder_for(&avro, &store, 1)?.schema();
        let mut md = HashMap::new();
        md.insert(SCHEMA_METADATA_KEY.to_string(), avro.json_string.clone());
        let nested = Arc::new(Schema::new(nested.fields().clone()).with_metadata(md));
        let encoder = WriterBuilder::new(nested.as_ref().clone())
            .build_encoder::<AvroSoeFormat>()
            .map_err(avro_err)?;
        Ok(Self {
            avro,
            nested,
            flat,
            encoder,
            store,
        })
    }

    /// One Avro record per row of `flat`.
    pub fn encode(&mut self, flat: &RecordBatch) -> Result<Vec<Bytes>> {
        let nested = self.nest(flat)?;
        self.encoder.encode(&nested).map_err(avro_err)?;
        let rows = self.encoder.flush();
        (0..rows.len())
            .map(|i| rows.row(i).map_err(avro_err))
            .collect()
    }

    /// Flat rows of `records`; a record that does not decode is returned
    /// with its index and the reason instead.
    pub fn decode(&self, records: &[&[u8]]) -> Result<(RecordBatch, Vec<(usize, String)>)> {
        let mut good = Vec::new();
        let mut bad = Vec::new();
        let mut decoder = decoder_for(&self.avro, &self.store, records.len().max(1))?;
        for (i, r) in records.iter().enumerate() {
            // One record at a time, so a bad one does not take the batch.
            match decoder.decode(r) {
                Ok(n) if n == r.len() => good.push(i),
                Ok(_) => {
                    bad.push((i, "trailing bytes after the record".into()));
                    decoder = decoder_for(&self.avro, &self.store, records.len().max(1))?;
                    self.redo(&mut decoder, records, &good)?;
                }
                Err(e) => {
                    bad.push((i, e.to_string()));
                    decoder = decoder_for(&self.avro, &self.store, records.len().max(1))?;
                    self.redo(&mut decoder, records, &good)?;
                }
            }
        }
        let nested = match decoder.flush().map_err(avro_err)? {
            Some(b) => b,
            None => RecordBatch::new_empty(self.nested.clone()),
        };
        Ok((self.flatten(&nested)?, bad))
    }

    fn redo(&self, decoder: &mut Decoder, records: &[&[u8]], good: &[usize]) -> Result<()> {
        for i in good {
            decoder.decode(records[*i]).map_err(avro_err)?;
        }
        Ok(())
    }

    fn column(flat: &RecordBatch, name: &str) -> Result<ArrayRef> {
        flat.column_by_name(name)
            .cloned()
            .ok_or_else(|| avro_err(format!("no column {name:?}")))
    }

    /// The flat rows in the Avro record's shape.
    fn nest(&self, flat: &RecordBatch) -> Result<RecordBatch> {
        let n = flat.num_rows();
        let col = |name: &str| Self::column(flat, name);
        let constant = |v: &str| -> ArrayRef { Arc::new(StringArray::from(vec![v; n])) };
        let version = constant("1.0.0");
        let mut cols: HashMap<&str, ArrayRef> = HashMap::new();
        let mut columns = Vec::with_capacity(self.nested.fields().len());
        for f in self.nested.fields() {
            let array: ArrayRef = match f.name().as_str() {
                "id" => col("event_id")?,
                "type" => col("event_type")?,
                "version" => version.clone(),
                "time" => col("time")?,
                "source" => {
                    cols.clear();
                    cols.insert("service", constant("vigil"));
                    cols.insert("version", constant(env!("CARGO_PKG_VERSION")));
                    Arc::new(struct_of(f, &cols, n)?)
                }
                "tenant" => {
                    cols.clear();
                    cols.insert("tenantId", col("tenant_id")?);
                    Arc::new(struct_of(f, &cols, n)?)
                }
                "correlation" => {
                    cols.clear();
                    cols.insert("correlationId", col("incident_id")?);
                    cols.insert("causationId", col("alert_id")?);
                    Arc::new(struct_of(f, &cols, n)?)
                }
                "security" => {
                    cols.clear();
                    cols.insert("classification", constant("confidential"));
                    Arc::new(struct_of(f, &cols, n)?)
                }
                "incident" => {
                    cols.clear();
                    cols.insert("incidentId", col("incident_id")?);
                    cols.insert("incidentVersion", col("incident_version")?);
                    cols.insert("actor", col("actor")?);
                    cols.insert("entityType", col("entity_type")?);
                    cols.insert("entityId", col("entity_id")?);
                    Arc::new(struct_of(f, &cols, n)?)
                }
                "data" => self.payload_union(f, flat)?,
                other => return Err(avro_err(format!("unexpected field {other:?}"))),
            };
            columns.push(cast(&array, f.data_type())?);
        }
        Ok(RecordBatch::try_new(self.nested.clone(), columns)?)
    }

    fn payload_union(&self, field: &Field, flat: &RecordBatch) -> Result<ArrayRef> {
        let DataType::Union(ufields, mode) = field.data_type() else {
            return Err(avro_err("data is not a union"));
        };
        let types = Self::column(flat, "event_type")?;
        let types = cast(&types, &DataType::Utf8)?;
        let types = types.as_string::<i32>();
        let branch_of = |name: &str| {
            ufields
                .iter()
                .position(|(_, f)| short(f.name()) == name || struct_name(f) == Some(name))
        };
        // Each row's branch (index into ufields) and its row within it.
        let mut rows_of: Vec<Vec<u32>> = vec![Vec::new(); ufields.len()];
        let mut type_ids = Vec::with_capacity(flat.num_rows());
        let mut offsets = Vec::with_capacity(flat.num_rows());
        let ids: Vec<i8> = ufields.iter().map(|(id, _)| id).collect();
        for i in 0..flat.num_rows() {
            let t = types.value(i);
            let b = PAYLOADS
                .iter()
                .position(|(n, _)| *n == t)
                .and_then(|_| branch_of(t))
                .ok_or_else(|| avro_err(format!("row {i}: event type {t:?} has no Avro record")))?;
            type_ids.push(ids[b]);
            offsets.push(rows_of[b].len() as i32);
            rows_of[b].push(i as u32);
        }
        let mut children = Vec::with_capacity(ufields.len());
        for (b, (_, f)) in ufields.iter().enumerate() {
            let name = PAYLOADS
                .iter()
                .find(|(n, _)| short(f.name()) == *n || struct_name(f) == Some(n))
                .ok_or_else(|| avro_err(format!("unknown union branch {:?}", f.name())))?;
            let idx = UInt32Array::from(std::mem::take(&mut rows_of[b]));
            let mut cols: HashMap<&str, ArrayRef> = HashMap::new();
            for (avro, column) in name.1 {
                cols.insert(avro, take(&Self::column(flat, column)?, &idx, None)?);
            }
            let child = struct_of(f, &cols, idx.len())?;
            children.push(Arc::new(child) as ArrayRef);
        }
        let (type_ids, offsets) = (
            ScalarBuffer::from(type_ids),
            matches!(mode, arrow::datatypes::UnionMode::Dense).then(|| ScalarBuffer::from(offsets)),
        );
        Ok(Arc::new(UnionArray::try_new(
            ufields.clone(),
            type_ids,
            offsets,
            children,
        )?))
    }

    /// Avro-shaped rows back to flat ones.
    fn flatten(&self, nested: &RecordBatch) -> Result<RecordBatch> {
        let n = nested.num_rows();
        let top = |name: &str| -> Result<ArrayRef> {
            nested
                .column_by_name(name)
                .cloned()
                .ok_or_else(|| avro_err(format!("no field {name:?}")))
        };
        let inner = |name: &str, child: &str| -> Result<ArrayRef> {
            let s = top(name)?;
            let s = s
                .as_struct_opt()
                .ok_or_else(|| avro_err(format!("{name} is not a record")))?;
            s.column_by_name(child)
                .cloned()
                .ok_or_else(|| avro_err(format!("no field {name}.{child}")))
        };
        let mut by_name: HashMap<&str, ArrayRef> = HashMap::new();
        by_name.insert("event_id", top("id")?);
        by_name.insert("event_type", top("type")?);
        by_name.insert("time", top("time")?);
        by_name.insert("tenant_id", inner("tenant", "tenantId")?);
        by_name.insert("incident_id", inner("incident", "incidentId")?);
        by_name.insert("incident_version", inner("incident", "incidentVersion")?);
        by_name.insert("actor", inner("incident", "actor")?);
        by_name.insert("entity_type", inner("incident", "entityType")?);
        by_name.insert("entity_id", inner("incident", "entityId")?);
        let data = top("data")?;
        let union = data
            .as_any()
            .downcast_ref::<UnionArray>()
            .ok_or_else(|| avro_err("data is not a union"))?;
        let DataType::Union(ufields, _) = data.data_type() else {
            return Err(avro_err("data is not a union"));
        };
        for column in PAYLOAD_COLUMNS {
            // One array per branch (its field for this column, or nulls).
            let mut sources: Vec<ArrayRef> = Vec::with_capacity(ufields.len());
            let mut slot: HashMap<i8, usize> = HashMap::new();
            for (id, f) in ufields.iter() {
                let child = union.child(id);
                let spec = PAYLOADS
                    .iter()
                    .find(|(n, _)| short(f.name()) == *n || struct_name(f) == Some(n));
                let avro = spec.and_then(|(_, m)| m.iter().find(|(_, c)| *c == column));
                let array = match (avro, child.as_struct_opt()) {
                    (Some((a, _)), Some(s)) => s
                        .column_by_name(a)
                        .map(|c| cast(c, &DataType::Utf8))
                        .transpose()?
                        .unwrap_or_else(|| new_null_array(&DataType::Utf8, child.len())),
                    _ => new_null_array(&DataType::Utf8, child.len().max(1)),
                };
                slot.insert(id, sources.len());
                sources.push(array);
            }
            let mut picks = Vec::with_capacity(n);
            for i in 0..n {
                let id = union.type_id(i);
                let s = slot[&id];
                let row = if sources[s].is_empty() {
                    0
                } else {
                    union.value_offset(i)
                };
                picks.push((s, row));
            }
            let refs: Vec<&dyn Array> = sources.iter().map(|a| a.as_ref()).collect();
            by_name.insert(column, interleave(&refs, &picks)?);
        }
        let mut columns = Vec::with_capacity(self.flat.fields().len());
        for f in self.flat.fields() {
            let c = by_name
                .get(f.name().as_str())
                .ok_or_else(|| avro_err(format!("no value for {:?}", f.name())))?;
            columns.push(cast(c, f.data_type())?);
        }
        Ok(RecordBatch::try_new(self.flat.clone(), columns)?)
    }
}

/// The short name of a possibly namespaced name.
fn short(name: &str) -> &str {
    name.rsplit('.').next().unwrap_or(name)
}

/// The Avro record name arrow-avro keeps in a struct field's metadata.
fn struct_name(f: &Field) -> Option<&str> {
    f.metadata()
        .get(arrow_avro::schema::AVRO_NAME_METADATA_KEY)
        .map(|s| short(s))
}

/// A struct array of `field`'s shape: children from `cols` by name (cast to
/// the child's type), null where `cols` has none.
fn struct_of(field: &Field, cols: &HashMap<&str, ArrayRef>, n: usize) -> Result<StructArray> {
    let DataType::Struct(children) = field.data_type() else {
        return Err(avro_err(format!("{} is not a record", field.name())));
    };
    let arrays = children
        .iter()
        .map(|c| match cols.get(c.name().as_str()) {
            Some(a) => Ok(cast(a, c.data_type())?),
            None => Ok(new_null_array(c.data_type(), n)),
        })
        .collect::<Result<Vec<_>>>()?;
    let fields: Fields = children.clone();
    Ok(StructArray::try_new(fields, arrays, None)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vigil_operators::incident::model::{events_from_batch, events_to_batch, Event, EventKind};
    use vigil_operators::incident::{event_schema, Severity};

    fn event(kind: EventKind, version: u64) -> Event {
        Event {
            event_id: format!("e{version}"),
            kind,
            incident_id: "inc-1".into(),
            version,
            time_ms: 1_764_000_000_000 + version as i64,
            tenant_id: "acme".into(),
            actor: "vigil".into(),
            entity_type: "user".into(),
            entity_id: "bob".into(),
            severity: None,
            previous_severity: None,
            detection: None,
            alert_id: None,
            title: None,
            rule: None,
            assignee: None,
            resolution: None,
            reason: None,
        }
    }

    #[test]
    fn every_event_type_survives_avro_and_back() {
        let mut created = event(EventKind::Created, 1);
        created.title = Some("spray on user bob".into());
        created.severity = Some(Severity::Medium);
        created.detection = Some("spray".into());
        created.alert_id = Some("a1".into());
        let mut attached = event(EventKind::AlertAttached, 2);
        attached.severity = Some(Severity::High);
        attached.detection = Some("brute_force".into());
        attached.alert_id = Some("a2".into());
        let mut escalated = event(EventKind::Escalated, 3);
        escalated.severity = Some(Severity::High);
        escalated.previous_severity = Some(Severity::Medium);
        escalated.rule = Some("alert severity >= high".into());
        let mut assigned = event(EventKind::Assigned, 4);
        assigned.actor = "analyst@soc".into();
        assigned.assignee = Some("analyst@soc".into());
        let mut resolved = event(EventKind::Resolved, 5);
        resolved.resolution = Some("true_positive".into());
        resolved.reason = Some("contained".into());
        let reopened = event(EventKind::Reopened, 6);
        let events = vec![created, attached, escalated, assigned, resolved, reopened];
        let batch = events_to_batch(&events).expect("batch");
        let mut codec = EventCodec::new(event_schema()).expect("codec");
        let records = codec.encode(&batch).expect("encode");
        assert_eq!(records.len(), 6);
        // Single-object encoding: the marker, then the schema's fingerprint.
        assert!(records.iter().all(|r| r.starts_with(&[0xC3, 0x01])));
        let mut slices: Vec<&[u8]> = records.iter().map(|r| r.as_ref()).collect();
        slices.insert(2, b"not avro");
        let (back, bad) = codec.decode(&slices).expect("decode");
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].0, 2);
        let got: Vec<Event> = events_from_batch(&back)
            .expect("rows")
            .into_iter()
            .map(|e| e.expect("event"))
            .collect();
        assert_eq!(got, events);
    }
}
