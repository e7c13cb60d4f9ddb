//! Where everything is in the state file, and the checks a file must pass
//! before any of it is trusted.
//!
//! ```text
//! offset        size   field
//! ------------  -----  ---------------------------------------------------------
//! 0             8      magic "\x89DYUPS\r\n" (the \x89 and \r\n catch text-mode
//!                      copies, as PNG's magic does)
//! 8             4      format version, u32 LE (FORMAT_VERSION)
//! 12            4      header length, u32 LE (HEADER_LEN)
//! 16            8      slot length, u64 LE: bytes per payload slot, slot header
//!                      included
//! 24            8      file length, u64 LE: HEADER_LEN + 2 * slot length
//!                      + 288 * peer cells
//! 32            4      worker table entries, u32 LE
//! 36            4      peer cells, u32 LE
//! 40            4      CRC32 of bytes 0..40
//! 44            20     reserved, zero
//! 64            8      commit word, atomic u64: generation << 1 | active slot
//! 72            8      writers' queue: the next ticket << 32 | the pid of
//!                      the writer that took the one before, atomic u64
//! 80            4      writers' queue: the ticket served now, atomic u32
//!                      (a futex word: waiting writers sleep on it)
//! 84            4      reserved, zero
//! 88            8      writers' queue: who claimed the turn, ticket << 32 |
//!                      pid, atomic u64
//! 96            8      writers' queue: when the turn last moved or was
//!                      claimed, monotonic ms, atomic u64
//! 104           8      writers' queue: tickets given up, bit ticket % 64,
//!                      atomic u64
//! 112           8      the newest generation known to be on disk, atomic u64
//! 120           8      the resolver lease (dns/lease.rs): when its holder
//!                      last renewed it, Unix ms << 22 | its pid, atomic u64
//! 128           8      writes that published a table, atomic u64 (stats.rs)
//! 136           8      writes that left the table as it was, atomic u64
//! 144           64     writes refused, by reason (stats.rs REFUSALS), 8
//!                      atomic u64
//! 208           8      write-backs of the upstream file that failed, atomic
//!                      u64
//! 216           8      the last failed write-back, Unix ms, atomic u64
//! 224           8      the last write-back that succeeded, Unix ms, atomic
//!                      u64
//! 232           8      the write-back message's sequence word: odd while a
//!                      process writes it, atomic u64
//! 240           264    the last write-back error: length (u64), then up to
//!                      256 bytes of text, in atomic u64 words
//! 504           8      reserved, zero
//! 512           24*N   worker table: N entries of
//!                        +0  pid u32 (atomic, 0 = free)
//!                        +4  reserved u32
//!                        +8  generation the worker has applied, u64 (atomic)
//!                        +16 requests the worker balanced, u64 (atomic)
//! HEADER_LEN    S      slot 0
//! HEADER_LEN+S  S      slot 1
//! HEADER_LEN+2S 288*P  peer cells (zone.rs), atomics in native byte order:
//!                        +0  tag << 32 | connections in flight
//!                        +8  tag << 32 | failures in the fail window
//!                        +16 last failure, Unix ms
//!                        +24 start of the fail window, Unix ms
//!                        +32 tag << 32 | active-check verdict and counts
//!                        +40 probe lease: next probe, Unix ms << 22 | pid
//!                        +48 end of the last probe, Unix ms
//!                        +56 the last probe's result (health/mod.rs)
//!                        +64 when the server last became available again,
//!                            Unix ms (slow_start's ramp starts there)
//!                        +72 the server's counters, 27 u64 (stats.rs)
//!
//! slot:
//! +0            8      generation of the table in this slot, u64 LE
//! +8            8      payload length, u64 LE: the base (see codec.rs)
//! +16           4      CRC32 of bytes +0..+16 and of the base
//! +20           4      extension length, u32 LE (0: none)
//! +24           4      CRC32 of the generation (u64 LE) and the extension;
//!                      0 when there is none
//! +28           4      reserved, zero
//! +32           len    the payload's base
//! +32+len       ext    the payload's extension
//! ```
//!
//! Format version 2 had bytes +20..+32 reserved, and builds of it write them
//! zero and never read them: they read the base alone, and a slot they write
//! has no extension. That is why the extension needed no new version.
//!
//! Bytes 0..44 are written once, when the file is created, and never change.
//! The commit word is the only word a writer changes to publish a table: the
//! slot it names is never written while it is active. The queue words
//! (72..112) only order writers (see `queue.rs`); zeros, as in a new file,
//! are an empty queue and "nothing known to be on disk". The peer cells are
//! outside every checksum: workers count in them all the time, and a cell
//! only ever steers balancing, never what the table says.

