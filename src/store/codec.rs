//! The payload of a slot: the table and the recent change log, in a compact
//! little-endian encoding. Decoding checks every length, count and value, so
//! a payload that passed its checksum but was written by a broken or foreign
//! writer is still refused rather than trusted.
//!
//! A payload has two parts. The *base* is what format version 2 defined,
//! byte for byte, so every build since reads it. The *extension* follows it
//! in the slot, outside the base's length and checksum (the slot header has
//! its own for it, see layout.rs), and holds what later builds added: the
//! settings besides the servers and the balancing method, `max_conns` and
//! `slow_start`.
//! A build that predates it reads the base alone and cannot misread the
//! rest; a slot such a build wrote has no extension, which reads as every
//! setting at its default. So adding these fields needed no new format
//! version.
//!
//! ```text
//! payload  := version u64, upstream count u32, change count u32,
//!             upstream*, change*
//! upstream := name, rev u64, length u32 (bytes of what follows, to its
//!             last server), policy, keepalive u32, server count u32, server*
//! policy   := 0 round robin | 1 ip_hash | 2 hash, key | 3 hash consistent,
//!             key | 4 least_conn | 5 random | 6 random two  (key: a name)
//! server   := address, weight u32, max_fails u32, fail_timeout u32,
//!             flags u8 (1 = backup, 2 = down), cell u32, tag u32 (its
//!             shared peer state, see zone.rs; cell 0xffffffff: none)
//! change   := version u64, name, address, removed u8 (0 or 1)
//! name     := length u16, UTF-8 bytes
//! address  := 4, IPv4 [4], port u16
//!           | 6, IPv6 [16], port u16
//!           | 1, length u16, unix socket path bytes
//!
//! extension := nothing (every upstream has the defaults)
//!            | entry count u32, entry* (one per upstream that needs a field)
//! entry     := upstream position u32 (in the base's table, ascending),
//!              length u32, field* (as many bytes as length says)
//! field     := tag u8, length u16, value; a field is given at most once,
//!              only when it differs from the default, and a tag this
//!              build does not know (a later build's) is skipped
//!   1 check                     interval u32, rise u32, fall u32,
//!                               timeout u32, default_down u8, type u8
//!                               (0 tcp, 1 http, 2 https, 3 ssl_hello),
//!                               port u16, jitter u32 (times in ms)
//!   2 check_http_send           UTF-8 bytes
//!   3 check_http_expect_alive   u8, one bit per class from http_2xx
//!   4 check_keepalive_requests  u32
//!   5 keepalive_requests        u32
//!   6 keepalive_time            u32 ms
//!   7 keepalive_timeout         u32 ms
//!   8 max_conns                 u32 per server, in the servers' order
//!   9 owner                     nothing: `dyups sync` wrote it from etcd
//!  10 sync (the table's, on the  revision u64, cluster id u64, key
//!     first upstream's entry)    prefix (a name): see `model::SyncMark`
//!  11 slow_start                u32 seconds per server, in the servers'
//!                               order
//!  12 names                     count u16, then per `server NAME` line:
//!                               host (a name), port u16 (0: none
//!                               written), flags u8 (1 resolve, 2 backup,
//!                               4 down), weight u32, max_conns u32,
//!                               max_fails u32, fail_timeout u32,
//!                               slow_start u32, resolved Unix ms u64,
//!                               ttl u32; then per server, in order, the
//!                               line it came from u16 (0xffff: none, an
//!                               address as written)
//!  13 dns                       resolver count u8, address* (IP ones),
//!                               valid u32 s, ipv6 u8 (0 unset, 1 off,
//!                               2 on), resolver_timeout u32 ms
//!                               (0xffffffff: unset, for both times)
//! ```
//!
//! A build without fields 12 and 13 reads a name's addresses as servers
//! written as addresses: it routes as this build does, and writes the
//! names away.
//!
//! The table's own fields ride on its first upstream's entry, because
//! builds with the extension accept no entry past the table's upstreams; a
//! table without upstreams has nowhere to keep them, and loses nothing by
//! it (`dyups sync` then reads etcd in full, which is cheap for an empty
//! table).
//!
//! Over 600 lines: one format, whose encoder and decoder read best side by
//! side; its tests follow it.

use std::collections::HashSet;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use crate::table::model::PeerRef;
use crate::table::model::{
    check_http_send, check_name, Address, Change, CheckLine, CheckType, ExpectAlive, Owner,
    ServerSpec, SyncMark, Table, Upstream, CHECK_COUNT_MAX, CHECK_KEEPALIVE_REQUESTS_MAX,
    CHECK_TIME_MAX, DEFAULT_CHECK_HTTP_SEND, DEFAULT_CHECK_KEEPALIVE_REQUESTS,
    DEFAULT_KEEPALIVE_REQUESTS, DEFAULT_KEEPALIVE_TIME, DEFAULT_KEEPALIVE_TIMEOUT,
    FAIL_TIMEOUT_MAX, MAX_CONNS_MAX, MAX_FAILS_MAX, SLOW_START_MAX, WEIGHT_MAX, WEIGHT_MIN,
};
use crate::table::names::{
    check_host, check_service, DnsSettings, NamedServer, ServerParams, DNS_TIME_MAX_MS, NAMES_MAX,
    RESOLVERS_MAX,
};
use crate::table::policy::Policy;

/// How many changes the log keeps; older ones are dropped first.
pub const CHANGE_LOG_MAX: usize = 512;

const BACKUP: u8 = 1;
const DOWN: u8 = 2;

// The extension's field tags.
const TAG_CHECK: u8 = 1;
const TAG_CHECK_HTTP_SEND: u8 = 2;
const TAG_CHECK_EXPECT_ALIVE: u8 = 3;
const TAG_CHECK_KEEPALIVE_REQUESTS: u8 = 4;
const TAG_KEEPALIVE_REQUESTS: u8 = 5;
const TAG_KEEPALIVE_TIME: u8 = 6;
const TAG_KEEPALIVE_TIMEOUT: u8 = 7;
const TAG_MAX_CONNS: u8 = 8;
const TAG_OWNER: u8 = 9;
const TAG_SYNC: u8 = 10;
const TAG_SLOW_START: u8 = 11;
const TAG_NAMES: u8 = 12;
const TAG_DNS: u8 = 13;
/// A server that came from no `server NAME` line, in field 12.
const NO_LINE: u16 = u16::MAX;
/// An unset time in field 13.
const UNSET: u32 = u32::MAX;
/// The check line's value: four u32, two u8, a u16 and a u32.
const CHECK_LEN: usize = 24;
/// nginx's largest time in milliseconds.
const MSEC_MAX: u32 = i32::MAX as u32;

/// What one slot holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Payload {
    pub version: u64,
    pub table: Table,
    pub changes: ChangeLog,
}

/// The change log as a slot holds it (`change*` above): checked entry by
/// entry when read, as strictly as decoding it would, but decoded only when
/// asked for. Workers route without it, and a writer appends to it as it
/// is: decoding 512 changes on every read and encoding them again on every
/// write was most of what a write to a small table cost (some 200,000
/// instructions, in each worker).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ChangeLog {
    /// Its entries, each checked when the log was read or made.
    bytes: Arc<[u8]>,
    count: usize,
}

