//! The resolver lease: one word of the state file's header saying which
//! worker re-resolves the `resolve` lines, so that the whole nginx (every
//! nginx on the file) asks each name once per TTL, not once per worker.
//!
//! ```text
//! lease  when the holder last renewed it, Unix ms << 22 | its pid (0: none)
//! ```
//!
//! As the probe leases of active health checks: the holder renews it on
//! each refresh tick; any worker takes it over with a compare-and-swap
//! when it is free, when its holder is dead (the master respawned it, or
//! a reload retired it), or when its holder has not renewed it for
//! [`STALE_MS`] (an event loop stuck that long resolves nothing either).
//! A holder that finds the word moved on stops resolving.

use std::sync::atomic::{AtomicU64, Ordering};

/// Bits that hold the pid: Linux pids are below 2^22 (`pid_max`'s ceiling).
const PID_BITS: u32 = 22;
const PID_MASK: u64 = (1 << PID_BITS) - 1;
/// A holder this long without renewing is taken over.
pub const STALE_MS: u64 = 3000;

fn word(renewed_ms: u64, pid: u32) -> u64 {
    renewed_ms << PID_BITS | (u64::from(pid) & PID_MASK)
}

/// The holder's pid (0: none) and when it last renewed, Unix ms.
pub fn holder(w: &AtomicU64) -> (u32, u64) {
    let v = w.load(Ordering::Acquire);
    ((v & PID_MASK) as u32, v >> PID_BITS)
}

/// Whether worker `me` holds the lease after this call: renewed when it
/// held it already, taken when it was free, its holder dead (`alive`
/// says) or stalled. `now_ms` is the Unix clock, which all workers share.
pub fn hold(w: &AtomicU64, me: u32, now_ms: u64, alive: impl Fn(u32) -> bool) -> bool {
    let seen = w.load(Ordering::Acquire);
    let (pid, renewed) = ((seen & PID_MASK) as u32, seen >> PID_BITS);
    let free = pid == 0
        || (pid != me && !alive(pid))
        || (pid != me && now_ms.saturating_sub(renewed) > STALE_MS);
    if pid != me && !free {
        return false;
    }
    w.compare_exchange(seen, word(now_ms, me), Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
}

/// Gives the lease up, if `me` holds it: a worker that exits hands the
/// names over at once rather than after [`STALE_MS`].
pub fn release(w: &AtomicU64, me: u32) {
    let seen = w.load(Ordering::Acquire);
    if (seen & PID_MASK) as u32 == me {
        let _ = w.compare_exchange(seen, 0, Ordering::AcqRel, Ordering::Acquire);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_renews_others_wait_and_take_over_from_the_dead_or_stalled() {
        let w = AtomicU64::new(0);
        let alive = |_| true;
        assert!(hold(&w, 10, 1000, alive));
        assert!(!hold(&w, 11, 1001, alive), "held by a live worker");
        assert!(hold(&w, 10, 2000, alive), "renewed");
        assert_eq!(holder(&w), (10, 2000));
        assert!(!hold(&w, 11, 2000 + STALE_MS, alive));
        assert!(hold(&w, 11, 2001 + STALE_MS, alive), "stalled: taken over");
        assert!(
            !hold(&w, 10, 2002 + STALE_MS, alive),
            "the old holder stops"
        );
        let dead = |pid| pid != 11;
        assert!(
            hold(&w, 12, 2003 + STALE_MS, dead),
            "dead: taken over at once"
        );
        release(&w, 11);
        assert_eq!(holder(&w).0, 12, "only the holder releases");
        release(&w, 12);
        assert_eq!(holder(&w), (0, 0));
        assert!(hold(&w, 13, 9000, alive));
    }
}
