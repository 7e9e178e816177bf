//! Who reads what: the members of a pipeline's consumer group, the
//! partitions each owns, and how far each partition's committed position is
//! behind its end.
//!
//! Read from Kafka itself (the group coordinator's description of the group,
//! the committed offsets, the partitions' ends) rather than from the
//! processes: the group is the one place that knows every member, including
//! those on other machines, and it answers even when a process is stuck.
//! This is what `vigil status` prints.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;

use super::source::definition_of;
use crate::error::{ConnectorError, Result};

/// The state of one source's consumer group.
#[derive(Debug, Clone, Serialize)]
pub struct GroupStatus {
    /// The group.
    pub group: String,
    /// The coordinator's state of it (`Stable`, `PreparingRebalance`, …).
    pub state: String,
    /// Its members.
    pub members: Vec<MemberStatus>,
    /// Partitions of the source's topics that no member owns.
    pub unassigned: Vec<PartitionStatus>,
}

/// One member of the group: a consumer of one subtask of some process.
#[derive(Debug, Clone, Serialize)]
pub struct MemberStatus {
    /// Member id given by the coordinator.
    pub member: String,
    /// Its client id (`vigil.<definition>.<source>` for Vigil).
    pub client_id: String,
    /// Host it connects from.
    pub host: String,
    /// Definition fingerprint, for Vigil members.
    pub definition: Option<String>,
    /// Partitions it owns.
    pub partitions: Vec<PartitionStatus>,
}

/// One partition's position.
#[derive(Debug, Clone, Serialize)]
pub struct PartitionStatus {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// The group's committed offset, if any.
    pub committed: Option<i64>,
    /// The partition's end (high watermark).
    pub end: Option<i64>,
    /// `end - committed` (the whole partition when nothing is committed).
    pub lag: Option<i64>,
}

/// Reads the status of `group` over `topics` with a consumer built from
/// `config` (which is not subscribed, so it does not join the group).
pub(crate) fn read(
    consumer: &BaseConsumer,
    group: &str,
    topics: &[String],
    timeout: Duration,
) -> Result<GroupStatus> {
    let io = |what: &str, e: rdkafka::error::KafkaError| ConnectorError::Io {
        path: format!("kafka group {group}"),
        source: std::io::Error::other(format!("{what}: {e}")),
    };
    let groups = consumer
        .fetch_group_list(Some(group), timeout)
        .map_err(|e| io("cannot describe the consumer group", e))?;
    let info = groups.groups().iter().find(|g| g.name() == group);
    let mut all = TopicPartitionList::new();
    let metadata = consumer
        .fetch_metadata(None, timeout)
        .map_err(|e| io("cannot read topic metadata", e))?;
    for t in metadata.topics() {
        if topics.iter().any(|x| x == t.name()) {
            for p in t.partitions() {
                all.add_partition(t.name(), p.id());
            }
        }
    }
    let committed = consumer
        .committed_offsets(all.clone(), timeout)
        .map_err(|e| io("cannot read committed offsets", e))?;
    let position = |topic: &str, partition: i32| -> PartitionStatus {
        let committed = committed
            .find_partition(topic, partition)
            .and_then(|e| match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            });
        let end = consumer
            .fetch_watermarks(topic, partition, timeout)
            .ok()
            .map(|(_, high)| high);
        PartitionStatus {
            topic: topic.to_string(),
            partition,
            committed,
            end,
            lag: end.map(|e| (e - committed.unwrap_or(0)).max(0)),
        }
    };
    let mut owned = std::collections::HashSet::new();
    let mut members = Vec::new();
    for m in info.map(|g| g.members()).unwrap_or_default() {
        let mut partitions = Vec::new();
        for (topic, partition) in m.assignment().map(assignment).unwrap_or_default() {
            if topics.contains(&topic) {
                owned.insert((topic.clone(), partition));
                partitions.push(position(&topic, partition));
            }
        }
        partitions.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        members.push(MemberStatus {
            member: m.id().to_string(),
            client_id: m.client_id().to_string(),
            host: m.client_host().trim_start_matches('/').to_string(),
            definition: definition_of(m.client_id()).map(str::to_string),
            partitions,
        });
    }
    members.sort_by(|a, b| (&a.client_id, &a.member).cmp(&(&b.client_id, &b.member)));
    let mut unassigned: Vec<PartitionStatus> = all
        .elements()
        .iter()
        .filter(|e| !owned.contains(&(e.topic().to_string(), e.partition())))
        .map(|e| position(e.topic(), e.partition()))
        .collect();
    unassigned.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
    Ok(GroupStatus {
        group: group.to_string(),
        state: info.map(|g| g.state().to_string()).unwrap_or_default(),
        members,
        unassigned,
    })
}

/// Decodes a member's assignment (Kafka's `ConsumerProtocolAssignment`:
/// version, then topics with their partitions); malformed bytes yield what
/// could be read.
pub fn assignment(bytes: &[u8]) -> Vec<(String, i32)> {
    let mut r = Reader { bytes, at: 0 };
    let mut out = Vec::new();
    let (Some(_version), Some(topics)) = (r.i16(), r.i32()) else {
        return out;
    };
    for _ in 0..topics.max(0) {
        let Some(topic) = r.string() else { break };
        let Some(n) = r.i32() else { break };
        for _ in 0..n.max(0) {
            let Some(p) = r.i32() else { return out };
            out.push((topic.clone(), p));
        }
    }
    out
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let s = self.bytes.get(self.at..self.at + n)?;
        self.at += n;
        Some(s)
    }
    fn i16(&mut self) -> Option<i16> {
        Some(i16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }
    fn i32(&mut self) -> Option<i32> {
        Some(i32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
    fn string(&mut self) -> Option<String> {
        let n = self.i16()?;
        let s = self.take(usize::try_from(n).ok()?)?;
        Some(String::from_utf8_lossy(s).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignment_bytes_decode_to_partitions() {
        let mut b = vec![0, 1, 0, 0, 0, 2];
        for (t, ps) in [("logins", vec![0i32, 2]), ("dns", vec![1])] {
            b.extend_from_slice(&(t.len() as i16).to_be_bytes());
            b.extend_from_slice(t.as_bytes());
            b.extend_from_slice(&(ps.len() as i32).to_be_bytes());
            for p in ps {
                b.extend_from_slice(&p.to_be_bytes());
            }
        }
        b.extend_from_slice(&(-1i32).to_be_bytes());
        assert_eq!(
            assignment(&b),
            vec![
                ("logins".to_string(), 0),
                ("logins".to_string(), 2),
                ("dns".to_string(), 1)
            ]
        );
        // Truncated bytes give what was there, never a panic.
        assert_eq!(assignment(&b[..12]), vec![]);
        assert_eq!(assignment(&[]), vec![]);
    }
}
