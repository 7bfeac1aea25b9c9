//! The compiled XDP program run on table-driven frames with BPF_PROG_TEST_RUN: verdict and the
//! one counter that must move, for every seed row and every edge case of the parser.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use edge_classifier_lab::{SEED_ROWS, SeedRow};
use edge_classifier_tests::*;
use etherparse::{IpFragOffset, IpNumber, Ipv6Extensions, Ipv6FragmentHeader, Ipv6RawExtHeader};

// The lab's addresses; CLIENT is a host outside every set and outside the lab's subnets.
const EXT4: Ipv4Addr = edge_classifier_lab::v4_of(edge_classifier_lab::EDGE_EXT_V4);
const INT4: Ipv4Addr = edge_classifier_lab::v4_of(edge_classifier_lab::EDGE_INT_V4);
const EXT6: Ipv6Addr = edge_classifier_lab::v6_of(edge_classifier_lab::EDGE_EXT_V6);
const INT6: Ipv6Addr = edge_classifier_lab::v6_of(edge_classifier_lab::EDGE_INT_V6);
const CLIENT4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 77);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x999, 0, 0, 0, 0, 7);
const PARTNER4: Ipv4Addr = edge_classifier_lab::v4_of(edge_classifier_lab::PARTNER_V4);
const PARTNER6: Ipv6Addr = edge_classifier_lab::v6_of(edge_classifier_lab::PARTNER_V6);

fn v4(a: Ipv4Addr) -> IpAddr {
    IpAddr::V4(a)
}
fn v6(a: Ipv6Addr) -> IpAddr {
    IpAddr::V6(a)
}

