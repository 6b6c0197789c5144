//! The request workflow end to end: the real `jitgate` CLI and API, certificates for
//! requesters, approvers and the admin, the real proxy and PostgreSQL, psql.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;
use std::time::{Duration, SystemTime};

use jitgate_tests::jitgate::client::ClientError;
use jitgate_tests::jitgate::model::{AccessLevel, ListFilter, NewRequest, RequestState};
use jitgate_tests::{eventually, jitgate_bin, CliRun, Harness, UserCert, EXAMPLE_POLICIES};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// One single-approver policy for on-call engineers, after the example policies.
const ONCALL_POLICY: &str = r#"
[[policies]]
name = "oncall-prod"
roles = ["oncall"]
targets = { env = "prod" }
access = ["read", "write"]
max_duration = "2h"
approvers = ["dba"]
approvals = 1
"#;

/// Starts the world with a `staging-db` target (labels env = staging), the example policies,
/// the on-call policy and `extra` config appended.
async fn start(extra: &str) -> Harness {
    let mut h = Harness::start().await;
    let d = h.data_dir().display().to_string();
    let addr = h.pg.address();
    h.reconfigure(&format!(
        r#"
[[targets]]
name = "staging-db"
address = "{addr}"
database = "app"
labels = {{ env = "staging" }}
[targets.credentials.read]
user = "jit_reader"
password_file = "{d}/reader.password"
[targets.credentials.write]
user = "jit_writer"
password_file = "{d}/writer.password"
{EXAMPLE_POLICIES}
{ONCALL_POLICY}
{extra}
"#
    ))
    .await;
    h
}

fn json(r: &CliRun) -> serde_json::Value {
    assert!(r.ok, "jitgate failed: {}{}", r.stdout, r.stderr);
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {}", r.stdout))
}

/// Files a request as `user` through the CLI and returns its JSON.
async fn request(h: &Harness, user: &UserCert, target: &str, access: &str, duration: &str) -> serde_json::Value {
    let r = h
        .cli_as(
            user,
            &[
                "request", target, "--access", access, "--for", duration, "--reason", "INC-42", "--json",
            ],
        )
        .await;
    json(&r)
}

async fn count_items(h: &Harness, user: &UserCert, target: &str) -> Result<String, String> {
    let out = h.psql(user, target, "SELECT count(*) FROM items").await;
    if out.success {
        Ok(out.stdout.trim().to_owned())
    } else {
        Err(out.stderr)
    }
}

