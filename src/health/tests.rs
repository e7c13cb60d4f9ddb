use std::collections::{HashMap, HashSet};

use super::prober::lease_parts;
use super::status::{render, rows, Filter, Format};
use super::*;
use crate::table::model::{PeerRef, Table};
use crate::testing::TempDir;

const BODY: &str = "server 127.0.0.1:81; server 127.0.0.1:82; \
                    check interval=1000 rise=2 fall=3 timeout=500 type=http;";

/// Check settings `fp` with `rise` and `fall`, for a server of nginx's
/// default `max_fails=1`.
fn rule(fp: u8, rise: u32, fall: u32) -> Rule {
    Rule {
        fp,
        rise,
        fall,
        max_fails: 1,
    }
}

fn cell_of<'a>(zone: Zone<'a>, table: &Table, name: &str, i: usize) -> (&'a PeerCell, PeerRef) {
    let u = table.upstreams.iter().find(|u| u.name == name).unwrap();
    let r = u.peer(i);
    (zone.cell(r).unwrap(), r)
}

#[test]
fn new_servers_of_default_down_upstreams_start_checking() {
    let dir = TempDir::new();
    let store = dir.store(&[
        ("a", BODY),
        (
            "b",
            "server 127.0.0.1:81; check interval=1000 default_down=false;",
        ),
        ("c", "server 127.0.0.1:81;"),
    ]);
    let snap = store.read().unwrap();
    let zone = store.zone();
    let (a, ra) = cell_of(zone, &snap.table, "a", 0);
    let (b, rb) = cell_of(zone, &snap.table, "b", 0);
    let (c, rc) = cell_of(zone, &snap.table, "c", 0);
    assert!(a.check_down(ra.tag) && verdict(a, ra.tag).unwrap().checking);
    assert!(!b.check_down(rb.tag));
    assert!(!c.check_down(rc.tag));
    // The same address in two upstreams: two cells, two states.
    assert_ne!(ra.index, rb.index);

    // A server added at run time is stamped by the writer, before any
    // worker can route to it.
    store
        .write(&Default::default(), |t| {
            crate::admin::ops::update(t, "a", &format!("{BODY} server 127.0.0.1:83;"))
        })
        .unwrap();
    let snap = store.read().unwrap();
    let (n, rn) = cell_of(zone, &snap.table, "a", 2);
    assert!(n.check_down(rn.tag));
    // The servers that stayed kept their cells.
    assert_eq!(cell_of(zone, &snap.table, "a", 0).1, ra);
}

#[test]
fn rise_and_fall_flip_the_verdict_and_a_settings_change_restarts_the_counts() {
    let c = PeerCell::default();
    c.reset_checked(4, true);
    let rec = |fp, o| record(&c, 4, rule(fp, 2, 3), o, 1).unwrap().1;
    assert!(rec(1, Outcome::Passed).checking, "one pass of two");
    let v = rec(1, Outcome::Passed);
    assert!(!v.checking && !v.down && v.passes == 2);
    rec(1, Outcome::Timeout);
    rec(1, Outcome::Late);
    let v = rec(1, Outcome::Connect);
    assert!(!v.down && v.failures == 2, "late counts for nothing: {v:?}");
    assert!(rec(1, Outcome::BadStatus).down);
    assert!(c.check_down(4));
    // New settings: still down, counts from zero.
    let v = rec(2, Outcome::Passed);
    assert!(v.down && v.passes == 1 && v.failures == 0);
    assert!(!rec(2, Outcome::Passed).down);
    // Another server's cell now: nothing recorded.
    c.reset(5);
    assert!(record(&c, 4, rule(2, 2, 3), Outcome::Timeout, 1).is_none());
    assert!(!c.check_down(4) && !c.check_down(5));
}

#[test]
fn a_passing_probe_forgets_passive_failures() {
    let c = PeerCell::default();
    c.reset(1);
    c.add_failure(1, 10);
    c.add_failure(1, 11);
    record(&c, 1, rule(1, 2, 3), Outcome::Timeout, 12);
    assert_eq!(c.fails(), 2);
    record(&c, 1, rule(1, 2, 3), Outcome::Passed, 13);
    assert_eq!(c.fails(), 0);
}

