//! Where lookup tables come from: a CSV or JSON file, read again when it
//! changes, or a compacted Kafka topic, consumed from the beginning and then
//! as it grows.
//!
//! ```yaml
//! intel_hits:
//!   type: lookup
//!   input: flows
//!   on: dst_ip
//!   match: cidr                  # exact (default) or cidr
//!   how: inner                   # left (default) keeps rows without a match
//!   prefix: intel_
//!   table:
//!     type: file                 # or kafka
//!     path: intel/bad_networks.csv
//!     key: network
//! ```
//!
//! A file is parsed when the pipeline is planned, so a malformed table is
//! reported (file and line) before anything starts; a reload that fails
//! keeps the previous table and logs why. A topic's records are upserts by
//! their message key; a record without a value (a tombstone) removes its
//! row. Values are JSON objects decoded into the declared `fields`; one that
//! does not decode is skipped with a warning naming topic, partition and
//! offset.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, SchemaRef};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde::Deserialize;
use vigil_engine::{EngineError, TableFeed, TableUpdate};

use crate::error::{ConnectorError, Result};
use crate::schema::{arrow_schema, FieldConfig};

/// How a row's key meets the table's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LookupMatch {
    /// Equal keys.
    #[default]
    Exact,
    /// The row's address in the table's CIDR block, longest prefix first.
    Cidr,
}

/// Which rows a lookup keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LookupHow {
    /// Every row, with nulls where the table has no match.
    #[default]
    Left,
    /// Only rows with a match.
    Inner,
}

/// Configuration of a `lookup` step.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LookupConfig {
    /// The stream's column to look up.
    pub on: String,
    /// `exact` or `cidr`.
    #[serde(default, rename = "match")]
    pub mode: LookupMatch,
    /// `left` or `inner`.
    #[serde(default)]
    pub how: LookupHow,
    /// Put before each table column's name in the output.
    #[serde(default)]
    pub prefix: String,
    /// Match rows of any tenant (default false: when the table has
    /// `tenant_id`, rows match their own tenant's rows only).
    #[serde(default)]
    pub cross_tenant: bool,
    /// Where the table comes from.
    pub table: TableConfig,
}

/// The table's source.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum TableConfig {
    /// A CSV or JSON file.
    File {
        /// The file.
        path: PathBuf,
        /// `csv` or `json` (JSON lines or one array); default from the
        /// extension.
        #[serde(default)]
        format: Option<TableFormat>,
        /// The key column.
        key: String,
        /// The columns and their types (default: inferred from the file).
        #[serde(default)]
        fields: Option<Vec<FieldConfig>>,
        /// How often to look for a new version of the file (default 10s).
        #[serde(default, with = "humantime_serde")]
        reload: Option<Duration>,
    },
    /// A compacted Kafka topic of JSON values.
    Kafka {
        /// Bootstrap servers.
        brokers: String,
        /// The topic.
        topic: String,
        /// The key column (in the values).
        key: String,
        /// The values' columns and their types.
        fields: Vec<FieldConfig>,
        /// librdkafka settings.
        #[serde(default)]
        properties: BTreeMap<String, String>,
        /// How long to wait for the topic to be read to its end at start
        /// (default 30s).
        #[serde(default, with = "humantime_serde")]
        bootstrap_timeout: Option<Duration>,
    },
}

/// A table file's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TableFormat {
    /// Comma-separated, with a header line.
    Csv,
    /// JSON lines, or one JSON array of objects.
    Json,
}

impl TableConfig {
    /// The key column's name.
    pub fn key(&self) -> &str {
        match self {
            TableConfig::File { key, .. } | TableConfig::Kafka { key, .. } => key,
        }
    }

