//! End-to-end harness: a throwaway PostgreSQL cluster, an in-process jitgate on loopback
//! ports, user certificates from its CA, and clients (real psql/pgbench, the control API, and
//! a raw protocol client for corners psql will not produce). Everything stops and is removed
//! when the [`Harness`] drops, also when a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod agent;
pub mod raw;
pub mod replicas;
pub mod ssh;

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use jitgate::client::ApiClient;
use jitgate::config::Config;
use jitgate::model::{AccessLevel, Grant, NewGrant, Role, TargetName, UserName};
use jitgate::pki::{self, files, Authority};
use jitgate::sandbox::{self, LocalPostgres, PgOptions};
use jitgate::server::{BoundAddrs, Listeners, ServerError};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

pub use jitgate;

/// Passwords of the target roles (the engineer never sees these).
pub const READER_PASSWORD: &str = "reader-secret-pw";
pub const WRITER_PASSWORD: &str = "writer-secret-pw";
pub const MD5_PASSWORD: &str = "md5-secret-pw";
pub const ADMIN_PASSWORD: &str = "admin-secret-pw";

/// The `[[policies]]` of the request-workflow issue: auto-approved staging for developers,
/// production reads with two approvals (dba or lead) and break-glass.
pub const EXAMPLE_POLICIES: &str = r#"
[[policies]]
name = "dev-staging"
roles = ["dev"]
targets = { env = "staging" }
access = ["read", "write"]
max_duration = "4h"
approve = "auto"

[[policies]]
name = "dev-prod-read"
roles = ["dev"]
targets = { env = "prod" }
access = ["read"]
max_duration = "1h"
approvers = ["dba", "lead"]
approvals = 2
break_glass = true
"#;

/// Harness knobs.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// `limits.handshake_timeout` (default 10s).
    pub handshake_timeout: Option<&'static str>,
    /// More `[limits]` lines, e.g. `max_sessions_per_user = 2`.
    pub limits: &'static str,
    /// Serve TLS on the PostgreSQL cluster and add target `tls-db` with `verify-full`.
    pub upstream_tls: bool,
    /// Open the agent listener on this address (`127.0.0.1:0`, or an address of a test's
    /// network namespace) and add target `agent-db`, reached through agent `db-east`.
    pub agents_listen: Option<String>,
    /// Lines of `[agents]` (e.g. short keepalives), with `agents_listen`.
    pub agents: &'static str,
    /// Start a real sshd, open the SSH listener and add SSH targets `web-1` (pinned to the
    /// sshd's host key), `web-bad` (pinned to another key) and `web-fwd` (web-1's host, with
    /// port forwarding allowed).
    pub ssh: bool,
    /// A `[store]` table (the shared PostgreSQL store), verbatim.
    pub store: Option<String>,
}

/// A client identity on disk.
#[derive(Debug, Clone)]
pub struct UserCert {
    pub user: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

struct Running {
    addrs: BoundAddrs,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), ServerError>>,
}

/// One test's world.
pub struct Harness {
    pub pg: LocalPostgres,
    /// The SSH target's server, with `Options::ssh`.
    pub sshd: Option<ssh::LocalSshd>,
    data: tempfile::TempDir,
    config_path: PathBuf,
    running: Option<Running>,
    admin: Option<ApiClient>,
}

impl Harness {
    /// Starts PostgreSQL and jitgate with default options.
    pub async fn start() -> Harness {
        Self::start_with(Options::default()).await
    }

