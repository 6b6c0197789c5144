//! A real `jitgate-agent` process beside the harness's PostgreSQL: joined with a token from
//! the harness's proxy, run with its own config, killed and restarted by the tests; and a
//! network namespace with a veth pair to put it behind a link a test can blackhole.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use jitgate::agents::NewAgentToken;
use jitgate::model::{AgentName, TargetName};
use tokio::process::{Child, Command};

use crate::{eventually, CliRun, Harness};

/// Path of the `jitgate-agent` binary built next to the test executable.
pub fn agent_bin() -> PathBuf {
    let bin = crate::jitgate_bin().with_file_name("jitgate-agent");
    assert!(
        bin.is_file(),
        "{} missing: run cargo build --workspace --bins --tests first (scripts/test does)",
        bin.display()
    );
    bin
}

/// Runs `jitgate-agent` with `args` to completion.
pub async fn run_agent(args: &[&str]) -> CliRun {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        Command::new(agent_bin())
            .args(args)
            .env_remove("JITGATE_AGENT_TOKEN")
            .output(),
    )
    .await
    .expect("jitgate-agent finished")
    .unwrap();
    CliRun {
        ok: out.status.success(),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A join token from the harness's proxy.
pub async fn token(h: &Harness, name: &str, targets: &[&str], ttl_secs: u64) -> String {
    h.admin()
        .create_agent_token(&NewAgentToken {
            name: AgentName::new(name).unwrap(),
            targets: targets.iter().map(|t| TargetName::new(*t).unwrap()).collect(),
            ttl_secs: Some(ttl_secs),
        })
        .await
        .unwrap()
        .token
}

/// One agent's data directory and, while it runs, its process.
pub struct Agent {
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    /// Runs it inside this network namespace.
    netns: Option<String>,
    runs: usize,
}

impl Agent {
    /// Joins `name` (admitted for `targets`) to the harness's proxy at `proxy`.
    pub async fn join(h: &Harness, name: &str, targets: &[&str], proxy: &str) -> Agent {
        Self::join_with(h, name, targets, proxy, &[]).await
    }

    /// As [`Agent::join`], checking the proxy's certificate against `server_name`.
    pub async fn join_checking(h: &Harness, name: &str, targets: &[&str], proxy: &str, server_name: &str) -> Agent {
        Self::join_with(h, name, targets, proxy, &["--server-name", server_name]).await
    }

    async fn join_with(h: &Harness, name: &str, targets: &[&str], proxy: &str, extra: &[&str]) -> Agent {
        let dir = tempfile::Builder::new().prefix("jitgate-agent-").tempdir().unwrap();
        let token = token(h, name, targets, 600).await;
        let mut args = vec![
            "join",
            "--proxy",
            proxy,
            "--token",
            &token,
            "--data-dir",
            dir.path().to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let run = run_agent(&args).await;
        assert!(run.ok, "join failed: {}{}", run.stdout, run.stderr);
        Agent {
            dir,
            child: None,
            netns: None,
            runs: 0,
        }
    }

    /// Later starts run inside network namespace `ns`.
    pub fn in_netns(&mut self, ns: &str) {
        self.netns = Some(ns.to_owned());
    }

    /// Writes `agent.toml`: the `[targets]` table and any other lines.
    pub fn configure(&self, body: &str) {
        std::fs::write(self.dir.path().join("agent.toml"), body).unwrap();
    }

    /// Starts `jitgate-agent run --data-dir DIR`, its log in DIR/run-N.log.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "agent already running");
        self.runs += 1;
        let log = std::fs::File::create(self.log_path(self.runs)).unwrap();
        let mut c = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(agent_bin());
                c
            }
            None => Command::new(agent_bin()),
        };
        c.args(["run", "--data-dir", self.dir.path().to_str().unwrap()])
            .env("JITGATE_LOG", "info,jitgate_agent=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true);
        self.child = Some(c.spawn().unwrap());
    }

    fn log_path(&self, run: usize) -> PathBuf {
        self.dir.path().join(format!("run-{run}.log"))
    }

    /// What the current (or last) run logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path(self.runs)).unwrap_or_default()
    }

    /// SIGKILL, and wait for the process to be gone.
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }

    /// Waits for the process to exit by itself; its exit status.
    pub async fn exited(&mut self, limit: Duration) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("agent running");
        tokio::time::timeout(limit, c.wait())
            .await
            .expect("agent exited")
            .unwrap()
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The running process's id (to stop and continue it with signals).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }
}

/// Waits until the proxy lists `name` as connected.
pub async fn wait_connected(h: &Harness, name: &str, limit: Duration) {
    let admin = h.admin().clone();
    eventually(&format!("agent {name} connected"), limit, || {
        let admin = admin.clone();
        async move {
            admin
                .list_agents()
                .await
                .is_ok_and(|all| all.iter().any(|a| a.name.as_str() == name && a.connected))
        }
    })
    .await;
}

/// A network namespace joined to the host by a veth pair: the host end is `host_ip`, the
/// namespace end `ns_ip` (a random /30 of 10.123.0.0/16). Removed on drop.
pub struct Netns {
    pub name: String,
    host_if: String,
    ns_if: String,
    pub host_ip: String,
    pub ns_ip: String,
}

fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    pub fn create() -> Netns {
        let n = crate::rand_u32() % 16_384;
        let suffix = format!("{n:04x}");
        let (a, b) = (n / 64, (n % 64) * 4);
        let ns = Netns {
            name: format!("jgt-{suffix}"),
            host_if: format!("jgh-{suffix}"),
            ns_if: format!("jgn-{suffix}"),
            host_ip: format!("10.123.{a}.{}", b + 1),
            ns_ip: format!("10.123.{a}.{}", b + 2),
        };
        ip(&["netns", "add", &ns.name]);
        ip(&["link", "add", &ns.host_if, "type", "veth", "peer", "name", &ns.ns_if]);
        ip(&["link", "set", &ns.ns_if, "netns", &ns.name]);
        ip(&["addr", "add", &format!("{}/30", ns.host_ip), "dev", &ns.host_if]);
        ip(&["link", "set", &ns.host_if, "up"]);
        ns.exec(&["ip", "addr", "add", &format!("{}/30", ns.ns_ip), "dev", &ns.ns_if]);
        ns.exec(&["ip", "link", "set", &ns.ns_if, "up"]);
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    fn exec(&self, args: &[&str]) {
        let mut all = vec!["netns", "exec", &self.name];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// Drops every packet between the namespace and the host, both ways, without a reset:
    /// both ends of the veth go down, so nothing is delivered and nothing is refused.
    pub fn blackhole(&self) {
        ip(&["link", "set", &self.host_if, "down"]);
        self.exec(&["ip", "link", "set", &self.ns_if, "down"]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its veth end, and with it the pair.
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.host_if])
            .status();
    }
}
