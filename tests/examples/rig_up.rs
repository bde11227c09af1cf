//! Brings a rig up and keeps it running until Enter is pressed (or stdin closes), printing where
//! everything is: handy for poking at nodes by hand (`ip netns exec <prefix>-n1 ...`).
//!
//! `cargo run -p spegel-tests --example rig_up -- [NODES]` (as root).

use std::io::BufRead;

use spegel_tests::rig::{Endpoint, Rig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let nodes = match std::env::args().nth(1) {
        Some(count) => count.parse()?,
        None => 3,
    };
    let rig = Rig::builder().nodes(nodes).start().await?;
    println!("prefix   {}", rig.prefix());
    println!("subnet   {}", rig.subnet());
    println!("scratch  {}", rig.scratch_dir().display());
    println!(
        "registry {} / {}",
        rig.registry().url(Endpoint::Plain),
        rig.registry().url(Endpoint::Tls)
    );
    for node in rig.nodes() {
        println!(
            "{}       {} {} {}",
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
    println!("press Enter to tear down");
    let stdin = std::io::stdin();
    let _ = tokio::task::spawn_blocking(move || stdin.lock().lines().next()).await;
    rig.shutdown().await
}
