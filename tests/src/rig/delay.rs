//! A userspace delay line between two TAP devices: every Ethernet frame read from one is
//! written to the other after a fixed one-way delay, in both directions (these kernels have no
//! `sch_netem`). Bytes are never changed, frames never reordered; throughput is kept because
//! frames in flight queue in the line (a bounded queue per direction, deep enough for a
//! bandwidth-delay product of gigabits × hundreds of milliseconds) instead of being held one at
//! a time. Used by [`shape`](super::shape) to put latency on the registry's link.

use std::fs::{File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Frames one direction may hold in flight (at 1,500 bytes: ~24 MB, i.e. 1 Gbit/s × 190 ms).
const QUEUE_FRAMES: usize = 16_384;
/// Larger than any frame a TAP without offloads hands out.
const FRAME_BUF: usize = 65_536;

/// An open TAP device (`IFF_TAP | IFF_NO_PI`: raw Ethernet frames). Created by opening it and
/// gone when the handle is dropped (not persistent).
#[derive(Debug)]
pub(crate) struct Tap {
    name: String,
    file: File,
}

impl Tap {
    /// Creates TAP device `name` in the network namespace of the calling thread.
    pub(crate) fn create(name: &str) -> Result<Self> {
        ensure!(
            !name.is_empty() && name.len() < libc::IFNAMSIZ,
            "TAP name {name:?} must be 1 to {} bytes",
            libc::IFNAMSIZ - 1
        );
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .context("opening /dev/net/tun")?;
        /// `struct ifreq` as TUNSETIFF reads it: the name, then the flags (a short), padded.
        #[repr(C)]
        struct IfReq {
            name: [u8; libc::IFNAMSIZ],
            flags: libc::c_short,
            _pad: [u8; 22],
        }
        let mut request = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short,
            _pad: [0; 22],
        };
        request.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: `file` is an open /dev/net/tun descriptor and `request` a live, properly
        // sized and NUL-terminated `struct ifreq` that the kernel reads and writes only during
        // the call.
        let rc = unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                libc::TUNSETIFF,
                &mut request as *mut IfReq,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error()).with_context(|| format!("TUNSETIFF {name}"));
        }
        Ok(Self {
            name: name.to_owned(),
            file,
        })
    }

    /// The interface name.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }
}

/// A running delay line; stops (and its TAP devices disappear) on [`DelayLine::stop`] or drop.
#[derive(Debug)]
pub(crate) struct DelayLine {
    tasks: Vec<JoinHandle<()>>,
}

impl DelayLine {
    /// Forwards frames between `a` and `b`, each held for `one_way` before it is written out.
    pub(crate) fn start(a: Tap, b: Tap, one_way: Duration) -> Result<Self> {
        let a = Arc::new(register(a.file)?);
        let b = Arc::new(register(b.file)?);
        let mut tasks = Vec::new();
        for (from, to) in [(Arc::clone(&a), Arc::clone(&b)), (b, a)] {
            let (tx, rx) = mpsc::channel(QUEUE_FRAMES);
            tasks.push(tokio::spawn(read_frames(from, tx, one_way)));
            tasks.push(tokio::spawn(async move {
                let result = release(rx, |frame| write_frame(&to, frame)).await;
                if let Err(error) = result {
                    tracing::warn!(%error, "delay line stopped writing");
                }
            }));
        }
        Ok(Self { tasks })
    }

    /// Stops forwarding and waits until the TAP handles are closed.
    pub(crate) async fn stop(mut self) {
        for task in &self.tasks {
            task.abort();
        }
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
    }
}

impl Drop for DelayLine {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Hands a TAP to tokio's reactor.
fn register(file: File) -> Result<AsyncFd<File>> {
    // SAFETY: the `File` owns its descriptor and moves into the `AsyncFd`, so the descriptor
    // stays open, and is the one `as_raw_fd` returns, until the `AsyncFd` is dropped.
    unsafe { AsyncFd::register(file) }
        .map_err(io::Error::from)
        .context("registering a TAP with tokio")
}

/// Reads frames as they come and queues each with the instant it may leave.
async fn read_frames(
    from: Arc<AsyncFd<File>>,
    tx: mpsc::Sender<(Instant, Vec<u8>)>,
    delay: Duration,
) {
    let mut buf = vec![0u8; FRAME_BUF];
    loop {
        let Ok(mut guard) = from.readable().await else {
            return;
        };
        match guard.try_io(|fd| fd.get_ref().read(&mut buf)) {
            Ok(Ok(n)) => {
                if tx
                    .send((Instant::now() + delay, buf[..n].to_vec()))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Ok(Err(error)) => {
                tracing::warn!(%error, "delay line stopped reading");
                return;
            }
            Err(_would_block) => {}
        }
    }
}

/// Emits every queued frame, in order, no earlier than its release instant.
pub(crate) async fn release(
    mut rx: mpsc::Receiver<(Instant, Vec<u8>)>,
    mut emit: impl FnMut(&[u8]) -> io::Result<()>,
) -> io::Result<()> {
    while let Some((at, frame)) = rx.recv().await {
        tokio::time::sleep_until(at).await;
        emit(&frame)?;
    }
    Ok(())
}

/// One frame to a TAP: the kernel takes it as received on that device. A full device queue
/// drops the frame, as a full link would.
fn write_frame(to: &AsyncFd<File>, frame: &[u8]) -> io::Result<()> {
    match to.get_ref().write(frame) {
        Ok(_) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::WouldBlock => Ok(()),
        // The peer device went down (teardown, link flap): the frame is lost, like on a wire.
        Err(error) if error.raw_os_error() == Some(libc::EIO) => Ok(()),
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn release_keeps_order_bytes_and_delay() {
        let delay = Duration::from_millis(30);
        let (tx, rx) = mpsc::channel(16);
        let sent: Vec<(Instant, Vec<u8>)> = (0..5u8)
            .map(|i| (Instant::now() + delay, vec![i; 100 + usize::from(i)]))
            .collect();
        for item in &sent {
            tx.send(item.clone()).await.unwrap();
        }
        drop(tx);
        let mut got = Vec::new();
        release(rx, |frame| {
            got.push((Instant::now(), frame.to_vec()));
            Ok(())
        })
        .await
        .unwrap();
        assert_eq!(got.len(), sent.len());
        for ((at, frame), (due, want)) in got.iter().zip(&sent) {
            assert_eq!(frame, want, "bytes changed or reordered");
            assert!(at >= due, "released {:?} early", *due - *at);
        }
    }

    #[tokio::test]
    async fn release_stops_on_a_write_error() {
        let (tx, rx) = mpsc::channel(4);
        tx.send((Instant::now(), vec![1])).await.unwrap();
        tx.send((Instant::now(), vec![2])).await.unwrap();
        let mut calls = 0;
        let result = release(rx, |_| {
            calls += 1;
            Err(io::Error::other("gone"))
        })
        .await;
        assert!(result.is_err());
        assert_eq!(calls, 1);
    }

    #[test]
    fn tap_names_are_bounded() {
        assert!(Tap::create("").is_err());
        assert!(Tap::create("a-name-longer-than-15").is_err());
    }
}
