//! `jitgate policy ...`: the command-line side of policies. Works on the config file alone
//! (no API, no secrets).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::{Args, Subcommand};

use super::Ask;
use crate::config::Config;
use crate::model::{AccessLevel, Role, TargetName, UserName};

/// `jitgate policy` subcommands.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Show which policy a request would match and what it would take.
    ///
    /// Prints the request, one line per policy (matches, or why not), and the decision:
    /// allowed at once, needs N approvals from given roles, break-glass, or refused with the
    /// reason. Exits 0 whatever the decision. Reads the config without resolving secrets, so
    /// it runs where the targets' passwords are not set.
    Explain(ExplainArgs),
}

/// Arguments of `jitgate policy explain`.
#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// Config file holding the [[targets]] and [[policies]].
    #[arg(long, short, env = "JITGATE_CONFIG")]
    config: PathBuf,
    /// The requester's user name.
    #[arg(long)]
    user: String,
    /// The requester's roles, comma-separated, e.g. dev,oncall.
    #[arg(long, value_delimiter = ',')]
    roles: Vec<String>,
    /// Target asked for.
    #[arg(long)]
    target: String,
    /// Access level asked for: read, write or admin.
    #[arg(long)]
    access: AccessLevel,
    /// Duration asked for, e.g. 30m. Default: the maximum of the policy that would decide.
    #[arg(long = "for", value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Ask for break-glass access.
    #[arg(long)]
    break_glass: bool,
}

/// Runs a `jitgate policy` subcommand.
pub fn run(command: PolicyCommand) -> Result<()> {
    match command {
        PolicyCommand::Explain(a) => explain(a),
    }
}

fn explain(a: ExplainArgs) -> Result<()> {
    let user = UserName::new(a.user)?;
    let roles = a.roles.into_iter().map(Role::new).collect::<Result<Vec<_>, _>>()?;
    let target_name = TargetName::new(a.target)?;
    // Targets' secrets need not be available where a policy is explained.
    let inspection = Config::load_without_secrets(&a.config)?;
    let target = inspection
        .targets
        .get(&target_name)
        .with_context(|| format!("{}: no target named {target_name}", a.config.display()))?;
    let mut ask = Ask {
        user: &user,
        roles: &roles,
        target,
        access: a.access,
        duration: a.duration.unwrap_or(Duration::from_secs(3600)),
        break_glass: a.break_glass,
    };
    if a.duration.is_none() {
        if let Some(max) = inspection.policies.max_duration_for(&ask) {
            ask.duration = max;
        }
    }
    print!("{}", inspection.policies.explain(&ask));
    Ok(())
}