impl ChangeLog {
    /// The log holding `changes`, oldest first.
    pub fn new(changes: &[Change]) -> ChangeLog {
        let mut bytes = Vec::with_capacity(changes.len() * 24);
        for c in changes {
            put_change(&mut bytes, c);
        }
        ChangeLog {
            bytes: bytes.into(),
            count: changes.len(),
        }
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Every change, oldest first.
    pub fn to_vec(&self) -> Vec<Change> {
        self.since(0)
    }

    /// The changes made after `version`, oldest first.
    pub fn since(&self, version: u64) -> Vec<Change> {
        let mut r = Reader {
            b: &self.bytes,
            at: 0,
        };
        let mut out = Vec::new();
        // Checked when read or made: an entry that does not read is not
        // there (it cannot happen), and ends the walk.
        while let Ok(c) = read_change(&mut r) {
            if c.version > version {
                out.push(c.to_change());
            }
        }
        out
    }

    /// This log with `new` after its entries, its oldest dropped to keep
    /// at most `max`: what the old log and `new` decoded, joined and cut
    /// would encode to, without decoding either.
    pub fn appended(&self, new: &[Change], max: usize) -> ChangeLog {
        let new = &new[new.len().saturating_sub(max)..];
        let dropped = (self.count + new.len()).saturating_sub(max);
        let mut r = Reader {
            b: &self.bytes,
            at: 0,
        };
        for _ in 0..dropped {
            if read_change(&mut r).is_err() {
                break;
            }
        }
        let kept = &self.bytes[r.at..];
        let mut bytes = Vec::with_capacity(kept.len() + new.len() * 24);
        bytes.extend_from_slice(kept);
        for c in new {
            put_change(&mut bytes, c);
        }
        ChangeLog {
            bytes: bytes.into(),
            count: self.count.saturating_sub(dropped) + new.len(),
        }
    }

    /// Reads `count` entries at `r`, checking each, except those that
    /// `known` (a log checked before) holds byte for byte at its start: a
    /// writer only drops a log's oldest changes and appends new ones, so
    /// after a write a reader checks what the write added.
    fn read(
        r: &mut Reader<'_>,
        count: usize,
        known: Option<&ChangeLog>,
    ) -> Result<ChangeLog, String> {
        let start = r.at;
        let (checked, entries) = known
            .and_then(|k| k.continued_by(&r.b[start..], count))
            .unwrap_or((0, 0));
        match skim(&r.b[start + checked..], count - entries) {
            Some(len) => r.at += checked + len,
            // Refused: read entry by entry for the reason.
            None => {
                for _ in 0..count {
                    read_change(r)?;
                }
            }
        }
        Ok(ChangeLog {
            bytes: r.b[start..r.at].into(),
            count,
        })
    }

    /// When `bytes`, the start of a log of `count` changes, begins with the
    /// newest of this log's changes (all but some oldest ones, at least
    /// one): how many bytes and changes that is.
    fn continued_by(&self, bytes: &[u8], count: usize) -> Option<(usize, usize)> {
        // A log of `count` changes that continues this one dropped at least
        // the changes it has fewer of.
        let mut at = 0;
        for dropped in 0..self.count {
            let tail = &self.bytes[at..];
            if dropped >= self.count.saturating_sub(count) && bytes.starts_with(tail) {
                return Some((tail.len(), self.count - dropped));
            }
            at = skip_change(&self.bytes, at)?;
        }
        None
    }
}

/// Where the change at `at` of a checked log ends.
fn skip_change(b: &[u8], at: usize) -> Option<usize> {
    let text =
        |at: usize| Some(at + 2 + u16::from_le_bytes([*b.get(at)?, *b.get(at + 1)?]) as usize);
    let at = text(at + 8)?;
    let at = match *b.get(at)? {
        4 => at + 1 + 4 + 2,
        6 => at + 1 + 16 + 2,
        _ => text(at + 1)?,
    };
    Some(at + 1)
}

/// The bytes the first `count` changes of `b` take, each checked as
/// [`read_change`] checks it; `None` where it would refuse one. The same
/// checks without building a message for each step: every worker reads the
/// whole log after every write (some 30 instructions a change, not 160).
fn skim(b: &[u8], count: usize) -> Option<usize> {
    // A name or path: its UTF-8 bytes, and where what follows starts.
    let text = |at: usize| -> Option<(&[u8], usize)> {
        let n = u16::from_le_bytes([*b.get(at)?, *b.get(at + 1)?]) as usize;
        let bytes = b.get(at + 2..at + 2 + n)?;
        if !bytes.is_ascii() && std::str::from_utf8(bytes).is_err() {
            return None;
        }
        Some((bytes, at + 2 + n))
    };
    let mut at = 0;
    for _ in 0..count {
        // The version: any.
        at += 8;
        (_, at) = text(at)?;
        // The address (its bytes are there if the flag after them is).
        at = match *b.get(at)? {
            4 => at + 1 + 4 + 2,
            6 => at + 1 + 16 + 2,
            1 => {
                let (path, after) = text(at + 1)?;
                if path.first() != Some(&b'/') {
                    return None;
                }
                after
            }
            _ => return None,
        };
        if *b.get(at)? > 1 {
            return None;
        }
        at += 1;
    }
    Some(at)
}

impl std::fmt::Debug for ChangeLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.to_vec()).finish()
    }
}

/// One entry of the log as read, its text still in the log's bytes.
struct ChangeRef<'a> {
    version: u64,
    upstream: &'a str,
    server: AddressRef<'a>,
    removed: bool,
}

impl ChangeRef<'_> {
    fn to_change(&self) -> Change {
        Change {
            version: self.version,
            upstream: self.upstream.to_owned(),
            server: self.server.to_address(),
            removed: self.removed,
        }
    }
}

/// An address as read, a unix socket's path still in the bytes read.
enum AddressRef<'a> {
    Inet(SocketAddr),
    Unix(&'a str),
}

impl AddressRef<'_> {
    fn to_address(&self) -> Address {
        match self {
            AddressRef::Inet(a) => Address::Inet(*a),
            AddressRef::Unix(p) => Address::Unix((*p).to_owned()),
        }
    }
}

fn read_change<'a>(r: &mut Reader<'a>) -> Result<ChangeRef<'a>, String> {
    let version = r.u64()?;
    let upstream = r.str_ref()?;
    let server = r.addr_ref()?;
    let removed = match r.u8()? {
        0 => false,
        1 => true,
        x => return Err(format!("change flag {x} is neither 0 nor 1")),
    };
    Ok(ChangeRef {
        version,
        upstream,
        server,
        removed,
    })
}

fn put_change(out: &mut Vec<u8>, c: &Change) {
    out.extend_from_slice(&c.version.to_le_bytes());
    put_str(out, &c.upstream);
    put_addr(out, &c.server);
    out.push(c.removed as u8);
}

/// A payload as a slot holds it: the base, then the extension (see the
/// module's documentation).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Encoded {
    pub base: Vec<u8>,
    /// Empty when every upstream has the defaults of what it holds.
    pub extension: Vec<u8>,
}

impl Encoded {
    /// The bytes both take in the slot.
    pub fn slot_bytes(&self) -> usize {
        self.base.len() + self.extension.len()
    }
}

pub fn encode(p: &Payload) -> Encoded {
    Encoded {
        base: encode_base(p),
        extension: encode_extension(&p.table),
    }
}

fn encode_base(p: &Payload) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + p.table.upstreams.len() * 64);
    out.extend_from_slice(&p.version.to_le_bytes());
    out.extend_from_slice(&(p.table.upstreams.len() as u32).to_le_bytes());
    out.extend_from_slice(&(p.changes.len() as u32).to_le_bytes());
    for u in &p.table.upstreams {
        put_str(&mut out, &u.name);
        out.extend_from_slice(&u.rev.to_le_bytes());
        let length_at = out.len();
        out.extend_from_slice(&0u32.to_le_bytes());
        put_policy(&mut out, &u.policy);
        out.extend_from_slice(&u.keepalive.to_le_bytes());
        out.extend_from_slice(&(u.servers.len() as u32).to_le_bytes());
        for (i, s) in u.servers.iter().enumerate() {
            put_addr(&mut out, &s.addr);
            out.extend_from_slice(&s.weight.to_le_bytes());
            out.extend_from_slice(&s.max_fails.to_le_bytes());
            out.extend_from_slice(&s.fail_timeout.to_le_bytes());
            let flags = if s.backup { BACKUP } else { 0 } | if s.down { DOWN } else { 0 };
            out.push(flags);
            let cell = u.peer(i);
            out.extend_from_slice(&cell.index.to_le_bytes());
            out.extend_from_slice(&cell.tag.to_le_bytes());
        }
        let length = (out.len() - length_at - 4) as u32;
        out[length_at..length_at + 4].copy_from_slice(&length.to_le_bytes());
    }
    out.extend_from_slice(&p.changes.bytes);
    out
}

/// The extension of `t`: an entry for each upstream that needs a field,
/// nothing at all when none does.
fn encode_extension(t: &Table) -> Vec<u8> {
    let needing: Vec<(usize, &Upstream)> = t
        .upstreams
        .iter()
        .enumerate()
        .filter(|(i, u)| !extension_is_default(u) || (*i == 0 && t.sync.is_some()))
        .map(|(i, u)| (i, &**u))
        .collect();
    if needing.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::new();
    out.extend_from_slice(&(needing.len() as u32).to_le_bytes());
    for (i, u) in needing {
        out.extend_from_slice(&(i as u32).to_le_bytes());
        let length_at = out.len();
        out.extend_from_slice(&0u32.to_le_bytes());
        put_fields(&mut out, u);
        if let (0, Some(mark)) = (i, &t.sync) {
            let mut v = Vec::with_capacity(18 + mark.prefix.len());
            v.extend_from_slice(&mark.revision.to_le_bytes());
            v.extend_from_slice(&mark.cluster_id.to_le_bytes());
            put_str(&mut v, &mark.prefix);
            put_field(&mut out, TAG_SYNC, &v);
        }
        let length = (out.len() - length_at - 4) as u32;
        out[length_at..length_at + 4].copy_from_slice(&length.to_le_bytes());
    }
    out
}

