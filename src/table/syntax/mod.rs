//! nginx syntax: `server ...;` bodies and `upstream NAME { ... }` files.
//!
//! Both are read with one tokenizer that mirrors nginx's own
//! (`ngx_conf_read_token`): words separated by whitespace, statements ended by
//! `;`, `{` or `}`, `"`/`'` quoting with backslash escapes, and `#` comments
//! only where a new token could start. Blocks of `*_by_lua_block` directives
//! are skipped the way ngx_lua reads them (Lua strings, long brackets and `--`
//! comments), since that is what OpenResty does with them.
//!
//! This file reads `upstream {}` bodies and files; `lexer.rs` is the
//! tokenizer, `server.rs` reads `server` lines and `render.rs` writes it all
//! back.

mod lexer;
mod render;
mod server;
#[cfg(test)]
mod tests;

use std::collections::HashMap;

use crate::error::Error;
use crate::table::model::{
    check_http_send, check_name, name_key, Address, CheckLine, CheckType, ExpectAlive, ServerSpec,
    Table, Upstream, CHECK_COUNT_MAX, CHECK_KEEPALIVE_REQUESTS_MAX, CHECK_TIME_MAX,
};
use crate::table::names::{DNS_TIME_MAX_MS, NAMES_MAX, RESOLVERS_MAX};
use crate::table::policy::Policy;

use self::lexer::{error_at, Lexer, Stmt, Terminator};
pub use self::render::{
    render_check_line, render_named, render_server, render_upstream, render_upstream_file,
    server_lines, setting_lines,
};
use self::server::{bounded, bounded_millis, parse_decimal, TimeSyntax};
pub use self::server::{
    parse_address, parse_server_args, parse_server_line, parse_server_patch, parse_target,
    ServerLine, Target,
};

const SERVER_USAGE: &str = "expected `server ADDR [PARAMS];`";

// ---------------------------------------------------------------------------
// Server bodies and upstream files
// ---------------------------------------------------------------------------

/// What an upstream definition takes, as nginx's `upstream {}` does (with
/// lua-nginx-module and nginx_upstream_check_module), for error messages.
const DIRECTIVES: &str = "server, the balancing methods, keepalive*, zone, \
     resolver, resolver_timeout, balancer_by_lua_* and check*";

const CHECK_USAGE: &str = "check interval=MS [rise=N] [fall=N] [timeout=MS] \
     [default_down=true|false] [type=tcp|http|https|ssl_hello] [port=N] [jitter=MS];";

/// nginx's largest time in milliseconds (`NGX_MAX_INT32_VALUE`).
const NGINX_MSEC_MAX: u32 = i32::MAX as u32;
/// nginx's smallest `zone` size: 8 pages of 4 KiB.
const ZONE_MIN: u64 = 8 * 4096;

/// How a directive other than `server` is written, or `None` when an
/// upstream definition does not take it.
fn usage(directive: &str) -> Option<&'static str> {
    Some(match directive {
        "keepalive" => "keepalive CONNECTIONS;",
        "keepalive_requests" => "keepalive_requests N;",
        "keepalive_time" => "keepalive_time TIME;",
        "keepalive_timeout" => "keepalive_timeout TIME;",
        "zone" => "zone NAME [SIZE];",
        "ip_hash" => "ip_hash;",
        "least_conn" => "least_conn;",
        "random" => "random [two [least_conn]];",
        "hash" => "hash KEY [consistent];",
        "balancer_by_lua_block" => "balancer_by_lua_block { ... }",
        "balancer_by_lua_file" => "balancer_by_lua_file PATH;",
        "check" => CHECK_USAGE,
        "check_http_send" => "check_http_send \"REQUEST\";",
        "check_http_expect_alive" => "check_http_expect_alive http_2xx [http_3xx ...];",
        "check_keepalive_requests" => "check_keepalive_requests N;",
        "resolver" => "resolver ADDRESS[:PORT] ... [valid=TIME] [ipv6=on|off];",
        "resolver_timeout" => "resolver_timeout TIME;",
        _ => return None,
    })
}

