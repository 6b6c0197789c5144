//! Single sign-on refusals end to end, against a scripted identity provider on loopback: it
//! serves discovery, its keys, the device authorization and token endpoints, and hands out
//! exactly the ID token each case needs (another issuer, another audience, expired, a
//! replayed nonce, a forged signature): corners a real provider will not produce on demand.
//! The real CLI runs the device flow; the proxy must refuse, say why, and record
//! `login.refused` with the reason. The certified provider's happy paths are in `oidc.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use base64::Engine as _;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use jitgate_tests::{run_jitgate, CliRun, Harness};
use jsonwebtoken::{EncodingKey, Header};
use serde_json::{json, Value};

const CLIENT: &str = "jitgate-cli";

/// What the token endpoint answers with, given the nonce of the device request.
type Mint = Box<dyn Fn(&Idp, &str) -> String + Send + Sync>;

/// Mints the ID token a refusal case answers with, given the login's nonce.
type MintToken = dyn Fn(&Idp, &str) -> String + Send + Sync;

/// The scripted provider.
struct Idp {
    addr: SocketAddr,
    key: EncodingKey,
    /// A second key, not in the JWKS (forgeries).
    other: EncodingKey,
    jwk: Value,
    /// Nonces received at the device endpoint, by device code.
    nonces: Mutex<HashMap<String, String>>,
    /// Polls seen per device code (the first one answers authorization_pending).
    polls: Mutex<HashMap<String, u32>>,
    /// Tokens handed out, in order.
    minted: Mutex<Vec<String>>,
    mint: Mutex<Mint>,
    /// Form bodies the token endpoint received.
    token_requests: Mutex<Vec<String>>,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn es256() -> (EncodingKey, [u8; 65]) {
    use ring::signature::KeyPair as _;
    let rng = ring::rand::SystemRandom::new();
    let alg = &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING;
    let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
    let pair = ring::signature::EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap();
    let mut point = [0u8; 65];
    point.copy_from_slice(pair.public_key().as_ref());
    (EncodingKey::from_ec_der(pkcs8.as_ref()), point)
}

impl Idp {
    fn issuer(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Claims of a good token for `nonce`, with `groups`.
    fn claims(&self, nonce: &str, groups: &[&str]) -> serde_json::Map<String, Value> {
        let n = now();
        json!({
            "iss": self.issuer(), "aud": CLIENT, "sub": "sub-alice", "iat": n, "exp": n + 300,
            "nonce": nonce, "email": "alice@example.com", "email_verified": true, "groups": groups,
        })
        .as_object()
        .unwrap()
        .clone()
    }

    fn sign(&self, claims: &serde_json::Map<String, Value>) -> String {
        let mut header = Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some("k1".into());
        jsonwebtoken::encode(&header, claims, &self.key).unwrap()
    }

    fn forge(&self, claims: &serde_json::Map<String, Value>) -> String {
        let mut header = Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some("k1".into());
        jsonwebtoken::encode(&header, claims, &self.other).unwrap()
    }

    fn set(&self, mint: impl Fn(&Idp, &str) -> String + Send + Sync + 'static) {
        *self.mint.lock().unwrap() = Box::new(mint);
    }

    async fn start() -> Arc<Idp> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (key, point) = es256();
        let (other, _) = es256();
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let idp = Arc::new(Idp {
            addr: listener.local_addr().unwrap(),
            key,
            other,
            jwk: json!({"kty": "EC", "crv": "P-256", "kid": "k1", "use": "sig", "alg": "ES256",
                        "x": b64.encode(&point[1..33]), "y": b64.encode(&point[33..65])}),
            nonces: Mutex::new(HashMap::new()),
            polls: Mutex::new(HashMap::new()),
            minted: Mutex::new(Vec::new()),
            mint: Mutex::new(Box::new(|idp: &Idp, nonce: &str| {
                idp.sign(&idp.claims(nonce, &["db-admins"]))
            })),
            token_requests: Mutex::new(Vec::new()),
        });
        let serving = Arc::clone(&idp);
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let idp = Arc::clone(&serving);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let idp = Arc::clone(&idp);
                        async move { Ok::<_, Infallible>(idp.answer(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        idp
    }

    async fn answer(&self, req: hyper::Request<hyper::body::Incoming>) -> hyper::Response<Full<bytes::Bytes>> {
        let path = req.uri().path().to_owned();
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let form: HashMap<String, String> = String::from_utf8_lossy(&body)
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), decode(v)))
            .collect();
        let issuer = self.issuer();
        let (status, value) = match path.as_str() {
            "/.well-known/openid-configuration" => (
                200,
                json!({
                    "issuer": issuer,
                    "authorization_endpoint": format!("{issuer}/auth"),
                    "token_endpoint": format!("{issuer}/token"),
                    "jwks_uri": format!("{issuer}/jwks"),
                    "device_authorization_endpoint": format!("{issuer}/device/auth"),
                }),
            ),
            "/jwks" => (200, json!({"keys": [self.jwk]})),
            "/device/auth" => {
                let code = format!("dc-{}", self.nonces.lock().unwrap().len());
                let nonce = form.get("nonce").cloned().unwrap_or_default();
                self.nonces.lock().unwrap().insert(code.clone(), nonce);
                (
                    200,
                    json!({"device_code": code, "user_code": "WDJB-MJHT",
                           "verification_uri": format!("{issuer}/device"), "expires_in": 60, "interval": 1}),
                )
            }
            "/token" => {
                self.token_requests
                    .lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&body).into_owned());
                let code = form.get("device_code").cloned().unwrap_or_default();
                let polls = {
                    let mut p = self.polls.lock().unwrap();
                    let n = p.entry(code.clone()).or_insert(0);
                    *n += 1;
                    *n
                };
                let nonce = self.nonces.lock().unwrap().get(&code).cloned();
                match (nonce, polls) {
                    (None, _) => (400, json!({"error": "invalid_grant"})),
                    (Some(_), 1) => (400, json!({"error": "authorization_pending"})),
                    (Some(nonce), _) => {
                        let token = (self.mint.lock().unwrap())(self, &nonce);
                        self.minted.lock().unwrap().push(token.clone());
                        (
                            200,
                            json!({"access_token": "at", "token_type": "Bearer", "id_token": token}),
                        )
                    }
                }
            }
            _ => (404, json!({"error": "not_found"})),
        };
        hyper::Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(bytes::Bytes::from(value.to_string())))
            .unwrap()
    }
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                out.push(u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap(), 16).unwrap());
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap()
}

