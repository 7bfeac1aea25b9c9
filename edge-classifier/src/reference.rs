//! The reference classifier: SPEC §3–4 written a second time, in plain Rust over the same
//! compiled catalogue, for `explain` and for checking the kernel program frame by frame. It
//! follows the kernel program's rules exactly (header limits, fragment handling, first match
//! wins, flow expiry) but shares no code with it.

use std::collections::HashMap;

use edge_classifier_common::{
    FLOW_FIN_IN, FLOW_FIN_OUT, FLOW_RST, FlowKey, FlowState, MAX_CANDIDATES, POLICY_DEFAULT_PASS,
    POLICY_DROP_EGRESS, POLICY_PASS_FRAGMENTS, POLICY_PASS_NON_IP, POLICY_PASS_UNPROTECTED,
    POLICY_PROTECT_IFACE_ADDRS, PORT_SPACE, Policy, SET_ANY, SET_PROTECTED, TRANSPORT_TCP,
    TRANSPORT_UDP, reason,
};
use ipnet::IpNet;

use crate::compile::Compiled;

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

/// The outbound flow table as the reference sees it, fed explicitly.
#[derive(Debug, Clone, Default)]
pub struct FlowTable {
    pub flows: HashMap<FlowKey, FlowState>,
}

const ETH_HLEN: usize = 14;
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

struct Ip {
    is_v6: bool,
    proto: u8,
    src: Addr,
    dst: Addr,
    l4_off: usize,
    l4_end: usize,
    fragment: Fragment,
}

