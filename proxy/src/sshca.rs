//! The SSH side of jitgate's identity: an SSH user CA, whose certificates name a user (key id
//! and principal) and carry the roles in an extension; an SSH host CA, which signs the
//! proxy's host key, so a single `@cert-authority` line in `known_hosts` trusts every replica.
//! `jitgate init` makes both and the host key; `jitgate cert issue` writes a user key and its
//! certificate beside the X.509 pair, valid for the same time.
//!
//! The SSH listener (`crate::ssh`) accepts only certificates from the user CA. It cannot present
//! the host certificate yet: russh 0.54 serves plain host keys.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use ssh_key::certificate::{Builder, CertType};
use ssh_key::{Algorithm, LineEnding, PrivateKey, PublicKey};

use crate::model::{Role, UserName};
use crate::pki::{write_file, PkiError};

/// File names inside a data directory.
pub mod files {
    pub const USER_CA: &str = "ssh_user_ca";
    pub const HOST_CA: &str = "ssh_host_ca";
    pub const HOST_KEY: &str = "ssh_host_ed25519_key";
    /// Written by `cert issue` beside the user's key: the proxy's host key under the alias
    /// [`super::HOST_ALIAS`], for `jitgate ssh` and `jitgate ssh-config`.
    pub const KNOWN_HOSTS: &str = "jitgate_known_hosts";
}

/// The name the proxy's host key is pinned under (`HostKeyAlias`), whatever address reaches it.
pub const HOST_ALIAS: &str = "jitgate";

/// The certificate extension that carries a user's roles, comma-separated.
pub const ROLES_EXTENSION: &str = "roles@jitgate";

fn invalid(what: &str) -> impl FnOnce(ssh_key::Error) -> PkiError + '_ {
    move |e| PkiError::Invalid(format!("{what}: {e}"))
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn new_key() -> Result<PrivateKey, PkiError> {
    PrivateKey::random(&mut rand::rngs::OsRng, Algorithm::Ed25519).map_err(invalid("generating an SSH key"))
}

fn private_text(key: &PrivateKey) -> Result<String, PkiError> {
    Ok(key
        .to_openssh(LineEnding::LF)
        .map_err(invalid("encoding an SSH key"))?
        .to_string())
}

fn public_text(key: &PublicKey) -> Result<String, PkiError> {
    Ok(format!(
        "{}\n",
        key.to_openssh().map_err(invalid("encoding an SSH public key"))?
    ))
}

/// Writes a private key (0600) and its `.pub`.
fn write_pair(dir: &Path, name: &str, key: &PrivateKey) -> Result<(PathBuf, PathBuf), PkiError> {
    let private = dir.join(name);
    let public = dir.join(format!("{name}.pub"));
    write_file(&private, &private_text(key)?, true)?;
    write_file(&public, &public_text(key.public_key())?, false)?;
    Ok((private, public))
}

fn load_key(path: &Path) -> Result<PrivateKey, PkiError> {
    let text = std::fs::read_to_string(path).map_err(|source| PkiError::Io {
        path: path.to_owned(),
        source,
    })?;
    PrivateKey::from_openssh(text).map_err(|e| PkiError::Invalid(format!("{}: {e}", path.display())))
}

/// What `init` made: the `@cert-authority` line for `known_hosts`.
#[derive(Debug)]
pub struct HostTrust {
    pub known_hosts_line: String,
}

/// Makes the SSH user CA, the SSH host CA and the proxy's host key with a host certificate for
/// `names` (valid ten years, as the X.509 CA), in `data_dir`.
pub fn init(data_dir: &Path, names: &[String]) -> Result<HostTrust, PkiError> {
    let user_ca = new_key()?;
    write_pair(data_dir, files::USER_CA, &user_ca)?;
    let host_ca = new_key()?;
    write_pair(data_dir, files::HOST_CA, &host_ca)?;
    let host = new_key()?;
    write_pair(data_dir, files::HOST_KEY, &host)?;
    let now = SystemTime::now();
    let mut cert = Builder::new(
        rand::random::<[u8; 16]>().to_vec(),
        host.public_key().key_data().clone(),
        unix(now) - 3600,
        unix(now + Duration::from_secs(3650 * 86_400)),
    )
    .map_err(invalid("host certificate"))?;
    cert.cert_type(CertType::Host)
        .and_then(|c| c.key_id("jitgate proxy"))
        .map_err(invalid("host certificate"))?;
    for name in names {
        cert.valid_principal(name.as_str())
            .map_err(invalid("host certificate"))?;
    }
    let cert = cert.sign(&host_ca).map_err(invalid("signing the host certificate"))?;
    write_file(
        &data_dir.join(format!("{}-cert.pub", files::HOST_KEY)),
        &format!("{}\n", cert.to_openssh().map_err(invalid("host certificate"))?),
        false,
    )?;
    // Host patterns: the name on the default port, and on any other ([name]:port).
    let patterns: Vec<String> = names.iter().flat_map(|n| [n.clone(), format!("[{n}]:*")]).collect();
    let ca_line = host_ca.public_key().to_openssh().map_err(invalid("host CA"))?;
    Ok(HostTrust {
        known_hosts_line: format!("@cert-authority {} {ca_line}", patterns.join(",")),
    })
}

