//! Reading a config file's targets and policies without resolving secrets, for
//! `jitgate policy explain` where the targets' passwords are not available. Only the keys
//! policies depend on are read (target names, labels, which access levels have credentials);
//! everything else is left to `jitgate config check`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;

use super::{Policies, RawPolicy};
use crate::config::{ConfigError, Credential, Target, UpstreamTls};
use crate::types::{AccessLevel, TargetName};

/// Targets and policies read for inspection. The targets carry no passwords and no TLS or
/// guardrail settings: never connect with them.
#[derive(Debug)]
pub struct Inspection {
    pub targets: HashMap<TargetName, Arc<Target>>,
    pub policies: Policies,
}

#[derive(Deserialize)]
struct File {
    #[serde(default)]
    targets: Vec<FileTarget>,
    #[serde(default)]
    policies: Vec<RawPolicy>,
}

#[derive(Deserialize)]
struct FileTarget {
    name: String,
    #[serde(default)]
    address: String,
    #[serde(default)]
    database: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    credentials: BTreeMap<String, FileCredential>,
}

#[derive(Deserialize)]
struct FileCredential {
    #[serde(default)]
    user: String,
}

fn invalid(key: String, message: String) -> ConfigError {
    ConfigError::Invalid { key, message }
}

/// Reads `path` and validates its policies against its targets, without secrets.
pub fn load_for_inspection(path: &Path) -> Result<Inspection, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let file: File = toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    let mut targets = HashMap::new();
    for (i, t) in file.targets.into_iter().enumerate() {
        let name = TargetName::new(t.name).map_err(|e| invalid(format!("targets[{i}].name"), e.to_string()))?;
        let mut credentials = HashMap::new();
        for (level, c) in t.credentials {
            let access: AccessLevel = level
                .parse()
                .map_err(|e: String| invalid(format!("targets[{i}].credentials.{level}"), e))?;
            credentials.insert(
                access,
                Credential {
                    user: c.user,
                    password: None,
                },
            );
        }
        let target = Target {
            name: name.clone(),
            address: t.address,
            database: t.database,
            labels: t.labels,
            credentials,
            tls: UpstreamTls::Disable,
            guardrails: Vec::new(),
        };
        if targets.insert(name, Arc::new(target)).is_some() {
            return Err(invalid(format!("targets[{i}].name"), "duplicate target name".into()));
        }
    }
    let policies = super::validate(file.policies, &targets)?;
    Ok(Inspection { targets, policies })
}
