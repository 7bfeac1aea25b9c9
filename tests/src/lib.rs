//! Helpers shared by the root-only integration tests: frames built with etherparse, and the
//! compiled XDP program run on them with BPF_PROG_TEST_RUN.

use std::net::IpAddr;

use aya::programs::{TestRun as _, TestRunOptions};
use edge_classifier::{
    catalogue::Catalogue,
    compile::{Compiled, compile, compile_with},
    loader::{Binding, Classifier},
    maps::{Holds, IfaceStats},
};
use edge_classifier_common::{Counter, reason};
use etherparse::{
    IpHeaders, IpNumber, Ipv4Header, Ipv6Extensions, Ipv6Header, PacketBuilder, TcpHeader,
};

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
/// TC verdicts as BPF_PROG_TEST_RUN returns them (`TC_ACT_UNSPEC` is -1).
pub const TC_NEXT: u32 = u32::MAX;
pub const TC_DROP: u32 = 2;

/// Which program a frame goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// XDP, as a frame arriving on the NIC.
    In,
    /// TC egress, as a frame the Edge sends.
    Out,
}

pub const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// What a frame must be counted under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expected {
    Rule(&'static str),
    Reason(&'static str, bool),
}

impl std::fmt::Display for Expected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Expected::Rule(id) => write!(f, "rule {id}"),
            Expected::Reason(name, true) => write!(f, "drop {name}"),
            Expected::Reason(name, false) => write!(f, "pass {name}"),
        }
    }
}

pub fn pass_reason(name: &'static str) -> Expected {
    Expected::Reason(name, false)
}
pub fn drop_reason(name: &'static str) -> Expected {
    Expected::Reason(name, true)
}

/// The classifier loaded (not attached) with `lo` bound to `role`: BPF_PROG_TEST_RUN frames
/// arrive on the loopback device of the calling thread's namespace.
pub struct Harness {
    pub classifier: Classifier,
    pub binding: Binding,
    /// What each buffer holds, as the daemon's reload tracks it (`reload`).
    held: [Option<Compiled>; 2],
}

impl Harness {
    pub fn new(catalogue: &Catalogue, role: &str) -> Harness {
        let compiled = compile(catalogue).expect("catalogue compiles");
        let mut classifier = Classifier::load(compiled).unwrap_or_else(|e| panic!("load: {e}"));
        let binding = classifier
            .bind("lo", role)
            .unwrap_or_else(|e| panic!("bind lo: {e}"))
            .clone();
        let mut held = [None, None];
        held[classifier.maps().active().expect("the active buffer") as usize] =
            Some(classifier.compiled().clone());
        Harness {
            classifier,
            binding,
            held,
        }
    }

    /// Compiles `cat` keeping the running rules' slots and swaps it in through the other
    /// buffer, as `reload` does; panics naming `step` on error.
    pub fn reload(&mut self, cat: &Catalogue, step: &str) {
        let c = &mut self.classifier;
        let next = compile_with(cat, &c.compiled().assignments)
            .unwrap_or_else(|e| panic!("{step}: compile: {e}"));
        let running = c.compiled().clone();
        let target = 1 - c.maps().active().unwrap() as usize;
        let holds = self.held[target]
            .as_ref()
            .map_or(Holds::Empty, Holds::Compiled);
        let now = c
            .maps_mut()
            .swap_in(&next, holds, Some(&running))
            .unwrap_or_else(|e| panic!("{step}: swap_in: {e} ({:?})", e.source));
        assert_eq!(now as usize, target, "{step}");
        self.held[target] = Some(next.clone());
        c.set_compiled(next);
    }

    pub fn default_catalogue(role: &str) -> Harness {
        Self::new(&Catalogue::default_catalogue(), role)
    }

    /// The default catalogue with some of its text replaced (each `from` must occur).
    pub fn edited_default(role: &str, edits: &[(&str, &str)]) -> Harness {
        Self::new(&edited_default_catalogue(edits), role)
    }

    pub fn stats(&self) -> IfaceStats {
        self.classifier
            .iface_stats(&self.binding)
            .unwrap_or_else(|e| panic!("stats: {e}"))
    }

    /// Runs one frame through XDP and returns the action.
    pub fn run(&mut self, frame: &[u8]) -> u32 {
        self.run_dir(Dir::In, frame)
    }

    /// Runs one frame through the XDP (`In`) or TC egress (`Out`) program; returns its verdict.
    pub fn run_dir(&mut self, dir: Dir, frame: &[u8]) -> u32 {
        let opts = TestRunOptions {
            data_in: Some(frame),
            ..TestRunOptions::new()
        };
        let result = match dir {
            Dir::In => self.classifier.program().test_run(opts),
            Dir::Out => self.classifier.egress_program().test_run(opts),
        };
        result
            .unwrap_or_else(|e| {
                panic!(
                    "BPF_PROG_TEST_RUN ({dir:?}) on {}-byte frame: {e}",
                    frame.len()
                )
            })
            .return_value
    }

