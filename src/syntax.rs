//! nginx syntax: `server ...;` bodies and `upstream NAME { ... }` files.
//!
//! Both are read with one tokenizer that mirrors nginx's own
//! (`ngx_conf_read_token`): words separated by whitespace, statements ended by
//! `;`, `{` or `}`, `"`/`'` quoting with backslash escapes, and `#` comments
//! only where a new token could start. Blocks of `*_by_lua_block` directives
//! are skipped the way ngx_lua reads them (Lua strings, long brackets and `--`
//! comments), since that is what OpenResty does with them.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::error::Error;
use crate::model::{
    check_http_send, check_name, name_key, Address, CheckLine, CheckType, ExpectAlive, ServerPatch,
    ServerSpec, Table, Upstream, CHECK_COUNT_MAX, CHECK_KEEPALIVE_REQUESTS_MAX, CHECK_TIME_MAX,
    DEFAULT_CHECK_HTTP_SEND, DEFAULT_CHECK_KEEPALIVE_REQUESTS, DEFAULT_FAIL_TIMEOUT,
    DEFAULT_KEEPALIVE_REQUESTS, DEFAULT_KEEPALIVE_TIME, DEFAULT_KEEPALIVE_TIMEOUT,
    DEFAULT_MAX_FAILS, DEFAULT_PORT, DEFAULT_WEIGHT, FAIL_TIMEOUT_MAX, MAX_CONNS_MAX,
    MAX_FAILS_MAX, WEIGHT_MAX, WEIGHT_MIN,
};
use crate::policy::Policy;

/// `sizeof(sun_path) - 1` on Linux: the longest unix socket path.
const UNIX_PATH_MAX: usize = 107;
/// How much of a statement an error message quotes.
const EXCERPT_MAX: usize = 80;
/// The header `render_upstream_file` writes.
const FILE_HEADER: &str = "# written by ngx.dyups; edits are overwritten\n";
const SERVER_USAGE: &str = "expected `server ADDR [PARAMS];`";

// ---------------------------------------------------------------------------
// Addresses and server parameters
// ---------------------------------------------------------------------------