    /// Starts PostgreSQL and jitgate.
    pub async fn start_with(opts: Options) -> Harness {
        let data = tempfile::Builder::new().prefix("jitgate-test-").tempdir().unwrap();
        jitgate::cli::init_data_dir(data.path(), &[], Duration::from_secs(3600)).unwrap();
        let pg_tls = opts.upstream_tls.then(|| {
            let ca = Authority::generate().unwrap();
            std::fs::write(data.path().join("pg-ca.crt"), ca.cert_pem()).unwrap();
            ca.issue_server(&["127.0.0.1".into(), "localhost".into()]).unwrap()
        });
        let pg = tokio::task::spawn_blocking(move || LocalPostgres::start(&PgOptions { tls: pg_tls }))
            .await
            .unwrap()
            .expect("start PostgreSQL (is the postgresql package installed? scripts/test installs it)");
        pg.sql("postgres", "CREATE DATABASE app").unwrap();
        pg.sql("postgres", "CREATE DATABASE other").unwrap();
        pg.sql(
            "postgres",
            &format!(
                "CREATE ROLE jit_reader LOGIN PASSWORD '{READER_PASSWORD}';
                 CREATE ROLE jit_writer LOGIN PASSWORD '{WRITER_PASSWORD}';
                 CREATE ROLE jit_trust LOGIN;
                 CREATE ROLE jit_admin LOGIN SUPERUSER PASSWORD '{ADMIN_PASSWORD}';
                 GRANT jit_reader TO jit_writer;
                 SET password_encryption = 'md5';
                 CREATE ROLE jit_md5 LOGIN PASSWORD '{MD5_PASSWORD}';"
            ),
        )
        .unwrap();
        pg.sql(
            "app",
            "CREATE TABLE items (id int PRIMARY KEY, name text);
             INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 100) g;
             GRANT SELECT ON ALL TABLES IN SCHEMA public TO jit_reader, jit_md5;
             GRANT ALL ON SCHEMA public TO jit_writer;
             GRANT ALL ON ALL TABLES IN SCHEMA public TO jit_writer;",
        )
        .unwrap();
        for (name, pw) in [
            ("reader", READER_PASSWORD),
            ("writer", WRITER_PASSWORD),
            ("md5", MD5_PASSWORD),
            ("admin", ADMIN_PASSWORD),
        ] {
            pki::write_file(&data.path().join(format!("{name}.password")), pw, true).unwrap();
        }
        let d = data.path().display();
        let mut config = format!(
            r#"data_dir = "{d}"
{store}
[listen]
postgres = "127.0.0.1:0"
api = "127.0.0.1:0"
metrics = "127.0.0.1:0"
[limits]
handshake_timeout = "{handshake}"
shutdown_grace = "2s"
{limits}

[[targets]]
name = "prod-db"
kind = "postgres"
address = "{addr}"
database = "app"
labels = {{ env = "prod" }}
[targets.credentials.read]
user = "jit_reader"
password_file = "{d}/reader.password"
[targets.credentials.write]
user = "jit_writer"
password_file = "{d}/writer.password"
[targets.credentials.admin]
user = "jit_admin"
password_file = "{d}/admin.password"

[[targets]]
name = "guarded-db"
address = "{addr}"
database = "app"
[targets.credentials.write]
user = "jit_writer"
password_file = "{d}/writer.password"
[[targets.guardrails]]
access = ["write", "admin"]
deny_kinds = ["drop", "truncate", "alter_system", "copy_program"]
deny_unfiltered_writes = true

[[targets]]
name = "trust-db"
address = "{addr}"
database = "app"
[targets.credentials.read]
user = "jit_trust"

[[targets]]
name = "md5-db"
address = "{addr}"
database = "app"
[targets.credentials.read]
user = "jit_md5"
password_file = "{d}/md5.password"
"#,
            handshake = opts.handshake_timeout.unwrap_or("10s"),
            limits = opts.limits,
            store = opts.store.as_deref().unwrap_or(""),
            addr = pg.address(),
        );
        if opts.upstream_tls {
            config.push_str(&format!(
                r#"
[[targets]]
name = "tls-db"
address = "{addr}"
database = "app"
[targets.credentials.read]
user = "jit_reader"
password_file = "{d}/reader.password"
[targets.tls]
mode = "verify-full"
ca_file = "{d}/pg-ca.crt"
"#,
                addr = pg.address()
            ));
        }
        if let Some(listen) = &opts.agents_listen {
            config = config.replacen(
                "metrics = \"127.0.0.1:0\"\n",
                &format!("metrics = \"127.0.0.1:0\"\nagents = \"{listen}\"\n"),
                1,
            );
            config.push_str(&format!(
                r#"
[[targets]]
name = "agent-db"
via = "db-east"
database = "app"
labels = {{ env = "prod" }}
[targets.credentials.read]
user = "jit_reader"
password_file = "{d}/reader.password"
[targets.credentials.write]
user = "jit_writer"
password_file = "{d}/writer.password"

[agents]
{agents}
"#,
                agents = opts.agents,
            ));
        }
        let sshd = opts.ssh.then(ssh::LocalSshd::start);
        if let Some(sshd) = &sshd {
            config = config.replacen(
                "metrics = \"127.0.0.1:0\"\n",
                "metrics = \"127.0.0.1:0\"\nssh = \"127.0.0.1:0\"\n",
                1,
            );
            let user = ssh::UPSTREAM_USER;
            let wrong = std::fs::read_to_string(sshd.dir.path().join("upstream_key.pub")).unwrap();
            for (name, host_key, extra) in [
                ("web-1", sshd.host_key(), ""),
                ("web-bad", wrong.trim().to_owned(), ""),
                ("web-fwd", sshd.host_key(), "allow_port_forwarding = true"),
            ] {
                config.push_str(&format!(
                    r#"
[[targets]]
name = "{name}"
kind = "ssh"
address = "{addr}"
host_key = "{host_key}"
{extra}
labels = {{ env = "prod-hosts" }}
[targets.credentials.write]
user = "{user}"
key_file = "{key}"
"#,
                    addr = sshd.address(),
                    key = sshd.upstream_key().display(),
                ));
            }
        }
        let config_path = data.path().join("test.toml");
        std::fs::write(&config_path, config).unwrap();
        let mut h = Harness {
            sshd,
            pg,
            data,
            config_path,
            running: None,
            admin: None,
        };
        h.start_proxy().await;
        h
    }

    /// The data directory (CA, store, audit log).
    pub fn data_dir(&self) -> &Path {
        self.data.path()
    }

    /// The config file the proxy runs with.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Rewrites the config file with `f` (takes effect at the next restart).
    pub fn edit_config(&self, f: impl FnOnce(String) -> String) {
        let text = std::fs::read_to_string(&self.config_path).unwrap();
        std::fs::write(&self.config_path, f(text)).unwrap();
    }

    /// Starts the proxy from the config file (new ports each time).
    pub async fn start_proxy(&mut self) {
        assert!(self.running.is_none(), "proxy already running");
        let config = Config::load(&self.config_path).unwrap();
        let listeners = Listeners::bind(&config.listen).await.unwrap();
        let addrs = listeners.addrs();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(jitgate::run(config, listeners, shutdown.clone().cancelled_owned()));
        let d = self.data.path();
        self.admin = Some(
            ApiClient::from_files(
                &addrs.api.to_string(),
                &d.join(files::ADMIN_CERT),
                &d.join(files::ADMIN_KEY),
                &d.join(files::CA_CERT),
            )
            .unwrap(),
        );
        self.running = Some(Running { addrs, shutdown, task });
        // Wait until the API answers (the server restores grants before serving).
        let admin = self.admin.clone().unwrap();
        eventually("API ready", Duration::from_secs(10), || {
            let admin = admin.clone();
            async move { admin.whoami().await.is_ok() }
        })
        .await;
    }

    /// Stops the proxy and waits for it to finish.
    pub async fn stop_proxy(&mut self) -> Result<(), ServerError> {
        let r = self.running.take().expect("proxy not running");
        r.shutdown.cancel();
        r.task.await.unwrap()
    }

    /// Stops the proxy, appends `extra` to its config file and starts it again.
    pub async fn reconfigure(&mut self, extra: &str) {
        self.stop_proxy().await.unwrap();
        self.edit_config(|c| format!("{c}\n{extra}\n"));
        self.start_proxy().await;
    }

    /// Stops and starts the proxy with the same data directory.
    pub async fn restart_proxy(&mut self) {
        self.stop_proxy().await.unwrap();
        self.start_proxy().await;
    }

    /// Bound listener addresses.
    pub fn addrs(&self) -> BoundAddrs {
        self.running.as_ref().expect("proxy not running").addrs
    }

    /// Admin API client.
    pub fn admin(&self) -> &ApiClient {
        self.admin.as_ref().expect("proxy not running")
    }

    /// An API client presenting `user`'s certificate.
    pub fn api_as(&self, user: &UserCert) -> ApiClient {
        ApiClient::from_files(&self.addrs().api.to_string(), &user.cert, &user.key, &user.ca).unwrap()
    }

    /// `JITGATE_*` variables that make the `jitgate` CLI talk to this proxy as `user`.
    pub fn cli_env(&self, user: &UserCert) -> Vec<(&'static str, String)> {
        vec![
            ("JITGATE_API", self.addrs().api.to_string()),
            ("JITGATE_CERT", user.cert.display().to_string()),
            ("JITGATE_KEY", user.key.display().to_string()),
            ("JITGATE_CA", user.ca.display().to_string()),
        ]
    }

    /// Runs the `jitgate` CLI as `user` against this proxy.
    pub async fn cli_as(&self, user: &UserCert, args: &[&str]) -> CliRun {
        let env = self.cli_env(user);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        run_jitgate(args, &env).await
    }

    /// `jitgate request TARGET --access read --for 30m --reason REASON --json` as `user`: the
    /// request as the CLI prints it.
    pub async fn request_read(&self, user: &UserCert, target: &str, reason: &str) -> serde_json::Value {
        let args = [
            "request", target, "--access", "read", "--for", "30m", "--reason", reason, "--json",
        ];
        self.cli_as(user, &args).await.json()
    }

    /// Issues a client certificate from the data directory's CA.
    pub fn user(&self, name: &str, roles: &[&str]) -> UserCert {
        self.user_with_ttl(name, roles, Duration::from_secs(3600))
    }

    /// Issues a client certificate valid for `ttl`.
    pub fn user_with_ttl(&self, name: &str, roles: &[&str], ttl: Duration) -> UserCert {
        let ca = Authority::load(self.data.path()).unwrap();
        let out = self.data.path().join("users").join(format!("{name}-{}", rand_suffix()));
        let roles: Vec<Role> = roles.iter().map(|r| Role::new(*r).unwrap()).collect();
        let (cert, key) = pki::issue_to_dir(&ca, &UserName::new(name).unwrap(), &roles, ttl, &out).unwrap();
        UserCert {
            user: name.into(),
            cert,
            key,
            ca: out.join(files::CA_CERT),
        }
    }

    /// Writes a certificate pair under a fresh directory and returns it as a user.
    pub fn user_from_pem(&self, name: &str, cert_pem: &str, key_pem: &str) -> UserCert {
        let out = self.data.path().join("users").join(format!("{name}-{}", rand_suffix()));
        std::fs::create_dir_all(&out).unwrap();
        let cert = out.join(format!("{name}.crt"));
        let key = out.join(format!("{name}.key"));
        pki::write_file(&cert, cert_pem, false).unwrap();
        pki::write_file(&key, key_pem, true).unwrap();
        let ca = out.join(files::CA_CERT);
        std::fs::copy(self.data.path().join(files::CA_CERT), &ca).unwrap();
        UserCert {
            user: name.into(),
            cert,
            key,
            ca,
        }
    }

    /// Creates a grant through the control API.
    pub async fn grant(&self, user: &str, target: &str, access: AccessLevel, duration: Duration) -> Grant {
        self.admin()
            .create_grant(&NewGrant {
                user: UserName::new(user).unwrap(),
                target: TargetName::new(target).unwrap(),
                access,
                duration_secs: duration.as_secs(),
                reason: "e2e test".into(),
            })
            .await
            .unwrap()
    }

    /// libpq connection string for `user` to `dbname` through the proxy.
    pub fn conninfo(&self, user: &UserCert, dbname: &str) -> String {
        format!(
            "host=127.0.0.1 port={} dbname={dbname} user={} sslmode=verify-full sslrootcert={} sslcert={} sslkey={} connect_timeout=10",
            self.addrs().postgres.port(),
            user.user,
            user.ca.display(),
            user.cert.display(),
            user.key.display()
        )
    }

    /// libpq connection string for a proxy listening on `port` (a proxy run as a process).
    pub fn conninfo_at(&self, user: &UserCert, dbname: &str, port: u16) -> String {
        format!(
            "host=127.0.0.1 port={port} dbname={dbname} user={} sslmode=verify-full sslrootcert={} sslcert={} sslkey={} connect_timeout=10",
            user.user,
            user.ca.display(),
            user.cert.display(),
            user.key.display()
        )
    }

    /// Runs `psql -c sql` through the proxy.
    pub async fn psql(&self, user: &UserCert, dbname: &str, sql: &str) -> PsqlOutput {
        self.psql_conninfo(&self.conninfo(user, dbname), sql).await
    }

    /// Runs `psql -c SQL1 -c SQL2 ...` (one session, one message per command).
    pub async fn psql_commands(&self, user: &UserCert, dbname: &str, commands: &[&str]) -> PsqlOutput {
        let mut cmd = client_command("psql");
        cmd.arg(self.conninfo(user, dbname))
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"]);
        for c in commands {
            cmd.args(["-c", c]);
        }
        let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
            .await
            .expect("psql did not finish within 120s")
            .unwrap();
        PsqlOutput::from(out)
    }

    /// Runs `psql -c sql` with an explicit connection string.
    pub async fn psql_conninfo(&self, conninfo: &str, sql: &str) -> PsqlOutput {
        let out = tokio::time::timeout(
            Duration::from_secs(120),
            client_command("psql")
                .arg(conninfo)
                .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
                .output(),
        )
        .await
        .expect("psql did not finish within 120s")
        .unwrap();
        PsqlOutput::from(out)
    }

    /// Runs `psql -c sql` straight against the cluster (not through the proxy), logging in as
    /// `role` with `password` over TCP (SCRAM): what an engineer holding that password could do.
    pub async fn direct_psql(&self, role: &str, password: &str, sql: &str) -> PsqlOutput {
        let conninfo = format!(
            "host=127.0.0.1 port={} user={role} dbname=app sslmode=disable",
            self.pg.port()
        );
        let out = tokio::time::timeout(
            Duration::from_secs(60),
            client_command("psql")
                .env("PGPASSWORD", password)
                .arg(conninfo)
                .args(["-X", "-A", "-t", "-w", "-c", sql])
                .output(),
        )
        .await
        .expect("psql did not finish within 60s")
        .unwrap();
        PsqlOutput::from(out)
    }

    /// Starts an interactive psql reading commands from a pipe; it stays idle until written to.
    pub fn psql_interactive(&self, user: &UserCert, dbname: &str) -> Child {
        client_command("psql")
            .arg(self.conninfo(user, dbname))
            .args(["-X", "-A", "-t"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    }

    /// Every audit record so far, parsed: the complete lines (the writer may be in the middle
    /// of appending the last one while it is read).
    pub fn audit(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.data.path().join("audit.jsonl")).unwrap_or_default();
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        complete
            .lines()
            .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
            .collect()
    }

    /// Audit records of one event kind.
    pub fn audit_events(&self, kind: &str) -> Vec<serde_json::Value> {
        self.audit().into_iter().filter(|e| e["event"] == kind).collect()
    }

    /// `GET path` on the metrics listener: (status line, body).
    pub async fn metrics_get(&self, path: &str) -> (String, String) {
        http_get(self.addrs().metrics, path).await
    }

    /// Number of backends the given target role holds on the cluster.
    pub fn backends_of(&self, role: &str) -> usize {
        self.pg
            .sql(
                "postgres",
                &format!("SELECT count(*) FROM pg_stat_activity WHERE usename = '{role}'"),
            )
            .unwrap()
            .parse()
            .unwrap()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown.cancel();
            r.task.abort();
        }
    }
}