use super::super::Error;
use crate::store::zone::CELL_LEN;

pub const MAGIC: [u8; 8] = *b"\x89DYUPS\r\n";
/// 2: the peer cells after the slots (version 1, without them, was never
/// released; its files are refused by this number rather than by a checksum).
/// 3: cells of 72 bytes: four words for active health checks and one for
/// `slow_start`; a version-2 file is refused by this number, as version 1
/// was.
/// 4: statistics (stats.rs): 27 counter words after each cell's 72 bytes,
/// the table's counters at 128 and a counter in each worker entry (24
/// bytes, from 512); a version-3 file is refused by this number.
pub const FORMAT_VERSION: u32 = 4;
pub const HEADER_LEN: u64 = 4096;
pub const COMMIT_WORD: usize = 64;
/// The writers' queue (`queue.rs`).
pub const QUEUE_TAIL: usize = 72;
pub const QUEUE_SERVING: usize = 80;
pub const QUEUE_HOLDER: usize = 88;
pub const QUEUE_SINCE: usize = 96;
pub const QUEUE_ABANDONED: usize = 104;
/// The newest generation whose slot and commit word are known to be on
/// disk: a writer overwrites the other slot only once the table it read is.
pub const FLUSHED: usize = 112;
/// Which worker re-resolves the `resolve` lines for every nginx on the
/// file (`crate::dns::lease`); zero, as in a new file: nobody.
pub const RESOLVER_LEASE: usize = 120;
/// The table's counters (stats.rs), each an atomic u64.
pub const TABLE_ACCEPTED: usize = 128;
pub const TABLE_UNCHANGED: usize = 136;
pub const TABLE_REFUSED: usize = 144;
pub const WRITE_BACK_FAILURES: usize = 208;
pub const WRITE_BACK_FAILED: usize = 216;
pub const WRITE_BACK_OK: usize = 224;
pub const WRITE_BACK_SEQ: usize = 232;
pub const WRITE_BACK_MESSAGE: usize = 240;
pub const WORKER_TABLE: usize = 512;
pub const WORKER_ENTRY: usize = 24;
pub const WORKER_ENTRIES: u32 = ((HEADER_LEN as usize - WORKER_TABLE) / WORKER_ENTRY) as u32;
pub const SLOT_HEADER: u64 = 32;
const FIXED_FIELDS: usize = 40;
/// The fixed header fields and their checksum.
pub const FIXED_LEN: usize = FIXED_FIELDS + 4;
/// One peer cell in every CELL_LEN + 64 bytes after the header: a cell for
/// about as many servers as a slot holds (as version 2's 32 in 96 and
/// version 3's 72 in 136: the slots keep 64 of every cell's share).
const BYTES_PER_CELL: u64 = CELL_LEN as u64 + 64;

/// The largest generation a commit word may name: the request path takes
/// it through Lua, whose numbers hold integers exactly up to 2^53. No writer
/// gets there (a write a microsecond for 285 years); a commit word beyond it
/// is damaged.
pub const MAX_GENERATION: u64 = (1 << 53) - 1;

