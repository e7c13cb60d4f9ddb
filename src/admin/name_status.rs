//! What the resolver last found for each `resolve` line, for every worker
//! to show: the worker that holds the resolver lease (`crate::dns`) writes
//! it beside the state file, in `PATH.dns` (JSON, mode 0644), after each
//! lookup; the others read it when asked. The table itself changes only
//! when addresses do, so a lookup that found the same ones, or failed,
//! leaves its traces here and nowhere else.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::table::model::Upstream;
use crate::table::syntax::render_named;

/// What is known of one `resolve` line.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub upstream: String,
    /// `NAME` or `NAME:PORT`, as the line writes it.
    pub server: String,
    /// When the last lookup ended, Unix ms (0: none yet).
    pub resolved_ms: u64,
    /// Why the last lookup gave no address, if it did not.
    pub error: Option<String>,
    /// The addresses of the last good answer.
    pub addresses: Vec<String>,
    pub ttl: u32,
    /// When it is asked next, Unix ms.
    pub next_ms: u64,
}

/// The file beside the state file at `state`.
pub fn path_for(state: &Path) -> PathBuf {
    let mut name = state.file_name().unwrap_or_default().to_os_string();
    name.push(".dns");
    state.with_file_name(name)
}

/// The statuses the resolver wrote for the state file at `state`; none
/// when it wrote none (or the file is not one it wrote).
pub fn read(state: &Path) -> Vec<Status> {
    std::fs::read(path_for(state))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Writes `statuses` for the state file at `state`, atomically, mode
/// 0644 whatever the umask.
pub fn write(state: &Path, statuses: &[Status]) -> Result<(), String> {
    let path = path_for(state);
    let tmp = path.with_file_name(format!(
        ".{}.{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("dns"),
        std::process::id()
    ));
    let written = (|| {
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)?;
        f.write_all(&serde_json::to_vec(statuses).expect("plain data serialises"))?;
        std::fs::rename(&tmp, &path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(|e| format!("could not write {}: {e}", path.display()))
}

/// Adds to `v`, the JSON of `u`, its `server NAME` lines (`names`: each
/// line as written, whether it is re-resolved, the addresses the table
/// holds for it and when they were resolved, and what the resolver last
/// found, from `status`), and the line each server came from (`name`).
pub fn add_to_json(v: &mut Value, u: &Upstream, status: &[Status]) {
    if u.names.is_empty() {
        return;
    }
    let names: Vec<Value> = u
        .names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let addresses: Vec<String> = u
                .servers
                .iter()
                .filter(|s| s.from == Some(i as u16))
                .map(|s| s.addr.to_string())
                .collect();
            let last = status.iter().find(|s| {
                s.upstream.eq_ignore_ascii_case(&u.name)
                    && s.server.eq_ignore_ascii_case(&n.target())
            });
            let mut o = json!({
                "server": n.target(),
                "line": render_named(n),
                "resolve": n.resolve,
                "addresses": addresses,
                "resolved": n.resolved_ms,
                "ttl": n.ttl,
                "error": Value::Null,
            });
            if let Some(last) = last {
                o["last_lookup"] = json!(last.resolved_ms);
                o["error"] = json!(last.error);
                o["next_lookup"] = json!(last.next_ms);
            }
            o
        })
        .collect();
    v["names"] = Value::Array(names);
    if let Some(Value::Array(servers)) = v.get_mut("servers") {
        for (s, spec) in servers.iter_mut().zip(&u.servers) {
            if let Some(i) = spec.from {
                s["name"] = json!(u.names[usize::from(i)].target());
            }
        }
    }
}
