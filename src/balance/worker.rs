//! One nginx worker's view of the table: the snapshot it routes by, and the
//! balancing state of each upstream. Rebuilt only when the commit word moves,
//! and then only for the upstreams that changed; unchanged ones keep their
//! round-robin position and health.
//!
//! Over 600 lines with its tests: the code alone, one worker's view, is well
//! under 600; its tests follow it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::balance::attempts::Attempts;
use crate::balance::balancer::Retry;
use crate::balance::policy::{pick_for_request, PickInput, PolicyState};
use crate::store::{stats, Health, Snapshot, StateFile};
use crate::table::model::{name_key, Upstream};
use crate::table::policy::Policy;
use crate::Result;

/// What `Worker::pick` answers besides a server index.
pub const STALE: i32 = -2;
pub const NO_LIVE: i32 = -1;
pub const UNKNOWN: i32 = -3;

/// How often `check_file` reads the whole table to catch damage that left
/// the commit word alone: one look in this many (the timer looks every
/// `refresh`, 50 ms by default, so about once a second).
const VERIFY_EVERY: u32 = 20;

/// In-flight requests whose retries a worker remembers.
const ATTEMPTS: usize = 4096;

pub struct Worker {
    store: Arc<StateFile>,
    /// This process's entry in the file's worker table, once registered.
    entry: Option<usize>,
    snapshot: Snapshot,
    index: HashMap<String, u32>,
    balancers: Vec<PolicyState>,
    attempts: Attempts,
    /// Connections counted for `least_conn` / `random two` by this worker,
    /// and whether any request's end was ever reported (`done`): many of
    /// the first and none of the second means the log-phase hook is missing.
    pub counted: u64,
    pub done_seen: bool,
    /// Whether the missing hook was reported already.
    pub warned: bool,
    /// Why the last refresh failed, while it keeps failing.
    pub error: Option<String>,
    /// The generation that failed to load: not retried per request, only
    /// when the commit word moves again or the timer refreshes.
    failed_at: Option<u64>,
    /// Why a refresh read the previous table instead of the current one,
    /// for the timer to log (the request path cannot).
    notice: Option<String>,
    /// Looks at the file so far (`check_file`).
    looks: u32,
    /// What a look at the file from a request said, for the timer to log.
    file_notice: Option<String>,
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
            counted: 0,
            done_seen: false,
            warned: false,
            error: None,
            failed_at: None,
            notice: None,
            looks: 0,
            file_notice: None,
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
        let next = self.store.read_if_changed(self.snapshot.seen);
        self.take(next)
    }

    /// Reads the file whatever its generation: after moving to another
    /// file, whose generation says nothing about this worker's table.
    fn reload(&mut self) -> Result<bool> {
        let next = self.store.read().map(Some);
        self.take(next)
    }

    fn take(&mut self, next: Result<Option<Snapshot>>) -> Result<bool> {
        let next = match next {
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
        let new = &self.snapshot.table.upstreams;
        if let Some(old) = &old {
            let old = &old.table.upstreams;
            if old.len() == new.len()
                && self.balancers.len() == new.len()
                && old.iter().zip(new).all(|(o, n)| o.name == n.name)
            {
                // The same upstreams in the same order (any change but a
                // creation or a deletion): the name index stands, and only
                // the upstreams whose rev moved get a new balancer.
                for (i, (o, n)) in old.iter().zip(new).enumerate() {
                    if o.rev != n.rev {
                        let mut fresh = state_for(n, &self.store);
                        fresh.carry_over(&self.balancers[i], &o.servers, &n.servers);
                        self.balancers[i] = fresh;
                    }
                }
                return;
            }
        }
        let mut old_balancers: HashMap<String, (PolicyState, usize)> = HashMap::new();
        if let Some(old) = &old {
            for (i, b) in std::mem::take(&mut self.balancers).into_iter().enumerate() {
                old_balancers.insert(old.table.upstreams[i].name.clone(), (b, i));
            }
        }
        self.index.clear();
        self.balancers = Vec::with_capacity(self.snapshot.table.upstreams.len());
        for (i, u) in self.snapshot.table.upstreams.iter().enumerate() {
            // Keyed in lower case: nginx lower-cases `$host`. Of names that
            // differ only in case (a table from before that rule), the first.
            self.index
                .entry(name_key(&u.name).into_owned())
                .or_insert(i as u32);
            let b = match (old.as_ref(), old_balancers.remove(&u.name)) {
                (Some(o), Some((b, at))) if o.table.upstreams[at].rev == u.rev => b,
                (Some(o), Some((b, at))) => {
                    let mut fresh = state_for(u, &self.store);
                    fresh.carry_over(&b, &o.table.upstreams[at].servers, &u.servers);
                    fresh
                }
                _ => state_for(u, &self.store),
            };
            self.balancers.push(b);
        }
    }

    /// Notices the state file deleted, replaced or damaged under the running
    /// process; restores it with the newest table there is when it is gone
    /// or damaged (`StateFile::restore`), and moves to the file now at the
    /// path. Returns what the error log should say.
    pub fn check_file(&mut self, pid: u32) -> Option<String> {
        let health = match self.store.health() {
            // Overwritten in place, or its header or a slot wrecked: the
            // same file, damaged inside. Examined after a failed refresh or
            // one that fell back to the previous table, and every
            // VERIFY_EVERY looks.
            Health::Same
                if self.error.is_none()
                    && self.snapshot.fallback.is_none()
                    && !self.verify_due() =>
            {
                return None
            }
            Health::Same => self.store.examine(),
            other => other,
        };
        let (what, restored) = match health {
            Health::Same => return None,
            Health::Replaced => ("was replaced".to_owned(), None),
            Health::Missing => (
                "was deleted".to_owned(),
                Some(self.store.restore(&self.snapshot)),
            ),
            Health::Damaged(why) => (
                format!("is damaged: {why}"),
                Some(self.store.restore(&self.snapshot)),
            ),
        };
        // Only now: a request looks at the file twice, and finds it whole.
        let path = self.store.path().display().to_string();
        let restored = match restored {
            Some(Ok(Some(r))) => format!("; restored it from {} as version {}", r.from, r.version),
            Some(Ok(None)) | None => String::new(),
            Some(Err(e)) => {
                return Some(format!(
                    "state file {path} {what} and could not be restored: {e}"
                ))
            }
        };
        let fresh = match self.store.reopen() {
            Ok(f) => f,
            Err(e) => {
                return Some(format!(
                    "state file {path} {what}{restored}; reopening it failed: {e}"
                ))
            }
        };
        self.unregister(pid);
        self.store = fresh;
        self.failed_at = None;
        let moved = self.register(pid).and_then(|()| self.reload());
        // The file there gave its servers cells of its own.
        for (state, u) in self
            .balancers
            .iter_mut()
            .zip(&self.snapshot.table.upstreams)
        {
            state.share(self.store.clone(), &u.peers);
        }
        Some(match moved {
            Ok(_) => format!(
                "state file {path} {what}{restored}; now routing by the file there, version {}",
                self.snapshot.version
            ),
            Err(e) => format!("state file {path} {what}{restored}; reading it failed: {e}"),
        })
    }

    /// [`check_file`](Self::check_file) from a request, which cannot log:
    /// the timer logs what it said ([`take_file_notice`](Self::take_file_notice)).
    pub fn check_file_quietly(&mut self, pid: u32) {
        if let Some(msg) = self.check_file(pid) {
            self.file_notice = Some(msg);
        }
    }

    /// What the last quiet look at the file said, once.
    pub fn take_file_notice(&mut self) -> Option<String> {
        self.file_notice.take()
    }

    /// Counts the looks at the file; true every `VERIFY_EVERY`th.
    fn verify_due(&mut self) -> bool {
        self.looks = self.looks.wrapping_add(1);
        self.looks.is_multiple_of(VERIFY_EVERY)
    }

    /// What the error log should say about the last refreshes, once.
    pub fn take_notice(&mut self) -> Option<String> {
        self.notice.take()
    }

    /// The id of upstream `name` in the current snapshot, in any case.
    pub fn upstream_id(&self, name: &str) -> Option<u32> {
        self.index.get(name_key(name).as_ref()).copied()
    }

    /// Picks a server of upstream `id` for one attempt of request `key`.
    /// `hash_key` is the request's evaluated hash key; for `ip_hash`, the
    /// client address as nginx's `$binary_remote_addr` gives it (4 bytes for
    /// IPv4, 16 for IPv6, anything else hashes as nginx hashes a unix
    /// socket's client); empty for the other methods.
    /// Returns its index in the upstream, or `STALE` when the caller's ids
    /// are from another generation than the current one (the caller then
    /// resolves the name again), `NO_LIVE` or `UNKNOWN`.
    ///
    /// When the table cannot be read, the worker keeps routing by the last
    /// table it could read (`error` says why) rather than failing requests.
    pub fn pick(&mut self, id: u32, seen: u64, key: usize, retry: Retry, hash_key: &[u8]) -> i32 {
        self.pick_at(id, seen, key, retry, hash_key, unix_ms())
    }

    /// [`pick`](Self::pick) at `now_ms`, milliseconds of the Unix clock: the
    /// request path passes nginx's cached time (`ngx.now()`, what nginx's
    /// own balancers go by), which costs no clock read.
    pub fn pick_at(
        &mut self,
        id: u32,
        seen: u64,
        key: usize,
        retry: Retry,
        hash_key: &[u8],
        now_ms: u64,
    ) -> i32 {
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
        let state = &mut self.balancers[id as usize];
        let input = match upstream.policy {
            Policy::IpHash => PickInput {
                client: hash_key,
                ..PickInput::default()
            },
            _ => PickInput {
                key: hash_key,
                ..PickInput::default()
            },
        };
        let picked = pick_for_request(
            state,
            &upstream.servers,
            &input,
            &mut self.attempts,
            key,
            id,
            self.snapshot.seen,
            retry,
            now_ms,
        );
        if picked.is_some() {
            if state.counts_conns() {
                self.counted += 1;
            }
            if let Some(i) = self.entry {
                self.store.count_balanced(i);
            }
        }
        picked.map_or(NO_LIVE, |i| i as i32)
    }

    /// Request `key` has ended (the log phase): gives back the connection
    /// its last attempt counted, and forgets its attempts.
    pub fn done(&mut self, key: usize) {
        self.done_with(key, [], []);
    }

    /// [`done`](Self::done), counting each attempt's response against the
    /// server that served it: `status` and `times` are the request's
    /// `$upstream_status` and `$upstream_response_time` (see
    /// [`crate::store::stats`]).
    pub fn done_with(
        &mut self,
        key: usize,
        status: impl IntoIterator<Item = u8>,
        times: impl IntoIterator<Item = u8>,
    ) {
        self.done_seen = true;
        let Some(attempt) = self.attempts.finish(key) else {
            return;
        };
        let zone = self.store.zone();
        if let Some(held) = attempt.held {
            zone.release(held);
        }
        stats::count_responses(zone, attempt.path(), status, times);
    }

    /// How the request path must evaluate the hash key of upstream `id`:
    /// its balancing method.
    pub fn policy(&self, id: u32) -> Option<&Policy> {
        self.snapshot
            .table
            .upstreams
            .get(id as usize)
            .map(|u| &u.policy)
    }
}