/// psql's exit status and output.
#[derive(Debug)]
pub struct PsqlOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for PsqlOutput {
    fn from(o: Output) -> Self {
        PsqlOutput {
            success: o.status.success(),
            stdout: String::from_utf8_lossy(&o.stdout).trim().to_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

/// A PostgreSQL client program (psql, pgbench) from the same install as the server, with
/// libpq environment variables cleared so only the arguments count.
pub fn client_command(program: &str) -> Command {
    let path = sandbox::find_bin_dir()
        .map(|d| d.join(program))
        .unwrap_or_else(|_| PathBuf::from(program));
    let mut c = Command::new(path);
    for (k, _) in std::env::vars() {
        if k.starts_with("PG") {
            c.env_remove(k);
        }
    }
    c.env("PGCONNECT_TIMEOUT", "10");
    c.kill_on_drop(true);
    c
}

/// Statements in `pg_sleep` running on the cluster right now.
pub fn sleeping(h: &Harness) -> usize {
    h.pg.sql(
        "postgres",
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE 'SELECT pg_sleep%'",
    )
    .unwrap()
    .parse()
    .unwrap()
}

/// Sends one statement to an idle interactive psql, closes stdin and collects its stderr.
pub async fn poke_and_collect(mut psql: Child) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stdin = psql.stdin.take().unwrap();
    let _ = stdin.write_all(b"SELECT 1;\n").await;
    drop(stdin);
    let mut stderr = String::new();
    psql.stderr.take().unwrap().read_to_string(&mut stderr).await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(10), psql.wait()).await;
    stderr
}

/// Polls `check` every 50 ms until it is true; panics naming `what` after `limit`.
pub async fn eventually<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Minimal HTTP/1.1 GET over plain TCP: (status line, body).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (head.lines().next().unwrap_or_default().to_owned(), body.to_owned())
}

