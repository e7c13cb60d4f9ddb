//! A state file examined from outside nginx, field by field, with its copy:
//! what `dyups inspect` shows and what `dyups repair` rebuilds from.
//!
//! The file is read whole while holding its writer lock (the same `flock`
//! every writer takes), so no write publishes meanwhile and the commit word
//! and both slots are seen as one writer left them. Nothing is trusted
//! before it is checked: a damaged header, a file cut short or a slot of
//! garbage is reported field by field, and the verdict is the one nginx's
//! `init` gives for the same bytes ([`inspect_image`]).
//!
//! Over 600 lines: the tests at its end push it over; its code is one
//! examination, field by field, and reads best whole.

use std::collections::HashSet;
use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::codec::{self, Payload};
use super::copy_file::{path_for, CopyFile, FileId};
use super::layout::{
    self, Geometry, SlotHeader, COMMIT_WORD, FIXED_LEN, FORMAT_VERSION, HEADER_LEN, MAGIC,
    MAX_GENERATION, SLOT_HEADER, WORKER_ENTRY, WORKER_TABLE,
};
use super::{inspect_image, io_error, pid_alive, Snapshot, Wait};
use crate::table::model::Table;
use crate::{Error, Result};

/// Everything a state file and its copy say, each part checked.
#[derive(Clone, Debug, Serialize)]
pub struct Examination {
    pub path: PathBuf,
    /// Its length on disk.
    pub len: u64,
    /// No damage: `init` takes it as it is and the workers route by its
    /// active slot.
    pub sound: bool,
    /// Why it is not sound, as `init` (or a worker's check) says it.
    pub damage: Option<String>,
    pub header: HeaderReport,
    /// The commit word, when the file is long enough to hold one.
    pub commit: Option<CommitReport>,
    /// Both slots, when the header says where they are.
    pub slots: Vec<SlotReport>,
    /// The table readers use: the active slot's, or the previous table when
    /// only that one is whole.
    pub table: Option<TableReport>,
    /// Every entry of the worker table in use, live or not.
    pub workers: Vec<WorkerReport>,
    pub cells: Option<CellReport>,
    pub copy: CopyReport,
    #[serde(skip)]
    pub(super) snapshot: Option<Snapshot>,
    #[serde(skip)]
    pub(super) id: FileId,
}

#[derive(Clone, Debug, Serialize)]
pub struct HeaderReport {
    /// The magic bytes of an ngx.dyups state file are there.
    pub magic: bool,
    /// The format version as written, and the one this build reads.
    pub format_version: Option<u32>,
    pub supported_version: u32,
    /// The geometry the fixed fields give, when their checksum holds
    /// (whether or not the file is as long as they say).
    pub file_len: Option<u64>,
    pub slot_len: Option<u64>,
    pub worker_entries: Option<u32>,
    pub peer_cells: Option<u32>,
    /// Why the header is refused, if it is.
    pub error: Option<String>,
}

