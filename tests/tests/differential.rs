//! The kernel program against the reference classifier, frame by frame: the same verdict and
//! the same counter for every frame. Structured frames near every rule boundary, then mutations
//! of them (VLAN stacks, IPv6 extension chains, fragments, bad IHL and data offsets,
//! truncations at every offset, corrupted bytes, random bytes); adversarial generators
//! (lengths that disagree with the bytes, headers in the padding, every extension-header order
//! and count, fragment headers anywhere); and a stateful run (the TC egress program records
//! flows, replies come back, the clock moves past and short of every timeout, FIN and RST
//! close flows) on an external and an internal NIC. At least 50,000 frames per run;
//! `EC_DIFF_FRAMES=5000000` (or `cargo xtask test --long`) for a long run, and `EC_DIFF_SEED=N`
//! for frames no run with the fixed seeds makes. A disagreement is written to
//! `tests/fixtures/differential/` as a pcap, where `fixtures_still_agree` keeps it.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use edge_classifier::{
    capture,
    reference::{Counted as RefCounted, FlowTable, Reference},
};
use edge_classifier_common::{
    FLOW_FIN_IN, FLOW_FIN_OUT, FLOW_RST, FlowKey, FlowState, TRANSPORT_TCP, TRANSPORT_UDP, reason,
};
use edge_classifier_tests::*;
use etherparse::{IpNumber, Ipv4Header, PacketBuilder};

// The lab's addresses: the Edge, and a client in no set.
const EXT4: Ipv4Addr = edge_classifier_lab::v4_of(edge_classifier_lab::EDGE_EXT_V4);
const EXT6: Ipv6Addr = edge_classifier_lab::v6_of(edge_classifier_lab::EDGE_EXT_V6);
const PEER4: Ipv4Addr = edge_classifier_lab::v4_of(edge_classifier_lab::CLIENT_V4);
const PEER6: Ipv6Addr = edge_classifier_lab::v6_of(edge_classifier_lab::CLIENT_V6);

/// Flows recorded in both the kernel table and the reference table before the run; their
/// last-seen time is far in the future so that they never idle out during it.
const FAR_FUTURE: u64 = u64::MAX / 4;

/// A generator seeded with `default`, which CI always uses (a run is repeatable), or, with
/// `EC_DIFF_SEED=N`, with `default` mixed with N: a run over frames no earlier run made.
fn seeded(default: u64) -> Rng {
    let extra: u64 = std::env::var("EC_DIFF_SEED")
        .ok()
        .map(|s| {
            s.parse()
                .unwrap_or_else(|e| panic!("EC_DIFF_SEED={s}: not a number ({e})"))
        })
        .unwrap_or(0);
    // An xorshift state of 0 stays 0.
    Rng((default ^ extra.wrapping_mul(0x9e37_79b9_7f4a_7c15)).max(1))
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/differential")
}

fn ip(a: &str) -> IpAddr {
    a.parse().unwrap()
}

/// Addresses inside and outside every set of the default catalogue, by family.
fn addresses() -> [Vec<IpAddr>; 2] {
    [
        [
            "198.51.100.10",
            "192.0.2.10",
            "203.0.113.5",
            "203.0.113.0",
            "203.0.113.255",
            "203.0.114.1",
            "203.0.112.255",
            "198.51.100.1",
            "198.51.100.11",
            "192.0.2.20",
            "10.0.0.1",
            "0.0.0.0",
            "255.255.255.255",
        ]
        .map(ip)
        .to_vec(),
        [
            "2001:db8:100::10",
            "2001:db8:200::10",
            "2001:db8:203::5",
            "2001:db8:203:ffff::1",
            "2001:db8:204::1",
            "2001:db8:202:ffff::1",
            "2001:db8:100::1",
            "2001:db8:100::11",
            "::1",
            "ff02::1",
        ]
        .map(ip)
        .to_vec(),
    ]
}

/// Each seed port and its neighbours, the media range's ends and neighbours, extremes.
fn ports() -> Vec<u16> {
    let mut v = vec![0, 1, 22, 7000, 40000, 41000, 42000, 50010, 65535];
    for p in [443u16, 5061, 5269, 3478, 23456, 50000, 59999] {
        v.extend([p - 1, p, p + 1]);
    }
    v
}

/// The seeded flows' (Edge port, peer port, transport, rule), in each family between the Edge
/// and the peer.
const SEEDED: [(u16, u16, u32, &str); 4] = [
    (41000, 5061, TRANSPORT_TCP, "sip-federation-out"),
    (41000, 5269, TRANSPORT_TCP, "xmpp-federation-out"),
    (50010, 7000, TRANSPORT_TCP, "messenger-rtp-tcp-out"),
    (42000, 3478, TRANSPORT_UDP, "messenger-stun-out"),
];

/// (Edge, peer) in each family.
const PAIRS: [(IpAddr, IpAddr); 2] = [
    (IpAddr::V4(EXT4), IpAddr::V4(PEER4)),
    (IpAddr::V6(EXT6), IpAddr::V6(PEER6)),
];

fn flows_seeded() -> Vec<(FlowKey, &'static str)> {
    let mut out = Vec::new();
    for (l, r) in PAIRS {
        for (lp, rp, t, rule) in SEEDED {
            let mut k = FlowKey {
                local_port: lp,
                remote_port: rp,
                transport: t as u8,
                ..FlowKey::default()
            };
            match (l, r) {
                (IpAddr::V4(l), IpAddr::V4(r)) => {
                    k.family = 4;
                    k.local[..4].copy_from_slice(&l.octets());
                    k.remote[..4].copy_from_slice(&r.octets());
                }
                (IpAddr::V6(l), IpAddr::V6(r)) => {
                    k.family = 6;
                    k.local = l.octets();
                    k.remote = r.octets();
                }
                _ => unreachable!(),
            }
            out.push((k, rule));
        }
    }
    out
}

