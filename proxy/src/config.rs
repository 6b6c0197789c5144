//! Configuration: the TOML file as written (`Raw*`, serde with `deny_unknown_fields`), and the
//! validated [`Config`] the server runs with. Every field except `data_dir` has a default.
//! Secrets named by `password_env` / `password_file` are resolved at load time, so a missing
//! secret stops start-up instead of failing the first session.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::model::{AccessLevel, Role, TargetName};

/// A configuration problem, naming the offending key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    data_dir: PathBuf,
    #[serde(default)]
    listen: RawListen,
    #[serde(default)]
    tls: RawTls,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    sessions: RawSessions,
    #[serde(default)]
    requests: RawRequests,
    #[serde(default)]
    audit: RawAudit,
    #[serde(default)]
    targets: Vec<RawTarget>,
    #[serde(default)]
    webhooks: Vec<crate::notify::RawWebhook>,
    #[serde(default)]
    policies: Vec<crate::policy::RawPolicy>,
    #[serde(default)]
    agents: RawAgents,
    #[serde(default)]
    ssh: RawSsh,
    #[serde(default)]
    store: RawStore,
    oidc: Option<RawOidc>,
    #[serde(default)]
    enrollment: RawEnrollment,
    slack: Option<RawSlack>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSlack {
    signing_secret_env: Option<String>,
    signing_secret_file: Option<PathBuf>,
    bot_token_env: Option<String>,
    bot_token_file: Option<PathBuf>,
    api_url: Option<String>,
    console_url: Option<String>,
    link_ttl: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOidc {
    issuer: String,
    client_id: String,
    client_secret_env: Option<String>,
    client_secret_file: Option<PathBuf>,
    scopes: Option<Vec<String>>,
    user_claim: Option<String>,
    groups_claim: Option<String>,
    #[serde(default)]
    roles: BTreeMap<String, Vec<String>>,
    allowed_domains: Option<Vec<String>>,
    max_cert_ttl: Option<String>,
    ca_file: Option<PathBuf>,
    console_redirect_uri: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEnrollment {
    cert_ttl: Option<String>,
    max_lifetime: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    url: Option<String>,
    replica_id: Option<String>,
    password_env: Option<String>,
    password_file: Option<PathBuf>,
    #[serde(default)]
    tls: RawUpstreamTls,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSsh {
    #[serde(default)]
    record_input: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgents {
    cert_ttl: Option<String>,
    keepalive_interval: Option<String>,
    keepalive_timeout: Option<String>,
    advertise: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListen {
    #[serde(default = "default_pg_listen")]
    postgres: String,
    #[serde(default = "default_api_listen")]
    api: String,
    #[serde(default = "default_metrics_listen")]
    metrics: String,
    agents: Option<String>,
    ssh: Option<String>,
}

impl Default for RawListen {
    fn default() -> Self {
        Self {
            postgres: default_pg_listen(),
            api: default_api_listen(),
            metrics: default_metrics_listen(),
            agents: None,
            ssh: None,
        }
    }
}

fn default_pg_listen() -> String {
    "127.0.0.1:5433".into()
}
fn default_api_listen() -> String {
    "127.0.0.1:8443".into()
}
fn default_metrics_listen() -> String {
    "127.0.0.1:9187".into()
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca_cert: Option<PathBuf>,
    server_cert: Option<PathBuf>,
    server_key: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSessions {
    expiry_notice: Option<String>,
    threads: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRequests {
    lapse_after: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_connections: Option<usize>,
    max_unauthenticated: Option<usize>,
    max_sessions_per_user: Option<usize>,
    handshake_timeout: Option<String>,
    upstream_connect_timeout: Option<String>,
    max_startup_message_bytes: Option<usize>,
    max_message_bytes: Option<usize>,
    shutdown_grace: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    path: Option<PathBuf>,
    max_file_bytes: Option<u64>,
    fsync_interval: Option<String>,
    queue_depth: Option<usize>,
    max_statement_bytes: Option<usize>,
    max_param_bytes: Option<usize>,
    redact_params_matching: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    name: String,
    #[serde(default = "default_kind")]
    kind: String,
    address: Option<String>,
    via: Option<String>,
    database: Option<String>,
    host_key: Option<String>,
    known_hosts: Option<PathBuf>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    credentials: RawCredentials,
    /// `[targets.manager]`: the role that creates and drops ephemeral roles.
    manager: Option<RawCredential>,
    /// `[targets.on_end]`: what happens to objects an ephemeral role owns when it is dropped.
    on_end: Option<RawOnEnd>,
    #[serde(default)]
    tls: RawUpstreamTls,
    #[serde(default)]
    guardrails: Vec<RawDenyRule>,
    #[serde(default)]
    allow_role_management: bool,
    #[serde(default)]
    allow_port_forwarding: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDenyRule {
    access: Option<Vec<String>>,
    #[serde(default)]
    deny_kinds: Vec<String>,
    #[serde(default)]
    deny_unfiltered_writes: bool,
}

fn default_kind() -> String {
    "postgres".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCredential {
    user: String,
    password_env: Option<String>,
    password_file: Option<PathBuf>,
    key_env: Option<String>,
    key_file: Option<PathBuf>,
}

/// `[targets.credentials]`: the mode, and one table per access level.
#[derive(Debug, Default, Deserialize)]
struct RawCredentials {
    mode: Option<String>,
    connection_limit: Option<i64>,
    #[serde(flatten)]
    levels: BTreeMap<String, RawCredential>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOnEnd {
    reassign_to: Option<String>,
    #[serde(default)]
    drop_owned: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstreamTls {
    mode: Option<String>,
    ca_file: Option<PathBuf>,
    server_name: Option<String>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Directory holding the CA, server certificate, grant store and audit log.
    pub data_dir: PathBuf,
    pub listen: Listen,
    pub tls: TlsPaths,
    pub limits: Limits,
    pub sessions: SessionsConfig,
    pub requests: RequestsConfig,
    pub audit: AuditConfig,
    /// Grant store (SQLite). Always `DATA_DIR/jitgate.db`.
    pub store_path: PathBuf,
    pub targets: Arc<HashMap<TargetName, Arc<Target>>>,
    /// `[[webhooks]]`: where notifications go (see [`crate::notify`]). Default: none.
    pub webhooks: Vec<crate::notify::WebhookConfig>,
    /// Access policies (`[[policies]]`), validated against the targets. Default: none, so
    /// every request is refused.
    pub policies: Arc<crate::policy::Policies>,
    /// Every role jitgate logs in with, on any target: no statement may change them (see
    /// `Target::allow_role_management`). An entry ending in `*` stands for every role whose
    /// name starts with what comes before it (the temporary roles of ephemeral targets).
    pub login_roles: Arc<[String]>,
    /// `[agents]`: the agent listener's settings.
    pub agents: AgentsConfig,
    /// `[ssh]`: how SSH sessions are recorded.
    pub ssh: SshConfig,
    /// `[store]`: the shared PostgreSQL store, or `None` for SQLite.
    pub store: Option<StoreConfig>,
    /// `[oidc]`: single sign-on for `jitgate login`, or `None` (invites only).
    pub oidc: Option<Arc<OidcConfig>>,
    /// `[enrollment]`: certificates from invites and renewals.
    pub enrollment: EnrollmentConfig,
    /// `[slack]`: approvals in Slack (see [`crate::slack`]), or `None`.
    pub slack: Option<Arc<SlackConfig>>,
}

/// `[slack]`: the Slack app that posts requests with Approve and Deny buttons and receives the
/// clicks. Which channel a request goes to is its policy's `slack_channel`.
#[derive(Clone)]
pub struct SlackConfig {
    /// The app's signing secret: every interaction must carry its HMAC. `None` only when the
    /// config was read without secrets.
    pub signing_secret: Option<String>,
    /// The bot token (`xoxb-...`) for `chat.postMessage` and `chat.update`.
    pub bot_token: Option<String>,
    /// The Web API base, default `https://slack.com/api` (`http://` only on loopback).
    pub api_url: String,
    /// Where the web console is, for policies with `approve_in_chat = false`.
    pub console_url: Option<String>,
    /// How long a linked Slack account approves with the roles it was linked with. Default 30d.
    pub link_ttl: Duration,
}

impl std::fmt::Debug for SlackConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlackConfig")
            .field("api_url", &self.api_url)
            .field("console_url", &self.console_url)
            .field("link_ttl", &self.link_ttl)
            .finish_non_exhaustive()
    }
}

/// `[oidc]`: the identity provider `jitgate login` signs engineers in with. The proxy is the
/// OpenID Connect client: it asks the provider for device and authorization codes, redeems
/// them itself (so `client_secret` never leaves it) and verifies the ID token it gets back.
#[derive(Clone)]
pub struct OidcConfig {
    /// The issuer URL: `https://...`, or `http://` on a loopback address (for tests).
    pub issuer: String,
    pub client_id: String,
    pub client_secret: Option<String>,
    /// Default `["openid", "email", "profile"]`; `openid` is always sent.
    pub scopes: Vec<String>,
    /// The ID token claim naming the jitgate user. Default `email`.
    pub user_claim: String,
    /// The ID token claim listing the user's groups. Default `groups`.
    pub groups_claim: String,
    /// Group to jitgate roles. A login whose groups map to no role is refused.
    pub roles: BTreeMap<String, Vec<Role>>,
    /// When set, the `email` claim must be verified and in one of these domains.
    pub allowed_domains: Option<Vec<String>>,
    /// Longest a certificate from a login lives. Default 12h, at most 7d.
    pub max_cert_ttl: Duration,
    /// Extra CA certificates (PEM) trusted for the provider's TLS, besides the system's.
    pub ca_file: Option<PathBuf>,
    /// Where the provider sends browsers back to the web console
    /// (`https://PROXY:PORT/ui/oidc/callback`, registered with the provider); `None`: the
    /// console signs in with client certificates only.
    pub console_redirect_uri: Option<String>,
}

impl std::fmt::Debug for OidcConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OidcConfig")
            .field("issuer", &self.issuer)
            .field("client_id", &self.client_id)
            .field("client_secret", &self.client_secret.as_ref().map(|_| "<redacted>"))
            .field("roles", &self.roles)
            .finish_non_exhaustive()
    }
}

/// `[enrollment]`: certificates for people who signed up with an invite code.
#[derive(Debug, Clone)]
pub struct EnrollmentConfig {
    /// Lifetime of each certificate an invite or a renewal gives. Default 12h.
    pub cert_ttl: Duration,
    /// An enrollment ends this long after its invite was redeemed; renewals stop there.
    /// Default 30d.
    pub max_lifetime: Duration,
}

/// `[store]`: a shared PostgreSQL store for several replicas. Absent: the embedded SQLite
/// file `DATA_DIR/jitgate.db`.
#[derive(Clone)]
pub struct StoreConfig {
    /// `postgresql://USER@HOST:PORT/DB` (a libpq-style URL; no password in it).
    pub url: String,
    pub password: Option<String>,
    /// `tls.mode`: `disable` or `verify-full` (with `tls.ca_file` and optionally
    /// `tls.server_name`).
    pub tls: UpstreamTls,
    /// `replica_id`: this replica's name in the cluster (session listings, cancel routing,
    /// audit records). 1 to 63 of `A-Za-z0-9._-`; unique per replica. Default: the host name.
    pub replica_id: String,
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreConfig")
            .field("url", &self.url)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls)
            .field("replica_id", &self.replica_id)
            .finish()
    }
}

/// `[ssh]`.
#[derive(Debug, Clone)]
pub struct SshConfig {
    /// Shell recordings' directory: always `DATA_DIR/recordings`.
    pub recordings_dir: PathBuf,
    /// Record keystrokes as well as output (`record_input`). Default `false`: input holds
    /// passwords typed at prompts that do not echo.
    pub record_input: bool,
}

/// How the proxy treats agents (`[agents]`; the listener is `listen.agents`).
#[derive(Debug, Clone)]
pub struct AgentsConfig {
    /// Lifetime of the certificates agents get at join and renewal. Default 24h; between 10s
    /// and 30d. Agents renew when two thirds of it have passed.
    pub cert_ttl: Duration,
    /// How often the proxy pings each agent link. Default 10s.
    pub keepalive_interval: Duration,
    /// A ping unanswered this long ends the link and its sessions. Default 30s.
    pub keepalive_timeout: Duration,
    /// `advertise`: where agents reach this replica's agent listener, `host:port`, told to
    /// every agent so each links to every replica on the shared store. Default:
    /// `listen.agents`, unless that is an unspecified address (`0.0.0.0`, `[::]`): then
    /// none, and agents learn of this replica only if they joined it.
    pub advertise: Option<String>,
}

/// Listener addresses.
#[derive(Debug, Clone)]
pub struct Listen {
    pub postgres: SocketAddr,
    pub api: SocketAddr,
    pub metrics: SocketAddr,
    /// Where agents connect (`listen.agents`); no agent listener when absent.
    pub agents: Option<SocketAddr>,
    /// Where `ssh` clients connect (`listen.ssh`); no SSH listener when absent.
    pub ssh: Option<SocketAddr>,
}

/// Certificate files the proxy serves with and trusts.
#[derive(Debug, Clone)]
pub struct TlsPaths {
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

/// How live sessions are treated.
#[derive(Debug, Clone)]
pub struct SessionsConfig {
    /// How long before its grant ends a session gets a NOTICE saying so. Default 5m; 0s
    /// turns the notice off.
    pub expiry_notice: Duration,
    /// Threads that run sessions, each with its own event loop (`0`: one per CPU).
    pub threads: usize,
}

/// How access requests are handled (`[requests]`).
#[derive(Debug, Clone)]
pub struct RequestsConfig {
    /// A request still pending this long after it was filed lapses (state `lapsed`) and can no
    /// longer be approved. Default 1h; between 1s and 7d.
    pub lapse_after: Duration,
}

/// Bounds on resources and waits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections past the TLS handshake with a valid certificate, per listener: on the
    /// postgres listener, sessions and connections about to start one. Over it a client gets
    /// `53300` (the API: `503`). Default 10,000.
    pub max_connections: usize,
    /// Connections that have not yet presented a valid certificate, per listener. When full,
    /// a new connection evicts an older one (the oldest of the source holding the most).
    /// Default 128.
    pub max_unauthenticated: usize,
    /// Live PostgreSQL sessions of one user. Over it the client gets `53300`. Default 100.
    pub max_sessions_per_user: usize,
    /// Deadline from accept for the TLS handshake plus the startup message (the API: the TLS
    /// handshake, and each request's headers). Default 5s.
    pub handshake_timeout: Duration,
    /// Deadline for connecting and logging in to a target. Default 10s.
    pub upstream_connect_timeout: Duration,
    /// Largest startup message accepted, in bytes. Default 10,000 (PostgreSQL's own cap).
    pub max_startup_message_bytes: usize,
    /// Largest message a client may send after startup, in bytes (statements and their
    /// parameters are read whole to be audited). Default 16 MiB.
    pub max_message_bytes: usize,
    /// How long shutdown waits for sessions to end. Default 5s.
    pub shutdown_grace: Duration,
}

/// The audit log (`[audit]`).
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// Active audit file (hash-chained JSON lines); rotated files sit beside it as
    /// `PATH.<first seq>`. Default `DATA_DIR/audit.jsonl`.
    pub path: PathBuf,
    /// Where the chain's last `seq` and hash are kept outside the log, so a restart continues
    /// the chain when the log files were rotated or removed from outside. Always
    /// `DATA_DIR/audit.tip` (not a config key).
    pub tip_path: PathBuf,
    /// Size at which the active file is rotated, in bytes. At least 4096. Default 104857600
    /// (100 MiB).
    pub max_file_bytes: u64,
    /// Longest time a written record waits for `fsync`; records are synced in groups, never
    /// one by one. `0s` syncs after every batch. Default 1s.
    pub fsync_interval: Duration,
    /// Submissions that may wait for the writer; when full, new records are refused (and the
    /// actions they stand for with them). At least 16. Default 65536.
    pub queue_depth: usize,
    /// Longest statement text kept in a `statement` record, in bytes. 64 to 16777216.
    /// Default 65536.
    pub max_statement_bytes: usize,
    /// Longest bound parameter value kept in a `statement` record, in bytes. At most
    /// 1048576. Default 256.
    pub max_param_bytes: usize,
    /// Words matched case-insensitively against statement text: a statement that contains one
    /// has its bound parameter values redacted in its `statement` record. Default
    /// `["password", "secret", "token"]`.
    pub redact_params_matching: Vec<String>,
    /// This replica's id (`store.replica_id`) when replicas share a `[store]`: every record
    /// then carries `"replica":"<id>"` after `ts`, so each replica's log is a chain of its
    /// own that `jitgate audit verify` tells apart from the others'. `None` without a
    /// `[store]` (records carry no `replica` field). Not an `[audit]` key.
    pub replica: Option<String>,
}

/// What a target speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    Postgres,
    Ssh,
}

impl TargetKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Postgres => "postgres",
            Self::Ssh => "ssh",
        }
    }
}

