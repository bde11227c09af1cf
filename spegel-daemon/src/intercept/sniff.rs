//! Classifying an intercepted connection by its first bytes (TLS ClientHello or HTTP/1.x head),
//! peeked at, never read, so whoever gets the connection sees it untouched.
use std::time::Duration;

use tokio::{net::TcpStream, time::Instant};

use crate::intercept::{
    http_host::{self, HttpRequest},
    sni::{self, TlsHello},
};

/// At most this many bytes are peeked at to find the SNI or `Host`.
pub const PEEK_LIMIT: usize = 16 * 1024;

/// What the first bytes of a connection said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Sniffed {
    Tls {
        sni: Option<String>,
    },
    Http {
        host: Option<sni::Authority>,
    },
    /// Neither TLS nor HTTP/1.x (a record that starts like TLS but is not counts here).
    Other,
    /// A TLS ClientHello or HTTP/1.x head that does not parse, and why.
    Malformed(&'static str),
    /// The client sent nothing (or not enough) in time: maybe a server-speaks-first protocol.
    TimedOut,
    /// The head did not fit into [`PEEK_LIMIT`].
    Oversized,
    /// The client closed without sending anything.
    Closed,
}

impl Sniffed {
    /// Whether this says for sure what the client speaks and to whom: a ClientHello or request
    /// head that parsed, a protocol that is neither, or a client that waits for the server.
    /// Not for a malformed or oversized head (a quirk of one client, maybe a registry's).
    pub(crate) fn decisive(&self) -> bool {
        match self {
            Sniffed::Tls { .. } | Sniffed::Http { .. } | Sniffed::Other | Sniffed::TimedOut => true,
            Sniffed::Malformed(_) | Sniffed::Oversized | Sniffed::Closed => false,
        }
    }
}

fn classify(buf: &[u8]) -> Option<Sniffed> {
    if buf.first() == Some(&0x16) {
        return match sni::parse_tls_client_hello(buf) {
            TlsHello::NeedMore => None,
            TlsHello::NotTls => Some(Sniffed::Other),
            TlsHello::Malformed(why) => Some(Sniffed::Malformed(why)),
            TlsHello::Hello { sni } => Some(Sniffed::Tls { sni }),
        };
    }
    match http_host::parse_http_host(buf) {
        HttpRequest::NeedMore => None,
        HttpRequest::NotHttp => Some(Sniffed::Other),
        HttpRequest::Malformed(why) => Some(Sniffed::Malformed(why)),
        HttpRequest::Head { host } => Some(Sniffed::Http { host }),
    }
}

/// Peeks (never reads) at the stream until its first bytes are classified, the buffer is full
/// or the timeout expires.
pub(crate) async fn sniff(stream: &TcpStream, timeout: Duration) -> Sniffed {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; PEEK_LIMIT];
    let mut backoff = Duration::from_millis(1);
    let mut seen = 0;
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Err(_) => return Sniffed::TimedOut,
            Ok(Err(error)) => {
                tracing::debug!(%error, "peek failed");
                return Sniffed::Closed;
            }
            Ok(Ok(0)) => return Sniffed::Closed,
            Ok(Ok(n)) => n,
        };
        if let Some(sniffed) = classify(&buf[..n]) {
            return sniffed;
        }
        if n == buf.len() {
            return Sniffed::Oversized;
        }
        // peek() returns at once while any byte is buffered, so wait for more with a short
        // backoff. Heads almost always arrive in one segment; this is the rare fragmented case.
        if n > seen {
            backoff = Duration::from_millis(1);
            seen = n;
        }
        if Instant::now() + backoff >= deadline {
            return Sniffed::TimedOut;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use tokio::{io::AsyncWriteExt as _, net::TcpListener};

    use super::*;

    #[test]
    fn only_a_clear_answer_is_decisive() {
        assert!(Sniffed::Tls { sni: None }.decisive());
        assert!(Sniffed::Http { host: None }.decisive());
        assert!(Sniffed::TimedOut.decisive());
        assert!(classify(b"SSH-2.0-OpenSSH_9.2\r\n").unwrap().decisive());
        assert!(
            classify(&[0x16, 0x01, 0x00, 0x00, 0x10])
                .unwrap()
                .decisive(),
            "not TLS"
        );
        assert!(!Sniffed::Malformed("bad extension length").decisive());
        assert!(!Sniffed::Oversized.decisive());
        assert!(!Sniffed::Closed.decisive());
    }

    /// A ClientHello split over two writes is still classified once the rest arrives.
    #[tokio::test]
    async fn sniff_waits_for_a_fragmented_hello() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let mut hello = vec![22, 3, 1, 0, 0];
        let mut body = vec![3, 3];
        body.extend_from_slice(&[0; 32]);
        body.extend_from_slice(&[0, 0, 2, 0x13, 1, 1, 0]);
        let name = b"ghcr.io";
        let mut sni = vec![0, 0];
        let list_len = (name.len() + 3) as u16;
        sni.extend_from_slice(&(list_len + 2).to_be_bytes());
        sni.extend_from_slice(&list_len.to_be_bytes());
        sni.push(0);
        sni.extend_from_slice(&(name.len() as u16).to_be_bytes());
        sni.extend_from_slice(name);
        body.extend_from_slice(&(sni.len() as u16).to_be_bytes());
        body.extend_from_slice(&sni);
        let mut msg = vec![1, 0];
        msg.extend_from_slice(&(body.len() as u16).to_be_bytes());
        msg.extend_from_slice(&body);
        hello[3..5].copy_from_slice(&(msg.len() as u16).to_be_bytes());
        hello.extend_from_slice(&msg);
        let client = tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.set_nodelay(true).unwrap();
            s.write_all(&hello[..20]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            s.write_all(&hello[20..]).await.unwrap();
            s
        });
        let (server, _) = l.accept().await.unwrap();
        let got = sniff(&server, Duration::from_secs(5)).await;
        assert_eq!(
            got,
            Sniffed::Tls {
                sni: Some("ghcr.io".into())
            }
        );
        drop(client.await.unwrap());
        // Nothing was consumed.
        let mut first = [0u8; 1];
        server.peek(&mut first).await.unwrap();
        assert_eq!(first[0], 22);
    }
}
