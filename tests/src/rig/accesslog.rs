//! The registry's access log: parsing and per-blob / per-client queries for assertions.
//!
//! CNCF distribution 2.8 writes one line per finished request to **stdout** in the Apache
//! "combined" format (gorilla/handlers), independent of its `log.level`:
//!
//! ```text
//! 10.64.3.11 - - [28/Nov/2026:06:14:22 +0000] "GET /v2/rig/four/blobs/sha256:ab.. HTTP/1.1" 200 1049088 "" "containerd/1.6.20+unknown"
//! ```
//!
//! The client address is the TCP peer (`X-Forwarded-For` is ignored), so it identifies the node.
//! A line appears only when the response is complete; the byte count is what was written, so a
//! download the client aborted shows fewer bytes than the blob has.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

use super::registry::Endpoint;

/// One request as the registry logged it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessEntry {
    /// Which listener served it.
    pub listener: Endpoint,
    /// The TCP peer's address.
    pub client_ip: IpAddr,
    /// The timestamp as logged (`28/Nov/2026:06:14:22 +0000`; one-second resolution).
    pub time: String,
    /// `GET`, `HEAD`, `PUT`, ...
    pub method: String,
    /// The request path without the query (`/v2/rig/four/blobs/sha256:...`).
    pub path: String,
    /// The raw query string without `?`, if any (`ns=registry.x.test%3A5000`).
    pub query: Option<String>,
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub protocol: String,
    /// The response status.
    pub status: u16,
    /// Response body bytes written.
    pub bytes: u64,
    /// The `User-Agent` header (`containerd/1.6.20+unknown`, `skopeo/...`).
    pub user_agent: String,
}

impl AccessEntry {
    /// Parses one combined-format line; `None` for anything else.
    pub fn parse(listener: Endpoint, line: &str) -> Option<Self> {
        let (host, rest) = line.split_once(' ')?;
        let client_ip = host.parse().ok()?;
        let rest = rest.split_once(" [")?.1;
        let (time, rest) = rest.split_once("] ")?;
        let (request, rest) = take_quoted(rest)?;
        let mut request_parts = request.split(' ');
        let method = request_parts.next()?.to_owned();
        let uri = request_parts.next()?;
        let protocol = request_parts.next().unwrap_or_default().to_owned();
        let mut numbers = rest.trim_start().splitn(3, ' ');
        let status = numbers.next()?.parse().ok()?;
        let bytes = numbers.next()?.parse().unwrap_or(0);
        let rest = numbers.next().unwrap_or_default();
        let user_agent = take_quoted(rest)
            .and_then(|(_referer, rest)| take_quoted(rest.trim_start()))
            .map(|(agent, _)| agent)
            .unwrap_or_default();
        let (path, query) = match uri.split_once('?') {
            Some((path, query)) => (path, Some(query.to_owned())),
            None => (uri, None),
        };
        Some(Self {
            listener,
            client_ip,
            time: time.to_owned(),
            method,
            path: path.to_owned(),
            query,
            protocol,
            status,
            bytes,
            user_agent,
        })
    }

    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The digest of a blob request (`/v2/<repo>/blobs/<digest>`); uploads are not blob requests.
    pub fn blob_digest(&self) -> Option<&str> {
        let (_, digest) = self.path.rsplit_once("/blobs/")?;
        is_digest(digest).then_some(digest)
    }

    /// The tag or digest of a manifest request (`/v2/<repo>/manifests/<reference>`).
    pub fn manifest_reference(&self) -> Option<&str> {
        let (_, reference) = self.path.rsplit_once("/manifests/")?;
        (!reference.is_empty() && !reference.contains('/')).then_some(reference)
    }

    /// The repository of a blob or manifest request (`rig/four`).
    pub fn repository(&self) -> Option<&str> {
        let name = self.path.strip_prefix("/v2/")?;
        let end = name
            .rfind("/blobs/")
            .or_else(|| name.rfind("/manifests/"))?;
        Some(&name[..end])
    }

    /// A query parameter, percent-decoded.
    pub fn query_param(&self, key: &str) -> Option<String> {
        self.query.as_deref()?.split('&').find_map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(name) == key).then(|| percent_decode(value))
        })
    }

    /// The `ns` parameter containerd adds to mirror requests (`registry.x.test:5000`).
    pub fn ns(&self) -> Option<String> {
        self.query_param("ns")
    }

    /// A successful blob download (GET with a 2xx status; 206 ranges included).
    pub fn is_blob_get(&self) -> bool {
        self.method == "GET" && self.is_success() && self.blob_digest().is_some()
    }
}

