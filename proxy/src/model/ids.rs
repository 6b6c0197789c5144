//! Newtypes for the identifiers that cross module boundaries: users, roles, targets, access
//! levels, grant ids and session ids. Constructors validate, so a value in hand is well-formed.

use std::fmt;
use std::str::FromStr;

use rand::Rng;
use serde::{Deserialize, Serialize};

/// Why an identifier was rejected.
#[derive(Debug, thiserror::Error)]
#[error("invalid {kind} {value:?}: {rule}")]
pub struct InvalidName {
    kind: &'static str,
    value: String,
    rule: &'static str,
}

fn check_name(kind: &'static str, value: &str, extra: &[char]) -> Result<(), InvalidName> {
    let ok = !value.is_empty()
        && value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c) || extra.contains(&c));
    if ok {
        Ok(())
    } else {
        Err(InvalidName {
            kind,
            value: value.to_owned(),
            rule: "use 1-63 ASCII letters, digits, '_', '-' or '.'",
        })
    }
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $extra:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Validates and wraps a name.
            pub fn new(value: impl Into<String>) -> Result<Self, InvalidName> {
                let value = value.into();
                check_name($kind, &value, $extra)?;
                Ok(Self(value))
            }
            /// The name as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl TryFrom<String> for $name {
            type Error = InvalidName;
            fn try_from(value: String) -> Result<Self, InvalidName> {
                Self::new(value)
            }
        }
        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.pad(&self.0)
            }
        }
        impl FromStr for $name {
            type Err = InvalidName;
            fn from_str(s: &str) -> Result<Self, InvalidName> {
                Self::new(s)
            }
        }
    };
}

name_type!(
    /// A user, as named by the client certificate (may contain `@`).
    UserName, "user name", &['@']
);
name_type!(
    /// A role carried by a certificate (`admin`, `dev`, `dba`, ...).
    Role, "role", &[]
);
name_type!(
    /// A configured target (`prod-db`).
    TargetName, "target name", &[]
);
name_type!(
    /// An agent (`db-east`), as named by its join token and certificate.
    AgentName, "agent name", &[]
);

/// The access levels a grant can carry, ordered by privilege.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLevel {
    Read,
    Write,
    Admin,
}

impl AccessLevel {
    /// All levels, lowest first.
    pub const ALL: [AccessLevel; 3] = [AccessLevel::Read, AccessLevel::Write, AccessLevel::Admin];

    /// The level as written in config and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            AccessLevel::Read => "read",
            AccessLevel::Write => "write",
            AccessLevel::Admin => "admin",
        }
    }
}

impl fmt::Display for AccessLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl FromStr for AccessLevel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "read" => Ok(AccessLevel::Read),
            "write" => Ok(AccessLevel::Write),
            "admin" => Ok(AccessLevel::Admin),
            other => Err(format!("unknown access level {other:?}: use read, write or admin")),
        }
    }
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// A fresh random id (`<prefix>-` and 16 hex digits).
            pub fn generate() -> Self {
                Self(format!(concat!($prefix, "-{:016x}"), rand::thread_rng().gen::<u64>()))
            }
            /// Wraps an id read from storage or the command line.
            pub fn from_string(s: impl Into<String>) -> Self {
                Self(s.into())
            }
            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.pad(&self.0)
            }
        }
    };
}

id_type!(
    /// Identifies a grant.
    GrantId, "g"
);
id_type!(
    /// Identifies an access or extension request.
    RequestId, "r"
);
id_type!(
    /// Identifies a proxied session.
    SessionId, "s"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        assert!(UserName::new("alice@example.com").is_ok());
        assert!(UserName::new("").is_err());
        assert!(TargetName::new("prod db").is_err());
        assert!(TargetName::new("prod-db/x").is_err());
        assert!(Role::new("a@b").is_err());
    }

    #[test]
    fn access_levels_order_by_privilege() {
        assert!(AccessLevel::Read < AccessLevel::Write && AccessLevel::Write < AccessLevel::Admin);
        assert_eq!("write".parse::<AccessLevel>(), Ok(AccessLevel::Write));
        assert!("root".parse::<AccessLevel>().is_err());
    }
}