/// Value of a metric sample line `name{labels} value` in Prometheus text; 0 when absent.
pub fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels).and_then(|rest| rest.strip_prefix(' ')))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// What a run of the `jitgate` binary printed and returned.
#[derive(Debug)]
pub struct CliRun {
    pub ok: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CliRun {
    /// Stdout as JSON; panics (with the run) when the command failed.
    #[track_caller]
    pub fn json(&self) -> serde_json::Value {
        assert!(self.ok, "{self:?}");
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("{e}: {self:?}"))
    }
}

/// Runs the `jitgate` binary with `args`, `JITGATE_*` variables cleared and `env` set.
pub async fn run_jitgate(args: &[&str], env: &[(&str, &str)]) -> CliRun {
    let mut c = Command::new(jitgate_bin());
    c.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("JITGATE_") {
            c.env_remove(k);
        }
    }
    c.envs(env.iter().copied());
    let out = tokio::time::timeout(Duration::from_secs(60), c.output())
        .await
        .expect("jitgate finished")
        .unwrap();
    CliRun {
        ok: out.status.success(),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Waits until `SELECT 1` through `conninfo` succeeds: a proxy started as its own process is
/// serving.
pub async fn wait_until_serving(conninfo: &str) {
    eventually("proxy up", Duration::from_secs(20), || async move {
        client_command("psql")
            .arg(conninfo)
            .args(["-X", "-c", "SELECT 1"])
            .output()
            .await
            .is_ok_and(|o| o.status.success())
    })
    .await;
}

/// Path of the `jitgate` binary built next to the test executable, or `JITGATE_BIN` when set
/// (to run a test against another build, e.g. to show that it fails on the code before a fix).
pub fn jitgate_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("JITGATE_BIN") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap();
    let dir = if dir.ends_with("deps") {
        dir.parent().unwrap()
    } else {
        dir
    };
    let bin = dir.join("jitgate");
    assert!(
        bin.is_file(),
        "{} missing: run cargo build --workspace --bins --tests first (scripts/test does)",
        bin.display()
    );
    bin
}

