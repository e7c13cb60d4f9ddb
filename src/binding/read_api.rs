//! The reading functions: `version`, `list`, `get`, `peers`, `pending` and
//! `write_back_status`, each on the freshest table this process can see
//! (`with_snapshot`). They return only their value on success and
//! `nil, err` on failure; none of them writes.

use mlua::{Lua, Table, Value, Variadic};

use crate::admin::ups;
use crate::admin::upstream_file;
use crate::store::{stats, StateFile};
use crate::table::syntax::{render_server, setting_lines};

use super::arguments::string_arg;
use super::config::config;
use super::hot_path::WORKER;
use super::lifecycle::{owner_hint, seed};
use super::write_api::WRITE_BACK_ERROR;
use super::LuaResult;

/// Runs `f` on the freshest table this process can see: the worker's (after
/// catching up) inside nginx, a direct read outside it.
pub(super) fn with_snapshot<T>(
    f: impl FnOnce(&std::sync::Arc<StateFile>, &crate::store::Snapshot) -> T,
) -> Result<T, String> {
    let mut guard = WORKER.lock();
    if let Some(w) = guard.as_mut() {
        // Moves to a file restored or replaced since the last tick, so the
        // answer is the file's at the path, not an old mapping's.
        w.check_file_quietly(std::process::id());
        let _ = w.refresh();
        if let Some(e) = &w.error {
            return Err(e.clone());
        }
        return Ok(f(w.store(), w.snapshot()));
    }
    drop(guard);
    let cfg = config()?;
    let store = StateFile::open(&cfg.path, cfg.size, || seed(&cfg))
        .map_err(|e| format!("{e}{}", owner_hint(&cfg)))?;
    let snap = store.read().map_err(|e| e.to_string())?;
    Ok(f(&store, &snap))
}

// The reading functions return only their value on success and `nil, err`
// on failure (mlua turns an inner `Err` into those two values), so
// `ngx.say("version ", dyups.version())` prints the version alone.

pub(super) fn version() -> LuaResult<Result<u64, String>> {
    Ok(with_snapshot(|_, s| s.version))
}

pub(super) fn list(lua: &Lua, (): ()) -> LuaResult<Result<Table, String>> {
    match with_snapshot(|_, s| s.table.names().map(str::to_owned).collect::<Vec<_>>()) {
        Ok(names) => Ok(Ok(lua.create_sequence_from(names)?)),
        Err(e) => Ok(Err(e)),
    }
}

pub(super) fn get(lua: &Lua, args: Variadic<Value>) -> LuaResult<Result<Table, String>> {
    let name = string_arg(&args, 1, "get")?;
    let found = match with_snapshot(|_, s| s.table.get(&name).cloned()) {
        Ok(u) => u,
        Err(e) => return Ok(Err(e)),
    };
    let Some(u) = found else {
        return Ok(Err("not found".into()));
    };
    let servers = lua.create_table()?;
    for s in &u.servers {
        let t = lua.create_table()?;
        t.set("addr", s.addr.to_string())?;
        t.set("host", s.addr.host())?;
        t.set("port", s.addr.port())?;
        t.set("weight", s.weight)?;
        t.set("max_conns", s.max_conns)?;
        t.set("max_fails", s.max_fails)?;
        t.set("fail_timeout", s.fail_timeout)?;
        t.set("slow_start", s.slow_start)?;
        t.set("backup", s.backup)?;
        t.set("down", s.down)?;
        t.set("line", render_server(s))?;
        if let Some(i) = s.from {
            t.set("name", u.names[usize::from(i)].target())?;
        }
        servers.push(t)?;
    }
    let t = lua.create_table()?;
    t.set("name", u.name.as_str())?;
    t.set("policy", u.policy.to_string())?;
    t.set("keepalive", u.keepalive)?;
    t.set("keepalive_requests", u.keepalive_requests)?;
    t.set("keepalive_time", u.keepalive_time)?;
    t.set("keepalive_timeout", u.keepalive_timeout)?;
    if let Some(c) = &u.check.line {
        let check = lua.create_table()?;
        check.set("interval", c.interval)?;
        check.set("rise", c.rise)?;
        check.set("fall", c.fall)?;
        check.set("timeout", c.timeout)?;
        check.set("default_down", c.default_down)?;
        check.set("type", c.kind.name())?;
        check.set("port", c.port)?;
        check.set("jitter", c.jitter)?;
        t.set("check", check)?;
    }
    t.set("check_http_send", u.check.http_send.as_str())?;
    t.set(
        "check_http_expect_alive",
        lua.create_sequence_from(u.check.http_expect_alive.names())?,
    )?;
    t.set("check_keepalive_requests", u.check.keepalive_requests)?;
    t.set("settings", lua.create_sequence_from(setting_lines(&u))?)?;
    if !u.names.is_empty() {
        t.set("names", super::dns::names_table(lua, &u)?)?;
    }
    t.set("servers", servers)?;
    Ok(Ok(t))
}

