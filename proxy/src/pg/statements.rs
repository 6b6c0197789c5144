//! Statement tracking for one session: turns the client's messages into audit records and
//! guardrail decisions, and matches the server's answers back to the statements they end.
//!
//! The client side is processed a batch (one read) at a time: every message is decoded, every
//! statement it will run is classified, checked and turned into a `statement` record, and the
//! batch is forwarded only once those records are written. A refused statement is replaced by
//! a *sentinel*, a statement that fails to parse on the server, so the server itself produces
//! the error at exactly the right place in the stream with the right transaction state; the
//! proxy then swaps that server error for its own. Nothing of a refused statement reaches the
//! database.
//!
//! The server side is observed message by message (see `Scanner`): each answer pops the
//! expected-response queue (`pending`), which yields `statement.end` records
//! (`statements/answers.rs`).

mod answers;
#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use jitgate_protocol::postgres::backend;
use jitgate_protocol::postgres::messages::{decode_frontend, encode_parse, encode_query, Frontend, Param};
use jitgate_protocol::postgres::ProtocolError;
use jitgate_protocol::sql::{self, Classified, SessionChange, StatementClass};

use super::guard::{audit_unavailable, setting_dependent, Guard};
use crate::access::{Reason, Refusal};
use crate::audit::{AuditEvent, Decision, StatementPath};
use crate::model::SessionMeta;

/// Text the server cannot parse: it answers with a syntax error in the refused statement's
/// place, which the proxy replaces with its own error.
const SENTINEL: &str = "/* jitgate: statement refused by the proxy */ JITGATE_REFUSED";

/// Longest statement text whose classification a session remembers.
const CACHED_TEXT_BYTES: usize = 8192;
/// Most statement texts a session remembers classifications of.
const CACHED_TEXTS: usize = 256;

/// Limits on what a record holds.
#[derive(Debug, Clone)]
pub struct TextLimits {
    pub max_statement_bytes: usize,
    pub max_param_bytes: usize,
    /// Words (ASCII case ignored); a statement whose text contains one has its parameters
    /// redacted.
    pub redact_params_matching: Vec<String>,
}

/// The statements of one query text as classified, and where each one's own text sits in
/// the input. Texts of one shape (`sql::shape`) share both: shaping keeps every byte offset.
#[derive(Debug, Clone)]
struct Statements {
    list: Arc<Vec<Classified>>,
    /// `None` when a statement's text is not a slice of the input (then `Classified::text`).
    spans: Option<Arc<[std::ops::Range<usize>]>>,
}

impl Statements {
    fn new(input: &str, list: Vec<Classified>) -> Self {
        let mut spans = Vec::with_capacity(list.len());
        let mut from = 0;
        for c in &list {
            let Some(start) = input.get(from..).and_then(|rest| rest.find(c.text.as_str())) else {
                return Self {
                    list: Arc::new(list),
                    spans: None,
                };
            };
            spans.push(from + start..from + start + c.text.len());
            from += start + c.text.len();
        }
        Self {
            list: Arc::new(list),
            spans: Some(spans.into()),
        }
    }

    /// The `i`th statement's own text in `input`, the text these statements were looked up for.
    fn text<'a>(&'a self, i: usize, input: &'a str) -> &'a str {
        self.spans
            .as_ref()
            .and_then(|s| input.get(s[i].clone()))
            .unwrap_or(&self.list[i].text)
    }
}

/// A prepared statement as the proxy knows it.
#[derive(Debug)]
struct Prepared {
    /// Redacted, capped text for records.
    text: String,
    class: StatementClass,
    kind: &'static str,
    tables: Vec<String>,
    session_change: Option<SessionChange>,
    denial: Option<Refusal>,
    redact_params: bool,
}

#[derive(Debug)]
struct Portal {
    statement: Arc<Prepared>,
    params: Vec<Option<String>>,
}

/// A statement sent to the server and not yet answered.
#[derive(Debug)]
struct Run {
    id: u64,
    started: Instant,
    /// For a statement that changes the role: the role before it, restored if it fails.
    role_before: Option<Option<String>>,
    copy_bytes: Option<u64>,
    /// `DataRow`s seen (for a suspended portal, whose tag carries no count).
    rows: u64,
}

