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

use serde::Serialize;

use crate::model::{check_name, ServerSpec, Table, Upstream};
use crate::ops;
use crate::store::{Snapshot, StateFile, WriteOptions};
use crate::syntax::{parse_server_patch, render_server, setting_lines};
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
    Upstream(String),
    Servers(String),
    Server(String, String),
}

impl Endpoint {
    /// Whether a GET of the endpoint would find something: what
    /// `If-None-Match: *` and `If-Match: *` ask of a write.
    fn exists(&self, t: &Table) -> bool {
        match self {
            Endpoint::List | Endpoint::Detail => true,
            Endpoint::Upstream(name) | Endpoint::Servers(name) => t.get(name).is_some(),
            Endpoint::Server(name, addr) => crate::syntax::parse_address(addr)
                .ok()
                .zip(t.get(name))
                .is_some_and(|(a, u)| u.server(&a).is_some()),
        }
    }
}

const USAGE: &str =
    "no such endpoint: use /list, /detail, /upstream/NAME or /upstream/NAME/servers[/ADDR]";

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
    let (allow, reading) = match endpoint {
        Endpoint::List | Endpoint::Detail => ("GET, HEAD", matches!(req.method, "GET" | "HEAD")),
        Endpoint::Upstream(_) => (
            "GET, HEAD, POST, DELETE",
            matches!(req.method, "GET" | "HEAD"),
        ),
        Endpoint::Servers(_) => ("GET, HEAD, POST", matches!(req.method, "GET" | "HEAD")),
        Endpoint::Server(..) => (
            "GET, HEAD, PATCH, DELETE",
            matches!(req.method, "GET" | "HEAD"),
        ),
    };
    if !reading && !allow.split(", ").any(|m| m == req.method) {
        let mut r = Response::text(
            405,
            format!("method {} is not allowed here: use {allow}", req.method),
        );
        r.allow = Some(allow);
        return r;
    }
    if reading {
        let r = read(&endpoint, req.json, snapshot).with_etag(snapshot.version);
        return conditional_read(&req.preconditions, r, snapshot.version);
    }
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
        change(&endpoint, req.method, body, t)
    });
    match written {
        Ok((version, ())) => Response::text(200, "success").with_etag(version),
        Err(e) => Response::error(&e),
    }
}

/// The change a write request asks for.
fn change(endpoint: &Endpoint, method: &str, body: &str, t: &mut Table) -> crate::Result<()> {
    match (endpoint, method) {
        (Endpoint::Upstream(name), "POST") => ops::update(t, name, body),
        (Endpoint::Upstream(name), _) => ops::delete(t, name),
        (Endpoint::Servers(name), _) => ops::insert_server(t, name, body),
        (Endpoint::Server(name, addr), "PATCH") => {
            let patch = parse_server_patch(body).map_err(Error::BadRequest)?;
            ops::patch_server(t, name, addr, &patch)
        }
        (Endpoint::Server(name, addr), _) => ops::delete_server(t, name, addr),
        (Endpoint::List | Endpoint::Detail, _) => unreachable!("read-only endpoints"),
    }
}

