//! The parser's tests, through its public functions and its error
//! messages. Over 600 lines: one parser, whose cases read best side by side.

use super::lexer::EXCERPT_MAX;
use super::*;
use crate::table::model::{FAIL_TIMEOUT_MAX, MAX_FAILS_MAX};
use crate::table::names::{NamedServer, ServerParams};

fn inet(s: &str) -> Address {
    Address::Inet(s.parse().unwrap())
}

fn bad(result: Result<impl std::fmt::Debug, Error>) -> String {
    match result {
        Err(Error::BadRequest(m)) => m,
        other => panic!("expected BadRequest, got {other:?}"),
    }
}

#[test]
fn a_hash_key_may_name_a_variable_in_braces_as_nginx_reads_it() {
    // The README's example: `${host}` ends the name where text follows it.
    let u = parse_body("u", "hash ${host}-x consistent; server 10.0.0.1:80;").unwrap();
    assert_eq!(u.policy.to_string(), "hash ${host}-x consistent;");
    let again = parse_body("u", &format!("{} server 10.0.0.1:80;", u.policy)).unwrap();
    assert_eq!(again.policy, u.policy);
    // Braces anywhere else stay refused: they would not read back the same.
    for (body, stray) in [
        ("hash ${}x; server 10.0.0.1;", "'}'"),
        ("hash ${host-x; server 10.0.0.1;", "'-'"),
        ("hash ${host; server 10.0.0.1;", "'{'"),
        ("hash a}b; server 10.0.0.1;", "'}'"),
    ] {
        let m = bad(parse_body("u", body));
        assert!(
            m.contains(&format!("invalid character {stray}")),
            "{body}: {m}"
        );
    }
}

#[test]
fn bodies_and_files_take_one_balancing_line_and_keepalive() {
    let u = parse_body("u", "ip_hash; server 10.0.0.1:80; keepalive 8;").unwrap();
    assert_eq!(
        (u.policy, u.keepalive, u.servers.len()),
        (Policy::IpHash, 8, 1)
    );
    let u = parse_body("u", "hash $request_uri consistent;server 10.0.0.1:80;").unwrap();
    assert_eq!(
        u.policy,
        Policy::Hash {
            key: "$request_uri".into(),
            consistent: true
        }
    );
    assert_eq!(
        parse_body("u", "random two; server 10.0.0.1;")
            .unwrap()
            .policy,
        Policy::Random { two: true }
    );
    assert_eq!(
        parse_body("u", "least_conn; server 10.0.0.1;")
            .unwrap()
            .policy,
        Policy::LeastConn
    );
    let m = bad(parse_body("u", "ip_hash;\nleast_conn;\nserver 10.0.0.1;"));
    assert_eq!(
        m,
        "line 2: least_conn: a balancing method is given twice, on line 1 and line 2"
    );
    let m = bad(parse_body("u", "ip_hash;\nserver 10.0.0.1 backup;"));
    assert!(
        m.contains("line 1: balancing method \"ip_hash\" does not support parameter \"backup\""),
        "{m}"
    );
    let m = bad(parse_body("u", "hash;server 10.0.0.1;"));
    assert!(m.contains("line 1: hash: bad arguments"), "{m}");
    let m = bad(parse_body("u", "random three;server 10.0.0.1;"));
    assert!(m.contains("bad arguments"), "{m}");
    let m = bad(parse_body("u", "keepalive 0;server 10.0.0.1;"));
    assert!(m.contains("keepalive must be 1..65535"), "{m}");

    let t = parse_upstream_file(
            "upstream a {\n  hash $arg_user$cookie_x;\n  server 10.0.0.1;\n  keepalive 32;\n  balancer_by_lua_file x.lua;\n}\n",
        )
        .unwrap();
    let a = t.get("a").unwrap();
    assert_eq!(a.policy.to_string(), "hash $arg_user$cookie_x;");
    assert_eq!(a.keepalive, 32);
    assert_eq!(
            render_upstream(a),
            "upstream a {\n    hash $arg_user$cookie_x;\n    keepalive 32;\n    server 10.0.0.1:80;\n}\n"
        );
    assert_eq!(parse_upstream_file(&render_upstream_file(&t)).unwrap(), t);
}

/// Every directive nginx's `upstream {}` takes (with lua-nginx-module
/// and nginx_upstream_check_module), in a body as in a file.
const EVERY_DIRECTIVE: &str = "zone backend 64k;\n\
         least_conn;\n\
         server 127.0.0.1:1 weight=2 max_conns=10 max_fails=3 fail_timeout=30s;\n\
         server 127.0.0.1:2 backup;\n\
         keepalive 16;\n\
         keepalive_requests 100;\n\
         keepalive_time 1h30m;\n\
         keepalive_timeout 75;\n\
         check interval=3000 rise=2 fall=5 timeout=1000 type=http default_down=false port=8080 jitter=500ms;\n\
         check_http_send \"GET /health HTTP/1.0\\r\\n\\r\\n\";\n\
         check_http_expect_alive http_2xx http_4xx;\n\
         check_keepalive_requests 10;\n\
         balancer_by_lua_file lua/upstream.lua;\n";

