//! A throwaway PostgreSQL cluster (`initdb` + `postgres` on a free loopback port in a temp
//! dir) for `jitgate demo` and the end-to-end tests. When run as root it runs the server as
//! the `postgres` system user, because PostgreSQL refuses to run as root. Dropping the value
//! stops the server and deletes the directory.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Sandbox failures, with enough context to act on.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("PostgreSQL server binaries not found: install the postgresql package (apt-get install postgresql)")]
    NotInstalled,
    #[error("{what}: {message}")]
    Failed { what: String, message: String },
}

fn failed(what: impl Into<String>, message: impl std::fmt::Display) -> SandboxError {
    SandboxError::Failed {
        what: what.into(),
        message: message.to_string(),
    }
}

/// Options for a sandbox cluster.
#[derive(Debug, Default, Clone)]
pub struct PgOptions {
    /// Serve TLS with this certificate and key (PEM), `ssl = on`.
    pub tls: Option<(String, String)>,
}

/// A running throwaway cluster.
pub struct LocalPostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    run_as: Option<String>,
    port: u16,
    child: Option<Child>,
}

/// Finds the directory holding `initdb` and `postgres`: `PATH` first, then the newest
/// `/usr/lib/postgresql/*/bin` (Debian's layout).
pub fn find_bin_dir() -> Result<PathBuf, SandboxError> {
    if let Ok(path) = std::env::var("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("initdb").is_file() && dir.join("postgres").is_file() {
                // Follow symlinks (e.g. /usr/local/bin/postgres) to the real install, which
                // also holds psql of the same version.
                if let Some(real) = std::fs::canonicalize(dir.join("postgres"))
                    .ok()
                    .and_then(|p| p.parent().map(Path::to_path_buf))
                {
                    if real.join("psql").is_file() {
                        return Ok(real);
                    }
                }
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|_| SandboxError::NotInstalled)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, b)| b).ok_or(SandboxError::NotInstalled)
}

/// A free TCP port on 127.0.0.1 (bound and released; the caller retries on a race).
pub fn free_port() -> Result<u16, SandboxError> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| failed("bind 127.0.0.1:0", e))?;
    Ok(l.local_addr().map_err(|e| failed("local_addr", e))?.port())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.trim_ascii() == b"0")
        .unwrap_or(false)
}

fn id_of(user: &str, flag: &str) -> Result<u32, SandboxError> {
    let out = Command::new("id")
        .args([flag, user])
        .output()
        .map_err(|e| failed("id", e))?;
    if !out.status.success() {
        return Err(failed(
            format!("user {user}"),
            "does not exist; install the postgresql package",
        ));
    }
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map_err(|e| failed("id", e))
}

