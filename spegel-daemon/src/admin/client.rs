//! `spegel status`: reads `/status.json` from this node's admin endpoint and prints it (or the
//! JSON). The exit status says what it found, for scripts and probes: 0 ready, 1 not ready,
//! 3 the daemon could not be reached.
use std::{net::SocketAddr, time::Duration};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;

use super::{DEFAULT_ADMIN_ADDR, Status, render};

/// How long the whole request may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Exit status: ready.
pub const EXIT_READY: u8 = 0;
/// Exit status: the daemon answered and is not ready.
pub const EXIT_NOT_READY: u8 = 1;
/// Exit status: the admin endpoint could not be reached or did not answer sensibly.
pub const EXIT_UNREACHABLE: u8 = 3;

/// Flags of the `status` subcommand.
#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    /// Print `/status.json` as the daemon sent it instead of the summary.
    #[arg(long, env = "SPEGEL_STATUS_JSON")]
    pub json: bool,
    /// The daemon's admin endpoint (as its `--admin-addr`).
    #[arg(long, env = "SPEGEL_ADMIN_ADDR", default_value = DEFAULT_ADMIN_ADDR)]
    pub admin_addr: SocketAddr,
}

/// Runs `spegel status`; returns the exit status.
pub async fn main(args: StatusArgs) -> u8 {
    let json = match tokio::time::timeout(TIMEOUT, fetch(args.admin_addr)).await {
        Ok(Ok(json)) => json,
        Ok(Err(error)) => {
            eprintln!(
                "spegel status: cannot read the daemon's status at {}: {error:#}",
                args.admin_addr
            );
            return EXIT_UNREACHABLE;
        }
        Err(_) => {
            eprintln!(
                "spegel status: the daemon at {} did not answer within {TIMEOUT:?}",
                args.admin_addr
            );
            return EXIT_UNREACHABLE;
        }
    };
    let status: Status = match serde_json::from_str(&json) {
        Ok(status) => status,
        Err(error) => {
            eprintln!("spegel status: the daemon's answer is not a status: {error}");
            return EXIT_UNREACHABLE;
        }
    };
    if args.json {
        println!("{}", json.trim_end());
    } else {
        print!("{}", render::text(&status));
    }
    if status.ready {
        EXIT_READY
    } else {
        EXIT_NOT_READY
    }
}

/// The body of `GET /status.json` at `addr`.
async fn fetch(addr: SocketAddr) -> anyhow::Result<String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .context("cannot connect (is `spegel run` up, with this --admin-addr?)")?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP handshake")?;
    tokio::spawn(connection);
    let request = Request::get("/status.json")
        .header(header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())
        .context("building the request")?;
    let response = sender.send_request(request).await.context("request")?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .context("reading the answer")?
        .to_bytes();
    if status != StatusCode::OK {
        bail!("HTTP {status}: {}", String::from_utf8_lossy(&body).trim());
    }
    String::from_utf8(body.to_vec()).context("the answer is not UTF-8")
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::admin::AdminState;

    #[tokio::test]
    async fn exit_status_follows_readiness_and_reachability() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let server = tokio::spawn(crate::admin::serve(
            listener,
            Arc::new(AdminState::default()),
            stop.clone(),
        ));
        let args = |json, admin_addr| StatusArgs { json, admin_addr };
        assert_eq!(main(args(false, addr)).await, EXIT_READY);
        assert_eq!(main(args(true, addr)).await, EXIT_READY);
        stop.cancel();
        server.await.unwrap();

        // Interception on but not attached: not ready.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let not_ready = listener.local_addr().unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let state = AdminState {
            intercept: Some(Arc::default()),
            ..AdminState::default()
        };
        let server = tokio::spawn(crate::admin::serve(listener, Arc::new(state), stop.clone()));
        assert_eq!(main(args(false, not_ready)).await, EXIT_NOT_READY);
        stop.cancel();
        server.await.unwrap();
        // Nobody listens there any more.
        assert_eq!(main(args(false, addr)).await, EXIT_UNREACHABLE);
    }
}
