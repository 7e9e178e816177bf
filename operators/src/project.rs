//! `project`: computes columns with SQL expressions.
//!
//! ```yaml
//! tagged:
//!   type: project
//!   input: auth
//!   keep_input: true          # keep every input column, then add these
//!   columns:
//!     user_upper: "upper(user)"
//!     is_admin: "user LIKE 'admin%'"
//! ```
//!
//! Without `keep_input`, the output is exactly `columns`, in the order
//! written. A computed column whose name matches an input column replaces it
//! in place.

use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch};
use arrow::datatypes::{Field, Schema, SchemaRef};
use indexmap::IndexMap;
use serde::Deserialize;
use vigil_engine::{Collector, Operator, OperatorFactory, TaskContext};

use crate::error::{OperatorError, Result};
use crate::expr::SqlExpr;

/// Configuration of a `project` step.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectConfig {
    /// Output columns: name, then a SQL expression over the input's columns.
    pub columns: IndexMap<String, String>,
    /// Keep every input column ahead of the computed ones.
    #[serde(default)]
    pub keep_input: bool,
}

/// Where an output column comes from.
#[derive(Debug, Clone)]
enum Source {
    Input(usize),
    Expr(SqlExpr),
}

/// Builds `project` subtasks.
#[derive(Debug)]
pub struct ProjectFactory {
    schema: SchemaRef,
    columns: Arc<Vec<Source>>,
}

impl ProjectFactory {
    /// Compiles every expression against the input schema.
    pub fn new(config: &ProjectConfig, input: SchemaRef) -> Result<Self> {
        if config.columns.is_empty() {
            return Err(OperatorError::config(
                "columns",
                "a project step needs at least one column",
                None,
            ));
        }
        let mut fields: Vec<Field> = Vec::new();
        let mut sources: Vec<Source> = Vec::new();
        if config.keep_input {
            for (i, f) in input.fields().iter().enumerate() {
                fields.push(f.as_ref().clone());
                sources.push(Source::Input(i));
            }
        }
        for (name, sql) in &config.columns {
            let expr = SqlExpr::compile(sql, &input, &format!("columns.{name}"))?;
            let field = Field::new(name, expr.data_type().clone(), expr.nullable());
            // A bare column is passed through without evaluating anything.
            let source = match input.index_of(sql.trim()) {
                Ok(i) => Source::Input(i),
                Err(_) => Source::Expr(expr),
            };
            match fields.iter().position(|f| f.name() == name) {
                Some(at) => {
                    fields[at] = field;
                    sources[at] = source;
                }
                None => {
                    fields.push(field);
                    sources.push(source);
                }
            }
        }
        Ok(Self {
            schema: Arc::new(Schema::new(fields)),
            columns: Arc::new(sources),
        })
    }
}

impl OperatorFactory for ProjectFactory {
    /// Records the step cannot evaluate go to dead letters (see the
    /// runtime's poison-record isolation).
    fn side_outputs(&self) -> Vec<(vigil_engine::operator::SidePort, SchemaRef)> {
        vec![(
            vigil_engine::DEAD_LETTER,
            vigil_engine::dead_letter::schema(),
        )]
    }
    fn output_schema(&self) -> SchemaRef {
        self.schema.clone()
    }
    fn create(&self, _ctx: &TaskContext) -> vigil_engine::Result<Box<dyn Operator>> {
        Ok(Box::new(Project {
            schema: self.schema.clone(),
            columns: self.columns.clone(),
        }))
    }
    fn describe(&self) -> String {
        let names: Vec<&str> = self
            .schema
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .collect();
        format!("project {}", names.join(", "))
    }
}

struct Project {
    schema: SchemaRef,
    columns: Arc<Vec<Source>>,
}

impl Operator for Project {
    fn is_stateless(&self) -> bool {
        true
    }

    fn process_batch(
        &mut self,
        _input: usize,
        batch: RecordBatch,
        out: &mut Collector,
    ) -> vigil_engine::Result<()> {
        let arrays = self
            .columns
            .iter()
            .map(|c| match c {
                Source::Input(i) => Ok(batch.column(*i).clone()),
                Source::Expr(e) => e.evaluate(&batch),
            })
            .collect::<datafusion::error::Result<Vec<ArrayRef>>>()?;
        out.emit(RecordBatch::try_new(self.schema.clone(), arrays)?);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use arrow::array::{AsArray, Int64Array, StringArray};
    use arrow::datatypes::{DataType, Int64Type};

    use super::*;

    fn input() -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("user", DataType::Utf8, false),
            Field::new("bytes", DataType::Int64, false),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(vec!["alice", "bob"])),
                Arc::new(Int64Array::from(vec![1500, 20])),
            ],
        )
        .expect("batch")
    }

    fn run(config: ProjectConfig) -> RecordBatch {
        let f = ProjectFactory::new(&config, input().schema()).expect("factory");
        let ctx = TaskContext::detached("p", 0, 1, 0);
        let mut op = f.create(&ctx).expect("op");
        let mut out = Collector::new();
        op.process_batch(0, input(), &mut out).expect("process");
        let mut batches = out.take_main();
        assert_eq!(batches.len(), 1);
        let b = batches.remove(0);
        assert_eq!(b.schema(), f.output_schema());
        b
    }

    #[test]
    fn computed_columns_in_the_order_written() {
        let mut columns = IndexMap::new();
        columns.insert("kb".to_string(), "bytes / 1000".to_string());
        columns.insert("who".to_string(), "upper(user)".to_string());
        let b = run(ProjectConfig {
            columns,
            keep_input: false,
        });
        assert_eq!(b.schema().field(0).name(), "kb");
        assert_eq!(b.column(0).as_primitive::<Int64Type>().values(), &[1, 0]);
        assert_eq!(b.column(1).as_string::<i32>().value(1), "BOB");
    }

    #[test]
    fn keep_input_adds_and_replaces_in_place() {
        let mut columns = IndexMap::new();
        columns.insert("bytes".to_string(), "bytes * 2".to_string());
        columns.insert("big".to_string(), "bytes > 1000".to_string());
        let b = run(ProjectConfig {
            columns,
            keep_input: true,
        });
        let names: Vec<&str> = b
            .schema_ref()
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .collect();
        assert_eq!(names, ["user", "bytes", "big"]);
        assert_eq!(
            b.column(1).as_primitive::<Int64Type>().values(),
            &[3000, 40]
        );
        assert!(b.column(2).as_boolean().value(0));
    }
}
