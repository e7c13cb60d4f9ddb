//! The three content handlers: `/ups` (`ups_reply`, `send_ups`),
//! `/ups/check` (`handle_check`) and the REST interface (`api_reply`,
//! `send_api`). They read nginx's request (method, arguments, headers,
//! body), check the admin token, hand the request to `admin/` and write its
//! answer back; the writing ones run in a turn of the writers' queue and
//! send their answer once `writes.lua` has the write on disk.

use mlua::{AnyUserData, Function, Lua, Table, UserData, Value};

use crate::admin::auth;
use crate::admin::rest;
use crate::admin::ups::{self, Arg};
use crate::store::WriteOptions;

use super::config::config;
use super::ngx_api::{log, ngx};
use super::read_api::with_snapshot;
use super::write_api::{after_write, announce_write_back, store_in, Turn};
use super::LuaResult;

/// One query argument from `ngx.req.get_uri_args()`.
fn query_arg(args: &Table, name: &str) -> Arg {
    match args.get::<Value>(name).unwrap_or(Value::Nil) {
        Value::Nil => Arg::Absent,
        Value::Boolean(_) => Arg::Flag,
        Value::String(s) => Arg::One(s.to_string_lossy()),
        _ => Arg::Many,
    }
}

/// Checks the admin token, when one is configured; logs a refusal with the
/// client's address.
fn authorize(lua: &Lua) -> LuaResult<Result<(), auth::Refusal>> {
    let Some(token) = config().ok().and_then(|c| c.admin_token) else {
        return Ok(Ok(()));
    };
    let var: Table = ngx(lua)
        .ok_or_else(|| mlua::Error::runtime("not running inside nginx"))?
        .get("var")?;
    let header = var
        .get::<Option<mlua::LuaString>>("http_authorization")?
        .map(|h| h.to_string_lossy());
    let verdict = auth::check(&token, header.as_deref());
    if let Err(why) = verdict {
        let client = var
            .get::<Option<mlua::LuaString>>("remote_addr")?
            .map(|c| c.to_string_lossy());
        log(
            lua,
            "WARN",
            &format!(
                "refused an admin request from {}: {}",
                client.unwrap_or_default(),
                why.message()
            ),
        );
    }
    Ok(verdict)
}

fn unauthorized_json(why: auth::Refusal) -> ups::Reply {
    ups::Reply {
        status: 401,
        body: serde_json::json!({"msg": why.message(), "data": [], "code": ups::FAILED})
            .to_string(),
    }
}

fn respond(lua: &Lua, reply: ups::Reply) -> LuaResult<()> {
    let ngx = ngx(lua).ok_or_else(|| mlua::Error::runtime("not running inside nginx"))?;
    ngx.set("status", reply.status)?;
    let header: Table = ngx.get("header")?;
    header.set("Content-Type", "application/json")?;
    if reply.status == 405 {
        header.set("Allow", ups::ALLOWED)?;
    }
    if reply.status == 401 {
        header.set("WWW-Authenticate", "Bearer realm=\"ngx.dyups\"")?;
    }
    let say: Function = ngx.get("say")?;
    say.call::<Value>(reply.body)?;
    Ok(())
}

pub(super) fn method(lua: &Lua) -> LuaResult<String> {
    let ngx = ngx(lua).ok_or_else(|| mlua::Error::runtime("not running inside nginx"))?;
    ngx.get::<Table>("req")?
        .get::<Function>("get_method")?
        .call(())
}

/// The answer of one `/ups` request, sent once its write is on disk.
pub(super) struct UpsReply(ups::Reply);

impl UserData for UpsReply {}

