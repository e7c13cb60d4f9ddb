//! The state file: one upstream table shared by every process on the host.
//!
//! Readers take no lock: they load the commit word, copy the active slot,
//! and load the commit word again (a seqlock); a moved word means a writer
//! got in between and they copy again. Writers wait their turn in a queue in
//! the mapping (`queue.rs`: served in order, dead writers skipped), then
//! serialise on `flock`, which the kernel releases when a writer dies, build
//! the next table in the inactive slot and publish it with one release store
//! of the commit word. A writer killed before that store leaves the old
//! table active and intact; one killed after it has published a complete
//! table. A durable writer then msyncs the slot and the commit word, and the
//! next writer overwrites the other slot only once that is done (`FLUSHED`).
//! The writing process routes by the table it published without reading
//! its slot back ([`read_if_changed`](StateFile::read_if_changed)), and
//! every reader decodes only the upstreams that changed and checks only the
//! changes a write added to the log (`codec.rs`). The file is cached page
//! by page, so an msync writes back what the write changed (`os.rs`,
//! `drop_cached`). See `layout.rs` for the bytes and `codec.rs` for the
//! payload.
//!
//! Damage to the file while processes run it (deleted, cut short, overwritten
//! in place, its header or a slot wrecked) is noticed by the workers and
//! repaired by [`StateFile::restore`], which puts a new file at the path
//! holding the newest table there is: what the damaged file's own mapping
//! still shows, the copy each writer keeps in `<path>.copy`, or the
//! restoring worker's table. `copy_file.rs` says why no acknowledged write
//! is lost that way.
//!
//! Over 600 lines: one protocol (the seqlock read, the locked write, the
//! restore), which reads better whole; the bytes, the payload, the copy and
//! the mapping have files of their own.

mod codec;
mod copy_file;
mod examine;
mod guard;
mod layout;
mod mapping;
mod os;
mod queue;
mod repair;
pub mod stats;
mod table_stats;
#[cfg(test)]
mod tests;
mod upstream_vars;
pub mod zone;

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

pub use self::codec::{ChangeLog, Payload, CHANGE_LOG_MAX};
pub use self::copy_file::path_for as copy_path_for;
use self::copy_file::{CopyFile, FileId};
pub use self::examine::{
    examine_file, CellReport, CommitReport, CopyReport, CopySlotReport, Examination, HeaderReport,
    SlotReport, TableReport, WorkerReport,
};
pub use self::layout::{Geometry, HEADER_LEN, MAX_FILE_LEN, MIN_FILE_LEN};
use self::layout::{
    SlotHeader, COMMIT_WORD, FIXED_LEN, FLUSHED, MAX_GENERATION, RESOLVER_LEASE, SLOT_HEADER,
    TABLE_ACCEPTED, TABLE_REFUSED, TABLE_UNCHANGED, WORKER_ENTRY, WORKER_TABLE, WRITE_BACK_FAILED,
    WRITE_BACK_FAILURES, WRITE_BACK_MESSAGE, WRITE_BACK_OK, WRITE_BACK_SEQ,
};
use self::mapping::SharedMap;
pub use self::os::{effective_uid, pid_alive, user_ids};
use self::queue::{Poll, Queue, Ticket};
pub use self::repair::{repair, Repair, RepairOptions};
use self::table_stats::{TableCounters, TableStats, WorkerStats};
use self::zone::{PeerCell, Zone, CELL_LEN};
use crate::table::model::{Change, Table};
use crate::{Error, Result};

/// The size of a state file when the configuration gives none.
pub const DEFAULT_SIZE: u64 = 2 << 20;

/// A size as the configuration gives it: bytes, or a number with a unit
/// `k`, `m` or `g` (either case), as nginx writes sizes. `None` when it is
/// not one.
pub fn parse_size(text: &str) -> Option<u64> {
    let s = text.trim();
    let (digits, unit) = match s.char_indices().last()? {
        (i, 'k' | 'K') => (&s[..i], 1 << 10),
        (i, 'm' | 'M') => (&s[..i], 1 << 20),
        (i, 'g' | 'G') => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    digits.parse::<u64>().ok()?.checked_mul(unit)
}

/// How long a writer may wait for the lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Fail at once with [`Error::Busy`] when another writer holds it.
    Try,
    /// Wait up to this long, then fail with [`Error::Busy`].
    For(Duration),
    /// Never block: for a caller that must not (an nginx worker's event
    /// loop), which calls again after yielding. While the writer's turn has
    /// not come, a write fails with [`Error::Busy`] and
    /// [`turn_state`](StateFile::turn_state) says [`TurnState::Waiting`];
    /// once the limit (zero: trylock) passed, with [`Error::Busy`] and
    /// [`TurnState::Done`]. A write made in the turn defers its msync: the
    /// caller flushes [`TurnState::Held`]'s range (or leaves it to
    /// [`finish_turn`](StateFile::finish_turn)) before it answers.
    Turn(TurnId, Duration),
}

/// A writer's place in the queue, kept across calls (see [`Wait::Turn`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TurnId(u64);

impl TurnId {
    /// A new id, unique in this process.
    #[allow(clippy::new_without_default)]
    pub fn new() -> TurnId {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        TurnId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// Where a [`Wait::Turn`] writer stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TurnState {
    /// Not in the queue: never joined, refused, or finished.
    Done,
    /// Writers are ahead of it: call the write again after a moment.
    Waiting,
    /// It holds the turn and wrote. `flush`: the mapping's bytes to msync
    /// (address, length) before the write is on disk, when it is durable.
    Held { flush: Option<(usize, usize)> },
}

/// A [`Wait::Turn`] writer's place in the queue, between calls.
struct Turn {
    id: TurnId,
    ticket: Ticket,
    /// It has held the lock under this turn.
    wrote: bool,
    /// The generation to record as on disk, and the end of the bytes to
    /// msync first, once its writes are flushed.
    unflushed: Option<(u64, usize)>,
}

/// How one write is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteOptions {
    pub wait: Wait,
    /// Refuse with [`Error::VersionMismatch`] unless the table is at this
    /// version: a read-decide-write cycle that cannot lose another's change.
    pub expect: Option<u64>,
    /// Wait until the new table is on disk (msync) before returning, so an
    /// acknowledged change survives a power loss, not only a process crash.
    /// A table is published (readers route by it) before its msync; the
    /// writer that comes next overwrites the other slot only once the table
    /// it read is on disk, so a power loss leaves the last table flushed or
    /// a newer one. Without it, a change survives a crash of any process
    /// (the kernel has the pages), but a power loss may take the changes of
    /// the last seconds, or, cutting a write-back short, leave both slots
    /// unreadable.
    pub durable: bool,
}

/// How long a write waits for its turn unless told otherwise. Writers are
/// served in order, so a wait this long is a queue of slow writes, not a
/// stuck one (a stuck turn is skipped within [`queue::TURN_MAX_MS`]); and
/// a write refused after waiting loses its place, and retried goes to the
/// back. Enough for 8 writers ahead each holding the turn as long as the
/// queue lets one (8 × 500 ms), with room: 1 s refused writes of 8 busy
/// writers on a loaded host (130 ms a write). Tengine's dyups, without
/// `dyups_trylock`, waits for its lock without limit.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(5);

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions {
            wait: Wait::For(DEFAULT_WAIT),
            expect: None,
            durable: true,
        }
    }
}

