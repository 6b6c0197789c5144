//! `jitgate connect TARGET --port 15432`: a loopback listener for PostgreSQL clients that
//! cannot present a client certificate (GUI tools, BI tools, drivers set to `sslmode=disable`).
//! Each connection's startup is read here, its `user` replaced by the certificate's, and the
//! session is tunnelled to the proxy over mTLS with the user's certificate: the proxy sees the
//! real identity, so admission, audit and the cut are unchanged (a cut's FATAL reaches the
//! client as it would reach psql).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context as _, Result};
use bytes::BytesMut;
use clap::Args;
use jitgate_protocol::postgres::frontend::{
    decode_startup, encode_cancel, encode_ssl_request, encode_startup, peek_startup_len, StartupRequest,
};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Largest startup message read from a local client (PostgreSQL's own limit).
const MAX_STARTUP: usize = 10_000;

/// How long a local client has to send its startup message.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

/// A grant ending sooner than this gets a warning at start.
const WARN_BEFORE: Duration = Duration::from_secs(15 * 60);

/// `jitgate connect`.
#[derive(Debug, Args)]
pub struct ConnectArgs {
    /// The PostgreSQL target to reach (a target of the proxy's config).
    target: String,
    /// Local port to listen on.
    #[arg(long, default_value_t = 15432)]
    port: u16,
    /// Local address to listen on: a loopback address only (127.0.0.1, ::1); anything else is
    /// refused, since the tunnel carries your identity.
    #[arg(long, default_value = "127.0.0.1")]
    listen: IpAddr,
    /// The proxy's PostgreSQL listener, HOST:PORT (`listen.postgres`). Default: the one
    /// `jitgate login` saved, else localhost:5433.
    #[arg(long, env = "JITGATE_PROXY")]
    proxy: Option<String>,
    /// Client certificate (PEM) presented to the proxy. Default: ~/.jitgate/cert.pem.
    #[arg(long, env = "JITGATE_CERT")]
    cert: Option<PathBuf>,
    /// Its key (PEM). Default: ~/.jitgate/key.pem.
    #[arg(long, env = "JITGATE_KEY")]
    key: Option<PathBuf>,
    /// CA certificate that signed the proxy's server certificate (PEM). Default:
    /// ~/.jitgate/ca.pem.
    #[arg(long, env = "JITGATE_CA")]
    ca: Option<PathBuf>,
    /// The control API (HOST:PORT), to warn when no grant is active or it ends soon. Default:
    /// the one `jitgate login` saved; without any the check is skipped.
    #[arg(long, env = "JITGATE_API")]
    api: Option<String>,
}

/// [`ConnectArgs`] with the profile's defaults filled in.
struct Resolved {
    proxy: String,
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
    api: Option<String>,
}

impl ConnectArgs {
    fn resolve(&self) -> Result<Resolved> {
        use crate::login::profile;
        let settings = profile::settings();
        let pick = |v: &Option<PathBuf>, name: &str, flag: &str| {
            v.clone().or_else(|| profile::file(name)).with_context(|| {
                format!(
                    "no {flag}: pass --{flag} (or JITGATE_{}), or run jitgate login",
                    flag.to_uppercase()
                )
            })
        };
        Ok(Resolved {
            proxy: self
                .proxy
                .clone()
                .or_else(|| settings.as_ref().map(|s| s.postgres.clone()))
                .unwrap_or_else(|| "localhost:5433".to_owned()),
            cert: pick(&self.cert, profile::CERT, "cert")?,
            key: pick(&self.key, profile::KEY, "key")?,
            ca: pick(&self.ca, profile::CA, "ca")?,
            api: self.api.clone().or_else(|| settings.map(|s| s.api)),
        })
    }
}

/// What every tunnelled connection needs.
struct Tunnel {
    target: String,
    user: String,
    proxy: String,
    server_name: ServerName<'static>,
    tls: tokio_rustls::TlsConnector,
}

/// Runs `jitgate connect` until Ctrl-C.
pub async fn run(args: ConnectArgs) -> Result<()> {
    if !args.listen.is_loopback() {
        bail!(
            "--listen {}: jitgate connect listens on loopback only (127.0.0.1 or ::1): anyone who reached the port would use your identity",
            args.listen
        );
    }
    let a = args.resolve()?;
    let certs = crate::tls::load_certs(&a.cert).with_context(|| format!("--cert {}", a.cert.display()))?;
    let first = certs.first().context("--cert holds no certificate")?;
    let identity = crate::pki::identity_from_der(first.as_ref()).context("--cert is not a jitgate user certificate")?;
    let key = crate::tls::load_key(&a.key).with_context(|| format!("--key {}", a.key.display()))?;
    let roots = crate::tls::load_roots(&a.ca).with_context(|| format!("--ca {}", a.ca.display()))?;
    let cfg = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)?;
    let host = a
        .proxy
        .rsplit_once(':')
        .map(|(h, _)| h.trim_matches(['[', ']']).to_owned())
        .with_context(|| format!("--proxy {:?} is not HOST:PORT", a.proxy))?;
    let server_name = ServerName::try_from(host).context("--proxy host")?;
    let tunnel = Arc::new(Tunnel {
        target: args.target.clone(),
        user: identity.user.to_string(),
        proxy: a.proxy.clone(),
        server_name,
        tls: tokio_rustls::TlsConnector::from(Arc::new(cfg)),
    });
    let bind = SocketAddr::new(args.listen, args.port);
    let listener = TcpListener::bind(bind)
        .await
        .with_context(|| format!("cannot listen on {bind}"))?;
    let local = listener.local_addr()?;
    let host = match local.ip() {
        IpAddr::V6(ip) => format!("{ip}"),
        IpAddr::V4(ip) => ip.to_string(),
    };
    println!(
        "jitgate connect: {} as {} through {}; listening on {local} (loopback only)",
        args.target, identity.user, a.proxy
    );
    println!(
        "connect with: host={host} port={} dbname={} sslmode=disable   (any user name; no password)",
        local.port(),
        args.target
    );
    if identity.not_after <= SystemTime::now() + WARN_BEFORE {
        eprintln!("warning: your certificate expires in under 15 minutes; sessions end with it");
    }
    if let Some(api) = &a.api {
        warn_about_grant(api, &a, &args.target, &identity.user.to_string()).await;
    }
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            accepted = listener.accept() => {
                let (client, peer) = match accepted {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("accept failed: {e}");
                        continue;
                    }
                };
                let tunnel = Arc::clone(&tunnel);
                tokio::spawn(async move {
                    if let Err(e) = serve(&tunnel, client).await {
                        eprintln!("connection from {peer}: {e:#}");
                    }
                });
            }
        }
    }
}