#[test]
fn bodies_and_files_take_every_directive_of_an_upstream_block() {
    let u = parse_body("u", EVERY_DIRECTIVE).unwrap();
    assert_eq!(u.policy, Policy::LeastConn);
    assert_eq!(u.servers[0].max_conns, 10);
    assert_eq!(
        (
            u.keepalive,
            u.keepalive_requests,
            u.keepalive_time,
            u.keepalive_timeout
        ),
        (16, 100, 5_400_000, 75_000)
    );
    assert_eq!(
        u.check.line,
        Some(CheckLine {
            interval: 3000,
            rise: 2,
            fall: 5,
            timeout: 1000,
            default_down: false,
            kind: CheckType::Http,
            port: 8080,
            jitter: 500,
        })
    );
    assert_eq!(u.check.http_send, "GET /health HTTP/1.0\r\n\r\n");
    assert_eq!(
        u.check.http_expect_alive.names().collect::<Vec<_>>(),
        ["http_2xx", "http_4xx"]
    );
    assert_eq!(u.check.keepalive_requests, 10);
    let file = format!("upstream u {{\n{EVERY_DIRECTIVE}}}\n");
    let t = parse_upstream_file(&file).unwrap();
    assert!(t.get("u").unwrap().same_content(&u));
    // Written back, every setting reads back the same.
    assert_eq!(parse_upstream_file(&render_upstream_file(&t)), Ok(t));
    // The balancer's Lua code is nginx.conf's: accepted, not kept.
    let u = parse_body(
        "u",
        "server 10.0.0.1; balancer_by_lua_block { local t = { } }",
    )
    .unwrap();
    assert_eq!(u.servers.len(), 1);
}

#[test]
fn the_source_documents_check_line_and_its_defaults() {
    let u = parse_body(
        "local",
        "server 192.168.56.101:8080;\nserver 192.168.56.101:8081 backup;\n\
             server 192.168.56.101:8082;\ncheck interval=3000 rise=2 fall=5 timeout=1000;",
    )
    .unwrap();
    let line = u.check.line.clone().unwrap();
    assert_eq!(
        line,
        CheckLine {
            interval: 3000,
            ..CheckLine::default()
        }
    );
    assert_eq!(
        render_check_line(&line),
        "check interval=3000 rise=2 fall=5 timeout=1000;"
    );
    // The module's defaults for what is not given.
    let d = parse_body("u", "server 10.0.0.1; check type=tcp;")
        .unwrap()
        .check;
    let line = d.line.unwrap();
    assert_eq!(
        (
            line.interval,
            line.rise,
            line.fall,
            line.timeout,
            line.default_down,
            line.port
        ),
        (30_000, 2, 5, 1000, true, 0)
    );
    assert_eq!(d.http_send, "GET / HTTP/1.0\r\n\r\n");
    assert_eq!(d.http_expect_alive, ExpectAlive::default());
    assert_eq!(d.keepalive_requests, 1);
    // Without a check line, no active checks.
    assert_eq!(
        parse_body("u", "server 10.0.0.1;").unwrap().check.line,
        None
    );
}

#[test]
fn check_times_are_milliseconds_or_nginx_times() {
    let interval = |v: &str| {
        parse_body("u", &format!("server 10.0.0.1; check interval={v};"))
            .map(|u| u.check.line.unwrap().interval)
    };
    for (v, ms) in [
        ("3000", 3000),
        ("3s", 3000),
        ("500ms", 500),
        ("1m", 60_000),
        ("1s500", 1500),
        ("1s500ms", 1500),
        ("1d", 86_400_000),
    ] {
        assert_eq!(interval(v), Ok(ms), "{v}");
    }
    for v in ["0", "0s", "1d1ms", "1y", "1M", "s", "1ms5", "-1", "3 s"] {
        assert!(interval(v).is_err(), "{v}");
    }
    assert!(bad(interval("0")).contains("interval=0: interval must be 1..86400000 milliseconds"));
}

#[test]
fn bad_check_lines_are_refused_naming_what_is_wrong() {
    let err = |line: &str| bad(parse_body("u", &format!("server 10.0.0.1;\n{line}")));
    let cases = [
        (
            "check interval=0;",
            "line 2: check interval=0: interval=0: interval must be 1..",
        ),
        ("check rise=0;", "rise=0: rise must be 1..1000"),
        ("check fall=0;", "fall=0: fall must be 1..1000"),
        ("check timeout=0;", "timeout=0: timeout must be 1.."),
        (
            "check interval=3000 colour=red;",
            "unknown check parameter \"colour=red\"",
        ),
        (
            "check interval=3000 fast;",
            "unknown check parameter \"fast\"",
        ),
        (
            "check type=mysql;",
            "type=mysql: check type \"mysql\" is not supported: use tcp, http, https or ssl_hello",
        ),
        (
            "check default_down=maybe;",
            "default_down=maybe: default_down must be true or false",
        ),
        ("check port=65536;", "port=65536: port must be 0..65535"),
        (
            "check rise=1 rise=2;",
            "rise=2: rise is given more than once",
        ),
        (
            "check;",
            "check: bad arguments: expected `check interval=MS",
        ),
        (
            "check_http_send;",
            "bad arguments: expected `check_http_send \"REQUEST\";`",
        ),
        ("check_http_send a b;", "bad arguments"),
        (
            "check_http_send \"\";",
            "check_http_send: the request is empty",
        ),
        (
            "check_http_expect_alive http_6xx;",
            "\"http_6xx\": check_http_expect_alive takes http_2xx",
        ),
        ("check_http_expect_alive;", "bad arguments"),
        (
            "check_keepalive_requests 0;",
            "check_keepalive_requests must be 1..1000000",
        ),
        (
            "check interval=1;\ncheck interval=2;",
            "line 3: check interval=2: check is given twice, on line 2 and line 3",
        ),
    ];
    for (line, want) in cases {
        let m = err(line);
        assert!(m.contains(want), "{line}: {m}");
    }
    let long = format!("check_http_send \"{}\";", "x".repeat(4097));
    assert!(err(&long).contains("4097 bytes long, at most 4096"));
}

