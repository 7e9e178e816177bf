//! The demo pipeline detects exactly the attacks the generator injected.

use std::collections::BTreeSet;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::TimestampMillisecondType;
use vigil::pipeline::load_str;
use vigil::run::{run, Progress, RunOptions};
use vigil_connectors::generator::AttackKind;

use crate::options_with;

fn text(b: &RecordBatch, col: &str, row: usize) -> String {
    let a = b
        .column_by_name(col)
        .unwrap_or_else(|| panic!("no column {col}"));
    a.as_string::<i32>().value(row).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_detects_exactly_the_injected_attacks() {
    let options = options_with(&[
        ("VIGIL_DEMO_RATE", "1000000000"),
        ("VIGIL_DEMO_EVENTS", "1500000"),
        ("VIGIL_DEMO_START", "2026-01-01T00:00:00Z"),
    ]);
    let mut plan =
        load_str("pipelines/demo.yaml", vigil::DEMO_PIPELINE, &options).expect("demo is valid");
    let alerts = plan.capture("alerts").expect("alerts sink");
    let truth = plan.generators["auth"].ground_truth(i64::MAX);
    let summary = tokio::time::timeout(
        std::time::Duration::from_secs(300),
        run(
            &plan,
            RunOptions {
                progress: Progress::Off,
                ..RunOptions::default()
            },
        ),
    )
    .await
    .expect("finishes in time")
    .expect("runs");
    assert_eq!(summary.dead_letters, 0);
    assert_eq!(
        summary.late, 0,
        "the watermark allows for the generator's disorder"
    );

    // 1.5M events at 5000/s is 300 s: brute force at 30s and 150s (the one at
    // 270s would end at the stream's end), a spray at 70s, lateral movement at 100s.
    let expected: BTreeSet<(String, String)> = truth
        .iter()
        .map(|a| match a.kind {
            AttackKind::BruteForce => (
                "brute_force".to_string(),
                format!(
                    "{}/{}/{}",
                    a.tenant,
                    a.src_ip,
                    a.user.clone().unwrap_or_default()
                ),
            ),
            AttackKind::PasswordSpray => (
                "password_spray".to_string(),
                format!("{}/{}", a.tenant, a.src_ip),
            ),
            AttackKind::LateralMovement | AttackKind::AccountTakeover => (
                "lateral_movement".to_string(),
                format!("{}/{}", a.tenant, a.user.clone().unwrap_or_default()),
            ),
        })
        .collect();
    assert_eq!(truth.len(), 4, "{truth:#?}");

    let mut detected = BTreeSet::new();
    for b in alerts.lock().iter() {
        for r in 0..b.num_rows() {
            let rule = text(b, "rule", r);
            let key = match rule.as_str() {
                "brute_force" => format!(
                    "{}/{}/{}",
                    text(b, "tenant_id", r),
                    text(b, "src_ip", r),
                    text(b, "user", r)
                ),
                "password_spray" => format!("{}/{}", text(b, "tenant_id", r), text(b, "src_ip", r)),
                _ => format!("{}/{}", text(b, "tenant_id", r), text(b, "user", r)),
            };
            // Each alert's window overlaps the attack it reports.
            let start = b
                .column_by_name("window_start")
                .expect("window_start")
                .as_primitive::<TimestampMillisecondType>()
                .value(r);
            let end = b
                .column_by_name("window_end")
                .expect("window_end")
                .as_primitive::<TimestampMillisecondType>()
                .value(r);
            let attack = truth.iter().find(|a| {
                expected.contains(&(rule.clone(), key.clone()))
                    && a.start_ms < end
                    && a.end_ms >= start
            });
            assert!(
                attack.is_some(),
                "alert {rule} {key} [{start}, {end}) matches no injected attack"
            );
            assert!(b.column_by_name("rule").expect("rule").null_count() == 0);
            detected.insert((rule, key));
        }
    }
    assert_eq!(
        detected, expected,
        "exactly the injected attacks, nothing else"
    );
}

#[test]
fn the_demo_command_runs_and_prints_alerts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vigil"))
        .args(["demo", "--progress", "off", "--dead-letter-dir"])
        .arg(dir.path())
        .env("VIGIL_DEMO_RATE", "1000000000")
        .env("VIGIL_DEMO_EVENTS", "800000")
        .env("VIGIL_DEMO_START", "2026-01-01T00:00:00Z")
        .output()
        .expect("run vigil demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // 160 s of event time: the brute force at 30s and the spray at 70s complete.
    assert!(stdout.contains("| brute_force |"), "{stdout}");
    assert!(stdout.contains("| password_spray |"), "{stdout}");
    assert!(stderr.contains("demo: 800"), "summary line: {stderr}");
    // The sinks' latency percentiles close the summary.
    assert!(
        stderr.contains("latency alerts: event time→emit p50"),
        "{stderr}"
    );
    assert!(stderr.contains("ingest→emit p50"), "{stderr}");
    assert_eq!(
        std::fs::read_dir(dir.path()).expect("dir").count(),
        0,
        "no dead letters, no file"
    );
}