/// A snapshot of the registry's access log (every listener), in log order per listener.
#[derive(Clone, Debug, Default)]
pub struct RegistryLog {
    entries: Vec<AccessEntry>,
    /// Lines per listener in the files this snapshot was read from; [`RegistryLog::since`] uses
    /// them because the listeners log to separate files whose lines cannot be interleaved
    /// exactly (timestamps have one-second resolution).
    per_listener: [usize; Endpoint::ALL.len()],
}

impl RegistryLog {
    /// All entries: the plain listener's first, then the TLS listener's, then the auth one's.
    pub fn entries(&self) -> &[AccessEntry] {
        &self.entries
    }

    /// Iterates over all entries.
    pub fn iter(&self) -> std::slice::Iter<'_, AccessEntry> {
        self.entries.iter()
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entries logged after `earlier` was read (take `earlier` before the action under test).
    pub fn since(&self, earlier: &RegistryLog) -> RegistryLog {
        let mut seen = [0usize; Endpoint::ALL.len()];
        let entries = self
            .entries
            .iter()
            .filter(|entry| {
                let slot = listener_slot(entry.listener);
                seen[slot] += 1;
                seen[slot] > earlier.per_listener[slot]
            })
            .cloned()
            .collect();
        RegistryLog {
            entries,
            per_listener: self.per_listener,
        }
    }

    /// Only the entries matching `keep`.
    pub fn filter(&self, keep: impl Fn(&AccessEntry) -> bool) -> RegistryLog {
        RegistryLog {
            entries: self
                .entries
                .iter()
                .filter(|entry| keep(entry))
                .cloned()
                .collect(),
            per_listener: self.per_listener,
        }
    }

    /// Only the requests from `ip`.
    pub fn from_client(&self, ip: impl Into<IpAddr>) -> RegistryLog {
        let ip = ip.into();
        self.filter(|entry| entry.client_ip == ip)
    }

    /// Successful blob downloads ([`AccessEntry::is_blob_get`]).
    pub fn blob_gets(&self) -> impl Iterator<Item = &AccessEntry> {
        self.entries.iter().filter(|entry| entry.is_blob_get())
    }

    /// Successful blob downloads per digest, from all clients.
    pub fn blob_get_counts(&self) -> BTreeMap<String, usize> {
        count_by_digest(self.blob_gets())
    }

    /// Successful blob downloads per digest by one client (e.g. a node's IP).
    pub fn blob_gets_by(&self, ip: impl Into<IpAddr>) -> BTreeMap<String, usize> {
        let ip = ip.into();
        count_by_digest(self.blob_gets().filter(|entry| entry.client_ip == ip))
    }

    /// How often `digest` was downloaded successfully, by anyone.
    pub fn blob_get_count(&self, digest: &str) -> usize {
        self.blob_gets()
            .filter(|entry| entry.blob_digest() == Some(digest))
            .count()
    }

    /// Successful blob downloads per client, then per digest.
    pub fn blob_gets_per_client(&self) -> BTreeMap<IpAddr, BTreeMap<String, usize>> {
        let mut counts: BTreeMap<IpAddr, BTreeMap<String, usize>> = BTreeMap::new();
        for entry in self.blob_gets() {
            if let Some(digest) = entry.blob_digest() {
                *counts
                    .entry(entry.client_ip)
                    .or_default()
                    .entry(digest.to_owned())
                    .or_default() += 1;
            }
        }
        counts
    }

    /// Manifest requests (HEAD and GET, any status).
    pub fn manifest_requests(&self) -> impl Iterator<Item = &AccessEntry> {
        self.entries
            .iter()
            .filter(|entry| entry.manifest_reference().is_some())
    }

    /// Reads both listeners' access logs, waiting until they stop growing (see [`read_stable`]).
    pub(crate) async fn read(paths: &[(Endpoint, &Path)]) -> Result<Self> {
        let files: Vec<&Path> = paths.iter().map(|(_, path)| *path).collect();
        let texts = read_stable(&files).await?;
        let mut log = RegistryLog::default();
        for ((listener, _), text) in paths.iter().copied().zip(&texts) {
            for line in text.lines() {
                if let Some(entry) = AccessEntry::parse(listener, line) {
                    log.per_listener[listener_slot(listener)] += 1;
                    log.entries.push(entry);
                }
            }
        }
        Ok(log)
    }
}

impl<'a> IntoIterator for &'a RegistryLog {
    type Item = &'a AccessEntry;
    type IntoIter = std::slice::Iter<'a, AccessEntry>;

    fn into_iter(self) -> Self::IntoIter {
        self.entries.iter()
    }
}

fn listener_slot(listener: Endpoint) -> usize {
    match listener {
        Endpoint::Plain => 0,
        Endpoint::Tls => 1,
        Endpoint::Auth => 2,
    }
}

