//! The reference classifier: SPEC §3–4 written a second time, in plain Rust over the same
//! compiled catalogue, for `explain` and for checking the kernel program frame by frame. It
//! follows the spec's rules (header limits, fragment handling, first match wins, flow expiry)
//! but shares no code with the kernel program, and its parser takes its protocol knowledge from
//! a packet library (etherparse) rather than from offsets written by hand, so that a misreading
//! of a header in the kernel's parser does not recur here unseen.

use std::{collections::HashMap, net::IpAddr};

use edge_classifier_common::{
    AdmittedKey, Bucket, BucketKey, Budget, FLOW_FIN_IN, FLOW_FIN_OUT, FLOW_RST, FlowKey,
    FlowState, MAX_CANDIDATES, POLICY_DEFAULT_PASS, POLICY_DROP_EGRESS, POLICY_PASS_FRAGMENTS,
    POLICY_PASS_NON_IP, POLICY_PASS_UNPROTECTED, POLICY_PROTECT_IFACE_ADDRS, POLICY_TRACK_EGRESS,
    PolicyEntry, RULE_LIMITED, RuleLimit, SET_ANY, SET_PROTECTED, TRACKED_SLOT, TRANSPORT_TCP,
    TRANSPORT_UDP, layout, reason,
};
use etherparse::{
    EtherType, Ethernet2Slice, IpAuthHeaderSlice, IpNumber, Ipv4HeaderSlice,
    Ipv6FragmentHeaderSlice, Ipv6HeaderSlice, Ipv6RawExtHeaderSlice, SingleVlanSlice, TcpSlice,
    UdpHeader, UdpHeaderSlice, UdpSlice, err, ip_number,
};

use crate::compile::{AddressSets, Compiled};

/// What the classifier did with a frame and which counter records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub pass: bool,
    pub counted: Counted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    /// A rule, by counter slot.
    Rule(u32),
    /// A reason (`edge_classifier_common::reason`).
    Reason(u32),
}

impl Verdict {
    fn pass(r: u32) -> Verdict {
        Verdict {
            pass: true,
            counted: Counted::Reason(r),
        }
    }
    fn drop(r: u32) -> Verdict {
        Verdict {
            pass: false,
            counted: Counted::Reason(r),
        }
    }
    fn rule(slot: u32) -> Verdict {
        Verdict {
            pass: true,
            counted: Counted::Rule(slot),
        }
    }
}

/// The outbound flow table as the reference sees it, fed explicitly; and the limits' state:
/// token buckets and the UDP flows limited rules admitted.
#[derive(Debug, Clone, Default)]
pub struct FlowTable {
    pub flows: HashMap<FlowKey, FlowState>,
    pub buckets: HashMap<BucketKey, Bucket>,
    /// Admitted UDP flow → tick last seen.
    pub admitted: HashMap<AdmittedKey, u64>,
    /// `syn_proxy` rules: (slot, 4 or 6) → tick a SYN over the budget last went through to the
    /// listener (the kernel's `ProxyState::syn_passed_v4/v6`; 0 when never).
    pub syn_passed: HashMap<(u32, u8), u64>,
}

// The parser. The protocol knowledge (field positions, header lengths, which field chains to
// which header) comes from etherparse's slices, one header at a time; what is written here is
// the spec's policy on top of them (SPEC §4, README "The data plane"): which ethertypes and
// extension headers are walked, the bounds on the walk, what counts as malformed, what a
// fragment is. Where etherparse's own rules differ from the spec's, the check is made here,
// with the reason. Nothing here is shared with (or copied from) the kernel's `parse.rs`.

/// VLAN tags the spec walks (802.1Q or 802.1ad TPID); a third is `malformed`.
const MAX_VLAN_TAGS: usize = 2;
/// IPv6 extension headers walked, and their bytes; more of either is `malformed`.
const MAX_IPV6_EXT: usize = 8;
const MAX_IPV6_EXT_BYTES: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fragment {
    No,
    First,
    Later,
}

#[derive(Debug, Clone, Copy)]
enum Addr {
    V4([u8; 4]),
    V6([u8; 16]),
}

struct Ip<'a> {
    is_v6: bool,
    /// The upper-layer protocol (for a later IPv6 fragment, the next header its fragment
    /// header names).
    proto: IpNumber,
    src: Addr,
    dst: Addr,
    /// From the upper-layer header to the end of the IP datagram (total length / payload
    /// length): link-layer padding after the datagram is not in it, so it is never read.
    l4: &'a [u8],
    fragment: Fragment,
}

enum L3<'a> {
    Arp,
    Other,
    Ip(Ip<'a>),
}

enum L4 {
    Tcp { sport: u16, dport: u16, flags: u8 },
    Udp { sport: u16, dport: u16 },
    Icmp { ty: u8 },
    ShortFragment,
    Other,
}

/// A frame that cannot be parsed.
struct Malformed;

type Parsed<T> = Result<T, Malformed>;

/// Any etherparse error: the frame is malformed (the kind of error does not matter to the spec,
/// except where a caller matches on it first).
fn malformed<E>(_: E) -> Malformed {
    Malformed
}

