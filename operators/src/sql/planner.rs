//! From a query's text to the operators that run it on a stream.
//!
//! DataFusion does the SQL work: it parses, resolves names against the
//! tables' schemas, type-checks and coerces, and plans. The logical plan is
//! then cut into what a stream can run:
//!
//! ```text
//!  Projection / Filter / Sort        ← post: stateless, on each window's rows
//!        Aggregate (window, keys)    ← WindowAggregateSpec: Vigil's operator
//!  Projection / Filter / Alias       ← prepare: stateless, on each batch
//!        TableScan (windowed table)  ← window columns added per row
//! ```
//!
//! A `JOIN` of two tables becomes an interval join (see `interval.rs`): each
//! side's stateless stages, then Vigil's join operator, then the stages
//! above it.
//!
//! A plan of any other shape is refused here, naming the construct, before
//! anything runs: an aggregate without a window never ends, `ORDER BY` has
//! nothing to sort until the stream ends, `LIMIT` and `DISTINCT` would have
//! to see all of it. Nothing that runs can be silently wrong.
//!
//! The prepare step computes every grouping key as a column, so the engine
//! can hash-partition the aggregate's input by key value (`lower(user)` and
//! `user` are different keys) and each subtask owns its keys' windows.

use std::collections::BTreeSet;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::catalog::TableProvider;
use datafusion::common::{Column, DFSchema, TableReference};
use datafusion::datasource::empty::EmptyTable;
use datafusion::execution::context::SessionState;
use datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext;
use datafusion::logical_expr::{Expr as LExpr, ExprSchemable, LogicalPlan};
use datafusion::physical_expr::aggregate::LoweredAggregateBuilder;
use datafusion::physical_expr::{create_physical_sort_exprs, PhysicalExpr};
use datafusion::prelude::SessionContext;
use datafusion::sql::parser::{DFParser, Statement as DFStatement};
use datafusion::sql::sqlparser::ast::{Query, SetExpr, Spanned, Statement, Visit, Visitor};
use datafusion::sql::sqlparser::dialect::GenericDialect;

use super::error::SqlError;
use super::rewrite::{blank_table_keywords, rewrite_windows, WindowedTable, WINDOW_COLUMNS};
use super::stages::{Stage, Stages};
use crate::join::IntervalJoinSpec;
use crate::window::{AggregateCall, GroupColumn, WindowAggregateSpec, WindowKind};

/// A table a query can read: a source or an earlier step.
#[derive(Debug, Clone)]
pub struct TableInfo {
    /// Its columns.
    pub schema: SchemaRef,
}

/// What a step reads from a source or step before it: its columns and
/// event time (a correlation's rules, an incidents step's alerts).
#[derive(Debug, Clone)]
pub struct StepInput {
    /// Its columns.
    pub schema: SchemaRef,
    /// Its event-time column, if known.
    pub event_time: Option<String>,
}

/// A catalog of one table: what a generated prepare query reads.
#[derive(Debug)]
pub struct OneTable<'a> {
    /// The table's name.
    pub name: &'a str,
    /// Its columns.
    pub schema: SchemaRef,
}

impl Catalog for OneTable<'_> {
    fn table(&self, name: &str) -> Option<TableInfo> {
        (name == self.name).then(|| TableInfo {
            schema: self.schema.clone(),
        })
    }
    fn names(&self) -> Vec<String> {
        vec![self.name.to_string()]
    }
}

/// A generated stateless query that shapes one input of a step before it
/// (a correlation's rule, an incidents step's alerts): it runs as its own
/// node, `<step>/<name>`.
#[derive(Debug)]
pub struct PrepareStep {
    /// The node's name after the step's.
    pub name: String,
    /// The source or step it reads.
    pub input: String,
    /// The generated query, shown by `vigil explain`.
    pub sql: String,
    /// What runs on the input's batches.
    pub stages: crate::sql::Stages,
}

/// The tables a query can name.
pub trait Catalog {
    /// The table called `name`, if there is one.
    fn table(&self, name: &str) -> Option<TableInfo>;
    /// Every table's name, for hints.
    fn names(&self) -> Vec<String>;
}