#[derive(Clone, Copy, Debug, Serialize)]
pub struct CommitReport {
    pub generation: u64,
    pub active_slot: u64,
    /// A generation no writer makes (beyond 2^53 - 1): the word is damaged.
    pub plausible: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct SlotReport {
    pub index: u64,
    pub active: bool,
    /// As its header says (untrusted unless `error` is empty).
    pub generation: u64,
    pub payload_len: u64,
    pub checksum_ok: bool,
    /// The version of the table it holds, when it is whole and decodes.
    pub version: Option<u64>,
    pub error: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct TableReport {
    pub version: u64,
    pub slot: u64,
    pub upstreams: usize,
    pub servers: usize,
    /// Why the active slot's table is not the one read, when it is not.
    pub fallback: Option<String>,
}

#[derive(Clone, Copy, Debug, Serialize)]
pub struct WorkerReport {
    pub pid: u32,
    /// The generation this worker routes by.
    pub applied: u64,
    /// A dead worker's entry is ignored (and reused by the next one).
    pub alive: bool,
}

#[derive(Clone, Copy, Debug, Serialize)]
pub struct CellReport {
    /// Cells of shared peer state the table's servers hold.
    pub used: usize,
    pub total: u32,
    /// Servers without a cell (the zone was full): they balance per worker.
    pub servers_without: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct CopyReport {
    pub path: PathBuf,
    pub present: bool,
    /// Why it could not be read, when it is present.
    pub error: Option<String>,
    pub slots: Vec<CopySlotReport>,
    /// The newest generation it holds of this state file.
    pub newest: Option<u64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct CopySlotReport {
    pub index: u64,
    /// The generation of this state file's table it holds.
    pub generation: Option<u64>,
    /// Why it holds none of this file (empty, of another file, damaged).
    pub error: Option<String>,
}

impl Examination {
    /// The table readers route by, with its version, when there is one.
    pub fn table(&self) -> Option<(u64, &Table)> {
        self.snapshot.as_ref().map(|s| (s.version, &s.table))
    }

    /// The newest table the copy holds of this file.
    pub(super) fn copy_table(&self) -> Option<Payload> {
        self.copy_file()?.newest(self.id)
    }

    fn copy_file(&self) -> Option<CopyFile> {
        copy_of(&self.path, self.geometry())
    }

    /// The geometry the header's fixed fields give, when they check.
    pub(super) fn geometry(&self) -> Option<Geometry> {
        let h = &self.header;
        Some(Geometry {
            slot_len: h.slot_len?,
            file_len: h.file_len?,
            workers: h.worker_entries?,
            cells: h.peer_cells?,
        })
    }
}

/// The copy of the file at `path`, sized by the file's geometry when its
/// header says it, else by the copy's own length.
fn copy_of(path: &Path, geometry: Option<Geometry>) -> Option<CopyFile> {
    match geometry {
        Some(g) => Some(CopyFile::new(path, g)),
        None => CopyFile::sized_by_itself(path),
    }
}

/// The file at a path, open and holding its writer lock (released when
/// dropped, with the descriptor).
pub(super) struct LockedFile {
    pub file: File,
    pub id: FileId,
}

/// Opens the file at `path` and takes its writer lock, waiting as `wait`
/// says. Makes sure the lock is on the file now at the path: a worker that
/// restored it meanwhile put another file there, which is opened instead.
/// `Ok(None)` when there is no file.
pub(super) fn lock_path(path: &Path, wait: Wait) -> Result<Option<LockedFile>> {
    let started = Instant::now();
    let limit = match wait {
        Wait::Try => Duration::ZERO,
        // No turn in the queue here: a tool outside nginx waits on the lock.
        Wait::For(d) | Wait::Turn(_, d) => d,
    };
    for round in 0u32.. {
        if round > 0 && started.elapsed() >= limit {
            return Err(Error::Busy(format!(
                "could not lock state file {}: it was replaced again and again for {} ms",
                path.display(),
                limit.as_millis()
            )));
        }
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error("open", path, e)),
        };
        // Read whole, it would be cached in large folios, which make the
        // workers' durable writes write 2 MiB a folio (os::drop_cached).
        super::os::read_at_random(&file);
        let mut pause = Duration::from_micros(200);
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(std::fs::TryLockError::WouldBlock) => {}
                Err(std::fs::TryLockError::Error(e)) => return Err(io_error("lock", path, e)),
            }
            if started.elapsed() >= limit {
                return Err(Error::Busy(format!(
                    "could not lock state file {}: another writer held it for more than {} ms",
                    path.display(),
                    limit.as_millis()
                )));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(5));
        }
        let meta = file.metadata().map_err(|e| io_error("stat", path, e))?;
        match std::fs::metadata(path) {
            Ok(m) if (m.dev(), m.ino()) == (meta.dev(), meta.ino()) => {
                return Ok(Some(LockedFile {
                    file,
                    id: FileId::of(&meta),
                }))
            }
            // Replaced (or deleted) while we waited: look at what is there.
            _ => continue,
        }
    }
    unreachable!()
}