/// The files `issue_user` wrote.
#[derive(Debug)]
pub struct UserKeyFiles {
    pub key: PathBuf,
    pub public: PathBuf,
    pub cert: PathBuf,
    /// `OUT/jitgate_known_hosts`, when the data directory has the proxy's host key.
    pub known_hosts: Option<PathBuf>,
}

/// Issues an SSH key for `user` and its certificate from the data directory's SSH user CA:
/// key id and only principal the user, roles in [`ROLES_EXTENSION`], valid from
/// `not_before` to `not_after`. Writes `OUT/NAME` (0600), `OUT/NAME.pub`, `OUT/NAME-cert.pub`,
/// and `OUT/jitgate_known_hosts` with the proxy's host key (when the data directory has it).
/// `None` when the data directory has no SSH user CA (made before SSH identities existed).
pub fn issue_user(
    data_dir: &Path,
    user: &UserName,
    roles: &[Role],
    not_before: SystemTime,
    not_after: SystemTime,
    out: &Path,
) -> Result<Option<UserKeyFiles>, PkiError> {
    let ca_path = data_dir.join(files::USER_CA);
    if !ca_path.exists() {
        return Ok(None);
    }
    let ca = load_key(&ca_path)?;
    let key = new_key()?;
    let mut cert = Builder::new(
        rand::random::<[u8; 16]>().to_vec(),
        key.public_key().key_data().clone(),
        unix(not_before),
        unix(not_after),
    )
    .map_err(invalid("user certificate"))?;
    let roles = roles.iter().map(Role::as_str).collect::<Vec<_>>().join(",");
    cert.cert_type(CertType::User)
        .and_then(|c| c.serial(rand::random()))
        .and_then(|c| c.key_id(user.as_str()))
        .and_then(|c| c.valid_principal(user.as_str()))
        .and_then(|c| c.extension(ROLES_EXTENSION, roles.as_str()))
        .and_then(|c| c.extension("permit-pty", ""))
        .and_then(|c| c.comment(user.as_str()))
        .map_err(invalid("user certificate"))?;
    let cert = cert.sign(&ca).map_err(invalid("signing the user certificate"))?;
    let (key_path, public) = write_pair(out, user.as_str(), &key)?;
    let cert_path = out.join(format!("{user}-cert.pub"));
    write_file(
        &cert_path,
        &format!("{}\n", cert.to_openssh().map_err(invalid("user certificate"))?),
        false,
    )?;
    let host_pub = data_dir.join(format!("{}.pub", files::HOST_KEY));
    let known_hosts = match std::fs::read_to_string(&host_pub) {
        Ok(line) => {
            let path = out.join(files::KNOWN_HOSTS);
            let key = line.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
            write_file(&path, &format!("{HOST_ALIAS} {key}\n"), false)?;
            Some(path)
        }
        Err(_) => None,
    };
    Ok(Some(UserKeyFiles {
        key: key_path,
        public,
        cert: cert_path,
        known_hosts,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_certificates_name_the_user_carry_roles_and_verify_against_the_user_ca() {
        let dir = tempfile::tempdir().unwrap();
        let trust = init(dir.path(), &["proxy.example.com".into(), "localhost".into()]).unwrap();
        assert!(trust.known_hosts_line.starts_with(
            "@cert-authority proxy.example.com,[proxy.example.com]:*,localhost,[localhost]:* ssh-ed25519 "
        ));
        let user = UserName::new("alice").unwrap();
        let roles = [Role::new("dev").unwrap(), Role::new("oncall").unwrap()];
        let now = SystemTime::now();
        let out = dir.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        let files = issue_user(dir.path(), &user, &roles, now, now + Duration::from_secs(600), &out)
            .unwrap()
            .unwrap();
        let cert = ssh_key::Certificate::read_file(&files.cert).unwrap();
        assert_eq!(cert.cert_type(), CertType::User);
        assert_eq!(cert.key_id(), "alice");
        assert_eq!(cert.valid_principals(), ["alice"]);
        assert_eq!(
            cert.extensions().get(ROLES_EXTENSION).map(String::as_str),
            Some("dev,oncall")
        );
        let user_ca = load_key(&dir.path().join(files::USER_CA)).unwrap();
        let host_ca = load_key(&dir.path().join(files::HOST_CA)).unwrap();
        assert!(cert
            .validate_at(unix(now) + 1, [&user_ca.public_key().fingerprint(Default::default())])
            .is_ok());
        // Not against the host CA, and not after its end.
        assert!(cert
            .validate_at(unix(now) + 1, [&host_ca.public_key().fingerprint(Default::default())])
            .is_err());
        assert!(cert
            .validate_at(unix(now) + 601, [&user_ca.public_key().fingerprint(Default::default())])
            .is_err());
        let key = load_key(&files.key).unwrap();
        assert_eq!(key.public_key().key_data(), cert.public_key());
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&files.key).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600);

        let host = ssh_key::Certificate::read_file(&dir.path().join(format!("{}-cert.pub", files::HOST_KEY))).unwrap();
        assert_eq!(host.cert_type(), CertType::Host);
        assert_eq!(host.valid_principals(), ["proxy.example.com", "localhost"]);
        assert!(host
            .validate([&host_ca.public_key().fingerprint(Default::default())])
            .is_ok());

        // A data directory from before SSH identities: nothing written.
        let old = tempfile::tempdir().unwrap();
        assert!(issue_user(old.path(), &user, &roles, now, now, old.path())
            .unwrap()
            .is_none());
    }
}