/// Structured frames: every transport, family, destination, source and port combination.
fn structured(rng: &mut Rng) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let ports = ports();
    let [a4, a6] = addresses();
    for addrs in [&a4, &a6] {
        for &dst in addrs.iter().take(3).chain([&addrs[7]]) {
            for &src in addrs {
                if src == dst {
                    continue;
                }
                for &dport in &ports {
                    let sport = *rng.pick(&ports);
                    let flags = *rng.pick(&[SYN, ACK, SYN | ACK, FIN | ACK, RST, RST | ACK, 0]);
                    out.push(tcp_segment(src, sport, dst, dport, flags));
                    out.push(udp(src, sport, dst, dport));
                    // Replies to the seeded flows and their near misses.
                    let (rs, rd) = (
                        *rng.pick(&[5061u16, 5269, 7000, 3478, 5062]),
                        *rng.pick(&[41000u16, 50010, 42000, 41001]),
                    );
                    out.push(tcp_segment(src, rs, dst, rd, flags));
                    out.push(udp(src, rs, dst, rd));
                }
            }
        }
    }
    // A reply to each seeded flow, whatever the seed picked above: the mutations start from
    // every outbound rule's counter.
    for (edge, peer) in PAIRS {
        for (lp, rp, t, _) in SEEDED {
            out.push(if t == TRANSPORT_TCP {
                tcp_segment(peer, rp, edge, lp, ACK)
            } else {
                udp(peer, rp, edge, lp)
            });
        }
    }
    // First fragments whose L4 header is cut short, with consistent IP lengths.
    for n in 0..20 {
        let mut f = ipv4_cut_l4(&tcp_segment(a4[2], 40000, a4[0], 5061, SYN), n);
        ipv4_set_frag(&mut f, true, 0);
        out.push(f);
        let mut f = ipv4_cut_l4(&udp(a4[7], 40000, a4[0], 3478), n.min(12));
        ipv4_set_frag(&mut f, true, 0);
        out.push(f);
    }
    // ICMP of every type, both families, to a protected address.
    for ty in 0..=255u8 {
        let b = PacketBuilder::ethernet2(SRC_MAC, DST_MAC)
            .ipv4([203, 0, 113, 5], EXT4.octets(), 64)
            .icmpv4_raw(ty, 0, [0; 4]);
        let mut f = Vec::new();
        b.write(&mut f, b"x").unwrap();
        out.push(f);
        let b = PacketBuilder::ethernet2(SRC_MAC, DST_MAC)
            .ipv6(PEER6.octets(), EXT6.octets(), 64)
            .icmpv6_raw(ty, 0, [0; 4]);
        let mut f = Vec::new();
        b.write(&mut f, b"x").unwrap();
        out.push(f);
    }
    out
}

const L3: usize = 14;

/// One random mutation of a structured frame.
fn mutate(rng: &mut Rng, base: &[u8]) -> Vec<u8> {
    let mut f = base.to_vec();
    let is_v4 = f.len() > L3 && f[12..14] == [0x08, 0x00];
    let is_v6 = f.len() > L3 && f[12..14] == [0x86, 0xdd];
    match rng.below(11) {
        // VLAN stacks of 1 to 3 tags with either TPID (or a stray one).
        0 => {
            let n = 1 + rng.below(3);
            let tags: Vec<(u16, u16)> = (0..n)
                .map(|_| {
                    (
                        *rng.pick(&[0x8100u16, 0x88a8, 0x9100]),
                        rng.next_u64() as u16 & 0x0fff,
                    )
                })
                .collect();
            f = with_vlans(&f, &tags);
        }
        // Truncation at a random offset (past the Ethernet header).
        1 => {
            let cut = L3 + rng.below(f.len() - L3 + 1);
            f.truncate(cut.max(L3));
        }
        // 1 to 3 corrupted bytes anywhere in the headers.
        2 => {
            for _ in 0..1 + rng.below(3) {
                let i = rng.below(f.len().min(80));
                f[i] = rng.next_u64() as u8;
            }
        }
        // IPv4: IHL nibble, flags/fragment offset, total length.
        3 if is_v4 => f[L3] = 0x40 | (rng.next_u64() as u8 & 0x0f),
        4 if is_v4 => {
            let v = rng.next_u64() as u16 & *rng.pick(&[0x3fffu16, 0x2000, 0x1fff, 0x0001]);
            f[L3 + 6..L3 + 8].copy_from_slice(&v.to_be_bytes());
        }
        5 if is_v4 || is_v6 => {
            let at = if is_v4 { L3 + 2 } else { L3 + 4 };
            let v = u16::from_be_bytes([f[at], f[at + 1]]);
            let nv = match rng.below(3) {
                0 => v.wrapping_add(1 + rng.below(8) as u16),
                1 => v.saturating_sub(1 + rng.below(8) as u16),
                _ => rng.next_u64() as u16,
            };
            f[at..at + 2].copy_from_slice(&nv.to_be_bytes());
        }
        // TCP data offset (IPv4 without options, IPv6 without extensions).
        6 if (is_v4 || is_v6) => {
            let l4 = if is_v4 { L3 + 20 } else { L3 + 40 };
            if f.len() > l4 + 12 {
                f[l4 + 12] = (rng.next_u64() as u8) & 0xf0;
            }
        }
        // IPv6: a random chain of extension headers before the L4 header.
        7 if is_v6 => f = with_ipv6_exts(rng, &f),
        // Ethernet padding after the datagram.
        8 => f.extend(std::iter::repeat_n(0u8, 1 + rng.below(40))),
        // IPv4 options of random length.
        9 if is_v4 => {
            let n = 4 * (1 + rng.below(10));
            let mut h = Ipv4Header::new(0, 64, IpNumber(f[L3 + 9]), [0; 4], [0; 4]).unwrap();
            h.source.copy_from_slice(&f[L3 + 12..L3 + 16]);
            h.destination.copy_from_slice(&f[L3 + 16..L3 + 20]);
            h.options = (&vec![1u8; n][..]).try_into().unwrap();
            h.total_len = (u16::from_be_bytes([f[L3 + 2], f[L3 + 3]]) as usize + n) as u16;
            let mut out = f[..L3].to_vec();
            h.write(&mut out).unwrap();
            out.extend_from_slice(&f[L3 + 20..]);
            f = out;
        }
        // Random bytes behind a chosen ethertype.
        _ => {
            let len = L3 + rng.below(120);
            f = (0..len).map(|_| rng.next_u64() as u8).collect();
            let et: [u8; 2] = *rng.pick(&[
                [0x08u8, 0x00],
                [0x86, 0xdd],
                [0x81, 0x00],
                [0x08, 0x06],
                [0x88, 0xcc],
            ]);
            f[12..14].copy_from_slice(&et);
            if f.len() > L3 && et == [0x08, 0x00] {
                f[L3] = 0x45;
            }
            if f.len() > L3 && et == [0x86, 0xdd] {
                f[L3] = 0x60;
            }
        }
    }
    f
}

