//! Response bodies: an object's bytes held to the announced length, and the access log that is
//! written when a response body ends.
use std::{
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt as _;
use tokio::time::Instant;

use super::{BoxError, HttpBody};
use crate::source;

/// An object's bytes, exactly `remaining` of them. A source that fails, sends too much or stops
/// early makes the body fail, so hyper aborts the response (closes the HTTP/1.1 connection or
/// resets the h2 stream) and the client never sees a clean, short body.
pub(super) struct ObjectBody {
    stream: source::Body,
    remaining: u64,
    done: bool,
}

impl ObjectBody {
    pub(super) fn new(stream: source::Body, length: u64) -> Self {
        Self {
            stream,
            remaining: length,
            done: false,
        }
    }

    fn fail(&mut self, message: String) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.done = true;
        Poll::Ready(Some(Err(std::io::Error::other(message).into())))
    }
}

impl Body for ObjectBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.done || this.remaining == 0 {
            this.done = true;
            return Poll::Ready(None);
        }
        match ready!(this.stream.as_mut().poll_next(cx)) {
            Some(Ok(chunk)) => {
                let len = chunk.len() as u64;
                if len > this.remaining {
                    return this.fail(format!(
                        "source sent {} bytes more than announced",
                        len - this.remaining
                    ));
                }
                this.remaining -= len;
                Poll::Ready(Some(Ok(Frame::data(chunk))))
            }
            Some(Err(err)) => {
                this.done = true;
                Poll::Ready(Some(Err(err.into())))
            }
            None => {
                let missing = this.remaining;
                this.fail(format!("source ended {missing} bytes early"))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(if self.done { 0 } else { self.remaining })
    }
}

/// One line of access log, written when the response body is finished or dropped.
pub(super) struct AccessLog {
    method: Method,
    path: String,
    source: &'static str,
    start: Instant,
    recent: Option<std::sync::Arc<crate::metrics::recent::RecentServed>>,
}

impl AccessLog {
    pub(super) fn new(method: &Method, path: &str) -> Self {
        Self {
            method: method.clone(),
            path: path.to_owned(),
            source: "none",
            start: Instant::now(),
            recent: None,
        }
    }

    /// Also record the response into `recent` when it ends (objects served by a source only).
    pub(super) fn record_into(
        &mut self,
        recent: std::sync::Arc<crate::metrics::recent::RecentServed>,
    ) {
        self.recent = Some(recent);
    }

    /// Which source answered (`local`, `peer`, `upstream`, `passthrough`).
    pub(super) fn set_source(&mut self, source: &'static str) {
        self.source = source;
    }

    /// Attach the log to `response`: it is written once its body ends.
    pub(super) fn finish(self, response: Response<HttpBody>) -> Response<HttpBody> {
        let status = response.status();
        response.map(|inner| {
            LoggedBody {
                inner,
                log: self,
                status,
                bytes: 0,
                error: None,
                finished: false,
            }
            .boxed_unsync()
        })
    }
}

/// Counts the bytes of a response body and writes the access log when it ends.
struct LoggedBody {
    inner: HttpBody,
    log: AccessLog,
    status: StatusCode,
    bytes: u64,
    error: Option<String>,
    finished: bool,
}

impl Body for LoggedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes += data.len() as u64;
                }
            }
            Some(Err(err)) => this.error = Some(err.to_string()),
            None => this.finished = true,
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        let complete = self.finished || self.inner.is_end_stream();
        self.log
            .write(self.status, self.bytes, complete, self.error.as_deref());
    }
}

impl AccessLog {
    /// Write the log for a response whose body went out another way (`sendfile`): `bytes` of
    /// it, all of it when `complete`, else cut short by `error`.
    pub(super) fn sent(self, status: StatusCode, bytes: u64, error: Option<&str>) {
        self.write(status, bytes, error.is_none(), error);
    }

    fn write(&self, status: StatusCode, bytes: u64, complete: bool, error: Option<&str>) {
        let duration_ms = self.start.elapsed().as_secs_f64() * 1000.0;
        if let Some(recent) = &self.recent
            && matches!(self.source, "local" | "peer" | "upstream")
        {
            recent.record(
                self.method.as_str(),
                &self.path,
                self.source,
                status.as_u16(),
                bytes,
                self.start.elapsed(),
                complete && error.is_none(),
            );
        }
        let status = status.as_u16();
        let (method, path, source) = (&self.method, &self.path, self.source);
        if let Some(error) = error {
            tracing::warn!(
                %method, %path, status, bytes, source, duration_ms, %error,
                "response aborted: the body failed mid-stream"
            );
        } else if status >= 500 {
            tracing::warn!(
                %method, %path, status, bytes, source, duration_ms,
                "request failed"
            );
        } else {
            tracing::debug!(
                %method, %path, status, bytes, source, duration_ms, complete,
                "request"
            );
        }
    }
}
