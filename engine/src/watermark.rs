//! Event-time watermarks: where they are made and how they merge.
//!
//! A watermark is a promise: "no record older than *t* follows". Vigil makes
//! watermarks **per source partition** (a Kafka partition, a file, a generator
//! stream), because order only holds within a partition, and merges them at
//! every step downstream by taking the **minimum over active inputs**.
//!
//! Three rules shape this module:
//!
//! * **Bounded out-of-orderness.** A partition's watermark trails the largest
//!   event time it has seen by a fixed delay ([`BoundedOutOfOrderness`]):
//!   real sensors (Zeek stamps a connection at its start and writes it at its
//!   end) deliver records minutes out of order.
//! * **Idleness.** A partition that has sent nothing for its idle timeout is
//!   excluded from the minimum, so one quiet partition cannot stall every
//!   window downstream. Time is read from an injected [`Clock`](crate::Clock),
//!   never from the system, so this is testable. When every input is idle the
//!   merged result is [`Watermark::Idle`], which downstream steps treat the same way.
//! * **Monotonicity.** A merged watermark never goes back, even when an idle
//!   input returns with an older one: records behind the watermark are then
//!   late, and operators count and route them as such.
//!
//! "Nothing yet" is a state too: an input that has never produced a watermark
//! and is not idle holds the merged watermark back, because it may still send
//! old records. So does a subtask whose partitions come from a consumer group
//! before the group's first assignment (or its idle timeout): the partitions
//! it is about to get may hold the oldest records. Once the assignment has
//! come, a subtask given none is idle at once.

use crate::message::{EventTime, Watermark};

/// How a source's watermarks are made: set per source node by whoever builds
/// the graph (the pipeline file's `watermark:`), not by the connector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatermarkSpec {
    /// Records may be this far out of order, in ms.
    pub out_of_orderness_ms: i64,
    /// A partition silent this long no longer holds the watermark back, in ms.
    pub idle_timeout_ms: i64,
}

impl Default for WatermarkSpec {
    fn default() -> Self {
        Self {
            out_of_orderness_ms: 0,
            idle_timeout_ms: 30_000,
        }
    }
}

/// Watermark of one stream: the largest event time seen minus a fixed delay.
#[derive(Debug, Clone)]
pub struct BoundedOutOfOrderness {
    delay_ms: i64,
    max_seen: Option<EventTime>,
}

impl BoundedOutOfOrderness {
    /// A generator tolerating records up to `delay_ms` out of order.
    pub fn new(delay_ms: i64) -> Self {
        Self {
            delay_ms,
            max_seen: None,
        }
    }

    /// Records that a record (or batch) with largest event time `max_ts` was seen.
    pub fn observe(&mut self, max_ts: EventTime) {
        self.max_seen = Some(self.max_seen.map_or(max_ts, |m| m.max(max_ts)));
    }

