//! The mapping from one parsed [`Statement`] to a [`StatementClass`] and kind.
//!
//! The match lists every `Statement` variant (the enum is not `#[non_exhaustive]`), so a
//! sqlparser upgrade that adds one fails to compile here until someone classifies it.
//! Statements of other dialects that PostgreSQL would reject are `Unknown`.

use sqlparser::ast::{
    CopySource, CopyTarget, Declare, DeclareType, Expr, GrantObjects, ObjectName, ObjectType, Query, SetExpr,
    Statement, UtilityOption, Value,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use super::piece::Piece;
use super::query::{object_name, query_class, relations};
use super::{config_call, fallback, roles, session, Classified, SessionChange, StatementClass, RECURSION_LIMIT};

/// What one statement does, before its text is attached.
pub(super) struct Outcome {
    pub(super) class: StatementClass,
    pub(super) kind: &'static str,
    pub(super) has_where: Option<bool>,
    pub(super) session_change: Option<SessionChange>,
    /// Relations named outside the places sqlparser's visitor reports (COPY, DROP, ...).
    pub(super) tables: Vec<String>,
}

impl Outcome {
    pub(super) fn new(class: StatementClass, kind: &'static str) -> Self {
        Self {
            class,
            kind,
            has_where: None,
            session_change: None,
            tables: Vec::new(),
        }
    }

    pub(super) fn with_change(mut self, change: SessionChange) -> Self {
        self.session_change = Some(change);
        self
    }

    fn with_where(mut self, has_where: bool) -> Self {
        self.has_where = Some(has_where);
        self
    }

    fn with_tables<'a>(mut self, names: impl IntoIterator<Item = &'a ObjectName>) -> Self {
        self.tables.extend(names.into_iter().map(object_name));
        self
    }

    fn at_least(mut self, class: StatementClass) -> Self {
        self.class = self.class.max(class);
        self
    }

    fn into_classified(self, text: &str, relations: Vec<String>, facts: TokenFacts) -> Classified {
        let mut tables: Vec<String> = Vec::with_capacity(self.tables.len() + relations.len());
        for name in self.tables.into_iter().chain(relations) {
            if !tables.contains(&name) {
                tables.push(name);
            }
        }
        Classified {
            text: text.to_owned(),
            class: self.class,
            kind: self.kind,
            tables,
            has_where: self.has_where,
            session_change: self.session_change,
            roles: facts.roles,
            opaque: facts.opaque,
        }
    }
}

/// What a statement's tokens say before it is parsed.
struct TokenFacts {
    roles: Option<super::RolesNamed>,
    opaque: bool,
}

impl TokenFacts {
    fn of(text: &str, lead: &[String], piece: &Piece<'_>) -> Self {
        let words: Vec<&str> = lead.iter().map(String::as_str).collect();
        let opaque = matches!(
            words.as_slice(),
            ["DO", ..] | ["CREATE", "FUNCTION" | "PROCEDURE", ..] | ["CREATE", "OR", "REPLACE"]
        );
        Self {
            roles: roles::named(text, lead, &piece.tokens),
            opaque,
        }
    }
}

/// Parses and classifies one statement; falls back to its leading keywords when it does not
/// parse, and to `Unknown` when those are not conclusive either.
pub(super) fn classify_piece(piece: Piece<'_>) -> Classified {
    let text = piece.text;
    let lead = fallback::lead_words(&piece.tokens);
    let facts = TokenFacts::of(text, &lead, &piece);
    if !piece.within_limits() {
        return Classified {
            roles: facts.roles,
            ..Classified::unknown(text)
        };
    }
    let parsed = Parser::new(&PostgreSqlDialect {})
        .with_recursion_limit(RECURSION_LIMIT)
        .with_tokens_with_locations(piece.tokens)
        .parse_statements();
    let statement = match parsed {
        Ok(mut statements) if statements.len() == 1 => statements.pop(),
        Ok(_) | Err(_) => None,
    };
    let Some(statement) = statement else {
        return match fallback::classify(&lead) {
            Some(outcome) => outcome.into_classified(text, Vec::new(), facts),
            None => Classified {
                roles: facts.roles,
                ..Classified::unknown(text)
            },
        };
    };
    match relations(&statement) {
        Some(relations) => {
            config_call::apply(&statement, classify_statement(&statement)).into_classified(text, relations, facts)
        }
        None => Classified {
            roles: facts.roles,
            ..Classified::unknown(text)
        },
    }
}

