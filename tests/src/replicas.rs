//! Several replicas on one shared store: a real PostgreSQL cluster as the store (separate from
//! the target's), the harness's proxy as replica `a` (with [`store_table`] as its
//! `Options::store`) and `jitgate serve` processes as the others ([`Replica`]).

use std::path::Path;
use std::time::Duration;

use jitgate::client::ApiClient;
use jitgate::pki;
use jitgate::sandbox::{free_port, LocalPostgres, PgOptions};

use crate::{eventually, jitgate_bin, Harness};

/// The store role's password (in `store.password` of the secrets directory).
pub const STORE_PASSWORD: &str = "store-secret-1";

/// The store cluster, with database `jitgate` owned by role `jitgate`, and a directory holding
/// the role's password file.
pub async fn store_cluster() -> (LocalPostgres, tempfile::TempDir) {
    let pg = tokio::task::spawn_blocking(|| LocalPostgres::start(&PgOptions { tls: None }))
        .await
        .unwrap()
        .expect("start the store's PostgreSQL");
    pg.sql(
        "postgres",
        &format!("CREATE ROLE jitgate LOGIN PASSWORD '{STORE_PASSWORD}'"),
    )
    .unwrap();
    pg.sql("postgres", "CREATE DATABASE jitgate OWNER jitgate").unwrap();
    let secrets = tempfile::tempdir().unwrap();
    pki::write_file(&secrets.path().join("store.password"), STORE_PASSWORD, true).unwrap();
    (pg, secrets)
}

/// The `[store]` table of replica `a` on `pg`.
pub fn store_table(pg: &LocalPostgres, secrets: &Path) -> String {
    format!(
        "[store]\nurl = \"postgresql://jitgate@{}/jitgate\"\npassword_file = \"{}\"\nreplica_id = \"a\"\n",
        pg.address(),
        secrets.join("store.password").display()
    )
}

/// A `jitgate serve` process with the harness's config on ports of its own, its own data
/// directory (a copy of the harness's keys, not its audit log or SQLite file) and replica id.
/// When the harness has an agent listener, so does the replica, advertised as `agents`.
pub struct Replica {
    pub child: std::process::Child,
    pub dir: tempfile::TempDir,
    pub postgres: u16,
    pub metrics: u16,
    pub api_port: u16,
    /// Its agent listener's address, when it has one.
    pub agents: Option<String>,
    pub api: ApiClient,
}

impl Replica {
    /// Replica `id` (`store.replica_id`); returns once its API answers.
    pub async fn start(h: &Harness, id: &str) -> Replica {
        let dir = tempfile::Builder::new().prefix("jitgate-replica-").tempdir().unwrap();
        for entry in std::fs::read_dir(h.data_dir()).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.file_type().unwrap().is_file() && !name.starts_with("audit") && !name.starts_with("jitgate.db") {
                std::fs::copy(entry.path(), dir.path().join(&name)).unwrap();
            }
        }
        let (postgres, api_port, metrics) = (free_port().unwrap(), free_port().unwrap(), free_port().unwrap());
        let mut config = std::fs::read_to_string(h.config_path()).unwrap();
        let agents = config
            .contains("agents = \"127.0.0.1:0\"")
            .then(|| format!("127.0.0.1:{}", free_port().unwrap()));
        let mut swaps = vec![
            (
                format!("data_dir = \"{}\"", h.data_dir().display()),
                format!("data_dir = \"{}\"", dir.path().display()),
            ),
            (
                "postgres = \"127.0.0.1:0\"".into(),
                format!("postgres = \"127.0.0.1:{postgres}\""),
            ),
            (
                "api = \"127.0.0.1:0\"".into(),
                format!("api = \"127.0.0.1:{api_port}\""),
            ),
            (
                "metrics = \"127.0.0.1:0\"".into(),
                format!("metrics = \"127.0.0.1:{metrics}\""),
            ),
            ("replica_id = \"a\"".into(), format!("replica_id = \"{id}\"")),
        ];
        if let Some(agents) = &agents {
            swaps.push(("agents = \"127.0.0.1:0\"".into(), format!("agents = \"{agents}\"")));
            swaps.push(("[agents]\n".into(), format!("[agents]\nadvertise = \"{agents}\"\n")));
        }
        for (from, to) in swaps {
            assert!(config.contains(&from), "the harness config has {from:?}");
            config = config.replacen(&from, &to, 1);
        }
        let path = dir.path().join("replica.toml");
        std::fs::write(&path, config).unwrap();
        let child = std::process::Command::new(jitgate_bin())
            .args(["serve", "--config"])
            .arg(&path)
            .stderr(std::fs::File::create(dir.path().join("serve.log")).unwrap())
            .spawn()
            .unwrap();
        let d = dir.path();
        let api = ApiClient::from_files(
            &format!("127.0.0.1:{api_port}"),
            &d.join("admin.crt"),
            &d.join("admin.key"),
            &d.join("ca.crt"),
        )
        .unwrap();
        let r = Replica {
            child,
            dir,
            postgres,
            metrics,
            api_port,
            agents,
            api,
        };
        let probe = r.api.clone();
        eventually("replica API up", Duration::from_secs(20), || {
            let probe = probe.clone();
            async move { probe.whoami().await.is_ok() }
        })
        .await;
        r
    }

    /// Its audit records so far.
    pub fn audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.path().join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// What `jitgate serve` logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("serve.log")).unwrap_or_default()
    }

    pub fn api_addr(&self) -> String {
        format!("127.0.0.1:{}", self.api_port)
    }

    /// GET `path` on its metrics listener: (status line, body).
    pub async fn metrics_get(&self, path: &str) -> (String, String) {
        crate::http_get(([127, 0, 0, 1], self.metrics).into(), path).await
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
