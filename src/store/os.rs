//! What the store asks of the operating system beyond files: whether a
//! process lives, who we are, who a user is, a file's blocks, and how the
//! page cache holds it.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// Whether a process with this pid exists. A process of another user counts
/// (EPERM): nginx workers may run as a different user than the caller.
pub fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 sends nothing; it only checks that the pid
    // exists and may be signalled. It has no memory effects.
    let rc = unsafe { libc::kill(pid, 0) };
    let exists = rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    exists && !zombie(pid)
}

/// A process that has exited but not been reaped yet still takes signals;
/// on Linux, /proc says it is a zombie. Elsewhere we cannot tell.
fn zombie(pid: libc::pid_t) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "pid (comm) S ...": the state follows the last ')', as comm may hold any.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        == Some("Z")
}

/// The effective uid of this process.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid takes no arguments, cannot fail and touches no memory.
    unsafe { libc::geteuid() }
}

/// The uid and gid of user `name`, from the system's user database.
pub fn user_ids(name: &str) -> Option<(u32, u32)> {
    let c = CString::new(name).ok()?;
    let mut pwd: libc::passwd = unsafe_zeroed_passwd();
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call: `c` is a NUL-terminated
    // string, `pwd` and `out` are live locals, `buf` is a live buffer of the
    // length passed. getpwnam_r writes only into them.
    let rc =
        unsafe { libc::getpwnam_r(c.as_ptr(), &mut pwd, buf.as_mut_ptr(), buf.len(), &mut out) };
    (rc == 0 && !out.is_null()).then_some((pwd.pw_uid, pwd.pw_gid))
}

fn unsafe_zeroed_passwd() -> libc::passwd {
    // SAFETY: libc::passwd is a plain C struct of integers and pointers, for
    // which all-zero bytes (null pointers, zero ids) is a valid value.
    unsafe { std::mem::zeroed() }
}

/// Gives `file` its blocks up to `len` bytes (growing it to that length if
/// it is shorter), so that writes within them cannot fail for want of space.
pub fn allocate(file: &File, len: u64) -> io::Result<()> {
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::other("file too large"))?;
    // SAFETY: posix_fallocate takes a descriptor `file` keeps open for the
    // whole call, and two integers; it touches no memory of this process.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
    // It returns the error number rather than setting errno.
    match rc {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

/// Tells the kernel that `file` is read at random: no readahead, so the
/// pages a read brings into the page cache come one page (one folio) each.
/// See [`drop_cached`] for why the state file wants that.
pub fn read_at_random(file: &File) {
    // SAFETY: posix_fadvise takes a descriptor `file` keeps open for the
    // whole call and three integers; it only sets how the kernel reads ahead.
    // Advice: a failure changes nothing but speed, and is ignored.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
}

/// Drops the pages of `file` the page cache holds clean and no process
/// maps. Why: a file written or read in large pieces is cached in large
/// folios (2 MiB on ext4 since Linux 6.x), and a store through a mapping
/// into a folio that an msync cleaned dirties all of it again (ext4's
/// page_mkwrite marks every block of the folio), so each durable write
/// wrote 2 MiB per folio it touched: the header's and the slot's, 4 MiB
/// where 16 KiB changed. Pages read again after this come one page each
/// ([`read_at_random`], and the mappings' random-access advice).
pub fn drop_cached(file: &File) {
    // SAFETY: as in `read_at_random`: a descriptor and integers, no memory.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

/// Milliseconds on the system's monotonic clock: the same clock in every
/// process on the host (it restarts at boot), so one process can time what
/// another stamped in the shared mapping.
pub fn monotonic_ms() -> u64 {
    monotonic_us() / 1000
}

/// Microseconds on the same clock as [`monotonic_ms`]: for timing one
/// process's events against another's finer than a millisecond.
pub fn monotonic_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a live, writable timespec; clock_gettime writes only
    // into it, and CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}

/// Sleeps until `word` may no longer hold `expected` (another process woke
/// it), or `timeout` passed, or a signal came. A shared futex (no
/// FUTEX_PRIVATE_FLAG): `word` is in a file mapping other processes wait on
/// and wake too.
pub fn futex_wait(
    word: &std::sync::atomic::AtomicU32,
    expected: u32,
    timeout: std::time::Duration,
) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `word` is a live, aligned 4-byte atomic for the whole call
    // (the mapping outlives it); the kernel only reads it and queues us on
    // its address. `ts` is a live timespec (a relative timeout). The result
    // needs no handling: every return (woken, value changed, timed out,
    // interrupted) sends the caller back to re-read the word.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
        );
    }
}

/// Wakes every process waiting in [`futex_wait`] on `word`.
pub fn futex_wake(word: &std::sync::atomic::AtomicU32) {
    // SAFETY: `word` is a live, aligned 4-byte atomic; FUTEX_WAKE only
    // looks up waiters queued on its address and touches no memory.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX);
    }
}