    /// Opens the feed: a file is read and checked now.
    pub fn open(&self, step: &str) -> Result<Box<dyn TableFeed>> {
        match self {
            TableConfig::File {
                path,
                format,
                key,
                fields,
                reload,
            } => {
                let format = match format {
                    Some(f) => *f,
                    None => match path.extension().and_then(|e| e.to_str()) {
                        Some("csv") => TableFormat::Csv,
                        Some("json" | "ndjson" | "jsonl") => TableFormat::Json,
                        _ => {
                            return Err(ConnectorError::config(
                                "table.format",
                                format!("cannot tell the format of {}", path.display()),
                            )
                            .with_hint("format: csv or format: json"))
                        }
                    },
                };
                let declared = match fields {
                    Some(f) => Some(arrow_schema(f, "table.fields")?),
                    None => None,
                };
                let feed = FileFeed::open(path, format, declared, key, *reload)?;
                Ok(Box::new(feed))
            }
            TableConfig::Kafka {
                brokers,
                topic,
                key,
                fields,
                properties,
                bootstrap_timeout,
            } => {
                let schema = arrow_schema(fields, "table.fields")?;
                let key_col = schema.index_of(key).map_err(|_| {
                    ConnectorError::config("table.key", format!("{key:?} is not in table.fields"))
                })?;
                let tenant = schema.index_of("tenant_id").ok();
                let mut c = ClientConfig::new();
                c.set("bootstrap.servers", brokers)
                    .set("group.id", format!("vigil-lookup-{step}"))
                    .set("enable.auto.commit", "false")
                    .set("enable.partition.eof", "false");
                for (k, v) in properties {
                    c.set(k, v);
                }
                Ok(Box::new(KafkaFeed {
                    config: c,
                    consumer: None,
                    topic: topic.clone(),
                    schema,
                    key_col,
                    tenant,
                    owners: HashMap::new(),
                    timeout: bootstrap_timeout.unwrap_or(Duration::from_secs(30)),
                }))
            }
        }
    }
}

/// A table read from a file, read again when its modification time changes.
pub struct FileFeed {
    path: PathBuf,
    format: TableFormat,
    schema: SchemaRef,
    modified: Option<SystemTime>,
    every_ms: i64,
    next_check: i64,
    initial: Option<Vec<RecordBatch>>,
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|source| ConnectorError::Io {
            path: path.display().to_string(),
            source,
        })?;
    Ok(bytes)
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl FileFeed {
    /// Reads `path` now; `schema` is inferred when not given.
    pub fn open(
        path: &Path,
        format: TableFormat,
        schema: Option<SchemaRef>,
        key: &str,
        reload: Option<Duration>,
    ) -> Result<Self> {
        let stamp = modified(path);
        let bytes = read_file(path)?;
        let schema = match schema {
            Some(s) => s,
            None => infer(path, format, &bytes)?,
        };
        if schema.index_of(key).is_err() {
            return Err(ConnectorError::config(
                "table.key",
                format!("{key:?} is not a column of {}", path.display()),
            ));
        }
        let batches = parse(path, format, &schema, &bytes)?;
        Ok(Self {
            path: path.to_path_buf(),
            format,
            schema,
            modified: stamp,
            every_ms: reload.map_or(10_000, |d| d.as_millis() as i64).max(1),
            next_check: i64::MIN,
            initial: Some(batches),
        })
    }
}

fn infer(path: &Path, format: TableFormat, bytes: &[u8]) -> Result<SchemaRef> {
    let located = |e: arrow::error::ArrowError| {
        ConnectorError::config("table.path", format!("{}: {e}", path.display()))
    };
    Ok(Arc::new(match format {
        TableFormat::Csv => {
            arrow::csv::reader::Format::default()
                .with_header(true)
                .infer_schema(bytes, Some(1000))
                .map_err(located)?
                .0
        }
        TableFormat::Json => {
            let text = json_lines(bytes);
            arrow::json::reader::infer_json_schema(text.as_slice(), Some(1000))
                .map_err(located)?
                .0
        }
    }))
}

/// JSON lines, whether the file holds lines or one array.
fn json_lines(bytes: &[u8]) -> Vec<u8> {
    let trimmed = bytes.trim_ascii_start();
    if trimmed.first() == Some(&b'[') {
        if let Ok(serde_json::Value::Array(items)) = serde_json::from_slice(trimmed) {
            let mut out = Vec::new();
            for i in items {
                out.extend_from_slice(i.to_string().as_bytes());
                out.push(b'\n');
            }
            return out;
        }
    }
    bytes.to_vec()
}

