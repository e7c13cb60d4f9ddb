//! ngx.dyups: dynamic upstreams for OpenResty.
//!
//! One folder per subsystem; imports run one way, from the top of this list
//! down (`tests/layering.rs` checks it):
//!
//! - `binding`: the Lua module, behind the `lua` feature; uses everything.
//! - [`dns`]: servers by host name: the DNS client, and the re-resolution
//!   of `resolve` lines by one worker for the whole nginx.
//! - [`admin`]: the operations, REST, `/ups`, authorization, write-back.
//! - [`balance`]: round robin, the other methods, per-request attempts, a
//!   worker's balancers.
//! - [`health`]: active health checks: which servers are due a probe, the
//!   leases, the verdicts in the shared cells, the status page.
//! - [`store`]: the state file and the shared peer cells in it.
//! - [`table`]: the upstream table and nginx's syntax for it.
//!
//! [`error`] is used by all. `unsafe` is confined to [`store`], where the
//! shared mapping is.
#![deny(unsafe_code)]

pub mod admin;
pub mod balance;
pub mod dns;
pub mod error;
pub mod health;
pub mod store;
pub mod table;
#[cfg(test)]
mod testing;

#[cfg(feature = "lua")]
mod binding;

pub use error::{Error, Result};
