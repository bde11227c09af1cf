//! `#[repr(C)]` types shared by spegel's eBPF programs and its daemon: map keys, values and indices.
//!
//! Addresses are stored as the kernel hands them over: IPv4 in the first word, IPv6 in all four,
//! each word holding network-order bytes. Ports are host order.
#![no_std]

/// `AF_INET`, as the kernel reports a socket's family.
pub const AF_INET: u32 = 2;
/// `AF_INET6`.
pub const AF_INET6: u32 = 10;

/// Index in the `CONFIG` array: the port of the daemon's interception listener (host order).
/// Zero disables every redirect.
pub const CFG_PROXY_PORT: u32 = 0;
/// Index in the `CONFIG` array: the low 32 bits of the daemon's own cgroup v2 id (the inode of
/// its cgroup directory, what `bpf_get_current_cgroup_id` returns). Connects made from that
/// cgroup are never redirected; while the id is zero (unknown) nothing is.
pub const CFG_OWN_CGROUP_LO: u32 = 1;
/// Index in the `CONFIG` array: `CFG_FLAG_*` bits.
pub const CFG_FLAGS: u32 = 2;
/// Index in the `CONFIG` array: the high 32 bits of the daemon's own cgroup v2 id.
pub const CFG_OWN_CGROUP_HI: u32 = 3;
/// Number of entries in the `CONFIG` array.
pub const CFG_LEN: u32 = 4;

/// `CFG_FLAGS` bit: the daemon also listens on `[::1]`, so plain IPv6 connects may be redirected.
/// Without it only IPv4 (and v4-mapped) connects are, and IPv6 ones go direct.
pub const CFG_FLAG_IPV6_LISTENER: u32 = 1;

/// Capacity of the `REDIRECT_PORTS` map.
pub const REDIRECT_PORTS_ENTRIES: u32 = 64;
/// Capacity of each of the `REDIRECT_IP4` and `REDIRECT_IP6` maps.
pub const REDIRECT_IPS_ENTRIES: u32 = 1024;

/// Capacity of the maps that hand a connection's original destination to the daemon.
pub const ORIG_MAP_ENTRIES: u32 = 16384;

/// Capacity of the `PASS` map (least recently used entries go first).
pub const PASS_MAP_ENTRIES: u32 = 4096;

/// The original destination of a redirected connection.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct OrigDst {
    /// `AF_INET` or `AF_INET6`.
    pub family: u32,
    /// Destination port, host order.
    pub port: u32,
    /// Destination address: network-order bytes, IPv4 in `addr[0]`.
    pub addr: [u32; 4],
}

/// The key under which sock_ops publishes a redirected connection's original destination: the
/// client's (family, local port), which is exactly the peer address the daemon sees in `accept()`.
/// An `AF_INET6` socket that dialled a v4-mapped address talks IPv4 on the wire, so its key has
/// family `AF_INET` (the value keeps the mapped address).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct ConnKey {
    /// `AF_INET` or `AF_INET6`.
    pub family: u32,
    /// The client's local port, host order.
    pub port: u32,
}

/// A destination the daemon learned carries no mirrored registry: the key of the `PASS` map,
/// whose value is the `CLOCK_MONOTONIC` time in nanoseconds (`bpf_ktime_get_ns`) until which
/// connects to it are left alone. A v4-mapped IPv6 destination is keyed as IPv4, the way the
/// daemon sees it.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct PassKey {
    /// `AF_INET` or `AF_INET6`.
    pub family: u32,
    /// Destination port, host order.
    pub port: u32,
    /// Destination address: network-order bytes, IPv4 in `addr[0]` (the rest zero).
    pub addr: [u32; 4],
}

// SAFETY: the three types are `#[repr(C)]`, `Copy`, made only of `u32`s (no padding, no pointers), and
// every bit pattern is a valid value.
#[cfg(feature = "user")]
unsafe impl aya::Pod for OrigDst {}
// SAFETY: as above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for ConnKey {}
// SAFETY: as above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for PassKey {}
