//! Joins of streams: interval joins of two streams on event time, and
//! lookup joins of a stream against a table that changes while it runs.
//!
//! * [`interval`]: `a JOIN b ON a.k = b.k AND b.ts BETWEEN a.ts - x AND
//!   a.ts + y`, inner or left outer. Both sides are buffered only while a row
//!   of the other side could still pair with them, so state follows the
//!   watermark instead of the stream's length.
//! * [`lookup`]: each row looks its key (an exact value, or an address inside
//!   a CIDR block) up in a table loaded from a file or a compacted Kafka
//!   topic; the table is replaced or updated in place as its source changes,
//!   and later rows see the new entries.
//!
//! Tenant isolation is part of the key: the planners add `tenant_id` to the
//! join key when both sides carry it, unless a rule says it is
//! cross-tenant.

pub mod interval;
pub mod lookup;

pub use interval::{IntervalJoin, IntervalJoinFactory, IntervalJoinSpec, JoinKind};
pub use lookup::{LookupJoin, LookupJoinFactory, LookupSpec, LookupTable, MatchMode};

#[cfg(test)]
mod tests;
