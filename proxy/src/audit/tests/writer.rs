//! The writer: group commit from many threads, rotation, restart, crash repair and failures.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use super::super::chain::verify_files;
use super::super::files::{chain_files, rotated_files};
use super::super::{AuditError, AuditEvent, AuditLog, Written};
use super::{config, event};
use crate::config::AuditConfig;
use crate::metrics::Metrics;
use crate::model::UserName;

fn verify(config: &AuditConfig) -> super::super::chain::Summary {
    verify_files(&chain_files(&config.path).unwrap()).unwrap_or_else(|e| panic!("{e}"))
}

fn grant_ids(config: &AuditConfig) -> Vec<String> {
    chain_files(&config.path)
        .unwrap()
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .map(|l| {
                    serde_json::from_str::<serde_json::Value>(l).unwrap()["grant_id"]
                        .as_str()
                        .unwrap()
                        .to_owned()
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn concurrent_submitters_each_find_their_record_written() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let metrics = Metrics::new();
    let log = AuditLog::open(&config, Arc::clone(&metrics)).unwrap();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let log = Arc::clone(&log);
            let path = config.path.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
                for i in 0..60 {
                    let ids: Vec<String> = match t % 3 {
                        0 => {
                            let id = format!("{t}-{i}");
                            log.record_blocking(event(&id)).unwrap();
                            vec![id]
                        }
                        1 => {
                            let ids: Vec<String> = (0..3).map(|k| format!("{t}-{i}-{k}")).collect();
                            let ticket = log.enqueue(ids.iter().map(|id| event(id)).collect()).unwrap();
                            rt.block_on(ticket).unwrap();
                            ids
                        }
                        _ => {
                            // The relay's path: written here when the file is free, else queued.
                            let ids: Vec<String> = (0..2).map(|k| format!("{t}-{i}-{k}")).collect();
                            match log.write_or_enqueue(ids.iter().map(|id| event(id)).collect()).unwrap() {
                                Written::Now => {}
                                Written::Later(ticket) => rt.block_on(ticket).unwrap(),
                            }
                            ids
                        }
                    };
                    // Acknowledged means in the file.
                    let text = std::fs::read_to_string(&path).unwrap();
                    for id in ids {
                        assert!(
                            text.contains(&format!("\"g-{id}\"")),
                            "g-{id} acknowledged but not written"
                        );
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    log.close();
    let s = verify(&config);
    // Threads 0, 3, 6 record one at a time; 1, 4, 7 enqueue three; 2 and 5 write two.
    let total = 3 * 60 + 3 * 60 * 3 + 2 * 60 * 2;
    assert_eq!((s.records, s.seqs), (total, Some((1, total))));
    let ids = grant_ids(&config);
    assert_eq!(ids.iter().collect::<HashSet<_>>().len() as u64, total);
    assert_eq!(metrics.audit_records_total.get(), total);
    assert_eq!(metrics.audit_queue_depth.get(), 0);
    let batches = metrics.audit_batch_records.get_sample_count();
    assert!(batches > 0 && batches <= total, "{batches}");
    assert!(metrics.audit_fsync_seconds.get_sample_count() >= 1);
}

#[test]
fn records_of_one_submission_stay_together_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let log = AuditLog::open(&config, Metrics::new()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let tickets: Vec<_> = (0..20)
        .map(|i| {
            log.enqueue((0..5).map(|k| event(&format!("{i}-{k}"))).collect())
                .unwrap()
        })
        .collect();
    for t in tickets {
        rt.block_on(t).unwrap();
    }
    // An empty submission is acknowledged at once.
    rt.block_on(log.enqueue(Vec::new()).unwrap()).unwrap();
    drop(log);
    let expected: Vec<String> = (0..20)
        .flat_map(|i| (0..5).map(move |k| format!("g-{i}-{k}")))
        .collect();
    assert_eq!(grant_ids(&config), expected);
}

#[test]
fn rotation_keeps_one_chain_across_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.max_file_bytes = 4096;
    let log = AuditLog::open(&config, Metrics::new()).unwrap();
    for i in 0..120 {
        log.record_blocking(event(&i.to_string())).unwrap();
    }
    drop(log);
    let rotated = rotated_files(&config.path).unwrap();
    assert!(rotated.len() >= 5, "{rotated:?}");
    for (seq, path) in &rotated {
        assert!(std::fs::metadata(path).unwrap().len() <= 4096, "{}", path.display());
        let first = std::fs::read_to_string(path).unwrap();
        let first: serde_json::Value = serde_json::from_str(first.lines().next().unwrap()).unwrap();
        assert_eq!(first["seq"], *seq, "{} is named after its first record", path.display());
    }
    let s = verify(&config);
    assert_eq!((s.records, s.seqs), (120, Some((1, 120))));
}

#[test]
fn a_restart_continues_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.max_file_bytes = 4096;
    for round in 0..3 {
        let log = AuditLog::open(&config, Metrics::new()).unwrap();
        for i in 0..25 {
            log.record_blocking(event(&format!("{round}-{i}"))).unwrap();
        }
        drop(log);
    }
    let s = verify(&config);
    assert_eq!((s.records, s.seqs), (75, Some((1, 75))));

    // A crash between rotating and creating the next file leaves no active file: the chain
    // continues after the newest rotated one (here with no tip file to tell otherwise).
    let (first, newest) = rotated_files(&config.path).unwrap().pop().unwrap();
    let last_rotated_seq = first + std::fs::read_to_string(&newest).unwrap().lines().count() as u64 - 1;
    std::fs::remove_file(&config.path).unwrap();
    std::fs::remove_file(&config.tip_path).unwrap();
    let log = AuditLog::open(&config, Metrics::new()).unwrap();
    log.record_blocking(event("after")).unwrap();
    drop(log);
    let s = verify(&config);
    assert_eq!(s.seqs, Some((1, last_rotated_seq + 1)));
}

#[test]
fn an_incomplete_last_line_is_cut_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let log = AuditLog::open(&config, Metrics::new()).unwrap();
    for i in 0..3 {
        log.record_blocking(event(&i.to_string())).unwrap();
    }
    drop(log);
    // A crash mid-write: half a record, never acknowledged.
    let text = std::fs::read(&config.path).unwrap();
    let line = text.split(|&b| b == b'\n').next().unwrap();
    let mut torn = text.clone();
    torn.extend_from_slice(&line[..line.len() / 2]);
    std::fs::write(&config.path, &torn).unwrap();
    let log = AuditLog::open(&config, Metrics::new()).unwrap();
    assert_eq!(std::fs::read(&config.path).unwrap(), text);
    log.record_blocking(event("3")).unwrap();
    drop(log);
    let s = verify(&config);
    assert_eq!(s.seqs, Some((1, 4)));
}

#[test]
fn a_log_without_a_chain_is_set_aside() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let legacy = "{\"v\":1,\"ts\":\"2026-11-22T04:52:01.482Z\",\"event\":\"grant.expired\"}\n".repeat(3);
    std::fs::write(&config.path, &legacy).unwrap();
    let log = AuditLog::open(&config, Metrics::new()).unwrap();
    log.record_blocking(event("new")).unwrap();
    drop(log);
    let s = verify(&config);
    assert_eq!(s.seqs, Some((1, 1)));
    let aside: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("audit.jsonl.unchained-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(std::fs::read_to_string(dir.path().join(&aside[0])).unwrap(), legacy);
}

#[test]
fn a_device_that_refuses_writes_fails_each_record_and_the_writer_stays() {
    let mut config = config(std::path::Path::new("/"));
    config.path = "/dev/full".into();
    let metrics = Metrics::new();
    let log = AuditLog::open(&config, Arc::clone(&metrics)).unwrap();
    for _ in 0..3 {
        let err = log.record_blocking(event("x")).unwrap_err();
        assert!(matches!(err, AuditError::Io { .. }), "{err}");
        assert!(err.to_string().contains("/dev/full"), "{err}");
    }
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let ticket = log.enqueue(vec![event("y"), event("z")]).unwrap();
    assert!(matches!(rt.block_on(ticket), Err(AuditError::Io { .. })));
    assert_eq!(
        metrics
            .audit_write_errors_total
            .with_label_values(&["grant.expired"])
            .get(),
        5
    );
    assert_eq!(metrics.audit_records_total.get(), 0);
    drop(log);
}

#[test]
fn a_failed_batch_is_refused_and_the_next_one_continues_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.max_file_bytes = 4096;
    let metrics = Metrics::new();
    let log = AuditLog::open(&config, Arc::clone(&metrics)).unwrap();
    log.record_blocking(event("0")).unwrap();
    // Something already holds the name the file would be rotated to: rotation (and so the
    // batch) fails until it is gone.
    let blocker = dir.path().join("audit.jsonl.00000000000000000001");
    std::fs::create_dir(&blocker).unwrap();
    let mut written = 1;
    let mut failed = 0;
    for i in 1..40 {
        match log.record_blocking(event(&i.to_string())) {
            Ok(()) => written += 1,
            Err(e) => {
                assert!(e.to_string().contains("already exists"), "{e}");
                failed += 1;
            }
        }
    }
    assert!(failed > 0 && written > 1);
    let before = std::fs::read(&config.path).unwrap();
    assert!(before.ends_with(b"\n"));
    std::fs::remove_dir(&blocker).unwrap();
    log.record_blocking(event("last")).unwrap();
    drop(log);
    let s = verify(&config);
    assert_eq!(s.seqs, Some((1, written + 1)));
    assert_eq!(
        metrics
            .audit_write_errors_total
            .with_label_values(&["grant.expired"])
            .get(),
        failed
    );
    assert!(!grant_ids(&config).iter().any(|id| id == &format!("g-{}", written)));
}

