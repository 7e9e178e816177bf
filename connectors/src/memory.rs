//! The memory sink: collects batches where the caller can read them. Used by
//! tests and by embedders that want results in process.

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use parking_lot::Mutex;
use vigil_engine::{Sink, SinkFactory, TaskContext};

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
