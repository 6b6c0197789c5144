//! SSH through the proxy, the rest of issue 13, with the real OpenSSH `ssh`, `scp` and `sftp`
//! and a real `sshd`: shell recordings played with the real `asciinema` and checked by
//! `audit verify`; scp and sftp file operations audited; `-L` forwards refused or allowed per
//! target; a key offered but never signed; `jitgate ssh` and `jitgate ssh-config`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use jitgate_tests::jitgate::model::AccessLevel;
use jitgate_tests::ssh::{file_command, run, ssh, ssh_command, ssh_user};
use jitgate_tests::{eventually, metric, run_jitgate, Harness, Options};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const HOUR: Duration = Duration::from_secs(3600);

async fn harness() -> Harness {
    Harness::start_with(Options {
        ssh: true,
        ..Options::default()
    })
    .await
}

/// A directory the upstream user (not root) can write, removed at the end.
fn shared_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt as _;
    let d = tempfile::Builder::new().prefix("jitgate-sftp-").tempdir().unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    d
}

fn config_arg(h: &Harness) -> String {
    h.config_path().display().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shell_is_recorded_played_by_asciinema_and_an_edit_fails_audit_verify() {
    let h = harness().await;
    let alice = ssh_user(&h, "alice", &["dev"]);
    h.grant("alice", "web-1", AccessLevel::Write, HOUR).await;
    let mut child = ssh_command(&h, &alice, "web-1", &["-tt"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    // The typed line does not show the answer; only the shell's output does.
    stdin
        .write_all(b"echo recorded-$((6*7)); echo secret-typed >/dev/null; exit\n")
        .await
        .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("the shell exits")
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("recorded-42"));
    eventually("session.end naming the recording", Duration::from_secs(10), || async {
        h.audit_events("session.end")
            .iter()
            .any(|e| e["target"] == "web-1" && e["recordings"].is_array())
    })
    .await;
    let end = h
        .audit_events("session.end")
        .into_iter()
        .find(|e| e["recordings"].is_array())
        .unwrap();
    let rec = &end["recordings"][0];
    let file = std::path::PathBuf::from(rec["file"].as_str().unwrap());
    assert!(file.starts_with(h.data_dir().join("recordings")), "{file:?}");
    let bytes = std::fs::read(&file).unwrap();
    assert_eq!(rec["bytes"], bytes.len() as u64);
    assert_eq!(rec["sha256"].as_str().unwrap().len(), 64);
    let text = String::from_utf8_lossy(&bytes);
    let header: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(header["version"], 2);
    assert!(header["title"].as_str().unwrap().contains("alice@web-1"), "{header}");
    // Input is not recorded by default ([ssh] record_input = false).
    assert!(!text.lines().skip(1).any(|l| l.contains("\"i\"")), "{text}");
    // The real asciinema plays it.
    let played = std::process::Command::new("asciinema")
        .arg("cat")
        .arg(&file)
        .output()
        .expect("asciinema (scripts/test installs it from PyPI)");
    assert!(played.status.success(), "{}", String::from_utf8_lossy(&played.stderr));
    assert!(String::from_utf8_lossy(&played.stdout).contains("recorded-42"));
    // Listed, shown, exported; the chain and the recording verify.
    let list = run_jitgate(&["recording", "list", "--config", &config_arg(&h)], &[]).await;
    assert!(list.ok, "{}", list.stderr);
    let id = file.file_stem().unwrap().to_string_lossy().into_owned();
    assert!(
        list.stdout.contains(&id) && list.stdout.contains("intact"),
        "{}",
        list.stdout
    );
    let show = run_jitgate(&["recording", "show", &id, "--config", &config_arg(&h)], &[]).await;
    assert!(
        show.ok && show.stdout.contains("alice") && show.stdout.contains("state:    intact"),
        "{show:?}"
    );
    let export = run_jitgate(
        &["recording", "export", &id, "--text", "--config", &config_arg(&h)],
        &[],
    )
    .await;
    assert!(export.ok && export.stdout.contains("recorded-42"), "{export:?}");
    let verify = run_jitgate(&["audit", "verify", "--config", &config_arg(&h)], &[]).await;
    assert!(verify.ok, "{verify:?}");
    assert!(verify.stdout.contains("recordings: 1 checked"), "{}", verify.stdout);
    // Edit one character of the output: the chain still verifies, the recording does not.
    let edited = text.replacen("recorded-42", "recorded-43", 1);
    assert_ne!(edited, text);
    std::fs::write(&file, edited).unwrap();
    let verify = run_jitgate(&["audit", "verify", "--config", &config_arg(&h)], &[]).await;
    assert!(!verify.ok);
    assert!(
        verify.stderr.contains("edited") && verify.stderr.contains(&id),
        "{}",
        verify.stderr
    );
    let export = run_jitgate(&["recording", "export", &id, "--config", &config_arg(&h)], &[]).await;
    assert!(!export.ok && export.stderr.contains("not exported"), "{export:?}");
    std::fs::remove_file(&file).unwrap();
    let verify = run_jitgate(&["audit", "verify", "--config", &config_arg(&h)], &[]).await;
    assert!(!verify.ok && verify.stderr.contains("missing"), "{}", verify.stderr);
    let skip = run_jitgate(
        &["audit", "verify", "--skip-recordings", "--config", &config_arg(&h)],
        &[],
    )
    .await;
    assert!(skip.ok, "{skip:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn scp_and_sftp_work_and_every_file_operation_is_audited() {
    let h = harness().await;
    let alice = ssh_user(&h, "alice", &["dev"]);
    h.grant("alice", "web-1", AccessLevel::Write, HOUR).await;
    let remote = shared_dir();
    let local = tempfile::tempdir().unwrap();
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i * 31 % 251) as u8).collect();
    std::fs::write(local.path().join("up.bin"), &payload).unwrap();
    let r = |name: &str| remote.path().join(name).display().to_string();
    // scp upload and download (OpenSSH 9 scp speaks SFTP).
    let up = local.path().join("up.bin").display().to_string();
    let (ok, _, err) = run(file_command(
        "scp",
        &h,
        &alice,
        "web-1",
        &[&up, &format!("127.0.0.1:{}", r("up.bin"))],
    ))
    .await;
    assert!(ok, "scp upload: {err}");
    assert_eq!(std::fs::read(remote.path().join("up.bin")).unwrap(), payload);
    let down = local.path().join("down.bin").display().to_string();
    let (ok, _, err) = run(file_command(
        "scp",
        &h,
        &alice,
        "web-1",
        &[&format!("127.0.0.1:{}", r("up.bin")), &down],
    ))
    .await;
    assert!(ok, "scp download: {err}");
    assert_eq!(std::fs::read(&down).unwrap(), payload);
    // sftp: mkdir, rename, remove, rmdir, from a batch file.
    let batch = local.path().join("batch");
    std::fs::write(
        &batch,
        format!(
            "mkdir {d}\nrename {a} {b}\nrm {b}\nrmdir {d}\n-rm {gone}\n",
            d = r("dir"),
            a = r("up.bin"),
            b = r("moved.bin"),
            gone = r("never-there")
        ),
    )
    .unwrap();
    let (ok, _, err) = run(file_command(
        "sftp",
        &h,
        &alice,
        "web-1",
        &["-b", &batch.display().to_string(), "127.0.0.1"],
    ))
    .await;
    assert!(ok, "sftp: {err}");
    assert!(!remote.path().join("moved.bin").exists());
    eventually("sftp records", Duration::from_secs(10), || async {
        h.audit_events("ssh.sftp").iter().any(|e| e["op"] == "rmdir")
            && h.audit_events("ssh.sftp")
                .iter()
                .filter(|e| e["op"] == "remove")
                .count()
                == 2
    })
    .await;
    let ops = h.audit_events("ssh.sftp");
    let find = |op: &str, path: &str| {
        ops.iter()
            .find(|e| e["op"] == op && e["path"] == path)
            .unwrap_or_else(|| panic!("no {op} {path} in {ops:#?}"))
            .clone()
    };
    let opened = find("open", &r("up.bin"));
    assert!(opened["mode"].as_str().unwrap().starts_with("write"), "{opened}");
    assert_eq!(opened["user"], "alice");
    let closes: Vec<_> = ops
        .iter()
        .filter(|e| e["op"] == "close" && e["path"] == r("up.bin"))
        .collect();
    assert_eq!(closes.len(), 2, "{ops:#?}");
    assert_eq!(
        closes[0]["bytes_written"],
        payload.len() as u64,
        "upload: {}",
        closes[0]
    );
    assert_eq!(closes[1]["bytes_read"], payload.len() as u64, "download: {}", closes[1]);
    assert!(ops
        .iter()
        .any(|e| e["op"] == "open" && e["mode"] == "read" && e["path"] == r("up.bin")));
    assert_eq!(find("mkdir", &r("dir"))["status"], "ok");
    let renamed = find("rename", &r("up.bin"));
    assert_eq!(
        (renamed["to"].as_str(), renamed["status"].as_str()),
        (Some(r("moved.bin").as_str()), Some("ok"))
    );
    assert_eq!(find("remove", &r("moved.bin"))["status"], "ok");
    assert_eq!(find("rmdir", &r("dir"))["status"], "ok");
    assert_eq!(find("remove", &r("never-there"))["status"], "no_such_file");
    let (_, m) = h.metrics_get("/metrics").await;
    assert_eq!(metric(&m, "jitgate_ssh_channels_total{kind=\"sftp\"}"), 3.0);
}

/// Echoes what it reads, on a free loopback port; returns the port.
async fn echo_server() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    port
}

