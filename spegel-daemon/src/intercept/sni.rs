//! The TLS ClientHello's server name (SNI), from the first bytes of an intercepted connection:
//! a hand-written, panic-free parser over a prefix of the stream (what `peek` returned so far)
//! that says whether more bytes could change the answer (`NeedMore`), so the caller can wait for
//! them within its own bounds.
//!
//! Hand-written on purpose: the TLS crates at hand (rustls' `Acceptor`, `tls-parser`) either
//! consume the bytes they read or need the whole, unfragmented message, while the interceptor
//! must only peek, so the TLS stack that later terminates (or the upstream that receives a
//! spliced connection) still sees every byte.
use std::net::IpAddr;

/// Kept at this path for the modules that name it here.
pub use crate::intercept::authority::Authority;
use crate::intercept::authority::normalize_host;

/// TLS record content type `handshake`.
const CONTENT_HANDSHAKE: u8 = 22;
/// Handshake message type `client_hello`.
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
/// Extension type `server_name` (RFC 6066 §3).
const EXT_SERVER_NAME: u16 = 0;
/// `NameType` `host_name`.
const NAME_TYPE_HOST: u8 = 0;
/// The largest plaintext record a peer may send (RFC 8446 §5.1).
const MAX_RECORD_LEN: usize = 1 << 14;

/// What the first bytes of a TLS connection say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsHello {
    /// A prefix of something that may still become a ClientHello.
    NeedMore,
    /// Not a TLS handshake at all.
    NotTls,
    /// TLS records, but not a well-formed ClientHello.
    Malformed(&'static str),
    /// A ClientHello; the server name it asks for, if any (lowercased, no trailing dot).
    Hello { sni: Option<String> },
}

/// Why parsing stopped early inside [`Reader`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// The data ends before the structure does, and more may arrive.
    NeedMore,
    /// The structure contradicts itself.
    Malformed(&'static str),
}

/// A cursor over a possibly truncated byte string. `truncated` says the bytes are only a prefix of
/// the real content: running out then means "need more", otherwise "malformed".
struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    truncated: bool,
}

impl<'a> Reader<'a> {
    fn new(data: &'a [u8], truncated: bool) -> Self {
        Self {
            data,
            pos: 0,
            truncated,
        }
    }

    fn remaining(&self) -> usize {
        self.data.len().saturating_sub(self.pos)
    }

    fn is_done(&self) -> bool {
        self.remaining() == 0 && !self.truncated
    }