fn l3(frame: &[u8]) -> Parsed<L3<'_>> {
    let eth = Ethernet2Slice::from_slice_without_fcs(frame).map_err(malformed)?;
    let mut payload = eth.payload();
    // The spec's tags are 802.1Q (0x8100) and 802.1ad (0x88a8). etherparse also takes 0x9100
    // (the pre-standard QinQ TPID) for a tag; the spec does not, so a frame behind 0x9100 is
    // non-IP like any other unknown ethertype, as is MACsec (0x88e5), which etherparse would
    // open as well.
    let mut tags = 0;
    while matches!(
        payload.ether_type,
        EtherType::VLAN_TAGGED_FRAME | EtherType::PROVIDER_BRIDGING
    ) {
        // A third tag: what it carries cannot be seen, so it is not trusted (etherparse's
        // `LaxSlicedPacket` would take it, and stop quietly after a third).
        if tags == MAX_VLAN_TAGS {
            return Err(Malformed);
        }
        payload = SingleVlanSlice::from_slice(payload.payload)
            .map_err(malformed)?
            .payload();
        tags += 1;
    }
    match payload.ether_type {
        EtherType::IPV4 => ipv4(payload.payload).map(L3::Ip),
        EtherType::IPV6 => ipv6(payload.payload).map(L3::Ip),
        // ARP always passes; its body is not the classifier's business.
        EtherType::ARP => Ok(L3::Arp),
        _ => Ok(L3::Other),
    }
}

fn ipv4(slice: &[u8]) -> Parsed<Ip<'_>> {
    // Version 4, IHL >= 5 and the header with its options within the frame (RFC 791).
    let h = Ipv4HeaderSlice::from_slice(slice).map_err(malformed)?;
    // A total length smaller than the header is an error here.
    let payload_len = usize::from(h.payload_len().map_err(malformed)?);
    // The whole datagram must be in the frame; what follows it is link-layer padding. (Not
    // `Ipv4Slice`: it would also open an IPv4 authentication header, which the spec does not
    // walk: IPv4 protocol 51 is an upper layer no rule names, like any other.)
    let l4 = slice
        .get(h.slice().len()..h.slice().len() + payload_len)
        .ok_or(Malformed)?;
    let fragment = if h.fragments_offset().value() != 0 {
        Fragment::Later
    } else if h.more_fragments() {
        Fragment::First
    } else {
        Fragment::No
    };
    Ok(Ip {
        is_v6: false,
        proto: h.protocol(),
        src: Addr::V4(h.source()),
        dst: Addr::V4(h.destination()),
        l4,
        fragment,
    })
}

fn ipv6(slice: &[u8]) -> Parsed<Ip<'_>> {
    // Version 6 and the 40-byte header within the frame.
    let h = Ipv6HeaderSlice::from_slice(slice).map_err(malformed)?;
    let payload_len = usize::from(h.payload_length());
    // Payload length 0 is a jumbogram only with a hop-by-hop header next (RFC 2675 §3), which an
    // Edge NIC does not carry: that fails closed. With any other next header it is an empty
    // datagram. (etherparse's `Ipv6Slice` takes every payload length 0 for a jumbogram reaching
    // to the end of the slice, padding included, so it is not used.)
    if payload_len == 0 && h.next_header() == ip_number::IPV6_HOP_BY_HOP {
        return Err(Malformed);
    }
    // The payload must be in the frame; what follows it is link-layer padding.
    let payload = slice
        .get(h.slice().len()..h.slice().len() + payload_len)
        .ok_or(Malformed)?;
    let (proto, l4, fragment) = ipv6_exts(h.next_header(), payload)?;
    Ok(Ip {
        is_v6: true,
        proto,
        src: Addr::V6(h.source()),
        dst: Addr::V6(h.destination()),
        l4,
        fragment,
    })
}

/// Walks the extension headers of an IPv6 `payload` (already cut at the payload length, so a
/// header reaching past it, into padding, fails etherparse's length check: RFC 8200 §4.5).
/// Returns the upper-layer protocol, what follows the last header walked, and the fragment
/// state.
///
/// Not `Ipv6ExtensionsSlice`: its walk has no bound (the spec's is 8 headers and 512 bytes), it
/// goes on past a later fragment's header into fragment payload (the spec stops there: no L4),
/// and it refuses a hop-by-hop header that is not first (RFC 8200 §4.1), which the spec (and
/// the kernel) walk like a destination options header. Each header is still sliced by
/// etherparse's own slice type for it.
fn ipv6_exts(mut next: IpNumber, payload: &[u8]) -> Parsed<(IpNumber, &[u8], Fragment)> {
    let mut rest = payload;
    let mut fragment = Fragment::No;
    let mut walked = 0;
    loop {
        let (len, following) = match next {
            // Hop-by-hop, routing, destination options: (len + 1) * 8 bytes.
            ip_number::IPV6_HOP_BY_HOP | ip_number::IPV6_ROUTE | ip_number::IPV6_DEST_OPTIONS => {
                let e = Ipv6RawExtHeaderSlice::from_slice(rest).map_err(malformed)?;
                (e.slice().len(), e.next_header())
            }
            // Fragment: 8 bytes. A non-zero offset is a later fragment; offset 0 with M set
            // a first one; offset 0 without M an atomic fragment (RFC 8200 §4.5), not fragmented.
            ip_number::IPV6_FRAG => {
                let e = Ipv6FragmentHeaderSlice::from_slice(rest).map_err(malformed)?;
                // Not `fragment_offset()`/`more_fragments()`/`is_fragmenting_payload()`:
                // etherparse 0.18 reads them from the wrong bits (the offset's low bits from
                // byte 3 bits 4..0, M from bit 7; etherparse issue #150, fixed in 0.20 by PR
                // #151), so `00 01` (offset 0, M set: a first fragment) would be offset 1 and
                // no M. RFC 8200 §4.5: bytes 2..3 are one big-endian word, the offset its top 13
                // bits, M its lowest bit.
                let word = u16::from_be_bytes([e.slice()[2], e.slice()[3]]);
                if word >> 3 != 0 {
                    fragment = Fragment::Later;
                } else if word & 1 != 0 {
                    fragment = Fragment::First;
                }
                (e.slice().len(), e.next_header())
            }
            // Authentication header: (len + 2) * 4 bytes. etherparse refuses a payload length
            // of 0 (octet 1), which RFC 4302 §2.2 cannot produce (SPI and sequence number make
            // 12 bytes, a length of 1). The spec (and the kernel, and Linux's
            // `ipv6_skip_exthdr`) take the formula as it stands: 8 bytes, and the walk goes on.
            // Such a header has the generic layout of RFC 8200 §4 with a length of 0, also 8
            // bytes, so that slice reads it.
            ip_number::AUTH if rest.get(1) == Some(&0) => {
                let e = Ipv6RawExtHeaderSlice::from_slice(rest).map_err(malformed)?;
                (e.slice().len(), e.next_header())
            }
            ip_number::AUTH => {
                let e = IpAuthHeaderSlice::from_slice(rest).map_err(malformed)?;
                (e.slice().len(), e.next_header())
            }
            _ => return Ok((next, rest, fragment)),
        };
        walked += 1;
        if payload.len() - rest.len() + len > MAX_IPV6_EXT_BYTES {
            return Err(Malformed);
        }
        rest = &rest[len..];
        next = following;
        // At most 8 extension headers, a later fragment's included (the spec's bound).
        if walked > MAX_IPV6_EXT {
            return Err(Malformed);
        }
        // A later fragment carries no upper-layer header, only payload: the walk ends here.
        if fragment == Fragment::Later {
            return Ok((next, rest, fragment));
        }
    }
}

