//! The listener's self-probe: the daemon connects to its own interception listener on loopback
//! and the connection must be accepted within a deadline. The kernel completes the handshake
//! whether or not the daemon calls `accept()`, so only the accept loop can answer: a probe that
//! is not accepted in time means the loop is stuck (or waits for a free slot).
//!
//! A probe is recognised by the listener through the [`ProbeBook`] (its local address is
//! registered before it connects) and closed at once, before any original-destination lookup,
//! sniffing, counting, splicing or serving. The eBPF programs never redirect it: it is the
//! daemon's own connect, to the listener itself.
use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    sync::{Mutex, PoisonError},
    time::Duration,
};

use tokio::{net::TcpSocket, sync::oneshot, time::Instant};

/// Probes connected but not yet accepted are remembered at most this long: the listener
/// accepts them late once it recovers, and must still recognise them.
const REMEMBER: Duration = Duration::from_secs(120);
/// At most this many probes waiting to be accepted; when the book is full the listener is
/// clearly not accepting, and no further probe connections are made.
const MAX_PENDING: usize = 256;

#[derive(Debug)]
struct Pending {
    registered: Instant,
    accepted: Option<oneshot::Sender<()>>,
}

/// The probe connections made and not yet accepted, by their local address (the peer address
/// the listener sees).
#[derive(Debug, Default)]
pub struct ProbeBook(Mutex<HashMap<SocketAddr, Pending>>);

impl ProbeBook {
    /// Called by the listener for every accepted connection: whether `peer` is a probe (then
    /// the caller closes it without further ado).
    pub fn accepted(&self, peer: SocketAddr) -> bool {
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        let Some(pending) = self.lock().remove(&peer) else {
            return false;
        };
        if let Some(tx) = pending.accepted {
            let _ = tx.send(()); // the prober may have given up
        }
        true
    }

    /// Probes still waiting to be accepted.
    pub fn pending(&self) -> usize {
        self.lock().len()
    }

    fn register(&self, local: SocketAddr) -> Option<oneshot::Receiver<()>> {
        let mut book = self.lock();
        let now = Instant::now();
        book.retain(|_, p| now.saturating_duration_since(p.registered) < REMEMBER);
        if book.len() >= MAX_PENDING {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        book.insert(
            local,
            Pending {
                registered: now,
                accepted: Some(tx),
            },
        );
        Some(rx)
    }

    fn forget(&self, local: SocketAddr) {
        self.lock().remove(&local);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Pending>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// How a probe went.
#[derive(Debug)]
pub enum Probed {
    /// Accepted within the deadline.
    Accepted,
    /// Connected but not accepted within the deadline (or too many earlier probes are still
    /// waiting).
    NotAccepted,
    /// Could not even connect (backlog full, listener gone).
    ConnectFailed(io::Error),
}

impl Probed {
    /// Whether the listener passed.
    pub fn is_accepted(&self) -> bool {
        matches!(self, Self::Accepted)
    }
}

/// Connects to the listener at `listener` (loopback) and waits up to `deadline` for the accept
/// loop to take the connection.
pub async fn probe(book: &ProbeBook, listener: SocketAddr, deadline: Duration) -> Probed {
    let (socket, local) = match bind_like(listener) {
        Ok(bound) => bound,
        Err(error) => return Probed::ConnectFailed(error),
    };
    let Some(accepted) = book.register(local) else {
        return Probed::NotAccepted;
    };
    let started = Instant::now();
    let stream = match tokio::time::timeout(deadline, socket.connect(listener)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            book.forget(local);
            return Probed::ConnectFailed(error);
        }
        Err(_) => {
            // Never established, so never in the accept queue.
            book.forget(local);
            return Probed::ConnectFailed(io::ErrorKind::TimedOut.into());
        }
    };
    let left = deadline.saturating_sub(started.elapsed());
    let outcome = match tokio::time::timeout(left, accepted).await {
        Ok(Ok(())) => Probed::Accepted,
        // Still queued: the entry stays, so a late accept recognises it.
        Ok(Err(_)) | Err(_) => Probed::NotAccepted,
    };
    drop(stream);
    outcome
}

/// A socket bound to an ephemeral port on the listener's loopback address.
fn bind_like(listener: SocketAddr) -> io::Result<(TcpSocket, SocketAddr)> {
    let socket = match listener.ip() {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(listener.ip(), 0))?;
    let local = socket.local_addr()?;
    Ok((
        socket,
        SocketAddr::new(local.ip().to_canonical(), local.port()),
    ))
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use tokio::net::TcpListener;

    use super::*;

    #[tokio::test]
    async fn accepted_probe_is_recognised() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let book = std::sync::Arc::new(ProbeBook::default());
        let acceptor = {
            let book = book.clone();
            tokio::spawn(async move {
                let (_stream, peer) = listener.accept().await.unwrap();
                book.accepted(peer)
            })
        };
        let probed = probe(&book, addr, Duration::from_secs(10)).await;
        assert!(probed.is_accepted(), "{probed:?}");
        assert!(
            acceptor.await.unwrap(),
            "the listener did not recognise the probe"
        );
        assert_eq!(book.pending(), 0);
        // Anything else is not a probe.
        assert!(!book.accepted(SocketAddr::from((Ipv4Addr::LOCALHOST, 1))));
    }

    /// A listener nobody accepts on: the probe connects (the kernel answers) but is not
    /// accepted; it stays in the book and is recognised when finally accepted.
    #[tokio::test]
    async fn unaccepted_probe_fails_and_is_recognised_late() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let book = ProbeBook::default();
        let probed = probe(&book, addr, Duration::from_millis(200)).await;
        assert!(matches!(probed, Probed::NotAccepted), "{probed:?}");
        assert_eq!(book.pending(), 1);
        let (_stream, peer) = listener.accept().await.unwrap();
        assert!(book.accepted(peer));
        assert_eq!(book.pending(), 0);
    }

    #[tokio::test]
    async fn nothing_listening_fails_to_connect() {
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = closed.local_addr().unwrap();
        drop(closed);
        let book = ProbeBook::default();
        let probed = probe(&book, addr, Duration::from_secs(5)).await;
        assert!(matches!(probed, Probed::ConnectFailed(_)), "{probed:?}");
        assert_eq!(book.pending(), 0);
    }
}
