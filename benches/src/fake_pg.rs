//! A stand-in PostgreSQL for the idle-memory and sever runs, where 10,000 real backends would
//! not fit on the machine: it accepts a startup message, answers a trust login
//! (`AuthenticationOk`, the `ParameterStatus` set the proxy checks, `BackendKeyData`,
//! `ReadyForQuery`), then holds the connection, answering `Query` with an empty result and
//! `Sync` with `ReadyForQuery`. `SSLRequest` is declined; a `CancelRequest` is read and dropped.

use std::sync::atomic::{AtomicI32, Ordering};

use anyhow::Result;
use bytes::{Buf, BytesMut};
use jitgate_protocol::postgres::backend::peek_tagged;
use jitgate_protocol::postgres::frontend::{decode_startup, peek_startup_len, StartupRequest};
use jitgate_protocol::postgres::MAX_STARTUP_LEN;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::traffic;

/// Serves until the process is killed.
pub async fn serve(listen: &str) -> Result<()> {
    let listener = TcpListener::bind(listen).await?;
    println!("fake-pg listening on {}", listener.local_addr()?);
    static NEXT_PID: AtomicI32 = AtomicI32::new(1000);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                eprintln!("fake-pg: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let pid = NEXT_PID.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let _ = session(stream, pid).await;
        });
    }
}

async fn session(mut s: TcpStream, pid: i32) -> Result<()> {
    let _ = s.set_nodelay(true);
    let mut buf = BytesMut::with_capacity(512);
    loop {
        let len = loop {
            if let Some(len) = peek_startup_len(&buf, MAX_STARTUP_LEN)? {
                if buf.len() >= len {
                    break len;
                }
            }
            if s.read_buf(&mut buf).await? == 0 {
                return Ok(());
            }
        };
        let msg = buf.split_to(len);
        match decode_startup(&msg)? {
            StartupRequest::Ssl | StartupRequest::GssEnc => s.write_all(b"N").await?,
            StartupRequest::Cancel { .. } => return Ok(()),
            StartupRequest::Startup { .. } => break,
        }
    }
    s.write_all(&traffic::login_answer(pid, pid.wrapping_mul(7919))).await?;
    let empty = traffic::empty_answer();
    let ready = traffic::ready_answer();
    loop {
        while let Some((tag, len)) = peek_tagged(&buf, 1 << 30)? {
            if buf.len() < len {
                break;
            }
            buf.advance(len);
            match tag {
                b'Q' => s.write_all(&empty).await?,
                b'S' => s.write_all(&ready).await?,
                b'X' => return Ok(()),
                _ => {}
            }
        }
        if s.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
    }
}
