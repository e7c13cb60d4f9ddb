//! One worker's prober: on each tick, which servers with checks this worker
//! probes now, by the lease in each server's cell (one probe per server per
//! interval in the whole nginx, taken over from a dead or stalled owner),
//! and what each result does to the cell.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{classify, fingerprint, record, result_word, Flip, Rule, FIELD20};
use crate::store::zone::{PeerCell, Zone};
use crate::table::model::{
    CheckLine, CheckType, ExpectAlive, PeerRef, ServerSpec, Table, Upstream,
};

/// Bits of the lease word that hold the owner's pid: Linux pids are below
/// 2^22 (`pid_max`'s ceiling).
const PID_BITS: u32 = 22;
const PID_MASK: u64 = (1 << PID_BITS) - 1;

/// The longest a kept probe connection idles (a cosocket takes the time as
/// a signed 32-bit count of milliseconds).
const IDLE_MAX_MS: u32 = i32::MAX as u32;

/// Probes in flight in one worker at most; a server due while the worker is
/// at the cap waits for the next tick and is reported late, not failed.
pub const MAX_IN_FLIGHT: usize = 64;

/// How many of a probe's `timeout` it can take at most, as `probe.lua` runs
/// it: each cosocket step waits at most `timeout` (connect, TLS handshake,
/// send, the status line, and reading the rest of a kept connection's
/// answer, bounded by one `timeout` plus the one read past it), and a probe
/// on a kept connection the server closed runs once more on a new one.
/// Twice six steps.
const PROBE_TIMEOUTS_MAX: u64 = 12;

/// Margin past that bound before a probe that never reported is given up:
/// a worker's event loop can run late by this much without a live probe
/// being forgotten.
const ABANDON_SLACK_MS: u64 = 5_000;

fn lease(due_ms: u64, pid: u32) -> u64 {
    due_ms << PID_BITS | (u64::from(pid) & PID_MASK)
}

/// The pid of the worker that holds `cell`'s probe lease (0: none).
pub(super) fn lease_owner(cell: &PeerCell) -> u32 {
    lease_parts(cell.lease_word().load(Ordering::Acquire)).1
}

pub(super) fn lease_parts(w: u64) -> (u64, u32) {
    (w >> PID_BITS, (w & PID_MASK) as u32)
}

/// What probing one server needs, for the Lua side: built once per table
/// generation and shared by every probe of the server under it (the host,
/// the pool name and the request are the same each time; building them per
/// probe was a good part of a kept-connection probe's cost).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeTarget {
    /// The server's cell: names the target within its generation (the
    /// binding keeps the Lua side's copy under it).
    pub cell: u32,
    /// Host as a cosocket takes it (`127.0.0.1`, `::1`, `unix:/path`).
    pub host: String,
    /// 0 for a unix socket.
    pub port: u16,
    pub timeout_ms: u32,
    pub tls: bool,
    /// The request of an http probe; `None` for tcp and ssl_hello.
    pub send: Option<String>,
    /// Whether `send` is a HEAD request (its answer has no body).
    pub head: bool,
    /// `check_keepalive_requests`: how many probes one connection carries
    /// (1: a new connection for each; always 1 without `send`).
    pub keepalive: u32,
    /// How long a kept connection may sit idle in the worker's pool: past
    /// the next probe, so that one finds it.
    pub idle_ms: u32,
    /// The cosocket pool kept connections wait in: this server address's
    /// (shared by the upstreams that list it), TLS or not, apart from any
    /// other Lua code's pools.
    pub pool: String,
    /// For the log line of a flip.
    pub upstream: String,
    pub server: String,
}

/// One probe to start: its token (for [`Prober::record`]) and its target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    pub token: u64,
    pub target: Arc<ProbeTarget>,
}

/// A probe in flight in this worker.
#[derive(Clone, Debug)]
struct InFlight {
    cell: PeerRef,
    rule: Rule,
    kind: CheckType,
    expect: ExpectAlive,
    late_ms: u64,
    target: Arc<ProbeTarget>,
    /// When the probe is given up if it has not reported by then (see
    /// [`Prober::reap`]).
    abandon_ms: u64,
}

