//! Unit tests of ID token verification (tokens made here with a test key: the refusals a real
//! provider will not produce on demand), claim mapping, login handles and redirect URIs.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{EncodingKey, Header};
use serde_json::{json, Map, Value};

use super::oidc::{person, verify_token, Nonce};
use super::*;
use crate::config::OidcConfig;

const ISSUER: &str = "http://127.0.0.1:9/idp";
const CLIENT: &str = "jitgate-cli";

/// An ES256 key: the encoding key, and the JWKS that publishes it as `kid`.
fn key(kid: &str) -> (EncodingKey, JwkSet) {
    let rng = ring::rand::SystemRandom::new();
    let alg = &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING;
    let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
    let pair = ring::signature::EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap();
    use ring::signature::KeyPair as _;
    let point = pair.public_key().as_ref();
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let jwks: JwkSet = serde_json::from_value(json!({"keys": [{
        "kty": "EC", "crv": "P-256", "kid": kid, "use": "sig", "alg": "ES256",
        "x": b64.encode(&point[1..33]), "y": b64.encode(&point[33..65]),
    }]}))
    .unwrap();
    (EncodingKey::from_ec_der(pkcs8.as_ref()), jwks)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims() -> Map<String, Value> {
    let n = now();
    json!({
        "iss": ISSUER, "aud": CLIENT, "sub": "u-1", "iat": n, "exp": n + 300,
        "nonce": "n-1", "email": "Alice@Example.com", "email_verified": true,
        "groups": ["db-admins", "staff"],
    })
    .as_object()
    .unwrap()
    .clone()
}

fn sign(key: &EncodingKey, kid: &str, claims: &Map<String, Value>) -> String {
    let mut header = Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some(kid.into());
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

fn with(mut c: Map<String, Value>, k: &str, v: Value) -> Map<String, Value> {
    c.insert(k.into(), v);
    c
}

#[test]
fn a_good_token_verifies_and_every_wrong_claim_is_refused_with_its_reason() {
    let (k, jwks) = key("k1");
    let ok = verify_token(
        &jwks,
        ISSUER,
        CLIENT,
        Nonce::Required("n-1"),
        &sign(&k, "k1", &claims()),
    )
    .unwrap();
    assert_eq!(ok["sub"], "u-1");

    let refused = |c: Map<String, Value>| {
        verify_token(&jwks, ISSUER, CLIENT, Nonce::Required("n-1"), &sign(&k, "k1", &c)).unwrap_err()
    };
    assert!(refused(with(claims(), "iss", json!("http://evil/"))).contains("another issuer"));
    assert!(refused(with(claims(), "aud", json!("other-app"))).contains("another audience"));
    assert!(refused(with(claims(), "exp", json!(now() - 120))).contains("expired"));
    assert!(refused(with(claims(), "nbf", json!(now() + 600))).contains("not valid yet"));
    assert!(refused(with(claims(), "nonce", json!("n-0"))).contains("nonce is not this login's"));
    let mut no_nonce = claims();
    no_nonce.remove("nonce");
    assert!(refused(no_nonce.clone()).contains("no nonce"));
    // Device flow: the proxy fetched the token itself, so a missing nonce is accepted, a wrong
    // one never is.
    let device =
        |c: &Map<String, Value>| verify_token(&jwks, ISSUER, CLIENT, Nonce::IfPresent("n-1"), &sign(&k, "k1", c));
    assert!(device(&no_nonce).is_ok());
    assert!(device(&claims()).is_ok());
    assert!(device(&with(claims(), "nonce", json!("n-0")))
        .unwrap_err()
        .contains("nonce is not this login's"));
    assert!(device(&with(claims(), "nonce", json!(1))).is_err());
    let mut no_exp = claims();
    no_exp.remove("exp");
    assert!(refused(no_exp).contains("exp"));
    // Several audiences: azp must be this client.
    let multi = with(claims(), "aud", json!([CLIENT, "other-app"]));
    assert!(refused(multi.clone()).contains("azp"));
    assert!(verify_token(
        &jwks,
        ISSUER,
        CLIENT,
        Nonce::Required("n-1"),
        &sign(&k, "k1", &with(multi, "azp", json!(CLIENT)))
    )
    .is_ok());
}

#[test]
fn signatures_from_other_keys_and_unsigned_tokens_are_refused() {
    let (k, jwks) = key("k1");
    let (other, _) = key("k1");
    let forged = sign(&other, "k1", &claims());
    assert!(verify_token(&jwks, ISSUER, CLIENT, Nonce::Required("n-1"), &forged)
        .unwrap_err()
        .contains("signature"));
    let unknown = sign(&k, "k9", &claims());
    assert!(verify_token(&jwks, ISSUER, CLIENT, Nonce::Required("n-1"), &unknown)
        .unwrap_err()
        .contains("not among"));
    // alg "none": header and payload with an empty signature.
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let none = format!(
        "{}.{}.",
        b64.encode(br#"{"alg":"none","kid":"k1"}"#),
        b64.encode(serde_json::to_vec(&claims()).unwrap())
    );
    assert!(verify_token(&jwks, ISSUER, CLIENT, Nonce::Required("n-1"), &none).is_err());
    // HS256 signed with the public key's bytes as the secret (the key-confusion attack).
    let hs = jsonwebtoken::encode(
        &Header {
            kid: Some("k1".into()),
            ..Header::new(jsonwebtoken::Algorithm::HS256)
        },
        &claims(),
        &EncodingKey::from_secret(b"x"),
    )
    .unwrap();
    assert!(verify_token(&jwks, ISSUER, CLIENT, Nonce::Required("n-1"), &hs)
        .unwrap_err()
        .contains("not accepted"));
    assert!(verify_token(&jwks, ISSUER, CLIENT, Nonce::Required("n-1"), "not.a.jwt").is_err());
}

fn oidc_config() -> OidcConfig {
    let mut roles = BTreeMap::new();
    roles.insert(
        "db-admins".to_owned(),
        vec![Role::new("dba").unwrap(), Role::new("approver").unwrap()],
    );
    roles.insert(
        "staff".to_owned(),
        vec![Role::new("dev").unwrap(), Role::new("approver").unwrap()],
    );
    OidcConfig {
        issuer: ISSUER.into(),
        client_id: CLIENT.into(),
        client_secret: None,
        scopes: vec!["openid".into()],
        user_claim: "email".into(),
        groups_claim: "groups".into(),
        roles,
        allowed_domains: None,
        max_cert_ttl: Duration::from_secs(3600),
        ca_file: None,
        console_redirect_uri: None,
    }
}

#[test]
fn groups_map_to_roles_once_each_and_an_unmapped_login_is_refused() {
    let cfg = oidc_config();
    let p = person(&cfg, &claims()).unwrap();
    assert_eq!(p.user.as_str(), "alice@example.com");
    let roles: Vec<_> = p.roles.iter().map(Role::as_str).collect();
    assert_eq!(roles, ["dba", "approver", "dev"]);

    let err = person(&cfg, &with(claims(), "groups", json!(["contractors"]))).unwrap_err();
    assert!(
        err.contains("no group of alice@example.com maps to a jitgate role"),
        "{err}"
    );
    assert!(err.contains("contractors"), "{err}");
    let mut none = claims();
    none.remove("groups");
    assert!(person(&cfg, &none).unwrap_err().contains("no groups claim"));
    // A single string is one group.
    assert!(person(&cfg, &with(claims(), "groups", json!("staff"))).is_ok());
    // A user claim that is no jitgate name is refused, not mangled.
    assert!(person(&cfg, &with(claims(), "email", json!("a b@x"))).is_err());
}

#[test]
fn allowed_domains_need_a_verified_email_in_them() {
    let cfg = OidcConfig {
        allowed_domains: Some(vec!["example.com".into()]),
        ..oidc_config()
    };
    assert!(person(&cfg, &claims()).is_ok());
    let err = person(&cfg, &with(claims(), "email", json!("alice@evil.com"))).unwrap_err();
    assert!(err.contains("not in an allowed domain"), "{err}");
    let err = person(&cfg, &with(claims(), "email_verified", json!(false))).unwrap_err();
    assert!(err.contains("not verified"), "{err}");
    // A look-alike suffix is another domain.
    assert!(person(&cfg, &with(claims(), "email", json!("a@notexample.com"))).is_err());
}

#[test]
fn only_loopback_http_redirects_are_accepted() {
    assert!(loopback_redirect("http://127.0.0.1:5555/callback"));
    assert!(loopback_redirect("http://localhost:1/"));
    assert!(loopback_redirect("http://[::1]:80/cb"));
    for bad in [
        "https://127.0.0.1:5555/callback",
        "http://127.0.0.1/callback",
        "http://127.0.0.1.evil.com:80/",
        "http://evil.com:80/",
        "http://127.0.0.1:80@evil.com/",
        "javascript:alert(1)",
    ] {
        assert!(!loopback_redirect(bad), "{bad}");
    }
}
