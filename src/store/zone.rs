//! Peer state shared by every worker, as nginx's `zone` directive shares an
//! upstream's peers: per server, the failures and their window, and the
//! connections in flight. It lives in a region of the state file of its own,
//! outside the checksummed table, as fixed cells of atomics that any worker
//! updates without a lock.
//!
//! A writer gives each server of the table a cell ([`PeerRef`]: index and
//! tag) under the file lock and keeps it for as long as the server stays in
//! its upstream, so counters survive table changes. A new server gets a cell
//! no table references, zeroed and stamped with a fresh tag before the table
//! naming it is published. The tag is in the same word as each counter, so a
//! worker still routing by an older table, whose server's cell was since
//! given to another server, fails its compare-and-swap instead of counting on
//! the wrong server; it then uses a cell of its own, as a server without a
//! shared cell (the zone was full) does.
//!
//! Over 600 lines with its tests: the cell's words and the rules by which
//! the writer hands cells out and stamps them (new, `checking`, back in
//! rotation) depend on each other and read best side by side.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::stats::{ServerCounters, COUNTERS_LEN};
use crate::table::model::{PeerRef, Table, Upstream};

/// Bytes per cell in the state file: nine words of shared state, then the
/// server's counters ([`crate::store::stats`]).
pub const CELL_LEN: usize = 72 + COUNTERS_LEN;

/// One server's shared state. The counter words hold the tag in their high
/// half; the times are milliseconds of the Unix clock, which every process
/// on the host shares.
///
/// Cloning or comparing one copies or compares its current values: for a
/// worker's own cells, and for tests.
#[repr(C)]
#[derive(Debug, Default)]
pub struct PeerCell {
    /// tag << 32 | connections in flight.
    conns: AtomicU64,
    /// tag << 32 | failures counted in the current window.
    fails: AtomicU64,
    /// When the last failure was reported.
    accessed: AtomicU64,
    /// When the current fail window started.
    checked: AtomicU64,
    /// Active health checks ([`crate::health`]): tag << 32 | verdict and
    /// consecutive counts. Probe results land here, outside the table's
    /// checksum: a flip never raises the table version.
    health: AtomicU64,
    /// Which worker probes the server and when next ([`crate::health`]).
    lease: AtomicU64,
    /// When the last probe ended, Unix ms.
    probed: AtomicU64,
    /// What the last probe found ([`crate::health`]).
    result: AtomicU64,
    /// When the server last became available again (its checks passed, its
    /// fail window ended, it was added or put back), Unix ms; 0: not since
    /// it got the cell. `slow_start` ramps its weight from here, so every
    /// worker ramps alike.
    since: AtomicU64,
    /// What the server has done since it got the cell.
    counters: ServerCounters,
}

const LOW: u64 = 0xffff_ffff;

/// The flags of the health word that take a server out of rotation: down by
/// its checks, or not yet up (`checking`). The rest of the word (counts,
/// the settings' fingerprint) is [`crate::health`]'s; these two live here
/// because the writer sets `checking` on a new cell and the balancer reads
/// both, neither of which may look above the store.
pub const HEALTH_DOWN: u64 = 1 << 22;
pub const HEALTH_CHECKING: u64 = 1 << 23;

/// The health word of a fresh cell stamped `tag`.
pub fn fresh_health(tag: u32, checking: bool) -> u64 {
    u64::from(tag) << 32 | if checking { HEALTH_CHECKING } else { 0 }
}

fn tagged(tag: u32, n: u32) -> u64 {
    u64::from(tag) << 32 | u64::from(n)
}

impl PeerCell {
    /// Makes this the fresh cell of a server stamped `tag`: no connections,
    /// no failures.
    pub fn reset(&self, tag: u32) {
        self.reset_checked(tag, false);
    }

    /// [`reset`](Self::reset), the server starting as `checking` (down until
    /// its first `rise` probes pass) when `checking`: a new server of an
    /// upstream with `check ... default_down=true`.
    pub fn reset_checked(&self, tag: u32, checking: bool) {
        self.accessed.store(0, Ordering::Relaxed);
        self.checked.store(0, Ordering::Relaxed);
        self.lease.store(0, Ordering::Relaxed);
        self.probed.store(0, Ordering::Relaxed);
        self.result.store(0, Ordering::Relaxed);
        self.since.store(0, Ordering::Relaxed);
        self.counters.reset();
        self.health
            .store(fresh_health(tag, checking), Ordering::Release);
        self.conns.store(tagged(tag, 0), Ordering::Release);
        self.fails.store(tagged(tag, 0), Ordering::Release);
    }

