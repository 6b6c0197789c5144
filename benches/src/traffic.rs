//! Byte streams of pgbench sessions, for the in-process benches: what libpq sends for each
//! transaction of `pgbench -S` in the three query modes and of the TPC-B-like script, and what
//! PostgreSQL answers, message for message (tags, lengths and field layout as on the wire).
//!
//! They are synthesized rather than captured so the benches need no server, but they follow
//! libpq's encoding: `PQsendQueryParams` sends Parse/Bind/Describe(portal)/Execute/Sync,
//! `PQsendQueryPrepared` Bind/Describe/Execute/Sync, simple mode one `Query`.

/// pgbench's query modes (`-M`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Simple,
    Extended,
    Prepared,
}

impl Mode {
    /// All modes, in pgbench's order.
    pub const ALL: [Mode; 3] = [Mode::Simple, Mode::Extended, Mode::Prepared];

    /// As pgbench spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Simple => "simple",
            Mode::Extended => "extended",
            Mode::Prepared => "prepared",
        }
    }
}

/// The select-only statement, as pgbench's builtin script sends it with a parameter.
pub const SELECT_ONLY: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = $1;";
/// The prepared statement's name.
pub const STATEMENT_NAME: &str = "P_1";

/// One transaction: the client's bytes and the server's answer.
#[derive(Debug, Clone)]
pub struct Exchange {
    pub frontend: Vec<u8>,
    pub backend: Vec<u8>,
}

fn tagged(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
    out.push(tag);
    out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    out.extend_from_slice(body);
}

fn cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

/// `Parse`: name, text, no parameter types (pgbench lets the server infer them).
pub fn parse(out: &mut Vec<u8>, name: &str, sql: &str) {
    let mut b = Vec::new();
    cstr(&mut b, name);
    cstr(&mut b, sql);
    b.extend_from_slice(&0i16.to_be_bytes());
    tagged(out, b'P', &b);
}

/// `Bind` of the unnamed portal with text parameters and text results.
pub fn bind(out: &mut Vec<u8>, statement: &str, params: &[&str]) {
    let mut b = Vec::new();
    cstr(&mut b, "");
    cstr(&mut b, statement);
    b.extend_from_slice(&0i16.to_be_bytes());
    b.extend_from_slice(&(params.len() as i16).to_be_bytes());
    for p in params {
        b.extend_from_slice(&(p.len() as i32).to_be_bytes());
        b.extend_from_slice(p.as_bytes());
    }
    b.extend_from_slice(&1i16.to_be_bytes());
    b.extend_from_slice(&0i16.to_be_bytes());
    tagged(out, b'B', &b);
}

fn describe_portal(out: &mut Vec<u8>) {
    tagged(out, b'D', b"P\0");
}

fn execute(out: &mut Vec<u8>) {
    tagged(out, b'E', b"\0\0\0\0\0");
}

fn sync(out: &mut Vec<u8>) {
    tagged(out, b'S', b"");
}

/// `Query`.
pub fn query(out: &mut Vec<u8>, sql: &str) {
    let mut b = Vec::new();
    cstr(&mut b, sql);
    tagged(out, b'Q', &b);
}

fn row_description(out: &mut Vec<u8>, column: &str) {
    let mut b = Vec::new();
    b.extend_from_slice(&1i16.to_be_bytes());
    cstr(&mut b, column);
    b.extend_from_slice(&16_397i32.to_be_bytes()); // table oid
    b.extend_from_slice(&3i16.to_be_bytes()); // attnum
    b.extend_from_slice(&23i32.to_be_bytes()); // int4
    b.extend_from_slice(&4i16.to_be_bytes());
    b.extend_from_slice(&(-1i32).to_be_bytes());
    b.extend_from_slice(&0i16.to_be_bytes());
    tagged(out, b'T', &b);
}

fn data_row(out: &mut Vec<u8>, value: &str) {
    let mut b = Vec::new();
    b.extend_from_slice(&1i16.to_be_bytes());
    b.extend_from_slice(&(value.len() as i32).to_be_bytes());
    b.extend_from_slice(value.as_bytes());
    tagged(out, b'D', &b);
}

fn complete(out: &mut Vec<u8>, tag: &str) {
    let mut b = Vec::new();
    cstr(&mut b, tag);
    tagged(out, b'C', &b);
}

fn ready(out: &mut Vec<u8>, status: u8) {
    tagged(out, b'Z', &[status]);
}

