//! Per-worker balancing state of one upstream: nginx's smooth weighted round
//! robin with its passive health checks (`max_fails`, `fail_timeout`) and
//! backup servers, as in `ngx_http_upstream_round_robin.c`.
//!
//! The server list itself lives in the shared table; a [`Balancer`] only
//! holds the per-server counters, index for index, so each call takes the
//! list it was built for. Failures and connections are counted in the
//! shared cells of the zone ([`crate::store::zone`]), so every worker sees them.
//! Nothing here reads a clock or allocates on the pick path: time comes in
//! as `now_ms`.
//!
//! Over 600 lines with its tests: the code is round robin and passive health
//! alone, which share every rule; its tests follow it.

use std::fmt;
use std::sync::Arc;

use crate::store::zone::{PeerCell, Zone, ZoneSource};
use crate::table::model::PeerRef;
use crate::table::model::ServerSpec;

/// Smooth round robin adds weights in units of 1/WEIGHT_SCALE, so that a
/// server ramping up under `slow_start` can take a fraction of a weight of
/// 1. Every weight scaled alike picks in nginx's own order.
pub(crate) const WEIGHT_SCALE: i64 = 1000;

/// Indices kept in the bitmask.
const LOW_BITS: usize = u64::BITS as usize;
/// Indices of 64 and above kept in the overflow array.
const OVERFLOW: usize = 32;

/// The servers already tried by one request, without touching the heap.
///
/// Indices below 64 live in a bitmask, so any upstream of up to 64 servers
/// is tracked exactly. Up to 32 larger indices are kept besides; once those
/// are full, further large indices are not recorded: `insert` returns
/// `false` and `contains` answers `false` for them, so a long retry chain in
/// a very large upstream may try such a server twice. The Lua side bounds
/// the number of attempts (`set_more_tries`) anyway.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tried {
    low: u64,
    high: [u32; OVERFLOW],
    high_len: u8,
}

impl Tried {
    /// Indices of 64 and above that fit besides the bitmask.
    pub const OVERFLOW_CAPACITY: usize = OVERFLOW;

    pub const fn new() -> Tried {
        Tried {
            low: 0,
            high: [0; OVERFLOW],
            high_len: 0,
        }
    }

    /// Records `index`. Returns whether it is now in the set: `false` only
    /// when there was no room for it (unlike `HashSet::insert`, an index
    /// already present also answers `true`).
    pub fn insert(&mut self, index: usize) -> bool {
        if index < LOW_BITS {
            self.low |= 1 << index;
            return true;
        }
        if self.contains(index) {
            return true;
        }
        let (Ok(index), Some(free)) = (
            u32::try_from(index),
            self.high.get_mut(usize::from(self.high_len)),
        ) else {
            return false;
        };
        *free = index;
        self.high_len += 1;
        true
    }

    pub fn contains(&self, index: usize) -> bool {
        if index < LOW_BITS {
            return self.low & (1 << index) != 0;
        }
        u32::try_from(index).is_ok_and(|i| self.high().contains(&i))
    }

    pub fn len(&self) -> usize {
        self.low.count_ones() as usize + self.high().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn clear(&mut self) {
        *self = Tried::new();
    }

    fn high(&self) -> &[u32] {
        &self.high[..usize::from(self.high_len)]
    }
}

/// The balancing state of one server in one worker, nginx's
/// `ngx_http_upstream_rr_peer_t` minus what the shared table holds. The
/// weights are this worker's own; failures and connections are counted in
/// the server's cell of the zone, which every worker shares (see
/// [`crate::store::zone`]), or in a cell of this worker's own when it has none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerState {
    pub current_weight: i64,
    /// The weight in use: lowered by failures, climbing back by one per pick
    /// that considers the server, up to its configured weight.
    pub effective_weight: i64,
    /// The server's cell in the zone, if it has one.
    pub shared: PeerRef,
    /// Where this worker counts when the zone holds no cell for the server.
    own: PeerCell,
}

impl PeerState {
    fn fresh(spec: &ServerSpec) -> PeerState {
        PeerState {
            current_weight: 0,
            effective_weight: i64::from(spec.weight),
            shared: PeerRef::NONE,
            own: PeerCell::default(),
        }
    }
}

fn fail_timeout_ms(spec: &ServerSpec) -> u64 {
    u64::from(spec.fail_timeout) * 1000
}

/// nginx's `peers->single`: one primary and no backup. Such an upstream
/// bypasses the weighting and the failure accounting altogether.
fn is_single(servers: &[ServerSpec]) -> bool {
    matches!(servers, [only] if !only.backup)
}

/// One server's failure accounting and connection count, where they are
/// kept: its shared cell, or the worker's own. Times are milliseconds of the
/// Unix clock, the one every worker shares.
#[derive(Clone, Copy, Debug)]
pub struct Health<'a> {
    cell: &'a PeerCell,
    tag: u32,
    /// Whether the upstream has active health checks.
    checks: bool,
}

