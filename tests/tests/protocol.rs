//! Protocol corners after login, sent as raw bytes through the real proxy: message types no
//! client may send, lengths below the header, the widest `Bind`, and how every connection the
//! proxy ends over TLS is closed (`close_notify`, then EOF).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use jitgate_protocol::postgres::frontend::{encode_ssl_request, encode_startup, encode_tagged};
use jitgate_tests::jitgate::model::AccessLevel;
use jitgate_tests::raw::{self, error_of, first_column, read_to_end, read_until_ready, send, P};
use jitgate_tests::{Harness, Options};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const HOUR: Duration = Duration::from_secs(3600);

/// Statement texts the audit log has seen.
fn audited_texts(h: &Harness) -> Vec<String> {
    h.audit_events("statement")
        .iter()
        .map(|e| e["text"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_startup_message_after_login_is_refused_by_its_type() {
    let h = Harness::start().await;
    let alice = h.user("alice", &["dev"]);
    h.grant("alice", "prod-db", AccessLevel::Read, HOUR).await;
    let mut s = raw::session(&h, &alice, "prod-db").await;
    // A StartupMessage and a Query behind it, in one write. Read as a tagged message, the
    // startup's first byte (0) would be a type and its next four bytes a length of 9,472, and
    // the Query would vanish inside it.
    let mut bytes = encode_startup(&[("user", "alice"), ("database", "prod-db")]);
    bytes.extend_from_slice(&encode_tagged(b'Q', b"SELECT 'behind the startup'\0"));
    send(&mut s, &bytes).await;
    let ending = tokio::time::timeout(Duration::from_secs(10), read_to_end(&mut s))
        .await
        .expect("the proxy must answer at once, not wait for 9,472 bytes");
    let (code, message) = error_of(&ending.msgs).expect("an ErrorResponse");
    assert_eq!(code, "08P01");
    assert_eq!(message, "jitgate: invalid frontend message type 0");
    assert_eq!(ending.end, Ok(()), "closed with close_notify");
    assert!(!audited_texts(&h).iter().any(|t| t.contains("behind the startup")));
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_types_and_lengths_below_four_are_refused() {
    let h = Harness::start().await;
    let alice = h.user("alice", &["dev"]);
    h.grant("alice", "prod-db", AccessLevel::Read, HOUR).await;
    // Types no client may send after login: a password message, a backend type, garbage.
    // Each is refused from its first byte, whatever length follows.
    for tag in [b'p', b'Z', 0xff] {
        let mut s = raw::session(&h, &alice, "prod-db").await;
        send(&mut s, &[tag, 0x7f, 0xff, 0xff, 0xff]).await;
        let ending = read_to_end(&mut s).await;
        let (code, message) = error_of(&ending.msgs).expect("an ErrorResponse");
        assert_eq!(code, "08P01", "type {tag}");
        assert_eq!(message, format!("jitgate: invalid frontend message type {tag}"));
        assert_eq!(ending.end, Ok(()), "type {tag}");
    }
    // A length below 4 cannot even hold itself: malformed, not "too large".
    for len in 0u8..4 {
        let mut s = raw::session(&h, &alice, "prod-db").await;
        send(&mut s, &[b'Q', 0, 0, 0, len]).await;
        let ending = read_to_end(&mut s).await;
        let (code, message) = error_of(&ending.msgs).expect("an ErrorResponse");
        assert_eq!(code, "08P01", "length {len}");
        assert_eq!(message, format!("jitgate: malformed message: length {len} is below 4"));
    }
    // The listener and the grant are fine afterwards.
    assert!(h.psql(&alice, "prod-db", "SELECT 1").await.success);
}

#[tokio::test(flavor = "multi_thread")]
async fn bind_carries_up_to_65535_parameters() {
    let h = Harness::start().await;
    let alice = h.user("alice", &["dev"]);
    h.grant("alice", "prod-db", AccessLevel::Read, HOUR).await;
    let mut s = raw::session(&h, &alice, "prod-db").await;
    // PostgreSQL reads parameter counts as unsigned 16-bit: 65,535 is the most a Bind holds.
    const N: u16 = u16::MAX;
    let mut parse = b"wide\0SELECT $65535::int\0".to_vec();
    parse.extend_from_slice(&N.to_be_bytes());
    for _ in 0..N {
        parse.extend_from_slice(&23u32.to_be_bytes()); // int4
    }
    let params: Vec<P<'_>> = (0..N).map(|_| P::Text("7")).collect();
    let mut batch = encode_tagged(b'P', &parse);
    batch.extend_from_slice(&raw::bind("", "wide", &params));
    batch.extend_from_slice(&raw::execute(""));
    batch.extend_from_slice(&raw::sync());
    send(&mut s, &batch).await;
    let msgs = read_until_ready(&mut s).await;
    assert!(error_of(&msgs).is_none(), "{:?}", error_of(&msgs));
    assert_eq!(first_column(&msgs), ["7"]);
    let record = h
        .audit_events("statement")
        .into_iter()
        .find(|e| e["text"] == "SELECT $65535::int")
        .expect("the statement was audited");
    assert_eq!(record["params"].as_array().map(Vec::len), Some(usize::from(N)));
}

/// Connects to the API over TLS as `user` and sends one request that closes the connection.
async fn api_request(
    h: &Harness,
    user: &jitgate_tests::UserCert,
    request: &str,
) -> (String, Result<(), std::io::ErrorKind>) {
    let cfg = raw::client_config(h.data_dir(), Some(user), Some(b"http/1.1"));
    let tcp = tokio::net::TcpStream::connect(h.addrs().api).await.unwrap();
    let mut s = tokio_rustls::TlsConnector::from(cfg)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut body = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        match s.read(&mut chunk).await {
            Ok(0) => break Ok(()),
            Ok(n) => body.extend_from_slice(&chunk[..n]),
            Err(e) => break Err(e.kind()),
        }
    };
    (String::from_utf8_lossy(&body).into_owned(), end)
}

#[tokio::test(flavor = "multi_thread")]
async fn every_tls_connection_the_proxy_ends_gets_close_notify() {
    let h = Harness::start_with(Options {
        handshake_timeout: Some("2s"),
        ..Default::default()
    })
    .await;
    let alice = h.user("alice", &["dev"]);
    let grant = h.grant("alice", "prod-db", AccessLevel::Read, HOUR).await;
    let cfg = raw::client_config(h.data_dir(), Some(&alice), None);

    // Normal end: the client sends Terminate.
    let mut s = raw::session(&h, &alice, "prod-db").await;
    send(&mut s, &encode_tagged(b'X', &[])).await;
    assert_eq!(read_to_end(&mut s).await.end, Ok(()), "after Terminate");

    // Protocol error.
    let mut s = raw::session(&h, &alice, "prod-db").await;
    send(&mut s, &[0, 0, 0, 0, 8]).await;
    let ending = read_to_end(&mut s).await;
    assert_eq!(error_of(&ending.msgs).map(|e| e.0), Some("08P01".to_owned()));
    assert_eq!(ending.end, Ok(()), "after a protocol error");

    // Refusals after TLS: at startup (no grant), and in the startup message itself.
    let bob = h.user("bob", &["dev"]);
    let mut s = raw::ssl_request_tls(h.addrs().postgres, raw::client_config(h.data_dir(), Some(&bob), None))
        .await
        .unwrap();
    raw::send_startup(&mut s, &[("user", "bob"), ("database", "prod-db")]).await;
    let ending = read_to_end(&mut s).await;
    assert_eq!(error_of(&ending.msgs).map(|e| e.0), Some("28000".to_owned()));
    assert_eq!(ending.end, Ok(()), "after a startup refusal");
    let mut s = raw::ssl_request_tls(h.addrs().postgres, cfg.clone()).await.unwrap();
    send(&mut s, &encode_ssl_request()).await;
    let ending = read_to_end(&mut s).await;
    assert_eq!(error_of(&ending.msgs).map(|e| e.0), Some("08P01".to_owned()));
    assert_eq!(ending.end, Ok(()), "after an encryption request inside TLS");

    // A client that finishes TLS but never sends its startup message.
    let mut s = raw::ssl_request_tls(h.addrs().postgres, cfg.clone()).await.unwrap();
    let ending = read_to_end(&mut s).await;
    assert!(ending.msgs.is_empty());
    assert_eq!(ending.end, Ok(()), "at the handshake deadline");

    // A cut.
    let mut s = raw::session(&h, &alice, "prod-db").await;
    h.admin().revoke_grant(grant.id.as_str()).await.unwrap();
    let ending = read_to_end(&mut s).await;
    assert_eq!(error_of(&ending.msgs).map(|e| e.0), Some("57P01".to_owned()));
    assert_eq!(ending.end, Ok(()), "after a cut");

    // The API listener: a request that closes the connection, and an unknown route.
    let admin = jitgate_tests::UserCert {
        user: "admin".into(),
        cert: h.data_dir().join("admin.crt"),
        key: h.data_dir().join("admin.key"),
        ca: h.data_dir().join("ca.crt"),
    };
    for path in ["/v1/whoami", "/nowhere"] {
        let (body, end) = api_request(
            &h,
            &admin,
            &format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert!(body.starts_with("HTTP/1.1 "), "{body}");
        assert_eq!(end, Ok(()), "API {path}");
    }
}
