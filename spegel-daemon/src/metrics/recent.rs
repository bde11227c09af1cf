//! The last objects served, for the admin status page: a small ring buffer the registry API's
//! access log records each finished response into (`serve/api/body.rs`).
use std::{
    collections::VecDeque,
    sync::Mutex,
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};

/// How many served objects the status page shows unless told otherwise.
pub const DEFAULT_RECENT: usize = 50;

/// One served response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServedRecord {
    /// When it finished, in milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    pub method: String,
    pub path: String,
    /// `local`, `peer` or `upstream`.
    pub source: String,
    pub status: u16,
    /// Body bytes sent.
    pub bytes: u64,
    pub duration_ms: f64,
    /// Whether the whole body was sent.
    pub complete: bool,
}

impl ServedRecord {
    /// Bytes per second over the whole response (0 for an instant one).
    pub fn bytes_per_sec(&self) -> f64 {
        if self.duration_ms <= 0.0 {
            0.0
        } else {
            self.bytes as f64 * 1000.0 / self.duration_ms
        }
    }
}

/// The last `capacity` served objects, oldest dropped first.
#[derive(Debug)]
pub struct RecentServed {
    // A std mutex: it is never held across an await, only for a push or a copy.
    records: Mutex<VecDeque<ServedRecord>>,
    capacity: usize,
}

impl Default for RecentServed {
    fn default() -> Self {
        Self::new(DEFAULT_RECENT)
    }
}

impl RecentServed {
    pub fn new(capacity: usize) -> Self {
        Self {
            records: Mutex::new(VecDeque::with_capacity(capacity)),
            capacity,
        }
    }

    /// Records a response that finished now.
    #[allow(
        clippy::too_many_arguments,
        reason = "one field each, from the access log"
    )]
    pub fn record(
        &self,
        method: &str,
        path: &str,
        source: &str,
        status: u16,
        bytes: u64,
        duration: Duration,
        complete: bool,
    ) {
        if self.capacity == 0 {
            return;
        }
        let at_unix_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |since| since.as_millis() as u64);
        let record = ServedRecord {
            at_unix_ms,
            method: method.to_owned(),
            path: path.to_owned(),
            source: source.to_owned(),
            status,
            bytes,
            duration_ms: duration.as_secs_f64() * 1000.0,
            complete,
        };
        let Ok(mut records) = self.records.lock() else {
            return;
        };
        while records.len() >= self.capacity {
            records.pop_front();
        }
        records.push_back(record);
    }

    /// The records, newest first.
    pub fn newest_first(&self) -> Vec<ServedRecord> {
        self.records
            .lock()
            .map(|records| records.iter().rev().cloned().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_n_newest_first() {
        let recent = RecentServed::new(3);
        for i in 0..5u64 {
            recent.record(
                "GET",
                &format!("/v2/r/blobs/{i}"),
                "peer",
                200,
                i * 1000,
                Duration::from_millis(500),
                true,
            );
        }
        let records = recent.newest_first();
        let paths: Vec<&str> = records.iter().map(|r| r.path.as_str()).collect();
        assert_eq!(paths, ["/v2/r/blobs/4", "/v2/r/blobs/3", "/v2/r/blobs/2"]);
        assert_eq!(records[0].bytes_per_sec(), 8000.0);
        assert_eq!(records[0].source, "peer");
        assert!(records[0].at_unix_ms > 0);
        let none = RecentServed::new(0);
        none.record("GET", "/", "local", 200, 1, Duration::ZERO, true);
        assert!(none.newest_first().is_empty());
    }

    #[test]
    fn an_instant_response_has_no_speed() {
        let record = ServedRecord {
            at_unix_ms: 0,
            method: "GET".into(),
            path: "/".into(),
            source: "local".into(),
            status: 200,
            bytes: 10,
            duration_ms: 0.0,
            complete: true,
        };
        assert_eq!(record.bytes_per_sec(), 0.0);
    }
}
