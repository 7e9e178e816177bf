//! YAML with locations: parsing, deserialising, and finding where a field is.

use marked_yaml::{LoadError, LoaderOptions, Node, Span};
use serde::de::DeserializeOwned;

use super::diagnostic::{did_you_mean, Diagnostic, Diagnostics, Location};

/// Location of a span's start.
pub fn loc(span: &Span) -> Option<Location> {
    span.start().map(|m| Location {
        line: m.line(),
        column: m.column(),
    })
}

/// Parses YAML text; duplicate keys are errors.
pub fn parse(file: &str, text: &str) -> Result<Node, Diagnostics> {
    let options = LoaderOptions::default().error_on_duplicate_keys(true);
    marked_yaml::parse_yaml_with_options(0, text, options).map_err(|e| {
        let (location, message) = match &e {
            LoadError::TopLevelMustBeMapping(m) => {
                (Some(*m), "a pipeline file must be a mapping".to_string())
            }
            LoadError::TopLevelMustBeSequence(m) => (Some(*m), "expected a sequence".to_string()),
            LoadError::UnexpectedAnchor(m) => (
                Some(*m),
                "YAML anchors and aliases are not supported".to_string(),
            ),
            LoadError::MappingKeyMustBeScalar(m) => {
                (Some(*m), "mapping keys must be plain strings".to_string())
            }
            LoadError::UnexpectedTag(m) => (Some(*m), "YAML tags are not supported".to_string()),
            LoadError::ScanError(m, s) => (Some(*m), format!("invalid YAML: {}", s.info())),
            LoadError::DuplicateKey(d) => (
                d.key.span().start().copied(),
                format!("key {:?} appears twice in the same mapping", d.key.as_str()),
            ),
        };
        let location = location.map(|m| Location {
            line: m.line(),
            column: m.column(),
        });
        Diagnostics::from(Diagnostic::new(file, location, message))
    })
}

/// Deserialises a node; `what` names it in messages ("transform \"x\"").
pub fn from_node<T: DeserializeOwned>(
    file: &str,
    node: &Node,
    what: &str,
) -> Result<T, Diagnostic> {
    marked_yaml::from_node::<T>(node).map_err(|e| {
        let location = e.start_mark().map(|m| Location {
            line: m.line(),
            column: m.column(),
        });
        let location = location.or_else(|| loc(node.span()));
        match &*e {
            marked_yaml::Error::UnknownFieldError(name, expected, _) => Diagnostic::new(
                file,
                find_key(node, name).or(location),
                format!("unknown field {name:?} in {what}"),
            )
            .hint(
                did_you_mean(name, expected.iter().copied())
                    .or_else(|| Some(format!("fields are: {}", expected.join(", ")))),
            ),
            other => Diagnostic::new(
                file,
                location,
                format!("{what}: {}", lower_first(&other.to_string())),
            ),
        }
    })
}

/// The location of the first key named `name` in `node` or below it.
fn find_key(node: &Node, name: &str) -> Option<Location> {
    match node {
        Node::Mapping(m) => m.iter().find_map(|(k, v)| {
            if k.as_str() == name {
                loc(k.span())
            } else {
                find_key(v, name)
            }
        }),
        Node::Sequence(s) => s.iter().find_map(|v| find_key(v, name)),
        Node::Scalar(_) => None,
    }
}

fn lower_first(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_lowercase().chain(c).collect(),
        None => String::new(),
    }
}

/// Where the field named by `path` (`schema.event_time.field`, `key[1]`) is,
/// below `node`; the deepest part of the path that exists if not all of it.
pub fn locate(node: &Node, path: &str) -> Option<Location> {
    let mut here = node;
    let mut found = loc(node.span());
    for seg in path.split('.').filter(|s| !s.is_empty()) {
        let (name, indices) = match seg.find('[') {
            Some(i) => (&seg[..i], &seg[i..]),
            None => (seg, ""),
        };
        if !name.is_empty() {
            let Some(map) = here.as_mapping() else {
                return found;
            };
            let Some((k, v)) = map.iter().find(|(k, _)| k.as_str() == name) else {
                return found;
            };
            found = loc(k.span()).or(found);
            here = v;
            if matches!(v, Node::Scalar(_)) {
                found = loc(v.span()).or(found);
            }
        }
        for idx in indices.split(['[', ']']).filter(|s| !s.is_empty()) {
            let Ok(i) = idx.parse::<usize>() else {
                return found;
            };
            let Some(item) = here.as_sequence().and_then(|s| s.get(i)) else {
                return found;
            };
            found = loc(item.span()).or(found);
            here = item;
        }
    }
    found
}
