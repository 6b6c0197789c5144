//! Many idle mTLS sessions through jitgate, opened the way libpq opens them (`SSLRequest`,
//! TLS with the user's client certificate, `StartupMessage`, wait for `ReadyForQuery`), then
//! held: to weigh the proxy's memory per session, or to time how fast it severs them when
//! their grant ends.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context as _, Result};
use bytes::BytesMut;
use jitgate_protocol::postgres::backend::peek_tagged;
use jitgate_protocol::postgres::frontend::{encode_ssl_request, encode_startup};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::stats;

/// Where and as whom to connect.
#[derive(Debug, Clone, clap::Args)]
pub struct Target {
    /// Proxy address, IP:port.
    #[arg(long)]
    pub addr: SocketAddr,
    /// `dbname` (the jitgate target).
    #[arg(long)]
    pub dbname: String,
    /// `user` (must equal the certificate's user).
    #[arg(long)]
    pub user: String,
    /// Client certificate (with --key); without one, no client certificate is offered.
    #[arg(long, requires = "key")]
    pub cert: Option<PathBuf>,
    #[arg(long, requires = "cert")]
    pub key: Option<PathBuf>,
    /// CA that signed the proxy's server certificate.
    #[arg(long)]
    pub ca: PathBuf,
    /// Sessions to open.
    #[arg(long)]
    pub n: usize,
    /// Handshakes in flight at once while opening.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
}

pub type Session = TlsStream<TcpStream>;

