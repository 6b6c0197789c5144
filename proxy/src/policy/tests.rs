#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::config::{Config, ConfigError, Credential, UpstreamTls};
use crate::model::TargetName;

fn target(name: &str, labels: &[(&str, &str)], levels: &[AccessLevel]) -> Target {
    Target {
        name: TargetName::new(name).unwrap(),
        via: None,
        kind: crate::config::TargetKind::Postgres,
        host_keys: Vec::new(),
        address: "127.0.0.1:5432".into(),
        database: "app".into(),
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        mode: crate::config::CredentialsMode::Static,
        credentials: levels
            .iter()
            .map(|l| {
                (
                    *l,
                    Credential {
                        user: "u".into(),
                        password: None,
                        ssh_key: None,
                    },
                )
            })
            .collect(),
        tls: UpstreamTls::Disable,
        allow_role_management: false,
        allow_port_forwarding: false,
        guardrails: Vec::new(),
    }
}

fn targets() -> HashMap<TargetName, Arc<Target>> {
    [
        target("prod-db", &[("env", "prod")], &AccessLevel::ALL),
        target(
            "staging-db",
            &[("env", "staging")],
            &[AccessLevel::Read, AccessLevel::Write],
        ),
    ]
    .into_iter()
    .map(|t| (t.name.clone(), Arc::new(t)))
    .collect()
}

const POLICIES: &str = r#"
[[policies]]
name = "dev-staging"
roles = ["dev"]
targets = { env = "staging" }
access = ["read", "write"]
max_duration = "4h"
approve = "auto"

[[policies]]
name = "dev-prod-read"
roles = ["dev"]
targets = { env = "prod" }
access = ["read"]
max_duration = "1h"
approvers = ["dba", "lead"]
approvals = 2
break_glass = true

[[policies]]
name = "dba-prod"
roles = ["dba"]
targets = { env = "prod" }
access = ["read", "write", "admin"]
max_duration = "8h"
approvers = ["lead"]

[[policies]]
name = "dev-prod-long"
roles = ["dev"]
targets = { env = "prod" }
access = ["read"]
max_duration = "3h"
approvers = ["lead"]
"#;

#[derive(serde::Deserialize)]
struct File {
    policies: Vec<RawPolicy>,
}

fn load(text: &str) -> Result<Policies, ConfigError> {
    let file: File = toml::from_str(text).unwrap();
    validate(file.policies, &targets())
}

fn policies() -> Policies {
    load(POLICIES).unwrap()
}

struct Req {
    user: UserName,
    roles: Vec<Role>,
    target: Arc<Target>,
    access: AccessLevel,
    duration: Duration,
    break_glass: bool,
}

fn req(roles: &[&str], target: &str, access: AccessLevel, minutes: u64) -> Req {
    Req {
        user: UserName::new("alice").unwrap(),
        roles: roles.iter().map(|r| Role::new(*r).unwrap()).collect(),
        target: targets()[&TargetName::new(target).unwrap()].clone(),
        access,
        duration: Duration::from_secs(minutes * 60),
        break_glass: false,
    }
}

impl Req {
    fn ask(&self) -> Ask<'_> {
        Ask {
            user: &self.user,
            roles: &self.roles,
            target: &self.target,
            access: self.access,
            duration: self.duration,
            break_glass: self.break_glass,
        }
    }
    fn glass(mut self) -> Self {
        self.break_glass = true;
        self
    }
}

fn refused(d: Decision) -> String {
    match d {
        Decision::Refused { reason } => reason,
        other => panic!("not refused: {other:?}"),
    }
}

fn role(r: &str) -> Role {
    Role::new(r).unwrap()
}

#[test]
fn auto_policy_grants_at_once() {
    let d = policies().decide(&req(&["dev"], "staging-db", AccessLevel::Write, 240).ask());
    assert_eq!(
        d,
        Decision::Auto {
            policy: "dev-staging".into()
        }
    );
}

