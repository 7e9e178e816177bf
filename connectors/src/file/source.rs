//! The file source: each file is a partition, read in chunks off the async
//! threads, decoded by [`JsonDecoder`].

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::AsArray;
use arrow::array::{RecordBatch, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimestampMillisecondType, UInt64Type};
use async_trait::async_trait;
use flate2::read::MultiGzDecoder;
use vigil_engine::{
    EngineError, OperatorState, SharedClock, Source, SourceEvent, SourceFactory, TaskContext,
    DEAD_LETTER,
};

use super::config::{FileFormat, FileSourceConfig, PathList};
use crate::dead_letter::{self, DeadLetterError, DeadLetters};
use crate::error::{ConnectorError, Result};
use crate::json::{JsonDecoder, RecordSpan};

/// Builds file source subtasks; files are spread over subtasks round robin.
#[derive(Debug)]
pub struct FileSourceFactory {
    name: String,
    files: Vec<PathBuf>,
    format: FileFormat,
    decoder: Arc<JsonDecoder>,
    event_time: usize,
    replay_speed: Option<f64>,
    batch_size: usize,
}

impl FileSourceFactory {
    /// Validates `config` (files exist, schema is sound) for source `name`.
    pub fn new(name: &str, config: &FileSourceConfig) -> Result<Self> {
        let resolved = config.schema.resolve()?;
        if config.batch_size == 0 {
            return Err(ConnectorError::config(
                "batch_size",
                "batch_size must be at least 1",
            ));
        }
        if let Some(s) = config.replay_speed {
            if !(s.is_finite() && s > 0.0) {
                return Err(ConnectorError::config(
                    "replay_speed",
                    "replay_speed must be a positive number",
                ));
            }
        }
        let mut decoder = JsonDecoder::new(
            resolved.decode,
            resolved.event_time,
            config.schema.event_time.format,
        )?;
        if config.schema.flatten {
            decoder = decoder.flattened()?;
        }
        let event_time = decoder.event_time_column();
        Ok(Self {
            name: name.to_string(),
            files: expand(&config.path)?,
            format: config.format,
            decoder: Arc::new(decoder),
            event_time,
            replay_speed: config.replay_speed,
            batch_size: config.batch_size,
        })
    }
}

fn expand(paths: &PathList) -> Result<Vec<PathBuf>> {
    let list: Vec<PathBuf> = match paths {
        PathList::One(p) => vec![p.clone()],
        PathList::Many(v) => v.clone(),
    };
    let mut files = Vec::new();
    for p in list {
        let meta = std::fs::metadata(&p).map_err(|e| {
            ConnectorError::config("path", format!("cannot read {}: {e}", p.display()))
        })?;
        if meta.is_dir() {
            let mut inside: Vec<PathBuf> = std::fs::read_dir(&p)
                .map_err(|e| {
                    ConnectorError::config("path", format!("cannot list {}: {e}", p.display()))
                })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect();
            inside.sort();
            files.extend(inside);
        } else {
            files.push(p);
        }
    }
    if files.is_empty() {
        return Err(ConnectorError::config("path", "no files to read"));
    }
    Ok(files)
}

impl SourceFactory for FileSourceFactory {
    fn output_schema(&self) -> SchemaRef {
        self.decoder.schema()
    }
    fn event_time_column(&self) -> usize {
        self.event_time
    }
    fn max_parallelism(&self) -> Option<usize> {
        Some(self.files.len())
    }
    fn side_outputs(&self) -> Vec<(&'static str, SchemaRef)> {
        vec![(DEAD_LETTER, dead_letter::schema())]
    }
    fn create(&self, ctx: &TaskContext) -> vigil_engine::Result<Box<dyn Source>> {
        let files: Vec<PathBuf> = self
            .files
            .iter()
            .enumerate()
            .filter(|(i, _)| i % ctx.parallelism == ctx.subtask)
            .map(|(_, f)| f.clone())
            .collect();
        let n = files.len();
        Ok(Box::new(FileSource {
            name: self.name.clone(),
            files,
            format: self.format,
            decoder: self.decoder.clone(),
            event_time: self.event_time,
            batch_size: self.batch_size,
            current: 0,
            readers: (0..n).map(|_| FileState::NotOpened).collect(),
            pending_end: None,
            records_done: vec![0; n],
            skip: vec![0; n],
            replay: self.replay_speed.map(|speed| Replay {
                speed,
                origin: None,
                clock: ctx.clock.clone(),
            }),
            held: None,
        }))
    }
    fn describe(&self) -> String {
        format!("file ({} file(s), {:?})", self.files.len(), self.format)
    }
}

enum FileState {
    NotOpened,
    Open(Reader),
    Done,
}

/// Open file being read.
enum Reader {
    Lines {
        input: Box<dyn BufRead + Send>,
        line: u64,
    },
    /// A JSON array, parsed up front into one record per element.
    Array {
        buf: Arc<Vec<u8>>,
        spans: Vec<RecordSpan>,
        next: usize,
    },
}

