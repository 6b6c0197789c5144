//! Whether a statement text reads the same under every `client_encoding` and
//! `standard_conforming_strings` the server might be using.
//!
//! The proxy lexes statement text as PostgreSQL does with a UTF-8 client encoding and
//! `standard_conforming_strings = on`. A statement pipelined behind another that the server has
//! not answered yet may be read by the server under other settings, because that earlier
//! statement may have changed them (a `set_config` with a computed name, a function running
//! `SET`). [`depends_on_settings`] tells whether that could change where the server sees tokens
//! begin and end: if it could not, the text means the same thing whatever the settings are.
//!
//! The model, from PostgreSQL's scanner (`scan.l`) and its encoding verifiers (`wchar.c`):
//! - The server converts a message's text from the client encoding when it receives it, then
//!   lexes bytes. ASCII bytes that stand alone are the same characters in every encoding
//!   PostgreSQL knows. Every multibyte character becomes non-ASCII, which the scanner treats as
//!   a letter.
//! - Encodings that can be server encodings are ASCII-safe: their verifiers require every byte
//!   of a multibyte character to have the high bit set, so they never swallow an ASCII byte.
//! - The client-only encodings may: BIG5, GBK and UHC take any high byte as the first of two
//!   bytes; SJIS and SHIFT_JIS_2004 likewise, except for the one-byte kana `A1`-`DF`; GB18030
//!   takes two or four bytes (the second and fourth may be digits); JOHAB is modelled like EUC
//!   (`8F` starts three bytes). The second byte can be `0x40`-`0x7E` (`\`, `@`, letters, ...),
//!   which is what the smuggle exploits. The ranges used here are supersets of what PostgreSQL
//!   accepts, so a reading PostgreSQL would run is never skipped as invalid; a sequence outside
//!   them is refused by the server, so that reading runs nothing.
//! - `standard_conforming_strings = off` makes `\` an escape inside `'...'` and `N'...'`, and
//!   makes `U&'...'` an error.
//!
//! A text of ASCII without backslashes reads the same everywhere ([`depends_on_settings`]
//! answers at once); any other text longer than [`MAX_CHECKED_BYTES`] counts as depending. Anything else is lexed under each reading and the token boundaries
//! compared with the proxy's own reading; a reading that fails to lex (an unterminated
//! literal, say) runs nothing on the server and is skipped.

/// Longest text [`depends_on_settings`] lexes under every reading.
pub const MAX_CHECKED_BYTES: usize = 1 << 20;

/// Whether the server could split `text` into tokens differently from the proxy, under some
/// client encoding or with `standard_conforming_strings` off. See the module docs.
pub fn depends_on_settings(text: &str) -> bool {
    let bytes = text.as_bytes();
    if bytes.iter().all(|&b| b < 0x80 && b != b'\\') {
        return false;
    }
    if bytes.len() > MAX_CHECKED_BYTES {
        // Too long to lex a dozen times on the relay's task: treated as depending (refused
        // only behind unanswered messages).
        return true;
    }
    let baseline = lex(&utf8_units(text), bytes, true);
    let ascii = bytes.is_ascii();
    let mut readings: Vec<(Option<Encoding>, bool)> = vec![(None, false)];
    if !ascii {
        for encoding in Encoding::ALL {
            readings.push((Some(encoding), true));
            readings.push((Some(encoding), false));
        }
    }
    readings.into_iter().any(|(encoding, scs)| {
        let units = match encoding {
            None => utf8_units(text),
            Some(e) => match e.decode(bytes) {
                Some(units) => units,
                // The server refuses text that is invalid in its client encoding.
                None => return false,
            },
        };
        match lex(&units, bytes, scs) {
            Ok(tokens) => baseline.as_ref() != Ok(&tokens),
            // A text the server cannot lex runs nothing.
            Err(LexError) => false,
        }
    })
}

/// Statement boundaries as PostgreSQL's scanner finds them in UTF-8 text with
/// `standard_conforming_strings = on`: the byte offset of every top-level `;`. `None` when the
/// server would refuse the text (an unterminated literal, comment or quoted identifier).
pub fn semicolons(text: &str) -> Option<Vec<usize>> {
    let tokens = lex(&utf8_units(text), text.as_bytes(), true).ok()?;
    Some(
        tokens
            .iter()
            .filter(|t| t.kind == Kind::Punct && text.as_bytes().get(t.start) == Some(&b';'))
            .map(|t| t.start)
            .collect(),
    )
}

/// One character as the scanner sees it: an ASCII byte, or any non-ASCII character (a letter to
/// the scanner).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unit {
    Ascii(u8),
    Wide,
}

