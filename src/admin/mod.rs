//! Changing and showing the table from outside: the operations every
//! interface shares (`ops`: add, update, remove, with their checks), the
//! REST API (`rest`), the `/ups` interface of ngx_http_dyups_module
//! (`ups`), who may call them (`auth`), and writing the table back to an
//! upstream file after each change (`upstream_file`), and what a start or
//! reload applies from it (`seed`).
//!
//! Uses [`crate::store`] (every write goes through one locked write) and
//! [`crate::table`]; it may use [`crate::balance`] but has no need to.

pub mod auth;
pub mod dashboard;
pub mod name_status;
pub mod ops;
pub mod prometheus;
pub mod rest;
pub mod seed;
pub mod server_state;
pub mod ups;
pub mod upstream_file;
