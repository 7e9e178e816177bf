//! Read models kept in memory and served while the pipeline runs: the
//! interactive queries of CQRS.
//!
//! A `read_model` sink applies a stream of upserts and deletes (rows with
//! an `op` column, `delete` or `retract` removing the key) to a table keyed
//! by tenant and key. The table lives in [`ReadModels`], which the HTTP
//! API reads; the same stream can go to a compacted Kafka topic through a
//! `kafka` sink with `changelog: true`, for services that keep their own
//! copy.
//!
//! A pipeline running as several processes (`scale_out`) shares each model
//! through a changelog topic that every process follows whole
//! ([`crate::kafka::model_log`]), so any process answers for every key.
//!
//! Rows are kept as the JSON text arrow-json writes for the batch (one pass
//! per batch, never per-row value trees), beside the text of their scalar
//! columns for filters. Every read is scoped to one tenant: the key of the
//! table starts with it, so a request for tenant A cannot reach tenant B's
//! rows, whatever its filters.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, SchemaRef};
use arrow_json::LineDelimitedWriter;
use async_trait::async_trait;
use parking_lot::RwLock;
use serde::Deserialize;
use vigil_engine::{EngineError, Sink, SinkFactory, TaskContext};

use crate::kafka::model_log::{Follower, LogWriter, ModelLog};

/// A `read_model` sink.
///
/// ```yaml
/// type: read_model
/// input: incidents.open_incidents
/// key: incident_id         # the key within a tenant
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadModelSinkConfig {
    /// The model's name in the API (default: the sink's name).
    #[serde(default)]
    pub name: Option<String>,
    /// Column holding the key.
    pub key: String,
    /// Column holding the tenant.
    #[serde(default = "default_tenant")]
    pub tenant: String,
    /// Column saying `upsert`/`insert`/`update` or `delete`/`retract`
    /// (default `op`; rows without one are upserts).
    #[serde(default = "default_op")]
    pub op: String,
}

fn default_tenant() -> String {
    "tenant_id".into()
}
fn default_op() -> String {
    "op".into()
}

/// A row of a model.
pub(crate) struct Row {
    /// The row as a JSON object.
    pub json: Box<str>,
    /// Text of the scalar columns, by the model's column index.
    pub fields: Box<[Option<Box<str>>]>,
}

/// One change to a model: the new row of (tenant, key), or its removal.
pub(crate) struct Change {
    /// Tenant and key.
    pub id: (String, String),
    /// The row; None deletes it.
    pub row: Option<Row>,
}

/// One read model: rows by (tenant, key).
pub struct ReadModel {
    name: String,
    rows: RwLock<BTreeMap<(String, String), Row>>,
    columns: RwLock<Vec<String>>,
    changes: AtomicU64,
}

impl std::fmt::Debug for ReadModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadModel")
            .field("name", &self.name)
            .finish()
    }
}

/// A page of a listing.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    /// The rows, as JSON objects, in key order.
    pub items: Vec<String>,
    /// The key to pass as `after` for the next page.
    pub next: Option<String>,
    /// Rows matching the filters in all.
    pub total: usize,
    /// Matching rows per value of the `count_by` column.
    pub counts: BTreeMap<String, usize>,
}

/// What a listing asks for.
#[derive(Debug, Clone, Default)]
pub struct Query {
    /// Column = value conditions, all of which must hold.
    pub filters: Vec<(String, String)>,
    /// Keys after this one.
    pub after: Option<String>,
    /// At most this many rows.
    pub limit: usize,
    /// Count matching rows by this column.
    pub count_by: Option<String>,
}

