//! The relay's framing of client bytes, and how a cut ends the client stream.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use jitgate_protocol::postgres::ProtocolError;
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

use super::{complete_prefix, frame_error, relay, RelayContext, RelayEnd};
use crate::audit::{AuditLog, SessionEndReason};
use crate::config::AuditConfig;
use crate::metrics::Metrics;
use crate::model::{AccessLevel, GrantId, SessionId, SessionMeta, TargetName, UserName};
use crate::pg::guard::Guard;
use crate::pg::statements::{TextLimits, Tracker};
use crate::sessions::{NewSession, Sessions};

#[test]
fn complete_prefix_stops_at_partial_messages_and_refuses_bad_frames() {
    let mut b = b"Q\0\0\0\x09abcd\0".to_vec();
    assert_eq!(complete_prefix(&b, 1024), Ok(10));
    b.extend_from_slice(b"S\0\0");
    assert_eq!(complete_prefix(&b, 1024), Ok(10));
    assert!(matches!(
        complete_prefix(b"Q\x7f\0\0\0", 1024),
        Err(ProtocolError::TooLong { .. })
    ));
    // Behind a whole message, a second StartupMessage is refused by its first byte.
    let mut b = b"S\0\0\0\x04".to_vec();
    b.push(0);
    assert_eq!(complete_prefix(&b, 1024), Err(ProtocolError::UnknownType(0)));
    assert_eq!(
        frame_error(&ProtocolError::UnknownType(0)),
        "jitgate: invalid frontend message type 0"
    );
}

#[tokio::test]
async fn a_cut_sends_the_fatal_and_closes_the_client_stream_before_the_relay_returns() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Metrics::new();
    let config = AuditConfig {
        path: dir.path().join("audit.jsonl"),
        tip_path: dir.path().join("audit.tip"),
        max_file_bytes: 100 << 20,
        fsync_interval: Duration::from_millis(20),
        queue_depth: 1024,
        max_statement_bytes: 65_536,
        max_param_bytes: 256,
        redact_params_matching: Vec::new(),
        replica: None,
    };
    let audit = AuditLog::open(&config, Arc::clone(&metrics)).unwrap();
    let meta = SessionMeta {
        id: SessionId::generate(),
        grant_id: GrantId::generate(),
        user: UserName::new("alice").unwrap(),
        roles: Vec::new(),
        target: TargetName::new("prod-db").unwrap(),
        database: "app".into(),
        access: AccessLevel::Read,
        client_addr: "127.0.0.1:5555".parse().unwrap(),
        upstream_role: "jit_reader".into(),
    };
    let sessions = Arc::new(Sessions::default());
    let registration = sessions.register(NewSession {
        meta: meta.clone(),
        cut_parent: CancellationToken::new(),
    });
    let limits = TextLimits {
        max_statement_bytes: 1024,
        max_param_bytes: 64,
        redact_params_matching: Vec::new(),
    };
    let mut tracker = Tracker::new(meta, Guard::new(AccessLevel::Read, "prod-db", &[]), limits);
    let (mut proxy_client_side, mut client) = tokio::io::duplex(64 << 10);
    let (mut proxy_upstream_side, _server) = tokio::io::duplex(64 << 10);
    let cx = RelayContext {
        session: registration.handle(),
        tracker: &mut tracker,
        audit: &audit,
        metrics: &metrics,
        target: "prod-db",
        max_message_bytes: 1 << 20,
        initial: BytesMut::new(),
        notice: None,
    };
    let cut = std::future::ready(SessionEndReason::GrantExpired);
    let relayed = relay(&mut proxy_client_side, &mut proxy_upstream_side, cx, cut, |_| {
        b"FATAL".to_vec()
    })
    .await;

    assert_eq!(
        relayed.end,
        RelayEnd::Cut {
            reason: SessionEndReason::GrantExpired,
            in_flight: false
        }
    );
    assert!(relayed.shut_down, "the relay shut the client stream down itself");
    // Both streams are still held, as during the session's teardown: the client has its
    // FATAL and its end of stream already.
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut got))
        .await
        .expect("the client sees the end before the teardown")
        .unwrap();
    assert_eq!(got, b"FATAL");
    drop((proxy_client_side, proxy_upstream_side));
    audit.close();
}
