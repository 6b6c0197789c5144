//! `jitgate-agent run`: one link to each replica of the proxy, HTTP/2 with the agent as the
//! server. The replicas are the proxy it joined (or `proxy` in its config) and every address
//! it learnt: from the join and renewal answers and from the lists its links carry
//! (`POST /replicas`), saved in `replicas.json`. Each address has its own link loop, with
//! its own backoff; an address a later list no longer names keeps its live link until that
//! ends, and is not redialled (a replica that is only slow to reach the store keeps its
//! sessions).
//!
//! Each stream a proxy opens names a target; the agent dials the target's local address and
//! pipes bytes until either side ends. A stream the proxy resets (a cut) closes its database
//! connection at once; when a whole link is lost, its database connections stay open for
//! `orphan_grace`, then close. Lost links are redialled with exponential backoff and jitter.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, Result};
use bytes::Bytes;
use jitgate_protocol::tunnel::{self, Hello, KeepaliveEnd, CONNECT_PATH, MAX_HELLO, REPLICAS_PATH};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{self as files, Address, Config, Joined};
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

/// What every link of this agent shares.
struct Shared {
    config: Config,
    /// The agent's name.
    name: String,
    /// The name every proxy's certificate is checked against (the replicas share the CA and,
    /// as deploy/replicas does, a certificate that carries it).
    server_name: String,
    /// The proxy it joined, or `proxy` in its config: always linked to, whatever the lists say.
    first: String,
    /// The replica addresses learnt (sorted, each once, dialable).
    learnt: watch::Sender<Vec<String>>,
}

impl Shared {
    /// Every address to hold a link to.
    fn addresses(&self) -> BTreeSet<String> {
        let mut all: BTreeSet<String> = self.learnt.borrow().iter().cloned().collect();
        all.insert(self.first.clone());
        all
    }

    /// Whether `addr` should still be dialled.
    fn wanted(&self, addr: &str) -> bool {
        addr == self.first || self.learnt.borrow().iter().any(|a| a == addr)
    }

    /// Takes a list a proxy sent. An empty one (a proxy alone or older, or one that could
    /// not read its store) changes nothing.
    fn learn(&self, list: Vec<String>) {
        let list = files::clean_replicas(list);
        if list.is_empty() {
            return;
        }
        self.learnt.send_if_modified(|held| {
            if *held == list {
                return false;
            }
            tracing::info!(replicas = ?list, "replica list changed");
            *held = list;
            true
        });
    }
}

/// Runs until `shutdown`, or until a proxy refuses the agent for good.
pub async fn run(config: Config, joined: Joined, shutdown: CancellationToken) -> Result<()> {
    for name in config.targets.keys() {
        if !joined.targets.contains(name) {
            // The proxy decides (and audits); this is only an early hint.
            tracing::warn!(target = %name, "target is not among those this agent was admitted for");
        }
    }
    let learnt = files::load_replicas(&config.data_dir);
    let shared = Arc::new(Shared {
        first: config.proxy.clone().unwrap_or_else(|| joined.proxy.clone()),
        server_name: config.server_name.clone().unwrap_or_else(|| joined.server_name.clone()),
        name: joined.name,
        learnt: watch::Sender::new(learnt),
        config,
    });
    let stop = shutdown.child_token();
    let renewals = tokio::spawn(renew_loop(Arc::clone(&shared), stop.clone()));
    let saves = tokio::spawn(save_loop(Arc::clone(&shared), stop.clone()));
    let outcome = supervise(&shared, &stop).await;
    stop.cancel();
    renewals.abort();
    let _ = saves.await;
    outcome
}

