//! The per-node CA: a name-constrained ECDSA P-256 CA kept in `<data-dir>/ca/` that mints
//! short-lived leaf certificates for intercepted registry connections, and the `install-ca`
//! subcommand that puts it into the host trust store.
//!
//! The CA key never leaves the node: nothing here exports it. The CA is constrained (X.509
//! NameConstraints, critical) to exactly the mirrored registries, so even a stolen key cannot
//! vouch for any other name; when the mirrored set changes a new CA is minted.
use std::{
    collections::{BTreeSet, HashMap},
    fmt, fs,
    io::{self, Write as _},
    net::IpAddr,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex},
    time::Duration,
};

use rcgen::{
    BasicConstraints, CertificateParams, CidrSubnet, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, GeneralSubtree, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    NameConstraints, PKCS_ECDSA_P256_SHA256, PublicKeyData as _, SanType, SerialNumber,
};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use time::OffsetDateTime;

/// File names inside `<data-dir>/ca/`.
const CA_DIR: &str = "ca";
const KEY_FILE: &str = "ca.key";
const CERT_FILE: &str = "ca.crt";
/// The name the CA gets in the host trust store.
const TRUST_FILE_NAME: &str = "spegel-node-ca.crt";

/// How long a freshly minted CA is valid. Long, because replacing it means restarting containerd.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// A CA expiring sooner than this is replaced at startup rather than left to lapse mid-run.
const CA_RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
/// Default leaf validity: short, so a leaked leaf key is worth little.
pub const DEFAULT_LEAF_VALIDITY: Duration = Duration::from_secs(7 * 24 * 3600);
/// Backdating of `notBefore`, to tolerate clients whose clocks run a little behind ours.
const CLOCK_SKEW: Duration = Duration::from_secs(3600);
/// At most this many leaves are cached. Names are constrained to the mirrored registries and
/// their subdomains, but the subdomains are unbounded, so the cache must be too.
const LEAF_CACHE_CAP: usize = 512;
/// The DNS subtree permitted when no DNS-named registry is mirrored. RFC 5280 constrains a name
/// form only when a subtree of that form is present, so without it a CA for IP registries alone
/// would be unconstrained for DNS names. `.invalid` is reserved (RFC 6761) and never resolves.
const DNS_SENTINEL: &str = "invalid";

/// Why the CA could not be created, loaded, used or installed.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A `--mirrored-registries` entry is not `[http(s)://]host[:port]`.
    #[error("invalid mirrored registry `{entry}`: {reason}")]
    InvalidRegistry { entry: String, reason: &'static str },
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
    /// rustls refused a freshly minted key (should not happen).
    #[error("cannot use the minted key: {0}")]
    Key(#[source] rustls::Error),
}

fn io_error(context: impl Into<String>) -> impl FnOnce(io::Error) -> CaError {
    let context = context.into();
    move |source| CaError::Io { context, source }
}

/// A name a leaf certificate can be minted for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LeafName {
    /// A lowercase DNS name without trailing dot.
    Dns(String),
    Ip(IpAddr),
}

impl LeafName {
    /// Parses a DNS name or IP literal (`[v6]` brackets allowed), normalising case and a
    /// trailing dot.
    pub fn parse(name: &str) -> Result<Self, CaError> {
        let trimmed = name.trim();
        let unbracketed = trimmed
            .strip_prefix('[')
            .and_then(|rest| rest.strip_suffix(']'))
            .unwrap_or(trimmed);
        if let Ok(ip) = unbracketed.parse::<IpAddr>() {
            return Ok(LeafName::Ip(ip));
        }
        let dns = trimmed
            .strip_suffix('.')
            .unwrap_or(trimmed)
            .to_ascii_lowercase();
        // DNS names only: wildcards, underscores-as-labels and IPs were handled or are refused.
        match ServerName::try_from(dns.as_str()) {
            Ok(ServerName::DnsName(_)) if !dns.contains('*') && !dns.is_empty() => {
                Ok(LeafName::Dns(dns))
            }
            _ => Err(CaError::InvalidName(name.to_owned())),
        }
    }
}

impl fmt::Display for LeafName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LeafName::Dns(name) => f.write_str(name),
            LeafName::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// The names the CA may vouch for: the mirrored registries' hosts (a DNS name covers its