/// Settings of a streaming query that SQL does not say.
#[derive(Debug, Clone, Default)]
pub struct QueryOptions {
    /// Name of the step, for errors and `vigil explain`.
    pub name: String,
    /// How long after a window's end late rows still update it.
    pub lateness_ms: i64,
    /// Let a join match rows of different tenants (by default, when both
    /// sides have `tenant_id`, it joins the key).
    pub cross_tenant: bool,
}

/// A query cut into streaming operators.
#[derive(Debug)]
pub enum PlannedQuery {
    /// Row by row: filters and projections.
    Stateless {
        /// The table it reads.
        table: String,
        /// What it does to each batch.
        stages: Stages,
    },
    /// An interval join of two tables.
    Join {
        /// The left table.
        left_table: String,
        /// The right table.
        right_table: String,
        /// Stateless work on the left rows, ending with the key columns.
        left: Stages,
        /// Stateless work on the right rows, ending with the key columns.
        right: Stages,
        /// The join and what follows it.
        join: Box<IntervalJoinSpec>,
    },
    /// A windowed aggregate.
    Windowed {
        /// The table it reads.
        table: String,
        /// Stateless work before the aggregate, ending with the key columns.
        prepare: Stages,
        /// The aggregate and what follows it.
        aggregate: Box<WindowAggregateSpec>,
    },
}

impl PlannedQuery {
    /// The table the query reads.
    pub fn table(&self) -> &str {
        match self {
            PlannedQuery::Stateless { table, .. } | PlannedQuery::Windowed { table, .. } => table,
            PlannedQuery::Join { left_table, .. } => left_table,
        }
    }
}

/// The type of window columns.
fn window_time_type() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

/// Parses a single `SELECT`, with its windows rewritten.
fn parse(sql: &str) -> Result<(Statement, Vec<WindowedTable>), SqlError> {
    let (blanked, partitions) = blank_table_keywords(sql)?;
    let mut statements = DFParser::parse_sql_with_dialect(&blanked, &GenericDialect {})
        .map_err(SqlError::from_datafusion)?;
    if statements.len() != 1 {
        return Err(SqlError::new(format!(
            "expected one SELECT statement, found {}",
            statements.len()
        ))
        .hint("a SQL step is one query; put DDL in the pipeline's sources"));
    }
    let Some(DFStatement::Statement(statement)) = statements.pop_front() else {
        return Err(SqlError::new("expected a SELECT statement"));
    };
    let mut statement = *statement;
    if !matches!(statement, Statement::Query(_)) {
        return Err(
            SqlError::at("expected a SELECT statement", statement.span())
                .hint("a SQL step is one SELECT over sources and earlier steps"),
        );
    }
    check_stream_constructs(&statement)?;
    let windows = rewrite_windows(&mut statement, partitions)?;
    Ok((statement, windows))
}

/// The tables a query names (before windows are rewritten), for ordering
/// the steps of a pipeline.
pub fn tables_of(sql: &str) -> Result<Vec<String>, SqlError> {
    let (statement, windows) = parse(sql)?;
    Ok(base_tables(&statement, &windows))
}

