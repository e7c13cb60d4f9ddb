//! Active health checks (nginx_upstream_check_module's `check` lines) over
//! the shared peer cells of the zone ([`crate::zone`]): which servers are due
//! a probe in this worker, the lease that makes one probe per server per
//! interval in the whole nginx, and what a probe's result does to the
//! server's verdict.
//!
//! The probes themselves are cosockets in `ngx.timer` callbacks (Lua,
//! `src/binding/probe.lua`); everything decided about them is here, in plain
//! Rust over the cells, so it is tested without nginx.
//!
//! Health belongs to (upstream, server) because the cell does: the store
//! gives each server of each upstream its own cell and keeps it while the
//! server stays in that upstream. Results go into the cell, outside the
//! table's checksum: a flip never raises the table version and is seen by
//! every worker on its next pick.
//!
//! The words of a cell this module owns (see `store/layout.rs`):
//!
//! ```text
//! health  tag << 32 | fingerprint << 24 | checking << 23 | down << 22
//!                   | consecutive failures << 11 | consecutive passes
//! lease   next probe, Unix ms << 22 | pid of the worker that probes (0: none)
//! probed  end of the last probe, Unix ms
//! result  lateness ms << 44 | latency ms << 24 | outcome << 16 | HTTP status
//! ```
//!
//! The fingerprint (8 bits of a CRC of the upstream's check settings) tells
//! a probe under new settings: the verdict stays, the counts restart. Two
//! different settings share a fingerprint once in 255; the counts then carry
//! on instead of restarting, which changes no verdict by itself.

pub mod status;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;

use crate::model::{CheckSettings, CheckType, ExpectAlive, Table};
use crate::zone::{PeerCell, PeerRef, Zone};

const COUNT_BITS: u32 = 11;
const COUNT_MAX: u64 = (1 << COUNT_BITS) - 1;
const FAILS_SHIFT: u32 = COUNT_BITS;
const DOWN: u64 = 1 << 22;
const CHECKING: u64 = 1 << 23;
const FP_SHIFT: u32 = 24;

/// Bits of the lease word that hold the owner's pid: Linux pids are below
/// 2^22 (`pid_max`'s ceiling).
const PID_BITS: u32 = 22;
const PID_MASK: u64 = (1 << PID_BITS) - 1;

/// Probes in flight in one worker at most; a server due while the worker is
/// at the cap waits for the next tick and is reported late, not failed.
pub const MAX_IN_FLIGHT: usize = 64;

/// A timed-out probe that took this much longer than its timeout ran under
/// an event loop too busy to see the answer: not counted as a failure.
const LATE_SLACK_MS: u64 = 100;

/// The health word of a fresh cell stamped `tag`.
pub fn fresh_word(tag: u32, checking: bool) -> u64 {
    u64::from(tag) << 32 | if checking { CHECKING } else { 0 }
}

/// Whether health word `w` holds its server out of rotation (down, or not
/// yet up under `default_down`), for the server stamped `tag`.
pub fn word_down(w: u64, tag: u32) -> bool {
    (w >> 32) as u32 == tag && w & (DOWN | CHECKING) != 0
}

/// One server's active-check state, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Verdict {
    pub down: bool,
    pub checking: bool,
    /// Consecutive passing probes (the module's `rise` counter).
    pub passes: u32,
    /// Consecutive failed probes (the module's `fall` counter).
    pub failures: u32,
    pub fingerprint: u8,
}

impl Verdict {
    fn decode(w: u64) -> Verdict {
        Verdict {
            down: w & DOWN != 0,
            checking: w & CHECKING != 0,
            passes: (w & COUNT_MAX) as u32,
            failures: (w >> FAILS_SHIFT & COUNT_MAX) as u32,
            fingerprint: (w >> FP_SHIFT & 0xff) as u8,
        }
    }

    fn encode(self, tag: u32) -> u64 {
        u64::from(tag) << 32
            | u64::from(self.fingerprint) << FP_SHIFT
            | if self.checking { CHECKING } else { 0 }
            | if self.down { DOWN } else { 0 }
            | (u64::from(self.failures).min(COUNT_MAX)) << FAILS_SHIFT
            | u64::from(self.passes).min(COUNT_MAX)
    }

