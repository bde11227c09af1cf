//! Brings a rig up and keeps it running until Enter or Ctrl-C, printing where everything is:
//! handy for poking at nodes by hand (`ip netns exec <prefix>-n1 ...`).
//!
//! `cargo run -p spegel-tests --example rig_up -- [NODES]` (as root). Rigs left behind by killed
//! runs are cleaned up first.

use std::io::BufRead;

use spegel_tests::rig::{Endpoint, Rig, cleanup_stale};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let nodes = match std::env::args().nth(1) {
        Some(count) => count.parse()?,
        None => 3,
    };
    for prefix in cleanup_stale()? {
        println!("cleaned up stale rig {prefix}");
    }
    let rig = Rig::builder().nodes(nodes).start().await?;
    println!("prefix   {}", rig.prefix());
    println!("subnet   {}", rig.subnet());
    println!("scratch  {}", rig.scratch_dir().display());
    println!(
        "registry {} / {} ({})",
        rig.registry().url(Endpoint::Plain),
        rig.registry().url(Endpoint::Tls),
        rig.registry().ip()
    );
    for node in rig.nodes() {
        println!(
            "{:<8} {} {} {}",
            node.name(),
            node.netns(),
            node.ip(),
            node.socket().display()
        );
    }
    for image in [&rig.images().small, &rig.images().four, &rig.images().multi] {
        println!(
            "image    {} {}",
            image.reference(Endpoint::Plain),
            image.digest()
        );
    }
    println!("press Enter or Ctrl-C to tear down");
    let enter = tokio::task::spawn_blocking(|| std::io::stdin().lock().lines().next());
    tokio::select! {
        _ = enter => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    rig.shutdown().await
}