impl Health<'_> {
    pub fn fails(&self) -> u32 {
        self.cell.fails()
    }

    pub fn conns(&self) -> u32 {
        self.cell.conns()
    }

    /// Whether this is the server's cell in the zone, seen by every worker.
    pub fn shared(&self) -> bool {
        self.tag != 0
    }

    /// Whether server `index` (`spec`) may be picked now: up, not tried by
    /// this request, not disabled by failures (after presuming recovery),
    /// not at its `max_conns`.
    pub(crate) fn available(
        &self,
        spec: &ServerSpec,
        tried: &Tried,
        index: usize,
        now_ms: u64,
    ) -> bool {
        if spec.down || tried.contains(index) || self.check_down() {
            return false;
        }
        self.presume_recovery(spec, now_ms);
        !self.disabled(spec, now_ms) && !self.full(spec)
    }

    /// Whether active health checks hold the server out (down, or still
    /// `checking` under `default_down`): only in its shared cell, where the
    /// probes record, and only while its upstream has a check line.
    fn check_down(&self) -> bool {
        self.checks && self.tag != 0 && self.cell.check_down(self.tag)
    }

    /// nginx's `peer->max_conns && peer->conns >= peer->max_conns`: the
    /// server takes no new request until one of its connections ends.
    fn full(&self, spec: &ServerSpec) -> bool {
        spec.max_conns > 0 && self.cell.conns() >= spec.max_conns
    }

    /// `weight` (in whole weights) in units of [`WEIGHT_SCALE`], ramped by
    /// the server's `slow_start`: from a small fraction when it last became
    /// available again (the time in its cell, the same for every worker) up
    /// to all of it `slow_start` later.
    pub(crate) fn scaled_weight(&self, spec: &ServerSpec, weight: i64, now_ms: u64) -> i64 {
        let full = weight * WEIGHT_SCALE;
        if spec.slow_start == 0 || full <= 0 {
            return full;
        }
        ramp(full, self.cell.available_since(), spec.slow_start, now_ms)
    }

    /// The stand-in for nginx's reset of `fails` on success; see [`Balancer`].
    fn presume_recovery(&self, spec: &ServerSpec, now_ms: u64) {
        let fails = self.cell.fails();
        if fails == 0 {
            return;
        }
        let window = fail_timeout_ms(spec);
        let (accessed, checked) = (self.cell.accessed_ms(), self.cell.checked_ms());
        let recovered = if spec.max_fails == 0 || fails < spec.max_fails {
            now_ms.saturating_sub(accessed) > window
        } else {
            // Only a probe (a pick after the last failure) that went a whole
            // window without a failure report counts.
            checked > accessed && now_ms.saturating_sub(checked) > window
        };
        if recovered {
            if spec.max_fails != 0 && fails >= spec.max_fails {
                // Its fail_timeout ended: available again, ramping under
                // slow_start from now (marked first, so no worker sees it
                // recovered without the mark).
                self.cell.mark_available(now_ms);
            }
            self.cell.clear_failures(self.tag, fails);
        }
    }

    fn disabled(&self, spec: &ServerSpec, now_ms: u64) -> bool {
        spec.max_fails > 0
            && self.cell.fails() >= spec.max_fails
            && now_ms.saturating_sub(self.cell.checked_ms()) <= fail_timeout_ms(spec)
    }

    /// The server was picked: opens a new fail window when the last one has
    /// passed, which for a disabled server makes this pick its probe and keeps
    /// every worker off it until the window ends. False when the server was
    /// disabled and another worker opened the window first: the probe is
    /// that worker's, and this pick must go elsewhere.
    fn claim(&self, spec: &ServerSpec, now_ms: u64) -> bool {
        let checked = self.cell.checked_ms();
        let probe = spec.max_fails > 0 && self.cell.fails() >= spec.max_fails;
        if now_ms.saturating_sub(checked) <= fail_timeout_ms(spec) {
            // A window is open. For a server at max_fails it was closed when
            // we looked: another worker opened it, and the probe is theirs.
            return !probe;
        }
        self.cell.open_window(checked, now_ms) || !probe
    }
}

/// The health of `peer`: its cell in `zone` while that still holds it,
/// else its own.
fn health_of<'a>(zone: Option<Zone<'a>>, peer: &'a PeerState, checks: bool) -> Health<'a> {
    match zone.and_then(|z| z.cell(peer.shared)) {
        Some(cell) => Health {
            cell,
            tag: peer.shared.tag,
            checks,
        },
        None => Health {
            cell: &peer.own,
            tag: 0,
            checks,
        },
    }
}

/// The state of one upstream in one worker.
///
/// Behaves as nginx's round robin in an upstream with a `zone`, with one
/// deliberate difference. nginx clears a server's `fails` when a request to
/// it *succeeds* after its fail window started (`accessed < checked`). We
/// cannot observe success, so success is presumed from silence instead, when
/// [`pick`](Self::pick) next looks at the server:
///
/// - a server below `max_fails` whose last failure is older than
///   `fail_timeout` has its `fails` reset to 0;
/// - a server at `max_fails` whose window has passed is eligible again and,
///   when picked, opens a new window (`checked = now`), so one request per
///   `fail_timeout` probes it, in the whole nginx, as in nginx. If no failure
///   is reported for a whole window after that probe, its `fails` are reset
///   to 0; if the probe fails, it is disabled for another `fail_timeout`.
///
/// So a recovered server rejoins one `fail_timeout` later than in nginx.
/// The rotation (current and effective weights) is per worker, as nginx's is
/// without a `zone`.
#[derive(Clone, Default)]
pub struct Balancer {
    peers: Vec<PeerState>,
    zone: Option<Arc<dyn ZoneSource>>,
    /// The upstream has a `check` line: the verdicts in the shared cells
    /// count ([`crate::health`]).
    checks: bool,
}

