//! The three content handlers: `/ups` (`ups_reply`), `/ups/check`
//! (`handle_check`) and the REST interface (`api_reply`). For the first and
//! the last, writes.lua reads nginx's request (method, arguments, headers,
//! body) once, in Lua, and passes it in plain values, and sends the answer
//! they return: from Rust, each access to nginx's Lua API is a protected
//! call of mlua's, and a request made some 40 (more than the write itself
//! cost). They check the admin token, hand the request to `admin/` and
//! answer; the writing ones run in a turn of the writers' queue, and
//! writes.lua sends their answer once the write is on disk. `/ups/check`
//! still reads and answers through the Lua API: it writes nothing.

use mlua::{FromLuaMulti, Function, Lua, MultiValue, Table, Value};

use crate::admin::auth;
use crate::admin::rest;
use crate::admin::ups::{self, Arg};
use crate::store::WriteOptions;
use crate::table::model::Table as UpstreamTable;

use super::config::{config, Config, CONFIG};
use super::ngx_api::{log, ngx};
use super::read_api::with_snapshot;
use super::write_api::{after_write, store_in, write_back_header, Turn};
use super::LuaResult;

/// Checks the admin token, when one is configured; logs a refusal with the
/// client's address.
pub(super) fn authorize(lua: &Lua) -> LuaResult<Result<(), auth::Refusal>> {
    if CONFIG
        .lock()
        .as_ref()
        .is_none_or(|c| c.admin_token.is_none())
    {
        return Ok(Ok(()));
    }
    let var: Table = ngx(lua)
        .ok_or_else(|| mlua::Error::runtime("not running inside nginx"))?
        .get("var")?;
    let text = |name: &str| -> LuaResult<Option<String>> {
        Ok(var
            .get::<Option<mlua::LuaString>>(name)?
            .map(|h| h.to_string_lossy()))
    };
    let (header, client) = (text("http_authorization")?, text("remote_addr")?);
    Ok(admit(lua, header.as_deref(), client.as_deref()))
}

