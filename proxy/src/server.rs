//! Server assembly: binds listeners, restores grants, runs every listener until shutdown, and
//! waits a bounded grace period for sessions to end. SIGHUP reopens the audit log.
//!
//! The accept loops never wait for a slot: every accepted connection is admitted to its
//! listener's unauthenticated budget ([`Unauthenticated`]), which evicts an older
//! connection when full, so no number of idle or slow connections stops a listener from
//! accepting.

use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt as _;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::access::{Admission, CutWave, Dialer};
use crate::agents::{AgentsContext, Hub, RoutingDialer};
use crate::api::{self, ApiState};
use crate::audit::{AuditLog, ReopenReason};
use crate::budget::{Authenticated, Ticket, Unauthenticated, UserSessions};
use crate::clock;
use crate::config::{Config, Listen};
use crate::grants::{Grants, GrantsDeps};
use crate::lanes::Lanes;
use crate::metrics::{self, Metrics};
use crate::notify::Notifier;
use crate::pg::{self, PgContext};
use crate::requests::Requests;
use crate::sessions::Sessions;
use crate::store::{SqliteStore, Store};
use crate::tls::ServerTls;

/// Start-up failures.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot bind {name} listener on {addr}: {source}")]
    Bind {
        name: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Grants(#[from] crate::grants::GrantError),
    #[error("upstream TLS settings: {0}")]
    Upstream(#[from] crate::pg::upstream::UpstreamError),
    #[error("cannot start the session threads: {0}")]
    Lanes(std::io::Error),
    #[error("SSH listener: {0}")]
    Ssh(String),
    #[error("{0}")]
    Credentials(String),
    #[error("logins: {0}")]
    Login(String),
}

/// Checks the manager role of every ephemeral target reached directly: one that answers but
/// cannot log in, lacks CREATEROLE or misses a role the config names stops start-up; one that
/// does not answer is logged, and the reconciler retries it. (Targets behind an agent are
/// checked by the reconciler once the agent links.)
async fn check_managers(config: &Config, connector: &crate::pg::upstream::Connector) -> Result<(), ServerError> {
    let mut targets: Vec<_> = config
        .targets
        .values()
        .filter(|t| matches!(t.mode, crate::config::CredentialsMode::Ephemeral(_)) && t.via.is_none())
        .collect();
    targets.sort_by(|a, b| a.name.cmp(&b.name));
    for target in targets {
        match crate::credentials::check(connector, target).await {
            Ok(()) => {}
            Err(e) if e.unreachable() => {
                tracing::warn!(target = %target.name, error = %e, "cannot check the manager role now; retrying in the background");
            }
            Err(e) => {
                return Err(ServerError::Credentials(format!(
                    "targets.{}.manager: {e}",
                    target.name
                )))
            }
        }
    }
    Ok(())
}

/// The bound listening sockets.
pub struct Listeners {
    pub postgres: TcpListener,
    pub api: TcpListener,
    pub metrics: TcpListener,
    /// `listen.agents`, when set.
    pub agents: Option<TcpListener>,
    /// `listen.ssh`, when set.
    pub ssh: Option<TcpListener>,
}

/// Addresses the listeners actually bound (port 0 resolved).
#[derive(Debug, Clone, Copy)]
pub struct BoundAddrs {
    pub postgres: SocketAddr,
    pub api: SocketAddr,
    pub metrics: SocketAddr,
    pub agents: Option<SocketAddr>,
    pub ssh: Option<SocketAddr>,
}

impl Listeners {
    /// Binds every configured address.
    pub async fn bind(listen: &Listen) -> Result<Self, ServerError> {
        async fn one(name: &'static str, addr: SocketAddr) -> Result<TcpListener, ServerError> {
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServerError::Bind { name, addr, source })
        }
        Ok(Self {
            postgres: one("postgres", listen.postgres).await?,
            api: one("api", listen.api).await?,
            metrics: one("metrics", listen.metrics).await?,
            agents: match listen.agents {
                Some(addr) => Some(one("agents", addr).await?),
                None => None,
            },
            ssh: match listen.ssh {
                Some(addr) => Some(one("ssh", addr).await?),
                None => None,
            },
        })
    }

    /// The bound addresses.
    pub fn addrs(&self) -> BoundAddrs {
        let addr = |l: &TcpListener| l.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        BoundAddrs {
            postgres: addr(&self.postgres),
            api: addr(&self.api),
            metrics: addr(&self.metrics),
            agents: self.agents.as_ref().map(addr),
            ssh: self.ssh.as_ref().map(addr),
        }
    }
}

/// Runs the proxy until `shutdown` resolves, then stops accepting, cuts sessions and waits up
/// to `limits.shutdown_grace` for them to finish.
pub async fn run(config: Config, listeners: Listeners, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
    let metrics = Metrics::new();
    let tls = ServerTls::load(&config.tls)?;
    let audit = AuditLog::open(&config.audit, Arc::clone(&metrics))?;
    let cancel = CancellationToken::new();
    let store: Arc<dyn Store> = match &config.store {
        Some(shared) => {
            let pg = crate::store::PgStore::connect(shared, cancel.clone()).await?;
            if let Some(addr) = advertised_agents(&config, listeners.addrs().agents) {
                pg.advertise_agents(addr);
            }
            pg
        }
        None => {
            let path = config.store_path.clone();
            let sqlite = tokio::task::spawn_blocking(move || SqliteStore::open(&path))
                .await
                .map_err(|e| crate::store::StoreError::Unavailable(e.to_string()))??;
            Arc::new(sqlite)
        }
    };
    let clock = clock::system();
    let tracker = TaskTracker::new();
    let slack = match &config.slack {
        Some(sc) => Some(
            crate::slack::Slack::start(
                Arc::clone(sc),
                Arc::clone(&config.policies),
                Arc::clone(&store),
                Arc::clone(&audit),
                &tracker,
                cancel.clone(),
            )
            .map_err(ServerError::Login)?,
        ),
        None => None,
    };
    let notifier = Notifier::start_with_slack(&config.webhooks, slack.clone(), &metrics, &tracker, cancel.clone());
    let grants = Grants::start(GrantsDeps {
        store: Arc::clone(&store),
        audit: Arc::clone(&audit),
        metrics: Arc::clone(&metrics),
        notifier: Arc::clone(&notifier),
        clock: Arc::clone(&clock),
        shutdown: cancel.clone(),
        tracker: tracker.clone(),
    })
    .await
    // Stops the webhook workers already started.
    .inspect_err(|_| cancel.cancel())?;
    let requests = Requests::new(
        config.clone(),
        Arc::clone(&store),
        Arc::clone(&grants),
        Arc::clone(&audit),
        notifier,
        clock,
    );
    tracker.spawn(Arc::clone(&requests).run_lapser(cancel.clone()));
    let sessions = Arc::new(Sessions::new(store.replica().map(str::to_owned)));

    let hub = Hub::new(Arc::clone(&metrics));
    let dialer: Arc<dyn Dialer> = Arc::new(RoutingDialer { hub: Arc::clone(&hub) });
    let connector =
        crate::pg::upstream::Connector::new(&config.targets, Arc::clone(&dialer)).inspect_err(|_| cancel.cancel())?;
    let credentials = crate::credentials::Credentials::new(crate::credentials::CredentialsDeps {
        connector: connector.clone(),
        targets: Arc::clone(&config.targets),
        table: Arc::clone(grants.table()),
        store: Arc::clone(&store),
        audit: Arc::clone(&audit),
        metrics: Arc::clone(&metrics),
        ca_cert: std::fs::read(&config.tls.ca_cert).unwrap_or_default(),
    });
    check_managers(&config, &connector)
        .await
        .inspect_err(|_| cancel.cancel())?;
    tracker.spawn(Arc::clone(&credentials).run(cancel.clone()));
    let admission = Arc::new(Admission {
        targets: Arc::clone(&config.targets),
        grants: Arc::clone(grants.table()),
        sessions: Arc::clone(&sessions),
        users: UserSessions::new(config.limits.max_sessions_per_user),
        shutdown: cancel.clone(),
        clock: Arc::clone(grants.table().clock()),
        dialer,
        wave: CutWave::new(),
    });
    let ssh = match listeners.ssh.is_some() {
        true => Some(ssh_context(&config, &admission, &audit, &metrics).inspect_err(|_| cancel.cancel())?),
        false => None,
    };
    let pg = Arc::new(PgContext {
        config: config.clone(),
        tls: Arc::clone(&tls.postgres),
        admission,
        connector,
        credentials,
        sessions: Arc::clone(&sessions),
        audit: Arc::clone(&audit),
        metrics: Arc::clone(&metrics),
        shutdown: cancel.clone(),
        connections: Authenticated::new(config.limits.max_connections),
        cluster: store.replica().is_some().then(|| Arc::clone(&store)),
    });
    crate::cluster::start(&store, &pg, &hub, &metrics, &tracker, &cancel);
    // The bound port, not the configured one: `listen = "...:0"` picks a free port.
    let postgres_port = listeners.addrs().postgres.port();
    let logins = crate::login::Logins::new(config.clone(), Arc::clone(&store), Arc::clone(&audit), postgres_port)
        .map_err(|e| ServerError::Login(e.to_string()))?;
    let api_state = Arc::new(ApiState {
        consoles: crate::console::Consoles::default(),
        slack,
        logins: Arc::new(logins),
        store: Arc::clone(&store),
        hub: Arc::clone(&hub),
        config: config.clone(),
        grants: Arc::clone(&grants),
        requests,
        sessions: Arc::clone(&sessions),
        audit: Arc::clone(&audit),
        metrics: Arc::clone(&metrics),
        connections: Authenticated::new(config.limits.max_connections),
    });
    tracker.spawn(reopen_on_sighup(Arc::clone(&audit), cancel.clone()));
    let addrs = listeners.addrs();
    let unauthenticated = config.limits.max_unauthenticated;

    // Sessions run on lanes of their own (one event loop per thread); see `lanes`.
    let lanes = Arc::new(Lanes::start(config.sessions.threads).map_err(ServerError::Lanes)?);
    tracing::debug!(threads = lanes.len(), "session lanes started");
    let (pg_tracker, pg_lanes) = (tracker.clone(), Arc::clone(&lanes));
    tracker.spawn(accept_loop(
        "postgres",
        listeners.postgres,
        Unauthenticated::new("postgres", unauthenticated, &metrics),
        cancel.clone(),
        move |tcp, peer, ticket, span| {
            let pg = Arc::clone(&pg);
            let tracker = pg_tracker.clone();
            let moved = pg_lanes.spawn(tcp, move |tcp| {
                tracker.track_future(pg::serve_connection(pg, tcp, peer, ticket).instrument(span))
            });
            if let Err(error) = moved {
                tracing::warn!(%error, client.addr = %peer, "connection dropped: cannot hand it to a session thread");
            }
        },
    ));
    let api_tls = Arc::clone(&tls.api);
    let api_cancel = cancel.clone();
    let api_tracker = tracker.clone();
    tracker.spawn(accept_loop(
        "api",
        listeners.api,
        Unauthenticated::new("api", unauthenticated, &metrics),
        cancel.clone(),
        move |tcp, peer, ticket, span| {
            let serve = api::serve_connection(
                Arc::clone(&api_state),
                Arc::clone(&api_tls),
                tcp,
                peer,
                ticket,
                api_cancel.clone(),
            );
            api_tracker.spawn(serve.instrument(span));
        },
    ));
    if let Some(listener) = listeners.agents {
        // Joins need the CA key; without it links still work, joins and renewals are refused.
        let authority = match crate::pki::Authority::load(&config.data_dir) {
            Ok(ca) => Some(Arc::new(ca)),
            Err(error) => {
                tracing::warn!(%error, "agent joins and renewals are refused: no CA key to sign with");
                None
            }
        };
        let agents = Arc::new(AgentsContext {
            config: config.clone(),
            tls: Arc::clone(&tls.agents),
            hub,
            store,
            audit: Arc::clone(&audit),
            metrics: Arc::clone(&metrics),
            authority,
            shutdown: cancel.clone(),
        });
        // A link runs on a session lane too: with one lane, its sessions and their streams
        // share one thread and a round trip through the agent wakes no other.
        let (agents_tracker, agents_lanes) = (tracker.clone(), Arc::clone(&lanes));
        tracker.spawn(accept_loop(
            "agents",
            listener,
            Unauthenticated::new("agents", unauthenticated, &metrics),
            cancel.clone(),
            move |tcp, peer, ticket, span| {
                let agents = Arc::clone(&agents);
                let tracker = agents_tracker.clone();
                let moved = agents_lanes.spawn(tcp, move |tcp| {
                    tracker.track_future(crate::agents::serve_connection(agents, tcp, peer, ticket).instrument(span))
                });
                if let Err(error) = moved {
                    tracing::warn!(%error, client.addr = %peer, "agent connection dropped: cannot hand it to a session thread");
                }
            },
        ));
    }
    if let (Some(listener), Some(ssh)) = (listeners.ssh, ssh) {
        let ssh_tracker = tracker.clone();
        tracker.spawn(accept_loop(
            "ssh",
            listener,
            Unauthenticated::new("ssh", unauthenticated, &metrics),
            cancel.clone(),
            move |tcp, peer, ticket, span| {
                let serve = crate::ssh::serve_connection(Arc::clone(&ssh), tcp, peer, ticket);
                ssh_tracker.spawn(serve.instrument(span));
            },
        ));
    }
    tracker.spawn(metrics::serve(listeners.metrics, Arc::clone(&metrics), cancel.clone()));
    metrics.set_ready(true);
    tracing::info!(postgres = %addrs.postgres, api = %addrs.api, metrics = %addrs.metrics, agents = ?addrs.agents, "jitgate serving");

    shutdown.await;
    tracing::info!("shutting down");
    metrics.set_ready(false);
    cancel.cancel();
    tracker.close();
    if tokio::time::timeout(config.limits.shutdown_grace, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("sessions still open after the shutdown grace period");
    }
    // Tasks that outlive the grace period may still hold the log: close it here so its
    // queue is written and synced before `run` returns (a restart reopens the same file).
    // Stops the session threads (what still runs there past the grace is dropped).
    let closing = tokio::task::spawn_blocking(move || {
        drop(lanes);
        audit.close();
    });
    if closing.await.is_err() {
        tracing::error!("closing the audit log failed");
    }
    Ok(())
}

/// Where agents reach this replica (`[agents] advertise`). The default, `listen.agents`,
/// follows the port the listener was given when it asked for any (`:0`).
fn advertised_agents(config: &Config, bound: Option<SocketAddr>) -> Option<String> {
    let advertise = config.agents.advertise.clone()?;
    match (config.listen.agents, bound) {
        (Some(listen), Some(bound)) if listen.port() == 0 && advertise == listen.to_string() => {
            Some(SocketAddr::new(listen.ip(), bound.port()).to_string())
        }
        _ => Some(advertise),
    }
}

/// The SSH listener's context: the host key and the user CA from the data directory.
fn ssh_context(
    config: &Config,
    admission: &Arc<Admission>,
    audit: &Arc<AuditLog>,
    metrics: &Arc<Metrics>,
) -> Result<Arc<crate::ssh::SshContext>, ServerError> {
    use crate::sshca::files;
    let read = |name: &str| {
        let path = config.data_dir.join(name);
        std::fs::read_to_string(&path).map_err(|e| {
            ServerError::Ssh(format!(
                "{}: {e} (made by jitgate init; a data directory from before SSH needs them)",
                path.display()
            ))
        })
    };
    let host_key = russh::keys::PrivateKey::from_openssh(read(files::HOST_KEY)?)
        .map_err(|e| ServerError::Ssh(format!("{}: {e}", files::HOST_KEY)))?;
    let user_ca = russh::keys::PublicKey::from_openssh(read(&format!("{}.pub", files::USER_CA))?.trim())
        .map_err(|e| ServerError::Ssh(format!("{}.pub: {e}", files::USER_CA)))?;
    // Shell recordings go here; a proxy that cannot record does not serve SSH (fail closed).
    let recordings = &config.ssh.recordings_dir;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(recordings)
        .map_err(|e| ServerError::Ssh(format!("{}: {e}", recordings.display())))?;
    Ok(Arc::new(crate::ssh::SshContext {
        config: config.clone(),
        admission: Arc::clone(admission),
        audit: Arc::clone(audit),
        metrics: Arc::clone(metrics),
        server: Arc::new(crate::ssh::SshContext::server_config(host_key)),
        user_ca: user_ca.fingerprint(russh::keys::HashAlg::Sha256),
    }))
}

/// SIGHUP reopens the audit log (logrotate's postrotate), until shutdown.
async fn reopen_on_sighup(audit: Arc<AuditLog>, cancel: CancellationToken) {
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => s,
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGHUP; reopen the audit log with `jitgate audit reopen`");
            return;
        }
    };
    loop {
        tokio::select! {
            got = hup.recv() => if got.is_none() { return },
            _ = cancel.cancelled() => return,
        }
        let audit = Arc::clone(&audit);
        match tokio::task::spawn_blocking(move || audit.reopen(ReopenReason::Signal, None)).await {
            Ok(Ok(r)) => tracing::info!(new_file = r.new_file, "audit log reopened on SIGHUP"),
            Ok(Err(error)) => tracing::error!(%error, "audit log not reopened on SIGHUP"),
            Err(error) => tracing::error!(%error, "audit log not reopened on SIGHUP"),
        }
    }
}

/// Accepts until `cancel`, admitting each connection to `budget` and handing it to `handler`
/// with its ticket and span, which starts its task.
async fn accept_loop<F>(
    name: &'static str,
    listener: TcpListener,
    budget: Arc<Unauthenticated>,
    cancel: CancellationToken,
    handler: F,
) where
    F: Fn(TcpStream, SocketAddr, Ticket, tracing::Span),
{
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(conn) => conn,
                Err(error) => {
                    // EMFILE and friends: back off instead of spinning or exiting.
                    tracing::warn!(listener = name, %error, "accept failed");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                        _ = cancel.cancelled() => return,
                    }
                }
            },
            _ = cancel.cancelled() => return,
        };
        let span = tracing::info_span!("conn", listener = name, client.addr = %peer);
        let ticket = budget.admit(peer.ip());
        handler(tcp, peer, ticket, span);
    }
}