/// A consistent copy of the table as some reader saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// The generation of the commit word when this was read. A reader that
    /// holds this snapshot is up to date while the commit word still says it.
    pub seen: u64,
    /// The table's own version. Equal to `seen`, unless the active slot was
    /// corrupt and the previous table was read instead.
    pub version: u64,
    pub table: Table,
    /// The most recent changes, oldest first (at most `CHANGE_LOG_MAX`).
    pub changes: ChangeLog,
    /// Why the active slot could not be used, when it could not.
    pub fallback: Option<String>,
    slot: u64,
}

/// A live process that registered as a worker, and the generation it has
/// applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Worker {
    pub pid: u32,
    pub applied: u64,
}

pub struct StateFile {
    path: PathBuf,
    file: File,
    map: SharedMap,
    geometry: Geometry,
    /// Device and inode of the file mapped, to notice it being replaced.
    identity: (u64, u64),
    /// The file mapped, as the copy names it.
    id: FileId,
    /// The last tables written, kept beside the file.
    copy: CopyFile,
    /// The payload this process read or wrote last, whose unchanged
    /// upstreams (and changes) the next read shares instead of decoding
    /// (and checking) them again.
    last: Mutex<Option<Payload>>,
    /// The table this process published last, until
    /// [`read_if_changed`](Self::read_if_changed) hands it over (see there).
    published: Mutex<Option<Snapshot>>,
    /// `flock` excludes other processes only: threads of this process share
    /// the one open file description, so they also take this.
    writers: Mutex<()>,
    /// The places of this process's [`Wait::Turn`] writers.
    turns: Mutex<Vec<Turn>>,
}

/// Files this process has open, by pid and canonical path: a process opens a
/// state file once, because `flock` locks belong to an open file description
/// (a second description of the same file would contend with the first). The
/// pid catches a child that inherited the list across fork: it opens anew.
static OPEN: Mutex<Vec<(u32, PathBuf, Arc<StateFile>)>> = Mutex::new(Vec::new());

impl StateFile {
    /// Opens the state file at `path`, creating it with room for `size` bytes
    /// and the table `seed()` gives when there is none. A file that exists is
    /// checked, never overwritten: a foreign, truncated or corrupted file is
    /// an error naming the path and the reason.
    pub fn open(
        path: &Path,
        size: u64,
        seed: impl FnOnce() -> Result<Table>,
    ) -> Result<Arc<StateFile>> {
        let path = canonical(path)?;
        let pid = std::process::id();
        let mut open = OPEN.lock();
        if let Some((_, _, f)) = open.iter().find(|(p, q, _)| *p == pid && *q == path) {
            return Ok(f.clone());
        }
        let file = Arc::new(Self::open_uncached(&path, size, seed)?);
        open.retain(|(p, _, _)| *p == pid);
        open.push((pid, path, file.clone()));
        Ok(file)
    }

    /// Reads and checks the file at `path` without mapping it for writing or
    /// keeping it open: what nginx's master does at start, before it forks.
    /// `Ok(None)` when there is no file yet.
    pub fn inspect(path: &Path) -> Result<Option<Snapshot>> {
        match File::open(path) {
            Ok(file) => Ok(Some(Self::from_file(path, file, false)?.read()?)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error("open", path, e)),
        }
    }

    /// Opens (creating it if need be) and checks the file without keeping
    /// it in this process's registry: for nginx's master, which must not hold
    /// the file open across fork.
    pub fn open_detached(
        path: &Path,
        size: u64,
        seed: impl FnOnce() -> Result<Table>,
    ) -> Result<()> {
        Self::open_uncached(path, size, seed).map(drop)
    }

