//! Servers by name: the DNS client and the re-resolution of `resolve`
//! lines for the whole nginx.
//!
//! * `wire.rs`: DNS messages, bytes in and out.
//! * this file: which name servers an upstream asks ([`Resolver`], from its
//!   `resolver` line, init's default, or `/etc/resolv.conf`), how the A and
//!   AAAA answers of one name make one [`Lookup`], and a blocking client
//!   over std sockets for where no cosocket is (nginx's master at `init`,
//!   `init_worker`, LuaJIT outside nginx, the `dyups` tool): there blocking
//!   is what nginx itself does when it reads its configuration.
//! * `service.rs`: `service=` lines, an SRV answer and its targets'
//!   addresses made one [`Lookup`].
//! * `schedule.rs`: which `resolve` lines are due, in the one worker that
//!   holds the resolver lease (`lease.rs`), and what their answers change.
//!
//! nginx's workers ask through cosockets (`src/binding/dns.lua`), with the
//! same messages: the client is written once, in Rust, rather than taken
//! from lua-resty-dns, so that the master, the workers and the tool resolve
//! alike and it is tested and fuzzed with the rest.

pub mod lease;
pub mod schedule;
pub mod service;
pub mod wire;

pub use self::service::{
    combine_service, lookup_service_blocking, service_records, service_targets,
};

use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use crate::table::model::{Table, Upstream};
use crate::table::names::{pending_queries, Answers, Lookup, Query, DEFAULT_RESOLVER_TIMEOUT_MS};
use crate::table::syntax::parse_resolver_address;

use self::wire::{read_reply, Reply, TYPE_A, TYPE_AAAA};

/// Where nameservers are found without a `resolver` anywhere.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

/// The resolver every upstream without a `resolver` line asks: init's
/// `resolver` option, else the nameservers of `/etc/resolv.conf`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Defaults {
    pub servers: Vec<SocketAddr>,
    pub valid: Option<u32>,
    pub ipv6: bool,
    pub timeout_ms: u32,
}

impl Default for Defaults {
    fn default() -> Defaults {
        Defaults {
            servers: Vec::new(),
            valid: None,
            ipv6: true,
            timeout_ms: DEFAULT_RESOLVER_TIMEOUT_MS,
        }
    }
}

impl Defaults {
    /// init's `resolver` option: what a `resolver` line takes
    /// (`"10.0.0.1 10.0.0.2:5353 valid=30s ipv6=off"`), and its
    /// `resolver_timeout` in ms.
    pub fn from_option(line: &str, timeout_ms: Option<u32>) -> Result<Defaults, String> {
        let body = format!("resolver {line}; server 127.0.0.1;");
        let u = crate::table::syntax::parse_body("resolver", &body)
            .map_err(|e| format!("resolver {line:?}: {e}"))?;
        Ok(Defaults {
            servers: u.dns.resolvers,
            valid: u.dns.valid,
            ipv6: u.dns.ipv6.unwrap_or(true),
            timeout_ms: timeout_ms.unwrap_or(DEFAULT_RESOLVER_TIMEOUT_MS),
        })
    }

    /// The nameservers of `/etc/resolv.conf` (its `nameserver` lines, port
    /// 53), nginx's other defaults.
    pub fn from_resolv_conf(text: &str) -> Defaults {
        let servers = text
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                (w.next() == Some("nameserver"))
                    .then(|| w.next())
                    .flatten()
                    .and_then(|a| parse_resolver_address(a.split('%').next()?).ok())
            })
            .collect();
        Defaults {
            servers,
            ..Defaults::default()
        }
    }

    /// The system's: `/etc/resolv.conf`, read now.
    pub fn system() -> Defaults {
        Defaults::from_resolv_conf(&std::fs::read_to_string(RESOLV_CONF).unwrap_or_default())
    }
}

/// The record types an address lookup asks for: A, and AAAA with `ipv6`.
pub fn address_types(ipv6: bool) -> &'static [u16] {
    if ipv6 {
        &[TYPE_A, TYPE_AAAA]
    } else {
        &[TYPE_A]
    }
}

