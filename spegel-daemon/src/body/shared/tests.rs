//! Shared fetches against a fake inner source: concurrent GETs, a leader that fails or goes
//! away, ranges, peers' GETs, and a source that breaks mid-stream.
use std::{
    io,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use bytes::Bytes;
use futures::StreamExt as _;
use http::HeaderMap;

use super::*;
use crate::{
    oci::ByteRange,
    source::{Body, ObjectRequest, Payload},
};

const WAIT: Duration = Duration::from_secs(10);
const CHUNK: usize = 64 << 10;

fn data(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 13 % 241) as u8).collect()
}

/// An upstream that answers after a moment and sends its body chunk by chunk, slowly.
struct Fake {
    content: Bytes,
    calls: AtomicUsize,
    /// Calls (from the first) answered with `Unavailable`.
    fail_calls: usize,
    /// Break the body with an error after this many bytes.
    break_at: Option<usize>,
}

impl Fake {
    fn new(content: Vec<u8>) -> Arc<Self> {
        Arc::new(Self {
            content: content.into(),
            calls: AtomicUsize::new(0),
            fail_calls: 0,
            break_at: None,
        })
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

#[async_trait::async_trait]
impl Source for Fake {
    async fn fetch(&self, request: &ObjectRequest) -> Result<Object, SourceError> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(50)).await;
        if call < self.fail_calls {
            return Err(SourceError::Unavailable("upstream is down".into()));
        }
        let size = self.content.len() as u64;
        let range = request.range.and_then(|r| r.resolve(size));
        let bytes = match &range {
            Some(r) => self.content.slice(*r.start() as usize..=*r.end() as usize),
            None => self.content.clone(),
        };
        let break_at = self.break_at;
        let chunks: Vec<io::Result<Bytes>> = bytes
            .chunks(CHUNK)
            .enumerate()
            .map(|(i, c)| match break_at {
                Some(at) if i * CHUNK >= at => Err(io::Error::other("connection reset")),
                _ => Ok(Bytes::copy_from_slice(c)),
            })
            .collect();
        let body: Body = Box::pin(futures::stream::iter(chunks).then(|chunk| async {
            tokio::time::sleep(Duration::from_millis(2)).await;
            chunk
        }));
        Ok(Object {
            digest: Digest::of(&self.content),
            media_type: "application/octet-stream".into(),
            size,
            range,
            body: Payload::Stream(body),
            source: "upstream",
        })
    }
}

fn get(digest: Digest) -> ObjectRequest {
    ObjectRequest {
        kind: Kind::Blob,
        registry: Some("r.test".into()),
        repository: "a/b".into(),
        reference: Reference::Digest(digest),
        range: None,
        head: false,
        headers: HeaderMap::new(),
        origin: Some(crate::source::Origin {
            addr: ([10, 0, 0, 9], 443).into(),
            host: "r.test".into(),
            tls: true,
        }),
        mirrored: false,
        public_only: false,
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    shared: Arc<SharedFetch>,
}

fn shared(inner: Arc<Fake>) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), 64 << 20).unwrap();
    Fixture {
        _dir: dir,
        shared: Arc::new(SharedFetch::new(inner, Some(spool))),
    }
}

async fn drain(body: Option<Body>) -> (Vec<u8>, Option<io::Error>) {
    let mut body = body.expect("a GET has a body");
    let mut out = Vec::new();
    loop {
        match tokio::time::timeout(WAIT, body.next())
            .await
            .expect("bounded")
        {
            None => return (out, None),
            Some(Ok(bytes)) => out.extend_from_slice(&bytes),
            Some(Err(err)) => return (out, Some(err)),
        }
    }
}

/// A GET's bytes, and the error that ended its body early, if any.
type Got = Result<(Vec<u8>, Option<io::Error>), SourceError>;

fn spawn_get(shared: &Arc<SharedFetch>, request: ObjectRequest) -> tokio::task::JoinHandle<Got> {
    let shared = Arc::clone(shared);
    tokio::spawn(async move {
        let object = shared.fetch(&request).await?;
        Ok(drain(object.body.into_body()).await)
    })
}

#[tokio::test]
async fn concurrent_gets_of_one_blob_share_one_fetch() {
    let content = data(1 << 20);
    let digest = Digest::of(&content);
    let fake = Fake::new(content.clone());
    let fixture = shared(Arc::clone(&fake));
    let gets: Vec<_> = (0..4)
        .map(|_| spawn_get(&fixture.shared, get(digest)))
        .collect();
    for got in gets {
        let (bytes, err) = got.await.unwrap().unwrap();
        assert!(err.is_none(), "{err:?}");
        assert!(bytes == content);
    }
    assert_eq!(fake.calls(), 1, "one fetch for four GETs");
}

#[tokio::test]
async fn the_leader_going_away_does_not_stop_the_others() {
    let content = data(1 << 20);
    let digest = Digest::of(&content);
    let fake = Fake::new(content.clone());
    let fixture = shared(Arc::clone(&fake));
    let mut leader = fixture.shared.fetch(&get(digest)).await.unwrap();
    let follower = spawn_get(&fixture.shared, get(digest));
    let mut body = leader.body.take().unwrap();
    assert!(body.next().await.unwrap().is_ok());
    drop(body);
    let (bytes, err) = follower.await.unwrap().unwrap();
    assert!(err.is_none() && bytes == content);
    assert_eq!(fake.calls(), 1);
}

