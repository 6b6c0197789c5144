//! The `jitgate` binary as users run it: init, cert issue, config check, grant and session
//! commands with `--json`, the admin-only API, and the demo.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use jitgate_tests::jitgate::client::{ApiClient, ClientError};
use jitgate_tests::jitgate::model::AccessLevel;
use jitgate_tests::jitgate::pki::identity_from_der;
use jitgate_tests::{client_command, eventually, jitgate_bin, run_jitgate, CliRun, Harness};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

async fn jitgate(args: &[&str], env: &[(&str, &str)]) -> CliRun {
    run_jitgate(args, env).await
}

fn identity_of(path: &Path) -> jitgate_tests::jitgate::pki::Identity {
    let pem = std::fs::read(path).unwrap();
    let der = rustls_pemfile_first(&pem);
    identity_from_der(&der).unwrap()
}

fn rustls_pemfile_first(pem: &[u8]) -> Vec<u8> {
    let path = std::env::temp_dir().join(format!("jitgate-cli-test-{}.pem", std::process::id()));
    std::fs::write(&path, pem).unwrap();
    let certs = jitgate_tests::jitgate::tls::load_certs(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    certs[0].as_ref().to_vec()
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_init_issue_and_config_check() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let d = dir.to_str().unwrap();
    let r = jitgate(
        &[
            "init",
            "--data-dir",
            d,
            "--server-name",
            "proxy.example",
            "--server-name",
            "10.1.2.3",
        ],
        &[],
    )
    .await;
    assert!(r.ok, "{}", r.stderr);
    let init_out = r.stdout.clone();
    for f in [
        "ca.crt",
        "ca.key",
        "server.crt",
        "server.key",
        "admin.crt",
        "admin.key",
        "jitgate.toml",
    ] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(dir.join("ca.key")).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let admin = identity_of(&dir.join("admin.crt"));
    assert_eq!(admin.user.as_str(), "admin");
    assert!(admin.has_role("admin"));
    // A second init must not replace the CA.
    let r = jitgate(&["init", "--data-dir", d], &[]).await;
    assert!(!r.ok && r.stderr.contains("refusing to overwrite"), "{}", r.stderr);

    let out = tmp.path().join("carol");
    let r = jitgate(
        &[
            "cert",
            "issue",
            "--data-dir",
            d,
            "--user",
            "carol",
            "--roles",
            "dev,oncall",
            "--ttl",
            "8h",
            "--out",
            out.to_str().unwrap(),
        ],
        &[],
    )
    .await;
    assert!(r.ok, "{}", r.stderr);
    let carol = identity_of(&out.join("carol.crt"));
    assert_eq!(carol.user.as_str(), "carol");
    let roles: Vec<&str> = carol.roles.iter().map(|r| r.as_str()).collect();
    assert_eq!(roles, ["dev", "oncall"]);
    let left = carol.not_after.duration_since(std::time::SystemTime::now()).unwrap();
    assert!(left > Duration::from_secs(7 * 3600) && left <= Duration::from_secs(8 * 3600));
    assert!(out.join("carol.key").is_file() && out.join("ca.crt").is_file());

    // The SSH side, read back by OpenSSH's own ssh-keygen: a user certificate for carol from
    // the SSH user CA, with her roles, valid as long as the X.509 one; the proxy's host
    // certificate from the SSH host CA, for the server names; init printed the known_hosts line.
    let keygen = |args: &[&str]| {
        let o = std::process::Command::new("ssh-keygen").args(args).output().unwrap();
        assert!(
            o.status.success(),
            "ssh-keygen {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let fingerprint = |pubkey: &std::path::Path| {
        keygen(&["-l", "-f", pubkey.to_str().unwrap()])
            .split_whitespace()
            .nth(1)
            .unwrap()
            .to_owned()
    };
    let user_cert = keygen(&["-L", "-f", out.join("carol-cert.pub").to_str().unwrap()]);
    assert!(
        user_cert.contains("Type: ssh-ed25519-cert-v01@openssh.com user certificate"),
        "{user_cert}"
    );
    assert!(user_cert.contains("Key ID: \"carol\""), "{user_cert}");
    assert!(
        user_cert.contains(&format!(
            "Signing CA: ED25519 {}",
            fingerprint(&dir.join("ssh_user_ca.pub"))
        )),
        "{user_cert}"
    );
    // The roles extension's data is an SSH string, "dev,oncall" (ssh-keygen shows it as hex).
    assert!(
        user_cert.contains("roles@jitgate UNKNOWN OPTION: 0000000a6465762c6f6e63616c6c"),
        "{user_cert}"
    );
    let principals = user_cert
        .split("Principals:")
        .nth(1)
        .unwrap()
        .split("Critical")
        .next()
        .unwrap();
    assert_eq!(
        principals.split_whitespace().collect::<Vec<_>>(),
        ["carol"],
        "{user_cert}"
    );
    assert_eq!(
        fingerprint(&out.join("carol.pub")),
        fingerprint(&out.join("carol-cert.pub"))
    );
    assert_eq!(
        std::fs::metadata(out.join("carol")).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let host_cert = keygen(&["-L", "-f", dir.join("ssh_host_ed25519_key-cert.pub").to_str().unwrap()]);
    assert!(host_cert.contains("host certificate"), "{host_cert}");
    assert!(
        host_cert.contains(&format!(
            "Signing CA: ED25519 {}",
            fingerprint(&dir.join("ssh_host_ca.pub"))
        )),
        "{host_cert}"
    );
    for name in ["proxy.example", "10.1.2.3", "localhost", "127.0.0.1"] {
        assert!(host_cert.contains(name), "{name}: {host_cert}");
    }
    let host_ca = std::fs::read_to_string(dir.join("ssh_host_ca.pub")).unwrap();
    assert!(
        init_out.contains(&format!("@cert-authority proxy.example,[proxy.example]:*,10.1.2.3,[10.1.2.3]:*,localhost,[localhost]:*,127.0.0.1,[127.0.0.1]:* {}", host_ca.trim())),
        "{init_out}"
    );

    // The generated config is valid as written.
    let config = dir.join("jitgate.toml");
    let r = jitgate(&["config", "check", config.to_str().unwrap()], &[]).await;
    assert!(r.ok, "{}{}", r.stdout, r.stderr);
    // The documented example is valid as written, once its files and secrets exist.
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/jitgate.toml");
    let etc = tmp.path().join("etc");
    std::fs::create_dir_all(etc.join("secrets")).unwrap();
    let text = std::fs::read_to_string(&example)
        .unwrap()
        .replace("/var/lib/jitgate", d)
        .replace("/etc/jitgate", etc.to_str().unwrap());
    let mut env = vec![];
    for line in text.lines().map(str::trim) {
        if let Some(var) = line.strip_prefix("password_env = \"").and_then(|v| v.strip_suffix('"')) {
            env.push((var.to_owned(), "secret".to_owned()));
        }
        if let Some(file) = line
            .strip_prefix("password_file = \"")
            .and_then(|v| v.strip_suffix('"'))
        {
            std::fs::write(file, "secret\n").unwrap();
        }
        if let Some(file) = line.strip_prefix("key_file = \"").and_then(|v| v.strip_suffix('"')) {
            let key = std::process::Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f", file])
                .status()
                .unwrap();
            assert!(key.success());
        }
        if let Some(file) = line.strip_prefix("ca_file = \"").and_then(|v| v.strip_suffix('"')) {
            std::fs::copy(dir.join("ca.crt"), file).unwrap();
        }
    }
    let example_copy = tmp.path().join("example.toml");
    std::fs::write(&example_copy, text).unwrap();
    let env: Vec<(&str, &str)> = env.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    let r = jitgate(&["config", "check", example_copy.to_str().unwrap()], &env).await;
    assert!(r.ok, "deploy/examples/jitgate.toml: {}", r.stderr);
    assert!(r.stdout.contains("ok (4 targets)"), "{}", r.stdout);
    // Without its secret the same file is refused, naming the key.
    let r = jitgate(&["config", "check", example_copy.to_str().unwrap()], &[]).await;
    assert!(!r.ok && r.stderr.contains("password_env"), "{}", r.stderr);
    // Unknown keys and bad values are named.
    let bad = tmp.path().join("bad.toml");
    std::fs::write(
        &bad,
        format!("data_dir = \"{d}\"\n[listen]\npostgres = \"127.0.0.1:5433\"\npostgress = \"x\"\n"),
    )
    .unwrap();
    let r = jitgate(&["config", "check", bad.to_str().unwrap()], &[]).await;
    assert!(!r.ok);
    assert!(r.stderr.contains("postgress"), "{}", r.stderr);
    std::fs::write(
        &bad,
        format!("data_dir = \"{d}\"\n[limits]\nhandshake_timeout = \"soon\"\n"),
    )
    .unwrap();
    let r = jitgate(&["config", "check", bad.to_str().unwrap()], &[]).await;
    assert!(!r.ok && r.stderr.contains("limits.handshake_timeout"), "{}", r.stderr);
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_grant_and_session_commands_with_json() {
    let h = Harness::start().await;
    let d = h.data_dir();
    let api = h.addrs().api.to_string();
    let (cert, key, ca) = (d.join("admin.crt"), d.join("admin.key"), d.join("ca.crt"));
    let env = [
        ("JITGATE_API", api.as_str()),
        ("JITGATE_CERT", cert.to_str().unwrap()),
        ("JITGATE_KEY", key.to_str().unwrap()),
        ("JITGATE_CA", ca.to_str().unwrap()),
    ];
    let create = [
        "grant", "create", "--user", "alice", "--target", "prod-db", "--access", "read", "--for", "30m", "--reason",
        "INC-4411",
    ];
    let r = jitgate(&create, &env).await;
    assert!(r.ok, "{}", r.stderr);
    let id = r.stdout.trim().to_owned();
    assert!(id.starts_with("g-"), "{id}");

    let mut json_create = create.to_vec();
    json_create.push("--json");
    let r = jitgate(&json_create, &env).await;
    let g: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert!(g["id"].as_str().unwrap().starts_with("g-"));
    assert_eq!(g["reason"], "INC-4411");
    assert_eq!(g["access"], "read");

    let r = jitgate(&["grant", "list", "--json"], &env).await;
    let list: Vec<serde_json::Value> = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(list.len(), 2);
    assert!(list.iter().any(|g| g["id"] == id.as_str()));
    let r = jitgate(&["grant", "list"], &env).await;
    assert!(r.stdout.contains(&id) && r.stdout.contains("INC-4411"), "{}", r.stdout);

    // The data-dir profile finds the same API through jitgate.toml... once it names the port.
    let r = jitgate(
        &[
            "grant",
            "list",
            "--json",
            "--api",
            &api,
            "--data-dir",
            d.to_str().unwrap(),
        ],
        &[],
    )
    .await;
    assert!(r.ok, "{}", r.stderr);

    let alice = h.user("alice", &["dev"]);
    let mut idle = h.psql_interactive(&alice, "prod-db");
    eventually("session listed", Duration::from_secs(20), || async {
        let r = jitgate(&["session", "list", "--json"], &env).await;
        serde_json::from_str::<Vec<serde_json::Value>>(&r.stdout)
            .map(|v| v.len() == 1)
            .unwrap_or(false)
    })
    .await;
    let r = jitgate(&["session", "list", "--json"], &env).await;
    let sessions: Vec<serde_json::Value> = serde_json::from_str(&r.stdout).unwrap();
    let sid = sessions[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(sessions[0]["user"], "alice");
    let r = jitgate(&["session", "kill", &sid, "--json"], &env).await;
    let killed: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(killed["id"], sid.as_str());
    assert_eq!(killed["killed"], true);
    let _ = tokio::time::timeout(Duration::from_secs(20), idle.wait()).await;
    let _ = idle.kill().await;

    let r = jitgate(&["grant", "revoke", &id, "--json"], &env).await;
    let revoked: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(revoked["id"], id.as_str());
    let r = jitgate(&["grant", "revoke", &id], &env).await;
    assert!(!r.ok && r.stderr.contains("no active grant"), "{}", r.stderr);
    // Errors are clear without any connection settings.
    let r = jitgate(&["grant", "list"], &[]).await;
    assert!(!r.ok && r.stderr.contains("--api"), "{}", r.stderr);
}

#[tokio::test(flavor = "multi_thread")]
async fn api_requires_admin_role() {
    let h = Harness::start().await;
    let alice = h.user("alice", &["dev", "oncall"]);
    let client = ApiClient::from_files(&h.addrs().api.to_string(), &alice.cert, &alice.key, &alice.ca).unwrap();
    assert_eq!(client.whoami().await.unwrap().user, "alice");
    match client.list_sessions().await {
        Err(ClientError::Api {
            status: 403,
            code,
            message,
        }) => assert!(message.contains("admin") && code == "forbidden", "{message}"),
        other => panic!("expected 403, got {other:?}"),
    }
    // Without the admin role, a user lists only their own grants.
    let mine = h
        .grant("alice", "prod-db", AccessLevel::Read, Duration::from_secs(600))
        .await;
    h.grant("bob", "prod-db", AccessLevel::Read, Duration::from_secs(600))
        .await;
    let listed = client.list_grants().await.unwrap();
    assert_eq!(listed.iter().map(|g| &g.id).collect::<Vec<_>>(), vec![&mine.id]);
    assert_eq!(h.admin().list_grants().await.unwrap().len(), 2);
    let req = jitgate_tests::jitgate::model::NewGrant {
        user: "alice".parse().unwrap(),
        target: "prod-db".parse().unwrap(),
        access: AccessLevel::Admin,
        duration_secs: 600,
        reason: "self-service".into(),
    };
    assert!(matches!(
        client.create_grant(&req).await,
        Err(ClientError::Api { status: 403, .. })
    ));
    assert_eq!(h.admin().list_grants().await.unwrap().len(), 2);
    // No certificate at all: the TLS handshake fails.
    let r = jitgate(
        &[
            "grant",
            "list",
            "--api",
            &h.addrs().api.to_string(),
            "--cert",
            "/nonexistent",
            "--key",
            "/nonexistent",
            "--ca",
            alice.ca.to_str().unwrap(),
        ],
        &[],
    )
    .await;
    assert!(!r.ok);
}

#[tokio::test(flavor = "multi_thread")]
async fn demo_prints_a_working_psql_command() {
    let mut child = Command::new(jitgate_bin())
        .arg("demo")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut psql_line = None;
    let mut request_line = None;
    let mut data_dir = None;
    let found = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(rest) = line.trim().strip_prefix("export JITGATE_DATA_DIR=") {
                data_dir = Some(rest.to_owned());
            }
            if line.trim().starts_with("psql \"") {
                psql_line = Some(line.trim().to_owned());
            }
            if line.trim().starts_with("jitgate request demo-db ") {
                request_line = Some(line.trim().to_owned());
            }
            if line.contains("Press Ctrl-C") {
                return;
            }
        }
    })
    .await;
    assert!(found.is_ok(), "demo did not come up");
    let psql_line = psql_line.expect("demo prints a psql command");
    let conninfo = psql_line.split('"').nth(1).unwrap();
    let out = client_command("psql")
        .arg(conninfo)
        .args(["-X", "-A", "-t", "-c", "SELECT count(*) FROM orders"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "100");
    let data_dir = data_dir.expect("demo prints its data dir");
    assert!(Path::new(&data_dir).is_dir());

    // The printed request command works as printed: the demo user gets more access at once.
    let request_line = request_line.expect("demo prints a request command");
    let bin_dir = jitgate_bin().parent().unwrap().display().to_string();
    let out = Command::new("sh")
        .args(["-c", &request_line])
        .env("PATH", format!("{bin_dir}:{}", std::env::var("PATH").unwrap()))
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("approved: read access to demo-db for 30m"), "{stdout}");

    // Ctrl-C removes everything.
    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
    assert!(!Path::new(&data_dir).exists(), "demo data dir must be removed");
}
