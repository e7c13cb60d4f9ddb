//! Picking a server for a request, as nginx's balancers do: smooth weighted
//! round robin with passive health (`balancer`), the other methods' state
//! (`policy`), what one request has tried across its attempts (`attempts`),
//! and a worker's view of the table with a balancer per upstream
//! (`worker`).
//!
//! Uses [`crate::store`] (the snapshot a worker reads, the shared peer
//! cells) and [`crate::table`]; nothing here writes the table.

pub mod attempts;
pub mod balancer;
pub mod hashing;
pub mod policy;
pub mod worker;