fn classify_statement(statement: &Statement) -> Outcome {
    use StatementClass::{Ddl, Privilege, Read, Session, Transaction, Unknown, Utility, Write};
    match statement {
        Statement::Query(query) => classify_query(query),
        Statement::Insert(_) => Outcome::new(Write, "insert"),
        Statement::Update(update) => Outcome::new(Write, "update").with_where(update.selection.is_some()),
        Statement::Delete(delete) => Outcome::new(Write, "delete").with_where(delete.selection.is_some()),
        Statement::Merge(_) => Outcome::new(Write, "merge"),
        Statement::Truncate(_) => Outcome::new(Write, "truncate"),
        Statement::Copy { source, to, target, .. } => classify_copy(source, *to, target),
        Statement::Lock(_) | Statement::LockTables { .. } => Outcome::new(Write, "lock"),
        Statement::Call(_) => Outcome::new(Write, "call"),
        Statement::NOTIFY { .. } => Outcome::new(Write, "notify"),

        Statement::Explain {
            analyze,
            options,
            statement,
            ..
        } => classify_explain(*analyze, options.as_deref().unwrap_or_default(), statement),
        Statement::ExplainTable { .. } => Outcome::new(Read, "explain"),
        Statement::Prepare { statement, .. } => Outcome::new(classify_statement(statement).class, "prepare"),
        // The prepared body is not in the text; the proxy may resolve it by name.
        Statement::Execute { .. } => Outcome::new(Unknown, "execute"),
        Statement::Deallocate { .. } => Outcome::new(Utility, "deallocate"),
        Statement::Declare { stmts } => classify_declare(stmts),
        Statement::Fetch { .. } => Outcome::new(Read, "fetch"),
        Statement::Close { .. } => Outcome::new(Read, "close"),
        Statement::ShowFunctions { .. }
        | Statement::ShowVariable { .. }
        | Statement::ShowStatus { .. }
        | Statement::ShowVariables { .. }
        | Statement::ShowCreate { .. }
        | Statement::ShowColumns { .. }
        | Statement::ShowCatalogs { .. }
        | Statement::ShowDatabases { .. }
        | Statement::ShowProcessList { .. }
        | Statement::ShowSchemas { .. }
        | Statement::ShowCharset(_)
        | Statement::ShowObjects(_)
        | Statement::ShowTables { .. }
        | Statement::ShowViews { .. }
        | Statement::ShowCollation { .. } => Outcome::new(Read, "show"),

        // A bare BEGIN; other dialects' `BEGIN ... END` blocks carry statements.
        Statement::StartTransaction {
            statements, exception, ..
        } => match (statements.is_empty(), exception) {
            (true, None) => Outcome::new(Transaction, "begin"),
            _ => Outcome::new(Unknown, "begin"),
        },
        Statement::Commit { .. } => Outcome::new(Transaction, "commit"),
        Statement::Rollback { .. } => Outcome::new(Transaction, "rollback"),
        Statement::Savepoint { .. } => Outcome::new(Transaction, "savepoint"),
        Statement::ReleaseSavepoint { .. } => Outcome::new(Transaction, "release"),

        Statement::Set(set) => session::classify_set(set),
        Statement::Reset(reset) => session::classify_reset(&reset.reset),
        Statement::Discard { object_type } => session::classify_discard(object_type),
        Statement::LISTEN { .. } => Outcome::new(Session, "listen"),
        Statement::UNLISTEN { .. } => Outcome::new(Session, "unlisten"),

        Statement::Vacuum(vacuum) => Outcome::new(Utility, "vacuum").with_tables(&vacuum.table_name),
        Statement::Analyze(_) => Outcome::new(Utility, "analyze"),
        Statement::Comment { .. } => Outcome::new(Utility, "comment"),

        Statement::CreateRole(_) | Statement::CreateUser(_) => Outcome::new(Privilege, "create_role"),
        Statement::AlterRole { .. } | Statement::AlterUser(_) => Outcome::new(Privilege, "alter_role"),
        Statement::Grant(grant) => Outcome::new(Privilege, "grant").with_tables(granted_tables(&grant.objects)),
        Statement::Revoke(revoke) => Outcome::new(Privilege, "revoke").with_tables(granted_tables(&revoke.objects)),
        // LOAD runs a shared library's initialisation code inside the server.
        Statement::Load { .. } => Outcome::new(Privilege, "load"),

        Statement::Drop { object_type, names, .. } => classify_drop(object_type, names),
        Statement::CreateView(_)
        | Statement::CreateTable(_)
        | Statement::CreateVirtualTable { .. }
        | Statement::CreateIndex(_)
        | Statement::CreateServer(_)
        | Statement::CreatePolicy(_)
        | Statement::CreateOperator(_)
        | Statement::CreateOperatorFamily(_)
        | Statement::CreateOperatorClass(_)
        | Statement::CreateTextSearch(_)
        | Statement::CreateExtension(_)
        | Statement::CreateCollation(_)
        | Statement::CreateSchema { .. }
        | Statement::CreateDatabase { .. }
        | Statement::CreateFunction(_)
        | Statement::CreateTrigger(_)
        | Statement::CreateProcedure { .. }
        | Statement::CreateSequence { .. }
        | Statement::CreateDomain(_)
        | Statement::CreateType { .. } => Outcome::new(Ddl, "create"),
        Statement::AlterTable(_)
        | Statement::AlterSchema(_)
        | Statement::AlterIndex { .. }
        | Statement::AlterView { .. }
        | Statement::AlterFunction(_)
        | Statement::AlterType(_)
        | Statement::AlterCollation(_)
        | Statement::AlterOperator(_)
        | Statement::AlterOperatorFamily(_)
        | Statement::AlterOperatorClass(_)
        | Statement::AlterTextSearch(_)
        | Statement::AlterPolicy(_) => Outcome::new(Ddl, "alter"),
        Statement::DropFunction(_)
        | Statement::DropDomain(_)
        | Statement::DropProcedure { .. }
        | Statement::DropPolicy(_)
        | Statement::DropExtension(_)
        | Statement::DropOperator(_)
        | Statement::DropOperatorFamily(_)
        | Statement::DropOperatorClass(_)
        | Statement::DropTrigger(_) => Outcome::new(Ddl, "drop"),

        // Other dialects' statements: PostgreSQL rejects them, so they mean a misread.
        Statement::Msck(_)
        | Statement::Install { .. }
        | Statement::Directory { .. }
        | Statement::Case(_)
        | Statement::If(_)
        | Statement::While(_)
        | Statement::Raise(_)
        | Statement::CopyIntoSnowflake { .. }
        | Statement::Open(_)
        | Statement::CreateSecret { .. }
        | Statement::CreateConnector(_)
        | Statement::AlterConnector { .. }
        | Statement::AlterSession { .. }
        | Statement::AttachDatabase { .. }
        | Statement::AttachDuckDBDatabase { .. }
        | Statement::DetachDuckDBDatabase { .. }
        | Statement::DropSecret { .. }
        | Statement::DropConnector { .. }
        | Statement::Flush { .. }
        | Statement::Use(_)
        | Statement::CreateMacro { .. }
        | Statement::CreateStage { .. }
        | Statement::CreateFileFormat { .. }
        | Statement::CreateWarehouse(_)
        | Statement::Assert { .. }
        | Statement::Deny(_)
        | Statement::Kill { .. }
        | Statement::Cache { .. }
        | Statement::UNCache { .. }
        | Statement::Pragma { .. }
        | Statement::UnlockTables
        | Statement::Unload { .. }
        | Statement::OptimizeTable { .. }
        | Statement::LoadData { .. }
        | Statement::RenameTable(_)
        | Statement::List(_)
        | Statement::Put { .. }
        | Statement::Remove(_)
        | Statement::RaisError { .. }
        | Statement::Throw(_)
        | Statement::Print(_)
        | Statement::WaitFor(_)
        | Statement::Return(_)
        | Statement::ExportData(_) => Outcome::new(Unknown, "other"),
    }
}

