//! Servers by host name: `server NAME[:PORT] [PARAMS] [resolve];` lines,
//! the `resolver` settings of an upstream, and how the addresses a name
//! resolves to become servers of the table.
//!
//! The table keeps each line as written (a [`NamedServer`]) beside its
//! upstream's servers; every address the name resolved to is a server of
//! its own, with the line's parameters and [`ServerSpec::from`] naming the
//! line. The balancer only ever sees those addresses. Resolving is not done
//! here: the DNS client (`crate::dns`, or the Lua cosockets of the binding)
//! asks, and [`resolve_pending`] and [`apply_lookup`] put its answers in.
//!
//! A line with `service=` asks for SRV records instead, as nginx ≥ 1.27.3
//! does: each record's target, resolved, is a server at the record's
//! port, with the record's weight (unless the line gives one), and the
//! records of a priority above the lowest are backups ([`Endpoint`]).
//!
//! Over 600 lines with its tests: the lines, their answers and the rules
//! that keep an upstream in service read best together.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use serde::Serialize;

use crate::table::model::{
    Address, ServerSpec, Table, Upstream, DEFAULT_FAIL_TIMEOUT, DEFAULT_MAX_FAILS, DEFAULT_PORT,
    DEFAULT_WEIGHT, WEIGHT_MAX, WEIGHT_MIN,
};
use crate::table::policy::Policy;

/// Longest host name, in bytes (RFC 1035's 253 characters of text).
pub const HOST_MAX: usize = 253;
/// Most `server NAME` lines of one upstream (the state file keeps them in
/// one field of at most 64 KiB).
pub const NAMES_MAX: usize = 100;
/// Most addresses of one `resolver` line.
pub const RESOLVERS_MAX: usize = 8;
/// How long a lookup may take when no `resolver_timeout` says: nginx's
/// default is 30 s, which would hold a write that long on a dead resolver.
pub const DEFAULT_RESOLVER_TIMEOUT_MS: u32 = 5000;
/// `valid=` and `resolver_timeout` upper bound: one day.
pub const DNS_TIME_MAX_MS: u32 = 86_400_000;

/// A server's parameters, without its address: what a `server NAME` line
/// gives every address its name resolves to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ServerParams {
    pub weight: u32,
    pub max_conns: u32,
    pub max_fails: u32,
    pub fail_timeout: u32,
    /// Seconds a server put back ramps up to its weight over (0: none).
    pub slow_start: u32,
    pub backup: bool,
    pub down: bool,
}

impl Default for ServerParams {
    fn default() -> ServerParams {
        ServerParams {
            weight: DEFAULT_WEIGHT,
            max_conns: 0,
            max_fails: DEFAULT_MAX_FAILS,
            fail_timeout: DEFAULT_FAIL_TIMEOUT,
            slow_start: 0,
            backup: false,
            down: false,
        }
    }
}

impl ServerParams {
    pub fn of(s: &ServerSpec) -> ServerParams {
        ServerParams {
            weight: s.weight,
            max_conns: s.max_conns,
            max_fails: s.max_fails,
            fail_timeout: s.fail_timeout,
            slow_start: s.slow_start,
            backup: s.backup,
            down: s.down,
        }
    }

    /// The server at `addr` with these parameters.
    pub fn server(&self, addr: Address) -> ServerSpec {
        ServerSpec {
            addr,
            weight: self.weight,
            max_conns: self.max_conns,
            max_fails: self.max_fails,
            fail_timeout: self.fail_timeout,
            slow_start: self.slow_start,
            backup: self.backup,
            down: self.down,
            from: None,
        }
    }
}

/// A `server NAME[:PORT] [PARAMS] [resolve];` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedServer {
    /// The host name as written (compared without regard to case).
    pub host: String,
    /// The port as written; `None`: nginx's 80.
    pub port: Option<u16>,
    pub params: ServerParams,
    /// Re-resolved for the life of the upstream (nginx's `resolve`);
    /// otherwise resolved once, when the line is written.
    pub resolve: bool,
    /// When the addresses the table holds for it were resolved, Unix ms;
    /// 0 while the line waits for its first answer (it is then
    /// [pending](Self::is_pending), and no table with it is stored).
    pub resolved_ms: u64,
    /// The TTL of that answer, seconds.
    pub ttl: u32,
    /// `service=NAME`: the servers are the name's SRV records (see
    /// [`query_name`](Self::query_name)); the line has no port.
    pub service: Option<String>,
}

