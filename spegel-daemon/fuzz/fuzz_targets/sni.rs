//! The ClientHello SNI peek (`intercept/sni.rs`) on arbitrary first bytes of a connection.
//!
//! Asserts: a server name is normalised (lowercase, no trailing dot, DNS characters, not an IP
//! literal) and reads back as the same `Authority`; and a prefix of the bytes either asks for
//! more or already gives the final answer (the peek decides only what more bytes cannot change;
//! the reason given for a malformed hello may differ, and a server name found early stands even
//! if the rest of the hello turns out malformed: the TLS stack that terminates checks that).
#![no_main]

use libfuzzer_sys::fuzz_target;
use spegel::{
    fuzzing::{TlsHello, parse_tls_client_hello},
    intercept::authority::Authority,
};

fuzz_target!(|data: &[u8]| {
    let full = parse_tls_client_hello(data);
    if let TlsHello::Hello { sni: Some(name) } = &full {
        assert!(!name.is_empty() && !name.ends_with('.'), "{name:?}");
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b)),
            "{name:?}"
        );
        assert!(name.parse::<std::net::IpAddr>().is_err(), "{name:?}");
        let authority = Authority::parse(name).expect("an SNI is an authority");
        assert_eq!(&authority.host, name);
        assert_eq!(authority.port, None);
    }
    // Every prefix the peek may have seen first: need more, or the same answer (a malformed
    // hello may be malformed for a different reason once more of it is there).
    let step = (data.len() / 16).max(1);
    for end in (0..data.len()).step_by(step) {
        let early = parse_tls_client_hello(&data[..end]);
        let same = match (&early, &full) {
            (TlsHello::Malformed(_), TlsHello::Malformed(_)) => true,
            // The server name is returned as soon as it is found, by design: the rest of a long
            // hello is the terminating TLS stack's to check.
            (TlsHello::Hello { .. }, TlsHello::Malformed(_)) => true,
            (early, full) => early == full,
        };
        assert!(
            early == TlsHello::NeedMore || same,
            "prefix of {end} bytes says {early:?}, all {} bytes say {full:?}",
            data.len()
        );
    }
});