struct Chunk {
    buf: Arc<Vec<u8>>,
    spans: Vec<RecordSpan>,
    eof: bool,
    broken: Option<(u64, String, Vec<u8>)>,
}

struct Replay {
    speed: f64,
    /// (first event time, wall clock when it was emitted)
    origin: Option<(i64, i64)>,
    clock: SharedClock,
}

struct FileSource {
    name: String,
    files: Vec<PathBuf>,
    format: FileFormat,
    decoder: Arc<JsonDecoder>,
    event_time: usize,
    batch_size: usize,
    /// Next file to read from.
    current: usize,
    readers: Vec<FileState>,
    pending_end: Option<usize>,
    /// Records handed out per file (for checkpoints).
    records_done: Vec<u64>,
    /// Records to skip per file after a restore.
    skip: Vec<u64>,
    replay: Option<Replay>,
    /// A decoded batch not yet handed out: partition, batch, records it covers.
    held: Option<(usize, RecordBatch, u64)>,
}

fn open(path: &Path, format: FileFormat) -> std::io::Result<Reader> {
    let file = File::open(path)?;
    let gz = path.extension().is_some_and(|e| e == "gz");
    let raw: Box<dyn Read + Send> = if gz {
        Box::new(MultiGzDecoder::new(file))
    } else {
        Box::new(file)
    };
    let mut input: Box<dyn BufRead + Send> = Box::new(BufReader::with_capacity(1 << 20, raw));
    let is_array = match format {
        FileFormat::Json => true,
        FileFormat::Ndjson => false,
        FileFormat::Auto => {
            let head = input.fill_buf()?;
            head.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[')
        }
    };
    if !is_array {
        return Ok(Reader::Lines { input, line: 0 });
    }
    let mut text = Vec::new();
    input.read_to_end(&mut text)?;
    Ok(Reader::Array {
        buf: Arc::new(text),
        spans: Vec::new(),
        next: usize::MAX, // parsed lazily in `read_chunk`
    })
}

fn line_of(text: &[u8], offset: usize) -> u64 {
    text[..offset].iter().filter(|b| **b == b'\n').count() as u64 + 1
}

/// Reads up to `max` records. Runs on a blocking thread.
fn read_chunk(reader: &mut Reader, max: usize) -> std::io::Result<Chunk> {
    match reader {
        Reader::Lines { input, line } => {
            let mut buf = Vec::with_capacity(max * 256);
            let mut spans = Vec::with_capacity(max);
            let mut eof = false;
            while spans.len() < max {
                let start = buf.len();
                let n = input.read_until(b'\n', &mut buf)?;
                if n == 0 {
                    eof = true;
                    break;
                }
                *line += 1;
                if !buf[start..].iter().all(u8::is_ascii_whitespace) {
                    spans.push(RecordSpan {
                        bytes: start..buf.len(),
                        line: *line,
                    });
                }
            }
            Ok(Chunk {
                buf: Arc::new(buf),
                spans,
                eof,
                broken: None,
            })
        }
        Reader::Array { buf, spans, next } => {
            if *next == usize::MAX {
                *next = 0;
                match serde_json::from_slice::<Vec<&serde_json::value::RawValue>>(buf) {
                    Ok(values) => {
                        let base = buf.as_ptr() as usize;
                        *spans = values
                            .iter()
                            .map(|v| {
                                let start = v.get().as_ptr() as usize - base;
                                RecordSpan {
                                    bytes: start..start + v.get().len(),
                                    line: line_of(buf, start),
                                }
                            })
                            .collect();
                    }
                    Err(e) => {
                        let head = buf[..buf.len().min(64 * 1024)].to_vec();
                        return Ok(Chunk {
                            buf: buf.clone(),
                            spans: Vec::new(),
                            eof: true,
                            broken: Some((
                                e.line() as u64,
                                format!("invalid JSON array: {e}"),
                                head,
                            )),
                        });
                    }
                }
            }
            let end = (*next + max).min(spans.len());
            let chunk = spans[*next..end].to_vec();
            *next = end;
            Ok(Chunk {
                buf: buf.clone(),
                spans: chunk,
                eof: end == spans.len(),
                broken: None,
            })
        }
    }
}

impl FileSource {
    /// How long to hold `batch` back for replay pacing, in ms.
    fn replay_wait(&mut self, batch: &RecordBatch) -> i64 {
        let Some(r) = &mut self.replay else { return 0 };
        let ts = batch
            .column(self.event_time)
            .as_primitive::<TimestampMillisecondType>();
        let Some(min) = arrow::compute::min(ts) else {
            return 0;
        };
        let now = r.clock.now_ms();
        let (t0, w0) = *r.origin.get_or_insert((min, now));
        let due = w0 + ((min - t0) as f64 / r.speed) as i64;
        (due - now).max(0)
    }
}

#[async_trait]
impl Source for FileSource {
    fn partitions(&self) -> usize {
        self.files.len()
    }

    /// Files are read in turn, a chunk each, so that every file's watermark
    /// advances together, as Kafka partitions would.
    async fn next(&mut self) -> vigil_engine::Result<SourceEvent> {
        if let Some((p, batch, records)) = self.held.take() {
            let wait = self.replay_wait(&batch);
            if wait > 0 {
                self.held = Some((p, batch, records));
                tokio::time::sleep(std::time::Duration::from_millis(wait.min(100) as u64)).await;
                return Ok(SourceEvent::Pending);
            }
            return Ok(SourceEvent::Data {
                partition: p,
                batch,
            });
        }
        if let Some(p) = self.pending_end.take() {
            return Ok(SourceEvent::PartitionEnd(p));
        }
        let n = self.files.len();
        let Some(partition) = (0..n)
            .map(|k| (self.current + k) % n)
            .find(|&i| !matches!(self.readers[i], FileState::Done))
        else {
            // Every file ended; the runtime stops polling once it has seen the ends.
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            return Ok(SourceEvent::Pending);
        };
        self.current = (partition + 1) % n.max(1);
        let path = self.files[partition].clone();
        let mut reader = match std::mem::replace(&mut self.readers[partition], FileState::Done) {
            FileState::Open(r) => r,
            _ => {
                let format = self.format;
                let p = path.clone();
                tokio::task::spawn_blocking(move || open(&p, format))
                    .await
                    .map_err(|e| EngineError::Internal(e.to_string()))?
                    .map_err(|e| EngineError::io(format!("cannot open {}", path.display()), e))?
            }
        };
        let max = self.batch_size;
        let (reader, chunk) = tokio::task::spawn_blocking(move || {
            let c = read_chunk(&mut reader, max);
            (reader, c)
        })
        .await
        .map_err(|e| EngineError::Internal(e.to_string()))?;
        let chunk =
            chunk.map_err(|e| EngineError::io(format!("cannot read {}", path.display()), e))?;
        let location = path.display().to_string();
        let mut dead = DeadLetters::new(&self.name);
        if let Some((line, reason, raw)) = &chunk.broken {
            dead.push(
                &location,
                Some(*line),
                DeadLetterError::InvalidJson,
                reason,
                raw,
            );
        }
        // After a restore, skip records already handed out before the checkpoint.
        let skip = self.skip[partition].min(chunk.spans.len() as u64) as usize;
        self.skip[partition] -= skip as u64;
        let spans = &chunk.spans[skip..];
        let decoded = self
            .decoder
            .decode(&chunk.buf, spans, &location, &mut dead)?;
        self.records_done[partition] += chunk.spans.len() as u64;
        if chunk.eof {
            self.pending_end = Some(partition);
        } else {
            self.readers[partition] = FileState::Open(reader);
        }
        if let Some(b) = decoded {
            self.held = Some((partition, b, chunk.spans.len() as u64));
        }
        match dead.finish()? {
            Some(d) => Ok(SourceEvent::DeadLetters(d)),
            None => Ok(SourceEvent::Pending),
        }
    }

    fn snapshot(
        &mut self,
        _checkpoint: vigil_engine::CheckpointId,
    ) -> vigil_engine::Result<OperatorState> {
        let schema = Arc::new(Schema::new(vec![
            Field::new("file", DataType::Utf8, false),
            Field::new("records", DataType::UInt64, false),
        ]));
        // A held batch has not reached the pipeline yet: it is not part of this checkpoint.
        let mut done = self.records_done.clone();
        if let Some((p, _, records)) = &self.held {
            done[*p] -= records;
        }
        for (d, s) in done.iter_mut().zip(&self.skip) {
            // Records a restore has yet to skip were read before it.
            *d += *s;
        }
        let files: Vec<String> = self.files.iter().map(|f| f.display().to_string()).collect();
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(arrow::array::StringArray::from(files)),
                Arc::new(UInt64Array::from(done)),
            ],
        )?;
        Ok(OperatorState {
            batches: vec![batch],
        })
    }

    /// Takes the positions of this subtask's files; a checkpoint taken at
    /// another parallelism offers files other subtasks read now.
    fn restore(&mut self, state: OperatorState) -> vigil_engine::Result<()> {
        let Some(b) = state.batches.first() else {
            return Ok(());
        };
        if b.num_columns() != 2 {
            return Err(EngineError::Checkpoint(format!(
                "file source {}: the checkpoint's positions are not per file",
                self.name
            )));
        }
        let files = b.column(0).as_string::<i32>();
        let done = b.column(1).as_primitive::<UInt64Type>();
        for (f, d) in files.iter().zip(done.values()) {
            if let Some(i) = self
                .files
                .iter()
                .position(|p| Some(p.display().to_string().as_str()) == f)
            {
                self.skip[i] = *d;
                self.records_done[i] = 0;
            }
        }
        Ok(())
    }
}
