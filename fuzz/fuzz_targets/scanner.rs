//! The server-side `Scanner` (`postgres::scanner`) under arbitrary chunking.
//!
//! Input: four bytes that seed how the stream is cut into reads, then the server's bytes.
//! The stream is fed to a `Scanner` read by read and compared with a plain whole-buffer
//! framing of the same bytes. Checked: the same `Start`/`End` pieces in the same order
//! whatever the chunking; captured bodies are the message's own first `MAX_CAPTURE` bytes;
//! the `Bytes` pieces add up to exactly the bytes consumed (all but an incomplete header); a length below 4 is an error at
//! exactly that message; `at_boundary` and `bytes_to_boundary` tell where the stream stopped.
#![no_main]

use jitgate_protocol::postgres::scanner::{Piece, Scanner, MAX_CAPTURE};
use libfuzzer_sys::fuzz_target;

/// The tags the relay captures (`pg/relay.rs` `OBSERVED`).
const CAPTURED: &[u8] = b"CES";

#[derive(Debug, PartialEq, Eq)]
enum Event {
    Start { tag: u8, len: usize },
    End { tag: u8, body: Vec<u8> },
}

/// Whole-buffer framing of `stream`.
struct Framing {
    events: Vec<Event>,
    /// Where a header with a length below 4 starts, if one does.
    bad_at: Option<usize>,
    /// Bytes still needed to reach the next boundary.
    needed: usize,
    /// Bytes reported as `Bytes`: all but those of an incomplete header, which the scanner
    /// holds until the header is whole.
    reported: usize,
}

fn model(stream: &[u8]) -> Framing {
    let mut events = Vec::new();
    let mut pos = 0;
    while stream.len() - pos >= 5 {
        let tag = stream[pos];
        let len = u32::from_be_bytes([stream[pos + 1], stream[pos + 2], stream[pos + 3], stream[pos + 4]]) as usize;
        if len < 4 {
            return Framing {
                events,
                bad_at: Some(pos),
                needed: 0,
                reported: pos,
            };
        }
        events.push(Event::Start { tag, len: len + 1 });
        let end = pos + 1 + len;
        if end > stream.len() {
            return Framing {
                events,
                bad_at: None,
                needed: end - stream.len(),
                reported: stream.len(),
            };
        }
        let body = if CAPTURED.contains(&tag) {
            let body = &stream[pos + 5..end];
            body[..body.len().min(MAX_CAPTURE)].to_vec()
        } else {
            Vec::new()
        };
        events.push(Event::End { tag, body });
        pos = end;
    }
    let partial_header = stream.len() - pos;
    Framing {
        events,
        bad_at: None,
        needed: if partial_header == 0 { 0 } else { 5 - partial_header },
        reported: pos,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((seed, stream)) = data.split_first_chunk::<4>() else {
        return;
    };
    let mut rng = u32::from_le_bytes(*seed) | 1;
    let max_read = (rng % 97 + 1) as usize;
    let mut next_read = || {
        rng ^= rng << 13;
        rng ^= rng >> 17;
        rng ^= rng << 5;
        (rng as usize % max_read) + 1
    };

    let mut scanner = Scanner::new(CAPTURED);
    let mut events = Vec::new();
    let mut bytes = Vec::new();
    let mut failed = false;
    let mut rest = stream;
    while !rest.is_empty() {
        let (read, tail) = rest.split_at(next_read().min(rest.len()));
        rest = tail;
        let fed = scanner.feed(read, |piece| match piece {
            Piece::Start { tag, len } => events.push(Event::Start { tag, len }),
            Piece::Bytes(b) => bytes.extend_from_slice(b),
            Piece::End { tag, body } => events.push(Event::End {
                tag,
                body: body.to_vec(),
            }),
        });
        if fed.is_err() {
            failed = true;
            break;
        }
    }

    let Framing {
        events: expected,
        bad_at,
        needed,
        reported,
    } = model(stream);
    assert_eq!(events, expected, "pieces differ from whole-buffer framing");
    match bad_at {
        Some(at) => {
            assert!(failed, "a length below 4 at {at} was not refused");
            assert_eq!(bytes, &stream[..at], "bytes before the bad header");
        }
        None => {
            assert!(!failed, "refused a well-framed stream");
            assert_eq!(bytes, &stream[..reported], "bytes reported are not the stream");
            assert_eq!(scanner.at_boundary(), needed == 0, "at_boundary");
            assert_eq!(scanner.bytes_to_boundary(), needed, "bytes_to_boundary");
        }
    }
});
