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
    check_name, Address, ServerPatch, ServerSpec, Table, Upstream, DEFAULT_FAIL_TIMEOUT,
    DEFAULT_MAX_FAILS, DEFAULT_PORT, DEFAULT_WEIGHT, FAIL_TIMEOUT_MAX, MAX_FAILS_MAX, WEIGHT_MAX,
    WEIGHT_MIN,
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
/// nginx's `weight=`, `max_fails=`, `fail_timeout=`, `backup` and `down`.
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
/// `max_fails=N`, `fail_timeout=TIME`, `backup=on|off`, `down=on|off` (a bare
/// `backup` or `down` means on), each at most once, at least one.
pub fn parse_server_patch(args: &str) -> Result<ServerPatch, String> {
    let mut patch = ServerPatch::default();
    for word in args.split_ascii_whitespace() {
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
        return Err("no parameter to change: give weight=, max_fails=, fail_timeout=, backup=on|off or down=on|off".into());
    }
    Ok(patch)
}

/// Which parameters a server line already gave, to refuse repeats.
#[derive(Default)]
struct Seen {
    weight: bool,
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
        ("max_fails", Some(_)) => &mut seen.max_fails,
        ("fail_timeout", Some(_)) => &mut seen.fail_timeout,
        ("backup", None) => &mut seen.backup,
        ("down", None) => &mut seen.down,
        ("weight" | "max_fails" | "fail_timeout", None) => {
            return Err(format!("{word}: {word} needs a value, as in {word}=N"))
        }
        _ => return Err(format!("unknown parameter {word:?}")),
    };
    if std::mem::replace(flag, true) {
        return Err(format!("{word}: {key} is given more than once"));
    }
    let value = value.unwrap_or_default();
    match key {
        "weight" => spec.weight = bounded(word, key, value, WEIGHT_MIN, WEIGHT_MAX)?,
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
    let secs = parse_seconds(value).map_err(|why| format!("{word}: fail_timeout {why}"))?;
    u32::try_from(secs)
        .ok()
        .filter(|&s| s <= FAIL_TIMEOUT_MAX)
        .ok_or_else(|| format!("{word}: fail_timeout must be 0..{FAIL_TIMEOUT_MAX} seconds"))
}