    /// The module's word for it: `up` or `down` (`checking` is down too: it
    /// takes no traffic).
    pub fn status(self) -> &'static str {
        if self.down || self.checking {
            "down"
        } else {
            "up"
        }
    }
}

/// The verdict in `cell` for the server stamped `tag`; `None` when the
/// cell is another server's.
pub fn verdict(cell: &PeerCell, tag: u32) -> Option<Verdict> {
    let w = cell.health_word().load(Ordering::Acquire);
    ((w >> 32) as u32 == tag).then(|| Verdict::decode(w))
}

/// The servers of `table` whose cells `given` names that start `checking`:
/// those of upstreams with `check ... default_down=true` (the default).
/// Index for index with `given`; for the writer, before it publishes.
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

/// 1..=255: which check settings a verdict's counts were made under.
pub fn fingerprint(c: &CheckSettings) -> u8 {
    let text = format!("{c:?}");
    (crc32fast::hash(text.as_bytes()) % 255 + 1) as u8
}

fn lease(due_ms: u64, pid: u32) -> u64 {
    due_ms << PID_BITS | (u64::from(pid) & PID_MASK)
}

fn lease_parts(w: u64) -> (u64, u32) {
    (w >> PID_BITS, (w & PID_MASK) as u32)
}

/// What a probe found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Passed,
    /// An HTTP status outside `check_http_expect_alive`.
    BadStatus,
    Timeout,
    /// Connecting failed (refused, unreachable).
    Connect,
    /// Reset, closed early, or another socket error after connecting.
    Socket,
    /// Not an HTTP status line.
    Garbage,
    Tls,
    /// Timed out under a busy event loop, or could not start: not counted.
    Late,
}

impl Outcome {
    const ALL: [Outcome; 8] = [
        Outcome::Passed,
        Outcome::BadStatus,
        Outcome::Timeout,
        Outcome::Connect,
        Outcome::Socket,
        Outcome::Garbage,
        Outcome::Tls,
        Outcome::Late,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Outcome::Passed => "passed",
            Outcome::BadStatus => "bad status",
            Outcome::Timeout => "timeout",
            Outcome::Connect => "connect failed",
            Outcome::Socket => "connection lost",
            Outcome::Garbage => "bad status line",
            Outcome::Tls => "tls handshake failed",
            Outcome::Late => "late",
        }
    }

    fn code(self) -> u64 {
        Outcome::ALL.iter().position(|&o| o == self).unwrap_or(0) as u64 + 1
    }

    fn from_code(c: u64) -> Option<Outcome> {
        Outcome::ALL.get((c as usize).checked_sub(1)?).copied()
    }
}

/// The last probe of a server, decoded from its cell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LastProbe {
    pub outcome: Outcome,
    /// The HTTP status, 0 when none was read.
    pub status: u16,
    pub latency_ms: u32,
    /// How long after it was due the probe started.
    pub late_ms: u32,
    /// When it ended, Unix ms.
    pub at_ms: u64,
}

const FIELD20: u64 = (1 << 20) - 1;

fn result_word(outcome: Outcome, status: u16, latency_ms: u64, late_ms: u64) -> u64 {
    late_ms.min(FIELD20) << 44
        | latency_ms.min(FIELD20) << 24
        | outcome.code() << 16
        | u64::from(status)
}

/// The last probe recorded in `cell`, if any.
pub fn last_probe(cell: &PeerCell) -> Option<LastProbe> {
    let w = cell.result_word().load(Ordering::Acquire);
    Some(LastProbe {
        outcome: Outcome::from_code(w >> 16 & 0xff)?,
        status: (w & 0xffff) as u16,
        latency_ms: (w >> 24 & FIELD20) as u32,
        late_ms: (w >> 44 & FIELD20) as u32,
        at_ms: cell.probed_word().load(Ordering::Acquire),
    })
}

