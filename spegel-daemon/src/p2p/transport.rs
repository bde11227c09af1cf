//! The libp2p transport: TCP (with `/dns` multiaddrs when the system resolver config is readable)
//! or the in-process memory transport, each authenticated with noise and multiplexed with yamux;
//! with cluster secrets, both sides prove membership before yamux
//! ([`crate::membership::MemberUpgrade`]) and a peer that cannot is disconnected.
use std::time::Duration;

use futures::{AsyncRead, AsyncWrite};
use libp2p::{
    PeerId, Transport,
    core::{
        muxing::StreamMuxerBox,
        transport::{Boxed, MemoryTransport},
        upgrade::Version,
    },
    dns,
    identity::Keypair,
    noise, tcp, yamux,
};

use super::{P2pError, TransportKind};
use crate::membership::{ClusterSecrets, MemberUpgrade};

/// Limit on connection setup (TCP/memory + noise + yamux).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(20);

/// The transport the swarm runs over.
pub(super) type BoxedTransport = Boxed<(PeerId, StreamMuxerBox)>;

/// Builds the transport of `kind`, authenticated with `keypair`, and only to holders of
/// `secrets` when there are any.
pub(super) fn build(
    kind: TransportKind,
    keypair: &Keypair,
    secrets: Option<&ClusterSecrets>,
) -> Result<BoxedTransport, P2pError> {
    let noise = noise::Config::new(keypair).map_err(|e| P2pError::Transport(e.to_string()))?;
    let local = keypair.public().to_peer_id();
    let secrets = secrets.cloned();
    Ok(match kind {
        TransportKind::Memory => upgrade(MemoryTransport::default(), noise, local, secrets),
        TransportKind::Tcp => {
            let tcp_config = tcp::Config::new().nodelay(true);
            match dns::tokio::Transport::system(tcp::tokio::Transport::new(tcp_config.clone())) {
                Ok(transport) => upgrade(transport, noise, local, secrets),
                Err(error) => {
                    tracing::warn!(%error, "no system DNS config; /dns multiaddrs cannot be dialed");
                    upgrade(
                        tcp::tokio::Transport::new(tcp_config),
                        noise,
                        local,
                        secrets,
                    )
                }
            }
        }
    })
}

/// Authenticates (noise), proves membership (with `secrets`) and multiplexes (yamux) a raw
/// transport, bounding the handshake.
fn upgrade<T>(
    transport: T,
    noise: noise::Config,
    local: PeerId,
    secrets: Option<ClusterSecrets>,
) -> BoxedTransport
where
    T: Transport + Send + Unpin + 'static,
    T::Output: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    T::Dial: Send + 'static,
    T::ListenerUpgrade: Send + 'static,
    T::Error: Send + Sync + 'static,
{
    let authenticated = transport.upgrade(Version::V1).authenticate(noise);
    match secrets {
        Some(secrets) => {
            // Keys derived once; each connection's upgrade only names its remote peer.
            let member = MemberUpgrade::new(&secrets, local, local);
            authenticated
                .multiplex_ext(move |remote, _| member.to(*remote))
                .timeout(HANDSHAKE_TIMEOUT)
                .boxed()
        }
        None => authenticated
            .multiplex(yamux::Config::default())
            .timeout(HANDSHAKE_TIMEOUT)
            .boxed(),
    }
}
