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

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use super::codec::Payload;
use super::copy_file::CopyFile;
use super::examine::{self, examine_bytes, published_slots};
use super::layout::{Geometry, MIN_FILE_LEN};
use super::{image, image_payload, io_error, place, Place, StateFile, Wait, DEFAULT_SIZE};
use crate::model::Table;
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
                geometry_for(path, if len >= MIN_FILE_LEN { len } else { DEFAULT_SIZE })
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
            changes: Vec::new(),
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
    StateFile::open_detached(path, size, || Ok(table.clone()))?;
    if let Some((uid, gid)) = opts.owner {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .map_err(|e| io_error("chown", path, e))?;
    }
    let version = StateFile::inspect(path)?.map_or(1, |s| s.version);
    Ok(Repair::Created { version })
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
