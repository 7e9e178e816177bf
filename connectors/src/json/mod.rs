//! JSON decoding straight into Arrow batches.
//!
//! Built on arrow-json's tape decoder, which turns NDJSON bytes into columns
//! without building a per-row value tree. A chunk of records is decoded in one
//! call; only when that fails is the chunk decoded again record by record, so
//! that each bad record is isolated, sent to the dead letters with its line
//! number and reason, and the good ones around it are kept. The slow path
//! costs nothing while the input is clean.

mod decoder;

pub use decoder::{JsonDecoder, RecordSpan};

#[cfg(test)]
mod tests;
