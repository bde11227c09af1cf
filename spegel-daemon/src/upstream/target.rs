//! Where one upstream request goes ([`Target`]), and its encoding into the synthetic authority
//! that keys hyper-util's connection pool and that only our connector understands.
use std::{
    borrow::Cow,
    fmt, io,
    net::{IpAddr, SocketAddr},
};

use http::{HeaderValue, Uri};
use rustls_pki_types::ServerName;

use super::UpstreamError;
use crate::{
    oci::{Host, SplitHost, split_authority},
    source::Origin,
};

/// Suffix of the synthetic authorities encoding a [`Target`] (`.invalid` never resolves).
const SYNTHETIC_SUFFIX: &str = ".spegel.invalid";

/// Where one request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    /// `https` (verified TLS) or `http`.
    pub(crate) tls: bool,
    /// Host name or IP literal (no brackets): SNI, certificate verification and `Host`.
    pub(crate) host: String,
    /// The port asked for (`Host`, URLs, and DNS dialling).
    pub(crate) port: u16,
    /// The exact address to dial (intercepted origins); `None` resolves `host` with DNS.
    pub(crate) pinned: Option<SocketAddr>,
}

impl Target {
    /// The intercepted origin: its host name, dialled at the address containerd dialled.
    pub(crate) fn from_origin(origin: &Origin) -> Result<Self, UpstreamError> {
        let host = host_only(&origin.host).to_ascii_lowercase();
        if host.is_empty() || ServerName::try_from(host.as_str()).is_err() {
            return Err(UpstreamError::InvalidRequest(format!(
                "origin host `{}` is not a DNS name or IP address",
                origin.host
            )));
        }
        Ok(Self {
            tls: origin.tls,
            host,
            port: origin.addr.port(),
            pinned: Some(origin.addr),
        })
    }

    /// A redirect's destination, resolved with DNS; the error says why it cannot be one.
    pub(crate) fn from_url(url: &url::Url) -> Result<Self, String> {
        let tls = match url.scheme() {
            "https" => true,
            "http" => false,
            other => return Err(format!("unsupported scheme `{other}`")),
        };
        let host = match url.host() {
            Some(url::Host::Domain(domain)) => domain.to_ascii_lowercase(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            None => return Err("no host".to_owned()),
        };
        let port = url
            .port_or_known_default()
            .ok_or_else(|| "no port".to_owned())?;
        Ok(Self {
            tls,
            host,
            port,
            pinned: None,
        })
    }

    /// `https` or `http`.
    pub(crate) fn scheme(&self) -> &'static str {
        if self.tls { "https" } else { "http" }
    }

    /// `host[:port]` as it belongs in `Host` and URLs (IPv6 bracketed, default port omitted).
    pub(crate) fn authority(&self) -> String {
        let host = match self.host.parse::<IpAddr>() {
            Ok(ip) => Host::Ip(ip).to_string(),
            Err(_) => self.host.clone(),
        };
        let default_port = if self.tls { 443 } else { 80 };
        if self.port == default_port {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }

    /// `Host` for a request we address ourselves.
    pub(crate) fn host_header(&self) -> Result<HeaderValue, UpstreamError> {
        HeaderValue::from_str(&self.authority())
            .map_err(|e| UpstreamError::InvalidRequest(format!("bad host `{}`: {e}", self.host)))
    }

    /// Same scheme, host and port (the dialled address aside).
    pub(crate) fn same_server(&self, other: &Target) -> bool {
        self.tls == other.tls && self.host == other.host && self.port == other.port
    }

    /// The URI handed to hyper: real scheme and path, synthetic authority ([`Self::pool_key`])
    /// carrying the target.
    pub(crate) fn uri(&self, path_and_query: &str) -> Result<Uri, UpstreamError> {
        format!("{}://{}{path_and_query}", self.scheme(), self.pool_key())
            .parse()
            .map_err(|e| UpstreamError::InvalidRequest(format!("cannot build a request URI: {e}")))
    }

    /// The synthetic authority of [`Self::uri`], by which the pool keys connections: host,
    /// port and dialled address, hex keeping every part a valid reg-name.
    pub(crate) fn pool_key(&self) -> String {
        let pinned = self
            .pinned
            .map_or_else(|| "dns".to_owned(), |addr| hex::encode(addr.to_string()));
        format!(
            "{}.{}.{}{SYNTHETIC_SUFFIX}",
            hex::encode(&self.host),
            self.port,
            pinned
        )
    }

    /// Inverse of [`Self::uri`], in the connector.
    pub(crate) fn decode(uri: &Uri) -> io::Result<Self> {
        let invalid = || io::Error::new(io::ErrorKind::InvalidInput, "not an upstream target URI");
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(invalid()),
        };
        let encoded = uri
            .host()
            .and_then(|host| host.strip_suffix(SYNTHETIC_SUFFIX))
            .ok_or_else(invalid)?;
        let mut parts = encoded.split('.');
        let (Some(host), Some(port), Some(pinned), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid());
        };
        let host = hex::decode(host)
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .ok_or_else(invalid)?;
        let port = port.parse().map_err(|_| invalid())?;
        let pinned = match pinned {
            "dns" => None,
            hexed => Some(
                hex::decode(hexed)
                    .ok()
                    .and_then(|bytes| String::from_utf8(bytes).ok())
                    .and_then(|addr| addr.parse().ok())
                    .ok_or_else(invalid)?,
            ),
        };
        Ok(Self {
            tls,
            host,
            port,
            pinned,
        })
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme(), self.authority())?;
        if let Some(addr) = self.pinned {
            write!(f, " (at {addr})")?;
        }
        Ok(())
    }
}

/// The host of an origin's `host[:port]` (the registry grammar's port and bracket handling,
/// [`split_authority`]): `registry:5000` → `registry`, `[fd00::1]:5000` → `fd00::1`. Anything
/// that does not split (a bare IPv6 address, junk) is returned as is, for the caller's check.
fn host_only(host: &str) -> Cow<'_, str> {
    match split_authority(host) {
        Ok((SplitHost::Bracketed(ip), _)) => Cow::Owned(ip.to_string()),
        Ok((SplitHost::Text(name), _)) => Cow::Borrowed(name),
        Err(_) => Cow::Borrowed(host),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_round_trip_through_the_synthetic_uri() {
        for target in [
            Target {
                tls: true,
                host: "registry-1.docker.io".into(),
                port: 443,
                pinned: Some("[2001:db8::1]:443".parse().unwrap()),
            },
            Target {
                tls: false,
                host: "10.0.0.1".into(),
                port: 5000,
                pinned: None,
            },
        ] {
            let uri = target.uri("/v2/x/blobs/y?a=b").unwrap();
            assert_eq!(Target::decode(&uri).unwrap(), target);
            assert_eq!(uri.authority().unwrap().as_str(), target.pool_key());
            assert_eq!(uri.path_and_query().unwrap(), "/v2/x/blobs/y?a=b");
        }
        assert!(Target::decode(&"https://registry.test/".parse().unwrap()).is_err());
        assert_eq!(host_only("registry:5000"), "registry");
        assert_eq!(host_only("[fd00::1]:5000"), "fd00::1");
        assert_eq!(host_only("fd00::1"), "fd00::1");
    }
}
