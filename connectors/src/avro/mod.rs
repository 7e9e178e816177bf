//! Avro in the Confluent wire format: a magic byte `0`, a 4-byte schema id,
//! then the Avro binary body written with that (writer) schema.
//!
//! Records decode straight into Arrow batches with arrow-avro, always
//! through the pipeline's *reader* schema, so producers can evolve their
//! schema (add an optional field, say) while the pipeline's columns stay
//! put; Avro's schema-resolution rules decide what is compatible. Writer
//! schemas are fetched from the Schema Registry by id the first time one is
//! seen ([`Registry`], over schema_registry_converter) and cached.
//!
//! A record is checked on its own: a missing magic byte, an id the registry
//! does not know, a writer schema that cannot be read as the reader schema,
//! or a body that does not match its schema each send that one record to
//! the dead letters with its own class, and the others of the batch flow on.

mod decoder;
mod registry;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow_avro::reader::ReaderBuilder;
use arrow_avro::schema::{AvroSchema, Fingerprint, FingerprintAlgorithm, SchemaStore};

pub use decoder::{AvroDecoder, Decoded};
pub use registry::{Lookup, Registry, RegistryConfig};

use crate::error::{ConnectorError, Result};
use crate::schema::timestamp_type;

/// Reads an Avro schema file (`.avsc`), checking it is a record schema.
/// `field` names the setting in errors.
pub fn load_schema_file(path: &str, field: &str) -> Result<AvroSchema> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConnectorError::config(field, format!("cannot read Avro schema {path:?}: {e}"))
    })?;
    let schema = AvroSchema::new(text);
    arrow_schema(&schema).map_err(|e| {
        ConnectorError::config(field, format!("{path:?} is not a usable Avro schema: {e}"))
    })?;
    Ok(schema)
}

/// The Arrow schema rows read with `reader` have: Avro records become
/// structs, unions with null become nullable columns, `timestamp-millis` and
/// `timestamp-micros` top-level fields become millisecond UTC timestamps
/// (the type of every event-time column in Vigil).
pub fn arrow_schema(reader: &AvroSchema) -> std::result::Result<SchemaRef, String> {
    let raw = raw_arrow_schema(reader)?;
    Ok(normalized(&raw))
}

/// The schema arrow-avro itself produces for `reader`.
fn raw_arrow_schema(reader: &AvroSchema) -> std::result::Result<SchemaRef, String> {
    let mut store = SchemaStore::new_with_type(FingerprintAlgorithm::Id);
    store
        .set(Fingerprint::Id(0), reader.clone())
        .map_err(|e| e.to_string())?;
    let decoder = ReaderBuilder::new()
        .with_reader_schema(reader.clone())
        .with_writer_schema_store(store)
        .with_active_fingerprint(Fingerprint::Id(0))
        .build_decoder()
        .map_err(|e| e.to_string())?;
    let schema = decoder.schema();
    if schema.fields().is_empty() {
        return Err("the schema is not a record with fields".into());
    }
    Ok(schema)
}

/// `raw` with top-level timestamps as Vigil's timestamp type and without
/// schema-level metadata.
fn normalized(raw: &Schema) -> SchemaRef {
    let fields: Vec<Field> = raw
        .fields()
        .iter()
        .map(|f| match f.data_type() {
            DataType::Timestamp(_, _) => Field::new(f.name(), timestamp_type(), f.is_nullable()),
            _ => f.as_ref().clone().with_metadata(Default::default()),
        })
        .collect();
    Arc::new(Schema::new(fields))
}
