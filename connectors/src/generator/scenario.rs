//! Attack scenarios: when they happen, whom they touch, and the events they
//! add to each stream.
//!
//! Occurrences are enumerated from the configuration alone, ordered by start
//! time, and numbered; everything about an occurrence (tenant, attacker
//! address, victims) derives from the seed and that number. So the events a
//! partition injects and the ground truth a test reads come from the same
//! function and cannot disagree.

use super::config::{AttackKind, GeneratorConfig, Stream};
use super::world::{World, FAILURE, NTLM, PSEXESVC, SERVICES};

/// Hosts an account takeover moves to.
const TAKEOVER_HOSTS: usize = 8;
/// From the spray's end to the successful login.
const TAKEOVER_LOGIN_MS: i64 = 30_000;
/// From the login to the first lateral logon.
const TAKEOVER_PAUSE_MS: i64 = 60_000;
/// How long the lateral movement takes.
const TAKEOVER_LATERAL_MS: i64 = 120_000;

/// An attack the generator injected: what a detection should find.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectedAttack {
    /// Number of the occurrence, in start order.
    pub ordinal: usize,
    /// Scenario.
    pub kind: AttackKind,
    /// Tenant attacked.
    pub tenant: String,
    /// Address the attack comes from.
    pub src_ip: String,
    /// The account attacked (brute force), used (lateral movement) or taken
    /// over (account takeover).
    pub user: Option<String>,
    /// Accounts sprayed.
    pub users: Vec<String>,
    /// Hosts reached by lateral movement.
    pub hosts: Vec<String>,
    /// Event time of its first event, ms.
    pub start_ms: i64,
    /// Event time of its last event, ms.
    pub end_ms: i64,
}

/// One generated row, as dictionary indices; each stream reads its fields.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Row {
    pub id: u64,
    pub ts: i64,
    pub tenant: i32,
    pub user: i32,
    pub src_ip: i32,
    pub dst_ip: i32,
    pub host: i32,
    pub method: i32,
    pub outcome: i32,
    pub process: i32,
    pub parent: i32,
    pub port: u16,
    pub proto: i32,
    pub bytes: u64,
    pub packets: u32,
}

/// One occurrence with its participants, as indices.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub ordinal: usize,
    pub kind: AttackKind,
    pub start_ms: i64,
    pub end_ms: i64,
    tenant: usize,
    src_ip: usize,
    user: usize,
    users: Vec<usize>,
    hosts: Vec<usize>,
    attempts: usize,
}

