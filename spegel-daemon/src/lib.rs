//! spegel: a node daemon that serves container image content peer to peer.
//!
//! See ARCHITECTURE.md at the repository root for the bird's eye view and the code map.

pub mod admin;
pub mod body;
pub mod config;
pub mod daemon;
pub mod fault;
#[doc(hidden)]
pub mod fuzzing;
pub mod intercept;
pub mod membership;
pub mod metrics;
pub mod mirror;
pub mod net;
pub mod node_setup;
pub mod oci;
pub mod p2p;
pub mod peers;
pub mod routing;
pub mod serve;
pub mod source;
pub mod store;
pub mod tls;
pub mod upstream;