/// A query is `Read` unless it writes (see [`query_class`]); `WITH ... INSERT/UPDATE/DELETE`
/// comes back as a query around the data-modifying statement and takes that statement's kind.
fn classify_query(query: &Query) -> Outcome {
    let class = query_class(query);
    match query.body.as_ref() {
        SetExpr::Insert(inner) | SetExpr::Update(inner) | SetExpr::Delete(inner) | SetExpr::Merge(inner) => {
            classify_statement(inner).at_least(class)
        }
        SetExpr::Select(_)
        | SetExpr::Query(_)
        | SetExpr::SetOperation { .. }
        | SetExpr::Values(_)
        | SetExpr::Table(_) => Outcome::new(class, "select"),
    }
}

/// `COPY ... TO STDOUT` reads; `FROM`, `PROGRAM` and server-side files write.
fn classify_copy(source: &CopySource, to: bool, target: &CopyTarget) -> Outcome {
    let (source_class, table) = match source {
        CopySource::Table { table_name, .. } => (StatementClass::Read, Some(table_name)),
        CopySource::Query(query) => (classify_query(query).class, None),
    };
    let outcome = match (to, target) {
        (_, CopyTarget::Program { .. }) => Outcome::new(StatementClass::Write, "copy_program"),
        (false, CopyTarget::Stdin | CopyTarget::Stdout | CopyTarget::File { .. }) => {
            Outcome::new(StatementClass::Write, "copy_from")
        }
        (true, CopyTarget::Stdout) => Outcome::new(StatementClass::Read, "copy_to"),
        (true, CopyTarget::Stdin | CopyTarget::File { .. }) => Outcome::new(StatementClass::Write, "copy_to"),
    };
    outcome.at_least(source_class).with_tables(table)
}

