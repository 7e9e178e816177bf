//! The NDJSON file sink: one JSON object per line, committed exactly once
//! per checkpoint.
//!
//! Readers of the output file see committed records only. Records go first
//! to a hidden in-progress part next to it (`.alerts.ndjson.inprogress`).
//! When a checkpoint barrier arrives the part is flushed, synced and renamed
//! to `.alerts.ndjson.<checkpoint>.pending` (the pre-commit; the rename is
//! atomic). When that checkpoint is complete and durable, the pending part
//! is appended to the output and synced, and then removed (the commit).
//!
//! The checkpoint records the output's committed length and the pending
//! parts with their sizes, which makes the commit idempotent: a restore
//! truncates the output to the committed length, appends each pending part
//! that is still there (a crash during or before its commit), counts the
//! ones already gone as appended, and truncates anything after them, which
//! is output of a checkpoint that never completed. Nothing is lost and
//! nothing is written twice.
//!
//! Without checkpoints the same path applies at the end of input: the last
//! part is committed when every input has ended.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, UInt64Type};
use arrow_json::LineDelimitedWriter;
use async_trait::async_trait;
use vigil_engine::{CheckpointId, EngineError, OperatorState, Sink, SinkFactory, TaskContext};

use super::config::FileSinkConfig;

/// Builds the (single) subtask of a file sink.
#[derive(Debug, Clone)]
pub struct FileSinkFactory {
    path: PathBuf,
    append: bool,
    /// Create the file only when the first record is committed.
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
}

fn io(what: &str, path: &Path, e: std::io::Error) -> EngineError {
    EngineError::io(format!("cannot {what} {}", path.display()), e)
}

impl SinkFactory for FileSinkFactory {
    fn create(
        &self,
        _ctx: &TaskContext,
        _schema: SchemaRef,
    ) -> vigil_engine::Result<Box<dyn Sink>> {
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| io("create", dir, e))?;
        }
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| {
                EngineError::User(format!(
                    "file sink path {} has no file name",
                    self.path.display()
                ))
            })?;
        let sibling = |suffix: &str| self.path.with_file_name(format!(".{name}.{suffix}"));
        let sink = FileSink {
            inprogress: sibling("inprogress"),
            pending_dir: self
                .path
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default(),
            name,
            factory: self.clone(),
            writer: None,
            written: 0,
            pending: Vec::new(),
            committed: None,
        };
        Ok(Box::new(sink))
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
    name: String,
    inprogress: PathBuf,
    pending_dir: PathBuf,
    writer: Option<LineDelimitedWriter<BufWriter<File>>>,
    /// Records in the in-progress part.
    written: u64,
    /// Pre-committed parts not yet committed: checkpoint and size.
    pending: Vec<(CheckpointId, u64)>,
    /// Length of the output holding every committed record (None until the
    /// sink has started: restored, or begun fresh at its first action).
    committed: Option<u64>,
}

impl FileSink {
    fn pending_path(&self, checkpoint: CheckpointId) -> PathBuf {
        self.factory
            .path
            .with_file_name(format!(".{}.{checkpoint}.pending", self.name))
    }

    /// The committed length, starting fresh if nothing was restored: the
    /// output is truncated (unless appending) and stray parts of an
    /// earlier run are removed.
    fn committed(&mut self) -> vigil_engine::Result<u64> {
        if let Some(c) = self.committed {
            return Ok(c);
        }
        self.remove_parts(|_| true)?;
        let path = &self.factory.path;
        let len = match std::fs::metadata(path) {
            Ok(m) if self.factory.append => m.len(),
            Ok(_) => {
                truncate(path, 0)?;
                0
            }
            Err(_) if self.factory.lazy => 0,
            Err(_) => {
                File::create(path).map_err(|e| io("create", path, e))?;
                0
            }
        };
        self.committed = Some(len);
        Ok(len)
    }

