//! Statistics: what every server, worker and the table have done, counted
//! by every process on the host into the state file, without a lock.
//!
//! **Where they live.** A server's counters are words of its peer cell
//! ([`crate::store::zone`]), after the nine words of its shared state, so
//! they go where the cell goes: a writer keeps a server's cell while the
//! server stays in its upstream (its counters survive every table change in
//! between, whatever else changed) and resets a cell, counters included,
//! before a table that gives it to another server is published. Prometheus
//! takes the drop to zero as the counter reset it is. A server without a
//! cell (the zone was full) has no counters: nothing of it is shown. A
//! worker's counters are a word of its entry in the header's worker table;
//! the table's are words of the header ([`TableCounters`]). None of them is
//! under a checksum: they never steer what the table says.
//!
//! **A worker routing by an older table.** Every count first checks the
//! cell's tag, in the same word as its failures ([`PeerCell::holds`]), so a
//! worker still routing by a table from before the cell was given to another
//! server counts nothing there. The check and the add are two steps, not
//! one compare-and-swap on a tagged word as the connection count is: a
//! counter must be a full 64 bits (a busy server passes 2^32 requests in
//! weeks). A count lands on the wrong server only when the writer resets
//! the cell between the two steps of a worker that still routes by a table
//! two writes old (a cell a table names is only given out once neither the
//! current table nor the next names it): at most one count per such
//! worker, once, on a server whose counters just started from zero.
//!
//! **What is counted, and by whom.**
//! - `requests`: picks, retries included, counted by the balancer where it
//!   picks (no call more per request). Also per worker: requests balanced.
//! - `fails`: failed attempts as `proxy_next_upstream` counts them, which
//!   the balancer learns from `get_last_failure` on the retry that follows
//!   (a request whose last attempt fails has no retry: that failure is
//!   nginx's to log, and is not counted, as passive health does not count
//!   it either). `unavail`: times those failures reached `max_fails` and
//!   took the server out for `fail_timeout`; `downtime_ms`: the time it
//!   was out so, each window counted in full when it opens (extended by a
//!   failure inside it, cut short by a passing active check) and the part
//!   still to come left out when read.
//! - `responses` by class and the response-time histogram: the log phase
//!   (`dyups.log()`), from `$upstream_status` and `$upstream_response_time`,
//!   read once each. Both hold one entry per attempt (`502, 200`; `: `
//!   between the upstreams of internal redirects); the balancer remembers
//!   the servers a request was sent to, in order (the last 8:
//!   `balance::attempts::PATH_MAX`), and the entries are
//!   matched to them from the end, each counted against the server that
//!   served it. An attempt whose connection failed shows as nginx records
//!   it (502, or 504 for a timeout) and is counted so. Only where the log
//!   hook is installed are these counted.
//! - `checks`, `check_fails`, `check_unhealthy`: active health checks
//!   made, failed, and the times they took the server down (NGINX Plus's
//!   `health_checks.unhealthy`), counted by the prober ([`crate::health`])
//!   as it records each probe.
//!
//! **The histogram.** [`BUCKETS_MS`]: 5, 10, 25, 50, 100, 250, 500 ms, 1,
//! 2.5, 5, 10 s, then everything slower; a time goes into the first bucket
//! it does not exceed, as Prometheus' `le`. Counts per bucket, not
//! cumulative; with the sum in microseconds and the count.
//!
//! **Reading.** [`servers`] gives every server of a snapshot with its
//! counters and [`ServerState`]; [`StateFile::table_stats`] and
//! [`StateFile::worker_stats`] the rest. The words are read one by one, so
//! a reading is not a snapshot of one instant: counters move between two
//! words read.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

pub use super::table_stats::{TableStats, WorkerStats, REFUSALS};
use super::upstream_vars::{last_entries, parse_seconds_us, parse_status};
use super::zone::{PeerCell, Zone, HEALTH_CHECKING, HEALTH_DOWN};
use super::{Snapshot, StateFile};
use crate::table::model::{PeerRef, Upstream};

