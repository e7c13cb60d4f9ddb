//! The REST interface's tests: requests against a state file of their own,
//! checked by status, headers and body. Over 600 lines: one interface, whose
//! cases read best side by side.

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
        answers: None,
        name_status: &[],
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
            "hash $uri; server 127.0.0.1:1 slow_start=1s; server 127.0.0.1:2;",
            400,
            "balancing method \"hash\" does not support parameter \"slow_start\" (server 127.0.0.1:1)",
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

/// What the planning before a write's turn (the DNS lookups) tries: only
/// the writes an endpoint takes, never one on a read-only endpoint (a
/// POST /list once reached the write code there and panicked the worker).
#[test]
fn only_the_writes_an_endpoint_takes_are_planned() {
    let f = fixture("planned");
    let table = f.store.read().unwrap().table.clone();
    let plan = |method: &str, path: &str, body: &str| {
        let req = Request {
            method,
            path,
            body: body.as_bytes(),
            json: false,
            preconditions: Preconditions::default(),
            answers: None,
            name_status: &[],
        };
        planned(&req, &table)
    };
    for path in ["/list", "/detail"] {
        for method in [
            "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "PROPFIND", "FOO",
        ] {
            assert!(plan(method, path, "").is_none(), "{method} {path}");
            let r = call(&f, method, path, "");
            assert_eq!(r.status, 405, "{method} {path}: {r:?}");
            assert_eq!(r.allow, Some("GET, HEAD"), "{method} {path}");
        }
    }
    for (method, path) in [
        ("PUT", "/upstream/host1"),
        ("PATCH", "/upstream/host1"),
        ("DELETE", "/upstream/host1/servers"),
        ("POST", "/upstream/host1/servers/127.0.0.1:8088"),
        ("GET", "/upstream/host1"),
        ("HEAD", "/upstream/host1"),
    ] {
        assert!(
            plan(method, path, "server 127.0.0.1:1;").is_none(),
            "{method} {path}"
        );
    }
    let added = plan("POST", "/upstream/host1/servers", "app.internal:8080").unwrap();
    assert_eq!(
        added.get("host1").unwrap().names[0].target(),
        "app.internal:8080"
    );
    let replaced = plan("POST", "/upstream/x", "server app.internal resolve;").unwrap();
    assert!(replaced.get("x").unwrap().has_pending());
    assert!(plan("DELETE", "/upstream/host2", "")
        .unwrap()
        .get("host2")
        .is_none());
    assert_eq!(f.store.read().unwrap().version, 1, "planning wrote");
}

/// PATCH changes one address: a host name there is a bad server, as any
/// other server PATCH cannot take (a name's addresses come from its
/// answers), and nothing changes.
#[test]
fn a_patch_of_a_host_name_is_a_bad_server() {
    let f = fixture("patch-name");
    for target in ["junk", "app.internal:8080"] {
        let r = call(
            &f,
            "PATCH",
            &format!("/upstream/host1/servers/{target}"),
            "weight=5",
        );
        assert_eq!(r.status, 400, "{target}: {r:?}");
        assert!(r.body.starts_with("bad server: "), "{target}: {}", r.body);
        assert!(r.body.contains(target), "{target}: {}", r.body);
    }
    assert_eq!(f.store.read().unwrap().version, 1);
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
        "server 127.0.0.1:8088 weight=2 max_conns=9 max_fails=3 fail_timeout=4s slow_start=20s backup;\
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
            r#""fail_timeout":4,"slow_start":20,"backup":true,"down":false,"#,
            r#""active":0,"shared":true,"state":"up","stats":"#,
            r#"{"downtime":0,"fails":0,"health_checks":{"checks":0,"fails":0,"unhealthy":0},"#,
            r#""requests":0,"response_time":{"buckets_ms":[5,10,25,50,100,250,500,1000,2500,5000,10000],"#,
            r#""count":0,"counts":[0,0,0,0,0,0,0,0,0,0,0,0],"sum_us":0},"#,
            r#""responses":{"1xx":0,"2xx":0,"3xx":0,"4xx":0,"5xx":0},"unavail":0}},"#,
            r#"{"addr":"127.0.0.1:8089","weight":1,"max_conns":0,"max_fails":1,"fail_timeout":10,"#,
            r#""slow_start":0,"backup":false,"down":false,"#,
            // New under `check ... default_down=true`: not up yet.
            r#""active":0,"shared":true,"state":"checking","stats":"#,
            r#"{"downtime":0,"fails":0,"health_checks":{"checks":0,"fails":0,"unhealthy":0},"#,
            r#""requests":0,"response_time":{"buckets_ms":[5,10,25,50,100,250,500,1000,2500,5000,10000],"#,
            r#""count":0,"counts":[0,0,0,0,0,0,0,0,0,0,0,0],"sum_us":0},"#,
            r#""responses":{"1xx":0,"2xx":0,"3xx":0,"4xx":0,"5xx":0},"unavail":0}}]}"#
        )
    );
    // The text form: the settings in nginx syntax, each on its line.
    assert_eq!(
        call(&f, "GET", "/upstream/host1", "").body,
        "check interval=3000 rise=2 fall=5 timeout=1000 type=http;\n\
             check_http_send \"HEAD / HTTP/1.1\\r\\nHost: \\\"x\\\"\\r\\n\\r\\n\";\n\
             server 127.0.0.1:8088 weight=2 max_conns=9 max_fails=3 fail_timeout=4s slow_start=20s backup\n\
             server 127.0.0.1:8089\n"
    );
    let r = call_with(&f, "GET", "/list", "", true, None);
    assert_eq!(r.body, r#"{"version":2,"upstreams":["host1","host2"]}"#);
    let v: serde_json::Value =
        serde_json::from_str(&call_with(&f, "GET", "/detail", "", true, None).body).unwrap();
    assert_eq!(v["upstreams"][1]["servers"][0]["addr"], "127.0.0.1:8089");
    assert_eq!(v["upstreams"][1]["servers"][0]["state"], "up");
    assert_eq!(v["upstreams"][0]["servers"][1]["state"], "checking");
}

#[test]
fn workers_lists_the_live_workers_and_the_tables_statistics() {
    let f = fixture("workers");
    let i = f.store.register_worker(std::process::id()).unwrap();
    f.store.count_balanced(i);
    f.store.count_balanced(i);
    assert_eq!(
        call(&f, "POST", "/upstream/host3", "server 127.0.0.1:1;").status,
        200
    );
    assert_eq!(
        call(&f, "POST", "/upstream/host3", "server bad").status,
        400
    );
    assert_eq!(call(&f, "DELETE", "/upstream/nope", "").status, 404);
    let r = call(&f, "GET", "/workers", "");
    assert!(r.json && r.status == 200, "{r:?}");
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["version"], 2);
    let me = &v["workers"][0];
    assert_eq!(me["pid"], std::process::id());
    assert_eq!(me["requests"], 2);
    let t = &v["table"];
    assert_eq!(t["version"], 2);
    assert_eq!(t["writes_accepted"], 1);
    assert_eq!(t["writes_refused"]["bad_request"], 1);
    assert_eq!(t["writes_refused"]["not_found"], 1);
    assert_eq!(t["cells_used"], 3);
    assert!(t["bytes_used"].as_u64().unwrap() > 0);
    assert!(t["bytes_used"].as_u64() < t["bytes_capacity"].as_u64());
    assert_eq!(t["write_back_error"], serde_json::Value::Null);
    assert_eq!(call(&f, "POST", "/workers", "").status, 405);
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
        answers: None,
        name_status: &[],
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
