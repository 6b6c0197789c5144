//! The request commands of the CLI: `jitgate request`, `request list|show|withdraw`,
//! `approve`, `deny` and `extend`. They talk to the control API as the caller's certificate.
//!
//! Exit codes: 0 when the command did what it said (for `request`/`extend` without `--wait`,
//! the request was filed; with `--wait`, access was granted); 2 when access was not granted
//! (refused, denied, withdrawn, lapsed); 1 for any other error.

use std::time::{Duration, SystemTime};

use anyhow::Result;
use clap::{Args, Subcommand};

use super::{ListFilter, NewExtension, NewRequest, Request, RequestState};
use crate::cli::{api_client, print_json, ApiArgs};
use crate::client::{ApiClient, ClientError};
use crate::model::AccessLevel;
use crate::policy::duration_text;

/// The request did not result in access; `jitgate` exits 2 with this message.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NotGranted(pub String);

/// `jitgate request ...`: ask for access, or list, show and withdraw requests.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct RequestArgs {
    #[command(subcommand)]
    command: Option<RequestCommand>,
    #[command(flatten)]
    new: NewRequestArgs,
    #[command(flatten)]
    api: ApiArgs,
}

#[derive(Debug, Args)]
struct NewRequestArgs {
    /// Target to ask access to (a [[targets]] name).
    #[arg(required = true)]
    target: Option<String>,
    /// read, write or admin.
    #[arg(long, default_value = "read")]
    access: AccessLevel,
    /// How long, e.g. 30m or 2h (whole seconds, at least 1s); the policy sets the maximum.
    #[arg(long = "for", value_parser = crate::timefmt::parse_grant_duration, required = true)]
    duration: Option<Duration>,
    /// Why (ticket, incident); shown to approvers and recorded in the audit log.
    #[arg(long, required = true)]
    reason: Option<String>,
    /// Break-glass: granted at once where a policy allows it, flagged and notified loudly
    /// for review afterwards.
    #[arg(long)]
    break_glass: bool,
    /// Wait until the request is decided: exit 0 once granted, 2 when denied, withdrawn or
    /// lapsed.
    #[arg(long)]
    wait: bool,
}

#[derive(Debug, Subcommand)]
enum RequestCommand {
    /// List requests: your own and those you may decide (admins: all), newest first.
    List {
        /// Only your own requests.
        #[arg(long)]
        mine: bool,
        /// Only requests waiting for a decision.
        #[arg(long)]
        pending: bool,
        /// Only break-glass requests, for review.
        #[arg(long)]
        break_glass: bool,
    },
    /// Show one request with its approvals.
    Show { id: String },
    /// Take back your pending request.
    Withdraw { id: String },
}

/// `jitgate approve ID`.
#[derive(Debug, Args)]
pub struct ApproveArgs {
    /// Request id (r-...).
    id: String,
    /// Recorded with your approval.
    #[arg(long)]
    comment: Option<String>,
    #[command(flatten)]
    api: ApiArgs,
}

/// `jitgate deny ID --reason TEXT`.
#[derive(Debug, Args)]
pub struct DenyArgs {
    /// Request id (r-...).
    id: String,
    /// Why; shown to the requester.
    #[arg(long)]
    reason: String,
    #[command(flatten)]
    api: ApiArgs,
}

/// `jitgate extend GRANT_ID --for D --reason TEXT`.
#[derive(Debug, Args)]
pub struct ExtendArgs {
    /// Your live grant (g-...; psql's expiry notice names it).
    grant_id: String,
    /// How much later the grant should end, e.g. 30m (whole seconds, at least 1s).
    #[arg(long = "for", value_parser = crate::timefmt::parse_grant_duration)]
    duration: Duration,
    /// Why; shown to approvers and recorded in the audit log.
    #[arg(long)]
    reason: String,
    /// Wait until the extension is decided: exit 0 once granted, 2 otherwise.
    #[arg(long)]
    wait: bool,
    #[command(flatten)]
    api: ApiArgs,
}