/// Examines the state file at `path` and its copy (see the module doc).
/// `Ok(None)` when there is no file.
pub fn examine_file(path: &Path, wait: Wait) -> Result<Option<Examination>> {
    let Some(mut locked) = lock_path(path, wait)? else {
        return Ok(None);
    };
    let mut bytes = Vec::new();
    locked
        .file
        .read_to_end(&mut bytes)
        .map_err(|e| io_error("read", path, e))?;
    Ok(Some(examine_bytes(path, &bytes, locked.id)))
}

/// Examines the bytes of the state file at `path` (the inode `id`).
pub(super) fn examine_bytes(path: &Path, bytes: &[u8], id: FileId) -> Examination {
    let shown = path.display().to_string();
    let len = bytes.len() as u64;
    let header = header_report(bytes, &shown);
    let geometry = header_geometry(bytes);
    // The commit word and the worker table are where a header that checks
    // says they are; in a wrecked header they are noise.
    let commit = (geometry.is_some() && bytes.len() >= COMMIT_WORD + 8).then(|| {
        let word = u64::from_ne_bytes(bytes[COMMIT_WORD..COMMIT_WORD + 8].try_into().unwrap());
        let generation = layout::generation_of(word);
        CommitReport {
            generation,
            active_slot: layout::slot_of(word),
            plausible: generation <= MAX_GENERATION,
        }
    });
    let slots = geometry
        .map(|g| (0..2).map(|i| slot_report(bytes, g, i, commit)).collect())
        .unwrap_or_default();
    // The verdict `init` gives for these bytes.
    let (snapshot, damage) = if header.error.is_some() {
        (None, header.error.clone())
    } else {
        match inspect_image(bytes, &shown) {
            Ok(s) => {
                let why = s
                    .fallback
                    .as_ref()
                    .map(|f| format!("state file {shown}: {f}"));
                (Some(s), why)
            }
            Err(e) => (None, Some(e.to_string())),
        }
    };
    let table = snapshot.as_ref().map(|s| TableReport {
        version: s.version,
        slot: s.slot,
        upstreams: s.table.upstreams.len(),
        servers: s.table.upstreams.iter().map(|u| u.servers.len()).sum(),
        fallback: s.fallback.clone(),
    });
    let cells = match (&snapshot, geometry) {
        (Some(s), Some(g)) => Some(cell_report(&s.table, g)),
        _ => None,
    };
    let copy = copy_report(path, geometry, id);
    Examination {
        path: path.to_path_buf(),
        len,
        sound: damage.is_none(),
        damage,
        header,
        commit,
        slots,
        table,
        workers: worker_reports(bytes, geometry),
        cells,
        copy,
        snapshot,
        id,
    }
}

fn header_report(bytes: &[u8], shown: &str) -> HeaderReport {
    let fixed = &bytes[..bytes.len().min(FIXED_LEN)];
    let geometry = header_geometry(bytes);
    HeaderReport {
        magic: fixed.len() >= MAGIC.len() && fixed[..MAGIC.len()] == MAGIC,
        format_version: (fixed.len() >= 12)
            .then(|| u32::from_le_bytes(fixed[8..12].try_into().unwrap())),
        supported_version: FORMAT_VERSION,
        file_len: geometry.map(|g| g.file_len),
        slot_len: geometry.map(|g| g.slot_len),
        worker_entries: geometry.map(|g| g.workers),
        peer_cells: geometry.map(|g| g.cells),
        error: Geometry::parse(fixed, bytes.len() as u64, shown)
            .err()
            .map(|e| e.to_string()),
    }
}

