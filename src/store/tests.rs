//! The store's invariants (design.md), each with a test that fails when it
//! breaks: torn reads, writers killed mid-write, lost updates, the one-load
//! hot path, corruption, capacity. Several tests run real child processes:
//! this test binary again, entering `child_process` with a role in the
//! environment.
//!
//! Over 600 lines: one store's invariants, which read best side by side.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use super::*;
use crate::table::model::{Address, ServerSpec, Upstream};
use crate::testing::TempDir;

const SIZE: u64 = 256 * 1024;

fn server(port: u16) -> ServerSpec {
    ServerSpec::new(Address::Inet(
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, port).into(),
    ))
}

use std::net::{Ipv4Addr, SocketAddrV4};

fn seed() -> Result<Table> {
    let mut t = Table::default();
    t.upsert(Upstream::new("local", vec![server(8088), server(8089)]));
    Ok(t)
}

fn fresh(dir: &TempDir) -> StateFile {
    StateFile::open_uncached(&dir.file(), SIZE, seed).unwrap()
}

/// Options of a writer that must not wait: the lock has to be free.
fn no_wait() -> WriteOptions {
    WriteOptions {
        wait: Wait::Try,
        ..WriteOptions::default()
    }
}

fn add(port: u16) -> impl FnOnce(&mut Table) -> Result<()> {
    move |t| {
        t.get_mut("local").unwrap().servers.push(server(port));
        Ok(())
    }
}

fn flip_byte(path: &Path, at: u64) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0x55;
    f.write_all_at(&b, at).unwrap();
}

#[test]
fn a_new_file_holds_the_seed_at_version_1() {
    let dir = TempDir::new();
    let f = fresh(&dir);
    let s = f.read().unwrap();
    assert_eq!((s.version, s.seen), (1, 1));
    assert_eq!(s.table, seed().unwrap());
    assert!(s.fallback.is_none());
    assert_eq!(
        std::fs::metadata(dir.file()).unwrap().len(),
        f.geometry().file_len
    );
    // No temporary file is left beside it.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn an_existing_file_wins_over_the_seed() {
    let dir = TempDir::new();
    fresh(&dir)
        .write(&WriteOptions::default(), add(9000))
        .unwrap();
    let again =
        StateFile::open_uncached(&dir.file(), SIZE, || panic!("seeded an existing file")).unwrap();
    let s = again.read().unwrap();
    assert_eq!(s.version, 2);
    assert_eq!(s.table.get("local").unwrap().servers.len(), 3);
}

#[test]
fn a_seed_that_fails_creates_nothing() {
    let dir = TempDir::new();
    let err = StateFile::open_uncached(&dir.file(), SIZE, || {
        Err(Error::BadRequest("line 2: bad".into()))
    });
    assert_eq!(err.err().unwrap().to_string(), "line 2: bad");
    assert!(!dir.file().exists());
}

#[test]
fn each_write_raises_the_version_by_one_and_a_no_op_not_at_all() {
    let dir = TempDir::new();
    let f = fresh(&dir);
    let opts = WriteOptions::default();
    assert_eq!(f.write(&opts, add(9000)).unwrap().0, 2);
    assert_eq!(f.write(&opts, add(9001)).unwrap().0, 3);
    assert_eq!(f.write(&opts, |_| Ok(())).unwrap().0, 3);
    assert_eq!(f.generation(), 3);
    let s = f.read().unwrap();
    let local = s.table.get("local").unwrap();
    assert_eq!(local.rev, 3);
    let ports: Vec<_> = local.servers.iter().map(|s| s.addr.port()).collect();
    assert_eq!(ports, [8088, 8089, 9000, 9001]);
}

#[test]
fn a_failed_change_writes_nothing() {
    let dir = TempDir::new();
    let f = fresh(&dir);
    // All but the writers' queue (72..112), which every write attempt moves,
    // and the table's counters (128..512), which count the refusal.
    let table_bytes = || {
        let mut b = std::fs::read(dir.file()).unwrap();
        b[72..112].fill(0);
        b[128..512].fill(0);
        b
    };
    let before = table_bytes();
    let err = f
        .write(&WriteOptions::default(), |t| {
            t.remove("local");
            Err::<(), _>(Error::BadRequest("refused".into()))
        })
        .unwrap_err();
    assert_eq!(err.status(), 400);
    assert_eq!(table_bytes(), before);
    let snap = f.read().unwrap();
    let stats = f.table_stats(&snap);
    assert_eq!(stats.writes_refused[0], ("bad_request", 1));
    assert_eq!((stats.writes_accepted, stats.writes_unchanged), (0, 0));
}

#[test]
fn a_stale_expected_version_is_refused_with_412() {
    let dir = TempDir::new();
    let f = fresh(&dir);
    f.write(&WriteOptions::default(), add(9000)).unwrap();
    let stale = WriteOptions {
        expect: Some(1),
        ..WriteOptions::default()
    };
    let err = f.write(&stale, add(9001)).unwrap_err();
    assert_eq!(
        err,
        Error::VersionMismatch {
            expected: 1,
            actual: 2
        }
    );
    assert_eq!(err.status(), 412);
    assert_eq!(
        f.read().unwrap().table.get("local").unwrap().servers.len(),
        3
    );
    let current = WriteOptions {
        expect: Some(2),
        ..WriteOptions::default()
    };
    assert_eq!(f.write(&current, add(9001)).unwrap().0, 3);
}

#[test]
fn a_table_that_does_not_fit_is_refused_and_nothing_changes() {
    let dir = TempDir::new();
    let f = StateFile::open_uncached(&dir.file(), MIN_FILE_LEN, seed).unwrap();
    let err = f
        .write(&WriteOptions::default(), |t| {
            let many = (1..2000).map(server).collect();
            t.upsert(Upstream::new("big", many));
            Ok(())
        })
        .unwrap_err();
    assert_eq!(err.status(), 507);
    assert!(err.to_string().contains("raise `size`"), "{err}");
    let s = f.read().unwrap();
    assert_eq!((s.version, s.table), (1, seed().unwrap()));
    // A change that fits still goes through.
    assert_eq!(f.write(&WriteOptions::default(), add(9000)).unwrap().0, 2);
}

#[test]
fn the_unchanged_hot_path_reads_only_the_commit_word() {
    let dir = TempDir::new();
    let f = fresh(&dir);
    let seen = f.read().unwrap().seen;
    // Wreck both slots: a reader that looked at them would fail.
    let g = f.geometry();
    flip_byte(&dir.file(), g.slot_offset(0) + SLOT_HEADER);
    flip_byte(&dir.file(), g.slot_offset(1) + 16);
    assert!(f.read_if_changed(seen).unwrap().is_none());
    assert!(f.read().is_err());
}

#[test]
fn a_damaged_active_slot_falls_back_to_the_previous_table() {
    let dir = TempDir::new();
    let f = fresh(&dir);
    let opts = WriteOptions::default();
    f.write(&opts, add(9000)).unwrap(); // version 2, slot 1
    f.write(&opts, add(9001)).unwrap(); // version 3, slot 0
    flip_byte(&dir.file(), f.geometry().slot_offset(0) + SLOT_HEADER + 3);
    let s = f.read().unwrap();
    assert_eq!((s.seen, s.version), (3, 2));
    assert!(
        s.fallback.as_deref().unwrap().contains("checksum mismatch"),
        "{:?}",
        s.fallback
    );
    assert_eq!(s.table.get("local").unwrap().servers.len(), 3);

    // The next write builds on the damaged slot's table, kept in the copy,
    // and overwrites the bad slot: 9001 is not lost.
    assert_eq!(f.write(&opts, add(9002)).unwrap().0, 4);
    let s = f.read().unwrap();
    assert!(s.fallback.is_none());
    assert_eq!(ports(&s), [8088, 8089, 9000, 9001, 9002]);
}