/// Upper bounds of the response-time buckets, milliseconds; a last bucket
/// takes everything slower.
pub const BUCKETS_MS: [u64; 11] = [5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000];
/// Buckets of the histogram, the open-ended one included.
pub const BUCKETS: usize = BUCKETS_MS.len() + 1;

/// A server's counters in its peer cell. Every word is a plain counter
/// (never tagged: see the module doc), zeroed with the cell.
#[repr(C)]
#[derive(Debug, Default)]
pub struct ServerCounters {
    requests: AtomicU64,
    /// 1xx to 5xx.
    responses: [AtomicU64; 5],
    fails: AtomicU64,
    unavail: AtomicU64,
    /// Every unavailable window counted in full, Unix ms.
    downtime: AtomicU64,
    /// When the current or last window of unavailability ends, Unix ms.
    unavail_until: AtomicU64,
    checks: AtomicU64,
    check_fails: AtomicU64,
    check_unhealthy: AtomicU64,
    buckets: [AtomicU64; BUCKETS],
    time_sum_us: AtomicU64,
    time_count: AtomicU64,
}

/// Bytes of [`ServerCounters`] in a cell.
pub const COUNTERS_LEN: usize = 27 * 8;

impl ServerCounters {
    fn words(&self) -> impl Iterator<Item = &AtomicU64> {
        [
            &self.requests,
            &self.fails,
            &self.unavail,
            &self.downtime,
            &self.unavail_until,
            &self.checks,
            &self.check_fails,
            &self.check_unhealthy,
            &self.time_sum_us,
            &self.time_count,
        ]
        .into_iter()
        .chain(&self.responses)
        .chain(&self.buckets)
    }

    pub(super) fn reset(&self) {
        for w in self.words() {
            w.store(0, Ordering::Relaxed);
        }
    }

    pub(super) fn values(&self) -> Vec<u64> {
        self.words().map(|w| w.load(Ordering::Relaxed)).collect()
    }

