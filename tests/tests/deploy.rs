//! `deploy/`, checked without a cluster: every overlay renders (`kubectl kustomize`) into objects
//! the Kubernetes API knows field for field; the daemon gets exactly the privileges and host
//! mounts it needs; every `SPEGEL_*` variable and flag the manifests pass is one the real
//! command line accepts (with that value); every metric the monitoring component names is one
//! the daemon exports, and `promtool` accepts the alert rules.
//!
//! Needs `kubectl` (with its built-in kustomize) and `promtool` on PATH; no root, no cluster.
use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::OsStr,
    fs,
    path::{Component, Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use clap::{ArgAction, CommandFactory as _, Parser as _};
use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{
        ConfigMap, Container, EnvVar, Namespace, ResourceQuota, Service, ServiceAccount, Volume,
    },
    networking::v1::NetworkPolicy,
};
use serde::{Deserialize as _, Serialize, de::DeserializeOwned};
use serde_json::Value;
use spegel::config::Cli;

/// What an overlay installs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// eBPF interception and node-setup.
    Transparent,
    /// hosts.toml through configure-mirror.
    Mirror,
    /// The uninstall helper.
    Undo,
}

/// Every overlay, with its mode; `every_overlay_is_listed` keeps this whole.
const OVERLAYS: &[(&str, Mode)] = &[
    ("transparent", Mode::Transparent),
    ("mirror", Mode::Mirror),
    ("k3s", Mode::Transparent),
    ("rke2", Mode::Transparent),
    ("gke", Mode::Transparent),
    ("talos", Mode::Mirror),
    ("transparent-undo", Mode::Undo),
    ("mirror-undo", Mode::Undo),
    ("k3s-undo", Mode::Undo),
    ("rke2-undo", Mode::Undo),
    ("talos-undo", Mode::Undo),
];

/// Combinations of components no shipped overlay uses, rendered too: (name, components after
/// the base).
const COMBINATIONS: &[(&str, &[&str])] = &[
    ("transparent+monitoring", &["transparent", "monitoring"]),
    ("mirror+monitoring", &["mirror", "monitoring"]),
    (
        "transparent+legacy-kernel",
        &["transparent", "legacy-kernel"],
    ),
];

/// Paths on the node, by overlay: (containerd socket, content store, unit, cgroup).
const NODE_PATHS: &[(&str, &str, &str, &str, &str)] = &[
    (
        "transparent",
        "/run/containerd/containerd.sock",
        "/var/lib/containerd/io.containerd.content.v1.content",
        "containerd.service",
        "/system.slice/containerd.service",
    ),
    (
        "k3s",
        "/run/k3s/containerd/containerd.sock",
        "/var/lib/rancher/k3s/agent/containerd/io.containerd.content.v1.content",
        "k3s.service",
        "/system.slice/k3s.service",
    ),
    (
        "rke2",
        "/run/k3s/containerd/containerd.sock",
        "/var/lib/rancher/rke2/agent/containerd/io.containerd.content.v1.content",
        "rke2-server.service",
        "/system.slice/rke2-server.service",
    ),
    (
        "gke",
        "/run/containerd/containerd.sock",
        "/var/lib/containerd/io.containerd.content.v1.content",
        "containerd.service",
        "/system.slice/containerd.service",
    ),
];

/// The image the shipped overlays name (a placeholder until one is published).
const IMAGE_NAME: &str = "registry.invalid/spegel";
const IMAGE_TAG: &str = "0.0.0";

/// Subcommands that exist only once `node-setup` has landed (see `node_setup_env_is_accepted`).
const NODE_SETUP: &str = "node-setup";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// `kubectl kustomize <dir>`, parsed into one JSON value per object.
fn kustomize(dir: &Path) -> Vec<Value> {
    let output = match Command::new("kubectl").arg("kustomize").arg(dir).output() {
        Ok(output) => output,
        Err(err) => panic!("cannot run `kubectl` ({err}): these tests need kubectl (>= 1.27)"),
    };
    assert!(
        output.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).expect("kustomize prints UTF-8");
    serde_norway::Deserializer::from_str(&text)
        .map(|document| Value::deserialize(document).expect("kustomize prints valid YAML"))
        .filter(|value| !value.is_null())
        .collect()
}

/// A path from `from` to `to`, both absolute (kustomize refuses absolute resource paths).
fn relative(from: &Path, to: &Path) -> PathBuf {
    let depth = from
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .count();
    let mut path: PathBuf = std::iter::repeat_n("..", depth).collect();
    path.extend(
        to.components()
            .filter(|c| matches!(c, Component::Normal(_))),
    );
    path
}

