//! The pull path, repository names, tags, references (`oci/name.rs`) and `?ns=` (`oci/ns.rs`),
//! as they arrive in request lines.
//!
//! Asserts: an accepted path is rebuilt exactly from its parts; its repository and tag respect
//! the spec's limits and character sets; `?ns=` yields a registry authority that parses again to
//! itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spegel::oci::{
    Kind, MAX_NAME_LEN, MAX_TAG_LEN, Reference, Registry, parse_ns_query, parse_object_path,
    parse_reference, validate_repository, validate_tag,
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (path, query) = text.split_once('?').unwrap_or((text, ""));
    if let Ok(object) = parse_object_path(path) {
        let kind = match object.kind {
            Kind::Manifest => "manifests",
            Kind::Blob => "blobs",
        };
        let reference = match &object.reference {
            Reference::Tag(tag) => tag.clone(),
            Reference::Digest(digest) => digest.to_string(),
        };
        assert_eq!(
            format!("/v2/{}/{kind}/{reference}", object.repository),
            path
        );
        assert!(object.repository.len() <= MAX_NAME_LEN);
        assert!(validate_repository(&object.repository).is_ok());
        assert!(
            object
                .repository
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-/".contains(&b))
        );
        assert_eq!(parse_reference(&reference), Ok(object.reference.clone()));
        if let Reference::Tag(tag) = &object.reference {
            assert!(tag.len() <= MAX_TAG_LEN && validate_tag(tag).is_ok());
            assert_eq!(object.kind, Kind::Manifest, "blobs are never asked by tag");
        }
    }
    if let Ok(Some(ns)) = parse_ns_query(Some(query)) {
        let registry = Registry::parse_authority(&ns).expect("?ns= yields an authority");
        assert_eq!(registry.authority(), ns);
    }
});