fn read(endpoint: &Endpoint, json: bool, snap: &Snapshot) -> Response {
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
            if json {
                to_json(&One {
                    version: snap.version,
                    upstream: u,
                })
            } else {
                server_lines(u)
            }
        }),
        Endpoint::Server(name, addr) => found(name).and_then(|u| {
            let a = crate::syntax::parse_address(addr)
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

/// Its setting lines (balancing, keepalive, checks), if any, then its
/// `server` lines.
fn server_lines(u: &Upstream) -> String {
    setting_lines(u)
        .into_iter()
        .chain(u.servers.iter().map(server_line))
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
/// a unit and the flags as 0 or 1.
fn detail_line(s: &ServerSpec) -> String {
    format!(
        "server {} weight={} max_conns={} max_fails={} fail_timeout={} backup={} down={}",
        s.addr,
        s.weight,
        s.max_conns,
        s.max_fails,
        s.fail_timeout,
        u8::from(s.backup),
        u8::from(s.down)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TempDir;
    use std::sync::Arc;

    struct Fixture {
        _dir: TempDir,
        store: Arc<StateFile>,
    }

    fn fixture(_tag: &str) -> Fixture {
        let dir = TempDir::new();
        let store = dir.store(&[
            ("host1", "server 127.0.0.1:8088;"),
            ("host2", "server 127.0.0.1:8089;"),
        ]);
        Fixture { _dir: dir, store }
    }

    fn call(f: &Fixture, method: &str, path: &str, body: &str) -> Response {
        call_with(f, method, path, body, false, None)
    }

    fn call_with(
        f: &Fixture,
        method: &str,
        path: &str,
        body: &str,
        json: bool,
        if_match: Option<&str>,
    ) -> Response {
        let preconditions = Preconditions {
            if_match,
            ..Preconditions::default()
        };
        call_if(f, method, path, body, json, preconditions)
    }

    fn call_if(
        f: &Fixture,
        method: &str,
        path: &str,
        body: &str,
        json: bool,
        preconditions: Preconditions<'_>,
    ) -> Response {
        let snap = f.store.read().unwrap();
        let req = Request {
            method,
            path,
            body: body.as_bytes(),
            json,
            preconditions,
        };
        handle(&req, &f.store, &snap, &WriteOptions::default())
    }

    #[test]
    fn the_source_documents_transcript_replays() {
        let f = fixture("transcript");
        let r = call(
            &f,
            "POST",
            "/upstream/dyhost",
            "server 127.0.0.1:8089;server 127.0.0.1:8088;",
        );
        assert_eq!((r.status, r.body.as_str()), (200, "success"));
        let r = call(&f, "GET", "/detail", "");
        let line = |port| {
            format!("server 127.0.0.1:{port} weight=1 max_conns=0 max_fails=1 fail_timeout=10 backup=0 down=0\n")
        };
        assert_eq!(
            r.body,
            format!(
                "host1\n{}\nhost2\n{}\ndyhost\n{}{}\n",
                line(8088),
                line(8089),
                line(8089),
                line(8088)
            )
        );
        let r = call(&f, "DELETE", "/upstream/dyhost", "");
        assert_eq!((r.status, r.body.as_str()), (200, "success"));
        assert_eq!(
            call(&f, "GET", "/detail", "").body,
            format!("host1\n{}\nhost2\n{}\n", line(8088), line(8089))
        );
        assert_eq!(call(&f, "GET", "/list", "").body, "host1\nhost2\n");
    }

    #[test]
    fn detail_gives_every_parameter_as_the_module_does() {
        let f = fixture("detail");
        let r = call(
            &f,
            "POST",
            "/upstream/host1",
            "server 127.0.0.1:8088 weight=3 max_conns=10 max_fails=2 fail_timeout=1m30s down;\
             server [::1]:81 backup; server unix:/run/a.sock; ip_hash;",
        );
        assert_eq!(r.status, 400, "ip_hash refuses backup: {r:?}");
        call(
            &f,
            "POST",
            "/upstream/host1",
            "server 127.0.0.1:8088 weight=3 max_conns=10 max_fails=2 fail_timeout=1m30s down;\
             server [::1]:81 backup; server unix:/run/a.sock; least_conn; check interval=1000;",
        );
        assert_eq!(
            call(&f, "GET", "/detail", "").body,
            "host1\n\
             server 127.0.0.1:8088 weight=3 max_conns=10 max_fails=2 fail_timeout=90 backup=0 down=1\n\
             server [::1]:81 weight=1 max_conns=0 max_fails=1 fail_timeout=10 backup=1 down=0\n\
             server unix:/run/a.sock weight=1 max_conns=0 max_fails=1 fail_timeout=10 backup=0 down=0\n\
             \n\
             host2\n\
             server 127.0.0.1:8089 weight=1 max_conns=0 max_fails=1 fail_timeout=10 backup=0 down=0\n\
             \n"
        );
        // What a script copies from /detail goes back in a body, backup= and
        // down= aside (nginx takes them bare).
        let copied = "server 127.0.0.1:9000 weight=3 max_conns=10 max_fails=2 fail_timeout=90;";
        let r = call(&f, "POST", "/upstream/copy", copied);
        assert_eq!((r.status, r.body.as_str()), (200, "success"));
        let v: serde_json::Value =
            serde_json::from_str(&call_with(&f, "GET", "/detail", "", true, None).body).unwrap();
        assert_eq!(v["upstreams"][0]["policy"], "least_conn;");
        assert_eq!(v["upstreams"][0]["check"]["interval"], 1000);
        assert_eq!(v["upstreams"][0]["servers"][0]["max_conns"], 10);
    }

    #[test]
    fn upstream_names_are_found_in_any_case() {
        let f = fixture("case");
        let r = call(&f, "POST", "/upstream/Foo.Example", "server 127.0.0.1:1;");
        assert_eq!(r.status, 200);
        assert_eq!(
            call(&f, "GET", "/upstream/foo.example", "").body,
            "server 127.0.0.1:1\n"
        );
        assert_eq!(
            call(&f, "POST", "/upstream/FOO.EXAMPLE/servers", "127.0.0.1:2").status,
            200
        );
        assert_eq!(
            call(&f, "GET", "/upstream/foo.example/servers/127.0.0.1:2", "").status,
            200
        );
        // Shown as it was first spelled.
        assert_eq!(
            call(&f, "GET", "/list", "").body,
            "host1\nhost2\nFoo.Example\n"
        );
        assert_eq!(call(&f, "DELETE", "/upstream/foo.EXAMPLE", "").status, 200);
        assert_eq!(call(&f, "GET", "/upstream/Foo.Example", "").status, 404);
    }

    #[test]
    fn empty_table_lists_as_204() {
        let f = fixture("empty");
        call(&f, "DELETE", "/upstream/host1", "");
        call(&f, "DELETE", "/upstream/host2", "");
        for p in ["/list", "/detail"] {
            let r = call(&f, "GET", p, "");
            assert_eq!((r.status, r.body.as_str()), (204, ""));
        }
        let r = call_with(&f, "GET", "/list", "", true, None);
        assert_eq!(r.body, r#"{"version":3,"upstreams":[]}"#);
    }

    #[test]
    fn statuses_follow_the_module() {
        let f = fixture("statuses");
        let cases = [
            ("GET", "/upstream/host1", "", 200, "server 127.0.0.1:8088\n"),
            ("GET", "/upstream/nope", "", 404, "upstream nope not found"),
            (
                "DELETE",
                "/upstream/nope",
                "",
                404,
                "upstream nope not found",
            ),
            ("POST", "/upstream/x", "", 400, "no server"),
            (
                "POST",
                "/upstream/x",
                "server 127.0.0.1:1 slow_start=1s;",
                400,
                "slow_start",
            ),
            (
                "POST",
                "/upstream/bad!name",
                "server 127.0.0.1:1;",
                400,
                "'!'",
            ),
            (
                "PUT",
                "/upstream/host1",
                "",
                405,
                "use GET, HEAD, POST, DELETE",
            ),
            ("POST", "/list", "", 405, "use GET, HEAD"),
            ("GET", "/nothing", "", 404, "no such endpoint"),
            ("GET", "/upstream/host1/other", "", 404, "no such endpoint"),
        ];
        for (method, path, body, status, text) in cases {
            let r = call(&f, method, path, body);
            assert_eq!(r.status, status, "{method} {path}: {r:?}");
            assert!(
                r.body.contains(text),
                "{method} {path}: {:?} lacks {text:?}",
                r.body
            );
        }
        assert_eq!(
            call(&f, "PUT", "/upstream/host1", "").allow,
            Some("GET, HEAD, POST, DELETE")
        );
        assert_eq!(
            f.store.read().unwrap().version,
            1,
            "a failed request changed the table"
        );
    }

    #[test]
    fn one_server_at_a_time() {
        let f = fixture("servers");
        assert_eq!(
            call(
                &f,
                "POST",
                "/upstream/host1/servers",
                "127.0.0.1:9000 weight=3"
            )
            .status,
            200
        );
        assert_eq!(
            call(
                &f,
                "POST",
                "/upstream/host1/servers",
                "server 127.0.0.1:9001;"
            )
            .status,
            200
        );
        assert_eq!(
            call(&f, "POST", "/upstream/host1/servers", "127.0.0.1:9001").status,
            400
        );
        let r = call(
            &f,
            "PATCH",
            "/upstream/host1/servers/127.0.0.1:9000",
            "weight=5 backup",
        );
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(
            call(&f, "GET", "/upstream/host1/servers/127.0.0.1:9000", "").body,
            "server 127.0.0.1:9000 weight=5 backup\n"
        );
        assert_eq!(
            call(
                &f,
                "PATCH",
                "/upstream/host1/servers/127.0.0.1:9000",
                "colour=red"
            )
            .status,
            400
        );
        assert_eq!(
            call(&f, "DELETE", "/upstream/host1/servers/127.0.0.1:9001", "").status,
            200
        );
        assert_eq!(
            call(&f, "DELETE", "/upstream/host1/servers/127.0.0.1:9001", "").status,
            404
        );
        assert_eq!(
            call(&f, "DELETE", "/upstream/host2/servers/127.0.0.1:8089", "").status,
            400
        );
        let r = call(
            &f,
            "PATCH",
            "/upstream/host2/servers/127.0.0.1:8089",
            "down",
        );
        assert!(r.body.contains("last available server"), "{r:?}");
        assert_eq!(
            call(&f, "GET", "/upstream/host1", "").body,
            "server 127.0.0.1:8088\nserver 127.0.0.1:9000 weight=5 backup\n"
        );
    }

    #[test]
    fn etag_and_if_match_guard_writes() {
        let f = fixture("etag");
        let r = call(&f, "GET", "/upstream/host1", "");
        assert_eq!(r.etag, Some(1));
        let r = call_with(
            &f,
            "POST",
            "/upstream/host3",
            "server 127.0.0.1:1;",
            false,
            Some("\"1\""),
        );
        assert_eq!((r.status, r.etag), (200, Some(2)));
        let r = call_with(
            &f,
            "POST",
            "/upstream/host4",
            "server 127.0.0.1:1;",
            false,
            Some("\"1\""),
        );
        assert_eq!(r.status, 412, "{r:?}");
        assert_eq!(
            call_with(&f, "DELETE", "/upstream/host3", "", false, Some("garbage")).status,
            412
        );
        assert!(f.store.read().unwrap().table.get("host4").is_none());
        assert_eq!(
            call_with(&f, "DELETE", "/upstream/host3", "", false, Some("W/\"2\"")).status,
            200
        );
    }

    #[test]
    fn json_views_give_every_parameter() {
        let f = fixture("json");
        let r = call(
            &f,
            "POST",
            "/upstream/host1",
            "server 127.0.0.1:8088 weight=2 max_conns=9 max_fails=3 fail_timeout=4s backup;\
             server 127.0.0.1:8089; check interval=3s type=http;\
             check_http_send \"HEAD / HTTP/1.1\\r\\nHost: \\\"x\\\"\\r\\n\\r\\n\";",
        );
        assert_eq!(r.status, 200, "{r:?}");
        let r = call_with(&f, "GET", "/upstream/host1", "", true, None);
        assert!(r.json);
        assert_eq!(
            r.body,
            concat!(
                r#"{"version":2,"name":"host1","keepalive_requests":1000,"keepalive_time":3600000,"#,
                r#""keepalive_timeout":60000,"check":{"interval":3000,"rise":2,"fall":5,"#,
                r#""timeout":1000,"default_down":true,"type":"http","port":0,"jitter":0},"#,
                r#""check_http_send":"HEAD / HTTP/1.1\r\nHost: \"x\"\r\n\r\n","#,
                r#""check_http_expect_alive":["http_2xx","http_3xx"],"check_keepalive_requests":1,"#,
                r#""servers":[{"addr":"127.0.0.1:8088","weight":2,"max_conns":9,"max_fails":3,"#,
                r#""fail_timeout":4,"backup":true,"down":false},{"addr":"127.0.0.1:8089","#,
                r#""weight":1,"max_conns":0,"max_fails":1,"fail_timeout":10,"backup":false,"down":false}]}"#
            )
        );
        // The text form: the settings in nginx syntax, each on its line.
        assert_eq!(
            call(&f, "GET", "/upstream/host1", "").body,
            "check interval=3000 rise=2 fall=5 timeout=1000 type=http;\n\
             check_http_send \"HEAD / HTTP/1.1\\r\\nHost: \\\"x\\\"\\r\\n\\r\\n\";\n\
             server 127.0.0.1:8088 weight=2 max_conns=9 max_fails=3 fail_timeout=4s backup\n\
             server 127.0.0.1:8089\n"
        );
        let r = call_with(&f, "GET", "/list", "", true, None);
        assert_eq!(r.body, r#"{"version":2,"upstreams":["host1","host2"]}"#);
        let v: serde_json::Value =
            serde_json::from_str(&call_with(&f, "GET", "/detail", "", true, None).body).unwrap();
        assert_eq!(v["upstreams"][1]["servers"][0]["addr"], "127.0.0.1:8089");
    }

    #[test]
    fn a_body_that_is_not_utf8_is_refused() {
        let f = fixture("utf8");
        let snap = f.store.read().unwrap();
        let req = Request {
            method: "POST",
            path: "/upstream/x",
            body: b"server 127.0.0.1:1;\xff",
            json: false,
            preconditions: Preconditions::default(),
        };
        assert_eq!(
            handle(&req, &f.store, &snap, &WriteOptions::default()).status,
            400
        );
    }

    fn servers_of(f: &Fixture, name: &str) -> Vec<String> {
        let snap = f.store.read().unwrap();
        snap.table
            .get(name)
            .map(|u| u.servers.iter().map(|s| s.addr.to_string()).collect())
            .unwrap_or_default()
    }

    #[test]
    fn an_encoded_slash_is_part_of_a_name_not_a_separator() {
        let f = fixture("slash");
        let v = f.store.read().unwrap().version;
        let cases = [
            ("POST", "/upstream/host1%2Fservers", "127.0.0.1:9"),
            ("POST", "/upstream/host1%2fservers", "127.0.0.1:9"),
            ("DELETE", "/upstream/host1%2Fservers%2F127.0.0.1:8088", ""),
            (
                "PATCH",
                "/upstream/host1%2Fservers%2F127.0.0.1:8088",
                "down",
            ),
            ("POST", "/upstream/h16%2F..%2Fhost1", "server 127.0.0.1:9;"),
            ("DELETE", "/upstream/h16%2F..%2Fhost1", ""),
            ("GET", "/upstream/h16%2F..%2Fhost1", ""),
        ];
        for (method, path, body) in cases {
            let r = call(&f, method, path, body);
            assert_eq!(r.status, 400, "{method} {path}: {r:?}");
            assert!(r.body.contains("'/'"), "{method} {path}: {r:?}");
        }
        assert_eq!(servers_of(&f, "host1"), ["127.0.0.1:8088"]);
        assert_eq!(
            f.store.read().unwrap().version,
            v,
            "a refused request wrote"
        );
    }

    #[test]
    fn paths_are_routed_as_sent() {
        let f = fixture("raw");
        let cases = [
            // nginx would resolve these to /upstream/host2 or /list.
            ("DELETE", "/upstream/x/../host2", 400, "'..' segment"),
            ("DELETE", "/upstream/./host2", 400, "'.' or '..'"),
            (
                "DELETE",
                "/upstream/host1/servers/x/../../../host2",
                400,
                "'..'",
            ),
            // A name spelled with escapes hides it from a reader of the path.
            (
                "DELETE",
                "/upstream/host%32",
                400,
                "percent-encoded: send it as host2",
            ),
            ("DELETE", "/%75pstream/host2", 404, "no such endpoint"),
            ("DELETE", "/upstream/host2%", 400, "not a %XX escape"),
            ("DELETE", "/upstream/host2%+f", 400, "not a %XX escape"),
            ("DELETE", "/upstream/%2E%2E", 400, "only dots"),
            ("DELETE", "/upstream/caf%C3%A9", 400, "only letters"),
            ("DELETE", "/upstream/a%FFb", 400, "only letters"),
            ("DELETE", "/upstream//servers", 400, "empty"),
        ];
        for (method, path, status, text) in cases {
            let r = call(&f, method, path, "");
            assert_eq!(r.status, status, "{method} {path}: {r:?}");
            assert!(
                r.body.contains(text),
                "{method} {path}: {r:?} lacks {text:?}"
            );
        }
        assert!(f.store.read().unwrap().table.get("host2").is_some());
        // The address is decoded once; the query is not part of the path.
        call(&f, "POST", "/upstream/host1/servers", "unix:/run/a.sock");
        let r = call(
            &f,
            "GET",
            "/upstream/host1/servers/unix:%2Frun%2Fa.sock?x=/../",
            "",
        );
        assert_eq!(
            (r.status, r.body.as_str()),
            (200, "server unix:/run/a.sock\n")
        );
        let r = call(&f, "DELETE", "/upstream/host1/servers/unix:/run/a.sock", "");
        assert_eq!(r.status, 200, "{r:?}");
    }

    #[test]
    fn every_precondition_of_a_write_is_checked_before_it_or_refused() {
        let f = fixture("conditions");
        let v = f.store.read().unwrap().version;
        let tag = format!("\"{v}\"");
        let date = "Thu, 01 Jan 1970 00:00:00 GMT";
        let with = |if_match, if_none_match, if_unmodified_since| Preconditions {
            if_match,
            if_none_match,
            if_unmodified_since,
            if_modified_since: None,
        };
        let refused = [
            (
                with(None, Some("*"), None),
                412,
                "If-None-Match: * does not hold",
            ),
            (
                with(None, Some(&tag), None),
                400,
                "If-None-Match with a version",
            ),
            (
                with(None, None, Some(date)),
                400,
                "If-Unmodified-Since cannot guard",
            ),
            (
                with(Some("\"1\", \"2\""), None, None),
                400,
                "several versions",
            ),
            (
                with(Some("nonsense"), None, None),
                412,
                "not a table version",
            ),
            (with(Some("*"), Some("*"), None), 400, "can never hold"),
        ];
        for (c, status, text) in refused {
            let r = call_if(
                &f,
                "POST",
                "/upstream/host1",
                "server 127.0.0.1:7;",
                false,
                c,
            );
            assert_eq!(r.status, status, "{c:?}: {r:?}");
            assert!(r.body.contains(text), "{c:?}: {r:?} lacks {text:?}");
        }
        let r = call_if(
            &f,
            "DELETE",
            "/upstream/nope",
            "",
            false,
            with(Some("*"), None, None),
        );
        assert_eq!(r.status, 412, "{r:?}");
        assert_eq!(
            f.store.read().unwrap().version,
            v,
            "a refused write changed the table"
        );
        assert_eq!(servers_of(&f, "host1"), ["127.0.0.1:8088"]);

        // The ones that hold: create only, replace only, If-Match governs
        // If-Unmodified-Since.
        let c = with(None, Some("*"), None);
        let r = call_if(
            &f,
            "POST",
            "/upstream/host3",
            "server 127.0.0.1:7;",
            false,
            c,
        );
        assert_eq!((r.status, r.etag), (200, Some(v + 1)), "{r:?}");
        let c = with(Some("*"), None, None);
        let r = call_if(
            &f,
            "POST",
            "/upstream/host3",
            "server 127.0.0.1:8;",
            false,
            c,
        );
        assert_eq!((r.status, r.etag), (200, Some(v + 2)), "{r:?}");
        let tag = format!("W/\"{}\"", v + 2);
        let c = with(Some(&tag), None, Some(date));
        let r = call_if(&f, "DELETE", "/upstream/host3", "", false, c);
        assert_eq!((r.status, r.etag), (200, Some(v + 3)), "{r:?}");
        // If-Modified-Since has no meaning on a write.
        let c = Preconditions {
            if_modified_since: Some(date),
            ..Preconditions::default()
        };
        assert_eq!(
            call_if(
                &f,
                "POST",
                "/upstream/host3",
                "server 127.0.0.1:8;",
                false,
                c
            )
            .status,
            200
        );
    }

    #[test]
    fn reads_answer_304_and_412_by_the_table_version() {
        let f = fixture("conditional reads");
        let v = f.store.read().unwrap().version;
        let tag = format!("\"{v}\"");
        let read = |c| call_if(&f, "GET", "/upstream/host1", "", false, c);
        let r = read(Preconditions {
            if_none_match: Some(&tag),
            ..Preconditions::default()
        });
        assert_eq!((r.status, r.body.as_str(), r.etag), (304, "", Some(v)));
        let r = read(Preconditions {
            if_none_match: Some("\"0\", *"),
            ..Preconditions::default()
        });
        assert_eq!(r.status, 200, "{r:?}");
        let r = read(Preconditions {
            if_match: Some("\"0\""),
            ..Preconditions::default()
        });
        assert_eq!((r.status, r.etag), (412, Some(v)));
        let r = read(Preconditions {
            if_unmodified_since: Some("Thu, 01 Jan 1970 00:00:00 GMT"),
            ..Preconditions::default()
        });
        assert_eq!(r.status, 200, "{r:?}");
        // Only a 2xx answer is conditional.
        let r = call_if(
            &f,
            "GET",
            "/upstream/nope",
            "",
            false,
            Preconditions {
                if_match: Some("\"0\""),
                ..Preconditions::default()
            },
        );
        assert_eq!(r.status, 404);
    }
}
