//! The decision: a parsed frame, its addresses' set bits and the port tables give the rule or
//! the reason that decides it, on ingress (XDP) and on egress (TC).

use aya_ebpf::{
    bindings::xdp_action,
    programs::{TcContext, XdpContext},
};
use edge_classifier_common::{
    DHCP4_CLIENT, DHCP4_SERVER, DHCP6_CLIENT, DHCP6_SERVER, MAX_CANDIDATES, POLICY_DEFAULT_PASS,
    POLICY_DROP_EGRESS, POLICY_PASS_FRAGMENTS, POLICY_PASS_NON_IP, POLICY_PASS_UNPROTECTED,
    POLICY_PROTECT_IFACE_ADDRS, POLICY_TRACK_EGRESS, PolicyEntry, RULE_LIMITED, RULE_SYN_PROXY,
    RuleMatch, SET_ANY, SET_PROTECTED, TRACKED_SLOT, TRANSPORT_TCP, TRANSPORT_UDP, layout, reason,
};

use crate::{
    addr::{Remote, local_bits},
    flow, limit,
    maps::*,
    parse::{
        self, Addr, Fragment, Ip, L3, L4, L4_ICMP, L4_SHORT_FRAGMENT, L4_TCP, L4_UDP, Malformed,
        Quick, TCP_ACK, TCP_RST, TCP_SYN,
    },
    synproxy,
};

/// `Verdict::action` of a frame the SYN proxy finishes in the entry point
/// (`synproxy::finish`, which needs the context), with `PROXY_ANSWER` or `PROXY_ACK` and the
/// rule slot in `counter`. Not an XDP action: the entry point turns it into one.
pub(crate) const PROXY: u32 = 7;
/// `counter` of a `PROXY` verdict: the SYN proxy answers this SYN (a mark `limit::admit`
/// puts on it).
pub(crate) const PROXY_ANSWER: u32 = 1 << 31;
/// `counter` of a `PROXY` verdict: this ACK of a `syn_proxy` rule is checked for a SYN cookie
/// if no socket knows it.
pub(crate) const PROXY_ACK: u32 = 1 << 30;

/// What becomes of a frame (its XDP action: `XDP_DROP`, `XDP_PASS`, `XDP_TX` for the SYN
/// proxy's SYN-ACK; or `PROXY`) and which counter (reason or rule) records it. The action is
/// kept as the program returns it, so that the entry point returns it as it is.
#[derive(Clone, Copy)]
pub(crate) struct Verdict {
    pub(crate) action: u32,
    pub(crate) counter: u32,
}

impl Verdict {
    pub(crate) const fn pass(reason: u32) -> Self {
        Self {
            action: xdp_action::XDP_PASS,
            counter: reason,
        }
    }
    pub(crate) const fn drop(reason: u32) -> Self {
        Self {
            action: xdp_action::XDP_DROP,
            counter: reason,
        }
    }
    /// Sent back out of the NIC it came in on (the SYN proxy's SYN-ACK).
    pub(crate) const fn tx(reason: u32) -> Self {
        Self {
            action: xdp_action::XDP_TX,
            counter: reason,
        }
    }
    pub(crate) const fn rule(slot: u32) -> Self {
        Self {
            action: xdp_action::XDP_PASS,
            counter: layout::rule_counter(slot),
        }
    }
    pub(crate) const fn proxy(counter: u32) -> Self {
        Self {
            action: PROXY,
            counter,
        }
    }
    /// Whether the frame goes on to the stack (or out, on egress).
    #[inline(always)]
    pub(crate) fn passes(self) -> bool {
        self.action != xdp_action::XDP_DROP
    }
    /// One word, to come back from a subprogram in a register.
    #[inline(always)]
    pub(crate) fn word(self) -> u64 {
        (self.action as u64) << 32 | self.counter as u64
    }
    #[inline(always)]
    pub(crate) fn of_word(w: u64) -> Self {
        Self {
            action: (w >> 32) as u32,
            counter: w as u32,
        }
    }
}

