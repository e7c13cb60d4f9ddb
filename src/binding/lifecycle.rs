//! Start-up and the timer. `init` checks its options and, in nginx's
//! master, prepares the state file for the workers (created as their user,
//! seeded from the upstream file or nginx.conf, what changed in the seed
//! applied at a reload, tables nginx would balance itself refused);
//! `init_worker` opens it in each worker and starts the refresh `tick`;
//! `store` finds this process's state file for a write.

use std::path::{Path, PathBuf};

use mlua::{Function, Lua, Table, Value};

use crate::admin::upstream_file;
use crate::balance::worker::Worker;
use crate::store::StateFile;
use crate::table::model::Table as UpstreamTable;
use crate::table::nginx_conf;
use crate::Error;

use super::arguments::bad_argument;
use super::config::{config, parse_config, Config, NginxConf, CONFIG};
use super::hot_path::WORKER;
use super::ngx_api::{log, ngx, phase};
use super::LuaResult;

/// nginx's own default worker user, when `--user` was not given at build.
const NGINX_DEFAULT_USER: &str = "nobody";

/// The table a new state file starts with, its host names resolved (with
/// the blocking client: nginx itself blocks on names when it reads its
/// configuration).
pub(super) fn seed(cfg: &Config) -> crate::Result<UpstreamTable> {
    let mut table = seed_as_written(cfg)?;
    crate::dns::resolve_blocking(&mut table, &cfg.dns).map_err(|e| match seed_source(cfg) {
        Some(source) => Error::BadRequest(format!("{}: {e}", source.name)),
        None => e,
    })?;
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
pub(super) fn init(lua: &Lua, opts: Value) -> LuaResult<Result<bool, String>> {
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
pub(super) fn owner_hint(cfg: &Config) -> String {
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

/// `dyups.init_worker()`: opens the state file in this worker, registers it
/// for `/ups/check`, and starts the refresh timer.
pub(super) fn init_worker(lua: &Lua, (): ()) -> LuaResult<Result<bool, String>> {
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
        let round: Function = super::dns::round(lua)?;
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
    if let Err(e) = super::probe::tick(lua) {
        log(lua, "ERR", &format!("health checks: {e}"));
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

/// The state file of this process: the worker's, or (outside nginx) opened
/// from the configuration.
pub(super) fn store() -> crate::Result<(Config, std::sync::Arc<StateFile>)> {
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