    /// The bytes of a cell just [`reset`](Self::reset) for `tag`, for a file
    /// image built before anything maps it (atomics of this host, so native
    /// byte order).
    pub fn image(tag: u32, checking: bool) -> [u8; CELL_LEN] {
        let mut b = [0u8; CELL_LEN];
        let word = tagged(tag, 0).to_ne_bytes();
        // conns, fails, then health at +32: the field order of this
        // `repr(C)` struct.
        b[0..8].copy_from_slice(&word);
        b[8..16].copy_from_slice(&word);
        b[32..40].copy_from_slice(&fresh_health(tag, checking).to_ne_bytes());
        b
    }

    /// The server's counters. Count only after [`holds`](Self::holds) said
    /// the cell is the server's (see [`crate::store::stats`]).
    pub fn counters(&self) -> &ServerCounters {
        &self.counters
    }

    /// The active-check words, for [`crate::health`].
    pub fn health_word(&self) -> &AtomicU64 {
        &self.health
    }

    pub fn lease_word(&self) -> &AtomicU64 {
        &self.lease
    }

    pub fn probed_word(&self) -> &AtomicU64 {
        &self.probed
    }

    pub fn result_word(&self) -> &AtomicU64 {
        &self.result
    }

    /// When the server last became available again, Unix ms (0: not since
    /// it got the cell).
    pub fn available_since(&self) -> u64 {
        self.since.load(Ordering::Acquire)
    }

    /// The server became available again at `now_ms`: `slow_start` ramps
    /// its weight from now.
    pub fn mark_available(&self, now_ms: u64) {
        self.since.store(now_ms, Ordering::Release);
    }

    /// Whether active checks hold the server out of rotation (down, or
    /// still `checking`); false when the word is another server's.
    pub fn check_down(&self, tag: u32) -> bool {
        let w = self.health.load(Ordering::Acquire);
        (w >> 32) as u32 == tag && w & (HEALTH_DOWN | HEALTH_CHECKING) != 0
    }

    /// Whether the cell still belongs to the server stamped `tag`.
    pub fn holds(&self, tag: u32) -> bool {
        (self.fails.load(Ordering::Acquire) >> 32) as u32 == tag
    }

    pub fn fails(&self) -> u32 {
        (self.fails.load(Ordering::Acquire) & LOW) as u32
    }

    pub fn accessed_ms(&self) -> u64 {
        self.accessed.load(Ordering::Acquire)
    }

    pub fn checked_ms(&self) -> u64 {
        self.checked.load(Ordering::Acquire)
    }

    pub fn conns(&self) -> u32 {
        (self.conns.load(Ordering::Acquire) & LOW) as u32
    }

    /// Counts a failure of the server stamped `tag` at `now_ms`; false when
    /// the cell is no longer its own.
    pub fn add_failure(&self, tag: u32, now_ms: u64) -> bool {
        let counted = update(&self.fails, tag, |n| Some(n.saturating_add(1)));
        if counted {
            self.accessed.store(now_ms, Ordering::Release);
            self.checked.store(now_ms, Ordering::Release);
        }
        counted
    }

