//! One SSH connection: authentication, admission, the upstream connection and the channels.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use russh::keys::ssh_key::{self, certificate::CertType, Certificate, HashAlg, PublicKey};
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg};
use russh::server::{Auth, Msg, Session};
use russh::{Channel, ChannelId, ChannelMsg, Disconnect};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::recording::{Header, Recorder};
use super::sftp::{FileOp, Tracker};
use crate::access::{Admission, Ask, Lease, Protocol, Reason, Refusal};
use crate::audit::{AuditEvent, AuditLog, RecordingRef, SessionEndReason};
use crate::budget::Ticket;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::model::{Role, TargetName, UserName};
use crate::pki::Identity;
use crate::sshca::ROLES_EXTENSION;

/// What the SSH listener needs.
pub struct SshContext {
    pub config: Config,
    pub admission: Arc<Admission>,
    pub audit: Arc<AuditLog>,
    pub metrics: Arc<Metrics>,
    pub server: Arc<russh::server::Config>,
    /// Fingerprint of the SSH user CA's key: the only signer of certificates accepted here.
    pub user_ca: ssh_key::Fingerprint,
}

impl SshContext {
    /// The russh server config: the proxy's host key, certificates only, rejections paced.
    pub fn server_config(host_key: PrivateKey) -> russh::server::Config {
        russh::server::Config {
            keys: vec![host_key],
            methods: russh::MethodSet::from(&[russh::MethodKind::PublicKey][..]),
            auth_rejection_time: std::time::Duration::from_millis(300),
            auth_rejection_time_initial: Some(std::time::Duration::ZERO),
            inactivity_timeout: None,
            ..Default::default()
        }
    }
}

/// Why the lease ended, told to every channel.
struct Cut {
    token: CancellationToken,
    why: Mutex<Option<(SessionEndReason, String)>>,
}

impl Cut {
    fn message(&self) -> String {
        self.why
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .map(|(_, m)| m.clone())
            .unwrap_or_default()
    }

    fn reason(&self) -> Option<SessionEndReason> {
        self.why
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .map(|(r, _)| *r)
    }
}

/// The per-connection state russh calls into.
struct Conn {
    ctx: Arc<SshContext>,
    peer: SocketAddr,
    ticket: Option<Ticket>,
    admitted: Option<Result<Arc<Lease>, Refusal>>,
    target: Option<TargetName>,
    /// Shared with the relays, so the connection outlives the last one (a cut's signals must
    /// leave before it closes).
    upstream: Option<Arc<russh::client::Handle<Upstream>>>,
    cut: Arc<Cut>,
    channels: HashMap<ChannelId, Channel<Msg>>,
    /// Pre-expiry notices, for every channel's stderr.
    notices: Arc<tokio::sync::broadcast::Sender<String>>,
    /// Writes `session.end` once the connection and every relay of it are done.
    ending: Option<Arc<Ending>>,
    started: Instant,
}

/// The end of an admitted session: dropped by the last of the connection and its relays, it
/// writes `session.end`, naming the recordings the relays finished.
struct Ending {
    ctx: Arc<SshContext>,
    lease: Arc<Lease>,
    cut: Arc<Cut>,
    started: Instant,
    recordings: Mutex<Vec<RecordingRef>>,
}

impl Drop for Ending {
    fn drop(&mut self) {
        let lease = &self.lease;
        let target = lease.target().name.to_string();
        self.ctx
            .metrics
            .sessions_active
            .with_label_values(&[&target, "ssh"])
            .dec();
        let reason = self.cut.reason().unwrap_or(SessionEndReason::ClientClosed);
        let recordings = std::mem::take(
            &mut *self
                .recordings
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        self.ctx.audit.submit(AuditEvent::SessionEnd {
            session: lease.session().meta.clone(),
            reason,
            bytes_from_client: lease.session().bytes_from_client.load(Ordering::Relaxed),
            bytes_to_client: lease.session().bytes_to_client.load(Ordering::Relaxed),
            duration_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            recordings,
        });
    }
}

/// Serves one accepted TCP connection on the SSH listener.
pub async fn serve_connection(ctx: Arc<SshContext>, tcp: TcpStream, peer: SocketAddr, ticket: Ticket) {
    let _ = tcp.set_nodelay(true);
    let conn = Conn {
        ctx: Arc::clone(&ctx),
        peer,
        ticket: Some(ticket),
        admitted: None,
        target: None,
        upstream: None,
        cut: Arc::new(Cut {
            token: CancellationToken::new(),
            why: Mutex::new(None),
        }),
        channels: HashMap::new(),
        notices: Arc::new(tokio::sync::broadcast::channel(4).0),
        ending: None,
        started: Instant::now(),
    };
    let deadline = ctx.config.limits.handshake_timeout;
    // When the connection ends, so does everything relayed for it (forwards, shells waiting on
    // their target): they write their records and the session ends as the client's doing.
    let cut = Arc::clone(&conn.cut);
    let _end_with_connection = cut.token.clone().drop_guard();
    let running =
        match tokio::time::timeout(deadline, russh::server::run_stream(Arc::clone(&ctx.server), tcp, conn)).await {
            Ok(Ok(r)) => r,
            Ok(Err(error)) => return tracing::debug!(client.addr = %peer, %error, "SSH handshake failed"),
            Err(_) => return tracing::debug!(client.addr = %peer, "SSH handshake timed out"),
        };
    if let Err(error) = running.await {
        tracing::debug!(client.addr = %peer, %error, "SSH connection ended");
    }
}

/// `target` or `user@target` (the user must then be the certificate's).
fn login_name(login: &str) -> (Option<&str>, &str) {
    match login.rsplit_once('@') {
        Some((user, target)) => (Some(user), target),
        None => (None, login),
    }
}

impl Conn {
    fn refuse_auth(&self, code: &'static str, why: &str) -> Auth {
        tracing::info!(client.addr = %self.peer, reason = why, "SSH authentication refused");
        self.ctx.metrics.ssh_refusals_total.with_label_values(&[code]).inc();
        Auth::reject()
    }

