//! The upstream table: named upstreams, each an ordered list of servers with
//! nginx's own parameters and defaults. This is what the state file stores,
//! what the parser produces and what every interface shows.
//!
//! Over 600 lines with its tests: the table's types, with their limits and
//! nginx's defaults, read best together.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use serde::{Serialize, Serializer};

use crate::table::names::{DnsSettings, NamedServer, ServerParams};
use crate::table::policy::Policy;

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
/// `max_conns=` upper bound (0: no limit, as in nginx). nginx has none; a
/// million connections to one server is far past any real one.
pub const MAX_CONNS_MAX: u32 = 1_000_000;
/// `fail_timeout=` upper bound, in seconds (one day).
pub const FAIL_TIMEOUT_MAX: u32 = 86_400;
/// `slow_start=` upper bound, in seconds (one day, as `fail_timeout`).
pub const SLOW_START_MAX: u32 = 86_400;
/// nginx's defaults for a `server` line.
pub const DEFAULT_WEIGHT: u32 = 1;
pub const DEFAULT_MAX_FAILS: u32 = 1;
pub const DEFAULT_FAIL_TIMEOUT: u32 = 10;
/// The port nginx assumes when a `server` address has none.
pub const DEFAULT_PORT: u16 = 80;
/// nginx's defaults for `keepalive_requests`, `keepalive_time` and
/// `keepalive_timeout` (the last two in milliseconds, as nginx keeps them).
pub const DEFAULT_KEEPALIVE_REQUESTS: u32 = 1000;
pub const DEFAULT_KEEPALIVE_TIME: u32 = 3_600_000;
pub const DEFAULT_KEEPALIVE_TIMEOUT: u32 = 60_000;

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
    /// Connections in flight at which the server takes no new request
    /// until one ends; 0: no limit.
    pub max_conns: u32,
    pub max_fails: u32,
    /// Seconds, as nginx keeps it.
    pub fail_timeout: u32,
    /// NGINX Plus's `slow_start=`, in seconds (0: none): a server that
    /// becomes available again ramps up to its weight over this long.
    pub slow_start: u32,
    pub backup: bool,
    pub down: bool,
    /// The `server NAME` line this address came from: its index in the
    /// upstream's [`names`](Upstream::names); `None` for an address
    /// written as one.
    #[serde(skip)]
    pub from: Option<u16>,
}

impl ServerSpec {
    /// A server with nginx's defaults (those of [`ServerParams::default`],
    /// the one list of them), written as an address.
    pub fn new(addr: Address) -> ServerSpec {
        ServerParams::default().server(addr)
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
    pub max_conns: Option<u32>,
    pub max_fails: Option<u32>,
    pub fail_timeout: Option<u32>,
    pub slow_start: Option<u32>,
    pub backup: Option<bool>,
    pub down: Option<bool>,
}

impl ServerPatch {
    pub fn is_empty(&self) -> bool {
        *self == ServerPatch::default()
    }

    pub fn apply(&self, s: &mut ServerSpec) {
        s.weight = self.weight.unwrap_or(s.weight);
        s.max_conns = self.max_conns.unwrap_or(s.max_conns);
        s.max_fails = self.max_fails.unwrap_or(s.max_fails);
        s.fail_timeout = self.fail_timeout.unwrap_or(s.fail_timeout);
        s.slow_start = self.slow_start.unwrap_or(s.slow_start);
        s.backup = self.backup.unwrap_or(s.backup);
        s.down = self.down.unwrap_or(s.down);
    }
}

/// The probe a `check` line asks for (nginx_upstream_check_module's
/// `type=`); the types ngx.dyups takes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum CheckType {
    #[default]
    Tcp,
    Http,
    Https,
    SslHello,
}

impl CheckType {
    pub const ALL: [CheckType; 4] = [
        CheckType::Tcp,
        CheckType::Http,
        CheckType::Https,
        CheckType::SslHello,
    ];

    /// The module's spelling: `tcp`, `http`, `https`, `ssl_hello`.
    pub fn name(self) -> &'static str {
        match self {
            CheckType::Tcp => "tcp",
            CheckType::Http => "http",
            CheckType::Https => "https",
            CheckType::SslHello => "ssl_hello",
        }
    }

    pub fn from_name(name: &str) -> Option<CheckType> {
        CheckType::ALL.into_iter().find(|t| t.name() == name)
    }
}