/// Inserts 1–9 IPv6 extension headers (hop-by-hop, routing, destination options, fragment,
/// AH) of random sizes between the fixed header and the upper-layer header.
fn with_ipv6_exts(rng: &mut Rng, f: &[u8]) -> Vec<u8> {
    if f.len() < L3 + 40 {
        return f.to_vec();
    }
    let n = 1 + rng.below(9);
    let mut next = f[L3 + 6];
    let mut exts: Vec<Vec<u8>> = Vec::new();
    for _ in 0..n {
        let ty = *rng.pick(&[0u8, 43, 60, 44, 51]);
        let h = match ty {
            44 => {
                let off = *rng.pick(&[0u16, 0, 1, 8, 185]);
                let m = rng.below(2) as u16;
                let v = (off << 3) | m;
                vec![next, 0, (v >> 8) as u8, v as u8, 1, 2, 3, 4]
            }
            51 => {
                let len = rng.below(4) as u8;
                let mut h = vec![next, len];
                h.resize((len as usize + 2) * 4, 0);
                h
            }
            _ => {
                let len = rng.below(3) as u8;
                let mut h = vec![next, len];
                h.resize((len as usize + 1) * 8, 0);
                h
            }
        };
        exts.push(h);
        next = ty;
    }
    exts.reverse();
    let mut out = f[..L3 + 40].to_vec();
    out[L3 + 6] = next;
    let added: usize = exts.iter().map(Vec::len).sum();
    let payload = u16::from_be_bytes([f[L3 + 4], f[L3 + 5]]) as usize + added;
    out[L3 + 4..L3 + 6].copy_from_slice(&(payload as u16).to_be_bytes());
    for e in exts {
        out.extend(e);
    }
    out.extend_from_slice(&f[L3 + 40..]);
    out
}

struct Checker {
    /// Counters the kernel moved, over the run: the coverage of the frame set.
    seen: std::collections::BTreeSet<String>,
    h: Harness,
    compiled: &'static edge_classifier::compile::Compiled,
    reference: Reference<'static>,
    flows: FlowTable,
    role_mask: u32,
    last: edge_classifier::maps::IfaceStats,
    checked: u64,
    disagreements: Vec<(Vec<u8>, String)>,
}

impl Checker {
    fn new() -> Checker {
        Checker::with(Harness::default_catalogue("external"))
    }

    fn with(h: Harness) -> Checker {
        Checker::on(h, "external", true)
    }

    /// A checker for a harness bound to `role`, with the seeded never-expiring flows or none.
    fn on(mut h: Harness, role: &str, seed: bool) -> Checker {
        // The reference lives as long as the test process.
        let compiled: &'static _ = Box::leak(Box::new(h.classifier.compiled().clone()));
        let role_mask = compiled.role_mask(role).unwrap();
        let mut flows = FlowTable::default();
        for (key, id) in flows_seeded().into_iter().filter(|_| seed) {
            let rule = compiled.rules.iter().find(|r| r.id == id).expect(id);
            let state = FlowState {
                last_seen: FAR_FUTURE,
                slot: rule.slot,
                flags: 0,
                role_mask,
                _pad: 0,
            };
            h.classifier
                .maps_mut()
                .insert_flow(&key, &state)
                .expect("seed flow");
            flows.flows.insert(key, state);
        }
        let last = h.stats();
        Checker {
            seen: Default::default(),
            h,
            compiled,
            reference: Reference::new(compiled),
            flows,
            role_mask,
            last,
            checked: 0,
            disagreements: Vec::new(),
        }
    }

    fn check(&mut self, frame: &[u8]) {
        self.check_dir(Dir::In, frame, 0)
    }

