//! Digests (`oci/digest.rs`): `sha256:<hex>` from paths, headers, manifests and the store.
//!
//! Asserts: an accepted digest is exactly its display (the parser accepts one spelling only),
//! and serde reads back what it writes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spegel::oci::digest::Digest;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(digest) = text.parse::<Digest>() else {
        return;
    };
    assert_eq!(digest.to_string(), text);
    assert_eq!(format!("sha256:{}", digest.hex()), text);
    let json = serde_json::to_string(&digest).expect("serialise");
    assert_eq!(serde_json::from_str::<Digest>(&json).ok(), Some(digest));
});
