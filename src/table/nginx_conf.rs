//! What nginx's own configuration says about the user its workers run as:
//! the `user` directive of the main context. nginx's master runs
//! `init_by_lua` as root, before it parses that directive for its workers,
//! and makes the state file there; the workers must be able to open it. So
//! the master reads the directive the way nginx will: from `-g` on the
//! command line, then from the configuration file named by `-c` (or built
//! in), following `include` in the main context.
//!
//! Over 600 lines: one reader of nginx's configuration, as nginx reads it
//! (its tokens, `include`, the main context's `user`, the upstream blocks);
//! the parts share one walk over the files and read best together.

use std::path::{Path, PathBuf};

use crate::table::model::Table;
use crate::table::syntax::parse_upstream_file;
use crate::Error;

/// What nginx's command line says about its configuration.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct CommandLine {
    /// `-c FILE`, as given.
    pub conf: Option<String>,
    /// `-g DIRECTIVES`, as given.
    pub globals: Option<String>,
}

/// Reads nginx's options as nginx does (`-c file` or `-cfile`; flags may
/// be run together, `-tq`; the last of a repeated option wins). `args[0]`
/// is the program.
pub fn command_line(args: &[String]) -> CommandLine {
    let mut out = CommandLine::default();
    let mut i = 1;
    while i < args.len() {
        let Some(mut opts) = args[i].strip_prefix('-') else {
            return out; // nginx refuses to start: nothing to learn
        };
        while let Some(c) = opts.chars().next() {
            opts = &opts[c.len_utf8()..];
            if !matches!(c, 'p' | 'e' | 'c' | 'g' | 's') {
                continue;
            }
            // An option with a value: the rest of this word, or the next.
            let value = if opts.is_empty() {
                i += 1;
                args.get(i).cloned()
            } else {
                Some(opts.to_owned())
            };
            match c {
                'c' => out.conf = value,
                'g' => out.globals = value,
                _ => {}
            }
            break;
        }
        i += 1;
    }
    out
}

/// The arguments of nginx's master from its process title, which nginx
/// writes over the original arguments once it runs
/// (`nginx: master process /usr/sbin/nginx -c /etc/nginx/nginx.conf`),
/// or from the NUL-separated arguments of a process that has not done so.
/// A title is split at spaces: a path with spaces is lost there.
pub fn args_of_cmdline(cmdline: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(cmdline);
    let args: Vec<&str> = text.trim_end_matches('\0').split('\0').collect();
    match args.as_slice() {
        [title] if title.starts_with("nginx: ") => {
            let rest = title.split_once(" process ").map_or("", |(_, r)| r);
            rest.split_whitespace().map(str::to_owned).collect()
        }
        _ => args.iter().map(|a| (*a).to_owned()).collect(),
    }
}

/// The configuration file nginx reads: `-c`, else the one it was built
/// with (`--conf-path` of `configure`), else `conf/nginx.conf`; a relative
/// path is relative to the prefix.
pub fn conf_file(cmd: &CommandLine, configure: &str, prefix: &Path) -> PathBuf {
    let built = configure
        .split_whitespace()
        .find_map(|a| a.strip_prefix("--conf-path="));
    let path = Path::new(cmd.conf.as_deref().or(built).unwrap_or("conf/nginx.conf"));
    prefix.join(path)
}

/// Largest depth of nested `include`s followed.
const INCLUDE_DEPTH: usize = 8;

/// The user named by the main context's `user` directive: in `globals`
/// (`-g`), then in the file at `conf` and the files it includes there.
/// `read` reads a file; `list` gives the names in a directory (for an
/// `include` with a wildcard). `None` when no `user` directive is found.
pub fn worker_user(
    globals: Option<&str>,
    conf: &Path,
    read: &dyn Fn(&Path) -> Option<String>,
    list: &dyn Fn(&Path) -> Vec<String>,
) -> Option<String> {
    let dir = conf.parent().unwrap_or(Path::new("/"));
    let files = Files { dir, read, list };
    if let Some(user) = globals.and_then(|g| files.user_in(g, 0)) {
        return Some(user);
    }
    files.user_in(&read(conf)?, 0)
}