    /// Makes one write (see [`write`](Self::write)) to the file at `path`
    /// without keeping it open or in this process's registry: for nginx's
    /// master, which applies an edited upstream file at a reload and must
    /// not hold the file open across fork.
    pub fn write_detached<R>(
        path: &Path,
        opts: &WriteOptions,
        change: impl FnOnce(&mut Table) -> Result<R>,
    ) -> Result<(u64, R)> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| io_error("open", path, e))?;
        Self::from_file(path, file, true)?.write(opts, change)
    }

    fn open_uncached(
        path: &Path,
        size: u64,
        seed: impl FnOnce() -> Result<Table>,
    ) -> Result<StateFile> {
        match OpenOptions::new().read(true).write(true).open(path) {
            Ok(file) => Self::from_file(path, file, true),
            Err(e) if e.kind() == ErrorKind::NotFound => {
                Self::create(path, size, seed)?;
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(path)
                    .map_err(|e| io_error("open", path, e))?;
                Self::from_file(path, file, true)
            }
            Err(e) => Err(io_error("open", path, e)),
        }
    }

    /// Writes a complete new file beside `path` and links it into place, so
    /// no process ever sees a half-made file, and of two processes creating
    /// it at once exactly one wins (`link` fails when the name exists).
    fn create(path: &Path, size: u64, seed: impl FnOnce() -> Result<Table>) -> Result<()> {
        let geometry = Geometry::for_file_len(size).map_err(|e| {
            Error::BadRequest(format!(
                "could not create state file {}: {e}",
                path.display()
            ))
        })?;
        let payload = Payload {
            version: 1,
            table: seed()?,
            changes: ChangeLog::default(),
        };
        let bytes = image(geometry, payload).map_err(|needs| {
            Error::NoSpace(format!(
                "could not create state file {}: the initial table needs {needs} bytes, a slot of a {size}-byte file holds {}",
                path.display(),
                geometry.payload_capacity()
            ))
        })?;
        place(path, &bytes, Place::Create)
    }

    /// Puts a new file at the path when the file there is gone or damaged
    /// ([`examine`](Self::examine)), holding the newest table of three: the
    /// one this file's mapping still shows (whole when the file was deleted,
    /// or only its header or one slot was hit), the copy's (written by every
    /// writer before its write is acknowledged), and `fallback` (a worker's
    /// last good table). Serialised on this file's lock, which writers hold
    /// until they have written the copy, so of the workers that notice, one
    /// restores, with every acknowledged write, and the others find it done.
    /// Returns the restored version and where its table came from, or
    /// `None` when nothing needed doing.
    pub fn restore(&self, fallback: &Snapshot) -> Result<Option<Restored>> {
        // `flock` alone, not a turn of the writers' queue: the header the
        // queue lives in may be what is damaged, and a queue of garbage words
        // would never serve the restore. `flock` excludes every writer all
        // the same; queued writers take it when their turn comes.
        let limit = Duration::from_secs(1);
        let _guard = self
            .exclude(Instant::now() + limit)
            .map_err(|e| e.unwrap_or_else(|| self.timed_out(limit)))?;
        match self.examine() {
            Health::Same => return Ok(None),
            // Another file is at the path (restored, or put there by hand):
            // the workers move to it and examine it there, with its copy.
            // Only a file that cannot be read at all is restored over.
            Health::Replaced if StateFile::inspect(&self.path).is_ok() => return Ok(None),
            _ => {}
        }
        let mut candidates = Vec::new();
        let mapped = self.read();
        if let (Ok(s), false) = (mapped, self.map.patched()) {
            candidates.push((
                s.version,
                s.table,
                "the table this process still maps".to_owned(),
            ));
        }
        if let Some(p) = self.copy.newest(self.id) {
            let from = format!("the copy {}", self.copy.path().display());
            candidates.push((p.version, p.table, from));
        }
        candidates.push((
            fallback.version,
            fallback.table.clone(),
            "this worker's table".to_owned(),
        ));
        let mut best = candidates.swap_remove(0);
        for c in candidates {
            if c.0 > best.0 {
                best = c;
            }
        }
        // A version above any this file published, so that a client's
        // expected version or ETag of the old file does not match.
        let mut version = best.0.max(fallback.version);
        if fallback.fallback.is_none() {
            version = version.max(fallback.seen);
        }
        if self.header_intact() && self.generation() <= MAX_GENERATION {
            version = version.max(self.generation());
        }
        let version = version + 1;
        let payload = Payload {
            version,
            table: best.1,
            changes: ChangeLog::default(),
        };
        let bytes = image(self.geometry, payload).map_err(|needs| {
            Error::NoSpace(format!(
                "could not restore state file {}: needs {needs} bytes",
                self.path.display()
            ))
        })?;
        let payload = image_payload(self.geometry, &bytes);
        place(
            &self.path,
            &bytes,
            Place::Replace {
                copy: &self.copy,
                generation: version,
                payload,
                owner: None,
            },
        )?;
        Ok(Some(Restored {
            version,
            from: best.2,
        }))
    }

    /// Opens the file now at this one's path, in place of this one in the
    /// process's registry: after it was restored or replaced.
    pub fn reopen(&self) -> Result<Arc<StateFile>> {
        let file = Arc::new(Self::open_uncached(
            &self.path,
            self.geometry.file_len,
            || {
                Err(Error::Internal(format!(
                    "state file {} vanished",
                    self.path.display()
                )))
            },
        )?);
        let pid = std::process::id();
        let mut open = OPEN.lock();
        open.retain(|(p, q, _)| *p == pid && *q != self.path);
        open.push((pid, self.path.clone(), file.clone()));
        Ok(file)
    }

    /// How the file at the path compares with the one this process maps.
    pub fn health(&self) -> Health {
        use std::os::unix::fs::MetadataExt;
        // Another file at the path first: once a worker has restored the
        // file, the others must take it, not restore over it.
        match std::fs::metadata(&self.path) {
            Err(e) if e.kind() == ErrorKind::NotFound => Health::Missing,
            Err(e) => Health::Damaged(format!("it cannot be examined: {e}")),
            Ok(m) if (m.dev(), m.ino()) != self.identity => Health::Replaced,
            Ok(_) if self.map.patched() => {
                Health::Damaged("it was cut short under the running process".into())
            }
            Ok(m) if m.len() < self.geometry.file_len => Health::Damaged(format!(
                "it is {} bytes long, {} were mapped",
                m.len(),
                self.geometry.file_len
            )),
            Ok(_) => Health::Same,
        }
    }

    /// [`health`](Self::health), and when the file at the path is the one
    /// mapped, what is inside: the fixed header as it was written when the
    /// file was made (nothing else reads it after the open, but the next
    /// start would refuse it), and a whole table in the active slot. A table
    /// read from the other slot counts as damage, though readers route by it
    /// meanwhile: it lacks the change the active slot held.
    pub fn examine(&self) -> Health {
        match self.health() {
            Health::Same => {}
            other => return other,
        }
        if !self.header_intact() {
            return Health::Damaged("its header is damaged".into());
        }
        match self.read() {
            Err(e) => Health::Damaged(format!("its table is unreadable ({e})")),
            Ok(s) => s.fallback.map_or(Health::Same, Health::Damaged),
        }
    }

    /// Whether the mapping still shows the fixed header fields this process
    /// checked when it opened the file (bytes 0..44 never change).
    fn header_intact(&self) -> bool {
        let mut head = [0u8; FIXED_LEN];
        self.map.copy_out(0, &mut head);
        head == self.geometry.header_bytes() && !self.map.patched()
    }

    /// Where the copy of this file's last tables is kept.
    pub fn copy_path(&self) -> &Path {
        self.copy.path()
    }

    /// Why the copy could not be written, once per reason: for the log.
    pub fn copy_trouble(&self) -> Option<String> {
        self.copy.trouble()
    }

    fn from_file(path: &Path, file: File, writable: bool) -> Result<StateFile> {
        let len = file
            .metadata()
            .map_err(|e| io_error("stat", path, e))?
            .len();
        let shown = path.display().to_string();
        // Cached page by page (os::drop_cached says why): what is cached
        // clean and unmapped is dropped, and read again one page at a time.
        os::read_at_random(&file);
        if writable {
            os::drop_cached(&file);
        }
        let mut head = vec![0u8; len.min(FIXED_LEN as u64) as usize];
        {
            use std::os::unix::fs::FileExt;
            file.read_exact_at(&mut head, 0)
                .map_err(|e| io_error("read", path, e))?;
        }
        let geometry = Geometry::parse(&head, len, &shown)?;
        let map = if writable {
            SharedMap::map(&file, geometry.file_len)
        } else {
            SharedMap::map_read_only(&file, geometry.file_len)
        }
        .map_err(|e| io_error("map", path, e))?;
        let (identity, id) = {
            use std::os::unix::fs::MetadataExt;
            let m = file.metadata().map_err(|e| io_error("stat", path, e))?;
            ((m.dev(), m.ino()), FileId::of(&m))
        };
        Ok(StateFile {
            path: path.to_path_buf(),
            file,
            map,
            geometry,
            identity,
            id,
            copy: CopyFile::new(path, geometry),
            last: Mutex::new(None),
            published: Mutex::new(None),
            writers: Mutex::new(()),
            turns: Mutex::new(Vec::new()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn commit(&self) -> &AtomicU64 {
        self.map.atomic_u64(COMMIT_WORD)
    }

    /// The generation now published: the hot path's one atomic load.
    pub fn generation(&self) -> u64 {
        layout::generation_of(self.commit().load(Ordering::Acquire))
    }

    /// The shared peer state of every process mapping this file.
    pub fn zone(&self) -> Zone<'_> {
        Zone::new(self.map.cells(
            self.geometry.cells_offset() as usize,
            self.geometry.cells as usize,
        ))
    }

    /// Zeroes every server's count of connections in flight: for nginx's
    /// master at a fresh start, when no worker that counted them is left
    /// (a worker killed in the middle of requests never gives its back).
    /// Does nothing while some registered worker still lives: on a reload,
    /// the old workers give back what they took.
    pub fn clear_connections(&self) -> bool {
        if !self.workers().is_empty() {
            return false;
        }
        for cell in self.zone().cells() {
            cell.clear_conns();
        }
        true
    }

    /// [`clear_connections`](Self::clear_connections) on the file at
    /// `path`, opened for this only: for nginx's master, which must not keep
    /// it open across fork.
    pub fn clear_connections_at(path: &Path) -> Result<bool> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| io_error("open", path, e))?;
        Ok(Self::from_file(path, file, true)?.clear_connections())
    }

    /// A consistent copy of the current table.
    pub fn read(&self) -> Result<Snapshot> {
        self.read_unless(None)
            .map(|s| s.expect("no generation to compare with"))
    }

    /// A consistent copy of the current table, or `None` when the commit word
    /// still says `seen` (one atomic load, nothing copied). When the table
    /// published is the one this process just wrote, that table, as it was
    /// encoded into the slot, rather than the slot decoded again: the
    /// generation names one table of this file only (a writer publishes
    /// the one after the generation it read, under the lock), and the write
    /// checked that the slot decodes to it. Damage to the slot since is
    /// found as before, by [`examine`](Self::examine), which reads it.
    pub fn read_if_changed(&self, seen: u64) -> Result<Option<Snapshot>> {
        let generation = self.generation();
        if generation != seen {
            // Taken whatever it holds: an older table is of no use again.
            let mine = self.published.lock().take();
            if let Some(s) = mine.filter(|s| s.seen == generation) {
                return Ok(Some(s));
            }
        }
        self.read_unless(Some(seen))
    }

    fn read_unless(&self, seen: Option<u64>) -> Result<Option<Snapshot>> {
        let mut buf = Vec::new();
        for round in 0u32.. {
            let word = self.commit().load(Ordering::Acquire);
            let generation = layout::generation_of(word);
            if seen == Some(generation) {
                return Ok(None);
            }
            let active = layout::slot_of(word);
            let first = self.copy_slot(active, &mut buf);
            if !self.unchanged(word) {
                backoff(round);
                continue;
            }
            let mut last = self.last.lock();
            let why = match first.and_then(|h| check_slot(h, &buf, Some(generation), last.as_ref()))
            {
                Ok(p) => {
                    *last = Some(p.clone());
                    return Ok(Some(snapshot(generation, p, None, active)));
                }
                Err(why) => why,
            };
            drop(last);
            if !self.header_intact() {
                // The commit word is in the header: it may name any slot and
                // generation now, so neither slot can be judged by it.
                return Err(self.corrupt(format!(
                    "its header is damaged, and slot {active}, which the commit word names, is unreadable ({why})"
                )));
            }
            // The active slot is damaged: the other one holds the table
            // before it, whole, unless a writer is filling it right now.
            let other = self.copy_slot(1 - active, &mut buf);
            if !self.unchanged(word) {
                backoff(round);
                continue;
            }
            let other = other.and_then(|h| check_slot(h, &buf, None, None));
            return fall_back(generation, active, why, other)
                .map(Some)
                .map_err(|why| self.corrupt(why));
        }
        unreachable!()
    }

    fn unchanged(&self, word: u64) -> bool {
        // Orders the slot copy before the second load of the commit word:
        // if the word did not move, no writer touched the slot meanwhile.
        fence(Ordering::Acquire);
        self.commit().load(Ordering::Relaxed) == word
    }

    /// Copies slot `i` (header, then as much payload as it claims, bounded
    /// by the slot) into `buf`. The bytes are untrusted until checked.
    fn copy_slot(&self, i: u64, buf: &mut Vec<u8>) -> Result<SlotHeader, String> {
        let off = self.geometry.slot_offset(i) as usize;
        let mut head = [0u8; SLOT_HEADER as usize];
        self.map.copy_out(off, &mut head);
        let header = SlotHeader::from_bytes(&head);
        if header.total_len() > self.geometry.payload_capacity() {
            return Err(format!(
                "payload length {} exceeds the slot",
                header.total_len()
            ));
        }
        self.map
            .copy_out_into(off + SLOT_HEADER as usize, header.total_len() as usize, buf);
        Ok(header)
    }

    fn corrupt(&self, why: String) -> Error {
        Error::Internal(format!("state file {}: {why}", self.path.display()))
    }

    /// Applies `change` to the current table and publishes the result, as one
    /// all-or-nothing step: if `change` fails, or the result does not fit,
    /// nothing is written. Returns the new version (the old one when `change`
    /// left the table as it was) and what `change` returned.
    pub fn write<R>(
        &self,
        opts: &WriteOptions,
        change: impl FnOnce(&mut Table) -> Result<R>,
    ) -> Result<(u64, R)> {
        let before = self.generation();
        let out = self.write_with(opts, change, || {});
        self.table_counters().count_write(&out, before);
        out
    }

    fn write_with<R>(
        &self,
        opts: &WriteOptions,
        change: impl FnOnce(&mut Table) -> Result<R>,
        before_publish: impl FnOnce(),
    ) -> Result<(u64, R)> {
        let _guard = self.lock(opts.wait)?;
        if let h @ (Health::Missing | Health::Replaced) = self.health() {
            // An acknowledged write must land in the file at the path.
            return Err(Error::Internal(format!(
                "state file {} was {} under this process; it moves to the file there within a moment: retry",
                self.path.display(),
                if h == Health::Missing { "deleted" } else { "replaced" }
            )));
        }
        let current = self.behind_damage(self.read()?)?;
        if let Some(expected) = opts.expect {
            if expected != current.version {
                return Err(Error::VersionMismatch {
                    expected,
                    actual: current.version,
                });
            }
        }
        let mut table = current.table.clone();
        let out = change(&mut table)?;
        // A `server NAME` line is stored with its addresses: resolving is
        // the writer's, before its turn (see `crate::table::names`).
        if let Some(u) = table.upstreams.iter().find(|u| u.has_pending()) {
            let n = u.names.iter().find(|n| n.is_pending()).expect("has one");
            return Err(Error::BadRequest(format!(
                "upstream {}: server {}: the host name was not resolved before the write \
                 (this writer resolves no names); nothing changed",
                u.name,
                n.target()
            )));
        }
        if same_content(&table, &current.table) {
            if opts.durable {
                // Nothing to write, but the answer vouches for the table read.
                self.make_durable(&opts.wait, current.seen, self.slot_end(current.slot))?;
            }
            return Ok((current.version, out));
        }
        // The slot about to be overwritten holds the table before the one
        // read, the one a reader falls back on: the table read must be on
        // disk first, or a power loss in the middle of this write could
        // leave neither slot whole. (Its writer flushes it before it
        // answers, so this only runs after one died or skipped that.)
        if opts.durable && self.flushed().load(Ordering::Acquire) < current.seen {
            self.flush_to(current.seen, self.slot_end(current.slot))?;
        }
        // Above both slots' generations, also when the active one was bad.
        let next = current.seen + 1;
        // Stamp the upstreams this change made or changed (a shared one is
        // untouched), so readers decode only those again, and give their
        // new servers cells of shared peer state.
        let changed: Vec<bool> = table
            .paired(&current.table)
            .iter()
            .map(|(u, o)| !o.is_some_and(|o| std::ptr::eq(*u, o) || o.same_content(u)))
            .collect();
        for (u, &changed) in table.upstreams.iter_mut().zip(&changed) {
            if changed {
                Arc::make_mut(u).rev = next;
            }
        }
        let given = zone::assign(
            &mut table,
            &current.table,
            &changed,
            self.geometry.cells,
            cell_tag(next),
        );
        let checking = zone::starts_checking(&table, &given);
        let back = zone::coming_back(&table, &current.table, &changed);
        normalize(&mut table, &changed);
        let changes = current.changes.appended(
            &Change::between(&current.table, &table, next),
            CHANGE_LOG_MAX,
        );
        let written = Payload {
            version: next,
            table,
            changes,
        };
        let payload = codec::encode(&written);
        if payload.slot_bytes() as u64 > self.geometry.payload_capacity() {
            return Err(Error::NoSpace(format!(
                "the new table needs {} bytes, a slot of state file {} holds {}: raise `size` (nothing was changed)",
                payload.slot_bytes(),
                self.path.display(),
                self.geometry.payload_capacity()
            )));
        }
        // No published table names these cells yet: workers see them fresh.
        let zone = self.zone();
        for (r, checking) in given.into_iter().zip(checking) {
            if let Some(cell) = zone.cells().get(r.index as usize) {
                cell.reset_checked(r.tag, checking);
            }
        }
        // Their slow_start ramps from this write: marked before any worker
        // can route to them by the new table.
        let now = unix_ms();
        for r in back {
            if let Some(cell) = zone.cell(r) {
                cell.mark_available(now);
            }
        }
        // Write into the slot that does not hold the table just read: the
        // inactive one, or the damaged active one after a fallback.
        let target = 1 - current.slot;
        let off = self.geometry.slot_offset(target) as usize;
        let start = off + SLOT_HEADER as usize;
        self.map.copy_in(start, &payload.base);
        self.map
            .copy_in(start + payload.base.len(), &payload.extension);
        let header = SlotHeader::for_payload(next, &payload.base, &payload.extension);
        self.map.copy_in(off, &header.to_bytes());
        #[cfg(debug_assertions)]
        same_as_decoded(&written, &payload);
        before_publish();
        self.commit()
            .store(layout::commit_word(next, target), Ordering::Release);
        *self.last.lock() = Some(written.clone());
        *self.published.lock() = Some(snapshot(next, written, None, target));
        self.copy
            .save(self.id, next, &payload.base, &payload.extension);
        if opts.durable {
            // One msync for the slot and the commit word together: on a
            // power loss before it ends, the commit word on disk names the
            // old table, or the new one with its slot whole, or the new one
            // with its slot torn, and then readers fall back on the other
            // slot, the table before, which is on disk (see above).
            self.make_durable(
                &opts.wait,
                next,
                off + SLOT_HEADER as usize + payload.slot_bytes(),
            )?;
        }
        Ok((next, out))
    }

    /// The table a write builds on, given what the read found: when it fell
    /// back past a damaged active slot, the copy's table of the generation
    /// the commit word names, which holds the change that slot held. Without
    /// one the write is refused: built on the older table, it would drop
    /// that acknowledged change for good, while a worker restoring the file
    /// may still hold it.
    fn behind_damage(&self, current: Snapshot) -> Result<Snapshot> {
        let Some(why) = &current.fallback else {
            return Ok(current);
        };
        match self.copy.newest(self.id) {
            Some(p) if p.version == current.seen => {
                Ok(snapshot(current.seen, p, None, current.slot))
            }
            _ => Err(Error::Internal(format!(
                "state file {}: {why}; its copy {} does not hold version {} either, so nothing was changed: writes go on once the file is restored (nginx's workers restore it within a second)",
                self.path.display(),
                self.copy.path().display(),
                current.seen
            ))),
        }
    }

    /// The end of slot `i`, as an offset in the file.
    fn slot_end(&self, i: u64) -> usize {
        (self.geometry.slot_offset(i) + self.geometry.slot_len) as usize
    }

    fn flushed(&self) -> &AtomicU64 {
        self.map.atomic_u64(FLUSHED)
    }

    /// The resolver lease: which worker re-resolves the `resolve` lines
    /// of every upstream, for the whole nginx (`crate::dns::lease`).
    pub fn resolver_lease(&self) -> &AtomicU64 {
        self.map.atomic_u64(RESOLVER_LEASE)
    }

    /// Makes the table at `generation`, whose slot ends at `end`, durable
    /// before the write answers: now, or, for a [`Wait::Turn`] writer, when
    /// its turn is finished.
    fn make_durable(&self, wait: &Wait, generation: u64, end: usize) -> Result<()> {
        if self.flushed().load(Ordering::Acquire) >= generation {
            return Ok(());
        }
        if let Wait::Turn(id, _) = wait {
            let mut turns = self.turns.lock();
            if let Some(t) = turns.iter_mut().find(|t| t.id == *id) {
                let (g, e) = t.unflushed.unwrap_or((0, 0));
                t.unflushed = Some((g.max(generation), e.max(end)));
                return Ok(());
            }
        }
        self.flush_to(generation, end)
    }

    /// Writes the file's first `end` bytes (the header with the commit word,
    /// and the slots up to there) to disk and records `generation` as on
    /// disk.
    fn flush_to(&self, generation: u64, end: usize) -> Result<()> {
        self.map
            .flush(0, end)
            .map_err(|e| io_error("sync", &self.path, e))?;
        self.flushed().fetch_max(generation, Ordering::AcqRel);
        Ok(())
    }

    /// Runs `f` on the current table while holding the writer lock, so no
    /// write happens meanwhile.
    pub fn while_locked<R>(&self, wait: Wait, f: impl FnOnce(&Snapshot) -> R) -> Result<R> {
        let _guard = self.lock(wait)?;
        Ok(f(&self.read()?))
    }

    fn busy(&self, how: &str) -> Error {
        Error::Busy(format!(
            "could not lock state file {}: {how}",
            self.path.display()
        ))
    }

    fn timed_out(&self, limit: Duration) -> Error {
        if limit.is_zero() {
            self.busy("another writer holds it")
        } else {
            self.busy(&format!(
                "another writer held it for more than {} ms",
                limit.as_millis()
            ))
        }
    }

    /// Waits for this writer's turn in the queue (`queue.rs`), then takes
    /// the lock that excludes the others: `flock` for other processes, and
    /// `writers` for other threads of this one.
    fn lock(&self, wait: Wait) -> Result<WriterLock<'_>> {
        let limit = match wait {
            Wait::Try => Duration::ZERO,
            Wait::For(d) => d,
            Wait::Turn(id, limit) => return self.lock_in_turn(id, limit),
        };
        let queue = Queue::new(&self.map);
        let mut ticket = queue.join(limit).ok_or_else(|| self.timed_out(limit))?;
        loop {
            match queue.poll(&mut ticket) {
                Poll::Turn => break,
                Poll::Wait => queue.wait(&ticket),
                Poll::TimedOut => return Err(self.timed_out(limit)),
            }
        }
        match self.exclude(ticket.deadline) {
            Ok(mut lock) => {
                lock.ticket = Some(ticket);
                Ok(lock)
            }
            Err(e) => {
                queue.leave(ticket);
                Err(e.unwrap_or_else(|| self.timed_out(limit)))
            }
        }
    }

    /// [`lock`](Self::lock) for a [`Wait::Turn`] writer: looks once, never
    /// waits; the turn stays in `turns` (not in the lock) until
    /// [`finish_turn`](Self::finish_turn).
    fn lock_in_turn(&self, id: TurnId, limit: Duration) -> Result<WriterLock<'_>> {
        let queue = Queue::new(&self.map);
        let mut turns = self.turns.lock();
        let i = match turns.iter().position(|t| t.id == id) {
            Some(i) => i,
            None => {
                let ticket = queue.join(limit).ok_or_else(|| self.timed_out(limit))?;
                turns.push(Turn {
                    id,
                    ticket,
                    wrote: false,
                    unflushed: None,
                });
                turns.len() - 1
            }
        };
        match queue.poll(&mut turns[i].ticket) {
            Poll::Turn => {}
            Poll::Wait => return Err(self.busy("waiting for the writers ahead")),
            Poll::TimedOut => {
                turns.swap_remove(i);
                return Err(self.timed_out(limit));
            }
        }
        // The turn is ours; `flock` is free unless a writer that lost its
        // turn (or an old build) still writes. Waiting for it is for a later
        // call, unless the deadline has come, or this turn already wrote
        // (a second lock in the same call, which will not come again).
        let deadline = turns[i].ticket.deadline;
        let wrote = turns[i].wrote;
        drop(turns);
        let lock = self.exclude(if wrote { deadline } else { Instant::now() });
        let mut turns = self.turns.lock();
        let Some(i) = turns.iter().position(|t| t.id == id) else {
            return Err(self.busy("the turn was given up meanwhile"));
        };
        match lock {
            Ok(lock) => {
                turns[i].wrote = true;
                Ok(lock)
            }
            Err(Some(e)) => Err(e),
            Err(None) if !wrote && Instant::now() < deadline => {
                Err(self.busy("waiting for the writer before"))
            }
            // Its write stays for finish_turn, which tells how it went.
            Err(None) if wrote => Err(self.timed_out(limit)),
            Err(None) => {
                let t = turns.swap_remove(i);
                drop(turns);
                self.finish(t, false)?;
                Err(self.timed_out(limit))
            }
        }
    }

    /// Takes `writers` and `flock`, trying until `deadline`. `Err(None)`:
    /// still held by another when it came.
    fn exclude(&self, deadline: Instant) -> Result<WriterLock<'_>, Option<Error>> {
        let inner = self.writers.try_lock_until(deadline).ok_or(None)?;
        loop {
            match self.file.try_lock() {
                Ok(()) => {
                    return Ok(WriterLock {
                        file: &self.file,
                        inner: Some(inner),
                        queue: Queue::new(&self.map),
                        ticket: None,
                    })
                }
                Err(std::fs::TryLockError::WouldBlock) => {}
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(Some(io_error("lock", &self.path, e)))
                }
            }
            if Instant::now() >= deadline {
                return Err(None);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Where the [`Wait::Turn`] writer `id` stands.
    pub fn turn_state(&self, id: TurnId) -> TurnState {
        match self.turns.lock().iter().find(|t| t.id == id) {
            None => TurnState::Done,
            Some(t) if !t.wrote => TurnState::Waiting,
            Some(t) => TurnState::Held {
                flush: t
                    .unflushed
                    .filter(|&(g, _)| self.flushed().load(Ordering::Acquire) < g)
                    .map(|(_, end)| (self.map.address(), end)),
            },
        }
    }

    /// Ends the [`Wait::Turn`] writer `id`: records its writes as on disk
    /// when `flushed` (the caller msynced [`TurnState::Held`]'s range),
    /// else msyncs them now; then passes the turn on, or gives up its place.
    /// An `Err` says a write it made is published but not known to be on
    /// disk.
    pub fn finish_turn(&self, id: TurnId, flushed: bool) -> Result<()> {
        let turn = {
            let mut turns = self.turns.lock();
            match turns.iter().position(|t| t.id == id) {
                Some(i) => turns.swap_remove(i),
                None => return Ok(()),
            }
        };
        self.finish(turn, flushed)
    }

    fn finish(&self, turn: Turn, flushed: bool) -> Result<()> {
        let on_disk = |g| self.flushed().load(Ordering::Acquire) >= g;
        let synced = match turn.unflushed {
            Some((generation, _)) if flushed || on_disk(generation) => {
                self.flushed().fetch_max(generation, Ordering::AcqRel);
                Ok(())
            }
            Some((generation, end)) => self.flush_to(generation, end),
            None => Ok(()),
        };
        Queue::new(&self.map).leave(turn.ticket);
        synced
    }

    fn worker_entry(&self, i: usize) -> (&AtomicU32, &AtomicU64) {
        let at = WORKER_TABLE + i * WORKER_ENTRY;
        (self.map.atomic_u32(at), self.map.atomic_u64(at + 8))
    }

    /// The requests balanced by the worker in entry `i`.
    fn worker_requests(&self, i: usize) -> &AtomicU64 {
        self.map.atomic_u64(WORKER_TABLE + i * WORKER_ENTRY + 16)
    }

    /// One more request balanced by the worker in entry `i`, which only
    /// that worker counts: a load and a store, no locked instruction.
    pub fn count_balanced(&self, i: usize) {
        let w = self.worker_requests(i);
        w.store(w.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }

    /// The table's counters in the header.
    pub fn table_counters(&self) -> TableCounters<'_> {
        let word = |at: usize| self.map.atomic_u64(at);
        TableCounters {
            accepted: word(TABLE_ACCEPTED),
            unchanged: word(TABLE_UNCHANGED),
            refused: std::array::from_fn(|i| word(TABLE_REFUSED + 8 * i)),
            write_back_failures: word(WRITE_BACK_FAILURES),
            write_back_failed_ms: word(WRITE_BACK_FAILED),
            write_back_ok_ms: word(WRITE_BACK_OK),
            message_seq: word(WRITE_BACK_SEQ),
            message: std::array::from_fn(|i| word(WRITE_BACK_MESSAGE + 8 * i)),
        }
    }

    /// The statistics of the table `snap` (this file's, as a reader saw
    /// it).
    pub fn table_stats(&self, snap: &Snapshot) -> TableStats {
        let g = self.geometry;
        let used: std::collections::HashSet<u32> = snap
            .table
            .upstreams
            .iter()
            .flat_map(|u| &u.peers)
            .filter(|p| !p.is_none() && p.index < g.cells)
            .map(|p| p.index)
            .collect();
        // The slot `snap` was read from says how much of it the table takes.
        let mut h = [0u8; SLOT_HEADER as usize];
        self.map.copy_out(g.slot_offset(snap.slot) as usize, &mut h);
        let header = SlotHeader::from_bytes(&h);
        let bytes_used = if header.generation == snap.seen {
            header.total_len().min(g.payload_capacity())
        } else {
            0
        };
        TableStats {
            version: snap.version,
            bytes_used,
            bytes_capacity: g.payload_capacity(),
            cells_used: used.len() as u64,
            cells_capacity: u64::from(g.cells),
            ..self.table_counters().read()
        }
    }

    /// The registered workers that are still alive, with their counters.
    pub fn worker_stats(&self) -> Vec<WorkerStats> {
        (0..self.geometry.workers as usize)
            .filter_map(|i| {
                let (slot, applied) = self.worker_entry(i);
                let pid = slot.load(Ordering::Acquire);
                (pid != 0 && pid_alive(pid)).then(|| WorkerStats {
                    pid,
                    generation: applied.load(Ordering::Acquire),
                    requests: self.worker_requests(i).load(Ordering::Relaxed),
                })
            })
            .collect()
    }

    /// Claims an entry of the worker table for `pid` (its own, a free one or
    /// one of a dead process) and returns its index.
    pub fn register_worker(&self, pid: u32) -> Result<usize> {
        let n = self.geometry.workers as usize;
        if let Some(i) = (0..n).find(|&i| self.worker_entry(i).0.load(Ordering::Acquire) == pid) {
            return Ok(i);
        }
        for i in 0..n {
            let (slot, applied) = self.worker_entry(i);
            let holder = slot.load(Ordering::Acquire);
            if (holder == 0 || !pid_alive(holder))
                && slot
                    .compare_exchange(holder, pid, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                applied.store(0, Ordering::Release);
                self.worker_requests(i).store(0, Ordering::Relaxed);
                return Ok(i);
            }
        }
        Err(Error::Internal(format!(
            "state file {}: the worker table is full ({n} live processes registered)",
            self.path.display()
        )))
    }

    /// Records that the worker in entry `i` now routes by `generation`.
    pub fn set_applied(&self, i: usize, generation: u64) {
        self.worker_entry(i).1.store(generation, Ordering::Release);
    }

    /// Frees entry `i` if `pid` still holds it.
    pub fn release_worker(&self, i: usize, pid: u32) {
        let _ =
            self.worker_entry(i)
                .0
                .compare_exchange(pid, 0, Ordering::AcqRel, Ordering::Acquire);
    }

    /// The registered workers that are still alive.
    pub fn workers(&self) -> Vec<Worker> {
        (0..self.geometry.workers as usize)
            .filter_map(|i| {
                let (slot, applied) = self.worker_entry(i);
                let pid = slot.load(Ordering::Acquire);
                (pid != 0 && pid_alive(pid)).then(|| Worker {
                    pid,
                    applied: applied.load(Ordering::Acquire),
                })
            })
            .collect()
    }

    /// The changes of `snap` that some live worker has not applied yet.
    pub fn pending(&self, snap: &Snapshot) -> Vec<Change> {
        let Some(oldest) = self.workers().iter().map(|w| w.applied).min() else {
            return Vec::new();
        };
        snap.changes.since(oldest)
    }
}