#[test]
fn keepalive_zone_and_repeats_are_checked_as_nginx_does() {
    let err = |body: &str| bad(parse_body("u", &format!("server 10.0.0.1;\n{body}")));
    let cases = [
        ("keepalive_requests -1;", "keepalive_requests must be 0.."),
        (
            "keepalive_timeout 1y;",
            "keepalive_timeout must be a time such as 60",
        ),
        (
            "keepalive_timeout 25d;",
            "keepalive_timeout must be 0..2147483647 milliseconds",
        ),
        (
            "keepalive_time;",
            "bad arguments: expected `keepalive_time TIME;`",
        ),
        ("zone;", "bad arguments: expected `zone NAME [SIZE];`"),
        ("zone a 1k;", "zone \"a\" is too small"),
        ("zone a 64q;", "invalid zone size \"64q\""),
        ("zone a 64k b;", "bad arguments"),
        (
            "zone a;\nzone b;",
            "line 3: zone b: zone is given twice, on line 2 and line 3",
        ),
        (
            "keepalive 1; keepalive 2;",
            "line 2: keepalive 2: keepalive is given twice on line 2",
        ),
        (
            "ip_hash; hash $uri;",
            "a balancing method is given twice on line 2",
        ),
        (
            "random two least_conn least_conn;",
            "bad arguments: expected `random [two [least_conn]];`",
        ),
        (
            "balancer_by_lua_file a.lua;\nbalancer_by_lua_block { }",
            "balancer_by_lua_* is given twice, on line 2 and line 3",
        ),
        (
            "balancer_by_lua_block;",
            "balancer_by_lua_block needs its block",
        ),
        ("keepalive 2 {", "unexpected '{'"),
    ];
    for (body, want) in cases {
        let m = err(body);
        assert!(m.contains(want), "{body}: {m}");
    }
    let u = parse_body(
        "u",
        "server 10.0.0.1; zone z; keepalive_timeout 500ms; random two least_conn;",
    )
    .unwrap();
    assert_eq!(
        (u.keepalive_timeout, u.policy),
        (500, Policy::Random { two: true })
    );
}

#[test]
fn an_upstream_of_backups_only_is_refused() {
    let m = bad(parse_body(
        "u",
        "server 10.0.0.1 backup;\nserver 10.0.0.2 backup down;",
    ));
    assert_eq!(
        m,
        "line 1: upstream \"u\" would have only backup servers: nginx refuses that \
             (\"no servers in upstream\")"
    );
    let m = bad(parse_upstream_file(
        "\nupstream b {\n server 10.0.0.1 backup;\n}\n",
    ));
    assert!(
        m.starts_with("line 2: upstream \"b\" would have only backup"),
        "{m}"
    );
    // A primary that is down still counts, as in nginx.
    assert!(parse_body("u", "server 10.0.0.1 down; server 10.0.0.2 backup;").is_ok());
}

#[test]
fn quoted_strings_cannot_break_out_of_their_line() {
    for text in [
        "a\"b",
        "a\\b",
        "\\\"",
        "line\nbreak",
        "GET /x HTTP/1.0\r\n\r\n",
        "tab\there",
        "} ; { # $x ${y}",
        "'single'",
        "ünïcødé \u{2028}",
        "\\n is not a newline",
    ] {
        let mut u = Upstream::new("u", vec![ServerSpec::new(inet("10.0.0.1:80"))]);
        u.check.http_send = text.to_owned();
        let block = render_upstream(&u);
        // The header, one setting line, one server, the closing brace.
        assert_eq!(block.lines().count(), 4, "{text:?}: {block:?}");
        let mut t = Table::default();
        t.upsert(u);
        let back = parse_upstream_file(&render_upstream_file(&t)).unwrap();
        assert_eq!(back.get("u").unwrap().check.http_send, text, "{block}");
    }
}

#[test]
fn duplicates_on_one_line_say_so() {
    let m = bad(parse_servers("server 127.0.0.1:80; server 127.0.0.1:80;"));
    assert_eq!(
        m,
        "line 1: server 127.0.0.1:80: server 127.0.0.1:80 is given twice on line 1"
    );
}

#[test]
fn upstream_names_in_a_file_are_one_whatever_their_case() {
    let m = bad(parse_upstream_file(
        "upstream Foo { server 10.0.0.1; }\nupstream foo { server 10.0.0.2; }\n",
    ));
    assert_eq!(
        m,
        "line 2: upstream foo: upstream \"foo\" is defined twice, on line 1 and line 2"
    );
    let t = parse_upstream_file("upstream Foo.Example { server 10.0.0.1; }").unwrap();
    assert_eq!(t.get("foo.example").unwrap().name, "Foo.Example");
}

#[test]
fn addresses_that_are_not_one_say_what_they_are() {
    let err = |s: &str| parse_address(s).unwrap_err();
    assert_eq!(
            err("http://127.0.0.1:8088"),
            "\"http://127.0.0.1:8088\": a server address has no scheme (http://): write \"127.0.0.1:8088\""
        );
    assert_eq!(
        err("127.0.0.1:8088,127.0.0.1:8089"),
        "\"127.0.0.1:8088,127.0.0.1:8089\": one address, not a list: name each server on its own"
    );
    // A unix socket path may hold both.
    assert!(parse_address("unix:/tmp/a,b://c.sock").is_ok());
}

#[test]
fn a_patch_takes_max_conns_and_refuses_semicolons() {
    let p = parse_server_patch("max_conns=5 weight=2").unwrap();
    assert_eq!((p.max_conns, p.weight), (Some(5), Some(2)));
    assert_eq!(
        parse_server_patch("weight=2;").unwrap_err(),
        "\"weight=2;\": a PATCH body is parameters without ';', as in \"weight=2 down=on\""
    );
    assert!(parse_server_patch("weight=2 ;")
        .unwrap_err()
        .contains("without ';'"));
    assert!(parse_server_patch("max_conns=-1")
        .unwrap_err()
        .contains("max_conns must be 0..1000000"));
}