    /// Checks the certificate and admits the session; a refusal is kept to be shown on the
    /// first channel.
    fn authenticate(&mut self, login: &str, cert: &Certificate) -> Auth {
        if cert.cert_type() != CertType::User {
            return self.refuse_auth("not_user_certificate", "not a user certificate");
        }
        if cert.signature_key().fingerprint(HashAlg::Sha256) != self.ctx.user_ca {
            return self.refuse_auth("unknown_ca", "certificate not signed by the jitgate SSH user CA");
        }
        let Ok(user) = UserName::new(cert.key_id()) else {
            return self.refuse_auth("bad_key_id", "certificate key id is not a user name");
        };
        if !cert.valid_principals().iter().any(|p| p == user.as_str()) {
            return self.refuse_auth("principal", "certificate does not list its user as a principal");
        }
        let (asked_user, target) = login_name(login);
        if asked_user.is_some_and(|u| u != user.as_str()) {
            return self.refuse_auth("login_user", "login user is not the certificate's user");
        }
        let Ok(target) = TargetName::new(target) else {
            return self.refuse_auth("login_target", "login names no target");
        };
        let roles = cert
            .extensions()
            .get(ROLES_EXTENSION)
            .map(|r| {
                r.split(',')
                    .filter(|r| !r.is_empty())
                    .filter_map(|r| Role::new(r).ok())
                    .collect()
            })
            .unwrap_or_default();
        let identity = Identity {
            user,
            roles,
            not_after: cert.valid_before_time(),
            enrolled_until: None,
        };
        let ask = Ask {
            identity: &identity,
            target: &target,
            protocol: Protocol::Ssh,
            client_addr: self.peer,
            database: None,
        };
        let admitted = self.ctx.admission.admit(ask).map(Arc::new);
        if let Err(refusal) = &admitted {
            self.ctx
                .metrics
                .sessions_denied_total
                .with_label_values(&[refusal.reason.as_str()])
                .inc();
            self.ctx.audit.submit(AuditEvent::SessionDenied {
                user: identity.user.clone(),
                target: target.to_string(),
                client_addr: self.peer,
                code: refusal.reason.as_str().to_owned(),
                reason: refusal.message.clone(),
            });
        }
        self.target = Some(target);
        self.admitted = Some(admitted);
        self.ticket = None;
        Auth::Accept
    }

    /// The upstream connection, opened on the first channel.
    async fn upstream(&mut self, lease: &Arc<Lease>) -> Result<Arc<russh::client::Handle<Upstream>>, String> {
        if self.upstream.is_none() {
            let handle = connect_upstream(&self.ctx, lease).await?;
            self.upstream = Some(Arc::new(handle));
        }
        self.upstream.clone().ok_or_else(|| "no upstream".to_owned())
    }
}

/// The upstream side: the target's host key must be one of the pinned ones.
struct Upstream {
    pinned: Vec<String>,
    target: TargetName,
    presented: Arc<Mutex<Option<String>>>,
}

impl russh::client::Handler for Upstream {
    type Error = russh::Error;

