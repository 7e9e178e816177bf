//! Window syntax, turned into something DataFusion plans.
//!
//! Two ways of writing a window are accepted, both Flink's:
//!
//! ```sql
//! -- group window
//! SELECT window_start, user, count(*) FROM auth
//! GROUP BY TUMBLE(ts, INTERVAL '1' MINUTE), user
//! -- window table-valued function
//! SELECT window_start, window_end, user, count(*)
//! FROM TABLE(TUMBLE(TABLE auth, DESCRIPTOR(ts), INTERVAL '1' MINUTES))
//! GROUP BY window_start, window_end, user
//! ```
//!
//! Both become the second form's shape: the windowed relation is replaced by
//! a table of its own (`__vigil_window_0`, aliased as the original table so
//! qualified names keep working) whose rows are the input's plus
//! `window_start`, `window_end` and `window_time`, and a group window in
//! `GROUP BY` becomes `window_start, window_end`. DataFusion then plans an
//! ordinary aggregate grouped by those columns, and the planner knows from
//! the table which window fills them.
//!
//! sqlparser cannot parse `TABLE auth` as a function argument, so before
//! parsing that keyword (and a session's `PARTITION BY`) is blanked out with
//! spaces, found with sqlparser's own tokenizer; blanking keeps every other
//! token where it was, so error positions still point into the text as
//! written.

use std::ops::ControlFlow;

use datafusion::common::DFSchema;
use datafusion::prelude::SessionContext;
use datafusion::scalar::ScalarValue;
use datafusion::sql::sqlparser::ast::{
    Expr, Function, FunctionArg, FunctionArgExpr, FunctionArguments, GroupByExpr, Ident,
    ObjectName, Select, SelectItem, Spanned, Statement, TableAlias, TableFactor, VisitMut,
    VisitorMut,
};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::keywords::Keyword;
use datafusion::sql::sqlparser::tokenizer::{Span, Token, Tokenizer};

use super::error::SqlError;
use crate::window::WindowKind;

/// The columns a window adds to its rows.
pub const WINDOW_COLUMNS: [&str; 3] = ["window_start", "window_end", "window_time"];

/// A windowed relation found in the query.
#[derive(Debug, Clone)]
pub struct WindowedTable {
    /// Name of the table standing for it in the rewritten query.
    pub name: String,
    /// The table it windows.
    pub base: String,
    /// The event-time column.
    pub time_column: String,
    /// The window.
    pub kind: WindowKind,
    /// Where it is, for errors.
    pub span: Span,
}

/// Blanks `TABLE` inside window table functions, and notes each session's
/// `PARTITION BY` columns (blanked too).
pub fn blank_table_keywords(sql: &str) -> Result<(String, Vec<Vec<String>>), SqlError> {
    let tokens = Tokenizer::new(&GenericDialect {}, sql)
        .tokenize_with_location()
        .map_err(|e| {
            SqlError::new(e.message.clone()).hint("check quotes and parentheses near there")
        })?;
    let significant: Vec<_> = tokens
        .iter()
        .filter(|t| !matches!(t.token, Token::Whitespace(_)))
        .collect();
    let is_word = |i: usize, w: &str| {
        significant
            .get(i)
            .is_some_and(|t| matches!(&t.token, Token::Word(x) if x.value.eq_ignore_ascii_case(w)))
    };
    let is = |i: usize, tok: &Token| significant.get(i).is_some_and(|t| &t.token == tok);
    let mut blanks: Vec<Span> = Vec::new();
    let mut partitions = Vec::new();
    for i in 0..significant.len() {
        let window_fn = ["TUMBLE", "HOP", "SESSION", "CUMULATE"]
            .iter()
            .any(|w| is_word(i + 2, w));
        if !(is_word(i, "TABLE")
            && is(i + 1, &Token::LParen)
            && window_fn
            && is(i + 3, &Token::LParen))
        {
            continue;
        }
        // TABLE ( TUMBLE ( [DATA =>] TABLE name [PARTITION BY ...] , ...
        let mut j = i + 4;
        if matches!(&significant.get(j).map(|t| &t.token), Some(Token::Word(w)) if w.keyword != Keyword::TABLE)
            && is(j + 1, &Token::RArrow)
        {
            j += 2;
        }
        if !is_word(j, "TABLE") {
            continue;
        }
        blanks.push(significant[j].span);
        // The table name: one or more dotted words.
        let mut k = j + 1;
        while matches!(significant.get(k).map(|t| &t.token), Some(Token::Word(_))) {
            if is(k + 1, &Token::Period) {
                k += 2;
            } else {
                k += 1;
                break;
            }
        }
        let mut keys = Vec::new();
        if is_word(k, "PARTITION") && is_word(k + 1, "BY") {
            let from = significant[k].span;
            let mut m = k + 2;
            let mut last = significant[k + 1].span;
            let parens = is(m, &Token::LParen);
            if parens {
                m += 1;
            }
            while let Some(t) = significant.get(m) {
                match &t.token {
                    Token::Word(w) => keys.push(w.value.clone()),
                    Token::Comma if parens => {}
                    Token::RParen if parens => {
                        last = t.span;
                        break;
                    }
                    _ => break,
                }
                last = t.span;
                m += 1;
                if !parens {
                    break;
                }
            }
            blanks.push(Span::new(from.start, last.end));
        }
        partitions.push(keys);
    }
    Ok((blank(sql, &blanks), partitions))
}