#[test]
fn a_write_past_a_damaged_active_slot_without_a_copy_is_refused() {
    let dir = TempDir::new();
    let f = fresh(&dir);
    let opts = WriteOptions::default();
    f.write(&opts, add(9000)).unwrap(); // version 2, slot 1
    flip_byte(&dir.file(), f.geometry().slot_offset(1) + SLOT_HEADER + 3);
    std::fs::remove_file(f.copy_path()).unwrap();
    // All but the writers' queue (72..112), which every write attempt moves,
    // and the table's counters (128..512), which count the refusal.
    let table_bytes = || {
        let mut b = std::fs::read(dir.file()).unwrap();
        b[72..112].fill(0);
        b[128..512].fill(0);
        b
    };
    let before = table_bytes();
    let err = f.write(&opts, add(9001)).unwrap_err();
    assert_eq!(err.status(), 500);
    assert!(err.to_string().contains("nothing was changed"), "{err}");
    assert_eq!(table_bytes(), before);
    // Restored from a table that has 9000, writes go on.
    let mut held = f.read().unwrap();
    held.table
        .get_mut("local")
        .unwrap()
        .servers
        .push(server(9000));
    held.version = 2;
    let r = f.restore(&held).unwrap().unwrap();
    assert_eq!((r.version, r.from.as_str()), (3, "this worker's table"));
    let again = StateFile::open_uncached(&dir.file(), SIZE, seed).unwrap();
    assert_eq!(again.write(&opts, add(9001)).unwrap().0, 4);
    assert_eq!(ports(&again.read().unwrap()), [8088, 8089, 9000, 9001]);
}

fn ports(s: &Snapshot) -> Vec<u16> {
    s.table
        .get("local")
        .unwrap()
        .servers
        .iter()
        .map(|s| s.addr.port())
        .collect()
}

#[test]
fn a_damaged_commit_word_is_never_taken_for_a_generation() {
    let dir = TempDir::new();
    let f = fresh(&dir);
    f.write(&WriteOptions::default(), add(9000)).unwrap();
    let path = dir.file();
    let file = OpenOptions::new().write(true).open(&path).unwrap();
    // A generation no writer makes (and Lua's numbers cannot hold exactly):
    // readers would otherwise route by the slot it does not name, under it.
    let huge = layout::commit_word(1 << 60, 0);
    file.write_all_at(&huge.to_ne_bytes(), COMMIT_WORD as u64)
        .unwrap();
    let err = f.read().unwrap_err().to_string();
    assert!(err.contains("the commit word is damaged"), "{err}");
    let bytes = std::fs::read(&path).unwrap();
    let err = inspect_image(&bytes, "img").unwrap_err().to_string();
    assert!(err.contains("the commit word is damaged"), "{err}");
    // A plausible one in a wrecked header is not trusted either.
    let near = layout::commit_word(7, 0);
    file.write_all_at(&near.to_ne_bytes(), COMMIT_WORD as u64)
        .unwrap();
    assert_eq!(f.read().unwrap().fallback.map(|_| ()), Some(()));
    flip_byte(&path, 3);
    let err = f.read().unwrap_err().to_string();
    assert!(err.contains("its header is damaged"), "{err}");
    assert!(f.examine() != Health::Same);
}

#[test]
fn both_slots_damaged_is_an_error_naming_the_path() {
    let dir = TempDir::new();
    let f = fresh(&dir);
    f.write(&WriteOptions::default(), add(9000)).unwrap();
    let g = f.geometry();
    flip_byte(&dir.file(), g.slot_offset(0) + SLOT_HEADER + 1);
    flip_byte(&dir.file(), g.slot_offset(1) + SLOT_HEADER + 1);
    let err = f.read().unwrap_err().to_string();
    assert!(err.contains(&dir.file().display().to_string()), "{err}");
    assert!(err.contains("both table slots are unreadable"), "{err}");
    let err = f.write(&WriteOptions::default(), add(9001)).unwrap_err();
    assert_eq!(err.status(), 500);
}

#[test]
fn foreign_truncated_and_damaged_files_are_named_and_never_overwritten() {
    let dir = TempDir::new();
    let path = dir.file();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (Vec::new(), "truncated: 0 bytes"),
        (
            b"user nobody;\nworker_processes 2;\n".repeat(200),
            "bad magic",
        ),
        (
            {
                fresh(&dir);
                let mut b = std::fs::read(&path).unwrap();
                b.truncate(b.len() - 100);
                b
            },
            "truncated",
        ),
        (
            {
                let mut b = std::fs::read(&path).unwrap();
                b.truncate(HEADER_LEN as usize + 10);
                b
            },
            "truncated",
        ),
    ];
    for (bytes, why) in cases {
        std::fs::write(&path, &bytes).unwrap();
        let err = StateFile::open_uncached(&path, SIZE, seed)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains(why), "expected {why:?} in {err}");
        let inspected = StateFile::inspect(&path).err().unwrap().to_string();
        assert!(inspected.contains(why), "{inspected}");
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "the file was changed");
    }
}

#[test]
fn an_image_in_memory_checks_as_the_file_does() {
    let dir = TempDir::new();
    let f = fresh(&dir);
    f.write(&WriteOptions::default(), add(9000)).unwrap();
    let mut bytes = std::fs::read(dir.file()).unwrap();
    assert_eq!(inspect_image(&bytes, "img").unwrap(), f.read().unwrap());
    let active = f.geometry().slot_offset(1) as usize;
    bytes[active + SLOT_HEADER as usize] ^= 1;
    let s = inspect_image(&bytes, "img").unwrap();
    assert_eq!((s.seen, s.version), (2, 1));
    for n in [0, 10, 100, 4096, bytes.len() - 1] {
        assert!(
            inspect_image(&bytes[..n], "img").is_err(),
            "accepted {n} bytes"
        );
    }
}

#[test]
fn inspect_reads_without_creating() {
    let dir = TempDir::new();
    assert!(StateFile::inspect(&dir.file()).unwrap().is_none());
    assert!(!dir.file().exists());
    fresh(&dir)
        .write(&WriteOptions::default(), add(9000))
        .unwrap();
    assert_eq!(StateFile::inspect(&dir.file()).unwrap().unwrap().version, 2);
}

#[test]
fn one_process_opens_a_file_once_whatever_the_spelling() {
    let dir = TempDir::new();
    let a = StateFile::open(&dir.file(), SIZE, seed).unwrap();
    let b = StateFile::open(&dir.path().join(".").join("state"), SIZE, seed).unwrap();
    assert!(Arc::ptr_eq(&a, &b));
}

