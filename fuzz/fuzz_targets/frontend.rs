//! The frontend message decoder (`messages::decode_frontend`) on a client's byte stream.
//!
//! Input: client bytes after startup, as the relay reads them. The stream is framed as the
//! relay frames it (`peek_tagged`, whole messages only) and each message decoded. Checked:
//! every borrowed field lies inside its own message; a `Query`, and a `Parse` without
//! parameter types, re-encode to exactly their bytes; parameter and COPY lengths fit the
//! message; nothing panics, also on a single message whose length field disagrees with its
//! size.
#![no_main]

use jitgate_protocol::postgres::backend::peek_tagged;
use jitgate_protocol::postgres::messages::{decode_frontend, encode_parse, encode_query, Frontend, Param};
use libfuzzer_sys::fuzz_target;

/// The relay's default `limits.max_message_bytes` (16 MiB).
const MAX_MESSAGE: usize = 16 * 1024 * 1024;

fn inside(msg: &[u8], field: &[u8]) {
    let (start, end) = (msg.as_ptr() as usize, msg.as_ptr() as usize + msg.len());
    let (f_start, f_end) = (field.as_ptr() as usize, field.as_ptr() as usize + field.len());
    assert!(start <= f_start && f_end <= end, "a field lies outside its message");
}

fn params_inside(msg: &[u8], params: &[Param<'_>]) {
    for p in params {
        if let Param::Text(v) | Param::Binary(v) = p {
            inside(msg, v);
        }
    }
}

fn check(msg: &[u8]) {
    let Ok(decoded) = decode_frontend(msg) else {
        return;
    };
    match &decoded {
        Frontend::Query { sql } => {
            inside(msg, sql.as_bytes());
            if msg.len() == sql.len() + 6 {
                assert_eq!(encode_query(sql), msg, "Query does not re-encode");
            }
        }
        Frontend::Parse { name, sql } => {
            inside(msg, name.as_bytes());
            inside(msg, sql.as_bytes());
            // name\0 sql\0 and an Int16 count of zero parameter types.
            if msg.len() == name.len() + sql.len() + 9 && msg.ends_with(&[0, 0]) {
                assert_eq!(encode_parse(name, sql), msg, "Parse does not re-encode");
            }
        }
        Frontend::Bind {
            portal,
            statement,
            params,
        } => {
            inside(msg, portal.as_bytes());
            inside(msg, statement.as_bytes());
            params_inside(msg, params);
            assert!(
                params.len() <= msg.len() / 4,
                "more parameters than the message can hold"
            );
        }
        Frontend::FunctionCall { args, .. } => {
            params_inside(msg, args);
            assert!(args.len() <= msg.len() / 4, "more arguments than the message can hold");
        }
        Frontend::Execute { portal, .. } => inside(msg, portal.as_bytes()),
        Frontend::Describe { kind: _, name } | Frontend::Close { kind: _, name } => inside(msg, name.as_bytes()),
        Frontend::CopyData { len } => assert_eq!(*len + 5, msg.len(), "CopyData length"),
        Frontend::CopyFail { message } => inside(msg, message.as_bytes()),
        Frontend::Sync | Frontend::Flush | Frontend::CopyDone | Frontend::Terminate => {}
        Frontend::Other { tag } => {
            assert!(!b"QPBEDCSHFdcfX".contains(tag), "known tag {tag} decoded as Other");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // One message whatever its length field says.
    let _ = decode_frontend(data);

    let mut rest = data;
    while let Ok(Some((_, len))) = peek_tagged(rest, MAX_MESSAGE) {
        assert!((5..=MAX_MESSAGE + 1).contains(&len), "peeked length {len}");
        if rest.len() < len {
            break;
        }
        let (msg, tail) = rest.split_at(len);
        check(msg);
        rest = tail;
    }
});
