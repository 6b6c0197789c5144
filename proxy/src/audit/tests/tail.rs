//! `audit tail`: filters, text lines and following a growing, rotating file.

use std::io::Write as _;

use super::super::chain::{encode, GENESIS};
use super::super::tail::{print_log, print_logs, text, Filter, Follower, Printer};

const RECORDS: &[&str] = &[
    r#"{"v":1,"ts":"2026-11-22T05:39:00.000Z","event":"grant.created","grant":{"id":"g-1","user":"alice","target":"prod-db","access":"read","reason":"INC-1","created_by":"admin","created_at":"2026-11-22T05:39:00.000Z","expires_at":"2026-11-22T06:09:00.000Z"}}"#,
    r#"{"v":1,"ts":"2026-11-22T05:40:01.123Z","event":"session.start","session_id":"s-a","grant_id":"g-1","user":"alice","roles":["dev"],"target":"prod-db","database":"app","access":"read","client_addr":"127.0.0.1:5555"}"#,
    r#"{"v":1,"ts":"2026-11-22T05:40:01.200Z","event":"session.start","session_id":"s-b","grant_id":"g-2","user":"bob","roles":["dev"],"target":"prod-db","database":"app","access":"read","client_addr":"127.0.0.1:5556"}"#,
    r#"{"v":1,"ts":"2026-11-22T05:40:02.000Z","event":"statement","session_id":"s-a","statement":1,"grant_id":"g-1","user":"alice","target":"prod-db","access":"read","protocol":"simple","text":"SELECT 1\nFROM t","class":"read","kind":"select","decision":"allowed"}"#,
    r#"{"v":1,"ts":"2026-11-22T05:40:02.001Z","event":"statement.end","session_id":"s-a","statement":1,"outcome":{"status":"ok","tag":"SELECT 1","rows":1},"duration_us":80}"#,
    r#"{"v":1,"ts":"2026-11-22T05:40:02.002Z","event":"statement.end","session_id":"s-b","statement":1,"outcome":{"status":"error","sqlstate":"42501","message":"denied"},"duration_us":90}"#,
    r#"{"v":1,"ts":"2026-11-22T05:40:03.000Z","event":"session.end","session_id":"s-a","grant_id":"g-1","user":"alice","roles":["dev"],"target":"prod-db","access":"read","client_addr":"127.0.0.1:5555","reason":"client_closed","bytes_from_client":25,"bytes_to_client":129,"duration_ms":2940}"#,
    r#"{"v":1,"ts":"2026-11-22T05:40:04.000Z","event":"statement.end","session_id":"s-a","statement":2,"outcome":{"status":"not_executed"},"duration_us":0}"#,
];

/// The records as chained lines.
fn chained() -> Vec<Vec<u8>> {
    let mut prev = GENESIS;
    RECORDS
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut line = Vec::new();
            prev = encode(i as u64 + 1, &prev, r.as_bytes(), &mut line);
            line
        })
        .collect()
}

fn run(filter: Filter, json: bool) -> Vec<String> {
    let mut p = Printer::new(filter, json);
    let mut out = Vec::new();
    for line in chained() {
        p.line(line.strip_suffix(b"\n").unwrap(), &mut out).unwrap();
    }
    String::from_utf8(out).unwrap().lines().map(String::from).collect()
}

fn events(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            format!("{} {}", v["event"].as_str().unwrap(), v["seq"])
        })
        .collect()
}

#[test]
fn text_lines_read_like_the_event() {
    let lines = run(Filter::default(), false);
    assert_eq!(lines.len(), RECORDS.len());
    assert_eq!(
        lines[1],
        "2026-11-22T05:40:01.123Z session.start alice prod-db s-a grant g-1 from 127.0.0.1:5555"
    );
    assert_eq!(
        lines[0],
        "2026-11-22T05:39:00.000Z grant.created alice prod-db g-1 read until 2026-11-22T06:09:00.000Z by admin: INC-1"
    );
    assert_eq!(
        lines[3],
        "2026-11-22T05:40:02.000Z statement alice prod-db s-a#1 read: SELECT 1\\nFROM t"
    );
    assert_eq!(
        lines[4],
        "2026-11-22T05:40:02.001Z statement.end s-a#1 ok SELECT 1 rows 1 80us"
    );
    assert_eq!(
        lines[6],
        "2026-11-22T05:40:03.000Z session.end alice prod-db s-a client_closed in 25B out 129B 2940ms"
    );
}

