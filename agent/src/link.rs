//! `jitgate-agent run`: one link to the proxy at a time, HTTP/2 with the agent as the server.
//! Each stream the proxy opens names a target; the agent dials the target's local address and
//! pipes bytes until either side ends. A stream the proxy resets (a cut) closes its database
//! connection at once; when the whole link is lost, database connections stay open for
//! `orphan_grace`, then close. Lost links are redialled with exponential backoff and jitter.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, Result};
use bytes::Bytes;
use jitgate_protocol::tunnel::{self, Hello, KeepaliveEnd, CONNECT_PATH};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::config::{Address, Config, Joined};
use crate::enroll;

/// HTTP/2 windows, as on the proxy's side.
const STREAM_WINDOW: u32 = 1 << 20;
const LINK_WINDOW: u32 = 16 << 20;
/// Streams one link may carry at once.
const MAX_STREAMS: u32 = 65_536;
/// A link that lasted this long resets the backoff.
const STABLE: Duration = Duration::from_secs(10);
/// How long dialling a target may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a link attempt ended.
enum Ended {
    /// Retrying helps (network, proxy restart, keepalive).
    Retry(String),
    /// The proxy refused for good (not admitted, not joined): stop.
    Refused(String),
}

/// Runs until `shutdown`, or until the proxy refuses the agent for good.
pub async fn run(config: Config, joined: Joined, shutdown: CancellationToken) -> Result<()> {
    let config = Arc::new(config);
    let proxy = config.proxy.clone().unwrap_or_else(|| joined.proxy.clone());
    let server_name = config.server_name.clone().unwrap_or_else(|| joined.server_name.clone());
    for name in config.targets.keys() {
        if !joined.targets.contains(name) {
            // The proxy decides (and audits); this is only an early hint.
            tracing::warn!(target = %name, "target is not among those this agent was admitted for");
        }
    }
    let renewals = tokio::spawn(renew_loop(
        proxy.clone(),
        server_name.clone(),
        Arc::clone(&config),
        shutdown.clone(),
    ));
    let mut backoff = Backoff::new(Duration::from_millis(250), config.reconnect_max);
    let outcome = loop {
        let started = Instant::now();
        let ended = tokio::select! {
            e = link_once(&config, &proxy, &server_name, &joined.name) => e,
            () = shutdown.cancelled() => break Ok(()),
        };
        match ended {
            Ended::Refused(why) => break Err(anyhow!("the proxy refused this agent: {why}")),
            Ended::Retry(why) => tracing::warn!(reason = %why, "link to the proxy ended"),
        }
        if started.elapsed() >= STABLE {
            backoff.reset();
        }
        let wait = backoff.next();
        tracing::info!(in_ms = wait.as_millis() as u64, "reconnecting");
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = shutdown.cancelled() => break Ok(()),
        }
    };
    renewals.abort();
    outcome
}

/// Exponential backoff with full jitter: each wait is random in [0, min(max, base * 2^n)].
struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    fn new(base: Duration, max: Duration) -> Self {
        Self { base, max, attempt: 0 }
    }

    fn reset(&mut self) {
        self.attempt = 0;
    }

    fn next(&mut self) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.max)
            .max(self.base);
        self.attempt = self.attempt.saturating_add(1);
        let millis = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX).max(1);
        // At least a tenth of the ceiling, so a flapping link never spins.
        Duration::from_millis(rand::random::<u64>() % millis).max(ceiling / 10)
    }
}