    /// One frame through the kernel program of `dir` and the reference at clock `now` (the
    /// kernel's jiffies; 0 where no flow can expire).
    fn check_dir(&mut self, dir: Dir, frame: &[u8], now: u64) {
        if frame.len() < 14 {
            return;
        }
        let compiled = self.compiled;
        let want = match dir {
            Dir::In => self
                .reference
                .ingress(frame, self.role_mask, &mut self.flows, now),
            Dir::Out => self
                .reference
                .egress(frame, self.role_mask, &mut self.flows, now),
        };
        let got = self.h.run_dir(dir, frame);
        let now = self.h.stats();
        let mut moved = Vec::new();
        for (i, (b, a)) in self.last.reasons.iter().zip(&now.reasons).enumerate() {
            if a.packets != b.packets {
                moved.push(RefCounted::Reason(i as u32));
            }
        }
        for (i, (b, a)) in self.last.rules.iter().zip(&now.rules).enumerate() {
            if a.packets != b.packets {
                moved.push(RefCounted::Rule(compiled.rules[i].slot));
            }
        }
        self.last = now;
        self.checked += 1;
        let got_pass = match dir {
            Dir::In => got == XDP_PASS,
            Dir::Out => got == TC_NEXT,
        };
        let name = |c: &RefCounted| match c {
            RefCounted::Rule(s) => format!(
                "rule {}",
                compiled
                    .rules
                    .iter()
                    .find(|r| r.slot == *s)
                    .map_or("?", |r| &r.id)
            ),
            RefCounted::Reason(r) => {
                let (n, d) = reason::NAMES[*r as usize];
                format!("{} {n}", if d { "drop" } else { "pass" })
            }
        };
        for m in &moved {
            self.seen.insert(name(m));
        }
        if got_pass != want.pass || moved != [want.counted] {
            self.disagreements.push((
                frame.to_vec(),
                format!(
                    "kernel {} {:?}, reference {} {}: {}",
                    if got_pass { "PASS" } else { "DROP" },
                    moved.iter().map(name).collect::<Vec<_>>(),
                    if want.pass { "PASS" } else { "DROP" },
                    name(&want.counted),
                    hex(frame)
                ),
            ));
        }
    }

    /// After a stateful step: the live flows of the kernel's tables and the reference's agree
    /// on slot, TCP flags and role. The clock is not what is compared (the kernel stamps its own
    /// tick), so the reference takes the kernel's `last_seen` for each flow afterwards.
    fn compare_flow_tables(&mut self, now: u64) {
        let policy = self.compiled.policy;
        let live = |k: &FlowKey, st: &FlowState| {
            let timeout = if k.transport as u32 != TRANSPORT_TCP {
                policy.udp_idle_ticks
            } else if st.flags & FLOW_RST != 0
                || st.flags & (FLOW_FIN_IN | FLOW_FIN_OUT) == FLOW_FIN_IN | FLOW_FIN_OUT
            {
                policy.tcp_closing_ticks
            } else {
                policy.tcp_idle_ticks
            };
            // A margin of a few ticks either side of the timeout: which tick each side read
            // may differ there.
            now.saturating_sub(st.last_seen) + 3 < timeout
        };
        let kernel: std::collections::BTreeMap<String, (FlowKey, FlowState)> = self
            .h
            .classifier
            .maps()
            .flows()
            .expect("kernel flows")
            .into_iter()
            .filter(|f| live(&f.key, &f.state))
            .map(|f| (format!("{:?}", f.key), (f.key, f.state)))
            .collect();
        let reference: std::collections::BTreeMap<String, FlowState> = self
            .flows
            .flows
            .iter()
            .filter(|(k, st)| live(k, st))
            .map(|(k, st)| (format!("{k:?}"), *st))
            .collect();
        for (name, (key, kst)) in &kernel {
            match reference.get(name) {
                Some(rst)
                    if rst.slot == kst.slot
                        && rst.flags == kst.flags
                        && rst.role_mask == kst.role_mask => {}
                other => self.disagreements.push((
                    Vec::new(),
                    format!("flow {name}: kernel {kst:?}, reference {other:?}"),
                )),
            }
            if let Some(r) = self.flows.flows.get_mut(key) {
                r.last_seen = kst.last_seen;
            }
        }
        for name in reference.keys().filter(|n| !kernel.contains_key(*n)) {
            self.disagreements.push((
                Vec::new(),
                format!("flow {name}: only the reference holds it"),
            ));
        }
    }

    /// Saves disagreements as a pcap fixture and fails with the first few.
    fn finish(self, what: &str) -> u64 {
        if !self.disagreements.is_empty() {
            std::fs::create_dir_all(fixtures()).unwrap();
            let path = fixtures().join(format!("{what}-{}.pcap", std::process::id()));
            // Flow-table disagreements carry no frame: the frames before them are the story.
            capture::write_pcap(
                &path,
                self.disagreements
                    .iter()
                    .map(|(f, _)| f.as_slice())
                    .filter(|f| !f.is_empty()),
            )
            .unwrap();
            let first: Vec<&str> = self
                .disagreements
                .iter()
                .take(5)
                .map(|(_, m)| m.as_str())
                .collect();
            panic!(
                "{} of {} frames disagree (saved to {}):\n{}",
                self.disagreements.len(),
                self.checked,
                path.display(),
                first.join("\n")
            );
        }
        self.checked
    }
}

/// The default catalogue with more IPv4 and IPv6 prefixes than the small tables hold (nested
/// and overlapping ones among them): IPv4 addresses go through the stride table, IPv6 ones
/// through the trie. With `outgrow_stride`, 4,100 host prefixes in distinct /16s need more
/// stride blocks than a buffer has, so IPv4 goes through its trie as well.
fn large_catalogue(outgrow_stride: bool) -> Harness {
    let hosts = if outgrow_stride { 4100 } else { 0 };
    let mut partners: Vec<String> = (0..40u32)
        .map(|i| format!("\"203.0.{}.0/24\"", 100 + i))
        .chain((0..12u32).map(|i| format!("\"2001:db8:{:x}::/48\"", 0x210 + i)))
        .chain((0..hosts).map(|i| format!("\"{}.{}.0.1/32\"", 11 + i / 256, i % 256)))
        .collect();
    partners.extend(
        [
            "\"203.0.113.0/25\"",
            "\"203.0.113.4/30\"",
            "\"198.51.100.0/28\"",
            "\"2001:db8:203::/48\"",
            "\"2001:db8:203:ffff::/64\"",
            "\"2001:db8:100::/120\"",
            "\"2001:db8:200::/47\"",
        ]
        .map(String::from),
    );
    Harness::edited_default(
        "external",
        &[(
            "public_im_partners = [\"203.0.113.0/24\", \"2001:db8:203::/48\"]",
            &format!("public_im_partners = [{}]", partners.join(", ")),
        )],
    )
}

