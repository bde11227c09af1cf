//! Registry addresses (`oci/registry.rs`): every registry flag, `?ns=` values, `configure-mirror`
//! targets and comma-separated lists.
//!
//! Asserts: display → parse round-trips for single registries (both grammars) and lists; the
//! authority and URL forms read back as the same registry; `split_authority` agrees with the
//! parsed port.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spegel::oci::{Registry, RegistryList, split_authority};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for registry in [Registry::parse_authority(text), Registry::parse_url(text)]
        .into_iter()
        .flatten()
    {
        let shown = registry.to_string();
        assert_eq!(
            shown.parse::<Registry>().as_ref(),
            Ok(&registry),
            "{shown:?}"
        );
        let url = registry.url();
        assert_eq!(Registry::parse_url(&url).as_ref(), Ok(&registry), "{url:?}");
        let authority = registry.authority();
        let reparsed = Registry::parse_authority(&authority).expect("its own authority");
        assert_eq!(reparsed.host(), registry.host());
        assert_eq!(reparsed.port(), registry.port());
        let (_, port) = split_authority(&authority).expect("its own authority splits");
        assert_eq!(port, registry.port());
    }
    if let Ok(list) = text.parse::<RegistryList>() {
        let shown = list.to_string();
        assert_eq!(
            shown.parse::<RegistryList>().as_ref(),
            Ok(&list),
            "{shown:?}"
        );
    }
});
