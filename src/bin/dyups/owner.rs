//! Who owns the files this tool makes when it runs as root. nginx's workers
//! (not root) open the state file and its copy for writing, and `init`
//! gives the state file's directory to them when it makes it; so a new
//! state file goes to its directory's owner, a rebuilt one keeps the owner
//! of the file it replaces, and a copy goes to the state file's owner.
//! Run as another user, the files are that user's, as for any writer.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use ngx_dyups::store::{copy_path_for, effective_uid};

use crate::Failure;

fn owner_of(path: &Path) -> Option<(u32, u32)> {
    std::fs::metadata(path).ok().map(|m| (m.uid(), m.gid()))
}

fn directory_of(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// A state file this process has just created goes to its directory's
/// owner.
pub fn give_new_file(path: &Path) -> Result<(), Failure> {
    if effective_uid() != 0 {
        return Ok(());
    }
    let Some((uid, gid)) = owner_of(directory_of(path)) else {
        return Ok(());
    };
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(|e| {
        Failure::failed(format!(
            "created state file {}, but could not give it to uid {uid}: {e}",
            path.display()
        ))
    })
}

/// The copy beside the state file goes to the state file's owner, if this
/// process made it (a write makes it when it is missing). Never fatal: the
/// write is done; a copy the workers cannot write costs them only the copy,
/// which they log.
pub fn give_copy(path: &Path) {
    if effective_uid() != 0 {
        return;
    }
    let copy = copy_path_for(path);
    let (Some(state), Some(now)) = (owner_of(path), owner_of(&copy)) else {
        return;
    };
    if state != now {
        if let Err(e) = std::os::unix::fs::chown(&copy, Some(state.0), Some(state.1)) {
            eprintln!(
                "dyups: could not give the copy {} to uid {}: {e}",
                copy.display(),
                state.0
            );
        }
    }
}

/// The owner a rebuilt state file must have: the damaged file's, or, when
/// there is none, its directory's. `None` when not running as root.
pub fn for_rebuilt(path: &Path) -> Option<(u32, u32)> {
    if effective_uid() != 0 {
        return None;
    }
    owner_of(path).or_else(|| owner_of(directory_of(path)))
}
