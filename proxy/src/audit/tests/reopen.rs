//! The log renamed, removed or truncated from outside, reopened on request, and restarted
//! with its files renamed, compressed or gone: the batch that finds its file moved fails on
//! both write paths, and the chain continues unbroken in the file the path names now.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::super::chain::{verify_files, Summary};
use super::super::{siblings, AuditError, AuditLog, ReopenReason, Written};
use super::{config, event};
use crate::config::AuditConfig;
use crate::metrics::Metrics;
use crate::model::UserName;

fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn renamed(config: &AuditConfig, suffix: &str) -> PathBuf {
    let mut name = config.path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// `files` verified as one log, in chain order.
fn verify(files: Vec<PathBuf>) -> Summary {
    verify_files(&siblings::chain_order(files)).unwrap_or_else(|e| panic!("{e}"))
}

/// The relay's path: written inline when the file is free, else queued and waited for.
fn write(log: &AuditLog, id: &str) -> Result<(), AuditError> {
    match log.write_or_enqueue(vec![event(id)])? {
        Written::Now => Ok(()),
        Written::Later(ticket) => tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(ticket),
    }
}

/// `[audit]` for these tests: the writer thread's timed sync (which holds the file) is rare,
/// so the relay's path writes inline.
fn quiet(dir: &Path) -> AuditConfig {
    let mut c = config(dir);
    c.fsync_interval = std::time::Duration::from_secs(3600);
    c
}

fn moved(e: &AuditError) -> Option<ReopenReason> {
    match e {
        AuditError::Moved { reason, .. } => Some(*reason),
        _ => None,
    }
}

#[test]
fn a_renamed_file_fails_the_batch_on_both_write_paths_and_the_chain_continues_in_a_new_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = quiet(dir.path());
    let metrics = Metrics::new();
    let log = AuditLog::open(&config, Arc::clone(&metrics)).unwrap();
    for i in 0..3 {
        log.record_blocking(event(&i.to_string())).unwrap();
    }
    let first = renamed(&config, ".1");
    std::fs::rename(&config.path, &first).unwrap();
    let before = std::fs::read(&first).unwrap();

    // Inline (the relay's path): refused, and cut back out of the renamed file.
    let err = write(&log, "refused-inline").unwrap_err();
    assert_eq!(moved(&err), Some(ReopenReason::Renamed), "{err}");
    assert!(err.to_string().contains("was renamed"), "{err}");
    assert_eq!(std::fs::read(&first).unwrap(), before);
    // Opening the new file (which reads the old tail and writes the tip file) is left to the
    // writer thread: the session task that found the move opened nothing.
    assert!(!config.path.exists(), "a session task reopened the log");
    write(&log, "4").unwrap();
    // The new file starts the continued chain.
    let new = lines(&config.path);
    assert_eq!(new.len(), 2);
    assert_eq!(new[0]["event"], "audit.reopened");
    assert_eq!(
        (new[0]["reason"].as_str(), new[0]["new_file"].as_bool()),
        (Some("renamed"), Some(true))
    );
    assert_eq!(new[0]["seq"], 4);
    assert_eq!(new[1]["grant_id"], "g-4");

    // The writer thread's path does the same check.
    let second = renamed(&config, ".2");
    std::fs::rename(&config.path, &second).unwrap();
    let err = log.record_blocking(event("refused-queued")).unwrap_err();
    assert_eq!(moved(&err), Some(ReopenReason::Renamed), "{err}");
    log.record_blocking(event("5")).unwrap();
    drop(log);

    let s = verify(vec![config.path.clone(), second.clone(), first.clone()]);
    assert_eq!(s.seqs, Some((1, 7)), "3 records, reopened, 1, reopened, 1");
    let all: Vec<_> = [&first, &second, &config.path].iter().flat_map(|f| lines(f)).collect();
    assert!(!all
        .iter()
        .any(|r| r["grant_id"].as_str().is_some_and(|g| g.contains("refused"))));
    assert_eq!(metrics.audit_reopens_total.with_label_values(&["renamed"]).get(), 2);
    assert_eq!(
        metrics
            .audit_write_errors_total
            .with_label_values(&["grant.expired"])
            .get(),
        2
    );
}

#[test]
fn a_removed_file_fails_the_batch_and_nothing_acknowledged_is_left_unlinked() {
    let dir = tempfile::tempdir().unwrap();
    let config = quiet(dir.path());
    let log = AuditLog::open(&config, Metrics::new()).unwrap();
    log.record_blocking(event("0")).unwrap();
    std::fs::remove_file(&config.path).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let ticket = log.enqueue(vec![event("gone")]).unwrap();
    let err = rt.block_on(ticket).unwrap_err();
    assert_eq!(moved(&err), Some(ReopenReason::Deleted), "{err}");
    std::fs::remove_file(&config.path).unwrap();
    let err = write(&log, "gone-too").unwrap_err();
    assert_eq!(moved(&err), Some(ReopenReason::Deleted), "{err}");
    log.record_blocking(event("kept")).unwrap();
    drop(log);
    let records = lines(&config.path);
    let kinds: Vec<(&str, u64)> = records
        .iter()
        .map(|r| (r["event"].as_str().unwrap(), r["seq"].as_u64().unwrap()))
        .collect();
    // Seq 2 went with the first removed file; the chain goes on from there.
    assert_eq!(kinds, [("audit.reopened", 3), ("grant.expired", 4)]);
    assert_eq!(records[0]["reason"], "deleted");
    assert_eq!(verify(vec![config.path.clone()]).seqs, Some((3, 4)));
}

