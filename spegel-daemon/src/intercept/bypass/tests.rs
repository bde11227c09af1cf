use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;

/// A `PassTable` that records what the programs would be told.
#[derive(Default)]
struct Table {
    passed: Mutex<HashMap<SocketAddr, Duration>>,
    writes: AtomicUsize,
}

impl PassTable for Table {
    fn pass(&self, dst: SocketAddr, ttl: Duration) -> Result<(), EbpfError> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.passed.lock().unwrap().insert(dst, ttl);
        Ok(())
    }

    fn unpass(&self, dst: SocketAddr) -> Result<(), EbpfError> {
        self.passed.lock().unwrap().remove(&dst);
        Ok(())
    }
}

impl Table {
    fn has(&self, dst: &str) -> bool {
        self.passed.lock().unwrap().contains_key(&addr(dst))
    }
}

/// Names resolve to what the table says; every lookup is counted.
#[derive(Default)]
struct Names {
    table: HashMap<String, Vec<IpAddr>>,
    lookups: AtomicUsize,
}

#[async_trait::async_trait]
impl Resolve for Names {
    async fn resolve(&self, name: &str) -> Vec<IpAddr> {
        self.lookups.fetch_add(1, Ordering::Relaxed);
        self.table.get(name).cloned().unwrap_or_default()
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

const TTL: Duration = Duration::from_secs(300);

fn bypass(mirrored: &[&str], names: &[(&str, &str)]) -> (Bypass, Arc<Table>, Arc<Names>) {
    let table = Arc::new(Table::default());
    let names = Arc::new(Names {
        table: names
            .iter()
            .map(|(n, ip)| ((*n).to_owned(), vec![ip.parse().unwrap()]))
            .collect(),
        lookups: AtomicUsize::new(0),
    });
    let mirrored = MirroredRegistries::parse(mirrored).unwrap();
    let bypass = Bypass::new(table.clone(), TTL, &mirrored, names.clone());
    (bypass, table, names)
}

#[tokio::test]
async fn an_unmirrored_destination_is_learned_for_the_ttl() {
    let (bypass, table, _) = bypass(&["ghcr.io"], &[("ghcr.io", "10.0.0.1")]);
    assert!(bypass.learn(addr("10.0.0.9:443")).await);
    assert_eq!(
        table.passed.lock().unwrap().get(&addr("10.0.0.9:443")),
        Some(&TTL)
    );
}

#[tokio::test]
async fn an_address_a_mirrored_name_resolves_to_is_never_learned() {
    let (bypass, table, _) = bypass(&["ghcr.io"], &[("ghcr.io", "10.0.0.1")]);
    // Another name on the registry's address (an ingress): still not learned, on any port.
    assert!(!bypass.learn(addr("10.0.0.1:443")).await);
    assert!(!bypass.learn(addr("10.0.0.1:8443")).await);
    assert!(!table.has("10.0.0.1:443") && !table.has("10.0.0.1:8443"));
}

#[tokio::test]
async fn a_mirrored_ip_literal_is_never_learned() {
    let (bypass, table, names) = bypass(&["10.0.0.5:5000"], &[]);
    bypass.learn(addr("10.0.0.5:443")).await;
    assert!(!table.has("10.0.0.5:443"));
    assert_eq!(names.lookups.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn an_address_that_carried_mirrored_traffic_is_never_learned() {
    let (bypass, table, _) = bypass(&["reg.local"], &[]);
    bypass.saw_mirrored(addr("10.0.0.7:443"));
    bypass.learn(addr("10.0.0.7:443")).await;
    bypass.learn(addr("10.0.0.7:8080")).await;
    assert!(!table.has("10.0.0.7:443") && !table.has("10.0.0.7:8080"));
}

#[tokio::test]
async fn a_mirrored_connection_to_a_learned_address_redirects_it_again() {
    let (bypass, table, _) = bypass(&["reg.local"], &[]);
    bypass.learn(addr("10.0.0.7:443")).await;
    bypass.learn(addr("10.0.0.8:443")).await;
    assert!(table.has("10.0.0.7:443"));
    bypass.saw_mirrored(addr("10.0.0.7:443"));
    assert!(!table.has("10.0.0.7:443"));
    assert!(table.has("10.0.0.8:443"), "another address stays learned");
    bypass.learn(addr("10.0.0.7:443")).await;
    assert!(!table.has("10.0.0.7:443"));
}

#[tokio::test(start_paused = true)]
async fn names_are_looked_up_once_a_minute_at_most() {
    let (bypass, _, names) = bypass(&["ghcr.io", "quay.io"], &[]);
    bypass.learn(addr("10.0.0.9:443")).await;
    bypass.learn(addr("10.0.0.10:443")).await;
    assert_eq!(names.lookups.load(Ordering::Relaxed), 2, "each name once");
    tokio::time::advance(RESOLVED_FOR + Duration::from_secs(1)).await;
    bypass.learn(addr("10.0.0.11:443")).await;
    assert_eq!(names.lookups.load(Ordering::Relaxed), 4);
}

#[tokio::test(start_paused = true)]
async fn a_learned_destination_is_renewed_after_half_the_ttl() {
    let (bypass, table, _) = bypass(&[], &[]);
    let dst = addr("10.0.0.9:443");
    assert!(bypass.learn(dst).await);
    assert!(!bypass.learn(dst).await);
    assert_eq!(table.writes.load(Ordering::Relaxed), 1);
    tokio::time::advance(TTL / 2).await;
    assert!(bypass.learn(dst).await);
    assert_eq!(table.writes.load(Ordering::Relaxed), 2);
}

#[test]
fn the_monotonic_clock_moves_forward() {
    let a = monotonic_ns();
    std::thread::sleep(Duration::from_millis(2));
    let b = monotonic_ns();
    assert!(b > a && b - a >= 2_000_000, "{a} → {b}");
}
