//! Access policies (`[[policies]]`): who may ask for which access to which targets, for how
//! long, and who decides. [`Policies::decide`] turns a request ([`Ask`]) into a [`Decision`];
//! [`Policies::may_approve`] checks an approver; [`Policies::explain`] says why in words.
//!
//! This module decides only. It does not store requests, count approvals or create grants:
//! the request workflow does that with the decisions made here. Raw config parsing and
//! validation live in [`raw`]; `policy explain` reads the config with
//! `Config::load_without_secrets`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use crate::config::Target;
use crate::model::{AccessLevel, Role, UserName};

pub mod command;
mod raw;

pub use raw::{validate, RawPolicy};

#[cfg(test)]
mod tests;

/// The validated `[[policies]]`, in config order (the first that fits a request decides it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policies {
    list: Vec<Policy>,
}

/// One validated `[[policies]]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Unique name, quoted in decisions, audit records and `policy explain`.
    pub name: String,
    /// Requester roles served; a requester needs at least one of them.
    pub roles: Vec<Role>,
    /// Label selector over the targets' labels: every pair must match; empty selects all.
    pub targets: BTreeMap<String, String>,
    /// Access levels a request may ask for.
    pub access: Vec<AccessLevel>,
    /// Longest duration a request may ask for (1m to 30d).
    pub max_duration: Duration,
    /// Who decides.
    pub approval: Approval,
    /// Whether requesters may ask for break-glass access (granted at once, flagged). Default
    /// false.
    pub break_glass: bool,
    /// `slack_channel`: the Slack channel (ID or `#name`) its pending requests are posted to.
    pub slack_channel: Option<String>,
    /// `approve_in_chat` (default true): Approve and Deny buttons in the Slack message;
    /// false posts a link to the web console instead.
    pub approve_in_chat: bool,
}

/// Who decides requests under a policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Approval {
    /// `approve = "auto"`: granted at once.
    Auto,
    /// `approvers` + `approvals`: that many distinct users holding one of `roles`, never the
    /// requester.
    Approvers { roles: Vec<Role>, approvals: u32 },
}

/// A request to decide.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    pub user: &'a UserName,
    /// The requester's roles, from their certificate.
    pub roles: &'a [Role],
    pub target: &'a Target,
    pub access: AccessLevel,
    pub duration: Duration,
    /// Break-glass: granted at once under a policy that allows it, flagged for review.
    pub break_glass: bool,
}

/// What a request gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Granted at once.
    Auto { policy: String },
    /// Waits for `approvals` distinct users holding one of `approvers`.
    NeedsApproval {
        policy: String,
        approvers: Vec<Role>,
        approvals: u32,
    },
    /// Granted at once as break-glass access: flagged and notified.
    BreakGlass { policy: String },
    /// Refused at once, with the reason shown to the requester.
    Refused { reason: String },
}

/// Why a policy does not fit a request, in the order the checks run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Miss {
    Role,
    Target,
    Access,
    BreakGlass,
    Duration,
}

impl Policy {
    /// True when the policy serves one of `roles`.
    pub fn serves(&self, roles: &[Role]) -> bool {
        roles.iter().any(|r| self.roles.contains(r))
    }

    /// True when every pair of the selector is among the target's labels.
    pub fn selects(&self, target: &Target) -> bool {
        selects(&self.targets, &target.labels)
    }

    fn miss(&self, ask: &Ask) -> Option<Miss> {
        if !self.serves(ask.roles) {
            Some(Miss::Role)
        } else if !self.selects(ask.target) {
            Some(Miss::Target)
        } else if !self.access.contains(&ask.access) {
            Some(Miss::Access)
        } else if ask.break_glass && !self.break_glass {
            Some(Miss::BreakGlass)
        } else if ask.duration > self.max_duration {
            Some(Miss::Duration)
        } else {
            None
        }
    }

    fn decision(&self, break_glass: bool) -> Decision {
        let policy = self.name.clone();
        match &self.approval {
            _ if break_glass => Decision::BreakGlass { policy },
            Approval::Auto => Decision::Auto { policy },
            Approval::Approvers { roles, approvals } => Decision::NeedsApproval {
                policy,
                approvers: roles.clone(),
                approvals: *approvals,
            },
        }
    }

    fn miss_text(&self, miss: Miss, ask: &Ask) -> String {
        match miss {
            Miss::Role => format!(
                "does not serve roles {} (serves {})",
                roles_text(ask.roles),
                roles_text(&self.roles)
            ),
            Miss::Target => format!(
                "does not select {}: needs labels {}, it has {}",
                ask.target.name,
                labels_text(&self.targets),
                labels_text(&ask.target.labels)
            ),
            Miss::Access => format!(
                "does not allow {} access (allows {})",
                ask.access,
                self.access.iter().map(|a| a.as_str()).collect::<Vec<_>>().join(", ")
            ),
            Miss::BreakGlass => "does not allow break-glass (break_glass = false)".into(),
            Miss::Duration => format!(
                "duration {} exceeds its maximum of {}",
                duration_text(ask.duration),
                duration_text(self.max_duration)
            ),
        }
    }
}

pub(crate) fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

impl Policies {
    /// The policies, in config order.
    pub fn iter(&self) -> impl Iterator<Item = &Policy> {
        self.list.iter()
    }