#[derive(Debug)]
enum SlotKind {
    Parse,
    Bind,
    Describe,
    Close,
    Sync,
    Execute(Run),
    /// The statements of one simple `Query`, in order.
    Query(VecDeque<Run>),
    FunctionCall(Run),
}

#[derive(Debug)]
struct Slot {
    seq: u64,
    kind: SlotKind,
    /// Set when this message was replaced by a sentinel: the server's error for it is
    /// swapped for this one.
    sentinel: Option<Refusal>,
}

/// The processed form of one batch of client messages.
#[derive(Debug, Default)]
pub struct Batch {
    /// Bytes to forward when the batch's records are written.
    pub forward: Vec<u8>,
    /// Bytes to forward instead when they cannot be written: every statement replaced by a
    /// sentinel.
    pub fallback: Vec<u8>,
    /// Records to write before forwarding.
    pub records: Vec<AuditEvent>,
    /// Slots to switch to `audit_unavailable` sentinels when the fallback is used.
    statement_slots: Vec<u64>,
    /// Denials decided in this batch, for metrics.
    pub denials: Vec<&'static str>,
    /// Statement classes forwarded in this batch, for metrics.
    pub classes: Vec<&'static str>,
    /// The client sent Terminate.
    pub terminate: bool,
}

/// What to do with a server message that has just started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    Pass,
    /// Drop it; at its end, send the replacement from [`Tracker::backend_end`].
    Replace,
}

/// Per-session statement state.
pub struct Tracker {
    /// Who the records are about.
    session: SessionMeta,
    guard: Guard,
    limits: TextLimits,
    prepared: HashMap<String, Arc<Prepared>>,
    /// Classifications by statement text, or by its shape (`sql::shape`: numbers zeroed)
    /// where it has one: drivers re-send the same text (an unnamed `Parse` per execution) or
    /// the same statement with other numbers, and classifying costs microseconds each time.
    classified: HashMap<Box<str>, Statements>,
    portals: HashMap<String, Portal>,
    pending: VecDeque<Slot>,
    next_seq: u64,
    next_statement: u64,
    effective_role: Option<String>,
    session_authorization: Option<String>,
    replacing: Option<Refusal>,
    /// Set when the server reports a setting that changes how statements are read.
    unsafe_parameter: Option<String>,
    /// Everything sent to the server has been answered through a `ReadyForQuery`, so its
    /// `client_encoding` and `standard_conforming_strings` are the ones it last reported (and
    /// the proxy ends the session on any value it cannot read under). While not, an earlier
    /// statement may have changed them, and text whose reading depends on them is refused.
    settled: bool,
    /// Statement ends produced while observing the server, drained by the relay.
    ends: Vec<AuditEvent>,
    /// Durations of ended statements, drained by the relay for metrics.
    durations: Vec<f64>,
}

impl Tracker {
    /// A tracker for a fresh session.
    pub fn new(session: SessionMeta, guard: Guard, limits: TextLimits) -> Self {
        Self {
            session,
            guard,
            limits,
            prepared: HashMap::new(),
            classified: HashMap::new(),
            portals: HashMap::new(),
            pending: VecDeque::new(),
            next_seq: 0,
            next_statement: 0,
            effective_role: None,
            session_authorization: None,
            replacing: None,
            unsafe_parameter: None,
            settled: true,
            ends: Vec::new(),
            durations: Vec::new(),
        }
    }

    /// `sql::classify(text)`, remembered per session by text or shape for texts up to
    /// [`CACHED_TEXT_BYTES`] (at most [`CACHED_TEXTS`] of them; the cache starts over when
    /// full). Texts of one shape share the decisions; [`Statements::text`] gives each its own
    /// statement texts. (`Guard::check` reads words of `Classified::text`, never digits.)
    fn classify(&mut self, text: &str) -> Statements {
        if text.len() > CACHED_TEXT_BYTES {
            return Statements::new(text, sql::classify(text));
        }
        let key = sql::shape(text).unwrap_or(std::borrow::Cow::Borrowed(text));
        if let Some(hit) = self.classified.get(key.as_ref()) {
            return hit.clone();
        }
        let statements = Statements::new(text, sql::classify(text));
        if statements.spans.is_some() {
            if self.classified.len() >= CACHED_TEXTS {
                self.classified.clear();
            }
            self.classified.insert(key.into(), statements.clone());
        }
        statements
    }

