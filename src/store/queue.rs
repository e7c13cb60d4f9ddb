//! The writers' queue: writers waiting for the state file are served in the
//! order they came, whichever process they run in.
//!
//! `flock` alone is not fair: a writer that has just unlocked takes the lock
//! again before the ones sleeping on it wake, and a newcomer overtakes a
//! waiter between two of its tries, so under steady contention one writer
//! can wait past any timeout while the others go round. Here a writer first
//! takes a ticket (a counter in the mapping) and waits until the ticket
//! served is its own; only then does it take `flock` for the write itself.
//! The queue orders writers, `flock` still excludes them: a queue gone wrong
//! (a turn skipped by mistake, an old build that ignores it) costs fairness,
//! never a lost update.
//!
//! No turn waits on a writer that is gone. Whoever's turn it is claims it
//! with its pid, and the newest ticket's pid is known from the moment it is
//! taken (the ticket counter carries it); a turn whose writer's process is
//! dead is skipped at once, one held longer than [`TURN_MAX_MS`] is skipped
//! (a stopped process, an nginx request that vanished while it held the
//! turn). A turn of an unknown writer nobody claims within [`CLAIM_MAX_MS`]
//! is skipped (its waiter died). A waiter that gives up marks its ticket,
//! which is then skipped at once. A live waiter whose turn was skipped takes
//! a new ticket, keeping its deadline.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::layout::{QUEUE_ABANDONED, QUEUE_HOLDER, QUEUE_SERVING, QUEUE_SINCE, QUEUE_TAIL};
use super::mapping::SharedMap;
use super::os::{futex_wait, futex_wake, monotonic_ms, pid_alive};

/// A claimed turn held longer than this is skipped. A write holds the turn
/// for its lock, encode and msync: milliseconds, unless the disk stalls (a
/// skipped writer that is still writing keeps `flock`, so the next one waits
/// for it there).
pub const TURN_MAX_MS: u64 = 500;
/// A turn its waiter does not claim within this is skipped. Waiters notice
/// their turn within a few milliseconds: they are woken (futex) or poll
/// every millisecond (nginx).
pub const CLAIM_MAX_MS: u64 = 200;
/// A waiter does not check a turn younger than this for a dead writer: the
/// check reads /proc, and most turns are over by then. (A trylock writer,
/// which cannot wait, checks at once.)
const CHECK_AFTER_MS: u64 = 10;
/// How long a blocked waiter sleeps at most before it looks again for a
/// turn to skip.
const RECHECK: Duration = Duration::from_millis(5);

/// The queue words of one mapping.
pub struct Queue<'a> {
    /// The next ticket << 32 | the pid that took the one before.
    tail: &'a AtomicU64,
    serving: &'a AtomicU32,
    holder: &'a AtomicU64,
    since: &'a AtomicU64,
    abandoned: &'a AtomicU64,
}

/// A writer's place in the queue.
#[derive(Debug)]
pub struct Ticket {
    /// The turn is its when the queue serves this number.
    number: u32,
    /// When it stops waiting.
    pub deadline: Instant,
    /// Whether it holds (has claimed) the turn.
    pub turn: bool,
}

/// What a waiter learns when it looks at the queue.
#[derive(Debug, PartialEq, Eq)]
pub enum Poll {
    /// It holds the turn.
    Turn,
    /// Writers are ahead of it.
    Wait,
    /// Its deadline passed: it has left the queue.
    TimedOut,
}

