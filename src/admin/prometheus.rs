//! `/metrics`: the table, the zone's peer cells and the workers in
//! Prometheus's text exposition format 0.0.4, named after
//! nginx-prometheus-exporter's NGINX Plus families (`nginxplus_upstream_server_*`
//! there, `dyups_upstream_server_*` here) so that dashboards made for it map.
//!
//! A family is one entry of [`SERVER_FAMILIES`] (or of [`HISTOGRAMS`]):
//! its name, type, help and how a [`ServerView`] gives its value. Entries
//! of one name in a row are one family (`responses_total` with a `code`
//! label per entry). Rendered family by family, server by server, into
//! one string: the label set of each server is escaped once into one
//! buffer and copied for each of its samples, so 10,000 servers cost two
//! allocations and no formatting of a label twice.

use std::fmt::Write;
use std::ops::Range;

use super::server_state::ServerView;
use crate::health::Outcome;
use crate::store::Worker;

/// The `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        }
    }
}

/// One per-server family, or one labelled part of one (`extra`).
pub struct ServerFamily {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
    /// A label every sample of this entry carries, written as is
    /// (`code="2xx"`); empty for none.
    pub extra: &'static str,
    /// The server's value; `None` leaves the server out of the family
    /// (a check figure of an upstream without checks).
    pub value: fn(&ServerView) -> Option<f64>,
}

/// A histogram's figures: counts per bucket (not cumulative), the last one
/// for values above every bound (`+Inf`), and the sum of what was observed.
pub struct Histogram<'a> {
    pub bounds: &'a [f64],
    pub counts: &'a [u64],
    pub sum: f64,
}

/// One per-server histogram family.
pub struct HistogramFamily {
    pub name: &'static str,
    pub help: &'static str,
    pub value: for<'a> fn(&'a ServerView) -> Option<Histogram<'a>>,
}

fn shared(s: &ServerView, n: u32) -> Option<f64> {
    s.shared.then_some(f64::from(n))
}

/// The per-server families, in the order they are rendered. The help
/// texts of the exporter's families are its own words.
pub const SERVER_FAMILIES: &[ServerFamily] = &[
    ServerFamily {
        name: "dyups_upstream_server_state",
        kind: Kind::Gauge,
        help: "Current state (1 up, 2 draining, 3 down, 4 unavail, 5 checking, 6 unhealthy)",
        extra: "",
        value: |s| Some(f64::from(s.state.code())),
    },
    ServerFamily {
        name: "dyups_upstream_server_active",
        kind: Kind::Gauge,
        help: "Active connections",
        extra: "",
        value: |s| shared(s, s.active),
    },
    ServerFamily {
        name: "dyups_upstream_server_limit",
        kind: Kind::Gauge,
        help: "Limit for connections which corresponds to the max_conns parameter of the upstream server. Zero value means there is no limit",
        extra: "",
        value: |s| Some(f64::from(s.spec.max_conns)),
    },
    ServerFamily {
        name: "dyups_upstream_server_weight",
        kind: Kind::Gauge,
        help: "Weight of the server, as its server line sets it",
        extra: "",
        value: |s| Some(f64::from(s.spec.weight)),
    },
    ServerFamily {
        name: "dyups_upstream_server_backup",
        kind: Kind::Gauge,
        help: "1 for a backup server, 0 for a primary",
        extra: "",
        value: |s| Some(f64::from(u8::from(s.spec.backup))),
    },
    ServerFamily {
        name: "dyups_upstream_server_window_fails",
        kind: Kind::Gauge,
        help: "Unsuccessful attempts counted in the current fail_timeout window, which max_fails is compared with",
        extra: "",
        value: |s| shared(s, s.fails),
    },
    ServerFamily {
        name: "dyups_upstream_server_health_checks_last_passed",
        kind: Kind::Gauge,
        help: "1 when the last health check passed, 0 when it failed",
        extra: "",
        value: |s| {
            s.last_probe
                .map(|p| f64::from(u8::from(p.outcome == Outcome::Passed)))
        },
    },
    ServerFamily {
        name: "dyups_upstream_server_health_checks_last_check_timestamp_seconds",
        kind: Kind::Gauge,
        help: "When the last health check ended, Unix time",
        extra: "",
        value: |s| s.last_probe.map(|p| p.at_ms as f64 / 1000.0),
    },
    ServerFamily {
        name: "dyups_upstream_server_health_checks_last_latency_seconds",
        kind: Kind::Gauge,
        help: "How long the last health check took",
        extra: "",
        value: |s| s.last_probe.map(|p| f64::from(p.latency_ms) / 1000.0),
    },
    ServerFamily {
        name: "dyups_upstream_server_health_checks_consecutive_passes",
        kind: Kind::Gauge,
        help: "Health checks passed in a row (rise counts them)",
        extra: "",
        value: |s| s.verdict.map(|v| f64::from(v.passes)),
    },
    ServerFamily {
        name: "dyups_upstream_server_health_checks_consecutive_fails",
        kind: Kind::Gauge,
        help: "Health checks failed in a row (fall counts them)",
        extra: "",
        value: |s| s.verdict.map(|v| f64::from(v.failures)),
    },
];

