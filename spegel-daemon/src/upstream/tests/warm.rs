//! Dialling an upstream ahead of a request (`UpstreamClient::warm_up`), against the TLS fake:
//! the request takes the connection dialled ahead, nothing is dialled for an upstream used
//! moments ago, and a connection nothing takes is closed.
use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use super::{Connections, Fake, blob_handler, fake, origin, pki, request};
use crate::{
    oci::{Kind, Reference, digest::Digest},
    source::Source as _,
    upstream::{Timeouts, UpstreamClient, UpstreamSource, connect::WARM_KEEP},
};

/// Waits (2 s at most) until `check` holds for the fake's connections.
async fn until(fake: &Fake, what: &str, check: impl Fn(&Connections) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while !check(&fake.connections) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the registry never saw {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The client's dials ahead: started, taken, failed.
fn counts(client: &UpstreamClient) -> [u64; 3] {
    let dials = client.dials_ahead();
    [&dials.started, &dials.taken, &dials.failed].map(|n| n.load(Ordering::SeqCst))
}

fn accepted(fake: &Fake) -> usize {
    fake.connections.accepted.load(Ordering::SeqCst)
}

/// The TLS fake serving the test blob, and a client trusting it whose dials ahead wait `keep`.
async fn registry_and_client(keep: Duration) -> (Fake, UpstreamClient) {
    let pki = pki();
    let registry = fake(Some(Arc::clone(&pki.server)), blob_handler()).await;
    let client = UpstreamClient::with_warm_keep(pki.roots, Timeouts::default(), keep).unwrap();
    (registry, client)
}

/// Fetches the test blob from `registry` through `client`; it must arrive whole.
async fn fetch_blob(client: &UpstreamClient, registry: &Fake) {
    let request = request(
        Kind::Blob,
        Reference::Digest(Digest::of(super::BLOB)),
        Some(origin(registry, true)),
    );
    let object = UpstreamSource::new(client.clone())
        .fetch(&request)
        .await
        .unwrap();
    let body = super::collect(object.body.into_body().unwrap()).await;
    assert_eq!(body.unwrap(), super::BLOB);
}

#[tokio::test]
async fn the_first_request_takes_the_connection_dialled_ahead() {
    let (registry, client) = registry_and_client(WARM_KEEP).await;
    assert!(client.warm_up(&origin(&registry, true)));
    // Dialled before any request was made...
    until(&registry, "the connection dialled ahead", |c| {
        c.accepted.load(Ordering::SeqCst) == 1
    })
    .await;
    // ...and a second warm-up while it waits adds nothing.
    assert!(!client.warm_up(&origin(&registry, true)));
    fetch_blob(&client, &registry).await;
    assert_eq!(registry.seen().len(), 1);
    assert_eq!(accepted(&registry), 1, "the request dialled again");
    assert_eq!(counts(&client), [1, 1, 0]);
}

#[tokio::test]
async fn a_request_waits_for_the_dial_ahead_in_progress() {
    let (registry, client) = registry_and_client(WARM_KEEP).await;
    // The request comes at once, while the connection dialled ahead is still being set up.
    assert!(client.warm_up(&origin(&registry, true)));
    fetch_blob(&client, &registry).await;
    assert_eq!(accepted(&registry), 1, "the request dialled again");
}

#[tokio::test]
async fn an_upstream_used_moments_ago_is_not_dialled_ahead() {
    let (registry, client) = registry_and_client(WARM_KEEP).await;
    fetch_blob(&client, &registry).await;
    // The pool holds that connection: nothing to dial ahead.
    assert!(!client.warm_up(&origin(&registry, true)));
    fetch_blob(&client, &registry).await;
    assert_eq!(accepted(&registry), 1);
}

#[tokio::test]
async fn a_connection_nothing_takes_is_closed() {
    let (registry, client) = registry_and_client(Duration::from_millis(200)).await;
    assert!(client.warm_up(&origin(&registry, true)));
    until(&registry, "the connection dialled ahead", |c| {
        c.accepted.load(Ordering::SeqCst) == 1
    })
    .await;
    until(&registry, "the unused connection closed", |c| {
        c.ended.load(Ordering::SeqCst) == 1
    })
    .await;
    // Gone from the client too: the next request dials its own connection and succeeds.
    fetch_blob(&client, &registry).await;
    assert_eq!(accepted(&registry), 2);
    assert_eq!(
        counts(&client),
        [1, 0, 0],
        "counted as neither taken nor failed"
    );
}

#[tokio::test]
async fn a_failed_dial_ahead_leaves_the_request_its_own_dial() {
    let (registry, client) = registry_and_client(WARM_KEEP).await;
    // Dialled ahead under a name the registry's certificate does not carry: the handshake
    // fails. The request to the real name dials itself and is answered.
    let mut wrong = origin(&registry, true);
    wrong.host = "other.test".into();
    assert!(client.warm_up(&wrong));
    until(&registry, "the failed handshake end", |c| {
        c.ended.load(Ordering::SeqCst) == 1
    })
    .await;
    // A failed upstream is not dialled ahead again for a while.
    assert!(!client.warm_up(&wrong));
    fetch_blob(&client, &registry).await;
    assert_eq!(accepted(&registry), 2);
    assert_eq!(counts(&client), [1, 0, 1]);
}