impl NamedServer {
    pub fn new(host: String, port: Option<u16>, params: ServerParams, resolve: bool) -> Self {
        NamedServer {
            host,
            port,
            params,
            resolve,
            resolved_ms: 0,
            ttl: 0,
            service: None,
        }
    }

    /// The name asked of DNS: the host, or for `service=` the SRV name
    /// nginx asks, `_SERVICE._tcp.HOST`, or `SERVICE.HOST` when the
    /// service has a dot already (`service=_sip._udp`).
    pub fn query_name(&self) -> String {
        let host = self.host.strip_suffix('.').unwrap_or(&self.host);
        match &self.service {
            Some(s) if s.contains('.') => format!("{s}.{host}"),
            Some(s) => format!("_{s}._tcp.{host}"),
            None => host.to_owned(),
        }
    }

    /// Whether it still waits for its first answer.
    pub fn is_pending(&self) -> bool {
        self.resolved_ms == 0
    }

    /// The port its addresses are served on.
    pub fn port(&self) -> u16 {
        self.port.unwrap_or(DEFAULT_PORT)
    }

    /// `NAME` or `NAME:PORT`, as written: what names the line in messages
    /// and in the per-server paths.
    pub fn target(&self) -> String {
        match self.port {
            Some(p) => format!("{}:{p}", self.host),
            None => self.host.clone(),
        }
    }

    /// Whether `other` is the same line as written (what is resolved
    /// aside).
    pub fn same_line(&self, other: &NamedServer) -> bool {
        self.host.eq_ignore_ascii_case(&other.host)
            && self.port() == other.port()
            && self.params == other.params
            && self.resolve == other.resolve
            && self.service == other.service
    }

    /// What `policy` refuses of the line's parameters, as
    /// [`Policy::validate`] refuses them on a server, naming the line.
    pub fn refused_by(&self, policy: &Policy) -> Option<String> {
        let param = match self.params {
            _ if policy.allows_backup() => return None,
            ServerParams { backup: true, .. } => "backup",
            ServerParams {
                slow_start: 1.., ..
            } => "slow_start",
            _ => return None,
        };
        Some(format!(
            "balancing method \"{}\" does not support parameter \"{param}\" (server {})",
            policy.name(),
            self.target()
        ))
    }

    /// Whether `host` and `port` name this line: the same host in any
    /// case, the same port (80 when none is given).
    pub fn is(&self, host: &str, port: u16) -> bool {
        self.host.eq_ignore_ascii_case(host) && self.port() == port
    }
}

/// An upstream's `resolver` and `resolver_timeout` lines.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DnsSettings {
    /// The name servers to ask, in order; empty: the default (init's
    /// `resolver`, else `/etc/resolv.conf`).
    pub resolvers: Vec<SocketAddr>,
    /// `valid=`: how long an answer is used, seconds, instead of its TTL.
    pub valid: Option<u32>,
    /// `ipv6=on|off`; `None`: as the default resolver says (on, as nginx).
    pub ipv6: Option<bool>,
    /// `resolver_timeout`, milliseconds.
    pub timeout_ms: Option<u32>,
}

impl DnsSettings {
    pub fn is_default(&self) -> bool {
        *self == DnsSettings::default()
    }
}

/// What one lookup of a name found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// Its addresses (at least one) and the smallest TTL of their records.
    Found { addrs: Vec<IpAddr>, ttl: u32 },
    /// The name has no address: NXDOMAIN, or no record of the types asked.
    NotFound(String),
    /// No answer to trust: a timeout, SERVFAIL, a refusal, a bad reply.
    Failed(String),
    /// For an SRV query: where the service is (at least one endpoint),
    /// and the smallest TTL of the records and their targets' addresses.
    Service {
        endpoints: Vec<SrvEndpoint>,
        ttl: u32,
    },
}

/// One address an SRV record's target resolved to, with the record's
/// port, weight and priority.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SrvEndpoint {
    pub priority: u16,
    pub addr: SocketAddr,
    /// The record's, at least 1.
    pub weight: u16,
}

/// A server one answer makes of a line: its address, weight and whether
/// it is a backup.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Endpoint {
    pub addr: Address,
    pub weight: u32,
    pub backup: bool,
}

