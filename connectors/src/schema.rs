//! Record schemas as pipeline authors declare them.
//!
//! A source that reads self-describing text (JSON) needs to be told which
//! fields to keep and as what type; the declaration becomes an Arrow schema.
//! Fields absent from a record are null; fields a record has but the schema
//! lacks are ignored, so one schema reads a sensor's output across versions.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef, TimeUnit};
use serde::Deserialize;

use crate::error::{ConnectorError, Result};

/// One declared field.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldConfig {
    /// Field name exactly as it appears in the records (dots allowed, as in
    /// Zeek's `id.orig_h`).
    pub name: String,
    /// One of [`FieldConfig::TYPES`].
    #[serde(rename = "type")]
    pub data_type: String,
    /// Sub-fields, for `type: struct`.
    #[serde(default)]
    pub fields: Vec<FieldConfig>,
}

impl FieldConfig {
    /// Type names accepted in pipeline files.
    pub const TYPES: &'static [&'static str] = &[
        "string",
        "int64",
        "int32",
        "uint16",
        "uint32",
        "uint64",
        "float64",
        "float32",
        "boolean",
        "timestamp",
        "struct",
        "list<string>",
        "list<int64>",
    ];

    /// The Arrow type this field decodes to.
    ///
    /// `timestamp` fields become millisecond timestamps in UTC; `path` names the
    /// field in errors (`schema.fields[3]`).
    pub fn arrow_type(&self, path: &str) -> Result<DataType> {
        let t = match self.data_type.as_str() {
            "string" | "str" | "utf8" => DataType::Utf8,
            "int64" | "int" | "long" | "integer" => DataType::Int64,
            "int32" => DataType::Int32,
            "uint16" => DataType::UInt16,
            "uint32" => DataType::UInt32,
            "uint64" => DataType::UInt64,
            "float64" | "double" | "float" => DataType::Float64,
            "float32" => DataType::Float32,
            "boolean" | "bool" => DataType::Boolean,
            "timestamp" => timestamp_type(),
            "list<string>" => DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
            "list<int64>" => DataType::List(Arc::new(Field::new("item", DataType::Int64, true))),
            "struct" => {
                if self.fields.is_empty() {
                    return Err(ConnectorError::config(
                        format!("{path}.fields"),
                        format!("struct field {:?} declares no fields", self.name),
                    ));
                }
                DataType::Struct(Fields::from(
                    self.fields
                        .iter()
                        .enumerate()
                        .map(|(i, f)| {
                            Ok(Field::new(
                                &f.name,
                                f.arrow_type(&format!("{path}.fields[{i}]"))?,
                                true,
                            ))
                        })
                        .collect::<Result<Vec<_>>>()?,
                ))
            }
            other => {
                let err = ConnectorError::config(
                    format!("{path}.type"),
                    format!("unknown type {other:?} for field {:?}", self.name),
                );
                return Err(match suggest(other, Self::TYPES) {
                    Some(s) => err.with_hint(format!("did you mean {s:?}?")),
                    None => err.with_hint(format!("types are: {}", Self::TYPES.join(", "))),
                });
            }
        };
        if !self.fields.is_empty() && self.data_type != "struct" {
            return Err(ConnectorError::config(
                format!("{path}.fields"),
                format!(
                    "field {:?} of type {} cannot have sub-fields",
                    self.name, self.data_type
                ),
            ));
        }
        Ok(t)
    }
}

/// The type of event-time and other timestamp columns.
pub fn timestamp_type() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

/// Builds the Arrow schema of a list of declared fields (`path` as in errors).
pub fn arrow_schema(fields: &[FieldConfig], path: &str) -> Result<SchemaRef> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(fields.len());
    for (i, f) in fields.iter().enumerate() {
        if !seen.insert(f.name.as_str()) {
            return Err(ConnectorError::config(
                format!("{path}[{i}].name"),
                format!("field {:?} declared twice", f.name),
            ));
        }
        out.push(Field::new(
            &f.name,
            f.arrow_type(&format!("{path}[{i}]"))?,
            true,
        ));
    }
    Ok(Arc::new(Schema::new(out)))
}

/// The closest of `candidates` to `word`, if close enough to be a typo.
pub fn suggest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (strsim::jaro_winkler(word, c), *c))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}
