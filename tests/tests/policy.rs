//! `[[policies]]` through the real binary: `jitgate policy explain` for allowed,
//! approval-needed, break-glass and refused requests (without the targets' secrets), and
//! `jitgate config check` naming the key of a bad policy.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use jitgate_tests::{run_jitgate, CliRun};

const SECRET_VAR: &str = "POLICY_TEST_PROD_PASSWORD";

use jitgate_tests::EXAMPLE_POLICIES as POLICIES;

/// A data dir from `jitgate init` and a config with two labelled targets and `policies`.
async fn setup(tmp: &Path, policies: &str) -> PathBuf {
    let data = tmp.join("data");
    let r = run_jitgate(&["init", "--data-dir", data.to_str().unwrap()], &[]).await;
    assert!(r.ok, "init: {}", r.stderr);
    let config = tmp.join("jitgate.toml");
    let text = format!(
        r#"data_dir = "{data}"
[listen]
postgres = "127.0.0.1:0"
api = "127.0.0.1:0"
metrics = "127.0.0.1:0"

[[targets]]
name = "prod-db"
address = "127.0.0.1:5432"
database = "app"
labels = {{ env = "prod" }}
[targets.credentials.read]
user = "jit_reader"
password_env = "{SECRET_VAR}"
[targets.credentials.write]
user = "jit_writer"
password_env = "{SECRET_VAR}"

[[targets]]
name = "staging-db"
address = "127.0.0.1:5432"
database = "app"
labels = {{ env = "staging" }}
[targets.credentials.read]
user = "jit_reader"
[targets.credentials.write]
user = "jit_writer"
{policies}"#,
        data = data.display()
    );
    std::fs::write(&config, text).unwrap();
    config
}

/// `policy explain` with the secrets unset, as on a laptop.
async fn explain(config: &Path, args: &[&str]) -> CliRun {
    let mut all = vec!["policy", "explain", "--config", config.to_str().unwrap()];
    all.extend_from_slice(args);
    let r = run_jitgate(&all, &[]).await;
    assert!(r.ok, "policy explain {args:?} exited {:?}: {}", r.code, r.stderr);
    r
}