/// Every overlay and combination, rendered once per test binary.
fn rendered() -> &'static BTreeMap<String, Vec<Value>> {
    static RENDERED: OnceLock<BTreeMap<String, Vec<Value>>> = OnceLock::new();
    RENDERED.get_or_init(|| {
        let deploy = repo().join("deploy");
        let mut all: BTreeMap<String, Vec<Value>> = OVERLAYS
            .iter()
            .map(|(name, _)| (name.to_string(), kustomize(&deploy.join("overlays").join(name))))
            .collect();
        let scratch = std::env::temp_dir().join(format!("spegel-deploy-{}", std::process::id()));
        for (name, components) in COMBINATIONS {
            let dir = scratch.join(name);
            fs::create_dir_all(&dir).unwrap();
            let to = |path: &str| relative(&dir, &deploy.join(path)).display().to_string();
            let components: Vec<String> = components
                .iter()
                .map(|c| format!("  - {}\n", to(&format!("components/{c}"))))
                .collect();
            fs::write(
                dir.join("kustomization.yaml"),
                format!(
                    "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - {}\ncomponents:\n{}images:\n  - name: spegel\n    newName: {IMAGE_NAME}\n    newTag: {IMAGE_TAG}\n",
                    to("base"),
                    components.concat()
                ),
            )
            .unwrap();
            all.insert(name.to_string(), kustomize(&dir));
        }
        let _ = fs::remove_dir_all(&scratch);
        all
    })
}

fn mode_of(name: &str) -> Mode {
    OVERLAYS
        .iter()
        .find(|(overlay, _)| *overlay == name)
        .map(|(_, mode)| *mode)
        .unwrap_or_else(|| {
            if name.starts_with("mirror") {
                Mode::Mirror
            } else {
                Mode::Transparent
            }
        })
}

/// Deserializes `object` into `T` and back: any field `T` does not know (a typo, a field of
/// another version) makes the two differ.
#[track_caller]
fn typed<T: DeserializeOwned + Serialize>(overlay: &str, object: &Value) -> T {
    let value: T = serde_json::from_value(object.clone())
        .unwrap_or_else(|err| panic!("{overlay}: {err}: {object:#}"));
    let back = serde_json::to_value(&value).unwrap();
    assert_eq!(
        &back, object,
        "{overlay}: {} {} has fields the API does not know (left: as the API reads it)",
        object["kind"], object["metadata"]["name"]
    );
    value
}

fn kind_of(object: &Value) -> (&str, &str) {
    (
        object["apiVersion"].as_str().unwrap_or_default(),
        object["kind"].as_str().unwrap_or_default(),
    )
}

/// The objects of `overlay` of `kind`, typed.
fn objects<T: DeserializeOwned + Serialize>(overlay: &str, kind: &str) -> Vec<T> {
    rendered()[overlay]
        .iter()
        .filter(|object| kind_of(object).1 == kind)
        .map(|object| typed(overlay, object))
        .collect()
}

fn daemonset(overlay: &str) -> DaemonSet {
    let mut sets: Vec<DaemonSet> = objects(overlay, "DaemonSet");
    assert_eq!(sets.len(), 1, "{overlay}: one DaemonSet");
    sets.remove(0)
}

fn config_maps(overlay: &str) -> Vec<ConfigMap> {
    objects(overlay, "ConfigMap")
}

fn containers(set: &DaemonSet) -> Vec<&Container> {
    let pod = set.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    pod.init_containers
        .iter()
        .flatten()
        .chain(&pod.containers)
        .collect()
}

fn container<'a>(set: &'a DaemonSet, name: &str) -> &'a Container {
    containers(set)
        .into_iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// The value of `name` in `container`'s environment: literal, or resolved from a ConfigMap of
/// the overlay (`None` when unset or optional and absent).
fn env_value(overlay: &str, container: &Container, name: &str) -> Option<String> {
    let var = container.env.iter().flatten().find(|v| v.name == name)?;
    resolve(overlay, var)
}

fn resolve(overlay: &str, var: &EnvVar) -> Option<String> {
    if let Some(value) = &var.value {
        return Some(value.clone());
    }
    let source = var
        .value_from
        .as_ref()
        .expect("env has a value or a source");
    let key = source
        .config_map_key_ref
        .as_ref()
        .unwrap_or_else(|| panic!("{overlay}: {} comes from a ConfigMap or nowhere", var.name));
    let map = config_maps(overlay)
        .into_iter()
        .find(|map| map.metadata.name.as_deref() == Some(key.name.as_str()))
        .unwrap_or_else(|| panic!("{overlay}: {}: no ConfigMap {}", var.name, key.name));
    let value = map.data.unwrap_or_default().get(&key.key).cloned();
    assert!(
        value.is_some() || key.optional == Some(true),
        "{overlay}: {}: ConfigMap {} has no key {}",
        var.name,
        key.name,
        key.key
    );
    value
}

