//! What the REST interface's reads answer: `/list`, `/detail` (byte for
//! byte as ngx_http_dyups_module gives it), `/upstream/NAME` as nginx
//! lines or JSON (with what the resolver found for its host names), and one
//! server.

use serde::Serialize;

use super::{Endpoint, Response};
use crate::store::Snapshot;
use crate::table::model::{ServerSpec, Table, Upstream};
use crate::table::syntax::{render_server, server_lines, setting_lines};
use crate::Error;

/// The answer of a read of `endpoint` in `snap`; `status`: what the
/// resolver last found for each `resolve` line.
pub(super) fn read(
    endpoint: &Endpoint,
    json: bool,
    snap: &Snapshot,
    status: &[crate::admin::name_status::Status],
) -> Response {
    let t = &snap.table;
    let found = |name: &str| {
        t.get(name)
            .ok_or_else(|| Error::NotFound(format!("upstream {name} not found")))
    };
    let out = match endpoint {
        Endpoint::List if json => Ok(to_json(&Listing {
            version: snap.version,
            upstreams: t.names().collect(),
        })),
        Endpoint::Detail if json => Ok(to_json(&Detail {
            version: snap.version,
            upstreams: &t.upstreams,
        })),
        Endpoint::List | Endpoint::Detail if t.upstreams.is_empty() => {
            return Response::text(204, "")
        }
        Endpoint::List => Ok(t.names().flat_map(|n| [n, "\n"]).collect()),
        Endpoint::Detail => Ok(detail(t)),
        Endpoint::Upstream(name) | Endpoint::Servers(name) => found(name).map(|u| {
            if json && u.names.is_empty() {
                to_json(&One {
                    version: snap.version,
                    upstream: u,
                })
            } else if json {
                // Through a JSON value, whose keys come out sorted: only
                // for an upstream with `server NAME` lines to add.
                let mut v = serde_json::to_value(One {
                    version: snap.version,
                    upstream: u,
                })
                .expect("plain data serialises");
                crate::admin::name_status::add_to_json(&mut v, u, status);
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
struct Detail<'a> {
    version: u64,
    upstreams: &'a [std::sync::Arc<Upstream>],
}

#[derive(Serialize)]
struct One<'a> {
    version: u64,
    #[serde(flatten)]
    upstream: &'a Upstream,
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
