//! The agent listener: TLS, the hello, then a join, a renewal, or a link that carries
//! HTTP/2 until it ends. A replica that did not perform an agent's join serves its link the
//! same way: the certificate is the shared CA's, the record is in the shared store.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use jitgate_protocol::tunnel::{self, Answer, Hello, JoinToken, KeepaliveEnd};
use rustls::ServerConfig;
use tokio::io::{AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{timeout_at, Instant};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::hub::{Hub, Link};
use crate::audit::{AuditEvent, AuditLog};
use crate::budget::Ticket;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::model::{AgentName, TargetName, TokenRefusal};
use crate::pki::{agent_from_der, AgentIdentity, Authority};
use crate::store::Store;

/// HTTP/2 flow-control windows of a link: a stream may have 1 MiB in flight, the link 16 MiB.
const STREAM_WINDOW: u32 = 1 << 20;
const LINK_WINDOW: u32 = 16 << 20;

/// What the agent listener needs.
pub struct AgentsContext {
    pub config: Config,
    pub tls: Arc<ServerConfig>,
    pub hub: Arc<Hub>,
    pub store: Arc<dyn Store>,
    pub audit: Arc<AuditLog>,
    pub metrics: Arc<Metrics>,
    /// The CA that signs agent certificates; `None` when the data directory holds no
    /// `ca.key` (joins and renewals are then refused).
    pub authority: Option<Arc<Authority>>,
    pub shutdown: CancellationToken,
}

type Stream = BufReader<TlsStream<TcpStream>>;

/// Serves one connection on the agent listener. `ticket` is its slot in the listener's
/// unauthenticated budget, held until the hello is answered.
pub async fn serve_connection(ctx: Arc<AgentsContext>, tcp: TcpStream, peer: SocketAddr, ticket: Ticket) {
    let _ = tcp.set_nodelay(true);
    let deadline = Instant::now() + ctx.config.limits.handshake_timeout;
    let hello = async {
        let tls = TlsAcceptor::from(Arc::clone(&ctx.tls)).accept(tcp).await.map_err(|e| {
            ctx.metrics
                .tls_handshake_failures_total
                .with_label_values(&["agents", crate::tls::failure_reason(&e)])
                .inc();
            format!("TLS handshake: {e}")
        })?;
        let identity = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|der| agent_from_der(der).map_err(|e| e.to_string()));
        // Whether the agent takes the replica list (see `replicas`).
        let told = tls.get_ref().1.alpn_protocol() == Some(tunnel::ALPN_REPLICAS);
        let mut stream = BufReader::new(tls);
        let line = tunnel::read_line(&mut stream)
            .await
            .map_err(|e| format!("reading the hello: {e}"));
        Ok::<_, String>((stream, identity, told, line))
    };
    let (mut stream, identity, told, line) = tokio::select! {
        r = timeout_at(deadline, hello) => match r {
            Err(_) => {
                tracing::debug!(client.addr = %peer, "agent hello timed out");
                return;
            }
            Ok(Err(error)) => {
                tracing::info!(client.addr = %peer, %error, "agent connection refused");
                return;
            }
            Ok(Ok(got)) => got,
        },
        () = ticket.evicted() => return,
    };
    let identity = match identity {
        Some(Err(why)) => {
            // A user certificate (or anything else that is not an agent's) on this listener.
            return refuse(&ctx, &mut stream, peer, None, &why, true).await;
        }
        Some(Ok(id)) => Some(id),
        None => None,
    };
    let hello = match line.map(|l| tunnel::decode_hello(&l).map_err(|e| e.to_string())) {
        Ok(Ok(h)) => h,
        Ok(Err(why)) | Err(why) => {
            let agent = identity.map(|i| i.name);
            return refuse(&ctx, &mut stream, peer, agent, &why, true).await;
        }
    };
    drop(ticket);
    match (hello, identity) {
        (Hello::Join { token, csr, .. }, _) => join(&ctx, &mut stream, peer, &token, &csr, told).await,
        (Hello::Renew { csr, .. }, Some(id)) => renew(&ctx, &mut stream, peer, id, &csr, told).await,
        (Hello::Run { targets, version, .. }, Some(id)) => run(ctx, stream, peer, id, targets, version, told).await,
        (Hello::Renew { .. } | Hello::Run { .. }, None) => {
            let why = "an agent certificate is required (join first: jitgate-agent join)";
            refuse(&ctx, &mut stream, peer, None, why, true).await;
        }
    }
}

/// Answers with a refusal, audits it and closes.
async fn refuse(
    ctx: &AgentsContext,
    stream: &mut Stream,
    peer: SocketAddr,
    agent: Option<AgentName>,
    why: &str,
    permanent: bool,
) {
    tracing::warn!(client.addr = %peer, agent = agent.as_ref().map(|a| a.as_str()), reason = why, "agent refused");
    ctx.audit.submit(AuditEvent::AgentRefused {
        agent,
        remote_addr: peer,
        reason: why.to_owned(),
    });
    answer(stream, &Answer::refused(why, permanent)).await;
}

