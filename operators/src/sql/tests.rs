//! Planning: what runs, and what is refused with a position and a hint.

use crate::sql::{plan_query, tables_of, PlannedQuery, QueryOptions, SqlError};
use crate::window::tests::{rows, sorted, Harness, Tables};
use crate::window::WindowKind;

fn plan(sql: &str) -> Result<PlannedQuery, SqlError> {
    plan_query(sql, &Tables, &QueryOptions::default())
}

fn refused(sql: &str) -> SqlError {
    match plan(sql) {
        Ok(p) => panic!("{sql} was accepted: {p:?}"),
        Err(e) => e,
    }
}

#[test]
fn flink_window_table_functions_and_group_windows_plan_the_same_window() {
    let forms = [
        "SELECT window_start, user, count(*) FROM auth GROUP BY TUMBLE(ts, INTERVAL '1' MINUTE), user",
        "SELECT window_start, window_end, user, count(*) FROM TABLE(TUMBLE(TABLE auth, DESCRIPTOR(ts), INTERVAL '1' MINUTES)) GROUP BY window_start, window_end, user",
        "SELECT window_start, user, count(*) FROM TABLE(TUMBLE(DATA => TABLE auth, TIMECOL => DESCRIPTOR(ts), SIZE => INTERVAL '60' SECONDS)) GROUP BY window_start, window_end, user",
        "SELECT TUMBLE_START(ts, INTERVAL '1' MINUTE), user, count(*) FROM auth GROUP BY TUMBLE(ts, INTERVAL '1' MINUTE), user",
    ];
    for sql in forms {
        match plan(sql).unwrap_or_else(|e| panic!("{sql}: {e}")) {
            PlannedQuery::Windowed { aggregate, .. } => {
                assert_eq!(
                    aggregate.kind,
                    WindowKind::Tumble { size_ms: 60_000 },
                    "{sql}"
                );
                assert_eq!(aggregate.key_names(), vec!["user".to_string()], "{sql}");
            }
            other => panic!("{sql}: {other:?}"),
        }
    }
    let session = "SELECT window_start, user, count(*) FROM TABLE(SESSION(TABLE auth PARTITION BY user, DESCRIPTOR(ts), INTERVAL '5' MINUTES)) GROUP BY window_start, window_end, user";
    match plan(session).unwrap_or_else(|e| panic!("{e}")) {
        PlannedQuery::Windowed { aggregate, .. } => {
            assert_eq!(aggregate.kind, WindowKind::Session { gap_ms: 300_000 })
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        tables_of(forms[1]).expect("tables"),
        vec!["auth".to_string()]
    );
}

#[test]
fn where_having_scalar_functions_and_every_listed_aggregate_run() {
    let sql = "SELECT window_start, lower(user) AS u, count(*) AS n, count(DISTINCT src_ip) AS ips, \
               sum(bytes) AS s, min(bytes) AS lo, max(bytes) AS hi, avg(bytes) AS mean, \
               approx_distinct(src_ip) AS ad, approx_percentile_cont(0.5) WITHIN GROUP (ORDER BY bytes) AS med \
               FROM auth WHERE tenant = 't' \
               GROUP BY TUMBLE(ts, INTERVAL '1' MINUTE), lower(user) HAVING count(*) >= 2";
    let mut h = Harness::new(sql, 0);
    h.feed(rows(&[
        (1, "t", "Alice", "10.0.0.1", 10),
        (2, "t", "alice", "10.0.0.2", 20),
        (3, "t", "alice", "10.0.0.2", 30),
        (4, "other", "alice", "10.0.0.9", 1000),
        (5, "t", "bob", "10.0.0.3", 1),
    ]));
    h.watermark(60);
    assert_eq!(
        h.take(),
        "+----------------------+-------+---+-----+----+----+----+------+----+------+
| window_start         | u     | n | ips | s  | lo | hi | mean | ad | med  |
+----------------------+-------+---+-----+----+----+----+------+----+------+
| 1970-01-01T00:00:00Z | alice | 3 | 2   | 60 | 10 | 30 | 20.0 | 2  | 20.0 |
+----------------------+-------+---+-----+----+----+----+------+----+------+"
    );
}

#[test]
fn stateless_queries_filter_and_project_row_by_row() {
    let sql = "SELECT ts, upper(user) AS u, bytes * 2 AS b FROM auth WHERE bytes > 5";
    let PlannedQuery::Stateless { stages, .. } = plan(sql).expect("plan") else {
        panic!("windowed?")
    };
    let out = stages
        .run(rows(&[(1, "t", "a", "ip", 3), (2, "t", "b", "ip", 7)]))
        .expect("run");
    assert_eq!(
        sorted(&[out]),
        "+----------------------+---+----+
| ts                   | u | b  |
+----------------------+---+----+
| 1970-01-01T00:00:02Z | B | 14 |
+----------------------+---+----+"
    );
}

#[test]
fn constructs_a_stream_cannot_answer_are_refused_naming_them() {
    let cases = [
        (
            "SELECT user, count(*) FROM auth GROUP BY user",
            "GROUP BY without a window",
        ),
        ("SELECT count(*) FROM auth", "GROUP BY without a window"),
        (
            "SELECT * FROM auth ORDER BY ts",
            "ORDER BY without a window",
        ),
        ("SELECT * FROM auth LIMIT 10", "LIMIT"),
        ("SELECT DISTINCT user FROM auth", "DISTINCT"),
        (
            "SELECT * FROM auth a JOIN auth b ON a.user = b.user",
            "JOIN",
        ),
        (
            "SELECT user FROM auth UNION ALL SELECT user FROM auth",
            "UNION",
        ),
        (
            "SELECT user, row_number() OVER (ORDER BY ts) FROM auth",
            "window function",
        ),
    ];
    for (sql, construct) in cases {
        let e = refused(sql);
        assert!(
            e.message.contains(construct),
            "{sql}: {e} does not name {construct}"
        );
        assert!(e.hint.is_some(), "{sql}: no hint");
    }
}

#[test]
fn bad_sql_is_reported_with_its_position_and_a_hint() {
    let e = refused("SELECT user\nFROM auth WHERE user = = 'x'");
    assert_eq!((e.line, e.column), (Some(2), Some(24)), "{e}");
    let e = refused("SELECT user FROM auth WHERE");
    assert!(e.message.contains("EOF"), "{e}");

    let e = refused("SELECT usr FROM auth");
    assert!(e.message.contains("usr"), "{e}");
    assert_eq!((e.line, e.column), (Some(1), Some(8)), "{e}");
    assert!(e.hint.as_deref().unwrap_or("").contains("user"), "{e:?}");

    let e = refused("SELECT count(*) FROM atuh GROUP BY TUMBLE(ts, INTERVAL '1' MINUTE)");
    assert!(e.message.contains("atuh"), "{e}");
    assert_eq!(e.hint.as_deref(), Some("did you mean \"auth\"?"));

    let e = refused("SELECT TUMBLE(ts, INTERVAL '1' MINUTE) FROM auth");
    assert_eq!((e.line, e.column), (Some(1), Some(8)), "{e}");
    assert!(
        e.hint.as_deref().unwrap_or("").contains("GROUP BY"),
        "{e:?}"
    );

    let e = refused("SELECT count(*) FROM auth GROUP BY TUMBLE(tz, INTERVAL '1' MINUTE)");
    assert!(e.message.contains("\"tz\""), "{e}");

    let e = refused(
        "SELECT count(*) FROM auth GROUP BY HOP(ts, INTERVAL '2' MINUTE, INTERVAL '1' MINUTE)",
    );
    assert!(e.message.contains("slide"), "{e}");

    let e = refused("SELECT count(*) FROM auth GROUP BY TUMBLE(ts, INTERVAL '1' MONTH)");
    assert!(e.message.contains("months"), "{e}");

    let e = refused(
        "WITH x AS (SELECT * FROM auth WHERE bytes > 1) SELECT count(*) FROM x GROUP BY TUMBLE(ts, INTERVAL '1' MINUTE)",
    );
    assert!(e.message.contains("WITH query"), "{e}");
}
