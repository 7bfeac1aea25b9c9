//! The SYN proxy (`limit.syn_proxy`) end to end: the classifier attached (native XDP) to the
//! Edge's ext0 in the namespace lab, P3 (TCP 443 from anyone) limited to one new flow per
//! source with `syn_proxy = true`, `net.ipv4.tcp_syncookies = 2` in the Edge's namespace, a
//! real listener on 443 that answers each line, real `connect()`s from the remote host.
//!
//! Over the budget, a SYN is answered from XDP (XDP_TX) with the kernel's cookie: the
//! handshake completes through the proxy and data flows, while the Edge's `TcpExt
//! SyncookiesSent` (the listener's own cookies: with `tcp_syncookies = 2`, one for every SYN it
//! sees) does not move for it; an ACK with a wrong cookie is dropped and counted; a connection
//! established before keeps passing while the proxy answers; one SYN over the budget in 30 s
//! goes through to the listener, which keeps it accepting the proxy's cookies past the two
//! minutes the kernel allows a listener that sent none itself
//! (`the_listener_keeps_accepting_past_two_minutes`, 2.5 minutes).
//!
//! The remote's wan0 carries an XDP program that passes everything: a veth takes frames sent
//! back with XDP_TX only into a peer that runs NAPI (an XDP program or GRO), as a NIC's driver
//! always does.
//!
//! Run: `cargo test -p edge-classifier-tests --test syn_proxy -- --test-threads=1 --nocapture`.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    sync::mpsc,
    time::{Duration, Instant},
};

use aya::{
    Ebpf,
    programs::{Xdp, XdpMode},
};
use edge_classifier::{
    compile::compile,
    loader::{AttachMode, Classifier, FLOOR_OBJECT},
};
use edge_classifier_common::{ProxyState, reason};
use edge_classifier_lab::*;
use edge_classifier_tests::{edited_default_catalogue, jiffies};

const P3: &str = "client-sip-tls-in";
const PORT: u16 = 443;

/// The lab with the proxy on P3, a line-answering listener on 443 and the remote's wan0 ready
/// for XDP_TX.
struct Proxied {
    lab: Lab,
    classifier: Classifier,
    _wan_pass: Ebpf,
    /// Peers the listener accepted.
    accepted: mpsc::Receiver<SocketAddr>,
}

