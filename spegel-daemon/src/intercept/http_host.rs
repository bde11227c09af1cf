//! The `Host` of a plain-text HTTP/1.x connection, from its first bytes: the request head is
//! parsed with `httparse` over a prefix of the stream (what `peek` returned so far), and the
//! answer says whether more bytes could change it (`NeedMore`).
use httparse::{EMPTY_HEADER, Request, Status};

use crate::intercept::authority::Authority;

/// Longest HTTP method we accept; real ones are far shorter.
const MAX_METHOD_LEN: usize = 24;

/// What the first bytes of a plain-text connection say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpRequest {
    /// A prefix of what may still become an HTTP/1.x request head.
    NeedMore,
    /// Not HTTP/1.x.
    NotHttp,
    /// An HTTP/1.x request line, but a broken head.
    Malformed(&'static str),
    /// A request head; its `Host`, if it has one.
    Head { host: Option<Authority> },
}

/// Parses an HTTP/1.x request line and headers for the `Host` header. The `Host` line is enough:
/// the rest of the head need not have arrived. Lines may end in CRLF or a bare LF.
pub fn parse_http_host(buf: &[u8]) -> HttpRequest {
    // The method: a token followed by a space; decide "not HTTP" as early as possible (httparse
    // would wait for the end of an arbitrarily long token).
    let method_len = buf.iter().take_while(|&&b| is_tchar(b)).count();
    if method_len > MAX_METHOD_LEN {
        return HttpRequest::NotHttp;
    }
    match buf.get(method_len) {
        None => return HttpRequest::NeedMore,
        Some(b' ') if method_len > 0 => {}
        Some(_) => return HttpRequest::NotHttp,
    }
    let Some(request_line_end) = buf.iter().position(|&b| b == b'\n') else {
        return HttpRequest::NeedMore;
    };
    if !is_http1_request_line(&buf[..=request_line_end]) {
        return HttpRequest::NotHttp;
    }
    // Every complete line so far, closed with an empty line: httparse then parses the head as
    // far as it has arrived, and the real end of the head, if it is there, comes first.
    let last_line_end = buf
        .iter()
        .rposition(|&b| b == b'\n')
        .unwrap_or(request_line_end);
    let seen = &buf[..=last_line_end];
    let closed = [seen, b"\r\n"].concat();
    let lines = seen.iter().filter(|&&b| b == b'\n').count();
    let mut headers = vec![EMPTY_HEADER; lines];
    let mut request = Request::new(&mut headers);
    let end = match request.parse(&closed) {
        Ok(Status::Complete(end)) => end,
        // Cannot happen: the head is closed.
        Ok(Status::Partial) => return HttpRequest::NeedMore,
        Err(_) => return HttpRequest::Malformed("bad header line"),
    };
    let complete = end <= seen.len();
    let mut host = None;
    for header in request.headers.iter() {
        if !header.name.eq_ignore_ascii_case("host") {
            continue;
        }
        if host.is_some() {
            return HttpRequest::Malformed("more than one Host header");
        }
        match std::str::from_utf8(header.value)
            .ok()
            .and_then(Authority::parse)
        {
            Some(authority) => host = Some(authority),
            None => return HttpRequest::Malformed("bad Host header"),
        }
    }
    match host {
        Some(host) => HttpRequest::Head { host: Some(host) },
        None if complete => HttpRequest::Head { host: None },
        None => HttpRequest::NeedMore,
    }
}