/// Parses a server address as nginx spells it: `127.0.0.1:8088`, `127.0.0.1`,
/// `[::1]:8080`, `[::1]` or `unix:/path`. A missing port is 80, as in nginx.
pub fn parse_address(s: &str) -> Result<Address, String> {
    if let Some(path) = s.strip_prefix("unix:") {
        return parse_unix_path(s, path);
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
        return parse_bracketed_v6(s, rest);
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
    match host.parse::<Ipv4Addr>() {
        Ok(ip) => Ok(Address::Inet(SocketAddr::from((ip, port)))),
        Err(_) => Err(format!(
            "{s:?}: host names are not supported yet; use an IP literal \
             (127.0.0.1:80, [::1]:80) or unix:/path"
        )),
    }
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
fn parse_decimal(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Parses what follows `server` in a `server ...;` line: an address and
/// nginx's `weight=`, `max_conns=`, `max_fails=`, `fail_timeout=`, `backup`
/// and `down`.
pub fn parse_server_args(args: &str) -> Result<ServerSpec, String> {
    let mut words = args.split_ascii_whitespace();
    let Some(addr) = words.next() else {
        return Err(format!("missing address: {SERVER_USAGE}"));
    };
    let mut spec = ServerSpec::new(parse_address(addr)?);
    let mut seen = Seen::default();
    for word in words {
        apply_param(&mut spec, &mut seen, word)?;
    }
    Ok(spec)
}

/// Parses the parameters of a `PATCH` to one server: `weight=N`,
/// `max_conns=N`, `max_fails=N`, `fail_timeout=TIME`, `backup=on|off`,
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
            "backup" => patch.backup.replace(switch(value)?).is_some(),
            "down" => patch.down.replace(switch(value)?).is_some(),
            _ => return Err(format!("unknown parameter {word:?}")),
        };
        if repeated {
            return Err(format!("{word}: {key} is given more than once"));
        }
    }
    if patch.is_empty() {
        return Err("no parameter to change: give weight=, max_conns=, max_fails=, fail_timeout=, backup=on|off or down=on|off".into());
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
        ("backup", None) => &mut seen.backup,
        ("down", None) => &mut seen.down,
        ("weight" | "max_conns" | "max_fails" | "fail_timeout", None) => {
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
        "backup" => spec.backup = true,
        _ => spec.down = true,
    }
    Ok(())
}

fn bounded(word: &str, key: &str, value: &str, min: u32, max: u32) -> Result<u32, String> {
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

/// How a time is read: nginx's `ngx_parse_time` for a value kept in seconds
/// (`is_sec`: `fail_timeout`) or in milliseconds (`keepalive_timeout`), and
/// nginx_upstream_check_module's, whose bare numbers are milliseconds.
#[derive(Clone, Copy)]
struct TimeSyntax {
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
    const MILLIS: TimeSyntax = TimeSyntax {
        millis: true,
        bare_millis: false,
    };
    const CHECK: TimeSyntax = TimeSyntax {
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
fn bounded_millis(value: &str, syntax: TimeSyntax, min: u32, max: u32) -> Result<u32, String> {
    let ms = parse_time(value, syntax).map_err(str::to_owned)?;
    u32::try_from(ms)
        .ok()
        .filter(|ms| (min..=max).contains(ms))
        .ok_or_else(|| format!("must be {min}..{max} milliseconds"))
}

// ---------------------------------------------------------------------------
// The tokenizer
// ---------------------------------------------------------------------------

/// How a statement ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Terminator {
    /// `;`
    Semicolon,
    /// `{`: a block follows.
    BlockStart,
    /// `}`: the enclosing block ends (the statement has no words).
    BlockEnd,
    /// The end of the text; words, if any, lack their `;`.
    Eof,
}

/// One statement: its words (quotes removed, escapes applied) and the line
/// where it starts.
#[derive(Debug)]
struct Stmt {
    words: Vec<String>,
    line: usize,
    end: Terminator,
}

impl Stmt {
    fn directive(&self) -> &str {
        self.words.first().map_or("", String::as_str)
    }

    /// The statement as an error message quotes it, on one line: a quoted
    /// word's tabs, CRs and LFs are shown escaped.
    fn excerpt(&self) -> String {
        let mut text = self
            .words
            .join(" ")
            .replace('\t', "\\t")
            .replace('\r', "\\r")
            .replace('\n', "\\n");
        if text.len() > EXCERPT_MAX {
            let mut cut = EXCERPT_MAX;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            text.push_str("...");
        }
        text
    }

    /// An error about this statement: `line N: STATEMENT: why`.
    fn error(&self, why: impl std::fmt::Display) -> Error {
        Error::BadRequest(format!("line {}: {}: {why}", self.line, self.excerpt()))
    }
}

fn error_at(line: usize, why: impl std::fmt::Display) -> Error {
    Error::BadRequest(format!("line {line}: {why}"))
}

struct Lexer<'a> {
    src: &'a [u8],
    pos: usize,
    line: usize,
}

impl<'a> Lexer<'a> {
    /// Refuses NUL and other control characters up front, so that nothing
    /// later has to think about them.
    fn new(text: &'a str) -> Result<Lexer<'a>, Error> {
        check_chars(text)?;
        Ok(Lexer {
            src: text.as_bytes(),
            pos: 0,
            line: 1,
        })
    }

    fn peek(&self) -> Option<u8> {
        self.src.get(self.pos).copied()
    }

    /// Moves past one byte, counting lines.
    fn bump(&mut self) -> Option<u8> {
        let b = self.peek()?;
        self.pos += 1;
        if b == b'\n' {
            self.line += 1;
        }
        Some(b)
    }

    /// Skips whitespace and `#` comments: the places a new token may start.
    fn skip_space(&mut self) {
        while let Some(b) = self.peek() {
            match b {
                b' ' | b'\t' | b'\r' | b'\n' => {
                    self.bump();
                }
                b'#' => {
                    while self.peek().is_some_and(|b| b != b'\n') {
                        self.pos += 1;
                    }
                }
                _ => return,
            }
        }
    }

    /// Reads the next statement, as `ngx_conf_read_token` does.
    fn statement(&mut self) -> Result<Stmt, Error> {
        let mut words = Vec::new();
        let mut line = self.line;
        loop {
            self.skip_space();
            if words.is_empty() {
                line = self.line;
            }
            let Some(b) = self.peek() else {
                return Ok(Stmt {
                    words,
                    line,
                    end: Terminator::Eof,
                });
            };
            let end = match b {
                b';' => Terminator::Semicolon,
                b'{' => Terminator::BlockStart,
                b'}' => Terminator::BlockEnd,
                b'"' | b'\'' => {
                    words.push(self.quoted_word()?);
                    continue;
                }
                _ => {
                    words.push(self.bare_word());
                    continue;
                }
            };
            self.bump();
            let unexpected = match end {
                Terminator::BlockEnd => !words.is_empty(),
                _ => words.is_empty(),
            };
            if unexpected {
                return Err(error_at(self.line, format!("unexpected '{}'", b as char)));
            }
            return Ok(Stmt { words, line, end });
        }
    }

    /// A word up to whitespace, `;` or `{`. As in nginx, `}`, quotes and `#`
    /// inside a word are ordinary characters, and `${` stays in the word.
    fn bare_word(&mut self) -> String {
        let mut word = Vec::new();
        while let Some(b) = self.peek() {
            match b {
                b' ' | b'\t' | b'\r' | b'\n' | b';' => break,
                b'{' if word.last() != Some(&b'$') => break,
                b'\\' => {
                    self.bump();
                    match self.bump() {
                        Some(next) => push_escaped(&mut word, next),
                        None => word.push(b'\\'),
                    }
                }
                _ => {
                    self.bump();
                    word.push(b);
                }
            }
        }
        String::from_utf8_lossy(&word).into_owned()
    }

    /// A `"..."` or `'...'` word. nginx wants whitespace, `;`, `{` or `)`
    /// right after the closing quote.
    fn quoted_word(&mut self) -> Result<String, Error> {
        let start_line = self.line;
        let quote = self.bump().unwrap_or(b'"');
        let mut word = Vec::new();
        loop {
            match self.bump() {
                None => {
                    return Err(error_at(start_line, "the quoted string is not closed"));
                }
                Some(b) if b == quote => break,
                Some(b'\\') => match self.bump() {
                    Some(next) => push_escaped(&mut word, next),
                    None => word.push(b'\\'),
                },
                Some(b) => word.push(b),
            }
        }
        match self.peek() {
            None | Some(b' ' | b'\t' | b'\r' | b'\n' | b';' | b'{') => {}
            Some(b')') => {
                self.bump();
            }
            Some(b) => {
                return Err(error_at(
                    self.line,
                    format!("unexpected '{}' after a quoted string", b as char),
                ));
            }
        }
        Ok(String::from_utf8_lossy(&word).into_owned())
    }

    /// Skips the Lua code of a `*_by_lua_block` whose `{` was just read, the
    /// way ngx_lua reads it: braces count outside Lua strings and comments,
    /// and `#` is Lua's length operator, not a comment.
    fn skip_lua_block(&mut self, opened: &Stmt) -> Result<(), Error> {
        let mut depth = 1usize;
        while let Some(b) = self.bump() {
            match b {
                b'{' => depth += 1,
                b'}' => {
                    depth -= 1;
                    if depth == 0 {
                        return Ok(());
                    }
                }
                b'"' | b'\'' => self.skip_lua_string(b, opened)?,
                b'[' => {
                    if let Some(level) = self.long_bracket_level() {
                        self.skip_long_bracket(level, opened)?;
                    }
                }
                b'-' if self.peek() == Some(b'-') => {
                    self.bump();
                    self.skip_lua_comment(opened)?;
                }
                _ => {}
            }
        }
        Err(opened.error("the Lua block is not closed"))
    }

    fn skip_lua_string(&mut self, quote: u8, opened: &Stmt) -> Result<(), Error> {
        while let Some(b) = self.bump() {
            match b {
                b'\\' => {
                    self.bump();
                }
                b'\n' => break,
                _ if b == quote => return Ok(()),
                _ => {}
            }
        }
        Err(opened.error(format!(
            "a Lua string is not closed before line {}",
            self.line
        )))
    }

    /// After a `--`: a long comment `--[==[ ... ]==]` or one to the end of line.
    fn skip_lua_comment(&mut self, opened: &Stmt) -> Result<(), Error> {
        if self.peek() == Some(b'[') {
            self.bump();
            if let Some(level) = self.long_bracket_level() {
                return self.skip_long_bracket(level, opened);
            }
        }
        while self.peek().is_some_and(|b| b != b'\n') {
            self.pos += 1;
        }
        Ok(())
    }

    /// After a `[`: if `=*[` follows, consumes it and returns the number of `=`.
    fn long_bracket_level(&mut self) -> Option<usize> {
        let rest = &self.src[self.pos..];
        let level = rest.iter().take_while(|&&b| b == b'=').count();
        if rest.get(level) != Some(&b'[') {
            return None;
        }
        self.pos += level + 1;
        Some(level)
    }

    fn skip_long_bracket(&mut self, level: usize, opened: &Stmt) -> Result<(), Error> {
        while let Some(b) = self.bump() {
            if b != b']' {
                continue;
            }
            let rest = &self.src[self.pos..];
            let eqs = rest.iter().take_while(|&&b| b == b'=').count();
            if eqs == level && rest.get(level) == Some(&b']') {
                self.pos += level + 1;
                return Ok(());
            }
        }
        Err(opened.error("a Lua long string or comment is not closed"))
    }
}

/// nginx's escapes: `\"`, `\'`, `\\`, `\t`, `\r`, `\n`; any other backslash
/// stays as written.
fn push_escaped(word: &mut Vec<u8>, next: u8) {
    match next {
        b'"' | b'\'' | b'\\' => word.push(next),
        b't' => word.push(b'\t'),
        b'r' => word.push(b'\r'),
        b'n' => word.push(b'\n'),
        _ => word.extend_from_slice(&[b'\\', next]),
    }
}

/// Refuses NUL and control characters other than tab, CR and LF.
fn check_chars(text: &str) -> Result<(), Error> {
    let mut line = 1;
    for c in text.chars() {
        match c {
            '\n' => line += 1,
            '\t' | '\r' => {}
            '\0' => return Err(error_at(line, "NUL byte in the text")),
            c if c.is_control() => {
                return Err(error_at(
                    line,
                    format!("control character U+{:04X} in the text", c as u32),
                ))
            }
            _ => {}
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Server bodies and upstream files
// ---------------------------------------------------------------------------

/// What an upstream definition takes, as nginx's `upstream {}` does (with
/// lua-nginx-module and nginx_upstream_check_module), for error messages.
const DIRECTIVES: &str = "server, the balancing methods, keepalive*, zone, \
     balancer_by_lua_* and check*";

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
        let spec = parse_server_args(&args).map_err(|why| stmt.error(why))?;
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
    let Some(first) = def.upstream.servers.first() else {
        return Err(Error::BadRequest(format!(
            "no server in body: {SERVER_USAGE}"
        )));
    };
    let line = def.lines[&first.addr];
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
    if def.upstream.servers.is_empty() {
        return Err(opened.error(format!("upstream {name:?} has no server")));
    }
    def.finish(name, opened.line)
}

// ---------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------

/// `server ADDR [PARAMS];`, with only the parameters that differ from nginx's
/// defaults.
pub fn render_server(s: &ServerSpec) -> String {
    let mut out = format!("server {}", s.addr);
    if s.weight != DEFAULT_WEIGHT {
        out.push_str(&format!(" weight={}", s.weight));
    }
    if s.max_conns != 0 {
        out.push_str(&format!(" max_conns={}", s.max_conns));
    }
    if s.max_fails != DEFAULT_MAX_FAILS {
        out.push_str(&format!(" max_fails={}", s.max_fails));
    }
    if s.fail_timeout != DEFAULT_FAIL_TIMEOUT {
        out.push_str(&format!(" fail_timeout={}s", s.fail_timeout));
    }
    if s.backup {
        out.push_str(" backup");
    }
    if s.down {
        out.push_str(" down");
    }
    out.push(';');
    out
}

/// `upstream NAME {` with its setting lines, then one indented `server`
/// line per server, then `}`.
pub fn render_upstream(u: &Upstream) -> String {
    let mut out = format!("upstream {} {{\n", u.name);
    let servers = u.servers.iter().map(render_server);
    for line in setting_lines(u).into_iter().chain(servers) {
        out.push_str("    ");
        out.push_str(&line);
        out.push('\n');
    }
    out.push_str("}\n");
    out
}

/// The lines of an upstream besides its servers, each with its `;`: the
/// balancing method, the keepalive lines and the check lines, each only
/// when it differs from nginx's (or the check module's) default. Every
/// string in them is quoted so that it reads back as it is: none can end a
/// line or a statement early.
pub fn setting_lines(u: &Upstream) -> Vec<String> {
    let mut lines = Vec::new();
    if u.policy != Policy::RoundRobin {
        lines.push(u.policy.to_string());
    }
    if u.keepalive > 0 {
        lines.push(format!("keepalive {};", u.keepalive));
    }
    if u.keepalive_requests != DEFAULT_KEEPALIVE_REQUESTS {
        lines.push(format!("keepalive_requests {};", u.keepalive_requests));
    }
    if u.keepalive_time != DEFAULT_KEEPALIVE_TIME {
        lines.push(format!(
            "keepalive_time {};",
            nginx_millis(u.keepalive_time)
        ));
    }
    if u.keepalive_timeout != DEFAULT_KEEPALIVE_TIMEOUT {
        lines.push(format!(
            "keepalive_timeout {};",
            nginx_millis(u.keepalive_timeout)
        ));
    }
    let c = &u.check;
    if let Some(line) = &c.line {
        lines.push(render_check_line(line));
    }
    if c.http_send != DEFAULT_CHECK_HTTP_SEND {
        lines.push(format!("check_http_send {};", quoted(&c.http_send)));
    }
    if c.http_expect_alive != ExpectAlive::default() {
        let names: Vec<&str> = c.http_expect_alive.names().collect();
        lines.push(format!("check_http_expect_alive {};", names.join(" ")));
    }
    if c.keepalive_requests != DEFAULT_CHECK_KEEPALIVE_REQUESTS {
        lines.push(format!(
            "check_keepalive_requests {};",
            c.keepalive_requests
        ));
    }
    lines
}

/// `check interval=... rise=... fall=... timeout=...;` (times in bare
/// milliseconds, as the module writes them), then what differs from the
/// module's defaults.
pub fn render_check_line(c: &CheckLine) -> String {
    let mut out = format!(
        "check interval={} rise={} fall={} timeout={}",
        c.interval, c.rise, c.fall, c.timeout
    );
    if !c.default_down {
        out.push_str(" default_down=false");
    }
    if c.kind != CheckType::Tcp {
        out.push_str(&format!(" type={}", c.kind.name()));
    }
    if c.port != 0 {
        out.push_str(&format!(" port={}", c.port));
    }
    if c.jitter != 0 {
        out.push_str(&format!(" jitter={}", c.jitter));
    }
    out.push(';');
    out
}

/// Milliseconds in nginx's time syntax: whole seconds as `60s`, else `ms`.
fn nginx_millis(ms: u32) -> String {
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// `s` as an nginx quoted string that the tokenizer reads back as `s`:
/// quotes and backslashes escaped, tab, CR and LF as `\t`, `\r`, `\n`.
fn quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Every upstream block, after a header comment, separated by blank lines.
pub fn render_upstream_file(t: &Table) -> String {
    let blocks: Vec<String> = t.upstreams.iter().map(|u| render_upstream(u)).collect();
    let mut out = String::from(FILE_HEADER);
    if !blocks.is_empty() {
        out.push('\n');
        out.push_str(&blocks.join("\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

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
            m.contains(
                "line 1: balancing method \"ip_hash\" does not support parameter \"backup\""
            ),
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
        assert!(
            bad(interval("0")).contains("interval=0: interval must be 1..86400000 milliseconds")
        );
    }

    #[test]
    fn bad_check_lines_are_refused_naming_what_is_wrong() {
        let err = |line: &str| bad(parse_body("u", &format!("server 10.0.0.1;\n{line}")));
        let cases = [
            ("check interval=0;", "line 2: check interval=0: interval=0: interval must be 1.."),
            ("check rise=0;", "rise=0: rise must be 1..1000"),
            ("check fall=0;", "fall=0: fall must be 1..1000"),
            ("check timeout=0;", "timeout=0: timeout must be 1.."),
            ("check interval=3000 colour=red;", "unknown check parameter \"colour=red\""),
            ("check interval=3000 fast;", "unknown check parameter \"fast\""),
            ("check type=mysql;", "type=mysql: check type \"mysql\" is not supported: use tcp, http, https or ssl_hello"),
            ("check default_down=maybe;", "default_down=maybe: default_down must be true or false"),
            ("check port=65536;", "port=65536: port must be 0..65535"),
            ("check rise=1 rise=2;", "rise=2: rise is given more than once"),
            ("check;", "check: bad arguments: expected `check interval=MS"),
            ("check_http_send;", "bad arguments: expected `check_http_send \"REQUEST\";`"),
            ("check_http_send a b;", "bad arguments"),
            ("check_http_send \"\";", "check_http_send: the request is empty"),
            ("check_http_expect_alive http_6xx;", "\"http_6xx\": check_http_expect_alive takes http_2xx"),
            ("check_http_expect_alive;", "bad arguments"),
            ("check_keepalive_requests 0;", "check_keepalive_requests must be 1..1000000"),
            ("check interval=1;\ncheck interval=2;", "line 3: check interval=2: check is given twice, on line 2 and line 3"),
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
            assert!(m.contains("host names are not supported yet"), "{m}");
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
        let s =
            parse_server_args("  [::1]:81 weight=1000 max_fails=0 fail_timeout=1m30s backup down ")
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
            "slow_start=1s",
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
             take it (it takes server, the balancing methods, keepalive*, zone, balancer_by_lua_* \
             and check*)"
        );
        let m = bad(parse_servers("server 127.0.0.1:80;\nserver 127.0.0.1:81"));
        assert_eq!(m, "line 2: server 127.0.0.1:81: missing ';' at the end");
        let m = bad(parse_servers("server 127.0.0.1:80 slow_start=3s;"));
        assert!(m.contains("line 1: server 127.0.0.1:80 slow_start=3s: unknown parameter"));
        let m = bad(parse_servers("server example.com:80;"));
        assert!(m.starts_with("line 1: server example.com:80: \"example.com:80\": host names"));
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
            m.starts_with(
                "line 3: content_by_lua_block: unknown directive \"content_by_lua_block\""
            ),
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
            backup: true,
            down: true,
        };
        assert_eq!(
            render_server(&s),
            "server 127.0.0.1:8088 weight=3 max_conns=10 max_fails=2 fail_timeout=5s backup down;"
        );
        let u = Upstream::new("u", vec![s, ServerSpec::new(inet("[::1]:80"))]);
        assert_eq!(
            render_upstream(&u),
            "upstream u {\n    server 127.0.0.1:8088 weight=3 max_conns=10 max_fails=2 \
             fail_timeout=5s backup down;\n    server [::1]:80;\n}\n"
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
}