struct Files<'a> {
    /// Where relative `include` paths start: the main file's directory.
    dir: &'a Path,
    read: &'a dyn Fn(&Path) -> Option<String>,
    list: &'a dyn Fn(&Path) -> Vec<String>,
}

impl Files<'_> {
    fn user_in(&self, text: &str, depth: usize) -> Option<String> {
        for directive in main_directives(text) {
            match directive.as_slice() {
                [name, user, ..] if name == "user" => return Some(user.clone()),
                [name, pattern] if name == "include" && depth < INCLUDE_DEPTH => {
                    for file in self.expand(pattern) {
                        let found = (self.read)(&file).and_then(|t| self.user_in(&t, depth + 1));
                        if found.is_some() {
                            return found;
                        }
                    }
                }
                _ => {}
            }
        }
        None
    }

    /// The files an `include` names, in nginx's (sorted) order; a wildcard
    /// is followed in the last part of the path only.
    fn expand(&self, pattern: &str) -> Vec<PathBuf> {
        let path = self.dir.join(pattern);
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if !name.contains(['*', '?', '[']) {
            return vec![path];
        }
        let Some(parent) = path.parent() else {
            return Vec::new();
        };
        let mut names: Vec<String> = (self.list)(parent)
            .into_iter()
            .filter(|n| !n.starts_with('.') && wildcard_match(name.as_bytes(), n.as_bytes()))
            .collect();
        names.sort();
        names.into_iter().map(|n| parent.join(n)).collect()
    }
}

/// `*` and `?` as in a shell; `[` is taken as itself.
fn wildcard_match(pattern: &[u8], name: &[u8]) -> bool {
    match pattern.split_first() {
        None => name.is_empty(),
        Some((b'*', rest)) => (0..=name.len()).any(|i| wildcard_match(rest, &name[i..])),
        Some((b'?', rest)) => !name.is_empty() && wildcard_match(rest, &name[1..]),
        Some((c, rest)) => name.first() == Some(c) && wildcard_match(rest, &name[1..]),
    }
}

/// An `upstream NAME { ... }` block of nginx's `http` context.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamBlock {
    pub name: String,
    /// The file it is in, and the line of its `upstream`.
    pub file: PathBuf,
    pub line: usize,
    /// The block's text, from `upstream` to its `}`.
    pub text: String,
    /// Whether the block hands its balancing to Lua (`balancer_by_lua_*`).
    /// Without it nginx balances the block itself, and nothing ngx.dyups
    /// holds under that name reaches `proxy_pass http://NAME`.
    pub balancer: bool,
    /// Whether some of its lines come from an `include`, which its `text`
    /// does not hold.
    pub includes: bool,
}

/// An `include` nginx follows: the path it names (joined to the
/// configuration's directory; a wildcard is kept), and where it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Include {
    pub pattern: PathBuf,
    pub file: PathBuf,
    pub line: usize,
}

/// What nginx's configuration holds that ngx.dyups has to know: the files
/// nginx reads, and the upstream blocks of its `http` context.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Configuration {
    /// The main file (`-c`, or the one nginx was built with).
    pub main: PathBuf,
    pub includes: Vec<Include>,
    pub upstreams: Vec<UpstreamBlock>,
}

/// Reads nginx's configuration as nginx does: the file at `conf` and,
/// through `include` in any context, the files it names. `read` reads a
/// file; `list` gives the names in a directory (for an `include` with a
/// wildcard). An error when a file nginx would read cannot be read.
pub fn read_configuration(
    conf: &Path,
    read: &dyn Fn(&Path) -> Option<String>,
    list: &dyn Fn(&Path) -> Vec<String>,
) -> Result<Configuration, String> {
    let dir = conf.parent().unwrap_or(Path::new("/"));
    let mut walk = Walk {
        files: Files { dir, read, list },
        context: Vec::new(),
        open: None,
        out: Configuration {
            main: conf.to_path_buf(),
            ..Configuration::default()
        },
    };
    walk.file(conf, 0)?;
    Ok(walk.out)
}