#[test]
fn long_statements_are_shortened() {
    let long = "x".repeat(500);
    let v = serde_json::json!({"ts": "t", "event": "statement", "text": long, "class": "read", "decision": "denied", "denied_by": "guardrail"});
    let line = text(&v);
    assert!(line.contains(" denied by guardrail: "), "{line}");
    assert!(line.ends_with(&format!("{}...", "x".repeat(120))), "{line}");
}

#[test]
fn user_filter_follows_sessions_into_statement_ends() {
    let alice = run(
        Filter {
            user: Some("alice".into()),
            ..Filter::default()
        },
        true,
    );
    assert_eq!(
        events(&alice),
        [
            "grant.created 1",
            "session.start 2",
            "statement 4",
            "statement.end 5",
            "session.end 7"
        ]
    );
    let bob_on_prod = run(
        Filter {
            user: Some("bob".into()),
            target: Some("prod-db".into()),
            ..Filter::default()
        },
        true,
    );
    assert_eq!(events(&bob_on_prod), ["session.start 3", "statement.end 6"]);
    // --json prints the lines exactly as written.
    assert_eq!(format!("{}\n", bob_on_prod[0]).into_bytes(), chained()[2]);
}

#[test]
fn session_and_since_filters() {
    let s_a = run(
        Filter {
            session: Some("s-a".into()),
            ..Filter::default()
        },
        true,
    );
    assert_eq!(
        events(&s_a),
        [
            "session.start 2",
            "statement 4",
            "statement.end 5",
            "session.end 7",
            "statement.end 8"
        ]
    );
    let since = humantime::parse_rfc3339("2026-11-22T05:40:02.001Z").unwrap();
    let late = run(
        Filter {
            since: Some(since),
            ..Filter::default()
        },
        true,
    );
    assert_eq!(late.len(), 4);
}

#[test]
fn follow_reads_growth_and_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let active = dir.path().join("audit.jsonl");
    let lines = chained();
    std::fs::write(&active, lines[..2].concat()).unwrap();
    let mut follower = Follower::open(&active).unwrap();
    let mut printer = Printer::new(Filter::default(), true);
    let mut out = Vec::new();
    follower.poll(&mut printer, &mut out).unwrap();
    assert_eq!(String::from_utf8_lossy(&out).lines().count(), 2);

    // Half a line is held back until its end arrives.
    let mut f = std::fs::OpenOptions::new().append(true).open(&active).unwrap();
    f.write_all(&lines[2][..20]).unwrap();
    follower.poll(&mut printer, &mut out).unwrap();
    assert_eq!(String::from_utf8_lossy(&out).lines().count(), 2);
    f.write_all(&lines[2][20..]).unwrap();
    f.write_all(&lines[3]).unwrap();
    follower.poll(&mut printer, &mut out).unwrap();
    assert_eq!(String::from_utf8_lossy(&out).lines().count(), 4);

    // Rotation: the old file gets its last record, is renamed, and a new file starts.
    f.write_all(&lines[4]).unwrap();
    drop(f);
    std::fs::rename(&active, super::super::files::rotated_path(&active, 1)).unwrap();
    std::fs::write(&active, lines[5..].concat()).unwrap();
    follower.poll(&mut printer, &mut out).unwrap();
    assert_eq!(out, lines.concat());

    // Reading the whole log from the start gives the same.
    let mut again = Vec::new();
    print_log(&active, &mut Printer::new(Filter::default(), true), false, &mut again).unwrap();
    assert_eq!(again, lines.concat());
}

#[test]
fn no_log_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut out = Vec::new();
    let err = print_log(
        &dir.path().join("audit.jsonl"),
        &mut Printer::new(Filter::default(), false),
        false,
        &mut out,
    )
    .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
}

/// Chained lines of `(ts, replica, grant id)` records, from seq 1.
fn replica_log(records: &[(&str, &str, &str)]) -> Vec<u8> {
    let mut prev = GENESIS;
    let mut out = Vec::new();
    for (i, (ts, replica, id)) in records.iter().enumerate() {
        let body = format!(
            r#"{{"v":1,"ts":"{ts}","replica":"{replica}","event":"grant.expired","grant_id":"{id}","user":"alice","target":"prod-db","access":"read"}}"#
        );
        prev = encode(i as u64 + 1, &prev, body.as_bytes(), &mut out);
    }
    out
}

