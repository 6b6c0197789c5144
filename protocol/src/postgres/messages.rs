//! Tagged frontend messages after startup (`Query`, the extended protocol, COPY, function
//! calls) and the backend messages the relay observes to learn how statements ended.
//!
//! Framing is [`peek_frontend`]: the type byte is checked against the messages a client may
//! send after startup before the length is read, and the length against a maximum before
//! anything is buffered. Decoding borrows from the message bytes; nothing is copied until the
//! caller decides to keep it.

use super::{take_cstr, take_i32, ProtocolError};

/// Type bytes of the messages a client may send once logged in, as PostgreSQL's backend
/// accepts them (`SocketBackend` in `postgres.c`): Bind, Close, Describe, Execute,
/// FunctionCall, Flush, Parse, Query, Sync, Terminate, CopyDone, CopyData, CopyFail. Anything
/// else (a second `StartupMessage`, whose first byte is 0, or a password message) is a
/// protocol violation.
pub const FRONTEND_TYPES: &[u8] = b"BCDEFHPQSXcdf";

/// Returns `(type, total length including the type byte)` of the frontend message at the
/// front of `buf`, or `Ok(None)` while its header is incomplete. The type byte is checked
/// first, as soon as it arrives, so a length is never trusted for a message that cannot be
/// one ([`ProtocolError::UnknownType`]); then the length must be at least 4
/// ([`ProtocolError::TooShort`]) and at most `max` ([`ProtocolError::TooLong`]).
pub fn peek_frontend(buf: &[u8], max: usize) -> Result<Option<(u8, usize)>, ProtocolError> {
    let Some(&tag) = buf.first() else {
        return Ok(None);
    };
    if !FRONTEND_TYPES.contains(&tag) {
        return Err(ProtocolError::UnknownType(tag));
    }
    super::backend::peek_tagged(buf, max)
}

/// A frontend message, borrowed from its bytes (tag included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frontend<'a> {
    Query {
        sql: &'a str,
    },
    Parse {
        name: &'a str,
        sql: &'a str,
    },
    Bind {
        portal: &'a str,
        statement: &'a str,
        params: Vec<Param<'a>>,
    },
    Execute {
        portal: &'a str,
        max_rows: i32,
    },
    Describe {
        kind: u8,
        name: &'a str,
    },
    Close {
        kind: u8,
        name: &'a str,
    },
    Sync,
    Flush,
    FunctionCall {
        oid: i32,
        args: Vec<Param<'a>>,
    },
    CopyData {
        len: usize,
    },
    CopyDone,
    CopyFail {
        message: &'a str,
    },
    Terminate,
    /// Any other tag. The relay frames with [`peek_frontend`], which refuses these before
    /// they are decoded; decoding them here is kept for callers that do not.
    Other {
        tag: u8,
    },
}

/// A parameter value with its format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Param<'a> {
    Null,
    Text(&'a [u8]),
    Binary(&'a [u8]),
}

fn take_i16(buf: &mut &[u8]) -> Result<i16, ProtocolError> {
    if buf.len() < 2 {
        return Err(ProtocolError::Malformed("message ends inside an Int16"));
    }
    let v = i16::from_be_bytes([buf[0], buf[1]]);
    *buf = &buf[2..];
    Ok(v)
}

/// A count of formats, parameters or arguments: an unsigned `Int16` (0 to 65535), as
/// PostgreSQL reads it (`pq_getmsgint(msg, 2)`).
fn take_count(buf: &mut &[u8]) -> Result<usize, ProtocolError> {
    if buf.len() < 2 {
        return Err(ProtocolError::Malformed("message ends inside a count"));
    }
    let n = u16::from_be_bytes([buf[0], buf[1]]);
    *buf = &buf[2..];
    Ok(usize::from(n))
}

/// Reads format codes and values as `Bind` and `FunctionCall` lay them out.
fn take_params<'a>(buf: &mut &'a [u8]) -> Result<Vec<Param<'a>>, ProtocolError> {
    let nformats = take_count(buf)?;
    let mut formats = Vec::with_capacity(nformats.min(64));
    for _ in 0..nformats {
        formats.push(take_i16(buf)?);
    }
    let nvalues = take_count(buf)?;
    if formats.len() > 1 && formats.len() != nvalues {
        return Err(ProtocolError::Malformed("format count does not match parameter count"));
    }
    let mut params = Vec::with_capacity(nvalues.min(1024));
    for i in 0..nvalues {
        let len = take_i32(buf)?;
        if len == -1 {
            params.push(Param::Null);
            continue;
        }
        let len = usize::try_from(len).map_err(|_| ProtocolError::Malformed("negative parameter length"))?;
        if buf.len() < len {
            return Err(ProtocolError::Malformed("parameter runs past the message"));
        }
        let (value, rest) = buf.split_at(len);
        *buf = rest;
        let format = match formats.len() {
            0 => 0,
            1 => formats[0],
            _ => formats[i],
        };
        params.push(if format == 1 {
            Param::Binary(value)
        } else {
            Param::Text(value)
        });
    }
    Ok(params)
}

