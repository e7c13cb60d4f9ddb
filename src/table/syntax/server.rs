//! `server` lines: addresses in nginx's spellings and the parameters after
//! them, with nginx's time syntax for `fail_timeout=`.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use super::SERVER_USAGE;
use crate::table::model::{
    Address, ServerPatch, ServerSpec, DEFAULT_PORT, FAIL_TIMEOUT_MAX, MAX_CONNS_MAX, MAX_FAILS_MAX,
    SLOW_START_MAX, WEIGHT_MAX, WEIGHT_MIN,
};
use crate::table::names::{check_host, check_service, NamedServer, ServerParams};

/// What a `server` line names: an address, or a host name to resolve.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Addr(Address),
    Name { host: String, port: Option<u16> },
}

/// One `server` line: a server at an address, or a `server NAME` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerLine {
    Addr(ServerSpec),
    Named(NamedServer),
}

/// `sizeof(sun_path) - 1` on Linux: the longest unix socket path.
const UNIX_PATH_MAX: usize = 107;

/// Parses a server address as nginx spells it: `127.0.0.1:8088`, `127.0.0.1`,
/// `[::1]:8080`, `[::1]` or `unix:/path`. A missing port is 80, as in nginx.
/// A host name is refused: only `server` lines take one.
pub fn parse_address(s: &str) -> Result<Address, String> {
    match parse_target(s)? {
        Target::Addr(a) => Ok(a),
        Target::Name { .. } => Err(format!(
            "{s:?} is a host name: name a server by its address here \
             (127.0.0.1:80, [::1]:80, unix:/path)"
        )),
    }
}

/// Parses what a `server` line names: an address as [`parse_address`]
/// takes it, or a host name with an optional port (`app.internal:8080`).
pub fn parse_target(s: &str) -> Result<Target, String> {
    if let Some(path) = s.strip_prefix("unix:") {
        return parse_unix_path(s, path).map(Target::Addr);
    }
    if let Some((scheme, rest)) = s.split_once("://") {
        return Err(format!(
            "{s:?}: a server address has no scheme ({scheme}://): write {rest:?}"
        ));
    }
    if s.contains(',') {
        return Err(format!(
            "{s:?}: one address, not a list: name each server on its own"
        ));
    }
    if let Some(rest) = s.strip_prefix('[') {
        return parse_bracketed_v6(s, rest).map(Target::Addr);
    }
    if s.matches(':').count() > 1 && looks_like_ipv6(s) {
        return Err(format!(
            "{s:?}: an IPv6 address needs brackets, as in [::1]:8080"
        ));
    }
    let (host, port) = match s.rsplit_once(':') {
        Some((host, port)) => (host, parse_port(s, port)?),
        None => (s, DEFAULT_PORT),
    };
    if host.is_empty() {
        return Err(format!("{s:?}: the address has no host"));
    }
    if let Ok(ip) = host.parse::<Ipv4Addr>() {
        return Ok(Target::Addr(Address::Inet(SocketAddr::from((ip, port)))));
    }
    check_host(host)?;
    Ok(Target::Name {
        host: host.to_owned(),
        port: s.rsplit_once(':').map(|_| port),
    })
}

fn parse_unix_path(s: &str, path: &str) -> Result<Address, String> {
    if path.is_empty() {
        return Err(format!("{s:?}: the unix socket path is empty"));
    }
    if !path.starts_with('/') {
        return Err(format!("{s:?}: the unix socket path must be absolute"));
    }
    if path.len() > UNIX_PATH_MAX {
        return Err(format!(
            "{s:?}: the unix socket path is {} bytes long, at most {UNIX_PATH_MAX} are allowed",
            path.len()
        ));
    }
    // The upstream file holds the path as one bare word: anything the
    // tokenizer would split on, unescape or refuse cannot round-trip.
    if let Some(c) = path
        .chars()
        .find(|&c| c.is_control() || c.is_ascii_whitespace() || matches!(c, ';' | '{' | '\\'))
    {
        return Err(format!(
            "{s:?}: the unix socket path has {c:?}, which an upstream file cannot hold"
        ));
    }
    Ok(Address::Unix(path.to_owned()))
}

/// `rest` is what follows the `[`.
fn parse_bracketed_v6(s: &str, rest: &str) -> Result<Address, String> {
    let Some((ip, after)) = rest.split_once(']') else {
        return Err(format!("{s:?}: missing ']' after the IPv6 address"));
    };
    let ip: Ipv6Addr = ip
        .parse()
        .map_err(|_| format!("{s:?}: {ip:?} is not an IPv6 address"))?;
    let port = match after {
        "" => DEFAULT_PORT,
        _ => match after.strip_prefix(':') {
            Some(port) => parse_port(s, port)?,
            None => return Err(format!("{s:?}: expected ':PORT' after ']'")),
        },
    };
    Ok(Address::Inet(SocketAddr::from((ip, port))))
}

