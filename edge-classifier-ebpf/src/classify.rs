//! The decision: a parsed frame, its addresses' set bits and the port tables give the rule or
//! the reason that decides it, on ingress (XDP) and on egress (TC).

use aya_ebpf::programs::{TcContext, XdpContext};
use edge_classifier_common::{
    DHCP4_CLIENT, DHCP4_SERVER, DHCP6_CLIENT, DHCP6_SERVER, MAX_CANDIDATES, POLICY_DEFAULT_PASS,
    POLICY_DROP_EGRESS, POLICY_PASS_FRAGMENTS, POLICY_PASS_NON_IP, POLICY_PASS_UNPROTECTED,
    POLICY_PROTECT_IFACE_ADDRS, POLICY_TRACK_EGRESS, PolicyEntry, SET_ANY, SET_PROTECTED,
    TRACKED_SLOT, TRANSPORT_TCP, TRANSPORT_UDP, layout, reason,
};

use crate::{
    addr::{Remote, local_bits},
    flow,
    maps::*,
    parse::{self, Addr, Fragment, L3, L4, Malformed},
};

/// Whether a frame passes and which counter (reason or rule) records it.
#[derive(Clone, Copy)]
pub(crate) struct Verdict {
    pub(crate) pass: bool,
    pub(crate) counter: u32,
}

impl Verdict {
    pub(crate) const fn pass(reason: u32) -> Self {
        Self {
            pass: true,
            counter: reason,
        }
    }
    pub(crate) const fn drop(reason: u32) -> Self {
        Self {
            pass: false,
            counter: reason,
        }
    }
    pub(crate) const fn rule(slot: u32) -> Self {
        Self {
            pass: true,
            counter: layout::rule_counter(slot),
        }
    }
}