    async fn check_server_key(&mut self, key: &PublicKey) -> Result<bool, Self::Error> {
        let line = key
            .to_openssh()
            .map(|s| s.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
            .unwrap_or_default();
        let ok = self.pinned.contains(&line);
        if !ok {
            *self.presented.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                Some(key.fingerprint(HashAlg::Sha256).to_string());
            tracing::warn!(target = %self.target, presented = %key.fingerprint(HashAlg::Sha256), "SSH target host key does not match the pinned one");
        }
        Ok(ok)
    }
}

fn fingerprint_of(line: &str) -> String {
    PublicKey::from_openssh(line).map_or_else(|_| "?".into(), |k| k.fingerprint(HashAlg::Sha256).to_string())
}

async fn connect_upstream(ctx: &SshContext, lease: &Lease) -> Result<russh::client::Handle<Upstream>, String> {
    let target = lease.target();
    let credential = target.credentials.get(&lease.access()).ok_or_else(|| {
        format!(
            "jitgate: target {} has no credentials for {} access",
            target.name,
            lease.access()
        )
    })?;
    let key_text = credential.ssh_key.as_deref().ok_or_else(|| {
        format!(
            "jitgate: target {} has no key for {} access",
            target.name,
            lease.access()
        )
    })?;
    let key = PrivateKey::from_openssh(key_text).map_err(|e| format!("jitgate: the target's key: {e}"))?;
    let wait = ctx.config.limits.upstream_connect_timeout;
    let io = tokio::time::timeout(wait, lease.dial())
        .await
        .map_err(|_| format!("jitgate: cannot reach {}: timed out", target.name))?
        .map_err(|e| format!("jitgate: cannot reach {}: {e}", target.name))?;
    let presented = Arc::new(Mutex::new(None));
    let handler = Upstream {
        pinned: target.host_keys.clone(),
        target: target.name.clone(),
        presented: Arc::clone(&presented),
    };
    let config = Arc::new(russh::client::Config::default());
    let connected = tokio::time::timeout(wait, russh::client::connect_stream(config, io, handler)).await;
    let mut handle = match connected {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            let presented = presented
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            return Err(match presented {
                Some(fp) => {
                    let expected: Vec<String> = target.host_keys.iter().map(|k| fingerprint_of(k)).collect();
                    let msg = format!(
                        "jitgate: the host key of {} does not match: it presented {fp}, jitgate expects {}",
                        target.name,
                        expected.join(" or ")
                    );
                    ctx.audit.submit(AuditEvent::SessionDenied {
                        user: lease.session().meta.user.clone(),
                        target: target.name.to_string(),
                        client_addr: lease.session().meta.client_addr,
                        code: "host_key_mismatch".into(),
                        reason: msg.clone(),
                    });
                    msg
                }
                None => format!("jitgate: cannot log in to {}: {e}", target.name),
            });
        }
        Err(_) => return Err(format!("jitgate: cannot log in to {}: timed out", target.name)),
    };
    let hash = handle.best_supported_rsa_hash().await.ok().flatten().flatten();
    let auth = handle
        .authenticate_publickey(credential.user.clone(), PrivateKeyWithHashAlg::new(Arc::new(key), hash))
        .await
        .map_err(|e| format!("jitgate: cannot log in to {}: {e}", target.name))?;
    if !auth.success() {
        return Err(format!(
            "jitgate: {} refused the login of {}",
            target.name, credential.user
        ));
    }
    Ok(handle)
}

impl russh::server::Handler for Conn {
    type Error = russh::Error;

    async fn auth_publickey_offered(&mut self, _user: &str, _key: &PublicKey) -> Result<Auth, Self::Error> {
        // Only a query ("would this key do?"): nothing is authenticated until a signature over
        // the session is verified, and then only certificates (auth_openssh_certificate).
        Ok(Auth::Accept)
    }

    async fn auth_publickey(&mut self, _user: &str, _key: &PublicKey) -> Result<Auth, Self::Error> {
        Ok(self.refuse_auth(
            "plain_key",
            "a plain key: jitgate accepts only certificates from its SSH user CA (jitgate cert issue)",
        ))
    }

    async fn auth_openssh_certificate(&mut self, user: &str, cert: &Certificate) -> Result<Auth, Self::Error> {
        Ok(self.authenticate(user, cert))
    }