#[test]
fn try_wait_gets_busy_while_another_process_holds_the_lock() {
    let dir = TempDir::new();
    let f = fresh(&dir);
    let marker = dir.path().join("holding");
    let mut child = spawn(&format!(
        "hold-lock {} {}",
        dir.file().display(),
        marker.display()
    ));
    wait_for(&marker, &mut child);
    let err = f.write(&no_wait(), add(9000)).unwrap_err();
    assert_eq!(err.status(), 409, "{err}");
    let err = f
        .write(
            &WriteOptions {
                wait: Wait::For(Duration::from_millis(50)),
                ..WriteOptions::default()
            },
            add(9000),
        )
        .unwrap_err();
    assert!(err.to_string().contains("more than 50 ms"), "{err}");
    // The kernel drops the lock of a killed holder: the next writer proceeds.
    child.kill().unwrap();
    child.wait().unwrap();
    let opts = no_wait();
    assert_eq!(f.write(&opts, add(9000)).unwrap().0, 2);
}

#[test]
fn a_writer_killed_between_slot_and_commit_leaves_the_old_table() {
    let dir = TempDir::new();
    let f = fresh(&dir);
    f.write(&WriteOptions::default(), add(9000)).unwrap();
    let before = f.read().unwrap();
    let marker = dir.path().join("written");
    let mut child = spawn(&format!(
        "stall-before-publish {} {}",
        dir.file().display(),
        marker.display()
    ));
    wait_for(&marker, &mut child);
    // The child has filled the inactive slot and is about to publish.
    child.kill().unwrap();
    child.wait().unwrap();
    let after = f.read().unwrap();
    assert_eq!(after, before);
    // The cells the dead writer gave out were nobody's: those of the table
    // still in force are as they were.
    let local = after.table.get("local").unwrap();
    assert_eq!(local.peers, before.table.get("local").unwrap().peers);
    assert!((0..3).all(|i| f.zone().cell(local.peer(i)).is_some()));
    let opts = no_wait();
    assert_eq!(f.write(&opts, add(9001)).unwrap().0, 3);
}