/// The balancing state of a freshly read upstream. The table's policy was
/// checked when it was written; a state that cannot be built (never, in a
/// table this crate wrote) balances by round robin.
fn state_for(u: &Upstream, store: &Arc<StateFile>) -> PolicyState {
    let mut state = PolicyState::new(u.policy.clone(), &u.servers)
        .or_else(|_| PolicyState::new(Policy::RoundRobin, &u.servers))
        .expect("round robin takes any server list");
    state.share(store.clone(), &u.peers);
    state.set_checks(u.check.line.is_some());
    state
}

/// Milliseconds of the Unix clock: the times in the shared cells must mean
/// the same in every process (nginx itself keeps them in `ngx_time()`).
fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::ops;
    use crate::store::WriteOptions;
    use crate::testing::TempDir;
    use std::path::Path;

    fn worker(dir: &TempDir) -> Worker {
        let store = dir.store(&[("local", "server 127.0.0.1:8088; server 127.0.0.1:8089;")]);
        let mut w = Worker::new(store).unwrap();
        w.register(std::process::id()).unwrap();
        w.store()
            .clone()
            .write(&WriteOptions::default(), |t| {
                ops::update(t, "dyhost", "server 127.0.0.1:9000;")
            })
            .unwrap();
        w.refresh().unwrap();
        w
    }

    /// Checks the file until it is whole again, as the timer does: a
    /// refresh, then a look at the file.
    fn heal(w: &mut Worker) -> String {
        let _ = w.refresh();
        let said = (0..VERIFY_EVERY)
            .find_map(|_| w.check_file(std::process::id()))
            .expect("the damage went unnoticed");
        assert!(
            w.check_file(std::process::id()).is_none(),
            "still not whole: {said}"
        );
        said
    }

    fn assert_whole(w: &Worker, dir: &TempDir, before: &Snapshot) {
        let on_disk = crate::store::StateFile::inspect(&dir.file())
            .unwrap()
            .unwrap();
        assert_eq!(on_disk.table, before.table);
        assert!(on_disk.version > before.version);
        assert_eq!(w.snapshot().table, before.table);
        assert_eq!(w.snapshot().version, on_disk.version);
        // The balancers count in the restored file's cells.
        for (id, u) in w.snapshot().table.upstreams.iter().enumerate() {
            let balancer = w.balancers[id].balancer();
            for i in 0..u.servers.len() {
                let cell = w.store().zone().cell(u.peer(i)).expect("a cell there");
                assert!(balancer.health(i).shared(), "{} server {i}", u.name);
                cell.add_failure(u.peer(i).tag, 1);
                assert_eq!(balancer.health(i).fails(), cell.fails());
            }
        }
        // Writes go on, to the restored file.
        let opts = WriteOptions::default();
        let (v, ()) = w
            .store()
            .write(&opts, |t| ops::delete(t, "dyhost"))
            .unwrap();
        assert_eq!(v, on_disk.version + 1);
    }

    #[test]
    fn a_deleted_state_file_is_put_back_with_every_acknowledged_change() {
        let dir = TempDir::new();
        let mut w = worker(&dir);
        let before = w.snapshot().clone();
        std::fs::remove_file(dir.file()).unwrap();
        let said = heal(&mut w);
        assert!(said.contains("was deleted; restored it"), "{said}");
        assert_whole(&w, &dir, &before);
    }

    #[test]
    fn a_state_file_cut_short_under_us_is_survived_and_restored() {
        let dir = TempDir::new();
        let mut w = worker(&dir);
        let before = w.snapshot().clone();
        std::fs::OpenOptions::new()
            .write(true)
            .open(dir.file())
            .unwrap()
            .set_len(0)
            .unwrap();
        // The next look at the commit word would raise SIGBUS: the guard
        // turns the lost page into zeros instead.
        assert_eq!(w.store().generation(), 0);
        assert!(
            w.pick(
                0,
                before.seen,
                1,
                crate::balance::balancer::Retry::First,
                b""
            ) >= 0
        );
        let said = heal(&mut w);
        assert!(said.contains("is damaged: it was cut short"), "{said}");
        assert_whole(&w, &dir, &before);
    }

    #[test]
    fn a_state_file_overwritten_with_garbage_is_restored() {
        let dir = TempDir::new();
        let mut w = worker(&dir);
        let before = w.snapshot().clone();
        let len = std::fs::metadata(dir.file()).unwrap().len() as usize;
        let mut garbage = std::fs::read(dir.file()).unwrap();
        for b in &mut garbage[crate::store::HEADER_LEN as usize..len] {
            *b = 0x5a;
        }
        std::fs::write(dir.file(), &garbage).unwrap();
        let said = heal(&mut w);
        assert!(said.contains("its table is unreadable"), "{said}");
        assert_whole(&w, &dir, &before);
    }

    /// A worker that has not applied the last write (another worker made
    /// it) notices the damage first: the restored file has that write.
    #[test]
    fn a_worker_behind_the_last_write_restores_it_from_the_copy() {
        let cases: [(&str, Damage); 4] = [
            ("its header is damaged", |path, _| wreck(path, 0, 4096)),
            ("slot 0 is unreadable", |path, s| {
                // The last write went to slot 0: the table before is in 1.
                assert_eq!(s.version % 2, 1);
                wreck(path, crate::store::HEADER_LEN + 40, 16)
            }),
            ("its table is unreadable", |path, _| {
                let len = std::fs::metadata(path).unwrap().len();
                let h = crate::store::HEADER_LEN;
                wreck(path, h, len - h)
            }),
            ("cut short", |path, _| {
                let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
                f.set_len(crate::store::HEADER_LEN + 100).unwrap();
            }),
        ];
        for (said_what, damage) in cases {
            let dir = TempDir::new();
            let mut w = worker(&dir);
            let opts = WriteOptions::default();
            // Through a file description of its own, as another process
            // writes: a worker routes by what its own process wrote
            // without reading the slot.
            crate::store::StateFile::write_detached(&dir.file(), &opts, |t| {
                ops::update(t, "late", "server 127.0.0.1:9001;")
            })
            .unwrap();
            let last = w.store().read().unwrap();
            assert_ne!(w.snapshot().table, last.table, "this worker is behind");
            damage(&dir.file(), &last);
            let said = heal(&mut w);
            assert!(said.contains(said_what), "{said}");
            assert!(said.contains("restored it from the copy"), "{said}");
            assert_whole(&w, &dir, &last);
        }
    }

    /// Damages the state file at the path, whose last table is the one given.
    type Damage = fn(&Path, &Snapshot);

    /// Overwrites `len` bytes at `at` in place with bytes no checksum takes.
    fn wreck(path: &Path, at: u64, len: u64) {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        f.write_all_at(&vec![0x5a; len as usize], at).unwrap();
    }

    #[test]
    fn a_replaced_state_file_is_taken_as_it_is() {
        let dir = TempDir::new();
        let mut w = worker(&dir);
        let other = TempDir::new();
        let replacement = other.store(&[("elsewhere", "server 10.0.0.1:80;")]);
        drop(replacement);
        std::fs::rename(other.file(), dir.file()).unwrap();
        let said = heal(&mut w);
        assert!(
            said.contains("was replaced; now routing by the file there"),
            "{said}"
        );
        assert_eq!(
            w.snapshot().table.names().collect::<Vec<_>>(),
            ["elsewhere"]
        );
    }

    /// Two workers of one nginx on a state file holding `body` as `up`.
    fn two_workers(dir: &TempDir, body: &str) -> (Worker, Worker) {
        let store = dir.store(&[("up", body)]);
        let one = Worker::new(store.clone()).unwrap();
        let other = Worker::new(store).unwrap();
        (one, other)
    }

    fn peers(w: &Worker) -> Vec<crate::store::zone::PeerStatus> {
        let up = w.snapshot().table.get("up").unwrap();
        crate::store::zone::status(w.store().zone(), up)
    }

    fn conns(w: &Worker) -> Vec<u32> {
        peers(w).iter().map(|p| p.conns).collect()
    }

    #[test]
    fn least_conn_counts_the_connections_of_every_worker_until_requests_end() {
        let dir = TempDir::new();
        let body = "least_conn; server 127.0.0.1:8088; server 127.0.0.1:8089;";
        let (mut one, mut other) = two_workers(&dir, body);
        let seen = one.snapshot().seen;
        // Request 1 in one worker, request 2 in the other: each sees the
        // other's connection, so they spread instead of both taking server 0.
        assert_eq!(one.pick(0, seen, 0x1000, Retry::First, b""), 0);
        assert_eq!(other.pick(0, seen, 0x2000, Retry::First, b""), 1);
        assert_eq!(conns(&one), [1, 1]);
        assert!(peers(&one).iter().all(|p| p.shared));
        // A tie: this worker's rotation settles it.
        assert_eq!(one.pick(0, seen, 0x3000, Retry::First, b""), 1);
        assert_eq!(conns(&other), [1, 2]);

        // A retry gives back the connection of the attempt before it.
        assert_eq!(one.pick(0, seen, 0x3000, Retry::Failed, b""), 0);
        assert_eq!(conns(&other), [2, 1]);

        // Requests end (the log phase): their connections come back, once.
        one.done(0x3000);
        one.done(0x3000);
        other.done(0x2000);
        assert_eq!(conns(&other), [1, 0]);
        one.done(0x1000);
        assert_eq!(conns(&other), [0, 0]);
        assert!(one.done_seen && one.counted == 3);
    }

    #[test]
    fn round_robin_counts_no_connections() {
        let dir = TempDir::new();
        let (mut one, _) = two_workers(&dir, "server 127.0.0.1:8088; server 127.0.0.1:8089;");
        let seen = one.snapshot().seen;
        one.pick(0, seen, 0x1000, Retry::First, b"");
        assert_eq!(conns(&one), [0, 0]);
        assert_eq!(one.counted, 0);
    }

    #[test]
    fn a_failure_seen_by_one_worker_is_avoided_by_the_other() {
        let dir = TempDir::new();
        let body = "server 127.0.0.1:8088 max_fails=1 fail_timeout=30; server 127.0.0.1:8089;";
        let (mut one, mut other) = two_workers(&dir, body);
        let seen = one.snapshot().seen;
        assert_eq!(one.pick(0, seen, 0x1000, Retry::First, b""), 0);
        assert_eq!(one.pick(0, seen, 0x1000, Retry::Failed, b""), 1);
        let fails: Vec<u32> = peers(&other).iter().map(|p| p.fails).collect();
        assert_eq!(fails, [1, 0]);
        for key in 0..10 {
            assert_eq!(other.pick(0, seen, 0x9000 + key, Retry::First, b""), 1);
        }
    }

    #[test]
    fn shared_state_survives_a_change_of_the_table_for_servers_that_stay() {
        let dir = TempDir::new();
        let body = "least_conn; server 127.0.0.1:8088; server 127.0.0.1:8089;";
        let (mut one, mut other) = two_workers(&dir, body);
        let seen = one.snapshot().seen;
        assert_eq!(one.pick(0, seen, 0x1000, Retry::First, b""), 0);
        one.store()
            .clone()
            .write(&WriteOptions::default(), |t| {
                ops::update(
                    t,
                    "up",
                    "least_conn; server 127.0.0.1:8090; server 127.0.0.1:8088;",
                )
            })
            .unwrap();
        other.refresh().unwrap();
        let peers = peers(&other);
        let view: Vec<(&str, u32)> = peers.iter().map(|p| (p.server.as_str(), p.conns)).collect();
        assert_eq!(view, [("127.0.0.1:8090", 0), ("127.0.0.1:8088", 1)]);
        // The request that took it, picked under the old table, gives it back.
        one.done(0x1000);
        assert_eq!(conns(&other), [0, 0]);
    }

    fn counters(w: &Worker, addr: &str) -> crate::store::stats::Counters {
        let snap = w.snapshot();
        let u = snap.table.get("up").unwrap();
        let i = u
            .servers
            .iter()
            .position(|s| s.addr.to_string() == addr)
            .unwrap();
        // Read once every window has passed: downtime counted in full.
        crate::store::stats::counters_of(w.store().zone(), u, i, u64::MAX)
    }

    fn change(w: &Worker, body: &str) {
        w.store()
            .clone()
            .write(&WriteOptions::default(), |t| ops::update(t, "up", body))
            .unwrap();
    }

    #[test]
    fn picks_failures_and_each_attempts_response_count_on_their_servers() {
        let dir = TempDir::new();
        let body = "server 127.0.0.1:8088 max_fails=1 fail_timeout=30; server 127.0.0.1:8089;";
        let (mut one, mut other) = two_workers(&dir, body);
        one.register(std::process::id()).unwrap();
        let seen = one.snapshot().seen;
        assert_eq!(one.pick(0, seen, 0x1000, Retry::First, b""), 0);
        assert_eq!(one.pick(0, seen, 0x1000, Retry::Failed, b""), 1);
        // Each entry against the server of its attempt, the other worker
        // ending a request it never saw counting nothing.
        other.done_with(
            0x1000,
            b"502, 200".iter().copied(),
            b"0.003, 0.020".iter().copied(),
        );
        one.done_with(
            0x1000,
            b"502, 200".iter().copied(),
            b"0.003, 0.020".iter().copied(),
        );
        let (a, b) = (
            counters(&other, "127.0.0.1:8088"),
            counters(&other, "127.0.0.1:8089"),
        );
        assert_eq!((a.requests, a.fails, a.unavail), (1, 1, 1));
        assert_eq!(a.downtime_ms, 30_000, "one fail_timeout");
        assert_eq!(a.responses, [0, 0, 0, 0, 1]);
        assert_eq!(a.response_time.buckets[0], 1);
        assert_eq!((b.requests, b.fails, b.unavail), (1, 0, 0));
        assert_eq!(b.responses, [0, 1, 0, 0, 0]);
        assert_eq!(b.response_time.buckets[2], 1, "20 ms: the 25 ms bucket");
        assert_eq!(b.response_time.sum_us, 20_000);
        // A request with more entries than picks (an earlier upstream of an
        // internal redirect): only the last ones are its own.
        let seen = one.snapshot().seen;
        assert_eq!(one.pick(0, seen, 0x2000, Retry::First, b""), 1);
        one.done_with(
            0x2000,
            b"200 : 404".iter().copied(),
            b"0.001 : 0.001".iter().copied(),
        );
        assert_eq!(
            counters(&other, "127.0.0.1:8089").responses,
            [0, 1, 0, 1, 0]
        );
        let workers = one.store().worker_stats();
        assert_eq!(workers.len(), 1);
        assert_eq!(
            (workers[0].pid, workers[0].requests),
            (std::process::id(), 3)
        );
    }

    #[test]
    fn counters_stay_with_a_server_across_changes_and_restart_in_a_reused_cell() {
        let dir = TempDir::new();
        let (mut one, _) = two_workers(&dir, "server 127.0.0.1:8088; server 127.0.0.1:8089;");
        let seen = one.snapshot().seen;
        for key in [0x1000, 0x2000] {
            one.pick(0, seen, key, Retry::First, b"");
            one.done_with(key, *b"200", *b"0.001");
        }
        let cell_of = |w: &Worker, addr: &str| {
            let u = w.snapshot().table.get("up").unwrap().clone();
            let i = u
                .servers
                .iter()
                .position(|s| s.addr.to_string() == addr)
                .unwrap();
            u.peer(i)
        };
        let gone = cell_of(&one, "127.0.0.1:8089");
        // 8088 stays (weight changed, moved second); 8089 leaves.
        change(
            &one,
            "server 127.0.0.1:8090; server 127.0.0.1:8088 weight=3;",
        );
        one.refresh().unwrap();
        let kept = counters(&one, "127.0.0.1:8088");
        assert_eq!((kept.requests, kept.responses[1]), (1, 1));
        // Once no table names 8089's cell, a new server gets it, fresh.
        change(
            &one,
            "server 127.0.0.1:8090; server 127.0.0.1:8088 weight=3; server 127.0.0.1:8091;",
        );
        one.refresh().unwrap();
        let reused = cell_of(&one, "127.0.0.1:8091");
        assert_eq!(
            reused.index, gone.index,
            "the freed cell is given out again"
        );
        assert_ne!(reused.tag, gone.tag);
        assert_eq!(counters(&one, "127.0.0.1:8091"), Default::default());
        assert_eq!(counters(&one, "127.0.0.1:8088").requests, 1);
    }

    #[test]
    fn a_request_routed_by_an_older_table_counts_nothing_on_a_reused_cell() {
        let dir = TempDir::new();
        let (mut one, mut other) =
            two_workers(&dir, "server 127.0.0.1:8088; server 127.0.0.1:8089;");
        let seen = one.snapshot().seen;
        // Picked by the table of version 1: 8088, then 8089 (key 0x2000).
        one.pick(0, seen, 0x1000, Retry::First, b"");
        assert_eq!(one.pick(0, seen, 0x2000, Retry::First, b""), 1);
        // 8089 leaves, then 8091 comes and gets its cell.
        change(&other, "server 127.0.0.1:8088;");
        change(&other, "server 127.0.0.1:8088; server 127.0.0.1:8091;");
        other.refresh().unwrap();
        // The request ends now: its response is not 8091's.
        one.done_with(0x2000, b"503".iter().copied(), b"0.002".iter().copied());
        assert_eq!(counters(&other, "127.0.0.1:8091"), Default::default());
        // Nor is a pick by a balancer still built for the old table.
        let state = &one.balancers[0];
        assert!(state.balancer().count_request(1).is_none());
        assert_eq!(counters(&other, "127.0.0.1:8091").requests, 0);
    }
}
