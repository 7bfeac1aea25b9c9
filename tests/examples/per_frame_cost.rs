//! Per-frame cost of the classifier with BPF_PROG_TEST_RUN beside the empty XDP program, in one
//! run: `cargo run --release -p edge-classifier-tests --example per_frame_cost [REPEAT]`.
//! A measurement for people, not a test: it asserts nothing about speed.

use std::net::IpAddr;

use aya::{
    Ebpf,
    programs::{TestRun as _, TestRunOptions, Xdp},
};
use edge_classifier::loader::FLOOR_OBJECT;
use edge_classifier_tests::{Harness, tcp};

fn ns_per_frame(prog: &mut Xdp, frame: &[u8], repeat: u32) -> f64 {
    let opts = TestRunOptions {
        data_in: Some(frame),
        repeat,
        ..TestRunOptions::new()
    };
    let r = prog.test_run(opts).expect("BPF_PROG_TEST_RUN");
    // The kernel reports the mean duration per repetition.
    r.duration.as_nanos() as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let repeat: u32 = std::env::args()
        .nth(1)
        .map_or(1_000_000, |s| s.parse().expect("REPEAT"));
    let mut h = Harness::default_catalogue("external");
    let mut floor = Ebpf::load(FLOOR_OBJECT).expect("load floor object");
    let fp: &mut Xdp = floor.program_mut("xdp_pass").unwrap().try_into().unwrap();
    fp.load().expect("load xdp_pass");

    let edge: IpAddr = "198.51.100.10".parse().unwrap();
    let partner: IpAddr = "203.0.113.5".parse().unwrap();
    let frames = [
        (
            "TCP 5061 SYN from a partner (P1, pass)",
            tcp(partner, 40000, edge, 5061),
        ),
        ("TCP 22 SYN (no rule, drop)", tcp(partner, 40000, edge, 22)),
    ];
    println!("repeat {repeat}, median of 5 runs, ns per frame");
    println!(
        "{:<42} {:>12} {:>12} {:>8}",
        "frame", "classifier", "XDP_PASS", "ratio"
    );
    for (name, frame) in frames {
        let ours = median(
            (0..5)
                .map(|_| ns_per_frame(h.classifier.program(), &frame, repeat))
                .collect(),
        );
        let base = median((0..5).map(|_| ns_per_frame(fp, &frame, repeat)).collect());
        println!("{name:<42} {ours:>12.1} {base:>12.1} {:>8.2}", ours / base);
    }
}