/// A server the walk found due while the worker was at its cap: the next
/// probe to end starts it ([`Prober::next`]).
#[derive(Clone, Debug)]
struct Waiting {
    /// Its upstream's position in the table and its own in the upstream.
    upstream: usize,
    server: usize,
    cell: PeerRef,
    fp: u8,
    /// The lease word as the walk saw it, and when it was due.
    lease: u64,
    due: u64,
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
    /// Cells of the servers in flight or waiting.
    busy: HashSet<u32>,
    /// Due servers past the cap, in the walk's order, for the table of
    /// generation `seen`; the next walk finds those still due again.
    waiting: VecDeque<Waiting>,
    next_token: u64,
    rng: u64,
    /// The upstreams with a check line in the table of generation `seen`.
    checked: Vec<Checked>,
    /// The targets of the servers probed under generation `seen`, by cell.
    targets: HashMap<u32, Arc<ProbeTarget>>,
    seen: Option<u64>,
    cap: usize,
    /// How often [`due`](Self::due) runs: a probe up to this late was only
    /// waiting for the tick.
    tick_ms: u64,
}

impl Prober {
    /// A prober of at most `cap` probes in flight, walked every `tick_ms`
    /// (the refresh timer's period), its random draws from `seed`.
    pub fn new(seed: u64, cap: usize, tick_ms: u64) -> Prober {
        Prober {
            in_flight: HashMap::new(),
            busy: HashSet::new(),
            waiting: VecDeque::new(),
            next_token: 1,
            rng: seed | 1,
            checked: Vec::new(),
            targets: HashMap::new(),
            seen: None,
            cap,
            tick_ms: tick_ms.max(1),
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// The table generation the targets of the jobs given last belong to.
    pub fn generation(&self) -> Option<u64> {
        self.seen
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
        for w in self.waiting.drain(..) {
            self.busy.remove(&w.cell.index);
        }
        self.reap(now_ms);
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
            self.targets.clear();
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
                    if !(given && pick == me && at <= now_ms) {
                        // Another worker's now, or ours on a later tick.
                        continue;
                    }
                    if self.in_flight.len() >= self.cap {
                        // Ours now: waits for the next probe to end.
                        self.busy.insert(r.index);
                        self.waiting.push_back(Waiting {
                            upstream: c.id,
                            server: i,
                            cell: r,
                            fp: c.fp,
                            lease: word.load(Ordering::Acquire),
                            due: at,
                        });
                        continue;
                    }
                    // Probed now: the lease as just written.
                    if self.start(cell, word.load(Ordering::Acquire), at, now_ms, line, me) {
                        self.push(&mut jobs, u, s, r, c.fp, line, 0, now_ms);
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
                    // Waits for the next probe to end; reported late
                    // meanwhile.
                    let w = cell.result_word().load(Ordering::Acquire);
                    let w = w & !(FIELD20 << 44) | late.min(FIELD20) << 44;
                    cell.result_word().store(w, Ordering::Release);
                    self.busy.insert(r.index);
                    self.waiting.push_back(Waiting {
                        upstream: c.id,
                        server: i,
                        cell: r,
                        fp: c.fp,
                        lease: seen_lease,
                        due,
                    });
                    continue;
                }
                if self.start(cell, seen_lease, due, now_ms, line, me) {
                    self.push(&mut jobs, u, s, r, c.fp, line, late, now_ms);
                }
            }
        }
        self.checked = checked;
        jobs
    }

    /// The probe to start in place of one that just ended: the first server
    /// still waiting whose lease is still as the walk saw it, for the table
    /// of generation `seen` (`None` when there is none, or the table moved
    /// since the walk). Probes in flight so stay at the cap between ticks,
    /// rather than a tick's worth each: a worker runs as many probes a
    /// second as they take time, not `cap` per tick.
    pub fn next(
        &mut self,
        table: &Table,
        seen: u64,
        zone: Zone<'_>,
        now_ms: u64,
        me: u32,
    ) -> Option<Job> {
        if self.seen != Some(seen) {
            for w in self.waiting.drain(..) {
                self.busy.remove(&w.cell.index);
            }
            return None;
        }
        while self.in_flight.len() < self.cap {
            let w = self.waiting.pop_front()?;
            self.busy.remove(&w.cell.index);
            let Some(u) = table.upstreams.get(w.upstream) else {
                continue;
            };
            let (Some(line), Some(s)) = (&u.check.line, u.servers.get(w.server)) else {
                continue;
            };
            let Some(cell) = zone.cell(w.cell).filter(|_| u.peer(w.server) == w.cell) else {
                continue;
            };
            let late = now_ms.saturating_sub(w.due);
            if self.start(cell, w.lease, w.due, now_ms, line, me) {
                let mut jobs = Vec::with_capacity(1);
                self.push(&mut jobs, u, s, w.cell, w.fp, line, late, now_ms);
                return jobs.pop();
            }
        }
        None
    }

