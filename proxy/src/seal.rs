//! Sealed values: a serializable value as base64url JSON followed by `.` and the base64url
//! HMAC-SHA256 of that text, so a holder can carry it and give it back but not change or
//! forge it (it is readable, not encrypted). Login handles and Slack link offers use it.

use base64::Engine as _;
use serde::de::DeserializeOwned;
use serde::Serialize;

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
}

/// Seals and unseals values under one key.
pub struct Sealer(ring::hmac::Key);

impl Sealer {
    pub fn new(key: &[u8]) -> Self {
        Self(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key))
    }

    pub fn seal<T: Serialize>(&self, value: &T) -> String {
        let body = b64().encode(serde_json::to_vec(value).unwrap_or_default());
        let tag = ring::hmac::sign(&self.0, body.as_bytes());
        format!("{body}.{}", b64().encode(tag.as_ref()))
    }

    /// The value, when `sealed` is one this key sealed and reads as a `T`.
    pub fn unseal<T: DeserializeOwned>(&self, sealed: &str) -> Option<T> {
        let (body, tag) = sealed.split_once('.')?;
        let tag = b64().decode(tag).ok()?;
        ring::hmac::verify(&self.0, body.as_bytes(), &tag).ok()?;
        serde_json::from_slice(&b64().decode(body).ok()?).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_value_comes_back_and_any_edit_or_other_key_is_refused() {
        let s = Sealer::new(b"key one");
        let sealed = s.seal(&("alice", 42u32));
        assert_eq!(s.unseal::<(String, u32)>(&sealed), Some(("alice".into(), 42)));
        assert_eq!(Sealer::new(b"key two").unseal::<(String, u32)>(&sealed), None);
        let (body, tag) = sealed.split_once('.').unwrap();
        let forged = format!("{}.{tag}", b64().encode(br#"["alice",43]"#));
        assert_eq!(s.unseal::<(String, u32)>(&forged), None);
        assert_eq!(s.unseal::<(String, u32)>(&format!("{body}x.{tag}")), None);
        assert_eq!(s.unseal::<(String, u32)>(body), None);
        assert_eq!(s.unseal::<String>(&sealed), None, "another type");
    }
}
