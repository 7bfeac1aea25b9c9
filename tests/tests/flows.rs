//! The outbound flow table, as compiled, with BPF_PROG_TEST_RUN: the TC egress program records
//! what outbound rules allow, the XDP program passes only replies to recorded, live flows.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    thread::sleep,
    time::Duration,
};

use edge_classifier_tests::*;

// The lab's Edge and partner; the peers are hosts of the flows these tests open.
const EXT4: Ipv4Addr = edge_classifier_lab::v4_of(edge_classifier_lab::EDGE_EXT_V4);
const EXT6: Ipv6Addr = edge_classifier_lab::v6_of(edge_classifier_lab::EDGE_EXT_V6);
const PEER4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 77);
const PEER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x999, 0, 0, 0, 0, 7);
const OTHER4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 78);
const OTHER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x999, 0, 0, 0, 0, 8);
const PARTNER4: Ipv4Addr = edge_classifier_lab::v4_of(edge_classifier_lab::PARTNER_V4);
const PARTNER6: Ipv6Addr = edge_classifier_lab::v6_of(edge_classifier_lab::PARTNER_V6);
const PARTNER4B: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 6);
const PARTNER6B: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x203, 0, 0, 0, 0, 6);

/// Address families: (edge, peer, another peer, partner, another partner).
fn families() -> [(IpAddr, IpAddr, IpAddr, IpAddr, IpAddr); 2] {
    [
        (
            EXT4.into(),
            PEER4.into(),
            OTHER4.into(),
            PARTNER4.into(),
            PARTNER4B.into(),
        ),
        (
            EXT6.into(),
            PEER6.into(),
            OTHER6.into(),
            PARTNER6.into(),
            PARTNER6B.into(),
        ),
    ]
}

/// Short timeouts so expiry is testable: UDP 1 s, TCP closing 1 s, TCP idle 30 s.
fn short_timeouts() -> Harness {
    Harness::edited_default(
        "external",
        &[
            ("tcp_idle = 7440", "tcp_idle = 30"),
            ("udp_idle = 180", "udp_idle = 1"),
            ("tcp_closing = 10", "tcp_closing = 1"),
        ],
    )
}

fn out_rule(h: &mut Harness, name: &str, frame: &[u8], rule: &'static str) {
    h.expect_dir(Dir::Out, name, frame, TC_NEXT, &Expected::Rule(rule));
}

fn in_rule(h: &mut Harness, name: &str, frame: &[u8], rule: &'static str) {
    h.expect_dir(Dir::In, name, frame, XDP_PASS, &Expected::Rule(rule));
}

fn in_drop(h: &mut Harness, name: &str, frame: &[u8], reason: &'static str) {
    h.expect_dir(Dir::In, name, frame, XDP_DROP, &drop_reason(reason));
}

/// One outbound flow: the request the Edge sends, its reply, and replies with one field changed.
struct Outbound {
    rule: &'static str,
    request: Vec<u8>,
    reply: Vec<u8>,
    /// (what changed, frame, the reason it drops under)
    variants: Vec<(&'static str, Vec<u8>, &'static str)>,
}

