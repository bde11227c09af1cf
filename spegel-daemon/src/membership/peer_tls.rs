//! Mutual TLS between nodes, from the cluster secrets alone.
//!
//! Each secret deterministically gives an Ed25519 key (HKDF → seed), so every node holds the same
//! cluster CA key without anything being distributed but the secret. At start each node mints a
//! fresh P-256 leaf (in memory only) for the fixed name [`PEER_SERVER_NAME`] with both server and
//! client authentication, signed by the CA of its first secret. Servers require a client leaf
//! from the CA of any secret they hold; clients require the same of servers. The CA is
//! name-constrained to [`PEER_SERVER_NAME`], so even a member cannot use it to pass for a
//! registry, and it is trusted by nothing but these two configs. TLS 1.3 only: both ends are
//! spegel.
//!
//! A client addresses a peer by its IP address, not by the shared name: rustls keeps resumption
//! tickets per server name, so one name for every peer would offer each peer another's ticket
//! and never resume. The certificate is still checked against [`PEER_SERVER_NAME`], whatever
//! the address ([`FixedName`]); no SNI is sent for an address, and the server needs none.
use std::{net::IpAddr, sync::Arc};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    GeneralSubtree, IsCa, Issuer, KeyPair, KeyUsagePurpose, NameConstraints,
    PKCS_ECDSA_P256_SHA256, PKCS_ED25519, SanType, SerialNumber,
};
use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime},
    server::WebPkiClientVerifier,
};
use time::{Duration, OffsetDateTime};

use super::{ClusterSecrets, MembershipError, Use};

/// The name every node's leaf carries and every client asks for.
pub const PEER_SERVER_NAME: &str = "peer.spegel.invalid";
/// How long a leaf is valid; it lives in memory only and is re-minted at every start.
const LEAF_VALIDITY: Duration = Duration::days(3650);
/// PKCS#8 v1 prefix of an Ed25519 private key; the 32-byte seed follows.
const ED25519_PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// The TLS configurations of node-to-node requests.
#[derive(Clone)]
pub struct PeerTls {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerTls")
    }
}

fn tls_error(context: &str) -> impl FnOnce(String) -> MembershipError + '_ {
    move |e| MembershipError::Tls(format!("{context}: {e}"))
}

/// The cluster CA of one secret's key: the same certificate on every node.
fn cluster_ca(seed: &[u8; 32]) -> Result<(CertificateDer<'static>, KeyPair), MembershipError> {
    let mut pkcs8 = ED25519_PKCS8_PREFIX.to_vec();
    pkcs8.extend_from_slice(seed);
    let key =
        KeyPair::from_pkcs8_der_and_sign_algo(&PrivatePkcs8KeyDer::from(pkcs8), &PKCS_ED25519)
            .map_err(|e| tls_error("cluster CA key")(e.to_string()))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "spegel");
    dn.push(DnType::CommonName, "spegel cluster CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    params.name_constraints = Some(NameConstraints {
        permitted_subtrees: vec![GeneralSubtree::DnsName(PEER_SERVER_NAME.into())],
        excluded_subtrees: Vec::new(),
    });
    params.serial_number = Some(SerialNumber::from(1u64));
    let cert = params
        .self_signed(&key)
        .map_err(|e| tls_error("cluster CA")(e.to_string()))?;
    Ok((cert.der().clone(), key))
}

impl PeerTls {
    /// The configurations for `secrets`: this node's leaf is signed by the first one's CA.
    pub fn new(secrets: &ClusterSecrets) -> Result<Self, MembershipError> {
        let mut roots = RootCertStore::empty();
        let mut issuer = None;
        for seed in secrets.keys(Use::PeerCa) {
            let (cert, key) = cluster_ca(&seed)?;
            roots
                .add(cert.clone())
                .map_err(|e| tls_error("cluster CA")(e.to_string()))?;
            if issuer.is_none() {
                issuer = Some(
                    Issuer::from_ca_cert_der(&cert, key)
                        .map_err(|e| tls_error("cluster CA")(e.to_string()))?,
                );
            }
        }
        let issuer = issuer.ok_or(MembershipError::None)?;

        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| tls_error("leaf key")(e.to_string()))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names =
            vec![SanType::DnsName(PEER_SERVER_NAME.try_into().map_err(
                |e: rcgen::Error| tls_error("leaf name")(e.to_string()),
            )?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + LEAF_VALIDITY;
        let mut serial: [u8; 16] = rand::random();
        serial[0] &= 0x7f;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let leaf = params
            .signed_by(&key, &issuer)
            .map_err(|e| tls_error("leaf")(e.to_string()))?;
        let chain = vec![leaf.der().clone()];
        let key_der = || PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));