    /// Forgets the failures, if they are still the `seen` ones: of two
    /// workers presuming the same recovery, one resets and neither loses a
    /// failure counted meanwhile.
    pub fn clear_failures(&self, tag: u32, seen: u32) {
        let _ = self.fails.compare_exchange(
            tagged(tag, seen),
            tagged(tag, 0),
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// Opens a new fail window at `now_ms` if the current one still started
    /// at `seen_ms`. True for the one worker that opened it: after the
    /// window of a disabled server, that worker's request is the probe.
    pub fn open_window(&self, seen_ms: u64, now_ms: u64) -> bool {
        self.checked
            .compare_exchange(seen_ms, now_ms, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// One more connection in flight; false when the cell is not `tag`'s.
    pub fn acquire(&self, tag: u32) -> bool {
        update(&self.conns, tag, |n| Some(n.saturating_add(1)))
    }

    /// One connection fewer. Never below zero: a count already reset (a new
    /// nginx) stays at zero.
    pub fn release(&self, tag: u32) -> bool {
        update(&self.conns, tag, |n| n.checked_sub(1))
    }

    /// Zeroes the connection count, keeping the tag: connections counted by
    /// processes that are gone (at a fresh start of nginx).
    pub fn clear_conns(&self) {
        let word = self.conns.load(Ordering::Acquire);
        let _ = self
            .conns
            .compare_exchange(word, word & !LOW, Ordering::AcqRel, Ordering::Acquire);
    }
}

impl Clone for PeerCell {
    fn clone(&self) -> PeerCell {
        let copy = |w: &AtomicU64| AtomicU64::new(w.load(Ordering::Acquire));
        PeerCell {
            conns: copy(&self.conns),
            fails: copy(&self.fails),
            accessed: copy(&self.accessed),
            checked: copy(&self.checked),
            health: copy(&self.health),
            lease: copy(&self.lease),
            probed: copy(&self.probed),
            result: copy(&self.result),
            since: copy(&self.since),
            counters: {
                let c = ServerCounters::default();
                c.copy_from(&self.counters);
                c
            },
        }
    }
}

impl PartialEq for PeerCell {
    fn eq(&self, other: &PeerCell) -> bool {
        let words = |c: &PeerCell| {
            [
                &c.conns,
                &c.fails,
                &c.accessed,
                &c.checked,
                &c.health,
                &c.lease,
                &c.probed,
                &c.result,
                &c.since,
            ]
            .map(|w| w.load(Ordering::Acquire))
        };
        words(self) == words(other) && self.counters.values() == other.counters.values()
    }
}

impl Eq for PeerCell {}

/// Applies `f` to the low half of `word` while its high half is `tag`.
fn update(word: &AtomicU64, tag: u32, f: impl Fn(u32) -> Option<u32>) -> bool {
    word.fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
        ((w >> 32) as u32 == tag)
            .then(|| f((w & LOW) as u32))
            .flatten()
            .map(|n| tagged(tag, n))
    })
    .is_ok()
        || (word.load(Ordering::Acquire) >> 32) as u32 == tag
}

/// The zone as a worker sees it: the cells of the state file it maps (none
/// for a balancer that is not backed by one).
#[derive(Clone, Copy, Debug, Default)]
pub struct Zone<'a> {
    cells: &'a [PeerCell],
}

impl<'a> Zone<'a> {
    pub fn new(cells: &'a [PeerCell]) -> Zone<'a> {
        Zone { cells }
    }

    /// The cell `r` names, if it is in the zone and still stamped with
    /// `r`'s tag.
    pub fn cell(&self, r: PeerRef) -> Option<&'a PeerCell> {
        self.cells
            .get(r.index as usize)
            .filter(|c| !r.is_none() && c.holds(r.tag))
    }

    pub fn cells(&self) -> &'a [PeerCell] {
        self.cells
    }

    /// Gives back a connection counted in the cell `r` names, if the cell
    /// is still its server's.
    pub fn release(&self, r: PeerRef) {
        if let Some(cell) = self.cell(r) {
            cell.release(r.tag);
        }
    }

    pub fn len(&self) -> usize {
        self.cells.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cells.is_empty()
    }
}

/// One server's shared state, for status views.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerStatus {
    pub server: String,
    /// Connections in flight in the whole nginx (counted for `least_conn`
    /// and `random two`).
    pub conns: u32,
    /// Failures in the current fail window, seen by every worker.
    pub fails: u32,
    /// Whether the server has a cell in the zone; without one (the zone was
    /// full) each worker counts for itself and nothing shows here.
    pub shared: bool,
}

/// The shared state of each server of `u`, in its order.
pub fn status(zone: Zone<'_>, u: &Upstream) -> Vec<PeerStatus> {
    u.servers
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let cell = zone.cell(u.peer(i));
            PeerStatus {
                server: s.addr.to_string(),
                conns: cell.map_or(0, PeerCell::conns),
                fails: cell.map_or(0, PeerCell::fails),
                shared: cell.is_some(),
            }
        })
        .collect()
}

/// Where a balancer finds the zone: the state file its table came from.
pub trait ZoneSource: Send + Sync {
    fn zone(&self) -> Zone<'_>;
}

