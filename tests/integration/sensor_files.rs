//! Real Zeek and Suricata output read by a pipeline file, when the shared
//! sample data is beside the repository (it is in CI).

use std::path::PathBuf;

use arrow::array::AsArray;
use vigil::pipeline::load_str;
use vigil::run::{run, Progress, RunOptions};

use crate::options_with;

fn shared_data() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data")
}

fn require(path: &std::path::Path) -> bool {
    if path.exists() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{} is missing in CI",
        path.display()
    );
    eprintln!("skipping: {} not present", path.display());
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zeek_json_and_suricata_arrays_decode_without_dead_letters() {
    let data = shared_data();
    let zeek = data.join("zeek_wrccdc2018/rdp.json.gz");
    let suricata = data.join("suricata_alerts/wrccdc-2018_alerts-only.json");
    if !require(&zeek) || !require(&suricata) {
        return;
    }
    let text = format!(
        "\
name: sensors
sources:
  rdp:
    type: file
    path: {}
    schema:
      fields:
        - {{ name: ts, type: timestamp }}
        - {{ name: id.orig_h, type: string }}
        - {{ name: id.resp_h, type: string }}
        - {{ name: id.resp_p, type: int64 }}
        - {{ name: result, type: string }}
      event_time: {{ field: ts, format: rfc3339 }}
    watermark: {{ out_of_orderness: 15m }}
  alerts:
    type: file
    path: {}
    schema:
      fields:
        - {{ name: timestamp, type: timestamp }}
        - {{ name: src_ip, type: string }}
        - {{ name: alert, type: struct, fields: [{{ name: signature, type: string }}, {{ name: severity, type: int64 }}] }}
      event_time: {{ field: timestamp }}
transforms:
  severe:
    type: filter
    input: alerts
    where: \"alert['severity'] <= 2\"
sinks:
  rdp_out: {{ type: null, input: rdp }}
  severe_out: {{ type: stdout, input: severe }}
",
        zeek.display(),
        suricata.display()
    );
    let mut plan = load_str("sensors.yaml", &text, &options_with(&[])).expect("valid");
    let severe = plan.capture("severe_out").expect("sink");
    let summary = run(
        &plan,
        RunOptions {
            progress: Progress::Off,
            ..RunOptions::default()
        },
    )
    .await
    .expect("runs");
    assert_eq!(
        summary.dead_letters, 0,
        "every record of real sensor output decodes"
    );
    let rdp_lines = {
        use std::io::BufRead;
        let f = std::fs::File::open(&zeek).expect("open");
        std::io::BufReader::new(flate2::read::GzDecoder::new(f))
            .lines()
            .count() as u64
    };
    let alerts: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&suricata).expect("read")).expect("json");
    let alerts = alerts.as_array().expect("array");
    assert_eq!(summary.events_in, rdp_lines + alerts.len() as u64);
    let expected_severe = alerts
        .iter()
        .filter(|a| a["alert"]["severity"].as_i64().is_some_and(|s| s <= 2))
        .count();
    let got: usize = severe.lock().iter().map(|b| b.num_rows()).sum();
    assert_eq!(got, expected_severe);
    let sig = severe.lock()[0]
        .column(2)
        .as_struct()
        .column(0)
        .as_string::<i32>()
        .value(0)
        .to_string();
    assert!(!sig.is_empty());
}

#[test]
fn every_shipped_pipeline_is_valid() {
    if !require(&shared_data()) {
        return;
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("pipelines");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("pipelines/") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "yaml") {
            if let Err(d) = vigil::pipeline::load(&path, &vigil::pipeline::PlanOptions::default()) {
                panic!("{d}");
            }
            checked += 1;
        }
    }
    assert!(checked >= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_zeek_pipeline_finds_the_rdp_fanout_in_real_logs() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("pipelines/zeek-rdp-fanout.yaml");
    if !require(&shared_data()) {
        return;
    }
    let mut plan =
        vigil::pipeline::load(&path, &vigil::pipeline::PlanOptions::default()).expect("valid");
    let alerts = plan.capture("alerts").expect("alerts");
    let late = plan.capture("late").expect("late");
    let summary = run(
        &plan,
        RunOptions {
            progress: Progress::Off,
            ..RunOptions::default()
        },
    )
    .await
    .expect("runs");
    assert_eq!(summary.dead_letters, 0);
    assert!(
        late.lock().is_empty(),
        "15 minutes of allowed disorder covers Zeek's"
    );
    let hits: Vec<(String, u64)> = alerts
        .lock()
        .iter()
        .flat_map(|b| {
            let ip = b
                .column_by_name("id.orig_h")
                .expect("column")
                .as_string::<i32>()
                .clone();
            let n = b
                .column_by_name("distinct_count")
                .expect("column")
                .as_primitive::<arrow::datatypes::UInt64Type>()
                .clone();
            (0..b.num_rows())
                .map(move |r| (ip.value(r).to_string(), n.value(r)))
                .collect::<Vec<_>>()
        })
        .collect();
    // In the WRCCDC 2018 capture, 10.164.94.120 reaches 17 RDP servers in five minutes.
    assert!(
        hits.contains(&("10.164.94.120".to_string(), 17)),
        "{hits:?}"
    );
    assert!(hits.iter().all(|(_, n)| *n >= 5));
}
