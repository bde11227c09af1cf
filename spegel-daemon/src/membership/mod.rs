//! Cluster membership: who may join the DHT and read content from this node.
//!
//! Every node holds the same cluster secret (a file, e.g. mounted from a Kubernetes Secret).
//! Nothing travels with it in the clear: each use gets its own key derived from it with
//! HKDF-SHA256 (a label per use), so a key leaked from one use says nothing about the others.
//!
//! - **libp2p** (`handshake.rs`). After noise has authenticated both peer ids, and before
//!   anything else runs on the connection, each side proves it holds a cluster secret: an
//!   HMAC over both random nonces and both peer ids. A host without the secret is disconnected
//!   before it can send one Kademlia message. (libp2p's pnet would hide more of the handshake,
//!   but it takes exactly one key and cannot negotiate: two secrets at once, which rotation
//!   needs, is impossible with it.)
//! - **Peer HTTP** (`peer_tls.rs`). Node-to-node requests go over mutual TLS. Each secret
//!   deterministically gives a cluster CA key (Ed25519), so every node can issue its own leaf
//!   without any coordination, and trusts leaves from every secret it holds. A client without a
//!   leaf from a cluster CA cannot finish the handshake; a plain-HTTP request for content from
//!   anywhere but this node's loopback gets 401.
//! - **Authenticated plaintext** (`plaintext.rs`), when the operator chooses it for a network
//!   it trusts: requests and answers carry an HMAC instead of being encrypted.
//!
//! **Rotation**: up to two secrets are held at once. The first one signs (proofs, this node's
//! leaf, plaintext requests); all are accepted. Roll out `[old, new]`, then `[new, old]`, then
//! `[new]`: any two nodes in adjacent steps accept each other.
mod args;
mod handshake;
mod peer_tls;
mod plaintext;

use std::{fmt, path::Path};

use ring::hkdf;

pub use self::{
    args::{MembershipArgs, PeerTransport},
    handshake::MemberUpgrade,
    peer_tls::{PEER_SERVER_NAME, PeerTls},
    plaintext::{AUTH_HEADER, PlaintextAuth},
};

/// Secrets held at once, at most (the current one and the one being rotated in or out).
pub const MAX_SECRETS: usize = 2;
/// The shortest secret accepted, in bytes: 128 bits of entropy at the very least.
pub const MIN_SECRET_LEN: usize = 16;

/// What a derived key is for; each gives an unrelated key.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Use {
    /// The libp2p membership proof.
    Libp2p,
    /// The seed of the cluster CA key.
    PeerCa,
    /// The HMAC of authenticated-plaintext requests and answers.
    Plaintext,
}

impl Use {
    fn label(self) -> &'static [u8] {
        match self {
            Self::Libp2p => b"spegel/membership/libp2p/v1",
            Self::PeerCa => b"spegel/membership/peer-ca/v1",
            Self::Plaintext => b"spegel/membership/plaintext/v1",
        }
    }
}

/// The cluster secrets this node holds, the signing one first.
#[derive(Clone)]
pub struct ClusterSecrets {
    /// HKDF pseudo-random keys, one per secret.
    prks: Vec<hkdf::Prk>,
}

impl fmt::Debug for ClusterSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterSecrets({} held)", self.prks.len())
    }
}

/// Why the cluster secrets cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error("cluster secret {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cluster secret {path} is too short ({len} bytes; at least {MIN_SECRET_LEN}, 32 random bytes recommended)"
    )]
    TooShort { path: String, len: usize },
    #[error("at most {MAX_SECRETS} cluster secrets are held at once, {0} given")]
    TooMany(usize),
    #[error(
        "no cluster secret: give --cluster-secret-file (SPEGEL_CLUSTER_SECRET_FILE), or \
         --insecure-open-cluster on a network where every host is trusted"
    )]
    None,
    #[error("peer TLS: {0}")]
    Tls(String),
}

impl ClusterSecrets {
    /// Secrets from raw bytes, the signing one first. Surrounding whitespace is not part of a
    /// secret (a file written with `echo` ends in a newline).
    pub fn new<S: AsRef<[u8]>>(secrets: &[S]) -> Result<Self, MembershipError> {
        Self::from_named(secrets.iter().map(|s| ("secret", s.as_ref())))
    }