/// The geometry the fixed fields give when they check, however long the
/// file is (a file cut short keeps its header).
fn header_geometry(bytes: &[u8]) -> Option<Geometry> {
    let fixed = &bytes[..bytes.len().min(FIXED_LEN)];
    Geometry::parse(fixed, u64::MAX, "").ok()
}

fn slot_report(bytes: &[u8], g: Geometry, i: u64, commit: Option<CommitReport>) -> SlotReport {
    let active = commit.is_some_and(|c| c.active_slot == i);
    let mut report = SlotReport {
        index: i,
        active,
        generation: 0,
        payload_len: 0,
        checksum_ok: false,
        version: None,
        error: None,
    };
    let off = g.slot_offset(i) as usize;
    let Some(head) = bytes.get(off..off + SLOT_HEADER as usize) else {
        report.error = Some("beyond the end of the file (cut short)".into());
        return report;
    };
    if head.iter().all(|&b| b == 0) {
        report.error = Some("empty (never written)".into());
        return report;
    }
    let h = SlotHeader::from_bytes(head);
    report.generation = h.generation;
    report.payload_len = h.total_len();
    if h.total_len() > g.payload_capacity() {
        report.error = Some(format!("payload length {} exceeds the slot", h.total_len()));
        return report;
    }
    let start = off + SLOT_HEADER as usize;
    let Some(payload) = bytes.get(start..start + h.total_len() as usize) else {
        report.error = Some("its payload runs past the end of the file (cut short)".into());
        return report;
    };
    report.checksum_ok = h.matches(payload);
    if !report.checksum_ok {
        report.error = Some("checksum mismatch".into());
        return report;
    }
    let (base, extension) = h.split(payload);
    match codec::decode(base, extension, None) {
        Ok(p) if p.version == h.generation => report.version = Some(p.version),
        Ok(p) => {
            report.error = Some(format!(
                "table version {} differs from the slot's {}",
                p.version, h.generation
            ))
        }
        Err(why) => report.error = Some(why),
    }
    if let (Some(c), None) = (commit, &report.error) {
        if active && h.generation != c.generation {
            report.error = Some(format!(
                "holds generation {}, the commit word says {}",
                h.generation, c.generation
            ));
        }
    }
    report
}

/// The tables of both slots that check, newest first: what a repair may
/// rebuild from. Only with a header that checks (the slots are where it
/// says) and a plausible commit word, and only tables that word published:
/// a writer killed before publishing leaves a whole table in the other
/// slot that no one was ever told about.
pub(super) fn published_slots(bytes: &[u8]) -> Vec<(u64, Payload)> {
    let Some(g) = header_geometry(bytes) else {
        return Vec::new();
    };
    let Some(generation) = published_generation(bytes) else {
        return Vec::new();
    };
    let mut out: Vec<(u64, Payload)> = (0..2)
        .filter_map(|i| {
            let off = g.slot_offset(i) as usize;
            let h = SlotHeader::from_bytes(bytes.get(off..off + SLOT_HEADER as usize)?);
            if h.total_len() > g.payload_capacity() || h.generation > generation {
                return None;
            }
            let start = off + SLOT_HEADER as usize;
            let payload = bytes.get(start..start + h.total_len() as usize)?;
            if !h.matches(payload) {
                return None;
            }
            let (base, extension) = h.split(payload);
            let p = codec::decode(base, extension, None).ok()?;
            (p.version == h.generation).then_some((i, p))
        })
        .collect();
    out.sort_by_key(|(_, p)| std::cmp::Reverse(p.version));
    out
}

/// The generation the commit word says was published last, when the header
/// checks and the word is one a writer could have made.
pub(super) fn published_generation(bytes: &[u8]) -> Option<u64> {
    header_geometry(bytes)?;
    let word = bytes.get(COMMIT_WORD..COMMIT_WORD + 8)?;
    let generation = layout::generation_of(u64::from_ne_bytes(word.try_into().unwrap()));
    (generation <= MAX_GENERATION).then_some(generation)
}

