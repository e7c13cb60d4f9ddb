//! The table's and the workers' statistics ([`crate::store::stats`] has
//! the servers'): writes accepted and refused by reason, the last failure
//! to write the table back to the upstream file, and each worker's
//! requests. The words are in the state file's header (offsets in
//! layout.rs), atomics every process counts into without a lock.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use crate::Error;

/// Why a write was refused, as [`TableStats::refused`] counts it.
pub const REFUSALS: [&str; 8] = [
    "bad_request",
    "not_found",
    "busy",
    "owned",
    "version_mismatch",
    "precondition_failed",
    "no_space",
    "internal",
];

/// The index in [`REFUSALS`] of a write refused with `e`.
pub fn refusal_of(e: &Error) -> usize {
    match e {
        Error::BadRequest(_) => 0,
        Error::NotFound(_) => 1,
        Error::Busy(_) => 2,
        Error::Owned(_) => 3,
        Error::VersionMismatch { .. } => 4,
        Error::PreconditionFailed(_) => 5,
        Error::NoSpace(_) => 6,
        Error::Internal(_) => 7,
    }
}

/// Longest write-back error kept in the header; longer ones are cut.
pub const WRITE_BACK_ERROR_MAX: usize = 256;

/// The table's counters in the header (layout.rs has their offsets).
pub struct TableCounters<'a> {
    pub(super) accepted: &'a AtomicU64,
    pub(super) unchanged: &'a AtomicU64,
    pub(super) refused: [&'a AtomicU64; 8],
    pub(super) write_back_failures: &'a AtomicU64,
    pub(super) write_back_failed_ms: &'a AtomicU64,
    pub(super) write_back_ok_ms: &'a AtomicU64,
    /// Even while the message is whole, odd while one process writes it.
    pub(super) message_seq: &'a AtomicU64,
    /// Length, then the bytes, eight to a word, native order.
    pub(super) message: [&'a AtomicU64; 1 + WRITE_BACK_ERROR_MAX / 8],
}

impl TableCounters<'_> {
    /// A write ended: published a new table, left it as it was, or refused.
    pub fn count_write<T>(&self, out: &Result<(u64, T), Error>, before: u64) {
        match out {
            Ok((v, _)) if *v != before => self.accepted.fetch_add(1, Ordering::Relaxed),
            Ok(_) => self.unchanged.fetch_add(1, Ordering::Relaxed),
            Err(e) => self.refused[refusal_of(e)].fetch_add(1, Ordering::Relaxed),
        };
    }

    /// A write-back of the upstream file at `now_ms`: its error, if any.
    pub fn record_write_back(&self, error: Option<&str>, now_ms: u64) {
        let Some(error) = error else {
            self.write_back_ok_ms.store(now_ms, Ordering::Release);
            return;
        };
        self.write_back_failures.fetch_add(1, Ordering::Relaxed);
        // One writer of the message at a time; another failing at the same
        // instant leaves it to this one.
        let seq = self.message_seq.load(Ordering::Acquire);
        if seq % 2 == 1
            || self
                .message_seq
                .compare_exchange(seq, seq + 1, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            return;
        }
        let mut bytes = error.as_bytes();
        if bytes.len() > WRITE_BACK_ERROR_MAX {
            let mut cut = WRITE_BACK_ERROR_MAX;
            while !error.is_char_boundary(cut) {
                cut -= 1;
            }
            bytes = &bytes[..cut];
        }
        self.message[0].store(bytes.len() as u64, Ordering::Relaxed);
        for (word, chunk) in self.message[1..].iter().zip(bytes.chunks(8)) {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            word.store(u64::from_ne_bytes(w), Ordering::Relaxed);
        }
        self.write_back_failed_ms.store(now_ms, Ordering::Release);
        self.message_seq.store(seq + 2, Ordering::Release);
    }

    /// The last write-back error, unless a write-back succeeded since.
    fn last_error(&self) -> Option<(u64, String)> {
        let failed = self.write_back_failed_ms.load(Ordering::Acquire);
        if failed == 0 || self.write_back_ok_ms.load(Ordering::Acquire) >= failed {
            return None;
        }
        for _ in 0..8 {
            let seq = self.message_seq.load(Ordering::Acquire);
            if seq % 2 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let len = (self.message[0].load(Ordering::Relaxed) as usize).min(WRITE_BACK_ERROR_MAX);
            let mut bytes: Vec<u8> = self.message[1..]
                .iter()
                .flat_map(|w| w.load(Ordering::Relaxed).to_ne_bytes())
                .collect();
            bytes.truncate(len);
            if self.message_seq.load(Ordering::Acquire) == seq {
                return Some((failed, String::from_utf8_lossy(&bytes).into_owned()));
            }
        }
        None
    }
}

