//! The zero-copy way to move a spliced connection's bytes: `splice(2)` from one socket into a
//! pipe and from the pipe into the other socket, so the payload stays in the kernel (page
//! references move, nothing is copied through this process). One pipe per direction, filled
//! only when empty, so a would-block always comes from the socket being waited on.
use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    time::Duration,
};

use tokio::{io::Interest, net::TcpStream};

/// Pipe capacity asked for (the kernel rounds to pages; root may exceed `pipe-max-size`). The
/// default 64 KiB would cost four times the system calls on a fast link.
const PIPE_CAPACITY: usize = 1024 * 1024;
/// What a pipe holds when resizing it is refused.
const DEFAULT_PIPE_CAPACITY: usize = 64 * 1024;

/// A pipe as the in-kernel buffer of one direction.
pub(super) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

impl Pipe {
    /// A non-blocking pipe, as large as the kernel allows up to 1 MiB.
    pub(super) fn new() -> io::Result<Self> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: pipe2 writes two descriptors into the array, which lives for the call.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nothing else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let wanted = libc::c_int::try_from(PIPE_CAPACITY).unwrap_or(libc::c_int::MAX);
        // SAFETY: fcntl on a descriptor owned above; F_SETPIPE_SZ takes an int argument.
        let got = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, wanted) };
        let capacity = usize::try_from(got)
            .ok()
            .filter(|c| *c > 0)
            .unwrap_or(DEFAULT_PIPE_CAPACITY);
        Ok(Self {
            read,
            write,
            capacity,
        })
    }
}

/// One `splice(2)` call between `from` and `to`, both pipes or sockets (no offsets), without
/// blocking.
fn splice_once(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are borrowed from owners that outlive the call; null offsets are
    // what splice takes for pipes and sockets.
    let moved = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    usize::try_from(moved).map_err(|_| io::Error::last_os_error())
}

/// Ends the sending side of `stream` (a FIN), as the other side did.
fn shutdown_write(stream: &TcpStream) -> io::Result<()> {
    // SAFETY: the descriptor belongs to `stream`, which is open for the call.
    if unsafe { libc::shutdown(stream.as_raw_fd(), libc::SHUT_WR) } == 0 {
        return Ok(());
    }
    let error = io::Error::last_os_error();
    // The peer is already gone: nothing left to tell it.
    if error.raw_os_error() == Some(libc::ENOTCONN) {
        return Ok(());
    }
    Err(error)
}

/// Moves bytes `from` → `to` through `pipe` until `from` ends (then half-closes `to`); returns
/// how many. Calls `moved` whenever a byte moves. With `write_timeout`, a write to `to` that
/// makes no progress for that long fails with `TimedOut` (no OS error code).
pub(super) async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    pipe: &Pipe,
    write_timeout: Option<Duration>,
    moved: &(dyn Fn() + Sync),
) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        let filled = loop {
            from.readable().await?;
            match from.try_io(Interest::READABLE, || {
                splice_once(from.as_raw_fd(), pipe.write.as_raw_fd(), pipe.capacity)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        };
        if filled == 0 {
            shutdown_write(to)?;
            return Ok(total);
        }
        moved();
        let mut pending = filled;
        while pending > 0 {
            match write_timeout {
                Some(limit) => tokio::time::timeout(limit, to.writable())
                    .await
                    .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??,
                None => to.writable().await?,
            }
            match to.try_io(Interest::WRITABLE, || {
                splice_once(pipe.read.as_raw_fd(), to.as_raw_fd(), pending)
            }) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    pending -= n;
                    total += n as u64;
                    moved();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpListener,
    };

    use super::*;

    /// A connected pair of sockets over loopback.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.unwrap(), b.unwrap().0)
    }

    #[test]
    fn pipes_are_enlarged() {
        let pipe = Pipe::new().unwrap();
        assert!(pipe.capacity >= DEFAULT_PIPE_CAPACITY, "{}", pipe.capacity);
    }

    /// More bytes than several pipes hold, through a reader slower than the writer: every
    /// byte arrives in order and the end is passed on.
    #[tokio::test]
    async fn moves_every_byte_in_order_and_passes_the_end_on() {
        let (mut source, from) = pair().await;
        let (to, mut sink) = pair().await;
        let data: Vec<u8> = (0..5 * PIPE_CAPACITY + 12_345)
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        let expected = data.clone();
        let writer = tokio::spawn(async move {
            source.write_all(&data).await.unwrap();
            source.shutdown().await.unwrap();
            source
        });
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut chunk = vec![0u8; 7_000];
            loop {
                let n = sink.read(&mut chunk).await.unwrap();
                if n == 0 {
                    break got;
                }
                got.extend_from_slice(&chunk[..n]);
                tokio::task::yield_now().await;
            }
        });
        let pipe = Pipe::new().unwrap();
        let moves = std::sync::atomic::AtomicU64::new(0);
        let note = || {
            moves.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        };
        let total = pump(&from, &to, &pipe, None, &note).await.unwrap();
        assert_eq!(total, expected.len() as u64);
        assert!(moves.load(std::sync::atomic::Ordering::Relaxed) > 0);
        let got = reader.await.unwrap();
        assert!(got == expected, "bytes differ");
        drop(writer.await.unwrap());
    }

    /// A destination that reads nothing: the write stalls and fails after the write timeout.
    #[tokio::test]
    async fn a_stalled_destination_times_out() {
        let (mut source, from) = pair().await;
        let (to, _sink) = pair().await;
        let writer = tokio::spawn(async move {
            let chunk = vec![7u8; 256 * 1024];
            while source.write_all(&chunk).await.is_ok() {}
        });
        let pipe = Pipe::new().unwrap();
        let error = pump(&from, &to, &pipe, Some(Duration::from_millis(300)), &|| {})
            .await
            .unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(error.raw_os_error().is_none());
        writer.abort();
    }
}
