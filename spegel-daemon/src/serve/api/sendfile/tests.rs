use std::{
    collections::HashMap, net::SocketAddr, path::PathBuf, sync::atomic::Ordering, time::SystemTime,
};

use http::Method;
use tokio::{io::AsyncWriteExt as _, net::TcpListener};

use super::*;
use crate::{
    membership::{ClusterSecrets, PeerAuth, PlaintextAuth},
    oci::digest::Digest,
    source::{Payload, local::LocalSource},
    store::{Descriptor, Keys, Opened, Reader, Store, StoreError},
};

/// Blobs kept as files, as containerd keeps them: the store that gives [`FileRegion`]s.
struct FileStore {
    dir: tempfile::TempDir,
    sizes: Mutex<HashMap<Digest, u64>>,
}

impl FileStore {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            dir: tempfile::tempdir().unwrap(),
            sizes: Mutex::default(),
        })
    }

    fn insert(&self, bytes: &[u8]) -> Digest {
        let digest = Digest::of(bytes);
        std::fs::write(self.path(&digest), bytes).unwrap();
        self.sizes
            .lock()
            .unwrap()
            .insert(digest, bytes.len() as u64);
        digest
    }

    fn path(&self, digest: &Digest) -> PathBuf {
        self.dir.path().join(digest.hex())
    }

    fn region(&self, digest: &Digest, offset: u64, len: u64) -> FileRegion {
        let file = std::fs::File::open(self.path(digest)).unwrap();
        FileRegion { file, offset, len }
    }
}

#[async_trait::async_trait]
impl Store for FileStore {
    async fn resolve(&self, _reference: &str) -> Result<Digest, StoreError> {
        Err(StoreError::NotFound)
    }

    async fn descriptor(&self, digest: &Digest) -> Result<Descriptor, StoreError> {
        let size = *self
            .sizes
            .lock()
            .unwrap()
            .get(digest)
            .ok_or(StoreError::NotFound)?;
        Ok(Descriptor {
            digest: *digest,
            size,
            media_type: None,
        })
    }

    async fn open(&self, digest: &Digest, offset: u64, len: u64) -> Result<Reader, StoreError> {
        self.region(digest, offset, len)
            .into_reader()
            .map_err(|err| StoreError::Unavailable(err.to_string()))
    }

    async fn open_region(
        &self,
        digest: &Digest,
        offset: u64,
        len: u64,
    ) -> Result<Opened, StoreError> {
        Ok(Opened::File(self.region(digest, offset, len)))
    }

    async fn keys(&self) -> Result<Keys, StoreError> {
        Ok(Keys::default())
    }

    fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        tokio::sync::watch::Sender::new(0).subscribe()
    }
}

/// A blob large enough that `sendfile` needs several calls (more than the socket buffers).
fn blob() -> Vec<u8> {
    (0..8 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect()
}

/// [`LocalSource`] counting what it sends (through [`Payload::observe`]).
struct Counted {
    local: LocalSource,
    sent: Arc<std::sync::atomic::AtomicU64>,
}

#[async_trait::async_trait]
impl crate::source::Source for Counted {
    async fn fetch(
        &self,
        request: &crate::source::ObjectRequest,
    ) -> Result<crate::source::Object, crate::source::SourceError> {
        let mut object = self.local.fetch(request).await?;
        assert!(matches!(object.body, Payload::File(_) | Payload::Empty));
        let sent = Arc::clone(&self.sent);
        object.body.observe(move |n| {
            sent.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
        });
        Ok(object)
    }
}

/// The registry serving `store`'s blobs, with `auth`, on a loopback listener whose
/// connections all go through [`Registry::serve_plain`]; and the blob bytes it sent.
async fn start(
    store: Arc<FileStore>,
    auth: PeerAuth,
) -> (SocketAddr, Arc<std::sync::atomic::AtomicU64>) {
    let sent = Arc::default();
    let source = Counted {
        local: LocalSource::new(store),
        sent: Arc::clone(&sent),
    };
    let registry = Arc::new(Registry::new(Arc::new(source)).with_peer_auth(auth));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let shutdown = CancellationToken::new();
        while let Ok((stream, _)) = listener.accept().await {
            let (registry, shutdown) = (Arc::clone(&registry), shutdown.clone());
            tokio::spawn(async move { registry.serve_plain(stream, &shutdown).await });
        }
    });
    (addr, sent)
}

/// A registry serving one blob (see [`blob`]) and a connection to it.
struct Fixture {
    bytes: Vec<u8>,
    digest: Digest,
    /// The blob's registry API path.
    path: String,
    stream: TcpStream,
    /// Bytes of the blob sent so far, by `sendfile` or read by hyper.
    sent: Arc<std::sync::atomic::AtomicU64>,
}

