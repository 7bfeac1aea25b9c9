use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

/// The eBPF crate's `rust-toolchain.toml` names the one nightly the eBPF build uses (see the
/// comment there); read its channel rather than restating it here.
fn ebpf_toolchain(ebpf_dir: &std::path::Path) -> anyhow::Result<String> {
    let file = ebpf_dir.join("rust-toolchain.toml");
    println!("cargo:rerun-if-changed={}", file.display());
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let doc: toml::Table = text
        .parse()
        .with_context(|| format!("parsing {}", file.display()))?;
    doc.get("toolchain")
        .and_then(|t| t.get("channel"))
        .and_then(|c| c.as_str())
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("{} has no [toolchain] channel", file.display()))
}

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?;
    let ebpf_dir = std::path::Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("{manifest_dir} has no parent"))?
        .join("edge-classifier-ebpf");
    let channel = ebpf_toolchain(&ebpf_dir)?;
    let root_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    let package = aya_build::Package {
        name: "edge-classifier-ebpf",
        root_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([package], Toolchain::Custom(&channel))
}
