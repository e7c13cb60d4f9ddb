//! `require "ngx.dyups"`: the Lua face of the core. This layer only checks
//! and converts arguments, reads nginx's request through its Lua API, and
//! turns core errors into Lua's conventions: a programmer's mistake raises
//! (`bad argument #1 to 'update' (string expected, got nil)`), a runtime
//! failure returns `nil, err` (or `status, message` for `update`/`delete`,
//! as ngx_http_dyups_module's Lua API does).
//!
//! It owns what is per process: the configuration `init` was given, this
//! worker's `Worker`, the FFI entry points of the request path. It may use
//! every folder below it (`admin/`, `balance/`, `store/`, `table/`); the
//! decisions are theirs. This file registers the module's functions; the
//! rest, by concern:
//! - `config.rs`: init's options, checked and resolved into a `Config`;
//! - `lifecycle.rs`: `init` (in nginx's master: the state file made or
//!   checked, seeded from the upstream file or nginx.conf), `init_worker`,
//!   the refresh timer, this process's state file;
//! - `read_api.rs`: `version`, `list`, `get`, `peers`, `pending`,
//!   `write_back_status`;
//! - `write_api.rs`: the writing functions, their turn of the writers'
//!   queue, what follows a write (this worker's refresh, the write-back);
//! - `http.rs`: the `/ups`, `/ups/check` and REST content handlers;
//! - `monitoring.rs`: the `/metrics` and `/dashboard` content handlers;
//! - `hot_path.rs`: the balancer's entry points (`resolve`, the FFI pick);
//! - `dns.rs`: host names: the lookups a write needs before its turn, the
//!   resolver's round in the worker that holds the resolver lease;
//! - `probe.rs`: the active health checks' prober on the refresh tick, the
//!   results its probes report, the `check_status` page;
//! - `arguments.rs`, `ngx_api.rs`: Lua arguments, nginx's `ngx` table;
//! - the Lua compiled in: `writes.lua` (the writing functions' public faces:
//!   waiting their turn, the `msync` in nginx's thread pool), `balance.lua`
//!   (the balancer and log phase over the FFI), `dns.lua` (DNS over
//!   cosockets), `probe.lua` (each probe's cosocket), `raise.lua` (which
//!   functions raise their error), `argv.lua` (nginx's command line).

use std::ffi::c_void;

use mlua::{Function, LightUserData, Lua, Table};

mod arguments;
mod config;
mod dns;
mod hot_path;
mod http;
mod lifecycle;
mod monitoring;
mod ngx_api;
mod probe;
mod read_api;
mod write_api;

use config::config;
use hot_path::{
    dyups_current, dyups_done, dyups_pick, resolve, KEY, KEY_MAX, LOG_VARS, LOG_VAR_MAX,
};
use http::{api_reply, api_wants_body, handle_check, ups_failure, ups_reply};
use lifecycle::{init, init_worker};
use read_api::{get, list, peers, pending, version, write_back_status};
use write_api::{delete, set_rotation, update, write_upstreams, TurnHandle};

type LuaResult<T> = mlua::Result<T>;

const VERSION: &str = env!("CARGO_PKG_VERSION");

#[mlua::lua_module(name = "ngx_dyups")]
fn open(lua: &Lua) -> LuaResult<Table> {
    let m = lua.create_table()?;
    m.set("_VERSION", VERSION)?;
    m.set("version", lua.create_function(|_, ()| version())?)?;
    m.set("init", lua.create_function(init)?)?;
    m.set("init_worker", lua.create_function(init_worker)?)?;
    m.set("list", lua.create_function(list)?)?;
    m.set("get", lua.create_function(get)?)?;
    m.set("peers", lua.create_function(peers)?)?;
    m.set("pending", lua.create_function(pending)?)?;
    m.set("handle_check", lua.create_function(handle_check)?)?;
    m.set("metrics", lua.create_function(monitoring::metrics)?)?;
    m.set("dashboard", lua.create_function(monitoring::dashboard)?)?;
    // The writing functions take a turn of the writers' queue first (nil:
    // block); writes.lua gives them their public faces.
    let raw = lua.create_table()?;
    raw.set("turn", lua.create_function(|_, ()| Ok(TurnHandle::new()))?)?;
    raw.set(
        "thread_pool",
        lua.create_function(|_, ()| Ok(config().ok().and_then(|c| c.thread_pool)))?,
    )?;
    raw.set("update", lua.create_function(update)?)?;
    raw.set("delete", lua.create_function(delete)?)?;
    raw.set(
        "add_server",
        lua.create_function(|lua, (turn, a)| set_rotation(lua, turn, a, true))?,
    )?;
    raw.set(
        "remove_server",
        lua.create_function(|lua, (turn, a)| set_rotation(lua, turn, a, false))?,
    )?;
    raw.set("write_upstreams", lua.create_function(write_upstreams)?)?;
    // The HTTP handlers: writes.lua reads the request and sends the answer.
    raw.set("ups", lua.create_function(ups_reply)?)?;
    raw.set(
        "ups_failure",
        lua.create_function(|_, msg: String| Ok(ups_failure(&msg).body))?,
    )?;
    raw.set("api", lua.create_function(api_reply)?)?;
    raw.set("api_wants_body", lua.create_function(api_wants_body)?)?;
    dns::register(lua, &raw)?;
    lua.load(include_str!("writes.lua"))
        .set_name("=ngx.dyups.writes")
        .call::<()>((&m, raw))?;
    m.set("write_back_status", lua.create_function(write_back_status)?)?;
    let pick = LightUserData(dyups_pick as *const () as *mut c_void);
    let current = LightUserData(dyups_current as *const () as *mut c_void);
    let done = LightUserData(dyups_done as *const () as *mut c_void);
    let key = LightUserData(KEY.as_ptr() as *mut c_void);
    let log_vars = LightUserData(LOG_VARS.as_ptr() as *mut c_void);
    let (balance, log): (Function, Function) = lua
        .load(include_str!("balance.lua"))
        .set_name("=ngx.dyups.balance")
        .call((
            pick,
            current,
            done,
            key,
            KEY_MAX,
            lua.create_function(resolve)?,
            log_vars,
            LOG_VAR_MAX,
        ))?;
    m.set("balance", balance)?;
    m.set("log", log)?;
    probe::install(lua, &m)?;
    let raising = [
        "init",
        "init_worker",
        "update",
        "delete",
        "add_server",
        "remove_server",
        "get",
        "peers",
        "write_upstreams",
        "handle_ups",
        "handle_check",
        "handle_api",
        "check_status",
    ];
    lua.load(include_str!("raise.lua"))
        .set_name("=ngx.dyups")
        .call((m, raising))
}