fn parse(
    path: &Path,
    format: TableFormat,
    schema: &SchemaRef,
    bytes: &[u8],
) -> Result<Vec<RecordBatch>> {
    match format {
        TableFormat::Csv => {
            let reader = arrow::csv::ReaderBuilder::new(schema.clone())
                .with_header(true)
                .build(bytes)?;
            reader.collect::<Result<Vec<_>, _>>().map_err(|e| {
                ConnectorError::config("table.path", format!("{}: {e}", path.display()))
            })
        }
        TableFormat::Json => {
            let text = json_lines(bytes);
            let mut decoder = arrow::json::ReaderBuilder::new(schema.clone()).build_decoder()?;
            let mut out = Vec::new();
            // Line by line, so an error names its line.
            for (n, line) in text.split(|b| *b == b'\n').enumerate() {
                if line.trim_ascii().is_empty() {
                    continue;
                }
                decoder
                    .decode(line)
                    .and_then(|_| decoder.decode(b"\n"))
                    .map_err(|e| {
                        ConnectorError::config(
                            "table.path",
                            format!("{}:{}: {e}", path.display(), n + 1),
                        )
                    })?;
                if let Some(b) = decoder.flush()? {
                    out.push(b);
                }
            }
            Ok(out)
        }
    }
}

impl TableFeed for FileFeed {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn load(&mut self) -> vigil_engine::Result<Vec<TableUpdate>> {
        let batches = match self.initial.take() {
            Some(b) => b,
            None => parse(
                &self.path,
                self.format,
                &self.schema,
                &read_file(&self.path)?,
            )?,
        };
        Ok(vec![TableUpdate::Replace(batches)])
    }

    fn poll(&mut self, now_ms: i64) -> vigil_engine::Result<Vec<TableUpdate>> {
        if now_ms < self.next_check {
            return Ok(Vec::new());
        }
        self.next_check = now_ms.saturating_add(self.every_ms);
        let stamp = modified(&self.path);
        if stamp == self.modified {
            return Ok(Vec::new());
        }
        let parsed = read_file(&self.path)
            .and_then(|bytes| parse(&self.path, self.format, &self.schema, &bytes));
        match parsed {
            Ok(batches) => {
                self.modified = stamp;
                tracing::info!(path = %self.path.display(), rows = batches.iter().map(|b| b.num_rows()).sum::<usize>(), "lookup table reloaded");
                Ok(vec![TableUpdate::Replace(batches)])
            }
            Err(e) => {
                // Keep the table that works; try again when the file changes.
                self.modified = stamp;
                tracing::warn!(path = %self.path.display(), error = %e, "lookup table not reloaded");
                Ok(Vec::new())
            }
        }
    }

    fn describe(&self) -> String {
        format!("file {}", self.path.display())
    }
}

/// A table kept from a compacted topic.
pub struct KafkaFeed {
    config: ClientConfig,
    consumer: Option<BaseConsumer>,
    topic: String,
    schema: SchemaRef,
    key_col: usize,
    tenant: Option<usize>,
    /// Message key → the row's (tenant, key), for tombstones.
    owners: HashMap<Vec<u8>, (Option<String>, String)>,
    timeout: Duration,
}

fn kafka_error(e: rdkafka::error::KafkaError) -> EngineError {
    EngineError::User(format!("lookup table topic: {e}"))
}

impl KafkaFeed {
    /// Decodes and applies what is waiting, at most `budget` messages.
    fn drain(
        &mut self,
        wait: Duration,
        budget: usize,
    ) -> vigil_engine::Result<(Vec<TableUpdate>, usize)> {
        let Some(consumer) = &self.consumer else {
            return Ok((Vec::new(), 0));
        };
        // Messages as they came: runs of upserts and runs of tombstones, in
        // order, so a key deleted and then set again ends up set.
        let mut runs: Vec<Run> = Vec::new();
        let mut seen = 0;
        let mut first = true;
        while seen < budget {
            let m = match consumer.poll(if first { wait } else { Duration::ZERO }) {
                None => break,
                Some(m) => m.map_err(kafka_error)?,
            };
            first = false;
            seen += 1;
            let key = m.key().unwrap_or_default().to_vec();
            let at = (m.partition(), m.offset());
            match m.payload() {
                None => {
                    if !matches!(runs.last(), Some(Run::Deletes(_))) {
                        runs.push(Run::Deletes(Vec::new()));
                    }
                    if let Some(Run::Deletes(d)) = runs.last_mut() {
                        d.push(key);
                    }
                }
                Some(v) => {
                    if !matches!(runs.last(), Some(Run::Upserts(_))) {
                        runs.push(Run::Upserts(Vec::new()));
                    }
                    if let Some(Run::Upserts(u)) = runs.last_mut() {
                        u.push((key, v.to_vec(), at));
                    }
                }
            }
        }
        let mut updates = Vec::with_capacity(runs.len());
        for run in runs {
            match run {
                Run::Deletes(keys) => {
                    let owners = keys
                        .into_iter()
                        .map(|k| {
                            self.owners
                                .remove(&k)
                                .unwrap_or_else(|| (None, String::from_utf8_lossy(&k).into_owned()))
                        })
                        .collect();
                    updates.push(TableUpdate::Delete(owners));
                }
                Run::Upserts(records) => {
                    if let Some(batch) = self.decode(records)? {
                        updates.push(TableUpdate::Upsert(batch));
                    }
                }
            }
        }
        Ok((updates, seen))
    }