/// The per-server histograms (the response time, once it is counted).
pub const HISTOGRAMS: &[HistogramFamily] = &[];

/// What one scrape shows, read at one instant.
pub struct Scrape<'a> {
    /// The table version the servers were read from.
    pub version: u64,
    pub servers: &'a [ServerView<'a>],
    pub upstreams: usize,
    pub workers: &'a [Worker],
    /// Bytes a table may take (one slot of the state file).
    pub table_capacity: u64,
    /// Peer cells in the state file.
    pub zone_cells: usize,
}

/// The exposition of `s`.
pub fn render(s: &Scrape) -> String {
    render_with(s, SERVER_FAMILIES, HISTOGRAMS)
}

/// [`render`] with the families given: for tests of families not yet fed.
pub fn render_with(
    s: &Scrape,
    families: &[ServerFamily],
    histograms: &[HistogramFamily],
) -> String {
    let (labels, ranges) = label_sets(s.servers);
    // About 90 bytes a sample line; a few more lines for the rest.
    let lines = s.servers.len() * (families.len() + histograms.len() * 14) + 16;
    let mut out = String::with_capacity(lines * 90);
    let mut previous = "";
    for f in families {
        if f.name != previous {
            header(&mut out, f.name, f.kind.name(), f.help);
            previous = f.name;
        }
        for (v, r) in s.servers.iter().zip(&ranges) {
            if let Some(x) = (f.value)(v) {
                sample(&mut out, f.name, &labels[r.clone()], f.extra, x);
            }
        }
    }
    for h in histograms {
        header(&mut out, h.name, "histogram", h.help);
        let names = ["_bucket", "_sum", "_count"].map(|end| format!("{}{end}", h.name));
        for (v, r) in s.servers.iter().zip(&ranges) {
            if let Some(x) = (h.value)(v) {
                histogram(&mut out, &names, &labels[r.clone()], &x);
            }
        }
    }
    let gauge = |out: &mut String, name: &str, help: &str, x: f64| {
        header(out, name, "gauge", help);
        sample(out, name, "", "", x);
    };
    gauge(
        &mut out,
        "dyups_table_version",
        "Version of the upstream table: it moves with every change",
        s.version as f64,
    );
    gauge(
        &mut out,
        "dyups_table_upstreams",
        "Upstreams in the table",
        s.upstreams as f64,
    );
    gauge(
        &mut out,
        "dyups_table_servers",
        "Servers in the table, over every upstream",
        s.servers.len() as f64,
    );
    gauge(
        &mut out,
        "dyups_table_capacity_bytes",
        "Bytes the table may take in the state file (one of its two slots)",
        s.table_capacity as f64,
    );
    gauge(
        &mut out,
        "dyups_zone_cells",
        "Peer cells in the state file: servers beyond them are counted per worker",
        s.zone_cells as f64,
    );
    gauge(
        &mut out,
        "dyups_zone_cells_used",
        "Servers that have a peer cell",
        s.servers.iter().filter(|v| v.shared).count() as f64,
    );
    gauge(
        &mut out,
        "dyups_workers",
        "Live worker processes registered in the state file",
        s.workers.len() as f64,
    );
    header(
        &mut out,
        "dyups_worker_generation",
        "gauge",
        "Table version the worker has applied",
    );
    for w in s.workers {
        let mut pid = String::new();
        let _ = write!(pid, "pid=\"{}\"", w.pid);
        sample(
            &mut out,
            "dyups_worker_generation",
            &pid,
            "",
            w.applied as f64,
        );
    }
    out
}

