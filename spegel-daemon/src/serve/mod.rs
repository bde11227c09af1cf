//! Answering pulls: the policy that orders the sources, the registry HTTP API and its server, and
//! intercepted connections to mirrored registries.

pub mod access;
pub mod api;
mod fallback;
pub mod policy;
pub mod transparent;