/// Warns when the user has no grant on the target, or one that ends soon.
async fn warn_about_grant(api: &str, a: &Resolved, target: &str, user: &str) {
    let client = match crate::client::ApiClient::from_files(api, &a.cert, &a.key, &a.ca) {
        Ok(c) => c,
        Err(e) => return eprintln!("warning: cannot check your grants ({e})"),
    };
    let grants = match client.list_grants().await {
        Ok(g) => g,
        Err(e) => return eprintln!("warning: cannot check your grants ({e})"),
    };
    let mine = grants
        .iter()
        .filter(|g| g.user.as_str() == user && g.target.as_str() == target)
        .max_by_key(|g| g.expires_at);
    match mine {
        None => eprintln!(
            "warning: no active grant for {user} on {}: sessions are refused until one exists (jitgate request {} --access read --for 30m --reason \"...\")",
            target, target
        ),
        Some(g) => {
            let left = g.expires_at.duration_since(SystemTime::now()).unwrap_or_default();
            let left_s = humantime::format_duration(Duration::from_secs(left.as_secs()));
            if left < WARN_BEFORE {
                eprintln!(
                    "warning: grant {} ({} access) ends in {left_s}: ask for more time with jitgate extend {} --for 30m --reason \"...\"",
                    g.id, g.access, g.id
                );
            } else {
                println!("grant {} ({} access) ends in {left_s}", g.id, g.access);
            }
        }
    }
}

/// Reads one startup-phase message from a local client.
async fn read_startup<S: AsyncRead + Unpin>(s: &mut S, buf: &mut BytesMut) -> Result<(StartupRequest, Vec<u8>)> {
    loop {
        if let Some(len) = peek_startup_len(buf, MAX_STARTUP)? {
            if buf.len() >= len {
                let msg = buf.split_to(len);
                return Ok((decode_startup(&msg)?, msg.to_vec()));
            }
        }
        if s.read_buf(buf).await? == 0 {
            bail!("the client closed the connection during startup");
        }
    }
}

