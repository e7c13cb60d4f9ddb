//! The upstream table: named upstreams, each an ordered list of servers with
//! nginx's own parameters and defaults. This is what the state file stores,
//! what the parser produces and what every interface shows.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use serde::{Serialize, Serializer};

use crate::policy::Policy;
use crate::zone::PeerRef;

/// Longest upstream name, in bytes.
pub const NAME_MAX: usize = 255;
/// Most servers one upstream may have.
pub const SERVERS_MAX: usize = 1000;
/// Most upstreams a table may have.
pub const UPSTREAMS_MAX: usize = 100_000;
/// `weight=` bounds. nginx itself has no upper bound; ours keeps smooth
/// weighted round robin's arithmetic far from overflow and typos visible.
pub const WEIGHT_MIN: u32 = 1;
pub const WEIGHT_MAX: u32 = 1000;
/// `max_fails=` upper bound (0 disables passive health checks, as in nginx).
pub const MAX_FAILS_MAX: u32 = 1000;
/// `fail_timeout=` upper bound, in seconds (one day).
pub const FAIL_TIMEOUT_MAX: u32 = 86_400;
/// nginx's defaults for a `server` line.
pub const DEFAULT_WEIGHT: u32 = 1;
pub const DEFAULT_MAX_FAILS: u32 = 1;
pub const DEFAULT_FAIL_TIMEOUT: u32 = 10;
/// The port nginx assumes when a `server` address has none.
pub const DEFAULT_PORT: u16 = 80;

/// Where a server listens: an IP literal with a port, or a unix socket path.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Address {
    Inet(SocketAddr),
    Unix(String),
}

impl Address {
    /// The host part as `ngx.balancer.set_current_peer` takes it:
    /// `127.0.0.1`, `[::1]` or `unix:/path`.
    pub fn host(&self) -> String {
        match self {
            Address::Inet(SocketAddr::V4(a)) => a.ip().to_string(),
            Address::Inet(SocketAddr::V6(a)) => format!("[{}]", a.ip()),
            Address::Unix(path) => format!("unix:{path}"),
        }
    }

    /// The port, or 0 for a unix socket.
    pub fn port(&self) -> u16 {
        match self {
            Address::Inet(a) => a.port(),
            Address::Unix(_) => 0,
        }
    }

    /// The IP address, for inet addresses.
    pub fn ip(&self) -> Option<IpAddr> {
        match self {
            Address::Inet(a) => Some(a.ip()),
            Address::Unix(_) => None,
        }
    }
}

impl fmt::Display for Address {
    /// nginx's own spelling: `127.0.0.1:8080`, `[::1]:8080`, `unix:/path`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Inet(a) => write!(f, "{a}"),
            Address::Unix(path) => write!(f, "unix:{path}"),
        }
    }
}

impl Serialize for Address {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// One `server` line of an upstream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServerSpec {
    pub addr: Address,
    pub weight: u32,
    pub max_fails: u32,
    /// Seconds, as nginx keeps it.
    pub fail_timeout: u32,
    pub backup: bool,
    pub down: bool,
}

impl ServerSpec {
    /// A server with nginx's defaults.
    pub fn new(addr: Address) -> ServerSpec {
        ServerSpec {
            addr,
            weight: DEFAULT_WEIGHT,
            max_fails: DEFAULT_MAX_FAILS,
            fail_timeout: DEFAULT_FAIL_TIMEOUT,
            backup: false,
            down: false,
        }
    }

    /// In rotation: it may be picked (as a primary or, failing those, a backup).
    pub fn in_rotation(&self) -> bool {
        !self.down
    }
}

/// A change to some parameters of one server (`PATCH`): what is `None`
/// stays as it is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServerPatch {
    pub weight: Option<u32>,
    pub max_fails: Option<u32>,
    pub fail_timeout: Option<u32>,
    pub backup: Option<bool>,
    pub down: Option<bool>,
}

impl ServerPatch {
    pub fn is_empty(&self) -> bool {
        *self == ServerPatch::default()
    }

    pub fn apply(&self, s: &mut ServerSpec) {
        s.weight = self.weight.unwrap_or(s.weight);
        s.max_fails = self.max_fails.unwrap_or(s.max_fails);
        s.fail_timeout = self.fail_timeout.unwrap_or(s.fail_timeout);
        s.backup = self.backup.unwrap_or(s.backup);
        s.down = self.down.unwrap_or(s.down);
    }
}