/// Runs `ssh -N -L`, sends a line through the forward and kills ssh with the forward open:
/// what came back (empty when the proxy refused the forward and the client closed the
/// connection). The local end is a Unix
/// socket in a directory of the test's own, so no other process can be listening there.
async fn through_forward(h: &Harness, user: &jitgate_tests::ssh::SshUser, target: &str, to: u16) -> String {
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("fwd.sock");
    let spec = format!("{}:127.0.0.1:{to}", local.display());
    let mut ssh = ssh_command(h, user, target, &["-N", "-o", "ExitOnForwardFailure=yes", "-L", &spec])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut conn = None;
    for _ in 0..200 {
        if let Ok(c) = tokio::net::UnixStream::connect(&local).await {
            conn = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut conn = conn.expect("ssh -L listens");
    // A refused forward may close the socket before the write: nothing came through.
    if conn.write_all(b"ping through the forward\n").await.is_err() {
        return String::new();
    }
    let mut got = vec![0u8; 64];
    let answer = match tokio::time::timeout(Duration::from_secs(20), conn.read(&mut got)).await {
        Ok(Ok(n)) => String::from_utf8_lossy(&got[..n]).into_owned(),
        _ => String::new(),
    };
    // The client dies with the forward still open (no EOF, no close): the proxy must still
    // end the forward, audit it and end the session.
    let _ = ssh.kill().await;
    drop(conn);
    answer
}

#[tokio::test(flavor = "multi_thread")]
async fn local_forwards_are_refused_unless_the_target_allows_them_and_both_are_audited() {
    let h = harness().await;
    let alice = ssh_user(&h, "alice", &["dev"]);
    h.grant("alice", "web-1", AccessLevel::Write, HOUR).await;
    h.grant("alice", "web-fwd", AccessLevel::Write, HOUR).await;
    let port = echo_server().await;
    assert_eq!(
        through_forward(&h, &alice, "web-1", port).await,
        "",
        "web-1 does not allow forwarding"
    );
    assert_eq!(
        through_forward(&h, &alice, "web-fwd", port).await,
        "ping through the forward\n"
    );
    let waited = Instant::now();
    while h.audit_events("ssh.forward").len() < 2 {
        assert!(
            waited.elapsed() < Duration::from_secs(15),
            "ssh.forward records: {:#?}\nsessions: {:#?}",
            h.audit_events("ssh.forward"),
            h.audit()
                .into_iter()
                .filter(|e| e["event"].as_str().is_some_and(|k| k.starts_with("session")))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let fw = h.audit_events("ssh.forward");
    let refused = fw.iter().find(|e| e["target"] == "web-1").unwrap();
    assert_eq!(refused["allowed"], false);
    assert_eq!(refused["port"], port);
    assert!(
        refused["refused"].as_str().unwrap().contains("allow_port_forwarding"),
        "{refused}"
    );
    let allowed = fw.iter().find(|e| e["target"] == "web-fwd").unwrap();
    assert_eq!(
        (allowed["allowed"].as_bool(), allowed["host"].as_str()),
        (Some(true), Some("127.0.0.1"))
    );
    assert_eq!(allowed["bytes_in"], 25);
    assert_eq!(allowed["bytes_out"], 25);
    // The killed client's session ended with it.
    eventually("the forwarding session ended", Duration::from_secs(10), || async {
        h.audit_events("session.end")
            .iter()
            .any(|e| e["target"] == "web-fwd" && e["reason"] == "client_closed")
    })
    .await;
    // Remote forwarding is refused outright: ssh -R with ExitOnForwardFailure exits.
    let (ok, _, err) = ssh(
        &h,
        &alice,
        "web-fwd",
        &[
            "-o",
            "ExitOnForwardFailure=yes",
            "-R",
            "127.0.0.1:0:127.0.0.1:22",
            "true",
        ],
    )
    .await;
    assert!(!ok, "{err}");
    assert!(err.contains("remote port forwarding failed"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_offered_without_a_signature_never_authenticates() {
    let h = harness().await;
    let alice = ssh_user(&h, "alice", &["dev"]);
    h.grant("alice", "web-1", AccessLevel::Write, HOUR).await;
    // The certificate and public key, but not the private key: ssh offers the certificate
    // (the server says it would accept it) and then has nothing to sign with.
    let dir = tempfile::tempdir().unwrap();
    let only_public = dir.path().join("alice");
    std::fs::copy(format!("{}.pub", alice.key.display()), dir.path().join("alice.pub")).unwrap();
    std::fs::copy(&alice.cert, dir.path().join("alice-cert.pub")).unwrap();
    let offered = jitgate_tests::ssh::SshUser {
        user: "alice".into(),
        key: only_public,
        cert: dir.path().join("alice-cert.pub"),
    };
    let (ok, out, err) = ssh(&h, &offered, "web-1", &["-v", "echo", "should-not-run"]).await;
    assert!(!ok);
    assert!(!out.contains("should-not-run"));
    assert!(err.contains("Server accepts key"), "the offer was answered: {err}");
    assert!(err.contains("Permission denied"), "{err}");
    assert!(
        !h.audit_events("session.start").iter().any(|e| e["target"] == "web-1"),
        "no session without a signature"
    );
    // The same user with the private key gets in: the refusal was the missing signature.
    let (ok, out, err) = ssh(&h, &alice, "web-1", &["echo", "signed"]).await;
    assert!(ok && out.contains("signed"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn jitgate_ssh_and_ssh_config_use_the_files_cert_issue_wrote() {
    let h = harness().await;
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().display().to_string();
    let issued = run_jitgate(
        &[
            "cert",
            "issue",
            "--data-dir",
            &h.data_dir().display().to_string(),
            "--user",
            "carol",
            "--roles",
            "dev",
            "--out",
            &dir,
        ],
        &[],
    )
    .await;
    assert!(issued.ok, "{issued:?}");
    assert!(issued.stdout.contains("jitgate_known_hosts"), "{}", issued.stdout);
    h.grant("carol", "web-1", AccessLevel::Write, HOUR).await;
    let proxy = h.addrs().ssh.unwrap().to_string();
    let identity = out.path().join("carol").display().to_string();
    let env = [("JITGATE_SSH", proxy.as_str()), ("JITGATE_SSH_KEY", identity.as_str())];
    let ran = run_jitgate(&["ssh", "web-1", "--", "echo", "via-jitgate-ssh"], &env).await;
    assert!(ran.ok, "{ran:?}");
    assert!(ran.stdout.contains("via-jitgate-ssh"), "{ran:?}");
    // The certificate's X.509 twin names the identity too (JITGATE_CERT without .crt).
    let cert = out.path().join("carol.crt").display().to_string();
    let printed = run_jitgate(
        &["ssh", "web-1", "--print"],
        &[("JITGATE_SSH", proxy.as_str()), ("JITGATE_CERT", &cert)],
    )
    .await;
    assert!(
        printed.ok && printed.stdout.contains("HostKeyAlias=jitgate"),
        "{printed:?}"
    );
    // ssh-config: plain ssh and scp with the printed block.
    let config = run_jitgate(&["ssh-config", "web-1"], &env).await;
    assert!(config.ok, "{config:?}");
    assert!(config.stdout.contains("Host web-1\n"), "{}", config.stdout);
    let file = out.path().join("ssh_config");
    std::fs::write(&file, &config.stdout).unwrap();
    let f = file.display().to_string();
    let (ok, so, se) = run({
        let mut c = tokio::process::Command::new("ssh");
        c.args(["-F", &f, "-o", "BatchMode=yes", "web-1", "echo", "via-ssh-config"]);
        c
    })
    .await;
    assert!(ok && so.contains("via-ssh-config"), "{se}");
    let remote = shared_dir();
    std::fs::write(out.path().join("f.txt"), b"hello scp\n").unwrap();
    let dest = format!("web-1:{}/f.txt", remote.path().display());
    let (ok, _, se) = run({
        let mut c = tokio::process::Command::new("scp");
        c.args([
            "-F",
            &f,
            "-o",
            "BatchMode=yes",
            &out.path().join("f.txt").display().to_string(),
            &dest,
        ]);
        c
    })
    .await;
    assert!(ok, "{se}");
    assert_eq!(std::fs::read(remote.path().join("f.txt")).unwrap(), b"hello scp\n");
    // Without a key the command says what is missing.
    let none = run_jitgate(&["ssh", "web-1"], &[("JITGATE_SSH", proxy.as_str())]).await;
    assert!(!none.ok && none.stderr.contains("--identity"), "{none:?}");
}

/// A tmux server of the test's own (its own socket), killed when dropped.
struct Tmux(String);

impl Tmux {
    fn run(&self, args: &[&str]) -> String {
        let out = std::process::Command::new("tmux")
            .args(["-L", &self.0, "-f", "/dev/null"])
            .args(args)
            .env("TERM", "xterm")
            .output()
            .expect("tmux (scripts/test installs it)");
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    async fn screen_shows(&self, what: &str) {
        eventually(what, Duration::from_secs(20), || async {
            self.run(&["capture-pane", "-p", "-t", "t"]).contains(what)
        })
        .await;
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = std::process::Command::new("tmux")
            .args(["-L", &self.0, "kill-server"])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_terminal_resized_mid_session_resizes_the_shell_and_the_recording() {
    let h = harness().await;
    let alice = ssh_user(&h, "alice", &["dev"]);
    h.grant("alice", "web-1", AccessLevel::Write, HOUR).await;
    let port = h.addrs().ssh.unwrap().port().to_string();
    let mut argv = vec!["ssh".to_owned(), "-p".into(), port];
    argv.extend(jitgate_tests::ssh::client_options(&h, &alice, "web-1"));
    argv.push("127.0.0.1".into());
    let tmux = Tmux(format!("jitgate-{}", std::process::id()));
    tmux.run(&["new-session", "-d", "-s", "t", "-x", "80", "-y", "24", &argv.join(" ")]);
    tmux.run(&["send-keys", "-t", "t", "stty size", "Enter"]);
    tmux.screen_shows("24 80").await;
    tmux.run(&["resize-window", "-t", "t", "-x", "100", "-y", "30"]);
    tmux.run(&["send-keys", "-t", "t", "clear; stty size", "Enter"]);
    tmux.screen_shows("30 100").await;
    tmux.run(&["send-keys", "-t", "t", "exit", "Enter"]);
    eventually("session.end naming the recording", Duration::from_secs(20), || async {
        h.audit_events("session.end").iter().any(|e| e["recordings"].is_array())
    })
    .await;
    let end = h
        .audit_events("session.end")
        .into_iter()
        .find(|e| e["recordings"].is_array())
        .unwrap();
    let text = std::fs::read_to_string(end["recordings"][0]["file"].as_str().unwrap()).unwrap();
    let header: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(
        (header["width"].as_u64(), header["height"].as_u64()),
        (Some(80), Some(24))
    );
    assert!(text.contains(r#""r", "100x30"]"#), "{text}");
    assert!(text.contains("30 100"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_sftp_stream_that_cannot_be_audited_ends_the_channel_with_a_reason() {
    let h = harness().await;
    let alice = ssh_user(&h, "alice", &["dev"]);
    h.grant("alice", "web-1", AccessLevel::Write, HOUR).await;
    // Raw bytes on the sftp subsystem (ssh -s): an INIT, then a packet claiming 4 GiB.
    let mut child = ssh_command(&h, &alice, "web-1", &["-s", "sftp"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&[0, 0, 0, 5, 1, 0, 0, 0, 3]).await.unwrap();
    stdin.write_all(&[0xff, 0xff, 0xff, 0xff, 3, 0, 0, 0, 1]).await.unwrap();
    stdin.flush().await.unwrap();
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("the channel ends, no hang")
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("SFTP stream cannot be audited"), "{err}");
    assert!(err.contains("longer than"), "{err}");
    assert!(!out.status.success());
    // The proxy is fine: the next session works.
    let (ok, o, e) = ssh(&h, &alice, "web-1", &["echo", "still-up"]).await;
    assert!(ok && o.contains("still-up"), "{e}");
}