#[test]
fn a_server_back_by_its_probes_is_marked_available_for_slow_start() {
    let c = PeerCell::default();
    c.reset_checked(1, true);
    let pass = |at| record(&c, 1, rule(1, 2, 2), Outcome::Passed, at).unwrap();
    pass(100);
    assert_eq!(
        c.available_since(),
        0,
        "still checking after one pass of two"
    );
    pass(200);
    assert_eq!(c.available_since(), 200, "up: the ramp starts");
    pass(300);
    assert_eq!(c.available_since(), 200, "staying up starts nothing");
    // Down by its checks, then up again.
    for at in [400, 500] {
        record(&c, 1, rule(1, 2, 2), Outcome::Timeout, at);
    }
    assert!(c.check_down(1));
    pass(600);
    pass(700);
    assert_eq!(c.available_since(), 700);
    // Passive failures at max_fails had made it unavailable: a passing
    // probe brings it back and marks it; below max_fails it never left.
    c.add_failure(1, 800);
    pass(900);
    assert_eq!((c.fails(), c.available_since()), (0, 900));
    c.add_failure(1, 1_000);
    let three = Rule {
        max_fails: 3,
        ..rule(1, 2, 2)
    };
    record(&c, 1, three, Outcome::Passed, 1_100);
    assert_eq!((c.fails(), c.available_since()), (0, 900));
}

#[test]
fn outcomes_from_what_the_socket_saw() {
    let e = ExpectAlive::default();
    let http = CheckType::Http;
    assert_eq!(classify(http, e, Some(200), None, 3, 500), Outcome::Passed);
    assert_eq!(classify(http, e, Some(302), None, 3, 500), Outcome::Passed);
    assert_eq!(
        classify(http, e, Some(500), None, 3, 500),
        Outcome::BadStatus
    );
    assert_eq!(
        classify(http, e, Some(100), None, 3, 500),
        Outcome::BadStatus
    );
    let five = ExpectAlive::from_bits(0b1000).unwrap();
    assert_eq!(
        classify(http, five, Some(503), None, 3, 500),
        Outcome::Passed
    );
    assert_eq!(
        classify(http, e, None, Some("timeout"), 510, 500),
        Outcome::Timeout
    );
    // The loop was busy: the timer fired long after the timeout.
    assert_eq!(
        classify(http, e, None, Some("timeout"), 2000, 500),
        Outcome::Late
    );
    assert_eq!(
        classify(http, e, None, Some("connect: connection refused"), 1, 500),
        Outcome::Connect
    );
    assert_eq!(
        classify(http, e, None, Some("connection reset by peer"), 1, 500),
        Outcome::Socket
    );
    assert_eq!(
        classify(http, e, None, Some("bad status line"), 1, 500),
        Outcome::Garbage
    );
    assert_eq!(
        classify(CheckType::Tcp, e, None, None, 1, 500),
        Outcome::Passed
    );
}

fn live_store() -> (TempDir, std::sync::Arc<crate::store::StateFile>) {
    let dir = TempDir::new();
    let s = dir.store(&[("a", BODY), ("plain", "server 127.0.0.1:81;")]);
    (dir, s)
}

#[test]
fn one_probe_per_server_per_interval_over_every_worker() {
    let (_dir, store) = live_store();
    let snap = store.read().unwrap();
    let zone = store.zone();
    let live = [100, 200];
    let mut w1 = Prober::new(1, MAX_IN_FLIGHT, 50);
    let mut w2 = Prober::new(2, MAX_IN_FLIGHT, 50);
    let mut count = HashMap::<String, usize>::new();
    let t0 = 1_000_000;
    // 10 s of ticks every 50 ms in both workers, each probe answering at once.
    let mut now = t0;
    while now < t0 + 10_000 {
        for (w, me) in [(&mut w1, 100), (&mut w2, 200)] {
            for j in w.due(&snap.table, snap.seen, zone, now, me, &live) {
                *count
                    .entry(format!("{}:{}", j.target.host, j.target.port))
                    .or_default() += 1;
                w.record(zone, j.token, Some(200), None, 1, now);
            }
        }
        now += 50;
    }
    // Only `a` has checks; each of its servers 10 times (+1 for the
    // probe at once), and the two are spread over the two workers.
    assert_eq!(count.len(), 2, "{count:?}");
    for (k, n) in &count {
        assert!((10..=11).contains(n), "{k}: {n}");
    }
    let owners: HashSet<u32> = (0..2)
        .map(|i| {
            lease_parts(
                cell_of(zone, &snap.table, "a", i)
                    .0
                    .lease_word()
                    .load(Ordering::Acquire),
            )
            .1
        })
        .collect();
    assert_eq!(owners.len(), 2, "spread over the workers: {owners:?}");
    // Up after rise=2 passes.
    let (c, r) = cell_of(zone, &snap.table, "a", 0);
    assert!(!c.check_down(r.tag));
}