    /// Removes the in-progress part and the pending parts `doomed` selects.
    fn remove_parts(&self, doomed: impl Fn(CheckpointId) -> bool) -> vigil_engine::Result<()> {
        remove_if_present(&self.inprogress)?;
        let prefix = format!(".{}.", self.name);
        let dir = if self.pending_dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            self.pending_dir.as_path()
        };
        let entries = std::fs::read_dir(dir).map_err(|e| io("list", dir, e))?;
        for entry in entries.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            let id = file
                .strip_prefix(&prefix)
                .and_then(|r| r.strip_suffix(".pending"))
                .and_then(|id| id.parse::<CheckpointId>().ok());
            if let Some(id) = id.filter(|id| doomed(*id)) {
                remove_if_present(&self.pending_path(id))?;
            }
        }
        Ok(())
    }

    /// Flushes and syncs the in-progress part; returns its size.
    fn close_part(&mut self) -> vigil_engine::Result<u64> {
        let Some(mut w) = self.writer.take() else {
            return Ok(0);
        };
        w.finish()?;
        let mut buf = w.into_inner();
        buf.flush().map_err(|e| io("write", &self.inprogress, e))?;
        let file = buf
            .into_inner()
            .map_err(|e| io("write", &self.inprogress, e.into_error()))?;
        file.sync_all()
            .map_err(|e| io("sync", &self.inprogress, e))?;
        self.written = 0;
        Ok(file
            .metadata()
            .map_err(|e| io("read", &self.inprogress, e))?
            .len())
    }

    /// Appends part `part` (of `size` bytes) to the output, which is
    /// first cut back to the committed length, and syncs it.
    fn append(&mut self, part: &Path, size: u64) -> vigil_engine::Result<()> {
        let committed = self.committed()?;
        let path = &self.factory.path;
        let mut out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| io("open", path, e))?;
        let len = out.metadata().map_err(|e| io("read", path, e))?.len();
        if len < committed {
            return Err(EngineError::Checkpoint(format!(
                "{} holds {len} bytes, less than the {committed} already committed",
                path.display()
            )));
        }
        if len > committed {
            truncate(path, committed)?;
        }
        let mut input = File::open(part).map_err(|e| io("open", part, e))?;
        std::io::copy(&mut input, &mut out).map_err(|e| io("write", path, e))?;
        out.sync_all().map_err(|e| io("sync", path, e))?;
        self.committed = Some(committed + size);
        Ok(())
    }

    fn commit_through(&mut self, checkpoint: CheckpointId) -> vigil_engine::Result<()> {
        while let Some(&(id, size)) = self.pending.first() {
            if id > checkpoint {
                break;
            }
            let part = self.pending_path(id);
            self.append(&part, size)?;
            remove_if_present(&part)?;
            self.pending.remove(0);
        }
        Ok(())
    }
}

fn truncate(path: &Path, len: u64) -> vigil_engine::Result<()> {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| io("open", path, e))?;
    f.set_len(len).map_err(|e| io("truncate", path, e))?;
    f.sync_all().map_err(|e| io("sync", path, e))
}

fn remove_if_present(path: &Path) -> vigil_engine::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("remove", path, e)),
    }
}

fn state_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("committed", DataType::UInt64, false),
        Field::new("pending_checkpoint", DataType::UInt64, true),
        Field::new("pending_bytes", DataType::UInt64, true),
    ]))
}

#[async_trait]
impl Sink for FileSink {
    async fn write(&mut self, batch: RecordBatch) -> vigil_engine::Result<()> {
        self.committed()?;
        let w = match &mut self.writer {
            Some(w) => w,
            None => {
                let f = File::create(&self.inprogress)
                    .map_err(|e| io("create", &self.inprogress, e))?;
                self.writer
                    .insert(LineDelimitedWriter::new(BufWriter::with_capacity(
                        1 << 20,
                        f,
                    )))
            }
        };
        w.write(&batch)?;
        self.written += batch.num_rows() as u64;
        Ok(())
    }