impl fmt::Debug for Balancer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Balancer")
            .field("peers", &self.peers)
            .field("zone", &self.zone.as_ref().map(|z| z.zone().len()))
            .finish()
    }
}

impl Balancer {
    /// Fresh state for `servers`, as nginx sets it up at configuration time,
    /// counting in cells of this worker's own until [`share`](Self::share).
    pub fn new(servers: &[ServerSpec]) -> Balancer {
        Balancer {
            peers: servers.iter().map(PeerState::fresh).collect(),
            zone: None,
            checks: false,
        }
    }

    /// Whether the upstream has active health checks, whose verdicts (in the
    /// shared cells) then take servers out of rotation.
    pub fn set_checks(&mut self, on: bool) {
        self.checks = on;
    }

    /// Counts failures and connections of server `i` in `zone`'s cell
    /// `cells[i]` (the table's `Upstream::peers`), shared with every worker.
    /// Servers without a cell keep counting in their own.
    pub fn share(&mut self, zone: Arc<dyn ZoneSource>, cells: &[PeerRef]) {
        for (i, peer) in self.peers.iter_mut().enumerate() {
            peer.shared = cells.get(i).copied().unwrap_or(PeerRef::NONE);
        }
        self.zone = Some(zone);
    }

    /// Becomes the state for `new_servers`, taking over from `old` (the
    /// state for `old_servers`) the rotation of every server whose address is
    /// in both lists, so a table change does not restart it. Failures and
    /// connections are in the shared cells, which the store keeps for the
    /// servers that stay; the own cells of servers without one carry over
    /// too, their connections excepted (requests that took them give them
    /// back to the old state). New servers start fresh. Repeated addresses
    /// are matched in order, one to one. The cells given by `share` stay.
    pub fn carry_over(
        &mut self,
        old: &Balancer,
        old_servers: &[ServerSpec],
        new_servers: &[ServerSpec],
    ) {
        let mut taken = vec![false; old_servers.len()];
        let shared: Vec<PeerRef> = self.peers.iter().map(|p| p.shared).collect();
        self.peers = new_servers
            .iter()
            .zip(shared)
            .map(|(spec, shared)| {
                let found = old_servers
                    .iter()
                    .zip(&old.peers)
                    .enumerate()
                    .find(|(j, (o, _))| !taken[*j] && o.addr == spec.addr);
                let Some((j, (_, prev))) = found else {
                    return PeerState {
                        shared,
                        ..PeerState::fresh(spec)
                    };
                };
                taken[j] = true;
                let mut state = prev.clone();
                state.shared = shared;
                state.own.clear_conns();
                // A lowered weight caps the weight in use at once; a raised
                // one is climbed to as after a failure.
                state.effective_weight = state.effective_weight.min(i64::from(spec.weight));
                state
            })
            .collect();
    }

    /// The state of the server at `index`, for status pages and tests.
    pub fn peer(&self, index: usize) -> Option<&PeerState> {
        self.peers.get(index)
    }