#[test]
fn approver_policy_needs_its_approvals() {
    let d = policies().decide(&req(&["ops", "dev"], "prod-db", AccessLevel::Read, 30).ask());
    assert_eq!(
        d,
        Decision::NeedsApproval {
            policy: "dev-prod-read".into(),
            approvers: vec![role("dba"), role("lead")],
            approvals: 2,
        }
    );
    // `approvals` defaults to 1 when approvers is set.
    let d = policies().decide(&req(&["dba"], "prod-db", AccessLevel::Admin, 60).ask());
    assert_eq!(
        d,
        Decision::NeedsApproval {
            policy: "dba-prod".into(),
            approvers: vec![role("lead")],
            approvals: 1,
        }
    );
}

#[test]
fn refusals_say_why() {
    let p = policies();
    let r = refused(p.decide(&req(&["ops"], "prod-db", AccessLevel::Read, 30).ask()));
    assert_eq!(r, "no policy allows read access to prod-db for roles ops");
    let r = refused(p.decide(&req(&[], "prod-db", AccessLevel::Read, 30).ask()));
    assert!(r.contains("roles (none)"), "{r}");
    let r = refused(p.decide(&req(&["dev"], "prod-db", AccessLevel::Write, 30).ask()));
    assert_eq!(r, "no policy allows write access to prod-db for roles dev");
    // A role served elsewhere but not on this target.
    let r = refused(p.decide(&req(&["dba"], "staging-db", AccessLevel::Read, 30).ask()));
    assert_eq!(r, "no policy allows read access to staging-db for roles dba");
    let r = refused(p.decide(&req(&["dev"], "prod-db", AccessLevel::Read, 0).ask()));
    assert!(r.contains("longer than zero"), "{r}");
}

#[test]
fn too_long_is_refused_naming_the_first_maximum() {
    let p = policies();
    let r = refused(p.decide(&req(&["dev"], "prod-db", AccessLevel::Read, 240).ask()));
    assert_eq!(r, "duration 4h exceeds the 1h maximum of policy dev-prod-read");
    let r = refused(p.decide(&req(&["dev"], "staging-db", AccessLevel::Read, 300).ask()));
    assert_eq!(r, "duration 5h exceeds the 4h maximum of policy dev-staging");
}

#[test]
fn first_match_in_config_order_wins() {
    let p = policies();
    // dev-prod-read (1h) comes before dev-prod-long (3h): a short request takes the first...
    let d = p.decide(&req(&["dev"], "prod-db", AccessLevel::Read, 60).ask());
    assert!(
        matches!(d, Decision::NeedsApproval { ref policy, .. } if policy == "dev-prod-read"),
        "{d:?}"
    );
    // ...a longer one falls through to the later policy that allows its duration.
    let d = p.decide(&req(&["dev"], "prod-db", AccessLevel::Read, 120).ask());
    assert!(
        matches!(d, Decision::NeedsApproval { ref policy, approvals: 1, .. } if policy == "dev-prod-long"),
        "{d:?}"
    );
}

#[test]
fn break_glass_only_where_allowed() {
    let p = policies();
    let d = p.decide(&req(&["dev"], "prod-db", AccessLevel::Read, 30).glass().ask());
    assert_eq!(
        d,
        Decision::BreakGlass {
            policy: "dev-prod-read".into()
        }
    );
    // dev-staging serves the request but does not allow break-glass.
    let r = refused(p.decide(&req(&["dev"], "staging-db", AccessLevel::Read, 30).glass().ask()));
    assert_eq!(
        r,
        "no policy allows break-glass read access to staging-db for roles dev; policy dev-staging allows it without --break-glass"
    );
    // Break-glass is still bounded by the policy's maximum, and only for its access levels.
    let r = refused(p.decide(&req(&["dev"], "prod-db", AccessLevel::Read, 90).glass().ask()));
    assert!(r.contains("1h maximum of policy dev-prod-read"), "{r}");
    let r = refused(p.decide(&req(&["dba"], "prod-db", AccessLevel::Admin, 30).glass().ask()));
    assert!(r.contains("policy dba-prod allows it without --break-glass"), "{r}");
}

