//! Trusting a server on first contact by the fingerprint of its CA: the caller holds no CA
//! certificate yet, only the SHA-256 of one (from a join token, an invite code or a flag).
//! The chain the server sends must carry a certificate with that fingerprint, and the server
//! certificate must chain to it and name the host (webpki, against that CA alone). Nothing
//! is trusted on first use without the pin.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

/// A server certificate verifier pinned to one CA fingerprint (lower-case hex SHA-256 of the
/// CA certificate's DER, as [`crate::tunnel::fingerprint`] makes it).
#[derive(Debug)]
pub struct PinnedCa {
    pin: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl PinnedCa {
    pub fn new(pin: &str, provider: Arc<rustls::crypto::CryptoProvider>) -> Self {
        Self {
            pin: pin.to_ascii_lowercase(),
            provider,
        }
    }
}

/// True when `s` reads as a SHA-256 fingerprint: 64 hex digits (colons between bytes allowed).
pub fn normalize_fingerprint(s: &str) -> Option<String> {
    let hex: String = s.trim().chars().filter(|c| *c != ':').collect();
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then(|| hex.to_ascii_lowercase())
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| crate::tunnel::fingerprint(c) == self.pin)
            .ok_or_else(|| {
                rustls::Error::General(format!(
                    "the proxy's CA does not match the pinned fingerprint {}",
                    self.pin
                ))
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&self.provider))
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        webpki.verify_server_cert(end_entity, &[], server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
