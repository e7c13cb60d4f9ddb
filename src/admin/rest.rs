//! The REST interface of ngx_http_dyups_module (`/list`, `/detail`,
//! `/upstream/NAME`), with its bodies and status codes, plus what its users
//! asked for: per-server changes (`/upstream/NAME/servers[/ADDR]`), JSON
//! views for programs, and the table version as an `ETag` that `If-Match`
//! checks, so a read-decide-write cycle cannot lose another writer's change.
//!
//! Requests are routed on the path as the client sent it, not on nginx's
//! decoded `$uri`: there `%2F` is a `/`, so `POST /upstream/a%2Fservers`
//! would add a server to `a`, behind the back of a front proxy that
//! authorises by the path it saw. Every precondition (`If-Match`,
//! `If-None-Match`, `If-Unmodified-Since`) is evaluated here, before a
//! write, or refused: nginx's not-modified filter would otherwise evaluate
//! it after the write and turn its 200 into a 304 or a 412.

use self::views::read;
use crate::admin::ops;
use crate::store::{Snapshot, StateFile, WriteOptions};
use crate::table::model::{check_name, Table, DEFAULT_PORT};
use crate::table::names::Answers;
use crate::table::syntax::{parse_server_patch, parse_target, Target};
use crate::Error;

/// The default largest request body, in bytes.
pub const DEFAULT_MAX_BODY: usize = 64 * 1024;

/// What the content handler hands over of the request.
#[derive(Debug)]
pub struct Request<'a> {
    pub method: &'a str,
    /// The path as the client sent it, undecoded (nginx's `$request_uri`;
    /// anything from a `?` on is ignored).
    pub path: &'a str,
    pub body: &'a [u8],
    /// `Accept: application/json` or `?format=json`.
    pub json: bool,
    pub preconditions: Preconditions<'a>,
    /// The answers for the host names the write adds, gathered before it
    /// ([`planned`] says which); `None`: the write may add none.
    pub answers: Option<&'a Answers>,
    /// What the resolver last found for each `resolve` line, for reads
    /// (see [`crate::admin::name_status`]).
    pub name_status: &'a [crate::admin::name_status::Status],
}

/// The request's conditional headers, as sent.
#[derive(Clone, Copy, Debug, Default)]
pub struct Preconditions<'a> {
    pub if_match: Option<&'a str>,
    pub if_none_match: Option<&'a str>,
    pub if_unmodified_since: Option<&'a str>,
    /// Ignored: the table has no modification time, and on a write the
    /// header has no meaning (RFC 9110 13.1.3).
    pub if_modified_since: Option<&'a str>,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: String,
    pub json: bool,
    /// The table version, sent as `ETag`.
    pub etag: Option<u64>,
    /// The methods the path takes, sent as `Allow` with a 405.
    pub allow: Option<&'static str>,
}

impl Response {
    fn text(status: u16, body: impl Into<String>) -> Response {
        Response {
            status,
            body: body.into(),
            json: false,
            etag: None,
            allow: None,
        }
    }

    fn error(e: &Error) -> Response {
        Response::text(e.status(), e.to_string())
    }

    fn with_etag(mut self, version: u64) -> Response {
        self.etag = Some(version);
        self
    }
}

/// The endpoints, parsed from the path; names and addresses decoded.
enum Endpoint {
    List,
    Detail,
    /// Every live worker and the table's statistics (JSON only).
    Workers,
    Upstream(String),
    Servers(String),
    Server(String, String),
}

impl Endpoint {
    /// Whether a GET of the endpoint would find something: what
    /// `If-None-Match: *` and `If-Match: *` ask of a write.
    fn exists(&self, t: &Table) -> bool {
        match self {
            Endpoint::List | Endpoint::Detail | Endpoint::Workers => true,
            Endpoint::Upstream(name) | Endpoint::Servers(name) => t.get(name).is_some(),
            Endpoint::Server(name, addr) => t.get(name).is_some_and(|u| match parse_target(addr) {
                Ok(Target::Addr(a)) => u.server(&a).is_some(),
                Ok(Target::Name { host, port }) => {
                    u.named(&host, port.unwrap_or(DEFAULT_PORT)).is_some()
                }
                Err(_) => false,
            }),
        }
    }
}

