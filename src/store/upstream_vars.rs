//! nginx's per-attempt upstream variables as the log phase reads them:
//! `$upstream_status` (`502, 200 : 404`) and `$upstream_response_time`
//! (`0.001, 0.020 : 0.000`), `,` between the attempts of one upstream and
//! `:` between the upstreams of internal redirects. Read in one pass,
//! nothing allocated, keeping the last entries the statistics count
//! ([`crate::store::stats`]).

use super::stats::ATTEMPTS_COUNTED;

/// The last [`ATTEMPTS_COUNTED`] entries of an nginx upstream list.
pub(super) struct Last<T> {
    ring: [T; ATTEMPTS_COUNTED],
    /// Entries in the list.
    pub(super) n: usize,
}

impl<T: Copy> Last<T> {
    fn push(&mut self, v: T) {
        self.ring[self.n % ATTEMPTS_COUNTED] = v;
        self.n += 1;
    }

    /// The `k`th entry from the end (0: the last), if it was kept.
    pub(super) fn back(&self, k: usize) -> Option<T> {
        (k < self.n.min(ATTEMPTS_COUNTED)).then(|| self.ring[(self.n - 1 - k) % ATTEMPTS_COUNTED])
    }
}

/// The entries of `a, b : c` (`,` between attempts, `:` between the
/// upstreams of internal redirects), each read by `value` from its bytes
/// without spaces (its first 16).
pub(super) fn last_entries<T: Copy + Default>(
    bytes: impl IntoIterator<Item = u8>,
    value: fn(&[u8]) -> T,
) -> Last<T> {
    let mut out = Last {
        ring: [T::default(); ATTEMPTS_COUNTED],
        n: 0,
    };
    let mut entry = [0u8; 16];
    let (mut len, mut any) = (0, false);
    for b in bytes {
        any = true;
        match b {
            b',' | b':' => {
                out.push(value(&entry[..len]));
                len = 0;
            }
            b' ' => {}
            // Past 16 bytes an entry is no status or time: what is kept
            // of it reads as none.
            _ if len < entry.len() => {
                entry[len] = b;
                len += 1;
            }
            _ => {}
        }
    }
    if any {
        out.push(value(&entry[..len]));
    }
    out
}

pub(super) fn parse_status(e: &[u8]) -> u16 {
    match e {
        [a @ b'1'..=b'5', b @ b'0'..=b'9', c @ b'0'..=b'9'] => {
            u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0')
        }
        _ => 0,
    }
}

/// `0.123` (seconds, as nginx writes times) → 123000 µs; `None` for `-`.
pub(super) fn parse_seconds_us(e: &[u8]) -> Option<u64> {
    let (int, frac) = match e.iter().position(|&b| b == b'.') {
        Some(at) => (&e[..at], &e[at + 1..]),
        None => (e, &[][..]),
    };
    if int.is_empty() || int.len() > 9 || frac.len() > 6 {
        return None;
    }
    let digits = |d: &[u8]| {
        d.iter().try_fold(0u64, |n, &b| {
            b.is_ascii_digit().then(|| n * 10 + u64::from(b - b'0'))
        })
    };
    let mut us = digits(frac)?;
    for _ in frac.len()..6 {
        us *= 10;
    }
    Some(digits(int)? * 1_000_000 + us)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nginx_lists_parse() {
        let e = last_entries(b"502, 200 : 404".iter().copied(), parse_status);
        assert_eq!(e.n, 3);
        assert_eq!(
            [0, 1, 2, 3].map(|k| e.back(k)),
            [Some(404), Some(200), Some(502), None]
        );
        assert_eq!(last_entries(b"".iter().copied(), parse_status).n, 0);
        let long: Vec<u8> = (0..20)
            .flat_map(|i| format!("{}, ", 500 + i).into_bytes())
            .collect();
        let e = last_entries(long[..long.len() - 2].iter().copied(), parse_status);
        assert_eq!(
            (e.n, e.back(0), e.back(7), e.back(8)),
            (20, Some(519), Some(512), None)
        );
        assert_eq!(parse_status(b"503"), 503);
        assert_eq!(parse_status(b"-"), 0);
        assert_eq!(parse_status(b"600"), 0);
        assert_eq!(parse_seconds_us(b"0.123"), Some(123_000));
        assert_eq!(parse_seconds_us(b"12.5"), Some(12_500_000));
        assert_eq!(parse_seconds_us(b"3"), Some(3_000_000));
        assert_eq!(parse_seconds_us(b"-"), None);
        assert_eq!(parse_seconds_us(b"1.2.3"), None);
    }
}