/// The servers `lookup` makes of `line` in an upstream balanced by
/// `policy`, in the answer's order; none for a lookup without addresses.
///
/// An address answer: each address at the line's port, with its
/// parameters. An SRV answer, as nginx ≥ 1.27.3 makes it: the record's
/// port; the line's weight when it gives one (not 1), else the record's
/// (at most [`WEIGHT_MAX`](crate::table::model::WEIGHT_MAX)); the records
/// of the lowest priority present are the line's servers and the others
/// backups, unless the line is a backup itself or the method takes no
/// backups: then only the lowest priority is used (nginx has no list to
/// put the others in). An address two records give is one server, the
/// first's.
pub fn endpoints(line: &NamedServer, policy: &Policy, lookup: &Lookup) -> Vec<Endpoint> {
    let p = &line.params;
    match lookup {
        Lookup::Found { addrs, .. } => addrs
            .iter()
            .map(|ip| Endpoint {
                addr: Address::Inet(SocketAddr::new(*ip, line.port())),
                weight: p.weight,
                backup: p.backup,
            })
            .collect(),
        Lookup::Service { endpoints, .. } => {
            let lowest = endpoints.iter().map(|e| e.priority).min().unwrap_or(0);
            let tiers = !p.backup && policy.allows_backup();
            let mut out: Vec<Endpoint> = Vec::new();
            for e in endpoints {
                if e.priority != lowest && !tiers {
                    continue;
                }
                let addr = Address::Inet(e.addr);
                if out.iter().any(|o| o.addr == addr) {
                    continue;
                }
                out.push(Endpoint {
                    addr,
                    weight: if p.weight != DEFAULT_WEIGHT {
                        p.weight
                    } else {
                        u32::from(e.weight).clamp(WEIGHT_MIN, WEIGHT_MAX)
                    },
                    backup: p.backup || e.priority != lowest,
                });
            }
            out
        }
        Lookup::NotFound(_) | Lookup::Failed(_) => Vec::new(),
    }
}

/// The key of one lookup: the name asked in lower case, whether AAAA
/// records are asked for too, and whether it is an SRV query.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Query {
    pub host: String,
    pub ipv6: bool,
    pub srv: bool,
}

impl Query {
    /// The address lookup of `host`.
    pub fn new(host: &str, ipv6: bool) -> Query {
        Query {
            host: host.to_ascii_lowercase(),
            ipv6,
            srv: false,
        }
    }

    /// The lookup `line` needs: its host's addresses, or its SRV name's
    /// records (and their targets' addresses).
    pub fn of(line: &NamedServer, ipv6: bool) -> Query {
        Query {
            host: line.query_name().to_ascii_lowercase(),
            ipv6,
            srv: line.service.is_some(),
        }
    }
}

/// Answers gathered before a write, by query.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Answers {
    pub found: HashMap<Query, Lookup>,
    /// When they were asked, Unix ms.
    pub at_ms: u64,
    /// Whether an upstream without `ipv6=` asked for AAAA records.
    pub default_ipv6: bool,
}

/// Whether the upstream asks for AAAA records besides A ones: its
/// `ipv6=`, else `default_ipv6` (init's resolver, on by default).
pub fn wants_ipv6(u: &Upstream, default_ipv6: bool) -> bool {
    u.dns.ipv6.unwrap_or(default_ipv6)
}

/// The lookups the pending lines of `table` need, each once.
pub fn pending_queries(table: &Table, default_ipv6: bool) -> Vec<(Query, &Upstream)> {
    let mut out: Vec<(Query, &Upstream)> = Vec::new();
    for u in &table.upstreams {
        for n in u.names.iter().filter(|n| n.is_pending()) {
            let q = Query::of(n, wants_ipv6(u, default_ipv6));
            if !out.iter().any(|(o, _)| *o == q) {
                out.push((q, u));
            }
        }
    }
    out
}

