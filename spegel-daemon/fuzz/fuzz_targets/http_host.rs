//! The plain-HTTP `Host` peek (`intercept/http_host.rs`) on arbitrary first bytes.
//!
//! Asserts: a `Host` reads back unchanged through its display (`host[:port]`); and a prefix of
//! the bytes either asks for more or already gives the final answer (the reason given for a
//! malformed head may differ).
#![no_main]

use libfuzzer_sys::fuzz_target;
use spegel::intercept::{
    authority::Authority,
    http_host::{HttpRequest, parse_http_host},
};

fuzz_target!(|data: &[u8]| {
    let full = parse_http_host(data);
    if let HttpRequest::Head { host: Some(host) } = &full {
        let shown = host.to_string();
        assert_eq!(Authority::parse(&shown).as_ref(), Some(host), "{shown:?}");
    }
    let step = (data.len() / 16).max(1);
    for end in (0..data.len()).step_by(step) {
        let early = parse_http_host(&data[..end]);
        let same = match (&early, &full) {
            (HttpRequest::Malformed(_), HttpRequest::Malformed(_)) => true,
            (early, full) => early == full,
        };
        assert!(
            early == HttpRequest::NeedMore || same,
            "prefix of {end} bytes says {early:?}, all {} bytes say {full:?}",
            data.len()
        );
    }
});
