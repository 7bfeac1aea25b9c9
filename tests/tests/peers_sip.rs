//! Issue 17, rows S1/P1/P2 and P3 with the real programs an Edge talks to, through the
//! classifier attached to the peer lab's Edge (`edge_classifier_lab::peers`: the seed profile on
//! the lab's addresses, the lab's test CA and the partner's dnsmasq):
//!
//! - Kamailio with its TLS module on the Edge (`tls:198.51.100.10:5061`, mutual TLS: each side
//!   requires and verifies the other's certificate; and `tls:198.51.100.10:443` for clients, no
//!   client certificate), a second Kamailio on the partner (`203.0.113.5:5061`) and a third on
//!   the stranger (`198.18.0.77:5061`). Each forwards what `sipp` hands it on its loopback (UDP:
//!   Debian's sipp is built without TLS) to the domain of the request URI, found through
//!   `_sipfederationtls._tcp.<domain>` (ipops `srv_query`, the lab's resolv.conf); it answers
//!   OPTIONS, MESSAGE and REGISTER for its own domain itself.
//! - OPTIONS and MESSAGE both ways with the partner (P2 out, P1 in) and from the Edge to the
//!   stranger (S1); the stranger's Kamailio finds the Edge through SRV and cannot reach it (P1 is
//!   for partners); a forged segment from the stranger's 5061 never reaches the Edge.
//! - P3: baresip on the stranger registers to the Edge's 443 over TLS.
//! - Each exchange's rule counter is checked against a tap on ext0, and the exchanges are
//!   repeated after a reload, after a detach and re-attach, and under the real daemon (after
//!   `edge-classifier reload`, while it is killed -9, after it restarted).
//!
//! The media rows (P4, P5, P6) are in `peers_media.rs`.

use std::{
    fs,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use edge_classifier::{compile::compile_with, loader::Classifier, maps::Holds};
use edge_classifier_common::reason;
use edge_classifier_lab::{
    Listeners, RawSender, Recorded, Tap, Tuple, mac,
    peers::{self, Counters, EXT, EdgeInstance, PeerLab},
    tcp_exchange, tuple,
};

const EDGE: IpAddr = IpAddr::V4(peers::EDGE_EXT);
const PARTNER: IpAddr = IpAddr::V4(peers::PARTNER);
const STRANGER: IpAddr = IpAddr::V4(peers::STRANGER);

/// An OPTIONS and then a MESSAGE to bob@[service], each expecting 200.
const SIPP_OPTIONS_MESSAGE: &str = r#"<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="OPTIONS and MESSAGE">
<send retrans="500"><![CDATA[
OPTIONS sip:bob@[service] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
From: <sip:alice@lab.invalid>;tag=[pid]SIPpTag00[call_number]
To: <sip:bob@[service]>
Call-ID: [call_id]
CSeq: 1 OPTIONS
Contact: <sip:alice@[local_ip]:[local_port]>
Max-Forwards: 70
Content-Length: [len]

]]></send>
<recv response="200"/>
<send retrans="500"><![CDATA[
MESSAGE sip:bob@[service] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
From: <sip:alice@lab.invalid>;tag=[pid]SIPpTag00[call_number]
To: <sip:bob@[service]>
Call-ID: [call_id]
CSeq: 2 MESSAGE
Max-Forwards: 70
Content-Type: text/plain
Content-Length: [len]

hello over federation
]]></send>
<recv response="200"/>
</scenario>
"#;

/// sipp on `ns`'s loopback running `scenario` once against the Kamailio there, with
/// `[service]` = `service`. `Ok` when every step got its 200.
fn sipp(lab: &PeerLab, ns: &str, scenario: &str, service: &str) -> Result<(), String> {
    let sf = lab.dir.join(scenario);
    let o = lab
        .run(
            ns,
            SIP + Duration::from_secs(2),
            "sipp",
            &[
                "-sf",
                &sf.display().to_string(),
                "-s",
                service,
                "-m",
                "1",
                "-i",
                "127.0.0.1",
                "-p",
                "5070",
                "127.0.0.1:5060",
                "-timeout",
                &format!("{}s", SIP.as_secs()),
                "-timeout_error",
                "-nostdin",
                "-nd",
            ],
        )
        .expect("sipp");
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "sipp {scenario} to {service} in {ns}: {}\n{}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ))
    }
}