#[test]
fn addresses_in_nginx_spellings() {
    assert_eq!(parse_address("127.0.0.1:8088"), Ok(inet("127.0.0.1:8088")));
    assert_eq!(parse_address("127.0.0.1"), Ok(inet("127.0.0.1:80")));
    assert_eq!(parse_address("[::1]:8080"), Ok(inet("[::1]:8080")));
    assert_eq!(parse_address("[::1]"), Ok(inet("[::1]:80")));
    assert_eq!(
        parse_address("[2001:db8::5]:65535"),
        Ok(inet("[2001:db8::5]:65535"))
    );
    assert_eq!(
        parse_address("unix:/run/app.sock"),
        Ok(Address::Unix("/run/app.sock".into()))
    );
    let longest = format!("/{}", "a".repeat(106));
    assert_eq!(
        parse_address(&format!("unix:{longest}")),
        Ok(Address::Unix(longest))
    );
}

#[test]
fn bad_addresses_name_the_text_and_the_reason() {
    let err = |s: &str| parse_address(s).unwrap_err();
    assert!(err("::1").contains("\"::1\": an IPv6 address needs brackets, as in [::1]:8080"));
    assert!(err("2001:db8::1:80").contains("needs brackets"));
    for host in ["example.com:80", "localhost", "localhost:8080"] {
        let m = err(host);
        assert!(m.contains(&format!("{host:?}")), "{m}");
        assert!(
            m.contains("is a host name: name a server by its address here"),
            "{m}"
        );
        assert!(m.contains("unix:/path"), "{m}");
    }
    assert!(err("127.0.0.1:0").contains("\"127.0.0.1:0\": port must be 1..65535"));
    assert!(err("127.0.0.1:65536").contains("port must be 1..65535"));
    assert!(err("127.0.0.1:").contains("port must be"));
    assert!(err("127.0.0.1:+80").contains("port must be"));
    assert!(err("[::1]8080").contains("expected ':PORT'"));
    assert!(err("[::1").contains("missing ']'"));
    assert!(err("[1.2.3.4]:80").contains("not an IPv6 address"));
    assert!(err(":80").contains("no host"));
    assert!(err("unix:").contains("\"unix:\": the unix socket path is empty"));
    assert!(err("unix:run/x.sock").contains("must be absolute"));
    let too_long = format!("unix:/{}", "a".repeat(107));
    assert!(err(&too_long).contains("108 bytes long, at most 107"));
}

#[test]
fn server_args_default_like_nginx() {
    let s = parse_server_args("127.0.0.1:8088").unwrap();
    assert_eq!(s, ServerSpec::new(inet("127.0.0.1:8088")));
    assert_eq!((s.weight, s.max_fails, s.fail_timeout), (1, 1, 10));
    assert!(!s.backup && !s.down);
}

#[test]
fn server_args_take_every_parameter() {
    let s = parse_server_args("  [::1]:81 weight=1000 max_fails=0 fail_timeout=1m30s backup down ")
        .unwrap();
    assert_eq!(s.addr, inet("[::1]:81"));
    assert_eq!((s.weight, s.max_fails, s.fail_timeout), (1000, 0, 90));
    assert!(s.backup && s.down);
}

#[test]
fn fail_timeout_takes_nginx_time_syntax() {
    let t = |v: &str| parse_server_args(&format!("127.0.0.1 fail_timeout={v}"));
    for (text, secs) in [
        ("0", 0),
        ("10", 10),
        ("10s", 10),
        ("1m", 60),
        ("2h", 7200),
        ("1d", 86_400),
        ("1h1m1s", 3661),
        ("1m30", 90),
    ] {
        assert_eq!(t(text).unwrap().fail_timeout, secs, "{text}");
    }
    assert!(t("500ms").unwrap_err().contains("ms is not allowed"));
    assert!(t("1d1s")
        .unwrap_err()
        .contains("fail_timeout=1d1s: fail_timeout must be 0..86400 seconds"));
    assert!(t("1w").unwrap_err().contains("must be 0..86400"));
    for wrong in [
        "",
        "s",
        "1x",
        "1s1m",
        "1s30",
        "1m1m",
        "-1",
        "1.5s",
        "99999999999999999999",
    ] {
        let m = t(wrong).unwrap_err();
        assert!(
            m.starts_with(&format!("fail_timeout={wrong}: fail_timeout")),
            "{m}"
        );
    }
}

#[test]
fn server_args_errors_name_the_parameter() {
    let err = |a: &str| parse_server_args(a).unwrap_err();
    assert_eq!(
        err("127.0.0.1 weight=0"),
        "weight=0: weight must be 1..1000"
    );
    assert_eq!(
        err("127.0.0.1 weight=1001"),
        "weight=1001: weight must be 1..1000"
    );
    assert_eq!(
        err("127.0.0.1 weight=x"),
        "weight=x: weight must be 1..1000"
    );
    assert_eq!(
        err("127.0.0.1 max_fails=1001"),
        "max_fails=1001: max_fails must be 0..1000"
    );
    assert_eq!(err("127.0.0.1 foo"), "unknown parameter \"foo\"");
    for p in [
        "max_conns=1000001",
        "max_conns",
        "slow_start",
        "slow_start=1ms",
        "slow_start=2d",
        "resolve",
        "backup=1",
        "weight",
    ] {
        assert!(err(&format!("127.0.0.1 {p}")).contains(p), "{p}");
    }
    assert_eq!(
        err("127.0.0.1 backup=0"),
        "backup=0: backup takes no value in nginx: write `backup`, or leave it out"
    );
    assert_eq!(
        err("127.0.0.1 max_conns=1000001"),
        "max_conns=1000001: max_conns must be 0..1000000"
    );
    assert_eq!(
        err("127.0.0.1 weight=2 weight=3"),
        "weight=3: weight is given more than once"
    );
    assert_eq!(
        err("127.0.0.1 down down"),
        "down: down is given more than once"
    );
    assert!(err("").starts_with("missing address"));
}

#[test]
fn dyups_body_from_tengine() {
    let servers = parse_servers("server 127.0.0.1:8089;server 127.0.0.1:8088;").unwrap();
    assert_eq!(
        servers,
        vec![
            ServerSpec::new(inet("127.0.0.1:8089")),
            ServerSpec::new(inet("127.0.0.1:8088")),
        ]
    );
}