const USAGE: &str =
    "no such endpoint: use /list, /detail, /workers, /upstream/NAME or /upstream/NAME/servers[/ADDR]";

/// Routes the path as sent. The fixed words must be spelled out; a name is
/// decoded once and must then be a valid name, sent as itself (every
/// character a name may have is URL-safe, so an escape in one only hides it
/// from whoever reads the path); everything after `servers/` is the address,
/// decoded once (`unix:/path` has slashes). A `.` or `..` segment is
/// refused: nginx would resolve it, so the path would name something else
/// than what it says.
fn route(path: &str) -> Result<Endpoint, Response> {
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    let Some(rest) = path.strip_prefix('/') else {
        return Err(Response::text(404, USAGE));
    };
    if rest.split('/').any(|s| s == "." || s == "..") {
        return Err(Response::text(
            400,
            format!("path {path:?} has a '.' or '..' segment: send the path it stands for"),
        ));
    }
    let segments: Vec<&str> = rest.splitn(4, '/').collect();
    Ok(match segments.as_slice() {
        ["list"] => Endpoint::List,
        ["detail"] => Endpoint::Detail,
        ["workers"] => Endpoint::Workers,
        ["upstream", name] => Endpoint::Upstream(upstream_name(name)?),
        ["upstream", name, "servers"] => Endpoint::Servers(upstream_name(name)?),
        ["upstream", name, "servers", addr] if !addr.is_empty() => {
            let addr = percent_decode(addr).map_err(|e| Response::text(400, e))?;
            Endpoint::Server(upstream_name(name)?, addr)
        }
        _ => return Err(Response::text(404, USAGE)),
    })
}

/// A name segment of the path: decoded once, then held to the name rules.
fn upstream_name(raw: &str) -> Result<String, Response> {
    let name = percent_decode(raw).map_err(|e| Response::text(400, e))?;
    check_name(&name).map_err(|e| Response::text(400, e))?;
    if name != raw {
        return Err(Response::text(
            400,
            format!("upstream name {raw:?} is percent-encoded: send it as {name}"),
        ));
    }
    Ok(name)
}

/// `%XX` escapes decoded, once; bytes that are not UTF-8 become U+FFFD,
/// which no name or address takes.
fn percent_decode(raw: &str) -> Result<String, String> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'%' {
            out.push(bytes[i]);
            i += 1;
            continue;
        }
        let hex = bytes
            .get(i + 1..i + 3)
            .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
            .and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok());
        let Some(b) = hex else {
            return Err(format!(
                "path segment {raw:?} has a '%' that is not a %XX escape"
            ));
        };
        out.push(b);
        i += 3;
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// An entity-tag list as in `If-Match` and `If-None-Match`.
#[derive(Debug, PartialEq, Eq)]
enum Tags {
    /// `*`
    Any,
    /// Each tag as a table version, `None` for one that is not a version
    /// this server gives (it never matches).
    Versions(Vec<Option<u64>>),
}

/// `"12"`, also weak `W/"12"` or unquoted, comma-separated; or `*`.
fn parse_tags(v: &str) -> Tags {
    if v.trim() == "*" {
        return Tags::Any;
    }
    Tags::Versions(
        v.split(',')
            .map(|t| {
                let t = t.trim();
                t.strip_prefix("W/")
                    .unwrap_or(t)
                    .trim_matches('"')
                    .parse()
                    .ok()
            })
            .collect(),
    )
}

impl Tags {
    fn matches(&self, version: u64) -> bool {
        match self {
            Tags::Any => true,
            Tags::Versions(v) => v.contains(&Some(version)),
        }
    }
}

