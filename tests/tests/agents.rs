//! Targets behind an agent: a real `jitgate-agent` process joins the in-process proxy with a
//! one-time token and carries psql sessions to PostgreSQL over one multiplexed link, with the
//! same audit, guardrails, cancel and cuts as a direct target; and the faults: the agent
//! killed, its link blackholed in a network namespace, a second process with its identity.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use jitgate_protocol::tunnel::{self, Hello};
use jitgate_tests::agent::{run_agent, token, wait_connected, Agent, Netns};
use jitgate_tests::jitgate::model::AccessLevel;
use jitgate_tests::{
    client_command, eventually, metric, poke_and_collect, run_jitgate, sleeping, Harness, Options, UserCert,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const HOUR: Duration = Duration::from_secs(3600);
const KEEPALIVE: &str = "keepalive_interval = \"200ms\"\nkeepalive_timeout = \"1s\"";

async fn harness_at(listen: &str, agents: &'static str) -> Harness {
    Harness::start_with(Options {
        agents_listen: Some(listen.to_owned()),
        agents,
        ..Options::default()
    })
    .await
}

fn agents_addr(h: &Harness) -> String {
    h.addrs().agents.expect("agent listener").to_string()
}

/// A joined, running agent `db-east` serving `agent-db` (PostgreSQL over TCP).
async fn running_agent(h: &Harness) -> Agent {
    let mut agent = Agent::join(h, "db-east", &["agent-db"], &agents_addr(h)).await;
    agent.configure(&format!(
        // A long grace: a database connection that closes within a test's bound was closed by
        // a reset stream (a cut), not by the grace.
        "{KEEPALIVE}\norphan_grace = \"60s\"\nreconnect_max = \"2s\"\n[targets]\nagent-db = \"{}\"\n",
        h.pg.address()
    ));
    agent.start();
    wait_connected(h, "db-east", Duration::from_secs(20)).await;
    agent
}

/// The agent's key and certificate as separate files, for clients that want them so.
fn agent_as_user(h: &Harness, agent: &Agent) -> UserCert {
    let pem = std::fs::read_to_string(agent.data_dir().join("agent.pem")).unwrap();
    let at = pem.find("-----BEGIN CERTIFICATE-----").unwrap();
    let (key, cert) = pem.split_at(at);
    let (kp, cp) = (agent.data_dir().join("split.key"), agent.data_dir().join("split.crt"));
    std::fs::write(&kp, key).unwrap();
    std::fs::write(&cp, cert).unwrap();
    UserCert {
        user: "db-east".into(),
        cert: cp,
        key: kp,
        ca: h.data_dir().join("ca.crt"),
    }
}

/// Opens TLS to the agent listener as `client` (or with no certificate), sends `hello` and
/// returns the proxy's answer.
async fn raw_hello(h: &Harness, client: Option<&UserCert>, hello: &Hello) -> tunnel::Answer {
    let cfg = jitgate_tests::raw::client_config(h.data_dir(), client, Some(tunnel::ALPN));
    let tcp = tokio::net::TcpStream::connect(agents_addr(h)).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = tokio_rustls::TlsConnector::from(cfg).connect(name, tcp).await.unwrap();
    let mut stream = tokio::io::BufReader::new(tls);
    stream.write_all(&tunnel::encode(hello)).await.unwrap();
    stream.flush().await.unwrap();
    let line = tokio::time::timeout(Duration::from_secs(10), tunnel::read_line(&mut stream))
        .await
        .unwrap()
        .unwrap();
    tunnel::decode_answer(&line).unwrap()
}

fn refusals(h: &Harness) -> Vec<String> {
    h.audit_events("agent.refused")
        .iter()
        .map(|e| e["reason"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn psql_through_an_agent_is_audited_guarded_and_listed() {
    let h = harness_at("127.0.0.1:0", KEEPALIVE).await;
    let agent = running_agent(&h).await;
    let alice = h.user("alice", &["dev"]);
    h.grant("alice", "agent-db", AccessLevel::Read, HOUR).await;

    let out = h.psql(&alice, "agent-db", "SELECT count(*) FROM items").await;
    assert!(out.success, "{}", out.stderr);
    assert_eq!(out.stdout, "100");
    let statements = h.audit_events("statement");
    assert!(
        statements
            .iter()
            .any(|s| s["target"] == "agent-db" && s["text"] == "SELECT count(*) FROM items"),
        "{statements:?}"
    );
    // The read-only rule holds through the agent like anywhere else.
    let out = h.psql(&alice, "agent-db", "DELETE FROM items").await;
    assert!(!out.success);
    assert!(
        out.stderr.contains("read access to agent-db does not allow"),
        "{}",
        out.stderr
    );
    assert_eq!(h.pg.sql("app", "SELECT count(*) FROM items").unwrap(), "100");

    let joined = h.audit_events("agent.joined");
    assert_eq!(joined.len(), 1, "{joined:?}");
    assert_eq!(joined[0]["agent"], "db-east");
    assert_eq!(joined[0]["targets"], serde_json::json!(["agent-db"]));
    let connected = h.audit_events("agent.connected");
    assert_eq!(connected[0]["version"], env!("CARGO_PKG_VERSION"));

    let d = h.data_dir().to_str().unwrap().to_owned();
    let api = h.addrs().api.to_string();
    let list = run_jitgate(&["agent", "list", "--json", "--data-dir", &d, "--api", &api], &[]).await;
    assert!(list.ok, "{}", list.stderr);
    let list: serde_json::Value = serde_json::from_str(&list.stdout).unwrap();
    assert_eq!(list[0]["name"], "db-east");
    assert_eq!(list[0]["connected"], true);
    assert_eq!(list[0]["serving"], serde_json::json!(["agent-db"]));
    assert!(list[0]["remote_addr"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert_eq!(list[0]["version"], env!("CARGO_PKG_VERSION"));
    let text = run_jitgate(&["agent", "list", "--data-dir", &d, "--api", &api], &[]).await;
    assert!(
        text.stdout.contains("db-east") && text.stdout.contains("agent-db"),
        "{}",
        text.stdout
    );

    // One stream per session while it lives.
    let idle = h.psql_interactive(&alice, "agent-db");
    eventually("a stream open", Duration::from_secs(20), || async {
        let (_, m) = h.metrics_get("/metrics").await;
        metric(&m, "jitgate_agent_streams_open") == 1.0 && metric(&m, "jitgate_agents_connected") == 1.0
    })
    .await;
    drop(idle);
    eventually("the stream closed", Duration::from_secs(20), || async {
        let (_, m) = h.metrics_get("/metrics").await;
        metric(&m, "jitgate_agent_streams_open") == 0.0
    })
    .await;
    drop(agent);
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_and_the_cuts_reach_through_the_agent() {
    let h = harness_at("127.0.0.1:0", KEEPALIVE).await;
    let _agent = running_agent(&h).await;
    let alice = h.user("alice", &["dev"]);
    h.grant("alice", "agent-db", AccessLevel::Read, HOUR).await;

    // psql's Ctrl-C: the cancel request goes to the target through the agent too.
    let psql = client_command("psql")
        .arg(h.conninfo(&alice, "agent-db"))
        .args(["-X", "-c", "SELECT pg_sleep(60)"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    eventually("pg_sleep running", Duration::from_secs(20), || async {
        sleeping(&h) == 1
    })
    .await;
    std::process::Command::new("kill")
        .args(["-INT", &psql.id().unwrap().to_string()])
        .status()
        .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(30), psql.wait_with_output())
        .await
        .expect("cancelled")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("canceling statement due to user request"), "{stderr}");

    // Expiry during pg_sleep(60): the FATAL, the statement cancelled on the server, and the
    // agent's database connection gone.
    let bob = h.user("bob", &["dev"]);
    h.grant("bob", "agent-db", AccessLevel::Read, Duration::from_secs(4))
        .await;
    let started = Instant::now();
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        client_command("psql")
            .arg(h.conninfo(&bob, "agent-db"))
            .args(["-X", "-c", "SELECT pg_sleep(60)"])
            .output(),
    )
    .await
    .expect("cut at expiry")
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("expired"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(30));
    eventually("no pg_sleep left", Duration::from_secs(20), || async {
        sleeping(&h) == 0
    })
    .await;
    eventually("the reader's backends gone", Duration::from_secs(20), || async {
        h.backends_of("jit_reader") == 0
    })
    .await;

    // Revoke and kill cut sessions through the agent as well.
    let carol = h.user("carol", &["dev"]);
    let g = h.grant("carol", "agent-db", AccessLevel::Read, HOUR).await;
    let revoked = h.psql_interactive(&carol, "agent-db");
    let killed = h.psql_interactive(&alice, "agent-db");
    eventually("two sessions", Duration::from_secs(20), || async {
        h.admin().list_sessions().await.unwrap().len() == 2
    })
    .await;
    h.admin().revoke_grant(g.id.as_str()).await.unwrap();
    eventually("the revoked session gone", Duration::from_secs(20), || async {
        h.admin().list_sessions().await.unwrap().len() == 1
    })
    .await;
    let sessions = h.admin().list_sessions().await.unwrap();
    assert_eq!(sessions[0].user.as_str(), "alice");
    h.admin().kill_session(sessions[0].id.as_str()).await.unwrap();
    let (r, k) = tokio::join!(poke_and_collect(revoked), poke_and_collect(killed));
    assert!(r.contains("was revoked"), "{r}");
    assert!(k.contains("terminated by an administrator"), "{k}");
    eventually("backends closed by the agent", Duration::from_secs(20), || async {
        h.backends_of("jit_reader") == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_expiry_notice_and_an_extension_work_through_the_agent() {
    let h = Harness::start_with(Options {
        agents_listen: Some("127.0.0.1:0".into()),
        agents: KEEPALIVE,
        limits: "\n[sessions]\nexpiry_notice = \"3s\"",
        ..Options::default()
    })
    .await;
    let _agent = running_agent(&h).await;
    let alice = h.user("alice", &["dev"]);
    let grant = h
        .grant("alice", "agent-db", AccessLevel::Read, Duration::from_secs(6))
        .await;
    let started = Instant::now();
    let mut s = jitgate_tests::raw::session(&h, &alice, "agent-db").await;
    let first = tokio::time::timeout(Duration::from_secs(20), read_until_notice(&mut s))
        .await
        .expect("a NOTICE before expiry");
    assert!(first.contains("access to agent-db ends in"), "{first}");
    h.admin()
        .extend_grant(grant.id.as_str(), Duration::from_secs(5))
        .await
        .unwrap();
    // Past the first end the session stands; the notice comes again, then the FATAL at the
    // new end.
    let rest = tokio::time::timeout(Duration::from_secs(30), jitgate_tests::raw::read_until_ready(&mut s))
        .await
        .expect("the FATAL at the new end");
    let (code, message) = jitgate_tests::raw::error_of(&rest).expect("a FATAL");
    assert_eq!(code, "57P01");
    assert!(message.contains("expired"), "{message}");
    assert!(started.elapsed() >= Duration::from_secs(6), "not cut at the old end");
    assert!(
        rest.iter().any(|m| m.tag == b'N'),
        "the notice re-armed for the new end"
    );
}

/// Reads backend messages until a NoticeResponse; its text.
async fn read_until_notice<S: AsyncReadExt + Unpin>(s: &mut S) -> String {
    loop {
        let mut head = [0u8; 5];
        s.read_exact(&mut head).await.unwrap();
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut body = vec![0u8; len - 4];
        s.read_exact(&mut body).await.unwrap();
        if head[0] == b'N' {
            return String::from_utf8_lossy(&body).into_owned();
        }
        assert_ne!(
            head[0],
            b'E',
            "an error before the notice: {}",
            String::from_utf8_lossy(&body)
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_on_the_agent_listener_gets_a_refusal_and_a_closed_connection() {
    let h = harness_at("127.0.0.1:0", KEEPALIVE).await;
    let send_raw = |bytes: Vec<u8>| {
        let h = &h;
        async move {
            let cfg = jitgate_tests::raw::client_config(h.data_dir(), None, Some(tunnel::ALPN));
            let tcp = tokio::net::TcpStream::connect(agents_addr(h)).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
            let mut tls = tokio_rustls::TlsConnector::from(cfg).connect(name, tcp).await.unwrap();
            let _ = tls.write_all(&bytes).await;
            let _ = tls.flush().await;
            let mut out = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(15), tls.read_to_end(&mut out)).await;
            assert!(read.is_ok(), "the proxy closes the connection");
            String::from_utf8_lossy(&out).into_owned()
        }
    };
    let answer = send_raw(b"\x00\x01\x02 not json\n".to_vec()).await;
    assert!(answer.contains("malformed hello"), "{answer}");
    let answer =
        send_raw(b"{\"kind\":\"join\",\"v\":1,\"token\":\"jgj1.x.y.z\",\"csr\":\"\",\"version\":\"1\"}\n".to_vec())
            .await;
    assert!(answer.contains("not a jitgate join token"), "{answer}");
    let mut long = vec![b'{'; tunnel::MAX_HELLO + 100];
    long.push(b'\n');
    let answer = send_raw(long).await;
    assert!(answer.contains("hello longer than"), "{answer}");
    // A join whose CSR is no CSR is refused before the token is spent.
    let t = token(&h, "db-east", &["agent-db"], 600).await;
    let bad_csr = format!("{{\"kind\":\"join\",\"v\":1,\"token\":\"{t}\",\"csr\":\"not a csr\",\"version\":\"1\"}}\n");
    let answer = send_raw(bad_csr.into_bytes()).await;
    assert!(answer.contains("unreadable certificate request"), "{answer}");
    let dir = tempfile::tempdir().unwrap();
    let joined = run_agent(&[
        "join",
        "--proxy",
        &agents_addr(&h),
        "--token",
        &t,
        "--data-dir",
        dir.path().to_str().unwrap(),
    ])
    .await;
    assert!(joined.ok, "the token still works: {}", joined.stderr);
    // Plain TCP, no TLS at all.
    let mut tcp = tokio::net::TcpStream::connect(agents_addr(&h)).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(15), tcp.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "closed");
    assert!(!refusals(&h).is_empty());
    // The proxy is still serving agents.
    let mut agent = Agent::join(&h, "db-west", &["agent-db"], &agents_addr(&h)).await;
    agent.configure(&format!("[targets]\nagent-db = \"{}\"\n", h.pg.address()));
    agent.start();
    wait_connected(&h, "db-west", Duration::from_secs(20)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_are_single_use_expire_and_pin_the_ca_and_certificates_stay_in_their_lane() {
    let h = harness_at("127.0.0.1:0", KEEPALIVE).await;
    let addr = agents_addr(&h);
    let dir = tempfile::tempdir().unwrap();
    let d = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();

    let t = token(&h, "db-east", &["agent-db"], 600).await;
    let ok = run_agent(&["join", "--proxy", &addr, "--token", &t, "--data-dir", &d("a")]).await;
    assert!(ok.ok, "{}", ok.stderr);
    assert!(
        ok.stdout.contains("joined") && ok.stdout.contains("db-east"),
        "{}",
        ok.stdout
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.path().join("a/agent.pem")).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    // A replay of the same token.
    let again = run_agent(&["join", "--proxy", &addr, "--token", &t, "--data-dir", &d("b")]).await;
    assert!(!again.ok);
    assert!(again.stderr.contains("join token already used"), "{}", again.stderr);
    // An expired token.
    let short = token(&h, "db-west", &["agent-db"], 1).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let late = run_agent(&["join", "--proxy", &addr, "--token", &short, "--data-dir", &d("c")]).await;
    assert!(!late.ok);
    assert!(late.stderr.contains("join token expired"), "{}", late.stderr);
    // A token whose fingerprint names another CA: the agent refuses the proxy.
    let fresh = token(&h, "db-north", &["agent-db"], 600).await;
    let (head, fp) = fresh.rsplit_once('.').unwrap();
    let flipped = format!(
        "{head}.{}",
        if fp.starts_with('0') {
            fp.replacen('0', "1", 1)
        } else {
            format!("0{}", &fp[1..])
        }
    );
    let pinned = run_agent(&["join", "--proxy", &addr, "--token", &flipped, "--data-dir", &d("d")]).await;
    assert!(!pinned.ok);
    assert!(
        pinned.stderr.contains("does not match the pinned fingerprint"),
        "{}",
        pinned.stderr
    );
    // The untouched token still works: the failed pin spent nothing.
    let fine = run_agent(&["join", "--proxy", &addr, "--token", &fresh, "--data-dir", &d("e")]).await;
    assert!(fine.ok, "{}", fine.stderr);
    let reasons = refusals(&h);
    assert!(reasons.iter().any(|r| r.contains("already used")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("expired")), "{reasons:?}");
    assert_eq!(h.audit_events("agent.joined").len(), 2);

    // An agent claiming a target it was not admitted for: refused, audited, and the agent
    // stops (retrying cannot help).
    let mut agent = Agent::join(&h, "db-south", &["agent-db"], &addr).await;
    agent.configure(&format!(
        "{KEEPALIVE}\n[targets]\nagent-db = \"{0}\"\nprod-db = \"{0}\"\n",
        h.pg.address()
    ));
    agent.start();
    let status = agent.exited(Duration::from_secs(30)).await;
    assert!(!status.success());
    assert!(agent.log().contains("not admitted"), "{}", agent.log());
    assert!(
        refusals(&h)
            .iter()
            .any(|r| r.contains("db-south claims target \"prod-db\", which it was not admitted for")),
        "{:?}",
        refusals(&h)
    );

    // An agent certificate is no user: refused on the PostgreSQL listener and the API.
    let as_user = agent_as_user(&h, &agent);
    h.grant("db-south", "prod-db", AccessLevel::Read, HOUR).await;
    let out = h.psql(&as_user, "prod-db", "SELECT 1").await;
    assert!(!out.success);
    let api = jitgate_tests::jitgate::client::ApiClient::from_files(
        &h.addrs().api.to_string(),
        &as_user.cert,
        &as_user.key,
        &as_user.ca,
    )
    .unwrap();
    assert!(api.whoami().await.is_err());
    assert!(api.list_agents().await.is_err());
    // A user certificate on the agent listener: refused, whatever it asks.
    let alice = h.user("alice", &["admin"]);
    let run = Hello::Run {
        v: tunnel::VERSION,
        targets: vec!["agent-db".into()],
        version: "x".into(),
    };
    let answer = raw_hello(&h, Some(&alice), &run).await;
    assert!(
        answer.error.as_deref().unwrap_or_default().contains("user certificate"),
        "{answer:?}"
    );
    // Without any certificate, only a join is possible.
    let answer = raw_hello(&h, None, &run).await;
    assert!(
        answer
            .error
            .as_deref()
            .unwrap_or_default()
            .contains("agent certificate is required"),
        "{answer:?}"
    );
    // A hello of another version.
    let answer = raw_hello(
        &h,
        None,
        &Hello::Join {
            v: 99,
            token: fresh.clone(),
            csr: String::new(),
            version: "x".into(),
        },
    )
    .await;
    assert!(
        answer.error.as_deref().unwrap_or_default().contains("version 99"),
        "{answer:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_removed_agent_loses_its_link_and_its_sessions_and_cannot_come_back() {
    let h = harness_at("127.0.0.1:0", KEEPALIVE).await;
    let mut agent = running_agent(&h).await;
    let alice = h.user("alice", &["dev"]);
    h.grant("alice", "agent-db", AccessLevel::Read, HOUR).await;
    let idle = h.psql_interactive(&alice, "agent-db");
    eventually("the session", Duration::from_secs(20), || async {
        h.admin().list_sessions().await.unwrap().len() == 1
    })
    .await;
    let d = h.data_dir().to_str().unwrap().to_owned();
    let api = h.addrs().api.to_string();
    let r = run_jitgate(&["agent", "remove", "db-east", "--data-dir", &d, "--api", &api], &[]).await;
    assert!(r.ok, "{}", r.stderr);
    assert!(r.stdout.contains("removed agent db-east"), "{}", r.stdout);
    let stderr = poke_and_collect(idle).await;
    assert!(stderr.contains("the link to agent db-east was lost"), "{stderr}");
    // The agent tries again, is told it has not joined, and stops.
    let status = agent.exited(Duration::from_secs(30)).await;
    assert!(!status.success());
    assert!(agent.log().contains("has not joined"), "{}", agent.log());
    assert!(h.admin().list_agents().await.unwrap().is_empty());
    let removed = h.audit_events("agent.removed");
    assert_eq!(removed[0]["by"], "admin", "{removed:?}");
    assert_eq!(h.audit_events("agent.disconnected")[0]["reason"], "removed");
    let again = run_jitgate(&["agent", "remove", "db-east", "--data-dir", &d, "--api", &api], &[]).await;
    assert!(
        !again.ok && again.stderr.contains("no agent db-east"),
        "{}",
        again.stderr
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_agent_ends_its_sessions_naming_it_and_a_restart_serves_again() {
    let h = harness_at("127.0.0.1:0", KEEPALIVE).await;
    let mut agent = running_agent(&h).await;
    let alice = h.user("alice", &["dev"]);
    h.grant("alice", "agent-db", AccessLevel::Read, HOUR).await;
    let busy = client_command("psql")
        .arg(h.conninfo(&alice, "agent-db"))
        .args(["-X", "-c", "SELECT pg_sleep(60)"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    eventually("pg_sleep running", Duration::from_secs(20), || async {
        sleeping(&h) == 1
    })
    .await;
    agent.kill().await;
    let out = tokio::time::timeout(Duration::from_secs(10), busy.wait_with_output())
        .await
        .expect("the session ends at once")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("the link to agent db-east was lost"), "{stderr}");
    eventually("session.end recorded", Duration::from_secs(10), || async {
        h.audit_events("session.end")
            .iter()
            .any(|e| e["reason"] == "agent_lost")
    })
    .await;
    let gone = h.audit_events("agent.disconnected");
    assert_eq!(gone[0]["reason"], "closed", "{gone:?}");
    // Without an agent, a session is refused with a clear message.
    let out = h.psql(&alice, "agent-db", "SELECT 1").await;
    assert!(!out.success);
    assert!(out.stderr.contains("agent db-east is not connected"), "{}", out.stderr);

    agent.start();
    wait_connected(&h, "db-east", Duration::from_secs(20)).await;
    let out = h.psql(&alice, "agent-db", "SELECT 42").await;
    assert!(out.success, "{}", out.stderr);
    assert_eq!(out.stdout, "42");
    let (_, m) = h.metrics_get("/metrics").await;
    assert_eq!(metric(&m, "jitgate_agent_reconnects_total"), 1.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_process_with_the_same_identity_waits_until_the_first_link_ends() {
    let h = harness_at("127.0.0.1:0", KEEPALIVE).await;
    let mut first = running_agent(&h).await;
    // A copy of the first agent's identity, as a second replica of it would have.
    let mut second = Agent::join(&h, "db-other", &["agent-db"], &agents_addr(&h)).await;
    for f in ["agent.pem", "agent.json", "ca.crt", "agent.toml"] {
        std::fs::copy(first.data_dir().join(f), second.data_dir().join(f)).unwrap();
    }
    second.start();
    eventually("second refused", Duration::from_secs(20), || async {
        refusals(&h)
            .iter()
            .any(|r| r.contains("agent db-east is already connected from"))
    })
    .await;
    let alice = h.user("alice", &["dev"]);
    h.grant("alice", "agent-db", AccessLevel::Read, HOUR).await;
    let out = h.psql(&alice, "agent-db", "SELECT 1").await;
    assert!(out.success, "the first link keeps serving: {}", out.stderr);

    first.kill().await;
    eventually("the second took over", Duration::from_secs(30), || async {
        h.audit_events("agent.connected").len() == 2
    })
    .await;
    wait_connected(&h, "db-east", Duration::from_secs(20)).await;
    let out = h.psql(&alice, "agent-db", "SELECT 2").await;
    assert!(out.success, "{}", out.stderr);
    assert!(second.log().contains("already connected"), "{}", second.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_renews_its_certificate_and_the_link_outlives_the_first_one() {
    let h = harness_at(
        "127.0.0.1:0",
        "cert_ttl = \"12s\"\nkeepalive_interval = \"200ms\"\nkeepalive_timeout = \"1s\"",
    )
    .await;
    let agent = running_agent(&h).await;
    let first = std::fs::read_to_string(agent.data_dir().join("agent.pem")).unwrap();
    let alice = h.user("alice", &["dev"]);
    h.grant("alice", "agent-db", AccessLevel::Read, HOUR).await;
    let mut psql = h.psql_interactive(&alice, "agent-db");
    eventually("renewed", Duration::from_secs(30), || async {
        !h.audit_events("agent.renewed").is_empty()
    })
    .await;
    let renewed = std::fs::read_to_string(agent.data_dir().join("agent.pem")).unwrap();
    assert_ne!(first, renewed, "a new key and certificate");
    // Past the first certificate's end: the link and the session still stand.
    tokio::time::sleep(Duration::from_secs(13)).await;
    let mut stdin = psql.stdin.take().unwrap();
    stdin.write_all(b"SELECT 'still here';\n").await.unwrap();
    drop(stdin);
    let mut out = String::new();
    psql.stdout.take().unwrap().read_to_string(&mut out).await.unwrap();
    assert!(out.contains("still here"), "{out}");
    assert!(h.audit_events("agent.disconnected").is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_blackholed_link_ends_sessions_within_the_keepalive_timeout_and_the_agent_lets_go_after_its_grace() {
    let ns = Netns::create();
    let h = harness_at(&format!("{}:0", ns.host_ip), KEEPALIVE).await;
    // The proxy's certificate names localhost and 127.0.0.1, not the veth address.
    let mut agent = Agent::join_checking(&h, "db-east", &["agent-db"], &agents_addr(&h), "localhost").await;
    agent.in_netns(&ns.name);
    // PostgreSQL's Unix socket crosses namespaces: only the link to the proxy is cut.
    agent.configure(&format!(
        "{KEEPALIVE}\norphan_grace = \"4s\"\n[targets]\nagent-db = \"unix:{}/.s.PGSQL.{}\"\n",
        h.pg.socket_dir().display(),
        h.pg.port()
    ));
    agent.start();
    wait_connected(&h, "db-east", Duration::from_secs(20)).await;
    let alice = h.user("alice", &["dev"]);
    h.grant("alice", "agent-db", AccessLevel::Read, HOUR).await;
    let idle = h.psql_interactive(&alice, "agent-db");
    eventually("the reader's backend", Duration::from_secs(20), || async {
        h.backends_of("jit_reader") == 1
    })
    .await;

    ns.blackhole();
    let cut = Instant::now();
    eventually("the proxy ends the session", Duration::from_secs(10), || async {
        h.audit_events("session.end")
            .iter()
            .any(|e| e["reason"] == "agent_lost")
    })
    .await;
    let noticed = cut.elapsed();
    let gone = h.audit_events("agent.disconnected");
    assert_eq!(gone[0]["reason"], "keepalive_timeout", "{gone:?}");
    let stderr = poke_and_collect(idle).await;
    assert!(stderr.contains("the link to agent db-east was lost"), "{stderr}");
    let (_, m) = h.metrics_get("/metrics").await;
    assert_eq!(metric(&m, "jitgate_agent_keepalive_failures_total"), 1.0);

    // The agent notices too; its database connection outlives the link by the grace.
    eventually("the agent notices", Duration::from_secs(10), || async {
        agent.log().contains("closing its database connection after the grace")
    })
    .await;
    assert_eq!(h.backends_of("jit_reader"), 1, "held for the grace");
    eventually("closed after the grace", Duration::from_secs(15), || async {
        h.backends_of("jit_reader") == 0
    })
    .await;
    assert!(agent.log().contains("no keepalive answer"), "{}", agent.log());
    eprintln!("proxy noticed the blackhole after {noticed:?}");
}