/// What a repeat of `directive` is called: the balancing lines are one
/// setting, as are the two `balancer_by_lua_*`.
fn setting_of(directive: &str) -> &str {
    match directive {
        "ip_hash" | "least_conn" | "random" | "hash" => "a balancing method",
        "balancer_by_lua_block" | "balancer_by_lua_file" => "balancer_by_lua_*",
        d => d,
    }
}

/// `WHAT is given twice, on line A and line B`, or `on line A` alone when
/// both are on one line.
fn twice(what: &str, first: usize, line: usize) -> String {
    if first == line {
        format!("{what} is given twice on line {line}")
    } else {
        format!("{what} is given twice, on line {first} and line {line}")
    }
}

/// The statements of one upstream definition (an `upstream {}` block or a
/// dyups body), taken one by one and checked as nginx checks them.
struct Definition {
    /// What the statements said, under a name given at the end.
    upstream: Upstream,
    /// Address to the line that gave it.
    lines: HashMap<Address, usize>,
    /// `host:port` (in lower case) of each `server NAME` line to its line.
    named_lines: HashMap<String, usize>,
    /// Each setting given (see [`setting_of`]) and its line.
    given: HashMap<String, usize>,
    /// The line of the balancing method, if any.
    policy_line: Option<usize>,
}

impl Definition {
    fn new() -> Definition {
        Definition {
            upstream: Upstream::new("", Vec::new()),
            lines: HashMap::new(),
            named_lines: HashMap::new(),
            given: HashMap::new(),
            policy_line: None,
        }
    }

    /// Reads statements up to the `}` that closes `opened` (a block), or up
    /// to the end of the text (a body: `opened` is `None`).
    fn read(lexer: &mut Lexer<'_>, opened: Option<&Stmt>) -> Result<Definition, Error> {
        let mut def = Definition::new();
        loop {
            let stmt = lexer.statement()?;
            match (stmt.end, opened) {
                (Terminator::BlockEnd, Some(_)) => return Ok(def),
                (Terminator::BlockEnd, None) => return Err(error_at(stmt.line, "unexpected '}'")),
                (Terminator::Eof, None) if stmt.words.is_empty() => return Ok(def),
                (Terminator::Eof, None) => return Err(stmt.error("missing ';' at the end")),
                (Terminator::Eof, Some(opened)) => {
                    return Err(opened.error("the block is not closed"))
                }
                (Terminator::Semicolon, _) => def.statement(&stmt)?,
                (Terminator::BlockStart, _) if stmt.directive() == "balancer_by_lua_block" => {
                    def.once(&stmt)?;
                    if stmt.words.len() > 1 {
                        return Err(
                            stmt.error("bad arguments: expected `balancer_by_lua_block { ... }`")
                        );
                    }
                    // The code is the nginx.conf's business: ngx.dyups
                    // balances every upstream it holds itself.
                    lexer.skip_lua_block(&stmt)?;
                }
                (Terminator::BlockStart, _) => {
                    return Err(match usage(stmt.directive()) {
                        Some(_) => stmt.error("unexpected '{'"),
                        None if stmt.directive() == "server" => stmt.error("unexpected '{'"),
                        None => unknown(&stmt),
                    })
                }
            }
        }
    }

    /// Notes a directive that may be given once; refuses a repeat.
    fn once(&mut self, stmt: &Stmt) -> Result<(), Error> {
        let what = setting_of(stmt.directive());
        if let Some(&first) = self.given.get(what) {
            return Err(stmt.error(twice(what, first, stmt.line)));
        }
        self.given.insert(what.to_owned(), stmt.line);
        Ok(())
    }