/// splitmix64: a well-mixed hash of the seed and an index.
pub(crate) fn mix(seed: u64, i: u64) -> u64 {
    let mut z = seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Every occurrence starting before `until_ms`, in (start, spec) order.
pub(crate) fn plans(
    cfg: &GeneratorConfig,
    world: &World,
    start_ms: i64,
    until_ms: i64,
) -> Vec<Plan> {
    let mut occ: Vec<(i64, usize)> = Vec::new();
    for (s, a) in cfg.attacks.iter().enumerate() {
        let mut t = start_ms + a.at.as_millis() as i64;
        while t < until_ms {
            occ.push((t, s));
            match a.every {
                Some(e) => t += (e.as_millis() as i64).max(1),
                None => break,
            }
        }
    }
    occ.sort();
    occ.into_iter()
        .enumerate()
        .map(|(ordinal, (t, s))| plan(cfg, world, ordinal, t, s))
        .collect()
}

fn plan(cfg: &GeneratorConfig, world: &World, ordinal: usize, start_ms: i64, spec: usize) -> Plan {
    let a = &cfg.attacks[spec];
    let n = a.attempts.unwrap_or(a.kind.default_attempts());
    let over = a.over.unwrap_or(a.kind.default_over()).as_millis() as i64;
    let h = mix(cfg.seed, ordinal as u64 + 1);
    let tenant = ordinal % world.tenants;
    let per_tenant_users = world.users / world.tenants;
    let user = world.tenant_user(tenant, (h % per_tenant_users as u64) as usize);
    let base = (h >> 20) as usize;
    let (users, hosts) = match a.kind {
        AttackKind::AccountTakeover => (
            (0..n)
                .map(|k| world.tenant_user(tenant, base + k))
                .collect(),
            (0..TAKEOVER_HOSTS)
                .map(|k| world.tenant_host(tenant, base + k))
                .collect(),
        ),
        AttackKind::PasswordSpray => (
            (0..n)
                .map(|k| world.tenant_user(tenant, base + k))
                .collect(),
            Vec::new(),
        ),
        AttackKind::LateralMovement => (
            Vec::new(),
            (0..n)
                .map(|k| world.tenant_host(tenant, base + k))
                .collect(),
        ),
        AttackKind::BruteForce => (Vec::new(), Vec::new()),
    };
    // The account taken over is one of those sprayed.
    let user = match a.kind {
        AttackKind::AccountTakeover => users[n / 2],
        _ => user,
    };
    let source_host = world.own_host(user, 0);
    let src_ip = match a.kind {
        AttackKind::LateralMovement => world.host_ip(source_host),
        _ => world.attacker_ip(ordinal),
    };
    let end_ms = match a.kind {
        AttackKind::AccountTakeover => {
            start_ms + over + TAKEOVER_LOGIN_MS + TAKEOVER_PAUSE_MS + TAKEOVER_LATERAL_MS
        }
        _ => start_ms + over,
    };
    Plan {
        ordinal,
        kind: a.kind,
        start_ms,
        end_ms,
        tenant,
        src_ip,
        user,
        users,
        hosts,
        attempts: n,
    }
}

impl Plan {
    /// The ground-truth description.
    pub(crate) fn describe(&self, world: &World) -> InjectedAttack {
        let is_spray = self.kind == AttackKind::PasswordSpray;
        InjectedAttack {
            ordinal: self.ordinal,
            kind: self.kind,
            tenant: world.tenant(self.tenant).to_string(),
            src_ip: world.ip(self.src_ip).to_string(),
            user: (!is_spray).then(|| world.user(self.user).to_string()),
            users: self
                .users
                .iter()
                .map(|&u| world.user(u).to_string())
                .collect(),
            hosts: self
                .hosts
                .iter()
                .map(|&h| world.host(h).to_string())
                .collect(),
            start_ms: self.start_ms,
            end_ms: self.end_ms,
        }
    }

    /// The events this occurrence adds to `stream`, in time order.
    pub(crate) fn rows(&self, stream: Stream, world: &World) -> Vec<Row> {
        if self.kind == AttackKind::AccountTakeover {
            return self.takeover_rows(stream, world);
        }
        let span = self.end_ms - self.start_ms;
        let at = |k: usize, n: usize| self.start_ms + span * k as i64 / n.max(1) as i64;
        let tenant = self.tenant as i32;
        match (self.kind, stream) {
            (AttackKind::BruteForce, Stream::Auth) => {
                let n = self.attempts;
                let host = world.own_host(self.user, 0) as i32;
                let mut rows: Vec<Row> = (0..n)
                    .map(|k| Row {
                        ts: at(k, n),
                        tenant,
                        user: self.user as i32,
                        src_ip: self.src_ip as i32,
                        host,
                        method: 0,
                        outcome: FAILURE,
                        ..Row::default()
                    })
                    .collect();
                rows.push(Row {
                    ts: self.end_ms,
                    outcome: 0,
                    ..rows[0]
                });
                rows
            }
            (AttackKind::PasswordSpray, Stream::Auth) => {
                self.spray_rows(world, self.start_ms, span)
            }
            (AttackKind::LateralMovement, _) => self.lateral_rows(world, self.start_ms, span),
            _ => Vec::new(),
        }
    }

    /// The spray, the login from the sprayer's address, then the lateral
    /// movement by the account it opened.
    fn takeover_rows(&self, stream: Stream, world: &World) -> Vec<Row> {
        let spray_end = self.end_ms - TAKEOVER_LATERAL_MS - TAKEOVER_PAUSE_MS - TAKEOVER_LOGIN_MS;
        let login = spray_end + TAKEOVER_LOGIN_MS;
        let lateral = Plan {
            src_ip: world.host_ip(world.own_host(self.user, 0)),
            ..self.clone()
        }
        .lateral_rows(world, login + TAKEOVER_PAUSE_MS, TAKEOVER_LATERAL_MS);
        if stream != Stream::Auth {
            return lateral;
        }
        let tenant = self.tenant as i32;
        let mut rows = self.spray_rows(world, self.start_ms, spray_end - self.start_ms);
        rows.push(Row {
            ts: login,
            tenant,
            user: self.user as i32,
            src_ip: self.src_ip as i32,
            host: world.own_host(self.user, 0) as i32,
            method: 0,
            outcome: 0,
            ..Row::default()
        });
        rows.extend(lateral);
        rows
    }

    /// One failed login for each sprayed account, over `span` from `start`.
    fn spray_rows(&self, world: &World, start: i64, span: i64) -> Vec<Row> {
        let n = self.users.len();
        self.users
            .iter()
            .enumerate()
            .map(|(k, &u)| Row {
                ts: start + span * k as i64 / n.max(1) as i64,
                tenant: self.tenant as i32,
                user: u as i32,
                src_ip: self.src_ip as i32,
                host: world.own_host(u, 0) as i32,
                method: 0,
                outcome: FAILURE,
                ..Row::default()
            })
            .collect()
    }

    /// The account logging on to each host in turn over `span` from `start`
    /// (logons, psexesvc starts, SMB flows).
    fn lateral_rows(&self, world: &World, start: i64, span: i64) -> Vec<Row> {
        let n = self.hosts.len();
        let at = |k: usize| start + span * k as i64 / n.max(1) as i64;
        let tenant = self.tenant as i32;
        self.hosts
            .iter()
            .enumerate()
            .map(|(k, &h)| Row {
                ts: at(k),
                id: 0,
                tenant,
                user: self.user as i32,
                src_ip: self.src_ip as i32,
                dst_ip: world.host_ip(h) as i32,
                host: h as i32,
                method: NTLM,
                outcome: 0,
                process: PSEXESVC,
                parent: SERVICES,
                port: 445,
                proto: 0,
                bytes: 48_000,
                packets: 60,
            })
            .collect()
    }
}
