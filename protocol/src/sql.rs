//! What a SQL string does: statement splitting and classification for guardrails and audit.
//!
//! [`classify`] splits a simple-query string into statements at top-level semicolons and maps
//! each one, through sqlparser's PostgreSQL dialect, onto jitgate's own [`StatementClass`].
//! [`redact()`] hides passwords in statement text before it reaches an audit record.
//!
//! This module owns the mapping from SQL text to a class; it does not decide what a grant
//! allows (the proxy does), and it performs no I/O. Classification is static: a `Read` query
//! can still call a function with side effects (`set_config`, `nextval`, a user function), and
//! the text is lexed as PostgreSQL does with `standard_conforming_strings = on` and a UTF-8
//! client encoding, which is why changing either is classified [`StatementClass::Unknown`].
//! Anything that does not parse, or that the parser might have misread, is `Unknown`, which
//! the proxy treats as the most privileged class.

mod config_call;
mod fallback;
mod piece;
mod query;
pub mod reading;
mod redact;
pub mod roles;
mod session;
mod shape;
mod statement;
#[cfg(test)]
mod tests;

use std::fmt;

pub use redact::redact;

/// Parser recursion limit (deeply nested input must give Unknown, never a stack overflow).
pub const RECURSION_LIMIT: usize = 64;

/// Most operator and keyword tokens one statement may hold before it is classified
/// [`StatementClass::Unknown`] without being parsed. Chains such as `1+1+...` or
/// `SELECT 1 UNION SELECT 1 ...` parse iteratively into trees as deep as they are long, and
/// dropping such a tree recurses once per level; this bound keeps that depth safe on a 2 MiB
/// thread stack. Identifiers, literals, commas, parentheses and `NULL`/`TRUE`/`FALSE`/`DEFAULT`
/// are not counted, so bulk `INSERT ... VALUES` lists are not affected.
pub const MAX_OPERATOR_TOKENS: usize = 10_000;

/// Every value [`Classified::kind`] can take: a bounded set, safe as a metric label.
pub const KINDS: &[&str] = &[
    "select",
    "insert",
    "update",
    "delete",
    "merge",
    "truncate",
    "drop",
    "create",
    "alter",
    "alter_system",
    "alter_default_privileges",
    "grant",
    "revoke",
    "create_role",
    "alter_role",
    "drop_role",
    "drop_owned",
    "reassign_owned",
    "security_label",
    "copy_from",
    "copy_to",
    "copy_program",
    "set",
    "set_role",
    "set_session_authorization",
    "set_transaction",
    "reset",
    "show",
    "begin",
    "commit",
    "rollback",
    "savepoint",
    "release",
    "explain",
    "vacuum",
    "analyze",
    "checkpoint",
    "refresh",
    "lock",
    "call",
    "do",
    "load",
    "prepare",
    "execute",
    "deallocate",
    "declare",
    "fetch",
    "move",
    "close",
    "listen",
    "unlisten",
    "notify",
    "discard",
    "comment",
    "unknown",
    "empty",
    "other",
];

/// What a statement does, for guardrails and audit. Ordered from least to most privileged, so
/// the class of a multi-statement string is the `max` of its statements' classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StatementClass {
    /// Reads data: `SELECT`, `SHOW`, `EXPLAIN` (without `ANALYZE`), `COPY ... TO STDOUT`, cursors.
    Read,
    /// Transaction control: `BEGIN`, `COMMIT`, `ROLLBACK`, savepoints, `SET TRANSACTION`.
    Transaction,
    /// Harmless session state: `SET` of ordinary variables, `RESET`, `DISCARD`, `LISTEN`.
    Session,
    /// Maintenance: `VACUUM`, `ANALYZE`, `CHECKPOINT`, `COMMENT`, `DEALLOCATE`.
    Utility,
    /// Changes data: `INSERT`, `UPDATE`, `DELETE`, `MERGE`, `TRUNCATE`, `COPY FROM`, `CALL`, `DO`.
    Write,
    /// Changes schema: `CREATE`, `ALTER`, `DROP` of tables, views, functions and the like.
    Ddl,
    /// Changes who may do what: `GRANT`, `REVOKE`, roles, `SET ROLE`, `ALTER SYSTEM`.
    Privilege,
    /// Unparseable, unrecognised or possibly misread; treat as the most privileged class.
    Unknown,
}

impl StatementClass {
    /// The class as a lowercase label, safe as a metric label or audit field.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Transaction => "transaction",
            Self::Session => "session",
            Self::Utility => "utility",
            Self::Write => "write",
            Self::Ddl => "ddl",
            Self::Privilege => "privilege",
            Self::Unknown => "unknown",
        }
    }
}