    /// Decodes upserts into one batch; a record that does not decode is
    /// skipped with a warning naming it. Records go one at a time (a table's
    /// updates are few), so a bad one costs only itself.
    fn decode(&mut self, records: Vec<Upsert>) -> vigil_engine::Result<Option<RecordBatch>> {
        let builder = || arrow::json::ReaderBuilder::new(self.schema.clone()).build_decoder();
        let mut decoder = builder().map_err(EngineError::Arrow)?;
        let mut keys = Vec::with_capacity(records.len());
        let mut rows = Vec::with_capacity(records.len());
        for (key, value, (partition, offset)) in records {
            let is_object = serde_json::from_slice::<serde_json::Value>(&value)
                .map(|j| j.is_object())
                .unwrap_or(false);
            let row = if is_object {
                decoder
                    .decode(&value)
                    .and_then(|_| decoder.flush())
                    .ok()
                    .flatten()
            } else {
                None
            };
            match row {
                Some(r) if r.num_rows() == 1 => {
                    rows.push(r);
                    keys.push(key);
                }
                _ => {
                    tracing::trace!(topic = %self.topic, partition, offset, "lookup table record skipped: its value is not a JSON object of the declared fields");
                    decoder = builder().map_err(EngineError::Arrow)?;
                }
            }
        }
        if rows.is_empty() {
            return Ok(None);
        }
        let batch = arrow::compute::concat_batches(&self.schema, &rows)?;
        let k = cast(batch.column(self.key_col), &DataType::Utf8)?;
        let k = k.as_string::<i32>();
        let t = match self.tenant {
            Some(t) => Some(cast(batch.column(t), &DataType::Utf8)?),
            None => None,
        };
        for (i, mk) in keys.into_iter().enumerate() {
            if k.is_valid(i) {
                let tenant = t
                    .as_ref()
                    .map(|t| t.as_string::<i32>())
                    .filter(|t| t.is_valid(i))
                    .map(|t| t.value(i).to_string());
                self.owners.insert(mk, (tenant, k.value(i).to_string()));
            }
        }
        Ok(Some(batch))
    }
}

/// A record with a value: message key, value, (partition, offset).
type Upsert = (Vec<u8>, Vec<u8>, (i32, i64));

/// Consecutive messages of one kind.
enum Run {
    Upserts(Vec<Upsert>),
    Deletes(Vec<Vec<u8>>),
}

impl TableFeed for KafkaFeed {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn load(&mut self) -> vigil_engine::Result<Vec<TableUpdate>> {
        let consumer: BaseConsumer = self.config.create().map_err(kafka_error)?;
        let timeout = self.timeout;
        let metadata = consumer
            .fetch_metadata(Some(&self.topic), timeout)
            .map_err(kafka_error)?;
        let partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        if partitions.is_empty() {
            return Err(EngineError::User(format!(
                "lookup table topic {:?} has no partitions",
                self.topic
            )));
        }
        let mut ends = HashMap::new();
        let mut list = TopicPartitionList::new();
        for &p in &partitions {
            let (_, high) = consumer
                .fetch_watermarks(&self.topic, p, timeout)
                .map_err(kafka_error)?;
            ends.insert(p, high);
            list.add_partition_offset(&self.topic, p, Offset::Beginning)
                .map_err(kafka_error)?;
        }
        consumer.assign(&list).map_err(kafka_error)?;
        self.consumer = Some(consumer);
        // Read to the end the topic had when we started.
        let mut updates = Vec::new();
        let mut idle = Duration::ZERO;
        loop {
            let caught_up = {
                let Some(c) = &self.consumer else { break };
                let pos = c.position().map_err(kafka_error)?;
                ends.iter().all(|(p, high)| {
                    *high == 0
                        || matches!(
                            pos.find_partition(&self.topic, *p).map(|e| e.offset()),
                            Some(Offset::Offset(o)) if o >= *high
                        )
                })
            };
            if caught_up {
                break;
            }
            if idle > timeout {
                return Err(EngineError::User(format!(
                    "lookup table topic {:?}: not read to its end, nothing arrived for {}",
                    self.topic,
                    humantime::format_duration(timeout)
                )));
            }
            let (u, n) = self.drain(Duration::from_millis(100), 10_000)?;
            if n == 0 {
                idle += Duration::from_millis(100);
            } else {
                idle = Duration::ZERO;
            }
            updates.extend(u);
        }
        Ok(updates)
    }

