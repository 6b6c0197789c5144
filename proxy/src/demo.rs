//! `jitgate demo`: a sandbox on this machine in one command. A temp data dir, a throwaway
//! PostgreSQL with a read-only role, the proxy on free loopback ports, a `demo` user
//! certificate and a 15-minute read grant; prints the psql line to paste. Ctrl-C removes it all.

use std::time::Duration;

use anyhow::{Context as _, Result};

use crate::client::ApiClient;
use crate::config::Config;
use crate::model::{AccessLevel, NewRequest, Role, UserName};
use crate::pki::{self, files, Authority};
use crate::sandbox::{LocalPostgres, PgOptions};
use crate::server::Listeners;

const TARGET: &str = "demo-db";
const READER_PASSWORD: &str = "demo-reader-password";

/// Runs the demo until Ctrl-C.
pub async fn run() -> Result<()> {
    eprintln!("starting a throwaway PostgreSQL...");
    let pg = tokio::task::spawn_blocking(|| LocalPostgres::start(&PgOptions::default())).await??;
    pg.sql("postgres", "CREATE DATABASE app")?;
    pg.sql(
        "app",
        &format!(
            "CREATE ROLE jit_reader LOGIN PASSWORD '{READER_PASSWORD}';
             CREATE TABLE orders (id int PRIMARY KEY, customer text, total numeric);
             INSERT INTO orders SELECT g, 'customer ' || g, g * 9.99 FROM generate_series(1, 100) g;
             GRANT SELECT ON ALL TABLES IN SCHEMA public TO jit_reader;"
        ),
    )?;

    let dir = tempfile::Builder::new().prefix("jitgate-demo-").tempdir()?;
    let data = dir.path().to_path_buf();
    crate::cli::init_data_dir(&data, &[], Duration::from_secs(3600))?;
    let secret = data.join("reader.password");
    pki::write_file(&secret, READER_PASSWORD, true)?;
    let config_text = format!(
        r#"data_dir = "{data}"
[listen]
postgres = "127.0.0.1:0"
api = "127.0.0.1:0"
metrics = "127.0.0.1:0"
[[targets]]
name = "{TARGET}"
address = "{addr}"
database = "app"
labels = {{ env = "demo" }}
[targets.credentials.read]
user = "jit_reader"
password_file = "{secret}"

[[policies]]
name = "demo-read"
roles = ["dev"]
targets = {{ env = "demo" }}
access = ["read"]
max_duration = "1h"
approve = "auto"
"#,
        data = data.display(),
        addr = pg.address(),
        secret = secret.display()
    );
    let config_path = data.join("jitgate.toml");
    std::fs::write(&config_path, &config_text)?;
    let config = Config::load(&config_path)?;
    let listeners = Listeners::bind(&config.listen).await?;
    let addrs = listeners.addrs();
    // Point the CLI at the bound port.
    std::fs::write(
        &config_path,
        config_text.replacen("api = \"127.0.0.1:0\"", &format!("api = \"{}\"", addrs.api), 1),
    )?;

    let user = UserName::new("demo")?;
    let ca = Authority::load(&data)?;
    pki::issue_to_dir(&ca, &user, &[Role::new("dev")?], Duration::from_secs(3600), &data)?;

    let shutdown = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(crate::server::run(
        config,
        listeners,
        shutdown.clone().cancelled_owned(),
    ));
    // The demo user asks for access like any engineer; policy demo-read approves at once.
    let as_demo = ApiClient::from_files(
        &addrs.api.to_string(),
        &data.join("demo.crt"),
        &data.join("demo.key"),
        &data.join(files::CA_CERT),
    )?;
    let request = as_demo
        .create_request(&NewRequest {
            target: TARGET.into(),
            access: AccessLevel::Read,
            duration_secs: 15 * 60,
            reason: "jitgate demo".into(),
            break_glass: false,
        })
        .await
        .context("requesting the demo grant")?;
    let grant = request.grant_id.context("the demo request was not granted")?;

    let d = data.display();
    println!();
    println!(
        "jitgate demo is running. Connect as user 'demo' (read access for 15 minutes, request {}, grant {grant}):",
        request.id
    );
    println!();
    println!(
        "  psql \"host=127.0.0.1 port={port} dbname={TARGET} user=demo sslmode=verify-full sslrootcert={d}/ca.crt sslcert={d}/demo.crt sslkey={d}/demo.key\" -c 'SELECT count(*) FROM orders'",
        port = addrs.postgres.port()
    );
    println!();
    println!("Ask for more access as 'demo' (policy demo-read grants up to 1h at once):");
    println!(
        "  jitgate request {TARGET} --for 30m --reason \"trying jitgate\" --api {api} --cert {d}/demo.crt --key {d}/demo.key --ca {d}/ca.crt",
        api = addrs.api
    );
    println!();
    println!("Manage grants, requests and sessions as admin:");
    println!("  export JITGATE_DATA_DIR={d}");
    println!("  jitgate grant list");
    println!("  jitgate session list");
    println!("  jitgate request list");
    println!("  jitgate grant revoke {grant}");
    println!();
    println!("Audit log: {d}/audit.jsonl   Metrics: http://{}/metrics", addrs.metrics);
    println!("Press Ctrl-C to stop and remove everything.");

    tokio::select! {
        _ = crate::cli::shutdown_signal() => {}
        r = &mut Box::pin(async { shutdown.cancelled().await }) => r,
    }
    shutdown.cancel();
    server.await??;
    drop(pg);
    drop(dir);
    eprintln!("demo stopped; sandbox removed");
    Ok(())
}
