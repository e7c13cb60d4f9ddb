//! What the REST interface's reads answer: `/list`, `/detail` (byte for
//! byte as ngx_http_dyups_module gives it), `/upstream/NAME` as nginx
//! lines or JSON (with what the resolver found for its host names, and each
//! server's state and statistics), one server, and `/workers`.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::{json, Value};

use super::{Endpoint, Response};
use crate::store::stats::{self, Counters, BUCKETS_MS};
use crate::store::zone::{PeerCell, Zone};
use crate::store::{Snapshot, StateFile};
use crate::table::model::{ServerSpec, Table, Upstream};
use crate::table::syntax::{render_server, server_lines, setting_lines};
use crate::Error;

/// The answer of a read of `endpoint` in `snap`; `status`: what the
/// resolver last found for each `resolve` line.
pub(super) fn read(
    endpoint: &Endpoint,
    json: bool,
    store: &StateFile,
    snap: &Snapshot,
    status: &[crate::admin::name_status::Status],
) -> Response {
    let t = &snap.table;
    let zone = store.zone();
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let found = |name: &str| {
        t.get(name)
            .ok_or_else(|| Error::NotFound(format!("upstream {name} not found")))
    };
    let out = match endpoint {
        Endpoint::List if json => Ok(to_json(&Listing {
            version: snap.version,
            upstreams: t.names().collect(),
        })),
        Endpoint::Detail if json => {
            let upstreams: Vec<String> = t
                .upstreams
                .iter()
                .map(|u| with_stats(to_json(&**u), zone, u, now_ms))
                .collect();
            Ok(format!(
                r#"{{"version":{},"upstreams":[{}]}}"#,
                snap.version,
                upstreams.join(",")
            ))
        }
        Endpoint::Workers => {
            return Response {
                json: true,
                ..Response::text(200, workers(store, snap).to_string())
            }
        }
        Endpoint::List | Endpoint::Detail if t.upstreams.is_empty() => {
            return Response::text(204, "")
        }
        Endpoint::List => Ok(t.names().flat_map(|n| [n, "\n"]).collect()),
        Endpoint::Detail => Ok(detail(t)),
        Endpoint::Upstream(name) | Endpoint::Servers(name) => found(name).map(|u| {
            if json && u.names.is_empty() {
                let one = to_json(&One {
                    version: snap.version,
                    upstream: u,
                });
                with_stats(one, zone, u, now_ms)
            } else if json {
                // Through a JSON value, whose keys come out sorted: only
                // for an upstream with `server NAME` lines to add.
                let mut v = serde_json::to_value(One {
                    version: snap.version,
                    upstream: u,
                })
                .expect("plain data serialises");
                crate::admin::name_status::add_to_json(&mut v, u, status);
                if let Some(servers) = v.get_mut("servers").and_then(Value::as_array_mut) {
                    for (i, s) in servers.iter_mut().enumerate().take(u.servers.len()) {
                        if let (Some(s), Value::Object(more)) =
                            (s.as_object_mut(), server_stats(zone, u, i, now_ms))
                        {
                            s.extend(more);
                        }
                    }
                }
                v.to_string()
            } else {
                written_lines(u)
            }
        }),
        Endpoint::Server(name, addr) => found(name).and_then(|u| {
            let a = crate::table::syntax::parse_address(addr)
                .map_err(|e| Error::BadRequest(format!("bad server: {e}")))?;
            let s = u
                .server(&a)
                .ok_or_else(|| Error::NotFound(format!("upstream {name} has no server {a}")))?;
            Ok(if json {
                to_json(s)
            } else {
                format!("{}\n", server_line(s))
            })
        }),
    };
    match out {
        Ok(body) => Response {
            json,
            ..Response::text(200, body)
        },
        Err(e) => Response::error(&e),
    }
}

#[derive(Serialize)]
struct Listing<'a> {
    version: u64,
    upstreams: Vec<&'a str>,
}

#[derive(Serialize)]
struct One<'a> {
    version: u64,
    #[serde(flatten)]
    upstream: &'a Upstream,
}

/// `json`, the JSON of upstream `u` (in the order its fields are
/// declared), with each server's state, connections in flight and
/// statistics after its parameters. Spliced into the text rather than
/// built through a `serde_json::Value`, which would sort every key.
fn with_stats(json: String, zone: Zone<'_>, u: &Upstream, now_ms: u64) -> String {
    let plain: Vec<String> = u.servers.iter().map(to_json).collect();
    let list = format!(r#""servers":[{}]"#, plain.join(","));
    // A string value holding these characters would have its quotes
    // escaped: the list appears once, as the servers themselves.
    let Some(at) = json.find(&list) else {
        return json;
    };
    let servers: Vec<String> = plain
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let more = server_stats(zone, u, i, now_ms).to_string();
            // `{...}` + `{...}` → `{...,...}`.
            format!("{},{}", &s[..s.len() - 1], &more[1..])
        })
        .collect();
    format!(
        r#"{}"servers":[{}]{}"#,
        &json[..at],
        servers.join(","),
        &json[at + list.len()..]
    )
}