/// Classifies what the Lua side saw: an HTTP status read, or a cosocket
/// error string, after `elapsed_ms`.
pub fn classify(
    kind: CheckType,
    expect: ExpectAlive,
    status: Option<u16>,
    err: Option<&str>,
    elapsed_ms: u64,
    timeout_ms: u32,
) -> Outcome {
    if let Some(err) = err {
        return match err {
            e if e.starts_with("late") => Outcome::Late,
            e if e.contains("timeout") => {
                let t = u64::from(timeout_ms);
                if elapsed_ms > t + t / 2 + LATE_SLACK_MS {
                    Outcome::Late
                } else {
                    Outcome::Timeout
                }
            }
            e if e.starts_with("connect: ") => Outcome::Connect,
            e if e.starts_with("tls: ") => Outcome::Tls,
            e if e.starts_with("bad status line") => Outcome::Garbage,
            _ => Outcome::Socket,
        };
    }
    match (kind, status) {
        (CheckType::Http | CheckType::Https, Some(code)) => {
            let class = code / 100;
            let alive = (2..=5).contains(&class)
                && ExpectAlive::bit(ExpectAlive::NAMES[usize::from(class - 2)])
                    .is_some_and(|bit| expect.bits() & bit != 0);
            if alive {
                Outcome::Passed
            } else {
                Outcome::BadStatus
            }
        }
        (CheckType::Http | CheckType::Https, None) => Outcome::Garbage,
        _ => Outcome::Passed,
    }
}

/// A flip a probe caused, for the error log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flip {
    pub upstream: String,
    pub server: String,
    pub up: bool,
    pub count: u32,
    pub outcome: Outcome,
}

/// Applies one probe's outcome to the verdict in `cell` for the server
/// stamped `tag`, under settings `fp` with thresholds `rise` and `fall`.
/// Returns the verdict before and after, or `None` when the cell is no
/// longer the server's. A pass also forgets the passive failures, so a
/// server that failed passively is brought back by its passing probes.
pub fn record(
    cell: &PeerCell,
    tag: u32,
    fp: u8,
    rise: u32,
    fall: u32,
    outcome: Outcome,
) -> Option<(Verdict, Verdict)> {
    let word = cell.health_word();
    let mut before = Verdict::default();
    let mut after = Verdict::default();
    word.fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
        if (w >> 32) as u32 != tag {
            return None;
        }
        before = Verdict::decode(w);
        let mut v = before;
        if v.fingerprint != fp {
            // New settings: the verdict stays, the counts restart.
            v = Verdict {
                passes: 0,
                failures: 0,
                fingerprint: fp,
                ..v
            };
        }
        match outcome {
            Outcome::Late => {}
            Outcome::Passed => {
                v.passes = (v.passes + 1).min(COUNT_MAX as u32);
                v.failures = 0;
                if (v.down || v.checking) && v.passes >= rise {
                    v.down = false;
                    v.checking = false;
                }
            }
            _ => {
                v.failures = (v.failures + 1).min(COUNT_MAX as u32);
                v.passes = 0;
                if !v.down && v.failures >= fall {
                    v.down = true;
                    v.checking = false;
                }
            }
        }
        after = v;
        Some(v.encode(tag))
    })
    .ok()?;
    if outcome == Outcome::Passed {
        let fails = cell.fails();
        if fails > 0 {
            cell.clear_failures(tag, fails);
        }
    }
    Some((before, after))
}

/// What one probe needs, for the Lua side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    pub token: u64,
    /// Host as a cosocket takes it (`127.0.0.1`, `::1`, `unix:/path`).
    pub host: String,
    /// 0 for a unix socket.
    pub port: u16,
    pub timeout_ms: u32,
    pub tls: bool,
    /// The request of an http probe; `None` for tcp and ssl_hello.
    pub send: Option<String>,
}

/// A probe in flight in this worker.
#[derive(Clone, Debug)]
struct InFlight {
    cell: PeerRef,
    fp: u8,
    rise: u32,
    fall: u32,
    timeout_ms: u32,
    kind: CheckType,
    expect: ExpectAlive,
    late_ms: u64,
    upstream: String,
    server: String,
}

