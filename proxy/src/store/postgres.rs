//! The shared store: one PostgreSQL database for several replicas (`[store] url`).
//!
//! Same tables and the same compare-and-set statements as the SQLite store, plus a `changes`
//! log: every write inserts its [`Change`] into `changes` in the same transaction, under a
//! transaction-level advisory lock so `seq` order is commit order, and `NOTIFY`s
//! `jitgate_changes`. Each replica's follower (one connection of its own, `LISTEN`ing) reads
//! the log past the last `seq` it applied, on every notification, every
//! [`POLL`] (in case notifications stop) and after every reconnect, and publishes the changes
//! on [`Store::changes`] in `seq` order. Writers do not publish their own changes directly:
//! every replica, the writer included, sees one ordered feed. A follower that finds `seq`s
//! missing (the log was trimmed past it) publishes [`Change::Resync`]: re-read everything.
//!
//! Migrations are numbered and applied at start under a session advisory lock, so replicas
//! starting together apply each once.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, Mutex};
use tokio_postgres::{AsyncMessage, Client};
use tokio_util::sync::CancellationToken;

use super::{Change, GrantWrite, RequestQuery, Store, StoreError, Versioned};
use crate::config::{StoreConfig, UpstreamTls};
use crate::model::{
    AgentName, AgentRecord, AgentToken, Grant, GrantEnd, GrantId, Invite, Request, RequestId, SessionId, SlackLink,
    TargetName, TokenRefusal, UserName,
};
use crate::sessions::{CancelKey, SessionInfo};
use crate::timefmt::{from_millis, to_millis};

/// How often the follower reads the log without a notification.
pub const POLL: Duration = Duration::from_secs(1);
/// Changes older than this are trimmed from the log at start.
const KEEP_CHANGES: &str = "7 days";
/// Advisory lock keys: migrations (session lock) and change order (transaction lock).
const MIGRATE_LOCK: i64 = 0x6a69_7467_6d69_6772;
const CHANGE_LOCK: i64 = 0x6a69_7467_6368_6e67;
/// How many changes a slow follower of [`Store::changes`] may fall behind.
const CHANGES: usize = 4096;
/// Longest wait for one store operation: past it the connection is dropped and the operation
/// fails as unreachable, so a store behind a partition never holds a caller.
const OP_TIMEOUT: Duration = Duration::from_secs(5);
/// The channel CancelRequests between replicas go on (not logged).
const SIGNALS: &str = "jitgate_signals";
/// At most this many CancelRequests a second are passed to the other replicas: the cancel
/// port takes connections nobody authenticated, and must not turn them into store traffic
/// without bound.
const CANCELS_PER_SECOND: u32 = 50;

/// Schema versions, applied in order; each runs once, in a transaction.
const MIGRATIONS: &[&str] = &[
    "
CREATE TABLE grants (
    id          TEXT PRIMARY KEY,
    \"user\"    TEXT NOT NULL,
    target      TEXT NOT NULL,
    access      TEXT NOT NULL,
    reason      TEXT NOT NULL,
    created_by  TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL,
    ended_at    BIGINT,
    end_reason  TEXT
);
CREATE INDEX grants_active ON grants (created_at) WHERE ended_at IS NULL;
CREATE TABLE requests (
    id          TEXT PRIMARY KEY,
    \"user\"    TEXT NOT NULL,
    state       TEXT NOT NULL,
    break_glass BOOLEAN NOT NULL,
    created_at  BIGINT NOT NULL,
    lapses_at   BIGINT NOT NULL,
    body        TEXT NOT NULL,
    version     BIGINT NOT NULL
);
CREATE INDEX requests_state ON requests (state, lapses_at);
CREATE INDEX requests_created ON requests (created_at);
CREATE TABLE agent_tokens (
    id            TEXT PRIMARY KEY,
    agent         TEXT NOT NULL,
    targets       TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL,
    created_by    TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    expires_at    BIGINT NOT NULL,
    used_at       BIGINT
);
CREATE TABLE agents (
    name      TEXT PRIMARY KEY,
    targets   TEXT NOT NULL,
    joined_at BIGINT NOT NULL,
    token     TEXT NOT NULL
);
CREATE TABLE changes (
    seq  BIGINT PRIMARY KEY,
    at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    body TEXT NOT NULL
);
",
    "
CREATE TABLE replicas (
    id       TEXT PRIMARY KEY,
    seen_at  BIGINT NOT NULL,
    sessions TEXT NOT NULL
);
",
    // Where agents reach the replica (`[agents] advertise`); NULL: nowhere.
    "
ALTER TABLE replicas ADD COLUMN agents_addr TEXT;
",
    // Invite codes for `jitgate login --invite`.
    "
CREATE TABLE invites (
    id            TEXT PRIMARY KEY,
    \"user\"    TEXT NOT NULL,
    roles         TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL,
    created_by    TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    expires_at    BIGINT NOT NULL,
    used_at       BIGINT
);
",
    // Slack accounts linked to jitgate users (`jitgate slack link`).
    "
CREATE TABLE slack_links (
    team       TEXT NOT NULL,
    slack_user TEXT NOT NULL,
    \"user\"   TEXT NOT NULL,
    roles      TEXT NOT NULL,
    linked_at  BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (team, slack_user)
);
",
];

/// A change as the log stores it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Logged {
    GrantCreated { grant: Grant },
    GrantExtended { id: GrantId, expires_at_ms: i64 },
    GrantEnded { id: GrantId, end: GrantEnd },
    RequestChanged { id: RequestId, version: u64 },
    SessionKilled { id: SessionId },
    AgentRemoved { name: AgentName },
}