type Case = (&'static str, Vec<u8>, u32, Expected);

fn pass_rule(name: &'static str, frame: Vec<u8>, rule: &'static str) -> Case {
    (name, frame, XDP_PASS, Expected::Rule(rule))
}

fn drop_as(name: &'static str, frame: Vec<u8>, reason: &'static str) -> Case {
    (name, frame, XDP_DROP, drop_reason(reason))
}

fn pass_as(name: &'static str, frame: Vec<u8>, reason: &'static str) -> Case {
    (name, frame, XDP_PASS, pass_reason(reason))
}

fn run_cases(h: &mut Harness, cases: Vec<Case>) {
    for (name, frame, action, counted) in cases {
        h.expect(name, &frame, action, &counted);
    }
}

/// A seed row's first frame, from the shared fixture table.
fn seed_frame(r: &SeedRow, v6: bool) -> Vec<u8> {
    let (src, sport, dst, dport) = r.first(v6);
    if r.udp {
        udp(src, sport, dst, dport)
    } else {
        tcp(src, sport, dst, dport)
    }
}

#[test]
fn every_inbound_seed_row_passes_and_counts_against_its_rule() {
    for r in SEED_ROWS.iter().filter(|r| r.inbound) {
        let mut h = Harness::default_catalogue(r.role);
        for v6 in [false, true] {
            h.expect(
                &format!("{} {}", r.row, if v6 { "IPv6" } else { "IPv4" }),
                &seed_frame(r, v6),
                XDP_PASS,
                &Expected::Rule(r.rule),
            );
        }
    }
    let mut h = Harness::default_catalogue("internal");
    run_cases(
        &mut h,
        vec![drop_as(
            "443 on the internal NIC",
            tcp(v4(CLIENT4), 40000, v4(EXT4), 443),
            "no_rule",
        )],
    );
}

/// The fixture table says of each seed row what the default catalogue says of its rule.
#[test]
fn the_seed_table_is_the_default_catalogues() {
    let cat = edge_classifier::catalogue::Catalogue::default_catalogue();
    for r in SEED_ROWS {
        let rule = cat
            .rules
            .iter()
            .find(|c| c.id == r.rule)
            .unwrap_or_else(|| panic!("{}: no rule {}", r.row, r.rule));
        assert_eq!(rule.seed_row.as_deref(), Some(r.row), "{}", r.rule);
        assert_eq!(rule.interface, r.role, "{}", r.rule);
        assert_eq!(
            rule.transport.to_string(),
            if r.udp { "udp" } else { "tcp" },
            "{}",
            r.rule
        );
        assert_eq!(
            rule.direction.to_string(),
            if r.inbound { "inbound" } else { "outbound" },
            "{}",
            r.rule
        );
        assert!(
            rule.ports.lo <= r.port && r.port <= rule.ports.hi,
            "{}: port {} outside {:?}",
            r.rule,
            r.port,
            rule.ports
        );
    }
}

#[test]
fn disallowed_ports_sources_and_roles_drop() {
    let mut h = Harness::default_catalogue("external");
    let mut cases = Vec::new();
    for (client, ext, int) in [
        (v4(CLIENT4), v4(EXT4), v4(INT4)),
        (v6(CLIENT6), v6(EXT6), v6(INT6)),
    ] {
        for port in [22, 80, 3389, 5060, 5062, 444, 442, 5268, 5270] {
            cases.push(drop_as(
                "tcp port not in the matrix",
                tcp(client, 40000, ext, port),
                "no_rule",
            ));
        }
        cases.extend([
            drop_as(
                "5061 from a non-partner",
                tcp(client, 40000, ext, 5061),
                "no_rule",
            ),
            drop_as("udp 5061", udp(client, 40000, ext, 5061), "no_rule"),
            drop_as("udp 3479", udp(client, 40000, ext, 3479), "no_rule"),
            drop_as("udp 3477", udp(client, 40000, ext, 3477), "no_rule"),
            drop_as("tcp 3478", tcp(client, 40000, ext, 3478), "no_rule"),
            drop_as(
                "23456 on the external NIC",
                tcp(client, 40000, ext, 23456),
                "no_rule",
            ),
            drop_as(
                "23456 to the internal address via external",
                tcp(client, 40000, int, 23456),
                "no_rule",
            ),
            // Replies to flows the Edge opens: unproven until the flow table exists.
            drop_as(
                "forged reply from 5061",
                tcp(client, 5061, ext, 40000),
                "not_established",
            ),
            drop_as(
                "forged reply from 5269",
                tcp(client, 5269, ext, 40000),
                "not_established",
            ),
            drop_as(
                "forged reply from udp 3478",
                udp(client, 3478, ext, 40000),
                "not_established",
            ),
            drop_as(
                "to the A/V media range (P4)",
                tcp(client, 1234, ext, 50000),
                "not_established",
            ),
            drop_as(
                "to the A/V media range end",
                tcp(client, 1234, ext, 59999),
                "not_established",
            ),
            drop_as(
                "just above the media range",
                tcp(client, 1234, ext, 60000),
                "no_rule",
            ),
            drop_as(
                "just below the media range",
                tcp(client, 1234, ext, 49999),
                "no_rule",
            ),
            drop_as(
                "udp to the media range",
                udp(client, 1234, ext, 50000),
                "no_rule",
            ),
        ]);
    }
    run_cases(&mut h, cases);
}

#[test]
fn vlan_tags_options_and_extension_headers() {
    let mut h = Harness::default_catalogue("external");
    let base4 = tcp(v4(CLIENT4), 40000, v4(EXT4), 443);
    let base6 = tcp(v6(CLIENT6), 40000, v6(EXT6), 443);
    let deny4 = tcp(v4(CLIENT4), 40000, v4(EXT4), 22);
    let hbh = Ipv6RawExtHeader::new_raw(IpNumber::TCP, &[1, 4, 0, 0, 0, 0]).expect("hbh");
    let dst_opts =
        Ipv6RawExtHeader::new_raw(IpNumber::TCP, &[1, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
            .expect("dst opts");
    let exts = Ipv6Extensions {
        hop_by_hop_options: Some(hbh.clone()),
        destination_options: Some(dst_opts),
        ..Default::default()
    };
    let cases = vec![
        pass_rule(
            "802.1Q",
            with_vlans(&base4, &[(0x8100, 100)]),
            "client-sip-tls-in",
        ),
        pass_rule(
            "802.1ad + 802.1Q",
            with_vlans(&base4, &[(0x88a8, 10), (0x8100, 100)]),
            "client-sip-tls-in",
        ),
        pass_rule(
            "802.1Q v6",
            with_vlans(&base6, &[(0x8100, 7)]),
            "client-sip-tls-in",
        ),
        drop_as(
            "802.1Q denied port",
            with_vlans(&deny4, &[(0x8100, 100)]),
            "no_rule",
        ),
        drop_as(
            "three tags",
            with_vlans(&base4, &[(0x88a8, 1), (0x8100, 2), (0x8100, 3)]),
            "malformed",
        ),
        pass_rule(
            "IPv4 options (IHL 8)",
            tcp_with(
                ipv4_options(CLIENT4.octets(), EXT4.octets(), &[1; 12]),
                40000,
                443,
                b"x",
            ),
            "client-sip-tls-in",
        ),
        drop_as(
            "IPv4 options, denied port",
            tcp_with(
                ipv4_options(CLIENT4.octets(), EXT4.octets(), &[1; 40]),
                40000,
                22,
                b"",
            ),
            "no_rule",
        ),
        pass_rule(
            "IPv6 hop-by-hop + destination options",
            tcp_with(
                ipv6_with_exts(CLIENT6.octets(), EXT6.octets(), exts.clone()),
                40000,
                443,
                b"",
            ),
            "client-sip-tls-in",
        ),
        drop_as(
            "IPv6 hop-by-hop, denied port",
            tcp_with(
                ipv6_with_exts(
                    CLIENT6.octets(),
                    EXT6.octets(),
                    Ipv6Extensions {
                        hop_by_hop_options: Some(hbh),
                        ..Default::default()
                    },
                ),
                40000,
                22,
                b"",
            ),
            "no_rule",
        ),
    ];
    run_cases(&mut h, cases);
}

#[test]
fn fragments() {
    let mut h = Harness::default_catalogue("external");
    let full = tcp_with(
        etherparse::IpHeaders::Ipv4(
            etherparse::Ipv4Header::new(0, 64, IpNumber::TCP, CLIENT4.octets(), EXT4.octets())
                .unwrap(),
            Default::default(),
        ),
        40000,
        443,
        &[0u8; 64],
    );
    let mut first = full.clone();
    ipv4_set_frag(&mut first, true, 0);
    let mut first_denied = tcp_with(
        etherparse::IpHeaders::Ipv4(
            etherparse::Ipv4Header::new(0, 64, IpNumber::TCP, CLIENT4.octets(), EXT4.octets())
                .unwrap(),
            Default::default(),
        ),
        40000,
        22,
        &[0u8; 64],
    );
    ipv4_set_frag(&mut first_denied, true, 0);
    // Only the ports (4 bytes) of the TCP header in the first fragment.
    let mut short = ipv4_cut_l4(&full, 4);
    ipv4_set_frag(&mut short, true, 0);
    let mut short_udp = ipv4_cut_l4(&udp(v4(CLIENT4), 40000, v4(EXT4), 3478), 4);
    ipv4_set_frag(&mut short_udp, true, 0);
    // A later fragment whose payload starts with bytes that look like ports 40000 -> 443.
    let mut later = full.clone();
    ipv4_set_frag(&mut later, false, 185);
    let mut later_more = full.clone();
    ipv4_set_frag(&mut later_more, true, 1);

    let frag6 = |offset: u16, more: bool, dport: u16| {
        let mut f = tcp_with(
            ipv6_with_exts(
                CLIENT6.octets(),
                EXT6.octets(),
                Ipv6Extensions {
                    fragment: Some(Ipv6FragmentHeader::new(
                        IpNumber::TCP,
                        IpFragOffset::ZERO,
                        false,
                        7,
                    )),
                    ..Default::default()
                },
            ),
            40000,
            dport,
            &[0u8; 32],
        );
        // etherparse 0.18.2 serialises the offset/M field in a non-RFC 8200 bit order, so the
        // field is written here as the kernel reads it: offset << 3 | M.
        let field = (offset << 3) | u16::from(more);
        f[L3 + 40 + 2..L3 + 40 + 4].copy_from_slice(&field.to_be_bytes());
        f
    };
    let cases = vec![
        pass_rule(
            "v4 first fragment, allowed port",
            first,
            "client-sip-tls-in",
        ),
        drop_as("v4 first fragment, denied port", first_denied, "no_rule"),
        drop_as(
            "v4 first fragment too short for the TCP header",
            short,
            "short_fragment",
        ),
        drop_as(
            "v4 first fragment too short for the UDP header",
            short_udp,
            "short_fragment",
        ),
        drop_as("v4 non-first fragment", later, "fragment"),
        drop_as("v4 middle fragment", later_more, "fragment"),
        pass_rule(
            "v6 first fragment",
            frag6(0, true, 443),
            "client-sip-tls-in",
        ),
        drop_as(
            "v6 first fragment, denied port",
            frag6(0, true, 22),
            "no_rule",
        ),
        pass_rule(
            "v6 atomic fragment",
            frag6(0, false, 443),
            "client-sip-tls-in",
        ),
        drop_as("v6 non-first fragment", frag6(100, false, 443), "fragment"),
    ];
    run_cases(&mut h, cases);

    let mut policy_pass = edge_classifier::catalogue::Catalogue::default_catalogue();
    policy_pass.policy.fragments = edge_classifier::catalogue::Action::Pass;
    let mut h = Harness::new(&policy_pass, "external");
    let mut later = full.clone();
    ipv4_set_frag(&mut later, false, 185);
    h.expect(
        "non-first fragment with fragments = pass",
        &later,
        XDP_PASS,
        &pass_reason("fragment"),
    );
}

#[test]
fn truncated_and_malformed_headers_fail_closed() {
    let mut h = Harness::default_catalogue("external");
    let t4 = tcp(v4(CLIENT4), 40000, v4(EXT4), 443);
    let t6 = tcp(v6(CLIENT6), 40000, v6(EXT6), 443);
    let u4 = udp(v4(CLIENT4), 40000, v4(EXT4), 3478);
    let u6 = udp(v6(CLIENT6), 40000, v6(EXT6), 3478);
    let mut cases = vec![
        drop_as("Ethernet only, IPv4 type", t4[..14].to_vec(), "malformed"),
        drop_as(
            "VLAN tag cut",
            with_vlans(&t4, &[(0x8100, 1)])[..16].to_vec(),
            "malformed",
        ),
        drop_as("IPv4 header cut", t4[..14 + 19].to_vec(), "malformed"),
        drop_as("IPv6 header cut", t6[..14 + 39].to_vec(), "malformed"),
        drop_as(
            "IPv4 datagram longer than the frame",
            t4[..t4.len() - 1].to_vec(),
            "malformed",
        ),
        drop_as(
            "IPv6 payload longer than the frame",
            t6[..t6.len() - 1].to_vec(),
            "malformed",
        ),
        drop_as("TCP header cut (v4)", ipv4_cut_l4(&t4, 19), "malformed"),
        drop_as("TCP header cut (v6)", ipv6_cut_l4(&t6, 19), "malformed"),
        drop_as("UDP header cut (v4)", ipv4_cut_l4(&u4, 7), "malformed"),
        drop_as("UDP header cut (v6)", ipv6_cut_l4(&u6, 7), "malformed"),
    ];
    let mut doff = t4.clone();
    doff[14 + 20 + 12] = 0x40; // data offset 4 words
    cases.push(drop_as("TCP data offset 4", doff, "malformed"));
    let mut doff6 = t6.clone();
    doff6[14 + 40 + 12] = 0x00;
    cases.push(drop_as("TCP data offset 0 (v6)", doff6, "malformed"));
    let mut ihl = t4.clone();
    ihl[14] = 0x44; // IHL 4
    cases.push(drop_as("IPv4 IHL 4", ihl, "malformed"));
    let mut big_ihl = t4.clone();
    big_ihl[14] = 0x4f; // IHL 15: options would swallow the TCP header
    cases.push(drop_as(
        "IPv4 IHL 15 past the datagram",
        big_ihl,
        "malformed",
    ));
    let mut ver = t4.clone();
    ver[14] = 0x65;
    cases.push(drop_as("IPv4 ethertype, version 6", ver, "malformed"));
    let mut udp_len = u4.clone();
    udp_len[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&4u16.to_be_bytes());
    cases.push(drop_as("UDP length below 8", udp_len, "malformed"));
    // A valid frame followed by Ethernet padding is still classified by its IP length.
    let mut padded = udp(v4(CLIENT4), 40000, v4(EXT4), 3478);
    padded.resize(60.max(padded.len() + 8), 0);
    cases.push(pass_rule(
        "Ethernet padding after a UDP datagram",
        padded,
        "messenger-stun-in",
    ));
    run_cases(&mut h, cases);
}

#[test]
fn link_control_icmp_and_unprotected_traffic() {
    let mut h = Harness::default_catalogue("external");
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&SRC_MAC);
    arp.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&SRC_MAC);
    arp.extend_from_slice(&CLIENT4.octets());
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&EXT4.octets());

    let icmp6 = |dst: Ipv6Addr, ty: u8| {
        let b = etherparse::PacketBuilder::ethernet2(SRC_MAC, DST_MAC)
            .ipv6(CLIENT6.octets(), dst.octets(), 255)
            .icmpv6_raw(ty, 0, [0; 4]);
        let payload = [0u8; 16];
        let mut out = Vec::new();
        b.write(&mut out, &payload).unwrap();
        out
    };
    let icmp4 = |ty: u8, code: u8| {
        let b = etherparse::PacketBuilder::ethernet2(SRC_MAC, DST_MAC)
            .ipv4(CLIENT4.octets(), EXT4.octets(), 64)
            .icmpv4_raw(ty, code, [0; 4]);
        let mut out = Vec::new();
        b.write(&mut out, &[0u8; 28]).unwrap();
        out
    };
    let solicited: Ipv6Addr = "ff02::1:ff00:10".parse().unwrap();
    let mut lldp = vec![0x01, 0x80, 0xc2, 0, 0, 0x0e];
    lldp.extend_from_slice(&SRC_MAC);
    lldp.extend_from_slice(&[0x88, 0xcc]);
    lldp.extend_from_slice(&[0; 46]);
    let cases = vec![
        pass_as("ARP request", arp, "arp"),
        pass_as(
            "neighbour solicitation (multicast)",
            icmp6(solicited, 135),
            "neighbour_discovery",
        ),
        pass_as(
            "neighbour solicitation (unicast)",
            icmp6(EXT6, 135),
            "neighbour_discovery",
        ),
        pass_as(
            "neighbour advertisement",
            icmp6(EXT6, 136),
            "neighbour_discovery",
        ),
        pass_as(
            "router advertisement",
            icmp6(EXT6, 134),
            "neighbour_discovery",
        ),
        pass_as("ICMPv6 packet too big (PMTU)", icmp6(EXT6, 2), "icmp"),
        pass_as("ICMPv6 echo request", icmp6(EXT6, 128), "icmp"),
        drop_as("ICMPv6 type 200", icmp6(EXT6, 200), "icmp"),
        pass_as("ICMP fragmentation needed (PMTU)", icmp4(3, 4), "icmp"),
        pass_as("ICMP echo request", icmp4(8, 0), "icmp"),
        drop_as("ICMP redirect", icmp4(5, 0), "icmp"),
        drop_as("ICMP timestamp", icmp4(13, 0), "icmp"),
        pass_as("non-IP (LLDP)", lldp, "non_ip"),
        pass_as(
            "TCP 22 to an address that is not protected",
            tcp(v4(CLIENT4), 40000, v4(Ipv4Addr::new(198, 51, 100, 99)), 22),
            "unprotected",
        ),
        pass_as(
            "v6 to an address that is not protected",
            tcp(
                v6(CLIENT6),
                40000,
                v6("2001:db8:100::99".parse().unwrap()),
                22,
            ),
            "unprotected",
        ),
        drop_as(
            "GRE to a protected address",
            {
                let mut f = tcp(v4(CLIENT4), 40000, v4(EXT4), 443);
                f[14 + 9] = 47;
                f
            },
            "no_rule",
        ),
    ];
    run_cases(&mut h, cases);
}

