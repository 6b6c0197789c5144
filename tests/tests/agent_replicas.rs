//! Agents and several replicas (issue 14, point 8): a real `jitgate-agent` joins replica `a`
//! (the harness's proxy) and links to every replica it is told of, so replica `b` (a `jitgate
//! serve` process that never saw the join) carries psql sessions to the agent's targets over
//! a link of its own; an agent removed on `a` loses its link on `b` as well; and a restarted
//! agent links to the replicas it learnt even while the one it joined is down.
//!
//! The store and the `b` replica are set up as in `replicas.rs`, with an agent listener of
//! its own on `b` that advertises its address.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use jitgate_tests::agent::{wait_connected, Agent};
use jitgate_tests::jitgate::model::{AccessLevel, NewGrant, TargetName, UserName};
use jitgate_tests::jitgate::sandbox::LocalPostgres;
use jitgate_tests::replicas::{store_cluster, store_table, Replica};
use jitgate_tests::{eventually, metric, run_jitgate, Harness, Options};

const HOUR: Duration = Duration::from_secs(3600);
/// The agent's side (`agent.toml`). The proxies keep their default keepalives (30 s), so an
/// agent stopped for a moment does not lose its links to a timeout.
const AGENT: &str = "keepalive_interval = \"200ms\"\nkeepalive_timeout = \"1s\"\nreconnect_max = \"1s\"";

/// Replica `a`: the harness's proxy on the store, with an agent listener on `127.0.0.1:0`
/// (advertised by default: its bound address) and target `agent-db` via agent `db-east`.
async fn replica_a(store: &LocalPostgres, secrets: &Path) -> Harness {
    Harness::start_with(Options {
        store: Some(store_table(store, secrets)),
        agents_listen: Some("127.0.0.1:0".into()),
        ..Options::default()
    })
    .await
}

async fn agents_connected(r: &Replica) -> f64 {
    metric(&r.metrics_get("/metrics").await.1, "jitgate_agents_connected")
}

async fn lists_connected(r: &Replica, agent: &str) -> bool {
    r.api
        .list_agents()
        .await
        .is_ok_and(|all| all.iter().any(|a| a.name.as_str() == agent && a.connected))
}

/// The agent listener `b` advertises.
fn advertised_by(r: &Replica) -> String {
    r.agents.clone().expect("the replica has an agent listener")
}

fn agents_addr(h: &Harness) -> String {
    h.addrs().agents.expect("agent listener").to_string()
}

/// The replica list the agent saved.
fn saved_replicas(agent: &Agent) -> Vec<String> {
    let text = std::fs::read_to_string(agent.data_dir().join("replicas.json")).unwrap_or_default();
    serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| serde_json::from_value(v["replicas"].clone()).ok())
        .unwrap_or_default()
}

fn configure(agent: &Agent, h: &Harness) {
    agent.configure(&format!(
        "{AGENT}\norphan_grace = \"60s\"\n[targets]\nagent-db = \"{}\"\n",
        h.pg.address()
    ));
}

