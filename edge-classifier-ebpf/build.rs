use which::which;

/// The eBPF build needs `bpf-linker` on PATH; rebuild when it changes. `cargo xtask setup`
/// installs it.
fn main() {
    let bpf_linker =
        which("bpf-linker").expect("bpf-linker not found on PATH: run `cargo xtask setup`");
    println!("cargo:rerun-if-changed={}", bpf_linker.display());
}
