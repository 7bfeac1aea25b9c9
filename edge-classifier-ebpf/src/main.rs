//! The data plane. XDP ingress: every frame is matched against the port matrix in the maps below
//! and passed or dropped. TC egress: frames the Edge sends on outbound rules are recorded in the
//! flow table that ingress replies must match. Every frame is counted under the rule or reason
//! that decided it.
#![no_std]
#![no_main]

mod flow;
mod maps;
mod parse;

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC, xdp_action},
    macros::{classifier, xdp},
    maps::lpm_trie::Key,
    programs::{TcContext, XdpContext},
};
use edge_classifier_common::{
    DHCP4_CLIENT, DHCP4_SERVER, DHCP6_CLIENT, DHCP6_SERVER, IFACE_SLOTS, LOCALS_V4, LOCALS_V6,
    Lpm4, Lpm6, MAX_CANDIDATES, POLICY_DEFAULT_PASS, POLICY_DROP_EGRESS, POLICY_PASS_FRAGMENTS,
    POLICY_PASS_NON_IP, POLICY_PASS_UNPROTECTED, POLICY_PROTECT_IFACE_ADDRS, Policy, SET_ANY,
    SET_PROTECTED, SMALL4, SMALL6, STRIDE_BLOCK, TRANSPORT_TCP, TRANSPORT_UDP, layout, reason,
};
use maps::*;
use parse::{Addr, Fragment, Frame, L3, L4, Malformed};

/// Whether a frame passes and which counter (reason or rule) records it.
#[derive(Clone, Copy)]
struct Verdict {
    pass: bool,
    counter: u32,
}

impl Verdict {
    const fn pass(reason: u32) -> Self {
        Self {
            pass: true,
            counter: reason,
        }
    }
    const fn drop(reason: u32) -> Self {
        Self {
            pass: false,
            counter: reason,
        }
    }
    const fn rule(slot: u32) -> Self {
        Self {
            pass: true,
            counter: layout::rule_counter(slot),
        }
    }
}

/// The binding of the interface a frame is on: (counter block, role bit); block 0 is unbound.
#[inline(always)]
fn binding(ifindex: u32) -> (u32, u32) {
    match IFACES.get(ifindex % IFACE_SLOTS) {
        Some(iface) if iface.ifindex == ifindex && iface.block != 0 => {
            (iface.block, iface.role_mask)
        }
        _ => (0, 0),
    }
}

/// The `ACTIVE` word: bit 0 is the buffer to read; the bits above count the flips and flow
/// purges, so that a reply cache entry made before one is not trusted after it.
#[inline(always)]
fn active_word() -> u32 {
    match ACTIVE.get(0) {
        Some(a) => *a,
        None => 0,
    }
}

#[inline(always)]
fn active_buffer() -> u32 {
    active_word() & 1
}

#[xdp]
pub fn edge_classifier(ctx: XdpContext) -> u32 {
    let (block, role_mask) = binding(ctx.ingress_ifindex() as u32);
    let verdict = if block == 0 {
        Verdict::pass(reason::PASS_UNBOUND_INTERFACE)
    } else {
        let word = active_word();
        let active = word & 1;
        match POLICY.get(active) {
            Some(policy) => match try_classify(&ctx, word, role_mask, policy) {
                Ok(v) => v,
                Err(Malformed) => Verdict::drop(reason::DROP_MALFORMED),
            },
            None => Verdict::drop(reason::DROP_MALFORMED),
        }
    };
    count(block, verdict.counter, 1, Frame::len(&ctx));
    if verdict.pass {
        xdp_action::XDP_PASS
    } else {
        xdp_action::XDP_DROP
    }
}

/// Bytes pulled into the linear area so the parser can read up to the ports of a frame with two
/// VLAN tags and IPv6 extension headers.
const EGRESS_PULL: u32 = 14 + 8 + 40 + 512 + 20;

#[classifier]
pub fn edge_egress(ctx: TcContext) -> i32 {
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let (block, role_mask) = binding(ifindex);
    // A GSO skb is many frames on the wire; count them as such.
    let segs = unsafe { (*ctx.skb.skb).gso_segs }.max(1);
    let verdict = if block == 0 {
        Verdict::pass(reason::PASS_UNBOUND_INTERFACE)
    } else {
        let want = ctx.len().min(EGRESS_PULL);
        if ((ctx.data_end() - ctx.data()) as u32) < want {
            // Locally built headers are linear already; this is for the odd forwarded skb.
            let _ = ctx.pull_data(want);
        }
        let active = active_buffer();
        match POLICY.get(active) {
            Some(policy) => match try_egress(&ctx, active, role_mask, policy) {
                Ok(v) => v,
                // Egress is the Edge's own traffic: what it cannot parse is not ours to stop.
                Err(Malformed) => Verdict::pass(reason::PASS_EGRESS_UNTRACKED),
            },
            None => Verdict::pass(reason::PASS_EGRESS_UNTRACKED),
        }
    };
    count(block, verdict.counter, segs as u64, Frame::len(&ctx));
    if verdict.pass {
        // Let any later tc program have its say; with none, the frame is sent.
        TC_ACT_UNSPEC
    } else {
        TC_ACT_SHOT
    }
}

