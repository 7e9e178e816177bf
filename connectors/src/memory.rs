//! Memory source and sink: records handed in, and results collected, in
//! process. Used by tests and by embedders.

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use parking_lot::Mutex;
use vigil_engine::{Sink, SinkFactory, Source, SourceEvent, SourceFactory, TaskContext};

/// Batches collected by a memory sink, shared with its reader.
pub type Collected = Arc<Mutex<Vec<RecordBatch>>>;

/// Builds memory sink subtasks that all append to one [`Collected`].
#[derive(Debug, Default, Clone)]
pub struct MemorySinkFactory {
    collected: Collected,
}

impl MemorySinkFactory {
    /// A new sink and the handle its batches appear in.
    pub fn new() -> (Self, Collected) {
        let collected = Collected::default();
        (
            Self {
                collected: collected.clone(),
            },
            collected,
        )
    }
}

impl SinkFactory for MemorySinkFactory {
    fn create(
        &self,
        _ctx: &TaskContext,
        _schema: SchemaRef,
    ) -> vigil_engine::Result<Box<dyn Sink>> {
        Ok(Box::new(MemorySink {
            collected: self.collected.clone(),
        }))
    }
    fn describe(&self) -> String {
        "memory".into()
    }
}

struct MemorySink {
    collected: Collected,
}

#[async_trait]
impl Sink for MemorySink {
    async fn write(&mut self, batch: RecordBatch) -> vigil_engine::Result<()> {
        self.collected.lock().push(batch);
        Ok(())
    }
}

/// Builds memory source subtasks: fixed partitions of batches, read in
/// order, each partition ending after its last batch. For tests and
/// embedders that have their records in process.
#[derive(Debug, Clone)]
pub struct MemorySourceFactory {
    schema: SchemaRef,
    event_time: usize,
    partitions: Arc<Vec<Vec<RecordBatch>>>,
}

impl MemorySourceFactory {
    /// A source of `partitions` (each a list of batches of `schema`), whose
    /// event time is column `event_time`.
    pub fn new(schema: SchemaRef, event_time: usize, partitions: Vec<Vec<RecordBatch>>) -> Self {
        Self {
            schema,
            event_time,
            partitions: Arc::new(partitions),
        }
    }
}

impl SourceFactory for MemorySourceFactory {
    fn output_schema(&self) -> SchemaRef {
        self.schema.clone()
    }
    fn event_time_column(&self) -> usize {
        self.event_time
    }
    fn max_parallelism(&self) -> Option<usize> {
        Some(self.partitions.len().max(1))
    }
    fn create(&self, ctx: &TaskContext) -> vigil_engine::Result<Box<dyn Source>> {
        let mine: Vec<std::collections::VecDeque<RecordBatch>> = self
            .partitions
            .iter()
            .enumerate()
            .filter(|(p, _)| p % ctx.parallelism == ctx.subtask)
            .map(|(_, b)| b.iter().cloned().collect())
            .collect();
        Ok(Box::new(MemorySource {
            ended: vec![false; mine.len()],
            parts: mine,
            turn: 0,
        }))
    }
    fn describe(&self) -> String {
        format!("memory ({} partitions)", self.partitions.len())
    }
}

struct MemorySource {
    parts: Vec<std::collections::VecDeque<RecordBatch>>,
    ended: Vec<bool>,
    turn: usize,
}

#[async_trait]
impl Source for MemorySource {
    fn partitions(&self) -> usize {
        self.parts.len()
    }
    async fn next(&mut self) -> vigil_engine::Result<SourceEvent> {
        let n = self.parts.len();
        for step in 0..n {
            let k = (self.turn + step) % n;
            if self.ended[k] {
                continue;
            }
            self.turn = k + 1;
            return Ok(match self.parts[k].pop_front() {
                Some(batch) => SourceEvent::Data {
                    partition: k,
                    batch,
                },
                None => {
                    self.ended[k] = true;
                    SourceEvent::PartitionEnd(k)
                }
            });
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        Ok(SourceEvent::Pending)
    }
}
