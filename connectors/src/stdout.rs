//! The stdout sink: a readable table or JSON lines, for people and for pipes.

use std::io::{IsTerminal, Write};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use arrow::util::pretty::pretty_format_batches;
use arrow_json::LineDelimitedWriter;
use async_trait::async_trait;
use serde::Deserialize;
use vigil_engine::{EngineError, Sink, SinkFactory, TaskContext};

/// How rows are printed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StdoutFormat {
    /// An aligned table per batch.
    #[default]
    Table,
    /// One JSON object per line.
    Json,
}

/// Prints rows on standard output.
///
/// ```yaml
/// type: stdout
/// input: alerts
/// format: table   # or json
/// ```
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StdoutSinkConfig {
    /// `table` (default) or `json`.
    #[serde(default)]
    pub format: StdoutFormat,
}

/// Builds the (single) stdout subtask.
#[derive(Debug)]
pub struct StdoutSinkFactory {
    format: StdoutFormat,
}

impl StdoutSinkFactory {
    /// A stdout sink.
    pub fn new(config: &StdoutSinkConfig) -> Self {
        Self {
            format: config.format,
        }
    }
}

impl SinkFactory for StdoutSinkFactory {
    fn create(
        &self,
        _ctx: &TaskContext,
        _schema: SchemaRef,
    ) -> vigil_engine::Result<Box<dyn Sink>> {
        Ok(Box::new(StdoutSink {
            format: self.format,
        }))
    }
    fn max_parallelism(&self) -> Option<usize> {
        Some(1)
    }
    fn describe(&self) -> String {
        format!("stdout {:?}", self.format).to_lowercase()
    }
}

struct StdoutSink {
    format: StdoutFormat,
}

fn stdout_error(e: std::io::Error) -> EngineError {
    EngineError::io("cannot write to stdout", e)
}

#[async_trait]
impl Sink for StdoutSink {
    async fn write(&mut self, batch: RecordBatch) -> vigil_engine::Result<()> {
        let mut out = std::io::stdout().lock();
        if out.is_terminal() {
            // Clear the live status line `vigil run` may have drawn on this terminal.
            write!(out, "\r\x1b[2K").map_err(stdout_error)?;
        }
        match self.format {
            StdoutFormat::Table => {
                let table = pretty_format_batches(&[batch])?;
                writeln!(out, "{table}").map_err(stdout_error)?;
            }
            StdoutFormat::Json => {
                let mut w = LineDelimitedWriter::new(&mut out);
                w.write(&batch)?;
                w.finish()?;
            }
        }
        out.flush().map_err(stdout_error)
    }
}
