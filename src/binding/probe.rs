//! The Lua side of active health checks: the per-worker prober driven by the
//! refresh tick, the results the probes report back, and the `check_status`
//! page. The decisions are in [`crate::health`]; the cosockets in
//! `probe.lua`. Each server's target (host, port, request, pool) goes to
//! Lua as one table built once per table generation, and each probe as its
//! token and that table: no table is built per probe.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use mlua::{Function, Lua, Table, Value};
use parking_lot::Mutex;

use super::config::config;
use super::hot_path::WORKER;
use super::ngx_api::{log, ngx};
use super::read_api::with_snapshot;
use super::LuaResult;
use crate::health::status::{render, rows, Filter, Format};
use crate::health::{Job, Prober, MAX_IN_FLIGHT};

/// This worker's prober; `None` until the first tick (a new worker, after a
/// crash or a reload, starts with no probe in flight).
static PROBER: Mutex<Option<Prober>> = Mutex::new(None);

const START: &str = "ngx.dyups.probe.start";

/// The Lua tables of this worker's probe targets, by cell, for the table
/// generation in [`TARGETS_OF`]: each built at a server's first probe under
/// a generation and given to every later one.
const TARGETS: &str = "ngx.dyups.probe.targets";

/// The generation the tables in [`TARGETS`] belong to (`None`: no table).
static TARGETS_OF: Mutex<Option<u64>> = Mutex::new(None);

/// This worker's pid, as the last tick read it: a probe that ends asks for
/// the next one under it without a `getpid` each time (a worker's ticks,
/// after the fork, set it before any probe of it runs).
static PID: AtomicU32 = AtomicU32::new(0);

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Loads `probe.lua` into this VM and adds `check_status` to the module.
pub fn install(lua: &Lua, m: &Table) -> LuaResult<()> {
    let record = lua.create_function(record)?;
    let start: Function = lua
        .load(include_str!("probe.lua"))
        .set_name("=ngx.dyups.probe")
        .call((record, MAX_IN_FLIGHT))?;
    lua.set_named_registry_value(START, start)?;
    m.set("check_status", lua.create_function(check_status)?)?;
    Ok(())
}

/// One tick of the prober (from the refresh timer): starts the probes this
/// worker owns that are due.
pub fn tick(lua: &Lua) -> LuaResult<()> {
    let (jobs, generation) = {
        let guard = WORKER.lock();
        let Some(w) = guard.as_ref() else {
            return Ok(());
        };
        let snap = w.snapshot();
        if !snap.table.upstreams.iter().any(|u| u.check.line.is_some()) {
            return Ok(());
        }
        let store = w.store();
        let live: Vec<u32> = store.workers().iter().map(|w| w.pid).collect();
        let me = std::process::id();
        PID.store(me, Ordering::Relaxed);
        let now = unix_ms();
        let mut prober = PROBER.lock();
        let prober = prober.get_or_insert_with(|| {
            // The refresh timer's period, which runs this tick.
            let tick_ms = config().map_or(50, |c| (c.refresh * 1000.0) as u64);
            Prober::new(now ^ u64::from(me) << 20, MAX_IN_FLIGHT, tick_ms)
        });
        let jobs = prober.due(&snap.table, snap.seen, store.zone(), now, me, &live);
        (jobs, prober.generation())
    };
    if jobs.is_empty() {
        return Ok(());
    }
    // token, target, token, target...
    let list = lua.create_table_with_capacity(jobs.len() * 2, 0)?;
    let targets = targets_of(lua, generation)?;
    for j in jobs {
        list.raw_push(j.token)?;
        list.raw_push(target_table(lua, &targets, &j)?)?;
    }
    let start: Function = lua.named_registry_value(START)?;
    start.call::<()>(list)
}

/// The table of Lua targets for `generation`: a new one when the prober
/// moved to another table generation since the last.
fn targets_of(lua: &Lua, generation: Option<u64>) -> LuaResult<Table> {
    let mut of = TARGETS_OF.lock();
    if *of == generation {
        if let Ok(t) = lua.named_registry_value::<Table>(TARGETS) {
            return Ok(t);
        }
    }
    let t = lua.create_table()?;
    lua.set_named_registry_value(TARGETS, &t)?;
    *of = generation;
    Ok(t)
}