fn outbound_rows(
    edge: IpAddr,
    peer: IpAddr,
    other: IpAddr,
    partner: IpAddr,
    partner_b: IpAddr,
) -> Vec<Outbound> {
    let mut rows = Vec::new();
    for (rule, remote, remote_b, port) in [
        ("public-im-sip-out", partner, partner_b, 5061u16),
        ("sip-federation-out", peer, other, 5061),
        ("xmpp-federation-out", peer, other, 5269),
    ] {
        rows.push(Outbound {
            rule,
            request: tcp_segment(edge, 41000, remote, port, SYN),
            reply: tcp_segment(remote, port, edge, 41000, SYN | ACK),
            variants: vec![
                (
                    "remote address",
                    tcp_segment(remote_b, port, edge, 41000, SYN | ACK),
                    "not_established",
                ),
                (
                    "edge port",
                    tcp_segment(remote, port, edge, 41001, SYN | ACK),
                    "not_established",
                ),
                // Not the service port any more: no rule speaks of it at all.
                (
                    "remote port",
                    tcp_segment(remote, port + 1, edge, 41000, SYN | ACK),
                    "no_rule",
                ),
                ("transport", udp(remote, port, edge, 41000), "no_rule"),
            ],
        });
    }
    rows.push(Outbound {
        rule: "messenger-stun-out",
        request: udp(edge, 42000, peer, 3478),
        reply: udp(peer, 3478, edge, 42000),
        variants: vec![
            (
                "remote address",
                udp(other, 3478, edge, 42000),
                "not_established",
            ),
            ("edge port", udp(peer, 3478, edge, 42001), "not_established"),
            ("remote port", udp(peer, 3479, edge, 42000), "no_rule"),
            (
                "transport",
                tcp_segment(peer, 3478, edge, 42000, SYN | ACK),
                "no_rule",
            ),
        ],
    });
    // P4: the A/V Edge's own media range is the local side; the Messenger client's port is any.
    rows.push(Outbound {
        rule: "messenger-rtp-tcp-out",
        request: tcp_segment(edge, 50010, peer, 7000, SYN),
        reply: tcp_segment(peer, 7000, edge, 50010, SYN | ACK),
        variants: vec![
            (
                "remote address",
                tcp_segment(other, 7000, edge, 50010, SYN | ACK),
                "not_established",
            ),
            (
                "edge port",
                tcp_segment(peer, 7000, edge, 50011, SYN | ACK),
                "not_established",
            ),
            (
                "remote port",
                tcp_segment(peer, 7001, edge, 50010, SYN | ACK),
                "not_established",
            ),
            ("transport", udp(peer, 7000, edge, 50010), "no_rule"),
        ],
    });
    rows
}

#[test]
fn egress_records_outbound_flows_and_only_their_replies_pass() {
    let mut h = short_timeouts();
    for (edge, peer, other, partner, partner_b) in families() {
        for row in outbound_rows(edge, peer, other, partner, partner_b) {
            let r = row.rule;
            in_drop(
                &mut h,
                &format!("{r}: reply before any request"),
                &row.reply,
                "not_established",
            );
            out_rule(&mut h, &format!("{r}: request"), &row.request, r);
            in_rule(&mut h, &format!("{r}: reply"), &row.reply, r);
            in_rule(&mut h, &format!("{r}: second reply"), &row.reply, r);
            for (what, frame, reason) in &row.variants {
                in_drop(
                    &mut h,
                    &format!("{r}: reply with another {what}"),
                    frame,
                    reason,
                );
            }
        }
    }
    // Every recorded flow names the rule that allowed it, and nothing else was recorded.
    let flows = h.classifier.maps().flows().expect("flows");
    assert_eq!(flows.len(), 10, "flows recorded: {flows:?}");
    // Each family's flows sit in that family's table, listed with their real addresses.
    let s = h.classifier.maps().flow_stats().expect("flow stats");
    assert_eq!((s.present_v4, s.present_v6), (5, 5), "{s:?}");
    for (edge, ..) in families() {
        let of_family: Vec<_> = flows
            .iter()
            .filter(|f| f.local().is_ipv4() == edge.is_ipv4())
            .collect();
        assert_eq!(of_family.len(), 5, "{edge}: {flows:?}");
        assert!(
            of_family
                .iter()
                .all(|f| f.local().ip() == edge && f.remote().is_ipv4() == edge.is_ipv4()),
            "{edge}: {of_family:?}"
        );
    }
    let rules = &h.classifier.compiled().rules;
    for f in &flows {
        let rule = rules
            .iter()
            .find(|r| r.slot == f.state.slot)
            .expect("slot names a rule");
        assert_eq!(rule.direction.to_string(), "outbound", "{f:?}");
    }
}

#[test]
fn ingress_alone_never_creates_a_flow() {
    let mut h = short_timeouts();
    for (edge, peer, other, partner, partner_b) in families() {
        for row in outbound_rows(edge, peer, other, partner, partner_b) {
            for _ in 0..3 {
                in_drop(
                    &mut h,
                    &format!("{}: unsolicited reply", row.rule),
                    &row.reply,
                    "not_established",
                );
            }
            // A request arriving from outside is not the Edge opening a flow either.
            let _ = h.run_dir(Dir::In, &row.request);
            in_drop(
                &mut h,
                &format!("{}: reply after inbound request", row.rule),
                &row.reply,
                "not_established",
            );
        }
    }
    // An egress RST for a flow nobody opened records nothing.
    let (edge, peer) = (IpAddr::from(EXT4), IpAddr::from(PEER4));
    out_rule(
        &mut h,
        "RST out",
        &tcp_segment(edge, 41500, peer, 5061, RST | ACK),
        "sip-federation-out",
    );
    in_drop(
        &mut h,
        "reply after RST out",
        &tcp_segment(peer, 5061, edge, 41500, ACK),
        "not_established",
    );
    let flows = h.classifier.maps().flows().expect("flows");
    assert!(flows.is_empty(), "ingress created flows: {flows:?}");
    let s = h.classifier.maps().flow_stats().expect("flow stats");
    assert_eq!((s.created, s.present), (0, 0), "{s:?}");
}

