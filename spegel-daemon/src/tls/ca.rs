//! The per-node CA: a name-constrained ECDSA P-256 CA kept in `<data-dir>/ca/` that mints
//! short-lived leaf certificates for intercepted registry connections. The names it may vouch
//! for are in `names.rs`, the `install-ca` subcommand in `install.rs` (both re-exported here).
//!
//! The CA key never leaves the node: nothing here exports it. The CA is constrained (X.509
//! NameConstraints, critical) to exactly the mirrored registries, so even a stolen key cannot
//! vouch for any other name; when the mirrored set changes a next CA is minted *beside* the
//! installed one (`continuity.rs`), never in its place.
use std::{
    collections::HashMap,
    fmt, fs,
    io::{self, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData as _, SanType,
    SerialNumber,
};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

pub use super::install::{
    InstallCaArgs, Outcome, TrustArgs, install_trust, main, refresh_if_anchor,
};
use super::names::{CanonicalConstraints, CanonicalSubtree};
pub use super::names::{LeafName, PermittedNames};

/// How long a freshly minted CA is valid. Long, because replacing it means restarting containerd.
pub(super) const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Default leaf validity: short, so a leaked leaf key is worth little.
pub const DEFAULT_LEAF_VALIDITY: Duration = Duration::from_secs(7 * 24 * 3600);
/// Backdating of `notBefore`, to tolerate clients whose clocks run a little behind ours.
const CLOCK_SKEW: Duration = Duration::from_secs(3600);
/// At most this many leaves are cached. Names are constrained to the mirrored registries and
/// their subdomains, but the subdomains are unbounded, so the cache must be too.
const LEAF_CACHE_CAP: usize = 512;

/// Why the CA could not be created, loaded, used or installed.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// The node CA is name-constrained, so it needs an explicit list of registries.
    #[error(
        "no mirrored registries given: the node CA is name-constrained to an explicit list \
         (e.g. --mirrored-registries docker.io,ghcr.io)"
    )]
    NoRegistries,
    /// The name is neither a DNS name nor an IP address.
    #[error("`{0}` is not a valid DNS name or IP address")]
    InvalidName(String),
    /// The name is outside the CA's constraints: no leaf is minted for it.
    #[error("`{0}` is not a mirrored registry name")]
    NotPermitted(String),
    /// Reading or writing the CA's files failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// Key or certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A CA flag is out of range.
    #[error("invalid CA settings: {0}")]
    Config(String),
    /// No CA is trusted by containerd yet.
    #[error("no node CA is trusted yet")]
    NotTrusted,
    /// rustls refused a freshly minted key (should not happen).
    #[error("cannot use the minted key: {0}")]
    Key(#[source] rustls::Error),
}

fn io_error(context: impl Into<String>) -> impl FnOnce(io::Error) -> CaError {
    let context = context.into();
    move |source| CaError::Io { context, source }
}

/// One cached leaf and when to replace it.
struct CachedLeaf {
    key: Arc<CertifiedKey>,
    renew_after: OffsetDateTime,
}

/// The node's CA, loaded or created in `<data-dir>/ca/`.
pub struct NodeCa {
    permitted: PermittedNames,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    not_after: OffsetDateTime,
    leaf_validity: Duration,
    leaves: Mutex<HashMap<LeafName, CachedLeaf>>,
}