async fn link_once(config: &Arc<Config>, proxy: &str, server_name: &str, name: &str) -> Ended {
    let dir = config.data_dir.clone();
    let tls = match tokio::task::spawn_blocking(move || enroll::client_config(&dir))
        .await
        .map_err(anyhow::Error::from)
        .and_then(|r| r)
    {
        Ok(t) => t,
        Err(e) => return Ended::Refused(format!("{e:#}")),
    };
    let hello = Hello::Run {
        v: tunnel::VERSION,
        targets: config.targets.keys().cloned().collect(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    let (stream, answer) = match enroll::hello(proxy, server_name, tls, &hello).await {
        Ok(got) => got,
        Err(e) => return Ended::Retry(format!("{e:#}")),
    };
    if let Some(error) = answer.error {
        return if answer.permanent {
            Ended::Refused(error)
        } else {
            Ended::Retry(error)
        };
    }
    let handshake = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(LINK_WINDOW)
        .max_concurrent_streams(MAX_STREAMS)
        .handshake::<_, Bytes>(stream);
    let mut conn = match tokio::time::timeout(Duration::from_secs(10), handshake).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Ended::Retry(format!("HTTP/2 handshake: {e}")),
        Err(_) => return Ended::Retry("HTTP/2 handshake timed out".into()),
    };
    tracing::info!(agent = name, proxy, targets = ?answer.targets, "link up");
    let Some(ping) = conn.ping_pong() else {
        return Ended::Retry("no ping handle".into());
    };
    let dead = CancellationToken::new();
    let keepalive = {
        let (dead, interval, timeout) = (dead.clone(), config.keepalive_interval, config.keepalive_timeout);
        tokio::spawn(async move {
            if tunnel::keepalive(ping, interval, timeout).await == KeepaliveEnd::TimedOut {
                dead.cancel();
            }
        })
    };
    let ended = loop {
        tokio::select! {
            next = conn.accept() => match next {
                Some(Ok((request, respond))) => {
                    tokio::spawn(serve_stream(Arc::clone(config), request, respond));
                }
                Some(Err(e)) => break Ended::Retry(format!("link failed: {e}")),
                None => break Ended::Retry("the proxy closed the link".into()),
            },
            () = dead.cancelled() => {
                break Ended::Retry(format!("no keepalive answer for {:?}", config.keepalive_timeout));
            }
        }
    };
    keepalive.abort();
    // Dropping the connection fails every stream: each pipe then waits out the orphan grace
    // and closes its database connection.
    drop(conn);
    ended
}

async fn serve_stream(
    config: Arc<Config>,
    request: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
) {
    let target = request
        .uri()
        .path()
        .strip_prefix(CONNECT_PATH)
        .unwrap_or_default()
        .to_owned();
    let refuse = |respond: &mut h2::server::SendResponse<Bytes>, status: u16, why: String| {
        tracing::warn!(target = %target, reason = %why, "stream refused");
        let response = http::Response::builder().status(status).body(()).unwrap_or_default();
        if let Ok(mut body) = respond.send_response(response, false) {
            let _ = body.send_data(Bytes::from(why), true);
        }
    };
    let Some(address) = config.targets.get(&target) else {
        return refuse(&mut respond, 404, format!("this agent does not serve {target:?}"));
    };
    let db = match tokio::time::timeout(DIAL_TIMEOUT, dial(address)).await {
        Ok(Ok(db)) => db,
        Ok(Err(e)) => return refuse(&mut respond, 502, format!("{address}: {e}")),
        Err(_) => return refuse(&mut respond, 504, format!("{address}: timed out")),
    };
    let send = match respond.send_response(http::Response::new(()), false) {
        Ok(s) => s,
        Err(e) => return tracing::debug!(error = %e, "stream gone before it was answered"),
    };
    let h2 = tunnel::H2Stream::new(send, request.into_body(), "proxy");
    tracing::debug!(target = %target, %address, "stream open");
    match db {
        Db::Tcp(t) => pipe(h2, t, config.orphan_grace).await,
        Db::Unix(u) => pipe(h2, u, config.orphan_grace).await,
    }
}

enum Db {
    Tcp(TcpStream),
    Unix(UnixStream),
}

async fn dial(address: &Address) -> std::io::Result<Db> {
    match address {
        Address::Tcp(a) => {
            let t = TcpStream::connect(a).await?;
            let _ = t.set_nodelay(true);
            Ok(Db::Tcp(t))
        }
        Address::Unix(p) => Ok(Db::Unix(UnixStream::connect(p).await?)),
    }
}

/// Copies both ways until either side ends. A reset stream (a cut) closes the database
/// connection at once; a lost link keeps it for `grace` first.
async fn pipe<D: AsyncRead + AsyncWrite + Unpin>(mut h2: tunnel::H2Stream, mut db: D, grace: Duration) {
    match tokio::io::copy_bidirectional(&mut h2, &mut db).await {
        Err(e) if tunnel::link_lost(&e).is_some() => {
            tracing::info!(
                grace_ms = grace.as_millis() as u64,
                "link lost under a session: closing its database connection after the grace"
            );
            drop(h2);
            tokio::time::sleep(grace).await;
        }
        Err(e) => tracing::debug!(error = %e, "stream ended"),
        Ok(_) => {}
    }
    drop(db);
}

/// Renews the certificate when two thirds of its lifetime have passed; retries every
/// minute (or sooner, near the end) on failure.
async fn renew_loop(proxy: String, server_name: String, config: Arc<Config>, shutdown: CancellationToken) {
    loop {
        let wait = match enroll::current_validity(&config.data_dir) {
            Ok((from, until)) => {
                let life = until.duration_since(from).unwrap_or_default();
                let at = from + life * 2 / 3;
                at.duration_since(SystemTime::now()).unwrap_or_default()
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "cannot read the agent certificate");
                Duration::from_secs(60)
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = shutdown.cancelled() => return,
        }
        match enroll::renew(&proxy, &server_name, &config.data_dir).await {
            Ok(until) => tracing::info!(until = %humantime::format_rfc3339_seconds(until), "certificate renewed"),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "certificate renewal failed; retrying");
                let left = enroll::current_validity(&config.data_dir)
                    .ok()
                    .and_then(|(_, until)| until.duration_since(SystemTime::now()).ok())
                    .unwrap_or_default();
                let retry = (left / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
                tokio::select! {
                    () = tokio::time::sleep(retry) => {}
                    () = shutdown.cancelled() => return,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_ceiling_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let waits: Vec<_> = (0..12).map(|_| b.next()).collect();
        for w in &waits {
            assert!(*w <= Duration::from_secs(2), "{w:?}");
            assert!(*w >= Duration::from_millis(10), "{w:?}");
        }
        // Late waits draw from [200ms, 2s]: twelve in a row all equal would not be jitter.
        assert!(waits[6..].windows(2).any(|w| w[0] != w[1]), "{waits:?}");
        assert!(waits[8..].iter().all(|w| *w >= Duration::from_millis(200)), "{waits:?}");
        b.reset();
        assert!(b.next() <= Duration::from_millis(100));
    }
}
