//! Errors in a query: what is wrong, where in the query, and what to do.

use datafusion::error::DataFusionError;
use datafusion::sql::sqlparser::tokenizer::Span;

/// A query Vigil cannot run, with its position in the query text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", position(*.line, *.column))]
pub struct SqlError {
    /// What is wrong, lowercase, PostgreSQL style.
    pub message: String,
    /// Line in the query, from 1, when known.
    pub line: Option<u64>,
    /// Column in that line, from 1, when known.
    pub column: Option<u64>,
    /// What to do about it.
    pub hint: Option<String>,
}

fn position(line: Option<u64>, column: Option<u64>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!("line {l}, column {c}: "),
        (Some(l), None) => format!("line {l}: "),
        _ => String::new(),
    }
}

impl SqlError {
    /// An error at no particular place.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            line: None,
            column: None,
            hint: None,
        }
    }

    /// An error at `span` (ignored when empty).
    pub fn at(message: impl Into<String>, span: Span) -> Self {
        let mut e = Self::new(message);
        if span.start.line > 0 {
            e.line = Some(span.start.line);
            e.column = Some(span.start.column);
        }
        e
    }

    /// Adds a hint.
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// A construct that cannot run correctly on an unbounded stream.
    pub fn unbounded(construct: &str, why: &str, hint: &str, span: Option<Span>) -> Self {
        let message = format!("{construct} is not supported on a stream: {why}");
        match span {
            Some(s) => Self::at(message, s),
            None => Self::new(message),
        }
        .hint(hint)
    }

    /// Places an error that DataFusion gave no position at the first word
    /// of `sql` it names (`no field named usr`).
    pub fn locate_in(mut self, sql: &str) -> Self {
        if self.line.is_some() {
            return self;
        }
        let Some(name) = self.message.strip_prefix("no field named ") else {
            return self;
        };
        let name = name
            .trim_end_matches('.')
            .rsplit('.')
            .next()
            .unwrap_or(name)
            .trim_matches('"')
            .to_string();
        let tokens = datafusion::sql::sqlparser::tokenizer::Tokenizer::new(
            &datafusion::sql::sqlparser::dialect::GenericDialect {},
            sql,
        )
        .tokenize_with_location();
        if let Ok(tokens) = tokens {
            let found = tokens.iter().find(|t| {
                matches!(&t.token, datafusion::sql::sqlparser::tokenizer::Token::Word(w) if w.value.eq_ignore_ascii_case(&name))
            });
            if let Some(t) = found {
                self.line = Some(t.span.start.line);
                self.column = Some(t.span.start.column);
            }
        }
        self
    }

    /// The position as a prefix (`line 1, column 8: `), or nothing.
    pub fn position(&self) -> String {
        position(self.line, self.column)
    }

    /// Converts DataFusion's error, keeping its position and help.
    pub fn from_datafusion(e: DataFusionError) -> Self {
        let diagnostic = e.diagnostic().cloned();
        let text = e.strip_backtrace();
        let message = parser_position(&text)
            .map(|(m, _, _)| m)
            .unwrap_or_else(|| text.lines().next().unwrap_or_default().to_string());
        let message = tidy(&message);
        let (message, did_you_mean) = match message.split_once(". Did you mean ") {
            Some((m, d)) => (m.to_string(), Some(format!("did you mean {d}"))),
            None => (message.trim_end_matches('.').to_string(), None),
        };
        let mut err = SqlError::new(message);
        err.hint = did_you_mean;
        if let Some((_, line, column)) = parser_position(&text) {
            err.line = Some(line);
            err.column = Some(column);
        }
        if let Some(d) = diagnostic {
            if let Some(span) = d.span.filter(|s| s.start.line > 0) {
                err.line = Some(span.start.line);
                err.column = Some(span.start.column);
            }
            let helps: Vec<String> = d
                .helps
                .iter()
                .map(|h| h.message.clone())
                .chain(d.notes.iter().map(|n| n.message.clone()))
                .collect();
            if !helps.is_empty() {
                err.hint = Some(helps.join("; "));
            }
        }
        if err.hint.is_none() {
            if let Some((_, fields)) = text.split_once("Valid fields are ") {
                let fields = fields.trim_end_matches('.');
                err.hint = Some(format!("columns are: {fields}"));
            } else if text.contains("Did you mean") {
                if let Some((_, m)) = text.split_once("Did you mean") {
                    err.hint = Some(format!("did you mean{}", m.lines().next().unwrap_or("")));
                }
            }
        }
        err
    }
}

/// sqlparser writes `... at Line: 1, Column: 55`.
fn parser_position(text: &str) -> Option<(String, u64, u64)> {
    let (msg, pos) = text.rsplit_once(" at Line: ")?;
    let (line, column) = pos.split_once(", Column: ")?;
    let column: String = column.chars().take_while(|c| c.is_ascii_digit()).collect();
    Some((
        msg.to_string(),
        line.trim().parse().ok()?,
        column.parse().ok()?,
    ))
}

/// DataFusion's messages start with their own category; the first lowercase
/// sentence is what a query author needs.
fn tidy(message: &str) -> String {
    let mut m = message.trim();
    for prefix in [
        "SQL error: ",
        "Error during planning: ",
        "Schema error: ",
        "ParserError(\"",
        "sql parser error: ",
        "This feature is not implemented: ",
    ] {
        while let Some(rest) = m.strip_prefix(prefix) {
            m = rest.trim();
        }
    }
    let m = m.trim_end_matches("\")");
    let mut chars = m.chars();
    match chars.next() {
        Some(c) if c.is_uppercase() && chars.clone().next().is_some_and(|d| d.is_lowercase()) => {
            c.to_lowercase().collect::<String>() + chars.as_str()
        }
        _ => m.to_string(),
    }
}