impl Serialize for CheckType {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// nginx_upstream_check_module's defaults for a `check` line.
pub const DEFAULT_CHECK_INTERVAL: u32 = 30_000;
pub const DEFAULT_CHECK_RISE: u32 = 2;
pub const DEFAULT_CHECK_FALL: u32 = 5;
pub const DEFAULT_CHECK_TIMEOUT: u32 = 1000;
/// `check_http_send`'s default request.
pub const DEFAULT_CHECK_HTTP_SEND: &str = "GET / HTTP/1.0\r\n\r\n";
pub const DEFAULT_CHECK_KEEPALIVE_REQUESTS: u32 = 1;
/// Bounds of the `check` parameters: times in milliseconds up to a day,
/// counts up to 1000.
pub const CHECK_TIME_MAX: u32 = 86_400_000;
pub const CHECK_COUNT_MAX: u32 = 1000;
/// `check_http_send`: the longest request, in bytes.
pub const CHECK_HTTP_SEND_MAX: usize = 4096;
pub const CHECK_KEEPALIVE_REQUESTS_MAX: u32 = 1_000_000;

/// A `check` line: active health checks of every server of the upstream.
/// Times in milliseconds, as the module keeps them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CheckLine {
    /// Between two probes of one server.
    pub interval: u32,
    /// Successful probes in a row that bring a server up.
    pub rise: u32,
    /// Failed probes in a row that take it down.
    pub fall: u32,
    /// How long one probe may take.
    pub timeout: u32,
    /// Whether servers start down until their first `rise` probes pass.
    pub default_down: bool,
    #[serde(rename = "type")]
    pub kind: CheckType,
    /// The port probed; 0: the server's own.
    pub port: u16,
    /// Up to this much random delay before each probe (ours: spreads the
    /// probes of many servers).
    pub jitter: u32,
}

impl Default for CheckLine {
    fn default() -> CheckLine {
        CheckLine {
            interval: DEFAULT_CHECK_INTERVAL,
            rise: DEFAULT_CHECK_RISE,
            fall: DEFAULT_CHECK_FALL,
            timeout: DEFAULT_CHECK_TIMEOUT,
            default_down: true,
            kind: CheckType::Tcp,
            port: 0,
            jitter: 0,
        }
    }
}

/// `check_http_expect_alive`: the classes of HTTP status that count as a
/// passing probe, one bit each from `http_2xx` (bit 0) to `http_5xx`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExpectAlive(u8);

impl ExpectAlive {
    pub const NAMES: [&'static str; 4] = ["http_2xx", "http_3xx", "http_4xx", "http_5xx"];

    /// The classes of the bits set in `bits`, bit `i` for
    /// [`NAMES`](Self::NAMES)`[i]`; `None` for no class or an unknown bit.
    pub fn from_bits(bits: u8) -> Option<ExpectAlive> {
        (bits != 0 && bits < 1 << Self::NAMES.len()).then_some(ExpectAlive(bits))
    }

    pub fn bits(self) -> u8 {
        self.0
    }

    /// The bit of class `name`, if it is one.
    pub fn bit(name: &str) -> Option<u8> {
        Self::NAMES.iter().position(|n| *n == name).map(|i| 1 << i)
    }

    /// The names of the classes, from 2xx to 5xx.
    pub fn names(self) -> impl Iterator<Item = &'static str> {
        Self::NAMES
            .into_iter()
            .enumerate()
            .filter(move |(i, _)| self.0 & (1 << i) != 0)
            .map(|(_, n)| n)
    }
}

impl Default for ExpectAlive {
    /// `http_2xx http_3xx`, the module's default.
    fn default() -> ExpectAlive {
        ExpectAlive(0b11)
    }
}

impl Serialize for ExpectAlive {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.names())
    }
}

/// What nginx_upstream_check_module's lines say about an upstream. Kept
/// whole by per-server changes; replaced with the rest of the definition by
/// an update.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CheckSettings {
    /// The `check` line; `None`: no active checks.
    #[serde(rename = "check")]
    pub line: Option<CheckLine>,
    /// `check_http_send`: the request an `http` probe sends, escapes
    /// applied (real CR and LF bytes).
    #[serde(rename = "check_http_send")]
    pub http_send: String,
    #[serde(rename = "check_http_expect_alive")]
    pub http_expect_alive: ExpectAlive,
    #[serde(rename = "check_keepalive_requests")]
    pub keepalive_requests: u32,
}

