//! TLS configuration for the client-facing listeners and classification of handshake
//! failures. The PostgreSQL listener requires a client certificate chaining to the jitgate
//! CA; the API and agent listeners verify one when it is sent, and serve a caller without
//! one only what a first contact needs (logins, joins). rustls (webpki) checks the chain,
//! validity period and client-auth usage during the handshake.
//!
//! Session resumption is off: a resumed TLS session carries the certificate of the handshake
//! it resumes and is not verified again, so a certificate that has expired since (or a CA
//! that is no longer trusted) would still pass. Every connection makes a full handshake.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{RootCertStore, ServerConfig};

use crate::config::TlsPaths;

/// ALPN protocol id for PostgreSQL direct TLS (PostgreSQL 17).
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// Errors loading TLS material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Server configurations for the PostgreSQL, API and agent listeners.
pub struct ServerTls {
    pub postgres: Arc<ServerConfig>,
    /// The API listener: a client certificate is optional at the TLS layer (`jitgate login`
    /// has none yet); without one only the login routes answer (`api::serve_connection`).
    pub api: Arc<ServerConfig>,
    /// The agent listener: a client certificate is optional at the TLS layer (an agent's first
    /// contact, the join, has none yet; everything else needs an agent certificate, checked
    /// after the handshake), and the chain sent includes the CA, so a joining agent can pin
    /// it by the fingerprint in its token.
    pub agents: Arc<ServerConfig>,
}

/// The crypto provider used everywhere (ring).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn file_err(path: &Path, message: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

/// Reads every certificate in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = std::fs::read(path).map_err(|e| file_err(path, e))?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(path, e))?;
    if certs.is_empty() {
        return Err(file_err(path, "no certificate found"));
    }
    Ok(certs)
}

/// Reads the first private key in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = std::fs::read(path).map_err(|e| file_err(path, e))?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| file_err(path, e))?
        .ok_or_else(|| file_err(path, "no private key found"))
}

/// Root store holding the certificates in `path`.
pub fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert)?;
    }
    Ok(roots)
}

impl ServerTls {
    /// Builds both server configurations from the configured files.
    pub fn load(paths: &TlsPaths) -> Result<Self, TlsError> {
        let roots = Arc::new(load_roots(&paths.ca_cert)?);
        let certs = load_certs(&paths.server_cert)?;
        let key = load_key(&paths.server_key)?;
        let build = |alpn: &[u8]| -> Result<Arc<ServerConfig>, TlsError> {
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), provider())
                .build()
                .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?;
            let mut cfg = ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()?
                .with_client_cert_verifier(verifier)
                .with_single_cert(certs.clone(), key.clone_key())?;
            cfg.alpn_protocols = vec![alpn.to_vec()];
            // No resumption (see the module doc): no session cache, no TLS 1.3 tickets.
            cfg.session_storage = Arc::new(NoServerSessionStorage {});
            cfg.send_tls13_tickets = 0;
            Ok(Arc::new(cfg))
        };
        // The API and agent listeners: a client certificate is optional at the TLS layer (a
        // login or an agent's join has none yet; every other call needs one, checked after the
        // handshake), and the chain sent includes the CA, so a first contact can pin it by the
        // fingerprint of an invite, a join token or `--ca-fingerprint`.
        let optional = |alpn: Vec<Vec<u8>>| -> Result<Arc<ServerConfig>, TlsError> {
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), provider())
                .allow_unauthenticated()
                .build()
                .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?;
            let mut chain = certs.clone();
            chain.extend(load_certs(&paths.ca_cert)?);
            let mut cfg = ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()?
                .with_client_cert_verifier(verifier)
                .with_single_cert(chain, key.clone_key())?;
            cfg.alpn_protocols = alpn;
            cfg.session_storage = Arc::new(NoServerSessionStorage {});
            cfg.send_tls13_tickets = 0;
            Ok(Arc::new(cfg))
        };
        // In order of preference: an agent that offers the first takes the replica list.
        let agents = optional(vec![
            jitgate_protocol::tunnel::ALPN_REPLICAS.to_vec(),
            jitgate_protocol::tunnel::ALPN.to_vec(),
        ])?;
        Ok(Self {
            postgres: build(ALPN_POSTGRESQL)?,
            api: optional(vec![b"http/1.1".to_vec()])?,
            agents,
        })
    }
}

/// A bounded label for a failed handshake.
pub fn failure_reason(err: &std::io::Error) -> &'static str {
    use rustls::{CertificateError, Error};
    let Some(tls) = err.get_ref().and_then(|e| e.downcast_ref::<Error>()) else {
        return match err.kind() {
            std::io::ErrorKind::UnexpectedEof => "eof",
            _ => "io",
        };
    };
    match tls {
        Error::NoCertificatesPresented => "no_certificate",
        Error::InvalidCertificate(CertificateError::Expired | CertificateError::ExpiredContext { .. }) => {
            "expired_certificate"
        }
        Error::InvalidCertificate(CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. }) => {
            "not_yet_valid_certificate"
        }
        Error::InvalidCertificate(CertificateError::UnknownIssuer) => "unknown_issuer",
        Error::InvalidCertificate(_) => "bad_certificate",
        Error::NoApplicationProtocol => "alpn",
        _ => "protocol",
    }
}
