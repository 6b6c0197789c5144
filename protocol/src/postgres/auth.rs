//! Client side of the password authentication methods the proxy uses towards a target.

use md5::{Digest, Md5};

use super::frontend::encode_tagged;
use super::put_cstr;

/// The `PasswordMessage` for md5 authentication:
/// `"md5" || hex(md5(hex(md5(password || user)) || salt))`.
pub fn md5_password_message(user: &str, password: &str, salt: [u8; 4]) -> Vec<u8> {
    let inner = hex(&Md5::digest([password.as_bytes(), user.as_bytes()].concat()));
    let outer = hex(&Md5::digest([inner.as_bytes(), &salt[..]].concat()));
    let mut body = Vec::with_capacity(40);
    put_cstr(&mut body, &format!("md5{outer}"));
    encode_tagged(b'p', &body)
}

/// The `PasswordMessage` for cleartext authentication (only sent over TLS or loopback by
/// operator choice; the proxy never asks a client for a password).
pub fn cleartext_password_message(password: &str) -> Vec<u8> {
    let mut body = Vec::with_capacity(password.len() + 1);
    put_cstr(&mut body, password);
    encode_tagged(b'p', &body)
}

/// `SASLInitialResponse` for `mechanism` carrying `data`.
pub fn sasl_initial_response(mechanism: &str, data: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(mechanism.len() + 5 + data.len());
    put_cstr(&mut body, mechanism);
    body.extend_from_slice(&(data.len() as i32).to_be_bytes());
    body.extend_from_slice(data);
    encode_tagged(b'p', &body)
}

/// `SASLResponse` carrying `data`.
pub fn sasl_response(data: &[u8]) -> Vec<u8> {
    encode_tagged(b'p', data)
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 0xf) as usize] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_matches_postgres_reference() {
        // PostgreSQL stores md5(password || user) as "md5" || hex; for user "alice",
        // password "secret" that is md5 of "secretalice".
        let msg = md5_password_message("alice", "secret", [1, 2, 3, 4]);
        assert_eq!(msg[0], b'p');
        let text = std::str::from_utf8(&msg[5..msg.len() - 1]).unwrap();
        assert!(text.starts_with("md5"));
        assert_eq!(text.len(), 35);
        let inner = hex(&Md5::digest(b"secretalice"));
        let expected = hex(&Md5::digest([inner.as_bytes(), &[1, 2, 3, 4]].concat()));
        assert_eq!(&text[3..], expected);
    }
}
