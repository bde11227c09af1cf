//! The node's containerd as a [`Store`]: images and content over its gRPC socket, blobs read
//! straight from its content directory when we can, and an index of what to advertise that
//! follows containerd's image events and a periodic resync.
use std::{
    collections::HashMap,
    future::Future,
    io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError, RwLock},
    time::Duration,
};

use bytes::Bytes;
use containerd_client::{
    services::v1::{
        GetImageRequest, ImageCreate, ImageDelete, ImageUpdate, InfoRequest, ListContentRequest,
        ListImagesRequest, PluginsRequest, ReadContentRequest, SubscribeRequest,
        content_client::ContentClient, events_client::EventsClient, images_client::ImagesClient,
        introspection_client::IntrospectionClient,
    },
    tonic::{self, Code, Request, Status, metadata::AsciiMetadataValue, transport::Channel},
    types::Envelope,
};
use futures::{FutureExt as _, StreamExt as _};
use prost::Message as _;
use tokio::{
    io::{AsyncReadExt as _, AsyncSeekExt as _},
    sync::{Notify, watch},
    time::{Instant, timeout},
};
use tokio_util::{
    io::StreamReader,
    sync::{CancellationToken, DropGuard},
};
use tracing::Instrument as _;

use crate::{
    oci::digest::Digest, store::Descriptor, store::Keys, store::Reader, store::Store,
    store::StoreError, store::walk, store::walk::Blobs, store::walk::Exact,
    store::walk::ImageRecord, store::walk::Index, store::walk::MAX_DOCUMENT_SIZE,
    store::walk::ParseCache,
};

/// Flags of the containerd store.
#[derive(Debug, Clone, clap::Args)]
pub struct ContainerdArgs {
    /// containerd's gRPC socket.
    #[arg(
        long,
        env = "SPEGEL_CONTAINERD_SOCK",
        default_value = "/run/containerd/containerd.sock"
    )]
    pub containerd_sock: PathBuf,
    /// The containerd namespace whose images are served (the kubelet's is `k8s.io`).
    #[arg(long, env = "SPEGEL_CONTAINERD_NAMESPACE", default_value = "k8s.io", value_parser = parse_namespace)]
    pub containerd_namespace: String,
    /// containerd's content store directory (holding `blobs/sha256/`), read directly when
    /// readable. Unset or empty: ask containerd, else /var/lib/containerd/io.containerd.content.v1.content.
    #[arg(long, env = "SPEGEL_CONTAINERD_CONTENT_PATH")]
    pub containerd_content_path: Option<PathBuf>,
    /// How often to re-walk every image even without events (containerd before 2.1 sends no
    /// content events, so layers arriving for an existing image are only seen this way).
    #[arg(long, env = "SPEGEL_STORE_RESYNC", value_parser = parse_resync, default_value = "60s")]
    pub store_resync: Duration,
}