impl fmt::Debug for NodeCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key stays out of logs.
        f.debug_struct("NodeCa")
            .field("permitted", &self.permitted)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl NodeCa {
    /// Loads the CA `<dir>/<stem>.key` + `<stem>.crt`; the names it vouches for are read from
    /// its certificate's NameConstraints. Blocking file IO.
    pub(super) fn load(dir: &Path, stem: &str, leaf_validity: Duration) -> Result<Self, Unusable> {
        let key_path = dir.join(format!("{stem}.key"));
        let cert_path = dir.join(format!("{stem}.crt"));
        let key_pem = match fs::read_to_string(&key_path) {
            Ok(pem) => pem,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Err(Unusable::Missing),
            Err(err) => return Err(Unusable::Unreadable(err.to_string())),
        };
        let cert_pem = match fs::read_to_string(&cert_path) {
            Ok(pem) => pem,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Err(Unusable::Missing),
            Err(err) => return Err(Unusable::Unreadable(err.to_string())),
        };
        restrict_key_permissions(&key_path);
        Self::from_pem(&key_pem, cert_pem, leaf_validity)
    }

    /// The CA of a key and a certificate as read from disk (PEM); what [`Self::load`] checks.
    pub(crate) fn from_pem(
        key_pem: &str,
        cert_pem: String,
        leaf_validity: Duration,
    ) -> Result<Self, Unusable> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| Unusable::Unreadable(e.to_string()))?;
        let cert_der = pem_to_der(&cert_pem).ok_or(Unusable::Unreadable(
            "the CA certificate file holds no PEM certificate".to_owned(),
        ))?;
        Self::from_parts(cert_der, cert_pem, key, leaf_validity)
    }

    /// Mints a new CA constrained to `permitted` into `<dir>/<stem>.key` (0600) and
    /// `<stem>.crt`, replacing what was there. `dir` must exist. Blocking file IO.
    pub(super) fn mint(
        dir: &Path,
        stem: &str,
        permitted: &PermittedNames,
        leaf_validity: Duration,
    ) -> Result<Self, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let params = ca_params(permitted)?;
        let cert = params.self_signed(&key)?;
        // Key first: a crash between the writes leaves a key without its certificate, which
        // the next start treats as unusable and replaces.
        write_file_atomically(
            &dir.join(format!("{stem}.key")),
            key.serialize_pem().as_bytes(),
            0o600,
        )?;
        write_file_atomically(
            &dir.join(format!("{stem}.crt")),
            cert.pem().as_bytes(),
            0o644,
        )?;
        Self::from_parts(cert.der().clone(), cert.pem(), key, leaf_validity).map_err(|reason| {
            CaError::Io {
                context: "the freshly minted CA is unusable".to_owned(),
                source: io::Error::other(reason.to_string()),
            }
        })
    }

    fn from_parts(
        cert_der: CertificateDer<'static>,
        cert_pem: String,
        key: KeyPair,
        leaf_validity: Duration,
    ) -> Result<Self, Unusable> {
        let permitted = PermittedNames::from_constraints(&existing_constraints(&cert_der)?);
        let (_, cert) = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|e| Unusable::Unreadable(format!("ca.crt: {e}")))?;
        if cert.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(Unusable::KeyMismatch);
        }
        let not_after = OffsetDateTime::from_unix_timestamp(cert.validity().not_after.timestamp())
            .map_err(|e| Unusable::Unreadable(format!("ca.crt validity: {e}")))?;
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)
            .map_err(|e| Unusable::Unreadable(format!("ca.crt: {e}")))?;
        Ok(Self {
            permitted,
            cert_pem,
            cert_der,
            issuer,
            not_after,
            leaf_validity,
            leaves: Mutex::new(HashMap::new()),
        })
    }

    /// When the CA certificate expires.
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// The SHA-256 fingerprint of the CA certificate (lowercase hex of the DER).
    pub fn fingerprint(&self) -> String {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(self.cert_der.as_ref()))
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The names this CA vouches for.
    pub fn permitted(&self) -> &PermittedNames {
        &self.permitted
    }

    /// A leaf certificate and key for `name` (a DNS name or IP literal), SAN = that name, EKU
    /// serverAuth. Cached per name and re-minted when half its validity has passed. Names outside
    /// the CA's constraints are refused.
    pub fn leaf_for(&self, name: &str) -> Result<Arc<CertifiedKey>, CaError> {
        let name = LeafName::parse(name)?;
        if !self.permitted.permits(&name) {
            return Err(CaError::NotPermitted(name.to_string()));
        }
        let now = OffsetDateTime::now_utc();
        if let Some(cached) = self.lock_leaves().get(&name)
            && cached.renew_after > now
        {
            return Ok(Arc::clone(&cached.key));
        }
        // Minted outside the lock: two racing handshakes may both mint; the last one is kept,
        // and both leaves are valid.
        let key = Arc::new(self.mint_leaf(&name, now)?);
        let renew_after = now + self.leaf_validity / 2;
        let mut leaves = self.lock_leaves();
        if leaves.len() >= LEAF_CACHE_CAP && !leaves.contains_key(&name) {
            leaves.retain(|_, leaf| leaf.renew_after > now);
            if leaves.len() >= LEAF_CACHE_CAP
                && let Some(oldest) = leaves
                    .iter()
                    .min_by_key(|(_, leaf)| leaf.renew_after)
                    .map(|(name, _)| name.clone())
            {
                leaves.remove(&oldest);
            }
        }
        leaves.insert(
            name.clone(),
            CachedLeaf {
                key: Arc::clone(&key),
                renew_after,
            },
        );
        tracing::debug!(%name, "minted a leaf certificate");
        Ok(key)
    }

    fn lock_leaves(&self) -> std::sync::MutexGuard<'_, HashMap<LeafName, CachedLeaf>> {
        // The map holds no invariant a panicking holder could break; keep using it.
        self.leaves
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Signs a leaf for `name` without checking the constraints (the verifier does that too).
    fn mint_leaf(&self, name: &LeafName, now: OffsetDateTime) -> Result<CertifiedKey, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        // An IP leaf gets an empty subject (rcgen then marks the SAN critical): OpenSSL checks
        // a hostname-like CN such as `10.0.0.1` against the CA's DNS constraints and rejects it.
        if let LeafName::Dns(dns) = name {
            dn.push(DnType::CommonName, dns.clone());
        }
        params.distinguished_name = dn;
        params.subject_alt_names = vec![match name {
            LeafName::Dns(dns) => SanType::DnsName(dns.as_str().try_into()?),
            LeafName::Ip(ip) => SanType::IpAddress(*ip),
        }];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = now - CLOCK_SKEW;
        params.not_after = (now + self.leaf_validity).min(self.not_after);
        params.serial_number = Some(random_serial());
        let cert = params.signed_by(&key, &self.issuer)?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing_key =
            rustls::crypto::ring::sign::any_ecdsa_type(&key_der).map_err(CaError::Key)?;
        Ok(CertifiedKey::new(vec![cert.der().clone()], signing_key))
    }
}

