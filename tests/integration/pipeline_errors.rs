//! A bad pipeline file is rejected before anything starts, with its location.

use vigil::pipeline::load_str;

use crate::options_with;

fn error_of(text: &str) -> String {
    match load_str("p.yaml", text, &options_with(&[])) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(d) => d.to_string(),
    }
}

const GOOD: &str = "\
name: t
sources:
  auth:
    type: generator
    stream: auth
    count: 10
transforms:
  failed:
    type: filter
    input: auth
    where: \"outcome = 'failure'\"
  bf:
    type: threshold
    input: failed
    key: [tenant_id, user]
    window: 1m
    min_count: 5
sinks:
  out:
    type: stdout
    input: bf
";

#[test]
fn the_good_file_is_accepted() {
    let plan = load_str("p.yaml", GOOD, &options_with(&[])).expect("valid");
    // Source, filter, threshold, sink, and the dead-letter file the
    // source's and the filter's rejects go to.
    assert_eq!(plan.graph.nodes().len(), 5);
}

#[test]
fn unknown_field_with_a_suggestion() {
    let text = GOOD.replace("    window: 1m", "    widow: 1m");
    assert_eq!(
        error_of(&text),
        "p.yaml:16:5: unknown field \"widow\" in transform \"bf\"\n  hint: did you mean \"window\"?"
    );
}

#[test]
fn unknown_type_with_a_suggestion() {
    let text = GOOD.replace("type: threshold", "type: treshold");
    assert_eq!(
        error_of(&text),
        "p.yaml:13:11: unknown transform type \"treshold\" in transform \"bf\"\n  hint: did you mean \"threshold\"?"
    );
}

#[test]
fn unknown_input_with_a_suggestion() {
    let text = GOOD.replace("    input: failed\n", "    input: faild\n");
    assert_eq!(
        error_of(&text),
        "p.yaml:14:12: unknown input \"faild\"\n  hint: did you mean \"failed\"?"
    );
}

#[test]
fn a_column_the_input_lacks() {
    let text = GOOD.replace("key: [tenant_id, user]", "key: [tenant_id, usr]");
    assert_eq!(
        error_of(&text),
        "p.yaml:15:22: transform \"bf\": column \"usr\" is not in the input\n  hint: did you mean \"user\"?"
    );
}

#[test]
fn an_expression_that_does_not_type_check() {
    let text = GOOD.replace(
        "where: \"outcome = 'failure'\"",
        "where: \"outcom = 'failure'\"",
    );
    let e = error_of(&text);
    assert!(
        e.starts_with(
            "p.yaml:11:12: transform \"failed\": invalid expression \"outcom = 'failure'\""
        ),
        "{e}"
    );
    assert!(e.contains("outcom"), "{e}");
}

#[test]
fn a_condition_that_is_not_boolean() {
    let text = GOOD.replace("where: \"outcome = 'failure'\"", "where: \"user\"");
    let e = error_of(&text);
    assert!(
        e.starts_with("p.yaml:11:12: transform \"failed\": condition \"user\" is of type"),
        "{e}"
    );
}

#[test]
fn a_wrongly_typed_value() {
    let text = GOOD.replace("min_count: 5", "min_count: lots");
    let e = error_of(&text);
    assert!(e.starts_with("p.yaml:17:16: transform \"bf\": "), "{e}");
}

#[test]
fn an_unset_environment_variable() {
    let text = GOOD.replace("count: 10", "count: ${EVENTS}");
    assert_eq!(
        error_of(&text),
        "p.yaml:6:12: environment variable EVENTS is not set\n  hint: set it, or give a default: ${EVENTS:-value}"
    );
}

#[test]
fn a_cycle() {
    let text = GOOD.replace("    input: auth\n", "    input: bf\n");
    assert_eq!(
        error_of(&text),
        "p.yaml:10:12: transform \"failed\" is part of a cycle\n  hint: inputs must not lead back to the transform itself"
    );
}