/// The ICMP/ICMPv6 type, for the neighbour-discovery check and the ICMP policy.
///
/// The spec needs the 4 bytes every ICMP and ICMPv6 message starts with (type, code, checksum:
/// RFC 792, RFC 4443 §2.1) within the datagram. etherparse's `Icmpv4Slice`/`Icmpv6Slice` want 8
/// bytes, and `Icmpv4Slice` the exact size of a timestamp message; a shorter or odd-sized
/// message is still one of its type to the spec, so the type octet (the first) is read here.
fn icmp_type(ip: &Ip) -> Parsed<u8> {
    let header = ip.l4.get(..4).ok_or(Malformed)?;
    Ok(header[0])
}

fn short(fragmented: bool) -> Parsed<L4> {
    if fragmented {
        Ok(L4::ShortFragment)
    } else {
        Err(Malformed)
    }
}

fn l4(ip: &Ip) -> Parsed<L4> {
    let first = ip.fragment == Fragment::First;
    match ip.proto {
        ip_number::TCP => match TcpSlice::from_slice(ip.l4) {
            Ok(t) => Ok(L4::Tcp {
                sport: t.source_port(),
                dport: t.destination_port(),
                flags: u8::from(t.fin())
                    | u8::from(t.syn()) << 1
                    | u8::from(t.rst()) << 2
                    | u8::from(t.psh()) << 3
                    | u8::from(t.ack()) << 4
                    | u8::from(t.urg()) << 5
                    | u8::from(t.ece()) << 6
                    | u8::from(t.cwr()) << 7,
            }),
            // Data offset < 5: malformed whether fragmented or not.
            Err(err::tcp::HeaderSliceError::Content(_)) => Err(Malformed),
            // Fewer than 20 bytes, or a data offset reaching past the datagram: the header is
            // not all here.
            Err(err::tcp::HeaderSliceError::Len(_)) => short(first),
        },
        ip_number::UDP => {
            let Ok(u) = UdpHeaderSlice::from_slice(ip.l4) else {
                return short(first);
            };
            // The UDP length counts its own 8-byte header (RFC 768). etherparse's `UdpSlice`
            // takes a length of 0 for a jumbo datagram's (RFC 2675 §4); jumbograms are
            // malformed here, so that is checked first.
            if usize::from(u.length()) < UdpHeader::LEN {
                return Err(Malformed);
            }
            // A length past the IP datagram is malformed, except in a first fragment, where it
            // counts the fragments still to come.
            if !first {
                UdpSlice::from_slice(ip.l4).map_err(malformed)?;
            }
            Ok(L4::Udp {
                sport: u.source_port(),
                dport: u.destination_port(),
            })
        }
        ip_number::ICMP if !ip.is_v6 => Ok(L4::Icmp { ty: icmp_type(ip)? }),
        ip_number::IPV6_ICMP if ip.is_v6 => Ok(L4::Icmp { ty: icmp_type(ip)? }),
        _ => Ok(L4::Other),
    }
}

/// The compiled address sets as the reference looks them up.
struct Sets(AddressSets);

impl Sets {
    fn new(c: &Compiled) -> Sets {
        Sets(AddressSets::new(c))
    }

    fn bits(&self, addr: &Addr) -> u64 {
        match addr {
            Addr::V4(a) => self.0.bits(IpAddr::from(*a)),
            Addr::V6(a) => self.0.bits(IpAddr::from(*a)),
        }
    }
}

fn bit_set(map: &[u64; 4], bit: u8) -> bool {
    map[(bit >> 6) as usize] & (1u64 << (bit & 63)) != 0
}

fn flow_key(transport: u32, local: &Addr, remote: &Addr, lport: u16, rport: u16) -> FlowKey {
    let mut k = FlowKey {
        local_port: lport,
        remote_port: rport,
        transport: transport as u8,
        ..FlowKey::default()
    };
    match (local, remote) {
        (Addr::V4(l), Addr::V4(r)) => {
            k.family = 4;
            k.local[..4].copy_from_slice(l);
            k.remote[..4].copy_from_slice(r);
        }
        (Addr::V6(l), Addr::V6(r)) => {
            k.family = 6;
            k.local = *l;
            k.remote = *r;
        }
        _ => {}
    }
    k
}

fn closing(flags: u32) -> bool {
    flags & FLOW_RST != 0 || flags & (FLOW_FIN_OUT | FLOW_FIN_IN) == FLOW_FIN_OUT | FLOW_FIN_IN
}