/// The byte offset each character starts at; its first byte tells ASCII from wide. (Texts are
/// at most 1 GiB: `limits.max_message_bytes`.)
type Units = Vec<u32>;

fn utf8_units(text: &str) -> Units {
    text.char_indices().map(|(i, _)| offset(i)).collect()
}

fn offset(i: usize) -> u32 {
    u32::try_from(i).unwrap_or(u32::MAX)
}

fn unit_at(text: &[u8], offset: u32) -> Unit {
    match text.get(offset as usize) {
        Some(&b) if b < 0x80 => Unit::Ascii(b),
        _ => Unit::Wide,
    }
}

/// The client-only encodings, as groups that split bytes into characters alike.
#[derive(Debug, Clone, Copy)]
enum Encoding {
    /// BIG5, GBK, UHC: any high byte starts two bytes.
    DoubleByte,
    /// SJIS, SHIFT_JIS_2004: `A1`-`DF` are one byte, other high bytes start two.
    ShiftJis,
    /// GB18030: two bytes, or four when the second is a digit.
    Gb18030,
    /// JOHAB, read by PostgreSQL's EUC length rule: `8F` starts three bytes, other high bytes two.
    Johab,
}

/// Whether `b` may follow a lead byte (a superset of every encoding's trail range here).
fn trail(b: u8) -> bool {
    (0x40..=0x7e).contains(&b) || b >= 0x80
}

impl Encoding {
    const ALL: [Encoding; 4] = [Self::DoubleByte, Self::ShiftJis, Self::Gb18030, Self::Johab];

    /// Splits `bytes` into characters; `None` where the server would find them invalid.
    fn decode(self, bytes: &[u8]) -> Option<Units> {
        let mut units = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while let Some(&b) = bytes.get(i) {
            units.push(offset(i));
            i += if b < 0x80 { 1 } else { self.char_len(&bytes[i..])? };
        }
        Some(units)
    }

    /// Length of the multibyte character at the start of `s` (whose first byte is high).
    fn char_len(self, s: &[u8]) -> Option<usize> {
        let at = |i: usize| s.get(i).copied();
        match self {
            Self::DoubleByte => at(1).filter(|&b| trail(b)).map(|_| 2),
            Self::ShiftJis => {
                if (0xa1..=0xdf).contains(&s[0]) {
                    Some(1)
                } else {
                    at(1).filter(|&b| trail(b)).map(|_| 2)
                }
            }
            Self::Gb18030 => match at(1)? {
                b'0'..=b'9' => {
                    let ok = at(2)? >= 0x80 && at(3)?.is_ascii_digit();
                    ok.then_some(4)
                }
                b if trail(b) => Some(2),
                _ => None,
            },
            Self::Johab => {
                let len = if s[0] == 0x8f { 3 } else { 2 };
                (1..len)
                    .all(|i| at(i).is_some_and(|b| (0x31..=0x7e).contains(&b) || b >= 0x80))
                    .then_some(len)
            }
        }
    }
}

/// What a token is, as far as its extent goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Space,
    Comment,
    Word,
    QuotedIdent,
    Literal,
    Param,
    Number,
    Operator,
    Punct,
    Other,
}

/// A token and its byte extent in the original text.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Token {
    kind: Kind,
    start: usize,
    end: usize,
}

/// The text cannot be lexed: PostgreSQL would refuse it.
#[derive(Debug, PartialEq, Eq)]
struct LexError;

/// How a quoted string treats backslashes and its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Quote {
    /// `'...'` with `standard_conforming_strings = on`, `U&'...'`, `B'...'`, `X'...'`.
    Plain,
    /// `E'...'`, or `'...'` with `standard_conforming_strings = off`: `\` escapes a character.
    Escaped,
}

const OP_CHARS: &[u8] = b"~!@#^&|`?+-*/%<>=";
const PUNCT: &[u8] = b",()[].;:";

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0c)
}

fn ident_start(u: Unit) -> bool {
    match u {
        Unit::Wide => true,
        Unit::Ascii(b) => b.is_ascii_alphabetic() || b == b'_',
    }
}

fn ident_cont(u: Unit) -> bool {
    ident_start(u) || matches!(u, Unit::Ascii(b) if b.is_ascii_digit() || b == b'$')
}

fn dollar_tag_cont(u: Unit) -> bool {
    ident_start(u) || matches!(u, Unit::Ascii(b) if b.is_ascii_digit())
}

/// The scanner over one reading of the text.
struct Lexer<'a> {
    units: &'a [u32],
    text: &'a [u8],
    end: usize,
    scs: bool,
    pos: usize,
}