fn count_by_digest<'a>(entries: impl Iterator<Item = &'a AccessEntry>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for digest in entries.filter_map(AccessEntry::blob_digest) {
        *counts.entry(digest.to_owned()).or_default() += 1;
    }
    counts
}

/// How long the files must stay unchanged before a read counts as complete.
const QUIET_PERIOD: Duration = Duration::from_millis(100);
/// Upper bound on waiting for quiet files (a pull still running keeps them growing).
const MAX_WAIT: Duration = Duration::from_secs(5);

/// Reads the files until two reads `QUIET_PERIOD` apart agree and each ends with a full line.
///
/// The registry logs a request just *after* its response is written, so a client can finish a
/// pull a moment before the last lines land; this closes that window. Missing files read as
/// empty (the listener has not started yet).
pub(crate) async fn read_stable(paths: &[&Path]) -> Result<Vec<String>> {
    let deadline = tokio::time::Instant::now() + MAX_WAIT;
    let mut previous = read_all(paths).await?;
    loop {
        tokio::time::sleep(QUIET_PERIOD).await;
        let current = read_all(paths).await?;
        let complete = current
            .iter()
            .all(|text| text.is_empty() || text.ends_with('\n'));
        if (current == previous && complete) || tokio::time::Instant::now() >= deadline {
            return Ok(current);
        }
        previous = current;
    }
}

async fn read_all(paths: &[&Path]) -> Result<Vec<String>> {
    let mut texts = Vec::with_capacity(paths.len());
    for path in paths {
        let text = match tokio::fs::read(path).await {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(error) => {
                return Err(error).with_context(|| format!("reading {}", path.display()));
            }
        };
        texts.push(text);
    }
    Ok(texts)
}

/// Returns the content of a leading double-quoted field (backslash escapes honoured) and the rest.
fn take_quoted(text: &str) -> Option<(String, &str)> {
    let body = text.strip_prefix('"')?;
    let mut value = String::new();
    let mut chars = body.char_indices();
    while let Some((index, c)) = chars.next() {
        match c {
            '\\' => {
                if let Some((_, escaped)) = chars.next() {
                    value.push(escaped);
                }
            }
            '"' => return Some((value, &body[index + 1..])),
            other => value.push(other),
        }
    }
    None
}

