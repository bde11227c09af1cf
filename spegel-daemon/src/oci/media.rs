//! Media types of the pull API: the manifest and index types a pull may ask for, the blob types
//! spegel names, and the `Accept` value sent when a client named none.

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker image manifest, schema 2.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list, schema 2.
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// OCI image config.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Docker image config.
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// OCI gzip layer.
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// Docker gzip layer.
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
/// Bytes of unknown type, and every ranged blob response.
pub const OCTET_STREAM: &str = "application/octet-stream";
/// The four manifest media types a pull may ask for, in the order clients list them in `Accept`.
pub const MANIFEST_MEDIA_TYPES: [&str; 4] = [
    OCI_MANIFEST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    DOCKER_MANIFEST_LIST,
];

/// What we ask a registry for when the client named no manifest types: every manifest media type,
/// indexes first.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.docker.distribution.manifest.v2+json";

/// Whether `media_type` (parameters and case ignored) is an OCI or Docker schema 2 manifest or
/// index: what may be served from `/manifests/` and must not be served from `/blobs/`.
pub fn is_manifest_media_type(media_type: &str) -> bool {
    let essence = media_type.split(';').next().unwrap_or_default().trim();
    MANIFEST_MEDIA_TYPES
        .iter()
        .any(|known| known.eq_ignore_ascii_case(essence))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_types() {
        for mt in MANIFEST_MEDIA_TYPES {
            assert!(is_manifest_media_type(mt));
        }
        assert!(is_manifest_media_type(
            "Application/VND.oci.image.manifest.v1+json; charset=utf-8"
        ));
        for mt in [
            OCI_CONFIG,
            DOCKER_CONFIG,
            OCI_LAYER_GZIP,
            DOCKER_LAYER_GZIP,
            OCTET_STREAM,
            "",
        ] {
            assert!(!is_manifest_media_type(mt), "{mt}");
        }
        // Our constants agree with oci-spec's.
        use oci_spec::image::MediaType;
        assert_eq!(MediaType::ImageManifest.to_string(), OCI_MANIFEST);
        assert_eq!(MediaType::ImageIndex.to_string(), OCI_INDEX);
        assert_eq!(MediaType::ImageConfig.to_string(), OCI_CONFIG);
        assert_eq!(MediaType::ImageLayerGzip.to_string(), OCI_LAYER_GZIP);
    }
}
