//! The `registry=` field of a peer's Identify agent version (`p2p/registry_addr.rs`), the
//! `--registry-advertise-addr` grammar behind it, and `--bootstrap-dns` seeds (`p2p/seeds.rs`).
//!
//! Asserts: an announced registry is never port 0 or an unspecified IP, and reads back from the
//! agent version this node would announce for it; the flag grammar round-trips.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spegel::{
    fuzzing::{RegistryAdvertise, agent_version, parse_agent_version},
    p2p::DnsSeed,
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(advertise) = parse_agent_version(text) {
        match advertise {
            RegistryAdvertise::Port(port) => assert_ne!(port, 0),
            RegistryAdvertise::Addr(addr) => {
                assert_ne!(addr.port(), 0);
                assert!(!addr.ip().is_unspecified());
            }
        }
        assert_eq!(
            parse_agent_version(&agent_version(advertise)),
            Some(advertise)
        );
    }
    if let Ok(advertise) = text.parse::<RegistryAdvertise>() {
        assert_eq!(
            advertise.to_string().parse::<RegistryAdvertise>(),
            Ok(advertise)
        );
    }
    if let Ok(seed) = text.parse::<DnsSeed>() {
        assert!(!seed.host.is_empty());
        assert!(!seed.host.contains(char::is_whitespace), "{seed:?}");
    }
});