#[tokio::test]
async fn when_the_leaders_fetch_fails_each_waiter_asks_itself() {
    let content = data(200_000);
    let digest = Digest::of(&content);
    let fake = Arc::new(Fake {
        fail_calls: 1,
        ..Arc::into_inner(Fake::new(content.clone())).unwrap()
    });
    let fixture = shared(Arc::clone(&fake));
    let leader = spawn_get(&fixture.shared, get(digest));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let waiters: Vec<_> = (0..2)
        .map(|_| spawn_get(&fixture.shared, get(digest)))
        .collect();
    assert!(matches!(
        leader.await.unwrap(),
        Err(SourceError::Unavailable(_))
    ));
    for waiter in waiters {
        let (bytes, err) = waiter.await.unwrap().unwrap();
        assert!(err.is_none() && bytes == content);
    }
    assert_eq!(fake.calls(), 3);
}

#[tokio::test]
async fn a_break_mid_stream_reaches_every_reader() {
    let content = data(1 << 20);
    let digest = Digest::of(&content);
    let fake = Arc::new(Fake {
        break_at: Some(300_000),
        ..Arc::into_inner(Fake::new(content.clone())).unwrap()
    });
    let fixture = shared(Arc::clone(&fake));
    let gets: Vec<_> = (0..3)
        .map(|_| spawn_get(&fixture.shared, get(digest)))
        .collect();
    for got in gets {
        let (bytes, err) = got.await.unwrap().unwrap();
        assert!(err.is_some(), "the break reaches the reader");
        assert!(bytes.len() < content.len());
    }
    assert_eq!(fake.calls(), 1);
}

#[tokio::test]
async fn a_range_is_cut_from_a_fetch_in_flight_and_asked_for_alone_otherwise() {
    let content = data(1 << 20);
    let digest = Digest::of(&content);
    let fake = Fake::new(content.clone());
    let fixture = shared(Arc::clone(&fake));
    let ranged = |start, end| ObjectRequest {
        range: Some(ByteRange::From {
            start,
            end: Some(end),
        }),
        ..get(digest)
    };
    // No fetch in flight: the range goes to the inner source as it is.
    let (bytes, err) = spawn_get(&fixture.shared, ranged(10, 19))
        .await
        .unwrap()
        .unwrap();
    assert!(err.is_none() && bytes[..] == content[10..20]);
    assert_eq!(fake.calls(), 1);
    // While one is: cut from it.
    let whole = fixture.shared.fetch(&get(digest)).await.unwrap();
    let object = fixture
        .shared
        .fetch(&ranged(500_000, 500_099))
        .await
        .unwrap();
    assert_eq!(object.range, Some(500_000..=500_099));
    let (bytes, err) = drain(object.body.into_body()).await;
    assert!(err.is_none() && bytes[..] == content[500_000..500_100]);
    assert_eq!(fake.calls(), 2);
    drop(whole);
}

#[tokio::test]
async fn a_peers_get_is_served_from_a_fetch_in_flight_and_never_starts_one() {
    let content = data(500_000);
    let digest = Digest::of(&content);
    let fake = Fake::new(content.clone());
    let fixture = shared(Arc::clone(&fake));
    let from_peer = ObjectRequest {
        mirrored: true,
        public_only: false,
        ..get(digest)
    };
    assert!(matches!(
        fixture.shared.fetch(&from_peer).await,
        Err(SourceError::NotFound)
    ));
    assert_eq!(fake.calls(), 0, "a peer request is never forwarded");
    let own = fixture.shared.fetch(&get(digest)).await.unwrap();
    assert!(fixture.shared.in_flight().has(&digest));
    let (bytes, err) = spawn_get(&fixture.shared, from_peer)
        .await
        .unwrap()
        .unwrap();
    assert!(err.is_none() && bytes == content);
    assert_eq!(fake.calls(), 1);
    drop(own);
}

#[tokio::test]
async fn heads_and_manifests_pass_through() {
    let content = data(1000);
    let digest = Digest::of(&content);
    let fake = Fake::new(content);
    let fixture = shared(Arc::clone(&fake));
    let head = ObjectRequest {
        head: true,
        ..get(digest)
    };
    fixture.shared.fetch(&head).await.unwrap();
    fixture.shared.fetch(&head).await.unwrap();
    assert_eq!(fake.calls(), 2);
}

/// The daemon notes what upstream gave (`serve::access::NotesPublic`) *below* the shared
/// fetch: a GET that joins another's fetch got no answer from upstream for its own credentials,
/// so it must neither confirm that client's access nor make the blob public.
#[tokio::test]
async fn a_get_joining_anothers_fetch_is_not_noted_as_upstreams_answer() {
    use crate::serve::access::{AccessArgs, NotesPublic};
    let content = data(1 << 20);
    let digest = Digest::of(&content);
    let args = AccessArgs {
        public_registries: Vec::new(),
        all_public: false,
        access_cache_ttl: Duration::from_secs(60),
    };
    let access = Arc::new(args.access(Arc::default()));
    let fake = Fake::new(content.clone());
    let noted = NotesPublic::new(Arc::clone(&fake) as Arc<dyn Source>, Arc::clone(&access));
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), 64 << 20).unwrap();
    let shared = Arc::new(SharedFetch::new(Arc::new(noted), Some(spool)));
    let mut private = get(digest);
    private.headers.insert(
        http::header::AUTHORIZATION,
        http::HeaderValue::from_static("Bearer secret"),
    );
    let leader = spawn_get(&shared, private);
    tokio::time::sleep(Duration::from_millis(10)).await;
    let (bytes, err) = spawn_get(&shared, get(digest)).await.unwrap().unwrap();
    assert!(err.is_none() && bytes == content, "the joiner is served");
    leader.await.unwrap().unwrap();
    assert_eq!(fake.calls(), 1, "the second GET joined the first");
    assert!(
        !access.is_public(None, digest),
        "fetched with credentials, joined without: not public"
    );
}