/// The TLS connector for `t`: its CA, and its client certificate when it has one.
pub fn connector(t: &Target) -> Result<TlsConnector> {
    let roots = jitgate::tls::load_roots(&t.ca)?;
    let builder = rustls::ClientConfig::builder_with_provider(jitgate::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let cfg = match (&t.cert, &t.key) {
        (Some(cert), Some(key)) => {
            builder.with_client_auth_cert(jitgate::tls::load_certs(cert)?, jitgate::tls::load_key(key)?)?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(TlsConnector::from(Arc::new(cfg)))
}

/// Opens one session as libpq does: `SSLRequest`, TLS, `StartupMessage`, until the first
/// `ReadyForQuery`.
pub async fn open_one(t: &Target, tls: TlsConnector) -> Result<Session> {
    let mut tcp = TcpStream::connect(t.addr).await?;
    tcp.set_nodelay(true)?;
    tcp.write_all(&encode_ssl_request()).await?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await?;
    if answer[0] != b'S' {
        bail!("proxy declined TLS");
    }
    let name = ServerName::IpAddress(t.addr.ip().into());
    let mut s = tls.connect(name, tcp).await?;
    s.write_all(&encode_startup(&[("user", &t.user), ("database", &t.dbname)]))
        .await?;
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        while let Some((tag, len)) = peek_tagged(&buf, 1 << 20)? {
            if buf.len() < len {
                break;
            }
            let msg = buf.split_to(len);
            match tag {
                b'Z' => return Ok(s),
                b'E' => bail!("refused: {}", String::from_utf8_lossy(&msg[5..])),
                _ => {}
            }
        }
        if s.read_buf(&mut buf).await? == 0 {
            bail!("proxy closed the connection during startup");
        }
    }
}

/// Opens `t.n` sessions, `t.concurrency` at a time; fails on the first that cannot open.
async fn open_all(t: &Target) -> Result<(Vec<Session>, Duration)> {
    let tls = connector(t)?;
    let gate = Arc::new(Semaphore::new(t.concurrency));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..t.n {
        let permit = Arc::clone(&gate).acquire_owned().await?;
        let (t, tls) = (t.clone(), tls.clone());
        tasks.spawn(async move {
            let r = open_one(&t, tls).await;
            drop(permit);
            r
        });
    }
    let mut sessions = Vec::with_capacity(t.n);
    while let Some(r) = tasks.join_next().await {
        sessions.push(r?.context("opening a session")?);
    }
    Ok((sessions, started.elapsed()))
}

/// `VmRSS` of a process, in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/PID/status")
}

/// Opens the sessions, waits `settle`, and prints one line:
/// `memory N=<n> rss_before_kib=.. rss_after_kib=.. per_session_kib=.. open_s=..`.
pub async fn memory(t: &Target, pid: u32, settle: Duration) -> Result<()> {
    let before = rss_kib(pid)?;
    let (sessions, took) = open_all(t).await?;
    tokio::time::sleep(settle).await;
    let after = rss_kib(pid)?;
    let per = (after.saturating_sub(before)) as f64 / sessions.len() as f64;
    println!(
        "memory N={} rss_before_kib={before} rss_after_kib={after} per_session_kib={per:.1} open_s={:.2} opens_per_s={:.0}",
        sessions.len(),
        took.as_secs_f64(),
        sessions.len() as f64 / took.as_secs_f64()
    );
    drop(sessions);
    Ok(())
}

/// What ends the sessions of a sever run.
#[derive(Debug, Clone)]
pub enum Cut {
    /// Their grant's end (`expires_at` of `jitgate grant create --json`).
    Expiry(SystemTime),
    /// A command run once every session is open (`jitgate grant revoke ...`). Latency counts
    /// from just before it starts, so it includes the command's own start, TLS handshake and
    /// API round trip; `probe`, run first, is timed to show what that costs.
    Command {
        revoke: Vec<String>,
        probe: Option<Vec<String>>,
    },
}

/// Runs `argv` to completion; fails when it does not exit 0.
fn run(argv: &[String]) -> Result<()> {
    let (program, args) = argv.split_first().context("an empty command")?;
    let status = std::process::Command::new(program)
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .with_context(|| format!("running {program}"))?;
    if !status.success() {
        bail!("{program} exited with {status}");
    }
    Ok(())
}

/// Opens the sessions (all under one grant), ends them by `cut`, then times, for each, how
/// long after the cut its socket saw EOF or an error. Prints one line:
/// `sever N=<n> by=expiry|revoke p50_ms=.. p99_ms=.. max_ms=.. early=.. still_open=.. open_s=..`
/// (and `cli_ms=..` for a command).
pub async fn sever(t: &Target, cut: Cut, timeout: Duration) -> Result<()> {
    let (sessions, took) = open_all(t).await?;
    if let Cut::Expiry(deadline) = cut {
        if SystemTime::now() >= deadline {
            bail!(
                "opening {} sessions took {:.1}s and ran past the grant's end: give the grant more time",
                sessions.len(),
                took.as_secs_f64()
            );
        }
    }
    let mut tasks = tokio::task::JoinSet::new();
    for mut s in sessions {
        tasks.spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return SystemTime::now(),
                    Ok(_) => {}
                }
            }
        });
    }
    let (deadline, by, cli_ms) = match cut {
        Cut::Expiry(at) => (at, "expiry", None),
        Cut::Command { revoke, probe } => {
            let cli_ms = match probe {
                Some(probe) => {
                    let start = Instant::now();
                    tokio::task::spawn_blocking(move || run(&probe)).await??;
                    Some(start.elapsed().as_secs_f64() * 1e3)
                }
                None => None,
            };
            let at = SystemTime::now();
            tokio::task::spawn_blocking(move || run(&revoke)).await??;
            (at, "revoke", cli_ms)
        }
    };
    let mut lat_ms = Vec::with_capacity(t.n);
    let mut early = 0usize;
    let limit = tokio::time::sleep(deadline.duration_since(SystemTime::now()).unwrap_or_default() + timeout);
    tokio::pin!(limit);
    loop {
        tokio::select! {
            r = tasks.join_next() => match r {
                Some(ended) => match ended?.duration_since(deadline) {
                    Ok(d) => lat_ms.push(d.as_secs_f64() * 1e3),
                    Err(_) => early += 1,
                },
                None => break,
            },
            _ = &mut limit => break,
        }
    }
    let still_open = tasks.len();
    let s = stats::Summary::of(&mut lat_ms);
    let cli = cli_ms.map(|ms| format!(" cli_ms={ms:.1}")).unwrap_or_default();
    println!(
        "sever N={} by={by} p50_ms={:.1} p99_ms={:.1} max_ms={:.1} early={early} still_open={still_open} open_s={:.2}{cli}",
        t.n,
        s.p50,
        s.p99,
        s.max,
        took.as_secs_f64()
    );
    Ok(())
}
