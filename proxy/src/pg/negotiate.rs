//! Connection negotiation, in two steps with the connection budgets between them:
//! [`handshake`] up to a verified TLS session with a jitgate certificate, then [`startup`] for
//! the `StartupMessage` (or a `CancelRequest`) inside it.
//!
//! States: plaintext (accepts `SSLRequest`, `GSSENCRequest`, `CancelRequest`; refuses a
//! plaintext `StartupMessage`) -> TLS (classic upgrade or direct TLS detected by the first
//! byte being a TLS handshake record) -> startup. Bytes that arrive with an `SSLRequest` are
//! an error: they would otherwise be read as if they had come through TLS.
//!
//! A refusal here is written and the connection closed ([`close`]) before the error is
//! returned; the caller only counts it.

use std::sync::Arc;

use bytes::BytesMut;
use jitgate_protocol::postgres::backend::{self, Report, Severity};
use jitgate_protocol::postgres::frontend::{decode_startup, peek_startup_len, StartupRequest};
use jitgate_protocol::postgres::ProtocolError;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use super::close::{close, ClientStream, CLOSE_BOUND};
use crate::pki::{identity_from_der, Identity};
use crate::tls::{failure_reason, ALPN_POSTGRESQL};

/// First byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// A client that passed TLS with a jitgate certificate.
pub struct Accepted {
    pub tls: TlsStream<TcpStream>,
    pub identity: Identity,
}

/// What the client sent inside TLS.
pub enum Startup {
    /// A protocol 3.0 `StartupMessage`, and the bytes the client sent after it (pipelined
    /// queries), to be relayed.
    Session {
        params: Vec<(String, String)>,
        leftover: BytesMut,
    },
    /// A `CancelRequest` (libpq sends it inside TLS when the session used TLS).
    Cancel { process_id: i32, secret_key: i32 },
}

/// Why negotiation stopped.
#[derive(Debug, thiserror::Error)]
pub enum NegotiateError {
    /// The client went away or sent nothing usable; already answered and closed.
    #[error("client: {0}")]
    Client(String),
    /// TLS handshake failed, or its certificate is no identity; labelled for metrics.
    #[error("TLS handshake failed ({reason}): {message}")]
    Handshake { reason: &'static str, message: String },
    /// A plaintext cancel request (handled by the caller).
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

/// A FATAL `ErrorResponse`.
pub fn fatal(code: &str, message: &str, hint: Option<&str>) -> Vec<u8> {
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

/// Answers `fatal` and closes, within [`CLOSE_BOUND`].
async fn refuse<S: ClientStream>(stream: &mut S, fatal: &[u8]) {
    close(stream, fatal, Instant::now() + CLOSE_BOUND).await;
}

const TLS_HINT: &str = "connect with sslmode=verify-full sslrootcert=ca.crt sslcert=USER.crt sslkey=USER.key";

/// Negotiates TLS on a fresh connection and checks the client certificate.
pub async fn handshake(
    mut tcp: TcpStream,
    acceptor: TlsAcceptor,
    max_startup: usize,
) -> Result<Accepted, NegotiateError> {
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
                        refuse(
                            &mut tcp,
                            &fatal("08P01", "received unencrypted data after SSL request", None),
                        )
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
                    refuse(&mut tcp, &msg).await;
                    return Err(client("plaintext startup refused"));
                }
                Err(e) => {
                    refuse(&mut tcp, &fatal("08P01", &format!("invalid startup packet: {e}"), None)).await;
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
        refuse(
            &mut tls,
            &fatal("08P01", "direct TLS requires ALPN \"postgresql\"", None),
        )
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
        refuse(&mut tls, &[]).await;
        return Err(NegotiateError::Handshake {
            reason: "no_certificate",
            message: "no client certificate".into(),
        });
    };
    match identity_from_der(&der) {
        Ok(identity) => Ok(Accepted { tls, identity }),
        Err(e) => {
            refuse(
                &mut tls,
                &fatal("28000", &format!("client certificate refused: {e}"), None),
            )
            .await;
            Err(NegotiateError::Handshake {
                reason: "bad_certificate",
                message: e.to_string(),
            })
        }
    }
}

/// Reads the `StartupMessage` (or `CancelRequest`) inside TLS. Only protocol 3.0 is accepted.
pub async fn startup(tls: &mut TlsStream<TcpStream>, max_startup: usize) -> Result<Startup, NegotiateError> {
    let mut buf = BytesMut::with_capacity(512);
    let req = read_startup(tls, &mut buf, max_startup).await.map_err(client)?;
    let refusal = match req {
        Ok(StartupRequest::Startup {
            minor_version: 0,
            params,
        }) => return Ok(Startup::Session { params, leftover: buf }),
        Ok(StartupRequest::Cancel { process_id, secret_key }) => {
            return Ok(Startup::Cancel { process_id, secret_key });
        }
        Ok(StartupRequest::Startup { minor_version, .. }) => (
            "0A000",
            format!("unsupported frontend protocol 3.{minor_version}: jitgate speaks 3.0"),
        ),
        Ok(StartupRequest::Ssl | StartupRequest::GssEnc) => ("08P01", "encryption request inside TLS".to_owned()),
        Err(e) => ("08P01", format!("invalid startup packet: {e}")),
    };
    let (code, message) = refusal;
    refuse(tls, &fatal(code, &message, None)).await;
    Err(client(message))
}

/// Shared acceptor type.
pub fn acceptor(cfg: &Arc<rustls::ServerConfig>) -> TlsAcceptor {
    TlsAcceptor::from(Arc::clone(cfg))
}
