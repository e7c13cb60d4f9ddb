//! The balancing methods besides round robin, making the choices nginx 1.22
//! makes: `ip_hash` (`ngx_http_upstream_ip_hash_module.c`), `hash` and
//! `hash ... consistent` (`ngx_http_upstream_hash_module.c`), `least_conn`
//! (`ngx_http_upstream_least_conn_module.c`) and `random [two]`
//! (`ngx_http_upstream_random_module.c`).
//!
//! A [`PolicyState`] is the per-worker state of one upstream under one
//! method: what nginx precomputes at configuration time (the ketama points,
//! the cumulative weights) plus the round robin [`Balancer`] that holds the
//! passive health state and serves as nginx's fallback (`get_rr_peer`).
//! Every method skips servers that are `down`, in [`Tried`] or disabled by
//! failures, with exactly the rules of [`Balancer::pick`]; a pick opens a
//! new fail window as a round robin pick does.
//!
//! As in nginx, what one request has done so far (the hash chain, the number
//! of rounds spent) may be kept across its attempts in a [`Cursor`]; see
//! [`PolicyState::pick_with_cursor`]. Nothing on the pick path allocates.
//!
//! nginx's hash functions (the ketama ring, `hash`'s rounds) are in
//! `hashing.rs`. Over 600 lines with its tests: the methods share one state
//! and one rule for skipping servers, and read best side by side.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher as _};
use std::sync::Arc;

use crate::balance::attempts::Attempts;
use crate::balance::balancer::{Balancer, Health, Healths, Retry, Tried};
use crate::balance::hashing::{find_point, ketama_points, memcached_hash, Point};
use crate::store::zone::ZoneSource;
use crate::table::model::PeerRef;
use crate::table::model::ServerSpec;
use crate::table::policy::Policy;

/// Rounds a hashing or random method spends on unavailable servers before
/// it hands the request to round robin, as nginx's `tries > 20`.
const MAX_TRIES: u32 = 20;
/// `ip_hash`'s starting value and its modulus.
const IP_HASH_SEED: u32 = 89;
const IP_HASH_MOD: u32 = 6271;
/// What nginx hashes for a client that is neither IPv4 nor IPv6
/// (`ngx_http_upstream_ip_hash_pseudo_addr`).
const PSEUDO_ADDR: [u8; 3] = [0; 3];

/// What one request brings to a pick. Each method reads only its part;
/// [`Default`] gives empty slices.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PickInput<'a> {
    /// `hash`: the evaluated key. Empty falls back to round robin, as nginx.
    pub key: &'a [u8],
    /// `ip_hash`: the client address in network order, 4 bytes (IPv4) or 16
    /// (IPv6). Any other length (unix socket clients) hashes as nginx's
    /// pseudo address, three zero bytes.
    pub client: &'a [u8],
}

/// What nginx keeps in a request's peer data between its attempts: the hash
/// chain (`iphp->hash`, `hp->hash`, `hp->rehash`) and the rounds spent
/// (`tries`). Keep one per request and upstream, starting from
/// [`Cursor::default`], to continue the chain on a retry exactly as nginx;
/// see [`PolicyState::pick_with_cursor`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cursor {
    started: bool,
    hash: u32,
    rehash: u32,
    tries: u32,
}

/// The balancing state of one upstream in one worker under one method.
#[derive(Clone, Debug)]
pub struct PolicyState {
    policy: Policy,
    balancer: Balancer,
    /// `ranges[i]`: the weights of servers `0..=i` summed, for the weight
    /// walks of `ip_hash`, `hash` and `random`. Every server counts, `down`
    /// ones too, as in nginx's `total_weight`.
    ranges: Vec<u64>,
    /// `hash ... consistent`: the ring, sorted by hash, without repeats.
    points: Vec<Point>,
    /// `hash ... consistent`: for each server, the first server with the same
    /// text; nginx matches a point to its peers by name.
    group: Vec<usize>,
    rng: XorShift,
    /// Some server has a `max_conns`: connections are counted for it.
    limits_conns: bool,
}

impl PolicyState {
    /// The state for `servers` under `policy`, seeded at random for
    /// `random`. Fails, with nginx's complaint, for what nginx refuses.
    pub fn new(policy: Policy, servers: &[ServerSpec]) -> Result<PolicyState, String> {
        let seed = RandomState::new().build_hasher().finish();
        PolicyState::with_seed(policy, servers, seed)
    }