impl Logged {
    fn of(change: &Change) -> Option<Self> {
        Some(match change {
            Change::GrantCreated(g) => Self::GrantCreated { grant: g.clone() },
            Change::GrantExtended { id, expires_at } => Self::GrantExtended {
                id: id.clone(),
                expires_at_ms: to_millis(*expires_at),
            },
            Change::GrantEnded { id, end } => Self::GrantEnded {
                id: id.clone(),
                end: *end,
            },
            Change::RequestChanged { id, version } => Self::RequestChanged {
                id: id.clone(),
                version: *version,
            },
            Change::SessionKilled { id } => Self::SessionKilled { id: id.clone() },
            Change::AgentRemoved { name } => Self::AgentRemoved { name: name.clone() },
            Change::Resync => return None,
        })
    }

    fn change(self) -> Change {
        match self {
            Self::GrantCreated { grant } => Change::GrantCreated(grant),
            Self::GrantExtended { id, expires_at_ms } => Change::GrantExtended {
                id,
                expires_at: from_millis(expires_at_ms),
            },
            Self::GrantEnded { id, end } => Change::GrantEnded { id, end },
            Self::RequestChanged { id, version } => Change::RequestChanged { id, version },
            Self::SessionKilled { id } => Change::SessionKilled { id },
            Self::AgentRemoved { name } => Change::AgentRemoved { name },
        }
    }
}

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// A failed call, with its causes: tokio-postgres says only "db error" at the top, the
/// server's message is in the source.
fn db<E: std::error::Error>(e: E) -> StoreError {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    StoreError::Unavailable(text)
}

/// Where a follower connection's notifications go.
#[derive(Clone)]
struct Listener {
    changes: tokio::sync::mpsc::Sender<()>,
    cancels: broadcast::Sender<CancelKey>,
}

impl Listener {
    fn notified(&self, n: &tokio_postgres::Notification) {
        if n.channel() != SIGNALS {
            let _ = self.changes.try_send(());
            return;
        }
        match parse_cancel(n.payload()) {
            Some(key) => {
                let _ = self.cancels.send(key);
            }
            None => tracing::warn!(payload = n.payload(), "unreadable signal from another replica ignored"),
        }
    }
}

/// `cancel PID SECRET`, as [`Store::send_cancel`] sends it.
fn parse_cancel(payload: &str) -> Option<CancelKey> {
    let mut words = payload.split(' ');
    let (Some("cancel"), Some(pid), Some(secret), None) = (words.next(), words.next(), words.next(), words.next())
    else {
        return None;
    };
    Some(CancelKey {
        process_id: pid.parse().ok()?,
        secret_key: secret.parse().ok()?,
    })
}

/// How to open a connection to the store.
#[derive(Clone)]
struct Connector {
    config: tokio_postgres::Config,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
}

impl Connector {
    fn new(store: &StoreConfig) -> Result<Self, StoreError> {
        let mut config: tokio_postgres::Config = store.url.parse().map_err(db)?;
        if let Some(p) = &store.password {
            config.password(p.as_bytes());
        }
        config.application_name("jitgate");
        config.connect_timeout(Duration::from_secs(5));
        let tls = match &store.tls {
            UpstreamTls::Disable => None,
            UpstreamTls::Require | UpstreamTls::VerifyFull { .. } => {
                let UpstreamTls::VerifyFull { ca_file, .. } = &store.tls else {
                    return Err(err("store.tls.mode = \"require\" is not supported: use verify-full"));
                };
                let roots = crate::tls::load_roots(ca_file).map_err(db)?;
                let client = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
                    .with_safe_default_protocol_versions()
                    .map_err(db)?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                Some(tokio_postgres_rustls::MakeRustlsConnect::new(client))
            }
        };
        Ok(Self { config, tls })
    }

    /// A connected client; its connection runs on a task that hands notifications to
    /// `notify` (when given).
    async fn connect(&self, notify: Option<Listener>) -> Result<Client, StoreError> {
        fn drive<S, T>(mut conn: tokio_postgres::Connection<S, T>, notify: Option<Listener>)
        where
            S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
            T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        {
            tokio::spawn(async move {
                while let Some(m) = std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                    match m {
                        Ok(AsyncMessage::Notification(n)) => {
                            if let Some(l) = &notify {
                                l.notified(&n);
                            }
                        }
                        Ok(_) => {}
                        Err(error) => {
                            tracing::warn!(%error, "store connection ended");
                            return;
                        }
                    }
                }
            });
        }
        let timeout = OP_TIMEOUT;
        match &self.tls {
            None => {
                let (client, conn) = tokio::time::timeout(timeout, self.config.connect(tokio_postgres::NoTls))
                    .await
                    .map_err(|_| err("connecting to the store timed out"))?
                    .map_err(db)?;
                drive(conn, notify);
                Ok(client)
            }
            Some(tls) => {
                let (client, conn) = tokio::time::timeout(timeout, self.config.connect(tls.clone()))
                    .await
                    .map_err(|_| err("connecting to the store timed out"))?
                    .map_err(db)?;
                drive(conn, notify);
                Ok(client)
            }
        }
    }
}