/// Which of the cells `given` (newly given by [`assign`] in `table`) start
/// `checking`: those of upstreams with `check ... default_down=true` (the
/// default), whose servers take no traffic until their first `rise` probes
/// pass. Index for index with `given`; for the writer, before it publishes.
pub fn starts_checking(table: &Table, given: &[PeerRef]) -> Vec<bool> {
    if given.is_empty() {
        return Vec::new();
    }
    let wanted: HashSet<u32> = given.iter().map(|r| r.index).collect();
    let mut checking = HashSet::new();
    for u in &table.upstreams {
        if !u.check.line.as_ref().is_some_and(|l| l.default_down) {
            continue;
        }
        for i in 0..u.servers.len() {
            let r = u.peer(i);
            if wanted.contains(&r.index) {
                checking.insert(r.index);
            }
        }
    }
    given.iter().map(|r| checking.contains(&r.index)).collect()
}

/// The cells of the servers of `next` with a `slow_start` that come into
/// rotation with it: not `down` in `next`, and new to their upstream or
/// `down` in `current` (the table `next` replaces). Only the upstreams
/// `changed` marks (index for index with `next.upstreams`) can have any.
/// The writer marks them available before it publishes `next`, so no
/// worker routes to them at full weight first.
pub fn coming_back(next: &Table, current: &Table, changed: &[bool]) -> Vec<PeerRef> {
    let mut back = Vec::new();
    for ((u, old), &changed) in next.paired(current).into_iter().zip(changed) {
        if !changed || u.servers.iter().all(|s| s.slow_start == 0) {
            continue;
        }
        for (i, s) in u.servers.iter().enumerate() {
            let r = u.peer(i);
            if s.slow_start == 0 || s.down || r.is_none() {
                continue;
            }
            // The store keeps a server's cell while it stays: the same cell
            // in the old upstream is the same server.
            let was_up = old.is_some_and(|o| {
                (0..o.servers.len()).any(|j| o.peer(j) == r && !o.servers[j].down)
            });
            if !was_up {
                back.push(r);
            }
        }
    }
    back
}

/// Gives a cell to every server of the upstreams of `next` that `changed`
/// marks (index for index with `next.upstreams`), for a zone of `capacity`
/// cells: the cell its upstream's server at the same address has in `current`
/// (the table `next` replaces), else a free one stamped `tag`, else none.
/// Free means referenced by neither table, so a writer that dies before
/// publishing `next` has disturbed no cell `current` uses. Returns the cells
/// newly given, which the caller must [`reset`](PeerCell::reset) before
/// `next` is published.
pub fn assign(
    next: &mut Table,
    current: &Table,
    changed: &[bool],
    capacity: u32,
    tag: u32,
) -> Vec<PeerRef> {
    let mut free = FreeCells {
        tables: [current, next],
        capacity,
        used: None,
        at: 0,
    };
    let mut given = Vec::new();
    let assigned: Vec<Option<Vec<PeerRef>>> = next
        .paired(current)
        .into_iter()
        .zip(changed)
        .map(|((u, old), &changed)| {
            if !changed && u.peers.len() == u.servers.len() {
                return None;
            }
            let mut taken = vec![false; old.map_or(0, |o| o.servers.len())];
            let peers = u.servers.iter().map(|s| {
                // The same address in the same upstream keeps its cell;
                // repeated addresses are matched in order, one to one.
                let kept = old.and_then(|o| {
                    let j = (0..o.servers.len()).find(|&j| {
                        !taken[j] && o.servers[j].addr == s.addr && !o.peer(j).is_none()
                    })?;
                    taken[j] = true;
                    Some(o.peer(j))
                });
                kept.or_else(|| {
                    let r = PeerRef {
                        index: free.next()?,
                        tag,
                    };
                    given.push(r);
                    Some(r)
                })
                .unwrap_or(PeerRef::NONE)
            });
            Some(peers.collect())
        })
        .collect();
    for (u, peers) in next.upstreams.iter_mut().zip(assigned) {
        if let Some(peers) = peers {
            Arc::make_mut(u).peers = peers;
        }
    }
    given
}

/// The cells neither of two tables names, in ascending order. Which cells
/// are named is found only when a server first needs a fresh one (most
/// writes keep every server's cell), and only up to the highest named: a
/// 16 MiB file has 175,000 cells, and the store gives out the lowest free
/// ones first.
struct FreeCells<'a> {
    tables: [&'a Table; 2],
    capacity: u32,
    /// One bit per cell up to the highest a table names, set when one does.
    used: Option<Vec<u64>>,
    /// The next cell to look at.
    at: u32,
}

