//! Where an intercepted connection was going: the original destination the eBPF programs
//! recorded, and the registry name it stands for.
use std::net::SocketAddr;

use crate::{
    intercept::ebpf::{EbpfError, OrigDstTable},
    source::Origin,
};

/// The registry name an intercepted connection stands for, as image references spell it:
/// `host` when the port is the default for the protocol, else `host:port`.
pub fn origin_registry(origin: &Origin) -> String {
    let default = if origin.tls { 443 } else { 80 };
    let host = if origin.host.contains(':') {
        format!("[{}]", origin.host)
    } else {
        origin.host.clone()
    };
    if origin.addr.port() == default {
        host
    } else {
        format!("{host}:{}", origin.addr.port())
    }
}

/// Where an accepted connection was going.
pub trait OriginalDst: Send + Sync + 'static {
    /// The original destination of the connection accepted from `peer` (once: the record is
    /// consumed); `None` when the connection was not redirected.
    fn take(&self, peer: SocketAddr) -> Result<Option<SocketAddr>, EbpfError>;
}

impl OriginalDst for OrigDstTable {
    fn take(&self, peer: SocketAddr) -> Result<Option<SocketAddr>, EbpfError> {
        OrigDstTable::take(self, peer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_names_from_origins() {
        let o = |addr: &str, host: &str, tls| Origin {
            addr: addr.parse().unwrap(),
            host: host.into(),
            tls,
        };
        assert_eq!(
            origin_registry(&o("1.2.3.4:443", "ghcr.io", true)),
            "ghcr.io"
        );
        assert_eq!(origin_registry(&o("1.2.3.4:5000", "reg", true)), "reg:5000");
        assert_eq!(origin_registry(&o("1.2.3.4:80", "reg", false)), "reg");
        assert_eq!(origin_registry(&o("1.2.3.4:443", "reg", false)), "reg:443");
        assert_eq!(
            origin_registry(&o("[fd00::1]:5000", "fd00::1", false)),
            "[fd00::1]:5000"
        );
    }
}
