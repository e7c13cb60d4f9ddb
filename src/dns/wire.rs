//! DNS messages (RFC 1035, AAAA from RFC 3596, SRV from RFC 2782): the
//! query for one name and type, and what a reply to it says. Bytes in, bytes out: the transports
//! (Lua cosockets in nginx's workers, std sockets elsewhere) only carry
//! them. A reply is checked against the query it answers (id, question,
//! flags) before anything in it is believed, and every length and pointer
//! in it is bounded: a reply is input from the network.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const TYPE_A: u16 = 1;
pub const TYPE_AAAA: u16 = 28;
pub const TYPE_SRV: u16 = 33;
const TYPE_CNAME: u16 = 5;
const CLASS_IN: u16 = 1;
/// Recursion desired: a stub asks the resolver to do the work.
const FLAG_RD: u16 = 0x0100;
const FLAG_QR: u16 = 0x8000;
const FLAG_TC: u16 = 0x0200;
const HEADER_LEN: usize = 12;
/// Compression pointers followed in one name at most: a loop ends here.
const POINTERS_MAX: usize = 32;
/// A TTL above 2^31 - 1 is read as 0 (RFC 2181 8).
const TTL_MAX: u32 = i32::MAX as u32;
/// SRV records taken from one reply at most: each is a lookup of its
/// target and a server, and a TCP reply could hold thousands.
pub const SRV_RECORDS_MAX: usize = 64;

/// The query for `host`'s records of `qtype`, with message id `id`.
pub fn query(id: u16, host: &str, qtype: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + host.len() + 6);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&FLAG_RD.to_be_bytes());
    out.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    let name = host.strip_suffix('.').unwrap_or(host);
    for label in name.split('.') {
        // Labels are checked (1..=63 bytes) before a name reaches the table.
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out.extend_from_slice(&qtype.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    out
}

/// What a reply says about the name and type asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// Addresses of the type asked (CNAMEs followed by the resolver), and
    /// the smallest TTL among them; none for NODATA (the name exists,
    /// without records of that type).
    Records { addrs: Vec<IpAddr>, ttl: u32 },
    /// The SRV records of the name asked (CNAMEs followed), sorted by
    /// priority, and the smallest TTL among them; none for NODATA.
    Services { records: Vec<SrvRecord>, ttl: u32 },
    /// NXDOMAIN: the name does not exist.
    NoSuchName,
    /// The reply did not fit a datagram: ask again over TCP.
    Truncated,
    /// The resolver could not answer: SERVFAIL, REFUSED, ... by name.
    Failure(String),
}

/// One SRV record: where the service is, and how much of it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SrvRecord {
    /// Lower first: the lowest priority present takes the traffic.
    pub priority: u16,
    /// Its share among the records of its priority; a 0 is read as 1, as
    /// nginx reads it (RFC 2782's 0 is "very rarely", which a weighted
    /// round robin cannot say).
    pub weight: u16,
    pub port: u16,
    /// The target host, lower case, without the final dot.
    pub target: String,
}

