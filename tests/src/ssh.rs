//! A real OpenSSH `sshd` on a free loopback port as an SSH target (its own host key, config and
//! authorized key for the upstream user), and the real `ssh` client with a user's jitgate SSH
//! certificate. The server stops when dropped, also when a test fails.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime};

use jitgate::model::{Role, UserName};
use tokio::process::{Child, Command};

use crate::Harness;

/// The Unix user the SSH targets log in as (created when missing). Not root: sshd runs a
/// root login without its privilege-separated child, and then refuses `signal` requests,
/// which the proxy sends to end a command at a cut.
pub const UPSTREAM_USER: &str = "jitssh";

fn ensure_upstream_user() {
    let exists = std::process::Command::new("id")
        .arg(UPSTREAM_USER)
        .output()
        .is_ok_and(|o| o.status.success());
    if !exists {
        // Two tests may race here; the loser's "already exists" is fine. Password "*": no
        // password login, and not locked ("!"), which sshd would refuse.
        let _ = std::process::Command::new("useradd")
            .args(["-m", "-s", "/bin/sh", "-p", "*", UPSTREAM_USER])
            .output();
    }
}

/// A running `sshd`.
pub struct LocalSshd {
    pub dir: tempfile::TempDir,
    pub port: u16,
    child: std::process::Child,
}

