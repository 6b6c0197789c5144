//! The agent link: what `jitgate-agent` and the proxy's agent listener say to each other.
//!
//! One TLS connection per agent, dialled by the agent. It opens with a small versioned hello,
//! one line of JSON each way ([`Hello`], then [`Answer`]); after a `run` hello is accepted the
//! connection carries HTTP/2 (the `h2` crate), with the roles reversed: the proxy is the HTTP/2
//! client and opens one stream per session (`POST /connect/TARGET`), the agent is the server
//! and answers each with the target's bytes. HTTP/2 gives per-stream flow control, a reset
//! that ends one stream at once (`RST_STREAM`), and PING frames for keepalives on both sides.
//! [`H2Stream`] turns an HTTP/2 stream into a byte stream for the relay and the agent's pipes.
//!
//! A join token ([`JoinToken`]) carries the CA's SHA-256 fingerprint, so the agent pins the
//! proxy on its first contact, before it has any certificate.
//!
//! Replicas: an agent links to every replica of a cluster. It learns their agent listener
//! addresses from the `replicas` of the join and renewal answers, and from the list the proxy
//! sends on a live link (`POST /replicas`, [`encode_replicas`]). Only an agent that offers
//! [`ALPN_REPLICAS`] gets either: an older agent refuses answers with fields it does not know.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::str::FromStr;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The hello's version; an agent and a proxy that disagree refuse each other.
pub const VERSION: u32 = 1;
/// ALPN protocol id of the agent listener.
pub const ALPN: &[u8] = b"jitgate-agent/1";
/// ALPN protocol id an agent offers before [`ALPN`] when it takes the replica list: answers
/// with `replicas`, and `POST /replicas` streams on its link. A proxy that picks it may send
/// both; one that picks [`ALPN`] (or an older proxy, which knows only that) sends neither.
pub const ALPN_REPLICAS: &[u8] = b"jitgate-agent/1.1";
/// Most replica addresses an agent takes from one list; the rest are ignored.
pub const MAX_REPLICAS: usize = 64;
/// Longest hello line either side reads, newline included.
pub const MAX_HELLO: usize = 64 * 1024;
/// HTTP/2 path prefix of a stream to a target.
pub const CONNECT_PATH: &str = "/connect/";
/// HTTP/2 path of a stream that carries the replica list to the agent ([`encode_replicas`]).
pub const REPLICAS_PATH: &str = "/replicas";

/// What the agent asks for, first thing on the connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Hello {
    /// First contact, without a client certificate: a join token and a CSR for the agent's key.
    Join {
        v: u32,
        token: String,
        csr: String,
        version: String,
    },
    /// With the agent's certificate: a new certificate for a new key, before the old one ends.
    Renew { v: u32, csr: String, version: String },
    /// With the agent's certificate: serve these targets over this connection.
    Run {
        v: u32,
        targets: Vec<String>,
        version: String,
    },
}

impl Hello {
    pub fn version(&self) -> u32 {
        match self {
            Self::Join { v, .. } | Self::Renew { v, .. } | Self::Run { v, .. } => *v,
        }
    }
}

/// The proxy's answer to a hello. After an accepted `run`, HTTP/2 follows; after anything
/// else, the proxy closes the connection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Answer {
    pub v: u32,
    /// Why the hello was refused; `None` when accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// True when retrying cannot help (a spent token, a target not admitted).
    #[serde(default)]
    pub permanent: bool,
    /// The agent's name (join, renew).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The targets the agent was admitted for (join, renew, run).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<String>,
    /// The agent's new certificate, PEM (join, renew).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<String>,
    /// The CA certificate, PEM (join).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
    /// Where agents reach the replicas alive now (`host:port`, each replica's `[agents]
    /// advertise`), the answering one included (join, renew; only with [`ALPN_REPLICAS`]).
    /// Empty when the proxy is alone, older, or could not read its store: the agent then
    /// keeps the list it has.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<String>,
}