/// Server `i` of `u`: its state, connections in flight, whether it has a
/// cell, and its statistics.
fn server_stats(zone: Zone<'_>, u: &Upstream, i: usize, now_ms: u64) -> Value {
    let cell = zone.cell(u.peer(i));
    json!({
        "state": stats::state_of(zone, u, i, now_ms).word(),
        "active": cell.map_or(0, PeerCell::conns),
        "shared": cell.is_some(),
        "stats": counters_json(&stats::counters_of(zone, u, i, now_ms)),
    })
}

/// A server's counters as the JSON documents them (README, REST
/// interface).
fn counters_json(c: &Counters) -> Value {
    let r = &c.responses;
    let h = &c.response_time;
    json!({
        "requests": c.requests,
        "responses": {"1xx": r[0], "2xx": r[1], "3xx": r[2], "4xx": r[3], "5xx": r[4]},
        "fails": c.fails,
        "unavail": c.unavail,
        "downtime": c.downtime_ms,
        "health_checks": {"checks": c.checks, "fails": c.check_fails, "unhealthy": c.check_unhealthy},
        "response_time": {
            "buckets_ms": BUCKETS_MS,
            "counts": h.buckets,
            "sum_us": h.sum_us,
            "count": h.count,
        },
    })
}

/// `GET /workers`: every live worker, and the table's statistics.
fn workers(store: &StateFile, snap: &Snapshot) -> Value {
    let t = store.table_stats(snap);
    let refused: serde_json::Map<String, Value> = t
        .writes_refused
        .iter()
        .map(|&(why, n)| (why.to_owned(), n.into()))
        .collect();
    json!({
        "version": snap.version,
        "workers": store.worker_stats(),
        "table": {
            "version": t.version,
            "bytes_used": t.bytes_used,
            "bytes_capacity": t.bytes_capacity,
            "cells_used": t.cells_used,
            "cells_capacity": t.cells_capacity,
            "writes_accepted": t.writes_accepted,
            "writes_unchanged": t.writes_unchanged,
            "writes_refused": refused,
            "write_back_failures": t.write_back_failures,
            "write_back_error": t.write_back_error.map(|(at, why)| json!({"at": at, "error": why})),
        },
    })
}

fn to_json<T: Serialize + ?Sized>(v: &T) -> String {
    serde_json::to_string(v).expect("plain data serialises")
}

/// `server ADDR [PARAMS]` as ngx_http_dyups_module lists it: nginx syntax
/// without the semicolon.
fn server_line(s: &ServerSpec) -> String {
    let mut line = render_server(s);
    line.pop();
    line
}

/// Its setting lines (balancing, keepalive, checks, resolver), if any,
/// then its `server` lines as written (a `server NAME` line once, not the
/// addresses it resolved to), without their `;`.
fn written_lines(u: &Upstream) -> String {
    let servers = server_lines(u).into_iter().map(|mut l| {
        l.pop();
        l
    });
    setting_lines(u)
        .into_iter()
        .chain(servers)
        .map(|line| line + "\n")
        .collect()
}

/// Each upstream's name, then one line per server with every parameter,
/// then a blank line: ngx_http_dyups_module's `/detail`, byte for byte, so
/// the scripts that parse it keep working. The settings besides the servers
/// are in the JSON form and in `/upstream/NAME`.
fn detail(t: &Table) -> String {
    let mut out = String::new();
    for u in &t.upstreams {
        out.push_str(&u.name);
        out.push('\n');
        for s in &u.servers {
            out.push_str(&detail_line(s));
            out.push('\n');
        }
        out.push('\n');
    }
    out
}

/// `server ADDR weight=1 max_conns=0 max_fails=1 fail_timeout=10 backup=0
/// down=0`: the module's `/detail` line, `fail_timeout` in seconds without
/// a unit and the flags as 0 or 1; ` slow_start=N` (seconds) after it only
/// when set, since the module has none and its readers expect its words.
fn detail_line(s: &ServerSpec) -> String {
    let slow_start = if s.slow_start == 0 {
        String::new()
    } else {
        format!(" slow_start={}", s.slow_start)
    };
    format!(
        "server {} weight={} max_conns={} max_fails={} fail_timeout={} backup={} down={}{slow_start}",
        s.addr,
        s.weight,
        s.max_conns,
        s.max_fails,
        s.fail_timeout,
        u8::from(s.backup),
        u8::from(s.down)
    )
}
