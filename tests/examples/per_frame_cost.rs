//! Per-frame cost of the classifier with BPF_PROG_TEST_RUN beside the empty XDP program, in one
//! run: `cargo run --release -p edge-classifier-tests --example per_frame_cost [REPEAT]`.
//! A measurement for people, not a test: it asserts nothing about speed.

use std::net::IpAddr;

use aya::{
    Ebpf,
    programs::{TestRun, TestRunOptions, Xdp},
};
use edge_classifier::loader::FLOOR_OBJECT;
use edge_classifier_tests::{ACK, Dir, FIN, Harness, SYN, TC_NEXT, tcp, tcp_segment, udp};

fn ns_per_frame<
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = aya::programs::TestRunResult>,
>(
    prog: &P,
    frame: &[u8],
    repeat: u32,
) -> f64 {
    let opts = TestRunOptions {
        data_in: Some(frame),
        repeat,
        ..TestRunOptions::new()
    };
    let r = prog.test_run(opts).expect("BPF_PROG_TEST_RUN");
    // The kernel reports the mean duration per repetition.
    r.duration.as_nanos() as f64
}

/// Flows recorded to fill the big table: remote addresses × local ports.
const BIG_TABLE: u32 = 1_000_000;

/// Memory the kernel charges for the flow maps of `capacity` entries (bpftool's memlock).
fn flow_table_bytes(capacity: u32) -> Option<u64> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "show"])
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    // One object per map; pick the IPv4 table (the flows below are IPv4) of this capacity
    // without a JSON dependency.
    text.split("},{").find_map(|m| {
        (m.contains("\"name\":\"FLOWS_V4\"") && m.contains(&format!("\"max_entries\":{capacity},")))
            .then(|| {
                let at = m.find("\"bytes_memlock\":")? + "\"bytes_memlock\":".len();
                m[at..]
                    .split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse()
                    .ok()
            })
            .flatten()
    })
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
    let peer: IpAddr = "198.51.100.77".parse().unwrap();
    // The flow the reply frames belong to, recorded as the TC egress program would.
    let request = tcp_segment(edge, 41000, peer, 5061, SYN);
    assert_eq!(h.run_dir(Dir::Out, &request), TC_NEXT);
    let reply = tcp_segment(peer, 5061, edge, 41000, ACK);
    let (edge6, peer6): (IpAddr, IpAddr) = (
        "2001:db8:100::10".parse().unwrap(),
        "2001:db8:100::77".parse().unwrap(),
    );
    let request6 = tcp_segment(edge6, 41000, peer6, 5061, SYN);
    assert_eq!(h.run_dir(Dir::Out, &request6), TC_NEXT);
    // P1's first frame from the shared seed-row table.
    let p1 = |v6: bool| {
        let (src, sport, dst, dport) = edge_classifier_lab::seed("P1").first(v6);
        tcp(src, sport, dst, dport)
    };
    let frames = [
        ("TCP 5061 SYN from a partner (P1, pass)", p1(false)),
        ("P1 SYN over IPv6 (pass)", p1(true)),
        ("TCP 22 SYN (no rule, drop)", tcp(partner, 40000, edge, 22)),
        ("S1 reply, flow recorded (pass)", reply.clone()),
        (
            "S1 reply over IPv6, flow recorded (pass)",
            tcp_segment(peer6, 5061, edge6, 41000, ACK),
        ),
        (
            "S1 reply with FIN (past the reply cache)",
            tcp_segment(peer, 5061, edge, 41000, FIN | ACK),
        ),
        (
            "S1 forged reply, no flow (drop)",
            tcp_segment(peer, 5061, edge, 41001, ACK),
        ),
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
    let egress = median(
        (0..5)
            .map(|_| ns_per_frame(h.classifier.egress_program(), &request, repeat))
            .collect(),
    );
    println!(
        "{:<42} {egress:>12.1}   (TC egress, flow refresh)",
        "S1 request"
    );

    // The same reply against a table holding a million other flows.
    let mut big = Harness::edited_default(
        "external",
        &[("capacity = 262144", &format!("capacity = {BIG_TABLE}"))],
    );
    for i in 0..BIG_TABLE {
        let remote: IpAddr = std::net::Ipv4Addr::from(0xC633_6400u32 + 20 + (i / 50_000)).into();
        let frame = udp(edge, 1 + (i % 50_000) as u16, remote, 3478);
        big.run_dir(Dir::Out, &frame);
    }
    assert_eq!(big.run_dir(Dir::Out, &request), TC_NEXT);
    let stats = big.classifier.maps().flow_stats().expect("flow stats");
    let ours = median(
        (0..5)
            .map(|_| ns_per_frame(big.classifier.program(), &reply, repeat))
            .collect(),
    );
    println!(
        "{:<42} {ours:>12.1}   ({} flows present, {} evicted)",
        "S1 reply, 1,000,000-flow table", stats.present, stats.evicted
    );
    match flow_table_bytes(BIG_TABLE) {
        Some(b) => println!(
            "flow table memory at capacity {BIG_TABLE}: {:.1} MiB ({:.0} bytes per flow)",
            b as f64 / (1024.0 * 1024.0),
            b as f64 / BIG_TABLE as f64
        ),
        None => println!("flow table memory: bpftool not available"),
    }
}