/// PostgreSQL-backed [`Store`].
pub struct PgStore {
    connector: Connector,
    /// The connection writes and reads go through (reconnected when it breaks).
    conn: Mutex<Option<Client>>,
    changes: broadcast::Sender<Change>,
    /// The last `seq` the follower published.
    applied: Arc<AtomicI64>,
    /// Whether the last operation reached the store.
    reachable: Arc<AtomicBool>,
    /// Why the last operation did not.
    last_error: std::sync::Mutex<String>,
    /// `store.replica_id`.
    replica: String,
    /// Where agents reach this replica (`[agents] advertise`), written with its sessions.
    agents_addr: std::sync::OnceLock<String>,
    cancels: broadcast::Sender<CancelKey>,
    /// CancelRequests passed on in the current second: (its start, how many).
    cancel_budget: std::sync::Mutex<(std::time::Instant, u32)>,
    stop: CancellationToken,
}

impl PgStore {
    /// Connects, applies pending migrations, trims the change log and starts the follower
    /// (stopped by `stop`). Changes committed from now on are published.
    pub async fn connect(config: &StoreConfig, stop: CancellationToken) -> Result<Arc<Self>, StoreError> {
        let connector = Connector::new(config)?;
        let mut client = connector.connect(None).await?;
        migrate(&mut client).await?;
        client
            .execute(
                &format!("DELETE FROM changes WHERE at < now() - interval '{KEEP_CHANGES}'"),
                &[],
            )
            .await
            .map_err(db)?;
        let last: i64 = client
            .query_one("SELECT COALESCE(max(seq), 0) FROM changes", &[])
            .await
            .map_err(db)?
            .get(0);
        let (changes, _) = broadcast::channel(CHANGES);
        let (cancels, _) = broadcast::channel(256);
        let store = Arc::new(Self {
            connector,
            conn: Mutex::new(Some(client)),
            changes,
            applied: Arc::new(AtomicI64::new(last)),
            reachable: Arc::new(AtomicBool::new(true)),
            last_error: std::sync::Mutex::new(String::new()),
            replica: config.replica_id.clone(),
            agents_addr: std::sync::OnceLock::new(),
            cancels,
            cancel_budget: std::sync::Mutex::new((std::time::Instant::now(), 0)),
            stop,
        });
        tokio::spawn(Arc::clone(&store).follow());
        Ok(store)
    }

    /// Says where agents reach this replica (`[agents] advertise`), in this replica's row
    /// from the next [`Store::publish_sessions`] on. Set once, at start; later calls are
    /// ignored.
    pub fn advertise_agents(&self, addr: String) {
        let _ = self.agents_addr.set(addr);
    }

    /// Checks that the store answers (`jitgate config check`).
    pub async fn ping(config: &StoreConfig) -> Result<String, StoreError> {
        let client = Connector::new(config)?.connect(None).await?;
        let row = client.query_one("SELECT version()", &[]).await.map_err(db)?;
        Ok(row.get(0))
    }

    /// Whether the store answered the last time it was used.
    pub fn reachable(&self) -> bool {
        self.reachable.load(Ordering::Relaxed)
    }

    /// Records whether the store answered, and why not.
    fn answered(&self, result: Result<(), &StoreError>) {
        self.reachable.store(result.is_ok(), Ordering::Relaxed);
        if let Err(e) = result {
            if let Ok(mut last) = self.last_error.lock() {
                *last = e.to_string();
            }
        }
    }