    async fn auth_succeeded(&mut self, session: &mut Session) -> Result<(), Self::Error> {
        let Some(Ok(lease)) = &self.admitted else {
            return Ok(());
        };
        let lease = Arc::clone(lease);
        self.ctx.audit.submit(AuditEvent::SessionStart {
            session: lease.session().meta.clone(),
        });
        self.ending = Some(Arc::new(Ending {
            ctx: Arc::clone(&self.ctx),
            lease: Arc::clone(&lease),
            cut: Arc::clone(&self.cut),
            started: self.started,
            recordings: Mutex::new(Vec::new()),
        }));
        // Listed (and killable) from now on; the upstream login follows on the first channel.
        lease.session().set_established();
        let target = lease.target().name.to_string();
        self.ctx
            .metrics
            .sessions_total
            .with_label_values(&[&target, "ssh"])
            .inc();
        self.ctx
            .metrics
            .sessions_active
            .with_label_values(&[&target, "ssh"])
            .inc();
        // One watcher per connection: when the lease ends, every channel hears why. Before
        // that, the pre-expiry notice goes to every channel's stderr (again after extensions).
        if let Some(mut notice) = lease.notice(self.ctx.config.sessions.expiry_notice) {
            let (notices, target, grant) = (
                Arc::clone(&self.notices),
                lease.target().name.to_string(),
                lease.grant().id.to_string(),
            );
            let stop = self.cut.token.clone();
            tokio::spawn(async move {
                loop {
                    let due = tokio::select! {
                        d = std::future::poll_fn(|cx| notice.poll_due(cx)) => d,
                        () = stop.cancelled() => return,
                    };
                    let left = due.at.duration_since(SystemTime::now()).unwrap_or_default();
                    let line = format!(
                        "\r\njitgate: access to {target} ends in {} (at {}); to keep working: jitgate extend {grant} --for 30m --reason TEXT\r\n",
                        humantime::format_duration(std::time::Duration::from_secs(left.as_secs())),
                        humantime::format_rfc3339_seconds(due.at)
                    );
                    let _ = notices.send(line);
                }
            });
        }
        let cut = Arc::clone(&self.cut);
        let handle = session.handle();
        tokio::spawn(async move {
            let reason = lease.cut().await;
            let message = cut_message(reason, &lease);
            *cut.why.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some((reason, message.clone()));
            cut.token.cancel();
            // Give the channels a moment to print the line, then end the connection.
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            let _ = handle
                .disconnect(Disconnect::ByApplication, message, String::new())
                .await;
        });
        Ok(())
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        self.channels.insert(channel.id(), channel);
        Ok(true)
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _col: u32,
        _row: u32,
        _pw: u32,
        _ph: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        _name: &str,
        _value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn window_change_request(
        &mut self,
        _channel: ChannelId,
        _col: u32,
        _row: u32,
        _pw: u32,
        _ph: u32,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        Ok(())
    }

    async fn shell_request(&mut self, channel: ChannelId, session: &mut Session) -> Result<(), Self::Error> {
        self.start(channel, session).await
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        _data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.start(channel, session).await
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if name == "sftp" {
            return self.start(channel, session).await;
        }
        self.ctx
            .metrics
            .ssh_refusals_total
            .with_label_values(&["subsystem"])
            .inc();
        tracing::info!(client.addr = %self.peer, subsystem = name, "SSH subsystem refused (only sftp is relayed)");
        session.channel_failure(channel)
    }

    async fn x11_request(
        &mut self,
        channel: ChannelId,
        _single: bool,
        _proto: &str,
        _cookie: &str,
        _screen: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_failure(channel)
    }

    async fn agent_request(&mut self, channel: ChannelId, session: &mut Session) -> Result<bool, Self::Error> {
        self.ctx
            .metrics
            .ssh_refusals_total
            .with_label_values(&["agent_forwarding"])
            .inc();
        session.channel_failure(channel)?;
        Ok(false)
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host: &str,
        port: u32,
        origin: &str,
        originator_port: u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let (Some(Ok(lease)), Some(ending)) = (&self.admitted, &self.ending) else {
            return Ok(false);
        };
        let (lease, ending) = (Arc::clone(lease), Arc::clone(ending));
        let refuse = |conn: &Self, why: String| {
            tracing::info!(client.addr = %conn.peer, %host, port, reason = %why, "SSH port forward refused");
            conn.ctx
                .metrics
                .ssh_refusals_total
                .with_label_values(&["port_forwarding"])
                .inc();
            conn.ctx.audit.submit(AuditEvent::SshForward {
                session: lease.session().meta.clone(),
                host: host.to_owned(),
                port,
                allowed: false,
                refused: Some(why),
                duration_ms: 0,
                bytes_in: 0,
                bytes_out: 0,
            });
            Ok(false)
        };
        if !lease.target().allow_port_forwarding {
            let why = format!(
                "port forwarding is not allowed on {} (allow_port_forwarding)",
                lease.target().name
            );
            return refuse(self, why);
        }
        let upstream = match self.upstream(&lease).await {
            Ok(u) => u,
            Err(message) => return refuse(self, message),
        };
        let up = match upstream
            .channel_open_direct_tcpip(host, port, origin, originator_port)
            .await
        {
            Ok(c) => c,
            Err(e) => return refuse(self, format!("{} refused the forward: {e}", lease.target().name)),
        };
        self.ctx
            .metrics
            .ssh_channels_total
            .with_label_values(&["direct-tcpip"])
            .inc();
        let forward = Forward {
            ctx: Arc::clone(&self.ctx),
            cut: Arc::clone(&self.cut),
            ending,
            _upstream: upstream,
            host: host.to_owned(),
            port,
        };
        tokio::spawn(forward.run(channel, up));
        Ok(true)
    }

    async fn tcpip_forward(
        &mut self,
        _address: &str,
        _port: &mut u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        Ok(false)
    }
}

impl Conn {
    /// A shell, an exec or the sftp subsystem on `channel`: relayed to a channel of the upstream
    /// connection, or refused with a message on the channel.
    ///
    /// The relay reads the channel's requests in the order the client sent them (pty, then
    /// the shell or the command), so the upstream gets them in that order too.
    async fn start(&mut self, channel: ChannelId, session: &mut Session) -> Result<(), russh::Error> {
        let Some(client) = self.channels.remove(&channel) else {
            return session.channel_failure(channel);
        };
        session.channel_success(channel)?;
        let lease = match &self.admitted {
            Some(Ok(lease)) => Arc::clone(lease),
            Some(Err(refusal)) => {
                let text = refusal_text(refusal);
                let handle = session.handle();
                tokio::spawn(async move { say_and_close(&client, &text, 1, handle).await });
                return Ok(());
            }
            None => return session.channel_failure(channel),
        };
        let upstream = match self.upstream(&lease).await {
            Ok(u) => u,
            Err(message) => {
                let handle = session.handle();
                tokio::spawn(async move { say_and_close(&client, &format!("{message}\r\n"), 1, handle).await });
                return Ok(());
            }
        };
        let up = match upstream.channel_open_session().await {
            Ok(c) => c,
            Err(e) => {
                let handle = session.handle();
                let text = format!("jitgate: cannot open a channel on {}: {e}\r\n", lease.target().name);
                tokio::spawn(async move { say_and_close(&client, &text, 1, handle).await });
                return Ok(());
            }
        };
        let Some(ending) = self.ending.clone() else {
            return session.channel_failure(channel);
        };
        let relay = Relay {
            ctx: Arc::clone(&self.ctx),
            lease,
            ending,
            cut: Arc::clone(&self.cut),
            notices: self.notices.subscribe(),
            _upstream: Arc::clone(&upstream),
        };
        tokio::spawn(relay.run(client, up));
        Ok(())
    }
}

/// The message a refused session sees before the disconnect.
fn refusal_text(r: &Refusal) -> String {
    let hint = match r.reason {
        Reason::NoGrant
        | Reason::UnknownTarget
        | Reason::CertExpired
        | Reason::MaxSessionsPerUser
        | Reason::Resyncing => r.hint.as_deref().map(|h| format!("\r\n{h}")).unwrap_or_default(),
        _ => String::new(),
    };
    format!("jitgate: {}{hint}\r\n", r.message)
}

async fn say_and_close(channel: &Channel<Msg>, text: &str, status: u32, handle: russh::server::Handle) {
    let _ = channel.extended_data(1, text.as_bytes()).await;
    let _ = channel.exit_status(status).await;
    let _ = channel.eof().await;
    let _ = channel.close().await;
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let _ = handle
        .disconnect(Disconnect::ByApplication, text.trim().to_owned(), String::new())
        .await;
}

fn cut_message(reason: SessionEndReason, lease: &Lease) -> String {
    let (target, grant) = (&lease.target().name, &lease.grant().id);
    match reason {
        SessionEndReason::GrantExpired => format!("jitgate: access to {target} ended: grant {grant} expired"),
        SessionEndReason::GrantRevoked => format!("jitgate: access to {target} ended: grant {grant} was revoked"),
        SessionEndReason::Killed => format!(
            "jitgate: session {} was terminated by an administrator",
            lease.session().meta.id
        ),
        SessionEndReason::CertExpired => format!("jitgate: access to {target} ended: your certificate expired"),
        _ => "jitgate is shutting down".to_owned(),
    }
}

/// One client channel relayed to one upstream channel until either ends or the lease is cut.
struct Relay {
    ctx: Arc<SshContext>,
    lease: Arc<Lease>,
    ending: Arc<Ending>,
    cut: Arc<Cut>,
    notices: tokio::sync::broadcast::Receiver<String>,
    _upstream: Arc<russh::client::Handle<Upstream>>,
}

/// What a relayed session channel runs.
enum Mode {
    /// A shell, recorded.
    Shell(Box<Recorder>),
    /// A command, audited when it ends.
    Exec(String),
    /// The sftp subsystem, its file operations audited as they complete.
    Sftp(Box<Tracker>),
}

/// The terminal a pty request asked for, for the recording's header.
struct Terminal {
    term: String,
    cols: u32,
    rows: u32,
}

/// Tells the client why its channel is refused, and closes it.
async fn refuse(client: &Channel<Msg>, text: &str) {
    let _ = client.extended_data(1, text.as_bytes()).await;
    let _ = client.exit_status(1).await;
    let _ = client.close().await;
}

/// The relay cannot go on: what the client is told.
struct Stop(String);

impl Relay {
    fn sftp_audit(&self, ops: Vec<FileOp>) {
        let meta = &self.lease.session().meta;
        for op in ops {
            self.ctx.audit.submit(AuditEvent::SshSftp {
                session: meta.clone(),
                op: op.op.to_owned(),
                path: op.path,
                to: op.to,
                mode: op.mode,
                status: op.status,
                bytes_read: op.bytes_read,
                bytes_written: op.bytes_written,
            });
        }
    }

