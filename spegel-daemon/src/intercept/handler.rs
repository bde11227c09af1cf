//! What serves a connection to a mirrored registry: the [`MirroredHandler`] seam, and the
//! fallback that passes such connections through like any other.
use tokio::net::TcpStream;

use crate::{intercept::splice, source::Origin};

/// Serves connections to mirrored registries. Implementations terminate TLS (when
/// `origin.tls`) and speak the registry API.
#[async_trait::async_trait]
pub trait MirroredHandler: Send + Sync + 'static {
    /// Serves one intercepted connection. `stream` is untouched: what the client sent first
    /// (ClientHello, request head) was only peeked at and is still unread. Errors are the
    /// handler's to log; the connection is closed when `stream` drops.
    async fn handle(&self, stream: TcpStream, origin: Origin);
}

/// The fallback handler: passes mirrored connections through like any other. Also where a
/// handler sends a connection it cannot serve (e.g. a registry its CA does not cover): the
/// first bytes were only peeked at, so the original destination sees them unchanged.
#[derive(Debug, Clone)]
pub struct SpliceHandler {
    /// Time limits of the splice to the original destination.
    pub timeouts: splice::SpliceTimeouts,
}

#[async_trait::async_trait]
impl MirroredHandler for SpliceHandler {
    async fn handle(&self, stream: TcpStream, origin: Origin) {
        match splice::splice(stream, origin.addr, self.timeouts).await {
            Ok(done) => tracing::debug!(up = done.up, down = done.down, "spliced"),
            Err(error) => tracing::debug!(%error, "splice failed"),
        }
    }
}