    /// Runs `f` with the shared connection, reconnecting once if it had broken.
    async fn with<T>(
        &self,
        f: impl for<'c> FnOnce(
            &'c mut Client,
        )
            -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, StoreError>> + Send + 'c>>,
    ) -> Result<T, StoreError> {
        let Ok(mut guard) = tokio::time::timeout(OP_TIMEOUT, self.conn.lock()).await else {
            let e = err(format!("no answer within {}s", OP_TIMEOUT.as_secs()));
            self.answered(Err(&e));
            return Err(e);
        };
        if guard.as_ref().is_none_or(Client::is_closed) {
            match self.connector.connect(None).await {
                Ok(c) => *guard = Some(c),
                Err(e) => {
                    self.answered(Err(&e));
                    return Err(e);
                }
            }
        }
        let Some(client) = guard.as_mut() else {
            return Err(err("no store connection"));
        };
        let r = match tokio::time::timeout(OP_TIMEOUT, f(client)).await {
            Ok(r) => r,
            Err(_) => {
                // A connection that does not answer is dropped: the next call reconnects.
                *guard = None;
                let e = err(format!("no answer within {}s", OP_TIMEOUT.as_secs()));
                self.answered(Err(&e));
                return Err(e);
            }
        };
        let broken = guard.as_ref().is_none_or(Client::is_closed);
        if broken {
            *guard = None;
            let e = match &r {
                Err(e) => e.clone(),
                Ok(_) => err("the connection closed"),
            };
            self.answered(Err(&e));
        } else {
            self.answered(Ok(()));
        }
        r
    }

    /// Reads the log past what was published and publishes it; `Resync` on a gap.
    async fn catch_up(&self, client: &Client) -> Result<(), StoreError> {
        let after = self.applied.load(Ordering::Relaxed);
        let rows = client
            .query("SELECT seq, body FROM changes WHERE seq > $1 ORDER BY seq", &[&after])
            .await
            .map_err(db)?;
        let mut last = after;
        for row in rows {
            let seq: i64 = row.get(0);
            let body: String = row.get(1);
            if seq != last + 1 {
                tracing::warn!(
                    expected = last + 1,
                    found = seq,
                    "store change log has a gap: resyncing"
                );
                let _ = self.changes.send(Change::Resync);
            }
            match serde_json::from_str::<Logged>(&body) {
                Ok(logged) => {
                    let _ = self.changes.send(logged.change());
                }
                Err(error) => {
                    tracing::error!(seq, %error, "unreadable change in the store's log: resyncing");
                    let _ = self.changes.send(Change::Resync);
                }
            }
            last = seq;
        }
        self.applied.store(last, Ordering::Relaxed);
        Ok(())
    }

    /// Follows the log until `stop`: LISTEN on a connection of its own, read on every
    /// notification and every [`POLL`]; reconnect (and catch up) when the connection breaks.
    async fn follow(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(100);
        // After a lost connection the replica re-reads every live grant (`Resync`), not only
        // the log: the log may have been trimmed past what it applied meanwhile.
        let mut lost = false;
        loop {
            let (tx, mut rx) = tokio::sync::mpsc::channel(1);
            let listener = Listener {
                changes: tx,
                cancels: self.cancels.clone(),
            };
            let client = tokio::select! {
                c = self.connector.connect(Some(listener)) => c,
                () = self.stop.cancelled() => return,
            };
            let client = match client {
                Ok(c) => c,
                Err(error) => {
                    self.answered(Err(&error));
                    lost = true;
                    tracing::warn!(%error, "store follower cannot connect; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = self.stop.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            let listen = format!("LISTEN jitgate_changes; LISTEN {SIGNALS}");
            if let Err(error) = client.batch_execute(&listen).await {
                tracing::warn!(%error, "store follower cannot LISTEN; retrying");
                continue;
            }
            backoff = Duration::from_millis(100);
            loop {
                let caught_up = match tokio::time::timeout(OP_TIMEOUT, self.catch_up(&client)).await {
                    Ok(r) => r,
                    Err(_) => Err(err(format!("no answer within {}s", OP_TIMEOUT.as_secs()))),
                };
                if let Err(error) = caught_up {
                    self.answered(Err(&error));
                    lost = true;
                    tracing::warn!(%error, "store follower lost its connection; reconnecting");
                    break;
                }
                if std::mem::take(&mut lost) {
                    tracing::info!("store reachable again: re-reading live grants");
                    let _ = self.changes.send(Change::Resync);
                }
                self.answered(Ok(()));
                tokio::select! {
                    _ = rx.recv() => {}
                    () = tokio::time::sleep(POLL) => {}
                    () = self.stop.cancelled() => return,
                }
                if client.is_closed() {
                    break;
                }
            }
        }
    }
}

async fn migrate(client: &mut Client) -> Result<(), StoreError> {
    // The lock first: two `CREATE TABLE IF NOT EXISTS` at once can both miss the table and
    // one fails on the catalog's unique index.
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATE_LOCK])
        .await
        .map_err(db)?;
    let result = async {
        client
            .batch_execute("CREATE TABLE IF NOT EXISTS jitgate_schema (version INTEGER NOT NULL)")
            .await
            .map_err(db)?;
        let current: i32 = client
            .query_opt("SELECT version FROM jitgate_schema", &[])
            .await
            .map_err(db)?
            .map_or(0, |r| r.get(0));
        for (i, sql) in MIGRATIONS.iter().enumerate() {
            let version = i32::try_from(i + 1).map_err(db)?;
            if version <= current {
                continue;
            }
            let tx = client.transaction().await.map_err(db)?;
            tx.batch_execute(sql).await.map_err(db)?;
            tx.execute("DELETE FROM jitgate_schema", &[]).await.map_err(db)?;
            tx.execute("INSERT INTO jitgate_schema (version) VALUES ($1)", &[&version])
                .await
                .map_err(db)?;
            tx.commit().await.map_err(db)?;
            tracing::info!(version, "store schema migrated");
        }
        Ok(())
    }
    .await;
    let _ = client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATE_LOCK]).await;
    result
}

/// Appends `changes` to the log inside `tx` and notifies the followers at commit.
async fn log(tx: &tokio_postgres::Transaction<'_>, changes: &[Change]) -> Result<(), StoreError> {
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&CHANGE_LOCK])
        .await
        .map_err(db)?;
    for c in changes {
        let Some(logged) = Logged::of(c) else { continue };
        let body = serde_json::to_string(&logged).map_err(db)?;
        tx.execute(
            "INSERT INTO changes (seq, body) SELECT COALESCE(max(seq), 0) + 1, $1 FROM changes",
            &[&body],
        )
        .await
        .map_err(db)?;
    }
    tx.execute("SELECT pg_notify('jitgate_changes', '')", &[])
        .await
        .map_err(db)?;
    Ok(())
}

async fn insert_grant(c: &impl tokio_postgres::GenericClient, g: &Grant) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO grants (id, \"user\", target, access, reason, created_by, created_at, expires_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        &[
            &g.id.as_str(),
            &g.user.as_str(),
            &g.target.as_str(),
            &g.access.as_str(),
            &g.reason,
            &g.created_by.as_str(),
            &to_millis(g.created_at),
            &to_millis(g.expires_at),
        ],
    )
    .await
    .map_err(db)?;
    Ok(())
}

async fn why_unchanged(c: &impl tokio_postgres::GenericClient, id: &GrantId) -> StoreError {
    match c.query_opt("SELECT 1 FROM grants WHERE id = $1", &[&id.as_str()]).await {
        Ok(Some(_)) => StoreError::Conflict,
        Ok(None) => StoreError::NotFound,
        Err(e) => err(e),
    }
}