#[test]
fn a_duplicate_key_and_broken_yaml() {
    let text = GOOD.replace("    count: 10\n", "    count: 10\n    count: 20\n");
    assert_eq!(
        error_of(&text),
        "p.yaml:7:5: key \"count\" appears twice in the same mapping"
    );
    let text = GOOD.replace("    key: [tenant_id, user]", "    key: [tenant_id, user");
    assert!(
        error_of(&text).starts_with("p.yaml:"),
        "{}",
        error_of(&text)
    );
}

#[test]
fn a_missing_section_and_an_unknown_top_level_key() {
    let text = GOOD.replace("sinks:", "sink:");
    let e = error_of(&text);
    assert!(
        e.contains("p.yaml:18:1: unknown top-level key \"sink\"\n  hint: did you mean \"sinks\"?"),
        "{e}"
    );
    assert!(e.contains("missing section \"sinks\""), "{e}");
}

#[test]
fn a_file_source_whose_file_is_missing() {
    let text = "\
name: t
sources:
  zeek:
    type: file
    path: /nonexistent/conn.log
    schema:
      fields: [{ name: ts, type: timestamp }]
      event_time: { field: ts }
sinks:
  out: { type: stdout, input: zeek }
";
    let e = error_of(text);
    assert!(
        e.starts_with("p.yaml:5:11: source \"zeek\": cannot read /nonexistent/conn.log"),
        "{e}"
    );
}

#[test]
fn the_cli_exits_non_zero_and_names_the_location() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, GOOD.replace("    window: 1m", "    widow: 1m")).expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vigil"))
        .args(["run", path.to_str().expect("utf-8 path")])
        .output()
        .expect("run vigil");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.yaml:16:5: unknown field \"widow\""),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "nothing ran");
}

const SQL: &str = "\
name: t
sources:
  auth:
    type: generator
    stream: auth
    count: 10
transforms:
  per_minute:
    type: sql
    query: |
      SELECT window_start, usr, count(*) AS n
      FROM auth GROUP BY TUMBLE(ts, INTERVAL '1' MINUTE), user
sinks:
  out:
    type: stdout
    input: per_minute
";

#[test]
fn a_bad_query_names_the_query_field_and_its_position_in_the_query() {
    assert_eq!(
        error_of(SQL),
        "p.yaml:11:7: transform \"per_minute\": invalid query: line 1, column 22: no field named usr\n  hint: possible column auth.user"
    );
}

#[test]
fn a_query_a_stream_cannot_answer_is_refused_before_anything_starts() {
    let text = SQL
        .replace(
            "FROM auth GROUP BY TUMBLE(ts, INTERVAL '1' MINUTE), user",
            "FROM auth GROUP BY user",
        )
        .replace("window_start, usr", "user");
    let e = error_of(&text);
    assert!(
        e.contains("GROUP BY without a window is not supported on a stream"),
        "{e}"
    );
    assert!(e.contains("hint: group by a window"), "{e}");
}

#[test]
fn a_sql_step_reads_the_tables_its_query_names_and_has_no_input() {
    let text = SQL
        .replace("usr", "user")
        .replace("    type: sql\n", "    type: sql\n    input: auth\n");
    let e = error_of(&text);
    assert!(
        e.contains("unknown field \"input\" in transform \"per_minute\""),
        "{e}"
    );
    let unknown = SQL.replace("usr", "user").replace("FROM auth", "FROM atuh");
    let e = error_of(&unknown);
    assert!(e.contains("unknown input \"atuh\""), "{e}");
    assert!(e.contains("did you mean \"auth\""), "{e}");
}

#[test]
fn a_query_that_does_not_parse_names_the_query_field_and_the_position() {
    let text = SQL.replace("count(*) AS n", "count(*) AS AS n");
    let e = error_of(&text);
    assert!(
        e.starts_with("p.yaml:11:7: transform \"per_minute\": invalid query: line 1, column 42: expected: end of statement, found: n"),
        "{e}"
    );
}

const TWO: &str = "\
name: t
sources:
  auth: { type: generator, stream: auth, count: 10 }
  flows: { type: generator, stream: network, count: 10 }
transforms:
";

