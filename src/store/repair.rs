//! Rebuilding a damaged state file from outside nginx (`dyups repair`).
//!
//! It works as a worker's [`StateFile::restore`](super::StateFile::restore)
//! does, for a process that maps nothing: under the damaged file's writer
//! lock, it takes the newest sound table there is (a slot the commit word
//! published, or the copy's), or the table the caller gives, and puts a new
//! file at the path by rename. Workers keep the damaged file mapped until
//! they notice another file at the path (each refresh tick checks) and move
//! to it; nothing they map is ever cut or overwritten. Writers of the old
//! file wait on its lock, then find the file replaced and refuse, so no
//! write is acknowledged into the file being replaced. The damaged bytes are
//! kept aside, as they were, in `<path>.damaged.<unix time>` (mode 0600:
//! whatever overwrote them may not be ours to show).
//!
//! Over 600 lines: the tests at its end push it over; its code is under 300.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use super::codec::{ChangeLog, Payload};
use super::copy_file::CopyFile;
use super::examine::{self, examine_bytes, published_slots};
use super::layout::{Geometry, MIN_FILE_LEN};
use super::{image, image_payload, io_error, place, Place, StateFile, Wait, DEFAULT_SIZE};
use crate::table::model::Table;
use crate::{Error, Result};

/// How a repair is made.
#[derive(Clone, Debug)]
pub struct RepairOptions {
    /// The table to put in the rebuilt file, and where it came from (for
    /// the report): an upstream file. `None`: the newest sound table of the
    /// damaged file and its copy.
    pub from: Option<(Table, String)>,
    /// The size of the rebuilt file. `None`: the damaged file's, as its
    /// header says, else its length, else the default (2m).
    pub size: Option<u64>,
    /// Owner and group of the files made (the rebuilt file and its copy):
    /// nginx's workers must be able to open them for writing.
    pub owner: Option<(u32, u32)>,
    pub wait: Wait,
}

/// What a repair found and did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Repair {
    /// The file is sound: nothing was changed.
    Sound { version: u64 },
    /// There was no file: one was created from the table given.
    Created { version: u64 },
    /// The file was damaged and another was put in its place.
    Rebuilt {
        /// Why it was damaged.
        damage: String,
        version: u64,
        /// Where the table came from.
        from: String,
        /// Where the damaged bytes are kept.
        aside: PathBuf,
    },
}

/// Repairs the state file at `path` (see the module doc).
pub fn repair(path: &Path, opts: &RepairOptions) -> Result<Repair> {
    let Some(mut locked) = examine::lock_path(path, opts.wait)? else {
        return create_missing(path, opts);
    };
    let mut bytes = Vec::new();
    locked
        .file
        .read_to_end(&mut bytes)
        .map_err(|e| io_error("read", path, e))?;
    let found = examine_bytes(path, &bytes, locked.id);
    let Some(damage) = found.damage.clone() else {
        let (version, _) = found.table().expect("a sound file has a table");
        return Ok(Repair::Sound { version });
    };
    let copy = found.copy_table();
    let mut above = examine::highest_generation(&bytes);
    if let Some(p) = &copy {
        above = above.max(p.version);
    }
    let (table, from) = match &opts.from {
        Some((table, from)) => (table.clone(), from.clone()),
        None => {
            let mut candidates: Vec<(Payload, String)> = published_slots(&bytes)
                .into_iter()
                .map(|(i, p)| (p, format!("slot {i}")))
                .collect();
            if let Some(p) = copy {
                candidates.push((p, format!("the copy {}", found.copy.path.display())));
            }
            let Some((p, from)) = candidates.into_iter().max_by_key(|(p, _)| p.version) else {
                return Err(Error::Internal(format!(
                    "{damage}; neither a slot it published nor its copy {} holds a sound table, so nothing was changed: rebuild it from an upstream file (--from FILE)",
                    found.copy.path.display()
                )));
            };
            if let Some(last) = examine::published_generation(&bytes).filter(|&g| g > p.version) {
                // The change of `last` is only in the memory of workers
                // that applied it, which restore it themselves.
                return Err(Error::Internal(format!(
                    "{damage}; the newest sound table, in {from}, is version {}, but the file published version {last}, which neither its slots nor its copy {} hold: rebuilding would lose that change, so nothing was changed. nginx's workers that applied it restore the file themselves; to rebuild from version {} anyway, `dyups dump` it to a file and give that to --from",
                    p.version,
                    found.copy.path.display(),
                    p.version
                )));
            }
            (p.table, format!("{from} (version {})", p.version))
        }
    };
    let geometry = match opts.size {
        Some(size) => geometry_for(path, size)?,
        None => found.geometry().map_or_else(
            || {
                let len = found.len;
                geometry_for(
                    path,
                    if len >= MIN_FILE_LEN {
                        len
                    } else {
                        DEFAULT_SIZE
                    },
                )
            },
            Ok,
        )?,
    };
    let version = above + 1;
    let bytes_new = image(
        geometry,
        Payload {
            version,
            table,
            changes: ChangeLog::default(),
        },
    )
    .map_err(|needs| {
        Error::NoSpace(format!(
            "could not rebuild state file {}: the table needs {needs} bytes, a slot of a {}-byte file holds {} (give a larger --size); nothing was changed",
            path.display(),
            geometry.file_len,
            geometry.payload_capacity()
        ))
    })?;
    let aside = keep_aside(path, &bytes)?;
    let payload = image_payload(geometry, &bytes_new);
    place(
        path,
        &bytes_new,
        Place::Replace {
            copy: &CopyFile::new(path, geometry),
            generation: version,
            payload,
            owner: opts.owner,
        },
    )?;
    drop(locked);
    Ok(Repair::Rebuilt {
        damage,
        version,
        from,
        aside,
    })
}

