//! The live agent links, one per agent name, and the dialer that opens streams on them; and
//! the replica list this replica tells its agents (every replica holds a link of its own to
//! each agent, so the list is what lets any replica reach any agent's targets).

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use jitgate_protocol::tunnel::{H2Stream, CONNECT_PATH};
use prometheus::IntGauge;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::access::{BoxedIo, Dialer, TcpDialer};
use crate::config::Target;
use crate::metrics::Metrics;
use crate::model::{AgentName, AgentRecord, TargetName};

/// How long the agent may take to answer a stream (it dials its target meanwhile).
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// One agent's live link.
pub struct Link {
    pub agent: AgentName,
    pub targets: Vec<TargetName>,
    pub remote: SocketAddr,
    pub version: String,
    pub since: SystemTime,
    pub(super) send: h2::client::SendRequest<Bytes>,
    /// Cancelled to end the link from outside (the agent was removed).
    pub(super) end: CancellationToken,
    /// When the agent's certificate ends; a renewal moves it.
    pub(super) cert_end: watch::Sender<SystemTime>,
}

/// An agent as `jitgate agent list` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentStatus {
    pub name: AgentName,
    /// Targets it was admitted for.
    pub targets: Vec<TargetName>,
    #[serde(with = "crate::timefmt::serde_rfc3339")]
    pub joined_at: SystemTime,
    pub connected: bool,
    /// Targets its live link serves.
    #[serde(default)]
    pub serving: Vec<TargetName>,
    #[serde(default, with = "crate::timefmt::serde_rfc3339_opt")]
    pub connected_since: Option<SystemTime>,
    #[serde(default)]
    pub remote_addr: Option<SocketAddr>,
    #[serde(default)]
    pub version: Option<String>,
}

/// An agent name's place in the hub: claimed by a connection whose link is being set up, or
/// held by a live link.
enum Slot {
    Claimed { remote: SocketAddr },
    Live(Arc<Link>),
}