#[tokio::test(flavor = "multi_thread")]
async fn policy_explain_allowed_needs_approval_and_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let config = setup(tmp.path(), POLICIES).await;

    let r = explain(
        &config,
        &[
            "--user",
            "alice",
            "--roles",
            "dev",
            "--target",
            "staging-db",
            "--access",
            "write",
            "--for",
            "2h",
        ],
    )
    .await;
    assert!(
        r.stdout
            .contains("request: alice (roles dev) asks for write access to staging-db for 2h"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("policy dev-staging: matches"), "{}", r.stdout);
    assert!(
        r.stdout.contains("decision: allowed at once by policy dev-staging"),
        "{}",
        r.stdout
    );

    // Without --for, the deciding policy's maximum.
    let r = explain(
        &config,
        &[
            "--user", "alice", "--roles", "ops,dev", "--target", "prod-db", "--access", "read",
        ],
    )
    .await;
    assert!(r.stdout.contains("read access to prod-db for 1h"), "{}", r.stdout);
    assert!(
        r.stdout.contains("policy dev-staging: no: does not select prod-db"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("policy dev-prod-read: matches"), "{}", r.stdout);
    assert!(
        r.stdout.contains(
            "decision: needs approval under policy dev-prod-read: 2 distinct approvers holding one of the roles dba, lead"
        ),
        "{}",
        r.stdout
    );

    let r = explain(
        &config,
        &[
            "--user",
            "alice",
            "--roles",
            "dev",
            "--target",
            "prod-db",
            "--access",
            "read",
            "--break-glass",
        ],
    )
    .await;
    assert!(
        r.stdout.contains("decision: break-glass under policy dev-prod-read"),
        "{}",
        r.stdout
    );

    // Refused: access level, duration, role; each says why.
    let r = explain(
        &config,
        &[
            "--user", "alice", "--roles", "dev", "--target", "prod-db", "--access", "write",
        ],
    )
    .await;
    assert!(
        r.stdout
            .contains("policy dev-prod-read: no: does not allow write access (allows read)"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout
            .contains("decision: refused: no policy allows write access to prod-db for roles dev"),
        "{}",
        r.stdout
    );
    let r = explain(
        &config,
        &[
            "--user", "alice", "--roles", "dev", "--target", "prod-db", "--access", "read", "--for", "2h",
        ],
    )
    .await;
    assert!(
        r.stdout
            .contains("decision: refused: duration 2h exceeds the 1h maximum of policy dev-prod-read"),
        "{}",
        r.stdout
    );
    let r = explain(
        &config,
        &[
            "--user",
            "bob",
            "--roles",
            "ops",
            "--target",
            "staging-db",
            "--access",
            "read",
        ],
    )
    .await;
    assert!(
        r.stdout
            .contains("policy dev-staging: no: does not serve roles ops (serves dev)"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("decision: refused"), "{}", r.stdout);

    // An unknown target is a usage error, not a decision.
    let r = run_jitgate(
        &[
            "policy",
            "explain",
            "--config",
            config.to_str().unwrap(),
            "--user",
            "a",
            "--roles",
            "dev",
        ]
        .into_iter()
        .chain(["--target", "nope-db", "--access", "read"])
        .collect::<Vec<_>>(),
        &[],
    )
    .await;
    assert!(!r.ok && r.stderr.contains("no target named nope-db"), "{}", r.stderr);
}

#[tokio::test(flavor = "multi_thread")]
async fn explain_without_policies_refuses() {
    let tmp = tempfile::tempdir().unwrap();
    let config = setup(tmp.path(), "").await;
    let r = explain(
        &config,
        &[
            "--user",
            "alice",
            "--roles",
            "dev",
            "--target",
            "staging-db",
            "--access",
            "read",
        ],
    )
    .await;
    assert!(
        r.stdout.contains("decision: refused: no [[policies]] configured"),
        "{}",
        r.stdout
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn config_check_names_the_bad_policy_key() {
    let tmp = tempfile::tempdir().unwrap();
    let env = [(SECRET_VAR, "pw")];
    let config = setup(tmp.path(), POLICIES).await;
    let r = run_jitgate(&["config", "check", config.to_str().unwrap()], &env).await;
    assert!(r.ok, "good config: {}", r.stderr);

    for (from, to, key) in [
        (
            "max_duration = \"1h\"",
            "max_duration = \"45d\"",
            "policies[1].max_duration",
        ),
        (
            "env = \"staging\"",
            "env = \"qa\"",
            "policies[0].targets: matches no target",
        ),
        (
            "access = [\"read\"]",
            "access = [\"read\", \"admin\"]",
            "policies[1].access",
        ),
        ("approvals = 2", "approvals = 0", "policies[1].approvals"),
        ("approve = \"auto\"", "", "policies[0].approve"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let config = setup(tmp.path(), &POLICIES.replace(from, to)).await;
        let r = run_jitgate(&["config", "check", config.to_str().unwrap()], &env).await;
        assert!(!r.ok, "{to}: accepted");
        assert!(r.stderr.contains(key), "{to}: {}", r.stderr);
        // explain validates policies the same way, without the secrets.
        let r = run_jitgate(
            &[
                "policy",
                "explain",
                "--config",
                config.to_str().unwrap(),
                "--user",
                "a",
                "--roles",
                "dev",
            ]
            .into_iter()
            .chain(["--target", "prod-db", "--access", "read"])
            .collect::<Vec<_>>(),
            &[],
        )
        .await;
        assert!(!r.ok && r.stderr.contains(key), "explain {to}: {}", r.stderr);
    }
    let r = run_jitgate(
        &[
            "config",
            "check",
            setup(tmp.path().join("dup").as_path(), &format!("{POLICIES}{POLICIES}"))
                .await
                .to_str()
                .unwrap(),
        ],
        &env,
    )
    .await;
    assert!(
        !r.ok && r.stderr.contains("policies[2].name: duplicate policy name"),
        "{}",
        r.stderr
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn example_policies_are_valid_once_uncommented() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/jitgate.toml");
    let text = std::fs::read_to_string(example).unwrap();
    let (head, tail) = text.split_at(text.find("# Uncomment to use").expect("policy examples"));
    let mut uncommented = head.to_owned();
    for line in tail.lines() {
        let setting = line
            .strip_prefix("# ")
            .filter(|l| l.starts_with("[[policies]]") || l.split_once(" = ").is_some_and(|(k, _)| !k.contains(' ')));
        uncommented.push_str(setting.unwrap_or(line));
        uncommented.push('\n');
    }
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("example.toml");
    std::fs::write(&config, uncommented).unwrap();
    let r = explain(
        &config,
        &[
            "--user", "bob", "--roles", "dba", "--target", "prod-db", "--access", "write",
        ],
    )
    .await;
    assert!(r.stdout.contains("policy dba-prod: matches"), "{}", r.stdout);
    let r = explain(
        &config,
        &[
            "--user",
            "alice",
            "--roles",
            "dev",
            "--target",
            "staging-db",
            "--access",
            "read",
        ],
    )
    .await;
    assert!(
        r.stdout.contains("decision: allowed at once by policy dev-staging"),
        "{}",
        r.stdout
    );
}