fn api_err<T: std::fmt::Debug>(r: Result<T, ClientError>) -> (u16, String, String) {
    match r {
        Err(ClientError::Api { status, code, message }) => (status, code, message),
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn auto_approved_request_works_at_once() {
    let h = start("").await;
    let alice = h.user("alice", &["dev"]);
    assert!(
        count_items(&h, &alice, "staging-db").await.is_err(),
        "no standing access"
    );

    let r = request(&h, &alice, "staging-db", "write", "30m").await;
    assert_eq!(r["state"], "approved");
    assert_eq!(r["policy"], "dev-staging");
    assert_eq!(r["approvals_needed"], 0);
    let grant_id = r["grant_id"].as_str().expect("a grant").to_owned();
    assert_eq!(count_items(&h, &alice, "staging-db").await.unwrap(), "100");

    // The grant starts now, lasts the requested time, and names the request.
    let grants = h.api_as(&alice).list_grants().await.unwrap();
    let g = grants.iter().find(|g| g.id.as_str() == grant_id).unwrap();
    assert_eq!(g.access, AccessLevel::Write);
    let length = g.expires_at.duration_since(g.created_at).unwrap();
    assert_eq!(length.as_secs(), 1800);
    assert!(g.reason.contains(r["id"].as_str().unwrap()), "{}", g.reason);

    // Text output says the same, and `request list --mine` shows it.
    let text = h
        .cli_as(
            &alice,
            &["request", "staging-db", "--for", "10m", "--reason", "look at a bug"],
        )
        .await;
    assert!(
        text.ok && text.stdout.contains("approved: read access to staging-db for 10m"),
        "{text:?}"
    );
    let mine = json(&h.cli_as(&alice, &["request", "list", "--mine", "--json"]).await);
    assert_eq!(mine.as_array().unwrap().len(), 2);
    assert!(mine.as_array().unwrap().iter().all(|r| r["state"] == "approved"));

    // Audited: who asked, what decided, which grant.
    let created = h.audit_events("request.created");
    assert_eq!(created[0]["request"]["user"], "alice");
    assert_eq!(created[0]["request"]["reason"], "INC-42");
    let approved = h.audit_events("request.approved");
    assert_eq!(approved[0]["request"]["grant_id"], grant_id.as_str());
    assert_eq!(
        approved[0]["request"]["note"],
        "approved automatically by policy dev-staging"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn two_approvals_need_two_distinct_approvers_with_the_right_role() {
    let h = start("").await;
    // alice also holds an approver role: she still cannot approve her own request.
    let alice = h.user("alice", &["dev", "dba"]);
    let bob = h.user("bob", &["dev"]);
    let carol = h.user("carol", &["dba"]);
    let dave = h.user("dave", &["lead"]);

    let r = request(&h, &alice, "prod-db", "read", "30m").await;
    let id = r["id"].as_str().unwrap().to_owned();
    assert_eq!(r["state"], "pending");
    assert_eq!(r["approvals_needed"], 2);
    assert_eq!(r["approver_roles"], serde_json::json!(["dba", "lead"]));
    assert!(
        count_items(&h, &alice, "prod-db").await.is_err(),
        "pending gives no access"
    );

    // Approvers see it; an unrelated developer does not.
    let only_pending = ListFilter {
        pending: true,
        ..ListFilter::default()
    };
    assert_eq!(h.api_as(&carol).list_requests(&only_pending).await.unwrap().len(), 1);
    let (status, _, _) = api_err(h.api_as(&bob).get_request(&id).await);
    assert_eq!(status, 404);
    assert!(h
        .api_as(&bob)
        .list_requests(&ListFilter::default())
        .await
        .unwrap()
        .is_empty());

    // Self-approval and approval without an approver role are refused, through the CLI.
    let own = h.cli_as(&alice, &["approve", &id]).await;
    assert!(
        !own.ok && own.stderr.contains("cannot approve their own request"),
        "{own:?}"
    );
    let wrong = h.cli_as(&bob, &["approve", &id]).await;
    assert!(
        !wrong.ok && wrong.stderr.contains("needs one of the roles dba, lead"),
        "{wrong:?}"
    );

    // First approval: still pending; the same approver twice does not count twice.
    let first = json(
        &h.cli_as(&carol, &["approve", &id, "--comment", "checked INC-42", "--json"])
            .await,
    );
    assert_eq!(first["state"], "pending");
    assert_eq!(first["approvals"][0]["by"], "carol");
    assert_eq!(first["approvals"][0]["comment"], "checked INC-42");
    let (status, code, message) = api_err(h.api_as(&carol).approve_request(&id, None).await);
    assert_eq!((status, code.as_str()), (409, "conflict"), "{message}");
    assert!(
        count_items(&h, &alice, "prod-db").await.is_err(),
        "one of two approvals gives no access"
    );

    // Second, distinct approver: granted now.
    let done = h.cli_as(&dave, &["approve", &id]).await;
    assert!(done.ok && done.stdout.contains("approved: grant g-"), "{done:?}");
    assert_eq!(count_items(&h, &alice, "prod-db").await.unwrap(), "100");
    let shown = json(&h.cli_as(&alice, &["request", "show", &id, "--json"]).await);
    assert_eq!(shown["state"], "approved");
    assert_eq!(shown["decided_by"], "dave");
    assert_eq!(shown["note"], "approved by carol, dave");
    let grant = h.admin().list_grants().await.unwrap();
    assert_eq!(grant.len(), 1);
    assert_eq!(grant[0].id.as_str(), shown["grant_id"].as_str().unwrap());
    assert_eq!(grant[0].created_by.as_str(), "dave");

    let votes = h.audit_events("request.approval");
    assert_eq!(votes.len(), 2);
    assert_eq!(
        (votes[0]["by"].as_str(), votes[1]["by"].as_str()),
        (Some("carol"), Some("dave"))
    );
    assert_eq!(votes[1]["approvals"], 2);
    let approved = h.audit_events("request.approved");
    assert_eq!(approved[0]["request"]["grant_id"], shown["grant_id"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn deny_and_withdraw_end_a_request() {
    let h = start("").await;
    let alice = h.user("alice", &["dev"]);
    let bob = h.user("bob", &["dev"]);
    let carol = h.user("carol", &["dba"]);
    let admin_env_ok = h.admin().whoami().await.is_ok();
    assert!(admin_env_ok);

    let id = request(&h, &alice, "prod-db", "read", "30m").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // A denial needs a reason and an approver role.
    let no_reason = h.cli_as(&carol, &["deny", &id]).await;
    assert!(!no_reason.ok && no_reason.stderr.contains("--reason"), "{no_reason:?}");
    let (status, _, _) = api_err(h.api_as(&bob).deny_request(&id, "nope").await);
    assert_eq!(status, 403, "bob holds no approver role");
    let (status, _, message) = api_err(h.api_as(&alice).deny_request(&id, "changed my mind").await);
    assert_eq!(status, 403, "the requester withdraws, never decides: {message}");
    let denied = json(
        &h.cli_as(&carol, &["deny", &id, "--reason", "use staging first", "--json"])
            .await,
    );
    assert_eq!(denied["state"], "denied");
    assert_eq!(denied["decided_by"], "carol");
    assert_eq!(denied["note"], "use staging first");
    let shown = h.cli_as(&alice, &["request", "show", &id]).await;
    assert!(shown.ok && shown.stdout.contains("state:      denied"), "{shown:?}");
    assert!(shown.stdout.contains("use staging first"), "{shown:?}");
    let (status, _, message) = api_err(h.api_as(&carol).approve_request(&id, None).await);
    assert_eq!(status, 409);
    assert!(message.contains("is denied, not pending"), "{message}");

    // Withdraw: only the requester, only while pending.
    let id = request(&h, &alice, "prod-db", "read", "30m").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, _, _) = api_err(h.api_as(&carol).withdraw_request(&id).await);
    assert_eq!(status, 403, "an approver may see it but not withdraw it");
    let w = json(&h.cli_as(&alice, &["request", "withdraw", &id, "--json"]).await);
    assert_eq!(w["state"], "withdrawn");
    let (status, _, _) = api_err(h.api_as(&carol).approve_request(&id, None).await);
    assert_eq!(status, 409);
    assert!(h.admin().list_grants().await.unwrap().is_empty());
    assert_eq!(h.audit_events("request.denied").len(), 1);
    assert_eq!(h.audit_events("request.withdrawn").len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_no_policy_allows_are_refused_with_the_reason() {
    let h = start("").await;
    let alice = h.user("alice", &["dev"]);
    let cases = [
        (
            vec!["request", "prod-db", "--for", "2h", "--reason", "x"],
            "duration 2h exceeds the 1h maximum of policy dev-prod-read",
        ),
        (
            vec![
                "request", "prod-db", "--access", "write", "--for", "30m", "--reason", "x",
            ],
            "no policy allows write access to prod-db for roles dev",
        ),
        (
            vec!["request", "nope-db", "--for", "30m", "--reason", "x"],
            "no target named \"nope-db\"",
        ),
        (
            vec![
                "request",
                "staging-db",
                "--access",
                "admin",
                "--for",
                "30m",
                "--reason",
                "x",
            ],
            "staging-db has no credentials for admin access",
        ),
    ];
    for (args, why) in cases {
        let r = h.cli_as(&alice, &args).await;
        assert_eq!(r.code, Some(2), "{args:?}: {r:?}");
        assert!(r.stderr.contains(why), "{args:?}: {}", r.stderr);
    }
    // Bad input is a clear error, not a refusal.
    let r = h
        .cli_as(&alice, &["request", "staging-db", "--for", "30m", "--reason", "  "])
        .await;
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("reason must not be empty"), "{}", r.stderr);

    assert!(h
        .admin()
        .list_requests(&ListFilter::default())
        .await
        .unwrap()
        .is_empty());
    let refused = h.audit_events("request.refused");
    assert_eq!(refused.len(), 4);
    assert_eq!(refused[0]["user"], "alice");
    assert!(refused[0]["refusal"].as_str().unwrap().contains("exceeds"));
    assert!(h.admin().list_grants().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pending_request_lapses() {
    let h = start("[requests]\nlapse_after = \"2s\"\n").await;
    let alice = h.user("alice", &["dev"]);
    let carol = h.user("carol", &["dba"]);
    let r = request(&h, &alice, "prod-db", "read", "30m").await;
    let id = r["id"].as_str().unwrap().to_owned();
    assert_eq!(r["state"], "pending");
    // Lapsed by the server on its own (nobody reads the request meanwhile).
    eventually("request.lapsed audited", Duration::from_secs(15), || async {
        !h.audit_events("request.lapsed").is_empty()
    })
    .await;
    let lapsed = &h.audit_events("request.lapsed")[0]["request"];
    assert_eq!(lapsed["id"], id.as_str());
    assert_eq!(lapsed["note"], "not decided within 2s");
    let (status, _, message) = api_err(h.api_as(&carol).approve_request(&id, None).await);
    assert_eq!(status, 409, "{message}");
    assert!(message.contains("lapsed"), "{message}");
    assert!(count_items(&h, &alice, "prod-db").await.is_err());
}

/// `jitgate request ... --wait` as a separate process.
fn spawn_wait(h: &Harness, user: &UserCert) -> tokio::process::Child {
    let mut c = tokio::process::Command::new(jitgate_bin());
    c.args([
        "request", "prod-db", "--access", "write", "--for", "30m", "--reason", "deploy", "--wait",
    ]);
    for (k, v) in h.cli_env(user) {
        c.env(k, v);
    }
    c.stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    c.spawn().unwrap()
}

/// The pending request of `user`, once it shows up.
async fn pending_of(h: &Harness, user: &str) -> String {
    let mut id = String::new();
    for _ in 0..100 {
        let pending = h
            .admin()
            .list_requests(&ListFilter {
                pending: true,
                ..ListFilter::default()
            })
            .await
            .unwrap();
        if let Some(r) = pending.iter().find(|r| r.user.as_str() == user) {
            id = r.id.to_string();
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!id.is_empty(), "no pending request of {user}");
    id
}

#[tokio::test(flavor = "multi_thread")]
async fn wait_exits_0_when_approved_elsewhere_and_2_when_denied() {
    let h = start("").await;
    let erin = h.user("erin", &["oncall"]);
    let carol = h.user("carol", &["dba"]);

    let child = spawn_wait(&h, &erin);
    let id = pending_of(&h, "erin").await;
    let approved = h.cli_as(&carol, &["approve", &id]).await;
    assert!(approved.ok, "{approved:?}");
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("--wait returns once approved")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(&format!("{id} approved")), "{stdout}");
    assert_eq!(count_items(&h, &erin, "prod-db").await.unwrap(), "100");

    let child = spawn_wait(&h, &erin);
    let id = pending_of(&h, "erin").await;
    let denied = h.cli_as(&carol, &["deny", &id, "--reason", "change freeze"]).await;
    assert!(denied.ok, "{denied:?}");
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("--wait returns once denied")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("denied") && stderr.contains("change freeze"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_approved_extension_keeps_psql_going_until_the_new_deadline() {
    let h = start("[sessions]\nexpiry_notice = \"3s\"\n").await;
    let erin = h.user("erin", &["oncall"]);
    let carol = h.user("carol", &["dba"]);
    let id = request(&h, &erin, "prod-db", "read", "8s").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = json(&h.cli_as(&carol, &["approve", &id, "--json"]).await);
    let grant_id = r["grant_id"].as_str().unwrap().to_owned();
    let original = h.api_as(&erin).list_grants().await.unwrap()[0].expires_at;

    let mut psql = h.psql_interactive(&erin, "prod-db");
    let mut stdin = psql.stdin.take().unwrap();
    let mut out = BufReader::new(psql.stdout.take().unwrap()).lines();
    stdin.write_all(b"SELECT 'first';\n").await.unwrap();
    assert_eq!(out.next_line().await.unwrap().unwrap(), "first");

    // Ask for more time; pending until carol approves.
    let ext = json(
        &h.cli_as(
            &erin,
            &[
                "extend",
                &grant_id,
                "--for",
                "10s",
                "--reason",
                "migration runs long",
                "--json",
            ],
        )
        .await,
    );
    assert_eq!(ext["state"], "pending");
    assert_eq!(ext["extends"], grant_id.as_str());
    let ext_id = ext["id"].as_str().unwrap().to_owned();
    // Someone else's grant cannot be extended by request.
    let other = h
        .cli_as(&carol, &["extend", &grant_id, "--for", "10s", "--reason", "x"])
        .await;
    assert!(
        !other.ok && other.stderr.contains("you have no active grant"),
        "{other:?}"
    );
    let approved = json(&h.cli_as(&carol, &["approve", &ext_id, "--json"]).await);
    assert_eq!(approved["state"], "approved");
    assert_eq!(approved["grant_id"], grant_id.as_str());

    // Past the original deadline the same psql session still runs statements.
    let wait = original.duration_since(SystemTime::now()).unwrap_or_default() + Duration::from_secs(1);
    tokio::time::sleep(wait).await;
    stdin.write_all(b"SELECT 'still here';\n").await.unwrap();
    assert_eq!(out.next_line().await.unwrap().unwrap(), "still here");

    // Cut at the new deadline.
    eventually("session cut at the new deadline", Duration::from_secs(30), || async {
        h.audit_events("session.end")
            .iter()
            .any(|e| e["reason"] == "grant_expired")
    })
    .await;
    assert!(SystemTime::now() >= original + Duration::from_secs(10));
    let _ = stdin.write_all(b"SELECT 'gone';\n").await;
    drop(stdin);
    let mut stderr = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut psql.stderr.take().unwrap(), &mut stderr)
        .await
        .unwrap();
    let _ = psql.wait().await;
    // psql showed the expiry notice (naming the extend command) and then the cut.
    assert!(stderr.contains(&format!("jitgate extend {grant_id}")), "{stderr}");
    assert!(stderr.contains("expired"), "{stderr}");
    let extended = h.audit_events("grant.extended");
    assert_eq!(extended.len(), 1);
    assert_eq!(extended[0]["by"], "carol");
}

#[tokio::test(flavor = "multi_thread")]
async fn break_glass_is_granted_at_once_flagged_and_listed() {
    let h = start("").await;
    let alice = h.user("alice", &["dev"]);
    let carol = h.user("carol", &["dba"]);
    let r = h
        .cli_as(
            &alice,
            &[
                "request",
                "prod-db",
                "--for",
                "30m",
                "--reason",
                "INC-7 outage",
                "--break-glass",
            ],
        )
        .await;
    assert!(r.ok && r.stdout.contains("BREAK-GLASS"), "{r:?}");
    assert_eq!(count_items(&h, &alice, "prod-db").await.unwrap(), "100");
    // Break-glass is for a policy that allows it only.
    let no = h
        .cli_as(
            &alice,
            &[
                "request",
                "staging-db",
                "--for",
                "30m",
                "--reason",
                "x",
                "--break-glass",
            ],
        )
        .await;
    assert_eq!(no.code, Some(2), "{no:?}");
    assert!(no.stderr.contains("no policy allows break-glass"), "{}", no.stderr);

    // Listed for review by admins and by the policy's approvers, and only break-glass ones.
    request(&h, &alice, "staging-db", "read", "10m").await;
    for who in [None, Some(&carol)] {
        let args = ["request", "list", "--break-glass", "--json"];
        let listed = match who {
            Some(u) => json(&h.cli_as(u, &args).await),
            None => {
                let d = h.data_dir().to_str().unwrap().to_owned();
                let api = h.addrs().api.to_string();
                let mut a = args.to_vec();
                a.extend(["--data-dir", d.as_str(), "--api", api.as_str()]);
                json(&jitgate_tests::run_jitgate(&a, &[]).await)
            }
        };
        let listed = listed.as_array().unwrap().clone();
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert_eq!(listed[0]["break_glass"], true);
        assert_eq!(listed[0]["state"], "approved");
        assert_eq!(listed[0]["policy"], "dev-prod-read");
    }
    let text = h.cli_as(&carol, &["request", "list", "--break-glass"]).await;
    assert!(text.ok && text.stdout.contains("break-glass"), "{text:?}");
    let created = h.audit_events("request.created");
    assert_eq!(created[0]["request"]["break_glass"], true);
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_keeps_pending_and_approved_requests() {
    let mut h = start("").await;
    let alice = h.user("alice", &["dev"]);
    let carol = h.user("carol", &["dba"]);
    let dave = h.user("dave", &["lead"]);
    let pending = request(&h, &alice, "prod-db", "read", "30m").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    h.api_as(&carol).approve_request(&pending, None).await.unwrap();
    let approved = request(&h, &alice, "staging-db", "read", "30m").await;

    h.restart_proxy().await;

    let all = h.admin().list_requests(&ListFilter::default()).await.unwrap();
    assert_eq!(all.len(), 2);
    let p = all.iter().find(|r| r.id.as_str() == pending).unwrap();
    assert_eq!(p.state, RequestState::Pending);
    assert_eq!(p.approvals.len(), 1, "the first approval survives too");
    let a = all.iter().find(|r| r.id.as_str() == approved["id"]).unwrap();
    assert_eq!(a.state, RequestState::Approved);
    assert_eq!(count_items(&h, &alice, "staging-db").await.unwrap(), "100");
    // The pending one can still be completed.
    let done = h.api_as(&dave).approve_request(&pending, None).await.unwrap();
    assert_eq!(done.state, RequestState::Approved);
    assert_eq!(count_items(&h, &alice, "prod-db").await.unwrap(), "100");
}

#[tokio::test(flavor = "multi_thread")]
async fn api_speaks_problem_json_and_serves_its_openapi_document() {
    use jitgate_tests::jitgate::api::{OPENAPI, ROUTES};
    use jitgate_tests::jitgate::client::Method;
    let h = start("").await;
    let alice = h.user("alice", &["dev"]);
    let api = h.api_as(&alice);

    // The served document is the one in docs/, and it lists every route the server has.
    let (status, body) = api.raw(Method::GET, "/openapi.json", None).await.unwrap();
    assert_eq!(status, 200);
    let in_docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json")).unwrap();
    assert_eq!(String::from_utf8(body).unwrap(), in_docs);
    assert_eq!(OPENAPI, in_docs);
    let doc: serde_json::Value = serde_json::from_str(&in_docs).unwrap();
    let documented: usize = doc["paths"]
        .as_object()
        .unwrap()
        .values()
        .map(|p| p.as_object().unwrap().len())
        .sum();
    assert_eq!(documented, ROUTES.len(), "every documented operation is a route");
    for (method, path) in ROUTES {
        assert!(doc["paths"][path][method].is_object(), "{method} {path} undocumented");
        // The server has the route: anything but the router's own "no_route".
        let concrete = path.replace("{id}", "x-1");
        let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let (status, body) = h.admin().raw(m, &concrete, Some(b"{}".to_vec())).await.unwrap();
        let problem: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        assert_ne!(problem["code"], "no_route", "{method} {path}: {status}");
    }

    // Errors are problem details.
    type Case<'a> = (Method, &'a str, Option<&'a [u8]>, u16, &'a str);
    let cases: [Case; 5] = [
        (Method::POST, "/v1/requests", Some(b"{not json"), 400, "invalid"),
        (
            Method::POST,
            "/v1/requests",
            Some(br#"{"target":"prod-db"}"#),
            400,
            "invalid",
        ),
        (Method::GET, "/v1/requests/r-0000000000000000", None, 404, "not_found"),
        (Method::GET, "/v1/nothing-here", None, 404, "no_route"),
        (Method::GET, "/v1/sessions", None, 403, "forbidden"),
    ];
    for (method, path, body, want_status, want_code) in cases {
        let (status, body) = api.raw(method.clone(), path, body.map(<[u8]>::to_vec)).await.unwrap();
        let p: serde_json::Value = serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        assert_eq!(status, want_status, "{method} {path}: {p}");
        assert_eq!(p["status"], want_status);
        assert_eq!(p["code"], want_code, "{p}");
        assert_eq!(p["type"], "about:blank");
        assert!(!p["detail"].as_str().unwrap().is_empty());
    }
    // A refusal is a problem too, with the reason as detail.
    let refused = api
        .create_request(&NewRequest {
            target: "prod-db".into(),
            access: AccessLevel::Admin,
            duration_secs: 60,
            reason: "x".into(),
            break_glass: false,
        })
        .await;
    let (status, code, message) = api_err(refused);
    assert_eq!((status, code.as_str()), (403, "refused"));
    assert!(message.contains("no policy allows admin access"), "{message}");
}