/// Why the containerd store could not start or refresh.
#[derive(Debug, thiserror::Error)]
pub enum ContainerdError {
    /// The namespace is not one containerd accepts.
    #[error("invalid containerd namespace {0:?}")]
    Namespace(String),
    /// The socket could not be reached.
    #[error("cannot connect to containerd at {}: {source}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
    /// containerd did not answer in time.
    #[error("containerd did not answer {call} within {timeout:?}")]
    Timeout {
        call: &'static str,
        timeout: Duration,
    },
    /// containerd answered with an error.
    #[error("containerd {call} failed: {code:?}: {message}")]
    Call {
        call: &'static str,
        code: Code,
        message: String,
    },
    /// Reading content for the walk failed.
    #[error("reading content failed: {0}")]
    Content(#[from] StoreError),
}

/// The node's containerd. Cheap to clone; the background tasks (event subscription, resync)
/// stop when the last clone is dropped.
#[derive(Clone)]
pub struct ContainerdStore {
    inner: Arc<Inner>,
    _background: Arc<DropGuard>,
}

/// Unary calls and the walk's listings must not hang the daemon on a wedged containerd.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
const LIST_TIMEOUT: Duration = Duration::from_secs(60);
/// A CRI pull fires several image events within milliseconds; one walk covers them all.
const DEBOUNCE: Duration = Duration::from_millis(250);
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// An event stream that lived this long was healthy: the next failure starts backing off afresh.
const HEALTHY_STREAM: Duration = Duration::from_secs(30);
/// Media types sniffed for content no walk has typed, remembered up to this many digests.
const SNIFF_CACHE: usize = 1024;
const DEFAULT_CONTENT_ROOT: &str = "/var/lib/containerd/io.containerd.content.v1.content";
const CONTENT_PLUGIN_FILTER: &str = r#"type=="io.containerd.content.v1",id=="content""#;
const IMAGE_EVENTS_FILTER: &str = r#"topic~="/images/""#;
const NAMESPACE_HEADER: &str = "containerd-namespace";

struct Inner {
    channel: Channel,
    namespace: String,
    namespace_header: AsciiMetadataValue,
    /// `<content root>/blobs/sha256`, when it was readable at start.
    blobs_dir: Option<PathBuf>,
    index: RwLock<Arc<Index>>,
    /// Held for a whole walk: walks never overlap, and the last one wins.
    walk: tokio::sync::Mutex<ParseCache>,
    sniffed: Mutex<HashMap<Digest, Option<String>>>,
    changes: watch::Sender<u64>,
    /// Asks the background loop for a (debounced) walk.
    refresh: Notify,
}

impl ContainerdStore {
    /// Connects to containerd, finds its content directory, walks every image once, and starts
    /// following image events. Fails when containerd cannot be reached or cannot list images.
    pub async fn connect(args: &ContainerdArgs) -> Result<Self, ContainerdError> {
        let namespace = parse_namespace(&args.containerd_namespace)
            .map_err(|_| ContainerdError::Namespace(args.containerd_namespace.clone()))?;
        let namespace_header = AsciiMetadataValue::try_from(namespace.as_str())
            .map_err(|_| ContainerdError::Namespace(namespace.clone()))?;
        let channel = timeout(
            CALL_TIMEOUT,
            containerd_client::connect(&args.containerd_sock),
        )
        .await
        .map_err(|_| ContainerdError::Timeout {
            call: "connect",
            timeout: CALL_TIMEOUT,
        })?
        .map_err(|source| ContainerdError::Connect {
            path: args.containerd_sock.clone(),
            source,
        })?;
        let mut inner = Inner {
            channel,
            namespace,
            namespace_header,
            blobs_dir: None,
            index: RwLock::default(),
            walk: tokio::sync::Mutex::default(),
            sniffed: Mutex::default(),
            changes: watch::Sender::new(0),
            refresh: Notify::new(),
        };
        let root = match args
            .containerd_content_path
            .as_ref()
            .filter(|p| !p.as_os_str().is_empty())
        {
            Some(path) => path.clone(),
            None => inner.content_root().await.unwrap_or_else(|err| {
                tracing::warn!(%err, default = DEFAULT_CONTENT_ROOT, "cannot ask containerd for its content directory");
                PathBuf::from(DEFAULT_CONTENT_ROOT)
            }),
        };
        let blobs_dir = root.join("blobs").join("sha256");
        // Decide on the content root, not on `blobs/sha256`: containerd creates that only with
        // the first blob, and a node that starts empty must still read files directly once it
        // has some (each read falls back to the API if its file is not there).
        inner.blobs_dir = match tokio::fs::metadata(&root).await {
            Ok(meta) if meta.is_dir() => {
                tracing::info!(dir = %blobs_dir.display(), "reading blobs from containerd's content directory");
                Some(blobs_dir)
            }
            _ => {
                tracing::info!(dir = %blobs_dir.display(), "content directory not readable; reading blobs through containerd's API");
                None
            }
        };
        let inner = Arc::new(inner);
        inner.rebuild().await?;

        let cancel = CancellationToken::new();
        let span = tracing::info_span!("containerd_store", namespace = %inner.namespace);
        tokio::spawn(watch_events(inner.clone(), cancel.clone()).instrument(span.clone()));
        // The flag parser enforces this too; a zero period would make the interval panic.
        let resync = args.store_resync.max(Duration::from_secs(1));
        tokio::spawn(refresh_loop(inner.clone(), cancel.clone(), resync).instrument(span));
        Ok(Self {
            inner,
            _background: Arc::new(cancel.drop_guard()),
        })
    }