impl LocalPostgres {
    /// Creates and starts a cluster; waits until it accepts connections.
    pub fn start(opts: &PgOptions) -> Result<Self, SandboxError> {
        let bin = find_bin_dir()?;
        let run_as = is_root().then(|| "postgres".to_owned());
        let dir = tempfile::Builder::new()
            .prefix("jitgate-pg-")
            .tempdir()
            .map_err(|e| failed("tempdir", e))?;
        if let Some(user) = &run_as {
            let (uid, gid) = (id_of(user, "-u")?, id_of(user, "-g")?);
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).map_err(|e| failed("chown", e))?;
        }
        let mut pg = Self {
            dir,
            bin,
            run_as,
            port: 0,
            child: None,
        };
        pg.initdb(opts)?;
        let mut last = None;
        for _ in 0..5 {
            match pg.launch() {
                Ok(()) => return Ok(pg),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| failed("postgres", "did not start")))
    }

    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(path);
                c
            }
            None => Command::new(path),
        }
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Directory of the Unix socket.
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn initdb(&self, opts: &PgOptions) -> Result<(), SandboxError> {
        let out = self
            .command("initdb")
            .args(["-D"])
            .arg(self.data())
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .output()
            .map_err(|e| failed("initdb", e))?;
        if !out.status.success() {
            return Err(failed("initdb", String::from_utf8_lossy(&out.stderr)));
        }
        let hba = "local all all trust\n\
                   host all jit_md5 127.0.0.1/32 md5\n\
                   host all jit_trust 127.0.0.1/32 trust\n\
                   host all all 127.0.0.1/32 scram-sha-256\n";
        self.write_owned("data/pg_hba.conf", hba)?;
        let mut conf = String::from(
            "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 200\n\
             shared_buffers = 32MB\nlisten_addresses = '127.0.0.1'\nunix_socket_permissions = 0777\n",
        );
        if let Some((cert, key)) = &opts.tls {
            self.write_owned("data/server.crt", cert)?;
            self.write_owned("data/server.key", key)?;
            conf.push_str("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        }
        let path = self.data().join("postgresql.conf");
        let mut existing = std::fs::read_to_string(&path).map_err(|e| failed("postgresql.conf", e))?;
        existing.push_str(&conf);
        std::fs::write(&path, existing).map_err(|e| failed("postgresql.conf", e))
    }

    fn write_owned(&self, rel: &str, contents: &str) -> Result<(), SandboxError> {
        use std::os::unix::fs::PermissionsExt as _;
        let path = self.dir.path().join(rel);
        std::fs::write(&path, contents).map_err(|e| failed(rel, e))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(|e| failed(rel, e))?;
        if let Some(user) = &self.run_as {
            std::os::unix::fs::chown(&path, Some(id_of(user, "-u")?), Some(id_of(user, "-g")?))
                .map_err(|e| failed("chown", e))?;
        }
        Ok(())
    }

    fn launch(&mut self) -> Result<(), SandboxError> {
        let port = free_port()?;
        self.launch_on(port)
    }

    fn launch_on(&mut self, port: u16) -> Result<(), SandboxError> {
        self.port = port;
        let log = std::fs::File::create(self.dir.path().join("postgres.log")).map_err(|e| failed("log", e))?;
        let child = self
            .command("postgres")
            .arg("-D")
            .arg(self.data())
            .args(["-p", &self.port.to_string(), "-k"])
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| failed("postgres", e))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    let log = std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default();
                    return Err(failed("postgres", format!("exited with {status}: {log}")));
                }
            }
            if self.sql("postgres", "SELECT 1").is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(failed("postgres", "not ready after 30s"))
    }

    /// Runs SQL as the superuser over the Unix socket; returns unaligned, tuples-only output.
    pub fn sql(&self, database: &str, sql: &str) -> Result<String, SandboxError> {
        let out = self
            .command("psql")
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(self.dir.path())
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                database,
                "-c",
                sql,
            ])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| failed("psql", e))?;
        if !out.status.success() {
            return Err(failed(format!("psql -c {sql:?}"), String::from_utf8_lossy(&out.stderr)));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Stops the server (a fast shutdown: clients are disconnected at once, committed data
    /// kept; the sandbox runs with `synchronous_commit = off`, so an immediate shutdown could
    /// lose the last commits): [`LocalPostgres::resume`] starts it again on the same port.
    pub fn pause(&mut self) {
        self.stop_postmaster("-INT");
    }

    /// Starts a paused server again, on the port it had.
    pub fn resume(&mut self) -> Result<(), SandboxError> {
        let port = self.port;
        let mut last = None;
        for _ in 0..20 {
            match self.launch_on(port) {
                Ok(()) => return Ok(()),
                // The old postmaster's port may take a moment to be free.
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        Err(last.unwrap_or_else(|| failed("postgres", "did not start again")))
    }

    fn stop_postmaster(&mut self, signal: &str) {
        if let Some(mut child) = self.child.take() {
            // Signal the postmaster itself (the child may be `runuser`, which does not forward
            // signals). SIGQUIT: immediate shutdown; the postmaster takes its children with it.
            let pid = std::fs::read_to_string(self.data().join("postmaster.pid"))
                .ok()
                .and_then(|s| s.lines().next().map(str::to_owned))
                .unwrap_or_else(|| child.id().to_string());
            let _ = Command::new("kill").args([signal, &pid]).status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The server log so far (for test failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }
}

impl Drop for LocalPostgres {
    fn drop(&mut self) {
        self.stop_postmaster("-QUIT");
    }
}