/// Gives every pending line of `table` its addresses from `answers`, each
/// a server with the line's parameters where the line stands. A name that
/// did not resolve refuses the whole change, naming it.
pub fn resolve_pending(table: &mut Table, answers: &Answers) -> Result<(), String> {
    let default_ipv6 = answers.default_ipv6;
    let pending: Vec<String> = table
        .upstreams
        .iter()
        .filter(|u| u.names.iter().any(NamedServer::is_pending))
        .map(|u| u.name.clone())
        .collect();
    for name in pending {
        let u = table.get_mut(&name).expect("listed above");
        let ipv6 = wants_ipv6(u, default_ipv6);
        for i in 0..u.names.len() {
            if !u.names[i].is_pending() {
                continue;
            }
            let n = &u.names[i];
            let line = format!("upstream {}: server {}", u.name, n.target());
            let (wanted, ttl) = match answers.found.get(&Query::of(n, ipv6)) {
                Some(l @ (Lookup::Found { ttl, .. } | Lookup::Service { ttl, .. })) => {
                    (endpoints(n, &u.policy, l), *ttl)
                }
                Some(Lookup::NotFound(why) | Lookup::Failed(why)) => {
                    return Err(format!(
                        "{line}: host name {:?} does not resolve: {why}; nothing changed",
                        n.host
                    ))
                }
                None => {
                    return Err(format!(
                        "{line}: host name {:?} was not resolved before the write; nothing changed",
                        n.host
                    ))
                }
            };
            place(u, i, &wanted);
            let n = &mut u.names[i];
            n.resolved_ms = answers.at_ms.max(1);
            n.ttl = ttl;
        }
        if !u.has_primary() {
            return Err(crate::table::syntax::only_backups(&u.name));
        }
    }
    Ok(())
}

/// Puts the servers of line `i` of `u` at `wanted`, keeping the ones
/// that stay where they are (their `down` too; the store keeps their
/// cells, pairing by address; an SRV record's new weight or priority is
/// theirs now) and putting new ones after the line's last server, or at
/// the end when it has none. An address another line already has stays
/// that line's.
fn place(u: &mut Upstream, i: usize, wanted: &[Endpoint]) {
    let line = i as u16;
    let params = u.names[i].params;
    u.servers
        .retain(|s| s.from != Some(line) || wanted.iter().any(|w| w.addr == s.addr));
    for s in u.servers.iter_mut().filter(|s| s.from == Some(line)) {
        if let Some(w) = wanted.iter().find(|w| w.addr == s.addr) {
            s.weight = w.weight;
            s.backup = w.backup;
        }
    }
    let mut at = u
        .servers
        .iter()
        .rposition(|s| s.from == Some(line))
        .map_or(u.servers.len(), |p| p + 1);
    for w in wanted {
        if u.servers.iter().any(|s| s.addr == w.addr) {
            continue;
        }
        let mut s = params.server(w.addr.clone());
        s.weight = w.weight;
        s.backup = w.backup;
        s.from = Some(line);
        u.servers.insert(at, s);
        at += 1;
    }
    // Index for index with the servers, which moved: the store pairs the
    // cells again by address.
    u.peers.clear();
}

/// What [`apply_lookup`] did to one line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    /// The servers are the answer's addresses now.
    Changed,
    /// The answer holds the addresses the table has.
    Same,
    /// NXDOMAIN removed every server of the line but these: the last
    /// available servers of the upstream, kept.
    KeptLast(Vec<Address>),
    /// The line is gone or was written again since it was asked about.
    Gone,
}

/// Whether the servers line `i` of `u` made are `wanted` already (in any
/// order): what a lookup that found the same makes no write for.
pub fn holds(u: &Upstream, i: usize, wanted: &[Endpoint]) -> bool {
    let mut have: Vec<Endpoint> = u
        .servers
        .iter()
        .filter(|s| s.from == Some(i as u16))
        .map(|s| Endpoint {
            addr: s.addr.clone(),
            weight: s.weight,
            backup: s.backup,
        })
        .collect();
    have.sort();
    let mut want = wanted.to_vec();
    want.sort();
    want.dedup_by(|a, b| a.addr == b.addr);
    have == want
}

