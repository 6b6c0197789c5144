use std::time::{Duration, SystemTime};

use serde_json::Value;

use super::*;
use crate::model::{AccessLevel, TargetName};

const SECRET: &[u8] = b"8f742231b10e8888abcd99yyyzzz85a5";

fn at(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

fn request(state: &str) -> RequestInfo {
    RequestInfo {
        id: "r-42".into(),
        user: UserName::new("alice").unwrap(),
        target: TargetName::new("prod-db").unwrap(),
        access: AccessLevel::Read,
        duration_secs: 1800,
        reason: "INC-7 <!channel>\nsecond line & more".into(),
        state: state.into(),
        decided_by: Some(UserName::new("bob").unwrap()),
        grant_id: None,
        policy: "prod".into(),
        approvals: (0, 1),
    }
}

fn texts(v: &Value) -> String {
    let mut out = String::new();
    fn walk(v: &Value, out: &mut String) {
        match v {
            Value::String(s) => {
                out.push_str(s);
                out.push('\n');
            }
            Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            Value::Object(o) => o.values().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    walk(v, &mut out);
    out
}

fn actions(v: &Value) -> Vec<Value> {
    v["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["type"] == "actions")
        .flat_map(|b| b["elements"].as_array().unwrap().clone())
        .collect()
}

#[test]
fn the_signature_is_slacks_documented_hmac() {
    // Slack's documented example: secret, timestamp and body from "Verifying requests from
    // Slack", and the signature they give for them.
    let body = b"token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";
    let sig = sign(SECRET, "1531420618", body);
    assert_eq!(
        sig,
        "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503"
    );
    assert_eq!(verify(SECRET, "1531420618", &sig, body, at(1_531_420_618 + 60)), Ok(()));
}

#[test]
fn a_wrong_secret_a_changed_body_or_a_changed_timestamp_do_not_verify() {
    let now = at(1_800_000_000);
    let body = b"payload=%7B%7D";
    let sig = sign(SECRET, "1800000000", body);
    assert_eq!(verify(SECRET, "1800000000", &sig, body, now), Ok(()));
    assert_eq!(
        verify(b"another", "1800000000", &sig, body, now),
        Err(Refusal::BadSignature)
    );
    assert_eq!(
        verify(SECRET, "1800000000", &sig, b"payload=%7B%20%7D", now),
        Err(Refusal::BadSignature)
    );
    assert_eq!(
        verify(SECRET, "1800000001", &sig, body, now),
        Err(Refusal::BadSignature)
    );
    assert_eq!(
        verify(SECRET, "1800000000", "v0=", body, now),
        Err(Refusal::BadSignature)
    );
    assert_eq!(
        verify(SECRET, "1800000000", &sig.to_uppercase(), body, now),
        Err(Refusal::BadSignature)
    );
}

#[test]
fn timestamps_more_than_five_minutes_away_are_stale_either_way() {
    let body = b"payload=%7B%7D";
    let now = at(1_800_000_000);
    for (ts, ok) in [
        ("1799999700", true),
        ("1799999699", false),
        ("1800000300", true),
        ("1800000301", false),
        ("0", false),
        ("-5", false),
        ("soon", false),
        ("", false),
        ("99999999999999999999999", false),
    ] {
        let got = verify(SECRET, ts, &sign(SECRET, ts, body), body, now);
        assert_eq!(got.is_ok(), ok, "{ts}: {got:?}");
        if !ok {
            assert_eq!(got, Err(Refusal::Stale), "{ts}");
        }
    }
}

#[test]
fn user_text_cannot_mention_or_link() {
    assert_eq!(
        escape("<!channel> <@U1> <https://x|y> & co"),
        "&lt;!channel&gt; &lt;@U1&gt; &lt;https://x|y&gt; &amp; co"
    );
    assert_eq!(escape("&amp;"), "&amp;amp;");
}

#[test]
fn a_pending_request_gets_approve_and_deny_buttons_carrying_its_id() {
    let m = request_message(&request("pending"), true, None);
    let buttons = actions(&m);
    let ids: Vec<_> = buttons.iter().map(|b| b["action_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["approve", "deny"]);
    assert!(buttons.iter().all(|b| b["value"] == "r-42" && b["type"] == "button"));
    let t = texts(&m);
    assert!(t.contains("*alice* requests *read* access to *prod-db* for 30m"), "{t}");
    assert!(t.contains(">INC-7 &lt;!channel&gt;\n>second line &amp; more"), "{t}");
    assert!(!t.contains("<!channel>"), "{t}");
    assert!(t.contains("Pending: 0 of 1 approvals"), "{t}");
    assert!(m["text"]
        .as_str()
        .unwrap()
        .contains("alice requests read access to prod-db"));
}

#[test]
fn a_console_only_policy_gets_a_link_or_the_cli_command_but_no_buttons() {
    let m = request_message(&request("pending"), false, Some("https://proxy:8443/ui"));
    let buttons = actions(&m);
    assert_eq!(buttons.len(), 1);
    assert_eq!(buttons[0]["url"], "https://proxy:8443/ui/#/requests/r-42");
    assert!(buttons
        .iter()
        .all(|b| b["action_id"] != "approve" && b["action_id"] != "deny"));

    let m = request_message(&request("pending"), false, None);
    assert!(actions(&m).is_empty());
    assert!(texts(&m).contains("jitgate approve r-42"), "{m}");
}

#[test]
fn a_decided_request_has_no_buttons_and_says_who_decided() {
    for (state, says) in [
        ("approved", "Approved by bob"),
        ("denied", "Denied by bob"),
        ("withdrawn", "Withdrawn"),
        ("lapsed", "Lapsed"),
    ] {
        let m = request_message(&request(state), true, Some("https://proxy:8443/ui"));
        assert!(actions(&m).is_empty(), "{state}: {m}");
        assert!(texts(&m).contains(says), "{state}: {m}");
    }
}

#[test]
fn the_form_payload_is_percent_decoded_and_bad_escapes_are_refused() {
    assert_eq!(
        form_payload(b"payload=%7B%22a%22%3A%22b+c%22%7D").unwrap(),
        r#"{"a":"b c"}"#
    );
    assert_eq!(form_payload(b"x=1&payload=%C3%A9").unwrap(), "é");
    for bad in [
        &b"payload=%7"[..],
        b"payload=%",
        b"payload=%zz",
        b"payload=%+1",
        b"payload=%FF",
        b"nothing=here",
        b"\xff",
    ] {
        assert!(form_payload(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
    }
}