/// The highest generation anything in the file claims that can be
/// believed: a rebuilt file's version goes above it, so that a client's
/// expected version of the damaged file matches nothing.
pub(super) fn highest_generation(bytes: &[u8]) -> u64 {
    let Some(g) = header_geometry(bytes) else {
        return 0;
    };
    let commit = published_generation(bytes).unwrap_or(0);
    let slots = (0..2).filter_map(|i| {
        let off = g.slot_offset(i) as usize;
        let h = SlotHeader::from_bytes(bytes.get(off..off + SLOT_HEADER as usize)?);
        let start = off + SLOT_HEADER as usize;
        let payload = bytes.get(start..start.checked_add(h.total_len() as usize)?)?;
        h.matches(payload).then_some(h.generation)
    });
    slots
        .filter(|&gen| gen <= MAX_GENERATION)
        .fold(commit, u64::max)
}

fn worker_reports(bytes: &[u8], geometry: Option<Geometry>) -> Vec<WorkerReport> {
    let Some(g) = geometry else {
        return Vec::new();
    };
    if (bytes.len() as u64) < HEADER_LEN {
        return Vec::new();
    }
    (0..g.workers as usize)
        .filter_map(|i| {
            let at = WORKER_TABLE + i * WORKER_ENTRY;
            let entry = bytes.get(at..at + WORKER_ENTRY)?;
            // Atomics of this host: native byte order.
            let pid = u32::from_ne_bytes(entry[0..4].try_into().unwrap());
            let applied = u64::from_ne_bytes(entry[8..16].try_into().unwrap());
            (pid != 0).then(|| WorkerReport {
                pid,
                applied,
                alive: pid_alive(pid),
            })
        })
        .collect()
}

fn cell_report(table: &Table, g: Geometry) -> CellReport {
    let mut used = HashSet::new();
    let mut without = 0;
    for u in &table.upstreams {
        for i in 0..u.servers.len() {
            let p = u.peer(i);
            if p.is_none() || p.index >= g.cells {
                without += 1;
            } else {
                used.insert(p.index);
            }
        }
    }
    CellReport {
        used: used.len(),
        total: g.cells,
        servers_without: without,
    }
}

