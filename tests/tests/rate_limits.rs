//! Limits on new flows in the kernel (BPF_PROG_TEST_RUN), each frame also through the reference
//! classifier with the same state: SYNs beyond a source's burst drop as `rate_limited`, counted
//! per rule; segments of admitted connections, other sources, exempt partners and admitted UDP
//! flows pass; the total budget; the refill (a bucket primed with an older stamp through the
//! map, since BPF_PROG_TEST_RUN cannot move jiffies); monitor mode; a reload that changes the
//! limit starts fresh buckets, one that keeps it keeps them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use edge_classifier::reference::{Counted, FlowTable, Reference};
use edge_classifier_common::reason;
use edge_classifier_tests::*;

const EXT4: Ipv4Addr = edge_classifier_lab::v4_of(edge_classifier_lab::EDGE_EXT_V4);
const EXT6: Ipv6Addr = edge_classifier_lab::v6_of(edge_classifier_lab::EDGE_EXT_V6);
const PARTNER4: Ipv4Addr = edge_classifier_lab::v4_of(edge_classifier_lab::PARTNER_V4);

fn v4(a: &str) -> IpAddr {
    a.parse().unwrap()
}

/// The default catalogue with `limit` on the client SIP rule (P3, TCP 443 from anyone) and
/// `stun` on the inbound STUN rule (UDP 3478 from anyone).
fn limited(limit: &str, stun: &str) -> edge_classifier::catalogue::Catalogue {
    let mut edits = vec![];
    let p3 = format!("id = \"client-sip-tls-in\"\nlimit = {limit}");
    let stun_line = format!("id = \"messenger-stun-in\"\nlimit = {stun}");
    if !limit.is_empty() {
        edits.push(("id = \"client-sip-tls-in\"", p3.as_str()));
    }
    if !stun.is_empty() {
        edits.push(("id = \"messenger-stun-in\"", stun_line.as_str()));
    }
    edited_default_catalogue(&edits)
}

/// The kernel program and the reference, fed the same frames.
struct Both {
    h: Harness,
    state: FlowTable,
}

impl Both {
    fn new(cat: &edge_classifier::catalogue::Catalogue) -> Both {
        Both {
            h: Harness::new(cat, "external"),
            state: FlowTable::default(),
        }
    }

    /// A SYN from `src`:`sport` to P3 (TCP 443 of the Edge's IPv4 address), as `expect`.
    fn syn_to_p3(&mut self, name: &str, src: IpAddr, sport: u16, counted: Expected) {
        self.expect(name, &tcp(src, sport, IpAddr::V4(EXT4), 443), counted);
    }

    /// One frame: the kernel's verdict and counter as expected, and the reference's the same.
    fn expect(&mut self, name: &str, frame: &[u8], counted: Expected) {
        let pass = match &counted {
            Expected::Rule(_) => true,
            Expected::Reason(_, drop) => !drop,
        };
        let action = if pass { XDP_PASS } else { XDP_DROP };
        self.h.expect(name, frame, action, &counted);
        let compiled = self.h.classifier.compiled().clone();
        let role = compiled.role_mask(&self.h.binding.role).expect("role");
        let v = Reference::new(&compiled).ingress(frame, role, &mut self.state, jiffies());
        let got = match v.counted {
            Counted::Rule(slot) => {
                let id = &compiled.rules.iter().find(|r| r.slot == slot).unwrap().id;
                format!("rule {id}")
            }
            Counted::Reason(r) => {
                let (n, d) = reason::NAMES[r as usize];
                Expected::Reason(n, d).to_string()
            }
        };
        assert_eq!(got, counted.to_string(), "{name}: the reference classifier");
        assert_eq!(v.pass, pass, "{name}: the reference's verdict");
    }

    fn slot(&self, id: &str) -> u32 {
        self.h.classifier.compiled().rule_slot(id)
    }

    /// New flows the kernel counted as over the limit of rule `id`.
    fn limited(&self, id: &str) -> u64 {
        self.h.classifier.maps().limited(&[self.slot(id)]).unwrap()[0]
    }
}

trait SlotOf {
    fn rule_slot(&self, id: &str) -> u32;
}