/// Reads `reply` as the answer to `query` (the bytes [`query`] made).
/// `Err`: not a reply to that query (another id, another question, a
/// query rather than a reply) or malformed: a transport waits on for the
/// right one, as a resolver must not take the first datagram that comes.
pub fn read_reply(query: &[u8], reply: &[u8]) -> Result<Reply, String> {
    if reply.len() < HEADER_LEN || query.len() < HEADER_LEN {
        return Err(format!("a reply of {} bytes is too short", reply.len()));
    }
    let mut r = Cursor { b: reply, at: 0 };
    let id = r.u16()?;
    let flags = r.u16()?;
    let (qd, an) = (r.u16()?, r.u16()?);
    r.u16()?;
    r.u16()?;
    if id != u16::from_be_bytes([query[0], query[1]]) {
        return Err(format!("reply id {id} is not the query's"));
    }
    if flags & FLAG_QR == 0 || (flags >> 11) & 0xf != 0 {
        return Err("not a reply to a standard query".into());
    }
    // The question comes back as it was asked.
    let asked = &query[HEADER_LEN..];
    if qd != 1 {
        return Err(format!("the reply has {qd} questions"));
    }
    let start = r.at;
    let qname = r.name()?;
    let qtype = r.u16()?;
    let qclass = r.u16()?;
    let mut asked_r = Cursor {
        b: query,
        at: HEADER_LEN,
    };
    let asked_name = asked_r.name()?;
    let asked_type = asked_r.u16()?;
    if !qname.eq_ignore_ascii_case(&asked_name) || qtype != asked_type || qclass != CLASS_IN {
        return Err(format!(
            "the reply is about {qname} type {qtype}, not the question asked ({} bytes at {start})",
            asked.len()
        ));
    }
    if flags & FLAG_TC != 0 {
        return Ok(Reply::Truncated);
    }
    match flags & 0xf {
        0 => {}
        3 => return Ok(Reply::NoSuchName),
        code => return Ok(Reply::Failure(rcode_name(code))),
    }
    let mut addrs = Vec::new();
    let mut records = Vec::new();
    let mut ttl = u32::MAX;
    // The owner names a record may have: the name asked, and the CNAME
    // targets the chain in the answer leads to.
    let mut owners = vec![asked_name.to_ascii_lowercase()];
    for _ in 0..an {
        let owner = r.name()?.to_ascii_lowercase();
        let rtype = r.u16()?;
        let class = r.u16()?;
        let rttl = r.u32()?;
        let len = r.u16()? as usize;
        let data_at = r.at;
        let data = r.take(len)?;
        if class != CLASS_IN || !owners.contains(&owner) {
            continue;
        }
        let rttl = if rttl > TTL_MAX { 0 } else { rttl };
        match (rtype, len) {
            (TYPE_CNAME, _) => {
                let mut c = Cursor {
                    b: reply,
                    at: data_at,
                };
                owners.push(c.name()?.to_ascii_lowercase());
            }
            (TYPE_A, 4) if qtype == TYPE_A => {
                addrs.push(IpAddr::V4(Ipv4Addr::new(
                    data[0], data[1], data[2], data[3],
                )));
                ttl = ttl.min(rttl);
            }
            (TYPE_AAAA, 16) if qtype == TYPE_AAAA => {
                let mut b = [0u8; 16];
                b.copy_from_slice(data);
                addrs.push(IpAddr::V6(Ipv6Addr::from(b)));
                ttl = ttl.min(rttl);
            }
            (TYPE_A | TYPE_AAAA, _) if rtype == qtype => {
                return Err(format!("a record of type {rtype} has {len} bytes"))
            }
            (TYPE_SRV, _) if qtype == TYPE_SRV => {
                if let Some(record) = srv_record(reply, data_at, len)? {
                    if records.len() < SRV_RECORDS_MAX {
                        records.push(record);
                        ttl = ttl.min(rttl);
                    }
                }
            }
            _ => {}
        }
    }
    if qtype == TYPE_SRV {
        records.sort();
        records.dedup();
        return Ok(Reply::Services {
            ttl: if records.is_empty() { 0 } else { ttl },
            records,
        });
    }
    addrs.sort();
    addrs.dedup();
    Ok(Reply::Records {
        ttl: if addrs.is_empty() { 0 } else { ttl },
        addrs,
    })
}

/// The SRV record whose data is the `len` bytes at `at` of `reply`
/// (priority, weight, port, target): `None` for one that names no server
/// (the target `.`, RFC 2782's "not available here", or port 0); `Err`
/// for one whose target runs past its data.
fn srv_record(reply: &[u8], at: usize, len: usize) -> Result<Option<SrvRecord>, String> {
    if len < 7 {
        return Err(format!("an SRV record has {len} bytes"));
    }
    let mut c = Cursor { b: reply, at };
    let (priority, weight, port) = (c.u16()?, c.u16()?, c.u16()?);
    let target = c.name()?;
    if c.at != at + len {
        return Err("an SRV record's target does not end with its data".into());
    }
    if target == "." || port == 0 {
        return Ok(None);
    }
    Ok(Some(SrvRecord {
        priority,
        weight: weight.max(1),
        port,
        target: target.to_ascii_lowercase(),
    }))
}

