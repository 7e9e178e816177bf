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
    /// Create the file only when the first record arrives.
    lazy: bool,
}

impl FileSinkFactory {
    /// A sink writing to `config.path`.
    pub fn new(config: &FileSinkConfig) -> Self {
        Self {
            path: config.path.clone(),
            append: config.append,
            lazy: false,
        }
    }

    /// The default dead-letter sink: appends to `path`, which is created only
    /// if a dead letter ever arrives, so clean runs leave nothing behind.
    pub fn dead_letters(path: PathBuf) -> Self {
        Self {
            path,
            append: true,
            lazy: true,
        }
    }

    fn open(&self) -> vigil_engine::Result<LineDelimitedWriter<BufWriter<File>>> {
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| EngineError::io(format!("cannot create {}", dir.display()), e))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .append(self.append)
            .truncate(!self.append)
            .open(&self.path)
            .map_err(|e| EngineError::io(format!("cannot open {}", self.path.display()), e))?;
        Ok(LineDelimitedWriter::new(BufWriter::with_capacity(
            1 << 20,
            file,
        )))
    }
}

impl SinkFactory for FileSinkFactory {
    fn create(
        &self,
        _ctx: &TaskContext,
        _schema: SchemaRef,
    ) -> vigil_engine::Result<Box<dyn Sink>> {
        let writer = if self.lazy { None } else { Some(self.open()?) };
        Ok(Box::new(FileSink {
            factory: FileSinkFactory {
                path: self.path.clone(),
                append: self.append,
                lazy: self.lazy,
            },
            writer,
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
    factory: FileSinkFactory,
    writer: Option<LineDelimitedWriter<BufWriter<File>>>,
}

#[async_trait]
impl Sink for FileSink {
    async fn write(&mut self, batch: RecordBatch) -> vigil_engine::Result<()> {
        let w = match &mut self.writer {
            Some(w) => w,
            None => self.writer.insert(self.factory.open()?),
        };
        w.write(&batch)?;
        Ok(())
    }

    async fn flush(&mut self) -> vigil_engine::Result<()> {
        use std::io::Write;
        let Some(w) = &mut self.writer else {
            return Ok(());
        };
        w.finish()?;
        w.get_mut().flush().map_err(|e| {
            EngineError::io(format!("cannot write {}", self.factory.path.display()), e)
        })
    }
}