#[test]
fn multi_line_body_with_comments() {
    let body = "# pool A\n\
                    server 10.0.0.1:80 weight=3; # the big one\n\
                    \n\
                    server unix:/tmp/a.sock backup down;\n\
                    server\n  [::1]:8080\n  max_fails=2 ;\n";
    let servers = parse_servers(body).unwrap();
    assert_eq!(servers.len(), 3);
    assert_eq!(servers[0].weight, 3);
    assert_eq!(servers[1].addr, Address::Unix("/tmp/a.sock".into()));
    assert!(servers[1].backup && servers[1].down);
    assert_eq!(servers[2].addr, inet("[::1]:8080"));
    assert_eq!(servers[2].max_fails, 2);
}

#[test]
fn body_errors_name_the_line_and_statement() {
    let m = bad(parse_servers(
        "server 127.0.0.1:1;\n\n  server 127.0.0.1:80 weight=0;",
    ));
    assert_eq!(
        m,
        "line 3: server 127.0.0.1:80 weight=0: weight=0: weight must be 1..1000"
    );
    let m = bad(parse_servers("server 127.0.0.1:80;\nsticky cookie;"));
    assert_eq!(
        m,
        "line 2: sticky cookie: unknown directive \"sticky\": nginx's upstream {} does not \
             take it (it takes server, the balancing methods, keepalive*, zone, resolver, \
             resolver_timeout, balancer_by_lua_* and check*)"
    );
    let m = bad(parse_servers("server 127.0.0.1:80;\nserver 127.0.0.1:81"));
    assert_eq!(m, "line 2: server 127.0.0.1:81: missing ';' at the end");
    let m = bad(parse_servers("server 127.0.0.1:80 slow_start=3x;"));
    assert!(
        m.contains(
            "line 1: server 127.0.0.1:80 slow_start=3x: slow_start=3x: slow_start must be a time"
        ),
        "{m}"
    );
    let m = bad(parse_servers("server example.com:80 resolve=on;"));
    assert!(m.starts_with(
        "line 1: server example.com:80 resolve=on: resolve=on: resolve takes no value"
    ));
    assert!(bad(parse_servers("server 127.0.0.1 {")).contains("unexpected '{'"));
    assert!(bad(parse_servers("}")).contains("line 1: unexpected '}'"));
    assert!(bad(parse_servers(";")).contains("line 1: unexpected ';'"));
}

#[test]
fn long_statements_are_cut_in_messages() {
    let body = format!("server 127.0.0.1 {};", "foo".repeat(100));
    let m = bad(parse_servers(&body));
    let quoted = m.split(": ").nth(1).unwrap();
    assert_eq!(quoted.len(), EXCERPT_MAX + 3);
    assert!(quoted.ends_with("..."));
}

#[test]
fn empty_bodies_are_refused() {
    for body in ["", "  \n\t", "# only a comment\n"] {
        assert_eq!(
            bad(parse_servers(body)),
            "no server in body: expected `server ADDR [PARAMS];`"
        );
    }
}

#[test]
fn repeated_addresses_name_both_lines() {
    let m = bad(parse_servers(
        "server 127.0.0.1:80;\nserver 10.0.0.1;\nserver 127.0.0.1:80 weight=2;",
    ));
    assert_eq!(
        m,
        "line 3: server 127.0.0.1:80 weight=2: server 127.0.0.1:80 is given twice, \
             on line 1 and line 3"
    );
    // The default port makes these the same address.
    assert!(bad(parse_servers("server 10.0.0.1;server 10.0.0.1:80;")).contains("twice"));
}

#[test]
fn control_characters_are_refused() {
    let m = bad(parse_servers(
        "server 127.0.0.1:80;\nserver 127.0.0.1:81\0;",
    ));
    assert_eq!(m, "line 2: NUL byte in the text");
    let m = bad(parse_servers("server 127.0.0.1:80\x07;"));
    assert_eq!(m, "line 1: control character U+0007 in the text");
    assert!(bad(parse_upstream_file("upstream a {\x1b}")).contains("U+001B"));
    // Tabs and CRLF are whitespace.
    assert_eq!(
        parse_servers("server\t127.0.0.1:80;\r\nserver 127.0.0.1:81;\r\n")
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn a_large_body_parses() {
    let body: String = (0..5000)
        .map(|i| {
            format!(
                "server 10.0.{}.{}:{} weight=2;\n",
                i / 250,
                i % 250,
                1000 + i
            )
        })
        .collect();
    let servers = parse_servers(&body).unwrap();
    assert_eq!(servers.len(), 5000);
    assert_eq!(servers[4999].addr, inet("10.0.19.249:5999"));
    assert!(servers.iter().all(|s| s.weight == 2));
}

const OPENRESTY_FILE: &str = r#"
# upstreams for the app
upstream backend {
    server 127.0.0.1:8081 weight=5;   # main
    server 127.0.0.1:8082 max_fails=3 fail_timeout=30s;
    keepalive 32;
    zone 'backend ; { }' 64k;
    balancer_by_lua_block {
        local t = { "}", '{', [[ } ]], [==[ ]] { ]==] }
        -- a comment with } in it
        --[[ a long comment {
        ]]
        local n = #t + #{ 1, -- `#` is Lua's length operator, so this { counts
        }
        if n > 0 then ngx.say("}") end
    }
    check interval=3000 rise=2 fall=5 timeout=1000 type=http;
    check_http_send "GET /health HTTP/1.0\r\nHost: \"x\" } {\r\n\r\n";
    server [::1]:8083 backup;
}

upstream other.pool-2 {
    server unix:/tmp/x.sock down;
    server 127.0.0.1:1;
    balancer_by_lua_file "./lua/balancer.lua";
}
"#;

