//! `require "ngx.dyups"`: the Lua face of the core. This layer only checks
//! and converts arguments, reads nginx's request through its Lua API, and
//! turns core errors into Lua's conventions: a programmer's mistake raises
//! (`bad argument #1 to 'update' (string expected, got nil)`), a runtime
//! failure returns `nil, err` (or `status, message` for `update`/`delete`,
//! as ngx_http_dyups_module's Lua API does).

use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::sync::atomic::{AtomicU8, Ordering};

use mlua::{
    AnyUserData, Function, IntoLuaMulti, LightUserData, Lua, MultiValue, Table, UserData,
    UserDataMethods, UserDataRefMut, Value, Variadic,
};
use parking_lot::Mutex;

use crate::admin::auth;
use crate::admin::ops;
use crate::admin::rest;
use crate::admin::ups::{self, Arg};
use crate::admin::upstream_file;
use crate::balance::balancer::Retry;
use crate::balance::worker::{Worker, UNKNOWN};
use crate::store::{StateFile, TurnId, TurnState, Wait, WriteOptions};
use crate::table::model::Table as UpstreamTable;
use crate::table::nginx_conf;
use crate::table::policy::Policy;
use crate::table::syntax::{render_server, setting_lines};
use crate::Error;

mod dns;

const VERSION: &str = env!("CARGO_PKG_VERSION");
/// Named defaults of `init`.
const DEFAULT_SIZE: u64 = crate::store::DEFAULT_SIZE;
const DEFAULT_LOCK_TIMEOUT: f64 = 1.0;
const DEFAULT_REFRESH: f64 = 0.05;
/// The nginx thread pool (`thread_pool NAME threads=N;`) durable writes
/// msync in, off the event loop.
const DEFAULT_THREAD_POOL: &str = "dyups";
/// nginx's own default worker user, when `--user` was not given at build.
const NGINX_DEFAULT_USER: &str = "nobody";

type LuaResult<T> = mlua::Result<T>;

/// What `init` was given, resolved. Kept per process: set in the master by
/// `init_by_lua`, inherited by every worker it forks.
#[derive(Clone, Debug)]
struct Config {
    path: PathBuf,
    size: u64,
    upstreams: Option<PathBuf>,
    /// Seed from the balancer blocks of this nginx configuration instead
    /// (init's `nginx_conf`): resolved to the file in nginx's master.
    nginx_conf: Option<NginxConf>,
    write: WriteOptions,
    refresh: f64,
    /// Largest REST request body.
    max_body: usize,
    /// Where to write the table back after each change, if anywhere.
    write_upstreams: Option<PathBuf>,
    /// The bearer token every admin request must carry, if any.
    admin_token: Option<String>,
    /// Whom nginx's master gave the state file to, and why that user: for
    /// the message of a worker that cannot open it.
    owner: Option<(String, String)>,
    /// The nginx thread pool durable writes msync in; `None`: on the event
    /// loop.
    thread_pool: Option<String>,
    /// The resolver of upstreams without a `resolver` line (init's
    /// `resolver`, else `/etc/resolv.conf` as read by `init`).
    dns: crate::dns::Defaults,
}

/// init's `nginx_conf` option.
#[derive(Clone, Debug, PartialEq, Eq)]
enum NginxConf {
    /// `true`: the configuration nginx runs with, found in the master.
    Running,
    File(PathBuf),
}

static CONFIG: Mutex<Option<Config>> = Mutex::new(None);
/// Longest hash key used; longer keys are cut here.
const KEY_MAX: usize = 8192;
/// Where the request path writes a request's evaluated hash key before it
/// calls `dyups_pick` (LuaJIT's ffi.copy into this address). Rust-owned and
/// atomic, so reading it takes no raw pointer.
static KEY: [AtomicU8; KEY_MAX] = [const { AtomicU8::new(0) }; KEY_MAX];
/// The key copied out of `KEY` for one pick; kept to avoid an allocation.
static KEY_COPY: Mutex<Vec<u8>> = Mutex::new(Vec::new());
/// This worker's routing state; the FFI pick reads it on every request.
static WORKER: Mutex<Option<Worker>> = Mutex::new(None);

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
    raw.set("ups", lua.create_function(ups_reply)?)?;
    raw.set("send_ups", lua.create_function(send_ups)?)?;
    raw.set("api", lua.create_function(api_reply)?)?;
    raw.set("send_api", lua.create_function(send_api)?)?;
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
        ))?;
    m.set("balance", balance)?;
    m.set("log", log)?;
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
    ];
    lua.load(include_str!("raise.lua"))
        .set_name("=ngx.dyups")
        .call((m, raising))
}

/// A write's turn in the writers' queue, kept across its calls while the
/// Lua side yields (writes.lua). Dropped unfinished (its coroutine was
/// abandoned), it gives the turn up, flushing what it wrote first.
struct TurnHandle {
    id: TurnId,
    /// The state file the turn was taken in.
    file: Option<std::sync::Arc<StateFile>>,
    /// The answers for the host names the write adds, gathered with
    /// cosockets before its turn (dns.lua).
    answers: Option<crate::table::names::Answers>,
}

impl TurnHandle {
    fn new() -> TurnHandle {
        TurnHandle {
            id: TurnId::new(),
            file: None,
            answers: None,
        }
    }