    /// Applies a role change to the statements that follow it (records are made before the
    /// server runs anything); returns what to restore if the statement fails.
    fn project(&mut self, change: Option<&SessionChange>) -> Option<Option<String>> {
        let new = match change? {
            SessionChange::Role(role) => role.clone().or_else(|| self.session_authorization.clone()),
            SessionChange::SessionAuthorization(user) => user.clone(),
            SessionChange::SearchPath(_) => return None,
        };
        Some(std::mem::replace(&mut self.effective_role, new))
    }

    fn unknown_prepared(&self, name: &str) -> Prepared {
        let denial = self.guard.check(&unknown_classified("unknown")).err();
        Prepared {
            text: format!("prepared statement {name:?}"),
            class: StatementClass::Unknown,
            kind: "unknown",
            tables: Vec::new(),
            session_change: None,
            denial,
            redact_params: true,
        }
    }

    fn push_slot(&mut self, kind: SlotKind, sentinel: Option<Refusal>) -> u64 {
        self.next_seq += 1;
        self.pending.push_back(Slot {
            seq: self.next_seq,
            kind,
            sentinel,
        });
        self.next_seq
    }

    fn cap(&self, text: &str) -> String {
        let redacted = sql::redact(text);
        if redacted.len() <= self.limits.max_statement_bytes {
            return redacted;
        }
        let mut end = self.limits.max_statement_bytes;
        while !redacted.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &redacted[..end])
    }

    fn render_params(&self, params: &[Param<'_>], redact: bool) -> Vec<Option<String>> {
        let max = self.limits.max_param_bytes;
        params
            .iter()
            .map(|p| match p {
                Param::Null => None,
                _ if redact => Some("***".to_owned()),
                Param::Text(v) => {
                    let s = String::from_utf8_lossy(&v[..v.len().min(max)]).into_owned();
                    Some(if v.len() > max { format!("{s}...") } else { s })
                }
                Param::Binary(v) => {
                    let mut s = String::with_capacity(2 + 2 * v.len().min(max));
                    s.push_str("\\x");
                    for b in &v[..v.len().min(max)] {
                        s.push_str(&format!("{b:02x}"));
                    }
                    if v.len() > max {
                        s.push_str("...");
                    }
                    Some(s)
                }
            })
            .collect()
    }

    fn wants_param_redaction(&self, text: &str) -> bool {
        self.limits
            .redact_params_matching
            .iter()
            .any(|w| sql::contains_ignore_ascii_case(text, w))
    }

    #[allow(clippy::too_many_arguments)]
    fn statement_record(
        &mut self,
        path: StatementPath,
        text: String,
        params: Vec<Option<String>>,
        class: StatementClass,
        kind: &'static str,
        tables: Vec<String>,
        denial: Option<&Refusal>,
    ) -> (u64, AuditEvent) {
        self.next_statement += 1;
        let path = if kind.starts_with("copy") {
            StatementPath::Copy
        } else {
            path
        };
        let f = &self.session;
        let event = AuditEvent::Statement {
            session_id: f.id.clone(),
            statement: self.next_statement,
            grant_id: f.grant_id.clone(),
            user: f.user.clone(),
            target: f.target.clone(),
            access: f.access,
            protocol: path,
            text,
            params,
            class: Cow::Borrowed(class.as_str()),
            kind: Cow::Borrowed(kind),
            tables,
            upstream_role: Arc::clone(&f.upstream_role),
            effective_role: self.effective_role.clone(),
            decision: if denial.is_some() {
                Decision::Denied
            } else {
                Decision::Allowed
            },
            denied_by: denial.map(|d| d.reason.as_str().to_owned()),
        };
        (self.next_statement, event)
    }

    /// Processes every complete message in `msgs` (a sequence of whole tagged messages).
    pub fn client_batch(&mut self, msgs: &[u8]) -> Result<Batch, ProtocolError> {
        let mut batch = Batch::default();
        let mut rest = msgs;
        while let Some((_, len)) = backend::peek_tagged(rest, usize::MAX)? {
            let (msg, tail) = rest.split_at(len);
            rest = tail;
            self.client_message(msg, &mut batch)?;
        }
        Ok(batch)
    }

    /// The refusal for SQL text the server may read under settings the proxy does not know.
    fn reading_refusal(&self, text: &str) -> Option<Refusal> {
        (!self.settled && sql::reading::depends_on_settings(text)).then(setting_dependent)
    }

    fn client_message(&mut self, msg: &[u8], batch: &mut Batch) -> Result<(), ProtocolError> {
        let frontend = decode_frontend(msg)?;
        // Anything the server runs (statements, and the type input functions and commits that
        // Parse, Bind and Sync may run) may change its settings; Describe, Close and Flush
        // cannot.
        let unsettles = !matches!(
            frontend,
            Frontend::Describe { .. } | Frontend::Close { .. } | Frontend::Flush | Frontend::Terminate
        );
        self.message(frontend, msg, batch);
        if unsettles {
            self.settled = false;
        }
        Ok(())
    }

    fn message(&mut self, frontend: Frontend<'_>, msg: &[u8], batch: &mut Batch) {
        let now = Instant::now();
        match frontend {
            Frontend::Query { sql: text } => {
                let statements = self.classify(text);
                let unreadable = self.reading_refusal(text);
                let denials: Vec<Option<Refusal>> = statements
                    .list
                    .iter()
                    .map(|c| unreadable.clone().or_else(|| self.guard.check(c).err()))
                    .collect();
                let refused = denials.iter().flatten().next().cloned();
                let mut runs = VecDeque::new();
                for (i, (c, denial)) in statements.list.iter().zip(&denials).enumerate() {
                    let text = self.cap(statements.text(i, text));
                    let own = denial.clone().or_else(|| refused.as_ref().map(|_| same_message()));
                    let (id, event) = self.statement_record(
                        StatementPath::Simple,
                        text,
                        Vec::new(),
                        c.class,
                        c.kind,
                        c.tables.clone(),
                        own.as_ref(),
                    );
                    batch.records.push(event);
                    if let Some(d) = &own {
                        batch.denials.push(d.reason.as_str());
                    } else {
                        batch.classes.push(c.class.as_str());
                    }
                    let role_before = if own.is_none() {
                        self.project(c.session_change.as_ref())
                    } else {
                        None
                    };
                    runs.push_back(Run {
                        id,
                        started: now,
                        role_before,
                        copy_bytes: None,
                        rows: 0,
                    });
                }
                match refused {
                    Some(d) => {
                        self.push_slot(SlotKind::Query(VecDeque::new()), Some(d));
                        let sentinel = encode_query(SENTINEL);
                        batch.forward.extend_from_slice(&sentinel);
                        batch.fallback.extend_from_slice(&sentinel);
                    }
                    None => {
                        let seq = self.push_slot(SlotKind::Query(runs), None);
                        batch.statement_slots.push(seq);
                        batch.forward.extend_from_slice(msg);
                        batch.fallback.extend_from_slice(&encode_query(SENTINEL));
                    }
                }
            }
            Frontend::Parse { name, sql: text } => {
                let statements = Arc::clone(&self.classify(text).list);
                // A prepared statement holds one command; take the most privileged if more.
                let c = most_privileged(&statements);
                let denial = self
                    .reading_refusal(text)
                    .or_else(|| statements.iter().find_map(|c| self.guard.check(c).err()));
                let prepared = Arc::new(Prepared {
                    text: self.cap(text.trim()),
                    class: c.map_or(StatementClass::Unknown, |c| c.class),
                    kind: c.map_or("unknown", |c| c.kind),
                    tables: statements.iter().flat_map(|c| c.tables.iter().cloned()).collect(),
                    session_change: c.and_then(|c| c.session_change.clone()),
                    redact_params: self.wants_param_redaction(text),
                    denial: denial.clone(),
                });
                let name = name.to_owned();
                if let Some(d) = denial {
                    // Refused at Parse, as the server refuses what it cannot parse.
                    let (_, event) = self.statement_record(
                        StatementPath::Extended,
                        prepared.text.clone(),
                        Vec::new(),
                        prepared.class,
                        prepared.kind,
                        prepared.tables.clone(),
                        Some(&d),
                    );
                    batch.records.push(event);
                    batch.denials.push(d.reason.as_str());
                    self.push_slot(SlotKind::Parse, Some(d));
                    let sentinel = encode_parse(&name, SENTINEL);
                    batch.forward.extend_from_slice(&sentinel);
                    batch.fallback.extend_from_slice(&sentinel);
                } else {
                    self.push_slot(SlotKind::Parse, None);
                    batch.forward.extend_from_slice(msg);
                    batch.fallback.extend_from_slice(msg);
                }
                self.prepared.insert(name, prepared);
            }
            Frontend::Bind {
                portal,
                statement,
                params,
            } => {
                // A statement the proxy did not see parsed (made by SQL PREPARE, or one whose
                // Parse the server refused) is unknown: never the portal's previous statement.
                let p = match self.prepared.get(statement) {
                    Some(p) => Arc::clone(p),
                    None => Arc::new(self.unknown_prepared(statement)),
                };
                let params = self.render_params(&params, p.redact_params);
                self.portals.insert(portal.to_owned(), Portal { statement: p, params });
                self.push_slot(SlotKind::Bind, None);
                batch.forward.extend_from_slice(msg);
                batch.fallback.extend_from_slice(msg);
            }
            Frontend::Execute { portal, .. } => {
                let (p, params) = match self.portals.get(portal) {
                    Some(portal) => (Some(Arc::clone(&portal.statement)), portal.params.clone()),
                    None => (None, Vec::new()),
                };
                let (text, class, kind, tables, change, denial) = match &p {
                    Some(p) => (
                        p.text.clone(),
                        p.class,
                        p.kind,
                        p.tables.clone(),
                        p.session_change.clone(),
                        p.denial.clone(),
                    ),
                    // A portal the proxy never saw bound (a cursor opened with DECLARE): what it
                    // runs is unknown, and checked as such.
                    None => (
                        format!("execute portal {portal:?}"),
                        StatementClass::Unknown,
                        "unknown",
                        Vec::new(),
                        None,
                        self.guard.check(&unknown_classified("unknown")).err(),
                    ),
                };
                let (id, event) = self.statement_record(
                    StatementPath::Extended,
                    text,
                    params,
                    class,
                    kind,
                    tables,
                    denial.as_ref(),
                );
                batch.records.push(event);
                match denial {
                    Some(d) => {
                        batch.denials.push(d.reason.as_str());
                        self.push_slot(SlotKind::Parse, Some(d));
                        let sentinel = encode_parse("", SENTINEL);
                        batch.forward.extend_from_slice(&sentinel);
                        batch.fallback.extend_from_slice(&sentinel);
                    }
                    None => {
                        batch.classes.push(class.as_str());
                        let role_before = self.project(change.as_ref());
                        let run = Run {
                            id,
                            started: now,
                            role_before,
                            copy_bytes: None,
                            rows: 0,
                        };
                        let seq = self.push_slot(SlotKind::Execute(run), None);
                        batch.statement_slots.push(seq);
                        batch.forward.extend_from_slice(msg);
                        batch.fallback.extend_from_slice(&encode_parse("", SENTINEL));
                    }
                }
            }
            Frontend::FunctionCall { oid, args } => {
                let params = self.render_params(&args, false);
                // A function may do anything: checked as an unknown statement.
                let denial = self.guard.check(&unknown_classified("call")).err();
                let (id, event) = self.statement_record(
                    StatementPath::FunctionCall,
                    format!("function call oid={oid}"),
                    params,
                    StatementClass::Unknown,
                    "call",
                    Vec::new(),
                    denial.as_ref(),
                );
                batch.records.push(event);
                let sentinel = encode_query(SENTINEL);
                match denial {
                    Some(d) => {
                        batch.denials.push(d.reason.as_str());
                        self.push_slot(SlotKind::Query(VecDeque::new()), Some(d));
                        batch.forward.extend_from_slice(&sentinel);
                    }
                    None => {
                        batch.classes.push(StatementClass::Unknown.as_str());
                        let run = Run {
                            id,
                            started: now,
                            role_before: None,
                            copy_bytes: None,
                            rows: 0,
                        };
                        let seq = self.push_slot(SlotKind::FunctionCall(run), None);
                        batch.statement_slots.push(seq);
                        batch.forward.extend_from_slice(msg);
                    }
                }
                batch.fallback.extend_from_slice(&sentinel);
            }
            Frontend::Describe { .. } => self.pass(msg, batch, Some(SlotKind::Describe)),
            Frontend::Close { kind, name } => {
                if kind == b'S' {
                    self.prepared.remove(name);
                } else {
                    self.portals.remove(name);
                }
                self.pass(msg, batch, Some(SlotKind::Close));
            }
            Frontend::Sync => self.pass(msg, batch, Some(SlotKind::Sync)),
            Frontend::CopyData { len } => {
                if let Some(run) = self.current_run() {
                    *run.copy_bytes.get_or_insert(0) += len as u64;
                }
                self.pass(msg, batch, None);
            }
            Frontend::Terminate => {
                batch.terminate = true;
                self.pass(msg, batch, None);
            }
            Frontend::Flush | Frontend::CopyDone | Frontend::CopyFail { .. } | Frontend::Other { .. } => {
                self.pass(msg, batch, None)
            }
        }
    }

    fn pass(&mut self, msg: &[u8], batch: &mut Batch, slot: Option<SlotKind>) {
        if let Some(kind) = slot {
            self.push_slot(kind, None);
        }
        batch.forward.extend_from_slice(msg);
        batch.fallback.extend_from_slice(msg);
    }

    /// The batch's records are written and its bytes go out now: durations start here.
    pub fn mark_forwarded(&mut self, batch: &Batch) {
        let now = Instant::now();
        for slot in self
            .pending
            .iter_mut()
            .filter(|s| batch.statement_slots.contains(&s.seq))
        {
            match &mut slot.kind {
                SlotKind::Execute(run) | SlotKind::FunctionCall(run) => run.started = now,
                SlotKind::Query(runs) => runs.iter_mut().for_each(|r| r.started = now),
                _ => {}
            }
        }
    }

    /// The batch's records could not be written: every statement in it becomes a sentinel
    /// refused with `audit_unavailable`. Call before forwarding `batch.fallback`.
    pub fn use_fallback(&mut self, batch: &Batch) {
        for slot in self.pending.iter_mut() {
            if batch.statement_slots.contains(&slot.seq) {
                slot.sentinel = Some(audit_unavailable());
                match &mut slot.kind {
                    SlotKind::Query(runs) => runs.clear(),
                    SlotKind::Execute(_) => slot.kind = SlotKind::Parse,
                    SlotKind::FunctionCall(_) => slot.kind = SlotKind::Query(VecDeque::new()),
                    _ => {}
                }
            }
        }
    }

    fn current_run(&mut self) -> Option<&mut Run> {
        match &mut self.pending.front_mut()?.kind {
            SlotKind::Execute(run) | SlotKind::FunctionCall(run) => Some(run),
            SlotKind::Query(runs) => runs.front_mut(),
            _ => None,
        }
    }
}

fn same_message() -> Refusal {
    Refusal::new(
        Reason::SameMessage,
        "refused with another statement of the same message",
    )
}

fn unknown_classified(kind: &'static str) -> Classified {
    Classified {
        text: String::new(),
        class: StatementClass::Unknown,
        kind,
        tables: Vec::new(),
        has_where: None,
        session_change: None,
        roles: None,
        opaque: false,
    }
}

fn most_privileged(statements: &[Classified]) -> Option<&Classified> {
    statements.iter().max_by_key(|c| c.class)
}
