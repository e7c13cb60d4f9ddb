//! What nginx's own configuration says about the user its workers run as:
//! the `user` directive of the main context. nginx's master runs
//! `init_by_lua` as root, before it parses that directive for its workers,
//! and makes the state file there; the workers must be able to open it. So
//! the master reads the directive the way nginx will: from `-g` on the
//! command line, then from the configuration file named by `-c` (or built
//! in), following `include` in the main context.

use std::path::{Path, PathBuf};

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
    let mut lexer = Lexer {
        s: text.as_bytes(),
        i: 0,
    };
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
}

impl Lexer<'_> {
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
                    self.i += 1;
                    return Some(match c {
                        b';' => Token::End,
                        b'{' => Token::Open,
                        _ => Token::Close,
                    });
                }
                b'"' | b'\'' => return Some(Token::Word(self.quoted(c))),
                _ => {
                    let start = self.i;
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
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn args(line: &str) -> Vec<String> {
        line.split(' ').map(str::to_owned).collect()
    }

    #[test]
    fn options_are_read_as_nginx_reads_them() {
        let cmd = command_line(&args("nginx -p /srv/ -c conf/a.conf -g daemon_off;"));
        assert_eq!(cmd.conf.as_deref(), Some("conf/a.conf"));
        assert_eq!(cmd.globals.as_deref(), Some("daemon_off;"));
        let cmd = command_line(&args("nginx -tq -c/etc/b.conf -s reload"));
        assert_eq!(cmd.conf.as_deref(), Some("/etc/b.conf"));
        let cmd = command_line(&args("nginx -qc /etc/c.conf"));
        assert_eq!(cmd.conf.as_deref(), Some("/etc/c.conf"));
        assert_eq!(command_line(&args("nginx")), CommandLine::default());
        assert_eq!(
            conf_file(
                &command_line(&args("nginx")),
                "--prefix=/usr/share/nginx --conf-path=/etc/nginx/nginx.conf",
                Path::new("/usr/share/nginx/")
            ),
            Path::new("/etc/nginx/nginx.conf")
        );
        assert_eq!(
            conf_file(&CommandLine::default(), "", Path::new("/opt/nginx/")),
            Path::new("/opt/nginx/conf/nginx.conf")
        );
    }

    #[test]
    fn a_process_title_gives_back_the_arguments() {
        let title = b"nginx: master process /usr/sbin/nginx -p /srv/ -c conf/nginx.conf\0\0\0";
        assert_eq!(
            args_of_cmdline(title),
            args("/usr/sbin/nginx -p /srv/ -c conf/nginx.conf")
        );
        let raw = b"/usr/sbin/nginx\0-c\0/etc/my nginx.conf\0";
        assert_eq!(
            command_line(&args_of_cmdline(raw)).conf.as_deref(),
            Some("/etc/my nginx.conf")
        );
    }

    fn find(files: &[(&str, &str)], globals: Option<&str>) -> Option<String> {
        let files: BTreeMap<PathBuf, String> = files
            .iter()
            .map(|(p, t)| (PathBuf::from(p), (*t).to_owned()))
            .collect();
        let read = |p: &Path| files.get(p).cloned();
        let list = |dir: &Path| {
            files
                .keys()
                .filter(|p| p.parent() == Some(dir))
                .filter_map(|p| p.file_name()?.to_str().map(str::to_owned))
                .collect()
        };
        worker_user(globals, Path::new("/etc/nginx/nginx.conf"), &read, &list)
    }

    #[test]
    fn finds_the_user_of_the_main_context() {
        let debian = "user www-data;\nworker_processes auto;\npid /run/nginx.pid;\n\
                      include /etc/nginx/modules-enabled/*.conf;\nevents { worker_connections 768; }\n";
        assert_eq!(
            find(&[("/etc/nginx/nginx.conf", debian)], None).as_deref(),
            Some("www-data")
        );
        let with_group = "# user nobody;\nuser  \"nginx\" 'web' ;";
        assert_eq!(
            find(&[("/etc/nginx/nginx.conf", with_group)], None).as_deref(),
            Some("nginx")
        );
        // Inside blocks, `user` is something else (or nothing); after them
        // it is still the main context's.
        let late =
            "events { user no; }\nhttp { server { location / { set $user x; } } }\nuser late;";
        assert_eq!(
            find(&[("/etc/nginx/nginx.conf", late)], None).as_deref(),
            Some("late")
        );
        assert_eq!(
            find(&[("/etc/nginx/nginx.conf", "events {}\n")], None),
            None
        );
        assert_eq!(find(&[], None), None);
        // -g comes first.
        assert_eq!(
            find(&[("/etc/nginx/nginx.conf", debian)], Some("user gee;")).as_deref(),
            Some("gee")
        );
    }

    #[test]
    fn follows_includes_of_the_main_context() {
        let files = [
            (
                "/etc/nginx/nginx.conf",
                "include main.d/*.conf;\nhttp { include users.conf; }\n",
            ),
            ("/etc/nginx/main.d/10-modules.conf", "load_module x.so;\n"),
            ("/etc/nginx/main.d/20-user.conf", "user from-include;\n"),
            ("/etc/nginx/main.d/20-user.conf.bak", "user backup;\n"),
            ("/etc/nginx/users.conf", "user in-http;\n"),
        ];
        assert_eq!(find(&files, None).as_deref(), Some("from-include"));
        let looped = [("/etc/nginx/nginx.conf", "include nginx.conf;\n")];
        assert_eq!(find(&looped, None), None);
    }

    #[test]
    fn braces_in_lua_blocks_do_not_count() {
        let conf = r#"
http {
    init_by_lua_block {
        -- } } a comment that would close both blocks
        local s = "}" .. '}' .. [[ } ]] .. [==[ }]] } ]==]
        --[[ and a long
             one } ]]
        if true then ngx.log(ngx.ERR, "{") end
        user "in-lua";
    }
    content_by_lua_block { ngx.say("}}}") }
}
user after-lua;
"#;
        assert_eq!(
            find(&[("/etc/nginx/nginx.conf", conf)], None).as_deref(),
            Some("after-lua")
        );
    }
}
