//! Admission and lease cuts on tokio's paused clock: every way a session ends (shutdown,
//! revoke, expiry, kill, certificate expiry), the notice, and what a refusal says. No real-time
//! sleep: time moves only when a test advances it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use std::future::Future;
use std::task::{Context, Poll, Waker};

use super::*;
use crate::access::dialer::BoxedIo;
use crate::audit::SessionEndReason;
use crate::clock::{Clock, TokioClock};
use crate::config::UpstreamTls;
use crate::model::{AccessLevel, Grant, GrantEnd, GrantId, UserName};
use crate::store::Change;

/// Records the addresses it is asked for and opens an in-memory pipe.
#[derive(Debug, Default)]
struct RecordingDialer(Mutex<Vec<String>>);

#[async_trait]
impl Dialer for RecordingDialer {
    async fn dial(&self, target: &Target) -> std::io::Result<BoxedIo> {
        self.0.lock().unwrap().push(target.address.clone());
        let (a, _b) = tokio::io::duplex(64);
        Ok(Box::new(a))
    }
}

struct Core {
    admission: Admission,
    clock: Arc<TokioClock>,
    dialer: Arc<RecordingDialer>,
    shutdown: CancellationToken,
}

fn target(name: &str, address: &str) -> Arc<Target> {
    Arc::new(Target {
        name: TargetName::new(name).unwrap(),
        via: None,
        kind: crate::config::TargetKind::Postgres,
        host_keys: Vec::new(),
        address: address.into(),
        database: "app".into(),
        labels: Default::default(),
        credentials: HashMap::new(),
        mode: crate::config::CredentialsMode::Static,
        tls: UpstreamTls::Disable,
        allow_role_management: false,
        allow_port_forwarding: false,
        guardrails: Vec::new(),
    })
}

fn core(max_per_user: usize) -> Core {
    let clock = Arc::new(TokioClock::new());
    let shutdown = CancellationToken::new();
    let (grants, _expired) = GrantTable::start(clock.clone(), shutdown.clone(), crate::metrics::Metrics::new());
    let targets: HashMap<TargetName, Arc<Target>> =
        [target("prod-db", "10.0.0.1:5432"), target("other-db", "10.0.0.2:5432")]
            .into_iter()
            .map(|t| (t.name.clone(), t))
            .collect();
    let dialer = Arc::new(RecordingDialer::default());
    Core {
        admission: Admission {
            targets: Arc::new(targets),
            grants,
            sessions: Arc::new(Sessions::default()),
            users: UserSessions::new(max_per_user),
            shutdown: shutdown.clone(),
            clock: clock.clone(),
            dialer: dialer.clone(),
            wave: crate::access::CutWave::new(),
        },
        clock,
        dialer,
        shutdown,
    }
}

impl Core {
    fn grant(&self, user: &str, target: &str, secs: u64) -> Grant {
        let now = self.clock.now();
        let g = Grant {
            id: GrantId::generate(),
            user: UserName::new(user).unwrap(),
            target: TargetName::new(target).unwrap(),
            access: AccessLevel::Read,
            reason: "test".into(),
            created_by: UserName::new("admin").unwrap(),
            created_at: now,
            expires_at: now + Duration::from_secs(secs),
        };
        self.admission.grants.apply(&Change::GrantCreated(g.clone()));
        g
    }

    fn identity(&self, user: &str, cert_secs: u64) -> Identity {
        Identity {
            user: UserName::new(user).unwrap(),
            roles: Vec::new(),
            not_after: self.clock.now() + Duration::from_secs(cert_secs),
            enrolled_until: None,
        }
    }

    fn admit(&self, identity: &Identity, target: &str) -> Result<Lease, Refusal> {
        let target = TargetName::new(target).unwrap();
        self.admission.admit(Ask {
            identity,
            target: &target,
            protocol: Protocol::Postgres,
            client_addr: "127.0.0.1:40000".parse().unwrap(),
            database: None,
        })
    }
}

/// Lets spawned tasks (the expiry loop) run.
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

/// The cut's reason if it has resolved by now (one poll).
fn cut_now(lease: &Lease) -> Option<SessionEndReason> {
    let mut cut = std::pin::pin!(lease.cut());
    match cut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(reason) => Some(reason),
        Poll::Pending => None,
    }
}

