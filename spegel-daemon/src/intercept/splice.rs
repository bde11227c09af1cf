//! Passes an intercepted connection through to its original destination untouched: bytes are
//! moved both ways by the kernel (`splice(2)` through a pipe per direction, `kernel.rs`; copied
//! through a buffer only when no pipe can be had), TLS is never decrypted. Whatever the client
//! already sent is still in the socket (it was only peeked at), so nothing needs replaying. A
//! splice that moves no byte either way for its idle timeout is ended, so a dead or parked
//! connection does not hold a slot forever; one whose client reads nothing of what is written
//! to it for the write timeout is ended too (a stuck reader does not hold the destination's
//! bytes in a pipe or buffer forever).
use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    time::Instant,
};
use tokio_io_timeout::TimeoutStream;

mod kernel;

/// Copy buffer per direction; large enough that image layers move in few syscalls.
const COPY_BUFFER: usize = 64 * 1024;

/// Why a splice ended badly.
#[derive(Debug, thiserror::Error)]
pub enum SpliceError {
    #[error("connecting to {dst} timed out")]
    ConnectTimeout { dst: SocketAddr },
    #[error("connecting to {dst}: {source}")]
    Connect {
        dst: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("no byte moved to or from {dst} for {}", humantime::format_duration(*idle))]
    Idle { dst: SocketAddr, idle: Duration },
    #[error("the client read nothing from {dst} for {}", humantime::format_duration(*timeout))]
    WriteTimeout { dst: SocketAddr, timeout: Duration },
    #[error("copying to or from {dst}: {source}")]
    Copy {
        dst: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// Bytes moved by a finished splice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spliced {
    /// Client → destination.
    pub up: u64,
    /// Destination → client.
    pub down: u64,
}

/// The time limits of a splice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpliceTimeouts {
    /// Limit for connecting to the original destination.
    pub connect: Duration,
    /// A splice with no byte read or written either way for this long is ended (both sides
    /// closed).
    pub idle: Duration,
    /// A write to the client that makes no progress for this long ends the splice.
    pub write: Duration,
}

/// Connects to `dst` and copies bytes both ways until both sides are done, until nothing has
/// moved for `timeouts.idle`, or until a write to the client has made no progress for
/// `timeouts.write`. When `dst` cannot be reached, the client's connection is reset, so it fails
/// as fast as a direct connect would have.
pub async fn splice(
    client: TcpStream,
    dst: SocketAddr,
    timeouts: SpliceTimeouts,
) -> Result<Spliced, SpliceError> {
    let connected = tokio::time::timeout(timeouts.connect, TcpStream::connect(dst)).await;
    let upstream = match connected {
        Ok(Ok(upstream)) => upstream,
        Ok(Err(source)) => {
            reset(&client);
            return Err(SpliceError::Connect { dst, source });
        }
        Err(_) => {
            reset(&client);
            return Err(SpliceError::ConnectTimeout { dst });
        }
    };
    // Registry traffic is request/response: don't let Nagle hold back small writes.
    let _ = upstream.set_nodelay(true);
    let _ = client.set_nodelay(true);
    let last = Arc::new(Mutex::new(Instant::now()));
    let moved = || *last.lock().unwrap_or_else(PoisonError::into_inner) = Instant::now();
    let pipes = kernel::Pipe::new().and_then(|up| Ok((up, kernel::Pipe::new()?)));
    let copy = async {
        match pipes {
            Ok((up, down)) => tokio::try_join!(
                kernel::pump(&client, &upstream, &up, None, &moved),
                kernel::pump(&upstream, &client, &down, Some(timeouts.write), &moved),
            ),
            Err(error) => {
                tracing::debug!(%error, "no pipe for a zero-copy splice; copying instead");
                copy_through_buffers(client, upstream, &last, timeouts.write).await
            }
        }
    };
    tokio::select! {
        copied = copy => copied
            .map(|(up, down)| Spliced { up, down })
            .map_err(|source| {
                // The write timeout's error carries no OS error code (a kernel ETIMEDOUT from
                // the destination's side does).
                if source.kind() == io::ErrorKind::TimedOut && source.raw_os_error().is_none() {
                    SpliceError::WriteTimeout { dst, timeout: timeouts.write }
                } else {
                    SpliceError::Copy { dst, source }
                }
            }),
        () = idle_for(&last, timeouts.idle) => Err(SpliceError::Idle { dst, idle: timeouts.idle }),
    }
    // Both streams drop here, closing both sides.
}