fn volume<'a>(set: &'a DaemonSet, name: &str) -> &'a Volume {
    let pod = set.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    pod.volumes
        .iter()
        .flatten()
        .find(|v| v.name == name)
        .unwrap_or_else(|| panic!("no volume {name}"))
}

/// The volume mounted at `path` in `container`, and whether read-only.
fn mount_at<'a>(set: &'a DaemonSet, container: &Container, path: &str) -> (&'a Volume, bool) {
    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == path)
        .unwrap_or_else(|| panic!("{}: nothing mounted at {path}", container.name));
    (
        volume(set, &mount.name),
        mount.read_only.unwrap_or_default(),
    )
}

/// The host path (and its type) behind a volume.
fn host_path(volume: &Volume) -> (&str, &str) {
    let host = volume
        .host_path
        .as_ref()
        .unwrap_or_else(|| panic!("volume {} is not a hostPath", volume.name));
    (&host.path, host.type_.as_deref().unwrap_or_default())
}

#[test]
fn every_overlay_is_listed() {
    let listed: BTreeSet<String> = OVERLAYS.iter().map(|(name, _)| name.to_string()).collect();
    let present: BTreeSet<String> = fs::read_dir(repo().join("deploy/overlays"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(listed, present);
    let components: BTreeSet<String> = fs::read_dir(repo().join("deploy/components"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let used: BTreeSet<String> = fs::read_dir(repo().join("deploy/overlays"))
        .unwrap()
        .flat_map(|entry| {
            let text = fs::read_to_string(entry.unwrap().path().join("kustomization.yaml"))
                .unwrap_or_default();
            components
                .iter()
                .filter(|c| text.contains(&format!("components/{c}\n")))
                .cloned()
                .collect::<Vec<_>>()
        })
        .chain(
            COMBINATIONS
                .iter()
                .flat_map(|(_, cs)| cs.iter().map(|c| c.to_string())),
        )
        .collect();
    assert_eq!(components, used, "every component is rendered by some test");
}

/// Every object of every rendering is a type the API knows, with only fields it knows.
#[test]
fn every_object_round_trips_through_its_api_type() {
    for (overlay, objects) in rendered() {
        assert!(!objects.is_empty(), "{overlay}: renders nothing");
        for object in objects {
            match kind_of(object) {
                ("v1", "Namespace") => drop(typed::<Namespace>(overlay, object)),
                ("v1", "ServiceAccount") => drop(typed::<ServiceAccount>(overlay, object)),
                ("v1", "ConfigMap") => drop(typed::<ConfigMap>(overlay, object)),
                ("v1", "Service") => drop(typed::<Service>(overlay, object)),
                ("v1", "ResourceQuota") => drop(typed::<ResourceQuota>(overlay, object)),
                ("apps/v1", "DaemonSet") => drop(typed::<DaemonSet>(overlay, object)),
                ("networking.k8s.io/v1", "NetworkPolicy") => {
                    drop(typed::<NetworkPolicy>(overlay, object))
                }
                ("monitoring.coreos.com/v1", "PodMonitor" | "PrometheusRule") => {}
                (api, kind) => panic!("{overlay}: unexpected {api} {kind}"),
            }
            let namespace = object["metadata"]["namespace"].as_str();
            match kind_of(object).1 {
                "Namespace" => assert_eq!(object["metadata"]["name"], "spegel"),
                _ => assert_eq!(namespace, Some("spegel"), "{overlay}: {object:#}"),
            }
        }
    }
}

/// The daemon runs with the least privilege its mode needs, on every node, with its probes.
#[test]
fn the_daemon_has_exactly_the_privileges_and_mounts_it_needs() {
    for overlay in rendered().keys() {
        let mode = mode_of(overlay);
        if mode == Mode::Undo {
            continue;
        }
        let set = daemonset(overlay);
        let spec = set.spec.as_ref().unwrap();
        let strategy = spec.update_strategy.as_ref().unwrap();
        let rolling = strategy.rolling_update.as_ref().unwrap();
        assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
        assert_eq!(
            serde_json::to_value(&rolling.max_unavailable).unwrap(),
            1,
            "{overlay}"
        );
        assert_eq!(serde_json::to_value(&rolling.max_surge).unwrap(), 0);
        let pod = spec.template.spec.as_ref().unwrap();
        assert_eq!(
            pod.host_network,
            Some(true),
            "{overlay}: the redirect lands on the node's loopback"
        );
        assert_eq!(
            pod.host_pid,
            Some(true).filter(|_| mode == Mode::Transparent),
            "{overlay}: hostPID only for node-setup and the CA trust watch"
        );
        assert_eq!(
            pod.priority_class_name.as_deref(),
            Some("system-node-critical")
        );
        assert_eq!(pod.automount_service_account_token, Some(false));
        let tolerations = pod.tolerations.as_ref().unwrap();
        assert!(
            tolerations
                .iter()
                .any(|t| t.operator.as_deref() == Some("Exists")
                    && t.key.is_none()
                    && t.effect.is_none()),
            "{overlay}: tolerates every taint"
        );
        let selector = spec.selector.match_labels.as_ref().unwrap();
        let labels = spec
            .template
            .metadata
            .as_ref()
            .unwrap()
            .labels
            .as_ref()
            .unwrap();
        assert!(selector.iter().all(|(k, v)| labels.get(k) == Some(v)));

        let daemon = container(&set, "spegel");
        assert_eq!(daemon.args.as_deref(), Some(&["run".to_owned()][..]));
        let security = daemon.security_context.as_ref().unwrap();
        assert_ne!(
            security.privileged,
            Some(true),
            "{overlay}: the daemon is not privileged"
        );
        assert_eq!(security.allow_privilege_escalation, Some(false));
        assert_eq!(security.read_only_root_filesystem, Some(true));
        let capabilities = security.capabilities.as_ref().unwrap();
        assert_eq!(capabilities.drop.as_deref(), Some(&["ALL".to_owned()][..]));
        let added: BTreeSet<&str> = capabilities
            .add
            .iter()
            .flatten()
            .map(String::as_str)
            .collect();
        let expected: BTreeSet<&str> = match (mode, overlay.contains("legacy-kernel")) {
            (Mode::Transparent, false) => ["BPF", "NET_ADMIN"].into(),
            (Mode::Transparent, true) => ["NET_ADMIN", "SYS_ADMIN", "SYS_RESOURCE"].into(),
            _ => BTreeSet::new(),
        };
        assert_eq!(added, expected, "{overlay}: capabilities");
        let resources = daemon.resources.as_ref().unwrap();
        assert!(
            resources
                .requests
                .as_ref()
                .is_some_and(|r| r.contains_key("cpu") && r.contains_key("memory"))
        );
        assert!(
            resources
                .limits
                .as_ref()
                .is_some_and(|l| l.contains_key("memory"))
        );

        // Probes: the registry port, the paths serve/api.rs answers.
        let port = daemon
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some("registry"))
            .unwrap();
        assert_eq!(
            port.container_port, 5000,
            "the daemon's default --registry-addr"
        );
        for (probe, path) in [
            (&daemon.startup_probe, "/readyz"),
            (&daemon.readiness_probe, "/readyz"),
            (&daemon.liveness_probe, "/livez"),
        ] {
            let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
            assert_eq!(get.path.as_deref(), Some(path));
            assert_eq!(serde_json::to_value(&get.port).unwrap(), "registry");
        }

        // Mounts, where the daemon's environment says it looks.
        let env = |name: &str| {
            env_value(overlay, daemon, name).unwrap_or_else(|| panic!("{overlay}: {name} unset"))
        };
        let (sock, _) = mount_at(&set, daemon, &env("SPEGEL_CONTAINERD_SOCK"));
        assert_eq!(host_path(sock).1, "Socket");
        let (content, read_only) = mount_at(&set, daemon, &env("SPEGEL_CONTAINERD_CONTENT_PATH"));
        assert!(read_only, "{overlay}: the content store is read-only");
        assert_eq!(host_path(content).1, "Directory");
        let data_dir = env("SPEGEL_DATA_DIR");
        let (data, read_only) = mount_at(&set, daemon, &data_dir);
        assert!(!read_only);
        assert_eq!(
            host_path(data).0,
            data_dir,
            "containerd's drop-in names the bundle by the same path"
        );
        let secret_file = PathBuf::from(env("SPEGEL_CLUSTER_SECRET_FILE"));
        let (secret, read_only) = mount_at(
            &set,
            daemon,
            secret_file.parent().unwrap().to_str().unwrap(),
        );
        assert!(read_only);
        let secret = secret
            .secret
            .as_ref()
            .expect("the cluster secret is a Secret");
        assert_eq!(secret.secret_name.as_deref(), Some("spegel-cluster-secret"));
        assert_eq!(secret.optional, None, "no daemon starts without the secret");
        assert_eq!(
            env_value(overlay, daemon, "SPEGEL_INSECURE_OPEN_CLUSTER"),
            None
        );
        match mode {
            Mode::Transparent => {
                assert_eq!(env("SPEGEL_INTERCEPT"), "true");
                let (cgroup, read_only) = mount_at(&set, daemon, &env("SPEGEL_CGROUP2_MOUNT"));
                assert!(read_only, "{overlay}: the host cgroup2 is read-only");
                assert_eq!(host_path(cgroup), ("/sys/fs/cgroup", "Directory"));
                assert!(env("SPEGEL_CONTAINERD_CGROUP").starts_with("/system.slice/"));
                let setup = container(&set, NODE_SETUP);
                assert_eq!(setup.args.as_deref(), Some(&[NODE_SETUP.to_owned()][..]));
                assert_eq!(
                    setup.security_context.as_ref().unwrap().privileged,
                    Some(true),
                    "node-setup enters PID 1's namespaces"
                );
                let (etc, read_only) = mount_at(&set, setup, "/host/etc");
                assert!(!read_only);
                assert_eq!(host_path(etc).0, "/etc");
                assert_eq!(
                    env_value(overlay, setup, "SPEGEL_TRUST_ROOT").as_deref(),
                    Some("/host")
                );
                assert_eq!(
                    env_value(overlay, setup, "SPEGEL_DATA_DIR"),
                    Some(data_dir.clone())
                );
                assert_eq!(
                    env_value(overlay, setup, "SPEGEL_MIRRORED_REGISTRIES"),
                    env_value(overlay, daemon, "SPEGEL_MIRRORED_REGISTRIES"),
                    "the CA is minted for the registries the daemon mirrors"
                );
            }
            Mode::Mirror => {
                assert_eq!(env("SPEGEL_INTERCEPT"), "false");
                let setup = container(&set, "configure-mirror");
                assert_ne!(
                    setup.security_context.as_ref().unwrap().privileged,
                    Some(true)
                );
                let path =
                    env_value(overlay, setup, "SPEGEL_CONTAINERD_REGISTRY_CONFIG_PATH").unwrap();
                let (certs, read_only) = mount_at(&set, setup, &path);
                assert!(!read_only);
                let expected = match overlay.starts_with("talos") {
                    true => "/etc/cri/conf.d/hosts",
                    false => "/etc/containerd/certs.d",
                };
                assert_eq!(host_path(certs).0, expected);
                let target = env_value(overlay, setup, "SPEGEL_MIRROR_TARGETS").unwrap();
                assert_eq!(
                    target, "http://127.0.0.1:5000",
                    "this node's daemon, on loopback"
                );
            }
            Mode::Undo => unreachable!(),
        }
        for c in containers(&set) {
            assert_eq!(
                c.security_context
                    .as_ref()
                    .unwrap()
                    .read_only_root_filesystem,
                Some(true),
                "{overlay}: {}",
                c.name
            );
            assert!(
                c.resources.as_ref().is_some_and(|r| r.limits.is_some()),
                "{overlay}: {}",
                c.name
            );
        }
    }
}

#[test]
fn distro_overlays_point_at_their_nodes_paths() {
    for (overlay, sock, content, unit, cgroup) in NODE_PATHS {
        let set = daemonset(overlay);
        let daemon = container(&set, "spegel");
        assert_eq!(
            host_path(volume(&set, "containerd-sock")),
            (*sock, "Socket"),
            "{overlay}"
        );
        assert_eq!(
            host_path(volume(&set, "containerd-content")).0,
            *content,
            "{overlay}"
        );
        assert_eq!(
            env_value(overlay, daemon, "SPEGEL_CONTAINERD_CGROUP").as_deref(),
            Some(*cgroup)
        );
        let setup = container(&set, NODE_SETUP);
        assert_eq!(
            env_value(overlay, setup, "SPEGEL_CONTAINERD_UNIT").as_deref(),
            Some(*unit)
        );
        let undo = format!("{overlay}-undo");
        if rendered().contains_key(&undo) {
            let set = daemonset(&undo);
            let setup = container(&set, "node-setup-undo");
            assert_eq!(
                env_value(&undo, setup, "SPEGEL_CONTAINERD_UNIT").as_deref(),
                Some(*unit)
            );
        }
    }
    let gke: Vec<ResourceQuota> = objects("gke", "ResourceQuota");
    assert_eq!(
        gke.len(),
        1,
        "GKE admits system-node-critical pods only under a quota"
    );
}

#[test]
fn undo_overlays_undo_once_per_node_and_stay_up() {
    for (overlay, mode) in OVERLAYS {
        if *mode != Mode::Undo {
            continue;
        }
        let set = daemonset(overlay);
        let pod = set.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        let init = pod.init_containers.as_ref().unwrap();
        assert_eq!(init.len(), 1, "{overlay}");
        assert_eq!(
            env_value(overlay, &init[0], "SPEGEL_UNDO").as_deref(),
            Some("true")
        );
        let transparent = init[0].args.as_deref() == Some(&[NODE_SETUP.to_owned()][..]);
        assert_eq!(
            pod.host_pid,
            Some(true).filter(|_| transparent),
            "{overlay}"
        );
        assert!(
            pod.tolerations
                .iter()
                .flatten()
                .any(|t| t.operator.as_deref() == Some("Exists"))
        );
        assert!(
            pod.containers
                .iter()
                .all(|c| c.security_context.as_ref().unwrap().privileged != Some(true))
        );
    }
}

/// Peers find each other through the headless Service, and the NetworkPolicy lets them talk.
#[test]
fn peers_can_find_and_reach_each_other() {
    for (overlay, mode) in OVERLAYS {
        if *mode == Mode::Undo {
            continue;
        }
        let set = daemonset(overlay);
        let labels = set
            .spec
            .as_ref()
            .unwrap()
            .template
            .metadata
            .as_ref()
            .unwrap()
            .labels
            .clone()
            .unwrap();
        let services: Vec<Service> = objects(overlay, "Service");
        assert_eq!(services.len(), 1);
        let service = &services[0];
        let spec = service.spec.as_ref().unwrap();
        assert_eq!(spec.cluster_ip.as_deref(), Some("None"), "headless");
        assert_eq!(spec.publish_not_ready_addresses, Some(true));
        assert!(
            spec.selector
                .as_ref()
                .unwrap()
                .iter()
                .all(|(k, v)| labels.get(k) == Some(v))
        );
        let dns = env_value(overlay, container(&set, "spegel"), "SPEGEL_BOOTSTRAP_DNS").unwrap();
        assert_eq!(
            dns,
            format!(
                "{}.{}.svc.cluster.local",
                service.metadata.name.as_deref().unwrap(),
                service.metadata.namespace.as_deref().unwrap()
            )
        );
        let policies: Vec<NetworkPolicy> = objects(overlay, "NetworkPolicy");
        let peers = policies
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some("spegel-peers"))
            .unwrap();
        let spec = peers.spec.as_ref().unwrap();
        let ports: BTreeSet<String> = spec
            .ingress
            .iter()
            .flatten()
            .flat_map(|rule| rule.ports.iter().flatten())
            .map(|p| serde_json::to_value(&p.port).unwrap().to_string())
            .collect();
        assert_eq!(ports, ["5000".to_owned(), "5001".to_owned()].into());
    }
}

/// The cluster secret is created by hand, once: docs/install.md says how.
#[test]
fn install_doc_says_how_to_create_the_cluster_secret() {
    let doc = fs::read_to_string(repo().join("docs/install.md")).unwrap();
    assert!(doc.contains("create secret generic spegel-cluster-secret"));
    for (overlay, _) in OVERLAYS {
        assert!(
            doc.contains(&format!("deploy/overlays/{overlay}")),
            "{overlay} is documented"
        );
    }
}

/// `spegel <subcommand> [args] --flag=value …` for a container's args and environment: every
/// `SPEGEL_*` variable becomes the flag whose twin it is, in the subcommand the container runs.
fn invocation(overlay: &str, container: &Container) -> Result<Vec<String>, String> {
    let args = container.args.clone().unwrap_or_default();
    let subcommand = args.first().ok_or("no subcommand")?.clone();
    let mut cli = Cli::command();
    cli.build();
    let command = cli
        .find_subcommand(&subcommand)
        .ok_or_else(|| format!("`spegel {subcommand}`: no such subcommand"))?;
    let mut argv = vec!["spegel".to_owned(), subcommand.clone()];
    for var in container.env.iter().flatten() {
        let arg = command
            .get_arguments()
            .find(|arg| arg.get_env() == Some(OsStr::new(&var.name)))
            .ok_or_else(|| format!("`spegel {subcommand}` reads no {}", var.name))?;
        let Some(value) = resolve(overlay, var) else {
            continue;
        };
        let long = arg.get_long().ok_or("an env twin without a flag")?;
        match (arg.get_action(), value.as_str()) {
            (ArgAction::SetTrue, "true") => argv.push(format!("--{long}")),
            (ArgAction::SetTrue, "false") => {}
            _ => argv.push(format!("--{long}={value}")),
        }
    }
    assert!(
        container.env_from.is_none(),
        "envFrom hides which variables a container gets"
    );
    assert!(
        container.command.is_none(),
        "the image's entrypoint is spegel"
    );
    argv.extend(args.into_iter().skip(1));
    Cli::try_parse_from(&argv).map_err(|err| format!("{argv:?}: {err}"))?;
    Ok(argv)
}

/// The containers running the spegel image, by overlay.
fn spegel_containers(filter: impl Fn(&Container) -> bool) -> Vec<(String, Container)> {
    let mut found = Vec::new();
    for overlay in rendered().keys() {
        for set in objects::<DaemonSet>(overlay, "DaemonSet") {
            for c in containers(&set) {
                if c.image.as_deref().is_some_and(|i| i.contains("/spegel:")) && filter(c) {
                    found.push((overlay.clone(), c.clone()));
                }
            }
        }
    }
    found
}

fn runs(c: &Container, subcommand: &str) -> bool {
    c.args.as_ref().and_then(|a| a.first()).map(String::as_str) == Some(subcommand)
}

/// Every container runs the one image the overlay names (patched-in init containers too).
#[test]
fn every_container_runs_the_named_image() {
    let image = format!("{IMAGE_NAME}:{IMAGE_TAG}");
    for overlay in rendered().keys() {
        for set in objects::<DaemonSet>(overlay, "DaemonSet") {
            for c in containers(&set) {
                let named = c.image.as_deref().unwrap();
                assert!(
                    named == image
                        || (c.name == "done" && named.starts_with("registry.k8s.io/pause:")),
                    "{overlay}: {} runs {named}",
                    c.name
                );
            }
        }
    }
}

#[test]
fn every_variable_and_flag_is_accepted_by_the_binary() {
    let checked = spegel_containers(|c| !runs(c, NODE_SETUP));
    assert!(checked.len() >= 10);
    for (overlay, container) in checked {
        if let Err(err) = invocation(&overlay, &container) {
            panic!("{overlay}: container {}: {err}", container.name);
        }
    }
}

#[test]
fn node_setup_env_is_accepted() {
    let checked = spegel_containers(|c| runs(c, NODE_SETUP));
    assert!(!checked.is_empty());
    for (overlay, container) in checked {
        if let Err(err) = invocation(&overlay, &container) {
            panic!("{overlay}: container {}: {err}", container.name);
        }
    }
}

/// What a check of a nonexistent variable says: the check is not vacuous.
#[test]
fn an_unknown_variable_is_refused() {
    let mut container = container(&daemonset("transparent"), "spegel").clone();
    container.env.as_mut().unwrap().push(EnvVar {
        name: "SPEGEL_NO_SUCH_THING".into(),
        value: Some("1".into()),
        value_from: None,
    });
    let err = invocation("transparent", &container).unwrap_err();
    assert!(err.contains("SPEGEL_NO_SUCH_THING"), "{err}");
    container.args = Some(vec!["no-such-command".into()]);
    assert!(invocation("transparent", &container).is_err());
}

/// Sample names Prometheus stores for the daemon's families (`# TYPE` lines): a counter `x`
/// is `x_total`, a histogram `x_bucket`, `x_sum`, `x_count`, a summary `x`, `x_sum`, `x_count`.
fn exported_series() -> BTreeSet<String> {
    let text = spegel::metrics::exposition_of_every_family();
    let mut series = BTreeSet::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (name, kind) = rest.split_once(' ').unwrap();
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "histogram" | "gaugehistogram" => &["_bucket", "_sum", "_count"],
            "summary" => &["", "_sum", "_count"],
            "info" => &["_info"],
            _ => &[""],
        };
        series.extend(suffixes.iter().map(|s| format!("{name}{s}")));
    }
    series
}

