use which::which;

/// The eBPF build needs `bpf-linker` on PATH; rebuild when it changes. `cargo xtask setup`
/// installs it.
fn main() {
    let bpf_linker =
        which("bpf-linker").expect("bpf-linker not found on PATH: run `cargo xtask setup`");
    println!("cargo:rerun-if-changed={}", bpf_linker.display());
    // Header fields sit at any byte offset in a frame. Without this LLVM splits every load of a
    // port or address into byte loads and shifts; with it a field is one load. (bpf-linker does
    // the code generation; host builds of this crate, for clippy and tests, link with cc.)
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("bpf") {
        println!("cargo:rustc-link-arg=--cpu-features=+allows-misaligned-mem-access");
    }
}