/// An upstream with a check line, as the walk needs it.
#[derive(Clone, Debug)]
struct Checked {
    id: usize,
    fp: u8,
}

/// One worker's prober: walks the servers with checks on each tick, takes
/// their leases, and records the results of its probes.
#[derive(Debug)]
pub struct Prober {
    in_flight: HashMap<u64, InFlight>,
    busy: HashSet<u32>,
    next_token: u64,
    rng: u64,
    /// The upstreams with a check line in the table of generation `seen`.
    checked: Vec<Checked>,
    seen: Option<u64>,
    cap: usize,
}

impl Prober {
    pub fn new(seed: u64, cap: usize) -> Prober {
        Prober {
            in_flight: HashMap::new(),
            busy: HashSet::new(),
            next_token: 1,
            rng: seed | 1,
            checked: Vec::new(),
            seen: None,
            cap,
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    fn random_below(&mut self, n: u32) -> u64 {
        if n == 0 {
            return 0;
        }
        // xorshift64: spreading probes needs no better.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng % (u64::from(n) + 1)
    }

    /// The probes worker `me` starts now, for the table of generation
    /// `seen`, given the live workers `live` (pids, any order; `me` among
    /// them or not). Takes the leases it needs: a server without a live
    /// owner goes to the live worker its cell index picks (so the servers
    /// spread over the workers), probed at once (within `jitter`); a
    /// server whose owner let it go a whole interval (or its timeout, if
    /// longer) past due is taken over.
    pub fn due(
        &mut self,
        table: &Table,
        seen: u64,
        zone: Zone<'_>,
        now_ms: u64,
        me: u32,
        live: &[u32],
    ) -> Vec<Job> {
        if self.seen != Some(seen) {
            self.checked = table
                .upstreams
                .iter()
                .enumerate()
                .filter(|(_, u)| u.check.line.is_some())
                .map(|(id, u)| Checked {
                    id,
                    fp: fingerprint(&u.check),
                })
                .collect();
            self.seen = Some(seen);
        }
        let mut workers: Vec<u32> = live.iter().copied().filter(|&p| p != 0).collect();
        if !workers.contains(&me) {
            workers.push(me);
        }
        workers.sort_unstable();
        workers.dedup();
        let mut jobs = Vec::new();
        let checked = std::mem::take(&mut self.checked);
        for c in &checked {
            let Some(u) = table.upstreams.get(c.id) else {
                continue;
            };
            let Some(line) = &u.check.line else { continue };
            let interval = u64::from(line.interval);
            let overdue = interval.max(u64::from(line.timeout));
            for (i, s) in u.servers.iter().enumerate() {
                let r = u.peer(i);
                let Some(cell) = zone.cell(r) else { continue };
                let word = cell.lease_word();
                let seen_lease = word.load(Ordering::Acquire);
                let (due, owner) = lease_parts(seen_lease);
                let mine = if owner == me {
                    now_ms >= due
                } else if owner == 0 || !workers.contains(&owner) {
                    let pick = workers[r.index as usize % workers.len()];
                    let at = now_ms + self.random_below(line.jitter);
                    let given = word
                        .compare_exchange(
                            seen_lease,
                            lease(at, pick),
                            Ordering::AcqRel,
                            Ordering::Acquire,
                        )
                        .is_ok();
                    if !(given && pick == me && at <= now_ms) || self.in_flight.len() >= self.cap {
                        // Another worker's now, or ours on a later tick.
                        continue;
                    }
                    // Probed now: the lease as just written.
                    if self.start(cell, word.load(Ordering::Acquire), at, now_ms, line, me) {
                        self.push(&mut jobs, u, s, r, c.fp, line, 0);
                    }
                    continue;
                } else {
                    // Another live worker's: ours only once it stalled.
                    now_ms >= due + overdue
                };
                if !mine || self.busy.contains(&r.index) {
                    continue;
                }
                let late = now_ms.saturating_sub(due);
                if self.in_flight.len() >= self.cap {
                    // Waits for a free place; reported late meanwhile.
                    let w = cell.result_word().load(Ordering::Acquire);
                    let w = w & !(FIELD20 << 44) | late.min(FIELD20) << 44;
                    cell.result_word().store(w, Ordering::Release);
                    continue;
                }
                if self.start(cell, seen_lease, due, now_ms, line, me) {
                    self.push(&mut jobs, u, s, r, c.fp, line, late);
                }
            }
        }
        self.checked = checked;
        jobs
    }

    /// Moves the lease `seen` (due at `due`) to this worker's next probe,
    /// one interval on (plus jitter), or one interval from now when the
    /// schedule fell behind by more than one. False when another worker
    /// moved it first.
    fn start(
        &mut self,
        cell: &PeerCell,
        seen: u64,
        due: u64,
        now_ms: u64,
        line: &crate::model::CheckLine,
        me: u32,
    ) -> bool {
        let interval = u64::from(line.interval);
        let mut next = due + interval;
        if next <= now_ms {
            next = now_ms + interval;
        }
        next += self.random_below(line.jitter);
        cell.lease_word()
            .compare_exchange(seen, lease(next, me), Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        jobs: &mut Vec<Job>,
        u: &crate::model::Upstream,
        s: &crate::model::ServerSpec,
        r: PeerRef,
        fp: u8,
        line: &crate::model::CheckLine,
        late_ms: u64,
    ) {
        let token = self.next_token;
        self.next_token += 1;
        let host = s.addr.host();
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .map_or(host.clone(), str::to_owned);
        let port = if line.port != 0 {
            line.port
        } else {
            s.addr.port()
        };
        jobs.push(Job {
            token,
            host,
            port,
            timeout_ms: line.timeout,
            tls: matches!(line.kind, CheckType::Https | CheckType::SslHello),
            send: matches!(line.kind, CheckType::Http | CheckType::Https)
                .then(|| u.check.http_send.clone()),
        });
        self.busy.insert(r.index);
        self.in_flight.insert(
            token,
            InFlight {
                cell: r,
                fp,
                rise: line.rise,
                fall: line.fall,
                timeout_ms: line.timeout,
                kind: line.kind,
                expect: u.check.http_expect_alive,
                late_ms,
                upstream: u.name.clone(),
                server: s.addr.to_string(),
            },
        );
    }

    /// Records the result of probe `token`: an HTTP status read, or the
    /// cosocket's error, after `elapsed_ms`. Returns the flip it caused,
    /// if any.
    pub fn record(
        &mut self,
        zone: Zone<'_>,
        token: u64,
        status: Option<u16>,
        err: Option<&str>,
        elapsed_ms: u64,
        now_ms: u64,
    ) -> Option<Flip> {
        let p = self.in_flight.remove(&token)?;
        self.busy.remove(&p.cell.index);
        let cell = zone.cell(p.cell)?;
        let outcome = classify(p.kind, p.expect, status, err, elapsed_ms, p.timeout_ms);
        let (before, after) = record(cell, p.cell.tag, p.fp, p.rise, p.fall, outcome)?;
        cell.probed_word().store(now_ms, Ordering::Release);
        cell.result_word().store(
            result_word(outcome, status.unwrap_or(0), elapsed_ms, p.late_ms),
            Ordering::Release,
        );
        let was = before.down || before.checking;
        let is = after.down || after.checking;
        (was != is).then_some(Flip {
            upstream: p.upstream,
            server: p.server,
            up: !is,
            count: if is { after.failures } else { after.passes },
            outcome,
        })
    }
}

/// Whether every server of `u` is held out by active checks (or `down`),
/// so a request that found none answers 502 for that reason.
pub fn all_failed(zone: Zone<'_>, u: &crate::model::Upstream) -> bool {
    u.check.line.is_some()
        && !u.servers.is_empty()
        && (0..u.servers.len()).all(|i| {
            u.servers[i].down
                || zone
                    .cell(u.peer(i))
                    .is_some_and(|c| c.check_down(u.peer(i).tag))
        })
}

#[cfg(test)]
mod tests;
