//! The redirect policy, as a pure decision: given the request just sent and the answer's status
//! and `Location`, follow (where, with which headers), stop, or fail. No I/O; the client's
//! request loop performs what it decides.
//!
//! The policy: 301, 302, 303, 307 and 308 are followed with the same method (only GET and HEAD
//! are ever sent, which every one of them keeps), at most [`MAX_REDIRECTS`] times; a relative
//! `Location` resolves against the current URL; https never redirects to http; credentials are
//! only sent to the server they were sent to before; the intercepted origin's server keeps its
//! pinned address, any other host is resolved with DNS.
use http::{HeaderMap, HeaderValue, StatusCode, header};

use super::target::Target;

/// Redirects followed for one object before giving up (as many as containerd's Go client would
/// follow for a registry is far more than any registry needs; five covers CDN chains).
pub(crate) const MAX_REDIRECTS: usize = 5;

/// One request of a redirect chain: where it goes and what it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Hop {
    /// The server asked.
    pub(crate) target: Target,
    /// Path and query asked for.
    pub(crate) path_and_query: String,
    /// The request headers (without `Host`, which the target gives).
    pub(crate) headers: HeaderMap,
}

/// What to do with an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Not a redirect: the answer is the final response.
    Stop,
    /// Send this request next.
    Follow(Hop),
}