/// Job `j`'s target as `probe.lua` runs it: built at its first probe under
/// this generation, then the same table.
fn target_table(lua: &Lua, targets: &Table, j: &Job) -> LuaResult<Table> {
    let p = &j.target;
    if let Some(t) = targets.raw_get::<Option<Table>>(p.cell)? {
        return Ok(t);
    }
    let t = lua.create_table_with_capacity(0, 10)?;
    t.set("host", p.host.as_str())?;
    t.set("port", p.port)?;
    t.set("timeout", p.timeout_ms)?;
    t.set("tls", p.tls)?;
    t.set("keepalive", p.keepalive)?;
    t.set("idle", p.idle_ms)?;
    t.set("head", p.head)?;
    if let Some(send) = &p.send {
        t.set("send", lua.create_string(send.as_bytes())?)?;
    }
    if p.keepalive > 1 {
        // The cosocket's connect options, the same table for every probe.
        let opts = lua.create_table_with_capacity(0, 1)?;
        opts.set("pool", p.pool.as_str())?;
        t.set("pool_opts", opts)?;
    }
    targets.raw_set(p.cell, &t)?;
    Ok(t)
}

/// `record(token, status, err, elapsed_ms, more)` from `probe.lua`:
/// returns the next probe for the same runner when `more` (a server that
/// waited at the cap) as its token and target, else nothing.
fn record(
    lua: &Lua,
    (token, status, err, elapsed, more): (u64, Option<u16>, Option<String>, u64, bool),
) -> LuaResult<(Option<u64>, Option<Table>)> {
    let (flip, next, generation) = {
        let guard = WORKER.lock();
        let Some(w) = guard.as_ref() else {
            return Ok((None, None));
        };
        let mut prober = PROBER.lock();
        let Some(p) = prober.as_mut() else {
            return Ok((None, None));
        };
        let zone = w.store().zone();
        let now = unix_ms();
        let flip = p.record(zone, token, status, err.as_deref(), elapsed, now);
        let snap = w.snapshot();
        let next = more
            .then(|| {
                p.next(
                    &snap.table,
                    snap.seen,
                    zone,
                    now,
                    PID.load(Ordering::Relaxed),
                )
            })
            .flatten();
        (flip, next, p.generation())
    };
    if let Some(f) = flip {
        let msg = if f.up {
            format!(
                "upstream {} server {} is up after {} passing health checks",
                f.upstream, f.server, f.count
            )
        } else {
            format!(
                "upstream {} server {} is down after {} failed health checks (last: {}{})",
                f.upstream,
                f.server,
                f.count,
                f.outcome.name(),
                err.map_or(String::new(), |e| format!(", {e}"))
            )
        };
        log(lua, "WARN", &msg);
    }
    match next {
        Some(j) => {
            let targets = targets_of(lua, generation)?;
            Ok((Some(j.token), Some(target_table(lua, &targets, &j)?)))
        }
        None => Ok((None, None)),
    }
}

/// The `check_status` content handler (`lua/check_status.lua`):
/// `?format=html|csv|json`, `?status=up|down|checking`.
fn check_status(lua: &Lua, (): ()) -> LuaResult<()> {
    let ngx = ngx(lua).ok_or_else(|| mlua::Error::runtime("not running inside nginx"))?;
    let method: String = ngx
        .get::<Table>("req")?
        .get::<Function>("get_method")?
        .call(())?;
    let args: Table = ngx
        .get::<Table>("req")?
        .get::<Function>("get_uri_args")?
        .call(())?;
    let arg = |name: &str| -> Option<String> {
        match args.get::<Value>(name).ok()? {
            Value::String(s) => Some(s.to_string_lossy()),
            _ => None,
        }
    };
    let header: Table = ngx.get("header")?;
    let parsed = Format::from_arg(arg("format").as_deref())
        .and_then(|f| Ok((f, Filter::from_arg(arg("status").as_deref())?)));
    let (status, content_type, body) = if method != "GET" && method != "HEAD" {
        header.set("Allow", "GET, HEAD")?;
        (
            405,
            "text/plain",
            "check_status takes GET and HEAD\n".to_owned(),
        )
    } else {
        match parsed {
            Err(e) => (400, "text/plain", format!("{e}\n")),
            Ok((format, filter)) => match with_snapshot(|store, snap| {
                render(
                    &rows(&snap.table, store.zone()),
                    snap.version,
                    format,
                    filter,
                )
            }) {
                Ok(body) => (200, format.content_type(), body),
                Err(e) => (500, "text/plain", format!("{e}\n")),
            },
        }
    };
    ngx.set("status", status)?;
    header.set("Content-Type", content_type)?;
    header.set("Cache-Control", "no-cache")?;
    let print: Function = ngx.get("print")?;
    print.call::<Value>(lua.create_string(body.as_bytes())?)?;
    Ok(())
}
