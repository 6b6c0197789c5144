//! Tagged frontend messages after startup (`Query`, the extended protocol, COPY, function
//! calls) and the backend messages the relay observes to learn how statements ended.
//!
//! Decoding borrows from the message bytes; nothing is copied until the caller decides to
//! keep it.

use super::{take_cstr, take_i32, ProtocolError};

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
    /// Any other tag (e.g. a password message after startup): forwarded, never interpreted.
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

fn take_count(buf: &mut &[u8]) -> Result<usize, ProtocolError> {
    let n = take_i16(buf)?;
    usize::try_from(n).map_err(|_| ProtocolError::Malformed("negative count"))
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
    fn row_counts_from_tags() {
        assert_eq!(rows_of_tag("SELECT 5"), Some(5));
        assert_eq!(rows_of_tag("INSERT 0 3"), Some(3));
        assert_eq!(rows_of_tag("BEGIN"), None);
        assert_eq!(rows_of_tag("CREATE TABLE"), None);
    }
}