    /// Takes one `;`-ended statement.
    fn statement(&mut self, stmt: &Stmt) -> Result<(), Error> {
        let directive = stmt.directive();
        if directive == "server" {
            return self.server(stmt);
        }
        let Some(usage) = usage(directive) else {
            return Err(unknown(stmt));
        };
        self.once(stmt)?;
        let args: Vec<&str> = stmt.words[1..].iter().map(String::as_str).collect();
        let bad_args = || stmt.error(format!("bad arguments: expected `{usage}`"));
        let u = &mut self.upstream;
        let policy = match (directive, args.as_slice()) {
            ("keepalive", [n]) => {
                u.keepalive = match parse_decimal(n) {
                    Some(n @ 1..=65535) => n as u32,
                    _ => return Err(stmt.error("keepalive must be 1..65535 connections")),
                };
                return Ok(());
            }
            ("keepalive_requests", [n]) => {
                u.keepalive_requests = bounded(n, directive, n, 0, u32::MAX).map_err(|_| {
                    stmt.error(format!("keepalive_requests must be 0..{}", u32::MAX))
                })?;
                return Ok(());
            }
            ("keepalive_time" | "keepalive_timeout", [t]) => {
                let ms = bounded_millis(t, TimeSyntax::MILLIS, 0, NGINX_MSEC_MAX)
                    .map_err(|why| stmt.error(format!("{directive} {why}")))?;
                if directive == "keepalive_time" {
                    u.keepalive_time = ms;
                } else {
                    u.keepalive_timeout = ms;
                }
                return Ok(());
            }
            ("zone", [name, size @ ..]) if size.len() <= 1 => {
                check_zone(name, size.first().copied()).map_err(|why| stmt.error(why))?;
                // Accepted and not kept: peer state is always shared.
                return Ok(());
            }
            ("balancer_by_lua_file", [_]) => return Ok(()),
            ("balancer_by_lua_block", _) => {
                return Err(stmt.error("balancer_by_lua_block needs its block: `{ ... }`"))
            }
            ("check", [_, ..]) => {
                u.check.line = Some(parse_check_line(&args).map_err(|why| stmt.error(why))?);
                return Ok(());
            }
            ("check_http_send", [request]) => {
                check_http_send(request).map_err(|why| stmt.error(why))?;
                u.check.http_send = (*request).to_owned();
                return Ok(());
            }
            ("check_http_expect_alive", [_, ..]) => {
                let mut bits = 0;
                for name in &args {
                    bits |= ExpectAlive::bit(name).ok_or_else(|| {
                        stmt.error(format!(
                            "{name:?}: check_http_expect_alive takes http_2xx, http_3xx, http_4xx and http_5xx"
                        ))
                    })?;
                }
                u.check.http_expect_alive = ExpectAlive::from_bits(bits).expect("one bit at least");
                return Ok(());
            }
            ("resolver", [_, ..]) => {
                parse_resolver(&args, &mut u.dns).map_err(|why| stmt.error(why))?;
                return Ok(());
            }
            ("resolver_timeout", [t]) => {
                let ms = bounded_millis(t, TimeSyntax::MILLIS, 1, DNS_TIME_MAX_MS)
                    .map_err(|why| stmt.error(format!("resolver_timeout {why}")))?;
                u.dns.timeout_ms = Some(ms);
                return Ok(());
            }
            ("check_keepalive_requests", [n]) => {
                u.check.keepalive_requests =
                    bounded(n, directive, n, 1, CHECK_KEEPALIVE_REQUESTS_MAX).map_err(|_| {
                        stmt.error(format!(
                            "check_keepalive_requests must be 1..{CHECK_KEEPALIVE_REQUESTS_MAX}"
                        ))
                    })?;
                return Ok(());
            }
            ("ip_hash", []) => Policy::IpHash,
            ("least_conn", []) => Policy::LeastConn,
            ("random", []) => Policy::Random { two: false },
            // nginx's only method for `random two` is least_conn, its default.
            ("random", ["two"] | ["two", "least_conn"]) => Policy::Random { two: true },
            ("hash", [key]) => Policy::Hash {
                key: (*key).to_owned(),
                consistent: false,
            },
            ("hash", [key, "consistent"]) => Policy::Hash {
                key: (*key).to_owned(),
                consistent: true,
            },
            _ => return Err(bad_args()),
        };
        u.policy = policy;
        self.policy_line = Some(stmt.line);
        Ok(())
    }