/// A deterministic account id for transaction `i` (pgbench draws them uniformly).
fn aid(i: usize) -> String {
    ((i.wrapping_mul(2_654_435_761) % 1_000_000) + 1).to_string()
}

/// What a prepared-mode session sends once before its first transaction.
pub fn prepare_once() -> Vec<u8> {
    let mut out = Vec::new();
    parse(&mut out, STATEMENT_NAME, SELECT_ONLY);
    sync(&mut out);
    out
}

/// The server's answer to [`prepare_once`].
pub fn prepare_once_answer() -> Vec<u8> {
    let mut out = Vec::new();
    tagged(&mut out, b'1', b"");
    ready(&mut out, b'I');
    out
}

/// `n` select-only transactions in `mode` (for prepared, after [`prepare_once`]).
pub fn select_only(mode: Mode, n: usize) -> Vec<Exchange> {
    (0..n)
        .map(|i| {
            let aid = aid(i);
            let mut frontend = Vec::new();
            let mut backend = Vec::new();
            match mode {
                Mode::Simple => {
                    query(
                        &mut frontend,
                        &format!("SELECT abalance FROM pgbench_accounts WHERE aid = {aid};"),
                    );
                    row_description(&mut backend, "abalance");
                }
                Mode::Extended => {
                    parse(&mut frontend, "", SELECT_ONLY);
                    bind(&mut frontend, "", &[&aid]);
                    describe_portal(&mut frontend);
                    execute(&mut frontend);
                    sync(&mut frontend);
                    tagged(&mut backend, b'1', b"");
                    tagged(&mut backend, b'2', b"");
                    row_description(&mut backend, "abalance");
                }
                Mode::Prepared => {
                    bind(&mut frontend, STATEMENT_NAME, &[&aid]);
                    describe_portal(&mut frontend);
                    execute(&mut frontend);
                    sync(&mut frontend);
                    tagged(&mut backend, b'2', b"");
                    row_description(&mut backend, "abalance");
                }
            }
            data_row(&mut backend, "0");
            complete(&mut backend, "SELECT 1");
            ready(&mut backend, b'I');
            Exchange { frontend, backend }
        })
        .collect()
}

/// `n` transactions of pgbench's TPC-B-like script in simple mode: seven round trips each,
/// returned as one exchange per statement.
pub fn tpcb_simple(n: usize) -> Vec<Exchange> {
    let mut out = Vec::with_capacity(n * 7);
    for i in 0..n {
        let aid = aid(i);
        let tid = i % 100 + 1;
        let bid = i % 10 + 1;
        let delta = (i % 10_000) as i64 - 5000;
        let steps: [(String, &str, u8); 7] = [
            ("BEGIN;".into(), "BEGIN", b'T'),
            (
                format!("UPDATE pgbench_accounts SET abalance = abalance + {delta} WHERE aid = {aid};"),
                "UPDATE 1",
                b'T',
            ),
            (
                format!("SELECT abalance FROM pgbench_accounts WHERE aid = {aid};"),
                "SELECT 1",
                b'T',
            ),
            (
                format!("UPDATE pgbench_tellers SET tbalance = tbalance + {delta} WHERE tid = {tid};"),
                "UPDATE 1",
                b'T',
            ),
            (
                format!("UPDATE pgbench_branches SET bbalance = bbalance + {delta} WHERE bid = {bid};"),
                "UPDATE 1",
                b'T',
            ),
            (
                format!(
                    "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ({tid}, {bid}, {aid}, {delta}, CURRENT_TIMESTAMP);"
                ),
                "INSERT 0 1",
                b'T',
            ),
            ("END;".into(), "COMMIT", b'I'),
        ];
        for (sql, tag, status) in steps {
            let mut frontend = Vec::new();
            let mut backend = Vec::new();
            query(&mut frontend, &sql);
            if tag == "SELECT 1" {
                row_description(&mut backend, "abalance");
                data_row(&mut backend, "-1234");
            }
            complete(&mut backend, tag);
            ready(&mut backend, status);
            out.push(Exchange { frontend, backend });
        }
    }
    out
}

