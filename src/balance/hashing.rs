//! The hash functions of nginx's hashing methods, bit for bit: `hash`'s
//! memcached-style CRC-32 rounds and the ketama ring of `hash ...
//! consistent`. Pure functions; [`crate::balance::policy`] walks them.

/// Ketama points per unit of weight (`weight * 160` in nginx).
const POINTS_PER_WEIGHT: usize = 160;

/// One ketama point: the ring position and the server that owns it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Point {
    pub hash: u32,
    pub server: usize,
}

/// One round of nginx's `hash`: `(crc32([REHASH] KEY) >> 16) & 0x7fff`, the
/// rehash counter in decimal and omitted when 0.
pub(crate) fn memcached_hash(key: &[u8], rehash: u32) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    if rehash > 0 {
        let mut digits = [0u8; 10];
        crc.update(decimal(rehash, &mut digits));
    }
    crc.update(key);
    (crc.finalize() >> 16) & 0x7fff
}

/// `n` in decimal, written at the end of `buf`.
fn decimal(mut n: u32, buf: &mut [u8; 10]) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[at..];
        }
    }
}

/// nginx's split of a server's text for ketama
/// (`ngx_http_upstream_update_chash`): `unix:` sockets are the path and no
/// port; otherwise the port is what follows the last `:` if only digits do.
pub(crate) fn split_server(text: &[u8]) -> (&[u8], &[u8]) {
    if text.len() >= 5 && text[..5].eq_ignore_ascii_case(b"unix:") {
        return (&text[5..], &[]);
    }
    for (j, &c) in text.iter().rev().enumerate() {
        if c == b':' {
            let colon = text.len() - j - 1;
            return (&text[..colon], &text[colon + 1..]);
        }
        if !c.is_ascii_digit() {
            break;
        }
    }
    (text, &[])
}

/// The ketama ring of `hash ... consistent` for servers given as their text
/// (the `server` line's address, `127.0.0.1:8080`) and weight, as
/// `ngx_http_upstream_update_chash` (Cache::Memcached::Fast's
/// `crc32(HOST \0 PORT PREV_HASH)`): `weight * 160` points per server, each
/// the CRC-32 of host, a NUL, port and the previous point's hash in
/// little-endian bytes (0 for the first); sorted by hash, and of points with
/// equal hashes only the first kept.
pub fn ketama_points(servers: &[(&str, u32)]) -> Vec<Point> {
    let total: usize = servers.iter().map(|(_, w)| *w as usize).sum();
    let mut points = Vec::with_capacity(total * POINTS_PER_WEIGHT);
    for (server, (text, weight)) in servers.iter().enumerate() {
        let (host, port) = split_server(text.as_bytes());
        let mut base = crc32fast::Hasher::new();
        base.update(host);
        base.update(b"\0");
        base.update(port);
        let mut prev = 0u32;
        for _ in 0..*weight as usize * POINTS_PER_WEIGHT {
            let mut crc = base.clone();
            crc.update(&prev.to_le_bytes());
            let hash = crc.finalize();
            points.push(Point { hash, server });
            prev = hash;
        }
    }
    // nginx's qsort is not stable; the server breaks ties so the outcome
    // does not depend on the sort.
    points.sort_unstable_by_key(|p| (p.hash, p.server));
    points.dedup_by_key(|p| p.hash);
    points
}

/// `ngx_http_upstream_find_chash_point`: the index of the first point whose
/// hash is at least `hash`; `points.len()` past the last, which the lookup
/// wraps to 0.
pub(crate) fn find_point(points: &[Point], hash: u32) -> usize {
    points.partition_point(|p| p.hash < hash)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Bit by bit CRC-32 (IEEE, reflected), independent of crc32fast.
    pub(crate) fn crc32_ref(data: &[u8]) -> u32 {
        let mut crc = 0xFFFF_FFFFu32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    #[test]
    fn crc_is_ieee() {
        assert_eq!(crc32_ref(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32fast::hash(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn server_text_splits_as_nginx() {
        let split = |t: &str| {
            let (h, p) = split_server(t.as_bytes());
            (
                String::from_utf8(h.to_vec()).unwrap(),
                String::from_utf8(p.to_vec()).unwrap(),
            )
        };
        let pair = |h: &str, p: &str| (h.to_string(), p.to_string());
        assert_eq!(split("127.0.0.1:8088"), pair("127.0.0.1", "8088"));
        assert_eq!(split("[::1]:8088"), pair("[::1]", "8088"));
        assert_eq!(split("unix:/tmp/a.sock"), pair("/tmp/a.sock", ""));
        assert_eq!(split("UNIX:/tmp/b:80"), pair("/tmp/b:80", ""));
        assert_eq!(split("[::1]"), pair("[::1]", ""));
        assert_eq!(split("example.com"), pair("example.com", ""));
        assert_eq!(split("a:b"), pair("a:b", ""));
        assert_eq!(split("host:"), pair("host", ""));
    }

    #[test]
    fn ketama_dedupes_equal_hashes() {
        // The same server text twice gives the same chain: half the points
        // go, and the first server keeps them.
        let points = ketama_points(&[("10.0.0.1:80", 1), ("10.0.0.1:80", 1)]);
        assert_eq!(points.len(), 160);
        assert!(points.iter().all(|p| p.server == 0));
    }
}
