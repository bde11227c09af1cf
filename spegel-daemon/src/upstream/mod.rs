//! The upstream registry: a [`Source`](crate::source::Source) for transparently intercepted pulls
//! (content verified against its digest), and verbatim passthrough of every other intercepted
//! request.
//!
//! Intercepted requests go to the address containerd originally dialled (`Origin::addr`), with
//! the real host name for SNI, `Host` and certificate verification; redirects to other hosts
//! (blob storage, CDNs) are resolved with DNS as usual. Connections are pooled per
//! (scheme, host, dialled address) by hyper-util's client: the target is encoded into a
//! synthetic authority that only our connector understands and that never reaches the wire.
//!
//! The files, top-down: `source` (object requests → upstream requests → verified objects) and
//! `client` (passthrough, and the request loop that follows redirects) use `redirect` (the
//! redirect policy, a pure decision), `redirect_addr` (where redirects may lead, checked on
//! the resolved addresses when dialling), `hop_by_hop`, `body` (reading answers), `connect` and
//! `target` (dialling, the synthetic authority) and `trust` (CA roots, TLS configuration);
//! `args` and `error` are the flags and the failures. `backoff` (with `retry_after`) remembers
//! which registries failed or asked for a pause, for the serve policy; `resume` continues a
//! blob body that stalls or breaks with `Range`.

mod args;
mod backoff;
mod body;
mod client;
mod connect;
mod error;
pub(crate) mod hop_by_hop;
mod reachability;
pub(crate) mod redirect;
mod redirect_addr;
mod resume;
pub(crate) mod retry_after;
mod source;
pub(crate) mod target;
mod trust;

pub use args::{Timeouts, UpstreamArgs};
pub use backoff::Backoff;
pub use client::UpstreamClient;
pub use connect::DialsAhead;
pub use error::UpstreamError;
pub use reachability::Reachability;
pub use source::UpstreamSource;

#[cfg(test)]
mod tests;