fn expired(state: &FlowState, now: u64, policy: &PolicyEntry, transport: u32) -> bool {
    let timeout = if transport != TRANSPORT_TCP {
        policy.udp_idle_ticks
    } else if closing(state.flags) {
        policy.tcp_closing_ticks
    } else {
        policy.tcp_idle_ticks
    };
    now.saturating_sub(state.last_seen) > timeout
}

/// The reference classifier over one compiled catalogue.
/// A SYN over a `syn_proxy` rule's budget. One every `syn_proxy_ticks` per family goes
/// through to the listener (the rule's), so that it keeps sending cookies of its own; the rest
/// are answered from XDP with a SYN cookie (`syn_cookie`, sent back), when the frame is of the
/// shape the kernel answers (untagged or one VLAN tag, IPv4 without options, IPv6 with TCP
/// right after the fixed header); a SYN of another shape drops as `rate_limited`.
///
/// Not modelled: what the kernel does with an ACK (no SYN, no RST) of a `syn_proxy` rule while
/// its proxy answers SYNs. It looks up the socket table (`bpf_skc_lookup_tcp`) and checks the
/// cookie against the kernel's secret (`bpf_tcp_raw_check_syncookie_*`): `syn_cookie_ack`,
/// `syn_cookie_invalid` or the rule's. Neither the socket table nor the secret is the
/// reference's to know, so it gives such ACKs the rule's verdict, as the kernel does while the
/// proxy is idle; the differential test's catalogue has no `syn_proxy` rule, and
/// `tests/tests/syn_proxy.rs` checks the ACKs end to end against a real listener instead.
fn syn_proxy(
    frame: &[u8],
    limit: &RuleLimit,
    slot: u32,
    family: u8,
    flows: &mut FlowTable,
    now: u64,
) -> Verdict {
    let passed = flows.syn_passed.entry((slot, family)).or_insert(0);
    if now.saturating_sub(*passed) >= u64::from(limit.syn_proxy_ticks) {
        *passed = now;
        return Verdict::rule(slot);
    }
    if proxy_answers(frame) {
        Verdict::pass(reason::TX_SYN_COOKIE)
    } else {
        Verdict::drop(reason::DROP_RATE_LIMITED)
    }
}

/// Whether the proxy answers a SYN of this shape (see `syn_proxy`).
fn proxy_answers(frame: &[u8]) -> bool {
    let Ok(eth) = Ethernet2Slice::from_slice_without_fcs(frame) else {
        return false;
    };
    let (ether_type, payload) = match eth.ether_type() {
        EtherType::VLAN_TAGGED_FRAME | EtherType::PROVIDER_BRIDGING => {
            match SingleVlanSlice::from_slice(eth.payload_slice()) {
                Ok(v) => (v.ether_type(), v.payload_slice()),
                Err(_) => return false,
            }
        }
        t => (t, eth.payload_slice()),
    };
    match ether_type {
        EtherType::IPV4 => Ipv4HeaderSlice::from_slice(payload).is_ok_and(|h| {
            h.ihl() == 5
                && h.protocol() == ip_number::TCP
                && !h.more_fragments()
                && h.fragments_offset().value() == 0
        }),
        EtherType::IPV6 => {
            Ipv6HeaderSlice::from_slice(payload).is_ok_and(|h| h.next_header() == ip_number::TCP)
        }
        _ => false,
    }
}

pub struct Reference<'a> {
    compiled: &'a Compiled,
    sets: Sets,
    /// The bound NICs' own addresses (the kernel's `IFACE_ADDRS_V4/V6`).
    nic_addrs: std::collections::HashSet<std::net::IpAddr>,
}