pub(crate) fn rand_suffix() -> String {
    format!("{:08x}", rand_u32())
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    h.finish() as u32
}

/// `statement` records, in order, paired with their `statement.end` (if written yet).
pub fn statements(h: &Harness) -> Vec<(serde_json::Value, Option<serde_json::Value>)> {
    let all = h.audit();
    let ends: Vec<&serde_json::Value> = all.iter().filter(|e| e["event"] == "statement.end").collect();
    all.iter()
        .filter(|e| e["event"] == "statement")
        .map(|s| {
            let end = ends
                .iter()
                .find(|e| e["session_id"] == s["session_id"] && e["statement"] == s["statement"])
                .map(|e| (*e).clone());
            (s.clone(), end)
        })
        .collect()
}

/// `tests/NAME` with its npm packages installed (`module` present under node_modules):
/// scripts/test installs them, and so does the first test that finds them missing (`npm ci`
/// under a lock, as nextest runs tests in parallel processes).
pub fn npm_fixture(name: &str, module: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(name);
    if !dir.join("node_modules").join(module).is_dir() {
        let script = format!("[ -d node_modules/{module} ] || npm ci --no-audit --no-fund --loglevel=error");
        let status = std::process::Command::new("flock")
            .arg(dir.join(".npm-install.lock"))
            .args(["sh", "-c", &script])
            .current_dir(&dir)
            .status()
            .expect("flock and npm run (scripts/test installs Node.js)");
        assert!(status.success(), "npm ci in {} failed", dir.display());
    }
    dir
}