    fn poll(&mut self, _now_ms: i64) -> vigil_engine::Result<Vec<TableUpdate>> {
        Ok(self.drain(Duration::ZERO, 10_000)?.0)
    }

    fn describe(&self) -> String {
        format!("kafka topic {}", self.topic)
    }
}

#[cfg(test)]
mod tests {
    //! The file feed: read at planning, read again when the file changes,
    //! and a bad version never replaces a good one.

    use std::time::{Duration, SystemTime};

    use vigil_engine::{TableFeed, TableUpdate};

    use super::{FileFeed, TableFormat};

    fn rows(updates: &[TableUpdate]) -> Vec<usize> {
        updates
            .iter()
            .map(|u| match u {
                TableUpdate::Replace(b) => b.iter().map(|b| b.num_rows()).sum(),
                _ => panic!("a file replaces its table"),
            })
            .collect()
    }

    /// Sets the file's modification time, so a change is seen whatever the
    /// file system's timestamp resolution.
    fn touch(path: &std::path::Path, secs: u64) {
        let f = std::fs::File::options()
            .write(true)
            .open(path)
            .expect("open");
        f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
            .expect("set mtime");
    }

    #[test]
    fn a_file_table_reloads_when_it_changes_and_keeps_the_last_good_version() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("assets.json");
        std::fs::write(&path, "{\"host\":\"db1\",\"owner\":\"alice\"}\n").expect("write");
        touch(&path, 1_000);
        let mut feed = FileFeed::open(&path, TableFormat::Json, None, "host", None).expect("open");
        assert_eq!(rows(&feed.load().expect("load")), vec![1]);
        assert!(feed.poll(0).expect("poll").is_empty(), "unchanged");

        // A second version, seen on the next check (every 10 s by default).
        std::fs::write(
            &path,
            "[{\"host\":\"db1\",\"owner\":\"alice\"},{\"host\":\"web\",\"owner\":\"bob\"}]",
        )
        .expect("write");
        touch(&path, 2_000);
        assert!(feed.poll(5_000).expect("poll").is_empty(), "not due yet");
        assert_eq!(rows(&feed.poll(10_000).expect("poll")), vec![2]);

        // A broken version is not applied; the next good one is.
        std::fs::write(&path, "{\"host\": \n").expect("write");
        touch(&path, 3_000);
        assert!(
            feed.poll(20_000).expect("poll").is_empty(),
            "kept the last good table"
        );
        std::fs::write(&path, "{\"host\":\"mail\",\"owner\":\"carol\"}\n").expect("write");
        touch(&path, 4_000);
        assert_eq!(rows(&feed.poll(30_000).expect("poll")), vec![1]);
    }

    #[test]
    fn a_malformed_file_is_refused_naming_file_and_line() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("intel.json");
        std::fs::write(&path, "{\"ip\":\"10.0.0.1\"}\n{\"ip\": [}\n").expect("write");
        let schema = std::sync::Arc::new(arrow::datatypes::Schema::new(vec![
            arrow::datatypes::Field::new("ip", arrow::datatypes::DataType::Utf8, true),
        ]));
        let e = FileFeed::open(&path, TableFormat::Json, Some(schema), "ip", None)
            .err()
            .expect("refused");
        let message = e.to_string();
        assert!(message.contains("intel.json:2:"), "{message}");
    }
}
