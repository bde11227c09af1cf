//! Test-only fault injection on what this node serves to *peers*: corrupt blob bytes, or throttle
//! them so a test can kill the daemon mid-stream. Wraps a [`Source`]; requests from containerd
//! itself (not `mirrored`) are never touched. [`wedge`] stops the interception accept loop on
//! demand (a wedged, not dead, daemon). Off unless a hidden flag turns it on, and compiled
//! only with the `fault-injection` cargo feature (the end-to-end suite enables it; release
//! builds of the daemon alone do not), so a release binary has no such switch at all.
#![cfg(feature = "fault-injection")]

pub mod switches;
pub mod wedge;

use std::{path::PathBuf, sync::Arc, time::Duration};

use bytes::{Bytes, BytesMut};
use futures::StreamExt as _;

use crate::{
    oci::Kind,
    source::{Object, ObjectRequest, Payload, Source, SourceError},
};

/// Hidden flags: for the end-to-end suite only.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct FaultArgs {
    /// TEST ONLY: flip bytes in every blob served to peers.
    #[arg(long = switches::CORRUPT_PEER_BLOBS_FLAG, env = switches::CORRUPT_PEER_BLOBS_ENV, hide = true)]
    pub test_corrupt_peer_blobs: bool,
    /// TEST ONLY: serve blobs to peers at most this many bytes per second.
    #[arg(long = switches::THROTTLE_PEER_BYTES_FLAG, env = switches::THROTTLE_PEER_BYTES_ENV, hide = true)]
    pub test_throttle_peer_bytes: Option<u64>,
    /// TEST ONLY: while this file exists, the interception listener accepts no connection.
    #[arg(long = switches::WEDGE_INTERCEPT_FILE_FLAG, env = switches::WEDGE_INTERCEPT_FILE_ENV, hide = true)]
    pub test_wedge_intercept_file: Option<PathBuf>,
    /// TEST ONLY: attach the eBPF programs even to a cgroup that contains the daemon's own (the
    /// refusal becomes a warning), to test the programs' exemption of the daemon's cgroup.
    #[arg(long = switches::ATTACH_CONTAINING_CGROUP_FLAG, env = switches::ATTACH_CONTAINING_CGROUP_ENV, hide = true)]
    pub test_attach_containing_cgroup: bool,
}

impl FaultArgs {
    /// Whether any fault on what is served to peers is switched on.
    pub fn any(&self) -> bool {
        self.test_corrupt_peer_blobs || self.test_throttle_peer_bytes.is_some()
    }

    /// The accept-loop wedge switch, when its flag is given (warning loudly).
    pub fn accept_wedge(&self) -> Option<Arc<wedge::AcceptWedge>> {
        let file = self.test_wedge_intercept_file.as_ref()?;
        tracing::warn!(
            file = %file.display(),
            "TEST FAULTS ARE ON: the interception listener stops accepting while this file exists"
        );
        Some(Arc::new(wedge::AcceptWedge::new(file.clone())))
    }
}

/// `local` wrapped in a [`FaultySource`] when any fault is switched on (warning loudly), else
/// `local` itself.
pub fn inject(local: Arc<dyn Source>, args: &FaultArgs) -> Arc<dyn Source> {
    if !args.any() {
        return local;
    }
    tracing::warn!(
        ?args,
        "TEST FAULTS ARE ON: this node misbehaves towards its peers"
    );
    Arc::new(FaultySource::new(local, args.clone()))
}

/// A [`Source`] that misbehaves towards peers as configured.
pub struct FaultySource {
    inner: Arc<dyn Source>,
    args: FaultArgs,
}

impl FaultySource {
    /// Wraps `inner`, misbehaving as `args` say.
    pub fn new(inner: Arc<dyn Source>, args: FaultArgs) -> Self {
        Self { inner, args }
    }
}

/// Size of the slices a throttled body is cut into.
const THROTTLE_SLICE: usize = 16 * 1024;