#[test]
fn openresty_file_with_lua_blocks() {
    let t = parse_upstream_file(OPENRESTY_FILE).unwrap();
    assert_eq!(t.names().collect::<Vec<_>>(), ["backend", "other.pool-2"]);
    let b = t.get("backend").unwrap();
    assert_eq!(b.servers.len(), 3);
    assert_eq!(b.servers[0].weight, 5);
    assert_eq!((b.servers[1].max_fails, b.servers[1].fail_timeout), (3, 30));
    assert_eq!(b.servers[2].addr, inet("[::1]:8083"));
    assert!(b.servers[2].backup);
    assert_eq!(b.check.line.as_ref().map(|c| c.kind), Some(CheckType::Http));
    assert_eq!(
        b.check.http_send,
        "GET /health HTTP/1.0\r\nHost: \"x\" } {\r\n\r\n"
    );
    let o = t.get("other.pool-2").unwrap();
    assert!(o.servers[0].down);
}

#[test]
fn empty_files_give_an_empty_table() {
    for text in ["", "\n\n", "# nothing\n   # here\n"] {
        assert_eq!(parse_upstream_file(text), Ok(Table::default()));
    }
}

#[test]
fn file_errors_name_the_line() {
    let m = bad(parse_upstream_file("# x\nworker_processes 4;\n"));
    assert!(m.starts_with("line 2: worker_processes 4: directive \"worker_processes\""));
    let m = bad(parse_upstream_file("\nhttp {\n}\n"));
    assert!(m.starts_with("line 2: http: directive \"http\" is not allowed here"));
    let m = bad(parse_upstream_file(
        "upstream a {\n server 127.0.0.1;\n}\n\nupstream a {\n server 127.0.0.2;\n}\n",
    ));
    assert_eq!(
        m,
        "line 5: upstream a: upstream \"a\" is defined twice, on line 1 and line 5"
    );
    let m = bad(parse_upstream_file("upstream empty {\n keepalive 2;\n}\n"));
    assert_eq!(
        m,
        "line 1: upstream empty: upstream \"empty\" has no server"
    );
    let m = bad(parse_upstream_file("upstream a/b {\n server 127.0.0.1;\n}"));
    assert!(m.starts_with("line 1: upstream a/b: upstream name \"a/b\" has '/'"));
    let m = bad(parse_upstream_file(
        "upstream a {\n\n server 127.0.0.1 weight=0;\n}",
    ));
    assert_eq!(
        m,
        "line 3: server 127.0.0.1 weight=0: weight=0: weight must be 1..1000"
    );
    let m = bad(parse_upstream_file(
        "upstream a {\n server 127.0.0.1;\n server 127.0.0.1:80;\n}",
    ));
    assert!(m.contains("line 3:") && m.contains("on line 2 and line 3"));
    let m = bad(parse_upstream_file("upstream a {\n server 127.0.0.1;\n"));
    assert_eq!(m, "line 1: upstream a: the block is not closed");
    let m = bad(parse_upstream_file("upstream a b {\n server 127.0.0.1;\n}"));
    assert!(m.contains("expected `upstream NAME { ... }`"));
    let m = bad(parse_upstream_file("upstream a;"));
    assert!(m.contains("expected `upstream NAME { ... }`"));
    let m = bad(parse_upstream_file("upstream a {\n x \"open\n}\n"));
    assert_eq!(m, "line 2: the quoted string is not closed");
    let m = bad(parse_upstream_file("upstream a {\n x \"a\"b;\n}\n"));
    assert!(m.contains("line 2: unexpected 'b' after a quoted string"));
    let m = bad(parse_upstream_file(
        "upstream a {\n server 127.0.0.1;\n balancer_by_lua_block {\n s = \"}\n }\n}\n",
    ));
    assert!(m.starts_with("line 3: balancer_by_lua_block: a Lua string is not closed"));
    // What nginx refuses in an upstream block is refused here too.
    let m = bad(parse_upstream_file(
        "upstream a {\n server 127.0.0.1;\n content_by_lua_block { }\n}\n",
    ));
    assert!(
        m.starts_with("line 3: content_by_lua_block: unknown directive \"content_by_lua_block\""),
        "{m}"
    );
    let m = bad(parse_upstream_file(
        "upstream a {\n server 127.0.0.1;\n sticky cookie srv_id;\n}\n",
    ));
    assert!(
        m.starts_with("line 3: sticky cookie srv_id: unknown directive \"sticky\""),
        "{m}"
    );
    let m = bad(parse_upstream_file(
        "upstream a {\n server 127.0.0.1;\n blk { }\n}\n",
    ));
    assert!(
        m.starts_with("line 3: blk: unknown directive \"blk\""),
        "{m}"
    );
    assert!(bad(parse_upstream_file("}")).contains("line 1: unexpected '}'"));
}

#[test]
fn hash_starts_a_comment_only_where_a_token_may_start() {
    // `a#b` is one word to nginx; `#c` after a space is a comment.
    let text = "upstream a {\n zone a#b; #c ;\n server 127.0.0.1;\n}";
    let t = parse_upstream_file(text).unwrap();
    assert_eq!(t.get("a").unwrap().servers.len(), 1);
    // `#` hides the rest of the line, braces included.
    let text = "upstream a { # }\n server 127.0.0.1;\n}";
    assert_eq!(parse_upstream_file(text).unwrap().upstreams.len(), 1);
}