impl zone::ZoneSource for StateFile {
    fn zone(&self) -> Zone<'_> {
        StateFile::zone(self)
    }
}

/// Makes `user` the owner of `path` (the state file, or a directory made for
/// it), so nginx workers running as that user can map, lock and write it:
/// nginx's master runs as root and creates them; its workers do not.
pub fn give_to_user(path: &Path, user: &str) -> Result<()> {
    let (uid, gid) = user_ids(user).ok_or_else(|| {
        Error::BadRequest(format!(
            "no user {user:?} to give {} to: set init{{ user = ... }} to nginx's `user`",
            path.display()
        ))
    })?;
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(|e| io_error("chown", path, e))?;
    // Its owner must be able to write it, whatever its mode became.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(|e| io_error("stat", path, e))?
        .permissions()
        .mode();
    if mode & 0o600 != 0o600 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode | 0o600))
            .map_err(|e| io_error("chmod", path, e))?;
    }
    Ok(())
}

/// The lock of one writer: `flock` and this process's `writers`, and the
/// turn it took them in, unless a [`Turn`] keeps that.
struct WriterLock<'a> {
    file: &'a File,
    inner: Option<parking_lot::MutexGuard<'a, ()>>,
    queue: Queue<'a>,
    ticket: Option<Ticket>,
}