/// The metric names a PromQL expression selects: identifiers outside label matchers, strings
/// and range brackets, not called as functions, not keywords, not the label lists of
/// `by`/`without`/`on`/`ignoring`/`group_left`/`group_right`.
fn metric_names(expr: &str) -> Vec<String> {
    /// Followed by a list of label names.
    const LABEL_LISTS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    /// Binary operators, modifiers and aggregations (which may take `by (…)` before their
    /// parenthesis).
    const KEYWORDS: &[&str] = &[
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    ];
    let chars: Vec<char> = expr.chars().collect();
    let mut names = Vec::new();
    let mut i = 0;
    let mut skip_label_list = false;
    while i < chars.len() {
        let c = chars[i];
        let closing = match c {
            '{' => Some('}'),
            '[' => Some(']'),
            '"' | '\'' | '`' => Some(c),
            '(' if skip_label_list => Some(')'),
            _ => None,
        };
        if let Some(closing) = closing {
            skip_label_list = false;
            i += 1;
            while i < chars.len() && chars[i] != closing {
                i += 1;
            }
            i += 1;
            continue;
        }
        if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = chars[i..].iter().find(|c| !c.is_whitespace());
            if LABEL_LISTS.contains(&word.as_str()) {
                skip_label_list = true;
            } else if KEYWORDS.contains(&word.as_str()) {
                // An operator, not a metric.
            } else if next != Some(&'(') {
                names.push(word);
            }
            continue;
        }
        if c.is_ascii_digit() {
            // Numbers and durations (`7`, `1e3`, `5m`).
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
            continue;
        }
        i += 1;
    }
    names
}