impl<'a> Reference<'a> {
    pub fn new(compiled: &'a Compiled) -> Reference<'a> {
        Reference {
            compiled,
            sets: Sets::new(compiled),
            nic_addrs: Default::default(),
        }
    }

    /// The same classifier with these addresses configured on the bound NICs.
    pub fn with_nic_addrs(mut self, addrs: impl IntoIterator<Item = std::net::IpAddr>) -> Self {
        self.nic_addrs = addrs.into_iter().collect();
        self
    }

    /// Whether a set of the catalogue makes `addr` protected (an address of the Edge's). The
    /// bound NICs' own addresses are not asked: only the catalogue is.
    pub fn protects(&self, addr: std::net::IpAddr) -> bool {
        let addr = match addr {
            std::net::IpAddr::V4(a) => Addr::V4(a.octets()),
            std::net::IpAddr::V6(a) => Addr::V6(a.octets()),
        };
        self.sets.bits(&addr) & SET_PROTECTED != 0
    }

    fn nic_addr(&self, addr: &Addr) -> bool {
        let ip = match addr {
            Addr::V4(a) => std::net::IpAddr::from(*a),
            Addr::V6(a) => std::net::IpAddr::from(*a),
        };
        self.nic_addrs.contains(&ip)
    }

    /// The set bits of `addr` when it is one of the Edge's own addresses, and whether only as a
    /// bound NIC's address (under `protect_interface_addresses`, no named set holding it).
    fn own_address(&self, addr: &Addr) -> Option<(u64, bool)> {
        let bits = self.sets.bits(addr);
        if bits & SET_PROTECTED != 0 {
            Some((bits, false))
        } else if self.policy().flags & POLICY_PROTECT_IFACE_ADDRS != 0 && self.nic_addr(addr) {
            Some((SET_PROTECTED | SET_ANY, true))
        } else {
            None
        }
    }

    fn policy(&self) -> &PolicyEntry {
        &self.compiled.policy
    }

    fn no_rule(&self) -> Verdict {
        if self.policy().flags & POLICY_DEFAULT_PASS != 0 {
            Verdict::pass(reason::PASS_MONITOR)
        } else {
            Verdict::drop(reason::DROP_NO_RULE)
        }
    }

    fn port_entry(&self, transport: u32, port: u16) -> crate::compile::PortClasses {
        self.compiled.ports[layout::compiled_port(transport, port)]
    }

    /// First rule of `class` that the interface role and both addresses satisfy.
    fn match_class(
        &self,
        class: u32,
        local_bits: u64,
        remote: &Addr,
        role_mask: u32,
    ) -> Option<u32> {
        let class = self.compiled.classes.get(class as usize)?;
        class.rules[..(class.count as usize).min(MAX_CANDIDATES)]
            .iter()
            .find(|r| {
                r.role_mask & role_mask != 0
                    && r.local_mask & local_bits != 0
                    && (r.remote_mask & SET_ANY != 0 || r.remote_mask & self.sets.bits(remote) != 0)
            })
            .map(|r| r.slot)
    }

    /// The limit of the rule at `slot` in `class`, when its flag says it has one.
    fn limit_of(&self, class: u32, slot: u32) -> Option<RuleLimit> {
        let class = self.compiled.classes.get(class as usize)?;
        let rule = class.rules.iter().find(|r| r.slot == slot)?;
        if rule.flags & RULE_LIMITED == 0 {
            return None;
        }
        self.compiled
            .rules
            .iter()
            .find(|r| r.slot == slot)
            .and_then(|r| r.limit.as_ref())
            .map(|l| l.entry)
    }

    /// Whether a limited rule admits a new flow at tick `now`: an admitted UDP flow still
    /// live, an exempt source, or a token from the source prefix's bucket and then from the
    /// rule's total one. A bucket seen for the first time is full.
    #[allow(clippy::too_many_arguments)]
    fn admits(
        &self,
        limit: &RuleLimit,
        slot: u32,
        src: &Addr,
        transport: u32,
        flow: AdmittedKey,
        state: &mut FlowTable,
        now: u64,
    ) -> bool {
        let udp = transport == TRANSPORT_UDP;
        if udp
            && let Some(seen) = state.admitted.get_mut(&flow)
            && now.saturating_sub(*seen) <= self.policy().udp_idle_ticks
        {
            *seen = (*seen).max(now);
            return true;
        }
        let bits = self.sets.bits(src);
        if bits & limit.exempt_mask != 0 {
            return true;
        }
        let take = |state: &mut FlowTable, key: BucketKey, b: &Budget| -> bool {
            let bucket = state.buckets.entry(key).or_insert(Bucket {
                tokens: b.cap,
                stamp: now,
            });
            // Refilled by whole ticks at `refill` units each, never above the cap.
            let elapsed = now.saturating_sub(bucket.stamp);
            let tokens = (u128::from(bucket.tokens) + u128::from(elapsed) * u128::from(b.refill))
                .min(u128::from(b.cap)) as u64;
            bucket.stamp = bucket.stamp.max(now);
            if tokens >= b.cost {
                bucket.tokens = tokens - b.cost;
                true
            } else {
                bucket.tokens = tokens;
                false
            }
        };
        // The sets with a budget of their own share it, and no other budget applies to them.
        if bits & limit.own_mask != 0 {
            let key = BucketKey {
                slot,
                generation: limit.generation,
                family: 1,
                addr: [0, 0],
            };
            if !take(state, key, &limit.own) {
                return false;
            }
            if udp {
                state.admitted.insert(flow, now);
            }
            return true;
        }
        if limit.per_source.cost != 0 {
            let (family, addr) = match src {
                Addr::V4(a) => {
                    let masked = u32::from_be_bytes(*a)
                        & u32::from_be_bytes(u32::to_ne_bytes(limit.mask_v4 as u32));
                    let mut word = [0u8; 8];
                    word[..4].copy_from_slice(&masked.to_be_bytes());
                    (4, [u64::from_ne_bytes(word), 0])
                }
                Addr::V6(a) => {
                    let w0 = u64::from_ne_bytes(a[..8].try_into().expect("8 bytes"));
                    let w1 = u64::from_ne_bytes(a[8..].try_into().expect("8 bytes"));
                    (6, [w0 & limit.mask_v6[0], w1 & limit.mask_v6[1]])
                }
            };
            let key = BucketKey {
                slot,
                generation: limit.generation,
                family,
                addr,
            };
            if !take(state, key, &limit.per_source) {
                return false;
            }
        }
        if limit.total.cost != 0 {
            let key = BucketKey {
                slot,
                generation: limit.generation,
                family: 0,
                addr: [0, 0],
            };
            if !take(state, key, &limit.total) {
                return false;
            }
        }
        if udp {
            state.admitted.insert(flow, now);
        }
        true
    }

    /// A frame arriving on a NIC of `role_mask` (XDP ingress). Flow lookups refresh `flows` the
    /// way the kernel does; `now` is the kernel's jiffies (`bpf_jiffies64`).
    pub fn ingress(
        &self,
        frame: &[u8],
        role_mask: u32,
        flows: &mut FlowTable,
        now: u64,
    ) -> Verdict {
        self.try_ingress(frame, role_mask, flows, now)
            .unwrap_or(Verdict::drop(reason::DROP_MALFORMED))
    }

    /// Ingress in the spec's order, one early return per verdict, as the kernel program's
    /// `try_classify` (which is long for the same reason): split, the sequence a reader checks
    /// against SPEC §3–4 would be scattered.
    fn try_ingress(
        &self,
        frame: &[u8],
        role_mask: u32,
        flows: &mut FlowTable,
        now: u64,
    ) -> Parsed<Verdict> {
        let policy = *self.policy();
        let ip = match l3(frame)? {
            L3::Arp => return Ok(Verdict::pass(reason::PASS_ARP)),
            L3::Other => {
                return Ok(if policy.flags & POLICY_PASS_NON_IP != 0 {
                    Verdict::pass(reason::PASS_NON_IP)
                } else {
                    Verdict::drop(reason::DROP_NON_IP)
                });
            }
            L3::Ip(ip) => ip,
        };
        if ip.is_v6
            && ip.proto == ip_number::IPV6_ICMP
            && ip.fragment != Fragment::Later
            && icmp_type(&ip).is_ok_and(|ty| (133..=137).contains(&ty))
        {
            return Ok(Verdict::pass(reason::PASS_NEIGHBOUR_DISCOVERY));
        }
        // An address of a bound NIC that no set names: protected, matched by no rule.
        let Some((local_bits, nic_only)) = self.own_address(&ip.dst) else {
            return Ok(if policy.flags & POLICY_PASS_UNPROTECTED != 0 {
                Verdict::pass(reason::PASS_UNPROTECTED)
            } else {
                Verdict::drop(reason::DROP_UNPROTECTED)
            });
        };
        if ip.fragment == Fragment::Later {
            return Ok(if policy.flags & POLICY_PASS_FRAGMENTS != 0 {
                Verdict::pass(reason::PASS_FRAGMENT)
            } else {
                Verdict::drop(reason::DROP_FRAGMENT)
            });
        }
        let (transport, sport, dport, tcp_flags) = match l4(&ip)? {
            L4::Tcp {
                sport,
                dport,
                flags,
            } => (TRANSPORT_TCP, sport, dport, flags),
            L4::Udp { sport, dport } => (TRANSPORT_UDP, sport, dport, 0),
            L4::Icmp { ty } => {
                let allowed = if ip.is_v6 {
                    &policy.icmp6
                } else {
                    &policy.icmp4
                };
                return Ok(if bit_set(allowed, ty) {
                    Verdict::pass(reason::PASS_ICMP)
                } else {
                    Verdict::drop(reason::DROP_ICMP)
                });
            }
            L4::ShortFragment => return Ok(Verdict::drop(reason::DROP_SHORT_FRAGMENT)),
            L4::Other => return Ok(self.no_rule()),
        };
        // DHCP replies to the client on the NIC's own address (RFC 2131 ports; RFC 8415 on a
        // link-local address, fe80::/10).
        let dhcp = match &ip.dst {
            Addr::V4(_) => sport == 67 && dport == 68,
            Addr::V6(a) => sport == 547 && dport == 546 && a[0] == 0xfe && a[1] & 0xc0 == 0x80,
        };
        if nic_only && transport == TRANSPORT_UDP && dhcp {
            return Ok(Verdict::pass(reason::PASS_DHCP_CLIENT));
        }
        let dentry = self.port_entry(transport, dport);
        if dentry.inbound != 0
            && let Some(slot) = self.match_class(dentry.inbound, local_bits, &ip.src, role_mask)
        {
            // A new flow of a limited rule: a SYN without ACK, or a UDP datagram of a flow
            // the rule has not admitted (or whose admission idled out).
            let new_flow = transport == TRANSPORT_UDP || tcp_flags & 0x12 == 0x02;
            if new_flow && let Some(limit) = self.limit_of(dentry.inbound, slot) {
                let (family, remote) = match &ip.src {
                    Addr::V4(a) => {
                        let mut w = [0u8; 8];
                        w[..4].copy_from_slice(a);
                        (4, [u64::from_ne_bytes(w), 0])
                    }
                    Addr::V6(a) => (
                        6,
                        [
                            u64::from_ne_bytes(a[..8].try_into().expect("8 bytes")),
                            u64::from_ne_bytes(a[8..].try_into().expect("8 bytes")),
                        ],
                    ),
                };
                // The peer and both ports under the rule; the Edge's address is not in it.
                let key = AdmittedKey {
                    slot,
                    family,
                    remote_port: sport,
                    local_port: dport,
                    generation: limit.generation,
                    remote,
                };
                if !self.admits(&limit, slot, &ip.src, transport, key, flows, now) {
                    if limit.syn_proxy_ticks != 0
                        && transport == TRANSPORT_TCP
                        && policy.flags & POLICY_DEFAULT_PASS == 0
                    {
                        return Ok(syn_proxy(frame, &limit, slot, family as u8, flows, now));
                    }
                    return Ok(if policy.flags & POLICY_DEFAULT_PASS != 0 {
                        Verdict::pass(reason::PASS_MONITOR_RATE_LIMITED)
                    } else {
                        Verdict::drop(reason::DROP_RATE_LIMITED)
                    });
                }
            }
            return Ok(Verdict::rule(slot));
        }
        let reply_from = self.port_entry(transport, sport).reply_from;
        let reply_to = dentry.reply_to;
        // With egress tracking any frame may answer a flow the Edge opened; the flow table
        // alone decides (the kernel's port filter in front of it is only a shortcut).
        let tracking = policy.flags & POLICY_TRACK_EGRESS != 0;
        if reply_from == 0 && reply_to == 0 && !tracking {
            return Ok(self.no_rule());
        }
        let key = flow_key(transport, &ip.dst, &ip.src, dport, sport);
        if let Some(state) = flows.flows.get_mut(&key)
            && state.role_mask & role_mask != 0
        {
            if expired(state, now, &policy, transport) {
                flows.flows.remove(&key);
            } else {
                state.last_seen = state.last_seen.max(now);
                if transport == TRANSPORT_TCP {
                    if tcp_flags & 0x01 != 0 {
                        state.flags |= FLOW_FIN_IN;
                    }
                    if tcp_flags & 0x04 != 0 {
                        state.flags |= FLOW_RST;
                    }
                }
                return Ok(if state.slot == TRACKED_SLOT {
                    Verdict::pass(reason::PASS_TRACKED_REPLY)
                } else {
                    Verdict::rule(state.slot)
                });
            }
        }
        let claimed = (reply_from != 0
            && self
                .match_class(reply_from, local_bits, &ip.src, role_mask)
                .is_some())
            || (reply_to != 0
                && self
                    .match_class(reply_to, local_bits, &ip.src, role_mask)
                    .is_some());
        Ok(if !claimed {
            self.no_rule()
        } else if policy.flags & POLICY_DEFAULT_PASS != 0 {
            Verdict::pass(reason::PASS_MONITOR_NOT_ESTABLISHED)
        } else {
            Verdict::drop(reason::DROP_NOT_ESTABLISHED)
        })
    }

    /// A frame the Edge sends on a NIC of `role_mask` (TC egress), recording outbound flows.
    pub fn egress(&self, frame: &[u8], role_mask: u32, flows: &mut FlowTable, now: u64) -> Verdict {
        self.try_egress(frame, role_mask, flows, now)
            .unwrap_or(Verdict::pass(reason::PASS_EGRESS_UNTRACKED))
    }

    fn try_egress(
        &self,
        frame: &[u8],
        role_mask: u32,
        flows: &mut FlowTable,
        now: u64,
    ) -> Parsed<Verdict> {
        let policy = *self.policy();
        let ip = match l3(frame)? {
            L3::Ip(ip) => ip,
            _ => return Ok(Verdict::pass(reason::PASS_EGRESS_UNTRACKED)),
        };
        // A bound NIC's own address: the Edge's, though no rule's local set holds it.
        let Some((local_bits, _)) = self.own_address(&ip.src) else {
            return Ok(Verdict::pass(reason::PASS_EGRESS_UNPROTECTED));
        };
        if ip.fragment == Fragment::Later {
            return Ok(Verdict::pass(reason::PASS_EGRESS_UNTRACKED));
        }
        let (transport, sport, dport, tcp_flags) = match l4(&ip)? {
            L4::Tcp {
                sport,
                dport,
                flags,
            } => (TRANSPORT_TCP, sport, dport, flags),
            L4::Udp { sport, dport } => (TRANSPORT_UDP, sport, dport, 0),
            _ => return Ok(Verdict::pass(reason::PASS_EGRESS_UNTRACKED)),
        };
        let sentry = self.port_entry(transport, sport);
        let slot = match self.port_entry(transport, dport).reply_from {
            0 => None,
            c => self.match_class(c, local_bits, &ip.dst, role_mask),
        }
        .or_else(|| match sentry.reply_to {
            0 => None,
            c => self.match_class(c, local_bits, &ip.dst, role_mask),
        });
        if let Some(slot) = slot {
            let key = flow_key(transport, &ip.src, &ip.dst, sport, dport);
            record(
                flows, key, slot, role_mask, &policy, transport, tcp_flags, now,
            );
            return Ok(Verdict::rule(slot));
        }
        if sentry.inbound != 0
            && self
                .match_class(sentry.inbound, local_bits, &ip.dst, role_mask)
                .is_some()
        {
            return Ok(Verdict::pass(reason::PASS_EGRESS_REPLY));
        }
        if policy.flags & POLICY_TRACK_EGRESS != 0 {
            let key = flow_key(transport, &ip.src, &ip.dst, sport, dport);
            record(
                flows,
                key,
                TRACKED_SLOT,
                role_mask,
                &policy,
                transport,
                tcp_flags,
                now,
            );
            return Ok(Verdict::pass(reason::PASS_EGRESS_TRACKED));
        }
        Ok(if policy.flags & POLICY_DROP_EGRESS != 0 {
            Verdict::drop(reason::DROP_EGRESS_NO_RULE)
        } else {
            Verdict::pass(reason::PASS_EGRESS_NO_RULE)
        })
    }
}

#[allow(clippy::too_many_arguments)]
fn record(
    flows: &mut FlowTable,
    key: FlowKey,
    slot: u32,
    role_mask: u32,
    policy: &PolicyEntry,
    transport: u32,
    tcp_flags: u8,
    now: u64,
) {
    let tcp = transport == TRANSPORT_TCP;
    let mut teardown = 0;
    if tcp && tcp_flags & 0x01 != 0 {
        teardown |= FLOW_FIN_OUT;
    }
    if tcp && tcp_flags & 0x04 != 0 {
        teardown |= FLOW_RST;
    }
    if let Some(state) = flows.flows.get_mut(&key) {
        let syn = tcp && tcp_flags & 0x12 == 0x02;
        if expired(state, now, policy, transport) || (syn && closing(state.flags)) {
            state.flags = 0;
        }
        state.slot = slot;
        state.role_mask = role_mask;
        state.last_seen = state.last_seen.max(now);
        state.flags |= teardown;
        return;
    }
    if teardown & FLOW_RST != 0 {
        return;
    }
    flows.flows.insert(
        key,
        FlowState {
            last_seen: now,
            slot,
            flags: teardown,
            role_mask,
            _pad: 0,
        },
    );
}

#[cfg(test)]
mod tests {
    //! The parser's departures from what etherparse would say on its own, one frame each.
    //! Frames are written out by hand: etherparse 0.18's own writer lays out the IPv6 fragment
    //! header wrongly (see `ipv6_exts`), so it cannot build the frames that test that.