#[test]
fn no_policies_refuse_everything() {
    let p = Policies::default();
    let r = refused(p.decide(&req(&["dev"], "staging-db", AccessLevel::Read, 30).ask()));
    assert!(r.contains("no [[policies]] configured"), "{r}");
    assert!(p
        .explain(&req(&["dev"], "staging-db", AccessLevel::Read, 30).ask())
        .contains("decision: refused"));
}

#[test]
fn may_approve_checks_requester_and_roles() {
    let p = policies();
    let alice = UserName::new("alice").unwrap();
    let bob = UserName::new("bob").unwrap();
    assert_eq!(p.may_approve("dev-prod-read", &bob, &[role("dba")], &alice), Ok(()));
    assert_eq!(
        p.may_approve("dev-prod-read", &bob, &[role("dev"), role("lead")], &alice),
        Ok(())
    );
    let e = p
        .may_approve("dev-prod-read", &alice, &[role("dba")], &alice)
        .unwrap_err();
    assert!(e.contains("own request"), "{e}");
    let e = p
        .may_approve("dev-prod-read", &bob, &[role("dev")], &alice)
        .unwrap_err();
    assert!(e.contains("needs one of the roles dba, lead"), "{e}");
    assert!(p.may_approve("dev-staging", &bob, &[role("dba")], &alice).is_err());
    assert!(p.may_approve("nope", &bob, &[role("dba")], &alice).is_err());
}

#[test]
fn explain_lists_every_policy_and_the_decision() {
    let p = policies();
    let text = p.explain(&req(&["dev"], "prod-db", AccessLevel::Read, 60).ask());
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0],
        "request: alice (roles dev) asks for read access to prod-db for 1h"
    );
    assert!(
        lines[1].starts_with("policy dev-staging: no: does not select prod-db"),
        "{text}"
    );
    assert_eq!(lines[2], "policy dev-prod-read: matches");
    assert!(
        lines[3] == "policy dba-prod: not reached: policy dev-prod-read matched first",
        "{text}"
    );
    assert_eq!(
        lines[4],
        "policy dev-prod-long: not reached: policy dev-prod-read matched first"
    );
    assert!(
        lines[5].starts_with("decision: needs approval under policy dev-prod-read: 2 distinct approvers"),
        "{text}"
    );
    let text = p.explain(&req(&["dev"], "staging-db", AccessLevel::Admin, 60).ask());
    assert!(
        text.contains("policy dba-prod: no: does not serve roles dev (serves dba)"),
        "{text}"
    );
    assert!(
        text.contains("policy dev-staging: no: does not allow admin access (allows read, write)"),
        "{text}"
    );
    assert!(
        text.contains("decision: refused: no policy allows admin access"),
        "{text}"
    );
    let text = p.explain(&req(&["dev"], "staging-db", AccessLevel::Read, 60).ask());
    assert!(
        text.contains("decision: allowed at once by policy dev-staging"),
        "{text}"
    );
}

#[test]
fn max_duration_for_is_the_deciding_policy_maximum() {
    let p = policies();
    assert_eq!(
        p.max_duration_for(&req(&["dev"], "prod-db", AccessLevel::Read, 9999).ask()),
        Some(Duration::from_secs(3600))
    );
    assert_eq!(
        p.max_duration_for(&req(&["ops"], "prod-db", AccessLevel::Read, 1).ask()),
        None
    );
}

fn error_of(text: &str) -> String {
    load(text).unwrap_err().to_string()
}

const ONE: &str = r#"
[[policies]]
name = "p"
roles = ["dev"]
targets = { env = "staging" }
access = ["read"]
max_duration = "1h"
approve = "auto"
"#;

