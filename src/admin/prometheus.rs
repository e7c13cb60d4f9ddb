//! `/metrics`: the table, the zone's peer cells and the workers in
//! Prometheus's text exposition format 0.0.4, named after
//! nginx-prometheus-exporter's NGINX Plus families (`nginxplus_upstream_server_*`
//! there, `dyups_upstream_server_*` here, with `_total` on the counters as
//! Prometheus names them) so that dashboards made for it map.
//!
//! A family is one entry of [`SERVER_FAMILIES`] (or of [`HISTOGRAMS`]):
//! its name, type, help and how a [`ServerView`] gives its value. Entries
//! of one name in a row are one family (`responses_total` with a `code`
//! label per entry). Rendered family by family, server by server, into
//! one string: the label set of each server is escaped once into one
//! buffer and copied for each of its samples, so 10,000 servers cost two
//! allocations and no formatting of a label twice.
//!
//! The counters are [`crate::store::stats`]'s, shown for a server with a
//! cell (without one nothing is counted for it, and it has no sample);
//! the health-check counters only for an upstream with a `check` line.
//! The last write-back error is a gauge of its time (0: none since the
//! last write-back that succeeded), not an info family with the message
//! as a label: a message is free text, each new one would be a new series,
//! and `/workers` has it.

use std::fmt::Write;
use std::ops::Range;

pub use self::families::{
    Histogram, HistogramFamily, Kind, ServerFamily, BOUNDS_S, HISTOGRAMS, SERVER_FAMILIES,
};
use super::name_status::NameReport;
use super::server_state::ServerView;
use crate::store::stats::{TableStats, WorkerStats};

mod families;
#[cfg(test)]
mod tests;

/// The `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What one scrape shows, read at one instant.
pub struct Scrape<'a> {
    pub servers: &'a [ServerView<'a>],
    pub upstreams: usize,
    pub workers: &'a [WorkerStats],
    /// The table's statistics; its version is the one the servers were
    /// read from.
    pub table: &'a TableStats,
    /// The `server NAME` lines ([`super::name_status::report`]).
    pub names: &'a [NameReport],
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
    let lines = s.servers.len() * (families.len() + histograms.len() * 14) + 64;
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
    render_names(&mut out, s.names);
    render_table(&mut out, s);
    render_workers(&mut out, s.workers);
    out
}

/// One family of one unlabelled sample.
fn single(out: &mut String, name: &str, kind: Kind, help: &str, x: f64) {
    header(out, name, kind.name(), help);
    sample(out, name, "", "", x);
}

fn render_names(out: &mut String, names: &[NameReport]) {
    if names.is_empty() {
        return;
    }
    let name = "dyups_upstream_resolve_failures_total";
    header(
        out,
        name,
        "counter",
        "Lookups of a server NAME line that gave no address (timeouts, SERVFAIL, NXDOMAIN, ...)",
    );
    let mut labels = String::new();
    for r in names {
        labels.clear();
        labels.push_str("upstream=\"");
        let _ = write!(Escaped(&mut labels), "{}", r.upstream);
        labels.push_str("\",name=\"");
        let _ = write!(Escaped(&mut labels), "{}", r.name);
        labels.push('"');
        sample(out, name, &labels, "", r.failures as f64);
    }
}

fn render_table(out: &mut String, s: &Scrape) {
    use Kind::{Counter, Gauge};
    let t = s.table;
    single(
        out,
        "dyups_table_version",
        Gauge,
        "Version of the upstream table: it moves with every change",
        t.version as f64,
    );
    single(
        out,
        "dyups_table_upstreams",
        Gauge,
        "Upstreams in the table",
        s.upstreams as f64,
    );
    single(
        out,
        "dyups_table_servers",
        Gauge,
        "Servers in the table, over every upstream",
        s.servers.len() as f64,
    );
    single(
        out,
        "dyups_table_used_bytes",
        Gauge,
        "Bytes the table takes in its slot of the state file",
        t.bytes_used as f64,
    );
    single(
        out,
        "dyups_table_capacity_bytes",
        Gauge,
        "Bytes the table may take in the state file (one of its two slots)",
        t.bytes_capacity as f64,
    );
    single(
        out,
        "dyups_zone_cells",
        Gauge,
        "Peer cells in the state file: servers beyond them are counted per worker",
        t.cells_capacity as f64,
    );
    single(
        out,
        "dyups_zone_cells_used",
        Gauge,
        "Peer cells given to servers",
        t.cells_used as f64,
    );
    single(
        out,
        "dyups_table_writes_accepted_total",
        Counter,
        "Writes that published a new table version, from every interface and process",
        t.writes_accepted as f64,
    );
    single(
        out,
        "dyups_table_writes_unchanged_total",
        Counter,
        "Writes that found nothing to change",
        t.writes_unchanged as f64,
    );
    let refused = "dyups_table_writes_refused_total";
    header(
        out,
        refused,
        "counter",
        "Writes refused, by the reason of their answer",
    );
    let mut reason = String::new();
    for (why, n) in &t.writes_refused {
        reason.clear();
        let _ = write!(reason, "reason=\"{why}\"");
        sample(out, refused, &reason, "", *n as f64);
    }
    single(
        out,
        "dyups_table_write_back_failures_total",
        Counter,
        "Times writing the table back to the upstream file failed",
        t.write_back_failures as f64,
    );
    single(
        out,
        "dyups_table_write_back_error_timestamp_seconds",
        Gauge,
        "When the last write-back of the upstream file failed, Unix time; 0 when none failed since one succeeded (GET /workers has the message)",
        t.write_back_error.as_ref().map_or(0.0, |(at, _)| *at as f64 / 1000.0),
    );
}

fn render_workers(out: &mut String, workers: &[WorkerStats]) {
    single(
        out,
        "dyups_workers",
        Kind::Gauge,
        "Live worker processes registered in the state file",
        workers.len() as f64,
    );
    let mut pid = String::new();
    for (name, kind, help) in [
        (
            "dyups_worker_generation",
            "gauge",
            "Table version the worker has applied",
        ),
        (
            "dyups_worker_requests_total",
            "counter",
            "Requests the worker balanced (picks, each retry one more) since it started",
        ),
    ] {
        header(out, name, kind, help);
        for w in workers {
            pid.clear();
            let _ = write!(pid, "pid=\"{}\"", w.pid);
            let x = if kind == "gauge" {
                w.generation
            } else {
                w.requests
            };
            sample(out, name, &pid, "", x as f64);
        }
    }
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