/// `EXPLAIN` only plans; with `ANALYZE` it runs the statement and takes its class.
fn classify_explain(analyze: bool, options: &[UtilityOption], inner: &Statement) -> Outcome {
    let analyze = analyze
        || options
            .iter()
            .any(|option| option.name.value.eq_ignore_ascii_case("analyze") && !is_false(option.arg.as_ref()));
    let class = if analyze {
        classify_statement(inner).class.max(StatementClass::Read)
    } else {
        StatementClass::Read
    };
    Outcome::new(class, "explain")
}

/// Whether a utility option's argument is explicitly false; anything unrecognised is not.
fn is_false(arg: Option<&Expr>) -> bool {
    let word = |s: &str| matches!(s.to_ascii_lowercase().as_str(), "false" | "off" | "no" | "0");
    match arg {
        Some(Expr::Value(value)) => match &value.value {
            Value::Boolean(b) => !b,
            Value::Number(n, _) => n == "0",
            Value::SingleQuotedString(s) => word(s),
            _ => false,
        },
        Some(Expr::Identifier(ident)) => word(&ident.value),
        _ => false,
    }
}

/// `DECLARE c CURSOR FOR <query>` takes the query's class.
fn classify_declare(declares: &[Declare]) -> Outcome {
    let class = declares
        .iter()
        .map(|declare| match (&declare.declare_type, &declare.for_query) {
            (Some(DeclareType::Cursor), Some(query)) => classify_query(query).class,
            _ => StatementClass::Unknown,
        })
        .max()
        .unwrap_or(StatementClass::Unknown);
    Outcome::new(class, "declare")
}

fn classify_drop(object_type: &ObjectType, names: &[ObjectName]) -> Outcome {
    match object_type {
        ObjectType::Role | ObjectType::User => Outcome::new(StatementClass::Privilege, "drop_role"),
        ObjectType::Table | ObjectType::View | ObjectType::MaterializedView => {
            Outcome::new(StatementClass::Ddl, "drop").with_tables(names)
        }
        ObjectType::Collation
        | ObjectType::Index
        | ObjectType::Schema
        | ObjectType::Database
        | ObjectType::Sequence
        | ObjectType::Type => Outcome::new(StatementClass::Ddl, "drop"),
        ObjectType::Stage | ObjectType::Stream | ObjectType::Warehouse => Outcome::new(StatementClass::Unknown, "drop"),
    }
}

fn granted_tables(objects: &Option<GrantObjects>) -> &[ObjectName] {
    match objects {
        Some(GrantObjects::Tables(names)) => names,
        _ => &[],
    }
}