    /// Moves the lease `seen` (due at `due`) to this worker's next probe,
    /// one interval on (plus jitter), or one interval from now when this
    /// probe starts a whole tick late or more (it waited at the cap, or the
    /// loop stalled; less than a tick is the walk's granularity, and a
    /// timer drifting a little past it only moves the schedule onto a
    /// tick). False when another worker moved it first.
    ///
    /// Why from now: servers due at once (a new table, a fresh start) wait
    /// their turn at the cap and start over several ticks; kept on their
    /// old schedule they would all fall due together again each interval
    /// and be late again. From now, each keeps the time it got: one round
    /// spreads them, and later rounds start on time.
    fn start(
        &mut self,
        cell: &PeerCell,
        seen: u64,
        due: u64,
        now_ms: u64,
        line: &CheckLine,
        me: u32,
    ) -> bool {
        let interval = u64::from(line.interval);
        let mut next = if now_ms.saturating_sub(due) >= self.tick_ms {
            now_ms + interval
        } else {
            due + interval
        };
        next += self.random_below(line.jitter);
        cell.lease_word()
            .compare_exchange(seen, lease(next, me), Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        jobs: &mut Vec<Job>,
        u: &Upstream,
        s: &ServerSpec,
        r: PeerRef,
        fp: u8,
        line: &CheckLine,
        late_ms: u64,
        now_ms: u64,
    ) {
        let token = self.next_token;
        self.next_token += 1;
        let target = Arc::clone(
            self.targets
                .entry(r.index)
                .or_insert_with(|| Arc::new(probe_target(u, s, r, line))),
        );
        jobs.push(Job {
            token,
            target: Arc::clone(&target),
        });
        self.busy.insert(r.index);
        self.in_flight.insert(
            token,
            InFlight {
                cell: r,
                rule: Rule {
                    fp,
                    rise: line.rise,
                    fall: line.fall,
                    max_fails: s.max_fails,
                },
                kind: line.kind,
                expect: u.check.http_expect_alive,
                late_ms,
                target,
                abandon_ms: now_ms
                    + PROBE_TIMEOUTS_MAX * u64::from(line.timeout)
                    + ABANDON_SLACK_MS,
            },
        );
    }

    /// Forgets the probes that never reported and never will: a Lua error
    /// between a probe's start and its `record` (a runner's table
    /// allocation, the flip's log line) loses its token. Kept, such a
    /// probe would hold one of the `cap` places and its server's `busy`
    /// mark for the worker's life: a few of them and the worker probes
    /// nothing. Its lease stays this worker's, due as it was moved at the
    /// start, so the next walk probes the server again. A result that
    /// still comes for it later is ignored ([`record`](Self::record)
    /// finds no token).
    fn reap(&mut self, now_ms: u64) {
        let busy = &mut self.busy;
        self.in_flight.retain(|_, p| {
            let live = now_ms < p.abandon_ms;
            if !live {
                busy.remove(&p.cell.index);
            }
            live
        });
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
        let outcome = classify(
            p.kind,
            p.expect,
            status,
            err,
            elapsed_ms,
            p.target.timeout_ms,
        );
        let (before, after) = record(cell, p.cell.tag, p.rule, outcome, now_ms)?;
        cell.probed_word().store(now_ms, Ordering::Release);
        cell.result_word().store(
            result_word(outcome, status.unwrap_or(0), elapsed_ms, p.late_ms),
            Ordering::Release,
        );
        let was = before.down || before.checking;
        let is = after.down || after.checking;
        (was != is).then(|| Flip {
            upstream: p.target.upstream.clone(),
            server: p.target.server.clone(),
            up: !is,
            count: if is { after.failures } else { after.passes },
            outcome,
        })
    }
}

/// Server `s` of upstream `u` (cell `r`) as its probes reach it.
fn probe_target(u: &Upstream, s: &ServerSpec, r: PeerRef, line: &CheckLine) -> ProbeTarget {
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
    let tls = matches!(line.kind, CheckType::Https | CheckType::SslHello);
    let send =
        matches!(line.kind, CheckType::Http | CheckType::Https).then(|| u.check.http_send.clone());
    let pool = format!(
        "ngx.dyups check {}{host}:{port}",
        if tls { "tls " } else { "" }
    );
    ProbeTarget {
        cell: r.index,
        port,
        timeout_ms: line.timeout,
        tls,
        head: send.as_deref().is_some_and(|s| s.starts_with("HEAD ")),
        keepalive: if send.is_some() {
            u.check.keepalive_requests
        } else {
            1
        },
        send,
        idle_ms: line
            .interval
            .saturating_mul(2)
            .saturating_add(line.timeout)
            .min(IDLE_MAX_MS),
        pool,
        host,
        upstream: u.name.clone(),
        server: s.addr.to_string(),
    }
}
