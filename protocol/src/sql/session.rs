//! `SET`, `RESET` and `DISCARD`: which are harmless session settings, which change identity,
//! and which change how later text is lexed.
//!
//! `role` and `session_authorization` are privilege changes however they are spelled
//! (`SET ROLE x`, `SET role = x`, `RESET ROLE`). `standard_conforming_strings` and
//! `client_encoding` decide where PostgreSQL sees string literals end; [`super::classify`]
//! lexes as if they were `on` and UTF-8, so setting them to anything else is `Unknown`
//! (`DEFAULT` and `RESET` return to the server's or the connection's startup value, which the
//! proxy must check where it sees the startup packet).
//! `SET LOCAL` is reported like `SET`: the change ends with the transaction, which the
//! caller tracks.

use sqlparser::ast::{
    DiscardObject, Expr, Ident, ObjectName, ObjectNamePart, Reset, Set, SetSessionAuthorizationParamKind, Value,
};

use super::query::{quoted_ident, resolved_ident};
use super::statement::Outcome;
use super::{SessionChange, StatementClass};

/// Classifies a `SET` statement.
pub(super) fn classify_set(set: &Set) -> Outcome {
    match set {
        Set::SingleAssignment {
            hivevar: false,
            variable,
            values,
            ..
        } => assignment(variable, values),
        Set::SetRole { role_name, .. } => {
            let role = role_name.as_ref().map(resolved_ident).filter(|name| name != "none");
            set_role(Some(role))
        }
        Set::SetSessionAuthorization(param) => set_session_authorization(Some(match &param.kind {
            SetSessionAuthorizationParamKind::Default => None,
            SetSessionAuthorizationParamKind::User(user) => Some(resolved_ident(user)),
        })),
        Set::SetNames { charset_name, .. } => client_encoding(Some(resolved_ident(charset_name))),
        Set::SetNamesDefault {} | Set::SetTimeZone { .. } => Outcome::new(StatementClass::Session, "set"),
        Set::SetTransaction { .. } => Outcome::new(StatementClass::Transaction, "set_transaction"),
        // Not PostgreSQL syntax: the server rejects them, and they could name any variable.
        Set::SingleAssignment { hivevar: true, .. }
        | Set::ParenthesizedAssignments { .. }
        | Set::MultipleAssignments { .. }
        | Set::SetSessionParam(_) => Outcome::new(StatementClass::Unknown, "set"),
    }
}

/// Classifies a `RESET` statement.
pub(super) fn classify_reset(reset: &Reset) -> Outcome {
    match reset {
        Reset::ALL => Outcome::new(StatementClass::Session, "reset").with_change(SessionChange::SearchPath(None)),
        Reset::SessionAuthorization => set_session_authorization(Some(None)),
        Reset::ConfigurationParameter(name) => match variable_name(name).as_deref() {
            Some("role") => set_role(Some(None)),
            Some("session_authorization") => set_session_authorization(Some(None)),
            Some("search_path") => {
                Outcome::new(StatementClass::Session, "reset").with_change(SessionChange::SearchPath(None))
            }
            _ => Outcome::new(StatementClass::Session, "reset"),
        },
    }
}

/// Classifies a `DISCARD` statement. `DISCARD ALL` includes `SET SESSION AUTHORIZATION DEFAULT`.
pub(super) fn classify_discard(object: &DiscardObject) -> Outcome {
    let outcome = Outcome::new(StatementClass::Session, "discard");
    match object {
        DiscardObject::ALL => outcome.with_change(SessionChange::SessionAuthorization(None)),
        DiscardObject::PLANS | DiscardObject::SEQUENCES | DiscardObject::TEMP => outcome,
    }
}

/// `SET name = value[, ...]` / `SET name TO ...`.
fn assignment(variable: &ObjectName, values: &[Expr]) -> Outcome {
    let single = match values {
        [value] => Setting::of(value),
        _ => None,
    };
    match variable_name(variable).as_deref() {
        Some("role") => set_role(single.map(|s| s.name().filter(|name| name != "none"))),
        Some("session_authorization") => set_session_authorization(single.map(|s| s.name())),
        Some("search_path") => search_path(values),
        Some("client_encoding") => client_encoding(single.map(|s| s.text())),
        Some("standard_conforming_strings") => {
            let on = single.is_some_and(|s| s.is_default() || matches!(s.text().as_str(), "on" | "true" | "yes" | "1"));
            let class = if on {
                StatementClass::Session
            } else {
                StatementClass::Unknown
            };
            Outcome::new(class, "set")
        }
        _ => Outcome::new(StatementClass::Session, "set"),
    }
}