    /// As [`new`](Self::new), with the random generator seeded with `seed`.
    pub fn with_seed(
        policy: Policy,
        servers: &[ServerSpec],
        seed: u64,
    ) -> Result<PolicyState, String> {
        policy.validate(servers)?;
        let ranges = servers
            .iter()
            .scan(0u64, |sum, s| {
                *sum += u64::from(s.weight);
                Some(*sum)
            })
            .collect();
        let (points, group) = match &policy {
            Policy::Hash {
                consistent: true, ..
            } => {
                let texts: Vec<String> = servers.iter().map(|s| s.addr.to_string()).collect();
                let group = texts
                    .iter()
                    .map(|t| texts.iter().position(|u| u == t).unwrap_or(0))
                    .collect();
                let weighted: Vec<(&str, u32)> = texts
                    .iter()
                    .zip(servers)
                    .map(|(t, s)| (t.as_str(), s.weight))
                    .collect();
                (ketama_points(&weighted), group)
            }
            _ => (Vec::new(), Vec::new()),
        };
        Ok(PolicyState {
            policy,
            balancer: Balancer::new(servers),
            ranges,
            points,
            group,
            rng: XorShift::new(seed),
            limits_conns: servers.iter().any(|s| s.max_conns > 0),
        })
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The round robin state underneath: failures, weights in use.
    pub fn balancer(&self) -> &Balancer {
        &self.balancer
    }

    /// The ketama ring of `hash ... consistent` (empty otherwise).
    pub fn points(&self) -> &[Point] {
        &self.points
    }

    /// Takes over the failure and rotation state of the servers that stay,
    /// as [`Balancer::carry_over`]; `self` must have been built for
    /// `new_servers`.
    pub fn carry_over(
        &mut self,
        old: &PolicyState,
        old_servers: &[ServerSpec],
        new_servers: &[ServerSpec],
    ) {
        self.balancer
            .carry_over(&old.balancer, old_servers, new_servers);
        self.rng = old.rng.clone();
    }

    /// Counts failures and connections in `zone`'s cells for the servers, as
    /// [`Balancer::share`].
    pub fn share(&mut self, zone: Arc<dyn ZoneSource>, cells: &[PeerRef]) {
        self.balancer.share(zone, cells);
    }

    /// [`Balancer::set_checks`].
    pub fn set_checks(&mut self, on: bool) {
        self.balancer.set_checks(on);
    }

    /// Whether connections in flight count here, so each request's
    /// connection is counted until it ends: the method weighs them
    /// (`least_conn`, `random two`) or some server has a `max_conns`.
    pub fn counts_conns(&self) -> bool {
        self.limits_conns
            || matches!(
                self.policy,
                Policy::LeastConn | Policy::Random { two: true }
            )
    }

    /// Records a failed attempt on `servers[index]`, as
    /// [`Balancer::report_failure`].
    pub fn report_failure(&mut self, servers: &[ServerSpec], index: usize, now_ms: u64) {
        self.balancer.report_failure(servers, index, now_ms);
    }

    /// Picks a server for one attempt; the index into `servers`, or `None`
    /// when nothing can be picked (nginx's "no live upstreams").
    ///
    /// Starts the request's hash chain afresh: a retry replays the chain
    /// from the start, skipping the servers in `tried`, which lands where
    /// nginx lands except that the rounds of earlier attempts count again
    /// against the 20 before the round robin fallback (exact for
    /// `hash ... consistent`). Use [`pick_with_cursor`](Self::pick_with_cursor)
    /// to be exact.
    ///
    /// `servers` must be the list this state was built for.
    pub fn pick(
        &mut self,
        servers: &[ServerSpec],
        input: &PickInput<'_>,
        tried: &Tried,
        now_ms: u64,
    ) -> Option<usize> {
        self.pick_with_cursor(servers, input, tried, &mut Cursor::default(), now_ms)
    }

    /// As [`pick`](Self::pick), continuing the request's own `cursor`: pass
    /// the same cursor, and the same `tried` with the previous picks added,
    /// to every attempt of one request.
    pub fn pick_with_cursor(
        &mut self,
        servers: &[ServerSpec],
        input: &PickInput<'_>,
        tried: &Tried,
        cursor: &mut Cursor,
        now_ms: u64,
    ) -> Option<usize> {
        debug_assert_eq!(
            servers.len(),
            self.ranges.len(),
            "policy state built for another list"
        );
        let picked = match &self.policy {
            Policy::RoundRobin => return self.balancer.pick(servers, tried, now_ms),
            Policy::IpHash => self.ip_hash(servers, input.client, tried, cursor, now_ms),
            Policy::Hash {
                consistent: false, ..
            } => self.hash(servers, input.key, tried, cursor, now_ms),
            Policy::Hash {
                consistent: true, ..
            } => self.chash(servers, input.key, tried, cursor, now_ms),
            Policy::LeastConn => return self.least_conn(servers, tried, now_ms),
            Policy::Random { two: false } => self.random(servers, tried, cursor, now_ms),
            Policy::Random { two: true } => self.random_two(servers, tried, cursor, now_ms),
        };
        match picked {
            Some(index) if self.balancer.claim(servers, index, now_ms) => Some(index),
            // nginx's `get_rr_peer`: single server, empty key, or more than
            // 20 rounds without an available server. Also when the server
            // found was a probe another worker took first (rare: once per
            // fail_timeout of a failed server, and only in a race).
            _ => self.balancer.pick(servers, tried, now_ms),
        }
    }

    fn total_weight(&self) -> u64 {
        self.ranges.last().copied().unwrap_or(0)
    }

    /// The server whose share of the total weight holds `w`, as nginx's
    /// `while (w >= peer->weight) { w -= peer->weight; peer = peer->next; }`.
    fn walk(&self, w: u64) -> usize {
        walk_in(&self.ranges, w)
    }

    /// Whether a hashing or random method runs at all: nginx goes straight
    /// to round robin for an upstream of one server (`peers->number < 2`)
    /// and once a request has spent its 20 rounds.
    fn hashable(&self, servers: &[ServerSpec], cursor: &Cursor) -> bool {
        servers.len() >= 2 && self.total_weight() > 0 && cursor.tries <= MAX_TRIES
    }

    /// A round on an unavailable server: `false` once the request has spent
    /// its 20 (nginx's `if (++tries > 20) return get_rr_peer(...)`).
    fn next_round(cursor: &mut Cursor) -> bool {
        cursor.tries += 1;
        cursor.tries <= MAX_TRIES
    }

    /// The rounds of `ip_hash`, `hash` and `random`: the server `next` names
    /// (the method's next hash or draw), until one is available or the
    /// request has spent its rounds (`None`: round robin).
    fn rounds(
        &mut self,
        servers: &[ServerSpec],
        tried: &Tried,
        cursor: &mut Cursor,
        now_ms: u64,
        mut next: impl FnMut(&mut PolicyState, &mut Cursor) -> usize,
    ) -> Option<usize> {
        loop {
            let index = next(self, cursor);
            if self.balancer.eligible(servers, tried, index, now_ms) {
                return Some(index);
            }
            if !Self::next_round(cursor) {
                return None;
            }
        }
    }

    /// `ngx_http_upstream_get_ip_hash_peer`. `None` means round robin.
    fn ip_hash(
        &mut self,
        servers: &[ServerSpec],
        client: &[u8],
        tried: &Tried,
        cursor: &mut Cursor,
        now_ms: u64,
    ) -> Option<usize> {
        if !cursor.started {
            *cursor = Cursor {
                started: true,
                hash: IP_HASH_SEED,
                ..Cursor::default()
            };
        }
        if !self.hashable(servers, cursor) {
            return None;
        }
        let addr = match client.len() {
            4 => &client[..3],
            16 => client,
            _ => &PSEUDO_ADDR[..],
        };
        // A local copy, stored back only on success: a retry resumes from
        // the hash that found the previous server.
        let mut hash = cursor.hash;
        let picked = self.rounds(servers, tried, cursor, now_ms, |st, _| {
            for &byte in addr {
                hash = (hash * 113 + u32::from(byte)) % IP_HASH_MOD;
            }
            st.walk(u64::from(hash) % st.total_weight())
        });
        if picked.is_some() {
            cursor.hash = hash;
        }
        picked
    }

    /// `ngx_http_upstream_get_hash_peer`: Cache::Memcached's
    /// `((crc32([REHASH] KEY) >> 16) & 0x7fff) + PREV_HASH`.
    fn hash(
        &mut self,
        servers: &[ServerSpec],
        key: &[u8],
        tried: &Tried,
        cursor: &mut Cursor,
        now_ms: u64,
    ) -> Option<usize> {
        if key.is_empty() || !self.hashable(servers, cursor) {
            return None;
        }
        cursor.started = true;
        self.rounds(servers, tried, cursor, now_ms, |st, cursor| {
            cursor.hash = cursor.hash.wrapping_add(memcached_hash(key, cursor.rehash));
            cursor.rehash += 1;
            st.walk(u64::from(cursor.hash) % st.total_weight())
        })
    }

    /// `ngx_http_upstream_get_chash_peer`: from the first point at or after
    /// `crc32(key)`, the point's server if available, else the next point's.
    fn chash(
        &mut self,
        servers: &[ServerSpec],
        key: &[u8],
        tried: &Tried,
        cursor: &mut Cursor,
        now_ms: u64,
    ) -> Option<usize> {
        if key.is_empty() || self.points.is_empty() || !self.hashable(servers, cursor) {
            return None;
        }
        if !cursor.started {
            cursor.started = true;
            // Fits: the ring has at most 160 * 1000 * 1000 points.
            cursor.hash = find_point(&self.points, crc32fast::hash(key)) as u32;
        }
        loop {
            let owner = self.points[cursor.hash as usize % self.points.len()].server;
            // nginx's smooth weighted round robin among the peers of that
            // name: one server unless the same address is listed twice.
            let (group, wanted) = (&self.group, self.group[owner]);
            let picked = self
                .balancer
                .smooth_pick(servers, now_ms, |i, spec, health| {
                    group[i] == wanted && health.available(spec, tried, i, now_ms)
                });
            if picked.is_some() {
                return picked;
            }
            cursor.hash = cursor.hash.wrapping_add(1);
            if !Self::next_round(cursor) {
                return None;
            }
        }
    }

    /// `ngx_http_upstream_get_least_conn_peer`: the fewest connections
    /// relative to weight among the available primaries, ties settled by
    /// smooth weighted round robin among the tied; the backups only when no
    /// primary is available.
    fn least_conn(&mut self, servers: &[ServerSpec], tried: &Tried, now_ms: u64) -> Option<usize> {
        if matches!(servers, [only] if !only.backup) {
            // nginx's `peers->single`: round robin.
            return self.balancer.pick(servers, tried, now_ms);
        }
        let picked = self
            .least_conn_among(servers, tried, now_ms, false)
            .or_else(|| self.least_conn_among(servers, tried, now_ms, true))?;
        if self.balancer.claim(servers, picked, now_ms) {
            Some(picked)
        } else {
            self.balancer.pick(servers, tried, now_ms)
        }
    }

    /// The load of server `index`: its connections in flight (in the whole
    /// nginx, when it has a shared cell) and its weight (ramped by
    /// `slow_start`).
    fn load(
        healths: &Healths<'_>,
        servers: &[ServerSpec],
        index: usize,
        now_ms: u64,
    ) -> (u64, u64) {
        load_of(healths.get(index), &servers[index], now_ms)
    }

    fn least_conn_among(
        &mut self,
        servers: &[ServerSpec],
        tried: &Tried,
        now_ms: u64,
        backup: bool,
    ) -> Option<usize> {
        let mut first: Option<(usize, (u64, u64))> = None;
        let mut many = false;
        // The servers below index 64 tied at the least load so far, so the
        // tie-break need not look at their cells again.
        let mut tied = 0u64;
        let bit = |i: usize| if i < 64 { 1u64 << i } else { 0 };
        let healths = self.balancer.healths();
        for index in 0..servers.len() {
            if servers[index].backup != backup || !healths.eligible(servers, tried, index, now_ms) {
                continue;
            }
            let load = Self::load(&healths, servers, index, now_ms);
            let Some((_, best)) = first else {
                first = Some((index, load));
                tied = bit(index);
                continue;
            };
            match lighter(load, best) {
                std::cmp::Ordering::Less => {
                    first = Some((index, load));
                    many = false;
                    tied = bit(index);
                }
                std::cmp::Ordering::Equal => {
                    many = true;
                    tied |= bit(index);
                }
                std::cmp::Ordering::Greater => {}
            }
        }
        let (first, least) = first?;
        if !many {
            return Some(first);
        }
        // The tied, from `first` on, by smooth weighted round robin.
        self.balancer
            .smooth_pick(servers, now_ms, |i, spec, health| {
                if i < 64 {
                    return tied & bit(i) != 0;
                }
                let load = load_of(health, spec, now_ms);
                i >= first
                    && spec.backup == backup
                    && lighter(load, least) == std::cmp::Ordering::Equal
                    && health.available(spec, tried, i, now_ms)
            })
    }

    /// `ngx_http_upstream_peek_random_peer`: a server drawn with
    /// probability proportional to its weight.
    fn peek(&mut self) -> usize {
        draw(&mut self.rng, &self.ranges)
    }

    /// `ngx_http_upstream_get_random_peer`.
    fn random(
        &mut self,
        servers: &[ServerSpec],
        tried: &Tried,
        cursor: &mut Cursor,
        now_ms: u64,
    ) -> Option<usize> {
        if !self.hashable(servers, cursor) {
            return None;
        }
        self.rounds(servers, tried, cursor, now_ms, |st, _| st.peek())
    }

    /// `ngx_http_upstream_get_random2_peer`: two distinct available servers
    /// drawn, the one with fewer connections relative to weight kept (the
    /// second on a tie).
    fn random_two(
        &mut self,
        servers: &[ServerSpec],
        tried: &Tried,
        cursor: &mut Cursor,
        now_ms: u64,
    ) -> Option<usize> {
        if !self.hashable(servers, cursor) {
            return None;
        }
        let mut prev: Option<usize> = None;
        let healths = self.balancer.healths();
        loop {
            let index = draw(&mut self.rng, &self.ranges);
            if prev != Some(index) && healths.eligible(servers, tried, index, now_ms) {
                if let Some(prev) = prev {
                    let (a, b) = (
                        Self::load(&healths, servers, index, now_ms),
                        Self::load(&healths, servers, prev, now_ms),
                    );
                    let heavier = lighter(a, b) == std::cmp::Ordering::Greater;
                    return Some(if heavier { prev } else { index });
                }
                // The first of the two counts as a round, as in nginx.
                prev = Some(index);
            }
            if !Self::next_round(cursor) {
                return None;
            }
        }
    }
}

/// [`PolicyState::walk`] over `ranges`, the weights summed up to each server.
#[inline]
fn walk_in(ranges: &[u64], w: u64) -> usize {
    ranges.partition_point(|&end| end <= w)
}

/// A server drawn from `rng` with probability proportional to its weight
/// (`ranges` as for [`walk_in`]; the total must not be zero). A function of
/// the fields it uses, so a pick can hold the balancer's health meanwhile.
#[inline]
fn draw(rng: &mut XorShift, ranges: &[u64]) -> usize {
    let total = ranges.last().copied().unwrap_or(0);
    walk_in(ranges, rng.next() % total)
}

/// A server's `(conns, weight)`, its weight ramped by `slow_start` (in
/// units of [`crate::balance::balancer::WEIGHT_SCALE`]: the comparison is the same at any scale).
fn load_of(health: Health<'_>, spec: &ServerSpec, now_ms: u64) -> (u64, u64) {
    let weight = health.scaled_weight(spec, i64::from(spec.weight), now_ms);
    (u64::from(health.conns()), weight.max(1) as u64)
}

/// Compares two `(conns, weight)` loads as nginx does, without dividing:
/// `a.conns * b.weight` against `b.conns * a.weight`.
fn lighter(a: (u64, u64), b: (u64, u64)) -> std::cmp::Ordering {
    (a.0 * b.1).cmp(&(b.0 * a.1))
}

/// xorshift64*: the per-worker generator behind `random`. Its draws cannot
/// match nginx's `random()`, only their distribution.
#[derive(Clone, Debug)]
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> XorShift {
        // The state must not be zero.
        XorShift(if seed == 0 {
            0x9E37_79B9_7F4A_7C15
        } else {
            seed
        })
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// One balancer call of a request, as the FFI entry point makes it, for any
/// balancing method: on a retry, blames the previous pick if it failed and skips every server the
/// request already tried; then picks and remembers the pick. `None` when
/// nothing is left to pick, including when every server was tried (nginx
/// gives up with 502).
///
/// `key` identifies the request (its pointer); `generation` is the table
/// generation `servers` comes from. A retry whose entry is gone (evicted or
/// from another generation) is treated as a first attempt, see [`Attempts`].
#[allow(clippy::too_many_arguments)]
pub fn pick_for_request(
    state: &mut PolicyState,
    servers: &[ServerSpec],
    input: &PickInput<'_>,
    attempts: &mut Attempts,
    key: usize,
    upstream_id: u32,
    generation: u64,
    retry: Retry,
    now_ms: u64,
) -> Option<usize> {
    let attempt = match retry {
        Retry::First => attempts.begin(key, upstream_id, generation),
        Retry::Failed | Retry::Next => attempts.resume_or_begin(key, upstream_id, generation),
    };
    // nginx's `free` of the previous attempt: its connection ends here.
    if let Some(held) = attempt.held.take() {
        state.balancer.release(held);
    }
    if retry == Retry::Failed {
        if let Some(last) = attempt.last {
            state.report_failure(servers, last, now_ms);
        }
    }
    let picked =
        state.pick_with_cursor(servers, input, &attempt.tried, &mut attempt.cursor, now_ms);
    attempt.last = picked;
    attempt.push_path(picked.map_or(PeerRef::NONE, |i| state.balancer.count_request(i)));
    if let Some(index) = picked {
        attempt.tried.insert(index);
        if state.counts_conns() {
            attempt.held = state.balancer.acquire(index);
        }
    }
    if let Some(lost) = attempts.take_displaced() {
        state.balancer.release(lost);
    }
    picked
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::hashing::tests::crc32_ref;
    use crate::table::model::Address;
    use crate::testing::{servers, MemoryZone};

    /// One balancer call of request `key` on upstream 1 at `generation`,
    /// round robin, at time 0.
    fn attempt(
        st: &mut PolicyState,
        s: &[ServerSpec],
        at: &mut Attempts,
        key: usize,
        generation: u64,
        retry: Retry,
    ) -> Option<usize> {
        pick_for_request(
            st,
            s,
            &PickInput::default(),
            at,
            key,
            1,
            generation,
            retry,
            0,
        )
    }

    fn state(policy: Policy, servers: &[ServerSpec]) -> PolicyState {
        PolicyState::with_seed(policy, servers, 42).unwrap()
    }

    fn chash() -> Policy {
        Policy::Hash {
            key: "$request_uri".into(),
            consistent: true,
        }
    }

    fn plain_hash() -> Policy {
        Policy::Hash {
            key: "$request_uri".into(),
            consistent: false,
        }
    }

    fn key(k: &[u8]) -> PickInput<'_> {
        PickInput {
            key: k,
            ..PickInput::default()
        }
    }

    fn client(c: &[u8]) -> PickInput<'_> {
        PickInput {
            client: c,
            ..PickInput::default()
        }
    }

