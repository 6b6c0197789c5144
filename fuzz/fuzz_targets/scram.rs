//! The SCRAM-SHA-256 client (`postgres::scram`) against a hostile or broken server.
//!
//! Input: one mode byte, the `server-first-message`, a `0xff` byte, the
//! `server-final-message` (0xff never occurs in UTF-8, so it cannot be part of either).
//! Mode bit 0 replaces the final message with the correct one, computed here independently;
//! bit 1 then appends the input's final bytes after a comma, as extensions.
//! Checked, beside "no panic": for a server-first that follows RFC 5802's grammar, the
//! `client-final-message` carries `c=biws`, the server's nonce and a proof that an
//! independent server-side computation accepts; a server-final is accepted only when its
//! first `v=` is the server signature computed here, and the correct one is always accepted.
#![no_main]

use std::cell::RefCell;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use jitgate_protocol::postgres::scram::ScramClient;
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

const PASSWORD: &str = "pencil";
/// The client nonce of RFC 5802's example; the seeds' server nonces extend it.
const CLIENT_NONCE: &str = "fyko+d2lbbFgONRv9qkxdawL";
/// Inputs asking for more iterations are skipped: only slower, never another code path
/// (the client's own bound, 1,000,000, is a unit test).
const MAX_FUZZ_ITERATIONS: u32 = 4096;

type HmacSha256 = Hmac<Sha256>;

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(key).unwrap();
    mac.update(data);
    mac.finalize().into_bytes().into()
}

thread_local! {
    /// The last (salt, iterations) and its salted password: mutations mostly keep them.
    static SALTED: RefCell<Option<(Vec<u8>, u32, [u8; 32])>> = const { RefCell::new(None) };
}

fn salted_password(salt: &[u8], iterations: u32) -> [u8; 32] {
    SALTED.with(|cache| {
        let mut cache = cache.borrow_mut();
        if let Some((s, i, out)) = cache.as_ref() {
            if s == salt && *i == iterations {
                return *out;
            }
        }
        let mut out = [0u8; 32];
        pbkdf2::pbkdf2::<HmacSha256>(PASSWORD.as_bytes(), salt, iterations, &mut out).unwrap();
        *cache = Some((salt.to_vec(), iterations, out));
        out
    })
}

/// RFC 5802 `server-first-message`: `r=nonce,s=salt,i=count[,extensions]`, parsed strictly.
struct ServerFirst<'a> {
    nonce: &'a str,
    salt: Vec<u8>,
    iterations: u32,
}

fn strict_server_first(text: &str) -> Option<ServerFirst<'_>> {
    let mut parts = text.split(',');
    let nonce = parts.next()?.strip_prefix("r=")?;
    let salt = B64.decode(parts.next()?.strip_prefix("s=")?).ok()?;
    let count = parts.next()?.strip_prefix("i=")?;
    if count.is_empty() || !count.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let iterations = count.parse().ok()?;
    let printable = |s: &str| !s.is_empty() && s.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b',');
    if !printable(nonce) {
        return None;
    }
    for ext in parts {
        let (name, _) = ext.split_once('=')?;
        // A second r, s or i is not an extension (the client reads the last of each).
        if name.len() != 1 || !name.as_bytes()[0].is_ascii_alphabetic() || "rsi".contains(name) {
            return None;
        }
    }
    Some(ServerFirst {
        nonce,
        salt,
        iterations,
    })
}

/// What a server holding the password expects, or `None` when the client's proof is wrong.
fn server_side(first: &ServerFirst<'_>, server_first: &str, client_final: &str) -> Option<[u8; 32]> {
    let (without_proof, proof) = client_final.rsplit_once(",p=")?;
    let proof = B64.decode(proof).ok()?;
    let salted = salted_password(&first.salt, first.iterations);
    let stored_key: [u8; 32] = Sha256::digest(hmac(&salted, b"Client Key")).into();
    let auth_message = format!("n=,r={CLIENT_NONCE},{server_first},{without_proof}");
    let signature = hmac(&stored_key, auth_message.as_bytes());
    let client_key: Vec<u8> = proof.iter().zip(signature).map(|(p, s)| p ^ s).collect();
    if proof.len() != 32 || Sha256::digest(&client_key).as_slice() != stored_key {
        return None;
    }
    Some(hmac(&hmac(&salted, b"Server Key"), auth_message.as_bytes()))
}

fn too_many_iterations(server_first: &[u8]) -> bool {
    String::from_utf8_lossy(server_first).split(',').any(|part| {
        part.strip_prefix("i=")
            .and_then(|v| v.parse::<u32>().ok())
            .is_some_and(|i| i > MAX_FUZZ_ITERATIONS)
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (server_first, fuzzed_final) = match rest.iter().position(|&b| b == 0xff) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    if too_many_iterations(server_first) {
        return;
    }
    let client = ScramClient::with_nonce(PASSWORD, CLIENT_NONCE);
    assert_eq!(client.client_first(), format!("n,,n=,r={CLIENT_NONCE}").into_bytes());
    let Ok((client_final, state)) = client.handle_server_first(server_first) else {
        return;
    };
    let client_final = String::from_utf8(client_final).expect("client-final is UTF-8");

    // Accepted input was UTF-8: the client checks that first.
    let server_first = std::str::from_utf8(server_first).unwrap();
    let Some(strict) = strict_server_first(server_first) else {
        // Lenient parse of a message no real server sends: only "no panic" to check.
        let _ = state.verify_server_final(fuzzed_final);
        return;
    };
    assert!(
        strict.nonce.starts_with(CLIENT_NONCE) && strict.nonce.len() > CLIENT_NONCE.len(),
        "accepted a nonce that does not extend ours"
    );
    assert!(
        client_final.starts_with(&format!("c=biws,r={},p=", strict.nonce)),
        "client-final {client_final:?}"
    );
    let Some(expected) = server_side(&strict, server_first, &client_final) else {
        panic!("the client's proof does not verify: {client_final:?}");
    };

    if mode & 1 == 1 {
        let mut good = format!("v={}", B64.encode(expected)).into_bytes();
        if mode & 2 == 2 {
            good.push(b',');
            good.extend_from_slice(fuzzed_final);
        }
        let utf8 = std::str::from_utf8(&good).is_ok();
        assert_eq!(state.verify_server_final(&good).is_ok(), utf8, "the correct signature");
    } else if state.verify_server_final(fuzzed_final).is_ok() {
        let text = std::str::from_utf8(fuzzed_final).unwrap();
        let v = text.split(',').find_map(|p| p.strip_prefix("v=")).unwrap();
        assert_eq!(B64.decode(v).unwrap(), expected, "accepted a wrong server signature");
    }
});