#[tokio::test(start_paused = true)]
async fn refusals_name_their_reason_in_order() {
    let c = core(1);
    let alice = c.identity("alice", 3600);
    assert_eq!(c.admit(&alice, "nope").unwrap_err().reason, Reason::UnknownTarget);
    assert_eq!(c.admit(&alice, "prod-db").unwrap_err().reason, Reason::NoGrant);
    c.grant("alice", "prod-db", 600);
    let expired_cert = Identity {
        not_after: c.clock.now(),
        enrolled_until: None,
        ..alice.clone()
    };
    let r = c.admit(&expired_cert, "prod-db").unwrap_err();
    assert_eq!(r.reason, Reason::CertExpired);
    assert!(r.hint.is_some());
    let lease = c.admit(&alice, "prod-db").unwrap();
    // The per-user limit is checked first, whatever else is wrong.
    assert_eq!(c.admit(&alice, "nope").unwrap_err().reason, Reason::MaxSessionsPerUser);
    assert!(Reason::MaxSessionsPerUser.is_limit());
    drop(lease);
    assert!(c.admit(&alice, "prod-db").is_ok(), "dropping a lease frees its slot");
}

#[tokio::test(start_paused = true)]
async fn no_session_is_admitted_while_the_table_resyncs() {
    let c = core(4);
    c.grant("alice", "prod-db", 600);
    let alice = c.identity("alice", 3600);
    c.admission.grants.set_resyncing(true);
    let r = c.admit(&alice, "prod-db").unwrap_err();
    assert_eq!(r.reason, Reason::Resyncing);
    assert_eq!(crate::pg::sqlstate::Sqlstate::of(r.reason).as_str(), "57P03");
    c.admission.grants.set_resyncing(false);
    assert!(c.admit(&alice, "prod-db").is_ok());
}

#[test]
fn a_cancel_key_names_its_replica() {
    let sessions = Arc::new(Sessions::new(Some("replica-b".into())));
    let tag = crate::sessions::cancel_tag("replica-b");
    for _ in 0..200 {
        let reg = sessions.register(crate::sessions::NewSession {
            meta: crate::model::SessionMeta {
                id: crate::model::SessionId::generate(),
                grant_id: GrantId::generate(),
                user: UserName::new("alice").unwrap(),
                roles: Vec::new(),
                target: TargetName::new("prod-db").unwrap(),
                database: "app".into(),
                access: AccessLevel::Read,
                client_addr: "127.0.0.1:40000".parse().unwrap(),
                upstream_role: "jit_reader".into(),
            },
            cut_parent: CancellationToken::new(),
        });
        let key = reg.handle().cancel_key;
        assert!(key.process_id > 0);
        assert_eq!(crate::sessions::tag_of(key), tag);
        assert!(sessions.issued_here(key));
    }
    // Alone, every key is this proxy's.
    let alone = Sessions::default();
    assert!(alone.issued_here(crate::sessions::CancelKey {
        process_id: 12345,
        secret_key: 1
    }));
}

#[tokio::test(start_paused = true)]
async fn a_lease_registers_its_session_until_dropped() {
    let c = core(4);
    c.grant("alice", "prod-db", 600);
    let lease = c.admit(&c.identity("alice", 3600), "prod-db").unwrap();
    assert!(c.admission.sessions.list().is_empty(), "not listed while logging in");
    assert!(c.admission.sessions.kill(&lease.session().meta.id), "but it can be cut");
    lease.session().set_established();
    let listed = c.admission.sessions.list();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, lease.session().meta.id);
    assert_eq!(listed[0].database, "app", "the target's default database");
    drop(lease);
    assert!(c.admission.sessions.list().is_empty());
}

#[tokio::test(start_paused = true)]
async fn the_lease_dials_its_own_target_only() {
    let c = core(4);
    c.grant("alice", "prod-db", 600);
    let lease = c.admit(&c.identity("alice", 3600), "prod-db").unwrap();
    lease.dial().await.unwrap();
    assert_eq!(*c.dialer.0.lock().unwrap(), ["10.0.0.1:5432"]);
    assert_eq!(lease.target().name.as_str(), "prod-db");
}

#[tokio::test(start_paused = true)]
async fn expiry_cuts_at_the_deadline_and_not_before() {
    let c = core(4);
    c.grant("alice", "prod-db", 60);
    let lease = c.admit(&c.identity("alice", 3600), "prod-db").unwrap();
    tokio::time::advance(Duration::from_millis(59_999)).await;
    settle().await;
    assert_eq!(cut_now(&lease), None);
    tokio::time::advance(Duration::from_millis(1)).await;
    settle().await;
    assert_eq!(cut_now(&lease), Some(SessionEndReason::GrantExpired));
}

#[tokio::test(start_paused = true)]
async fn an_extension_moves_the_cut() {
    let c = core(4);
    let g = c.grant("alice", "prod-db", 60);
    let lease = c.admit(&c.identity("alice", 3600), "prod-db").unwrap();
    let cut = tokio::spawn({
        let lease = Arc::new(lease);
        async move { (lease.cut().await, tokio::time::Instant::now()) }
    });
    let start = tokio::time::Instant::now();
    tokio::time::advance(Duration::from_secs(30)).await;
    c.admission.grants.apply(&Change::GrantExtended {
        id: g.id.clone(),
        expires_at: g.expires_at + Duration::from_secs(60),
    });
    let (reason, at) = cut.await.unwrap();
    assert_eq!(reason, SessionEndReason::GrantExpired);
    assert_eq!(at - start, Duration::from_secs(120));
}