impl Answer {
    /// A refusal.
    pub fn refused(error: impl Into<String>, permanent: bool) -> Self {
        Self {
            v: VERSION,
            error: Some(error.into()),
            permanent,
            ..Self::default()
        }
    }
}

/// A hello line that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    #[error("hello longer than {MAX_HELLO} bytes")]
    TooLong,
    #[error("malformed hello: {0}")]
    Malformed(String),
    #[error("hello version {0} is not supported (this side speaks {VERSION})")]
    Version(u32),
}

/// One message as a line of JSON.
pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    // Serialising these plain structs cannot fail.
    let mut line = serde_json::to_vec(message).unwrap_or_default();
    line.push(b'\n');
    line
}

/// Reads one hello line (up to and without the newline) from `reader`, at most [`MAX_HELLO`]
/// bytes. Reads byte by byte from a buffered reader's buffer, so nothing after the newline is
/// consumed: HTTP/2 follows on the same stream.
pub async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(reader: &mut R) -> io::Result<Vec<u8>> {
    use tokio::io::AsyncBufReadExt as _;
    let mut line = Vec::new();
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if let Some(i) = buf.iter().position(|&b| b == b'\n') {
            line.extend_from_slice(&buf[..i]);
            reader.consume(i + 1);
            break;
        }
        let n = buf.len();
        line.extend_from_slice(buf);
        reader.consume(n);
        if line.len() >= MAX_HELLO {
            return Err(io::Error::new(io::ErrorKind::InvalidData, HelloError::TooLong));
        }
    }
    if line.len() >= MAX_HELLO {
        return Err(io::Error::new(io::ErrorKind::InvalidData, HelloError::TooLong));
    }
    Ok(line)
}

/// Parses a hello line, refusing other versions.
pub fn decode_hello(line: &[u8]) -> Result<Hello, HelloError> {
    let hello: Hello = serde_json::from_slice(line).map_err(|e| HelloError::Malformed(e.to_string()))?;
    if hello.version() != VERSION {
        return Err(HelloError::Version(hello.version()));
    }
    Ok(hello)
}

/// Parses an answer line, refusing other versions.
pub fn decode_answer(line: &[u8]) -> Result<Answer, HelloError> {
    let answer: Answer = serde_json::from_slice(line).map_err(|e| HelloError::Malformed(e.to_string()))?;
    if answer.v != VERSION {
        return Err(HelloError::Version(answer.v));
    }
    Ok(answer)
}

/// The body of a `POST /replicas` stream: the replica list as JSON.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplicaList {
    replicas: Vec<String>,
}

/// The body of a `POST /replicas` stream.
pub fn encode_replicas(replicas: &[String]) -> Vec<u8> {
    encode(&ReplicaList {
        replicas: replicas.to_vec(),
    })
}

/// Parses a `POST /replicas` body (at most [`MAX_HELLO`] bytes, trailing newline allowed).
pub fn decode_replicas(body: &[u8]) -> Result<Vec<String>, HelloError> {
    if body.len() > MAX_HELLO {
        return Err(HelloError::TooLong);
    }
    let list: ReplicaList = serde_json::from_slice(body).map_err(|e| HelloError::Malformed(e.to_string()))?;
    Ok(list.replicas)
}

/// Whether `addr` is a `host:port` an agent can dial: a host name, an IPv4 address or a
/// bracketed IPv6 address, and a port from 1 to 65535. No scheme, path or whitespace.
pub fn is_host_port(addr: &str) -> bool {
    let Some((host, port)) = addr.rsplit_once(':') else {
        return false;
    };
    let port_ok = port.parse::<u16>().is_ok_and(|p| p != 0) && port.bytes().all(|b| b.is_ascii_digit());
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => {
            !host.is_empty()
                && host.len() <= 253
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        }
    };
    port_ok && host_ok
}

