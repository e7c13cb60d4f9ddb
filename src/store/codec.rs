//! The payload of a slot: the table and the recent change log, in a compact
//! little-endian encoding. Decoding checks every length, count and value, so
//! a payload that passed its checksum but was written by a broken or foreign
//! writer is still refused rather than trusted.
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
//! ```

use std::collections::HashSet;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use crate::model::{
    check_name, Address, Change, ServerSpec, Table, Upstream, FAIL_TIMEOUT_MAX, MAX_FAILS_MAX,
    WEIGHT_MAX, WEIGHT_MIN,
};
use crate::policy::Policy;
use crate::zone::PeerRef;

/// How many changes the log keeps; older ones are dropped first.
pub const CHANGE_LOG_MAX: usize = 512;

const BACKUP: u8 = 1;
const DOWN: u8 = 2;

/// What one slot holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Payload {
    pub version: u64,
    pub table: Table,
    pub changes: Vec<Change>,
}

pub fn encode(p: &Payload) -> Vec<u8> {
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
    for c in &p.changes {
        out.extend_from_slice(&c.version.to_le_bytes());
        put_str(&mut out, &c.upstream);
        put_addr(&mut out, &c.server);
        out.push(c.removed as u8);
    }
    out
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

/// Decodes a payload. Upstreams that `prev` (the table this process read
/// last) holds under the same name and rev are taken from it, shared, without
/// decoding their servers again: a writer stamps a new rev on every upstream
/// it changes, so a change to one upstream of a large table costs a reader
/// that upstream, not the table.
pub fn decode(b: &[u8], prev: Option<&Table>) -> Result<Payload, String> {
    let mut r = Reader { b, at: 0 };
    let version = r.u64()?;
    let upstreams = r.u32()? as usize;
    let changes = r.u32()? as usize;
    // The smallest encoded upstream and change are well over 8 bytes: a count
    // larger than the bytes left is a lie, and must not size an allocation.
    let mut table = Table {
        upstreams: Vec::with_capacity(upstreams.min(r.left() / 8)),
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
        let same = |u: &&Arc<Upstream>| u.name.as_bytes() == name && u.rev == rev;
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
        policy
            .validate(&servers)
            .map_err(|why| format!("upstream {name:?}: {why}"))?;
        table.upstreams.push(Arc::new(Upstream {
            name,
            policy,
            keepalive,
            servers,
            rev,
            peers,
        }));
    }
    let mut log = Vec::with_capacity(changes.min(r.left() / 8));
    for _ in 0..changes {
        let version = r.u64()?;
        let upstream = r.str()?;
        let server = r.addr()?;
        let removed = match r.u8()? {
            0 => false,
            1 => true,
            x => return Err(format!("change flag {x} is neither 0 nor 1")),
        };
        log.push(Change {
            version,
            upstream,
            server,
            removed,
        });
    }
    if r.left() != 0 {
        return Err(format!("{} bytes after the end of the table", r.left()));
    }
    Ok(Payload {
        version,
        table,
        changes: log,
    })
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
        max_fails,
        fail_timeout,
        backup: flags & BACKUP != 0,
        down: flags & DOWN != 0,
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
        let n = self.u16()? as usize;
        let at = self.at;
        String::from_utf8(self.take(n)?.to_vec())
            .map_err(|_| format!("invalid UTF-8 in a name at byte {at}"))
    }

    fn addr(&mut self) -> Result<Address, String> {
        match self.u8()? {
            4 => {
                let ip = Ipv4Addr::from(self.array::<4>()?);
                Ok(Address::Inet(SocketAddr::new(ip.into(), self.u16()?)))
            }
            6 => {
                let ip = Ipv6Addr::from(self.array::<16>()?);
                Ok(Address::Inet(SocketAddr::new(ip.into(), self.u16()?)))
            }
            1 => {
                let path = self.str()?;
                if !path.starts_with('/') {
                    return Err(format!("unix socket path {path:?} is not absolute"));
                }
                Ok(Address::Unix(path))
            }
            k => Err(format!("unknown address kind {k} at byte {}", self.at - 1)),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample() -> Payload {
        let mut a = ServerSpec::new(Address::Inet("127.0.0.1:8088".parse().unwrap()));
        a.weight = 3;
        a.max_fails = 2;
        a.fail_timeout = 5;
        let mut b = ServerSpec::new(Address::Inet("[::1]:8089".parse().unwrap()));
        b.backup = true;
        b.down = true;
        let c = ServerSpec::new(Address::Unix("/run/app.sock".into()));
        let mut table = Table::default();
        table.upsert(Upstream {
            name: "local".into(),
            policy: Policy::LeastConn,
            keepalive: 16,
            servers: vec![a, b, c],
            rev: 3,
            peers: vec![
                PeerRef { index: 0, tag: 2 },
                PeerRef::NONE,
                PeerRef { index: 7, tag: 3 },
            ],
        });
        table.upsert(Upstream::new("dyhost", vec![]));
        let mut hashed = Upstream::new(
            "hashed",
            vec![ServerSpec::new(Address::Unix("/run/h.sock".into()))],
        );
        hashed.policy = Policy::Hash {
            key: "$request_uri".into(),
            consistent: true,
        };
        table.upsert(hashed);
        Payload {
            version: 4,
            changes: vec![Change {
                version: 4,
                upstream: "local".into(),
                server: Address::Inet("[::1]:8089".parse().unwrap()),
                removed: true,
            }],
            table,
        }
    }

    #[test]
    fn round_trip_keeps_every_field() {
        let p = sample();
        let back = decode(&encode(&p), None).unwrap();
        assert_eq!(back, p);
        // Equality leaves the cells out: compared here.
        for (b, u) in back.table.upstreams.iter().zip(&p.table.upstreams) {
            assert_eq!(b.peers, u.peers, "{}", u.name);
        }
        assert_eq!(back.table.get("local").unwrap().peers.len(), 3);
        assert_eq!(
            decode(&encode(&Payload::default()), None).unwrap(),
            Payload::default()
        );
    }

    #[test]
    fn every_truncation_is_refused() {
        let bytes = encode(&sample());
        for n in 0..bytes.len() {
            assert!(
                decode(&bytes[..n], None).is_err(),
                "accepted {n} of {} bytes",
                bytes.len()
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode(&longer, None).unwrap_err().contains("after the end"));
    }

    #[test]
    fn out_of_range_values_are_refused() {
        let mut p = sample();
        Arc::make_mut(&mut p.table.upstreams[0]).servers[0].weight = 0;
        assert!(decode(&encode(&p), None)
            .unwrap_err()
            .contains("out-of-range"));
        let mut p = sample();
        Arc::make_mut(&mut p.table.upstreams[1]).name = "bad name".into();
        assert!(decode(&encode(&p), None).is_err());
        let mut p = sample();
        Arc::make_mut(&mut p.table.upstreams[1]).name = "local".into();
        assert!(decode(&encode(&p), None).unwrap_err().contains("twice"));
    }

    #[test]
    fn a_huge_count_does_not_allocate_or_panic() {
        let mut b = Vec::new();
        b.extend_from_slice(&1u64.to_le_bytes());
        b.extend_from_slice(&u32::MAX.to_le_bytes());
        b.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&b, None).unwrap_err().contains("ends early"));
    }

    #[test]
    fn every_single_byte_flip_decodes_or_errors_without_panic() {
        let bytes = encode(&sample());
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut m = bytes.clone();
                m[i] ^= 1 << bit;
                let _ = decode(&m, None);
            }
        }
    }
}
