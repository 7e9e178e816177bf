//! The generated organisation: tenants, users, hosts, addresses, and the
//! dictionaries their names live in.
//!
//! Every string column is a dictionary over one of these shared value arrays;
//! an entity is its index. Ownership is arithmetic, not tables: user `u` and
//! host `h` belong to tenant `u % T` and `h % T`, user `u` works on two hosts
//! of its tenant and logs in from its own address.

use std::sync::Arc;

use arrow::array::{ArrayRef, StringArray};

const TENANT_NAMES: &[&str] = &[
    "acme", "globex", "initech", "umbrella", "hooli", "stark", "wayne", "wonka",
];

/// Authentication methods; the last is reserved for nothing in particular.
pub const METHODS: &[&str] = &["password", "kerberos", "ntlm", "ssh_key", "saml"];
/// Login outcomes.
pub const OUTCOMES: &[&str] = &["success", "failure"];
/// Index of "failure" in [`OUTCOMES`].
pub const FAILURE: i32 = 1;
/// Index of "ntlm" in [`METHODS`].
pub const NTLM: i32 = 2;
/// Process names; background uses the first [`BACKGROUND_PROCESSES`].
pub const PROCESSES: &[&str] = &[
    "chrome.exe",
    "outlook.exe",
    "teams.exe",
    "excel.exe",
    "winword.exe",
    "powershell.exe",
    "cmd.exe",
    "explorer.exe",
    "services.exe",
    "psexesvc.exe",
];
/// How many of [`PROCESSES`] background activity uses.
pub const BACKGROUND_PROCESSES: usize = 7;
/// Index of explorer.exe.
pub const EXPLORER: i32 = 7;
/// Index of services.exe.
pub const SERVICES: i32 = 8;
/// Index of psexesvc.exe.
pub const PSEXESVC: i32 = 9;
/// Transport protocols.
pub const PROTOCOLS: &[&str] = &["tcp", "udp"];
/// Destination ports of background flows.
pub const BACKGROUND_PORTS: &[u16] = &[443, 443, 443, 80, 53, 123, 8080, 22];

const ROAMING: usize = 2048;
const ATTACKERS: usize = 508;

/// The entities of one generator configuration and their dictionaries.
#[derive(Debug)]
pub struct World {
    pub tenants: usize,
    pub users: usize,
    pub hosts: usize,
    pub tenant_names: ArrayRef,
    pub user_names: ArrayRef,
    pub host_names: ArrayRef,
    /// Users' home addresses, then hosts', then roaming, then attackers'.
    pub ips: ArrayRef,
    pub methods: ArrayRef,
    pub outcomes: ArrayRef,
    pub processes: ArrayRef,
    pub protocols: ArrayRef,
    /// Tenant of each user (precomputed: the generator's inner loop reads it).
    pub user_tenants: Vec<i32>,
    /// The two hosts each user works on.
    pub user_hosts: Vec<[i32; 2]>,
    tenant_strings: Vec<String>,
    user_strings: Vec<String>,
    host_strings: Vec<String>,
    ip_strings: Vec<String>,
}

fn dict(values: &[String]) -> ArrayRef {
    Arc::new(StringArray::from_iter_values(values.iter()))
}

fn strs(values: &[&str]) -> ArrayRef {
    Arc::new(StringArray::from_iter_values(values.iter()))
}

impl World {
    /// Builds the world for `tenants`, `users` and `hosts`.
    pub fn new(tenants: usize, users: usize, hosts: usize) -> Self {
        let tenant_strings: Vec<String> = (0..tenants)
            .map(|t| {
                TENANT_NAMES
                    .get(t)
                    .map_or_else(|| format!("tenant-{t}"), |s| s.to_string())
            })
            .collect();
        let user_strings: Vec<String> = (0..users).map(|u| format!("user{u:05}")).collect();
        let host_strings: Vec<String> = (0..hosts).map(|h| format!("ws-{h:04}")).collect();
        let mut ip_strings: Vec<String> = Vec::with_capacity(users + hosts + ROAMING + ATTACKERS);
        ip_strings.extend(
            (0..users).map(|u| format!("10.{}.{}.{}", 10 + u / 65536, (u / 256) % 256, u % 256)),
        );
        ip_strings.extend(
            (0..hosts).map(|h| format!("172.{}.{}.{}", 16 + h / 65536, (h / 256) % 256, h % 256)),
        );
        ip_strings.extend((0..ROAMING).map(|r| format!("192.168.{}.{}", r / 256, r % 256)));
        ip_strings.extend((0..ATTACKERS).map(|a| {
            if a < 254 {
                format!("203.0.113.{}", a + 1)
            } else {
                format!("198.51.100.{}", a - 253)
            }
        }));
        let mut world = Self {
            tenants,
            users,
            hosts,
            user_tenants: Vec::new(),
            user_hosts: Vec::new(),
            tenant_names: dict(&tenant_strings),
            user_names: dict(&user_strings),
            host_names: dict(&host_strings),
            ips: dict(&ip_strings),
            methods: strs(METHODS),
            outcomes: strs(OUTCOMES),
            processes: strs(PROCESSES),
            protocols: strs(PROTOCOLS),
            tenant_strings,
            user_strings,
            host_strings,
            ip_strings,
        };
        world.user_tenants = (0..users).map(|u| world.user_tenant(u) as i32).collect();
        world.user_hosts = (0..users)
            .map(|u| [world.own_host(u, 0) as i32, world.own_host(u, 1) as i32])
            .collect();
        world
    }

    /// Tenant of user `u`.
    pub fn user_tenant(&self, u: usize) -> usize {
        u % self.tenants
    }

    /// Host `k` (0 or 1) that user `u` works on; same tenant as the user.
    pub fn own_host(&self, u: usize, k: usize) -> usize {
        let per = self.hosts / self.tenants;
        let slot = (u / self.tenants * 2 + k) % per;
        slot * self.tenants + self.user_tenant(u)
    }

    /// The `i`-th host of tenant `t`.
    pub fn tenant_host(&self, t: usize, i: usize) -> usize {
        (i % (self.hosts / self.tenants)) * self.tenants + t
    }

    /// The `i`-th user of tenant `t`.
    pub fn tenant_user(&self, t: usize, i: usize) -> usize {
        (i % (self.users / self.tenants)) * self.tenants + t
    }

    /// Address index of user `u`'s workstation connection.
    pub fn home_ip(&self, u: usize) -> usize {
        u
    }

    /// Address index of host `h`.
    pub fn host_ip(&self, h: usize) -> usize {
        self.users + h
    }

    /// Address index of roaming address `r`.
    pub fn roaming_ip(&self, r: usize) -> usize {
        self.users + self.hosts + r % ROAMING
    }

    /// Address index of attacker `a`.
    pub fn attacker_ip(&self, a: usize) -> usize {
        self.users + self.hosts + ROAMING + a % ATTACKERS
    }

    /// Number of roaming addresses.
    pub fn roaming(&self) -> usize {
        ROAMING
    }

    /// Name of tenant `t`.
    pub fn tenant(&self, t: usize) -> &str {
        &self.tenant_strings[t]
    }

    /// Name of user `u`.
    pub fn user(&self, u: usize) -> &str {
        &self.user_strings[u]
    }

    /// Name of host `h`.
    pub fn host(&self, h: usize) -> &str {
        &self.host_strings[h]
    }

    /// Text of address index `i`.
    pub fn ip(&self, i: usize) -> &str {
        &self.ip_strings[i]
    }
}
