//! The OCI distribution pull API's vocabulary: strict parsers for paths, names, tags, `Range`,
//! `?ns=` and registry addresses, the OCI error body, header names and media types. Each concept
//! has its own file; everything is re-exported here as `crate::oci::X`.
//!
//! Every parser here takes untrusted bytes straight from the wire. They are hand-written state
//! machines over bytes: they never decode percent-escapes in paths (a `%` is simply invalid there,
//! which rules out `%2e%2e` traversal), never allocate proportionally to hostile input before
//! checking its length, and never panic.

pub mod digest;
mod error;
mod headers;
mod media;
mod name;
mod ns;
mod object;
mod range;
mod registry;

pub use error::{ErrorBody, ErrorCode, ErrorInfo, ParseError};
pub use headers::{
    API_VERSION_HEADER, CONTENT_DIGEST_HEADER, MIRRORED_HEADER, PUBLIC_ONLY_HEADER, content_digest,
    content_length, content_range, unsatisfied_range_size,
};
pub use media::{
    DOCKER_CONFIG, DOCKER_LAYER_GZIP, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, MANIFEST_ACCEPT,
    MANIFEST_MEDIA_TYPES, OCI_CONFIG, OCI_INDEX, OCI_LAYER_GZIP, OCI_MANIFEST, OCTET_STREAM,
    is_manifest_media_type,
};
pub use name::{
    MAX_NAME_LEN, MAX_TAG_LEN, ObjectPath, parse_object_path, parse_reference, validate_repository,
    validate_tag,
};
pub use ns::parse_ns_query;
pub use object::{Kind, Reference};
pub use range::{ByteRange, parse_range};
pub use registry::{
    Host, Registry, RegistryError, RegistryList, RegistryListError, Scheme, SplitHost,
    split_authority,
};