/// A PostgreSQL server or SSH host reachable by the proxy.
#[derive(Debug)]
pub struct Target {
    pub name: TargetName,
    /// What the target speaks.
    pub kind: TargetKind,
    /// SSH targets: the pinned host keys (OpenSSH `type base64`), from `host_key` or
    /// `known_hosts`; empty for PostgreSQL.
    pub host_keys: Vec<String>,
    /// The agent that reaches this target (`via`), or `None` for a direct connection.
    pub via: Option<crate::model::AgentName>,
    /// `host:port` of the server; for a target behind an agent, `agent NAME` (for messages:
    /// the agent's config holds the address).
    pub address: String,
    /// Database used when the client's `dbname` names only the target.
    pub database: String,
    pub labels: BTreeMap<String, String>,
    /// Upstream login per access level; a level without credentials cannot be used. With
    /// `mode = "ephemeral"` the level's `user` is the role each temporary role is made a
    /// member of, and there is no password.
    pub credentials: HashMap<AccessLevel, Credential>,
    /// `credentials.mode`: one shared role per level (`static`) or a role per grant.
    pub mode: CredentialsMode,
    pub tls: UpstreamTls,
    /// Statement deny rules, on top of the read-only rule of `read` grants.
    pub guardrails: Vec<DenyRule>,
    /// Admin grants on this target may change the roles jitgate logs in with (passwords,
    /// validity, login, settings, names, memberships). Default `false`: no grant may.
    pub allow_role_management: bool,
    /// SSH targets: local port forwarding (`ssh -L`, `-W`, ProxyJump) through this target.
    /// Default `false`: refused (and audited).
    pub allow_port_forwarding: bool,
}

