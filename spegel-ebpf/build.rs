/// Rebuild the eBPF object when the bpf-linker binary changes: cargo cannot express a dependency on
/// the linker itself, so tell it to watch the file.
fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(err) => println!("cargo:warning=bpf-linker not found on PATH: {err}"),
    }
}