/// A one-time join token: `jgj1.ID.SECRET.CA_SHA256`. The id finds the token in the store, the
/// secret proves it (the store keeps only its hash), the fingerprint pins the proxy's CA.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub id: String,
    pub secret: String,
    /// SHA-256 of the CA certificate's DER, lower-case hex.
    pub ca_sha256: String,
}

const TOKEN_PREFIX: &str = "jgj1";

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{TOKEN_PREFIX}.{}.{}.{}", self.id, self.secret, self.ca_sha256)
    }
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the secret.
        f.debug_struct("JoinToken")
            .field("id", &self.id)
            .field("ca_sha256", &self.ca_sha256)
            .finish_non_exhaustive()
    }
}

impl FromStr for JoinToken {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (id, secret, ca_sha256) = parse_pinned(TOKEN_PREFIX, "join token", s)?;
        Ok(Self { id, secret, ca_sha256 })
    }
}

/// `PREFIX.ID.SECRET.FINGERPRINT`, the shape of join tokens and invite codes.
fn parse_pinned(prefix: &str, what: &str, s: &str) -> Result<(String, String, String), String> {
    let bad = || format!("not a jitgate {what} ({prefix}.ID.SECRET.FINGERPRINT)");
    let mut parts = s.trim().split('.');
    let (Some(p), Some(id), Some(secret), Some(fp), None) =
        (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    let word = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if p != prefix || !word(id) || !word(secret) || fp.len() != 64 || !fp.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    Ok((id.to_owned(), secret.to_owned(), fp.to_ascii_lowercase()))
}

/// A one-time invite code for `jitgate login --invite`: `jgi1.ID.SECRET.CA_SHA256`, made like
/// a join token (the store keeps the secret's hash; the fingerprint pins the proxy's CA).
#[derive(Clone, PartialEq, Eq)]
pub struct InviteCode {
    pub id: String,
    pub secret: String,
    /// SHA-256 of the CA certificate's DER, lower-case hex.
    pub ca_sha256: String,
}

const INVITE_PREFIX: &str = "jgi1";

impl fmt::Display for InviteCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{INVITE_PREFIX}.{}.{}.{}", self.id, self.secret, self.ca_sha256)
    }
}

impl fmt::Debug for InviteCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the secret.
        f.debug_struct("InviteCode")
            .field("id", &self.id)
            .field("ca_sha256", &self.ca_sha256)
            .finish_non_exhaustive()
    }
}

impl FromStr for InviteCode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (id, secret, ca_sha256) = parse_pinned(INVITE_PREFIX, "invite code", s)?;
        Ok(Self { id, secret, ca_sha256 })
    }
}

/// The error a stream of a lost link reads with: the whole connection to the agent failed
/// (killed, blackholed, replaced), not just this stream. Carried inside an `io::Error`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the link to agent {agent} was lost")]
pub struct LinkLost {
    pub agent: String,
}

/// The agent whose link was lost, when `e` says so.
pub fn link_lost(e: &io::Error) -> Option<&str> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<LinkLost>())
        .map(|l| l.agent.as_str())
}

/// An HTTP/2 stream as a byte stream. Dropping it before the end resets the stream
/// (`RST_STREAM CANCEL`), which the other side reads as an error at once.
pub struct H2Stream {
    send: h2::SendStream<Bytes>,
    recv: h2::RecvStream,
    /// Received and not yet read.
    pending: Bytes,
    /// Who is at the other end, for [`LinkLost`].
    peer: String,
    eof: bool,
}

impl fmt::Debug for H2Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("H2Stream")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl H2Stream {
    /// `peer` names the agent (on the proxy) or the proxy (on the agent) in errors.
    pub fn new(send: h2::SendStream<Bytes>, recv: h2::RecvStream, peer: impl Into<String>) -> Self {
        Self {
            send,
            recv,
            pending: Bytes::new(),
            peer: peer.into(),
            eof: false,
        }
    }

