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

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow_avro::reader::ReaderBuilder;
use arrow_avro::schema::{AvroSchema, Fingerprint, FingerprintAlgorithm, SchemaStore};
use serde_json::Value;

pub use decoder::{AvroDecoder, Decoded};
pub use registry::{Lookup, Registry, RegistryConfig};

use crate::error::{ConnectorError, Result};
use crate::schema::timestamp_type;

/// Reads an Avro schema file (`.avsc`) and returns the record schema
/// `record` of it, self-contained. The file is one record, or a list of
/// named types (as `schemas/security-events.avsc`) whose later types use
/// earlier ones by name; then `record` (full or short name) picks one, and
/// the types it uses are written into it, so the registry and the decoder
/// get a schema that stands alone. `field` names the setting in errors.
pub fn load_schema_file(path: &str, record: Option<&str>, field: &str) -> Result<AvroSchema> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConnectorError::config(field, format!("cannot read Avro schema {path:?}: {e}"))
    })?;
    schema_from_text(&text, path, record, field)
}

/// [`load_schema_file`] on the text of a schema file; `path` names it in
/// errors.
pub fn schema_from_text(
    text: &str,
    path: &str,
    record: Option<&str>,
    field: &str,
) -> Result<AvroSchema> {
    let json: Value = serde_json::from_str(text)
        .map_err(|e| ConnectorError::config(field, format!("{path:?} is not JSON: {e}")))?;
    let chosen = match (&json, record) {
        (Value::Array(types), Some(name)) => {
            let mut defs = HashMap::new();
            for t in types {
                collect_named(t, "", &mut defs);
            }
            let full = defs
                .keys()
                .find(|k| *k == name || k.rsplit('.').next() == Some(name))
                .cloned()
                .ok_or_else(|| {
                    let mut names: Vec<&String> = defs.keys().collect();
                    names.sort();
                    ConnectorError::config(
                        format!("{field}_record"),
                        format!("{path:?} defines no type {name:?}"),
                    )
                    .with_hint(format!(
                        "it defines {}",
                        names
                            .iter()
                            .map(|n| n.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                })?;
            let mut defined = HashSet::new();
            inline(&Value::String(full), "", &defs, &mut defined)
        }
        (Value::Array(_), None) => {
            return Err(ConnectorError::config(
                format!("{field}_record"),
                format!("{path:?} defines several types: say which record to read"),
            ))
        }
        (other, _) => other.clone(),
    };
    let schema = AvroSchema::new(chosen.to_string());
    arrow_schema(&schema).map_err(|e| {
        ConnectorError::config(field, format!("{path:?} is not a usable Avro schema: {e}"))
    })?;
    Ok(schema)
}

const PRIMITIVES: &[&str] = &[
    "null", "boolean", "int", "long", "float", "double", "bytes", "string",
];

/// The full name of a named type declared as `name` in namespace `ns`.
fn full_name(name: &str, ns: &str) -> String {
    if name.contains('.') || ns.is_empty() {
        name.to_string()
    } else {
        format!("{ns}.{name}")
    }
}

/// The full name of the named type (record, enum, fixed) object `o`
/// declares in namespace `ns`, if it declares one.
fn declared_name(o: &serde_json::Map<String, Value>, ns: &str) -> Option<String> {
    let name = o.get("name").and_then(Value::as_str)?;
    if !matches!(
        o.get("type").and_then(Value::as_str),
        Some("record" | "enum" | "fixed")
    ) {
        return None;
    }
    let own_ns = o.get("namespace").and_then(Value::as_str).unwrap_or(ns);
    Some(full_name(name, own_ns))
}

/// The namespace part of a full name.
fn namespace_of(full: &str) -> &str {
    full.rsplit_once('.').map_or("", |(n, _)| n)
}

/// Records every named type (record, enum, fixed) in `v` under its full
/// name, with the name written in full so it reads the same anywhere.
fn collect_named(v: &Value, ns: &str, defs: &mut HashMap<String, Value>) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| collect_named(i, ns, defs)),
        Value::Object(o) => {
            let mut inner_ns = ns.to_string();
            if let Some(full) = declared_name(o, ns) {
                inner_ns = namespace_of(&full).to_string();
                let mut def = o.clone();
                def.insert("name".into(), Value::String(full.clone()));
                def.remove("namespace");
                defs.insert(full, Value::Object(def));
            }
            for key in ["type", "items", "values", "fields"] {
                if let Some(child) = o.get(key) {
                    collect_named(child, &inner_ns, defs);
                }
            }
        }
        _ => {}
    }
}

/// `v` with each named type used by name written out in full where it is
/// first used (Avro's rule: a name is defined once, then referred to).
fn inline(
    v: &Value,
    ns: &str,
    defs: &HashMap<String, Value>,
    defined: &mut HashSet<String>,
) -> Value {
    match v {
        Value::String(s) if !PRIMITIVES.contains(&s.as_str()) => {
            let full = if defs.contains_key(s) {
                s.clone()
            } else {
                full_name(s, ns)
            };
            match defs.get(&full) {
                Some(def) if defined.insert(full.clone()) => {
                    inline(def, namespace_of(&full), defs, defined)
                }
                Some(_) => Value::String(full),
                None => v.clone(),
            }
        }
        Value::Array(items) => {
            Value::Array(items.iter().map(|i| inline(i, ns, defs, defined)).collect())
        }
        Value::Object(o) => {
            let mut out = o.clone();
            if let Some(full) = declared_name(o, ns) {
                defined.insert(full);
            }
            for key in ["type", "items", "values"] {
                if let Some(child) = o.get(key) {
                    out.insert(key.into(), inline(child, ns, defs, defined));
                }
            }
            if let Some(Value::Array(fields)) = o.get("fields") {
                out.insert(
                    "fields".into(),
                    Value::Array(
                        fields
                            .iter()
                            .map(|f| inline(f, ns, defs, defined))
                            .collect(),
                    ),
                );
            }
            Value::Object(out)
        }
        _ => v.clone(),
    }
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
