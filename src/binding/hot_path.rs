//! The request path: what `balance.lua` calls on every request. `resolve`
//! turns an upstream name into the entry the Lua side caches; the pick, the
//! generation check and the log-phase release are plain C functions called
//! through LuaJIT's FFI (numbers in, numbers out, nothing allocated), over
//! this worker's `Worker` and the `KEY` buffer the Lua side copies a
//! request's hash key into.

use std::ffi::c_void;
use std::sync::atomic::{AtomicU8, Ordering};

use mlua::{Lua, Value};
use parking_lot::Mutex;

use crate::balance::balancer::Retry;
use crate::balance::worker::{Worker, NO_LIVE, UNKNOWN};
use crate::table::policy::Policy;

use super::config::config;
use super::LuaResult;

/// `dyups_pick`: no live server because every one failed its active health
/// checks (balance.lua logs why before nginx answers 502).
const NO_LIVE_CHECKS: i32 = -4;

/// Longest hash key used; longer keys are cut here.
pub(super) const KEY_MAX: usize = 8192;
/// Where the request path writes a request's evaluated hash key before it
/// calls `dyups_pick` (LuaJIT's ffi.copy into this address). Rust-owned and
/// atomic, so reading it takes no raw pointer.
pub(super) static KEY: [AtomicU8; KEY_MAX] = [const { AtomicU8::new(0) }; KEY_MAX];
/// The key copied out of `KEY` for one pick; kept to avoid an allocation.
static KEY_COPY: Mutex<Vec<u8>> = Mutex::new(Vec::new());
/// This worker's routing state; the FFI pick reads it on every request.
pub(super) static WORKER: Mutex<Option<Worker>> = Mutex::new(None);

/// Resolves an upstream name for the balancer glue: `entry, seen` where
/// entry is `{ id, tries, hosts = {...}, ports = {...} }`, or `nil, seen` for
/// an unknown name, or `nil, nil, err` when this worker has no table.
pub(super) fn resolve(
    lua: &Lua,
    name: mlua::LuaString,
) -> LuaResult<(Value, Option<u64>, Option<String>)> {
    let mut guard = WORKER.lock();
    let Some(w) = guard.as_mut() else {
        let err = config().err().unwrap_or_else(|| {
            "ngx.dyups: init_worker did not run or failed in this worker".into()
        });
        return Ok((Value::Nil, None, Some(err)));
    };
    let _ = w.refresh();
    let seen = w.snapshot().seen;
    let name = name.to_string_lossy();
    let Some(id) = w.upstream_id(&name) else {
        return Ok((Value::Nil, Some(seen), None));
    };
    let u = &w.snapshot().table.upstreams[id as usize];
    let hosts = lua.create_sequence_from(u.servers.iter().map(|s| s.addr.host()))?;
    let ports = lua.create_sequence_from(u.servers.iter().map(|s| s.addr.port()))?;
    let e = lua.create_table()?;
    if let Some(parts) = key_parts(&u.policy) {
        let list = lua.create_table()?;
        for part in parts {
            let p = lua.create_table()?;
            match part {
                KeyPart::Var(name) => p.set("var", name)?,
                KeyPart::Text(text) => p.set("text", text)?,
            }
            list.push(p)?;
        }
        e.set("parts", list)?;
    }
    e.set("id", id)?;
    e.set("tries", u.servers.len())?;
    e.set("hosts", hosts)?;
    e.set("ports", ports)?;
    Ok((Value::Table(e), Some(seen), None))
}

/// The generation this worker routes by, after catching up with the file
/// (one atomic load when nothing changed); -1 without a table.
pub(super) extern "C" fn dyups_current() -> i64 {
    std::panic::catch_unwind(|| match WORKER.lock().as_mut() {
        Some(w) => {
            if w.store().generation() != w.snapshot().seen {
                let _ = w.refresh();
            }
            w.snapshot().seen as i64
        }
        None => -1,
    })
    .unwrap_or(-1)
}

/// Longest tail of `$upstream_status` and of `$upstream_response_time`
/// the log phase copies: the entries are matched to the request's picks
/// from the end (see `crate::store::stats`), and 8 attempts take some 50.
pub(super) const LOG_VAR_MAX: usize = 256;
/// Where the log phase copies the tails of those two variables (LuaJIT's
/// ffi.copy, as for `KEY`): `$upstream_status` first, then at
/// `LOG_VAR_MAX` `$upstream_response_time`.
pub(super) static LOG_VARS: [AtomicU8; 2 * LOG_VAR_MAX] =
    [const { AtomicU8::new(0) }; 2 * LOG_VAR_MAX];

