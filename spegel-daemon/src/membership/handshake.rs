//! The libp2p membership proof, run on a noise-secured connection before the multiplexer.
//!
//! Negotiated as `/spegel/member-yamux/1.0.0` in place of yamux: once both sides have proven
//! they hold a cluster secret, the same stream carries yamux. Each side sends a random 32-byte
//! nonce, then one HMAC-SHA256 per secret it holds (a count byte, then the tags) over both
//! nonces, both peer ids and which side it is. The proof cannot be replayed (fresh nonces),
//! relayed to another peer (both noise-authenticated ids are in it) or reflected (the side is in
//! it). A peer whose tags match none of our secrets is disconnected.
use std::{io, iter};

use futures::{AsyncReadExt as _, AsyncWriteExt as _, future::BoxFuture};
use libp2p::{
    PeerId,
    core::{
        UpgradeInfo,
        upgrade::{InboundConnectionUpgrade, OutboundConnectionUpgrade},
    },
    yamux,
};
use ring::hmac;

use super::{ClusterSecrets, MAX_SECRETS, Use};

/// The protocol negotiated in place of yamux.
pub(super) const PROTOCOL: &str = "/spegel/member-yamux/1.0.0";
const NONCE_LEN: usize = 32;
const TAG_LEN: usize = 32;

/// The upgrade: proves membership both ways, then multiplexes with yamux.
#[derive(Clone)]
pub struct MemberUpgrade {
    keys: Vec<hmac::Key>,
    local: PeerId,
    remote: PeerId,
    yamux: yamux::Config,
}

impl MemberUpgrade {
    /// The upgrade of a connection between `local` and the noise-authenticated `remote`.
    /// The keys are derived here: build one per transport and [`Self::to`] per connection.
    pub fn new(secrets: &ClusterSecrets, local: PeerId, remote: PeerId) -> Self {
        let keys = secrets
            .keys(Use::Libp2p)
            .iter()
            .map(|key| hmac::Key::new(hmac::HMAC_SHA256, key))
            .collect();
        Self {
            keys,
            local,
            remote,
            yamux: yamux::Config::default(),
        }
    }

    /// The same upgrade (same keys, no new derivation) for a connection to `remote`.
    pub fn to(&self, remote: PeerId) -> Self {
        Self {
            remote,
            ..self.clone()
        }
    }

    /// What one side signs: `dialer` says whether the proof is the dialer's.
    fn message(dialer: bool, nonces: (&[u8], &[u8]), peers: (&PeerId, &PeerId)) -> Vec<u8> {
        let mut message = b"spegel membership v1".to_vec();
        message.push(if dialer { b'D' } else { b'L' });
        message.extend_from_slice(nonces.0);
        message.extend_from_slice(nonces.1);
        for peer in [peers.0, peers.1] {
            let bytes = peer.to_bytes();
            message.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
            message.extend_from_slice(&bytes);
        }
        message
    }

    /// Runs the proof exchange on `io`; `dialer` says which side this node is.
    async fn prove<C>(&self, io: &mut C, dialer: bool) -> io::Result<()>
    where
        C: futures::AsyncRead + futures::AsyncWrite + Unpin,
    {
        let ours: [u8; NONCE_LEN] = rand::random();
        io.write_all(&ours).await?;
        io.flush().await?;
        let mut theirs = [0; NONCE_LEN];
        io.read_exact(&mut theirs).await?;
        let (nonces, peers) = if dialer {
            ((&ours[..], &theirs[..]), (&self.local, &self.remote))
        } else {
            ((&theirs[..], &ours[..]), (&self.remote, &self.local))
        };
        let mine = Self::message(dialer, nonces, peers);
        let mut proof = vec![self.keys.len() as u8];
        for key in &self.keys {
            proof.extend_from_slice(hmac::sign(key, &mine).as_ref());
        }
        io.write_all(&proof).await?;
        io.flush().await?;

        let mut count = [0];
        io.read_exact(&mut count).await?;
        let count = usize::from(count[0]);
        if count == 0 || count > MAX_SECRETS {
            return Err(refused(&self.remote, "a malformed membership proof"));
        }
        let mut tags = vec![0; count * TAG_LEN];
        io.read_exact(&mut tags).await?;
        let expected = Self::message(!dialer, nonces, peers);
        let member = tags.chunks(TAG_LEN).any(|tag| {
            self.keys
                .iter()
                .any(|key| hmac::verify(key, &expected, tag).is_ok())
        });
        if member {
            Ok(())
        } else {
            Err(refused(
                &self.remote,
                "no proof of a cluster secret we hold",
            ))
        }
    }
}

fn refused(peer: &PeerId, why: &str) -> io::Error {
    tracing::warn!(%peer, "libp2p connection refused: {why}");
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!("peer {peer} is not a cluster member: {why}"),
    )
}

impl UpgradeInfo for MemberUpgrade {
    type Info = &'static str;
    type InfoIter = iter::Once<Self::Info>;