/// No file at the path: created from the table given, as `init` creates
/// one; without a table there is nothing to rebuild from.
fn create_missing(path: &Path, opts: &RepairOptions) -> Result<Repair> {
    let Some((table, _)) = &opts.from else {
        return Err(Error::Internal(format!(
            "there is no state file {}: nothing to repair (nginx's workers restore a file deleted under them; `dyups apply` or --from FILE creates one)",
            path.display()
        )));
    };
    let size = opts.size.unwrap_or(DEFAULT_SIZE);
    let seeded = std::cell::Cell::new(false);
    StateFile::open_detached(path, size, || {
        seeded.set(true);
        Ok(table.clone())
    })?;
    let made = StateFile::inspect(path)?.filter(|s| {
        s.version == 1
            && s.table.upstreams.len() == table.upstreams.len()
            && s.table
                .upstreams
                .iter()
                .zip(&table.upstreams)
                .all(|(a, b)| a.same_content(b))
    });
    if !seeded.get() || made.is_none() {
        // Another process made a file there first: that one is examined.
        return repair(path, opts);
    }
    if let Some((uid, gid)) = opts.owner {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .map_err(|e| io_error("chown", path, e))?;
    }
    Ok(Repair::Created { version: 1 })
}

fn geometry_for(path: &Path, size: u64) -> Result<Geometry> {
    Geometry::for_file_len(size).map_err(|e| {
        Error::BadRequest(format!(
            "could not rebuild state file {}: {e}",
            path.display()
        ))
    })
}

