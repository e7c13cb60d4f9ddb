//! Fixtures the core's tests share: a temporary directory removed when the
//! test ends, and a state file in it seeded from upstream bodies.
//!
//! Test code only (`#[cfg(test)]`), so it may use any folder: seeding a
//! store through `admin::ops` is what makes a fixture read like a test's
//! input. No code outside tests can reach it, so it adds no arrow to the
//! layering.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use crate::admin::ops;
use crate::store::zone::{PeerCell, Zone, ZoneSource};
use crate::store::StateFile;
use crate::table::model::PeerRef;
use crate::table::model::{Address, ServerSpec, Table};

/// A directory of its own for one test, removed when it ends, pass or fail.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "dyups-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Where the test's state file goes.
    pub fn file(&self) -> PathBuf {
        self.0.join("state")
    }

    /// A new state file here (64 KiB) holding `upstreams`: (name, body) pairs.
    pub fn store(&self, upstreams: &[(&str, &str)]) -> Arc<StateFile> {
        StateFile::open(&self.file(), 1 << 16, || {
            let mut t = Table::default();
            for (name, body) in upstreams {
                ops::update(&mut t, name, body)?;
            }
            Ok(t)
        })
        .unwrap()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Server `10.0.0.N:80` with weight `weight`.
pub fn server(n: usize, weight: u32) -> ServerSpec {
    let mut s = ServerSpec::new(Address::Inet(format!("10.0.0.{n}:80").parse().unwrap()));
    s.weight = weight;
    s
}

/// Servers `10.0.0.1:80`, `10.0.0.2:80`, ... with these weights.
pub fn servers(weights: &[u32]) -> Vec<ServerSpec> {
    weights
        .iter()
        .enumerate()
        .map(|(i, &w)| server(i + 1, w))
        .collect()
}

/// A zone of `n` cells held in memory, as the state file holds them, each
/// given to server `i` under tag 1.
pub struct MemoryZone(Vec<PeerCell>);

impl MemoryZone {
    pub fn new(n: usize) -> Arc<MemoryZone> {
        let cells: Vec<PeerCell> = (0..n).map(|_| PeerCell::default()).collect();
        for c in &cells {
            c.reset(1);
        }
        Arc::new(MemoryZone(cells))
    }

    /// The refs of its cells, for `Balancer::share`.
    pub fn refs(&self) -> Vec<PeerRef> {
        (0..self.0.len() as u32)
            .map(|index| PeerRef { index, tag: 1 })
            .collect()
    }

    pub fn cell(&self, i: usize) -> &PeerCell {
        &self.0[i]
    }
}

impl ZoneSource for MemoryZone {
    fn zone(&self) -> Zone<'_> {
        Zone::new(&self.0)
    }
}
