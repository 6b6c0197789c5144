//! The proxy's statement splitter (`jitgate_protocol::sql::classify`) against a real
//! PostgreSQL: for each text in `tests/data/splitter/`, the statements the proxy finds must be
//! the statements the server executes. Each text is sent whole as one simple `Query`, and
//! each statement the proxy found is sent alone; the server must answer the whole text with
//! one result per proxy statement, each equal to that statement's result alone (the texts
//! are written so that every statement returns a value of its own).
//!
//! A text on which the two disagree is a guardrail bypass in waiting: the proxy would audit
//! and check statements other than the ones that run. No proxy is needed here, only the
//! cluster.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use jitgate_protocol::postgres::frontend::encode_startup;
use jitgate_protocol::postgres::messages::encode_query;
use jitgate_protocol::sql::StatementClass;
use jitgate_tests::jitgate::sandbox::{LocalPostgres, PgOptions};
use jitgate_tests::raw::{error_of, read_until_ready, Msg};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// What the server answered for one statement.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// `RowDescription`, `DataRow`s and `CommandComplete` (or only the latter).
    Done {
        columns: Vec<String>,
        rows: Vec<Vec<Option<String>>>,
        tag: String,
    },
    /// `EmptyQueryResponse`.
    Empty,
}

fn cstr(body: &mut &[u8]) -> String {
    let end = body.iter().position(|&b| b == 0).unwrap();
    let s = String::from_utf8(body[..end].to_vec()).unwrap();
    *body = &body[end + 1..];
    s
}

fn i16_at(body: &mut &[u8]) -> i16 {
    let v = i16::from_be_bytes([body[0], body[1]]);
    *body = &body[2..];
    v
}

fn i32_at(body: &mut &[u8]) -> i32 {
    let v = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
    *body = &body[4..];
    v
}

/// The outcomes of one simple query, statement by statement, or the server's error.
fn outcomes(msgs: &[Msg]) -> Result<Vec<Outcome>, String> {
    if let Some((code, message)) = error_of(msgs) {
        return Err(format!("{code} {message}"));
    }
    let mut out = Vec::new();
    let (mut columns, mut rows) = (Vec::new(), Vec::new());
    for m in msgs {
        let mut body = &m.raw[5..];
        match m.tag {
            b'T' => {
                for _ in 0..i16_at(&mut body) {
                    columns.push(cstr(&mut body));
                    body = &body[18..];
                }
            }
            b'D' => {
                let mut row = Vec::new();
                for _ in 0..i16_at(&mut body) {
                    let len = i32_at(&mut body);
                    if len < 0 {
                        row.push(None);
                    } else {
                        let (v, rest) = body.split_at(len as usize);
                        row.push(Some(String::from_utf8(v.to_vec()).unwrap()));
                        body = rest;
                    }
                }
                rows.push(row);
            }
            b'C' => out.push(Outcome::Done {
                columns: std::mem::take(&mut columns),
                rows: std::mem::take(&mut rows),
                tag: cstr(&mut body),
            }),
            b'I' => out.push(Outcome::Empty),
            _ => {}
        }
    }
    Ok(out)
}

/// A plain connection to the cluster as `jit_trust` (trust over TCP in the sandbox).
async fn connect(pg: &LocalPostgres) -> TcpStream {
    let mut s = TcpStream::connect(pg.address()).await.unwrap();
    s.write_all(&encode_startup(&[
        ("user", "jit_trust"),
        ("database", "postgres"),
        ("client_encoding", "UTF8"),
    ]))
    .await
    .unwrap();
    let login = read_until_ready(&mut s).await;
    assert_eq!(error_of(&login), None, "login");
    s
}

async fn run(s: &mut TcpStream, sql: &str) -> Result<Vec<Outcome>, String> {
    s.write_all(&encode_query(sql)).await.unwrap();
    outcomes(&read_until_ready(s).await)
}

/// The corpus: (file name, text), sorted by name.
fn corpus() -> Vec<(String, String)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/splitter");
    let mut texts: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read_to_string(&p).unwrap())
        })
        .collect();
    texts.sort();
    texts
}