    fn error(&self, e: h2::Error) -> io::Error {
        if e.is_reset() {
            // This stream only: the other side ended it.
            io::Error::new(io::ErrorKind::ConnectionReset, e)
        } else {
            io::Error::new(
                io::ErrorKind::ConnectionAborted,
                LinkLost {
                    agent: self.peer.clone(),
                },
            )
        }
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while this.pending.is_empty() {
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // The window opens again as soon as the bytes are ours.
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    this.pending = data;
                }
                Some(Err(e)) => return Poll::Ready(Err(this.error(e))),
                None => this.eof = true,
            }
        }
        let n = this.pending.len().min(buf.remaining());
        buf.put_slice(&this.pending[..n]);
        this.pending.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let this = &mut *self;
        let mut capacity = this.send.capacity();
        while capacity == 0 {
            this.send.reserve_capacity(buf.len());
            match ready!(this.send.poll_capacity(cx)) {
                Some(Ok(n)) => capacity = n,
                Some(Err(e)) => return Poll::Ready(Err(this.error(e))),
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            }
        }
        let n = capacity.min(buf.len());
        if let Err(e) = this.send.send_data(Bytes::copy_from_slice(&buf[..n]), false) {
            return Poll::Ready(Err(this.error(e)));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Frames queued by `send_data` leave as the connection task writes them.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match this.send.send_data(Bytes::new(), true) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(this.error(e))),
        }
    }
}

/// How a keepalive loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepaliveEnd {
    /// No pong for the whole timeout: the link is dead (or blackholed).
    TimedOut,
    /// The connection ended under the ping (its driver sees why).
    Closed,
}

/// Pings the peer every `interval` and returns when no pong has come back for `timeout`
/// since the last one (or since the start): a link whose packets are dropped is noticed
/// within `timeout`. The connection must be polled meanwhile by its own task.
pub async fn keepalive(
    mut ping: h2::PingPong,
    interval: std::time::Duration,
    timeout: std::time::Duration,
) -> KeepaliveEnd {
    use tokio::time::{sleep_until, Instant};
    let mut last = Instant::now();
    loop {
        let next = (last + interval).min(last + timeout);
        sleep_until(next).await;
        tokio::select! {
            pong = ping.ping(h2::Ping::opaque()) => match pong {
                Ok(_) => last = Instant::now(),
                Err(_) => return KeepaliveEnd::Closed,
            },
            () = sleep_until(last + timeout) => return KeepaliveEnd::TimedOut,
        }
    }
}