#[test]
fn idle_flows_expire_and_a_new_request_revives_them() {
    let mut h = short_timeouts();
    for (edge, peer, ..) in families() {
        let request = udp(edge, 42100, peer, 3478);
        let reply = udp(peer, 3478, edge, 42100);
        out_rule(&mut h, "STUN request", &request, "messenger-stun-out");
        in_rule(&mut h, "STUN reply", &reply, "messenger-stun-out");
        // Replies keep the flow alive: 3 × 0.6 s is past the 1 s timeout in total, not idle.
        for _ in 0..3 {
            sleep(Duration::from_millis(600));
            in_rule(
                &mut h,
                "STUN reply within the idle time",
                &reply,
                "messenger-stun-out",
            );
        }
        sleep(Duration::from_millis(1300));
        let before = h.classifier.maps().flow_stats().expect("flow stats");
        in_drop(
            &mut h,
            "STUN reply after 1.3 s idle",
            &reply,
            "not_established",
        );
        let after = h.classifier.maps().flow_stats().expect("flow stats");
        assert_eq!(
            after.expired,
            before.expired + 1,
            "expiry counted: {after:?}"
        );
        assert_eq!(
            after.present + 1,
            before.present,
            "expired flow removed: {after:?}"
        );
        in_drop(
            &mut h,
            "STUN reply after expiry, again",
            &reply,
            "not_established",
        );
        out_rule(&mut h, "STUN request again", &request, "messenger-stun-out");
        in_rule(
            &mut h,
            "STUN reply to the new request",
            &reply,
            "messenger-stun-out",
        );

        // TCP with no teardown keeps its 30 s idle time.
        let syn = tcp_segment(edge, 41200, peer, 5269, SYN);
        let ack = tcp_segment(peer, 5269, edge, 41200, ACK);
        out_rule(&mut h, "XMPP SYN", &syn, "xmpp-federation-out");
        sleep(Duration::from_millis(1300));
        in_rule(&mut h, "XMPP data after 1.3 s", &ack, "xmpp-federation-out");
    }
}

