//! The agent's files: what `join` wrote to the data directory (`agent.json`, the key and
//! certificates), the replica list learnt since (`replicas.json`), and the config `run`
//! reads (`agent.toml`: which local address serves each target, keepalives, the orphan
//! grace).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};

/// The agent's key and certificate, in one file so a renewal replaces both at once (0600).
pub const IDENTITY: &str = "agent.pem";
pub const CA: &str = "ca.crt";
pub const STATE: &str = "agent.json";
pub const CONFIG: &str = "agent.toml";
/// Where the agent reaches every replica of the proxy, as last learnt (join, renewals, the
/// lists its links carry), so a restart links to all of them at once.
pub const REPLICAS: &str = "replicas.json";

/// What `join` learnt, kept in `DATA_DIR/agent.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Joined {
    pub name: String,
    /// `host:port` of the proxy's agent listener.
    pub proxy: String,
    /// The name the proxy's certificate is checked against.
    pub server_name: String,
    /// Targets this agent was admitted for.
    pub targets: Vec<String>,
}

impl Joined {
    pub fn load(data_dir: &Path) -> Result<Self> {
        let path = data_dir.join(STATE);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("{}: run `jitgate-agent join` first", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{}: not an agent state file", path.display()))
    }
}

/// `replicas.json`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct SavedReplicas {
    /// `host:port` of each replica's agent listener.
    replicas: Vec<String>,
}

/// The replica list saved in `data_dir`; empty when there is none yet (an agent that joined
/// a lone proxy, or one from before replicas) or it cannot be read (logged).
pub fn load_replicas(data_dir: &Path) -> Vec<String> {
    let path = data_dir.join(REPLICAS);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "replica list not read");
            return Vec::new();
        }
    };
    match serde_json::from_str::<SavedReplicas>(&text) {
        Ok(saved) => clean_replicas(saved.replicas),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "replica list unreadable; ignored");
            Vec::new()
        }
    }
}

/// Saves the replica list in `data_dir` (one rename).
pub fn save_replicas(data_dir: &Path, replicas: &[String]) -> Result<()> {
    let saved = SavedReplicas {
        replicas: replicas.to_vec(),
    };
    write_atomic(&data_dir.join(REPLICAS), &serde_json::to_string_pretty(&saved)?, false)
}

/// The addresses of a list from the proxy that an agent can dial, sorted, each once, at most
/// [`tunnel::MAX_REPLICAS`]; the others are dropped (logged).
///
/// [`tunnel::MAX_REPLICAS`]: jitgate_protocol::tunnel::MAX_REPLICAS
pub fn clean_replicas(list: Vec<String>) -> Vec<String> {
    use jitgate_protocol::tunnel;
    let mut kept = std::collections::BTreeSet::new();
    for addr in list {
        if !tunnel::is_host_port(&addr) {
            tracing::warn!(replica = %addr, "replica address is not host:port; ignored");
        } else if kept.len() < tunnel::MAX_REPLICAS {
            kept.insert(addr);
        }
    }
    kept.into_iter().collect()
}

/// Where a target is, seen from the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Tcp(String),
    /// A Unix socket path (`unix:/run/postgresql/.s.PGSQL.5432`).
    Unix(PathBuf),
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(a) => f.write_str(a),
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    data_dir: Option<PathBuf>,
    proxy: Option<String>,
    server_name: Option<String>,
    keepalive_interval: Option<String>,
    keepalive_timeout: Option<String>,
    orphan_grace: Option<String>,
    reconnect_max: Option<String>,
    #[serde(default)]
    targets: BTreeMap<String, String>,
}

/// The validated `agent.toml`.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    /// The proxy address always linked to, instead of the one `join` used; the replicas
    /// learnt are linked to as well.
    pub proxy: Option<String>,
    pub server_name: Option<String>,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// How long database connections stay open after the link to the proxy is lost.
    pub orphan_grace: Duration,
    /// The longest wait between reconnects.
    pub reconnect_max: Duration,
    pub targets: BTreeMap<String, Address>,
}

fn duration(key: &str, value: Option<&str>, default: Duration) -> Result<Duration> {
    match value {
        None => Ok(default),
        Some(v) => humantime::parse_duration(v).with_context(|| format!("{key}: {v:?} is not a duration")),
    }
}

