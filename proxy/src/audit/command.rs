//! `jitgate audit verify|tail|reopen`. `verify` and `tail` work on the files (no API needed),
//! on one log or on the logs of several replicas together: `verify` checks each replica's
//! chain on its own ([`super::replica`]), `tail` merges the logs by time ([`super::tail`]).
//! `reopen` asks the running proxy, through the control API. Also where the audit log is
//! ([`AuditLogArgs`], shared with `jitgate recording`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use clap::{Args, Subcommand};

use super::chain::{self, Summary};
use super::{replica, siblings, tail};
use crate::cli::{api_client, print_json, ApiArgs};
use crate::config::Config;

#[derive(Debug, Subcommand)]
pub(crate) enum AuditCommand {
    /// Prove the audit log unedited, or name its first bad record; with the logs of several
    /// replicas, each replica's.
    ///
    /// Checks every record's hash and that each record follows the one before it, across
    /// all the files of the log, put in chain order by their first record (whatever they are
    /// named, gzip-compressed or not). Exits 0 printing `ok: N records, seq A..B` and the last
    /// record's hash (keep a copy elsewhere: a log cut short at its end still verifies, but
    /// ends at another hash), or exits 1 naming the file, line and seq of the first bad record
    /// and why (edited, removed, reordered, truncated). When the files start after seq 1
    /// (older files rotated away) it says so and still exits 0.
    ///
    /// Replicas: with a `[store]`, every record names its replica (`store.replica_id`) and
    /// each replica's records are a chain of their own. Given the files of several replicas
    /// (`verify a/audit.jsonl* b/audit.jsonl*`, or --file, --config or --data-dir once per
    /// replica), it groups them by the replica their records name, checks each chain on its
    /// own and prints one line per replica: `replica ID: ok: N records, seq A..B, last hash
    /// HASH`. A bad chain exits 1 naming its replica, then file, line and seq; a record of
    /// another replica than the others in its file is bad too (mixed replicas). Records
    /// without a replica (a single node) are one chain, printed as above.
    ///
    /// Then checks every shell recording a `session.end` names: its file must still hash to
    /// the SHA-256 the log holds (an edited or missing recording exits 1).
    Verify {
        /// Files to check, in any order (e.g. audit.jsonl*, or a/audit.jsonl* b/audit.jsonl*
        /// for two replicas). With --file, --config or --data-dir as well, the files found
        /// next to those logs are added. Default: the configured logs' files: each active file
        /// and every file next to it named after it (FILE.<seq>, FILE.1, FILE.2.gz,
        /// FILE-DATE.gz).
        files: Vec<PathBuf>,
        #[command(flatten)]
        log: AuditLogsArgs,
        /// Look for recordings by name in DIR instead of where the log says they were written.
        #[arg(long)]
        recordings: Option<PathBuf>,
        /// Check the chain only, not the recordings (a log shipped without them).
        #[arg(long, conflicts_with = "recordings")]
        skip_recordings: bool,
    },
    /// Make the running proxy reopen its audit log (admin, through the control API).
    ///
    /// For logrotate's postrotate (deploy/logrotate/jitgate): the proxy continues the hash
    /// chain in the file the path names now (creating it if needed), after an
    /// `audit.reopened` record, so no statement is refused for the rotation. SIGHUP to
    /// `jitgate serve` does the same without a certificate. Prints the path, whether it
    /// named a new file and the seq of the `audit.reopened` record.
    Reopen {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Print audit records, one readable line each (or --json), optionally following.
    ///
    /// Reads the rotated files oldest first, then the active file. Given several logs (--file,
    /// --config or --data-dir repeated, one per replica), prints their records merged by
    /// their `ts`, oldest first, each log's records in their own order; text lines show the
    /// record's replica in brackets after the time. -f follows every log.
    Tail(TailArgs),
}

#[derive(Debug, Args)]
pub(crate) struct TailArgs {
    /// Keep printing records as they are written, across rotations (Ctrl-C to stop).
    #[arg(short = 'f', long)]
    follow: bool,
    /// Only records of this user. `statement.end` records match when their session did.
    #[arg(long)]
    user: Option<String>,
    /// Only records for this target. `statement.end` records match when their session did.
    #[arg(long)]
    target: Option<String>,
    /// Only records of this session id (s-...).
    #[arg(long)]
    session: Option<String>,
    /// Only records from the last DURATION, e.g. 15m or 2h.
    #[arg(long, value_parser = humantime::parse_duration)]
    since: Option<Duration>,
    /// Print the records' JSON lines as written, instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    log: AuditLogsArgs,
}

/// Where the audit log is. The first given of --file, --config and --data-dir wins.
#[derive(Debug, Args)]
pub(crate) struct AuditLogArgs {
    /// The active audit file; its other files (FILE.<seq>, FILE.1, FILE.2.gz, ...) are found
    /// beside it.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Config file to take `audit.path` (default DATA_DIR/audit.jsonl) from. Its secrets are
    /// not resolved.
    #[arg(long, short, env = "JITGATE_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory: the log is `audit.path` from DIR/jitgate.toml when that sets one,
    /// otherwise DIR/audit.jsonl.
    #[arg(long, env = "JITGATE_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

impl AuditLogArgs {
    /// The log's files in chain order: the rotated ones, then the active file.
    pub(crate) fn files(&self) -> Result<Vec<PathBuf>> {
        let active = self.active()?;
        let mut found = siblings::find(&active)?;
        if active.exists() {
            found.push(active.clone());
        }
        if found.is_empty() {
            bail!("no audit log at {}", active.display());
        }
        Ok(siblings::chain_order(found))
    }

