//! Hiding passwords in statement text before it reaches a log or audit record.
//!
//! A small PostgreSQL lexer of its own, rather than sqlparser's tokenizer, because it must
//! cope with text that does not tokenize (an unterminated literal is exactly where a careless
//! paste leaves a password). It knows comments (nested), quoted identifiers and every string
//! literal form, which is all it needs to find the literal after the keyword `PASSWORD`.

use std::ops::Range;

/// The replacement for a password literal.
const MASK: &str = "'***'";

/// Replaces secrets in statement text: the string literal after PASSWORD in CREATE/ALTER
/// ROLE/USER (also `ENCRYPTED PASSWORD`), and in `ALTER USER ... PASSWORD`, becomes '***'.
/// Works on text that does not parse too (token-based, case-insensitive). Returns the input
/// unchanged when there is nothing to redact.
///
/// Any string literal that follows the keyword `PASSWORD` is masked, whatever the statement,
/// so `CREATE USER MAPPING ... OPTIONS (password '...')` is covered as well. An unterminated
/// literal is masked to the end of the text. Secrets inside other literals, such as a
/// `password=` in a connection string, are not found.
pub fn redact(sql: &str) -> String {
    // Nearly every statement has no PASSWORD keyword: skip the lexer for those (this runs on
    // every statement the proxy records).
    if !super::contains_ignore_ascii_case(sql, "password") {
        return sql.to_owned();
    }
    let mut masked: Vec<Range<usize>> = Vec::new();
    let mut after_password = false;
    let mut lexer = Lexer {
        sql: sql.as_bytes(),
        pos: 0,
    };
    while let Some((kind, range)) = lexer.next_token() {
        match kind {
            Kind::Blank => {}
            Kind::Word => after_password = sql.get(range).is_some_and(|w| w.eq_ignore_ascii_case("password")),
            Kind::Literal => {
                if after_password {
                    masked.push(range);
                }
                after_password = false;
            }
            Kind::Other => after_password = false,
        }
    }
    if masked.is_empty() {
        return sql.to_owned();
    }
    let mut out = String::with_capacity(sql.len());
    let mut copied = 0;
    for range in masked {
        out.push_str(sql.get(copied..range.start).unwrap_or_default());
        out.push_str(MASK);
        // A quote right after the mask would join it into one longer literal (`'***''x`),
        // which reads differently the next time: a space keeps them two tokens.
        if sql.as_bytes().get(range.end) == Some(&b'\'') {
            out.push(' ');
        }
        copied = range.end;
    }
    out.push_str(sql.get(copied..).unwrap_or_default());
    out
}

/// What a token is, as far as redaction cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Whitespace or a comment.
    Blank,
    /// An unquoted identifier or keyword.
    Word,
    /// A string literal of any form, including its prefix and quotes.
    Literal,
    /// Anything else: operators, punctuation, quoted identifiers, numbers, parameters.
    Other,
}

/// Splits text into tokens by PostgreSQL's rules, byte by byte. Every boundary it reports is
/// next to an ASCII byte or at the end, so the ranges are valid `str` boundaries.
struct Lexer<'a> {
    sql: &'a [u8],
    pos: usize,
}