    fn short(&self, what: &'static str) -> Stop {
        if self.truncated {
            Stop::NeedMore
        } else {
            Stop::Malformed(what)
        }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], Stop> {
        let end = self.pos.checked_add(n).ok_or(Stop::Malformed(what))?;
        match self.data.get(self.pos..end) {
            Some(bytes) => {
                self.pos = end;
                Ok(bytes)
            }
            None => Err(self.short(what)),
        }
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, Stop> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, Stop> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A sub-reader over the next `len` bytes. When fewer are available and the data is
    /// truncated, the sub-reader gets what there is and is itself truncated.
    fn sub(&mut self, len: usize, what: &'static str) -> Result<Reader<'a>, Stop> {
        if self.remaining() >= len {
            let data = self.take(len, what)?;
            return Ok(Reader::new(data, false));
        }
        if !self.truncated {
            return Err(Stop::Malformed(what));
        }
        let data = self.data.get(self.pos..).unwrap_or_default();
        self.pos = self.data.len();
        Ok(Reader::new(data, true))
    }
}

/// Parses the start of a TLS connection for the ClientHello's server name.
///
/// Handshake messages may be fragmented over several records; the fragments are reassembled.
/// When the server name is found before the end of a long ClientHello, it is returned without
/// waiting for the rest.
pub fn parse_tls_client_hello(buf: &[u8]) -> TlsHello {
    let Some(&first) = buf.first() else {
        return TlsHello::NeedMore;
    };
    if first != CONTENT_HANDSHAKE {
        return TlsHello::NotTls;
    }
    // The record version's major byte is 3 for every SSL 3.0+/TLS version.
    if let Some(&major) = buf.get(1)
        && major != 3
    {
        return TlsHello::NotTls;
    }
    let (handshake, complete) = match reassemble_handshake(buf) {
        Ok(r) => r,
        Err(Stop::NeedMore) => return TlsHello::NeedMore,
        Err(Stop::Malformed(why)) => return TlsHello::Malformed(why),
    };
    match parse_handshake(&handshake, !complete) {
        Ok(sni) => TlsHello::Hello { sni },
        Err(Stop::NeedMore) => TlsHello::NeedMore,
        Err(Stop::Malformed(why)) => TlsHello::Malformed(why),
    }
}

/// Concatenates the fragments of consecutive handshake records until the first handshake
/// message is complete or the buffer ends. Returns the bytes and whether the message is complete.
fn reassemble_handshake(buf: &[u8]) -> Result<(Vec<u8>, bool), Stop> {
    let mut records = Reader::new(buf, true);
    let mut out = Vec::new();
    loop {
        // Decided by the first byte already: waiting for more records would change nothing.
        if out.first().is_some_and(|&ty| ty != HANDSHAKE_CLIENT_HELLO) {
            return Err(Stop::Malformed(
                "first handshake message is not a ClientHello",
            ));
        }
        if let Some(want) = handshake_len(&out)
            && out.len() >= want
        {
            out.truncate(want);
            return Ok((out, true));
        }
        if records.remaining() == 0 {
            // Nothing more buffered: parse what we have (the caller may still find the SNI).
            return if out.is_empty() {
                Err(Stop::NeedMore)
            } else {
                Ok((out, false))
            };
        }
        let len = match record_header(&mut records) {
            // Half a record header: what the earlier records hold may already decide.
            Err(Stop::NeedMore) if !out.is_empty() => return Ok((out, false)),
            other => other?,
        };
        let fragment = records.sub(len, "record")?;
        out.extend_from_slice(fragment.data);
    }
}

/// The header of the next handshake record; the length of its fragment.
fn record_header(records: &mut Reader<'_>) -> Result<usize, Stop> {
    let content_type = records.u8("record type")?;
    if content_type != CONTENT_HANDSHAKE {
        return Err(Stop::Malformed(
            "non-handshake record inside the ClientHello",
        ));
    }
    let version = records.take(2, "record version")?;
    if version[0] != 3 {
        return Err(Stop::Malformed("bad record version"));
    }
    let len = usize::from(records.u16("record length")?);
    if len == 0 {
        return Err(Stop::Malformed("empty handshake record"));
    }
    if len > MAX_RECORD_LEN {
        return Err(Stop::Malformed("record longer than 2^14"));
    }
    Ok(len)
}

/// The total length (header included) of the handshake message starting `buf`, once its header is there.
fn handshake_len(buf: &[u8]) -> Option<usize> {
    let header = buf.get(..4)?;
    let body = u32::from_be_bytes([0, header[1], header[2], header[3]]);
    usize::try_from(body).ok()?.checked_add(4)
}

/// Parses a handshake message that must be a ClientHello; returns its server name.
fn parse_handshake(buf: &[u8], truncated: bool) -> Result<Option<String>, Stop> {
    let mut r = Reader::new(buf, truncated);
    if r.u8("handshake type")? != HANDSHAKE_CLIENT_HELLO {
        return Err(Stop::Malformed(
            "first handshake message is not a ClientHello",
        ));
    }
    let len = r.take(3, "handshake length")?;
    let len = u32::from_be_bytes([0, len[0], len[1], len[2]]);
    let mut hello = r.sub(len as usize, "ClientHello")?;
    hello.take(2, "client version")?;
    hello.take(32, "random")?;
    let session_id = usize::from(hello.u8("session id length")?);
    if session_id > 32 {
        return Err(Stop::Malformed("session id longer than 32 bytes"));
    }
    hello.take(session_id, "session id")?;
    let suites = usize::from(hello.u16("cipher suites length")?);
    if suites < 2 || suites % 2 != 0 {
        return Err(Stop::Malformed("bad cipher suites length"));
    }
    hello.take(suites, "cipher suites")?;
    let compression = usize::from(hello.u8("compression methods length")?);
    if compression == 0 {
        return Err(Stop::Malformed("no compression methods"));
    }
    hello.take(compression, "compression methods")?;
    if hello.is_done() {
        return Ok(None); // no extensions at all (legal before TLS 1.3)
    }
    let ext_len = usize::from(hello.u16("extensions length")?);
    let mut exts = hello.sub(ext_len, "extensions")?;
    if !hello.truncated && hello.remaining() != 0 {
        return Err(Stop::Malformed("trailing bytes after the extensions"));
    }
    // `Some(name)` once a server_name extension was seen (`name` itself may be `None`).
    let mut sni: Option<Option<String>> = None;
    while !exts.is_done() {
        let ty = exts.u16("extension type")?;
        let len = usize::from(exts.u16("extension length")?);
        let mut ext = exts.sub(len, "extension")?;
        if ty != EXT_SERVER_NAME {
            continue;
        }
        if sni.is_some() {
            return Err(Stop::Malformed("duplicate server_name extension"));
        }
        if ext.is_done() {
            // An empty server_name extension is what a server echoes; a client must not send it,
            // but it names nothing either way.
            continue;
        }
        let list_len = usize::from(ext.u16("server name list length")?);
        let mut list = ext.sub(list_len, "server name list")?;
        if !ext.truncated && ext.remaining() != 0 {
            return Err(Stop::Malformed("trailing bytes in server_name"));
        }
        let name = parse_server_name_list(&mut list)?;
        if exts.truncated {
            // Found before the end of a long hello: good enough, the TLS stack checks the rest.
            return Ok(name);
        }
        sni = Some(name);
    }
    Ok(sni.flatten())
}

fn parse_server_name_list(list: &mut Reader<'_>) -> Result<Option<String>, Stop> {
    let (mut found, mut seen) = (None, false);
    while !list.is_done() {
        let ty = list.u8("name type")?;
        let len = usize::from(list.u16("name length")?);
        let name = list.take(len, "name")?;
        if ty != NAME_TYPE_HOST {
            continue; // unknown name types are skipped, as no others are defined
        }
        if seen {
            return Err(Stop::Malformed("more than one host_name"));
        }
        seen = true;
        let name = std::str::from_utf8(name)
            .ok()
            .and_then(normalize_host)
            .ok_or(Stop::Malformed("server name is not a valid host name"))?;
        // RFC 6066 forbids IP literals here; a client that sends one anyway named no host, and
        // the connection is then matched on its destination address like any other without SNI.
        if name.parse::<IpAddr>().is_err() {
            found = Some(name);
        }
    }
    if seen {
        Ok(found)
    } else {
        Err(Stop::Malformed("server_name without a host_name"))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rand::{Rng as _, SeedableRng as _, rngs::StdRng};

    use super::*;

    /// A real ClientHello, as rustls writes it.
    fn rustls_client_hello(server_name: &str) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let name = rustls_pki_types::ServerName::try_from(server_name.to_owned()).expect("name");
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).expect("write_tls");
        }
        out
    }

