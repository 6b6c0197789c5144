//! `jitgate ssh TARGET [-- COMMAND]` and `jitgate ssh-config TARGET...`: the system's OpenSSH
//! client pointed at the proxy with the files `jitgate cert issue` wrote (the key, its
//! certificate, and `jitgate_known_hosts` pinning the proxy's host key under the alias
//! `jitgate`, so any address of the proxy verifies).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use clap::Args;

use crate::sshca::{files, HOST_ALIAS};

/// Where the proxy's SSH listener is and which key to use.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// The proxy's SSH listener, HOST:PORT (`listen.ssh`).
    #[arg(long, env = "JITGATE_SSH", default_value = "localhost:2222")]
    proxy: String,
    /// The SSH private key `jitgate cert issue` wrote (OUT/NAME); its certificate is
    /// IDENTITY-cert.pub. Default: JITGATE_CERT without its `.crt`.
    #[arg(long, env = "JITGATE_SSH_KEY")]
    identity: Option<PathBuf>,
    /// known_hosts file pinning the proxy's host key. Default: jitgate_known_hosts beside the
    /// identity.
    #[arg(long)]
    known_hosts: Option<PathBuf>,
}

/// `jitgate ssh`.
#[derive(Debug, Args)]
pub struct SshArgs {
    /// The target (an SSH target of the proxy's config).
    target: String,
    /// A command to run instead of a shell (after `--`).
    #[arg(last = true)]
    command: Vec<String>,
    /// Print the ssh command line instead of running it.
    #[arg(long)]
    print: bool,
    #[command(flatten)]
    client: ClientArgs,
}

/// `jitgate ssh-config`.
#[derive(Debug, Args)]
pub struct SshConfigArgs {
    /// Targets to write a `Host` block for (the block's name is the target's).
    #[arg(required = true)]
    targets: Vec<String>,
    #[command(flatten)]
    client: ClientArgs,
}

/// What both commands resolve first.
struct Client {
    host: String,
    port: u16,
    identity: PathBuf,
    cert: PathBuf,
    known_hosts: PathBuf,
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_owned())
}

impl ClientArgs {
    fn resolve(&self) -> Result<Client> {
        let (host, port) = self
            .proxy
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h.trim_matches(['[', ']']).to_owned(), p.parse::<u16>().ok()?)))
            .with_context(|| format!("--proxy {:?} is not HOST:PORT", self.proxy))?;
        let identity = match (&self.identity, std::env::var_os("JITGATE_CERT")) {
            (Some(i), _) => i.clone(),
            (None, Some(cert)) => {
                let cert = PathBuf::from(cert);
                match cert.to_str().and_then(|c| c.strip_suffix(".crt")) {
                    Some(stem) => PathBuf::from(stem),
                    None => bail!("JITGATE_CERT {} does not end in .crt: pass --identity", cert.display()),
                }
            }
            (None, None) => {
                bail!("no SSH key: pass --identity FILE (the OUT/NAME jitgate cert issue wrote) or set JITGATE_SSH_KEY")
            }
        };
        let identity = absolute(&identity);
        let cert = PathBuf::from(format!("{}-cert.pub", identity.display()));
        for f in [&identity, &cert] {
            if !f.is_file() {
                bail!("{} is missing (jitgate cert issue writes it)", f.display());
            }
        }
        let known_hosts = match &self.known_hosts {
            Some(k) => absolute(k),
            None => identity.parent().unwrap_or(Path::new(".")).join(files::KNOWN_HOSTS),
        };
        if !known_hosts.is_file() {
            bail!(
                "{} is missing: jitgate cert issue writes it, or pass --known-hosts with a line `{HOST_ALIAS} ssh-ed25519 ...` (the proxy's ssh_host_ed25519_key.pub)",
                known_hosts.display()
            );
        }
        Ok(Client {
            host,
            port,
            identity,
            cert,
            known_hosts,
        })
    }
}

impl Client {
    /// `-o` options, as `Key=Value`.
    fn options(&self, target: &str) -> Vec<String> {
        vec![
            format!("User={target}"),
            format!("Port={}", self.port),
            format!("IdentityFile={}", self.identity.display()),
            format!("CertificateFile={}", self.cert.display()),
            "IdentitiesOnly=yes".into(),
            format!("HostKeyAlias={HOST_ALIAS}"),
            format!("UserKnownHostsFile={}", self.known_hosts.display()),
            "StrictHostKeyChecking=yes".into(),
        ]
    }
}

/// Runs `ssh` (replacing this process), or prints its command line.
pub fn ssh(args: SshArgs) -> Result<()> {
    let client = args.client.resolve()?;
    let mut argv: Vec<String> = Vec::new();
    for o in client.options(&args.target) {
        argv.push("-o".into());
        argv.push(o);
    }
    argv.push(client.host.clone());
    if !args.command.is_empty() {
        argv.push("--".into());
        argv.extend(args.command);
    }
    if args.print {
        let quoted: Vec<String> = argv.iter().map(|a| shell_quote(a)).collect();
        println!("ssh {}", quoted.join(" "));
        return Ok(());
    }
    use std::os::unix::process::CommandExt as _;
    let err = std::process::Command::new("ssh").args(&argv).exec();
    Err(err).context("cannot run ssh (is openssh-client installed?)")
}

/// Prints a `Host` block per target for `~/.ssh/config`.
pub fn ssh_config(args: SshConfigArgs) -> Result<()> {
    let client = args.client.resolve()?;
    let mut out = String::new();
    for target in &args.targets {
        out.push_str(&format!(
            "# jitgate: `ssh {target}` goes through the proxy at {}:{} (needs a grant)\nHost {target}\n  HostName {}\n",
            client.host, client.port, client.host
        ));
        for o in client.options(target) {
            let (k, v) = o.split_once('=').unwrap_or((&o, ""));
            let v = if v.contains(' ') {
                format!("\"{v}\"")
            } else {
                v.to_owned()
            };
            out.push_str(&format!("  {k} {v}\n"));
        }
        out.push('\n');
    }
    print!("{out}");
    Ok(())
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:@,+".contains(&b))
    {
        return s.to_owned();
    }
    format!("'{}'", s.replace('\'', "'\\''"))
}