fn copy_report(path: &Path, geometry: Option<Geometry>, id: FileId) -> CopyReport {
    let copy_path = path_for(path);
    let mut report = CopyReport {
        path: copy_path.clone(),
        present: copy_path.exists(),
        error: None,
        slots: Vec::new(),
        newest: None,
    };
    if !report.present {
        return report;
    }
    let Some(copy) = copy_of(path, geometry) else {
        report.error = Some("too short to hold a slot".into());
        return report;
    };
    match copy.slots(id) {
        Err(e) => report.error = Some(format!("could not read it: {e}")),
        Ok(slots) => {
            for (i, s) in slots.into_iter().enumerate() {
                let (generation, error) = match s {
                    Ok(p) => (Some(p.version), None),
                    Err(why) => (None, Some(why)),
                };
                report.slots.push(CopySlotReport {
                    index: i as u64,
                    generation,
                    error,
                });
            }
            report.newest = report.slots.iter().filter_map(|s| s.generation).max();
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use std::fs::OpenOptions;
    use std::os::unix::fs::FileExt;

    use super::*;
    use crate::admin::ops;
    use crate::store::{StateFile, WriteOptions};
    use crate::testing::TempDir;

    const NOW: Wait = Wait::Try;

    /// A file at version 3 (both slots written), upstreams a (2 servers)
    /// and b (1), and its copy.
    fn written(dir: &TempDir) -> std::sync::Arc<StateFile> {
        let f = dir.store(&[("a", "server 10.0.0.1:80;")]);
        let opts = WriteOptions::default();
        f.write(&opts, |t| ops::update(t, "b", "server 10.0.0.3:80;"))
            .unwrap();
        f.write(&opts, |t| {
            ops::update(t, "a", "server 10.0.0.1:80; server 10.0.0.2:80;")
        })
        .unwrap();
        f
    }

    fn active_slot(path: &Path) -> u64 {
        let mut word = [0u8; 8];
        std::fs::File::open(path)
            .unwrap()
            .read_exact_at(&mut word, COMMIT_WORD as u64)
            .unwrap();
        layout::slot_of(u64::from_ne_bytes(word))
    }

    fn overwrite(path: &Path, at: u64, bytes: &[u8]) {
        OpenOptions::new()
            .write(true)
            .open(path)
            .unwrap()
            .write_all_at(bytes, at)
            .unwrap();
    }

    /// What nginx's `init` says of the file: StateFile::inspect's error,
    /// or the previous table's reason.
    fn inits_words(path: &Path) -> Option<String> {
        match StateFile::inspect(path) {
            Ok(Some(s)) => s
                .fallback
                .map(|f| format!("state file {}: {f}", path.display())),
            Ok(None) => panic!("no file"),
            Err(e) => Some(e.to_string()),
        }
    }

    #[test]
    fn a_sound_file_is_reported_part_by_part() {
        let dir = TempDir::new();
        let f = written(&dir);
        let me = std::process::id();
        let i = f.register_worker(me).unwrap();
        f.set_applied(i, 2);
        // An entry a worker that exited left behind.
        let gone = f.register_worker(0x7fff_fff0).unwrap();
        f.set_applied(gone, 1);
        let e = examine_file(&dir.file(), NOW).unwrap().unwrap();
        assert!(e.sound, "{:?}", e.damage);
        assert_eq!(e.damage, None);
        let g = f.geometry();
        assert_eq!(e.len, g.file_len);
        assert_eq!(
            (
                e.header.format_version,
                e.header.file_len,
                e.header.peer_cells
            ),
            (Some(FORMAT_VERSION), Some(g.file_len), Some(g.cells))
        );
        let c = e.commit.unwrap();
        assert_eq!((c.generation, c.active_slot, c.plausible), (3, 0, true));
        let slots: Vec<_> = e
            .slots
            .iter()
            .map(|s| (s.index, s.active, s.version, s.checksum_ok, s.error.clone()))
            .collect();
        assert_eq!(
            slots,
            vec![
                (0, true, Some(3), true, None),
                (1, false, Some(2), true, None)
            ]
        );
        let t = e.table.as_ref().unwrap();
        assert_eq!((t.version, t.slot, t.upstreams, t.servers), (3, 0, 2, 3));
        assert_eq!(e.table().unwrap().1, &f.read().unwrap().table);
        let c = e.cells.unwrap();
        assert_eq!((c.used, c.total, c.servers_without), (3, g.cells, 0));
        let workers: Vec<_> = e
            .workers
            .iter()
            .map(|w| (w.pid, w.applied, w.alive))
            .collect();
        assert_eq!(workers, vec![(me, 2, true), (0x7fff_fff0, 1, false)]);
        assert!(e.copy.present);
        assert_eq!(e.copy.newest, Some(3));
        // Generation g in copy slot g & 1.
        assert_eq!(e.copy.slots[0].generation, Some(2));
        assert_eq!(e.copy.slots[1].generation, Some(3));
    }

    #[test]
    fn each_damage_is_named_in_the_words_init_uses() {
        type Damage = fn(&Path, Geometry);
        let damages: [(&str, Damage, &str); 4] = [
            (
                "header wrecked",
                |p, _| overwrite(p, 0, &[0x5a; 64]),
                "bad magic",
            ),
            (
                "cut short",
                |p, _| {
                    OpenOptions::new()
                        .write(true)
                        .open(p)
                        .unwrap()
                        .set_len(HEADER_LEN + 100)
                        .unwrap()
                },
                "truncated",
            ),
            (
                "active slot wrecked",
                |p, g| {
                    overwrite(
                        p,
                        g.slot_offset(active_slot(p)) + SLOT_HEADER + 8,
                        &[0xa5; 16],
                    )
                },
                "using the previous table, version 2",
            ),
            (
                "both slots wrecked",
                |p, g| {
                    overwrite(p, g.slot_offset(0), &[0xa5; 64]);
                    overwrite(p, g.slot_offset(1), &[0xa5; 64]);
                },
                "both table slots are unreadable",
            ),
        ];
        for (what, damage, said) in damages {
            let dir = TempDir::new();
            let g = written(&dir).geometry();
            damage(&dir.file(), g);
            let e = examine_file(&dir.file(), NOW).unwrap().unwrap();
            assert!(!e.sound, "{what}");
            let why = e.damage.clone().unwrap();
            assert_eq!(Some(why.clone()), inits_words(&dir.file()), "{what}");
            assert!(why.contains(said), "{what}: {why}");
            assert!(
                why.contains(&dir.file().display().to_string()),
                "{what}: {why}"
            );
            match what {
                "header wrecked" => {
                    assert!(!e.header.magic && e.header.error.is_some());
                    // Nothing the header would place is shown.
                    assert!(e.commit.is_none() && e.slots.is_empty() && e.workers.is_empty());
                    assert!(e.table.is_none());
                }
                "cut short" => {
                    assert_eq!(e.len, HEADER_LEN + 100);
                    assert!(e.slots[1].error.as_deref().unwrap().contains("cut short"));
                    assert!(e.table.is_none());
                }
                "active slot wrecked" => {
                    let s = &e.slots[e.commit.unwrap().active_slot as usize];
                    assert!(s.active && !s.checksum_ok, "{s:?}");
                    assert_eq!(s.error.as_deref(), Some("checksum mismatch"));
                    assert_eq!(e.table.as_ref().unwrap().version, 2);
                    assert!(e.table.as_ref().unwrap().fallback.is_some());
                }
                _ => assert!(e.slots.iter().all(|s| s.error.is_some())),
            }
            // The copy is not the state file: it still holds the last table.
            assert_eq!(e.copy.newest, Some(3), "{what}");
        }
    }

    #[test]
    fn no_file_is_none_and_a_held_lock_is_busy() {
        let dir = TempDir::new();
        assert!(examine_file(&dir.file(), NOW).unwrap().is_none());
        written(&dir);
        // Another open file description of it, as another writer's.
        let holder = File::open(dir.file()).unwrap();
        holder.lock().unwrap();
        let err = examine_file(&dir.file(), Wait::For(Duration::from_millis(20))).unwrap_err();
        assert_eq!(err.status(), 409, "{err}");
        holder.unlock().unwrap();
        assert!(examine_file(&dir.file(), NOW).unwrap().unwrap().sound);
    }

    #[test]
    fn a_copy_missing_or_of_another_file_holds_no_table_of_this_one() {
        let dir = TempDir::new();
        written(&dir);
        let copy = path_for(&dir.file());
        // Another state file, put at the path by rename: the copy is of
        // the file before.
        let other = TempDir::new();
        other.store(&[("z", "server 10.0.0.9:80;")]);
        std::fs::rename(other.file(), dir.file()).unwrap();
        let e = examine_file(&dir.file(), NOW).unwrap().unwrap();
        assert!(e.sound && e.copy.present);
        assert_eq!(e.copy.newest, None);
        for s in &e.copy.slots {
            assert!(
                s.error
                    .as_deref()
                    .unwrap()
                    .contains("of another state file"),
                "{s:?}"
            );
        }
        std::fs::remove_file(&copy).unwrap();
        let e = examine_file(&dir.file(), NOW).unwrap().unwrap();
        assert!(!e.copy.present && e.copy.slots.is_empty());
    }
}