/// What a write's preconditions ask, checked under the writer lock with
/// the change: the version the table must be at, and whether the target
/// must exist (`If-Match: *`) or must not (`If-None-Match: *`).
#[derive(Debug, Default, PartialEq, Eq)]
struct WriteGuard {
    expect: Option<u64>,
    exists: Option<bool>,
}

/// The preconditions of a write, or the refusal: 412 for one that can never
/// hold, 400 for one this interface cannot honour, so a write is never made
/// under a condition that was not checked.
fn write_guard(c: &Preconditions<'_>) -> Result<WriteGuard, Response> {
    let mut guard = WriteGuard::default();
    match c.if_match.map(parse_tags) {
        None if c.if_unmodified_since.is_some() => {
            return Err(Response::text(
                400,
                "If-Unmodified-Since cannot guard a write: the table has no modification time; \
                 send If-Match with the ETag of your read",
            ))
        }
        // RFC 9110 13.1.4: with If-Match, If-Unmodified-Since is ignored.
        None => {}
        Some(Tags::Any) => guard.exists = Some(true),
        Some(Tags::Versions(v)) => match v.as_slice() {
            [Some(version)] => guard.expect = Some(*version),
            _ if v.iter().all(Option::is_none) => {
                return Err(Response::text(
                    412,
                    format!(
                        "If-Match {:?} is not a table version this server gave as ETag: nothing changed",
                        c.if_match.unwrap_or_default()
                    ),
                ))
            }
            _ => {
                return Err(Response::text(
                    400,
                    "If-Match lists several versions: a write takes one, the ETag of your read",
                ))
            }
        },
    }
    match c.if_none_match.map(parse_tags) {
        None => {}
        Some(Tags::Any) if guard.exists.is_none() => guard.exists = Some(false),
        Some(Tags::Any) => {
            return Err(Response::text(
                400,
                "If-Match: * and If-None-Match: * together can never hold",
            ))
        }
        Some(Tags::Versions(_)) => {
            return Err(Response::text(
                400,
                "If-None-Match with a version cannot guard a write: send If-Match with the ETag \
                 of your read, or If-None-Match: * to create only",
            ))
        }
    }
    Ok(guard)
}

/// A read's answer under its preconditions (RFC 9110 13.2.2): only a 2xx
/// answer is conditional; a failed If-Match is 412, a matching
/// If-None-Match 304. The time-based ones are ignored: the table has no
/// modification time.
fn conditional_read(c: &Preconditions<'_>, r: Response, version: u64) -> Response {
    if !(200..300).contains(&r.status) {
        return r;
    }
    if c.if_match.is_some_and(|v| !parse_tags(v).matches(version)) {
        return Response::text(
            412,
            format!("the table is at version {version}, which If-Match does not list"),
        )
        .with_etag(version);
    }
    if c.if_none_match
        .is_some_and(|v| parse_tags(v).matches(version))
    {
        return Response {
            status: 304,
            body: String::new(),
            ..r
        };
    }
    r
}

/// Answers one request: reads from `snapshot` (the caller's fresh view),
/// writes through `store`.
pub fn handle(
    req: &Request<'_>,
    store: &StateFile,
    snapshot: &Snapshot,
    opts: &WriteOptions,
) -> Response {
    let endpoint = match route(req.path) {
        Ok(e) => e,
        Err(r) => return r,
    };
    let write = match action(&endpoint, req.method) {
        Err(r) => return r,
        Ok(None) => {
            let r = read(&endpoint, req.json, store, snapshot, req.name_status)
                .with_etag(snapshot.version);
            return conditional_read(&req.preconditions, r, snapshot.version);
        }
        Ok(Some(w)) => w,
    };
    let body = match std::str::from_utf8(req.body) {
        Ok(b) => b,
        Err(e) => {
            return Response::text(
                400,
                format!("body is not UTF-8 text (byte {})", e.valid_up_to()),
            );
        }
    };
    let guard = match write_guard(&req.preconditions) {
        Ok(g) => g,
        Err(r) => return r,
    };
    let opts = WriteOptions {
        expect: guard.expect,
        ..*opts
    };
    let written = store.write(&opts, |t| {
        if let Some(wanted) = guard.exists.filter(|w| endpoint.exists(t) != *w) {
            let header = if wanted { "If-Match" } else { "If-None-Match" };
            return Err(Error::PreconditionFailed(format!(
                "{header}: * does not hold: {} {}: nothing changed",
                req.path.split_once('?').map_or(req.path, |(p, _)| p),
                if wanted { "does not exist" } else { "exists" }
            )));
        }
        change(&write, body, t)?;
        if let Some(answers) = req.answers {
            ops::resolve_names(t, answers)?;
        }
        Ok(())
    });
    match written {
        Ok((version, ())) => Response::text(200, "success").with_etag(version),
        Err(e) => Response::error(&e),
    }
}