    /// `stmt` is a `server ...;` statement.
    fn server(&mut self, stmt: &Stmt) -> Result<(), Error> {
        let args = stmt.words[1..].join(" ");
        let spec = match parse_server_line(&args).map_err(|why| stmt.error(why))? {
            ServerLine::Addr(spec) => spec,
            ServerLine::Named(n) => {
                if self.upstream.names.len() == NAMES_MAX {
                    return Err(stmt.error(format!(
                        "an upstream takes at most {NAMES_MAX} server lines with a host name"
                    )));
                }
                let key = format!("{}:{}", n.host.to_ascii_lowercase(), n.port());
                if let Some(first) = self.named_lines.insert(key, stmt.line) {
                    let what = format!("server {}", n.target());
                    return Err(stmt.error(twice(&what, first, stmt.line)));
                }
                self.upstream.names.push(n);
                return Ok(());
            }
        };
        if let Some(first) = self.lines.insert(spec.addr.clone(), stmt.line) {
            let what = format!("server {}", spec.addr);
            return Err(stmt.error(twice(&what, first, stmt.line)));
        }
        self.upstream.servers.push(spec);
        Ok(())
    }

    /// The upstream `name` these statements describe, checked as nginx
    /// checks it once the block is read; `line` is where to point at for
    /// what concerns it as a whole. The caller has refused an empty one.
    fn finish(self, name: &str, line: usize) -> Result<Upstream, Error> {
        let mut u = self.upstream;
        u.name = name.to_owned();
        if let Some(at) = self.policy_line {
            u.policy
                .validate(&u.servers)
                .map_err(|why| error_at(at, why))?;
            // A name's line stands for servers with its parameters.
            if let Some(why) = u.names.iter().find_map(|n| n.refused_by(&u.policy)) {
                return Err(error_at(at, why));
            }
        }
        if !u.has_primary() {
            return Err(error_at(line, only_backups(name)));
        }
        Ok(u)
    }
}

/// nginx's refusal of an upstream whose servers are all `backup`.
pub fn only_backups(name: &str) -> String {
    format!(
        "upstream {name:?} would have only backup servers: nginx refuses that (\"no servers in upstream\")"
    )
}

fn unknown(stmt: &Stmt) -> Error {
    stmt.error(format!(
        "unknown directive {:?}: nginx's upstream {{}} does not take it (it takes {DIRECTIVES})",
        stmt.directive()
    ))
}

/// `zone NAME [SIZE]` as nginx checks it. The zone itself is not needed:
/// every upstream's peer state is shared through the state file.
fn check_zone(name: &str, size: Option<&str>) -> Result<(), String> {
    if name.is_empty() {
        return Err("invalid zone name \"\"".into());
    }
    let Some(size) = size else {
        return Ok(());
    };
    let (digits, scale) = match size.as_bytes().last() {
        Some(b'k' | b'K') => (&size[..size.len() - 1], 1 << 10),
        Some(b'm' | b'M') => (&size[..size.len() - 1], 1 << 20),
        Some(b'g' | b'G') => (&size[..size.len() - 1], 1 << 30),
        _ => (size, 1),
    };
    match parse_decimal(digits).and_then(|n| n.checked_mul(scale)) {
        None => Err(format!("invalid zone size {size:?}")),
        Some(n) if n < ZONE_MIN => Err(format!(
            "zone {name:?} is too small: nginx takes at least 32k"
        )),
        Some(_) => Ok(()),
    }
}

