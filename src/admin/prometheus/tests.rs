//! The renderer's tests: expositions of real state files, checked line by
//! line and by promtool.

use std::io::Write as _;
use std::process::{Command, Stdio};

use super::*;
use crate::admin::server_state::servers;
use crate::store::stats::BUCKETS_MS;
use crate::testing::TempDir;

const NOW: u64 = 1_800_000_000_000;

fn scrape_text(
    upstreams: &[(&str, &str)],
    families: &[ServerFamily],
    histograms: &[HistogramFamily],
) -> String {
    let dir = TempDir::new();
    let store = dir.store(upstreams);
    scrape_of(&store, families, histograms)
}

fn scrape_of(
    store: &crate::store::StateFile,
    families: &[ServerFamily],
    histograms: &[HistogramFamily],
) -> String {
    let snap = store.read().unwrap();
    let views = servers(&snap.table, store.zone(), NOW);
    let workers = [
        WorkerStats {
            pid: 4242,
            generation: snap.version,
            requests: 12,
        },
        WorkerStats {
            pid: 4243,
            generation: snap.version - 1,
            requests: 30,
        },
    ];
    let names = [NameReport {
        upstream: "web".into(),
        name: "db\"1.example".into(),
        service: None,
        resolve: true,
        addresses: Vec::new(),
        resolved_ms: 0,
        error: Some("timed out".into()),
        failures: 3,
    }];
    render_with(
        &Scrape {
            servers: &views,
            upstreams: snap.table.upstreams.len(),
            workers: &workers,
            table: &store.table_stats(&snap),
            names: &names,
        },
        families,
        histograms,
    )
}

/// `promtool check metrics` on `text`: its verdict and what it said.
fn promtool(text: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; make deps installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), said)
}

const TWO: &[(&str, &str)] = &[
    (
        "web",
        "server 127.0.0.1:8081 weight=3; server 127.0.0.1:8082 down;",
    ),
    (
        "sock",
        "check interval=1000 type=tcp; server unix:/run/a\"b.sock max_conns=7;",
    ),
];

#[test]
fn families_have_help_type_and_one_block_each() {
    let text = scrape_text(TWO, SERVER_FAMILIES, HISTOGRAMS);
    let mut seen: Vec<&str> = Vec::new();
    let mut current = "";
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap();
            assert!(!seen.contains(&name), "{name} has two blocks:\n{text}");
            seen.push(name);
            current = name;
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            assert_eq!(rest.split(' ').next().unwrap(), current, "{text}");
        } else {
            let name = line.split(['{', ' ']).next().unwrap();
            assert!(name.starts_with(current), "{line} outside its family");
        }
    }
    for f in SERVER_FAMILIES {
        assert!(seen.contains(&f.name), "{} missing:\n{text}", f.name);
    }
    assert!(text
        .contains("dyups_upstream_server_weight{upstream=\"web\",server=\"127.0.0.1:8081\"} 3\n"));
    assert!(text
        .contains("dyups_upstream_server_state{upstream=\"web\",server=\"127.0.0.1:8082\"} 3\n"));
    // The socket path's quote is escaped; the checked server is still
    // `checking` (default_down), code 5.
    assert!(
        text.contains(
            "dyups_upstream_server_state{upstream=\"sock\",server=\"unix:/run/a\\\"b.sock\"} 5\n"
        ),
        "{text}"
    );
    assert!(text.contains(
        "dyups_upstream_server_limit{upstream=\"sock\",server=\"unix:/run/a\\\"b.sock\"} 7\n"
    ));
    // Check figures only for the checked upstream.
    assert!(
        !text.contains("consecutive_fails{upstream=\"web\""),
        "{text}"
    );
    assert!(
        text.contains("consecutive_fails{upstream=\"sock\""),
        "{text}"
    );
    assert!(
        text.contains("dyups_worker_generation{pid=\"4243\"} "),
        "{text}"
    );
    assert!(text.contains("\ndyups_table_servers 3\n"), "{text}");
}

#[test]
fn label_values_escape_backslash_quote_and_newline() {
    let mut s = String::new();
    write!(Escaped(&mut s), "a\\b\"c\nd").unwrap();
    assert_eq!(s, "a\\\\b\\\"c\\nd");
}

fn latency(_: &ServerView) -> Option<Histogram<'static>> {
    Some(Histogram {
        bounds: &[0.005, 0.1, 1.0],
        counts: &[2, 0, 3, 1],
        sum: 4.25,
    })
}

#[test]
fn histograms_are_cumulative_with_sum_and_count() {
    let hist = [HistogramFamily {
        name: "dyups_upstream_server_response_time_seconds",
        help: "Response time",
        value: latency,
    }];
    let text = scrape_text(TWO, SERVER_FAMILIES, &hist);
    let l = "upstream=\"web\",server=\"127.0.0.1:8081\"";
    let n = "dyups_upstream_server_response_time_seconds";
    for want in [
        format!("{n}_bucket{{{l},le=\"0.005\"}} 2\n"),
        format!("{n}_bucket{{{l},le=\"0.1\"}} 2\n"),
        format!("{n}_bucket{{{l},le=\"1\"}} 5\n"),
        format!("{n}_bucket{{{l},le=\"+Inf\"}} 6\n"),
        format!("{n}_sum{{{l}}} 4.25\n"),
        format!("{n}_count{{{l}}} 6\n"),
        format!("# TYPE {n} histogram\n"),
    ] {
        assert!(text.contains(&want), "{want} missing:\n{text}");
    }
    let (ok, said) = promtool(&text);
    assert!(ok, "promtool refused it: {said}\n{text}");
}