/// One frame's decision. The common frame (untagged or with one VLAN tag, IPv4 without options
/// or IPv6 without extension headers, TCP or UDP, not fragmented) is read at fixed offsets;
/// link-control and non-IP frames are decided from the EtherType. The rest goes to `full`, the
/// whole parser, in a subprogram of its own so that its registers and stack stay off the common
/// path. Both end in the one `decide`, inlined here once.
#[inline(always)]
pub(crate) fn classify(ctx: &XdpContext, word: u32, role_mask: u32) -> Verdict {
    let policy = Policy(word & 1);
    let fast = match parse::fast(ctx) {
        Quick::Ip(l3, l4) => match own_address(word & 1, &l3.dst(), || policy.flags()) {
            Some((local_bits, false)) => Some((l3, l4, local_bits)),
            // Only a bound NIC's own address (DHCP's client port): rare, and for `full`, which
            // knows that case, so that the common path does not carry it.
            Some((_, true)) => None,
            None => return unprotected(policy.flags()),
        },
        Quick::Arp => return Verdict::pass(reason::PASS_ARP),
        Quick::NonIp => return non_ip(policy.flags()),
        Quick::Full => None,
    };
    let (l3, l4, local_bits) = match fast {
        Some(f) => f,
        None => {
            if let Some(v) = full(ctx, word).verdict() {
                return v;
            }
            let Some(f) = FULL_PARSE.get(0) else {
                return Verdict::drop(reason::DROP_MALFORMED);
            };
            (
                Ip {
                    is_v6: f.l3.is_v6,
                    proto: f.l3.proto,
                    src: f.l3.src,
                    dst: f.l3.dst,
                    l4_off: f.l3.l4_off,
                    l4_end: f.l3.l4_end,
                    fragment: f.l3.fragment,
                },
                L4 {
                    kind: f.l4.kind,
                    flags: f.l4.flags,
                    sport: f.l4.sport,
                    dport: f.l4.dport,
                },
                f.local_bits,
            )
        }
    };
    let v = decide(&l3, l4, local_bits, word, role_mask);
    if v.action == PROXY {
        // Only `syn_proxy` rules' SYNs over the budget, and their ACKs while the proxy
        // answers: finished here, where the context is, after `decide` has returned.
        core::hint::cold_path();
        return Verdict::of_word(synproxy::finish(ctx, v.counter));
    }
    v
}

/// What the full parser leaves to `decide`, handed back through a per-CPU map (`FULL_PARSE`):
/// returned on the stack, it would sit in the entry point's frame, and the frames of the call
/// chain must fit the verifier's 512 bytes together.
#[repr(C)]
pub(crate) struct Protected {
    l3: Ip,
    l4: L4,
    local_bits: u64,
}

/// The full parser's verdict, or `DECIDE`: the frame is for `decide`, its facts in `FULL_PARSE`.
/// One word, so that it comes back in a register.
#[derive(Clone, Copy)]
pub(crate) struct FullVerdict(u64);

impl FullVerdict {
    const DECIDE: FullVerdict = FullVerdict(u64::MAX);

    #[inline(always)]
    fn of(v: Verdict) -> FullVerdict {
        FullVerdict(v.word())
    }

    #[inline(always)]
    fn verdict(self) -> Option<Verdict> {
        (self.0 != u64::MAX).then_some(Verdict::of_word(self.0))
    }
}

/// Everything `parse::fast` leaves: VLAN stacks, IPv4 options, IPv6 extension headers,
/// fragments, ICMP, other transports and malformed frames.
#[inline(never)]
fn full(ctx: &XdpContext, word: u32) -> FullVerdict {
    match try_full(ctx, word) {
        Ok(f) => f,
        Err(Malformed) => FullVerdict::of(Verdict::drop(reason::DROP_MALFORMED)),
    }
}

