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

use crate::access::{Admission, Ask, Lease, Protocol, Reason, Refusal};
use crate::audit::{AuditEvent, AuditLog, SessionEndReason};
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
    started: Instant,
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
        started: Instant::now(),
    };
    let deadline = ctx.config.limits.handshake_timeout;
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
        self.ctx
            .metrics
            .ssh_refusals_total
            .with_label_values(&["subsystem"])
            .inc();
        tracing::info!(client.addr = %self.peer, subsystem = name, "SSH subsystem refused (not supported yet)");
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
        _channel: Channel<Msg>,
        _host: &str,
        _port: u32,
        _origin: &str,
        _originator_port: u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        tracing::info!(client.addr = %self.peer, "SSH port forwarding refused");
        self.ctx
            .metrics
            .ssh_refusals_total
            .with_label_values(&["port_forwarding"])
            .inc();
        Ok(false)
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
    /// A shell (`command` None) or an exec on `channel`: relayed to a channel of the upstream
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
        let relay = Relay {
            ctx: Arc::clone(&self.ctx),
            lease,
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
        Reason::NoGrant | Reason::UnknownTarget | Reason::CertExpired | Reason::MaxSessionsPerUser => {
            r.hint.as_deref().map(|h| format!("\r\n{h}")).unwrap_or_default()
        }
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
    cut: Arc<Cut>,
    notices: tokio::sync::broadcast::Receiver<String>,
    _upstream: Arc<russh::client::Handle<Upstream>>,
}

impl Relay {
    async fn run(mut self, mut client: Channel<Msg>, mut up: Channel<russh::client::Msg>) {
        let started = Instant::now();
        let (mut bytes_in, mut bytes_out) = (0u64, 0u64);
        let mut exit_status = None;
        // The requests queued before the shell or exec, in their order.
        let command = loop {
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
                }
                Some(ChannelMsg::WindowChange {
                    col_width,
                    row_height,
                    pix_width,
                    pix_height,
                }) => {
                    let _ = up.window_change(col_width, row_height, pix_width, pix_height).await;
                }
                Some(ChannelMsg::RequestShell { .. }) => {
                    self.ctx.metrics.ssh_channels_total.with_label_values(&["shell"]).inc();
                    if up.request_shell(true).await.is_err() {
                        let _ = client.close().await;
                        return;
                    }
                    break None;
                }
                Some(ChannelMsg::Exec { command, .. }) => {
                    self.ctx.metrics.ssh_channels_total.with_label_values(&["exec"]).inc();
                    if up.exec(true, command.clone()).await.is_err() {
                        let _ = client.close().await;
                        return;
                    }
                    break Some(String::from_utf8_lossy(&command).into_owned());
                }
                Some(ChannelMsg::Close | ChannelMsg::Eof) | None => {
                    let _ = up.close().await;
                    return;
                }
                _ => {}
            }
        };
        // The server answers the shell or exec request once the process runs: from then on a
        // cut's signals reach it (sent earlier, they would find no process yet).
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
                    return;
                }
                Some(other) => early.push(other),
            }
        }
        for m in early {
            if let ChannelMsg::Data { data } = m {
                bytes_out += data.len() as u64;
                let _ = client.data(&data[..]).await;
            }
        }
        loop {
            tokio::select! {
                biased;
                () = self.cut.token.cancelled() => {
                    let message = self.cut.message();
                    let _ = client.extended_data(1, format!("\r\n{message}\r\n").as_bytes()).await;
                    let _ = client.eof().await;
                    break;
                }
                m = client.wait() => match m {
                    Some(ChannelMsg::Data { data }) => {
                        bytes_in += data.len() as u64;
                        self.lease.session().bytes_from_client.fetch_add(data.len() as u64, Ordering::Relaxed);
                        if up.data(&data[..]).await.is_err() { break; }
                    }
                    Some(ChannelMsg::Eof) => { let _ = up.eof().await; }
                    Some(ChannelMsg::WindowChange { col_width, row_height, pix_width, pix_height }) => {
                        let _ = up.window_change(col_width, row_height, pix_width, pix_height).await;
                    }
                    Some(ChannelMsg::Close) | None => break,
                    _ => {}
                },
                m = up.wait() => match m {
                    Some(ChannelMsg::Data { data }) => {
                        bytes_out += data.len() as u64;
                        self.lease.session().bytes_to_client.fetch_add(data.len() as u64, Ordering::Relaxed);
                        if client.data(&data[..]).await.is_err() { break; }
                    }
                    Some(ChannelMsg::ExtendedData { data, ext }) => {
                        bytes_out += data.len() as u64;
                        self.lease.session().bytes_to_client.fetch_add(data.len() as u64, Ordering::Relaxed);
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
                    let _ = client.extended_data(1, line.as_bytes()).await;
                }
            }
        }
        if self.cut.token.is_cancelled() {
            // Whichever way the loop ended under a cut (the client's side may have closed
            // first), the command on the host ends too.
            let _ = up.signal(russh::Sig::TERM).await;
            let _ = up.signal(russh::Sig::KILL).await;
        }
        let _ = up.close().await;
        let _ = client.close().await;
        if let Some(command) = command {
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
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let Some(Ok(lease)) = self.admitted.take() else {
            return;
        };
        let target = lease.target().name.to_string();
        self.ctx
            .metrics
            .sessions_active
            .with_label_values(&[&target, "ssh"])
            .dec();
        let reason = self.cut.reason().unwrap_or(SessionEndReason::ClientClosed);
        self.ctx.audit.submit(AuditEvent::SessionEnd {
            session: lease.session().meta.clone(),
            reason,
            bytes_from_client: lease.session().bytes_from_client.load(Ordering::Relaxed),
            bytes_to_client: lease.session().bytes_to_client.load(Ordering::Relaxed),
            duration_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
        });
    }
}