/// The structured frames, then mutations of them until `c` has checked `until` frames.
fn structured_then_mutated(c: &mut Checker, seed: u64, until: u64) {
    let mut rng = seeded(seed);
    let base = structured(&mut rng);
    for f in &base {
        c.check(f);
    }
    while c.checked < until {
        let i = rng.below(base.len());
        let f = mutate(&mut rng, &base[i]);
        c.check(&f);
    }
}

fn agree_with_large(mut c: Checker, seed: u64, name: &str) {
    structured_then_mutated(&mut c, seed, 20_000);
    c.finish(name);
}

/// Limits on new flows: the kernel's token buckets and admitted UDP flows against the
/// reference's, frame by frame. One flow an hour refills nothing within the run, so the buckets'
/// contents do not depend on the clock the reference is given: bursts, the total after the
/// source's budget, /24 and /48 source prefixes, exempt partners, partners with a budget of
/// their own, admitted UDP flows.
#[test]
fn kernel_and_reference_agree_on_limits() {
    let h = Harness::edited_default(
        "external",
        &[
            (
                "id = \"client-sip-tls-in\"",
                "id = \"client-sip-tls-in\"\nlimit = { per_source = \"1/h\", burst = 3, total = \"1/h\", total_burst = 40 }",
            ),
            (
                "id = \"messenger-stun-in\"",
                "id = \"messenger-stun-in\"\nlimit = { per_source = \"1/h\", burst = 2, prefix_v4 = 24, prefix_v6 = 48, exempt = [\"public_im_partners\"] }",
            ),
            (
                "id = \"xmpp-federation-in\"",
                "id = \"xmpp-federation-in\"\nlimit = { total = \"1/h\", total_burst = 25, own_budget = { sets = [\"public_im_partners\"], rate = \"1/h\", burst = 4 } }",
            ),
        ],
    );
    let mut c = Checker::with(h);
    // Each source past its burst, then the segments of connections that are not new flows
    // (they must pass), and UDP flows admitted and new.
    let [a4, a6] = addresses();
    for (src, dst) in [
        (a4[2], a4[0]),
        (a4[9], a4[0]),
        (a6[2], a6[0]),
        (a6[7], a6[0]),
    ] {
        for port in 0..5 {
            c.check(&tcp_segment(src, 40000 + port, dst, 443, SYN));
        }
        for flags in [SYN | ACK, ACK, FIN | ACK, RST, RST | ACK] {
            c.check(&tcp_segment(src, 40000, dst, 443, flags));
        }
        for sport in [50000, 50000, 50001, 50000, 50002, 50001] {
            c.check(&udp(src, sport, dst, 3478));
        }
        for port in 0..6 {
            c.check(&tcp_segment(src, 41000 + port, dst, 5269, SYN));
        }
    }
    structured_then_mutated(&mut c, 0x0bad_cafe_f00d_0020, 20_000);
    let seen = c.seen.clone();
    c.finish("limits");
    for want in [
        "drop rate_limited",
        "rule client-sip-tls-in",
        "rule messenger-stun-in",
        "rule xmpp-federation-in",
    ] {
        assert!(seen.contains(want), "no frame reached `{want}`: {seen:?}");
    }
}

#[test]
fn kernel_and_reference_agree_with_a_large_catalogue() {
    let c = Checker::with(large_catalogue(false));
    let (v4, v6) = (&c.compiled.small_v4, &c.compiled.small_v6);
    assert!(
        v4.complete == 0 && v4.stride == 1 && c.compiled.stride_v4.is_some(),
        "the stride table must answer IPv4 here"
    );
    assert_eq!(v6.complete, 0, "the IPv6 trie must answer here");
    agree_with_large(c, 0x0bad_cafe_f00d_0001, "large");
}

#[test]
fn kernel_and_reference_agree_when_the_stride_table_is_outgrown() {
    let c = Checker::with(large_catalogue(true));
    let v4 = &c.compiled.small_v4;
    assert!(
        v4.complete == 0 && v4.stride == 0 && c.compiled.stride_v4.is_none(),
        "the IPv4 trie must answer here"
    );
    agree_with_large(c, 0x0bad_cafe_f00d_0002, "trie");
}