/// Replaces the text of each span by spaces (newlines are kept).
fn blank(sql: &str, spans: &[Span]) -> String {
    if spans.is_empty() {
        return sql.to_string();
    }
    let mut out = String::with_capacity(sql.len());
    let (mut line, mut col) = (1u64, 1u64);
    for c in sql.chars() {
        let inside = spans.iter().any(|s| {
            let after_start = (line, col) >= (s.start.line, s.start.column);
            let before_end = (line, col) < (s.end.line, s.end.column);
            after_start && before_end
        });
        if inside && c != '\n' {
            out.push(' ');
        } else {
            out.push(c);
        }
        if c == '\n' {
            line += 1;
            col = 1;
        } else {
            col += 1;
        }
    }
    out
}

/// Rewrites the windows of `statement`; returns the windowed tables.
pub fn rewrite_windows(
    statement: &mut Statement,
    partitions: Vec<Vec<String>>,
) -> Result<Vec<WindowedTable>, SqlError> {
    let mut v = Rewriter {
        windows: Vec::new(),
        partitions: partitions.into_iter(),
        error: None,
    };
    let _ = statement.visit(&mut v);
    if let Some(e) = v.error {
        return Err(e);
    }
    // A window function left anywhere else is misplaced.
    let mut stray = Stray(None);
    let _ = statement.visit(&mut stray);
    if let Some(e) = stray.0 {
        return Err(e);
    }
    Ok(v.windows)
}

struct Rewriter {
    windows: Vec<WindowedTable>,
    partitions: std::vec::IntoIter<Vec<String>>,
    error: Option<SqlError>,
}

fn window_name(f: &Function) -> Option<String> {
    let name = f.name.to_string().to_ascii_uppercase();
    matches!(name.as_str(), "TUMBLE" | "HOP" | "SESSION" | "CUMULATE").then_some(name)
}

fn table_factor(name: &str, alias: Option<TableAlias>) -> TableFactor {
    TableFactor::Table {
        name: ObjectName::from(vec![Ident::new(name)]),
        alias,
        args: None,
        with_hints: Vec::new(),
        version: None,
        with_ordinality: false,
        partitions: Vec::new(),
        json_path: None,
        sample: None,
        index_hints: Vec::new(),
    }
}

fn alias_as(name: &str) -> TableAlias {
    TableAlias {
        explicit: true,
        name: Ident::new(name),
        columns: Vec::new(),
        at: None,
    }
}

impl Rewriter {
    fn fail(&mut self, e: SqlError) -> ControlFlow<()> {
        self.error.get_or_insert(e);
        ControlFlow::Break(())
    }

    fn add(&mut self, base: String, time_column: String, kind: WindowKind, span: Span) -> String {
        let name = format!("__vigil_window_{}", self.windows.len());
        self.windows.push(WindowedTable {
            name: name.clone(),
            base,
            time_column,
            kind,
            span,
        });
        name
    }