    /// How a write in this turn on `store` waits, the configured wait
    /// giving its limit.
    fn wait(&mut self, store: &std::sync::Arc<StateFile>, configured: Wait) -> Wait {
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
        // "waiting" | "done" | "held" [, address, length to msync]
        methods.add_method("state", |_, this, ()| {
            let state = this.file.as_ref().map(|f| f.turn_state(this.id));
            Ok(match state {
                None | Some(TurnState::Done) => ("done", None, None),
                Some(TurnState::Waiting) => ("waiting", None, None),
                Some(TurnState::Held { flush }) => (
                    "held",
                    flush.map(|(at, _)| LightUserData(at as *mut c_void)),
                    flush.map(|(_, len)| len),
                ),
            })
        });
        methods.add_method_mut("set_answers", |_, this, a: AnyUserData| {
            this.answers = Some(a.borrow::<dns::AnswersHandle>()?.0.clone());
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

type Turn = Option<UserDataRefMut<TurnHandle>>;

// ---- arguments ---------------------------------------------------------------

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Integer(_) | Value::Number(_) => "number",
        v => v.type_name(),
    }
}

fn bad_argument(n: usize, f: &str, want: &str, got: &Value) -> mlua::Error {
    mlua::Error::runtime(format!(
        "bad argument #{n} to '{f}' ({want} expected, got {})",
        type_name(got)
    ))
}

fn nil() -> Value {
    Value::Nil
}

/// Argument `n` (1-based) as a string; a number is not a string here.
fn string_arg(args: &[Value], n: usize, f: &str) -> LuaResult<String> {
    match args.get(n - 1) {
        Some(Value::String(s)) => Ok(String::from_utf8_lossy(&s.as_bytes()).into_owned()),
        other => Err(bad_argument(n, f, "string", other.unwrap_or(&nil()))),
    }
}

fn opt_string_arg(args: &[Value], n: usize, f: &str) -> LuaResult<Option<String>> {
    match args.get(n - 1) {
        None | Some(Value::Nil) => Ok(None),
        _ => string_arg(args, n, f).map(Some),
    }
}

/// The optional expected table version of a write.
fn expect_arg(args: &[Value], n: usize, f: &str) -> LuaResult<Option<u64>> {
    match args.get(n - 1) {
        None | Some(Value::Nil) => Ok(None),
        Some(Value::Integer(i)) if *i >= 0 => Ok(Some(*i as u64)),
        Some(Value::Number(x)) if *x >= 0.0 && x.fract() == 0.0 => Ok(Some(*x as u64)),
        Some(v) => Err(bad_argument(n, f, "version number", v)),
    }
}

// ---- nginx ---------------------------------------------------------------------

/// The `ngx` table, when running inside nginx.
fn ngx(lua: &Lua) -> Option<Table> {
    lua.globals().get::<Option<Table>>("ngx").ok().flatten()
}

/// The current nginx phase, or `None` outside nginx.
fn phase(lua: &Lua) -> Option<String> {
    let f: Function = ngx(lua)?.get("get_phase").ok()?;
    f.call::<String>(()).ok()
}

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

fn log(lua: &Lua, level: &str, msg: &str) {
    if let Some(ngx) = ngx(lua) {
        if let (Ok(log), Ok(lvl)) = (ngx.get::<Function>("log"), ngx.get::<Value>(level)) {
            let _ = log.call::<()>((lvl, "ngx.dyups: ", msg));
        }
    }
}

/// Resolves a relative path against nginx's prefix (as nginx does for its
/// own paths), or the working directory outside nginx.
fn resolve_path(lua: &Lua, p: &str) -> PathBuf {
    let path = Path::new(p);
    if path.is_absolute() {
        return path.to_path_buf();
    }
    let prefix = ngx(lua)
        .and_then(|n| n.get::<Table>("config").ok())
        .and_then(|c| c.get::<Function>("prefix").ok())
        .and_then(|f| f.call::<String>(()).ok());
    match prefix {
        Some(prefix) => Path::new(&prefix).join(path),
        None => path.to_path_buf(),
    }
}

// ---- init ----------------------------------------------------------------------

fn size_option(v: Value) -> Result<u64, String> {
    let parse = crate::store::parse_size;
    match v {
        Value::Nil => Ok(DEFAULT_SIZE),
        Value::Integer(i) if i > 0 => Ok(i as u64),
        Value::Number(x) if x > 0.0 && x.fract() == 0.0 => Ok(x as u64),
        Value::String(s) => {
            let s = s.to_string_lossy();
            parse(&s)
                .ok_or_else(|| format!("size {s:?} is not a size (e.g. 1048576, \"512k\", \"4m\")"))
        }
        v => Err(format!(
            "size must be a number of bytes or a string like \"4m\", not a {}",
            type_name(&v)
        )),
    }
}

fn seconds_option(v: Value, name: &str, default: f64) -> Result<f64, String> {
    match v {
        Value::Nil => Ok(default),
        Value::Integer(i) if i >= 0 => Ok(i as f64),
        Value::Number(x) if x >= 0.0 && x.is_finite() => Ok(x),
        v => Err(format!(
            "{name} must be a non-negative number of seconds, not {}",
            type_name(&v)
        )),
    }
}

fn parse_config(lua: &Lua, opts: &Table) -> Result<(Config, Option<String>), String> {
    let path = match opts.get::<Value>("path").map_err(|e| e.to_string())? {
        Value::String(s) if !s.as_bytes().is_empty() => resolve_path(lua, &s.to_string_lossy()),
        v => {
            return Err(format!(
                "option path must be the state file's path, not {}",
                type_name(&v)
            ))
        }
    };
    let size = size_option(opts.get("size").unwrap_or(Value::Nil))?;
    let upstreams = match opts.get::<Value>("upstreams").map_err(|e| e.to_string())? {
        Value::Nil => None,
        Value::String(s) => Some(resolve_path(lua, &s.to_string_lossy())),
        v => {
            return Err(format!(
                "option upstreams must be a file path, not {}",
                type_name(&v)
            ))
        }
    };
    let nginx_conf = match opts.get::<Value>("nginx_conf").map_err(|e| e.to_string())? {
        Value::Nil | Value::Boolean(false) => None,
        Value::Boolean(true) => Some(NginxConf::Running),
        Value::String(s) if !s.as_bytes().is_empty() => {
            Some(NginxConf::File(resolve_path(lua, &s.to_string_lossy())))
        }
        v => {
            return Err(format!(
            "option nginx_conf must be true (the configuration nginx runs with) or a path, not {}",
            type_name(&v)
        ))
        }
    };
    if nginx_conf.is_some() && upstreams.is_some() {
        return Err(
            "give upstreams (an upstream file) or nginx_conf (the upstream blocks of nginx.conf), not both"
                .into(),
        );
    }
    let lock_timeout = seconds_option(
        opts.get("lock_timeout").unwrap_or(Value::Nil),
        "lock_timeout",
        DEFAULT_LOCK_TIMEOUT,
    )?;
    let refresh = seconds_option(
        opts.get("refresh").unwrap_or(Value::Nil),
        "refresh",
        DEFAULT_REFRESH,
    )?;
    if refresh <= 0.0 {
        return Err("refresh must be more than 0 seconds".into());
    }
    let flag = |name: &str, default: bool| -> Result<bool, String> {
        match opts.get::<Value>(name).unwrap_or(Value::Nil) {
            Value::Nil => Ok(default),
            Value::Boolean(b) => Ok(b),
            v => Err(format!(
                "option {name} must be a boolean, not {}",
                type_name(&v)
            )),
        }
    };
    let wait = if flag("trylock", false)? {
        Wait::Try
    } else {
        Wait::For(Duration::from_secs_f64(lock_timeout))
    };
    let user = match opts.get::<Value>("user").unwrap_or(Value::Nil) {
        Value::Nil => None,
        Value::String(s) => Some(s.to_string_lossy()),
        v => {
            return Err(format!(
                "option user must be a user name, not {}",
                type_name(&v)
            ))
        }
    };
    let write = WriteOptions {
        wait,
        expect: None,
        durable: flag("durable", true)?,
    };
    let thread_pool = match opts.get::<Value>("thread_pool").unwrap_or(Value::Nil) {
        Value::Nil => Some(DEFAULT_THREAD_POOL.to_owned()),
        Value::Boolean(false) => None,
        Value::String(s) if !s.as_bytes().is_empty() => Some(s.to_string_lossy()),
        v => {
            return Err(format!(
                "option thread_pool must be the name of an nginx thread_pool or false, not {}",
                type_name(&v)
            ))
        }
    };
    let max_body = match opts.get::<Value>("max_body").unwrap_or(Value::Nil) {
        Value::Nil => rest::DEFAULT_MAX_BODY,
        v => size_option(v).map_err(|e| format!("max_body: {e}"))? as usize,
    };
    let write_upstreams = match opts.get::<Value>("write_upstreams").unwrap_or(Value::Nil) {
        Value::Nil | Value::Boolean(false) => None,
        Value::Boolean(true) if nginx_conf.is_some() => {
            return Err("write_upstreams = true writes back to the upstreams file, and nginx_conf has none: give the path of a file nginx does not include"
                .into())
        }
        Value::Boolean(true) => Some(
            upstreams
                .clone()
                .ok_or("write_upstreams = true needs the upstreams option (the file to write)")?,
        ),
        Value::String(s) => Some(resolve_path(lua, &s.to_string_lossy())),
        v => {
            return Err(format!(
                "option write_upstreams must be a path or a boolean, not {}",
                type_name(&v)
            ))
        }
    };
    let admin_token = match (
        opts.get::<Value>("admin_token").unwrap_or(Value::Nil),
        opts.get::<Value>("admin_token_file").unwrap_or(Value::Nil),
    ) {
        (Value::Nil, Value::Nil) => None,
        (Value::String(t), Value::Nil) if !t.as_bytes().is_empty() => Some(t.to_string_lossy()),
        (Value::Nil, Value::String(p)) => Some(auth::read_token_file(&resolve_path(
            lua,
            &p.to_string_lossy(),
        ))?),
        (Value::Nil, v) => {
            return Err(format!(
                "option admin_token_file must be a path, not {}",
                type_name(&v)
            ))
        }
        (Value::String(_), Value::Nil) => return Err("option admin_token is empty".into()),
        (Value::String(_), _) => {
            return Err("give admin_token or admin_token_file, not both".into())
        }
        (v, _) => {
            return Err(format!(
                "option admin_token must be a string, not {}",
                type_name(&v)
            ))
        }
    };
    Ok((
        Config {
            path,
            size,
            upstreams,
            nginx_conf,
            write,
            refresh,
            max_body,
            write_upstreams,
            admin_token,
            owner: None,
            thread_pool,
            dns: dns::defaults_option(opts)?,
        },
        user,
    ))
}

/// The table a new state file starts with, its host names resolved (with
/// the blocking client: nginx itself blocks on names when it reads its
/// configuration).
fn seed(cfg: &Config) -> crate::Result<UpstreamTable> {
    let mut table = seed_as_written(cfg)?;
    crate::dns::resolve_blocking(&mut table, &cfg.dns)?;
    Ok(table)
}

fn seed_as_written(cfg: &Config) -> crate::Result<UpstreamTable> {
    match (&cfg.nginx_conf, &cfg.upstreams) {
        (Some(NginxConf::File(conf)), _) => nginx_configuration(conf)
            .map_err(Error::BadRequest)?
            .balanced_table(),
        (Some(NginxConf::Running), _) => Err(Error::BadRequest(
            "nginx_conf = true reads the configuration nginx runs with: outside nginx, give its path"
                .into(),
        )),
        (None, Some(file)) => upstream_file::read(file),
        (None, None) => Ok(UpstreamTable::default()),
    }
}

/// Reads nginx's configuration at `conf` from the file system.
fn nginx_configuration(conf: &Path) -> Result<nginx_conf::Configuration, String> {
    nginx_conf::read_configuration(conf, &read_text, &list_dir)
}

fn read_text(p: &Path) -> Option<String> {
    std::fs::read_to_string(p).ok()
}

fn list_dir(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// `dyups.init{ path = ..., size = ..., upstreams = ... }`.
fn init(lua: &Lua, opts: Value) -> LuaResult<Result<bool, String>> {
    let Value::Table(opts) = opts else {
        return Err(bad_argument(1, "init", "table", &opts));
    };
    let (mut cfg, user) = match parse_config(lua, &opts) {
        Ok(c) => c,
        Err(e) => return Err(mlua::Error::runtime(format!("dyups.init: {e}"))),
    };
    let checked = if phase(lua).as_deref() == Some("init") {
        // nginx's master: check (and create, as root for the workers' user)
        // without keeping anything open across fork.
        prepare_in_master(lua, &mut cfg, user)
    } else {
        StateFile::open(&cfg.path, cfg.size, || seed(&cfg)).map(drop)
    };
    if let Err(e) = checked {
        return Ok(Err(e.to_string()));
    }
    *CONFIG.lock() = Some(cfg);
    Ok(Ok(true))
}

fn prepare_in_master(lua: &Lua, cfg: &mut Config, user: Option<String>) -> crate::Result<()> {
    let root = crate::store::effective_uid() == 0;
    let (user, why) = match user {
        Some(u) => (u, "init's user option".to_owned()),
        None => worker_user(lua),
    };
    if root {
        log(
            lua,
            "NOTICE",
            &format!(
                "state file {} is for user {user} ({why})",
                cfg.path.display()
            ),
        );
        cfg.owner = Some((user.clone(), why));
    }
    let running = running_configuration(lua).2;
    if cfg.nginx_conf == Some(NginxConf::Running) {
        cfg.nginx_conf = Some(NginxConf::File(running.clone()));
    }
    // What nginx itself reads, to refuse what would bypass ngx.dyups.
    let nginx = nginx_configuration(&running)
        .inspect_err(|e| {
            log(
                lua,
                "WARN",
                &format!("not checked against nginx's configuration: {e}"),
            )
        })
        .ok();
    if let (Some(nginx), Some(path)) = (&nginx, &cfg.write_upstreams) {
        if let Some(how) = nginx.reads(path) {
            return Err(Error::BadRequest(format!(
                "write_upstreams {}: {how}. nginx would take the upstreams written there for \
                 upstream blocks of its own, without balancer_by_lua_*: after the next reload \
                 they would ignore every change made through ngx.dyups, and one named like an \
                 upstream block of nginx.conf would fail the reload (duplicate upstream). Write \
                 the table back to a file nginx does not include",
                path.display()
            )));
        }
    }
    // Directories we make are the workers': they write temporary files there.
    let dirs = std::iter::once(&cfg.path).chain(cfg.write_upstreams.iter());
    for dir in dirs.filter_map(|p| p.parent()) {
        if !dir.as_os_str().is_empty() && !dir.exists() {
            // 0755 whatever the umask (a daemonized nginx has umask 0): a
            // directory others may write is one where they can replace the
            // state file.
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir)
                .map_err(|e| {
                    Error::Internal(format!("could not create directory {}: {e}", dir.display()))
                })?;
            if root {
                crate::store::give_to_user(dir, &user)?;
            }
        }
    }
    let source = seed_source(cfg);
    match StateFile::inspect(&cfg.path)? {
        Some(snap) => {
            if let Some(why) = &snap.fallback {
                log(lua, "WARN", why);
            }
            check_native(nginx.as_ref(), &snap.table)?;
            // Connections counted by the workers of an nginx that is gone
            // (killed in the middle of requests) would weigh forever.
            if let Err(e) = StateFile::clear_connections_at(&cfg.path) {
                log(lua, "WARN", &format!("connection counts kept: {e}"));
            }
            if let Some(source) = &source {
                apply_seed_changes(lua, cfg, source, nginx.as_ref())?;
            }
        }
        None => {
            // Made here rather than by the first worker so that a bad
            // upstream file stops nginx from starting, with the reason.
            let table = seed(cfg)?;
            check_native(nginx.as_ref(), &table)?;
            StateFile::open_detached(&cfg.path, cfg.size, || Ok(table.clone()))?;
            if let Some(source) = &source {
                log(
                    lua,
                    "NOTICE",
                    &format!(
                        "state file {} made from {}: {} upstreams",
                        cfg.path.display(),
                        source.name,
                        table.upstreams.len()
                    ),
                );
                if let Err(e) = crate::admin::seed::write_record(&cfg.path, &source.name, &table) {
                    log(
                        lua,
                        "WARN",
                        &format!("{e}: a reload cannot tell what changed in {}", source.name),
                    );
                }
            }
        }
    }
    if root {
        crate::store::give_to_user(&cfg.path, &user)?;
        let record = crate::admin::seed::record_path(&cfg.path);
        if record.exists() {
            if let Err(e) = crate::store::give_to_user(&record, &user) {
                log(lua, "WARN", &e.to_string());
            }
        }
        // A copy made by another writer running as root would refuse the
        // workers' writes (they go on, but without a copy). Never fatal: a
        // copy is a second line of defence, not a condition to start.
        let copy = crate::store::copy_path_for(&cfg.path);
        if copy.exists() {
            if let Err(e) = crate::store::give_to_user(&copy, &user) {
                log(lua, "WARN", &e.to_string());
            }
        }
    }
    Ok(())
}

/// Where `init` seeds from, when anywhere.
struct SeedSource {
    /// For messages and the record: `upstream file PATH`, `nginx
    /// configuration PATH`.
    name: String,
    file: PathBuf,
    /// Whether the file is the one the table is written back to.
    written_back: bool,
    nginx_conf: bool,
}

fn seed_source(cfg: &Config) -> Option<SeedSource> {
    match (&cfg.nginx_conf, &cfg.upstreams) {
        (Some(NginxConf::File(conf)), _) => Some(SeedSource {
            name: format!("nginx configuration {}", conf.display()),
            file: conf.clone(),
            written_back: false,
            nginx_conf: true,
        }),
        (None, Some(file)) => Some(SeedSource {
            name: format!("upstream file {}", file.display()),
            file: file.clone(),
            written_back: cfg.write_upstreams.as_ref() == Some(file),
            nginx_conf: false,
        }),
        _ => None,
    }
}

/// Refuses a table upstream that nginx's configuration also defines as a
/// block it balances itself: `proxy_pass http://NAME` would go to that
/// block, and nothing ngx.dyups does to NAME would reach it.
fn check_native(
    nginx: Option<&nginx_conf::Configuration>,
    table: &UpstreamTable,
) -> crate::Result<()> {
    let Some(nginx) = nginx else {
        return Ok(());
    };
    for name in table.names() {
        if let Some(b) = nginx.native_block(name) {
            return Err(Error::BadRequest(format!(
                "upstream {name} of ngx.dyups is also an upstream block that nginx balances \
                 itself ({} line {}: it has no balancer_by_lua_*): `proxy_pass http://{}` would \
                 ignore every change made to it. Add `balancer_by_lua_file \
                 .../ngx/dyups/upstream.lua;` to that block, or remove the block (or the \
                 `include` that reads it)",
                b.file.display(),
                b.line,
                b.name
            )));
        }
    }
    Ok(())
}

/// At a start or reload with a state file: applies what changed in the
/// seed since it was last read, as one write, and logs what it did.
fn apply_seed_changes(
    lua: &Lua,
    cfg: &Config,
    source: &SeedSource,
    nginx: Option<&nginx_conf::Configuration>,
) -> crate::Result<()> {
    use crate::admin::seed::{Outcome, Reading};
    if !source.file.exists() {
        log(
            lua,
            "WARN",
            &format!(
                "{} is missing: nothing applied from it; the state file's table is kept",
                source.name
            ),
        );
        return Ok(());
    }
    let read = || -> crate::Result<Reading> {
        let reading = if source.nginx_conf {
            Reading {
                table: seed_as_written(cfg)?,
                stamp: None,
            }
        } else {
            let (table, stamp) = upstream_file::read_stamped(&source.file)?;
            Reading {
                table,
                stamp: stamp.filter(|_| source.written_back),
            }
        };
        check_native(nginx, &reading.table)?;
        Ok(reading)
    };
    let resolve = |t: &mut UpstreamTable| crate::dns::resolve_blocking(t, &cfg.dns);
    match crate::admin::seed::at_start(&cfg.path, &source.name, &read, &resolve, &cfg.write)? {
        Outcome::Unchanged => {}
        Outcome::Applied { version, what } => log(
            lua,
            "NOTICE",
            &format!(
                "{} changed since nginx last read it: applied as table version {version}: {what}",
                source.name
            ),
        ),
        Outcome::Recorded { version } => log(
            lua,
            "NOTICE",
            &format!(
                "{}: its upstreams are recorded in {}; the state file's table (version \
                 {version}) is kept; from now on a reload applies what changes in it",
                source.name,
                crate::admin::seed::record_path(&cfg.path).display()
            ),
        ),
        Outcome::Behind { written, version } => log(
            lua,
            "WARN",
            &format!(
                "{} holds table version {written} and the table is at version {version} (a \
                 write-back failed): nothing applied from it; the next change writes it whole",
                source.name
            ),
        ),
    }
    Ok(())
}

/// The user nginx's workers will run as, and where that was found: the
/// `user` directive of nginx's configuration (read as nginx reads it: `-g`,
/// then the file of `-c` or the built-in one, with its `include`s), else
/// the user nginx was built with, else nginx's default.
fn worker_user(lua: &Lua) -> (String, String) {
    let (cmd, configure, conf) = running_configuration(lua);
    if let Some(user) =
        nginx_conf::worker_user(cmd.globals.as_deref(), &conf, &read_text, &list_dir)
    {
        return (user, format!("the `user` directive of {}", conf.display()));
    }
    match configure
        .split_whitespace()
        .find_map(|a| a.strip_prefix("--user="))
    {
        Some(user) => (
            user.to_owned(),
            format!("no `user` directive in {}; nginx's --user", conf.display()),
        ),
        None => (
            NGINX_DEFAULT_USER.to_owned(),
            format!("no `user` directive in {}; nginx's default", conf.display()),
        ),
    }
}

/// nginx's command line, its `configure` arguments, and the configuration
/// file it runs with (`-c`, or the one it was built with).
fn running_configuration(lua: &Lua) -> (nginx_conf::CommandLine, String, PathBuf) {
    let config = ngx(lua).and_then(|n| n.get::<Table>("config").ok());
    let call = |name: &str| {
        config
            .as_ref()
            .and_then(|c| c.get::<Function>(name).ok())
            .and_then(|f| f.call::<String>(()).ok())
            .unwrap_or_default()
    };
    let configure = call("nginx_configure");
    let prefix = call("prefix");
    // nginx's own copy of its arguments; /proc when the binary hides it.
    let args = lua
        .load(include_str!("argv.lua"))
        .set_name("=ngx.dyups.argv")
        .call::<Option<Vec<String>>>(())
        .ok()
        .flatten()
        .or_else(|| {
            std::fs::read("/proc/self/cmdline")
                .ok()
                .map(|c| nginx_conf::args_of_cmdline(&c))
        })
        .unwrap_or_default();
    let cmd = nginx_conf::command_line(&args);
    let conf = nginx_conf::conf_file(&cmd, &configure, Path::new(&prefix));
    (cmd, configure, conf)
}

/// What to add to a worker's failure to open the state file when it runs
/// as someone else than the user the master gave the file to.
fn owner_hint(cfg: &Config) -> String {
    let Some((user, why)) = &cfg.owner else {
        return String::new();
    };
    let me = crate::store::effective_uid();
    if crate::store::user_ids(user).is_some_and(|(uid, _)| uid == me) {
        return String::new();
    }
    format!(
        "; nginx's master gave it to user {user} ({why}), but this worker runs as uid {me}: \
         set dyups.init{{ user = \"...\" }} to the user of nginx's `user` directive"
    )
}

fn config() -> Result<Config, String> {
    CONFIG.lock().clone().ok_or_else(|| {
        "ngx.dyups is not initialised: call dyups.init{...} in init_by_lua first".to_owned()
    })
}

/// `dyups.init_worker()`: opens the state file in this worker, registers it
/// for `/ups/check`, and starts the refresh timer.
fn init_worker(lua: &Lua, (): ()) -> LuaResult<Result<bool, String>> {
    let cfg = match config() {
        Ok(c) => c,
        Err(e) => return Ok(Err(e)),
    };
    let started = (|| {
        let store = StateFile::open(&cfg.path, cfg.size, || seed(&cfg))?;
        let mut w = Worker::new(store)?;
        w.register(std::process::id())?;
        *WORKER.lock() = Some(w);
        Ok::<_, Error>(())
    })();
    if let Err(e) = started {
        return Ok(Err(format!("{e}{}", owner_hint(&cfg))));
    }
    if let Some(ngx) = ngx(lua) {
        let every: Function = ngx.get::<Table>("timer")?.get("every")?;
        let tick = lua.create_function(tick)?;
        // ngx.timer takes Lua functions only, not C closures like `tick`.
        // The resolver's round follows each tick: it only acts in the
        // worker that holds the resolver lease (dns.lua).
        let round: Function = dns::round(lua)?;
        let (ok, err): (Value, Option<String>) = lua
            .load(
                "local every, interval, tick, round = ... \
                 return every(interval, function(p) tick(p) round(p) end)",
            )
            .set_name("=ngx.dyups.timer")
            .call((every, cfg.refresh, tick, round))?;
        if ok.is_nil() {
            return Ok(Err(format!(
                "could not start the refresh timer: {}",
                err.unwrap_or_default()
            )));
        }
    }
    Ok(Ok(true))
}

/// The refresh timer: catches up with the file even when no request comes,
/// so `/ups/check` empties without traffic. A premature run means the worker
/// is exiting: it stops counting as a worker that has to apply changes.
fn tick(lua: &Lua, premature: bool) -> LuaResult<()> {
    let mut guard = WORKER.lock();
    let Some(w) = guard.as_mut() else {
        return Ok(());
    };
    if premature {
        w.unregister(std::process::id());
        return Ok(());
    }
    let file = w.check_file(std::process::id());
    let quiet = w.take_file_notice();
    let copy = w.store().copy_trouble();
    let no_log_hook = w.counted > NO_LOG_HOOK_AFTER && !w.done_seen && !w.warned;
    w.warned |= no_log_hook;
    let had = w.error.clone();
    let failed = w.refresh().is_err() && w.error != had;
    let error = w.error.clone().filter(|_| failed);
    let notice = w.take_notice();
    drop(guard);
    if let Some(msg) = error {
        log(
            lua,
            "ERR",
            &format!("{msg}; routing by the last table read"),
        );
    }
    if let Some(msg) = notice {
        log(lua, "WARN", &msg);
    }
    for msg in [quiet, file].into_iter().flatten() {
        log(lua, "ERR", &msg);
    }
    if let Some(msg) = copy {
        log(lua, "ERR", &msg);
    }
    if no_log_hook {
        log(
            lua,
            "WARN",
            "least_conn and random two count each request's connection until the request ends, \
             and no request's end was reported: add `log_by_lua_block { require(\"ngx.dyups\").log() }` \
             to http{}",
        );
    }
    Ok(())
}

/// Connections counted without a request's end reported before the timer
/// warns that the log-phase hook is missing: more than can be in flight at
/// once in a quiet worker.
const NO_LOG_HOOK_AFTER: u64 = 1000;

// ---- reading ---------------------------------------------------------------------

/// Runs `f` on the freshest table this process can see: the worker's (after
/// catching up) inside nginx, a direct read outside it.
fn with_snapshot<T>(f: impl FnOnce(&StateFile, &crate::store::Snapshot) -> T) -> Result<T, String> {
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
    let store = StateFile::open(&cfg.path, cfg.size, || seed(&cfg)).map_err(|e| e.to_string())?;
    let snap = store.read().map_err(|e| e.to_string())?;
    Ok(f(&store, &snap))
}

// The reading functions return only their value on success and `nil, err`
// on failure (mlua turns an inner `Err` into those two values), so
// `ngx.say("version ", dyups.version())` prints the version alone.

fn version() -> LuaResult<Result<u64, String>> {
    Ok(with_snapshot(|_, s| s.version))
}

fn list(lua: &Lua, (): ()) -> LuaResult<Result<Table, String>> {
    match with_snapshot(|_, s| s.table.names().map(str::to_owned).collect::<Vec<_>>()) {
        Ok(names) => Ok(Ok(lua.create_sequence_from(names)?)),
        Err(e) => Ok(Err(e)),
    }
}

fn get(lua: &Lua, args: Variadic<Value>) -> LuaResult<Result<Table, String>> {
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
        t.set("names", dns::names_table(lua, &u)?)?;
    }
    t.set("servers", servers)?;
    Ok(Ok(t))
}

/// `dyups.peers(name)`: each server's shared state, as every worker sees
/// it: `{ server, conns, fails, shared }` in table order.
fn peers(lua: &Lua, args: Variadic<Value>) -> LuaResult<Result<Table, String>> {
    let name = string_arg(&args, 1, "peers")?;
    let found = with_snapshot(|store, s| {
        s.table
            .get(&name)
            .map(|u| crate::store::zone::status(store.zone(), u))
    });
    let list = match found {
        Ok(Some(list)) => list,
        Ok(None) => return Ok(Err("not found".into())),
        Err(e) => return Ok(Err(e)),
    };
    let out = lua.create_table()?;
    for p in list {
        let t = lua.create_table()?;
        t.set("server", p.server)?;
        t.set("conns", p.conns)?;
        t.set("fails", p.fails)?;
        t.set("shared", p.shared)?;
        out.push(t)?;
    }
    Ok(Ok(out))
}

fn pending(lua: &Lua, (): ()) -> LuaResult<Result<Table, String>> {
    match with_snapshot(|store, s| ups::pending_servers(&store.pending(s))) {
        Ok(map) => Ok(Ok(lua.create_table_from(map)?)),
        Err(e) => Ok(Err(e)),
    }
}

// ---- writing ---------------------------------------------------------------------

/// The state file of this process: the worker's, or (outside nginx) opened
/// from the configuration.
fn store() -> crate::Result<(Config, std::sync::Arc<StateFile>)> {
    let cfg = config().map_err(Error::Internal)?;
    let store = match WORKER.lock().as_mut() {
        Some(w) => {
            // Moves to a file restored or replaced since the last tick, so
            // a write lands in the file at the path.
            w.check_file_quietly(std::process::id());
            w.store().clone()
        }
        None => StateFile::open(&cfg.path, cfg.size, || seed(&cfg))
            .map_err(|e| Error::Internal(format!("{e}{}", owner_hint(&cfg))))?,
    };
    Ok((cfg, store))
}

/// This process's last failure to write the table back, until a write-back
/// succeeds: what `dyups.write_back_status()` reports while the file is
/// behind the table.
static WRITE_BACK_ERROR: Mutex<Option<String>> = Mutex::new(None);

/// After a successful write: this worker routes by the result at once, and
/// the upstream file is written back when so configured. Returns how the
/// write-back went (`None` when there is none): the change stands either
/// way, as the state file has it.
fn after_write(
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
    Some(outcome)
}

/// The response header that tells an HTTP client how the write-back of its
/// change went: `ok`, or `failed: REASON`.
const WRITE_BACK_HEADER: &str = "X-Dyups-Write-Back";

fn announce_write_back(lua: &Lua, outcome: Option<Result<u64, String>>) -> LuaResult<()> {
    let Some(outcome) = outcome else {
        return Ok(());
    };
    let value = match outcome {
        Ok(_) => "ok".to_owned(),
        // A header value is one line of visible characters.
        Err(e) => format!("failed: {e}").replace(|c: char| c.is_control(), " "),
    };
    let ngx = ngx(lua).ok_or_else(|| mlua::Error::runtime("not running inside nginx"))?;
    ngx.get::<Table>("header")?.set(WRITE_BACK_HEADER, value)
}

/// `dyups.write_back_status()`: the upstream file the table is written back
/// to and whether it holds the current table →
/// `{ path, version, written, error }` | `nil, err`.
fn write_back_status(lua: &Lua, (): ()) -> LuaResult<Result<Table, String>> {
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

/// The state file of this process and how a write in `turn` on it waits
/// (without a turn: as configured, blocking).
fn store_in(turn: &mut Turn) -> crate::Result<(Config, std::sync::Arc<StateFile>, Wait)> {
    let (cfg, store) = store()?;
    let wait = match turn {
        Some(t) => t.wait(&store, cfg.write.wait),
        None => cfg.write.wait,
    };
    Ok((cfg, store, wait))
}

/// Runs one write through the store with the configured options, in `turn`.
fn write<R>(
    lua: &Lua,
    turn: &mut Turn,
    expect: Option<u64>,
    change: impl Fn(&mut UpstreamTable) -> crate::Result<R>,
) -> crate::Result<(u64, R)> {
    let (cfg, store, wait) = store_in(turn)?;
    let answers = dns::answers_for(turn, &cfg, |t| change(t).map(drop));
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
fn update(lua: &Lua, (mut turn, args): (Turn, Variadic<Value>)) -> LuaResult<(u16, String)> {
    let name = string_arg(&args, 1, "update")?;
    let body = string_arg(&args, 2, "update")?;
    let expect = expect_arg(&args, 3, "update")?;
    check_write_phase(lua, "update")?;
    Ok(status_message(write(lua, &mut turn, expect, |t| {
        ops::update(t, &name, &body)
    })))
}

/// `dyups.delete(name [, version])` → `status, message`.
fn delete(lua: &Lua, (mut turn, args): (Turn, Variadic<Value>)) -> LuaResult<(u16, String)> {
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
fn set_rotation(
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

// ---- content handlers --------------------------------------------------------------

/// One query argument from `ngx.req.get_uri_args()`.
fn query_arg(args: &Table, name: &str) -> Arg {
    match args.get::<Value>(name).unwrap_or(Value::Nil) {
        Value::Nil => Arg::Absent,
        Value::Boolean(_) => Arg::Flag,
        Value::String(s) => Arg::One(s.to_string_lossy()),
        _ => Arg::Many,
    }
}

/// Checks the admin token, when one is configured; logs a refusal with the
/// client's address.
fn authorize(lua: &Lua) -> LuaResult<Result<(), auth::Refusal>> {
    let Some(token) = config().ok().and_then(|c| c.admin_token) else {
        return Ok(Ok(()));
    };
    let var: Table = ngx(lua)
        .ok_or_else(|| mlua::Error::runtime("not running inside nginx"))?
        .get("var")?;
    let header = var
        .get::<Option<mlua::LuaString>>("http_authorization")?
        .map(|h| h.to_string_lossy());
    let verdict = auth::check(&token, header.as_deref());
    if let Err(why) = verdict {
        let client = var
            .get::<Option<mlua::LuaString>>("remote_addr")?
            .map(|c| c.to_string_lossy());
        log(
            lua,
            "WARN",
            &format!(
                "refused an admin request from {}: {}",
                client.unwrap_or_default(),
                why.message()
            ),
        );
    }
    Ok(verdict)
}

fn unauthorized_json(why: auth::Refusal) -> ups::Reply {
    ups::Reply {
        status: 401,
        body: serde_json::json!({"msg": why.message(), "data": [], "code": ups::FAILED})
            .to_string(),
    }
}

fn respond(lua: &Lua, reply: ups::Reply) -> LuaResult<()> {
    let ngx = ngx(lua).ok_or_else(|| mlua::Error::runtime("not running inside nginx"))?;
    ngx.set("status", reply.status)?;
    let header: Table = ngx.get("header")?;
    header.set("Content-Type", "application/json")?;
    if reply.status == 405 {
        header.set("Allow", ups::ALLOWED)?;
    }
    if reply.status == 401 {
        header.set("WWW-Authenticate", "Bearer realm=\"ngx.dyups\"")?;
    }
    let say: Function = ngx.get("say")?;
    say.call::<Value>(reply.body)?;
    Ok(())
}

fn method(lua: &Lua) -> LuaResult<String> {
    let ngx = ngx(lua).ok_or_else(|| mlua::Error::runtime("not running inside nginx"))?;
    ngx.get::<Table>("req")?
        .get::<Function>("get_method")?
        .call(())
}

/// The answer of one `/ups` request, sent once its write is on disk.
struct UpsReply(ups::Reply);

impl UserData for UpsReply {}

/// The `/ups` content handler (`lua/upsops.lua`, through writes.lua): the
/// answer, in `turn`.
fn ups_reply(lua: &Lua, mut turn: Turn) -> LuaResult<UpsReply> {
    if let Err(why) = authorize(lua)? {
        return Ok(UpsReply(unauthorized_json(why)));
    }
    let method = method(lua)?;
    let ngx = ngx(lua).ok_or_else(|| mlua::Error::runtime("not running inside nginx"))?;
    let (args, truncated): (Table, Option<String>) = ngx
        .get::<Table>("req")?
        .get::<Function>("get_uri_args")?
        .call(UPS_MAX_ARGS)?;
    if truncated.is_some() {
        // A half-read query could miss its `upstream=` and change the
        // server in every upstream.
        return Ok(UpsReply(ups::refused(
            &format!(
                "more than {UPS_MAX_ARGS} query arguments: nothing changed; {}",
                ups::USAGE
            ),
            &query_arg(&args, "server"),
        )));
    }
    if let Some(header) = ups_precondition(&ngx)? {
        // The original interface has no preconditions, and nginx would
        // evaluate these against our answer after the write (a 200 without
        // an ETag fails If-Match and If-Unmodified-Since): refused unapplied.
        return Ok(UpsReply(ups::refused(
            &format!(
                "/ups does not evaluate {header}: nothing changed; send the request without it, \
                     or use the REST interface's If-Match"
            ),
            &query_arg(&args, "server"),
        )));
    }
    let reply = match store_in(&mut turn) {
        Ok((cfg, store, wait)) => {
            let r = ups::handle(
                &method,
                &query_arg(&args, "op"),
                &query_arg(&args, "server"),
                &query_arg(&args, "upstream"),
                &store,
                &WriteOptions { wait, ..cfg.write },
            );
            if r.status == 200 {
                announce_write_back(lua, after_write(lua, &cfg, &store, wait))?;
            }
            r
        }
        Err(e) => ups_failure(&e.to_string()),
    };
    Ok(UpsReply(reply))
}

fn ups_failure(msg: &str) -> ups::Reply {
    ups::Reply {
        status: 500,
        body: serde_json::json!({"msg": msg, "data": [], "code": ups::FAILED}).to_string(),
    }
}

/// Sends a `/ups` answer; `unsynced`: why the write it reports is not
/// known to be on disk, which makes it a failure.
fn send_ups(lua: &Lua, (reply, unsynced): (AnyUserData, Option<String>)) -> LuaResult<()> {
    let reply = match unsynced {
        Some(why) => ups_failure(&why),
        None => reply.take::<UpsReply>()?.0,
    };
    if reply.status >= 500 {
        log(lua, "ERR", &reply.body);
    }
    respond(lua, reply)
}

/// Query arguments `/ups` reads; a request with more is refused.
const UPS_MAX_ARGS: i64 = 100;

/// The first conditional header a `/ups` request carries, if any.
/// `If-Modified-Since` is not one: nginx ignores it without a
/// `Last-Modified`, and it has no meaning on a write.
fn ups_precondition(ngx: &Table) -> LuaResult<Option<&'static str>> {
    let var: Table = ngx.get("var")?;
    for (header, name) in [
        ("If-Match", "http_if_match"),
        ("If-None-Match", "http_if_none_match"),
        ("If-Unmodified-Since", "http_if_unmodified_since"),
    ] {
        if var.get::<Option<mlua::LuaString>>(name)?.is_some() {
            return Ok(Some(header));
        }
    }
    Ok(None)
}

/// The `/ups/check` content handler (`lua/srvcheck.lua`).
fn handle_check(lua: &Lua, (): ()) -> LuaResult<()> {
    if let Err(why) = authorize(lua)? {
        return respond(lua, unauthorized_json(why));
    }
    let method = method(lua)?;
    let reply = with_snapshot(|store, snap| ups::check(&method, store, snap)).unwrap_or_else(|e| {
        ups::Reply {
            status: 500,
            body: serde_json::json!({"msg": e, "data": {}, "code": ups::FAILED}).to_string(),
        }
    });
    respond(lua, reply)
}

/// The length the client declared for its request body.
fn declared_length(ngx: &Table) -> LuaResult<Option<u64>> {
    let var: Table = ngx.get("var")?;
    Ok(var
        .get::<Option<mlua::LuaString>>("content_length")?
        .and_then(|v| v.to_string_lossy().parse::<u64>().ok()))
}

/// Whether content.lua should read the request body before `handle_api`:
/// a write, not declared larger than `max_body` (that one is refused with
/// 413 unread).
fn api_wants_body(lua: &Lua, (): ()) -> LuaResult<bool> {
    let ngx = ngx(lua).ok_or_else(|| mlua::Error::runtime("handle_api runs inside nginx only"))?;
    let max = config()
        .map(|c| c.max_body)
        .unwrap_or(rest::DEFAULT_MAX_BODY);
    let writing = !matches!(method(lua)?.as_str(), "GET" | "HEAD");
    Ok(writing && declared_length(&ngx)?.is_none_or(|n| n <= max as u64))
}

/// The request body content.lua read; `Err` with a 413 past `max` bytes, or
/// a 500 when it cannot be read.
fn request_body(ngx: &Table, max: usize) -> LuaResult<Result<Vec<u8>, rest::Response>> {
    let too_large = || {
        rest_text(
            413,
            format!("request body is larger than {max} bytes (init option max_body)"),
        )
    };
    if declared_length(ngx)?.is_some_and(|n| n > max as u64) {
        return Ok(Err(too_large()));
    }
    let req: Table = ngx.get("req")?;
    let data: Option<mlua::LuaString> = req.get::<Function>("get_body_data")?.call(())?;
    let body = match data {
        Some(data) => data.as_bytes().to_vec(),
        // nginx buffered a large body to a file (client_body_buffer_size).
        None => match req
            .get::<Function>("get_body_file")?
            .call::<Option<String>>(())?
        {
            Some(file) => match std::fs::read(&file) {
                Ok(b) => b,
                Err(e) => {
                    let why = format!("could not read the request body: {e}");
                    return Ok(Err(rest_text(500, why)));
                }
            },
            None => Vec::new(),
        },
    };
    if body.len() > max {
        return Ok(Err(too_large()));
    }
    Ok(Ok(body))
}

fn rest_text(status: u16, body: String) -> rest::Response {
    rest::Response {
        status,
        body,
        json: false,
        etag: None,
        allow: None,
    }
}

/// The answer of one REST request, sent once its write is on disk.
struct ApiReply(rest::Response);

impl UserData for ApiReply {}

/// The REST content handler (`lua/dyups_api.lua`, through writes.lua):
/// ngx_http_dyups_module's interface and its per-server additions. The
/// answer, in `turn`.
fn api_reply(lua: &Lua, mut turn: Turn) -> LuaResult<ApiReply> {
    let ngx = ngx(lua).ok_or_else(|| mlua::Error::runtime("handle_api runs inside nginx only"))?;
    let method = method(lua)?;
    let var: Table = ngx.get("var")?;
    // Bytes nginx decoded from the URI need not be UTF-8: read them lossily,
    // so a hostile path is a bad name (400), not a failed conversion (500).
    let lossy = |name: &str| -> LuaResult<Option<String>> {
        Ok(var
            .get::<Option<mlua::LuaString>>(name)?
            .map(|s| s.to_string_lossy()))
    };
    // The path as sent: nginx's $uri has `%2F` decoded into a separator
    // and dot segments resolved (rest.rs routes and decodes).
    let path = lossy("request_uri")?.unwrap_or_default();
    // Headers through nginx's variables, which see every header: a list
    // from ngx.req.get_headers stops at 100, and an If-Match past them
    // would not be seen.
    let json = lossy("http_accept")?.is_some_and(|a| a.contains("application/json"))
        || lossy("arg_format")?.as_deref() == Some("json");
    let if_match = lossy("http_if_match")?;
    let if_none_match = lossy("http_if_none_match")?;
    let if_unmodified_since = lossy("http_if_unmodified_since")?;
    let if_modified_since = lossy("http_if_modified_since")?;
    // rest.rs evaluates every precondition. Left in place, nginx's
    // not-modified filter would evaluate them again on our answer, after a
    // write: a 200 with the new ETag would become a 304 (If-None-Match: *)
    // or a 412 (If-Match, If-Unmodified-Since) for a change that was made.
    let clear: Function = ngx.get::<Table>("req")?.get("clear_header")?;
    for (name, value) in [
        ("If-Match", &if_match),
        ("If-None-Match", &if_none_match),
        ("If-Unmodified-Since", &if_unmodified_since),
        ("If-Modified-Since", &if_modified_since),
    ] {
        if value.is_some() {
            clear.call::<()>(name)?;
        }
    }
    let response = match (authorize(lua)?, store_in(&mut turn)) {
        (Err(why), _) => rest_text(401, why.message().to_owned()),
        (_, Err(e)) => rest_text(500, e.to_string()),
        (_, Ok((cfg, store, wait))) => match request_body(&ngx, cfg.max_body)? {
            Err(r) => r,
            Ok(body) => {
                let mut req = rest::Request {
                    method: &method,
                    path: &path,
                    body: &body,
                    json,
                    preconditions: rest::Preconditions {
                        if_match: if_match.as_deref(),
                        if_none_match: if_none_match.as_deref(),
                        if_unmodified_since: if_unmodified_since.as_deref(),
                        if_modified_since: if_modified_since.as_deref(),
                    },
                    answers: None,
                    name_status: &[],
                };
                let answers = dns::answers_for(&turn, &cfg, |t| {
                    rest::planned(&req, t).map(|p| *t = p).ok_or(Error::Internal(String::new()))
                });
                req.answers = answers.as_ref();
                let status = if matches!(method.as_str(), "GET" | "HEAD") {
                    crate::admin::name_status::read(&cfg.path)
                } else {
                    Vec::new()
                };
                req.name_status = &status;
                let opts = WriteOptions { wait, ..cfg.write };
                let reply = with_snapshot(|_, snap| rest::handle(&req, &store, snap, &opts));
                let r = reply.unwrap_or_else(|e| rest_text(500, e));
                if !matches!(method.as_str(), "GET" | "HEAD") && r.status == 200 {
                    announce_write_back(lua, after_write(lua, &cfg, &store, wait))?;
                }
                r
            }
        },
    };
    Ok(ApiReply(response))
}

/// Sends a REST answer; `unsynced`: why the write it reports is not known
/// to be on disk, which makes it a failure.
fn send_api(lua: &Lua, (reply, unsynced): (AnyUserData, Option<String>)) -> LuaResult<()> {
    let ngx = ngx(lua).ok_or_else(|| mlua::Error::runtime("handle_api runs inside nginx only"))?;
    let response = match unsynced {
        Some(why) => rest_text(500, why),
        None => reply.take::<ApiReply>()?.0,
    };
    if response.status >= 500 {
        log(lua, "ERR", &response.body);
    }
    // We evaluated If-Match against the table version ourselves. Left in
    // place, nginx's not-modified filter would compare it with the new
    // version's ETag of a successful write and turn the 200 into a 412.
    // (Cleared only now: `api_reply` reads it on each of its calls.)
    ngx.get::<Table>("req")?
        .get::<Function>("clear_header")?
        .call::<()>("If-Match")?;
    ngx.set("status", response.status)?;
    let out: Table = ngx.get("header")?;
    let kind = if response.json {
        "application/json"
    } else {
        "text/plain"
    };
    out.set("Content-Type", kind)?;
    if let Some(v) = response.etag {
        out.set("ETag", format!("\"{v}\""))?;
    }
    if let Some(allow) = response.allow {
        out.set("Allow", allow)?;
    }
    if response.status == 401 {
        out.set("WWW-Authenticate", "Bearer realm=\"ngx.dyups\"")?;
    }
    if !response.body.is_empty() {
        ngx.get::<Function>("print")?.call::<Value>(response.body)?;
    }
    Ok(())
}

/// `dyups.write_upstreams(path)`: writes the table to `path` as an nginx
/// upstream file, atomically → `true` | `nil, err`.
fn write_upstreams(
    lua: &Lua,
    (mut turn, args): (Turn, Variadic<Value>),
) -> LuaResult<Result<bool, String>> {
    let path = resolve_path(lua, &string_arg(&args, 1, "write_upstreams")?);
    check_write_phase(lua, "write_upstreams")?;
    let written = store_in(&mut turn)
        .and_then(|(_, store, wait)| upstream_file::write_current(&store, &path, wait));
    Ok(written.map(|_| true).map_err(|e| e.to_string()))
}

// ---- the request path ----------------------------------------------------------------

/// Resolves an upstream name for the balancer glue: `entry, seen` where
/// entry is `{ id, tries, hosts = {...}, ports = {...} }`, or `nil, seen` for
/// an unknown name, or `nil, nil, err` when this worker has no table.
fn resolve(lua: &Lua, name: mlua::LuaString) -> LuaResult<(Value, Option<u64>, Option<String>)> {
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
extern "C" fn dyups_current() -> i64 {
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

/// The log phase of a request (`dyups.log()`, through LuaJIT's FFI): gives
/// back the connection its last attempt counted.
extern "C" fn dyups_done(request: *const c_void) {
    let _ = std::panic::catch_unwind(|| {
        if let Some(w) = WORKER.lock().as_mut() {
            w.done(request as usize);
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
extern "C" fn dyups_pick(
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
        if key_len == 0 {
            // Round robin and the other keyless methods: nothing to copy.
            return w.pick_at(id, seen, request as usize, retry, &[], now_ms);
        }
        let mut key = KEY_COPY.lock();
        key.clear();
        let len = (key_len as usize).min(KEY_MAX);
        key.extend(KEY[..len].iter().map(|b| b.load(Ordering::Relaxed)));
        w.pick_at(id, seen, request as usize, retry, &key, now_ms)
    })
    .unwrap_or(UNKNOWN)
}