/// The arguments of a `resolver` line: IP addresses with an optional port
/// (53), `valid=TIME` and `ipv6=on|off`, as nginx takes them; host names
/// are not taken (nginx resolves them once, with the system's resolver).
fn parse_resolver(args: &[&str], dns: &mut crate::table::names::DnsSettings) -> Result<(), String> {
    for word in args {
        if let Some(v) = word.strip_prefix("valid=") {
            let ms = bounded_millis(v, TimeSyntax::MILLIS, 1000, DNS_TIME_MAX_MS)
                .map_err(|why| format!("{word}: valid {why}"))?;
            if dns.valid.replace(ms / 1000).is_some() {
                return Err(format!("{word}: valid is given more than once"));
            }
        } else if let Some(v) = word.strip_prefix("ipv6=") {
            let on = match v {
                "on" => true,
                "off" => false,
                _ => return Err(format!("{word}: ipv6 must be on or off")),
            };
            if dns.ipv6.replace(on).is_some() {
                return Err(format!("{word}: ipv6 is given more than once"));
            }
        } else if word.contains('=') {
            return Err(format!(
                "unknown resolver parameter {word:?}: expected `{}`",
                usage("resolver").unwrap_or_default()
            ));
        } else {
            let addr = parse_resolver_address(word)?;
            if dns.resolvers.contains(&addr) {
                return Err(format!("{word}: resolver {addr} is given twice"));
            }
            if dns.resolvers.len() == RESOLVERS_MAX {
                return Err(format!(
                    "{word}: at most {RESOLVERS_MAX} resolver addresses"
                ));
            }
            dns.resolvers.push(addr);
        }
    }
    if dns.resolvers.is_empty() {
        return Err("resolver: no address given".into());
    }
    Ok(())
}

/// A name server's address: `10.0.0.1`, `10.0.0.1:5353`, `[::1]:53`.
pub fn parse_resolver_address(word: &str) -> Result<std::net::SocketAddr, String> {
    const DNS_PORT: u16 = 53;
    if let Ok(ip) = word.parse::<std::net::IpAddr>() {
        return Ok((ip, DNS_PORT).into());
    }
    if let Ok(a) = word.parse::<std::net::SocketAddr>() {
        return Ok(a);
    }
    if let Some(v6) = word.strip_prefix('[').and_then(|w| w.strip_suffix(']')) {
        if let Ok(ip) = v6.parse::<std::net::Ipv6Addr>() {
            return Ok((ip, DNS_PORT).into());
        }
    }
    Err(format!(
        "{word:?}: a resolver is an IP address with an optional port (10.0.0.1, \
         10.0.0.1:5353, [::1]:53), not a host name"
    ))
}

/// The parameters of a `check` line (nginx_upstream_check_module's, and
/// `jitter=`), each at most once; what is not given keeps the module's
/// default.
fn parse_check_line(args: &[&str]) -> Result<CheckLine, String> {
    let mut line = CheckLine::default();
    let mut seen: Vec<&str> = Vec::new();
    for word in args {
        let Some((key, value)) = word.split_once('=') else {
            return Err(format!(
                "unknown check parameter {word:?}: expected `{CHECK_USAGE}`"
            ));
        };
        if seen.contains(&key) {
            return Err(format!("{word}: {key} is given more than once"));
        }
        let time = |min: u32| {
            bounded_millis(value, TimeSyntax::CHECK, min, CHECK_TIME_MAX)
                .map_err(|why| format!("{word}: {key} {why}"))
        };
        match key {
            "interval" => line.interval = time(1)?,
            "timeout" => line.timeout = time(1)?,
            "jitter" => line.jitter = time(0)?,
            "rise" => line.rise = bounded(word, key, value, 1, CHECK_COUNT_MAX)?,
            "fall" => line.fall = bounded(word, key, value, 1, CHECK_COUNT_MAX)?,
            "port" => line.port = bounded(word, key, value, 0, u32::from(u16::MAX))? as u16,
            "default_down" => {
                line.default_down = match value.to_ascii_lowercase().as_str() {
                    "true" => true,
                    "false" => false,
                    _ => return Err(format!("{word}: default_down must be true or false")),
                }
            }
            "type" => {
                line.kind = CheckType::from_name(value).ok_or_else(|| {
                    format!(
                        "{word}: check type {value:?} is not supported: use tcp, http, https or ssl_hello"
                    )
                })?
            }
            _ => return Err(format!("unknown check parameter {word:?}: expected `{CHECK_USAGE}`")),
        }
        seen.push(key);
    }
    Ok(line)
}