impl Drop for WriterLock<'_> {
    fn drop(&mut self) {
        // The lock first, so the writer whose turn comes finds it free.
        let _ = self.file.unlock();
        self.inner = None;
        if let Some(ticket) = self.ticket.take() {
            self.queue.leave(ticket);
        }
    }
}

/// What [`StateFile::restore`] put at the path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Restored {
    /// The restored file's version.
    pub version: u64,
    /// Where its table came from, for the log.
    pub from: String,
}

/// The file at a state file's path, compared with the one mapped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    Same,
    /// Deleted.
    Missing,
    /// Another file is at the path now (restored, or put there by hand).
    Replaced,
    /// Cut short, overwritten, its header or active slot wrecked, or
    /// unexaminable: why.
    Damaged(String),
}

enum Place<'a> {
    /// Only where there is no file yet: of two creators, one wins, and
    /// forgets the copy of whatever file was at the path before.
    Create,
    /// Over whatever is there, atomically, after saving its table (`payload`:
    /// base and extension, at `generation`) in `copy` under the new file's
    /// name.
    Replace {
        copy: &'a CopyFile,
        generation: u64,
        payload: (&'a [u8], &'a [u8]),
        /// Owner and group for the new file (and the copy), given before
        /// it is at the path: a process running as root replacing the file
        /// of workers that do not.
        owner: Option<(u32, u32)>,
    },
}

