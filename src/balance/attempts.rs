//! Per-request retry memory.
//!
//! nginx calls `balancer_by_lua` once per attempt of a request, and each call
//! starts from scratch on the Lua side. What nginx keeps in the request's
//! peer data (the servers already tried, the one picked last) we keep here,
//! keyed by the request pointer, in a table allocated once per worker so the
//! per-request path never allocates.

use crate::balance::balancer::Tried;
use crate::balance::policy::Cursor;
use crate::table::model::PeerRef;

/// How many consecutive slots a key may live in. Short, so a lookup touches
/// at most a cache line or two; when all are taken the oldest entry goes.
const PROBE: usize = 4;

/// Fibonacci hashing multiplier: request pointers are aligned, so their low
/// bits carry nothing and must be mixed into the bits we index with.
const MIX: u64 = 0x9E37_79B9_7F4A_7C15;

/// How many of a request's picks it remembers, the latest, for the log
/// phase to count each attempt's response against its server.
pub const PATH_MAX: usize = crate::store::stats::ATTEMPTS_COUNTED;

/// What one request has done so far against one upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attempt {
    pub upstream_id: u32,
    /// The upstream's table generation the indices below refer to.
    pub generation: u64,
    /// The server picked by the previous attempt; `None` before the first
    /// pick or when the previous call found nothing to pick (so a retry
    /// never blames a server twice, nor one it did not use).
    pub last: Option<usize>,
    pub tried: Tried,
    /// Where the request's hash chain stands (hash policies), as nginx keeps
    /// it between attempts.
    pub cursor: Cursor,
    /// The connection the current attempt counts (`least_conn`, `random
    /// two`): given back on a retry, when the request ends, or when its
    /// entry is displaced.
    pub held: Option<PeerRef>,
    /// The cells of the servers its attempts went to, oldest first (the
    /// last `PATH_MAX`; [`PeerRef::NONE`] for an attempt that found none,
    /// or a server without a cell), `path_len` of them.
    pub path: [PeerRef; PATH_MAX],
    pub path_len: u8,
}

impl Default for Attempt {
    fn default() -> Attempt {
        Attempt::fresh(0, 0)
    }
}

impl Attempt {
    fn fresh(upstream_id: u32, generation: u64) -> Attempt {
        Attempt {
            upstream_id,
            generation,
            last: None,
            tried: Tried::new(),
            cursor: Cursor::default(),
            held: None,
            path: [PeerRef::NONE; PATH_MAX],
            path_len: 0,
        }
    }

    /// Remembers the cell of one more attempt, forgetting the oldest when
    /// `PATH_MAX` are remembered.
    pub fn push_path(&mut self, r: PeerRef) {
        let n = usize::from(self.path_len);
        if n == PATH_MAX {
            self.path.copy_within(1.., 0);
            self.path[PATH_MAX - 1] = r;
        } else {
            self.path[n] = r;
            self.path_len += 1;
        }
    }

