//! `jitgate-e2e`: the helper binary of `benches/e2e.sh`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use jitgate_benches::{fake_pg, latency, report, sessions};

#[derive(Debug, Parser)]
#[command(name = "jitgate-e2e", about = "Helpers for benches/e2e.sh")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print N free loopback TCP ports, one a line.
    FreePorts { n: usize },
    /// Run a fake PostgreSQL upstream (trust login, then idle) until killed.
    FakePg {
        #[arg(long)]
        listen: String,
    },
    /// Open N sessions one after another; print the session start latency percentiles.
    Connect {
        #[command(flatten)]
        target: sessions::Target,
        /// The target's name in the report.
        #[arg(long)]
        label: String,
    },
    /// Read pgbench per-transaction logs (`--log`) of one target; print latency percentiles.
    Qlat {
        /// The target's name in the report.
        #[arg(long)]
        label: String,
        files: Vec<PathBuf>,
    },
    /// Open and hold N idle sessions; print the proxy's RSS per session.
    Hold {
        #[command(flatten)]
        target: sessions::Target,
        /// The proxy's process id (for /proc/PID/status).
        #[arg(long)]
        pid: u32,
        /// Wait this long after the last session opened before reading RSS.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        settle: Duration,
    },
    /// Open N sessions under one grant, end them by its expiry or a revoke; print sever
    /// latency percentiles.
    Sever {
        #[command(flatten)]
        target: sessions::Target,
        /// Output of `jitgate grant create --json` for the grant the sessions run under: the
        /// cut is its expiry, unless --revoke is given.
        #[arg(long)]
        grant_json: PathBuf,
        /// Cut by running this command (whitespace-separated argv, e.g. `jitgate grant revoke
        /// ...`) once every session is open, instead of waiting for the expiry.
        #[arg(long)]
        revoke: Option<String>,
        /// A command timed just before --revoke, to show what the CLI itself costs.
        #[arg(long)]
        probe: Option<String>,
        /// Give up this long after the grant's end.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Replay a recorded pgbench session (benches/data/NAME.trace) ROUNDS times through the
    /// relay in process, with a real audit log in a temp dir; print what it did. Run under
    /// callgrind by benches/icount.sh.
    Replay {
        /// One of select-simple, select-extended, select-prepared, tpcb-simple.
        trace: String,
        #[arg(long, default_value_t = 1)]
        rounds: usize,
        /// Replay only the first N exchanges (a run of client reads and its answer) of each
        /// round.
        #[arg(long)]
        exchanges: Option<usize>,
    },
    /// Print the Markdown results table of the raw lines in FILE.
    Report { file: PathBuf },
    /// The shared PostgreSQL store on a throwaway cluster: change propagation between two
    /// replicas' stores, and the resync time with RESYNC_GRANTS live grants (0 skips it).
    Store {
        #[arg(long, default_value_t = 1000)]
        changes: usize,
        #[arg(long, default_value_t = 1_000_000)]
        resync_grants: usize,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Command::Replay {
        trace,
        rounds,
        exchanges,
    } = &cli.command
    {
        return replay(trace, *rounds, *exchanges);
    }
    let rt = tokio::runtime::Runtime::new()?;
    match cli.command {
        Command::FreePorts { n } => {
            // Hold all listeners until every port is chosen, so the N ports differ.
            let listeners: Vec<_> = (0..n)
                .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
                .collect::<Result<_, _>>()?;
            for l in &listeners {
                println!("{}", l.local_addr()?.port());
            }
            Ok(())
        }
        Command::FakePg { listen } => rt.block_on(fake_pg::serve(&listen)),
        Command::Hold { target, pid, settle } => rt.block_on(sessions::memory(&target, pid, settle)),
        Command::Sever {
            target,
            grant_json,
            revoke,
            probe,
            timeout,
        } => {
            let text = std::fs::read_to_string(&grant_json)?;
            let grant: jitgate::model::Grant =
                serde_json::from_str(&text).with_context(|| format!("reading {}", grant_json.display()))?;
            let argv = |s: String| s.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
            let cut = match revoke {
                Some(revoke) => sessions::Cut::Command {
                    revoke: argv(revoke),
                    probe: probe.map(argv),
                },
                None => sessions::Cut::Expiry(grant.expires_at),
            };
            rt.block_on(sessions::sever(&target, cut, timeout))
        }
        Command::Connect { target, label } => rt.block_on(latency::session_start(&target, &label)),
        Command::Qlat { label, files } => latency::query_latency(&label, &files),
        Command::Replay {
            trace,
            rounds,
            exchanges,
        } => replay(&trace, rounds, exchanges),
        Command::Store { changes, resync_grants } => rt.block_on(jitgate_benches::store::run(changes, resync_grants)),
        Command::Report { file } => {
            print!("{}", report::render(&std::fs::read_to_string(file)?));
            Ok(())
        }
    }
}

/// One thread, as a session lane runs it.
fn replay(trace: &str, rounds: usize, exchanges: Option<usize>) -> Result<()> {
    use jitgate_benches::traffic::{self, Read};
    anyhow::ensure!(traffic::RECORDED.contains(&trace), "no recorded session {trace}");
    let reads: Vec<(bool, Vec<u8>)> = traffic::recorded(trace)
        .into_iter()
        .map(|r| match r {
            Read::Client(b) => (true, b),
            Read::Server(b) => (false, b),
        })
        .collect();
    let dir = tempfile::tempdir()?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let limit = exchanges.unwrap_or(usize::MAX);
    let done = rt.block_on(jitgate::pg::bench_support::replay(&reads, rounds, limit, dir.path()))?;
    println!("replay {trace} {rounds} {} {}", done.exchanges, done.records);
    Ok(())
}