    /// Makes `st` count in a zone of its own, with `conns[i]` connections in
    /// flight to server `i` (0 for the servers past the end).
    fn set_conns(st: &mut PolicyState, servers: usize, conns: &[u32]) {
        let zone = MemoryZone::new(servers);
        for (i, &n) in conns.iter().enumerate() {
            for _ in 0..n {
                zone.cell(i).acquire(1);
            }
        }
        let refs = zone.refs();
        st.share(zone, &refs);
    }

    /// A pick by `st` with `conns` connections in flight.
    fn pick_loaded(
        st: &mut PolicyState,
        s: &[ServerSpec],
        conns: &[u32],
        tried: &Tried,
    ) -> Option<usize> {
        set_conns(st, s.len(), conns);
        st.pick(s, &PickInput::default(), tried, 0)
    }

    /// The weight walk spelled out as nginx does it.
    fn walk_ref(weights: &[u32], hash: u64) -> usize {
        let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
        let mut w = hash % total;
        let mut p = 0;
        while w >= u64::from(weights[p]) {
            w -= u64::from(weights[p]);
            p += 1;
        }
        p
    }

    #[test]
    fn display_in_nginx_syntax() {
        assert_eq!(Policy::RoundRobin.to_string(), "");
        assert_eq!(Policy::IpHash.to_string(), "ip_hash;");
        assert_eq!(chash().to_string(), "hash $request_uri consistent;");
        assert_eq!(plain_hash().to_string(), "hash $request_uri;");
        assert_eq!(Policy::LeastConn.to_string(), "least_conn;");
        assert_eq!(Policy::Random { two: false }.to_string(), "random;");
        assert_eq!(Policy::Random { two: true }.to_string(), "random two;");
    }