#[test]
fn promql_names_are_found() {
    assert_eq!(
        metric_names(
            r#"sum by (node) (rate(a_total{x="y",n=~"$node"}[5m])) / on () b > 7 * 86400 and c"#
        ),
        ["a_total", "b", "c"]
    );
    assert_eq!(metric_names("up{job=\"s/s\"} == 0"), ["up"]);
    assert_eq!(metric_names("min by (node) (x > 0) - time()"), ["x"]);
}

/// Every PromQL expression of the monitoring component: the rules' and the dashboard's.
fn monitoring_exprs() -> Vec<(String, String)> {
    let objects = &rendered()["transparent+monitoring"];
    let mut exprs = Vec::new();
    let rules = objects
        .iter()
        .find(|o| kind_of(o) == ("monitoring.coreos.com/v1", "PrometheusRule"))
        .expect("a PrometheusRule");
    for group in rules["spec"]["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            let name = rule["alert"].as_str().expect("alerts only").to_owned();
            exprs.push((name, rule["expr"].as_str().unwrap().to_owned()));
        }
    }
    let dashboard_map = objects
        .iter()
        .find(|o| o["metadata"]["name"] == "spegel-grafana-dashboard")
        .expect("the dashboard ConfigMap");
    let dashboard: Value =
        serde_json::from_str(dashboard_map["data"]["spegel.json"].as_str().unwrap()).unwrap();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let title = panel["title"].as_str().unwrap().to_owned();
            exprs.push((title, target["expr"].as_str().unwrap().to_owned()));
        }
    }
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(query) = variable["definition"].as_str() {
            // label_values(metric, label)
            let metric = query
                .strip_prefix("label_values(")
                .and_then(|rest| rest.split(',').next())
                .expect("label_values queries only");
            exprs.push((format!("${}", variable["name"]), metric.to_owned()));
        }
    }
    exprs
}

