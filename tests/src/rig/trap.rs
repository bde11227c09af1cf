//! A [`Trap`]: a TCP listener in a node's network namespace that counts the connections it
//! accepts and closes them at once, to prove nothing connected where nothing should (a peer's
//! announced loopback address, a redirect's target).
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context as _, Result};
use tokio::net::TcpListener;

use super::Node;
use super::faultproxy::listen_in_netns;

/// The running trap; stopped when dropped.
#[derive(Debug)]
pub struct Trap {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Trap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Trap {
    /// Listens on `addr` in `node`'s namespace (the address must be configured there: a
    /// loopback one always is).
    pub async fn start(node: &Node, addr: SocketAddr) -> Result<Self> {
        let netns = node.netns().to_owned();
        let listener = tokio::task::spawn_blocking(move || listen_in_netns(&netns, addr))
            .await
            .context("listener thread failed")??;
        let listener = TcpListener::from_std(listener).context("registering the trap")?;
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&accepted);
        let task = tokio::spawn(async move {
            while let Ok((stream, from)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tracing::info!(%addr, %from, "trap: connection");
                drop(stream);
            }
        });
        Ok(Self {
            addr,
            accepted,
            task,
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}