impl Configuration {
    /// How nginx comes to read the file at `path`, if it does: it is the
    /// main file, or an `include` names it (also through a wildcard, so a
    /// file that does not exist yet counts once it would match).
    pub fn reads(&self, path: &Path) -> Option<String> {
        let path = normal(path);
        if path == normal(&self.main) {
            return Some(format!(
                "it is nginx's configuration file {}",
                self.main.display()
            ));
        }
        self.includes.iter().find_map(|inc| {
            let pattern = normal(&inc.pattern);
            let name = pattern.file_name()?.to_str()?;
            let matched = if name.contains(['*', '?', '[']) {
                pattern.parent() == path.parent()
                    && path.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                        !n.starts_with('.') && wildcard_match(name.as_bytes(), n.as_bytes())
                    })
            } else {
                pattern == path
            };
            matched.then(|| {
                format!(
                    "`include {}` on line {} of {} reads it",
                    inc.pattern.display(),
                    inc.line,
                    inc.file.display()
                )
            })
        })
    }

    /// The block nginx balances itself (no `balancer_by_lua_*`) under
    /// `name`, compared as nginx compares upstream names: without case.
    pub fn native_block(&self, name: &str) -> Option<&UpstreamBlock> {
        self.upstreams
            .iter()
            .find(|b| !b.balancer && b.name.eq_ignore_ascii_case(name))
    }
}

impl Configuration {
    /// The table of the blocks that hand their balancing to Lua, each block
    /// read by the upstream-file parser; parse errors name the file and its
    /// line. Blocks nginx balances itself are not ngx.dyups's.
    pub fn balanced_table(&self) -> crate::Result<Table> {
        let mut table = Table::default();
        for b in self.upstreams.iter().filter(|b| b.balancer) {
            let at = format!("{} line {}", b.file.display(), b.line);
            if b.includes {
                return Err(Error::BadRequest(format!(
                    "{at}: upstream {}: ngx.dyups reads the lines of an upstream block, not the \
                     files it includes: put them in the block",
                    b.name
                )));
            }
            // Put on its own line, so the parser's line numbers are the file's.
            let text = "\n".repeat(b.line.saturating_sub(1)) + &b.text;
            let parsed = parse_upstream_file(&text)
                .map_err(|e| Error::BadRequest(format!("{}: {e}", b.file.display())))?;
            for u in parsed.upstreams {
                if table.names().any(|n| n.eq_ignore_ascii_case(&u.name)) {
                    return Err(Error::BadRequest(format!(
                        "{at}: upstream {} is defined twice (nginx: duplicate upstream)",
                        u.name
                    )));
                }
                table.upstreams.push(u);
            }
        }
        Ok(table)
    }
}

/// `path` with `.` and `..` taken out, and its directory resolved through
/// symbolic links when it exists: two spellings of one file compare equal.
fn normal(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    let resolved = out
        .parent()
        .and_then(|d| std::fs::canonicalize(d).ok())
        .zip(out.file_name())
        .map(|(d, n)| d.join(n));
    resolved.unwrap_or(out)
}

/// An `upstream` block being read.
struct OpenBlock {
    name: String,
    file: PathBuf,
    line: usize,
    /// Where its text starts in its file, and how deep the context was
    /// when it opened.
    start: usize,
    depth: usize,
    balancer: bool,
    includes: bool,
}

struct Walk<'a> {
    files: Files<'a>,
    /// The blocks around the current statement (`http`, `server`, ...).
    context: Vec<String>,
    open: Option<OpenBlock>,
    out: Configuration,
}

