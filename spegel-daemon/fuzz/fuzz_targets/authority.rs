//! `host[:port]` as the wire spells it (`intercept/authority.rs`: `Host`, SNI, origins).
//!
//! Asserts: the parsed form is normalised (lowercase, no trailing dot) and display → parse
//! gives it back; parsing is idempotent on its own output.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spegel::intercept::authority::Authority;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Some(authority) = Authority::parse(text) else {
        return;
    };
    assert!(!authority.host.is_empty());
    assert!(!authority.host.ends_with('.'), "{authority:?}");
    if authority.ip().is_none() {
        assert_eq!(authority.host, authority.host.to_ascii_lowercase());
    }
    let shown = authority.to_string();
    assert_eq!(Authority::parse(&shown), Some(authority), "{shown:?}");
});