/// The `/ups` content handler (`lua/upsops.lua`, through writes.lua): the
/// answer, in `turn`.
pub(super) fn ups_reply(lua: &Lua, mut turn: Turn) -> LuaResult<UpsReply> {
    if let Err(why) = authorize(lua)? {
        return Ok(UpsReply(unauthorized_json(why)));
    }
    let method = method(lua)?;
    let ngx = ngx(lua).ok_or_else(|| mlua::Error::runtime("not running inside nginx"))?;
    let (args, truncated): (Table, Option<String>) = ngx
        .get::<Table>("req")?
        .get::<Function>("get_uri_args")?
        .call(UPS_MAX_ARGS)?;
    if truncated.is_some() {
        // A half-read query could miss its `upstream=` and change the
        // server in every upstream.
        return Ok(UpsReply(ups::refused(
            &format!(
                "more than {UPS_MAX_ARGS} query arguments: nothing changed; {}",
                ups::USAGE
            ),
            &query_arg(&args, "server"),
        )));
    }
    if let Some(header) = ups_precondition(&ngx)? {
        // The original interface has no preconditions, and nginx would
        // evaluate these against our answer after the write (a 200 without
        // an ETag fails If-Match and If-Unmodified-Since): refused unapplied.
        return Ok(UpsReply(ups::refused(
            &format!(
                "/ups does not evaluate {header}: nothing changed; send the request without it, \
                     or use the REST interface's If-Match"
            ),
            &query_arg(&args, "server"),
        )));
    }
    let reply = match store_in(&mut turn) {
        Ok((cfg, store, wait)) => {
            let r = ups::handle(
                &method,
                &query_arg(&args, "op"),
                &query_arg(&args, "server"),
                &query_arg(&args, "upstream"),
                &store,
                &WriteOptions { wait, ..cfg.write },
            );
            if r.status == 200 {
                announce_write_back(lua, after_write(lua, &cfg, &store, wait))?;
            }
            r
        }
        Err(e) => ups_failure(&e.to_string()),
    };
    Ok(UpsReply(reply))
}

fn ups_failure(msg: &str) -> ups::Reply {
    ups::Reply {
        status: 500,
        body: serde_json::json!({"msg": msg, "data": [], "code": ups::FAILED}).to_string(),
    }
}

/// Sends a `/ups` answer; `unsynced`: why the write it reports is not
/// known to be on disk, which makes it a failure.
pub(super) fn send_ups(
    lua: &Lua,
    (reply, unsynced): (AnyUserData, Option<String>),
) -> LuaResult<()> {
    let reply = match unsynced {
        Some(why) => ups_failure(&why),
        None => reply.take::<UpsReply>()?.0,
    };
    if reply.status >= 500 {
        log(lua, "ERR", &reply.body);
    }
    respond(lua, reply)
}

/// Query arguments `/ups` reads; a request with more is refused.
const UPS_MAX_ARGS: i64 = 100;

/// The first conditional header a `/ups` request carries, if any.
/// `If-Modified-Since` is not one: nginx ignores it without a
/// `Last-Modified`, and it has no meaning on a write.
fn ups_precondition(ngx: &Table) -> LuaResult<Option<&'static str>> {
    let var: Table = ngx.get("var")?;
    for (header, name) in [
        ("If-Match", "http_if_match"),
        ("If-None-Match", "http_if_none_match"),
        ("If-Unmodified-Since", "http_if_unmodified_since"),
    ] {
        if var.get::<Option<mlua::LuaString>>(name)?.is_some() {
            return Ok(Some(header));
        }
    }
    Ok(None)
}

/// The `/ups/check` content handler (`lua/srvcheck.lua`).
pub(super) fn handle_check(lua: &Lua, (): ()) -> LuaResult<()> {
    if let Err(why) = authorize(lua)? {
        return respond(lua, unauthorized_json(why));
    }
    let method = method(lua)?;
    let reply = with_snapshot(|store, snap| ups::check(&method, store, snap)).unwrap_or_else(|e| {
        ups::Reply {
            status: 500,
            body: serde_json::json!({"msg": e, "data": {}, "code": ups::FAILED}).to_string(),
        }
    });
    respond(lua, reply)
}

/// The length the client declared for its request body.
fn declared_length(ngx: &Table) -> LuaResult<Option<u64>> {
    let var: Table = ngx.get("var")?;
    Ok(var
        .get::<Option<mlua::LuaString>>("content_length")?
        .and_then(|v| v.to_string_lossy().parse::<u64>().ok()))
}

