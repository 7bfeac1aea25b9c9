//! Outbound rows end to end in network namespaces: the classifier attached to the edge host's
//! veth (XDP ingress + TC egress), real TCP connections and UDP exchanges opened by the edge,
//! IPv4 and IPv6. Replies to flows the edge opened pass; unsolicited frames claiming to be
//! replies never reach a socket and count as `not_established`; an idle flow stops passing.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    sync::mpsc,
    time::Duration,
};

use edge_classifier::{
    compile::compile,
    loader::{AttachMode, Classifier},
};
use edge_classifier_common::reason;
use edge_classifier_lab::*;
use edge_classifier_tests::edited_default_catalogue;

const ALLOWED: Duration = Duration::from_secs(3);
const DENIED: Duration = Duration::from_millis(300);
const QUIET: Duration = Duration::from_millis(300);
/// The catalogue's UDP idle time in this test.
const UDP_IDLE: Duration = Duration::from_secs(2);

struct Counters<'a> {
    c: &'a Classifier,
}

impl Counters<'_> {
    fn ext(&self) -> edge_classifier::maps::IfaceStats {
        let b = self
            .c
            .bindings()
            .iter()
            .find(|b| b.name == EDGE_EXT)
            .expect("ext0 bound");
        self.c.iface_stats(b).expect("stats")
    }
    fn reason(&self, r: u32) -> u64 {
        self.ext().reasons[r as usize].packets
    }
    fn rule(&self, id: &str) -> u64 {
        let ix = self
            .c
            .compiled()
            .rules
            .iter()
            .position(|r| r.id == id)
            .expect("rule id");
        self.ext().rules[ix].packets
    }
}

/// The remote side of the idle test: answers the first datagram at once, again within the idle
/// time, and a third time after the flow has idled out.
fn delayed_answers(
    ns: String,
    bind: SocketAddr,
    ready: mpsc::Sender<()>,
) -> std::thread::JoinHandle<anyhow::Result<()>> {
    std::thread::spawn(move || {
        in_netns(&ns, move || {
            let sock = UdpSocket::bind(bind)?;
            sock.set_read_timeout(Some(ALLOWED))?;
            ready.send(()).ok();
            let mut buf = [0u8; 16];
            let (_, peer) = sock.recv_from(&mut buf)?;
            sock.send_to(b"1", peer)?;
            std::thread::sleep(UDP_IDLE / 2);
            sock.send_to(b"2", peer)?;
            std::thread::sleep(UDP_IDLE * 2);
            sock.send_to(b"3", peer)?;
            Ok(())
        })
    })
}