/// Whom one upstream's lookups go to, and how long they may take.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolver {
    pub servers: Vec<SocketAddr>,
    pub ipv6: bool,
    pub valid: Option<u32>,
    pub timeout_ms: u32,
}

impl Resolver {
    /// The resolver of `u`: its `resolver` lines over `defaults`.
    pub fn of(u: &Upstream, defaults: &Defaults) -> Resolver {
        let d = &u.dns;
        Resolver {
            servers: if d.resolvers.is_empty() {
                defaults.servers.clone()
            } else {
                d.resolvers.clone()
            },
            ipv6: d.ipv6.unwrap_or(defaults.ipv6),
            valid: d.valid.or(defaults.valid),
            timeout_ms: d.timeout_ms.unwrap_or(defaults.timeout_ms),
        }
    }

    /// The record types an address lookup asks for.
    pub fn types(&self) -> &'static [u16] {
        address_types(self.ipv6)
    }

    /// How long one name server is waited for: the timeout shared among
    /// them, as one pass over them must fit in it.
    pub fn attempt_ms(&self) -> u32 {
        (self.timeout_ms / self.servers.len().max(1) as u32).max(100)
    }

    /// How long an answer of `ttl` seconds is used: `valid=` when given,
    /// else its TTL, at least a second (a TTL of 0 must not make a loop).
    pub fn lifetime_s(&self, ttl: u32) -> u32 {
        self.valid.unwrap_or(ttl).max(1)
    }
}

/// What the answers to the types asked make, one [`Reply`] (or the
/// transport's failure) per type: every address found, with the smallest
/// TTL; NXDOMAIN or no address at all is "not found"; and when any type
/// failed, a failure, so that a timeout of one type never removes the
/// addresses of the name.
pub fn combine(host: &str, replies: &[Result<Reply, String>]) -> Lookup {
    let mut addrs: Vec<IpAddr> = Vec::new();
    let mut ttl = u32::MAX;
    let mut missing = None;
    for r in replies {
        match r {
            Ok(Reply::Records { addrs: a, ttl: t }) => {
                if !a.is_empty() {
                    ttl = ttl.min(*t);
                }
                addrs.extend(a);
            }
            Ok(Reply::NoSuchName) => missing = Some("NXDOMAIN (no such name)"),
            Ok(Reply::Services { .. }) => {
                return Lookup::Failed(format!("{host}: SRV records to an address query"))
            }
            Ok(Reply::Truncated) => {
                return Lookup::Failed(format!("{host}: the reply was truncated, even over TCP"))
            }
            Ok(Reply::Failure(code)) => {
                return Lookup::Failed(format!("{host}: the resolver answered {code}"))
            }
            Err(e) => return Lookup::Failed(format!("{host}: {e}")),
        }
    }
    if addrs.is_empty() {
        return Lookup::NotFound(format!(
            "{host}: {}",
            missing.unwrap_or("the name has no address records")
        ));
    }
    addrs.sort();
    addrs.dedup();
    Lookup::Found { addrs, ttl }
}

/// A message id nobody can guess from outside: the answer must match it.
pub fn random_id() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish() as u16
}

/// Looks `host` up with `resolver`, blocking: each type asked of each
/// name server in turn until one answers, over UDP, then over TCP when
/// the answer was truncated.
pub fn lookup_blocking(host: &str, resolver: &Resolver) -> Lookup {
    if resolver.servers.is_empty() {
        return Lookup::Failed(format!(
            "{host}: no resolver: give a `resolver` line, init's resolver option, or \
             nameservers in {RESOLV_CONF}"
        ));
    }
    let replies: Vec<Result<Reply, String>> = resolver
        .types()
        .iter()
        .map(|&t| ask_blocking(host, t, resolver))
        .collect();
    combine(host, &replies)
}