impl Lexer<'_> {
    fn next_token(&mut self) -> Option<(Kind, Range<usize>)> {
        let start = self.pos;
        let first = *self.sql.get(start)?;
        let kind = match first {
            b' ' | b'\t' | b'\n' | b'\r' | b'\x0b' | b'\x0c' => {
                self.pos += 1;
                Kind::Blank
            }
            b'-' if self.peek(1) == Some(b'-') => {
                self.skip_line_comment();
                Kind::Blank
            }
            b'/' if self.peek(1) == Some(b'*') => {
                self.skip_block_comment();
                Kind::Blank
            }
            b'\'' => {
                self.pos += 1;
                self.skip_quoted(b'\'', false);
                Kind::Literal
            }
            b'"' => {
                self.pos += 1;
                self.skip_quoted(b'"', false);
                Kind::Other
            }
            b'$' => self.dollar(),
            b if is_ident_start(b) => self.word(),
            _ => {
                self.pos += 1;
                Kind::Other
            }
        };
        Some((kind, start..self.pos))
    }

    fn peek(&self, ahead: usize) -> Option<u8> {
        self.sql.get(self.pos + ahead).copied()
    }

    fn skip_line_comment(&mut self) {
        while let Some(b) = self.peek(0) {
            self.pos += 1;
            if b == b'\n' {
                break;
            }
        }
    }

    /// `/* ... */`, nested as PostgreSQL nests them; unterminated runs to the end.
    fn skip_block_comment(&mut self) {
        let mut depth = 0usize;
        while let Some(b) = self.peek(0) {
            if b == b'/' && self.peek(1) == Some(b'*') {
                depth += 1;
                self.pos += 2;
            } else if b == b'*' && self.peek(1) == Some(b'/') {
                depth = depth.saturating_sub(1);
                self.pos += 2;
                if depth == 0 {
                    return;
                }
            } else {
                self.pos += 1;
            }
        }
    }

    /// Skips to just past the closing `quote`, where a doubled quote is part of the text and,
    /// with `backslash`, `\` escapes the next byte. Unterminated runs to the end.
    fn skip_quoted(&mut self, quote: u8, backslash: bool) {
        while let Some(b) = self.peek(0) {
            self.pos += 1;
            if backslash && b == b'\\' {
                self.pos = (self.pos + 1).min(self.sql.len());
            } else if b == quote {
                if self.peek(0) == Some(quote) {
                    self.pos += 1;
                } else {
                    return;
                }
            }
        }
    }

    /// A word, or a prefixed literal: `E'...'`, `B'...'`, `X'...'`, `N'...'`, `U&'...'`.
    fn word(&mut self) -> Kind {
        let start = self.pos;
        while self.peek(0).is_some_and(is_ident_char) {
            self.pos += 1;
        }
        let word = self.sql.get(start..self.pos).unwrap_or_default();
        match (word, self.peek(0), self.peek(1)) {
            ([b'e' | b'E'], Some(b'\''), _) => {
                self.pos += 1;
                self.skip_quoted(b'\'', true);
                Kind::Literal
            }
            ([b'b' | b'B' | b'x' | b'X' | b'n' | b'N'], Some(b'\''), _) => {
                self.pos += 1;
                self.skip_quoted(b'\'', false);
                Kind::Literal
            }
            ([b'u' | b'U'], Some(b'&'), Some(b'\'')) => {
                self.pos += 2;
                self.skip_quoted(b'\'', false);
                Kind::Literal
            }
            _ => Kind::Word,
        }
    }

    /// `$tag$ ... $tag$` (a literal; unterminated runs to the end), else a parameter or `$`.
    fn dollar(&mut self) -> Kind {
        let start = self.pos;
        let mut end = start + 1;
        if self.sql.get(end).copied().is_some_and(is_ident_start) {
            while self
                .sql
                .get(end)
                .copied()
                .is_some_and(|b| is_ident_char(b) && b != b'$')
            {
                end += 1;
            }
        }
        if self.sql.get(end) != Some(&b'$') {
            // `$1` or a lone `$`: not a literal.
            self.pos += 1;
            while self.peek(0).is_some_and(|b| b.is_ascii_digit()) {
                self.pos += 1;
            }
            return Kind::Other;
        }
        let tag = self.sql.get(start..=end).unwrap_or_default();
        let body = end + 1;
        self.pos = self
            .sql
            .get(body..)
            .and_then(|rest| rest.windows(tag.len()).position(|w| w == tag))
            .map_or(self.sql.len(), |at| body + at + tag.len());
        Kind::Literal
    }
}

fn is_ident_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b >= 0x80
}

fn is_ident_char(b: u8) -> bool {
    is_ident_start(b) || b.is_ascii_digit() || b == b'$'
}