    /// The current watermark, if any record was seen.
    pub fn current(&self) -> Option<EventTime> {
        self.max_seen.map(|m| m.saturating_sub(self.delay_ms))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PartitionState {
    Active,
    /// Given to another reader: excluded, but the stream goes on.
    Revoked,
    Finished,
}

#[derive(Debug, Clone)]
struct PartitionTrack {
    generator: BoundedOutOfOrderness,
    /// The watermark the source announced for the partition, which then
    /// overrides the one derived from event times (a repartition topic's
    /// partition carries its writers' watermarks).
    announced: Option<EventTime>,
    last_activity_ms: i64,
    state: PartitionState,
    /// Excluded as idle at the last poll.
    idle: bool,
}

/// The watermarks of the partitions one source subtask reads, merged.
///
/// Feed it what the partitions deliver ([`observe`](Self::observe)) and ask it
/// for the watermark to send ([`poll`](Self::poll)); it answers only when the
/// merged watermark moved or the source turned idle.
#[derive(Debug, Clone)]
pub struct PartitionWatermarks {
    partitions: Vec<PartitionTrack>,
    delay_ms: i64,
    idle_timeout_ms: i64,
    last_emitted: Option<Watermark>,
    last_event_time: Option<EventTime>,
    /// Partitions that turned idle since [`Self::take_went_idle`].
    went_idle: Vec<usize>,
    /// Partitions are held at their announcements only, never at their
    /// records' event times.
    announced_only: bool,
    /// Waiting, since this time, for a group's first assignment.
    awaiting: Option<i64>,
    started_ms: i64,
}

impl PartitionWatermarks {
    /// Tracks `partitions` partitions, each with the given out-of-orderness
    /// delay, counting idleness from `now_ms`.
    pub fn new(partitions: usize, delay_ms: i64, idle_timeout_ms: i64, now_ms: i64) -> Self {
        Self {
            delay_ms,
            partitions: (0..partitions)
                .map(|_| PartitionTrack {
                    generator: BoundedOutOfOrderness::new(delay_ms),
                    announced: None,
                    last_activity_ms: now_ms,
                    state: PartitionState::Active,
                    idle: false,
                })
                .collect(),
            idle_timeout_ms,
            last_emitted: None,
            last_event_time: None,
            went_idle: Vec::new(),
            announced_only: false,
            awaiting: None,
            started_ms: now_ms,
        }
    }

    /// The partitions come from a consumer group: without any, the
    /// subtask holds the watermark back until the group's first
    /// assignment has come ([`Self::assignment_came`]), however empty, or
    /// until its idle timeout has passed.
    pub fn awaiting_assignment(mut self) -> Self {
        self.awaiting = Some(self.started_ms);
        self
    }

    /// The group's assignment has come.
    pub fn assignment_came(&mut self) {
        self.awaiting = None;
    }

    /// Holds each partition at what the source announces for it
    /// ([`Self::announce`]) and never at its records' event times: until
    /// its first announcement, a partition that is not idle holds the
    /// watermark back. For sources whose rows are in no event-time order
    /// (a repartition topic).
    pub fn announced_only(mut self) -> Self {
        self.announced_only = true;
        self
    }

    /// Number of partitions tracked.
    pub fn len(&self) -> usize {
        self.partitions.len()
    }

    /// Partitions read now (neither revoked nor finished).
    pub fn active(&self) -> usize {
        self.partitions
            .iter()
            .filter(|t| t.state == PartitionState::Active)
            .count()
    }

    /// True when no partition is tracked.
    pub fn is_empty(&self) -> bool {
        self.partitions.is_empty()
    }

    /// Partition `p` delivered records whose largest event time is `max_ts`.
    pub fn observe(&mut self, p: usize, max_ts: EventTime, now_ms: i64) {
        if let Some(t) = self.partitions.get_mut(p) {
            t.generator.observe(max_ts);
            t.last_activity_ms = now_ms;
        }
    }

    /// The source announced watermark `w` for partition `p`: from now on the
    /// partition is held at its announcements (never moving back), not at
    /// its records' event times.
    pub fn announce(&mut self, p: usize, w: EventTime, now_ms: i64) {
        if let Some(t) = self.partitions.get_mut(p) {
            t.announced = Some(t.announced.map_or(w, |a| a.max(w)));
            t.last_activity_ms = now_ms;
        }
    }

    /// Partition `p` delivered something without event times (keeps it active).
    pub fn touch(&mut self, p: usize, now_ms: i64) {
        if let Some(t) = self.partitions.get_mut(p) {
            t.last_activity_ms = now_ms;
        }
    }

    /// Partition `p` is read from now on (indices past the end grow the set).
    pub fn assign(&mut self, p: usize, now_ms: i64) {
        while self.partitions.len() <= p {
            self.partitions.push(PartitionTrack {
                generator: BoundedOutOfOrderness::new(self.delay_ms),
                announced: None,
                last_activity_ms: now_ms,
                state: PartitionState::Revoked,
                idle: false,
            });
        }
        let t = &mut self.partitions[p];
        t.state = PartitionState::Active;
        t.last_activity_ms = now_ms;
    }

    /// Partition `p` is no longer read here: it stops holding the watermark
    /// back, without ending the stream.
    pub fn revoke(&mut self, p: usize) {
        if let Some(t) = self.partitions.get_mut(p) {
            t.state = PartitionState::Revoked;
        }
    }

    /// Partition `p` has ended (a file read to its end): it no longer holds
    /// the watermark back.
    pub fn finish(&mut self, p: usize) {
        if let Some(t) = self.partitions.get_mut(p) {
            t.state = PartitionState::Finished;
        }
    }

    /// True when every partition has ended (never for a subtask without
    /// partitions: it may be assigned some).
    pub fn all_finished(&self) -> bool {
        !self.partitions.is_empty()
            && self
                .partitions
                .iter()
                .all(|t| t.state == PartitionState::Finished)
    }

    /// The last event-time watermark handed out, if any.
    pub fn current(&self) -> Option<EventTime> {
        self.last_event_time
    }

    /// The watermark to send now, if it differs from the last one sent.
    ///
    /// When every partition has finished this is `EventTime(i64::MAX)`: a
    /// finished stream closes every window.
    pub fn poll(&mut self, now_ms: i64) -> Option<Watermark> {
        let mut min: Option<EventTime> = None;
        let mut any_active = false;
        let mut blocked = false;
        let mut all_finished = true;
        for (p, t) in self.partitions.iter_mut().enumerate() {
            if t.state == PartitionState::Finished {
                continue;
            }
            all_finished = false;
            if t.state == PartitionState::Revoked {
                continue;
            }
            let idle = now_ms.saturating_sub(t.last_activity_ms) >= self.idle_timeout_ms;
            if idle != t.idle {
                t.idle = idle;
                if idle {
                    self.went_idle.push(p);
                }
            }
            if idle {
                continue; // excluded
            }
            any_active = true;
            let derived = if self.announced_only {
                None
            } else {
                t.generator.current()
            };
            match t.announced.or(derived) {
                Some(w) => min = Some(min.map_or(w, |m| m.min(w))),
                None => blocked = true,
            }
        }
        if let Some(since) = self.awaiting {
            if !self.partitions.is_empty() || now_ms.saturating_sub(since) >= self.idle_timeout_ms {
                self.awaiting = None;
            } else {
                return None;
            }
        }
        let next = if all_finished && !self.partitions.is_empty() {
            Watermark::EventTime(EventTime::MAX)
        } else if !any_active {
            Watermark::Idle
        } else if blocked {
            return None;
        } else {
            let w = min?;
            Watermark::EventTime(self.last_event_time.map_or(w, |l| l.max(w)))
        };
        self.emit_if_changed(next)
    }

    /// Partitions that turned idle (and stopped holding the watermark
    /// back) since the last call: worth a log line, because rows they
    /// deliver later than the others' watermark are late.
    pub fn take_went_idle(&mut self) -> Vec<usize> {
        std::mem::take(&mut self.went_idle)
    }

    fn emit_if_changed(&mut self, next: Watermark) -> Option<Watermark> {
        if self.last_emitted == Some(next) {
            return None;
        }
        if let Watermark::EventTime(w) = next {
            if self.last_event_time.is_some_and(|l| l >= w)
                && self.last_emitted != Some(Watermark::Idle)
            {
                return None;
            }
            self.last_event_time = Some(w);
        }
        self.last_emitted = Some(next);
        Some(next)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InputState {
    /// No watermark yet.
    Waiting,
    At(EventTime),
    Idle(Option<EventTime>),
    Finished,
}

/// Merges the watermarks arriving on an operator's input edges.
///
/// The merged watermark is the minimum over inputs that are neither idle nor
/// finished; it is `Idle` when every unfinished input is idle, and it never
/// decreases.
#[derive(Debug, Clone)]
pub struct InputWatermarks {
    inputs: Vec<InputState>,
    last_emitted: Option<Watermark>,
    last_event_time: Option<EventTime>,
}

impl InputWatermarks {
    /// Tracks `inputs` input edges.
    pub fn new(inputs: usize) -> Self {
        Self {
            inputs: vec![InputState::Waiting; inputs],
            last_emitted: None,
            last_event_time: None,
        }
    }

    /// The merged event-time watermark last produced, if any.
    pub fn current(&self) -> Option<EventTime> {
        self.last_event_time
    }

    /// Input `i` sent watermark `w`; returns the new merged watermark if it changed.
    pub fn update(&mut self, i: usize, w: Watermark) -> Option<Watermark> {
        let slot = self.inputs.get_mut(i)?;
        *slot = match (w, *slot) {
            (_, InputState::Finished) => InputState::Finished,
            (Watermark::EventTime(t), InputState::At(prev)) => InputState::At(prev.max(t)),
            (Watermark::EventTime(t), InputState::Idle(Some(prev))) => InputState::At(prev.max(t)),
            (Watermark::EventTime(t), _) => InputState::At(t),
            (Watermark::Idle, InputState::At(prev)) => InputState::Idle(Some(prev)),
            (Watermark::Idle, InputState::Idle(prev)) => InputState::Idle(prev),
            (Watermark::Idle, InputState::Waiting) => InputState::Idle(None),
        };
        self.merge()
    }

    /// Input `i` ended; returns the new merged watermark if it changed.
    pub fn finish(&mut self, i: usize) -> Option<Watermark> {
        if let Some(slot) = self.inputs.get_mut(i) {
            *slot = InputState::Finished;
        }
        self.merge()
    }

    fn merge(&mut self) -> Option<Watermark> {
        let mut min: Option<EventTime> = None;
        let mut any_active = false;
        let mut any_idle = false;
        for s in &self.inputs {
            match s {
                InputState::Waiting => return None,
                InputState::At(t) => {
                    any_active = true;
                    min = Some(min.map_or(*t, |m| m.min(*t)));
                }
                InputState::Idle(_) => any_idle = true,
                InputState::Finished => {}
            }
        }
        let next = if any_active {
            let w = min?;
            Watermark::EventTime(self.last_event_time.map_or(w, |l| l.max(w)))
        } else if any_idle {
            Watermark::Idle
        } else {
            // Every input finished: nothing can be late any more.
            Watermark::EventTime(EventTime::MAX)
        };
        if self.last_emitted == Some(next) {
            return None;
        }
        if let Watermark::EventTime(w) = next {
            if self.last_event_time == Some(w) && self.last_emitted != Some(Watermark::Idle) {
                return None;
            }
            self.last_event_time = Some(w);
        }
        self.last_emitted = Some(next);
        Some(next)
    }
}

#[cfg(test)]
mod tests;