#[test]
fn writers_killed_at_random_instants_leave_a_valid_file_and_no_lock() {
    let dir = TempDir::new();
    let f = fresh(&dir);
    let mut last = f.read().unwrap().version;
    for round in 0..12u64 {
        let mut child = spawn(&format!("write-forever {}", dir.file().display()));
        // Let it get going, then kill it wherever it is.
        let deadline = Instant::now() + Duration::from_secs(10);
        while f.generation() < last + 3 + round % 4 {
            assert!(
                Instant::now() < deadline,
                "the child writer made no progress"
            );
            std::thread::sleep(Duration::from_micros(200 + 37 * round));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        let s = f.read().unwrap();
        assert!(s.fallback.is_none());
        assert!(s.version >= last + 3);
        let local = s.table.get("local").unwrap();
        assert_eq!(local.servers.len(), 3);
        assert_eq!(
            local.servers[2].addr.port(),
            30_000 + (s.version % 1000) as u16
        );
        last = f.write(&no_wait(), |_| Ok(())).unwrap().0;
    }
}

#[test]
fn concurrent_writers_in_four_processes_lose_no_update() {
    let dir = TempDir::new();
    let f = fresh(&dir);
    let children: Vec<_> = (0..4u16)
        .map(|i| {
            spawn(&format!(
                "append {} {} 60",
                dir.file().display(),
                10_000 + i * 1000
            ))
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    let s = f.read().unwrap();
    assert_eq!(s.version, 1 + 4 * 60);
    let mut ports: Vec<_> = s
        .table
        .get("local")
        .unwrap()
        .servers
        .iter()
        .map(|s| s.addr.port())
        .collect();
    ports.sort();
    let mut want: Vec<u16> = vec![8088, 8089];
    want.extend((0..4u16).flat_map(|i| (0..60).map(move |k| 10_000 + i * 1000 + k)));
    want.sort();
    assert_eq!(ports, want);
}

#[test]
fn readers_in_other_processes_never_see_a_torn_table() {
    let dir = TempDir::new();
    let f = fresh(&dir);
    let readers: Vec<_> = (0..2)
        .map(|_| spawn(&format!("check-reads {}", dir.file().display())))
        .collect();
    // Every table written keeps "a" and "b" the same size, all ports equal:
    // a torn copy would mix two tables and break that.
    let opts = WriteOptions {
        durable: false,
        ..WriteOptions::default()
    };
    for i in 0..3000u16 {
        f.write(&opts, move |t| {
            let n = 1 + (i % 40) as usize;
            let port = 20_000 + i;
            t.upsert(Upstream::new("a", (0..n).map(|_| server(port)).collect()));
            t.upsert(Upstream::new("b", (0..n).map(|_| server(port)).collect()));
            Ok(())
        })
        .unwrap();
    }
    std::fs::write(dir.path().join("stop"), b"").unwrap();
    for mut r in readers {
        assert!(
            r.wait().unwrap().success(),
            "a reader saw a torn or unreadable table"
        );
    }
}

#[test]
fn pending_lists_changes_a_live_worker_has_not_applied() {
    let dir = TempDir::new();
    let f = fresh(&dir);
    let me = std::process::id();
    let i = f.register_worker(me).unwrap();
    assert_eq!(f.register_worker(me).unwrap(), i);
    f.set_applied(i, 1);
    f.write(&WriteOptions::default(), |t| {
        t.get_mut("local").unwrap().servers[0].down = true;
        Ok(())
    })
    .unwrap();
    let s = f.read().unwrap();
    let pending = f.pending(&s);
    assert_eq!(pending.len(), 1);
    assert_eq!((pending[0].server.port(), pending[0].removed), (8088, true));
    f.set_applied(i, s.version);
    assert!(f.pending(&s).is_empty());

    // An exited child that is not reaped yet (a zombie) counts as dead.
    let mut zombie = Command::new("true").spawn().unwrap();
    let z = zombie.id();
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::read_to_string(format!("/proc/{z}/stat")).is_ok_and(|s| !s.contains(") Z ")) {
        assert!(Instant::now() < deadline, "the child did not exit");
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(!pid_alive(z));
    zombie.wait().unwrap();

    // A dead process's entry does not hold changes back, and is reused.
    let mut gone = Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    let j = f.register_worker(dead).unwrap();
    f.set_applied(j, 0);
    assert!(f.pending(&s).is_empty());
    assert_eq!(
        f.workers(),
        vec![Worker {
            pid: me,
            applied: s.version
        }]
    );
    f.release_worker(i, me);
    assert!(f.workers().is_empty());
}

#[test]
fn the_change_log_is_bounded() {
    let dir = TempDir::new();
    let f = fresh(&dir);
    let opts = WriteOptions {
        durable: false,
        ..WriteOptions::default()
    };
    for i in 0..(CHANGE_LOG_MAX as u16 / 2 + 10) {
        f.write(&opts, move |t| {
            t.upsert(Upstream::new("x", vec![server(1 + i)]));
            Ok(())
        })
        .unwrap();
    }
    let s = f.read().unwrap();
    assert_eq!(s.changes.len(), CHANGE_LOG_MAX);
    assert_eq!(s.changes.to_vec().last().unwrap().version, s.version);
}

/// What a process wrote, it routes by without reading the slot back
/// (`read_if_changed`): the table as reading the slot gives it, also where
/// the two differ in form (a zone too full to give a server a cell; a sync
/// mark on a table without upstreams, which has nowhere to keep it).
/// Damage to the slot after the write is still found by `examine`.
#[test]
fn a_table_written_is_handed_over_as_its_slot_reads() {
    let dir = TempDir::new();
    let f = StateFile::open_uncached(&dir.file(), 64 << 10, || Ok(Table::default())).unwrap();
    let opts = WriteOptions {
        durable: false,
        ..WriteOptions::default()
    };
    let handed_as_read = |seen: u64| {
        let handed = f.read_if_changed(seen).unwrap().expect("a new table");
        let read = StateFile::inspect(&dir.file()).unwrap().unwrap();
        assert_eq!(handed, read);
        for (h, r) in handed.table.upstreams.iter().zip(&read.table.upstreams) {
            assert_eq!(h.peers, r.peers, "the cells of {}", h.name);
        }
        handed
    };
    // Every cell given out, to servers that are down (so the log stays
    // empty and the slot holds them).
    let cells = f.geometry().cells as u16;
    let full: Vec<ServerSpec> = (0..cells)
        .map(|i| ServerSpec {
            down: true,
            ..server(1000 + i)
        })
        .collect();
    f.write(&opts, |t| {
        t.upsert(Upstream::new("full", full));
        Ok(())
    })
    .unwrap();
    let s = handed_as_read(1);
    f.write(&opts, |t| {
        t.upsert(Upstream::new("late", vec![server(9000)]));
        Ok(())
    })
    .unwrap();
    let s = handed_as_read(s.seen);
    assert!(
        s.table.get("late").unwrap().peer(0).is_none(),
        "no cell left"
    );
    f.write(&opts, |t| {
        t.upstreams.clear();
        t.sync = Some(crate::table::model::SyncMark {
            revision: 7,
            cluster_id: 1,
            prefix: "/dyups/".into(),
        });
        Ok(())
    })
    .unwrap();
    let s = handed_as_read(s.seen);
    assert!(s.table.sync.is_none());

    f.write(&opts, |t| {
        t.upsert(Upstream::new("again", vec![server(9001)]));
        Ok(())
    })
    .unwrap();
    let active = layout::slot_of(f.commit().load(Ordering::Acquire));
    flip_byte(
        &dir.file(),
        f.geometry().slot_offset(active) + SLOT_HEADER + 10,
    );
    let handed = f.read_if_changed(s.seen).unwrap().unwrap();
    assert!(handed.fallback.is_none() && handed.table.get("again").is_some());
    assert!(
        matches!(f.examine(), Health::Damaged(_)),
        "{:?}",
        f.examine()
    );
}

// ---- damage under running processes -----------------------------------------

/// The ways a state file is damaged while processes have it mapped.
#[derive(Clone, Copy, Debug)]
enum Damage {
    Deleted,
    CutToZero,
    /// Cut inside slot 0, as `truncate -s 6000` does to a small file.
    CutIntoSlot0,
    /// Every byte after the header overwritten in place (same inode).
    SlotsOverwritten,
    /// The whole header block (fixed fields, commit word, worker table).
    HeaderWrecked,
    /// Bytes of the active slot's payload: the slot of the last write.
    ActiveSlotWrecked,
}

const DAMAGES: [Damage; 6] = [
    Damage::Deleted,
    Damage::CutToZero,
    Damage::CutIntoSlot0,
    Damage::SlotsOverwritten,
    Damage::HeaderWrecked,
    Damage::ActiveSlotWrecked,
];

/// Bytes no table checksum accepts, different in every call.
fn garbage(len: usize) -> Vec<u8> {
    static SEED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0x9e37_79b9);
    let mut x = SEED.fetch_add(0x6a09_e667, std::sync::atomic::Ordering::Relaxed) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn inflict(damage: Damage, path: &Path, g: Geometry) {
    let open = || {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap()
    };
    match damage {
        Damage::Deleted => std::fs::remove_file(path).unwrap(),
        Damage::CutToZero => open().set_len(0).unwrap(),
        Damage::CutIntoSlot0 => open().set_len(HEADER_LEN + 1904).unwrap(),
        Damage::SlotsOverwritten => open()
            .write_all_at(&garbage((g.file_len - HEADER_LEN) as usize), HEADER_LEN)
            .unwrap(),
        Damage::HeaderWrecked => open()
            .write_all_at(&garbage(HEADER_LEN as usize), 0)
            .unwrap(),
        Damage::ActiveSlotWrecked => {
            let f = open();
            let mut word = [0u8; 8];
            f.read_exact_at(&mut word, COMMIT_WORD as u64).unwrap();
            let active = layout::slot_of(u64::from_ne_bytes(word));
            let at = g.slot_offset(active) + SLOT_HEADER + 8;
            f.write_all_at(&garbage(16), at).unwrap();
        }
    }
}

#[test]
fn damage_right_after_another_process_wrote_keeps_its_write_in_the_restored_file() {
    for damage in DAMAGES {
        let dir = TempDir::new();
        // This process has the file mapped and its table read, and never
        // applies the other's write: it notices the damage, and restores.
        let f = fresh(&dir);
        let held = f.read().unwrap();
        let mut child = spawn(&format!("write-once {} 9000", dir.file().display()));
        assert!(
            child.wait().unwrap().success(),
            "{damage:?}: the write failed"
        );
        // Acknowledged, and the writer is gone: no process holds that table
        // in memory.
        inflict(damage, &dir.file(), f.geometry());
        assert_ne!(f.examine(), Health::Same, "{damage:?} went unnoticed");
        let r = f
            .restore(&held)
            .unwrap()
            .unwrap_or_else(|| panic!("{damage:?}: nothing restored"));
        let on_disk = StateFile::inspect(&dir.file()).unwrap().unwrap();
        assert!(
            on_disk.fallback.is_none(),
            "{damage:?}: {:?}",
            on_disk.fallback
        );
        assert_eq!(
            ports(&on_disk),
            [8088, 8089, 9000],
            "{damage:?}: from {}",
            r.from
        );
        assert_eq!(on_disk.version, r.version);
        assert!(r.version > 2, "{damage:?}: version {}", r.version);
        // Nothing else to do for the next process that notices.
        assert_eq!(f.restore(&held).unwrap(), None, "{damage:?}");
        // Writes go on in the restored file, and its copy protects them.
        let next = StateFile::open_uncached(&dir.file(), SIZE, seed).unwrap();
        assert_eq!(next.write(&no_wait(), add(9001)).unwrap().0, r.version + 1);
        inflict(Damage::SlotsOverwritten, &dir.file(), next.geometry());
        let r = next.restore(&held).unwrap().unwrap();
        let on_disk = StateFile::inspect(&dir.file()).unwrap().unwrap();
        assert_eq!(
            ports(&on_disk),
            [8088, 8089, 9000, 9001],
            "{damage:?} then overwritten"
        );
        assert_eq!(on_disk.version, r.version);
    }
}

#[test]
fn a_copy_of_another_file_is_never_taken() {
    let dir = TempDir::new();
    let f = fresh(&dir);
    let held = f.read().unwrap();
    f.write(&WriteOptions::default(), add(9000)).unwrap();
    let copy = std::fs::read(f.copy_path()).unwrap();
    drop(f);
    // A new file at the path (nginx stopped, the file deleted, started
    // again), which may even get the same inode number: the old copy goes.
    std::fs::remove_file(dir.file()).unwrap();
    let g = fresh(&dir);
    assert!(!g.copy_path().exists(), "a new file forgets the old copy");
    // And a copy put back by hand names another file: it is not taken.
    std::fs::write(g.copy_path(), &copy).unwrap();
    inflict(Damage::SlotsOverwritten, &dir.file(), g.geometry());
    let r = g.restore(&held).unwrap().unwrap();
    assert_eq!(r.from, "this worker's table");
    let on_disk = StateFile::inspect(&dir.file()).unwrap().unwrap();
    assert_eq!(ports(&on_disk), [8088, 8089]);
}

#[test]
fn a_missing_or_damaged_copy_stops_no_write_and_is_made_again() {
    let dir = TempDir::new();
    let f = fresh(&dir);
    let opts = WriteOptions::default();
    f.write(&opts, add(9000)).unwrap();
    let copy = f.copy_path().to_path_buf();
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&copy).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & !0o644, 0, "mode {mode:o}");
    }
    std::fs::write(&copy, garbage(100)).unwrap();
    assert_eq!(f.write(&opts, add(9001)).unwrap().0, 3);
    std::fs::remove_file(&copy).unwrap();
    assert_eq!(f.write(&opts, add(9002)).unwrap().0, 4);
    assert!(copy.exists(), "the next write makes it again");
    // A copy that cannot be written (a directory in its place): writes go
    // on, and the reason is told once.
    std::fs::remove_file(&copy).unwrap();
    std::fs::create_dir(&copy).unwrap();
    assert_eq!(f.write(&opts, add(9003)).unwrap().0, 5);
    assert_eq!(f.write(&opts, add(9004)).unwrap().0, 6);
    let why = f.copy_trouble().expect("the failure is told");
    assert!(why.contains(&copy.display().to_string()), "{why}");
    assert_eq!(f.copy_trouble(), None, "told once");
    std::fs::remove_dir(&copy).unwrap();
    assert_eq!(f.write(&opts, add(9005)).unwrap().0, 7);
    assert_eq!(f.copy_trouble(), None);
    // A new process starts without reading it.
    std::fs::write(&copy, garbage(100)).unwrap();
    let again = StateFile::open_uncached(&dir.file(), SIZE, seed).unwrap();
    assert_eq!(again.read().unwrap().version, 7);
}

// ---- the writers' queue ------------------------------------------------------

#[test]
fn waiting_writers_are_served_in_the_order_they_came() {
    let dir = TempDir::new();
    let f = fresh(&dir);
    let q = Queue::new(&f.map);
    let wait = Duration::from_secs(5);
    let mut tickets: Vec<_> = (0..4).map(|_| q.join(wait).unwrap()).collect();
    for served in 0..4u32 {
        // Only the oldest ticket left has the turn, however often the
        // others look.
        for _ in 0..3 {
            for (i, t) in tickets.iter_mut().enumerate() {
                let want = if i == 0 { Poll::Turn } else { Poll::Wait };
                assert_eq!(q.poll(t), want, "ticket {i} after {served} served");
            }
        }
        assert_eq!(q.len(), 4 - served);
        q.leave(tickets.remove(0));
    }
    assert_eq!(q.len(), 0);
    // An empty queue: a trylock writer gets the turn at once.
    assert!(q.join(Duration::ZERO).is_some_and(|t| t.turn));
}

#[test]
fn a_ticket_given_up_is_skipped_at_once() {
    let dir = TempDir::new();
    let f = fresh(&dir);
    let q = Queue::new(&f.map);
    let mut first = q.join(Duration::from_secs(5)).unwrap();
    assert_eq!(q.poll(&mut first), Poll::Turn);
    let mut quitter = q.join(Duration::from_millis(1)).unwrap();
    let mut last = q.join(Duration::from_secs(5)).unwrap();
    std::thread::sleep(Duration::from_millis(2));
    assert_eq!(q.poll(&mut quitter), Poll::TimedOut);
    q.leave(first);
    // Well within CLAIM_MAX_MS: skipped for the mark, not for the time.
    assert_eq!(q.poll(&mut last), Poll::Turn);
    // Trylock sees the queue busy while a live writer holds the turn.
    let err = f.write(&no_wait(), add(9000)).unwrap_err();
    assert!(err.to_string().contains("another writer holds it"), "{err}");
    q.leave(last);
    assert_eq!(f.write(&no_wait(), add(9000)).unwrap().0, 2);
}

#[test]
fn writers_killed_while_waiting_do_not_stall_the_queue() {
    let dir = TempDir::new();
    let f = fresh(&dir);
    let q = Queue::new(&f.map);
    let mut mine = q.join(Duration::from_secs(5)).unwrap();
    assert_eq!(q.poll(&mut mine), Poll::Turn);
    // Two writers join behind us and die waiting: the newest one's pid is
    // on the ticket counter, the other one's is known to nobody.
    for n in 0..2 {
        let marker = dir.path().join(format!("queued-{n}"));
        let mut child = spawn(&format!(
            "wait-in-queue {} {}",
            dir.file().display(),
            marker.display()
        ));
        wait_for(&marker, &mut child);
        child.kill().unwrap();
        child.wait().unwrap();
    }
    assert_eq!(q.len(), 3);
    q.leave(mine);
    let started = Instant::now();
    let opts = WriteOptions {
        wait: Wait::For(Duration::from_secs(5)),
        ..WriteOptions::default()
    };
    assert_eq!(f.write(&opts, add(9000)).unwrap().0, 2);
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_millis(queue::CLAIM_MAX_MS + 500),
        "waited {waited:?} for two dead waiters"
    );
    assert_eq!(q.len(), 0);
    // A dead waiter's ticket that is the only one is skipped even by a
    // writer that cannot wait: the ticket counter names its taker.
    let mut mine = q.join(Duration::from_secs(5)).unwrap();
    assert_eq!(q.poll(&mut mine), Poll::Turn);
    let marker = dir.path().join("queued-last");
    let mut child = spawn(&format!(
        "wait-in-queue {} {}",
        dir.file().display(),
        marker.display()
    ));
    wait_for(&marker, &mut child);
    child.kill().unwrap();
    child.wait().unwrap();
    q.leave(mine);
    assert_eq!(f.write(&no_wait(), add(9001)).unwrap().0, 3);
}