/// Decides what follows the answer (`status`, `location`) to `current`, the request sent after
/// `redirects` redirects were followed, in a chain that started at `origin`. The error is the
/// reason the redirect cannot be followed.
pub(crate) fn decide(
    origin: &Target,
    current: &Hop,
    redirects: usize,
    status: StatusCode,
    location: Option<&HeaderValue>,
) -> Result<Decision, String> {
    if !matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308) {
        return Ok(Decision::Stop);
    }
    if redirects >= MAX_REDIRECTS {
        return Err(format!("more than {MAX_REDIRECTS} redirects"));
    }
    let location = location
        .and_then(|value| value.to_str().ok())
        .ok_or_else(|| "no usable Location header".to_owned())?;
    let target = &current.target;
    let base = url::Url::parse(&format!(
        "{}://{}{}",
        target.scheme(),
        target.authority(),
        current.path_and_query
    ))
    .map_err(|e| e.to_string())?;
    let next_url = base
        .join(location)
        .map_err(|e| format!("Location `{location}`: {e}"))?;
    let mut next = Target::from_url(&next_url)?;
    if target.tls && !next.tls {
        // Tag manifests have no digest to check: never let a redirect downgrade them.
        return Err(format!("refusing https → http ({next_url})"));
    }
    if next.same_server(origin) {
        next.pinned = origin.pinned;
    }
    let mut headers = current.headers.clone();
    if !next.same_server(target) {
        // As Go's client does: credentials for one host are not handed to another.
        headers.remove(header::AUTHORIZATION);
    }
    let path_and_query = match next_url.query() {
        Some(query) => format!("{}?{query}", next_url.path()),
        None => next_url.path().to_owned(),
    };
    Ok(Decision::Follow(Hop {
        target: next,
        path_and_query,
        headers,
    }))
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    const PINNED: &str = "10.0.0.7:443";

    fn target(tls: bool, host: &str, port: u16, pinned: Option<&str>) -> Target {
        Target {
            tls,
            host: host.to_owned(),
            port,
            pinned: pinned.map(|addr| addr.parse::<SocketAddr>().unwrap()),
        }
    }

    /// The intercepted origin: `https://registry.test`, dialled at [`PINNED`].
    fn origin() -> Target {
        target(true, "registry.test", 443, Some(PINNED))
    }

    fn headers(authorization: bool) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::USER_AGENT,
            HeaderValue::from_static("containerd/2.1"),
        );
        if authorization {
            headers.insert(
                header::AUTHORIZATION,
                HeaderValue::from_static("Bearer secret"),
            );
        }
        headers
    }

    fn hop(target: Target, path_and_query: &str, authorization: bool) -> Hop {
        Hop {
            target,
            path_and_query: path_and_query.to_owned(),
            headers: headers(authorization),
        }
    }

    /// The first request of a chain: the blob at the origin, with credentials.
    fn first() -> Hop {
        hop(origin(), "/v2/app/blobs/sha256:ab?x=1", true)
    }

    enum Want {
        Stop,
        Follow(Hop),
        /// The error message contains this.
        Fail(&'static str),
    }

    /// Name, request sent, redirects before it, answer status and `Location`, expectation.
    type Case = (&'static str, Hop, usize, u16, Option<&'static str>, Want);

    #[test]
    fn decides_every_redirect() {
        let cdn = |path: &str, authorization| {
            hop(target(true, "cdn.test", 443, None), path, authorization)
        };
        let cases: Vec<Case> = vec![
            ("success", first(), 0, 200, None, Want::Stop),
            ("partial content", first(), 0, 206, None, Want::Stop),
            ("not found", first(), 0, 404, Some("/elsewhere"), Want::Stop),
            (
                "304 is no redirect",
                first(),
                0,
                304,
                Some("/elsewhere"),
                Want::Stop,
            ),
            (
                "last hop's answer is final",
                first(),
                MAX_REDIRECTS,
                200,
                None,
                Want::Stop,
            ),
            (
                "relative path, same server: pinned, credentials kept",
                first(),
                0,
                302,
                Some("/redirected/x"),
                Want::Follow(hop(origin(), "/redirected/x", true)),
            ),
            (
                "relative to the current path",
                first(),
                0,
                301,
                Some("other?sig=1"),
                Want::Follow(hop(origin(), "/v2/app/blobs/other?sig=1", true)),
            ),
            (
                "absolute URL on the same server keeps the pin",
                first(),
                0,
                307,
                Some("https://REGISTRY.test:443/v2/y"),
                Want::Follow(hop(origin(), "/v2/y", true)),
            ),
            (
                "other host: DNS, credentials dropped, query kept, fragment dropped",
                first(),
                0,
                307,
                Some("https://cdn.test/blob?sig=abc#frag"),
                Want::Follow(cdn("/blob?sig=abc", false)),
            ),
            (
                "303 is followed like the others",
                first(),
                0,
                303,
                Some("https://cdn.test/blob"),
                Want::Follow(cdn("/blob", false)),
            ),
            (
                "308 is followed like the others",
                first(),
                0,
                308,
                Some("https://cdn.test/blob"),
                Want::Follow(cdn("/blob", false)),
            ),
            (
                "scheme-relative Location",
                first(),
                0,
                302,
                Some("//cdn.test/blob"),
                Want::Follow(cdn("/blob", false)),
            ),
            (
                "other port is another server",
                first(),
                0,
                302,
                Some("https://registry.test:8443/v2/y"),
                Want::Follow(hop(
                    target(true, "registry.test", 8443, None),
                    "/v2/y",
                    false,
                )),
            ),
            (
                "back to the origin from a CDN: pinned again, no credentials to restore",
                cdn("/blob", false),
                1,
                302,
                Some("https://registry.test/v2/z"),
                Want::Follow(hop(origin(), "/v2/z", false)),
            ),
            (
                "http → https is an upgrade: allowed, another server for credentials",
                hop(target(false, "registry.test", 80, None), "/v2/a", true),
                1,
                302,
                Some("https://registry.test/v2/a"),
                Want::Follow(hop(origin(), "/v2/a", false)),
            ),
            (
                "IPv6 literal Location",
                first(),
                0,
                302,
                Some("https://[fd00::1]:5000/v2/b"),
                Want::Follow(hop(target(true, "fd00::1", 5000, None), "/v2/b", false)),
            ),
            (
                "https → http refused",
                first(),
                0,
                302,
                Some("http://cdn.test/blob"),
                Want::Fail("refusing https → http"),
            ),
            (
                "too many redirects",
                first(),
                MAX_REDIRECTS,
                302,
                Some("/again"),
                Want::Fail("more than 5 redirects"),
            ),
            (
                "missing Location",
                first(),
                0,
                302,
                None,
                Want::Fail("no usable Location header"),
            ),
            (
                "unsupported scheme",
                first(),
                0,
                302,
                Some("ftp://cdn.test/blob"),
                Want::Fail("unsupported scheme `ftp`"),
            ),
            (
                "garbage Location",
                first(),
                0,
                302,
                Some("https://exa mple.test/"),
                Want::Fail("Location `https://exa mple.test/`"),
            ),
            (
                "no host",
                first(),
                0,
                302,
                Some("http:"),
                Want::Fail("Location `http:`"),
            ),
        ];
        for (name, current, redirects, status, location, want) in cases {
            let location = location.map(|value| HeaderValue::from_str(value).unwrap());
            let got = decide(
                &origin(),
                &current,
                redirects,
                StatusCode::from_u16(status).unwrap(),
                location.as_ref(),
            );
            match want {
                Want::Stop => assert_eq!(got, Ok(Decision::Stop), "{name}"),
                Want::Follow(next) => assert_eq!(got, Ok(Decision::Follow(next)), "{name}"),
                Want::Fail(reason) => {
                    let err = got.expect_err(name);
                    assert!(err.contains(reason), "{name}: {err}");
                }
            }
        }
    }

    #[test]
    fn pins_come_from_the_origin_only() {
        let plain = target(false, "10.0.0.1", 5000, Some("10.0.0.1:5000"));
        let current = hop(plain.clone(), "/v2/a", true);
        let location = HeaderValue::from_static("/v2/b");
        let got = decide(&plain, &current, 0, StatusCode::FOUND, Some(&location));
        assert_eq!(got, Ok(Decision::Follow(hop(plain, "/v2/b", true))));
        // The same redirect on a server that is not the origin's: resolved with DNS.
        let got = decide(&origin(), &current, 0, StatusCode::FOUND, Some(&location));
        let unpinned = target(false, "10.0.0.1", 5000, None);
        assert_eq!(got, Ok(Decision::Follow(hop(unpinned, "/v2/b", true))));
    }

    #[test]
    fn a_location_that_is_not_text_is_refused() {
        let location = HeaderValue::from_bytes(b"/caf\xe9").unwrap();
        let got = decide(&origin(), &first(), 0, StatusCode::FOUND, Some(&location));
        assert_eq!(got, Err("no usable Location header".to_owned()));
    }
}
