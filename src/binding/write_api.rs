//! The writing functions' Rust side: `update`, `delete`, `add_server`,
//! `remove_server`, `write_upstreams`, each one write through the store in
//! a turn of the writers' queue (`TurnHandle`, which `writes.lua` holds
//! while it yields), and what follows a write that succeeded: this worker
//! routes by it at once, and the upstream file is written back.

use std::ffi::c_void;
use std::time::Duration;

use mlua::{
    IntoLuaMulti, LightUserData, Lua, MultiValue, UserData, UserDataMethods, UserDataRefMut, Value,
    Variadic,
};
use parking_lot::Mutex;

use crate::admin::ops;
use crate::admin::upstream_file;
use crate::store::{StateFile, TurnId, TurnState, Wait, WriteOptions};
use crate::table::model::Table as UpstreamTable;

use super::arguments::{expect_arg, opt_string_arg, string_arg};
use super::config::Config;
use super::hot_path::WORKER;
use super::lifecycle::store;
use super::ngx_api::{log, phase, resolve_path};
use super::LuaResult;

/// A write's turn in the writers' queue, kept across its calls while the
/// Lua side yields (writes.lua). Dropped unfinished (its coroutine was
/// abandoned), it gives the turn up, flushing what it wrote first.
pub(super) struct TurnHandle {
    id: TurnId,
    /// The state file the turn was taken in.
    file: Option<std::sync::Arc<StateFile>>,
    /// The answers for the host names the write adds, gathered with
    /// cosockets before its turn (dns.lua).
    pub(super) answers: Option<crate::table::names::Answers>,
}

impl TurnHandle {
    pub(super) fn new() -> TurnHandle {
        TurnHandle {
            id: TurnId::new(),
            file: None,
            answers: None,
        }
    }

    /// How a write in this turn on `store` waits, the configured wait
    /// giving its limit.
    pub(super) fn wait(&mut self, store: &std::sync::Arc<StateFile>, configured: Wait) -> Wait {
        if let Some(f) = &self.file {
            if !std::sync::Arc::ptr_eq(f, store) {
                // The file was replaced meanwhile: the turn there is void.
                let _ = f.finish_turn(self.id, false);
            }
        }
        self.file = Some(store.clone());
        let limit = match configured {
            Wait::For(d) | Wait::Turn(_, d) => d,
            Wait::Try => Duration::ZERO,
        };
        Wait::Turn(self.id, limit)
    }
}

impl UserData for TurnHandle {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        // waiting [, address, length to msync]: true while writers are
        // ahead; else false, and the range its write left to msync, if any.
        // No strings: from Rust, each costs a protected mlua call.
        methods.add_method("state", |_, this, ()| {
            let state = this.file.as_ref().map(|f| f.turn_state(this.id));
            Ok(match state {
                None | Some(TurnState::Done) => (false, None, None),
                Some(TurnState::Waiting) => (true, None, None),
                Some(TurnState::Held { flush }) => (
                    false,
                    flush.map(|(at, _)| LightUserData(at as *mut c_void)),
                    flush.map(|(_, len)| len),
                ),
            })
        });
        methods.add_method_mut("set_answers", |_, this, a: mlua::AnyUserData| {
            this.answers = Some(a.borrow::<super::dns::AnswersHandle>()?.0.clone());
            Ok(())
        });
        // finish(flushed) → nil, or why the write is not known to be on disk
        methods.add_method_mut("finish", |_, this, flushed: bool| {
            Ok(match this.file.take() {
                Some(f) => f.finish_turn(this.id, flushed).err().map(|e| e.to_string()),
                None => None,
            })
        });
    }
}

impl Drop for TurnHandle {
    fn drop(&mut self) {
        if let Some(f) = self.file.take() {
            let _ = f.finish_turn(self.id, false);
        }
    }
}

pub(super) type Turn = Option<UserDataRefMut<TurnHandle>>;

/// Raises when a write is attempted where it must not run: the master (it
/// would open the file before fork) or a phase that must not block.
fn check_write_phase(lua: &Lua, f: &str) -> LuaResult<()> {
    match phase(lua).as_deref() {
        None | Some("init_worker" | "timer" | "rewrite" | "server_rewrite" | "access" | "content") => Ok(()),
        Some(p) => Err(mlua::Error::runtime(format!(
            "'{f}' cannot run in the {p} phase: writes may wait for the state file lock; call it from content, access, rewrite, timer or init_worker"
        ))),
    }
}

/// This process's last failure to write the table back, until a write-back
/// succeeds: what `dyups.write_back_status()` reports while the file is
/// behind the table.
pub(super) static WRITE_BACK_ERROR: Mutex<Option<String>> = Mutex::new(None);

/// After a successful write: this worker routes by the result at once, and
/// the upstream file is written back when so configured. Returns how the
/// write-back went (`None` when there is none): the change stands either
/// way, as the state file has it.
pub(super) fn after_write(
    lua: &Lua,
    cfg: &Config,
    store: &StateFile,
    wait: Wait,
) -> Option<Result<u64, String>> {
    if let Some(w) = WORKER.lock().as_mut() {
        let _ = w.refresh();
    }
    let path = cfg.write_upstreams.as_ref()?;
    let outcome = upstream_file::write_current(store, path, wait).map_err(|e| {
        let msg = format!("{e}; the change is made and kept in the state file");
        log(lua, "ERR", &msg);
        msg
    });
    *WRITE_BACK_ERROR.lock() = outcome.as_ref().err().cloned();
    // For every worker's statistics, the last failure's reason with it.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    store
        .table_counters()
        .record_write_back(outcome.as_ref().err().map(String::as_str), now_ms);
    Some(outcome)
}