/// A named upstream: its servers in the order they were given.
///
/// Equal upstreams have the same content and `rev`; their `peers`, cells
/// the store hands out, do not count (a restored file gives new ones).
#[derive(Clone, Debug, Eq, Serialize)]
pub struct Upstream {
    pub name: String,
    /// Its balancing method (`ip_hash;`, `hash KEY consistent;`, ...).
    #[serde(serialize_with = "policy_text", skip_serializing_if = "is_round_robin")]
    pub policy: Policy,
    /// `keepalive N;` as given (0: none). The connection pool itself is the
    /// nginx `upstream` block's: ngx.balancer cannot set one per upstream.
    #[serde(skip_serializing_if = "is_zero")]
    pub keepalive: u32,
    pub servers: Vec<ServerSpec>,
    /// The table version at which this upstream last changed. Kept by the
    /// store; lets a worker keep the balancing state of upstreams that did
    /// not change.
    #[serde(skip)]
    pub rev: u64,
    /// Each server's cell of shared peer state, index for index with
    /// `servers` once the store has written the table (empty before). Given
    /// and kept by the store; see [`crate::zone`].
    #[serde(skip)]
    pub peers: Vec<PeerRef>,
}

impl Upstream {
    pub fn new(name: impl Into<String>, servers: Vec<ServerSpec>) -> Upstream {
        Upstream {
            name: name.into(),
            policy: Policy::RoundRobin,
            keepalive: 0,
            servers,
            rev: 0,
            peers: Vec::new(),
        }
    }

    /// Whether `other` says the same: name, method, keepalive and servers.
    /// What the store keeps (`rev`, `peers`) does not count.
    pub fn same_content(&self, other: &Upstream) -> bool {
        self.name == other.name
            && self.policy == other.policy
            && self.keepalive == other.keepalive
            && self.servers == other.servers
    }

    /// The shared cell of server `index`, if it has one.
    pub fn peer(&self, index: usize) -> PeerRef {
        self.peers.get(index).copied().unwrap_or(PeerRef::NONE)
    }

    pub fn server(&self, addr: &Address) -> Option<&ServerSpec> {
        self.servers.iter().find(|s| &s.addr == addr)
    }

    pub fn server_mut(&mut self, addr: &Address) -> Option<&mut ServerSpec> {
        self.servers.iter_mut().find(|s| &s.addr == addr)
    }

    /// How many servers may be picked.
    pub fn in_rotation(&self) -> usize {
        self.servers.iter().filter(|s| s.in_rotation()).count()
    }
}

impl PartialEq for Upstream {
    fn eq(&self, other: &Upstream) -> bool {
        self.same_content(other) && self.rev == other.rev
    }
}

fn is_round_robin(p: &Policy) -> bool {
    *p == Policy::RoundRobin
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn policy_text<S: Serializer>(p: &Policy, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(p)
}

/// Every upstream, in the order they were created. Upstreams are shared
/// between the snapshots of one process: a change copies only the upstream
/// it touches (`get_mut`), and reading a new table reuses the upstreams that
/// did not change.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Table {
    pub upstreams: Vec<Arc<Upstream>>,
}

impl Table {
    pub fn get(&self, name: &str) -> Option<&Upstream> {
        self.upstreams.iter().find(|u| u.name == name).map(|u| &**u)
    }

    /// The named upstream to change: this table's own copy of it.
    pub fn get_mut(&mut self, name: &str) -> Option<&mut Upstream> {
        self.upstreams
            .iter_mut()
            .find(|u| u.name == name)
            .map(Arc::make_mut)
    }

    /// Replaces the upstream of that name in place, or appends it.
    pub fn upsert(&mut self, upstream: Upstream) {
        match self.upstreams.iter_mut().find(|u| u.name == upstream.name) {
            Some(slot) => *slot = Arc::new(upstream),
            None => self.upstreams.push(Arc::new(upstream)),
        }
    }

    /// Removes the named upstream; `None` when there was none.
    pub fn remove(&mut self, name: &str) -> Option<Upstream> {
        let at = self.upstreams.iter().position(|u| u.name == name)?;
        Some(Arc::unwrap_or_clone(self.upstreams.remove(at)))
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.upstreams.iter().map(|u| u.name.as_str())
    }

    /// The upstreams by name, for work over whole tables: `get` is a linear
    /// search, fine for one name and quadratic for all of them.
    pub fn by_name(&self) -> HashMap<&str, &Upstream> {
        self.upstreams
            .iter()
            .map(|u| (u.name.as_str(), &**u))
            .collect()
    }

    /// Each name's position, borrowing the names as bytes.
    pub fn by_position(&self) -> HashMap<&[u8], usize> {
        self.upstreams
            .iter()
            .enumerate()
            .map(|(i, u)| (u.name.as_bytes(), i))
            .collect()
    }

    /// Pairs each upstream of `self` with the one of that name in `other`
    /// (or `None`): by position when both hold the same names in the same
    /// order (a change to one upstream leaves them so), by name otherwise.
    pub fn paired<'a>(&'a self, other: &'a Table) -> Vec<(&'a Upstream, Option<&'a Upstream>)> {
        let same_order = self.upstreams.len() == other.upstreams.len()
            && self
                .upstreams
                .iter()
                .zip(&other.upstreams)
                .all(|(a, b)| a.name == b.name);
        if same_order {
            return self
                .upstreams
                .iter()
                .zip(&other.upstreams)
                .map(|(a, b)| (&**a, Some(&**b)))
                .collect();
        }
        let names = other.by_name();
        self.upstreams
            .iter()
            .map(|a| (&**a, names.get(a.name.as_str()).copied()))
            .collect()
    }
}

