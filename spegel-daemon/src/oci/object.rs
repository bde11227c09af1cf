//! What a pull names: the [`Kind`] of object and the [`Reference`] (tag or digest) it is asked by.
use super::digest::Digest;

/// Manifest or blob: the two kinds of object the pull API serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Manifest,
    Blob,
}

/// What the client named: a tag (manifests only) or a digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    Tag(String),
    Digest(Digest),
}
