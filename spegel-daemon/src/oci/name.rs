//! Repository names, tags, references and the pull path `/v2/<name>/<manifests|blobs>/<reference>`,
//! checked against the distribution spec's grammar.
use super::{Kind, ParseError, Reference, digest::Digest};

/// The longest repository name accepted. The distribution spec says many clients cap
/// `registry/name` at 255 characters; the name alone can be no longer than that.
pub const MAX_NAME_LEN: usize = 255;
/// The longest tag the distribution spec allows.
pub const MAX_TAG_LEN: usize = 128;
/// Longest path considered at all: name + `/manifests/` + the longest reference, with room to spare.
const MAX_PATH_LEN: usize = 1024;

/// The path of one pull: `/v2/<repository>/<manifests|blobs>/<reference>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectPath {
    pub repository: String,
    pub kind: Kind,
    pub reference: Reference,
}

/// Parse a request path as a pull. `path` is the full path (`/v2/library/nginx/manifests/1.27`),
/// without the query. Nothing is percent-decoded.
pub fn parse_object_path(path: &str) -> Result<ObjectPath, ParseError> {
    if path.len() > MAX_PATH_LEN {
        return Err(ParseError::Name("path too long"));
    }
    let rest = path.strip_prefix("/v2/").ok_or(ParseError::Unsupported)?;
    // The reference and the kind are the last two components; everything before is the name, so
    // a repository may itself contain a `blobs` or `manifests` component.
    let (rest, reference) = rest.rsplit_once('/').ok_or(ParseError::Unsupported)?;
    let (repository, kind) = rest.rsplit_once('/').ok_or(ParseError::Unsupported)?;
    let kind = match kind {
        "manifests" => Kind::Manifest,
        "blobs" => Kind::Blob,
        _ => return Err(ParseError::Unsupported),
    };
    validate_repository(repository)?;
    let reference = parse_reference(reference)?;
    if kind == Kind::Blob && matches!(reference, Reference::Tag(_)) {
        return Err(ParseError::BlobTag);
    }
    Ok(ObjectPath {
        repository: repository.to_owned(),
        kind,
        reference,
    })
}