#[test]
fn tcp_flows_end_after_fin_both_ways_or_rst() {
    let mut h = short_timeouts();
    for (edge, peer, ..) in families() {
        let rule = "sip-federation-out";
        // FIN both ways: the last ACKs still pass, then the flow is over after tcp_closing.
        out_rule(
            &mut h,
            "SYN",
            &tcp_segment(edge, 41300, peer, 5061, SYN),
            rule,
        );
        in_rule(
            &mut h,
            "SYN-ACK",
            &tcp_segment(peer, 5061, edge, 41300, SYN | ACK),
            rule,
        );
        out_rule(
            &mut h,
            "FIN out",
            &tcp_segment(edge, 41300, peer, 5061, FIN | ACK),
            rule,
        );
        sleep(Duration::from_millis(1300));
        // One FIN is a half-close: the peer may go on sending.
        in_rule(
            &mut h,
            "data after half-close",
            &tcp_segment(peer, 5061, edge, 41300, ACK),
            rule,
        );
        in_rule(
            &mut h,
            "FIN in",
            &tcp_segment(peer, 5061, edge, 41300, FIN | ACK),
            rule,
        );
        in_rule(
            &mut h,
            "late ACK",
            &tcp_segment(peer, 5061, edge, 41300, ACK),
            rule,
        );
        sleep(Duration::from_millis(1300));
        in_drop(
            &mut h,
            "ACK after closing",
            &tcp_segment(peer, 5061, edge, 41300, ACK),
            "not_established",
        );

        // A RST from the peer passes (the Edge must learn of it), then the flow ends.
        out_rule(
            &mut h,
            "SYN 2",
            &tcp_segment(edge, 41301, peer, 5061, SYN),
            rule,
        );
        in_rule(
            &mut h,
            "RST in",
            &tcp_segment(peer, 5061, edge, 41301, RST | ACK),
            rule,
        );
        sleep(Duration::from_millis(1300));
        in_drop(
            &mut h,
            "after RST in",
            &tcp_segment(peer, 5061, edge, 41301, ACK),
            "not_established",
        );

        // A RST from the Edge ends it the same way.
        out_rule(
            &mut h,
            "SYN 3",
            &tcp_segment(edge, 41302, peer, 5061, SYN),
            rule,
        );
        out_rule(
            &mut h,
            "RST out",
            &tcp_segment(edge, 41302, peer, 5061, RST),
            rule,
        );
        in_rule(
            &mut h,
            "in flight after RST out",
            &tcp_segment(peer, 5061, edge, 41302, ACK),
            rule,
        );
        sleep(Duration::from_millis(1300));
        in_drop(
            &mut h,
            "after RST out",
            &tcp_segment(peer, 5061, edge, 41302, ACK),
            "not_established",
        );

        // A new SYN on a closing tuple starts a fresh flow with the full idle time.
        out_rule(
            &mut h,
            "SYN 4",
            &tcp_segment(edge, 41303, peer, 5061, SYN),
            rule,
        );
        out_rule(
            &mut h,
            "RST 4",
            &tcp_segment(edge, 41303, peer, 5061, RST),
            rule,
        );
        out_rule(
            &mut h,
            "SYN 4 again",
            &tcp_segment(edge, 41303, peer, 5061, SYN),
            rule,
        );
        sleep(Duration::from_millis(1300));
        in_rule(
            &mut h,
            "reply to the new connection",
            &tcp_segment(peer, 5061, edge, 41303, SYN | ACK),
            rule,
        );
    }
}

#[test]
fn egress_outside_outbound_rules_is_counted_and_dropped_only_by_policy() {
    for (policy, action, unmatched) in [
        ("track", TC_NEXT, pass_reason("egress_tracked")),
        ("pass", TC_NEXT, pass_reason("egress_no_rule")),
        ("drop", TC_DROP, drop_reason("egress_no_rule")),
    ] {
        let mut h = Harness::edited_default(
            "external",
            &[("egress = \"track\"", &format!("egress = \"{policy}\""))],
        );
        for (edge, peer, _, partner, _) in families() {
            let out = |h: &mut Harness, name: &str, frame: Vec<u8>, action: u32, c: Expected| {
                h.expect_dir(
                    Dir::Out,
                    &format!("egress {policy}: {name}"),
                    &frame,
                    action,
                    &c,
                );
            };
            out(
                &mut h,
                "SSH to a peer",
                tcp_segment(edge, 41400, peer, 22, SYN),
                action,
                unmatched.clone(),
            );
            out(
                &mut h,
                "UDP 3479",
                udp(edge, 42400, peer, 3479),
                action,
                unmatched.clone(),
            );
            // Partners only for P2; a non-partner on 5061 is S1's.
            out(
                &mut h,
                "SIP to a partner",
                tcp_segment(edge, 41401, partner, 5061, SYN),
                TC_NEXT,
                Expected::Rule("public-im-sip-out"),
            );
            // Replies from inbound services are not outbound flows, and always go out.
            out(
                &mut h,
                "P1 reply",
                tcp_segment(edge, 5061, partner, 40000, SYN | ACK),
                TC_NEXT,
                pass_reason("egress_inbound_reply"),
            );
            out(
                &mut h,
                "P3 reply",
                tcp_segment(edge, 443, peer, 40000, ACK),
                TC_NEXT,
                pass_reason("egress_inbound_reply"),
            );
            out(
                &mut h,
                "P6 reply",
                udp(edge, 3478, peer, 40000),
                TC_NEXT,
                pass_reason("egress_inbound_reply"),
            );
            out(
                &mut h,
                "from an unprotected address",
                tcp_segment(peer, 41402, partner, 22, SYN),
                TC_NEXT,
                pass_reason("egress_unprotected"),
            );
        }
        let ping = {
            let b = etherparse::PacketBuilder::ethernet2(SRC_MAC, DST_MAC)
                .ipv4(EXT4.octets(), PEER4.octets(), 64)
                .icmpv4_echo_request(1, 1);
            let mut v = Vec::new();
            b.write(&mut v, b"ping").unwrap();
            v
        };
        h.expect_dir(
            Dir::Out,
            "ICMP echo",
            &ping,
            TC_NEXT,
            &pass_reason("egress_untracked"),
        );
        let mut arp = vec![0xffu8; 6];
        arp.extend_from_slice(&SRC_MAC);
        arp.extend_from_slice(&[0x08, 0x06]);
        arp.extend_from_slice(&[0u8; 28]);
        h.expect_dir(
            Dir::Out,
            "ARP",
            &arp,
            TC_NEXT,
            &pass_reason("egress_untracked"),
        );
        // An internal-role rule does not match on an external NIC.
        h.expect_dir(
            Dir::Out,
            "X3 port from the external NIC",
            &tcp_segment(EXT4.into(), 23456, PEER4.into(), 40000, ACK),
            action,
            &unmatched,
        );
    }
}