/// Why a CA on disk cannot be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Unusable {
    #[error("no CA on disk")]
    Missing,
    #[error("the CA on disk is unreadable: {0}")]
    Unreadable(String),
    #[error("the CA key does not match the CA certificate")]
    KeyMismatch,
    #[error("the CA certificate has no critical name constraints")]
    Unconstrained,
}

pub(crate) fn ca_params(permitted: &PermittedNames) -> Result<CertificateParams, CaError> {
    let now = OffsetDateTime::now_utc();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "spegel");
    dn.push(
        DnType::CommonName,
        format!("spegel node CA ({})", hostname()),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.name_constraints = Some(permitted.name_constraints());
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + CA_VALIDITY;
    params.serial_number = Some(random_serial());
    Ok(params)
}

/// 16 random bytes, top bit clear so the DER INTEGER stays positive.
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

/// This node's hostname, for the CA's subject (so an operator can tell nodes' CAs apart).
fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "unknown host".to_owned())
}

/// The name constraints of a CA certificate on disk, canonicalised.
pub(crate) fn existing_constraints(der: &[u8]) -> Result<CanonicalConstraints, Unusable> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| Unusable::Unreadable(format!("ca.crt: {e}")))?;
    let constraints = cert
        .name_constraints()
        .map_err(|e| Unusable::Unreadable(format!("ca.crt name constraints: {e}")))?
        .ok_or(Unusable::Unconstrained)?;
    if !constraints.critical {
        return Err(Unusable::Unconstrained);
    }
    let canon = |subtrees: &Option<Vec<x509_parser::extensions::GeneralSubtree<'_>>>| {
        subtrees
            .iter()
            .flatten()
            .filter_map(|subtree| match &subtree.base {
                GeneralName::DNSName(name) => Some(CanonicalSubtree::Dns((*name).to_owned())),
                GeneralName::IPAddress(bytes) => Some(CanonicalSubtree::Ip(bytes.to_vec())),
                _ => None,
            })
            .collect()
    };
    Ok(CanonicalConstraints {
        permitted: canon(&constraints.value.permitted_subtrees),
        excluded: canon(&constraints.value.excluded_subtrees),
    })
}

fn pem_to_der(pem: &str) -> Option<CertificateDer<'static>> {
    use rustls_pki_types::pem::PemObject as _;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .and_then(Result::ok)
}

/// Creates `dir` (and parents) and makes it 0700.
pub(super) fn ensure_private_dir(dir: &Path) -> Result<(), CaError> {
    fs::create_dir_all(dir).map_err(io_error(format!("cannot create {}", dir.display())))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(io_error(format!("cannot restrict {}", dir.display())))
}