#[test]
fn several_logs_are_merged_by_time_each_in_its_own_order() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.jsonl"), dir.path().join("b.jsonl"));
    // a's third record is stamped before its second (written in another order than stamped):
    // it stays after it.
    std::fs::write(
        &a,
        replica_log(&[
            ("2026-11-22T05:40:01.000Z", "a", "g-a1"),
            ("2026-11-22T05:40:03.000Z", "a", "g-a2"),
            ("2026-11-22T05:40:02.500Z", "a", "g-a3"),
            ("2026-11-22T05:40:05.000Z", "a", "g-a4"),
        ]),
    )
    .unwrap();
    // b's first records sit in a rotated file.
    let b_lines = replica_log(&[
        ("2026-11-22T05:40:00.500Z", "b", "g-b1"),
        ("2026-11-22T05:40:02.000Z", "b", "g-b2"),
        ("2026-11-22T05:40:03.000Z", "b", "g-b3"),
        ("2026-11-22T05:40:06.000Z", "b", "g-b4"),
    ]);
    let cut = b_lines
        .iter()
        .enumerate()
        .filter(|(_, c)| **c == b'\n')
        .nth(1)
        .unwrap()
        .0
        + 1;
    std::fs::write(super::super::files::rotated_path(&b, 1), &b_lines[..cut]).unwrap();
    std::fs::write(&b, &b_lines[cut..]).unwrap();
    let run = |filter: Filter, json: bool| {
        let mut out = Vec::new();
        print_logs(
            &[a.clone(), b.clone()],
            &mut Printer::new(filter, json),
            false,
            &mut out,
        )
        .unwrap();
        String::from_utf8(out).unwrap()
    };
    let json = run(Filter::default(), true);
    let ids: Vec<String> = json
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["grant_id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    // Equal stamps (a2, b3): in the order the logs are given.
    assert_eq!(ids, ["g-b1", "g-a1", "g-b2", "g-a2", "g-a3", "g-b3", "g-a4", "g-b4"]);
    // --json prints every line as written, once.
    let a_text = std::fs::read_to_string(&a).unwrap();
    let mut written: Vec<&str> = std::str::from_utf8(&b_lines).unwrap().lines().collect();
    written.extend(a_text.lines());
    let mut printed: Vec<&str> = json.lines().collect();
    written.sort_unstable();
    printed.sort_unstable();
    assert_eq!(printed, written);
    // Text names the replica; filters apply to every log.
    let text = run(
        Filter {
            since: Some(humantime::parse_rfc3339("2026-11-22T05:40:05.000Z").unwrap()),
            ..Filter::default()
        },
        false,
    );
    assert_eq!(
        text.lines().collect::<Vec<_>>(),
        [
            "2026-11-22T05:40:05.000Z [a] grant.expired alice prod-db g-a4 read",
            "2026-11-22T05:40:06.000Z [b] grant.expired alice prod-db g-b4 read"
        ]
    );
}

#[test]
fn with_several_logs_a_missing_one_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.jsonl");
    std::fs::write(&a, replica_log(&[("2026-11-22T05:40:01.000Z", "a", "g-a1")])).unwrap();
    let missing = dir.path().join("b.jsonl");
    let mut out = Vec::new();
    let err = print_logs(
        &[a, missing.clone()],
        &mut Printer::new(Filter::default(), true),
        false,
        &mut out,
    )
    .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    assert!(err.to_string().starts_with(&missing.display().to_string()), "{err}");
}

#[test]
fn the_search_reads_logrotates_files_and_the_proxys_in_chain_order() {
    use super::super::tail::{search, Search};
    let dir = tempfile::tempdir().unwrap();
    let active = dir.path().join("audit.jsonl");
    let lines = chained();
    // Records 1-2 rotated by logrotate (gzip), 3-4 by the proxy, the rest active.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&lines[..2].concat()).unwrap();
    std::fs::write(dir.path().join("audit.jsonl.2.gz"), gz.finish().unwrap()).unwrap();
    std::fs::write(super::super::files::rotated_path(&active, 3), lines[2..4].concat()).unwrap();
    std::fs::write(&active, lines[4..].concat()).unwrap();
    let all = Search {
        limit: 100,
        ..Search::default()
    };
    let (found, truncated) = search(&active, &all).unwrap();
    let seqs: Vec<u64> = found.iter().map(|v| v["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=RECORDS.len() as u64).collect::<Vec<_>>());
    assert!(!truncated);

    // alice's session, statements only (statement.end by its session), the latest one.
    let q = Search {
        filter: Filter {
            user: Some("alice".into()),
            ..Filter::default()
        },
        event: Some("statement".into()),
        limit: 1,
        ..Search::default()
    };
    let (found, truncated) = search(&active, &q).unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(
        (found[0]["event"].as_str(), found[0]["statement"].as_u64()),
        (Some("statement.end"), Some(1))
    );
    assert!(truncated, "the statement itself matched too");
    let text = Search {
        text: Some("from T".into()),
        limit: 10,
        ..Search::default()
    };
    assert_eq!(search(&active, &text).unwrap().0.len(), 1, "case-insensitive text");
}