/// How often `--wait` asks for the request's state.
const POLL: Duration = Duration::from_millis(500);

/// Turns a refusal by policy into [`NotGranted`].
fn refused(e: ClientError) -> anyhow::Error {
    match e {
        ClientError::Api { code, message, .. } if code == "refused" => NotGranted(message).into(),
        e => e.into(),
    }
}

pub async fn request(args: RequestArgs) -> Result<()> {
    let client = api_client(&args.api)?;
    let json = args.api.json;
    match args.command {
        Some(RequestCommand::List {
            mine,
            pending,
            break_glass,
        }) => {
            let filter = ListFilter {
                mine,
                pending,
                break_glass,
            };
            let found = client.list_requests(&filter).await?;
            if json {
                print_json(&found)
            } else {
                print_table(&found);
                Ok(())
            }
        }
        Some(RequestCommand::Show { id }) => {
            let r = client.get_request(&id).await?;
            if json {
                print_json(&r)
            } else {
                print_details(&r);
                Ok(())
            }
        }
        Some(RequestCommand::Withdraw { id }) => {
            let r = client.withdraw_request(&id).await?;
            if json {
                print_json(&r)
            } else {
                println!("{} withdrawn", r.id);
                Ok(())
            }
        }
        None => {
            let a = args.new;
            let (Some(target), Some(duration), Some(reason)) = (a.target, a.duration, a.reason) else {
                anyhow::bail!("jitgate request needs TARGET, --for and --reason");
            };
            let new = NewRequest {
                target,
                access: a.access,
                duration_secs: duration.as_secs(),
                reason,
                break_glass: a.break_glass,
            };
            let r = client.create_request(&new).await.map_err(refused)?;
            conclude(&client, r, a.wait, json).await
        }
    }
}

pub async fn approve(a: ApproveArgs) -> Result<()> {
    let r = api_client(&a.api)?.approve_request(&a.id, a.comment).await?;
    if a.api.json {
        return print_json(&r);
    }
    match r.state {
        RequestState::Approved => println!(
            "{} approved: grant {} gives {} {} access to {}",
            r.id,
            r.grant_id.as_ref().map_or("-", |g| g.as_str()),
            r.user,
            r.access,
            r.target
        ),
        _ => println!(
            "{}: your approval is {} of {} needed",
            r.id,
            r.approvals.len(),
            r.approvals_needed
        ),
    }
    Ok(())
}

pub async fn deny(a: DenyArgs) -> Result<()> {
    let r = api_client(&a.api)?.deny_request(&a.id, &a.reason).await?;
    if a.api.json {
        print_json(&r)
    } else {
        println!("{} denied", r.id);
        Ok(())
    }
}

pub async fn extend(a: ExtendArgs) -> Result<()> {
    let client = api_client(&a.api)?;
    let ext = NewExtension {
        duration_secs: a.duration.as_secs(),
        reason: a.reason,
    };
    let r = client.request_extension(&a.grant_id, &ext).await.map_err(refused)?;
    conclude(&client, r, a.wait, a.api.json).await
}

/// Prints a filed request; with `wait`, first polls until it is decided. Fails with
/// [`NotGranted`] when the request (as last seen) did not end approved and the caller waited.
async fn conclude(client: &ApiClient, mut r: Request, wait: bool, json: bool) -> Result<()> {
    if wait && r.state == RequestState::Pending {
        eprintln!(
            "{} pending: waiting for {} approval{} (Ctrl-C stops waiting; the request stays pending)",
            r.id,
            r.approvals_needed,
            if r.approvals_needed == 1 { "" } else { "s" }
        );
        while r.state == RequestState::Pending {
            tokio::time::sleep(POLL).await;
            r = client.get_request(r.id.as_str()).await?;
        }
    }
    if json {
        print_json(&r)?;
    } else {
        print_outcome(&r);
    }
    match r.state {
        RequestState::Approved | RequestState::Pending => Ok(()),
        state => Err(NotGranted(format!(
            "request {} {state}{}",
            r.id,
            r.note.as_deref().map(|n| format!(": {n}")).unwrap_or_default()
        ))
        .into()),
    }
}