async fn extend_grant(
    c: &impl tokio_postgres::GenericClient,
    id: &GrantId,
    from: SystemTime,
    to: SystemTime,
) -> Result<(), StoreError> {
    let n = c
        .execute(
            "UPDATE grants SET expires_at = $3 WHERE id = $1 AND ended_at IS NULL AND expires_at = $2",
            &[&id.as_str(), &to_millis(from), &to_millis(to)],
        )
        .await
        .map_err(db)?;
    if n == 1 {
        Ok(())
    } else {
        Err(why_unchanged(c, id).await)
    }
}

fn decode_request(body: &str) -> Result<Request, StoreError> {
    serde_json::from_str(body).map_err(|e| err(format!("stored request: {e}")))
}

fn decode_targets(json: &str) -> Result<Vec<TargetName>, StoreError> {
    serde_json::from_str(json).map_err(|e| err(format!("stored agent targets: {e}")))
}

fn version_of(v: i64) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(db)
}

/// Constant-time equality of two byte strings (false when the lengths differ).
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[async_trait]
impl Store for PgStore {
    async fn insert_grant(&self, grant: &Grant) -> Result<(), StoreError> {
        let g = grant.clone();
        self.with(move |c| {
            Box::pin(async move {
                let tx = c.transaction().await.map_err(db)?;
                insert_grant(&tx, &g).await?;
                log(&tx, &[Change::GrantCreated(g.clone())]).await?;
                tx.commit().await.map_err(db)
            })
        })
        .await
    }

    async fn end_grant(&self, id: &GrantId, end: GrantEnd, at: SystemTime) -> Result<(), StoreError> {
        let id = id.clone();
        self.with(move |c| {
            Box::pin(async move {
                let tx = c.transaction().await.map_err(db)?;
                let n = tx
                    .execute(
                        "UPDATE grants SET ended_at = $2, end_reason = $3 WHERE id = $1 AND ended_at IS NULL",
                        &[&id.as_str(), &to_millis(at), &end.as_str()],
                    )
                    .await
                    .map_err(db)?;
                if n != 1 {
                    return Err(why_unchanged(&tx, &id).await);
                }
                log(&tx, &[Change::GrantEnded { id: id.clone(), end }]).await?;
                tx.commit().await.map_err(db)
            })
        })
        .await
    }

    async fn extend_grant(&self, id: &GrantId, from: SystemTime, to: SystemTime) -> Result<(), StoreError> {
        let id = id.clone();
        self.with(move |c| {
            Box::pin(async move {
                let tx = c.transaction().await.map_err(db)?;
                extend_grant(&tx, &id, from, to).await?;
                log(
                    &tx,
                    &[Change::GrantExtended {
                        id: id.clone(),
                        expires_at: to,
                    }],
                )
                .await?;
                tx.commit().await.map_err(db)
            })
        })
        .await
    }

    async fn live_grants(&self) -> Result<Vec<Grant>, StoreError> {
        self.with(|c| {
            Box::pin(async move {
                let rows = c
                    .query(
                        "SELECT id, \"user\", target, access, reason, created_by, created_at, expires_at
                         FROM grants WHERE ended_at IS NULL ORDER BY created_at",
                        &[],
                    )
                    .await
                    .map_err(db)?;
                rows.iter()
                    .map(|r| {
                        Ok(Grant {
                            id: GrantId::from_string(r.get::<_, String>(0)),
                            user: UserName::new(r.get::<_, String>(1)).map_err(db)?,
                            target: TargetName::new(r.get::<_, String>(2)).map_err(db)?,
                            access: r.get::<_, String>(3).parse().map_err(err)?,
                            reason: r.get(4),
                            created_by: UserName::new(r.get::<_, String>(5)).map_err(db)?,
                            created_at: from_millis(r.get(6)),
                            expires_at: from_millis(r.get(7)),
                        })
                    })
                    .collect()
            })
        })
        .await
    }

    async fn insert_request(&self, request: &Request) -> Result<(), StoreError> {
        let r = request.clone();
        let body = serde_json::to_string(request).map_err(db)?;
        self.with(move |c| {
            Box::pin(async move {
                let tx = c.transaction().await.map_err(db)?;
                tx.execute(
                    "INSERT INTO requests (id, \"user\", state, break_glass, created_at, lapses_at, body, version)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, 1)",
                    &[
                        &r.id.as_str(),
                        &r.user.as_str(),
                        &r.state.as_str(),
                        &r.break_glass,
                        &to_millis(r.created_at),
                        &to_millis(r.lapses_at),
                        &body,
                    ],
                )
                .await
                .map_err(db)?;
                log(
                    &tx,
                    &[Change::RequestChanged {
                        id: r.id.clone(),
                        version: 1,
                    }],
                )
                .await?;
                tx.commit().await.map_err(db)
            })
        })
        .await
    }