    /// Re-walks every image now, and moves [`Store::changes`] if the keys changed.
    pub async fn refresh(&self) -> Result<(), ContainerdError> {
        self.inner.rebuild().await.map(|_| ())
    }

    /// The directory blobs are read from directly, if any.
    pub fn blobs_dir(&self) -> Option<&Path> {
        self.inner.blobs_dir.as_deref()
    }

    /// The containerd namespace served.
    pub fn namespace(&self) -> &str {
        &self.inner.namespace
    }
}

impl Inner {
    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request
            .metadata_mut()
            .insert(NAMESPACE_HEADER, self.namespace_header.clone());
        request
    }

    fn index(&self) -> Arc<Index> {
        self.index
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// containerd's content root, from the content plugin's exports. `Plugins` rather than
    /// `PluginInfo`: the latter only exists from containerd 2.0.
    async fn content_root(&self) -> Result<PathBuf, ContainerdError> {
        let mut client = IntrospectionClient::new(self.channel.clone());
        let response = call(
            "introspection.plugins",
            client.plugins(self.request(PluginsRequest {
                filters: vec![CONTENT_PLUGIN_FILTER.to_owned()],
            })),
        )
        .await?;
        response
            .plugins
            .iter()
            .find_map(|plugin| plugin.exports.get("root"))
            .filter(|root| !root.is_empty())
            .map(PathBuf::from)
            .ok_or(ContainerdError::Call {
                call: "introspection.plugins",
                code: Code::NotFound,
                message: "the content plugin exports no root".to_owned(),
            })
    }

    async fn info(&self, digest: &Digest) -> Result<u64, ContainerdError> {
        let mut client = ContentClient::new(self.channel.clone());
        let response = call(
            "content.info",
            client.info(self.request(InfoRequest {
                digest: digest.to_string(),
            })),
        )
        .await?;
        let size = response.info.map_or(-1, |info| info.size);
        u64::try_from(size).map_err(|_| ContainerdError::Call {
            call: "content.info",
            code: Code::Internal,
            message: format!("invalid size {size} for {digest}"),
        })
    }

    async fn list_images(&self) -> Result<Vec<ImageRecord>, ContainerdError> {
        let mut client = ImagesClient::new(self.channel.clone());
        let response = call_within(
            "images.list",
            LIST_TIMEOUT,
            client.list(self.request(ListImagesRequest { filters: vec![] })),
        )
        .await?;
        Ok(response
            .images
            .into_iter()
            .filter_map(|image| {
                let target = image.target?;
                let Ok(digest) = target.digest.parse() else {
                    tracing::debug!(image = %image.name, digest = %target.digest, "skipping image with an unsupported digest");
                    return None;
                };
                Some(ImageRecord {
                    name: image.name,
                    target: digest,
                    media_type: Some(target.media_type).filter(|m| !m.is_empty()),
                })
            })
            .collect())
    }

    /// Every object in the namespace and its size: one streamed listing instead of an Info per
    /// descriptor the walk meets.
    async fn list_content(&self) -> Result<HashMap<Digest, u64>, ContainerdError> {
        let listing = async {
            let mut client = ContentClient::new(self.channel.clone());
            let mut stream = client
                .list(self.request(ListContentRequest { filters: vec![] }))
                .await?
                .into_inner();
            let mut present = HashMap::new();
            while let Some(response) = stream.message().await? {
                for info in response.info {
                    if let (Ok(digest), Ok(size)) = (info.digest.parse(), u64::try_from(info.size))
                    {
                        present.insert(digest, size);
                    }
                }
            }
            Ok::<_, Status>(present)
        };
        match timeout(LIST_TIMEOUT, listing).await {
            Ok(Ok(present)) => Ok(present),
            Ok(Err(status)) => Err(status_error("content.list", status)),
            Err(_) => Err(ContainerdError::Timeout {
                call: "content.list",
                timeout: LIST_TIMEOUT,
            }),
        }
    }

    /// Re-walks every image; returns whether the advertised keys changed (and if so, moves
    /// the change counter).
    async fn rebuild(&self) -> Result<bool, ContainerdError> {
        let mut cache = self.walk.lock().await;
        let started = Instant::now();
        let images = self.list_images().await?;
        let present = self.list_content().await?;
        let blobs = ContentBlobs {
            inner: self,
            present,
        };
        let index = walk::walk(&images, &blobs, &mut cache).await?;
        let (objects, tags) = (index.objects.len(), index.tags.len());
        let changed = {
            let mut slot = self.index.write().unwrap_or_else(PoisonError::into_inner);
            let changed = slot.keys() != index.keys();
            *slot = Arc::new(index);
            changed
        };
        if changed {
            self.changes.send_modify(|n| *n += 1);
        }
        tracing::debug!(
            images = images.len(),
            objects,
            tags,
            changed,
            elapsed = ?started.elapsed(),
            "walked containerd images"
        );
        Ok(changed)
    }

    /// The whole content of a small object: from the content directory, else over gRPC.
    async fn read_small(&self, digest: &Digest, size: u64) -> Result<Bytes, StoreError> {
        if size > MAX_DOCUMENT_SIZE {
            return Err(StoreError::Unavailable(format!(
                "{digest} is too large to read whole"
            )));
        }
        if let Some(dir) = &self.blobs_dir {
            match read_file(&dir.join(digest.hex()), size).await {
                Ok(bytes) => return Ok(bytes),
                Err(err) => {
                    tracing::debug!(%digest, %err, "reading through containerd's API instead")
                }
            }
        }
        let mut reader = self.open_grpc(digest, 0, size).await?;
        let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or_default());
        reader
            .read_to_end(&mut bytes)
            .await
            .map_err(|err| StoreError::Unavailable(format!("reading {digest}: {err}")))?;
        Ok(Bytes::from(bytes))
    }

