//! A raw PostgreSQL protocol client over rustls, for what psql 15 cannot do: direct TLS with
//! ALPN, bytes after SSLRequest, oversized or slow startups.

use std::sync::Arc;

use bytes::BytesMut;
use jitgate::pki::files;
use jitgate_protocol::postgres::backend::{decode, peek_tagged, BackendMessage};
use jitgate_protocol::postgres::frontend::{encode_ssl_request, encode_startup, encode_tagged};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::UserCert;

/// TLS client configuration trusting the harness CA, presenting `user` when given.
pub fn client_config(
    data_dir: &std::path::Path,
    user: Option<&UserCert>,
    alpn: Option<&[u8]>,
) -> Arc<rustls::ClientConfig> {
    let roots = jitgate::tls::load_roots(&data_dir.join(files::CA_CERT)).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(jitgate::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut cfg = match user {
        Some(u) => builder
            .with_client_auth_cert(
                jitgate::tls::load_certs(&u.cert).unwrap(),
                jitgate::tls::load_key(&u.key).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    if let Some(p) = alpn {
        cfg.alpn_protocols = vec![p.to_vec()];
    }
    Arc::new(cfg)
}

/// Connects with direct TLS (no SSLRequest), as PostgreSQL 17's `sslnegotiation=direct`.
pub async fn direct_tls(
    addr: std::net::SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(cfg)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// Connects with the classic `SSLRequest` upgrade.
pub async fn ssl_request_tls(
    addr: std::net::SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let mut tcp = TcpStream::connect(addr).await?;
    tcp.write_all(&encode_ssl_request()).await?;
    let mut b = [0u8; 1];
    tcp.read_exact(&mut b).await?;
    assert_eq!(b[0], b'S', "proxy must accept SSLRequest");
    tokio_rustls::TlsConnector::from(cfg)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// Sends a `StartupMessage`.
pub async fn send_startup<S: AsyncWriteExt + Unpin>(s: &mut S, params: &[(&str, &str)]) {
    s.write_all(&encode_startup(params)).await.unwrap();
    s.flush().await.unwrap();
}

/// Sends a simple `Query`.
pub async fn send_query<S: AsyncWriteExt + Unpin>(s: &mut S, sql: &str) {
    let mut body = sql.as_bytes().to_vec();
    body.push(0);
    s.write_all(&encode_tagged(b'Q', &body)).await.unwrap();
    s.flush().await.unwrap();
}

/// A decoded message, with the raw bytes for `DataRow`s.
#[derive(Debug)]
pub struct Msg {
    pub tag: u8,
    pub decoded: BackendMessage,
    pub raw: Vec<u8>,
}

/// Reads messages through the next `ReadyForQuery`, or until the server closes the
/// connection (as it does after a FATAL). Panics after 30 s rather than hang a test.
pub async fn read_until_ready<S: AsyncReadExt + Unpin>(s: &mut S) -> Vec<Msg> {
    tokio::time::timeout(std::time::Duration::from_secs(30), read_until_ready_inner(s))
        .await
        .expect("no ReadyForQuery or EOF within 30s")
}

async fn read_until_ready_inner<S: AsyncReadExt + Unpin>(s: &mut S) -> Vec<Msg> {
    // Reads stop exactly at a message boundary, so nothing after ReadyForQuery is consumed.
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    loop {
        while let Some((tag, len)) = peek_tagged(&buf, 1 << 20).unwrap() {
            if buf.len() < len {
                break;
            }
            let raw = buf.split_to(len).to_vec();
            let decoded = decode(&raw).unwrap();
            let done = matches!(decoded, BackendMessage::ReadyForQuery { .. });
            out.push(Msg { tag, decoded, raw });
            if done {
                return out;
            }
        }
        // Read only what completes the current message (header first), never beyond it.
        let want = match peek_tagged(&buf, 1 << 20).unwrap() {
            Some((_, len)) => len - buf.len(),
            None => 5 - buf.len(),
        };
        let mut chunk = vec![0u8; want];
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return out,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// The first `ErrorResponse` among `msgs`: (SQLSTATE, message).
pub fn error_of(msgs: &[Msg]) -> Option<(String, String)> {
    msgs.iter().find_map(|m| match &m.decoded {
        BackendMessage::ErrorResponse(f) => Some((f.code().to_owned(), f.message().to_owned())),
        _ => None,
    })
}