    /// Bytes from the client, on their way up.
    async fn upward(&mut self, mode: &mut Mode, data: &[u8]) -> Result<(), Stop> {
        match mode {
            Mode::Shell(rec) => rec
                .input(data)
                .await
                .map_err(|e| Stop(format!("jitgate: cannot write the recording: {e}"))),
            Mode::Sftp(tracker) => tracker
                .client(data)
                .map_err(|e| Stop(format!("jitgate: SFTP stream cannot be audited: {e}"))),
            Mode::Exec(_) => Ok(()),
        }
    }

    /// Bytes for the client's terminal (the target's, or the proxy's own lines).
    async fn downward(&mut self, mode: &mut Mode, data: &[u8], stderr: bool) -> Result<(), Stop> {
        match mode {
            Mode::Shell(rec) => rec
                .output(data)
                .await
                .map_err(|e| Stop(format!("jitgate: cannot write the recording: {e}"))),
            Mode::Sftp(tracker) if !stderr => {
                let ops = tracker
                    .server(data)
                    .map_err(|e| Stop(format!("jitgate: SFTP stream cannot be audited: {e}")))?;
                self.sftp_audit(ops);
                Ok(())
            }
            Mode::Sftp(_) | Mode::Exec(_) => Ok(()),
        }
    }