/// Puts a re-resolution's answer into line `line` of upstream `name`: the
/// answer found (a [`Lookup::Found`] or [`Lookup::Service`]), or
/// [`Lookup::NotFound`] for NXDOMAIN (a failed lookup changes nothing,
/// and is not given here). Never leaves the upstream without a server in
/// rotation, nor without a primary: those are kept, and said.
pub fn apply_lookup(
    table: &mut Table,
    name: &str,
    line: &NamedServer,
    lookup: &Lookup,
    ttl: u32,
    now_ms: u64,
) -> Applied {
    let Some(u) = table.get(name) else {
        return Applied::Gone;
    };
    let Some(i) = u.names.iter().position(|n| n.same_line(line)) else {
        return Applied::Gone;
    };
    let wanted = endpoints(&u.names[i], &u.policy, lookup);
    if holds(u, i, &wanted) {
        return Applied::Same;
    }
    let mut candidate = u.clone();
    place(&mut candidate, i, &wanted);
    let mut kept = Vec::new();
    if candidate.in_rotation() == 0 || !candidate.has_primary() {
        // Keep the line's servers that leave the upstream with a server in
        // rotation and a primary: the first one that does it.
        let old: Vec<ServerSpec> = u
            .servers
            .iter()
            .filter(|s| s.from == Some(i as u16) && !wanted.iter().any(|w| w.addr == s.addr))
            .cloned()
            .collect();
        let mut keep = None;
        for s in &old {
            let mut with = wanted.clone();
            with.push(Endpoint {
                addr: s.addr.clone(),
                weight: s.weight,
                backup: s.backup,
            });
            let mut c = u.clone();
            place(&mut c, i, &with);
            if c.in_rotation() > 0 && c.has_primary() {
                keep = Some((c, s.addr.clone()));
                break;
            }
        }
        match keep {
            Some((c, a)) => {
                candidate = c;
                kept.push(a);
            }
            None => {
                // Only all of them together keep it in service.
                kept = old.iter().map(|s| s.addr.clone()).collect();
                candidate = u.clone();
            }
        }
    }
    if candidate.servers == u.servers {
        // What is kept is what there was: no write to make.
        return Applied::KeptLast(kept);
    }
    candidate.names[i].resolved_ms = now_ms.max(1);
    candidate.names[i].ttl = ttl;
    *table.get_mut(name).expect("found above") = candidate;
    if kept.is_empty() {
        Applied::Changed
    } else {
        Applied::KeptLast(kept)
    }
}

/// Checks a host name as a server line may hold it: dot-separated labels
/// of letters, digits, `-` and `_`, each 1 to 63 bytes, 253 in all, not
/// beginning or ending with `-`, and not a number (a mistyped IPv4
/// address is not a name).
pub fn check_host(host: &str) -> Result<(), String> {
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.is_empty() {
        return Err(format!("{host:?}: the host name is empty"));
    }
    if name.len() > HOST_MAX {
        return Err(format!(
            "{host:?}: a host name is at most {HOST_MAX} bytes long"
        ));
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!(
                "{host:?}: each label of a host name is 1 to 63 bytes long"
            ));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_')))
        {
            return Err(format!(
                "{host:?}: a host name has letters, digits, '-', '_' and '.', not {c:?}"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!(
                "{host:?}: a label of a host name does not begin or end with '-'"
            ));
        }
    }
    if name.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(format!("{host:?} is not an IPv4 address"));
    }
    Ok(())
}