/// How the proxy logs in to a PostgreSQL target.
#[derive(Debug, Clone)]
pub enum CredentialsMode {
    /// Every grant of a level shares the level's configured role (the default).
    Static,
    /// A login role per grant, made by the manager and dropped when the grant ends
    /// ([`crate::credentials`]).
    Ephemeral(Arc<Ephemeral>),
}

/// `credentials.mode = "ephemeral"`: how temporary roles are made and ended.
#[derive(Debug)]
pub struct Ephemeral {
    /// `[targets.manager]`: a role with CREATEROLE that may grant the access-level roles.
    pub manager: Credential,
    /// `CONNECTION LIMIT` of each temporary role. Default 10.
    pub connection_limit: u32,
    /// `[targets.on_end]`: objects the role owns when it is dropped.
    pub on_end: OnEnd,
}

/// What becomes of the objects a temporary role owns when it is dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnEnd {
    /// `REASSIGN OWNED BY role TO name`, then `DROP OWNED` (its remaining privileges).
    ReassignTo(String),
    /// `DROP OWNED BY role`: the objects are dropped.
    DropOwned,
}

/// Default `credentials.connection_limit`.
pub const DEFAULT_CONNECTION_LIMIT: u32 = 10;

/// One `[[targets.guardrails]]` rule: statements it refuses for the access levels it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DenyRule {
    /// Levels the rule applies to. Default: every level.
    pub access: Vec<AccessLevel>,
    /// Statement kinds refused (`drop`, `truncate`, `alter_system`, `copy_program`, ...; see
    /// `jitgate_protocol::sql::KINDS`).
    pub kinds: Vec<String>,
    /// Refuse UPDATE and DELETE without WHERE.
    pub unfiltered_writes: bool,
}

/// How the proxy logs in to a target for one access level.
#[derive(Clone)]
pub struct Credential {
    pub user: String,
    /// `None` for `trust` authentication.
    pub password: Option<String>,
    /// The OpenSSH private key an SSH target is logged in with (`key_file` / `key_env`).
    pub ssh_key: Option<String>,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .field("ssh_key", &self.ssh_key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// TLS towards a target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamTls {
    /// Plain TCP (loopback or a trusted network only).
    Disable,
    /// TLS, certificate not verified.
    Require,
    /// TLS, certificate verified against `ca_file` for `server_name`.
    VerifyFull { ca_file: PathBuf, server_name: String },
}

/// Whether loading reads the secrets a config names (`serve`, `config check`) or only checks
/// how they are named (CLI commands that inspect a config where the secrets are not available).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Secrets {
    Resolve,
    Skip,
}

/// Names of a secret's keys in messages: the table, its `*_env` and `*_file` fields, and
/// the key the "not both" error names.
pub(crate) struct SecretKeys<'a> {
    pub table: &'a str,
    pub env: &'a str,
    pub file: &'a str,
    pub both: &'a str,
}

/// A secret given as `*_env` (an environment variable) or `*_file` (a file, trailing newline
/// removed), at most one of them. `None` when neither is set, or when `mode` skips secrets.
pub(crate) fn resolve_secret(
    keys: &SecretKeys<'_>,
    env: Option<String>,
    file: Option<PathBuf>,
    mode: Secrets,
) -> Result<Option<String>, ConfigError> {
    let value = match (env, file) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                keys.both,
                format!("set {} or {}, not both", keys.env, keys.file),
            ));
        }
        _ if mode == Secrets::Skip => None,
        (Some(var), None) => Some(std::env::var(&var).map_err(|_| {
            invalid(
                format!("{}.{}", keys.table, keys.env),
                format!("environment variable {var} is not set"),
            )
        })?),
        (None, Some(file)) => Some(
            std::fs::read_to_string(&file)
                .map_err(|e| {
                    invalid(
                        format!("{}.{}", keys.table, keys.file),
                        format!("{}: {e}", file.display()),
                    )
                })?
                .trim_end_matches(['\r', '\n'])
                .to_owned(),
        ),
        (None, None) => None,
    };
    Ok(value)
}

impl Config {
    /// Reads and validates a config file, resolving its secrets.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::load_with(path, Secrets::Resolve)
    }

    /// Reads and validates a config file without reading its secrets (passwords are `None`):
    /// for commands that inspect a config. Never serve or connect with the result.
    pub fn load_without_secrets(path: &Path) -> Result<Config, ConfigError> {
        Self::load_with(path, Secrets::Skip)
    }

    fn load_with(path: &Path, secrets: Secrets) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse_with(&text, path, secrets)
    }

    /// Parses and validates config text; `path` is used in messages only.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        Self::parse_with(text, path, Secrets::Resolve)
    }

    /// Parses and validates config text without reading its secrets (passwords are `None`),
    /// as [`Config::load_without_secrets`] does for a file: for fuzzing and inspection, never
    /// to serve with. `path` is used in messages only.
    pub fn parse_without_secrets(text: &str, path: &Path) -> Result<Config, ConfigError> {
        Self::parse_with(text, path, Secrets::Skip)
    }

    fn parse_with(text: &str, path: &Path, secrets: Secrets) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        raw.validate(secrets)
    }
}

impl Config {
    /// Opens every file the configuration names (certificates, keys, target CAs), so a typo
    /// stops start-up or `config check` instead of failing sessions later.
    pub fn check_files(&self) -> Result<(), ConfigError> {
        crate::tls::ServerTls::load(&self.tls).map_err(|e| invalid("tls", e.to_string()))?;
        let mut targets: Vec<_> = self.targets.values().collect();
        targets.sort_by(|a, b| a.name.cmp(&b.name));
        for t in targets {
            if let UpstreamTls::VerifyFull { ca_file, .. } = &t.tls {
                crate::tls::load_roots(ca_file)
                    .map_err(|e| invalid(format!("targets.{}.tls.ca_file", t.name), e.to_string()))?;
            }
        }
        Ok(())
    }
}

fn duration(key: &str, value: Option<&str>, default: Duration) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(default),
        Some(v) => humantime::parse_duration(v).map_err(|e| invalid(key, format!("{v:?} is not a duration ({e})"))),
    }
}

fn socket(key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    value
        .parse()
        .map_err(|_| invalid(key, format!("{value:?} is not an IP:port address")))
}

impl RawConfig {
    fn validate(self, secrets: Secrets) -> Result<Config, ConfigError> {
        let data_dir = self.data_dir;
        let listen = Listen {
            postgres: socket("listen.postgres", &self.listen.postgres)?,
            api: socket("listen.api", &self.listen.api)?,
            metrics: socket("listen.metrics", &self.listen.metrics)?,
            agents: self
                .listen
                .agents
                .as_deref()
                .map(|a| socket("listen.agents", a))
                .transpose()?,
            ssh: self
                .listen
                .ssh
                .as_deref()
                .map(|a| socket("listen.ssh", a))
                .transpose()?,
        };
        let tls = TlsPaths {
            ca_cert: self.tls.ca_cert.unwrap_or_else(|| data_dir.join("ca.crt")),
            server_cert: self.tls.server_cert.unwrap_or_else(|| data_dir.join("server.crt")),
            server_key: self.tls.server_key.unwrap_or_else(|| data_dir.join("server.key")),
        };
        let l = self.limits;
        let limits = Limits {
            max_connections: l.max_connections.unwrap_or(10_000),
            max_unauthenticated: l.max_unauthenticated.unwrap_or(128),
            max_sessions_per_user: l.max_sessions_per_user.unwrap_or(100),
            handshake_timeout: duration(
                "limits.handshake_timeout",
                l.handshake_timeout.as_deref(),
                Duration::from_secs(5),
            )?,
            upstream_connect_timeout: duration(
                "limits.upstream_connect_timeout",
                l.upstream_connect_timeout.as_deref(),
                Duration::from_secs(10),
            )?,
            max_startup_message_bytes: l
                .max_startup_message_bytes
                .unwrap_or(jitgate_protocol::postgres::MAX_STARTUP_LEN),
            max_message_bytes: l.max_message_bytes.unwrap_or(16 << 20),
            shutdown_grace: duration(
                "limits.shutdown_grace",
                l.shutdown_grace.as_deref(),
                Duration::from_secs(5),
            )?,
        };
        if limits.max_connections == 0 {
            return Err(invalid("limits.max_connections", "must be at least 1"));
        }
        if limits.max_unauthenticated == 0 {
            return Err(invalid("limits.max_unauthenticated", "must be at least 1"));
        }
        if limits.max_sessions_per_user == 0 {
            return Err(invalid("limits.max_sessions_per_user", "must be at least 1"));
        }
        if limits.handshake_timeout.is_zero() {
            return Err(invalid("limits.handshake_timeout", "must be more than 0s"));
        }
        if !(1024..=1 << 30).contains(&limits.max_message_bytes) {
            return Err(invalid(
                "limits.max_message_bytes",
                "must be between 1024 and 1073741824",
            ));
        }
        if !(64..=1 << 20).contains(&limits.max_startup_message_bytes) {
            return Err(invalid(
                "limits.max_startup_message_bytes",
                "must be between 64 and 1048576",
            ));
        }
        let audit = self.audit.validate(&data_dir)?;
        let mut targets = HashMap::new();
        for (i, t) in self.targets.into_iter().enumerate() {
            let target = t.validate(i, secrets)?;
            if targets.insert(target.name.clone(), Arc::new(target)).is_some() {
                return Err(invalid(format!("targets[{i}].name"), "duplicate target name"));
            }
        }
        let sessions = SessionsConfig {
            expiry_notice: duration(
                "sessions.expiry_notice",
                self.sessions.expiry_notice.as_deref(),
                Duration::from_secs(300),
            )?,
            threads: match self.sessions.threads {
                Some(n) if n > 1024 => {
                    return Err(invalid("sessions.threads", "at most 1024 (0: one per CPU)"));
                }
                n => n.unwrap_or(0),
            },
        };
        let lapse_after = duration(
            "requests.lapse_after",
            self.requests.lapse_after.as_deref(),
            Duration::from_secs(3600),
        )?;
        if !(Duration::from_secs(1)..=Duration::from_secs(7 * 86_400)).contains(&lapse_after) {
            return Err(invalid("requests.lapse_after", "must be between 1s and 7d"));
        }
        let requests = RequestsConfig { lapse_after };
        let agents = self.agents.validate(listen.agents)?;
        for t in targets.values() {
            if let (Some(via), None) = (&t.via, listen.agents) {
                return Err(invalid(
                    format!("targets.{}.via", t.name),
                    format!("target is reached through agent {via:?}, but listen.agents is not set"),
                ));
            }
        }
        let policies = Arc::new(crate::policy::validate(self.policies, &targets)?);
        let webhooks = crate::notify::validate_webhooks(self.webhooks, secrets)?;
        // Ephemeral targets add their manager and every temporary role (`jit_*`, a prefix).
        let mut login_roles: Vec<String> = targets
            .values()
            .flat_map(|t| {
                let ephemeral = match &t.mode {
                    CredentialsMode::Static => Vec::new(),
                    CredentialsMode::Ephemeral(e) => {
                        vec![e.manager.user.clone(), format!("{}*", crate::credentials::ROLE_PREFIX)]
                    }
                };
                t.credentials.values().map(|c| c.user.clone()).chain(ephemeral)
            })
            .collect();
        login_roles.sort();
        login_roles.dedup();
        let store = self.store.validate(secrets)?;
        let audit = AuditConfig {
            replica: store.as_ref().map(|s| s.replica_id.clone()),
            ..audit
        };
        let oidc = self.oidc.map(|o| o.validate(secrets)).transpose()?.map(Arc::new);
        let enrollment = self.enrollment.validate()?;
        let slack = self.slack.map(|s| s.validate(secrets)).transpose()?.map(Arc::new);
        if slack.is_none() {
            if let Some(p) = policies.iter().find(|p| p.slack_channel.is_some()) {
                return Err(invalid(
                    format!("policies.{}.slack_channel", p.name),
                    "set [slack] (the app's signing secret and bot token) to post to a channel",
                ));
            }
        }
        Ok(Config {
            slack,
            oidc,
            enrollment,
            store,
            ssh: SshConfig {
                recordings_dir: data_dir.join("recordings"),
                record_input: self.ssh.record_input,
            },
            agents,
            login_roles: login_roles.into(),
            webhooks,
            policies,
            sessions,
            requests,
            audit,
            store_path: data_dir.join("jitgate.db"),
            data_dir,
            listen,
            tls,
            limits,
            targets: Arc::new(targets),
        })
    }
}