/// One frame's decision, read top to bottom in the order the spec gives (link control, the
/// destination's protection, fragments, L4, inbound rules, replies). It is longer than the
/// rest on purpose: every early return is a verdict a reader checks against SPEC §3–4 in
/// sequence, and the whole is inlined into the XDP entry point, so splitting it would only
/// scatter that sequence (and give LLVM more stack to spill across).
#[inline(always)]
pub(crate) fn try_classify(
    ctx: &XdpContext,
    word: u32,
    role_mask: u32,
    policy: &PolicyEntry,
) -> Result<Verdict, Malformed> {
    let active = word & 1;
    let l3 = match parse::l3(ctx)? {
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

    // Neighbour discovery keeps the link alive whatever the address policy says.
    // A truncated ICMPv6 header is not neighbour discovery; what it is to the Edge is decided
    // below, by its destination first, like any other truncated frame.
    if l3.is_v6
        && l3.proto == parse::IPPROTO_ICMPV6
        && l3.fragment != Fragment::Later
        && let Ok(ty) = parse::icmp_type(ctx, &l3)
        && (133..=137).contains(&ty)
    {
        return Ok(Verdict::pass(reason::PASS_NEIGHBOUR_DISCOVERY));
    }

    // Protected only as an address of a bound NIC (a link-local one, say): no rule's local set
    // holds it, so only DHCP replies to the client and what the policies allow reach it.
    let Some((local_bits, nic_only)) = own_address(active, &l3.dst, policy) else {
        return Ok(if policy.flags & POLICY_PASS_UNPROTECTED != 0 {
            Verdict::pass(reason::PASS_UNPROTECTED)
        } else {
            Verdict::drop(reason::DROP_UNPROTECTED)
        });
    };

    if l3.fragment == Fragment::Later {
        return Ok(if policy.flags & POLICY_PASS_FRAGMENTS != 0 {
            Verdict::pass(reason::PASS_FRAGMENT)
        } else {
            Verdict::drop(reason::DROP_FRAGMENT)
        });
    }

    let (transport, sport, dport, tcp_flags) = match parse::l4(ctx, &l3)? {
        L4::Tcp {
            sport,
            dport,
            flags,
        } => (TRANSPORT_TCP, sport, dport, flags),
        L4::Udp { sport, dport } => (TRANSPORT_UDP, sport, dport, 0),
        L4::Icmp { ty } => {
            let allowed = if l3.is_v6 {
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
        L4::Other => return Ok(no_rule(policy)),
    };
    if nic_only && transport == TRANSPORT_UDP && dhcp_reply(&l3.dst, sport, dport) {
        return Ok(Verdict::pass(reason::PASS_DHCP_CLIENT));
    }

    let mut remote = Remote {
        addr: &l3.src,
        bits: None,
        active,
    };
    let dentry = PORTS.get(layout::port(active, transport, dport as u32));
    if let Some(entry) = dentry
        && entry.inbound != 0
        && let Some(slot) = match_class(active, entry.inbound, local_bits, &mut remote, role_mask)
    {
        return Ok(Verdict::rule(slot));
    }
    // A frame from an outbound rule's remote service port, or to its local port range, claims to
    // answer a flow the Edge opened. Anyone can forge that claim; only the flow table, filled on
    // egress, can prove it. The flow names its rule, so a reply needs no rule matching at all:
    // a flow lives on until it ends even if a reload changes its rule, like conntrack.
    let reply_from = match PORTS.get(layout::port(active, transport, sport as u32)) {
        Some(entry) => entry.reply_from,
        None => 0,
    };
    let reply_to = match dentry {
        Some(entry) => entry.reply_to,
        None => 0,
    };
    // Egress tracking records flows no rule covers: a frame from a port the Edge has talked to
    // may answer one of them. Only the flow table says whether it does.
    let tracked = policy.flags & POLICY_TRACK_EGRESS != 0 && flow::tracked_port(transport, sport);
    if reply_from == 0 && reply_to == 0 && !tracked {
        return Ok(no_rule(policy));
    }
    if let Some(key) = flow::key(transport, &l3.dst, &l3.src, dport, sport)
        && let Some(slot) = flow::reply(&key, word, role_mask, policy, transport, tcp_flags)
    {
        return Ok(if slot == TRACKED_SLOT {
            Verdict::pass(reason::PASS_TRACKED_REPLY)
        } else {
            Verdict::rule(slot)
        });
    }
    let claimed = (reply_from != 0
        && match_class(active, reply_from, local_bits, &mut remote, role_mask).is_some())
        || (reply_to != 0
            && match_class(active, reply_to, local_bits, &mut remote, role_mask).is_some());
    Ok(if !claimed {
        no_rule(policy)
    } else if policy.flags & POLICY_DEFAULT_PASS != 0 {
        // Monitor mode drops nothing a rule decides: counted as what it would have been.
        Verdict::pass(reason::PASS_MONITOR_NOT_ESTABLISHED)
    } else {
        Verdict::drop(reason::DROP_NOT_ESTABLISHED)
    })
}

/// Egress: the Edge's side of the matrix. Frames of flows an outbound rule allows are recorded
/// and counted under the rule; replies from inbound services are counted; the rest is tracked
/// (recorded for its replies), passed or dropped as `policy.egress` says.
#[inline(always)]
pub(crate) fn try_egress(
    ctx: &TcContext,
    active: u32,
    role_mask: u32,
    policy: &PolicyEntry,
) -> Result<Verdict, Malformed> {
    let l3 = match parse::l3(ctx)? {
        L3::Ip(ip) => ip,
        L3::Arp | L3::Other => return Ok(Verdict::pass(reason::PASS_EGRESS_UNTRACKED)),
    };
    // A bound NIC's own address no set names (a SLAAC address, a second IPv4 address) is the
    // Edge's as much as on ingress: no rule's local set holds it, but what it opens is tracked
    // like the rest of the Edge's own flows.
    let Some((local_bits, _)) = own_address(active, &l3.src, policy) else {
        return Ok(Verdict::pass(reason::PASS_EGRESS_UNPROTECTED));
    };
    if l3.fragment == Fragment::Later {
        return Ok(Verdict::pass(reason::PASS_EGRESS_UNTRACKED));
    }
    let (transport, sport, dport, tcp_flags) = match parse::l4(ctx, &l3)? {
        L4::Tcp {
            sport,
            dport,
            flags,
        } => (TRANSPORT_TCP, sport, dport, flags),
        L4::Udp { sport, dport } => (TRANSPORT_UDP, sport, dport, 0),
        _ => return Ok(Verdict::pass(reason::PASS_EGRESS_UNTRACKED)),
    };
    let mut remote = Remote {
        addr: &l3.dst,
        bits: None,
        active,
    };
    // The same classes ingress uses for replies, seen from the other side: an outbound rule's
    // remote service port is this frame's destination, its local range holds the source.
    let mut slot = None;
    if let Some(entry) = PORTS.get(layout::port(active, transport, dport as u32))
        && entry.reply_from != 0
    {
        slot = match_class(active, entry.reply_from, local_bits, &mut remote, role_mask);
    }
    let sentry = PORTS.get(layout::port(active, transport, sport as u32));
    if slot.is_none()
        && let Some(entry) = sentry
        && entry.reply_to != 0
    {
        slot = match_class(active, entry.reply_to, local_bits, &mut remote, role_mask);
    }
    // One place records flows, for a rule or for tracking: two inlined copies of the record
    // code also gave LLVM a register allocation the verifier refused.
    let (slot, verdict) = match slot {
        Some(slot) => (slot, Verdict::rule(slot)),
        None => {
            if let Some(entry) = sentry
                && entry.inbound != 0
                && match_class(active, entry.inbound, local_bits, &mut remote, role_mask).is_some()
            {
                return Ok(Verdict::pass(reason::PASS_EGRESS_REPLY));
            }
            if policy.flags & POLICY_TRACK_EGRESS == 0 {
                return Ok(if policy.flags & POLICY_DROP_EGRESS != 0 {
                    Verdict::drop(reason::DROP_EGRESS_NO_RULE)
                } else {
                    Verdict::pass(reason::PASS_EGRESS_NO_RULE)
                });
            }
            flow::mark_tracked_port(transport, dport);
            (TRACKED_SLOT, Verdict::pass(reason::PASS_EGRESS_TRACKED))
        }
    };
    if let Some(key) = flow::key(transport, &l3.src, &l3.dst, sport, dport) {
        flow::record(&key, slot, role_mask, policy, transport, tcp_flags);
    }
    Ok(verdict)
}

/// The set bits of `addr` when it is one of the Edge's own addresses, and whether it is so
/// only as a bound NIC's address (`POLICY_PROTECT_IFACE_ADDRS`; no named set holds it); `None`
/// when the Edge does not protect it.
#[inline(always)]
fn own_address(active: u32, addr: &Addr, policy: &PolicyEntry) -> Option<(u64, bool)> {
    let bits = local_bits(active, addr);
    if bits & SET_PROTECTED != 0 {
        Some((bits, false))
    } else if policy.flags & POLICY_PROTECT_IFACE_ADDRS != 0 && iface_addr(addr) {
        Some((SET_PROTECTED | SET_ANY, true))
    } else {
        None
    }
}

/// An address configured on a bound NIC.
#[inline(always)]
pub(crate) fn iface_addr(addr: &Addr) -> bool {
    // Keys are address bytes held in u32 words (native order): a byte-array key on the stack
    // gets word stores at odd offsets, which the verifier refuses.
    match addr {
        Addr::V4(a) => {
            let k = u32::from_ne_bytes(*a);
            unsafe { IFACE_ADDRS_V4.get(k) }.is_some()
        }
        Addr::V6(a) => {
            let k = [
                u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
                u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
                u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
                u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
            ];
            unsafe { IFACE_ADDRS_V6.get(k) }.is_some()
        }
    }
}

/// A DHCP server's reply to the client: 67 → 68, or 547 → 546 to a link-local address.
#[inline(always)]
pub(crate) fn dhcp_reply(dst: &Addr, sport: u16, dport: u16) -> bool {
    match dst {
        Addr::V4(_) => sport == DHCP4_SERVER && dport == DHCP4_CLIENT,
        Addr::V6(a) => {
            sport == DHCP6_SERVER && dport == DHCP6_CLIENT && a[0] == 0xfe && a[1] & 0xc0 == 0x80
        }
    }
}

#[inline(always)]
pub(crate) fn no_rule(policy: &PolicyEntry) -> Verdict {
    if policy.flags & POLICY_DEFAULT_PASS != 0 {
        Verdict::pass(reason::PASS_MONITOR)
    } else {
        Verdict::drop(reason::DROP_NO_RULE)
    }
}

#[inline(always)]
pub(crate) fn bit_set(map: &[u64; 4], bit: u8) -> bool {
    let word = (bit >> 6) as usize;
    word < 4 && map[word] & (1u64 << (bit & 63)) != 0
}

#[inline(always)]
pub(crate) fn match_class(
    active: u32,
    class: u32,
    local_bits: u64,
    remote: &mut Remote,
    role_mask: u32,
) -> Option<u32> {
    let class = CLASSES.get(layout::class(active, class))?;
    let n = class.count as usize;
    for i in 0..MAX_CANDIDATES {
        if i >= n {
            break;
        }
        let rule = &class.rules[i];
        if rule.role_mask & role_mask == 0 || rule.local_mask & local_bits == 0 {
            continue;
        }
        if rule.remote_mask & SET_ANY == 0 && rule.remote_mask & remote.bits() == 0 {
            continue;
        }
        return Some(rule.slot);
    }
    None
}