    async fn update_request(
        &self,
        request: &Request,
        version: u64,
        grant: Option<GrantWrite<'_>>,
    ) -> Result<u64, StoreError> {
        let r = request.clone();
        let body = serde_json::to_string(request).map_err(db)?;
        let write = grant.map(|g| match g {
            GrantWrite::Insert(g) => (Some(g.clone()), None),
            GrantWrite::Extend { id, from, to } => (None, Some((id.clone(), from, to))),
        });
        let next = version + 1;
        self.with(move |c| {
            Box::pin(async move {
                let tx = c.transaction().await.map_err(db)?;
                let v = i64::try_from(version).map_err(db)?;
                let n = tx
                    .execute(
                        "UPDATE requests SET state = $2, lapses_at = $3, body = $4, version = version + 1
                         WHERE id = $1 AND version = $5",
                        &[&r.id.as_str(), &r.state.as_str(), &to_millis(r.lapses_at), &body, &v],
                    )
                    .await
                    .map_err(db)?;
                if n != 1 {
                    let exists = tx
                        .query_opt("SELECT 1 FROM requests WHERE id = $1", &[&r.id.as_str()])
                        .await
                        .map_err(db)?;
                    return Err(if exists.is_some() {
                        StoreError::Conflict
                    } else {
                        StoreError::NotFound
                    });
                }
                let mut changes = vec![Change::RequestChanged {
                    id: r.id.clone(),
                    version: next,
                }];
                match write {
                    Some((Some(g), _)) => {
                        insert_grant(&tx, &g).await?;
                        changes.push(Change::GrantCreated(g));
                    }
                    Some((None, Some((id, from, to)))) => {
                        extend_grant(&tx, &id, from, to).await?;
                        changes.push(Change::GrantExtended { id, expires_at: to });
                    }
                    _ => {}
                }
                log(&tx, &changes).await?;
                tx.commit().await.map_err(db)
            })
        })
        .await?;
        Ok(next)
    }

    async fn request(&self, id: &RequestId) -> Result<Option<Versioned<Request>>, StoreError> {
        let id = id.clone();
        self.with(move |c| {
            Box::pin(async move {
                let row = c
                    .query_opt("SELECT body, version FROM requests WHERE id = $1", &[&id.as_str()])
                    .await
                    .map_err(db)?;
                row.map(|r| {
                    Ok(Versioned {
                        value: decode_request(r.get(0))?,
                        version: version_of(r.get(1))?,
                    })
                })
                .transpose()
            })
        })
        .await
    }

    async fn requests(&self, query: &RequestQuery) -> Result<Vec<Request>, StoreError> {
        let q = query.clone();
        self.with(move |c| {
            Box::pin(async move {
                let limit = if q.limit == 0 {
                    i64::MAX
                } else {
                    i64::try_from(q.limit).unwrap_or(i64::MAX)
                };
                let user = q.user.as_ref().map(UserName::as_str);
                let state = q.state.map(|s| s.as_str());
                let rows = c
                    .query(
                        "SELECT body FROM requests
                         WHERE ($1::TEXT IS NULL OR \"user\" = $1) AND ($2::TEXT IS NULL OR state = $2)
                           AND (NOT $3 OR break_glass)
                         ORDER BY created_at DESC, id LIMIT $4",
                        &[&user, &state, &q.break_glass, &limit],
                    )
                    .await
                    .map_err(db)?;
                rows.iter().map(|r| decode_request(r.get(0))).collect()
            })
        })
        .await
    }

    async fn pending_due(&self, now: SystemTime) -> Result<Vec<Versioned<Request>>, StoreError> {
        self.with(move |c| {
            Box::pin(async move {
                let rows = c
                    .query(
                        "SELECT body, version FROM requests WHERE state = 'pending' AND lapses_at <= $1
                         ORDER BY lapses_at",
                        &[&to_millis(now)],
                    )
                    .await
                    .map_err(db)?;
                rows.iter()
                    .map(|r| {
                        Ok(Versioned {
                            value: decode_request(r.get(0))?,
                            version: version_of(r.get(1))?,
                        })
                    })
                    .collect()
            })
        })
        .await
    }

    async fn insert_agent_token(&self, token: &AgentToken) -> Result<(), StoreError> {
        let t = token.clone();
        let targets = serde_json::to_string(&t.targets).map_err(db)?;
        self.with(move |c| {
            Box::pin(async move {
                c.execute(
                    "INSERT INTO agent_tokens (id, agent, targets, secret_sha256, created_by, created_at, expires_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    &[
                        &t.id,
                        &t.agent.as_str(),
                        &targets,
                        &t.secret_sha256,
                        &t.created_by.as_str(),
                        &to_millis(t.created_at),
                        &to_millis(t.expires_at),
                    ],
                )
                .await
                .map_err(db)?;
                Ok(())
            })
        })
        .await
    }

