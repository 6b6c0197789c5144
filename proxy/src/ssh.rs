//! SSH access: the `listen.ssh` listener, certificate authentication against the SSH user CA,
//! the target chosen by the login name, admission and the lease from the access core, an
//! upstream connection (russh client) to the target with its pinned host key and the level's
//! key, and every channel relayed to a channel of that connection:
//! - shells with a pty, each recorded as an asciicast (`recording`), named with its SHA-256 in
//!   `session.end`;
//! - `exec`, each command audited with its exit status, duration and bytes;
//! - the `sftp` subsystem (which `scp` uses), read both ways to audit each file operation
//!   (`sftp`);
//! - `direct-tcpip` forwards (`ssh -L`, `-W`) where the target allows them, each audited.
//!
//! Agent forwarding, X11, remote forwarding and other subsystems are refused. Every channel is
//! cut with a line on the terminal when the lease ends. `command` is the client side:
//! `jitgate ssh` and `jitgate ssh-config`.
//!
//! Not built: the proxy presenting its host certificate (russh 0.54 serves plain host keys
//! only), so clients pin the proxy's host key (`jitgate_known_hosts`).

pub mod command;
mod recording;
mod server;
pub mod sftp;

use std::path::Path;

pub use server::{serve_connection, SshContext};

use crate::config::{ConfigError, Secrets};

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        message: message.into(),
    }
}

/// Parses one OpenSSH public key line (`type base64 [comment]`) into `type base64`.
fn public_key_line(key: &str, line: &str) -> Result<String, ConfigError> {
    let parsed = russh::keys::ssh_key::PublicKey::from_openssh(line.trim())
        .map_err(|e| invalid(key, format!("not an OpenSSH public key ({e})")))?;
    parsed
        .to_openssh()
        .map(|s| s.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
        .map_err(|e| invalid(key, e.to_string()))
}

/// The pinned host keys of an SSH target: `host_key` (one public key), or the lines of a
/// `known_hosts` file whose host field names the target's host (or `[host]:port`). Hashed
/// entries and `@` markers are not read.
pub fn host_keys(
    key: &str,
    address: &str,
    host_key: Option<&str>,
    known_hosts: Option<&Path>,
    secrets: Secrets,
) -> Result<Vec<String>, ConfigError> {
    match (host_key, known_hosts) {
        (Some(_), Some(_)) => Err(invalid(key, "set host_key or known_hosts, not both")),
        (None, None) => Err(invalid(
            key,
            "an SSH target needs its host key pinned: host_key = \"ssh-ed25519 AAAA...\" or known_hosts = \"FILE\"",
        )),
        (Some(line), None) => Ok(vec![public_key_line(key, line)?]),
        (None, Some(_)) if secrets == Secrets::Skip => Ok(Vec::new()),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path).map_err(|e| invalid(key, format!("{}: {e}", path.display())))?;
            let (host, port) = address.rsplit_once(':').unwrap_or((address, "22"));
            let names = [host.to_owned(), format!("[{host}]:{port}")];
            let mut keys = Vec::new();
            for line in text.lines().map(str::trim) {
                if line.is_empty() || line.starts_with('#') || line.starts_with('@') {
                    continue;
                }
                let Some((hosts, rest)) = line.split_once(char::is_whitespace) else {
                    continue;
                };
                let matches = hosts
                    .split(',')
                    .any(|h| (port == "22" && h == names[0]) || h == names[1]);
                if matches {
                    keys.push(public_key_line(key, rest)?);
                }
            }
            if keys.is_empty() {
                return Err(invalid(key, format!("{} has no key for {address}", path.display())));
            }
            Ok(keys)
        }
    }
}

/// Checks that `text` is an unencrypted OpenSSH private key; returns it, newline-terminated.
pub fn check_private_key(key: &str, text: &str) -> Result<String, ConfigError> {
    let text = format!("{}\n", text.trim_end());
    let parsed = russh::keys::ssh_key::PrivateKey::from_openssh(&text)
        .map_err(|e| invalid(key, format!("not an OpenSSH private key ({e})")))?;
    if parsed.is_encrypted() {
        return Err(invalid(
            key,
            "the key is encrypted; jitgate needs it without a passphrase",
        ));
    }
    Ok(text)
}
