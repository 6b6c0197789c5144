//! `set_config(name, value, is_local)` calls anywhere in a statement: the same changes as
//! `SET`, made from inside an expression.
//!
//! `set_config('role', 'x', false)` is `SET ROLE x`, and `set_config('session_authorization',
//! 'x', false)` is `SET SESSION AUTHORIZATION x`, whatever statement the call sits in (a select
//! list, `FROM`, a subquery, a CTE, `PREPARE`). The name must be a plain `'...'` or `$$...$$`
//! literal to be known; any other first argument (concatenation, a parameter, a cast, a
//! subquery, an escape string) is computed, and the statement becomes `Unknown`. Every schema's
//! `set_config` counts, quoted or not: a look-alike may call the real one.

use std::ops::ControlFlow;

use sqlparser::ast::{
    Expr, FunctionArg, FunctionArgExpr, FunctionArguments, ObjectName, ObjectNamePart, Statement, TableFactor, Value,
    Visit, Visitor,
};

use super::statement::Outcome;
use super::{SessionChange, StatementClass};

/// Raises `outcome` by the `set_config` calls in `statement`.
pub(super) fn apply(statement: &Statement, outcome: Outcome) -> Outcome {
    let mut calls = Calls::default();
    let _ = statement.visit(&mut calls);
    if calls.found.is_empty() {
        return outcome;
    }
    let mut outcome = outcome;
    let mut changes = 0;
    for call in calls.found {
        let (kind, change) = match call.name.as_deref() {
            None => {
                outcome.class = StatementClass::Unknown;
                continue;
            }
            Some("role") => (
                "set_role",
                call.value.map(|v| SessionChange::Role((v != "none").then_some(v))),
            ),
            Some("session_authorization") => (
                "set_session_authorization",
                call.value.map(|v| SessionChange::SessionAuthorization(Some(v))),
            ),
            Some(_) => continue,
        };
        changes += 1;
        outcome.kind = kind;
        match change {
            Some(change) if changes == 1 => {
                outcome.class = outcome.class.max(StatementClass::Privilege);
                outcome.session_change = Some(change);
            }
            // A computed value, or several changes in one statement: the role cannot be told.
            _ => {
                outcome.class = StatementClass::Unknown;
                outcome.session_change = None;
            }
        }
    }
    outcome
}

/// One `set_config` call: its setting name and value when they are plain literals.
struct Call {
    /// Lowercase (setting names are case-insensitive); `None` when computed.
    name: Option<String>,
    /// As written; `None` when computed.
    value: Option<String>,
}

#[derive(Default)]
struct Calls {
    found: Vec<Call>,
}

impl Calls {
    fn call(&mut self, name: &ObjectName, args: &[FunctionArg]) {
        let Some(ObjectNamePart::Identifier(last)) = name.0.last() else {
            return;
        };
        if !last.value.eq_ignore_ascii_case("set_config") {
            return;
        }
        let positional: Option<Vec<&Expr>> = args
            .iter()
            .map(|arg| match arg {
                FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => Some(e),
                _ => None,
            })
            .collect();
        // Named arguments (`setting_name => ...`) or a wildcard: nothing can be vouched for.
        let (name, value) = match positional.as_deref() {
            Some([name, value, ..]) => (literal(name), literal(value)),
            Some([name]) => (literal(name), None),
            _ => (None, None),
        };
        self.found.push(Call {
            name: name.map(|n| n.to_ascii_lowercase()),
            value,
        });
    }
}

/// The text of a plain string literal: `'...'` or a dollar-quoted string, never an escape
/// string or a Unicode string (whose decoding the proxy would have to trust).
fn literal(expr: &Expr) -> Option<String> {
    match expr {
        Expr::Value(v) => match &v.value {
            Value::SingleQuotedString(s) => Some(s.clone()),
            Value::DollarQuotedString(d) => Some(d.value.clone()),
            _ => None,
        },
        _ => None,
    }
}

impl Visitor for Calls {
    type Break = ();

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
        if let Expr::Function(f) = expr {
            match &f.args {
                FunctionArguments::List(list) => self.call(&f.name, &list.args),
                FunctionArguments::None | FunctionArguments::Subquery(_) => self.call(&f.name, &[]),
            }
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<()> {
        match factor {
            TableFactor::Table {
                name, args: Some(args), ..
            } => self.call(name, &args.args),
            TableFactor::Function { name, args, .. } => self.call(name, args),
            _ => {}
        }
        ControlFlow::Continue(())
    }
}

#[cfg(test)]
mod tests;
