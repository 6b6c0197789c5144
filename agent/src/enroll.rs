//! Getting and renewing the agent's certificate. The key is made here and never leaves the
//! data directory; the proxy sees only a CSR. On first contact the agent has no CA to trust:
//! the join token's fingerprint pins the CA certificate the proxy sends in its chain.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail, Context as _, Result};
use jitgate_protocol::pin::PinnedCa;
use jitgate_protocol::tunnel::{self, Answer, Hello, JoinToken};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;

use crate::config::{self, Joined};

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(pem: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_bytes()).collect::<Result<_, _>>()?;
    if certs.is_empty() {
        bail!("no certificate in PEM");
    }
    Ok(certs)
}

fn key(pem: &str) -> Result<PrivateKeyDer<'static>> {
    rustls_pemfile::private_key(&mut pem.as_bytes())?.ok_or_else(|| anyhow!("no private key in PEM"))
}

/// The client config for a link or a renewal: the agent's certificate, the saved CA.
pub fn client_config(data_dir: &Path) -> Result<ClientConfig> {
    let read = |name: &str| {
        let path = data_dir.join(name);
        std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))
    };
    let identity = read(config::IDENTITY)?;
    let mut roots = RootCertStore::empty();
    for ca in certs(&read(config::CA)?)? {
        roots.add(ca)?;
    }
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs(&identity)?, key(&identity)?)?;
    cfg.alpn_protocols = alpn();
    Ok(cfg)
}

/// The ALPN ids offered: the replica list first (a proxy that knows it picks it), then the
/// plain link protocol (an older proxy knows only that).
fn alpn() -> Vec<Vec<u8>> {
    vec![tunnel::ALPN_REPLICAS.to_vec(), tunnel::ALPN.to_vec()]
}

/// TLS to the proxy's agent listener, then one hello and its answer. Returns the stream
/// (positioned after the answer) and the answer.
pub async fn hello(
    proxy: &str,
    server_name: &str,
    tls: ClientConfig,
    hello: &Hello,
) -> Result<(BufReader<tokio_rustls::client::TlsStream<TcpStream>>, Answer)> {
    let deadline = Duration::from_secs(10);
    let name = ServerName::try_from(server_name.to_owned()).with_context(|| format!("server name {server_name:?}"))?;
    let tcp = tokio::time::timeout(deadline, TcpStream::connect(proxy))
        .await
        .map_err(|_| anyhow!("connecting to {proxy}: timed out"))?
        .with_context(|| format!("connecting to {proxy}"))?;
    let _ = tcp.set_nodelay(true);
    let tls = tokio::time::timeout(
        deadline,
        tokio_rustls::TlsConnector::from(Arc::new(tls)).connect(name, tcp),
    )
    .await
    .map_err(|_| anyhow!("TLS to {proxy}: timed out"))?
    .with_context(|| format!("TLS to {proxy}"))?;
    let mut stream = BufReader::new(tls);
    stream.write_all(&tunnel::encode(hello)).await?;
    stream.flush().await?;
    let line = tokio::time::timeout(deadline, tunnel::read_line(&mut stream))
        .await
        .map_err(|_| anyhow!("{proxy} did not answer the hello"))?
        .with_context(|| format!("reading {proxy}'s answer"))?;
    let answer = tunnel::decode_answer(&line)?;
    Ok((stream, answer))
}

/// A new key and a CSR for it.
fn new_key() -> Result<(rcgen::KeyPair, String)> {
    let key = rcgen::KeyPair::generate()?;
    let csr = rcgen::CertificateParams::default().serialize_request(&key)?.pem()?;
    Ok((key, csr))
}

