//! TLS for both ports (`serve --tls-cert FILE --tls-key FILE`).
//!
//! With an identity in [`Config::tls`](crate::Config::tls) the protocol port and the HTTP port
//! speak TLS only: a connection whose TLS handshake fails is closed, never served in the
//! clear. The TLS handshake runs inside the connection's handshake deadline and counts as
//! "not yet greeted" for the connection gate, so a client that opens a socket and stalls in
//! the TLS handshake is treated like one that never says hello.
//!
//! rustls on the `ring` provider, TLS 1.3 only: both ends of the protocol port are ours, and
//! every client of the HTTP port worth serving (curl, Prometheus, browsers) speaks 1.3.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// A server certificate chain and its private key, ready to accept TLS connections.
#[derive(Clone)]
pub struct TlsIdentity {
    config: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.write_str("TlsIdentity { .. }")
    }
}

/// Why a certificate or key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate file cannot be read or holds no PEM certificate.
    #[error("cannot use the certificate file {path}: {why}")]
    Certificate {
        /// The file.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// The key file cannot be read or holds no PEM private key.
    #[error("cannot use the key file {path}: {why}")]
    Key {
        /// The file.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// rustls refused the pair (the key does not match the certificate, an unsupported key).
    #[error("the certificate and key cannot be used together: {0}")]
    Pair(String),
}

impl TlsIdentity {
    /// Reads a PEM certificate chain (the server's certificate first, then intermediates) and
    /// a PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<TlsIdentity, TlsError> {
        let cert_err = |why: String| TlsError::Certificate {
            path: cert.display().to_string(),
            why,
        };
        let chain = CertificateDer::pem_file_iter(cert)
            .map_err(|e| cert_err(e.to_string()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| cert_err(e.to_string()))?;
        if chain.is_empty() {
            return Err(cert_err("no PEM certificate in it".into()));
        }
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
            path: key.display().to_string(),
            why: e.to_string(),
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Pair(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| TlsError::Pair(e.to_string()))?;
        Ok(TlsIdentity {
            config: Arc::new(config),
        })
    }

    /// An acceptor for one connection (cheap: shares the configuration).
    pub(crate) fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.config.clone())
    }
}