/// The value of the header that tells an HTTP client how the write-back of
/// its change went (`X-Dyups-Write-Back`, set by writes.lua): `ok`, or
/// `failed: REASON`; none when there was no write-back.
pub(super) fn write_back_header(outcome: Option<Result<u64, String>>) -> Option<String> {
    Some(match outcome? {
        Ok(_) => "ok".to_owned(),
        // A header value is one line of visible characters.
        Err(e) => format!("failed: {e}").replace(|c: char| c.is_control(), " "),
    })
}

/// The state file of this process and how a write in `turn` on it waits
/// (without a turn: as configured, blocking).
pub(super) fn store_in(
    turn: &mut Turn,
) -> crate::Result<(Config, std::sync::Arc<StateFile>, Wait)> {
    let (cfg, store) = store()?;
    let wait = match turn {
        Some(t) => t.wait(&store, cfg.write.wait),
        None => cfg.write.wait,
    };
    Ok((cfg, store, wait))
}

/// Runs one write through the store with the configured options, in `turn`.
/// The host names the change adds are resolved first (see
/// `dns::answers_for`); their answers go in with it.
pub(super) fn write<R>(
    lua: &Lua,
    turn: &mut Turn,
    expect: Option<u64>,
    change: impl Fn(&mut UpstreamTable) -> crate::Result<R>,
) -> crate::Result<(u64, R)> {
    let (cfg, store, wait) = store_in(turn)?;
    let answers = super::dns::answers_for(turn, &cfg, |t| change(t).map(drop));
    let out = store.write(
        &WriteOptions {
            expect,
            wait,
            ..cfg.write
        },
        |t| {
            let out = change(t)?;
            if let Some(a) = &answers {
                ops::resolve_names(t, a)?;
            }
            Ok(out)
        },
    )?;
    after_write(lua, &cfg, &store, wait);
    Ok(out)
}

/// `dyups.update(name, body [, version])` → `status, message`.
pub(super) fn update(
    lua: &Lua,
    (mut turn, args): (Turn, Variadic<Value>),
) -> LuaResult<(u16, String)> {
    let name = string_arg(&args, 1, "update")?;
    let body = string_arg(&args, 2, "update")?;
    let expect = expect_arg(&args, 3, "update")?;
    check_write_phase(lua, "update")?;
    Ok(status_message(write(lua, &mut turn, expect, |t| {
        ops::update(t, &name, &body)
    })))
}

/// `dyups.delete(name [, version])` → `status, message`.
pub(super) fn delete(
    lua: &Lua,
    (mut turn, args): (Turn, Variadic<Value>),
) -> LuaResult<(u16, String)> {
    let name = string_arg(&args, 1, "delete")?;
    let expect = expect_arg(&args, 2, "delete")?;
    check_write_phase(lua, "delete")?;
    Ok(status_message(write(lua, &mut turn, expect, |t| {
        ops::delete(t, &name)
    })))
}

fn status_message<R>(r: crate::Result<(u64, R)>) -> (u16, String) {
    match r {
        Ok(_) => (200, "success".into()),
        Err(e) => (e.status(), e.to_string()),
    }
}

/// `dyups.add_server(name|nil, server [, version])` and
/// `dyups.remove_server(name|nil, server [, version])` → the new version, or
/// `nil, err, status`.
pub(super) fn set_rotation(
    lua: &Lua,
    mut turn: Turn,
    args: Variadic<Value>,
    add: bool,
) -> LuaResult<MultiValue> {
    let f = if add { "add_server" } else { "remove_server" };
    let name = opt_string_arg(&args, 1, f)?;
    let server = string_arg(&args, 2, f)?;
    let expect = expect_arg(&args, 3, f)?;
    check_write_phase(lua, f)?;
    let r = write(lua, &mut turn, expect, |t| {
        if add {
            ops::add_server(t, name.as_deref(), &server)
        } else {
            ops::remove_server(t, name.as_deref(), &server)
        }
    });
    match r {
        Ok((v, _)) => v.into_lua_multi(lua),
        Err(e) => (Value::Nil, e.to_string(), e.status()).into_lua_multi(lua),
    }
}

/// `dyups.write_upstreams(path)`: writes the table to `path` as an nginx
/// upstream file, atomically → `true` | `nil, err`.
pub(super) fn write_upstreams(
    lua: &Lua,
    (mut turn, args): (Turn, Variadic<Value>),
) -> LuaResult<Result<bool, String>> {
    let path = resolve_path(lua, &string_arg(&args, 1, "write_upstreams")?);
    check_write_phase(lua, "write_upstreams")?;
    let written = store_in(&mut turn)
        .and_then(|(_, store, wait)| upstream_file::write_current(&store, &path, wait));
    Ok(written.map(|_| true).map_err(|e| e.to_string()))
}
