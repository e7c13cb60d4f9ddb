//! The copy file: the last two tables published, beside the state file, so
//! that no damage to the state file takes the last acknowledged table with
//! it.
//!
//! Why a second file. When the state file is deleted, its inode lives on in
//! every mapping, and the worker that restores it reads the newest table
//! from its own mapping. But when the file is cut short, or its slots are
//! overwritten in place (same inode: every mapping shows the garbage), or
//! its header or active slot is wrecked, the last table acknowledged is left
//! only in the memory of the workers that applied it, and the worker that
//! notices first may not have applied it yet (workers catch up on a timer);
//! a writer that is not a worker, or a worker that has exited since, leaves
//! no copy in memory at all. So each writer also puts the table it published
//! here, and a restore takes the newest table of three: the one its own
//! mapping still shows, this file's, and the restoring worker's.
//!
//! Why it holds. A writer puts the table into the copy after publishing it
//! and before releasing the writer lock, so before the write is acknowledged;
//! a restore takes the same lock. So every acknowledged table is in this file
//! when a restore looks, unless this file was damaged too, or the copy could
//! not be written (the worker's timer logs that, once; writes go on). Only
//! published tables come here: a write that failed or was killed before
//! publishing never appears in a restored file. The copy is not synced to
//! disk: it guards against damage while the host runs; the state file's own
//! `msync` guards against power loss, and after a restart every worker has
//! read the state file's table. Nothing but a restore, and a write that
//! finds the active slot damaged, reads this file: a missing, foreign or
//! damaged copy never stops a start or a write.
//!
//! Whose table. Each slot names the state file it copies by device, inode
//! and birth time (inode numbers are reused; birth times, where the file
//! system keeps them, are not): a copy of another file, or of the file that
//! was at the path before this one was created, is never taken. A restored
//! file is a new inode, so the restore writes its table here under the new
//! file's name before moving it into place, and a new state file forgets the
//! copy of whatever was there before.
//!
//! ```text
//! file: two slots; slot i at i * (64 + the state file's slot payload
//! capacity); generation g goes to slot g & 1, so a writer killed while
//! writing one leaves the other, the table before, whole
//!
//! slot:
//! +0    8      magic "\x89DYCPY\r\n"
//! +8    4      copy format version, u32 LE (COPY_VERSION)
//! +12   4      extension length, u32 LE: the payload's last bytes (codec.rs)
//! +16   8      device of the state file copied, u64 LE
//! +24   8      inode of the state file copied, u64 LE
//! +32   8      birth time of the state file copied, ns since the epoch, u64
//!              LE (0: the file system keeps none)
//! +40   8      generation of the table, u64 LE
//! +48   8      payload length (base and extension), u64 LE
//! +56   4      CRC32 of bytes +0..+56 and of the payload
//! +60   4      reserved, zero
//! +64   len    payload, as a state file slot holds it: the base, then the
//!              extension (codec.rs)
//! ```

use std::fs::{File, Metadata, OpenOptions};
use std::io::{self, ErrorKind};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use parking_lot::Mutex;

use super::codec::{self, Payload};
use super::layout::Geometry;

const MAGIC: [u8; 8] = *b"\x89DYCPY\r\n";
const COPY_VERSION: u32 = 1;
const SLOT_HEADER: u64 = 64;
/// Bytes of the slot header the CRC covers before the payload.
const CHECKED: usize = 56;

/// Which state file a copy is of: an inode, told from a later inode of the
/// same number by its birth time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileId {
    dev: u64,
    ino: u64,
    born: u64,
}

impl FileId {
    pub fn of(meta: &Metadata) -> FileId {
        let born = meta
            .created()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos() as u64);
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
            born,
        }
    }
}

