//! TLS names (`tls/names.rs`): the server names a leaf is minted for (from SNI) and the
//! registries the CA is constrained to.
//!
//! Asserts: a leaf name is normalised and display → parse gives it back; every registry an
//! operator can configure gets a leaf name its own constraints permit; a name is permitted by a
//! set holding it, and a DNS name's subdomains by it, never a name that merely ends like it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spegel::{
    fuzzing::{LeafName, PermittedNames},
    oci::{Host, Registry},
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(name) = LeafName::parse(text) {
        if let LeafName::Dns(dns) = &name {
            assert!(!dns.is_empty() && !dns.ends_with('.') && !dns.contains('*'));
            assert_eq!(dns, &dns.to_ascii_lowercase());
        }
        let shown = name.to_string();
        assert_eq!(
            LeafName::parse(&shown).ok().as_ref(),
            Some(&name),
            "{shown:?}"
        );
    }
    let Ok(registry) = Registry::parse_authority(text) else {
        return;
    };
    let host = match registry.host() {
        Host::Name(name) => name.clone(),
        Host::Ip(ip) => ip.to_string(),
    };
    let leaf = LeafName::parse(&host)
        .unwrap_or_else(|e| panic!("registry {registry} has no leaf name: {e}"));
    let permitted = PermittedNames::from_registries([&registry]).expect("one registry");
    assert!(permitted.permits(&leaf), "{registry}: {leaf:?}");
    // A subdomain exists only while the name stays within DNS's 253 characters.
    if let LeafName::Dns(dns) = &leaf
        && dns.len() + "sub.".len() <= 253
    {
        let sub = LeafName::parse(&format!("sub.{dns}")).expect("a subdomain");
        assert!(permitted.permits(&sub));
        if let Ok(lookalike) = LeafName::parse(&format!("x{dns}")) {
            assert!(!permitted.permits(&lookalike), "{lookalike:?} under {dns}");
        }
    }
});