    async fn open_grpc(
        &self,
        digest: &Digest,
        offset: u64,
        len: u64,
    ) -> Result<Reader, StoreError> {
        let (Ok(offset), Ok(size)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(StoreError::Unavailable(format!(
                "range {offset}+{len} is out of containerd's range"
            )));
        };
        if size == 0 {
            return Ok(Box::pin(tokio::io::empty()));
        }
        let mut client = ContentClient::new(self.channel.clone());
        let mut stream = call(
            "content.read",
            client.read(self.request(ReadContentRequest {
                digest: digest.to_string(),
                offset,
                size,
            })),
        )
        .await
        .map_err(StoreError::from)?;
        // A missing digest may be reported with the first message rather than the response
        // headers: look at it so that absence is `NotFound`, not a broken body later.
        let first = match timeout(CALL_TIMEOUT, stream.message()).await {
            Ok(Ok(first)) => first,
            Ok(Err(status)) => return Err(status_error("content.read", status).into()),
            Err(_) => {
                return Err(ContainerdError::Timeout {
                    call: "content.read",
                    timeout: CALL_TIMEOUT,
                }
                .into());
            }
        };
        let body = futures::stream::iter(first.map(Ok))
            .chain(stream)
            .map(|message| {
                message
                    .map(|m| Bytes::from(m.data))
                    .map_err(io::Error::other)
            });
        Ok(Box::pin(Exact::new(StreamReader::new(body), len)))
    }

    /// The media type of content the walk did not type, sniffed from its bytes.
    async fn sniff(&self, digest: &Digest, size: u64) -> Option<String> {
        if size > MAX_DOCUMENT_SIZE {
            return None;
        }
        if let Some(known) = self.sniffed_cache().get(digest) {
            return known.clone();
        }
        let bytes = match self.read_small(digest, size).await {
            Ok(bytes) => bytes,
            Err(err) => {
                tracing::debug!(%digest, %err, "cannot read content to sniff its media type");
                return None;
            }
        };
        if Digest::of(&bytes) != *digest {
            return None;
        }
        let media_type = walk::sniff_media_type(&bytes);
        let mut cache = self.sniffed_cache();
        if cache.len() >= SNIFF_CACHE {
            cache.clear();
        }
        cache.insert(*digest, media_type.clone());
        media_type
    }