#[test]
fn a_dead_or_stalled_owner_is_taken_over_within_two_intervals() {
    let (_dir, store) = live_store();
    let snap = store.read().unwrap();
    let zone = store.zone();
    let mut w1 = Prober::new(1, MAX_IN_FLIGHT, 50);
    let mut w2 = Prober::new(2, MAX_IN_FLIGHT, 50);
    let t0 = 1_000_000;
    let mut last = HashMap::new();
    // Both live; w1 (pid 100) probes once, then stalls (never ticks again).
    for j in w1.due(&snap.table, snap.seen, zone, t0, 100, &[100, 200]) {
        last.insert(j.target.host.clone() + &j.target.port.to_string(), t0);
        w1.record(zone, j.token, Some(200), None, 1, t0);
    }
    let mut now = t0;
    let mut taken = None;
    while now < t0 + 5_000 {
        now += 50;
        for j in w2.due(&snap.table, snap.seen, zone, now, 200, &[100, 200]) {
            if j.target.port == 81 && taken.is_none() {
                // Port 81 (cell 0 of `a`) may have gone to w1.
                taken = Some(now);
            }
            w2.record(zone, j.token, Some(200), None, 1, now);
        }
    }
    let (c, _) = cell_of(zone, &snap.table, "a", 0);
    assert_eq!(lease_parts(c.lease_word().load(Ordering::Acquire)).1, 200);
    let at = taken.expect("port 81 (cell 0) went to pid 100, and was taken over");
    // Due at t0 + 1000, overdue one interval later; ticks every 50 ms.
    assert!(
        at - t0 <= 2_050,
        "taken over {} ms after the last probe",
        at - t0
    );
    // A dead owner (not among the live) is replaced at once.
    let mut w3 = Prober::new(3, MAX_IN_FLIGHT, 50);
    let jobs = w3.due(&snap.table, snap.seen, zone, now + 1, 300, &[300]);
    assert_eq!(jobs.len(), 2, "both servers, probed at once");
}

#[test]
fn at_the_cap_a_due_probe_waits_and_is_reported_late() {
    let (_dir, store) = live_store();
    let snap = store.read().unwrap();
    let zone = store.zone();
    let mut w = Prober::new(1, 1, 50);
    let jobs = w.due(&snap.table, snap.seen, zone, 1_000, 7, &[7]);
    assert_eq!(jobs.len(), 1, "cap of one");
    assert_eq!(w.due(&snap.table, snap.seen, zone, 1_300, 7, &[7]).len(), 0);
    let waiting = (0..2)
        .map(|i| cell_of(zone, &snap.table, "a", i).0)
        .find(|c| c.result_word().load(Ordering::Acquire) >> 44 != 0)
        .expect("the waiting server is reported late");
    assert_eq!(waiting.result_word().load(Ordering::Acquire) >> 44, 300);
    w.record(zone, jobs[0].token, None, Some("timeout"), 500, 1_500);
    assert_eq!(w.due(&snap.table, snap.seen, zone, 1_550, 7, &[7]).len(), 1);
}

#[test]
fn a_probe_that_never_reports_is_given_up_and_frees_its_place() {
    let (_dir, store) = live_store();
    let snap = store.read().unwrap();
    let zone = store.zone();
    let mut w = Prober::new(1, 1, 50);
    let lost = w.due(&snap.table, snap.seen, zone, 1_000, 7, &[7]);
    assert_eq!(lost.len(), 1, "cap of one");
    // Its runner died before `record`: while the probe could still be
    // running (12 timeouts of 500 ms, plus the slack), it holds the place.
    let bound = 1_000 + 12 * 500 + 5_000;
    for now in [2_000, 6_000, bound - 1] {
        assert!(
            w.due(&snap.table, snap.seen, zone, now, 7, &[7]).is_empty(),
            "at {now}"
        );
        assert_eq!(w.in_flight(), 1);
    }
    // Past it, the place is free: the walk starts a probe again, and the
    // lost server itself is probed again once due.
    let next = w.due(&snap.table, snap.seen, zone, bound, 7, &[7]);
    assert_eq!(next.len(), 1, "a probe after the lost one was given up");
    assert_eq!(w.in_flight(), 1);
    // A result that still comes for the lost token changes nothing.
    assert!(w
        .record(zone, lost[0].token, Some(500), None, 1, bound)
        .is_none());
    assert_eq!(w.in_flight(), 1);
    w.record(zone, next[0].token, Some(200), None, 1, bound + 1);
    let mut seen = HashSet::new();
    for now in (bound + 50..bound + 3_000).step_by(50) {
        for j in w.due(&snap.table, snap.seen, zone, now, 7, &[7]) {
            seen.insert(j.target.port);
            w.record(zone, j.token, Some(200), None, 1, now);
        }
    }
    assert!(
        seen.contains(&lost[0].target.port),
        "the lost probe's server is probed again: {seen:?}"
    );
}