/// A proxy whose `[oidc]` is the scripted provider.
async fn proxy(idp: &Idp) -> Harness {
    // The proxy keeps the client secret: the provider sees it, the CLI never does.
    std::env::set_var("JITGATE_TEST_OIDC_SECRET", "s3cret-for-the-proxy");
    let mut h = Harness::start().await;
    h.reconfigure(&format!(
        "[oidc]\nissuer = \"{}\"\nclient_id = \"{CLIENT}\"\nclient_secret_env = \"JITGATE_TEST_OIDC_SECRET\"\nscopes = [\"openid\", \"email\", \"groups\"]\n[oidc.roles]\n\"db-admins\" = [\"dba\", \"approver\"]\n",
        idp.issuer()
    ))
    .await;
    h
}

async fn login(h: &Harness, home: &std::path::Path) -> CliRun {
    let fp =
        jitgate_tests::jitgate::pki::cert_fingerprint(&std::fs::read_to_string(h.data_dir().join("ca.crt")).unwrap())
            .unwrap();
    let home = home.display().to_string();
    let proxy = format!("https://127.0.0.1:{}", h.addrs().api.port());
    run_jitgate(
        &["login", "--proxy", &proxy, "--ca-fingerprint", &fp],
        &[("HOME", home.as_str())],
    )
    .await
}