#[test]
fn a_durable_write_overwrites_the_other_slot_only_once_the_table_it_read_is_on_disk() {
    let dir = TempDir::new();
    let f = fresh(&dir);
    let lazy = WriteOptions {
        durable: false,
        ..WriteOptions::default()
    };
    let on_disk = || f.flushed().load(Ordering::Acquire);
    // A write that is not durable leaves its table not known to be on disk.
    assert_eq!(f.write(&lazy, add(9000)).unwrap().0, 2);
    assert!(on_disk() < 2);
    // The durable write after it flushes that table before it fills the
    // slot holding the one before (version 1, the fallback of version 2).
    let mut seen = None;
    let written = f.write_with(&WriteOptions::default(), add(9001), || {
        seen = Some(on_disk())
    });
    assert_eq!(written.unwrap().0, 3);
    assert_eq!(
        seen,
        Some(2),
        "the slot was filled before version 2 was on disk"
    );
    assert_eq!(on_disk(), 3, "answered before its own table was on disk");
    // A durable write that changes nothing vouches for the table it read.
    assert_eq!(f.write(&lazy, add(9002)).unwrap().0, 4);
    assert_eq!(f.write(&WriteOptions::default(), |_| Ok(())).unwrap().0, 4);
    assert_eq!(on_disk(), 4);
}

