//! The startup-phase decoder (`postgres::frontend`): the first bytes any client sends.
//!
//! Input: a client's first bytes. Checked: `peek_startup_len` never announces a length
//! outside `8..=MAX_STARTUP_LEN`; a decoded message re-encodes to exactly the bytes it came
//! from (`StartupMessage`, `CancelRequest`, `SSLRequest`); nothing panics, also when
//! `decode_startup` gets a buffer whose length field disagrees with its size.
#![no_main]

use jitgate_protocol::postgres::frontend::{
    decode_startup, encode_cancel, encode_ssl_request, encode_startup, peek_startup_len, StartupRequest,
    GSSENC_REQUEST_CODE, PROTOCOL_V3,
};
use jitgate_protocol::postgres::MAX_STARTUP_LEN;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Whatever the length field says.
    let _ = decode_startup(data);

    let Ok(Some(len)) = peek_startup_len(data, MAX_STARTUP_LEN) else {
        return;
    };
    assert!((8..=MAX_STARTUP_LEN).contains(&len), "peeked length {len}");
    let Some(msg) = data.get(..len) else {
        return;
    };
    let Ok(request) = decode_startup(msg) else {
        return;
    };
    let again: Vec<u8> = match &request {
        StartupRequest::Ssl => encode_ssl_request().to_vec(),
        StartupRequest::GssEnc => {
            let mut out = 8u32.to_be_bytes().to_vec();
            out.extend_from_slice(&GSSENC_REQUEST_CODE.to_be_bytes());
            out
        }
        StartupRequest::Cancel { process_id, secret_key } => encode_cancel(*process_id, *secret_key).to_vec(),
        StartupRequest::Startup { minor_version, params } => {
            for (name, _) in params {
                assert!(!name.is_empty(), "an empty name ends the parameter list");
            }
            let pairs: Vec<(&str, &str)> = params.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let mut out = encode_startup(&pairs);
            let code = PROTOCOL_V3 | i32::from(*minor_version);
            out[4..8].copy_from_slice(&code.to_be_bytes());
            out
        }
    };
    assert_eq!(again, msg, "{request:?} does not re-encode to its bytes");
});
