//! `jitgate-agent`: runs beside databases in a private network and reaches them for a jitgate
//! proxy, over mTLS links it dials out to the proxy's agent listener: one to each replica of
//! the proxy, so any replica reaches its targets. The proxy does the access decisions, the
//! audit and the cuts; the agent only carries bytes to the targets its config names, and only
//! those it was admitted for.

mod config;
mod enroll;
mod link;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

/// jitgate-agent: reach targets in a private network for a jitgate proxy.
#[derive(Debug, Parser)]
#[command(name = "jitgate-agent", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Join a proxy with a one-time token (`jitgate agent token create`): makes the agent's key
    /// in DIR, sends a CSR, and writes DIR/agent.pem (key and certificate), DIR/ca.crt,
    /// DIR/agent.json and DIR/replicas.json (where the proxy's replicas are, when it has several).
    Join {
        /// The proxy's agent listener, HOST:PORT (`listen.agents`). With several replicas, one
        /// replica's address (its `[agents] advertise`), not a load balancer's: the agent links
        /// to it and to every replica it learns of.
        #[arg(long)]
        proxy: String,
        /// The join token (or set JITGATE_AGENT_TOKEN).
        #[arg(long, env = "JITGATE_AGENT_TOKEN", hide_env_values = true)]
        token: String,
        /// Where the agent keeps its key, certificates and state.
        #[arg(long)]
        data_dir: PathBuf,
        /// The name the proxy's certificate is checked against (default: HOST of --proxy), on
        /// every replica's link.
        #[arg(long)]
        server_name: Option<String>,
    },
    /// Serve the targets of the config (`--config FILE`, or DIR/agent.toml with --data-dir)
    /// until SIGTERM or Ctrl-C, over one link to each replica: the proxy it joined and every
    /// replica the proxy names (saved in DIR/replicas.json).
    Run {
        /// Data directory written by `join`; its agent.toml is the config.
        #[arg(long, conflicts_with = "config")]
        data_dir: Option<PathBuf>,
        /// Config file (see deploy/examples/jitgate-agent.toml).
        #[arg(long, short, env = "JITGATE_AGENT_CONFIG")]
        config: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("JITGATE_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    // One thread: each link is one connection driven by one task, which its streams' bytes
    // pass through; more threads would only add wake-ups between them.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("jitgate-agent: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("jitgate-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Join {
            proxy,
            token,
            data_dir,
            server_name,
        } => {
            let (joined, replicas) = enroll::join(&proxy, server_name.as_deref(), &token, &data_dir).await?;
            println!(
                "joined {proxy} as agent {} for {}; wrote {}",
                joined.name,
                joined.targets.join(","),
                data_dir.display()
            );
            if !replicas.is_empty() {
                println!("replicas it will link to: {}", replicas.join(", "));
            }
            println!(
                "next: write {} with a [targets] table (see deploy/examples/jitgate-agent.toml), then: jitgate-agent run --data-dir {}",
                data_dir.join(config::CONFIG).display(),
                data_dir.display()
            );
            Ok(())
        }
        Command::Run { data_dir, config } => {
            let path = match (config, data_dir) {
                (Some(c), _) => c,
                (None, Some(d)) => d.join(config::CONFIG),
                (None, None) => anyhow::bail!("pass --config FILE or --data-dir DIR"),
            };
            let config = config::Config::load(&path)?;
            let joined = config::Joined::load(&config.data_dir)?;
            let shutdown = CancellationToken::new();
            let stop = shutdown.clone();
            tokio::spawn(async move {
                let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(_) => return,
                };
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
                stop.cancel();
            });
            link::run(config, joined, shutdown).await.context("jitgate-agent run")
        }
    }
}
