//! Connecting and logging in to a target with the credentials of the grant's access level.
//! Requires a [`Lease`]: there is no way to reach a target without one (a CancelRequest
//! reaches only a target one of the proxy's own sessions is on).

use std::collections::HashMap;
use std::sync::Arc;

use bytes::BytesMut;
use jitgate_protocol::postgres::auth::{
    cleartext_password_message, md5_password_message, sasl_initial_response, sasl_response,
};
use jitgate_protocol::postgres::backend::{decode, peek_tagged, BackendMessage, MAX_LOGIN_MESSAGE_LEN};
use jitgate_protocol::postgres::frontend::{encode_ssl_request, encode_startup};
use jitgate_protocol::postgres::scram::{self, ScramClient, ScramFinal};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::stream::UpstreamStream;
use crate::access::{BoxedIo, Dialer, Lease};
use crate::config::{Target, UpstreamTls};
use crate::model::TargetName;

/// Why the proxy could not log in to a target.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to {address}: {source}")]
    Connect { address: String, source: std::io::Error },
    #[error("TLS to target failed: {0}")]
    Tls(String),
    #[error("target refused login: {0}")]
    Refused(String),
    /// The server's `ErrorResponse` during login.
    #[error("target refused login: {message} ({sqlstate})")]
    Server { sqlstate: String, message: String },
    #[error("target has no credentials for {0} access")]
    NoCredentials(crate::model::AccessLevel),
    #[error("target protocol error: {0}")]
    Protocol(String),
    #[error("target closed the connection during login")]
    Closed,
}

/// A logged-in target connection.
pub struct Upstream {
    pub stream: UpstreamStream,
    /// `ParameterStatus` values reported by the target, in order.
    pub parameters: Vec<(String, String)>,
    /// The target backend's cancel key.
    pub backend_key: Option<(i32, i32)>,
}

/// How each target's connections are encrypted, built once when the proxy loads its config.
#[derive(Clone)]
enum TargetTls {
    Disable,
    Tls {
        config: Arc<rustls::ClientConfig>,
        name: ServerName<'static>,
    },
}

/// Opens upstream PostgreSQL connections: the dialer's stream, then `SSLRequest` and TLS as
/// the target's `tls` says, with client configs built once per target.
#[derive(Clone)]
pub struct Connector {
    dialer: Arc<dyn Dialer>,
    tls: Arc<HashMap<TargetName, TargetTls>>,
}

impl Connector {
    /// Builds every target's TLS client config.
    pub fn new(targets: &HashMap<TargetName, Arc<Target>>, dialer: Arc<dyn Dialer>) -> Result<Self, UpstreamError> {
        let mut tls = HashMap::with_capacity(targets.len());
        for (name, target) in targets {
            tls.insert(name.clone(), target_tls(target)?);
        }
        Ok(Self {
            dialer,
            tls: Arc::new(tls),
        })
    }

    /// The lease's target, over the lease's own stream.
    async fn open_leased(&self, lease: &Lease) -> Result<UpstreamStream, UpstreamError> {
        let target = lease.target();
        let io = lease.dial().await.map_err(|source| UpstreamError::Connect {
            address: target.address.clone(),
            source,
        })?;
        self.secure(target, io).await
    }

    /// A connection to `target` without a lease: for a CancelRequest (which carries no access,
    /// only a key the target issued to one of the proxy's own sessions), and for the manager
    /// role of an ephemeral target ([`crate::credentials`]), which engineers never reach.
    pub(crate) async fn open_unleased(&self, target: &Target) -> Result<UpstreamStream, UpstreamError> {
        let io = self
            .dialer
            .dial(target)
            .await
            .map_err(|source| UpstreamError::Connect {
                address: target.address.clone(),
                source,
            })?;
        self.secure(target, io).await
    }

    async fn secure(&self, target: &Target, mut io: BoxedIo) -> Result<UpstreamStream, UpstreamError> {
        let (config, name) = match self.tls.get(&target.name) {
            None => {
                return Err(UpstreamError::Tls(format!(
                    "no TLS settings for target {}",
                    target.name
                )))
            }
            Some(TargetTls::Disable) => return Ok(UpstreamStream::Plain(io)),
            Some(TargetTls::Tls { config, name }) => (Arc::clone(config), name.clone()),
        };
        io.write_all(&encode_ssl_request())
            .await
            .map_err(|e| UpstreamError::Tls(e.to_string()))?;
        let mut answer = [0u8; 1];
        io.read_exact(&mut answer)
            .await
            .map_err(|e| UpstreamError::Tls(e.to_string()))?;
        if answer[0] != b'S' {
            return Err(UpstreamError::Tls("target does not accept TLS".into()));
        }
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, io)
            .await
            .map_err(|e| UpstreamError::Tls(e.to_string()))?;
        Ok(UpstreamStream::Tls(Box::new(tls)))
    }
}

