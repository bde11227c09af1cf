//! The Kademlia record store: provider records only, bounded, with expired records purged.
//!
//! libp2p's `MemoryStore` drops an expired provider record only when someone asks for its key,
//! so records of keys nobody looks up again pile up until the key limit is hit, after which even
//! this node's own keys are refused. This store purges on a timer, never lets other nodes' records
//! crowd out our own, and refuses value records altogether (spegel does not use them, and accepting
//! them would let any peer park data in our memory).
use std::{
    borrow::Cow,
    collections::{HashMap, hash_map},
    iter,
};

use libp2p::{
    PeerId,
    kad::{
        K_VALUE, ProviderRecord, Record, RecordKey,
        store::{Error, RecordStore, Result},
    },
};

/// Provider records by key, bounded in keys and in providers per key.
#[derive(Debug)]
pub(crate) struct ProviderStore {
    local: PeerId,
    /// Keys whose providers include other nodes, at most.
    max_keys: usize,
    providers: HashMap<RecordKey, Vec<ProviderRecord>>,
    /// Our own records (also in `providers`), which Kademlia asks for separately.
    provided: HashMap<RecordKey, ProviderRecord>,
}

impl ProviderStore {
    pub(crate) fn new(local: PeerId, max_keys: usize) -> Self {
        Self {
            local,
            max_keys,
            providers: HashMap::new(),
            provided: HashMap::new(),
        }
    }

    /// Drops expired records; returns how many.
    pub(crate) fn purge_expired(&mut self, now: std::time::Instant) -> usize {
        let mut purged = 0;
        self.providers.retain(|_, records| {
            let before = records.len();
            records.retain(|r| !r.is_expired(now));
            purged += before - records.len();
            !records.is_empty()
        });
        purged
    }

    /// Keys with at least one provider record.
    #[cfg(test)]
    pub(super) fn key_count(&self) -> usize {
        self.providers.len()
    }
}

impl RecordStore for ProviderStore {
    type RecordsIter<'a> = iter::Empty<Cow<'a, Record>>;
    type ProvidedIter<'a> = iter::Map<
        hash_map::Values<'a, RecordKey, ProviderRecord>,
        fn(&'a ProviderRecord) -> Cow<'a, ProviderRecord>,
    >;

    fn get(&self, _: &RecordKey) -> Option<Cow<'_, Record>> {
        None
    }

    fn put(&mut self, _: Record) -> Result<()> {
        Err(Error::MaxRecords)
    }

    fn remove(&mut self, _: &RecordKey) {}

    fn records(&self) -> Self::RecordsIter<'_> {
        iter::empty()
    }

    fn add_provider(&mut self, record: ProviderRecord) -> Result<()> {
        let is_local = record.provider == self.local;
        let key_count = self.providers.len();
        let records = match self.providers.entry(record.key.clone()) {
            hash_map::Entry::Occupied(entry) => entry.into_mut(),
            hash_map::Entry::Vacant(entry) => {
                // Our own keys are bounded by what the store holds; only others' are capped.
                if !is_local && key_count >= self.max_keys {
                    return Err(Error::MaxProvidedKeys);
                }
                entry.insert(Vec::new())
            }
        };
        if is_local {
            self.provided.insert(record.key.clone(), record.clone());
        }
        if let Some(existing) = records.iter_mut().find(|r| r.provider == record.provider) {
            *existing = record;
        } else if records.len() < K_VALUE.get() || is_local {
            // Beyond K providers a key is well served; ignoring newcomers also blunts floods
            // of fake providers.
            records.push(record);
        }
        Ok(())
    }

    fn providers(&self, key: &RecordKey) -> Vec<ProviderRecord> {
        self.providers.get(key).cloned().unwrap_or_default()
    }

    fn provided(&self) -> Self::ProvidedIter<'_> {
        self.provided.values().map(Cow::Borrowed)
    }

    fn remove_provider(&mut self, key: &RecordKey, provider: &PeerId) {
        if let hash_map::Entry::Occupied(mut entry) = self.providers.entry(key.clone()) {
            entry.get_mut().retain(|r| r.provider != *provider);
            if entry.get().is_empty() {
                entry.remove();
            }
        }
        if *provider == self.local {
            self.provided.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    fn key(n: u32) -> RecordKey {
        RecordKey::new(&n.to_be_bytes())
    }

    fn record(key: RecordKey, provider: PeerId, expires: Option<Instant>) -> ProviderRecord {
        ProviderRecord {
            key,
            provider,
            expires,
            addresses: Vec::new(),
        }
    }

    #[test]
    fn bounds_others_but_never_us() {
        let local = PeerId::random();
        let mut store = ProviderStore::new(local, 2);
        let other = PeerId::random();
        store.add_provider(record(key(1), other, None)).unwrap();
        store.add_provider(record(key(2), other, None)).unwrap();
        assert!(matches!(
            store.add_provider(record(key(3), other, None)),
            Err(Error::MaxProvidedKeys)
        ));
        store.add_provider(record(key(3), local, None)).unwrap();
        assert_eq!(store.provided().count(), 1);
        // An existing key still takes more providers, up to K.
        for _ in 0..K_VALUE.get() + 5 {
            store
                .add_provider(record(key(1), PeerId::random(), None))
                .unwrap();
        }
        assert_eq!(store.providers(&key(1)).len(), K_VALUE.get());
        store.add_provider(record(key(1), local, None)).unwrap();
        assert!(store.providers(&key(1)).iter().any(|r| r.provider == local));

        store.remove_provider(&key(3), &local);
        assert_eq!(store.providers(&key(3)).len(), 0);
        assert_eq!(store.provided().count(), 1, "key 1 is still ours");
    }

    #[test]
    fn purges_expired_records_and_refuses_values() {
        let local = PeerId::random();
        let mut store = ProviderStore::new(local, 10);
        let now = Instant::now();
        let soon = now + Duration::from_secs(1);
        store
            .add_provider(record(key(1), PeerId::random(), Some(soon)))
            .unwrap();
        store
            .add_provider(record(key(2), PeerId::random(), Some(soon)))
            .unwrap();
        store
            .add_provider(record(key(2), PeerId::random(), None))
            .unwrap();
        store.add_provider(record(key(3), local, None)).unwrap();
        assert_eq!(store.purge_expired(now), 0);
        assert_eq!(store.purge_expired(soon), 2);
        assert_eq!(store.key_count(), 2);
        assert_eq!(store.providers(&key(2)).len(), 1);

        assert!(store.put(Record::new(key(9), b"value".to_vec())).is_err());
        assert!(store.get(&key(9)).is_none());
        assert_eq!(store.records().count(), 0);
    }
}