/// Keeps one link loop per address, starting loops for addresses that appear; returns when
/// `stop` is cancelled, or with the reason when a proxy refused the agent for good (every
/// link then ends: the same store backs every replica, so the others would refuse too).
async fn supervise(shared: &Arc<Shared>, stop: &CancellationToken) -> Result<()> {
    let mut links = JoinSet::new();
    let mut running = BTreeSet::new();
    let mut changes = shared.learnt.subscribe();
    loop {
        for addr in shared.addresses() {
            if running.insert(addr.clone()) {
                links.spawn(link_loop(Arc::clone(shared), addr, stop.clone()));
            }
        }
        tokio::select! {
            done = links.join_next(), if !links.is_empty() => match done {
                Some(Ok((addr, None))) => {
                    running.remove(&addr);
                }
                Some(Ok((_, Some(why)))) => return Err(anyhow!("the proxy refused this agent: {why}")),
                Some(Err(e)) => return Err(anyhow!("a link task failed: {e}")),
                None => {}
            },
            changed = changes.changed() => {
                // `shared` holds the sender: it cannot be gone while this runs.
                let _ = changed;
            }
            () = stop.cancelled() => return Ok(()),
        }
    }
}

/// Links to `addr` and redials it while it is wanted. Returns the address, and the reason
/// when the proxy refused the agent for good.
async fn link_loop(shared: Arc<Shared>, addr: String, stop: CancellationToken) -> (String, Option<String>) {
    let mut backoff = Backoff::new(Duration::from_millis(250), shared.config.reconnect_max);
    let mut changes = shared.learnt.subscribe();
    loop {
        if !shared.wanted(&addr) {
            tracing::info!(proxy = %addr, "replica no longer listed: not redialling it");
            return (addr, None);
        }
        let started = Instant::now();
        let ended = tokio::select! {
            e = link_once(&shared, &addr) => e,
            () = stop.cancelled() => return (addr, None),
        };
        match ended {
            Ended::Refused(why) => return (addr, Some(why)),
            Ended::Retry(why) => tracing::warn!(proxy = %addr, reason = %why, "link to the proxy ended"),
        }
        if started.elapsed() >= STABLE {
            backoff.reset();
        }
        let wait = backoff.next();
        tracing::info!(proxy = %addr, in_ms = wait.as_millis() as u64, "reconnecting");
        let until = tokio::time::Instant::now() + wait;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(until) => break,
                () = stop.cancelled() => return (addr, None),
                // Checked again at the top: a dropped address is not redialled.
                changed = changes.changed() => if changed.is_err() || !shared.wanted(&addr) { break },
            }
        }
    }
}

/// Saves every new replica list, so a restart links to all of them at once.
async fn save_loop(shared: Arc<Shared>, stop: CancellationToken) {
    let mut changes = shared.learnt.subscribe();
    loop {
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            () = stop.cancelled() => return,
        }
        let list = changes.borrow_and_update().clone();
        let dir = shared.config.data_dir.clone();
        // The write syncs the file: off the agent's one thread, which drives the links.
        match tokio::task::spawn_blocking(move || files::save_replicas(&dir, &list)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %format!("{e:#}"), "replica list not saved"),
            Err(e) => tracing::warn!(error = %e, "replica list not saved"),
        }
    }
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

