//! spegel's eBPF programs, attached to containerd's cgroup (cgroup v2).
//!
//! - `cgroup/connect4`, `cgroup/connect6`: a TCP connect to a watched port or address is rewritten
//!   to the daemon's interception listener on loopback; the original destination is remembered
//!   under the socket cookie.
//! - `sock_ops` (`ACTIVE_ESTABLISHED_CB`): once the client's ephemeral port is known, the original
//!   destination is re-keyed by (family, client port): what the daemon sees as the peer address in
//!   `accept()`. This runs before the final ACK, so before `accept()` can return.
//! - `cgroup/getpeername4`, `cgroup/getpeername6`: the client sees the original peer, not the proxy.
//!
//! A destination the daemon has learned carries no mirrored registry (listed in `PASS` until an
//! expiry time) is not redirected: those connects go direct, as without spegel.
//!
//! Loop avoidance: the daemon runs outside the cgroup (it refuses to attach to a cgroup that
//! contains its own); as a second guard, connects made from the daemon's own cgroup (by cgroup
//! id, the same in every PID namespace, unlike a tgid) and connects to the listener itself are
//! never rewritten, and nothing is while the daemon's cgroup id or the listener port is unknown
//! (zero). Destinations on loopback are left alone unless their address is listed explicitly.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_TCP_CLOSE,
    },
    helpers::{bpf_get_current_cgroup_id, bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::{cgroup_sock_addr, map, sock_ops},
    maps::{Array, HashMap, LruHashMap},
    programs::{SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::debug;
use spegel_common::{
    AF_INET, AF_INET6, CFG_FLAG_IPV6_LISTENER, CFG_FLAGS, CFG_LEN, CFG_OWN_CGROUP_HI,
    CFG_OWN_CGROUP_LO, CFG_PROXY_PORT, ConnKey, ORIG_MAP_ENTRIES, OrigDst, PASS_MAP_ENTRIES,
    PassKey, REDIRECT_IPS_ENTRIES, REDIRECT_PORTS_ENTRIES,
};

const SOCK_STREAM: u32 = 1;

#[map]
static CONFIG: Array<u32> = Array::with_max_entries(CFG_LEN, 0);
/// Destination ports (host order) to redirect.
#[map]
static REDIRECT_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(REDIRECT_PORTS_ENTRIES, 0);
/// Destination IPv4 addresses (network-order bytes in a u32) to redirect, whatever the port.
#[map]
static REDIRECT_IP4: HashMap<u32, u8> = HashMap::with_max_entries(REDIRECT_IPS_ENTRIES, 0);
/// Destination IPv6 addresses (network-order bytes) to redirect, whatever the port.
#[map]
static REDIRECT_IP6: HashMap<[u32; 4], u8> = HashMap::with_max_entries(REDIRECT_IPS_ENTRIES, 0);
/// connect() -> sock_ops hand-over, keyed by socket cookie; kept for getpeername while the
/// socket lives, deleted when it closes (LRU-bounded besides, for sockets that never connect).
#[map]
static ORIG_BY_COOKIE: LruHashMap<u64, OrigDst> = LruHashMap::with_max_entries(ORIG_MAP_ENTRIES, 0);
/// sock_ops -> daemon hand-over, keyed by the client's (family, local port); the daemon deletes
/// each entry once it has read it.
#[map]
static ORIG_BY_PORT: LruHashMap<ConnKey, OrigDst> =
    LruHashMap::with_max_entries(ORIG_MAP_ENTRIES, 0);

/// Destinations learned to carry no mirrored registry, each with the `bpf_ktime_get_ns` time until
/// which its connects go direct. Written by the daemon only.
#[map]
static PASS: LruHashMap<PassKey, u64> = LruHashMap::with_max_entries(PASS_MAP_ENTRIES, 0);

#[inline(always)]
fn cfg(idx: u32) -> u32 {
    CONFIG.get(idx).copied().unwrap_or(0)
}

#[inline(always)]
fn ip4_listed(ip: u32) -> bool {
    // SAFETY: the value is only tested for presence, never dereferenced.
    unsafe { REDIRECT_IP4.get(&ip) }.is_some()
}

#[inline(always)]
fn ip6_listed(ip: &[u32; 4]) -> bool {
    // SAFETY: as above.
    unsafe { REDIRECT_IP6.get(ip) }.is_some()
}

#[inline(always)]
fn port_listed(port: u16) -> bool {
    // SAFETY: as above.
    unsafe { REDIRECT_PORTS.get(&port) }.is_some()
}

/// Whether connects to `key` go direct: the daemon learned it carries no mirrored registry, and
/// that has not expired.
#[inline(always)]
fn passed(key: &PassKey) -> bool {
    // SAFETY: the value is copied out at once.
    let Some(until) = (unsafe { PASS.get(key) }).copied() else {
        return false;
    };
    // SAFETY: the helper takes no argument and only reads the clock.
    let now = unsafe { bpf_ktime_get_ns() };
    now < until
}

/// The daemon's listener port when the connect may be redirected at all: the listener and the
/// daemon's own cgroup are known (fail open otherwise), and the caller is not in that cgroup.
#[inline(always)]
fn proxy_port_for_caller() -> Option<u16> {
    let proxy_port = cfg(CFG_PROXY_PORT) as u16;
    let own_cgroup = (u64::from(cfg(CFG_OWN_CGROUP_HI)) << 32) | u64::from(cfg(CFG_OWN_CGROUP_LO));
    if proxy_port == 0 || own_cgroup == 0 {
        return None;
    }
    // SAFETY: the helper takes no argument and only reads the current task's cgroup.
    if unsafe { bpf_get_current_cgroup_id() } == own_cgroup {
        return None;
    }
    Some(proxy_port)
}

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    let _ = try_connect4(&ctx);
    1 // always let the connect proceed
}

fn try_connect4(ctx: &SockAddrContext) -> Result<(), i64> {
    let sa = ctx.sock_addr;
    // SAFETY: `sock_addr` is the kernel's context pointer, valid for the program's run.
    let (ty, dst_ip, user_port) = unsafe { ((*sa).type_, (*sa).user_ip4, (*sa).user_port) };
    if ty != SOCK_STREAM {
        return Ok(());
    }
    let Some(proxy_port) = proxy_port_for_caller() else {
        return Ok(());
    };
    let port = u16::from_be(user_port as u16);
    let loopback = u32::from_ne_bytes([127, 0, 0, 1]);
    let is_loopback = dst_ip.to_ne_bytes()[0] == 127;
    if is_loopback && port == proxy_port {
        return Ok(()); // already going to the listener
    }
    // Evaluate the lookups one after the other: merging them lets LLVM OR two map-value pointers,
    // which the verifier rejects.
    let listed = ip4_listed(dst_ip);
    if !listed && (is_loopback || !port_listed(port)) {
        return Ok(());
    }
    let pass = PassKey {
        family: AF_INET,
        port: port as u32,
        addr: [dst_ip, 0, 0, 0],
    };
    if passed(&pass) {
        return Ok(());
    }
    // SAFETY: the cookie helper only reads the socket behind the context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = OrigDst {
        family: AF_INET,
        port: port as u32,
        addr: [dst_ip, 0, 0, 0],
    };
    ORIG_BY_COOKIE.insert(&cookie, &orig, 0)?;
    // SAFETY: writing the destination is what connect4 programs are allowed to do.
    unsafe {
        (*sa).user_ip4 = loopback;
        (*sa).user_port = (proxy_port.to_be()) as u32;
    }
    debug!(
        ctx,
        "connect4 {:i}:{} redirected (cookie {})",
        u32::from_be(dst_ip),
        port,
        cookie
    );
    Ok(())
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    let _ = try_connect6(&ctx);
    1
}

