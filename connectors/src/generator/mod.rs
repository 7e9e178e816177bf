//! A security telemetry generator that produces Arrow batches directly.
//!
//! Three streams, with the fields detections key on: authentication
//! (`auth`: user, source IP, host, method, outcome), network flows
//! (`network`), and process starts (`process`). Background traffic is
//! realistic enough to be quiet (users log in from their own address to
//! their own machines and rarely fail), and attack scenarios can be injected on
//! a schedule: a brute force from one address against one user, a password
//! spray from one address across many users, lateral movement of one account
//! across many hosts. Because everything derives from the seed, the
//! scenarios' ground truth is known ([`GeneratorSourceFactory::ground_truth`]), which
//! is what end-to-end tests of detections assert against.
//!
//! Output is deterministic for a given seed and partition count, whatever the
//! parallelism or the speed of the machine: event time follows a nominal
//! `event_rate`, not the wall clock. Strings are dictionary-encoded over
//! shared value arrays, so a batch costs a few integer arrays to build; that is
//! what lets the generator feed benchmarks at tens of millions of events per
//! second.

mod config;
mod scenario;
mod source;
mod world;

pub use config::{AttackConfig, AttackKind, GeneratorConfig, Stream};
pub use scenario::InjectedAttack;
pub use source::GeneratorSourceFactory;

#[cfg(test)]
mod tests;
