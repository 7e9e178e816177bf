//! Lowering of `JOIN … ON` to an interval join.
//!
//! ```sql
//! SELECT … FROM flows f JOIN auth a
//!   ON f.src_ip = a.src_ip
//!  AND a.ts BETWEEN f.ts - INTERVAL '1' MINUTE AND f.ts + INTERVAL '1' MINUTE
//! ```
//!
//! The `ON` condition is split into its conjuncts: equalities between an
//! expression of the left and one of the right are the key; comparisons of
//! the two sides' timestamps, each plus or minus an interval, bound
//! `right.ts - left.ts`; everything else is checked on each candidate pair
//! (for a left join, a left row failing it is unmatched, as SQL says). A
//! join without a key, or without both bounds, would keep every row forever
//! and is refused, saying which part is missing.
//!
//! Each side's rows are prepared (its own filters and projections, then the
//! key columns `__vigil_key_N`, plain values of one type on both sides) so
//! the engine hash-partitions both inputs alike. When both sides have
//! `tenant_id` it joins the key, unless the step is cross-tenant.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::common::{Column, DFSchema, ExprSchema, ScalarValue};
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{
    BinaryExpr, Cast, Expr as LExpr, ExprSchemable, JoinType, LogicalPlan, Operator,
};
use datafusion::physical_expr::expressions::Column as PhysicalColumn;
use datafusion::physical_expr::PhysicalExpr;

use super::super::error::SqlError;
use super::super::stages::{Stage, Stages};
use super::{append, plan_error, Lowering, PlannedQuery};
use crate::join::{IntervalJoinSpec, JoinKind};

/// The tenant column kept apart unless a join is cross-tenant.
const TENANT: &str = "tenant_id";

/// `column + offset_ms`, as a side of a time comparison.
fn linear(e: &LExpr) -> Option<(Column, i64)> {
    match e {
        LExpr::Column(c) => Some((c.clone(), 0)),
        LExpr::Cast(Cast { expr, .. }) => linear(expr),
        LExpr::BinaryExpr(BinaryExpr { left, op, right }) => {
            let (c, base) = linear(left)?;
            let ms = interval_ms(right)?;
            match op {
                Operator::Plus => Some((c, base + ms)),
                Operator::Minus => Some((c, base - ms)),
                _ => None,
            }
        }
        _ => None,
    }
}

fn interval_ms(e: &LExpr) -> Option<i64> {
    match e {
        LExpr::Literal(v, _) => match v {
            ScalarValue::IntervalMonthDayNano(Some(i)) if i.months == 0 => {
                Some(i.days as i64 * 86_400_000 + i.nanoseconds / 1_000_000)
            }
            ScalarValue::IntervalDayTime(Some(i)) => {
                Some(i.days as i64 * 86_400_000 + i.milliseconds as i64)
            }
            _ => None,
        },
        LExpr::Cast(Cast { expr, .. }) => interval_ms(expr),
        _ => None,
    }
}

fn flip(op: Operator) -> Operator {
    match op {
        Operator::Gt => Operator::Lt,
        Operator::GtEq => Operator::LtEq,
        Operator::Lt => Operator::Gt,
        Operator::LtEq => Operator::GtEq,
        other => other,
    }
}

/// Which side's columns an expression reads: 0 left, 1 right, None both
/// or neither.
fn side_of(e: &LExpr, left: &DFSchema, right: &DFSchema) -> Option<usize> {
    let cols = e.column_refs();
    if cols.is_empty() {
        return None;
    }
    if cols.iter().all(|c| left.has_column(c)) {
        Some(0)
    } else if cols.iter().all(|c| right.has_column(c)) {
        Some(1)
    } else {
        None
    }
}

/// The bounds found so far on `right.ts - left.ts`, and the columns.
#[derive(Default)]
struct Bounds {
    lower: Option<i64>,
    upper: Option<i64>,
    columns: Option<(Column, Column)>,
}

impl Bounds {
    /// Takes `x op y` if it bounds the two sides' times; false if it is not
    /// a time bound.
    fn take(
        &mut self,
        x: &LExpr,
        op: Operator,
        y: &LExpr,
        left: &DFSchema,
        right: &DFSchema,
    ) -> Result<bool, SqlError> {
        let (Some((cx, ox)), Some((cy, oy))) = (linear(x), linear(y)) else {
            return Ok(false);
        };
        // (right + a) op (left + b)  ⇔  right - left op b - a
        let (lcol, rcol, op, c) = if right.has_column(&cx) && left.has_column(&cy) {
            (cy, cx, op, oy - ox)
        } else if left.has_column(&cx) && right.has_column(&cy) {
            (cx, cy, flip(op), ox - oy)
        } else {
            return Ok(false);
        };
        let is_time = |schema: &DFSchema, c: &Column| {
            schema.field_from_column(c).is_ok_and(|f| {
                matches!(f.data_type(), DataType::Timestamp(TimeUnit::Millisecond, _))
            })
        };
        if !is_time(left, &lcol) || !is_time(right, &rcol) {
            return Ok(false);
        }
        if let Some((l, r)) = &self.columns {
            if *l != lcol || *r != rcol {
                return Err(SqlError::new(format!(
                    "the join's time bounds compare {l} with {r} and {lcol} with {rcol}"
                ))
                .hint("bound one timestamp of each side: b.ts BETWEEN a.ts - INTERVAL … AND a.ts + INTERVAL …"));
            }
        }
        self.columns = Some((lcol, rcol));
        match op {
            Operator::GtEq => self.lower = Some(self.lower.map_or(c, |l| l.max(c))),
            Operator::Gt => self.lower = Some(self.lower.map_or(c + 1, |l| l.max(c + 1))),
            Operator::LtEq => self.upper = Some(self.upper.map_or(c, |u| u.min(c))),
            Operator::Lt => self.upper = Some(self.upper.map_or(c - 1, |u| u.min(c - 1))),
            _ => return Ok(false),
        }
        Ok(true)
    }
}

