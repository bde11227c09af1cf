//! The node CA's state on disk (`tls/ca.rs`, `tls/trust.rs`): the CA certificate and key PEM,
//! the certificate's name constraints, and `installed.json`.
//!
//! The first byte picks the file. A certificate is fuzzed either from scratch or as byte flips
//! of a real CA certificate (DER), so the parser gets past the outer structure.
//! Asserts: a CA that loads permits only normalised names, never the `.invalid` sentinel;
//! `installed.json` as the daemon writes it reads back, and `trusts` follows its rule.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use spegel::fuzzing::{
    BootInstant, InstallRecord, ca_constraints, load_ca, parse_record, sample_ca_pem, trusts,
};

fn sample() -> &'static (String, String, Vec<u8>) {
    static SAMPLE: OnceLock<(String, String, Vec<u8>)> = OnceLock::new();
    SAMPLE.get_or_init(|| {
        let (key, cert) = sample_ca_pem(&["docker.io", "10.0.0.1:5000", "[fd00::1]"]);
        let body: String = cert.lines().filter(|l| !l.starts_with("-----")).collect();
        let der = base64_decode(&body);
        (key, cert, der)
    })
}

/// Standard base64 without padding checks (only for the sample's own PEM body).
fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    };
    let digits: Vec<u8> = text.bytes().filter(|&c| c != b'=').map(value).collect();
    digits
        .chunks(4)
        .flat_map(|chunk| {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, &d)| n | u32::from(d) << (18 - 6 * i));
            let bytes = n.to_be_bytes();
            bytes[1..chunk.len()].to_vec()
        })
        .collect()
}

fn check_permitted(names: &spegel::fuzzing::PermittedNames) {
    for dns in names.dns_names() {
        assert_ne!(dns, "invalid");
        assert_eq!(dns, dns.to_ascii_lowercase());
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let (key, cert, der) = sample();
    match which % 4 {
        0 => {
            if let Ok(names) = ca_constraints(rest) {
                check_permitted(&names);
            }
        }
        1 => {
            // Byte flips of the real certificate: (position, xor) pairs.
            let mut mutated = der.clone();
            for pair in rest.chunks_exact(3) {
                let at = usize::from(u16::from_le_bytes([pair[0], pair[1]])) % mutated.len();
                mutated[at] ^= pair[2];
            }
            if let Ok(names) = ca_constraints(&mutated) {
                check_permitted(&names);
            }
        }
        2 => {
            // A certificate file that may not hold a certificate, with the real key.
            let text = String::from_utf8_lossy(rest);
            let pem = if which & 0x80 != 0 {
                format!("{text}{cert}")
            } else {
                text.into_owned()
            };
            if let Ok(names) = load_ca(key, &pem) {
                check_permitted(&names);
            }
            let _ = load_ca(&text_or_empty(rest), cert);
        }
        _ => {
            let Some(record) = parse_record(rest) else {
                return;
            };
            // What the daemon writes it reads back: the same fingerprints and boot id, and the
            // same time to within one unit in the last place (serde_json without its
            // `float_roundtrip` feature may read a decimal to a neighbouring float, harmless
            // for a 10 ms clock).
            let written = serde_json::to_vec(&record).expect("serialise");
            let read = parse_record(&written).expect("reads what it writes");
            assert_eq!(read.fingerprints, record.fingerprints);
            assert_eq!(read.at.boot_id, record.at.boot_id);
            let (a, b) = (read.at.since_boot_secs, record.at.since_boot_secs);
            assert!((a - b).abs() <= b.abs() * 1e-15, "{a} vs {b}");
            for fingerprint in &record.fingerprints {
                let later = InstallRecord {
                    fingerprints: Vec::new(),
                    at: BootInstant {
                        boot_id: record.at.boot_id.clone(),
                        since_boot_secs: record.at.since_boot_secs + 1.0,
                    },
                };
                if record.at.since_boot_secs.is_finite() && record.at.since_boot_secs < 1e15 {
                    assert!(trusts(&record, fingerprint, &later.at));
                }
                assert!(!trusts(&record, fingerprint, &record.at));
            }
            let stranger = "not a fingerprint";
            if !record.fingerprints.iter().any(|f| f == stranger) {
                assert!(!trusts(&record, stranger, &record.at));
            }
        }
    }
});

fn text_or_empty(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
