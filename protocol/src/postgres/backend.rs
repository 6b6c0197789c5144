//! Backend messages: framing, the ones the proxy reads during upstream login, and the ones it
//! writes to clients itself.

use std::collections::BTreeMap;

use super::{put_cstr, take_cstr, take_i32, ProtocolError};

/// Default upper bound for one backend message the proxy buffers whole (login phase only; the
/// relay streams larger messages without buffering them).
pub const MAX_LOGIN_MESSAGE_LEN: usize = 1 << 20;

/// Returns `(tag, total length including the tag byte)` of the tagged message at the front of
/// `buf`, `Ok(None)` when the 5-byte header is incomplete, or an error when the length field
/// is below 4 ([`ProtocolError::TooShort`]) or above `max` ([`ProtocolError::TooLong`]).
pub fn peek_tagged(buf: &[u8], max: usize) -> Result<Option<(u8, usize)>, ProtocolError> {
    let Some(head) = buf.get(..5) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len < 4 {
        return Err(ProtocolError::TooShort { len, min: 4 });
    }
    if len > max {
        return Err(ProtocolError::TooLong { len, max });
    }
    Ok(Some((head[0], len + 1)))
}

/// The fields of an `ErrorResponse` or `NoticeResponse`, keyed by field type byte.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fields(pub BTreeMap<u8, String>);

impl Fields {
    /// The SQLSTATE (`C`), or an empty string.
    pub fn code(&self) -> &str {
        self.0.get(&b'C').map_or("", String::as_str)
    }
    /// The primary message (`M`), or an empty string.
    pub fn message(&self) -> &str {
        self.0.get(&b'M').map_or("", String::as_str)
    }
}

/// Backend messages the proxy interprets while it logs in to a target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendMessage {
    AuthenticationOk,
    AuthenticationCleartextPassword,
    AuthenticationMd5Password {
        salt: [u8; 4],
    },
    AuthenticationSasl {
        mechanisms: Vec<String>,
    },
    AuthenticationSaslContinue {
        data: Vec<u8>,
    },
    AuthenticationSaslFinal {
        data: Vec<u8>,
    },
    /// Any other authentication request (Kerberos, GSS, SSPI): unsupported upstream.
    AuthenticationOther(i32),
    ParameterStatus {
        name: String,
        value: String,
    },
    BackendKeyData {
        process_id: i32,
        secret_key: i32,
    },
    ReadyForQuery {
        status: u8,
    },
    ErrorResponse(Fields),
    NoticeResponse(Fields),
    NegotiateProtocolVersion,
    /// A message the login phase does not interpret.
    Other {
        tag: u8,
    },
}

/// Decodes one complete tagged backend message (`msg` starts at the tag byte).
pub fn decode(msg: &[u8]) -> Result<BackendMessage, ProtocolError> {
    let (&tag, rest) = msg.split_first().ok_or(ProtocolError::Malformed("empty message"))?;
    let mut body = rest
        .get(4..)
        .ok_or(ProtocolError::Malformed("message shorter than header"))?;
    Ok(match tag {
        b'R' => {
            let kind = take_i32(&mut body)?;
            match kind {
                0 => BackendMessage::AuthenticationOk,
                3 => BackendMessage::AuthenticationCleartextPassword,
                5 => {
                    let salt: [u8; 4] = body
                        .get(..4)
                        .and_then(|s| s.try_into().ok())
                        .ok_or(ProtocolError::Malformed("md5 salt missing"))?;
                    BackendMessage::AuthenticationMd5Password { salt }
                }
                10 => {
                    let mut mechanisms = Vec::new();
                    loop {
                        let m = take_cstr(&mut body)?;
                        if m.is_empty() {
                            break;
                        }
                        mechanisms.push(m.to_owned());
                    }
                    BackendMessage::AuthenticationSasl { mechanisms }
                }
                11 => BackendMessage::AuthenticationSaslContinue { data: body.to_vec() },
                12 => BackendMessage::AuthenticationSaslFinal { data: body.to_vec() },
                other => BackendMessage::AuthenticationOther(other),
            }
        }
        b'S' => {
            let name = take_cstr(&mut body)?.to_owned();
            let value = take_cstr(&mut body)?.to_owned();
            BackendMessage::ParameterStatus { name, value }
        }
        b'K' => {
            let process_id = take_i32(&mut body)?;
            let secret_key = take_i32(&mut body)?;
            BackendMessage::BackendKeyData { process_id, secret_key }
        }
        b'Z' => BackendMessage::ReadyForQuery {
            status: *body
                .first()
                .ok_or(ProtocolError::Malformed("ReadyForQuery without status"))?,
        },
        b'E' => BackendMessage::ErrorResponse(decode_fields(body)?),
        b'N' => BackendMessage::NoticeResponse(decode_fields(body)?),
        b'v' => BackendMessage::NegotiateProtocolVersion,
        tag => BackendMessage::Other { tag },
    })
}