    /// The failures and connections of the server at `index`, where they are
    /// counted. Panics past the end, as indexing does.
    pub fn health(&self, index: usize) -> Health<'_> {
        health_of(self.zone(), &self.peers[index], self.checks)
    }

    /// The zone's cells, looked up (in the state file's mapping) once for a
    /// pick that looks at many servers, rather than once per server.
    fn zone(&self) -> Option<Zone<'_>> {
        self.zone.as_deref().map(ZoneSource::zone)
    }

    /// Every server's health, with the zone looked up once: for the methods
    /// that look at several servers in one pick.
    pub(crate) fn healths(&self) -> Healths<'_> {
        Healths {
            zone: self.zone(),
            peers: &self.peers,
            checks: self.checks,
        }
    }

    /// Picks a server for one attempt: smooth weighted round robin over the
    /// primaries that are up, not in `tried` and not disabled by failures;
    /// only when none is left, the same over the backups. Returns the index
    /// into `servers`, or `None` when nothing can be picked (nginx answers
    /// 502, "no live upstreams").
    ///
    /// `servers` must be the list this balancer was built for.
    pub fn pick(&mut self, servers: &[ServerSpec], tried: &Tried, now_ms: u64) -> Option<usize> {
        debug_assert_eq!(
            servers.len(),
            self.peers.len(),
            "balancer built for another list"
        );
        if is_single(servers) {
            // As nginx: a lone server is never taken out for failures, since
            // refusing it would only turn errors into 502s.
            let ok = !servers[0].down
                && !tried.contains(0)
                && !self.peers.is_empty()
                && !self.health(0).full(&servers[0])
                && !self.health(0).check_down();
            return ok.then_some(0);
        }
        self.pick_among(servers, tried, now_ms, false)
            .or_else(|| self.pick_among(servers, tried, now_ms, true))
    }

    fn pick_among(
        &mut self,
        servers: &[ServerSpec],
        tried: &Tried,
        now_ms: u64,
        backup: bool,
    ) -> Option<usize> {
        // Another worker may take a probe between our look and our claim;
        // the server is then disabled again and the next round passes it by.
        let zone = self.zone.as_deref().map(ZoneSource::zone);
        for _ in 0..=servers.len() {
            let index = smooth_pick_in(
                &mut self.peers,
                zone,
                self.checks,
                servers,
                now_ms,
                |i, spec, health| spec.backup == backup && health.available(spec, tried, i, now_ms),
            )?;
            if health_of(zone, &self.peers[index], self.checks).claim(&servers[index], now_ms) {
                return Some(index);
            }
        }
        None
    }

    /// nginx's smooth weighted round robin over the servers `candidate`
    /// accepts (asked once per server, in order, with its health): each adds
    /// its effective weight to its current weight, the highest current
    /// weight wins (ties to the earlier server, as in nginx) and gives back
    /// the total. The one copy of the step for every balancing method.
    pub(crate) fn smooth_pick(
        &mut self,
        servers: &[ServerSpec],
        now_ms: u64,
        candidate: impl FnMut(usize, &ServerSpec, Health<'_>) -> bool,
    ) -> Option<usize> {
        let zone = self.zone.as_deref().map(ZoneSource::zone);
        smooth_pick_in(
            &mut self.peers,
            zone,
            self.checks,
            servers,
            now_ms,
            candidate,
        )
    }

    /// Records that an attempt on `servers[index]` failed (nginx's
    /// `NGX_PEER_FAILED`): counts towards `max_fails` for every worker,
    /// starts the fail window and lowers this worker's weight in use by
    /// `weight / max_fails`. Ignored for a single-server upstream, as nginx
    /// does.
    pub fn report_failure(&mut self, servers: &[ServerSpec], index: usize, now_ms: u64) {
        if is_single(servers) || index >= self.peers.len() {
            return;
        }
        let Some(spec) = servers.get(index) else {
            return;
        };
        let health = self.health(index);
        // Whether this failure takes the server out (max_fails reached),
        // and whether it was out already, for its counters.
        let window = fail_timeout_ms(spec);
        let was_out = health.disabled(spec, now_ms);
        health.cell.add_failure(health.tag, now_ms);
        if health.shared() {
            let out = (spec.max_fails > 0 && health.cell.fails() >= spec.max_fails)
                .then_some((now_ms + window, was_out));
            health.cell.counters().count_failure(out, now_ms);
        }
        // max_fails=0 turns the accounting off: no division, no lowering.
        if let Some(step) = spec.weight.checked_div(spec.max_fails) {
            let peer = &mut self.peers[index];
            peer.effective_weight = (peer.effective_weight - i64::from(step)).max(0);
        }
    }

    /// For the other balancing methods ([`crate::balance::policy`]): whether
    /// `servers[index]` may be picked now under the rules of
    /// [`pick`](Self::pick): up, not in `tried` and not disabled by failures
    /// (after presuming recovery, as `pick` does).
    pub(crate) fn eligible(
        &self,
        servers: &[ServerSpec],
        tried: &Tried,
        index: usize,
        now_ms: u64,
    ) -> bool {
        self.healths().eligible(servers, tried, index, now_ms)
    }

    /// For the other balancing methods: `servers[index]` was picked. Opens a
    /// new fail window when the last one has passed, as `pick` does; false
    /// when that window was a probe another worker took first.
    pub(crate) fn claim(&self, servers: &[ServerSpec], index: usize, now_ms: u64) -> bool {
        match servers.get(index) {
            Some(spec) if index < self.peers.len() => self.health(index).claim(spec, now_ms),
            _ => false,
        }
    }

    /// Counts a pick of server `index` in its counters, when it has a
    /// shared cell (see [`crate::store::stats`]); the cell it was counted
    /// in, for the log phase to count the response in.
    pub fn count_request(&self, index: usize) -> PeerRef {
        let health = self.health(index);
        if !health.shared() {
            return PeerRef::NONE;
        }
        health.cell.counters().count_request();
        self.peers[index].shared
    }

    /// One more connection in flight to server `index`, counted in its
    /// shared cell: the cell to give it back to, or `None` when the server
    /// has none (its connections are then not counted).
    pub fn acquire(&self, index: usize) -> Option<PeerRef> {
        let health = self.health(index);
        (health.shared() && health.cell.acquire(health.tag)).then_some(self.peers[index].shared)
    }

    /// Gives back a connection [`acquire`](Self::acquire) counted.
    pub fn release(&self, cell: PeerRef) {
        if let Some(zone) = &self.zone {
            zone.zone().release(cell);
        }
    }
}