#[test]
fn a_full_queue_refuses_at_once() {
    // A FIFO nobody reads from blocks the writer, so the queue fills up.
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.path = dir.path().join("pipe");
    config.queue_depth = 16;
    let ok = std::process::Command::new("mkfifo").arg(&config.path).status().unwrap();
    assert!(ok.success());
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let path = config.path.clone();
    let reader = std::thread::spawn(move || {
        use std::io::Read as _;
        let mut f = std::fs::File::open(path).unwrap();
        go_rx.recv().unwrap();
        let mut all = Vec::new();
        f.read_to_end(&mut all).unwrap();
        all
    });
    let metrics = Metrics::new();
    let log = AuditLog::open(&config, Arc::clone(&metrics)).unwrap();
    let big = |i: usize| AuditEvent::SessionDenied {
        user: UserName::new("alice").unwrap(),
        target: "prod-db".into(),
        client_addr: "127.0.0.1:5555".parse().unwrap(),
        code: "no_grant".into(),
        reason: format!("{i} {}", "x".repeat(8192)),
    };
    let mut tickets = Vec::new();
    let mut refused = None;
    for i in 0..10_000 {
        match log.enqueue(vec![big(i)]) {
            Ok(t) => tickets.push(t),
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    assert!(
        matches!(refused, Some(AuditError::QueueFull { depth: 16 })),
        "{refused:?}"
    );
    assert_eq!(
        metrics
            .audit_write_errors_total
            .with_label_values(&["session.denied"])
            .get(),
        1
    );
    assert!(metrics.audit_queue_depth.get() > 0);
    go_tx.send(()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let accepted = tickets.len() as u64;
    for t in tickets {
        rt.block_on(t).unwrap();
    }
    drop(log);
    let stream = reader.join().unwrap();
    let mut v = super::super::chain::Verifier::new();
    v.check_reader(std::path::Path::new("pipe"), &stream[..]).unwrap();
    assert_eq!(v.finish().seqs, Some((1, accepted)));
}

#[test]
fn a_closed_log_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(&config(dir.path()), Metrics::new()).unwrap();
    log.close();
    log.close();
    assert!(matches!(log.record_blocking(event("a")), Err(AuditError::Closed)));
    assert!(matches!(log.enqueue(vec![event("b")]), Err(AuditError::Closed)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_and_tickets_work_inside_the_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let log = AuditLog::open(&config, Metrics::new()).unwrap();
    log.record_blocking(event("sync")).unwrap();
    let ticket = log.enqueue(vec![event("async")]).unwrap();
    tokio::time::timeout(Duration::from_secs(10), ticket)
        .await
        .unwrap()
        .unwrap();
    // Fire and forget: dropping the ticket still writes the record.
    drop(log.enqueue(vec![event("dropped")]).unwrap());
    let log2 = Arc::clone(&log);
    tokio::spawn(async move { log2.record(event("task")).await })
        .await
        .unwrap()
        .unwrap();
    drop(log);
    assert_eq!(grant_ids(&config), ["g-sync", "g-async", "g-dropped", "g-task"]);
}

#[test]
fn the_api_has_the_promised_bounds() {
    fn ticket<T: std::future::Future<Output = Result<(), AuditError>> + Send + Unpin + 'static>() {}
    fn shared<T: Send + Sync + 'static>() {}
    fn error<T: std::error::Error + Clone + Send + Sync + 'static>() {}
    ticket::<super::super::AuditTicket>();
    shared::<AuditLog>();
    error::<AuditError>();
}

#[test]
fn write_or_enqueue_writes_at_once_when_the_file_is_free_and_queues_when_it_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let metrics = Metrics::new();
    let log = AuditLog::open(&config, Arc::clone(&metrics)).unwrap();
    let in_file = |id: &str| {
        std::fs::read_to_string(&config.path)
            .unwrap()
            .contains(&format!("\"g-{id}\""))
    };
    for i in 0..5 {
        let id = format!("now-{i}");
        let written = log.write_or_enqueue(vec![event(&id)]).unwrap();
        assert!(matches!(written, Written::Now), "{written:?}");
        // In the file when the call returns: no hand-off to the writer thread.
        assert!(in_file(&id));
    }
    // While someone else holds the file, the records are queued, not waited for.
    let held = log.hold_file();
    let Written::Later(ticket) = log.write_or_enqueue(vec![event("later")]).unwrap() else {
        panic!("written while the file was held");
    };
    let waiter = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(ticket)
    });
    assert!(!in_file("later"));
    drop(held);
    waiter.join().unwrap().unwrap();
    assert!(in_file("later"));
    log.close();
    assert_eq!(verify(&config).records, 6);
    assert_eq!(metrics.audit_records_total.get(), 6);
    assert!(matches!(
        log.write_or_enqueue(vec![event("closed")]),
        Err(AuditError::Closed)
    ));
}

#[test]
fn write_or_enqueue_always_queues_when_every_batch_is_synced() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.fsync_interval = Duration::ZERO;
    let metrics = Metrics::new();
    let log = AuditLog::open(&config, Arc::clone(&metrics)).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    for i in 0..3 {
        match log.write_or_enqueue(vec![event(&i.to_string())]).unwrap() {
            Written::Later(ticket) => rt.block_on(ticket).unwrap(),
            Written::Now => panic!("fsync_interval = 0 syncs every batch on the writer thread"),
        }
    }
    log.close();
    // One sync per batch (the ack may come before its sync: counted once the writer stopped).
    assert_eq!(metrics.audit_fsync_seconds.get_sample_count(), 3);
    assert_eq!(verify(&config).records, 3);
}

