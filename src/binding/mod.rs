//! The Lua module `ngx.dyups`, split by concern into the files below.

mod arguments;
mod config;
mod hot_path;
mod http;
mod lifecycle;
mod ngx_api;
mod read_api;
mod write_api;

type LuaResult<T> = mlua::Result<T>;
