//! The jitgate certificate authority: creating a data directory's CA, the proxy's server
//! certificate and client identities, and reading an identity back out of a certificate.
//!
//! A client certificate names its user in the subject CN and in a `jitgate:user:NAME` URI
//! subject-alternative name, and each role in a `jitgate:role:NAME` URI. The URIs are what the
//! proxy trusts; the CN is for people reading the certificate.
//!
//! An agent certificate names its agent in a `jitgate:agent:NAME` URI and carries no user: it
//! is refused wherever a user is expected ([`identity_from_der`]), and a user certificate is
//! refused on the agent listener ([`agent_from_der`]). Agents make their own keys; the proxy
//! signs their CSRs ([`Authority::issue_agent`]), keeping only the public key from the request.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

use crate::model::{AgentName, Role, UserName};

const USER_URI: &str = "jitgate:user:";
const ROLE_URI: &str = "jitgate:role:";
const AGENT_URI: &str = "jitgate:agent:";
/// Certificates from an invite or a renewal: the end of the enrollment (Unix seconds), past
/// which `jitgate login --renew` is refused.
const ENROLLED_URI: &str = "jitgate:enrolled-until:";
const CA_ORG: &str = "jitgate";

/// Errors creating or reading certificates.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{0}")]
    Invalid(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_owned(),
        source,
    }
}

/// File names inside a data directory.
pub mod files {
    pub const CA_CERT: &str = "ca.crt";
    pub const CA_KEY: &str = "ca.key";
    pub const SERVER_CERT: &str = "server.crt";
    pub const SERVER_KEY: &str = "server.key";
    pub const ADMIN_CERT: &str = "admin.crt";
    pub const ADMIN_KEY: &str = "admin.key";
}

/// Who a client certificate identifies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: UserName,
    pub roles: Vec<Role>,
    /// End of the certificate's validity; sessions are cut at this instant.
    pub not_after: SystemTime,
    /// For certificates of an enrollment (an invite, then renewals): when renewals stop.
    pub enrolled_until: Option<SystemTime>,
}

impl Identity {
    /// True when the identity holds `role`.
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r.as_str() == role)
    }
}

/// What both kinds of client certificate are read from (after their client-auth usage is
/// checked): the URI subject-alternative names and the end of validity.
struct ClientCert {
    uris: Vec<String>,
    not_after: SystemTime,
}

fn client_cert(der: &[u8]) -> Result<ClientCert, PkiError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| PkiError::Invalid(format!("unparseable certificate: {e}")))?;
    let mut client_auth = false;
    let mut uris = Vec::new();
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::ExtendedKeyUsage(eku) => client_auth = eku.client_auth,
            ParsedExtension::SubjectAlternativeName(san) => {
                for name in &san.general_names {
                    if let GeneralName::URI(uri) = name {
                        uris.push((*uri).to_owned());
                    }
                }
            }
            _ => {}
        }
    }
    if !client_auth {
        return Err(PkiError::Invalid(
            "certificate lacks client-auth extended key usage".into(),
        ));
    }
    let not_after =
        SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0));
    Ok(ClientCert { uris, not_after })
}

/// Reads the identity from a DER client certificate that rustls has already verified against
/// the jitgate CA. Refuses certificates without client-auth usage or without a user URI, and
/// agent certificates.
pub fn identity_from_der(der: &[u8]) -> Result<Identity, PkiError> {
    let cert = client_cert(der)?;
    let mut user = None;
    let mut roles = Vec::new();
    let mut enrolled_until = None;
    for uri in &cert.uris {
        if uri.starts_with(AGENT_URI) {
            return Err(PkiError::Invalid(
                "an agent certificate identifies no user (agents connect to the agent listener)".into(),
            ));
        }
        if let Some(u) = uri.strip_prefix(USER_URI) {
            if user.is_some() {
                return Err(PkiError::Invalid("certificate names more than one user".into()));
            }
            user = Some(UserName::new(u).map_err(|e| PkiError::Invalid(e.to_string()))?);
        } else if let Some(r) = uri.strip_prefix(ROLE_URI) {
            roles.push(Role::new(r).map_err(|e| PkiError::Invalid(e.to_string()))?);
        } else if let Some(t) = uri.strip_prefix(ENROLLED_URI) {
            let secs: u64 = t
                .parse()
                .map_err(|_| PkiError::Invalid("unreadable enrollment end".into()))?;
            enrolled_until = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs));
        }
    }
    let user = user.ok_or_else(|| PkiError::Invalid("certificate names no jitgate user".into()))?;
    Ok(Identity {
        user,
        roles,
        not_after: cert.not_after,
        enrolled_until,
    })
}

