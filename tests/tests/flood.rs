//! Issue 20: federation holds up under a flood. The real daemon (`edge-classifier run`) on the
//! peer lab's Edge with the seed catalogue plus limits on new flows: P3 (TCP 443 from anyone)
//! and P6 (UDP 3478 from anyone) limited per source and in total, and an open federation rule
//! for TCP 5061 from anyone (after P1, the partners' rule) limited the same way with the
//! partners exempt. Real servers answer on the Edge: Kamailio (TLS 5061 with mutual TLS, 443)
//! and coturn (STUN on 3478).
//!
//! P3 and P6 are limited per /24 and the open 5061 rule per /32 and in total; over its limit
//! the open 5061 rule's SYN proxy answers the SYNs from XDP (`syn_proxy`, with
//! `tcp_syncookies = 2` on the Edge) instead of dropping them.
//!
//! trafgen on the Internet router sends SYNs to 5061 and 443 and STUN binding requests to 3478
//! from 65,536 spoofed sources (100.64.0.0/16, random) as fast as the veth takes them, bounded
//! in frames and seconds, while the partner makes real exchanges with the Edge's Kamailio
//! (`openssl s_client` with the partner's certificate: TCP and TLS handshake, an OPTIONS, its
//! 200) and a client on the Internet asks coturn for its reflexive address. Every exchange must
//! succeed, with and without the flood; their p50/p99 latency is printed for both; the flood's
//! frames are counted as `rate_limited` on P3 and P6 and answered as `syn_cookie` on the open
//! 5061 rule; `/metrics` answers throughout.
//!
//! Run alone: `cargo test -p edge-classifier-tests --test flood -- --nocapture`.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::IpAddr,
    path::PathBuf,
    process::Stdio,
    sync::mpsc,
    time::{Duration, Instant},
};

use edge_classifier_lab::{
    mac,
    peers::{self, Cert, EXT, EdgeInstance, PeerLab},
};

const EDGE: IpAddr = IpAddr::V4(peers::EDGE_EXT);
const PARTNER: IpAddr = IpAddr::V4(peers::PARTNER);

/// The flood's bounds: whichever comes first.
const FLOOD_FRAMES: u64 = 6_000_000;
const FLOOD_SECONDS: u64 = 30;
/// Exchanges of each kind measured without the flood.
const QUIET_EXCHANGES: usize = 20;

/// The seed catalogue on the lab's addresses, with the limits this test is about.
fn catalogue(lab: &PeerLab) -> PathBuf {
    let mut text = PeerLab::catalogue_text();
    for (id, limit) in [
        // Per /24: a client's own prefix keeps its budget whatever the flood's do. No total: it
        // would be the flood's to spend, and these rules have no partners to exempt.
        (
            "client-sip-tls-in",
            r#"{ per_source = "5/s", burst = 10, prefix_v4 = 24 }"#,
        ),
        (
            "messenger-stun-in",
            r#"{ per_source = "5/s", burst = 10, prefix_v4 = 24 }"#,
        ),
    ] {
        let from = format!("id = \"{id}\"");
        assert!(text.contains(&from), "the seed catalogue has rule {id}");
        text = text.replacen(&from, &format!("{from}\nlimit = {limit}"), 1);
    }
    text.push_str(
        r#"
[[rule]]
id = "sip-federation-open-in"
protocol = "SIP/MTLS"
transport = "tcp"
direction = "inbound"
local = "access_edge"
remote = "any"
port = 5061
interface = "external"
overlaps = ["public-im-sip-in"]
limit = { per_source = "2/s", burst = 4, total = "50/s", total_burst = 100, exempt = ["public_im_partners"], syn_proxy = true }
note = "Open federation: anyone may connect to TCP 5061, within the limit (over it, the SYN proxy answers); partners are exempt."
"#,
    );
    let path = lab.dir.join("flood.toml");
    std::fs::write(&path, text).expect("write the catalogue");
    path
}

/// An OPTIONS to the Edge's own domain, which its Kamailio answers itself.
fn options(n: usize) -> String {
    format!(
        "OPTIONS sip:edge.example SIP/2.0\n\
         Via: SIP/2.0/TLS {PARTNER}:5061;branch=z9hG4bK-flood-{n}\n\
         From: <sip:alice@partner.example>;tag=flood{n}\n\
         To: <sip:edge.example>\n\
         Call-ID: flood-{n}@partner.example\n\
         CSeq: 1 OPTIONS\n\
         Max-Forwards: 70\n\
         Content-Length: 0\n\n"
    )
}