fn target_tls(target: &Target) -> Result<TargetTls, UpstreamError> {
    let (config, name) = match &target.tls {
        UpstreamTls::Disable => return Ok(TargetTls::Disable),
        UpstreamTls::Require => (
            no_verify_config()?,
            target.address.rsplit_once(':').map_or("", |(h, _)| h).to_owned(),
        ),
        UpstreamTls::VerifyFull { ca_file, server_name } => {
            let roots = crate::tls::load_roots(ca_file).map_err(|e| UpstreamError::Tls(e.to_string()))?;
            let cfg = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| UpstreamError::Tls(e.to_string()))?
                .with_root_certificates(roots)
                .with_no_client_auth();
            (Arc::new(cfg), server_name.clone())
        }
    };
    let name = ServerName::try_from(name.trim_matches(['[', ']']).to_owned())
        .map_err(|e| UpstreamError::Tls(format!("target {}: invalid server name: {e}", target.name)))?;
    Ok(TargetTls::Tls { config, name })
}

/// The role and password a session logs in with: the level's static credential, or the
/// grant's temporary role ([`crate::credentials`]).
#[derive(Clone)]
pub struct Login {
    pub user: String,
    /// `None` for `trust` authentication.
    pub password: Option<std::sync::Arc<str>>,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// Longest `application_name` the server keeps (`NAMEDATALEN - 1`).
const MAX_APPLICATION_NAME: usize = 63;

/// The upstream `application_name`: `jitgate:USER:SESSION`, after the client's own name when
/// it sent one (cut so the jitgate part always fits), so a DBA sees who is behind a backend.
pub fn application_name(client: Option<&str>, user: &str, session: &str) -> String {
    let ours: String = format!("jitgate:{user}:{session}");
    let ours = jitgate_protocol::sql::roles::truncate_identifier(&ours).to_owned();
    match client.filter(|c| !c.is_empty()) {
        None => ours,
        Some(c) => {
            let room = MAX_APPLICATION_NAME.saturating_sub(ours.len() + 1);
            let mut end = c.len().min(room);
            while !c.is_char_boundary(end) {
                end -= 1;
            }
            if end == 0 {
                ours
            } else {
                format!("{} {ours}", &c[..end])
            }
        }
    }
}

/// Connects to the lease's target, logs in as `login` and reads up to the first
/// `ReadyForQuery`. `application_name` replaces the client's (see [`application_name`]).
pub async fn connect(
    connector: &Connector,
    lease: &Lease,
    login: &Login,
    database: &str,
    forward: &[(String, String)],
) -> Result<Upstream, UpstreamError> {
    let meta = &lease.session().meta;
    let client_name = forward
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("application_name"))
        .map(|(_, v)| v.as_str());
    let app = application_name(client_name, meta.user.as_str(), meta.id.as_str());
    let stream = connector.open_leased(lease).await?;
    login_on(stream, login, database, &app, forward).await
}

