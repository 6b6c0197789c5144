//! Splitting a query string into statements at top-level semicolons, and the size limits a
//! statement must meet before it is parsed.
//!
//! sqlparser's tokenizer decides what is a top-level semicolon (not one inside a string,
//! quoted identifier, dollar-quoted body or comment), so splitting and parsing agree on the
//! lexing. Its token locations are line/column pairs counted in `char`s; they are turned back
//! into byte offsets so each statement's text is an exact slice of the input. The split must
//! agree with [`super::reading::semicolons`], a scanner that follows PostgreSQL's `scan.l`;
//! text on which the two disagree does not split (and is classified `Unknown`).

use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::keywords::Keyword;
use sqlparser::tokenizer::{Location, Token, TokenWithSpan, Tokenizer};

use super::{MAX_OPERATOR_TOKENS, RECURSION_LIMIT};

/// One statement's text and tokens (whitespace and comments included, the `;` excluded).
pub(super) struct Piece<'a> {
    /// The statement's text, trimmed of the whitespace PostgreSQL skips around it.
    pub(super) text: &'a str,
    /// The statement's tokens, ready for the parser.
    pub(super) tokens: Vec<TokenWithSpan>,
}

impl Piece<'_> {
    /// Whether the statement is small enough to parse, visit and drop without exhausting the
    /// stack: bracket nesting within [`RECURSION_LIMIT`] and at most [`MAX_OPERATOR_TOKENS`]
    /// tokens that can link an expression or set-operation chain.
    pub(super) fn within_limits(&self) -> bool {
        let mut depth = 0usize;
        let mut operators = 0usize;
        for token in self.tokens.iter().map(|t| &t.token) {
            match token {
                Token::LParen | Token::LBracket | Token::LBrace => {
                    depth += 1;
                    if depth > RECURSION_LIMIT {
                        return false;
                    }
                }
                Token::RParen | Token::RBracket | Token::RBrace => depth = depth.saturating_sub(1),
                _ => {}
            }
            if links_chain(token) {
                operators += 1;
                if operators > MAX_OPERATOR_TOKENS {
                    return false;
                }
            }
        }
        true
    }
}

/// Whether a token can add a level to an expression or set-operation tree. Conservative:
/// anything not known to be inert counts.
fn links_chain(token: &Token) -> bool {
    match token {
        Token::Whitespace(_)
        | Token::Comma
        | Token::LParen
        | Token::RParen
        | Token::Number(..)
        | Token::Placeholder(_)
        | Token::SingleQuotedString(_)
        | Token::DollarQuotedString(_)
        | Token::EscapedStringLiteral(_)
        | Token::UnicodeStringLiteral(_)
        | Token::NationalStringLiteral(_)
        | Token::HexStringLiteral(_)
        | Token::SingleQuotedByteStringLiteral(_) => false,
        Token::Word(word) => {
            word.quote_style.is_none()
                && !matches!(
                    word.keyword,
                    Keyword::NoKeyword | Keyword::NULL | Keyword::TRUE | Keyword::FALSE | Keyword::DEFAULT
                )
        }
        _ => true,
    }
}

/// Splits `sql` at top-level semicolons, dropping statements that hold only whitespace and
/// comments. `None` when the text does not tokenize.
pub(super) fn split(sql: &str) -> Option<Vec<Piece<'_>>> {
    let tokens = Tokenizer::new(&PostgreSqlDialect {}, sql)
        .tokenize_with_location()
        .ok()?;
    let semicolons: Vec<Location> = tokens
        .iter()
        .filter(|t| t.token == Token::SemiColon)
        .map(|t| t.span.start)
        .collect();
    let ends = byte_offsets(sql, &semicolons)?;
    // sqlparser's tokenizer and a scanner modelled on PostgreSQL's own must agree on where
    // statements end; where they do not, nobody can say what the server will run.
    if super::reading::semicolons(sql).as_ref() != Some(&ends) {
        return None;
    }
    let mut ends = ends.into_iter();
    let mut pieces = Vec::new();
    let mut start = 0;
    let mut current = Vec::new();
    for token in tokens {
        if token.token == Token::SemiColon {
            let end = ends.next()?;
            push_piece(&mut pieces, sql.get(start..end)?, std::mem::take(&mut current));
            start = end + 1;
        } else {
            current.push(token);
        }
    }
    push_piece(&mut pieces, sql.get(start..)?, current);
    Some(pieces)
}

fn push_piece<'a>(pieces: &mut Vec<Piece<'a>>, text: &'a str, tokens: Vec<TokenWithSpan>) {
    if tokens.iter().any(|t| !matches!(t.token, Token::Whitespace(_))) {
        pieces.push(Piece {
            text: super::trim_blank(text),
            tokens,
        });
    }
}

/// Byte offsets of `locations` (in order) in `sql`, each checked to hold a `;`. The tokenizer
/// counts lines at `\n` and columns in `char`s, both from 1.
fn byte_offsets(sql: &str, locations: &[Location]) -> Option<Vec<usize>> {
    let mut offsets = Vec::with_capacity(locations.len());
    let mut wanted = locations.iter().peekable();
    let (mut line, mut column) = (1u64, 1u64);
    for (offset, ch) in sql.char_indices() {
        let Some(next) = wanted.peek() else { break };
        if (next.line, next.column) == (line, column) {
            offsets.push(offset);
            wanted.next();
        }
        if ch == '\n' {
            line += 1;
            column = 1;
        } else {
            column += 1;
        }
    }
    let exact = offsets.len() == locations.len() && offsets.iter().all(|&o| sql.as_bytes().get(o) == Some(&b';'));
    exact.then_some(offsets)
}