    async fn redeem_agent_token(
        &self,
        id: &str,
        secret_sha256: &str,
        now: SystemTime,
    ) -> Result<Result<AgentRecord, TokenRefusal>, StoreError> {
        let (id, secret) = (id.to_owned(), secret_sha256.to_owned());
        self.with(move |c| {
            Box::pin(async move {
                let tx = c.transaction().await.map_err(db)?;
                let row = tx
                    .query_opt(
                        "SELECT agent, targets, secret_sha256, expires_at, used_at FROM agent_tokens WHERE id = $1",
                        &[&id],
                    )
                    .await
                    .map_err(db)?;
                let Some(row) = row else {
                    return Ok(Err(TokenRefusal::Unknown));
                };
                let (agent, targets, stored, expires_at, used_at): (String, String, String, i64, Option<i64>) =
                    (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
                if !ct_eq(stored.as_bytes(), secret.as_bytes()) {
                    return Ok(Err(TokenRefusal::Unknown));
                }
                if used_at.is_some() {
                    return Ok(Err(TokenRefusal::Used));
                }
                if from_millis(expires_at) <= now {
                    return Ok(Err(TokenRefusal::Expired));
                }
                let n = tx
                    .execute(
                        "UPDATE agent_tokens SET used_at = $2 WHERE id = $1 AND used_at IS NULL",
                        &[&id, &to_millis(now)],
                    )
                    .await
                    .map_err(db)?;
                if n != 1 {
                    return Ok(Err(TokenRefusal::Used));
                }
                tx.execute(
                    "INSERT INTO agents (name, targets, joined_at, token) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (name) DO UPDATE SET targets = excluded.targets, joined_at = excluded.joined_at,
                         token = excluded.token",
                    &[&agent, &targets, &to_millis(now), &id],
                )
                .await
                .map_err(db)?;
                tx.commit().await.map_err(db)?;
                Ok(Ok(AgentRecord {
                    name: AgentName::new(agent).map_err(db)?,
                    targets: decode_targets(&targets)?,
                    joined_at: now,
                    token: id,
                }))
            })
        })
        .await
    }

    async fn insert_invite(&self, invite: &Invite) -> Result<(), StoreError> {
        let i = invite.clone();
        let roles = serde_json::to_string(&i.roles).map_err(db)?;
        self.with(move |c| {
            Box::pin(async move {
                c.execute(
                    "INSERT INTO invites (id, \"user\", roles, secret_sha256, created_by, created_at, expires_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    &[
                        &i.id,
                        &i.user.as_str(),
                        &roles,
                        &i.secret_sha256,
                        &i.created_by.as_str(),
                        &to_millis(i.created_at),
                        &to_millis(i.expires_at),
                    ],
                )
                .await
                .map_err(db)?;
                Ok(())
            })
        })
        .await
    }

    async fn upsert_slack_link(&self, link: &SlackLink) -> Result<(), StoreError> {
        let l = link.clone();
        let roles = serde_json::to_string(&l.roles).map_err(db)?;
        self.with(move |c| {
            Box::pin(async move {
                c.execute(
                    "INSERT INTO slack_links (team, slack_user, \"user\", roles, linked_at, expires_at)
                     VALUES ($1, $2, $3, $4, $5, $6)
                     ON CONFLICT (team, slack_user) DO UPDATE SET
                       \"user\" = EXCLUDED.\"user\", roles = EXCLUDED.roles,
                       linked_at = EXCLUDED.linked_at, expires_at = EXCLUDED.expires_at",
                    &[
                        &l.team,
                        &l.slack_user,
                        &l.user.as_str(),
                        &roles,
                        &to_millis(l.linked_at),
                        &to_millis(l.expires_at),
                    ],
                )
                .await
                .map_err(db)?;
                Ok(())
            })
        })
        .await
    }

    async fn slack_link(&self, team: &str, slack_user: &str) -> Result<Option<SlackLink>, StoreError> {
        let (team, slack_user) = (team.to_owned(), slack_user.to_owned());
        self.with(move |c| {
            Box::pin(async move {
                let row = c
                    .query_opt(
                        "SELECT \"user\", roles, linked_at, expires_at FROM slack_links
                         WHERE team = $1 AND slack_user = $2",
                        &[&team, &slack_user],
                    )
                    .await
                    .map_err(db)?;
                let Some(row) = row else {
                    return Ok(None);
                };
                let user: String = row.get(0);
                let roles: String = row.get(1);
                Ok(Some(SlackLink {
                    slack_user,
                    team,
                    user: UserName::new(user).map_err(db)?,
                    roles: serde_json::from_str(&roles).map_err(db)?,
                    linked_at: from_millis(row.get(2)),
                    expires_at: from_millis(row.get(3)),
                }))
            })
        })
        .await
    }

    async fn redeem_invite(
        &self,
        id: &str,
        secret_sha256: &str,
        now: SystemTime,
    ) -> Result<Result<Invite, TokenRefusal>, StoreError> {
        let (id, secret) = (id.to_owned(), secret_sha256.to_owned());
        self.with(move |c| {
            Box::pin(async move {
                // The compare-and-set is the UPDATE: of two redemptions at once, one updates the row.
                let row = c
                    .query_opt(
                        "SELECT \"user\", roles, secret_sha256, created_by, created_at, expires_at, used_at
                         FROM invites WHERE id = $1",
                        &[&id],
                    )
                    .await
                    .map_err(db)?;
                let Some(row) = row else {
                    return Ok(Err(TokenRefusal::Unknown));
                };
                let (user, roles, stored, created_by, created_at, expires_at, used_at): (
                    String,
                    String,
                    String,
                    String,
                    i64,
                    i64,
                    Option<i64>,
                ) = (
                    row.get(0),
                    row.get(1),
                    row.get(2),
                    row.get(3),
                    row.get(4),
                    row.get(5),
                    row.get(6),
                );
                if !ct_eq(stored.as_bytes(), secret.as_bytes()) {
                    return Ok(Err(TokenRefusal::Unknown));
                }
                if used_at.is_some() {
                    return Ok(Err(TokenRefusal::Used));
                }
                if from_millis(expires_at) <= now {
                    return Ok(Err(TokenRefusal::Expired));
                }
                let n = c
                    .execute(
                        "UPDATE invites SET used_at = $2 WHERE id = $1 AND used_at IS NULL",
                        &[&id, &to_millis(now)],
                    )
                    .await
                    .map_err(db)?;
                if n != 1 {
                    return Ok(Err(TokenRefusal::Used));
                }
                Ok(Ok(Invite {
                    id,
                    user: UserName::new(user).map_err(db)?,
                    roles: serde_json::from_str(&roles).map_err(db)?,
                    secret_sha256: stored,
                    created_by: UserName::new(created_by).map_err(db)?,
                    created_at: from_millis(created_at),
                    expires_at: from_millis(expires_at),
                }))
            })
        })
        .await
    }