impl Lexer<'_> {
    fn ascii(&self, i: usize) -> Option<u8> {
        match self.unit(i) {
            Some(Unit::Ascii(b)) => Some(b),
            _ => None,
        }
    }

    fn unit(&self, i: usize) -> Option<Unit> {
        self.units.get(i).map(|&o| unit_at(self.text, o))
    }

    fn offset(&self, i: usize) -> usize {
        self.units.get(i).map_or(self.end, |&o| o as usize)
    }

    /// Skips a quoted body starting after its opening quote at `self.pos`; returns the index
    /// after the closing quote, string continuations across newlines included.
    fn quoted(&self, mut i: usize, quote: Quote) -> Result<usize, LexError> {
        loop {
            match self.unit(i) {
                None => return Err(LexError),
                Some(Unit::Ascii(b'\\')) if quote == Quote::Escaped => {
                    if self.unit(i + 1).is_none() {
                        return Err(LexError);
                    }
                    i += 2;
                }
                Some(Unit::Ascii(b'\'')) => {
                    if self.ascii(i + 1) == Some(b'\'') {
                        i += 2;
                        continue;
                    }
                    match self.continuation(i + 1) {
                        Some(next) => i = next,
                        None => return Ok(i + 1),
                    }
                }
                Some(_) => i += 1,
            }
        }
    }

    /// After a closing quote at `i - 1`: the index after the opening quote of a continuation
    /// (whitespace holding a newline, `--` comments allowed, then `'`), if there is one.
    fn continuation(&self, mut i: usize) -> Option<usize> {
        let mut newline = false;
        loop {
            match self.ascii(i)? {
                b'\n' | b'\r' => {
                    newline = true;
                    i += 1;
                }
                b if is_space(b) => i += 1,
                b'-' if self.ascii(i + 1) == Some(b'-') => {
                    i += 2;
                    while self.unit(i).is_some_and(|u| !matches!(u, Unit::Ascii(b'\n' | b'\r'))) {
                        i += 1;
                    }
                }
                b'\'' if newline => return Some(i + 1),
                _ => return None,
            }
        }
    }

    /// A `$tag$` delimiter starting at `i`: the index after it.
    fn dollar_delimiter(&self, i: usize) -> Option<usize> {
        if self.ascii(i) != Some(b'$') {
            return None;
        }
        let mut j = i + 1;
        if self.unit(j).is_some_and(ident_start) {
            j += 1;
            while self.unit(j).is_some_and(dollar_tag_cont) {
                j += 1;
            }
        }
        (self.ascii(j) == Some(b'$')).then_some(j + 1)
    }

    /// The next token's kind and the unit index after it.
    fn next_token(&self, text: &[u8]) -> Result<(Kind, usize), LexError> {
        let i = self.pos;
        let Some(u) = self.unit(i) else {
            return Err(LexError);
        };
        let b = match u {
            Unit::Wide => return Ok((Kind::Word, self.word_end(i))),
            Unit::Ascii(b) => b,
        };
        let next = self.ascii(i + 1);
        let lower = b.to_ascii_lowercase();
        Ok(match b {
            _ if is_space(b) => {
                let mut j = i + 1;
                while self.ascii(j).is_some_and(is_space) {
                    j += 1;
                }
                (Kind::Space, j)
            }
            b'-' if next == Some(b'-') => {
                let mut j = i + 2;
                while self.unit(j).is_some_and(|u| !matches!(u, Unit::Ascii(b'\n' | b'\r'))) {
                    j += 1;
                }
                (Kind::Comment, j)
            }
            b'/' if next == Some(b'*') => (Kind::Comment, self.block_comment(i)?),
            b'\'' => {
                let quote = if self.scs { Quote::Plain } else { Quote::Escaped };
                (Kind::Literal, self.quoted(i + 1, quote)?)
            }
            _ if lower == b'e' && next == Some(b'\'') => (Kind::Literal, self.quoted(i + 2, Quote::Escaped)?),
            _ if (lower == b'b' || lower == b'x') && next == Some(b'\'') => {
                (Kind::Literal, self.quoted(i + 2, Quote::Plain)?)
            }
            // N'...' is NCHAR followed by an ordinary string.
            _ if lower == b'n' && next == Some(b'\'') => (Kind::Word, i + 1),
            _ if lower == b'u' && next == Some(b'&') && self.ascii(i + 2) == Some(b'\'') => {
                if !self.scs {
                    // "unsafe use of string constant with Unicode escapes"
                    return Err(LexError);
                }
                (Kind::Literal, self.quoted(i + 3, Quote::Plain)?)
            }
            _ if lower == b'u' && next == Some(b'&') && self.ascii(i + 2) == Some(b'"') => {
                (Kind::QuotedIdent, self.quoted_ident(i + 3)?)
            }
            b'"' => (Kind::QuotedIdent, self.quoted_ident(i + 1)?),
            b'$' => {
                if next.is_some_and(|d| d.is_ascii_digit()) {
                    let mut j = i + 1;
                    while self.ascii(j).is_some_and(|d| d.is_ascii_digit()) {
                        j += 1;
                    }
                    (Kind::Param, j)
                } else if let Some(body) = self.dollar_delimiter(i) {
                    (Kind::Literal, self.dollar_body(text, i, body)?)
                } else {
                    (Kind::Other, i + 1)
                }
            }
            _ if ident_start(u) => (Kind::Word, self.word_end(i)),
            b'0'..=b'9' => (Kind::Number, self.number_end(i)),
            b'.' if next.is_some_and(|d| d.is_ascii_digit()) => (Kind::Number, self.number_end(i)),
            _ if OP_CHARS.contains(&b) => (Kind::Operator, self.operator_end(i)),
            _ if PUNCT.contains(&b) => (Kind::Punct, i + 1),
            _ => (Kind::Other, i + 1),
        })
    }

    fn word_end(&self, mut j: usize) -> usize {
        j += 1;
        while self.unit(j).is_some_and(ident_cont) {
            j += 1;
        }
        j
    }

    fn number_end(&self, mut j: usize) -> usize {
        while self
            .ascii(j)
            .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
            || self.unit(j) == Some(Unit::Wide)
        {
            j += 1;
        }
        j
    }

    /// An operator: a run of operator characters, cut before `--` or `/*` inside it.
    fn operator_end(&self, i: usize) -> usize {
        let mut j = i;
        while self.ascii(j).is_some_and(|b| OP_CHARS.contains(&b)) {
            if j > i {
                let pair = (self.ascii(j), self.ascii(j + 1));
                if matches!(pair, (Some(b'-'), Some(b'-')) | (Some(b'/'), Some(b'*'))) {
                    break;
                }
            }
            j += 1;
        }
        j
    }

    /// A nested `/* ... */` comment starting at `i`.
    fn block_comment(&self, i: usize) -> Result<usize, LexError> {
        let mut depth = 0usize;
        let mut j = i;
        loop {
            match (self.unit(j), self.ascii(j + 1)) {
                (None, _) => return Err(LexError),
                (Some(Unit::Ascii(b'/')), Some(b'*')) => {
                    depth += 1;
                    j += 2;
                }
                (Some(Unit::Ascii(b'*')), Some(b'/')) => {
                    depth -= 1;
                    j += 2;
                    if depth == 0 {
                        return Ok(j);
                    }
                }
                _ => j += 1,
            }
        }
    }

    /// A `"..."` identifier body after its opening quote (`""` stands for one quote).
    fn quoted_ident(&self, mut j: usize) -> Result<usize, LexError> {
        loop {
            match self.unit(j) {
                None => return Err(LexError),
                Some(Unit::Ascii(b'"')) if self.ascii(j + 1) == Some(b'"') => j += 2,
                Some(Unit::Ascii(b'"')) => return Ok(j + 1),
                Some(_) => j += 1,
            }
        }
    }

    /// A dollar-quoted body: `open` is the index of the opening `$`, `body` the index after the
    /// delimiter. Ends after the same delimiter, compared byte for byte.
    fn dollar_body(&self, text: &[u8], open: usize, body: usize) -> Result<usize, LexError> {
        let delimiter = &text[self.offset(open)..self.offset(body)];
        let mut j = body;
        while self.unit(j).is_some() {
            if self.ascii(j) == Some(b'$') {
                if let Some(end) = self.dollar_delimiter(j) {
                    if text.get(self.offset(j)..self.offset(end)) == Some(delimiter) {
                        return Ok(end);
                    }
                }
            }
            j += 1;
        }
        Err(LexError)
    }
}

/// Lexes one reading of `text`, split into `units`.
fn lex(units: &[u32], text: &[u8], scs: bool) -> Result<Vec<Token>, LexError> {
    let mut lexer = Lexer {
        units,
        text,
        end: text.len(),
        scs,
        pos: 0,
    };
    let mut tokens = Vec::new();
    while lexer.pos < units.len() {
        let (kind, next) = lexer.next_token(text)?;
        tokens.push(Token {
            kind,
            start: lexer.offset(lexer.pos),
            end: lexer.offset(next),
        });
        lexer.pos = next;
    }
    Ok(tokens)
}

#[cfg(test)]
mod tests;
