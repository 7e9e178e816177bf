//! The null sink: discards rows. For benchmarks, and for pipelines run only
//! for their metrics.

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use vigil_engine::{Sink, SinkFactory, TaskContext};

/// Builds null sink subtasks.
#[derive(Debug, Default)]
pub struct NullSinkFactory;

impl SinkFactory for NullSinkFactory {
    fn create(
        &self,
        _ctx: &TaskContext,
        _schema: SchemaRef,
    ) -> vigil_engine::Result<Box<dyn Sink>> {
        Ok(Box::new(NullSink))
    }
    fn describe(&self) -> String {
        "null".into()
    }
}

struct NullSink;

#[async_trait]
impl Sink for NullSink {
    async fn write(&mut self, _batch: RecordBatch) -> vigil_engine::Result<()> {
        Ok(())
    }
}
