//! Map keys, values and layout constants shared by the XDP program and the loader.
//!
//! Every struct is `#[repr(C)]` with explicit padding fields so that the kernel and userspace
//! agree on the bytes; the `user` feature adds `aya::Pod` so the loader can write them into maps.
#![no_std]

pub mod layout;
pub mod monitor;

/// Rule tables are double-buffered: userspace fills the inactive half, then flips [`ACTIVE`].
pub const BUFFERS: u32 = 2;

/// Transport index used in the port tables.
pub const TRANSPORT_TCP: u32 = 0;
pub const TRANSPORT_UDP: u32 = 1;
pub const TRANSPORTS: u32 = 2;
pub const PORT_SPACE: u32 = 65536;
/// Entries of the `PORTS` array: buffer × transport × port.
pub const PORT_ENTRIES: u32 = BUFFERS * TRANSPORTS * PORT_SPACE;

/// Rules that may cover the same (transport, direction, port); more is a catalogue error.
pub const MAX_CANDIDATES: usize = 8;
/// Rule slots (counter identities) the program knows, shared by both buffers.
pub const MAX_RULES: u32 = 16384;
/// Rules one catalogue may have. A reload keeps the running rules' slots until the flip (they
/// count until then) and gives the new catalogue's new ids other slots, so the running and the
/// new catalogue must fit in `MAX_RULES` together, whatever ids either has.
pub const MAX_RULES_PER_CATALOGUE: u32 = MAX_RULES / BUFFERS;
/// Distinct port classes per buffer; class 0 means "no rule" and is never stored.
pub const MAX_CLASSES: u32 = 2 * MAX_RULES + 2;
/// Entries of each LPM trie (one per address family), shared by both buffers.
pub const MAX_PREFIXES: u32 = 1 << 21;
/// Prefixes one catalogue may have per address family: the trie holds the running buffer's
/// and the new one's, and a reload removes the stale entries of the buffer it writes before it
/// inserts, so both buffers full at once fit (`tests/tests/limits.rs`).
pub const MAX_PREFIXES_PER_BUFFER: u32 = MAX_PREFIXES / BUFFERS;

/// Interfaces are looked up by `ifindex % IFACE_SLOTS` and verified against the stored ifindex.
pub const IFACE_SLOTS: u32 = 4096;
/// Counter blocks; block 0 counts frames on interfaces that no binding names.
pub const MAX_IFACES: u32 = 16;

/// Set bit 0: the address is one the Edge protects (a rule's local set or a `protected` set).
pub const SET_PROTECTED: u64 = 1 << 0;
/// Set bit 1: every address (the built-in `any` set); every prefix carries it.
pub const SET_ANY: u64 = 1 << 1;
/// First bit available to named address sets.
pub const FIRST_NAMED_SET_BIT: u32 = 2;
pub const MAX_NAMED_SETS: u32 = 64 - FIRST_NAMED_SET_BIT;

/// PolicyEntry flags (`PolicyEntry::flags`).
pub const POLICY_PASS_UNPROTECTED: u32 = 1 << 0;
pub const POLICY_PASS_FRAGMENTS: u32 = 1 << 1;
pub const POLICY_PASS_NON_IP: u32 = 1 << 2;
/// Monitor mode: frames that no rule allows are passed but counted under `no_rule`.
pub const POLICY_DEFAULT_PASS: u32 = 1 << 3;
/// Egress frames from protected addresses that no rule allows are dropped, not only counted.
pub const POLICY_DROP_EGRESS: u32 = 1 << 4;
/// Egress frames from protected addresses that no rule allows are recorded in the flow table
/// (`TRACKED_SLOT`), so their replies pass as `tracked_reply`: the Edge's own DNS, NTP and
/// CRL lookups get their answers, while nothing else opens a way in.
pub const POLICY_TRACK_EGRESS: u32 = 1 << 6;
/// Every address configured on a bound NIC (link-local included, kept in `IFACE_ADDRS_V4/V6`
/// by the daemon) is protected, whether or not a catalogue set names it.
pub const POLICY_PROTECT_IFACE_ADDRS: u32 = 1 << 5;

/// Entries of each of the `IFACE_ADDRS_V4` / `IFACE_ADDRS_V6` hash maps (address → ifindex).
pub const IFACE_ADDRS_MAX: u32 = 1024;
/// UDP ports of a DHCP client's replies, which pass to the NIC's own addresses (DHCPv4 67 → 68,
/// DHCPv6 547 → 546 on a link-local address), as a host firewall lets them.
pub const DHCP4_SERVER: u16 = 67;
pub const DHCP4_CLIENT: u16 = 68;
pub const DHCP6_SERVER: u16 = 547;
pub const DHCP6_CLIENT: u16 = 546;

/// `FlowState::slot` of a flow recorded by `POLICY_TRACK_EGRESS` rather than by a rule.
pub const TRACKED_SLOT: u32 = u32::MAX;

/// Rule flags (`RuleMatch::flags`).
pub const RULE_OUTBOUND: u32 = 1 << 0;
/// The rule has a `limit` on new flows (`LIMITS[buffer][slot]`): the one test a rule without
/// one pays.
pub const RULE_LIMITED: u32 = 1 << 1;
/// The rule's limit has `syn_proxy`: over its budget a SYN is answered from XDP with a SYN
/// cookie, and while that goes on the rule's bare ACKs of no connection are checked for one.
pub const RULE_SYN_PROXY: u32 = 1 << 2;

/// Entries of the token-bucket table (`BUCKETS`), shared by every limited rule: a source
/// prefix's bucket, or a rule's total one. Beyond it the least recently used bucket is evicted
/// (a source coming back starts with a full bucket).
pub const LIMIT_BUCKETS: u32 = 131_072;
/// Entries of the table of UDP flows a limited rule admitted (`ADMITTED`): their later
/// datagrams are not new flows.
pub const ADMITTED_FLOWS: u32 = 65_536;

pub mod reason;
mod types;

pub use types::*;

/// A counter block per interface: the reasons first, then one counter per rule slot. An
/// outbound rule counts its flows' frames both ways: sent (egress) and replies (ingress).
pub const RULE_COUNTER_BASE: u32 = 32;
const _: () = assert!(reason::COUNT <= RULE_COUNTER_BASE);
pub const STATS_STRIDE: u32 = RULE_COUNTER_BASE + MAX_RULES;
pub const STATS_ENTRIES: u32 = MAX_IFACES * STATS_STRIDE;
