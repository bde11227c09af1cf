//! The admin HTTP server: HTTP/1.1, GET only, a few connections at a time, each bounded in
//! time; stops accepting when the daemon shuts down.
use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderValue, Method, Response, StatusCode, header, request::Parts};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::sync::CancellationToken;

use super::{AdminState, host_allowed, render};

/// Connections served at once; more wait in the backlog.
const MAX_CONNECTIONS: usize = 16;
/// A connection (its requests included) is closed after this long.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Headers must arrive within this long.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves the admin endpoint on `listener` until `stop`.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, stop: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            () = stop.cancelled() => return,
            permit = Arc::clone(&slots).acquire_owned() => permit,
        };
        let Ok(permit) = permit else {
            return;
        };
        let (stream, _) = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "admin endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            },
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let _permit = permit;
            let service = service_fn(move |request| {
                let state = Arc::clone(&state);
                // Only the head is needed, and it is `Sync` (the body is not read).
                let (parts, _body) = request.into_parts();
                async move { Ok::<_, Infallible>(answer(&state, &parts).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, connection).await;
        });
    }
}

/// The answer to one request.
pub(super) async fn answer(state: &AdminState, request: &Parts) -> Response<Full<Bytes>> {
    let host = request
        .headers
        .get(header::HOST)
        .and_then(|host| host.to_str().ok());
    if !host_allowed(host) {
        return plain(
            StatusCode::FORBIDDEN,
            "the admin endpoint answers only requests for an IP address or localhost\n",
        );
    }
    if request.method != Method::GET && request.method != Method::HEAD {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "read-only: GET only\n");
    }
    match request.uri.path() {
        "/" => {
            let status = state.status().await;
            respond(render::page(&status), "text/html; charset=utf-8")
        }
        "/status.json" => {
            let status = state.status().await;
            match serde_json::to_string_pretty(&status) {
                Ok(json) => respond(json, "application/json"),
                Err(error) => plain(StatusCode::INTERNAL_SERVER_ERROR, &format!("{error}\n")),
            }
        }
        _ => plain(StatusCode::NOT_FOUND, "not found: try / or /status.json\n"),
    }
}

fn respond(body: String, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // Nothing on the page may load or run anything, nor be framed by another site.
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'",
        ),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

fn plain(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut response = respond(text.to_owned(), "text/plain; charset=utf-8");
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt as _;

    use super::*;

    fn get(path: &str, host: Option<&str>) -> Parts {
        let mut builder = http::Request::get(path);
        if let Some(host) = host {
            builder = builder.header(header::HOST, host);
        }
        builder.body(()).unwrap().into_parts().0
    }

    async fn body(response: Response<Full<Bytes>>) -> String {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn serves_the_page_and_the_json_to_local_hosts_only() {
        let state = AdminState::default();
        let page = answer(&state, &get("/", Some("127.0.0.1:5002"))).await;
        assert_eq!(page.status(), StatusCode::OK);
        assert!(
            page.headers()[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("text/html")
        );
        assert!(body(page).await.contains("<strong>Ready</strong>"));
        let json = answer(&state, &get("/status.json", Some("localhost:5002"))).await;
        assert_eq!(json.status(), StatusCode::OK);
        let status: super::super::Status = serde_json::from_str(&body(json).await).unwrap();
        assert!(status.ready);

        for host in [Some("evil.example:5002"), None] {
            let refused = answer(&state, &get("/status.json", host)).await;
            assert_eq!(refused.status(), StatusCode::FORBIDDEN, "{host:?}");
        }
        let missing = answer(&state, &get("/nope", Some("127.0.0.1"))).await;
        assert_eq!(missing.status(), StatusCode::NOT_FOUND);
        let post = http::Request::post("/")
            .header(header::HOST, "127.0.0.1")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        assert_eq!(
            answer(&state, &post).await.status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
    }
}
