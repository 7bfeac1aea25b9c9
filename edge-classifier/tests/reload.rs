//! Reloads and restarts of a pinned classifier, with the real binary on a namespace lab: no
//! shared allowed frame lost and no forbidden frame passed while 100 reloads flip between two
//! catalogues, every frame XDP passed seen by a tap read throughout; an invalid catalogue
//! changes nothing; after `kill -9` the NICs stay protected and the next daemon adopts the pins,
//! counters continuing.

mod common;

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use common::*;
use edge_classifier::catalogue::DEFAULT_CATALOGUE;
use edge_classifier_lab::*;
use etherparse::PacketBuilder;

/// Catalogue B: the default without P3 (443), with a rule for 8443 instead, and a wider partner
/// set. P1 (5061 from partners) and P6 (udp 3478) are in both.
fn catalogue_b() -> String {
    let p3 = DEFAULT_CATALOGUE
        .find("id = \"client-sip-tls-in\"")
        .expect("P3 in the default");
    let start = DEFAULT_CATALOGUE[..p3].rfind("[[rule]]").unwrap();
    let end = start + DEFAULT_CATALOGUE[start + 1..].find("[[rule]]").unwrap() + 1;
    let mut text = format!(
        "{}{}",
        &DEFAULT_CATALOGUE[..start],
        &DEFAULT_CATALOGUE[end..]
    );
    text = text.replace(
        "public_im_partners = [\"203.0.113.0/24\", \"2001:db8:203::/48\"]",
        "public_im_partners = [\"203.0.113.0/24\", \"2001:db8:203::/48\", \"192.0.2.128/25\"]",
    );
    text.push_str(
        "\n[[rule]]\nid = \"alt-https-in\"\nprotocol = \"SIP/TLS\"\ntransport = \"tcp\"\ndirection = \"inbound\"\nlocal = \"access_edge\"\nremote = \"any\"\nport = 8443\ninterface = \"external\"\nnote = \"Read as: test rule only in catalogue B.\"\n",
    );
    text
}

struct Files {
    dir: PathBuf,
}

