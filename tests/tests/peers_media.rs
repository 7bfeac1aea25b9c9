//! Issue 17, the media rows with real programs through the classifier attached to the peer lab's
//! Edge (`edge_classifier_lab::peers`, seed profile on the lab's addresses):
//!
//! - P6: coturn (`turnserver`) on the Edge's `198.51.100.10:3478` answers a STUN binding request
//!   of `turnutils_stunclient` on the stranger; P5: a coturn on the stranger's 3478 answers
//!   `turnutils_stunclient` run on the Edge.
//! - P4: TCP from the Edge's media range 50000-59999 to a client on the Internet. coturn's own
//!   RFC 6062 client (`turnutils_uclient -T`) only relays between two allocations on the same
//!   server (`-T` implies `-y`, client-to-client), which never crosses the wire, so the closest
//!   real program is socat connecting from `198.51.100.10:50010` to a socat echo on the
//!   stranger.
//!
//! A forged STUN "answer" (source port 3478) from the stranger never reaches the Edge.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use edge_classifier_common::reason;
use edge_classifier_lab::{
    Listeners, Tap, Tuple, count,
    peers::{self, Counters, EXT, PeerLab},
    udp_send,
};

/// How long a tap is read after the last frame.
const QUIET: Duration = Duration::from_millis(300);

#[test]
fn stun_with_coturn_both_ways_and_tcp_media_from_the_edge_range() {
    let started = Instant::now();
    let lab = PeerLab::create("media").expect("peer lab");
    let edge_ip = IpAddr::V4(peers::EDGE_EXT);
    let stranger_ip = IpAddr::V4(peers::STRANGER);

    // A forged STUN answer from the stranger's 3478 to an open port of the Edge, first (the
    // stranger's coturn holds 3478 later).
    let classifier = lab.attach().expect("classifier attached");
    let c = Counters(&classifier);
    {
        let listeners = Listeners::start(&lab.edge, &[], &[40478]).expect("edge listener");
        let drops =
            || c.reason(EXT, reason::DROP_NO_RULE) + c.reason(EXT, reason::DROP_NOT_ESTABLISHED);
        let dropped = drops();
        let answered = udp_send(
            &lab.stranger,
            SocketAddr::new(stranger_ip, 3478),
            SocketAddr::new(edge_ip, 40478),
            Duration::from_millis(500),
        )
        .expect("forged datagram");
        assert!(!answered, "a forged 3478 datagram was answered");
        assert!(
            listeners.udp(40478).datagrams.is_empty(),
            "it reached the Edge"
        );
        assert!(drops() > dropped, "the forged datagram counts as a drop");
    }

    let edge_turn = lab.turnserver(&lab.edge, "coturn-edge", edge_ip);
    let stranger_turn = lab.turnserver(&lab.stranger, "coturn-stranger", stranger_ip);

    // P6: the stranger asks the Edge's coturn.
    let tap = Tap::open(&lab.edge, EXT).expect("tap").record();
    let p6 = c.rule(EXT, "messenger-stun-in");
    let got = lab
        .stun(&lab.stranger, edge_ip)
        .unwrap_or_else(|e| panic!("P6: {e}\n{}", edge_turn.printed()));
    assert!(got.contains(&format!("{stranger_ip}:")), "P6: {got}");
    let seen = tap.finish(QUIET).expect("tap");
    let to_3478 = |t: &Tuple| t.udp && t.dst == SocketAddr::new(edge_ip, 3478);
    let (received, sent) = (
        count(&seen.received, to_3478),
        count(&seen.sent, |t| {
            t.udp && t.src == SocketAddr::new(edge_ip, 3478)
        }),
    );
    assert!(
        received >= 1 && sent >= 1,
        "P6 on the tap: {received} in, {sent} out"
    );
    // An inbound rule counts what XDP passed.
    assert_eq!(
        c.rule(EXT, "messenger-stun-in") - p6,
        received,
        "P6 counter vs the requests on the tap"
    );

    // P5: the Edge asks the stranger's coturn.
    let tap = Tap::open(&lab.edge, EXT).expect("tap").record();
    let p5 = c.rule(EXT, "messenger-stun-out");
    let got = lab
        .stun(&lab.edge, stranger_ip)
        .unwrap_or_else(|e| panic!("P5: {e}\n{}", stranger_turn.printed()));
    assert!(got.contains(&format!("{edge_ip}:")), "P5: {got}");
    let seen = tap.finish(QUIET).expect("tap");
    let remote = SocketAddr::new(stranger_ip, 3478);
    let (received, sent) = (
        count(&seen.received, |t| t.udp && t.src == remote),
        count(&seen.sent, |t| t.udp && t.dst == remote),
    );
    assert!(
        received >= 1 && sent >= 1,
        "P5 on the tap: {received} in, {sent} out"
    );
    // An outbound rule counts the requests TC egress let out and the answers XDP passed.
    assert_eq!(
        c.rule(EXT, "messenger-stun-out") - p5,
        received + sent,
        "P5 counter vs the tap"
    );

    // P4: socat from the Edge's media range to an echo on the stranger, the echo coming back.
    let mut echo = lab
        .spawn(
            &lab.stranger,
            "socat-echo",
            "socat",
            &[
                &format!("TCP-LISTEN:7000,bind={stranger_ip},reuseaddr,fork"),
                "PIPE",
            ],
        )
        .expect("socat echo");
    lab.wait_listening(&lab.stranger, false, 7000, &mut echo);
    let tap = Tap::open(&lab.edge, EXT).expect("tap").record();
    let p4 = c.rule(EXT, "messenger-rtp-tcp-out");
    for (round, port) in [50010u16, 50011].into_iter().enumerate() {
        let o = lab
            .command(&lab.edge, "sh")
            .args([
                "-c",
                &format!(
                    "echo media-{round} | timeout -s KILL 5 socat -t 1 - \
                     TCP:{stranger_ip}:7000,bind={edge_ip}:{port},reuseaddr"
                ),
            ])
            .output()
            .expect("socat");
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success() && out.trim() == format!("media-{round}"),
            "P4 from {edge_ip}:{port}: {} {out}{}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let seen = tap.finish(QUIET).expect("tap");
    let media = |a: &SocketAddr| a.ip() == edge_ip && (50010..=50011).contains(&a.port());
    let remote = SocketAddr::new(stranger_ip, 7000);
    let (received, sent) = (
        count(&seen.received, |t| {
            !t.udp && t.src == remote && media(&t.dst)
        }),
        count(&seen.sent, |t| !t.udp && t.dst == remote && media(&t.src)),
    );
    assert!(
        received >= 6 && sent >= 6,
        "P4 on the tap: {received} in, {sent} out"
    );
    assert_eq!(
        c.rule(EXT, "messenger-rtp-tcp-out") - p4,
        received + sent,
        "P4 counter vs the tap"
    );

    drop((echo, edge_turn, stranger_turn));
    drop(classifier);
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
}