#[test]
fn a_truncated_file_is_never_extended_and_its_chain_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let config = quiet(dir.path());
    let log = AuditLog::open(&config, Metrics::new()).unwrap();
    for i in 0..3 {
        log.record_blocking(event(&i.to_string())).unwrap();
    }
    // copytruncate: copy, then truncate the file the writer holds open.
    let copy = renamed(&config, ".1");
    std::fs::copy(&config.path, &copy).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&config.path)
        .unwrap()
        .set_len(0)
        .unwrap();
    let err = write(&log, "refused").unwrap_err();
    assert_eq!(moved(&err), Some(ReopenReason::Truncated), "{err}");
    log.record_blocking(event("3")).unwrap();
    drop(log);
    let text = std::fs::read(&config.path).unwrap();
    assert!(!text.contains(&0), "the file was extended with a hole");
    let records = lines(&config.path);
    assert_eq!(records.len(), 2);
    assert_eq!(
        (records[0]["event"].as_str(), records[0]["reason"].as_str()),
        (Some("audit.reopened"), Some("truncated"))
    );
    assert_eq!(records[0]["new_file"], false);
    assert_eq!(verify(vec![config.path.clone(), copy]).seqs, Some((1, 5)));
}

#[test]
fn reopen_on_request_records_it_and_switches_files_only_when_the_path_moved() {
    let dir = tempfile::tempdir().unwrap();
    let config = quiet(dir.path());
    let metrics = Metrics::new();
    let log = AuditLog::open(&config, Arc::clone(&metrics)).unwrap();
    log.record_blocking(event("0")).unwrap();
    // Nothing moved: same file, still recorded.
    let r = log.reopen(ReopenReason::Signal, None).unwrap();
    assert_eq!((r.seq, r.new_file), (Some(2), false));
    // Renamed first (logrotate), then reopened: the next write is not refused.
    let rotated = renamed(&config, ".1");
    std::fs::rename(&config.path, &rotated).unwrap();
    let admin = UserName::new("admin").unwrap();
    let r = log.reopen(ReopenReason::Command, Some(admin)).unwrap();
    assert_eq!((r.seq, r.new_file), (Some(3), true));
    write(&log, "1").unwrap();
    drop(log);
    let old = lines(&rotated);
    assert_eq!(
        (old[1]["reason"].as_str(), old[1]["new_file"].as_bool()),
        (Some("signal"), Some(false))
    );
    let new = lines(&config.path);
    assert_eq!(
        (new[0]["reason"].as_str(), new[0]["by"].as_str()),
        (Some("command"), Some("admin"))
    );
    assert_eq!(verify(vec![rotated, config.path.clone()]).seqs, Some((1, 4)));
    assert_eq!(metrics.audit_reopens_total.with_label_values(&["signal"]).get(), 1);
    assert_eq!(metrics.audit_reopens_total.with_label_values(&["command"]).get(), 1);
}

fn gzip(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".gz");
    let to = PathBuf::from(name);
    let mut gz = flate2::write::GzEncoder::new(std::fs::File::create(&to).unwrap(), flate2::Compression::default());
    gz.write_all(&std::fs::read(path).unwrap()).unwrap();
    gz.finish().unwrap();
    std::fs::remove_file(path).unwrap();
    to
}

#[test]
fn a_restart_continues_the_chain_whatever_happened_to_the_files() {
    let dir = tempfile::tempdir().unwrap();
    let config = quiet(dir.path());
    let write = |n: usize, tag: &str| {
        let log = AuditLog::open(&config, Metrics::new()).unwrap();
        for i in 0..n {
            log.record_blocking(event(&format!("{tag}-{i}"))).unwrap();
        }
    };
    write(10, "a");
    // Renamed and compressed while down, with a name the proxy never gives a file.
    std::fs::rename(&config.path, renamed(&config, ".1")).unwrap();
    let first = gzip(&renamed(&config, ".1"));
    write(2, "b");
    assert_eq!(lines(&config.path)[0]["seq"], 11);
    // Dated name, and the tip file gone: the files beside the log still tell.
    let dated = renamed(&config, "-20261201");
    std::fs::rename(&config.path, &dated).unwrap();
    std::fs::remove_file(&config.tip_path).unwrap();
    write(1, "c");
    assert_eq!(lines(&config.path)[0]["seq"], 13);
    // Every file moved elsewhere (olddir): the tip file tells.
    let away = tempfile::tempdir().unwrap();
    let mut moved = Vec::new();
    for f in [first, dated, config.path.clone()] {
        let to = away.path().join(f.file_name().unwrap());
        std::fs::rename(&f, &to).unwrap();
        moved.push(to);
    }
    write(1, "d");
    assert_eq!(lines(&config.path)[0]["seq"], 14);
    moved.push(config.path.clone());
    moved.reverse();
    let s = verify(moved);
    assert_eq!((s.records, s.seqs), (14, Some((1, 14))));
}