/// Whether `u` has nothing for the extension: its entry would be empty.
fn extension_is_default(u: &Upstream) -> bool {
    u.keepalive_requests == DEFAULT_KEEPALIVE_REQUESTS
        && u.keepalive_time == DEFAULT_KEEPALIVE_TIME
        && u.keepalive_timeout == DEFAULT_KEEPALIVE_TIMEOUT
        && u.check.is_default()
        && u.servers
            .iter()
            .all(|s| s.max_conns == 0 && s.slow_start == 0)
        && u.owner.is_local()
        && u.names.is_empty()
        && u.dns.is_default()
}

fn put_fields(out: &mut Vec<u8>, u: &Upstream) {
    let c = &u.check;
    if let Some(line) = &c.line {
        let mut v = Vec::with_capacity(CHECK_LEN);
        for n in [line.interval, line.rise, line.fall, line.timeout] {
            v.extend_from_slice(&n.to_le_bytes());
        }
        v.push(line.default_down as u8);
        let kind = CheckType::ALL.iter().position(|&k| k == line.kind);
        v.push(kind.unwrap_or(0) as u8);
        v.extend_from_slice(&line.port.to_le_bytes());
        v.extend_from_slice(&line.jitter.to_le_bytes());
        put_field(out, TAG_CHECK, &v);
    }
    if c.http_send != DEFAULT_CHECK_HTTP_SEND {
        put_field(out, TAG_CHECK_HTTP_SEND, c.http_send.as_bytes());
    }
    if c.http_expect_alive != ExpectAlive::default() {
        put_field(out, TAG_CHECK_EXPECT_ALIVE, &[c.http_expect_alive.bits()]);
    }
    let numbers = [
        (
            TAG_CHECK_KEEPALIVE_REQUESTS,
            c.keepalive_requests,
            DEFAULT_CHECK_KEEPALIVE_REQUESTS,
        ),
        (
            TAG_KEEPALIVE_REQUESTS,
            u.keepalive_requests,
            DEFAULT_KEEPALIVE_REQUESTS,
        ),
        (TAG_KEEPALIVE_TIME, u.keepalive_time, DEFAULT_KEEPALIVE_TIME),
        (
            TAG_KEEPALIVE_TIMEOUT,
            u.keepalive_timeout,
            DEFAULT_KEEPALIVE_TIMEOUT,
        ),
    ];
    for (tag, n, default) in numbers {
        if n != default {
            put_field(out, tag, &n.to_le_bytes());
        }
    }
    if u.servers.iter().any(|s| s.max_conns != 0) {
        let v: Vec<u8> = u
            .servers
            .iter()
            .flat_map(|s| s.max_conns.to_le_bytes())
            .collect();
        put_field(out, TAG_MAX_CONNS, &v);
    }
    if !u.owner.is_local() {
        put_field(out, TAG_OWNER, &[]);
    }
    if u.servers.iter().any(|s| s.slow_start != 0) {
        let v: Vec<u8> = u
            .servers
            .iter()
            .flat_map(|s| s.slow_start.to_le_bytes())
            .collect();
        put_field(out, TAG_SLOW_START, &v);
    }
    if !u.names.is_empty() {
        let mut v = Vec::new();
        v.extend_from_slice(&(u.names.len() as u16).to_le_bytes());
        for n in &u.names {
            put_str(&mut v, &n.host);
            v.extend_from_slice(&n.port.unwrap_or(0).to_le_bytes());
            let p = &n.params;
            v.push(
                u8::from(n.resolve)
                    | u8::from(p.backup) << 1
                    | u8::from(p.down) << 2
                    | u8::from(n.service.is_some()) << 3,
            );
            for x in [
                p.weight,
                p.max_conns,
                p.max_fails,
                p.fail_timeout,
                p.slow_start,
            ] {
                v.extend_from_slice(&x.to_le_bytes());
            }
            v.extend_from_slice(&n.resolved_ms.to_le_bytes());
            v.extend_from_slice(&n.ttl.to_le_bytes());
            // Only when flag 8 says so: files written before `service=`
            // read the same.
            if let Some(service) = &n.service {
                put_str(&mut v, service);
            }
        }
        for s in &u.servers {
            v.extend_from_slice(&s.from.unwrap_or(NO_LINE).to_le_bytes());
        }
        put_field(out, TAG_NAMES, &v);
    }
    if !u.dns.is_default() {
        let d = &u.dns;
        let mut v = vec![d.resolvers.len() as u8];
        for a in &d.resolvers {
            put_addr(&mut v, &Address::Inet(*a));
        }
        v.extend_from_slice(&d.valid.unwrap_or(UNSET).to_le_bytes());
        v.push(d.ipv6.map_or(0, |on| 1 + u8::from(on)));
        v.extend_from_slice(&d.timeout_ms.unwrap_or(UNSET).to_le_bytes());
        put_field(out, TAG_DNS, &v);
    }
}

fn put_field(out: &mut Vec<u8>, tag: u8, value: &[u8]) {
    // The longest value is max_conns for 1000 servers (4000 bytes) or a
    // check_http_send of 4096: u16 never truncates.
    out.push(tag);
    out.extend_from_slice(&(value.len() as u16).to_le_bytes());
    out.extend_from_slice(value);
}

