//! Following containerd: its image events (resubscribing with backoff) and a periodic resync,
//! both turned into debounced walks.
use std::{sync::Arc, time::Duration};

use containerd_client::{
    services::v1::{
        ImageCreate, ImageDelete, ImageUpdate, SubscribeRequest, events_client::EventsClient,
    },
    tonic::{Code, Request},
    types::Envelope,
};
use futures::FutureExt as _;
use prost::Message as _;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{
    Inner,
    api::{ContainerdError, status_error},
};

/// A CRI pull fires several image events within milliseconds; one walk covers them all. Short,
/// because until the walk the image's manifest and tag cannot be found by the next node.
const SETTLE: Duration = Duration::from_millis(50);
/// Under a stream of events (a walk ended less than this ago), walks are at least this far
/// apart: each one reads every image, and back-to-back walks cost CPU and memory.
const DEBOUNCE: Duration = Duration::from_millis(250);
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// An event stream that lived this long was healthy: the next failure starts backing off afresh.
const HEALTHY_STREAM: Duration = Duration::from_secs(30);
const IMAGE_EVENTS_FILTER: &str = r#"topic~="/images/""#;

/// Follows containerd's image events for as long as the store lives, reconnecting with backoff;
/// every event in our namespace (and every reconnect, since events may have been missed) asks
/// for a walk.
pub(super) async fn watch_events(inner: Arc<Inner>, cancel: CancellationToken) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let started = Instant::now();
        let outcome = tokio::select! {
            _ = cancel.cancelled() => return,
            outcome = follow_events(&inner) => outcome,
        };
        if started.elapsed() >= HEALTHY_STREAM {
            backoff = BACKOFF_MIN;
        }
        tracing::warn!(err = %outcome, retry_in = ?backoff, "containerd event stream ended");
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// One event subscription, until it breaks; returns why.
async fn follow_events(inner: &Inner) -> ContainerdError {
    let mut client = EventsClient::new(inner.channel.clone());
    // No namespace header: the subscription sees every namespace, ours is picked below.
    let request = Request::new(SubscribeRequest {
        filters: vec![IMAGE_EVENTS_FILTER.to_owned()],
    });
    // Whatever happened while we were not subscribed needs a walk. Asked for before
    // subscribing: containerd sends the response headers only with the first event, so the
    // subscription cannot be awaited first (nor with a deadline). The walk is debounced, by
    // which time the subscription is in place.
    inner.refresh.notify_one();
    tracing::debug!("subscribing to containerd image events");
    let mut stream = match client.subscribe(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => return status_error("events.subscribe", status),
    };
    loop {
        match stream.message().await {
            Ok(Some(envelope)) => {
                if envelope.namespace == inner.namespace {
                    log_event(&envelope);
                    inner.refresh.notify_one();
                }
            }
            Ok(None) => {
                return ContainerdError::Call {
                    call: "events.subscribe",
                    code: Code::Unavailable,
                    message: "stream closed".to_owned(),
                };
            }
            Err(status) => return status_error("events.subscribe", status),
        }
    }
}

fn log_event(envelope: &Envelope) {
    let Some(event) = &envelope.event else { return };
    // containerd's Any carries the bare message name, without a `type.googleapis.com/` prefix.
    let value = event.value.as_slice();
    let name = match event.type_url.rsplit(['.', '/']).next() {
        Some("ImageCreate") => ImageCreate::decode(value).ok().map(|e| e.name),
        Some("ImageUpdate") => ImageUpdate::decode(value).ok().map(|e| e.name),
        Some("ImageDelete") => ImageDelete::decode(value).ok().map(|e| e.name),
        _ => None,
    };
    tracing::debug!(topic = %envelope.topic, image = name.as_deref().unwrap_or("?"), "containerd image event");
}

/// Walks when asked (debounced) and every `period`; a failed walk keeps the previous index.
pub(super) async fn refresh_loop(inner: Arc<Inner>, cancel: CancellationToken, period: Duration) {
    let mut resync = tokio::time::interval_at(Instant::now() + period, period);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_walk: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = resync.tick() => {}
            _ = inner.refresh.notified() => {
                let busy = last_walk.is_some_and(|at| at.elapsed() < DEBOUNCE);
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(if busy { DEBOUNCE } else { SETTLE }) => {}
                }
                // Requests that arrived while debouncing are covered by this walk.
                let _ = inner.refresh.notified().now_or_never();
            }
        }
        if let Err(err) = inner.rebuild().await {
            tracing::warn!(%err, "walking containerd images failed; keeping the previous keys");
        }
        last_walk = Some(Instant::now());
    }
}
