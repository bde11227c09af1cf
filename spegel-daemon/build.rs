//! Builds the eBPF programs (`spegel-ebpf`) with aya-build and leaves the object in `OUT_DIR/spegel`,
//! from where `src/ebpf.rs` embeds it. Needs nightly with rust-src and `bpf-linker` on PATH.
use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

fn main() -> anyhow::Result<()> {
    // `SPEGEL_E2E=1` at build time un-ignores the privileged integration tests (`tests/`).
    println!("cargo::rustc-check-cfg=cfg(spegel_e2e)");
    println!("cargo::rerun-if-env-changed=SPEGEL_E2E");
    if std::env::var("SPEGEL_E2E").as_deref() == Ok("1") {
        println!("cargo::rustc-cfg=spegel_e2e");
    }
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "spegel-ebpf")
        .ok_or_else(|| anyhow!("package spegel-ebpf not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    let package = aya_build::Package {
        name: ebpf.name.as_str(),
        root_dir: root_dir.as_str(),
        ..Default::default()
    };
    aya_build::build_ebpf([package], Toolchain::default())
}
