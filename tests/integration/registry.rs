//! A Confluent Schema Registry **test double**: no real registry can be
//! installed on the machines these tests run on. It serves, over real HTTP
//! on loopback, only what Vigil's registry client (schema_registry_converter)
//! calls: `GET /schemas/ids/{id}` and `POST /subjects/{subject}/versions`,
//! with the registry's JSON bodies and its 404 error shape.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

#[derive(Default)]
struct State {
    /// Schema of id `i + 1`.
    schemas: Vec<String>,
    /// Ids registered under each subject.
    subjects: HashMap<String, Vec<u32>>,
}

impl State {
    fn register(&mut self, subject: &str, schema: &str) -> u32 {
        let id = match self.schemas.iter().position(|s| s == schema) {
            Some(i) => i as u32 + 1,
            None => {
                self.schemas.push(schema.to_string());
                self.schemas.len() as u32
            }
        };
        let ids = self.subjects.entry(subject.to_string()).or_default();
        if !ids.contains(&id) {
            ids.push(id);
        }
        id
    }
}

/// The running double; stops when dropped.
pub struct Registry {
    /// Base URL, `http://127.0.0.1:<port>`.
    pub url: String,
    state: Arc<Mutex<State>>,
    _server: JoinSet<()>,
}

impl Registry {
    /// Starts the double on a free loopback port.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let state = Arc::new(Mutex::new(State::default()));
        let mut server = JoinSet::new();
        let shared = state.clone();
        server.spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                connections.spawn(serve(stream, shared.clone()));
            }
        });
        Self {
            url,
            state,
            _server: server,
        }
    }

    /// Registers `schema` under `subject`, as a producer's serializer does.
    pub fn register(&self, subject: &str, schema: &str) -> u32 {
        self.state.lock().register(subject, schema)
    }

    /// The ids registered under `subject` and their schemas.
    pub fn subject(&self, subject: &str) -> Vec<(u32, String)> {
        let state = self.state.lock();
        state
            .subjects
            .get(subject)
            .map(|ids| {
                ids.iter()
                    .map(|id| (*id, state.schemas[*id as usize - 1].clone()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Answers the requests of one keep-alive connection.
async fn serve(stream: TcpStream, state: Arc<Mutex<State>>) {
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    loop {
        let mut request_line = String::new();
        if read.read_line(&mut request_line).await.unwrap_or(0) == 0 {
            return;
        }
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            if read.read_line(&mut line).await.unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0; length];
        if read.read_exact(&mut body).await.is_err() {
            return;
        }
        let mut parts = request_line.split_whitespace();
        let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let path = target.split('?').next().unwrap_or("");
        let (status, reply) = answer(method, path, &body, &state);
        let response = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/vnd.schemaregistry.v1+json\r\nContent-Length: {}\r\n\r\n{reply}",
            reply.len()
        );
        if write.write_all(response.as_bytes()).await.is_err() {
            return;
        }
    }
}

fn answer(method: &str, path: &str, body: &[u8], state: &Mutex<State>) -> (&'static str, String) {
    let not_found = |code: u32, what: &str| {
        (
            "404 Not Found",
            serde_json::json!({ "error_code": code, "message": what }).to_string(),
        )
    };
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        ("GET", ["schemas", "ids", id]) => {
            let state = state.lock();
            match id
                .parse::<usize>()
                .ok()
                .and_then(|i| state.schemas.get(i.wrapping_sub(1)))
            {
                Some(schema) => (
                    "200 OK",
                    serde_json::json!({ "schema": schema }).to_string(),
                ),
                None => not_found(40403, "Schema not found"),
            }
        }
        ("POST", ["subjects", subject, "versions"]) => {
            let Ok(request) = serde_json::from_slice::<serde_json::Value>(body) else {
                return (
                    "422 Unprocessable Entity",
                    serde_json::json!({ "error_code": 42201, "message": "Invalid schema" })
                        .to_string(),
                );
            };
            let schema = request["schema"].as_str().unwrap_or_default();
            let subject = subject.replace("%2F", "/");
            let id = state.lock().register(&subject, schema);
            ("200 OK", serde_json::json!({ "id": id }).to_string())
        }
        _ => not_found(404, "no such endpoint"),
    }
}