impl Config {
    /// Reads `path`; `data_dir` defaults to the file's directory.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let raw: RawConfig = toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
        let default_dir = path.parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        Self::validate(raw, default_dir).with_context(|| format!("{}", path.display()))
    }

    fn validate(raw: RawConfig, default_dir: PathBuf) -> Result<Self> {
        let keepalive_interval = duration(
            "keepalive_interval",
            raw.keepalive_interval.as_deref(),
            Duration::from_secs(10),
        )?;
        let keepalive_timeout = duration(
            "keepalive_timeout",
            raw.keepalive_timeout.as_deref(),
            Duration::from_secs(30),
        )?;
        if keepalive_interval < Duration::from_millis(100) {
            bail!("keepalive_interval: must be at least 100ms");
        }
        if keepalive_timeout < keepalive_interval {
            bail!("keepalive_timeout: must be at least keepalive_interval");
        }
        let mut targets = BTreeMap::new();
        for (name, addr) in raw.targets {
            let address = match addr.strip_prefix("unix:") {
                Some(path) if path.starts_with('/') => Address::Unix(PathBuf::from(path)),
                Some(_) => bail!("targets.{name}: a Unix socket path must be absolute (unix:/path)"),
                None if addr.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).is_some() => Address::Tcp(addr),
                None => bail!("targets.{name}: {addr:?} is neither host:port nor unix:/path"),
            };
            targets.insert(name, address);
        }
        if targets.is_empty() {
            bail!("[targets]: name at least one target and its local address");
        }
        Ok(Self {
            data_dir: raw.data_dir.unwrap_or(default_dir),
            proxy: raw.proxy,
            server_name: raw.server_name,
            keepalive_interval,
            keepalive_timeout,
            orphan_grace: duration("orphan_grace", raw.orphan_grace.as_deref(), Duration::from_secs(5))?,
            reconnect_max: duration("reconnect_max", raw.reconnect_max.as_deref(), Duration::from_secs(30))?,
            targets,
        })
    }
}

/// Writes `contents` to `path` through a temporary file and a rename, so a reader never sees
/// half a certificate; `private` files get mode 0600.
pub fn write_atomic(path: &Path, contents: &str, private: bool) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    if private {
        opts.mode(0o600);
    }
    let mut f = opts
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parse(text: &str) -> Result<Config> {
        Config::validate(toml::from_str(text)?, PathBuf::from("/d"))
    }

    #[test]
    fn targets_map_to_tcp_or_unix_addresses_and_bad_ones_are_named() {
        let c = parse(
            r#"
orphan_grace = "2s"
[targets]
prod-db = "127.0.0.1:5432"
stage-db = "unix:/run/postgresql/.s.PGSQL.5432"
"#,
        )
        .unwrap();
        assert_eq!(c.targets["prod-db"], Address::Tcp("127.0.0.1:5432".into()));
        assert_eq!(
            c.targets["stage-db"],
            Address::Unix("/run/postgresql/.s.PGSQL.5432".into())
        );
        assert_eq!(c.orphan_grace, Duration::from_secs(2));
        assert_eq!(c.data_dir, PathBuf::from("/d"));
        for (bad, says) in [
            ("[targets]\nx = \"nowhere\"", "targets.x"),
            ("[targets]\nx = \"unix:rel\"", "absolute"),
            ("[targets]\n", "at least one target"),
            (
                "keepalive_interval = \"1ms\"\n[targets]\nx = \"h:1\"",
                "keepalive_interval",
            ),
            (
                "keepalive_timeout = \"1s\"\n[targets]\nx = \"h:1\"",
                "keepalive_timeout",
            ),
        ] {
            let err = format!("{:#}", parse(bad).unwrap_err());
            assert!(err.contains(says), "{bad}: {err}");
        }
        assert!(toml::from_str::<RawConfig>("surprise = 1").is_err());
    }

    #[test]
    fn the_replica_list_survives_a_restart_and_only_dialable_addresses_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load_replicas(dir.path()).is_empty(), "none before the first list");
        let list = clean_replicas(vec![
            "jg-2.internal:8444".into(),
            "http://jg-3:8444".into(),
            "jg-1.internal:8444".into(),
            "jg-2.internal:8444".into(),
            "[fd00::1]:8444".into(),
        ]);
        assert_eq!(list, ["[fd00::1]:8444", "jg-1.internal:8444", "jg-2.internal:8444"]);
        save_replicas(dir.path(), &list).unwrap();
        assert_eq!(load_replicas(dir.path()), list);
        let many: Vec<String> = (1..=100).map(|p| format!("h:{p}")).collect();
        assert_eq!(clean_replicas(many).len(), jitgate_protocol::tunnel::MAX_REPLICAS);
        std::fs::write(dir.path().join(REPLICAS), "not json").unwrap();
        assert!(load_replicas(dir.path()).is_empty(), "an unreadable file is ignored");
    }

    #[test]
    fn the_example_config_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/jitgate-agent.toml");
        let c = Config::load(&path).unwrap();
        assert_eq!(c.targets["east-db"], Address::Tcp("10.0.0.5:5432".into()));
        assert_eq!(c.orphan_grace, Duration::from_secs(5));
        assert_eq!(c.keepalive_timeout, Duration::from_secs(30));
    }
}
