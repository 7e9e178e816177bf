//! What pipeline authors write for a generator source.

use std::time::Duration;

use serde::Deserialize;

use crate::error::{ConnectorError, Result};

/// Which telemetry stream to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    /// Authentication events.
    Auth,
    /// Network flows.
    Network,
    /// Process starts.
    Process,
}

/// An injectable attack scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttackKind {
    /// Many failed logins from one address against one user, then a success.
    BruteForce,
    /// One failed login per user, for many users, from one address.
    PasswordSpray,
    /// One account logging on to many hosts of its tenant in a short time
    /// (with the matching process starts and SMB flows).
    LateralMovement,
    /// The kill chain: a password spray, then one sprayed account logging
    /// in from the sprayer's address 30 s later, then that account moving
    /// laterally to 8 hosts, starting a minute after the login, over 2 min.
    AccountTakeover,
}

impl AttackKind {
    /// Default number of attempts (brute force), users (spray) or hosts (lateral).
    pub fn default_attempts(self) -> usize {
        match self {
            AttackKind::BruteForce => 40,
            AttackKind::PasswordSpray => 25,
            AttackKind::LateralMovement => 12,
            AttackKind::AccountTakeover => 25,
        }
    }

    /// Default duration of one occurrence.
    pub fn default_over(self) -> Duration {
        match self {
            AttackKind::BruteForce => Duration::from_secs(30),
            AttackKind::PasswordSpray => Duration::from_secs(60),
            AttackKind::LateralMovement => Duration::from_secs(120),
            AttackKind::AccountTakeover => Duration::from_secs(60),
        }
    }

    /// Name as written in pipeline files.
    pub fn name(self) -> &'static str {
        match self {
            AttackKind::BruteForce => "brute_force",
            AttackKind::PasswordSpray => "password_spray",
            AttackKind::LateralMovement => "lateral_movement",
            AttackKind::AccountTakeover => "account_takeover",
        }
    }
}

/// When and how an attack is injected.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttackConfig {
    /// `brute_force`, `password_spray`, `lateral_movement` or
    /// `account_takeover`.
    pub kind: AttackKind,
    /// First occurrence, counted in event time from the generator's start.
    #[serde(with = "humantime_serde")]
    pub at: Duration,
    /// Repeat with this period; absent: once.
    #[serde(default, with = "humantime_serde")]
    pub every: Option<Duration>,
    /// Attempts, users or hosts per occurrence (default by kind: 40, 25, 12;
    /// users sprayed for an account takeover, 25).
    #[serde(default)]
    pub attempts: Option<usize>,
    /// Duration of one occurrence (default by kind: 30s, 60s, 120s; the
    /// spray of an account takeover, 60s, after which its login and lateral
    /// movement follow).
    #[serde(default, with = "humantime_serde")]
    pub over: Option<Duration>,
}

/// A generator source.
///
/// ```yaml
/// type: generator
/// stream: auth
/// rate: 20000            # events/s; absent: as fast as possible
/// attacks:
///   - { kind: brute_force, at: 20s, every: 1m }
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeneratorConfig {
    /// `auth`, `network` or `process`.
    pub stream: Stream,
    /// Seed; the same seed gives the same events.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Events per second of wall-clock time; absent: as fast as possible.
    #[serde(default)]
    pub rate: Option<u64>,
    /// Events per second of event time (default: `rate`, or 10000).
    #[serde(default)]
    pub event_rate: Option<u64>,
    /// Event time of the first event: RFC 3339, `now`, or `now-10m`;
    /// absent: now.
    #[serde(default)]
    pub start_time: Option<String>,
    /// Background events in total; absent: endless.
    #[serde(default)]
    pub count: Option<u64>,
    /// Partitions, each with its own watermark, like a topic's.
    #[serde(default = "default_partitions")]
    pub partitions: usize,
    /// Events per batch.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// How far event times may run behind their nominal order.
    #[serde(default = "default_disorder", with = "humantime_serde")]
    pub out_of_orderness: Duration,
    /// Number of tenants.
    #[serde(default = "default_tenants")]
    pub tenants: usize,
    /// Number of users, spread over tenants.
    #[serde(default = "default_users")]
    pub users: usize,
    /// Number of hosts, spread over tenants.
    #[serde(default = "default_hosts")]
    pub hosts: usize,
    /// Share of background logins that fail.
    #[serde(default = "default_failure_rate")]
    pub failure_rate: f64,
    /// Attacks to inject.
    #[serde(default)]
    pub attacks: Vec<AttackConfig>,
}

