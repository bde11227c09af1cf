//! Authenticated plaintext: node-to-node HTTP without TLS, every request and answer carrying an
//! HMAC-SHA256 under a key derived from the cluster secret.
//!
//! A request carries `X-Spegel-Auth: v1 <unix seconds> <hex tag>` over its method, path and
//! query, and that time; a server accepts it within [`WINDOW`] of its own clock. The answer
//! carries a tag over the request's token, its status and its `Docker-Content-Digest`, so a
//! man in the middle can neither ask (without the secret) nor swap what a tag resolves to.
//! Within the window a recorded request can be replayed by whoever can read the network: that
//! is what "plaintext" means, and why TLS is the default.
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderValue, Method, StatusCode};
use ring::hmac;

use super::{ClusterSecrets, Use};

/// The header of both the request's and the answer's tag.
pub const AUTH_HEADER: &str = "x-spegel-auth";
/// How far a request's time may be from the server's.
pub(super) const WINDOW: Duration = Duration::from_secs(120);

/// Signs and checks plaintext node-to-node requests.
#[derive(Clone)]
pub struct PlaintextAuth {
    keys: Vec<hmac::Key>,
}

impl std::fmt::Debug for PlaintextAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PlaintextAuth")
    }
}

fn unix(now: SystemTime) -> u64 {
    now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn request_message(method: &Method, path_and_query: &str, time: u64) -> Vec<u8> {
    format!("spegel request v1\n{method}\n{path_and_query}\n{time}").into_bytes()
}

fn response_message(token: &[u8], status: StatusCode, digest: Option<&HeaderValue>) -> Vec<u8> {
    let mut message = b"spegel response v1\n".to_vec();
    message.extend_from_slice(token);
    message.extend_from_slice(format!("\n{}\n", status.as_u16()).as_bytes());
    message.extend_from_slice(digest.map_or(&b""[..], HeaderValue::as_bytes));
    message
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

impl PlaintextAuth {
    /// Signs with the first of `secrets`, accepts all.
    pub fn new(secrets: &ClusterSecrets) -> Self {
        let keys = secrets
            .keys(Use::Plaintext)
            .iter()
            .map(|key| hmac::Key::new(hmac::HMAC_SHA256, key))
            .collect();
        Self { keys }
    }

    fn sign(&self, message: &[u8]) -> String {
        self.keys.first().map_or_else(String::new, |key| {
            hmac::sign(key, message)
                .as_ref()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        })
    }

    fn verify(&self, message: &[u8], tag_hex: &str) -> bool {
        let Some(tag) = hex_decode(tag_hex) else {
            return false;
        };
        self.keys
            .iter()
            .any(|key| hmac::verify(key, message, &tag).is_ok())
    }

    /// The request header value for `method` on `path_and_query`, sent at `now`.
    pub fn sign_request(
        &self,
        method: &Method,
        path_and_query: &str,
        now: SystemTime,
    ) -> HeaderValue {
        let time = unix(now);
        let tag = self.sign(&request_message(method, path_and_query, time));
        HeaderValue::from_str(&format!("v1 {time} {tag}")).unwrap_or(HeaderValue::from_static(""))
    }

    /// Whether `value` authenticates `method` on `path_and_query`, received at `now`.
    pub fn verify_request(
        &self,
        method: &Method,
        path_and_query: &str,
        value: Option<&HeaderValue>,
        now: SystemTime,
    ) -> bool {
        let Some(text) = value.and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let mut fields = text.split(' ');
        let (Some("v1"), Some(time), Some(tag), None) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return false;
        };
        let Ok(time) = time.parse::<u64>() else {
            return false;
        };
        if unix(now).abs_diff(time) > WINDOW.as_secs() {
            return false;
        }
        self.verify(&request_message(method, path_and_query, time), tag)
    }

    /// The answer's header value for the request that carried `token`.
    pub fn sign_response(
        &self,
        token: &HeaderValue,
        status: StatusCode,
        digest: Option<&HeaderValue>,
    ) -> HeaderValue {
        let tag = self.sign(&response_message(token.as_bytes(), status, digest));
        HeaderValue::from_str(&tag).unwrap_or(HeaderValue::from_static(""))
    }

    /// Whether `value` authenticates an answer (`status`, `digest`) to the request with `token`.
    pub fn verify_response(
        &self,
        token: &HeaderValue,
        status: StatusCode,
        digest: Option<&HeaderValue>,
        value: Option<&HeaderValue>,
    ) -> bool {
        value.and_then(|v| v.to_str().ok()).is_some_and(|tag| {
            self.verify(&response_message(token.as_bytes(), status, digest), tag)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(secrets: &[&str]) -> PlaintextAuth {
        PlaintextAuth::new(&ClusterSecrets::new(secrets).unwrap())
    }

    const OLD: &str = "old-secret-0123456789";
    const NEW: &str = "new-secret-0123456789";
    const PATH: &str = "/v2/library/alpine/manifests/3.20?ns=docker.io";

    #[test]
    fn a_signed_request_verifies_only_as_sent_and_in_time() {
        let (a, now) = (auth(&[OLD]), SystemTime::now());
        let token = a.sign_request(&Method::GET, PATH, now);
        assert!(a.verify_request(&Method::GET, PATH, Some(&token), now));
        assert!(a.verify_request(&Method::GET, PATH, Some(&token), now + WINDOW));
        assert!(!a.verify_request(&Method::HEAD, PATH, Some(&token), now));
        assert!(!a.verify_request(
            &Method::GET,
            "/v2/library/alpine/manifests/3.21?ns=docker.io",
            Some(&token),
            now
        ));
        assert!(!a.verify_request(
            &Method::GET,
            PATH,
            Some(&token),
            now + WINDOW + Duration::from_secs(1)
        ));
        assert!(!a.verify_request(&Method::GET, PATH, None, now));
        assert!(!auth(&[NEW]).verify_request(&Method::GET, PATH, Some(&token), now));
        assert!(auth(&[NEW, OLD]).verify_request(&Method::GET, PATH, Some(&token), now));
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let (a, now) = (auth(&[OLD]), SystemTime::now());
        let time = unix(now);
        for bad in [
            "",
            "v1",
            "v2 1 00",
            &format!("v1 {time} zz"),
            &format!("v1 {time} 0"),
            &format!("v1 {time} 00 extra"),
            "v1 -5 00",
        ] {
            let value = HeaderValue::from_str(bad).unwrap();
            assert!(
                !a.verify_request(&Method::GET, PATH, Some(&value), now),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn an_answer_is_bound_to_its_request_status_and_digest() {
        let (a, now) = (auth(&[OLD]), SystemTime::now());
        let token = a.sign_request(&Method::GET, PATH, now);
        let other = a.sign_request(&Method::GET, "/v2/x/manifests/y?ns=r", now);
        let digest = HeaderValue::from_static("sha256:aa");
        let tag = a.sign_response(&token, StatusCode::OK, Some(&digest));
        assert!(a.verify_response(&token, StatusCode::OK, Some(&digest), Some(&tag)));
        let swapped = HeaderValue::from_static("sha256:bb");
        assert!(!a.verify_response(&token, StatusCode::OK, Some(&swapped), Some(&tag)));
        assert!(!a.verify_response(&other, StatusCode::OK, Some(&digest), Some(&tag)));
        assert!(!a.verify_response(
            &token,
            StatusCode::PARTIAL_CONTENT,
            Some(&digest),
            Some(&tag)
        ));
        assert!(!a.verify_response(&token, StatusCode::OK, Some(&digest), None));
    }
}