    /// The cells remembered, oldest first.
    pub fn path(&self) -> &[PeerRef] {
        &self.path[..usize::from(self.path_len)]
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Slot {
    key: usize,
    /// When the slot was last written or resumed; 0 marks it empty.
    stamp: u64,
    attempt: Attempt,
}

/// A fixed-capacity map from request key to [`Attempt`].
///
/// Open addressing with a probe of 4 slots; when every slot of a
/// key's probe is taken by other keys, the least recently used one is
/// evicted. A retry whose entry was evicted cannot be told from a first
/// attempt: it degrades to a fresh pick that may choose a server the request
/// already tried, and its failure goes unreported (the failed server is
/// unknown). With a table sized well above the requests in flight per worker
/// this is rare.
#[derive(Clone, Debug)]
pub struct Attempts {
    slots: Box<[Slot]>,
    /// log2 of the slot count.
    bits: u32,
    clock: u64,
    /// The connection an entry displaced by `begin` still held: its request
    /// ended without saying so, or is lost to us. For the caller to give
    /// back ([`take_displaced`](Self::take_displaced)).
    displaced: Option<PeerRef>,
}

impl Attempts {
    /// A table of at least `capacity` slots (rounded up to a power of two,
    /// and to no fewer than the probe length).
    pub fn new(capacity: usize) -> Attempts {
        let len = capacity.max(PROBE).next_power_of_two();
        Attempts {
            slots: vec![Slot::default(); len].into_boxed_slice(),
            bits: len.trailing_zeros(),
            clock: 0,
            displaced: None,
        }
    }

    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// A first attempt: starts a fresh entry for `key`, replacing whatever
    /// was stored under it. Request pointers are reused by later requests,
    /// so an old entry under the same key belongs to a finished request.
    pub fn begin(&mut self, key: usize, upstream_id: u32, generation: u64) -> &mut Attempt {
        let at = self.slot_for_new(key);
        let stamp = self.tick();
        let slot = &mut self.slots[at];
        if slot.stamp != 0 {
            if let Some(held) = slot.attempt.held {
                self.displaced = Some(held);
            }
        }
        *slot = Slot {
            key,
            stamp,
            attempt: Attempt::fresh(upstream_id, generation),
        };
        &mut slot.attempt
    }

    /// The connection the last [`begin`](Self::begin) displaced, once.
    pub fn take_displaced(&mut self) -> Option<PeerRef> {
        self.displaced.take()
    }

    /// A retry: the entry for `key`, but only if it was made for the same
    /// upstream at the same generation. After a table change the stored
    /// indices may name other servers, so the caller must start fresh.
    pub fn resume(
        &mut self,
        key: usize,
        upstream_id: u32,
        generation: u64,
    ) -> Option<&mut Attempt> {
        let at = self.matching(key, upstream_id, generation)?;
        let stamp = self.tick();
        let slot = &mut self.slots[at];
        slot.stamp = stamp;
        Some(&mut slot.attempt)
    }

    /// [`resume`](Self::resume), or [`begin`](Self::begin) when there is
    /// nothing to resume.
    pub fn resume_or_begin(
        &mut self,
        key: usize,
        upstream_id: u32,
        generation: u64,
    ) -> &mut Attempt {
        // Looked up by position first: returning the borrow from `resume` in
        // one arm and calling `begin` in the other does not pass borrowck.
        match self.matching(key, upstream_id, generation) {
            Some(at) => {
                let stamp = self.tick();
                let slot = &mut self.slots[at];
                slot.stamp = stamp;
                &mut slot.attempt
            }
            None => self.begin(key, upstream_id, generation),
        }
    }

    /// Takes the entry for `key` out, from the log phase once the request
    /// is done, so it cannot push out the entry of a request still running;
    /// the caller gives back what it `held`.
    pub fn finish(&mut self, key: usize) -> Option<Attempt> {
        let at = self.find(key)?;
        // Emptied by its stamp alone: the next `begin` there writes the
        // whole slot anyway (a slot is ~220 bytes, and this runs at the end
        // of every request).
        let slot = &mut self.slots[at];
        slot.stamp = 0;
        Some(slot.attempt)
    }

    fn home(&self, key: usize) -> usize {
        ((key as u64).wrapping_mul(MIX) >> (64 - self.bits)) as usize
    }

    fn probe(&self, key: usize) -> impl Iterator<Item = usize> {
        let home = self.home(key);
        let mask = self.slots.len() - 1;
        (0..PROBE).map(move |i| (home + i) & mask)
    }

    fn find(&self, key: usize) -> Option<usize> {
        self.probe(key).find(|&at| {
            let s = &self.slots[at];
            s.stamp != 0 && s.key == key
        })
    }

    fn matching(&self, key: usize, upstream_id: u32, generation: u64) -> Option<usize> {
        self.find(key).filter(|&at| {
            let a = &self.slots[at].attempt;
            a.upstream_id == upstream_id && a.generation == generation
        })
    }

    /// The slot a new entry for `key` goes to: its own old slot (so a key is
    /// never stored twice), else an empty one, else the stalest.
    fn slot_for_new(&self, key: usize) -> usize {
        if let Some(at) = self.find(key) {
            return at;
        }
        self.probe(key)
            .min_by_key(|&at| self.slots[at].stamp)
            .expect("the probe is never empty")
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_is_rounded_up() {
        assert_eq!(Attempts::new(1000).capacity(), 1024);
        assert_eq!(Attempts::new(1024).capacity(), 1024);
        assert_eq!(Attempts::new(0).capacity(), PROBE);
    }

    #[test]
    fn resume_finds_what_begin_stored() {
        let mut t = Attempts::new(1024);
        let a = t.begin(0x7f00_1000, 3, 9);
        a.tried.insert(2);
        a.last = Some(2);
        let b = t.begin(0x7f00_2000, 3, 9);
        b.last = Some(5);

        let a = t.resume(0x7f00_1000, 3, 9).unwrap();
        assert_eq!(a.last, Some(2));
        assert!(a.tried.contains(2));
        assert_eq!(t.resume(0x7f00_2000, 3, 9).unwrap().last, Some(5));
        assert!(t.resume(0x7f00_3000, 3, 9).is_none());
    }

    #[test]
    fn generation_or_upstream_mismatch_is_not_resumed() {
        let mut t = Attempts::new(64);
        t.begin(0x1000, 1, 7).last = Some(1);
        assert!(t.resume(0x1000, 1, 8).is_none());
        assert!(t.resume(0x1000, 2, 7).is_none());

        let fresh = t.resume_or_begin(0x1000, 1, 8);
        assert_eq!(fresh.last, None);
        assert!(fresh.tried.is_empty());
        assert_eq!(fresh.generation, 8);
        // The stale entry was replaced, not duplicated.
        assert!(t.resume(0x1000, 1, 7).is_none());
        assert!(t.resume(0x1000, 1, 8).is_some());
    }

    #[test]
    fn a_first_attempt_under_a_reused_key_starts_fresh() {
        let mut t = Attempts::new(64);
        let a = t.begin(0x1000, 1, 7);
        a.tried.insert(0);
        a.tried.insert(1);
        a.last = Some(1);

        let again = t.begin(0x1000, 1, 7);
        assert_eq!(again.last, None);
        assert!(again.tried.is_empty());
        assert!(t.resume(0x1000, 1, 7).unwrap().tried.is_empty());
    }

    #[test]
    fn a_full_probe_evicts_the_least_recently_used() {
        // With as many slots as the probe is long, every key shares one
        // probe window, so the fifth key must evict.
        let mut t = Attempts::new(PROBE);
        for key in 1..=4usize {
            t.begin(key * 16, 0, 0).last = Some(key);
        }
        // Touching key 16 makes key 32 the stalest.
        assert!(t.resume(16, 0, 0).is_some());
        t.begin(80, 0, 0);

        assert!(t.resume(32, 0, 0).is_none(), "the stalest entry goes");
        for key in [16usize, 48, 64, 80] {
            assert!(t.resume(key, 0, 0).is_some(), "key {key} stays");
        }
        // An evicted retry degrades to a fresh attempt.
        let a = t.resume_or_begin(32, 0, 0);
        assert_eq!(a.last, None);
        assert!(a.tried.is_empty());
    }

    #[test]
    fn finish_frees_the_slot() {
        let mut t = Attempts::new(PROBE);
        for key in 1..=4usize {
            t.begin(key, 0, 0);
        }
        t.resume(2, 0, 0).unwrap().last = Some(7);
        assert_eq!(t.finish(2).unwrap().last, Some(7));
        assert!(t.resume(2, 0, 0).is_none());
        assert!(t.finish(2).is_none(), "once");
        t.begin(5, 0, 0);
        // The freed slot was reused; nothing else was evicted.
        for key in [1usize, 3, 4, 5] {
            assert!(t.resume(key, 0, 0).is_some(), "key {key} stays");
        }
    }

    #[test]
    fn a_displaced_entry_hands_over_the_connection_it_held() {
        let held = PeerRef { index: 4, tag: 9 };
        let mut t = Attempts::new(PROBE);
        t.begin(16, 0, 0).held = Some(held);
        assert_eq!(t.take_displaced(), None);
        // The same key again (a reused request pointer), then eviction.
        t.begin(16, 0, 0);
        assert_eq!(t.take_displaced(), Some(held));
        assert_eq!(t.take_displaced(), None, "once");
        for key in 1..=4usize {
            t.begin(key * 16, 0, 0).held = Some(PeerRef {
                index: key as u32,
                tag: 1,
            });
            t.take_displaced();
        }
        t.begin(80, 0, 0);
        assert_eq!(
            t.take_displaced(),
            Some(PeerRef { index: 1, tag: 1 }),
            "the stalest"
        );
        // An entry finished by its request is not displaced later.
        let done = t.finish(48).unwrap();
        assert_eq!(done.held, Some(PeerRef { index: 3, tag: 1 }));
        t.begin(96, 0, 0);
        assert_eq!(t.take_displaced(), None);
    }
}