#[test]
fn write_or_enqueue_leaves_devices_to_the_writer_thread_and_reports_their_failure() {
    // A pipe or device may block for as long as its reader likes: never written on the
    // caller's thread, which may be a tokio worker.
    let mut config = config(std::path::Path::new("/"));
    config.path = "/dev/full".into();
    let metrics = Metrics::new();
    let log = AuditLog::open(&config, Arc::clone(&metrics)).unwrap();
    let Written::Later(ticket) = log.write_or_enqueue(vec![event("x"), event("y")]).unwrap() else {
        panic!("a device was written inline");
    };
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let err = rt.block_on(ticket).unwrap_err();
    assert!(matches!(err, AuditError::Io { .. }), "{err}");
    assert_eq!(
        metrics
            .audit_write_errors_total
            .with_label_values(&["grant.expired"])
            .get(),
        2
    );
    assert_eq!(metrics.audit_records_total.get(), 0);
}

/// `[audit]` and a writer tick so long that only appends and `close` write deferred records.
fn untimed(dir: &std::path::Path) -> (AuditConfig, Arc<Metrics>, Arc<AuditLog>) {
    let mut config = config(dir);
    config.fsync_interval = Duration::from_secs(3600);
    let metrics = Metrics::new();
    let log = AuditLog::open_with_tick(&config, Arc::clone(&metrics), Duration::from_secs(3600)).unwrap();
    (config, metrics, log)
}