impl ReadModel {
    fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            rows: RwLock::new(BTreeMap::new()),
            columns: RwLock::new(Vec::new()),
            changes: AtomicU64::new(0),
        }
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Changes applied so far.
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Relaxed)
    }

    /// Rows of `tenant`.
    pub fn count(&self, tenant: &str) -> usize {
        self.tenant_rows(&self.rows.read(), tenant, None).count()
    }

    fn tenant_rows<'a>(
        &self,
        rows: &'a BTreeMap<(String, String), Row>,
        tenant: &str,
        after: Option<&str>,
    ) -> impl Iterator<Item = (&'a (String, String), &'a Row)> + 'a {
        let tenant = tenant.to_string();
        let from = match after {
            Some(a) => Bound::Excluded((tenant.clone(), a.to_string())),
            None => Bound::Included((tenant.clone(), String::new())),
        };
        rows.range((from, Bound::Unbounded))
            .take_while(move |((t, _), _)| *t == tenant)
    }

    /// The row of `key` in `tenant`, as a JSON object.
    pub fn get(&self, tenant: &str, key: &str) -> Option<String> {
        self.rows
            .read()
            .get(&(tenant.to_string(), key.to_string()))
            .map(|r| r.json.to_string())
    }

    /// A page of `tenant`'s rows matching `q`. An unknown filter or
    /// `count_by` column is an error naming it.
    pub fn list(&self, tenant: &str, q: &Query) -> Result<Page, String> {
        let columns = self.columns.read().clone();
        let index = |c: &str| {
            columns.iter().position(|n| n == c).ok_or_else(|| {
                format!(
                    "read model {:?} has no column {c:?}; it has {}",
                    self.name,
                    columns.join(", ")
                )
            })
        };
        let filters: Vec<(usize, &str)> = q
            .filters
            .iter()
            .map(|(c, v)| index(c).map(|i| (i, v.as_str())))
            .collect::<Result<_, _>>()?;
        let count_by = q.count_by.as_deref().map(index).transpose()?;
        let rows = self.rows.read();
        let matches = |r: &Row| {
            filters
                .iter()
                .all(|(i, v)| r.fields.get(*i).and_then(|f| f.as_deref()) == Some(*v))
        };
        let mut page = Page {
            items: Vec::new(),
            next: None,
            total: 0,
            counts: BTreeMap::new(),
        };
        for ((_, key), row) in self.tenant_rows(&rows, tenant, None) {
            if !matches(row) {
                continue;
            }
            page.total += 1;
            if let Some(i) = count_by {
                let v = row.fields.get(i).and_then(|f| f.as_deref()).unwrap_or("");
                *page.counts.entry(v.to_string()).or_default() += 1;
            }
            let past = q.after.as_deref().is_none_or(|a| key.as_str() > a);
            if past && page.items.len() < q.limit {
                page.items.push(row.json.to_string());
                if page.items.len() == q.limit {
                    page.next = Some(key.clone());
                }
            }
        }
        // No next page when the last row was the last match.
        if let Some(n) = &page.next {
            let more = self
                .tenant_rows(&rows, tenant, Some(n))
                .any(|(_, r)| matches(r));
            if !more {
                page.next = None;
            }
        }
        Ok(page)
    }

    /// The changes `batch` makes: a row per key, or its removal where the
    /// `op` column says `delete` or `retract`. Sets the model's columns
    /// from the batch on first use.
    pub(crate) fn changes_of(
        &self,
        batch: &RecordBatch,
        key: &str,
        tenant: &str,
        op: &str,
    ) -> vigil_engine::Result<Vec<Change>> {
        let text = |name: &str| -> vigil_engine::Result<Option<arrow::array::ArrayRef>> {
            batch
                .column_by_name(name)
                .map(|c| cast(c, &DataType::Utf8))
                .transpose()
                .map_err(EngineError::from)
        };
        let (Some(keys), Some(tenants)) = (text(key)?, text(tenant)?) else {
            return Err(EngineError::User(format!(
                "read model {:?}: rows need columns {key:?} and {tenant:?}",
                self.name
            )));
        };
        let ops = text(op)?;
        let schema = batch.schema();
        self.set_columns(&schema);
        let scalar = scalar_columns(&schema);
        let mut values = Vec::with_capacity(scalar.len());
        for i in &scalar {
            values.push(cast(batch.column(*i), &DataType::Utf8)?);
        }
        // Stored rows are the model's columns; `op` only says what to do.
        let shown: Vec<usize> = (0..schema.fields().len())
            .filter(|i| schema.field(*i).name() != op)
            .collect();
        let body = batch.project(&shown)?;
        let mut json = Vec::with_capacity(batch.num_rows() * 256);
        {
            let mut w = LineDelimitedWriter::new(&mut json);
            w.write(&body)?;
            w.finish()?;
        }
        let lines: Vec<&[u8]> = json.split(|b| *b == b'\n').collect();
        let (keys, tenants) = (keys.as_string::<i32>(), tenants.as_string::<i32>());
        let ops = ops.as_ref().map(|o| o.as_string::<i32>());
        let values: Vec<_> = values.iter().map(|v| v.as_string::<i32>()).collect();
        let mut changes = Vec::with_capacity(batch.num_rows());
        for r in 0..batch.num_rows() {
            if keys.is_null(r) || tenants.is_null(r) {
                continue;
            }
            let id = (tenants.value(r).to_string(), keys.value(r).to_string());
            let delete = ops
                .filter(|o| o.is_valid(r))
                .is_some_and(|o| matches!(o.value(r), "delete" | "retract"));
            let row = (!delete).then(|| Row {
                json: String::from_utf8_lossy(lines.get(r).copied().unwrap_or_default()).into(),
                fields: values
                    .iter()
                    .map(|v| v.is_valid(r).then(|| Box::from(v.value(r))))
                    .collect(),
            });
            changes.push(Change { id, row });
        }
        Ok(changes)
    }

    /// The model's columns are `schema`'s scalar ones, if not set yet.
    pub(crate) fn set_columns(&self, schema: &arrow::datatypes::Schema) {
        let mut cols = self.columns.write();
        if cols.is_empty() {
            *cols = scalar_columns(schema)
                .iter()
                .map(|i| schema.field(*i).name().clone())
                .collect();
        }
    }

    /// Applies `changes` in order, noting their keys in `touched`.
    pub(crate) fn apply_changes(
        &self,
        changes: impl IntoIterator<Item = Change>,
        mut touched: Option<&mut std::collections::HashSet<(String, String)>>,
    ) {
        let mut rows = self.rows.write();
        let mut n = 0;
        for c in changes {
            n += 1;
            if let Some(t) = touched.as_deref_mut() {
                if !t.contains(&c.id) {
                    t.insert(c.id.clone());
                }
            }
            match c.row {
                Some(row) => {
                    rows.insert(c.id, row);
                }
                None => {
                    rows.remove(&c.id);
                }
            }
        }
        self.changes.fetch_add(n, Ordering::Relaxed);
    }
}