impl SlotOf for edge_classifier::compile::Compiled {
    fn rule_slot(&self, id: &str) -> u32 {
        self.rules
            .iter()
            .find(|r| r.id == id)
            .unwrap_or_else(|| panic!("no rule {id}"))
            .slot
    }
}

const P3: &str = "client-sip-tls-in";
const STUN: &str = "messenger-stun-in";

#[test]
fn syns_beyond_a_sources_burst_drop_as_rate_limited_and_established_segments_pass() {
    // One flow an hour refills nothing during the test: the burst alone decides.
    let mut b = Both::new(&limited(r#"{ per_source = "1/h", burst = 3 }"#, ""));
    let client = v4("192.0.2.77");
    let dst = IpAddr::V4(EXT4);
    for port in 0..3 {
        b.syn_to_p3(
            &format!("SYN {port} within the burst"),
            client,
            40000 + port,
            Expected::Rule(P3),
        );
    }
    b.syn_to_p3(
        "SYN beyond the burst",
        client,
        40003,
        drop_reason("rate_limited"),
    );
    assert_eq!(b.limited(P3), 1, "counted against the rule");
    // Segments of admitted connections are not new flows.
    b.expect(
        "ACK of an admitted connection",
        &tcp_segment(client, 40000, dst, 443, ACK),
        Expected::Rule(P3),
    );
    b.expect(
        "FIN|ACK",
        &tcp_segment(client, 40001, dst, 443, FIN | ACK),
        Expected::Rule(P3),
    );
    // Another /32 has a bucket of its own; /32 is the default prefix.
    b.syn_to_p3(
        "SYN from the neighbour address",
        v4("192.0.2.78"),
        40000,
        Expected::Rule(P3),
    );
    // IPv6 sources share a /64.
    let a = IpAddr::V6("2001:db8:999::1".parse().unwrap());
    let same64 = IpAddr::V6("2001:db8:999::2:1".parse().unwrap());
    let other64 = IpAddr::V6("2001:db8:999:1::1".parse().unwrap());
    let dst6 = IpAddr::V6(EXT6);
    for port in 0..3 {
        b.expect(
            &format!("IPv6 SYN {port}"),
            &tcp(if port == 1 { same64 } else { a }, 40000 + port, dst6, 443),
            Expected::Rule(P3),
        );
    }
    b.expect(
        "IPv6 SYN from the same /64",
        &tcp(same64, 41000, dst6, 443),
        drop_reason("rate_limited"),
    );
    b.expect(
        "IPv6 SYN from the next /64",
        &tcp(other64, 41000, dst6, 443),
        Expected::Rule(P3),
    );
    assert_eq!(b.limited(P3), 2);
    // A rule without a limit is not touched.
    b.expect(
        "partner SYN to 5061",
        &tcp(IpAddr::V4(PARTNER4), 40000, dst, 5061),
        Expected::Rule("public-im-sip-in"),
    );
    assert_eq!(b.limited("public-im-sip-in"), 0);
}

#[test]
fn the_source_prefix_is_configurable() {
    let mut b = Both::new(&limited(
        r#"{ per_source = "1/h", burst = 1, prefix_v4 = 24 }"#,
        "",
    ));
    b.syn_to_p3("first of the /24", v4("192.0.2.1"), 1, Expected::Rule(P3));
    b.syn_to_p3(
        "second address of the /24",
        v4("192.0.2.200"),
        1,
        drop_reason("rate_limited"),
    );
    b.syn_to_p3("next /24", v4("192.0.3.1"), 1, Expected::Rule(P3));
}

#[test]
fn the_total_budget_is_spent_only_by_admitted_sources() {
    let mut b = Both::new(&limited(
        r#"{ per_source = "1/h", burst = 1, total = "1/h", total_burst = 2 }"#,
        "",
    ));
    b.syn_to_p3("source A", v4("192.0.2.1"), 1, Expected::Rule(P3));
    // A's second SYN is refused by its own bucket and does not spend the total.
    b.syn_to_p3(
        "source A again",
        v4("192.0.2.1"),
        2,
        drop_reason("rate_limited"),
    );
    b.syn_to_p3("source B", v4("192.0.2.2"), 1, Expected::Rule(P3));
    b.syn_to_p3(
        "source C: the total is spent",
        v4("192.0.2.3"),
        1,
        drop_reason("rate_limited"),
    );
    assert_eq!(b.limited(P3), 2);
}

#[test]
fn exempt_partners_are_never_limited() {
    let mut b = Both::new(&limited(
        r#"{ per_source = "1/h", burst = 1, total = "1/h", total_burst = 1, exempt = ["public_im_partners"] }"#,
        "",
    ));
    b.syn_to_p3("a stranger", v4("192.0.2.1"), 1, Expected::Rule(P3));
    b.syn_to_p3(
        "another stranger: the total is spent",
        v4("192.0.2.2"),
        1,
        drop_reason("rate_limited"),
    );
    for port in 0..20 {
        b.syn_to_p3(
            &format!("partner SYN {port}"),
            IpAddr::V4(PARTNER4),
            40000 + port,
            Expected::Rule(P3),
        );
    }
}

#[test]
fn a_set_with_its_own_budget_neither_spends_nor_is_spent_by_the_others() {
    let mut b = Both::new(&limited(
        r#"{ per_source = "1/h", burst = 1, total = "1/h", total_burst = 2, own_budget = { sets = ["public_im_partners"], rate = "1/h", burst = 3 } }"#,
        "",
    ));
    let partner = IpAddr::V4(PARTNER4);
    // The partner set's budget: 3 new flows from one partner address, where the per-source
    // budget would have allowed 1.
    for port in 0..3 {
        b.syn_to_p3(
            &format!("partner SYN {port}"),
            partner,
            40000 + port,
            Expected::Rule(P3),
        );
    }
    b.syn_to_p3(
        "partner SYN beyond its set's budget",
        partner,
        40003,
        drop_reason("rate_limited"),
    );
    // Everyone else: the total of 2 is whole, the partners took none of it.
    b.syn_to_p3("stranger A", v4("192.0.2.1"), 1, Expected::Rule(P3));
    b.syn_to_p3("stranger B", v4("192.0.2.2"), 1, Expected::Rule(P3));
    b.syn_to_p3(
        "stranger C: the total is spent",
        v4("192.0.2.3"),
        1,
        drop_reason("rate_limited"),
    );
    assert_eq!(b.limited(P3), 2);
}

#[test]
fn an_admitted_udp_flow_is_not_new_and_another_flow_of_the_source_is() {
    let mut b = Both::new(&limited("", r#"{ per_source = "1/h", burst = 1 }"#));
    let client = v4("192.0.2.77");
    let dst = IpAddr::V4(EXT4);
    b.expect(
        "first datagram",
        &udp(client, 50000, dst, 3478),
        Expected::Rule(STUN),
    );
    for i in 0..5 {
        b.expect(
            &format!("datagram {i} of the admitted flow"),
            &udp(client, 50000, dst, 3478),
            Expected::Rule(STUN),
        );
    }
    b.expect(
        "a second flow of the source",
        &udp(client, 50001, dst, 3478),
        drop_reason("rate_limited"),
    );
    assert_eq!(b.limited(STUN), 1);
}

#[test]
fn an_empty_bucket_refills_with_time() {
    // 2 flows a second, burst 1: one token takes HZ/2 ticks.
    let mut b = Both::new(&limited(r#"{ per_source = "2/s", burst = 1 }"#, ""));
    let client = v4("192.0.2.77");
    let dst = IpAddr::V4(EXT4);
    b.syn_to_p3("first SYN", client, 1, Expected::Rule(P3));
    // The test may cross a tick here, but half a second it does not.
    b.h.expect(
        "second SYN",
        &tcp(client, 2, dst, 443),
        XDP_DROP,
        &drop_reason("rate_limited"),
    );
    let slot = b.slot(P3);
    let (key, bucket) =
        b.h.classifier
            .maps()
            .buckets()
            .into_iter()
            .find(|(k, _)| k.slot == slot && k.family == 4)
            .expect("the source's bucket");
    let limit =
        b.h.classifier
            .compiled()
            .rules
            .iter()
            .find(|r| r.id == P3)
            .unwrap();
    let budget = limit.limit.as_ref().unwrap().entry.per_source;
    assert!(
        bucket.tokens + budget.refill * jiffies().saturating_sub(bucket.stamp) < budget.cost,
        "the bucket is empty: {bucket:?} of {budget:?}"
    );
    // As if a token's worth of ticks had passed since the bucket was last brought up to date.
    let ticks = budget.cost.div_ceil(budget.refill);
    let primed = edge_classifier_common::Bucket {
        tokens: 0,
        stamp: jiffies() - ticks,
    };
    b.h.classifier.maps_mut().set_bucket(&key, &primed).unwrap();
    b.h.expect(
        "SYN after the refill",
        &tcp(client, 3, dst, 443),
        XDP_PASS,
        &Expected::Rule(P3),
    );
    b.h.expect(
        "and the bucket is empty again",
        &tcp(client, 4, dst, 443),
        XDP_DROP,
        &drop_reason("rate_limited"),
    );
    assert_eq!(b.limited(P3), 2);
}

#[test]
fn monitor_mode_passes_what_the_limit_would_drop() {
    let mut cat = limited(r#"{ per_source = "1/h", burst = 1 }"#, "");
    cat.policy.default = edge_classifier::catalogue::Action::Pass;
    let mut b = Both::new(&cat);
    b.syn_to_p3("first", v4("192.0.2.1"), 1, Expected::Rule(P3));
    b.syn_to_p3(
        "over the limit",
        v4("192.0.2.1"),
        2,
        pass_reason("monitor_rate_limited"),
    );
    assert_eq!(b.limited(P3), 1, "counted as limited all the same");
}

#[test]
fn a_reload_that_changes_the_limit_starts_fresh_buckets_and_one_that_keeps_it_keeps_them() {
    let one = limited(r#"{ per_source = "1/h", burst = 1 }"#, "");
    let mut h = Harness::new(&one, "external");
    let client = v4("192.0.2.77");
    let dst = IpAddr::V4(EXT4);
    h.expect(
        "first",
        &tcp(client, 1, dst, 443),
        XDP_PASS,
        &Expected::Rule(P3),
    );
    h.expect(
        "limited",
        &tcp(client, 2, dst, 443),
        XDP_DROP,
        &drop_reason("rate_limited"),
    );
    // The same limit (another rule's note changed): the empty bucket stands.
    let same = edited_default_catalogue(&[
        (
            "id = \"client-sip-tls-in\"",
            "id = \"client-sip-tls-in\"\nlimit = { per_source = \"1/h\", burst = 1 }",
        ),
        (
            "Internal Edge interface IP.",
            "Internal Edge interface address.",
        ),
    ]);
    h.reload(&same, "same limit");
    h.expect(
        "same limit: still limited",
        &tcp(client, 3, dst, 443),
        XDP_DROP,
        &drop_reason("rate_limited"),
    );
    // A larger burst: a new budget, fresh buckets.
    let two = limited(r#"{ per_source = "1/h", burst = 2 }"#, "");
    h.reload(&two, "larger burst");
    h.expect(
        "new limit: a fresh bucket",
        &tcp(client, 4, dst, 443),
        XDP_PASS,
        &Expected::Rule(P3),
    );
    h.expect(
        "its second token",
        &tcp(client, 5, dst, 443),
        XDP_PASS,
        &Expected::Rule(P3),
    );
    h.expect(
        "and then limited",
        &tcp(client, 6, dst, 443),
        XDP_DROP,
        &drop_reason("rate_limited"),
    );
    // The limit removed: nothing is limited.
    h.reload(
        &edge_classifier::catalogue::Catalogue::default_catalogue(),
        "no limit",
    );
    for port in 7..12 {
        h.expect(
            "no limit",
            &tcp(client, port, dst, 443),
            XDP_PASS,
            &Expected::Rule(P3),
        );
    }
}

/// What `/metrics` and `stats` show of a limit: the refused new flows per rule, the sources
/// held back now, the bucket table; and nothing of it without a limit.
#[test]
fn the_snapshot_and_metrics_show_limited_flows_sources_and_buckets() {
    use edge_classifier::{
        metrics::render,
        snapshot::{CatalogueInfo, Snapshot},
    };
    let info = || CatalogueInfo {
        source: "t".into(),
        digest: "0".repeat(64),
        rules: 10,
    };
    let mut b = Both::new(&limited(r#"{ per_source = "1/h", burst = 1 }"#, ""));
    for src in ["192.0.2.1", "192.0.2.2"] {
        b.syn_to_p3("first", v4(src), 1, Expected::Rule(P3));
        b.syn_to_p3("limited", v4(src), 2, drop_reason("rate_limited"));
    }
    b.syn_to_p3(
        "third source, first SYN",
        v4("192.0.2.3"),
        1,
        Expected::Rule(P3),
    );
    let s = Snapshot::read(&b.h.classifier, info(), Default::default()).unwrap();
    let l = &s.limits;
    assert_eq!(l.rules.len(), 1, "{l:?}");
    assert_eq!(l.rules[0].id, P3);
    assert_eq!(l.rules[0].limited, 2);
    // All three buckets are empty (burst 1, one flow an hour): each source is held back now.
    assert_eq!(l.rules[0].limited_sources, 3, "{l:?}");
    assert_eq!((l.buckets, l.buckets_evicted), (3, 0));
    let text = render(&s).unwrap();
    for line in [
        "edge_classifier_rate_limited_packets_total{rule=\"client-sip-tls-in\"} 2",
        "edge_classifier_rate_limited_sources{rule=\"client-sip-tls-in\"} 3",
        "edge_classifier_limit_buckets 3",
        "edge_classifier_limit_buckets_capacity 131072",
        "edge_classifier_dropped_packets_total{reason=\"rate_limited\",interface=\"lo\"} 2",
    ] {
        assert!(text.contains(line), "no `{line}` in\n{text}");
    }
    let table = edge_classifier::report::snapshot_table(&s, None);
    for line in [
        "limit of client-sip-tls-in (per source /32 /64: 1/h burst 1): 2 new flows refused, 3 sources limited now",
        "limit buckets: 3 of 131072, 0 evicted;",
    ] {
        assert!(table.contains(line), "no `{line}` in\n{table}");
    }
    let plain = Both::new(&edge_classifier::catalogue::Catalogue::default_catalogue());
    let s = Snapshot::read(&plain.h.classifier, info(), Default::default()).unwrap();
    assert!(s.limits.rules.is_empty());
    assert!(
        !render(&s)
            .unwrap()
            .contains("edge_classifier_limit_buckets")
    );
}

/// A slot freed by a removed rule and given to a new one later starts its rate-limited count
/// at 0, as its frame counters do.
#[test]
fn a_new_rule_on_a_reused_slot_starts_with_no_limited_flows() {
    let mut h = Harness::new(
        &limited(r#"{ per_source = "1/h", burst = 1 }"#, ""),
        "external",
    );
    let client = v4("192.0.2.77");
    let dst = IpAddr::V4(EXT4);
    h.expect(
        "first",
        &tcp(client, 1, dst, 443),
        XDP_PASS,
        &Expected::Rule(P3),
    );
    h.expect(
        "limited",
        &tcp(client, 2, dst, 443),
        XDP_DROP,
        &drop_reason("rate_limited"),
    );
    let old_slot = h.classifier.compiled().rule_slot(P3);
    assert_eq!(h.classifier.maps().limited(&[old_slot]).unwrap(), [1]);
    let parse = |text: &str| edge_classifier::catalogue::Catalogue::parse("t.toml", text).unwrap();
    let default = edge_classifier::catalogue::DEFAULT_CATALOGUE;
    // P3 removed, then a new rule on 443 under another id: it gets P3's old slot.
    let without = default.replacen(
        "id = \"client-sip-tls-in\"",
        "id = \"client-sip-tls-in-old\"",
        1,
    );
    let start = without
        .find("[[rule]]\nid = \"client-sip-tls-in-old\"")
        .unwrap();
    let end = start + 9 + without[start + 9..].find("[[rule]]").unwrap();
    let mut removed = without.clone();
    removed.replace_range(start..end, "");
    h.reload(&parse(&removed), "P3 removed");
    let renamed = default.replacen(
        "id = \"client-sip-tls-in\"",
        "id = \"client-sip-tls-in-2\"\nlimit = { per_source = \"1/h\", burst = 1 }",
        1,
    );
    h.reload(&parse(&renamed), "a new rule on 443");
    let new_slot = h.classifier.compiled().rule_slot("client-sip-tls-in-2");
    assert_eq!(new_slot, old_slot, "the test needs the slot reused");
    assert_eq!(
        h.classifier.maps().limited(&[new_slot]).unwrap(),
        [0],
        "the new rule inherited the old one's rate-limited count"
    );
}

/// XDP_TX, as BPF_PROG_TEST_RUN returns it.
const XDP_TX: u32 = 3;

use aya::programs::TestRun as _;
use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};

/// Ones' complement sum of 16-bit words.
fn sum16(b: &[u8]) -> u32 {
    b.chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

fn folds_to_ffff(mut s: u32) -> bool {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s == 0xffff
}

/// Checks that `out` is the SYN-ACK answering `syn` (MACs, addresses and ports swapped, SYN|ACK,
/// the SYN's sequence number plus one acknowledged, an MSS option when the SYN had options,
/// valid IPv4 and TCP checksums) and returns its sequence number, the cookie.
fn check_syn_ack(name: &str, syn: &[u8], out: &[u8]) -> u32 {
    let s = SlicedPacket::from_ethernet(syn).unwrap();
    let a = SlicedPacket::from_ethernet(out)
        .unwrap_or_else(|e| panic!("{name}: the SYN-ACK does not parse: {e}; {}", hex(out)));
    let (se, ae) = (s.link.unwrap(), a.link.unwrap());
    let (se, ae) = match (se, ae) {
        (etherparse::LinkSlice::Ethernet2(x), etherparse::LinkSlice::Ethernet2(y)) => (x, y),
        _ => panic!("{name}: not Ethernet"),
    };
    assert_eq!(
        (ae.source(), ae.destination()),
        (se.destination(), se.source()),
        "{name}: MACs swapped"
    );
    if syn[12..14] == [0x81, 0x00] {
        assert_eq!(out[12..16], syn[12..16], "{name}: the VLAN tag kept");
    }
    let (TransportSlice::Tcp(st), TransportSlice::Tcp(at)) =
        (s.transport.unwrap(), a.transport.unwrap())
    else {
        panic!("{name}: not TCP");
    };
    assert_eq!(
        (at.source_port(), at.destination_port()),
        (st.destination_port(), st.source_port()),
        "{name}: ports swapped"
    );
    assert!(
        at.syn() && at.ack() && !at.rst() && !at.fin() && !at.psh(),
        "{name}: SYN|ACK"
    );
    assert_eq!(at.acknowledgment_number(), st.sequence_number() + 1);
    let opts: Vec<_> = at.options_iterator().map(|o| o.unwrap()).collect();
    if st.data_offset() > 5 {
        assert!(
            matches!(
                opts.first(),
                Some(etherparse::TcpOptionElement::MaximumSegmentSize(m)) if *m > 0
            ),
            "{name}: an MSS option, got {opts:?}"
        );
    }
    assert!(at.payload().is_empty(), "{name}: no payload");
    let tcp_bytes = at.slice();
    let pseudo = match (s.net.as_ref().unwrap(), a.net.as_ref().unwrap()) {
        (NetSlice::Ipv4(si), NetSlice::Ipv4(ai)) => {
            let (sh, ah) = (si.header(), ai.header());
            assert_eq!(
                (ah.source(), ah.destination()),
                (sh.destination(), sh.source()),
                "{name}: addresses swapped"
            );
            assert!(
                folds_to_ffff(sum16(ah.slice())),
                "{name}: IPv4 header checksum"
            );
            assert_eq!(usize::from(ah.total_len()), 20 + tcp_bytes.len());
            sum16(&ah.source()) + sum16(&ah.destination())
        }
        (NetSlice::Ipv6(si), NetSlice::Ipv6(ai)) => {
            let (sh, ah) = (si.header(), ai.header());
            assert_eq!(
                (ah.source(), ah.destination()),
                (sh.destination(), sh.source()),
                "{name}: addresses swapped"
            );
            assert_eq!(usize::from(ah.payload_length()), tcp_bytes.len());
            sum16(&ah.source()) + sum16(&ah.destination())
        }
        _ => panic!("{name}: families differ"),
    };
    assert!(
        folds_to_ffff(pseudo + 6 + tcp_bytes.len() as u32 + sum16(tcp_bytes)),
        "{name}: TCP checksum; {}",
        hex(out)
    );
    at.sequence_number()
}

impl Both {
    /// A SYN the proxy answers: XDP_TX, a proper SYN-ACK, counted as `syn_cookie` (the
    /// SYN-ACK's bytes), the reference agreeing; the cookie.
    fn expect_syn_ack(&mut self, name: &str, syn: &[u8]) -> u32 {
        let before = self.h.stats();
        let mut out = vec![0u8; 256];
        let r = self
            .h
            .classifier
            .program()
            .test_run(aya::programs::TestRunOptions {
                data_in: Some(syn),
                data_out: Some(&mut out),
                ..aya::programs::TestRunOptions::new()
            })
            .expect("BPF_PROG_TEST_RUN");
        let after = self.h.stats();
        assert_eq!(r.return_value, XDP_TX, "{name}: XDP_TX");
        out.truncate(r.data_size_out as usize);
        let cookie = check_syn_ack(name, syn, &out);
        let i = reason::TX_SYN_COOKIE as usize;
        assert_eq!(
            (
                after.reasons[i].packets - before.reasons[i].packets,
                after.reasons[i].bytes - before.reasons[i].bytes
            ),
            (1, out.len() as u64),
            "{name}: counted as syn_cookie (the SYN-ACK's bytes)"
        );
        let compiled = self.h.classifier.compiled().clone();
        let role = compiled.role_mask(&self.h.binding.role).expect("role");
        let v = Reference::new(&compiled).ingress(syn, role, &mut self.state, jiffies());
        assert_eq!(
            (v.pass, v.counted),
            (true, Counted::Reason(reason::TX_SYN_COOKIE)),
            "{name}: the reference"
        );
        cookie
    }

    fn syn_proxied(&self, id: &str) -> u64 {
        self.h
            .classifier
            .maps()
            .syn_proxied(&[self.slot(id)])
            .unwrap()[0]
    }
}

#[test]
fn a_syn_proxy_rule_answers_syns_over_the_budget_with_a_cookie_and_checks_the_acks() {
    let mut b = Both::new(&limited(
        r#"{ per_source = "1/h", burst = 1, syn_proxy = true }"#,
        "",
    ));
    let client = v4("192.0.2.77");
    let dst = IpAddr::V4(EXT4);
    b.syn_to_p3("SYN within the budget", client, 40000, Expected::Rule(P3));
    b.syn_to_p3(
        "the first SYN over the budget goes through to the listener (its stamp)",
        client,
        40001,
        Expected::Rule(P3),
    );
    let syn = syn_with_options(client, 40002, dst, 443);
    let cookie = b.expect_syn_ack("IPv4 SYN with options", &syn);
    b.expect_syn_ack("IPv4 SYN without options", &tcp(client, 40003, dst, 443));
    b.expect_syn_ack(
        "VLAN-tagged SYN",
        &with_vlans(&syn_with_options(client, 40004, dst, 443), &[(0x8100, 7)]),
    );
    assert_eq!(b.syn_proxied(P3), 3, "counted per rule");
    assert_eq!(b.limited(P3), 0, "nothing dropped as rate_limited");
    // A SYN of a shape the proxy does not answer drops over the budget as before.
    b.expect(
        "IPv4 SYN with IP options",
        &tcp_with(
            ipv4_options([192, 0, 2, 77], EXT4.octets(), &[1, 1, 1, 1]),
            40005,
            443,
            &[],
        ),
        drop_reason("rate_limited"),
    );
    assert_eq!(b.limited(P3), 1);

    // IPv6: budgets per /64 and a pass-through of its own.
    let c6 = IpAddr::V6("2001:db8:999::1".parse().unwrap());
    let dst6 = IpAddr::V6(EXT6);
    b.expect(
        "IPv6 SYN within the budget",
        &tcp(c6, 40000, dst6, 443),
        Expected::Rule(P3),
    );
    b.expect(
        "IPv6 pass-through",
        &tcp(c6, 40001, dst6, 443),
        Expected::Rule(P3),
    );
    b.expect_syn_ack(
        "IPv6 SYN with options",
        &syn_with_options(c6, 40002, dst6, 443),
    );

    // The ACKs, while the proxy is active (no socket holds these tuples in the test's
    // namespace): the cookie's ACK passes, a wrong one drops. The reference cannot know the
    // kernel's secret and is not asked (see `reference::syn_proxy`).
    let ack = |sport: u16, ack: u32| {
        let mut out = Vec::new();
        PacketBuilder::ethernet2(SRC_MAC, DST_MAC)
            .ipv4([192, 0, 2, 77], EXT4.octets(), 64)
            .tcp(sport, 443, 1001, 502)
            .ack(ack)
            .write(&mut out, &[])
            .unwrap();
        out
    };
    b.h.expect(
        "the ACK carrying the cookie",
        &ack(40002, cookie.wrapping_add(1)),
        XDP_PASS,
        &pass_reason("syn_cookie_ack"),
    );
    b.h.expect(
        "an ACK with a wrong cookie",
        &ack(40002, cookie.wrapping_add(2)),
        XDP_DROP,
        &drop_reason("syn_cookie_invalid"),
    );
    b.h.expect(
        "the cookie's ACK from another port",
        &ack(40009, cookie.wrapping_add(1)),
        XDP_DROP,
        &drop_reason("syn_cookie_invalid"),
    );
    // An RST, or a rule without the proxy, is never checked.
    b.expect(
        "RST|ACK",
        &tcp_segment(client, 40002, dst, 443, RST | ACK),
        Expected::Rule(P3),
    );
    b.expect(
        "partner ACK to 5061",
        &tcp_segment(IpAddr::V4(PARTNER4), 40000, dst, 5061, ACK),
        Expected::Rule("public-im-sip-in"),
    );

    // Per rule in the snapshot, /metrics and stats.
    use edge_classifier::{
        metrics::render,
        snapshot::{CatalogueInfo, Snapshot},
    };
    let info = CatalogueInfo {
        source: "t".into(),
        digest: "0".repeat(64),
        rules: 10,
    };
    let s = Snapshot::read(&b.h.classifier, info, Default::default()).unwrap();
    assert_eq!(s.limits.rules[0].syn_cookies, Some(4), "{:?}", s.limits);
    let text = render(&s).unwrap();
    for line in [
        "edge_classifier_syn_cookies_sent_total{rule=\"client-sip-tls-in\"} 4",
        "edge_classifier_passed_packets_total{reason=\"syn_cookie\",interface=\"lo\"} 4",
        "edge_classifier_passed_packets_total{reason=\"syn_cookie_ack\",interface=\"lo\"} 1",
        "edge_classifier_dropped_packets_total{reason=\"syn_cookie_invalid\",interface=\"lo\"} 2",
    ] {
        assert!(text.contains(line), "no `{line}` in\n{text}");
    }
    let table = edge_classifier::report::snapshot_table(&s, None);
    let line = "limit of client-sip-tls-in (per source /32 /64: 1/h burst 1; SYN proxy over the budget (SYN cookies from XDP)): 1 new flows refused, 2 sources limited now, 4 SYNs answered with a SYN cookie";
    assert!(table.contains(line), "no `{line}` in\n{table}");
}

#[test]
fn monitor_mode_does_not_proxy() {
    let mut b = Both::new(&edited_default_catalogue(&[
        ("default = \"drop\"", "default = \"pass\""),
        (
            "id = \"client-sip-tls-in\"",
            "id = \"client-sip-tls-in\"\nlimit = { per_source = \"1/h\", burst = 1, syn_proxy = true }",
        ),
    ]));
    let client = v4("192.0.2.77");
    b.syn_to_p3("within", client, 40000, Expected::Rule(P3));
    for port in 40001..40004 {
        b.syn_to_p3(
            "over the budget in monitor mode",
            client,
            port,
            pass_reason("monitor_rate_limited"),
        );
    }
    assert_eq!(b.syn_proxied(P3), 0);
}