    pub(super) fn copy_from(&self, other: &ServerCounters) {
        for (to, from) in self.words().zip(other.words()) {
            to.store(from.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }

    /// One more pick.
    pub fn count_request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// One failed attempt at `now_ms`; `out`: when it took the server out
    /// (max_fails reached), until when, and whether it was out already.
    pub fn count_failure(&self, out: Option<(u64, bool)>, now_ms: u64) {
        self.fails.fetch_add(1, Ordering::Relaxed);
        let Some((until, already)) = out else {
            return;
        };
        if !already {
            self.unavail.fetch_add(1, Ordering::Relaxed);
        }
        // The new window counts from where the one before ended (or now),
        // so overlapping windows are counted once.
        let before = self.unavail_until.fetch_max(until, Ordering::Relaxed);
        let from = before.max(now_ms);
        if until > from {
            self.downtime.fetch_add(until - from, Ordering::Relaxed);
        }
    }

    /// The server came back before its window ended (its active checks
    /// passed): the rest of the window is not downtime.
    pub fn end_unavailable(&self, now_ms: u64) {
        let until = self.unavail_until.load(Ordering::Relaxed);
        if until > now_ms
            && self
                .unavail_until
                .compare_exchange(until, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let _ = self
                .downtime
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |d| {
                    Some(d.saturating_sub(until - now_ms))
                });
        }
    }

    /// One active-check probe: whether it failed, whether it took the
    /// server down (its verdict went to unhealthy).
    pub fn count_check(&self, failed: bool, became_unhealthy: bool) {
        self.checks.fetch_add(1, Ordering::Relaxed);
        if failed {
            self.check_fails.fetch_add(1, Ordering::Relaxed);
        }
        if became_unhealthy {
            self.check_unhealthy.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// One attempt's `$upstream_status` entry (`status`, 0 when it had
    /// none) and `$upstream_response_time` entry, µs (`None` for `-`).
    pub fn count_response(&self, status: u16, time_us: Option<u64>) {
        if let 100..=599 = status {
            self.responses[usize::from(status / 100 - 1)].fetch_add(1, Ordering::Relaxed);
        }
        if let Some(us) = time_us {
            self.buckets[bucket_of(us)].fetch_add(1, Ordering::Relaxed);
            self.time_sum_us.fetch_add(us, Ordering::Relaxed);
            self.time_count.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn read(&self, now_ms: u64) -> Counters {
        let get = |w: &AtomicU64| w.load(Ordering::Relaxed);
        let until = get(&self.unavail_until);
        Counters {
            requests: get(&self.requests),
            responses: self.responses.each_ref().map(get),
            fails: get(&self.fails),
            unavail: get(&self.unavail),
            downtime_ms: get(&self.downtime).saturating_sub(until.saturating_sub(now_ms)),
            checks: get(&self.checks),
            check_fails: get(&self.check_fails),
            check_unhealthy: get(&self.check_unhealthy),
            response_time: Histogram {
                buckets: self.buckets.each_ref().map(get),
                sum_us: get(&self.time_sum_us),
                count: get(&self.time_count),
            },
        }
    }
}

/// The bucket a response time of `us` microseconds goes into.
pub fn bucket_of(us: u64) -> usize {
    BUCKETS_MS
        .iter()
        .position(|&ms| us <= ms * 1000)
        .unwrap_or(BUCKETS_MS.len())
}

/// A response-time histogram.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Histogram {
    /// Responses per bucket (bounds in [`BUCKETS_MS`], then the rest), not
    /// cumulative.
    pub buckets: [u64; BUCKETS],
    /// All the times counted, microseconds.
    pub sum_us: u64,
    /// Times counted (the sum of `buckets`, unless a count moved while they
    /// were read).
    pub count: u64,
}

impl Histogram {
    /// The counts at or below each bound, as Prometheus' `le` buckets (the
    /// last is `+Inf`).
    pub fn cumulative(&self) -> [u64; BUCKETS] {
        let mut total = 0;
        self.buckets.map(|n| {
            total += n;
            total
        })
    }
}

/// One server's counters as read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    /// Picks of the server, retries included.
    pub requests: u64,
    /// Responses by class: `[1xx, 2xx, 3xx, 4xx, 5xx]` (log phase only).
    pub responses: [u64; 5],
    /// Failed attempts the balancer saw (`get_last_failure` on a retry).
    pub fails: u64,
    /// Times failures reached `max_fails` and took the server out.
    pub unavail: u64,
    /// Milliseconds it spent out so, up to now.
    pub downtime_ms: u64,
    /// Active-check probes made, failed, and the times they took the
    /// server down.
    pub checks: u64,
    pub check_fails: u64,
    pub check_unhealthy: u64,
    /// `$upstream_response_time` of its attempts (log phase only).
    pub response_time: Histogram,
}

/// What a server is doing, as the JSON, the metrics and the status page
/// say it. [`code`](Self::code) is the Prometheus state code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ServerState {
    /// In rotation.
    Up,
    /// Marked `down` in the table, with connections still in flight.
    Draining,
    /// Marked `down` in the table.
    Down,
    /// Out for `fail_timeout`: its failures reached `max_fails`.
    Unavail,
    /// Not up yet: its active checks have not passed `rise` times since it
    /// came (`check ... default_down=true`).
    Checking,
    /// Out: its active checks failed `fall` times.
    Unhealthy,
}

impl ServerState {
    /// 1 up, 2 draining, 3 down, 4 unavail, 5 checking, 6 unhealthy.
    pub fn code(self) -> u8 {
        self as u8 + 1
    }

    /// The state's word in the JSON, `/metrics` and the dashboard.
    pub fn word(self) -> &'static str {
        match self {
            ServerState::Up => "up",
            ServerState::Draining => "draining",
            ServerState::Down => "down",
            ServerState::Unavail => "unavail",
            ServerState::Checking => "checking",
            ServerState::Unhealthy => "unhealthy",
        }
    }
}

/// The state of server `i` of `u`, whose cells are in `zone`, at `now_ms`
/// (Unix ms): the rules the balancer picks by. Without a cell, `up` or
/// `down` from the table alone.
pub fn state_of(zone: Zone<'_>, u: &Upstream, i: usize, now_ms: u64) -> ServerState {
    let spec = &u.servers[i];
    let r = u.peer(i);
    let cell = zone.cell(r);
    if spec.down {
        return if cell.is_some_and(|c| c.conns() > 0) {
            ServerState::Draining
        } else {
            ServerState::Down
        };
    }
    let Some(cell) = cell else {
        return ServerState::Up;
    };
    if u.check.line.is_some() {
        let w = cell.health_word().load(Ordering::Acquire);
        if (w >> 32) as u32 == r.tag {
            if w & HEALTH_DOWN != 0 {
                return ServerState::Unhealthy;
            }
            if w & HEALTH_CHECKING != 0 {
                return ServerState::Checking;
            }
        }
    }
    // nginx's `peers->single`: a lone primary is never taken out.
    let single = matches!(u.servers.as_slice(), [only] if !only.backup);
    let window = u64::from(spec.fail_timeout) * 1000;
    if !single
        && spec.max_fails > 0
        && cell.fails() >= spec.max_fails
        && now_ms.saturating_sub(cell.checked_ms()) <= window
    {
        return ServerState::Unavail;
    }
    ServerState::Up
}

/// One server of the table, what it is doing, and what it has done.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServerStats {
    pub upstream: String,
    /// Its address as the table has it (`127.0.0.1:8080`, `unix:/path`).
    pub server: String,
    pub state: ServerState,
    /// Its weight in the table.
    pub weight: u32,
    /// Connections in flight in the whole nginx (counted under
    /// `least_conn`, `random two` and `max_conns`).
    pub active: u32,
    /// Whether it has a cell: without one, nothing is counted for it and
    /// `counters` are zero.
    pub shared: bool,
    pub counters: Counters,
}