/// Decodes one complete tagged frontend message (`msg` starts at the tag byte).
pub fn decode_frontend(msg: &[u8]) -> Result<Frontend<'_>, ProtocolError> {
    let (&tag, rest) = msg.split_first().ok_or(ProtocolError::Malformed("empty message"))?;
    let mut b = rest
        .get(4..)
        .ok_or(ProtocolError::Malformed("message shorter than header"))?;
    Ok(match tag {
        b'Q' => Frontend::Query {
            sql: take_cstr(&mut b)?,
        },
        b'P' => {
            let name = take_cstr(&mut b)?;
            let sql = take_cstr(&mut b)?;
            Frontend::Parse { name, sql }
        }
        b'B' => {
            let portal = take_cstr(&mut b)?;
            let statement = take_cstr(&mut b)?;
            let params = take_params(&mut b)?;
            Frontend::Bind {
                portal,
                statement,
                params,
            }
        }
        b'E' => {
            let portal = take_cstr(&mut b)?;
            let max_rows = take_i32(&mut b)?;
            Frontend::Execute { portal, max_rows }
        }
        b'D' | b'C' => {
            let kind = *b.first().ok_or(ProtocolError::Malformed("missing kind"))?;
            b = &b[1..];
            let name = take_cstr(&mut b)?;
            if tag == b'D' {
                Frontend::Describe { kind, name }
            } else {
                Frontend::Close { kind, name }
            }
        }
        b'S' => Frontend::Sync,
        b'H' => Frontend::Flush,
        b'F' => {
            let oid = take_i32(&mut b)?;
            let args = take_params(&mut b)?;
            Frontend::FunctionCall { oid, args }
        }
        b'd' => Frontend::CopyData { len: b.len() },
        b'c' => Frontend::CopyDone,
        b'f' => Frontend::CopyFail {
            message: take_cstr(&mut b)?,
        },
        b'X' => Frontend::Terminate,
        tag => Frontend::Other { tag },
    })
}

/// Encodes a `Parse` message.
pub fn encode_parse(name: &str, sql: &str) -> Vec<u8> {
    let mut body = Vec::with_capacity(name.len() + sql.len() + 4);
    super::put_cstr(&mut body, name);
    super::put_cstr(&mut body, sql);
    body.extend_from_slice(&0i16.to_be_bytes());
    super::frontend::encode_tagged(b'P', &body)
}

/// Encodes a simple `Query` message.
pub fn encode_query(sql: &str) -> Vec<u8> {
    let mut body = Vec::with_capacity(sql.len() + 1);
    super::put_cstr(&mut body, sql);
    super::frontend::encode_tagged(b'Q', &body)
}