/// Check a repository name against the distribution spec:
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*` components joined by `/`, at most [`MAX_NAME_LEN`] bytes.
pub fn validate_repository(name: &str) -> Result<(), ParseError> {
    if name.is_empty() {
        return Err(ParseError::Name("empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(ParseError::Name("longer than 255 characters"));
    }
    name.split('/').try_for_each(validate_component)
}

/// One path component of a repository name.
fn validate_component(component: &str) -> Result<(), ParseError> {
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if bytes.is_empty() {
        return Err(ParseError::Name("empty path component"));
    }
    let mut i = 0;
    loop {
        // An alphanumeric run, at least one character long.
        let run_start = i;
        while i < bytes.len() && alnum(bytes[i]) {
            i += 1;
        }
        if i == run_start {
            return Err(ParseError::Name(
                "path components must start and end with [a-z0-9]",
            ));
        }
        let Some(&separator) = bytes.get(i) else {
            return Ok(());
        };
        // A separator: `.`, `_`, `__` or a run of `-`.
        let sep_start = i;
        match separator {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if bytes.get(i) == Some(&b'_') {
                    i += 1;
                }
            }
            b'-' => {
                while bytes.get(i) == Some(&b'-') {
                    i += 1;
                }
            }
            _ => return Err(ParseError::Name("only [a-z0-9._-] are allowed")),
        }
        debug_assert!(i > sep_start);
        if i == bytes.len() {
            return Err(ParseError::Name(
                "path components must start and end with [a-z0-9]",
            ));
        }
    }
}

/// A reference: a digest if it contains `:` (tags cannot), else a tag.
pub fn parse_reference(reference: &str) -> Result<Reference, ParseError> {
    if reference.contains(':') {
        return reference
            .parse::<Digest>()
            .map(Reference::Digest)
            .map_err(ParseError::Digest);
    }
    validate_tag(reference)?;
    Ok(Reference::Tag(reference.to_owned()))
}

/// Check a tag against `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
pub fn validate_tag(tag: &str) -> Result<(), ParseError> {
    let bytes = tag.as_bytes();
    let first_ok = bytes
        .first()
        .is_some_and(|&b| b.is_ascii_alphanumeric() || b == b'_');
    let rest_ok = bytes
        .iter()
        .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if first_ok && rest_ok && bytes.len() <= MAX_TAG_LEN {
        Ok(())
    } else {
        Err(ParseError::Tag)
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::digest::DigestError;

    const HEX: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[track_caller]
    fn check_path(path: &str, expected: Result<(&str, Kind, &str), ParseError>) {
        let got = parse_object_path(path).map(|p| {
            let reference = match p.reference {
                Reference::Tag(tag) => tag,
                Reference::Digest(digest) => digest.to_string(),
            };
            (p.repository, p.kind, reference)
        });
        let expected = expected.map(|(r, k, s)| (r.to_owned(), k, s.to_owned()));
        assert_eq!(got, expected, "path {path:?}");
    }

    #[test]
    fn object_paths() {
        let digest = format!("sha256:{HEX}");
        let ok = |r, k, s| Ok((r, k, s));
        check_path(
            "/v2/library/nginx/manifests/1.27",
            ok("library/nginx", Kind::Manifest, "1.27"),
        );
        check_path(
            &format!("/v2/library/nginx/manifests/{digest}"),
            ok("library/nginx", Kind::Manifest, &digest),
        );
        check_path(
            &format!("/v2/a/blobs/{digest}"),
            ok("a", Kind::Blob, &digest),
        );
        // A repository may contain the words `blobs` and `manifests`.
        check_path(
            &format!("/v2/x/blobs/manifests/y/blobs/{digest}"),
            ok("x/blobs/manifests/y", Kind::Blob, &digest),
        );
        check_path(
            "/v2/a.b_c__d---e/f0/manifests/_Tag.-1",
            ok("a.b_c__d---e/f0", Kind::Manifest, "_Tag.-1"),
        );

        let unsupported = Err(ParseError::Unsupported);
        for path in [
            "/v2/",
            "/v2",
            "/v3/a/manifests/latest",
            "/v2/_catalog",
            "/v2/a/tags/list",
            "/v2/a/blobs/uploads/",
            "/v2/manifests/latest",
            "/v2/../../etc/passwd",
            "/v2/a/referrers/x",
            "v2/a/manifests/latest",
        ] {
            check_path(path, unsupported.clone());
        }
    }

    #[test]
    fn object_path_rejections() {
        let name = |path: &str| {
            assert!(
                matches!(parse_object_path(path), Err(ParseError::Name(_))),
                "{path:?} must be a name error"
            );
        };
        name("/v2/../manifests/latest");
        name("/v2/a/../b/manifests/latest");
        name("/v2/%2e%2e/manifests/latest");
        name("/v2/a/%2e%2e/manifests/latest");
        name("/v2//a/manifests/latest");
        name("/v2/a//b/manifests/latest");
        name("/v2/a//manifests/latest");
        name("/v2/Library/nginx/manifests/latest");
        name("/v2/a./manifests/latest");
        name("/v2/.a/manifests/latest");
        name("/v2/a..b/manifests/latest");
        name("/v2/a___b/manifests/latest");
        name("/v2/a._b/manifests/latest");
        name("/v2/a-/manifests/latest");
        name("/v2/a b/manifests/latest");
        name("/v2/naïve/manifests/latest");
        name(&format!("/v2/{}/manifests/latest", "a".repeat(256)));
        name(&format!("/v2/{}/manifests/latest", "a/".repeat(2000)));
        check_path(
            &format!("/v2/{}/manifests/x", "a".repeat(255)),
            Ok(("a".repeat(255).leak(), Kind::Manifest, "x")),
        );

        let tag = Err(ParseError::Tag);
        check_path("/v2/a/manifests/", tag.clone());
        check_path("/v2/a/manifests/.tag", tag.clone());
        check_path("/v2/a/manifests/-tag", tag.clone());
        check_path("/v2/a/manifests/ta%67", tag.clone());
        check_path("/v2/a/manifests/..", tag.clone());
        check_path(&format!("/v2/a/manifests/{}", "t".repeat(129)), tag.clone());
        check_path(
            &format!("/v2/a/manifests/{}", "t".repeat(128)),
            Ok(("a", Kind::Manifest, "t".repeat(128).leak())),
        );

        check_path("/v2/a/blobs/latest", Err(ParseError::BlobTag));
        check_path(
            "/v2/a/blobs/sha256:abc",
            Err(ParseError::Digest(DigestError::BadHex)),
        );
        check_path(
            &format!("/v2/a/blobs/sha256:{}", HEX.to_uppercase()),
            Err(ParseError::Digest(DigestError::BadHex)),
        );
        // The traversal is split on `/`: `etc` is not a kind, so it is not a pull at all.
        check_path(
            "/v2/a/blobs/sha256:../../../etc/passwd",
            Err(ParseError::Unsupported),
        );
        check_path(
            "/v2/a/blobs/sha256:..%2f..%2fetc",
            Err(ParseError::Digest(DigestError::BadHex)),
        );
        check_path(
            &format!("/v2/a/manifests/sha512:{HEX}"),
            Err(ParseError::Digest(DigestError::UnsupportedAlgorithm)),
        );
    }

    #[test]
    fn repositories_and_tags() {
        assert!(validate_repository("a").is_ok());
        assert!(validate_repository("0/1/2").is_ok());
        assert!(validate_repository("a-b--c").is_ok());
        assert!(validate_repository("").is_err());
        assert!(validate_repository("/a").is_err());
        assert!(validate_repository("a/").is_err());
        assert!(validate_repository("a_").is_err());
        assert!(validate_repository("a__").is_err());
        assert!(validate_repository("a.-b").is_err());
        assert!(validate_repository("a-.b").is_err());
        assert!(validate_repository("a\0").is_err());
        assert!(validate_tag("latest").is_ok());
        assert!(validate_tag("_").is_ok());
        assert!(validate_tag("").is_err());
        assert!(validate_tag("a/b").is_err());
        assert!(validate_tag("a:b").is_err());
        assert!(validate_tag("a\u{e9}").is_err());
        assert_eq!(
            parse_reference("sha256:x"),
            Err(ParseError::Digest(DigestError::BadHex))
        );
        assert_eq!(
            parse_reference(":"),
            Err(ParseError::Digest(DigestError::UnsupportedAlgorithm))
        );
    }
}