    /// Reads the channel's requests up to the shell, exec or subsystem, relaying them up;
    /// `None` when the channel ended first or the request failed.
    async fn open(&mut self, client: &mut Channel<Msg>, up: &mut Channel<russh::client::Msg>) -> Option<Mode> {
        let mut terminal = None;
        loop {
            match client.wait().await {
                Some(ChannelMsg::RequestPty {
                    term,
                    col_width,
                    row_height,
                    pix_width,
                    pix_height,
                    terminal_modes,
                    ..
                }) => {
                    // russh hands over a fixed-size table padded with TTY_OP_END; only the
                    // real modes go on (the client side ends the list itself).
                    let modes: Vec<(russh::Pty, u32)> = terminal_modes
                        .into_iter()
                        .filter(|(m, _)| *m != russh::Pty::TTY_OP_END)
                        .collect();
                    let _ = up
                        .request_pty(false, &term, col_width, row_height, pix_width, pix_height, &modes)
                        .await;
                    terminal = Some(Terminal {
                        term,
                        cols: col_width,
                        rows: row_height,
                    });
                }
                Some(ChannelMsg::WindowChange {
                    col_width,
                    row_height,
                    pix_width,
                    pix_height,
                }) => {
                    if let Some(t) = terminal.as_mut() {
                        (t.cols, t.rows) = (col_width, row_height);
                    }
                    let _ = up.window_change(col_width, row_height, pix_width, pix_height).await;
                }
                Some(ChannelMsg::RequestShell { .. }) => {
                    self.ctx.metrics.ssh_channels_total.with_label_values(&["shell"]).inc();
                    let rec = match self.recorder(terminal.as_ref()).await {
                        Ok(rec) => rec,
                        Err(e) => {
                            tracing::error!(error = %e, "cannot create the shell's recording: shell refused");
                            self.ctx
                                .metrics
                                .ssh_refusals_total
                                .with_label_values(&["recording"])
                                .inc();
                            let text = format!("jitgate: cannot record the session ({e}); the shell is refused\r\n");
                            refuse(client, &text).await;
                            let _ = up.close().await;
                            return None;
                        }
                    };
                    if up.request_shell(true).await.is_err() {
                        let _ = client.close().await;
                        let _ = self.keep(*rec).await;
                        return None;
                    }
                    return Some(Mode::Shell(rec));
                }
                Some(ChannelMsg::Exec { command, .. }) => {
                    self.ctx.metrics.ssh_channels_total.with_label_values(&["exec"]).inc();
                    if up.exec(true, command.clone()).await.is_err() {
                        let _ = client.close().await;
                        return None;
                    }
                    return Some(Mode::Exec(String::from_utf8_lossy(&command).into_owned()));
                }
                Some(ChannelMsg::RequestSubsystem { name, .. }) => {
                    if name != "sftp" {
                        refuse(client, &format!("jitgate: subsystem {name:?} is not relayed\r\n")).await;
                        let _ = up.close().await;
                        return None;
                    }
                    self.ctx.metrics.ssh_channels_total.with_label_values(&["sftp"]).inc();
                    if up.request_subsystem(true, "sftp").await.is_err() {
                        let _ = client.close().await;
                        return None;
                    }
                    return Some(Mode::Sftp(Box::default()));
                }
                Some(ChannelMsg::Close | ChannelMsg::Eof) | None => {
                    let _ = up.close().await;
                    return None;
                }
                _ => {}
            }
        }
    }