impl RawSlack {
    fn validate(self, secrets: Secrets) -> Result<SlackConfig, ConfigError> {
        let signing = SecretKeys {
            table: "slack",
            env: "signing_secret_env",
            file: "signing_secret_file",
            both: "slack",
        };
        let signing_secret = resolve_secret(&signing, self.signing_secret_env, self.signing_secret_file, secrets)?;
        let bot = SecretKeys {
            table: "slack",
            env: "bot_token_env",
            file: "bot_token_file",
            both: "slack",
        };
        let bot_token = resolve_secret(&bot, self.bot_token_env, self.bot_token_file, secrets)?;
        if secrets == Secrets::Resolve {
            if signing_secret.as_deref().is_none_or(str::is_empty) {
                return Err(invalid(
                    "slack.signing_secret_env",
                    "set signing_secret_env or signing_secret_file: interactions are verified with it",
                ));
            }
            if bot_token.as_deref().is_none_or(str::is_empty) {
                return Err(invalid("slack.bot_token_env", "set bot_token_env or bot_token_file"));
            }
        }
        let api_url = self
            .api_url
            .unwrap_or_else(|| "https://slack.com/api".into())
            .trim_end_matches('/')
            .to_owned();
        if !issuer_allowed(&api_url) {
            return Err(invalid(
                "slack.api_url",
                format!("{api_url:?}: an https:// URL (http:// only on a loopback address)"),
            ));
        }
        let console_url = self.console_url.map(|u| u.trim_end_matches('/').to_owned());
        if let Some(u) = &console_url {
            if !u.starts_with("https://") && !u.starts_with("http://") {
                return Err(invalid("slack.console_url", format!("{u:?}: an http(s) URL")));
            }
        }
        let link_ttl = duration(
            "slack.link_ttl",
            self.link_ttl.as_deref(),
            Duration::from_secs(30 * 86_400),
        )?;
        if !(Duration::from_secs(60)..=Duration::from_secs(366 * 86_400)).contains(&link_ttl) {
            return Err(invalid("slack.link_ttl", "must be between 1m and 366d"));
        }
        Ok(SlackConfig {
            signing_secret,
            bot_token,
            api_url,
            console_url,
            link_ttl,
        })
    }
}

/// Longest certificate a login or a renewal may give.
const MAX_LOGIN_CERT_TTL: Duration = Duration::from_secs(7 * 86_400);

impl RawOidc {
    fn validate(self, secrets: Secrets) -> Result<OidcConfig, ConfigError> {
        let issuer = self.issuer.trim_end_matches('/').to_owned();
        if !issuer_allowed(&issuer) {
            return Err(invalid(
                "oidc.issuer",
                format!("{issuer:?}: an https:// URL (http:// only on a loopback address)"),
            ));
        }
        if self.client_id.is_empty() {
            return Err(invalid("oidc.client_id", "must not be empty"));
        }
        let keys = SecretKeys {
            table: "oidc",
            env: "client_secret_env",
            file: "client_secret_file",
            both: "oidc",
        };
        let client_secret = resolve_secret(&keys, self.client_secret_env, self.client_secret_file, secrets)?;
        let mut scopes = self
            .scopes
            .unwrap_or_else(|| vec!["openid".into(), "email".into(), "profile".into()]);
        if let Some(bad) = scopes.iter().find(|s| s.is_empty() || s.contains(char::is_whitespace)) {
            return Err(invalid("oidc.scopes", format!("{bad:?} is not a scope")));
        }
        if !scopes.iter().any(|s| s == "openid") {
            scopes.insert(0, "openid".into());
        }
        let mut roles = std::collections::BTreeMap::new();
        for (group, names) in self.roles {
            let key = format!("oidc.roles.{group:?}");
            if names.is_empty() {
                return Err(invalid(key, "map the group to at least one role"));
            }
            let names = names
                .into_iter()
                .map(Role::new)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| invalid(key, e.to_string()))?;
            roles.insert(group, names);
        }
        if roles.is_empty() {
            return Err(invalid(
                "oidc.roles",
                "map at least one group to roles: without a mapping every login is refused",
            ));
        }
        let max_cert_ttl = duration(
            "oidc.max_cert_ttl",
            self.max_cert_ttl.as_deref(),
            Duration::from_secs(12 * 3600),
        )?;
        if !(Duration::from_secs(60)..=MAX_LOGIN_CERT_TTL).contains(&max_cert_ttl) {
            return Err(invalid("oidc.max_cert_ttl", "must be between 1m and 7d"));
        }
        let allowed_domains = match self.allowed_domains {
            Some(d) if d.is_empty() => return Err(invalid("oidc.allowed_domains", "list at least one domain")),
            Some(d) => Some(
                d.into_iter()
                    .map(|d| d.trim_start_matches('@').to_ascii_lowercase())
                    .collect(),
            ),
            None => None,
        };
        let console_redirect_uri = self.console_redirect_uri.map(|u| u.trim().to_owned());
        if let Some(u) = &console_redirect_uri {
            if !issuer_allowed(u) || !u.ends_with("/ui/oidc/callback") {
                return Err(invalid(
                    "oidc.console_redirect_uri",
                    format!(
                        "{u:?}: the console's https://HOST:PORT/ui/oidc/callback (http:// only on a loopback address)"
                    ),
                ));
            }
        }
        Ok(OidcConfig {
            issuer,
            client_id: self.client_id,
            client_secret,
            scopes,
            user_claim: self.user_claim.unwrap_or_else(|| "email".into()),
            groups_claim: self.groups_claim.unwrap_or_else(|| "groups".into()),
            roles,
            allowed_domains,
            max_cert_ttl,
            ca_file: self.ca_file,
            console_redirect_uri,
        })
    }
}

/// `https://...`, or `http://` on a loopback address.
pub(crate) fn issuer_allowed(url: &str) -> bool {
    if let Some(rest) = url.strip_prefix("https://") {
        return !rest.is_empty();
    }
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let host = rest.split('/').next().unwrap_or("");
    let host = match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    matches!(host, "localhost" | "[::1]") || host.parse::<std::net::Ipv4Addr>().is_ok_and(|ip| ip.is_loopback())
}