    /// The active audit file.
    fn active(&self) -> Result<PathBuf> {
        if let Some(file) = &self.file {
            return Ok(file.clone());
        }
        if let Some(config) = &self.config {
            return log_of_config(config);
        }
        if let Some(dir) = &self.data_dir {
            return log_of_data_dir(dir);
        }
        bail!("no audit log: pass --file FILE, --config FILE (or JITGATE_CONFIG) or --data-dir DIR")
    }
}

/// Where the audit logs are: one, or one per replica. Each flag may be repeated; the first
/// kind given of --file, --config and --data-dir wins.
#[derive(Debug, Args)]
pub(crate) struct AuditLogsArgs {
    /// An active audit file; its other files (FILE.<seq>, FILE.1, FILE.2.gz, ...) are found
    /// beside it. Repeat for the logs of several replicas.
    #[arg(long, value_name = "FILE")]
    file: Vec<PathBuf>,
    /// Config file to take `audit.path` (default DATA_DIR/audit.jsonl) from. Its secrets are
    /// not resolved. Repeat for the logs of several replicas.
    #[arg(long, short, env = "JITGATE_CONFIG", value_name = "FILE")]
    config: Vec<PathBuf>,
    /// Data directory: the log is `audit.path` from DIR/jitgate.toml when that sets one,
    /// otherwise DIR/audit.jsonl. Repeat for the logs of several replicas.
    #[arg(long, env = "JITGATE_DATA_DIR", value_name = "DIR")]
    data_dir: Vec<PathBuf>,
}

impl AuditLogsArgs {
    /// Whether a flag (or its environment variable) names a log.
    fn given(&self) -> bool {
        !self.file.is_empty() || !self.config.is_empty() || !self.data_dir.is_empty()
    }