    fn sniffed_cache(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Option<String>>> {
        // A cache: whatever a panicking holder left behind is still a valid cache.
        self.sniffed.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The walk's view of containerd: sizes from one listing, reads through [`Inner::read_small`].
struct ContentBlobs<'a> {
    inner: &'a Inner,
    present: HashMap<Digest, u64>,
}

#[async_trait::async_trait]
impl Blobs for ContentBlobs<'_> {
    fn size(&self, digest: &Digest) -> Option<u64> {
        self.present.get(digest).copied()
    }

    async fn read(&self, digest: &Digest, size: u64) -> Result<Bytes, StoreError> {
        self.inner.read_small(digest, size).await
    }
}

#[async_trait::async_trait]
impl Store for ContainerdStore {
    async fn resolve(&self, reference: &str) -> Result<Digest, StoreError> {
        // Asked live rather than from the index: a tag moved by a pull a moment ago must not
        // resolve to the old digest until the next walk.
        let name = walk::tag_reference(reference).ok_or(StoreError::NotFound)?;
        let inner = &self.inner;
        let mut client = ImagesClient::new(inner.channel.clone());
        let response = call(
            "images.get",
            client.get(inner.request(GetImageRequest {
                name: name.to_owned(),
            })),
        )
        .await?;
        let digest: Digest = response
            .image
            .and_then(|image| image.target)
            .and_then(|target| target.digest.parse().ok())
            .ok_or(StoreError::NotFound)?;
        // An image record whose content is gone (or still arriving) is not ours to serve.
        inner.info(&digest).await?;
        Ok(digest)
    }

    async fn descriptor(&self, digest: &Digest) -> Result<Descriptor, StoreError> {
        let size = self.inner.info(digest).await?;
        let media_type = match self.inner.index().media_type(digest) {
            Some(known) => Some(known),
            None => self.inner.sniff(digest, size).await,
        };
        Ok(Descriptor {
            digest: *digest,
            size,
            media_type,
        })
    }

    async fn open(&self, digest: &Digest, offset: u64, len: u64) -> Result<Reader, StoreError> {
        if let Some(dir) = &self.inner.blobs_dir {
            match open_file(&dir.join(digest.hex()), offset, len).await {
                Ok(reader) => return Ok(reader),
                Err(err) => {
                    tracing::debug!(%digest, %err, "reading through containerd's API instead")
                }
            }
        }
        self.inner.open_grpc(digest, offset, len).await
    }

    async fn keys(&self) -> Result<Keys, StoreError> {
        Ok(self.inner.index().keys())
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }
}

impl From<ContainerdError> for StoreError {
    fn from(err: ContainerdError) -> Self {
        match err {
            ContainerdError::Call {
                code: Code::NotFound,
                ..
            } => StoreError::NotFound,
            ContainerdError::Content(err) => err,
            other => StoreError::Unavailable(other.to_string()),
        }
    }
}

async fn call<T>(
    name: &'static str,
    request: impl Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<T, ContainerdError> {
    call_within(name, CALL_TIMEOUT, request).await
}

async fn call_within<T>(
    name: &'static str,
    limit: Duration,
    request: impl Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<T, ContainerdError> {
    match timeout(limit, request).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err(status_error(name, status)),
        Err(_) => Err(ContainerdError::Timeout {
            call: name,
            timeout: limit,
        }),
    }
}

fn status_error(call: &'static str, status: Status) -> ContainerdError {
    ContainerdError::Call {
        call,
        code: status.code(),
        message: status.message().to_owned(),
    }
}

/// Opens `len` bytes at `offset` of a blob file, refusing files shorter than that (a file being
/// replaced, or not what containerd says it is).
async fn open_file(path: &Path, offset: u64, len: u64) -> io::Result<Reader> {
    let mut file = tokio::fs::File::open(path).await?;
    let file_len = file.metadata().await?.len();
    if offset.checked_add(len).is_none_or(|end| end > file_len) {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("range {offset}+{len} is outside a file of {file_len} bytes"),
        ));
    }
    file.seek(io::SeekFrom::Start(offset)).await?;
    Ok(Box::pin(Exact::new(file, len)))
}