    /// Runs `frame` through XDP, asserts the action and that exactly the expected counter moved
    /// by one frame of this length (and nothing else moved).
    pub fn expect(&mut self, name: &str, frame: &[u8], action: u32, counted: &Expected) {
        self.expect_dir(Dir::In, name, frame, action, counted)
    }

    /// The same for either program.
    pub fn expect_dir(
        &mut self,
        dir: Dir,
        name: &str,
        frame: &[u8],
        action: u32,
        counted: &Expected,
    ) {
        let before = self.stats();
        let got = self.run_dir(dir, frame);
        let after = self.stats();
        let mut moved = Vec::new();
        for (i, (b, a)) in before.reasons.iter().zip(&after.reasons).enumerate() {
            if a != b {
                let (n, d) = reason::NAMES[i];
                moved.push((Expected::Reason(n, d).to_string(), delta(b, a)));
            }
        }
        let rules = &self.classifier.compiled().rules;
        for (i, (b, a)) in before.rules.iter().zip(&after.rules).enumerate() {
            if a != b {
                moved.push((format!("rule {}", rules[i].id), delta(b, a)));
            }
        }
        let verdict = |a| match (dir, a) {
            (Dir::In, XDP_PASS) => "XDP_PASS",
            (Dir::In, XDP_DROP) => "XDP_DROP",
            (Dir::Out, TC_NEXT) => "TC_ACT_UNSPEC",
            (Dir::Out, TC_DROP) => "TC_ACT_SHOT",
            _ => "other",
        };
        assert_eq!(
            got,
            action,
            "{name}: expected {} got {} ({got}); frame {}; counters moved {moved:?}",
            verdict(action),
            verdict(got),
            hex(frame)
        );
        let want = vec![(
            counted.to_string(),
            Counter {
                packets: 1,
                bytes: frame.len() as u64,
            },
        )];
        assert_eq!(
            moved, want,
            "{name}: counters moved {moved:?}, expected {want:?}"
        );
    }
}

/// The default catalogue with `edits` applied to its text; panics if an edit does not apply.
pub fn edited_default_catalogue(edits: &[(&str, &str)]) -> Catalogue {
    let mut text = edge_classifier::catalogue::DEFAULT_CATALOGUE.to_string();
    for (from, to) in edits {
        assert!(text.contains(from), "default catalogue has no `{from}`");
        text = text.replacen(from, to, 1);
    }
    Catalogue::parse("edited-default.toml", &text)
        .unwrap_or_else(|e| panic!("edited catalogue: {e}"))
}

fn delta(b: &Counter, a: &Counter) -> Counter {
    Counter {
        packets: a.packets - b.packets,
        bytes: a.bytes - b.bytes,
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn eth() -> etherparse::PacketBuilderStep<etherparse::Ethernet2Header> {
    PacketBuilder::ethernet2(SRC_MAC, DST_MAC)
}

fn ip_headers(src: IpAddr, dst: IpAddr) -> IpHeaders {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => IpHeaders::Ipv4(
            Ipv4Header::new(0, 64, IpNumber::TCP, s.octets(), d.octets()).expect("v4 header"),
            Default::default(),
        ),
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            ipv6_with_exts(s.octets(), d.octets(), Default::default())
        }
        _ => panic!("mixed address families {src} {dst}"),
    }
}

/// A TCP SYN from `src:sport` to `dst:dport`.
pub fn tcp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Vec<u8> {
    tcp_with(ip_headers(src, dst), sport, dport, &[])
}

/// TCP flag bits for [`tcp_segment`].
pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const ACK: u8 = 0x10;

/// A TCP segment with the given flags (any of [`FIN`], [`SYN`], [`RST`], [`ACK`]).
pub fn tcp_segment(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, flags: u8) -> Vec<u8> {
    let mut b = eth()
        .ip(ip_headers(src, dst))
        .tcp(sport, dport, 1000, 64240);
    if flags & SYN != 0 {
        b = b.syn();
    }
    if flags & ACK != 0 {
        b = b.ack(1);
    }
    if flags & FIN != 0 {
        b = b.fin();
    }
    if flags & RST != 0 {
        b = b.rst();
    }
    let mut out = Vec::with_capacity(b.size(0));
    b.write(&mut out, &[]).expect("write tcp frame");
    out
}

pub fn tcp_with(ip: IpHeaders, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let b = eth().ip(ip).tcp(sport, dport, 1000, 64240).syn();
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).expect("write tcp frame");
    out
}

pub fn udp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Vec<u8> {
    udp_with(ip_headers(src, dst), sport, dport, b"stun")
}

pub fn udp_with(ip: IpHeaders, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let b = eth().ip(ip).udp(sport, dport);
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).expect("write udp frame");
    out
}

