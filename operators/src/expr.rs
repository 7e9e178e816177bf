//! SQL expressions compiled by DataFusion and evaluated on whole batches.
//!
//! Pipeline authors write `where:` conditions and computed columns in SQL;
//! DataFusion parses them, type-checks and coerces them against the input
//! schema, simplifies them, and produces a physical expression evaluated with
//! vectorised Arrow kernels. All of that happens when the pipeline is built,
//! so a typo is reported before anything runs, and evaluation on the hot path
//! is one kernel call per expression node per batch.

use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch};
use arrow::datatypes::{DataType, SchemaRef};
use datafusion::common::DFSchema;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::prelude::SessionContext;

use crate::error::{OperatorError, Result};

/// A compiled SQL expression over batches of one schema.
#[derive(Debug, Clone)]
pub struct SqlExpr {
    sql: String,
    expr: Arc<dyn PhysicalExpr>,
    data_type: DataType,
    nullable: bool,
}

impl SqlExpr {
    /// Compiles `sql` against `schema`; `field` names the config key in errors.
    pub fn compile(sql: &str, schema: &SchemaRef, field: &str) -> Result<Self> {
        let ctx = SessionContext::new();
        let df_schema = DFSchema::try_from(schema.as_ref().clone()).map_err(Box::new)?;
        let logical = ctx
            .parse_sql_expr(sql, &df_schema)
            .map_err(|e| expr_error(field, sql, e, schema))?;
        let expr = ctx
            .create_physical_expr(logical, &df_schema)
            .map_err(|e| expr_error(field, sql, e, schema))?;
        let data_type = expr
            .data_type(schema)
            .map_err(|e| expr_error(field, sql, e, schema))?;
        let nullable = expr.nullable(schema).unwrap_or(true);
        Ok(Self {
            sql: sql.to_string(),
            expr,
            data_type,
            nullable,
        })
    }

    /// The expression as written.
    pub fn sql(&self) -> &str {
        &self.sql
    }

    /// Type of the result.
    pub fn data_type(&self) -> &DataType {
        &self.data_type
    }

    /// Whether the result may be null.
    pub fn nullable(&self) -> bool {
        self.nullable
    }

    /// Evaluates on a batch, giving one value per row.
    pub fn evaluate(&self, batch: &RecordBatch) -> datafusion::error::Result<ArrayRef> {
        self.expr.evaluate(batch)?.into_array(batch.num_rows())
    }
}

fn expr_error(
    field: &str,
    sql: &str,
    e: datafusion::error::DataFusionError,
    schema: &SchemaRef,
) -> OperatorError {
    let message = e.strip_backtrace();
    let first = message.lines().next().unwrap_or_default().to_string();
    let cols: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    OperatorError::config(
        field,
        format!("invalid expression {sql:?}: {first}"),
        Some(format!("columns are: {}", cols.join(", "))),
    )
}