#[tokio::test(start_paused = true)]
async fn a_revocation_cuts_every_session_of_the_grant_at_once() {
    let c = core(4);
    let g = c.grant("alice", "prod-db", 600);
    c.grant("alice", "other-db", 600);
    let alice = c.identity("alice", 3600);
    let (one, two) = (c.admit(&alice, "prod-db").unwrap(), c.admit(&alice, "prod-db").unwrap());
    let other = c.admit(&alice, "other-db").unwrap();
    c.admission.grants.apply(&Change::GrantEnded {
        id: g.id.clone(),
        end: GrantEnd::Revoked,
    });
    assert_eq!(cut_now(&one), Some(SessionEndReason::GrantRevoked));
    assert_eq!(cut_now(&two), Some(SessionEndReason::GrantRevoked));
    assert_eq!(cut_now(&other), None, "another grant's session stays");
}

#[tokio::test(start_paused = true)]
async fn a_kill_cuts_that_session_only() {
    let c = core(4);
    c.grant("alice", "prod-db", 600);
    let alice = c.identity("alice", 3600);
    let (one, two) = (c.admit(&alice, "prod-db").unwrap(), c.admit(&alice, "prod-db").unwrap());
    assert!(c.admission.sessions.kill(&one.session().meta.id));
    assert_eq!(cut_now(&one), Some(SessionEndReason::Killed));
    assert_eq!(cut_now(&two), None);
}

#[tokio::test(start_paused = true)]
async fn shutdown_cuts_every_session() {
    let c = core(4);
    c.grant("alice", "prod-db", 600);
    c.grant("bob", "other-db", 600);
    let a = c.admit(&c.identity("alice", 3600), "prod-db").unwrap();
    let b = c.admit(&c.identity("bob", 3600), "other-db").unwrap();
    c.shutdown.cancel();
    assert_eq!(cut_now(&a), Some(SessionEndReason::Shutdown));
    assert_eq!(cut_now(&b), Some(SessionEndReason::Shutdown));
}

#[tokio::test(start_paused = true)]
async fn the_certificate_end_cuts_before_the_grant_end() {
    let c = core(4);
    c.grant("alice", "prod-db", 600);
    let lease = c.admit(&c.identity("alice", 90), "prod-db").unwrap();
    tokio::time::advance(Duration::from_secs(89)).await;
    assert_eq!(cut_now(&lease), None);
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(cut_now(&lease), Some(SessionEndReason::CertExpired));
}

#[tokio::test(start_paused = true)]
async fn the_notice_comes_lead_before_the_deadline_and_again_after_an_extension() {
    let c = core(4);
    let g = c.grant("alice", "prod-db", 600);
    let lease = c.admit(&c.identity("alice", 3600), "prod-db").unwrap();
    assert!(lease.notice(Duration::ZERO).is_none(), "a zero lead turns notices off");
    let mut notice = lease.notice(Duration::from_secs(60)).unwrap();
    let mut poll = || notice.poll_due(&mut Context::from_waker(Waker::noop()));
    tokio::time::advance(Duration::from_secs(539)).await;
    assert!(poll().is_pending());
    tokio::time::advance(Duration::from_secs(1)).await;
    let Poll::Ready(d) = poll() else {
        panic!("notice not due at deadline - lead")
    };
    assert_eq!(d.at, g.expires_at);
    assert!(poll().is_pending(), "once per deadline");
    let later = g.expires_at + Duration::from_secs(600);
    c.admission.grants.apply(&Change::GrantExtended {
        id: g.id.clone(),
        expires_at: later,
    });
    assert!(poll().is_pending(), "the new deadline is 10 minutes away");
    tokio::time::advance(Duration::from_secs(600)).await;
    let Poll::Ready(d) = poll() else {
        panic!("no notice for the new deadline")
    };
    assert_eq!(d.at, later);
}

#[test]
fn the_expiry_check_uses_the_clock_not_the_system_time() {
    // A clock set an hour back: a certificate that the system clock says has expired is
    // still valid on the proxy's clock. (Guards that admission reads `self.clock`.)
    #[derive(Debug)]
    struct Behind;
    impl Clock for Behind {
        fn now(&self) -> SystemTime {
            SystemTime::now() - Duration::from_secs(3600)
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = core(4);
        c.admission.clock = Arc::new(Behind);
        c.grant("alice", "prod-db", 600);
        let id = Identity {
            user: UserName::new("alice").unwrap(),
            roles: Vec::new(),
            not_after: SystemTime::now() - Duration::from_secs(60),
            enrolled_until: None,
        };
        assert!(c.admit(&id, "prod-db").is_ok());
    });
}