#[test]
fn a_probe_that_ends_starts_the_next_waiting_one_without_a_tick() {
    let (_dir, store) = live_store();
    let snap = store.read().unwrap();
    let zone = store.zone();
    let mut w = Prober::new(1, 1, 50);
    let first = w.due(&snap.table, snap.seen, zone, 1_000, 7, &[7]);
    assert_eq!(first.len(), 1, "cap of one");
    // Nothing to start while the one probe is in flight.
    assert!(w.next(&snap.table, snap.seen, zone, 1_001, 7).is_none());
    w.record(zone, first[0].token, Some(200), None, 1, 1_010);
    let second = w
        .next(&snap.table, snap.seen, zone, 1_010, 7)
        .expect("the waiting server, at once");
    assert_ne!(second.target.port, first[0].target.port);
    w.record(zone, second.token, Some(200), None, 1, 1_020);
    assert!(w.next(&snap.table, snap.seen, zone, 1_020, 7).is_none());
    // Both probed: the next walk starts neither again before its interval.
    assert!(w
        .due(&snap.table, snap.seen, zone, 1_050, 7, &[7])
        .is_empty());
    // A new table drops what was waiting for the old one.
    let third = w.due(&snap.table, snap.seen, zone, 2_000, 7, &[7]);
    assert_eq!(third.len(), 1);
    w.record(zone, third[0].token, Some(200), None, 1, 2_001);
    assert!(w.next(&snap.table, snap.seen + 1, zone, 2_001, 7).is_none());
}

#[test]
fn every_status_format() {
    let (_dir, store) = live_store();
    let snap = store.read().unwrap();
    let zone = store.zone();
    let (c, r) = cell_of(zone, &snap.table, "a", 1);
    record(c, r.tag, rule(1, 1, 1), Outcome::Passed, 1);
    c.result_word()
        .store(result_word(Outcome::Passed, 200, 3, 0), Ordering::Release);
    let rows = rows(&snap.table, zone);
    let all: Value = serde_json::from_str(&render(&rows, 9, Format::Json, Filter::All)).unwrap();
    let s = &all["servers"];
    assert_eq!(
        (s["total"].as_u64(), s["up"].as_u64(), s["down"].as_u64()),
        (Some(2), Some(1), Some(1))
    );
    assert_eq!(s["generation"], 9);
    assert_eq!(s["server"][0]["name"], "127.0.0.1:81");
    assert_eq!(s["server"][0]["status"], "down");
    assert_eq!(s["server"][0]["checking"], true);
    assert_eq!(s["server"][1]["result"], "200");
    assert_eq!(s["server"][1]["type"], "http");
    let down: Value = serde_json::from_str(&render(&rows, 9, Format::Json, Filter::Down)).unwrap();
    assert_eq!(down["servers"]["server"].as_array().unwrap().len(), 1);
    let csv = render(&rows, 9, Format::Csv, Filter::Up);
    assert!(
        csv.starts_with("1,a,127.0.0.1:82,up,1,0,http,0,false,200,3,"),
        "{csv}"
    );
    assert_eq!(csv.lines().count(), 1);
    let html = render(&rows, 9, Format::Html, Filter::All);
    assert!(html.contains("generation: 9") && html.contains("<td>checking</td>"));
}

use serde_json::Value;

#[test]
fn the_balancer_skips_servers_down_by_checks_only_while_checks_are_on() {
    let (_dir, store) = live_store();
    let snap = store.read().unwrap();
    let u = snap.table.get("a").unwrap().clone();
    let mut b = crate::balance::balancer::Balancer::new(&u.servers);
    b.share(store.clone(), &u.peers);
    b.set_checks(true);
    let tried = crate::balance::balancer::Tried::new();
    // Both still checking (default_down): nothing to pick.
    assert_eq!(b.pick(&u.servers, &tried, 1), None);
    assert!(all_failed(store.zone(), &u));
    let (c, r) = cell_of(store.zone(), &snap.table, "a", 1);
    record(c, r.tag, rule(1, 1, 1), Outcome::Passed, 1);
    assert_eq!(b.pick(&u.servers, &tried, 1), Some(1));
    assert_eq!(b.pick(&u.servers, &tried, 1), Some(1));
    assert!(!all_failed(store.zone(), &u));
    // The check line removed: the verdicts no longer count.
    b.set_checks(false);
    let picks: HashSet<usize> = (0..4)
        .filter_map(|_| b.pick(&u.servers, &tried, 1))
        .collect();
    assert_eq!(picks.len(), 2);
}

