//! The shared mapping of the state file: the only code that reads and writes
//! memory other processes change at the same time.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicU32, AtomicU64};

use memmap2::{Advice, MmapOptions, MmapRaw};

use super::guard::Guard;
use crate::store::zone::{PeerCell, CELL_LEN};

/// A `MAP_SHARED` mapping of a whole state file. Raw, not `&[u8]`: other
/// processes write it while we hold it, which a Rust slice may not see.
pub struct SharedMap {
    // Declared first so it is dropped (unregistered) before the mapping goes.
    guard: Guard,
    raw: MmapRaw,
}

impl SharedMap {
    /// Maps `len` bytes of `file`. The caller has checked that the file is at
    /// least that long; state files never shrink, so the mapping stays valid.
    pub fn map(file: &File, len: u64) -> io::Result<SharedMap> {
        let len = usize::try_from(len).map_err(|_| io::Error::other("file too large to map"))?;
        let raw = MmapOptions::new().len(len).map_raw(file)?;
        Ok(SharedMap::guarded(raw))
    }

    /// Maps `len` bytes of `file` for reading only: for checking a file
    /// without the right (or the wish) to change it.
    pub fn map_read_only(file: &File, len: u64) -> io::Result<SharedMap> {
        let len = usize::try_from(len).map_err(|_| io::Error::other("file too large to map"))?;
        let raw = MmapOptions::new().len(len).map_raw_read_only(file)?;
        Ok(SharedMap::guarded(raw))
    }

    fn guarded(raw: MmapRaw) -> SharedMap {
        // Pages faulted in one by one, never as a huge page: a durable
        // write then dirties and writes back the pages it changed, not a
        // large folio around them (os::drop_cached says why). Advice: a
        // kernel without it only loses speed.
        let _ = raw.advise(Advice::Random);
        let _ = raw.advise(Advice::NoHugePage);
        let guard = Guard::new(raw.as_ptr() as usize, raw.len());
        SharedMap { guard, raw }
    }

    /// Whether a page of this mapping was lost (the file was cut short) and
    /// replaced by zeros: the mapping no longer shows the file.
    pub fn patched(&self) -> bool {
        self.guard.patched()
    }

    pub fn len(&self) -> usize {
        self.raw.len()
    }

    fn check(&self, off: usize, len: usize, align: usize) {
        assert!(
            off.is_multiple_of(align) && off.checked_add(len).is_some_and(|end| end <= self.len()),
            "mapping access out of bounds or misaligned: {off}+{len} of {}",
            self.len()
        );
    }

    /// The 64-bit word at `off`, shared with every process mapping the file.
    pub fn atomic_u64(&self, off: usize) -> &AtomicU64 {
        self.check(off, 8, 8);
        // SAFETY: `check` proved the 8 bytes are inside the mapping and 8-byte
        // aligned (the mapping starts on a page boundary). AtomicU64 has the
        // layout of u64, the mapping lives as long as `self` (so as the
        // returned reference), and every process accesses these words only
        // through atomics.
        unsafe { &*(self.raw.as_mut_ptr().add(off) as *const AtomicU64) }
    }

    /// The 32-bit word at `off`, shared with every process mapping the file.
    pub fn atomic_u32(&self, off: usize) -> &AtomicU32 {
        self.check(off, 4, 4);
        // SAFETY: as in `atomic_u64`, for 4 aligned bytes.
        unsafe { &*(self.raw.as_mut_ptr().add(off) as *const AtomicU32) }
    }

    /// The `n` peer cells at `off`, shared with every process mapping the
    /// file.
    pub fn cells(&self, off: usize, n: usize) -> &[PeerCell] {
        let len = n.checked_mul(CELL_LEN).expect("cell count overflows");
        self.check(off, len, 8);
        const { assert!(std::mem::size_of::<PeerCell>() == CELL_LEN) };
        const { assert!(std::mem::align_of::<PeerCell>() <= 8) };
        // SAFETY: `check` proved the `n * CELL_LEN` bytes are inside the
        // mapping and 8-byte aligned; PeerCell is `repr(C)` of four
        // AtomicU64 (size CELL_LEN, alignment 8, asserted above), for which
        // every bit pattern is valid. The mapping lives as long as `self`,
        // and every process touches the cells only through those atomics.
        unsafe { std::slice::from_raw_parts(self.raw.as_ptr().add(off) as *const PeerCell, n) }
    }

    /// Copies `dst.len()` bytes at `off` out of the mapping.
    ///
    /// The bytes may be changing under us: the caller must treat them as
    /// untrusted until it has re-read the commit word and checked the slot's
    /// checksum (see `StateFile::read_slot`).
    pub fn copy_out(&self, off: usize, dst: &mut [u8]) {
        self.check(off, dst.len(), 1);
        // SAFETY: the range is inside the mapping (`check`), `dst` is a
        // distinct private buffer, and `u8` has no invalid bit patterns, so
        // a copy that races a writer yields stale or mixed bytes but never an
        // invalid value; the seqlock check and the checksum discard those.
        unsafe {
            std::ptr::copy_nonoverlapping(self.raw.as_ptr().add(off), dst.as_mut_ptr(), dst.len())
        }
    }

    /// Copies `len` bytes at `off` out of the mapping into `dst`, in place of
    /// what it held, without zeroing them first (a slot is some 10 KiB,
    /// copied by every worker after every write). Untrusted, as with
    /// [`copy_out`](Self::copy_out).
    pub fn copy_out_into(&self, off: usize, len: usize, dst: &mut Vec<u8>) {
        self.check(off, len, 1);
        dst.clear();
        dst.reserve(len);
        // SAFETY: the range is inside the mapping (`check`); `dst` has room
        // for `len` bytes after `reserve`, a distinct private buffer. The
        // copy writes all `len` of them before `set_len` makes them part of
        // the vector, and `u8` has no invalid bit patterns, so bytes a
        // racing writer mixed are only stale (see `copy_out`).
        unsafe {
            std::ptr::copy_nonoverlapping(self.raw.as_ptr().add(off), dst.as_mut_ptr(), len);
            dst.set_len(len);
        }
    }

    /// Copies `src` into the mapping at `off`.
    ///
    /// Only a holder of the writer lock may call this, and only on bytes no
    /// reader trusts: the inactive slot, or a new file no one has opened.
    pub fn copy_in(&self, off: usize, src: &[u8]) {
        self.check(off, src.len(), 1);
        // SAFETY: the range is inside the mapping (`check`) and `src` is a
        // private buffer. Readers that copy these bytes concurrently discard
        // them: the slot is not active, so its commit word check or checksum
        // fails for them.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.raw.as_mut_ptr().add(off), src.len())
        }
    }

    /// Writes the range back to the file and waits for the disk.
    pub fn flush(&self, off: usize, len: usize) -> io::Result<()> {
        self.raw.flush_range(off, len)
    }

    /// Where the mapping starts (page-aligned): for an msync of its first
    /// bytes made by another thread of this process (an nginx thread pool),
    /// which must not outlive the mapping. msync only hands pages to the
    /// kernel and reads or writes no memory, so a late one is harmless.
    pub fn address(&self) -> usize {
        self.raw.as_ptr() as usize
    }
}