impl CheckSettings {
    /// Whether every setting is the module's default (without building one:
    /// decoding a large table asks this of every upstream).
    pub fn is_default(&self) -> bool {
        self.line.is_none()
            && self.http_send == DEFAULT_CHECK_HTTP_SEND
            && self.http_expect_alive == ExpectAlive::default()
            && self.keepalive_requests == DEFAULT_CHECK_KEEPALIVE_REQUESTS
    }
}

impl Default for CheckSettings {
    fn default() -> CheckSettings {
        CheckSettings {
            line: None,
            http_send: DEFAULT_CHECK_HTTP_SEND.to_owned(),
            http_expect_alive: ExpectAlive::default(),
            keepalive_requests: DEFAULT_CHECK_KEEPALIVE_REQUESTS,
        }
    }
}

/// Whether `s` may be a `check_http_send` request: what the parser can
/// produce and the upstream file can hold (`""` and control characters
/// other than tab, CR and LF cannot).
pub fn check_http_send(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("check_http_send: the request is empty".into());
    }
    if s.len() > CHECK_HTTP_SEND_MAX {
        return Err(format!(
            "check_http_send: the request is {} bytes long, at most {CHECK_HTTP_SEND_MAX} are allowed",
            s.len()
        ));
    }
    if let Some(c) = s
        .chars()
        .find(|&c| c.is_control() && !matches!(c, '\t' | '\r' | '\n'))
    {
        return Err(format!(
            "check_http_send: control character U+{:04X} in the request",
            c as u32
        ));
    }
    Ok(())
}

/// Which cell of the zone ([`crate::store::zone`]) holds a server's shared
/// state: what the table stores per server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PeerRef {
    pub index: u32,
    /// Stamped when the cell was given to this server; never 0.
    pub tag: u32,
}

impl PeerRef {
    /// No shared cell (the zone was full, or the table was never stored).
    pub const NONE: PeerRef = PeerRef {
        index: u32::MAX,
        tag: 0,
    };

    pub fn is_none(self) -> bool {
        self.index == u32::MAX
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
    /// `keepalive_requests`, `keepalive_time` and `keepalive_timeout`
    /// (milliseconds), as given: kept and shown like `keepalive`.
    pub keepalive_requests: u32,
    pub keepalive_time: u32,
    pub keepalive_timeout: u32,
    /// The lines of nginx_upstream_check_module.
    #[serde(flatten)]
    pub check: CheckSettings,
    pub servers: Vec<ServerSpec>,
    /// Its `server NAME ...;` lines, as written; the addresses each
    /// resolved to are among `servers` (see [`ServerSpec::from`]).
    #[serde(skip)]
    pub names: Vec<NamedServer>,
    /// Its `resolver` and `resolver_timeout` lines.
    #[serde(skip)]
    pub dns: DnsSettings,
    /// The table version at which this upstream last changed. Kept by the
    /// store; lets a worker keep the balancing state of upstreams that did
    /// not change.
    #[serde(skip)]
    pub rev: u64,
    /// Each server's cell of shared peer state, index for index with
    /// `servers` once the store has written the table (empty before). Given
    /// and kept by the store; see [`crate::store::zone`].
    #[serde(skip)]
    pub peers: Vec<PeerRef>,
    /// Who writes it: `dyups sync` for an upstream it took from etcd, whose
    /// local writes are refused (see [`Owner`]).
    #[serde(skip_serializing_if = "Owner::is_local")]
    pub owner: Owner,
}

/// Who may change an upstream. An upstream `dyups sync` wrote from etcd
/// belongs to etcd: a local write to it (REST, Lua, `/ups`, `dyups apply`)
/// is refused with 409 and a message naming the etcd key to write instead,
/// so that the next change in etcd does not silently undo it, and one host
/// does not drift from the fleet. Upstreams created locally stay local.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Owner {
    #[default]
    Local,
    Etcd,
}

impl Owner {
    pub fn is_local(&self) -> bool {
        *self == Owner::Local
    }
}

/// Where the table stands with etcd, kept in the same payload as the
/// upstreams `dyups sync` wrote, so both change in one write: a restart
/// resumes watching after `revision`, and a crash never leaves a revision
/// that the table does not hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncMark {
    /// The etcd revision the table holds every change up to.
    pub revision: u64,
    /// The etcd cluster's id: another cluster's revisions mean nothing here.
    pub cluster_id: u64,
    /// The key prefix the upstreams are under (`/dyups/`), so a refusal
    /// names the key to write.
    pub prefix: String,
}

impl SyncMark {
    /// The etcd key of the upstream `name`.
    pub fn key_of(&self, name: &str) -> String {
        format!("{}upstreams/{name}", self.prefix)
    }
}