#[test]
fn servers_due_together_spread_out_and_then_start_on_time() {
    // 1,000 servers checked every second, all due at once (a fresh start),
    // two workers of 64 probes in flight each, ticking every 50 ms, each
    // probe answered by the next tick: the first round cannot start them
    // all on time; the ones it starts late keep the time they got, so from
    // the second round on every probe starts within a tick of its time.
    let dir = TempDir::new();
    let store = crate::store::StateFile::open(&dir.file(), 1 << 20, || {
        let mut t = Table::default();
        for u in 0..10 {
            let body: String = (0..100)
                .map(|i| format!("server 127.0.0.{}:{};", u + 1, 1000 + i))
                .chain(["check interval=1000 type=http;".to_string()])
                .collect();
            crate::admin::ops::update(&mut t, &format!("u{u}"), &body)?;
        }
        Ok(t)
    })
    .unwrap();
    let snap = store.read().unwrap();
    let zone = store.zone();
    let live = [100, 200];
    let mut workers = [
        (Prober::new(1, MAX_IN_FLIGHT, 50), 100, Vec::new()),
        (Prober::new(2, MAX_IN_FLIGHT, 50), 200, Vec::new()),
    ];
    let t0 = 1_000_000;
    let (mut late_after_first, mut probes) = (0u64, 0usize);
    let mut now = t0;
    while now < t0 + 4_000 {
        for (w, me, pending) in workers.iter_mut() {
            for token in pending.drain(..) {
                w.record(zone, token, Some(200), None, 1, now);
            }
            for j in w.due(&snap.table, snap.seen, zone, now, *me, &live) {
                pending.push(j.token);
                probes += 1;
            }
        }
        if now >= t0 + 2_000 {
            for i in 0..10 {
                for k in 0..100 {
                    let c = cell_of(zone, &snap.table, &format!("u{i}"), k).0;
                    late_after_first = late_after_first.max(last_probe(c).unwrap().late_ms.into());
                }
            }
        }
        now += 50;
    }
    assert!(
        late_after_first <= 50,
        "late by {late_after_first} ms after the first round"
    );
    // One probe a second each (the first round's spreading costs a few).
    assert!((3_900..=4_000).contains(&probes), "{probes} probes in 4 s");
}

#[test]
fn a_servers_target_is_built_once_per_table_generation() {
    let (_dir, store) = live_store();
    let snap = store.read().unwrap();
    let zone = store.zone();
    let mut w = Prober::new(1, MAX_IN_FLIGHT, 50);
    let first = w.due(&snap.table, snap.seen, zone, 1_000, 7, &[7]);
    assert_eq!(first.len(), 2);
    for j in &first {
        w.record(zone, j.token, Some(200), None, 1, 1_001);
    }
    let by_cell = |jobs: &[Job]| -> HashMap<u32, std::sync::Arc<ProbeTarget>> {
        jobs.iter()
            .map(|j| (j.target.cell, std::sync::Arc::clone(&j.target)))
            .collect()
    };
    let before = by_cell(&first);
    // One interval on, the same generation: the same targets, not copies.
    let again = w.due(&snap.table, snap.seen, zone, 2_500, 7, &[7]);
    assert_eq!(again.len(), 2);
    for j in &again {
        assert!(
            std::sync::Arc::ptr_eq(&j.target, &before[&j.target.cell]),
            "built once: {j:?}"
        );
        assert_eq!(j.target.upstream, "a");
        assert_eq!(
            j.target.pool,
            format!("ngx.dyups check 127.0.0.1:{}", j.target.port)
        );
        w.record(zone, j.token, Some(200), None, 1, 2_501);
    }
    // Another generation builds them anew (the table may have changed them).
    let next = w.due(&snap.table, snap.seen + 1, zone, 4_000, 7, &[7]);
    assert_eq!(next.len(), 2);
    for j in &next {
        assert!(!std::sync::Arc::ptr_eq(&j.target, &before[&j.target.cell]));
        assert_eq!(*j.target, *before[&j.target.cell]);
    }
}
