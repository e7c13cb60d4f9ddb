//! The REST interface of ngx_http_dyups_module (`/list`, `/detail`,
//! `/upstream/NAME`), with its bodies and status codes, plus what its users
//! asked for: per-server changes (`/upstream/NAME/servers[/ADDR]`), JSON
//! views for programs, and the table version as an `ETag` that `If-Match`
//! checks, so a read-decide-write cycle cannot lose another writer's change.

use serde::Serialize;

use crate::model::{ServerSpec, Table, Upstream};
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
    /// The normalised, decoded URI path (nginx's `$uri`).
    pub path: &'a str,
    pub body: &'a [u8],
    /// `Accept: application/json` or `?format=json`.
    pub json: bool,
    pub if_match: Option<&'a str>,
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

/// The endpoints, parsed from the path.
enum Endpoint<'a> {
    List,
    Detail,
    Upstream(&'a str),
    Servers(&'a str),
    Server(&'a str, &'a str),
}

const USAGE: &str =
    "no such endpoint: use /list, /detail, /upstream/NAME or /upstream/NAME/servers[/ADDR]";

fn route(path: &str) -> Option<Endpoint<'_>> {
    let rest = path.strip_prefix('/')?;
    match rest {
        "list" => return Some(Endpoint::List),
        "detail" => return Some(Endpoint::Detail),
        _ => {}
    }
    let rest = rest.strip_prefix("upstream/")?;
    match rest.split_once('/') {
        None => Some(Endpoint::Upstream(rest)),
        Some((name, "servers")) => Some(Endpoint::Servers(name)),
        // Everything after `servers/` is the address: `unix:/path` has slashes.
        Some((name, more)) => more
            .strip_prefix("servers/")
            .filter(|a| !a.is_empty())
            .map(|addr| Endpoint::Server(name, addr)),
    }
}

/// Answers one request: reads from `snapshot` (the caller's fresh view),
/// writes through `store`.
pub fn handle(
    req: &Request<'_>,
    store: &StateFile,
    snapshot: &Snapshot,
    opts: &WriteOptions,
) -> Response {
    let Some(endpoint) = route(req.path) else {
        return Response::text(404, USAGE);
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
        return read(&endpoint, req.json, snapshot).with_etag(snapshot.version);
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
    let expect = match req.if_match.map(parse_etag).transpose() {
        Ok(v) => v.flatten(),
        Err(why) => return Response::text(412, why),
    };
    let opts = WriteOptions { expect, ..*opts };
    let written = store.write(&opts, |t| match (&endpoint, req.method) {
        (Endpoint::Upstream(name), "POST") => ops::update(t, name, body),
        (Endpoint::Upstream(name), _) => ops::delete(t, name),
        (Endpoint::Servers(name), _) => ops::insert_server(t, name, body),
        (Endpoint::Server(name, addr), "PATCH") => {
            let patch = parse_server_patch(body).map_err(Error::BadRequest)?;
            ops::patch_server(t, name, addr, &patch)
        }
        (Endpoint::Server(name, addr), _) => ops::delete_server(t, name, addr),
        (Endpoint::List | Endpoint::Detail, _) => unreachable!("read-only endpoints"),
    });
    match written {
        Ok((version, ())) => Response::text(200, "success").with_etag(version),
        Err(e) => Response::error(&e),
    }
}

/// `If-Match: "12"` (also unquoted, or weak `W/"12"`); `*` matches any.
fn parse_etag(v: &str) -> Result<Option<u64>, String> {
    let v = v.trim();
    if v == "*" {
        return Ok(None);
    }
    let tag = v.strip_prefix("W/").unwrap_or(v).trim_matches('"');
    tag.parse()
        .map(Some)
        .map_err(|_| format!("If-Match {v:?} is not a table version this server gave as ETag"))
}

fn read(endpoint: &Endpoint<'_>, json: bool, snap: &Snapshot) -> Response {
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
        let snap = f.store.read().unwrap();
        let req = Request {
            method,
            path,
            body: body.as_bytes(),
            json,
            if_match,
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
            if_match: None,
        };
        assert_eq!(
            handle(&req, &f.store, &snap, &WriteOptions::default()).status,
            400
        );
    }
}