#[test]
fn a_turn_writer_never_blocks_and_holds_its_turn_until_its_flush_is_done() {
    let dir = TempDir::new();
    let f = fresh(&dir);
    let q = Queue::new(&f.map);
    let in_turn = |id, limit| WriteOptions {
        wait: Wait::Turn(id, limit),
        ..WriteOptions::default()
    };
    // Behind another writer: refused at once, still waiting.
    let mut other = q.join(Duration::from_secs(5)).unwrap();
    assert_eq!(q.poll(&mut other), Poll::Turn);
    let id = TurnId::new();
    let started = Instant::now();
    assert_eq!(
        f.write(&in_turn(id, Duration::from_secs(5)), add(9000))
            .unwrap_err()
            .status(),
        409
    );
    assert!(started.elapsed() < Duration::from_millis(100), "it blocked");
    assert_eq!(f.turn_state(id), TurnState::Waiting);
    assert_eq!(f.read().unwrap().version, 1);
    // Its turn comes: the write is made, its msync left to the caller.
    q.leave(other);
    assert_eq!(
        f.write(&in_turn(id, Duration::from_secs(5)), add(9000))
            .unwrap()
            .0,
        2
    );
    let TurnState::Held {
        flush: Some((at, len)),
    } = f.turn_state(id)
    else {
        panic!("no flush pending: {:?}", f.turn_state(id));
    };
    assert_eq!(at, f.map.address());
    assert!(
        len > f.geometry.slot_offset(1) as usize,
        "the range misses the slot written"
    );
    assert!(f.flushed().load(Ordering::Acquire) < 2);
    // Until it is finished nobody else writes; finishing msyncs.
    assert_eq!(f.write(&no_wait(), add(9001)).unwrap_err().status(), 409);
    f.finish_turn(id, false).unwrap();
    assert_eq!(f.flushed().load(Ordering::Acquire), 2);
    assert_eq!(f.turn_state(id), TurnState::Done);
    assert_eq!(f.write(&no_wait(), add(9001)).unwrap().0, 3);
    // One that waits past its limit leaves the queue, refused.
    let mut other = q.join(Duration::from_secs(5)).unwrap();
    assert_eq!(q.poll(&mut other), Poll::Turn);
    let late = TurnId::new();
    let limit = Duration::from_millis(5);
    assert!(f.write(&in_turn(late, limit), add(9002)).is_err());
    std::thread::sleep(limit * 2);
    let err = f.write(&in_turn(late, limit), add(9002)).unwrap_err();
    assert!(err.to_string().contains("more than 5 ms"), "{err}");
    assert_eq!(f.turn_state(late), TurnState::Done);
    q.leave(other);
    // Its ticket is left marked, skipped at once even by trylock (below).
    assert_eq!(q.len(), 1);
    // A caller that flushed itself says so: recorded, not synced again.
    let id = TurnId::new();
    assert_eq!(
        f.write(&in_turn(id, Duration::ZERO), add(9003)).unwrap().0,
        4
    );
    f.finish_turn(id, true).unwrap();
    assert_eq!(f.flushed().load(Ordering::Acquire), 4);
}

/// Issue 11: 8 processes writing 500 times each on one 16 MiB file with the
/// default options (durable, the default wait): with `flock` alone some were
/// refused after waiting the whole second while the others went round.
/// Fairness is judged against the run itself, not a fixed time, so a loaded
/// host (every write slower) does not fail it and an unfair queue does:
/// each write is served before any that came after it (one each, for the
/// clock readings' skew), and within (the writes ahead of it when it came
/// + 2) × the longest turn of the run.
#[test]
fn eight_processes_writing_500_times_each_are_all_served_in_time() {
    let dir = TempDir::new();
    let f = StateFile::open_uncached(&dir.file(), 16 << 20, seed).unwrap();
    let v0 = f.read().unwrap().version;
    let children: Vec<_> = (0..8)
        .map(|i| {
            spawn(&format!(
                "update-named {} u{i} 500 {}",
                dir.file().display(),
                dir.path().join(format!("result-{i}")).display()
            ))
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success(), "a writer failed");
    }
    let mut writes = Vec::new();
    let mut refused = Vec::new();
    for i in 0..8 {
        let result = std::fs::read_to_string(dir.path().join(format!("result-{i}"))).unwrap();
        let mut lines = result.lines();
        let n: u32 = lines.next().unwrap().parse().unwrap();
        if n > 0 {
            refused.push(format!("u{i}: {n} refused"));
        }
        writes.extend(lines.map(|l| {
            let t: Vec<u64> = l.split(' ').map(|x| x.parse().unwrap()).collect();
            TimedWrite {
                writer: i,
                came: t[0],
                done: t[1],
            }
        }));
    }
    let verdict = served_in_turn(&mut writes);
    eprintln!("8 x 500 writes: {}", verdict.summary);
    assert_eq!(refused, Vec::<String>::new(), "{}", verdict.summary);
    assert_eq!(verdict.late, Vec::<String>::new(), "{}", verdict.summary);
    // Every write applied: each changed the table, once.
    let s = f.read().unwrap();
    assert_eq!(s.version, v0 + 8 * 500);
    for i in 0..8 {
        let u = s.table.get(&format!("u{i}")).unwrap();
        assert_eq!(u.servers.len(), 1);
        assert_eq!(u.servers[0].addr.port(), 20_000 + 499);
    }
}

/// One write as its writer timed it, in µs on the host's monotonic clock:
/// when it called, and when the call returned.
struct TimedWrite {
    writer: usize,
    came: u64,
    done: u64,
}

/// What [`served_in_turn`] found.
struct Fairness {
    /// The writes served out of turn or too late, described.
    late: Vec<String>,
    summary: String,
}

/// Judges a run of writes on one file by the queue's promise: served in the
/// order they came, so a write waits only for the writes ahead of it. In
/// completion order, a write's turn is from the end of the one before (or
/// its coming, if later) to its own end; a write with k writes ahead (came
/// before it, not done when it came) ends within k + 1 turns of coming, and
/// no write that came after it ends before it. Bounds are relative to the
/// longest turn measured in the run, so a slow host moves them with it. The
/// clock is read outside the queue (a writer may be preempted between its
/// reading and its ticket, and its first write opens more first), so only a
/// write that came more than the longest turn later counts as overtaking,
/// and only the same writer doing so twice as out of turn. One turn of
/// margin in the bound covers the same skew.
fn served_in_turn(writes: &mut [TimedWrite]) -> Fairness {
    writes.sort_by_key(|w| w.done);
    let mut longest_turn = 0;
    let mut longest_wait = 0;
    let mut end_before = 0;
    for w in writes.iter() {
        longest_turn = longest_turn.max(w.done - w.came.max(end_before));
        longest_wait = longest_wait.max(w.done - w.came);
        end_before = w.done;
    }
    let mut late = Vec::new();
    for (i, w) in writes.iter().enumerate() {
        let ahead = writes
            .iter()
            .filter(|o| o.came < w.came && o.done > w.came)
            .count() as u64;
        // Done before it, though they came well after it: sorted by end,
        // they are among those before it. How often by one writer, at most.
        let mut by = std::collections::HashMap::new();
        for o in writes[..i]
            .iter()
            .filter(|o| o.came > w.came + longest_turn)
        {
            *by.entry(o.writer).or_insert(0u32) += 1;
        }
        let most = by.values().copied().max().unwrap_or(0);
        let waited = w.done - w.came;
        let bound = (ahead + 2) * longest_turn;
        if most > 1 || waited > bound {
            late.push(format!(
                "writer {} waited {waited} µs with {ahead} ahead (bound {bound} µs), overtaken {most} times by one writer",
                w.writer
            ));
        }
    }
    let summary = format!(
        "{} writes; the longest wait for one {:.1} ms, the longest turn {:.1} ms; {} served out of turn or late{}",
        writes.len(),
        longest_wait as f64 / 1e3,
        longest_turn as f64 / 1e3,
        late.len(),
        late.first().map(|l| format!(" (first: {l})")).unwrap_or_default()
    );
    Fairness { late, summary }
}

