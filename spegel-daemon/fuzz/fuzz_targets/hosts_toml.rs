//! `configure-mirror` (`mirror.rs`): the `hosts.toml` files written from the registry and
//! target flags (the daemon never parses an existing `hosts.toml`: it copies it byte for byte
//! into its backup, so what it writes is the input containerd parses).
//!
//! Input: `<registries>\n<targets>`, as the flags take them. Asserts: every file is valid TOML
//! that says exactly what was asked: the `server` of its registry and one `[host."<url>"]`
//! table per distinct target, with the capabilities asked for.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spegel::{
    mirror::{MirrorConfig, hosts_files, parse_target},
    oci::{Host, RegistryList},
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (registries, targets) = text.split_once('\n').unwrap_or((text, ""));
    let resolve_tags = registries.len() % 2 == 0;
    let Ok(registries) = registries.parse::<RegistryList>() else {
        return;
    };
    let Ok(targets) = targets
        .split(',')
        .filter(|t| !t.is_empty())
        .map(parse_target)
        .collect::<Result<Vec<_>, _>>()
    else {
        return;
    };
    let config = MirrorConfig {
        registries: registries.into_vec(),
        targets,
        resolve_tags,
    };
    let Ok(files) = hosts_files(&config) else {
        return;
    };
    let mut urls: Vec<String> = config.targets.iter().map(|t| t.url()).collect();
    urls.dedup();
    let capabilities: &[&str] = if resolve_tags {
        &["pull", "resolve"]
    } else {
        &["pull"]
    };
    for (dir, content) in &files {
        assert!(!dir.is_empty() && !dir.contains('/') && dir != "." && dir != "..");
        let table: toml::Table = toml::from_str(content)
            .unwrap_or_else(|e| panic!("{dir}/hosts.toml is not TOML: {e}\n{content}"));
        let registry = config.registries.iter().find(|r| r.authority() == *dir);
        match (registry, table.get("server")) {
            (Some(registry), Some(toml::Value::String(server))) => {
                // docker.io is served by registry-1.docker.io.
                let expected = match registry.host() {
                    Host::Name(name) if name == "docker.io" => {
                        registry
                            .url()
                            .replacen("://docker.io", "://registry-1.docker.io", 1)
                    }
                    _ => registry.url(),
                };
                assert_eq!(server, &expected);
            }
            (None, None) => assert_eq!(dir, "_default"),
            other => panic!("{dir}: {other:?}"),
        }
        let hosts = table.get("host").and_then(toml::Value::as_table);
        let names: Vec<&String> = hosts.map(|h| h.keys().collect()).unwrap_or_default();
        let mut sorted_urls = urls.clone();
        sorted_urls.sort();
        sorted_urls.dedup();
        let mut names: Vec<String> = names.into_iter().cloned().collect();
        names.sort();
        assert_eq!(names, sorted_urls, "{content}");
        for host in hosts.into_iter().flat_map(|h| h.values()) {
            let caps: Vec<&str> = host
                .get("capabilities")
                .and_then(toml::Value::as_array)
                .expect("capabilities")
                .iter()
                .filter_map(toml::Value::as_str)
                .collect();
            assert_eq!(caps, capabilities);
        }
    }
});
