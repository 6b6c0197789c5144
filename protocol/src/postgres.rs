//! PostgreSQL protocol version 3.0: the parts the proxy reads and writes.
//!
//! Message layout: startup-phase frontend messages have no tag byte (`Int32 len, Int32 code,
//! body`); every other message is `Byte1 tag, Int32 len (including itself), body`.

pub mod auth;
pub mod backend;
pub mod error;
pub mod frontend;
pub mod messages;
pub mod scanner;
pub mod scram;

pub use error::ProtocolError;

/// Default upper bound for a startup-phase message, in bytes. PostgreSQL itself caps the
/// startup packet at 10,000 bytes (`MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP_LEN: usize = 10_000;

/// Writes a NUL-terminated string.
pub(crate) fn put_cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

/// Reads a NUL-terminated UTF-8 string from the front of `buf`, advancing it.
pub(crate) fn take_cstr<'a>(buf: &mut &'a [u8]) -> Result<&'a str, ProtocolError> {
    let end = buf
        .iter()
        .position(|&b| b == 0)
        .ok_or(ProtocolError::Malformed("string is not NUL-terminated"))?;
    let s = std::str::from_utf8(&buf[..end]).map_err(|_| ProtocolError::Malformed("string is not valid UTF-8"))?;
    *buf = &buf[end + 1..];
    Ok(s)
}

/// Reads a big-endian `i32` from the front of `buf`, advancing it.
pub(crate) fn take_i32(buf: &mut &[u8]) -> Result<i32, ProtocolError> {
    if buf.len() < 4 {
        return Err(ProtocolError::Malformed("message ends inside an Int32"));
    }
    let v = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    *buf = &buf[4..];
    Ok(v)
}