/// The full parser's part, read top to bottom in the order the spec gives (link control, the
/// destination's protection, fragments, L4).
#[inline(always)]
fn try_full(ctx: &XdpContext, word: u32) -> Result<FullVerdict, Malformed> {
    let active = word & 1;
    let policy = Policy(active);
    let decided = |v| Ok(FullVerdict::of(v));
    let l3 = match parse::l3(ctx)? {
        L3::Arp => return decided(Verdict::pass(reason::PASS_ARP)),
        L3::Other => return decided(non_ip(policy.flags())),
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
        return decided(Verdict::pass(reason::PASS_NEIGHBOUR_DISCOVERY));
    }

    // Protected only as an address of a bound NIC (a link-local one, say): no rule's local set
    // holds it, so only DHCP replies to the client and what the policies allow reach it.
    let Some((local_bits, nic_only)) = own_address(active, &l3.dst(), || policy.flags()) else {
        return decided(unprotected(policy.flags()));
    };

    if l3.fragment == Fragment::Later {
        return decided(if policy.flags() & POLICY_PASS_FRAGMENTS != 0 {
            Verdict::pass(reason::PASS_FRAGMENT)
        } else {
            Verdict::drop(reason::DROP_FRAGMENT)
        });
    }
    let l4 = parse::l4(ctx, &l3)?;
    if nic_only && l4.kind == L4_UDP && dhcp_reply(&l3.dst(), l4.sport, l4.dport) {
        return decided(Verdict::pass(reason::PASS_DHCP_CLIENT));
    }
    let Some(out) = FULL_PARSE.get_ptr_mut(0) else {
        return decided(Verdict::drop(reason::DROP_MALFORMED));
    };
    // Per-CPU: this frame's alone until the entry point has read it.
    unsafe { *out = Protected { l3, l4, local_bits } };
    Ok(FullVerdict::DECIDE)
}

