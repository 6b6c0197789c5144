//! `jitgate audit tail`: audit records for people. Reads the rotated files and the active file
//! of each log in chain order, filters by user, target, session and age, prints one readable
//! line per record (or the raw JSON line), and with `--follow` keeps reading as records are
//! added, across rotations. Several logs (one per replica) are merged by the records' `ts`,
//! each log's records keeping their own order. Records are read as JSON values, not typed
//! events, so records of newer versions still print.

use std::collections::{HashSet, VecDeque};
use std::fs::File;
use std::io::{BufRead as _, BufReader, Write};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde_json::Value;

use super::files;

/// Longest statement text shown in a text line, in characters.
const TEXT_CHARS: usize = 120;
/// How often `--follow` looks for new records.
pub const FOLLOW_POLL: Duration = Duration::from_millis(200);

/// Which records to show; every set condition must hold.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// The record's `user` (a `grant.created` record's `grant.user`).
    pub user: Option<String>,
    /// The record's `target` (a `grant.created` record's `grant.target`).
    pub target: Option<String>,
    /// The record's `session_id`.
    pub session: Option<String>,
    /// Records stamped at or after this time.
    pub since: Option<SystemTime>,
}

/// Filters records and prints them.
#[derive(Debug)]
pub struct Printer {
    filter: Filter,
    json: bool,
    /// Sessions whose records matched `user`/`target`: their records without those fields
    /// (`statement.end`) match too.
    sessions: HashSet<String>,
}

impl Printer {
    /// `json`: print the lines as they are in the file instead of readable text.
    pub fn new(filter: Filter, json: bool) -> Self {
        Self {
            filter,
            json,
            sessions: HashSet::new(),
        }
    }

    /// Prints `line` (one record, without its newline) if it matches the filter.
    pub fn line(&mut self, line: &[u8], out: &mut impl Write) -> std::io::Result<()> {
        let value = serde_json::from_slice::<Value>(line).ok();
        self.record(line, value, out)
    }

    /// [`Printer::line`] for a line already parsed (`None`: not JSON).
    fn record(&mut self, line: &[u8], value: Option<Value>, out: &mut impl Write) -> std::io::Result<()> {
        let Some(value) = value else {
            // Not a record (a damaged line): shown only when nothing is filtered.
            if !self.filtering() {
                if self.json {
                    out.write_all(line)?;
                    out.write_all(b"\n")?;
                } else {
                    writeln!(out, "{}", clean(&String::from_utf8_lossy(line)))?;
                }
            }
            return Ok(());
        };
        if !self.matches(&value) {
            return Ok(());
        }
        if self.json {
            out.write_all(line)?;
            out.write_all(b"\n")
        } else {
            writeln!(out, "{}", text(&value))
        }
    }

    /// True when the parsed record `v` matches the filter (and remembers its session, as
    /// [`Printer::line`] does).
    pub fn matches_record(&mut self, v: &Value) -> bool {
        self.matches(v)
    }

    fn filtering(&self) -> bool {
        let f = &self.filter;
        f.user.is_some() || f.target.is_some() || f.session.is_some() || f.since.is_some()
    }

    fn matches(&mut self, v: &Value) -> bool {
        let f = &self.filter;
        let session = field(v, "session_id");
        if f.user.is_some() || f.target.is_some() {
            let has = |name: &str, want: &Option<String>| match want {
                None => Some(true),
                Some(want) => field(v, name).map(|have| have == want),
            };
            let identity = match (has("user", &f.user), has("target", &f.target)) {
                (Some(user), Some(target)) => user && target,
                _ => session.is_some_and(|s| self.sessions.contains(s)),
            };
            if let Some(s) = session {
                if field(v, "event") == Some("session.end") {
                    self.sessions.remove(s);
                } else if identity {
                    self.sessions.insert(s.to_owned());
                }
            }
            if !identity {
                return false;
            }
        }
        if let Some(want) = &f.session {
            if session != Some(want.as_str()) {
                return false;
            }
        }
        if let Some(since) = f.since {
            let ts = field(v, "ts").and_then(|t| humantime::parse_rfc3339_weak(t).ok());
            match ts {
                Some(ts) if ts >= since => {}
                _ => return false,
            }
        }
        true
    }
}