/// Parses a body as ngx_http_dyups_module takes it (`server
/// 127.0.0.1:8089;server 127.0.0.1:8088;`) into the upstream `name`: what
/// an `upstream {}` block of nginx takes, without the braces.
pub fn parse_body(name: &str, body: &str) -> Result<Upstream, Error> {
    let mut lexer = Lexer::new(body)?;
    let def = Definition::read(&mut lexer, None)?;
    let first = def.lines.values().chain(def.named_lines.values()).min();
    let Some(&line) = first else {
        return Err(Error::BadRequest(format!(
            "no server in body: {SERVER_USAGE}"
        )));
    };
    def.finish(name, line)
}

/// The servers of a body (see [`parse_body`]).
pub fn parse_servers(body: &str) -> Result<Vec<ServerSpec>, Error> {
    parse_body("body", body).map(|u| u.servers)
}

/// Parses an nginx-syntax file of `upstream NAME { ... }` blocks, each read
/// as [`parse_body`] reads a body: what nginx would refuse is refused,
/// naming the line.
pub fn parse_upstream_file(text: &str) -> Result<Table, Error> {
    let mut lexer = Lexer::new(text)?;
    let mut table = Table::default();
    let mut lines: HashMap<String, usize> = HashMap::new();
    loop {
        let stmt = lexer.statement()?;
        match stmt.end {
            Terminator::Eof if stmt.words.is_empty() => break,
            Terminator::Eof => return Err(stmt.error("missing ';' or '{' at the end")),
            Terminator::BlockEnd => return Err(error_at(stmt.line, "unexpected '}'")),
            Terminator::Semicolon | Terminator::BlockStart if stmt.directive() != "upstream" => {
                return Err(stmt.error(format!(
                    "directive {:?} is not allowed here: expected `upstream NAME {{ ... }}`",
                    stmt.directive()
                )))
            }
            Terminator::Semicolon => return Err(stmt.error("expected `upstream NAME { ... }`")),
            Terminator::BlockStart => {
                let upstream = upstream_block(&mut lexer, &stmt)?;
                // nginx compares upstream names without regard to case.
                if let Some(first) = lines.insert(name_key(&upstream.name).into_owned(), stmt.line)
                {
                    return Err(stmt.error(format!(
                        "upstream {:?} is defined twice, on line {first} and line {}",
                        upstream.name, stmt.line
                    )));
                }
                table.upstreams.push(upstream.into());
            }
        }
    }
    Ok(table)
}

/// The rest of an `upstream NAME {` block, up to its `}`.
fn upstream_block(lexer: &mut Lexer<'_>, opened: &Stmt) -> Result<Upstream, Error> {
    let [_, name] = opened.words.as_slice() else {
        return Err(opened.error("expected `upstream NAME { ... }`"));
    };
    check_name(name).map_err(|why| opened.error(why))?;
    let def = Definition::read(lexer, Some(opened))?;
    if def.upstream.servers.is_empty() && def.upstream.names.is_empty() {
        return Err(opened.error(format!("upstream {name:?} has no server")));
    }
    def.finish(name, opened.line)
}