impl RawEnrollment {
    fn validate(self) -> Result<EnrollmentConfig, ConfigError> {
        let cert_ttl = duration(
            "enrollment.cert_ttl",
            self.cert_ttl.as_deref(),
            Duration::from_secs(12 * 3600),
        )?;
        if !(Duration::from_secs(60)..=MAX_LOGIN_CERT_TTL).contains(&cert_ttl) {
            return Err(invalid("enrollment.cert_ttl", "must be between 1m and 7d"));
        }
        let max_lifetime = duration(
            "enrollment.max_lifetime",
            self.max_lifetime.as_deref(),
            Duration::from_secs(30 * 86_400),
        )?;
        if max_lifetime < cert_ttl || max_lifetime > Duration::from_secs(366 * 86_400) {
            return Err(invalid(
                "enrollment.max_lifetime",
                "must be at least enrollment.cert_ttl and at most 366d",
            ));
        }
        Ok(EnrollmentConfig { cert_ttl, max_lifetime })
    }
}

impl RawStore {
    fn validate(self, secrets: Secrets) -> Result<Option<StoreConfig>, ConfigError> {
        let Some(url) = self.url else {
            if self.password_env.is_some()
                || self.password_file.is_some()
                || self.tls.mode.is_some()
                || self.replica_id.is_some()
            {
                return Err(invalid("store.url", "required with the other [store] keys"));
            }
            return Ok(None);
        };
        let parsed: tokio_postgres::Config = url
            .parse()
            .map_err(|e| invalid("store.url", format!("not a PostgreSQL URL: {e}")))?;
        if parsed.get_password().is_some() {
            return Err(invalid(
                "store.url",
                "must not carry the password: use store.password_env or store.password_file",
            ));
        }
        if parsed.get_hosts().is_empty() {
            return Err(invalid("store.url", "names no host"));
        }
        let keys = SecretKeys {
            table: "store",
            env: "password_env",
            file: "password_file",
            both: "store",
        };
        let password = resolve_secret(&keys, self.password_env, self.password_file, secrets)?;
        let tls = match self.tls.mode.as_deref().unwrap_or("disable") {
            "disable" => UpstreamTls::Disable,
            "verify-full" => {
                let ca_file = self
                    .tls
                    .ca_file
                    .ok_or_else(|| invalid("store.tls.ca_file", "required with mode = \"verify-full\""))?;
                let server_name = match self.tls.server_name {
                    Some(n) => n,
                    None => match parsed.get_hosts().first() {
                        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
                        _ => return Err(invalid("store.tls.server_name", "required for this host")),
                    },
                };
                UpstreamTls::VerifyFull { ca_file, server_name }
            }
            other => {
                return Err(invalid(
                    "store.tls.mode",
                    format!("{other:?}: \"disable\" or \"verify-full\""),
                ))
            }
        };
        let replica_id = match self.replica_id {
            Some(id) if valid_replica_id(&id) => id,
            Some(id) => {
                return Err(invalid(
                    "store.replica_id",
                    format!("{id:?}: 1 to 63 of A-Z, a-z, 0-9, '.', '_' and '-'"),
                ))
            }
            None => default_replica_id(),
        };
        Ok(Some(StoreConfig {
            url,
            password,
            tls,
            replica_id,
        }))
    }
}

fn valid_replica_id(id: &str) -> bool {
    (1..=63).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The host name (what `hostname` prints), cut to a valid replica id.
fn default_replica_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let id: String = host
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        .take(63)
        .collect();
    if id.is_empty() {
        "replica".to_owned()
    } else {
        id
    }
}

impl RawAgents {
    fn validate(self, listen: Option<SocketAddr>) -> Result<AgentsConfig, ConfigError> {
        let cert_ttl = duration("agents.cert_ttl", self.cert_ttl.as_deref(), Duration::from_secs(86_400))?;
        if !(Duration::from_secs(10)..=Duration::from_secs(30 * 86_400)).contains(&cert_ttl) {
            return Err(invalid("agents.cert_ttl", "must be between 10s and 30d"));
        }
        let keepalive_interval = duration(
            "agents.keepalive_interval",
            self.keepalive_interval.as_deref(),
            Duration::from_secs(10),
        )?;
        let keepalive_timeout = duration(
            "agents.keepalive_timeout",
            self.keepalive_timeout.as_deref(),
            Duration::from_secs(30),
        )?;
        if keepalive_interval < Duration::from_millis(100) {
            return Err(invalid("agents.keepalive_interval", "must be at least 100ms"));
        }
        if keepalive_timeout < keepalive_interval {
            return Err(invalid(
                "agents.keepalive_timeout",
                "must be at least agents.keepalive_interval",
            ));
        }
        let advertise = match (self.advertise, listen) {
            (Some(_), None) => return Err(invalid("agents.advertise", "requires listen.agents")),
            (Some(a), Some(_)) if jitgate_protocol::tunnel::is_host_port(&a) => Some(a),
            (Some(a), Some(_)) => {
                return Err(invalid(
                    "agents.advertise",
                    format!("{a:?} is not host:port (a name or an IP address, and a port from 1 to 65535)"),
                ))
            }
            (None, Some(l)) if !l.ip().is_unspecified() => Some(l.to_string()),
            (None, _) => None,
        };
        Ok(AgentsConfig {
            cert_ttl,
            keepalive_interval,
            keepalive_timeout,
            advertise,
        })
    }
}

impl RawAudit {
    fn validate(self, data_dir: &Path) -> Result<AuditConfig, ConfigError> {
        let audit = AuditConfig {
            path: self.path.unwrap_or_else(|| data_dir.join("audit.jsonl")),
            tip_path: data_dir.join("audit.tip"),
            max_file_bytes: self.max_file_bytes.unwrap_or(100 << 20),
            fsync_interval: duration(
                "audit.fsync_interval",
                self.fsync_interval.as_deref(),
                Duration::from_secs(1),
            )?,
            queue_depth: self.queue_depth.unwrap_or(65_536),
            max_statement_bytes: self.max_statement_bytes.unwrap_or(65_536),
            max_param_bytes: self.max_param_bytes.unwrap_or(256),
            redact_params_matching: self
                .redact_params_matching
                .unwrap_or_else(|| ["password", "secret", "token"].map(String::from).to_vec()),
            // Set from `[store]` once that is read (`RawConfig::validate`).
            replica: None,
        };
        if audit.max_file_bytes < 4096 {
            return Err(invalid("audit.max_file_bytes", "must be at least 4096"));
        }
        if audit.queue_depth < 16 {
            return Err(invalid("audit.queue_depth", "must be at least 16"));
        }
        if !(64..=1 << 24).contains(&audit.max_statement_bytes) {
            return Err(invalid("audit.max_statement_bytes", "must be between 64 and 16777216"));
        }
        if audit.max_param_bytes > 1 << 20 {
            return Err(invalid("audit.max_param_bytes", "must be at most 1048576"));
        }
        if let Some(i) = audit.redact_params_matching.iter().position(|w| w.trim().is_empty()) {
            return Err(invalid(
                format!("audit.redact_params_matching[{i}]"),
                "must not be empty",
            ));
        }
        Ok(audit)
    }
}