/// A real OpenID Provider (oidc-provider, tests/oidc/provider.mjs) on loopback, started with
/// `config` (client, accounts; see provider.mjs): the process (killed when dropped) and the
/// issuer URL.
pub async fn start_oidc_provider(config: &serde_json::Value) -> (tokio::process::Child, String) {
    use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _};
    let dir = npm_fixture("oidc", "oidc-provider");
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), config.to_string()).unwrap();
    let mut child = tokio::process::Command::new("node")
        .arg(dir.join("provider.mjs"))
        .arg(file.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("node runs (scripts/test installs Node.js)");
    let mut out = tokio::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(30), out.read_line(&mut line))
        .await
        .expect("the provider starts")
        .unwrap();
    let issuer = line
        .trim()
        .strip_prefix("READY ")
        .unwrap_or_else(|| panic!("provider said {line:?}"))
        .to_owned();
    // Keep draining stdout so the provider never blocks on a full pipe.
    tokio::spawn(async move {
        let mut sink = Vec::new();
        let _ = out.read_to_end(&mut sink).await;
    });
    // The config file is read at start; it may go now.
    drop(file);
    (child, issuer)
}

/// The host the console's single sign-on tests reach the proxy by (the provider's native
/// client may not register `https://localhost` or `https://127.0.0.1`): browsers map it to
/// 127.0.0.1, raw clients connect to the API address whatever the name.
pub const CONSOLE_SSO_HOST: &str = "console.jitgate.test";

