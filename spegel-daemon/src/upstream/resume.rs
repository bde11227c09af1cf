//! A blob body from upstream that survives a stall or a broken connection: when the body sends
//! nothing for the idle timeout, fails, or ends early, the rest is asked for again with
//! `Range: bytes=<next>-<last>` on a new request (a bounded number of times), and the new bytes
//! go through the same [`BodyCheck`] — so the digest covers every byte, whichever response
//! carried it. A resumed answer must be a 206 for exactly the bytes asked; anything else (a 200
//! from an upstream that ignores `Range`, another span) ends the body with an error rather than
//! splicing bytes that do not belong there.
use std::{io, time::Duration};

use bytes::Bytes;
use futures::{Stream, StreamExt as _};
use http::{HeaderMap, Method, StatusCode, header};

use super::{UpstreamClient, body::data_stream};
use crate::{
    body::BodyCheck,
    oci::{self, ByteRange},
    source::{Body, Origin},
};

type Data = Box<dyn Stream<Item = io::Result<Bytes>> + Send + Unpin>;

/// Where a blob body comes from, for asking again.
pub(super) struct Resumable {
    pub(super) client: UpstreamClient,
    pub(super) origin: Origin,
    pub(super) path: String,
    /// The request's headers, without `Range`.
    pub(super) headers: HeaderMap,
    /// Absolute offset of the body's first byte in the blob.
    pub(super) start: u64,
    /// The blob's size.
    pub(super) total: u64,
    /// How many times the body may be resumed.
    pub(super) attempts: usize,
}

struct State {
    from: Resumable,
    check: BodyCheck,
    /// Bytes the body must carry in all.
    len: u64,
    current: Option<Data>,
    resumes: usize,
    done: bool,
}

/// `body` (the first response's, `len` bytes from `from.start`) checked by `check`, resumed
/// from `from` when it fails.
pub(super) fn resuming(
    body: hyper::body::Incoming,
    idle: Duration,
    check: BodyCheck,
    len: u64,
    mut from: Resumable,
) -> Body {
    from.headers.remove(header::RANGE);
    let state = State {
        from,
        check,
        len,
        current: Some(Box::new(data_stream(body, idle))),
        resumes: 0,
        done: false,
    };
    Box::pin(futures::stream::unfold(state, |mut state| async move {
        let item = state.next_item().await?;
        Some((item, state))
    }))
}

impl State {
    async fn next_item(&mut self) -> Option<io::Result<Bytes>> {
        loop {
            if self.done {
                return None;
            }
            let failure = match self.current.as_mut()?.next().await {
                Some(Ok(chunk)) => match self.check.push(chunk) {
                    Ok(Some(bytes)) => return Some(Ok(bytes)),
                    Ok(None) => continue,
                    Err(err) => return self.fail(err.into_io("upstream")),
                },
                // Ended before the last byte (a clean close mid-body): resumable.
                None if self.check.seen() < self.len => io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "body ended after {} of {} bytes",
                        self.check.seen(),
                        self.len
                    ),
                ),
                None => {
                    self.done = true;
                    return match self.check.finish() {
                        Ok(tail) => tail.map(Ok),
                        Err(err) => Some(Err(err.into_io("upstream"))),
                    };
                }
                Some(Err(err)) => err,
            };
            self.current = None;
            if let Err(err) = self.resume(failure).await {
                return self.fail(err);
            }
        }
    }

    fn fail(&mut self, err: io::Error) -> Option<io::Result<Bytes>> {
        self.done = true;
        self.current = None;
        Some(Err(err))
    }

    /// Asks for the rest again until a response carries it or the attempts are used up.
    async fn resume(&mut self, mut failure: io::Error) -> io::Result<()> {
        let from = &self.from;
        while self.resumes < from.attempts {
            self.resumes += 1;
            let next = from.start + self.check.seen();
            tracing::info!(
                host = %from.origin.host,
                path = %from.path,
                offset = next,
                attempt = self.resumes,
                %failure,
                "upstream blob body failed; resuming with Range"
            );
            match reopen(from, next, from.start + self.len).await {
                Ok(data) => {
                    self.current = Some(data);
                    return Ok(());
                }
                Err(Refused::Retry(err)) => failure = err,
                Err(Refused::Final(err)) => return Err(err),
            }
        }
        Err(io::Error::new(
            failure.kind(),
            format!(
                "upstream body of {} failed after {} resumes: {failure}",
                from.path, self.resumes
            ),
        ))
    }
}

/// Why a resume did not get the bytes.
enum Refused {
    /// Worth another attempt (the request failed).
    Retry(io::Error),
    /// Upstream answered with something else than the bytes asked for: asking again would not
    /// help.
    Final(io::Error),
}

/// Asks upstream for bytes `next..end` (half-open, absolute) of the blob.
async fn reopen(from: &Resumable, next: u64, end: u64) -> Result<Data, Refused> {
    let mut headers = from.headers.clone();
    let range = ByteRange::From {
        start: next,
        end: Some(end - 1),
    };
    headers.insert(header::RANGE, range.header_value());
    let timeouts = from.client.timeouts();
    let response = from
        .client
        .get_following_redirects(
            &from.origin,
            Method::GET,
            &from.path,
            headers,
            timeouts.response,
        )
        .await
        .map_err(|err| Refused::Retry(io::Error::other(err.to_string())))?;
    let status = response.status();
    if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
        return Err(Refused::Retry(io::Error::other(format!(
            "upstream answered the resume with {status}"
        ))));
    }
    let refuse = |what: String| {
        tracing::warn!(path = %from.path, offset = next, "{what}");
        Refused::Final(io::Error::new(io::ErrorKind::InvalidData, what))
    };
    if status != StatusCode::PARTIAL_CONTENT {
        return Err(refuse(format!(
            "upstream answered a resume from byte {next} with {status}, not 206: the body cannot continue"
        )));
    }
    match oci::content_range(response.headers()) {
        Some((range, total))
            if *range.start() == next && *range.end() == end - 1 && total == from.total => {}
        other => {
            return Err(refuse(format!(
                "upstream answered a resume from byte {next} with Content-Range {other:?}"
            )));
        }
    }
    if oci::content_length(response.headers()).is_some_and(|len| len != end - next) {
        return Err(refuse(
            "upstream Content-Length disagrees with its Content-Range".to_owned(),
        ));
    }
    Ok(Box::new(data_stream(response.into_body(), timeouts.idle)))
}
