//! The two certificate verifiers: the client pins one server fingerprint, the server admits the authorized clients; both check the TLS 1.3 signature.

use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use tracing::warn;

use super::*;

/// Verifies a server by fingerprint instead of a CA chain.
///
/// With `expected` set, any other certificate fails the handshake. Without it
/// (first contact) any certificate is accepted, and [`Self::seen`] tells the
/// caller what to store. In both cases the handshake signature is checked.
#[derive(Debug)]
pub struct PinnedServerVerifier {
    expected: Option<Fingerprint>,
    seen: Mutex<Option<Fingerprint>>,
    provider: Arc<CryptoProvider>,
}

impl PinnedServerVerifier {
    /// A verifier that accepts only `expected`, or anything if `None`.
    pub fn new(expected: Option<Fingerprint>) -> Arc<Self> {
        Arc::new(Self {
            expected,
            seen: Mutex::new(None),
            provider: crypto_provider(),
        })
    }

    /// The fingerprint the server presented, once a handshake got that far.
    pub fn seen(&self) -> Option<Fingerprint> {
        *self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the server presented a fingerprint other than the expected one.
    pub(crate) fn mismatch(&self) -> Option<Fingerprint> {
        match (self.expected, self.seen()) {
            (Some(want), Some(got)) if want != got => Some(got),
            _ => None,
        }
    }
}

/// The signature methods both verifiers share: TLS 1.2 refused, TLS 1.3
/// signatures checked with the verifier's `provider`'s algorithms.
macro_rules! signature_checks {
    () => {
        fn verify_tls12_signature(
            &self,
            _message: &[u8],
            _cert: &CertificateDer<'_>,
            _dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            refuse_tls12()
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls13(&self.provider, message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = Fingerprint::of(end_entity);
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(got);
        match self.expected {
            Some(want) if want != got => Err(rustls::Error::General(format!(
                "server certificate fingerprint {got} does not match the expected {want}"
            ))),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    signature_checks!();
}

/// Verifies clients by fingerprint against [`AuthorizedClients`].
///
/// A client certificate is mandatory. An unlisted fingerprint fails the
/// handshake with the TLS `access_denied` alert, which the client turns into
/// "the server refused this client". The handshake signature is verified as
/// for servers, so presenting someone else's certificate is not enough.
#[derive(Debug)]
pub struct ClientVerifier {
    allowed: Arc<AuthorizedClients>,
    provider: Arc<CryptoProvider>,
}

impl ClientVerifier {
    /// A verifier admitting what `allowed` admits.
    pub fn new(allowed: Arc<AuthorizedClients>) -> Arc<Self> {
        Arc::new(Self {
            allowed,
            provider: crypto_provider(),
        })
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No CA: clients present their one self-signed certificate.
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let fp = Fingerprint::of(end_entity);
        if self.allowed.admits(&fp) {
            Ok(ClientCertVerified::assertion())
        } else {
            warn!(
                "refused client {fp}: not in {}; to admit it run `qxfer serve --allow {fp}` or add it to that file",
                self.allowed.path().display()
            );
            Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    signature_checks!();
}

/// The fingerprint of the client certificate a connection was admitted with.
pub(crate) fn peer_fingerprint(conn: &quinn::Connection) -> Option<Fingerprint> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    certs.first().map(Fingerprint::of)
}

/// QUIC is TLS 1.3 only: a TLS 1.2 signature to check is an attack or a bug.
pub(super) fn refuse_tls12() -> Result<HandshakeSignatureValid, rustls::Error> {
    Err(rustls::Error::PeerIncompatible(
        rustls::PeerIncompatible::Tls12NotOffered,
    ))
}

/// Checks a TLS 1.3 handshake signature: proof that the peer holds the key
/// of the certificate whose fingerprint was accepted.
pub(super) fn verify_tls13(
    provider: &CryptoProvider,
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls13_signature(
        message,
        cert,
        dss,
        &provider.signature_verification_algorithms,
    )
}
