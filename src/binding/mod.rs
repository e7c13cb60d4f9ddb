//! The Lua module `ngx.dyups`, split by concern into the files below.

mod lifecycle;