#[test]
fn policy_switches_change_the_verdicts() {
    let src = r#"
[policy]
default = "pass"
unprotected = "drop"
non_ip = "drop"
icmp = []
[interfaces]
external = "x"
[sets]
edge = ["198.51.100.10/32"]
[[rule]]
id = "https-in"
protocol = "SIP/TLS"
transport = "tcp"
direction = "inbound"
local = "edge"
remote = "any"
port = "440-450"
interface = "external"
"#;
    let cat = edge_classifier::catalogue::Catalogue::parse("policy.toml", src).unwrap();
    let mut h = Harness::new(&cat, "external");
    let mut lldp = vec![0x01, 0x80, 0xc2, 0, 0, 0x0e];
    lldp.extend_from_slice(&SRC_MAC);
    lldp.extend_from_slice(&[0x88, 0xcc]);
    lldp.extend_from_slice(&[0; 46]);
    let cases = vec![
        pass_rule(
            "range start",
            tcp(v4(CLIENT4), 1, v4(EXT4), 440),
            "https-in",
        ),
        pass_rule("range end", tcp(v4(CLIENT4), 1, v4(EXT4), 450), "https-in"),
        pass_as(
            "monitor mode passes what no rule allows",
            tcp(v4(CLIENT4), 1, v4(EXT4), 451),
            "monitor",
        ),
        drop_as(
            "unprotected = drop",
            tcp(v4(CLIENT4), 1, v4(Ipv4Addr::new(198, 51, 100, 11)), 443),
            "unprotected",
        ),
        drop_as("non_ip = drop", lldp, "non_ip"),
    ];
    run_cases(&mut h, cases);
}

