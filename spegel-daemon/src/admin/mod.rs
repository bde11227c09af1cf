//! The admin endpoint: a small read-only HTTP server, on loopback by default, answering
//! `/status.json` and `/` (the same status as a plain HTML page: no script, no external asset)
//! for operators and `spegel status` (`client.rs`). What it shows is gathered from the running
//! subsystems (`status.rs`) and rendered in `render.rs`; `server.rs` serves it.
//!
//! Nothing here changes the daemon. It still guards against being reached from a browser on
//! another site: binds outside loopback are refused unless `--admin-allow-remote`, and a request
//! whose `Host` is a name other than `localhost` (DNS rebinding) is refused.
pub mod client;
pub mod render;
mod server;
pub mod status;

use std::net::SocketAddr;

pub use self::{
    server::serve,
    status::{AdminState, Status},
};

/// The admin endpoint's default address.
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:5002";

/// Flags of the admin endpoint (`spegel run`).
#[derive(Debug, Clone, clap::Args)]
pub struct AdminArgs {
    /// Address of the admin endpoint (the status page `/` and `/status.json`, read by `spegel
    /// status`). Loopback unless `--admin-allow-remote`.
    #[arg(long, env = "SPEGEL_ADMIN_ADDR", default_value = DEFAULT_ADMIN_ADDR)]
    pub admin_addr: SocketAddr,
    /// Allow `--admin-addr` outside loopback (the page then shows this node's peers and recent
    /// pulls to whoever reaches it).
    #[arg(long, env = "SPEGEL_ADMIN_ALLOW_REMOTE")]
    pub admin_allow_remote: bool,
}

/// A bad admin flag.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(
        "--admin-addr {0} is not a loopback address; pass --admin-allow-remote to expose the \
         status page beyond this node"
    )]
    NotLoopback(SocketAddr),
}

impl AdminArgs {
    /// The address to bind, once it is allowed.
    pub fn validate(&self) -> Result<SocketAddr, AdminError> {
        if self.admin_addr.ip().is_loopback() || self.admin_allow_remote {
            Ok(self.admin_addr)
        } else {
            Err(AdminError::NotLoopback(self.admin_addr))
        }
    }
}

/// Whether a request's `Host` may be answered: an IP literal (with or without port) or
/// `localhost`. A browser tricked by DNS rebinding sends the attacker's name, which is refused.
pub fn host_allowed(host: Option<&str>) -> bool {
    let Some(host) = host.map(str::trim) else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        // `[v6]` or `[v6]:port`
        Some(rest) => match rest.split_once(']') {
            Some((v6, port)) if port.is_empty() || port_ok(port.strip_prefix(':')) => {
                return v6.parse::<std::net::Ipv6Addr>().is_ok();
            }
            _ => return false,
        },
        None => match host.rsplit_once(':') {
            Some((name, port)) if port_ok(Some(port)) => name,
            Some(_) => return false,
            None => host,
        },
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::Ipv4Addr>().is_ok()
}

fn port_ok(port: Option<&str>) -> bool {
    port.is_some_and(|port| port.parse::<u16>().is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_binds_unless_allowed() {
        let args = |addr: &str, allow| AdminArgs {
            admin_addr: addr.parse().unwrap(),
            admin_allow_remote: allow,
        };
        assert!(args("127.0.0.1:5002", false).validate().is_ok());
        assert!(args("[::1]:5002", false).validate().is_ok());
        let err = args("0.0.0.0:5002", false).validate().unwrap_err();
        assert!(err.to_string().contains("--admin-allow-remote"), "{err}");
        assert!(args("10.0.0.1:5002", false).validate().is_err());
        assert!(args("0.0.0.0:5002", true).validate().is_ok());
    }

    #[test]
    fn hosts_are_ip_literals_or_localhost() {
        for good in [
            "127.0.0.1:5002",
            "127.0.0.1",
            "localhost:5002",
            "LOCALHOST",
            "[::1]:5002",
            "[::1]",
            "10.1.2.3:5002",
        ] {
            assert!(host_allowed(Some(good)), "{good}");
        }
        for bad in [
            "evil.example:5002",
            "evil.example",
            "localhost.evil.example",
            "127.0.0.1.nip.io:5002",
            "[::1]x",
            "[nope]:1",
            "127.0.0.1:99999",
            "",
        ] {
            assert!(!host_allowed(Some(bad)), "{bad}");
        }
        assert!(!host_allowed(None));
    }
}
