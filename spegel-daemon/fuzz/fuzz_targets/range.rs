//! `Range` (`oci/range.rs`) from clients, and `Content-Range` / `Content-Length` from peers and
//! upstreams (`oci/headers.rs`, `peers/wire.rs`).
//!
//! Asserts: a parsed `Range` resolves inside any object size, and its header value parses back
//! to it; a peer's span lies inside the object it names.
#![no_main]

use http::{HeaderMap, HeaderValue, StatusCode, header};
use libfuzzer_sys::fuzz_target;
use spegel::{
    fuzzing::response_span,
    oci::{content_range, parse_range, unsatisfied_range_size},
};

fuzz_target!(|data: &[u8]| {
    let (size, value) = match data.split_first_chunk::<8>() {
        Some((size, value)) => (u64::from_le_bytes(*size), value),
        None => (0, data),
    };
    if let Ok(range) = parse_range(value) {
        for size in [size, size % 4096, 0, 1, u64::MAX] {
            if let Some(span) = range.resolve(size) {
                assert!(span.start() <= span.end(), "{range:?} in {size}: {span:?}");
                assert!(*span.end() < size, "{range:?} in {size}: {span:?}");
            }
        }
        let header = range.header_value();
        assert_eq!(parse_range(header.as_bytes()), Ok(range));
    }
    let Ok(value) = HeaderValue::from_bytes(value) else {
        return;
    };
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_RANGE, value.clone());
    if let Some((span, total)) = content_range(&headers) {
        assert!(span.start() <= span.end() && *span.end() < total);
    }
    let _ = unsatisfied_range_size(&headers);
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(size % 65536));
    for status in [StatusCode::OK, StatusCode::PARTIAL_CONTENT] {
        if let Ok((start, len, total)) = response_span(status, &headers) {
            let end = start.checked_add(len).expect("span end overflows");
            assert!(end <= total, "{start}+{len} > {total}");
        }
    }
    headers.insert(header::CONTENT_LENGTH, value);
    if let Ok((start, len, total)) = response_span(StatusCode::OK, &headers) {
        assert_eq!((start, len), (0, total));
    }
});