    /// `GROUP BY TUMBLE(ts, INTERVAL …), …` over `FROM t`.
    fn group_window(&mut self, select: &mut Select) -> Result<(), SqlError> {
        let GroupByExpr::Expressions(exprs, _) = &mut select.group_by else {
            return Ok(());
        };
        let mut found = None;
        for (i, e) in exprs.iter().enumerate() {
            if let Expr::Function(f) = e {
                if let Some(kind) = window_name(f) {
                    if found.is_some() {
                        return Err(SqlError::at(
                            "a query can group by only one window",
                            f.span(),
                        ));
                    }
                    found = Some((i, kind, f.clone()));
                }
            }
        }
        let Some((i, kind_name, f)) = found else {
            return Ok(());
        };
        let args = positional(&f)?;
        let (time, kind) = match (kind_name.as_str(), args.as_slice()) {
            ("TUMBLE", [ts, size]) => (
                column_name(ts)?,
                WindowKind::Tumble {
                    size_ms: interval_ms(size)?,
                },
            ),
            ("HOP", [ts, slide, size]) => (
                column_name(ts)?,
                hop(interval_ms(slide)?, interval_ms(size)?, f.span())?,
            ),
            ("SESSION", [ts, gap]) => (
                column_name(ts)?,
                WindowKind::Session {
                    gap_ms: interval_ms(gap)?,
                },
            ),
            (k, _) => {
                return Err(
                    SqlError::at(format!("wrong arguments for group window {k}"), f.span())
                        .hint(group_window_usage()),
                )
            }
        };
        exprs.splice(
            i..=i,
            [
                Expr::Identifier(Ident::new("window_start")),
                Expr::Identifier(Ident::new("window_end")),
            ],
        );
        let [from] = select.from.as_mut_slice() else {
            return Err(SqlError::at(
                "a group window needs exactly one table in FROM",
                f.span(),
            ));
        };
        if !from.joins.is_empty() {
            return Err(SqlError::unbounded(
                "JOIN",
                "an unbounded join keeps every row of both streams",
                "interval joins (a.ts BETWEEN b.ts - INTERVAL … AND …) come with correlation; aggregate one stream here",
                Some(from.joins[0].relation.span()),
            ));
        }
        let TableFactor::Table {
            name,
            alias,
            args: None,
            ..
        } = &from.relation
        else {
            return Err(SqlError::at(
                "a group window needs a table in FROM, not a subquery or function",
                from.relation.span(),
            )
            .hint("use the window table function: FROM TABLE(TUMBLE(TABLE t, DESCRIPTOR(ts), INTERVAL '1' MINUTE))"));
        };
        let base = name.to_string();
        let alias = alias
            .clone()
            .unwrap_or_else(|| alias_as(&base_alias(&base)));
        let table = self.add(base, time, kind, f.span());
        from.relation = table_factor(&table, Some(alias));
        Ok(())
    }

    /// `FROM TABLE(TUMBLE(TABLE t, DESCRIPTOR(ts), INTERVAL …))`.
    fn table_function(&mut self, factor: &mut TableFactor) -> Result<(), SqlError> {
        let TableFactor::TableFunction { expr, alias } = factor else {
            return Ok(());
        };
        let Expr::Function(f) = expr else {
            return Ok(());
        };
        let Some(kind_name) = window_name(f) else {
            return Ok(());
        };
        let span = f.span();
        let partition = self.partitions.next().unwrap_or_default();
        let args = tvf_arguments(f, &kind_name)?;
        let base = match &args.data {
            Expr::Identifier(i) => i.value.clone(),
            Expr::CompoundIdentifier(parts) => parts
                .iter()
                .map(|p| p.value.clone())
                .collect::<Vec<_>>()
                .join("."),
            other => {
                return Err(SqlError::at(
                    "the first argument of a window function is TABLE <name>",
                    other.span(),
                ))
            }
        };
        let time = match &args.timecol {
            Expr::Function(d) if d.name.to_string().eq_ignore_ascii_case("DESCRIPTOR") => {
                let inner = positional(d)?;
                match inner.as_slice() {
                    [one] => column_name(one)?,
                    _ => return Err(SqlError::at("DESCRIPTOR names one time column", d.span())),
                }
            }
            other => {
                return Err(SqlError::at(
                    "the time column of a window function is DESCRIPTOR(<column>)",
                    other.span(),
                ))
            }
        };
        let kind = match kind_name.as_str() {
            "TUMBLE" => WindowKind::Tumble {
                size_ms: interval_ms(&args.sizes[0])?,
            },
            "HOP" => hop(
                interval_ms(&args.sizes[0])?,
                interval_ms(&args.sizes[1])?,
                span,
            )?,
            "SESSION" => WindowKind::Session {
                gap_ms: interval_ms(&args.sizes[0])?,
            },
            _ => {
                return Err(SqlError::at("CUMULATE windows are not supported", span)
                    .hint("use HOP for overlapping windows"))
            }
        };
        if !partition.is_empty() && !matches!(kind, WindowKind::Session { .. }) {
            return Err(SqlError::at(
                "PARTITION BY belongs to SESSION windows",
                span,
            ));
        }
        let alias = alias
            .clone()
            .unwrap_or_else(|| alias_as(&base_alias(&base)));
        let table = self.add(base, time, kind, span);
        *factor = table_factor(&table, Some(alias));
        Ok(())
    }
}