fn print_outcome(r: &Request) {
    let what = match &r.extends {
        Some(g) => format!(
            "{} more on grant {g}",
            duration_text(Duration::from_secs(r.duration_secs))
        ),
        None => format!(
            "{} access to {} for {}",
            r.access,
            r.target,
            duration_text(Duration::from_secs(r.duration_secs))
        ),
    };
    match r.state {
        RequestState::Approved => println!(
            "{} approved{}: {what}; grant {}",
            r.id,
            if r.break_glass {
                " (BREAK-GLASS: flagged for review)"
            } else {
                ""
            },
            r.grant_id.as_ref().map_or("-", |g| g.as_str())
        ),
        RequestState::Pending => println!(
            "{} pending: {what}; needs {} approval{} from roles {} (policy {}); lapses in {}\n\
             follow it with: jitgate request show {}",
            r.id,
            r.approvals_needed,
            if r.approvals_needed == 1 { "" } else { "s" },
            r.approver_roles
                .iter()
                .map(|r| r.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            r.policy,
            until(r.lapses_at),
            r.id
        ),
        state => println!("{} {state}: {what}", r.id),
    }
}

fn until(t: SystemTime) -> String {
    duration_text(t.duration_since(SystemTime::now()).unwrap_or_default())
}

fn ago(t: SystemTime) -> String {
    format!(
        "{} ago",
        duration_text(SystemTime::now().duration_since(t).unwrap_or_default())
    )
}

fn print_table(found: &[Request]) {
    println!(
        "{:<20} {:<10} {:<14} {:<14} {:<6} {:<8} {:<9} {:<14} {:<12} REASON",
        "ID", "STATE", "USER", "TARGET", "ACCESS", "FOR", "APPROVALS", "CREATED", "FLAGS"
    );
    for r in found {
        let flags = match (&r.extends, r.break_glass) {
            (_, true) => "break-glass".to_owned(),
            (Some(g), _) => format!("extends {g}"),
            (None, false) => String::new(),
        };
        println!(
            "{:<20} {:<10} {:<14} {:<14} {:<6} {:<8} {:<9} {:<14} {:<12} {}",
            r.id,
            r.state,
            r.user,
            r.target,
            r.access,
            duration_text(Duration::from_secs(r.duration_secs)),
            format!("{}/{}", r.approvals.len(), r.approvals_needed),
            ago(r.created_at),
            flags,
            r.reason
        );
    }
}

fn print_details(r: &Request) {
    println!("id:         {}", r.id);
    println!("state:      {}", r.state);
    let roles: Vec<&str> = r.roles.iter().map(|r| r.as_str()).collect();
    println!("user:       {} (roles {})", r.user, roles.join(", "));
    println!("target:     {}", r.target);
    println!("access:     {}", r.access);
    match &r.extends {
        Some(g) => println!(
            "extends:    grant {g} by {}",
            duration_text(Duration::from_secs(r.duration_secs))
        ),
        None => println!("for:        {}", duration_text(Duration::from_secs(r.duration_secs))),
    }
    println!("reason:     {}", r.reason);
    if r.break_glass {
        println!("flags:      BREAK-GLASS (granted at once, flagged for review)");
    }
    println!("policy:     {}", r.policy);
    println!("created:    {}", ago(r.created_at));
    println!("approvals:  {} of {}", r.approvals.len(), r.approvals_needed);
    for v in &r.approvals {
        println!(
            "  - {} {}{}",
            v.by,
            ago(v.at),
            v.comment.as_deref().map(|c| format!(": {c}")).unwrap_or_default()
        );
    }
    if r.state == RequestState::Pending {
        println!("lapses in:  {}", until(r.lapses_at));
    }
    if let Some(by) = &r.decided_by {
        println!("decided by: {by}");
    }
    if let Some(note) = &r.note {
        println!("note:       {note}");
    }
    if let Some(g) = &r.grant_id {
        println!("grant:      {g}");
    }
}
