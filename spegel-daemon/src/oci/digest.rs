//! Content digests (`sha256:<hex>`) and streaming verification.
use std::{fmt, str::FromStr};

use sha2::{Digest as _, Sha256};

/// A sha256 content digest. The only algorithm accepted: anything else is rejected when parsed.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

/// Why a string is not a digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    /// Not of the form `algorithm:encoded`.
    #[error("digest has no algorithm prefix")]
    NoAlgorithm,
    /// An algorithm other than sha256.
    #[error("unsupported digest algorithm")]
    UnsupportedAlgorithm,
    /// The encoded part is not 64 lowercase hex characters.
    #[error("sha256 digest must be 64 lowercase hex characters")]
    BadHex,
}

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The 64 hex characters, without the `sha256:` prefix.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (algorithm, encoded) = s.split_once(':').ok_or(DigestError::NoAlgorithm)?;
        if algorithm != "sha256" {
            return Err(DigestError::UnsupportedAlgorithm);
        }
        if encoded.len() != 64
            || !encoded
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(DigestError::BadHex);
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(encoded, &mut out).map_err(|_| DigestError::BadHex)?;
        Ok(Self(out))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Hashes bytes as they stream past and says at the end whether they were the expected content.
#[derive(Clone)]
pub struct Verifier {
    expected: Digest,
    hasher: Sha256,
    len: u64,
}

impl Verifier {
    /// A verifier for content whose digest must be `expected`.
    pub fn new(expected: Digest) -> Self {
        Self {
            expected,
            hasher: Sha256::new(),
            len: 0,
        }
    }

    /// Feed the next bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.hasher.update(bytes);
        self.len += bytes.len() as u64;
    }

    /// How many bytes have been fed.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing has been fed yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether everything fed hashes to the expected digest.
    pub fn verify(self) -> bool {
        let got: [u8; 32] = self.hasher.finalize().into();
        got == self.expected.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let s = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let d: Digest = s.parse().unwrap();
        assert_eq!(d.to_string(), s);
        assert_eq!(d, Digest::of(b""));
    }

    #[test]
    fn rejects_bad_input() {
        let good = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        assert_eq!("".parse::<Digest>(), Err(DigestError::NoAlgorithm));
        assert_eq!(good.parse::<Digest>(), Err(DigestError::NoAlgorithm));
        assert_eq!(
            format!("sha512:{good}").parse::<Digest>(),
            Err(DigestError::UnsupportedAlgorithm)
        );
        assert_eq!(
            format!("sha256:{}", good.to_uppercase()).parse::<Digest>(),
            Err(DigestError::BadHex)
        );
        assert_eq!(
            format!("sha256:{}", &good[1..]).parse::<Digest>(),
            Err(DigestError::BadHex)
        );
        assert_eq!(
            format!("sha256:{good}0").parse::<Digest>(),
            Err(DigestError::BadHex)
        );
        assert_eq!(
            "sha256:../../etc/passwd".parse::<Digest>(),
            Err(DigestError::BadHex)
        );
        assert_eq!(
            format!("sha256:{}", "é".repeat(32)).parse::<Digest>(),
            Err(DigestError::BadHex)
        );
    }

    #[test]
    fn verifier_detects_mismatch() {
        let mut v = Verifier::new(Digest::of(b"hello world"));
        v.update(b"hello ");
        v.update(b"world");
        assert_eq!(v.len(), 11);
        assert!(v.clone().verify());
        v.update(b"!");
        assert!(!v.verify());
    }
}