enum L3 {
    Arp,
    Other,
    Ip(Ip),
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

fn bytes(frame: &[u8], off: usize, n: usize) -> Parsed<&[u8]> {
    frame
        .get(off..off.checked_add(n).ok_or(Malformed)?)
        .ok_or(Malformed)
}

fn be16(frame: &[u8], off: usize) -> Parsed<u16> {
    let b = bytes(frame, off, 2)?;
    Ok(u16::from_be_bytes([b[0], b[1]]))
}

fn l3(frame: &[u8]) -> Parsed<L3> {
    let mut ethertype = be16(frame, ETH_HLEN - 2)?;
    let mut off = ETH_HLEN;
    for _ in 0..2 {
        if ethertype != 0x8100 && ethertype != 0x88a8 {
            break;
        }
        ethertype = be16(frame, off + 2)?;
        off += 4;
    }
    match ethertype {
        0x0800 => ipv4(frame, off).map(L3::Ip),
        0x86dd => ipv6(frame, off).map(L3::Ip),
        0x0806 => Ok(L3::Arp),
        0x8100 | 0x88a8 => Err(Malformed),
        _ => Ok(L3::Other),
    }
}

fn ipv4(frame: &[u8], off: usize) -> Parsed<Ip> {
    let h = bytes(frame, off, 20)?;
    if h[0] >> 4 != 4 {
        return Err(Malformed);
    }
    let ihl = ((h[0] & 0x0f) as usize) * 4;
    let total = u16::from_be_bytes([h[2], h[3]]) as usize;
    if ihl < 20 || total < ihl || off + total > frame.len() {
        return Err(Malformed);
    }
    let frag = u16::from_be_bytes([h[6], h[7]]);
    let fragment = if frag & 0x1fff != 0 {
        Fragment::Later
    } else if frag & 0x2000 != 0 {
        Fragment::First
    } else {
        Fragment::No
    };
    Ok(Ip {
        is_v6: false,
        proto: h[9],
        src: Addr::V4(h[12..16].try_into().expect("4 bytes")),
        dst: Addr::V4(h[16..20].try_into().expect("4 bytes")),
        l4_off: off + ihl,
        l4_end: off + total,
        fragment,
    })
}

fn ipv6(frame: &[u8], off: usize) -> Parsed<Ip> {
    let h = bytes(frame, off, 40)?;
    if h[0] >> 4 != 6 {
        return Err(Malformed);
    }
    let payload = u16::from_be_bytes([h[4], h[5]]) as usize;
    let start = off + 40;
    let end = start + payload;
    // Payload length 0 is a jumbogram only with hop-by-hop next (RFC 2675), which fails closed;
    // otherwise it is an empty datagram.
    if (payload == 0 && h[6] == 0) || end > frame.len() {
        return Err(Malformed);
    }
    let mut next = h[6];
    let mut cur = start;
    let mut fragment = Fragment::No;
    // At most MAX_IPV6_EXT extension headers, then the upper-layer one.
    for _ in 0..=MAX_IPV6_EXT {
        let len = match next {
            0 | 43 | 60 => {
                let e = bytes(frame, cur, 2)?;
                next = e[0];
                (e[1] as usize + 1) * 8
            }
            44 => {
                let e = bytes(frame, cur, 8)?;
                next = e[0];
                let fo = u16::from_be_bytes([e[2], e[3]]);
                if fo >> 3 != 0 {
                    fragment = Fragment::Later;
                } else if fo & 1 != 0 {
                    fragment = Fragment::First;
                }
                8
            }
            51 => {
                let e = bytes(frame, cur, 2)?;
                next = e[0];
                (e[1] as usize + 2) * 4
            }
            _ => {
                return Ok(Ip {
                    is_v6: true,
                    proto: next,
                    src: Addr::V6(h[8..24].try_into().expect("16 bytes")),
                    dst: Addr::V6(h[24..40].try_into().expect("16 bytes")),
                    l4_off: cur,
                    l4_end: end,
                    fragment,
                });
            }
        };
        // A header is believed only once it is known to lie within the datagram.
        cur += len;
        if cur > start + MAX_IPV6_EXT_BYTES || cur > end {
            return Err(Malformed);
        }
        if fragment == Fragment::Later {
            return Ok(Ip {
                is_v6: true,
                proto: next,
                src: Addr::V6(h[8..24].try_into().expect("16 bytes")),
                dst: Addr::V6(h[24..40].try_into().expect("16 bytes")),
                l4_off: cur,
                l4_end: end,
                fragment,
            });
        }
    }
    Err(Malformed)
}

fn icmp_type(frame: &[u8], ip: &Ip) -> Parsed<u8> {
    if ip.l4_off + 4 > ip.l4_end {
        return Err(Malformed);
    }
    Ok(bytes(frame, ip.l4_off, 1)?[0])
}

fn short(fragmented: bool) -> Parsed<L4> {
    if fragmented {
        Ok(L4::ShortFragment)
    } else {
        Err(Malformed)
    }
}

fn l4(frame: &[u8], ip: &Ip) -> Parsed<L4> {
    let off = ip.l4_off;
    let avail = ip.l4_end.saturating_sub(off);
    let fragmented = ip.fragment == Fragment::First;
    match ip.proto {
        6 => {
            if avail < 20 {
                return short(fragmented);
            }
            let h = bytes(frame, off, 20)?;
            let doff = ((h[12] >> 4) as usize) * 4;
            if doff < 20 {
                return Err(Malformed);
            }
            if doff > avail {
                return short(fragmented);
            }
            Ok(L4::Tcp {
                sport: u16::from_be_bytes([h[0], h[1]]),
                dport: u16::from_be_bytes([h[2], h[3]]),
                flags: h[13],
            })
        }
        17 => {
            if avail < 8 {
                return short(fragmented);
            }
            let h = bytes(frame, off, 8)?;
            let len = u16::from_be_bytes([h[4], h[5]]) as usize;
            if len < 8 || (!fragmented && len > avail) {
                return Err(Malformed);
            }
            Ok(L4::Udp {
                sport: u16::from_be_bytes([h[0], h[1]]),
                dport: u16::from_be_bytes([h[2], h[3]]),
            })
        }
        1 if !ip.is_v6 => Ok(L4::Icmp {
            ty: icmp_type(frame, ip)?,
        }),
        58 if ip.is_v6 => Ok(L4::Icmp {
            ty: icmp_type(frame, ip)?,
        }),
        _ => Ok(L4::Other),
    }
}

/// Longest-prefix match of the compiled address sets, probing each prefix length.
struct Sets {
    v4: HashMap<(u8, u32), u64>,
    v6: HashMap<(u8, u128), u64>,
    v4_lens: Vec<u8>,
    v6_lens: Vec<u8>,
}

impl Sets {
    fn new(c: &Compiled) -> Sets {
        let mut s = Sets {
            v4: HashMap::new(),
            v6: HashMap::new(),
            v4_lens: Vec::new(),
            v6_lens: Vec::new(),
        };
        for (net, bits) in c.prefixes_v4.iter().chain(&c.prefixes_v6) {
            match net {
                IpNet::V4(n) => {
                    s.v4.insert((n.prefix_len(), u32::from(n.network())), *bits);
                    s.v4_lens.push(n.prefix_len());
                }
                IpNet::V6(n) => {
                    s.v6.insert((n.prefix_len(), u128::from(n.network())), *bits);
                    s.v6_lens.push(n.prefix_len());
                }
            }
        }
        for l in [&mut s.v4_lens, &mut s.v6_lens] {
            l.sort_unstable_by(|a, b| b.cmp(a));
            l.dedup();
        }
        s
    }