/// nginx's time syntax in seconds (`ngx_parse_time` with `is_sec`): numbers
/// with units in decreasing order, each unit at most once, a bare number
/// counting as seconds. `ms` is refused: nginx keeps these in seconds.
fn parse_seconds(s: &str) -> Result<u64, &'static str> {
    const BAD: &str = "must be a time such as 10, 10s, 1m30s, 2h or 1d";
    // Units from largest to smallest; the index is the order they must follow.
    const UNITS: [(&str, u64); 7] = [
        ("y", 365 * 86_400),
        ("M", 30 * 86_400),
        ("w", 7 * 86_400),
        ("d", 86_400),
        ("h", 3_600),
        ("m", 60),
        ("s", 1),
    ];
    let mut rest = s;
    let mut total: u64 = 0;
    let mut next_unit = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let number = parse_decimal(&rest[..digits]).ok_or(BAD)?;
        rest = &rest[digits..];
        if rest.starts_with("ms") {
            return Err("is in seconds in nginx; ms is not allowed here");
        }
        let scale = if rest.is_empty() {
            // A trailing bare number counts as seconds, as in nginx, so it
            // cannot follow an `s`.
            if next_unit == UNITS.len() {
                return Err(BAD);
            }
            next_unit = UNITS.len();
            1
        } else {
            let at = UNITS
                .iter()
                .position(|(u, _)| rest.starts_with(u))
                .ok_or(BAD)?;
            if at < next_unit {
                return Err(BAD);
            }
            next_unit = at + 1;
            rest = &rest[1..];
            UNITS[at].1
        };
        total = number
            .checked_mul(scale)
            .and_then(|n| total.checked_add(n))
            .ok_or("is too large")?;
    }
    if s.is_empty() {
        return Err(BAD);
    }
    Ok(total)
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

    /// The statement as an error message quotes it.
    fn excerpt(&self) -> String {
        let mut text = self.words.join(" ");
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

    /// Skips the rest of a block whose `{` was just read, with its nested
    /// blocks. A depth counter, not recursion: input may nest deeply.
    fn skip_block(&mut self, opened: &Stmt) -> Result<(), Error> {
        let mut depth = 1usize;
        while depth > 0 {
            let stmt = self.statement()?;
            match stmt.end {
                Terminator::Semicolon => {}
                Terminator::BlockStart => depth += 1,
                Terminator::BlockEnd => depth -= 1,
                Terminator::Eof => return Err(opened.error("the block is not closed")),
            }
        }
        Ok(())
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

/// What the statements of one upstream block (or one dyups body) give: its
/// servers, refusing repeated addresses, its balancing method and its
/// `keepalive`.
#[derive(Default)]
struct BlockBody {
    servers: Vec<ServerSpec>,
    /// Address to the line that gave it.
    lines: HashMap<Address, usize>,
    /// The balancing line and where it was.
    policy: Option<(Policy, usize)>,
    keepalive: u32,
}

impl BlockBody {
    /// Takes one `;`-ended statement; `Ok(false)` when it is none of ours.
    fn statement(&mut self, stmt: &Stmt) -> Result<bool, Error> {
        let args: Vec<&str> = stmt.words[1..].iter().map(String::as_str).collect();
        let policy = match (stmt.directive(), args.as_slice()) {
            ("server", _) => return self.server(stmt).map(|()| true),
            ("keepalive", [n]) => {
                self.keepalive = match parse_decimal(n) {
                    Some(n @ 1..=65535) => n as u32,
                    _ => return Err(stmt.error("keepalive must be 1..65535 connections")),
                };
                return Ok(true);
            }
            ("ip_hash", []) => Policy::IpHash,
            ("least_conn", []) => Policy::LeastConn,
            ("random", []) => Policy::Random { two: false },
            ("random", ["two"]) => Policy::Random { two: true },
            ("hash", [key]) => Policy::Hash {
                key: (*key).to_owned(),
                consistent: false,
            },
            ("hash", [key, "consistent"]) => Policy::Hash {
                key: (*key).to_owned(),
                consistent: true,
            },
            ("keepalive" | "ip_hash" | "least_conn" | "random" | "hash", _) => {
                return Err(stmt.error(format!("bad arguments: {POLICY_USAGE}")))
            }
            _ => return Ok(false),
        };
        if let Some((_, first)) = &self.policy {
            return Err(stmt.error(format!(
                "a balancing method is given twice, on line {first} and line {}",
                stmt.line
            )));
        }
        self.policy = Some((policy, stmt.line));
        Ok(true)
    }

    /// `stmt` is a `server ...;` statement.
    fn server(&mut self, stmt: &Stmt) -> Result<(), Error> {
        let args = stmt.words[1..].join(" ");
        let spec = parse_server_args(&args).map_err(|why| stmt.error(why))?;
        if let Some(first) = self.lines.insert(spec.addr.clone(), stmt.line) {
            return Err(stmt.error(format!(
                "server {} is given twice, on line {first} and line {}",
                spec.addr, stmt.line
            )));
        }
        self.servers.push(spec);
        Ok(())
    }

    /// The upstream these statements describe, checked as nginx checks it.
    fn upstream(self, name: &str) -> Result<Upstream, Error> {
        let mut u = Upstream::new(name, self.servers);
        if let Some((policy, line)) = self.policy {
            policy
                .validate(&u.servers)
                .map_err(|why| error_at(line, why))?;
            u.policy = policy;
        }
        u.keepalive = self.keepalive;
        Ok(u)
    }
}

const POLICY_USAGE: &str =
    "expected `ip_hash;`, `hash KEY [consistent];`, `least_conn;`, `random [two];` or `keepalive N;`";

/// Parses a body of `server ...;` statements as ngx_http_dyups_module takes
/// it (`server 127.0.0.1:8089;server 127.0.0.1:8088;`), with at most one
/// balancing line and a `keepalive` line, into the upstream `name`.
pub fn parse_body(name: &str, body: &str) -> Result<Upstream, Error> {
    let mut lexer = Lexer::new(body)?;
    let mut block = BlockBody::default();
    loop {
        let stmt = lexer.statement()?;
        match stmt.end {
            Terminator::Eof if stmt.words.is_empty() => break,
            Terminator::Eof => return Err(stmt.error("missing ';' at the end")),
            Terminator::BlockEnd => return Err(error_at(stmt.line, "unexpected '}'")),
            Terminator::BlockStart => return Err(stmt.error("unexpected '{'")),
            Terminator::Semicolon => {
                if !block.statement(&stmt)? {
                    return Err(stmt.error(format!(
                        "unknown directive {:?}: {SERVER_USAGE}",
                        stmt.directive()
                    )));
                }
            }
        }
    }
    if block.servers.is_empty() {
        return Err(Error::BadRequest(format!(
            "no server in body: {SERVER_USAGE}"
        )));
    }
    block.upstream(name)
}

/// The servers of a body (see [`parse_body`]).
pub fn parse_servers(body: &str) -> Result<Vec<ServerSpec>, Error> {
    parse_body("body", body).map(|u| u.servers)
}

/// Parses an nginx-syntax file of `upstream NAME { ... }` blocks. `server`
/// lines count; every other directive in a block is skipped.
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
                if let Some(first) = lines.insert(upstream.name.clone(), stmt.line) {
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
    let mut block = BlockBody::default();
    loop {
        let stmt = lexer.statement()?;
        match (stmt.end, stmt.directive()) {
            (Terminator::BlockEnd, _) => break,
            (Terminator::Eof, _) => return Err(opened.error("the block is not closed")),
            // Other directives (`balancer_by_lua_*`, `check`, ...) are nginx's.
            (Terminator::Semicolon, _) => {
                block.statement(&stmt)?;
            }
            (Terminator::BlockStart, "server") => return Err(stmt.error("unexpected '{'")),
            (Terminator::BlockStart, d) if d.ends_with("_by_lua_block") => {
                lexer.skip_lua_block(&stmt)?
            }
            (Terminator::BlockStart, _) => lexer.skip_block(&stmt)?,
        }
    }
    if block.servers.is_empty() {
        return Err(opened.error(format!("upstream {name:?} has no server")));
    }
    block.upstream(name)
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

/// `upstream NAME {` with one indented `server` line per server, then `}`.
pub fn render_upstream(u: &Upstream) -> String {
    let mut out = format!("upstream {} {{\n", u.name);
    for line in policy_lines(u) {
        out.push_str("    ");
        out.push_str(&line);
        out.push('\n');
    }
    for s in &u.servers {
        out.push_str("    ");
        out.push_str(&render_server(s));
        out.push('\n');
    }
    out.push_str("}\n");
    out
}

/// The balancing and `keepalive` lines of an upstream, if any.
pub fn policy_lines(u: &Upstream) -> Vec<String> {
    let mut lines = Vec::new();
    if u.policy != Policy::RoundRobin {
        lines.push(u.policy.to_string());
    }
    if u.keepalive > 0 {
        lines.push(format!("keepalive {};", u.keepalive));
    }
    lines
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
            "max_conns=3",
            "slow_start=1s",
            "resolve",
            "backup=1",
            "weight",
        ] {
            assert!(err(&format!("127.0.0.1 {p}")).contains(p), "{p}");
        }
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
            "line 2: sticky cookie: unknown directive \"sticky\": expected `server ADDR [PARAMS];`"
        );
        let m = bad(parse_servers("server 127.0.0.1:80;\nserver 127.0.0.1:81"));
        assert_eq!(m, "line 2: server 127.0.0.1:81: missing ';' at the end");
        let m = bad(parse_servers("server 127.0.0.1:80 max_conns=3;"));
        assert!(m.contains("line 1: server 127.0.0.1:80 max_conns=3: unknown parameter"));
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
    balancer_by_lua_file "./lua/balancer.lua";
    set_by_x 'single quoted ; { }' "escaped \" quote } {";
    balancer_by_lua_block {
        local t = { "}", '{', [[ } ]], [==[ ]] { ]==] }
        -- a comment with } in it
        --[[ a long comment {
        ]]
        local n = #t + #{ 1, -- `#` is Lua's length operator, so this { counts
        }
        if n > 0 then ngx.say("}") end
    }
    other_block {
        nested { deep "}" ; }
        # a comment }
    }
    server [::1]:8083 backup;
}