/// `dyups.peers(name)`: each server's shared state, as every worker sees
/// it: `{ server, conns, fails, shared }` in table order.
pub(super) fn peers(lua: &Lua, args: Variadic<Value>) -> LuaResult<Result<Table, String>> {
    let name = string_arg(&args, 1, "peers")?;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let found = with_snapshot(|store, s| {
        s.table.get(&name).map(|u| {
            let zone = store.zone();
            let states = (0..u.servers.len()).map(|i| {
                (
                    stats::state_of(zone, u, i, now_ms).word(),
                    stats::counters_of(zone, u, i, now_ms),
                )
            });
            crate::store::zone::status(zone, u)
                .into_iter()
                .zip(states)
                .collect::<Vec<_>>()
        })
    });
    let list = match found {
        Ok(Some(list)) => list,
        Ok(None) => return Ok(Err("not found".into())),
        Err(e) => return Ok(Err(e)),
    };
    let out = lua.create_table()?;
    for (p, (state, c)) in list {
        let t = lua.create_table()?;
        t.set("server", p.server)?;
        t.set("conns", p.conns)?;
        t.set("fails", p.fails)?;
        t.set("shared", p.shared)?;
        t.set("state", state)?;
        t.set("requests", c.requests)?;
        let responses = lua.create_table()?;
        for (class, n) in ["1xx", "2xx", "3xx", "4xx", "5xx"]
            .into_iter()
            .zip(c.responses)
        {
            responses.set(class, n)?;
        }
        t.set("responses", responses)?;
        t.set("failures", c.fails)?;
        t.set("unavail", c.unavail)?;
        out.push(t)?;
    }
    Ok(Ok(out))
}

pub(super) fn pending(lua: &Lua, (): ()) -> LuaResult<Result<Table, String>> {
    match with_snapshot(|store, s| ups::pending_servers(&store.pending(s))) {
        Ok(map) => Ok(Ok(lua.create_table_from(map)?)),
        Err(e) => Ok(Err(e)),
    }
}

/// `dyups.write_back_status()`: the upstream file the table is written back
/// to and whether it holds the current table →
/// `{ path, version, written, error }` | `nil, err`.
pub(super) fn write_back_status(lua: &Lua, (): ()) -> LuaResult<Result<Table, String>> {
    let cfg = match config() {
        Ok(c) => c,
        Err(e) => return Ok(Err(e)),
    };
    let Some(path) = cfg.write_upstreams else {
        return Ok(Err(
            "no write-back: dyups.init has no write_upstreams option".into(),
        ));
    };
    let version = match with_snapshot(|_, s| s.version) {
        Ok(v) => v,
        Err(e) => return Ok(Err(e)),
    };
    // The file says which table it holds: the answer is the same in every
    // worker, whichever of them wrote it back or failed to.
    let written = upstream_file::written_version(&path);
    let error = if written == Some(version) {
        None
    } else {
        // Without a failure of its own, this worker tells from the file: a
        // file it did not write back is behind once the table has changed
        // (version 1 is the table a new state file is seeded with).
        let held = written.map(|w| format!("table version {w}"));
        WRITE_BACK_ERROR.lock().clone().or_else(|| {
            (written.is_some() || version > 1).then(|| {
                format!(
                    "upstream file {} holds {}, the table is at version {version}: \
                     writing it back failed in another worker (its error log says why)",
                    path.display(),
                    held.as_deref()
                        .unwrap_or("no table written back by ngx.dyups")
                )
            })
        })
    };
    let t = lua.create_table()?;
    t.set("path", path.display().to_string())?;
    t.set("version", version)?;
    t.set("written", written)?;
    t.set("error", error)?;
    Ok(Ok(t))
}