/// Who an agent certificate identifies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentIdentity {
    pub name: AgentName,
    pub not_after: SystemTime,
}

/// Reads the agent from a DER certificate that rustls has already verified against the
/// jitgate CA. Refuses certificates that name a user, none or several agents, or lack
/// client-auth usage.
pub fn agent_from_der(der: &[u8]) -> Result<AgentIdentity, PkiError> {
    let cert = client_cert(der)?;
    let mut name = None;
    for uri in &cert.uris {
        if uri.starts_with(USER_URI) || uri.starts_with(ROLE_URI) {
            return Err(PkiError::Invalid(
                "a user certificate is not an agent certificate".into(),
            ));
        }
        if let Some(a) = uri.strip_prefix(AGENT_URI) {
            if name.is_some() {
                return Err(PkiError::Invalid("certificate names more than one agent".into()));
            }
            name = Some(AgentName::new(a).map_err(|e| PkiError::Invalid(e.to_string()))?);
        }
    }
    let name = name.ok_or_else(|| PkiError::Invalid("certificate names no jitgate agent".into()))?;
    Ok(AgentIdentity {
        name,
        not_after: cert.not_after,
    })
}

/// SHA-256 of a PEM certificate's DER, lower-case hex (what a join token pins).
pub fn cert_fingerprint(pem: &str) -> Result<String, PkiError> {
    let der = rustls_pemfile::certs(&mut pem.as_bytes())
        .next()
        .ok_or_else(|| PkiError::Invalid("no certificate".into()))?
        .map_err(|e| PkiError::Invalid(e.to_string()))?;
    Ok(jitgate_protocol::tunnel::fingerprint(&der))
}

/// A loaded CA able to sign certificates.
pub struct Authority {
    params: CertificateParams,
    key: KeyPair,
    cert_pem: String,
}

impl Authority {
    /// Creates a new CA, valid for ten years.
    pub fn generate() -> Result<Self, PkiError> {
        let suffix: u32 = rand::random();
        let params = ca_params(&format!("jitgate CA {suffix:08x}"));
        let key = KeyPair::generate()?;
        let cert = params.clone().self_signed(&key)?;
        Ok(Self {
            params,
            key,
            cert_pem: cert.pem(),
        })
    }

