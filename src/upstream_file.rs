//! The upstream file in nginx syntax (`upstream NAME { server ...; }`): what
//! seeds a new state file, and, written back after each change, what restores
//! the table on a fresh host (ngx_http_dyups_module's `dyups_upstream_conf`,
//! without a third party to dump it).

use std::io::Write;
use std::path::Path;

use crate::model::Table;
use crate::store::{StateFile, Wait};
use crate::syntax::{parse_upstream_file, render_upstream_file};
use crate::{Error, Result};

/// Reads and parses the upstream file at `path`.
pub fn read(path: &Path) -> Result<Table> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::BadRequest(format!(
            "could not read upstream file {}: {e}",
            path.display()
        ))
    })?;
    parse_upstream_file(&text)
        .map_err(|e| Error::BadRequest(format!("upstream file {}: {e}", path.display())))
}

/// Writes `table` to `path` atomically: a reader (nginx at its next start)
/// sees the old file or the new one, never a part.
pub fn write(path: &Path, table: &Table) -> Result<()> {
    let fail = |e: std::io::Error| {
        Error::Internal(format!(
            "could not write upstream file {}: {e} (this process runs as uid {}: \
             the file's directory must be writable by it)",
            path.display(),
            crate::store::effective_uid()
        ))
    };
    let tmp = path.with_file_name(format!(
        ".{}.{}.tmp",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("upstream.conf"),
        std::process::id()
    ));
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(render_upstream_file(table).as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(fail)
}

/// Writes the current table of `store` to `path`, holding the writer lock so
/// that of two processes writing it back, the last one writes the newest.
pub fn write_current(store: &StateFile, path: &Path, wait: Wait) -> Result<()> {
    store.while_locked(wait, |snapshot| write(path, &snapshot.table))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops;
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
        write(&path, &t).unwrap();
        assert_eq!(read(&path).unwrap(), t);
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
}
