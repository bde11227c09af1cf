//! The bounded provider-record store (`p2p/store.rs`) under any sequence of what peers can make
//! it do: provider records for any key, removals, expiry.
//!
//! Asserts: this node's own records are always accepted and kept; no key holds more than K
//! other providers, nor one provider twice; `provided()` is exactly the keys this node
//! provides; a purge leaves no expired record.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use spegel::fuzzing::ProviderStore;

/// libp2p's K_VALUE.
const K: usize = 20;

fuzz_target!(|data: &[u8]| {
    let Some((&max_keys, ops)) = data.split_first() else {
        return;
    };
    let mut store = ProviderStore::new(usize::from(max_keys % 16));
    let start = Instant::now();
    let mut now = start;
    for op in ops.chunks_exact(3) {
        let (key, peer) = (op[1] % 24, op[2] % ProviderStore::PEERS);
        match op[0] % 4 {
            0 | 1 => {
                // Our own records never expire (libp2p's `start_providing` sets none).
                let expires = (peer != 0 && op[0] & 0x80 != 0)
                    .then(|| now + Duration::from_millis(u64::from(op[0] & 0x3c)));
                let accepted = store.add(key, peer, expires);
                if peer == 0 {
                    assert!(accepted, "our own record for {key} refused");
                    assert!(
                        store
                            .providers(key)
                            .iter()
                            .any(|&(p, e)| p == 0 && e == expires)
                    );
                }
            }
            2 => {
                store.remove(key, peer);
                assert!(store.providers(key).iter().all(|&(p, _)| p != peer));
            }
            _ => {
                now += Duration::from_millis(u64::from(op[1]));
                store.purge_expired(now);
                for key in 0..24 {
                    assert!(
                        store
                            .providers(key)
                            .iter()
                            .all(|(_, e)| e.is_none_or(|e| e > now))
                    );
                }
            }
        }
    }
    let mut ours = std::collections::BTreeSet::new();
    for key in 0..24 {
        let providers = store.providers(key);
        let others = providers.iter().filter(|&&(p, _)| p != 0).count();
        assert!(others <= K, "key {key}: {others} other providers");
        let mut peers: Vec<u8> = providers.iter().map(|&(p, _)| p).collect();
        peers.sort_unstable();
        let n = peers.len();
        peers.dedup();
        assert_eq!(peers.len(), n, "key {key}: a provider twice");
        if peers.first() == Some(&0) {
            ours.insert(key);
        }
    }
    assert_eq!(store.provided(), ours);
});