/// SHA-256 of `der`, lower-case hex: the fingerprint a join token pins.
pub fn fingerprint(der: &[u8]) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(der);
    let mut out = String::with_capacity(64);
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_bad_ones_are_refused() {
        let t = JoinToken {
            id: "at-0123".into(),
            secret: "s3cr3t_-x".into(),
            ca_sha256: "ab".repeat(32),
        };
        let s = t.to_string();
        assert_eq!(s.parse::<JoinToken>().unwrap(), t);
        assert!(!format!("{t:?}").contains("s3cr3t"), "Debug shows no secret");
        for bad in [
            "",
            "jgj1.a.b",
            "jgj2.a.b.".to_owned().as_str(),
            &format!("jgj1.a.b.{}", "g".repeat(64)),
            &format!("jgj1.a.b.{}", "a".repeat(63)),
            &format!("jgj1.a b.c.{}", "a".repeat(64)),
            &format!("jgj1.a.b.{}.x", "a".repeat(64)),
            &format!("jgj1..b.{}", "a".repeat(64)),
        ] {
            assert!(bad.parse::<JoinToken>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn hellos_round_trip_and_other_versions_or_fields_are_refused() {
        let h = Hello::Run {
            v: VERSION,
            targets: vec!["prod-db".into()],
            version: "0.1.0".into(),
        };
        let line = encode(&h);
        assert_eq!(line.last(), Some(&b'\n'));
        assert_eq!(decode_hello(&line[..line.len() - 1]).unwrap(), h);
        assert!(matches!(
            decode_hello(br#"{"kind":"run","v":2,"targets":[],"version":"x"}"#),
            Err(HelloError::Version(2))
        ));
        assert!(decode_hello(br#"{"kind":"run","v":1,"targets":[],"version":"x","extra":1}"#).is_err());
        assert!(decode_hello(br#"{"kind":"sudo","v":1}"#).is_err());
        assert!(decode_hello(b"\xff\xfe").is_err());
        let a = Answer::refused("no", true);
        let line = encode(&a);
        assert_eq!(decode_answer(&line[..line.len() - 1]).unwrap(), a);
    }

    #[test]
    fn answers_carry_the_replicas_and_answers_without_them_still_parse() {
        let a = Answer {
            v: VERSION,
            name: Some("db-east".into()),
            cert: Some("PEM".into()),
            replicas: vec!["jg-1.internal:8444".into(), "10.0.0.2:8444".into()],
            ..Answer::default()
        };
        let line = encode(&a);
        assert!(String::from_utf8_lossy(&line).contains(r#""replicas":["jg-1.internal:8444","10.0.0.2:8444"]"#));
        assert_eq!(decode_answer(&line[..line.len() - 1]).unwrap(), a);
        // An answer of a proxy from before replicas (or alone): no field, an empty list.
        let old = decode_answer(br#"{"v":1,"name":"db-east","targets":["prod-db"],"cert":"PEM"}"#).unwrap();
        assert!(old.replicas.is_empty());
        assert_eq!(old.name.as_deref(), Some("db-east"));
        // And an empty list is not sent, so such an answer is what an older agent expects.
        let alone = encode(&Answer {
            v: VERSION,
            name: Some("db-east".into()),
            ..Answer::default()
        });
        assert!(!String::from_utf8_lossy(&alone).contains("replicas"));
    }

    #[test]
    fn replica_lists_round_trip_and_bad_addresses_are_told_apart() {
        let list = vec!["a.internal:8444".to_owned(), "[::1]:8444".to_owned()];
        let body = encode_replicas(&list);
        assert_eq!(decode_replicas(&body).unwrap(), list);
        assert!(decode_replicas(br#"{"replicas":[],"more":1}"#).is_err());
        assert!(decode_replicas(&vec![b' '; MAX_HELLO + 1]).is_err());
        for good in ["a.internal:8444", "10.0.0.2:1", "[fe80::1]:65535", "jg_1:8444"] {
            assert!(is_host_port(good), "{good}");
        }
        for bad in [
            "",
            "a",
            "a:",
            ":8444",
            "a:0",
            "a:65536",
            "a:+1",
            "a b:1",
            "http://a:1",
            "a/b:1",
            "[zz]:1",
            "::1:8444",
        ] {
            assert!(!is_host_port(bad), "{bad}");
        }
    }

    #[tokio::test]
    async fn hello_lines_are_bounded_and_leave_what_follows() {
        let mut input: &[u8] = b"{\"a\":1}\nPRI * HTTP/2.0";
        let mut reader = tokio::io::BufReader::new(&mut input);
        assert_eq!(read_line(&mut reader).await.unwrap(), b"{\"a\":1}");
        let mut rest = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut rest)
            .await
            .unwrap();
        assert_eq!(rest, b"PRI * HTTP/2.0");

        let long = vec![b'x'; MAX_HELLO + 10];
        let mut input: &[u8] = &long;
        let mut reader = tokio::io::BufReader::new(&mut input);
        assert_eq!(
            read_line(&mut reader).await.unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        let mut input: &[u8] = b"no newline";
        let mut reader = tokio::io::BufReader::new(&mut input);
        assert_eq!(
            read_line(&mut reader).await.unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }
}
