//! Checks on the client's `StartupMessage`: the user must be the certificate's, the database
//! names a target (`prod-db` or `prod-db/otherdb`), and only allowlisted parameters pass
//! upstream. Everything else is refused with a PostgreSQL error the client can act on.

use crate::access::{Reason, Refusal};
use crate::model::TargetName;
use crate::pki::Identity;

/// Startup parameters passed to the target, compared case-insensitively as PostgreSQL does
/// for GUC names. They change presentation and timeouts, never identity or privileges.
const FORWARDED: &[&str] = &[
    "application_name",
    "datestyle",
    "intervalstyle",
    "timezone",
    "extra_float_digits",
    "search_path",
    "bytea_output",
    "lc_monetary",
    "lc_numeric",
    "lc_time",
    "statement_timeout",
    "lock_timeout",
    "idle_in_transaction_session_timeout",
    "geqo",
    "default_transaction_isolation",
];

/// True for the names PostgreSQL accepts for UTF-8 (case and punctuation ignored): the proxy
/// reads statements as UTF-8, as the classifier's SET rule does.
fn utf8_encoding(value: &str) -> bool {
    let v: String = value
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect::<String>()
        .to_ascii_lowercase();
    matches!(v.as_str(), "utf8" | "unicode")
}

/// True when a server-reported parameter would make the server read statements differently
/// from the proxy (standard_conforming_strings off, a client_encoding other than UTF-8).
pub fn lexing_parameter_unsafe(name: &str, value: &str) -> bool {
    match name {
        "standard_conforming_strings" => !value.eq_ignore_ascii_case("on"),
        "client_encoding" => !utf8_encoding(value),
        _ => false,
    }
}

/// A startup that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedStartup {
    pub target: TargetName,
    /// Database on the target, when the client named one (`prod-db/otherdb`).
    pub database: Option<String>,
    /// Parameters to forward, in the order received.
    pub forward: Vec<(String, String)>,
}

fn refuse(reason: Reason, message: String, hint: Option<String>) -> Refusal {
    Refusal { reason, message, hint }
}

/// Checks startup parameters against the client's identity.
pub fn check(identity: &Identity, params: &[(String, String)]) -> Result<CheckedStartup, Refusal> {
    let mut user = None;
    let mut database = None;
    let mut forward = Vec::new();
    for (name, value) in params {
        match name.to_ascii_lowercase().as_str() {
            "user" => user = Some(value.as_str()),
            "database" => database = Some(value.as_str()),
            lower if FORWARDED.contains(&lower) => forward.push((name.clone(), value.clone())),
            // These decide where the server sees a string literal end; the proxy reads
            // statements as UTF-8 with standard conforming strings, so only those pass.
            "client_encoding" if utf8_encoding(value) => forward.push((name.clone(), value.clone())),
            "standard_conforming_strings" if value.eq_ignore_ascii_case("on") => {
                forward.push((name.clone(), value.clone()))
            }
            lower @ ("client_encoding" | "standard_conforming_strings") => {
                return Err(refuse(
                    Reason::StartupParam,
                    format!("{lower}={value:?} is not allowed through jitgate"),
                    Some("use client_encoding=UTF8 and standard_conforming_strings=on".into()),
                ))
            }
            "options" => {
                return Err(refuse(
                    Reason::StartupParam,
                    "startup parameter \"options\" is not allowed through jitgate".into(),
                    Some("remove PGOPTIONS/options and use SET after connecting".into()),
                ))
            }
            "replication" => {
                return Err(refuse(
                    Reason::StartupParam,
                    "replication connections are not allowed through jitgate".into(),
                    None,
                ))
            }
            _ => {
                return Err(refuse(
                    Reason::StartupParam,
                    format!("startup parameter {name:?} is not allowed through jitgate"),
                    Some("use SET after connecting".into()),
                ))
            }
        }
    }
    let me = identity.user.as_str();
    let Some(user) = user else {
        return Err(refuse(
            Reason::UserMismatch,
            "no user in startup message".into(),
            Some(format!("connect with user={me}")),
        ));
    };
    if user != me {
        return Err(refuse(
            Reason::UserMismatch,
            format!("user \"{user}\" does not match the certificate's user \"{me}\""),
            Some(format!("connect with user={me}")),
        ));
    }
    // libpq defaults dbname to the user name; that is no target.
    let db = database.unwrap_or(user);
    let (target, database) = match db.split_once('/') {
        Some((t, d)) if !d.is_empty() => (t, Some(d.to_owned())),
        Some(_) => {
            return Err(refuse(
                Reason::UnknownTarget,
                format!("database \"{db}\" names no database after '/'"),
                None,
            ))
        }
        None => (db, None),
    };
    let target = TargetName::new(target).map_err(|_| {
        refuse(
            Reason::UnknownTarget,
            format!("\"{target}\" is not a jitgate target"),
            Some("set dbname to a target name, e.g. dbname=prod-db or dbname=prod-db/otherdb".into()),
        )
    })?;
    Ok(CheckedStartup {
        target,
        database,
        forward,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::UserName;

    fn alice() -> Identity {
        Identity {
            user: UserName::new("alice").unwrap(),
            roles: vec![],
            not_after: std::time::SystemTime::now(),
            enrolled_until: None,
        }
    }

    fn p(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn accepts_target_and_subdatabase() {
        let c = check(
            &alice(),
            &p(&[("user", "alice"), ("database", "prod-db/other"), ("DateStyle", "ISO")]),
        )
        .unwrap();
        assert_eq!(c.target.as_str(), "prod-db");
        assert_eq!(c.database.as_deref(), Some("other"));
        assert_eq!(c.forward, p(&[("DateStyle", "ISO")]));
    }

    #[test]
    fn refuses_smuggled_options_and_other_users() {
        assert_eq!(
            check(&alice(), &p(&[("user", "alice"), ("options", "-c role=x")]))
                .unwrap_err()
                .reason,
            Reason::StartupParam
        );
        assert_eq!(
            check(&alice(), &p(&[("user", "alice"), ("replication", "true")]))
                .unwrap_err()
                .reason,
            Reason::StartupParam
        );
        assert_eq!(
            check(&alice(), &p(&[("user", "alice"), ("session_authorization", "x")]))
                .unwrap_err()
                .reason,
            Reason::StartupParam
        );
        assert_eq!(
            check(&alice(), &p(&[("user", "bob"), ("database", "prod-db")]))
                .unwrap_err()
                .reason,
            Reason::UserMismatch
        );
        assert_eq!(
            check(&alice(), &p(&[("database", "prod-db")])).unwrap_err().reason,
            Reason::UserMismatch
        );
    }

    #[test]
    fn settings_that_change_lexing_are_refused() {
        let ok = check(
            &alice(),
            &p(&[
                ("user", "alice"),
                ("client_encoding", "UTF8"),
                ("standard_conforming_strings", "on"),
            ]),
        );
        assert!(ok.is_ok());
        assert!(check(&alice(), &p(&[("user", "alice"), ("client_encoding", "utf-8")])).is_ok());
        for (k, v) in [
            ("client_encoding", "SJIS"),
            ("client_encoding", "BIG5"),
            ("standard_conforming_strings", "off"),
        ] {
            assert_eq!(
                check(&alice(), &p(&[("user", "alice"), (k, v)])).unwrap_err().reason,
                Reason::StartupParam,
                "{k}={v}"
            );
        }
    }
}
