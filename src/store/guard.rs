//! A guard against SIGBUS from a state file cut short under us.
//!
//! A mapped file that someone truncates (or a disk that vanishes) makes the
//! next access to the lost pages raise SIGBUS, which would kill the nginx
//! worker. Every mapping of a state file registers here; when SIGBUS hits an
//! address inside one, the handler puts a private zero page over the faulting
//! page and marks the mapping *patched*, and the access is retried: it reads
//! zeros, which the store's checks refuse as a damaged file. The worker keeps
//! routing by the table it has, and reopens the file once it is whole again.
//! A SIGBUS anywhere else gets the disposition it had before.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Once;

/// Mappings guarded at once. An nginx worker maps one state file (two while
/// it moves to a replaced one); test processes map many at once.
const SLOTS: usize = 256;

static START: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
static LEN: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
static PATCHED: [AtomicBool; SLOTS] = [const { AtomicBool::new(false) }; SLOTS];
static PAGE: AtomicUsize = AtomicUsize::new(4096);
static INSTALL: Once = Once::new();
/// The disposition SIGBUS had before ours, as raw bytes of a `sigaction`.
static PREVIOUS: AtomicUsize = AtomicUsize::new(0);

/// A registered mapping; unregisters when dropped.
pub struct Guard {
    slot: Option<usize>,
}

impl Guard {
    /// Guards `len` bytes from `start`. Without a free slot the mapping is
    /// simply not guarded (SIGBUS then ends the process, as it would anyway).
    pub fn new(start: usize, len: usize) -> Guard {
        INSTALL.call_once(install);
        for i in 0..SLOTS {
            if LEN[i]
                .compare_exchange(0, len, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                PATCHED[i].store(false, Ordering::Release);
                START[i].store(start, Ordering::Release);
                return Guard { slot: Some(i) };
            }
        }
        Guard { slot: None }
    }

    /// Whether a lost page of this mapping was replaced by zeros.
    pub fn patched(&self) -> bool {
        self.slot
            .is_some_and(|i| PATCHED[i].load(Ordering::Acquire))
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(i) = self.slot {
            START[i].store(0, Ordering::Release);
            LEN[i].store(0, Ordering::Release);
        }
    }
}

fn install() {
    // SAFETY: sysconf has no memory effects.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if page > 0 {
        PAGE.store(page as usize, Ordering::Relaxed);
    }
    // SAFETY: both sigaction structs are zeroed plain C data, valid for
    // sigaction(2): `ours` names a handler with the SA_SIGINFO signature,
    // and `old` is leaked on purpose so the handler may read it at any time.
    unsafe {
        let old: &'static mut libc::sigaction = Box::leak(Box::new(std::mem::zeroed()));
        let mut ours: libc::sigaction = std::mem::zeroed();
        ours.sa_sigaction = on_sigbus as *const () as usize;
        ours.sa_flags = libc::SA_SIGINFO | libc::SA_NODEFER;
        libc::sigemptyset(&mut ours.sa_mask);
        if libc::sigaction(libc::SIGBUS, &ours, old) == 0 {
            PREVIOUS.store(old as *mut libc::sigaction as usize, Ordering::Release);
        }
    }
}

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for an SA_SIGINFO handler;
    // si_addr is the faulting address for SIGBUS.
    let addr = unsafe { (*info).si_addr() } as usize;
    let page = PAGE.load(Ordering::Relaxed);
    for i in 0..SLOTS {
        let start = START[i].load(Ordering::Acquire);
        let len = LEN[i].load(Ordering::Acquire);
        if start == 0 || addr < start || addr >= start + len {
            continue;
        }
        let at = addr & !(page - 1);
        // SAFETY: [at, at + page) lies inside a mapping this process made
        // and still holds (it is registered until the mapping is dropped),
        // so MAP_FIXED replaces only our own pages. mmap is a plain system
        // call, safe to make in a signal handler.
        let p = unsafe {
            libc::mmap(
                at as *mut libc::c_void,
                page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p != libc::MAP_FAILED {
            PATCHED[i].store(true, Ordering::Release);
            return;
        }
    }
    // Not ours: restore what was there and return; the fault repeats and
    // takes its usual course.
    let previous = PREVIOUS.load(Ordering::Acquire) as *const libc::sigaction;
    if !previous.is_null() {
        // SAFETY: `previous` points to the leaked sigaction filled in by
        // install(); sigaction is async-signal-safe.
        unsafe { libc::sigaction(libc::SIGBUS, previous, std::ptr::null_mut()) };
    } else {
        // SAFETY: as above, with the default disposition.
        unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
    }
}
