//! Plain-HTTP peer connections (authenticated plaintext or an open cluster) served with
//! `sendfile(2)`: a blob this node has goes from containerd's content file to the socket inside
//! the kernel, never copied through this process.
//!
//! The loop reads each request's head itself and answers it through [`Registry::respond`], so
//! routing, the HMAC check, the access rules and the response headers are the same code as
//! hyper's path; only the body is sent differently when the answer is a local file. It handles
//! `GET` and `HEAD` of `/v2/…` without a body. At the first request it does not handle (another
//! method or path, a body, an upgrade, h2c, a head that did not arrive in one read) the
//! connection goes to hyper from that request on: heads are only peeked until this loop takes
//! them, so hyper sees the connection exactly where this loop left it.
use std::{
    io,
    os::fd::{AsRawFd as _, RawFd},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use bytes::Bytes;
use futures::StreamExt as _;
use http::{Request, Response, header};
use http_body_util::{BodyExt as _, Empty};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _, Interest},
    net::TcpStream,
};
use tokio_util::sync::CancellationToken;

use super::{BoxError, Caller, HttpBody, Registry, RequestContext};
use crate::{
    source::{Body, FileBody},
    store::FileRegion,
};

/// The longest request head this loop reads; longer ones go to hyper.
const MAX_HEAD: usize = 8 * 1024;
/// The most header fields this loop parses; more go to hyper.
const MAX_HEADERS: usize = 64;
/// The most one `sendfile` call is asked to move (it returns early when the socket is full).
const MAX_SENDFILE: usize = 16 * 1024 * 1024;

/// A local file an answer's body may be sent from, in the response's extensions (which hyper
/// ignores: on its path the body is read as usual and this is dropped with the response).
#[derive(Clone)]
pub(super) struct FileResponse(Arc<Mutex<Option<FileBody>>>);

impl FileResponse {
    pub(super) fn new(file: FileBody) -> Self {
        Self(Arc::new(Mutex::new(Some(file))))
    }

    fn take(&self) -> Option<FileBody> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }

    /// The file read as a stream, taken when first polled (empty if the plain loop took it).
    pub(super) fn into_stream(self) -> Body {
        Box::pin(
            futures::stream::once(async move { self.take() })
                .filter_map(std::future::ready)
                .flat_map(FileBody::into_stream),
        )
    }
}

impl Registry {
    /// Serves a plain connection from another host (see the module documentation) until it
    /// closes, idles for the idle timeout or `shutdown` is cancelled between requests.
    pub(super) async fn serve_plain(
        self: &Arc<Self>,
        mut stream: TcpStream,
        shutdown: &CancellationToken,
    ) -> Result<(), BoxError> {
        let ctx = RequestContext {
            caller: Caller::Remote,
            ..RequestContext::default()
        };
        let mut head = vec![0; MAX_HEAD];
        // The first request must come within the header timeout, as on hyper's path; later
        // ones within the idle timeout.
        let mut wait = self.header_timeout;
        loop {
            let peeked = tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(wait) => return Ok(()),
                peeked = stream.peek(&mut head) => peeked?,
            };
            wait = self.idle_timeout;
            if peeked == 0 {
                return Ok(());
            }
            let Some((request, head_len)) = parse_head(&head[..peeked]) else {
                return self.serve_accepted(stream, Caller::Remote, shutdown).await;
            };
            stream.read_exact(&mut head[..head_len]).await?;
            let (mut response, log) = self.respond(request, ctx.clone()).await;
            let file = response
                .extensions_mut()
                .remove::<FileResponse>()
                .and_then(|file| file.take());
            let close = !response.headers().contains_key(header::CONTENT_LENGTH);
            let status = response.status();
            // Corked, the head and the file leave in full segments, as nginx's `tcp_nopush`.
            let _cork = file.as_ref().map(|_| Cork::new(&stream));
            if let Err(err) = self
                .write(&mut stream, &response_head(&response, close))
                .await
            {
                log.sent(status, 0, Some(&err.to_string()));
                return Err(err.into());
            }
            match file {
                Some(file) => {
                    let result = send_region(&stream, &file.region, self.write_timeout).await;
                    let sent = match &result {
                        Ok(()) => file.region.len,
                        Err((sent, _)) => *sent,
                    };
                    file.sent(sent);
                    self.stats
                        .sendfile_bytes
                        .fetch_add(sent, std::sync::atomic::Ordering::Relaxed);
                    let error = result.as_ref().err().map(|(_, err)| err.to_string());
                    log.sent(status, sent, error.as_deref());
                    if let Err((_, err)) = result {
                        return Err(err.into());
                    }
                }
                None => {
                    let mut body = log.finish(response).into_body();
                    while let Some(frame) = body.frame().await {
                        if let Ok(data) = frame?.into_data() {
                            self.write(&mut stream, &data).await?;
                        }
                    }
                }
            }
            if close {
                return Ok(());
            }
        }
    }

    /// Writes `bytes`, failing with `TimedOut` when the client reads nothing for the write
    /// timeout (as on hyper's path).
    async fn write(&self, stream: &mut TcpStream, bytes: &[u8]) -> io::Result<()> {
        match tokio::time::timeout(self.write_timeout, stream.write_all(bytes)).await {
            Ok(result) => result,
            Err(_) => Err(io::ErrorKind::TimedOut.into()),
        }
    }
}