/// Checks an admin request's `Authorization` header against the admin
/// token, when one is configured; logs a refusal with the client's address.
fn admit(lua: &Lua, header: Option<&str>, client: Option<&str>) -> Result<(), auth::Refusal> {
    let config = CONFIG.lock();
    let Some(token) = config.as_ref().and_then(|c| c.admin_token.as_deref()) else {
        return Ok(());
    };
    let verdict = auth::check(token, header);
    drop(config);
    if let Err(why) = &verdict {
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
    verdict
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

/// One `/ups` request as writes.lua took it from nginx, once, before the
/// handler's first call (see [`ApiRequest`] for why): the method, the
/// query arguments `op`, `server` and `upstream` as `ngx.req.get_uri_args`
/// gives them, whether that list was cut short, the first conditional
/// header sent, and the admin credentials.
pub(super) struct UpsRequest {
    method: String,
    op: Arg,
    server: Arg,
    upstream: Arg,
    truncated: bool,
    /// `If-Match`, `If-None-Match` or `If-Unmodified-Since`, whichever
    /// came (writes.lua names the first it finds).
    precondition: Option<String>,
    authorization: Option<String>,
    client: Option<String>,
}

impl FromLuaMulti for UpsRequest {
    fn from_lua_multi(values: MultiValue, _: &Lua) -> LuaResult<Self> {
        let mut v = values.into_iter();
        let method = lossy_text(v.next()).unwrap_or_default();
        // As ngx.req.get_uri_args gives it: `?op` alone is `true`, a name
        // given twice a table.
        let mut arg = || match v.next().unwrap_or(Value::Nil) {
            Value::Nil => Arg::Absent,
            Value::Boolean(_) => Arg::Flag,
            Value::String(s) => Arg::One(s.to_string_lossy()),
            _ => Arg::Many,
        };
        let (op, server, upstream) = (arg(), arg(), arg());
        let truncated = matches!(v.next(), Some(Value::Boolean(true)));
        let precondition = lossy_text(v.next());
        let authorization = lossy_text(v.next());
        let client = lossy_text(v.next());
        Ok(UpsRequest {
            method,
            op,
            server,
            upstream,
            truncated,
            precondition,
            authorization,
            client,
        })
    }
}

/// The `/ups` content handler (`lua/upsops.lua`, through writes.lua), in
/// `turn`: the status and JSON body writes.lua sends once the write is on
/// disk, and the `X-Dyups-Write-Back` header.
pub(super) fn ups_reply(
    lua: &Lua,
    (mut turn, req): (Turn, UpsRequest),
) -> LuaResult<(u16, String, Option<String>)> {
    if let Err(why) = admit(lua, req.authorization.as_deref(), req.client.as_deref()) {
        let r = unauthorized_json(why);
        return Ok((r.status, r.body, None));
    }
    if req.truncated {
        // A half-read query could miss its `upstream=` and change the
        // server in every upstream.
        let r = ups::refused(
            &format!(
                "more than {UPS_MAX_ARGS} query arguments: nothing changed; {}",
                ups::USAGE
            ),
            &req.server,
        );
        return Ok((r.status, r.body, None));
    }
    if let Some(header) = &req.precondition {
        // The original interface has no preconditions, and nginx would
        // evaluate these against our answer after the write (a 200 without
        // an ETag fails If-Match and If-Unmodified-Since): refused unapplied.
        let r = ups::refused(
            &format!(
                "/ups does not evaluate {header}: nothing changed; send the request without it, \
                     or use the REST interface's If-Match"
            ),
            &req.server,
        );
        return Ok((r.status, r.body, None));
    }
    let mut write_back = None;
    let reply = match store_in(&mut turn) {
        Ok((cfg, store, wait)) => {
            let r = ups::handle(
                &req.method,
                &req.op,
                &req.server,
                &req.upstream,
                &store,
                &WriteOptions { wait, ..cfg.write },
            );
            if r.status == 200 {
                write_back = write_back_header(after_write(lua, &cfg, &store, wait));
            }
            r
        }
        Err(e) => ups_failure(&e.to_string()),
    };
    Ok((reply.status, reply.body, write_back))
}

/// The JSON answer of a `/ups` request that failed (`raw.ups_failure`:
/// writes.lua's, for a write not known to be on disk).
pub(super) fn ups_failure(msg: &str) -> ups::Reply {
    ups::Reply {
        status: 500,
        body: serde_json::json!({"msg": msg, "data": [], "code": ups::FAILED}).to_string(),
    }
}

/// Query arguments `/ups` reads; a request with more is refused.
const UPS_MAX_ARGS: i64 = 100;

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

/// Whether writes.lua should read the request body before the REST handler
/// (`raw.api_wants_body(method, content_length)`): a write, not declared
/// larger than `max_body` (that one is refused with 413 unread).
pub(super) fn api_wants_body(
    _: &Lua,
    (method, length): (mlua::LuaString, Option<mlua::LuaString>),
) -> LuaResult<bool> {
    let max = config()
        .map(|c| c.max_body)
        .unwrap_or(rest::DEFAULT_MAX_BODY);
    let writing = !matches!(&*method.as_bytes(), b"GET" | b"HEAD");
    Ok(writing && declared(length.as_ref()).is_none_or(|n| n <= max as u64))
}

/// The length a `Content-Length` header declares, if it is a number.
fn declared(length: Option<&mlua::LuaString>) -> Option<u64> {
    length.and_then(|v| v.to_string_lossy().parse::<u64>().ok())
}

/// One REST request as writes.lua took it from nginx, once, before the
/// handler's first call: a write waiting its turn is handled again with
/// the same request (it once read the headers anew, and found its
/// `If-Match` gone, cleared by the call before). Each argument is nginx's
/// variable of the same name, read in Lua, so that the handler makes no
/// call back into Lua: from Rust, each is a protected call of mlua's, and
/// the 40 or so of a request cost more than the write itself.
pub(super) struct ApiRequest {
    method: String,
    /// `$request_uri`: the path as sent. nginx's `$uri` has `%2F` decoded
    /// into a separator and dot segments resolved (rest.rs routes and
    /// decodes).
    path: String,
    json: bool,
    if_match: Option<String>,
    if_none_match: Option<String>,
    if_unmodified_since: Option<String>,
    if_modified_since: Option<String>,
    authorization: Option<String>,
    client: Option<String>,
    length: Option<u64>,
    /// What `ngx.req.get_body_data()` gave, else the file
    /// `ngx.req.get_body_file()` named (nginx buffered a large body there).
    body: Option<mlua::LuaString>,
    body_file: Option<String>,
}

impl FromLuaMulti for ApiRequest {
    fn from_lua_multi(values: MultiValue, _: &Lua) -> LuaResult<Self> {
        let mut v = values.into_iter();
        // Bytes nginx decoded from the URI need not be UTF-8: read lossily,
        // so a hostile path is a bad name (400), not a failed conversion.
        let mut text = || lossy_text(v.next());
        let method = text().unwrap_or_default();
        let path = text().unwrap_or_default();
        let accept = text();
        let format = text();
        let json = accept.is_some_and(|a| a.contains("application/json"))
            || format.as_deref() == Some("json");
        let (if_match, if_none_match) = (text(), text());
        let (if_unmodified_since, if_modified_since) = (text(), text());
        let (authorization, client) = (text(), text());
        let length = text().and_then(|n| n.parse::<u64>().ok());
        let body = match v.next() {
            Some(Value::String(s)) => Some(s),
            _ => None,
        };
        let body_file = match v.next() {
            Some(Value::String(s)) => Some(s.to_string_lossy()),
            _ => None,
        };
        Ok(ApiRequest {
            method,
            path,
            json,
            if_match,
            if_none_match,
            if_unmodified_since,
            if_modified_since,
            authorization,
            client,
            length,
            body,
            body_file,
        })
    }
}

/// A string argument as text (bytes that are not UTF-8 replaced); `None`
/// for anything else, `nil` included.
fn lossy_text(v: Option<Value>) -> Option<String> {
    match v {
        Some(Value::String(s)) => Some(s.to_string_lossy()),
        _ => None,
    }
}

impl ApiRequest {
    /// The body as read; `Err` with a 413 past `max` bytes, or a 500 when
    /// the file nginx buffered it in cannot be read.
    fn body(&self, max: usize) -> Result<Vec<u8>, rest::Response> {
        let too_large = || {
            rest_text(
                413,
                format!("request body is larger than {max} bytes (init option max_body)"),
            )
        };
        if self.length.is_some_and(|n| n > max as u64) {
            return Err(too_large());
        }
        let body = match (&self.body, &self.body_file) {
            (Some(data), _) => data.as_bytes().to_vec(),
            (None, Some(file)) => std::fs::read(file)
                .map_err(|e| rest_text(500, format!("could not read the request body: {e}")))?,
            (None, None) => Vec::new(),
        };
        if body.len() > max {
            return Err(too_large());
        }
        Ok(body)
    }
}

impl ApiRequest {
    /// The table this request would leave if it is a write, tried on
    /// `table`: what dns.lua looks up before its turn (`raw.dns_plan`).
    /// `None` for a read, a request the token refuses (the handler logs
    /// that), a body it refuses, or a write refused anyway.
    pub(super) fn planned(&self, cfg: &Config, table: &UpstreamTable) -> Option<UpstreamTable> {
        if let Some(token) = &cfg.admin_token {
            auth::check(token, self.authorization.as_deref()).ok()?;
        }
        let body = self.body(cfg.max_body).ok()?;
        let request = rest::Request {
            method: &self.method,
            path: &self.path,
            body: &body,
            json: false,
            preconditions: rest::Preconditions::default(),
            answers: None,
            name_status: &[],
        };
        rest::planned(&request, table)
    }
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

/// The REST handler's answer, as writes.lua sends it once the write is on
/// disk: status, body, whether it is JSON, the ETag's version, the `Allow`
/// header, and the `X-Dyups-Write-Back` header.
pub(super) type ApiAnswer = (
    u16,
    String,
    bool,
    Option<u64>,
    Option<&'static str>,
    Option<String>,
);

/// The REST content handler (`lua/dyups_api.lua`, through writes.lua):
/// ngx_http_dyups_module's interface and its per-server additions, in
/// `turn`.
pub(super) fn api_reply(lua: &Lua, (mut turn, req): (Turn, ApiRequest)) -> LuaResult<ApiAnswer> {
    let mut write_back = None;
    let response = match (
        admit(lua, req.authorization.as_deref(), req.client.as_deref()),
        config(),
    ) {
        (Err(why), _) => rest_text(401, why.message().to_owned()),
        (_, Err(e)) => rest_text(500, e),
        (_, Ok(cfg)) => match req.body(cfg.max_body) {
            Err(r) => r,
            Ok(body) => {
                let mut request = rest::Request {
                    method: &req.method,
                    path: &req.path,
                    body: &body,
                    json: req.json,
                    preconditions: rest::Preconditions {
                        if_match: req.if_match.as_deref(),
                        if_none_match: req.if_none_match.as_deref(),
                        if_unmodified_since: req.if_unmodified_since.as_deref(),
                        if_modified_since: req.if_modified_since.as_deref(),
                    },
                    answers: None,
                    name_status: &[],
                };
                let reading = matches!(req.method.as_str(), "GET" | "HEAD");
                // What the resolver found is shown in one upstream's JSON.
                let status = if reading && req.json && req.path.starts_with("/upstream/") {
                    crate::admin::name_status::read(&cfg.path)
                } else {
                    Vec::new()
                };
                request.name_status = &status;
                let answers = if reading {
                    None
                } else {
                    super::dns::answers_for(&turn, &cfg, |t| {
                        rest::planned(&request, t)
                            .map(|p| *t = p)
                            .ok_or(crate::Error::Internal(String::new()))
                    })
                };
                request.answers = answers.as_ref();
                // The file the worker routes by (moved to one restored or
                // replaced since its last look), as writes take it too.
                let reply = with_snapshot(|store, snap| {
                    let wait = match &mut turn {
                        Some(t) => t.wait(store, cfg.write.wait),
                        None => cfg.write.wait,
                    };
                    let opts = WriteOptions { wait, ..cfg.write };
                    (
                        rest::handle(&request, store, snap, &opts),
                        store.clone(),
                        wait,
                    )
                });
                match reply {
                    Err(e) => rest_text(500, e),
                    Ok((r, store, wait)) => {
                        if !reading && r.status == 200 {
                            write_back = write_back_header(after_write(lua, &cfg, &store, wait));
                        }
                        r
                    }
                }
            }
        },
    };
    Ok((
        response.status,
        response.body,
        response.json,
        response.etag,
        response.allow,
        write_back,
    ))
}