/// The table's statistics.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TableStats {
    /// The table's version.
    pub version: u64,
    /// Bytes the table takes in its slot, and the most a slot holds.
    pub bytes_used: u64,
    pub bytes_capacity: u64,
    /// Peer cells given to servers, and the cells of the file.
    pub cells_used: u64,
    pub cells_capacity: u64,
    /// Writes that published a new version.
    pub writes_accepted: u64,
    /// Writes that left the table as it was (nothing to change).
    pub writes_unchanged: u64,
    /// Writes refused, by reason ([`REFUSALS`] for the names).
    pub writes_refused: Vec<(&'static str, u64)>,
    /// Times writing the table back to the upstream file failed.
    pub write_back_failures: u64,
    /// The last failure, Unix ms, and why, unless a write-back succeeded
    /// since.
    pub write_back_error: Option<(u64, String)>,
}

impl TableCounters<'_> {
    /// The counters; the table's size and version left at zero, for the
    /// caller that knows them.
    pub(super) fn read(&self) -> TableStats {
        TableStats {
            version: 0,
            bytes_used: 0,
            bytes_capacity: 0,
            cells_used: 0,
            cells_capacity: 0,
            writes_accepted: self.accepted.load(Ordering::Relaxed),
            writes_unchanged: self.unchanged.load(Ordering::Relaxed),
            writes_refused: REFUSALS
                .iter()
                .zip(&self.refused)
                .map(|(name, w)| (*name, w.load(Ordering::Relaxed)))
                .collect(),
            write_back_failures: self.write_back_failures.load(Ordering::Relaxed),
            write_back_error: self.last_error(),
        }
    }
}

/// One live worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct WorkerStats {
    pub pid: u32,
    /// The table generation it routes by.
    pub generation: u64,
    /// Picks it made, retries included, since it registered.
    pub requests: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_back_error_is_kept_until_one_succeeds() {
        let words: Vec<AtomicU64> = (0..48).map(|_| AtomicU64::new(0)).collect();
        let t = TableCounters {
            accepted: &words[0],
            unchanged: &words[1],
            refused: std::array::from_fn(|i| &words[2 + i]),
            write_back_failures: &words[10],
            write_back_failed_ms: &words[11],
            write_back_ok_ms: &words[12],
            message_seq: &words[13],
            message: std::array::from_fn(|i| &words[14 + i]),
        };
        assert_eq!(t.last_error(), None);
        t.record_write_back(Some("disk full é"), 100);
        assert_eq!(t.last_error(), Some((100, "disk full é".into())));
        let long = "x".repeat(300);
        t.record_write_back(Some(&long), 150);
        assert_eq!(t.last_error().unwrap().1.len(), WRITE_BACK_ERROR_MAX);
        t.record_write_back(None, 200);
        assert_eq!(t.last_error(), None);
        t.count_write::<()>(&Err(Error::NoSpace("x".into())), 3);
        t.count_write(&Ok((4, ())), 3);
        t.count_write(&Ok((3, ())), 3);
        let read = t.read();
        assert_eq!((read.writes_accepted, read.writes_unchanged), (1, 1));
        assert_eq!(read.write_back_failures, 2);
        assert_eq!(read.writes_refused[6], ("no_space", 1));
    }
}