// ---- child processes -------------------------------------------------------

/// A child process killed when the test ends, pass or fail.
struct ChildGuard(Child);

impl std::ops::Deref for ChildGuard {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for ChildGuard {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(role: &str) -> ChildGuard {
    ChildGuard(
        Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "store::tests::child_process",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("DYUPS_TEST_CHILD", role)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    )
}

fn wait_for(marker: &Path, child: &mut ChildGuard) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !marker.exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the child exited early"
        );
        assert!(Instant::now() < deadline, "the child did not get there");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// How long any child process may run.
const CHILD_LIFETIME: Duration = Duration::from_secs(30);

/// Entry point of the child processes the tests above spawn; run alone it
/// does nothing.
#[test]
#[ignore = "entered by child processes of the multi-process tests"]
fn child_process() {
    let Ok(role) = std::env::var("DYUPS_TEST_CHILD") else {
        return;
    };
    let started = Instant::now();
    let args: Vec<&str> = role.split(' ').collect();
    let f = StateFile::open(Path::new(args[1]), SIZE, seed).unwrap();
    let opts = WriteOptions {
        wait: Wait::For(Duration::from_secs(30)),
        ..WriteOptions::default()
    };
    match args[0] {
        "hold-lock" => {
            let _g = f.lock(Wait::Try).unwrap();
            std::fs::write(args[2], b"").unwrap();
            std::thread::sleep(CHILD_LIFETIME);
        }
        "stall-before-publish" => {
            let marker = args[2].to_owned();
            f.write_with(&opts, add(9999), move || {
                std::fs::write(marker, b"").unwrap();
                std::thread::sleep(CHILD_LIFETIME);
            })
            .unwrap();
        }
        // Bounded, so a child outlives a crashed parent by seconds at most.
        "write-forever" => {
            while started.elapsed() < CHILD_LIFETIME {
                // Version v holds the two seeded servers and port 30000 + v % 1000.
                f.write(
                    &WriteOptions {
                        durable: false,
                        ..opts
                    },
                    |t| {
                        let next = f.generation() + 1;
                        let local = t.get_mut("local").unwrap();
                        local.servers.truncate(2);
                        local.servers.push(server(30_000 + (next % 1000) as u16));
                        Ok(())
                    },
                )
                .unwrap();
            }
        }
        "write-once" => {
            f.write(&opts, add(args[2].parse().unwrap())).unwrap();
        }
        "wait-in-queue" => {
            let q = Queue::new(&f.map);
            let mut ticket = q.join(CHILD_LIFETIME).unwrap();
            std::fs::write(args[2], b"").unwrap();
            while q.poll(&mut ticket) == Poll::Wait {
                q.wait(&ticket);
            }
        }
        // N writes of `NAME { server 127.0.0.1:20000+k; }` with the default
        // options; writes to RESULT how many were refused, then a line
        // "called returned" (µs, monotonic clock) for each write.
        "update-named" => {
            let name = args[2];
            let n: u16 = args[3].parse().unwrap();
            let mut refused = 0u32;
            let mut timed = String::new();
            for k in 0..n {
                let came = os::monotonic_us();
                let written = f.write(&WriteOptions::default(), |t| {
                    t.upsert(Upstream::new(name, vec![server(20_000 + k)]));
                    Ok(())
                });
                timed += &format!("{came} {}\n", os::monotonic_us());
                match written {
                    Ok(_) => {}
                    Err(Error::Busy(_)) => refused += 1,
                    Err(e) => panic!("{e}"),
                }
            }
            std::fs::write(args[4], format!("{refused}\n{timed}")).unwrap();
        }
        "append" => {
            let base: u16 = args[2].parse().unwrap();
            let n: u16 = args[3].parse().unwrap();
            for k in 0..n {
                f.write(&opts, add(base + k)).unwrap();
            }
        }
        "check-reads" => {
            let stop = Path::new(args[1]).with_file_name("stop");
            let mut seen = 0u64;
            let mut reads = 0u64;
            while (!stop.exists() || reads < 100) && started.elapsed() < CHILD_LIFETIME {
                let s = f.read().unwrap();
                assert!(s.fallback.is_none(), "{:?}", s.fallback);
                if let (Some(a), Some(b)) = (s.table.get("a"), s.table.get("b")) {
                    assert_eq!(a.servers.len(), b.servers.len());
                    let port = a.servers[0].addr.port();
                    assert!(a
                        .servers
                        .iter()
                        .chain(&b.servers)
                        .all(|s| s.addr.port() == port));
                    assert_eq!(a.servers.len(), 1 + ((port - 20_000) % 40) as usize);
                }
                assert!(s.version >= seen, "version went back");
                seen = s.version;
                reads += 1;
            }
        }
        other => panic!("unknown child role {other}"),
    }
}

#[test]
fn a_read_after_a_change_decodes_only_the_upstreams_that_changed() {
    let dir = TempDir::new();
    let f = fresh(&dir);
    let opts = WriteOptions::default();
    for name in ["a", "b", "c"] {
        f.write(&opts, move |t| {
            t.upsert(Upstream::new(name, vec![server(7000)]));
            Ok(())
        })
        .unwrap();
    }
    let before = f.read().unwrap();
    f.write(&opts, |t| {
        t.get_mut("b").unwrap().servers.push(server(7001));
        Ok(())
    })
    .unwrap();
    let after = f.read().unwrap();
    let shared: Vec<bool> = before
        .table
        .upstreams
        .iter()
        .zip(&after.table.upstreams)
        .map(|(x, y)| Arc::ptr_eq(x, y))
        .collect();
    assert_eq!(
        shared,
        [true, true, false, true],
        "local, a, b (changed), c"
    );
    assert_eq!(after.table.get("b").unwrap().rev, after.version);
    assert_eq!(
        after.table.get("a").unwrap().rev,
        before.table.get("a").unwrap().rev
    );
    // Another process, with nothing to share, decodes the same table.
    assert_eq!(
        inspect_image(&std::fs::read(dir.file()).unwrap(), "img")
            .unwrap()
            .table,
        after.table
    );
}

/// The cell of server `port` of upstream `local` in `s`.
fn cell_of(s: &Snapshot, port: u16) -> crate::table::model::PeerRef {
    let local = s.table.get("local").unwrap();
    let i = local.servers.iter().position(|x| x.addr.port() == port);
    local.peer(i.expect("no such server"))
}

#[test]
fn servers_keep_their_shared_cells_across_writes_and_new_ones_start_at_zero() {
    let dir = TempDir::new();
    let f = fresh(&dir);
    // A second mapping of the file, as another worker has.
    let other = StateFile::open_uncached(&dir.file(), SIZE, seed).unwrap();
    let opts = WriteOptions::default();
    let s1 = f.read().unwrap();
    let kept = cell_of(&s1, 8089);
    let cell = f.zone().cell(kept).expect("seeded servers have cells");
    cell.acquire(kept.tag);
    cell.add_failure(kept.tag, 1_000);
    let seen = other.zone().cell(kept).expect("the same cell there");
    assert_eq!((seen.conns(), seen.fails()), (1, 1));

    f.write(&opts, add(9000)).unwrap();
    let s2 = other.read().unwrap();
    assert_eq!(
        cell_of(&s2, 8089),
        kept,
        "a server that stays keeps its cell"
    );
    assert_eq!(other.zone().cell(kept).unwrap().conns(), 1);
    let new = cell_of(&s2, 9000);
    assert_ne!(new.index, kept.index);
    assert_eq!(other.zone().cell(new).unwrap().conns(), 0);

    // 8089 goes; once that table is in force its cell may be given again,
    // and whoever gets it starts from zero under a new tag.
    f.write(&opts, |t| {
        t.get_mut("local")
            .unwrap()
            .servers
            .retain(|s| s.addr.port() != 8089);
        Ok(())
    })
    .unwrap();
    f.write(&opts, |t| {
        t.upsert(Upstream::new("fresh", (1..=40).map(server).collect()));
        Ok(())
    })
    .unwrap();
    let s4 = f.read().unwrap();
    let fresh = s4.table.get("fresh").unwrap();
    let reused = (0..40)
        .map(|i| fresh.peer(i))
        .find(|r| r.index == kept.index)
        .expect("the freed cell is given again");
    assert_ne!(reused.tag, kept.tag);
    let c = f.zone().cell(reused).unwrap();
    assert_eq!((c.conns(), c.fails(), c.checked_ms()), (0, 0, 0));
    assert!(f.zone().cell(kept).is_none(), "the old tag counts nothing");
    // Every server has a cell of its own.
    let mut all: Vec<u32> = s4
        .table
        .upstreams
        .iter()
        .flat_map(|u| u.peers.iter().map(|p| p.index))
        .collect();
    let n = all.len();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), n);
    assert_eq!(n, 2 + 40);
}

