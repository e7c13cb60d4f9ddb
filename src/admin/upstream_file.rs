//! The upstream file in nginx syntax (`upstream NAME { server ...; }`): what
//! seeds a new state file, and, written back after each change, what restores
//! the table on a fresh host (ngx_http_dyups_module's `dyups_upstream_conf`,
//! without a third party to dump it).

use std::io::{BufRead, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::store::{StateFile, Wait};
use crate::table::model::Table;
use crate::table::syntax::{parse_upstream_file, render_upstream_file};
use crate::{Error, Result};

/// Reads and parses the upstream file at `path`.
pub fn read(path: &Path) -> Result<Table> {
    read_stamped(path).map(|(table, _)| table)
}

/// Reads and parses the upstream file at `path`, with its stamp when it is
/// a file written back by ngx.dyups.
pub fn read_stamped(path: &Path) -> Result<(Table, Option<Stamp>)> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::BadRequest(format!(
            "could not read upstream file {}: {e}",
            path.display()
        ))
    })?;
    let table = parse_upstream_file(&text)
        .map_err(|e| Error::BadRequest(format!("upstream file {}: {e}", path.display())))?;
    Ok((table, stamp_of(&text)))
}

/// The first line of a file written back: which table version it holds, so
/// any worker can tell whether the file is behind the table, and a checksum
/// of the rest, so a start or reload can tell whether someone edited it:
/// `# ngx.dyups table version 12, crc32 1c291ca3`.
const STAMP: &str = "# ngx.dyups table version ";
const CRC: &str = ", crc32 ";

/// What the first line of a file written back says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    /// The table version the file was written from.
    pub version: u64,
    /// Whether the rest of the file is as it was written (its checksum
    /// matches): not edited since.
    pub intact: bool,
}

/// The stamp of a file's text, if it is a file written back by ngx.dyups.
pub fn stamp_of(text: &str) -> Option<Stamp> {
    let (first, rest) = text.split_once('\n')?;
    let said = first.strip_prefix(STAMP)?;
    let (version, crc) = match said.split_once(CRC) {
        Some((v, c)) => (v, u32::from_str_radix(c.trim_end(), 16).ok()),
        // Written before the checksum was: whether it was edited is unknown.
        None => (said, None),
    };
    Some(Stamp {
        version: version.trim_end().parse().ok()?,
        intact: crc == Some(crc32fast::hash(rest.as_bytes())),
    })
}

/// Writes `table` (at `version`) to `path` atomically: a reader (nginx at
/// its next start) sees the old file or the new one, never a part.
pub fn write(path: &Path, table: &Table, version: u64) -> Result<()> {
    let fail = |e: std::io::Error| {
        Error::Internal(format!(
            "could not write upstream file {}: {e} (this process runs as uid {}: \
             the file's directory must be writable by it)",
            path.display(),
            crate::store::effective_uid()
        ))
    };
    let body = render_upstream_file(table);
    let crc = crc32fast::hash(body.as_bytes());
    let text = format!("{STAMP}{version}{CRC}{crc:08x}\n{body}");
    replace_file(path, text.as_bytes(), true).map_err(fail)
}

/// Replaces the file at `path` with `bytes` atomically (a temporary file
/// beside it, renamed over it), made 0644 whatever the umask: a daemonized
/// nginx has umask 0, and a file others may write is one where they can
/// rewrite routing. With `sync`, the bytes are on disk before the rename.
/// The files ngx.dyups writes beside its own (the upstream file, the seed
/// record, the resolver's results) all go through here.
pub(crate) fn replace_file(path: &Path, bytes: &[u8], sync: bool) -> std::io::Result<()> {
    let tmp = path.with_file_name(format!(
        ".{}.{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("dyups"),
        std::process::id()
    ));
    let written = (|| {
        // A file of ours left by a process of the same pid that died here:
        // made anew, so the mode below applies.
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)?;
        f.write_all(bytes)?;
        if sync {
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Writes the current table of `store` to `path`, holding the writer lock so
/// that of two processes writing it back, the last one writes the newest.
/// Returns the version written.
pub fn write_current(store: &StateFile, path: &Path, wait: Wait) -> Result<u64> {
    store.while_locked(wait, |snapshot| {
        write(path, &snapshot.table, snapshot.version).map(|()| snapshot.version)
    })?
}

/// The table version the file at `path` was written from, if it is a file
/// written back by ngx.dyups.
pub fn written_version(path: &Path) -> Option<u64> {
    let mut line = String::new();
    std::io::BufReader::new(std::fs::File::open(path).ok()?)
        .read_line(&mut line)
        .ok()?;
    let said = line.strip_prefix(STAMP)?;
    let version = said.split_once(CRC).map_or(said, |(v, _)| v);
    version.trim_end().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::ops;
    use crate::testing::TempDir;

    #[test]
    fn a_written_file_reads_back_as_the_same_table() {
        let dir = TempDir::new();
        let path = dir.path().join("upstream.conf");
        let mut t = Table::default();
        ops::update(
            &mut t,
            "a",
            "server 127.0.0.1:1 weight=2 backup; server [::1]:2 down;",
        )
        .unwrap();
        ops::update(&mut t, "b", "server unix:/run/b.sock;").unwrap();
        write(&path, &t, 7).unwrap();
        assert_eq!(read(&path).unwrap(), t);
        assert_eq!(written_version(&path), Some(7));
        assert_eq!(written_version(&dir.path().join("missing.conf")), None);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "a temporary file was left"
        );
        let err = read(&dir.path().join("missing.conf"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.conf"), "{err}");
    }

    #[test]
    fn the_stamp_tells_an_edited_file_from_one_as_written() {
        let dir = TempDir::new();
        let path = dir.path().join("upstream.conf");
        let mut t = Table::default();
        ops::update(&mut t, "a", "server 127.0.0.1:1;").unwrap();
        write(&path, &t, 12).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            stamp_of(&text),
            Some(Stamp {
                version: 12,
                intact: true
            })
        );
        let edited = text.replace("127.0.0.1:1", "127.0.0.1:2");
        assert_eq!(
            stamp_of(&edited),
            Some(Stamp {
                version: 12,
                intact: false
            })
        );
        // A stamp without a checksum (an older ngx.dyups): edited or not, unknown.
        let old = "# ngx.dyups table version 3\nupstream a { server 127.0.0.1:1; }\n";
        assert_eq!(
            stamp_of(old),
            Some(Stamp {
                version: 3,
                intact: false
            })
        );
        std::fs::write(&path, old).unwrap();
        assert_eq!(written_version(&path), Some(3));
        assert_eq!(stamp_of("upstream a { server 127.0.0.1:1; }\n"), None);
    }

    #[test]
    fn the_written_file_is_0644_even_over_a_stale_temporary_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = TempDir::new();
        let path = dir.path().join("upstream.conf");
        let stale = dir
            .path()
            .join(format!(".upstream.conf.{}.tmp", std::process::id()));
        std::fs::write(&stale, b"junk").unwrap();
        std::fs::set_permissions(&stale, std::fs::Permissions::from_mode(0o666)).unwrap();
        write(&path, &Table::default(), 1).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(
            mode & 0o022,
            0,
            "the upstream file is {mode:o}: others may write it"
        );
        assert!(!stale.exists(), "the temporary file was left");
    }
}