async fn read_file(path: &Path, size: u64) -> io::Result<Bytes> {
    let mut reader = open_file(path, 0, size).await?;
    let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or_default());
    reader.read_to_end(&mut bytes).await?;
    Ok(Bytes::from(bytes))
}

/// Follows containerd's image events for as long as the store lives, reconnecting with backoff;
/// every event in our namespace (and every reconnect, since events may have been missed) asks
/// for a walk.
async fn watch_events(inner: Arc<Inner>, cancel: CancellationToken) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let started = Instant::now();
        let outcome = tokio::select! {
            _ = cancel.cancelled() => return,
            outcome = follow_events(&inner) => outcome,
        };
        if started.elapsed() >= HEALTHY_STREAM {
            backoff = BACKOFF_MIN;
        }
        tracing::warn!(err = %outcome, retry_in = ?backoff, "containerd event stream ended");
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// One event subscription, until it breaks; returns why.
async fn follow_events(inner: &Inner) -> ContainerdError {
    let mut client = EventsClient::new(inner.channel.clone());
    // No namespace header: the subscription sees every namespace, ours is picked below.
    let request = Request::new(SubscribeRequest {
        filters: vec![IMAGE_EVENTS_FILTER.to_owned()],
    });
    // Whatever happened while we were not subscribed needs a walk. Asked for before
    // subscribing: containerd sends the response headers only with the first event, so the
    // subscription cannot be awaited first (nor with a deadline). The walk is debounced, by
    // which time the subscription is in place.
    inner.refresh.notify_one();
    tracing::debug!("subscribing to containerd image events");
    let mut stream = match client.subscribe(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => return status_error("events.subscribe", status),
    };
    loop {
        match stream.message().await {
            Ok(Some(envelope)) => {
                if envelope.namespace == inner.namespace {
                    log_event(&envelope);
                    inner.refresh.notify_one();
                }
            }
            Ok(None) => {
                return ContainerdError::Call {
                    call: "events.subscribe",
                    code: Code::Unavailable,
                    message: "stream closed".to_owned(),
                };
            }
            Err(status) => return status_error("events.subscribe", status),
        }
    }
}

fn log_event(envelope: &Envelope) {
    let Some(event) = &envelope.event else { return };
    // containerd's Any carries the bare message name, without a `type.googleapis.com/` prefix.
    let value = event.value.as_slice();
    let name = match event.type_url.rsplit(['.', '/']).next() {
        Some("ImageCreate") => ImageCreate::decode(value).ok().map(|e| e.name),
        Some("ImageUpdate") => ImageUpdate::decode(value).ok().map(|e| e.name),
        Some("ImageDelete") => ImageDelete::decode(value).ok().map(|e| e.name),
        _ => None,
    };
    tracing::debug!(topic = %envelope.topic, image = name.as_deref().unwrap_or("?"), "containerd image event");
}

/// Walks when asked (debounced) and every `period`; a failed walk keeps the previous index.
async fn refresh_loop(inner: Arc<Inner>, cancel: CancellationToken, period: Duration) {
    let mut resync = tokio::time::interval_at(Instant::now() + period, period);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = resync.tick() => {}
            _ = inner.refresh.notified() => {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(DEBOUNCE) => {}
                }
                // Requests that arrived while debouncing are covered by this walk.
                let _ = inner.refresh.notified().now_or_never();
            }
        }
        if let Err(err) = inner.rebuild().await {
            tracing::warn!(%err, "walking containerd images failed; keeping the previous keys");
        }
    }
}

