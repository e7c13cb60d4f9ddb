//! ngx.dyups: dynamic upstreams for OpenResty.
//!
//! The core (model, parser, store, balancer) is plain Rust; the Lua binding
//! lives in `binding` behind the `lua` feature. `unsafe` is confined to
//! [`store`], where the shared mapping is.
#![deny(unsafe_code)]

pub mod attempts;
pub mod auth;
pub mod balancer;
pub mod error;
pub mod health;
pub mod model;
pub mod nginx_conf;
pub mod ops;
pub mod policy;
pub mod rest;
pub mod store;
pub mod syntax;
#[cfg(test)]
mod testing;
pub mod ups;
pub mod upstream_file;
pub mod worker;
pub mod zone;

#[cfg(feature = "lua")]
mod binding;

pub use error::{Error, Result};