    /// The recording of a shell: `DATA_DIR/recordings/SESSION-N.cast`.
    async fn recorder(&self, terminal: Option<&Terminal>) -> std::io::Result<Box<Recorder>> {
        let meta = &self.lease.session().meta;
        let dir = &self.ctx.config.ssh.recordings_dir;
        let header = |term| Header {
            width: terminal.map_or(80, |t| t.cols),
            height: terminal.map_or(24, |t| t.rows),
            term,
            title: format!("{}@{} {} grant {}", meta.user, meta.target, meta.id, meta.grant_id),
        };
        let term = terminal.map_or("", |t| t.term.as_str());
        let mut n = 1;
        loop {
            let name = format!("{}-{n}.cast", meta.id);
            match Recorder::create(dir, &name, header(term), self.ctx.config.ssh.record_input).await {
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
                r => return r.map(Box::new),
            }
        }
    }

    /// Finishes a recording and names it in the session's `session.end`.
    async fn keep(&self, rec: Recorder) -> std::io::Result<()> {
        let path = rec.path().to_owned();
        match rec.finish().await {
            Ok(done) => {
                self.ending
                    .recordings
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(done);
                Ok(())
            }
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "the shell's recording could not be finished");
                Err(e)
            }
        }
    }

    async fn run(mut self, mut client: Channel<Msg>, mut up: Channel<russh::client::Msg>) {
        let started = Instant::now();
        let (mut bytes_in, mut bytes_out) = (0u64, 0u64);
        let mut exit_status = None;
        let Some(mut mode) = self.open(&mut client, &mut up).await else {
            return;
        };
        // The server answers the shell, exec or subsystem request once the process runs:
        // from then on a cut's signals reach it (sent earlier, they would find no process).
        let mut early = Vec::new();
        loop {
            match up.wait().await {
                Some(ChannelMsg::Success) => break,
                Some(ChannelMsg::Failure) | Some(ChannelMsg::Close) | None => {
                    let text = format!("jitgate: {} refused the request\r\n", self.lease.target().name);
                    let _ = client.extended_data(1, text.as_bytes()).await;
                    let _ = client.exit_status(1).await;
                    let _ = client.close().await;
                    let _ = up.close().await;
                    if let Mode::Shell(rec) = mode {
                        let _ = self.keep(*rec).await;
                    }
                    return;
                }
                Some(other) => early.push(other),
            }
        }
        let mut stopped = None;
        for m in early {
            if let ChannelMsg::Data { data } = m {
                bytes_out += data.len() as u64;
                if let Err(stop) = self.downward(&mut mode, &data, false).await {
                    stopped = Some(stop);
                }
                let _ = client.data(&data[..]).await;
            }
        }
        while stopped.is_none() {
            tokio::select! {
                biased;
                () = self.cut.token.cancelled() => {
                    // No message: the connection itself ended; nothing to tell or record.
                    let message = self.cut.message();
                    if !message.is_empty() {
                        let line = format!("\r\n{message}\r\n");
                        let _ = self.downward(&mut mode, line.as_bytes(), true).await;
                        let _ = client.extended_data(1, line.as_bytes()).await;
                    }
                    let _ = client.eof().await;
                    break;
                }
                m = client.wait() => match m {
                    Some(ChannelMsg::Data { data }) => {
                        bytes_in += data.len() as u64;
                        self.lease.session().bytes_from_client.fetch_add(data.len() as u64, Ordering::Relaxed);
                        if let Err(stop) = self.upward(&mut mode, &data).await {
                            stopped = Some(stop);
                            break;
                        }
                        if up.data(&data[..]).await.is_err() { break; }
                    }
                    Some(ChannelMsg::Eof) => { let _ = up.eof().await; }
                    Some(ChannelMsg::WindowChange { col_width, row_height, pix_width, pix_height }) => {
                        if let Mode::Shell(rec) = &mut mode {
                            if let Err(e) = rec.resize(col_width, row_height).await {
                                stopped = Some(Stop(format!("jitgate: cannot write the recording: {e}")));
                            }
                        }
                        let _ = up.window_change(col_width, row_height, pix_width, pix_height).await;
                    }
                    Some(ChannelMsg::Close) | None => break,
                    _ => {}
                },
                m = up.wait() => match m {
                    Some(ChannelMsg::Data { data }) => {
                        bytes_out += data.len() as u64;
                        self.lease.session().bytes_to_client.fetch_add(data.len() as u64, Ordering::Relaxed);
                        if let Err(stop) = self.downward(&mut mode, &data, false).await {
                            stopped = Some(stop);
                            break;
                        }
                        if client.data(&data[..]).await.is_err() { break; }
                    }
                    Some(ChannelMsg::ExtendedData { data, ext }) => {
                        bytes_out += data.len() as u64;
                        self.lease.session().bytes_to_client.fetch_add(data.len() as u64, Ordering::Relaxed);
                        if let Err(stop) = self.downward(&mut mode, &data, true).await {
                            stopped = Some(stop);
                        }
                        let _ = client.extended_data(ext, &data[..]).await;
                    }
                    Some(ChannelMsg::ExitStatus { exit_status: s }) => {
                        exit_status = Some(s);
                        let _ = client.exit_status(s).await;
                    }
                    Some(ChannelMsg::Eof) => { let _ = client.eof().await; }
                    Some(ChannelMsg::Close) | None => break,
                    _ => {}
                },
                Ok(line) = self.notices.recv() => {
                    if let Err(stop) = self.downward(&mut mode, line.as_bytes(), true).await {
                        stopped = Some(stop);
                    }
                    let _ = client.extended_data(1, line.as_bytes()).await;
                }
            }
        }
        if let Some(Stop(text)) = &stopped {
            // Fail closed: what cannot be recorded or audited does not go on.
            tracing::error!(reason = %text, "SSH channel ended: it could not be recorded or audited");
            let _ = client.extended_data(1, format!("\r\n{text}\r\n").as_bytes()).await;
            let _ = client.eof().await;
        }
        if self.cut.token.is_cancelled() || stopped.is_some() {
            // Whichever way the loop ended under a cut (the client's side may have closed
            // first), the command on the host ends too.
            let _ = up.signal(russh::Sig::TERM).await;
            let _ = up.signal(russh::Sig::KILL).await;
        }
        let _ = up.close().await;
        let _ = client.close().await;
        match mode {
            Mode::Exec(command) => {
                self.lease.session().statements.fetch_add(1, Ordering::Relaxed);
                let meta = &self.lease.session().meta;
                self.ctx.audit.submit(AuditEvent::SshExec {
                    session: meta.clone(),
                    command,
                    exit_status,
                    duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                    bytes_in,
                    bytes_out,
                    cut: self.cut.token.is_cancelled(),
                });
            }
            Mode::Shell(rec) => {
                let _ = self.keep(*rec).await;
            }
            Mode::Sftp(mut tracker) => {
                let left = tracker.finish();
                self.sftp_audit(left);
            }
        }
    }
}