    use super::*;

    const SRC6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    const DST6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

    fn eth(ethertype: u16, body: &[u8]) -> Vec<u8> {
        let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];
        f.extend(ethertype.to_be_bytes());
        f.extend(body);
        f
    }

    /// An IPv6 frame: `next` first, then `body` (extension headers and upper layer), with the
    /// payload length `body.len()` unless `payload_len` says otherwise.
    fn ipv6(next: u8, body: &[u8], payload_len: Option<u16>) -> Vec<u8> {
        let mut h = vec![0x60, 0, 0, 0];
        h.extend(payload_len.unwrap_or(body.len() as u16).to_be_bytes());
        h.extend([next, 64]);
        h.extend(SRC6);
        h.extend(DST6);
        h.extend(body);
        eth(0x86dd, &h)
    }

    fn tcp() -> Vec<u8> {
        let mut t = vec![0x9c, 0x40, 0x13, 0xc5, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02];
        t.resize(20, 0);
        t
    }

    fn fragment_header(next: u8, offset: u16, more: bool) -> Vec<u8> {
        let word = (offset << 3) | u16::from(more);
        let [a, b] = word.to_be_bytes();
        vec![next, 0, a, b, 0, 0, 0, 7]
    }

    fn parse_ip(frame: &[u8]) -> Parsed<Ip<'_>> {
        match l3(frame)? {
            L3::Ip(ip) => Ok(ip),
            _ => panic!("not IP"),
        }
    }

    #[test]
    fn the_ipv6_fragment_field_is_read_as_rfc_8200_lays_it_out() {
        for (offset, more, want) in [
            (0, true, Fragment::First),
            (0, false, Fragment::No),
            (1, false, Fragment::Later),
            (185, true, Fragment::Later),
        ] {
            let mut body = fragment_header(6, offset, more);
            body.extend(tcp());
            let f = ipv6(44, &body, None);
            let ip = parse_ip(&f).ok().expect("parses");
            assert_eq!(ip.fragment, want, "offset {offset} M {more}");
            if want != Fragment::Later {
                assert!(matches!(l4(&ip), Ok(L4::Tcp { dport: 5061, .. })));
            }
        }
    }

    #[test]
    fn a_zero_length_authentication_header_is_8_bytes() {
        let mut body = vec![17, 0, 0, 0, 0, 0, 0, 0];
        body.extend([0x13, 0xc4, 0x13, 0xc5, 0, 8, 0, 0]);
        let f = ipv6(51, &body, None);
        let ip = parse_ip(&f).ok().expect("parses");
        assert!(matches!(l4(&ip), Ok(L4::Udp { dport: 5061, .. })));
        // Fewer than 12 bytes after it: still 8 bytes of header, then an empty datagram.
        let f = ipv6(51, &[6, 0, 0, 0, 0, 0, 0, 0], None);
        let ip = parse_ip(&f).ok().expect("parses");
        assert!(ip.proto == ip_number::TCP && ip.l4.is_empty());
        assert!(l4(&ip).is_err());
    }

    #[test]
    fn nine_extension_headers_are_malformed_even_when_the_ninth_is_a_later_fragment() {
        let chain = |last: Vec<u8>| {
            let mut body = Vec::new();
            for _ in 0..8 {
                body.extend([60, 0, 0, 0, 0, 0, 0, 0]);
            }
            let n = body.len();
            body[n - 8] = 44;
            body.extend(last);
            body.extend(tcp());
            ipv6(60, &body, None)
        };
        assert!(parse_ip(&chain(fragment_header(6, 1, false))).is_err());
        assert!(parse_ip(&chain(fragment_header(6, 0, true))).is_err());
        assert!(parse_ip(&chain(fragment_header(6, 0, false))).is_err());
    }

    #[test]
    fn an_extension_header_in_the_padding_is_malformed() {
        let mut body = fragment_header(6, 0, false);
        body.extend(tcp());
        assert!(parse_ip(&ipv6(44, &body, Some(4))).is_err());
        // Payload length 0: an empty datagram, unless hop-by-hop follows (a jumbogram).
        let ip0 = ipv6(6, &tcp(), Some(0));
        assert!(parse_ip(&ip0).is_ok_and(|ip| ip.l4.is_empty()));
        assert!(parse_ip(&ipv6(0, &[6, 0, 0, 0, 0, 0, 0, 0], Some(0))).is_err());
    }

    #[test]
    fn icmp_needs_4_bytes_and_udp_a_length_of_8() {
        let ty = |n: usize| {
            let f = ipv6(58, &[135, 0, 0, 0, 0, 0, 0, 0][..n], None);
            icmp_type(&parse_ip(&f).ok().expect("parses")).ok()
        };
        assert_eq!(ty(4), Some(135));
        assert_eq!(ty(3), None);
        let f = ipv6(17, &[0x13, 0xc4, 0x13, 0xc5, 0, 0, 0, 0], None);
        assert!(l4(&parse_ip(&f).ok().expect("parses")).is_err());
        // A first fragment's UDP length counts the fragments to come.
        let mut body = fragment_header(17, 0, true);
        body.extend([0x13, 0xc4, 0x13, 0xc5, 0x05, 0xdc, 0, 0]);
        let f = ipv6(44, &body, None);
        assert!(matches!(
            l4(&parse_ip(&f).ok().expect("parses")),
            Ok(L4::Udp { .. })
        ));
    }

    #[test]
    fn only_8100_and_88a8_are_tags_and_only_two_of_them() {
        let tagged = |tpids: &[u16]| {
            let mut body = Vec::new();
            for i in 0..tpids.len() {
                let next = tpids.get(i + 1).copied().unwrap_or(0x0806);
                body.extend([0, 1]);
                body.extend(next.to_be_bytes());
            }
            body.extend([0; 28]);
            eth(tpids[0], &body)
        };
        assert!(matches!(l3(&tagged(&[0x88a8, 0x8100])), Ok(L3::Arp)));
        assert!(matches!(l3(&tagged(&[0x9100])), Ok(L3::Other)));
        assert!(l3(&tagged(&[0x8100, 0x8100, 0x8100])).is_err());
    }
}