#[test]
fn dashboard_and_alerts_name_only_exported_metrics() {
    let exported = exported_series();
    assert!(
        exported.contains("spegel_served_objects_total"),
        "{exported:?}"
    );
    let exprs = monitoring_exprs();
    assert!(exprs.len() > 20);
    for (name, expr) in exprs {
        let names = metric_names(&expr);
        assert!(!names.is_empty(), "{name}: `{expr}` selects no metric");
        for metric in names {
            // `up` is Prometheus's own, one per scrape target.
            assert!(
                metric == "up" || exported.contains(&metric),
                "{name}: `{expr}` names {metric}, which the daemon does not export"
            );
        }
    }
}

#[test]
fn monitoring_resources_match_the_daemonset() {
    let overlay = "transparent+monitoring";
    let objects = &rendered()[overlay];
    let set = daemonset(overlay);
    let labels = set
        .spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .clone()
        .unwrap();
    let monitor = objects
        .iter()
        .find(|o| kind_of(o) == ("monitoring.coreos.com/v1", "PodMonitor"))
        .expect("a PodMonitor");
    for (key, value) in monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap()
    {
        assert_eq!(labels.get(key).map(String::as_str), value.as_str(), "{key}");
    }
    let ports: BTreeSet<&str> = container(&set, "spegel")
        .ports
        .iter()
        .flatten()
        .filter_map(|p| p.name.as_deref())
        .collect();
    for endpoint in monitor["spec"]["podMetricsEndpoints"].as_array().unwrap() {
        assert!(ports.contains(endpoint["port"].as_str().unwrap()));
        assert_eq!(endpoint["path"], "/metrics");
    }
    let known: BTreeSet<&str> = ["selector", "podMetricsEndpoints"].into();
    for key in monitor["spec"].as_object().unwrap().keys() {
        assert!(known.contains(key.as_str()), "PodMonitor spec: {key}");
    }
}

/// `promtool check rules` on the PrometheusRule's groups.
#[test]
fn promtool_accepts_the_rules() {
    let rules = rendered()["transparent+monitoring"]
        .iter()
        .find(|o| kind_of(o).1 == "PrometheusRule")
        .unwrap();
    for group in rules["spec"]["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            let severity = rule["labels"]["severity"].as_str().unwrap();
            assert!(["info", "warning", "critical"].contains(&severity));
            assert!(rule["annotations"]["summary"].is_string());
        }
    }
    let file = std::env::temp_dir().join(format!("spegel-rules-{}.json", std::process::id()));
    // JSON is YAML.
    fs::write(&file, serde_json::to_string(&rules["spec"]).unwrap()).unwrap();
    let output = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .unwrap_or_else(|err| {
            panic!("cannot run `promtool` ({err}): install the Debian package `prometheus`")
        });
    let _ = fs::remove_file(&file);
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
