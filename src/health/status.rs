//! The `check_status` page in nginx_upstream_check_module's formats
//! (Tengine's superset: `up`/`down` counts), with ngx.dyups's extras under
//! the same objects: `checking`, the last probe's result, latency, time and
//! lateness. Lists the servers of upstreams with a `check` line.

use std::fmt::Write;

use serde_json::{json, Value};

use super::prober::lease_owner;
use super::{last_probe, verdict, Verdict};
use crate::store::zone::Zone;
use crate::table::model::Table;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Html,
    Csv,
    Json,
}

impl Format {
    /// `?format=`: html (the default), csv, json.
    pub fn from_arg(arg: Option<&str>) -> Result<Format, String> {
        match arg {
            None | Some("" | "html") => Ok(Format::Html),
            Some("csv") => Ok(Format::Csv),
            Some("json") => Ok(Format::Json),
            Some(other) => Err(format!("format {other:?} is not one of html, csv, json")),
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Html => "text/html",
            Format::Csv => "text/plain",
            Format::Json => "application/json",
        }
    }
}

/// `?status=`: which servers to list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    All,
    Up,
    /// Down, `checking` included (neither takes traffic).
    Down,
    Checking,
}

impl Filter {
    pub fn from_arg(arg: Option<&str>) -> Result<Filter, String> {
        match arg {
            None | Some("") => Ok(Filter::All),
            Some("up") => Ok(Filter::Up),
            Some("down") => Ok(Filter::Down),
            Some("checking") => Ok(Filter::Checking),
            Some(other) => Err(format!("status {other:?} is not one of up, down, checking")),
        }
    }

    fn wants(self, v: Verdict) -> bool {
        match self {
            Filter::All => true,
            Filter::Up => v.status() == "up",
            Filter::Down => v.status() == "down",
            Filter::Checking => v.checking,
        }
    }
}

/// One listed server.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub index: usize,
    pub upstream: String,
    pub name: String,
    pub verdict: Verdict,
    pub kind: &'static str,
    pub port: u16,
    pub last: Option<super::LastProbe>,
    /// The pid of the worker that holds the server's probe lease (0: none).
    pub prober: u32,
}

/// Every server with active checks, in table order, numbered from 0.
pub fn rows(table: &Table, zone: Zone<'_>) -> Vec<Row> {
    let mut rows = Vec::new();
    for u in &table.upstreams {
        let Some(line) = &u.check.line else { continue };
        for (i, s) in u.servers.iter().enumerate() {
            let r = u.peer(i);
            let cell = zone.cell(r);
            rows.push(Row {
                index: rows.len(),
                upstream: u.name.clone(),
                name: s.addr.to_string(),
                verdict: cell.and_then(|c| verdict(c, r.tag)).unwrap_or_default(),
                kind: line.kind.name(),
                port: line.port,
                last: cell.and_then(last_probe),
                prober: cell.map_or(0, lease_owner),
            });
        }
    }
    rows
}

fn result_text(row: &Row) -> String {
    match row.last {
        Some(l) if l.status != 0 => l.status.to_string(),
        Some(l) => l.outcome.name().to_owned(),
        None => String::new(),
    }
}

/// The page: its body for `format`, listing the servers `filter` wants;
/// `generation` is the table version it was rendered from.
pub fn render(rows: &[Row], generation: u64, format: Format, filter: Filter) -> String {
    let up = rows.iter().filter(|r| r.verdict.status() == "up").count();
    let checking = rows.iter().filter(|r| r.verdict.checking).count();
    let listed = rows.iter().filter(|r| filter.wants(r.verdict));
    match format {
        Format::Json => {
            let servers: Vec<Value> = listed
                .map(|r| {
                    let mut o = json!({
                        "index": r.index,
                        "upstream": r.upstream,
                        "name": r.name,
                        "status": r.verdict.status(),
                        "rise": r.verdict.passes,
                        "fall": r.verdict.failures,
                        "type": r.kind,
                        "port": r.port,
                        "checking": r.verdict.checking,
                        "prober": r.prober,
                    });
                    if let Some(l) = r.last {
                        o["result"] = json!(result_text(r));
                        o["latency_ms"] = json!(l.latency_ms);
                        o["checked_at_ms"] = json!(l.at_ms);
                        o["late_ms"] = json!(l.late_ms);
                    }
                    o
                })
                .collect();
            json!({"servers": {
                "total": rows.len(),
                "up": up,
                "down": rows.len() - up,
                "checking": checking,
                "generation": generation,
                "server": servers,
            }})
            .to_string()
        }
        Format::Csv => {
            let mut out = String::new();
            for r in listed {
                let (latency, at, late) =
                    r.last
                        .map_or((String::new(), String::new(), String::new()), |l| {
                            (
                                l.latency_ms.to_string(),
                                l.at_ms.to_string(),
                                l.late_ms.to_string(),
                            )
                        });
                let _ = writeln!(
                    out,
                    "{},{},{},{},{},{},{},{},{},{},{},{},{}",
                    r.index,
                    r.upstream,
                    r.name,
                    r.verdict.status(),
                    r.verdict.passes,
                    r.verdict.failures,
                    r.kind,
                    r.port,
                    r.verdict.checking,
                    result_text(r),
                    latency,
                    at,
                    late
                );
            }
            out
        }
        Format::Html => {
            let mut out = String::from(
                "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">\
                 <title>Nginx http upstream check status</title></head><body>\n\
                 <h1>Nginx http upstream check status</h1>\n",
            );
            let _ = writeln!(
                out,
                "<h2>Check upstream server number: {}, generation: {generation}</h2>",
                rows.len()
            );
            out.push_str(
                "<table style=\"background-color:white\" cellspacing=\"0\" cellpadding=\"3\" border=\"1\">\n\
                 <tr bgcolor=\"#C0C0C0\"><th>Index</th><th>Upstream</th><th>Name</th><th>Status</th>\
                 <th>Rise counts</th><th>Fall counts</th><th>Check type</th><th>Check port</th>\
                 <th>Last result</th><th>Latency ms</th><th>Late ms</th></tr>\n",
            );
            for r in listed {
                let status = if r.verdict.checking {
                    "checking"
                } else {
                    r.verdict.status()
                };
                let bg = if status == "up" {
                    ""
                } else {
                    " bgcolor=\"#FF0000\""
                };
                let _ = writeln!(
                    out,
                    "<tr{bg}><td>{}</td><td>{}</td><td>{}</td><td>{status}</td><td>{}</td><td>{}</td>\
                     <td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    r.index,
                    escape(&r.upstream),
                    escape(&r.name),
                    r.verdict.passes,
                    r.verdict.failures,
                    r.kind,
                    r.port,
                    escape(&result_text(r)),
                    r.last.map_or(String::new(), |l| l.latency_ms.to_string()),
                    r.last.map_or(String::new(), |l| l.late_ms.to_string()),
                );
            }
            out.push_str("</table>\n</body></html>\n");
            out
        }
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
