//! The windowed aggregation as an engine operator, and its factory.

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use vigil_engine::{
    Collector, EventTime, Operator, OperatorFactory, OperatorState, TaskContext, LATE,
};

use super::fixed::FixedWindows;
use super::session::Sessions;
use super::spec::{WindowAggregateSpec, WindowKind};
use crate::sql::stages::one_line;

/// Builds the subtasks of a windowed aggregation.
#[derive(Debug, Clone)]
pub struct WindowAggregateFactory {
    spec: Arc<WindowAggregateSpec>,
}

impl WindowAggregateFactory {
    /// A factory for `spec`, as the SQL planner made it.
    pub fn new(spec: impl Into<Arc<WindowAggregateSpec>>) -> Self {
        Self { spec: spec.into() }
    }

    /// What it computes.
    pub fn spec(&self) -> &WindowAggregateSpec {
        &self.spec
    }

    /// Builds one subtask's state outside a pipeline (tests, benchmarks).
    pub fn build(&self, ctx: &TaskContext) -> crate::Result<WindowAggregate> {
        let state = match self.spec.kind {
            WindowKind::Session { .. } => {
                State::Session(Sessions::new(self.spec.clone(), ctx.metrics.clone())?)
            }
            _ => State::Fixed(FixedWindows::new(self.spec.clone(), ctx.metrics.clone())?),
        };
        Ok(WindowAggregate { state })
    }
}

impl OperatorFactory for WindowAggregateFactory {
    fn output_schema(&self) -> SchemaRef {
        self.spec.output_schema()
    }
    fn key_columns(&self) -> Vec<String> {
        self.spec.key_names()
    }
    fn side_outputs(&self) -> Vec<(&'static str, SchemaRef)> {
        vec![(LATE, self.spec.input.clone())]
    }
    fn create(&self, ctx: &TaskContext) -> vigil_engine::Result<Box<dyn Operator>> {
        Ok(Box::new(self.build(ctx)?))
    }
    fn describe(&self) -> String {
        let s = &self.spec;
        let keys = &s.key_labels;
        let lateness = if s.lateness_ms > 0 {
            format!(
                ", allowed lateness {}",
                humantime::format_duration(std::time::Duration::from_millis(s.lateness_ms as u64))
            )
        } else {
            String::new()
        };
        let panes = if s.panes { " in panes" } else { "" };
        format!(
            "window aggregate {}{panes} by ({}){lateness}: {}",
            s.kind.describe(),
            keys.join(", "),
            one_line(&s.sql)
        )
    }
}

enum State {
    Fixed(FixedWindows),
    Session(Sessions),
}

/// One subtask of a windowed aggregation.
pub struct WindowAggregate {
    state: State,
}

impl WindowAggregate {
    /// Windows (or sessions) holding state.
    pub fn open_windows(&self) -> usize {
        match &self.state {
            State::Fixed(f) => f.open_windows(),
            State::Session(s) => s.open_sessions(),
        }
    }
}

impl Operator for WindowAggregate {
    fn process_batch(
        &mut self,
        _input: usize,
        batch: RecordBatch,
        out: &mut Collector,
    ) -> vigil_engine::Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        match &mut self.state {
            State::Fixed(f) => f.process(batch, out)?,
            State::Session(s) => s.process(batch, out)?,
        }
        Ok(())
    }

    fn on_watermark(
        &mut self,
        watermark: EventTime,
        out: &mut Collector,
    ) -> vigil_engine::Result<()> {
        match &mut self.state {
            State::Fixed(f) => f.on_watermark(watermark, out)?,
            State::Session(s) => s.on_watermark(watermark, out)?,
        }
        Ok(())
    }

    fn state_size(&self) -> vigil_engine::StateSize {
        match &self.state {
            State::Fixed(f) => f.state_size(),
            State::Session(s) => s.state_size(),
        }
    }

    fn snapshot(&mut self) -> vigil_engine::Result<OperatorState> {
        Ok(match &mut self.state {
            State::Fixed(f) => f.snapshot()?,
            State::Session(s) => s.snapshot()?,
        })
    }

    fn restore(&mut self, state: OperatorState) -> vigil_engine::Result<()> {
        match &mut self.state {
            State::Fixed(f) => f.restore(state)?,
            State::Session(s) => s.restore(state)?,
        }
        Ok(())
    }
}
