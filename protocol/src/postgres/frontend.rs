//! Startup-phase frontend messages: the first message on a PostgreSQL connection.
//!
//! These carry no tag byte. Decoding is two-step: [`peek_startup_len`] reads the length and
//! checks it against a maximum before anything is buffered, then [`decode_startup`] parses a
//! complete message.

use super::{take_cstr, take_i32, ProtocolError};

/// `SSLRequest` request code (1234 << 16 | 5679).
pub const SSL_REQUEST_CODE: i32 = 80_877_103;
/// `GSSENCRequest` request code (1234 << 16 | 5680).
pub const GSSENC_REQUEST_CODE: i32 = 80_877_104;
/// `CancelRequest` request code (1234 << 16 | 5678).
pub const CANCEL_REQUEST_CODE: i32 = 80_877_102;
/// Protocol version 3.0.
pub const PROTOCOL_V3: i32 = 196_608;

/// A decoded startup-phase message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupRequest {
    /// The client asks to upgrade to TLS.
    Ssl,
    /// The client asks for GSSAPI encryption (the proxy always declines).
    GssEnc,
    /// Cancel the query running on the backend identified by (process id, secret key).
    Cancel { process_id: i32, secret_key: i32 },
    /// A protocol 3.x `StartupMessage` with its parameters in the order sent.
    Startup {
        minor_version: u16,
        params: Vec<(String, String)>,
    },
}

/// Returns the total length of the startup message at the front of `buf`, `Ok(None)` when
/// fewer than four bytes are buffered, or an error when the length is below 8 or above `max`.
pub fn peek_startup_len(buf: &[u8], max: usize) -> Result<Option<usize>, ProtocolError> {
    let Some(head) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
    if len < 8 {
        return Err(ProtocolError::TooShort { len, min: 8 });
    }
    if len > max {
        return Err(ProtocolError::TooLong { len, max });
    }
    Ok(Some(len))
}

/// Decodes one complete startup-phase message (`msg.len()` equals its length field).
pub fn decode_startup(msg: &[u8]) -> Result<StartupRequest, ProtocolError> {
    let mut body = msg
        .get(4..)
        .ok_or(ProtocolError::Malformed("startup message too short"))?;
    let code = take_i32(&mut body)?;
    match code {
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE => {
            if !body.is_empty() {
                return Err(ProtocolError::Malformed("encryption request carries a body"));
            }
            Ok(if code == SSL_REQUEST_CODE {
                StartupRequest::Ssl
            } else {
                StartupRequest::GssEnc
            })
        }
        CANCEL_REQUEST_CODE => {
            let process_id = take_i32(&mut body)?;
            let secret_key = take_i32(&mut body)?;
            if !body.is_empty() {
                return Err(ProtocolError::Malformed("CancelRequest has trailing bytes"));
            }
            Ok(StartupRequest::Cancel { process_id, secret_key })
        }
        code if code >> 16 == 3 => {
            let mut params = Vec::new();
            loop {
                let name = take_cstr(&mut body)?;
                if name.is_empty() {
                    break;
                }
                let value = take_cstr(&mut body)?;
                params.push((name.to_owned(), value.to_owned()));
            }
            if !body.is_empty() {
                return Err(ProtocolError::Malformed("StartupMessage has trailing bytes"));
            }
            Ok(StartupRequest::Startup {
                minor_version: (code & 0xffff) as u16,
                params,
            })
        }
        other => Err(ProtocolError::UnknownRequestCode(other)),
    }
}

/// Encodes a protocol 3.0 `StartupMessage` (used by the proxy towards the target).
pub fn encode_startup(params: &[(&str, &str)]) -> Vec<u8> {
    let mut out = vec![0, 0, 0, 0];
    out.extend_from_slice(&PROTOCOL_V3.to_be_bytes());
    for (k, v) in params {
        super::put_cstr(&mut out, k);
        super::put_cstr(&mut out, v);
    }
    out.push(0);
    let len = out.len() as u32;
    out[..4].copy_from_slice(&len.to_be_bytes());
    out
}

/// Encodes an `SSLRequest`.
pub fn encode_ssl_request() -> [u8; 8] {
    let mut out = [0u8; 8];
    out[..4].copy_from_slice(&8u32.to_be_bytes());
    out[4..].copy_from_slice(&SSL_REQUEST_CODE.to_be_bytes());
    out
}

/// Encodes a `CancelRequest` for the given backend key.
pub fn encode_cancel(process_id: i32, secret_key: i32) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..4].copy_from_slice(&16u32.to_be_bytes());
    out[4..8].copy_from_slice(&CANCEL_REQUEST_CODE.to_be_bytes());
    out[8..12].copy_from_slice(&process_id.to_be_bytes());
    out[12..].copy_from_slice(&secret_key.to_be_bytes());
    out
}

/// Encodes a tagged frontend message (`PasswordMessage`, `SASLInitialResponse`, ...).
pub fn encode_tagged(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(tag);
    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssl_request_golden_bytes() {
        let bytes = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
        assert_eq!(encode_ssl_request(), bytes);
        assert_eq!(peek_startup_len(&bytes, 10_000), Ok(Some(8)));
        assert_eq!(decode_startup(&bytes), Ok(StartupRequest::Ssl));
    }

    #[test]
    fn startup_round_trip() {
        let msg = encode_startup(&[("user", "alice"), ("database", "prod-db")]);
        let got = decode_startup(&msg).unwrap();
        assert_eq!(
            got,
            StartupRequest::Startup {
                minor_version: 0,
                params: vec![("user".into(), "alice".into()), ("database".into(), "prod-db".into())]
            }
        );
    }

    #[test]
    fn incomplete_header_is_not_an_error() {
        assert_eq!(peek_startup_len(&[0, 0], 100), Ok(None));
    }

    #[test]
    fn oversized_and_undersized_lengths_are_refused() {
        assert_eq!(
            peek_startup_len(&[0, 1, 0, 0], 10_000),
            Err(ProtocolError::TooLong {
                len: 65_536,
                max: 10_000
            })
        );
        assert_eq!(
            peek_startup_len(&[0, 0, 0, 3], 10_000),
            Err(ProtocolError::TooShort { len: 3, min: 8 })
        );
    }

    #[test]
    fn unterminated_parameters_are_malformed() {
        let mut msg = encode_startup(&[("user", "alice")]);
        msg.truncate(msg.len() - 2);
        let len = msg.len() as u32;
        msg[..4].copy_from_slice(&len.to_be_bytes());
        assert!(matches!(decode_startup(&msg), Err(ProtocolError::Malformed(_))));
    }

    #[test]
    fn cancel_round_trip_and_unknown_code() {
        assert_eq!(
            decode_startup(&encode_cancel(7, -9)),
            Ok(StartupRequest::Cancel {
                process_id: 7,
                secret_key: -9
            })
        );
        let mut bogus = encode_ssl_request();
        bogus[7] = 1;
        assert!(matches!(
            decode_startup(&bogus),
            Err(ProtocolError::UnknownRequestCode(_))
        ));
    }
}
