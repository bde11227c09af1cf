//! DHT keys: a key string (`sha256:<hex>` or `registry/repo:tag`) maps to the Kademlia key
//! `0x12 0x20 || sha256(utf8(key))`, a sha2-256 multihash as in Spegel's CIDs.
use std::fmt;

use sha2::{Digest as _, Sha256};

/// A DHT key: the sha2-256 multihash of a key string. Fixed size and `Ord`, so it is cheap to
/// keep in maps and queues; [`ContentKey::record_key`] converts it for Kademlia.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) struct ContentKey([u8; 34]);

// === impl ContentKey ===

impl ContentKey {
    /// sha2-256 multihash code and digest length.
    const MULTIHASH_PREFIX: [u8; 2] = [0x12, 0x20];

    /// The DHT key of a key string.
    pub(super) fn of(key: &str) -> Self {
        let mut bytes = [0u8; 34];
        bytes[..2].copy_from_slice(&Self::MULTIHASH_PREFIX);
        bytes[2..].copy_from_slice(&Sha256::digest(key.as_bytes()));
        Self(bytes)
    }

    /// The key as Kademlia takes it.
    pub(super) fn record_key(&self) -> libp2p::kad::RecordKey {
        libp2p::kad::RecordKey::new(&self.0)
    }
}

impl fmt::Debug for ContentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", hex::encode(&self.0[2..]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_keys_are_sha256_multihashes() {
        let key = ContentKey::of("sha256:abc");
        assert_eq!(&key.0[..2], &[0x12, 0x20]);
        assert_eq!(
            hex::encode(&key.0[2..]),
            hex::encode(Sha256::digest(b"sha256:abc"))
        );
        assert_ne!(key, ContentKey::of("docker.io/library/nginx:1.27"));
        assert_eq!(key.record_key().as_ref(), &key.0[..]);
    }
}
