//! The tokenizer both bodies and files are read with, mirroring nginx's
//! `ngx_conf_read_token` (see the folder's doc).

use crate::error::Error;

/// How much of a statement an error message quotes.
pub(super) const EXCERPT_MAX: usize = 80;

/// How a statement ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Terminator {
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
pub(super) struct Stmt {
    pub(super) words: Vec<String>,
    pub(super) line: usize,
    pub(super) end: Terminator,
}

impl Stmt {
    pub(super) fn directive(&self) -> &str {
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
    pub(super) fn error(&self, why: impl std::fmt::Display) -> Error {
        Error::BadRequest(format!("line {}: {}: {why}", self.line, self.excerpt()))
    }
}

pub(super) fn error_at(line: usize, why: impl std::fmt::Display) -> Error {
    Error::BadRequest(format!("line {line}: {why}"))
}

pub(super) struct Lexer<'a> {
    src: &'a [u8],
    pos: usize,
    line: usize,
}

impl<'a> Lexer<'a> {
    /// Refuses NUL and other control characters up front, so that nothing
    /// later has to think about them.
    pub(super) fn new(text: &'a str) -> Result<Lexer<'a>, Error> {
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
    pub(super) fn statement(&mut self) -> Result<Stmt, Error> {
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
    pub(super) fn skip_lua_block(&mut self, opened: &Stmt) -> Result<(), Error> {
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