#[test]
fn deferred_records_have_no_write_of_their_own_and_go_out_first_with_the_next_append() {
    let dir = tempfile::tempdir().unwrap();
    let (config, metrics, log) = untimed(dir.path());
    log.defer(vec![event("end-1"), event("end-2")]);
    assert_eq!(std::fs::read_to_string(&config.path).unwrap(), "", "a deferral wrote");
    let written = log.write_or_enqueue(vec![event("next")]).unwrap();
    assert!(matches!(written, Written::Now), "{written:?}");
    assert_eq!(grant_ids(&config), ["g-end-1", "g-end-2", "g-next"]);
    // One write for the three.
    assert_eq!(metrics.audit_batch_records.get_sample_count(), 1);
    assert_eq!(metrics.audit_batch_records.get_sample_sum(), 3.0);
    // Close writes what is still deferred.
    log.defer(vec![event("last")]);
    log.close();
    assert_eq!(grant_ids(&config), ["g-end-1", "g-end-2", "g-next", "g-last"]);
    assert_eq!(verify(&config).records, 4);
    assert_eq!(metrics.audit_queue_depth.get(), 0);
}

#[test]
fn deferred_records_go_before_a_later_record_of_the_writer_thread() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _metrics, log) = untimed(dir.path());
    log.defer(vec![event("end")]);
    // session.end's path: the writer thread, which takes the waiting records first.
    log.record_blocking(event("session-end")).unwrap();
    assert_eq!(grant_ids(&config), ["g-end", "g-session-end"]);
    log.close();
}