/// subdomains too, as in X.509 name constraints: `docker.io` covers `registry-1.docker.io`),
/// and the exact IPs of IP-literal registries.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PermittedNames {
    dns: BTreeSet<String>,
    ips: BTreeSet<IpAddr>,
}

impl PermittedNames {
    /// From `--mirrored-registries` entries: `host`, `host:port`, `[v6]:port`, optionally with an
    /// `http://` or `https://` prefix; no path, query or userinfo. Ports are dropped (certificates
    /// do not name ports). An empty list is refused: the CA must be constrained.
    pub fn from_registries<I, S>(registries: I) -> Result<Self, CaError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut permitted = PermittedNames::default();
        for entry in registries {
            let entry = entry.as_ref().trim();
            if entry.is_empty() {
                continue;
            }
            match registry_host(entry)? {
                LeafName::Dns(name) => permitted.dns.insert(name),
                LeafName::Ip(ip) => permitted.ips.insert(ip),
            };
        }
        if permitted.dns.is_empty() && permitted.ips.is_empty() {
            return Err(CaError::NoRegistries);
        }
        Ok(permitted)
    }

    /// The permitted DNS subtrees.
    pub fn dns_names(&self) -> impl Iterator<Item = &str> {
        self.dns.iter().map(String::as_str)
    }

    /// The permitted IP addresses.
    pub fn ips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.ips.iter().copied()
    }

    /// Whether a leaf for `name` is inside the constraints (the same rule X.509 verifiers apply).
    pub fn permits(&self, name: &LeafName) -> bool {
        match name {
            LeafName::Ip(ip) => self.ips.contains(ip),
            LeafName::Dns(name) => self.dns.iter().any(|subtree| {
                name == subtree
                    || name
                        .strip_suffix(subtree.as_str())
                        .is_some_and(|prefix| prefix.ends_with('.'))
            }),
        }
    }

    /// The NameConstraints extension for this set. Beyond the permitted names it closes the
    /// name forms that would otherwise be unconstrained (RFC 5280 §4.2.1.10 constrains a form
    /// only when a subtree of that form is present): all IPv4 and/or IPv6 addresses are excluded
    /// when none of that family is mirrored, and the DNS form gets a sentinel when no DNS name is.
    fn name_constraints(&self) -> NameConstraints {
        let mut permitted_subtrees: Vec<GeneralSubtree> = self
            .dns
            .iter()
            .map(|name| GeneralSubtree::DnsName(name.clone()))
            .collect();
        if self.dns.is_empty() {
            permitted_subtrees.push(GeneralSubtree::DnsName(DNS_SENTINEL.to_owned()));
        }
        permitted_subtrees.extend(self.ips.iter().map(|ip| {
            let prefix = if ip.is_ipv4() { 32 } else { 128 };
            GeneralSubtree::IpAddress(CidrSubnet::from_addr_prefix(*ip, prefix))
        }));
        let mut excluded_subtrees = Vec::new();
        if !self.ips.iter().any(IpAddr::is_ipv4) {
            excluded_subtrees.push(GeneralSubtree::IpAddress(CidrSubnet::V4([0; 4], [0; 4])));
        }
        if !self.ips.iter().any(IpAddr::is_ipv6) {
            excluded_subtrees.push(GeneralSubtree::IpAddress(CidrSubnet::V6([0; 16], [0; 16])));
        }
        NameConstraints {
            permitted_subtrees,
            excluded_subtrees,
        }
    }

    /// The canonical form of [`Self::name_constraints`], to compare with a CA read from disk.
    fn canonical_constraints(&self) -> CanonicalConstraints {
        let constraints = self.name_constraints();
        let canon = |subtrees: &[GeneralSubtree]| {
            subtrees
                .iter()
                .filter_map(|subtree| match subtree {
                    GeneralSubtree::DnsName(name) => Some(CanonicalSubtree::Dns(name.clone())),
                    GeneralSubtree::IpAddress(CidrSubnet::V4(addr, mask)) => {
                        Some(CanonicalSubtree::Ip([&addr[..], &mask[..]].concat()))
                    }
                    GeneralSubtree::IpAddress(CidrSubnet::V6(addr, mask)) => {
                        Some(CanonicalSubtree::Ip([&addr[..], &mask[..]].concat()))
                    }
                    _ => None,
                })
                .collect()
        };
        CanonicalConstraints {
            permitted: canon(&constraints.permitted_subtrees),
            excluded: canon(&constraints.excluded_subtrees),
        }
    }
}

