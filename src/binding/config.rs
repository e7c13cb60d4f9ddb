//! What `dyups.init{...}` was given: its options checked and resolved
//! (`parse_config`: relative paths against nginx's prefix, sizes, seconds,
//! the admin token) into a `Config`, kept per process in `CONFIG`: set in
//! nginx's master by `init_by_lua`, inherited by every worker it forks.

use std::path::PathBuf;
use std::time::Duration;

use mlua::{Lua, Table, Value};
use parking_lot::Mutex;

use crate::admin::auth;
use crate::admin::rest;
use crate::store::{Wait, WriteOptions};

use super::arguments::type_name;
use super::ngx_api::resolve_path;

/// Named defaults of `init`.
const DEFAULT_SIZE: u64 = crate::store::DEFAULT_SIZE;
const DEFAULT_LOCK_TIMEOUT: f64 = crate::store::DEFAULT_WAIT.as_secs_f64();
const DEFAULT_REFRESH: f64 = 0.05;
/// The nginx thread pool (`thread_pool NAME threads=N;`) durable writes
/// msync in, off the event loop.
const DEFAULT_THREAD_POOL: &str = "dyups";

/// What `init` was given, resolved. Kept per process: set in the master by
/// `init_by_lua`, inherited by every worker it forks.
#[derive(Clone, Debug)]
pub(super) struct Config {
    pub(super) path: PathBuf,
    pub(super) size: u64,
    pub(super) upstreams: Option<PathBuf>,
    /// Seed from the balancer blocks of this nginx configuration instead
    /// (init's `nginx_conf`): resolved to the file in nginx's master.
    pub(super) nginx_conf: Option<NginxConf>,
    pub(super) write: WriteOptions,
    pub(super) refresh: f64,
    /// Largest REST request body.
    pub(super) max_body: usize,
    /// Where to write the table back after each change, if anywhere.
    pub(super) write_upstreams: Option<PathBuf>,
    /// The bearer token every admin request must carry, if any.
    pub(super) admin_token: Option<String>,
    /// Whom nginx's master gave the state file to, and why that user: for
    /// the message of a worker that cannot open it.
    pub(super) owner: Option<(String, String)>,
    /// The nginx thread pool durable writes msync in; `None`: on the event
    /// loop.
    pub(super) thread_pool: Option<String>,
    /// The resolver of upstreams without a `resolver` line (init's
    /// `resolver`, else `/etc/resolv.conf` as read by `init`).
    pub(super) dns: crate::dns::Defaults,
}

/// init's `nginx_conf` option.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum NginxConf {
    /// `true`: the configuration nginx runs with, found in the master.
    Running,
    File(PathBuf),
}

pub(super) static CONFIG: Mutex<Option<Config>> = Mutex::new(None);

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

pub(super) fn parse_config(lua: &Lua, opts: &Table) -> Result<(Config, Option<String>), String> {
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
            dns: super::dns::defaults_option(opts)?,
        },
        user,
    ))
}

pub(super) fn config() -> Result<Config, String> {
    CONFIG.lock().clone().ok_or_else(|| {
        "ngx.dyups is not initialised: call dyups.init{...} in init_by_lua first".to_owned()
    })
}