/// The same frame with VLAN tags inserted after the MAC addresses (outer first).
pub fn with_vlans(frame: &[u8], tags: &[(u16, u16)]) -> Vec<u8> {
    let mut out = frame[..12].to_vec();
    for (tpid, vid) in tags {
        out.extend_from_slice(&tpid.to_be_bytes());
        out.extend_from_slice(&vid.to_be_bytes());
    }
    out.extend_from_slice(&frame[12..]);
    out
}

/// IPv4 with options (IHL > 5): record-route style padding of `len` bytes (multiple of 4).
pub fn ipv4_options(src: [u8; 4], dst: [u8; 4], options: &[u8]) -> IpHeaders {
    let mut h = Ipv4Header::new(0, 64, IpNumber::TCP, src, dst).expect("v4 header");
    h.options = options
        .try_into()
        .expect("options length is a multiple of 4, at most 40");
    IpHeaders::Ipv4(h, Default::default())
}

pub fn ipv6_with_exts(src: [u8; 16], dst: [u8; 16], exts: Ipv6Extensions) -> IpHeaders {
    IpHeaders::Ipv6(
        Ipv6Header {
            traffic_class: 0,
            flow_label: Default::default(),
            payload_length: 0,
            next_header: IpNumber::TCP,
            hop_limit: 64,
            source: src,
            destination: dst,
        },
        exts,
    )
}

pub fn tcp_header(sport: u16, dport: u16) -> TcpHeader {
    let mut h = TcpHeader::new(sport, dport, 1, 64240);
    h.syn = true;
    h
}

/// Offset of the L3 header in an untagged frame.
pub const L3: usize = 14;

/// Cuts an untagged IPv4 frame so that only `l4_bytes` of the L4 header remain, keeping the IP
/// total length consistent (a well-formed IP datagram whose L4 header is short).
pub fn ipv4_cut_l4(frame: &[u8], l4_bytes: usize) -> Vec<u8> {
    let ihl = ((frame[L3] & 0x0f) as usize) * 4;
    let mut out = frame[..L3 + ihl + l4_bytes].to_vec();
    let total = (ihl + l4_bytes) as u16;
    out[L3 + 2..L3 + 4].copy_from_slice(&total.to_be_bytes());
    out
}

/// Same for an untagged IPv6 frame without extension headers.
pub fn ipv6_cut_l4(frame: &[u8], l4_bytes: usize) -> Vec<u8> {
    let mut out = frame[..L3 + 40 + l4_bytes].to_vec();
    out[L3 + 4..L3 + 6].copy_from_slice(&(l4_bytes as u16).to_be_bytes());
    out
}

/// Sets an untagged IPv4 frame's flags/fragment-offset field.
pub fn ipv4_set_frag(frame: &mut [u8], more_fragments: bool, offset_units: u16) {
    let v = (u16::from(more_fragments) << 13) | (offset_units & 0x1fff);
    frame[L3 + 6..L3 + 8].copy_from_slice(&v.to_be_bytes());
}

/// Pins this thread (and the processes it starts) to `cpu`; returns the mask it had.
pub fn pin_to_cpu(cpu: usize) -> std::io::Result<libc::cpu_set_t> {
    // SAFETY: cpu_set_t is plain data; the calls read and write the sets given.
    unsafe {
        let mut old: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut old) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut one: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut one);
        set_affinity(&one)?;
        Ok(old)
    }
}

pub fn set_affinity(set: &libc::cpu_set_t) -> std::io::Result<()> {
    // SAFETY: the call reads the set given.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), set) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// xorshift64*: reproducible frames and catalogues for the generated tests, without a
/// dependency (a seed names a run).
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    /// True once in `one_in` draws on average.
    pub fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
    pub fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
}

/// jiffies now, as the kernel's `bpf_jiffies64` reads them: the clock of the flow tables and the
/// limits' buckets, which the reference classifier is given to model them.
pub fn jiffies() -> u64 {
    std::fs::read_to_string("/proc/timer_list")
        .expect("/proc/timer_list")
        .lines()
        .find_map(|l| l.strip_prefix("jiffies: "))
        .and_then(|j| j.trim().parse().ok())
        .expect("a jiffies line")
}

/// A SYN as a Linux client sends it: MSS 1460, SACK permitted, timestamps, window scale (a
/// 40-byte TCP header), sequence number 1000.
pub fn syn_with_options(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Vec<u8> {
    use etherparse::TcpOptionElement::*;
    let ip = PacketBuilder::ethernet2(SRC_MAC, DST_MAC);
    let ip = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ip.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => ip.ipv6(s.octets(), d.octets(), 64),
        _ => unreachable!(),
    };
    let b = ip
        .tcp(sport, dport, 1000, 64240)
        .syn()
        .options(&[
            MaximumSegmentSize(1460),
            SelectiveAcknowledgementPermitted,
            Timestamp(12345, 0),
            Noop,
            WindowScale(7),
        ])
        .unwrap();
    let mut out = Vec::new();
    b.write(&mut out, &[]).unwrap();
    out
}
