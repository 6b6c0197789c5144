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
    ssl_request_tls_over(TcpStream::connect(addr).await?, cfg).await
}

/// A TCP connection whose receive buffer is `rcvbuf` bytes (set before connecting, so the
/// window it advertises is small from the start): a slow reader.
pub async fn tcp_with_rcvbuf(addr: std::net::SocketAddr, rcvbuf: u32) -> std::io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(rcvbuf)?;
    socket.connect(addr).await
}

/// The classic `SSLRequest` upgrade on a connection already open.
pub async fn ssl_request_tls_over(
    mut tcp: TcpStream,
    cfg: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
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

/// Everything a connection delivered until it ended, and how it ended.
#[derive(Debug)]
pub struct Ending {
    pub msgs: Vec<Msg>,
    /// `Ok` for a clean end (over TLS: `close_notify`, then EOF); otherwise the error, such as
    /// `UnexpectedEof` for a TCP close without `close_notify`, or `ConnectionReset`.
    pub end: Result<(), std::io::ErrorKind>,
}

/// Reads messages until the connection ends; panics after 30 s rather than hang a test.
pub async fn read_to_end<S: AsyncReadExt + Unpin>(s: &mut S) -> Ending {
    let read = async {
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 16 << 10];
        let end = loop {
            match s.read(&mut chunk).await {
                Ok(0) => break Ok(()),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) => break Err(e.kind()),
            }
        };
        let mut msgs = Vec::new();
        let mut rest = &buf[..];
        while let Ok(Some((tag, len))) = peek_tagged(rest, 1 << 30) {
            if rest.len() < len {
                break;
            }
            let raw = rest[..len].to_vec();
            rest = &rest[len..];
            let decoded = decode(&raw).unwrap_or(BackendMessage::Other { tag });
            msgs.push(Msg { tag, decoded, raw });
        }
        Ending { msgs, end }
    };
    tokio::time::timeout(std::time::Duration::from_secs(30), read)
        .await
        .expect("the connection did not end within 30s")
}

/// The first `ErrorResponse` among `msgs`: (SQLSTATE, message).
pub fn error_of(msgs: &[Msg]) -> Option<(String, String)> {
    msgs.iter().find_map(|m| match &m.decoded {
        BackendMessage::ErrorResponse(f) => Some((f.code().to_owned(), f.message().to_owned())),
        _ => None,
    })
}

/// A parameter for [`bind`].
pub enum P<'a> {
    Text(&'a str),
    Binary(&'a [u8]),
    Null,
}

/// `Parse` bytes.
pub fn parse(name: &str, sql: &str) -> Vec<u8> {
    jitgate_protocol::postgres::messages::encode_parse(name, sql)
}

/// `Bind` bytes (results in text).
pub fn bind(portal: &str, statement: &str, params: &[P<'_>]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(portal.as_bytes());
    body.push(0);
    body.extend_from_slice(statement.as_bytes());
    body.push(0);
    // Counts are unsigned 16-bit, as PostgreSQL reads them.
    let count = u16::try_from(params.len()).expect("at most 65535 parameters");
    body.extend_from_slice(&count.to_be_bytes());
    for p in params {
        body.extend_from_slice(&(matches!(p, P::Binary(_)) as i16).to_be_bytes());
    }
    body.extend_from_slice(&count.to_be_bytes());
    for p in params {
        match p {
            P::Null => body.extend_from_slice(&(-1i32).to_be_bytes()),
            P::Text(t) => {
                body.extend_from_slice(&(t.len() as i32).to_be_bytes());
                body.extend_from_slice(t.as_bytes());
            }
            P::Binary(b) => {
                body.extend_from_slice(&(b.len() as i32).to_be_bytes());
                body.extend_from_slice(b);
            }
        }
    }
    body.extend_from_slice(&0i16.to_be_bytes());
    encode_tagged(b'B', &body)
}

/// `Execute` bytes (no row limit).
pub fn execute(portal: &str) -> Vec<u8> {
    let mut body = portal.as_bytes().to_vec();
    body.push(0);
    body.extend_from_slice(&0i32.to_be_bytes());
    encode_tagged(b'E', &body)
}

/// `Close` of a prepared statement.
pub fn close_statement(name: &str) -> Vec<u8> {
    let mut body = vec![b'S'];
    body.extend_from_slice(name.as_bytes());
    body.push(0);
    encode_tagged(b'C', &body)
}

/// `Sync` bytes.
pub fn sync() -> Vec<u8> {
    encode_tagged(b'S', &[])
}

/// `FunctionCall` bytes with text arguments and a text result.
pub fn function_call(oid: i32, args: &[&str]) -> Vec<u8> {
    let mut body = oid.to_be_bytes().to_vec();
    body.extend_from_slice(&1i16.to_be_bytes());
    body.extend_from_slice(&0i16.to_be_bytes());
    body.extend_from_slice(&(args.len() as i16).to_be_bytes());
    for a in args {
        body.extend_from_slice(&(a.len() as i32).to_be_bytes());
        body.extend_from_slice(a.as_bytes());
    }
    body.extend_from_slice(&0i16.to_be_bytes());
    encode_tagged(b'F', &body)
}

/// Opens a session through the proxy (SSLRequest, startup) and reads the login.
pub async fn session(h: &crate::Harness, user: &UserCert, dbname: &str) -> TlsStream<TcpStream> {
    let cfg = client_config(h.data_dir(), Some(user), None);
    let mut s = ssl_request_tls(h.addrs().postgres, cfg).await.unwrap();
    send_startup(&mut s, &[("user", user.user.as_str()), ("database", dbname)]).await;
    let login = read_until_ready(&mut s).await;
    assert!(error_of(&login).is_none(), "login failed: {login:?}");
    s
}

/// Writes raw bytes and flushes.
pub async fn send<S: AsyncWriteExt + Unpin>(s: &mut S, bytes: &[u8]) {
    s.write_all(bytes).await.unwrap();
    s.flush().await.unwrap();
}

/// The text of the first column of every `DataRow` in `msgs`.
pub fn first_column(msgs: &[Msg]) -> Vec<String> {
    msgs.iter()
        .filter(|m| m.tag == b'D')
        .map(|m| {
            let len = i32::from_be_bytes([m.raw[7], m.raw[8], m.raw[9], m.raw[10]]);
            if len < 0 {
                "NULL".to_owned()
            } else {
                String::from_utf8_lossy(&m.raw[11..11 + len as usize]).into_owned()
            }
        })
        .collect()
}