/// A harness whose web console signs in at a real OpenID Provider (account `carol`, group
/// `db-admins` = role `dba`): the API on a port chosen first, so that the provider knows the
/// console's callback (`https://CONSOLE_SSO_HOST:PORT/ui/oidc/callback`). `extra` is added to
/// the config. Returns the harness, the provider (killed when dropped) and its issuer.
pub async fn console_sso_harness(extra: &str) -> (Harness, tokio::process::Child, String) {
    std::env::set_var("JITGATE_TEST_CONSOLE_OIDC_SECRET", "console-provider-secret");
    let port = sandbox::free_port().unwrap();
    let mut h = Harness::start().await;
    h.stop_proxy().await.unwrap();
    h.edit_config(|c| c.replace("api = \"127.0.0.1:0\"", &format!("api = \"127.0.0.1:{port}\"")));
    let callback = format!("https://{CONSOLE_SSO_HOST}:{port}/ui/oidc/callback");
    let (provider, issuer) = start_oidc_provider(&serde_json::json!({
        "client_id": "jitgate-console",
        "client_secret": "console-provider-secret",
        "redirect_uris": [callback],
        "accounts": { "carol": { "email": "carol@example.com", "groups": ["db-admins"] } },
    }))
    .await;
    h.edit_config(|c| {
        format!(
            "{c}\n{extra}\n[oidc]\nissuer = \"{issuer}\"\nclient_id = \"jitgate-console\"\n\
             client_secret_env = \"JITGATE_TEST_CONSOLE_OIDC_SECRET\"\nscopes = [\"openid\", \"email\", \"groups\"]\n\
             console_redirect_uri = \"{callback}\"\n[oidc.roles]\n\"db-admins\" = [\"dba\"]\n"
        )
    });
    h.start_proxy().await;
    assert_eq!(h.addrs().api.port(), port);
    (h, provider, issuer)
}
