//! Which roles a statement changes: their passwords, `VALID UNTIL`, `LOGIN`, settings, names or
//! memberships.
//!
//! Read from the statement's tokens, not its parse tree, so every spelling counts whether or
//! not sqlparser can parse it: `CREATE`, `ALTER` and `DROP` of a `ROLE`, `USER` or `GROUP` (but
//! not a `USER MAPPING`), and `GRANT`/`REVOKE` of role memberships (no `ON` at the top level).
//! Every identifier in such a statement is reported as the server resolves it (unquoted names
//! case-folded, quoted ones as written, both cut to PostgreSQL's 63 bytes), keywords included:
//! a false match only refuses. `CURRENT_USER`, `SESSION_USER`, `CURRENT_ROLE`, `ALTER ROLE
//! ALL` and Unicode-escaped identifiers (`U&"..."`, whose decoding the proxy does not vouch for)
//! may name any role.

use sqlparser::tokenizer::{Token, TokenWithSpan};

use super::RolesNamed;

/// PostgreSQL's identifier limit (`NAMEDATALEN - 1`): longer names are cut to it.
pub const MAX_IDENTIFIER_BYTES: usize = 63;

/// An identifier as PostgreSQL stores it: cut to [`MAX_IDENTIFIER_BYTES`] at a character
/// boundary.
pub fn truncate_identifier(name: &str) -> &str {
    let mut end = name.len().min(MAX_IDENTIFIER_BYTES);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

/// The roles a role-changing statement names; `None` for any other statement. `lead` is the
/// statement's leading words, uppercased ([`super::fallback::lead_words`]).
pub(super) fn named(text: &str, lead: &[String], tokens: &[TokenWithSpan]) -> Option<RolesNamed> {
    let words: Vec<&str> = lead.iter().map(String::as_str).collect();
    let role_statement = match words.as_slice() {
        ["CREATE" | "ALTER" | "DROP", "USER", "MAPPING"] => false,
        ["CREATE" | "ALTER" | "DROP", "ROLE" | "USER" | "GROUP", ..] => true,
        ["GRANT" | "REVOKE", ..] => !top_level_on(tokens),
        _ => false,
    };
    if !role_statement {
        return None;
    }
    let mut names = Vec::new();
    let mut any_role = matches!(words.as_slice(), ["ALTER", "ROLE" | "USER", "ALL", ..])
        || super::contains_ignore_ascii_case(text, "u&\"");
    for token in tokens {
        let Token::Word(word) = &token.token else {
            continue;
        };
        let name = match word.quote_style {
            None => {
                let folded = word.value.to_ascii_lowercase();
                if matches!(folded.as_str(), "current_user" | "session_user" | "current_role") {
                    any_role = true;
                }
                folded
            }
            Some(_) => word.value.clone(),
        };
        let name = truncate_identifier(&name).to_owned();
        if !names.contains(&name) {
            names.push(name);
        }
    }
    Some(RolesNamed { names, any_role })
}

/// Whether an unquoted `ON` appears outside parentheses: `GRANT SELECT ON t TO r` grants
/// privileges on an object, `GRANT r TO s` a membership.
fn top_level_on(tokens: &[TokenWithSpan]) -> bool {
    let mut depth = 0usize;
    for token in tokens {
        match &token.token {
            Token::LParen => depth += 1,
            Token::RParen => depth = depth.saturating_sub(1),
            Token::Word(w) if depth == 0 && w.quote_style.is_none() && w.value.eq_ignore_ascii_case("on") => {
                return true
            }
            _ => {}
        }
    }
    false
}

/// Whether `text` names one of `roles` (a name ending in `*` is a prefix, matched anywhere in
/// the text) or a role alias near a role-changing word, for code
/// the proxy cannot read as statements (a `DO` block, a function body). Words are compared
/// without case, so a quoted `"Jit_Writer"` matches too: a false match only refuses.
pub fn code_may_change(text: &str, roles: &[String]) -> bool {
    let words = words(text);
    let has = |w: &str| words.iter().any(|x| x.eq_ignore_ascii_case(w));
    let changes = ["role", "user", "group", "grant", "revoke", "password"]
        .iter()
        .any(|w| has(w));
    let names = ["current_user", "session_user", "current_role"]
        .iter()
        .map(|s| (*s).to_owned())
        .chain(roles.iter().cloned())
        .any(|r| match r.strip_suffix('*') {
            Some(prefix) => super::contains_ignore_ascii_case(text, prefix),
            None => has(&r) || (r.contains('$') && super::contains_ignore_ascii_case(text, &r)),
        });
    changes && names
}

/// Runs of ASCII letters, digits, `_` and non-ASCII characters (`$` separates, as in `$$`).
fn words(text: &str) -> Vec<&str> {
    text.split(|c: char| c.is_ascii() && !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| !w.is_empty())
        .collect()
}

#[cfg(test)]
mod tests;