/// The reasons of the `login.refused` records so far.
fn refusals(h: &Harness) -> Vec<String> {
    h.audit_events("login.refused")
        .iter()
        .map(|r| r["reason"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn every_bad_id_token_is_refused_with_its_reason_and_a_good_one_gets_a_certificate() {
    let idp = Idp::start().await;
    let h = proxy(&idp).await;
    let home = tempfile::tempdir().unwrap();

    // The good path first: the device flow with one authorization_pending poll.
    let run = login(&h, home.path()).await;
    assert!(run.ok, "{run:?}");
    assert!(run.stderr.contains("enter the code WDJB-MJHT"), "{run:?}");
    assert!(
        run.stdout
            .contains("logged in as alice@example.com (roles: dba, approver)"),
        "{run:?}"
    );
    let ok = h.audit_events("login.succeeded");
    assert_eq!(ok.len(), 1);
    assert_eq!(
        (ok[0]["method"].as_str(), ok[0]["subject"].as_str()),
        (Some("oidc"), Some("sub-alice"))
    );
    let requests = idp.token_requests.lock().unwrap().clone();
    assert!(
        requests
            .iter()
            .all(|r| r.contains("client_secret=s3cret-for-the-proxy")),
        "{requests:?}"
    );
    assert!(!run.stdout.contains("s3cret") && !run.stderr.contains("s3cret"));

    let cases: Vec<(&str, Box<MintToken>)> = vec![
        (
            "issued by another issuer",
            Box::new(|idp: &Idp, n: &str| {
                let mut c = idp.claims(n, &["db-admins"]);
                c.insert("iss".into(), json!("http://127.0.0.1:1/other"));
                idp.sign(&c)
            }),
        ),
        (
            "for another audience",
            Box::new(|idp: &Idp, n: &str| {
                let mut c = idp.claims(n, &["db-admins"]);
                c.insert("aud".into(), json!("some-other-app"));
                idp.sign(&c)
            }),
        ),
        (
            "has expired",
            Box::new(|idp: &Idp, n: &str| {
                let mut c = idp.claims(n, &["db-admins"]);
                c.insert("iat".into(), json!(now() - 900));
                c.insert("exp".into(), json!(now() - 300));
                idp.sign(&c)
            }),
        ),
        (
            "signature does not verify",
            Box::new(|idp: &Idp, n: &str| idp.forge(&idp.claims(n, &["db-admins"]))),
        ),
        (
            "no group of alice@example.com maps to a jitgate role (groups: contractors",
            Box::new(|idp: &Idp, n: &str| idp.sign(&idp.claims(n, &["contractors"]))),
        ),
        (
            // The first login's token, replayed into a new login: its nonce is not this one's.
            "nonce is not this login's",
            Box::new(|idp: &Idp, _n: &str| idp.minted.lock().unwrap()[0].clone()),
        ),
    ];
    for (i, (reason, mint)) in cases.into_iter().enumerate() {
        idp.set(mint);
        let other = tempfile::tempdir().unwrap();
        let run = login(&h, other.path()).await;
        assert!(!run.ok, "{reason}: {run:?}");
        assert!(run.stderr.contains("login refused"), "{reason}: {run:?}");
        assert!(run.stderr.contains(reason), "{reason}: {run:?}");
        assert!(!other.path().join(".jitgate/cert.pem").exists(), "{reason}");
        let recorded = refusals(&h);
        assert_eq!(recorded.len(), i + 1, "{recorded:?}");
        assert!(recorded[i].contains(reason), "{reason}: {recorded:?}");
    }
    // Only the one good login got a certificate.
    assert_eq!(h.audit_events("login.succeeded").len(), 1);
}

#[tokio::test]
async fn a_login_handle_is_used_once_and_cannot_be_forged() {
    let idp = Idp::start().await;
    let h = proxy(&idp).await;
    let fp =
        jitgate_tests::jitgate::pki::cert_fingerprint(&std::fs::read_to_string(h.data_dir().join("ca.crt")).unwrap())
            .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(jitgate_protocol::pin::PinnedCa::new(&fp, provider)))
        .with_no_client_auth();
    let api = jitgate_tests::jitgate::client::ApiClient::with_tls(&h.addrs().api.to_string(), cfg);
    let started: jitgate_tests::jitgate::login::DeviceStarted = api.post("/v1/login/device", &()).await.unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    let poll = |login: String| jitgate_tests::jitgate::login::DeviceToken {
        login,
        csr: csr.clone(),
    };
    let first = api
        .post::<_, jitgate_tests::jitgate::login::Issued>("/v1/login/device/token", &poll(started.login.clone()))
        .await;
    assert!(
        matches!(&first, Err(jitgate_tests::jitgate::client::ClientError::Api { code, .. }) if code == "authorization_pending"),
        "{:?}",
        first.map(|i| i.user)
    );
    let issued: jitgate_tests::jitgate::login::Issued = api
        .post("/v1/login/device/token", &poll(started.login.clone()))
        .await
        .unwrap();
    assert_eq!(issued.user.as_str(), "alice@example.com");
    // The same handle again (the provider would even answer): refused as a replay.
    let again = api
        .post::<_, jitgate_tests::jitgate::login::Issued>("/v1/login/device/token", &poll(started.login.clone()))
        .await;
    match again {
        Err(jitgate_tests::jitgate::client::ClientError::Api { code, message, .. }) => {
            assert_eq!(code, "refused");
            assert!(message.contains("replayed nonce"), "{message}");
        }
        other => panic!("replay accepted: {:?}", other.map(|i| i.user)),
    }
    // A handle with its sealed part edited (another device code) fails its MAC.
    let (body, tag) = started.login.split_once('.').unwrap();
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut pending: Value = serde_json::from_slice(&b64.decode(body).unwrap()).unwrap();
    pending["device_code"] = json!("dc-99");
    pending["nonce"] = json!("n-forged");
    let edited = format!("{}.{tag}", b64.encode(serde_json::to_vec(&pending).unwrap()));
    let forged = api
        .post::<_, jitgate_tests::jitgate::login::Issued>("/v1/login/device/token", &poll(edited))
        .await;
    assert!(
        matches!(&forged, Err(jitgate_tests::jitgate::client::ClientError::Api { status: 400, message, .. }) if message.contains("unknown login")),
        "{:?}",
        forged.map(|i| i.user)
    );
}