/// [`Balancer::smooth_pick`] over `peers`, whose cells are in `zone`
/// (`checks`: their upstream has active health checks).
fn smooth_pick_in(
    peers: &mut [PeerState],
    zone: Option<Zone<'_>>,
    checks: bool,
    servers: &[ServerSpec],
    now_ms: u64,
    mut candidate: impl FnMut(usize, &ServerSpec, Health<'_>) -> bool,
) -> Option<usize> {
    let mut best: Option<(usize, i64)> = None;
    let mut total: i64 = 0;
    for (i, spec) in servers.iter().enumerate().take(peers.len()) {
        let health = health_of(zone, &peers[i], checks);
        if !candidate(i, spec, health) {
            continue;
        }
        // In units of WEIGHT_SCALE, ramped by slow_start.
        let weight = health.scaled_weight(spec, peers[i].effective_weight, now_ms);
        let peer = &mut peers[i];
        peer.current_weight += weight;
        total += weight;
        if peer.effective_weight < i64::from(spec.weight) {
            peer.effective_weight += 1;
        }
        if best.is_none_or(|(_, w)| peer.current_weight > w) {
            best = Some((i, peer.current_weight));
        }
    }
    let (index, _) = best?;
    peers[index].current_weight -= total;
    Some(index)
}

/// `full` ramped linearly over `slow_start_s` seconds from `since_ms` (0:
/// never marked, so no ramp), never below 1 unit: a server coming back
/// takes a little traffic at once. A mark further ahead than the ramp (the
/// clock went back) ramps nothing.
fn ramp(full: i64, since_ms: u64, slow_start_s: u32, now_ms: u64) -> i64 {
    let span = u64::from(slow_start_s) * 1000;
    if since_ms == 0 || since_ms > now_ms.saturating_add(span) {
        return full;
    }
    let elapsed = now_ms.saturating_sub(since_ms);
    if elapsed >= span {
        return full;
    }
    // full <= 1000 * WEIGHT_SCALE and span <= a day in ms: no overflow.
    (full * elapsed as i64 / span as i64).max(1)
}

/// The health of every server of a [`Balancer`], for one pick
/// ([`Balancer::healths`]).
#[derive(Clone, Copy)]
pub(crate) struct Healths<'a> {
    zone: Option<Zone<'a>>,
    peers: &'a [PeerState],
    checks: bool,
}

impl<'a> Healths<'a> {
    /// As [`Balancer::health`].
    pub fn get(&self, index: usize) -> Health<'a> {
        health_of(self.zone, &self.peers[index], self.checks)
    }

    /// As [`Balancer::eligible`].
    pub fn eligible(
        &self,
        servers: &[ServerSpec],
        tried: &Tried,
        index: usize,
        now_ms: u64,
    ) -> bool {
        match servers.get(index) {
            Some(spec) if index < self.peers.len() => {
                self.get(index).available(spec, tried, index, now_ms)
            }
            _ => false,
        }
    }
}