/// A whole file image of `geometry` holding `payload` in slot 0, every
/// server with a fresh cell; `Err` with the bytes needed when it does not
/// fit.
fn image(geometry: Geometry, mut payload: Payload) -> Result<Vec<u8>, usize> {
    for u in &mut payload.table.upstreams {
        Arc::make_mut(u).peers.clear();
    }
    let all = vec![true; payload.table.upstreams.len()];
    let given = zone::assign(
        &mut payload.table,
        &Table::default(),
        &all,
        geometry.cells,
        cell_tag(payload.version),
    );
    let checking = zone::starts_checking(&payload.table, &given);
    let encoded = codec::encode(&payload);
    if encoded.slot_bytes() as u64 > geometry.payload_capacity() {
        return Err(encoded.slot_bytes());
    }
    let mut bytes = vec![0u8; geometry.file_len as usize];
    bytes[..FIXED_LEN].copy_from_slice(&geometry.header_bytes());
    // The commit word, worker table and cells are atomics of this host, so
    // in native byte order; the file does not move between hosts (the
    // upstream file does that).
    bytes[COMMIT_WORD..COMMIT_WORD + 8]
        .copy_from_slice(&layout::commit_word(payload.version, 0).to_ne_bytes());
    for (r, checking) in given.into_iter().zip(checking) {
        let at = geometry.cells_offset() as usize + r.index as usize * CELL_LEN;
        bytes[at..at + CELL_LEN].copy_from_slice(&PeerCell::image(r.tag, checking));
    }
    let slot = geometry.slot_offset(0) as usize;
    let header = SlotHeader::for_payload(payload.version, &encoded.base, &encoded.extension);
    bytes[slot..slot + SLOT_HEADER as usize].copy_from_slice(&header.to_bytes());
    let start = slot + SLOT_HEADER as usize;
    bytes[start..][..encoded.base.len()].copy_from_slice(&encoded.base);
    bytes[start + encoded.base.len()..][..encoded.extension.len()]
        .copy_from_slice(&encoded.extension);
    Ok(bytes)
}