fn normalize(name: &datafusion::sql::sqlparser::ast::ObjectName) -> String {
    name.0
        .iter()
        .filter_map(|p| p.as_ident())
        .map(|i| {
            if i.quote_style.is_some() {
                i.value.clone()
            } else {
                i.value.to_lowercase()
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

fn base_tables(statement: &Statement, windows: &[WindowedTable]) -> Vec<String> {
    let mut names = BTreeSet::new();
    let _ = datafusion::sql::sqlparser::ast::visit_relations(statement, |r| {
        let n = normalize(r);
        if !n.starts_with("__vigil_window_") {
            names.insert(n);
        }
        std::ops::ControlFlow::<()>::Continue(())
    });
    // CTE names are relations too; they are not tables.
    let mut ctes = BTreeSet::new();
    if let Statement::Query(q) = statement {
        if let Some(with) = &q.with {
            for c in &with.cte_tables {
                ctes.insert(c.alias.name.value.to_lowercase());
            }
        }
    }
    for w in windows {
        names.insert(w.base.to_lowercase());
    }
    names.into_iter().filter(|n| !ctes.contains(n)).collect()
}

/// Refuses, with their position, the constructs a stream cannot answer.
fn check_stream_constructs(statement: &Statement) -> Result<(), SqlError> {
    struct Check(Option<SqlError>);
    impl Visitor for Check {
        type Break = ();
        fn pre_visit_query(&mut self, q: &Query) -> std::ops::ControlFlow<()> {
            if let Some(limit) = &q.limit_clause {
                self.0 = Some(SqlError::unbounded(
                    "LIMIT",
                    "a stream has no first rows to keep; it never ends",
                    "remove LIMIT; a sink or `vigil sql --for` bounds what you read",
                    Some(limit.span()),
                ));
                return std::ops::ControlFlow::Break(());
            }
            if let SetExpr::SetOperation { op, .. } = q.body.as_ref() {
                self.0 = Some(SqlError::unbounded(
                    &op.to_string().to_uppercase(),
                    "set operations over streams are not supported",
                    "give each query its own step; several sinks can read one step",
                    Some(q.body.span()),
                ));
                return std::ops::ControlFlow::Break(());
            }
            if let SetExpr::Select(s) = q.body.as_ref() {
                for t in &s.from {
                    if let Some(j) = t.joins.get(1) {
                        self.0 = Some(SqlError::unbounded(
                            "a second JOIN in one query",
                            "each streaming join is a step of its own",
                            "join two tables, then join the result in the next SQL step",
                            Some(j.relation.span()),
                        ));
                        return std::ops::ControlFlow::Break(());
                    }
                }
                if s.from.len() > 1 {
                    self.0 = Some(SqlError::unbounded(
                        "a join of several tables in FROM",
                        "without a key and time bounds it keeps every row of both streams forever",
                        "JOIN … ON a.k = b.k AND b.ts BETWEEN a.ts - INTERVAL … AND a.ts + INTERVAL …",
                        Some(s.from[1].relation.span()),
                    ));
                    return std::ops::ControlFlow::Break(());
                }
            }
            std::ops::ControlFlow::Continue(())
        }
    }
    let mut c = Check(None);
    let _ = statement.visit(&mut c);
    c.0.map_or(Ok(()), Err)
}

/// Plans `sql` over the tables of `catalog`.
pub fn plan_query(
    sql: &str,
    catalog: &dyn Catalog,
    options: &QueryOptions,
) -> Result<PlannedQuery, SqlError> {
    let (statement, windows) = parse(sql)?;
    if let Statement::Query(q) = &statement {
        if let Some(with) = &q.with {
            for w in &windows {
                if with
                    .cte_tables
                    .iter()
                    .any(|c| c.alias.name.value.eq_ignore_ascii_case(&w.base))
                {
                    return Err(SqlError::at(
                        format!("{:?} is a WITH query; a window reads a table", w.base),
                        w.span,
                    )
                    .hint(
                        "window the table inside the WITH query, or use one SQL step per stage",
                    ));
                }
            }
        }
    }
    let tables = base_tables(&statement, &windows);
    if tables.is_empty() {
        return Err(SqlError::new("the query reads no table")
            .hint(format!("tables are: {}", catalog.names().join(", "))));
    }
    if tables.len() > 2 {
        return Err(SqlError::unbounded(
            &format!("reading {} tables ({})", tables.len(), tables.join(", ")),
            "a streaming join pairs two streams",
            "join two tables per step, and join the result in the next step",
            None,
        ));
    }
    if tables.len() == 2 && !windows.is_empty() {
        return Err(SqlError::at("a window over a join", windows[0].span)
            .hint("join in one SQL step and window its output in the next"));
    }
    let ctx = SessionContext::new();
    let mut infos = Vec::with_capacity(tables.len());
    for table in &tables {
        let Some(info) = catalog.table(table) else {
            let names = catalog.names();
            let hint = names
                .iter()
                .map(|n| (strsim_distance(table, n), n))
                .filter(|(d, _)| *d <= 2)
                .min()
                .map(|(_, n)| format!("did you mean {n:?}?"))
                .unwrap_or_else(|| format!("tables are: {}", names.join(", ")));
            return Err(SqlError::new(format!("unknown table {table:?}")).hint(hint));
        };
        register(&ctx, table, info.schema.clone())?;
        infos.push(info);
    }
    let table = tables[0].clone();
    let info = infos[0].clone();
    let mut windowed: Vec<(WindowedTable, usize, SchemaRef)> = Vec::new();
    for w in windows {
        let (time, schema) = windowed_schema(&info.schema, &w)?;
        register(&ctx, &w.name, schema.clone())?;
        windowed.push((w, time, schema));
    }
    let state = ctx.state();
    let plan = futures::executor::block_on(
        state.statement_to_plan(DFStatement::Statement(Box::new(statement))),
    )
    .map_err(|e| SqlError::from_datafusion(e).locate_in(sql))?;
    let plan = state
        .analyzer()
        .execute_and_check(plan, state.config_options(), |_, _| {})
        .map_err(|e| SqlError::from_datafusion(e).locate_in(sql))?;
    Lowering {
        state: &state,
        sql,
        options,
        windowed: &windowed,
    }
    .lower(&plan, table)
}

fn strsim_distance(a: &str, b: &str) -> usize {
    datafusion::common::utils::datafusion_strsim::levenshtein(a, b)
}

fn register(ctx: &SessionContext, name: &str, schema: SchemaRef) -> Result<(), SqlError> {
    let table: Arc<dyn TableProvider> = Arc::new(EmptyTable::new(schema));
    ctx.register_table(TableReference::bare(name), table)
        .map_err(SqlError::from_datafusion)?;
    Ok(())
}

/// The schema of a windowed table, and the index of its time column.
fn windowed_schema(base: &SchemaRef, w: &WindowedTable) -> Result<(usize, SchemaRef), SqlError> {
    let time = base
        .fields()
        .iter()
        .position(|f| f.name().eq_ignore_ascii_case(&w.time_column))
        .ok_or_else(|| {
            let names: Vec<&str> = base.fields().iter().map(|f| f.name().as_str()).collect();
            SqlError::at(
                format!("column {:?} is not in table {:?}", w.time_column, w.base),
                w.span,
            )
            .hint(format!("columns are: {}", names.join(", ")))
        })?;
    if !matches!(
        base.field(time).data_type(),
        DataType::Timestamp(TimeUnit::Millisecond, _)
    ) {
        return Err(SqlError::at(
            format!(
                "the window's time column {:?} is of type {}, not a timestamp",
                w.time_column,
                base.field(time).data_type()
            ),
            w.span,
        )
        .hint("window by the table's event-time column"));
    }
    for c in WINDOW_COLUMNS {
        if base.field_with_name(c).is_ok() {
            return Err(SqlError::at(
                format!(
                    "table {:?} already has a column {c:?}, which its window adds",
                    w.base
                ),
                w.span,
            )
            .hint("rename that column in an earlier step"));
        }
    }
    let mut fields: Vec<Field> = base.fields().iter().map(|f| f.as_ref().clone()).collect();
    for c in WINDOW_COLUMNS {
        fields.push(Field::new(c, window_time_type(), true));
    }
    Ok((time, Arc::new(Schema::new(fields))))
}

#[path = "interval.rs"]
mod interval;

struct Lowering<'a> {
    state: &'a SessionState,
    sql: &'a str,
    options: &'a QueryOptions,
    windowed: &'a [(WindowedTable, usize, SchemaRef)],
}

fn plan_error(e: datafusion::error::DataFusionError) -> SqlError {
    SqlError::from_datafusion(e)
}

fn limit_refused() -> SqlError {
    SqlError::unbounded("LIMIT", "a stream never ends", "remove LIMIT", None)
}

/// Names the node types a streaming query cannot hold.
fn refuse(plan: &LogicalPlan) -> SqlError {
    match plan {
        LogicalPlan::Join(_) => SqlError::unbounded(
            "a JOIN inside an aggregate or a subquery",
            "a streaming join is a step of its own",
            "join in one SQL step, aggregate or join again in the next",
            None,
        ),
        LogicalPlan::Limit(_) => limit_refused(),
        LogicalPlan::Distinct(_) => SqlError::unbounded(
            "DISTINCT",
            "without a window, deciding a row is new means remembering every row forever",
            "group by a window instead: GROUP BY TUMBLE(ts, INTERVAL '1' MINUTE), col",
            None,
        ),
        LogicalPlan::Window(_) => SqlError::unbounded(
            "a window function (OVER)",
            "its frames are not bounded by event time",
            "use GROUP BY TUMBLE / HOP / SESSION",
            None,
        ),
        LogicalPlan::Union(_) => SqlError::unbounded(
            "UNION",
            "set operations over streams are not supported",
            "give each query its own step",
            None,
        ),
        LogicalPlan::Sort(_) => SqlError::unbounded(
            "ORDER BY without a window",
            "a stream has no end to sort by",
            "group by a window (its rows are emitted, and sorted, as it closes), or sort where you read the sink",
            None,
        ),
        LogicalPlan::Aggregate(_) => SqlError::unbounded(
            "an aggregate over a windowed aggregate",
            "windows of windows are not supported in one step",
            "aggregate again in a second SQL step that reads this one",
            None,
        ),
        other => SqlError::new(format!(
            "{} is not supported in a streaming query",
            other.display().to_string().split(':').next().unwrap_or("this plan")
        )),
    }
}

impl Lowering<'_> {
    fn physical(&self, e: &LExpr, schema: &DFSchema) -> Result<Arc<dyn PhysicalExpr>, SqlError> {
        self.state
            .create_physical_expr(e.clone(), schema)
            .map_err(plan_error)
    }

    /// A stateless node as a stage; `None` for the ones that change nothing.
    fn stage(&self, node: &LogicalPlan) -> Result<Option<Stage>, SqlError> {
        Ok(match node {
            LogicalPlan::Projection(p) => Some(Stage::Project {
                exprs: p
                    .expr
                    .iter()
                    .map(|e| self.physical(e, p.input.schema()))
                    .collect::<Result<_, _>>()?,
                schema: Arc::new(p.schema.as_arrow().clone()),
            }),
            LogicalPlan::Filter(f) => Some(Stage::Filter(
                self.physical(&f.predicate, f.input.schema())?,
            )),
            LogicalPlan::SubqueryAlias(_) => None,
            LogicalPlan::Sort(s) => {
                if s.fetch.is_some() {
                    return Err(limit_refused());
                }
                let exprs = create_physical_sort_exprs(
                    &s.expr,
                    s.input.schema(),
                    self.state.execution_props(),
                    &PhysicalPlanningContext::default(),
                )
                .map_err(plan_error)?;
                Some(Stage::Sort(exprs))
            }
            other => return Err(refuse(other)),
        })
    }

    /// Walks down from `plan` through stateless nodes; returns them (top
    /// first) and the node below them.
    fn chain<'p>(&self, plan: &'p LogicalPlan) -> (Vec<&'p LogicalPlan>, &'p LogicalPlan) {
        let mut nodes = Vec::new();
        let mut at = plan;
        loop {
            match at {
                LogicalPlan::Projection(p) => {
                    nodes.push(at);
                    at = &p.input;
                }
                LogicalPlan::Filter(f) => {
                    nodes.push(at);
                    at = &f.input;
                }
                LogicalPlan::SubqueryAlias(s) => {
                    nodes.push(at);
                    at = &s.input;
                }
                LogicalPlan::Sort(s) => {
                    nodes.push(at);
                    at = &s.input;
                }
                _ => return (nodes, at),
            }
        }
    }

    /// Stages for `nodes` (top first), run bottom up, starting from `input`.
    fn stages(&self, nodes: &[&LogicalPlan], input: SchemaRef) -> Result<Stages, SqlError> {
        let mut stages = Stages::identity(input);
        for node in nodes.iter().rev() {
            if let Some(stage) = self.stage(node)? {
                stages.push(stage, Arc::new(node.schema().as_arrow().clone()));
            }
        }
        Ok(stages)
    }

    /// The scan at the bottom: its stages (window columns) and window.
    fn scan(&self, node: &LogicalPlan) -> Result<(Stages, Option<&WindowedTable>), SqlError> {
        let LogicalPlan::TableScan(scan) = node else {
            return Err(refuse(node));
        };
        if scan.projection.is_some() || !scan.filters.is_empty() || scan.fetch.is_some() {
            return Err(SqlError::new(
                "internal: an optimised table scan reached the streaming planner",
            ));
        }
        let name = scan.table_name.table();
        match self.windowed.iter().find(|(w, _, _)| w.name == name) {
            Some((w, time, schema)) => {
                let base = Arc::new(Schema::new(
                    schema.fields()[..schema.fields().len() - 3].to_vec(),
                ));
                let mut stages = Stages::identity(base);
                stages.push(
                    Stage::Window {
                        time: *time,
                        kind: w.kind,
                        panes: false,
                        schema: schema.clone(),
                    },
                    schema.clone(),
                );
                Ok((stages, Some(w)))
            }
            None => Ok((
                Stages::identity(Arc::new(scan.projected_schema.as_arrow().clone())),
                None,
            )),
        }
    }

    fn lower(&self, plan: &LogicalPlan, table: String) -> Result<PlannedQuery, SqlError> {
        let (top, core) = self.chain(plan);
        match core {
            LogicalPlan::Aggregate(agg) => self.windowed(&top, agg, table),
            LogicalPlan::Join(join) => self.join(&top, join),
            LogicalPlan::TableScan(_) => {
                if let Some(sort) = top.iter().find(|n| matches!(n, LogicalPlan::Sort(_))) {
                    return Err(refuse(sort));
                }
                let (scan, window) = self.scan(core)?;
                if let Some(w) = window {
                    if matches!(w.kind, WindowKind::Session { .. }) {
                        return Err(SqlError::at(
                            "a SESSION window needs GROUP BY: sessions exist only once rows are grouped",
                            w.span,
                        )
                        .hint("GROUP BY window_start, window_end, <key>"));
                    }
                }
                let mut stages = scan;
                let rest = self.stages(&top, stages.output_schema())?;
                append(&mut stages, rest);
                if self.options.lateness_ms > 0 {
                    return Err(SqlError::new(
                        "allowed_lateness applies to windowed aggregates; this query has none",
                    ));
                }
                Ok(PlannedQuery::Stateless { table, stages })
            }
            other => Err(refuse(other)),
        }
    }

    fn windowed(
        &self,
        top: &[&LogicalPlan],
        agg: &datafusion::logical_expr::Aggregate,
        table: String,
    ) -> Result<PlannedQuery, SqlError> {
        let (below, scan_node) = self.chain(&agg.input);
        if let Some(LogicalPlan::Sort(_)) = below.iter().find(|n| matches!(n, LogicalPlan::Sort(_)))
        {
            return Err(SqlError::unbounded(
                "ORDER BY in a subquery",
                "a stream has no end to sort by",
                "sort the windowed result instead",
                None,
            ));
        }
        let (scan_stages, window) = self.scan(scan_node)?;
        let Some(window) = window else {
            return Err(SqlError::unbounded(
                "GROUP BY without a window",
                "an aggregate over an unbounded stream never has a final answer",
                "group by a window: GROUP BY TUMBLE(ts, INTERVAL '1' MINUTE), key — or FROM TABLE(TUMBLE(TABLE t, DESCRIPTOR(ts), INTERVAL '1' MINUTE)) GROUP BY window_start, window_end, key",
                None,
            ));
        };
        let session = matches!(window.kind, WindowKind::Session { .. });
        if session
            && below
                .iter()
                .any(|n| matches!(n, LogicalPlan::Projection(_)))
        {
            return Err(SqlError::at(
                "a SESSION window's rows must reach GROUP BY unchanged (a WHERE is fine, a subquery that computes columns is not)",
                window.span,
            )
            .hint("compute columns in an earlier SQL step"));
        }
        let input_df = agg.input.schema().as_ref().clone();
        let find = |name: &str| -> Option<usize> {
            input_df
                .fields()
                .iter()
                .position(|f| f.name().eq_ignore_ascii_case(name))
        };
        // Group columns: the window's, or keys (plain or computed).
        let mut group = Vec::new();
        let mut needed: Vec<usize> = Vec::new();
        let mut key_sources: Vec<KeySource> = Vec::new();
        let mut key_labels: Vec<String> = Vec::new();
        let mut has_window = false;
        for g in &agg.group_expr {
            if let LExpr::GroupingSet(_) = g {
                return Err(SqlError::new(
                    "GROUPING SETS, ROLLUP and CUBE are not supported on streams",
                )
                .hint("one step per grouping"));
            }
            let window_column = match g {
                LExpr::Column(c) => match c.name.as_str() {
                    "window_start" => Some(GroupColumn::WindowStart),
                    "window_end" => Some(GroupColumn::WindowEnd),
                    "window_time" => Some(GroupColumn::WindowTime),
                    _ => None,
                },
                _ => None,
            };
            if let Some(w) = window_column {
                has_window = true;
                group.push(w);
                continue;
            }
            if window_columns_in(g) {
                return Err(SqlError::new(format!(
                    "GROUP BY {g}: a window column can be grouped by only as itself"
                ))
                .hint("GROUP BY window_start, window_end, ..."));
            }
            let k = key_sources.len();
            key_labels.push(match g {
                LExpr::Column(c) => c.name.clone(),
                other => other.human_display().to_string(),
            });
            // Dictionary-encoded keys (as sources hand strings over) are
            // grouped by value: hashing and comparing plain strings column
            // by column is about three times faster than DataFusion's row
            // format, which dictionaries would otherwise need.
            let g = &match g {
                LExpr::Column(_) => match g.get_type(&input_df).map_err(plan_error)? {
                    DataType::Dictionary(_, value) => LExpr::Cast(
                        datafusion::logical_expr::Cast::new(Box::new(g.clone()), *value),
                    ),
                    _ => g.clone(),
                },
                other => other.clone(),
            };
            match g {
                LExpr::Column(c) => {
                    let i = input_df.index_of_column(c).map_err(plan_error)?;
                    key_sources.push(KeySource::Column(i));
                    if !needed.contains(&i) {
                        needed.push(i);
                    }
                }
                other => key_sources.push(KeySource::Computed(other.clone())),
            }
            group.push(GroupColumn::Key(k));
        }
        if !has_window {
            return Err(SqlError::at(
                "the query windows its table but does not GROUP BY the window",
                window.span,
            )
            .hint("GROUP BY window_start, window_end, <keys>"));
        }
        let anchor = if session {
            window.time_column.clone()
        } else {
            "window_start".to_string()
        };
        let anchor_index = find(&anchor).ok_or_else(|| {
            SqlError::at(
                format!("column {anchor:?} does not reach the aggregate"),
                window.span,
            )
            .hint(format!("keep {anchor} in the subquery's SELECT list"))
        })?;
        if !needed.contains(&anchor_index) {
            needed.push(anchor_index);
        }
        for a in &agg.aggr_expr {
            for c in a.column_refs() {
                if WINDOW_COLUMNS.contains(&c.name.as_str()) && session {
                    return Err(SqlError::new(format!(
                        "{a}: a session's bounds are known only when it closes"
                    )));
                }
                let i = input_df.index_of_column(c).map_err(plan_error)?;
                if !needed.contains(&i) {
                    needed.push(i);
                }
            }
        }
        // Every column reaches the aggregate, so a late row goes to the late
        // output whole, as the query's FROM and WHERE produced it.
        needed = (0..input_df.fields().len()).collect();
        // The aggregate's input: needed columns, then computed keys.
        let mut fields: Vec<(Option<TableReference>, Arc<Field>)> = needed
            .iter()
            .map(|&i| {
                let (q, f) = input_df.qualified_field(i);
                (q.cloned(), f.clone())
            })
            .collect();
        let mut prepare_exprs: Vec<Arc<dyn PhysicalExpr>> = Vec::new();
        for &i in &needed {
            let (q, f) = input_df.qualified_field(i);
            let col = LExpr::Column(Column::new(q.cloned(), f.name()));
            prepare_exprs.push(self.physical(&col, &input_df)?);
        }
        let mut key_columns = Vec::new();
        for (k, source) in key_sources.iter().enumerate() {
            match source {
                KeySource::Column(i) => key_columns.push(
                    needed
                        .iter()
                        .position(|n| n == i)
                        .ok_or_else(|| SqlError::new("internal: key column lost"))?,
                ),
                KeySource::Computed(e) => {
                    let (_, field) = e.to_field(&input_df).map_err(plan_error)?;
                    let name = format!("__vigil_key_{k}");
                    fields.push((
                        None,
                        Arc::new(Field::new(
                            &name,
                            field.data_type().clone(),
                            field.is_nullable(),
                        )),
                    ));
                    prepare_exprs.push(self.physical(e, &input_df)?);
                    key_columns.push(fields.len() - 1);
                }
            }
        }
        let reduced_df =
            DFSchema::new_with_metadata(fields, Default::default()).map_err(plan_error)?;
        let reduced: SchemaRef = Arc::new(reduced_df.as_arrow().clone());
        // Computed keys are referenced by the aggregate under their new names.
        // A hopping window whose rows reach the aggregate as they are (no
        // subquery computing from window columns) is aggregated by pane:
        // each row once, windows merged from panes as they close.
        let panes = matches!(window.kind, WindowKind::Hop { .. })
            && self.options.lateness_ms == 0
            && below.iter().all(|n| match n {
                LogicalPlan::Filter(f) => !window_columns_in(&f.predicate),
                LogicalPlan::SubqueryAlias(_) => true,
                _ => false,
            });
        let mut prepare = scan_stages;
        if panes {
            prepare.use_panes();
        }
        let rest = self.stages(&below, prepare.output_schema())?;
        append(&mut prepare, rest);
        prepare.push(
            Stage::Project {
                exprs: prepare_exprs,
                schema: reduced.clone(),
            },
            reduced.clone(),
        );
        let aggregates = agg
            .aggr_expr
            .iter()
            .map(|e| {
                let e = &undictionary_arguments(e, &reduced_df)?;
                let lowered = LoweredAggregateBuilder::new(
                    e,
                    &reduced_df,
                    &reduced,
                    self.state.execution_props(),
                    &PhysicalPlanningContext::default(),
                )
                .build()
                .map_err(plan_error)?;
                // Accumulators are made here once, so an aggregate that cannot
                // take its argument's type fails now, not when data arrives.
                let call = AggregateCall {
                    expr: lowered.aggregate,
                    filter: lowered.filter,
                };
                call.accumulator()
                    .and_then(|_| call.groups_accumulator())
                    .map_err(|err| {
                        SqlError::new(format!(
                            "{}: {}",
                            e.human_display(),
                            SqlError::from_datafusion(err).message
                        ))
                    })?;
                Ok(call)
            })
            .collect::<Result<Vec<_>, SqlError>>()?;
        let state_widths = aggregates
            .iter()
            .map(|c| c.expr.state_fields().map(|f| f.len()))
            .collect::<datafusion::error::Result<Vec<_>>>()
            .map_err(plan_error)?;
        let aggregate_schema: SchemaRef = Arc::new(agg.schema.as_arrow().clone());
        let post = self.stages(top, aggregate_schema.clone())?;
        if self.options.lateness_ms > 0 && post.filters() {
            return Err(SqlError::new(
                "HAVING (or a filter on aggregated values) cannot be combined with allowed_lateness yet: a late row could withdraw a result already emitted",
            )
            .hint("filter in a following step, or set allowed_lateness: 0s"));
        }
        let anchor_in_reduced = needed
            .iter()
            .position(|&n| n == anchor_index)
            .ok_or_else(|| SqlError::new("internal: window column lost"))?;
        let spec = WindowAggregateSpec {
            name: self.options.name.clone(),
            sql: self.sql.to_string(),
            kind: window.kind,
            input: reduced,
            window_start_column: (!session).then_some(anchor_in_reduced),
            panes,
            time_column: anchor_in_reduced,
            key_columns,
            key_labels,
            group,
            aggregates,
            state_widths,
            aggregate_schema,
            post,
            lateness_ms: self.options.lateness_ms,
        };
        Ok(PlannedQuery::Windowed {
            table,
            prepare,
            aggregate: Box::new(spec),
        })
    }
}

/// Aggregate arguments of dictionary type are read as their values: several
/// of DataFusion's aggregates (approx_distinct, percentiles) accept only
/// plain types, and sources hand strings over dictionary-encoded.
fn undictionary_arguments(e: &LExpr, schema: &DFSchema) -> Result<LExpr, SqlError> {
    use datafusion::common::tree_node::{Transformed, TreeNode};
    use datafusion::logical_expr::{expr::AggregateFunction, Cast};
    e.clone()
        .transform_up(|node| {
            let LExpr::AggregateFunction(mut f) = node else {
                return Ok(Transformed::no(node));
            };
            let mut changed = false;
            for arg in f.params.args.iter_mut() {
                if let DataType::Dictionary(_, value) = arg.get_type(schema)? {
                    *arg = LExpr::Cast(Cast::new(Box::new(arg.clone()), *value));
                    changed = true;
                }
            }
            let node = LExpr::AggregateFunction(AggregateFunction { ..f });
            Ok(if changed {
                Transformed::yes(node)
            } else {
                Transformed::no(node)
            })
        })
        .map(|t| t.data)
        .map_err(plan_error)
}

enum KeySource {
    Column(usize),
    Computed(LExpr),
}

fn window_columns_in(e: &LExpr) -> bool {
    e.column_refs()
        .iter()
        .any(|c| WINDOW_COLUMNS.contains(&c.name.as_str()))
}

fn append(stages: &mut Stages, rest: Stages) {
    for (stage, schema) in rest.into_parts() {
        stages.push(stage, schema);
    }
}
