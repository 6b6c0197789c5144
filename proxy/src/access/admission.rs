//! The one place a session is admitted, for every protocol: (identity, target, protocol,
//! client address) gives a [`Lease`] or a typed [`Refusal`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::dialer::Dialer;
use super::lease::Lease;
use super::refusal::{Reason, Refusal};
use super::table::GrantTable;
use super::wave::CutWave;
use crate::budget::UserSessions;
use crate::clock::SharedClock;
use crate::config::Target;
use crate::model::{SessionId, SessionMeta, TargetName};
use crate::pki::Identity;
use crate::sessions::{NewSession, Sessions};

/// The data path a session arrives on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Postgres,
    Ssh,
}

impl Protocol {
    /// The `protocol` label of metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Postgres => "postgres",
            Protocol::Ssh => "ssh",
        }
    }
}

/// What a listener asks for.
#[derive(Debug, Clone)]
pub struct Ask<'a> {
    pub identity: &'a Identity,
    pub target: &'a TargetName,
    pub protocol: Protocol,
    pub client_addr: SocketAddr,
    /// What inside the target the session opens (PostgreSQL: the database); `None` for the
    /// target's default.
    pub database: Option<String>,
}

/// Admits sessions: the targets, the grant table, the session registry and the per-user limit.
pub struct Admission {
    pub targets: Arc<HashMap<TargetName, Arc<Target>>>,
    pub grants: Arc<GrantTable>,
    pub sessions: Arc<Sessions>,
    pub users: Arc<UserSessions>,
    pub shutdown: CancellationToken,
    pub clock: SharedClock,
    pub dialer: Arc<dyn Dialer>,
    /// Orders the two phases of cuts that end many sessions at once.
    pub wave: Arc<CutWave>,
}

impl Admission {
    /// A lease for `ask`, or why not. Checked in this order: the per-user session limit, the
    /// target, a live grant, the certificate's validity.
    pub fn admit(&self, ask: Ask<'_>) -> Result<Lease, Refusal> {
        let user = &ask.identity.user;
        // Held for the whole session, so one user cannot take every session slot.
        let Some(slot) = self.users.try_take(user) else {
            let max = self.users.max();
            return Err(Refusal::new(
                Reason::MaxSessionsPerUser,
                format!("too many sessions for {user}: jitgate allows {max} per user (limits.max_sessions_per_user)"),
            )
            .hint("close a session you no longer need, or ask an operator to raise limits.max_sessions_per_user"));
        };
        let target_name = ask.target;
        let Some(target) = self.targets.get(target_name).cloned() else {
            return Err(Refusal::new(
                Reason::UnknownTarget,
                format!("\"{target_name}\" is not a jitgate target"),
            )
            .hint("set dbname to a configured target, e.g. dbname=prod-db"));
        };
        let serves = match ask.protocol {
            Protocol::Postgres => crate::config::TargetKind::Postgres,
            Protocol::Ssh => crate::config::TargetKind::Ssh,
        };
        if target.kind != serves {
            return Err(Refusal::new(
                Reason::UnknownTarget,
                format!(
                    "\"{target_name}\" is a{} {} target, not {}",
                    if target.kind == crate::config::TargetKind::Ssh {
                        "n"
                    } else {
                        ""
                    },
                    target.kind.as_str(),
                    serves.as_str()
                ),
            )
            .hint(match target.kind {
                crate::config::TargetKind::Ssh => format!("connect with ssh: ssh -p PORT {target_name}@PROXY"),
                crate::config::TargetKind::Postgres => format!("connect with psql: dbname={target_name}"),
            }));
        }
        if self.grants.resyncing() {
            return Err(Refusal::new(
                Reason::Resyncing,
                "jitgate is re-reading its grants from the store (after an outage); no new sessions until it is done",
            )
            .hint("try again in a few seconds"));
        }
        let Some(permit) = self.grants.lookup(user, target_name) else {
            return Err(
                Refusal::new(Reason::NoGrant, format!("no active grant for {user} on {target_name}")).hint(format!(
                    "request access: jitgate request {target_name} --access read --for 30m --reason \"...\""
                )),
            );
        };
        if ask.identity.not_after <= self.clock.now() {
            return Err(Refusal::new(Reason::CertExpired, "client certificate has expired")
                .hint("get a new certificate: jitgate cert issue"));
        }
        let grant = permit.grant();
        let registration = self.sessions.register(NewSession {
            meta: SessionMeta {
                id: SessionId::generate(),
                grant_id: grant.id.clone(),
                user: user.clone(),
                roles: ask.identity.roles.clone(),
                target: target_name.clone(),
                database: ask.database.unwrap_or_else(|| target.database.clone()),
                access: grant.access,
                client_addr: ask.client_addr,
                upstream_role: crate::credentials::upstream_role(&target, grant).into(),
            },
            cut_parent: permit.cut_token().clone(),
        });
        Ok(Lease {
            cert_deadline: self.clock.instant_at(ask.identity.not_after),
            permit,
            target,
            registration,
            _slot: slot,
            shutdown: self.shutdown.clone(),
            dialer: Arc::clone(&self.dialer),
            wave: Arc::clone(&self.wave),
        })
    }
}

#[cfg(test)]
mod tests;