async fn link_once(shared: &Arc<Shared>, proxy: &str) -> Ended {
    let config = &shared.config;
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
    let (stream, answer) = match enroll::hello(proxy, &shared.server_name, tls, &hello).await {
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
    tracing::info!(agent = %shared.name, proxy, targets = ?answer.targets, "link up");
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
                    tokio::spawn(serve_stream(Arc::clone(shared), request, respond));
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
    shared: Arc<Shared>,
    request: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
) {
    if request.uri().path() == REPLICAS_PATH {
        return take_replicas(&shared, request, respond).await;
    }
    let config = &shared.config;
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

/// A replica list a proxy sent on its link (`POST /replicas`): read (bounded), taken, 200.
async fn take_replicas(
    shared: &Shared,
    request: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
) {
    let mut body = request.into_body();
    let read = async {
        let mut bytes = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(|e| e.to_string())?;
            let _ = body.flow_control().release_capacity(chunk.len());
            bytes.extend_from_slice(&chunk);
            if bytes.len() > MAX_HELLO {
                return Err(format!("longer than {MAX_HELLO} bytes"));
            }
        }
        tunnel::decode_replicas(&bytes).map_err(|e| e.to_string())
    };
    let status = match tokio::time::timeout(DIAL_TIMEOUT, read).await {
        Ok(Ok(list)) => {
            shared.learn(list);
            http::StatusCode::OK
        }
        Ok(Err(why)) => {
            tracing::warn!(reason = %why, "unreadable replica list from the proxy");
            http::StatusCode::BAD_REQUEST
        }
        Err(_) => {
            tracing::warn!("replica list from the proxy not sent in time");
            http::StatusCode::REQUEST_TIMEOUT
        }
    };
    let response = http::Response::builder().status(status).body(()).unwrap_or_default();
    let _ = respond.send_response(response, true);
}

/// Renews at the first address that can (the proxy it joined first: replicas without the
/// CA key refuse renewals), and takes the replica list of the answer.
async fn renew_anywhere(shared: &Shared) -> Result<enroll::Renewed> {
    let mut order = vec![shared.first.clone()];
    order.extend(shared.learnt.borrow().iter().filter(|a| **a != shared.first).cloned());
    let mut failures = Vec::new();
    for addr in order {
        match enroll::renew(&addr, &shared.server_name, &shared.config.data_dir).await {
            Ok(renewed) => return Ok(renewed),
            Err(e) => failures.push(format!("{addr}: {e:#}")),
        }
    }
    Err(anyhow!(failures.join("; ")))
}

/// Renews the certificate when two thirds of its lifetime have passed; retries every
/// minute (or sooner, near the end) on failure.
async fn renew_loop(shared: Arc<Shared>, shutdown: CancellationToken) {
    let config = &shared.config;
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
        match renew_anywhere(&shared).await {
            Ok(renewed) => {
                tracing::info!(
                    until = %humantime::format_rfc3339_seconds(renewed.not_after),
                    "certificate renewed"
                );
                shared.learn(renewed.replicas);
            }
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
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn shared(first: &str, learnt: &[&str]) -> Shared {
        let path = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(path.path(), "[targets]\nprod-db = \"127.0.0.1:5432\"\n").unwrap();
        Shared {
            config: Config::load(path.path()).unwrap(),
            name: "db-east".into(),
            server_name: "localhost".into(),
            first: first.into(),
            learnt: watch::Sender::new(learnt.iter().map(|a| (*a).to_owned()).collect()),
        }
    }

    #[test]
    fn the_first_proxy_and_every_replica_learnt_are_linked_and_an_empty_list_changes_nothing() {
        let s = shared("lb.internal:8444", &[]);
        assert_eq!(s.addresses(), BTreeSet::from(["lb.internal:8444".to_owned()]));
        s.learn(vec![
            "jg-2.internal:8444".into(),
            "jg-1.internal:8444".into(),
            "not an address".into(),
        ]);
        assert_eq!(
            s.addresses().into_iter().collect::<Vec<_>>(),
            ["jg-1.internal:8444", "jg-2.internal:8444", "lb.internal:8444"]
        );
        // A proxy alone, older, or without its store says nothing: the list stays.
        s.learn(Vec::new());
        assert!(s.wanted("jg-2.internal:8444"));
        // A later list without jg-2: it is no longer dialled; the first proxy always is.
        s.learn(vec!["jg-1.internal:8444".into()]);
        assert!(!s.wanted("jg-2.internal:8444"));
        assert!(s.wanted("jg-1.internal:8444") && s.wanted("lb.internal:8444"));
        // The first proxy named among the replicas is linked once.
        let s = shared("jg-1.internal:8444", &["jg-1.internal:8444", "jg-2.internal:8444"]);
        assert_eq!(s.addresses().len(), 2);
    }

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