#[test]
fn rendering_prints_only_what_differs_from_nginx() {
    assert_eq!(
        render_server(&ServerSpec::new(inet("127.0.0.1:8088"))),
        "server 127.0.0.1:8088;"
    );
    let s = ServerSpec {
        addr: inet("127.0.0.1:8088"),
        weight: 3,
        max_conns: 10,
        max_fails: 2,
        fail_timeout: 5,
        slow_start: 30,
        backup: true,
        down: true,
        from: None,
    };
    assert_eq!(
        render_server(&s),
        "server 127.0.0.1:8088 weight=3 max_conns=10 max_fails=2 fail_timeout=5s slow_start=30s backup down;"
    );
    let u = Upstream::new("u", vec![s, ServerSpec::new(inet("[::1]:80"))]);
    assert_eq!(
        render_upstream(&u),
        "upstream u {\n    server 127.0.0.1:8088 weight=3 max_conns=10 max_fails=2 \
             fail_timeout=5s slow_start=30s backup down;\n    server [::1]:80;\n}\n"
    );
}

fn full_table() -> Table {
    let mut every = ServerSpec::new(inet("10.1.2.3:8080"));
    every.weight = 1000;
    every.max_fails = 0;
    every.fail_timeout = 0;
    every.backup = true;
    every.down = true;
    let mut long = ServerSpec::new(inet("[2001:db8::1]:443"));
    long.fail_timeout = FAIL_TIMEOUT_MAX;
    long.max_fails = MAX_FAILS_MAX;
    let unix = ServerSpec::new(Address::Unix("/run/app.sock".into()));
    let mut t = Table::default();
    t.upsert(Upstream::new("first", vec![every, long, unix]));
    t.upsert(Upstream::new(
        "second.b-c_d",
        vec![ServerSpec::new(inet("127.0.0.1:1"))],
    ));
    t
}

#[test]
fn files_round_trip() {
    let t = full_table();
    let text = render_upstream_file(&t);
    assert!(text.starts_with("# written by ngx.dyups; edits are overwritten\n"));
    assert!(text.contains("}\n\nupstream second.b-c_d {\n"));
    assert_eq!(parse_upstream_file(&text), Ok(t));
    let empty = render_upstream_file(&Table::default());
    assert_eq!(parse_upstream_file(&empty), Ok(Table::default()));
}

#[test]
fn round_trip_ignores_rev() {
    let mut t = full_table();
    std::sync::Arc::make_mut(&mut t.upstreams[0]).rev = 42;
    let back = parse_upstream_file(&render_upstream_file(&t)).unwrap();
    assert_eq!(back.upstreams[0].rev, 0);
    assert_eq!(back.upstreams[0].servers, t.upstreams[0].servers);
}

fn named_line(args: &str) -> NamedServer {
    match parse_server_line(args) {
        Ok(ServerLine::Named(n)) => n,
        other => panic!("{args}: expected a server NAME line, got {other:?}"),
    }
}

#[test]
fn server_name_lines_take_nginx_parameters_and_resolve() {
    let n = named_line(
        "App.Internal:8080 weight=2 max_conns=5 max_fails=3 fail_timeout=1m slow_start=30s backup resolve",
    );
    assert_eq!(
        (n.host.as_str(), n.port, n.resolve),
        ("App.Internal", Some(8080), true)
    );
    assert_eq!(
        n.params,
        ServerParams {
            weight: 2,
            max_conns: 5,
            max_fails: 3,
            fail_timeout: 60,
            slow_start: 30,
            backup: true,
            down: false,
        }
    );
    assert!(n.is_pending(), "a parsed line waits for its answer");
    // No port: nginx's 80, and the line is written back without one.
    let n = named_line("app.internal down");
    assert_eq!((n.port, n.port(), n.resolve), (None, 80, false));
    assert!(n.params.down);
    assert_eq!(render_named(&n), "server app.internal down;");
    // Addresses stay addresses, whatever looks like a name around them.
    for addr in ["127.0.0.1:80", "[::1]:80", "unix:/tmp/x.sock", "10.0.0.1"] {
        assert!(
            matches!(parse_server_line(addr), Ok(ServerLine::Addr(_))),
            "{addr}"
        );
    }
    // Where one address is meant (PATCH, /ups), a name is refused.
    let m = parse_server_args("app.internal:80 weight=2").unwrap_err();
    assert!(m.contains("\"app.internal:80\" is a host name"), "{m}");
}

#[test]
fn service_lines_ask_nginx_srv_names_and_write_back_as_given() {
    let n = named_line("Svc.Internal service=http weight=3 resolve");
    assert_eq!(n.service.as_deref(), Some("http"));
    assert_eq!(n.query_name(), "_http._tcp.Svc.Internal");
    assert_eq!(n.port, None);
    assert_eq!(
        render_named(&n),
        "server Svc.Internal weight=3 service=http resolve;"
    );
    assert_eq!(
        named_line(&render_named(&n)[7..render_named(&n).len() - 1]),
        n
    );
    // A service with a dot is the SRV name's prefix as written.
    let n = named_line("svc.internal. service=_sip._udp resolve");
    assert_eq!(n.query_name(), "_sip._udp.svc.internal");
    // The same host without service= is another line.
    assert!(!n.same_line(&named_line("svc.internal. resolve")));
}

#[test]
fn bad_server_name_lines_are_refused_naming_what_is_wrong() {
    let err = |args: &str| parse_server_line(args).unwrap_err();
    let cases = [
        (
            "127.0.0.1:80 resolve",
            "127.0.0.1:80 is an address; resolve is for a host name",
        ),
        (
            "app.internal resolve=on",
            "resolve=on: resolve takes no value",
        ),
        (
            "app.internal resolve resolve",
            "resolve is given more than once",
        ),
        (
            "app.internal service=http",
            "service=http: service upstream \"app.internal\" requires \"resolve\" parameter",
        ),
        (
            "app.internal:80 service=http resolve",
            "service upstream \"app.internal:80\" may not have port",
        ),
        (
            "127.0.0.1 service=http resolve",
            "service upstream \"127.0.0.1\" requires domain name",
        ),
        ("app.internal service= resolve", "service is empty"),
        ("app.internal service=a/b resolve", "labels of 1 to 63"),
        (
            "app.internal service=a service=b resolve",
            "service= is given more than once",
        ),
        ("app.internal weight=0", "weight must be 1..1000"),
        ("app.internal colour=red", "colour"),
        ("app.internal:0", "port must be 1..65535"),
        ("app.internal:99999", "port must be 1..65535"),
        ("app..internal:80", "app..internal"),
        ("-app.internal", "-app.internal"),
        ("1.2.3.256:80", "1.2.3.256"),
        ("http://app.internal", "has no scheme"),
        ("a.b,c.d", "one address, not a list"),
    ];
    for (args, want) in cases {
        let m = err(args);
        assert!(m.contains(want), "{args}: {m:?} lacks {want:?}");
    }
    let long = format!("{}.internal", "a".repeat(250));
    assert!(
        parse_server_line(&long).is_err(),
        "a host name past 253 bytes"
    );
}