    /// What each method without backups (nginx's ip_hash, hash and random;
    /// NGINX Plus refuses slow_start on the same ones) says of `s`, which
    /// it must refuse.
    fn refusals_without_backup(s: &[ServerSpec]) -> Vec<(Policy, String)> {
        [
            Policy::IpHash,
            chash(),
            plain_hash(),
            Policy::Random { two: false },
            Policy::Random { two: true },
        ]
        .into_iter()
        .map(|p| match PolicyState::new(p.clone(), s) {
            Ok(_) => panic!("{p}: accepted"),
            Err(err) => (p, err),
        })
        .collect()
    }

    #[test]
    fn backup_refused_where_nginx_refuses_it() {
        let mut s = servers(&[1, 1]);
        s[1].backup = true;
        for (p, err) in refusals_without_backup(&s) {
            assert!(
                err.contains("backup") && err.contains("10.0.0.2:80"),
                "{p}: {err}"
            );
        }
        assert!(PolicyState::new(Policy::LeastConn, &s).is_ok());
        assert!(PolicyState::new(Policy::RoundRobin, &s).is_ok());
        for bad in ["", "$a b", "$a;", "$a}"] {
            let p = Policy::Hash {
                key: bad.into(),
                consistent: false,
            };
            assert!(PolicyState::new(p, &servers(&[1])).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ketama_points_match_an_independent_computation() {
        let points = ketama_points(&[("127.0.0.1:8088", 1)]);
        assert_eq!(points.len(), 160);
        // crc32("127.0.0.1" "\0" "8088" prev_le), prev starting at 0.
        let mut chain = Vec::new();
        let mut prev = 0u32;
        for _ in 0..160 {
            let mut buf = b"127.0.0.1\x008088".to_vec();
            buf.extend_from_slice(&prev.to_le_bytes());
            prev = crc32_ref(&buf);
            chain.push(prev);
        }
        for h in &chain[..3] {
            assert!(points.iter().any(|p| p.hash == *h), "{h:#x}");
        }
        let mut sorted = chain.clone();
        sorted.sort_unstable();
        assert_eq!(points.iter().map(|p| p.hash).collect::<Vec<_>>(), sorted);
        assert!(points.iter().all(|p| p.server == 0));

        // Weight 2: 320 points, continuing the same chain.
        let points = ketama_points(&[("unix:/tmp/s", 1), ("127.0.0.1:8088", 2)]);
        assert_eq!(points.len(), 480);
        let mut buf = b"/tmp/s\x00".to_vec();
        buf.extend_from_slice(&0u32.to_le_bytes());
        let first_unix = crc32_ref(&buf);
        assert!(points.iter().any(|p| p.hash == first_unix && p.server == 0));
        let mut prev = chain[159];
        let mut buf = b"127.0.0.1\x008088".to_vec();
        buf.extend_from_slice(&prev.to_le_bytes());
        prev = crc32_ref(&buf);
        assert!(points.iter().any(|p| p.hash == prev && p.server == 1));
        assert!(points.windows(2).all(|w| w[0].hash < w[1].hash));

        // The state builds its ring from the servers' text.
        let s = vec![ServerSpec::new(Address::Inet(
            "127.0.0.1:8088".parse().unwrap(),
        ))];
        assert_eq!(
            state(chash(), &s).points(),
            &ketama_points(&[("127.0.0.1:8088", 1)])[..]
        );
    }

    #[test]
    fn find_point_wraps_around() {
        let ring: Vec<Point> = [10, 20, 30]
            .iter()
            .map(|&hash| Point { hash, server: 0 })
            .collect();
        let found: Vec<usize> = [0, 10, 11, 20, 30, 31, u32::MAX]
            .iter()
            .map(|&h| find_point(&ring, h))
            .collect();
        assert_eq!(found, [0, 0, 1, 1, 2, 3, 3]);

        // A key past the last point lands on the first point's server.
        let s = servers(&[1, 1, 1]);
        let mut st = state(chash(), &s);
        let last = st.points().last().unwrap().hash;
        let first_server = st.points()[0].server;
        let k = (0..1_000_000)
            .map(|i| format!("k{i}"))
            .find(|k| crc32fast::hash(k.as_bytes()) > last)
            .expect("a key past the last point");
        assert_eq!(
            st.pick(&s, &key(k.as_bytes()), &Tried::new(), 0),
            Some(first_server)
        );
    }

    #[test]
    fn chash_picks_the_point_and_walks_the_ring_past_unavailable_servers() {
        let mut s = servers(&[1, 2, 1]);
        let mut st = state(chash(), &s);
        let ring = st.points().to_vec();
        for i in 0..200 {
            let k = format!("/item/{i}");
            let at = find_point(&ring, crc32_ref(k.as_bytes()));
            let owner = ring[at % ring.len()].server;
            assert_eq!(
                st.pick(&s, &key(k.as_bytes()), &Tried::new(), 0),
                Some(owner)
            );
        }
        // With server 1 down, a key of server 1 goes to the next point's
        // server that is not 1.
        s[1].down = true;
        let mut st = state(chash(), &s);
        for i in 0..200 {
            let k = format!("/item/{i}");
            let mut at = find_point(&ring, crc32_ref(k.as_bytes()));
            while ring[at % ring.len()].server == 1 {
                at += 1;
            }
            let want = ring[at % ring.len()].server;
            assert_eq!(
                st.pick(&s, &key(k.as_bytes()), &Tried::new(), 0),
                Some(want)
            );
        }
    }

    #[test]
    fn chash_removing_a_server_moves_only_its_keys() {
        let all = servers(&[1, 1, 1]);
        let mut st = state(chash(), &all);
        let before: Vec<usize> = (0..10_000)
            .map(|i| {
                let k = format!("/key/{i}");
                st.pick(&all, &key(k.as_bytes()), &Tried::new(), 0).unwrap()
            })
            .collect();
        for i in 0..3 {
            let share = before.iter().filter(|&&p| p == i).count() as f64 / 10_000.0;
            assert!((share - 1.0 / 3.0).abs() < 0.05, "server {i}: {share}");
        }

        let fewer = vec![all[0].clone(), all[2].clone()];
        let mut st = state(chash(), &fewer);
        let mut moved = 0;
        for (i, &was) in before.iter().enumerate() {
            let k = format!("/key/{i}");
            let now = st
                .pick(&fewer, &key(k.as_bytes()), &Tried::new(), 0)
                .unwrap();
            if was == 1 {
                moved += 1;
            } else {
                assert_eq!(fewer[now].addr, all[was].addr, "key {k} moved");
            }
        }
        assert!(moved > 2_800, "{moved}");
    }

    fn ip_hash_ref(addr: &[u8], mut hash: u32) -> u32 {
        for &b in addr {
            hash = (hash * 113 + u32::from(b)) % 6271;
        }
        hash
    }

    #[test]
    fn ip_hash_matches_nginx_for_ipv4() {
        // 10.1.2.3, step by step.
        let h = (89 * 113 + 10) % 6271;
        assert_eq!(h, 3796);
        let h = (h * 113 + 1) % 6271;
        assert_eq!(h, 2521);
        let h = (h * 113 + 2) % 6271;
        assert_eq!(h, 2680);

        let weights = [2, 1, 3, 1];
        let s = servers(&weights);
        let mut st = state(Policy::IpHash, &s);
        assert_eq!(
            st.pick(&s, &client(&[10, 1, 2, 3]), &Tried::new(), 0),
            Some(walk_ref(&weights, 2680))
        );
        for ip in [[192, 168, 1, 77], [172, 16, 254, 1], [8, 8, 8, 8]] {
            let want = walk_ref(&weights, u64::from(ip_hash_ref(&ip[..3], 89)));
            assert_eq!(st.pick(&s, &client(&ip), &Tried::new(), 0), Some(want));
            // The last octet does not matter.
            for last in [0, 1, 200, 255] {
                let same = [ip[0], ip[1], ip[2], last];
                assert_eq!(st.pick(&s, &client(&same), &Tried::new(), 0), Some(want));
            }
        }
        // Not an IP client: nginx's three zero bytes.
        let want = walk_ref(&weights, u64::from(ip_hash_ref(&[0, 0, 0], 89)));
        assert_eq!(st.pick(&s, &client(b""), &Tried::new(), 0), Some(want));
    }

    #[test]
    fn ip_hash_uses_every_byte_of_ipv6() {
        let weights = [1; 7];
        let s = servers(&weights);
        let mut st = state(Policy::IpHash, &s);
        let mut seen = [false; 7];
        for last in 0..=255u8 {
            let mut ip = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            ip[15] = last;
            let want = walk_ref(&weights, u64::from(ip_hash_ref(&ip, 89)));
            let got = st.pick(&s, &client(&ip), &Tried::new(), 0).unwrap();
            assert_eq!(got, want);
            seen[got] = true;
        }
        assert!(seen.iter().filter(|&&b| b).count() >= 5, "{seen:?}");
    }

    #[test]
    fn ip_hash_retry_continues_the_chain() {
        let weights = [1, 1, 1, 1, 1];
        let s = servers(&weights);
        let ip = [10, 1, 2, 3];
        let h1 = ip_hash_ref(&ip[..3], 89);
        let first = walk_ref(&weights, u64::from(h1));
        let mut tried = Tried::new();
        tried.insert(first);
        // nginx resumes from h1 and re-hashes until another server comes.
        let mut h = h1;
        let second = loop {
            h = ip_hash_ref(&ip[..3], h);
            let p = walk_ref(&weights, u64::from(h));
            if p != first {
                break p;
            }
        };
        let mut st = state(Policy::IpHash, &s);
        let mut cursor = Cursor::default();
        assert_eq!(
            st.pick_with_cursor(&s, &client(&ip), &Tried::new(), &mut cursor, 0),
            Some(first)
        );
        assert_eq!(
            st.pick_with_cursor(&s, &client(&ip), &tried, &mut cursor, 0),
            Some(second)
        );
        assert_ne!(second, first);
        // Replaying from the start lands on the same server.
        assert_eq!(st.pick(&s, &client(&ip), &tried, 0), Some(second));
    }

    #[test]
    fn hash_first_round_and_rehash_match_nginx() {
        let weights = [1, 2, 3];
        let s = servers(&weights);
        let mut st = state(plain_hash(), &s);
        for k in ["a", "/index.html", "user42", "\u{e9}t\u{e9}"] {
            let h = (crc32_ref(k.as_bytes()) >> 16) & 0x7fff;
            let want = walk_ref(&weights, u64::from(h));
            assert_eq!(
                st.pick(&s, &key(k.as_bytes()), &Tried::new(), 0),
                Some(want)
            );

            // That server down: the next rounds hash "1" KEY, "2" KEY, ...
            // and add up.
            let mut down = s.clone();
            down[want].down = true;
            let mut acc = h;
            let mut n = 1;
            let next = loop {
                let r = (crc32_ref(format!("{n}{k}").as_bytes()) >> 16) & 0x7fff;
                acc += r;
                n += 1;
                let p = walk_ref(&weights, u64::from(acc));
                if p != want {
                    break p;
                }
            };
            let mut st2 = state(plain_hash(), &down);
            assert_eq!(
                st2.pick(&down, &key(k.as_bytes()), &Tried::new(), 0),
                Some(next)
            );
        }
        assert_eq!(memcached_hash(b"x", 12), (crc32_ref(b"12x") >> 16) & 0x7fff);
    }

    #[test]
    fn hash_retry_with_cursor_continues_the_sum() {
        let weights = [1, 1, 1, 1];
        let s = servers(&weights);
        let k = "/retry";
        let h0 = (crc32_ref(k.as_bytes()) >> 16) & 0x7fff;
        let first = walk_ref(&weights, u64::from(h0));
        let mut acc = h0;
        let mut n = 1;
        let second = loop {
            acc += (crc32_ref(format!("{n}{k}").as_bytes()) >> 16) & 0x7fff;
            n += 1;
            let p = walk_ref(&weights, u64::from(acc));
            if p != first {
                break p;
            }
        };
        let mut st = state(plain_hash(), &s);
        let mut cursor = Cursor::default();
        let mut tried = Tried::new();
        assert_eq!(
            st.pick_with_cursor(&s, &key(k.as_bytes()), &tried, &mut cursor, 0),
            Some(first)
        );
        tried.insert(first);
        assert_eq!(
            st.pick_with_cursor(&s, &key(k.as_bytes()), &tried, &mut cursor, 0),
            Some(second)
        );
        assert_eq!(st.pick(&s, &key(k.as_bytes()), &tried, 0), Some(second));
    }

    #[test]
    fn empty_key_falls_back_to_round_robin() {
        let s = servers(&[1, 1, 1]);
        for p in [plain_hash(), chash()] {
            let mut st = state(p, &s);
            let seq: Vec<usize> = (0..6)
                .map(|_| st.pick(&s, &key(b""), &Tried::new(), 0).unwrap())
                .collect();
            assert_eq!(seq, [0, 1, 2, 0, 1, 2]);
        }
    }

    #[test]
    fn least_conn_prefers_fewest_connections_per_weight() {
        let s = servers(&[1, 2, 1]);
        let mut st = state(Policy::LeastConn, &s);
        // 3/1, 4/2, 1/1.
        assert_eq!(pick_loaded(&mut st, &s, &[3, 4, 1], &Tried::new()), Some(2));
        // 3/1, 4/2, 3/1.
        assert_eq!(pick_loaded(&mut st, &s, &[3, 4, 3], &Tried::new()), Some(1));
        // Missing counts are 0.
        assert_eq!(pick_loaded(&mut st, &s, &[3, 4], &Tried::new()), Some(2));
    }

    #[test]
    fn slow_start_is_refused_where_nginx_plus_refuses_it_and_ramps_least_conn() {
        let mut s = servers(&[1, 1]);
        s[1].slow_start = 10;
        for (p, err) in refusals_without_backup(&s) {
            assert!(
                err.contains("parameter \"slow_start\" (server 10.0.0.2:80)"),
                "{p}: {err}"
            );
        }
        assert!(PolicyState::new(Policy::RoundRobin, &s).is_ok());
        let mut st = state(Policy::LeastConn, &s);
        let zone = MemoryZone::new(2);
        assert!(zone.cell(0).acquire(1) && zone.cell(1).acquire(1));
        let t0 = 1_000_000;
        zone.cell(1).mark_available(t0);
        let refs = zone.refs();
        st.share(zone, &refs);
        let picks = |st: &mut PolicyState, now: u64| -> Vec<usize> {
            (0..6)
                .map(|_| {
                    st.pick(&s, &PickInput::default(), &Tried::new(), now)
                        .unwrap()
                })
                .collect()
        };
        // A second into its 10 s ramp it weighs a tenth: one connection
        // there is ten times the load of one on the other.
        assert_eq!(picks(&mut st, t0 + 1_000), [0; 6]);
        // Ramped up: the loads tie, and round robin takes turns.
        assert_eq!(picks(&mut st, t0 + 10_000), [0, 1, 0, 1, 0, 1]);
    }

    #[test]
    fn least_conn_ties_go_round_robin() {
        let s = servers(&[1, 1]);
        let mut st = state(Policy::LeastConn, &s);
        let seq: Vec<usize> = (0..4)
            .map(|_| pick_loaded(&mut st, &s, &[0, 0], &Tried::new()).unwrap())
            .collect();
        assert_eq!(seq, [0, 1, 0, 1]);

        // Ties by ratio (1/1 = 2/2), weighted: smooth 2:1... here 1:2.
        let s = servers(&[1, 2, 5]);
        let mut st = state(Policy::LeastConn, &s);
        let seq: Vec<usize> = (0..6)
            .map(|_| pick_loaded(&mut st, &s, &[1, 2, 9], &Tried::new()).unwrap())
            .collect();
        assert_eq!(seq, [1, 0, 1, 1, 0, 1]);
    }

    #[test]
    fn least_conn_ties_across_the_64th_server_go_round_robin() {
        // 70 servers, all loaded but 3, 63, 64 and 69: the tie-break takes
        // those four in turn, on both sides of the bitmask's end, and a
        // tried one is skipped whichever side it is on.
        let s = servers(&[1; 70]);
        let mut st = state(Policy::LeastConn, &s);
        let mut conns = [5u32; 70];
        for i in [3, 63, 64, 69] {
            conns[i] = 1;
        }
        let seq: Vec<usize> = (0..8)
            .map(|_| pick_loaded(&mut st, &s, &conns, &Tried::new()).unwrap())
            .collect();
        assert_eq!(seq, [3, 63, 64, 69, 3, 63, 64, 69]);
        let mut tried = Tried::new();
        tried.insert(63);
        tried.insert(69);
        let seq: Vec<usize> = (0..4)
            .map(|_| pick_loaded(&mut st, &s, &conns, &tried).unwrap())
            .collect();
        assert_eq!(seq, [3, 64, 3, 64]);
        // A lighter server past 64 wins alone.
        conns[66] = 0;
        assert_eq!(pick_loaded(&mut st, &s, &conns, &Tried::new()), Some(66));
    }

    #[test]
    fn least_conn_uses_backups_only_when_no_primary_is_available() {
        let mut s = servers(&[1, 1, 1]);
        s[2].backup = true;
        let mut st = state(Policy::LeastConn, &s);
        assert_eq!(
            pick_loaded(&mut st, &s, &[50, 60, 0], &Tried::new()),
            Some(0)
        );
        let mut tried = Tried::new();
        tried.insert(0);
        assert_eq!(pick_loaded(&mut st, &s, &[50, 60, 0], &tried), Some(1));
        s[1].down = true;
        assert_eq!(pick_loaded(&mut st, &s, &[50, 60, 0], &tried), Some(2));
        tried.insert(2);
        assert_eq!(pick_loaded(&mut st, &s, &[50, 60, 0], &tried), None);
    }

    #[test]
    fn random_follows_the_weights() {
        let weights = [1, 2, 3];
        let s = servers(&weights);
        let mut st = state(Policy::Random { two: false }, &s);
        let mut count = [0usize; 3];
        for _ in 0..30_000 {
            count[st
                .pick(&s, &PickInput::default(), &Tried::new(), 0)
                .unwrap()] += 1;
        }
        for (i, &w) in weights.iter().enumerate() {
            let share = count[i] as f64 / 30_000.0;
            assert!((share - f64::from(w) / 6.0).abs() < 0.03, "{count:?}");
        }
    }

    #[test]
    fn random_two_prefers_the_less_loaded() {
        let s = servers(&[1, 1]);
        let mut st = state(Policy::Random { two: true }, &s);
        for _ in 0..100 {
            assert_eq!(pick_loaded(&mut st, &s, &[10, 0], &Tried::new()), Some(1));
            assert_eq!(pick_loaded(&mut st, &s, &[0, 10], &Tried::new()), Some(0));
        }
        // Of three, the most loaded never wins a pair; the least wins both
        // of its pairs.
        let s = servers(&[1, 1, 1]);
        let mut st = state(Policy::Random { two: true }, &s);
        let mut count = [0usize; 3];
        for _ in 0..3_000 {
            count[pick_loaded(&mut st, &s, &[0, 5, 10], &Tried::new()).unwrap()] += 1;
        }
        assert_eq!(count[2], 0, "{count:?}");
        assert!(count[0] > count[1] * 3 / 2, "{count:?}");
        // Relative to weight: 4 conns on weight 4 beat 2 on weight 1.
        let s = servers(&[4, 1]);
        let mut st = state(Policy::Random { two: true }, &s);
        for _ in 0..50 {
            assert_eq!(pick_loaded(&mut st, &s, &[4, 2], &Tried::new()), Some(0));
        }
    }

    fn every_policy() -> Vec<Policy> {
        vec![
            Policy::RoundRobin,
            Policy::IpHash,
            plain_hash(),
            chash(),
            Policy::LeastConn,
            Policy::Random { two: false },
            Policy::Random { two: true },
        ]
    }

    #[test]
    fn no_policy_picks_a_down_tried_or_failed_server() {
        let mut s = servers(&[3, 3, 3, 1, 3]);
        s[0].down = true;
        let mut tried = Tried::new();
        tried.insert(2);
        for p in every_policy() {
            let mut st = state(p.clone(), &s);
            set_conns(&mut st, s.len(), &[0, 0, 0, 9, 0]);
            st.report_failure(&s, 1, 0);
            st.report_failure(&s, 4, 0);
            for i in 0..300u32 {
                let k = format!("/k/{i}");
                let ip = i.to_be_bytes();
                let input = PickInput {
                    key: k.as_bytes(),
                    client: &ip,
                };
                assert_eq!(st.pick(&s, &input, &tried, 1_000), Some(3), "{p}");
            }
            // Nothing left: none.
            let mut all = tried;
            all.insert(3);
            let input = PickInput {
                key: b"/x",
                client: &[1, 2, 3, 4],
            };
            assert_eq!(st.pick(&s, &input, &all, 1_000), None, "{p}");
            // The failed ones come back after fail_timeout.
            assert!(
                (0..200).any(|_| st.pick(&s, &input, &all, 20_000).is_some()),
                "{p}"
            );
        }
    }

    #[test]
    fn a_lone_server_and_an_empty_upstream() {
        for p in every_policy() {
            let s = servers(&[1]);
            let mut st = state(p.clone(), &s);
            let input = PickInput {
                key: b"/x",
                client: &[1, 2, 3, 4],
            };
            assert_eq!(st.pick(&s, &input, &Tried::new(), 0), Some(0), "{p}");
            let mut tried = Tried::new();
            tried.insert(0);
            assert_eq!(st.pick(&s, &input, &tried, 0), None, "{p}");
            let mut st = state(p.clone(), &[]);
            assert_eq!(st.pick(&[], &input, &Tried::new(), 0), None, "{p}");
        }
    }

    #[test]
    fn a_recovering_server_gets_one_probe_per_window() {
        // ip_hash pins the client to one server; once its fail window has
        // passed, one request probes it and the next ones stay away until
        // the new window ends, as nginx's `checked = now` on a pick.
        let s = servers(&[1, 1]);
        let ip = [10, 1, 2, 3];
        let mut st = state(Policy::IpHash, &s);
        let home = st.pick(&s, &client(&ip), &Tried::new(), 0).unwrap();
        st.report_failure(&s, home, 0);
        assert_ne!(st.pick(&s, &client(&ip), &Tried::new(), 5_000), Some(home));
        assert_eq!(st.pick(&s, &client(&ip), &Tried::new(), 10_001), Some(home));
        assert_ne!(st.pick(&s, &client(&ip), &Tried::new(), 10_002), Some(home));
    }

    #[test]
    fn carry_over_keeps_failures() {
        let s = servers(&[1, 1]);
        let mut old = state(plain_hash(), &s);
        old.report_failure(&s, 0, 0);
        let more = servers(&[1, 1, 1]);
        let mut st = state(plain_hash(), &more);
        st.carry_over(&old, &s, &more);
        assert_eq!(st.balancer().health(0).fails(), 1);
        for i in 0..100 {
            let k = format!("{i}");
            assert_ne!(
                st.pick(&more, &key(k.as_bytes()), &Tried::new(), 10),
                Some(0)
            );
        }
    }

    #[test]
    fn retries_never_repeat_a_tried_server() {
        let s = servers(&[5, 1, 3, 1, 2]);
        let mut st = PolicyState::new(Policy::RoundRobin, &s).unwrap();
        let mut at = Attempts::new(64);
        let first = attempt(&mut st, &s, &mut at, 0x1000, 1, Retry::First).unwrap();
        let mut seen = vec![first];
        for retry in [Retry::Failed, Retry::Next, Retry::Failed, Retry::Next] {
            let next = attempt(&mut st, &s, &mut at, 0x1000, 1, retry).unwrap();
            assert!(!seen.contains(&next), "{next} again after {seen:?}");
            seen.push(next);
        }
        assert_eq!(attempt(&mut st, &s, &mut at, 0x1000, 1, Retry::Next), None);

        // Only Failed retries blamed the server before them.
        let blamed: Vec<u32> = seen
            .iter()
            .map(|&i| st.balancer().health(i).fails())
            .collect();
        assert_eq!(blamed, [1, 0, 1, 0, 0]);
    }

    #[test]
    fn a_failed_retry_blames_the_previous_pick_once() {
        let s = servers(&[1, 1, 1]);
        let mut st = PolicyState::new(Policy::RoundRobin, &s).unwrap();
        let mut at = Attempts::new(64);
        let a = attempt(&mut st, &s, &mut at, 7, 1, Retry::First).unwrap();
        let b = attempt(&mut st, &s, &mut at, 7, 1, Retry::Failed).unwrap();
        assert_eq!(st.balancer().health(a).fails(), 1);
        assert_eq!(st.balancer().health(b).fails(), 0);
        // Another request's first attempt avoids the failed one.
        let other = attempt(&mut st, &s, &mut at, 8, 1, Retry::First).unwrap();
        assert_ne!(other, a);
    }

    #[test]
    fn a_retry_across_a_generation_change_starts_fresh() {
        let s = servers(&[1, 1]);
        let mut st = PolicyState::new(Policy::RoundRobin, &s).unwrap();
        let mut at = Attempts::new(64);
        let a = attempt(&mut st, &s, &mut at, 7, 1, Retry::First).unwrap();
        // The table changed: index `a` may be another server now, so it is
        // neither blamed nor skipped.
        let b = attempt(&mut st, &s, &mut at, 7, 2, Retry::Failed).unwrap();
        assert_eq!(st.balancer().health(a).fails(), 0);
        let attempt = at.resume(7, 1, 2).unwrap();
        assert_eq!(attempt.tried.len(), 1);
        assert!(attempt.tried.contains(b));
        assert_eq!(attempt.last, Some(b));
    }

    #[test]
    fn a_reused_request_key_starts_fresh() {
        let s = servers(&[1, 1]);
        let mut st = PolicyState::new(Policy::RoundRobin, &s).unwrap();
        let mut at = Attempts::new(64);
        attempt(&mut st, &s, &mut at, 7, 1, Retry::First).unwrap();
        attempt(&mut st, &s, &mut at, 7, 1, Retry::Next).unwrap();
        assert_eq!(attempt(&mut st, &s, &mut at, 7, 1, Retry::Next), None);
        // A new request at the same address may use any server again.
        assert!(attempt(&mut st, &s, &mut at, 7, 1, Retry::First).is_some());
        assert!(attempt(&mut st, &s, &mut at, 7, 1, Retry::Next).is_some());
    }
}
