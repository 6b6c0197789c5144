//! The server's side of statement tracking: each answer pops the expected-response queue and
//! yields the `statement.end` record of the statement it ends; a sentinel's error is swapped
//! for the proxy's own.

use jitgate_protocol::postgres::backend::{self, Report, Severity};
use jitgate_protocol::postgres::messages::rows_of_tag;
use std::collections::VecDeque;

use super::{Disposition, Run, Slot, SlotKind, Tracker};
use crate::audit::{AuditEvent, Outcome};

impl Tracker {
    /// A server message starts.
    pub fn backend_start(&mut self, tag: u8, len: usize) -> Disposition {
        match tag {
            b'E' => match self.pending.front().and_then(|s| s.sentinel.clone()) {
                Some(d) => {
                    self.replacing = Some(d);
                    Disposition::Replace
                }
                None => Disposition::Pass,
            },
            b'd' => {
                if let Some(run) = self.current_run() {
                    *run.copy_bytes.get_or_insert(0) += len.saturating_sub(5) as u64;
                }
                Disposition::Pass
            }
            b'D' => {
                if let Some(run) = self.current_run() {
                    run.rows += 1;
                }
                Disposition::Pass
            }
            _ => Disposition::Pass,
        }
    }

    /// A server message ended; `body` is captured for `C`, `E` and `S`. Returns the bytes
    /// that replace a dropped message.
    pub fn backend_end(&mut self, tag: u8, body: &[u8]) -> Option<Vec<u8>> {
        let mut replacement = None;
        match tag {
            b'E' => {
                let fields = backend::decode(&with_header(b'E', body)).ok().and_then(|m| match m {
                    backend::BackendMessage::ErrorResponse(f) => Some(f),
                    _ => None,
                });
                let (code, message) = fields.map_or((String::new(), String::new()), |f| {
                    (f.code().to_owned(), f.message().to_owned())
                });
                if let Some(d) = self.replacing.take() {
                    replacement = Some(backend::error_response(
                        Severity::Error,
                        &Report {
                            sqlstate: crate::pg::sqlstate::Sqlstate::of(d.reason).as_str(),
                            message: &d.message,
                            detail: None,
                            hint: d.hint.as_deref(),
                        },
                    ));
                }
                self.on_error(code, message);
            }
            b'C' | b'I' => {
                let tag_text = if tag == b'I' { String::new() } else { cstr(body) };
                self.on_complete(Outcome::Ok {
                    rows: rows_of_tag(&tag_text),
                    tag: tag_text,
                });
            }
            b's' => {
                let rows = self.current_run().map_or(0, |r| r.rows);
                self.on_complete(Outcome::Suspended { rows });
            }
            b'V' => {
                if let Some(Slot {
                    kind: SlotKind::FunctionCall(_),
                    ..
                }) = self.pending.front()
                {
                    self.on_complete(Outcome::Ok {
                        tag: "FUNCTION CALL".into(),
                        rows: None,
                    });
                }
            }
            b'1' | b'2' | b'3' => {
                self.pending.pop_front();
            }
            b'n' | b'T' => {
                if matches!(
                    self.pending.front(),
                    Some(Slot {
                        kind: SlotKind::Describe,
                        ..
                    })
                ) {
                    self.pending.pop_front();
                }
            }
            b'Z' => self.on_ready(),
            b'S' => {
                let mut b = body;
                let name = take(&mut b);
                let value = take(&mut b);
                if super::super::startup::lexing_parameter_unsafe(&name, &value) {
                    self.unsafe_parameter = Some(format!("{name}={value}"));
                }
                if name == "session_authorization" {
                    self.session_authorization = Some(value.clone());
                    if self.effective_role.is_some() {
                        self.effective_role = Some(value);
                    }
                }
            }
            _ => {}
        }
        replacement
    }

    fn end(&mut self, run: Run, outcome: Outcome) {
        if let (Some(before), Outcome::Error { .. } | Outcome::NotExecuted) = (&run.role_before, &outcome) {
            // The role change did not happen.
            self.effective_role = before.clone();
        }
        let elapsed = run.started.elapsed();
        self.durations.push(elapsed.as_secs_f64());
        self.ends.push(AuditEvent::StatementEnd {
            session_id: self.session.id.clone(),
            statement: run.id,
            outcome,
            duration_us: u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
            copy_bytes: run.copy_bytes,
        });
    }