/// The columns a model keeps text of for filters: the non-nested ones.
fn scalar_columns(schema: &arrow::datatypes::Schema) -> Vec<usize> {
    (0..schema.fields().len())
        .filter(|i| !schema.field(*i).data_type().is_nested())
        .collect()
}

impl ReadModel {
    /// The rows of `keys` that exist, as a state table: tenant, key, the
    /// row's JSON and its scalar fields (a JSON array), with the model's
    /// column names in the schema's metadata.
    fn export(
        &self,
        keys: &std::collections::HashSet<(String, String)>,
    ) -> vigil_engine::Result<RecordBatch> {
        use arrow::array::StringBuilder;
        let rows = self.rows.read();
        let (mut tenants, mut ids, mut jsons, mut fields) = (
            StringBuilder::new(),
            StringBuilder::new(),
            StringBuilder::new(),
            StringBuilder::new(),
        );
        for k in keys {
            if let Some(row) = rows.get(k) {
                tenants.append_value(&k.0);
                ids.append_value(&k.1);
                jsons.append_value(&row.json);
                let f: Vec<Option<&str>> = row.fields.iter().map(|f| f.as_deref()).collect();
                fields.append_value(serde_json::to_string(&f).unwrap_or_else(|_| "[]".into()));
            }
        }
        let columns = serde_json::to_string(&*self.columns.read()).unwrap_or_else(|_| "[]".into());
        let schema = arrow::datatypes::Schema::new(vec![
            arrow::datatypes::Field::new("tenant", DataType::Utf8, false),
            arrow::datatypes::Field::new("key", DataType::Utf8, false),
            arrow::datatypes::Field::new("json", DataType::Utf8, false),
            arrow::datatypes::Field::new("fields", DataType::Utf8, false),
        ])
        .with_metadata([("columns".to_string(), columns)].into());
        Ok(RecordBatch::try_new(
            Arc::new(schema),
            vec![
                Arc::new(tenants.finish()),
                Arc::new(ids.finish()),
                Arc::new(jsons.finish()),
                Arc::new(fields.finish()),
            ],
        )?)
    }

