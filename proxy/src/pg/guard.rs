//! Guardrails: which statements an access level may run, decided before any byte of the
//! statement reaches the database. They sit on top of the upstream role of the access level
//! (which should itself be least-privilege), never instead of it.

use std::sync::Arc;

use jitgate_protocol::sql::{self, roles, Classified, StatementClass};

use crate::access::{Reason, Refusal};
use crate::config::DenyRule;
use crate::model::AccessLevel;

/// The rules for one session: its access level, the target's deny rules for that level, and
/// the roles the proxy logs in with.
#[derive(Debug, Clone)]
pub struct Guard {
    access: AccessLevel,
    target: String,
    rules: Vec<DenyRule>,
    /// Roles whose password, validity, login, settings, name or memberships no statement may
    /// change: every role jitgate logs in with, on any target (roles are cluster-wide).
    login_roles: Arc<[String]>,
    /// The target lets admin grants manage those roles (`allow_role_management`).
    role_management: bool,
}

impl Guard {
    /// Rules for `access` on `target`; `rules` are the target's, filtered here by level. No
    /// login roles are protected until [`Guard::protecting`] names them.
    pub fn new(access: AccessLevel, target: &str, rules: &[DenyRule]) -> Self {
        let rules = rules.iter().filter(|r| r.access.contains(&access)).cloned().collect();
        Self {
            access,
            target: target.to_owned(),
            rules,
            login_roles: Arc::from(Vec::new()),
            role_management: false,
        }
    }

    /// Refuses statements that change any of `login_roles`, except on admin grants where the
    /// target allows role management.
    pub fn protecting(mut self, login_roles: Arc<[String]>, allow_role_management: bool) -> Self {
        self.login_roles = login_roles;
        self.role_management = allow_role_management && self.access == AccessLevel::Admin;
        self
    }

    /// Whether `c` may change one of the proxy's login roles.
    fn changes_login_role(&self, c: &Classified) -> bool {
        if self.login_roles.is_empty() {
            return false;
        }
        c.roles.as_ref().is_some_and(|r| r.touches(&self.login_roles))
            || (c.opaque && roles::code_may_change(&c.text, &self.login_roles))
    }

    /// Checks one classified statement.
    pub fn check(&self, c: &Classified) -> Result<(), Refusal> {
        // A setting the classifier could not clear (standard_conforming_strings off, a
        // multibyte client_encoding, an unreadable SET ROLE) would let the server read later
        // statements differently from the proxy: refused at every access level.
        if (c.class == StatementClass::Unknown && c.kind == "set") || changes_lexing_by_function(&c.text) {
            return Err(Refusal::new(
                Reason::UnsafeSetting,
                "jitgate: this setting would change how statements are read, so it is not allowed",
            )
            .hint("keep standard_conforming_strings on and client_encoding UTF8"));
        }
        // A role switch whose role cannot be read would leave every later record with the
        // wrong effective role.
        if c.class == StatementClass::Unknown && matches!(c.kind, "set_role" | "set_session_authorization") {
            return Err(Refusal::new(
                Reason::UnsafeSetting,
                "jitgate: this statement switches to a role jitgate cannot read, so it is not allowed",
            )
            .hint("name the role as a plain identifier or string: SET ROLE name"));
        }
        // The engineer must never hold a password, or a membership, that outlives the grant.
        if !self.role_management && self.changes_login_role(c) {
            return Err(Refusal::new(
                Reason::LoginRole,
                "jitgate: this statement would change a role jitgate logs in with \
                          (its password, validity, login, settings, name or memberships), so it is not allowed",
            )
            .hint(
                "ask a database administrator, or use an admin grant on a target with allow_role_management = true",
            ));
        }
        if self.access == AccessLevel::Read && !read_allows(c) {
            return Err(Refusal::new(
                Reason::ReadOnly,
                format!(
                    "jitgate: read access to {} does not allow this statement ({} {})",
                    self.target,
                    c.class.as_str(),
                    c.kind
                ),
            )
            .hint(format!(
                "request write access: jitgate request {} --access write --for 30m --reason \"...\"",
                self.target
            )));
        }
        // Deny rules cannot be checked against a statement nobody can read: on a target with
        // rules for this level, unknown statements are refused (fail closed).
        if !self.rules.is_empty() && c.class == StatementClass::Unknown {
            return Err(Refusal::new(
                Reason::Unclassifiable,
                format!(
                    "jitgate: {} has deny rules and this statement cannot be classified",
                    self.target
                ),
            )
            .hint("rewrite it in plain SQL (no SQL-level PREPARE/EXECUTE, FROM ONLY or DO)"));
        }
        for rule in &self.rules {
            if rule.kinds.iter().any(|k| k == c.kind) {
                return Err(Refusal::new(
                    Reason::DenyKind,
                    format!("jitgate: {} statements are not allowed on {}", c.kind, self.target),
                ));
            }
            if rule.unfiltered_writes && c.has_where == Some(false) {
                return Err(Refusal::new(
                    Reason::UnfilteredWrite,
                    format!(
                        "jitgate: {} without WHERE is not allowed on {}",
                        c.kind.to_uppercase(),
                        self.target
                    ),
                )
                .hint("add a WHERE clause (WHERE true if you really mean every row)"));
            }
        }
        Ok(())
    }
}

/// `set_config('standard_conforming_strings' | 'client_encoding', ...)`: the same change as a
/// refused SET, made from inside an expression.
fn changes_lexing_by_function(text: &str) -> bool {
    let has = |word| sql::contains_ignore_ascii_case(text, word);
    has("set_config") && (has("standard_conforming_strings") || has("client_encoding"))
}

/// A read grant runs reads, transaction control and harmless session statements; anything
/// else, unknown text included, is refused.
fn read_allows(c: &Classified) -> bool {
    match c.class {
        StatementClass::Read | StatementClass::Transaction | StatementClass::Session => true,
        StatementClass::Utility
        | StatementClass::Write
        | StatementClass::Ddl
        | StatementClass::Privilege
        | StatementClass::Unknown => false,
    }
}

/// The denial sent when a statement cannot be audited.
pub fn audit_unavailable() -> Refusal {
    Refusal::new(
        Reason::AuditUnavailable,
        "jitgate cannot write its audit log; statements are refused until it can",
    )
}

/// The denial sent for a statement whose reading depends on `client_encoding` or
/// `standard_conforming_strings`, sent before the server answered everything before it (see
/// `sql::reading`): an earlier statement may have changed them.
pub fn setting_dependent() -> Refusal {
    Refusal::new(
        Reason::SettingDependent,
        "jitgate: this statement could read differently under another client_encoding or \
                  standard_conforming_strings, and it came before the server answered the statements before it",
    )
    .hint("send it again on its own, once the earlier results have arrived")
}