/// One forwarded TCP connection (`direct-tcpip`), relayed until either side closes or the
/// lease is cut; audited when it ends.
struct Forward {
    ctx: Arc<SshContext>,
    cut: Arc<Cut>,
    ending: Arc<Ending>,
    _upstream: Arc<russh::client::Handle<Upstream>>,
    host: String,
    port: u32,
}

impl Forward {
    async fn run(self, mut client: Channel<Msg>, mut up: Channel<russh::client::Msg>) {
        let started = Instant::now();
        let (mut bytes_in, mut bytes_out) = (0u64, 0u64);
        let session = self.ending.lease.session();
        let (mut client_eof, mut up_eof) = (false, false);
        loop {
            tokio::select! {
                biased;
                () = self.cut.token.cancelled() => break,
                m = client.wait(), if !client_eof => match m {
                    Some(ChannelMsg::Data { data }) => {
                        bytes_in += data.len() as u64;
                        session.bytes_from_client.fetch_add(data.len() as u64, Ordering::Relaxed);
                        if up.data(&data[..]).await.is_err() { break; }
                    }
                    Some(ChannelMsg::Eof) => { client_eof = true; let _ = up.eof().await; }
                    Some(ChannelMsg::Close) | None => break,
                    _ => {}
                },
                m = up.wait(), if !up_eof => match m {
                    Some(ChannelMsg::Data { data }) => {
                        bytes_out += data.len() as u64;
                        session.bytes_to_client.fetch_add(data.len() as u64, Ordering::Relaxed);
                        if client.data(&data[..]).await.is_err() { break; }
                    }
                    Some(ChannelMsg::Eof) => { up_eof = true; let _ = client.eof().await; }
                    Some(ChannelMsg::Close) | None => break,
                    _ => {}
                },
                else => break,
            }
        }
        let _ = up.close().await;
        let _ = client.close().await;
        self.ctx.audit.submit(AuditEvent::SshForward {
            session: session.meta.clone(),
            host: self.host,
            port: self.port,
            allowed: true,
            refused: None,
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            bytes_in,
            bytes_out,
        });
    }
}