async fn serving_a_blob(auth: PeerAuth) -> Fixture {
    let store = FileStore::new();
    let bytes = blob();
    let digest = store.insert(&bytes);
    let (addr, sent) = start(store, auth).await;
    Fixture {
        bytes,
        digest,
        path: format!("/v2/library/app/blobs/{digest}"),
        stream: TcpStream::connect(addr).await.unwrap(),
        sent,
    }
}

/// An answer as read off the wire.
struct Answer {
    status: u16,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

/// Sends `head` and reads one answer (its body by `Content-Length`, none for `HEAD`).
async fn exchange(stream: &mut TcpStream, head: &str) -> Answer {
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let (status, headers, head_len) = loop {
        let mut chunk = [0; 4096];
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed before the answer's head");
        buf.extend_from_slice(&chunk[..n]);
        let mut fields = [httparse::EMPTY_HEADER; 32];
        let mut parsed = httparse::Response::new(&mut fields);
        if let httparse::Status::Complete(len) = parsed.parse(&buf).unwrap() {
            let headers = parsed
                .headers
                .iter()
                .map(|h| {
                    let value = String::from_utf8_lossy(h.value).into_owned();
                    (h.name.to_ascii_lowercase(), value)
                })
                .collect::<HashMap<_, _>>();
            break (parsed.code.unwrap(), headers, len);
        }
    };
    let length: usize = headers["content-length"].parse().unwrap();
    let length = if head.starts_with("HEAD ") { 0 } else { length };
    let mut body = buf.split_off(head_len);
    while body.len() < length {
        let mut chunk = vec![0; 64 * 1024];
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(
            n > 0,
            "connection closed {} bytes early",
            length - body.len()
        );
        body.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(body.len(), length, "more bytes than announced");
    Answer {
        status,
        headers,
        body,
    }
}

fn get(path: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nhost: peer\r\n{extra}\r\n")
}

#[tokio::test]
async fn blobs_are_sent_from_their_file_on_a_kept_alive_connection() {
    let Fixture {
        bytes,
        digest,
        path,
        mut stream,
        sent,
    } = serving_a_blob(PeerAuth::Open).await;
    for round in 1..=2u64 {
        let answer = exchange(&mut stream, &get(&path, "")).await;
        assert_eq!(answer.status, 200);
        assert_eq!(answer.headers["docker-content-digest"], digest.to_string());
        assert!(answer.body == bytes, "the body differs from the blob");
        assert_eq!(sent.load(Ordering::SeqCst), round * bytes.len() as u64);
    }
}

#[tokio::test]
async fn ranges_and_heads_are_answered_and_the_connection_stays_usable() {
    let Fixture {
        bytes,
        path,
        mut stream,
        ..
    } = serving_a_blob(PeerAuth::Open).await;
    let answer = exchange(&mut stream, &get(&path, "range: bytes=1000-1999\r\n")).await;
    assert_eq!(answer.status, 206);
    assert_eq!(
        answer.headers["content-range"],
        format!("bytes 1000-1999/{}", bytes.len())
    );
    assert!(answer.body == bytes[1000..2000]);
    let head = format!("HEAD {path} HTTP/1.1\r\nhost: peer\r\n\r\n");
    let answer = exchange(&mut stream, &head).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.headers["content-length"], bytes.len().to_string());
    let answer = exchange(&mut stream, &get(&path, "range: bytes=-10\r\n")).await;
    assert!(answer.body == bytes[bytes.len() - 10..]);
}

#[tokio::test]
async fn misses_are_oci_errors_on_the_same_connection() {
    let store = FileStore::new();
    let (addr, _) = start(store, PeerAuth::Open).await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let missing = Digest::of(b"not here");
    for _ in 0..2 {
        let answer = exchange(&mut stream, &get(&format!("/v2/a/blobs/{missing}"), "")).await;
        assert_eq!(answer.status, 404);
        assert!(String::from_utf8_lossy(&answer.body).contains("BLOB_UNKNOWN"));
    }
}

#[tokio::test]
async fn other_requests_go_to_hyper_from_where_the_loop_stopped() {
    let Fixture {
        bytes,
        path,
        mut stream,
        sent,
        ..
    } = serving_a_blob(PeerAuth::Open).await;
    assert_eq!(exchange(&mut stream, &get(&path, "")).await.status, 200);
    // Not `/v2/`: hyper answers, on the same connection, and keeps serving blobs after it.
    let answer = exchange(&mut stream, &get("/livez", "")).await;
    assert_eq!((answer.status, &answer.body[..]), (200, &b"ok"[..]));
    let answer = exchange(&mut stream, &get(&path, "")).await;
    assert_eq!(answer.status, 200);
    assert!(answer.body == bytes);
    // Hyper read the same file (taken from the response) and the observer saw those bytes too.
    assert_eq!(sent.load(Ordering::SeqCst), 2 * bytes.len() as u64);
    assert!(
        !answer.headers.contains_key("connection"),
        "hyper keeps the connection"
    );
}

#[tokio::test]
async fn plaintext_clusters_check_the_request_and_sign_the_answer() {
    let auth =
        PlaintextAuth::new(&ClusterSecrets::new(&["a cluster secret, long enough"]).unwrap());
    let Fixture {
        bytes,
        digest,
        path,
        mut stream,
        ..
    } = serving_a_blob(PeerAuth::Plaintext(auth.clone())).await;
    let answer = exchange(&mut stream, &get(&path, "")).await;
    assert_eq!(answer.status, 401);
    let token = auth.sign_request(&Method::GET, &path, SystemTime::now());
    let extra = format!("x-spegel-auth: {}\r\n", token.to_str().unwrap());
    let answer = exchange(&mut stream, &get(&path, &extra)).await;
    assert_eq!(answer.status, 200);
    assert!(answer.body == bytes);
    let tag = http::HeaderValue::from_str(&answer.headers["x-spegel-auth"]).unwrap();
    let digest_value = http::HeaderValue::from_str(&digest.to_string()).unwrap();
    assert!(auth.verify_response(
        &token,
        http::StatusCode::OK,
        Some(&digest_value),
        Some(&tag)
    ));
}

#[tokio::test]
async fn a_file_shorter_than_its_region_ends_the_send_with_an_error() {
    let store = FileStore::new();
    let digest = store.insert(b"0123456789");
    let (mut client, server) = connected_pair().await;
    let region = store.region(&digest, 4, 100);
    let (sent, err) = send_region(&server, &region, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert_eq!((sent, err.kind()), (6, io::ErrorKind::UnexpectedEof));
    drop(server);
    let mut got = Vec::new();
    client.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"456789");
}

#[tokio::test]
async fn a_client_that_stops_reading_times_the_send_out() {
    let store = FileStore::new();
    let digest = store.insert(&blob());
    let (_client, server) = connected_pair().await;
    let region = store.region(&digest, 0, 8 * 1024 * 1024);
    let (sent, err) = send_region(&server, &region, Duration::from_millis(200))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    assert!(sent < region.len, "all {sent} bytes went out");
}

#[tokio::test]
async fn a_client_silent_from_the_start_is_closed_after_the_header_timeout() {
    let source = LocalSource::new(FileStore::new());
    let registry =
        Arc::new(Registry::new(Arc::new(source)).with_header_timeout(Duration::from_millis(200)));
    let (mut client, server) = connected_pair().await;
    let served = tokio::spawn(async move {
        registry
            .serve_plain(server, &CancellationToken::new())
            .await
    });
    let mut byte = [0; 1];
    let read = tokio::time::timeout(Duration::from_secs(10), client.read(&mut byte))
        .await
        .expect("still open long after the header timeout");
    assert_eq!(read.unwrap(), 0);
    served.await.unwrap().unwrap();
}

#[test]
fn only_plain_registry_reads_are_taken() {
    let taken = |head: &str| parse_head(head.as_bytes()).map(|(_, len)| len);
    let get = "GET /v2/a/blobs/sha256:00 HTTP/1.1\r\nhost: x\r\n\r\n";
    assert_eq!(taken(get), Some(get.len()));
    assert_eq!(taken(&format!("{get}GET /next")), Some(get.len()));
    for refused in [
        "GET /v2/a/blobs/sha256:00 HTTP/1.1\r\nhost: x\r\n",
        "POST /v2/a/blobs/uploads/ HTTP/1.1\r\n\r\n",
        "GET /metrics HTTP/1.1\r\n\r\n",
        "GET /v2/a/blobs/x HTTP/1.0\r\n\r\n",
        "GET /v2/a/blobs/x HTTP/1.1\r\nconnection: close\r\n\r\n",
        "GET /v2/a/blobs/x HTTP/1.1\r\ncontent-length: 5\r\n\r\nhello",
        "GET /v2/a/blobs/x HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n",
        "GET /v2/a/blobs/x HTTP/1.1\r\nupgrade: h2c\r\n\r\n",
        "GET /v2/a/blobs/x HTTP/1.1\r\nexpect: 100-continue\r\n\r\n",
        "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        "\x16\x03\x01\x02\x00",
    ] {
        assert_eq!(taken(refused), None, "{refused:?}");
    }
    let keep = "GET /v2/a/blobs/x HTTP/1.1\r\nConnection: Keep-Alive\r\ncontent-length: 0\r\n\r\n";
    assert_eq!(taken(keep), Some(keep.len()));
}

/// A loopback connection whose client side has a small receive buffer, so a client that does
/// not read stalls the server soon.
async fn connected_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let client = socket
        .connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (server, _) = listener.accept().await.unwrap();
    (client, server)
}
