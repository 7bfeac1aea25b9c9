//! Issue 17, the XMPP rows with real peers: the partner's DNS server (dnsmasq) answering the
//! Edge through the classifier, Prosody federating with Prosody over s2s 5269 both ways (X1,
//! X2), and a TLS service with client certificates on the Edge's internal 23456 (X3). The lab
//! is `edge_classifier_lab::peers`.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use edge_classifier_common::reason;
use edge_classifier_lab::{
    Listeners,
    peers::{self, Counters, EXT, PeerLab},
    udp_send,
};

const DENIED: Duration = Duration::from_millis(500);

#[test]
fn dns_srv_lookups_from_the_edge_pass_the_classifier_and_unsolicited_dns_does_not() {
    let lab = PeerLab::create("dns").expect("peer lab");
    let classifier = lab
        .attach()
        .expect("classifier attached in the edge namespace");
    let c = Counters(&classifier);
    let tracked = c.reason(EXT, reason::PASS_TRACKED_REPLY);
    let egress = c.reason(EXT, reason::PASS_EGRESS_TRACKED);

    // dig reads /etc/resolv.conf: the lab's, naming the partner's dnsmasq.
    let srv = lab
        .dig(
            &lab.edge,
            &["+short", "SRV", "_xmpp-server._tcp.partner.example"],
        )
        .expect("SRV lookup from the edge");
    assert!(
        srv.contains("5269 partner.example."),
        "SRV answer from the edge: {srv:?}"
    );
    let a = lab
        .dig(&lab.edge, &["+short", "A", "sip.partner.example"])
        .expect("A lookup from the edge");
    assert_eq!(a.trim(), peers::PARTNER.to_string());
    assert!(
        c.reason(EXT, reason::PASS_EGRESS_TRACKED) >= egress + 2,
        "the queries left as tracked egress"
    );
    assert!(
        c.reason(EXT, reason::PASS_TRACKED_REPLY) >= tracked + 2,
        "the answers passed as replies to tracked flows"
    );

    // An unsolicited datagram from port 53 to an open port on the Edge never arrives.
    let listeners = Listeners::start(&lab.edge, &[], &[40053]).expect("edge listener");
    let dropped = c.reason(EXT, reason::DROP_NO_RULE) + c.reason(EXT, reason::DROP_NOT_ESTABLISHED);
    let answered = udp_send(
        &lab.stranger,
        SocketAddr::new(IpAddr::V4(peers::STRANGER), 53),
        SocketAddr::new(IpAddr::V4(peers::EDGE_EXT), 40053),
        DENIED,
    )
    .expect("udp from port 53");
    assert!(!answered, "an unsolicited DNS 'answer' was answered");
    assert!(listeners.udp(40053).datagrams.is_empty());
    assert!(
        c.reason(EXT, reason::DROP_NO_RULE) + c.reason(EXT, reason::DROP_NOT_ESTABLISHED) > dropped,
        "the unsolicited datagram was counted as dropped"
    );
    // The query still works afterwards, from the stranger's side too (DNS is no Edge rule).
    let srv = lab
        .dig(
            &lab.stranger,
            &["+short", "SRV", "_sipfederationtls._tcp.edge.example"],
        )
        .expect("SRV lookup from the stranger");
    assert!(srv.contains("5061 sip.edge.example."), "{srv:?}");
}