/// The response codes a resolver answers a failure with (RFC 1035 4.1.1).
fn rcode_name(code: u16) -> String {
    match code {
        1 => "FORMERR".into(),
        2 => "SERVFAIL".into(),
        4 => "NOTIMP".into(),
        5 => "REFUSED".into(),
        c => format!("RCODE {c}"),
    }
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| format!("the reply ends early at byte {}", self.at))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u16(&mut self) -> Result<u16, String> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A domain name, compression pointers followed, as dotted text.
    fn name(&mut self) -> Result<String, String> {
        let mut out = String::new();
        let mut at = self.at;
        let mut jumped = false;
        for _ in 0..POINTERS_MAX {
            loop {
                let len = *self.b.get(at).ok_or("a name runs past the reply")? as usize;
                match len & 0xc0 {
                    0 if len == 0 => {
                        if !jumped {
                            self.at = at + 1;
                        }
                        return Ok(if out.is_empty() { ".".into() } else { out });
                    }
                    0 => {
                        let label = self
                            .b
                            .get(at + 1..at + 1 + len)
                            .ok_or("a label runs past the reply")?;
                        if !out.is_empty() {
                            out.push('.');
                        }
                        out.push_str(&String::from_utf8_lossy(label));
                        if out.len() > 255 {
                            return Err("a name is longer than 255 bytes".into());
                        }
                        at += 1 + len;
                    }
                    0xc0 => {
                        let low = *self.b.get(at + 1).ok_or("a pointer runs past the reply")?;
                        if !jumped {
                            self.at = at + 2;
                        }
                        jumped = true;
                        at = (len & 0x3f) << 8 | low as usize;
                        break;
                    }
                    _ => return Err(format!("label type {len:#x} is not taken")),
                }
            }
        }
        Err("a name has too many compression pointers".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reply to `q` with `rcode`, `flags` added, and these answers
    /// (owner as a pointer to the question, type, ttl, data).
    fn reply(q: &[u8], rcode: u16, answers: &[(u16, u32, Vec<u8>)]) -> Vec<u8> {
        let mut r = q.to_vec();
        let flags = FLAG_QR | FLAG_RD | 0x0080 | rcode;
        r[2..4].copy_from_slice(&flags.to_be_bytes());
        r[6..8].copy_from_slice(&(answers.len() as u16).to_be_bytes());
        for (t, ttl, data) in answers {
            r.extend_from_slice(&[0xc0, 12]);
            r.extend_from_slice(&t.to_be_bytes());
            r.extend_from_slice(&CLASS_IN.to_be_bytes());
            r.extend_from_slice(&ttl.to_be_bytes());
            r.extend_from_slice(&(data.len() as u16).to_be_bytes());
            r.extend_from_slice(data);
        }
        r
    }

    #[test]
    fn a_query_is_one_question_with_recursion_desired() {
        let q = query(0x1234, "App.Internal.", TYPE_A);
        assert_eq!(&q[..4], &[0x12, 0x34, 0x01, 0x00]);
        assert_eq!(&q[4..12], &[0, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&q[12..], b"\x03App\x08Internal\x00\x00\x01\x00\x01");
    }

    #[test]
    fn replies_give_addresses_and_the_smallest_ttl() {
        let q = query(7, "app.internal", TYPE_A);
        let r = reply(
            &q,
            0,
            &[
                (TYPE_A, 30, vec![10, 0, 0, 2]),
                (TYPE_A, 5, vec![10, 0, 0, 1]),
            ],
        );
        assert_eq!(
            read_reply(&q, &r),
            Ok(Reply::Records {
                addrs: vec!["10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap()],
                ttl: 5
            })
        );
        let q6 = query(8, "app.internal", TYPE_AAAA);
        let mut v6 = vec![0u8; 16];
        v6[15] = 1;
        let r = reply(&q6, 0, &[(TYPE_AAAA, 9, v6)]);
        assert_eq!(
            read_reply(&q6, &r),
            Ok(Reply::Records {
                addrs: vec!["::1".parse().unwrap()],
                ttl: 9
            })
        );
        assert_eq!(
            read_reply(&q, &reply(&q, 0, &[])),
            Ok(Reply::Records {
                addrs: vec![],
                ttl: 0
            })
        );
        assert_eq!(read_reply(&q, &reply(&q, 3, &[])), Ok(Reply::NoSuchName));
        assert_eq!(
            read_reply(&q, &reply(&q, 2, &[])),
            Ok(Reply::Failure("SERVFAIL".into()))
        );
        let mut tc = reply(&q, 0, &[]);
        tc[2] |= 0x02;
        assert_eq!(read_reply(&q, &tc), Ok(Reply::Truncated));
    }

    #[test]
    fn a_cname_chain_is_followed_and_other_owners_ignored() {
        let q = query(9, "a.internal", TYPE_A);
        let mut r = reply(&q, 0, &[]);
        // a.internal CNAME b.internal (written out), b.internal A 10.0.0.9,
        // and an A record of an unrelated name, which must not count.
        let answers: [(&[u8], u16, &[u8]); 3] = [
            (&[0xc0, 12], TYPE_CNAME, b"\x01b\x08internal\x00"),
            (b"\x01b\x08internal\x00", TYPE_A, &[10, 0, 0, 9]),
            (b"\x05other\x08internal\x00", TYPE_A, &[6, 6, 6, 6]),
        ];
        r[6..8].copy_from_slice(&3u16.to_be_bytes());
        for (owner, t, data) in answers {
            r.extend_from_slice(owner);
            r.extend_from_slice(&t.to_be_bytes());
            r.extend_from_slice(&CLASS_IN.to_be_bytes());
            r.extend_from_slice(&60u32.to_be_bytes());
            r.extend_from_slice(&(data.len() as u16).to_be_bytes());
            r.extend_from_slice(data);
        }
        assert_eq!(
            read_reply(&q, &r),
            Ok(Reply::Records {
                addrs: vec!["10.0.0.9".parse().unwrap()],
                ttl: 60
            })
        );
    }

    #[test]
    fn a_reply_to_another_query_or_a_malformed_one_is_not_believed() {
        let q = query(7, "app.internal", TYPE_A);
        let good = reply(&q, 0, &[(TYPE_A, 30, vec![10, 0, 0, 2])]);
        let mut other_id = good.clone();
        other_id[1] = 8;
        assert!(read_reply(&q, &other_id).unwrap_err().contains("id"));
        let other = query(7, "evil.internal", TYPE_A);
        assert!(read_reply(&q, &reply(&other, 0, &[])).is_err());
        assert!(read_reply(&q, &q).is_err(), "a query is no reply");
        for cut in 0..good.len() {
            assert!(read_reply(&q, &good[..cut]).is_err(), "cut at {cut}");
        }
        // A pointer loop ends.
        let mut looped = reply(&q, 0, &[(TYPE_A, 1, vec![1, 2, 3, 4])]);
        let at = looped.len() - 16;
        looped[at..at + 2].copy_from_slice(&[0xc0, at as u8]);
        assert!(read_reply(&q, &looped).is_err());
        // Bad record lengths and huge TTLs.
        let bad_len = reply(&q, 0, &[(TYPE_A, 1, vec![1, 2, 3])]);
        assert!(read_reply(&q, &bad_len).is_err());
        let huge = reply(&q, 0, &[(TYPE_A, u32::MAX, vec![1, 2, 3, 4])]);
        assert_eq!(
            read_reply(&q, &huge),
            Ok(Reply::Records {
                addrs: vec!["1.2.3.4".parse().unwrap()],
                ttl: 0
            })
        );
    }

    /// SRV data: priority, weight, port, then the target written out.
    fn srv(priority: u16, weight: u16, port: u16, target: &[u8]) -> Vec<u8> {
        let mut d = Vec::new();
        for x in [priority, weight, port] {
            d.extend_from_slice(&x.to_be_bytes());
        }
        d.extend_from_slice(target);
        d
    }

    #[test]
    fn srv_replies_give_their_records_by_priority() {
        let q = query(11, "_http._tcp.svc.internal", TYPE_SRV);
        assert_eq!(&q[q.len() - 4..], &[0, 33, 0, 1]);
        let r = reply(
            &q,
            0,
            &[
                (TYPE_SRV, 30, srv(10, 1, 8081, b"\x01b\x08internal\x00")),
                (TYPE_SRV, 20, srv(0, 3, 8080, b"\x01A\x08Internal\x00")),
                // Weight 0 is read as 1, as nginx reads it.
                (TYPE_SRV, 60, srv(0, 0, 8082, b"\x01c\x08internal\x00")),
                // "Not available here" and port 0 name no server.
                (TYPE_SRV, 1, srv(0, 5, 80, b"\x00")),
                (TYPE_SRV, 1, srv(0, 5, 0, b"\x01d\x08internal\x00")),
                // An A record in the answer of an SRV query is not a record.
                (TYPE_A, 1, vec![10, 0, 0, 1]),
            ],
        );
        let rec = |priority, weight, port, target: &str| SrvRecord {
            priority,
            weight,
            port,
            target: target.into(),
        };
        assert_eq!(
            read_reply(&q, &r),
            Ok(Reply::Services {
                records: vec![
                    rec(0, 1, 8082, "c.internal"),
                    rec(0, 3, 8080, "a.internal"),
                    rec(10, 1, 8081, "b.internal"),
                ],
                // The records that name no server do not count.
                ttl: 20
            })
        );
        // A target compressed against the question.
        let r = reply(&q, 0, &[(TYPE_SRV, 5, srv(1, 2, 443, &[0xc0, 23]))]);
        match read_reply(&q, &r) {
            Ok(Reply::Services { records, ttl: 5 }) => {
                assert_eq!(records, [rec(1, 2, 443, "svc.internal")])
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            read_reply(&q, &reply(&q, 0, &[])),
            Ok(Reply::Services {
                records: vec![],
                ttl: 0
            })
        );
        assert_eq!(read_reply(&q, &reply(&q, 3, &[])), Ok(Reply::NoSuchName));
    }

    #[test]
    fn malformed_srv_replies_are_errors_never_panics() {
        let q = query(12, "_http._tcp.svc.internal", TYPE_SRV);
        let good = reply(&q, 0, &[(TYPE_SRV, 5, srv(0, 1, 80, b"\x01a\x00"))]);
        assert!(read_reply(&q, &good).is_ok());
        for cut in 0..good.len() {
            assert!(read_reply(&q, &good[..cut]).is_err(), "cut at {cut}");
        }
        // Data too short for priority, weight, port and a name.
        let short = reply(&q, 0, &[(TYPE_SRV, 5, vec![0, 1, 0, 1, 0, 80])]);
        assert!(read_reply(&q, &short).unwrap_err().contains("6 bytes"));
        // A target that runs past its record's data, into the next one.
        let mut past = reply(&q, 0, &[(TYPE_SRV, 5, srv(0, 1, 80, b"\x01a\x00"))]);
        let len_at = past.len() - 10;
        past[len_at..len_at + 2].copy_from_slice(&8u16.to_be_bytes());
        past.push(0);
        assert!(read_reply(&q, &past).is_err());
        // A target pointing at itself, and two pointing at each other.
        let mut own = reply(&q, 0, &[(TYPE_SRV, 5, srv(0, 1, 80, &[0xc0, 0]))]);
        let at = own.len() - 2;
        own[at + 1] = at as u8;
        assert!(read_reply(&q, &own).unwrap_err().contains("compression"));
        let mut pair = reply(&q, 0, &[(TYPE_SRV, 5, srv(0, 1, 80, &[0xc0, 0]))]);
        let at = pair.len() - 2;
        // The target points at the question's name, whose first label
        // is made a pointer back to the target.
        pair[at + 1] = 12;
        pair[12] = 0xc0 | (at >> 8) as u8;
        pair[13] = at as u8;
        let q_pair = {
            let mut q = q.clone();
            q[12] = pair[12];
            q[13] = pair[13];
            q
        };
        assert!(read_reply(&q_pair, &pair).is_err());
        // A label type nobody uses, and a pointer past the end.
        let odd = reply(&q, 0, &[(TYPE_SRV, 5, srv(0, 1, 80, &[0x80, 1]))]);
        assert!(read_reply(&q, &odd).is_err());
        let far = reply(&q, 0, &[(TYPE_SRV, 5, srv(0, 1, 80, &[0xff, 0xff]))]);
        assert!(read_reply(&q, &far).is_err());
        // More records than are taken: the first SRV_RECORDS_MAX, no more.
        let many: Vec<(u16, u32, Vec<u8>)> = (0..SRV_RECORDS_MAX as u16 + 10)
            .map(|i| (TYPE_SRV, 5, srv(0, 1, 1000 + i, b"\x01a\x00")))
            .collect();
        match read_reply(&q, &reply(&q, 0, &many)) {
            Ok(Reply::Services { records, .. }) => assert_eq!(records.len(), SRV_RECORDS_MAX),
            other => panic!("{other:?}"),
        }
    }
}
