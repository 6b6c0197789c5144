//! SSH through the proxy with the real OpenSSH client and server: certificate authentication
//! (and what it refuses), the target from the login name, admission, exec audited with its
//! exit status, an interactive shell with a pty, the notice and an extension, revoke, kill and
//! the cut at expiry with a line on the terminal, and a target whose host key does not match.
//! Recordings, files, forwards and the client commands are in `ssh_files.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant, SystemTime};

use jitgate_tests::jitgate::model::AccessLevel;
use jitgate_tests::ssh::{spawn_ssh, ssh, ssh_user, ssh_user_between};
use jitgate_tests::{eventually, metric, Harness, Options};
use tokio::io::AsyncWriteExt;

const HOUR: Duration = Duration::from_secs(3600);

async fn harness() -> Harness {
    Harness::start_with(Options {
        ssh: true,
        ..Options::default()
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_runs_on_the_target_and_is_audited_with_its_exit_status() {
    let h = harness().await;
    let alice = ssh_user(&h, "alice", &["dev"]);
    h.grant("alice", "web-1", AccessLevel::Write, HOUR).await;
    let (ok, out, err) = ssh(
        &h,
        &alice,
        "web-1",
        &["echo", "hello from $(hostname -s 2>/dev/null || echo web)"],
    )
    .await;
    assert!(ok, "{err}");
    assert!(out.starts_with("hello from"), "{out}");
    // user@target works too; the exit status comes back and is audited.
    let (ok, out, _) = ssh(&h, &alice, "alice@web-1", &["sh", "-c", "'echo out; exit 3'"]).await;
    assert!(!ok);
    assert_eq!(out.trim(), "out");
    eventually("ssh.exec records", Duration::from_secs(10), || async {
        h.audit_events("ssh.exec").len() == 2
    })
    .await;
    let execs = h.audit_events("ssh.exec");
    assert_eq!(execs[1]["command"], "sh -c 'echo out; exit 3'");
    assert_eq!(execs[1]["exit_status"], 3);
    assert_eq!(execs[1]["user"], "alice");
    assert_eq!(execs[1]["target"], "web-1");
    assert!(execs[1]["bytes_out"].as_u64().unwrap() >= 4);
    assert_eq!(execs[0]["exit_status"], 0);
    let starts = h.audit_events("session.start");
    assert!(starts.iter().any(|s| s["target"] == "web-1"), "{starts:?}");
    eventually("session.end with bytes", Duration::from_secs(10), || async {
        h.audit_events("session.end")
            .iter()
            .any(|e| e["target"] == "web-1" && e["bytes_to_client"].as_u64().unwrap_or(0) >= 4)
    })
    .await;
    let (_, m) = h.metrics_get("/metrics").await;
    assert_eq!(metric(&m, "jitgate_ssh_channels_total{kind=\"exec\"}"), 2.0);
    assert_eq!(
        metric(&m, "jitgate_sessions_total{protocol=\"ssh\",target=\"web-1\"}"),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_interactive_shell_with_a_pty_works() {
    let h = harness().await;
    let alice = ssh_user(&h, "alice", &["dev"]);
    h.grant("alice", "web-1", AccessLevel::Write, HOUR).await;
    let mut child = jitgate_tests::ssh::ssh_command(&h, &alice, "web-1", &["-tt"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"echo $((6*7)) $TERM; tty; exit\n").await.unwrap();
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("the shell exits")
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("42"), "{text}");
    assert!(text.contains("/dev/pts/"), "a pty upstream: {text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_grant_the_user_is_told_how_to_ask() {
    let h = harness().await;
    let bob = ssh_user(&h, "bob", &["dev"]);
    let (ok, _, err) = ssh(&h, &bob, "web-1", &["true"]).await;
    assert!(!ok);
    assert!(err.contains("no active grant for bob on web-1"), "{err}");
    assert!(err.contains("jitgate request web-1"), "{err}");
    // Submitted to the audit writer as the refusal is sent: it may land just after ssh exits.
    jitgate_tests::eventually("the refusal audited", std::time::Duration::from_secs(10), || async {
        h.audit_events("session.denied")
            .iter()
            .any(|d| d["code"] == "no_grant" && d["target"] == "web-1")
    })
    .await;
    // A PostgreSQL target is not an SSH target.
    h.grant("bob", "prod-db", AccessLevel::Read, HOUR).await;
    let (ok, _, err) = ssh(&h, &bob, "prod-db", &["true"]).await;
    assert!(!ok);
    assert!(err.contains("not ssh"), "{err}");
    // Nor an SSH target a PostgreSQL one.
    h.grant("bob", "web-1", AccessLevel::Write, HOUR).await;
    let bob_pg = h.user("bob", &["dev"]);
    let out = h.psql(&bob_pg, "web-1", "SELECT 1").await;
    assert!(!out.success);
    assert!(out.stderr.contains("is an ssh target, not postgres"), "{}", out.stderr);
}

#[tokio::test(flavor = "multi_thread")]
async fn plain_keys_foreign_cas_expired_certificates_and_other_users_are_refused() {
    let h = harness().await;
    h.grant("alice", "web-1", AccessLevel::Write, HOUR).await;
    let alice = ssh_user(&h, "alice", &["dev"]);
    // The same key without its certificate.
    let plain = jitgate_tests::ssh::SshUser {
        cert: alice.key.with_extension("nonexistent"),
        ..alice.clone()
    };
    let (ok, _, err) = ssh(&h, &plain, "web-1", &["true"]).await;
    assert!(!ok);
    assert!(err.contains("Permission denied"), "{err}");
    // A certificate of another CA: a second data directory's.
    let other = tempfile::tempdir().unwrap();
    jitgate_tests::jitgate::cli::init_data_dir(other.path(), &[], HOUR).unwrap();
    let now = SystemTime::now();
    let files = jitgate_tests::jitgate::sshca::issue_user(
        other.path(),
        &jitgate_tests::jitgate::model::UserName::new("alice").unwrap(),
        &[],
        now - Duration::from_secs(60),
        now + HOUR,
        other.path(),
    )
    .unwrap()
    .unwrap();
    let foreign = jitgate_tests::ssh::SshUser {
        user: "alice".into(),
        key: files.key,
        cert: files.cert,
    };
    let (ok, _, err) = ssh(&h, &foreign, "web-1", &["true"]).await;
    assert!(!ok && err.contains("Permission denied"), "{err}");
    // An expired certificate from the right CA.
    let expired = ssh_user_between(&h, "alice", &[], now - HOUR, now - Duration::from_secs(60));
    let (ok, _, err) = ssh(&h, &expired, "web-1", &["true"]).await;
    assert!(!ok && err.contains("Permission denied"), "{err}");
    // A certificate signed by a certificate holder: alice's key as a CA, for bob.
    let chained_dir = tempfile::tempdir().unwrap();
    let bob_key = chained_dir.path().join("bob");
    let made = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&bob_key)
        .output()
        .unwrap();
    assert!(made.status.success());
    let signed = std::process::Command::new("ssh-keygen")
        .arg("-s")
        .arg(&alice.key)
        .args(["-I", "bob", "-n", "bob", "-V", "-1m:+1h"])
        .arg(bob_key.with_extension("pub"))
        .output()
        .unwrap();
    assert!(signed.status.success(), "{}", String::from_utf8_lossy(&signed.stderr));
    h.grant("bob", "web-1", AccessLevel::Write, HOUR).await;
    let chained = jitgate_tests::ssh::SshUser {
        user: "bob".into(),
        key: bob_key.clone(),
        cert: chained_dir.path().join("bob-cert.pub"),
    };
    let (ok, _, err) = ssh(&h, &chained, "web-1", &["true"]).await;
    assert!(
        !ok && err.contains("Permission denied"),
        "signed by alice's certificate key: {err}"
    );
    // Alice's certificate cannot log in as bob.
    let (ok, _, err) = ssh(&h, &alice, "bob@web-1", &["true"]).await;
    assert!(!ok && err.contains("Permission denied"), "{err}");
    // And the real one works.
    let (ok, _, err) = ssh(&h, &alice, "web-1", &["true"]).await;
    assert!(ok, "{err}");
    let (_, m) = h.metrics_get("/metrics").await;
    assert!(
        metric(&m, "jitgate_ssh_refusals_total{reason=\"plain_key\"}") >= 1.0,
        "{m}"
    );
    assert!(
        metric(&m, "jitgate_ssh_refusals_total{reason=\"unknown_ca\"}") >= 1.0,
        "{m}"
    );
    assert!(
        metric(&m, "jitgate_ssh_refusals_total{reason=\"login_user\"}") >= 1.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_notice_reaches_the_terminal_and_an_extension_keeps_the_command_going() {
    let h = Harness::start_with(Options {
        ssh: true,
        limits: "\n[sessions]\nexpiry_notice = \"3s\"",
        ..Options::default()
    })
    .await;
    let alice = ssh_user(&h, "alice", &["dev"]);
    let grant = h
        .grant("alice", "web-1", AccessLevel::Write, Duration::from_secs(6))
        .await;
    let started = Instant::now();
    let child = spawn_ssh(&h, &alice, "web-1", &["sh", "-c", "'sleep 9; echo survived'"]);
    tokio::time::sleep(Duration::from_secs(4)).await;
    h.admin()
        .extend_grant(grant.id.as_str(), Duration::from_secs(10))
        .await
        .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(40), child.wait_with_output())
        .await
        .expect("the command finishes")
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout.trim(), "survived");
    assert!(stderr.contains("jitgate: access to web-1 ends in"), "{stderr}");
    assert!(stderr.contains(&format!("jitgate extend {}", grant.id)), "{stderr}");
    assert!(started.elapsed() >= Duration::from_secs(9));
}

#[tokio::test(flavor = "multi_thread")]
async fn revoke_and_kill_cut_ssh_sessions_with_their_reasons() {
    let h = harness().await;
    let alice = ssh_user(&h, "alice", &["dev"]);
    let bob = ssh_user(&h, "bob", &["dev"]);
    let g = h.grant("alice", "web-1", AccessLevel::Write, HOUR).await;
    h.grant("bob", "web-1", AccessLevel::Write, HOUR).await;
    let revoked = spawn_ssh(&h, &alice, "web-1", &["sleep", "300"]);
    let killed = spawn_ssh(&h, &bob, "web-1", &["sleep", "300"]);
    eventually("two sleeps running on the host", Duration::from_secs(20), || async {
        let ps = std::process::Command::new("pgrep")
            .args(["-f", "^sleep 300$"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&ps.stdout).lines().count() == 2
    })
    .await;
    h.admin().revoke_grant(g.id.as_str()).await.unwrap();
    let bobs = h
        .admin()
        .list_sessions()
        .await
        .unwrap()
        .into_iter()
        .find(|s| s.user.as_str() == "bob")
        .unwrap();
    h.admin().kill_session(bobs.id.as_str()).await.unwrap();
    let (r, k) = tokio::join!(revoked.wait_with_output(), killed.wait_with_output());
    let r = String::from_utf8_lossy(&r.unwrap().stderr).into_owned();
    let k = String::from_utf8_lossy(&k.unwrap().stderr).into_owned();
    assert!(r.contains(&format!("grant {} was revoked", g.id)), "{r}");
    assert!(k.contains("was terminated by an administrator"), "{k}");
    eventually("the sleeps are gone", Duration::from_secs(20), || async {
        let ps = std::process::Command::new("pgrep")
            .args(["-f", "^sleep 300$"])
            .output()
            .unwrap();
        ps.stdout.is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_running_command_is_cut_at_expiry_with_a_line_on_the_terminal() {
    let h = harness().await;
    let alice = ssh_user(&h, "alice", &["dev"]);
    let grant = h
        .grant("alice", "web-1", AccessLevel::Write, Duration::from_secs(4))
        .await;
    let started = Instant::now();
    let child = spawn_ssh(&h, &alice, "web-1", &["sleep", "600"]);
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("cut at expiry")
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!("jitgate: access to web-1 ended: grant {} expired", grant.id)),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    eventually("the upstream sleep is gone", Duration::from_secs(20), || async {
        let ps = std::process::Command::new("pgrep")
            .args(["-f", "^sleep 600$"])
            .output()
            .unwrap();
        ps.stdout.is_empty()
    })
    .await;
    let execs = h.audit_events("ssh.exec");
    assert_eq!(execs[0]["cut"], true, "{execs:?}");
    let ends = h.audit_events("session.end");
    assert!(ends.iter().any(|e| e["reason"] == "grant_expired"), "{ends:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_target_whose_host_key_does_not_match_is_refused_naming_both_fingerprints() {
    let h = harness().await;
    let alice = ssh_user(&h, "alice", &["dev"]);
    h.grant("alice", "web-bad", AccessLevel::Write, HOUR).await;
    let (ok, _, err) = ssh(&h, &alice, "web-bad", &["true"]).await;
    assert!(!ok);
    assert!(err.contains("the host key of web-bad does not match"), "{err}");
    let presented = String::from_utf8(
        std::process::Command::new("ssh-keygen")
            .arg("-lf")
            .arg(h.sshd.as_ref().unwrap().dir.path().join("host_key.pub"))
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let presented = presented.split_whitespace().nth(1).unwrap().to_owned();
    assert!(err.contains(&presented), "names the presented key {presented}: {err}");
    let denied = h.audit_events("session.denied");
    let mismatch = denied
        .iter()
        .find(|d| d["code"] == "host_key_mismatch")
        .expect("audited");
    assert!(mismatch["reason"].as_str().unwrap().contains(&presented), "{mismatch}");
}