/// The copy file of one state file.
pub struct CopyFile {
    path: PathBuf,
    capacity: u64,
    /// Open for writing, with the device and inode it had when opened: a
    /// copy deleted or replaced since is opened again.
    open: Mutex<Option<(File, (u64, u64))>>,
    /// Why the last write of the copy failed, and whether that was reported.
    trouble: Mutex<(Option<String>, bool)>,
}

impl CopyFile {
    /// The copy of the state file at `state`, whose slots hold at most
    /// `geometry.payload_capacity()` bytes.
    pub fn new(state: &Path, geometry: Geometry) -> CopyFile {
        CopyFile {
            path: path_for(state),
            capacity: geometry.payload_capacity(),
            open: Mutex::new(None),
            trouble: Mutex::new((None, false)),
        }
    }

    /// The copy of the state file at `state` when that file's header no
    /// longer says how large its slots are: the copy's own length does (two
    /// slots of one stride). `None` when there is no copy of a usable length.
    pub fn sized_by_itself(state: &Path) -> Option<CopyFile> {
        let path = path_for(state);
        let stride = std::fs::metadata(&path).ok()?.len() / 2;
        let capacity = stride.checked_sub(SLOT_HEADER)?;
        Some(CopyFile {
            path,
            capacity,
            open: Mutex::new(None),
            trouble: Mutex::new((None, false)),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn stride(&self) -> u64 {
        SLOT_HEADER + self.capacity
    }

    /// Puts the table published at `generation` in state file `of` (its
    /// encoded `base` and `extension`, as the slot holds them) in its slot.
    /// Never fails the write it serves: a failure is kept for
    /// [`trouble`](Self::trouble).
    pub fn save(&self, of: FileId, generation: u64, base: &[u8], extension: &[u8]) {
        let saved = self.try_save(of, generation, base, extension);
        let mut t = self.trouble.lock();
        match saved {
            Ok(()) => *t = (None, false),
            Err(e) => {
                let why = format!(
                    "could not write the copy {} of the state file ({e}): until a write succeeds, damage to the state file may lose the last changes",
                    self.path.display()
                );
                if t.0.as_deref() != Some(why.as_str()) {
                    *t = (Some(why), false);
                }
            }
        }
    }

    fn try_save(
        &self,
        of: FileId,
        generation: u64,
        base: &[u8],
        extension: &[u8],
    ) -> io::Result<()> {
        let len = base.len() + extension.len();
        if len as u64 > self.capacity {
            return Err(io::Error::other("the table is larger than a slot"));
        }
        let mut open = self.open.lock();
        let current = match std::fs::metadata(&self.path) {
            Ok(m) => Some((m.dev(), m.ino())),
            Err(e) if e.kind() == ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        if open.as_ref().map(|(_, id)| *id) != current || current.is_none() {
            *open = None;
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                // The other slot keeps the table before: never truncated.
                .truncate(false)
                .mode(0o644)
                .open(&self.path)?;
            let m = file.metadata()?;
            if m.len() < 2 * self.stride() {
                // Its blocks now, so a full disk later cannot fail a write.
                super::os::allocate(&file, 2 * self.stride())?;
            }
            *open = Some((file, (m.dev(), m.ino())));
        }
        let (file, _) = open.as_ref().expect("opened above");
        let mut head = [0u8; SLOT_HEADER as usize];
        head[0..8].copy_from_slice(&MAGIC);
        head[8..12].copy_from_slice(&COPY_VERSION.to_le_bytes());
        // Fits: the capacity is a slot's, at most half of a 4 GiB file.
        head[12..16].copy_from_slice(&(extension.len() as u32).to_le_bytes());
        head[16..24].copy_from_slice(&of.dev.to_le_bytes());
        head[24..32].copy_from_slice(&of.ino.to_le_bytes());
        head[32..40].copy_from_slice(&of.born.to_le_bytes());
        head[40..48].copy_from_slice(&generation.to_le_bytes());
        head[48..56].copy_from_slice(&(len as u64).to_le_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&head[..CHECKED]);
        crc.update(base);
        crc.update(extension);
        head[56..60].copy_from_slice(&crc.finalize().to_le_bytes());
        let at = (generation & 1) * self.stride();
        file.write_all_at(base, at + SLOT_HEADER)?;
        file.write_all_at(extension, at + SLOT_HEADER + base.len() as u64)?;
        file.write_all_at(&head, at)
    }

    /// Why writing the copy fails, once per reason: for the error log.
    pub fn trouble(&self) -> Option<String> {
        let mut t = self.trouble.lock();
        if t.1 {
            return None;
        }
        t.1 = true;
        t.0.clone()
    }

    /// The newest table the copy holds of state file `of`, checked and
    /// decoded; `None` when it holds none (missing, foreign, damaged, or of
    /// another file).
    pub fn newest(&self, of: FileId) -> Option<Payload> {
        let file = File::open(&self.path).ok()?;
        (0..2)
            .filter_map(|i| self.slot(&file, i, of).ok())
            .max_by_key(|p| p.version)
    }

    /// What each of the two slots holds for state file `of`: its table, or
    /// why it holds none. `Err` when the copy cannot be opened.
    pub fn slots(&self, of: FileId) -> io::Result<[Result<Payload, String>; 2]> {
        let file = File::open(&self.path)?;
        Ok([self.slot(&file, 0, of), self.slot(&file, 1, of)])
    }

    fn slot(&self, file: &File, i: u64, of: FileId) -> Result<Payload, String> {
        let at = i * self.stride();
        let mut head = [0u8; SLOT_HEADER as usize];
        file.read_exact_at(&mut head, at)
            .map_err(|_| "empty (the copy ends before it)".to_owned())?;
        let u64_at = |o: usize| u64::from_le_bytes(head[o..o + 8].try_into().expect("8 bytes"));
        let u32_at = |o: usize| u32::from_le_bytes(head[o..o + 4].try_into().expect("4 bytes"));
        let named = FileId {
            dev: u64_at(16),
            ino: u64_at(24),
            born: u64_at(32),
        };
        let (generation, len, ext_len) = (u64_at(40), u64_at(48), u64::from(u32_at(12)));
        if head == [0u8; SLOT_HEADER as usize] {
            return Err("empty".into());
        }
        if head[0..8] != MAGIC {
            return Err("not a copy slot (bad magic)".into());
        }
        if u32_at(8) != COPY_VERSION {
            return Err(format!(
                "copy format version {}, this build reads version {COPY_VERSION}",
                u32_at(8)
            ));
        }
        if named != of {
            return Err(format!("generation {generation} of another state file"));
        }
        if len > self.capacity || ext_len > len {
            return Err(format!(
                "payload length {len} (extension {ext_len}) exceeds the slot"
            ));
        }
        let mut payload = vec![0u8; len as usize];
        file.read_exact_at(&mut payload, at + SLOT_HEADER)
            .map_err(|_| "cut short".to_owned())?;
        let mut crc = crc32fast::Hasher::new();
        crc.update(&head[..CHECKED]);
        crc.update(&payload);
        if crc.finalize() != u32_at(56) {
            return Err("checksum mismatch".into());
        }
        let (base, extension) = payload.split_at((len - ext_len) as usize);
        let p = codec::decode(base, extension, None)?;
        if p.version != generation {
            return Err(format!(
                "table version {} differs from the slot's {generation}",
                p.version
            ));
        }
        Ok(p)
    }
}

/// Where the copy of the state file at `state` is: `<state>.copy`.
pub fn path_for(state: &Path) -> PathBuf {
    let mut name = state.file_name().unwrap_or_default().to_os_string();
    name.push(".copy");
    state.with_file_name(name)
}

/// Removes the copy of the state file at `state`: a new state file is not
/// the one it copied.
pub fn forget(state: &Path) {
    let _ = std::fs::remove_file(path_for(state));
}