/// baresip on the stranger registering carol@EDGE over TLS to the Edge's 443 (checking the
/// Edge's certificate against the lab's CA), quitting after two seconds: its line for the
/// registration's answer when it is a 200.
fn baresip_register(lab: &PeerLab) -> Result<String, String> {
    let dir = lab.subdir("baresip").expect("dir");
    fs::write(
        dir.join("config"),
        format!(
            "sip_listen {STRANGER}:0\nsip_cafile {}\nmodule_path /usr/lib/baresip/modules\n\
             module account.so\nmodule g711.so\nmodule menu.so\n",
            lab.ca.display()
        ),
    )
    .expect("baresip config");
    fs::write(
        dir.join("accounts"),
        format!(
            "<sip:carol@{EDGE};transport=tls>;outbound=\"sip:{EDGE}:443;transport=tls\";\
             regint=300\n"
        ),
    )
    .expect("baresip accounts");
    let o = lab
        .run(
            &lab.stranger,
            Duration::from_secs(8),
            "baresip",
            &["-f", &dir.display().to_string(), "-t", "2"],
        )
        .expect("baresip");
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    match out.lines().find(|l| l.contains("{0/TLS/v4} 200 OK")) {
        Some(l) => Ok(l.to_string()),
        None => Err(format!(
            "{}: {out}{}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        )),
    }
}

/// Swaps an edited catalogue (a different UDP idle time) into the running classifier, the way
/// `edge-classifier reload` does.
fn reload(c: &mut Classifier) {
    let text = PeerLab::catalogue_text();
    let edited = text.replacen("udp_idle = 180", "udp_idle = 170", 1);
    assert_ne!(text, edited, "the seed profile sets udp_idle = 180");
    let cat = edge_classifier::catalogue::Catalogue::parse("reloaded.toml", &edited)
        .expect("edited catalogue");
    let next = compile_with(&cat, &c.compiled().assignments).expect("compile");
    let running = c.compiled().clone();
    c.maps_mut()
        .swap_in(&next, Holds::Empty, Some(&running))
        .expect("swap_in");
    c.set_compiled(next);
}

/// How long sipp waits for each answer.
const SIP: Duration = Duration::from_secs(8);

/// (received, sent) TCP frames on ext0 of the flows of SIP rule `id`, as a tap saw them, in
/// frames on the wire ([`wire_segments`]).
fn sip_frames(seen: &Recorded, id: &str) -> (u64, u64) {
    let sip = |a: &SocketAddr, ip: IpAddr| a.ip() == ip && a.port() == 5061;
    let remote = |a: &SocketAddr, ip: IpAddr| a.ip() == ip;
    type Pred<'a> = Box<dyn Fn(&Tuple) -> bool + 'a>;
    let (r, s): (Pred, Pred) = match id {
        "public-im-sip-out" => (
            Box::new(|t| sip(&t.src, PARTNER)),
            Box::new(|t| sip(&t.dst, PARTNER)),
        ),
        "public-im-sip-in" => (
            Box::new(|t| sip(&t.dst, EDGE) && remote(&t.src, PARTNER)),
            Box::new(|t| sip(&t.src, EDGE) && remote(&t.dst, PARTNER)),
        ),
        "sip-federation-out" => (
            Box::new(|t| sip(&t.src, STRANGER)),
            Box::new(|t| sip(&t.dst, STRANGER)),
        ),
        _ => unreachable!("{id}"),
    };
    let wire = |frames: &[Vec<u8>], pred: &Pred| -> u64 {
        frames
            .iter()
            .filter(|f| tuple(f).is_some_and(|t| !t.udp && pred(&t)))
            .map(|f| wire_segments(f))
            .sum()
    };
    (wire(&seen.received, &r), wire(&seen.sent, &s))
}

/// How many frames on the wire a TCP/IPv4 frame the tap saw stands for: one, or for a GSO frame
/// longer than the 1500-byte MTU, its payload cut at the MSS (the TC egress program counts a GSO
/// skb's segments, `gso_segs`). Kamailio's TLS client flight with its certificate chain leaves
/// as one such frame of two segments.
fn wire_segments(frame: &[u8]) -> u64 {
    const ETH: usize = 14;
    const MTU: usize = 1500;
    if frame.len() <= ETH + MTU {
        return 1;
    }
    let ip = usize::from(frame[ETH] & 0x0f) * 4;
    let tcp = usize::from(frame[ETH + ip + 12] >> 4) * 4;
    let payload = frame.len() - ETH - ip - tcp;
    payload.div_ceil(MTU - ip - tcp) as u64
}

#[test]
fn sip_federation_over_mutual_tls_with_kamailio_and_sipp() {
    let started = Instant::now();
    let lab = PeerLab::create("psip").expect("peer lab");
    fs::write(lab.dir.join("options-message.xml"), SIPP_OPTIONS_MESSAGE).expect("scenario");
    let mut classifier = lab.attach().expect("classifier attached");

    // A forged segment from the stranger's 5061 to an Edge ephemeral port never reaches it (sent
    // before the stranger's Kamailio holds the port).
    {
        let listeners = Listeners::start(&lab.edge, &[40000], &[]).expect("edge listener");
        let n = Counters(&classifier);
        let ne = n.reason(EXT, reason::DROP_NOT_ESTABLISHED);
        let x = tcp_exchange(
            &lab.stranger,
            SocketAddr::new(STRANGER, 5061),
            SocketAddr::new(EDGE, 40000),
            Duration::from_millis(500),
        )
        .expect("forged");
        assert!(!x.connected, "a forged 5061 reply connected");
        assert!(
            n.reason(EXT, reason::DROP_NOT_ESTABLISHED) > ne,
            "the forged 5061 segment counts as not_established"
        );
        assert!(listeners.tcp(40000).connections.is_empty());
    }

    // In a cell: it is killed and started again below, while the closures here read its log.
    let edge = std::cell::RefCell::new(lab.kamailio(&lab.edge, "edge", EDGE));
    let partner = lab.kamailio(&lab.partner, "partner", PARTNER);
    let stranger = lab.kamailio(&lab.stranger, "stranger", STRANGER);
    let logs = || {
        format!(
            "--- edge\n{}\n--- partner\n{}\n--- stranger\n{}\n--- dnsmasq\n{}",
            edge.borrow().printed(),
            partner.printed(),
            stranger.printed(),
            lab.dns_log()
        )
    };

    // Both ways with the partner, and the Edge to the stranger, each counted by its rule alone.
    let exchange = |rule_count: &dyn Fn(&str) -> u64, what: &str| {
        let ids = [
            "public-im-sip-out",
            "public-im-sip-in",
            "sip-federation-out",
        ];
        let now = || ids.iter().map(|id| rule_count(id)).collect::<Vec<_>>();
        for (ns, service, rule) in [
            (&lab.edge, peers::PARTNER_DOMAIN, "public-im-sip-out"),
            (&lab.partner, peers::EDGE_DOMAIN, "public-im-sip-in"),
            (&lab.edge, "stranger.example", "sip-federation-out"),
        ] {
            // Delayed ACKs of the exchange before land first.
            std::thread::sleep(Duration::from_millis(300));
            let tap = Tap::open(&lab.edge, EXT).expect("tap on ext0").record();
            let b = now();
            if let Err(e) = sipp(&lab, ns, "options-message.xml", service) {
                panic!("{what}: OPTIONS+MESSAGE to {service}: {e}\n{}", logs());
            }
            std::thread::sleep(Duration::from_millis(300));
            let a = now();
            let seen = tap.finish(Duration::from_millis(50)).expect("tap");
            for (j, id) in ids.iter().enumerate() {
                let (received, sent) = sip_frames(&seen, id);
                if *id == rule {
                    // An inbound rule counts what XDP passed; an outbound one also what TC
                    // egress let out.
                    let seen = if rule == "public-im-sip-in" {
                        received
                    } else {
                        received + sent
                    };
                    let counted = a[j] - b[j];
                    assert!(
                        seen >= 4,
                        "{what}: {service}: only {seen} frames on the tap"
                    );
                    assert_eq!(
                        counted, seen,
                        "{what}: {service}: rule {rule} counted {counted}, the tap saw \
                         {received} received and {sent} sent (wire frames)"
                    );
                } else {
                    assert_eq!(a[j], b[j], "{what}: {service}: rule {id} moved");
                }
            }
        }
    };
    exchange(&|id| Counters(&classifier).rule(EXT, id), "first");
    for domain in [peers::PARTNER_DOMAIN, "stranger.example"] {
        assert!(
            lab.dns_log().contains(&format!(
                "query[SRV] _sipfederationtls._tcp.{domain} from {EDGE}"
            )),
            "the Edge asked for {domain}'s SRV record:\n{}",
            lab.dns_log()
        );
    }
    assert!(
        edge.borrow().printed().contains(&format!(
            "relaying OPTIONS to sip:{}:5061;transport=tls",
            peers::PARTNER_SIP_HOST
        )),
        "{}",
        edge.borrow().printed()
    );

    // A segment forged by the stranger into the Edge's live TLS connection to the partner (its
    // source the stranger's 5061, its destination the Edge's port of that connection) is
    // dropped as not_established: the flow is keyed by the partner's address.
    {
        let log = partner.printed();
        let marker = format!("from tls:{EDGE}:");
        let port: u16 = log
            .lines()
            .find_map(|l| l.split(&marker).nth(1))
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("the Edge's port toward the partner in:\n{log}"));
        let frame = |src: IpAddr| {
            let IpAddr::V4(src) = src else {
                unreachable!("the peer lab is IPv4")
            };
            let b = etherparse::PacketBuilder::ethernet2(
                mac(&lab.wan, "to-edge").expect("mac"),
                mac(&lab.edge, EXT).expect("mac"),
            )
            .ipv4(src.octets(), peers::EDGE_EXT.octets(), 64)
            .tcp(5061, port, 1_000_000, 64240)
            .ack(1)
            .psh();
            let payload = b"SIP/2.0 200 OK\r\n\r\n";
            let mut f = Vec::with_capacity(b.size(payload.len()));
            b.write(&mut f, payload).expect("frame");
            f
        };
        let sender = RawSender::open(&lab.wan, "to-edge").expect("raw sender");
        // The control: the same segment from the partner's address belongs to the flow and
        // passes (the Edge's TCP answers its out-of-window sequence number with an ACK).
        {
            let n = Counters(&classifier);
            let (ne, p2) = (
                n.reason(EXT, reason::DROP_NOT_ESTABLISHED),
                n.rule(EXT, "public-im-sip-out"),
            );
            let tap = Tap::open(&lab.edge, EXT).expect("tap").record();
            sender.send(&frame(PARTNER)).expect("send");
            std::thread::sleep(Duration::from_millis(200));
            let seen = tap.finish(Duration::from_millis(50)).expect("tap");
            assert_eq!(n.reason(EXT, reason::DROP_NOT_ESTABLISHED), ne);
            assert!(
                n.rule(EXT, "public-im-sip-out") > p2,
                "the control passed as P2"
            );
            assert_eq!(
                seen.received
                    .iter()
                    .filter_map(|f| tuple(f))
                    .filter(|t| t.src == SocketAddr::new(PARTNER, 5061) && t.dst.port() == port)
                    .count(),
                1,
                "the control reached the Edge"
            );
        }
        let n = Counters(&classifier);
        let ne = n.reason(EXT, reason::DROP_NOT_ESTABLISHED);
        let tap = Tap::open(&lab.edge, EXT).expect("tap").record();
        sender.send(&frame(STRANGER)).expect("send");
        std::thread::sleep(Duration::from_millis(200));
        let seen = tap.finish(Duration::from_millis(50)).expect("tap");
        assert_eq!(
            n.reason(EXT, reason::DROP_NOT_ESTABLISHED) - ne,
            1,
            "the forged segment into {EDGE}:{port} counts as not_established"
        );
        let stranger_frames = seen
            .received
            .iter()
            .filter_map(|f| tuple(f))
            .filter(|t| t.src.ip() == STRANGER)
            .count();
        assert_eq!(stranger_frames, 0, "the forged segment reached the Edge");
    }

    // The stranger: its Kamailio finds the Edge through SRV but cannot reach its 5061 (P1 is
    // for partners).
    {
        let n = Counters(&classifier);
        let (p1, no_rule) = (
            n.rule(EXT, "public-im-sip-in"),
            n.reason(EXT, reason::DROP_NO_RULE),
        );
        let r = sipp(
            &lab,
            &lab.stranger,
            "options-message.xml",
            peers::EDGE_DOMAIN,
        );
        assert!(r.is_err(), "the stranger's OPTIONS reached the Edge");
        assert_eq!(
            n.rule(EXT, "public-im-sip-in"),
            p1,
            "P1 counted the stranger"
        );
        assert!(
            n.reason(EXT, reason::DROP_NO_RULE) > no_rule,
            "the stranger's SYNs to 5061 count as no_rule"
        );
        assert!(
            stranger.printed().contains(&format!(
                "relaying OPTIONS to sip:{}:5061",
                peers::EDGE_SIP_HOST
            )),
            "the stranger tried through SRV:\n{}",
            stranger.printed()
        );
        assert!(
            !edge
                .borrow()
                .printed()
                .contains(&format!("from tls:{STRANGER}:")),
            "the Edge's Kamailio saw the stranger:\n{}",
            edge.borrow().printed()
        );
    }

    // P3: baresip on the stranger registers to the Edge over TLS on 443.
    {
        let n = Counters(&classifier);
        let p3 = n.rule(EXT, "client-sip-tls-in");
        let got = baresip_register(&lab)
            .unwrap_or_else(|e| panic!("P3: baresip REGISTER to {EDGE}:443: {e}\n{}", logs()));
        assert!(n.rule(EXT, "client-sip-tls-in") > p3, "P3 counted: {got}");
        assert!(
            edge.borrow().printed().contains(&format!(
                "request REGISTER sip:{EDGE};transport=tls from tls:{STRANGER}"
            )),
            "{}",
            edge.borrow().printed()
        );
    }

    // A reload: the Kamailios' next requests (on the TLS connections they hold) go through.
    reload(&mut classifier);
    exchange(&|id| Counters(&classifier).rule(EXT, id), "after a reload");

    // Detached and attached again: a fresh flow table that knows none of the connections the
    // Edge's Kamailio holds.
    drop(classifier);
    let classifier = lab.attach().expect("classifier attached again");
    exchange(
        &|id| Counters(&classifier).rule(EXT, id),
        "after detach and re-attach",
    );
    drop(classifier);

    // The real daemon: started, reloaded with `edge-classifier reload`, killed -9 (the pinned
    // programs stay), started again (it adopts them); Kamailio's next requests pass each time.
    let instance = EdgeInstance::new(&lab, "peers-sip");
    let catalogue = lab.dir.join("edge.toml");
    fs::write(&catalogue, PeerLab::catalogue_text()).expect("catalogue");
    let mut daemon = instance.run(&catalogue, "daemon-1");
    let stats = |id: &str| instance.rule(id);
    exchange(&stats, "under the daemon");
    let edited = lab.dir.join("edge-reloaded.toml");
    fs::write(
        &edited,
        PeerLab::catalogue_text().replacen("udp_idle = 180", "udp_idle = 170", 1),
    )
    .expect("catalogue");
    instance.cli(&["reload", "--catalogue", &edited.display().to_string()]);
    exchange(&stats, "after `edge-classifier reload`");
    daemon.kill();
    exchange(&stats, "with the daemon killed -9");
    // Kamailio's own reconnects with no daemon running: the Edge's Kamailio killed -9 and
    // started again opens new connections to the partner and the stranger, and the partner's
    // Kamailio, whose connection to the Edge the Edge's kernel closed, connects again.
    edge.borrow_mut().kill();
    let restarted = lab.kamailio(&lab.edge, "edge", EDGE);
    *edge.borrow_mut() = restarted;
    exchange(
        &stats,
        "after the Edge's Kamailio was killed -9 and restarted",
    );
    let daemon = instance.run(&edited, "daemon-2");
    exchange(&stats, "after the daemon restarted");
    drop(daemon);
    drop(instance);
    drop((edge, partner, stranger));
    assert!(
        started.elapsed() < Duration::from_secs(120),
        "took {:?}",
        started.elapsed()
    );
}