/// The lowercase name of a single-part variable; GUC names are case-insensitive even quoted.
fn variable_name(name: &ObjectName) -> Option<String> {
    match name.0.as_slice() {
        [ObjectNamePart::Identifier(ident)] => Some(ident.value.to_ascii_lowercase()),
        _ => None,
    }
}

/// `role` set to `Some(None)` (none/default), `Some(Some(name))`, or `None` when the value is
/// not one we can read, which leaves the proxy unable to track it.
fn set_role(role: Option<Option<String>>) -> Outcome {
    match role {
        Some(role) => Outcome::new(StatementClass::Privilege, "set_role").with_change(SessionChange::Role(role)),
        None => Outcome::new(StatementClass::Unknown, "set_role"),
    }
}

/// Like [`set_role`], for `session_authorization`.
fn set_session_authorization(user: Option<Option<String>>) -> Outcome {
    let kind = "set_session_authorization";
    match user {
        Some(user) => {
            Outcome::new(StatementClass::Privilege, kind).with_change(SessionChange::SessionAuthorization(user))
        }
        None => Outcome::new(StatementClass::Unknown, kind),
    }
}

/// `SET search_path`: the values re-rendered as SQL, or `None` for `DEFAULT`.
fn search_path(values: &[Expr]) -> Outcome {
    let settings: Option<Vec<Setting<'_>>> = values.iter().map(Setting::of).collect();
    let change = match settings.as_deref() {
        Some([single]) if single.is_default() => SessionChange::SearchPath(None),
        Some(settings) if !settings.is_empty() => {
            let sql: Vec<String> = settings.iter().map(Setting::sql).collect();
            SessionChange::SearchPath(Some(sql.join(", ")))
        }
        _ => return Outcome::new(StatementClass::Unknown, "set"),
    };
    Outcome::new(StatementClass::Session, "set").with_change(change)
}

/// `SET client_encoding` / `SET NAMES`: only UTF-8 (or the default) keeps our lexing right.
fn client_encoding(encoding: Option<String>) -> Outcome {
    // PostgreSQL ignores case and non-alphanumerics in encoding names.
    let normalized = encoding.map(|e| e.chars().filter(char::is_ascii_alphanumeric).collect::<String>());
    let utf8 = normalized.is_some_and(|e| {
        e.eq_ignore_ascii_case("utf8") || e.eq_ignore_ascii_case("unicode") || e.eq_ignore_ascii_case("default")
    });
    Outcome::new(
        if utf8 {
            StatementClass::Session
        } else {
            StatementClass::Unknown
        },
        "set",
    )
}

/// A `SET` value PostgreSQL accepts: an identifier, a string, a number or a boolean.
enum Setting<'a> {
    Ident(&'a Ident),
    Str(&'a str),
    Number(&'a str),
    Bool(bool),
}

impl<'a> Setting<'a> {
    fn of(expr: &'a Expr) -> Option<Self> {
        match expr {
            Expr::Identifier(ident) => Some(Self::Ident(ident)),
            Expr::Value(value) => match &value.value {
                Value::SingleQuotedString(s) => Some(Self::Str(s)),
                Value::Number(n, false) => Some(Self::Number(n)),
                Value::Boolean(b) => Some(Self::Bool(*b)),
                _ => None,
            },
            _ => None,
        }
    }

    /// Whether this is the bare keyword `DEFAULT`.
    fn is_default(&self) -> bool {
        matches!(self, Self::Ident(ident) if ident.quote_style.is_none() && ident.value.eq_ignore_ascii_case("default"))
    }

    /// The value's text as the server sees it.
    fn text(&self) -> String {
        match self {
            Self::Ident(ident) => resolved_ident(ident),
            Self::Str(s) | Self::Number(s) => (*s).to_owned(),
            Self::Bool(b) => b.to_string(),
        }
    }

    /// A name setting: `None` for `DEFAULT`, else the text.
    fn name(&self) -> Option<String> {
        (!self.is_default()).then(|| self.text())
    }

    /// The value as SQL text.
    fn sql(&self) -> String {
        match self {
            Self::Ident(ident) => quoted_ident(ident),
            Self::Str(s) => format!("'{}'", s.replace('\'', "''")),
            Self::Number(s) => (*s).to_owned(),
            Self::Bool(b) => b.to_string(),
        }
    }
}