fn keygen(path: &Path) {
    let out = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "jitgate-test", "-f"])
        .arg(path)
        .output()
        .expect("ssh-keygen (is openssh-client installed? scripts/test installs it)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

impl LocalSshd {
    /// Starts sshd with a fresh host key; the upstream user (the test's own, root in CI)
    /// logs in with `upstream_key`.
    pub fn start() -> LocalSshd {
        ensure_upstream_user();
        let dir = tempfile::Builder::new().prefix("jitgate-sshd-").tempdir().unwrap();
        let d = dir.path();
        {
            use std::os::unix::fs::PermissionsExt as _;
            // sshd reads authorized_keys as the upstream user.
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        keygen(&d.join("host_key"));
        keygen(&d.join("upstream_key"));
        std::fs::copy(d.join("upstream_key.pub"), d.join("authorized_keys")).unwrap();
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(d.join("authorized_keys"), std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        // sshd wants its privilege-separation directory.
        let _ = std::fs::create_dir_all("/run/sshd");
        let port = jitgate::sandbox::free_port().unwrap();
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nPidFile {d}/sshd.pid\n\
             AuthorizedKeysFile {d}/authorized_keys\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nPubkeyAuthentication yes\nPermitRootLogin prohibit-password\n\
             UsePAM no\nStrictModes no\nSubsystem sftp internal-sftp\nLogLevel ERROR\n",
            d = d.display()
        );
        std::fs::write(d.join("sshd_config"), config).unwrap();
        let sshd = ["/usr/sbin/sshd", "/usr/bin/sshd"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("sshd (is openssh-server installed? scripts/test installs it)");
        let child = std::process::Command::new(sshd)
            .args(["-D", "-e", "-f"])
            .arg(d.join("sshd_config"))
            .stderr(std::fs::File::create(d.join("sshd.log")).unwrap())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "sshd did not listen: {}",
                std::fs::read_to_string(d.join("sshd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        LocalSshd { dir, port, child }
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The host key line, `ssh-ed25519 AAAA...`.
    pub fn host_key(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("host_key.pub"))
            .unwrap()
            .trim()
            .to_owned()
    }

    pub fn upstream_key(&self) -> PathBuf {
        self.dir.path().join("upstream_key")
    }
}

impl Drop for LocalSshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A user's SSH key and certificate from the harness's SSH user CA.
#[derive(Debug, Clone)]
pub struct SshUser {
    pub user: String,
    pub key: PathBuf,
    pub cert: PathBuf,
}

/// Issues `name`'s SSH key and certificate, valid from `from` to `until`.
pub fn ssh_user_between(h: &Harness, name: &str, roles: &[&str], from: SystemTime, until: SystemTime) -> SshUser {
    let out = h
        .data_dir()
        .join("ssh-users")
        .join(format!("{name}-{}", crate::rand_suffix()));
    std::fs::create_dir_all(&out).unwrap();
    let roles: Vec<Role> = roles.iter().map(|r| Role::new(*r).unwrap()).collect();
    let files = jitgate::sshca::issue_user(h.data_dir(), &UserName::new(name).unwrap(), &roles, from, until, &out)
        .unwrap()
        .unwrap();
    SshUser {
        user: name.into(),
        key: files.key,
        cert: files.cert,
    }
}

/// Issues `name`'s SSH key and certificate for an hour.
pub fn ssh_user(h: &Harness, name: &str, roles: &[&str]) -> SshUser {
    let now = SystemTime::now();
    ssh_user_between(
        h,
        name,
        roles,
        now - Duration::from_secs(60),
        now + Duration::from_secs(3600),
    )
}

/// The options every OpenSSH client (`ssh`, `scp`, `sftp`) needs to reach the proxy's SSH
/// listener as `login` (`target` or `user@target`): the user's key and certificate, the
/// proxy's host key pinned, no config file, no prompts. The port is the caller's (`-p` for
/// ssh, `-P` for scp and sftp).
pub fn client_options(h: &Harness, user: &SshUser, login: &str) -> Vec<String> {
    let port = h.addrs().ssh.expect("ssh listener").port();
    let known = h.data_dir().join("ssh-known-hosts");
    let host_key = std::fs::read_to_string(h.data_dir().join("ssh_host_ed25519_key.pub")).unwrap();
    std::fs::write(&known, format!("[127.0.0.1]:{port} {host_key}")).unwrap();
    [
        "-F".to_owned(),
        "/dev/null".to_owned(),
        "-i".to_owned(),
        user.key.display().to_string(),
        "-o".to_owned(),
        format!("CertificateFile={}", user.cert.display()),
        "-o".to_owned(),
        format!("UserKnownHostsFile={}", known.display()),
        "-o".to_owned(),
        format!("User={login}"),
    ]
    .into_iter()
    .chain(
        [
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=10",
        ]
        .map(str::to_owned),
    )
    .collect()
}

/// `ssh` to the proxy's SSH listener as `login`; `args` follow (a command, or `-tt` options
/// before it).
pub fn ssh_command(h: &Harness, user: &SshUser, login: &str, args: &[&str]) -> Command {
    let port = h.addrs().ssh.expect("ssh listener").port();
    let mut c = Command::new("ssh");
    c.args(["-p", &port.to_string()])
        .args(client_options(h, user, login))
        .arg("127.0.0.1")
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    c
}

/// `program` (`scp` or `sftp`) to the proxy as `login`; `args` follow. The remote host is
/// `127.0.0.1` (`127.0.0.1:PATH` for scp).
pub fn file_command(program: &str, h: &Harness, user: &SshUser, login: &str, args: &[&str]) -> Command {
    let port = h.addrs().ssh.expect("ssh listener").port();
    let mut c = Command::new(program);
    c.args(["-P", &port.to_string()])
        .args(client_options(h, user, login))
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    c
}

/// Runs `command` to completion within a minute: (success, stdout, stderr).
pub async fn run(mut command: Command) -> (bool, String, String) {
    let out = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("finished within a minute")
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `ssh` to completion: (success, stdout, stderr).
pub async fn ssh(h: &Harness, user: &SshUser, login: &str, args: &[&str]) -> (bool, String, String) {
    run(ssh_command(h, user, login, args)).await
}

/// Spawns `ssh` with piped output.
pub fn spawn_ssh(h: &Harness, user: &SshUser, login: &str, args: &[&str]) -> Child {
    ssh_command(h, user, login, args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}