        let provider = Arc::new(provider());
        let roots = Arc::new(roots);
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), Arc::clone(&provider))
                .build()
                .map_err(|e| tls_error("client verifier")(e.to_string()))?;
        let mut server = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| tls_error("server")(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key_der())
            .map_err(|e| tls_error("server")(e.to_string()))?;
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        let name = ServerName::try_from(PEER_SERVER_NAME)
            .map_err(|e| tls_error("peer name")(e.to_string()))?;
        let server_verifier =
            WebPkiServerVerifier::builder_with_provider(roots, Arc::clone(&provider))
                .build()
                .map_err(|e| tls_error("server verifier")(e.to_string()))?;
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| tls_error("client")(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(FixedName {
                inner: server_verifier,
                name: name.clone(),
            }))
            .with_client_auth_cert(chain, key_der())
            .map_err(|e| tls_error("client")(e.to_string()))?;
        client.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            server: Arc::new(server),
            client: Arc::new(client),
            name,
        })
    }

    /// What the registry API accepts peers with.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.server)
    }

    /// What peer requests connect with.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        Arc::clone(&self.client)
    }

    /// What a client connecting to the peer at `peer` asks for: its address when known (so its
    /// resumption tickets are its own), else the shared name.
    pub fn server_name(&self, peer: Option<IpAddr>) -> ServerName<'static> {
        match peer {
            Some(ip) => ServerName::IpAddress(ip.into()),
            None => self.name.clone(),
        }
    }
}