/// Writes the damaged bytes to `<path>.damaged.<unix time>` (`.1`, `.2`...
/// after it when that exists), mode 0600 whatever the umask, on disk before
/// the file is replaced.
fn keep_aside(path: &Path, bytes: &[u8]) -> Result<PathBuf> {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    for n in 0u32.. {
        let aside = path.with_file_name(match n {
            0 => format!("{name}.damaged.{secs}"),
            n => format!("{name}.damaged.{secs}.{n}"),
        });
        let mut f = match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&aside)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(io_error(
                    &format!("keep aside (as {}) the damaged", aside.display()),
                    path,
                    e,
                ))
            }
        };
        let written = f
            .set_permissions(std::fs::Permissions::from_mode(0o600))
            .and_then(|()| f.write_all(bytes))
            .and_then(|()| f.sync_all());
        if let Err(e) = written {
            let _ = std::fs::remove_file(&aside);
            return Err(io_error(
                &format!("keep aside (as {}) the damaged", aside.display()),
                path,
                e,
            ));
        }
        return Ok(aside);
    }
    unreachable!()
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::os::unix::fs::{FileExt, MetadataExt};
    use std::sync::Arc;

    use super::*;
    use crate::admin::ops;
    use crate::store::copy_file::path_for;
    use crate::store::layout::{self, COMMIT_WORD, HEADER_LEN, SLOT_HEADER};
    use crate::store::{examine_file, Health, WriteOptions};
    use crate::table::syntax::parse_upstream_file;
    use crate::testing::TempDir;

    fn opts() -> RepairOptions {
        RepairOptions {
            from: None,
            size: None,
            owner: None,
            wait: Wait::Try,
        }
    }

    /// A file at version 2 whose last write (upstream b) is in the active
    /// slot and the copy, and the table it holds.
    fn written(dir: &TempDir) -> (Arc<StateFile>, Table) {
        let f = dir.store(&[("a", "server 10.0.0.1:80;")]);
        f.write(&WriteOptions::default(), |t| {
            ops::update(t, "b", "server 10.0.0.2:80;")
        })
        .unwrap();
        let table = f.read().unwrap().table;
        (f, table)
    }

    fn wreck_active_slot(path: &Path, g: Geometry) {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let mut word = [0u8; 8];
        f.read_exact_at(&mut word, COMMIT_WORD as u64).unwrap();
        let active = layout::slot_of(u64::from_ne_bytes(word));
        f.write_all_at(&[0xa5; 16], g.slot_offset(active) + SLOT_HEADER + 8)
            .unwrap();
    }

    fn wreck_header(path: &Path) {
        let f = OpenOptions::new().write(true).open(path).unwrap();
        f.write_all_at(&[0x5a; HEADER_LEN as usize], 0).unwrap();
    }

    fn names(t: &Table) -> Vec<&str> {
        t.names().collect()
    }

    fn files_in(dir: &TempDir) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_wrecked_active_slot_is_rebuilt_from_the_copy_with_the_last_write() {
        let dir = TempDir::new();
        let (f, table) = written(&dir);
        wreck_active_slot(&dir.file(), f.geometry());
        let damaged = std::fs::read(dir.file()).unwrap();
        let Repair::Rebuilt {
            damage,
            version,
            from,
            aside,
        } = repair(&dir.file(), &opts()).unwrap()
        else {
            panic!("not rebuilt")
        };
        assert!(damage.contains("slot"), "{damage}");
        assert!(from.starts_with("the copy "), "{from}");
        assert_eq!(version, 3);
        let now = StateFile::inspect(&dir.file()).unwrap().unwrap();
        assert_eq!((now.version, now.fallback), (3, None));
        assert_eq!(names(&now.table), names(&table));
        assert!(now
            .table
            .upstreams
            .iter()
            .zip(&table.upstreams)
            .all(|(a, b)| a.same_content(b)));
        // The damaged bytes, as they were, readable by their owner only.
        assert_eq!(std::fs::read(&aside).unwrap(), damaged);
        assert_eq!(std::fs::metadata(&aside).unwrap().mode() & 0o777, 0o600);
        assert!(aside
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("state.damaged."));
        assert_eq!(std::fs::metadata(dir.file()).unwrap().mode() & 0o777, 0o644);
        // The copy holds the new file's table, so the next damage keeps it.
        let e = examine_file(&dir.file(), Wait::Try).unwrap().unwrap();
        assert!(e.sound);
        assert_eq!(e.copy.newest, Some(3));
        // No temporary file left.
        assert_eq!(
            files_in(&dir),
            vec![
                "state".to_owned(),
                "state.copy".to_owned(),
                aside.file_name().unwrap().to_string_lossy().into_owned()
            ]
        );
    }

    #[test]
    fn a_wrecked_header_is_rebuilt_from_the_copy_and_without_one_nothing_changes() {
        let dir = TempDir::new();
        let (f, table) = written(&dir);
        let g = f.geometry();
        wreck_header(&dir.file());
        let Repair::Rebuilt { version, from, .. } = repair(&dir.file(), &opts()).unwrap() else {
            panic!("not rebuilt")
        };
        assert!(from.contains("copy"), "{from}");
        // Nothing in the wrecked header can be believed: above the copy's.
        assert_eq!(version, 3);
        let now = StateFile::inspect(&dir.file()).unwrap().unwrap();
        assert_eq!(names(&now.table), names(&table));
        // The damaged file's length gave the size its header no longer says.
        assert_eq!(std::fs::metadata(dir.file()).unwrap().len(), g.file_len);

        wreck_header(&dir.file());
        std::fs::remove_file(path_for(&dir.file())).unwrap();
        let before = std::fs::read(dir.file()).unwrap();
        let listed = files_in(&dir);
        let err = repair(&dir.file(), &opts()).unwrap_err().to_string();
        assert!(
            err.contains("bad magic") && err.contains("--from FILE"),
            "{err}"
        );
        assert_eq!(std::fs::read(dir.file()).unwrap(), before);
        assert_eq!(files_in(&dir), listed);
    }

    #[test]
    fn an_older_slot_is_not_taken_when_a_newer_table_was_published() {
        let dir = TempDir::new();
        let (f, _) = written(&dir);
        wreck_active_slot(&dir.file(), f.geometry());
        std::fs::remove_file(path_for(&dir.file())).unwrap();
        let before = std::fs::read(dir.file()).unwrap();
        let err = repair(&dir.file(), &opts()).unwrap_err().to_string();
        assert!(err.contains("would lose that change"), "{err}");
        assert!(
            err.contains("is version 1") && err.contains("published version 2"),
            "{err}"
        );
        assert_eq!(std::fs::read(dir.file()).unwrap(), before);
        assert_eq!(files_in(&dir), vec!["state".to_owned()]);
    }

    #[test]
    fn a_table_written_but_never_published_is_not_taken() {
        let dir = TempDir::new();
        let (f, table) = written(&dir);
        // A writer killed between filling the other slot and publishing it:
        // a whole table at generation 3 no one was told about.
        let killed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            f.write_with(
                &WriteOptions::default(),
                |t| ops::update(t, "never", "server 10.0.0.7:80;"),
                || panic!("killed before publishing"),
            )
        }));
        assert!(killed.is_err());
        wreck_active_slot(&dir.file(), f.geometry());
        let Repair::Rebuilt { version, from, .. } = repair(&dir.file(), &opts()).unwrap() else {
            panic!("not rebuilt")
        };
        assert!(
            from.starts_with("the copy ") && from.ends_with("(version 2)"),
            "{from}"
        );
        // Above the unpublished generation too: no client saw it, but a
        // slot held it.
        assert_eq!(version, 4);
        let now = StateFile::inspect(&dir.file()).unwrap().unwrap();
        assert_eq!(names(&now.table), names(&table));
    }

    #[test]
    fn a_file_cut_after_its_published_slot_is_rebuilt_from_that_slot() {
        let dir = TempDir::new();
        let f = dir.store(&[("a", "server 10.0.0.1:80;")]);
        let g = f.geometry();
        // Version 1 in slot 0, and no copy (only writes make one).
        assert!(!path_for(&dir.file()).exists());
        OpenOptions::new()
            .write(true)
            .open(dir.file())
            .unwrap()
            .set_len(g.slot_offset(1))
            .unwrap();
        let Repair::Rebuilt { version, from, .. } = repair(&dir.file(), &opts()).unwrap() else {
            panic!("not rebuilt")
        };
        assert_eq!((version, from.as_str()), (2, "slot 0 (version 1)"));
        let now = StateFile::inspect(&dir.file()).unwrap().unwrap();
        assert_eq!(names(&now.table), vec!["a"]);
        assert_eq!(std::fs::metadata(dir.file()).unwrap().len(), g.file_len);
    }

    #[test]
    fn a_given_table_replaces_the_damaged_one_above_every_version_it_reached() {
        let dir = TempDir::new();
        let (f, _) = written(&dir);
        wreck_active_slot(&dir.file(), f.geometry());
        let given = parse_upstream_file("upstream z { server 10.0.0.9:80; }").unwrap();
        let o = RepairOptions {
            from: Some((given, "upstream file z.conf".into())),
            size: Some(64 << 10),
            ..opts()
        };
        let Repair::Rebuilt { version, from, .. } = repair(&dir.file(), &o).unwrap() else {
            panic!("not rebuilt")
        };
        assert_eq!((version, from.as_str()), (3, "upstream file z.conf"));
        let now = StateFile::inspect(&dir.file()).unwrap().unwrap();
        assert_eq!(names(&now.table), vec!["z"]);
        assert_eq!(
            std::fs::metadata(dir.file()).unwrap().len(),
            Geometry::for_file_len(64 << 10).unwrap().file_len
        );
    }

    #[test]
    fn a_sound_file_is_left_as_it_is_and_a_missing_one_is_only_created_from_a_table() {
        let dir = TempDir::new();
        written(&dir);
        let before = std::fs::read(dir.file()).unwrap();
        assert_eq!(
            repair(&dir.file(), &opts()).unwrap(),
            Repair::Sound { version: 2 }
        );
        assert_eq!(std::fs::read(dir.file()).unwrap(), before);
        assert_eq!(
            files_in(&dir),
            vec!["state".to_owned(), "state.copy".to_owned()]
        );

        let empty = TempDir::new();
        let err = repair(&empty.file(), &opts()).unwrap_err().to_string();
        assert!(
            err.contains("there is no state file") && err.contains("state"),
            "{err}"
        );
        assert!(files_in(&empty).is_empty());
        let given = parse_upstream_file("upstream z { server 10.0.0.9:80; }").unwrap();
        let o = RepairOptions {
            from: Some((given, "z.conf".into())),
            ..opts()
        };
        assert_eq!(
            repair(&empty.file(), &o).unwrap(),
            Repair::Created { version: 1 }
        );
        let now = StateFile::inspect(&empty.file()).unwrap().unwrap();
        assert_eq!(names(&now.table), vec!["z"]);
        assert_eq!(std::fs::metadata(empty.file()).unwrap().len(), DEFAULT_SIZE);
    }

    #[test]
    fn a_process_mapping_the_damaged_file_moves_to_the_rebuilt_one() {
        let dir = TempDir::new();
        let (f, table) = written(&dir);
        let held = f.read().unwrap();
        wreck_active_slot(&dir.file(), f.geometry());
        assert!(matches!(f.examine(), Health::Damaged(_)));
        let Repair::Rebuilt { version, .. } = repair(&dir.file(), &opts()).unwrap() else {
            panic!("not rebuilt")
        };
        // What a worker's timer does: it sees another file, does not restore
        // over it, and moves to it.
        assert_eq!(f.health(), Health::Replaced);
        assert_eq!(f.restore(&held).unwrap(), None);
        let err = f
            .write(&WriteOptions::default(), |t| ops::delete(t, "a"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("was replaced"), "{err}");
        let moved = f.reopen().unwrap();
        let now = moved.read().unwrap();
        assert_eq!(now.version, version);
        assert_eq!(names(&now.table), names(&table));
        moved
            .write(&WriteOptions::default(), |t| ops::delete(t, "a"))
            .unwrap();
    }

    #[test]
    fn a_held_lock_makes_it_busy_and_changes_nothing() {
        let dir = TempDir::new();
        let (f, _) = written(&dir);
        wreck_active_slot(&dir.file(), f.geometry());
        let before = std::fs::read(dir.file()).unwrap();
        let holder = File::open(dir.file()).unwrap();
        holder.lock().unwrap();
        let err = repair(&dir.file(), &opts()).unwrap_err();
        assert_eq!(err.status(), 409, "{err}");
        assert_eq!(std::fs::read(dir.file()).unwrap(), before);
        assert_eq!(
            files_in(&dir),
            vec!["state".to_owned(), "state.copy".to_owned()]
        );
    }

    #[test]
    fn the_rebuilt_file_and_its_copy_go_to_the_owner_given() {
        let dir = TempDir::new();
        let (f, _) = written(&dir);
        wreck_active_slot(&dir.file(), f.geometry());
        // Root may give files to anyone; another user only to itself.
        let owner = if crate::store::effective_uid() == 0 {
            (65534, 65534)
        } else {
            let m = std::fs::metadata(dir.path()).unwrap();
            (m.uid(), m.gid())
        };
        let o = RepairOptions {
            owner: Some(owner),
            ..opts()
        };
        assert!(matches!(
            repair(&dir.file(), &o).unwrap(),
            Repair::Rebuilt { .. }
        ));
        for p in [dir.file(), path_for(&dir.file())] {
            let m = std::fs::metadata(&p).unwrap();
            assert_eq!((m.uid(), m.gid()), owner, "{}", p.display());
        }
    }

    #[test]
    fn sizes_read_as_inits_size_option_reads_them() {
        use crate::store::parse_size;
        assert_eq!(parse_size("65536"), Some(65536));
        assert_eq!(parse_size(" 512k"), Some(512 << 10));
        assert_eq!(parse_size("4M"), Some(4 << 20));
        assert_eq!(parse_size("1g"), Some(1 << 30));
        for bad in ["", "m", "4 m", "4mb", "-1", "1.5m", "99999999999999999999g"] {
            assert_eq!(parse_size(bad), None, "{bad:?}");
        }
        assert_eq!(DEFAULT_SIZE, 2 << 20);
    }
}
