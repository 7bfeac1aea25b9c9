//! What the SYN proxy's paths cost, with BPF_PROG_TEST_RUN:
//! `cargo run --release -p edge-classifier-tests --example syn_proxy_cost [RUNS]`.
//! A measurement for people, not a test: it asserts nothing about speed.
//!
//! A SYN the proxy answers is rewritten in place into the SYN-ACK, so TestRun's repeats would
//! time the SYN-ACK after the first: it is timed one run at a time (`repeat = 1`, RUNS times,
//! the kernel's own timer around the one run), beside a SYN refused as `rate_limited` timed the
//! same way, which is the proxy's alternative. The ACK check (socket lookup, cookie check) does
//! not change the frame and is timed with repeats, beside an ACK of a limited rule without the
//! proxy.

use std::net::IpAddr;

use aya::programs::{TestRun as _, TestRunOptions};
use edge_classifier_tests::{
    ACK, Harness, edited_default_catalogue, syn_with_options, tcp_segment,
};

fn run(h: &mut Harness, frame: &[u8], repeat: u32) -> (u32, f64) {
    let r = h
        .classifier
        .program()
        .test_run(TestRunOptions {
            data_in: Some(frame),
            repeat,
            ..TestRunOptions::new()
        })
        .expect("BPF_PROG_TEST_RUN");
    (r.return_value, r.duration.as_nanos() as f64)
}

fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (v[v.len() / 10], v[v.len() / 2], v[v.len() * 9 / 10])
}

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("RUNS"))
        .unwrap_or(20_000);
    let cat = edited_default_catalogue(&[
        (
            "id = \"client-sip-tls-in\"",
            "id = \"client-sip-tls-in\"\nlimit = { per_source = \"1/h\", burst = 1, syn_proxy = true }",
        ),
        (
            "id = \"xmpp-federation-in\"",
            "id = \"xmpp-federation-in\"\nlimit = { per_source = \"1/h\", burst = 1 }",
        ),
    ]);
    let mut h = Harness::new(&cat, "external");
    let client: IpAddr = "198.51.100.1".parse().unwrap();
    let edge: IpAddr = "198.51.100.10".parse().unwrap();
    let syn = |dport: u16| syn_with_options(client, 40000, edge, dport);
    let (proxied, refused) = (syn(443), syn(5269));
    // The first of each is within the budget, the second of the proxied one goes through to
    // the listener (the stamp); from then on: XDP_TX (3) and XDP_DROP (1).
    for f in [&proxied, &refused] {
        run(&mut h, f, 1);
        run(&mut h, f, 1);
    }
    assert_eq!(run(&mut h, &proxied, 1).0, 3, "the proxied SYN is answered");
    assert_eq!(run(&mut h, &refused, 1).0, 1, "the other SYN is refused");
    let mut times = (Vec::new(), Vec::new());
    for _ in 0..runs {
        times.0.push(run(&mut h, &proxied, 1).1);
        times.1.push(run(&mut h, &refused, 1).1);
    }
    let (p, r) = (median(times.0), median(times.1));
    println!("one run at a time, {runs} runs (p10 / median / p90 ns):");
    println!(
        "  SYN over the budget, answered (SYN-ACK, XDP_TX): {:.0} / {:.0} / {:.0}",
        p.0, p.1, p.2
    );
    println!(
        "  SYN over the budget, refused (rate_limited):      {:.0} / {:.0} / {:.0}",
        r.0, r.1, r.2
    );
    // The proxy is active now: an ACK of no socket to 443 is looked up and checked (a wrong
    // cookie: dropped as syn_cookie_invalid); an ACK to 5269 is the rule's.
    let ack443 = tcp_segment(client, 40001, edge, 443, ACK);
    let ack5269 = tcp_segment(client, 40001, edge, 5269, ACK);
    assert_eq!(run(&mut h, &ack443, 1).0, 1, "a wrong cookie drops");
    assert_eq!(
        run(&mut h, &ack5269, 1).0,
        2,
        "the unproxied rule's ACK passes"
    );
    let repeat = 1_000_000;
    let mut a = (Vec::new(), Vec::new());
    for _ in 0..15 {
        a.0.push(run(&mut h, &ack443, repeat).1);
        a.1.push(run(&mut h, &ack5269, repeat).1);
    }
    let (a0, a1) = (median(a.0), median(a.1));
    println!("repeats of {repeat}, 15 rounds (median ns):");
    println!(
        "  ACK of no socket while the proxy answers (lookup + cookie check): {:.1}",
        a0.1
    );
    println!("  ACK of a limited rule without the proxy: {:.1}", a1.1);
}
