//! Why a frame was passed or dropped: an index into a counter block, and its label.

pub const PASS_ARP: u32 = 0;
pub const PASS_NEIGHBOUR_DISCOVERY: u32 = 1;
pub const PASS_ICMP: u32 = 2;
pub const PASS_UNPROTECTED: u32 = 3;
pub const PASS_NON_IP: u32 = 4;
pub const PASS_FRAGMENT: u32 = 5;
pub const PASS_MONITOR: u32 = 6;
pub const PASS_UNBOUND_INTERFACE: u32 = 7;
pub const DROP_NO_RULE: u32 = 8;
pub const DROP_FRAGMENT: u32 = 9;
pub const DROP_SHORT_FRAGMENT: u32 = 10;
pub const DROP_MALFORMED: u32 = 11;
pub const DROP_NOT_ESTABLISHED: u32 = 12;
pub const DROP_ICMP: u32 = 13;
pub const DROP_UNPROTECTED: u32 = 14;
pub const DROP_NON_IP: u32 = 15;
// Egress (TC): frames the Edge sends. Outbound flows count under their rule instead.
/// A reply from an inbound rule's service port.
pub const PASS_EGRESS_REPLY: u32 = 16;
/// From an address the Edge does not protect.
pub const PASS_EGRESS_UNPROTECTED: u32 = 17;
/// Not a TCP/UDP frame with ports (ARP, ICMP, later fragments, unparsable).
pub const PASS_EGRESS_UNTRACKED: u32 = 18;
/// No rule allows it; passed (and its replies dropped) because `policy.egress = "pass"`.
pub const PASS_EGRESS_NO_RULE: u32 = 19;
pub const DROP_EGRESS_NO_RULE: u32 = 20;
/// Monitor mode (`default = "pass"`): a reply without a recorded flow, which would have been
/// dropped as `not_established`.
pub const PASS_MONITOR_NOT_ESTABLISHED: u32 = 21;
/// A DHCP server's reply to the client on a bound NIC's own address.
pub const PASS_DHCP_CLIENT: u32 = 22;
/// Egress with `policy.egress = "track"`: no rule allows it, so its flow is recorded for the
/// replies (`TRACKED_SLOT`) and it is sent.
pub const PASS_EGRESS_TRACKED: u32 = 23;
/// A reply to a flow recorded by `PASS_EGRESS_TRACKED`.
pub const PASS_TRACKED_REPLY: u32 = 24;
/// A new flow (a TCP SYN, a UDP datagram of a flow not yet admitted) of a rule with a `limit`,
/// over its source prefix's or the rule's budget. Per rule in `LIMITED` too.
pub const DROP_RATE_LIMITED: u32 = 25;
/// Monitor mode: a new flow that would have been dropped as `rate_limited`.
pub const PASS_MONITOR_RATE_LIMITED: u32 = 26;
/// A SYN over a `syn_proxy` rule's budget, answered from XDP with a SYN-ACK carrying a SYN
/// cookie (XDP_TX): it never reaches the stack. Per rule in `SYN_PROXIED` too.
pub const TX_SYN_COOKIE: u32 = 27;
/// The ACK of no connection carrying a valid SYN cookie, while the rule's proxy is answering:
/// passed to the listener, which completes the handshake from the cookie.
pub const PASS_SYN_COOKIE_ACK: u32 = 28;
/// The ACK of no connection with an invalid cookie, while the rule's proxy is answering.
pub const DROP_SYN_COOKIE_INVALID: u32 = 29;
pub const COUNT: u32 = 30;

/// Label values, indexed by reason; `true` where the reason is a drop.
pub const NAMES: [(&str, bool); COUNT as usize] = [
    ("arp", false),
    ("neighbour_discovery", false),
    ("icmp", false),
    ("unprotected", false),
    ("non_ip", false),
    ("fragment", false),
    ("monitor", false),
    ("unbound_interface", false),
    ("no_rule", true),
    ("fragment", true),
    ("short_fragment", true),
    ("malformed", true),
    ("not_established", true),
    ("icmp", true),
    ("unprotected", true),
    ("non_ip", true),
    ("egress_inbound_reply", false),
    ("egress_unprotected", false),
    ("egress_untracked", false),
    ("egress_no_rule", false),
    ("egress_no_rule", true),
    ("monitor_not_established", false),
    ("dhcp_client", false),
    ("egress_tracked", false),
    ("tracked_reply", false),
    ("rate_limited", true),
    ("monitor_rate_limited", false),
    ("syn_cookie", false),
    ("syn_cookie_ack", false),
    ("syn_cookie_invalid", true),
];