/// The fallback: copies both ways through a buffer per direction, noting transfers in `last`;
/// a write to the client that makes no progress for `write_timeout` fails with `TimedOut`.
async fn copy_through_buffers(
    client: TcpStream,
    upstream: TcpStream,
    last: &Arc<Mutex<Instant>>,
    write_timeout: Duration,
) -> io::Result<(u64, u64)> {
    let mut client = TimeoutStream::new(Active::new(client, last));
    client.set_write_timeout(Some(write_timeout));
    let mut client = Box::pin(client);
    let mut upstream = Active::new(upstream, last);
    tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, COPY_BUFFER, COPY_BUFFER)
        .await
}

/// Completes once `last` (the time of the latest transfer) is `idle` in the past.
async fn idle_for(last: &Mutex<Instant>, idle: Duration) {
    loop {
        let deadline = *last.lock().unwrap_or_else(PoisonError::into_inner) + idle;
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline).await;
    }
}

/// A stream that notes in `last` when it last read or wrote a byte.
struct Active {
    stream: TcpStream,
    last: Arc<Mutex<Instant>>,
}

impl Active {
    fn new(stream: TcpStream, last: &Arc<Mutex<Instant>>) -> Self {
        Self {
            stream,
            last: Arc::clone(last),
        }
    }

    /// Notes a transfer when `moved` bytes is non-zero; passes `poll` through.
    fn note<T>(
        &self,
        poll: Poll<io::Result<T>>,
        moved: impl FnOnce(&T) -> bool,
    ) -> Poll<io::Result<T>> {
        if let Poll::Ready(Ok(value)) = &poll
            && moved(value)
        {
            *self.last.lock().unwrap_or_else(PoisonError::into_inner) = Instant::now();
        }
        poll
    }
}

impl AsyncRead for Active {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.stream).poll_read(cx, buf);
        let after = buf.filled().len();
        self.note(poll, |()| after > before)
    }
}

impl AsyncWrite for Active {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.note(poll, |n| *n > 0)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Makes the drop of `stream` send RST instead of FIN.
fn reset(stream: &TcpStream) {
    if let Err(error) = stream.set_zero_linger() {
        tracing::debug!(%error, "cannot set SO_LINGER 0");
    }
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpListener,
    };

    use super::*;

    const TIMEOUTS: SpliceTimeouts = SpliceTimeouts {
        connect: Duration::from_secs(5),
        idle: Duration::from_secs(60),
        write: Duration::from_secs(60),
    };

    /// A client connected to a listener that splices its one connection to `dst`.
    async fn front(
        dst: SocketAddr,
        timeouts: SpliceTimeouts,
    ) -> (
        TcpStream,
        tokio::task::JoinHandle<Result<Spliced, SpliceError>>,
    ) {
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let front_addr = front.local_addr().unwrap();
        let proxy = tokio::spawn(async move {
            let (s, _) = front.accept().await.unwrap();
            splice(s, dst, timeouts).await
        });
        (TcpStream::connect(front_addr).await.unwrap(), proxy)
    }

