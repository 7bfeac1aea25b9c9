//! End to end in network namespaces: the classifier attached (native XDP) to the edge host's
//! veths, real TCP connections and UDP datagrams from the remote and front-end hosts, IPv4 and
//! IPv6. What is allowed arrives; what is not never reaches a listener; the per-rule counters
//! equal the frames an AF_PACKET tap saw pass.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use edge_classifier::{
    catalogue::Catalogue,
    compile::compile,
    loader::{AttachMode, Classifier},
};
use edge_classifier_lab::*;
use etherparse::{SlicedPacket, TransportSlice};

const ALLOWED_TIMEOUT: Duration = Duration::from_secs(3);
const DENIED_TIMEOUT: Duration = Duration::from_millis(300);

/// Frames the tap saw, by (transport, destination port).
fn count_frames(frames: &[Vec<u8>], udp: bool, dport: u16) -> u64 {
    frames
        .iter()
        .filter(|f| match SlicedPacket::from_ethernet(f) {
            Ok(p) => match p.transport {
                Some(TransportSlice::Tcp(t)) => !udp && t.destination_port() == dport,
                Some(TransportSlice::Udp(u)) => udp && u.destination_port() == dport,
                _ => false,
            },
            Err(_) => false,
        })
        .count() as u64
}

#[test]
fn seed_rows_over_veth_ipv4_and_ipv6() {
    let lab = Lab::create("e2e").expect("lab");
    let denied_tcp = [22u16, 80, 3389, 5060, 5062];
    let mut tcp_ports = vec![443, 5061, 5269, 23456];
    tcp_ports.extend(denied_tcp);
    let listeners =
        Listeners::start(&lab.edge, &tcp_ports, &[3478, 5061, 3479]).expect("listeners");

    let classifier = in_netns(&lab.edge, || {
        let compiled = compile(&Catalogue::default_catalogue())?;
        let mut c = Classifier::load(compiled)?;
        let m = c.attach(EDGE_EXT, "external", AttachMode::Native)?;
        assert_eq!(m.to_string(), "native");
        c.attach(EDGE_INT, "internal", AttachMode::Native)?;
        Ok(c)
    })
    .expect("load and attach in the edge namespace");
    let tap_ext = Tap::open(&lab.edge, EDGE_EXT).expect("tap ext0");
    let tap_int = Tap::open(&lab.edge, EDGE_INT).expect("tap int0");

    let mut expected_conns: Vec<(u16, IpAddr)> = Vec::new();
    for (client, partner, ext, int, fe) in [
        (CLIENT_V4, PARTNER_V4, EDGE_EXT_V4, EDGE_INT_V4, FE_V4),
        (CLIENT_V6, PARTNER_V6, EDGE_EXT_V6, EDGE_INT_V6, FE_V6),
    ] {
        for round in 0..3 {
            for (src, port) in [(partner, 5061), (client, 443), (client, 5269)] {
                let ok = tcp_connect(
                    &lab.remote,
                    src,
                    SocketAddr::new(ext, port),
                    ALLOWED_TIMEOUT,
                )
                .expect("connect");
                assert!(
                    ok,
                    "round {round}: TCP {src} -> [{ext}]:{port} must connect"
                );
                expected_conns.push((port, src));
            }
            let ok = tcp_connect(&lab.fe, fe, SocketAddr::new(int, 23456), ALLOWED_TIMEOUT)
                .expect("connect");
            assert!(
                ok,
                "TCP {fe} -> [{int}]:23456 on the internal NIC must connect"
            );
            expected_conns.push((23456, fe));
            let answered = udp_send(
                &lab.remote,
                SocketAddr::new(client, 41000 + round),
                SocketAddr::new(ext, 3478),
                ALLOWED_TIMEOUT,
            )
            .expect("udp");
            assert!(
                answered,
                "UDP {client} -> [{ext}]:3478 must arrive and be answered"
            );
        }
        for port in denied_tcp {
            let ok = tcp_connect(
                &lab.remote,
                client,
                SocketAddr::new(ext, port),
                DENIED_TIMEOUT,
            )
            .expect("connect");
            assert!(!ok, "TCP {client} -> [{ext}]:{port} must be dropped");
        }
        assert!(
            !tcp_connect(
                &lab.remote,
                client,
                SocketAddr::new(ext, 5061),
                DENIED_TIMEOUT
            )
            .unwrap(),
            "5061 from a host that is not a public IM partner must be dropped"
        );
        assert!(
            !tcp_connect(
                &lab.remote,
                client,
                SocketAddr::new(ext, 23456),
                DENIED_TIMEOUT
            )
            .unwrap(),
            "23456 on the external NIC must be dropped"
        );
        for port in [5061u16, 3479] {
            let answered = udp_send(
                &lab.remote,
                SocketAddr::new(client, 42000),
                SocketAddr::new(ext, port),
                DENIED_TIMEOUT,
            )
            .unwrap();
            assert!(!answered, "UDP {client} -> [{ext}]:{port} must be dropped");
        }
    }

    // Listeners: exactly the allowed connections, from the expected peers; nothing else.
    std::thread::sleep(Duration::from_millis(300));
    for port in [443u16, 5061, 5269, 23456] {
        let mut want: Vec<IpAddr> = expected_conns
            .iter()
            .filter(|(p, _)| *p == port)
            .map(|(_, a)| *a)
            .collect();
        let mut got: Vec<IpAddr> = listeners
            .tcp(port)
            .connections
            .iter()
            .map(|a| a.ip())
            .collect();
        want.sort();
        got.sort();
        assert_eq!(got, want, "tcp/{port}: connections seen by the listener");
    }
    for port in denied_tcp {
        assert!(
            listeners.tcp(port).connections.is_empty(),
            "tcp/{port} must see nothing"
        );
    }
    assert_eq!(listeners.udp(3478).datagrams.len(), 6, "udp/3478 datagrams");
    assert!(
        listeners.udp(5061).datagrams.is_empty(),
        "udp/5061 must see nothing"
    );
    assert!(
        listeners.udp(3479).datagrams.is_empty(),
        "udp/3479 must see nothing"
    );

    // Counters: each rule counted exactly the frames that XDP passed to the stack for it.
    let frames_ext = tap_ext.drain(Duration::from_millis(300));
    let frames_int = tap_int.drain(Duration::from_millis(300));
    let by_id = |iface: &str, id: &str| -> u64 {
        let b = classifier
            .bindings()
            .iter()
            .find(|b| b.name == iface)
            .expect("bound");
        let s = classifier.iface_stats(b).expect("stats");
        let ix = classifier
            .compiled()
            .rules
            .iter()
            .position(|r| r.id == id)
            .expect("rule");
        s.rules[ix].packets
    };
    for (id, udp, port, frames) in [
        ("public-im-sip-in", false, 5061, &frames_ext),
        ("client-sip-tls-in", false, 443, &frames_ext),
        ("xmpp-federation-in", false, 5269, &frames_ext),
        ("messenger-stun-in", true, 3478, &frames_ext),
    ] {
        let seen = count_frames(frames, udp, port);
        assert_eq!(
            by_id(EDGE_EXT, id),
            seen,
            "rule {id}: counter vs frames the tap saw pass"
        );
        assert!(
            seen >= if udp { 6 } else { 18 },
            "rule {id}: only {seen} frames"
        );
    }
    let seen = count_frames(&frames_int, false, 23456);
    assert_eq!(
        by_id(EDGE_INT, "xmpp-gateway-internal-in"),
        seen,
        "X3 counter vs tap"
    );
    for port in denied_tcp {
        assert_eq!(
            count_frames(&frames_ext, false, port),
            0,
            "tcp/{port} frames passed XDP"
        );
    }
    assert_eq!(
        count_frames(&frames_ext, true, 5061),
        0,
        "udp/5061 frames passed XDP"
    );
    let ext = classifier
        .bindings()
        .iter()
        .find(|b| b.name == EDGE_EXT)
        .unwrap();
    let stats = classifier.iface_stats(ext).unwrap();
    let no_rule = stats.reasons[edge_classifier_common::reason::DROP_NO_RULE as usize].packets;
    // Each denied TCP probe sends at least one SYN, each UDP probe one datagram.
    assert!(
        no_rule >= 2 * (denied_tcp.len() as u64 + 2 + 2),
        "no_rule drops: {no_rule}"
    );
    drop(classifier);
    drop(lab);
}