/// containerd's namespace grammar: alphanumeric labels joined by `.`, `_` or `-`, at most 76
/// characters.
fn parse_namespace(s: &str) -> Result<String, String> {
    let labels_ok = s
        .split(['.', '_', '-'])
        .all(|label| !label.is_empty() && label.bytes().all(|b| b.is_ascii_alphanumeric()));
    if s.is_empty() || s.len() > 76 || !labels_ok {
        return Err(format!(
            "invalid containerd namespace `{s}` (alphanumeric labels joined by `.`, `_` or `-`)"
        ));
    }
    Ok(s.to_owned())
}

fn parse_resync(s: &str) -> Result<Duration, String> {
    let period =
        humantime::parse_duration(s).map_err(|e| format!("invalid duration `{s}`: {e}"))?;
    if period < Duration::from_secs(1) {
        return Err(format!("--store-resync must be at least 1s, got `{s}`"));
    }
    Ok(period)
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use tokio::io::AsyncReadExt as _;

    use super::*;

    #[test]
    fn namespaces() {
        for good in ["k8s.io", "default", "a", "a-b_c.d9", &"a".repeat(76)] {
            assert_eq!(parse_namespace(good).as_deref(), Ok(good));
        }
        for bad in [
            "",
            ".k8s",
            "k8s.",
            "a..b",
            "a/b",
            "a b",
            "ä",
            "a\nb",
            &"a".repeat(77),
        ] {
            assert!(parse_namespace(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn flags() {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: ContainerdArgs,
        }
        let cli = Cli::try_parse_from(["x"]).unwrap();
        assert_eq!(
            cli.args.containerd_sock,
            Path::new("/run/containerd/containerd.sock")
        );
        assert_eq!(cli.args.containerd_namespace, "k8s.io");
        assert_eq!(cli.args.store_resync, Duration::from_secs(60));
        let cli = Cli::try_parse_from([
            "x",
            "--containerd-content-path",
            "/c",
            "--store-resync",
            "5m",
            "--containerd-namespace",
            "default",
        ])
        .unwrap();
        assert_eq!(
            cli.args.containerd_content_path.as_deref(),
            Some(Path::new("/c"))
        );
        assert_eq!(cli.args.store_resync, Duration::from_secs(300));
        assert!(Cli::try_parse_from(["x", "--store-resync", "0s"]).is_err());
        assert!(Cli::try_parse_from(["x", "--containerd-namespace", "a/b"]).is_err());
    }

    #[tokio::test]
    async fn file_reads_are_exact() {
        let mut file = tempfile();
        file.1.write_all(b"0123456789").unwrap();
        let mut out = String::new();
        open_file(&file.0, 3, 4)
            .await
            .unwrap()
            .read_to_string(&mut out)
            .await
            .unwrap();
        assert_eq!(out, "3456");
        assert!(open_file(&file.0, 8, 3).await.is_err());
        assert!(open_file(&file.0, u64::MAX, 1).await.is_err());
        assert_eq!(&read_file(&file.0, 10).await.unwrap()[..], b"0123456789");
        assert!(read_file(&file.0, 11).await.is_err());
        assert!(
            open_file(Path::new("/nonexistent/spegel/blob"), 0, 1)
                .await
                .is_err()
        );
        std::fs::remove_file(&file.0).unwrap();
    }

    fn tempfile() -> (PathBuf, std::fs::File) {
        let path = std::env::temp_dir().join(format!(
            "spegel-containerd-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let file = std::fs::File::create(&path).unwrap();
        (path, file)
    }

    #[tokio::test]
    async fn connect_fails_cleanly_without_containerd() {
        let args = ContainerdArgs {
            containerd_sock: PathBuf::from("/nonexistent/spegel/containerd.sock"),
            containerd_namespace: "k8s.io".into(),
            containerd_content_path: None,
            store_resync: Duration::from_secs(60),
        };
        let err = ContainerdStore::connect(&args).await.err().unwrap();
        assert!(
            matches!(
                err,
                ContainerdError::Connect { .. } | ContainerdError::Call { .. }
            ),
            "{err}"
        );
        let bad = ContainerdArgs {
            containerd_namespace: "no/slashes".into(),
            ..args
        };
        assert!(matches!(
            ContainerdStore::connect(&bad).await,
            Err(ContainerdError::Namespace(_))
        ));
    }
}
