//! The agent link's first line (`tunnel`): what any client of the agent listener sends, and
//! what an agent reads back.
//!
//! Input: one line. Checked: nothing panics; a decoded hello or answer encodes to one line
//! that decodes to the same value; a parsed join token prints as a string that parses to the
//! same token, and its `Debug` does not depend on the secret.
#![no_main]

use jitgate_protocol::tunnel::{decode_answer, decode_hello, encode, JoinToken};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(hello) = decode_hello(data) {
        let line = encode(&hello);
        assert_eq!(line.last(), Some(&b'\n'));
        assert!(!line[..line.len() - 1].contains(&b'\n'), "one line");
        assert_eq!(decode_hello(&line[..line.len() - 1]).ok(), Some(hello));
    }
    if let Ok(answer) = decode_answer(data) {
        let line = encode(&answer);
        assert!(!line[..line.len() - 1].contains(&b'\n'), "one line");
        assert_eq!(decode_answer(&line[..line.len() - 1]).ok(), Some(answer));
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(token) = text.parse::<JoinToken>() {
            assert_eq!(token.to_string().parse::<JoinToken>().ok(), Some(token.clone()));
            // Debug never depends on the secret (a substring test would trip on an id that
            // happens to contain it).
            let other = JoinToken { secret: format!("{}x", token.secret), ..token.clone() };
            assert_eq!(format!("{token:?}"), format!("{other:?}"), "Debug shows the secret");
        }
    }
});