    async fn agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        self.with(|c| {
            Box::pin(async move {
                let rows = c
                    .query("SELECT name, targets, joined_at, token FROM agents ORDER BY name", &[])
                    .await
                    .map_err(db)?;
                rows.iter()
                    .map(|r| {
                        Ok(AgentRecord {
                            name: AgentName::new(r.get::<_, String>(0)).map_err(db)?,
                            targets: decode_targets(r.get(1))?,
                            joined_at: from_millis(r.get(2)),
                            token: r.get(3),
                        })
                    })
                    .collect()
            })
        })
        .await
    }

    async fn remove_agent(&self, name: &AgentName) -> Result<(), StoreError> {
        let name = name.clone();
        self.with(move |c| {
            Box::pin(async move {
                let tx = c.transaction().await.map_err(db)?;
                let n = tx
                    .execute("DELETE FROM agents WHERE name = $1", &[&name.as_str()])
                    .await
                    .map_err(db)?;
                if n == 0 {
                    return Err(StoreError::NotFound);
                }
                log(&tx, &[Change::AgentRemoved { name: name.clone() }]).await?;
                tx.commit().await.map_err(db)
            })
        })
        .await
    }

    fn changes(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    fn replica(&self) -> Option<&str> {
        Some(&self.replica)
    }

    fn degraded(&self) -> Option<String> {
        if self.reachable() {
            return None;
        }
        let why = self.last_error.lock().map(|e| e.clone()).unwrap_or_default();
        Some(if why.is_empty() {
            "the store is unreachable".to_owned()
        } else {
            why
        })
    }

    async fn publish_sessions(&self, sessions: &[SessionInfo]) -> Result<(), StoreError> {
        let body = serde_json::to_string(sessions).map_err(db)?;
        let replica = self.replica.clone();
        let agents_addr = self.agents_addr.get().cloned();
        let now = to_millis(SystemTime::now());
        self.with(move |c| {
            Box::pin(async move {
                c.execute(
                    "INSERT INTO replicas (id, seen_at, sessions, agents_addr) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (id) DO UPDATE SET seen_at = EXCLUDED.seen_at, sessions = EXCLUDED.sessions,
                         agents_addr = EXCLUDED.agents_addr",
                    &[&replica, &now, &body, &agents_addr],
                )
                .await
                .map_err(db)?;
                Ok(())
            })
        })
        .await
    }

    async fn peer_sessions(&self) -> Result<Vec<(String, Vec<SessionInfo>)>, StoreError> {
        let replica = self.replica.clone();
        let since = to_millis(SystemTime::now() - super::PEER_SEEN);
        let rows = self
            .with(move |c| {
                Box::pin(async move {
                    c.query(
                        "SELECT id, sessions FROM replicas WHERE id <> $1 AND seen_at >= $2 ORDER BY id",
                        &[&replica, &since],
                    )
                    .await
                    .map_err(db)
                })
            })
            .await?;
        let mut peers = Vec::with_capacity(rows.len());
        for row in rows {
            let id: String = row.get(0);
            let body: String = row.get(1);
            match serde_json::from_str::<Vec<SessionInfo>>(&body) {
                Ok(sessions) => peers.push((id, sessions)),
                Err(error) => tracing::warn!(replica = %id, %error, "unreadable session list of a replica skipped"),
            }
        }
        Ok(peers)
    }

    async fn kill_session(&self, id: &SessionId) -> Result<(), StoreError> {
        let id = id.clone();
        self.with(move |c| {
            Box::pin(async move {
                let tx = c.transaction().await.map_err(db)?;
                log(&tx, &[Change::SessionKilled { id: id.clone() }]).await?;
                tx.commit().await.map_err(db)
            })
        })
        .await
    }

    async fn send_cancel(&self, key: CancelKey) -> Result<(), StoreError> {
        {
            let Ok(mut budget) = self.cancel_budget.lock() else {
                return Ok(());
            };
            let now = std::time::Instant::now();
            if now.duration_since(budget.0) >= Duration::from_secs(1) {
                *budget = (now, 0);
            }
            if budget.1 >= CANCELS_PER_SECOND {
                tracing::warn!("too many cancel requests to pass to other replicas; dropped");
                return Ok(());
            }
            budget.1 += 1;
        }
        let payload = format!("cancel {} {}", key.process_id, key.secret_key);
        self.with(move |c| {
            Box::pin(async move {
                c.execute("SELECT pg_notify($1, $2)", &[&SIGNALS, &payload])
                    .await
                    .map_err(db)?;
                Ok(())
            })
        })
        .await
    }

    fn cancels(&self) -> Option<broadcast::Receiver<CancelKey>> {
        Some(self.cancels.subscribe())
    }

    async fn agent_addresses(&self) -> Result<Vec<String>, StoreError> {
        let since = to_millis(SystemTime::now() - super::PEER_SEEN);
        self.with(move |c| {
            Box::pin(async move {
                let rows = c
                    .query(
                        "SELECT DISTINCT agents_addr FROM replicas
                         WHERE seen_at >= $1 AND agents_addr IS NOT NULL ORDER BY agents_addr",
                        &[&since],
                    )
                    .await
                    .map_err(db)?;
                Ok(rows.iter().map(|r| r.get(0)).collect())
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests;