/// Smallest and largest file a configuration may ask for.
pub const MIN_FILE_LEN: u64 = HEADER_LEN + 2 * 4096;
pub const MAX_FILE_LEN: u64 = 1 << 32;

/// The shape of one state file, from its header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub slot_len: u64,
    pub file_len: u64,
    pub workers: u32,
    /// Cells of shared peer state after the slots.
    pub cells: u32,
}

impl Geometry {
    /// The geometry of a new file of at most `file_len` bytes: two equal slots
    /// after the header, each a multiple of 8 bytes, then the peer cells.
    pub fn for_file_len(file_len: u64) -> Result<Geometry, String> {
        if !(MIN_FILE_LEN..=MAX_FILE_LEN).contains(&file_len) {
            return Err(format!(
                "size {file_len} is out of range: a state file is {MIN_FILE_LEN} to {MAX_FILE_LEN} bytes"
            ));
        }
        let room = file_len - HEADER_LEN;
        // Fits: MAX_FILE_LEN / 96 is below u32::MAX.
        let cells = (room / BYTES_PER_CELL) as u32;
        let slot_len = ((room - u64::from(cells) * CELL_LEN as u64) / 2) & !7;
        Ok(Geometry {
            slot_len,
            file_len: HEADER_LEN + 2 * slot_len + u64::from(cells) * CELL_LEN as u64,
            workers: WORKER_ENTRIES,
            cells,
        })
    }

    /// Offset of the first peer cell.
    pub fn cells_offset(&self) -> u64 {
        HEADER_LEN + 2 * self.slot_len
    }

    /// Offset of slot `i` (0 or 1) from the start of the file.
    pub fn slot_offset(&self, i: u64) -> u64 {
        HEADER_LEN + i * self.slot_len
    }

    /// The most payload bytes one slot holds.
    pub fn payload_capacity(&self) -> u64 {
        self.slot_len - SLOT_HEADER
    }

    /// The fixed header fields (bytes 0..44) of a file of this geometry.
    pub fn header_bytes(&self) -> [u8; FIXED_LEN] {
        let mut h = [0u8; FIXED_LEN];
        h[0..8].copy_from_slice(&MAGIC);
        h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        h[16..24].copy_from_slice(&self.slot_len.to_le_bytes());
        h[24..32].copy_from_slice(&self.file_len.to_le_bytes());
        h[32..36].copy_from_slice(&self.workers.to_le_bytes());
        h[36..40].copy_from_slice(&self.cells.to_le_bytes());
        let crc = crc32fast::hash(&h[..FIXED_FIELDS]);
        h[FIXED_FIELDS..FIXED_LEN].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// Parses and checks the fixed header fields of a file that is
    /// `actual_len` bytes long. `path` only goes into error messages.
    pub fn parse(h: &[u8], actual_len: u64, path: &str) -> Result<Geometry, Error> {
        let bad = |why: String| Error::Internal(format!("state file {path}: {why}"));
        // A short file of someone else's is foreign before it is truncated.
        if h.len() >= MAGIC.len() && h[..MAGIC.len()] != MAGIC {
            return Err(bad("not an ngx.dyups state file (bad magic)".into()));
        }
        if actual_len < HEADER_LEN || h.len() < FIXED_LEN {
            return Err(bad(format!(
                "truncated: {actual_len} bytes, a state file has at least {HEADER_LEN}"
            )));
        }
        let version = u32_at(h, 8);
        if version != FORMAT_VERSION {
            return Err(bad(format!(
                "format version {version}, this build reads version {FORMAT_VERSION}"
            )));
        }
        let crc = u32_at(h, FIXED_FIELDS);
        if crc != crc32fast::hash(&h[..FIXED_FIELDS]) {
            return Err(bad("header checksum mismatch (corrupted header)".into()));
        }
        let header_len = u32_at(h, 12) as u64;
        let g = Geometry {
            slot_len: u64_at(h, 16),
            file_len: u64_at(h, 24),
            workers: u32_at(h, 32),
            cells: u32_at(h, 36),
        };
        let cells_len = u64::from(g.cells) * CELL_LEN as u64;
        if header_len != HEADER_LEN
            || g.workers != WORKER_ENTRIES
            || g.slot_len < SLOT_HEADER
            || !g.slot_len.is_multiple_of(8)
            || HEADER_LEN
                .checked_add(g.slot_len.saturating_mul(2))
                .and_then(|n| n.checked_add(cells_len))
                != Some(g.file_len)
        {
            return Err(bad("inconsistent header geometry".into()));
        }
        if actual_len < g.file_len {
            return Err(bad(format!(
                "truncated: {actual_len} bytes, its header says {}",
                g.file_len
            )));
        }
        Ok(g)
    }
}

/// The header of one payload slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotHeader {
    pub generation: u64,
    /// The base's length.
    pub len: u64,
    pub crc: u32,
    pub ext_len: u32,
    pub ext_crc: u32,
}