    /// The rows [`ReadModel::export`] wrote, as changes; takes the
    /// model's columns from the table if it has none yet.
    fn rows_of(&self, table: &RecordBatch) -> vigil_engine::Result<Vec<Change>> {
        let bad = || {
            EngineError::Checkpoint(format!(
                "read model {:?}: the checkpoint's rows have the wrong columns",
                self.name
            ))
        };
        if table.num_columns() != 4 {
            return Err(bad());
        }
        let col = |i: usize| table.column(i).as_string_opt::<i32>().ok_or_else(bad);
        let (tenants, ids, jsons, fields) = (col(0)?, col(1)?, col(2)?, col(3)?);
        if let Some(c) = table.schema().metadata().get("columns") {
            let names: Vec<String> = serde_json::from_str(c).map_err(|_| bad())?;
            let mut cols = self.columns.write();
            if cols.is_empty() {
                *cols = names;
            }
        }
        let mut rows = Vec::with_capacity(table.num_rows());
        for r in 0..table.num_rows() {
            let f: Vec<Option<String>> =
                serde_json::from_str(fields.value(r)).map_err(|_| bad())?;
            rows.push(Change {
                id: (tenants.value(r).to_string(), ids.value(r).to_string()),
                row: Some(Row {
                    json: jsons.value(r).into(),
                    fields: f.into_iter().map(|v| v.map(Box::from)).collect(),
                }),
            });
        }
        Ok(rows)
    }
}

/// Every read model of a pipeline, by name.
#[derive(Debug, Default)]
pub struct ReadModels {
    models: RwLock<BTreeMap<String, Arc<ReadModel>>>,
}

impl ReadModels {
    /// An empty registry.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The model `name`, made on first use.
    pub fn model(&self, name: &str) -> Arc<ReadModel> {
        self.models
            .write()
            .entry(name.to_string())
            .or_insert_with(|| Arc::new(ReadModel::new(name)))
            .clone()
    }

    /// The model `name`, if there is one.
    pub fn get(&self, name: &str) -> Option<Arc<ReadModel>> {
        self.models.read().get(name).cloned()
    }

    /// Names of the models.
    pub fn names(&self) -> Vec<String> {
        self.models.read().keys().cloned().collect()
    }

    /// True when there is none.
    pub fn is_empty(&self) -> bool {
        self.models.read().is_empty()
    }
}

/// Builds `read_model` sink subtasks; they share the model.
#[derive(Debug)]
pub struct ReadModelSinkFactory {
    config: ReadModelSinkConfig,
    model: Arc<ReadModel>,
    /// Shared with the pipeline's other processes through this changelog.
    log: Option<ModelLog>,
    /// Follows the changelog into the model, from the first subtask made.
    follower: parking_lot::Mutex<Option<Follower>>,
    pipeline: String,
}

impl ReadModelSinkFactory {
    /// A sink for `config`, writing model `name` of `models`.
    pub fn new(config: &ReadModelSinkConfig, name: &str, models: &ReadModels) -> Self {
        let name = config.name.clone().unwrap_or_else(|| name.to_string());
        Self {
            config: config.clone(),
            model: models.model(&name),
            log: None,
            follower: parking_lot::Mutex::new(None),
            pipeline: String::new(),
        }
    }

    /// The model's name.
    pub fn model_name(&self) -> &str {
        &self.model.name
    }

    /// Shares the model with the other processes of pipeline `pipeline`:
    /// changes go to `log`, and the model is what the whole log says (see
    /// [`crate::kafka::model_log`]).
    pub fn shared(mut self, pipeline: &str, log: ModelLog) -> Self {
        self.log = Some(log);
        self.pipeline = pipeline.to_string();
        self
    }
}

impl SinkFactory for ReadModelSinkFactory {
    fn check_input(&self, schema: &SchemaRef) -> vigil_engine::Result<()> {
        for (what, c) in [("key", &self.config.key), ("tenant", &self.config.tenant)] {
            if schema.index_of(c).is_err() {
                return Err(EngineError::User(format!(
                    "{what} column {c:?} is not in the input"
                )));
            }
        }
        Ok(())
    }