#[test]
fn outbound_rows_pass_only_replies_to_flows_the_edge_opened() {
    let lab = Lab::create("flows").expect("lab");
    let catalogue = edited_default_catalogue(&[("udp_idle = 180", "udp_idle = 2")]);
    let classifier = in_netns(&lab.edge, move || {
        let mut c = Classifier::load(compile(&catalogue)?)?;
        c.attach(EDGE_EXT, "external", AttachMode::Native)?;
        c.attach(EDGE_INT, "internal", AttachMode::Native)?;
        Ok(c)
    })
    .expect("load and attach in the edge namespace");
    let counters = Counters { c: &classifier };
    // Sockets on the edge that unsolicited frames would reach if they passed: ephemeral-range
    // ports, and one in the A/V Edge's media range.
    let edge_listeners =
        Listeners::start(&lab.edge, &[40000, 50020], &[40001]).expect("edge listeners");
    let tap_ext = Tap::open(&lab.edge, EDGE_EXT).expect("tap ext0");
    let tap_wan = Tap::open(&lab.remote, "wan0").expect("tap wan0");

    let families = [
        (CLIENT_V4, PARTNER_V4, EDGE_EXT_V4),
        (CLIENT_V6, PARTNER_V6, EDGE_EXT_V6),
    ];

    // 1. Unsolicited "replies" from the remote host, before the edge opened anything.
    let not_established = counters.reason(reason::DROP_NOT_ESTABLISHED);
    let no_rule = counters.reason(reason::DROP_NO_RULE);
    for (client, partner, ext) in families {
        for (src, sport, dport) in [
            (partner, 5061u16, 40000u16),
            (client, 5061, 40000),
            (client, 5269, 40000),
            // P4's range is the edge's own: any remote port to it is a claimed reply.
            (client, 33000, 50020),
        ] {
            let x = tcp_exchange(
                &lab.remote,
                SocketAddr::new(src, sport),
                SocketAddr::new(ext, dport),
                DENIED,
            )
            .expect("tcp probe");
            assert!(
                !x.connected,
                "unsolicited TCP [{src}]:{sport} -> [{ext}]:{dport} must be dropped"
            );
        }
        let answered = udp_send(
            &lab.remote,
            SocketAddr::new(client, 3478),
            SocketAddr::new(ext, 40001),
            DENIED,
        )
        .expect("udp probe");
        assert!(
            !answered,
            "unsolicited UDP from 3478 to [{ext}]:40001 must be dropped"
        );
        // From inside 50000-59999 to an ephemeral port: the catalogue reads P4's range as the
        // edge's, so this claims nothing and no rule allows it.
        let x = tcp_exchange(
            &lab.remote,
            SocketAddr::new(client, 55000),
            SocketAddr::new(ext, 40000),
            DENIED,
        )
        .expect("tcp probe");
        assert!(!x.connected, "TCP from port 55000 to an ephemeral port");
    }
    std::thread::sleep(QUIET);
    let (_, sent) = tap_wan.drain_split(QUIET);
    let claimed = |t: &Tuple| {
        let (s, d) = (t.src.port(), t.dst.port());
        [5061, 5269, 3478].contains(&s) || (50000..=59999).contains(&d)
    };
    let claimed_sent = count(&sent, claimed);
    let other_sent = count(&sent, |t| t.src.port() == 55000);
    assert!(claimed_sent >= 10, "probes sent: {claimed_sent}");
    assert_eq!(
        counters.reason(reason::DROP_NOT_ESTABLISHED) - not_established,
        claimed_sent,
        "not_established drops vs claimed replies the remote sent"
    );
    assert_eq!(
        counters.reason(reason::DROP_NO_RULE) - no_rule,
        other_sent,
        "no_rule drops vs frames from 55000"
    );
    let (received, _) = tap_ext.drain_split(QUIET);
    assert_eq!(
        count(&received, |t| t.src.port() == 5061
            || t.src.port() == 5269
            || t.src.port() == 3478
            || t.dst.port() == 50020
            || t.src.port() == 55000),
        0,
        "no unsolicited frame may pass XDP"
    );
    for port in [40000u16, 50020] {
        assert!(
            edge_listeners.tcp(port).connections.is_empty(),
            "edge tcp/{port} reached"
        );
    }
    assert!(
        edge_listeners.udp(40001).datagrams.is_empty(),
        "edge udp/40001 reached"
    );

    // 2. An idle UDP flow stops passing: replies within the idle time pass, one after it drops.
    for (client, _, ext) in families {
        let (ready_tx, ready_rx) = mpsc::channel();
        let remote = delayed_answers(lab.remote.clone(), SocketAddr::new(client, 3478), ready_tx);
        ready_rx.recv().expect("remote socket ready");
        let before = counters.reason(reason::DROP_NOT_ESTABLISHED);
        let got: Vec<String> = in_netns(&lab.edge, move || {
            let sock = UdpSocket::bind(SocketAddr::new(ext, 42500))?;
            sock.send_to(b"stun", SocketAddr::new(client, 3478))?;
            let mut got = Vec::new();
            sock.set_read_timeout(Some(UDP_IDLE * 3))?;
            let mut buf = [0u8; 16];
            while let Ok((n, _)) = sock.recv_from(&mut buf) {
                got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
            Ok(got)
        })
        .expect("edge udp");
        remote.join().expect("remote thread").expect("remote udp");
        assert_eq!(
            got,
            ["1", "2"],
            "[{client}]:3478 answers: the one after {UDP_IDLE:?} idle must be dropped"
        );
        assert_eq!(
            counters.reason(reason::DROP_NOT_ESTABLISHED) - before,
            1,
            "the late answer counts as not_established"
        );
    }
    let expired = classifier.maps().flow_stats().expect("flow stats").expired;
    assert!(expired >= 2, "expired flows: {expired}");

    // 3. Flows the edge opens, both ways: TCP to 5061 (partner: P2, anyone else: S1) and 5269
    // (X2), UDP to 3478 (P5), TCP from the media range 50000-59999 (P4).
    let remote_listeners =
        Listeners::start(&lab.remote, &[5061, 5269, 7000], &[3478]).expect("remote listeners");
    let rules_before: Vec<(&str, u64)> = [
        "public-im-sip-out",
        "sip-federation-out",
        "xmpp-federation-out",
        "messenger-stun-out",
        "messenger-rtp-tcp-out",
    ]
    .iter()
    .map(|id| (*id, counters.rule(id)))
    .collect();
    let _ = tap_ext.drain_split(QUIET);
    for (client, partner, ext) in families {
        for round in 0..2u16 {
            for (dst, port, what) in [
                (partner, 5061u16, "P2"),
                (client, 5061, "S1"),
                (client, 5269, "X2"),
            ] {
                let x = tcp_exchange(
                    &lab.edge,
                    SocketAddr::new(ext, 0),
                    SocketAddr::new(dst, port),
                    ALLOWED,
                )
                .expect("tcp");
                assert!(
                    x.connected && x.answered,
                    "{what} round {round}: edge -> [{dst}]:{port}: {x:?}"
                );
            }
            let x = tcp_exchange(
                &lab.edge,
                SocketAddr::new(ext, 50010 + round),
                SocketAddr::new(client, 7000),
                ALLOWED,
            )
            .expect("tcp");
            assert!(
                x.connected && x.answered,
                "P4 round {round}: edge [{ext}]:{} -> [{client}]:7000: {x:?}",
                50010 + round
            );
            let answered = udp_send(
                &lab.edge,
                SocketAddr::new(ext, 0),
                SocketAddr::new(client, 3478),
                ALLOWED,
            )
            .expect("udp");
            assert!(
                answered,
                "P5 round {round}: edge -> [{client}]:3478 answered"
            );
        }
    }
    std::thread::sleep(QUIET);
    for port in [5061u16, 5269, 7000] {
        let peers: Vec<IpAddr> = remote_listeners
            .tcp(port)
            .connections
            .iter()
            .map(|a| a.ip())
            .collect();
        assert_eq!(peers.len(), if port == 5061 { 8 } else { 4 }, "tcp/{port}");
        assert!(
            peers.iter().all(|a| *a == EDGE_EXT_V4 || *a == EDGE_EXT_V6),
            "tcp/{port} peers {peers:?}"
        );
    }
    assert_eq!(remote_listeners.udp(3478).datagrams.len(), 4, "udp/3478");

    // Each outbound rule counted exactly the frames of its flows: sent (after TC egress) and
    // received (passed by XDP) on ext0.
    let (received, sent) = tap_ext.drain_split(QUIET);
    let is_partner = |a: IpAddr| a == PARTNER_V4 || a == PARTNER_V6;
    let frames_of = |id: &str| -> u64 {
        let flow = |remote: SocketAddr, local: SocketAddr, udp: bool| -> bool {
            match id {
                "public-im-sip-out" => !udp && remote.port() == 5061 && is_partner(remote.ip()),
                "sip-federation-out" => !udp && remote.port() == 5061 && !is_partner(remote.ip()),
                "xmpp-federation-out" => !udp && remote.port() == 5269,
                "messenger-stun-out" => udp && remote.port() == 3478,
                "messenger-rtp-tcp-out" => {
                    !udp && remote.port() == 7000 && (50000..=59999).contains(&local.port())
                }
                _ => unreachable!(),
            }
        };
        count(&sent, |t| flow(t.dst, t.src, t.udp))
            + count(&received, |t| flow(t.src, t.dst, t.udp))
    };
    for (id, before) in rules_before {
        let counted = counters.rule(id) - before;
        let seen = frames_of(id);
        assert_eq!(
            counted, seen,
            "rule {id}: counter vs frames on ext0 both ways"
        );
        assert!(seen >= 4, "rule {id}: only {seen} frames");
    }
    let flows = classifier.maps().flows().expect("flows");
    assert!(
        flows.iter().any(|f| f.remote().port() == 5269),
        "X2 flows recorded: {flows:?}"
    );

    // 4. What the Edge opens outside the matrix (`egress = "track"`, the default): its DNS
    // query over UDP and a CRL fetch over TCP 80 are answered; a datagram from port 53 that
    // answers no query of the Edge never reaches its socket.
    let services = Listeners::start(&lab.remote, &[80], &[53]).expect("remote DNS/HTTP");
    let tracked_before = counters.reason(reason::PASS_TRACKED_REPLY);
    let egress_tracked = counters.reason(reason::PASS_EGRESS_TRACKED);
    let no_rule = counters.reason(reason::DROP_NO_RULE);
    let _ = tap_ext.drain_split(QUIET);
    for (client, _, ext) in families {
        let answered = udp_send(
            &lab.edge,
            SocketAddr::new(ext, 0),
            SocketAddr::new(client, 53),
            ALLOWED,
        )
        .expect("udp");
        assert!(answered, "DNS query edge -> [{client}]:53 answered");
        let x = tcp_exchange(
            &lab.edge,
            SocketAddr::new(ext, 0),
            SocketAddr::new(client, 80),
            ALLOWED,
        )
        .expect("tcp");
        assert!(x.connected && x.answered, "edge -> [{client}]:80: {x:?}");
    }
    // The listeners hold port 53; the forged answers are sent from it once they are gone.
    drop(services);
    for (client, _, ext) in families {
        let answered = udp_send(
            &lab.remote,
            SocketAddr::new(client, 53),
            SocketAddr::new(ext, 40001),
            DENIED,
        )
        .expect("udp probe");
        assert!(!answered, "unsolicited UDP from port 53 to [{ext}]:40001");
    }
    std::thread::sleep(QUIET);
    assert!(
        edge_listeners.udp(40001).datagrams.is_empty(),
        "an unsolicited datagram from port 53 reached edge udp/40001"
    );
    let (received, sent) = tap_ext.drain_split(QUIET);
    let from_services = count(&received, |t| [53, 80].contains(&t.src.port()));
    let to_services = count(&sent, |t| [53, 80].contains(&t.dst.port()));
    assert!(from_services >= 6, "replies received: {from_services}");
    assert_eq!(
        counters.reason(reason::PASS_TRACKED_REPLY) - tracked_before,
        from_services,
        "tracked_reply vs frames from 53/80 that XDP passed"
    );
    assert_eq!(
        counters.reason(reason::PASS_EGRESS_TRACKED) - egress_tracked,
        to_services,
        "egress_tracked vs frames sent to 53/80"
    );
    assert_eq!(
        counters.reason(reason::DROP_NO_RULE) - no_rule,
        2,
        "the two unsolicited datagrams drop as no_rule"
    );
    drop(remote_listeners);
    drop(edge_listeners);
    drop(classifier);
    drop(lab);
}