/// Makes the lookup `q` with `resolver`, blocking.
pub fn query_blocking(q: &Query, resolver: &Resolver) -> Lookup {
    if q.srv {
        lookup_service_blocking(&q.host, resolver)
    } else {
        lookup_blocking(&q.host, resolver)
    }
}

pub(crate) fn ask_blocking(host: &str, qtype: u16, resolver: &Resolver) -> Result<Reply, String> {
    let wait = Duration::from_millis(u64::from(resolver.attempt_ms()));
    let mut last = String::new();
    for server in &resolver.servers {
        let q = wire::query(random_id(), host, qtype);
        match udp_exchange(*server, &q, wait) {
            Ok(Reply::Truncated) => match tcp_exchange(*server, &q, wait) {
                Ok(r) => return Ok(r),
                Err(e) => last = format!("{server} over TCP: {e}"),
            },
            Ok(r) => return Ok(r),
            Err(e) => last = format!("{server}: {e}"),
        }
    }
    Err(last)
}

fn udp_exchange(server: SocketAddr, q: &[u8], wait: Duration) -> Result<Reply, String> {
    let bind: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let sock = UdpSocket::bind(bind).map_err(|e| e.to_string())?;
    sock.connect(server).map_err(|e| e.to_string())?;
    sock.send(q).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("timed out".into());
        }
        sock.set_read_timeout(Some(left))
            .map_err(|e| e.to_string())?;
        match sock.recv(&mut buf) {
            // Not the reply to this query: wait on for it.
            Ok(n) => match read_reply(q, &buf[..n]) {
                Ok(r) => return Ok(r),
                Err(_) => continue,
            },
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err("timed out".into())
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

fn tcp_exchange(server: SocketAddr, q: &[u8], wait: Duration) -> Result<Reply, String> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect_timeout(&server, wait).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(wait)).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(wait)).map_err(|e| e.to_string())?;
    let mut framed = (q.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(q);
    s.write_all(&framed).map_err(|e| e.to_string())?;
    let mut len = [0u8; 2];
    s.read_exact(&mut len).map_err(|e| e.to_string())?;
    let mut reply = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut reply).map_err(|e| e.to_string())?;
    read_reply(q, &reply)
}

/// Resolves, blocking, every line of `table` that waits for its first
/// answer: what a writer without cosockets does before its write.
pub fn answers_blocking(table: &Table, defaults: &Defaults) -> Answers {
    let at_ms = now_ms();
    let found = pending_queries(table, defaults.ipv6)
        .into_iter()
        .map(|(q, u)| {
            let l = query_blocking(&q, &Resolver::of(u, defaults));
            (q, l)
        })
        .collect();
    Answers {
        found,
        at_ms,
        default_ipv6: defaults.ipv6,
    }
}

/// Resolves the pending lines of `table` in place, blocking (see
/// [`answers_blocking`]); a name that does not resolve refuses, naming it.
pub fn resolve_blocking(table: &mut Table, defaults: &Defaults) -> crate::Result<()> {
    if !table.upstreams.iter().any(|u| u.has_pending()) {
        return Ok(());
    }
    let answers = answers_blocking(table, defaults);
    crate::table::names::resolve_pending(table, &answers).map_err(crate::Error::BadRequest)
}

/// The lookups a table's pending lines need, for a transport to run: the
/// query, and the resolver to ask.
pub fn plan(table: &Table, defaults: &Defaults) -> Vec<(Query, Resolver)> {
    pending_queries(table, defaults.ipv6)
        .into_iter()
        .map(|(q, u)| (q, Resolver::of(u, defaults)))
        .collect()
}