#[test]
fn a_full_table_evicts_the_least_recently_used_flows() {
    const CAPACITY: u32 = 4096;
    const FLOWS: u16 = 6000;
    let mut h = Harness::edited_default("external", &[("capacity = 262144", "capacity = 4096")]);
    let (edge, peer) = (IpAddr::from(EXT4), IpAddr::from(PEER4));
    let port = |i: u16| 20000 + i;
    for i in 0..FLOWS {
        let got = h.run_dir(Dir::Out, &udp(edge, port(i), peer, 3478));
        assert_eq!(got, TC_NEXT, "request {i}");
    }
    let s = h.classifier.maps().flow_stats().expect("flow stats");
    assert_eq!(s.capacity, CAPACITY);
    assert_eq!(s.created, FLOWS as u64, "{s:?}");
    assert_eq!(s.insert_failed, 0, "{s:?}");
    assert!(s.present <= CAPACITY as u64, "{s:?}");
    assert!(
        s.evicted >= (FLOWS as u32 - CAPACITY) as u64,
        "evictions counted: {s:?}"
    );
    for i in FLOWS - 16..FLOWS {
        in_rule(
            &mut h,
            &format!("reply to recent flow {i}"),
            &udp(peer, 3478, edge, port(i)),
            "messenger-stun-out",
        );
    }
    for i in 0..16 {
        in_drop(
            &mut h,
            &format!("reply to evicted flow {i}"),
            &udp(peer, 3478, edge, port(i)),
            "not_established",
        );
    }
}

#[test]
fn a_reply_must_come_back_on_a_nic_of_the_role_the_flow_left_by() {
    let mut h = short_timeouts();
    let rule = "sip-federation-out";
    let bind = |h: &mut Harness, role: &str| {
        h.binding = h.classifier.bind("lo", role).expect("rebind lo").clone();
    };
    // Pinned, so that the runs below use one CPU's reply cache.
    pin_to_cpu(0).expect("pin to CPU 0");
    for (edge, peer, ..) in families() {
        bind(&mut h, "external");
        out_rule(
            &mut h,
            &format!("{edge}: SYN out on external"),
            &tcp_segment(edge, 41600, peer, 5061, SYN),
            rule,
        );
        let reply = tcp_segment(peer, 5061, edge, 41600, SYN | ACK);
        // The same device, now bound as the internal NIC.
        bind(&mut h, "internal");
        in_drop(
            &mut h,
            &format!("{edge}: reply on an internal NIC"),
            &reply,
            "no_rule",
        );
        bind(&mut h, "external");
        in_rule(
            &mut h,
            &format!("{edge}: reply on the external NIC"),
            &reply,
            rule,
        );
        // That pass is now in this CPU's reply cache for the rest of the tick: a hit there must
        // check the role too.
        let ack = tcp_segment(peer, 5061, edge, 41600, ACK);
        in_rule(
            &mut h,
            &format!("{edge}: ACK on the external NIC"),
            &ack,
            rule,
        );
        bind(&mut h, "internal");
        in_drop(
            &mut h,
            &format!("{edge}: the same ACK on an internal NIC, same tick"),
            &ack,
            "no_rule",
        );
    }
}

