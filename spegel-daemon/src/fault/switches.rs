//! The names of the test-only fault switches, written once: the daemon's hidden flags and their
//! env twins are declared with these, and `cargo xtask test` fails when a release binary contains
//! any of them. xtask compiles this file too (`#[path]`), so it must stay free of dependencies.

/// Flag (without `--`) that corrupts blobs served to peers.
pub const CORRUPT_PEER_BLOBS_FLAG: &str = "test-corrupt-peer-blobs";
/// Environment twin of [`CORRUPT_PEER_BLOBS_FLAG`].
pub const CORRUPT_PEER_BLOBS_ENV: &str = "SPEGEL_TEST_CORRUPT_PEER_BLOBS";
/// Flag (without `--`) that throttles blobs served to peers.
pub const THROTTLE_PEER_BYTES_FLAG: &str = "test-throttle-peer-bytes";
/// Environment twin of [`THROTTLE_PEER_BYTES_FLAG`].
pub const THROTTLE_PEER_BYTES_ENV: &str = "SPEGEL_TEST_THROTTLE_PEER_BYTES";
/// Flag (without `--`) naming a file whose presence stops the interception accept loop.
pub const WEDGE_INTERCEPT_FILE_FLAG: &str = "test-wedge-intercept-file";
/// Environment twin of [`WEDGE_INTERCEPT_FILE_FLAG`].
pub const WEDGE_INTERCEPT_FILE_ENV: &str = "SPEGEL_TEST_WEDGE_INTERCEPT_FILE";

/// Flag (without `--`) that lets the daemon attach to a cgroup containing its own (warning).
pub const ATTACH_CONTAINING_CGROUP_FLAG: &str = "test-attach-containing-cgroup";
/// Environment twin of [`ATTACH_CONTAINING_CGROUP_FLAG`].
pub const ATTACH_CONTAINING_CGROUP_ENV: &str = "SPEGEL_TEST_ATTACH_CONTAINING_CGROUP";

/// Every fault flag and env name; none of them may appear in a release binary.
pub const ALL: &[&str] = &[
    CORRUPT_PEER_BLOBS_FLAG,
    CORRUPT_PEER_BLOBS_ENV,
    THROTTLE_PEER_BYTES_FLAG,
    THROTTLE_PEER_BYTES_ENV,
    WEDGE_INTERCEPT_FILE_FLAG,
    WEDGE_INTERCEPT_FILE_ENV,
    ATTACH_CONTAINING_CGROUP_FLAG,
    ATTACH_CONTAINING_CGROUP_ENV,
];