    fn protocol_info(&self) -> Self::InfoIter {
        iter::once(PROTOCOL)
    }
}

impl<C> InboundConnectionUpgrade<C> for MemberUpgrade
where
    C: futures::AsyncRead + futures::AsyncWrite + Send + Unpin + 'static,
{
    type Output = yamux::Muxer<C>;
    type Error = io::Error;
    type Future = BoxFuture<'static, io::Result<Self::Output>>;

    fn upgrade_inbound(self, mut io: C, _: Self::Info) -> Self::Future {
        Box::pin(async move {
            self.prove(&mut io, false).await?;
            self.yamux.upgrade_inbound(io, "/yamux/1.0.0").await
        })
    }
}

impl<C> OutboundConnectionUpgrade<C> for MemberUpgrade
where
    C: futures::AsyncRead + futures::AsyncWrite + Send + Unpin + 'static,
{
    type Output = yamux::Muxer<C>;
    type Error = io::Error;
    type Future = BoxFuture<'static, io::Result<Self::Output>>;

    fn upgrade_outbound(self, mut io: C, _: Self::Info) -> Self::Future {
        Box::pin(async move {
            self.prove(&mut io, true).await?;
            self.yamux.upgrade_outbound(io, "/yamux/1.0.0").await
        })
    }
}

#[cfg(test)]
mod tests {
    use futures::io::{AsyncRead, AsyncWrite};

    use super::*;

    /// Two ends of an in-memory byte pipe.
    fn pipe() -> (
        impl AsyncRead + AsyncWrite + Unpin,
        impl AsyncRead + AsyncWrite + Unpin,
    ) {
        let (a, b) = tokio::io::duplex(4096);
        use tokio_util::compat::TokioAsyncReadCompatExt as _;
        (a.compat(), b.compat())
    }

    async fn handshake(dialer: &[&str], listener: &[&str]) -> (io::Result<()>, io::Result<()>) {
        let (d, l) = (PeerId::random(), PeerId::random());
        let dialer = MemberUpgrade::new(&ClusterSecrets::new(dialer).unwrap(), d, l);
        let listener = MemberUpgrade::new(&ClusterSecrets::new(listener).unwrap(), l, d);
        let (mut a, mut b) = pipe();
        tokio::join!(dialer.prove(&mut a, true), listener.prove(&mut b, false))
    }

    const OLD: &str = "old-secret-0123456789";
    const NEW: &str = "new-secret-0123456789";

    #[tokio::test]
    async fn holders_of_one_secret_accept_each_other() {
        let (d, l) = handshake(&[OLD], &[OLD]).await;
        d.unwrap();
        l.unwrap();
    }

    #[tokio::test]
    async fn a_different_secret_is_refused_on_both_sides() {
        let (d, l) = handshake(&[OLD], &[NEW]).await;
        assert_eq!(d.unwrap_err().kind(), io::ErrorKind::PermissionDenied);
        assert_eq!(l.unwrap_err().kind(), io::ErrorKind::PermissionDenied);
    }

    #[tokio::test]
    async fn every_step_of_a_rotation_accepts_its_neighbours() {
        let steps: [&[&str]; 4] = [&[OLD], &[OLD, NEW], &[NEW, OLD], &[NEW]];
        for pair in steps.windows(2) {
            for (dialer, listener) in [(pair[0], pair[1]), (pair[1], pair[0])] {
                let (d, l) = handshake(dialer, listener).await;
                assert!(d.is_ok() && l.is_ok(), "{dialer:?} -> {listener:?}");
            }
        }
    }

    #[tokio::test]
    async fn a_proof_for_another_peer_is_refused() {
        let secrets = ClusterSecrets::new(&[OLD]).unwrap();
        let (d, l, someone_else) = (PeerId::random(), PeerId::random(), PeerId::random());
        // The dialer believes it talks to `someone_else` (a relayed handshake).
        let dialer = MemberUpgrade::new(&secrets, d, someone_else);
        let listener = MemberUpgrade::new(&secrets, l, d);
        let (mut a, mut b) = pipe();
        let (_, l) = tokio::join!(dialer.prove(&mut a, true), listener.prove(&mut b, false));
        assert_eq!(l.unwrap_err().kind(), io::ErrorKind::PermissionDenied);
    }

    #[tokio::test]
    async fn a_malformed_proof_is_refused() {
        let secrets = ClusterSecrets::new(&[OLD]).unwrap();
        let listener = MemberUpgrade::new(&secrets, PeerId::random(), PeerId::random());
        let (mut a, mut b) = pipe();
        let attacker = async {
            a.write_all(&[7; NONCE_LEN]).await.unwrap();
            a.write_all(&[9]).await.unwrap(); // nine tags: more than anyone holds
            a.flush().await.unwrap();
        };
        let (_, l) = tokio::join!(attacker, listener.prove(&mut b, false));
        assert_eq!(l.unwrap_err().kind(), io::ErrorKind::PermissionDenied);
    }
}
