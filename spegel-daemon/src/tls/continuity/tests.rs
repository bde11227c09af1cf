//! CA continuity: the coverage decision, the next CA beside the current one, the bundle,
//! promotion and the expiry threshold.
use std::sync::atomic::Ordering;

use rustls_pki_types::{CertificateDer, pem::PemObject as _};

use super::*;
use crate::tls::{ca::CA_VALIDITY, ca::DEFAULT_LEAF_VALIDITY, names::tests::permitted};

const DAY: Duration = Duration::from_secs(24 * 3600);

fn policy() -> CaPolicy {
    CaPolicy {
        renew_before: 30 * DAY,
        leaf_validity: DEFAULT_LEAF_VALIDITY,
    }
}

fn open(dir: &Path, names: &[&str]) -> CaSet {
    CaSet::open(dir, permitted(names), policy(), Arc::default()).unwrap()
}

fn certs_in(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap()
}

fn read(path: PathBuf) -> String {
    fs::read_to_string(path).unwrap()
}

#[test]
fn coverage_decision_table() {
    let dir = tempfile::tempdir().unwrap();
    let now = OffsetDateTime::now_utc();
    // (the CA's registries, the mirrored registries, names left uncovered)
    let table: &[(&[&str], &[&str], &[&str])] = &[
        // Same names: covered, whatever the ports (certificates name no port).
        (&["reg.test:5443"], &["reg.test:5000", "reg.test"], &[]),
        // A registry added by IP: the IP is not covered.
        (
            &["reg.test:5443"],
            &["reg.test:5443", "10.0.0.10:5443"],
            &["10.0.0.10"],
        ),
        // The same IP on another port: covered.
        (&["10.0.0.10:5000"], &["10.0.0.10:5443", "10.0.0.10"], &[]),
        // Another IP of the same family: not covered; IPv6 neither.
        (&["10.0.0.10"], &["10.0.0.11"], &["10.0.0.11"]),
        (&["10.0.0.10"], &["[fd00::10]:5443"], &["fd00::10"]),
        // A subdomain is covered by its parent, not the other way round.
        (&["docker.io"], &["registry-1.docker.io"], &[]),
        (&["registry-1.docker.io"], &["docker.io"], &["docker.io"]),
        // Lookalikes are not subdomains.
        (&["docker.io"], &["evildocker.io"], &["evildocker.io"]),
        // A removed registry leaves a CA that covers more: still fine.
        (&["docker.io", "ghcr.io"], &["ghcr.io"], &[]),
        // Scheme and case do not matter.
        (&["https://GHCR.io"], &["ghcr.io:443"], &[]),
    ];
    for (i, (ca_names, wanted, uncovered)) in table.iter().enumerate() {
        NodeCa::mint(
            dir.path(),
            &format!("t{i}"),
            &permitted(ca_names),
            DEFAULT_LEAF_VALIDITY,
        )
        .unwrap();
        // Judged on the CA as read back from disk, as at startup.
        let ca = NodeCa::load(dir.path(), &format!("t{i}"), DEFAULT_LEAF_VALIDITY).unwrap();
        let want = if uncovered.is_empty() {
            Assessment::Fine
        } else {
            Assessment::Uncovered(
                uncovered
                    .iter()
                    .map(|n| LeafName::parse(n).unwrap())
                    .collect(),
            )
        };
        assert_eq!(
            assess(&ca, &permitted(wanted), now, 30 * DAY),
            want,
            "CA {ca_names:?}, mirrored {wanted:?}"
        );
    }
}

#[test]
fn expiry_threshold() {
    let dir = tempfile::tempdir().unwrap();
    let ca = NodeCa::mint(
        dir.path(),
        "ca",
        &permitted(&["docker.io"]),
        DEFAULT_LEAF_VALIDITY,
    )
    .unwrap();
    let wanted = permitted(&["docker.io"]);
    // 40 days left: fine with a 30-day threshold, expiring with a 60-day one.
    let in_40_days = ca.not_after() - 40 * DAY;
    assert_eq!(assess(&ca, &wanted, in_40_days, 30 * DAY), Assessment::Fine);
    assert_eq!(
        assess(&ca, &wanted, in_40_days, 60 * DAY),
        Assessment::Expiring(ca.not_after())
    );
    // 20 days left, or expired: expiring.
    for at in [ca.not_after() - 20 * DAY, ca.not_after() + DAY] {
        assert_eq!(
            assess(&ca, &wanted, at, 30 * DAY),
            Assessment::Expiring(ca.not_after())
        );
    }
    // Expiry wins over coverage: an expiring CA is replaced even if it covers everything.
    assert!(matches!(
        assess(
            &ca,
            &permitted(&["ghcr.io"]),
            ca.not_after() - DAY,
            30 * DAY
        ),
        Assessment::Expiring(_)
    ));
}

#[test]
fn a_first_start_mints_a_next_ca_and_trusts_nothing() {
    let data = tempfile::tempdir().unwrap();
    let stats = Arc::new(CaStats::default());
    let set = CaSet::open(
        data.path(),
        permitted(&["docker.io", "10.0.0.1"]),
        policy(),
        Arc::clone(&stats),
    )
    .unwrap();
    assert!(set.trusted().is_none());
    let next = set.next().unwrap();
    assert!(!set.covers("docker.io") && !set.covers("10.0.0.1"));
    assert_eq!(read(set.dir().join(BUNDLE_FILE)), next.cert_pem());
    assert!(set.dir().join("next.key").exists() && !set.dir().join("ca.key").exists());
    assert_eq!(stats.minted.load(Ordering::Relaxed), 1);
    assert_eq!(stats.next_pending.load(Ordering::Relaxed), 1);
    assert_eq!(stats.uncovered_registries.load(Ordering::Relaxed), 2);
    // Opened again (install-ca, a restart): the same next CA, not another.
    let again = open(data.path(), &["docker.io", "10.0.0.1"]);
    assert_eq!(again.next().unwrap().cert_der(), next.cert_der());
}

