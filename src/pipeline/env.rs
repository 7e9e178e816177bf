//! `${VAR}` substitution in pipeline files.
//!
//! Substitution happens on the raw text before YAML parsing, line by line, so
//! line numbers in later diagnostics stay true. Forms:
//!
//! * `${VAR}`: the variable's value; an error if it is unset;
//! * `${VAR:-default}`: the value, or `default` if unset or empty;
//! * `$${`: a literal `${`.
//!
//! Secrets belong in the environment, not in pipeline files; this is how they
//! get in.

use super::diagnostic::{Diagnostic, Diagnostics, Location};

/// Looks a variable up; the CLI passes the process environment, tests a map.
pub type Env = dyn Fn(&str) -> Option<String> + Send + Sync;

/// The process environment.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Substitutes every `${...}` in `text`.
pub fn substitute(file: &str, text: &str, env: &Env) -> Result<String, Diagnostics> {
    let mut out = String::with_capacity(text.len());
    let mut errors = Vec::new();
    for (n, line) in text.split_inclusive('\n').enumerate() {
        let mut rest = line;
        let mut col = 1;
        while let Some(at) = rest.find('$') {
            out.push_str(&rest[..at]);
            col += rest[..at].chars().count();
            let tail = &rest[at..];
            if let Some(after) = tail.strip_prefix("$${") {
                out.push_str("${");
                rest = after;
                col += 3;
                continue;
            }
            if !tail.starts_with("${") {
                out.push('$');
                rest = &tail[1..];
                col += 1;
                continue;
            }
            let loc = Some(Location {
                line: n + 1,
                column: col,
            });
            let Some(end) = tail.find('}') else {
                errors.push(
                    Diagnostic::new(file, loc, "unterminated ${ in pipeline file")
                        .hint(Some("write $${ for a literal ${".into())),
                );
                out.push_str(tail);
                rest = "";
                break;
            };
            let inner = &tail[2..end];
            let (name, default) = match inner.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (inner, None),
            };
            let valid =
                !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                errors.push(Diagnostic::new(
                    file,
                    loc,
                    format!("invalid environment variable name {name:?}"),
                ));
            } else {
                match (
                    env(name).filter(|v| !v.is_empty() || default.is_none()),
                    default,
                ) {
                    (Some(v), _) => out.push_str(&v),
                    (None, Some(d)) => out.push_str(d),
                    (None, None) => errors.push(
                        Diagnostic::new(
                            file,
                            loc,
                            format!("environment variable {name} is not set"),
                        )
                        .hint(Some(format!(
                            "set it, or give a default: ${{{name}:-value}}"
                        ))),
                    ),
                }
            }
            col += tail[..=end].chars().count();
            rest = &tail[end + 1..];
        }
        out.push_str(rest);
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(Diagnostics(errors))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "TOPIC" => Some("auth".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn substitutes_defaults_and_escapes() {
        let s = substitute(
            "f",
            "a: ${TOPIC}\nb: ${RATE:-100}\nc: $${TOPIC}\nd: ${EMPTY:-x}\ne: $5\n",
            &env,
        )
        .expect("ok");
        assert_eq!(s, "a: auth\nb: 100\nc: ${TOPIC}\nd: x\ne: $5\n");
    }

    #[test]
    fn unset_variable_is_an_error_at_its_place() {
        let e = substitute("p.yaml", "name: x\nsources:\n  a: ${NOPE}\n", &env).expect_err("unset");
        assert_eq!(e.to_string(), "p.yaml:3:6: environment variable NOPE is not set\n  hint: set it, or give a default: ${NOPE:-value}");
    }
}