    async fn snapshot(&mut self, checkpoint: CheckpointId) -> vigil_engine::Result<OperatorState> {
        let committed = self.committed()?;
        let size = self.close_part()?;
        if size > 0 {
            let pending = self.pending_path(checkpoint);
            std::fs::rename(&self.inprogress, &pending)
                .map_err(|e| io("rename", &self.inprogress, e))?;
            self.pending.push((checkpoint, size));
        } else {
            remove_if_present(&self.inprogress)?;
        }
        // One row per pending part, or one row without a part: the
        // committed length is always there.
        let parts: Vec<Option<(CheckpointId, u64)>> = if self.pending.is_empty() {
            vec![None]
        } else {
            self.pending.iter().copied().map(Some).collect()
        };
        let n = parts.len();
        let ids: Vec<Option<u64>> = parts.iter().map(|p| p.map(|(id, _)| id)).collect();
        let sizes: Vec<Option<u64>> = parts.iter().map(|p| p.map(|(_, s)| s)).collect();
        let batch = RecordBatch::try_new(
            state_schema(),
            vec![
                Arc::new(UInt64Array::from(vec![committed; n])),
                Arc::new(UInt64Array::from(ids)),
                Arc::new(UInt64Array::from(sizes)),
            ],
        )?;
        Ok(OperatorState {
            batches: vec![batch],
        })
    }

    async fn on_checkpoint_complete(
        &mut self,
        checkpoint: CheckpointId,
    ) -> vigil_engine::Result<()> {
        self.commit_through(checkpoint)
    }

    fn restore(&mut self, state: OperatorState) -> vigil_engine::Result<()> {
        let Some(b) = state.batches.first().filter(|b| b.num_rows() > 0) else {
            return Ok(());
        };
        let committed = b.column(0).as_primitive::<UInt64Type>().value(0);
        let ids = b.column(1).as_primitive::<UInt64Type>();
        let sizes = b.column(2).as_primitive::<UInt64Type>();
        self.committed = Some(committed);
        self.pending = (0..b.num_rows())
            .filter(|&i| ids.is_valid(i))
            .map(|i| (ids.value(i), sizes.value(i)))
            .collect();
        // The checkpoint is complete: commit what it pre-committed. A part
        // already gone was appended before the crash.
        for (id, size) in std::mem::take(&mut self.pending) {
            let part = self.pending_path(id);
            if part.exists() {
                self.append(&part, size)?;
                remove_if_present(&part)?;
            } else {
                self.committed = Some(self.committed.unwrap_or(0) + size);
            }
        }
        // Anything after is output of a checkpoint that never completed.
        let keep = self.committed.unwrap_or(0);
        let path = &self.factory.path;
        match std::fs::metadata(path) {
            Ok(m) if m.len() > keep => truncate(path, keep)?,
            Ok(m) if m.len() < keep => {
                return Err(EngineError::Checkpoint(format!(
                    "{} holds {} bytes, less than the {keep} its checkpoint committed",
                    path.display(),
                    m.len()
                )))
            }
            Ok(_) => {}
            Err(_) if keep == 0 => {}
            Err(e) => return Err(io("read", path, e)),
        }
        self.remove_parts(|_| true)?;
        Ok(())
    }

    async fn flush(&mut self) -> vigil_engine::Result<()> {
        if let Some(w) = &mut self.writer {
            w.finish()?;
            w.get_mut()
                .flush()
                .map_err(|e| io("write", &self.inprogress, e))?;
        }
        Ok(())
    }

    async fn finish(&mut self) -> vigil_engine::Result<()> {
        self.committed()?;
        self.commit_through(CheckpointId::MAX)?;
        let size = self.close_part()?;
        if size > 0 {
            let part = self.inprogress.clone();
            self.append(&part, size)?;
        }
        remove_if_present(&self.inprogress)
    }
}