fn decode_fields(mut body: &[u8]) -> Result<Fields, ProtocolError> {
    let mut fields = BTreeMap::new();
    while let Some((&kind, rest)) = body.split_first() {
        if kind == 0 {
            break;
        }
        body = rest;
        let value = take_cstr(&mut body)?;
        fields.insert(kind, value.to_owned());
    }
    Ok(Fields(fields))
}

/// Severity of an `ErrorResponse` the proxy sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

/// An error or notice the proxy itself reports to a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report<'a> {
    pub sqlstate: &'a str,
    pub message: &'a str,
    pub detail: Option<&'a str>,
    pub hint: Option<&'a str>,
}

fn encode_report(tag: u8, severity: &str, r: &Report<'_>) -> Vec<u8> {
    let mut body = Vec::with_capacity(64 + r.message.len());
    for (kind, value) in [
        (b'S', Some(severity)),
        (b'V', Some(severity)),
        (b'C', Some(r.sqlstate)),
        (b'M', Some(r.message)),
        (b'D', r.detail),
        (b'H', r.hint),
    ] {
        if let Some(value) = value {
            body.push(kind);
            put_cstr(&mut body, value);
        }
    }
    body.push(0);
    tagged(tag, &body)
}

/// Encodes an `ErrorResponse`.
pub fn error_response(severity: Severity, report: &Report<'_>) -> Vec<u8> {
    encode_report(b'E', severity.as_str(), report)
}

/// Encodes a `NoticeResponse` with severity NOTICE.
pub fn notice_response(report: &Report<'_>) -> Vec<u8> {
    encode_report(b'N', "NOTICE", report)
}

/// Encodes `AuthenticationOk`.
pub fn authentication_ok() -> Vec<u8> {
    tagged(b'R', &0i32.to_be_bytes())
}

/// Encodes a `ParameterStatus`.
pub fn parameter_status(name: &str, value: &str) -> Vec<u8> {
    let mut body = Vec::new();
    put_cstr(&mut body, name);
    put_cstr(&mut body, value);
    tagged(b'S', &body)
}

/// Encodes `BackendKeyData`.
pub fn backend_key_data(process_id: i32, secret_key: i32) -> Vec<u8> {
    let mut body = Vec::with_capacity(8);
    body.extend_from_slice(&process_id.to_be_bytes());
    body.extend_from_slice(&secret_key.to_be_bytes());
    tagged(b'K', &body)
}

/// Encodes `ReadyForQuery` with the given transaction status (`I`, `T` or `E`).
pub fn ready_for_query(status: u8) -> Vec<u8> {
    tagged(b'Z', &[status])
}

fn tagged(tag: u8, body: &[u8]) -> Vec<u8> {
    super::frontend::encode_tagged(tag, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_response_golden_bytes() {
        let bytes = error_response(
            Severity::Fatal,
            &Report {
                sqlstate: "28000",
                message: "no",
                detail: None,
                hint: Some("h"),
            },
        );
        let expected: &[u8] = b"E\0\0\0\x21SFATAL\0VFATAL\0C28000\0Mno\0Hh\0\0";
        assert_eq!(bytes, expected);
        let decoded = decode(&bytes).unwrap();
        let BackendMessage::ErrorResponse(fields) = decoded else {
            panic!("not an error")
        };
        assert_eq!(fields.code(), "28000");
        assert_eq!(fields.message(), "no");
    }

    #[test]
    fn peek_checks_bounds() {
        assert_eq!(peek_tagged(b"Z\0\0", 100), Ok(None));
        assert_eq!(peek_tagged(b"Z\0\0\0\x05I", 100), Ok(Some((b'Z', 6))));
        assert_eq!(
            peek_tagged(b"Z\0\0\0\x03", 100),
            Err(ProtocolError::TooShort { len: 3, min: 4 })
        );
        assert_eq!(
            peek_tagged(b"D\x7f\0\0\0", 100),
            Err(ProtocolError::TooLong {
                len: 0x7f00_0000,
                max: 100
            })
        );
    }

    #[test]
    fn decodes_login_messages() {
        assert_eq!(decode(&authentication_ok()), Ok(BackendMessage::AuthenticationOk));
        assert_eq!(
            decode(&backend_key_data(1, 2)),
            Ok(BackendMessage::BackendKeyData {
                process_id: 1,
                secret_key: 2
            })
        );
        let sasl = b"R\0\0\0\x17\0\0\0\x0aSCRAM-SHA-256\0\0";
        assert_eq!(
            decode(sasl),
            Ok(BackendMessage::AuthenticationSasl {
                mechanisms: vec!["SCRAM-SHA-256".into()]
            })
        );
        assert!(decode(b"R\0\0\0\x08\0\0").is_err());
    }
}
