//! Hop-by-hop headers: they describe one connection, so they never cross a proxy.
use http::{HeaderMap, HeaderName, header};

/// Removes hop-by-hop headers (RFC 9110 §7.6.1), including those the `Connection` header names.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    /// Header names and values, in order.
    type Pairs = &'static [(&'static str, &'static str)];

    fn headers(pairs: Pairs) -> HeaderMap {
        pairs
            .iter()
            .map(|(name, value)| {
                (
                    HeaderName::from_static(name),
                    HeaderValue::from_static(value),
                )
            })
            .collect()
    }

    #[test]
    fn strips_hop_by_hop_headers() {
        let cases: [(Pairs, Pairs); 6] = [
            // Nothing to strip.
            (
                &[("content-type", "text/plain"), ("x-end", "1")],
                &[("content-type", "text/plain"), ("x-end", "1")],
            ),
            // The fixed list, including the non-standard ones.
            (
                &[
                    ("connection", "close"),
                    ("keep-alive", "timeout=5"),
                    ("proxy-connection", "keep-alive"),
                    ("proxy-authenticate", "Basic"),
                    ("proxy-authorization", "Basic x"),
                    ("te", "trailers"),
                    ("trailer", "x-sum"),
                    ("transfer-encoding", "chunked"),
                    ("upgrade", "h2c"),
                    ("x-end", "1"),
                ],
                &[("x-end", "1")],
            ),
            // Headers named by Connection, trimmed, across values.
            (
                &[
                    ("connection", "keep-alive, x-hop"),
                    ("connection", " x-other "),
                    ("x-hop", "1"),
                    ("x-other", "2"),
                    ("x-end", "3"),
                ],
                &[("x-end", "3")],
            ),
            // Names that are not header names are ignored.
            (
                &[
                    ("connection", "bad name, x-hop"),
                    ("x-hop", "1"),
                    ("x-end", "2"),
                ],
                &[("x-end", "2")],
            ),
            // End-to-end headers stay, even credentials.
            (
                &[("authorization", "Bearer t"), ("content-length", "3")],
                &[("authorization", "Bearer t"), ("content-length", "3")],
            ),
            (&[], &[]),
        ];
        for (input, expected) in cases {
            let mut actual = headers(input);
            strip_hop_by_hop(&mut actual);
            assert_eq!(actual, headers(expected), "{input:?}");
        }
    }
}