/// Checks the value of `service=`: labels of letters, digits, `-` and
/// `_` (`http`, `_sip._udp`), which with the host make the SRV name.
pub fn check_service(service: &str) -> Result<(), String> {
    if service.is_empty() {
        return Err("service is empty".into());
    }
    for label in service.split('.') {
        if label.is_empty()
            || label.len() > 63
            || !label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
        {
            return Err(format!(
                "service {service:?}: labels of 1 to 63 letters, digits, '-' and '_', \
                 separated by '.'"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn named(host: &str, port: u16, resolve: bool) -> NamedServer {
        NamedServer::new(host.into(), Some(port), ServerParams::default(), resolve)
    }

    fn found_at(addrs: &[IpAddr]) -> Lookup {
        Lookup::Found {
            addrs: addrs.to_vec(),
            ttl: 1,
        }
    }

    fn nx() -> Lookup {
        Lookup::NotFound("NXDOMAIN".into())
    }

    fn addrs(u: &Upstream) -> Vec<String> {
        u.servers.iter().map(|s| s.addr.to_string()).collect()
    }

    fn upstream_with(lines: Vec<NamedServer>, literal: &[&str]) -> Table {
        let servers = literal
            .iter()
            .map(|a| ServerSpec::new(Address::Inet(a.parse().unwrap())))
            .collect();
        let mut u = Upstream::new("u", servers);
        u.names = lines;
        let mut t = Table::default();
        t.upsert(u);
        t
    }

    fn answers(pairs: &[(&str, Lookup)]) -> Answers {
        Answers {
            found: pairs
                .iter()
                .map(|(h, l)| (Query::new(h, true), l.clone()))
                .collect(),
            at_ms: 5000,
            default_ipv6: true,
        }
    }

    #[test]
    fn host_names_are_checked() {
        for good in [
            "app.internal",
            "a",
            "x-1.example.com.",
            "_http._tcp.example",
        ] {
            assert!(check_host(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "a..b",
            "-a.b",
            "a-.b",
            "a b",
            "1.2.3.256",
            &"a".repeat(64),
        ] {
            assert!(check_host(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn pending_lines_take_their_addresses_or_refuse_the_change() {
        let mut t = upstream_with(vec![named("App.Internal", 8080, true)], &["10.9.9.9:80"]);
        assert_eq!(pending_queries(&t, true).len(), 1);
        let found = Lookup::Found {
            addrs: vec![ip("10.0.0.1"), ip("10.0.0.2")],
            ttl: 30,
        };
        resolve_pending(&mut t, &answers(&[("app.internal", found)])).unwrap();
        let u = t.get("u").unwrap();
        assert_eq!(addrs(u), ["10.9.9.9:80", "10.0.0.1:8080", "10.0.0.2:8080"]);
        assert_eq!(u.servers[1].from, Some(0));
        assert_eq!(u.servers[0].from, None);
        assert_eq!((u.names[0].resolved_ms, u.names[0].ttl), (5000, 30));
        assert!(pending_queries(&t, true).is_empty());

        let mut t = upstream_with(vec![named("nx.internal", 80, false)], &[]);
        let before = t.clone();
        let err = resolve_pending(
            &mut t,
            &answers(&[("nx.internal", Lookup::NotFound("NXDOMAIN".into()))]),
        )
        .unwrap_err();
        assert!(err.contains("server nx.internal:80"), "{err}");
        assert!(err.contains("NXDOMAIN"), "{err}");
        assert_eq!(
            t.get("u").unwrap().servers,
            before.get("u").unwrap().servers
        );
        let err = resolve_pending(&mut t, &answers(&[])).unwrap_err();
        assert!(err.contains("was not resolved"), "{err}");
    }

    #[test]
    fn a_new_answer_keeps_staying_servers_and_nxdomain_keeps_the_last() {
        let line = named("app.internal", 80, true);
        let mut t = upstream_with(vec![line.clone()], &[]);
        let found = Lookup::Found {
            addrs: vec![ip("10.0.0.1"), ip("10.0.0.2")],
            ttl: 1,
        };
        resolve_pending(&mut t, &answers(&[("app.internal", found)])).unwrap();
        t.get_mut("u").unwrap().servers[0].down = true;
        let new = [ip("10.0.0.2"), ip("10.0.0.3")];
        assert_eq!(
            apply_lookup(&mut t, "u", &line, &found_at(&new), 1, 7000),
            Applied::Changed
        );
        let u = t.get("u").unwrap();
        assert_eq!(addrs(u), ["10.0.0.2:80", "10.0.0.3:80"]);
        assert_eq!(
            apply_lookup(&mut t, "u", &line, &found_at(&new), 1, 8000),
            Applied::Same
        );
        // NXDOMAIN: every server goes but one, the upstream's last.
        let kept = apply_lookup(&mut t, "u", &line, &nx(), 1, 9000);
        assert_eq!(
            kept,
            Applied::KeptLast(vec![Address::Inet("10.0.0.2:80".parse().unwrap())])
        );
        assert_eq!(addrs(t.get("u").unwrap()), ["10.0.0.2:80"]);
        // Again: nothing changes, so the table is left as it is.
        let before = t.clone();
        assert!(matches!(
            apply_lookup(&mut t, "u", &line, &nx(), 1, 9100),
            Applied::KeptLast(_)
        ));
        assert_eq!(t, before);
        // With a literal server beside it, NXDOMAIN removes them all.
        let mut t = upstream_with(vec![line.clone()], &["10.9.9.9:80"]);
        let found = Lookup::Found {
            addrs: vec![ip("10.0.0.1")],
            ttl: 1,
        };
        resolve_pending(&mut t, &answers(&[("app.internal", found)])).unwrap();
        assert_eq!(
            apply_lookup(&mut t, "u", &line, &nx(), 1, 9000),
            Applied::Changed
        );
        assert_eq!(addrs(t.get("u").unwrap()), ["10.9.9.9:80"]);
        // Then it comes back where the line stands.
        assert_eq!(
            apply_lookup(&mut t, "u", &line, &found_at(&[ip("10.0.0.4")]), 1, 9500),
            Applied::Changed
        );
        assert_eq!(addrs(t.get("u").unwrap()), ["10.9.9.9:80", "10.0.0.4:80"]);
        let other = named("other.internal", 80, true);
        assert_eq!(
            apply_lookup(&mut t, "u", &other, &nx(), 1, 9900),
            Applied::Gone
        );
    }

    fn srv_at(list: &[(u16, &str, u16)]) -> Lookup {
        Lookup::Service {
            endpoints: list
                .iter()
                .map(|&(priority, addr, weight)| SrvEndpoint {
                    priority,
                    addr: addr.parse().unwrap(),
                    weight,
                })
                .collect(),
            ttl: 5,
        }
    }

    fn servers_of(u: &Upstream) -> Vec<(String, u32, bool)> {
        u.servers
            .iter()
            .map(|s| (s.addr.to_string(), s.weight, s.backup))
            .collect()
    }

    #[test]
    fn srv_answers_give_ports_weights_and_backups_as_nginx() {
        let mut line = NamedServer::new("svc.internal".into(), None, ServerParams::default(), true);
        line.service = Some("http".into());
        let mut t = upstream_with(vec![line.clone()], &[]);
        let answer = srv_at(&[
            (0, "10.0.0.1:8080", 3),
            (0, "10.0.0.2:8081", 1),
            (10, "10.0.0.3:9000", 7),
        ]);
        let mut a = answers(&[]);
        a.found.insert(Query::of(&line, true), answer.clone());
        assert_eq!(Query::of(&line, true).host, "_http._tcp.svc.internal");
        assert!(Query::of(&line, true).srv);
        resolve_pending(&mut t, &a).unwrap();
        let u = t.get("u").unwrap();
        assert_eq!(
            servers_of(u),
            [
                ("10.0.0.1:8080".into(), 3, false),
                ("10.0.0.2:8081".into(), 1, false),
                ("10.0.0.3:9000".into(), 7, true),
            ]
        );
        assert!(holds(u, 0, &endpoints(&line, &u.policy, &answer)));
        // A record whose weight or priority changed: the same server
        // (its cell stays) with the record's new values.
        let changed = srv_at(&[(0, "10.0.0.1:8080", 3), (5, "10.0.0.2:8081", 2)]);
        assert_eq!(
            apply_lookup(&mut t, "u", &line, &changed, 5, 9000),
            Applied::Changed
        );
        assert_eq!(
            servers_of(t.get("u").unwrap()),
            [
                ("10.0.0.1:8080".into(), 3, false),
                ("10.0.0.2:8081".into(), 2, true),
            ]
        );
        assert_eq!(
            apply_lookup(&mut t, "u", &line, &changed, 5, 9100),
            Applied::Same
        );
        // The line's own weight wins over the records'; a backup line or a
        // method without backups uses the lowest priority only.
        let mut weighted = line.clone();
        weighted.params.weight = 4;
        let rr = Policy::default();
        let got = endpoints(&weighted, &rr, &answer);
        assert!(got.iter().all(|e| e.weight == 4));
        let mut backup = line.clone();
        backup.params.backup = true;
        let got = endpoints(&backup, &rr, &answer);
        assert_eq!(got.len(), 2);
        assert!(got.iter().all(|e| e.backup));
        let hash: Policy = crate::table::syntax::parse_body("h", "hash $uri; server 127.0.0.1;")
            .unwrap()
            .policy;
        let got = endpoints(&line, &hash, &answer);
        assert_eq!(got.len(), 2);
        assert!(got.iter().all(|e| !e.backup));
        // Weights above the table's bound are the bound; an address two
        // records give is one server.
        let big = srv_at(&[(0, "10.0.0.1:80", 65535), (1, "10.0.0.1:80", 2)]);
        let got = endpoints(&line, &rr, &big);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].weight, crate::table::model::WEIGHT_MAX);
    }
}