impl Walk<'_> {
    fn file(&mut self, path: &Path, depth: usize) -> Result<(), String> {
        let text = (self.files.read)(path).ok_or_else(|| {
            format!(
                "could not read nginx's configuration file {}",
                path.display()
            )
        })?;
        let line_of = |at: usize| {
            1 + text.as_bytes()[..at]
                .iter()
                .filter(|&&c| c == b'\n')
                .count()
        };
        let mut lexer = Lexer::new(&text);
        let mut words: Vec<String> = Vec::new();
        let mut first = 0usize;
        while let Some(token) = lexer.next() {
            match token {
                Token::Word(w) => {
                    if words.is_empty() {
                        first = lexer.start;
                    }
                    words.push(w);
                }
                Token::End => {
                    let in_upstream = self
                        .open
                        .as_ref()
                        .filter(|b| b.depth + 1 == self.context.len());
                    if in_upstream.is_some()
                        && words
                            .first()
                            .is_some_and(|w| w.starts_with("balancer_by_lua"))
                    {
                        if let Some(b) = self.open.as_mut() {
                            b.balancer = true;
                        }
                    }
                    if let [name, pattern] = words.as_slice() {
                        if name == "include" {
                            if depth >= INCLUDE_DEPTH {
                                return Err(format!(
                                    "{} line {}: includes nested more than {INCLUDE_DEPTH} deep",
                                    path.display(),
                                    line_of(first)
                                ));
                            }
                            if let Some(b) = self.open.as_mut() {
                                b.includes = true;
                            }
                            self.out.includes.push(Include {
                                pattern: self.files.dir.join(pattern),
                                file: path.to_path_buf(),
                                line: line_of(first),
                            });
                            for file in self.files.expand(pattern) {
                                self.file(&file, depth + 1)?;
                            }
                        }
                    }
                    words.clear();
                }
                Token::Open => {
                    let directive = words.first().map(String::as_str).unwrap_or("");
                    if directive.ends_with("_by_lua_block") {
                        if directive == "balancer_by_lua_block" {
                            if let Some(b) = self.open.as_mut() {
                                b.balancer |= b.depth + 1 == self.context.len();
                            }
                        }
                        lexer.skip_lua_block();
                    } else {
                        if directive == "upstream" && self.context == ["http"] {
                            self.open = Some(OpenBlock {
                                name: words.get(1).cloned().unwrap_or_default(),
                                file: path.to_path_buf(),
                                line: line_of(first),
                                start: first,
                                depth: self.context.len(),
                                balancer: false,
                                includes: false,
                            });
                        }
                        self.context.push(directive.to_owned());
                    }
                    words.clear();
                }
                Token::Close => {
                    self.context.pop();
                    let closes = self
                        .open
                        .as_ref()
                        .is_some_and(|b| b.depth == self.context.len() && b.file == path);
                    if closes {
                        let b = self.open.take().expect("an open block");
                        self.out.upstreams.push(UpstreamBlock {
                            text: text[b.start..lexer.i].to_owned(),
                            name: b.name,
                            file: b.file,
                            line: b.line,
                            balancer: b.balancer,
                            includes: b.includes,
                        });
                    }
                    words.clear();
                }
            }
        }
        Ok(())
    }
}

/// A piece of nginx configuration syntax.
#[derive(Debug, PartialEq, Eq)]
enum Token {
    Word(String),
    End,
    Open,
    Close,
}

/// The directives of the main context (outside every block), each as its
/// words. Blocks are skipped, `*_by_lua_block` ones as Lua, whose strings
/// and comments may hold braces.
fn main_directives(text: &str) -> Vec<Vec<String>> {
    let mut lexer = Lexer::new(text);
    let mut out = Vec::new();
    let mut words: Vec<String> = Vec::new();
    let mut depth = 0usize;
    while let Some(token) = lexer.next() {
        match token {
            Token::Word(w) => words.push(w),
            Token::End => {
                if depth == 0 && !words.is_empty() {
                    out.push(std::mem::take(&mut words));
                }
                words.clear();
            }
            Token::Open => {
                if words.first().is_some_and(|w| w.ends_with("_by_lua_block")) {
                    lexer.skip_lua_block();
                } else {
                    depth += 1;
                }
                words.clear();
            }
            Token::Close => {
                depth = depth.saturating_sub(1);
                words.clear();
            }
        }
    }
    out
}

struct Lexer<'a> {
    s: &'a [u8],
    i: usize,
    /// Where the token `next` returned last starts.
    start: usize,
}