/// A field of the record, or of its `grant` or `request` object.
fn lookup<'a>(v: &'a Value, name: &str) -> Option<&'a Value> {
    v.get(name)
        .or_else(|| v.get("grant").and_then(|g| g.get(name)))
        .or_else(|| v.get("request").and_then(|r| r.get(name)))
}

/// A string field of the record, or of its `grant` or `request` object.
fn field<'a>(v: &'a Value, name: &str) -> Option<&'a str> {
    lookup(v, name).and_then(Value::as_str)
}

/// Any field as display text; `-` when absent.
fn show(v: &Value, name: &str) -> String {
    match lookup(v, name) {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// One readable line for a record: its time, `[replica]` when it names one, the event and
/// what matters of it.
pub fn text(v: &Value) -> String {
    let s = |name: &str| show(v, name);
    let event = s("event");
    let rest = match event.as_str() {
        "session.start" => format!(
            "{} {} {} grant {} from {}",
            s("user"),
            s("target"),
            s("session_id"),
            s("grant_id"),
            s("client_addr")
        ),
        "session.end" => {
            let recordings: String = v
                .get("recordings")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|r| format!(" recording {}", show(r, "file")))
                .collect();
            format!(
                "{} {} {} {} in {}B out {}B {}ms{recordings}",
                s("user"),
                s("target"),
                s("session_id"),
                s("reason"),
                s("bytes_from_client"),
                s("bytes_to_client"),
                s("duration_ms")
            )
        }
        "session.denied" => format!(
            "{} {} from {}: {}: {}",
            s("user"),
            s("target"),
            s("client_addr"),
            s("code"),
            s("reason")
        ),
        "grant.created" => format!(
            "{} {} {} {} until {} by {}: {}",
            s("user"),
            s("target"),
            s("id"),
            s("access"),
            s("expires_at"),
            s("created_by"),
            s("reason")
        ),
        "grant.revoked" => format!(
            "{} {} {} {} by {}",
            s("user"),
            s("target"),
            s("grant_id"),
            s("access"),
            s("by")
        ),
        "grant.expired" => format!("{} {} {} {}", s("user"), s("target"), s("grant_id"), s("access")),
        "audit.reopened" => {
            let file = if v.get("new_file") == Some(&Value::Bool(true)) {
                "new file"
            } else {
                "same file"
            };
            match v.get("by") {
                Some(_) => format!("{}: {file}, by {}", s("reason"), s("by")),
                None => format!("{}: {file}", s("reason")),
            }
        }
        _ if v.get("request").is_some() => {
            let why = if s("note") == "-" { s("reason") } else { s("note") };
            format!(
                "{} {} {} {} {}{} {}s policy {}: {}",
                s("user"),
                s("target"),
                s("id"),
                s("access"),
                s("state"),
                if v["request"]["break_glass"] == Value::Bool(true) {
                    " BREAK-GLASS"
                } else {
                    ""
                },
                s("duration_secs"),
                s("policy"),
                why
            )
        }
        "statement" => {
            let denied = match v.get("denied_by").and_then(Value::as_str) {
                Some(by) => format!(" denied by {by}"),
                None if s("decision") == "denied" => " denied".into(),
                None => String::new(),
            };
            format!(
                "{} {} {}#{} {}{}: {}",
                s("user"),
                s("target"),
                s("session_id"),
                s("statement"),
                s("class"),
                denied,
                shorten(&clean(&s("text")), TEXT_CHARS)
            )
        }
        "statement.end" => {
            let o = v.get("outcome").unwrap_or(&Value::Null);
            let outcome = match o.get("status").and_then(Value::as_str) {
                Some("ok") => match o.get("rows").and_then(Value::as_u64) {
                    Some(rows) => format!("ok {} rows {rows}", show(o, "tag")),
                    None => format!("ok {}", show(o, "tag")),
                },
                Some("error") => format!("error {} {}", show(o, "sqlstate"), show(o, "message")),
                Some("suspended") => format!("suspended rows {}", show(o, "rows")),
                Some(other) => other.to_owned(),
                None => "-".into(),
            };
            format!(
                "{}#{} {} {}us",
                s("session_id"),
                s("statement"),
                outcome,
                s("duration_us")
            )
        }
        _ => match v.as_object() {
            Some(fields) => fields
                .iter()
                .filter(|(k, _)| !matches!(k.as_str(), "seq" | "prev" | "hash" | "v" | "ts" | "replica" | "event"))
                .map(|(k, val)| match val {
                    Value::String(s) => format!("{k}={s}"),
                    other => format!("{k}={other}"),
                })
                .collect::<Vec<_>>()
                .join(" "),
            None => String::new(),
        },
    };
    match v.get("replica").and_then(Value::as_str) {
        Some(replica) => clean(&format!("{} [{replica}] {event} {rest}", s("ts"))),
        None => clean(&format!("{} {event} {rest}", s("ts"))),
    }
}

/// Control characters escaped, so a record is one line and cannot drive the terminal.
fn clean(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_owned();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

fn shorten(s: &str, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars) {
        Some((cut, _)) => format!("{}...", &s[..cut]),
        None => s.to_owned(),
    }
}

/// Identity of a file across renames.
fn file_id(m: &std::fs::Metadata) -> (u64, u64) {
    (m.dev(), m.ino())
}

/// Reads the active file as it grows, moving to the new one after a rotation.
#[derive(Debug)]
pub struct Follower {
    path: PathBuf,
    file: Option<(File, (u64, u64))>,
    pos: u64,
    partial: Vec<u8>,
}

impl Follower {
    /// Opens the active file at `path` if it exists. Open it before reading the rotated files
    /// so that a rotation in between is not missed (see [`print_log`]).
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let mut f = Follower {
            path: path.to_owned(),
            file: None,
            pos: 0,
            partial: Vec::new(),
        };
        f.reopen()?;
        Ok(f)
    }

    fn reopen(&mut self) -> std::io::Result<()> {
        self.file = match File::open(&self.path) {
            Ok(file) => {
                let id = file_id(&file.metadata()?);
                Some((file, id))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        self.pos = 0;
        self.partial.clear();
        Ok(())
    }

    /// Identity of the file being read.
    fn id(&self) -> Option<(u64, u64)> {
        self.file.as_ref().map(|(_, id)| *id)
    }

    /// Prints the complete lines added since the last call.
    pub fn poll(&mut self, printer: &mut Printer, out: &mut impl Write) -> std::io::Result<()> {
        self.poll_lines(&mut |line| printer.line(line, out))
    }

    /// Hands the complete lines added since the last call to `sink`, in order.
    fn poll_lines(&mut self, sink: &mut impl FnMut(&[u8]) -> std::io::Result<()>) -> std::io::Result<()> {
        loop {
            self.read_new(sink)?;
            let current = match std::fs::metadata(&self.path) {
                Ok(m) => Some(file_id(&m)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(e),
            };
            if current.is_none() || current == self.id() {
                return Ok(());
            }
            // Rotated: every write to the old file happened before the rename, so one more
            // read gets the rest of it. A cut line at its end was never acknowledged.
            self.read_new(sink)?;
            self.reopen()?;
        }
    }

    fn read_new(&mut self, sink: &mut impl FnMut(&[u8]) -> std::io::Result<()>) -> std::io::Result<()> {
        let Some((file, _)) = self.file.as_mut() else {
            return Ok(());
        };
        let len = file.metadata()?.len();
        if len < self.pos {
            // Cut back (a failed batch was removed): continue from the new end.
            self.pos = len;
            self.partial.clear();
            return Ok(());
        }
        if len == self.pos {
            return Ok(());
        }
        self.pos = files::read_from(file, self.pos, &mut self.partial)?;
        let Some(end) = self.partial.iter().rposition(|&b| b == b'\n') else {
            return Ok(());
        };
        let rest = self.partial.split_off(end + 1);
        for line in self.partial.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            sink(line)?;
        }
        self.partial = rest;
        Ok(())
    }
}

/// Prints the log whose active file is `active`: rotated files oldest first, then the active
/// file. With `follow`, keeps printing new records every [`FOLLOW_POLL`] and never returns
/// `Ok`.
pub fn print_log(active: &Path, printer: &mut Printer, follow: bool, out: &mut impl Write) -> std::io::Result<()> {
    print_logs(std::slice::from_ref(&active.to_path_buf()), printer, follow, out)
}

/// Prints the logs whose active files are `actives` (one per replica; an error names the log
/// when there are several), merged by the records' `ts`, oldest first; each log's records keep their chain order (a record stamped a little
/// before the one written ahead of it stays after it), and records stamped at the same
/// moment come in the order the logs are given. With `follow`, every [`FOLLOW_POLL`] prints
/// what all the logs gained, merged the same way, and never returns `Ok`.
pub fn print_logs(
    actives: &[PathBuf],
    printer: &mut Printer,
    follow: bool,
    out: &mut impl Write,
) -> std::io::Result<()> {
    let mut logs = actives
        .iter()
        .map(|active| {
            Log::open(active, follow).map_err(|e| match actives.len() {
                1 => e,
                _ => std::io::Error::new(e.kind(), format!("{}: {e}", active.display())),
            })
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    merge(&mut logs, printer, out)?;
    out.flush()?;
    if !follow {
        return Ok(());
    }
    loop {
        std::thread::sleep(FOLLOW_POLL);
        for log in &mut logs {
            log.poll()?;
        }
        merge(&mut logs, printer, out)?;
        out.flush()?;
    }
}

/// Prints the records the logs hold now, the oldest next record of any log first.
fn merge(logs: &mut [Log], printer: &mut Printer, out: &mut impl Write) -> std::io::Result<()> {
    for log in logs.iter_mut() {
        log.fill()?;
    }
    loop {
        let oldest = logs
            .iter()
            .enumerate()
            .filter_map(|(i, log)| log.next.as_ref().map(|next| (next.ts, i)))
            .min();
        let Some((_, i)) = oldest else {
            return Ok(());
        };
        if let Some(next) = logs[i].next.take() {
            printer.record(&next.line, next.value, out)?;
        }
        logs[i].fill()?;
    }
}

/// A record read and not yet printed.
struct Next {
    /// Its `ts`; for a line without one (damaged), that of the record before it, so it keeps
    /// its place.
    ts: SystemTime,
    line: Vec<u8>,
    value: Option<Value>,
}

/// One log being read in chain order: its rotated files oldest first, then the active file
/// through its [`Follower`], a line at a time.
struct Log {
    follower: Follower,
    /// Rotated files not read yet.
    rotated: std::vec::IntoIter<PathBuf>,
    reading: Option<BufReader<File>>,
    /// Whether the active file was read once the rotated files were.
    polled: bool,
    /// Lines of the active file read and not yet taken.
    ready: VecDeque<Vec<u8>>,
    next: Option<Next>,
    last_ts: SystemTime,
}

impl Log {
    /// Opens the active file before listing the rotated files, so that a rotation in between
    /// is not missed: the follower reads a file rotated after it opened it.
    fn open(active: &Path, follow: bool) -> std::io::Result<Log> {
        let follower = Follower::open(active)?;
        let rotated = files::rotated_files(active)?;
        if rotated.is_empty() && follower.file.is_none() && !follow {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "neither the file nor rotated files of it exist",
            ));
        }
        let rotated: Vec<PathBuf> = rotated
            .into_iter()
            .map(|(_, path)| path)
            .filter(|path| {
                !follower
                    .id()
                    .is_some_and(|id| std::fs::metadata(path).is_ok_and(|m| file_id(&m) == id))
            })
            .collect();
        Ok(Log {
            follower,
            rotated: rotated.into_iter(),
            reading: None,
            polled: false,
            ready: VecDeque::new(),
            next: None,
            last_ts: SystemTime::UNIX_EPOCH,
        })
    }

    /// Reads what the active file gained.
    fn poll(&mut self) -> std::io::Result<()> {
        let ready = &mut self.ready;
        self.follower.poll_lines(&mut |line| {
            ready.push_back(line.to_vec());
            Ok(())
        })
    }

    /// Reads the next record, if there is one now and none is waiting.
    fn fill(&mut self) -> std::io::Result<()> {
        if self.next.is_some() {
            return Ok(());
        }
        let Some(line) = self.next_line()? else {
            return Ok(());
        };
        let value = serde_json::from_slice::<Value>(&line).ok();
        let ts = value
            .as_ref()
            .and_then(|v| v.get("ts"))
            .and_then(Value::as_str)
            .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
            .unwrap_or(self.last_ts);
        self.last_ts = ts;
        self.next = Some(Next { ts, line, value });
        Ok(())
    }

    /// The next complete line in chain order (an incomplete last line of a rotated file was
    /// never acknowledged and is skipped).
    fn next_line(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        loop {
            if let Some(reader) = self.reading.as_mut() {
                let mut buf = Vec::new();
                if reader.read_until(b'\n', &mut buf)? > 0 {
                    if buf.pop_if(|b| *b == b'\n').is_some() {
                        return Ok(Some(buf));
                    }
                    continue;
                }
                self.reading = None;
            }
            if let Some(path) = self.rotated.next() {
                self.reading = Some(BufReader::with_capacity(1 << 16, File::open(path)?));
                continue;
            }
            if !self.polled {
                self.polled = true;
                self.poll()?;
            }
            return Ok(self.ready.pop_front());
        }
    }
}

/// What `GET /v1/audit` looks for: the [`Filter`], and more.
#[derive(Debug, Clone, Default)]
pub struct Search {
    pub filter: Filter,
    /// The record's `event`, or a family of them: `statement` finds `statement` and
    /// `statement.end`, `grant` every `grant.*`.
    pub event: Option<String>,
    /// Records stamped before this time.
    pub until: Option<SystemTime>,
    /// Text anywhere in the record's line, ignoring ASCII case.
    pub text: Option<String>,
    /// At most this many records: the latest that match.
    pub limit: usize,
}

/// The records of the log `active` (its rotated files, the proxy's and logrotate's, then
/// itself) that match `q`, in log order: the last `q.limit` of them, and whether earlier ones were left out.
pub fn search(active: &Path, q: &Search) -> std::io::Result<(Vec<Value>, bool)> {
    let mut printer = Printer::new(q.filter.clone(), true);
    let needle = q.text.as_deref().map(str::to_ascii_lowercase).filter(|t| !t.is_empty());
    let mut out = VecDeque::new();
    let mut truncated = false;
    for file in super::siblings::log_files(active)? {
        let reader = match super::siblings::open(&file) {
            Ok(r) => r,
            // Rotated away (or compressed and removed) while listing: skip it.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for line in reader.split(b'\n') {
            let line = line?;
            let Ok(v) = serde_json::from_slice::<Value>(&line) else {
                continue;
            };
            if !printer.matches_record(&v) {
                continue;
            }
            if let Some(want) = &q.event {
                let event = v.get("event").and_then(Value::as_str).unwrap_or_default();
                let family = event
                    .strip_prefix(want.as_str())
                    .is_some_and(|rest| rest.starts_with('.'));
                if event != want && !family {
                    continue;
                }
            }
            if let Some(until) = q.until {
                let ts = field(&v, "ts").and_then(|t| humantime::parse_rfc3339_weak(t).ok());
                if ts.is_none_or(|ts| ts >= until) {
                    continue;
                }
            }
            if let Some(needle) = &needle {
                if !line
                    .to_ascii_lowercase()
                    .windows(needle.len())
                    .any(|w| w == needle.as_bytes())
                {
                    continue;
                }
            }
            out.push_back(v);
            if out.len() > q.limit {
                out.pop_front();
                truncated = true;
            }
        }
    }
    Ok((out.into(), truncated))
}