#[test]
fn bodies_take_server_name_lines_and_resolver_settings() {
    let u = parse_body(
        "u",
        "resolver 10.0.0.53 [::1]:5353 valid=30s ipv6=off;\nresolver_timeout 2s;\n\
         server 10.0.0.1:80;\nserver app.internal:8080 weight=2 resolve;\n",
    )
    .unwrap();
    assert_eq!(addrs_of(&u), ["10.0.0.1:80"]);
    assert_eq!(u.names.len(), 1);
    assert_eq!(u.names[0].target(), "app.internal:8080");
    assert_eq!(
        u.dns.resolvers,
        [
            "10.0.0.53:53".parse().unwrap(),
            "[::1]:5353".parse().unwrap()
        ]
    );
    assert_eq!(
        (u.dns.valid, u.dns.ipv6, u.dns.timeout_ms),
        (Some(30), Some(false), Some(2000))
    );
    // Only server NAME lines: a body, and a block of a file.
    let u = parse_body("u", "server app.internal;").unwrap();
    assert!(u.servers.is_empty());
    assert_eq!(u.names[0].target(), "app.internal");
    let t = parse_upstream_file("upstream u {\n  server app.internal:81 resolve;\n}\n").unwrap();
    assert_eq!(t.get("u").unwrap().names[0].port, Some(81));
}

#[test]
fn bad_server_name_bodies_are_refused_naming_the_line() {
    let err = |body: &str| bad(parse_body("u", body));
    let resolvers: String = (1..=9).map(|i| format!(" 10.0.0.{i}")).collect();
    let names: String = (0..=crate::table::names::NAMES_MAX)
        .map(|i| format!("server n{i}.internal;\n"))
        .collect();
    let cases = [
        (
            "server app.internal:80;\nserver APP.internal;".to_owned(),
            "line 2: server APP.internal: server APP.internal is given twice, on line 1 and line 2",
        ),
        ("server app.internal backup;".into(), "only backup servers"),
        (
            "hash $uri;\nserver app.internal backup;\nserver 10.0.0.1;".into(),
            "balancing method \"hash\" does not support parameter \"backup\" (server app.internal)",
        ),
        (
            "random;\nserver app.internal:81 slow_start=10s;".into(),
            "balancing method \"random\" does not support parameter \"slow_start\" (server app.internal:81)",
        ),
        (
            "resolver dns.internal;\nserver app.internal;".into(),
            "\"dns.internal\": a resolver is an IP address with an optional port",
        ),
        (
            "resolver valid=30s;\nserver app.internal;".into(),
            "resolver: no address given",
        ),
        (
            "resolver 10.0.0.53 valid=0;\nserver a.b;".into(),
            "valid=0: valid",
        ),
        (
            "resolver 10.0.0.53 valid=2d;\nserver a.b;".into(),
            "valid=2d: valid",
        ),
        (
            "resolver 10.0.0.53 ipv6=maybe;\nserver a.b;".into(),
            "ipv6 must be on or off",
        ),
        (
            "resolver 10.0.0.53 ipv6=on ipv6=off;\nserver a.b;".into(),
            "ipv6 is given more than once",
        ),
        (
            "resolver 10.0.0.53 10.0.0.53:53;\nserver a.b;".into(),
            "is given twice",
        ),
        (
            "resolver 10.0.0.53 ttl=5;\nserver a.b;".into(),
            "unknown resolver parameter \"ttl=5\"",
        ),
        (
            format!("resolver{resolvers};\nserver a.b;"),
            "at most 8 resolver addresses",
        ),
        (
            "resolver_timeout 0;\nserver a.b;".into(),
            "line 1: resolver_timeout 0: resolver_timeout",
        ),
        ("resolver_timeout 1s 2s;\nserver a.b;".into(), "line 1"),
        (
            names,
            "line 101: server n100.internal: an upstream takes at most 100 server lines",
        ),
    ];
    for (body, want) in cases {
        let m = err(&body);
        assert!(m.contains(want), "{body:?}: {m:?} lacks {want:?}");
    }
}

#[test]
fn server_name_lines_are_written_back_as_given() {
    let text = "upstream u {\n    resolver 10.0.0.53:5353 valid=30s ipv6=on;\n    \
                resolver_timeout 1500ms;\n    server 10.0.0.1:80;\n    \
                server app.internal:8080 weight=2 slow_start=30s backup resolve;\n    server other.internal;\n}\n";
    let t = parse_upstream_file(text).unwrap();
    let written = render_upstream_file(&t);
    for line in [
        "    resolver 10.0.0.53:5353 valid=30s ipv6=on;\n",
        "    server 10.0.0.1:80;\n",
        "    server app.internal:8080 weight=2 slow_start=30s backup resolve;\n",
        "    server other.internal;\n",
    ] {
        assert!(written.contains(line), "{written:?} lacks {line:?}");
    }
    assert!(written.contains("resolver_timeout"), "{written}");
    assert_eq!(parse_upstream_file(&written), Ok(t));
}

fn addrs_of(u: &Upstream) -> Vec<String> {
    u.servers.iter().map(|s| s.addr.to_string()).collect()
}