#[test]
fn a_join_without_time_bounds_or_key_is_rejected_saying_what_to_add() {
    let unbounded = format!(
        "{TWO}  j:\n    type: sql\n    query: SELECT a.user FROM auth a JOIN flows f ON a.src_ip = f.src_ip\nsinks:\n  out: {{ type: stdout, input: j }}\n"
    );
    let e = error_of(&unbounded);
    assert!(
        e.starts_with(
            "p.yaml:8:12: transform \"j\": invalid query: a JOIN without both time bounds"
        ),
        "{e}"
    );
    assert!(e.contains("hint: add to ON: b.ts BETWEEN"), "{e}");
    let keyless = format!(
        "{TWO}  j:\n    type: sql\n    cross_tenant: true\n    query: SELECT a.user FROM auth a JOIN flows f ON f.ts BETWEEN a.ts AND a.ts + INTERVAL '1' MINUTE\nsinks:\n  out: {{ type: stdout, input: j }}\n"
    );
    let e = error_of(&keyless);
    assert!(e.contains("a JOIN without an equality"), "{e}");
}

#[test]
fn a_correlation_names_the_field_it_cannot_use() {
    let text = format!(
        "{TWO}  c:\n    type: correlate\n    correlation: value_count\n    rules: [auth]\n    group-by: [src_ip]\n    timespan: 1m\n    condition: {{ field: usr, gte: 5 }}\nsinks:\n  out: {{ type: stdout, input: c }}\n"
    );
    let e = error_of(&text);
    assert!(
        e.starts_with("p.yaml:12:25: transform \"c\": column \"usr\" is not in the input"),
        "{e}"
    );
    assert!(e.contains("did you mean \"user\"?"), "{e}");
}

const INCIDENTS: &str = "\
name: t
sources:
  auth: { type: generator, stream: auth, count: 10 }
transforms:
  bf:
    type: threshold
    input: auth
    key: [tenant_id, user]
    window: 1m
    min_count: 5
  inc:
    type: incidents
    alerts:
      - input: bf
        id: \"concat(rule, user)\"
        detection: rule
        severity: \"'high'\"
        entity_type: \"'user'\"
        entity_id: user
    escalate:
      - { alerts: 3, severity: high }
sinks:
  out: { type: stdout, input: inc }
  open: { type: read_model, input: inc.open_incidents, key: incident_id }
";

#[test]
fn an_incidents_step_is_checked_field_by_field() {
    load_str("p.yaml", INCIDENTS, &options_with(&[])).expect("valid");
    let e = error_of(&INCIDENTS.replace("entity_id: user", "entity_id: usr"));
    assert!(
        e.starts_with("p.yaml:19:20: transform \"inc\": invalid expression \"usr\""),
        "{e}"
    );
    assert!(e.contains("Did you mean 'user'?"), "{e}");
    let e = error_of(&INCIDENTS.replace("severity: high }", "severity: urgent }"));
    assert!(
        e.contains("escalate[0].severity")
            || e.contains("severity \"urgent\" is not low, medium, high or critical"),
        "{e}"
    );
    let e = error_of(&INCIDENTS.replace(
        "{ alerts: 3, severity: high }",
        "{ alerts: 3, detections: 2, severity: high }",
    ));
    assert!(
        e.contains("exactly one of alerts, detections or alert_severity"),
        "{e}"
    );
    let e = error_of(&INCIDENTS.replace("    escalate:", "    actions: nowhere\n    escalate:"));
    assert!(e.contains("nowhere"), "{e}");
    let e = error_of(&INCIDENTS.replace("key: incident_id", "key: incident"));
    assert!(
        e.contains("key column \"incident\" is not in the input"),
        "{e}"
    );
    let e = error_of(&INCIDENTS.replace(
        "  inc:\n    type: incidents\n",
        "  inc:\n    type: incidents\n    log: { brokers: x, topik: y }\n",
    ));
    assert!(e.contains("unknown field \"topik\""), "{e}");
    // Alerts without tenant_id cannot be kept per tenant.
    let text = INCIDENTS.replace("key: [tenant_id, user]", "key: [user]");
    let e = error_of(&text);
    assert!(e.contains("no column \"tenant_id\""), "{e}");
}
