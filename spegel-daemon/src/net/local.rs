//! This node's own interface addresses ([`local_addrs`]), read with `getifaddrs(3)`.
use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

/// Every IP address configured on an interface of this network namespace, now (addresses come
/// and go, so callers ask when they decide, not once at start).
pub fn local_addrs() -> io::Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: `head` is a valid place for getifaddrs to store the list it allocates; the list
    // is freed below, once, with freeifaddrs.
    if unsafe { libc::getifaddrs(&raw mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut addrs = Vec::new();
    let mut node = head;
    while !node.is_null() {
        // SAFETY: `node` is a non-null element of the list getifaddrs returned, which stays
        // allocated until freeifaddrs below.
        let ifa = unsafe { &*node };
        if let Some(ip) = sockaddr_ip(ifa.ifa_addr) {
            addrs.push(ip);
        }
        node = ifa.ifa_next;
    }
    // SAFETY: `head` came from a successful getifaddrs and nothing refers to the list anymore.
    unsafe { libc::freeifaddrs(head) };
    Ok(addrs)
}

/// The IP of an interface address, for the IPv4 and IPv6 families.
fn sockaddr_ip(addr: *const libc::sockaddr) -> Option<IpAddr> {
    if addr.is_null() {
        return None;
    }
    // SAFETY: a non-null `ifa_addr` points to a socket address at least as large as the
    // `sockaddr` header, whose family says which larger structure it is.
    let family = i32::from(unsafe { (*addr).sa_family });
    match family {
        libc::AF_INET => {
            // SAFETY: an AF_INET address is a `sockaddr_in`.
            let sin = unsafe { &*addr.cast::<libc::sockaddr_in>() };
            Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                sin.sin_addr.s_addr,
            ))))
        }
        libc::AF_INET6 => {
            // SAFETY: an AF_INET6 address is a `sockaddr_in6`.
            let sin6 = unsafe { &*addr.cast::<libc::sockaddr_in6>() };
            Some(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_loopback() {
        let addrs = local_addrs().unwrap();
        assert!(
            addrs.iter().any(IpAddr::is_loopback),
            "no loopback address among {addrs:?}"
        );
    }
}
