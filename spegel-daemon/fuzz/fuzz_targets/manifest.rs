//! Manifests and indexes as the image walk reads them from the content store
//! (`store/walk.rs`), and image-record names.
//!
//! Asserts: a parsed document has a media type and is valid JSON; sniffing agrees with parsing;
//! a tag reference is the whole name and has a tag.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spegel::fuzzing::{parse_document, sniff_media_type, tag_reference};

fuzz_target!(|data: &[u8]| {
    if let Some(document) = parse_document(data) {
        assert!(document.media_type.is_some());
        assert!(serde_json::from_slice::<serde_json::Value>(data).is_ok_and(|v| v.is_object()));
        assert_eq!(sniff_media_type(data), document.media_type);
    }
    if let Ok(name) = std::str::from_utf8(data)
        && let Some(reference) = tag_reference(name)
    {
        assert_eq!(reference, name);
        assert!(!name.contains('@'));
        let (_, last) = name.rsplit_once('/').expect("a registry");
        assert!(last.contains(':'));
    }
});