/// A key file readable by others is fixed rather than refused: the daemon owns it.
fn restrict_key_permissions(path: &Path) {
    match fs::metadata(path) {
        Ok(meta) if meta.permissions().mode() & 0o077 != 0 => {
            tracing::warn!(path = %path.display(), "CA key was readable by others; restricting to 0600");
            if let Err(err) = fs::set_permissions(path, fs::Permissions::from_mode(0o600)) {
                tracing::warn!(path = %path.display(), %err, "cannot restrict the CA key");
            }
        }
        _ => {}
    }
}

/// Writes `path` atomically: a temporary file in the same directory (created 0600, so the key is
/// never briefly world-readable), given `mode`, synced, then renamed over `path` by
/// [`tempfile::NamedTempFile::persist`]. Readers see the old or the new content, never a mix; a
/// failed write leaves no temporary file behind.
pub(super) fn write_file_atomically(
    path: &Path,
    contents: &[u8],
    mode: u32,
) -> Result<(), CaError> {
    let context = || format!("cannot write {}", path.display());
    let dir = path
        .parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut file = tempfile::NamedTempFile::new_in(dir).map_err(io_error(context()))?;
    file.write_all(contents)
        .and_then(|()| {
            file.as_file()
                .set_permissions(fs::Permissions::from_mode(mode))
        })
        .and_then(|()| file.as_file().sync_all())
        .map_err(io_error(context()))?;
    file.persist(path)
        .map_err(|err| io_error(context())(err.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use rustls::client::{WebPkiServerVerifier, danger::ServerCertVerifier as _};
    use rustls_pki_types::{ServerName, UnixTime};

    use super::*;

    use crate::tls::names::tests::permitted;

    fn tempdir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "spegel-ca-test-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn minted(dir: &Path, names: &[&str]) -> NodeCa {
        NodeCa::mint(dir, "ca", &permitted(names), DEFAULT_LEAF_VALIDITY).unwrap()
    }

    /// Verifies `leaf` as a TLS server certificate for `name` with webpki, trusting only `ca`.
    fn verify(ca: &NodeCa, leaf: &CertifiedKey, name: &str) -> Result<(), rustls::Error> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der().clone()).unwrap();
        let verifier = WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let server_name = ServerName::try_from(name.to_owned()).unwrap();
        verifier
            .verify_server_cert(&leaf.cert[0], &[], &server_name, &[], UnixTime::now())
            .map(|_| ())
    }

    #[test]
    fn constraints_are_present_and_critical() {
        let dir = tempdir();
        let ca = minted(&dir, &["docker.io", "10.0.0.1"]);
        let (_, cert) = x509_parser::parse_x509_certificate(ca.cert_der()).unwrap();
        let nc = cert.name_constraints().unwrap().expect("name constraints");
        assert!(nc.critical);
        let permitted = nc.value.permitted_subtrees.as_ref().unwrap();
        let names: Vec<String> = permitted.iter().map(|s| format!("{:?}", s.base)).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(names[0].contains("docker.io"), "{names:?}");
        // No IPv6 registry: all of IPv6 is excluded.
        let excluded = nc.value.excluded_subtrees.as_ref().unwrap();
        assert_eq!(excluded.len(), 1);
        let bc = cert.basic_constraints().unwrap().unwrap();
        assert!(bc.critical && bc.value.ca);
        assert_eq!(bc.value.path_len_constraint, Some(0));
        let ku = cert.key_usage().unwrap().unwrap().value;
        assert!(ku.key_cert_sign() && ku.crl_sign() && !ku.digital_signature());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn webpki_accepts_permitted_and_rejects_others() {
        let dir = tempdir();
        let ca = minted(&dir, &["docker.io", "10.0.0.1:5000"]);
        let leaf = ca.leaf_for("registry-1.docker.io").unwrap();
        verify(&ca, &leaf, "registry-1.docker.io").unwrap();
        // The same leaf does not cover another name.
        assert!(verify(&ca, &leaf, "docker.io").is_err());
        let ip_leaf = ca.leaf_for("10.0.0.1").unwrap();
        verify(&ca, &ip_leaf, "10.0.0.1").unwrap();

        // leaf_for refuses names outside the constraints …
        assert!(matches!(
            ca.leaf_for("ghcr.io"),
            Err(CaError::NotPermitted(_))
        ));
        assert!(matches!(
            ca.leaf_for("10.0.0.2"),
            Err(CaError::NotPermitted(_))
        ));
        // … and even a leaf signed by the CA key for such a name is rejected by the client.
        let now = OffsetDateTime::now_utc();
        for name in ["ghcr.io", "10.0.0.2", "::1"] {
            let rogue = ca.mint_leaf(&LeafName::parse(name).unwrap(), now).unwrap();
            let err = verify(&ca, &rogue, name).unwrap_err();
            assert!(
                format!("{err:?}").contains("NameConstraint"),
                "{name}: {err:?}"
            );
        }
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn ip_only_ca_still_constrains_dns() {
        let dir = tempdir();
        let ca = minted(&dir, &["10.0.0.1"]);
        verify(&ca, &ca.leaf_for("10.0.0.1").unwrap(), "10.0.0.1").unwrap();
        let now = OffsetDateTime::now_utc();
        let rogue = ca
            .mint_leaf(&LeafName::parse("example.com").unwrap(), now)
            .unwrap();
        assert!(verify(&ca, &rogue, "example.com").is_err());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn reloads_the_same_ca_with_its_constraints() {
        let dir = tempdir();
        let first = minted(&dir, &["docker.io", "ghcr.io", "10.0.0.1:5000"]);
        let key_path = dir.join("ca.key");
        assert_eq!(
            fs::metadata(&key_path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // The names come back from the certificate's constraints.
        let again = NodeCa::load(&dir, "ca", DEFAULT_LEAF_VALIDITY).unwrap();
        assert_eq!(first.cert_der(), again.cert_der());
        assert_eq!(again.permitted(), first.permitted());
        assert_eq!(again.fingerprint(), first.fingerprint());
        assert_eq!(again.fingerprint().len(), 64);
        // A leaf from the reloaded CA verifies against the first one.
        verify(&first, &again.leaf_for("ghcr.io").unwrap(), "ghcr.io").unwrap();
        // Loose permissions are repaired on load.
        fs::set_permissions(&key_path, fs::Permissions::from_mode(0o644)).unwrap();
        NodeCa::load(&dir, "ca", DEFAULT_LEAF_VALIDITY).unwrap();
        assert_eq!(
            fs::metadata(&key_path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // Missing and corrupt files are told apart.
        assert!(matches!(
            NodeCa::load(&dir, "other", DEFAULT_LEAF_VALIDITY),
            Err(Unusable::Missing)
        ));
        fs::write(&key_path, "garbage").unwrap();
        assert!(matches!(
            NodeCa::load(&dir, "ca", DEFAULT_LEAF_VALIDITY),
            Err(Unusable::Unreadable(_))
        ));
        // A key that is not the certificate's.
        minted(&dir, &["docker.io"]);
        fs::copy(dir.join("ca.key"), dir.join("mix.key")).unwrap();
        minted(&dir, &["docker.io"]);
        fs::copy(dir.join("ca.crt"), dir.join("mix.crt")).unwrap();
        assert!(matches!(
            NodeCa::load(&dir, "mix", DEFAULT_LEAF_VALIDITY),
            Err(Unusable::KeyMismatch)
        ));
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn leaves_are_cached_and_carry_server_auth() {
        let dir = tempdir();
        let ca = minted(&dir, &["docker.io"]);
        let a = ca.leaf_for("docker.io").unwrap();
        let b = ca.leaf_for("DOCKER.IO.").unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        let (_, cert) = x509_parser::parse_x509_certificate(&a.cert[0]).unwrap();
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth);
        let lifetime =
            cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
        assert!(lifetime <= (DEFAULT_LEAF_VALIDITY + CLOCK_SKEW).as_secs() as i64);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn ip_leaves_have_no_common_name_and_a_critical_san() {
        let dir = tempdir();
        let ca = minted(&dir, &["docker.io", "10.1.2.3:5443"]);
        let leaf = ca.leaf_for("10.1.2.3").unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&leaf.cert[0]).unwrap();
        assert_eq!(cert.subject().iter_common_name().count(), 0);
        let san = cert.subject_alternative_name().unwrap().unwrap();
        assert!(san.critical);
        let leaf = ca.leaf_for("docker.io").unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&leaf.cert[0]).unwrap();
        let cn = cert.subject().iter_common_name().next().unwrap();
        assert_eq!(cn.as_str().unwrap(), "docker.io");
        fs::remove_dir_all(dir).unwrap();
    }
}
