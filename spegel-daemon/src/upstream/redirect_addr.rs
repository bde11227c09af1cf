//! Where a redirect may lead: never to loopback, link-local, unspecified or multicast
//! addresses, nor to one of this node's own addresses, unless `--upstream-allow-redirect-to`
//! covers the address. Otherwise a registry (or whoever answers for it) could make the daemon
//! request its own loopback services, the cloud metadata service or the node itself with the
//! daemon's privileges.
//!
//! Checked by the connector on the *resolved* addresses, right before dialling, so a DNS name
//! that resolves to loopback is refused like the literal IP; and a name is refused if *any* of
//! its addresses is (it cannot be a legitimate blob store and also this host). The intercepted
//! origin's own server is not a redirect: it is dialled at the address containerd chose
//! (`Target::pinned`) and never checked here. RFC 1918 addresses are allowed: in-cluster
//! registries redirect to in-cluster storage.
use std::{fmt, io, net::IpAddr, net::SocketAddr, sync::Arc};

use crate::net::{self, Cidr, Special};

/// The redirect address policy: what the operator allows on top of the defaults.
#[derive(Debug, Clone, Default)]
pub(super) struct RedirectAddrs {
    allowed: Arc<[Cidr]>,
}

/// Why a redirect target's address is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    /// Loopback, link-local, unspecified or multicast.
    Special(Special),
    /// One of this node's own addresses.
    OwnAddress,
}

/// A redirect the policy refused: the error the connector fails with.
#[derive(Debug, thiserror::Error)]
#[error(
    "refusing redirect to {host} at {addr}: {reason} (allow with --upstream-allow-redirect-to)"
)]
pub(super) struct RedirectRefused {
    host: String,
    addr: SocketAddr,
    reason: String,
}

impl RedirectAddrs {
    /// Addresses within `allowed` may be redirected to whatever they are.
    pub(super) fn new(allowed: Vec<Cidr>) -> Self {
        Self {
            allowed: allowed.into(),
        }
    }

    /// Fails if any of `addrs` (what `host` resolved to) is refused. This node's addresses are
    /// listed now, not at start: they change.
    pub(super) fn check(&self, host: &str, addrs: &[SocketAddr]) -> io::Result<()> {
        let own = net::local_addrs().map_err(|error| {
            io::Error::new(
                error.kind(),
                format!("cannot list this node's addresses to check a redirect to {host}: {error}"),
            )
        })?;
        for addr in addrs {
            if let Err(refusal) = check(addr.ip(), &own, &self.allowed) {
                let refused = RedirectRefused {
                    host: host.to_owned(),
                    addr: *addr,
                    reason: refusal.to_string(),
                };
                tracing::warn!(%host, %addr, reason = %refusal, "refusing an upstream redirect");
                return Err(io::Error::new(io::ErrorKind::PermissionDenied, refused));
            }
        }
        Ok(())
    }
}

/// Whether a redirect may lead to `ip`, given this node's own addresses and the operator's
/// allowed networks.
pub(super) fn check(ip: IpAddr, own: &[IpAddr], allowed: &[Cidr]) -> Result<(), Refusal> {
    let ip = ip.to_canonical();
    if allowed.iter().any(|cidr| cidr.contains(ip)) {
        return Ok(());
    }
    if let Some(special) = net::special(ip) {
        return Err(Refusal::Special(special));
    }
    if own.iter().any(|own| own.to_canonical() == ip) {
        return Err(Refusal::OwnAddress);
    }
    Ok(())
}

/// The refusal behind an upstream request's error, if it is one.
pub(super) fn refusal_in<'a>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a RedirectRefused> {
    let mut cause = Some(err);
    while let Some(err) = cause {
        if let Some(refused) = err.downcast_ref::<RedirectRefused>() {
            return Some(refused);
        }
        // An `io::Error`'s `source()` skips the error it wraps: step into that one instead.
        cause = match err.downcast_ref::<io::Error>().and_then(io::Error::get_ref) {
            Some(inner) => Some(inner),
            None => err.source(),
        };
    }
    None
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Special(special) => write!(f, "{special} address"),
            Self::OwnAddress => f.write_str("an address of this node"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn redirect_targets_follow_the_policy() {
        use Refusal::{OwnAddress, Special as S};
        let own = [ip("10.0.0.5"), ip("fd00::5"), ip("127.0.0.1")];
        let none: &[&str] = &[];
        // Target, allowed networks, verdict.
        let cases: &[(&str, &[&str], Result<(), Refusal>)] = &[
            ("203.0.113.9", none, Ok(())),
            ("10.0.0.6", none, Ok(())),
            ("192.168.1.1", none, Ok(())),
            ("2001:db8::1", none, Ok(())),
            ("127.0.0.1", none, Err(S(Special::Loopback))),
            ("127.1.2.3", none, Err(S(Special::Loopback))),
            ("::1", none, Err(S(Special::Loopback))),
            ("::ffff:127.0.0.1", none, Err(S(Special::Loopback))),
            ("169.254.169.254", none, Err(S(Special::LinkLocal))),
            ("fe80::1", none, Err(S(Special::LinkLocal))),
            ("0.0.0.0", none, Err(S(Special::Unspecified))),
            ("::", none, Err(S(Special::Unspecified))),
            ("224.0.0.1", none, Err(S(Special::Multicast))),
            ("10.0.0.5", none, Err(OwnAddress)),
            ("::ffff:10.0.0.5", none, Err(OwnAddress)),
            ("fd00::5", none, Err(OwnAddress)),
            // The operator's networks allow anything within them, and nothing else.
            ("127.0.0.1", &["127.0.0.0/8"], Ok(())),
            ("::1", &["127.0.0.0/8"], Err(S(Special::Loopback))),
            ("::1", &["::1"], Ok(())),
            ("169.254.169.254", &["169.254.169.254"], Ok(())),
            (
                "169.254.169.253",
                &["169.254.169.254"],
                Err(S(Special::LinkLocal)),
            ),
            ("10.0.0.5", &["10.0.0.0/24"], Ok(())),
            ("fd00::5", &["10.0.0.0/24"], Err(OwnAddress)),
        ];
        for (target, allowed, want) in cases {
            let allowed: Vec<Cidr> = allowed.iter().map(|s| s.parse().unwrap()).collect();
            assert_eq!(
                check(ip(target), &own, &allowed),
                *want,
                "{target} with {allowed:?}"
            );
        }
    }

    #[test]
    fn refusals_fail_with_a_findable_error() {
        let policy = RedirectAddrs::default();
        let public: SocketAddr = "203.0.113.9:443".parse().unwrap();
        assert!(policy.check("cdn.test", &[public]).is_ok());
        let loopback: SocketAddr = "127.0.0.1:8443".parse().unwrap();
        let err = policy
            .check("cdn.test", &[public, loopback])
            .expect_err("one refused address refuses the name");
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        let refused = refusal_in(&err).expect("the refusal is found");
        assert_eq!(refused.addr, loopback);
        assert_eq!(
            err.to_string(),
            "refusing redirect to cdn.test at 127.0.0.1:8443: loopback address \
             (allow with --upstream-allow-redirect-to)"
        );
        let wrapped = io::Error::other(err);
        assert!(refusal_in(&wrapped).is_some());
        assert!(refusal_in(&io::Error::other("no")).is_none());
        // Allowed by the operator.
        let policy = RedirectAddrs::new(vec!["127.0.0.0/8".parse().unwrap()]);
        assert!(policy.check("cdn.test", &[loopback]).is_ok());
    }
}
