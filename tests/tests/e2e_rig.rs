//! End-to-end checks of the rig itself: real containerd nodes pulling from the real registry,
//! the access log telling who fetched what, and teardown leaving nothing behind.
//!
//! Run with `SPEGEL_E2E=1 cargo test -p spegel-tests --test e2e_rig -- --nocapture` as root.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use spegel_tests::rig::{
    Endpoint, K8S_NAMESPACE, NetnsMode, Platform, ProcessSpec, Rig, TestImage, leftovers,
};

/// Each pulled blob (config + layers of the host manifest) exactly once.
fn once_each(image: &TestImage) -> BTreeMap<String, usize> {
    image
        .pulled_blobs()
        .into_iter()
        .map(|blob| (blob.digest.clone(), 1))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(spegel_e2e),
    ignore = "end-to-end: needs root; build and run with SPEGEL_E2E=1 (cargo xtask test)"
)]
async fn three_nodes_pull_through_cri_and_ctr_then_teardown_leaves_nothing() {
    spegel_tests::require_e2e!();
    let _serial = spegel_tests::serial().await;

    let started = Instant::now();
    let rig = Rig::builder().nodes(3).start().await.expect("rig starts");
    let prefix = rig.prefix().to_owned();
    eprintln!(
        "rig {prefix} ({}) up in {:?}",
        rig.subnet(),
        started.elapsed()
    );

    // Every containerd runs in its own cgroup2 directory.
    for node in rig.nodes() {
        let pid = node.containerd().pid().expect("containerd runs");
        let procs = std::fs::read_to_string(node.cgroup_dir().join("cgroup.procs")).unwrap();
        assert!(
            procs.lines().any(|line| line.trim() == pid.to_string()),
            "containerd {pid} not in {}: {procs}",
            node.cgroup_dir().display()
        );
    }

    // CRI pulls of the 4-layer image on all nodes at once.
    let four = rig.images().four.clone();
    let reference = four.reference(Endpoint::Plain);
    let before = rig.registry_log().await.unwrap();
    let pull_started = Instant::now();
    let image_refs =
        futures::future::try_join_all(rig.nodes().iter().map(|node| node.cri_pull(&reference)))
            .await
            .expect("CRI pulls succeed");
    eprintln!("3 CRI pulls of four: {:?}", pull_started.elapsed());
    for image_ref in &image_refs {
        assert_eq!(image_ref, &four.config().digest);
    }

    // The registry saw every blob exactly once per node, from that node's address.
    let log = rig.registry_log().await.unwrap().since(&before);
    let expected = once_each(&four);
    assert_eq!(expected.len(), 5, "config + 4 layers");
    for node in rig.nodes() {
        assert_eq!(
            log.blob_gets_by(node.ip()),
            expected,
            "blob downloads by {} ({})",
            node.name(),
            node.ip()
        );
        for blob in four.pulled_blobs() {
            assert!(
                node.has_blob(&blob.digest).await.unwrap(),
                "{} lacks {} after the pull (discard_unpacked_layers must stay false)",
                node.name(),
                blob.digest
            );
        }
    }
    assert_eq!(log.blob_gets().count(), 15, "no other client fetched blobs");
    assert!(
        log.manifest_requests()
            .all(|entry| entry.repository() == Some("rig/four")),
        "only the pulled repository was touched"
    );

    // CRI lists the image; Content.Read returns the largest layer intact.
    let cri_images = rig.node(0).cri_images().await.unwrap();
    assert!(
        cri_images
            .iter()
            .any(|image| image.repo_tags.contains(&reference)),
        "{cri_images:?}"
    );
    let largest = &four.layers()[3];
    let data = rig.node(0).read_blob(&largest.digest).await.unwrap();
    assert_eq!(data.len() as u64, largest.size);

    // A ctr pull (client-side download) on one node.
    let small = rig.images().small.clone();
    let before = rig.registry_log().await.unwrap();
    rig.node(1)
        .ctr_pull(&small.reference(Endpoint::Plain))
        .await
        .expect("ctr pull succeeds");
    let log = rig.registry_log().await.unwrap().since(&before);
    assert_eq!(log.blob_gets_by(rig.node(1).ip()), once_each(&small));
    assert_eq!(log.blob_gets().count(), 2, "only node 2 fetched");
    let records = rig.node(1).images(K8S_NAMESPACE).await.unwrap();
    assert!(
        records
            .iter()
            .any(|record| record.name == small.reference(Endpoint::Plain)
                && record.target_digest == small.digest()),
        "{records:?}"
    );

    // Over TLS (CA from hosts.toml), the index resolves to the host platform only.
    let multi = rig.images().multi.clone();
    let before = rig.registry_log().await.unwrap();
    rig.node(2)
        .cri_pull(&multi.reference(Endpoint::Tls))
        .await
        .expect("CRI pull over TLS succeeds");
    let log = rig.registry_log().await.unwrap().since(&before);
    assert!(log.iter().all(|entry| entry.listener == Endpoint::Tls));
    assert_eq!(log.blob_gets_by(rig.node(2).ip()), once_each(&multi));
    let other_arch = if Platform::host().architecture == "arm64" {
        "amd64"
    } else {
        "arm64"
    };
    let other = multi.manifest_for(&Platform::linux(other_arch)).unwrap();
    for blob in other.blobs() {
        assert_eq!(
            log.blob_get_count(&blob.digest),
            0,
            "{other_arch} blob fetched"
        );
    }

    // The leftovers check does see a live rig (so an empty result below means something).
    assert!(!leftovers(&prefix).is_empty());

    let stopping = Instant::now();
    rig.shutdown().await.expect("clean teardown");
    eprintln!("teardown in {:?}", stopping.elapsed());
    let left = leftovers(&prefix);
    assert!(left.is_empty(), "left behind: {left:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(spegel_e2e),
    ignore = "end-to-end: needs root; build and run with SPEGEL_E2E=1 (cargo xtask test)"
)]
async fn registry_restart_node_env_processes_and_drop_teardown() {
    spegel_tests::require_e2e!();
    let _serial = spegel_tests::serial().await;

    let rig = Rig::builder()
        .nodes(1)
        .containerd_env("SPEGEL_RIG_MARK", "start")
        .start()
        .await
        .expect("rig starts");
    let prefix = rig.prefix().to_owned();
    let node = rig.node(0);
    let environ = |pid: u32| std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let has_var = |pid: u32, var: &str| {
        environ(pid)
            .split(|&b| b == 0)
            .any(|entry| entry == var.as_bytes())
    };
    let pid = node.containerd().pid().unwrap();
    assert!(has_var(pid, "SPEGEL_RIG_MARK=start"));
    assert!(
        !environ(pid).windows(14).any(|w| w == b"SSL_CERT_FILE="),
        "containerd must not inherit the test's environment"
    );

    // With the registry stopped a pull fails; after a restart it works again.
    let small = rig.images().small.clone();
    rig.registry().stop().await.unwrap();
    assert!(!rig.registry().is_running());
    let error = node
        .cri_pull(&small.reference(Endpoint::Plain))
        .await
        .unwrap_err();
    eprintln!("pull with the registry stopped: {error:#}");
    rig.registry().start().await.unwrap();
    node.cri_pull(&small.reference(Endpoint::Plain))
        .await
        .expect("pull after registry restart");

    // Restarting containerd with new env keeps its content and applies the env.
    node.restart_containerd_with_env([("SPEGEL_RIG_MARK", "restarted")])
        .await
        .unwrap();
    let new_pid = node.containerd().pid().unwrap();
    assert_ne!(pid, new_pid);
    assert!(has_var(new_pid, "SPEGEL_RIG_MARK=restarted"));
    assert!(node.has_blob(&small.config().digest).await.unwrap());

    // remove_all_images empties the content store.
    node.remove_all_images().await.unwrap();
    assert!(node.blobs().await.unwrap().is_empty());

    // A freshly pushed custom image is fetched from upstream.
    let fresh = rig
        .push_image(
            spegel_tests::rig::ImageSpec::new("fresh")
                .layers([256 * 1024, 3 * 1024 * 1024])
                .seed(42),
        )
        .await
        .unwrap();
    assert_eq!(rig.image("fresh").as_ref(), Some(&fresh));
    node.cri_pull(&fresh.reference(Endpoint::Plain))
        .await
        .unwrap();
    assert!(node.has_blob(&fresh.layers()[1].digest).await.unwrap());

    // nsenter mode keeps cgroup2 visible and resolves the registry name; ip-netns-exec mode
    // hides cgroup2. Both run in the node's network namespace.
    let cg2 = spegel_tests::rig::cgroup2_mount().unwrap();
    let probe = format!(
        "test -e {cg2}/cgroup.procs && echo cgroup2-visible; \
         getent hosts {host} >/dev/null && echo hosts-ok; \
         ip -o addr show eth0 | grep -q ' {ip}/' && echo netns-ok; exec sleep 60",
        cg2 = cg2.display(),
        host = rig.registry().hostname(),
        ip = node.ip(),
    );
    let nsenter = node
        .spawn(
            ProcessSpec::new("probe-nsenter", "sh")
                .args(["-c", &probe])
                .mode(NetnsMode::Nsenter)
                .cgroup("probe"),
        )
        .unwrap();
    let netns_exec = rig
        .spawn_in_node(0, ProcessSpec::new("probe-exec", "sh").args(["-c", &probe]))
        .unwrap();
    // The probe's own output, without the rig's `--- rig: starting <command line>` lines (which
    // contain the probe script, markers included).
    let output = |process: &spegel_tests::rig::Process| -> Vec<String> {
        process
            .read_log()
            .lines()
            .filter(|line| !line.starts_with("--- rig:"))
            .map(str::to_owned)
            .collect()
    };
    for process in [&nsenter, &netns_exec] {
        for _ in 0..250 {
            if output(process).iter().any(|line| line == "netns-ok") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(
        output(&nsenter),
        ["cgroup2-visible", "hosts-ok", "netns-ok"]
    );
    assert_eq!(output(&netns_exec), ["hosts-ok", "netns-ok"]);
    let probe_cgroup = nsenter.cgroup_dir().unwrap();
    let procs = std::fs::read_to_string(probe_cgroup.join("cgroup.procs")).unwrap();
    assert!(procs.contains(&nsenter.pid().unwrap().to_string()));
    nsenter.kill().await.unwrap();
    assert!(!nsenter.is_running());

    // Dropping the rig (as a panicking test would) tears everything down, `netns_exec` included.
    drop(rig);
    let left = leftovers(&prefix);
    assert!(left.is_empty(), "left behind: {left:#?}");
}