/// The row count at the end of a `CommandComplete` tag (`SELECT 5`, `INSERT 0 3`, `COPY 7`).
pub fn rows_of_tag(tag: &str) -> Option<u64> {
    let last = tag.rsplit(' ').next()?;
    if tag.contains(' ') {
        last.parse().ok()
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postgres::frontend::encode_tagged;

    #[test]
    fn decodes_bind_with_mixed_formats_and_null() {
        let mut body = Vec::new();
        body.extend_from_slice(b"p1\0s1\0");
        body.extend_from_slice(&2i16.to_be_bytes());
        body.extend_from_slice(&0i16.to_be_bytes());
        body.extend_from_slice(&1i16.to_be_bytes());
        body.extend_from_slice(&3i16.to_be_bytes());
        body.extend_from_slice(&2i32.to_be_bytes());
        body.extend_from_slice(b"42");
        body.extend_from_slice(&1i32.to_be_bytes());
        body.push(0xff);
        body.extend_from_slice(&(-1i32).to_be_bytes());
        body.extend_from_slice(&0i16.to_be_bytes());
        let msg = encode_tagged(b'B', &body);
        // Two formats for three values is malformed.
        assert!(decode_frontend(&msg).is_err());
        let mut body = Vec::new();
        body.extend_from_slice(b"\0s1\0");
        body.extend_from_slice(&1i16.to_be_bytes());
        body.extend_from_slice(&1i16.to_be_bytes());
        body.extend_from_slice(&2i16.to_be_bytes());
        body.extend_from_slice(&1i32.to_be_bytes());
        body.push(0xff);
        body.extend_from_slice(&(-1i32).to_be_bytes());
        body.extend_from_slice(&0i16.to_be_bytes());
        let msg = encode_tagged(b'B', &body);
        assert_eq!(
            decode_frontend(&msg).unwrap(),
            Frontend::Bind {
                portal: "",
                statement: "s1",
                params: vec![Param::Binary(&[0xff]), Param::Null]
            }
        );
    }

    #[test]
    fn decodes_query_parse_execute() {
        assert_eq!(
            decode_frontend(&encode_query("SELECT 1")).unwrap(),
            Frontend::Query { sql: "SELECT 1" }
        );
        assert_eq!(
            decode_frontend(&encode_parse("s", "SELECT $1")).unwrap(),
            Frontend::Parse {
                name: "s",
                sql: "SELECT $1"
            }
        );
        let exec = encode_tagged(b'E', b"\0\0\0\0\x05");
        assert_eq!(
            decode_frontend(&exec).unwrap(),
            Frontend::Execute {
                portal: "",
                max_rows: 5
            }
        );
    }

    #[test]
    fn malformed_messages_are_errors_not_panics() {
        for bytes in [
            &b"Q\0\0\0\x08abc"[..],
            b"B\0\0\0\x06\0",
            b"E\0\0\0\x05\0",
            b"F\0\0\0\x06\0\0",
            b"P\0\0\0\x04",
        ] {
            assert!(decode_frontend(bytes).is_err(), "{bytes:?}");
        }
        // A parameter length that runs past the end.
        let mut body = b"\0\0".to_vec();
        body.extend_from_slice(&0i16.to_be_bytes());
        body.extend_from_slice(&1i16.to_be_bytes());
        body.extend_from_slice(&1000i32.to_be_bytes());
        assert!(decode_frontend(&encode_tagged(b'B', &body)).is_err());
    }

    #[test]
    fn bind_counts_are_unsigned_up_to_65535() {
        for n in [32_768usize, 65_535] {
            let mut body = b"\0s\0".to_vec();
            body.extend_from_slice(&0u16.to_be_bytes());
            body.extend_from_slice(&u16::try_from(n).unwrap().to_be_bytes());
            for _ in 0..n {
                body.extend_from_slice(&(-1i32).to_be_bytes());
            }
            body.extend_from_slice(&0u16.to_be_bytes());
            let msg = encode_tagged(b'B', &body);
            let Frontend::Bind { params, .. } = decode_frontend(&msg).unwrap() else {
                panic!("not a Bind")
            };
            assert_eq!(params.len(), n);
        }
    }

    #[test]
    fn framing_checks_the_type_before_the_length() {
        // A second StartupMessage: its first byte (0) is no message type, whatever follows.
        assert_eq!(peek_frontend(b"\0", 1 << 24), Err(ProtocolError::UnknownType(0)));
        assert_eq!(
            peek_frontend(b"\0\0\0\x25\0\0\x03\0\0", 1 << 24),
            Err(ProtocolError::UnknownType(0))
        );
        assert_eq!(
            peek_frontend(b"p\0\0\0\x08abc\0", 1 << 24),
            Err(ProtocolError::UnknownType(b'p'))
        );
        assert_eq!(peek_frontend(b"", 1 << 24), Ok(None));
        assert_eq!(peek_frontend(b"Q\0\0", 1 << 24), Ok(None));
        for len in 0u8..4 {
            assert_eq!(
                peek_frontend(&[b'Q', 0, 0, 0, len], 1 << 24),
                Err(ProtocolError::TooShort {
                    len: usize::from(len),
                    min: 4
                })
            );
        }
        assert_eq!(
            peek_frontend(b"Q\x01\0\0\x01", 1 << 24),
            Err(ProtocolError::TooLong {
                len: (1 << 24) + 1,
                max: 1 << 24
            })
        );
        for &t in FRONTEND_TYPES {
            assert_eq!(peek_frontend(&[t, 0, 0, 0, 4], 1 << 24), Ok(Some((t, 5))));
        }
    }

    #[test]
    fn row_counts_from_tags() {
        assert_eq!(rows_of_tag("SELECT 5"), Some(5));
        assert_eq!(rows_of_tag("INSERT 0 3"), Some(3));
        assert_eq!(rows_of_tag("BEGIN"), None);
        assert_eq!(rows_of_tag("CREATE TABLE"), None);
    }
}