    fn create(&self, ctx: &TaskContext, schema: SchemaRef) -> vigil_engine::Result<Box<dyn Sink>> {
        self.check_input(&schema)?;
        let log = match &self.log {
            Some(log) => {
                // Filters work before the first row comes back.
                self.model.set_columns(&schema);
                let mut follower = self.follower.lock();
                if follower.is_none() {
                    let group = format!("vigil-{}-{}-follower", self.pipeline, self.model.name);
                    *follower = Some(Follower::start(log, self.model.clone(), &group)?);
                }
                Some(LogWriter::new(log, ctx.metrics.clone())?)
            }
            None => None,
        };
        Ok(Box::new(ReadModelSink {
            config: self.config.clone(),
            model: self.model.clone(),
            touched: std::collections::HashSet::new(),
            log,
            republish: Vec::new(),
        }))
    }

    fn describe(&self) -> String {
        let shared = match &self.log {
            Some(log) => format!(", shared through {}", log.topic),
            None => String::new(),
        };
        format!(
            "read model {} keyed by {}, {}{shared}",
            self.model.name, self.config.tenant, self.config.key
        )
    }
}

/// A subtask of a `read_model` sink. Upserts and deletes by key are
/// idempotent, so a replay after a restore applies the same changes again
/// with the same result; the checkpoint keeps the rows this subtask wrote,
/// so a new process serves them before its replay starts. A shared model's
/// changes go to its changelog instead, which holds the rows: its
/// checkpoint holds nothing.
struct ReadModelSink {
    config: ReadModelSinkConfig,
    model: Arc<ReadModel>,
    /// Keys this subtask has written or restored.
    touched: std::collections::HashSet<(String, String)>,
    /// The changelog of a shared model.
    log: Option<LogWriter>,
    /// Rows of a checkpoint taken before the model was shared, for its
    /// changelog.
    republish: Vec<Change>,
}