/// The decision for a frame to a protected address, from its L4 header on: ICMP by type, then
/// inbound rules, then replies. The policy is read where a decision needs it: a frame a rule
/// allows never does.
#[inline(always)]
fn decide(l3: &Ip, l4: L4, local_bits: u64, word: u32, role_mask: u32) -> Verdict {
    let active = word & 1;
    let policy = Policy(active);
    let (sport, dport, tcp_flags) = (l4.sport, l4.dport, l4.flags);
    let transport = match l4.kind {
        L4_TCP => TRANSPORT_TCP,
        L4_UDP => TRANSPORT_UDP,
        L4_ICMP => {
            let Some(policy) = policy.entry() else {
                return Verdict::drop(reason::DROP_ICMP);
            };
            let allowed = if l3.is_v6 {
                &policy.icmp6
            } else {
                &policy.icmp4
            };
            return if bit_set(allowed, l4.flags) {
                Verdict::pass(reason::PASS_ICMP)
            } else {
                Verdict::drop(reason::DROP_ICMP)
            };
        }
        L4_SHORT_FRAGMENT => return Verdict::drop(reason::DROP_SHORT_FRAGMENT),
        _ => return no_rule(policy.flags()),
    };
    let (src, dst) = (l3.src(), l3.dst());

    let mut remote = Remote::new(active, &src);
    let dentry = PORTS.get(layout::port(active, transport, dport as u32));
    if let Some(entry) = dentry
        && entry.inbound != 0
    {
        // One copy of the limit's gate for both ways a rule is found.
        let rule = if entry.inbound_single != 0 {
            let rule = &entry.inbound_rule;
            if rule_matches(rule, local_bits, &mut remote, role_mask) {
                Some(rule)
            } else {
                None
            }
        } else {
            match_class_rule(active, entry.inbound, local_bits, &mut remote, role_mask)
        };
        if let Some(rule) = rule {
            return inbound(rule, word, l3, transport, tcp_flags, sport, dport);
        }
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
    if reply_from == 0
        && reply_to == 0
        && !(policy.flags() & POLICY_TRACK_EGRESS != 0 && flow::tracked_port(transport, sport))
    {
        return no_rule(policy.flags());
    }
    if let Some(key) = flow::key(transport, &dst, &src, dport, sport)
        && let Some(slot) = flow::reply(&key, word, role_mask, transport, tcp_flags)
    {
        return if slot == TRACKED_SLOT {
            Verdict::pass(reason::PASS_TRACKED_REPLY)
        } else {
            Verdict::rule(slot)
        };
    }
    let claimed = (reply_from != 0
        && match_class(active, reply_from, local_bits, &mut remote, role_mask).is_some())
        || (reply_to != 0
            && match_class(active, reply_to, local_bits, &mut remote, role_mask).is_some());
    if !claimed {
        no_rule(policy.flags())
    } else if policy.flags() & POLICY_DEFAULT_PASS != 0 {
        // Monitor mode drops nothing a rule decides: counted as what it would have been.
        Verdict::pass(reason::PASS_MONITOR_NOT_ESTABLISHED)
    } else {
        Verdict::drop(reason::DROP_NOT_ESTABLISHED)
    }
}

/// A frame an inbound rule allows: the rule's, unless the rule has a limit and this is a new
/// flow (a bare SYN; any UDP datagram, which the limit looks up among the flows it admitted).
/// A rule without a limit pays the one flag test.
#[inline(always)]
fn inbound(
    rule: &RuleMatch,
    word: u32,
    l3: &Ip,
    transport: u32,
    tcp_flags: u8,
    sport: u16,
    dport: u16,
) -> Verdict {
    if rule.flags & RULE_LIMITED != 0 {
        if transport == TRANSPORT_UDP || tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
            // Rare beside the frames of rules without a limit: LLVM keeps the registers this
            // call needs spilled here rather than on every path.
            core::hint::cold_path();
            let ports = sport as u64
                | (dport as u64) << 16
                | (transport as u64) << 32
                | (l3.is_v6 as u64) << 40;
            return Verdict::of_word(limit::admit(
                word as u64 | (rule.slot as u64) << 32,
                ports,
                l3.src[0],
                l3.src[1],
            ));
        }
        // An ACK (no SYN, no RST) of a `syn_proxy` rule while its proxy answers SYNs may
        // complete a handshake the proxy answered: the entry point looks for its socket and
        // checks its cookie. Otherwise (no proxy, or idle) the rule's, with no socket lookup.
        if rule.flags & RULE_SYN_PROXY != 0
            && transport == TRANSPORT_TCP
            && tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_ACK
            && limit::proxy_active(rule.slot)
        {
            return Verdict::proxy(PROXY_ACK | rule.slot);
        }
    }
    Verdict::rule(rule.slot)
}

/// A frame that is neither IP nor ARP.
#[inline(always)]
fn non_ip(flags: u32) -> Verdict {
    if flags & POLICY_PASS_NON_IP != 0 {
        Verdict::pass(reason::PASS_NON_IP)
    } else {
        Verdict::drop(reason::DROP_NON_IP)
    }
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
    let Some((local_bits, _)) = own_address(active, &l3.src(), || policy.flags) else {
        return Ok(Verdict::pass(reason::PASS_EGRESS_UNPROTECTED));
    };
    if l3.fragment == Fragment::Later {
        return Ok(Verdict::pass(reason::PASS_EGRESS_UNTRACKED));
    }
    let l4 = parse::l4(ctx, &l3)?;
    let (sport, dport, tcp_flags) = (l4.sport, l4.dport, l4.flags);
    let transport = match l4.kind {
        L4_TCP => TRANSPORT_TCP,
        L4_UDP => TRANSPORT_UDP,
        _ => return Ok(Verdict::pass(reason::PASS_EGRESS_UNTRACKED)),
    };
    let (src, dst) = (l3.src(), l3.dst());
    let mut remote = Remote::new(active, &dst);
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
    if let Some(key) = flow::key(transport, &src, &dst, sport, dport) {
        flow::record(&key, slot, role_mask, policy, transport, tcp_flags);
    }
    Ok(verdict)
}