/// Reloads between catalogues whose IPv4 tables go through the stride table and one small
/// enough to scan: each write is a diff against what the buffer held, or a full write when the
/// buffer's stride region is stale. After every flip a P1 frame passes exactly from the running
/// catalogue's partners.
#[test]
fn reloads_rewrite_the_stride_table() {
    use ipnet::IpNet;

    let partners = |nets: Vec<String>| {
        edited_default_catalogue(&[(
            "public_im_partners = [\"203.0.113.0/24\", \"2001:db8:203::/48\"]",
            &format!(
                "public_im_partners = [{}]",
                nets.iter()
                    .map(|n| format!("\"{n}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )])
    };
    let a: Vec<String> = (100..140)
        .map(|i| format!("203.0.{i}.0/24"))
        .chain(["10.1.2.0/25", "10.9.0.0/16"].map(String::from))
        .collect();
    let b: Vec<String> = (100..120)
        .map(|i| format!("203.0.{i}.0/24"))
        .chain(["10.1.2.128/25", "10.1.2.7/32", "172.16.0.0/12"].map(String::from))
        .collect();
    let small = vec!["203.0.113.0/24".to_string()];
    let probes: Vec<Ipv4Addr> = [
        "203.0.100.1",
        "203.0.119.9",
        "203.0.120.9",
        "203.0.139.255",
        "203.0.140.1",
        "203.0.113.5",
        "10.1.2.1",
        "10.1.2.7",
        "10.1.2.127",
        "10.1.2.128",
        "10.1.2.255",
        "10.9.3.4",
        "10.10.0.1",
        "172.16.5.5",
        "172.31.255.255",
        "172.32.0.1",
        "8.8.8.8",
    ]
    .map(|p| p.parse().unwrap())
    .to_vec();
    let check = |h: &mut Harness, nets: &[String], step: &str| {
        let nets: Vec<IpNet> = nets.iter().map(|n| n.parse().unwrap()).collect();
        for &p in &probes {
            let inside = nets.iter().any(|n| n.contains(&IpAddr::V4(p)));
            let want = if inside { XDP_PASS } else { XDP_DROP };
            let got = h.run(&tcp(v4(p), 40000, v4(EXT4), 5061));
            assert_eq!(got, want, "{step}: P1 from {p} (in partners: {inside})");
        }
    };

    let mut h = Harness::new(&partners(a.clone()), "external");
    assert!(
        h.classifier.compiled().stride_v4.is_some(),
        "A uses the stride table"
    );
    check(&mut h, &a, "start with A");
    for (step, nets) in [
        ("A -> B (fresh buffer)", &b),
        ("B -> small (stride region left stale)", &small),
        ("small -> A (diff against B)", &a),
        ("A -> B (full write over the stale region)", &b),
        ("B -> B (nothing to write)", &b),
        ("B -> A", &a),
    ] {
        h.reload(&partners(nets.clone()), step);
        check(&mut h, nets, step);
    }
}

/// Each class an independent oracle found the kernel and the reference agreeing on, wrongly
/// (issue 13): a fixture per class, checked in the kernel and in the reference classifier.
fn expect_both(h: &mut Harness, name: &str, frame: &[u8], action: u32, counted: Expected) {
    expect_both_with(h, &[], name, frame, action, counted)
}

/// The same, with `nic_addrs` configured on the bound NIC (the kernel's table must hold them).
fn expect_both_with(
    h: &mut Harness,
    nic_addrs: &[IpAddr],
    name: &str,
    frame: &[u8],
    action: u32,
    counted: Expected,
) {
    h.expect(name, frame, action, &counted);
    let compiled = h.classifier.compiled().clone();
    let reference = edge_classifier::reference::Reference::new(&compiled)
        .with_nic_addrs(nic_addrs.iter().copied());
    let v = reference.ingress(
        frame,
        compiled.role_mask(&h.binding.role).expect("bound role"),
        &mut edge_classifier::reference::FlowTable::default(),
        0,
    );
    let got = match v.counted {
        edge_classifier::reference::Counted::Rule(slot) => {
            let id = &compiled.rules.iter().find(|r| r.slot == slot).unwrap().id;
            format!("rule {id}")
        }
        edge_classifier::reference::Counted::Reason(r) => {
            let (n, d) = edge_classifier_common::reason::NAMES[r as usize];
            Expected::Reason(n, d).to_string()
        }
    };
    assert_eq!(got, counted.to_string(), "{name}: the reference classifier");
    assert_eq!(
        v.pass,
        action == XDP_PASS,
        "{name}: the reference's verdict"
    );
}

/// An IPv6 frame (Ethernet + fixed header of `tcp(...)`) whose payload length and next header
/// are set by hand and whose bytes after the fixed header are `rest`.
fn ipv6_raw(dst: Ipv6Addr, payload_len: u16, next: u8, rest: &[u8]) -> Vec<u8> {
    let mut f = tcp(v6(PARTNER6), 40000, v6(dst), 5061)[..54].to_vec();
    f[18..20].copy_from_slice(&payload_len.to_be_bytes());
    f[20] = next;
    f.extend_from_slice(rest);
    f
}

#[test]
fn an_ipv6_fragment_header_in_the_padding_is_malformed() {
    // 1. A fragment header with a non-zero offset past the payload length (3 bytes), in the
    // frame's padding: malformed, whatever the fragments policy (it passed as `fragment` under
    // fragments = "pass").
    let frag_in_padding = ipv6_raw(EXT6, 3, 44, &[6, 0, 0x00, 0x10, 0, 0, 0, 1]);
    for fragments in ["drop", "pass"] {
        let mut h = Harness::edited_default(
            "external",
            &[(
                "fragments = \"drop\"",
                &format!("fragments = \"{fragments}\""),
            )],
        );
        expect_both(
            &mut h,
            &format!("fragment header in padding, fragments = {fragments}"),
            &frag_in_padding,
            XDP_DROP,
            drop_reason("malformed"),
        );
    }
}

#[test]
fn ipv6_payload_length_0_is_an_empty_datagram_unless_hop_by_hop_follows() {
    let mut h = Harness::default_catalogue("external");
    // 2. Payload length 0 with a next header other than hop-by-hop is an empty datagram, not a
    // jumbogram: to an address the Edge does not protect it passes as `unprotected`.
    let unprotected = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x99);
    for next in [6u8, 17, 59] {
        expect_both(
            &mut h,
            &format!("payload length 0, next header {next}, unprotected"),
            &ipv6_raw(unprotected, 0, next, &[0; 6]),
            XDP_PASS,
            pass_reason("unprotected"),
        );
    }
    // To the Edge, an empty TCP datagram has no TCP header: malformed. And payload length 0
    // with hop-by-hop next (a jumbogram) fails closed anywhere.
    expect_both(
        &mut h,
        "payload length 0, TCP, protected",
        &ipv6_raw(EXT6, 0, 6, &[0; 6]),
        XDP_DROP,
        drop_reason("malformed"),
    );
    expect_both(
        &mut h,
        "jumbogram (payload length 0, hop-by-hop)",
        &ipv6_raw(unprotected, 0, 0, &[6, 0, 0xc2, 4, 0, 1, 0, 0]),
        XDP_DROP,
        drop_reason("malformed"),
    );
}

#[test]
fn eight_extension_headers_are_walked_and_truncated_icmpv6_is_judged_by_its_destination() {
    let mut h = Harness::default_catalogue("external");
    let unprotected = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x99);
    // The walk bound: eight extension headers are walked, a ninth is one too many.
    let tcp_hdr = tcp(v6(PARTNER6), 40000, v6(EXT6), 5061)[54..].to_vec();
    let exts = |n: usize| {
        let mut rest = Vec::new();
        for i in 0..n {
            let next = if i + 1 == n { 6 } else { 60 };
            // Destination options, 8 bytes: next, length 0, PadN of 4.
            rest.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
        }
        rest.extend_from_slice(&tcp_hdr);
        ipv6_raw(EXT6, rest.len() as u16, 60, &rest)
    };
    expect_both(
        &mut h,
        "8 extension headers",
        &exts(8),
        XDP_PASS,
        Expected::Rule("public-im-sip-in"),
    );
    expect_both(
        &mut h,
        "9 extension headers",
        &exts(9),
        XDP_DROP,
        drop_reason("malformed"),
    );
    // A ninth header is one too many even when it is a later fragment's, which ends the walk
    // (the kernel's last step, meant for the upper-layer header, took it as a fragment).
    let mut rest = Vec::new();
    for i in 0..8 {
        let next = if i == 7 { 44 } else { 60 };
        rest.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
    }
    rest.extend_from_slice(&[6, 0, 0x00, 0x10, 0, 0, 0, 1]);
    rest.extend_from_slice(&tcp_hdr);
    expect_both(
        &mut h,
        "8 extension headers and a later fragment's as the ninth",
        &ipv6_raw(EXT6, rest.len() as u16, 60, &rest),
        XDP_DROP,
        drop_reason("malformed"),
    );

    // A truncated ICMPv6 header to an address the Edge does not protect passes, as a truncated
    // TCP header does; to the Edge it is malformed.
    expect_both(
        &mut h,
        "truncated ICMPv6, unprotected",
        &ipv6_raw(unprotected, 2, 58, &[128, 0, 0, 0, 0, 0]),
        XDP_PASS,
        pass_reason("unprotected"),
    );
    expect_both(
        &mut h,
        "truncated ICMPv6, protected",
        &ipv6_raw(EXT6, 2, 58, &[128, 0, 0, 0, 0, 0]),
        XDP_DROP,
        drop_reason("malformed"),
    );
}

#[test]
fn monitor_mode_passes_replies_without_a_flow() {
    // 3. Monitor mode (default = "pass") drops nothing a rule decides: a reply of an outbound
    // row with no recorded flow passes, counted as `monitor_not_established`.
    let mut h =
        Harness::edited_default("external", &[("default = \"drop\"", "default = \"pass\"")]);
    for (name, frame) in [
        (
            "S1 reply without a flow",
            tcp(v4(PARTNER4), 5061, v4(EXT4), 40000),
        ),
        (
            "to P4's local range without a flow",
            tcp(v4(CLIENT4), 40000, v4(EXT4), 50000),
        ),
        (
            "S1 reply without a flow, IPv6",
            tcp(v6(PARTNER6), 5061, v6(EXT6), 40000),
        ),
    ] {
        expect_both(
            &mut h,
            name,
            &frame,
            XDP_PASS,
            pass_reason("monitor_not_established"),
        );
    }
    // And with default = "drop" the same frames still drop.
    let mut h = Harness::default_catalogue("external");
    expect_both(
        &mut h,
        "S1 reply without a flow, default = drop",
        &tcp(v4(PARTNER4), 5061, v4(EXT4), 40000),
        XDP_DROP,
        drop_reason("not_established"),
    );
}

/// `protect_interface_addresses`: the bound NICs' own addresses (a link-local one, the subnet
/// broadcast) are protected though no set names them; DHCP replies to the client, neighbour
/// discovery and the ICMP policy still reach them. Kernel and reference, with the addresses in
/// `IFACE_ADDRS_V4/V6` as the daemon writes them.
#[test]
fn a_bound_nics_own_addresses_are_protected() {
    let link_local = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0x10);
    let peer_ll = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0x1);
    let global_nic = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x99);
    let broadcast = Ipv4Addr::new(198, 51, 100, 255);
    let nic: std::collections::BTreeMap<IpAddr, u32> =
        [v6(link_local), v6(global_nic), v4(broadcast), v6(EXT6)]
            .into_iter()
            .map(|a| (a, 1))
            .collect();
    let check = |h: &mut Harness, cases: Vec<Case>| {
        h.classifier
            .maps_mut()
            .set_iface_addrs(&nic)
            .expect("IFACE_ADDRS");
        let addrs: Vec<IpAddr> = nic.keys().copied().collect();
        for (name, frame, action, counted) in cases {
            expect_both_with(h, &addrs, name, &frame, action, counted);
        }
    };
    let mut nd = tcp(v6(peer_ll), 1, v6(link_local), 2);
    // An ICMPv6 neighbour solicitation in place of the TCP header (type 135).
    nd[20] = 58;
    nd[54..58].copy_from_slice(&[135, 0, 0, 0]);
    let mut echo = nd.clone();
    echo[54] = 128;
    let mut h = Harness::default_catalogue("external");
    check(
        &mut h,
        vec![
            drop_as(
                "TCP 22 to the NIC's link-local address",
                tcp(v6(peer_ll), 40000, v6(link_local), 22),
                "no_rule",
            ),
            drop_as(
                "TCP 22 to an address added to the NIC",
                tcp(v6(CLIENT6), 40000, v6(global_nic), 22),
                "no_rule",
            ),
            drop_as(
                "TCP 22 to the IPv4 subnet broadcast",
                tcp(v4(CLIENT4), 40000, v4(broadcast), 22),
                "no_rule",
            ),
            pass_as(
                "DHCPv6 reply to the client on link-local",
                udp(v6(peer_ll), 547, v6(link_local), 546),
                "dhcp_client",
            ),
            drop_as(
                "DHCPv6 ports to a global NIC address",
                udp(v6(CLIENT6), 547, v6(global_nic), 546),
                "no_rule",
            ),
            pass_as(
                "DHCPv4 reply to the broadcast address",
                udp(v4(CLIENT4), 67, v4(broadcast), 68),
                "dhcp_client",
            ),
            drop_as(
                "UDP 547 -> 546 to the Edge's catalogue address needs a rule",
                udp(v6(PARTNER6), 547, v6(EXT6), 546),
                "no_rule",
            ),
            pass_as("neighbour solicitation", nd, "neighbour_discovery"),
            pass_as("ping to the link-local address", echo, "icmp"),
            pass_rule(
                "P1 to the catalogue address, also a NIC address",
                tcp(v6(PARTNER6), 40000, v6(EXT6), 5061),
                "public-im-sip-in",
            ),
            pass_as(
                "another host's address on the link stays unprotected",
                tcp(
                    v6(peer_ll),
                    40000,
                    v6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0x77)),
                    22,
                ),
                "unprotected",
            ),
        ],
    );
    // Turned off, the NIC's own addresses are as unprotected as any other.
    let mut h = Harness::edited_default(
        "external",
        &[(
            "protect_interface_addresses = true",
            "protect_interface_addresses = false",
        )],
    );
    check(
        &mut h,
        vec![pass_as(
            "TCP 22 to link-local, protection off",
            tcp(v6(peer_ll), 40000, v6(link_local), 22),
            "unprotected",
        )],
    );
}