/// The counters of server `i` of `u` (zero without a cell of its own).
pub fn counters_of(zone: Zone<'_>, u: &Upstream, i: usize, now_ms: u64) -> Counters {
    zone.cell(u.peer(i))
        .map_or_else(Counters::default, |c| c.counters().read(now_ms))
}

/// Every server of every upstream of `snap`, in table order, with its
/// state and counters in `store`'s zone, at `now_ms` (Unix ms).
pub fn servers(store: &StateFile, snap: &Snapshot, now_ms: u64) -> Vec<ServerStats> {
    let zone = store.zone();
    let mut out = Vec::new();
    for u in &snap.table.upstreams {
        for (i, s) in u.servers.iter().enumerate() {
            let cell = zone.cell(u.peer(i));
            out.push(ServerStats {
                upstream: u.name.clone(),
                server: s.addr.to_string(),
                state: state_of(zone, u, i, now_ms),
                weight: s.weight,
                active: cell.map_or(0, PeerCell::conns),
                shared: cell.is_some(),
                counters: counters_of(zone, u, i, now_ms),
            });
        }
    }
    out
}

/// How many of a request's last attempts are counted in the log phase:
/// the balancer remembers as many servers per request.
pub const ATTEMPTS_COUNTED: usize = 8;

/// Counts the response of each attempt of a request against the server
/// that served it: `path` the servers picked, oldest first ([`PeerRef::NONE`]
/// for an attempt that found none), `status` and `times` the bytes of the
/// request's `$upstream_status` and `$upstream_response_time`. Entries are
/// matched to the path from the end (see the module doc); the rest are not
/// counted. One pass over each list, nothing allocated: this runs at the
/// end of every request.
pub fn count_responses(
    zone: Zone<'_>,
    path: &[PeerRef],
    status: impl IntoIterator<Item = u8>,
    times: impl IntoIterator<Item = u8>,
) {
    let status = last_entries(status, parse_status);
    if status.n == 0 {
        return;
    }
    let times = last_entries(times, parse_seconds_us);
    for k in 0..status.n.min(path.len()).min(ATTEMPTS_COUNTED) {
        let Some(cell) = zone.cell(path[path.len() - 1 - k]) else {
            continue;
        };
        let st = status.back(k).unwrap_or(0);
        cell.counters().count_response(st, times.back(k).flatten());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_go_into_the_first_bucket_they_do_not_exceed() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(5_000), 0);
        assert_eq!(bucket_of(5_001), 1);
        assert_eq!(bucket_of(1_000_000), 7);
        assert_eq!(bucket_of(10_000_000), 10);
        assert_eq!(bucket_of(10_000_001), 11);
        let c = ServerCounters::default();
        for us in [1_000, 5_000, 7_000, 30_000_000] {
            c.count_response(200, Some(us));
        }
        let h = c.read(0).response_time;
        assert_eq!(h.buckets, [2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!((h.sum_us, h.count), (30_013_000, 4));
        assert_eq!(h.cumulative(), [2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 4]);
    }

    #[test]
    fn downtime_counts_overlapping_windows_once_and_not_the_future() {
        let c = ServerCounters::default();
        c.count_failure(None, 1_000);
        c.count_failure(Some((11_000, false)), 1_000);
        // A failure inside the window extends it by 2 s.
        c.count_failure(Some((13_000, true)), 3_000);
        let at = |now| c.read(now);
        assert_eq!((at(20_000).fails, at(20_000).unavail), (3, 1));
        assert_eq!(at(20_000).downtime_ms, 12_000);
        assert_eq!(at(5_000).downtime_ms, 4_000, "the rest is still to come");
        // Active checks brought it back at 7 s.
        c.end_unavailable(7_000);
        assert_eq!(at(20_000).downtime_ms, 6_000);
    }

    #[test]
    fn the_state_follows_the_rules_the_balancer_picks_by() {
        use crate::store::zone::ZoneSource;
        use crate::testing::MemoryZone;
        let zone = MemoryZone::new(3);
        let mut u = crate::table::syntax::parse_body(
            "u",
            "server 127.0.0.1:1 max_fails=2 fail_timeout=10s; server 127.0.0.1:2 down; \
             server 127.0.0.1:3;",
        )
        .unwrap();
        u.peers = zone.refs();
        let state = |u: &Upstream, i, now| state_of(zone.zone(), u, i, now);
        assert_eq!(
            [state(&u, 0, 0), state(&u, 1, 0), state(&u, 2, 0)],
            [ServerState::Up, ServerState::Down, ServerState::Up]
        );
        // max_fails within fail_timeout: out until the window passes.
        zone.cell(0).add_failure(1, 1_000);
        assert_eq!(state(&u, 0, 1_500), ServerState::Up);
        zone.cell(0).add_failure(1, 2_000);
        assert_eq!(state(&u, 0, 2_500), ServerState::Unavail);
        assert_eq!(state(&u, 0, 12_001), ServerState::Up);
        // Marked down with connections still in flight.
        zone.cell(1).acquire(1);
        assert_eq!(state(&u, 1, 0), ServerState::Draining);
        // Active checks count only with a check line.
        zone.cell(2)
            .health_word()
            .fetch_or(HEALTH_DOWN, Ordering::AcqRel);
        assert_eq!(state(&u, 2, 0), ServerState::Up);
        let mut checked = crate::table::syntax::parse_body(
            "u",
            "server 127.0.0.1:1; server 127.0.0.1:2 down; server 127.0.0.1:3; check interval=1000;",
        )
        .unwrap();
        checked.peers = zone.refs();
        assert_eq!(state(&checked, 2, 0), ServerState::Unhealthy);
        zone.cell(2).reset_checked(1, true);
        assert_eq!(state(&checked, 2, 0), ServerState::Checking);
        assert_eq!(
            [ServerState::Up, ServerState::Unhealthy].map(ServerState::code),
            [1, 6]
        );
    }
}