/// A reload purges the flows of rules it removes; a reply this CPU's cache passed a moment
/// before must drop right after, not at the end of the tick.
#[test]
fn a_purged_flow_is_forgotten_by_the_reply_cache_at_once() {
    let mut h = short_timeouts();
    let rule = "sip-federation-out";
    pin_to_cpu(0).expect("pin to CPU 0");
    for (edge, peer, ..) in families() {
        out_rule(
            &mut h,
            &format!("{edge}: SYN out"),
            &tcp_segment(edge, 41700, peer, 5061, SYN),
            rule,
        );
        let ack = tcp_segment(peer, 5061, edge, 41700, ACK);
        in_rule(&mut h, &format!("{edge}: ACK in"), &ack, rule);
        in_rule(
            &mut h,
            &format!("{edge}: ACK in again (cached)"),
            &ack,
            rule,
        );
        let removed = h
            .classifier
            .maps_mut()
            .purge_flows(&std::collections::BTreeSet::new())
            .expect("purge");
        assert_eq!(removed, 1, "{edge}: the one flow purged");
        in_drop(
            &mut h,
            &format!("{edge}: ACK in after the purge"),
            &ack,
            "not_established",
        );
    }
}

/// `policy.egress = "track"`: what the Edge opens outside the rules (DNS, NTP, CRL fetches) gets
/// its replies, and only those: the same 5-tuple, the same NIC role, while the flow lives.
#[test]
fn egress_tracking_passes_replies_to_what_the_edge_opened_and_nothing_else() {
    let mut h = short_timeouts();
    let tracked = || pass_reason("tracked_reply");
    for (edge, peer, other, ..) in families() {
        let answer = udp(peer, 53, edge, 40053);
        in_drop(
            &mut h,
            &format!("{edge}: DNS answer before any query"),
            &answer,
            "no_rule",
        );
        h.expect_dir(
            Dir::Out,
            &format!("{edge}: DNS query"),
            &udp(edge, 40053, peer, 53),
            TC_NEXT,
            &pass_reason("egress_tracked"),
        );
        h.expect_dir(
            Dir::In,
            &format!("{edge}: DNS answer"),
            &answer,
            XDP_PASS,
            &tracked(),
        );
        for (what, frame) in [
            ("from another server", udp(other, 53, edge, 40053)),
            ("to another port", udp(peer, 53, edge, 40054)),
            ("from another port", udp(peer, 54, edge, 40053)),
            ("over TCP", tcp_segment(peer, 53, edge, 40053, SYN | ACK)),
            // A forged source port opens nothing: the SSH port stays closed.
            ("to SSH from port 53", tcp_segment(peer, 53, edge, 22, SYN)),
        ] {
            in_drop(
                &mut h,
                &format!("{edge}: DNS answer {what}"),
                &frame,
                "no_rule",
            );
        }
        // TCP: a CRL fetch over HTTP, its replies, and a SYN from port 80 that opens nothing.
        h.expect_dir(
            Dir::Out,
            &format!("{edge}: HTTP SYN"),
            &tcp_segment(edge, 40080, peer, 80, SYN),
            TC_NEXT,
            &pass_reason("egress_tracked"),
        );
        h.expect_dir(
            Dir::In,
            &format!("{edge}: HTTP SYN-ACK"),
            &tcp_segment(peer, 80, edge, 40080, SYN | ACK),
            XDP_PASS,
            &tracked(),
        );
        in_drop(
            &mut h,
            &format!("{edge}: SYN from port 80 to SSH"),
            &tcp_segment(peer, 80, edge, 22, SYN),
            "no_rule",
        );
        // A rule still decides what it covers: S1's flows count under S1, not as tracked.
        out_rule(
            &mut h,
            &format!("{edge}: S1 SYN"),
            &tcp_segment(edge, 40061, peer, 5061, SYN),
            "sip-federation-out",
        );
        in_rule(
            &mut h,
            &format!("{edge}: S1 SYN-ACK"),
            &tcp_segment(peer, 5061, edge, 40061, SYN | ACK),
            "sip-federation-out",
        );
    }
    // UDP flows idle out (udp_idle = 1 s here), and their replies drop again.
    sleep(Duration::from_millis(2300));
    for (edge, peer, ..) in families() {
        in_drop(
            &mut h,
            &format!("{edge}: DNS answer after the flow idled out"),
            &udp(peer, 53, edge, 40053),
            "no_rule",
        );
    }
}