/// Whether content.lua should read the request body before `handle_api`:
/// a write, not declared larger than `max_body` (that one is refused with
/// 413 unread).
pub(super) fn api_wants_body(lua: &Lua, (): ()) -> LuaResult<bool> {
    let ngx = ngx(lua).ok_or_else(|| mlua::Error::runtime("handle_api runs inside nginx only"))?;
    let max = config()
        .map(|c| c.max_body)
        .unwrap_or(rest::DEFAULT_MAX_BODY);
    let writing = !matches!(method(lua)?.as_str(), "GET" | "HEAD");
    Ok(writing && declared_length(&ngx)?.is_none_or(|n| n <= max as u64))
}

/// The request body content.lua read; `Err` with a 413 past `max` bytes, or
/// a 500 when it cannot be read.
pub(super) fn request_body(ngx: &Table, max: usize) -> LuaResult<Result<Vec<u8>, rest::Response>> {
    let too_large = || {
        rest_text(
            413,
            format!("request body is larger than {max} bytes (init option max_body)"),
        )
    };
    if declared_length(ngx)?.is_some_and(|n| n > max as u64) {
        return Ok(Err(too_large()));
    }
    let req: Table = ngx.get("req")?;
    let data: Option<mlua::LuaString> = req.get::<Function>("get_body_data")?.call(())?;
    let body = match data {
        Some(data) => data.as_bytes().to_vec(),
        // nginx buffered a large body to a file (client_body_buffer_size).
        None => match req
            .get::<Function>("get_body_file")?
            .call::<Option<String>>(())?
        {
            Some(file) => match std::fs::read(&file) {
                Ok(b) => b,
                Err(e) => {
                    let why = format!("could not read the request body: {e}");
                    return Ok(Err(rest_text(500, why)));
                }
            },
            None => Vec::new(),
        },
    };
    if body.len() > max {
        return Ok(Err(too_large()));
    }
    Ok(Ok(body))
}

fn rest_text(status: u16, body: String) -> rest::Response {
    rest::Response {
        status,
        body,
        json: false,
        etag: None,
        allow: None,
    }
}

/// The answer of one REST request, sent once its write is on disk.
pub(super) struct ApiReply(rest::Response);

impl UserData for ApiReply {}

