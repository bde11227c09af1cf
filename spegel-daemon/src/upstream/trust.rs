//! What the upstream client trusts: the system roots plus `--upstream-ca-file`s, in a rustls
//! client configuration (ring, HTTP/1.1 only).
use std::{io, path::PathBuf, sync::Arc};

use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::{CertificateDer, pem::PemObject as _};

use super::UpstreamError;

/// The system roots (honouring `SSL_CERT_FILE`/`SSL_CERT_DIR`) plus every certificate of
/// `ca_files`; a file that cannot be read or holds no usable certificate is an error. Blocking
/// file IO: call at startup.
pub(super) fn roots(ca_files: &[PathBuf]) -> Result<RootCertStore, UpstreamError> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for err in &native.errors {
        tracing::warn!(%err, "problem loading system CA certificates");
    }
    let (added, ignored) = roots.add_parsable_certificates(native.certs);
    tracing::debug!(added, ignored, "system CA certificates loaded");
    for path in ca_files {
        let unreadable = |e: rustls_pki_types::pem::Error| UpstreamError::CaFile {
            path: path.clone(),
            source: io::Error::other(e.to_string()),
        };
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(unreadable)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(unreadable)?;
        let (added, _) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(UpstreamError::NoCertificates { path: path.clone() });
        }
    }
    if roots.is_empty() {
        tracing::warn!("no trusted CA certificates: every TLS upstream will be refused");
    }
    Ok(roots)
}

/// A TLS client configuration verifying servers against `roots`, offering HTTP/1.1 only.
pub(super) fn client_config(roots: RootCertStore) -> Result<ClientConfig, UpstreamError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(UpstreamError::Tls)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_files_must_hold_a_certificate() {
        let dir =
            std::env::temp_dir().join(format!("spegel-upstream-trust-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, b"no certificate here\n").unwrap();
        let missing = dir.join("missing.pem");
        assert!(matches!(
            roots(std::slice::from_ref(&empty)),
            Err(UpstreamError::NoCertificates { path }) if path == empty
        ));
        assert!(matches!(
            roots(std::slice::from_ref(&missing)),
            Err(UpstreamError::CaFile { path, .. }) if path == missing
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