    /// The active audit file of each log named, in the order given.
    fn actives(&self) -> Result<Vec<PathBuf>> {
        if !self.file.is_empty() {
            return Ok(self.file.clone());
        }
        if !self.config.is_empty() {
            return self.config.iter().map(|c| log_of_config(c)).collect();
        }
        if !self.data_dir.is_empty() {
            return self.data_dir.iter().map(|d| log_of_data_dir(d)).collect();
        }
        bail!("no audit log: pass --file FILE, --config FILE (or JITGATE_CONFIG) or --data-dir DIR")
    }
}

/// `audit.path` of a config file (its secrets are not resolved).
fn log_of_config(config: &Path) -> Result<PathBuf> {
    Ok(Config::load_without_secrets(config)?.audit.path)
}

/// `audit.path` from DIR/jitgate.toml when that exists, otherwise DIR/audit.jsonl.
fn log_of_data_dir(dir: &Path) -> Result<PathBuf> {
    let config = dir.join("jitgate.toml");
    if config.exists() {
        return log_of_config(&config);
    }
    Ok(dir.join("audit.jsonl"))
}

/// Runs an `audit` command.
pub(crate) async fn run(command: AuditCommand) -> Result<()> {
    match command {
        AuditCommand::Verify {
            files,
            log,
            recordings,
            skip_recordings,
        } => verify(files, &log, recordings.as_deref(), skip_recordings),
        AuditCommand::Tail(args) => tail(args),
        AuditCommand::Reopen { api } => reopen(&api).await,
    }
}

/// `files`, plus the files of the logs the flags name (the configured log when `files` is
/// empty): each active file and those beside it. A file given, or a copy of one (the same
/// first record), is not added again, nor is a file twice.
fn with_logs(mut files: Vec<PathBuf>, logs: &AuditLogsArgs) -> Result<Vec<PathBuf>> {
    if !files.is_empty() && !logs.given() {
        return Ok(files);
    }
    let given_none = files.is_empty();
    let mut seen: Vec<PathBuf> = files.iter().filter_map(|f| f.canonicalize().ok()).collect();
    let starts: Vec<(u64, Option<String>)> = files.iter().filter_map(|f| replica::first_record(f)).collect();
    for active in logs.actives()? {
        let mut found = siblings::find(&active)?;
        if active.exists() {
            found.push(active.clone());
        }
        if found.is_empty() && given_none {
            bail!("no audit log at {}", active.display());
        }
        for f in found {
            let canonical = f.canonicalize().ok();
            let same = canonical.as_ref().is_some_and(|c| seen.contains(c));
            let copy = replica::first_record(&f).is_some_and(|s| starts.contains(&s));
            if !same && !copy {
                seen.extend(canonical);
                files.push(f);
            }
        }
    }
    Ok(files)
}

fn verify(files: Vec<PathBuf>, logs: &AuditLogsArgs, recordings: Option<&Path>, skip_recordings: bool) -> Result<()> {
    let verified = replica::verify(with_logs(files, logs)?);
    // Only a single node's records (no replica): the output as it always was.
    let single = matches!(verified.as_slice(), [v] if v.chain.replica.is_none());
    let name = |replica: Option<&str>, text: String| match single {
        true => text,
        false => format!("{}: {text}", replica::label(replica)),
    };
    let mut bad = Vec::new();
    for v in &verified {
        let replica = v.chain.replica.as_deref();
        match &v.result {
            Ok(summary) if single => print_summary(summary, &v.chain.files),
            Ok(summary) => print_replica_summary(replica, summary, &v.chain.files),
            Err(e) => bad.push(name(replica, e.to_string())),
        }
    }
    fail_with(&bad)?;
    if skip_recordings {
        return Ok(());
    }
    let mut problems = Vec::new();
    let mut checked = Vec::new();
    for v in &verified {
        let replica = v.chain.replica.as_deref();
        let named = crate::recordings::from_log(&v.chain.files)?;
        problems.extend(
            named
                .iter()
                .filter_map(|r| crate::recordings::problem(r, &crate::recordings::check(r, recordings), recordings))
                .map(|p| name(replica, p)),
        );
        if !named.is_empty() {
            checked.push(name(
                replica,
                format!(
                    "recordings: {} checked, each matches its SHA-256 in the log",
                    named.len()
                ),
            ));
        }
    }
    fail_with(&problems)?;
    for line in checked {
        println!("{line}");
    }
    Ok(())
}

/// A single node's chain: `ok: ...`, `last hash: ...` and where it starts when after seq 1.
fn print_summary(summary: &Summary, files: &[PathBuf]) {
    println!("{summary}");
    if let Some(hash) = summary.last_hash {
        println!("last hash: {}", chain::hex(&hash));
    }
    if let Some((first, _)) = summary.seqs.filter(|(first, _)| *first > 1) {
        println!(
            "starts at seq {first}: earlier records are not in these files (rotated away or removed \
             before {}); within the files given, nothing is edited, removed or out of order",
            files.first().map_or_else(String::new, |f| f.display().to_string())
        );
    }
}

/// One replica's chain on one line, and where it starts when after seq 1.
fn print_replica_summary(replica: Option<&str>, summary: &Summary, files: &[PathBuf]) {
    let label = replica::label(replica);
    match summary.last_hash {
        Some(hash) => println!("{label}: {summary}, last hash {}", chain::hex(&hash)),
        None => println!("{label}: {summary}"),
    }
    if let Some((first, _)) = summary.seqs.filter(|(first, _)| *first > 1) {
        println!(
            "{label} starts at seq {first}: earlier records are not in these files (rotated away or \
             removed before {}); within the files given, nothing is edited, removed or out of order",
            files.first().map_or_else(String::new, |f| f.display().to_string())
        );
    }
}

/// Fails with the first of `problems`, after printing the others to stderr.
fn fail_with(problems: &[String]) -> Result<()> {
    let Some((first, rest)) = problems.split_first() else {
        return Ok(());
    };
    for p in rest {
        eprintln!("{p}");
    }
    bail!("{first}")
}

async fn reopen(a: &ApiArgs) -> Result<()> {
    let r = api_client(a)?.reopen_audit().await?;
    if a.json {
        return print_json(&r);
    }
    let file = if r.new_file { "new file" } else { "same file" };
    match r.seq {
        Some(seq) => println!("reopened {}: {file}; audit.reopened is seq {seq}", r.path),
        None => println!("reopened {}: {file}", r.path),
    }
    Ok(())
}

fn tail(a: TailArgs) -> Result<()> {
    use std::io::Write as _;
    let actives = a.log.actives()?;
    let since = match a.since {
        Some(d) => Some(
            std::time::SystemTime::now()
                .checked_sub(d)
                .context("--since reaches before 1970")?,
        ),
        None => None,
    };
    let filter = tail::Filter {
        user: a.user,
        target: a.target,
        session: a.session,
        since,
    };
    let mut printer = tail::Printer::new(filter, a.json);
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    match tail::print_logs(&actives, &mut printer, a.follow, &mut out).and_then(|()| out.flush()) {
        // The reader went away (`| head`): that is the end, not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        // With several logs the error names the one it is about.
        Err(e) if actives.len() > 1 => Err(e.into()),
        r => r.with_context(|| {
            let active = actives.first().map_or_else(String::new, |a| a.display().to_string());
            format!("audit log {active}")
        }),
    }
}
