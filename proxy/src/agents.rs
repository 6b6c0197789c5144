//! Agents: targets in private networks, reached through a link the agent dials out to the
//! proxy (`listen.agents`).
//!
//! - Joining: an admin creates a one-time token ([`create_token`]); `jitgate-agent join`
//!   presents it on the agent listener with a CSR for a key it made itself, and gets back a
//!   short-lived certificate that names the agent (`jitgate:agent:NAME`).
//! - Running: the agent connects with that certificate, says which targets it serves, and the
//!   connection turns into HTTP/2 with the proxy as the client ([`jitgate_protocol::tunnel`]).
//!   The [`Hub`] holds one live link per agent name; a target with `via = "NAME"` is dialled
//!   as a stream of that link ([`RoutingDialer`]), so everything above the dialer (admission,
//!   the lease, the relay, audit, the cut) is the same as for a direct target.
//! - One name, two connections: the live link keeps the name and the second connection is
//!   refused (audited), retrying with backoff until the live link ends; see [`Hub`] and
//!   ARCHITECTURE.md.
//! - Several replicas: each holds its own link to every agent. Agents learn where the
//!   replicas are (`[agents] advertise`) from the answers and from their links (`replicas`);
//!   a removal reaches every replica through the store's change log (`cluster`).

mod hub;
mod listener;
mod replicas;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

pub use hub::{AgentStatus, Hub, RoutingDialer};
pub use listener::{serve_connection, AgentsContext};
use serde::{Deserialize, Serialize};

use crate::audit::{AuditEvent, AuditLog};
use crate::config::Config;
use crate::model::{AgentName, AgentToken, TargetName, UserName};
use crate::store::{Store, StoreError};

/// Longest a join token may live.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(7 * 86_400);

/// `POST /v1/agents/tokens`: a join token for `name`, admitted for `targets`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewAgentToken {
    pub name: AgentName,
    pub targets: Vec<TargetName>,
    /// How long the token may be used; default 1h, at most 7d.
    #[serde(default)]
    pub ttl_secs: Option<u64>,
}

/// A created token: the only time its secret is shown.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreatedAgentToken {
    pub id: String,
    pub name: AgentName,
    pub targets: Vec<TargetName>,
    #[serde(with = "crate::timefmt::serde_rfc3339")]
    pub expires_at: SystemTime,
    /// `jgj1.ID.SECRET.CA_SHA256`: give it to `jitgate-agent join --token`.
    pub token: String,
}

/// Why a token was not created.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot read the CA certificate: {0}")]
    Ca(String),
}

/// Creates a join token: checks the targets, stores the hash of a fresh secret, audits.
pub async fn create_token(
    config: &Config,
    store: &dyn Store,
    audit: &AuditLog,
    by: &UserName,
    new: NewAgentToken,
) -> Result<CreatedAgentToken, TokenError> {
    if new.targets.is_empty() {
        return Err(TokenError::Invalid("name at least one target the agent serves".into()));
    }
    for t in &new.targets {
        if !config.targets.contains_key(t) {
            return Err(TokenError::Invalid(format!("unknown target {t}")));
        }
    }
    let ttl = Duration::from_secs(new.ttl_secs.unwrap_or(3600));
    if ttl.is_zero() || ttl > MAX_TOKEN_TTL {
        return Err(TokenError::Invalid("ttl must be between 1s and 7d".into()));
    }
    // On tokio's blocking pool: the API handler runs on a worker.
    let ca_pem = tokio::fs::read_to_string(&config.tls.ca_cert)
        .await
        .map_err(|e| TokenError::Ca(e.to_string()))?;
    let ca_sha256 = crate::pki::cert_fingerprint(&ca_pem).map_err(|e| TokenError::Ca(e.to_string()))?;
    let id = format!("at-{}", hex(&rand::random::<[u8; 6]>()));
    let secret = base64::Engine::encode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        rand::random::<[u8; 32]>(),
    );
    let now = SystemTime::now();
    let token = AgentToken {
        id: id.clone(),
        agent: new.name.clone(),
        targets: new.targets.clone(),
        secret_sha256: secret_hash(&secret),
        created_by: by.clone(),
        created_at: now,
        expires_at: now + ttl,
    };
    store.insert_agent_token(&token).await?;
    audit.submit(AuditEvent::AgentTokenCreated {
        token_id: id.clone(),
        agent: new.name.clone(),
        targets: new.targets.clone(),
        by: by.clone(),
        expires_at: token.expires_at,
    });
    let text = jitgate_protocol::tunnel::JoinToken {
        id: id.clone(),
        secret,
        ca_sha256,
    }
    .to_string();
    Ok(CreatedAgentToken {
        id,
        name: new.name,
        targets: new.targets,
        expires_at: token.expires_at,
        token: text,
    })
}

/// What the store keeps of a token's secret.
pub(crate) fn secret_hash(secret: &str) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, secret.as_bytes()).as_ref())
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Forgets an agent and ends its live link here; the store's [`Change::AgentRemoved`] ends
/// its links on the other replicas. Audited as `agent.removed`.
///
/// [`Change::AgentRemoved`]: crate::store::Change::AgentRemoved
pub async fn remove(
    store: &dyn Store,
    hub: &Hub,
    audit: &AuditLog,
    by: &UserName,
    agent: &AgentName,
) -> Result<(), StoreError> {
    store.remove_agent(agent).await?;
    hub.end(agent);
    audit.submit(AuditEvent::AgentRemoved {
        agent: agent.clone(),
        by: by.clone(),
    });
    Ok(())
}

/// The agents that joined, with the state of their links.
pub async fn list(store: &dyn Store, hub: &Arc<Hub>) -> Result<Vec<AgentStatus>, StoreError> {
    let joined = store.agents().await?;
    Ok(hub.status(joined))
}
