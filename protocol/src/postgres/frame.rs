//! Message-boundary tracking for a relayed stream of tagged messages.
//!
//! The relay forwards bytes as they arrive, without buffering whole messages, yet must know
//! where message boundaries are so that a proxy-generated message (a FATAL at grant expiry,
//! a NOTICE) is never spliced into the middle of a server message. [`FrameTracker`] follows
//! the 5-byte headers through the byte stream in O(1) state.

use super::ProtocolError;

/// Follows message boundaries across arbitrary chunking of a tagged-message stream.
#[derive(Debug, Clone, Default)]
pub struct FrameTracker {
    header: [u8; 5],
    header_len: usize,
    body_remaining: usize,
}

impl FrameTracker {
    /// A tracker positioned at a message boundary.
    pub fn new() -> Self {
        Self::default()
    }

    /// True when every byte observed so far completes a message.
    pub fn at_boundary(&self) -> bool {
        self.header_len == 0 && self.body_remaining == 0
    }

    /// Bytes still needed to reach the next boundary, when the header is complete; a partial
    /// header reports the header bytes missing (the body length is not known yet).
    pub fn bytes_to_boundary(&self) -> usize {
        if self.header_len > 0 {
            5 - self.header_len
        } else {
            self.body_remaining
        }
    }

    /// Advances over `chunk`. Fails when a length field is below 4.
    pub fn observe(&mut self, mut chunk: &[u8]) -> Result<(), ProtocolError> {
        while !chunk.is_empty() {
            if self.body_remaining > 0 {
                let n = self.body_remaining.min(chunk.len());
                self.body_remaining -= n;
                chunk = &chunk[n..];
                continue;
            }
            let n = (5 - self.header_len).min(chunk.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&chunk[..n]);
            self.header_len += n;
            chunk = &chunk[n..];
            if self.header_len == 5 {
                let h = self.header;
                let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize;
                if len < 4 {
                    return Err(ProtocolError::BadLength { len, max: usize::MAX });
                }
                self.header_len = 0;
                self.body_remaining = len - 4;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundaries_survive_any_chunking() {
        let mut stream = Vec::new();
        stream.extend_from_slice(b"D\0\0\0\x0aabcdef");
        stream.extend_from_slice(b"C\0\0\0\x04");
        stream.extend_from_slice(b"Z\0\0\0\x05I");
        for split in 0..stream.len() {
            let mut t = FrameTracker::new();
            t.observe(&stream[..split]).unwrap();
            let boundary = [0, 11, 16, 22].contains(&split);
            assert_eq!(t.at_boundary(), boundary, "split at {split}");
            t.observe(&stream[split..]).unwrap();
            assert!(t.at_boundary());
        }
    }

    #[test]
    fn reports_remaining_bytes() {
        let mut t = FrameTracker::new();
        t.observe(b"D\0\0\0\x0aab").unwrap();
        assert_eq!(t.bytes_to_boundary(), 4);
        t.observe(b"cdef").unwrap();
        assert!(t.at_boundary());
        t.observe(b"D\0").unwrap();
        assert_eq!(t.bytes_to_boundary(), 3);
    }

    #[test]
    fn rejects_impossible_length() {
        assert!(FrameTracker::new().observe(b"D\0\0\0\x02").is_err());
    }
}