impl Upstream {
    pub fn new(name: impl Into<String>, servers: Vec<ServerSpec>) -> Upstream {
        Upstream {
            name: name.into(),
            policy: Policy::RoundRobin,
            keepalive: 0,
            keepalive_requests: DEFAULT_KEEPALIVE_REQUESTS,
            keepalive_time: DEFAULT_KEEPALIVE_TIME,
            keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT,
            check: CheckSettings::default(),
            servers,
            names: Vec::new(),
            dns: DnsSettings::default(),
            rev: 0,
            peers: Vec::new(),
            owner: Owner::Local,
        }
    }

    /// Whether `other` has the same name, method and settings (every line
    /// but the `server` ones), and the same owner: what [`same_content`]
    /// (Self::same_content) and [`same_definition`](Self::same_definition)
    /// both compare before the servers.
    fn same_settings(&self, other: &Upstream) -> bool {
        self.name == other.name
            && self.policy == other.policy
            && self.keepalive == other.keepalive
            && self.keepalive_requests == other.keepalive_requests
            && self.keepalive_time == other.keepalive_time
            && self.keepalive_timeout == other.keepalive_timeout
            && self.check == other.check
            && self.dns == other.dns
            && self.owner == other.owner
    }

    /// Whether `other` says the same: name, method, every setting and the
    /// servers. What the store keeps (`rev`, `peers`) does not count.
    pub fn same_content(&self, other: &Upstream) -> bool {
        self.same_settings(other) && self.servers == other.servers && self.names == other.names
    }

    /// Whether `other` says the same as written: as [`same_content`]
    /// (Self::same_content), but its `server NAME` lines compared as lines,
    /// whatever their names resolved to, and the servers those made left
    /// out. What a re-read of a file that names hosts is compared by.
    pub fn same_definition(&self, other: &Upstream) -> bool {
        let literal = |u: &Upstream| -> Vec<ServerSpec> {
            u.servers
                .iter()
                .filter(|s| s.from.is_none())
                .cloned()
                .collect()
        };
        self.same_settings(other)
            && self.names.len() == other.names.len()
            && self
                .names
                .iter()
                .zip(&other.names)
                .all(|(a, b)| a.same_line(b))
            && literal(self) == literal(other)
    }

    /// The shared cell of server `index`, if it has one.
    pub fn peer(&self, index: usize) -> PeerRef {
        self.peers.get(index).copied().unwrap_or(PeerRef::NONE)
    }

    /// Whether some server is a primary (not `backup`): nginx refuses an
    /// upstream without one ("no servers in upstream").
    pub fn has_primary(&self) -> bool {
        self.servers.iter().any(|s| !s.backup)
            || self
                .names
                .iter()
                .any(|n| n.is_pending() && !n.params.backup)
    }

    /// Whether some `server NAME` line still waits for its first answer.
    pub fn has_pending(&self) -> bool {
        self.names.iter().any(NamedServer::is_pending)
    }

    /// The `server NAME` line `host:port` names, by index.
    pub fn named(&self, host: &str, port: u16) -> Option<usize> {
        self.names.iter().position(|n| n.is(host, port))
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
    /// Set by `dyups sync`: the etcd revision this table follows.
    #[serde(skip)]
    pub sync: Option<SyncMark>,
}

/// Whether two upstream names are the same upstream: without regard to
/// ASCII case, as nginx and ngx_http_dyups_module compare them
/// (`ngx_strncasecmp`), since nginx lower-cases `$host`.
pub fn same_name(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

/// The key an upstream is looked up by: its name in lower case.
pub fn name_key(name: &str) -> std::borrow::Cow<'_, str> {
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        name.to_ascii_lowercase().into()
    } else {
        name.into()
    }
}

impl Table {
    /// The upstream of that name, in any case (see [`same_name`]).
    pub fn get(&self, name: &str) -> Option<&Upstream> {
        self.upstreams
            .iter()
            .find(|u| same_name(&u.name, name))
            .map(|u| &**u)
    }

    /// The named upstream to change: this table's own copy of it.
    pub fn get_mut(&mut self, name: &str) -> Option<&mut Upstream> {
        self.upstreams
            .iter_mut()
            .find(|u| same_name(&u.name, name))
            .map(Arc::make_mut)
    }