/// The request a head asks for and the head's length, when this loop handles it: HTTP/1.1
/// `GET` or `HEAD` of `/v2/…`, no body, no upgrade, keep-alive.
fn parse_head(bytes: &[u8]) -> Option<(Request<Empty<Bytes>>, usize)> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let httparse::Status::Complete(len) = parsed.parse(bytes).ok()? else {
        return None;
    };
    let (method, path) = (parsed.method?, parsed.path?);
    if parsed.version != Some(1) || !matches!(method, "GET" | "HEAD") || !path.starts_with("/v2/") {
        return None;
    }
    let mut request = Request::builder().method(method).uri(path);
    for field in parsed.headers.iter() {
        let plain = match field.name.to_ascii_lowercase().as_str() {
            "content-length" => field.value == b"0",
            "connection" => field.value.eq_ignore_ascii_case(b"keep-alive"),
            "transfer-encoding" | "upgrade" | "expect" => false,
            _ => true,
        };
        if !plain {
            return None;
        }
        request = request.header(field.name, field.value);
    }
    Some((request.body(Empty::new()).ok()?, len))
}

/// The status line and header fields of `response`, with `Connection: close` when `close`.
fn response_head(response: &Response<HttpBody>, close: bool) -> Vec<u8> {
    let status = response.status();
    let mut head = format!(
        "HTTP/1.1 {} {}\r\n",
        status.as_str(),
        status.canonical_reason().unwrap_or("")
    )
    .into_bytes();
    for (name, value) in response.headers() {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    if close {
        head.extend_from_slice(b"connection: close\r\n");
    }
    head.extend_from_slice(b"\r\n");
    head
}

/// Sends all of `region` to `stream`, each call bounded by `write_timeout`; on failure, how
/// much was sent and why it stopped (a file shorter than announced ends it too).
async fn send_region(
    stream: &TcpStream,
    region: &FileRegion,
    write_timeout: Duration,
) -> Result<(), (u64, io::Error)> {
    let (socket, file) = (stream.as_raw_fd(), region.file.as_raw_fd());
    let mut offset = libc::off_t::try_from(region.offset)
        .map_err(|_| (0, io::Error::other("file offset out of range")))?;
    let mut sent = 0;
    while sent < region.len {
        let want = usize::try_from(region.len - sent)
            .unwrap_or(usize::MAX)
            .min(MAX_SENDFILE);
        let call = stream.async_io(Interest::WRITABLE, || {
            sendfile_once(socket, file, &mut offset, want)
        });
        match tokio::time::timeout(write_timeout, call).await {
            Ok(Ok(0)) => {
                let err = io::Error::new(io::ErrorKind::UnexpectedEof, "the file ended early");
                return Err((sent, err));
            }
            Ok(Ok(moved)) => sent += moved as u64,
            Ok(Err(err)) => return Err((sent, err)),
            Err(_) => return Err((sent, io::ErrorKind::TimedOut.into())),
        }
    }
    Ok(())
}

/// `TCP_CORK` on a socket for as long as this lives: only full segments leave until it is
/// dropped, which sends what is left at once.
struct Cork(RawFd);

impl Cork {
    fn new(stream: &TcpStream) -> Self {
        let cork = Self(stream.as_raw_fd());
        cork.set(1);
        cork
    }

    fn set(&self, on: libc::c_int) {
        // SAFETY: setsockopt on a descriptor its stream keeps open for the call, with a c_int
        // option value and its size.
        let _ = unsafe {
            libc::setsockopt(
                self.0,
                libc::IPPROTO_TCP,
                libc::TCP_CORK,
                std::ptr::from_ref(&on).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
    }
}

impl Drop for Cork {
    fn drop(&mut self) {
        self.set(0);
    }
}

/// One `sendfile(2)` call from `file` at `offset` (advanced by what moved) to `socket`.
fn sendfile_once(
    socket: RawFd,
    file: RawFd,
    offset: &mut libc::off_t,
    count: usize,
) -> io::Result<usize> {
    loop {
        // SAFETY: both descriptors are borrowed from owners that outlive the call, and `offset`
        // is a valid, exclusively borrowed off_t the kernel reads and advances.
        let moved = unsafe { libc::sendfile(socket, file, offset, count) };
        match usize::try_from(moved) {
            Ok(moved) => return Ok(moved),
            Err(_) => {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    return Err(err);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