    fn on_complete(&mut self, outcome: Outcome) {
        let Some(front) = self.pending.front_mut() else { return };
        match &mut front.kind {
            SlotKind::Query(runs) => {
                if let Some(run) = runs.pop_front() {
                    self.end(run, outcome);
                }
            }
            SlotKind::Execute(_) => {
                if let Some(Slot {
                    kind: SlotKind::Execute(run),
                    ..
                }) = self.pending.pop_front()
                {
                    self.end(run, outcome);
                }
            }
            SlotKind::FunctionCall(_) => {
                // Ends at ReadyForQuery; record the outcome now and keep the slot.
                let old = std::mem::replace(&mut front.kind, SlotKind::Query(VecDeque::new()));
                if let SlotKind::FunctionCall(run) = old {
                    self.end(run, outcome);
                }
            }
            _ => {}
        }
    }

    fn on_error(&mut self, sqlstate: String, message: String) {
        let Some(front) = self.pending.pop_front() else { return };
        let outcome = Outcome::Error { sqlstate, message };
        match front.kind {
            SlotKind::Query(mut runs) => {
                if let Some(run) = runs.pop_front() {
                    self.end(run, outcome);
                }
                // The rest of the message does not run; the slot stays for ReadyForQuery.
                for run in runs {
                    self.end(run, Outcome::NotExecuted);
                }
                self.pending.push_front(Slot {
                    seq: front.seq,
                    kind: SlotKind::Query(VecDeque::new()),
                    sentinel: None,
                });
            }
            SlotKind::FunctionCall(run) => {
                self.end(run, outcome);
                self.pending.push_front(Slot {
                    seq: front.seq,
                    kind: SlotKind::Query(VecDeque::new()),
                    sentinel: None,
                });
            }
            SlotKind::Sync => {
                self.pending.push_front(front);
            }
            kind => {
                if let SlotKind::Execute(run) = kind {
                    self.end(run, outcome);
                }
                // The server skips everything up to the next Sync.
                while let Some(slot) = self.pending.front() {
                    if matches!(
                        slot.kind,
                        SlotKind::Sync | SlotKind::Query(_) | SlotKind::FunctionCall(_)
                    ) {
                        break;
                    }
                    if let Some(Slot {
                        kind: SlotKind::Execute(run),
                        ..
                    }) = self.pending.pop_front()
                    {
                        self.end(run, Outcome::NotExecuted);
                    }
                }
            }
        }
    }

    fn on_ready(&mut self) {
        self.pop_to_ready();
        if self.pending.is_empty() {
            self.settled = true;
        }
    }

    /// Closes what is left up to the `Sync` or `Query` a `ReadyForQuery` answers.
    fn pop_to_ready(&mut self) {
        while let Some(slot) = self.pending.pop_front() {
            match slot.kind {
                SlotKind::Sync => return,
                SlotKind::Query(runs) => {
                    for run in runs {
                        self.end(run, Outcome::NotExecuted);
                    }
                    return;
                }
                SlotKind::FunctionCall(run) => {
                    self.end(run, Outcome::NotExecuted);
                    return;
                }
                SlotKind::Execute(run) => self.end(run, Outcome::NotExecuted),
                _ => {}
            }
        }
    }

    /// A setting the server reported that breaks statement reading (`name=value`), if any.
    pub fn unsafe_parameter(&self) -> Option<&str> {
        self.unsafe_parameter.as_deref()
    }

    /// Records of statements that ended since the last call.
    pub fn take_ends(&mut self) -> Vec<AuditEvent> {
        std::mem::take(&mut self.ends)
    }

    /// Durations (seconds) of statements that ended since the last call.
    pub fn take_durations(&mut self) -> Vec<f64> {
        std::mem::take(&mut self.durations)
    }

    /// Whether anything sent to the server is still unanswered.
    pub fn awaiting_answers(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Statements still waiting for an answer when the session ends: `interrupted`, since
    /// they may or may not have run.
    pub fn abandon(&mut self) {
        while let Some(slot) = self.pending.pop_front() {
            match slot.kind {
                SlotKind::Execute(run) | SlotKind::FunctionCall(run) => self.end(run, Outcome::Interrupted),
                SlotKind::Query(runs) => {
                    for run in runs {
                        self.end(run, Outcome::Interrupted);
                    }
                }
                _ => {}
            }
        }
    }
}

fn with_header(tag: u8, body: &[u8]) -> Vec<u8> {
    jitgate_protocol::postgres::frontend::encode_tagged(tag, body)
}

fn cstr(body: &[u8]) -> String {
    let end = body.iter().position(|&b| b == 0).unwrap_or(body.len());
    String::from_utf8_lossy(&body[..end]).into_owned()
}

fn take(b: &mut &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    let s = String::from_utf8_lossy(&b[..end]).into_owned();
    *b = b.get(end + 1..).unwrap_or(&[]);
    s
}
