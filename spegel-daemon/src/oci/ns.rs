//! The `?ns=` query parameter containerd adds to mirrored requests: the registry the image
//! reference named, percent-decoded and parsed as a [`Registry`] authority.
use super::{ParseError, Registry};

/// Longest `?ns=` host accepted (a DNS name is at most 253 characters, plus `:65535`).
const MAX_HOST_LEN: usize = 253 + 6;

/// The registry named by the `ns` parameter of a query string, as its normalised `host[:port]`
/// ([`Registry::parse_authority`], then [`Registry::authority`]). `None` when absent; an error
/// when invalid or given twice.
pub fn parse_ns_query(query: Option<&str>) -> Result<Option<String>, ParseError> {
    let mut found = None;
    for pair in query.unwrap_or_default().split('&') {
        let Some(value) = pair.strip_prefix("ns=") else {
            continue;
        };
        if found.is_some() {
            return Err(ParseError::Namespace("given more than once"));
        }
        let decoded = percent_decode(value)?;
        let registry = Registry::parse_authority(&decoded)
            .map_err(|err| ParseError::Namespace(err.reason()))?;
        found = Some(registry.authority());
    }
    Ok(found)
}

/// Decode `%XX` escapes (containerd sends `ns=10.0.0.1%3A5000`). The result must be ASCII;
/// anything else cannot be a host anyway.
fn percent_decode(value: &str) -> Result<String, ParseError> {
    if value.len() > MAX_HOST_LEN * 3 {
        return Err(ParseError::Namespace("too long"));
    }
    let bytes = value.as_bytes();
    let mut out = String::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .ok_or(ParseError::Namespace("truncated percent escape"))?;
            let mut decoded = [0u8; 1];
            hex::decode_to_slice(hex, &mut decoded)
                .map_err(|_| ParseError::Namespace("bad percent escape"))?;
            out.push(ascii_char(decoded[0])?);
            i += 3;
        } else {
            out.push(ascii_char(b)?);
            i += 1;
        }
    }
    Ok(out)
}

fn ascii_char(b: u8) -> Result<char, ParseError> {
    if b.is_ascii_graphic() {
        Ok(char::from(b))
    } else {
        Err(ParseError::Namespace("not a printable ASCII host"))
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ns_parameter() {
        let ok = |q: &str, host: &str| {
            assert_eq!(parse_ns_query(Some(q)), Ok(Some(host.to_owned())), "{q:?}");
        };
        ok("ns=docker.io", "docker.io");
        ok("ns=Docker.IO", "docker.io");
        ok("ns=10.213.0.10%3A5000", "10.213.0.10:5000");
        ok("ns=10.213.0.10%3a5000", "10.213.0.10:5000");
        ok("ns=registry:5000", "registry:5000");
        ok("foo=bar&ns=ghcr.io&x", "ghcr.io");
        ok("ns=%5B%3A%3A1%5D%3A5000", "[::1]:5000");
        ok("ns=[fd00::1]", "[fd00::1]");
        assert_eq!(parse_ns_query(None), Ok(None));
        assert_eq!(parse_ns_query(Some("")), Ok(None));
        assert_eq!(parse_ns_query(Some("nsx=docker.io")), Ok(None));

        for bad in [
            "ns=",
            "ns=docker.io&ns=ghcr.io",
            "ns=docker.io/library",
            "ns=docker.io%2Flibrary",
            "ns=..",
            "ns=%2e%2e",
            "ns=a..b",
            "ns=-a.io",
            "ns=a-.io",
            "ns=a_b.io",
            "ns=host:",
            "ns=host:0",
            "ns=host:65536",
            "ns=host:+80",
            "ns=host:80:80",
            "ns=::1",
            "ns=[::1",
            "ns=[::1]x",
            "ns=[::g]",
            "ns=%",
            "ns=%4",
            "ns=%zz",
            "ns=%00",
            "ns=%FF",
            "ns=a+b",
            "ns=caf%C3%A9.io",
        ] {
            assert!(
                matches!(parse_ns_query(Some(bad)), Err(ParseError::Namespace(_))),
                "{bad:?} must be rejected"
            );
        }
        let long = format!("ns={}", "a".repeat(300));
        assert!(parse_ns_query(Some(&long)).is_err());
        let huge = format!("ns={}", "%41".repeat(100_000));
        assert!(parse_ns_query(Some(&huge)).is_err());
        let label = format!("ns={}.io", "a".repeat(64));
        assert!(parse_ns_query(Some(&label)).is_err());
    }
}
