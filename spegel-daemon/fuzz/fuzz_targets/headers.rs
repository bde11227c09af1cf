//! Response and request headers read from the network: hop-by-hop removal of upstream answers
//! (`upstream/hop_by_hop.rs`, `Connection` naming more), `/metrics` `Accept` negotiation
//! (`metrics/format.rs`), `Content-Length` and `Docker-Content-Digest` (`oci/headers.rs`).
//!
//! Input: lines `name: value`. Asserts: after stripping, no hop-by-hop header and none a
//! `Connection` header named is left, and every other header is untouched.
#![no_main]

use http::{HeaderMap, HeaderName, HeaderValue, header};
use libfuzzer_sys::fuzz_target;
use spegel::{
    fuzzing::strip_hop_by_hop,
    metrics::Format,
    oci::{content_digest, content_length},
};

const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "keep-alive",
    "proxy-connection",
];

fuzz_target!(|data: &[u8]| {
    let mut headers = HeaderMap::new();
    for line in data.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) else {
            continue;
        };
        headers.append(name, value);
    }
    let _ = Format::negotiate(headers.get(header::ACCEPT).map(HeaderValue::as_bytes));
    if let Some(length) = content_length(&headers) {
        let text = headers[header::CONTENT_LENGTH].to_str().unwrap().trim();
        assert_eq!(
            text.trim_start_matches('+').parse::<u64>().ok(),
            Some(length)
        );
    }
    if let Some(digest) = content_digest(&headers) {
        assert_eq!(
            digest.to_string(),
            headers["docker-content-digest"].to_str().unwrap().trim()
        );
    }
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .collect();
    let before = headers.clone();
    strip_hop_by_hop(&mut headers);
    for name in HOP_BY_HOP
        .iter()
        .copied()
        .map(str::to_owned)
        .chain(named.iter().cloned())
    {
        assert!(!headers.contains_key(name.as_str()), "{name} left");
    }
    for (name, value) in &before {
        let removed =
            HOP_BY_HOP.contains(&name.as_str()) || named.iter().any(|n| n == name.as_str());
        assert_eq!(
            headers.get_all(name).iter().any(|v| v == value),
            !removed,
            "{name}"
        );
    }
});