impl fmt::Display for PermittedNames {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for name in self
            .dns
            .iter()
            .cloned()
            .chain(self.ips.iter().map(ToString::to_string))
        {
            if !first {
                f.write_str(",")?;
            }
            first = false;
            f.write_str(&name)?;
        }
        Ok(())
    }
}

/// Name constraints reduced to comparable sets (order and unknown forms ignored).
#[derive(Debug, PartialEq, Eq)]
struct CanonicalConstraints {
    permitted: BTreeSet<CanonicalSubtree>,
    excluded: BTreeSet<CanonicalSubtree>,
}

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum CanonicalSubtree {
    Dns(String),
    /// Address then mask, network byte order.
    Ip(Vec<u8>),
}

/// The host of one `--mirrored-registries` entry.
fn registry_host(entry: &str) -> Result<LeafName, CaError> {
    let invalid = |reason| CaError::InvalidRegistry {
        entry: entry.to_owned(),
        reason,
    };
    if entry == "_default" || entry == "*" {
        return Err(invalid(
            "the node CA cannot cover all registries; list them explicitly",
        ));
    }
    let lower = entry.to_ascii_lowercase();
    let rest = if let Some(rest) = lower.strip_prefix("https://") {
        rest
    } else if let Some(rest) = lower.strip_prefix("http://") {
        rest
    } else if lower.contains("://") {
        return Err(invalid("only http:// and https:// are supported"));
    } else {
        lower.as_str()
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains(['/', '?', '#', '@']) {
        return Err(invalid(
            "must be host[:port], without path, query or userinfo",
        ));
    }
    let host = if let Some(bracketed) = rest.strip_prefix('[') {
        let (host, after) = bracketed
            .split_once(']')
            .ok_or_else(|| invalid("unclosed `[`"))?;
        check_port(after, &invalid)?;
        host
    } else if rest.matches(':').count() == 1 {
        let (host, port) = rest.split_once(':').unwrap_or((rest, ""));
        check_port(&format!(":{port}"), &invalid)?;
        host
    } else {
        // No colon, or a bare IPv6 address.
        rest
    };
    match LeafName::parse(host) {
        Ok(name) => Ok(name),
        Err(_) => Err(invalid("host is not a valid DNS name or IP address")),
    }
}

fn check_port(after_host: &str, invalid: &impl Fn(&'static str) -> CaError) -> Result<(), CaError> {
    match after_host.strip_prefix(':') {
        None if after_host.is_empty() => Ok(()),
        Some(port) if port.parse::<u16>().is_ok_and(|port| port != 0) => Ok(()),
        _ => Err(invalid("invalid port")),
    }
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
    /// Loads the CA from `<data_dir>/ca/`, or mints one there (key 0600, directory 0700). An
    /// existing CA whose constraints differ from `permitted`, that expires within 30 days, or
    /// that cannot be read is replaced, with a warning: containerd must then trust the new one.
    ///
    /// Blocking file IO: call at startup or from `spawn_blocking`.
    pub fn load_or_create(data_dir: &Path, permitted: PermittedNames) -> Result<Self, CaError> {
        Self::load_or_create_with(data_dir, permitted, DEFAULT_LEAF_VALIDITY)
    }

    /// [`Self::load_or_create`] with a chosen leaf validity.
    pub fn load_or_create_with(
        data_dir: &Path,
        permitted: PermittedNames,
        leaf_validity: Duration,
    ) -> Result<Self, CaError> {
        let dir = data_dir.join(CA_DIR);
        ensure_private_dir(&dir)?;
        let key_path = dir.join(KEY_FILE);
        let cert_path = dir.join(CERT_FILE);
        match Self::load(&key_path, &cert_path, &permitted, leaf_validity) {
            Ok(ca) => {
                tracing::info!(path = %dir.display(), permitted = %permitted, "node CA loaded");
                return Ok(ca);
            }
            Err(Unusable::Missing) => {
                tracing::info!(path = %dir.display(), permitted = %permitted, "minting the node CA");
            }
            Err(reason) => tracing::warn!(
                path = %dir.display(),
                permitted = %permitted,
                %reason,
                "minting a NEW node CA: containerd must trust it before intercepted pulls work \
                 (run `spegel install-ca` and restart containerd)"
            ),
        }
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let params = ca_params(&permitted)?;
        let cert = params.self_signed(&key)?;
        // Key first: a crash between the writes leaves a key without a certificate, which the
        // next start treats as missing and replaces.
        write_file_atomically(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
        write_file_atomically(&cert_path, cert.pem().as_bytes(), 0o644)?;
        Self::from_parts(
            cert.der().clone(),
            cert.pem(),
            key,
            permitted,
            leaf_validity,
        )
        .map_err(|reason| CaError::Io {
            context: "the freshly minted CA is unusable".to_owned(),
            source: io::Error::other(reason.to_string()),
        })
    }

    fn load(
        key_path: &Path,
        cert_path: &Path,
        permitted: &PermittedNames,
        leaf_validity: Duration,
    ) -> Result<Self, Unusable> {
        let key_pem = match fs::read_to_string(key_path) {
            Ok(pem) => pem,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Err(Unusable::Missing),
            Err(err) => return Err(Unusable::Unreadable(err.to_string())),
        };
        let cert_pem = match fs::read_to_string(cert_path) {
            Ok(pem) => pem,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Err(Unusable::Missing),
            Err(err) => return Err(Unusable::Unreadable(err.to_string())),
        };
        restrict_key_permissions(key_path);
        let key = KeyPair::from_pem(&key_pem).map_err(|e| Unusable::Unreadable(e.to_string()))?;
        let cert_der = pem_to_der(&cert_pem).ok_or(Unusable::Unreadable(
            "ca.crt holds no PEM certificate".to_owned(),
        ))?;
        let ca = Self::from_parts(cert_der, cert_pem, key, permitted.clone(), leaf_validity)?;
        let existing = existing_constraints(&ca.cert_der)?;
        if existing != permitted.canonical_constraints() {
            return Err(Unusable::ConstraintsChanged);
        }
        if ca.not_after - OffsetDateTime::now_utc() < CA_RENEW_BEFORE {
            return Err(Unusable::Expiring);
        }
        Ok(ca)
    }

    fn from_parts(
        cert_der: CertificateDer<'static>,
        cert_pem: String,
        key: KeyPair,
        permitted: PermittedNames,
        leaf_validity: Duration,
    ) -> Result<Self, Unusable> {
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

/// Why an existing CA on disk is not reused.
#[derive(Debug, thiserror::Error)]
enum Unusable {
    #[error("no CA on disk")]
    Missing,
    #[error("the CA on disk is unreadable: {0}")]
    Unreadable(String),
    #[error("the CA key does not match the CA certificate")]
    KeyMismatch,
    #[error("the mirrored registries changed since the CA was minted")]
    ConstraintsChanged,
    #[error("the CA on disk expires within 30 days")]
    Expiring,
}

fn ca_params(permitted: &PermittedNames) -> Result<CertificateParams, CaError> {
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
fn existing_constraints(der: &[u8]) -> Result<CanonicalConstraints, Unusable> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| Unusable::Unreadable(format!("ca.crt: {e}")))?;
    let constraints = cert
        .name_constraints()
        .map_err(|e| Unusable::Unreadable(format!("ca.crt name constraints: {e}")))?
        .ok_or(Unusable::ConstraintsChanged)?;
    if !constraints.critical {
        return Err(Unusable::ConstraintsChanged);
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
fn ensure_private_dir(dir: &Path) -> Result<(), CaError> {
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

/// Writes `path` via a temporary file in the same directory, created with `mode`, then renamed:
/// readers see the old or the new content, never a mix, and the key is never briefly world-readable.
fn write_file_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let result = (|| {
        let _ = fs::remove_file(&tmp);
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io_error(format!("cannot write {}", path.display())))
}

/// Flags of the `install-ca` subcommand.
#[derive(Debug, Clone, clap::Args)]
pub struct InstallCaArgs {
    /// Where the daemon keeps its state; the CA lives in `<data-dir>/ca/`.
    #[arg(long, env = "SPEGEL_DATA_DIR", default_value = "/var/lib/spegel")]
    pub data_dir: PathBuf,
    /// Registries the node CA may vouch for (`[https://]host[:port]`, comma-separated): the
    /// same flag, environment variable and default as `spegel run`, so both mint the same CA.
    #[arg(
        long,
        env = "SPEGEL_MIRRORED_REGISTRIES",
        value_delimiter = ',',
        default_values_t = crate::intercept::registries::DEFAULT_MIRRORED_REGISTRIES
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
    )]
    pub mirrored_registries: Vec<String>,
    /// Operate on the trust store under this root instead of `/` (the refresh command is then
    /// not run: it only knows the real root).
    #[arg(long, env = "SPEGEL_TRUST_ROOT", default_value = "/")]
    pub trust_root: PathBuf,
    /// Only print the CA certificate (PEM) on stdout; change nothing else.
    #[arg(long, env = "SPEGEL_CA_PRINT", conflicts_with = "bundle")]
    pub print: bool,
    /// Only write a bundle of the system roots plus the node CA to this file (for
    /// `SSL_CERT_FILE`); the trust store is left alone.
    #[arg(long, env = "SPEGEL_CA_BUNDLE", value_name = "OUT")]
    pub bundle: Option<PathBuf>,
}

/// Where a distribution keeps locally added CAs and how it rebuilds its bundle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TrustLayout {
    /// Debian, Ubuntu: `update-ca-certificates`.
    Debian,
    /// RHEL, Fedora, Azure Linux: `update-ca-trust extract`.
    Rhel,
}

impl TrustLayout {
    fn detect(root: &Path) -> Option<Self> {
        if root.join("etc/pki/ca-trust/source/anchors").is_dir() {
            Some(TrustLayout::Rhel)
        } else if root.join("usr/local/share/ca-certificates").is_dir() {
            Some(TrustLayout::Debian)
        } else {
            None
        }
    }

    fn anchor_path(self, root: &Path) -> PathBuf {
        match self {
            TrustLayout::Debian => root.join("usr/local/share/ca-certificates"),
            TrustLayout::Rhel => root.join("etc/pki/ca-trust/source/anchors"),
        }
        .join(TRUST_FILE_NAME)
    }

    fn refresh_command(self) -> (&'static str, &'static [&'static str]) {
        match self {
            TrustLayout::Debian => ("update-ca-certificates", &[]),
            TrustLayout::Rhel => ("update-ca-trust", &["extract"]),
        }
    }
}

/// System CA bundles, by distribution, relative to the trust root.
const SYSTEM_BUNDLES: &[&str] = &[
    "etc/ssl/certs/ca-certificates.crt",
    "etc/pki/tls/certs/ca-bundle.crt",
    "etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "etc/ssl/cert.pem",
];

/// Run the `install-ca` subcommand.
pub async fn main(args: InstallCaArgs) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || install(&args)).await?
}

fn install(args: &InstallCaArgs) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let permitted = PermittedNames::from_registries(&args.mirrored_registries)?;
    let ca = NodeCa::load_or_create(&args.data_dir, permitted)?;
    if args.print {
        print!("{}", ca.cert_pem());
        return Ok(());
    }
    if let Some(out) = &args.bundle {
        let (source, mut bundle) = SYSTEM_BUNDLES
            .iter()
            .map(|rel| args.trust_root.join(rel))
            .find_map(|path| fs::read(&path).ok().map(|bytes| (path, bytes)))
            .with_context(|| {
                format!(
                    "no system CA bundle under {} (looked for {})",
                    args.trust_root.display(),
                    SYSTEM_BUNDLES.join(", ")
                )
            })?;
        if !bundle.ends_with(b"\n") {
            bundle.push(b'\n');
        }
        bundle.extend_from_slice(ca.cert_pem().as_bytes());
        write_file_atomically(out, &bundle, 0o644)?;
        println!(
            "wrote {} (system roots from {} plus the spegel node CA)",
            out.display(),
            source.display()
        );
        return Ok(());
    }
    let layout = TrustLayout::detect(&args.trust_root).with_context(|| {
        format!(
            "unknown trust store layout under {}: neither usr/local/share/ca-certificates \
             (Debian/Ubuntu) nor etc/pki/ca-trust/source/anchors (RHEL/Azure Linux) exists",
            args.trust_root.display()
        )
    })?;
    let anchor = layout.anchor_path(&args.trust_root);
    let unchanged = fs::read(&anchor).is_ok_and(|old| old == ca.cert_pem().as_bytes());
    if !unchanged {
        write_file_atomically(&anchor, ca.cert_pem().as_bytes(), 0o644)?;
    }
    println!(
        "{} the spegel node CA at {}",
        if unchanged { "kept" } else { "installed" },
        anchor.display()
    );
    if args.trust_root == Path::new("/") {
        let (program, program_args) = layout.refresh_command();
        let status = Command::new(program)
            .args(program_args)
            .status()
            .with_context(|| format!("cannot run {program}"))?;
        anyhow::ensure!(status.success(), "{program} failed: {status}");
    } else {
        println!(
            "alternate trust root {}: not running {}",
            args.trust_root.display(),
            layout.refresh_command().0
        );
    }
    if !unchanged {
        println!(
            "containerd must be restarted once to trust this CA (Go loads the system roots once \
             per process): systemctl restart containerd"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use rustls::client::{WebPkiServerVerifier, danger::ServerCertVerifier as _};
    use rustls_pki_types::UnixTime;

    use super::*;

    fn permitted(names: &[&str]) -> PermittedNames {
        PermittedNames::from_registries(names).unwrap()
    }

    fn tempdir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "spegel-ca-test-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        fs::create_dir_all(&dir).unwrap();
        dir
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
    fn parses_registry_entries() {
        let p = permitted(&[
            "docker.io",
            "https://GHCR.io/",
            "http://10.213.0.10:5000",
            "[fd00::1]:5443",
            "registry.k8s.io:443",
            "",
        ]);
        assert_eq!(
            p.dns_names().collect::<Vec<_>>(),
            ["docker.io", "ghcr.io", "registry.k8s.io"]
        );
        assert_eq!(
            p.ips().collect::<Vec<_>>(),
            [
                IpAddr::V4(Ipv4Addr::new(10, 213, 0, 10)),
                IpAddr::V6("fd00::1".parse::<Ipv6Addr>().unwrap())
            ]
        );
        for bad in [
            "_default",
            "*",
            "ftp://x.io",
            "docker.io/library",
            "u@docker.io",
            "docker.io:0",
            "docker.io:x",
            "[fd00::1",
            "bad host",
        ] {
            assert!(
                PermittedNames::from_registries([bad]).is_err(),
                "{bad} was accepted"
            );
        }
        assert!(matches!(
            PermittedNames::from_registries(Vec::<String>::new()),
            Err(CaError::NoRegistries)
        ));
    }

    #[test]
    fn default_registries_make_a_valid_ca() {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: InstallCaArgs,
        }
        let cli = Cli::try_parse_from(["install-ca"]).unwrap();
        let p = PermittedNames::from_registries(&cli.args.mirrored_registries).unwrap();
        for name in ["registry-1.docker.io", "ghcr.io", "registry.k8s.io"] {
            assert!(p.permits(&LeafName::parse(name).unwrap()), "{name}");
        }
        assert!(!p.permits(&LeafName::parse("example.com").unwrap()));
        let cli =
            Cli::try_parse_from(["install-ca", "--mirrored-registries", "a.io,b.io:5000"]).unwrap();
        assert_eq!(cli.args.mirrored_registries, ["a.io", "b.io:5000"]);
    }

    #[test]
    fn permits_subdomains_not_lookalikes() {
        let p = permitted(&["docker.io", "10.0.0.1:5000"]);
        let dns = |s: &str| LeafName::parse(s).unwrap();
        assert!(p.permits(&dns("docker.io")));
        assert!(p.permits(&dns("Registry-1.Docker.IO.")));
        assert!(!p.permits(&dns("evildocker.io")));
        assert!(!p.permits(&dns("docker.io.evil.com")));
        assert!(p.permits(&dns("10.0.0.1")));
        assert!(!p.permits(&dns("10.0.0.2")));
    }

    #[test]
    fn constraints_are_present_and_critical() {
        let dir = tempdir();
        let ca = NodeCa::load_or_create(&dir, permitted(&["docker.io", "10.0.0.1"])).unwrap();
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
        let ca = NodeCa::load_or_create(&dir, permitted(&["docker.io", "10.0.0.1:5000"])).unwrap();
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
        let ca = NodeCa::load_or_create(&dir, permitted(&["10.0.0.1"])).unwrap();
        verify(&ca, &ca.leaf_for("10.0.0.1").unwrap(), "10.0.0.1").unwrap();
        let now = OffsetDateTime::now_utc();
        let rogue = ca
            .mint_leaf(&LeafName::parse("example.com").unwrap(), now)
            .unwrap();
        assert!(verify(&ca, &rogue, "example.com").is_err());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn reloads_the_same_ca_and_replaces_it_when_names_change() {
        let dir = tempdir();
        let first = NodeCa::load_or_create(&dir, permitted(&["docker.io", "ghcr.io"])).unwrap();
        let key_path = dir.join("ca/ca.key");
        assert_eq!(
            fs::metadata(&key_path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            fs::metadata(dir.join("ca")).unwrap().permissions().mode() & 0o777,
            0o700
        );
        // Same set in another order and spelling: the same CA.
        let again =
            NodeCa::load_or_create(&dir, permitted(&["https://ghcr.io", "docker.io"])).unwrap();
        assert_eq!(first.cert_der(), again.cert_der());
        // A leaf from the reloaded CA verifies against the first one.
        verify(&first, &again.leaf_for("ghcr.io").unwrap(), "ghcr.io").unwrap();
        // Loose permissions are repaired on load.
        fs::set_permissions(&key_path, fs::Permissions::from_mode(0o644)).unwrap();
        NodeCa::load_or_create(&dir, permitted(&["docker.io", "ghcr.io"])).unwrap();
        assert_eq!(
            fs::metadata(&key_path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // A different set: a new CA.
        let changed = NodeCa::load_or_create(&dir, permitted(&["docker.io"])).unwrap();
        assert_ne!(first.cert_der(), changed.cert_der());
        assert_eq!(
            fs::read_to_string(dir.join("ca/ca.crt")).unwrap(),
            changed.cert_pem()
        );
        // A corrupt key: a new CA too, not a failure.
        fs::write(&key_path, "garbage").unwrap();
        let fresh = NodeCa::load_or_create(&dir, permitted(&["docker.io"])).unwrap();
        assert_ne!(fresh.cert_der(), changed.cert_der());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn leaves_are_cached_and_carry_server_auth() {
        let dir = tempdir();
        let ca = NodeCa::load_or_create(&dir, permitted(&["docker.io"])).unwrap();
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
        let ca = NodeCa::load_or_create(&dir, permitted(&["docker.io", "10.1.2.3:5443"])).unwrap();
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

    #[test]
    fn installs_into_an_alternate_root() {
        let root = tempdir();
        let data = tempdir();
        fs::create_dir_all(root.join("usr/local/share/ca-certificates")).unwrap();
        fs::create_dir_all(root.join("etc/ssl/certs")).unwrap();
        fs::write(
            root.join("etc/ssl/certs/ca-certificates.crt"),
            "SYSTEM ROOTS",
        )
        .unwrap();
        let args = InstallCaArgs {
            data_dir: data.clone(),
            mirrored_registries: vec!["docker.io".into()],
            trust_root: root.clone(),
            print: false,
            bundle: None,
        };
        install(&args).unwrap();
        let installed =
            fs::read_to_string(root.join("usr/local/share/ca-certificates/spegel-node-ca.crt"))
                .unwrap();
        let ca = NodeCa::load_or_create(&data, permitted(&["docker.io"])).unwrap();
        assert_eq!(installed, ca.cert_pem());

        let out = data.join("bundle.pem");
        install(&InstallCaArgs {
            bundle: Some(out.clone()),
            ..args.clone()
        })
        .unwrap();
        let bundle = fs::read_to_string(&out).unwrap();
        assert!(bundle.starts_with("SYSTEM ROOTS\n"));
        assert!(bundle.ends_with(ca.cert_pem()));

        // No known layout: a clear error.
        let empty = tempdir();
        let err = install(&InstallCaArgs {
            trust_root: empty.clone(),
            ..args
        })
        .unwrap_err();
        assert!(
            err.to_string().contains("unknown trust store layout"),
            "{err}"
        );
        for dir in [root, data, empty] {
            fs::remove_dir_all(dir).unwrap();
        }
    }
}