impl SlotHeader {
    /// The header for a payload of `base` and `extension` stored at
    /// `generation`.
    pub fn for_payload(generation: u64, base: &[u8], extension: &[u8]) -> SlotHeader {
        let mut s = SlotHeader {
            generation,
            len: base.len() as u64,
            crc: 0,
            // Fits: a slot is at most half of a 4 GiB file.
            ext_len: extension.len() as u32,
            ext_crc: 0,
        };
        s.crc = s.checksum(base);
        s.ext_crc = s.ext_checksum(extension);
        s
    }

    pub fn to_bytes(self) -> [u8; SLOT_HEADER as usize] {
        let mut b = [0u8; SLOT_HEADER as usize];
        b[0..8].copy_from_slice(&self.generation.to_le_bytes());
        b[8..16].copy_from_slice(&self.len.to_le_bytes());
        b[16..20].copy_from_slice(&self.crc.to_le_bytes());
        b[20..24].copy_from_slice(&self.ext_len.to_le_bytes());
        b[24..28].copy_from_slice(&self.ext_crc.to_le_bytes());
        b
    }

    pub fn from_bytes(b: &[u8]) -> SlotHeader {
        SlotHeader {
            generation: u64_at(b, 0),
            len: u64_at(b, 8),
            crc: u32_at(b, 16),
            ext_len: u32_at(b, 20),
            ext_crc: u32_at(b, 24),
        }
    }

    /// The bytes of payload the slot claims: base and extension. Both come
    /// from the file as they are, so the sum saturates: a damaged length
    /// must read as too long for the slot, never wrap round to a short one.
    pub fn total_len(&self) -> u64 {
        self.len.saturating_add(u64::from(self.ext_len))
    }

    fn checksum(&self, base: &[u8]) -> u32 {
        let mut h = crc32fast::Hasher::new();
        h.update(&self.generation.to_le_bytes());
        h.update(&self.len.to_le_bytes());
        h.update(base);
        h.finalize()
    }

    /// 0 for no extension, as a build without it leaves the field.
    fn ext_checksum(&self, extension: &[u8]) -> u32 {
        if extension.is_empty() {
            return 0;
        }
        let mut h = crc32fast::Hasher::new();
        h.update(&self.generation.to_le_bytes());
        h.update(extension);
        h.finalize()
    }

    /// True when `payload` (base, then extension) is what this header
    /// describes.
    pub fn matches(&self, payload: &[u8]) -> bool {
        self.total_len() == payload.len() as u64 && {
            let (base, extension) = self.split(payload);
            self.crc == self.checksum(base) && self.ext_crc == self.ext_checksum(extension)
        }
    }

    /// `payload` as base and extension, by this header's lengths.
    pub fn split<'a>(&self, payload: &'a [u8]) -> (&'a [u8], &'a [u8]) {
        payload.split_at((self.len as usize).min(payload.len()))
    }
}

