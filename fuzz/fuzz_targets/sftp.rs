//! SFTP as the SSH relay reads it (`jitgate_protocol::sftp`, `jitgate::ssh::sftp`): what any
//! client and any target may send on an sftp channel.
//!
//! Input: `[u16 client length][client bytes][server bytes]`. Checked: nothing panics; the
//! framer cuts a stream fed in two pieces into the same packets as fed whole; the tracker
//! fed both directions (requests first, then answers) reports no more operations than the
//! server sent answers.
#![no_main]

use jitgate::ssh::sftp::Tracker;
use jitgate_protocol::sftp::{Framer, Request, Response};
use libfuzzer_sys::fuzz_target;

fn packets(parts: &[&[u8]]) -> (Vec<Vec<u8>>, bool) {
    let mut f = Framer::default();
    let mut out = Vec::new();
    for part in parts {
        f.push(part);
        loop {
            match f.next_packet() {
                Ok(Some(p)) => out.push(p),
                Ok(None) => break,
                Err(_) => return (out, true),
            }
        }
    }
    (out, false)
}

fuzz_target!(|data: &[u8]| {
    let Some((len, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let n = usize::from(u16::from_be_bytes(*len)).min(rest.len());
    let (client, server) = rest.split_at(n);
    for stream in [client, server] {
        let whole = packets(&[stream]);
        let cut = stream.len() / 3;
        assert_eq!(packets(&[&stream[..cut], &stream[cut..]]), whole);
        for p in &whole.0 {
            let _ = Request::parse(p);
            let _ = Response::parse(p);
        }
    }
    let mut t = Tracker::default();
    if t.client(client).is_err() {
        return;
    }
    let answers = packets(&[server]).0.len();
    match t.server(server) {
        Ok(ops) => assert!(ops.len() <= answers, "{} ops from {answers} answers", ops.len()),
        Err(_) => return,
    }
    let _ = t.finish();
});