    /// The policy named `name`.
    pub fn get(&self, name: &str) -> Option<&Policy> {
        self.list.iter().find(|p| p.name == name)
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Decides a request: the first policy in config order that serves one of the roles,
    /// selects the target, allows the access level (and break-glass, when asked) and the
    /// duration decides it. Anything else is refused, with a reason the requester can act on.
    pub fn decide(&self, ask: &Ask) -> Decision {
        let refused = |reason: String| Decision::Refused { reason };
        if self.list.is_empty() {
            return refused("no [[policies]] configured: every request is refused".into());
        }
        if ask.duration.is_zero() {
            return refused("the duration must be longer than zero".into());
        }
        let mut too_long = None;
        let mut without_break_glass = None;
        for p in &self.list {
            match p.miss(ask) {
                None => return p.decision(ask.break_glass),
                Some(Miss::Duration) => {
                    too_long.get_or_insert(p);
                }
                Some(Miss::BreakGlass) => {
                    without_break_glass.get_or_insert(p);
                }
                Some(_) => {}
            }
        }
        if let Some(p) = too_long {
            return refused(format!(
                "duration {} exceeds the {} maximum of policy {}",
                duration_text(ask.duration),
                duration_text(p.max_duration),
                p.name
            ));
        }
        let what = format!(
            "{} access to {} for roles {}",
            ask.access,
            ask.target.name,
            roles_text(ask.roles)
        );
        if let Some(p) = without_break_glass {
            return refused(format!(
                "no policy allows break-glass {what}; policy {} allows it without --break-glass",
                p.name
            ));
        }
        refused(format!("no policy allows {what}"))
    }

    /// The longest duration the policy that would decide `ask` allows, ignoring
    /// `ask.duration`: the default duration of `policy explain`.
    pub fn max_duration_for(&self, ask: &Ask) -> Option<Duration> {
        self.list
            .iter()
            .find(|p| matches!(p.miss(ask), None | Some(Miss::Duration)))
            .map(|p| p.max_duration)
    }

    /// Checks that `approver` may decide `requester`'s request under `policy`: never the
    /// requester, and only a holder of one of the policy's approver roles.
    pub fn may_approve(
        &self,
        policy: &str,
        approver: &UserName,
        approver_roles: &[Role],
        requester: &UserName,
    ) -> Result<(), String> {
        let p = self.get(policy).ok_or_else(|| format!("no policy named {policy:?}"))?;
        if approver == requester {
            return Err(format!("{approver} cannot approve their own request"));
        }
        match &p.approval {
            Approval::Auto => Err(format!(
                "policy {} approves automatically; nobody approves its requests",
                p.name
            )),
            Approval::Approvers { roles, .. } if approver_roles.iter().any(|r| roles.contains(r)) => Ok(()),
            Approval::Approvers { roles, .. } => Err(format!(
                "{approver} (roles {}) may not approve under policy {}: it needs one of the roles {}",
                roles_text(approver_roles),
                p.name,
                roles_text(roles)
            )),
        }
    }

    /// Explains a decision in words: the request, one line per policy (matched, or why
    /// not), the decision and what it would take.
    pub fn explain(&self, ask: &Ask) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "request: {} (roles {}) asks for {}{} access to {} for {}",
            ask.user,
            roles_text(ask.roles),
            if ask.break_glass { "break-glass " } else { "" },
            ask.access,
            ask.target.name,
            duration_text(ask.duration)
        );
        if self.list.is_empty() {
            let _ = writeln!(out, "policies: none configured");
        }
        let mut matched: Option<&Policy> = None;
        for p in &self.list {
            let line = match (matched, p.miss(ask)) {
                (Some(m), _) => format!("not reached: policy {} matched first", m.name),
                (None, None) => {
                    matched = Some(p);
                    "matches".to_owned()
                }
                (None, Some(miss)) => format!("no: {}", p.miss_text(miss, ask)),
            };
            let _ = writeln!(out, "policy {}: {line}", p.name);
        }
        let hint = format!(
            "jitgate request {} --access {} --for {}{} --reason TEXT",
            ask.target.name,
            ask.access,
            duration_text(ask.duration),
            if ask.break_glass { " --break-glass" } else { "" }
        );
        let _ = match self.decide(ask) {
            Decision::Auto { policy } => writeln!(
                out,
                "decision: allowed at once by policy {policy} (approve = \"auto\")\n\
                 to get it: {hint}"
            ),
            Decision::NeedsApproval {
                policy,
                approvers,
                approvals,
            } => writeln!(
                out,
                "decision: needs approval under policy {policy}: {approvals} distinct approver{} \
                 holding one of the roles {}, never the requester\n\
                 to get it: {hint}, then wait for the approvals",
                if approvals == 1 { "" } else { "s" },
                roles_text(&approvers)
            ),
            Decision::BreakGlass { policy } => writeln!(
                out,
                "decision: break-glass under policy {policy}: granted at once, flagged for \
                 review and notified\nto get it: {hint}"
            ),
            Decision::Refused { reason } => writeln!(out, "decision: refused: {reason}"),
        };
        out
    }
}

fn roles_text(roles: &[Role]) -> String {
    if roles.is_empty() {
        "(none)".into()
    } else {
        roles.iter().map(Role::as_str).collect::<Vec<_>>().join(", ")
    }
}

pub(crate) fn labels_text(labels: &BTreeMap<String, String>) -> String {
    let pairs: Vec<String> = labels.iter().map(|(k, v)| format!("{k} = {v:?}")).collect();
    format!("{{{}}}", pairs.join(", "))
}

/// A duration as config and flags write it, to the second ("1h 30m").
pub(crate) fn duration_text(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
}
