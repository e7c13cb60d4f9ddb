//! ngx.dyups: dynamic upstreams for OpenResty.
//!
//! The core (model, parser, store, balancer) is plain Rust; the Lua binding
//! lives in `binding` behind the `lua` feature. `unsafe` is confined to
//! [`store`], where the shared mapping is.
#![deny(unsafe_code)]

pub mod auth;
pub mod balance;
pub mod error;
pub mod ops;
pub mod rest;
pub mod store;
pub mod table;
#[cfg(test)]
mod testing;
pub mod ups;
pub mod upstream_file;

#[cfg(feature = "lua")]
mod binding;

pub use error::{Error, Result};