/// The set bits of `addr` when it is one of the Edge's own addresses, and whether it is so
/// only as a bound NIC's address (`POLICY_PROTECT_IFACE_ADDRS`; no named set holds it); `None`
/// when the Edge does not protect it.
#[inline(always)]
fn own_address(active: u32, addr: &Addr, flags: impl FnOnce() -> u32) -> Option<(u64, bool)> {
    let bits = local_bits(active, addr);
    if bits & SET_PROTECTED != 0 {
        Some((bits, false))
    } else if flags() & POLICY_PROTECT_IFACE_ADDRS != 0 && iface_addr(addr) {
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
        Addr::V4(a) => unsafe { IFACE_ADDRS_V4.get(*a) }.is_some(),
        Addr::V6(a) => {
            // Each u64 word holds two u32 words of the address, the first in its low half
            // (little-endian BPF).
            let k = [
                a[0] as u32,
                (a[0] >> 32) as u32,
                a[1] as u32,
                (a[1] >> 32) as u32,
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
            // fe80::/10: the first two bytes are the low ones of the first word.
            sport == DHCP6_SERVER && dport == DHCP6_CLIENT && a[0] & 0xc0ff == 0x80fe
        }
    }
}

/// The policy of a buffer, looked up when asked. A buffer always has one; were the lookup ever
/// to fail, the flags read 0: nothing passes by policy.
#[derive(Clone, Copy)]
pub(crate) struct Policy(pub(crate) u32);

impl Policy {
    #[inline(always)]
    pub(crate) fn entry(self) -> Option<&'static PolicyEntry> {
        POLICY.get(self.0)
    }
    #[inline(always)]
    pub(crate) fn flags(self) -> u32 {
        match self.entry() {
            Some(p) => p.flags,
            None => 0,
        }
    }
}

/// A frame to an address the Edge does not protect.
#[inline(always)]
fn unprotected(flags: u32) -> Verdict {
    if flags & POLICY_PASS_UNPROTECTED != 0 {
        Verdict::pass(reason::PASS_UNPROTECTED)
    } else {
        Verdict::drop(reason::DROP_UNPROTECTED)
    }
}

#[inline(always)]
pub(crate) fn no_rule(flags: u32) -> Verdict {
    if flags & POLICY_DEFAULT_PASS != 0 {
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

/// Whether one rule covers the frame's NIC role and addresses (its ports being covered).
#[inline(always)]
fn rule_matches(rule: &RuleMatch, local_bits: u64, remote: &mut Remote, role_mask: u32) -> bool {
    rule.role_mask & role_mask != 0
        && rule.local_mask & local_bits != 0
        && (rule.remote_mask & SET_ANY != 0 || rule.remote_mask & remote.bits() != 0)
}

#[inline(always)]
pub(crate) fn match_class(
    active: u32,
    class: u32,
    local_bits: u64,
    remote: &mut Remote,
    role_mask: u32,
) -> Option<u32> {
    match_class_rule(active, class, local_bits, remote, role_mask).map(|r| r.slot)
}

/// The first rule of `class` that covers the frame, as the map holds it.
#[inline(always)]
fn match_class_rule(
    active: u32,
    class: u32,
    local_bits: u64,
    remote: &mut Remote,
    role_mask: u32,
) -> Option<&'static RuleMatch> {
    let class = CLASSES.get(layout::class(active, class))?;
    let n = class.count as usize;
    for i in 0..MAX_CANDIDATES {
        if i >= n {
            break;
        }
        let rule = &class.rules[i];
        if rule_matches(rule, local_bits, remote, role_mask) {
            return Some(rule);
        }
    }
    None
}