/// A changed registry list keeps the current CA for what it covers, mints the next CA beside it
/// and bundles both; promotion makes the next one current and keeps the old files.
#[test]
fn a_changed_list_mints_beside_and_promotion_switches() {
    let data = tempfile::tempdir().unwrap();
    let set = open(data.path(), &["reg.test:5443"]);
    set.promote().unwrap();
    let current = set.trusted().unwrap();
    let current_pem = current.cert_pem().to_owned();
    assert!(set.next().is_none());
    assert_eq!(read(set.dir().join("ca.crt")), current_pem);

    // Restarted with the registry also mirrored by IP.
    let stats = Arc::new(CaStats::default());
    let set = CaSet::open(
        data.path(),
        permitted(&["reg.test:5443", "10.0.0.10:5443"]),
        policy(),
        Arc::clone(&stats),
    )
    .unwrap();
    // The current CA is kept, on disk and in use, for the name it covers.
    assert_eq!(read(set.dir().join("ca.crt")), current_pem);
    assert_eq!(set.trusted().unwrap().cert_pem(), current_pem);
    assert!(set.covers("reg.test") && set.covers("sub.reg.test"));
    assert!(!set.covers("10.0.0.10"));
    assert!(!set.covers("not a name"));
    let next = set.next().unwrap();
    assert!(
        next.permitted()
            .permits(&LeafName::parse("10.0.0.10").unwrap())
    );
    // The bundle has both, current first.
    let bundle = read(set.dir().join(BUNDLE_FILE));
    assert_eq!(bundle, set.bundle_pem());
    let certs = certs_in(&bundle);
    assert_eq!(certs.len(), 2);
    assert_eq!(&certs[0], current.cert_der());
    assert_eq!(&certs[1], next.cert_der());
    assert_eq!(
        set.bundle_fingerprints(),
        [current.fingerprint(), next.fingerprint()]
    );
    assert_eq!(stats.uncovered_registries.load(Ordering::Relaxed), 1);
    assert_eq!(stats.next_pending.load(Ordering::Relaxed), 1);
    assert_eq!(stats.minted.load(Ordering::Relaxed), 1);

    // Promotion: next becomes current, the old files are kept as previous.
    assert!(set.promote().unwrap());
    assert!(!set.promote().unwrap(), "nothing left to promote");
    assert_eq!(set.trusted().unwrap().cert_der(), next.cert_der());
    assert!(set.covers("10.0.0.10") && set.covers("reg.test"));
    assert_eq!(read(set.dir().join("ca.crt")), next.cert_pem());
    assert_eq!(read(set.dir().join("previous.crt")), current_pem);
    assert!(!set.dir().join("next.crt").exists() && !set.dir().join("next.key").exists());
    assert_eq!(read(set.dir().join(BUNDLE_FILE)), next.cert_pem());
    assert_eq!(stats.uncovered_registries.load(Ordering::Relaxed), 0);
    assert_eq!(stats.next_pending.load(Ordering::Relaxed), 0);
    assert_eq!(stats.promoted.load(Ordering::Relaxed), 1);
    // The promoted CA is what the next start loads, with nothing pending.
    let reopened = open(data.path(), &["reg.test:5443", "10.0.0.10:5443"]);
    assert_eq!(reopened.trusted().unwrap().cert_der(), next.cert_der());
    assert!(reopened.next().is_none());
}

#[test]
fn a_stale_next_ca_is_dropped_when_the_current_one_covers_again() {
    let data = tempfile::tempdir().unwrap();
    open(data.path(), &["docker.io"]).promote().unwrap();
    let set = open(data.path(), &["docker.io", "ghcr.io"]);
    assert!(set.next().is_some());
    // The list goes back (or loses a registry): the current CA is enough again.
    let set = open(data.path(), &["docker.io"]);
    assert!(set.next().is_none());
    assert!(!set.dir().join("next.crt").exists());
    assert_eq!(certs_in(&read(set.dir().join(BUNDLE_FILE))).len(), 1);
}

#[test]
fn an_expiring_current_ca_gets_a_successor_and_keeps_serving() {
    let data = tempfile::tempdir().unwrap();
    open(data.path(), &["docker.io"]).promote().unwrap();
    let stats = Arc::new(CaStats::default());
    // A threshold longer than the CA's validity makes it "expiring" now.
    let expiring = CaPolicy {
        renew_before: CA_VALIDITY + DAY,
        ..policy()
    };
    let set = CaSet::open(
        data.path(),
        permitted(&["docker.io"]),
        expiring,
        Arc::clone(&stats),
    )
    .unwrap();
    assert!(set.next().is_some());
    // Not expired yet: it still terminates what it covers.
    assert!(set.covers("docker.io"));
    assert_eq!(certs_in(&set.bundle_pem()).len(), 2);
    assert_eq!(stats.minted.load(Ordering::Relaxed), 1);
    assert!(stats.current_not_after.load(Ordering::Relaxed) > 0);
}

#[test]
fn an_unreadable_current_ca_is_kept_on_disk_and_a_next_one_minted() {
    let data = tempfile::tempdir().unwrap();
    open(data.path(), &["docker.io"]).promote().unwrap();
    let key = data.path().join("ca/ca.key");
    fs::write(&key, "garbage").unwrap();
    let set = open(data.path(), &["docker.io"]);
    assert!(set.trusted().is_none() && set.next().is_some());
    assert_eq!(read(key), "garbage", "the old files are left alone");
}