async fn answer(stream: &mut Stream, answer: &Answer) {
    let bytes = tunnel::encode(answer);
    let sent = async {
        stream.write_all(&bytes).await?;
        stream.flush().await?;
        stream.shutdown().await
    };
    // Best effort: the agent may be gone.
    let _ = tokio::time::timeout(Duration::from_secs(2), sent).await;
}

fn authority(ctx: &AgentsContext) -> Result<&Authority, &'static str> {
    ctx.authority
        .as_deref()
        .ok_or("this proxy holds no CA key (ca.key) and cannot sign agent certificates")
}

async fn join(ctx: &AgentsContext, stream: &mut Stream, peer: SocketAddr, token: &str, csr: &str, told: bool) {
    let token: JoinToken = match token.parse() {
        Ok(t) => t,
        Err(why) => return refuse(ctx, stream, peer, None, &why, true).await,
    };
    let ca = match authority(ctx) {
        Ok(ca) => ca,
        Err(why) => return refuse(ctx, stream, peer, None, why, true).await,
    };
    // A request that cannot be signed must not spend the token.
    if let Err(e) = crate::pki::check_csr(csr) {
        return refuse(ctx, stream, peer, None, &e.to_string(), true).await;
    }
    let hash = super::secret_hash(&token.secret);
    let record = match ctx.store.redeem_agent_token(&token.id, &hash, SystemTime::now()).await {
        Ok(Ok(r)) => r,
        Ok(Err(refusal)) => {
            let why = match refusal {
                TokenRefusal::Unknown => refusal.as_str().to_owned(),
                _ => format!("{} ({})", refusal.as_str(), token.id),
            };
            return refuse(ctx, stream, peer, None, &why, true).await;
        }
        Err(e) => return refuse(ctx, stream, peer, None, &format!("cannot check the token: {e}"), false).await,
    };
    let ttl = ctx.config.agents.cert_ttl;
    let cert = match ca.issue_agent(&record.name, csr, ttl) {
        Ok(c) => c,
        Err(e) => return refuse(ctx, stream, peer, Some(record.name), &e.to_string(), true).await,
    };
    ctx.audit.submit(AuditEvent::AgentJoined {
        agent: record.name.clone(),
        targets: record.targets.clone(),
        token_id: record.token.clone(),
        remote_addr: peer,
        cert_expires_at: SystemTime::now() + ttl,
    });
    tracing::info!(agent = %record.name, client.addr = %peer, "agent joined");
    let reply = Answer {
        v: tunnel::VERSION,
        name: Some(record.name.to_string()),
        targets: record.targets.iter().map(ToString::to_string).collect(),
        cert: Some(cert),
        ca: Some(ca.cert_pem().to_owned()),
        replicas: super::replicas::for_answer(ctx, told).await,
        ..Answer::default()
    };
    answer(stream, &reply).await;
}

/// The agent's admitted targets, or why it has none.
async fn admitted(ctx: &AgentsContext, agent: &AgentName) -> Result<Vec<TargetName>, (String, bool)> {
    match ctx.store.agents().await {
        Ok(all) => all
            .into_iter()
            .find(|a| &a.name == agent)
            .map(|a| a.targets)
            .ok_or_else(|| (format!("agent {agent} has not joined this proxy"), true)),
        Err(e) => Err((format!("cannot read the agents: {e}"), false)),
    }
}

async fn renew(ctx: &AgentsContext, stream: &mut Stream, peer: SocketAddr, id: AgentIdentity, csr: &str, told: bool) {
    let targets = match admitted(ctx, &id.name).await {
        Ok(t) => t,
        Err((why, permanent)) => return refuse(ctx, stream, peer, Some(id.name), &why, permanent).await,
    };
    let ca = match authority(ctx) {
        Ok(ca) => ca,
        Err(why) => return refuse(ctx, stream, peer, Some(id.name), why, false).await,
    };
    let ttl = ctx.config.agents.cert_ttl;
    let cert = match ca.issue_agent(&id.name, csr, ttl) {
        Ok(c) => c,
        Err(e) => return refuse(ctx, stream, peer, Some(id.name), &e.to_string(), true).await,
    };
    let not_after = SystemTime::now() + ttl;
    ctx.hub.renewed(&id.name, not_after);
    ctx.audit.submit(AuditEvent::AgentRenewed {
        agent: id.name.clone(),
        remote_addr: peer,
        cert_expires_at: not_after,
    });
    let reply = Answer {
        v: tunnel::VERSION,
        name: Some(id.name.to_string()),
        targets: targets.iter().map(ToString::to_string).collect(),
        cert: Some(cert),
        replicas: super::replicas::for_answer(ctx, told).await,
        ..Answer::default()
    };
    answer(stream, &reply).await;
}

