//! spegel: a node daemon that serves container image content peer to peer.
//!
//! See ARCHITECTURE.md at the repository root for the bird's eye view and the code map.

pub mod buffered;
pub mod ca;
pub mod config;
pub mod daemon;
pub mod digest;
pub mod ebpf;
pub mod fault;
pub mod fetch;
pub mod intercept;
pub mod local;
pub mod metrics;
pub mod mirror;
pub mod oci;
pub mod registry;
pub mod routing;
pub mod serve;
pub mod source;
pub mod store;
pub mod tls;
pub mod transparent;
pub mod upstream;