/// Unix time in ms.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_gives_the_nameservers() {
        let d = Defaults::from_resolv_conf(
            "# comment\nsearch example.com\nnameserver 10.0.0.53\nnameserver fe80::1%eth0\n\
             nameserver bogus\noptions ndots:2\n",
        );
        assert_eq!(
            d.servers,
            vec![
                "10.0.0.53:53".parse().unwrap(),
                "[fe80::1]:53".parse().unwrap()
            ]
        );
        assert!(d.ipv6);
    }

    #[test]
    fn init_resolver_option_reads_as_the_line() {
        let d = Defaults::from_option("127.0.0.1:5353 valid=10s ipv6=off", Some(700)).unwrap();
        assert_eq!(d.servers, vec!["127.0.0.1:5353".parse().unwrap()]);
        assert_eq!((d.valid, d.ipv6, d.timeout_ms), (Some(10), false, 700));
        assert!(Defaults::from_option("example.com", None).is_err());
    }

    #[test]
    fn one_lookup_from_its_types() {
        let a = Ok(Reply::Records {
            addrs: vec!["10.0.0.1".parse().unwrap()],
            ttl: 30,
        });
        let six = Ok(Reply::Records {
            addrs: vec!["::1".parse().unwrap()],
            ttl: 5,
        });
        let none = Ok(Reply::Records {
            addrs: vec![],
            ttl: 0,
        });
        assert_eq!(
            combine("h", &[a.clone(), six]),
            Lookup::Found {
                addrs: vec!["10.0.0.1".parse().unwrap(), "::1".parse().unwrap()],
                ttl: 5
            }
        );
        assert_eq!(
            combine("h", &[a.clone(), none.clone()]),
            Lookup::Found {
                addrs: vec!["10.0.0.1".parse().unwrap()],
                ttl: 30
            }
        );
        assert!(matches!(
            combine("h", &[none.clone(), none]),
            Lookup::NotFound(_)
        ));
        assert!(matches!(
            combine("h", &[Ok(Reply::NoSuchName)]),
            Lookup::NotFound(m) if m.contains("NXDOMAIN")
        ));
        // A timeout of one type is a failure, not a smaller answer.
        assert!(matches!(
            combine("h", &[a, Err("timed out".into())]),
            Lookup::Failed(m) if m.contains("timed out")
        ));
        assert!(matches!(
            combine("h", &[Ok(Reply::Failure("SERVFAIL".into()))]),
            Lookup::Failed(m) if m.contains("SERVFAIL")
        ));
    }

    #[test]
    fn a_dead_resolver_is_a_failure_within_its_timeout() {
        // A port nothing answers on: loopback UDP gets no reply (or a
        // refusal), within the timeout either way.
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let silent = sock.local_addr().unwrap();
        let r = Resolver {
            servers: vec![silent],
            ipv6: false,
            valid: None,
            timeout_ms: 200,
        };
        let started = Instant::now();
        assert!(matches!(
            lookup_blocking("a.internal", &r),
            Lookup::Failed(_)
        ));
        assert!(started.elapsed() < Duration::from_secs(2));
        let none = Resolver {
            servers: vec![],
            ..r
        };
        assert!(
            matches!(lookup_blocking("a.internal", &none), Lookup::Failed(m) if m.contains("no resolver"))
        );
    }

    #[test]
    fn a_blocking_lookup_takes_the_reply_to_its_own_query() {
        // A tiny server on loopback: one stray datagram first, then the
        // real reply; the client must take the second.
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            let (n, from) = server.recv_from(&mut buf).unwrap();
            let q = buf[..n].to_vec();
            let mut stray = q.clone();
            stray[0] ^= 0xff;
            stray[2] |= 0x80;
            server.send_to(&stray, from).unwrap();
            let mut r = q.clone();
            r[2] = 0x81;
            r[3] = 0x80;
            r[7] = 1;
            r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 42, 0, 4, 10, 1, 2, 3]);
            server.send_to(&r, from).unwrap();
        });
        let r = Resolver {
            servers: vec![addr],
            ipv6: false,
            valid: None,
            timeout_ms: 2000,
        };
        assert_eq!(
            lookup_blocking("app.internal", &r),
            Lookup::Found {
                addrs: vec!["10.1.2.3".parse().unwrap()],
                ttl: 42
            }
        );
        t.join().unwrap();
    }
}