fn default_seed() -> u64 {
    42
}
fn default_partitions() -> usize {
    4
}
fn default_batch_size() -> usize {
    8192
}
fn default_disorder() -> Duration {
    Duration::from_secs(2)
}
fn default_tenants() -> usize {
    3
}
fn default_users() -> usize {
    50_000
}
fn default_hosts() -> usize {
    5_000
}
fn default_failure_rate() -> f64 {
    0.02
}

impl GeneratorConfig {
    /// A configuration with every default, for `stream`.
    pub fn new(stream: Stream) -> Self {
        Self {
            stream,
            seed: default_seed(),
            rate: None,
            event_rate: None,
            start_time: None,
            count: None,
            partitions: default_partitions(),
            batch_size: default_batch_size(),
            out_of_orderness: default_disorder(),
            tenants: default_tenants(),
            users: default_users(),
            hosts: default_hosts(),
            failure_rate: default_failure_rate(),
            attacks: Vec::new(),
        }
    }

    /// Events per second of event time.
    pub fn effective_event_rate(&self) -> u64 {
        self.event_rate.or(self.rate).unwrap_or(10_000).max(1)
    }

    /// The start time in ms, given the time `now_ms`.
    pub fn start_time_ms(&self, now_ms: i64) -> Result<i64> {
        let Some(s) = self.start_time.as_deref().map(str::trim) else {
            return Ok(now_ms);
        };
        let bad = || {
            ConnectorError::config(
                "start_time",
                format!("start_time {s:?} is neither an RFC 3339 time nor now-<duration>"),
            )
            .with_hint("write it like 2026-01-01T00:00:00Z or now-10m")
        };
        if let Some(rel) = s.strip_prefix("now") {
            let rel = rel.trim();
            if rel.is_empty() {
                return Ok(now_ms);
            }
            let ago = rel.strip_prefix('-').ok_or_else(bad)?;
            let d = humantime::parse_duration(ago.trim()).map_err(|_| bad())?;
            return Ok(now_ms - d.as_millis() as i64);
        }
        crate::event_time::parse(s, crate::event_time::TimeFormat::Rfc3339).ok_or_else(bad)
    }

    /// Checks the values that types alone do not.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("partitions", self.partitions),
            ("batch_size", self.batch_size),
            ("tenants", self.tenants),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err(ConnectorError::config(
                    field,
                    format!("{field} must be at least 1"),
                ));
            }
        }
        if self.users < self.tenants * 4 {
            return Err(ConnectorError::config(
                "users",
                "users must be at least 4 per tenant",
            ));
        }
        if self.hosts < self.tenants * 16 {
            return Err(ConnectorError::config(
                "hosts",
                "hosts must be at least 16 per tenant",
            ));
        }
        if !(0.0..=1.0).contains(&self.failure_rate) {
            return Err(ConnectorError::config(
                "failure_rate",
                "failure_rate must be between 0 and 1",
            ));
        }
        if self.rate == Some(0) {
            return Err(ConnectorError::config("rate", "rate must be at least 1")
                .with_hint("omit rate to run flat out"));
        }
        self.start_time_ms(0)?;
        for (i, a) in self.attacks.iter().enumerate() {
            if a.every.is_some_and(|e| e.is_zero()) {
                return Err(ConnectorError::config(
                    format!("attacks[{i}].every"),
                    "every must be positive",
                ));
            }
            let n = a.attempts.unwrap_or(a.kind.default_attempts());
            if n == 0 {
                return Err(ConnectorError::config(
                    format!("attacks[{i}].attempts"),
                    "attempts must be at least 1",
                ));
            }
            if a.kind == AttackKind::LateralMovement && n > self.hosts / self.tenants {
                return Err(ConnectorError::config(
                    format!("attacks[{i}].attempts"),
                    "lateral movement cannot reach more hosts than a tenant has",
                ));
            }
            if a.kind == AttackKind::PasswordSpray && n > self.users / self.tenants {
                return Err(ConnectorError::config(
                    format!("attacks[{i}].attempts"),
                    "a spray cannot target more users than a tenant has",
                ));
            }
        }
        Ok(())
    }
}