impl Files {
    fn new(tag: &str) -> Files {
        let dir = std::env::temp_dir().join(format!("ec-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Files { dir }
    }
    fn write(&self, name: &str, text: &str) -> String {
        let p = self.dir.join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const EXT: &str = "ext0=external";
const INT: &str = "int0=internal";

/// `run` arguments for an instance on the lab's NICs.
fn run_args<'a>(instance: &'a str, catalogue: Option<&'a str>, ifaces: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["--instance", instance, "--metrics", METRICS];
    if let Some(c) = catalogue {
        args.extend(["--catalogue", c]);
    }
    for i in ifaces {
        args.extend(["--iface", *i]);
    }
    args
}

fn scrape(ns: &str) -> String {
    http_get(ns, METRICS, "/metrics".into())
}

/// A rule's packets on ext0; a missing series is a failure, not a zero.
fn rule(text: &str, id: &str) -> f64 {
    metric(
        text,
        "edge_classifier_rule_packets_total",
        &[("rule", id), ("interface", EDGE_EXT)],
    )
    .unwrap_or_else(|| panic!("no rule_packets_total{{rule=\"{id}\"}} on {EDGE_EXT} in\n{text}"))
}

fn dropped(text: &str, reason: &str) -> f64 {
    metric(
        text,
        "edge_classifier_dropped_packets_total",
        &[("reason", reason), ("interface", EDGE_EXT)],
    )
    .unwrap_or_else(|| panic!("no dropped{{{reason}}} in\n{text}"))
}

fn frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: IpAddr,
    dst: IpAddr,
    udp: bool,
    sport: u16,
    dport: u16,
) -> Vec<u8> {
    let (IpAddr::V4(s), IpAddr::V4(d)) = (src, dst) else {
        panic!("v4 only")
    };
    let b = PacketBuilder::ethernet2(src_mac, dst_mac).ipv4(s.octets(), d.octets(), 64);
    let mut out = Vec::new();
    if udp {
        b.udp(sport, dport).write(&mut out, b"probe").unwrap();
    } else {
        b.tcp(sport, dport, 1, 64240)
            .syn()
            .write(&mut out, &[])
            .unwrap();
    }
    out
}

#[test]
fn a_hundred_reloads_under_traffic_lose_no_shared_frame_and_pass_no_forbidden_one() {
    let lab = Lab::create("rld").expect("lab");
    let files = Files::new("rld");
    let a = files.write("a.toml", DEFAULT_CATALOGUE);
    let b = files.write("b.toml", &catalogue_b());
    let instance = format!("rld{}", std::process::id());
    let _stop = Stop(instance.clone());
    let _daemon = start_daemon(&lab.edge, &run_args(&instance, Some(&a), &[EXT, INT]));
    let (wan_mac, ext_mac) = (
        mac(&lab.remote, "wan0").unwrap(),
        mac(&lab.edge, EDGE_EXT).unwrap(),
    );
    let f = |src: IpAddr, udp, sport, dport| {
        frame(wan_mac, ext_mac, src, EDGE_EXT_V4, udp, sport, dport)
    };
    let tx = RawSender::open(&lab.remote, "wan0").expect("raw sender");

    // New rules start at zero, also when a removed rule's slot comes back into use.
    for _ in 0..3 {
        tx.send(&f(CLIENT_V4, false, 42000, 443)).unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(rule(&scrape(&lab.edge), "client-sip-tls-in"), 3.0);
    let (ok, out, err) = cli(&["reload", "--instance", &instance, "--catalogue", &b]);
    assert!(ok, "{out}{err}");
    assert_eq!(
        rule(&scrape(&lab.edge), "alt-https-in"),
        0.0,
        "a new rule starts at zero"
    );
    for _ in 0..2 {
        tx.send(&f(CLIENT_V4, false, 42000, 8443)).unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(rule(&scrape(&lab.edge), "alt-https-in"), 2.0);
    let (ok, out, err) = cli(&["reload", "--instance", &instance, "--catalogue", &a]);
    assert!(ok, "{out}{err}");
    let text = scrape(&lab.edge);
    assert_eq!(
        rule(&text, "client-sip-tls-in"),
        0.0,
        "P3 is new again: zero"
    );
    assert!(
        !text.contains("alt-https-in"),
        "removed rule still exported"
    );
    let before = text;
    // Read while the traffic runs, with a buffer that holds all of it anyway: every frame XDP
    // passed is seen, also those of the flips.
    let tap = Tap::open(&lab.edge, EDGE_EXT).expect("tap ext0").record();

    // (kind, frame): 0 = allowed by both, 1 = forbidden by both, 2 = allowed by one of them.
    let kinds: Vec<(usize, Vec<u8>)> = vec![
        (0, f(PARTNER_V4, false, 41000, 5061)),
        (0, f(CLIENT_V4, true, 41001, 3478)),
        (1, f(CLIENT_V4, false, 41002, 22)),
        (1, f(CLIENT_V4, true, 41003, 5061)),
        (1, f(CLIENT_V4, false, 41004, 5061)),
        (2, f(CLIENT_V4, false, 41005, 443)),
        (2, f(CLIENT_V4, false, 41006, 8443)),
    ];
    let tuples: Vec<Tuple> = kinds.iter().map(|(_, fr)| tuple(fr).unwrap()).collect();
    let kinds_of: Vec<usize> = kinds.iter().map(|(k, _)| *k).collect();
    // Frames sent, per entry of `kinds`.
    let sent: Arc<Vec<AtomicU64>> = Arc::new(kinds.iter().map(|_| AtomicU64::new(0)).collect());
    let done = Arc::new(AtomicBool::new(false));
    let sender = {
        let (sent, done) = (sent.clone(), done.clone());
        std::thread::spawn(move || {
            // Bounded: at most 400,000 frames or 90 s, whichever comes first.
            let deadline = Instant::now() + Duration::from_secs(90);
            let mut total = 0u64;
            while !done.load(Ordering::Relaxed) && total < 400_000 && Instant::now() < deadline {
                for (i, (_, frame)) in kinds.iter().enumerate() {
                    tx.send(frame).expect("send");
                    sent[i].fetch_add(1, Ordering::Relaxed);
                    total += 1;
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    };

    // 100 reloads, alternating, while the frames flow; the shared counters never go back.
    let mut last_p1 = rule(&before, "public-im-sip-in");
    let started = Instant::now();
    for i in 0..100 {
        let file = if i % 2 == 0 { &b } else { &a };
        let (ok, out, err) = cli(&["reload", "--instance", &instance, "--catalogue", file]);
        assert!(ok, "reload {i} to {file}: {out}{err}");
        if i % 10 == 0 {
            let p1 = rule(&scrape(&lab.edge), "public-im-sip-in");
            assert!(
                p1 >= last_p1,
                "P1 went back from {last_p1} to {p1} at reload {i}"
            );
            last_p1 = p1;
        }
    }
    let reload_time = started.elapsed();
    done.store(true, Ordering::Relaxed);
    sender.join().expect("sender");
    let tapped = tap.finish(Duration::from_millis(300)).expect("tap");
    let after = scrape(&lab.edge);

    let sent: Vec<u64> = sent.iter().map(|n| n.load(Ordering::Relaxed)).collect();
    // What the tap saw of each, i.e. what XDP passed.
    let seen: Vec<u64> = tuples
        .iter()
        .map(|t| count(&tapped.received, |x| x == t))
        .collect();
    let of_kind = |k: usize, v: &[u64]| -> u64 {
        (0..v.len())
            .filter(|&i| kinds_of[i] == k)
            .map(|i| v[i])
            .sum()
    };
    let [allowed, forbidden, changing] = [0, 1, 2].map(|k| of_kind(k, &sent));
    let [allowed_seen, forbidden_seen, changing_seen] = [0, 1, 2].map(|k| of_kind(k, &seen));
    let report = format!(
        "sent {sent:?}, tap saw {seen:?} ({} frames received in all), tap {:?}",
        tapped.received.len(),
        tapped.stats
    );
    eprintln!("{report}");
    assert!(
        allowed >= 1000,
        "only {allowed} shared frames sent in {reload_time:?}"
    );
    // The tap missed nothing: the kernel dropped no frame for want of room in its buffer.
    assert_eq!(tapped.stats.drops, 0, "the tap dropped frames: {report}");
    // No forbidden frame passed XDP, at any instant.
    assert_eq!(forbidden_seen, 0, "forbidden frames passed XDP: {report}");
    // Every shared frame passed, each counted once under its rule, across every flip.
    assert_eq!(allowed_seen, allowed, "shared frames lost: {report}");
    let d = |f: &dyn Fn(&str) -> f64| (f(&after) - f(&before)) as u64;
    assert_eq!(
        d(&|t| rule(t, "public-im-sip-in")),
        sent[0],
        "P1 frames counted: {report}"
    );
    assert_eq!(
        d(&|t| rule(t, "messenger-stun-in")),
        sent[1],
        "P6 frames counted: {report}"
    );
    // Every frame XDP dropped as `no_rule` is accounted for: all the forbidden ones, and the
    // changing ones the tap did not see (their rules come and go, and a rule that comes back
    // starts at zero, so their passes are known from the tap alone).
    assert_eq!(
        d(&|t| dropped(t, "no_rule")),
        forbidden + changing - changing_seen,
        "no_rule drops: {report}"
    );
    assert_eq!(
        metric(
            &after,
            "edge_classifier_reloads_total",
            &[("result", "success")]
        ),
        Some(102.0)
    );
    // The last reload (to A) is what runs: 8443 is gone again from /metrics, 443 is back.
    assert!(after.contains("rule=\"client-sip-tls-in\""));
    assert!(
        !after.contains("rule=\"alt-https-in\""),
        "removed rule still exported"
    );
    eprintln!(
        "100 reloads in {reload_time:?} under {} frames: shared {allowed}, forbidden {forbidden}, changing {changing} ({changing_seen} passed); the tap saw every frame XDP passed",
        allowed + forbidden + changing
    );
    drop(_daemon);
    drop(lab);
}

#[test]
fn an_invalid_or_oversized_catalogue_changes_nothing() {
    let lab = Lab::create("bad").expect("lab");
    let files = Files::new("bad");
    let a = files.write("a.toml", DEFAULT_CATALOGUE);
    let instance = format!("bad{}", std::process::id());
    let _stop = Stop(instance.clone());
    let _daemon = start_daemon(&lab.edge, &run_args(&instance, Some(&a), &[EXT]));
    let listeners = Listeners::start(&lab.edge, &[443, 8443], &[]).expect("listeners");
    // B with a port out of range on a known line.
    let mut bad = catalogue_b();
    let line = bad.lines().count() - 2;
    bad = bad.replace("port = 8443", "port = 84430");
    let bad = files.write("bad.toml", &bad);
    let (ok, _, err) = cli(&["reload", "--instance", &instance, "--catalogue", &bad]);
    assert!(!ok, "an invalid catalogue must be rejected");
    assert!(
        err.contains(&format!("{bad}:{line}:8: port 84430 is out of range")),
        "error names file:line:column: {err}"
    );
    // Nine rules on one port do not fit the candidate list: rejected with the location too.
    let mut crowded = DEFAULT_CATALOGUE.to_string();
    for i in 0..9 {
        crowded.push_str(&format!(
            "\n[[rule]]\nid = \"crowd-{i}\"\nprotocol = \"SIP/TLS\"\ntransport = \"tcp\"\ndirection = \"inbound\"\nlocal = \"access_edge\"\nremote = \"any\"\nport = 9000\ninterface = \"external\"\n"
        ));
    }
    let crowded = files.write("crowded.toml", &crowded);
    let (ok, _, err) = cli(&["reload", "--instance", &instance, "--catalogue", &crowded]);
    assert!(!ok, "a catalogue that does not fit must be rejected");
    assert!(
        err.contains(&format!("{crowded}:"))
            && err.contains("more than 8 rules cover tcp port 9000"),
        "{err}"
    );
    // The old rules are in force: 443 connects, 8443 (only in the rejected B) does not.
    let ok443 = tcp_exchange(
        &lab.remote,
        SocketAddr::new(CLIENT_V4, 0),
        SocketAddr::new(EDGE_EXT_V4, 443),
        Duration::from_secs(3),
    )
    .unwrap();
    assert!(ok443.answered, "443 still allowed: {ok443:?}");
    let ok8443 = tcp_exchange(
        &lab.remote,
        SocketAddr::new(CLIENT_V4, 0),
        SocketAddr::new(EDGE_EXT_V4, 8443),
        Duration::from_millis(300),
    )
    .unwrap();
    assert!(!ok8443.connected, "8443 must stay dropped");
    assert!(listeners.tcp(8443).connections.is_empty());
    let text = scrape(&lab.edge);
    assert_eq!(
        metric(
            &text,
            "edge_classifier_reloads_total",
            &[("result", "failure")]
        ),
        Some(2.0)
    );
    assert_eq!(
        metric(
            &text,
            "edge_classifier_reloads_total",
            &[("result", "success")]
        ),
        Some(0.0)
    );
    drop(listeners);
    drop(_daemon);
    drop(lab);
}

#[test]
fn after_kill_9_the_nic_stays_protected_and_a_new_daemon_adopts_it() {
    let lab = Lab::create("k9").expect("lab");
    let instance = format!("k9{}", std::process::id());
    let _stop = Stop(instance.clone());
    let args = run_args(&instance, None, &[EXT, INT]);
    let listeners = Listeners::start(&lab.edge, &[443, 22], &[]).expect("listeners");
    let connect = |port: u16, t: u64| {
        tcp_exchange(
            &lab.remote,
            SocketAddr::new(CLIENT_V4, 0),
            SocketAddr::new(EDGE_EXT_V4, port),
            Duration::from_millis(t),
        )
        .unwrap()
    };
    let daemon = start_daemon(&lab.edge, &args);
    assert!(connect(443, 3000).answered);
    let p3_before = rule(&scrape(&lab.edge), "client-sip-tls-in");
    assert!(p3_before >= 3.0, "P3 counted {p3_before}");
    let xdp_before = xdp_prog(&lab.edge, EDGE_EXT);

    unsafe { libc::kill(daemon.pid(), libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(300));
    drop(daemon);
    // Nobody serves the instance now; the kernel still does the work.
    assert_eq!(
        xdp_prog(&lab.edge, EDGE_EXT),
        xdp_before,
        "XDP still attached after kill -9"
    );
    for _ in 0..3 {
        assert!(
            connect(443, 3000).answered,
            "443 still allowed with no daemon"
        );
        assert!(
            !connect(22, 300).connected,
            "22 still dropped with no daemon"
        );
    }
    assert!(listeners.tcp(22).connections.is_empty());

    let daemon = start_daemon(&lab.edge, &args);
    let text = scrape(&lab.edge);
    let p3_after = rule(&text, "client-sip-tls-in");
    // The frames of the three connections made while no daemon ran were counted too.
    assert!(
        p3_after >= p3_before + 9.0,
        "P3 counter continued: {p3_before} before kill, {p3_after} after adoption"
    );
    let xdp_after = xdp_prog(&lab.edge, EDGE_EXT);
    assert!(
        xdp_after.is_some() && xdp_after != xdp_before,
        "the new program replaced the old in place: {xdp_before:?} -> {xdp_after:?}"
    );
    assert!(connect(443, 3000).answered);
    assert!(!connect(22, 300).connected);

    // `stop` detaches: 22 reaches its listener again.
    let (ok, out, err) = cli(&["stop", "--instance", &instance]);
    assert!(ok, "stop: {out}{err}");
    assert!(out.contains("detached from ext0, int0"), "{out}");
    assert_eq!(xdp_prog(&lab.edge, EDGE_EXT), None, "XDP detached by stop");
    assert!(connect(22, 3000).connected, "22 reachable once stopped");
    assert!(!std::path::Path::new(&format!("/sys/fs/bpf/edge-classifier/{instance}")).exists());
    drop(daemon);
    drop(listeners);
    drop(lab);
}