async fn run(
    ctx: Arc<AgentsContext>,
    mut stream: Stream,
    peer: SocketAddr,
    id: AgentIdentity,
    claimed: Vec<String>,
    version: String,
    told: bool,
) {
    let agent = id.name;
    let admitted = match admitted(&ctx, &agent).await {
        Ok(t) => t,
        Err((why, permanent)) => return refuse(&ctx, &mut stream, peer, Some(agent), &why, permanent).await,
    };
    let mut targets = Vec::with_capacity(claimed.len());
    for name in &claimed {
        match TargetName::new(name.as_str()) {
            Ok(t) if admitted.contains(&t) => targets.push(t),
            _ => {
                let why = format!("agent {agent} claims target {name:?}, which it was not admitted for");
                return refuse(&ctx, &mut stream, peer, Some(agent), &why, true).await;
            }
        }
    }
    if !stream.buffer().is_empty() {
        let why = "the agent sent data before the answer to its hello";
        return refuse(&ctx, &mut stream, peer, Some(agent), why, true).await;
    }
    let mut claim = match ctx.hub.claim(&agent, peer) {
        Ok(c) => c,
        Err(holder) => {
            // Not permanent: the agent retries, and gets the name once the live link ends.
            let why = format!("agent {agent} is already connected from {holder}");
            return refuse(&ctx, &mut stream, peer, Some(agent), &why, false).await;
        }
    };
    let reply = Answer {
        v: tunnel::VERSION,
        name: Some(agent.to_string()),
        targets: claimed,
        ..Answer::default()
    };
    let bytes = tunnel::encode(&reply);
    if stream.write_all(&bytes).await.is_err() || stream.flush().await.is_err() {
        return;
    }
    // Nothing is buffered (checked above): HTTP/2 runs on the TLS stream itself.
    let io = stream.into_inner();
    // The agent answers each stream with a bare status line: small header blocks only.
    let handshake = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(LINK_WINDOW)
        .max_header_list_size(16 * 1024)
        .max_send_buffer_size(STREAM_WINDOW as usize)
        .handshake::<_, bytes::Bytes>(io);
    let (send, mut conn) = match timeout_at(Instant::now() + ctx.config.limits.handshake_timeout, handshake).await {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => return tracing::info!(%agent, error = %e, "agent link: HTTP/2 handshake failed"),
        Err(_) => return tracing::info!(%agent, "agent link: HTTP/2 handshake timed out"),
    };
    let Some(ping) = conn.ping_pong() else {
        return tracing::error!(%agent, "agent link: no ping handle");
    };
    let (cert_end, mut cert_end_rx) = watch::channel(id.not_after);
    let link = Arc::new(Link {
        agent: agent.clone(),
        targets: targets.clone(),
        remote: peer,
        version: version.clone(),
        since: SystemTime::now(),
        send,
        end: CancellationToken::new(),
        cert_end,
    });
    claim.fill(Arc::clone(&link));
    ctx.audit.submit(AuditEvent::AgentConnected {
        agent: agent.clone(),
        targets,
        remote_addr: peer,
        version,
    });
    tracing::info!(%agent, client.addr = %peer, "agent connected");
    let started = std::time::Instant::now();
    let agents = &ctx.config.agents;
    let keepalive = tunnel::keepalive(ping, agents.keepalive_interval, agents.keepalive_timeout);
    let cert_expired = async {
        loop {
            let left = cert_end_rx
                .borrow_and_update()
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            tokio::select! {
                () = tokio::time::sleep(left) => {
                    if *cert_end_rx.borrow() <= SystemTime::now() {
                        return;
                    }
                }
                changed = cert_end_rx.changed() => if changed.is_err() { return },
            }
        }
    };
    let replicas = async {
        if told {
            super::replicas::push(link.send.clone(), ctx.hub.replicas(), &agent).await
        } else {
            std::future::pending().await
        }
    };
    let reason = tokio::select! {
        never = replicas => match never {},
        r = &mut conn => match r {
            Ok(()) => "closed",
            Err(e) if e.is_io() || e.is_go_away() => "closed",
            Err(_) => "error",
        },
        end = keepalive => match end {
            KeepaliveEnd::TimedOut => {
                ctx.metrics.agent_keepalive_failures_total.inc();
                tracing::warn!(%agent, timeout = ?agents.keepalive_timeout, "agent link: no keepalive answer");
                "keepalive_timeout"
            }
            KeepaliveEnd::Closed => "closed",
        },
        () = ctx.shutdown.cancelled() => "shutdown",
        () = link.end.cancelled() => "removed",
        () = cert_expired => "cert_expired",
    };
    drop(claim);
    // Dropping the connection fails every stream of the link at once: their sessions read
    // `LinkLost` and end with a FATAL that names the agent.
    drop(conn);
    tracing::warn!(%agent, client.addr = %peer, reason, "agent disconnected");
    ctx.audit.submit(AuditEvent::AgentDisconnected {
        agent,
        remote_addr: peer,
        reason: reason.to_owned(),
        duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    });
}