upstream other.pool-2 {
    server unix:/tmp/x.sock down;
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
            "upstream a {\n server 127.0.0.1;\n content_by_lua_block {\n s = \"}\n }\n}\n",
        ));
        assert!(m.starts_with("line 3: content_by_lua_block: a Lua string is not closed"));
        assert!(bad(parse_upstream_file("}")).contains("line 1: unexpected '}'"));
    }

    #[test]
    fn hash_starts_a_comment_only_where_a_token_may_start() {
        // `a#b` is one word to nginx; `#c` after a space is a comment.
        let text = "upstream a {\n x a#b; #c ;\n server 127.0.0.1;\n}";
        let t = parse_upstream_file(text).unwrap();
        assert_eq!(t.get("a").unwrap().servers.len(), 1);
        // In a generic block `#` hides the rest of the line, braces included.
        let text = "upstream a {\n blk { # }\n }\n server 127.0.0.1;\n}";
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
            max_fails: 2,
            fail_timeout: 5,
            backup: true,
            down: true,
        };
        assert_eq!(
            render_server(&s),
            "server 127.0.0.1:8088 weight=3 max_fails=2 fail_timeout=5s backup down;"
        );
        let u = Upstream::new("u", vec![s, ServerSpec::new(inet("[::1]:80"))]);
        assert_eq!(
            render_upstream(&u),
            "upstream u {\n    server 127.0.0.1:8088 weight=3 max_fails=2 fail_timeout=5s \
             backup down;\n    server [::1]:80;\n}\n"
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