    /// Loads `ca.crt` and `ca.key` from a data directory.
    pub fn load(data_dir: &Path) -> Result<Self, PkiError> {
        let cert_path = data_dir.join(files::CA_CERT);
        let key_path = data_dir.join(files::CA_KEY);
        let cert_pem = std::fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
        let key_pem = std::fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
        let key = KeyPair::from_pem(&key_pem)?;
        let der = rustls_pemfile::certs(&mut cert_pem.as_bytes())
            .next()
            .ok_or_else(|| PkiError::Invalid(format!("{}: no certificate", cert_path.display())))?
            .map_err(io_err(&cert_path))?;
        let (_, cert) =
            X509Certificate::from_der(&der).map_err(|e| PkiError::Invalid(format!("{}: {e}", cert_path.display())))?;
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .ok_or_else(|| PkiError::Invalid(format!("{}: CA has no common name", cert_path.display())))?
            .to_owned();
        // Re-deriving the parameters from the CN yields byte-identical issuer names, which is
        // what chain building compares; the key identifier comes from the same key.
        Ok(Self {
            params: ca_params(&cn),
            key,
            cert_pem,
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key, PEM.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    fn sign(&self, params: CertificateParams) -> Result<(String, String), PkiError> {
        let key = KeyPair::generate()?;
        let issuer = self.params.clone().self_signed(&self.key)?;
        let cert = params.signed_by(&key, &issuer, &self.key)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Issues a server certificate for the given DNS names and IP addresses (one year).
    pub fn issue_server(&self, names: &[String]) -> Result<(String, String), PkiError> {
        let mut params = leaf_params(
            names.first().map_or("jitgate", String::as_str),
            Duration::from_secs(365 * 86_400),
        );
        for name in names {
            params.subject_alt_names.push(match name.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(name.as_str().try_into()?),
            });
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params)
    }

    /// Issues a client certificate naming `user` with `roles`, valid for `ttl`.
    pub fn issue_client(&self, user: &UserName, roles: &[Role], ttl: Duration) -> Result<(String, String), PkiError> {
        let now = time::OffsetDateTime::now_utc();
        // Tolerate small clock skew between the issuing host and the proxy.
        self.issue_client_between(user, roles, now - time::Duration::minutes(5), now + ttl)
    }

    /// Issues a client certificate with an explicit validity window (tests use this to make
    /// certificates that are already expired).
    pub fn issue_client_between(
        &self,
        user: &UserName,
        roles: &[Role],
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
    ) -> Result<(String, String), PkiError> {
        let mut params = leaf_params(user.as_str(), Duration::ZERO);
        params.not_before = not_before;
        params.not_after = not_after;
        params
            .subject_alt_names
            .push(SanType::URI(format!("{USER_URI}{user}").try_into()?));
        for role in roles {
            params
                .subject_alt_names
                .push(SanType::URI(format!("{ROLE_URI}{role}").try_into()?));
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }
}

/// Checks that `csr_pem` is a readable, self-signed certificate request (before a join token
/// is spent on it).
pub fn check_csr(csr_pem: &str) -> Result<(), PkiError> {
    rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
        .map(|_| ())
        .map_err(|e| PkiError::Invalid(format!("unreadable certificate request: {e}")))
}

impl Authority {
    /// Signs an agent certificate for the key in `csr_pem` (PEM CSR), naming `agent`, valid
    /// for `ttl`. Only the CSR's public key is used: names and extensions come from here.
    pub fn issue_agent(&self, agent: &AgentName, csr_pem: &str, ttl: Duration) -> Result<String, PkiError> {
        let mut csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| PkiError::Invalid(format!("unreadable certificate request: {e}")))?;
        let mut params = leaf_params(&format!("agent {agent}"), ttl);
        params
            .subject_alt_names
            .push(SanType::URI(format!("{AGENT_URI}{agent}").try_into()?));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        csr.params = params;
        let issuer = self.params.clone().self_signed(&self.key)?;
        Ok(csr.signed_by(&issuer, &self.key)?.pem())
    }
}

/// What a certificate from a login or an invite says: who, which roles, until when.
pub struct UserCert<'a> {
    pub user: &'a UserName,
    pub roles: &'a [Role],
    pub not_after: SystemTime,
    /// Set for certificates of an enrollment (see [`Identity::enrolled_until`]).
    pub enrolled_until: Option<SystemTime>,
}

impl Authority {
    /// Signs a user certificate for the key in `csr_pem`: the CLI made the key, and only the
    /// request's public key is used (names, roles and validity come from `what`).
    pub fn issue_user_csr(&self, what: &UserCert<'_>, csr_pem: &str) -> Result<String, PkiError> {
        let mut csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| PkiError::Invalid(format!("unreadable certificate request: {e}")))?;
        let mut params = leaf_params(what.user.as_str(), Duration::ZERO);
        params.not_after = time::OffsetDateTime::from(what.not_after);
        params
            .subject_alt_names
            .push(SanType::URI(format!("{USER_URI}{}", what.user).try_into()?));
        for role in what.roles {
            params
                .subject_alt_names
                .push(SanType::URI(format!("{ROLE_URI}{role}").try_into()?));
        }
        if let Some(until) = what.enrolled_until {
            let secs = until
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            params
                .subject_alt_names
                .push(SanType::URI(format!("{ENROLLED_URI}{secs}").try_into()?));
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        csr.params = params;
        let issuer = self.params.clone().self_signed(&self.key)?;
        Ok(csr.signed_by(&issuer, &self.key)?.pem())
    }

    /// A key derived from the CA key for `purpose`: the same on every replica holding this CA,
    /// unknown to anyone without `ca.key`.
    pub fn derived_key(&self, purpose: &str) -> [u8; 32] {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.key.serialize_der());
        let tag = ring::hmac::sign(&key, purpose.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(&tag.as_ref()[..32]);
        out
    }
}

fn ca_params(common_name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, CA_ORG);
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(3650);
    params
}

fn leaf_params(common_name: &str, ttl: Duration) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, CA_ORG);
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.serial_number = Some(SerialNumber::from_slice(&rand::random::<[u8; 16]>()[..]));
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let now = time::OffsetDateTime::now_utc();
    // Tolerate small clock skew between the issuing host and the proxy.
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + ttl;
    params
}