impl FreeCells<'_> {
    fn next(&mut self) -> Option<u32> {
        let (tables, capacity) = (self.tables, self.capacity);
        let used = self.used.get_or_insert_with(|| {
            let named = || {
                tables
                    .iter()
                    .flat_map(|t| &t.upstreams)
                    .flat_map(|u| &u.peers)
                    .map(|p| p.index)
                    .filter(|&i| i < capacity)
            };
            let words = named().max().map_or(0, |i| i / 64 + 1);
            let mut bits = vec![0u64; words as usize];
            for i in named() {
                bits[(i / 64) as usize] |= 1 << (i % 64);
            }
            bits
        });
        while self.at < capacity {
            let Some(&bits) = used.get((self.at / 64) as usize) else {
                // Past the highest cell named: all free.
                self.at += 1;
                return Some(self.at - 1);
            };
            // The cells below `at` in its word were looked at already.
            let word = bits | ((1u64 << (self.at % 64)) - 1);
            if word == u64::MAX {
                self.at = (self.at / 64 + 1) * 64;
                continue;
            }
            let i = (self.at / 64) * 64 + (!word).trailing_zeros();
            self.at = i + 1;
            return (i < capacity).then_some(i);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::servers;

    #[test]
    fn counters_belong_to_their_tag() {
        let c = PeerCell::default();
        c.reset(7);
        assert!(c.holds(7) && !c.holds(8));
        assert!(c.acquire(7) && c.acquire(7));
        assert!(c.add_failure(7, 1_000));
        assert_eq!(
            (c.conns(), c.fails(), c.accessed_ms(), c.checked_ms()),
            (2, 1, 1_000, 1_000)
        );

        // Another server got the cell: the old tag counts nothing.
        c.reset(8);
        assert!(!c.acquire(7) && !c.release(7) && !c.add_failure(7, 2_000));
        assert_eq!((c.conns(), c.fails(), c.checked_ms()), (0, 0, 0));
        assert!(c.acquire(8));
        assert_eq!(c.conns(), 1);
    }

    #[test]
    fn a_cell_image_reads_as_a_reset_cell() {
        let reset = PeerCell::default();
        reset.reset(9);
        for checking in [false, true] {
            reset.reset_checked(9, checking);
            let b = PeerCell::image(9, checking);
            let word =
                |at: usize| AtomicU64::new(u64::from_ne_bytes(b[at..at + 8].try_into().unwrap()));
            let read = PeerCell {
                conns: word(0),
                fails: word(8),
                accessed: word(16),
                checked: word(24),
                health: word(32),
                lease: word(40),
                probed: word(48),
                result: word(56),
                since: word(64),
                counters: ServerCounters::default(),
            };
            assert_eq!(read, reset);
            assert!(read.holds(9));
            assert_eq!(read.check_down(9), checking);
        }
    }

    #[test]
    fn release_stops_at_zero_and_clear_keeps_the_tag() {
        let c = PeerCell::default();
        c.reset(3);
        assert!(c.release(3), "still the cell of tag 3");
        assert_eq!(c.conns(), 0);
        c.acquire(3);
        c.acquire(3);
        c.clear_conns();
        assert_eq!(c.conns(), 0);
        assert!(c.holds(3) && c.acquire(3));
        assert_eq!(c.conns(), 1);
    }

    #[test]
    fn a_reset_loses_no_failure_counted_meanwhile() {
        let c = PeerCell::default();
        c.reset(1);
        c.add_failure(1, 10);
        let seen = c.fails();
        c.add_failure(1, 11);
        c.clear_failures(1, seen);
        assert_eq!(c.fails(), 2, "the second failure came after the look");
        c.clear_failures(1, 2);
        assert_eq!(c.fails(), 0);
    }

    #[test]
    fn one_opener_per_window() {
        let c = PeerCell::default();
        c.reset(1);
        c.add_failure(1, 100);
        assert!(c.open_window(100, 20_000));
        assert!(!c.open_window(100, 20_001), "another worker opened it");
        assert_eq!(c.checked_ms(), 20_000);
    }

    #[test]
    fn the_zone_answers_only_for_live_refs() {
        let cells: Vec<PeerCell> = (0..2).map(|_| PeerCell::default()).collect();
        cells[1].reset(5);
        let z = Zone::new(&cells);
        assert!(z.cell(PeerRef { index: 1, tag: 5 }).is_some());
        assert!(z.cell(PeerRef { index: 1, tag: 6 }).is_none());
        assert!(
            z.cell(PeerRef { index: 2, tag: 5 }).is_none(),
            "past the end"
        );
        assert!(z.cell(PeerRef::NONE).is_none());
        assert!(Zone::default().cell(PeerRef { index: 0, tag: 1 }).is_none());
    }

    fn upstream(name: &str, ports: &[u16]) -> Upstream {
        let mut s = servers(&vec![1; ports.len()]);
        for (s, &p) in s.iter_mut().zip(ports) {
            s.addr = crate::table::model::Address::Inet(([10, 0, 0, 1], p).into());
        }
        Upstream::new(name, s)
    }

    fn ports_and_cells(t: &Table, name: &str) -> Vec<(u16, PeerRef)> {
        let u = t.upstreams.iter().find(|u| u.name == name).unwrap();
        (0..u.servers.len())
            .map(|i| (u.servers[i].addr.port(), u.peer(i)))
            .collect()
    }

    #[test]
    fn servers_that_stay_keep_their_cells_and_new_ones_get_free_cells() {
        let empty = Table::default();
        let mut t1 = Table::default();
        t1.upsert(upstream("a", &[1, 2, 3]));
        t1.upsert(upstream("b", &[1]));
        let given = assign(&mut t1, &empty, &[true, true], 8, 1);
        assert_eq!(given.len(), 4);
        let cell = |index| PeerRef { index, tag: 1 };
        assert_eq!(
            ports_and_cells(&t1, "a"),
            [(1, cell(0)), (2, cell(1)), (3, cell(2))]
        );
        assert_eq!(ports_and_cells(&t1, "b"), [(1, cell(3))]);

        // a: 2 goes, 3 and 1 stay (reordered), 4 comes. b is untouched.
        let mut t2 = t1.clone();
        t2.upsert(upstream("a", &[3, 4, 1]));
        let given = assign(&mut t2, &t1, &[true, false], 8, 2);
        // Cell 1 (server 2's) is still used by t1: not given out yet.
        assert_eq!(given, [PeerRef { index: 4, tag: 2 }]);
        assert_eq!(
            ports_and_cells(&t2, "a"),
            [
                (3, cell(2)),
                (4, PeerRef { index: 4, tag: 2 }),
                (1, cell(0))
            ]
        );
        assert!(Arc::ptr_eq(&t1.upstreams[1], &t2.upstreams[1]));

        // Once t2 is current, cell 1 is free again.
        let mut t3 = t2.clone();
        t3.upsert(upstream("c", &[9]));
        let given = assign(&mut t3, &t2, &[false, false, true], 8, 3);
        assert_eq!(given, [PeerRef { index: 1, tag: 3 }]);
    }

    #[test]
    fn a_full_zone_leaves_servers_without_a_cell() {
        let mut t = Table::default();
        t.upsert(upstream("a", &[1, 2, 3]));
        let given = assign(&mut t, &Table::default(), &[true], 2, 1);
        assert_eq!(given.len(), 2);
        assert!(t.upstreams[0].peer(2).is_none());
        assert!(t.upstreams[0].peer(5).is_none(), "past the end");
    }

    /// Free cells are found in the words of the bit set past used ones,
    /// with the holes between them, and none past the zone's last cell.
    #[test]
    fn free_cells_are_found_across_words_up_to_the_last() {
        let ports: Vec<u16> = (1..=70).collect();
        let mut t1 = Table::default();
        t1.upsert(upstream("a", &ports));
        assign(&mut t1, &Table::default(), &[true], 130, 1);
        // Servers 2 and 66 leave a (cells 1 and 65), once t2 is current.
        let mut t2 = t1.clone();
        let kept: Vec<u16> = ports
            .iter()
            .copied()
            .filter(|p| ![2, 66].contains(p))
            .collect();
        t2.upsert(upstream("a", &kept));
        assign(&mut t2, &t1, &[true], 130, 2);
        let mut t3 = t2.clone();
        t3.upsert(upstream("b", &(100..165).collect::<Vec<u16>>()));
        let given = assign(&mut t3, &t2, &[false, true], 130, 3);
        let cells: Vec<u32> = given.iter().map(|r| r.index).collect();
        let expected: Vec<u32> = [1, 65].into_iter().chain(70..130).collect();
        assert_eq!(cells, expected);
        let b = &t3.upstreams[1];
        assert!((0..62).all(|i| !b.peer(i).is_none()));
        assert!((62..65).all(|i| b.peer(i).is_none()), "the zone is full");
    }
}
