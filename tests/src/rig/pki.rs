//! The rig's test CA (made with rcgen, ECDSA P-256) and the server certificates it issues.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A throw-away certificate authority living in the rig's scratch folder.
///
/// Its certificate is what the nodes' `hosts.toml` `ca = ...` entries point at; tests that need
/// more certificates (e.g. for a TLS-terminating daemon) can [`issue`](TestCa::issue) them.
pub struct TestCa {
    cert_path: PathBuf,
    key_path: PathBuf,
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate and its private key, both PEM files.
#[derive(Clone, Debug)]
pub struct IssuedCert {
    /// The certificate (PEM).
    pub cert_path: PathBuf,
    /// The PKCS#8 private key (PEM).
    pub key_path: PathBuf,
}

impl TestCa {
    /// Generates a CA and writes `ca.crt` / `ca.key` into `dir`.
    pub(crate) fn generate(dir: &Path, common_name: &str) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let key = KeyPair::generate().context("generating the CA key")?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).context("self-signing the CA")?;
        let cert_pem = cert.pem();
        let cert_path = dir.join("ca.crt");
        let key_path = dir.join("ca.key");
        write(&cert_path, &cert_pem)?;
        write(&key_path, &key.serialize_pem())?;
        Ok(Self {
            cert_path,
            key_path,
            cert_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA certificate (PEM file); trust this to talk TLS to the rig's registry.
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// The CA's private key (PEM file), for tools that sign their own certificates.
    pub fn key_path(&self) -> &Path {
        &self.key_path
    }

    /// The CA certificate as PEM text.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a server certificate for `names` (DNS names and/or IP literals, all put in the SAN)
    /// and writes `<stem>.crt` / `<stem>.key` into `dir`.
    pub fn issue(&self, dir: &Path, stem: &str, names: &[String]) -> Result<IssuedCert> {
        let key = KeyPair::generate().context("generating a server key")?;
        let mut params = CertificateParams::new(names.to_vec())
            .with_context(|| format!("invalid certificate names {names:?}"))?;
        let common_name = names
            .iter()
            .find(|name| name.parse::<IpAddr>().is_err())
            .or(names.first())
            .cloned()
            .unwrap_or_else(|| stem.to_owned());
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.issuer)
            .context("signing a server certificate")?;
        let cert_path = dir.join(format!("{stem}.crt"));
        let key_path = dir.join(format!("{stem}.key"));
        write(&cert_path, &cert.pem())?;
        write(&key_path, &key.serialize_pem())?;
        Ok(IssuedCert {
            cert_path,
            key_path,
        })
    }
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa")
            .field("cert_path", &self.cert_path)
            .finish_non_exhaustive()
    }
}

fn write(path: &Path, contents: &str) -> Result<()> {
    std::fs::write(path, contents).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_certificates_signed_by_the_ca() {
        let dir = std::env::temp_dir().join(format!("spegel-pki-test-{}", std::process::id()));
        let ca = TestCa::generate(&dir, "unit CA").unwrap();
        let issued = ca
            .issue(
                &dir,
                "server",
                &["registry.x.test".to_owned(), "10.1.2.3".to_owned()],
            )
            .unwrap();
        let cert = std::fs::read_to_string(&issued.cert_path).unwrap();
        assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(
            std::fs::read_to_string(&issued.key_path)
                .unwrap()
                .contains("PRIVATE KEY")
        );
        assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        assert_ne!(cert, ca.cert_pem());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