    /// Builds a ClientHello by hand: `extensions` is a list of (type, body).
    fn hello_with(extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
        body.extend_from_slice(&[1, 0]); // null compression
        let mut exts = Vec::new();
        for (ty, data) in extensions {
            exts.extend_from_slice(&ty.to_be_bytes());
            exts.extend_from_slice(&(data.len() as u16).to_be_bytes());
            exts.extend_from_slice(data);
        }
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(&exts);
        handshake_records(&body, MAX_RECORD_LEN)
    }

    fn handshake_records(hello_body: &[u8], fragment: usize) -> Vec<u8> {
        let mut msg = vec![HANDSHAKE_CLIENT_HELLO];
        msg.extend_from_slice(&(hello_body.len() as u32).to_be_bytes()[1..]);
        msg.extend_from_slice(hello_body);
        let mut out = Vec::new();
        for chunk in msg.chunks(fragment) {
            out.extend_from_slice(&[CONTENT_HANDSHAKE, 3, 1]);
            out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    fn sni_ext(names: &[(u8, &[u8])]) -> Vec<u8> {
        let mut list = Vec::new();
        for (ty, name) in names {
            list.push(*ty);
            list.extend_from_slice(&(name.len() as u16).to_be_bytes());
            list.extend_from_slice(name);
        }
        let mut ext = (list.len() as u16).to_be_bytes().to_vec();
        ext.extend_from_slice(&list);
        ext
    }

    fn hello(sni: &str) -> TlsHello {
        TlsHello::Hello {
            sni: Some(sni.to_owned()),
        }
    }

    #[test]
    fn rustls_hello_yields_its_server_name() {
        let bytes = rustls_client_hello("Registry-1.Docker.IO");
        assert_eq!(
            parse_tls_client_hello(&bytes),
            hello("registry-1.docker.io")
        );
    }

    #[test]
    fn every_truncation_of_a_real_hello_needs_more() {
        let bytes = rustls_client_hello("ghcr.io");
        for end in 0..bytes.len() {
            let got = parse_tls_client_hello(&bytes[..end]);
            // The name may be found before the end; otherwise more bytes are needed.
            assert!(
                got == TlsHello::NeedMore || got == hello("ghcr.io"),
                "prefix of {end} bytes: {got:?}"
            );
        }
        // Trailing bytes after the hello (e.g. early data) do not matter.
        let mut longer = bytes.clone();
        longer.extend_from_slice(&[23, 3, 3, 0, 5, 1, 2, 3, 4, 5]);
        assert_eq!(parse_tls_client_hello(&longer), hello("ghcr.io"));
    }

    #[test]
    fn fragmented_hello_is_reassembled() {
        let bytes = rustls_client_hello("quay.io");
        // Re-frame the handshake message into records of 7 bytes each.
        let msg = bytes[5..].to_vec();
        let mut reframed = Vec::new();
        for chunk in msg.chunks(7) {
            reframed.extend_from_slice(&[CONTENT_HANDSHAKE, 3, 3]);
            reframed.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            reframed.extend_from_slice(chunk);
        }
        assert_eq!(parse_tls_client_hello(&reframed), hello("quay.io"));
        for end in 0..reframed.len() {
            let got = parse_tls_client_hello(&reframed[..end]);
            assert!(
                got == TlsHello::NeedMore || got == hello("quay.io"),
                "{end}: {got:?}"
            );
        }
    }

    #[test]
    fn hand_built_hellos() {
        assert_eq!(
            parse_tls_client_hello(&hello_with(&[])),
            TlsHello::Hello { sni: None }
        );
        let with_sni = hello_with(&[
            (10, vec![0, 2, 0, 29]),
            (EXT_SERVER_NAME, sni_ext(&[(0, b"gcr.io.")])),
        ]);
        assert_eq!(parse_tls_client_hello(&with_sni), hello("gcr.io"));
        // Unknown name types are skipped.
        let odd = hello_with(&[(EXT_SERVER_NAME, sni_ext(&[(9, b"x"), (0, b"nvcr.io")]))]);
        assert_eq!(parse_tls_client_hello(&odd), hello("nvcr.io"));
        // An IP literal is not a server name.
        let ip = hello_with(&[(EXT_SERVER_NAME, sni_ext(&[(0, b"10.1.2.3")]))]);
        assert_eq!(parse_tls_client_hello(&ip), TlsHello::Hello { sni: None });
        // An empty server_name extension names nothing.
        let empty = hello_with(&[(EXT_SERVER_NAME, vec![])]);
        assert_eq!(
            parse_tls_client_hello(&empty),
            TlsHello::Hello { sni: None }
        );
        // No extensions block at all.
        let mut body = vec![3, 3];
        body.extend_from_slice(&[0; 32]);
        body.extend_from_slice(&[0, 0, 2, 0, 0x2f, 1, 0]);
        assert_eq!(
            parse_tls_client_hello(&handshake_records(&body, 100)),
            TlsHello::Hello { sni: None }
        );
    }

    #[test]
    fn malformed_hellos() {
        let malformed =
            |bytes: &[u8]| matches!(parse_tls_client_hello(bytes), TlsHello::Malformed(_));
        assert!(malformed(&hello_with(&[(
            EXT_SERVER_NAME,
            sni_ext(&[(0, b"a b")])
        )])));
        assert!(malformed(&hello_with(&[(
            EXT_SERVER_NAME,
            sni_ext(&[(0, b"a.io"), (0, b"b.io")])
        )])));
        assert!(malformed(&hello_with(&[
            (EXT_SERVER_NAME, sni_ext(&[(0, b"a.io")])),
            (EXT_SERVER_NAME, sni_ext(&[(0, b"a.io")])),
        ])));
        assert!(malformed(&hello_with(&[(EXT_SERVER_NAME, sni_ext(&[]))])));
        // server_name list length larger than the extension.
        assert!(malformed(&hello_with(&[(
            EXT_SERVER_NAME,
            vec![0, 9, 0, 0, 1, b'a']
        )])));
        // Not a ClientHello (ServerHello type 2).
        let mut server_hello = hello_with(&[]);
        server_hello[5] = 2;
        assert!(malformed(&server_hello));
        // Zero-length and oversized records.
        assert!(malformed(&[22, 3, 1, 0, 0]));
        assert!(malformed(&[22, 3, 1, 0x40, 0x01, 1]));
        // A non-handshake record in the middle of a fragmented hello.
        let mut mixed = handshake_records(&[0; 60], 10);
        mixed[15] = 23;
        assert!(malformed(&mixed));
        // Session id longer than 32.
        let mut body = vec![3, 3];
        body.extend_from_slice(&[0; 32]);
        body.push(33);
        body.extend_from_slice(&[0; 40]);
        assert!(malformed(&handshake_records(&body, 1000)));
        // Extensions block claims more than the hello holds.
        let mut bad = hello_with(&[(EXT_SERVER_NAME, sni_ext(&[(0, b"a.io")]))]);
        let ext_len_at = 5 + 4 + 2 + 32 + 1 + 4 + 2;
        bad[ext_len_at] = 0xff;
        assert!(malformed(&bad));
    }

    /// Found by the `sni` fuzz target: with its first record complete, a handshake that is
    /// not a ClientHello was refused, but with the start of a second record behind it the
    /// parser waited for that record instead: more bytes must never undo a decision.
    #[test]
    fn a_handshake_that_is_not_a_hello_is_refused_before_the_next_record() {
        let not_hello = [0x16, 0x03, 0x18, 0x00, 0x03, 0x18, 0x00, 0x5b];
        let refused = TlsHello::Malformed("first handshake message is not a ClientHello");
        assert_eq!(parse_tls_client_hello(&not_hello[..6]), refused);
        assert_eq!(parse_tls_client_hello(&not_hello), refused);
        assert_eq!(
            parse_tls_client_hello(&[&not_hello[..], &[0x16, 0x03]].concat()),
            refused
        );
    }

    /// Found by the `sni` fuzz target: a hello already refused from its first record (here a
    /// session id longer than 32 bytes) asked for more once half of a second record's header
    /// was behind it.
    #[test]
    fn half_a_record_header_does_not_hide_a_decided_hello() {
        let mut hello = vec![0x01, 0x00, 0x00, 0x30, 0x03, 0x03];
        hello.extend_from_slice(&[0u8; 32]);
        hello.push(0x40); // session id length
        let mut record = vec![0x16, 0x03, 0x01, 0x00, hello.len() as u8];
        record.extend_from_slice(&hello);
        let refused = TlsHello::Malformed("session id longer than 32 bytes");
        assert_eq!(parse_tls_client_hello(&record), refused);
        for half in [&[0x16][..], &[0x16, 0x03], &[0x16, 0x03, 0x01, 0x00]] {
            let buf = [&record[..], half].concat();
            assert_eq!(parse_tls_client_hello(&buf), refused, "{half:?}");
        }
    }

    #[test]
    fn not_tls() {
        assert_eq!(
            parse_tls_client_hello(b"GET / HTTP/1.1\r\n"),
            TlsHello::NotTls
        );
        assert_eq!(parse_tls_client_hello(&[22, 2, 0]), TlsHello::NotTls);
        assert_eq!(parse_tls_client_hello(&[]), TlsHello::NeedMore);
        assert_eq!(parse_tls_client_hello(&[22]), TlsHello::NeedMore);
        assert_eq!(parse_tls_client_hello(&[22, 3, 1, 0]), TlsHello::NeedMore);
    }

    #[test]
    fn oversized_hello_declares_more_than_any_buffer() {
        // A handshake length of 16 MiB: the parser just keeps asking for more.
        let mut bytes = vec![22, 3, 1, 0x40, 0x00, 1, 0xff, 0xff, 0xff, 3, 3];
        bytes.extend_from_slice(&[0; 32]);
        bytes.extend_from_slice(&[0, 0, 2, 0x13, 1, 1, 0, 0xff, 0xff, 0, 21, 0xff, 0xf0]);
        bytes.resize(5 + (1 << 14), 0);
        assert_eq!(parse_tls_client_hello(&bytes), TlsHello::NeedMore);
        // ... unless the server name comes early enough in a large hello.
        let big = hello_with(&[
            (EXT_SERVER_NAME, sni_ext(&[(0, b"mcr.microsoft.com")])),
            (21, vec![0; 30_000 - 200]),
        ]);
        let cut = &big[..16 * 1024];
        assert_eq!(parse_tls_client_hello(cut), hello("mcr.microsoft.com"));
        assert_eq!(parse_tls_client_hello(&big), hello("mcr.microsoft.com"));
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = StdRng::seed_from_u64(0x5e9e1);
        let real = rustls_client_hello("public.ecr.aws");
        for round in 0..20_000 {
            let len = rng.random_range(0..600);
            let mut buf: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            if round % 2 == 0 && !buf.is_empty() {
                buf[0] = CONTENT_HANDSHAKE; // make the TLS path go deeper
                if let Some(b) = buf.get_mut(1) {
                    *b = 3;
                }
            }
            let _ = parse_tls_client_hello(&buf);
            let _ = crate::intercept::http_host::parse_http_host(&buf);
            // Flip bytes of a real hello.
            let mut mutated = real.clone();
            for _ in 0..rng.random_range(1..4) {
                let at = rng.random_range(0..mutated.len());
                mutated[at] = rng.random();
            }
            let _ = parse_tls_client_hello(&mutated);
        }
    }
}