/// A server entering or leaving rotation in one upstream at one version: the
/// unit `/ups/check` reports while some worker has not applied it yet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Change {
    pub version: u64,
    pub upstream: String,
    pub server: Address,
    /// `true`: the server left rotation (removed, marked down, or its upstream
    /// deleted); `false`: it entered rotation (added or restored).
    pub removed: bool,
}

impl Change {
    /// The servers whose rotation differs between `old` and `new`, stamped
    /// with `version`, upstream by upstream in table order.
    pub fn between(old: &Table, new: &Table, version: u64) -> Vec<Change> {
        let mut changes = Vec::new();
        let rotating = |u: Option<&Upstream>, a: &Address| {
            u.and_then(|u| u.server(a)).is_some_and(|s| s.in_rotation())
        };
        let mut note = |name: &str, a: &Address, before: bool, after: bool| {
            if before != after {
                changes.push(Change {
                    version,
                    upstream: name.to_owned(),
                    server: a.clone(),
                    removed: before,
                });
            }
        };
        // Shared or equal upstreams have nothing to report.
        let same = |a: &Upstream, b: Option<&Upstream>| {
            b.is_some_and(|b| std::ptr::eq(a, b) || a.servers == b.servers)
        };
        for (o, n) in old.paired(new) {
            if !same(o, n) {
                for s in &o.servers {
                    note(&o.name, &s.addr, s.in_rotation(), rotating(n, &s.addr));
                }
            }
        }
        for (n, o) in new.paired(old) {
            if !same(n, o) {
                for s in &n.servers {
                    if o.and_then(|o| o.server(&s.addr)).is_none() {
                        note(&n.name, &s.addr, false, s.in_rotation());
                    }
                }
            }
        }
        changes
    }
}

/// Checks an upstream name: 1 to 255 bytes of letters, digits, `.`, `-`, `_`.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("upstream name is empty".into());
    }
    if name.bytes().all(|b| b == b'.') {
        return Err(format!("upstream name {name:?} is only dots"));
    }
    if name.len() > NAME_MAX {
        return Err(format!(
            "upstream name is {} bytes long, at most {NAME_MAX} are allowed",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
    {
        return Err(format!(
            "upstream name {name:?} has {c:?}: only letters, digits, '.', '-' and '_' are allowed"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inet(s: &str) -> Address {
        Address::Inet(s.parse().unwrap())
    }

    #[test]
    fn addresses_print_as_nginx_spells_them() {
        assert_eq!(inet("127.0.0.1:8080").to_string(), "127.0.0.1:8080");
        assert_eq!(inet("[::1]:8080").to_string(), "[::1]:8080");
        assert_eq!(inet("[::1]:8080").host(), "[::1]");
        assert_eq!(Address::Unix("/tmp/s".into()).to_string(), "unix:/tmp/s");
        assert_eq!(Address::Unix("/tmp/s".into()).port(), 0);
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("dyhost").is_ok());
        assert!(check_name("a.b-c_9").is_ok());
        assert!(check_name(&"a".repeat(255)).is_ok());
        assert!(check_name(&"a".repeat(256))
            .unwrap_err()
            .contains("256 bytes"));
        assert!(check_name("").is_err());
        assert!(check_name("..").unwrap_err().contains("only dots"));
        assert!(check_name("a/b").unwrap_err().contains("'/'"));
        assert!(check_name("a b").is_err());
    }

    #[test]
    fn changes_name_servers_entering_and_leaving_rotation() {
        let a = ServerSpec::new(inet("10.0.0.1:80"));
        let b = ServerSpec::new(inet("10.0.0.2:80"));
        let mut old = Table::default();
        old.upsert(Upstream::new("u", vec![a.clone(), b.clone()]));
        old.upsert(Upstream::new("gone", vec![a.clone()]));

        let mut new = old.clone();
        new.get_mut("u").unwrap().servers[1].down = true;
        new.get_mut("u")
            .unwrap()
            .servers
            .push(ServerSpec::new(inet("10.0.0.3:80")));
        new.remove("gone");

        let changes = Change::between(&old, &new, 7);
        let summary: Vec<_> = changes
            .iter()
            .map(|c| {
                (
                    c.upstream.as_str(),
                    c.server.to_string(),
                    c.removed,
                    c.version,
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                ("u", "10.0.0.2:80".to_string(), true, 7),
                ("gone", "10.0.0.1:80".to_string(), true, 7),
                ("u", "10.0.0.3:80".to_string(), false, 7),
            ]
        );
        assert!(Change::between(&old, &old, 8).is_empty());
    }
}