#[test]
fn a_deferred_record_alone_is_written_by_the_writer_thread_within_its_tick() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let log = AuditLog::open(&config, Metrics::new()).unwrap();
    log.defer(vec![event("alone")]);
    let start = std::time::Instant::now();
    while grant_ids(&config).is_empty() && start.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(grant_ids(&config), ["g-alone"]);
    log.close();
}

#[test]
fn records_that_find_the_file_held_go_out_with_the_next_holders_write() {
    let dir = tempfile::tempdir().unwrap();
    let (config, metrics, log) = untimed(dir.path());
    let held = log.hold_file();
    let Written::Later(ticket) = log.write_or_enqueue(vec![event("waited")]).unwrap() else {
        panic!("written while the file was held");
    };
    drop(held);
    // Not handed to the writer thread (whose tick is an hour): the next append takes them.
    assert_eq!(std::fs::read_to_string(&config.path).unwrap(), "");
    assert!(matches!(
        log.write_or_enqueue(vec![event("holder")]).unwrap(),
        Written::Now
    ));
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    rt.block_on(ticket).unwrap();
    assert_eq!(grant_ids(&config), ["g-waited", "g-holder"]);
    assert_eq!(metrics.audit_batch_records.get_sample_count(), 1);
    // A waiter left when the log closes is written and acknowledged.
    let held = log.hold_file();
    let Written::Later(ticket) = log.write_or_enqueue(vec![event("at-close")]).unwrap() else {
        panic!("written while the file was held");
    };
    drop(held);
    log.close();
    rt.block_on(ticket).unwrap();
    assert_eq!(grant_ids(&config), ["g-waited", "g-holder", "g-at-close"]);
    assert_eq!(verify(&config).records, 3);
}

/// Bytes of `path` in the page cache, as `fincore` (util-linux) counts them.
fn resident_bytes(path: &std::path::Path) -> u64 {
    let out = std::process::Command::new("fincore")
        .args(["--bytes", "--noheadings", "--output", "RES"])
        .arg(path)
        .output()
        .expect("fincore (util-linux) runs; scripts/test installs it");
    assert!(
        out.status.success(),
        "fincore: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

#[test]
fn the_periodic_sync_lets_the_kernel_drop_the_synced_pages_of_the_log() {
    const KEPT: u64 = 128 << 10;
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let log = AuditLog::open(&config, Metrics::new()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let events = (0..4000).map(|i| event(&format!("page-{i}"))).collect();
    rt.block_on(log.enqueue(events).unwrap()).unwrap();
    let written = std::fs::metadata(&config.path).unwrap().len();
    assert!(written > 512 << 10, "{written} bytes");
    // The writer syncs every 20 ms; once it has, at most the folio still appended to stays
    // (a large folio can hold several pages).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut resident = resident_bytes(&config.path);
    while resident > KEPT && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        resident = resident_bytes(&config.path);
    }
    assert!(
        resident <= KEPT,
        "{resident} of {written} bytes still cached after the sync"
    );
    // Advice only: everything is still there, in order.
    assert_eq!(verify(&config).records, 4000);
    log.close();
}
