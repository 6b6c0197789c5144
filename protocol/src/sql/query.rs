//! Facts found by walking a parsed statement: whether a query writes, and which relations a
//! statement names.
//!
//! Both walks use sqlparser's [`Visitor`], which reaches every nested query, expression and
//! statement (subqueries, CTEs, `EXISTS`, lateral joins, `RETURNING`, ...).

use std::ops::ControlFlow;
use std::ptr;

use sqlparser::ast::{
    Ident, ObjectName, ObjectNamePart, Query, Select, SetExpr, Statement, TableFactor, Visit, Visitor,
};

use super::StatementClass;

/// `Read` unless the query locks rows (`FOR UPDATE`/`FOR SHARE`), creates a table
/// (`SELECT INTO`) or holds a data-modifying statement (`WITH d AS (DELETE ...)`), at any depth.
pub(super) fn query_class(query: &Query) -> StatementClass {
    let mut probe = WriteProbe {
        class: StatementClass::Read,
    };
    let _ = query.visit(&mut probe);
    probe.class
}

struct WriteProbe {
    class: StatementClass,
}

impl WriteProbe {
    fn raise(&mut self, class: StatementClass) {
        self.class = self.class.max(class);
    }
}

impl Visitor for WriteProbe {
    type Break = ();

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        if !query.locks.is_empty() {
            self.raise(StatementClass::Write);
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_select(&mut self, select: &Select) -> ControlFlow<()> {
        if select.into.is_some() {
            self.raise(StatementClass::Write);
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_statement(&mut self, statement: &Statement) -> ControlFlow<()> {
        // Only data-modifying statements can sit inside a query; anything else is a misread.
        match statement {
            Statement::Insert(_) | Statement::Update(_) | Statement::Delete(_) | Statement::Merge(_) => {
                self.raise(StatementClass::Write)
            }
            _ => self.raise(StatementClass::Unknown),
        }
        ControlFlow::Continue(())
    }
}

/// The relations `statement` names, rendered by [`object_name`], deduplicated, in first-seen
/// order. Table functions (`FROM generate_series(1, 3)`) are left out. `None` when the parser
/// misread the statement: PostgreSQL's `ONLY t` comes back as a table named `ONLY`.
pub(super) fn relations(statement: &Statement) -> Option<Vec<String>> {
    let mut collector = Relations::default();
    match statement.visit(&mut collector) {
        ControlFlow::Continue(()) => Some(collector.names),
        ControlFlow::Break(()) => None,
    }
}

#[derive(Default)]
struct Relations {
    names: Vec<String>,
    /// Names of table functions seen so far, compared by address with later relations.
    functions: Vec<*const ObjectName>,
}

impl Relations {
    fn push(&mut self, name: String) {
        if !self.names.contains(&name) {
            self.names.push(name);
        }
    }
}

impl Visitor for Relations {
    type Break = ();

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        // `TABLE t` inside a set operation is not reported as a relation by sqlparser.
        let mut pending = vec![query.body.as_ref()];
        while let Some(set) = pending.pop() {
            match set {
                SetExpr::SetOperation { left, right, .. } => {
                    pending.push(right);
                    pending.push(left);
                }
                SetExpr::Table(table) => {
                    let name = match (&table.schema_name, &table.table_name) {
                        (Some(schema), Some(table)) => format!("{schema}.{table}"),
                        (None, Some(table)) => table.clone(),
                        (_, None) => continue,
                    };
                    self.push(name);
                }
                SetExpr::Select(_)
                | SetExpr::Query(_)
                | SetExpr::Values(_)
                | SetExpr::Insert(_)
                | SetExpr::Update(_)
                | SetExpr::Delete(_)
                | SetExpr::Merge(_) => {}
            }
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<()> {
        if let TableFactor::Table {
            name, args: Some(_), ..
        } = factor
        {
            self.functions.push(ptr::from_ref(name));
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_relation(&mut self, relation: &ObjectName) -> ControlFlow<()> {
        if self.functions.iter().any(|&f| ptr::eq(f, relation)) {
            return ControlFlow::Continue(());
        }
        if let [ObjectNamePart::Identifier(ident)] = relation.0.as_slice() {
            if ident.quote_style.is_none() && ident.value.eq_ignore_ascii_case("only") {
                return ControlFlow::Break(());
            }
        }
        self.push(object_name(relation));
        ControlFlow::Continue(())
    }
}

/// A name as written, with unquoted parts case-folded as PostgreSQL does (ASCII only) and
/// quoted parts kept in their quotes, so `Public."Foo".bar` becomes `public."Foo".bar`.
pub(super) fn object_name(name: &ObjectName) -> String {
    let parts: Vec<String> = name
        .0
        .iter()
        .map(|part| match part {
            ObjectNamePart::Identifier(ident) => quoted_ident(ident),
            ObjectNamePart::Function(function) => function.to_string(),
        })
        .collect();
    parts.join(".")
}

/// An identifier as SQL text: unquoted ones case-folded, quoted ones kept in their quotes.
pub(super) fn quoted_ident(ident: &Ident) -> String {
    match ident.quote_style {
        None => ident.value.to_ascii_lowercase(),
        Some(_) => ident.to_string(),
    }
}

/// An identifier's value as the server resolves it: unquoted ones case-folded, quotes removed.
pub(super) fn resolved_ident(ident: &Ident) -> String {
    match ident.quote_style {
        None => ident.value.to_ascii_lowercase(),
        Some(_) => ident.value.clone(),
    }
}