/// RFC 9110 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// `METHOD SP target SP HTTP/1.x` followed by its line end, as httparse reads a request line,
/// with a printable ASCII target.
fn is_http1_request_line(line: &[u8]) -> bool {
    let closed = [line, b"\r\n"].concat();
    let mut request = Request::new(&mut []);
    matches!(request.parse(&closed), Ok(Status::Complete(_)))
        && request
            .path
            .is_some_and(|target| target.bytes().all(|b| b.is_ascii_graphic()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_host_header() {
        let head = |host: &str, port| HttpRequest::Head {
            host: Some(Authority {
                host: host.to_owned(),
                port,
            }),
        };
        assert_eq!(
            parse_http_host(
                b"GET /v2/ HTTP/1.1\r\nUser-Agent: x\r\nHOST: Registry.Local:5000\r\n\r\n"
            ),
            head("registry.local", Some(5000))
        );
        assert_eq!(
            parse_http_host(b"HEAD /v2/ HTTP/1.1\nhost:  [fd00::1]:80 \n\n"),
            head("fd00::1", Some(80))
        );
        // The Host line is enough; the rest of the head need not have arrived.
        assert_eq!(
            parse_http_host(b"GET / HTTP/1.1\r\nHost: docker.io\r\nAccept: */"),
            head("docker.io", None)
        );
        assert_eq!(
            parse_http_host(b"GET / HTTP/1.0\r\nAccept: */*\r\n\r\n"),
            HttpRequest::Head { host: None }
        );
    }

    #[test]
    fn http_prefixes_and_garbage() {
        let full = b"GET /v2/ HTTP/1.1\r\nAccept: */*\r\nHost: ghcr.io\r\n\r\n";
        for end in 0..full.len() {
            let got = parse_http_host(&full[..end]);
            assert!(
                got == HttpRequest::NeedMore
                    || got
                        == (HttpRequest::Head {
                            host: Some(Authority::parse("ghcr.io").unwrap())
                        }),
                "{end}: {got:?}"
            );
        }
        assert_eq!(parse_http_host(b"\x16\x03\x01"), HttpRequest::NotHttp);
        assert_eq!(
            parse_http_host(b"SSH-2.0-OpenSSH\r\n"),
            HttpRequest::NotHttp
        );
        assert_eq!(parse_http_host(b" GET"), HttpRequest::NotHttp);
        assert_eq!(parse_http_host(b"GET / HTTP/2\r\n"), HttpRequest::NotHttp);
        assert_eq!(
            parse_http_host(b"GET  / HTTP/1.1\r\n"),
            HttpRequest::NotHttp
        );
        assert_eq!(parse_http_host(&[b'A'; 100]), HttpRequest::NotHttp);
        assert!(matches!(
            parse_http_host(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
            HttpRequest::Malformed(_)
        ));
        assert!(matches!(
            parse_http_host(b"GET / HTTP/1.1\r\nHost: a:b:c\r\n\r\n"),
            HttpRequest::Malformed(_)
        ));
        assert!(matches!(
            parse_http_host(b"GET / HTTP/1.1\r\nno colon\r\n\r\n"),
            HttpRequest::Malformed(_)
        ));
        assert!(matches!(
            parse_http_host(b"GET / HTTP/1.1\r\nHost: a:99999\r\n\r\n"),
            HttpRequest::Malformed(_)
        ));
        // An oversized head without Host just keeps asking; the caller's cap decides.
        let mut big = b"GET / HTTP/1.1\r\n".to_vec();
        for _ in 0..2000 {
            big.extend_from_slice(b"X-Filler: aaaaaaaa\r\n");
        }
        assert_eq!(parse_http_host(&big), HttpRequest::NeedMore);
    }

    #[test]
    fn request_lines() {
        for (line, http1) in [
            (&b"GET / HTTP/1.1\r\n"[..], true),
            (b"HEAD /v2/x/blobs/sha256:ab HTTP/1.0\n", true),
            (b"GET / HTTP/2\r\n", false),
            (b"GET  / HTTP/1.1\r\n", false),
            (b"GET / HTTP/1.1 x\r\n", false),
            (b"GET /\xc3\xa9 HTTP/1.1\r\n", false),
            (b"GET\r\n", false),
        ] {
            assert_eq!(
                is_http1_request_line(line),
                http1,
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
    }
}