#[test]
fn promtool_takes_the_exposition_and_refuses_a_broken_one() {
    let text = scrape_text(TWO, SERVER_FAMILIES, HISTOGRAMS);
    let (ok, said) = promtool(&text);
    assert!(ok, "promtool refused it: {said}\n{text}");
    // The check can fail: an unescaped quote in a label value.
    let broken = text.replace("a\\\"b.sock", "a\"b.sock");
    assert!(!promtool(&broken).0, "promtool took {broken}");
}

/// The sample of `name{labels}` in `text`, if there is one.
fn value_of(text: &str, name: &str, labels: &str) -> Option<f64> {
    let head = format!("{name}{{{labels}}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&head))
        .map(|v| v.parse().unwrap())
}

#[test]
fn the_counters_of_the_store_are_families_with_real_data() {
    let dir = TempDir::new();
    let store = dir.store(TWO);
    let snap = store.read().unwrap();
    let web = &snap.table.upstreams[0];
    let sock = &snap.table.upstreams[1];
    let zone = store.zone();
    let c = zone.cell(web.peer(0)).unwrap().counters();
    for _ in 0..5 {
        c.count_request();
    }
    // 2 ms, 7 ms, 40 ms, 3 s, 20 s; one 502 without a time.
    for (status, us) in [
        (200, Some(2_000)),
        (200, Some(7_000)),
        (404, Some(40_000)),
        (500, Some(3_000_000)),
        (200, Some(20_000_000)),
        (502, None),
    ] {
        c.count_response(status, us);
    }
    c.count_failure(None, NOW - 1_000);
    c.count_failure(Some((NOW + 9_000, false)), NOW - 1_000);
    let k = zone.cell(sock.peer(0)).unwrap().counters();
    k.count_check(false, false);
    k.count_check(true, true);
    store
        .table_counters()
        .record_write_back(Some("disk full"), 1_700_000_000_500);
    let text = scrape_of(&store, SERVER_FAMILIES, HISTOGRAMS);
    let l = "upstream=\"web\",server=\"127.0.0.1:8081\"";
    let sl = "upstream=\"sock\",server=\"unix:/run/a\\\"b.sock\"";
    let at = |name: &str, labels: &str| value_of(&text, name, labels);
    let n = "dyups_upstream_server_";
    assert_eq!(at(&format!("{n}requests_total"), l), Some(5.0), "{text}");
    for (code, want) in [("1xx", 0.0), ("2xx", 3.0), ("4xx", 1.0), ("5xx", 2.0)] {
        let labels = format!("{l},code=\"{code}\"");
        assert_eq!(
            at(&format!("{n}responses_total"), &labels),
            Some(want),
            "{code}"
        );
    }
    assert_eq!(at(&format!("{n}fails_total"), l), Some(2.0));
    assert_eq!(at(&format!("{n}unavail_total"), l), Some(1.0));
    // The window opened at NOW - 1 s for 10 s: 1 s of it has passed.
    assert_eq!(at(&format!("{n}downtime_seconds_total"), l), Some(1.0));
    // Check counters for the checked upstream only.
    assert_eq!(
        at(&format!("{n}health_checks_checks_total"), sl),
        Some(2.0),
        "{text}"
    );
    assert_eq!(at(&format!("{n}health_checks_fails_total"), sl), Some(1.0));
    assert_eq!(
        at(&format!("{n}health_checks_unhealthy_total"), sl),
        Some(1.0)
    );
    assert_eq!(at(&format!("{n}health_checks_checks_total"), l), None);
    // The histogram: cumulative over the store's bucket set, in seconds.
    let h = format!("{n}response_time_seconds");
    for (le, want) in [
        ("0.005", 1.0),
        ("0.01", 2.0),
        ("0.025", 2.0),
        ("0.05", 3.0),
        ("2.5", 3.0),
        ("5", 4.0),
        ("10", 4.0),
        ("+Inf", 5.0),
    ] {
        let labels = format!("{l},le=\"{le}\"");
        assert_eq!(
            at(&format!("{h}_bucket"), &labels),
            Some(want),
            "le {le}:\n{text}"
        );
    }
    assert_eq!(at(&format!("{h}_count"), l), Some(5.0));
    assert_eq!(at(&format!("{h}_sum"), l), Some(23.049));
    // A server with no timed response yet has no histogram lines at all
    // (its other families are there).
    assert_eq!(at(&format!("{h}_count"), sl), None, "{text}");
    assert!(!text.contains(&format!("{h}_bucket{{{sl}")), "{text}");
    assert_eq!(at(&format!("{n}requests_total"), sl), Some(0.0));
    // The table, the workers and the resolver.
    let t = store.table_stats(&snap);
    assert!(text.contains(&format!("\ndyups_table_used_bytes {}\n", t.bytes_used)));
    assert!(t.bytes_used > 0);
    assert!(
        text.contains("\ndyups_table_write_back_failures_total 1\n"),
        "{text}"
    );
    assert!(text.contains("\ndyups_table_write_back_error_timestamp_seconds 1700000000.5\n"));
    assert!(text.contains("\ndyups_table_writes_refused_total{reason=\"version_mismatch\"} 0\n"));
    assert_eq!(
        at("dyups_worker_requests_total", "pid=\"4243\""),
        Some(30.0)
    );
    assert_eq!(
        at(
            "dyups_upstream_resolve_failures_total",
            "upstream=\"web\",name=\"db\\\"1.example\""
        ),
        Some(3.0),
        "{text}"
    );
    let (ok, said) = promtool(&text);
    assert!(ok, "promtool refused it: {said}\n{text}");
}

#[test]
fn bounds_are_the_stores_buckets_in_seconds() {
    let ms: Vec<u64> = BOUNDS_S
        .iter()
        .map(|s| (s * 1000.0).round() as u64)
        .collect();
    assert_eq!(ms, BUCKETS_MS);
}