/// A tracked flow must come back on a NIC of the role it left by.
#[test]
fn a_tracked_reply_on_another_role_drops() {
    let catalogue = edited_default_catalogue(&[]);
    let mut out = Harness::new(&catalogue, "internal");
    for (edge, peer, ..) in families() {
        // The external address sent on an internal NIC (a routing quirk): tracked there.
        out.expect_dir(
            Dir::Out,
            &format!("{edge}: NTP query on the internal NIC"),
            &udp(edge, 40123, peer, 123),
            TC_NEXT,
            &pass_reason("egress_tracked"),
        );
        out.expect_dir(
            Dir::In,
            &format!("{edge}: NTP answer on the internal NIC"),
            &udp(peer, 123, edge, 40123),
            XDP_PASS,
            &pass_reason("tracked_reply"),
        );
    }
    // The same flow table seen from an external binding of the same object.
    let ext = out
        .classifier
        .bind("lo", "external")
        .unwrap_or_else(|e| panic!("rebind lo as external: {e}"))
        .clone();
    out.binding = ext;
    for (edge, peer, ..) in families() {
        in_drop(
            &mut out,
            &format!("{edge}: NTP answer on an external NIC"),
            &udp(peer, 123, edge, 40123),
            "no_rule",
        );
    }
}

/// A reload to `egress = "pass"` purges the tracked flows; one that keeps tracking keeps them.
#[test]
fn a_reload_keeps_tracked_flows_only_while_the_policy_tracks() {
    let mut h = short_timeouts();
    for (edge, peer, ..) in families() {
        h.expect_dir(
            Dir::Out,
            &format!("{edge}: DNS query"),
            &udp(edge, 40153, peer, 53),
            TC_NEXT,
            &pass_reason("egress_tracked"),
        );
    }
    let tracking = edge_classifier::compile::compile(
        &edge_classifier::catalogue::Catalogue::default_catalogue(),
    )
    .expect("compiles");
    let kept = h
        .classifier
        .maps_mut()
        .purge_flows(&tracking.flow_slots())
        .expect("purge");
    assert_eq!(kept, 0, "a tracking catalogue keeps tracked flows");
    let passing = edge_classifier::compile::compile(&edited_default_catalogue(&[(
        "egress = \"track\"",
        "egress = \"pass\"",
    )]))
    .expect("compiles");
    let removed = h
        .classifier
        .maps_mut()
        .purge_flows(&passing.flow_slots())
        .expect("purge");
    assert_eq!(removed, 2, "both tracked flows purged");
}

/// An address the Edge's NIC has but no set names (a SLAAC or temporary IPv6 address, a second
/// IPv4 address) is protected on ingress under `protect_interface_addresses`; what the Edge
/// sends from it is its own too, so egress tracking records it and the answer comes back.
#[test]
fn the_nics_own_unnamed_addresses_track_their_flows_too() {
    let mut h = short_timeouts();
    let slaac: IpAddr = "2001:db8:100::a:b:c:d".parse().unwrap();
    let second: IpAddr = "198.51.100.99".parse().unwrap();
    let addrs: std::collections::BTreeMap<IpAddr, u32> =
        [(slaac, 1), (second, 1)].into_iter().collect();
    h.classifier
        .maps_mut()
        .set_iface_addrs(&addrs)
        .expect("NIC addresses");
    for (edge, peer) in [(second, IpAddr::from(PEER4)), (slaac, IpAddr::from(PEER6))] {
        let answer = udp(peer, 53, edge, 40053);
        in_drop(
            &mut h,
            &format!("{edge}: DNS answer before any query"),
            &answer,
            "no_rule",
        );
        h.expect_dir(
            Dir::Out,
            &format!("{edge}: DNS query from the NIC's own address"),
            &udp(edge, 40053, peer, 53),
            TC_NEXT,
            &pass_reason("egress_tracked"),
        );
        h.expect_dir(
            Dir::In,
            &format!("{edge}: DNS answer"),
            &answer,
            XDP_PASS,
            &pass_reason("tracked_reply"),
        );
        in_drop(
            &mut h,
            &format!("{edge}: SSH to the NIC's own address"),
            &tcp_segment(peer, 53, edge, 22, SYN),
            "no_rule",
        );
    }
    // An address neither named nor on a NIC is someone else's: not tracked.
    h.expect_dir(
        Dir::Out,
        "from an address that is not the Edge's",
        &udp(IpAddr::from(OTHER4), 40053, IpAddr::from(PEER4), 53),
        TC_NEXT,
        &pass_reason("egress_unprotected"),
    );
}