/// The answers a fake server gives at login (trust authentication).
pub fn login_answer(process_id: i32, secret: i32) -> Vec<u8> {
    let mut out = Vec::new();
    tagged(&mut out, b'R', &0i32.to_be_bytes());
    for (name, value) in [
        ("server_version", "15.0 (jitgate-e2e fake)"),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("standard_conforming_strings", "on"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("TimeZone", "UTC"),
        ("is_superuser", "off"),
    ] {
        let mut b = Vec::new();
        cstr(&mut b, name);
        cstr(&mut b, value);
        tagged(&mut out, b'S', &b);
    }
    let mut key = Vec::new();
    key.extend_from_slice(&process_id.to_be_bytes());
    key.extend_from_slice(&secret.to_be_bytes());
    tagged(&mut out, b'K', &key);
    ready(&mut out, b'I');
    out
}

/// `EmptyQueryResponse` + `ReadyForQuery`: the fake server's answer to any `Query`.
pub fn empty_answer() -> Vec<u8> {
    let mut out = Vec::new();
    tagged(&mut out, b'I', b"");
    ready(&mut out, b'I');
    out
}

/// `ReadyForQuery` alone: the fake server's answer to `Sync`.
pub fn ready_answer() -> Vec<u8> {
    let mut out = Vec::new();
    ready(&mut out, b'I');
    out
}

/// One read the relay made in a recorded session, in order.
#[derive(Debug, Clone)]
pub enum Read {
    /// Bytes from the client (psql, pgbench).
    Client(Vec<u8>),
    /// Bytes from PostgreSQL.
    Server(Vec<u8>),
}

/// Recorded pgbench sessions (`benches/record-traffic.sh`; 200 transactions each, after
/// login): `select-simple`, `select-extended`, `select-prepared`, `tpcb-simple`.
pub const RECORDED: [&str; 4] = ["select-simple", "select-extended", "select-prepared", "tpcb-simple"];

/// The reads of the recorded session `name` (one of [`RECORDED`]).
pub fn recorded(name: &str) -> Vec<Read> {
    let bytes: &[u8] = match name {
        "select-simple" => include_bytes!("../data/select-simple.trace"),
        "select-extended" => include_bytes!("../data/select-extended.trace"),
        "select-prepared" => include_bytes!("../data/select-prepared.trace"),
        "tpcb-simple" => include_bytes!("../data/tpcb-simple.trace"),
        other => panic!("no recorded session {other}"),
    };
    let mut reads = Vec::new();
    let mut rest = bytes;
    while rest.len() >= 5 {
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        let data = rest[5..5 + len].to_vec();
        reads.push(if rest[0] == b'F' {
            Read::Client(data)
        } else {
            Read::Server(data)
        });
        rest = &rest[5 + len..];
    }
    reads
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use jitgate_protocol::postgres::backend::peek_tagged;
    use jitgate_protocol::postgres::messages::decode_frontend;

    fn frames(mut b: &[u8]) -> Vec<u8> {
        let mut tags = Vec::new();
        while let Some((tag, len)) = peek_tagged(b, usize::MAX).unwrap() {
            tags.push(tag);
            b = &b[len..];
        }
        assert!(b.is_empty());
        tags
    }

    #[test]
    fn streams_are_whole_messages_the_proxy_decodes() {
        for mode in Mode::ALL {
            for x in select_only(mode, 3) {
                let mut b = &x.frontend[..];
                while let Some((_, len)) = peek_tagged(b, usize::MAX).unwrap() {
                    decode_frontend(&b[..len]).unwrap();
                    b = &b[len..];
                }
                assert_eq!(frames(&x.backend).last(), Some(&b'Z'));
            }
        }
        assert_eq!(frames(&tpcb_simple(1)[0].frontend), b"Q");
        assert_eq!(frames(&login_answer(1, 2)).first(), Some(&b'R'));
    }

    #[test]
    fn recordings_are_whole_messages_of_200_transactions() {
        for name in RECORDED {
            let reads = recorded(name);
            let (mut client, mut server) = (Vec::new(), Vec::new());
            for r in &reads {
                match r {
                    Read::Client(b) => client.extend_from_slice(b),
                    Read::Server(b) => server.extend_from_slice(b),
                }
            }
            let mut b = &client[..];
            while let Some((_, len)) = peek_tagged(b, usize::MAX).unwrap() {
                decode_frontend(&b[..len]).unwrap();
                b = &b[len..];
            }
            assert!(b.is_empty(), "{name}: client bytes end mid-message");
            let ready = frames(&server).iter().filter(|&&t| t == b'Z').count();
            assert!(ready >= 200, "{name}: {ready} ReadyForQuery");
        }
    }
}
