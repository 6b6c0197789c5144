//! `[[policies]]` as written in the config file, and its validation against the configured
//! targets (their labels and which access levels have credentials). Errors name the key,
//! e.g. `policies[1].max_duration`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::{labels_text, selects, Approval, Policies, Policy};
use crate::config::{ConfigError, Target};
use crate::model::{AccessLevel, Role, TargetName};

/// Shortest `max_duration` accepted.
const MIN_DURATION: Duration = Duration::from_secs(60);
/// Longest `max_duration` accepted (30 days).
const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);

/// One `[[policies]]` table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    name: String,
    #[serde(default)]
    roles: Vec<String>,
    targets: Option<BTreeMap<String, String>>,
    #[serde(default)]
    access: Vec<String>,
    max_duration: Option<String>,
    approve: Option<String>,
    approvers: Option<Vec<String>>,
    approvals: Option<u32>,
    #[serde(default)]
    break_glass: bool,
    slack_channel: Option<String>,
    approve_in_chat: Option<bool>,
}

fn invalid(key: String, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

/// Validates `[[policies]]` against the validated targets.
pub fn validate(raw: Vec<RawPolicy>, targets: &HashMap<TargetName, Arc<Target>>) -> Result<Policies, ConfigError> {
    let mut sorted: Vec<&Target> = targets.values().map(|t| &**t).collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut names = HashSet::new();
    let mut list = Vec::with_capacity(raw.len());
    for (i, p) in raw.into_iter().enumerate() {
        let policy = p.validate(i, &sorted)?;
        if !names.insert(policy.name.clone()) {
            return Err(invalid(format!("policies[{i}].name"), "duplicate policy name"));
        }
        list.push(policy);
    }
    Ok(Policies { list })
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 63 && name.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
}

fn role_list(key: &str, values: Vec<String>) -> Result<Vec<Role>, ConfigError> {
    if values.is_empty() {
        return Err(invalid(key.to_owned(), "must name at least one role"));
    }
    values
        .into_iter()
        .enumerate()
        .map(|(j, r)| Role::new(r).map_err(|e| invalid(format!("{key}[{j}]"), e.to_string())))
        .collect()
}

impl RawPolicy {
    fn validate(self, i: usize, targets: &[&Target]) -> Result<Policy, ConfigError> {
        let key = |k: &str| format!("policies[{i}].{k}");
        if !valid_name(&self.name) {
            return Err(invalid(
                key("name"),
                format!("{:?}: use 1-63 ASCII letters, digits, '_', '-' or '.'", self.name),
            ));
        }
        let roles = role_list(&key("roles"), self.roles)?;
        if self.access.is_empty() {
            return Err(invalid(key("access"), "must name at least one of read, write, admin"));
        }
        let mut access = Vec::new();
        for (j, a) in self.access.iter().enumerate() {
            let level: AccessLevel = a
                .parse()
                .map_err(|e: String| invalid(key(&format!("access[{j}]")), e))?;
            if !access.contains(&level) {
                access.push(level);
            }
        }
        let max_duration = match self.max_duration {
            None => return Err(invalid(key("max_duration"), "required, e.g. \"1h\"")),
            Some(text) => humantime::parse_duration(&text)
                .map_err(|e| invalid(key("max_duration"), format!("{text:?} is not a duration ({e})")))?,
        };
        if !(MIN_DURATION..=MAX_DURATION).contains(&max_duration) {
            return Err(invalid(key("max_duration"), "must be between 1m and 30d"));
        }
        let approval = match (self.approve.as_deref(), self.approvers) {
            (Some("auto"), None) => {
                if self.approvals.is_some() {
                    return Err(invalid(
                        key("approvals"),
                        "only with approvers, not with approve = \"auto\"",
                    ));
                }
                Approval::Auto
            }
            (Some("auto"), Some(_)) => {
                return Err(invalid(
                    key("approvers"),
                    "set approve = \"auto\" or approvers, not both",
                ));
            }
            (Some(other), _) => {
                return Err(invalid(
                    key("approve"),
                    format!("{other:?}: the only value is \"auto\"; for approvals set approvers instead"),
                ));
            }
            (None, None) => {
                return Err(invalid(
                    key("approve"),
                    "set approve = \"auto\" or approvers = [ROLES] (and approvals = N)",
                ));
            }
            (None, Some(approvers)) => {
                let roles = role_list(&key("approvers"), approvers)?;
                let approvals = self.approvals.unwrap_or(1);
                if approvals == 0 {
                    return Err(invalid(key("approvals"), "must be at least 1"));
                }
                Approval::Approvers { roles, approvals }
            }
        };
        let Some(selector) = self.targets else {
            return Err(invalid(
                key("targets"),
                "required: a label selector, {} for every target",
            ));
        };
        let matched: Vec<&&Target> = targets.iter().filter(|t| selects(&selector, &t.labels)).collect();
        if matched.is_empty() {
            return Err(invalid(
                key("targets"),
                format!(
                    "matches no target (no [[targets]] has the labels {})",
                    labels_text(&selector)
                ),
            ));
        }
        for t in &matched {
            if let Some(level) = access.iter().find(|a| !t.credentials.contains_key(a)) {
                return Err(invalid(
                    key("access"),
                    format!("grants {level} on target {}, which has no credentials.{level}", t.name),
                ));
            }
        }
        let slack_channel = match self.slack_channel {
            Some(c) if c.is_empty() || c.len() > 80 || c.chars().any(|ch| ch.is_whitespace() || ch.is_control()) => {
                return Err(invalid(key("slack_channel"), format!("{c:?} is not a Slack channel")));
            }
            other => other,
        };
        Ok(Policy {
            name: self.name,
            roles,
            targets: selector,
            access,
            max_duration,
            approval,
            break_glass: self.break_glass,
            slack_channel,
            approve_in_chat: self.approve_in_chat.unwrap_or(true),
        })
    }
}