/// An alias for a (possibly dotted) table name: its last part.
fn base_alias(base: &str) -> String {
    base.rsplit('.').next().unwrap_or(base).to_string()
}

fn group_window_usage() -> &'static str {
    "TUMBLE(ts, size), HOP(ts, slide, size) or SESSION(ts, gap), with sizes as INTERVAL '1' MINUTE"
}

fn hop(slide: i64, size: i64, span: Span) -> Result<WindowKind, SqlError> {
    if slide > size {
        return Err(SqlError::at(
            "a hopping window's slide is longer than its size: rows between windows would be lost",
            span,
        )
        .hint("HOP(ts, slide, size) with slide <= size; for gaps use TUMBLE"));
    }
    if size / slide > 1000 {
        return Err(SqlError::at(
            format!(
                "a hopping window of this size puts every row in {} windows",
                size / slide
            ),
            span,
        )
        .hint("keep size / slide at most 1000"));
    }
    Ok(WindowKind::Hop {
        size_ms: size,
        slide_ms: slide,
    })
}

struct TvfArguments {
    data: Expr,
    timecol: Expr,
    sizes: Vec<Expr>,
}

fn tvf_arguments(f: &Function, kind: &str) -> Result<TvfArguments, SqlError> {
    let FunctionArguments::List(list) = &f.args else {
        return Err(SqlError::at(format!("{kind} needs arguments"), f.span()));
    };
    let size_names: &[&str] = match kind {
        "HOP" => &["SLIDE", "SIZE"],
        "SESSION" => &["GAP"],
        _ => &["SIZE"],
    };
    let mut named: Vec<(String, Expr)> = Vec::new();
    let mut unnamed: Vec<Expr> = Vec::new();
    for a in &list.args {
        match a {
            FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => unnamed.push(e.clone()),
            FunctionArg::Named {
                name,
                arg: FunctionArgExpr::Expr(e),
                ..
            } => named.push((name.value.to_ascii_uppercase(), e.clone())),
            _ => {
                return Err(
                    SqlError::at(format!("unexpected argument of {kind}"), f.span())
                        .hint(tvf_usage(kind)),
                )
            }
        }
    }
    let mut slots: Vec<&str> = vec!["DATA", "TIMECOL"];
    slots.extend(size_names);
    let mut values: Vec<Option<Expr>> = vec![None; slots.len()];
    for (i, e) in unnamed.into_iter().enumerate() {
        match values.get_mut(i) {
            Some(v) => *v = Some(e),
            None => {
                return Err(
                    SqlError::at(format!("too many arguments for {kind}"), f.span())
                        .hint(tvf_usage(kind)),
                )
            }
        }
    }
    for (name, e) in named {
        match slots.iter().position(|s| *s == name) {
            Some(i) => values[i] = Some(e),
            None => {
                return Err(
                    SqlError::at(format!("{kind} has no argument {name}"), f.span())
                        .hint(tvf_usage(kind)),
                )
            }
        }
    }
    let mut values = values.into_iter();
    let mut next = |what: &str| {
        values.next().flatten().ok_or_else(|| {
            SqlError::at(format!("{kind} is missing its {what} argument"), f.span())
                .hint(tvf_usage(kind))
        })
    };
    let data = next("table")?;
    let timecol = next("time column")?;
    let sizes = size_names
        .iter()
        .map(|s| next(&s.to_ascii_lowercase()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(TvfArguments {
        data,
        timecol,
        sizes,
    })
}

fn tvf_usage(kind: &str) -> String {
    match kind {
        "HOP" => "HOP(TABLE t, DESCRIPTOR(ts), slide, size)".into(),
        "SESSION" => "SESSION(TABLE t [PARTITION BY key], DESCRIPTOR(ts), gap)".into(),
        _ => "TUMBLE(TABLE t, DESCRIPTOR(ts), size)".into(),
    }
}

fn positional(f: &Function) -> Result<Vec<Expr>, SqlError> {
    let FunctionArguments::List(list) = &f.args else {
        return Ok(Vec::new());
    };
    list.args
        .iter()
        .map(|a| match a {
            FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => Ok(e.clone()),
            _ => Err(SqlError::at(
                format!("unexpected argument of {}", f.name),
                f.span(),
            )),
        })
        .collect()
}

fn column_name(e: &Expr) -> Result<String, SqlError> {
    match e {
        Expr::Identifier(i) => Ok(i.value.clone()),
        Expr::CompoundIdentifier(parts) => {
            Ok(parts.last().map(|p| p.value.clone()).unwrap_or_default())
        }
        other => Err(SqlError::at(
            "the window's time must be a column of the table",
            other.span(),
        )),
    }
}

/// The length of an `INTERVAL` literal in milliseconds, as DataFusion reads it.
pub fn interval_ms(e: &Expr) -> Result<i64, SqlError> {
    let ctx = SessionContext::new();
    let logical = ctx
        .parse_sql_expr(&e.to_string(), &DFSchema::empty())
        .map_err(|err| {
            SqlError::at(
                format!("invalid interval: {}", err.strip_backtrace()),
                e.span(),
            )
        })?;
    let value = match logical {
        datafusion::logical_expr::Expr::Literal(v, _) => v,
        _ => {
            return Err(
                SqlError::at("a window size must be an INTERVAL literal", e.span())
                    .hint("e.g. INTERVAL '1' MINUTE or INTERVAL '30 seconds'"),
            )
        }
    };
    let ms = match value {
        ScalarValue::IntervalMonthDayNano(Some(v)) if v.months == 0 => {
            v.days as i64 * 86_400_000 + v.nanoseconds / 1_000_000
        }
        ScalarValue::IntervalDayTime(Some(v)) => v.days as i64 * 86_400_000 + v.milliseconds as i64,
        ScalarValue::IntervalMonthDayNano(Some(_)) | ScalarValue::IntervalYearMonth(Some(_)) => {
            return Err(SqlError::at(
                "a window cannot be measured in months or years: their length varies",
                e.span(),
            )
            .hint("use days, e.g. INTERVAL '30' DAY"))
        }
        _ => {
            return Err(
                SqlError::at("a window size must be an INTERVAL literal", e.span())
                    .hint("e.g. INTERVAL '1' MINUTE or INTERVAL '30 seconds'"),
            )
        }
    };
    if ms <= 0 {
        return Err(SqlError::at(
            "a window size must be at least 1 millisecond",
            e.span(),
        ));
    }
    Ok(ms)
}

impl VisitorMut for Rewriter {
    type Break = ();

    fn pre_visit_select(&mut self, select: &mut Select) -> ControlFlow<()> {
        if let Err(e) = self.group_window(select) {
            return self.fail(e);
        }
        // Flink's auxiliary group-window functions.
        let aux = |e: &mut Expr| {
            if let Expr::Function(f) = e {
                let name = f.name.to_string().to_ascii_uppercase();
                let column = match name.as_str() {
                    "TUMBLE_START" | "HOP_START" | "SESSION_START" => Some("window_start"),
                    "TUMBLE_END" | "HOP_END" | "SESSION_END" => Some("window_end"),
                    "TUMBLE_ROWTIME" | "HOP_ROWTIME" | "SESSION_ROWTIME" => Some("window_time"),
                    _ => None,
                };
                if let Some(c) = column {
                    *e = Expr::Identifier(Ident::new(c));
                }
            }
        };
        for item in select.projection.iter_mut() {
            match item {
                // TUMBLE_START(...) becomes window_start, named so.
                SelectItem::UnnamedExpr(e) => aux(e),
                SelectItem::ExprWithAlias { expr, .. } => aux(expr),
                _ => {}
            }
        }
        if let Some(h) = select.having.as_mut() {
            let _ = datafusion::sql::sqlparser::ast::visit_expressions_mut(h, |e| {
                aux(e);
                ControlFlow::<()>::Continue(())
            });
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, factor: &mut TableFactor) -> ControlFlow<()> {
        if let Err(e) = self.table_function(factor) {
            return self.fail(e);
        }
        ControlFlow::Continue(())
    }
}

struct Stray(Option<SqlError>);

impl VisitorMut for Stray {
    type Break = ();
    fn pre_visit_expr(&mut self, e: &mut Expr) -> ControlFlow<()> {
        if let Expr::Function(f) = e {
            if let Some(kind) = window_name(f) {
                self.0 = Some(
                    SqlError::at(format!("{kind}(...) is a window, not a value"), f.span()).hint(
                        format!(
                            "group by it (GROUP BY {kind}(ts, …), key) or window a table (FROM TABLE({kind}(TABLE t, DESCRIPTOR(ts), …))), then select window_start / window_end"
                        ),
                    ),
                );
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    }
}