impl<'a> Lexer<'a> {
    fn new(text: &'a str) -> Lexer<'a> {
        Lexer {
            s: text.as_bytes(),
            i: 0,
            start: 0,
        }
    }

    fn peek(&self, at: usize) -> Option<u8> {
        self.s.get(self.i + at).copied()
    }

    /// The next token, as nginx's `ngx_conf_read_token` reads them.
    fn next(&mut self) -> Option<Token> {
        loop {
            let c = self.peek(0)?;
            match c {
                b' ' | b'\t' | b'\r' | b'\n' => self.i += 1,
                b'#' => {
                    while self.peek(0).is_some_and(|c| c != b'\n') {
                        self.i += 1;
                    }
                }
                b';' | b'{' | b'}' => {
                    self.start = self.i;
                    self.i += 1;
                    return Some(match c {
                        b';' => Token::End,
                        b'{' => Token::Open,
                        _ => Token::Close,
                    });
                }
                b'"' | b'\'' => {
                    self.start = self.i;
                    return Some(Token::Word(self.quoted(c)));
                }
                _ => {
                    let start = self.i;
                    self.start = start;
                    while self.peek(0).is_some_and(|c| {
                        !matches!(c, b' ' | b'\t' | b'\r' | b'\n' | b';' | b'{' | b'}')
                    }) {
                        self.i += if self.peek(0) == Some(b'\\') { 2 } else { 1 };
                    }
                    let end = self.i.min(self.s.len());
                    return Some(Token::Word(
                        String::from_utf8_lossy(&self.s[start..end]).into_owned(),
                    ));
                }
            }
        }
    }

    /// A quoted word, without its quotes; `\` escapes the next byte.
    fn quoted(&mut self, quote: u8) -> String {
        self.i += 1;
        let mut out = Vec::new();
        while let Some(c) = self.peek(0) {
            self.i += 1;
            match c {
                b'\\' => {
                    if let Some(n) = self.peek(0) {
                        out.push(n);
                        self.i += 1;
                    }
                }
                c if c == quote => break,
                c => out.push(c),
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Past the `}` closing a Lua block whose `{` was just read: braces in
    /// Lua strings, long strings and comments do not count.
    fn skip_lua_block(&mut self) {
        let mut depth = 1usize;
        while let Some(c) = self.peek(0) {
            match c {
                b'{' => depth += 1,
                b'}' => {
                    depth -= 1;
                    if depth == 0 {
                        self.i += 1;
                        return;
                    }
                }
                b'"' | b'\'' => {
                    self.quoted(c);
                    continue;
                }
                b'[' if self.long_bracket().is_some() => {
                    self.skip_long_string();
                    continue;
                }
                b'-' if self.peek(1) == Some(b'-') => {
                    self.i += 2;
                    if self.peek(0) == Some(b'[') && self.long_bracket().is_some() {
                        self.skip_long_string();
                    } else {
                        while self.peek(0).is_some_and(|c| c != b'\n') {
                            self.i += 1;
                        }
                    }
                    continue;
                }
                _ => {}
            }
            self.i += 1;
        }
    }

    /// At `[`: the level of a Lua long bracket opening here (`[[` is 0,
    /// `[==[` is 2), if one does.
    fn long_bracket(&self) -> Option<usize> {
        let level = self.s[self.i + 1..]
            .iter()
            .take_while(|&&c| c == b'=')
            .count();
        (self.peek(1 + level) == Some(b'[')).then_some(level)
    }

    fn skip_long_string(&mut self) {
        let level = self.long_bracket().unwrap_or(0);
        self.i += level + 2;
        let close: Vec<u8> = std::iter::once(b']')
            .chain(std::iter::repeat_n(b'=', level))
            .chain(std::iter::once(b']'))
            .collect();
        match self.s[self.i..]
            .windows(close.len())
            .position(|w| w == close)
        {
            Some(at) => self.i += at + close.len(),
            None => self.i = self.s.len(),
        }
    }
}

#[cfg(test)]
mod tests;