/// The encoded payload in slot 0 of an `image` of `geometry`: its base and
/// its extension.
fn image_payload(geometry: Geometry, bytes: &[u8]) -> (&[u8], &[u8]) {
    let slot = geometry.slot_offset(0) as usize;
    let h = SlotHeader::from_bytes(&bytes[slot..slot + SLOT_HEADER as usize]);
    bytes[slot + SLOT_HEADER as usize..][..h.total_len() as usize].split_at(h.len as usize)
}

/// Writes `bytes` beside `path` and moves them into place, so no process
/// ever sees a half-made file.
fn place(path: &Path, bytes: &[u8], how: Place) -> Result<()> {
    let tmp = path.with_file_name(format!(
        ".{}.{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("state"),
        std::process::id()
    ));
    let written = (|| {
        // A file of ours left by a process of the same pid that died here
        // keeps its mode when opened again: made anew, so 0644 applies
        // (narrowed by the umask only, which a daemonized nginx sets to 0).
        let _ = std::fs::remove_file(&tmp);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        // Written in one piece, it is cached in large folios: dropped, so
        // its mappings fault it in page by page (os::drop_cached says why).
        os::drop_cached(&f);
        match how {
            Place::Create => {
                // Its writer lock, so no writer of the new file runs before
                // the old copy is gone (dropped with `f`).
                f.lock()?;
                // link(2) fails when the name exists: the other creator won.
                match std::fs::hard_link(&tmp, path) {
                    Ok(()) => {
                        copy_file::forget(path);
                        Ok(())
                    }
                    Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
                    Err(e) => Err(e),
                }
            }
            Place::Replace {
                copy,
                generation,
                payload,
                owner,
            } => {
                if let Some((uid, gid)) = owner {
                    std::os::unix::fs::chown(&tmp, Some(uid), Some(gid))?;
                }
                let (base, extension) = payload;
                copy.save(FileId::of(&f.metadata()?), generation, base, extension);
                if let Some((uid, gid)) = owner {
                    // Never fatal: a copy the workers cannot write only
                    // costs them the copy, which they report.
                    let _ = std::os::unix::fs::chown(copy.path(), Some(uid), Some(gid));
                }
                std::fs::rename(&tmp, path)
            }
        }
    })();
    let _ = std::fs::remove_file(&tmp);
    written.map_err(|e| io_error("create", path, e))
}