impl<'a> Queue<'a> {
    pub fn new(map: &'a SharedMap) -> Queue<'a> {
        Queue {
            tail: map.atomic_u64(QUEUE_TAIL),
            serving: map.atomic_u32(QUEUE_SERVING),
            holder: map.atomic_u64(QUEUE_HOLDER),
            since: map.atomic_u64(QUEUE_SINCE),
            abandoned: map.atomic_u64(QUEUE_ABANDONED),
        }
    }

    /// Joins the queue, to wait at most `limit`. With no time to wait
    /// (trylock) it joins only an empty queue, taking the turn at once, and
    /// `None` says the queue is busy.
    pub fn join(&self, limit: Duration) -> Option<Ticket> {
        let deadline = Instant::now() + limit;
        if !limit.is_zero() {
            return Some(Ticket {
                number: self.take(None)?,
                deadline,
                turn: false,
            });
        }
        loop {
            let s = self.serving.load(Ordering::Acquire);
            if let Some(number) = self.take(Some(s)) {
                let mut ticket = Ticket {
                    number,
                    deadline,
                    turn: false,
                };
                self.claim(&mut ticket);
                return Some(ticket);
            }
            if !self.skip_if_gone(s, true) {
                return None;
            }
        }
    }

    /// Takes the next ticket, and records this process as its taker; with
    /// `only`, only if that is the next ticket (the queue is empty).
    fn take(&self, only: Option<u32>) -> Option<u32> {
        let mut tail = self.tail.load(Ordering::Acquire);
        loop {
            let number = (tail >> 32) as u32;
            if only.is_some_and(|n| n != number) {
                return None;
            }
            let next = u64::from(number.wrapping_add(1)) << 32 | u64::from(std::process::id());
            match self
                .tail
                .compare_exchange_weak(tail, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Some(number),
                Err(now) => tail = now,
            }
        }
    }

    /// Looks whether it is `ticket`'s turn (claiming it if so), skipping a
    /// turn whose writer is gone. Never blocks.
    pub fn poll(&self, ticket: &mut Ticket) -> Poll {
        if ticket.turn {
            return Poll::Turn;
        }
        loop {
            let s = self.serving.load(Ordering::Acquire);
            if s == ticket.number {
                self.claim(ticket);
                return Poll::Turn;
            }
            if before(ticket.number, s) {
                // Skipped while alive (too slow to claim): back in line.
                ticket.number = self.take(None).expect("an unconditional take");
                continue;
            }
            if Instant::now() >= ticket.deadline {
                self.abandon(ticket);
                return Poll::TimedOut;
            }
            if !self.skip_if_gone(s, false) {
                return Poll::Wait;
            }
        }
    }

    /// Sleeps until the turn moves or a moment passes (never past the
    /// deadline): for waiters that may block.
    pub fn wait(&self, ticket: &Ticket) {
        let s = self.serving.load(Ordering::Acquire);
        if s == ticket.number {
            return;
        }
        let left = ticket.deadline.saturating_duration_since(Instant::now());
        futex_wait(self.serving, s, left.min(RECHECK));
    }

    /// Leaves the queue: passes the turn on, or gives the ticket up.
    pub fn leave(&self, ticket: Ticket) {
        if ticket.turn {
            self.advance(ticket.number);
        } else {
            self.abandon(&ticket);
        }
    }

    fn claim(&self, ticket: &mut Ticket) {
        self.since.store(monotonic_ms(), Ordering::Release);
        self.holder.store(
            u64::from(ticket.number) << 32 | u64::from(std::process::id()),
            Ordering::Release,
        );
        ticket.turn = true;
    }

    /// Gives `ticket` up: marked, so whoever reaches it skips it at
    /// once; passed on if its turn has just come.
    fn abandon(&self, ticket: &Ticket) {
        let s = self.serving.load(Ordering::Acquire);
        if s == ticket.number {
            self.advance(s);
            return;
        }
        if before(ticket.number, s) {
            return;
        }
        self.abandoned
            .fetch_or(bit(ticket.number), Ordering::AcqRel);
        if self.serving.load(Ordering::Acquire) == ticket.number {
            self.advance(ticket.number);
        }
    }

    /// Skips turn `s` if its writer is gone; true when the turn moved (by us
    /// or someone else), so the caller looks again. `now`: check the
    /// writer's process however young the turn is.
    fn skip_if_gone(&self, s: u32, now: bool) -> bool {
        let holder = self.holder.load(Ordering::Acquire);
        let tail = self.tail.load(Ordering::Acquire);
        let age = age_ms(self.since.load(Ordering::Acquire));
        let claimed = (holder >> 32) as u32 == s;
        let writer = if claimed {
            Some(holder as u32)
        } else if self.abandoned.load(Ordering::Acquire) & bit(s) != 0 {
            // Given up by its waiter.
            return self.advance(s);
        } else if (tail >> 32) as u32 == s.wrapping_add(1) {
            // The newest ticket, not claimed yet: its taker is known.
            Some(tail as u32)
        } else {
            None
        };
        let gone = match writer {
            Some(pid) => age > TURN_MAX_MS || ((now || age >= CHECK_AFTER_MS) && !pid_alive(pid)),
            None => age > CLAIM_MAX_MS,
        };
        gone && self.advance(s)
    }

    /// Moves the turn on from `s`, waking every waiter; true when the turn
    /// is no longer `s`.
    fn advance(&self, s: u32) -> bool {
        if self.serving.load(Ordering::Acquire) != s {
            return true;
        }
        // Stamped before the move, so whoever sees the new turn sees its
        // time too (release, then acquire on `serving`).
        self.since.store(monotonic_ms(), Ordering::Release);
        if self
            .serving
            .compare_exchange(s, s.wrapping_add(1), Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.abandoned.fetch_and(!bit(s), Ordering::AcqRel);
            futex_wake(self.serving);
        }
        true
    }

    /// Tickets taken and not yet served, the turn's included.
    #[cfg(test)]
    pub fn len(&self) -> u32 {
        ((self.tail.load(Ordering::Acquire) >> 32) as u32)
            .wrapping_sub(self.serving.load(Ordering::Acquire))
    }
}

/// Whether ticket `a` comes before `b` (tickets wrap around).
fn before(a: u32, b: u32) -> bool {
    (b.wrapping_sub(a) as i32) > 0
}

fn bit(ticket: u32) -> u64 {
    1 << (ticket % 64)
}

/// Milliseconds since `stamp`. A stamp ahead of the clock was made before
/// the host last booted (the monotonic clock restarted): long ago.
fn age_ms(stamp: u64) -> u64 {
    let now = monotonic_ms();
    if stamp > now {
        u64::MAX
    } else {
        now - stamp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_compare_across_the_wrap() {
        assert!(before(1, 2));
        assert!(!before(2, 2));
        assert!(!before(3, 2));
        assert!(before(u32::MAX, 0));
        assert!(!before(0, u32::MAX));
    }

    #[test]
    fn a_stamp_from_before_the_last_boot_is_old() {
        assert_eq!(age_ms(monotonic_ms() + 60_000), u64::MAX);
        assert!(age_ms(monotonic_ms()) < 1000);
    }
}