/// Every server's `upstream="...",server="..."`, escaped, in one buffer,
/// and where each is in it.
fn label_sets(servers: &[ServerView]) -> (String, Vec<Range<usize>>) {
    let mut labels = String::with_capacity(servers.len() * 48);
    let mut ranges = Vec::with_capacity(servers.len());
    for v in servers {
        let start = labels.len();
        labels.push_str("upstream=\"");
        let _ = write!(Escaped(&mut labels), "{}", v.upstream.name);
        labels.push_str("\",server=\"");
        let _ = write!(Escaped(&mut labels), "{}", v.spec.addr);
        labels.push('"');
        ranges.push(start..labels.len());
    }
    (labels, ranges)
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    out.push_str("# HELP ");
    out.push_str(name);
    out.push(' ');
    // HELP escapes backslash and newline (not the quote).
    for c in help.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push_str("\n# TYPE ");
    out.push_str(name);
    out.push(' ');
    out.push_str(kind);
    out.push('\n');
}

/// `name{labels,extra} value`: `labels` and `extra` already escaped.
fn sample(out: &mut String, name: &str, labels: &str, extra: &str, x: f64) {
    out.push_str(name);
    if !labels.is_empty() || !extra.is_empty() {
        out.push('{');
        out.push_str(labels);
        if !labels.is_empty() && !extra.is_empty() {
            out.push(',');
        }
        out.push_str(extra);
        out.push('}');
    }
    // f64's Display writes integers without a fraction, and no exponent.
    let _ = writeln!(out, " {x}");
}

/// A histogram's `_bucket` lines (cumulative, `+Inf` last, which equals
/// `_count`), `_sum` and `_count`; `names` are those three names.
fn histogram(out: &mut String, names: &[String; 3], labels: &str, h: &Histogram) {
    let [bucket, sum, count] = names;
    let mut le = String::with_capacity(24);
    let mut total = 0u64;
    for (i, n) in h.counts.iter().enumerate() {
        total += n;
        le.clear();
        match h.bounds.get(i) {
            Some(b) => {
                let _ = write!(le, "le=\"{b}\"");
            }
            None => le.push_str("le=\"+Inf\""),
        }
        sample(out, bucket, labels, &le, total as f64);
    }
    sample(out, sum, labels, "", h.sum);
    sample(out, count, labels, "", total as f64);
}

/// Writes through to a string, escaping a label value: backslash, double
/// quote and line feed.
struct Escaped<'a>(&'a mut String);

impl Write for Escaped<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        for c in s.chars() {
            match c {
                '\\' => self.0.push_str("\\\\"),
                '"' => self.0.push_str("\\\""),
                '\n' => self.0.push_str("\\n"),
                c => self.0.push(c),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;
    use std::process::{Command, Stdio};

    use super::*;
    use crate::admin::server_state::servers;
    use crate::testing::TempDir;

    const NOW: u64 = 1_800_000_000_000;

    fn scrape_text(
        upstreams: &[(&str, &str)],
        families: &[ServerFamily],
        histograms: &[HistogramFamily],
    ) -> String {
        let dir = TempDir::new();
        let store = dir.store(upstreams);
        let snap = store.read().unwrap();
        let views = servers(&snap.table, store.zone(), NOW);
        let workers = [
            Worker {
                pid: 4242,
                applied: snap.version,
            },
            Worker {
                pid: 4243,
                applied: snap.version - 1,
            },
        ];
        render_with(
            &Scrape {
                version: snap.version,
                servers: &views,
                upstreams: snap.table.upstreams.len(),
                workers: &workers,
                table_capacity: store.geometry().payload_capacity(),
                zone_cells: store.zone().len(),
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
        let said = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
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
        assert!(text.contains(
            "dyups_upstream_server_weight{upstream=\"web\",server=\"127.0.0.1:8081\"} 3\n"
        ));
        assert!(text.contains(
            "dyups_upstream_server_state{upstream=\"web\",server=\"127.0.0.1:8082\"} 3\n"
        ));
        // The socket path's quote is escaped; the checked server is still
        // `checking` (default_down), code 5.
        assert!(text.contains(
            "dyups_upstream_server_state{upstream=\"sock\",server=\"unix:/run/a\\\"b.sock\"} 5\n"
        ), "{text}");
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
}
