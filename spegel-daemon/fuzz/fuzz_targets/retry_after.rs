//! An upstream's `Retry-After` (`upstream/retry_after.rs`): delay-seconds or an IMF-fixdate.
//!
//! Asserts: delay-seconds are read exactly; a date `httpdate` (an independent implementation)
//! also reads is the same instant, and the wait is the distance to it from now; every instant
//! `httpdate` prints reads back. (Leniencies `httpdate` refuses, such as a wrong weekday, are
//! allowed: a `Retry-After` only ever shortens or lengthens a bounded back-off.)
#![no_main]

use std::time::{Duration, UNIX_EPOCH};

use http::{HeaderMap, HeaderValue, header};
use libfuzzer_sys::fuzz_target;
use spegel::fuzzing::retry_after;

fuzz_target!(|data: &[u8]| {
    let Some((now, value)) = data.split_first_chunk::<4>() else {
        return;
    };
    let secs = u64::from(u32::from_le_bytes(*now));
    let now = UNIX_EPOCH + Duration::from_secs(secs);

    // Every instant httpdate can print reads back.
    let mut headers = HeaderMap::new();
    let printed = httpdate::fmt_http_date(now);
    headers.insert(
        header::RETRY_AFTER,
        HeaderValue::from_str(&printed).expect("a header value"),
    );
    assert_eq!(
        retry_after(&headers, UNIX_EPOCH),
        Some(Duration::from_secs(secs)),
        "{printed}"
    );

    let Ok(value) = HeaderValue::from_bytes(value) else {
        return;
    };
    headers.insert(header::RETRY_AFTER, value.clone());
    let wait = retry_after(&headers, now);
    let Ok(text) = value.to_str() else {
        assert_eq!(wait, None);
        return;
    };
    let text = text.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        let secs = text.parse().unwrap_or(u64::MAX);
        assert_eq!(wait, Some(Duration::from_secs(secs)));
        return;
    }
    if let Ok(at) = httpdate::parse_http_date(text)
        && text.len() == printed.len()
        && text.ends_with(" GMT")
        && text.as_bytes()[3] == b','
    {
        // An IMF-fixdate both read (httpdate also reads the obsolete forms, which we refuse).
        let expected = at.duration_since(now).unwrap_or(Duration::ZERO);
        assert_eq!(wait, Some(expected), "{text:?}");
    }
});