/// Writes `contents` to `path`; private keys get mode 0600.
pub fn write_file(path: &Path, contents: &str, private: bool) -> Result<(), PkiError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    if private {
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(io_err(path))?;
    f.write_all(contents.as_bytes()).map_err(io_err(path))
}

/// Issues a client identity and writes `NAME.crt`, `NAME.key` and `ca.crt` into `out`.
pub fn issue_to_dir(
    ca: &Authority,
    user: &UserName,
    roles: &[Role],
    ttl: Duration,
    out: &Path,
) -> Result<(PathBuf, PathBuf), PkiError> {
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let (cert, key) = ca.issue_client(user, roles, ttl)?;
    let cert_path = out.join(format!("{user}.crt"));
    let key_path = out.join(format!("{user}.key"));
    write_file(&cert_path, &cert, false)?;
    write_file(&key_path, &key, true)?;
    write_file(&out.join(files::CA_CERT), ca.cert_pem(), false)?;
    Ok((cert_path, key_path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_identity_round_trips() {
        let ca = Authority::generate().unwrap();
        let user = UserName::new("alice").unwrap();
        let roles = vec![Role::new("dev").unwrap(), Role::new("oncall").unwrap()];
        let (pem, _) = ca.issue_client(&user, &roles, Duration::from_secs(3600)).unwrap();
        let der = rustls_pemfile::certs(&mut pem.as_bytes()).next().unwrap().unwrap();
        let id = identity_from_der(&der).unwrap();
        assert_eq!(id.user, user);
        assert_eq!(id.roles, roles);
        let left = id.not_after.duration_since(SystemTime::now()).unwrap();
        assert!(left > Duration::from_secs(3500) && left <= Duration::from_secs(3600));
    }

    fn agent_csr() -> (KeyPair, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        // What the agent asks for is ignored: the proxy names the certificate.
        params
            .subject_alt_names
            .push(SanType::URI("jitgate:user:root".try_into().unwrap()));
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        (key, csr)
    }

    #[test]
    fn agent_certificates_name_the_agent_and_no_user() {
        let ca = Authority::generate().unwrap();
        let (_key, csr) = agent_csr();
        let name = AgentName::new("db-east").unwrap();
        let pem = ca.issue_agent(&name, &csr, Duration::from_secs(600)).unwrap();
        let der = rustls_pemfile::certs(&mut pem.as_bytes()).next().unwrap().unwrap();
        let agent = agent_from_der(&der).unwrap();
        assert_eq!(agent.name, name);
        let left = agent.not_after.duration_since(SystemTime::now()).unwrap();
        assert!(left > Duration::from_secs(500) && left <= Duration::from_secs(600));
        let err = identity_from_der(&der).unwrap_err().to_string();
        assert!(err.contains("agent certificate"), "{err}");

        let (user, _) = ca
            .issue_client(&UserName::new("alice").unwrap(), &[], Duration::from_secs(60))
            .unwrap();
        let der = rustls_pemfile::certs(&mut user.as_bytes()).next().unwrap().unwrap();
        let err = agent_from_der(&der).unwrap_err().to_string();
        assert!(err.contains("user certificate"), "{err}");
        assert!(ca.issue_agent(&name, "not a csr", Duration::from_secs(60)).is_err());
    }

    #[test]
    fn server_certificate_is_not_a_client_identity() {
        let ca = Authority::generate().unwrap();
        let (pem, _) = ca.issue_server(&["localhost".into(), "127.0.0.1".into()]).unwrap();
        let der = rustls_pemfile::certs(&mut pem.as_bytes()).next().unwrap().unwrap();
        assert!(identity_from_der(&der).is_err());
    }
}