/// Hex digits, colons and dots only: an IPv6 literal someone forgot to bracket.
fn looks_like_ipv6(s: &str) -> bool {
    s.chars()
        .all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.')
}

fn parse_port(s: &str, port: &str) -> Result<u16, String> {
    match parse_decimal(port) {
        Some(p @ 1..=65535) => Ok(p as u16),
        _ => Err(format!("{s:?}: port must be 1..65535")),
    }
}

/// Plain ASCII digits, no sign; `None` when empty, not a number or beyond u64.
pub(super) fn parse_decimal(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Parses what follows `server` in a `server ...;` line: an address and
/// nginx's `weight=`, `max_conns=`, `max_fails=`, `fail_timeout=`, `backup`
/// and `down`, and NGINX Plus's `slow_start=`.
pub fn parse_server_args(args: &str) -> Result<ServerSpec, String> {
    match parse_server_line(args)? {
        ServerLine::Addr(spec) => Ok(spec),
        ServerLine::Named(n) => Err(format!(
            "{:?} is a host name: name a server by its address here \
             (127.0.0.1:80, [::1]:80, unix:/path)",
            n.target()
        )),
    }
}

/// Parses what follows `server` in a `server ...;` line, an address or a
/// host name with nginx's parameters; a host name also takes `resolve`,
/// and `service=NAME` (SRV records), with nginx's rules: `resolve` given,
/// no port, a host name.
pub fn parse_server_line(args: &str) -> Result<ServerLine, String> {
    let mut words = args.split_ascii_whitespace();
    let Some(addr) = words.next() else {
        return Err(format!("missing address: {SERVER_USAGE}"));
    };
    let target = parse_target(addr)?;
    // Parameters are read onto a server at a placeholder address.
    let mut spec = ServerSpec::new(Address::Unix("/".into()));
    let mut seen = Seen::default();
    let mut resolve = false;
    let mut service: Option<String> = None;
    for word in words {
        match word.split_once('=').map_or(word, |(k, _)| k) {
            "resolve" if word == "resolve" => {
                if std::mem::replace(&mut resolve, true) {
                    return Err("resolve: resolve is given more than once".into());
                }
            }
            "resolve" => {
                return Err(format!(
                    "{word}: resolve takes no value in nginx: write `resolve`"
                ))
            }
            "service" => {
                let Some(("service", value)) = word.split_once('=') else {
                    return Err(format!("{word}: write service=NAME"));
                };
                check_service(value).map_err(|e| format!("{word}: {e}"))?;
                if service.replace(value.to_owned()).is_some() {
                    return Err(format!("{word}: service= is given more than once"));
                }
            }
            _ => apply_param(&mut spec, &mut seen, word)?,
        }
    }
    if let Some(s) = &service {
        // nginx's checks, in its order and words.
        if !resolve {
            return Err(format!(
                "service={s}: service upstream \"{addr}\" requires \"resolve\" parameter"
            ));
        }
        match &target {
            Target::Name { port: Some(_), .. } => {
                return Err(format!(
                    "service={s}: service upstream \"{addr}\" may not have port"
                ))
            }
            Target::Addr(_) => {
                return Err(format!(
                    "service={s}: service upstream \"{addr}\" requires domain name"
                ))
            }
            Target::Name { host, .. } => {
                let mut probe = NamedServer::new(host.clone(), None, ServerParams::default(), true);
                probe.service = service.clone();
                check_host(&probe.query_name()).map_err(|e| format!("service={s}: {e}"))?;
            }
        }
    }
    match target {
        Target::Addr(addr) if resolve => Err(format!(
            "{addr} resolve: {addr} is an address; resolve is for a host name"
        )),
        Target::Addr(addr) => Ok(ServerLine::Addr(ServerSpec { addr, ..spec })),
        Target::Name { host, port } => {
            let mut n = NamedServer::new(host, port, ServerParams::of(&spec), resolve);
            n.service = service;
            Ok(ServerLine::Named(n))
        }
    }
}

/// Parses the parameters of a `PATCH` to one server: `weight=N`,
/// `max_conns=N`, `max_fails=N`, `fail_timeout=TIME`, `slow_start=TIME`,
/// `backup=on|off`,
/// `down=on|off` (a bare `backup` or `down` means on), each at most once, at
/// least one.
pub fn parse_server_patch(args: &str) -> Result<ServerPatch, String> {
    let mut patch = ServerPatch::default();
    for word in args.split_ascii_whitespace() {
        if word.contains(';') {
            return Err(format!(
                "{word:?}: a PATCH body is parameters without ';', as in \"weight=2 down=on\""
            ));
        }
        let (key, value) = word.split_once('=').unwrap_or((word, "on"));
        let switch = |v: &str| match v {
            "on" | "1" | "true" => Ok(true),
            "off" | "0" | "false" => Ok(false),
            _ => Err(format!("{word}: {key} must be on or off")),
        };
        let repeated = match key {
            "weight" => patch
                .weight
                .replace(bounded(word, key, value, WEIGHT_MIN, WEIGHT_MAX)?)
                .is_some(),
            "max_conns" => patch
                .max_conns
                .replace(bounded(word, key, value, 0, MAX_CONNS_MAX)?)
                .is_some(),
            "max_fails" => patch
                .max_fails
                .replace(bounded(word, key, value, 0, MAX_FAILS_MAX)?)
                .is_some(),
            "fail_timeout" => patch
                .fail_timeout
                .replace(parse_fail_timeout(word, value)?)
                .is_some(),
            "slow_start" => patch
                .slow_start
                .replace(parse_slow_start(word, value)?)
                .is_some(),
            "backup" => patch.backup.replace(switch(value)?).is_some(),
            "down" => patch.down.replace(switch(value)?).is_some(),
            _ => return Err(format!("unknown parameter {word:?}")),
        };
        if repeated {
            return Err(format!("{word}: {key} is given more than once"));
        }
    }
    if patch.is_empty() {
        return Err("no parameter to change: give weight=, max_conns=, max_fails=, fail_timeout=, slow_start=, backup=on|off or down=on|off".into());
    }
    Ok(patch)
}

/// Which parameters a server line already gave, to refuse repeats.
#[derive(Default)]
struct Seen {
    weight: bool,
    max_conns: bool,
    max_fails: bool,
    fail_timeout: bool,
    slow_start: bool,
    backup: bool,
    down: bool,
}

fn apply_param(spec: &mut ServerSpec, seen: &mut Seen, word: &str) -> Result<(), String> {
    let (key, value) = match word.split_once('=') {
        Some((k, v)) => (k, Some(v)),
        None => (word, None),
    };
    let flag = match (key, value) {
        ("weight", Some(_)) => &mut seen.weight,
        ("max_conns", Some(_)) => &mut seen.max_conns,
        ("max_fails", Some(_)) => &mut seen.max_fails,
        ("fail_timeout", Some(_)) => &mut seen.fail_timeout,
        ("slow_start", Some(_)) => &mut seen.slow_start,
        ("backup", None) => &mut seen.backup,
        ("down", None) => &mut seen.down,
        ("weight" | "max_conns" | "max_fails" | "fail_timeout" | "slow_start", None) => {
            return Err(format!("{word}: {word} needs a value, as in {word}=N"))
        }
        ("backup" | "down", Some(_)) => {
            return Err(format!(
                "{word}: {key} takes no value in nginx: write `{key}`, or leave it out"
            ))
        }
        _ => return Err(format!("unknown parameter {word:?}")),
    };
    if std::mem::replace(flag, true) {
        return Err(format!("{word}: {key} is given more than once"));
    }
    let value = value.unwrap_or_default();
    match key {
        "weight" => spec.weight = bounded(word, key, value, WEIGHT_MIN, WEIGHT_MAX)?,
        "max_conns" => spec.max_conns = bounded(word, key, value, 0, MAX_CONNS_MAX)?,
        "max_fails" => spec.max_fails = bounded(word, key, value, 0, MAX_FAILS_MAX)?,
        "fail_timeout" => spec.fail_timeout = parse_fail_timeout(word, value)?,
        "slow_start" => spec.slow_start = parse_slow_start(word, value)?,
        "backup" => spec.backup = true,
        _ => spec.down = true,
    }
    Ok(())
}

pub(super) fn bounded(
    word: &str,
    key: &str,
    value: &str,
    min: u32,
    max: u32,
) -> Result<u32, String> {
    match parse_decimal(value) {
        Some(n) if (u64::from(min)..=u64::from(max)).contains(&n) => Ok(n as u32),
        _ => Err(format!("{word}: {key} must be {min}..{max}")),
    }
}

fn parse_fail_timeout(word: &str, value: &str) -> Result<u32, String> {
    let secs = parse_time(value, TimeSyntax::SECONDS)
        .map_err(|why| format!("{word}: fail_timeout {why}"))?;
    u32::try_from(secs)
        .ok()
        .filter(|&s| s <= FAIL_TIMEOUT_MAX)
        .ok_or_else(|| format!("{word}: fail_timeout must be 0..{FAIL_TIMEOUT_MAX} seconds"))
}

/// NGINX Plus's `slow_start=TIME`: nginx's time syntax, kept in seconds.
fn parse_slow_start(word: &str, value: &str) -> Result<u32, String> {
    let secs = parse_time(value, TimeSyntax::SECONDS)
        .map_err(|why| format!("{word}: slow_start {why}"))?;
    u32::try_from(secs)
        .ok()
        .filter(|&s| s <= SLOW_START_MAX)
        .ok_or_else(|| format!("{word}: slow_start must be 0..{SLOW_START_MAX} seconds"))
}

/// How a time is read: nginx's `ngx_parse_time` for a value kept in seconds
/// (`is_sec`: `fail_timeout`) or in milliseconds (`keepalive_timeout`), and
/// nginx_upstream_check_module's, whose bare numbers are milliseconds.
#[derive(Clone, Copy)]
pub(super) struct TimeSyntax {
    /// The result is in milliseconds (else in seconds, and `ms` is refused).
    millis: bool,
    /// A number without a unit counts as milliseconds (else as seconds).
    bare_millis: bool,
}

impl TimeSyntax {
    const SECONDS: TimeSyntax = TimeSyntax {
        millis: false,
        bare_millis: false,
    };
    pub(super) const MILLIS: TimeSyntax = TimeSyntax {
        millis: true,
        bare_millis: false,
    };
    pub(super) const CHECK: TimeSyntax = TimeSyntax {
        millis: true,
        bare_millis: true,
    };

    fn example(self) -> &'static str {
        match (self.millis, self.bare_millis) {
            (false, _) => "must be a time such as 10, 10s, 1m30s, 2h or 1d",
            (true, false) => "must be a time such as 60, 60s, 500ms, 1m30s or 1h",
            (true, true) => "must be a time such as 3000 (milliseconds), 3s, 500ms or 1m",
        }
    }
}