#[test]
fn validation_errors_name_the_key() {
    assert!(load(ONE).is_ok());
    let two = format!("{ONE}{}", ONE.replace("\"auto\"", "\"auto\"\nbreak_glass = true"));
    assert!(
        error_of(&two).starts_with("policies[1].name: duplicate"),
        "{}",
        error_of(&two)
    );
    for (from, to, key) in [
        ("roles = [\"dev\"]", "roles = []", "policies[0].roles: must name"),
        (
            "roles = [\"dev\"]",
            "roles = [\"dev\", \"a b\"]",
            "policies[0].roles[1]",
        ),
        ("access = [\"read\"]", "access = [\"root\"]", "policies[0].access[0]"),
        ("access = [\"read\"]", "access = []", "policies[0].access"),
        (
            "\"1h\"",
            "\"30s\"",
            "policies[0].max_duration: must be between 1m and 30d",
        ),
        ("\"1h\"", "\"31days\"", "policies[0].max_duration"),
        ("\"1h\"", "\"soon\"", "policies[0].max_duration"),
        ("max_duration = \"1h\"\n", "", "policies[0].max_duration: required"),
        ("approve = \"auto\"", "", "policies[0].approve"),
        ("approve = \"auto\"", "approve = \"yes\"", "policies[0].approve"),
        (
            "approve = \"auto\"",
            "approve = \"auto\"\napprovers = [\"dba\"]",
            "policies[0].approvers",
        ),
        (
            "approve = \"auto\"",
            "approve = \"auto\"\napprovals = 2",
            "policies[0].approvals: only with approvers",
        ),
        (
            "approve = \"auto\"",
            "approvers = []",
            "policies[0].approvers: must name",
        ),
        (
            "approve = \"auto\"",
            "approvers = [\"dba\"]\napprovals = 0",
            "policies[0].approvals: must be at least 1",
        ),
        (
            "env = \"staging\"",
            "env = \"qa\"",
            "policies[0].targets: matches no target",
        ),
        ("targets = { env = \"staging\" }\n", "", "policies[0].targets: required"),
        ("name = \"p\"", "name = \"p q\"", "policies[0].name"),
    ] {
        assert!(ONE.contains(from), "{from}");
        let err = error_of(&ONE.replace(from, to));
        assert!(err.starts_with(key), "{to}: {err}");
    }
    // staging-db has no admin credentials; {} selects it along with prod-db.
    let err = error_of(
        &ONE.replace("env = \"staging\"", "")
            .replace("[\"read\"]", "[\"read\", \"admin\"]"),
    );
    assert_eq!(
        err,
        "policies[0].access: grants admin on target staging-db, which has no credentials.admin"
    );
    let parsed: Result<File, _> = toml::from_str(&ONE.replace("approve =", "aprove ="));
    assert!(parsed.is_err());
}

#[test]
fn config_carries_validated_policies() {
    let base = r#"
data_dir = "/var/lib/jitgate"
[[targets]]
name = "staging-db"
address = "10.0.0.5:5432"
database = "app"
labels = { env = "staging" }
[targets.credentials.read]
user = "r"
"#;
    let c = Config::parse(base, Path::new("t.toml")).unwrap();
    assert!(c.policies.is_empty());
    let c = Config::parse(&format!("{base}{ONE}"), Path::new("t.toml")).unwrap();
    assert_eq!(c.policies.len(), 1);
    assert_eq!(c.policies.get("p").unwrap().max_duration, Duration::from_secs(3600));
    let err = Config::parse(
        &format!("{base}{}", ONE.replace("\"1h\"", "\"40d\"")),
        Path::new("t.toml"),
    )
    .unwrap_err()
    .to_string();
    assert!(err.starts_with("policies[0].max_duration"), "{err}");
}

#[test]
fn inspection_reads_policies_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j.toml");
    std::fs::write(
        &path,
        format!(
            "data_dir = \"/x\"\n[[targets]]\nname = \"staging-db\"\naddress = \"h:1\"\ndatabase = \"a\"\n\
             labels = {{ env = \"staging\" }}\n[targets.credentials.read]\nuser = \"r\"\n\
             password_env = \"JITGATE_POLICY_TEST_NEVER_SET\"\n{ONE}"
        ),
    )
    .unwrap();
    let i = crate::config::Config::load_without_secrets(&path).unwrap();
    assert_eq!(i.policies.len(), 1);
    let t = &i.targets[&TargetName::new("staging-db").unwrap()];
    assert_eq!(t.labels, BTreeMap::from([("env".to_string(), "staging".to_string())]));
    assert!(t.credentials[&AccessLevel::Read].password.is_none());
}