/// The table a write request would leave, tried on `table` (a copy of the
/// current one): what it asks of the DNS before its turn, as its new
/// `server NAME` lines. `None` for a read, a bad request, or a refusal.
pub fn planned(req: &Request<'_>, table: &Table) -> Option<Table> {
    let endpoint = route(req.path).ok()?;
    let Ok(Some(write)) = action(&endpoint, req.method) else {
        return None;
    };
    let body = std::str::from_utf8(req.body).ok()?;
    let mut t = table.clone();
    change(&write, body, &mut t).ok()?;
    Some(t)
}

/// The writes the endpoints take (upstream name, then server as sent):
/// only these reach [`change`], so a read-only endpoint cannot be written.
enum Write<'e> {
    PostUpstream(&'e str),
    DeleteUpstream(&'e str),
    PostServer(&'e str),
    PatchServer(&'e str, &'e str),
    DeleteServer(&'e str, &'e str),
}

/// The write `method` asks of `endpoint`; `None` for a read; a 405
/// naming the methods it takes (in `Allow` too) for any other.
fn action<'e>(endpoint: &'e Endpoint, method: &str) -> Result<Option<Write<'e>>, Response> {
    if matches!(method, "GET" | "HEAD") {
        return Ok(None);
    }
    let write = match (endpoint, method) {
        (Endpoint::Upstream(name), "POST") => Some(Write::PostUpstream(name)),
        (Endpoint::Upstream(name), "DELETE") => Some(Write::DeleteUpstream(name)),
        (Endpoint::Servers(name), "POST") => Some(Write::PostServer(name)),
        (Endpoint::Server(name, addr), "PATCH") => Some(Write::PatchServer(name, addr)),
        (Endpoint::Server(name, addr), "DELETE") => Some(Write::DeleteServer(name, addr)),
        _ => None,
    };
    write.map(Some).ok_or_else(|| {
        let allow = match endpoint {
            Endpoint::List | Endpoint::Detail | Endpoint::Workers => "GET, HEAD",
            Endpoint::Upstream(_) => "GET, HEAD, POST, DELETE",
            Endpoint::Servers(_) => "GET, HEAD, POST",
            Endpoint::Server(..) => "GET, HEAD, PATCH, DELETE",
        };
        let mut r = Response::text(
            405,
            format!("method {method} is not allowed here: use {allow}"),
        );
        r.allow = Some(allow);
        r
    })
}

/// The change a write request asks for.
fn change(write: &Write<'_>, body: &str, t: &mut Table) -> crate::Result<()> {
    match *write {
        Write::PostUpstream(name) => ops::update(t, name, body),
        Write::DeleteUpstream(name) => ops::delete(t, name),
        Write::PostServer(name) => ops::insert_server(t, name, body),
        Write::PatchServer(name, addr) => {
            let patch = parse_server_patch(body).map_err(Error::BadRequest)?;
            ops::patch_server(t, name, addr, &patch)
        }
        Write::DeleteServer(name, addr) => ops::delete_server(t, name, addr),
    }
}

mod views;

#[cfg(test)]
mod tests;