/// Units from largest to smallest, in milliseconds; the index is the order
/// they must follow, and each is given at most once.
const TIME_UNITS: [(&str, u64); 8] = [
    ("y", 365 * 86_400_000),
    ("M", 30 * 86_400_000),
    ("w", 7 * 86_400_000),
    ("d", 86_400_000),
    ("h", 3_600_000),
    ("m", 60_000),
    ("s", 1000),
    ("ms", 1),
];
const SECOND_RANK: usize = 6;
const MILLI_RANK: usize = 7;

/// nginx's time syntax: numbers with units in decreasing order, each unit at
/// most once, a trailing bare number counting in the syntax's bare unit (so
/// it cannot follow that unit or a smaller one). In milliseconds or seconds
/// as `syntax` says; `y` and `M` only for seconds, as in nginx.
fn parse_time(s: &str, syntax: TimeSyntax) -> Result<u64, &'static str> {
    let bad = syntax.example();
    let mut rest = s;
    let mut total: u64 = 0;
    let mut next_rank = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let number = parse_decimal(&rest[..digits]).ok_or(bad)?;
        rest = &rest[digits..];
        let rank = if rest.is_empty() {
            if syntax.bare_millis {
                MILLI_RANK
            } else {
                SECOND_RANK
            }
        } else if rest.starts_with("ms") {
            if !syntax.millis {
                return Err("is in seconds in nginx; ms is not allowed here");
            }
            MILLI_RANK
        } else {
            TIME_UNITS[..MILLI_RANK]
                .iter()
                .position(|(u, _)| rest.starts_with(u))
                .filter(|&at| !(syntax.millis && at < 2))
                .ok_or(bad)?
        };
        if rank < next_rank {
            return Err(bad);
        }
        next_rank = rank + 1;
        rest = rest.get(TIME_UNITS[rank].0.len()..).unwrap_or_default();
        total = number
            .checked_mul(TIME_UNITS[rank].1)
            .and_then(|n| total.checked_add(n))
            .ok_or("is too large")?;
    }
    if s.is_empty() {
        return Err(bad);
    }
    Ok(if syntax.millis { total } else { total / 1000 })
}

/// A time in milliseconds read with `syntax`, within `min..=max`: the
/// reason when it is not, to follow the parameter's name.
pub(super) fn bounded_millis(
    value: &str,
    syntax: TimeSyntax,
    min: u32,
    max: u32,
) -> Result<u32, String> {
    let ms = parse_time(value, syntax).map_err(str::to_owned)?;
    u32::try_from(ms)
        .ok()
        .filter(|ms| (min..=max).contains(ms))
        .ok_or_else(|| format!("must be {min}..{max} milliseconds"))
}
