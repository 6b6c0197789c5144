//! Classification by leading keywords, for PostgreSQL statements sqlparser cannot parse.
//!
//! Used only when parsing fails, and only for keyword sequences that bound what PostgreSQL can
//! run: whatever follows `GRANT`, the statement is a grant, so `Privilege` is safe however the
//! rest reads. Anything else stays `Unknown`.

use sqlparser::tokenizer::{Token, TokenWithSpan};

use super::statement::Outcome;
use super::StatementClass;

/// How many leading words decide a fallback classification.
const LEAD: usize = 3;

/// The statement's first unquoted words, uppercased, stopping at the first other token
/// (whitespace and comments skipped).
pub(super) fn lead_words(tokens: &[TokenWithSpan]) -> Vec<String> {
    tokens
        .iter()
        .filter(|t| !matches!(t.token, Token::Whitespace(_)))
        .map_while(|t| match &t.token {
            Token::Word(word) if word.quote_style.is_none() => Some(word.value.to_ascii_uppercase()),
            _ => None,
        })
        .take(LEAD)
        .collect()
}

/// The class and kind implied by `lead`, when it is conclusive.
pub(super) fn classify(lead: &[String]) -> Option<Outcome> {
    use StatementClass::{Privilege, Read, Utility, Write};
    let words: Vec<&str> = lead.iter().map(String::as_str).collect();
    let (class, kind) = match words.as_slice() {
        ["ALTER", "SYSTEM", ..] => (Privilege, "alter_system"),
        ["ALTER", "DEFAULT", "PRIVILEGES"] => (Privilege, "alter_default_privileges"),
        ["CREATE", "USER", "MAPPING"] => (Privilege, "create"),
        ["ALTER", "USER", "MAPPING"] => (Privilege, "alter"),
        ["DROP", "USER", "MAPPING"] => (Privilege, "drop"),
        ["CREATE", "ROLE" | "USER" | "GROUP", ..] => (Privilege, "create_role"),
        ["ALTER", "ROLE" | "USER" | "GROUP", ..] => (Privilege, "alter_role"),
        ["DROP", "ROLE" | "USER" | "GROUP", ..] => (Privilege, "drop_role"),
        ["DROP", "OWNED", ..] => (Privilege, "drop_owned"),
        ["REASSIGN", "OWNED", ..] => (Privilege, "reassign_owned"),
        ["SECURITY", "LABEL", ..] => (Privilege, "security_label"),
        ["GRANT", ..] => (Privilege, "grant"),
        ["REVOKE", ..] => (Privilege, "revoke"),
        // A DO block runs any SQL through dynamic EXECUTE: nobody can say what it does.
        ["DO", ..] => (StatementClass::Unknown, "do"),
        ["REFRESH", "MATERIALIZED", "VIEW"] => (Write, "refresh"),
        ["CHECKPOINT"] => (Utility, "checkpoint"),
        ["VACUUM", ..] => (Utility, "vacuum"),
        ["ANALYZE" | "ANALYSE", ..] => (Utility, "analyze"),
        ["FETCH", ..] => (Read, "fetch"),
        ["MOVE", ..] => (Read, "move"),
        _ => return None,
    };
    Some(Outcome::new(class, kind))
}