#[async_trait::async_trait]
impl Source for FaultySource {
    async fn fetch(&self, request: &ObjectRequest) -> Result<Object, SourceError> {
        let mut object = self.inner.fetch(request).await?;
        let rewrites = self.args.test_corrupt_peer_blobs
            || self.args.test_throttle_peer_bytes.is_some_and(|r| r > 0);
        if !request.mirrored || request.kind != Kind::Blob || !rewrites {
            return Ok(object);
        }
        let Some(mut body) = object.body.take() else {
            return Ok(object);
        };
        if self.args.test_corrupt_peer_blobs {
            tracing::warn!(digest = %object.digest, "TEST FAULT: corrupting a blob served to a peer");
            body = Box::pin(body.map(|chunk| {
                chunk.map(|bytes| {
                    let mut flipped = BytesMut::from(&bytes[..]);
                    for b in flipped.iter_mut() {
                        *b ^= 0x5a;
                    }
                    flipped.freeze()
                })
            }));
        }
        if let Some(rate) = self.args.test_throttle_peer_bytes.filter(|r| *r > 0) {
            tracing::warn!(digest = %object.digest, rate, "TEST FAULT: throttling a blob served to a peer");
            let pause = Duration::from_secs_f64(THROTTLE_SLICE as f64 / rate as f64);
            body = Box::pin(
                body.flat_map(|chunk| {
                    let slices: Vec<std::io::Result<Bytes>> = match chunk {
                        Ok(bytes) => (0..bytes.len())
                            .step_by(THROTTLE_SLICE)
                            .map(|i| Ok(bytes.slice(i..(i + THROTTLE_SLICE).min(bytes.len()))))
                            .collect(),
                        Err(err) => vec![Err(err)],
                    };
                    futures::stream::iter(slices)
                })
                .then(move |slice| async move {
                    tokio::time::sleep(pause).await;
                    slice
                }),
            );
        }
        object.body = Payload::Stream(body);
        Ok(object)
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderMap;

    use super::*;
    use crate::oci::{Reference, digest::Digest};

    struct Fixed(Bytes);

    #[async_trait::async_trait]
    impl Source for Fixed {
        async fn fetch(&self, _request: &ObjectRequest) -> Result<Object, SourceError> {
            let bytes = self.0.clone();
            Ok(Object {
                digest: Digest::of(&bytes),
                media_type: "application/octet-stream".into(),
                size: bytes.len() as u64,
                range: None,
                body: Payload::Stream(Box::pin(futures::stream::iter([Ok(bytes)]))),
                source: "local",
            })
        }
    }

    fn request(mirrored: bool) -> ObjectRequest {
        ObjectRequest {
            kind: Kind::Blob,
            registry: None,
            repository: "r".into(),
            reference: Reference::Digest(Digest::of(b"x")),
            range: None,
            head: false,
            headers: HeaderMap::new(),
            origin: None,
            mirrored,
            public_only: false,
        }
    }

    async fn body_of(source: &dyn Source, mirrored: bool) -> Vec<u8> {
        let object = source.fetch(&request(mirrored)).await.unwrap();
        let mut out = Vec::new();
        let mut body = object.body.into_body().unwrap();
        while let Some(chunk) = body.next().await {
            out.extend_from_slice(&chunk.unwrap());
        }
        out
    }

    #[tokio::test]
    async fn corrupts_only_peer_requests() {
        let data = Bytes::from(vec![7u8; 100_000]);
        let args = FaultArgs {
            test_corrupt_peer_blobs: true,
            ..Default::default()
        };
        let source = FaultySource::new(Arc::new(Fixed(data.clone())), args);
        assert_eq!(body_of(&source, false).await, data);
        let corrupted = body_of(&source, true).await;
        assert_eq!(corrupted.len(), data.len());
        assert_ne!(corrupted, data);
    }

    /// Every hidden flag and env twin is in [`switches::ALL`], the list the release check uses.
    #[test]
    fn every_switch_is_listed() {
        #[derive(clap::Parser)]
        struct TestCli {
            #[command(flatten)]
            fault: FaultArgs,
        }
        use clap::CommandFactory as _;
        let command = TestCli::command();
        let mut names: Vec<String> = Vec::new();
        for arg in command.get_arguments() {
            assert!(arg.is_hide_set(), "{:?} is not hidden", arg.get_id());
            names.extend(arg.get_long().map(str::to_owned));
            names.extend(arg.get_env().map(|e| e.to_string_lossy().into_owned()));
        }
        names.sort();
        let mut listed: Vec<String> = switches::ALL.iter().map(|s| s.to_string()).collect();
        listed.sort();
        assert_eq!(names, listed);
    }

    #[tokio::test(start_paused = true)]
    async fn throttles_peer_requests_without_changing_bytes() {
        let data = Bytes::from((0..200_000u32).map(|i| i as u8).collect::<Vec<_>>());
        let args = FaultArgs {
            test_throttle_peer_bytes: Some(100_000),
            ..Default::default()
        };
        let source = FaultySource::new(Arc::new(Fixed(data.clone())), args);
        let start = tokio::time::Instant::now();
        assert_eq!(body_of(&source, true).await, data);
        // 200 000 bytes at 100 000 B/s, in 16 KiB slices: at least ~1.9 s of (paused) time.
        assert!(
            start.elapsed() >= Duration::from_millis(1900),
            "{:?}",
            start.elapsed()
        );
    }
}