impl RawTarget {
    fn validate(self, i: usize, secrets: Secrets) -> Result<Target, ConfigError> {
        let key = |k: &str| format!("targets[{i}].{k}");
        let name = TargetName::new(self.name).map_err(|e| invalid(key("name"), e.to_string()))?;
        let kind = match self.kind.as_str() {
            "postgres" => TargetKind::Postgres,
            "ssh" => TargetKind::Ssh,
            other => {
                return Err(invalid(
                    key("kind"),
                    format!("unsupported kind {other:?}: \"postgres\" or \"ssh\""),
                ))
            }
        };
        let via = match self.via {
            None => None,
            Some(v) => Some(crate::model::AgentName::new(v).map_err(|e| invalid(key("via"), e.to_string()))?),
        };
        let address = match (self.address, &via) {
            (Some(a), None) => {
                if a.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).is_none() {
                    return Err(invalid(key("address"), format!("{a:?} is not host:port")));
                }
                a
            }
            (None, Some(agent)) => format!("agent {agent}"),
            (Some(_), Some(_)) => {
                return Err(invalid(
                    key("address"),
                    "a target reached through an agent (`via`) has no address here: the agent's config maps it",
                ));
            }
            (None, None) => {
                return Err(invalid(
                    key("address"),
                    "required (host:port), unless `via` names an agent",
                ))
            }
        };
        let database = match (kind, self.database) {
            (TargetKind::Postgres, Some(d)) if !d.is_empty() => d,
            (TargetKind::Postgres, _) => return Err(invalid(key("database"), "must not be empty")),
            (TargetKind::Ssh, None) => String::new(),
            (TargetKind::Ssh, Some(_)) => return Err(invalid(key("database"), "not for kind = \"ssh\"")),
        };
        let host_keys = match kind {
            TargetKind::Postgres => {
                if self.host_key.is_some() || self.known_hosts.is_some() {
                    return Err(invalid(key("host_key"), "only for kind = \"ssh\""));
                }
                Vec::new()
            }
            TargetKind::Ssh => crate::ssh::host_keys(
                &key("host_key"),
                &address,
                self.host_key.as_deref(),
                self.known_hosts.as_deref(),
                secrets,
            )?,
        };
        let mode = ephemeral_mode(
            &key,
            kind,
            self.credentials.mode.as_deref(),
            self.credentials.connection_limit,
            self.manager,
            self.on_end,
            secrets,
        )?;
        let ephemeral = matches!(mode, CredentialsMode::Ephemeral(_));
        let mut credentials = HashMap::new();
        for (level, c) in self.credentials.levels {
            let ckey = key(&format!("credentials.{level}"));
            let access: AccessLevel = level.parse().map_err(|e: String| invalid(&ckey, e))?;
            if c.user.is_empty() {
                return Err(invalid(format!("{ckey}.user"), "must not be empty"));
            }
            let credential = match kind {
                TargetKind::Postgres => {
                    if ephemeral && (c.password_env.is_some() || c.password_file.is_some()) {
                        return Err(invalid(
                            format!("{ckey}.password_file"),
                            "with credentials.mode = \"ephemeral\" the proxy never logs in as the level's role, so it takes no password: `user` names the role each temporary role becomes a member of",
                        ));
                    }
                    postgres_credential(&ckey, c, secrets)?
                }
                TargetKind::Ssh => {
                    if access == AccessLevel::Read {
                        // A shell cannot be read-only, and there is no command allowlist yet:
                        // SSH targets have no read level at all (fail closed).
                        return Err(invalid(
                            &ckey,
                            "SSH targets have no read level (a shell cannot be read-only): use write or admin",
                        ));
                    }
                    if c.password_env.is_some() || c.password_file.is_some() {
                        return Err(invalid(
                            format!("{ckey}.password_file"),
                            "SSH targets log in with a key: key_file or key_env",
                        ));
                    }
                    let keys = SecretKeys {
                        table: &ckey,
                        env: "key_env",
                        file: "key_file",
                        both: &ckey,
                    };
                    let text = resolve_secret(&keys, c.key_env, c.key_file, secrets)?;
                    let ssh_key = match text {
                        Some(t) => Some(crate::ssh::check_private_key(&format!("{ckey}.key_file"), &t)?),
                        None if secrets == Secrets::Skip => None,
                        None => {
                            return Err(invalid(&ckey, "an SSH target needs key_file or key_env"));
                        }
                    };
                    Credential {
                        user: c.user,
                        password: None,
                        ssh_key,
                    }
                }
            };
            credentials.insert(access, credential);
        }
        let tls = match self.tls.mode.as_deref().unwrap_or("disable") {
            "disable" => UpstreamTls::Disable,
            "require" => UpstreamTls::Require,
            "verify-full" => {
                let ca_file = self
                    .tls
                    .ca_file
                    .ok_or_else(|| invalid(key("tls.ca_file"), "required with mode = \"verify-full\""))?;
                let host = address.rsplit_once(':').map(|(h, _)| h).unwrap_or_default();
                let server_name = self
                    .tls
                    .server_name
                    .unwrap_or_else(|| host.trim_matches(['[', ']']).to_owned());
                UpstreamTls::VerifyFull { ca_file, server_name }
            }
            other => {
                return Err(invalid(
                    key("tls.mode"),
                    format!("{other:?}: use disable, require or verify-full"),
                ));
            }
        };
        let mut guardrails = Vec::new();
        for (j, r) in self.guardrails.into_iter().enumerate() {
            let rkey = key(&format!("guardrails[{j}]"));
            let access = match r.access {
                None => AccessLevel::ALL.to_vec(),
                Some(levels) => levels
                    .iter()
                    .map(|l| l.parse())
                    .collect::<Result<Vec<AccessLevel>, String>>()
                    .map_err(|e| invalid(format!("{rkey}.access"), e))?,
            };
            for kind in &r.deny_kinds {
                if !jitgate_protocol::sql::KINDS.contains(&kind.as_str()) {
                    return Err(invalid(
                        format!("{rkey}.deny_kinds"),
                        format!(
                            "unknown statement kind {kind:?}; known kinds: {}",
                            jitgate_protocol::sql::KINDS.join(", ")
                        ),
                    ));
                }
            }
            guardrails.push(DenyRule {
                access,
                kinds: r.deny_kinds,
                unfiltered_writes: r.deny_unfiltered_writes,
            });
        }
        if via.is_some()
            && matches!(tls, UpstreamTls::VerifyFull { ref server_name, .. } if server_name.is_empty() || server_name.starts_with("agent "))
        {
            return Err(invalid(
                key("tls.server_name"),
                "required with `via` and mode = \"verify-full\"",
            ));
        }
        if kind == TargetKind::Ssh && (!matches!(tls, UpstreamTls::Disable) || !guardrails.is_empty()) {
            return Err(invalid(key("tls"), "tls and guardrails are for PostgreSQL targets"));
        }
        if kind != TargetKind::Ssh && self.allow_port_forwarding {
            return Err(invalid(key("allow_port_forwarding"), "only for kind = \"ssh\""));
        }
        Ok(Target {
            name,
            kind,
            host_keys,
            via,
            address,
            database,
            labels: self.labels,
            credentials,
            mode,
            tls,
            guardrails,
            allow_role_management: self.allow_role_management,
            allow_port_forwarding: self.allow_port_forwarding,
        })
    }
}

/// A PostgreSQL login (`[targets.credentials.LEVEL]`, `[targets.manager]`) under `table`: a
/// user and an optional password from `password_env` or `password_file`; no SSH key.
fn postgres_credential(table: &str, c: RawCredential, secrets: Secrets) -> Result<Credential, ConfigError> {
    if c.key_env.is_some() || c.key_file.is_some() {
        return Err(invalid(format!("{table}.key_file"), "only for kind = \"ssh\""));
    }
    let keys = SecretKeys {
        table,
        env: "password_env",
        file: "password_file",
        both: table,
    };
    let password = resolve_secret(&keys, c.password_env, c.password_file, secrets)?;
    Ok(Credential {
        user: c.user,
        password,
        ssh_key: None,
    })
}

