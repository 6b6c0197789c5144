//! Connection negotiation up to a verified TLS session and a decoded `StartupMessage`.
//!
//! States: plaintext (accepts `SSLRequest`, `GSSENCRequest`, `CancelRequest`; refuses a
//! plaintext `StartupMessage`) -> TLS (classic upgrade or direct TLS detected by the first
//! byte being a TLS handshake record) -> startup. Bytes that arrive with an `SSLRequest` are
//! an error: they would otherwise be read as if they had come through TLS.

use std::sync::Arc;

use bytes::BytesMut;
use jitgate_protocol::postgres::backend::{self, Report, Severity};
use jitgate_protocol::postgres::frontend::{decode_startup, peek_startup_len, StartupRequest};
use jitgate_protocol::postgres::ProtocolError;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::pki::{identity_from_der, Identity};
use crate::tls::{failure_reason, ALPN_POSTGRESQL};

/// First byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// A client that passed TLS with a jitgate certificate and sent a `StartupMessage`.
pub struct Negotiated {
    pub tls: TlsStream<TcpStream>,
    pub identity: Identity,
    pub params: Vec<(String, String)>,
    /// Bytes the client sent after its startup message (pipelined queries), to be relayed.
    pub leftover: BytesMut,
}

/// Why negotiation stopped.
#[derive(Debug, thiserror::Error)]
pub enum NegotiateError {
    /// The client went away or sent nothing usable; already answered where possible.
    #[error("client: {0}")]
    Client(String),
    /// TLS handshake failed, labelled for metrics.
    #[error("TLS handshake failed ({reason}): {message}")]
    Handshake { reason: &'static str, message: String },
    /// A cancel request (handled by the caller).
    #[error("cancel request")]
    Cancel { process_id: i32, secret_key: i32 },
}

fn client(msg: impl std::fmt::Display) -> NegotiateError {
    NegotiateError::Client(msg.to_string())
}

/// Reads one startup-phase message from `io`, buffering in `buf`.
async fn read_startup<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
    max: usize,
) -> Result<Result<StartupRequest, ProtocolError>, std::io::Error> {
    loop {
        match peek_startup_len(buf, max) {
            Err(e) => return Ok(Err(e)),
            Ok(Some(len)) if buf.len() >= len => {
                let msg = buf.split_to(len);
                return Ok(decode_startup(&msg));
            }
            Ok(_) => {
                if io.read_buf(buf).await? == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
            }
        }
    }
}

fn fatal(code: &str, message: &str, hint: Option<&str>) -> Vec<u8> {
    backend::error_response(
        Severity::Fatal,
        &Report {
            sqlstate: code,
            message,
            detail: None,
            hint,
        },
    )
}

const TLS_HINT: &str = "connect with sslmode=verify-full sslrootcert=ca.crt sslcert=USER.crt sslkey=USER.key";

/// Runs negotiation on a fresh connection.
pub async fn negotiate(
    mut tcp: TcpStream,
    acceptor: TlsAcceptor,
    max_startup: usize,
) -> Result<Negotiated, NegotiateError> {
    let mut first = [0u8; 1];
    let n = tcp.peek(&mut first).await.map_err(client)?;
    if n == 0 {
        return Err(client("closed before sending anything"));
    }
    let direct = first[0] == TLS_HANDSHAKE;
    if !direct {
        let mut buf = BytesMut::with_capacity(64);
        loop {
            let req = read_startup(&mut tcp, &mut buf, max_startup).await.map_err(client)?;
            match req {
                Ok(StartupRequest::Ssl) => {
                    if !buf.is_empty() {
                        let _ = tcp
                            .write_all(&fatal("08P01", "received unencrypted data after SSL request", None))
                            .await;
                        return Err(client("unencrypted data after SSLRequest"));
                    }
                    tcp.write_all(b"S").await.map_err(client)?;
                    break;
                }
                Ok(StartupRequest::GssEnc) => tcp.write_all(b"N").await.map_err(client)?,
                Ok(StartupRequest::Cancel { process_id, secret_key }) => {
                    return Err(NegotiateError::Cancel { process_id, secret_key });
                }
                Ok(StartupRequest::Startup { .. }) => {
                    let msg = fatal(
                        "28000",
                        "jitgate accepts only TLS connections with a client certificate",
                        Some(TLS_HINT),
                    );
                    let _ = tcp.write_all(&msg).await;
                    return Err(client("plaintext startup refused"));
                }
                Err(e) => {
                    let _ = tcp
                        .write_all(&fatal("08P01", &format!("invalid startup packet: {e}"), None))
                        .await;
                    return Err(client(e));
                }
            }
        }
    }

    let mut tls = acceptor.accept(tcp).await.map_err(|e| NegotiateError::Handshake {
        reason: failure_reason(&e),
        message: e.to_string(),
    })?;
    let (_, conn) = tls.get_ref();
    let alpn = conn.alpn_protocol();
    if direct && alpn != Some(ALPN_POSTGRESQL) {
        // PostgreSQL 17 requires ALPN for direct TLS; so do we.
        let _ = tls
            .write_all(&fatal("08P01", "direct TLS requires ALPN \"postgresql\"", None))
            .await;
        return Err(NegotiateError::Handshake {
            reason: "alpn",
            message: "direct TLS without ALPN".into(),
        });
    }
    let der = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.as_ref().to_vec());
    let Some(der) = der else {
        return Err(NegotiateError::Handshake {
            reason: "no_certificate",
            message: "no client certificate".into(),
        });
    };
    let identity = match identity_from_der(&der) {
        Ok(id) => id,
        Err(e) => {
            let _ = tls
                .write_all(&fatal("28000", &format!("client certificate refused: {e}"), None))
                .await;
            return Err(NegotiateError::Handshake {
                reason: "bad_certificate",
                message: e.to_string(),
            });
        }
    };

    let mut buf = BytesMut::with_capacity(512);
    let req = read_startup(&mut tls, &mut buf, max_startup).await.map_err(client)?;
    match req {
        Ok(StartupRequest::Startup {
            minor_version: 0,
            params,
        }) => Ok(Negotiated {
            tls,
            identity,
            params,
            leftover: buf,
        }),
        Ok(StartupRequest::Startup { minor_version, .. }) => {
            let msg = format!("unsupported frontend protocol 3.{minor_version}: jitgate speaks 3.0");
            let _ = tls.write_all(&fatal("0A000", &msg, None)).await;
            Err(client(msg))
        }
        Ok(StartupRequest::Cancel { process_id, secret_key }) => Err(NegotiateError::Cancel { process_id, secret_key }),
        Ok(StartupRequest::Ssl | StartupRequest::GssEnc) => {
            let _ = tls
                .write_all(&fatal("08P01", "encryption request inside TLS", None))
                .await;
            Err(client("encryption request inside TLS"))
        }
        Err(e) => {
            let _ = tls
                .write_all(&fatal("08P01", &format!("invalid startup packet: {e}"), None))
                .await;
            Err(client(e))
        }
    }
}

/// Shared acceptor type.
pub fn acceptor(cfg: &Arc<rustls::ServerConfig>) -> TlsAcceptor {
    TlsAcceptor::from(Arc::clone(cfg))
}
