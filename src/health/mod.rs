//! Active health checks (nginx_upstream_check_module's `check` lines) over
//! the shared peer cells of the zone ([`crate::store::zone`]): which servers are due
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

mod prober;
pub mod status;

pub use prober::{Job, ProbeTarget, Prober, MAX_IN_FLIGHT};

use std::sync::atomic::Ordering;

use crate::store::zone::{PeerCell, Zone, HEALTH_CHECKING, HEALTH_DOWN};
use crate::table::model::{CheckSettings, CheckType, ExpectAlive, Upstream};

const COUNT_BITS: u32 = 11;
const COUNT_MAX: u64 = (1 << COUNT_BITS) - 1;
const FAILS_SHIFT: u32 = COUNT_BITS;
const DOWN: u64 = HEALTH_DOWN;
const CHECKING: u64 = HEALTH_CHECKING;
const FP_SHIFT: u32 = 24;

/// A timed-out probe that took this much longer than its timeout ran under
/// an event loop too busy to see the answer: not counted as a failure.
const LATE_SLACK_MS: u64 = 100;

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

/// 1..=255: which check settings a verdict's counts were made under.
pub fn fingerprint(c: &CheckSettings) -> u8 {
    let text = format!("{c:?}");
    (crc32fast::hash(text.as_bytes()) % 255 + 1) as u8
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

pub(super) const FIELD20: u64 = (1 << 20) - 1;

pub(super) fn result_word(outcome: Outcome, status: u16, latency_ms: u64, late_ms: u64) -> u64 {
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
/// stamped `tag`, under `rule`, at `now_ms`. Returns the verdict before
/// and after, or `None` when the cell is no longer the server's. A pass
/// also forgets the passive failures, so a server that failed passively is
/// brought back by its passing probes; a server that comes back either way
/// is marked available again (for `slow_start`).
pub fn record(
    cell: &PeerCell,
    tag: u32,
    rule: Rule,
    outcome: Outcome,
    now_ms: u64,
) -> Option<(Verdict, Verdict)> {
    let Rule {
        fp,
        rise,
        fall,
        max_fails,
    } = rule;
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
    let flipped_up = (before.down || before.checking) && !(after.down || after.checking);
    if outcome != Outcome::Late {
        // NGINX Plus's `health_checks.unhealthy`: times it went down.
        let became_unhealthy = !before.down && after.down;
        cell.counters()
            .count_check(outcome != Outcome::Passed, became_unhealthy);
    }
    if outcome == Outcome::Passed {
        let fails = cell.fails();
        // Passive failures had made it unavailable: back now, too.
        let passive_back = max_fails != 0 && fails >= max_fails;
        if flipped_up || passive_back {
            // slow_start ramps from here (marked before the failures go,
            // so no worker sees it available without the mark).
            cell.mark_available(now_ms);
        }
        if passive_back {
            cell.counters().end_unavailable(now_ms);
        }
        if fails > 0 {
            cell.clear_failures(tag, fails);
        }
    }
    Some((before, after))
}

/// What a probe's outcome is weighed by: the upstream's check settings
/// (their [`fingerprint`], `rise`, `fall`) and the server's `max_fails`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rule {
    pub fp: u8,
    pub rise: u32,
    pub fall: u32,
    pub max_fails: u32,
}

/// Whether every server of `u` is held out by active checks (or `down`),
/// so a request that found none answers 502 for that reason.
pub fn all_failed(zone: Zone<'_>, u: &Upstream) -> bool {
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