/// One partner exchange: `openssl s_client` from the partner with its certificate (mutual
/// TLS), an OPTIONS, and the Edge's 200. The time from the connect to the 200.
fn partner_exchange(lab: &PeerLab, cert: &Cert, n: usize) -> Result<Duration, String> {
    let started = Instant::now();
    let mut child = lab
        .command(&lab.partner, "openssl")
        .args(["s_client", "-connect", &format!("{EDGE}:5061"), "-cert"])
        .arg(&cert.cert)
        .arg("-key")
        .arg(&cert.key)
        .arg("-CAfile")
        .arg(&lab.ca)
        // LF to CRLF on the way out; no session details; stay up after stdin's end.
        .args(["-verify_return_error", "-crlf", "-quiet"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("openssl: {e}"))?;
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let sent = child
        .stdin
        .as_mut()
        .expect("piped")
        .write_all(options(n).as_bytes());
    let deadline = started + Duration::from_secs(10);
    let mut got = Vec::new();
    let result = loop {
        if let Err(e) = &sent {
            break Err(format!("writing the request: {e}"));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.starts_with("SIP/2.0 200") => break Ok(started.elapsed()),
            Ok(line) => got.push(line),
            Err(_) => break Err(format!("no 200 within 10 s; got {got:?}")),
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// A STUN binding request from a client on the Internet to the Edge's coturn: its time.
fn stun_exchange(lab: &PeerLab) -> Result<Duration, String> {
    let started = Instant::now();
    lab.stun(&lab.stranger, EDGE).map(|_| started.elapsed())
}

/// A round of exchanges takes at least half a second: the STUN client (each request a new UDP
/// flow from its own /24) keeps within its 5 new flows a second.
fn pace(round: Instant) {
    if let Some(left) = Duration::from_millis(500).checked_sub(round.elapsed()) {
        std::thread::sleep(left);
    }
}

/// p50 and p99 of `times`, in milliseconds.
fn percentiles(times: &[Duration]) -> (f64, f64) {
    let mut ms: Vec<f64> = times.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    ms.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    let at = |p: f64| ms[((ms.len() as f64 * p) as usize).min(ms.len() - 1)];
    (at(0.5), at(0.99))
}

/// The trafgen configuration: a SYN to 5061, a SYN to 443 and a STUN binding request to 3478,
/// each from a random source in 100.64.0.0/16 and a random port, checksums computed per frame.
fn trafgen_conf(src_mac: [u8; 6], dst_mac: [u8; 6]) -> String {
    let mac = |m: [u8; 6]| {
        m.iter()
            .map(|b| format!("0x{b:02x}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (src, dst) = (mac(src_mac), mac(dst_mac));
    let ip = |proto: u8, len: u16| {
        format!(
            "0x45, 0x00, const16({len}), drnd(2), 0x40, 0x00, 64, {proto}, csumip(14, 33), \
             100, 64, drnd(2), 198, 51, 100, 10"
        )
    };
    let syn = |port: u16| {
        format!(
            "{{ {dst}, {src}, 0x08, 0x00, {}, drnd(2), const16({port}), drnd(4), const32(0), \
             0x50, 0x02, const16(64240), csumtcp(14, 34), const16(0) }}\n",
            ip(6, 40)
        )
    };
    // STUN binding request: type 0x0001, length 0, the magic cookie, a random transaction id.
    let stun = format!(
        "{{ {dst}, {src}, 0x08, 0x00, {}, drnd(2), const16(3478), const16(28), csumudp(14, 34), \
         const16(1), const16(0), const32(0x2112a442), drnd(12) }}\n",
        ip(17, 48)
    );
    syn(5061) + &syn(443) + &stun
}

fn metric(text: &str, line_start: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(line_start))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn partners_and_stun_clients_get_through_a_flood_that_the_limits_hold_back() {
    let lab = PeerLab::create("flood").expect("peer lab");
    let cat = catalogue(&lab);
    // The open 5061 rule's SYN proxy needs cookies from the listener for every SYN it sees.
    let ok = std::process::Command::new("nsenter")
        .arg(format!("--net={}", PeerLab::netns_path(&lab.edge)))
        .args(["sysctl", "-qw", "net.ipv4.tcp_syncookies=2"])
        .status()
        .expect("sysctl")
        .success();
    assert!(ok, "tcp_syncookies = 2 on the Edge");
    // A veth takes the proxy's SYN-ACKs (XDP_TX) only into a peer that runs NAPI (an XDP
    // program or GRO), as a NIC's driver always does: the router's side passes everything.
    let wan = lab.wan.clone();
    let _router_xdp = edge_classifier_lab::in_netns(&wan, || {
        let mut e = aya::Ebpf::load(edge_classifier::loader::FLOOR_OBJECT)?;
        let p: &mut aya::programs::Xdp = e.program_mut("xdp_pass").expect("xdp_pass").try_into()?;
        p.load()?;
        p.attach("to-edge", aya::programs::XdpMode::Driver)?;
        Ok(e)
    })
    .expect("xdp_pass on the router's to-edge");
    let edge = EdgeInstance::new(&lab, "flood");
    let mut daemon = edge.run(&cat, "daemon");
    let _kamailio = lab.kamailio(&lab.edge, "edge", EDGE);
    let _coturn = lab.turnserver(&lab.edge, "coturn-edge", EDGE);
    let cert = lab
        .cert("partner-client", &["sip.partner.example"], &[PARTNER])
        .expect("the partner's certificate");

    // Without the flood.
    let mut quiet_sip = Vec::new();
    let mut quiet_stun = Vec::new();
    for n in 0..QUIET_EXCHANGES {
        let round = Instant::now();
        quiet_sip.push(partner_exchange(&lab, &cert, n).unwrap_or_else(|e| panic!("quiet: {e}")));
        quiet_stun.push(
            stun_exchange(&lab)
                .unwrap_or_else(|e| panic!("quiet STUN: {e}\n{}", edge.cli(&["stats"]))),
        );
        pace(round);
    }

    // The flood, from the router's side of the Edge's link.
    let conf = lab.dir.join("flood.trafgen");
    let (wan_mac, ext_mac) = (
        mac(&lab.wan, "to-edge").expect("router MAC"),
        mac(&lab.edge, EXT).expect("ext0 MAC"),
    );
    std::fs::write(&conf, trafgen_conf(wan_mac, ext_mac)).expect("trafgen conf");
    let before = edge.metrics();
    let started = Instant::now();
    // Plain nsenter: trafgen needs nothing of the lab's mount namespace (its resolv.conf).
    let mut trafgen = std::process::Command::new("nsenter")
        .arg(format!("--net={}", PeerLab::netns_path(&lab.wan)))
        .args([
            "timeout",
            "-s",
            "INT",
            &FLOOD_SECONDS.to_string(),
            "trafgen",
        ])
        // A rate makes trafgen send frame by frame (sendto) as fast as the veth takes them: its
        // TX ring (no rate) gives up with EAGAIN when the veth pushes back. 2 Mpps is beyond
        // what one core sends here, so the veth is the limit.
        .args([
            "--dev",
            "to-edge",
            "--cpus",
            "1",
            "--rate",
            "2000000pps",
            "--conf",
        ])
        .arg(&conf)
        .args(["-n", &FLOOD_FRAMES.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("trafgen (apt-get install netsniff-ng)");
    let mut flood_sip = Vec::new();
    let mut flood_stun = Vec::new();
    let mut failures = Vec::new();
    let mut scrapes = Vec::new();
    let mut n = QUIET_EXCHANGES;
    while trafgen.try_wait().expect("trafgen").is_none() {
        let round = Instant::now();
        match partner_exchange(&lab, &cert, n) {
            Ok(t) => flood_sip.push(t),
            Err(e) => failures.push(format!("partner exchange {n}: {e}")),
        }
        match stun_exchange(&lab) {
            Ok(t) => flood_stun.push(t),
            Err(e) => failures.push(format!("STUN {n}: {e}")),
        }
        let t = Instant::now();
        let m = edge.metrics();
        pace(round);
        scrapes.push((
            t.elapsed(),
            m.contains("edge_classifier_rate_limited_packets_total"),
        ));
        n += 1;
    }
    let flood_seconds = started.elapsed().as_secs_f64();
    let out = trafgen.wait_with_output().expect("trafgen output");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let sent: u64 = stdout
        .lines()
        .find_map(|l| l.trim().strip_suffix(" packets outgoing"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "trafgen did not say how many frames it sent ({}):\n{stdout}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        });
    // Settle, then what the daemon counted.
    std::thread::sleep(Duration::from_millis(500));
    let after = edge.metrics();
    assert!(daemon.alive(), "the daemon died:\n{}", daemon.printed());

    let limited = |text: &str, rule: &str| {
        metric(
            text,
            &format!("edge_classifier_rate_limited_packets_total{{rule=\"{rule}\"}} "),
        )
        .unwrap_or(0.0)
    };
    let rules = [
        "sip-federation-open-in",
        "client-sip-tls-in",
        "messenger-stun-in",
    ];
    let by_rule: Vec<(&str, f64)> = rules
        .iter()
        .map(|r| (*r, limited(&after, r) - limited(&before, r)))
        .collect();
    let cookies = |text: &str| {
        metric(
            text,
            "edge_classifier_syn_cookies_sent_total{rule=\"sip-federation-open-in\"} ",
        )
        .unwrap_or(0.0)
    };
    let answered = cookies(&after) - cookies(&before);
    let dropped_limited = metric(
        &after,
        "edge_classifier_dropped_packets_total{reason=\"rate_limited\",interface=\"ext0\"} ",
    )
    .unwrap_or(0.0);
    let (qs50, qs99) = percentiles(&quiet_sip);
    let (qt50, qt99) = percentiles(&quiet_stun);
    eprintln!(
        "flood: {sent} frames in {flood_seconds:.1} s ({:.0} frames/s offered); rate_limited by rule {by_rule:?}, {dropped_limited} on ext0; SYNs to 5061 answered by the SYN proxy: {answered}",
        sent as f64 / flood_seconds
    );
    eprintln!(
        "without the flood: partner TLS+OPTIONS {QUIET_EXCHANGES} of {QUIET_EXCHANGES}, p50 {qs50:.1} ms p99 {qs99:.1} ms; STUN p50 {qt50:.1} ms p99 {qt99:.1} ms"
    );
    assert!(
        failures.is_empty(),
        "{} exchanges failed under the flood:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(
        flood_sip.len() >= 3,
        "only {} partner exchanges during the flood: it was too short to say anything",
        flood_sip.len()
    );
    let (fs50, fs99) = percentiles(&flood_sip);
    let (ft50, ft99) = percentiles(&flood_stun);
    let slowest_scrape = scrapes.iter().map(|(d, _)| *d).max().unwrap_or_default();
    eprintln!(
        "under the flood: partner TLS+OPTIONS {} of {}, p50 {fs50:.1} ms p99 {fs99:.1} ms; STUN {} of {}, p50 {ft50:.1} ms p99 {ft99:.1} ms; {} scrapes of /metrics, slowest {:.0} ms",
        flood_sip.len(),
        flood_sip.len(),
        flood_stun.len(),
        flood_stun.len(),
        scrapes.len(),
        slowest_scrape.as_secs_f64() * 1000.0
    );
    assert!(
        scrapes.iter().all(|(_, ok)| *ok),
        "/metrics did not answer with the limits during the flood"
    );
    assert!(
        slowest_scrape < Duration::from_secs(5),
        "a scrape took {slowest_scrape:?}"
    );
    for (rule, n) in &by_rule {
        // The open 5061 rule answers its SYNs over the limit (the SYN proxy) instead.
        let n = if *rule == "sip-federation-open-in" {
            answered
        } else {
            *n
        };
        assert!(n > 0.0, "no frame of the flood was limited by {rule}");
    }
    // What each rule admitted of the flood stays within its budget for the flood's time:
    // 256 /24s of the flood at 5/s and a burst of 10 for P3 and P6 (and a few frames of the
    // client's STUN), 50/s and a burst of 100 for the open 5061 rule (the partner's frames are
    // P1's).
    let admitted = |text: &str, rule: &str| -> f64 {
        let start = format!("edge_classifier_rule_packets_total{{rule=\"{rule}\"");
        text.lines()
            .filter(|l| l.starts_with(&start) && l.contains("interface=\"ext0\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let t = flood_seconds + 1.0;
    for (rule, budget) in [
        // And a SYN per 30 s the proxy lets through to the listener.
        (
            "sip-federation-open-in",
            50.0 * t + 100.0 + (t / 30.0).ceil(),
        ),
        ("client-sip-tls-in", 256.0 * (5.0 * t + 10.0)),
        ("messenger-stun-in", 256.0 * (5.0 * t + 10.0) + 1000.0),
    ] {
        let got = admitted(&after, rule) - admitted(&before, rule);
        eprintln!(
            "{rule}: admitted {got} new-flow frames of the flood's time (budget {budget:.0})"
        );
        assert!(
            got <= budget,
            "{rule} admitted {got}, over its budget {budget}"
        );
    }
}
