//! The upstream table and nginx's syntax for it: the model (upstreams,
//! servers, their parameters and defaults), the parser and renderer of
//! `server` lines and `upstream {}` blocks, and the one main-context
//! directive start-up reads from nginx.conf (`user`).
//!
//! Plain data and pure functions: this folder uses nothing of the crate but
//! [`crate::error`]; every other folder may use it.

pub mod model;
pub mod names;
pub mod nginx_conf;
pub mod policy;
pub mod syntax;
