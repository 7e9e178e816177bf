//! `filter`: keeps the rows for which a SQL condition is true.
//!
//! ```yaml
//! failed_logins:
//!   type: filter
//!   input: auth
//!   where: "outcome = 'failure' AND tenant_id = 'acme'"
//! ```
//!
//! Rows where the condition is null are dropped, as in SQL's `WHERE`.

use arrow::array::{AsArray, RecordBatch};
use arrow::compute::filter_record_batch;
use arrow::datatypes::{DataType, SchemaRef};
use serde::Deserialize;
use vigil_engine::{Collector, Operator, OperatorFactory, TaskContext};

use crate::error::{OperatorError, Result};
use crate::expr::SqlExpr;

/// Configuration of a `filter` step.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// A SQL boolean expression over the input's columns.
    #[serde(rename = "where")]
    pub condition: String,
}

/// Builds `filter` subtasks.
#[derive(Debug)]
pub struct FilterFactory {
    schema: SchemaRef,
    condition: SqlExpr,
}

impl FilterFactory {
    /// Compiles the condition against the input schema.
    pub fn new(config: &FilterConfig, input: SchemaRef) -> Result<Self> {
        let condition = SqlExpr::compile(&config.condition, &input, "where")?;
        if condition.data_type() != &DataType::Boolean {
            return Err(OperatorError::config(
                "where",
                format!(
                    "condition {:?} is of type {}, not boolean",
                    config.condition,
                    condition.data_type()
                ),
                Some("compare it with something, e.g. outcome = 'failure'".into()),
            ));
        }
        Ok(Self {
            schema: input,
            condition,
        })
    }
}

impl OperatorFactory for FilterFactory {
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
        Ok(Box::new(Filter {
            condition: self.condition.clone(),
        }))
    }
    fn describe(&self) -> String {
        format!("filter where {}", self.condition.sql())
    }
}

struct Filter {
    condition: SqlExpr,
}

impl Operator for Filter {
    fn is_stateless(&self) -> bool {
        true
    }

    fn process_batch(
        &mut self,
        _input: usize,
        batch: RecordBatch,
        out: &mut Collector,
    ) -> vigil_engine::Result<()> {
        let mask = self.condition.evaluate(&batch)?;
        let mask = mask.as_boolean();
        if mask.true_count() == batch.num_rows() {
            out.emit(batch);
        } else {
            out.emit(filter_record_batch(&batch, mask)?);
        }
        Ok(())
    }
}
