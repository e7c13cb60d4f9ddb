//! One nginx worker's view of the table: the snapshot it routes by, and the
//! balancing state of each upstream. Rebuilt only when the commit word moves,
//! and then only for the upstreams that changed; unchanged ones keep their
//! round-robin position and health.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use crate::attempts::Attempts;
use crate::balancer::{pick_for_request, Balancer, Retry};
use crate::store::{Snapshot, StateFile};
use crate::Result;

/// What `Worker::pick` answers besides a server index.
pub const STALE: i32 = -2;
pub const NO_LIVE: i32 = -1;
pub const UNKNOWN: i32 = -3;

/// In-flight requests whose retries a worker remembers.
const ATTEMPTS: usize = 4096;

pub struct Worker {
    store: Arc<StateFile>,
    /// This process's entry in the file's worker table, once registered.
    entry: Option<usize>,
    snapshot: Snapshot,
    index: HashMap<String, u32>,
    balancers: Vec<Balancer>,
    attempts: Attempts,
    started: Instant,
    /// Why the last refresh failed, while it keeps failing.
    pub error: Option<String>,
    /// The generation that failed to load: not retried per request, only
    /// when the commit word moves again or the timer refreshes.
    failed_at: Option<u64>,
    /// Why a refresh read the previous table instead of the current one,
    /// for the timer to log (the request path cannot).
    notice: Option<String>,
}

impl Worker {
    pub fn new(store: Arc<StateFile>) -> Result<Worker> {
        let snapshot = store.read()?;
        let mut w = Worker {
            store,
            entry: None,
            snapshot,
            index: HashMap::new(),
            balancers: Vec::new(),
            attempts: Attempts::new(ATTEMPTS),
            started: Instant::now(),
            error: None,
            failed_at: None,
            notice: None,
        };
        w.rebuild(None);
        Ok(w)
    }

    pub fn store(&self) -> &Arc<StateFile> {
        &self.store
    }

    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// Takes an entry in the worker table, so `/ups/check` waits for us.
    pub fn register(&mut self, pid: u32) -> Result<()> {
        let i = self.store.register_worker(pid)?;
        self.store.set_applied(i, self.snapshot.seen);
        self.entry = Some(i);
        Ok(())
    }

    /// Gives the worker table entry back (the worker is exiting).
    pub fn unregister(&mut self, pid: u32) {
        if let Some(i) = self.entry.take() {
            self.store.release_worker(i, pid);
        }
    }

    /// Catches up with the file. `Ok(true)` when the table changed.
    pub fn refresh(&mut self) -> Result<bool> {
        let next = match self.store.read_if_changed(self.snapshot.seen) {
            Ok(next) => next,
            Err(e) => {
                self.error = Some(e.to_string());
                self.failed_at = Some(self.store.generation());
                return Err(e);
            }
        };
        self.error = None;
        self.failed_at = None;
        let Some(next) = next else {
            return Ok(false);
        };
        if next.fallback.is_some() {
            self.notice.clone_from(&next.fallback);
        }
        let old = std::mem::replace(&mut self.snapshot, next);
        self.rebuild(Some(old));
        if let Some(i) = self.entry {
            self.store.set_applied(i, self.snapshot.seen);
        }
        Ok(true)
    }

    fn rebuild(&mut self, old: Option<Snapshot>) {
        let mut old_balancers: HashMap<String, (Balancer, usize)> = HashMap::new();
        if let Some(old) = &old {
            for (i, b) in std::mem::take(&mut self.balancers).into_iter().enumerate() {
                old_balancers.insert(old.table.upstreams[i].name.clone(), (b, i));
            }
        }
        self.index.clear();
        self.balancers = Vec::with_capacity(self.snapshot.table.upstreams.len());
        for (i, u) in self.snapshot.table.upstreams.iter().enumerate() {
            self.index.insert(u.name.clone(), i as u32);
            let b = match (old.as_ref(), old_balancers.remove(&u.name)) {
                (Some(o), Some((b, at))) if o.table.upstreams[at].rev == u.rev => b,
                (Some(o), Some((b, at))) => {
                    let mut fresh = Balancer::new(&u.servers);
                    fresh.carry_over(&b, &o.table.upstreams[at].servers, &u.servers);
                    fresh
                }
                _ => Balancer::new(&u.servers),
            };
            self.balancers.push(b);
        }
    }

    /// What the error log should say about the last refreshes, once.
    pub fn take_notice(&mut self) -> Option<String> {
        self.notice.take()
    }

    /// The id of upstream `name` in the current snapshot.
    pub fn upstream_id(&self, name: &str) -> Option<u32> {
        self.index.get(name).copied()
    }

    /// Picks a server of upstream `id` for one attempt of request `key`.
    /// Returns its index in the upstream, or `STALE` when the caller's ids
    /// are from another generation than the current one (the caller then
    /// resolves the name again), `NO_LIVE` or `UNKNOWN`.
    ///
    /// When the table cannot be read, the worker keeps routing by the last
    /// table it could read (`error` says why) rather than failing requests.
    pub fn pick(&mut self, id: u32, seen: u64, key: usize, retry: Retry) -> i32 {
        let published = self.store.generation();
        if published != self.snapshot.seen && self.failed_at != Some(published) {
            let _ = self.refresh();
        }
        if seen != self.snapshot.seen {
            return STALE;
        }
        let Some(upstream) = self.snapshot.table.upstreams.get(id as usize) else {
            return UNKNOWN;
        };
        let now = self.started.elapsed().as_millis() as u64;
        let picked = pick_for_request(
            &mut self.balancers[id as usize],
            &upstream.servers,
            &mut self.attempts,
            key,
            id,
            self.snapshot.seen,
            retry,
            now,
        );
        picked.map_or(NO_LIVE, |i| i as i32)
    }
}