    #[tokio::test]
    async fn copies_both_ways_and_half_closes() {
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dst = upstream.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = upstream.accept().await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            s.write_all(&got.repeat(2)).await.unwrap();
        });
        let (mut client, proxy) = front(dst, TIMEOUTS).await;
        client.write_all(b"hello").await.unwrap();
        client.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"hellohello");
        server.await.unwrap();
        assert_eq!(proxy.await.unwrap().unwrap(), Spliced { up: 5, down: 10 });
    }

    /// The fallback without pipes copies through buffers, with the same half-close.
    #[tokio::test]
    async fn fallback_copies_both_ways_and_half_closes() {
        let (mut client, front_side) = loopback_pair().await;
        let (upstream_side, mut server) = loopback_pair().await;
        let last = Arc::new(Mutex::new(Instant::now()));
        let proxy = tokio::spawn(async move {
            copy_through_buffers(front_side, upstream_side, &last, TIMEOUTS.write).await
        });
        client.write_all(b"ping").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"ping");
        server.write_all(b"pong!").await.unwrap();
        server.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"pong!");
        assert_eq!(proxy.await.unwrap().unwrap(), (4, 5));
    }

    async fn loopback_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.unwrap(), b.unwrap().0)
    }

    #[tokio::test]
    async fn unreachable_destination_resets_the_client() {
        // A port nobody listens on: bind, note the port, close.
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dst = closed.local_addr().unwrap();
        drop(closed);
        let (mut client, proxy) = front(dst, TIMEOUTS).await;
        assert!(matches!(
            proxy.await.unwrap(),
            Err(SpliceError::Connect { .. })
        ));
        let mut buf = [0u8; 8];
        let err = client.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    }

    #[tokio::test]
    async fn idle_splice_ends_both_sides() {
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dst = upstream.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = upstream.accept().await.unwrap();
            let mut got = [0u8; 5];
            s.read_exact(&mut got).await.unwrap();
            s.write_all(b"pong").await.unwrap();
            // Then silence; the splice must end this side too.
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).await.unwrap();
            rest
        });
        let idle = Duration::from_millis(200);
        let (mut client, proxy) = front(dst, SpliceTimeouts { idle, ..TIMEOUTS }).await;
        let started = Instant::now();
        client.write_all(b"hello").await.unwrap();
        let mut pong = [0u8; 4];
        client.read_exact(&mut pong).await.unwrap();
        assert_eq!(&pong, b"pong");
        // Neither side sends more: the client sees EOF once the splice gives up.
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut rest))
            .await
            .expect("idle splice was not ended");
        read.unwrap();
        assert!(rest.is_empty());
        assert!(started.elapsed() >= idle);
        assert!(matches!(
            proxy.await.unwrap(),
            Err(SpliceError::Idle { .. })
        ));
        // The destination side was closed as well.
        let rest = tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("destination side still open")
            .unwrap();
        assert!(rest.is_empty());
    }

    /// A client that never reads while the destination keeps sending: once the socket buffers
    /// are full, the write to the client makes no progress and the splice ends, closing both
    /// sides, although bytes moved recently (the idle timeout is far away).
    #[tokio::test]
    async fn stuck_reader_is_closed_by_the_write_timeout() {
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dst = upstream.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = upstream.accept().await.unwrap();
            let chunk = vec![0x42u8; 64 * 1024];
            // Writes until the splice closes this side.
            let mut sent = 0u64;
            while s.write_all(&chunk).await.is_ok() {
                sent += chunk.len() as u64;
            }
            sent
        });
        let write = Duration::from_millis(300);
        let (client, proxy) = front(dst, SpliceTimeouts { write, ..TIMEOUTS }).await;
        let ended = tokio::time::timeout(Duration::from_secs(30), proxy)
            .await
            .expect("the splice to a stuck reader was not ended")
            .unwrap();
        assert!(
            matches!(ended, Err(SpliceError::WriteTimeout { .. })),
            "{ended:?}"
        );
        let sent = tokio::time::timeout(Duration::from_secs(30), server)
            .await
            .expect("destination side still open")
            .unwrap();
        assert!(sent > 0);
        drop(client);
    }
}