#[test]
fn kernel_and_reference_agree_on_every_frame() {
    let target: u64 = std::env::var("EC_DIFF_FRAMES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50_000);
    let mut rng = seeded(0x005e_ed0f_ed9e_c1a5);
    let mut c = Checker::new();
    assert!(
        c.compiled.small_v4.complete == 1 && c.compiled.small_v6.complete == 1,
        "the small tables answer here"
    );
    let started = std::time::Instant::now();
    let base = structured(&mut rng);
    for f in &base {
        c.check(f);
    }
    // Truncations at every byte offset of a few representative frames.
    let [a4, a6] = addresses();
    let reps = [
        tcp_segment(a4[2], 40000, a4[0], 5061, SYN),
        udp(a6[7], 3478, a6[0], 42000),
        with_vlans(
            &tcp_segment(a4[7], 5061, a4[0], 41000, ACK),
            &[(0x88a8, 1), (0x8100, 2)],
        ),
        with_ipv6_exts(&mut Rng(7), &tcp_segment(a6[2], 40000, a6[0], 5061, SYN)),
    ];
    for f in &reps {
        for cut in 14..=f.len() {
            c.check(&f[..cut]);
        }
    }
    while c.checked < target {
        let i = rng.below(base.len());
        let f = mutate(&mut rng, &base[i]);
        c.check(&f);
    }
    let elapsed = started.elapsed();
    let seen = c.seen.clone();
    let n = c.finish("random");
    // The frame set reaches every counter an external NIC can move.
    for want in [
        "rule public-im-sip-in",
        "rule client-sip-tls-in",
        "rule messenger-stun-in",
        "rule xmpp-federation-in",
        "rule sip-federation-out",
        "rule xmpp-federation-out",
        "rule messenger-rtp-tcp-out",
        "rule messenger-stun-out",
        "pass arp",
        "pass neighbour_discovery",
        "pass icmp",
        "pass unprotected",
        "pass non_ip",
        "drop no_rule",
        "drop fragment",
        "drop short_fragment",
        "drop malformed",
        "drop not_established",
        "drop icmp",
    ] {
        assert!(seen.contains(want), "no frame reached `{want}`: {seen:?}");
    }
    eprintln!(
        "{n} frames: kernel and reference agree ({:.0} frames/s)",
        n as f64 / elapsed.as_secs_f64()
    );
    assert!(n >= target);
}

/// Every pcap under tests/fixtures/differential: the hand-made hostile seed, and any frame a
/// run once found the two disagreeing on.
/// Frames at the edges of the data plane's fixed-offset read of the common frame (untagged or
/// one VLAN tag, IPv4 without options, IPv6 without extension headers, TCP or UDP, not
/// fragmented) and the full parser it falls back to: IHL 5 and 6, no fragment, a first and a
/// later fragment, DF and the reserved bit, no tag, one tag of either TPID, two tags, each IPv6
/// next header, every TCP data offset, UDP lengths around the datagram's, IP lengths short of,
/// equal to and past the frame, Ethernet padding, and cuts at every byte around the headers.
fn fast_path_edges(rng: &mut Rng) -> Vec<Vec<u8>> {
    let [a4, a6] = addresses();
    let ports = ports();
    let mut out = Vec::new();
    for _ in 0..400 {
        let v6 = rng.chance(2);
        let addrs = if v6 { &a6 } else { &a4 };
        let (src, dst) = (*rng.pick(addrs), *rng.pick(&addrs[..3]));
        let (sport, dport) = (*rng.pick(&ports), *rng.pick(&ports));
        let mut f = if rng.chance(2) {
            tcp_segment(
                src,
                sport,
                dst,
                dport,
                *rng.pick(&[SYN, ACK, FIN | ACK, RST]),
            )
        } else {
            udp(src, sport, dst, dport)
        };
        let l4 = if v6 { L3 + 40 } else { L3 + 20 };
        match rng.below(9) {
            // IPv4 with one option word (IHL 6): the full parser's frame.
            0 if !v6 => {
                f.splice(L3 + 20..L3 + 20, [1u8, 1, 1, 0]);
                f[L3] = 0x46;
                let total = u16::from_be_bytes([f[L3 + 2], f[L3 + 3]]) + 4;
                f[L3 + 2..L3 + 4].copy_from_slice(&total.to_be_bytes());
            }
            // Fragment field: MF, an offset, DF, the reserved bit, or combinations.
            1 if !v6 => {
                let v = *rng.pick(&[0x2000u16, 0x0001, 0x2001, 0x4000, 0x8000, 0x6000, 0x1fff]);
                f[L3 + 6..L3 + 8].copy_from_slice(&v.to_be_bytes());
            }
            // Each next header in place of TCP/UDP, the payload left as it is.
            1 => f[L3 + 6] = *rng.pick(&[0u8, 43, 44, 50, 51, 58, 59, 60, 135, 6, 17]),
            // The TCP data offset, every value.
            2 if f[if v6 { L3 + 6 } else { L3 + 9 }] == 6 => {
                f[l4 + 12] = (rng.below(16) as u8) << 4;
            }
            // The UDP length around the datagram's.
            2 => {
                let n = (f.len() - l4) as i32 + rng.below(5) as i32 - 2;
                let n = if rng.chance(4) {
                    rng.below(9) as i32
                } else {
                    n
                };
                f[l4 + 4..l4 + 6].copy_from_slice(&(n.max(0) as u16).to_be_bytes());
            }
            // The IP length short of, at and past the frame's end.
            3 => {
                let (at, base) = if v6 {
                    (L3 + 4, f.len() - L3 - 40)
                } else {
                    (L3 + 2, f.len() - L3)
                };
                let n = (base as i32 + rng.below(9) as i32 - 4).max(0) as u16;
                f[at..at + 2].copy_from_slice(&n.to_be_bytes());
            }
            // Ethernet padding after the datagram.
            4 => f.extend(std::iter::repeat_n(0u8, 1 + rng.below(30))),
            // Cut at any byte up to the end of the L4 header.
            5 => f.truncate(rng.below(l4 + 21).max(1)),
            // The version nibble.
            6 => f[L3] = (f[L3] & 0x0f) | ((rng.below(16) as u8) << 4),
            _ => {}
        }
        // VLAN tags: none, one of either TPID, or two.
        out.push(match if f.len() < L3 { 3 } else { rng.below(4) } {
            0 => with_vlans(&f, &[(0x8100, 100)]),
            1 => with_vlans(&f, &[(0x88a8, 200)]),
            2 => with_vlans(&f, &[(0x88a8, 200), (0x8100, 100)]),
            _ => f,
        });
    }
    out
}

#[test]
fn kernel_and_reference_agree_at_the_fast_paths_edges() {
    let mut rng = seeded(0xfa57_0ed9_e000_0018);
    let mut c = Checker::new();
    while c.checked < 20_000 {
        for f in fast_path_edges(&mut rng) {
            c.check(&f);
        }
    }
    c.finish("fast path edges");
}

#[test]
fn fixtures_still_agree() {
    let dir = std::fs::read_dir(fixtures()).expect("tests/fixtures/differential");
    let mut c = Checker::new();
    for entry in dir.flatten() {
        let path = entry.path();
        if path
            .extension()
            .is_some_and(|e| e == "pcap" || e == "pcapng")
        {
            for f in capture::read_frames(&path).unwrap() {
                c.check(&f);
            }
        }
    }
    let checked = c.finish("fixture");
    assert!(checked >= 8, "only {checked} fixture frames checked");
}

/// The adversarial classes an independent oracle found blind spots in (issue 13), as
/// generators: lengths that disagree with the bytes, headers lying in the padding, every
/// extension-header order and count, fragment headers anywhere in the chain.
fn adversarial(rng: &mut Rng) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let [a4, a6] = addresses();
    let v4 = tcp_segment(a4[2], 40000, a4[0], 5061, SYN);
    let v6 = tcp_segment(a6[2], 40000, a6[0], 5061, SYN);
    let u6 = udp(a6[7], 40000, a6[8], 3478);
    // 1. Lengths that disagree with the bytes: every IPv4 total length and IPv6 payload length
    // from 0 to the frame's end and a little past it, each with and without Ethernet padding.
    for (f, at) in [(&v4, L3 + 2), (&v6, L3 + 4), (&u6, L3 + 4)] {
        for pad in [0usize, 8, 40] {
            for len in 0..(f.len() - L3 + 12) as u16 {
                let mut g = f.to_vec();
                g.extend(std::iter::repeat_n(0u8, pad));
                g[at..at + 2].copy_from_slice(&len.to_be_bytes());
                out.push(g);
            }
        }
    }
    // 2. IPv6 extension chains of 0 to 10 headers in every order of a few kinds (fragment with
    // offset 0, with M, with a non-zero offset, hop-by-hop, routing, destination options, AH),
    // exhaustively up to length 3 and sampled beyond; and the same chains with the payload
    // length cut so the last header (or the L4 header) lies in the padding.
    let kinds: [&[u8]; 7] = [
        &[44, 0, 0x00, 0x00, 0, 0, 0, 1],
        &[44, 0, 0x00, 0x01, 0, 0, 0, 2],
        &[44, 0, 0x00, 0x10, 0, 0, 0, 3],
        &[0, 0, 1, 4, 0, 0, 0, 0],
        &[43, 0, 0, 0, 0, 0, 0, 0],
        &[60, 1, 1, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        &[51, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    ];
    let mut chains: Vec<Vec<usize>> = vec![vec![]];
    for n in 1..=3 {
        let mut next = Vec::new();
        for c in chains.iter().filter(|c| c.len() == n - 1) {
            for k in 0..kinds.len() {
                let mut c = c.clone();
                c.push(k);
                next.push(c);
            }
        }
        chains.extend(next);
    }
    for _ in 0..600 {
        let n = 4 + rng.below(7);
        chains.push((0..n).map(|_| rng.below(kinds.len())).collect());
    }
    for base in [&v6, &u6] {
        for chain in &chains {
            let upper = base[L3 + 6];
            let mut exts = Vec::new();
            for (i, &k) in chain.iter().enumerate() {
                let mut h = kinds[k].to_vec();
                // Each header names the next: the chain's following kind, or the L4 header.
                h[0] = chain.get(i + 1).map_or(upper, |&n| kinds[n][0]);
                exts.push(h);
            }
            let first = chain.first().map_or(upper, |&k| kinds[k][0]);
            let mut f = base[..L3 + 40].to_vec();
            f[L3 + 6] = first;
            for e in &exts {
                f.extend_from_slice(e);
            }
            f.extend_from_slice(&base[L3 + 40..]);
            let payload = (f.len() - L3 - 40) as u16;
            f[L3 + 4..L3 + 6].copy_from_slice(&payload.to_be_bytes());
            out.push(f.clone());
            // The same bytes, with the payload length cut to end 1 to 9 bytes early: the tail
            // lies in what is now Ethernet padding.
            for cut in [1u16, 4, 8, 9] {
                let mut g = f.clone();
                let p = payload.saturating_sub(cut);
                g[L3 + 4..L3 + 6].copy_from_slice(&p.to_be_bytes());
                out.push(g);
            }
        }
    }
    // 3. IPv4 fragments: every flag/offset combination near the boundaries, with lengths cut.
    for frag in [0u16, 0x2000, 0x2001, 0x0001, 0x1fff, 0x4000, 0x6000] {
        for cut in [0usize, 1, 8, 19, 20] {
            let mut f = ipv4_cut_l4(&v4, 20 - cut.min(20));
            f[L3 + 6..L3 + 8].copy_from_slice(&frag.to_be_bytes());
            out.push(f);
        }
    }
    out
}

#[test]
fn kernel_and_reference_agree_on_adversarial_frames() {
    let mut rng = seeded(0x0a11_ce5e_ed00_0013);
    let mut frames = adversarial(&mut rng);
    // And each of them once more behind one or two VLAN tags.
    let tagged: Vec<Vec<u8>> = frames
        .iter()
        .step_by(7)
        .map(|f| {
            let tags = [(0x88a8u16, 5u16), (0x8100, 6)];
            with_vlans(f, &tags[rng.below(2)..])
        })
        .collect();
    frames.extend(tagged);
    for policy in ["drop", "pass"] {
        // fragments = "pass" is where a fragment header read from the padding passed.
        let mut c = Checker::with(Harness::edited_default(
            "external",
            &[("fragments = \"drop\"", &format!("fragments = \"{policy}\""))],
        ));
        for f in &frames {
            c.check(f);
        }
        let seen = c.seen.clone();
        let n = c.finish(&format!("adversarial-{policy}"));
        for want in [
            "drop malformed",
            "rule public-im-sip-in",
            "pass unprotected",
        ] {
            assert!(
                seen.contains(want),
                "no adversarial frame reached `{want}`: {seen:?}"
            );
        }
        eprintln!("fragments = {policy}: {n} adversarial frames, kernel and reference agree");
        assert!(n >= 10_000, "only {n} adversarial frames");
    }
}

/// Sleeps until the kernel's tick moves on: the per-CPU reply cache holds an answer for one
/// tick, so a table rewritten by the test is only seen from the next one.
fn next_tick() -> u64 {
    let now = jiffies();
    loop {
        std::thread::sleep(std::time::Duration::from_millis(1));
        let j = jiffies();
        if j != now {
            return j;
        }
    }
}

/// The stateful side, which the frame-by-frame run above leaves out: the TC egress program
/// records flows, replies come back, the clock moves (flows are aged past and short of their
/// timeouts), FIN and RST close flows, on an external and an internal NIC. Every egress and
/// ingress verdict and counter must agree, and after every step the two flow tables must hold
/// the same live flows (slot, flags, role).
#[test]
fn kernel_and_reference_agree_on_egress_replies_and_a_moving_clock() {
    let steps: u64 = std::env::var("EC_DIFF_FRAMES")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .map_or(6_000, |n| (n / 8).max(6_000));
    let [a4, a6] = addresses();
    // Every egress policy: "track" (the default) records flows no rule covers, and its replies
    // from any port must agree too.
    for (role, egress) in [
        ("external", "track"),
        ("internal", "track"),
        ("external", "pass"),
        ("external", "drop"),
    ] {
        let h = Harness::edited_default(
            role,
            &[
                ("tcp_idle = 7440", "tcp_idle = 30"),
                ("udp_idle = 180", "udp_idle = 2"),
                ("tcp_closing = 10", "tcp_closing = 2"),
                ("egress = \"track\"", &format!("egress = \"{egress}\"")),
            ],
        );
        // No seeded flows: this run makes its own, and they expire.
        let mut c = Checker::on(h, role, false);
        let policy = c.compiled.policy;
        let timeouts = [
            policy.tcp_idle_ticks,
            policy.udp_idle_ticks,
            policy.tcp_closing_ticks,
        ];
        let mut rng = seeded(0x00c1_0c4e_0000_0001 ^ role.len() as u64);
        let locals: Vec<IpAddr> = vec![a4[0], a4[1], a6[0], a6[1]];
        let remotes: Vec<IpAddr> = vec![a4[2], a4[7], a4[9], a6[2], a6[6]];
        let remote_ports = [5061u16, 5269, 3478, 7000, 443, 22];
        let local_ports = [41000u16, 42000, 50010, 59999, 5061];
        let flag_set = [SYN, ACK, SYN | ACK, FIN | ACK, RST, RST | ACK, ACK | 0x08];
        let mut egress_checked = 0u64;
        let mut ingress_checked = 0u64;
        let mut aged = 0u64;
        for _ in 0..steps {
            let v6 = rng.below(2) == 1;
            let pick = |rng: &mut Rng, v: &[IpAddr]| loop {
                let a = *rng.pick(v);
                if a.is_ipv6() == v6 {
                    return a;
                }
            };
            let local = pick(&mut rng, &locals);
            let remote = pick(&mut rng, &remotes);
            let (lp, rp) = (*rng.pick(&local_ports), *rng.pick(&remote_ports));
            let flags = *rng.pick(&flag_set);
            let udp_frame = rng.below(3) == 0;
            match rng.below(10) {
                // The Edge sends.
                0..=3 => {
                    let f = if udp_frame {
                        udp(local, lp, remote, rp)
                    } else {
                        tcp_segment(local, lp, remote, rp, flags)
                    };
                    c.check_dir(Dir::Out, &f, jiffies());
                    egress_checked += 1;
                }
                // A reply (or a forged one) arrives.
                4..=8 => {
                    let f = if udp_frame {
                        udp(remote, rp, local, lp)
                    } else {
                        tcp_segment(remote, rp, local, lp, flags)
                    };
                    c.check_dir(Dir::In, &f, jiffies());
                    ingress_checked += 1;
                }
                // The clock moves: every flow is aged to a random point well short of or well
                // past one of the timeouts (never within a few ticks of it, where the tick the
                // kernel reads and the one the test read could differ).
                _ => {
                    let j = next_tick();
                    for f in c.h.classifier.maps().flows().expect("flows") {
                        let t = *rng.pick(&timeouts);
                        let margin = 25 + rng.below(200) as u64;
                        let age = if rng.below(2) == 0 {
                            t.saturating_sub(margin)
                        } else {
                            t + margin
                        };
                        let mut state = f.state;
                        state.last_seen = j.saturating_sub(age);
                        c.h.classifier
                            .maps_mut()
                            .insert_flow(&f.key, &state)
                            .expect("age flow");
                        c.flows.flows.insert(f.key, state);
                    }
                    next_tick();
                    aged += 1;
                }
            }
            c.compare_flow_tables(jiffies());
        }
        let seen = c.seen.clone();
        c.finish(&format!("stateful-{role}-{egress}"));
        eprintln!(
            "{role}, egress {egress}: {egress_checked} egress and {ingress_checked} ingress frames, {aged} clock steps: kernel and reference agree; counters reached: {seen:?}"
        );
        let mut wanted = vec![];
        if role == "external" {
            wanted.extend([
                "rule sip-federation-out",
                "rule messenger-stun-out",
                "drop not_established",
                "pass egress_inbound_reply",
            ]);
        }
        wanted.extend(match egress {
            "track" => ["pass egress_tracked", "pass tracked_reply"],
            "pass" => ["pass egress_no_rule", "drop no_rule"],
            _ => ["drop egress_no_rule", "drop no_rule"],
        });
        for want in wanted {
            assert!(
                seen.contains(want),
                "{role}, egress {egress}: nothing reached `{want}`: {seen:?}"
            );
        }
    }
}
