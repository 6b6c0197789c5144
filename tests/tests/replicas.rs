//! Several replicas on one PostgreSQL store (issue 14, first part): a real PostgreSQL cluster
//! as the store, separate from the target's, the harness's proxy as replica A and two
//! `jitgate serve` processes as B and C, each with a data directory of its own (the same CA
//! and keys) and its own audit log.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use jitgate_tests::jitgate::client::ApiClient;
use jitgate_tests::jitgate::model::AccessLevel;
use jitgate_tests::jitgate::pki;
use jitgate_tests::jitgate::sandbox::{free_port, LocalPostgres, PgOptions};
use jitgate_tests::{eventually, jitgate_bin, Harness, Options};

const HOUR: Duration = Duration::from_secs(3600);
const STORE_PASSWORD: &str = "store-secret-1";

/// The store cluster, with database `jitgate` owned by role `jitgate`.
async fn store_cluster() -> (LocalPostgres, tempfile::TempDir) {
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

fn store_table(pg: &LocalPostgres, secrets: &Path) -> String {
    format!(
        "[store]\nurl = \"postgresql://jitgate@{}/jitgate\"\npassword_file = \"{}\"\n",
        pg.address(),
        secrets.join("store.password").display()
    )
}

/// A `jitgate serve` process with its own data directory (a copy of the harness's keys).
struct Replica {
    child: std::process::Child,
    dir: tempfile::TempDir,
    postgres: u16,
    api: ApiClient,
}

impl Replica {
    async fn start(h: &Harness) -> Replica {
        let dir = tempfile::Builder::new().prefix("jitgate-replica-").tempdir().unwrap();
        for entry in std::fs::read_dir(h.data_dir()).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.file_type().unwrap().is_file() && !name.starts_with("audit") && !name.starts_with("jitgate.db") {
                std::fs::copy(entry.path(), dir.path().join(&name)).unwrap();
            }
        }
        let (postgres, api, metrics) = (free_port().unwrap(), free_port().unwrap(), free_port().unwrap());
        let config = std::fs::read_to_string(h.config_path()).unwrap();
        let config = config
            .replacen(
                &format!("data_dir = \"{}\"", h.data_dir().display()),
                &format!("data_dir = \"{}\"", dir.path().display()),
                1,
            )
            .replacen(
                "postgres = \"127.0.0.1:0\"",
                &format!("postgres = \"127.0.0.1:{postgres}\""),
                1,
            )
            .replacen("api = \"127.0.0.1:0\"", &format!("api = \"127.0.0.1:{api}\""), 1)
            .replacen(
                "metrics = \"127.0.0.1:0\"",
                &format!("metrics = \"127.0.0.1:{metrics}\""),
                1,
            );
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
            &format!("127.0.0.1:{api}"),
            &d.join("admin.crt"),
            &d.join("admin.key"),
            &d.join("ca.crt"),
        )
        .unwrap();
        let r = Replica {
            child,
            dir,
            postgres,
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

    fn audit(&self) -> Vec<serde_json::Value> {
        audit_of(&self.dir.path().join("audit.jsonl"))
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn audit_of(path: &PathBuf) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

async fn cluster() -> (Harness, LocalPostgres, tempfile::TempDir) {
    let (store, secrets) = store_cluster().await;
    let h = Harness::start_with(Options {
        store: Some(store_table(&store, secrets.path())),
        ..Options::default()
    })
    .await;
    (h, store, secrets)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_grant_made_on_a_admits_on_b_and_a_revoke_on_a_cuts_a_session_on_c() {
    let (h, _store, _secrets) = cluster().await;
    let b = Replica::start(&h).await;
    let c = Replica::start(&h).await;
    let alice = h.user("alice", &["dev"]);
    // No grant yet: B refuses.
    let out = h
        .psql_conninfo(&h.conninfo_at(&alice, "prod-db", b.postgres), "SELECT 1")
        .await;
    assert!(!out.success);
    let made = Instant::now();
    let grant = h.grant("alice", "prod-db", AccessLevel::Read, HOUR).await;
    let at_b = h.conninfo_at(&alice, "prod-db", b.postgres);
    eventually("B admits under A's grant", Duration::from_secs(10), || async {
        h.psql_conninfo(&at_b, "SELECT 1").await.success
    })
    .await;
    eprintln!("grant on A to a session on B: {:?}", made.elapsed());
    // B and C list the grant.
    assert!(b.api.list_grants().await.unwrap().iter().any(|g| g.id == grant.id));
    // A long query on C, then a revoke on A.
    let at_c = h.conninfo_at(&alice, "prod-db", c.postgres);
    let long = {
        let at_c = at_c.clone();
        tokio::spawn(async move {
            jitgate_tests::client_command("psql")
                .arg(at_c)
                .args(["-X", "-c", "SELECT pg_sleep(60)"])
                .output()
                .await
                .unwrap()
        })
    };
    eventually("the session on C is running", Duration::from_secs(10), || async {
        c.audit()
            .iter()
            .any(|e| e["event"] == "statement" && e["text"] == "SELECT pg_sleep(60)")
    })
    .await;
    let revoked = Instant::now();
    h.admin().revoke_grant(grant.id.as_str()).await.unwrap();
    let out = tokio::time::timeout(Duration::from_secs(20), long)
        .await
        .expect("C cut the session")
        .unwrap();
    eprintln!("revoke on A to the cut on C: {:?}", revoked.elapsed());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("revoked"), "{stderr}");
    eventually("C audits the cut", Duration::from_secs(10), || async {
        c.audit()
            .iter()
            .any(|e| e["event"] == "session.end" && e["reason"] == "grant_revoked")
    })
    .await;
    // One grant.created and one grant.revoked, both on A; none on B or C.
    let count = |audit: &[serde_json::Value], kind: &str| audit.iter().filter(|e| e["event"] == kind).count();
    assert_eq!(count(&h.audit(), "grant.created"), 1);
    assert_eq!(count(&h.audit(), "grant.revoked"), 1);
    assert_eq!(
        count(&b.audit(), "grant.created") + count(&c.audit(), "grant.created"),
        0
    );
    // And C refuses new sessions.
    let out = h.psql_conninfo(&at_c, "SELECT 1").await;
    assert!(!out.success);
}

#[tokio::test(flavor = "multi_thread")]
async fn expiry_is_recorded_once_and_a_restarted_replica_catches_up() {
    let (h, _store, _secrets) = cluster().await;
    let b = Replica::start(&h).await;
    let mut c = Replica::start(&h).await;
    // C goes away (kill -9); grants change meanwhile.
    c.child.kill().unwrap();
    c.child.wait().unwrap();
    let short = h
        .grant("bob", "prod-db", AccessLevel::Read, Duration::from_secs(3))
        .await;
    let long = h.grant("carol", "prod-db", AccessLevel::Read, HOUR).await;
    let gone = h.grant("dave", "prod-db", AccessLevel::Read, HOUR).await;
    h.admin().revoke_grant(gone.id.as_str()).await.unwrap();
    // Every replica holds `short` and ends it at its expiry; the store lets one record it.
    eventually(
        "the short grant expired everywhere",
        Duration::from_secs(15),
        || async {
            h.admin().list_grants().await.unwrap().iter().all(|g| g.id != short.id)
                && b.api.list_grants().await.unwrap().iter().all(|g| g.id != short.id)
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let expired = |a: &[serde_json::Value]| {
        a.iter()
            .filter(|e| e["event"] == "grant.expired" && e["grant_id"] == short.id.as_str())
            .count()
    };
    assert_eq!(
        expired(&h.audit()) + expired(&b.audit()),
        1,
        "exactly one grant.expired"
    );
    // C restarts with the same data directory and catches up from the store.
    let c2 = Replica::start(&h).await;
    drop(c);
    let listed = c2.api.list_grants().await.unwrap();
    assert!(listed.iter().any(|g| g.id == long.id), "{listed:?}");
    assert!(listed.iter().all(|g| g.id != gone.id && g.id != short.id), "{listed:?}");
    let carol = h.user("carol", &["dev"]);
    let out = h
        .psql_conninfo(&h.conninfo_at(&carol, "prod-db", c2.postgres), "SELECT 1")
        .await;
    assert!(out.success, "{}", out.stderr);
}

#[tokio::test(flavor = "multi_thread")]
async fn config_check_says_whether_the_store_answers() {
    let (h, store, _secrets) = cluster().await;
    let ok = jitgate_tests::run_jitgate(&["config", "check", &h.config_path().display().to_string()], &[]).await;
    assert!(ok.ok, "{ok:?}");
    assert!(ok.stdout.contains("store"), "{}", ok.stdout);
    // A wrong password: the check names the store.
    let bad = h.data_dir().join("bad.toml");
    let text = std::fs::read_to_string(h.config_path()).unwrap();
    let wrong = h.data_dir().join("wrong.password");
    pki::write_file(&wrong, "nope", true).unwrap();
    let text = text.replace(
        &format!(
            "password_file = \"{}\"",
            _secrets.path().join("store.password").display()
        ),
        &format!("password_file = \"{}\"", wrong.display()),
    );
    std::fs::write(&bad, text).unwrap();
    let out = jitgate_tests::run_jitgate(&["config", "check", &bad.display().to_string()], &[]).await;
    assert!(!out.ok);
    assert!(out.stderr.contains("store"), "{}", out.stderr);
    drop(store);
}