/// The REST content handler (`lua/dyups_api.lua`, through writes.lua):
/// ngx_http_dyups_module's interface and its per-server additions. The
/// answer, in `turn`.
pub(super) fn api_reply(lua: &Lua, mut turn: Turn) -> LuaResult<ApiReply> {
    let ngx = ngx(lua).ok_or_else(|| mlua::Error::runtime("handle_api runs inside nginx only"))?;
    let method = method(lua)?;
    let var: Table = ngx.get("var")?;
    // Bytes nginx decoded from the URI need not be UTF-8: read them lossily,
    // so a hostile path is a bad name (400), not a failed conversion (500).
    let lossy = |name: &str| -> LuaResult<Option<String>> {
        Ok(var
            .get::<Option<mlua::LuaString>>(name)?
            .map(|s| s.to_string_lossy()))
    };
    // The path as sent: nginx's $uri has `%2F` decoded into a separator
    // and dot segments resolved (rest.rs routes and decodes).
    let path = lossy("request_uri")?.unwrap_or_default();
    // Headers through nginx's variables, which see every header: a list
    // from ngx.req.get_headers stops at 100, and an If-Match past them
    // would not be seen.
    let json = lossy("http_accept")?.is_some_and(|a| a.contains("application/json"))
        || lossy("arg_format")?.as_deref() == Some("json");
    let if_match = lossy("http_if_match")?;
    let if_none_match = lossy("http_if_none_match")?;
    let if_unmodified_since = lossy("http_if_unmodified_since")?;
    let if_modified_since = lossy("http_if_modified_since")?;
    // rest.rs evaluates every precondition. Left in place, nginx's
    // not-modified filter would evaluate them again on our answer, after a
    // write: a 200 with the new ETag would become a 304 (If-None-Match: *)
    // or a 412 (If-Match, If-Unmodified-Since) for a change that was made.
    let clear: Function = ngx.get::<Table>("req")?.get("clear_header")?;
    for (name, value) in [
        ("If-Match", &if_match),
        ("If-None-Match", &if_none_match),
        ("If-Unmodified-Since", &if_unmodified_since),
        ("If-Modified-Since", &if_modified_since),
    ] {
        if value.is_some() {
            clear.call::<()>(name)?;
        }
    }
    let response = match (authorize(lua)?, store_in(&mut turn)) {
        (Err(why), _) => rest_text(401, why.message().to_owned()),
        (_, Err(e)) => rest_text(500, e.to_string()),
        (_, Ok((cfg, store, wait))) => match request_body(&ngx, cfg.max_body)? {
            Err(r) => r,
            Ok(body) => {
                let mut req = rest::Request {
                    method: &method,
                    path: &path,
                    body: &body,
                    json,
                    preconditions: rest::Preconditions {
                        if_match: if_match.as_deref(),
                        if_none_match: if_none_match.as_deref(),
                        if_unmodified_since: if_unmodified_since.as_deref(),
                        if_modified_since: if_modified_since.as_deref(),
                    },
                    answers: None,
                    name_status: &[],
                };
                let answers = super::dns::answers_for(&turn, &cfg, |t| {
                    rest::planned(&req, t)
                        .map(|p| *t = p)
                        .ok_or(crate::Error::Internal(String::new()))
                });
                req.answers = answers.as_ref();
                let status = if matches!(method.as_str(), "GET" | "HEAD") {
                    crate::admin::name_status::read(&cfg.path)
                } else {
                    Vec::new()
                };
                req.name_status = &status;
                let opts = WriteOptions { wait, ..cfg.write };
                let reply = with_snapshot(|_, snap| rest::handle(&req, &store, snap, &opts));
                let r = reply.unwrap_or_else(|e| rest_text(500, e));
                if !matches!(method.as_str(), "GET" | "HEAD") && r.status == 200 {
                    announce_write_back(lua, after_write(lua, &cfg, &store, wait))?;
                }
                r
            }
        },
    };
    Ok(ApiReply(response))
}

/// Sends a REST answer; `unsynced`: why the write it reports is not known
/// to be on disk, which makes it a failure.
pub(super) fn send_api(
    lua: &Lua,
    (reply, unsynced): (AnyUserData, Option<String>),
) -> LuaResult<()> {
    let ngx = ngx(lua).ok_or_else(|| mlua::Error::runtime("handle_api runs inside nginx only"))?;
    let response = match unsynced {
        Some(why) => rest_text(500, why),
        None => reply.take::<ApiReply>()?.0,
    };
    if response.status >= 500 {
        log(lua, "ERR", &response.body);
    }
    // We evaluated If-Match against the table version ourselves. Left in
    // place, nginx's not-modified filter would compare it with the new
    // version's ETag of a successful write and turn the 200 into a 412.
    // (Cleared only now: `api_reply` reads it on each of its calls.)
    ngx.get::<Table>("req")?
        .get::<Function>("clear_header")?
        .call::<()>("If-Match")?;
    ngx.set("status", response.status)?;
    let out: Table = ngx.get("header")?;
    let kind = if response.json {
        "application/json"
    } else {
        "text/plain"
    };
    out.set("Content-Type", kind)?;
    if let Some(v) = response.etag {
        out.set("ETag", format!("\"{v}\""))?;
    }
    if let Some(allow) = response.allow {
        out.set("Allow", allow)?;
    }
    if response.status == 401 {
        out.set("WWW-Authenticate", "Bearer realm=\"ngx.dyups\"")?;
    }
    if !response.body.is_empty() {
        ngx.get::<Function>("print")?.call::<Value>(response.body)?;
    }
    Ok(())
}
