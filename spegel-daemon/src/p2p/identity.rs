//! The node's persistent Ed25519 key: `<data-dir>/node.key`, so the peer id survives restarts.
use std::{
    fs,
    io::{self, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::Path,
};

use libp2p::identity::Keypair;

use super::{NODE_KEY_FILE, P2pError};

/// Reads the key in `dir`, or creates the directory and a new key (mode 0600) if there is none.
/// A file that exists but cannot be decoded is an error, never silently replaced: replacing it
/// would change the peer id.
pub(super) fn load_or_create(dir: &Path) -> Result<Keypair, P2pError> {
    let path = dir.join(NODE_KEY_FILE);
    let io_error = |source| P2pError::KeyIo {
        path: path.clone(),
        source,
    };
    match fs::read(&path) {
        Ok(bytes) => {
            let keypair =
                Keypair::from_protobuf_encoding(&bytes).map_err(|e| P2pError::KeyDecode {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            if let Ok(meta) = fs::metadata(&path)
                && meta.permissions().mode() & 0o077 != 0
            {
                tracing::warn!(path = %path.display(), "node key is readable by group or others");
            }
            tracing::debug!(path = %path.display(), "loaded node key");
            Ok(keypair)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::create_dir_all(dir).map_err(io_error)?;
            let keypair = Keypair::generate_ed25519();
            let bytes = keypair
                .to_protobuf_encoding()
                .map_err(|e| P2pError::KeyDecode {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            write_private(dir, &path, &bytes).map_err(io_error)?;
            tracing::info!(path = %path.display(), "created node key");
            Ok(keypair)
        }
        Err(e) => Err(io_error(e)),
    }
}

/// Writes through a temporary file (mode 0600) in `dir` and a rename, so a crash never leaves a
/// truncated key.
fn write_private(dir: &Path, path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = tempfile::Builder::new()
        .prefix(&format!(".{NODE_KEY_FILE}."))
        .permissions(fs::Permissions::from_mode(0o600))
        .tempfile_in(dir)?;
    file.write_all(bytes)?;
    file.as_file().sync_all()?;
    file.persist(path).map_err(|e| e.error)?;
    if let Ok(dir) = fs::File::open(dir) {
        // Best effort: makes the rename durable; some filesystems refuse fsync on directories.
        let _ = dir.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_then_reuses_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("nested");
        let first = load_or_create(&data_dir).unwrap();
        let path = data_dir.join(NODE_KEY_FILE);
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let second = load_or_create(&data_dir).unwrap();
        assert_eq!(first.public().to_peer_id(), second.public().to_peer_id());
        assert!(!data_dir.join("node.key.tmp").exists());
        let files: Vec<_> = fs::read_dir(&data_dir).unwrap().collect();
        assert_eq!(files.len(), 1, "no temporary file is left behind");
    }

    #[test]
    fn corrupt_key_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(NODE_KEY_FILE), b"not a key").unwrap();
        let err = load_or_create(dir.path()).unwrap_err();
        assert!(matches!(err, P2pError::KeyDecode { .. }), "{err}");
        // Still there: a bad key is reported, never replaced.
        assert_eq!(
            fs::read(dir.path().join(NODE_KEY_FILE)).unwrap(),
            b"not a key"
        );
    }
}