impl Proxied {
    fn new(tag: &str) -> Proxied {
        let lab = Lab::create(tag).expect("lab");
        sysctl(&lab, 2);
        let cat = edited_default_catalogue(&[(
            "id = \"client-sip-tls-in\"",
            "id = \"client-sip-tls-in\"\nlimit = { per_source = \"1/h\", burst = 1, syn_proxy = true }",
        )]);
        let classifier = in_netns(&lab.edge, move || {
            let mut c = Classifier::load(compile(&cat)?)?;
            let m = c.attach(EDGE_EXT, "external", AttachMode::Native)?;
            assert_eq!(m.to_string(), "native");
            Ok(c)
        })
        .expect("load and attach in the edge namespace");
        let wan_pass = in_netns(&lab.remote, || {
            let mut e = Ebpf::load(FLOOR_OBJECT)?;
            let p: &mut Xdp = e.program_mut("xdp_pass").expect("xdp_pass").try_into()?;
            p.load()?;
            p.attach("wan0", XdpMode::Driver)?;
            Ok(e)
        })
        .expect("xdp_pass on wan0");
        let (tx, accepted) = mpsc::channel();
        let listeners = in_netns(&lab.edge, || {
            Ok([
                TcpListener::bind(SocketAddr::new(EDGE_EXT_V4, PORT))?,
                TcpListener::bind(SocketAddr::new(EDGE_EXT_V6, PORT))?,
            ])
        })
        .expect("listeners");
        for l in listeners {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for s in l.incoming() {
                    let Ok(s) = s else { return };
                    let _ = tx.send(s.peer_addr().unwrap());
                    std::thread::spawn(move || answer_lines(s));
                }
            });
        }
        Proxied {
            lab,
            classifier,
            _wan_pass: wan_pass,
            accepted,
        }
    }

    fn slot(&self) -> u32 {
        self.classifier
            .compiled()
            .rules
            .iter()
            .find(|r| r.id == P3)
            .expect("P3")
            .slot
    }

    /// (SYNs answered by the proxy for P3, frames counted as `syn_cookie`, `syn_cookie_ack`,
    /// `syn_cookie_invalid`, the Edge's SyncookiesSent).
    fn counts(&self) -> Counts {
        let b = &self.classifier.bindings()[0];
        let s = self.classifier.iface_stats(b).expect("stats");
        Counts {
            proxied: self.classifier.maps().syn_proxied(&[self.slot()]).unwrap()[0],
            tx: s.reasons[reason::TX_SYN_COOKIE as usize].packets,
            ack: s.reasons[reason::PASS_SYN_COOKIE_ACK as usize].packets,
            invalid: s.reasons[reason::DROP_SYN_COOKIE_INVALID as usize].packets,
            kernel_cookies: cookies_sent(&self.lab),
        }
    }

    /// A connection from the remote host, with one line answered over it.
    fn connect(&self, dst: IpAddr) -> Result<TcpStream, String> {
        let mut s = in_netns(&self.lab.remote, move || {
            Ok(TcpStream::connect_timeout(
                &SocketAddr::new(dst, PORT),
                Duration::from_secs(3),
            )?)
        })
        .map_err(|e| format!("connect to {dst}: {e:#}"))?;
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        exchange(&mut s, "hello")?;
        Ok(s)
    }

    fn accepted_peer(&self) -> Option<SocketAddr> {
        self.accepted.recv_timeout(Duration::from_secs(2)).ok()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Counts {
    proxied: u64,
    tx: u64,
    ack: u64,
    invalid: u64,
    kernel_cookies: u64,
}

fn answer_lines(s: TcpStream) {
    let mut w = s.try_clone().unwrap();
    for line in BufReader::new(s).lines() {
        let Ok(line) = line else { return };
        if w.write_all(format!("ok {line}\n").as_bytes()).is_err() {
            return;
        }
    }
}

/// One line out, its answer back.
fn exchange(s: &mut TcpStream, line: &str) -> Result<(), String> {
    s.write_all(format!("{line}\n").as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut got = String::new();
    BufReader::new(s.try_clone().unwrap())
        .read_line(&mut got)
        .map_err(|e| format!("read: {e}"))?;
    if got.trim_end() == format!("ok {line}") {
        Ok(())
    } else {
        Err(format!("answer {got:?} to {line:?}"))
    }
}

fn sysctl(lab: &Lab, value: u8) {
    let ok = std::process::Command::new("nsenter")
        .arg(format!("--net={}", Lab::netns_path(&lab.edge)))
        .args(["sysctl", "-qw", &format!("net.ipv4.tcp_syncookies={value}")])
        .status()
        .expect("sysctl")
        .success();
    assert!(ok, "sysctl net.ipv4.tcp_syncookies={value}");
}

/// TcpExt SyncookiesSent of the Edge's namespace: the cookies its listeners sent themselves.
fn cookies_sent(lab: &Lab) -> u64 {
    tcp_ext(&lab.edge, &["SyncookiesSent"])[0]
}

/// An ACK from the client to 443 of a handshake that never was, acknowledging `ack`.
fn forged_ack(lab: &Lab, sport: u16, ack: u32) -> Vec<u8> {
    let (wan, ext) = (
        mac(&lab.remote, "wan0").unwrap(),
        mac(&lab.edge, EDGE_EXT).unwrap(),
    );
    let mut out = Vec::new();
    etherparse::PacketBuilder::ethernet2(wan, ext)
        .ipv4(v4_of(CLIENT_V4).octets(), v4_of(EDGE_EXT_V4).octets(), 64)
        .tcp(sport, PORT, 123_456, 64240)
        .ack(ack)
        .write(&mut out, &[])
        .unwrap();
    out
}

#[test]
fn over_the_budget_the_proxy_answers_the_syn_and_the_listener_completes_the_handshake() {
    let p = Proxied::new("sp");
    let start = p.counts();
    assert_eq!(
        (start.proxied, start.tx),
        (0, 0),
        "nothing proxied before the first SYN"
    );

    // 1. Within the budget (one new flow per source): the listener's own handshake (a
    // cookie of its own, tcp_syncookies = 2).
    let mut first = p
        .connect(EDGE_EXT_V4)
        .expect("the first connection, within the budget");
    assert!(p.accepted_peer().is_some(), "the listener accepted it");
    let after_first = p.counts();
    assert_eq!(
        after_first.proxied, 0,
        "within the budget nothing is proxied"
    );
    assert!(
        after_first.kernel_cookies > start.kernel_cookies,
        "the listener answered the SYN itself: {start:?} -> {after_first:?}"
    );

    // 2. The first SYN over the budget goes through to the listener: it stamps it.
    let _second = p.connect(EDGE_EXT_V4).expect("the pass-through connection");
    assert!(p.accepted_peer().is_some());
    let stamped = p.counts();
    assert_eq!(stamped.proxied, 0, "the stamp SYN went to the listener");
    assert!(
        stamped.kernel_cookies > after_first.kernel_cookies,
        "the listener sent a cookie for the stamp SYN: {after_first:?} -> {stamped:?}"
    );

    // 3. Over the budget: the proxy answers from XDP, the ACK's cookie is valid, the listener
    // completes the handshake, data flows.
    // IPv6 has budgets of its own (per /64) and its own pass-through stamp: its first SYN is
    // within the budget, its second goes to the listener, its third is proxied.
    for (family, through_listener) in [(EDGE_EXT_V4, 0), (EDGE_EXT_V6, 2)] {
        for _ in 0..through_listener {
            let _s = p
                .connect(family)
                .expect("an IPv6 connection before the proxy's turn");
            assert!(p.accepted_peer().is_some());
        }
        let before = p.counts();
        let mut s = p
            .connect(family)
            .unwrap_or_else(|e| panic!("a connection through the proxy to {family}: {e}"));
        assert!(
            p.accepted_peer().is_some(),
            "the listener accepted the proxied connection"
        );
        for i in 0..20 {
            exchange(&mut s, &format!("line {i} through {family}")).expect("data both ways");
        }
        let after = p.counts();
        eprintln!("proxied connection to {family}: {before:?} -> {after:?}");
        assert_eq!(after.proxied, before.proxied + 1, "the SYN was proxied");
        assert_eq!(after.tx, before.tx + 1, "one SYN-ACK sent with XDP_TX");
        assert_eq!(
            after.ack,
            before.ack + 1,
            "its ACK's cookie was checked valid"
        );
        assert_eq!(
            after.kernel_cookies, before.kernel_cookies,
            "the proxied SYN never reached the listener (it sent no cookie for it)"
        );
    }

    // 4. A connection established before the proxy began keeps passing while it answers.
    let active = p.classifier.maps().syn_proxy_state(p.slot()).unwrap();
    assert!(active.active_until > 0, "the proxy is active: {active:?}");
    for i in 0..20 {
        exchange(&mut first, &format!("established {i}")).expect("the established connection");
    }

    // 5. An ACK with a wrong cookie is dropped and counted; the listener sees nothing.
    let before = p.counts();
    let raw = RawSender::open(&p.lab.remote, "wan0").expect("raw socket");
    for i in 0..5u16 {
        raw.send(&forged_ack(&p.lab, 47000 + i, 0xdead_beef))
            .unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    let after = p.counts();
    assert_eq!(
        after.invalid,
        before.invalid + 5,
        "forged ACKs counted as syn_cookie_invalid: {before:?} -> {after:?}"
    );
    assert_eq!(
        p.accepted_peer(),
        None,
        "no forged ACK reached the listener"
    );
}

#[test]
fn an_idle_proxy_costs_established_segments_no_socket_lookup_and_the_stamp_lets_a_syn_through() {
    let mut p = Proxied::new("spi");
    let _first = p.connect(EDGE_EXT_V4).expect("within the budget");
    let _stamp = p.connect(EDGE_EXT_V4).expect("the pass-through");
    let _proxied = p.connect(EDGE_EXT_V4).expect("proxied");
    let c = p.counts();
    assert_eq!(c.proxied, 1, "{c:?}");
    // The stamp 31 s old (jiffies moved back through the map): the next SYN over the budget
    // goes to the listener again (it sends a cookie of its own), the one after is proxied.
    let hz_ticks_31s = 31 * ticks_per_second();
    let st = p.classifier.maps().syn_proxy_state(p.slot()).unwrap();
    let slot = p.slot();
    p.classifier
        .maps_mut()
        .set_syn_proxy_state(
            slot,
            ProxyState {
                syn_passed_v4: st.syn_passed_v4 - hz_ticks_31s,
                ..st
            },
        )
        .unwrap();
    let before = p.counts();
    let _again = p.connect(EDGE_EXT_V4).expect("the next pass-through");
    let mid = p.counts();
    assert_eq!(
        mid.proxied, before.proxied,
        "after 30 s a SYN goes to the listener"
    );
    assert!(
        mid.kernel_cookies > before.kernel_cookies,
        "{before:?} -> {mid:?}"
    );
    let _next = p.connect(EDGE_EXT_V4).expect("proxied again");
    assert_eq!(p.counts().proxied, mid.proxied + 1);

    // Idle: once `active_until` has passed, an ACK of no connection is the rule's (no socket
    // lookup, no cookie check): a forged one reaches the stack, which answers it with a RST.
    p.classifier
        .maps_mut()
        .set_syn_proxy_state(
            slot,
            ProxyState {
                active_until: 0,
                ..st
            },
        )
        .unwrap();
    let before = p.counts();
    let raw = RawSender::open(&p.lab.remote, "wan0").expect("raw socket");
    raw.send(&forged_ack(&p.lab, 47100, 0xdead_beef)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let after = p.counts();
    assert_eq!(
        (after.invalid, after.ack),
        (before.invalid, before.ack),
        "an idle proxy checks no ACK"
    );
}

/// `bpf_jiffies64` ticks per second (CONFIG_HZ), from two readings of the kernel's jiffies.
fn ticks_per_second() -> u64 {
    let (j0, t0) = (jiffies(), Instant::now());
    std::thread::sleep(Duration::from_millis(500));
    let (j1, t1) = (jiffies(), Instant::now());
    let hz = (j1 - j0) as f64 / (t1 - t0).as_secs_f64();
    // CONFIG_HZ is one of 100, 250, 300, 1000.
    *[100u64, 250, 300, 1000]
        .iter()
        .min_by_key(|h| (**h as f64 - hz).abs() as u64)
        .unwrap()
}

#[test]
fn the_listener_keeps_accepting_past_two_minutes() {
    // A proxied connection every 5 s for 150 s: the kernel refuses a cookie's ACK from a
    // listener that sent no cookie itself in two minutes; the SYN let through every 30 s keeps
    // it stamped, so every one completes.
    let p = Proxied::new("spl");
    let _first = p.connect(EDGE_EXT_V4).expect("within the budget");
    let start = Instant::now();
    let mut passed = 0;
    let mut proxied = 0;
    while start.elapsed() < Duration::from_secs(150) {
        let before = p.counts();
        let s = p.connect(EDGE_EXT_V4);
        let after = p.counts();
        assert!(
            s.is_ok(),
            "at {:?}: {:?} ({before:?} -> {after:?})",
            start.elapsed(),
            s.err()
        );
        while p.accepted.try_recv().is_ok() {}
        if after.proxied > before.proxied {
            proxied += 1;
        } else {
            passed += 1;
        }
        std::thread::sleep(Duration::from_secs(5));
    }
    eprintln!("150 s: {proxied} connections proxied, {passed} let through to the listener");
    assert!(proxied >= 20, "most were proxied: {proxied}");
    assert!(
        (5..=7).contains(&passed),
        "one in 30 s went to the listener: {passed}"
    );
}
