//! Turns `SPEGEL_E2E=1` at build time into `cfg(spegel_e2e)`, so a plain `cargo test` lists the
//! end-to-end tests as ignored (`#[cfg_attr(not(spegel_e2e), ignore = ...)]`) instead of passing
//! them silently, while `cargo xtask test` (which sets the variable) runs them.
fn main() {
    println!("cargo::rustc-check-cfg=cfg(spegel_e2e)");
    println!("cargo::rerun-if-env-changed=SPEGEL_E2E");
    if std::env::var("SPEGEL_E2E").as_deref() == Ok("1") {
        println!("cargo::rustc-cfg=spegel_e2e");
    }
}