/// Reads `credentials.mode`, `connection_limit`, `[targets.manager]` and `[targets.on_end]`.
fn ephemeral_mode(
    key: &dyn Fn(&str) -> String,
    kind: TargetKind,
    mode: Option<&str>,
    connection_limit: Option<i64>,
    manager: Option<RawCredential>,
    on_end: Option<RawOnEnd>,
    secrets: Secrets,
) -> Result<CredentialsMode, ConfigError> {
    match mode.unwrap_or("static") {
        "static" => {
            let stray = [
                (connection_limit.is_some(), "credentials.connection_limit"),
                (manager.is_some(), "manager"),
                (on_end.is_some(), "on_end"),
            ];
            if let Some((_, k)) = stray.iter().find(|(set, _)| *set) {
                return Err(invalid(key(k), "only with credentials.mode = \"ephemeral\""));
            }
            Ok(CredentialsMode::Static)
        }
        "ephemeral" => {
            if kind != TargetKind::Postgres {
                return Err(invalid(
                    key("credentials.mode"),
                    "\"ephemeral\" is for PostgreSQL targets",
                ));
            }
            let Some(m) = manager else {
                return Err(invalid(
                    key("manager"),
                    "credentials.mode = \"ephemeral\" needs a [targets.manager] table: a role with CREATEROLE that may grant the access-level roles (README \"Temporary database roles\")",
                ));
            };
            let mkey = key("manager");
            if m.user.is_empty() {
                return Err(invalid(format!("{mkey}.user"), "must not be empty"));
            }
            let manager = postgres_credential(&mkey, m, secrets)?;
            let connection_limit = match connection_limit {
                None => DEFAULT_CONNECTION_LIMIT,
                Some(n) if (1..=10_000).contains(&n) => n as u32,
                Some(n) => {
                    return Err(invalid(
                        key("credentials.connection_limit"),
                        format!("{n}: must be from 1 to 10000"),
                    ))
                }
            };
            let on_end = match on_end {
                Some(RawOnEnd {
                    reassign_to: Some(r),
                    drop_owned: false,
                }) if !r.is_empty() => OnEnd::ReassignTo(r),
                Some(RawOnEnd {
                    reassign_to: None,
                    drop_owned: true,
                }) => OnEnd::DropOwned,
                _ => {
                    return Err(invalid(
                        key("on_end"),
                        "say what becomes of the objects a temporary role owns when it is dropped: reassign_to = \"ROLE\" (REASSIGN OWNED) or drop_owned = true, one of them",
                    ))
                }
            };
            Ok(CredentialsMode::Ephemeral(Arc::new(Ephemeral {
                manager,
                connection_limit,
                on_end,
            })))
        }
        other => Err(invalid(
            key("credentials.mode"),
            format!("{other:?}: use \"static\" or \"ephemeral\""),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
data_dir = "/var/lib/jitgate"
[listen]
postgres = "127.0.0.1:5433"
api = "127.0.0.1:8443"
metrics = "127.0.0.1:9187"
[[targets]]
name = "prod-db"
kind = "postgres"
address = "10.0.0.5:5432"
database = "app"
labels = { env = "prod" }
[targets.credentials.read]
user = "jit_reader"
password_env = "JITGATE_TEST_CONFIG_PW"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    #[test]
    fn audit_records_name_the_replica_only_with_a_store() {
        std::env::set_var("JITGATE_TEST_CONFIG_PW", "pw");
        let text = format!(
            "{MINIMAL}[store]\nurl = \"postgresql://jitgate@db.internal:5432/jitgate\"\nreplica_id = \"east-1\"\n"
        );
        assert_eq!(parse(&text).unwrap().audit.replica.as_deref(), Some("east-1"));
        assert_eq!(parse(MINIMAL).unwrap().audit.replica, None);
    }

    const SLACK_POLICY: &str = r#"
[[policies]]
name = "prod-in-slack"
roles = ["dev"]
targets = { env = "prod" }
access = ["read"]
max_duration = "1h"
approvers = ["dba"]
slack_channel = "C0APPROVALS"
"#;

    #[test]
    fn slack_needs_its_secrets_and_a_safe_api_url() {
        std::env::set_var("JITGATE_TEST_CONFIG_PW", "pw");
        std::env::set_var("JITGATE_TEST_SLACK_SIGNING_CFG", "s3cret");
        std::env::set_var("JITGATE_TEST_SLACK_BOT_CFG", "xoxb-1");
        let with = |slack: &str| parse(&format!("{MINIMAL}{SLACK_POLICY}[slack]\n{slack}"));
        let both =
            "signing_secret_env = \"JITGATE_TEST_SLACK_SIGNING_CFG\"\nbot_token_env = \"JITGATE_TEST_SLACK_BOT_CFG\"\n";
        let c = with(both).unwrap();
        let slack = c.slack.as_deref().unwrap();
        assert_eq!(slack.api_url, "https://slack.com/api");
        assert_eq!(slack.signing_secret.as_deref(), Some("s3cret"));
        assert_eq!(slack.link_ttl, Duration::from_secs(30 * 86_400));
        let policy = c.policies.iter().next().unwrap();
        assert_eq!(policy.slack_channel.as_deref(), Some("C0APPROVALS"));
        assert!(policy.approve_in_chat);

        let err = with("bot_token_env = \"JITGATE_TEST_SLACK_BOT_CFG\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("slack.signing_secret_env"), "{err}");
        let err = with("signing_secret_env = \"JITGATE_TEST_SLACK_SIGNING_CFG\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("slack.bot_token_env"), "{err}");
        let err = with(&format!("{both}api_url = \"http://slack.example.com/api\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("slack.api_url"), "{err}");
        assert!(with(&format!("{both}api_url = \"http://127.0.0.1:9/api\"\n")).is_ok());
        let err = with(&format!("{both}link_ttl = \"10s\"\n")).unwrap_err().to_string();
        assert!(err.starts_with("slack.link_ttl"), "{err}");
        let err = with(&format!("{both}console_url = \"javascript:alert(1)\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("slack.console_url"), "{err}");
        assert!(
            with(&format!("{both}channel = \"C1\"\n")).is_err(),
            "unknown keys are refused"
        );
    }

    #[test]
    fn the_console_callback_is_https_and_the_consoles_path() {
        std::env::set_var("JITGATE_TEST_CONFIG_PW", "pw");
        let with = |uri: &str| {
            parse(&format!(
                "{MINIMAL}[oidc]\nissuer = \"https://idp.example.com\"\nclient_id = \"jitgate\"\nconsole_redirect_uri = \"{uri}\"\n[oidc.roles]\ng = [\"dev\"]\n"
            ))
        };
        let c = with("https://jitgate.example.com:8443/ui/oidc/callback").unwrap();
        let oidc = c.oidc.as_deref().unwrap();
        assert_eq!(
            oidc.console_redirect_uri.as_deref(),
            Some("https://jitgate.example.com:8443/ui/oidc/callback")
        );
        assert!(with("http://127.0.0.1:8443/ui/oidc/callback").is_ok());
        for bad in [
            "http://jitgate.example.com/ui/oidc/callback",
            "https://jitgate.example.com/elsewhere",
            "https://jitgate.example.com/ui/oidc/callback/../../evil",
            "javascript:alert(1)",
        ] {
            let err = with(bad).unwrap_err().to_string();
            assert!(err.starts_with("oidc.console_redirect_uri"), "{bad}: {err}");
        }
    }

    #[test]
    fn a_policy_cannot_name_a_slack_channel_without_the_slack_app() {
        std::env::set_var("JITGATE_TEST_CONFIG_PW", "pw");
        let err = parse(&format!("{MINIMAL}{SLACK_POLICY}")).unwrap_err().to_string();
        assert!(err.starts_with("policies.prod-in-slack.slack_channel"), "{err}");
        assert!(err.contains("[slack]"), "{err}");
        let bad = SLACK_POLICY.replace("C0APPROVALS", "C0 APPROVALS");
        let err = parse(&format!("{MINIMAL}{bad}")).unwrap_err().to_string();
        assert!(err.contains("slack_channel"), "{err}");
    }

    #[test]
    fn minimal_file_from_the_issue_is_enough() {
        std::env::set_var("JITGATE_TEST_CONFIG_PW", "pw");
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.tls.ca_cert, Path::new("/var/lib/jitgate/ca.crt"));
        assert_eq!(c.audit.path, Path::new("/var/lib/jitgate/audit.jsonl"));
        assert_eq!(c.audit.max_file_bytes, 104_857_600);
        assert_eq!(c.audit.fsync_interval, Duration::from_secs(1));
        assert_eq!(c.audit.queue_depth, 65_536);
        assert_eq!(c.audit.max_statement_bytes, 65_536);
        assert_eq!(c.audit.max_param_bytes, 256);
        assert_eq!(c.audit.redact_params_matching, ["password", "secret", "token"]);
        assert_eq!(c.audit.replica, None);
        let t = &c.targets[&TargetName::new("prod-db").unwrap()];
        assert_eq!(t.credentials[&AccessLevel::Read].password.as_deref(), Some("pw"));
        assert_eq!(t.tls, UpstreamTls::Disable);
    }

    #[test]
    fn session_threads_default_to_one_per_cpu_and_are_bounded() {
        std::env::set_var("JITGATE_TEST_CONFIG_PW", "pw");
        assert_eq!(parse(MINIMAL).unwrap().sessions.threads, 0);
        let with = |n: &str| parse(&MINIMAL.replace("[[targets]]", &format!("[sessions]\nthreads = {n}\n[[targets]]")));
        assert_eq!(with("1").unwrap().sessions.threads, 1);
        let err = with("1025").unwrap_err().to_string();
        assert!(err.starts_with("sessions.threads"), "{err}");
        assert!(with("-1").is_err());
    }

    #[test]
    fn targets_behind_an_agent_name_it_instead_of_an_address() {
        std::env::set_var("JITGATE_TEST_CONFIG_PW", "pw");
        let via = MINIMAL.replace("address = \"10.0.0.5:5432\"", "via = \"db-east\"");
        let with_listener = via.replace(
            "metrics = \"127.0.0.1:9187\"",
            "metrics = \"127.0.0.1:9187\"\nagents = \"127.0.0.1:8444\"",
        );
        let c = parse(&with_listener).unwrap();
        let t = &c.targets[&TargetName::new("prod-db").unwrap()];
        assert_eq!(t.via.as_ref().map(|a| a.as_str()), Some("db-east"));
        assert_eq!(c.listen.agents, Some("127.0.0.1:8444".parse().unwrap()));
        assert_eq!(c.agents.keepalive_timeout, Duration::from_secs(30));
        assert_eq!(c.agents.cert_ttl, Duration::from_secs(86_400));
        // No agent listener to reach the agent through.
        let err = parse(&via).unwrap_err().to_string();
        assert!(err.contains("listen.agents is not set"), "{err}");
        // Both, or neither.
        let both = with_listener.replace("via = ", "address = \"10.0.0.5:5432\"\nvia = ");
        assert!(parse(&both).unwrap_err().to_string().contains("has no address here"));
        let neither = with_listener.replace("via = \"db-east\"\n", "");
        assert!(parse(&neither).unwrap_err().to_string().contains("unless `via`"));
        assert!(parse(&with_listener.replace("db-east", "db east")).is_err());
        let agents = |lines: &str| parse(&format!("{with_listener}\n[agents]\n{lines}\n"));
        assert!(agents("cert_ttl = \"1s\"")
            .unwrap_err()
            .to_string()
            .starts_with("agents.cert_ttl"));
        assert!(agents("keepalive_interval = \"10s\"\nkeepalive_timeout = \"1s\"").is_err());
        assert!(agents("keepalive_interval = \"1ms\"").is_err());
        assert!(agents("surprise = 1").is_err());
    }

    #[test]
    fn agents_reach_a_replica_at_its_advertised_address_by_default_its_listener() {
        std::env::set_var("JITGATE_TEST_CONFIG_PW", "pw");
        let at = |listen: &str, lines: &str| {
            parse(&format!(
                "{}\n[agents]\n{lines}\n",
                MINIMAL.replace(
                    "metrics = \"127.0.0.1:9187\"",
                    &format!("metrics = \"127.0.0.1:9187\"\nagents = \"{listen}\""),
                )
            ))
        };
        let advertised = |listen: &str, lines: &str| at(listen, lines).unwrap().agents.advertise;
        assert_eq!(advertised("10.0.0.1:8444", "").as_deref(), Some("10.0.0.1:8444"));
        // A wildcard listener says nothing agents could dial.
        assert_eq!(advertised("0.0.0.0:8444", ""), None);
        assert_eq!(advertised("[::]:8444", ""), None);
        for good in ["jg-1.internal:8444", "10.0.0.1:9000", "[fd00::1]:8444"] {
            let line = format!("advertise = \"{good}\"");
            assert_eq!(advertised("0.0.0.0:8444", &line).as_deref(), Some(good));
        }
        for bad in [
            "jg-1.internal",
            "jg-1.internal:0",
            "https://jg-1:8444",
            "jg 1:8444",
            "::1:8444",
        ] {
            let err = at("0.0.0.0:8444", &format!("advertise = \"{bad}\""))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("agents.advertise"), "{bad}: {err}");
        }
        // Without a listener there is nothing to advertise.
        let err = parse(&format!("{MINIMAL}\n[agents]\nadvertise = \"jg-1:8444\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("requires listen.agents"), "{err}");
        assert_eq!(parse(MINIMAL).unwrap().agents.advertise, None);
    }

    #[test]
    fn ssh_targets_pin_a_host_key_and_log_in_with_a_key() {
        let dir = tempfile::tempdir().unwrap();
        let key = ssh_key::PrivateKey::random(&mut rand::rngs::OsRng, ssh_key::Algorithm::Ed25519).unwrap();
        let key_file = dir.path().join("web.key");
        std::fs::write(&key_file, key.to_openssh(ssh_key::LineEnding::LF).unwrap().as_bytes()).unwrap();
        let host = ssh_key::PrivateKey::random(&mut rand::rngs::OsRng, ssh_key::Algorithm::Ed25519).unwrap();
        let host_line = host.public_key().to_openssh().unwrap();
        let base = "data_dir = \"/var/lib/jitgate\"\n[listen]\nssh = \"127.0.0.1:2222\"\n[[targets]]\nname = \"web-1\"\nkind = \"ssh\"\naddress = \"10.0.0.9:22\"\n@HOST@\n[targets.credentials.write]\nuser = \"deploy\"\n@CRED@\n".to_string();
        let cfg = |host: &str, cred: &str| parse(&base.replace("@HOST@", host).replace("@CRED@", cred));
        let key_line = format!("key_file = \"{}\"", key_file.display());
        let c = cfg(&format!("host_key = \"{host_line}\""), &key_line).unwrap();
        let t = &c.targets[&TargetName::new("web-1").unwrap()];
        assert_eq!(t.kind, TargetKind::Ssh);
        assert_eq!(t.host_keys, std::slice::from_ref(&host_line));
        assert!(t.credentials[&AccessLevel::Write]
            .ssh_key
            .as_deref()
            .unwrap()
            .contains("OPENSSH PRIVATE KEY"));
        assert!(!format!("{t:?}").contains("OPENSSH PRIVATE KEY"), "Debug shows no key");
        assert_eq!(c.listen.ssh, Some("127.0.0.1:2222".parse().unwrap()));
        // known_hosts: the lines naming the target's host.
        let known = dir.path().join("known_hosts");
        let other = ssh_key::PrivateKey::random(&mut rand::rngs::OsRng, ssh_key::Algorithm::Ed25519).unwrap();
        std::fs::write(
            &known,
            format!(
                "# comment\n10.0.0.8 {}\n10.0.0.9,web-1 {host_line}\n@cert-authority * {}\n",
                other.public_key().to_openssh().unwrap(),
                other.public_key().to_openssh().unwrap()
            ),
        )
        .unwrap();
        let c = cfg(&format!("known_hosts = \"{}\"", known.display()), &key_line).unwrap();
        assert_eq!(
            c.targets[&TargetName::new("web-1").unwrap()].host_keys,
            std::slice::from_ref(&host_line)
        );
        let host_ok = format!("host_key = \"{host_line}\"");
        for (host, cred, says) in [
            ("", key_line.as_str(), "host key pinned"),
            (
                &format!("{host_ok}\nknown_hosts = \"{}\"", known.display()),
                key_line.as_str(),
                "not both",
            ),
            (
                "host_key = \"ssh-ed25519 nonsense\"",
                key_line.as_str(),
                "not an OpenSSH public key",
            ),
            (host_ok.as_str(), "", "needs key_file or key_env"),
            (
                &format!("{host_ok}\n[targets.credentials.read]\nuser = \"viewer\"\n{key_line}"),
                key_line.as_str(),
                "no read level",
            ),
            (host_ok.as_str(), "password_env = \"X\"", "log in with a key"),
            (
                host_ok.as_str(),
                "key_env = \"JITGATE_TEST_NOT_A_KEY\"",
                "not an OpenSSH private key",
            ),
            (
                &format!("{host_ok}\ndatabase = \"app\""),
                key_line.as_str(),
                "not for kind",
            ),
        ] {
            std::env::set_var("JITGATE_TEST_NOT_A_KEY", "garbage");
            let err = cfg(host, cred).unwrap_err().to_string();
            assert!(err.contains(says), "{host} / {cred}: {err}");
        }
        // A PostgreSQL target takes no SSH keys.
        std::env::set_var("JITGATE_TEST_CONFIG_PW", "pw");
        let err = parse(&MINIMAL.replace(
            "password_env = \"JITGATE_TEST_CONFIG_PW\"",
            &format!("key_file = \"{}\"", key_file.display()),
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("only for kind"), "{err}");
    }

    #[test]
    fn parse_without_secrets_reads_no_secret() {
        let text = MINIMAL.replace(
            "password_env = \"JITGATE_TEST_CONFIG_PW\"",
            "password_file = \"/nonexistent/jitgate-fuzz-secret\"",
        );
        assert!(parse(&text).unwrap_err().to_string().contains("password_file"));
        let c = Config::parse_without_secrets(&text, Path::new("test.toml")).unwrap();
        let t = &c.targets[&TargetName::new("prod-db").unwrap()];
        assert_eq!(t.credentials[&AccessLevel::Read].password, None);
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = parse(&format!("{MINIMAL}\nbogus = 1\n")).unwrap_err().to_string();
        assert!(err.contains("bogus"), "{err}");
        let err = parse(&MINIMAL.replace("database = \"app\"", "database = \"app\"\ndatabse = \"x\"")).unwrap_err();
        assert!(err.to_string().contains("databse"), "{err}");
    }

    #[test]
    fn invalid_values_name_their_key() {
        std::env::set_var("JITGATE_TEST_CONFIG_PW", "pw");
        let err = parse(&MINIMAL.replace("[targets.credentials.read]", "[targets.credentials.root]")).unwrap_err();
        assert!(err.to_string().starts_with("targets[0].credentials.root"), "{err}");
        let err = parse(&MINIMAL.replace("127.0.0.1:9187", "nowhere")).unwrap_err();
        assert!(err.to_string().starts_with("listen.metrics"), "{err}");
        let err = parse(&MINIMAL.replace("JITGATE_TEST_CONFIG_PW", "JITGATE_TEST_UNSET_VAR")).unwrap_err();
        assert!(err.to_string().contains("password_env"), "{err}");
    }

    #[test]
    fn audit_section_is_parsed_and_checked() {
        std::env::set_var("JITGATE_TEST_CONFIG_PW", "pw");
        let with = |audit: &str| parse(&MINIMAL.replace("[[targets]]", &format!("[audit]\n{audit}\n[[targets]]")));
        let c = with(
            "path = \"/logs/a.jsonl\"\nmax_file_bytes = 4096\nfsync_interval = \"250ms\"\nqueue_depth = 16\n\
             max_statement_bytes = 1000\nmax_param_bytes = 0\nredact_params_matching = [\"pin\"]",
        )
        .unwrap();
        assert_eq!(c.audit.path, Path::new("/logs/a.jsonl"));
        assert_eq!(c.audit.max_file_bytes, 4096);
        assert_eq!(c.audit.fsync_interval, Duration::from_millis(250));
        assert_eq!(c.audit.queue_depth, 16);
        assert_eq!(c.audit.max_statement_bytes, 1000);
        assert_eq!(c.audit.max_param_bytes, 0);
        assert_eq!(c.audit.redact_params_matching, ["pin"]);
        for (text, key) in [
            ("max_file_bytes = 4095", "audit.max_file_bytes"),
            ("queue_depth = 15", "audit.queue_depth"),
            ("fsync_interval = \"soon\"", "audit.fsync_interval"),
            ("max_statement_bytes = 63", "audit.max_statement_bytes"),
            ("max_param_bytes = 1048577", "audit.max_param_bytes"),
            (
                "redact_params_matching = [\"x\", \" \"]",
                "audit.redact_params_matching[1]",
            ),
        ] {
            let err = with(text).unwrap_err().to_string();
            assert!(err.starts_with(key), "{text}: {err}");
        }
        let err = with("max_files = 3").unwrap_err().to_string();
        assert!(err.contains("max_files"), "{err}");
    }

    #[test]
    fn connection_limits_have_defaults_and_are_checked() {
        std::env::set_var("JITGATE_TEST_CONFIG_PW", "pw");
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.limits.max_connections, 10_000);
        assert_eq!(c.limits.max_unauthenticated, 128);
        assert_eq!(c.limits.max_sessions_per_user, 100);
        assert_eq!(c.limits.handshake_timeout, Duration::from_secs(5));
        let with = |limits: &str| parse(&MINIMAL.replace("[[targets]]", &format!("[limits]\n{limits}\n[[targets]]")));
        let c = with("max_unauthenticated = 8\nmax_sessions_per_user = 3\nhandshake_timeout = \"1s\"").unwrap();
        assert_eq!((c.limits.max_unauthenticated, c.limits.max_sessions_per_user), (8, 3));
        for (text, key) in [
            ("max_unauthenticated = 0", "limits.max_unauthenticated"),
            ("max_sessions_per_user = 0", "limits.max_sessions_per_user"),
            ("handshake_timeout = \"0s\"", "limits.handshake_timeout"),
        ] {
            let err = with(text).unwrap_err().to_string();
            assert!(err.starts_with(key), "{text}: {err}");
        }
        let err = with("max_sessions = 3").unwrap_err().to_string();
        assert!(err.contains("max_sessions"), "{err}");
    }
}