impl Lowering<'_> {
    /// A side of the join: its stateless stages from the scan up.
    fn join_side(&self, plan: &LogicalPlan) -> Result<(String, Stages), SqlError> {
        let (nodes, scan) = self.chain(plan);
        let LogicalPlan::TableScan(t) = scan else {
            return Err(match scan {
                LogicalPlan::Join(_) => SqlError::unbounded(
                    "joining more than two tables in one step",
                    "each streaming join is a step of its own",
                    "join two tables, then join the result in the next SQL step",
                    None,
                ),
                other => super::refuse(other),
            });
        };
        let (mut stages, _) = self.scan(scan)?;
        let rest = self.stages(&nodes, stages.output_schema())?;
        append(&mut stages, rest);
        Ok((t.table_name.table().to_string(), stages))
    }

    pub(super) fn join(
        &self,
        top: &[&LogicalPlan],
        join: &datafusion::logical_expr::Join,
    ) -> Result<PlannedQuery, SqlError> {
        let kind = match join.join_type {
            JoinType::Inner => JoinKind::Inner,
            JoinType::Left => JoinKind::Left,
            JoinType::Right => {
                return Err(SqlError::new("RIGHT JOIN is not supported on streams")
                    .hint("swap the tables and write LEFT JOIN"))
            }
            other => {
                return Err(SqlError::unbounded(
                    &format!("{other} JOIN"),
                    "only inner and left interval joins can decide when a row is complete",
                    "use JOIN or LEFT JOIN",
                    None,
                ))
            }
        };
        let (left_df, right_df) = (join.left.schema().as_ref(), join.right.schema().as_ref());
        let (left_table, mut left) = self.join_side(&join.left)?;
        let (right_table, mut right) = self.join_side(&join.right)?;

        let mut conjuncts: Vec<LExpr> = join
            .on
            .iter()
            .map(|(l, r)| l.clone().eq(r.clone()))
            .collect();
        if let Some(f) = &join.filter {
            conjuncts.extend(split_conjunction(f).into_iter().cloned());
        }
        let mut keys: Vec<(LExpr, LExpr)> = Vec::new();
        let mut bounds = Bounds::default();
        let mut residual: Vec<LExpr> = Vec::new();
        for c in conjuncts {
            let taken = match &c {
                LExpr::BinaryExpr(BinaryExpr { left, op, right }) if *op == Operator::Eq => {
                    match (
                        side_of(left, left_df, right_df),
                        side_of(right, left_df, right_df),
                    ) {
                        (Some(0), Some(1)) => {
                            keys.push((*left.clone(), *right.clone()));
                            true
                        }
                        (Some(1), Some(0)) => {
                            keys.push((*right.clone(), *left.clone()));
                            true
                        }
                        _ => false,
                    }
                }
                LExpr::BinaryExpr(BinaryExpr { left, op, right })
                    if matches!(
                        op,
                        Operator::Gt | Operator::GtEq | Operator::Lt | Operator::LtEq
                    ) =>
                {
                    bounds.take(left, *op, right, left_df, right_df)?
                }
                LExpr::Between(b) if !b.negated => {
                    let mut probe = Bounds {
                        columns: bounds.columns.clone(),
                        ..Bounds::default()
                    };
                    if probe.take(&b.expr, Operator::GtEq, &b.low, left_df, right_df)?
                        && probe.take(&b.expr, Operator::LtEq, &b.high, left_df, right_df)?
                    {
                        bounds.take(&b.expr, Operator::GtEq, &b.low, left_df, right_df)?;
                        bounds.take(&b.expr, Operator::LtEq, &b.high, left_df, right_df)?
                    } else {
                        false
                    }
                }
                _ => false,
            };
            if !taken {
                residual.push(c);
            }
        }
        let (Some(lower), Some(upper), Some((lcol, rcol))) =
            (bounds.lower, bounds.upper, bounds.columns.clone())
        else {
            return Err(SqlError::unbounded(
                "a JOIN without both time bounds",
                "without them a row could pair with any later row, so both streams are kept forever",
                "add to ON: b.ts BETWEEN a.ts - INTERVAL '10' SECOND AND a.ts + INTERVAL '1' MINUTE",
                None,
            ));
        };
        if lower > upper {
            return Err(SqlError::new(format!(
                "the join's time bounds are empty: right - left must be in [{lower}, {upper}] ms"
            )));
        }
        let has = |df: &DFSchema| df.fields().iter().any(|f| f.name() == TENANT);
        let tenant_keyed = keys.iter().any(|(l, r)| {
            matches!((l, r), (LExpr::Column(a), LExpr::Column(b)) if a.name == TENANT && b.name == TENANT)
        });
        if !self.options.cross_tenant && has(left_df) && has(right_df) && !tenant_keyed {
            let col = |df: &DFSchema| -> Result<LExpr, SqlError> {
                let (q, f) = df
                    .qualified_field_with_unqualified_name(TENANT)
                    .map_err(plan_error)?;
                Ok(LExpr::Column(Column::new(q.cloned(), f.name())))
            };
            keys.push((col(left_df)?, col(right_df)?));
        }
        if keys.is_empty() {
            return Err(SqlError::unbounded(
                "a JOIN without an equality between the two sides",
                "every row would pair with every row of the other stream in its time range, on one subtask",
                "add a key to ON: a.src_ip = b.src_ip",
                None,
            ));
        }

        // Each side: its columns, then the keys as plain values of one type.
        let mut key_names = Vec::with_capacity(keys.len());
        let mut left_exprs: Vec<Arc<dyn PhysicalExpr>> = Vec::new();
        let mut right_exprs: Vec<Arc<dyn PhysicalExpr>> = Vec::new();
        let mut key_fields = Vec::new();
        for (i, (l, r)) in keys.iter().enumerate() {
            let plain = |e: &LExpr, df: &DFSchema| -> Result<(LExpr, DataType), SqlError> {
                let t = e.get_type(df).map_err(plan_error)?;
                Ok(match t {
                    DataType::Dictionary(_, v) => (
                        LExpr::Cast(Cast::new(Box::new(e.clone()), (*v).clone())),
                        *v,
                    ),
                    DataType::Utf8View | DataType::LargeUtf8 => (
                        LExpr::Cast(Cast::new(Box::new(e.clone()), DataType::Utf8)),
                        DataType::Utf8,
                    ),
                    t => (e.clone(), t),
                })
            };
            let (l, lt) = plain(l, left_df)?;
            let (r, rt) = plain(r, right_df)?;
            let r = if lt != rt {
                LExpr::Cast(Cast::new(Box::new(r), lt.clone()))
            } else {
                r
            };
            left_exprs.push(self.physical(&l, left_df)?);
            right_exprs.push(self.physical(&r, right_df)?);
            let name = format!("__vigil_key_{i}");
            key_fields.push(Field::new(&name, lt, true));
            key_names.push(name);
        }
        let with_keys = |stages: &mut Stages, exprs: Vec<Arc<dyn PhysicalExpr>>| {
            let input = stages.output_schema();
            let mut all: Vec<Arc<dyn PhysicalExpr>> = input
                .fields()
                .iter()
                .enumerate()
                .map(|(i, f)| Arc::new(PhysicalColumn::new(f.name(), i)) as Arc<dyn PhysicalExpr>)
                .collect();
            all.extend(exprs);
            let mut fields: Vec<Field> =
                input.fields().iter().map(|f| f.as_ref().clone()).collect();
            fields.extend(key_fields.iter().cloned());
            let schema: SchemaRef = Arc::new(Schema::new(fields));
            stages.push(
                Stage::Project {
                    exprs: all,
                    schema: schema.clone(),
                },
                schema,
            );
        };
        let left_width = left_df.fields().len();
        let right_width = right_df.fields().len();
        with_keys(&mut left, left_exprs);
        with_keys(&mut right, right_exprs);
        let nkeys = key_names.len();
        let joined: SchemaRef = Arc::new(join.schema.as_arrow().clone());
        let residual = match residual.into_iter().reduce(|a, b| a.and(b)) {
            Some(e) => Some(self.physical(&e, &join.schema)?),
            None => None,
        };
        let post = self.stages(top, joined.clone())?;
        if post.output_schema().fields().is_empty() {
            return Err(SqlError::new("the join selects no columns"));
        }
        let spec = IntervalJoinSpec {
            name: self.options.name.clone(),
            describe: self.sql.to_string(),
            left: left.output_schema(),
            right: right.output_schema(),
            left_keys: (left_width..left_width + nkeys).collect(),
            right_keys: (right_width..right_width + nkeys).collect(),
            key_names,
            left_time: left_df.index_of_column(&lcol).map_err(plan_error)?,
            right_time: right_df.index_of_column(&rcol).map_err(plan_error)?,
            left_width,
            right_width,
            lower_ms: lower,
            upper_ms: upper,
            kind,
            residual,
            joined,
            post,
        };
        if self.options.lateness_ms > 0 {
            return Err(SqlError::new(
                "allowed_lateness applies to windowed aggregates; a join sends late rows to its late output",
            ));
        }
        Ok(PlannedQuery::Join {
            left_table,
            right_table,
            left,
            right,
            join: Box::new(spec),
        })
    }
}