    fn bits(&self, addr: &Addr) -> u64 {
        match addr {
            Addr::V4(a) => {
                let a = u32::from_be_bytes(*a);
                self.v4_lens
                    .iter()
                    .find_map(|&len| {
                        let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
                        self.v4.get(&(len, a & mask)).copied()
                    })
                    .unwrap_or(0)
            }
            Addr::V6(a) => {
                let a = u128::from_be_bytes(*a);
                self.v6_lens
                    .iter()
                    .find_map(|&len| {
                        let mask = if len == 0 {
                            0
                        } else {
                            u128::MAX << (128 - len)
                        };
                        self.v6.get(&(len, a & mask)).copied()
                    })
                    .unwrap_or(0)
            }
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

fn expired(state: &FlowState, now: u64, policy: &Policy, transport: u32) -> bool {
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

    fn nic_addr(&self, addr: &Addr) -> bool {
        let ip = match addr {
            Addr::V4(a) => std::net::IpAddr::from(*a),
            Addr::V6(a) => std::net::IpAddr::from(*a),
        };
        self.nic_addrs.contains(&ip)
    }

    fn policy(&self) -> &Policy {
        &self.compiled.policy
    }

    fn no_rule(&self) -> Verdict {
        if self.policy().flags & POLICY_DEFAULT_PASS != 0 {
            Verdict::pass(reason::PASS_MONITOR)
        } else {
            Verdict::drop(reason::DROP_NO_RULE)
        }
    }

    fn port_entry(&self, transport: u32, port: u16) -> edge_classifier_common::PortEntry {
        self.compiled.ports[(transport * PORT_SPACE) as usize + port as usize]
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
            && ip.proto == 58
            && ip.fragment != Fragment::Later
            && icmp_type(frame, &ip).is_ok_and(|ty| (133..=137).contains(&ty))
        {
            return Ok(Verdict::pass(reason::PASS_NEIGHBOUR_DISCOVERY));
        }
        let mut local_bits = self.sets.bits(&ip.dst);
        // An address of a bound NIC that no set names: protected, matched by no rule.
        let mut nic_only = false;
        if local_bits & SET_PROTECTED == 0 {
            if policy.flags & POLICY_PROTECT_IFACE_ADDRS != 0 && self.nic_addr(&ip.dst) {
                local_bits = SET_PROTECTED | SET_ANY;
                nic_only = true;
            } else {
                return Ok(if policy.flags & POLICY_PASS_UNPROTECTED != 0 {
                    Verdict::pass(reason::PASS_UNPROTECTED)
                } else {
                    Verdict::drop(reason::DROP_UNPROTECTED)
                });
            }
        }
        if ip.fragment == Fragment::Later {
            return Ok(if policy.flags & POLICY_PASS_FRAGMENTS != 0 {
                Verdict::pass(reason::PASS_FRAGMENT)
            } else {
                Verdict::drop(reason::DROP_FRAGMENT)
            });
        }
        let (transport, sport, dport, tcp_flags) = match l4(frame, &ip)? {
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
            return Ok(Verdict::rule(slot));
        }
        let reply_from = self.port_entry(transport, sport).reply_from;
        let reply_to = dentry.reply_to;
        if reply_from == 0 && reply_to == 0 {
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
                return Ok(Verdict::rule(state.slot));
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
        let local_bits = self.sets.bits(&ip.src);
        if local_bits & SET_PROTECTED == 0 {
            return Ok(Verdict::pass(reason::PASS_EGRESS_UNPROTECTED));
        }
        if ip.fragment == Fragment::Later {
            return Ok(Verdict::pass(reason::PASS_EGRESS_UNTRACKED));
        }
        let (transport, sport, dport, tcp_flags) = match l4(frame, &ip)? {
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
    policy: &Policy,
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
