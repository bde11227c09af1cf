//! Passes an intercepted connection through to its original destination untouched: bytes are
//! copied both ways, TLS is never decrypted. Whatever the client already sent is still in the
//! socket (it was only peeked at), so nothing needs replaying.
use std::{io, net::SocketAddr, time::Duration};

use tokio::net::TcpStream;

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

/// Connects to `dst` and copies bytes both ways until both sides are done. When `dst` cannot be
/// reached, the client's connection is reset, so it fails as fast as a direct connect would have.
pub async fn splice(
    mut client: TcpStream,
    dst: SocketAddr,
    connect_timeout: Duration,
) -> Result<Spliced, SpliceError> {
    let connected = tokio::time::timeout(connect_timeout, TcpStream::connect(dst)).await;
    let mut upstream = match connected {
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
    tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, COPY_BUFFER, COPY_BUFFER)
        .await
        .map(|(up, down)| Spliced { up, down })
        .map_err(|source| SpliceError::Copy { dst, source })
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
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let front_addr = front.local_addr().unwrap();
        let proxy = tokio::spawn(async move {
            let (s, _) = front.accept().await.unwrap();
            splice(s, dst, Duration::from_secs(5)).await
        });
        let mut client = TcpStream::connect(front_addr).await.unwrap();
        client.write_all(b"hello").await.unwrap();
        client.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"hellohello");
        server.await.unwrap();
        assert_eq!(proxy.await.unwrap().unwrap(), Spliced { up: 5, down: 10 });
    }

    #[tokio::test]
    async fn unreachable_destination_resets_the_client() {
        // A port nobody listens on: bind, note the port, close.
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dst = closed.local_addr().unwrap();
        drop(closed);
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let front_addr = front.local_addr().unwrap();
        let proxy = tokio::spawn(async move {
            let (s, _) = front.accept().await.unwrap();
            splice(s, dst, Duration::from_secs(5)).await
        });
        let mut client = TcpStream::connect(front_addr).await.unwrap();
        assert!(matches!(
            proxy.await.unwrap(),
            Err(SpliceError::Connect { .. })
        ));
        let mut buf = [0u8; 8];
        let err = client.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    }
}