    /// Replaces the upstream of that name in place, or appends it. A
    /// replaced upstream keeps the spelling it was created with: the name is
    /// what other tables, the change log and the shared cells pair it by.
    pub fn upsert(&mut self, mut upstream: Upstream) {
        match self
            .upstreams
            .iter_mut()
            .find(|u| same_name(&u.name, &upstream.name))
        {
            Some(slot) => {
                upstream.name.clone_from(&slot.name);
                *slot = Arc::new(upstream);
            }
            None => self.upstreams.push(Arc::new(upstream)),
        }
    }

    /// Removes the named upstream; `None` when there was none.
    pub fn remove(&mut self, name: &str) -> Option<Upstream> {
        let at = self
            .upstreams
            .iter()
            .position(|u| same_name(&u.name, name))?;
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
    fn check_settings_know_their_defaults() {
        assert!(CheckSettings::default().is_default());
        let changes: [fn(&mut CheckSettings); 4] = [
            |c| c.line = Some(CheckLine::default()),
            |c| c.http_send.push(' '),
            |c| c.http_expect_alive = ExpectAlive::from_bits(1).unwrap(),
            |c| c.keepalive_requests = 2,
        ];
        for change in changes {
            let mut c = CheckSettings::default();
            change(&mut c);
            assert!(!c.is_default(), "{c:?}");
        }
    }

    #[test]
    fn a_new_server_has_nginx_defaults() {
        // nginx's documented defaults, spelled out: weight=1 max_fails=1
        // fail_timeout=10s, no max_conns, no slow_start, neither backup nor down.
        let s = ServerSpec::new(inet("10.0.0.1:80"));
        let want = ServerSpec {
            addr: inet("10.0.0.1:80"),
            weight: 1,
            max_conns: 0,
            max_fails: 1,
            fail_timeout: 10,
            slow_start: 0,
            backup: false,
            down: false,
            from: None,
        };
        assert_eq!(s, want);
        assert_eq!(ServerParams::of(&s), ServerParams::default());
    }

    #[test]
    fn every_setting_counts_in_both_comparisons_and_what_the_store_keeps_in_neither() {
        let mut base = Upstream::new("u", vec![ServerSpec::new(inet("10.0.0.1:80"))]);
        let line = NamedServer::new("app.internal".into(), None, ServerParams::default(), true);
        base.names.push(line);
        type Edit = fn(&mut Upstream);
        let changes: [(&str, Edit); 11] = [
            ("name", |u| u.name = "v".into()),
            ("method", |u| u.policy = Policy::LeastConn),
            ("keepalive", |u| u.keepalive = 8),
            ("keepalive_requests", |u| u.keepalive_requests += 1),
            ("keepalive_time", |u| u.keepalive_time += 1),
            ("keepalive_timeout", |u| u.keepalive_timeout += 1),
            ("check", |u| u.check.http_send.push(' ')),
            ("resolver", |u| u.dns.valid = Some(30)),
            ("owner", |u| u.owner = Owner::Etcd),
            ("a server", |u| u.servers[0].weight = 2),
            ("a server NAME line", |u| u.names[0].params.weight = 2),
        ];
        for (what, change) in changes {
            let mut other = base.clone();
            change(&mut other);
            assert!(!base.same_content(&other), "{what}");
            assert!(!base.same_definition(&other), "{what}");
        }
        let mut stored = base.clone();
        stored.rev = 7;
        stored.peers = vec![PeerRef::NONE];
        assert!(base.same_content(&stored) && base.same_definition(&stored));
        // What a name resolved to is content, not definition.
        let mut resolved = base.clone();
        let mut found = ServerSpec::new(inet("10.0.0.9:80"));
        found.from = Some(0);
        resolved.servers.push(found);
        resolved.names[0].resolved_ms = 5000;
        assert!(base.same_definition(&resolved));
        assert!(!base.same_content(&resolved));
    }

    #[test]
    fn names_are_one_upstream_in_any_case() {
        let mut t = Table::default();
        t.upsert(Upstream::new("Foo.Example", vec![]));
        t.upsert(Upstream::new(
            "FOO.example",
            vec![ServerSpec::new(inet("10.0.0.1:80"))],
        ));
        assert_eq!(t.names().collect::<Vec<_>>(), ["Foo.Example"]);
        assert_eq!(t.get("foo.example").unwrap().servers.len(), 1);
        assert!(t.get_mut("FOO.EXAMPLE").is_some());
        assert_eq!(name_key("Foo.Example"), "foo.example");
        assert!(matches!(name_key("foo"), std::borrow::Cow::Borrowed(_)));
        assert!(t.remove("foo.EXAMPLE").is_some());
        assert!(t.upstreams.is_empty());
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