/// `jitgate-agent join`: the state it wrote, and the replicas the proxy named (saved too).
pub async fn join(
    proxy: &str,
    server_name: Option<&str>,
    token: &str,
    data_dir: &Path,
) -> Result<(Joined, Vec<String>)> {
    let token: JoinToken = token.parse().map_err(|e: String| anyhow!(e))?;
    std::fs::create_dir_all(data_dir).with_context(|| format!("cannot create {}", data_dir.display()))?;
    let server_name = server_name.map_or_else(|| host_of(proxy), str::to_owned);
    let (key, csr) = new_key()?;
    let provider = provider();
    let mut tls = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCa::new(&token.ca_sha256, provider)))
        .with_no_client_auth();
    tls.alpn_protocols = alpn();
    let request = Hello::Join {
        v: tunnel::VERSION,
        token: token.to_string(),
        csr,
        version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    let (_, answer) = hello(proxy, &server_name, tls, &request).await?;
    if let Some(error) = answer.error {
        bail!("the proxy refused the join: {error}");
    }
    let (Some(name), Some(cert), Some(ca)) = (answer.name, answer.cert, answer.ca) else {
        bail!("the proxy's answer lacks the name, certificate or CA");
    };
    let ca_der = certs(&ca)?;
    if ca_der.iter().all(|c| tunnel::fingerprint(c) != token.ca_sha256) {
        bail!("the CA the proxy sent does not match the token's fingerprint");
    }
    write_identity(data_dir, &key.serialize_pem(), &cert)?;
    config::write_atomic(&data_dir.join(config::CA), &ca, false)?;
    let joined = Joined {
        name,
        proxy: proxy.to_owned(),
        server_name,
        targets: answer.targets,
    };
    config::write_atomic(
        &data_dir.join(config::STATE),
        &serde_json::to_string_pretty(&joined)?,
        false,
    )?;
    // Written even when empty: a list left by an earlier join names another cluster's
    // replicas.
    let replicas = config::clean_replicas(answer.replicas);
    config::save_replicas(data_dir, &replicas)?;
    Ok((joined, replicas))
}

/// What a renewal brought: the new certificate's end, and the replicas the proxy named
/// (empty: it named none, keep the list held).
pub struct Renewed {
    pub not_after: SystemTime,
    pub replicas: Vec<String>,
}

/// A new certificate for a new key, while the current one is still valid.
pub async fn renew(proxy: &str, server_name: &str, data_dir: &Path) -> Result<Renewed> {
    let (key, csr) = new_key()?;
    let request = Hello::Renew {
        v: tunnel::VERSION,
        csr,
        version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    let dir = data_dir.to_owned();
    let tls = tokio::task::spawn_blocking(move || client_config(&dir)).await??;
    let (_, answer) = hello(proxy, server_name, tls, &request).await?;
    if let Some(error) = answer.error {
        bail!("the proxy refused the renewal: {error}");
    }
    let cert = answer
        .cert
        .ok_or_else(|| anyhow!("the proxy's answer lacks the certificate"))?;
    let (_, not_after) = validity(&cert)?;
    // The write syncs the file: off the agent's one thread, which drives the link.
    let (dir, key_pem) = (data_dir.to_owned(), key.serialize_pem());
    tokio::task::spawn_blocking(move || write_identity(&dir, &key_pem, &cert)).await??;
    Ok(Renewed {
        not_after,
        replicas: config::clean_replicas(answer.replicas),
    })
}

/// Key and certificate in one file, replaced in one rename.
fn write_identity(data_dir: &Path, key_pem: &str, cert: &str) -> Result<()> {
    config::write_atomic(&data_dir.join(config::IDENTITY), &format!("{key_pem}{cert}"), true)
}

/// When the agent's current certificate ends, and when it began.
pub fn current_validity(data_dir: &Path) -> Result<(SystemTime, SystemTime)> {
    let path = data_dir.join(config::IDENTITY);
    let pem = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    validity(&pem)
}

/// `not_before` and `not_after` of the first certificate in `pem`.
pub fn validity(pem: &str) -> Result<(SystemTime, SystemTime)> {
    use x509_parser::prelude::{FromDer as _, X509Certificate};
    let der = certs(pem)?.remove(0);
    let (_, cert) = X509Certificate::from_der(&der).map_err(|e| anyhow!("unreadable certificate: {e}"))?;
    let at = |t: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(t).unwrap_or(0));
    Ok((
        at(cert.validity().not_before.timestamp()),
        at(cert.validity().not_after.timestamp()),
    ))
}

/// The host part of `host:port` (brackets of an IPv6 address removed).
pub fn host_of(addr: &str) -> String {
    addr.rsplit_once(':')
        .map_or(addr, |(h, _)| h)
        .trim_matches(['[', ']'])
        .to_owned()
}
