//! What the binding asks of nginx's Lua API (the `ngx` table): whether it
//! runs inside nginx, in which phase, nginx's error log and its prefix.
//! Each answers sensibly outside nginx too (plain LuaJIT, as the specs'
//! `module_spec.lua` loads the module).

use std::path::{Path, PathBuf};

use mlua::{Function, Lua, Table, Value};

/// The `ngx` table, when running inside nginx.
pub(super) fn ngx(lua: &Lua) -> Option<Table> {
    lua.globals().get::<Option<Table>>("ngx").ok().flatten()
}

/// The current nginx phase, or `None` outside nginx.
pub(super) fn phase(lua: &Lua) -> Option<String> {
    let f: Function = ngx(lua)?.get("get_phase").ok()?;
    f.call::<String>(()).ok()
}

pub(super) fn log(lua: &Lua, level: &str, msg: &str) {
    if let Some(ngx) = ngx(lua) {
        if let (Ok(log), Ok(lvl)) = (ngx.get::<Function>("log"), ngx.get::<Value>(level)) {
            let _ = log.call::<()>((lvl, "ngx.dyups: ", msg));
        }
    }
}

/// Resolves a relative path against nginx's prefix (as nginx does for its
/// own paths), or the working directory outside nginx.
pub(super) fn resolve_path(lua: &Lua, p: &str) -> PathBuf {
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