#[inline(always)]
fn count(block: u32, counter: u32, packets: u64, len: usize) {
    if let Some(c) = STATS.get_ptr_mut(layout::stats(block, counter)) {
        // Per-CPU slot: no other writer, so plain adds are enough.
        unsafe {
            (*c).packets += packets;
            (*c).bytes += len as u64;
        }
    }
}

#[inline(always)]
fn try_classify(
    ctx: &XdpContext,
    word: u32,
    role_mask: u32,
    policy: &Policy,
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

    let mut local_bits = local_bits(active, &l3.dst);
    // Protected only as an address of a bound NIC (a link-local one, say): no rule's local set
    // holds it, so only DHCP replies to the client and what the policies allow reach it.
    let mut nic_only = false;
    if local_bits & SET_PROTECTED == 0 {
        if policy.flags & POLICY_PROTECT_IFACE_ADDRS != 0 && iface_addr(&l3.dst) {
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
    if reply_from == 0 && reply_to == 0 {
        return Ok(no_rule(policy));
    }
    if let Some(key) = flow::key(transport, &l3.dst, &l3.src, dport, sport)
        && let Some(slot) = flow::reply(&key, word, role_mask, policy, transport, tcp_flags)
    {
        return Ok(Verdict::rule(slot));
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
/// and counted under the rule; replies from inbound services and everything else are counted.
#[inline(always)]
fn try_egress(
    ctx: &TcContext,
    active: u32,
    role_mask: u32,
    policy: &Policy,
) -> Result<Verdict, Malformed> {
    let l3 = match parse::l3(ctx)? {
        L3::Ip(ip) => ip,
        L3::Arp | L3::Other => return Ok(Verdict::pass(reason::PASS_EGRESS_UNTRACKED)),
    };
    let local_bits = local_bits(active, &l3.src);
    if local_bits & SET_PROTECTED == 0 {
        return Ok(Verdict::pass(reason::PASS_EGRESS_UNPROTECTED));
    }
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
    if let Some(slot) = slot {
        if let Some(key) = flow::key(transport, &l3.src, &l3.dst, sport, dport) {
            flow::record(&key, slot, role_mask, policy, transport, tcp_flags);
        }
        return Ok(Verdict::rule(slot));
    }
    if let Some(entry) = sentry
        && entry.inbound != 0
        && match_class(active, entry.inbound, local_bits, &mut remote, role_mask).is_some()
    {
        return Ok(Verdict::pass(reason::PASS_EGRESS_REPLY));
    }
    Ok(if policy.flags & POLICY_DROP_EGRESS != 0 {
        Verdict::drop(reason::DROP_EGRESS_NO_RULE)
    } else {
        Verdict::pass(reason::PASS_EGRESS_NO_RULE)
    })
}

/// An address configured on a bound NIC.
#[inline(always)]
fn iface_addr(addr: &Addr) -> bool {
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
fn dhcp_reply(dst: &Addr, sport: u16, dport: u16) -> bool {
    match dst {
        Addr::V4(_) => sport == DHCP4_SERVER && dport == DHCP4_CLIENT,
        Addr::V6(a) => {
            sport == DHCP6_SERVER && dport == DHCP6_CLIENT && a[0] == 0xfe && a[1] & 0xc0 == 0x80
        }
    }
}

#[inline(always)]
fn no_rule(policy: &Policy) -> Verdict {
    if policy.flags & POLICY_DEFAULT_PASS != 0 {
        Verdict::pass(reason::PASS_MONITOR)
    } else {
        Verdict::drop(reason::DROP_NO_RULE)
    }
}

#[inline(always)]
fn bit_set(map: &[u64; 4], bit: u8) -> bool {
    let word = (bit >> 6) as usize;
    word < 4 && map[word] & (1u64 << (bit & 63)) != 0
}

/// The peer's set bits, looked up only when a candidate rule narrows the remote side.
struct Remote<'a> {
    addr: &'a Addr,
    bits: Option<u64>,
    active: u32,
}

impl Remote<'_> {
    #[inline(always)]
    fn bits(&mut self) -> u64 {
        match self.bits {
            Some(b) => b,
            None => {
                let b = set_bits(self.active, self.addr);
                self.bits = Some(b);
                b
            }
        }
    }
}

/// Set bits of an address the Edge sends from or receives on: a small table answers when the
/// catalogue has one; otherwise the Edge's own host addresses are compared directly before the
/// stride table or a trie is consulted.
#[inline(always)]
fn local_bits(active: u32, addr: &Addr) -> u64 {
    if let Some(bits) = small_bits(active, addr) {
        return bits;
    }
    if let Some(l) = LOCALS.get(active) {
        match addr {
            Addr::V4(a) => {
                for i in 0..LOCALS_V4 {
                    if i as u32 >= l.v4_count {
                        break;
                    }
                    if l.v4[i] == *a {
                        return l.v4_bits[i];
                    }
                }
            }
            Addr::V6(a) => {
                for i in 0..LOCALS_V6 {
                    if i as u32 >= l.v6_count {
                        break;
                    }
                    if l.v6[i] == *a {
                        return l.v6_bits[i];
                    }
                }
            }
        }
    }
    large_bits(active, addr)
}

/// Set bits of any address (a peer's).
#[inline(always)]
fn set_bits(active: u32, addr: &Addr) -> u64 {
    match small_bits(active, addr) {
        Some(bits) => bits,
        None => large_bits(active, addr),
    }
}

/// The longest match from the small table of the address's family, when the catalogue's
/// prefixes of that family fit one (no match there is then no match at all: bits 0). `None`:
/// the table is too big to scan.
#[inline(always)]
fn small_bits(active: u32, addr: &Addr) -> Option<u64> {
    match addr {
        Addr::V4(a) => {
            let t = SMALL_V4.get(active)?;
            if t.complete == 0 {
                return None;
            }
            let a = u32::from_be_bytes(*a);
            for i in 0..SMALL4 {
                if i as u32 >= t.count {
                    break;
                }
                if a & t.mask[i] == t.net[i] {
                    return Some(t.bits[i]);
                }
            }
        }
        Addr::V6(a) => {
            let t = SMALL_V6.get(active)?;
            if t.complete == 0 {
                return None;
            }
            let (hi, lo) = a.split_at(8);
            let w = [
                u64::from_ne_bytes(hi.try_into().ok()?),
                u64::from_ne_bytes(lo.try_into().ok()?),
            ];
            for i in 0..SMALL6 {
                if i as u32 >= t.count {
                    break;
                }
                if w[0] & t.mask[i][0] == t.net[i][0] && w[1] & t.mask[i][1] == t.net[i][1] {
                    return Some(t.bits[i]);
                }
            }
        }
    }
    Some(0)
}

/// The longest match from a table too big to scan: the IPv4 stride table when the catalogue
/// fits one, else the trie.
#[inline(always)]
fn large_bits(active: u32, addr: &Addr) -> u64 {
    if let Addr::V4(a) = addr
        && let Some(t) = SMALL_V4.get(active)
        && t.stride != 0
        && let Some(bits) = stride_v4(active, u32::from_be_bytes(*a))
    {
        return bits;
    }
    trie_bits(active, addr)
}

/// The set bits of an IPv4 address from the stride table: at most three array loads.
#[inline(always)]
fn stride_v4(active: u32, a: u32) -> Option<u64> {
    let mut e = *STRIDE4_TOP.get(layout::stride_top(active, a >> 16))?;
    if e & STRIDE_BLOCK != 0 {
        let block = STRIDE4_BLOCKS.get(layout::stride_block(active, e & !STRIDE_BLOCK))?;
        e = block.entries[((a >> 8) & 0xff) as usize];
        if e & STRIDE_BLOCK != 0 {
            let block = STRIDE4_BLOCKS.get(layout::stride_block(active, e & !STRIDE_BLOCK))?;
            e = block.entries[(a & 0xff) as usize];
        }
    }
    STRIDE4_LEAVES.get(layout::stride_leaf(active, e)).copied()
}

#[inline(always)]
fn trie_bits(active: u32, addr: &Addr) -> u64 {
    let buffer = active as u8;
    let found = match addr {
        Addr::V4(a) => SETS_V4.get(Key::new(
            layout::lpm_prefix_len(32),
            Lpm4 {
                buffer,
                _pad: [0; 3],
                addr: *a,
            },
        )),
        Addr::V6(a) => SETS_V6.get(Key::new(
            layout::lpm_prefix_len(128),
            Lpm6 {
                buffer,
                _pad: [0; 3],
                addr: *a,
            },
        )),
    };
    match found {
        Some(bits) => *bits,
        None => 0,
    }
}

#[inline(always)]
fn match_class(
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
