//! Files: a JSON / NDJSON source (gzip too) and an NDJSON sink.

mod config;
mod sink;
mod source;

pub use config::{
    flattened, EventTimeConfig, FileFormat, FileSinkConfig, FileSourceConfig, PathList,
    ResolvedSchema, SchemaConfig,
};
pub use sink::FileSinkFactory;
pub use source::FileSourceFactory;

#[cfg(test)]
mod tests;