/// The commit word: which slot is active, and at which generation.
pub fn commit_word(generation: u64, slot: u64) -> u64 {
    generation << 1 | (slot & 1)
}

pub fn generation_of(word: u64) -> u64 {
    word >> 1
}

pub fn slot_of(word: u64) -> u64 {
    word & 1
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> (Geometry, [u8; FIXED_LEN]) {
        let g = Geometry::for_file_len(1 << 20).unwrap();
        (g, g.header_bytes())
    }

    #[test]
    fn geometry_round_trips_through_the_header() {
        let (g, h) = good();
        assert_eq!(
            g.file_len,
            g.cells_offset() + CELL_LEN as u64 * u64::from(g.cells)
        );
        assert!(g.file_len <= 1 << 20);
        // A cell for about as many servers as a slot holds (28 bytes each).
        assert!(u64::from(g.cells) * 28 > g.payload_capacity() * 3 / 4);
        assert_eq!(Geometry::parse(&h, g.file_len, "p").unwrap(), g);
    }

    #[test]
    fn each_corrupted_header_field_is_named() {
        let (g, h) = good();
        let cases: [(usize, &str); 5] = [
            (0, "bad magic"),
            (8, "format version"),
            (20, "header checksum"),
            (37, "header checksum"),
            (41, "header checksum"),
        ];
        for (at, why) in cases {
            let mut b = h;
            b[at] ^= 0x40;
            let err = Geometry::parse(&b, g.file_len, "/x/state")
                .unwrap_err()
                .to_string();
            assert!(err.contains("/x/state"), "{err}");
            assert!(err.contains(why), "byte {at}: {err}");
        }
    }

    #[test]
    fn truncation_is_named() {
        let (g, h) = good();
        let err = Geometry::parse(&h, g.file_len - 8, "p")
            .unwrap_err()
            .to_string();
        assert!(err.contains("truncated"), "{err}");
        let err = Geometry::parse(&h, 100, "p").unwrap_err().to_string();
        assert!(err.contains("truncated: 100 bytes"), "{err}");
        let err = Geometry::parse(b"upstream x {", 12, "p")
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad magic"), "{err}");
    }

    #[test]
    fn sizes_out_of_range_are_refused() {
        assert!(Geometry::for_file_len(1000).is_err());
        assert!(Geometry::for_file_len(MAX_FILE_LEN + 1).is_err());
    }

    #[test]
    fn slot_checksum_covers_generation_length_and_payload() {
        let s = SlotHeader::for_payload(9, b"table", b"");
        let back = SlotHeader::from_bytes(&s.to_bytes());
        assert_eq!(back, s);
        assert!(back.matches(b"table"));
        assert!(!back.matches(b"tablE"));
        assert!(!back.matches(b"table+"));
        assert!(!SlotHeader { generation: 8, ..s }.matches(b"table"));
        // What a build of format 2 writes: +20..+32 zero.
        assert_eq!(s.to_bytes()[20..], [0; 12]);
        assert!(!SlotHeader { ext_crc: 1, ..s }.matches(b"table"));
    }

    #[test]
    fn the_extension_has_its_own_length_and_checksum() {
        let s = SlotHeader::for_payload(9, b"table", b"ext");
        let back = SlotHeader::from_bytes(&s.to_bytes());
        assert_eq!(back, s);
        assert_eq!((back.len, back.ext_len, back.total_len()), (5, 3, 8));
        assert!(back.matches(b"tableext"));
        assert_eq!(back.split(b"tableext"), (&b"table"[..], &b"ext"[..]));
        assert!(!back.matches(b"tableexT"));
        assert!(!back.matches(b"table"));
        assert!(!SlotHeader { generation: 8, ..s }.matches(b"tableext"));
        // A base alone still checks under the format-2 rule, so a build
        // that reads only the base reads it.
        let base_only = SlotHeader {
            ext_len: 0,
            ext_crc: 0,
            ..s
        };
        assert!(base_only.matches(b"table"));
    }
}
