//! Claiming a blob at its cold-burst coordinator (`burst`): one small request, authenticated
//! like every other one to a peer.
use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt as _, Empty, Limited};
use tokio::time::Instant;

use super::{Inner, PeerSource, burst};
use crate::{oci::digest::Digest, routing::Peer};

/// `POST http://<coordinator>/spegel/v1/burst/claim/<digest>?by=<me>`.
fn claim_uri(coordinator: &Peer, digest: Digest, me: &str) -> Result<Uri, String> {
    if !burst::valid_peer_id(me) {
        return Err(format!("peer id `{me}` cannot be sent in a claim"));
    }
    let uri = format!(
        "http://{}{}{digest}?by={me}",
        coordinator.addr,
        burst::CLAIM_PATH
    );
    Uri::try_from(uri).map_err(|e| format!("bad claim URI: {e}"))
}

impl Inner {
    async fn claim(&self, coordinator: &Peer, digest: Digest, me: &str) -> Result<String, String> {
        if self.peers.is_banned(&coordinator.id, Instant::now()) {
            return Err("the coordinator is being skipped".into());
        }
        let mut outgoing = Request::builder()
            .method(Method::POST)
            .uri(claim_uri(coordinator, digest, me)?)
            .header(header::USER_AGENT, "spegel")
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("bad claim request: {e}"))?;
        let token = self.sign(&mut outgoing);
        let response = self
            .client
            .request(outgoing)
            .await
            .map_err(|e| format!("claim failed: {e}"))?;
        let status = response.status();
        if !self.authentic(token.as_ref(), &response) {
            return Err(format!(
                "the coordinator's answer ({status}) is not authenticated with our cluster secret"
            ));
        }
        if status != StatusCode::OK {
            return Err(format!("the coordinator answered {status}"));
        }
        let body = Limited::new(response.into_body(), burst::MAX_PEER_ID_LEN)
            .collect()
            .await
            .map_err(|e| format!("cannot read the coordinator's answer: {e}"))?
            .to_bytes();
        match std::str::from_utf8(&body) {
            Ok(holder) if burst::valid_peer_id(holder) => Ok(holder.to_owned()),
            _ => Err("the coordinator's answer is not a peer id".into()),
        }
    }
}

#[async_trait::async_trait]
impl burst::Claimer for PeerSource {
    async fn claim(&self, coordinator: &Peer, digest: Digest, me: &str) -> Result<String, String> {
        self.inner.claim(coordinator, digest, me).await
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    #[test]
    fn the_claim_uri_names_digest_and_claimant_and_refuses_odd_ids() {
        let coordinator = Peer {
            id: "12D3KooWcoord".into(),
            addr: SocketAddr::from(([10, 0, 0, 2], 5000)),
        };
        let digest = Digest::of(b"blob");
        let uri = claim_uri(&coordinator, digest, "12D3KooWme").unwrap();
        assert_eq!(
            uri.to_string(),
            format!("http://10.0.0.2:5000/spegel/v1/burst/claim/{digest}?by=12D3KooWme")
        );
        for bad in ["", "a&by=b", "a b", "x/../y", &"a".repeat(200)] {
            assert!(claim_uri(&coordinator, digest, bad).is_err(), "{bad:?}");
        }
    }
}