fn is_digest(text: &str) -> bool {
    text.split_once(':').is_some_and(|(algorithm, hex)| {
        !algorithm.is_empty() && !hex.is_empty() && hex.chars().all(|c| c.is_ascii_hexdigit())
    })
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%' && i + 2 < bytes.len())
            .then(|| std::str::from_utf8(&bytes[i + 1..i + 3]).ok())
            .flatten()
            .filter(|hex| hex.bytes().all(|b| b.is_ascii_hexdigit()))
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match (escaped, bytes[i]) {
            (Some(decoded), _) => {
                out.push(decoded);
                i += 3;
            }
            (None, b'+') => {
                out.push(b' ');
                i += 1;
            }
            (None, byte) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BLOB: &str = "sha256:0c2ae6ed2d2b8a5c2f1a1b4b2c8d6f7e9a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d";

    fn line(ip: &str, method: &str, uri: &str, status: u16) -> String {
        format!(
            r#"{ip} - - [28/Nov/2026:06:14:22 +0000] "{method} {uri} HTTP/1.1" {status} 157 "" "containerd/1.6.20+unknown""#
        )
    }

    #[test]
    fn parses_a_real_line() {
        let text = r#"127.0.0.1 - - [28/Nov/2026:06:14:22 +0000] "HEAD /v2/foo/manifests/v1?ns=x%3A5000 HTTP/1.1" 404 92 "" "curl/7.88.1""#;
        let entry = AccessEntry::parse(Endpoint::Plain, text).unwrap();
        assert_eq!(entry.client_ip, "127.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(entry.time, "28/Nov/2026:06:14:22 +0000");
        assert_eq!(entry.method, "HEAD");
        assert_eq!(entry.path, "/v2/foo/manifests/v1");
        assert_eq!(entry.query.as_deref(), Some("ns=x%3A5000"));
        assert_eq!(entry.ns().as_deref(), Some("x:5000"));
        assert_eq!(entry.protocol, "HTTP/1.1");
        assert_eq!(entry.status, 404);
        assert_eq!(entry.bytes, 92);
        assert_eq!(entry.user_agent, "curl/7.88.1");
        assert_eq!(entry.manifest_reference(), Some("v1"));
        assert_eq!(entry.repository(), Some("foo"));
        assert_eq!(entry.blob_digest(), None);
        assert!(!entry.is_success());
    }

    #[test]
    fn ignores_other_lines() {
        assert!(
            AccessEntry::parse(Endpoint::Plain, "time=\"x\" level=warning msg=\"hi\"").is_none()
        );
        assert!(AccessEntry::parse(Endpoint::Plain, "").is_none());
        assert!(AccessEntry::parse(Endpoint::Plain, "--- rig: starting x").is_none());
    }

    #[test]
    fn escaped_quotes_in_user_agent() {
        let text = r#"10.0.0.1 - - [t] "GET /v2/ HTTP/1.1" 200 2 "" "a \"quoted\" agent""#;
        let entry = AccessEntry::parse(Endpoint::Tls, text).unwrap();
        assert_eq!(entry.user_agent, r#"a "quoted" agent"#);
        assert_eq!(entry.listener, Endpoint::Tls);
    }

    #[test]
    fn blob_paths() {
        let blob = AccessEntry::parse(
            Endpoint::Plain,
            &line(
                "10.0.0.11",
                "GET",
                &format!("/v2/rig/deep/four/blobs/{BLOB}"),
                200,
            ),
        )
        .unwrap();
        assert_eq!(blob.blob_digest(), Some(BLOB));
        assert_eq!(blob.repository(), Some("rig/deep/four"));
        assert!(blob.is_blob_get());
        for uri in [
            "/v2/rig/four/blobs/uploads/",
            "/v2/rig/four/blobs/uploads/abc-def",
        ] {
            let upload =
                AccessEntry::parse(Endpoint::Plain, &line("10.0.0.1", "POST", uri, 202)).unwrap();
            assert_eq!(upload.blob_digest(), None, "{uri}");
        }
    }

    #[test]
    fn counts_blob_gets_per_digest_and_client() {
        let other = "sha256:ffff";
        let lines = [
            line("10.0.0.11", "GET", &format!("/v2/r/blobs/{BLOB}"), 200),
            line("10.0.0.12", "GET", &format!("/v2/r/blobs/{BLOB}?ns=x"), 200),
            line("10.0.0.12", "GET", &format!("/v2/r/blobs/{other}"), 200),
            line("10.0.0.12", "HEAD", &format!("/v2/r/blobs/{other}"), 200),
            line("10.0.0.13", "GET", &format!("/v2/r/blobs/{other}"), 404),
        ];
        let log = RegistryLog {
            entries: lines
                .iter()
                .map(|text| AccessEntry::parse(Endpoint::Plain, text).unwrap())
                .collect(),
            per_listener: [lines.len(), 0, 0],
        };
        assert_eq!(log.blob_get_count(BLOB), 2);
        assert_eq!(log.blob_get_count(other), 1);
        let node2: IpAddr = "10.0.0.12".parse().unwrap();
        let by_node2 = log.blob_gets_by(node2);
        assert_eq!(by_node2.len(), 2);
        assert_eq!(by_node2[BLOB], 1);
        assert!(
            log.blob_gets_by("10.0.0.13".parse::<IpAddr>().unwrap())
                .is_empty()
        );
        assert_eq!(log.blob_gets_per_client().len(), 2);
        assert_eq!(log.from_client(node2).len(), 3);
        assert_eq!(log.manifest_requests().count(), 0);
    }

    #[test]
    fn since_counts_per_listener() {
        let entry = |listener, uri: &str| {
            AccessEntry::parse(listener, &line("10.0.0.11", "GET", uri, 200)).unwrap()
        };
        let earlier = RegistryLog {
            entries: vec![entry(Endpoint::Plain, "/a"), entry(Endpoint::Tls, "/b")],
            per_listener: [1, 1, 0],
        };
        let later = RegistryLog {
            entries: vec![
                entry(Endpoint::Plain, "/a"),
                entry(Endpoint::Plain, "/c"),
                entry(Endpoint::Tls, "/b"),
                entry(Endpoint::Tls, "/d"),
            ],
            per_listener: [2, 2, 0],
        };
        let new_entries = later.since(&earlier);
        let new: Vec<&str> = new_entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(new, ["/c", "/d"]);
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(
            percent_decode("registry.x.test%3A5000"),
            "registry.x.test:5000"
        );
        assert_eq!(percent_decode("a+b%2"), "a b%2");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(percent_decode("%+1"), "% 1");
    }

    #[tokio::test]
    async fn stable_read_of_missing_and_present_files() {
        let dir = std::env::temp_dir().join(format!("spegel-accesslog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let present = dir.join("plain.log");
        std::fs::write(&present, line("10.0.0.11", "GET", "/v2/", 200) + "\n").unwrap();
        let missing = dir.join("missing.log");
        let log = RegistryLog::read(&[(Endpoint::Plain, &present), (Endpoint::Tls, &missing)])
            .await
            .unwrap();
        assert_eq!(log.len(), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