impl fmt::Display for StatementClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One statement of a query string and what it does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classified {
    /// The statement's own text, exactly as sent (a slice of the input, trimmed of surrounding
    /// whitespace and the terminating ';'). It may contain secrets: pass it through [`redact()`]
    /// before logging it.
    pub text: String,
    /// What the statement does.
    pub class: StatementClass,
    /// A short snake_case kind from [`KINDS`] (safe as a metric label).
    pub kind: &'static str,
    /// Tables (relations) the statement touches, as written (schema-qualified when the text
    /// qualifies them), lowercase for unquoted identifiers, quoted identifiers kept in their
    /// double quotes, deduplicated, in first-seen order. Best effort: it may include CTE names
    /// and misses relations reached through functions, views or dynamic SQL.
    pub tables: Vec<String>,
    /// For UPDATE and DELETE: whether a WHERE clause is present. None for other kinds.
    pub has_where: Option<bool>,
    /// Session changes the proxy must track: Some for SET ROLE / RESET ROLE, SET SESSION
    /// AUTHORIZATION / RESET SESSION AUTHORIZATION, SET search_path / RESET search_path, and
    /// for RESET ALL (search_path) and DISCARD ALL (session authorization; it also resets
    /// search_path, which one value cannot say).
    pub session_change: Option<SessionChange>,
    /// For statements that change roles (`CREATE`/`ALTER`/`DROP ROLE`, `USER` or `GROUP`,
    /// `GRANT`/`REVOKE` of memberships): the roles they name (see [`roles`]). `None` otherwise.
    pub roles: Option<RolesNamed>,
    /// Code the server runs that the proxy cannot read statement by statement: a `DO` block, a
    /// function or procedure definition, or text that does not tokenize.
    pub opaque: bool,
}

/// The roles a role-changing statement names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolesNamed {
    /// Every identifier in the statement as the server resolves it, cut to 63 bytes.
    pub names: Vec<String>,
    /// The statement may change a role it does not name (`CURRENT_USER`, `SESSION_USER`,
    /// `CURRENT_ROLE`, `ALTER ROLE ALL`, a Unicode-escaped identifier).
    pub any_role: bool,
}

impl RolesNamed {
    /// Whether the statement may change one of `roles` (names as the server stores them; a
    /// name ending in `*` is a prefix: `jit_*` stands for every role starting with `jit_`).
    pub fn touches(&self, roles: &[String]) -> bool {
        self.any_role
            || roles.iter().any(|r| match r.strip_suffix('*') {
                Some(prefix) => self.names.iter().any(|n| n.starts_with(prefix)),
                None => self.names.iter().any(|n| n == roles::truncate_identifier(r)),
            })
    }
}

impl Classified {
    /// A statement we cannot vouch for.
    fn unknown(text: &str) -> Self {
        Self {
            text: text.to_owned(),
            class: StatementClass::Unknown,
            kind: "unknown",
            tables: Vec::new(),
            has_where: None,
            session_change: None,
            roles: None,
            opaque: true,
        }
    }

    /// Input with no statement in it: PostgreSQL answers it with `EmptyQueryResponse`.
    fn empty() -> Self {
        Self {
            text: String::new(),
            class: StatementClass::Read,
            kind: "empty",
            tables: Vec::new(),
            has_where: None,
            session_change: None,
            roles: None,
            opaque: false,
        }
    }
}

/// A change to session state that outlives the statement. `None` means reset to the default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionChange {
    /// `SET ROLE`: the role name as the server resolves it (unquoted names case-folded).
    /// `None` for `SET ROLE NONE` and `RESET ROLE`.
    Role(Option<String>),
    /// `SET SESSION AUTHORIZATION`: the user name as the server resolves it. `None` for
    /// `DEFAULT` and `RESET SESSION AUTHORIZATION`.
    SessionAuthorization(Option<String>),
    /// `SET search_path`: the value as SQL text, ready to follow `SET search_path = `.
    /// `None` for `DEFAULT` and `RESET`.
    SearchPath(Option<String>),
}

pub use shape::shape;

/// `text` without the whitespace PostgreSQL skips around tokens (`[ \t\n\r\f\v]`, scan.l's
/// `space`). Not `str::trim`: that also drops Unicode spaces such as U+00A0, which PostgreSQL
/// reads as part of an identifier, so the recorded text would differ from what runs.
pub fn trim_blank(text: &str) -> &str {
    text.trim_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c'])
}

/// Whether `haystack` contains `needle`, ASCII letters compared without case (no allocation:
/// runs on every recorded statement).
pub fn contains_ignore_ascii_case(haystack: &str, needle: &str) -> bool {
    needle.is_empty()
        || haystack
            .as_bytes()
            .windows(needle.len())
            .any(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
}

/// Splits `sql` into statements and classifies each. Text that does not parse yields ONE
/// Classified with class Unknown, kind "unknown" and the whole (trimmed) text. Empty input
/// (only whitespace/comments/semicolons) yields one Classified with kind "empty" and class Read.
pub fn classify(sql: &str) -> Vec<Classified> {
    let Some(pieces) = piece::split(sql) else {
        return vec![Classified::unknown(trim_blank(trim_blank(sql).trim_end_matches(';')))];
    };
    if pieces.is_empty() {
        return vec![Classified::empty()];
    }
    pieces.into_iter().map(statement::classify_piece).collect()
}
