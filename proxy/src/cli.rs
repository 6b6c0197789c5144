//! The `jitgate` command line: server commands (`init`, `serve`, `config check`, `demo`,
//! `cert issue`), admin commands over the control API (`grant ...`, `session ...`,
//! `audit reopen`) and the audit log readers that work on the files (`audit verify`,
//! `audit tail`); the `audit` commands themselves are in `audit/command`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use clap::{Args, Parser, Subcommand};
use serde::Serialize;
use tracing_subscriber::fmt::writer::BoxMakeWriter;

pub(crate) use crate::audit::command::AuditLogArgs;
use crate::client::ApiClient;
use crate::config::Config;
use crate::model::{AccessLevel, NewGrant, Role, TargetName, UserName};
use crate::pki::{self, files, Authority};

/// jitgate: just-in-time access to PostgreSQL. Nobody keeps standing access: engineers
/// request access to one target for a reason and a bounded time, policies or approvers
/// decide, and the proxy lets their psql sessions through only while the grant lives.
#[derive(Debug, Parser)]
#[command(name = "jitgate", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a data directory: CA, server certificate, admin identity, SSH user and host CAs
    /// with the proxy's SSH host key and certificate, and a commented config.
    Init(InitArgs),
    /// Run the proxy. SIGTERM or Ctrl-C stop it; SIGHUP reopens the audit log (logrotate).
    Serve {
        /// Config file (see deploy/examples/jitgate.toml).
        #[arg(long, short, env = "JITGATE_CONFIG")]
        config: PathBuf,
    },
    /// Start a sandbox: throwaway PostgreSQL, proxy, demo user, an auto-approve policy and a 15-minute grant.
    Demo,
    /// Validate configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Issue client certificates from the data directory's CA.
    Cert {
        #[command(subcommand)]
        command: CertCommand,
    },
    /// Ask for access to TARGET (`request TARGET --access read --for 1h --reason TEXT`), or
    /// list, show and withdraw requests.
    Request(crate::requests::command::RequestArgs),
    /// Approve a pending request (needs an approver role of its policy; never your own).
    Approve(crate::requests::command::ApproveArgs),
    /// Deny a pending request, with a reason.
    Deny(crate::requests::command::DenyArgs),
    /// Ask for more time on your live grant; once approved its sessions keep going.
    Extend(crate::requests::command::ExtendArgs),
    /// Create, list and revoke grants directly (admin; `grant list` shows others their own).
    Grant {
        #[command(subcommand)]
        command: GrantCommand,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Agents beside targets in private networks: create join tokens, list agents (admin).
    Agent {
        #[command(subcommand)]
        command: AgentCommand,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List and kill live sessions (admin).
    Session {
        #[command(subcommand)]
        command: SessionCommand,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Check the audit log's hash chain or read it (both work on the files; no API needed),
    /// or make the running proxy reopen it (admin, through the API).
    Audit {
        #[command(subcommand)]
        command: crate::audit::command::AuditCommand,
    },
    /// Explain access policies (works on the config file; no API, no secrets needed).
    Policy {
        #[command(subcommand)]
        command: crate::policy::command::PolicyCommand,
    },
    /// Get your own certificate: single sign-on (device code flow by default, `--browser` for
    /// the browser), an admin's invite code (`--invite CODE`) or a renewal (`--renew`). The
    /// files go to ~/.jitgate/ (mode 0600), where later commands find them.
    Login(crate::login::command::LoginArgs),
    /// Remove the certificate, key and settings `jitgate login` wrote to ~/.jitgate/.
    Logout,
    /// Print the user, roles and expiry of your certificate in ~/.jitgate/.
    Whoami {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Invite engineers (admin): `jitgate user invite alice --roles dev --ttl 24h`.
    User {
        #[command(subcommand)]
        command: crate::login::command::UserCommand,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Link your Slack account, so your clicks on Approve and Deny in Slack act as you
    /// (`jitgate slack link U0123ABCD`; then confirm in the direct message the bot sends).
    Slack {
        #[command(subcommand)]
        command: SlackCommand,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Listen on a loopback port for PostgreSQL clients that cannot present a certificate
    /// (GUI tools, `sslmode=disable`) and tunnel each to TARGET through the proxy over mTLS
    /// with your certificate (`jitgate connect prod-db --port 15432`).
    Connect(crate::connect::ConnectArgs),
    /// SSH into TARGET through the proxy with the system `ssh` and the key and certificate
    /// from `jitgate cert issue` (`jitgate ssh web-1`, `jitgate ssh web-1 -- uptime`).
    Ssh(crate::ssh::command::SshArgs),
    /// Print `Host` blocks for ~/.ssh/config, so plain `ssh`, `scp`, `sftp`, `rsync -e ssh`
    /// and `ssh -L` reach TARGET through the proxy.
    SshConfig(crate::ssh::command::SshConfigArgs),
    /// List, show and export shell recordings (found through the audit log; work on the
    /// files, no API needed).
    Recording {
        #[command(subcommand)]
        command: crate::recordings::RecordingCommand,
    },
}

#[derive(Debug, Args)]
struct InitArgs {
    /// Directory to create (holds keys: keep it private).
    #[arg(long, env = "JITGATE_DATA_DIR")]
    data_dir: PathBuf,
    /// DNS name or IP address clients use to reach the proxy; repeatable. localhost and
    /// 127.0.0.1 are always included.
    #[arg(long = "server-name")]
    server_names: Vec<String>,
    /// Lifetime of the admin certificate (admin.crt).
    #[arg(long, default_value = "12h", value_parser = humantime::parse_duration)]
    admin_ttl: Duration,
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate FILE; exits non-zero naming the offending key. With a `[store]`, also checks
    /// that the shared store answers; for targets with `credentials.mode = "ephemeral"`, that
    /// the manager role logs in, has CREATEROLE and finds the roles the config names.
    Check { file: PathBuf },
}

#[derive(Debug, Subcommand)]
enum CertCommand {
    /// Issue a client certificate: writes OUT/NAME.crt, OUT/NAME.key and OUT/ca.crt, and an SSH
    /// key with its user certificate, valid as long: OUT/NAME, OUT/NAME.pub, OUT/NAME-cert.pub.
    Issue {
        #[arg(long, env = "JITGATE_DATA_DIR")]
        data_dir: PathBuf,
        /// User name carried by the certificate.
        #[arg(long)]
        user: String,
        /// Comma-separated roles, e.g. dev,oncall.
        #[arg(long, value_delimiter = ',')]
        roles: Vec<String>,
        /// Lifetime, e.g. 8h.
        #[arg(long, default_value = "8h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Output directory.
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
    /// Print the SHA-256 fingerprint of the data directory's CA certificate: engineers pass
    /// it to their first `jitgate login --ca-fingerprint`.
    Fingerprint {
        #[arg(long, env = "JITGATE_DATA_DIR")]
        data_dir: PathBuf,
    },
}

/// Where the control API is and which identity to present. Flags win over environment
/// variables; anything unset falls back to the admin identity in `--data-dir`.
#[derive(Debug, Args)]
pub(crate) struct ApiArgs {
    /// API address, host:port.
    #[arg(long, env = "JITGATE_API", global = true)]
    api: Option<String>,
    /// Client certificate (PEM).
    #[arg(long, env = "JITGATE_CERT", global = true)]
    cert: Option<PathBuf>,
    /// Client key (PEM).
    #[arg(long, env = "JITGATE_KEY", global = true)]
    key: Option<PathBuf>,
    /// CA certificate that signed the proxy's server certificate (PEM).
    #[arg(long, env = "JITGATE_CA", global = true)]
    ca: Option<PathBuf>,
    /// Data directory to take the API address (from jitgate.toml) and admin identity from.
    #[arg(long, env = "JITGATE_DATA_DIR", global = true)]
    data_dir: Option<PathBuf>,
    /// Print JSON (an object, or an array for lists) instead of text.
    #[arg(long, global = true)]
    pub(crate) json: bool,
}

#[derive(Debug, Subcommand)]
enum GrantCommand {
    /// Grant USER access to TARGET now; prints the grant id.
    Create {
        #[arg(long)]
        user: String,
        #[arg(long)]
        target: String,
        /// read, write or admin.
        #[arg(long, default_value = "read")]
        access: AccessLevel,
        /// How long, e.g. 30m or 2h: whole seconds, at least 1s.
        #[arg(long = "for", value_parser = crate::timefmt::parse_grant_duration)]
        duration: Duration,
        /// Why (ticket, incident); recorded in the audit log.
        #[arg(long)]
        reason: String,
    },
    /// List active grants.
    List,
    /// Revoke a grant and cut its sessions.
    Revoke { id: String },
    /// Move a grant's end later; live sessions keep going without reconnecting.
    Extend {
        id: String,
        /// How much later, e.g. 30m: whole seconds, at least 1s.
        #[arg(long = "for", value_parser = crate::timefmt::parse_grant_duration)]
        duration: Duration,
    },
}

#[derive(Debug, Subcommand)]
enum AgentCommand {
    /// Join tokens: one-time, expiring, each for one agent name and its targets.
    Token {
        #[command(subcommand)]
        command: AgentTokenCommand,
    },
    /// Forget an agent: its links end on every replica (and its sessions with them), and it
    /// can connect again only after a new join.
    Remove { name: String },
    /// List the agents that joined: targets, and this replica's link to each (connected
    /// since, remote address, version).
    List,
}

#[derive(Debug, Subcommand)]
enum AgentTokenCommand {
    /// Print a one-time join token for `jitgate-agent join --token` (shown only once).
    Create {
        /// The agent's name, as targets name it in `via`.
        #[arg(long)]
        name: String,
        /// Comma-separated targets the agent may serve, e.g. prod-db,stage-db.
        #[arg(long, value_delimiter = ',', required = true)]
        targets: Vec<String>,
        /// How long the token may be used (at most 7d).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
}

#[derive(Debug, Subcommand)]
enum SessionCommand {
    /// List live sessions (of every replica when replicas share a store, with a REPLICA
    /// column; other replicas' byte counts are at most 5 s old).
    List,
    /// Cut a live session, on whichever replica holds it.
    Kill { id: String },
}

/// Parses the command line and runs it.
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let serving = matches!(cli.command, Command::Serve { .. } | Command::Demo);
    let default = if serving { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // A server's log lines go through a thread of their own: a stderr that stalls (a pipe
    // whose reader stopped) never blocks a tokio worker; lines past the queue's bound are
    // dropped, never waited for (the audit log, not stderr, is the record). Commands log
    // straight to stderr, in order with their own messages.
    let (writer, _log_thread) = if serving {
        let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
            .lossy(true)
            .thread_name("jitgate-log")
            .finish(std::io::stderr());
        (BoxMakeWriter::new(writer), Some(guard))
    } else {
        (BoxMakeWriter::new(std::io::stderr), None)
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) if e.is::<crate::requests::command::NotGranted>() => {
            eprintln!("not granted: {e:#}");
            std::process::ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `config check`: every ephemeral target's manager role must log in, hold CREATEROLE and
/// find the roles the config names (targets behind an agent cannot be reached from here).
async fn check_managers(config: &Config) -> Result<()> {
    let mut targets: Vec<_> = config
        .targets
        .values()
        .filter(|t| matches!(t.mode, crate::config::CredentialsMode::Ephemeral(_)))
        .collect();
    targets.sort_by(|a, b| a.name.cmp(&b.name));
    if targets.is_empty() {
        return Ok(());
    }
    let connector =
        crate::pg::upstream::Connector::new(&config.targets, std::sync::Arc::new(crate::access::TcpDialer))?;
    for target in targets {
        if target.via.is_some() {
            println!(
                "target {}: manager not checked (reached through agent {})",
                target.name, target.address
            );
            continue;
        }
        let user = match &target.mode {
            crate::config::CredentialsMode::Ephemeral(e) => e.manager.user.clone(),
            crate::config::CredentialsMode::Static => continue,
        };
        crate::credentials::check(&connector, target)
            .await
            .with_context(|| format!("targets.{}.manager", target.name))?;
        println!("target {}: manager {user} may create temporary roles", target.name);
    }
    Ok(())
}

async fn dispatch(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Init(args) => init(args),
        Command::Serve { config } => serve(&config).await,
        Command::Demo => crate::demo::run().await,
        Command::Config {
            command: ConfigCommand::Check { file },
        } => {
            let config = Config::load(&file)?;
            config.check_files()?;
            if let Some(store) = &config.store {
                let version = crate::store::PgStore::ping(store)
                    .await
                    .with_context(|| format!("store {}", store.url))?;
                println!("store {}: answers ({version})", store.url);
            }
            check_managers(&config).await?;
            println!("{}: ok ({} targets)", file.display(), config.targets.len());
            Ok(())
        }
        Command::Cert {
            command:
                CertCommand::Issue {
                    data_dir,
                    user,
                    roles,
                    ttl,
                    out,
                },
        } => {
            let user = UserName::new(user)?;
            let roles = roles.into_iter().map(Role::new).collect::<Result<Vec<_>, _>>()?;
            let ca = Authority::load(&data_dir)?;
            let now = std::time::SystemTime::now();
            let (cert, key) = pki::issue_to_dir(&ca, &user, &roles, ttl, &out)?;
            println!(
                "wrote {}, {} and {}",
                cert.display(),
                key.display(),
                out.join(files::CA_CERT).display()
            );
            // The SSH certificate is valid as long as the X.509 one (with the same skew).
            let from = now - Duration::from_secs(300);
            match crate::sshca::issue_user(&data_dir, &user, &roles, from, now + ttl, &out)? {
                Some(f) => {
                    println!(
                        "wrote {}, {} and {} (SSH key and certificate)",
                        f.key.display(),
                        f.public.display(),
                        f.cert.display()
                    );
                    if let Some(k) = f.known_hosts {
                        println!("wrote {} (the proxy's SSH host key, for jitgate ssh)", k.display());
                    }
                }
                None => println!("no SSH certificate: {} has no ssh_user_ca", data_dir.display()),
            }
            Ok(())
        }
        Command::Cert {
            command: CertCommand::Fingerprint { data_dir },
        } => {
            let path = data_dir.join(files::CA_CERT);
            let pem = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
            println!("{}", pki::cert_fingerprint(&pem)?);
            Ok(())
        }
        Command::Login(args) => crate::login::command::login(args).await,
        Command::Logout => crate::login::command::logout(),
        Command::Whoami { json } => crate::login::command::whoami(json),
        Command::User { command, api } => crate::login::command::user(command, &api).await,
        Command::Slack { command, api } => slack(command, &api).await,
        Command::Request(args) => crate::requests::command::request(args).await,
        Command::Approve(args) => crate::requests::command::approve(args).await,
        Command::Deny(args) => crate::requests::command::deny(args).await,
        Command::Extend(args) => crate::requests::command::extend(args).await,
        Command::Grant { command, api } => grant(command, &api).await,
        Command::Session { command, api } => session(command, &api).await,
        Command::Agent { command, api } => agent(command, &api).await,
        Command::Audit { command } => crate::audit::command::run(command).await,
        Command::Policy { command } => crate::policy::command::run(command),
        Command::Connect(args) => crate::connect::run(args).await,
        Command::Ssh(args) => crate::ssh::command::ssh(args),
        Command::SshConfig(args) => crate::ssh::command::ssh_config(args),
        Command::Recording { command } => crate::recordings::run(command),
    }
}

async fn serve(path: &Path) -> Result<()> {
    let config = Config::load(path)?;
    config.check_files()?;
    let listeners = crate::server::Listeners::bind(&config.listen).await?;
    crate::server::run(config, listeners, shutdown_signal()).await?;
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

/// Writes a new data directory. Refuses to overwrite an existing CA.
/// Creates a data directory; returns the `@cert-authority` line that trusts the proxy's SSH
/// host key.
pub fn init_data_dir(data_dir: &Path, server_names: &[String], admin_ttl: Duration) -> Result<crate::sshca::HostTrust> {
    std::fs::create_dir_all(data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        // Keys, grant store and audit log live here: owner only.
        std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o700))?;
    }
    if data_dir.join(files::CA_KEY).exists() {
        bail!("{} already holds a CA; refusing to overwrite it", data_dir.display());
    }
    let data_dir = data_dir.canonicalize()?;
    let ca = Authority::generate()?;
    pki::write_file(&data_dir.join(files::CA_CERT), ca.cert_pem(), false)?;
    pki::write_file(&data_dir.join(files::CA_KEY), &ca.key_pem(), true)?;
    // Loopback names are always included so the CLI on the proxy host can reach the API.
    let mut names: Vec<String> = server_names.to_vec();
    for default in ["localhost", "127.0.0.1"] {
        if !names.iter().any(|n| n == default) {
            names.push(default.into());
        }
    }
    let (cert, key) = ca.issue_server(&names)?;
    pki::write_file(&data_dir.join(files::SERVER_CERT), &cert, false)?;
    pki::write_file(&data_dir.join(files::SERVER_KEY), &key, true)?;
    let admin = UserName::new("admin")?;
    let (cert, key) = ca.issue_client(&admin, &[Role::new("admin")?], admin_ttl)?;
    pki::write_file(&data_dir.join(files::ADMIN_CERT), &cert, false)?;
    pki::write_file(&data_dir.join(files::ADMIN_KEY), &key, true)?;
    let trust = crate::sshca::init(&data_dir, &names)?;
    let config_path = data_dir.join("jitgate.toml");
    if !config_path.exists() {
        let text = CONFIG_TEMPLATE.replace("@DATA_DIR@", &data_dir.display().to_string());
        pki::write_file(&config_path, &text, false)?;
    }
    Ok(trust)
}

fn init(args: InitArgs) -> Result<()> {
    let trust = init_data_dir(&args.data_dir, &args.server_names, args.admin_ttl)?;
    let dir = args.data_dir.canonicalize()?;
    println!("initialised {}", dir.display());
    println!("  CA:          {}/ca.crt (key ca.key: keep it private)", dir.display());
    let ca_pem = std::fs::read_to_string(dir.join(files::CA_CERT))?;
    println!(
        "  CA SHA-256:  {} (for engineers' first jitgate login --ca-fingerprint)",
        pki::cert_fingerprint(&ca_pem)?
    );
    println!("  server cert: {}/server.crt", dir.display());
    println!(
        "  admin:       {}/admin.crt, admin.key (expires in {})",
        dir.display(),
        humantime::format_duration(args.admin_ttl)
    );
    println!(
        "  config:      {}/jitgate.toml (add your [[targets]], then: jitgate serve --config ...)",
        dir.display()
    );
    println!(
        "  SSH:         {0}/ssh_user_ca.pub (user CA), {0}/ssh_host_ed25519_key-cert.pub (host certificate from ssh_host_ca)",
        dir.display()
    );
    println!("  known_hosts line that trusts the proxy's SSH host certificate:");
    println!("{}", trust.known_hosts_line);
    Ok(())
}

const CONFIG_TEMPLATE: &str = r#"# jitgate configuration, written by `jitgate init`.
# Every key is documented in deploy/examples/jitgate.toml. Check with: jitgate config check FILE

# Holds ca.crt/ca.key, server.crt/server.key, the grant store (jitgate.db) and audit.jsonl.
data_dir = "@DATA_DIR@"

[listen]
postgres = "127.0.0.1:5433"   # psql connects here (TLS + client certificate)
api = "127.0.0.1:8443"        # control API for the jitgate CLI (mTLS; authorized by certificate roles)
metrics = "127.0.0.1:9187"    # Prometheus /metrics, /healthz, /readyz (plain HTTP)
# agents = "0.0.0.0:8444"     # jitgate-agent connects here, for targets with via = "AGENT"

# One [[targets]] table per PostgreSQL server. Clients pick it with dbname=NAME
# (or dbname=NAME/otherdb for another database on that server).
#
# [[targets]]
# name = "prod-db"
# kind = "postgres"
# address = "10.0.0.5:5432"
# database = "app"
# labels = { env = "prod" }
# [targets.credentials.read]          # one table per access level: read, write, admin
# user = "jit_reader"
# password_env = "PROD_DB_READER_PASSWORD"   # or password_file = "/run/secrets/reader"
#
# A server in a private network, reached through jitgate-agent (README: "Targets behind an agent"):
# [[targets]]
# name = "east-db"
# via = "db-east"                     # no address: the agent's config has it
# database = "app"

# Engineers get their own certificates with `jitgate login`: from invite codes
# (`jitgate user invite`), or single sign-on with an [oidc] table (README: "Logging in (SSO)").
"#;

/// The API client for a command: flags and environment first, then `--data-dir` (the admin
/// identity), then the profile `jitgate login` wrote (~/.jitgate/).
pub(crate) fn api_client(a: &ApiArgs) -> Result<ApiClient> {
    let dir = a.data_dir.as_deref();
    let from_dir = |name: &str| dir.map(|d| d.join(name));
    let profile = crate::login::profile::settings();
    let from_profile = |name: &str| match dir {
        None => crate::login::profile::file(name),
        Some(_) => None,
    };
    let api = match (&a.api, dir, &profile) {
        (Some(api), _, _) => api.clone(),
        (None, Some(d), _) => api_from_config(&d.join("jitgate.toml"))?,
        (None, None, Some(p)) => p.api.clone(),
        (None, None, None) => {
            bail!("no API address: pass --api HOST:PORT (or JITGATE_API), or --data-dir DIR, or run jitgate login")
        }
    };
    use crate::login::profile as p;
    let pick = |v: &Option<PathBuf>, name: &str, mine: &str, flag: &str| {
        v.clone()
            .or_else(|| from_dir(name))
            .or_else(|| from_profile(mine))
            .with_context(|| {
                format!(
                    "no {flag}: pass --{flag} (or JITGATE_{}), or --data-dir DIR, or run jitgate login",
                    flag.to_uppercase()
                )
            })
    };
    let cert = pick(&a.cert, files::ADMIN_CERT, p::CERT, "cert")?;
    let key = pick(&a.key, files::ADMIN_KEY, p::KEY, "key")?;
    let ca = pick(&a.ca, files::CA_CERT, p::CA, "ca")?;
    Ok(ApiClient::from_files(&api, &cert, &key, &ca)?)
}

/// `listen.api` of a config file (its secrets need not be available here).
fn api_from_config(path: &Path) -> Result<String> {
    let api = Config::load_without_secrets(path)?.listen.api.to_string();
    // A wildcard bind address is reached through loopback.
    Ok(api.replace("0.0.0.0", "127.0.0.1").replace("[::]", "[::1]"))
}

pub(crate) fn print_json<T: Serialize>(value: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn until(t: std::time::SystemTime) -> String {
    let left = t.duration_since(std::time::SystemTime::now()).unwrap_or_default();
    humantime::format_duration(Duration::from_secs(left.as_secs())).to_string()
}

async fn grant(cmd: GrantCommand, a: &ApiArgs) -> Result<()> {
    let client = api_client(a)?;
    match cmd {
        GrantCommand::Create {
            user,
            target,
            access,
            duration,
            reason,
        } => {
            let req = NewGrant {
                user: UserName::new(user)?,
                target: TargetName::new(target)?,
                access,
                duration_secs: duration.as_secs(),
                reason,
            };
            let g = client.create_grant(&req).await?;
            if a.json {
                print_json(&g)
            } else {
                println!("{}", g.id);
                Ok(())
            }
        }
        GrantCommand::List => {
            let grants = client.list_grants().await?;
            if a.json {
                return print_json(&grants);
            }
            println!(
                "{:<20} {:<16} {:<16} {:<6} {:<12} REASON",
                "ID", "USER", "TARGET", "ACCESS", "EXPIRES IN"
            );
            for g in grants {
                println!(
                    "{:<20} {:<16} {:<16} {:<6} {:<12} {}",
                    g.id,
                    g.user,
                    g.target,
                    g.access,
                    until(g.expires_at),
                    g.reason
                );
            }
            Ok(())
        }
        GrantCommand::Extend { id, duration } => {
            let g = client.extend_grant(&id, duration).await?;
            if a.json {
                print_json(&g)
            } else {
                println!(
                    "extended {} ({} on {}): ends in {}",
                    g.id,
                    g.user,
                    g.target,
                    until(g.expires_at)
                );
                Ok(())
            }
        }
        GrantCommand::Revoke { id } => {
            let g = client.revoke_grant(&id).await?;
            if a.json {
                print_json(&g)
            } else {
                println!("revoked {} ({} on {})", g.id, g.user, g.target);
                Ok(())
            }
        }
    }
}

async fn agent(cmd: AgentCommand, a: &ApiArgs) -> Result<()> {
    let client = api_client(a)?;
    match cmd {
        AgentCommand::Token {
            command: AgentTokenCommand::Create { name, targets, ttl },
        } => {
            let new = crate::agents::NewAgentToken {
                name: crate::model::AgentName::new(name)?,
                targets: targets.into_iter().map(TargetName::new).collect::<Result<_, _>>()?,
                ttl_secs: Some(ttl.as_secs().max(1)),
            };
            let t = client.create_agent_token(&new).await?;
            if a.json {
                return print_json(&t);
            }
            println!("{}", t.token);
            eprintln!(
                "one-time join token {} for agent {} ({}), usable for {}: jitgate-agent join --proxy HOST:PORT --token TOKEN --data-dir DIR",
                t.id,
                t.name,
                t.targets.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
                until(t.expires_at)
            );
            Ok(())
        }
        AgentCommand::Remove { name } => {
            let r = client.remove_agent(&name).await?;
            if a.json {
                return print_json(&r);
            }
            println!("removed agent {}", r.name);
            Ok(())
        }
        AgentCommand::List => {
            let agents = client.list_agents().await?;
            if a.json {
                return print_json(&agents);
            }
            println!(
                "{:<16} {:<24} {:<22} {:<22} {:<10} TARGETS",
                "NAME", "CONNECTED SINCE", "REMOTE", "JOINED", "VERSION"
            );
            for g in agents {
                let since = g
                    .connected_since
                    .map_or_else(|| "not connected".to_owned(), crate::timefmt::rfc3339);
                println!(
                    "{:<16} {:<24} {:<22} {:<22} {:<10} {}",
                    g.name,
                    since,
                    g.remote_addr.map_or_else(|| "-".to_owned(), |r| r.to_string()),
                    crate::timefmt::rfc3339(g.joined_at),
                    g.version.as_deref().unwrap_or("-"),
                    g.targets.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
                );
            }
            Ok(())
        }
    }
}

async fn session(cmd: SessionCommand, a: &ApiArgs) -> Result<()> {
    let client = api_client(a)?;
    match cmd {
        SessionCommand::List => {
            let sessions = client.list_sessions().await?;
            if a.json {
                return print_json(&sessions);
            }
            // The REPLICA column only when replicas share a store.
            let cluster = sessions.iter().any(|s| s.replica.is_some());
            let replica = |r: Option<&str>| match cluster {
                true => format!("{:<16} ", r.unwrap_or("-")),
                false => String::new(),
            };
            println!(
                "{:<20} {}{:<16} {:<16} {:<6} {:<22} {:>10} {:>10}",
                "ID",
                replica(Some("REPLICA")),
                "USER",
                "TARGET",
                "ACCESS",
                "CLIENT",
                "BYTES IN",
                "BYTES OUT"
            );
            for s in sessions {
                println!(
                    "{:<20} {}{:<16} {:<16} {:<6} {:<22} {:>10} {:>10}",
                    s.id,
                    replica(s.replica.as_deref()),
                    s.user,
                    s.target,
                    s.access,
                    s.client_addr,
                    s.bytes_from_client,
                    s.bytes_to_client
                );
            }
            Ok(())
        }
        SessionCommand::Kill { id } => {
            let k = client.kill_session(&id).await?;
            if a.json {
                print_json(&k)
            } else {
                match &k.replica {
                    Some(r) => println!("killed {} (on replica {r})", k.id),
                    None => println!("killed {}", k.id),
                }
                Ok(())
            }
        }
    }
}

/// `jitgate slack ...`.
#[derive(Debug, clap::Subcommand)]
pub enum SlackCommand {
    /// Offer SLACK_USER_ID (your member ID: in Slack, your profile's menu, Copy member ID) a
    /// link to your jitgate user and roles; the bot asks that account to confirm.
    Link { slack_user_id: String },
}

async fn slack(cmd: SlackCommand, a: &ApiArgs) -> anyhow::Result<()> {
    match cmd {
        SlackCommand::Link { slack_user_id } => {
            let client = api_client(a)?;
            let offered: crate::api::SlackLinkOffered = client
                .post(
                    "/v1/slack/links",
                    &crate::api::SlackLinkBody {
                        slack_user: slack_user_id,
                    },
                )
                .await?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&offered)?);
            } else {
                println!("{}", offered.message);
            }
            Ok(())
        }
    }
}
