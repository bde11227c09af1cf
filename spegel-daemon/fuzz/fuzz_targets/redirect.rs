//! An upstream's redirect (`upstream/redirect.rs`): its status and `Location`, resolved against
//! the request, and the target encoded into the synthetic URI the connector decodes
//! (`upstream/target.rs`).
//!
//! Input: first byte picks the request (scheme, pinned or not), the second the status, the
//! rest is the `Location` value. Asserts: never https → http; credentials only to the same
//! server; the origin's pinned address only for the origin's server; at most five redirects;
//! the synthetic URI decodes to the very target.
#![no_main]

use std::net::SocketAddr;

use http::{HeaderValue, StatusCode};
use libfuzzer_sys::fuzz_target;
use spegel::fuzzing::follow_redirect;

const URLS: [&str; 4] = [
    "https://registry.example:5000/v2/library/nginx/blobs/sha256:abc?ns=docker.io",
    "http://registry.example/v2/x/manifests/latest",
    "https://[fd00::1]/v2/x/blobs/sha256:abc",
    "http://10.0.0.1:5000/v2/",
];
const STATUSES: [u16; 8] = [200, 301, 302, 303, 307, 308, 404, 300];

fuzz_target!(|data: &[u8]| {
    let [which, status, location @ ..] = data else {
        return;
    };
    let url = URLS[usize::from(which % 4)];
    let pinned: Option<SocketAddr> = (which & 0x10 != 0).then(|| "10.9.8.7:443".parse().unwrap());
    let redirects = usize::from(which >> 5);
    let status = StatusCode::from_u16(STATUSES[usize::from(status % 8)]).unwrap();
    let location = HeaderValue::from_bytes(location).ok();
    let from = url::Url::parse(url).unwrap();
    let result = follow_redirect(url, pinned, redirects, status, location.as_ref()).unwrap_or_else(
        |reason| {
            assert!(!reason.contains("synthetic URI"), "{reason}");
            None
        },
    );
    let Some(next) = result else {
        return;
    };
    assert!(matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308));
    assert!(redirects < 5);
    if from.scheme() == "https" {
        assert!(next.tls, "https redirected to http: {next:?}");
    }
    let from_host = match from.host().unwrap() {
        url::Host::Domain(d) => d.to_owned(),
        url::Host::Ipv4(ip) => ip.to_string(),
        url::Host::Ipv6(ip) => ip.to_string(),
    };
    let same = next.tls == (from.scheme() == "https")
        && next.host == from_host
        && next.port == from.port_or_known_default().unwrap();
    assert_eq!(next.authorization, same, "{next:?}");
    assert_eq!(next.pinned, if same { pinned } else { None }, "{next:?}");
    assert!(next.path_and_query.starts_with('/'), "{next:?}");
    assert_eq!(
        next.decoded,
        Some((next.tls, next.host.clone(), next.port, next.pinned)),
        "{next:?}"
    );
});