/// Why the balancer is called for a request: nginx's first `get` of a
/// request, or a retry after `free` with `NGX_PEER_FAILED` (counts against
/// `max_fails`) or `NGX_PEER_NEXT` (e.g. `proxy_next_upstream http_404`,
/// which does not).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retry {
    First,
    Failed,
    Next,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{server, servers, MemoryZone};

    fn picks(bal: &mut Balancer, servers: &[ServerSpec], n: usize, now_ms: u64) -> Vec<usize> {
        (0..n)
            .map(|_| bal.pick(servers, &Tried::new(), now_ms).expect("a server"))
            .collect()
    }

    fn letters(seq: &[usize]) -> String {
        seq.iter().map(|&i| char::from(b'a' + i as u8)).collect()
    }

    #[test]
    fn smooth_sequence_matches_nginx() {
        let s = servers(&[5, 1, 1]);
        let mut bal = Balancer::new(&s);
        // nginx's own sequence for 5,1,1, twice over: the state returns to
        // zero after each full cycle.
        assert_eq!(letters(&picks(&mut bal, &s, 14, 0)), "aabacaaaabacaa");
        assert!((0..3).all(|i| bal.peer(i).unwrap().current_weight == 0));
    }

    #[test]
    fn distribution_follows_weights_exactly() {
        let s = servers(&[3, 2, 1]);
        let mut bal = Balancer::new(&s);
        let seq = picks(&mut bal, &s, 7000, 0);
        assert_eq!(letters(&seq[..6]), "abacba");
        let count = |i| seq.iter().filter(|&&p| p == i).count();
        // 1166 full cycles of 6, then "abac".
        assert_eq!((count(0), count(1), count(2)), (3500, 2333, 1167));
    }

    #[test]
    fn down_servers_are_skipped() {
        let mut s = servers(&[1, 1, 1]);
        s[1].down = true;
        let mut bal = Balancer::new(&s);
        assert_eq!(letters(&picks(&mut bal, &s, 6, 0)), "acacac");
        s[0].down = true;
        s[2].down = true;
        assert_eq!(bal.pick(&s, &Tried::new(), 0), None);
    }

    #[test]
    fn backups_only_when_no_primary_is_left() {
        let mut s = servers(&[1, 1, 1, 1]);
        s[2].backup = true;
        s[3].backup = true;
        let mut bal = Balancer::new(&s);
        assert!(picks(&mut bal, &s, 100, 0).iter().all(|&i| i < 2));

        // Tried.
        let mut tried = Tried::new();
        tried.insert(0);
        assert_eq!(bal.pick(&s, &tried, 0), Some(1));
        tried.insert(1);
        let backup = bal.pick(&s, &tried, 0).unwrap();
        assert!(backup >= 2);
        tried.insert(backup);
        assert_eq!(bal.pick(&s, &tried, 0), Some(5 - backup));
        tried.insert(5 - backup);
        assert_eq!(bal.pick(&s, &tried, 0), None);

        // Failed (max_fails=1 by default).
        bal.report_failure(&s, 0, 1000);
        assert_eq!(bal.pick(&s, &Tried::new(), 1000), Some(1));
        bal.report_failure(&s, 1, 1000);
        assert!(picks(&mut bal, &s, 10, 1000).iter().all(|&i| i >= 2));

        // Down.
        let mut bal = Balancer::new(&s);
        s[0].down = true;
        s[1].down = true;
        assert_eq!(letters(&picks(&mut bal, &s, 4, 0)), "cdcd");
        s[1].down = false;
        assert_eq!(letters(&picks(&mut bal, &s, 3, 0)), "bbb");
    }

    #[test]
    fn failing_server_is_skipped_for_fail_timeout_then_probed_once() {
        let mut s = servers(&[1, 1]);
        s[0].max_fails = 2;
        s[0].fail_timeout = 10;
        let mut bal = Balancer::new(&s);
        let count_a = |seq: Vec<usize>| seq.iter().filter(|&&i| i == 0).count();

        bal.report_failure(&s, 0, 1_000);
        // One failure of two: still in rotation.
        assert_eq!(count_a(picks(&mut bal, &s, 4, 1_000)), 2);
        bal.report_failure(&s, 0, 1_500);
        assert_eq!(count_a(picks(&mut bal, &s, 10, 1_500)), 0);
        assert_eq!(
            count_a(picks(&mut bal, &s, 10, 11_500)),
            0,
            "window is inclusive"
        );

        // Window over: exactly one request probes it.
        assert_eq!(count_a(picks(&mut bal, &s, 10, 11_501)), 1);
        assert_eq!(count_a(picks(&mut bal, &s, 10, 15_000)), 0);

        // The probe fails: out for another window, then probed again.
        bal.report_failure(&s, 0, 15_000);
        assert_eq!(bal.health(0).fails(), 3);
        assert_eq!(count_a(picks(&mut bal, &s, 10, 25_000)), 0);
        assert_eq!(count_a(picks(&mut bal, &s, 10, 25_001)), 1);

        // This probe goes a whole window unblamed: presumed recovered.
        assert_eq!(count_a(picks(&mut bal, &s, 10, 35_001)), 0);
        assert_eq!(count_a(picks(&mut bal, &s, 10, 35_002)), 5);
        assert_eq!(bal.health(0).fails(), 0);
    }

    #[test]
    fn old_failures_below_max_fails_are_forgotten() {
        let mut s = servers(&[1, 1]);
        s[0].max_fails = 2;
        let mut bal = Balancer::new(&s);
        bal.report_failure(&s, 0, 0);
        picks(&mut bal, &s, 2, 10_000);
        assert_eq!(bal.health(0).fails(), 1, "still within the window");
        picks(&mut bal, &s, 2, 10_001);
        assert_eq!(bal.health(0).fails(), 0);
        // So one more failure does not disable it.
        bal.report_failure(&s, 0, 10_002);
        assert_eq!(bal.pick(&s, &Tried::new(), 10_002), Some(0));
    }

    #[test]
    fn max_fails_zero_never_disables() {
        let mut s = servers(&[1, 1]);
        s[0].max_fails = 0;
        let mut bal = Balancer::new(&s);
        for _ in 0..5 {
            bal.report_failure(&s, 0, 0);
        }
        assert_eq!(bal.peer(0).unwrap().effective_weight, 1);
        assert_eq!(letters(&picks(&mut bal, &s, 4, 0)), "abab");
    }

    #[test]
    fn a_lone_server_ignores_failures() {
        let mut s = servers(&[1]);
        let mut bal = Balancer::new(&s);
        for _ in 0..3 {
            bal.report_failure(&s, 0, 0);
        }
        assert_eq!(bal.health(0).fails(), 0);
        assert_eq!(bal.pick(&s, &Tried::new(), 0), Some(0));
        let mut tried = Tried::new();
        tried.insert(0);
        assert_eq!(bal.pick(&s, &tried, 0), None);
        s[0].down = true;
        assert_eq!(bal.pick(&s, &Tried::new(), 0), None);

        // With a backup it is no longer single: failures count.
        let mut s = servers(&[1, 1]);
        s[1].backup = true;
        let mut bal = Balancer::new(&s);
        bal.report_failure(&s, 0, 0);
        assert_eq!(bal.pick(&s, &Tried::new(), 0), Some(1));
    }

    #[test]
    fn failures_lower_the_weight_in_use_which_then_recovers() {
        let mut s = servers(&[10, 10]);
        s[0].max_fails = 5;
        let mut bal = Balancer::new(&s);
        bal.report_failure(&s, 0, 0);
        bal.report_failure(&s, 0, 0);
        assert_eq!(bal.peer(0).unwrap().effective_weight, 6);
        assert_eq!(bal.peer(1).unwrap().effective_weight, 10);

        // The first pick sees a at 6 against b at 10, then a climbs by one
        // per pick back to its weight and stays there.
        assert_eq!(bal.pick(&s, &Tried::new(), 0), Some(1));
        assert_eq!(bal.peer(0).unwrap().effective_weight, 7);
        picks(&mut bal, &s, 10, 0);
        assert_eq!(bal.peer(0).unwrap().effective_weight, 10);

        // Never below zero.
        let mut s = servers(&[6, 1]);
        s[0].max_fails = 2;
        let mut bal = Balancer::new(&s);
        for _ in 0..3 {
            bal.report_failure(&s, 0, 0);
        }
        assert_eq!(bal.peer(0).unwrap().effective_weight, 0);
    }

    #[test]
    fn carry_over_keeps_servers_that_stay_and_starts_new_ones_fresh() {
        let old_servers = servers(&[5, 1, 1]);
        let mut old = Balancer::new(&old_servers);
        picks(&mut old, &old_servers, 3, 0);
        old.report_failure(&old_servers, 1, 500);

        // c and b stay (reordered), a goes, d comes, b's weight drops.
        let mut new_servers = vec![old_servers[2].clone(), old_servers[1].clone(), server(4, 3)];
        new_servers[1].weight = 1;
        let mut bal = Balancer::new(&new_servers);
        bal.carry_over(&old, &old_servers, &new_servers);

        assert_eq!(bal.peer(0), old.peer(2));
        assert_eq!(bal.peer(1), old.peer(1));
        assert_eq!(bal.health(1).fails(), 1);
        assert_eq!(bal.peer(2), Some(&PeerState::fresh(&new_servers[2])));
        assert_ne!(bal.peer(0).unwrap().current_weight, 0, "rotation kept");
        // b's failure carried over: it stays out of rotation.
        assert!(picks(&mut bal, &new_servers, 8, 1_000)
            .iter()
            .all(|&i| i != 1));

        // A lowered weight caps the carried effective weight.
        let mut heavy = old_servers.clone();
        heavy[2].weight = 1;
        let mut light = Balancer::new(&old_servers);
        light.carry_over(&Balancer::new(&old_servers), &old_servers, &heavy);
        assert_eq!(light.peer(2).unwrap().effective_weight, 1);
    }

    #[test]
    fn tried_tracks_indices_beyond_64() {
        let mut t = Tried::new();
        assert!(t.is_empty());
        for i in [0, 63, 64, 100, 1000] {
            assert!(t.insert(i));
        }
        assert!(t.insert(100), "already present");
        assert_eq!(t.len(), 5);
        for i in [0, 63, 64, 100, 1000] {
            assert!(t.contains(i), "{i}");
        }
        for i in [1, 62, 65, 99, 999] {
            assert!(!t.contains(i), "{i}");
        }

        t.clear();
        assert!(t.is_empty() && !t.contains(64));
        for i in 0..Tried::OVERFLOW_CAPACITY {
            assert!(t.insert(64 + i));
        }
        assert!(!t.insert(500), "overflow full");
        assert!(!t.contains(500));
        assert!(t.insert(5), "the bitmask still has room");
        assert_eq!(t.len(), Tried::OVERFLOW_CAPACITY + 1);
    }

    #[test]
    fn pick_skips_tried_indices_beyond_64() {
        let s = servers(&[1; 70]);
        let mut bal = Balancer::new(&s);
        let mut tried = Tried::new();
        for _ in 0..70 {
            let i = bal.pick(&s, &tried, 0).unwrap();
            assert!(tried.insert(i));
        }
        assert_eq!(tried.len(), 70);
        assert_eq!(bal.pick(&s, &tried, 0), None);
    }

    /// Two workers' balancers for `s`, counting in one zone.
    fn two_workers(s: &[ServerSpec]) -> (Balancer, Balancer, Arc<MemoryZone>) {
        let zone = MemoryZone::new(s.len());
        let (mut a, mut b) = (Balancer::new(s), Balancer::new(s));
        a.share(zone.clone(), &zone.refs());
        b.share(zone.clone(), &zone.refs());
        (a, b, zone)
    }

    #[test]
    fn a_failure_one_worker_saw_keeps_every_worker_off_the_server() {
        let s = servers(&[1, 1]);
        let (mut one, mut other, zone) = two_workers(&s);
        assert_eq!(one.pick(&s, &Tried::new(), 1_000), Some(0));
        one.report_failure(&s, 0, 1_000);
        assert_eq!(zone.cell(0).fails(), 1);
        assert!(other.health(0).shared() && other.health(0).fails() == 1);
        // The other worker never tried server 0, yet passes it by.
        assert_eq!(letters(&picks(&mut other, &s, 6, 2_000)), "bbbbbb");
    }

    #[test]
    fn one_probe_per_window_in_the_whole_nginx() {
        let s = servers(&[1, 1]);
        let (mut one, mut other, _zone) = two_workers(&s);
        one.report_failure(&s, 0, 0);
        // The window has passed for both; each looks, one probes.
        let after = 10_001;
        let mut probes = 0;
        for _ in 0..5 {
            for bal in [&mut one, &mut other] {
                probes += picks(bal, &s, 2, after).iter().filter(|&&i| i == 0).count();
            }
        }
        assert_eq!(probes, 1);
        // Without a failure for a whole window after the probe: back for all.
        assert!(picks(&mut other, &s, 4, 20_002).contains(&0));
        assert_eq!(one.health(0).fails(), 0);
    }

    #[test]
    fn of_two_workers_that_both_saw_the_window_pass_one_probes() {
        let s = servers(&[1, 1]);
        let (mut one, mut other, _zone) = two_workers(&s);
        one.report_failure(&s, 0, 0);
        let at = 10_001;
        // Both look before either claims: the interleaving a race gives.
        let (h1, h2) = (one.health(0), other.health(0));
        assert!(h1.available(&s[0], &Tried::new(), 0, at));
        assert!(h2.available(&s[0], &Tried::new(), 0, at));
        assert!(h1.claim(&s[0], at), "the first claim is the probe");
        assert!(!h2.claim(&s[0], at), "the second must go elsewhere");
        // And a whole pick that loses its claim picks again, elsewhere.
        assert_eq!(other.pick(&s, &Tried::new(), at), Some(1));
        // A server that is not disabled has no probe to lose.
        assert!(other.health(1).claim(&s[1], at + 20_000));
        assert!(one.health(1).claim(&s[1], at + 20_000));
    }

    #[test]
    fn connections_are_counted_in_the_shared_cell_and_given_back() {
        let s = servers(&[1, 1]);
        let (one, other, zone) = two_workers(&s);
        let held = one.acquire(1).expect("server 1 has a shared cell");
        other.acquire(1);
        assert_eq!(zone.cell(1).conns(), 2);
        assert_eq!(one.health(1).conns(), 2);
        other.release(held);
        assert_eq!(zone.cell(1).conns(), 1);
        // Without a zone nothing is counted: there is nothing to give back.
        assert_eq!(Balancer::new(&s).acquire(0), None);
    }

    #[test]
    fn carry_over_keeps_the_cells_share_gave() {
        let s = servers(&[1, 1]);
        let (one, _, zone) = two_workers(&s);
        one.health(1).cell.add_failure(1, 5);
        let fewer = vec![s[1].clone()];
        let mut next = Balancer::new(&fewer);
        let moved = PeerRef { index: 1, tag: 1 };
        next.share(zone.clone(), &[moved]);
        next.carry_over(&one, &s, &fewer);
        assert_eq!(next.peer(0).unwrap().shared, moved);
        assert_eq!(next.health(0).fails(), 1);
    }

    /// How many of `n` picks at `now_ms` go to server `i`.
    fn share(bal: &mut Balancer, s: &[ServerSpec], i: usize, n: usize, now_ms: u64) -> usize {
        (0..n)
            .filter(|_| bal.pick(s, &Tried::new(), now_ms) == Some(i))
            .count()
    }

    #[test]
    fn slow_start_ramps_a_server_back_alike_in_every_worker() {
        let mut s = servers(&[1, 1]);
        s[1].slow_start = 10;
        let (mut one, mut other, zone) = two_workers(&s);
        // Never marked (it has been up since it got its cell): full weight.
        assert_eq!(share(&mut one, &s, 1, 1000, 5_000), 500);
        let t0 = 1_000_000;
        zone.cell(1).mark_available(t0);
        // Linear from a sliver to its weight over 10 s, by the mark in the
        // shared cell: both workers give it the same share at each time.
        for (at, want) in [(0, 1), (1_000, 91), (5_000, 333), (10_000, 500)] {
            for bal in [&mut one, &mut other] {
                let n = share(bal, &s, 1, 1000, t0 + at);
                assert!(
                    n.abs_diff(want) <= 1,
                    "{n} of 1000 at +{at} ms, want {want}"
                );
            }
        }
    }

    #[test]
    fn slow_start_ramps_from_the_end_of_the_fail_timeout() {
        let mut s = servers(&[1, 1]);
        s[1].slow_start = 10;
        s[1].fail_timeout = 1;
        let (mut one, mut other, zone) = two_workers(&s);
        one.report_failure(&s, 1, 1_000);
        assert_eq!(share(&mut one, &s, 1, 10, 1_500), 0, "disabled");
        // After the window, one request probes it; a window without a failure
        // after that brings it back, ramping from then.
        let probed = share(&mut other, &s, 1, 10, 2_100);
        assert_eq!(probed, 1);
        assert_eq!(zone.cell(1).available_since(), 0);
        let back = 3_200;
        share(&mut one, &s, 1, 1, back);
        assert_eq!(zone.cell(1).fails(), 0);
        assert_eq!(zone.cell(1).available_since(), back);
        let n = share(&mut other, &s, 1, 1000, back + 1_000);
        assert!(n.abs_diff(91) <= 1, "{n} of 1000 a second into the ramp");
    }

    #[test]
    fn ramp_is_linear_bounded_and_ignores_a_mark_from_the_future() {
        let full = 3 * WEIGHT_SCALE;
        assert_eq!(ramp(full, 0, 10, 5_000), full, "never marked");
        assert_eq!(ramp(full, 1_000, 10, 1_000), 1, "a sliver at once");
        assert_eq!(ramp(full, 1_000, 10, 6_000), full / 2);
        assert_eq!(ramp(full, 1_000, 10, 11_000), full);
        assert_eq!(ramp(full, 100_000, 10, 1_000), full, "clock went back");
    }
}