fn put_policy(out: &mut Vec<u8>, p: &Policy) {
    let (kind, key) = match p {
        Policy::RoundRobin => (0, None),
        Policy::IpHash => (1, None),
        Policy::Hash { key, consistent } => (2 + *consistent as u8, Some(key)),
        Policy::LeastConn => (4, None),
        Policy::Random { two } => (5 + *two as u8, None),
    };
    out.push(kind);
    if let Some(key) = key {
        put_str(out, key);
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // Names are checked to be at most 255 bytes and unix paths at most 107
    // before they reach the table, so u16 never truncates.
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_addr(out: &mut Vec<u8>, a: &Address) {
    match a {
        Address::Inet(SocketAddr::V4(v4)) => {
            out.push(4);
            out.extend_from_slice(&v4.ip().octets());
            out.extend_from_slice(&v4.port().to_le_bytes());
        }
        Address::Inet(SocketAddr::V6(v6)) => {
            out.push(6);
            out.extend_from_slice(&v6.ip().octets());
            out.extend_from_slice(&v6.port().to_le_bytes());
        }
        Address::Unix(path) => {
            out.push(1);
            put_str(out, path);
        }
    }
}

/// Decodes a payload. Upstreams that `prev` (the payload this process read
/// last) holds under the same name and rev are taken from it, shared, without
/// decoding their servers again: a writer stamps a new rev on every upstream
/// it changes, so a change to one upstream of a large table costs a reader
/// that upstream, not the table. Likewise the changes of its log that this
/// one still holds are not checked again (see [`ChangeLog::read`]).
///
/// `base` and `extension` are the two parts of the payload; an empty
/// extension (a slot written by a build without it) gives every upstream
/// the defaults of what it holds.
pub fn decode(base: &[u8], extension: &[u8], prev: Option<&Payload>) -> Result<Payload, String> {
    let prev_log = prev.map(|p| &p.changes);
    let prev = prev.map(|p| &p.table);
    let mut r = Reader { b: base, at: 0 };
    let version = r.u64()?;
    let upstreams = r.u32()? as usize;
    let changes = r.u32()? as usize;
    let entries = split_extension(extension, upstreams).map_err(|e| format!("extension: {e}"))?;
    let sync = match entries.first() {
        Some(&(0, entry)) => sync_mark(entry).map_err(|e| format!("extension: {e}"))?,
        _ => None,
    };
    let mut entries = entries.into_iter().peekable();
    // The smallest encoded upstream and change are well over 8 bytes: a count
    // larger than the bytes left is a lie, and must not size an allocation.
    let mut table = Table {
        upstreams: Vec::with_capacity(upstreams.min(r.left() / 8)),
        sync,
    };
    // A set, not `table.get`: a linear search per upstream made decoding
    // quadratic (16 s for 100 000 upstreams).
    let mut names: HashSet<&[u8]> = HashSet::with_capacity(upstreams.min(r.left() / 8));
    let mut by_name = None;
    for i in 0..upstreams {
        let name = r.name_bytes()?;
        if !names.insert(name) {
            return Err(format!(
                "upstream {:?} appears twice",
                String::from_utf8_lossy(name)
            ));
        }
        let rev = r.u64()?;
        let length = r.u32()? as usize;
        let body = r.take(length)?;
        let entry = entries
            .next_if(|&(at, _)| at == i)
            .map_or(&[][..], |(_, e)| e);
        // An empty entry where `prev` had fields: a build without the
        // extension rewrote the table, dropping them, and kept the rev.
        let same = |u: &&Arc<Upstream>| {
            u.name.as_bytes() == name
                && u.rev == rev
                && (!entry.is_empty() || extension_is_default(u))
        };
        let kept = prev.and_then(|p| {
            // By position first: most changes keep the order of upstreams.
            p.upstreams.get(i).filter(same).or_else(|| {
                let index = by_name.get_or_insert_with(|| p.by_position());
                index.get(name).map(|&at| &p.upstreams[at]).filter(same)
            })
        });
        if let Some(u) = kept {
            table.upstreams.push(u.clone());
            continue;
        }
        let name =
            String::from_utf8(name.to_vec()).map_err(|_| "invalid UTF-8 in a name".to_owned())?;
        check_name(&name)?;
        let mut s = Reader { b: body, at: 0 };
        let policy = match s.u8()? {
            0 => Policy::RoundRobin,
            1 => Policy::IpHash,
            k @ (2 | 3) => Policy::Hash {
                key: s.str()?,
                consistent: k == 3,
            },
            4 => Policy::LeastConn,
            k @ (5 | 6) => Policy::Random { two: k == 6 },
            k => {
                return Err(format!(
                    "upstream {name:?} has unknown balancing method {k}"
                ))
            }
        };
        let keepalive = s.u32()?;
        let n = s.u32()? as usize;
        let mut servers = Vec::with_capacity(n.min(s.left() / 8));
        let mut peers = Vec::with_capacity(n.min(s.left() / 8));
        for _ in 0..n {
            servers.push(server(&mut s)?);
            peers.push(PeerRef {
                index: s.u32()?,
                tag: s.u32()?,
            });
        }
        // No cell anywhere reads as the table before the store gave any.
        if peers.iter().all(|p| p.is_none()) {
            peers.clear();
        }
        if s.left() != 0 {
            return Err(format!(
                "upstream {name:?} has {} bytes after its servers",
                s.left()
            ));
        }
        let mut u = Upstream::new(name, servers);
        apply_extension(&mut u, entry).map_err(|why| format!("upstream {:?}: {why}", u.name))?;
        // With the extension's server fields (slow_start) too.
        policy
            .validate(&u.servers)
            .map_err(|why| format!("upstream {:?}: {why}", u.name))?;
        u.policy = policy;
        u.keepalive = keepalive;
        u.rev = rev;
        u.peers = peers;
        table.upstreams.push(Arc::new(u));
    }
    let log = ChangeLog::read(&mut r, changes, prev_log)?;
    if r.left() != 0 {
        return Err(format!("{} bytes after the end of the table", r.left()));
    }
    Ok(Payload {
        version,
        table,
        changes: log,
    })
}

/// The extension's entries, each with the position of its upstream among
/// the base's `upstreams`, in ascending order; none for an empty extension.
fn split_extension(b: &[u8], upstreams: usize) -> Result<Vec<(usize, &[u8])>, String> {
    if b.is_empty() {
        return Ok(Vec::new());
    }
    let mut r = Reader { b, at: 0 };
    let count = r.u32()? as usize;
    let mut entries: Vec<(usize, &[u8])> = Vec::with_capacity(count.min(r.left() / 8));
    for _ in 0..count {
        let at = r.u32()? as usize;
        if at >= upstreams || entries.last().is_some_and(|&(prev, _)| prev >= at) {
            return Err(format!(
                "entry for upstream {at} is out of order or past the table's {upstreams}"
            ));
        }
        let n = r.u32()? as usize;
        entries.push((at, r.take(n)?));
    }
    if r.left() != 0 {
        return Err(format!("{} bytes after its end", r.left()));
    }
    Ok(entries)
}

/// Sets what the fields of `entry` say on `u` (which has its servers),
/// checking each as the parser would.
fn apply_extension(u: &mut Upstream, entry: &[u8]) -> Result<(), String> {
    let mut r = Reader { b: entry, at: 0 };
    let mut seen = 0u32;
    while r.left() > 0 {
        let tag = r.u8()?;
        let n = r.u16()? as usize;
        let v = r.take(n)?;
        if (TAG_CHECK..=TAG_DNS).contains(&tag) {
            if seen & 1 << tag != 0 {
                return Err(format!("field {tag} appears twice"));
            }
            seen |= 1 << tag;
        }
        let exact = |len: usize| {
            if n == len {
                Ok(Reader { b: v, at: 0 })
            } else {
                Err(format!("field {tag} is {n} bytes long, not {len}"))
            }
        };
        let number = |min: u32, max: u32| -> Result<u32, String> {
            let n = exact(4)?.u32()?;
            if (min..=max).contains(&n) {
                Ok(n)
            } else {
                Err(format!("field {tag} holds {n}, out of range"))
            }
        };
        match tag {
            TAG_CHECK => u.check.line = Some(check_line(exact(CHECK_LEN)?)?),
            TAG_CHECK_HTTP_SEND => {
                let text =
                    std::str::from_utf8(v).map_err(|_| "invalid UTF-8 in check_http_send")?;
                check_http_send(text)?;
                u.check.http_send = text.to_owned();
            }
            TAG_CHECK_EXPECT_ALIVE => {
                u.check.http_expect_alive = ExpectAlive::from_bits(exact(1)?.u8()?)
                    .ok_or("check_http_expect_alive names no class or an unknown one")?;
            }
            TAG_CHECK_KEEPALIVE_REQUESTS => {
                u.check.keepalive_requests = number(1, CHECK_KEEPALIVE_REQUESTS_MAX)?
            }
            TAG_KEEPALIVE_REQUESTS => u.keepalive_requests = number(0, u32::MAX)?,
            TAG_KEEPALIVE_TIME => u.keepalive_time = number(0, MSEC_MAX)?,
            TAG_KEEPALIVE_TIMEOUT => u.keepalive_timeout = number(0, MSEC_MAX)?,
            TAG_MAX_CONNS => {
                let mut f = exact(4 * u.servers.len())?;
                for s in &mut u.servers {
                    s.max_conns = f.u32()?;
                    if s.max_conns > MAX_CONNS_MAX {
                        return Err(format!("server {} has max_conns {}", s.addr, s.max_conns));
                    }
                }
            }
            TAG_SLOW_START => {
                let mut f = exact(4 * u.servers.len())?;
                for s in &mut u.servers {
                    s.slow_start = f.u32()?;
                    if s.slow_start > SLOW_START_MAX {
                        return Err(format!("server {} has slow_start {}", s.addr, s.slow_start));
                    }
                }
            }
            TAG_OWNER => {
                exact(0)?;
                u.owner = Owner::Etcd;
            }
            // The table's, read by `sync_mark`.
            TAG_SYNC => {}
            TAG_NAMES => names(u, Reader { b: v, at: 0 })?,
            TAG_DNS => u.dns = dns_settings(Reader { b: v, at: 0 })?,
            // A later build's field: it says nothing this build could use.
            _ => {}
        }
    }
    Ok(())
}

/// The table's sync field in the first upstream's `entry`, if it has one.
fn sync_mark(entry: &[u8]) -> Result<Option<SyncMark>, String> {
    let mut r = Reader { b: entry, at: 0 };
    while r.left() > 0 {
        let tag = r.u8()?;
        let n = r.u16()? as usize;
        let v = r.take(n)?;
        if tag != TAG_SYNC {
            continue;
        }
        let mut f = Reader { b: v, at: 0 };
        let mark = SyncMark {
            revision: f.u64()?,
            cluster_id: f.u64()?,
            prefix: f.str()?,
        };
        if f.left() != 0 {
            return Err(format!(
                "the sync field has {} bytes after its end",
                f.left()
            ));
        }
        return Ok(Some(mark));
    }
    Ok(None)
}

/// Field 12 onto `u`, which has its servers: the `server NAME` lines and
/// which line each server came from.
fn names(u: &mut Upstream, mut f: Reader<'_>) -> Result<(), String> {
    let count = f.u16()? as usize;
    if count > NAMES_MAX {
        return Err(format!("{count} server NAME lines, at most {NAMES_MAX}"));
    }
    let mut lines = Vec::with_capacity(count);
    for _ in 0..count {
        let host = f.str()?;
        check_host(&host)?;
        let port = match f.u16()? {
            0 => None,
            p => Some(p),
        };
        let flags = f.u8()?;
        if flags & !15 != 0 {
            return Err(format!("server {host} has unknown flags {flags}"));
        }
        let params = ServerParams {
            weight: f.u32()?,
            max_conns: f.u32()?,
            max_fails: f.u32()?,
            fail_timeout: f.u32()?,
            slow_start: f.u32()?,
            backup: flags & 2 != 0,
            down: flags & 4 != 0,
        };
        if !(WEIGHT_MIN..=WEIGHT_MAX).contains(&params.weight)
            || params.max_conns > MAX_CONNS_MAX
            || params.max_fails > MAX_FAILS_MAX
            || params.fail_timeout > FAIL_TIMEOUT_MAX
            || params.slow_start > SLOW_START_MAX
        {
            return Err(format!("server {host} has out-of-range parameters"));
        }
        let mut n = NamedServer::new(host, port, params, flags & 1 != 0);
        n.resolved_ms = f.u64()?;
        n.ttl = f.u32()?;
        if flags & 8 != 0 {
            let service = f.str()?;
            check_service(&service)?;
            n.service = Some(service);
        }
        if n.is_pending() {
            return Err(format!("server {} was never resolved", n.target()));
        }
        lines.push(n);
    }
    for s in &mut u.servers {
        s.from = match f.u16()? {
            NO_LINE => None,
            i if usize::from(i) < count => Some(i),
            i => return Err(format!("server {} names line {i} of {count}", s.addr)),
        };
    }
    if f.left() != 0 {
        return Err(format!(
            "the names field has {} bytes after its end",
            f.left()
        ));
    }
    u.names = lines;
    Ok(())
}

/// Field 13: the `resolver` and `resolver_timeout` lines.
fn dns_settings(mut f: Reader<'_>) -> Result<DnsSettings, String> {
    let count = f.u8()? as usize;
    if count > RESOLVERS_MAX {
        return Err(format!("{count} resolvers, at most {RESOLVERS_MAX}"));
    }
    let mut d = DnsSettings::default();
    for _ in 0..count {
        match f.addr()? {
            Address::Inet(a) => d.resolvers.push(a),
            Address::Unix(p) => return Err(format!("resolver unix:{p}")),
        }
    }
    let time = |t: u32, min: u32| match t {
        UNSET => Ok(None),
        t if (min..=DNS_TIME_MAX_MS).contains(&t) => Ok(Some(t)),
        t => Err(format!("resolver time {t} is out of range")),
    };
    d.valid = time(f.u32()?, 1)?;
    d.ipv6 = match f.u8()? {
        0 => None,
        1 => Some(false),
        2 => Some(true),
        x => return Err(format!("resolver ipv6 {x} is not 0, 1 or 2")),
    };
    d.timeout_ms = time(f.u32()?, 1)?;
    if f.left() != 0 {
        return Err(format!(
            "the dns field has {} bytes after its end",
            f.left()
        ));
    }
    Ok(d)
}

fn check_line(mut f: Reader<'_>) -> Result<CheckLine, String> {
    let line = CheckLine {
        interval: f.u32()?,
        rise: f.u32()?,
        fall: f.u32()?,
        timeout: f.u32()?,
        default_down: match f.u8()? {
            0 => false,
            1 => true,
            x => return Err(format!("check default_down {x} is neither 0 nor 1")),
        },
        kind: *CheckType::ALL
            .get(f.u8()? as usize)
            .ok_or("check has an unknown type")?,
        port: f.u16()?,
        jitter: f.u32()?,
    };
    let time = 1..=CHECK_TIME_MAX;
    let count = 1..=CHECK_COUNT_MAX;
    if !time.contains(&line.interval)
        || !time.contains(&line.timeout)
        || line.jitter > CHECK_TIME_MAX
        || !count.contains(&line.rise)
        || !count.contains(&line.fall)
    {
        return Err("check has out-of-range parameters".into());
    }
    Ok(line)
}

fn server(r: &mut Reader<'_>) -> Result<ServerSpec, String> {
    let addr = r.addr()?;
    let weight = r.u32()?;
    let max_fails = r.u32()?;
    let fail_timeout = r.u32()?;
    let flags = r.u8()?;
    if !(WEIGHT_MIN..=WEIGHT_MAX).contains(&weight)
        || max_fails > MAX_FAILS_MAX
        || fail_timeout > FAIL_TIMEOUT_MAX
        || flags & !(BACKUP | DOWN) != 0
    {
        return Err(format!("server {addr} has out-of-range parameters"));
    }
    Ok(ServerSpec {
        addr,
        weight,
        // In the extension, if not 0.
        max_conns: 0,
        max_fails,
        fail_timeout,
        slow_start: 0,
        backup: flags & BACKUP != 0,
        down: flags & DOWN != 0,
        // In the extension, for an address a name resolved to.
        from: None,
    })
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn left(&self) -> usize {
        self.b.len() - self.at
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if n > self.left() {
            return Err(format!("table ends early at byte {}", self.at));
        }
        let s = &self.b[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn name_bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.u16()? as usize;
        self.take(n)
    }

    fn str(&mut self) -> Result<String, String> {
        self.str_ref().map(str::to_owned)
    }

    fn str_ref(&mut self) -> Result<&'a str, String> {
        let n = self.u16()? as usize;
        let at = self.at;
        std::str::from_utf8(self.take(n)?)
            .map_err(|_| format!("invalid UTF-8 in a name at byte {at}"))
    }

    fn addr(&mut self) -> Result<Address, String> {
        self.addr_ref().map(|a| a.to_address())
    }

    fn addr_ref(&mut self) -> Result<AddressRef<'a>, String> {
        match self.u8()? {
            4 => {
                let ip = Ipv4Addr::from(self.array::<4>()?);
                Ok(AddressRef::Inet(SocketAddr::new(ip.into(), self.u16()?)))
            }
            6 => {
                let ip = Ipv6Addr::from(self.array::<16>()?);
                Ok(AddressRef::Inet(SocketAddr::new(ip.into(), self.u16()?)))
            }
            1 => {
                let path = self.str_ref()?;
                if !path.starts_with('/') {
                    return Err(format!("unix socket path {path:?} is not absolute"));
                }
                Ok(AddressRef::Unix(path))
            }
            k => Err(format!("unknown address kind {k} at byte {}", self.at - 1)),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::table::model::CheckSettings;

    /// Every setting off its default, on the first upstream.
    fn settings(u: &mut Upstream) {
        u.keepalive_requests = 7;
        u.keepalive_time = 1500;
        u.keepalive_timeout = 0;
        u.check = CheckSettings {
            line: Some(CheckLine {
                interval: 3000,
                rise: 1,
                fall: 1000,
                timeout: 250,
                default_down: false,
                kind: CheckType::SslHello,
                port: 8443,
                jitter: 100,
            }),
            http_send: "HEAD /h\"\\ HTTP/1.1\r\nHost: x\r\n\r\n".into(),
            http_expect_alive: ExpectAlive::from_bits(0b1010).unwrap(),
            keepalive_requests: 50,
        };
    }

    pub(crate) fn sample() -> Payload {
        let mut a = ServerSpec::new(Address::Inet("127.0.0.1:8088".parse().unwrap()));
        a.weight = 3;
        a.max_fails = 2;
        a.fail_timeout = 5;
        a.max_conns = MAX_CONNS_MAX;
        a.slow_start = SLOW_START_MAX;
        let mut b = ServerSpec::new(Address::Inet("[::1]:8089".parse().unwrap()));
        b.backup = true;
        b.down = true;
        let c = ServerSpec::new(Address::Unix("/run/app.sock".into()));
        let mut table = Table::default();
        let mut local = Upstream::new("local", vec![a, b, c]);
        local.policy = Policy::LeastConn;
        local.keepalive = 16;
        local.rev = 3;
        local.peers = vec![
            PeerRef { index: 0, tag: 2 },
            PeerRef::NONE,
            PeerRef { index: 7, tag: 3 },
        ];
        settings(&mut local);
        table.upsert(local);
        table.upsert(Upstream::new("dyhost", vec![]));
        let mut hashed = Upstream::new(
            "hashed",
            vec![ServerSpec::new(Address::Unix("/run/h.sock".into()))],
        );
        hashed.policy = Policy::Hash {
            key: "$request_uri".into(),
            consistent: true,
        };
        hashed.check.line = Some(CheckLine::default());
        table.upsert(hashed);
        Payload {
            version: 4,
            changes: ChangeLog::new(&[Change {
                version: 4,
                upstream: "local".into(),
                server: Address::Inet("[::1]:8089".parse().unwrap()),
                removed: true,
            }]),
            table,
        }
    }

    fn round_trip(p: &Payload) -> Result<Payload, String> {
        let e = encode(p);
        decode(&e.base, &e.extension, None)
    }

    #[test]
    fn round_trip_keeps_every_field() {
        let p = sample();
        let back = round_trip(&p).unwrap();
        assert_eq!(back, p);
        // Equality leaves the cells out: compared here.
        for (b, u) in back.table.upstreams.iter().zip(&p.table.upstreams) {
            assert_eq!(b.peers, u.peers, "{}", u.name);
        }
        assert_eq!(back.table.get("local").unwrap().peers.len(), 3);
        assert_eq!(round_trip(&Payload::default()).unwrap(), Payload::default());
    }

    /// The extension holds only what differs from the defaults: a table
    /// without such settings encodes exactly as format 2 did, with none.
    #[test]
    fn defaults_need_no_extension_and_the_base_is_format_2() {
        let p = sample();
        let mut plain = p.clone();
        for u in &mut plain.table.upstreams {
            let u = Arc::make_mut(u);
            let defaults = Upstream::new(u.name.clone(), vec![]);
            u.check = defaults.check;
            u.keepalive_requests = defaults.keepalive_requests;
            u.keepalive_time = defaults.keepalive_time;
            u.keepalive_timeout = defaults.keepalive_timeout;
            for s in &mut u.servers {
                s.max_conns = 0;
                s.slow_start = 0;
            }
        }
        let e = encode(&plain);
        assert!(e.extension.is_empty());
        // The settings change the extension only, never the base.
        assert_eq!(encode(&p).base, e.base);
        // A slot without an extension (written by a build that had none)
        // reads as the defaults.
        assert_eq!(decode(&encode(&p).base, &[], None).unwrap(), plain);
        // One setting on one upstream: the count, one entry (its position
        // and length) and a 7-byte field.
        Arc::make_mut(&mut plain.table.upstreams[1]).keepalive_requests = 5;
        let e = encode(&plain);
        assert_eq!(e.extension.len(), 4 + 8 + 7);
        let back = decode(&e.base, &e.extension, None).unwrap();
        assert_eq!(back, plain);
        assert_eq!(back.table.upstreams[1].keepalive_requests, 5);
    }

    /// `dyups sync`'s marks: the owner flag per upstream, the table's sync
    /// mark on the first upstream's entry, in the extension only; a reader
    /// reusing a previous table's upstream 0 still reads the new mark.
    #[test]
    fn owner_and_sync_mark_round_trip_in_the_extension() {
        let mut p = sample();
        let base = encode(&p).base;
        Arc::make_mut(&mut p.table.upstreams[1]).owner = Owner::Etcd;
        p.table.sync = Some(SyncMark {
            revision: 41,
            cluster_id: u64::MAX,
            prefix: "/dyups/".into(),
        });
        let e = encode(&p);
        assert_eq!(e.base, base);
        let back = decode(&e.base, &e.extension, None).unwrap();
        assert_eq!(back, p);
        assert_eq!(back.table.upstreams[1].owner, Owner::Etcd);
        assert_eq!(back.table.upstreams[0].owner, Owner::Local);
        let mut later = p.clone();
        later.table.sync.as_mut().unwrap().revision = 42;
        let e2 = encode(&later);
        let again = decode(&e2.base, &e2.extension, Some(&back)).unwrap();
        assert_eq!(again.table.sync.unwrap().revision, 42);
        // A table without upstreams has nowhere to keep the mark.
        let empty = Payload {
            table: Table {
                upstreams: vec![],
                sync: later.table.sync.clone(),
            },
            ..Payload::default()
        };
        assert_eq!(round_trip(&empty).unwrap().table.sync, None);
    }

    #[test]
    fn every_truncation_is_refused() {
        let e = encode(&sample());
        assert!(!e.extension.is_empty());
        for n in 0..e.base.len() {
            assert!(
                decode(&e.base[..n], &e.extension, None).is_err(),
                "accepted {n} of {} bytes",
                e.base.len()
            );
        }
        // An empty extension is a valid one (the defaults); any other cut
        // is refused.
        for n in 1..e.extension.len() {
            assert!(
                decode(&e.base, &e.extension[..n], None).is_err(),
                "accepted {n} of {} extension bytes",
                e.extension.len()
            );
        }
        let mut longer = e.base.clone();
        longer.push(0);
        assert!(decode(&longer, &e.extension, None)
            .unwrap_err()
            .contains("after the end"));
        let mut longer = e.extension.clone();
        longer.push(0);
        assert!(decode(&e.base, &longer, None)
            .unwrap_err()
            .contains("after its end"));
    }

    #[test]
    fn out_of_range_values_are_refused() {
        let mut p = sample();
        Arc::make_mut(&mut p.table.upstreams[0]).servers[0].weight = 0;
        assert!(round_trip(&p).unwrap_err().contains("out-of-range"));
        let mut p = sample();
        Arc::make_mut(&mut p.table.upstreams[1]).name = "bad name".into();
        assert!(round_trip(&p).is_err());
        let mut p = sample();
        Arc::make_mut(&mut p.table.upstreams[1]).name = "local".into();
        assert!(round_trip(&p).unwrap_err().contains("twice"));
        type Spoil = fn(&mut Upstream);
        let bad: [(&str, Spoil); 10] = [
            ("max_conns", |u| u.servers[0].max_conns = MAX_CONNS_MAX + 1),
            ("slow_start", |u| {
                u.servers[0].slow_start = SLOW_START_MAX + 1
            }),
            // Checked with the extension's server fields, not before them.
            ("parameter \"slow_start\"", |u| u.policy = Policy::IpHash),
            ("out-of-range", |u| {
                u.check.line.as_mut().unwrap().interval = 0
            }),
            ("out-of-range", |u| u.check.line.as_mut().unwrap().rise = 0),
            ("out-of-range", |u| {
                u.check.line.as_mut().unwrap().timeout = CHECK_TIME_MAX + 1
            }),
            ("control character", |u| {
                u.check.http_send = "GET \u{1}".into()
            }),
            ("empty", |u| u.check.http_send = String::new()),
            ("out of range", |u| u.check.keepalive_requests = 0),
            ("out of range", |u| u.keepalive_timeout = MSEC_MAX + 1),
        ];
        for (why, spoil) in bad {
            let mut p = sample();
            spoil(Arc::make_mut(&mut p.table.upstreams[0]));
            let err = round_trip(&p).unwrap_err();
            assert!(
                err.contains("upstream \"local\"") && err.contains(why),
                "{err}"
            );
        }
    }

    /// Entries and fields built by hand: what a later build (or a broken
    /// one) could write.
    fn with_entry(fields: &[u8]) -> Result<Payload, String> {
        let mut p = sample();
        p.table.upstreams.truncate(1);
        let e = encode(&p);
        let mut ext = Vec::new();
        ext.extend_from_slice(&1u32.to_le_bytes());
        ext.extend_from_slice(&0u32.to_le_bytes());
        ext.extend_from_slice(&(fields.len() as u32).to_le_bytes());
        ext.extend_from_slice(fields);
        decode(&e.base, &ext, None)
    }

    fn field(tag: u8, value: &[u8]) -> Vec<u8> {
        let mut f = vec![tag];
        f.extend_from_slice(&(value.len() as u16).to_le_bytes());
        f.extend_from_slice(value);
        f
    }

    #[test]
    fn unknown_fields_are_skipped_and_known_ones_checked() {
        // A later build's field 200 between two of ours.
        let mut fields = field(TAG_KEEPALIVE_REQUESTS, &9u32.to_le_bytes());
        fields.extend(field(200, b"anything at all"));
        fields.extend(field(TAG_CHECK_EXPECT_ALIVE, &[0b0100]));
        let u = &with_entry(&fields).unwrap().table.upstreams[0];
        assert_eq!(u.keepalive_requests, 9);
        assert_eq!(
            u.check.http_expect_alive.names().collect::<Vec<_>>(),
            ["http_4xx"]
        );
        assert_eq!(u.check.line, None);
        assert!(u.servers.iter().all(|s| s.max_conns == 0));

        let cases: [(Vec<u8>, &str); 7] = [
            (
                [field(5, &1u32.to_le_bytes()), field(5, &2u32.to_le_bytes())].concat(),
                "appears twice",
            ),
            (field(TAG_KEEPALIVE_TIME, &[1, 2]), "2 bytes long, not 4"),
            (field(TAG_MAX_CONNS, &[0; 8]), "8 bytes long, not 12"),
            (field(TAG_CHECK_EXPECT_ALIVE, &[0]), "names no class"),
            (field(TAG_CHECK_EXPECT_ALIVE, &[0x10]), "unknown one"),
            (field(TAG_CHECK_HTTP_SEND, b"\xff"), "UTF-8"),
            (vec![TAG_CHECK, 24, 0, 1], "ends early"),
        ];
        for (fields, why) in cases {
            let err = with_entry(&fields).unwrap_err();
            assert!(err.contains(why), "{err} lacks {why}");
        }
        // Entries name upstreams of the table, in order, each once.
        let e = encode(&sample());
        // "local" (0) and "hashed" (2) have fields, "dyhost" none.
        assert_eq!(e.extension[..8], [2, 0, 0, 0, 0, 0, 0, 0]);
        let hashed_at = 8 + 4 + u32::from_le_bytes(e.extension[8..12].try_into().unwrap()) as usize;
        for (at, bad) in [(4, 3u8), (hashed_at, 0)] {
            let mut ext = e.extension.clone();
            ext[at] = bad;
            assert!(
                decode(&e.base, &ext, None)
                    .unwrap_err()
                    .contains("out of order or past"),
                "upstream {bad} at byte {at}"
            );
        }
    }

    /// A reader keeps the upstreams that did not change (same name, same
    /// rev) from the table it read last, except one whose fields a build
    /// without the extension dropped: that one it decodes again.
    #[test]
    fn a_dropped_extension_is_not_papered_over_by_the_previous_table() {
        let p = sample();
        let e = encode(&p);
        let prev = decode(&e.base, &e.extension, None).unwrap();
        let shared = decode(&e.base, &e.extension, Some(&prev)).unwrap();
        assert!(Arc::ptr_eq(
            &shared.table.upstreams[0],
            &prev.table.upstreams[0]
        ));
        // The same base, rewritten by a format-2 build: no extension.
        let dropped = decode(&e.base, &[], Some(&prev)).unwrap();
        let local = &dropped.table.upstreams[0];
        assert!(!Arc::ptr_eq(local, &prev.table.upstreams[0]));
        assert_eq!(
            (local.check.line.as_ref(), local.servers[0].max_conns),
            (None, 0)
        );
        // "dyhost" has nothing in the extension: still shared.
        assert!(Arc::ptr_eq(
            &dropped.table.upstreams[1],
            &prev.table.upstreams[1]
        ));
    }

    /// `n` changes from version `from` on, of every address kind.
    fn changes(from: u64, n: usize) -> Vec<Change> {
        (0..n)
            .map(|i| Change {
                version: from + i as u64 / 3,
                upstream: format!("u{}", i % 7),
                server: match i % 3 {
                    0 => Address::Inet(([10, 0, 0, 1], i as u16).into()),
                    1 => Address::Inet("[::1]:8089".parse().unwrap()),
                    _ => Address::Unix(format!("/run/s{i}.sock")),
                },
                removed: i % 2 == 0,
            })
            .collect()
    }

    /// Appending to the encoded log, and reading part of it, answer what
    /// the decoded log did: joined with the new changes and cut to the
    /// last `max`, or filtered by version.
    #[test]
    fn the_log_appended_and_read_in_place_is_the_log_decoded() {
        for (old, new) in [
            (0, 0),
            (0, 5),
            (3, 2),
            (510, 1),
            (511, 3),
            (512, 1),
            (512, 600),
        ] {
            let before = changes(1, old);
            let added = changes(1 + old as u64, new);
            let mut joined: Vec<Change> = before.iter().chain(&added).cloned().collect();
            joined.drain(..joined.len().saturating_sub(CHANGE_LOG_MAX));
            let log = ChangeLog::new(&before).appended(&added, CHANGE_LOG_MAX);
            assert_eq!(log.to_vec(), joined, "{old} + {new}");
            assert_eq!(log.len(), joined.len());
            assert_eq!(log, ChangeLog::new(&joined), "the same bytes");
            for v in [0, 1, 50, 170, 400] {
                let after: Vec<Change> = joined.iter().filter(|c| c.version > v).cloned().collect();
                assert_eq!(log.since(v), after, "{old} + {new} since {v}");
            }
        }
        // Through a slot: what a reader gets is what was encoded.
        let mut p = sample();
        p.changes = ChangeLog::new(&changes(4, 512));
        assert_eq!(round_trip(&p).unwrap().changes.to_vec(), changes(4, 512));
    }

    /// The quick walk over the log refuses exactly what reading it change
    /// by change refuses, whatever byte of it is wrong.
    #[test]
    fn the_log_is_skimmed_as_strictly_as_it_is_read() {
        let log = ChangeLog::new(&changes(1, 9));
        let bytes = log.bytes.to_vec();
        let read = |b: &[u8], count: usize| {
            let mut r = Reader { b, at: 0 };
            (0..count)
                .try_for_each(|_| read_change(&mut r).map(drop))
                .map(|()| r.at)
                .ok()
        };
        assert_eq!(skim(&bytes, 9), Some(bytes.len()));
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut m = bytes.clone();
                m[i] ^= 1 << bit;
                for count in [8, 9] {
                    assert_eq!(skim(&m, count), read(&m, count), "byte {i} bit {bit}");
                }
            }
            assert_eq!(skim(&bytes[..i], 9), None, "cut at {i}");
        }
    }

    /// Read after the log it continues, a log reads as it does alone, and
    /// a wrong byte is refused wherever it is: in the changes added, or in
    /// those the known log held (then the bytes differ from it, and all
    /// are checked).
    #[test]
    fn a_log_read_after_the_one_it_continues_reads_as_alone() {
        for (old, new) in [
            (0, 3),
            (5, 0),
            (5, 2),
            (512, 1),
            (512, 40),
            (300, 300),
            (512, 600),
        ] {
            let mut known = sample();
            known.changes = ChangeLog::new(&changes(1, old));
            let mut p = sample();
            p.changes = known
                .changes
                .appended(&changes(1 + old as u64, new), CHANGE_LOG_MAX);
            let e = encode(&p);
            assert_eq!(
                decode(&e.base, &e.extension, Some(&known)).unwrap(),
                p,
                "{old} + {new}"
            );
            let at = e.base.len() - p.changes.bytes.len();
            // The first change's name (0xff: not UTF-8), the last one's flag.
            for (i, spot, byte) in [(0, at + 10, 0xff), (1, e.base.len() - 1, 2)] {
                if p.changes.is_empty() {
                    continue;
                }
                let mut bad = e.base.clone();
                bad[spot] = byte;
                assert_eq!(
                    decode(&bad, &e.extension, Some(&known)).is_err(),
                    decode(&bad, &e.extension, None).is_err(),
                    "{old} + {new}, flip {i}"
                );
                assert!(
                    decode(&bad, &e.extension, Some(&known)).is_err(),
                    "{old} + {new}, flip {i}"
                );
            }
        }
    }

    /// A log that passed its checksum is still checked entry by entry when
    /// read, though it is decoded only later.
    #[test]
    fn a_bad_change_is_refused_when_the_slot_is_read() {
        let mut p = sample();
        p.changes = ChangeLog::new(&changes(4, 4));
        let e = encode(&p);
        let at = e.base.len() - p.changes.bytes.len();
        // The first change's flag, after its version, name and address.
        let flag = at + 8 + 2 + 2 + 1 + 4 + 2;
        let mut bad = e.base.clone();
        bad[flag] = 2;
        let err = decode(&bad, &e.extension, None).unwrap_err();
        assert!(err.contains("change flag 2"), "{err}");
        // A unix path that is not absolute, in the third change.
        let path = at
            + e.base[at..]
                .windows(12)
                .position(|w| w == b"/run/s2.sock")
                .unwrap();
        let mut bad = e.base.clone();
        bad[path] = b'x';
        let err = decode(&bad, &e.extension, None).unwrap_err();
        assert!(err.contains("not absolute"), "{err}");
        let mut bad = e.base.clone();
        bad[at + 10] = 0xff;
        let err = decode(&bad, &e.extension, None).unwrap_err();
        assert!(err.contains("invalid UTF-8"), "{err}");
    }

    #[test]
    fn a_huge_count_does_not_allocate_or_panic() {
        let mut b = Vec::new();
        b.extend_from_slice(&1u64.to_le_bytes());
        b.extend_from_slice(&u32::MAX.to_le_bytes());
        b.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&b, &[], None).unwrap_err().contains("ends early"));
        let mut ext = Vec::new();
        ext.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&b, &ext, None).unwrap_err().contains("extension"));
    }

    #[test]
    fn every_single_byte_flip_decodes_or_errors_without_panic() {
        let e = encode(&sample());
        for i in 0..e.base.len() {
            for bit in 0..8 {
                let mut m = e.base.clone();
                m[i] ^= 1 << bit;
                let _ = decode(&m, &e.extension, None);
            }
        }
        for i in 0..e.extension.len() {
            for bit in 0..8 {
                let mut m = e.extension.clone();
                m[i] ^= 1 << bit;
                let _ = decode(&e.base, &m, None);
            }
        }
    }
    /// `sample` with an upstream of `server NAME` lines: one re-resolved
    /// with two addresses, one resolved once with none left, a literal
    /// server between, and the upstream's `resolver` settings.
    fn named_sample() -> Payload {
        use crate::table::names::ServerParams;
        let mut p = sample();
        let mut params = ServerParams {
            weight: 7,
            max_conns: 9,
            max_fails: 4,
            fail_timeout: 30,
            slow_start: 45,
            backup: false,
            down: true,
        };
        let mut app = NamedServer::new("App.Internal".into(), Some(8080), params, true);
        app.resolved_ms = 1_700_000_000_123;
        app.ttl = 300;
        params.down = false;
        params.backup = true;
        let mut once = NamedServer::new("once.internal".into(), None, params, false);
        once.resolved_ms = 1;
        once.ttl = u32::MAX;
        // A service line: its server has the record's port and weight.
        let mut svc = NamedServer::new("svc.internal".into(), None, ServerParams::default(), true);
        svc.service = Some("http".into());
        svc.resolved_ms = 2;
        svc.ttl = 5;
        let from_svc = ServerSpec {
            from: Some(2),
            weight: 5,
            backup: true,
            ..ServerSpec::new(Address::Inet("10.0.0.7:9000".parse().unwrap()))
        };
        let from_app = |a: &str| ServerSpec {
            from: Some(0),
            ..app.params.server(Address::Inet(a.parse().unwrap()))
        };
        let mut u = Upstream::new(
            "named",
            vec![
                from_app("10.0.0.1:8080"),
                ServerSpec::new(Address::Inet("10.9.9.9:80".parse().unwrap())),
                from_app("[fd00::1]:8080"),
                from_svc,
            ],
        );
        u.names = vec![app, once, svc];
        u.dns = DnsSettings {
            resolvers: vec![
                "10.0.0.53:53".parse().unwrap(),
                "[::1]:5353".parse().unwrap(),
            ],
            valid: Some(30),
            ipv6: Some(false),
            timeout_ms: Some(1500),
        };
        p.table.upsert(u);
        p
    }

    /// The lines and where each server came from in field 12, the
    /// resolver settings in field 13, every value kept; the base is the
    /// one the same servers written as addresses give.
    #[test]
    fn server_name_lines_and_resolvers_round_trip_in_the_extension() {
        let p = named_sample();
        let back = round_trip(&p).unwrap();
        assert_eq!(back, p);
        let u = back.table.get("named").unwrap();
        assert_eq!(u.names, p.table.get("named").unwrap().names);
        assert_eq!(
            u.servers.iter().map(|s| s.from).collect::<Vec<_>>(),
            [Some(0), None, Some(0), Some(2)]
        );
        assert_eq!(u.names[2].service.as_deref(), Some("http"));
        assert_eq!((u.names[1].resolved_ms, u.names[1].ttl), (1, u32::MAX));
        assert_eq!(u.dns.timeout_ms, Some(1500));
        // Unset settings stay unset (not a default that reads back set).
        let mut unset = p.clone();
        {
            let u = Arc::make_mut(
                unset
                    .table
                    .upstreams
                    .iter_mut()
                    .find(|u| u.name == "named")
                    .unwrap(),
            );
            u.dns = DnsSettings {
                resolvers: vec!["10.0.0.53:53".parse().unwrap()],
                ..DnsSettings::default()
            };
        }
        assert_eq!(round_trip(&unset).unwrap(), unset);

        let mut literal = p.clone();
        for u in &mut literal.table.upstreams {
            let u = Arc::make_mut(u);
            u.names.clear();
            u.dns = DnsSettings::default();
            for s in &mut u.servers {
                s.from = None;
            }
        }
        assert_eq!(encode(&p).base, encode(&literal).base);
    }

    /// A slot written before fields 12 and 13 (or by a build without them)
    /// reads with no `server NAME` line, every server an address as
    /// written, and the default resolver settings; a later build's fields
    /// beside ours change nothing.
    #[test]
    fn a_slot_without_the_name_fields_reads_with_the_defaults() {
        let p = named_sample();
        let old = decode(&encode(&p).base, &[], None).unwrap();
        let u = old.table.get("named").unwrap();
        assert!(u.names.is_empty());
        assert!(u.servers.iter().all(|s| s.from.is_none()));
        assert!(u.dns.is_default());
        assert_eq!(
            u.servers
                .iter()
                .map(|s| s.addr.to_string())
                .collect::<Vec<_>>(),
            [
                "10.0.0.1:8080",
                "10.9.9.9:80",
                "[fd00::1]:8080",
                "10.0.0.7:9000"
            ]
        );
        // An extension with another field only, as builds before wrote it.
        let only = with_entry(&field(TAG_KEEPALIVE_REQUESTS, &9u32.to_le_bytes())).unwrap();
        let u = &only.table.upstreams[0];
        assert_eq!(u.keepalive_requests, 9);
        assert!(u.names.is_empty() && u.dns.is_default());
        assert!(u.servers.iter().all(|s| s.from.is_none()));
        // A table without names writes neither field.
        let e = encode(&sample());
        let back = decode(&e.base, &e.extension, None).unwrap();
        assert!(back
            .table
            .upstreams
            .iter()
            .all(|u| u.names.is_empty() && u.dns.is_default()));
    }

    /// Fields 12 and 13 as a broken writer could leave them: refused,
    /// saying what is wrong, never trusted.
    #[test]
    fn bad_name_fields_are_refused() {
        // `with_entry`'s upstream is sample's "local", with three servers.
        let line = |host: &str, flags: u8, weight: u32, resolved: u64| {
            let mut v = Vec::new();
            put_str(&mut v, host);
            v.extend_from_slice(&8080u16.to_le_bytes());
            v.push(flags);
            for x in [weight, 0, 1, 10, 0] {
                v.extend_from_slice(&x.to_le_bytes());
            }
            v.extend_from_slice(&resolved.to_le_bytes());
            v.extend_from_slice(&30u32.to_le_bytes());
            v
        };
        let names = |lines: &[&[u8]], from: &[u16]| {
            let mut v = (lines.len() as u16).to_le_bytes().to_vec();
            for l in lines {
                v.extend_from_slice(l);
            }
            for f in from {
                v.extend_from_slice(&f.to_le_bytes());
            }
            field(TAG_NAMES, &v)
        };
        let good = line("app.internal", 1, 1, 5);
        let none = [NO_LINE; 3];
        let ok = with_entry(&names(&[&good], &[0, NO_LINE, 0])).unwrap();
        assert_eq!(ok.table.upstreams[0].names[0].target(), "app.internal:8080");
        let dns = |count: u8, valid: u32, ipv6: u8, timeout: u32| {
            let mut v = vec![count];
            for i in 0..count {
                put_addr(&mut v, &Address::Inet(([10, 0, 0, i + 1], 53).into()));
            }
            v.extend_from_slice(&valid.to_le_bytes());
            v.push(ipv6);
            v.extend_from_slice(&timeout.to_le_bytes());
            field(TAG_DNS, &v)
        };
        assert_eq!(
            with_entry(&dns(2, UNSET, 0, UNSET))
                .unwrap()
                .table
                .upstreams[0]
                .dns
                .resolvers
                .len(),
            2
        );
        let mut trailing = names(&[&good], &none);
        trailing.push(0);
        let n = trailing.len() - 3;
        trailing[1..3].copy_from_slice(&(n as u16).to_le_bytes());
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (names(&[&good], &[0, 1, 0]), "names line 1 of 1"),
            (
                names(&[&line("app.internal", 16, 1, 5)], &none),
                "unknown flags 16",
            ),
            (
                // Flag 8 says a service follows; none does.
                names(&[&line("app.internal", 9, 1, 5)], &none),
                "ends early",
            ),
            (
                names(&[&line("app.internal", 1, 0, 5)], &none),
                "out-of-range parameters",
            ),
            (
                names(&[&line("app.internal", 1, 1, 0)], &none),
                "was never resolved",
            ),
            (names(&[&line("a..b", 1, 1, 5)], &none), "a..b"),
            (names(&[&good], &[0, 0]), "ends early"),
            (trailing, "bytes after its end"),
            (
                field(
                    TAG_NAMES,
                    &((crate::table::names::NAMES_MAX + 1) as u16).to_le_bytes(),
                ),
                "at most 100",
            ),
            (dns(9, UNSET, 0, UNSET), "9 resolvers, at most 8"),
            (dns(1, UNSET, 3, UNSET), "ipv6 3"),
            (dns(1, 0, 0, UNSET), "out of range"),
            (dns(1, UNSET, 0, DNS_TIME_MAX_MS + 1), "out of range"),
            (
                [dns(1, UNSET, 0, UNSET), dns(1, UNSET, 0, UNSET)].concat(),
                "appears twice",
            ),
        ];
        for (fields, why) in cases {
            let err = with_entry(&fields).unwrap_err();
            assert!(err.contains(why), "{err} lacks {why}");
        }
    }

    #[test]
    fn every_single_byte_flip_of_the_name_fields_decodes_or_errors_without_panic() {
        let e = encode(&named_sample());
        for i in 0..e.extension.len() {
            for bit in 0..8 {
                let mut m = e.extension.clone();
                m[i] ^= 1 << bit;
                let _ = decode(&e.base, &m, None);
            }
        }
    }
}
