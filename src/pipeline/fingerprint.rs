//! The fingerprint of a pipeline's definition: what tells two processes of
//! the same pipeline name whether they run the same pipeline.
//!
//! Processes that share a name share a consumer group, and so each other's
//! partitions and state. If two of them ran different definitions (an
//! upgrade half rolled out, a copy-pasted name), records of one key would be
//! counted by two different windows, and state written by one would be
//! restored into the other. Every Kafka consumer of a pipeline therefore
//! carries the fingerprint in its client id, and a newcomer refuses to start
//! while a member of its group carries another one (see the Kafka source).
//!
//! The fingerprint hashes the parsed file, not its text: comments, layout
//! and key order do not change it. Two kinds of keys are left out because
//! they are legitimately set per process: `parallelism` (each process runs
//! its share with its own local parallelism) and `properties` (client
//! settings such as credentials and timeouts, which may differ per machine
//! and must not be hashed into an id that brokers log).

use marked_yaml::Node;

/// Keys that do not change what the pipeline computes.
const PER_PROCESS: &[&str] = &["parallelism", "properties"];

/// A short, stable hex fingerprint of the pipeline tree `root`.
pub fn of(root: &Node) -> String {
    let mut canonical = String::new();
    write(root, &mut canonical);
    let id = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, canonical.as_bytes());
    id.simple().to_string()[..12].to_string()
}

/// Writes `node` in a canonical form: mappings sorted by key, scalars quoted.
fn write(node: &Node, out: &mut String) {
    match node {
        Node::Scalar(s) => {
            out.push_str(&format!("{:?}", s.as_str()));
        }
        Node::Sequence(items) => {
            out.push('[');
            for item in items.iter() {
                write(item, out);
                out.push(',');
            }
            out.push(']');
        }
        Node::Mapping(map) => {
            let mut entries: Vec<(&str, &Node)> = map
                .iter()
                .map(|(k, v)| (k.as_str(), v))
                .filter(|(k, _)| !PER_PROCESS.contains(k))
                .collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (k, v) in entries {
                out.push_str(&format!("{k:?}:"));
                write(v, out);
                out.push(',');
            }
            out.push('}');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(text: &str) -> String {
        of(&crate::pipeline::yaml::parse("p.yaml", text).expect("yaml"))
    }

    #[test]
    fn layout_order_parallelism_and_properties_do_not_count() {
        let a = fp("name: p\nparallelism: 2\nsources:\n  s: { type: kafka, topics: [a], properties: { sasl.password: x } }\n");
        let b = fp("# same\nsources:\n  s:\n    topics: [a]\n    type: kafka\n    properties: { sasl.password: y }\nname: p\nparallelism: 4\n");
        assert_eq!(a, b);
        assert_eq!(a.len(), 12);
    }

    #[test]
    fn a_different_step_is_a_different_definition() {
        let a = fp("name: p\ntransforms:\n  w: { type: window, size: 1m }\n");
        let b = fp("name: p\ntransforms:\n  w: { type: window, size: 5m }\n");
        assert_ne!(a, b);
    }
}