impl ReadModelSink {
    async fn send_restored(&mut self) -> vigil_engine::Result<()> {
        if let Some(log) = &mut self.log {
            for c in std::mem::take(&mut self.republish) {
                log.send(&c).await?;
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Sink for ReadModelSink {
    async fn write(&mut self, batch: RecordBatch) -> vigil_engine::Result<()> {
        let changes = self.model.changes_of(
            &batch,
            &self.config.key,
            &self.config.tenant,
            &self.config.op,
        )?;
        if self.log.is_none() {
            self.model.apply_changes(changes, Some(&mut self.touched));
            return Ok(());
        }
        self.send_restored().await?;
        if let Some(log) = &mut self.log {
            for c in &changes {
                log.send(c).await?;
            }
        }
        Ok(())
    }

    async fn flush(&mut self) -> vigil_engine::Result<()> {
        self.send_restored().await?;
        match &mut self.log {
            Some(log) => log.flush().await,
            None => Ok(()),
        }
    }

    async fn snapshot(
        &mut self,
        _checkpoint: vigil_engine::CheckpointId,
    ) -> vigil_engine::Result<vigil_engine::OperatorState> {
        if self.log.is_some() {
            // In the changelog before the barrier passes.
            self.flush().await?;
            return Ok(vigil_engine::OperatorState::default());
        }
        let table = self.model.export(&self.touched)?;
        // Deleted keys need no state.
        let rows = self.model.rows.read();
        self.touched.retain(|k| rows.contains_key(k));
        drop(rows);
        Ok(vigil_engine::OperatorState {
            batches: vec![table],
        })
    }

    fn restore(&mut self, state: vigil_engine::OperatorState) -> vigil_engine::Result<()> {
        for table in &state.batches {
            let rows = self.model.rows_of(table)?;
            match self.log {
                Some(_) => self.republish.extend(rows),
                None => {
                    self.touched.extend(rows.iter().map(|c| c.id.clone()));
                    self.model.apply_changes(rows, None);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{StringArray, UInt64Array};
    use arrow::datatypes::{Field, Schema};

    type R = (&'static str, &'static str, &'static str, &'static str, u64);

    fn batch(rows: &[R]) -> RecordBatch {
        let s = Arc::new(Schema::new(vec![
            Field::new("op", DataType::Utf8, false),
            Field::new("tenant_id", DataType::Utf8, false),
            Field::new("incident_id", DataType::Utf8, false),
            Field::new("severity", DataType::Utf8, false),
            Field::new("alert_count", DataType::UInt64, false),
        ]));
        let col = |f: fn(&R) -> &'static str| {
            Arc::new(StringArray::from(rows.iter().map(f).collect::<Vec<_>>()))
                as arrow::array::ArrayRef
        };
        RecordBatch::try_new(
            s,
            vec![
                col(|r| r.0),
                col(|r| r.1),
                col(|r| r.2),
                col(|r| r.3),
                Arc::new(UInt64Array::from(
                    rows.iter().map(|r| r.4).collect::<Vec<_>>(),
                )),
            ],
        )
        .expect("batch")
    }

    #[test]
    fn upserts_deletes_filters_pages_and_tenants() {
        let models = ReadModels::new();
        let m = models.model("open_incidents");
        let mut touched = std::collections::HashSet::new();
        let changes = m
            .changes_of(
                &batch(&[
                    ("upsert", "acme", "i1", "high", 1),
                    ("upsert", "acme", "i2", "low", 2),
                    ("upsert", "acme", "i3", "high", 3),
                    ("upsert", "globex", "i9", "high", 9),
                    ("upsert", "acme", "i2", "critical", 4),
                    ("delete", "acme", "i3", "high", 3),
                ]),
                "incident_id",
                "tenant_id",
                "op",
            )
            .expect("changes");
        m.apply_changes(changes, Some(&mut touched));
        assert_eq!(m.count("acme"), 2);
        // A checkpoint's rows rebuild the same model in a new process.
        let table = m.export(&touched).expect("export");
        assert_eq!(table.num_rows(), 3, "i3 was deleted");
        let again = ReadModels::new().model("open_incidents");
        again.apply_changes(again.rows_of(&table).expect("rows"), None);
        let all = Query {
            limit: 10,
            ..Query::default()
        };
        assert_eq!(again.list("acme", &all), m.list("acme", &all));
        let high = Query {
            filters: vec![("severity".into(), "high".into())],
            limit: 10,
            ..Query::default()
        };
        assert_eq!(again.list("acme", &high), m.list("acme", &high));
        assert!(m
            .get("acme", "i2")
            .expect("i2")
            .contains("\"severity\":\"critical\""));
        assert_eq!(m.get("acme", "i3"), None, "deleted");
        assert_eq!(m.get("acme", "i9"), None, "another tenant's");
        let all = m
            .list(
                "acme",
                &Query {
                    limit: 1,
                    count_by: Some("severity".into()),
                    ..Query::default()
                },
            )
            .expect("list");
        assert_eq!(all.total, 2);
        assert_eq!(all.items.len(), 1);
        assert_eq!(all.next.as_deref(), Some("i1"));
        assert_eq!(all.counts.get("critical"), Some(&1));
        let next = m
            .list(
                "acme",
                &Query {
                    limit: 1,
                    after: all.next.clone(),
                    ..Query::default()
                },
            )
            .expect("page 2");
        assert!(next.items[0].contains("\"i2\""));
        assert_eq!(next.next, None);
        let high = m
            .list(
                "acme",
                &Query {
                    limit: 10,
                    filters: vec![("severity".into(), "high".into())],
                    ..Query::default()
                },
            )
            .expect("filter");
        assert_eq!(high.total, 1);
        let e = m
            .list(
                "acme",
                &Query {
                    limit: 10,
                    filters: vec![("colour".into(), "x".into())],
                    ..Query::default()
                },
            )
            .expect_err("unknown column");
        assert!(e.contains("no column \"colour\""), "{e}");
        let other = m
            .list(
                "globex",
                &Query {
                    limit: 10,
                    ..Query::default()
                },
            )
            .expect("globex");
        assert_eq!(other.total, 1);
        assert!(other.items[0].contains("i9"));
    }
}