    /// Reads one secret per file, the signing one first.
    pub fn read(paths: &[impl AsRef<Path>]) -> Result<Self, MembershipError> {
        let contents = paths
            .iter()
            .map(|path| {
                let path = path.as_ref();
                std::fs::read(path)
                    .map(|bytes| (path.display().to_string(), bytes))
                    .map_err(|source| MembershipError::Read {
                        path: path.display().to_string(),
                        source,
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Self::from_named(
            contents
                .iter()
                .map(|(path, bytes)| (path.as_str(), bytes.as_slice())),
        )
    }

    fn from_named<'a>(
        secrets: impl Iterator<Item = (&'a str, &'a [u8])>,
    ) -> Result<Self, MembershipError> {
        let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, b"spegel cluster secret");
        let mut prks = Vec::new();
        for (path, secret) in secrets {
            let secret = secret.trim_ascii();
            if secret.len() < MIN_SECRET_LEN {
                return Err(MembershipError::TooShort {
                    path: path.to_owned(),
                    len: secret.len(),
                });
            }
            prks.push(salt.extract(secret));
        }
        match prks.len() {
            0 => Err(MembershipError::None),
            n if n > MAX_SECRETS => Err(MembershipError::TooMany(n)),
            _ => Ok(Self { prks }),
        }
    }

    /// The key for `use_` from each secret, the signing one first.
    pub(crate) fn keys(&self, use_: Use) -> Vec<[u8; 32]> {
        self.prks
            .iter()
            .map(|prk| {
                let mut key = [0; 32];
                let info = [use_.label()];
                // HKDF-SHA256 can expand to 255 × 32 bytes; 32 never fails.
                if let Ok(okm) = prk.expand(&info, Len32) {
                    let _ = okm.fill(&mut key);
                }
                key
            })
            .collect()
    }
}

/// An HKDF output length of 32 bytes.
struct Len32;

impl hkdf::KeyType for Len32 {
    fn len(&self) -> usize {
        32
    }
}

/// How this node treats other nodes.
#[derive(Debug, Clone)]
pub enum Membership {
    /// Only holders of a cluster secret join the DHT and read content.
    Secret {
        secrets: ClusterSecrets,
        transport: PeerTransport,
    },
    /// Anyone who can reach the ports: the operator said so (`--insecure-open-cluster`).
    Open,
}

/// How node-to-node requests are authenticated, on both ends.
#[derive(Debug, Clone)]
pub enum PeerAuth {
    /// Not at all: an open cluster.
    Open,
    /// Mutual TLS with cluster leaves.
    Tls(PeerTls),
    /// An HMAC on every request and answer.
    Plaintext(PlaintextAuth),
}

impl Membership {
    /// What node-to-node requests use; builds this node's TLS leaf.
    pub fn peer_auth(&self) -> Result<PeerAuth, MembershipError> {
        Ok(match self {
            Self::Open => PeerAuth::Open,
            Self::Secret {
                secrets,
                transport: PeerTransport::Tls,
            } => PeerAuth::Tls(PeerTls::new(secrets)?),
            Self::Secret {
                secrets,
                transport: PeerTransport::Plaintext,
            } => PeerAuth::Plaintext(PlaintextAuth::new(secrets)),
        })
    }

    /// The secrets, unless the cluster is open.
    pub fn secrets(&self) -> Option<&ClusterSecrets> {
        match self {
            Self::Secret { secrets, .. } => Some(secrets),
            Self::Open => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_differ_per_use_and_per_secret_and_ignore_surrounding_whitespace() {
        let a = ClusterSecrets::new(&["0123456789abcdef0123"]).unwrap();
        let a_nl = ClusterSecrets::new(&["  0123456789abcdef0123\n"]).unwrap();
        let b = ClusterSecrets::new(&["0123456789abcdef0124"]).unwrap();
        assert_eq!(a.keys(Use::Libp2p), a_nl.keys(Use::Libp2p));
        assert_ne!(a.keys(Use::Libp2p), b.keys(Use::Libp2p));
        assert_ne!(a.keys(Use::Libp2p), a.keys(Use::PeerCa));
        assert_ne!(a.keys(Use::PeerCa), a.keys(Use::Plaintext));
        assert_eq!(a.keys(Use::Libp2p).len(), 1);
    }

    #[test]
    fn short_missing_and_too_many_secrets_are_refused() {
        let short = ClusterSecrets::new(&["123456789012345\n"]).unwrap_err();
        assert!(
            matches!(short, MembershipError::TooShort { len: 15, .. }),
            "{short}"
        );
        let none: [&str; 0] = [];
        assert!(matches!(
            ClusterSecrets::new(&none),
            Err(MembershipError::None)
        ));
        let s = "0123456789abcdef";
        assert!(matches!(
            ClusterSecrets::new(&[s, s, s]),
            Err(MembershipError::TooMany(3))
        ));
        let two = ClusterSecrets::new(&[s, "fedcba9876543210"]).unwrap();
        assert_eq!(two.keys(Use::Plaintext).len(), 2);
    }

    #[test]
    fn a_missing_file_names_its_path() {
        let err = ClusterSecrets::read(&["/nonexistent/spegel-secret"]).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/spegel-secret"),
            "{err}"
        );
    }
}