/// The log phase of a request (`dyups.log()`, through LuaJIT's FFI): gives
/// back the connection its last attempt counted, and counts each attempt's
/// response from the `status_len` and `times_len` bytes copied into
/// `LOG_VARS` (0 when the request has no such variable).
pub(super) extern "C" fn dyups_done(request: *const c_void, status_len: u32, times_len: u32) {
    let _ = std::panic::catch_unwind(|| {
        if let Some(w) = WORKER.lock().as_mut() {
            let read = |from: usize, len: u32| {
                LOG_VARS[from..from + (len as usize).min(LOG_VAR_MAX)]
                    .iter()
                    .map(|b| b.load(Ordering::Relaxed))
            };
            w.done_with(
                request as usize,
                read(0, status_len),
                read(LOG_VAR_MAX, times_len),
            );
        }
    });
}

/// A piece of a hash key expression: `$request_uri`, `${host}`, or text.
enum KeyPart {
    Var(String),
    Text(String),
}

/// What the request path evaluates into `KEY` for an upstream: the hash
/// key's parts, the client address for ip_hash (in binary, the bytes
/// nginx's ip_hash reads: no text to parse), nothing for the others.
fn key_parts(policy: &Policy) -> Option<Vec<KeyPart>> {
    match policy {
        Policy::IpHash => Some(vec![KeyPart::Var("binary_remote_addr".into())]),
        Policy::Hash { key, .. } => Some(split_key(key)),
        _ => None,
    }
}

/// Splits an nginx complex value into variables and text, as nginx reads
/// `$name` (letters, digits, `_`) and `${name}`.
fn split_key(key: &str) -> Vec<KeyPart> {
    let mut parts = Vec::new();
    let mut text = String::new();
    let mut rest = key;
    while let Some(at) = rest.find('$') {
        text.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let (name, next) = match after.strip_prefix('{').and_then(|a| a.split_once('}')) {
            Some((name, next)) => (name, next),
            None => {
                let end = after
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(after.len());
                (&after[..end], &after[end..])
            }
        };
        if name.is_empty() {
            text.push('$');
        } else {
            if !text.is_empty() {
                parts.push(KeyPart::Text(std::mem::take(&mut text)));
            }
            parts.push(KeyPart::Var(name.to_owned()));
        }
        rest = next;
    }
    text.push_str(rest);
    if !text.is_empty() {
        parts.push(KeyPart::Text(text));
    }
    parts
}

/// The per-request pick, called through LuaJIT's FFI (see balance.lua):
/// numbers in, an integer out, nothing allocated. `now` is nginx's cached
/// time in seconds (`ngx.now()`).
pub(super) extern "C" fn dyups_pick(
    id: u32,
    seen: u64,
    request: *const c_void,
    retry: i32,
    key_len: u32,
    now: f64,
) -> i32 {
    // Seconds to milliseconds; a clock before 1970 (or NaN) counts as 0.
    let now_ms = (now * 1000.0) as u64;
    let retry = match retry {
        0 => Retry::First,
        1 => Retry::Failed,
        _ => Retry::Next,
    };
    // A panic must not unwind into LuaJIT: it would abort the worker.
    std::panic::catch_unwind(|| {
        let mut guard = WORKER.lock();
        let Some(w) = guard.as_mut() else {
            return UNKNOWN;
        };
        let picked = if key_len == 0 {
            // Round robin and the other keyless methods: nothing to copy.
            w.pick_at(id, seen, request as usize, retry, &[], now_ms)
        } else {
            let mut key = KEY_COPY.lock();
            key.clear();
            let len = (key_len as usize).min(KEY_MAX);
            key.extend(KEY[..len].iter().map(|b| b.load(Ordering::Relaxed)));
            w.pick_at(id, seen, request as usize, retry, &key, now_ms)
        };
        let all_failed = picked == NO_LIVE
            && w.snapshot()
                .table
                .upstreams
                .get(id as usize)
                .is_some_and(|u| crate::health::all_failed(w.store().zone(), u));
        if all_failed {
            NO_LIVE_CHECKS
        } else {
            picked
        }
    })
    .unwrap_or(UNKNOWN)
}