/// The live links, by agent name. One link per name: while a link lives, another connection
/// for the same name is refused (and retries), so two processes with one identity never
/// take turns cutting each other's sessions; a restarted agent gets the name back as soon as
/// the old link ends (at once when the process died, within the keepalive timeout when its
/// packets are dropped).
pub struct Hub {
    links: Mutex<HashMap<AgentName, Slot>>,
    /// Names that had a link before (a new link for one of them is a reconnect).
    seen: Mutex<HashSet<AgentName>>,
    /// Where agents reach the replicas alive now (`[agents] advertise` of each), as last read
    /// from the store; empty alone. Each live link sends it to its agent when it changes.
    replicas: watch::Sender<Vec<String>>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").finish_non_exhaustive()
    }
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere cannot leave the maps half-updated (each update is one call).
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Hub {
    pub fn new(metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            links: Mutex::new(HashMap::new()),
            seen: Mutex::new(HashSet::new()),
            replicas: watch::Sender::new(Vec::new()),
            metrics,
        })
    }

    /// Records the replicas' advertised agent addresses (read from the store); the live links
    /// pass a changed list on to their agents.
    pub fn set_replicas(&self, list: Vec<String>) {
        self.replicas.send_if_modified(|held| {
            let changed = *held != list;
            if changed {
                *held = list;
            }
            changed
        });
    }

    /// The replica list as last read, and its changes.
    pub(super) fn replicas(&self) -> watch::Receiver<Vec<String>> {
        self.replicas.subscribe()
    }

    /// Claims `agent`'s name for a connection from `remote`, or says who holds it.
    pub(super) fn claim(self: &Arc<Self>, agent: &AgentName, remote: SocketAddr) -> Result<Claim, SocketAddr> {
        let mut links = locked(&self.links);
        match links.get(agent) {
            Some(Slot::Claimed { remote }) => Err(*remote),
            Some(Slot::Live(l)) => Err(l.remote),
            None => {
                links.insert(agent.clone(), Slot::Claimed { remote });
                Ok(Claim {
                    hub: Arc::clone(self),
                    agent: agent.clone(),
                    live: None,
                })
            }
        }
    }

    /// The agent's live link.
    pub fn get(&self, agent: &AgentName) -> Option<Arc<Link>> {
        match locked(&self.links).get(agent) {
            Some(Slot::Live(l)) => Some(Arc::clone(l)),
            _ => None,
        }
    }

    /// The agents with a live link here.
    pub fn linked(&self) -> Vec<AgentName> {
        locked(&self.links)
            .iter()
            .filter(|(_, slot)| matches!(slot, Slot::Live(_)))
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Ends the agent's live link, if it has one (its sessions end with it).
    pub fn end(&self, agent: &AgentName) {
        if let Some(link) = self.get(agent) {
            link.end.cancel();
        }
    }

    /// Moves the end of the live link's certificate (after a renewal).
    pub(super) fn renewed(&self, agent: &AgentName, not_after: SystemTime) {
        if let Some(link) = self.get(agent) {
            link.cert_end.send_replace(not_after);
        }
    }

    /// Every joined agent with its link's state.
    pub fn status(&self, joined: Vec<AgentRecord>) -> Vec<AgentStatus> {
        let links = locked(&self.links);
        joined
            .into_iter()
            .map(|a| {
                let link = match links.get(&a.name) {
                    Some(Slot::Live(l)) => Some(l),
                    _ => None,
                };
                AgentStatus {
                    connected: link.is_some(),
                    serving: link.map(|l| l.targets.clone()).unwrap_or_default(),
                    connected_since: link.map(|l| l.since),
                    remote_addr: link.map(|l| l.remote),
                    version: link.map(|l| l.version.clone()),
                    name: a.name,
                    targets: a.targets,
                    joined_at: a.joined_at,
                }
            })
            .collect()
    }

    /// A stream to `target` through `agent`'s live link.
    pub async fn open(&self, agent: &AgentName, target: &TargetName) -> io::Result<AgentIo> {
        let link = self
            .get(agent)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, format!("agent {agent} is not connected")))?;
        if !link.targets.contains(target) {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                format!("agent {agent} does not serve {target}"),
            ));
        }
        let lost = |e: h2::Error| io::Error::new(io::ErrorKind::NotConnected, format!("agent {agent}: {e}"));
        let open = async {
            let mut send = link.send.clone().ready().await.map_err(lost)?;
            let request = http::Request::builder()
                .method(http::Method::POST)
                .uri(format!("http://{agent}{CONNECT_PATH}{target}"))
                .body(())
                .map_err(io::Error::other)?;
            let (response, stream) = send.send_request(request, false).map_err(lost)?;
            let response = response.await.map_err(lost)?;
            let (head, mut body) = response.into_parts();
            if head.status != http::StatusCode::OK {
                // The agent says why in a short body.
                let mut why = Vec::new();
                while let Some(Ok(chunk)) = body.data().await {
                    let _ = body.flow_control().release_capacity(chunk.len());
                    why.extend_from_slice(&chunk);
                    if why.len() > 1024 {
                        break;
                    }
                }
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!(
                        "agent {agent} could not reach {target}: {}",
                        String::from_utf8_lossy(&why).trim()
                    ),
                ));
            }
            Ok(H2Stream::new(stream, body, agent.to_string()))
        };
        let stream = tokio::time::timeout(OPEN_TIMEOUT, open).await.map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("agent {agent} did not answer within {OPEN_TIMEOUT:?}"),
            )
        })??;
        let open = self.metrics.agent_streams_open.clone();
        open.inc();
        Ok(AgentIo { stream, open })
    }
}

/// A connection's hold on an agent name; dropping it frees the name.
pub struct Claim {
    hub: Arc<Hub>,
    agent: AgentName,
    live: Option<Arc<Link>>,
}

impl Claim {
    /// The link is up: sessions may use it.
    pub(super) fn fill(&mut self, link: Arc<Link>) {
        if !locked(&self.hub.seen).insert(self.agent.clone()) {
            self.hub.metrics.agent_reconnects_total.inc();
        }
        self.hub.metrics.agents_connected.inc();
        locked(&self.hub.links).insert(self.agent.clone(), Slot::Live(Arc::clone(&link)));
        self.live = Some(link);
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        locked(&self.hub.links).remove(&self.agent);
        if self.live.is_some() {
            self.hub.metrics.agents_connected.dec();
        }
    }
}

/// A stream of an agent link, counted in `jitgate_agent_streams_open` while it lives.
#[derive(Debug)]
pub struct AgentIo {
    stream: H2Stream,
    open: IntGauge,
}

impl Drop for AgentIo {
    fn drop(&mut self) {
        self.open.dec();
    }
}

impl AsyncRead for AgentIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for AgentIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Dials a target directly, or through its agent when it has `via`.
#[derive(Debug)]
pub struct RoutingDialer {
    pub hub: Arc<Hub>,
}

#[async_trait]
impl Dialer for RoutingDialer {
    async fn dial(&self, target: &Target) -> io::Result<BoxedIo> {
        match &target.via {
            None => TcpDialer.dial(target).await,
            Some(agent) => Ok(Box::new(self.hub.open(agent, &target.name).await?)),
        }
    }
}