/// Checks a peer's certificate with the cluster roots against [`PEER_SERVER_NAME`], whatever
/// name or address the connection was made for: every member's leaf carries that one name.
#[derive(Debug)]
struct FixedName {
    inner: Arc<WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl ServerCertVerifier for FixedName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _addressed_as: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// ring's TLS 1.3 suites with AES-128-GCM first: both ends are ours, and on the peer path,
/// where every blob byte is sealed and opened once, its 10 rounds cost less CPU than
/// AES-256-GCM's 14 at the same 128-bit security the key exchange gives.
fn provider() -> rustls::crypto::CryptoProvider {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|suite| suite.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    provider
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use super::*;

    const OLD: &str = "old-secret-0123456789";
    const NEW: &str = "new-secret-0123456789";

    fn tls(secrets: &[&str]) -> PeerTls {
        PeerTls::new(&ClusterSecrets::new(secrets).unwrap()).unwrap()
    }

    const PEER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    /// Whether a client with `client` completes a handshake and one exchange with `server`.
    async fn talk(client: &PeerTls, server: &PeerTls) -> bool {
        exchange(client, server, Some(PEER)).await.is_some()
    }

    /// How a client with `client`, dialling `server` at `peer`, got through its handshake, when it
    /// completes one exchange (which also delivers the server's resumption tickets).
    async fn exchange(
        client: &PeerTls,
        server: &PeerTls,
        peer: Option<IpAddr>,
    ) -> Option<rustls::HandshakeKind> {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let acceptor = TlsAcceptor::from(server.server_config());
        let connector = TlsConnector::from(client.client_config());
        let serve = async move {
            let mut tls = acceptor.accept(b).await.ok()?;
            let mut buf = [0; 4];
            tls.read_exact(&mut buf).await.ok()?;
            tls.write_all(b"pong").await.ok()?;
            tls.flush().await.ok()?;
            Some(())
        };
        let ask = async move {
            let mut tls = connector.connect(client.server_name(peer), a).await.ok()?;
            tls.write_all(b"ping").await.ok()?;
            tls.flush().await.ok()?;
            let mut buf = [0; 4];
            tls.read_exact(&mut buf).await.ok()?;
            (buf == *b"pong").then(|| tls.get_ref().1.handshake_kind())?
        };
        let (served, kind) = tokio::join!(serve, ask);
        served.and(kind)
    }

    #[test]
    fn every_node_derives_the_same_cluster_ca() {
        let seed = ClusterSecrets::new(&[OLD]).unwrap().keys(Use::PeerCa)[0];
        assert_eq!(cluster_ca(&seed).unwrap().0, cluster_ca(&seed).unwrap().0);
    }

    #[tokio::test]
    async fn members_talk() {
        assert!(talk(&tls(&[OLD]), &tls(&[OLD])).await);
    }

    #[tokio::test]
    async fn members_talk_by_the_shared_name_too() {
        assert!(exchange(&tls(&[OLD]), &tls(&[OLD]), None).await.is_some());
    }

    #[tokio::test]
    async fn each_peer_resumes_its_own_session() {
        let (client, one, two) = (tls(&[OLD]), tls(&[OLD]), tls(&[OLD]));
        let other = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 3));
        let full = Some(rustls::HandshakeKind::Full);
        assert_eq!(exchange(&client, &one, Some(PEER)).await, full);
        assert_eq!(exchange(&client, &two, Some(other)).await, full);
        // Under one name for both, the ticket offered here would be `two`'s, and `one` would
        // decline it.
        assert_eq!(
            exchange(&client, &one, Some(PEER)).await,
            Some(rustls::HandshakeKind::Resumed)
        );
    }

    #[tokio::test]
    async fn members_seal_blobs_with_aes_128_gcm() {
        let (client, server) = (tls(&[OLD]), tls(&[OLD]));
        let (a, b) = tokio::io::duplex(64 * 1024);
        let acceptor = TlsAcceptor::from(server.server_config());
        let connector = TlsConnector::from(client.client_config());
        let (served, asked) = tokio::join!(
            acceptor.accept(b),
            connector.connect(client.server_name(Some(PEER)), a)
        );
        let (served, asked) = (served.unwrap(), asked.unwrap());
        for suite in [
            served.get_ref().1.negotiated_cipher_suite(),
            asked.get_ref().1.negotiated_cipher_suite(),
        ] {
            assert_eq!(
                suite.map(|s| s.suite()),
                Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
            );
        }
    }

    #[tokio::test]
    async fn another_cluster_is_refused_both_ways() {
        assert!(!talk(&tls(&[OLD]), &tls(&[NEW])).await);
        assert!(!talk(&tls(&[NEW]), &tls(&[OLD])).await);
    }

    #[tokio::test]
    async fn a_client_without_a_certificate_is_refused() {
        let server = tls(&[OLD]);
        let (a, b) = tokio::io::duplex(64 * 1024);
        let acceptor = TlsAcceptor::from(server.server_config());
        // Trusts the server, but has no leaf to show.
        let mut roots = RootCertStore::empty();
        let seed = ClusterSecrets::new(&[OLD]).unwrap().keys(Use::PeerCa)[0];
        roots.add(cluster_ca(&seed).unwrap().0).unwrap();
        let anonymous =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        let connector = TlsConnector::from(Arc::new(anonymous));
        let ask = async move {
            let mut tls = connector.connect(server.server_name(None), a).await.ok()?;
            tls.write_all(b"ping").await.ok()?;
            tls.flush().await.ok()?;
            let mut buf = [0; 4];
            tls.read_exact(&mut buf).await.ok()
        };
        let (accepted, answer) = tokio::join!(acceptor.accept(b), ask);
        assert!(accepted.is_err());
        assert!(answer.is_none());
    }

    #[tokio::test]
    async fn every_step_of_a_rotation_accepts_its_neighbours() {
        let steps: [&[&str]; 4] = [&[OLD], &[OLD, NEW], &[NEW, OLD], &[NEW]];
        for pair in steps.windows(2) {
            let (a, b) = (tls(pair[0]), tls(pair[1]));
            assert!(talk(&a, &b).await, "{:?} -> {:?}", pair[0], pair[1]);
            assert!(talk(&b, &a).await, "{:?} -> {:?}", pair[1], pair[0]);
        }
    }
}