/// Logs in as `login` on an open stream (the session's or the manager's check).
pub(crate) async fn login_on(
    mut stream: UpstreamStream,
    login: &Login,
    database: &str,
    app: &str,
    forward: &[(String, String)],
) -> Result<Upstream, UpstreamError> {
    let cred = login;

    // The two settings that decide how the server reads statement text are pinned to the ones
    // the proxy reads with, so no role, database or server default can differ. (The client may
    // only ask for these values: `startup::check`.)
    let mut params: Vec<(&str, &str)> = vec![
        ("user", &cred.user),
        ("database", database),
        ("client_encoding", "UTF8"),
        ("standard_conforming_strings", "on"),
        ("application_name", app),
    ];
    params.extend(
        forward
            .iter()
            .filter(|(k, _)| {
                !k.eq_ignore_ascii_case("application_name")
                    && !matches!(k.as_str(), "client_encoding" | "standard_conforming_strings")
            })
            .map(|(k, v)| (k.as_str(), v.as_str())),
    );
    write(&mut stream, &encode_startup(&params)).await?;

    let mut buf = BytesMut::with_capacity(1024);
    let mut scram: Option<ScramClient> = None;
    let mut scram_final: Option<ScramFinal> = None;
    let mut parameters = Vec::new();
    let mut backend_key = None;
    let password = || {
        cred.password
            .as_deref()
            .ok_or_else(|| UpstreamError::Refused("target asks for a password but none is configured".into()))
    };
    loop {
        let msg = read_message(&mut stream, &mut buf).await?;
        match decode(&msg).map_err(|e| UpstreamError::Protocol(e.to_string()))? {
            BackendMessage::AuthenticationOk => {
                if scram.is_some() || scram_final.is_some() {
                    // The server must prove it knows the password before we accept it.
                    return Err(UpstreamError::Protocol("SCRAM exchange incomplete".into()));
                }
            }
            BackendMessage::AuthenticationCleartextPassword => {
                write(&mut stream, &cleartext_password_message(password()?)).await?;
            }
            BackendMessage::AuthenticationMd5Password { salt } => {
                write(&mut stream, &md5_password_message(&cred.user, password()?, salt)).await?;
            }
            BackendMessage::AuthenticationSasl { mechanisms } => {
                if !mechanisms.iter().any(|m| m == scram::MECHANISM) {
                    return Err(UpstreamError::Refused(format!(
                        "no supported SASL mechanism in {mechanisms:?}"
                    )));
                }
                let client = ScramClient::new(password()?);
                write(
                    &mut stream,
                    &sasl_initial_response(scram::MECHANISM, &client.client_first()),
                )
                .await?;
                scram = Some(client);
            }
            BackendMessage::AuthenticationSaslContinue { data } => {
                let client = scram
                    .take()
                    .ok_or_else(|| UpstreamError::Protocol("unexpected SASLContinue".into()))?;
                let (reply, fin) = client
                    .handle_server_first(&data)
                    .map_err(|e| UpstreamError::Protocol(e.to_string()))?;
                write(&mut stream, &sasl_response(&reply)).await?;
                scram_final = Some(fin);
            }
            BackendMessage::AuthenticationSaslFinal { data } => {
                let fin = scram_final
                    .take()
                    .ok_or_else(|| UpstreamError::Protocol("unexpected SASLFinal".into()))?;
                fin.verify_server_final(&data)
                    .map_err(|e| UpstreamError::Refused(e.to_string()))?;
            }
            BackendMessage::AuthenticationOther(kind) => {
                return Err(UpstreamError::Refused(format!(
                    "unsupported authentication method {kind}"
                )));
            }
            BackendMessage::ParameterStatus { name, value } => parameters.push((name, value)),
            BackendMessage::BackendKeyData { process_id, secret_key } => backend_key = Some((process_id, secret_key)),
            BackendMessage::ReadyForQuery { .. } => {
                return Ok(Upstream {
                    stream,
                    parameters,
                    backend_key,
                });
            }
            BackendMessage::ErrorResponse(fields) => {
                return Err(UpstreamError::Server {
                    sqlstate: fields.code().to_owned(),
                    message: fields.message().to_owned(),
                });
            }
            BackendMessage::NoticeResponse(_) | BackendMessage::NegotiateProtocolVersion => {}
            BackendMessage::Other { tag } => {
                return Err(UpstreamError::Protocol(format!(
                    "unexpected message {:?} during login",
                    tag as char
                )));
            }
        }
    }
}

async fn write(stream: &mut UpstreamStream, bytes: &[u8]) -> Result<(), UpstreamError> {
    stream.write_all(bytes).await.map_err(|_| UpstreamError::Closed)?;
    stream.flush().await.map_err(|_| UpstreamError::Closed)
}

async fn read_message(stream: &mut UpstreamStream, buf: &mut BytesMut) -> Result<BytesMut, UpstreamError> {
    loop {
        if let Some((_, len)) =
            peek_tagged(buf, MAX_LOGIN_MESSAGE_LEN).map_err(|e| UpstreamError::Protocol(e.to_string()))?
        {
            if buf.len() >= len {
                return Ok(buf.split_to(len));
            }
        }
        if stream.read_buf(buf).await.map_err(|_| UpstreamError::Closed)? == 0 {
            return Err(UpstreamError::Closed);
        }
    }
}

/// `tls.mode = "require"`: encrypt, but accept any server certificate (libpq's
/// `sslmode=require`). Use `verify-full` wherever the target's CA is known.
fn no_verify_config() -> Result<Arc<rustls::ClientConfig>, UpstreamError> {
    let cfg = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| UpstreamError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NoVerify(crate::tls::provider())))
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Asks the target to cancel whatever the backend with `key` is running. Used when a session
/// is cut, so a statement in progress does not outlive the grant on the server.
pub async fn cancel(connector: &Connector, target: &Target, key: (i32, i32)) -> Result<(), UpstreamError> {
    let mut stream = connector.open_unleased(target).await?;
    let msg = jitgate_protocol::postgres::frontend::encode_cancel(key.0, key.1);
    write(&mut stream, &msg).await?;
    // The server closes the connection after reading a CancelRequest.
    let mut sink = [0u8; 16];
    let _ = stream.read(&mut sink).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::application_name;

    #[test]
    fn application_name_keeps_the_jitgate_part() {
        assert_eq!(application_name(None, "alice", "s-1"), "jitgate:alice:s-1");
        assert_eq!(application_name(Some(""), "alice", "s-1"), "jitgate:alice:s-1");
        assert_eq!(application_name(Some("psql"), "alice", "s-1"), "psql jitgate:alice:s-1");
        let long = application_name(Some(&"é".repeat(40)), "alice", "s-0123456789abcdef");
        assert!(
            long.len() <= 63 && long.ends_with(" jitgate:alice:s-0123456789abcdef"),
            "{long}"
        );
        let huge_user = application_name(Some("psql"), &"u".repeat(63), "s-1");
        assert_eq!(huge_user.len(), 63);
        assert!(huge_user.starts_with("jitgate:uuu"));
    }
}