#[test]
fn a_change_of_method_or_keepalive_alone_is_a_write() {
    let dir = TempDir::new();
    let f = fresh(&dir);
    let opts = WriteOptions::default();
    let (v, ()) = f
        .write(&opts, |t| {
            t.get_mut("local").unwrap().policy = crate::table::policy::Policy::LeastConn;
            Ok(())
        })
        .unwrap();
    assert_eq!(v, 2);
    let (v, ()) = f
        .write(&opts, |t| {
            t.get_mut("local").unwrap().keepalive = 8;
            Ok(())
        })
        .unwrap();
    assert_eq!(v, 3);
    let local = f.read().unwrap().table.get("local").unwrap().clone();
    assert_eq!((local.keepalive, local.rev), (8, 3));
    assert_eq!(local.policy, crate::table::policy::Policy::LeastConn);
}

#[test]
fn connection_counts_are_cleared_only_when_no_worker_lives() {
    let dir = TempDir::new();
    let f = fresh(&dir);
    let r = cell_of(&f.read().unwrap(), 8088);
    let cell = f.zone().cell(r).unwrap();
    cell.acquire(r.tag);
    let me = std::process::id();
    let entry = f.register_worker(me).unwrap();
    assert!(
        !f.clear_connections(),
        "a live worker may still give it back"
    );
    assert_eq!(cell.conns(), 1);
    f.release_worker(entry, me);
    assert!(f.clear_connections());
    assert_eq!(cell.conns(), 0);
    assert!(f.zone().cell(r).is_some(), "the cell is still the server's");
}

#[test]
fn a_new_state_file_is_0644_even_over_a_stale_temporary_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new();
    // What a process of this pid that died between creating and renaming
    // would have left, made by a version that used the umask's mode.
    let stale = dir
        .path()
        .join(format!(".state.{}.tmp", std::process::id()));
    std::fs::write(&stale, b"junk").unwrap();
    std::fs::set_permissions(&stale, std::fs::Permissions::from_mode(0o666)).unwrap();
    fresh(&dir);
    let mode = std::fs::metadata(dir.file()).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode & 0o022,
        0,
        "the state file is {mode:o}: others may write it"
    );
    assert!(!stale.exists(), "the temporary file was left");
}

#[test]
fn the_copy_keeps_the_settings_stored_in_the_slot_extension() {
    // Check lines and keepalive settings live in the slot's extension
    // (codec.rs), not its base: a restore from the copy must bring them back.
    let dir = TempDir::new();
    let f = fresh(&dir);
    let held = f.read().unwrap();
    let body = "keepalive 8; keepalive_timeout 30s; \
                check interval=3000 rise=2 fall=5 timeout=1000 type=http; \
                check_http_send \"GET /health HTTP/1.0\\r\\n\\r\\n\"; \
                server 127.0.0.1:9000 slow_start=30s;";
    f.write(&WriteOptions::default(), |t| {
        crate::admin::ops::update(t, "checked", body)
    })
    .unwrap();
    let written = f.read().unwrap().table;
    assert_eq!(written.get("checked").unwrap().servers[0].slow_start, 30);
    inflict(Damage::SlotsOverwritten, &dir.file(), f.geometry());
    let r = f.restore(&held).unwrap().unwrap();
    assert!(r.from.contains("copy"), "restored from {}", r.from);
    let on_disk = StateFile::inspect(&dir.file()).unwrap().unwrap();
    assert_eq!(on_disk.table, written);
    assert!(on_disk
        .table
        .get("checked")
        .unwrap()
        .same_content(written.get("checked").unwrap()));
}

#[test]
fn a_write_marks_servers_coming_into_rotation_for_slow_start() {
    // slow_start ramps a server from when it became available again: the
    // writer stamps that in its cell before publishing, so every worker
    // ramps it from the same time and none routes to it at full weight.
    let dir = TempDir::new();
    let f = fresh(&dir);
    let since = |f: &StateFile, port: u16| {
        let snap = f.read().unwrap();
        let u = snap.table.get("local").unwrap();
        let i = u
            .servers
            .iter()
            .position(|s| s.addr.port() == port)
            .unwrap();
        f.zone().cell(u.peer(i)).unwrap().available_since()
    };
    // The seed's servers are not coming back from anywhere.
    assert_eq!(since(&f, 8088), 0);
    let before = super::unix_ms();
    f.write(&no_wait(), |t| {
        let mut s = server(9001);
        s.slow_start = 30;
        t.get_mut("local").unwrap().servers.push(s);
        t.get_mut("local").unwrap().servers[0].slow_start = 30;
        Ok(())
    })
    .unwrap();
    // Added: marked. Given a slow_start while it stays up: not.
    assert!(since(&f, 9001) >= before);
    assert_eq!(since(&f, 8088), 0);
    // Taken down, then put back: marked when it is back.
    let down = |on: bool| {
        move |t: &mut Table| {
            t.get_mut("local").unwrap().servers[0].down = on;
            Ok(())
        }
    };
    f.write(&no_wait(), down(true)).unwrap();
    assert_eq!(since(&f, 8088), 0, "down: nothing to ramp yet");
    let back = super::unix_ms();
    f.write(&no_wait(), down(false)).unwrap();
    assert!(since(&f, 8088) >= back);
    // A server without slow_start is never marked by a write.
    f.write(&no_wait(), add(9002)).unwrap();
    assert_eq!(since(&f, 9002), 0);
}