fn try_connect6(ctx: &SockAddrContext) -> Result<(), i64> {
    let sa = ctx.sock_addr;
    // SAFETY: `sock_addr` is the kernel's context pointer, valid for the program's run.
    let (ty, user_port) = unsafe { ((*sa).type_, (*sa).user_port) };
    if ty != SOCK_STREAM {
        return Ok(());
    }
    let Some(proxy_port) = proxy_port_for_caller() else {
        return Ok(());
    };
    // SAFETY: as above.
    let dst = unsafe {
        [
            (*sa).user_ip6[0],
            (*sa).user_ip6[1],
            (*sa).user_ip6[2],
            (*sa).user_ip6[3],
        ]
    };
    let port = u16::from_be(user_port as u16);
    let one = u32::from_ne_bytes([0, 0, 0, 1]);
    let ffff = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
    let v4_mapped = dst[0] == 0 && dst[1] == 0 && dst[2] == ffff;
    let is_loopback = (dst[0] == 0 && dst[1] == 0 && dst[2] == 0 && dst[3] == one)
        || (v4_mapped && dst[3].to_ne_bytes()[0] == 127);
    if is_loopback && port == proxy_port {
        return Ok(());
    }
    // A v4-mapped destination is listed under its IPv4 address.
    let listed = if v4_mapped {
        ip4_listed(dst[3])
    } else {
        ip6_listed(&dst)
    };
    if !listed && (is_loopback || !port_listed(port)) {
        return Ok(());
    }
    // A plain IPv6 connect can only be redirected when the daemon listens on [::1].
    if !v4_mapped && cfg(CFG_FLAGS) & CFG_FLAG_IPV6_LISTENER == 0 {
        return Ok(());
    }
    let pass = if v4_mapped {
        PassKey {
            family: AF_INET,
            port: port as u32,
            addr: [dst[3], 0, 0, 0],
        }
    } else {
        PassKey {
            family: AF_INET6,
            port: port as u32,
            addr: dst,
        }
    };
    if passed(&pass) {
        return Ok(());
    }
    // SAFETY: the cookie helper only reads the socket behind the context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = OrigDst {
        family: AF_INET6,
        port: port as u32,
        addr: dst,
    };
    ORIG_BY_COOKIE.insert(&cookie, &orig, 0)?;
    // SAFETY: writing the destination is what connect6 programs are allowed to do. A v4-mapped
    // socket is sent to ::ffff:127.0.0.1, a plain IPv6 one to ::1.
    unsafe {
        (*sa).user_ip6[0] = 0;
        (*sa).user_ip6[1] = 0;
        if v4_mapped {
            (*sa).user_ip6[2] = ffff;
            (*sa).user_ip6[3] = u32::from_ne_bytes([127, 0, 0, 1]);
        } else {
            (*sa).user_ip6[2] = 0;
            (*sa).user_ip6[3] = one;
        }
        (*sa).user_port = (proxy_port.to_be()) as u32;
    }
    debug!(ctx, "connect6 port {} redirected (cookie {})", port, cookie);
    Ok(())
}