fn signal(agent: &Agent, sig: &str) {
    let pid = agent.pid().expect("agent running").to_string();
    assert!(std::process::Command::new("kill")
        .args([sig, &pid])
        .status()
        .unwrap()
        .success());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_joined_on_a_links_to_b_which_reaches_its_targets_and_a_removal_on_a_ends_it_on_b() {
    let (store, secrets) = store_cluster().await;
    let h = replica_a(&store, secrets.path()).await;
    let mut agent = Agent::join(&h, "db-east", &["agent-db"], &agents_addr(&h)).await;
    configure(&agent, &h);
    agent.start();
    wait_connected(&h, "db-east", Duration::from_secs(20)).await;

    // B comes up after the join: the agent learns of it over its link to A.
    let b = Replica::start(&h, "b").await;
    eventually("B holds a link from the agent", Duration::from_secs(30), || async {
        agents_connected(&b).await == 1.0
    })
    .await;
    assert!(lists_connected(&b, "db-east").await, "B's agent list shows the link");
    let (_, a_metrics) = h.metrics_get("/metrics").await;
    assert_eq!(
        metric(&a_metrics, "jitgate_agents_connected"),
        1.0,
        "A keeps its own link"
    );
    let mut both = vec![agents_addr(&h), advertised_by(&b)];
    both.sort();
    // Saved off the agent's thread, just after it took the list.
    eventually("the agent saved both replicas", Duration::from_secs(10), || async {
        let mut saved = saved_replicas(&agent);
        saved.sort();
        saved == both
    })
    .await;
    // B audits the link as any agent link.
    assert!(
        b.audit()
            .iter()
            .any(|e| e["event"] == "agent.connected" && e["agent"] == "db-east"),
        "{}",
        b.log()
    );

    // A grant made on A admits on B, and B's session goes through B's own link.
    let alice = h.user("alice", &["dev"]);
    h.grant("alice", "agent-db", AccessLevel::Read, HOUR).await;
    let at_b = h.conninfo_at(&alice, "agent-db", b.postgres);
    eventually("B admits under A's grant", Duration::from_secs(10), || async {
        h.psql_conninfo(&at_b, "SELECT 1").await.success
    })
    .await;
    let out = h.psql_conninfo(&at_b, "SELECT count(*) FROM items").await;
    assert!(out.success, "{}", out.stderr);
    assert_eq!(out.stdout, "100");
    assert!(b
        .audit()
        .iter()
        .any(|e| e["event"] == "statement" && e["target"] == "agent-db" && e["text"] == "SELECT count(*) FROM items"));

    // Removed on A while the agent is stopped (so it cannot end B's link itself, and B's
    // keepalive is far from its timeout): B ends the link when the removal reaches it.
    signal(&agent, "-STOP");
    let d = h.data_dir().to_str().unwrap().to_owned();
    let api = h.addrs().api.to_string();
    let r = run_jitgate(&["agent", "remove", "db-east", "--data-dir", &d, "--api", &api], &[]).await;
    assert!(r.ok, "{}", r.stderr);
    eventually("B ended the link", Duration::from_secs(10), || async {
        agents_connected(&b).await == 0.0
    })
    .await;
    let ended: Vec<_> = b
        .audit()
        .into_iter()
        .filter(|e| e["event"] == "agent.disconnected")
        .collect();
    assert_eq!(
        ended.last().map(|e| e["reason"].clone()),
        Some(serde_json::json!("removed")),
        "{ended:?}"
    );
    let out = h.psql_conninfo(&at_b, "SELECT 1").await;
    assert!(!out.success);
    assert!(out.stderr.contains("agent db-east is not connected"), "{}", out.stderr);
    assert!(b.api.list_agents().await.unwrap().is_empty());

    // Back from the stop, the agent is told it has not joined, and stops.
    signal(&agent, "-CONT");
    let status = agent.exited(Duration::from_secs(30)).await;
    assert!(!status.success());
    assert!(agent.log().contains("has not joined"), "{}", agent.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_join_answer_names_every_replica_and_a_restarted_agent_links_to_them_while_the_one_it_joined_is_down() {
    let (store, secrets) = store_cluster().await;
    let mut h = replica_a(&store, secrets.path()).await;
    let b = Replica::start(&h, "b").await;
    let advertised = |id: &str| {
        store
            .sql(
                "jitgate",
                &format!("SELECT coalesce(agents_addr, '') FROM replicas WHERE id = '{id}'"),
            )
            .unwrap()
            .trim()
            .to_owned()
    };
    eventually("both replicas advertise", Duration::from_secs(20), || async {
        advertised("a") == agents_addr(&h) && advertised("b") == advertised_by(&b)
    })
    .await;
    let mut agent = Agent::join(&h, "db-east", &["agent-db"], &agents_addr(&h)).await;
    let mut saved = saved_replicas(&agent);
    saved.sort();
    let mut both = vec![agents_addr(&h), advertised_by(&b)];
    both.sort();
    assert_eq!(saved, both, "the join answer named both replicas");

    // The replica it joined goes away; the agent starts from what it saved.
    let a = agents_addr(&h);
    h.stop_proxy().await.unwrap();
    configure(&agent, &h);
    agent.start();
    eventually("B holds a link from the agent", Duration::from_secs(30), || async {
        lists_connected(&b, "db-east").await
    })
    .await;
    let grant = NewGrant {
        user: UserName::new("alice").unwrap(),
        target: TargetName::new("agent-db").unwrap(),
        access: AccessLevel::Read,
        duration_secs: HOUR.as_secs(),
        reason: "e2e test".into(),
    };
    b.api.create_grant(&grant).await.unwrap();
    let alice = h.user("alice", &["dev"]);
    let out = h
        .psql_conninfo(&h.conninfo_at(&alice, "agent-db", b.postgres), "SELECT 42")
        .await;
    assert!(out.success, "{}\n{}", out.stderr, agent.log());
    assert_eq!(out.stdout, "42");
    // The one that is down is redialled meanwhile.
    let log = agent.log();
    assert!(
        log.lines().any(|l| l.contains("reconnecting") && l.contains(&a)),
        "{log}"
    );
    agent.kill().await;
}