/// A protocol-native refusal for the local client.
async fn refuse<S: AsyncWrite + Unpin>(s: &mut S, code: &str, message: &str) {
    use jitgate_protocol::postgres::backend::{error_response, Report, Severity};
    let bytes = error_response(
        Severity::Fatal,
        &Report {
            sqlstate: code,
            message,
            detail: None,
            hint: None,
        },
    );
    let _ = s.write_all(&bytes).await;
    let _ = s.shutdown().await;
}

/// The database the proxy is asked for: the target, or `TARGET/DB` when the client named
/// another database (`dbname=TARGET`, `TARGET/DB`, or just `DB` on the target all work).
fn database_for(target: &str, asked: Option<&str>) -> String {
    match asked.filter(|d| !d.is_empty()) {
        None => target.to_owned(),
        Some(d) if d == target || d.starts_with(&format!("{target}/")) => d.to_owned(),
        Some(d) => format!("{target}/{d}"),
    }
}

/// One local connection: its startup, then the tunnel.
async fn serve(t: &Tunnel, mut client: TcpStream) -> Result<()> {
    let _ = client.set_nodelay(true);
    let mut buf = BytesMut::with_capacity(1024);
    let startup = loop {
        let (request, raw) = match tokio::time::timeout(STARTUP_TIMEOUT, read_startup(&mut client, &mut buf)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                refuse(&mut client, "08P01", &format!("jitgate connect: {e}")).await;
                return Err(e);
            }
            Err(_) => {
                refuse(&mut client, "08006", "jitgate connect: no startup message in time").await;
                bail!("no startup message in time");
            }
        };
        match request {
            // The local leg is plain: TLS and GSSAPI are declined, as a server without them does.
            StartupRequest::Ssl | StartupRequest::GssEnc => client.write_all(b"N").await?,
            StartupRequest::Cancel { process_id, secret_key } => {
                // A cancel goes to the proxy on a connection of its own, as libpq sends it.
                drop(raw);
                let mut proxy = open_proxy(t).await?;
                proxy.write_all(&encode_cancel(process_id, secret_key)).await?;
                proxy.flush().await?;
                let mut sink = [0u8; 16];
                let _ = proxy.read(&mut sink).await;
                return Ok(());
            }
            StartupRequest::Startup { params, .. } => break params,
        }
    };
    let asked = startup.iter().find(|(k, _)| k == "database").map(|(_, v)| v.as_str());
    let database = database_for(&t.target, asked);
    let mut params: Vec<(&str, &str)> = vec![("user", &t.user), ("database", &database)];
    params.extend(
        startup
            .iter()
            .filter(|(k, _)| k != "user" && k != "database")
            .map(|(k, v)| (k.as_str(), v.as_str())),
    );
    let mut proxy = match open_proxy(t).await {
        Ok(p) => p,
        Err(e) => {
            refuse(
                &mut client,
                "08001",
                &format!("jitgate connect cannot reach the proxy {}: {e:#}", t.proxy),
            )
            .await;
            return Err(e);
        }
    };
    proxy.write_all(&encode_startup(&params)).await?;
    if !buf.is_empty() {
        // Bytes the client pipelined after its startup message.
        proxy.write_all(&buf).await?;
    }
    proxy.flush().await?;
    let _ = tokio::io::copy_bidirectional(&mut client, &mut proxy).await;
    Ok(())
}

/// TCP to the proxy, `SSLRequest`, then TLS with the user's certificate.
async fn open_proxy(t: &Tunnel) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut tcp = TcpStream::connect(&t.proxy)
        .await
        .with_context(|| format!("connecting to {}", t.proxy))?;
    let _ = tcp.set_nodelay(true);
    tcp.write_all(&encode_ssl_request()).await?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await?;
    if answer[0] != b'S' {
        bail!("the proxy did not accept TLS");
    }
    Ok(t.tls.connect(t.server_name.clone(), tcp).await?)
}

#[cfg(test)]
mod tests {
    use super::database_for;

    #[test]
    fn the_database_always_names_the_target() {
        assert_eq!(database_for("prod-db", None), "prod-db");
        assert_eq!(database_for("prod-db", Some("")), "prod-db");
        assert_eq!(database_for("prod-db", Some("prod-db")), "prod-db");
        assert_eq!(database_for("prod-db", Some("prod-db/other")), "prod-db/other");
        assert_eq!(database_for("prod-db", Some("other")), "prod-db/other");
        assert_eq!(database_for("prod-db", Some("staging-db")), "prod-db/staging-db");
    }
}