#[sock_ops]
pub fn spegel_sockops(ctx: SockOpsContext) -> u32 {
    if ctx.op() == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        // SAFETY: the cookie helper only reads the socket behind the context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        // SAFETY: the value is copied out at once.
        if let Some(orig) = unsafe { ORIG_BY_COOKIE.get(&cookie) } {
            let orig = *orig;
            // connect6 sent a v4-mapped destination to ::ffff:127.0.0.1: IPv4 on the wire, so the
            // daemon sees an IPv4 peer.
            let ffff = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
            let v4_mapped = orig.family == AF_INET6
                && orig.addr[0] == 0
                && orig.addr[1] == 0
                && orig.addr[2] == ffff;
            let key = ConnKey {
                family: if v4_mapped { AF_INET } else { ctx.family() },
                port: ctx.local_port(),
            };
            let _ = ORIG_BY_PORT.insert(&key, &orig, 0);
            // Be told when this socket closes, to forget its cookie then. Without it the entry
            // stays until LRU eviction; getpeername still works, so a failure is ignored.
            let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
        }
    } else if ctx.op() == BPF_SOCK_OPS_STATE_CB && ctx.arg(1) == BPF_TCP_CLOSE {
        // SAFETY: the cookie helper only reads the socket behind the context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        let _ = ORIG_BY_COOKIE.remove(&cookie);
    }
    1
}

/// getpeername() on a redirected socket would return the listener's address; report the original.
#[cgroup_sock_addr(getpeername4)]
pub fn getpeername4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: `sock_addr` is the kernel's context pointer, valid for the program's run.
    let (ip, user_port) = unsafe { ((*sa).user_ip4, (*sa).user_port) };
    let proxy_port = cfg(CFG_PROXY_PORT) as u16;
    if proxy_port == 0
        || ip != u32::from_ne_bytes([127, 0, 0, 1])
        || u16::from_be(user_port as u16) != proxy_port
    {
        return 1;
    }
    // SAFETY: the cookie helper only reads the socket behind the context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is read at once; LRU eviction cannot free it during this program.
    if let Some(orig) = unsafe { ORIG_BY_COOKIE.get(&cookie) } {
        if orig.family == AF_INET {
            let (oip, oport) = (orig.addr[0], orig.port as u16);
            // SAFETY: rewriting the reported address is what getpeername programs do.
            unsafe {
                (*sa).user_ip4 = oip;
                (*sa).user_port = oport.to_be() as u32;
            }
        }
    }
    1 // getpeername programs must return 1
}

#[cgroup_sock_addr(getpeername6)]
pub fn getpeername6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: `sock_addr` is the kernel's context pointer, valid for the program's run.
    let user_port = unsafe { (*sa).user_port };
    let proxy_port = cfg(CFG_PROXY_PORT) as u16;
    if proxy_port == 0 || u16::from_be(user_port as u16) != proxy_port {
        return 1;
    }
    // SAFETY: the cookie helper only reads the socket behind the context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is read at once.
    if let Some(orig) = unsafe { ORIG_BY_COOKIE.get(&cookie) } {
        if orig.family == AF_INET6 {
            let (a, oport) = (orig.addr, orig.port as u16);
            // SAFETY: rewriting the reported address is what getpeername programs do.
            unsafe {
                (*sa).user_ip6[0] = a[0];
                (*sa).user_ip6[1] = a[1];
                (*sa).user_ip6[2] = a[2];
                (*sa).user_ip6[3] = a[3];
                (*sa).user_port = oport.to_be() as u32;
            }
        }
    }
    1
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