/// Checks a slot's bytes (base, then extension) against its header and,
/// for the active slot, the commit word's generation; then decodes them.
fn check_slot(
    h: SlotHeader,
    payload: &[u8],
    generation: Option<u64>,
    prev: Option<&Payload>,
) -> Result<Payload, String> {
    if !h.matches(payload) {
        return Err("checksum mismatch".into());
    }
    if let Some(g) = generation {
        if h.generation != g {
            return Err(format!(
                "holds generation {}, the commit word says {g}",
                h.generation
            ));
        }
    }
    let (base, extension) = h.split(payload);
    let p = codec::decode(base, extension, prev)?;
    if p.version != h.generation {
        return Err(format!(
            "table version {} differs from the slot's {}",
            p.version, h.generation
        ));
    }
    Ok(p)
}

/// The table to use when the active slot (`active`, at `generation`) is
/// damaged (`why`): the other slot's, if it checks and is older.
fn fall_back(
    generation: u64,
    active: u64,
    why: String,
    other: Result<Payload, String>,
) -> Result<Snapshot, String> {
    if generation > MAX_GENERATION {
        return Err(format!(
            "the commit word is damaged: it names generation {generation}, beyond any a writer makes; slot {active}: {why}"
        ));
    }
    match other {
        Ok(p) if p.version < generation => {
            let why = format!(
                "slot {active} is unreadable ({why}); using the previous table, version {}",
                p.version
            );
            Ok(snapshot(generation, p, Some(why), 1 - active))
        }
        Ok(p) => Err(format!(
            "slot {active} is unreadable ({why}) and slot {} holds version {}, not older than {generation}",
            1 - active,
            p.version
        )),
        Err(other) => Err(format!(
            "both table slots are unreadable: slot {active}: {why}; slot {}: {other}",
            1 - active
        )),
    }
}

/// Checks a whole state file held in memory, as `StateFile::inspect` checks
/// one on disk, and returns its table: for tools and for fuzzing the loader.
/// `name` goes into error messages.
pub fn inspect_image(bytes: &[u8], name: &str) -> Result<Snapshot> {
    let corrupt = |why: String| Error::Internal(format!("state file {name}: {why}"));
    let g = Geometry::parse(
        &bytes[..bytes.len().min(FIXED_LEN)],
        bytes.len() as u64,
        name,
    )?;
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[COMMIT_WORD..COMMIT_WORD + 8]);
    let word = u64::from_ne_bytes(word);
    let (generation, active) = (layout::generation_of(word), layout::slot_of(word));
    let slot = |i: u64| -> Result<(SlotHeader, &[u8]), String> {
        let off = g.slot_offset(i) as usize;
        let h = SlotHeader::from_bytes(&bytes[off..off + SLOT_HEADER as usize]);
        if h.total_len() > g.payload_capacity() {
            return Err(format!("payload length {} exceeds the slot", h.total_len()));
        }
        let start = off + SLOT_HEADER as usize;
        Ok((h, &bytes[start..start + h.total_len() as usize]))
    };
    let why = match slot(active).and_then(|(h, p)| check_slot(h, p, Some(generation), None)) {
        Ok(p) => return Ok(snapshot(generation, p, None, active)),
        Err(why) => why,
    };
    let other = slot(1 - active).and_then(|(h, p)| check_slot(h, p, None, None));
    fall_back(generation, active, why, other).map_err(corrupt)
}

fn snapshot(seen: u64, p: Payload, fallback: Option<String>, slot: u64) -> Snapshot {
    Snapshot {
        seen,
        version: p.version,
        table: p.table,
        changes: p.changes,
        fallback,
        slot,
    }
}

/// The same upstreams saying the same, in the same order, at the same etcd
/// revision (`dyups sync` records a revision whose changes left the
/// upstreams as they were, so a restart resumes after it); what the store
/// keeps (`rev`, cells) does not count.
fn same_content(a: &Table, b: &Table) -> bool {
    a.sync == b.sync
        && a.upstreams.len() == b.upstreams.len()
        && a.upstreams
            .iter()
            .zip(&b.upstreams)
            .all(|(x, y)| x.same_content(y))
}

/// Makes the table a write built say what reading it back from its slot
/// gives (`changed`: its upstreams the write made or changed), so that this
/// process can route by it without that read: a server list whose servers
/// all lack a cell (the zone was full) reads as no list, and a table without
/// upstreams has nowhere to keep its sync mark (codec.rs). The bytes
/// encoded are the same either way.
fn normalize(table: &mut Table, changed: &[bool]) {
    for (u, &changed) in table.upstreams.iter_mut().zip(changed) {
        if changed && !u.peers.is_empty() && u.peers.iter().all(|p| p.is_none()) {
            Arc::make_mut(u).peers.clear();
        }
    }
    if table.upstreams.is_empty() {
        table.sync = None;
    }
}

/// Checks, in debug builds (every test), that the payload a write encoded
/// decodes to the table it keeps: what `read_if_changed` hands over instead
/// of reading the slot.
#[cfg(debug_assertions)]
fn same_as_decoded(written: &Payload, encoded: &codec::Encoded) {
    let back = codec::decode(&encoded.base, &encoded.extension, None)
        .expect("a payload just encoded decodes");
    assert_eq!(&back, written, "a written table reads back as it was");
    for (b, w) in back.table.upstreams.iter().zip(&written.table.upstreams) {
        assert_eq!(b.peers, w.peers, "the cells of {} read back", w.name);
    }
}

/// The tag of the cells a write at `generation` gives out: never 0, which
/// marks a cell no server was ever given.
/// Milliseconds of the Unix clock, which every process on the host shares:
/// the times in the peer cells.
fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn cell_tag(generation: u64) -> u32 {
    (generation as u32).max(1)
}

fn backoff(round: u32) {
    if round > 1000 {
        std::thread::sleep(Duration::from_micros(50));
    } else {
        std::hint::spin_loop();
    }
}

/// The path with its directory resolved, so two spellings of one file share
/// one registry entry. The file itself may not exist yet.
fn canonical(path: &Path) -> Result<PathBuf> {
    let name = path.file_name().ok_or_else(|| {
        Error::BadRequest(format!("state file path {} names no file", path.display()))
    })?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let dir = dir
        .canonicalize()
        .map_err(|e| io_error("find the directory of", path, e))?;
    Ok(dir.join(name))
}

fn io_error(verb: &str, path: &Path, e: std::io::Error) -> Error {
    let hint = if e.kind() == ErrorKind::PermissionDenied {
        format!(
            " (this process runs as uid {}: make the file and its directory writable by it)",
            effective_uid()
        )
    } else {
        String::new()
    };
    Error::Internal(format!(
        "could not {verb} state file {}: {e}{hint}",
        path.display()
    ))
}
