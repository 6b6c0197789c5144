//! Streaming observation of a tagged-message stream (the server's side of a session).
//!
//! The relay forwards the server's bytes as they arrive without buffering whole messages,
//! yet must know where each message starts and ends, read a few small ones whole
//! (`CommandComplete`, `ErrorResponse`, `ParameterStatus`) and be able to drop one or put a
//! message of its own between two. [`Scanner::feed`] walks a chunk and reports each piece in
//! order; state between chunks is O(1) plus the captured body of the current message.

use super::ProtocolError;

/// Largest body captured for observation; longer ones are cut (only observation suffers).
pub const MAX_CAPTURE: usize = 16 * 1024;

/// A piece of the stream, in order.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece<'a> {
    /// A message header is complete: its tag and total length (tag included). The header's
    /// five bytes follow as the first `Bytes` of the message.
    Start { tag: u8, len: usize },
    /// Raw bytes of the current message.
    Bytes(&'a [u8]),
    /// The current message is complete. `body` holds its body when the tag is captured.
    End { tag: u8, body: &'a [u8] },
}

/// Follows message boundaries across arbitrary chunking.
#[derive(Debug, Clone)]
pub struct Scanner {
    header: [u8; 5],
    header_len: usize,
    tag: u8,
    remaining: usize,
    capture: Vec<u8>,
    capturing: bool,
    capture_tags: &'static [u8],
}

impl Scanner {
    /// A scanner at a message boundary that captures bodies of `capture_tags`.
    pub fn new(capture_tags: &'static [u8]) -> Self {
        Self {
            header: [0; 5],
            header_len: 0,
            tag: 0,
            remaining: 0,
            capture: Vec::new(),
            capturing: false,
            capture_tags,
        }
    }

    /// True when every byte fed so far completes a message.
    pub fn at_boundary(&self) -> bool {
        self.header_len == 0 && self.remaining == 0
    }

    /// Bytes still needed to reach the next boundary (header bytes first when the header is
    /// incomplete, since the body length is not known yet).
    pub fn bytes_to_boundary(&self) -> usize {
        if self.header_len > 0 {
            5 - self.header_len
        } else {
            self.remaining
        }
    }

    /// Walks `chunk`, calling `on` for each piece in order.
    pub fn feed(&mut self, mut chunk: &[u8], mut on: impl FnMut(Piece<'_>)) -> Result<(), ProtocolError> {
        while !chunk.is_empty() {
            if self.remaining > 0 {
                let n = self.remaining.min(chunk.len());
                let (now, rest) = chunk.split_at(n);
                on(Piece::Bytes(now));
                if self.capturing {
                    let room = MAX_CAPTURE.saturating_sub(self.capture.len());
                    self.capture.extend_from_slice(&now[..room.min(now.len())]);
                }
                self.remaining -= n;
                chunk = rest;
                if self.remaining == 0 {
                    self.finish(&mut on);
                }
                continue;
            }
            let n = (5 - self.header_len).min(chunk.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&chunk[..n]);
            self.header_len += n;
            chunk = &chunk[n..];
            if self.header_len < 5 {
                continue;
            }
            let h = self.header;
            let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize;
            if len < 4 {
                return Err(ProtocolError::TooShort { len, min: 4 });
            }
            self.header_len = 0;
            self.tag = h[0];
            self.remaining = len - 4;
            self.capturing = self.capture_tags.contains(&self.tag);
            self.capture.clear();
            on(Piece::Start {
                tag: self.tag,
                len: len + 1,
            });
            on(Piece::Bytes(&h));
            if self.remaining == 0 {
                self.finish(&mut on);
            }
        }
        Ok(())
    }

    fn finish(&mut self, on: &mut impl FnMut(Piece<'_>)) {
        on(Piece::End {
            tag: self.tag,
            body: if self.capturing { &self.capture } else { &[] },
        });
        self.capturing = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream() -> Vec<u8> {
        let mut s = Vec::new();
        s.extend_from_slice(b"D\0\0\0\x0aabcdef");
        s.extend_from_slice(b"C\0\0\0\x0dSELECT 1\0");
        s.extend_from_slice(b"Z\0\0\0\x05I");
        s
    }

    #[test]
    fn any_chunking_gives_the_same_pieces() {
        let s = stream();
        let mut reference = Vec::new();
        let mut sc = Scanner::new(b"CZ");
        sc.feed(&s, |p| reference.push(format!("{p:?}"))).unwrap();
        let ends: Vec<_> = reference.iter().filter(|p| p.starts_with("End")).collect();
        assert_eq!(ends.len(), 3);
        assert!(reference
            .iter()
            .any(|p| p.contains("End { tag: 67, body: [83, 69, 76, 69, 67, 84, 32, 49, 0]")));
        for split in 0..=s.len() {
            let mut got = Vec::new();
            let mut bytes = Vec::new();
            let mut sc = Scanner::new(b"CZ");
            for part in [&s[..split], &s[split..]] {
                sc.feed(part, |p| {
                    if let Piece::Bytes(b) = &p {
                        bytes.extend_from_slice(b);
                    } else {
                        got.push(format!("{p:?}"));
                    }
                })
                .unwrap();
            }
            assert_eq!(bytes, s, "split {split}");
            let expect: Vec<_> = reference.iter().filter(|p| !p.starts_with("Bytes")).cloned().collect();
            assert_eq!(got, expect, "split {split}");
            assert!(sc.at_boundary());
        }
    }

    #[test]
    fn reports_distance_to_boundary_and_bad_lengths() {
        let mut sc = Scanner::new(b"");
        sc.feed(b"D\0\0\0\x0aab", |_| {}).unwrap();
        assert_eq!(sc.bytes_to_boundary(), 4);
        sc.feed(b"cdefD\0", |_| {}).unwrap();
        assert_eq!(sc.bytes_to_boundary(), 3);
        assert!(Scanner::new(b"").feed(b"D\0\0\0\x02", |_| {}).is_err());
    }
}