/// The proxy's split: each `Classified::text` is one statement.
fn proxy_split(text: &str) -> Vec<String> {
    jitgate_protocol::sql::classify(text)
        .into_iter()
        .filter(|c| c.kind != "empty")
        .map(|c| c.text)
        .collect()
}

/// A splitter that knows no quoting or comments, to show the corpus catches one.
fn naive_split(text: &str) -> Vec<String> {
    text.split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// How `split`'s statements for `text` differ from what the server ran, if they do.
async fn mismatch(s: &mut TcpStream, text: &str, split: fn(&str) -> Vec<String>) -> Option<String> {
    let whole = match run(s, text).await {
        Ok(whole) => whole,
        Err(e) => return Some(format!("the server refused the text (fix the corpus): {e}")),
    };
    let statements = split(text);
    if statements.len() != whole.len() {
        return Some(format!(
            "the split found {} statements {statements:?}, the server ran {}: {whole:?}",
            statements.len(),
            whole.len()
        ));
    }
    for (i, (statement, ran)) in statements.iter().zip(&whole).enumerate() {
        match run(s, statement).await {
            Ok(alone) if alone.len() == 1 && &alone[0] == ran => {}
            alone => {
                return Some(format!(
                    "statement {i} {statement:?} alone gives {alone:?}, within the text {ran:?}"
                ))
            }
        }
    }
    None
}

/// Texts the splitter does not read as the server does, reported to the SQL classification
/// owner, with why they still fail closed: the proxy reads the whole text as ONE statement of
/// class `Unknown`, the most privileged class, so no guardrail lets it through as something
/// milder. Each must still mismatch (when the splitter learns it, move the file out of this
/// list) and must still be one `Unknown` statement over the whole text.
const KNOWN_MISMATCHES: &[(&str, &str)] = &[(
    "string-continuation.sql",
    "sqlparser's tokenizer does not join string constants separated by a newline ('a'\\n'b')",
)];

/// Texts with no `;` inside a literal, identifier or comment, on which splitting at every
/// `;` happens to be right. (They test the lexing around them: a splitter that misread an
/// E'' string, `a$b` or a comment ended by `\r` would split them wrongly.) Every other text
/// must catch such a splitter.
const NO_INNER_SEMICOLON: &[&str] = &[
    "backslash-standard-strings.sql",
    "comments-in-comments.sql",
    "dollar-in-identifiers.sql",
    "line-comment-cr.sql",
    "numbers.sql",
];

#[tokio::test(flavor = "multi_thread")]
async fn proxy_statement_boundaries_match_what_postgres_executes() {
    let pg = tokio::task::spawn_blocking(|| LocalPostgres::start(&PgOptions { tls: None }))
        .await
        .unwrap()
        .expect("start PostgreSQL (scripts/test installs it)");
    pg.sql("postgres", "CREATE ROLE jit_trust LOGIN").unwrap();
    let mut s = connect(&pg).await;

    let corpus = corpus();
    assert!(corpus.len() >= 15, "corpus missing: {corpus:?}");
    let mut failures = Vec::new();
    for (name, text) in &corpus {
        let known = KNOWN_MISMATCHES.iter().find(|(n, _)| n == name);
        match (mismatch(&mut s, text, proxy_split).await, known) {
            (None, None) => {}
            (Some(why), None) => failures.push(format!("{name}: {text:?}\n  {why}")),
            (None, Some(_)) => failures.push(format!(
                "{name} now matches the server: remove it from KNOWN_MISMATCHES"
            )),
            (Some(_), Some((_, reason))) => {
                let classified = jitgate_protocol::sql::classify(text);
                let closed = classified.len() == 1
                    && classified[0].class == StatementClass::Unknown
                    && classified[0].text == text.trim().trim_end_matches(';').trim_end();
                if !closed {
                    failures.push(format!("{name} ({reason}) no longer fails closed: {classified:?}"));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "splitter and server disagree:\n{}",
        failures.join("\n")
    );

    let mut naive_agrees = Vec::new();
    for (name, text) in &corpus {
        if mismatch(&mut s, text, naive_split).await.is_none() {
            naive_agrees.push(name.as_str());
        }
    }
    assert_eq!(
        naive_agrees, NO_INNER_SEMICOLON,
        "the corpus must catch a splitter that ignores quoting and comments"
    );
}
