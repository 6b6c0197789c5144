//! A recorded session replayed through the real relay, in process: a scripted client and a
//! scripted server on in-memory streams, the relay between them with its statement tracker
//! and a real audit log in `dir`. The instruction-count check (`benches/icount.sh`) runs it
//! under callgrind. What it leaves out is TLS and the kernel; what it covers is jitgate's own
//! work per message: framing, classification, the tracker, audit encoding, the chain, the
//! write, and the relay's polling.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::guard::Guard;
use super::relay::{relay, RelayContext, RelayEnd};
use super::statements::{TextLimits, Tracker};
use crate::audit::{AuditLog, SessionEndReason};
use crate::config::AuditConfig;
use crate::metrics::Metrics;
use crate::model::{AccessLevel, GrantId, SessionId, SessionMeta, TargetName, UserName};
use crate::sessions::{NewSession, Sessions};

/// One read of a recorded session: the client's bytes (`true`) or the server's.
pub type Read = (bool, Vec<u8>);

/// What a replay did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replayed {
    /// Exchanges: a run of client reads answered by a run of server reads.
    pub exchanges: u64,
    /// Audit records in the log afterwards.
    pub records: u64,
}

/// Longest a replay may take before it counts as hung.
const BOUND: Duration = Duration::from_secs(600);

/// Replays the first `limit` exchanges of `reads` `rounds` times through the relay, as one
/// session with write access, the audit log in `dir`. Each run of client reads is sent once the answer to the previous one
/// has fully arrived, as a client at `-c 1` would. Fails when a side sees other bytes than the
/// recording's (the relay forwards pgbench's traffic unchanged).
pub async fn replay(reads: &[Read], rounds: usize, limit: usize, dir: &Path) -> io::Result<Replayed> {
    let mut exchanges = exchanges(reads);
    exchanges.truncate(limit);
    let metrics = Metrics::new();
    let config = AuditConfig {
        path: dir.join("audit.jsonl"),
        tip_path: dir.join("audit.tip"),
        max_file_bytes: 1 << 40,
        fsync_interval: Duration::from_secs(3600),
        queue_depth: 65_536,
        max_statement_bytes: 65_536,
        max_param_bytes: 256,
        redact_params_matching: vec!["password".into()],
        replica: None,
    };
    let audit = AuditLog::open(&config, Arc::clone(&metrics)).map_err(io::Error::other)?;
    let meta = SessionMeta {
        id: SessionId::generate(),
        grant_id: GrantId::generate(),
        user: UserName::new("bench").map_err(io::Error::other)?,
        roles: Vec::new(),
        target: TargetName::new("bench-db").map_err(io::Error::other)?,
        database: "bench".into(),
        access: AccessLevel::Write,
        client_addr: "127.0.0.1:5555".parse().map_err(io::Error::other)?,
        upstream_role: "jit_reader".into(),
    };
    let sessions = Arc::new(Sessions::default());
    let registration = sessions.register(NewSession {
        meta: meta.clone(),
        cut_parent: CancellationToken::new(),
    });
    let limits = TextLimits {
        max_statement_bytes: config.max_statement_bytes,
        max_param_bytes: config.max_param_bytes,
        redact_params_matching: config.redact_params_matching.clone(),
    };
    let mut tracker = Tracker::new(meta, Guard::new(AccessLevel::Write, "bench-db", &[]), limits);
    let (mut proxy_client, mut client) = tokio::io::duplex(256 << 10);
    let (mut proxy_upstream, mut server) = tokio::io::duplex(256 << 10);
    let client_script = async {
        for _ in 0..rounds {
            for (sent, answer) in &exchanges {
                client.write_all(sent).await?;
                expect(&mut client, answer).await?;
            }
        }
        client.shutdown().await
    };
    let server_script = async {
        for _ in 0..rounds {
            for (sent, answer) in &exchanges {
                expect(&mut server, sent).await?;
                server.write_all(answer).await?;
            }
        }
        Ok::<_, io::Error>(())
    };
    let cx = RelayContext {
        session: registration.handle(),
        tracker: &mut tracker,
        audit: &audit,
        metrics: &metrics,
        target: "bench-db",
        max_message_bytes: 1 << 24,
        initial: BytesMut::new(),
        notice: None,
    };
    let relayed = relay(
        &mut proxy_client,
        &mut proxy_upstream,
        cx,
        std::future::pending::<SessionEndReason>(),
        |_| Vec::new(),
    );
    let run = async { tokio::join!(relayed, client_script, server_script) };
    let (relayed, client, server) = tokio::time::timeout(BOUND, run)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the replay hung"))?;
    client?;
    server?;
    if relayed.end != RelayEnd::Closed(SessionEndReason::ClientClosed) {
        return Err(io::Error::other(format!("the relay ended with {:?}", relayed.end)));
    }
    drop(registration);
    audit.close();
    Ok(Replayed {
        exchanges: (exchanges.len() * rounds) as u64,
        records: metrics.audit_records_total.get(),
    })
}

/// The reads as exchanges: each run of client reads, then the run of server reads after it.
fn exchanges(reads: &[Read]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let mut answering = false;
    for (from_client, bytes) in reads {
        match (from_client, answering, out.last_mut()) {
            (true, false, Some(last)) => last.0.extend_from_slice(bytes),
            (false, _, Some(last)) => {
                last.1.extend_from_slice(bytes);
                answering = true;
            }
            (true, _, _) => {
                out.push((bytes.clone(), Vec::new()));
                answering = false;
            }
            // Server bytes before any client bytes: nothing asked for them.
            (false, _, None) => {}
        }
    }
    out
}

/// Reads exactly `want`'s length from `from` and checks it is `want`.
async fn expect<S: AsyncReadExt + Unpin>(from: &mut S, want: &[u8]) -> io::Result<()> {
    let mut got = vec![0u8; want.len()];
    from.read_exact(&mut got).await?;
    if got != want {
        return Err(io::Error::other("the relay changed the recorded bytes"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn tagged(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    #[tokio::test]
    async fn a_recorded_exchange_goes_through_the_relay_unchanged_and_audited() {
        let dir = tempfile::tempdir().unwrap();
        let query = tagged(b'Q', b"SELECT 1\0");
        let mut answer = tagged(b'T', b"\0\x01?column?\0\0\0\0\0\0\0\0\0\x17\0\x04\xff\xff\xff\xff\0\0");
        answer.extend(tagged(b'D', b"\0\x01\0\0\0\x011"));
        answer.extend(tagged(b'C', b"SELECT 1\0"));
        answer.extend(tagged(b'Z', b"I"));
        // The answer in two reads, as a server may send it.
        let (a, b) = answer.split_at(7);
        let reads = vec![(true, query), (false, a.to_vec()), (false, b.to_vec())];
        let replayed = replay(&reads, 3, usize::MAX, dir.path()).await.unwrap();
        // Three statements, each a `statement` and a `statement.end`.
        assert_eq!(
            replayed,
            Replayed {
                exchanges: 3,
                records: 6
            }
        );
        let log = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
        assert_eq!(log.matches("\"statement.end\"").count(), 3);
    }

    #[test]
    fn reads_group_into_exchanges() {
        let r = |c: bool, b: &[u8]| (c, b.to_vec());
        let reads = vec![
            r(false, b"greeting"),
            r(true, b"a"),
            r(true, b"b"),
            r(false, b"1"),
            r(false, b"2"),
            r(true, b"c"),
            r(false, b"3"),
        ];
        assert_eq!(
            exchanges(&reads),
            vec![(b"ab".to_vec(), b"12".to_vec()), (b"c".to_vec(), b"3".to_vec())]
        );
    }
}
