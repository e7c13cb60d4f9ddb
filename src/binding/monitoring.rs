//! The read-only views for monitoring: `/metrics` (Prometheus's text
//! exposition, `lua/metrics.lua`) and `/dashboard` (the status page and its
//! JSON, `lua/dashboard.lua`). Both answer GET and HEAD, under the admin
//! token as the other admin interfaces are; what they show is made in
//! `admin/` from one read of the table, its cells and the workers.

use std::time::{SystemTime, UNIX_EPOCH};

use mlua::{Function, Lua, Table, Value};

use super::http::{authorize, method};
use super::ngx_api::ngx;
use super::read_api::with_snapshot;
use super::LuaResult;
use crate::admin::server_state::servers;
use crate::admin::{dashboard, name_status, prometheus};
use crate::store::{Snapshot, StateFile};

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// An answer: status, `Content-Type`, body, and the page's own headers.
struct Answer {
    status: u16,
    content_type: &'static str,
    body: String,
    csp: bool,
}

fn text(status: u16, body: String) -> Answer {
    Answer {
        status,
        content_type: "text/plain; charset=utf-8",
        body,
        csp: false,
    }
}

/// Checks the method and, when `guarded`, the token; then answers with
/// `f`'s.
fn serve(lua: &Lua, what: &str, guarded: bool, f: impl FnOnce() -> Answer) -> LuaResult<()> {
    let ngx = ngx(lua).ok_or_else(|| mlua::Error::runtime("not running inside nginx"))?;
    let header: Table = ngx.get("header")?;
    let method = method(lua)?;
    let refused = if guarded { authorize(lua)?.err() } else { None };
    let answer = if let Some(why) = refused {
        header.set("WWW-Authenticate", "Bearer realm=\"ngx.dyups\"")?;
        text(401, format!("{}\n", why.message()))
    } else if method != "GET" && method != "HEAD" {
        header.set("Allow", "GET, HEAD")?;
        text(405, format!("{what} takes GET and HEAD\n"))
    } else {
        f()
    };
    ngx.set("status", answer.status)?;
    header.set("Content-Type", answer.content_type)?;
    header.set("Cache-Control", "no-store")?;
    if answer.csp {
        header.set("Content-Security-Policy", dashboard::CSP)?;
    }
    if method != "HEAD" {
        let print: Function = ngx.get("print")?;
        print.call::<Value>(lua.create_string(answer.body.as_bytes())?)?;
    }
    Ok(())
}

/// What the resolver last found for each `server NAME` line of the
/// snapshot's table; its file is read only for a table that has such lines.
fn name_reports(snap: &Snapshot, store: &StateFile) -> Vec<name_status::NameReport> {
    if snap.table.upstreams.iter().any(|u| !u.names.is_empty()) {
        name_status::report(&snap.table, store.path())
    } else {
        Vec::new()
    }
}

/// The `/metrics` content handler.
pub(super) fn metrics(lua: &Lua, (): ()) -> LuaResult<()> {
    serve(lua, "/metrics", true, || {
        let body = with_snapshot(|store, snap| {
            let views = servers(&snap.table, store.zone(), unix_ms());
            let names = name_reports(snap, store);
            prometheus::render(&prometheus::Scrape {
                servers: &views,
                upstreams: snap.table.upstreams.len(),
                workers: &store.worker_stats(),
                table: &store.table_stats(snap),
                names: &names,
            })
        });
        match body {
            Ok(body) => Answer {
                status: 200,
                content_type: prometheus::CONTENT_TYPE,
                body,
                csp: false,
            },
            Err(e) => text(500, format!("{e}\n")),
        }
    })
}

/// The `/dashboard` content handler: the page, or with `?format=json` what
/// it draws.
pub(super) fn dashboard(lua: &Lua, (): ()) -> LuaResult<()> {
    let ngx = ngx(lua).ok_or_else(|| mlua::Error::runtime("not running inside nginx"))?;
    let args: Table = ngx
        .get::<Table>("req")?
        .get::<Function>("get_uri_args")?
        .call(())?;
    let format = match args.get::<Value>("format")? {
        Value::String(s) => Some(s.to_string_lossy()),
        _ => None,
    };
    // The page itself is the same static text for everyone and shows no
    // data: a browser cannot send a bearer token when it opens a URL, so
    // the page is served without one, and its fetches of the JSON, which
    // holds the data, send the token it reads from the URL's fragment.
    let page = matches!(format.as_deref(), None | Some("" | "html"));
    serve(lua, "/dashboard", !page, || match format.as_deref() {
        None | Some("" | "html") => Answer {
            status: 200,
            content_type: "text/html; charset=utf-8",
            body: dashboard::PAGE.to_owned(),
            csp: true,
        },
        Some("json") => match with_snapshot(|store, snap| {
            let now = unix_ms();
            let views = servers(&snap.table, store.zone(), now);
            let names = name_reports(snap, store);
            dashboard::json(snap.version, &views, &names, &store.worker_stats(), now)
        }) {
            Ok(body) => Answer {
                status: 200,
                content_type: "application/json",
                body,
                csp: false,
            },
            Err(e) => text(500, format!("{e}\n")),
        },
        Some(other) => text(400, format!("format {other:?} is not one of html, json\n")),
    })
}
