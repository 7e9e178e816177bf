//! The NDJSON file sink: one JSON object per line, flushed on every
//! checkpoint barrier and at the end.

use std::fs::{File, OpenOptions};
use std::io::BufWriter;
use std::path::PathBuf;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use arrow_json::LineDelimitedWriter;
use async_trait::async_trait;
use vigil_engine::{EngineError, Sink, SinkFactory, TaskContext};

use super::config::FileSinkConfig;

/// Builds the (single) subtask of a file sink.
#[derive(Debug)]
pub struct FileSinkFactory {
    path: PathBuf,
    append: bool,
}

impl FileSinkFactory {
    /// A sink writing to `config.path`.
    pub fn new(config: &FileSinkConfig) -> Self {
        Self {
            path: config.path.clone(),
            append: config.append,
        }
    }
}

impl SinkFactory for FileSinkFactory {
    fn create(&self, _ctx: &TaskContext, _schema: SchemaRef) -> vigil_engine::Result<Box<dyn Sink>> {
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| EngineError::io(format!("cannot create {}", dir.display()), e))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .append(self.append)
            .truncate(!self.append)
            .open(&self.path)
            .map_err(|e| EngineError::io(format!("cannot open {}", self.path.display()), e))?;
        Ok(Box::new(FileSink {
            path: self.path.display().to_string(),
            writer: Some(LineDelimitedWriter::new(BufWriter::with_capacity(1 << 20, file))),
        }))
    }
    fn max_parallelism(&self) -> Option<usize> {
        Some(1)
    }
    fn describe(&self) -> String {
        format!("file ndjson {}", self.path.display())
    }
}

struct FileSink {
    path: String,
    writer: Option<LineDelimitedWriter<BufWriter<File>>>,
}

impl FileSink {
    fn writer(&mut self) -> vigil_engine::Result<&mut LineDelimitedWriter<BufWriter<File>>> {
        self.writer
            .as_mut()
            .ok_or_else(|| EngineError::Internal(format!("file sink {} written after close", self.path)))
    }
}

#[async_trait]
impl Sink for FileSink {
    async fn write(&mut self, batch: RecordBatch) -> vigil_engine::Result<()> {
        self.writer()?.write(&batch)?;
        Ok(())
    }

    async fn flush(&mut self) -> vigil_engine::Result<()> {
        use std::io::Write;
        let path = self.path.clone();
        let w = self.writer()?;
        w.finish()?;
        w.get_mut()
            .flush()
            .map_err(|e| EngineError::io(format!("cannot write {path}"), e))
    }
}
