//! Bounds on the registry API's connections: how many connections one client IP may hold at
//! once, when a connection with no request in flight has been idle long enough to close, and
//! when one whose client stopped reading has made no progress long enough to close.
use std::{
    collections::HashMap,
    net::IpAddr,
    num::NonZeroUsize,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    task::{Context, Poll},
    time::Duration,
};

use http_body::{Body, Frame, SizeHint};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    time::Instant,
};
use tokio_io_timeout::TimeoutStream;

/// Connection slots per client IP: at most `max` connections from one address at once.
#[derive(Debug)]
pub(super) struct ClientSlots {
    max: usize,
    held: Mutex<HashMap<IpAddr, usize>>,
}

impl ClientSlots {
    /// Slots for at most `max` connections per client IP.
    pub(super) fn new(max: NonZeroUsize) -> Arc<Self> {
        Arc::new(Self {
            max: max.get(),
            held: Mutex::default(),
        })
    }

    /// A slot for one more connection from `ip`, held until the returned guard drops; `None`
    /// when `ip` already holds every slot it may.
    pub(super) fn take(self: &Arc<Self>, ip: IpAddr) -> Option<ClientSlot> {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let count = held.entry(ip).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(ClientSlot {
            slots: Arc::clone(self),
            ip,
        })
    }

    /// Connections `ip` holds now.
    #[cfg(test)]
    fn held(&self, ip: IpAddr) -> usize {
        let held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        held.get(&ip).copied().unwrap_or(0)
    }
}

/// One connection's slot; gives it back on drop.
#[derive(Debug)]
pub(super) struct ClientSlot {
    slots: Arc<ClientSlots>,
    ip: IpAddr,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut held = self
            .slots
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = held.get_mut(&self.ip) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                held.remove(&self.ip);
            }
        }
    }
}

/// Whether a connection has requests in flight, and since when it has had none.
#[derive(Debug)]
pub(super) struct Activity {
    state: Mutex<ActivityState>,
}

#[derive(Debug)]
struct ActivityState {
    in_flight: usize,
    /// When the last request ended (or the connection began).
    idle_since: Instant,
}

impl Activity {
    /// A connection that starts idle now.
    pub(super) fn new() -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(ActivityState {
                in_flight: 0,
                idle_since: Instant::now(),
            }),
        })
    }

    fn state(&self) -> MutexGuard<'_, ActivityState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts a request as in flight until the returned guard drops.
    pub(super) fn begin(self: &Arc<Self>) -> InFlight {
        self.state().in_flight += 1;
        InFlight(Arc::clone(self))
    }

    /// Completes once the connection has had no request in flight for `idle`.
    pub(super) async fn idle_for(&self, idle: Duration) {
        loop {
            let wake = {
                let state = self.state();
                let now = Instant::now();
                if state.in_flight > 0 {
                    now + idle
                } else {
                    let deadline = state.idle_since + idle;
                    if now >= deadline {
                        return;
                    }
                    deadline
                }
            };
            tokio::time::sleep_until(wake).await;
        }
    }
}

/// A request in flight; when dropped, the connection is idle again from that moment.
#[derive(Debug)]
pub(super) struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut state = self.0.state();
        state.in_flight = state.in_flight.saturating_sub(1);
        state.idle_since = Instant::now();
    }
}

/// A response body that keeps its request in flight until it is sent or dropped.
pub(super) struct Tracked<B> {
    body: B,
    _in_flight: InFlight,
}

impl<B> Tracked<B> {
    pub(super) fn new(body: B, in_flight: InFlight) -> Self {
        Self {
            body,
            _in_flight: in_flight,
        }
    }
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// `io` whose writes (and flushes) fail with [`std::io::ErrorKind::TimedOut`] once one has
/// made no progress for `timeout`: a client that stops reading cannot hold its connection, nor
/// the response it stopped reading, for longer. Reads are not bounded here (the idle and header
/// timeouts do that).
pub(super) fn write_bounded<I>(io: I, timeout: Duration) -> Pin<Box<TimeoutStream<I>>>
where
    I: AsyncRead + AsyncWrite,
{
    let mut io = TimeoutStream::new(io);
    io.set_write_timeout(Some(timeout));
    Box::pin(io)
}

/// Whether `err` (a connection's end) comes from a write that timed out in [`write_bounded`].
pub(super) fn is_write_timeout(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(err);
    while let Some(err) = cause {
        if err
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        cause = err.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_slots_bound_each_address() {
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "::1".parse().unwrap();
        let slots = ClientSlots::new(NonZeroUsize::new(2).unwrap());
        // (address, expect a slot, held afterwards by that address)
        let first = slots.take(a).unwrap();
        let second = slots.take(a).unwrap();
        let cases: [(IpAddr, bool, usize); 3] = [(a, false, 2), (b, true, 1), (a, false, 2)];
        let mut kept = Vec::new();
        for (ip, granted, held) in cases {
            let slot = slots.take(ip);
            assert_eq!(slot.is_some(), granted, "{ip}");
            kept.push(slot);
            assert_eq!(slots.held(ip), held, "{ip}");
        }
        drop(first);
        assert_eq!(slots.held(a), 1);
        let third = slots.take(a);
        assert!(third.is_some());
        drop((second, third, kept));
        assert_eq!(slots.held(a), 0);
        assert_eq!(slots.held(b), 0);
        assert!(slots.held.lock().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn idle_only_counts_without_requests_in_flight() {
        let idle = Duration::from_secs(10);
        let activity = Activity::new();
        let request = activity.begin();
        let started = Instant::now();
        let watcher = {
            let activity = Arc::clone(&activity);
            tokio::spawn(async move { activity.idle_for(idle).await })
        };
        tokio::time::sleep(Duration::from_secs(25)).await;
        assert!(!watcher.is_finished(), "a request in flight is not idle");
        drop(request);
        watcher.await.unwrap();
        assert!(started.elapsed() >= Duration::from_secs(35));
        // Already idle long enough: completes at once.
        let before = Instant::now();
        activity.idle_for(idle).await;
        assert_eq!(before.elapsed(), Duration::ZERO);
    }
}
