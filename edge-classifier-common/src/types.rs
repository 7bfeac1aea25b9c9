//! The `#[repr(C)]` keys and values of the maps, as both sides see them, with their size
//! asserts: no padding may leak uninitialised bytes into a map or break a byte-wise compare.

use crate::MAX_CANDIDATES;

/// Per-CPU counter.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

/// What the program does with frames no rule speaks of; one per buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyEntry {
    pub flags: u32,
    pub _pad: u32,
    /// ICMP types (0..=255) that pass to protected addresses, as a bitmap.
    pub icmp4: [u64; 4],
    /// ICMPv6 types that pass; neighbour discovery (133–137) passes regardless.
    pub icmp6: [u64; 4],
    /// Flow idle timeouts, in ticks of `bpf_jiffies64` (the kernel's HZ, which userspace reads
    /// as the resolution of `CLOCK_MONOTONIC_COARSE`).
    pub tcp_idle_ticks: u64,
    pub udp_idle_ticks: u64,
    /// Lifetime of a TCP flow after FIN both ways or a RST.
    pub tcp_closing_ticks: u64,
}

/// Binding of a NIC to a role and a counter block.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IfaceInfo {
    /// 0 marks an empty slot.
    pub ifindex: u32,
    /// Bit `1 << role` for the role this NIC has.
    pub role_mask: u32,
    /// Counter block index (1..MAX_IFACES).
    pub block: u32,
    /// Bit `1 << slot` for each monitor slot watching this NIC (`monitor.rs`): the one word
    /// the programs test before they spend anything on events. Beside `block`, at an 8-aligned
    /// offset: the programs load both as one word.
    pub monitors: u32,
    /// `IFACE_MODE_*`: the XDP mode it was attached in, so an instance rebuilt from its pins
    /// adopts it in the same mode. The programs do not read it.
    pub mode: u32,
}

pub const IFACE_MODE_UNKNOWN: u32 = 0;
pub const IFACE_MODE_NATIVE: u32 = 1;
pub const IFACE_MODE_GENERIC: u32 = 2;

/// What one rule buffer holds, recorded in the kernel beside the buffer itself (`RECORD`), so
/// that the pins alone say which catalogue runs. Written before the flip that activates the
/// buffer; the programs never read it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BufferRecord {
    /// `RECORD_*`.
    pub state: u32,
    /// Chunks of `RECORD_TEXT` the description takes.
    pub chunks: u32,
    /// Bytes of the description (JSON: catalogue source, text, slot assignments).
    pub len: u64,
    /// SHA-256 of the description: a torn or stale chunk is detected, never trusted.
    pub digest: [u8; 32],
    /// The instance's successful reloads once this buffer is active (this one included): a
    /// reload killed after its flip is counted by the flip itself.
    pub reloads: u64,
    /// When the buffer was written, Unix milliseconds.
    pub loaded_at_ms: u64,
}

/// The buffer's rule tables are being written (or were, when a writer died): not to be
/// trusted, never to be flipped to.
pub const RECORD_WRITING: u32 = 1;
/// Rule tables and description complete: may be (or is) active.
pub const RECORD_COMPLETE: u32 = 2;
/// Complete, active, and the flows of rules it dropped are purged.
pub const RECORD_SETTLED: u32 = 3;

/// Bytes of one `RECORD_TEXT` chunk, and chunks per buffer at most (64 MiB of description).
pub const RECORD_CHUNK: usize = 16384;
pub const RECORD_CHUNKS: u32 = 4096;

/// Counters of the instance that outlive any process and any state file (`INSTANCE_RECORD`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InstanceRecord {
    /// Successful reloads counted when they were reported (see `BufferRecord::reloads`).
    pub reloads_succeeded: u64,
    pub reloads_failed: u64,
    /// Bumped by every change of the instance, so a daemon notices another process's.
    pub generation: u64,
}

/// Port classes of one (buffer, transport, port), looked up by a frame's destination port
/// (`inbound`, `reply_to`) and by its source port (`reply_from`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortEntry {
    /// Inbound rules whose service port this is.
    pub inbound: u32,
    /// Outbound rules whose remote service port this is: replies come from it.
    pub reply_from: u32,
    /// Outbound rules whose Edge-side (local) port range holds this port: replies go to it.
    pub reply_to: u32,
    /// 1 when the `inbound` class has one rule, copied into `inbound_rule`: the data plane then
    /// matches it from this entry, without reading the class (most service ports have one).
    pub inbound_single: u32,
    pub inbound_rule: RuleMatch,
}

/// One rule as the data plane sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleMatch {
    /// Set bits that the Edge-side address must carry one of.
    pub local_mask: u64,
    /// Set bits that the peer address must carry one of.
    pub remote_mask: u64,
    /// Counter slot (stable across reloads for an unchanged rule id).
    pub slot: u32,
    pub role_mask: u32,
    pub flags: u32,
    pub _pad: u32,
}

/// The rules that cover one port class, in catalogue order (first match wins).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleClass {
    pub count: u32,
    pub _pad: u32,
    pub rules: [RuleMatch; MAX_CANDIDATES],
}

/// An outbound flow, as the Edge sees it: `local` is the Edge's address. Egress fills it from
/// (src, dst), ingress from (dst, src), so a reply finds the flow its request recorded. This is
/// the key of the IPv6 flow table (`family` 6) and the form userspace lists flows of either
/// family in; IPv4 addresses use the first 4 bytes and the rest stays zero.
// Aligned so the program may build it on its stack with word-sized stores (the verifier
// rejects misaligned stack access).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub local: [u8; 16],
    pub remote: [u8; 16],
    pub local_port: u16,
    pub remote_port: u16,
    /// `TRANSPORT_TCP` or `TRANSPORT_UDP`.
    pub transport: u8,
    /// 4 or 6.
    pub family: u8,
    pub _pad: [u8; 2],
}

/// The key of the IPv4 flow table: the same 5-tuple in 16 bytes. IPv4 flows have a table of
/// their own because hashing and comparing this key costs a reply 13 ns less than `FlowKey`.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey4 {
    pub local: [u8; 4],
    pub remote: [u8; 4],
    pub local_port: u16,
    pub remote_port: u16,
    /// `TRANSPORT_TCP` or `TRANSPORT_UDP`, widened so the key has no padding to zero.
    pub transport: u32,
}

impl FlowKey {
    /// The IPv4 table's key for an IPv4 flow.
    pub fn v4(&self) -> Option<FlowKey4> {
        (self.family == 4).then(|| FlowKey4 {
            local: [self.local[0], self.local[1], self.local[2], self.local[3]],
            remote: [
                self.remote[0],
                self.remote[1],
                self.remote[2],
                self.remote[3],
            ],
            local_port: self.local_port,
            remote_port: self.remote_port,
            transport: u32::from(self.transport),
        })
    }
}

impl From<FlowKey4> for FlowKey {
    fn from(k: FlowKey4) -> Self {
        let mut key = FlowKey {
            local_port: k.local_port,
            remote_port: k.remote_port,
            transport: k.transport as u8,
            family: 4,
            ..FlowKey::default()
        };
        key.local[..4].copy_from_slice(&k.local);
        key.remote[..4].copy_from_slice(&k.remote);
        key
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowState {
    /// `bpf_jiffies64` of the last frame either way.
    pub last_seen: u64,
    /// Counter slot of the outbound rule that allowed the flow; its replies count there too.
    pub slot: u32,
    /// `FLOW_*` bits.
    pub flags: u32,
    /// Role bit of the NIC the flow left by: replies must come back on a NIC of that role.
    pub role_mask: u32,
    pub _pad: u32,
}

/// TCP teardown seen: the Edge sent a FIN, the peer sent a FIN, either side sent a RST.
pub const FLOW_FIN_OUT: u32 = 1 << 0;
pub const FLOW_FIN_IN: u32 = 1 << 1;
pub const FLOW_RST: u32 = 1 << 2;

/// Capacity of each flow table (IPv4, IPv6) compiled into the object; the loader sets the
/// catalogue's before loading.
pub const DEFAULT_FLOW_CAPACITY: u32 = 262_144;

/// Flow table events (`FLOW_STATS` index, per CPU). Evictions are what is neither removed
/// here nor still present: `created - expired - present`.
pub mod flow_stat {
    /// A flow recorded on egress (also an expired one revived by a new frame).
    pub const CREATED: u32 = 0;
    /// A flow found idle past its timeout (removed, or revived as a new flow on egress).
    pub const EXPIRED: u32 = 1;
    /// The kernel could not insert (no free or evictable element): the flow is not recorded.
    pub const INSERT_FAILED: u32 = 2;
    pub const COUNT: u32 = 3;
}

/// A token bucket's parameters, in whole-number units: a new flow costs `cost` units, every
/// tick (`bpf_jiffies64`) adds `refill`, a bucket holds at most `cap`. For `N` flows per
/// `P` seconds at HZ ticks a second: `cost = P * HZ`, `refill = N`, `cap = burst * cost`, so the
/// rate is exact with no division in the kernel. `cost` 0: no such budget.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Budget {
    pub cost: u64,
    pub refill: u64,
    pub cap: u64,
    /// Ticks that fill an empty bucket (`ceil(cap / refill)`): a longer pause just fills it, so
    /// `elapsed * refill` never overflows.
    pub fill_ticks: u64,
}

/// A limited rule's budgets (`LIMITS[buffer][slot]`); read only for rules with `RULE_LIMITED`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RuleLimit {
    /// Set bits of sources that are never limited (the `exempt` sets).
    pub exempt_mask: u64,
    /// Part of every bucket key of the rule: a hash of its id and budgets, so a reload that
    /// changes the limit starts fresh buckets rather than trusting ones filled under the old
    /// one (those age out of the LRU), and one that keeps it keeps them.
    pub generation: u32,
    /// `syn_proxy`: the ticks (`bpf_jiffies64`) between the SYNs let through to the listener
    /// while the proxy answers the rest, so that it keeps sending cookies of its own (the
    /// kernel accepts cookie ACKs only then); 0 without a proxy.
    pub syn_proxy_ticks: u32,
    /// The source prefix of a bucket, as masks over the address words as the program holds
    /// them (native order): IPv4 one word, IPv6 the two 64-bit words.
    pub mask_v4: u64,
    pub mask_v6: [u64; 2],
    pub per_source: Budget,
    pub total: Budget,
    /// Set bits of sources with a budget of their own (`own_budget`): they share `own` instead
    /// of the per-source and total budgets, so a flood from elsewhere never spends it.
    pub own_mask: u64,
    pub own: Budget,
}

/// The key of a token bucket (`BUCKETS`): a rule's source prefix, or (`family` 0, address 0)
/// the rule's total budget.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BucketKey {
    pub slot: u32,
    pub generation: u32,
    /// 4, 6, or 0 for the total, 1 for the own budget of the `own_budget` sets.
    pub family: u64,
    /// The source prefix: IPv4 in the low 4 bytes of the first word (address bytes in
    /// order), IPv6 in both.
    pub addr: [u64; 2],
}

/// The key of a UDP flow a limited rule admitted (`ADMITTED`): the rule, the peer's address and
/// both ports. The Edge's own address is left out: a rule's flows from one peer port to one
/// Edge port are one flow to the limit whichever of the Edge's addresses they reach, and the
/// key stays four words the program builds from registers.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AdmittedKey {
    pub slot: u32,
    /// 4 or 6.
    pub family: u32,
    pub remote_port: u16,
    pub local_port: u16,
    /// The rule's `RuleLimit::generation`: a new rule on a reused slot, or a changed limit,
    /// does not inherit the flows admitted before.
    pub generation: u32,
    /// As in [`BucketKey::addr`], unmasked.
    pub remote: [u64; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bucket {
    /// Units left (see [`Budget`]).
    pub tokens: u64,
    /// `bpf_jiffies64` when `tokens` was last brought up to date.
    pub stamp: u64,
}

/// A `syn_proxy` rule's state (`SYN_PROXY[slot]`, shared by the CPUs; a lost update between
/// two CPUs costs a second SYN let through or a stamp a tick early).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProxyState {
    /// `bpf_jiffies64` until which the rule's ACKs of no connection are checked for a cookie:
    /// set forward whenever the proxy answers a SYN.
    pub active_until: u64,
    /// When a SYN over the budget was last let through to the listener, per family (an IPv4
    /// and an IPv6 listener are stamped apart).
    pub syn_passed_v4: u64,
    pub syn_passed_v6: u64,
}

/// Limit events (`LIMIT_STATS` index, per CPU). Bucket evictions are `created - present`.
pub mod limit_stat {
    /// A bucket made for a source prefix or a rule's total.
    pub const BUCKET_CREATED: u32 = 0;
    /// A UDP flow admitted by a limited rule recorded, so its later datagrams are not new.
    pub const ADMITTED: u32 = 1;
    /// A new flow of an exempt source, passed without a token.
    pub const EXEMPT: u32 = 2;
    pub const COUNT: u32 = 3;
}

/// LPM key data for IPv4: the buffer byte first, so one trie holds both halves. The three zero
/// bytes after it are part of every prefix ([`LPM_BUFFER_BITS`]); they put the address on a
/// 4-byte boundary of the key, where the program may store it as one word.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lpm4 {
    pub buffer: u8,
    pub _pad: [u8; 3],
    pub addr: [u8; 4],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lpm6 {
    pub buffer: u8,
    pub _pad: [u8; 3],
    pub addr: [u8; 16],
}

/// The Edge's own host addresses (/32, /128 of protected sets) with the set bits an LPM lookup
/// would give them, one per buffer. Nearly every frame is addressed to one of them; comparing
/// a handful of addresses costs less than a trie walk. Addresses beyond these few, and every
/// other address, go to the tries.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Locals {
    pub v4_count: u32,
    pub v6_count: u32,
    pub v4: [[u8; 4]; LOCALS_V4],
    pub v4_bits: [u64; LOCALS_V4],
    pub v6: [[u8; 16]; LOCALS_V6],
    pub v6_bits: [u64; LOCALS_V6],
}

pub const LOCALS_V4: usize = 8;
pub const LOCALS_V6: usize = 4;

/// A catalogue's whole IPv4 prefix table when it is this small, longest prefix first, one per
/// buffer: a scan of a few masked compares answers any IPv4 address without a trie walk.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Small4 {
    pub count: u32,
    /// 1 when these are all of the family's prefixes, so a miss here is a miss; 0 when they do
    /// not fit, and the stride table or the tries answer.
    pub complete: u32,
    /// 1 when the IPv4 stride table of this buffer holds the family's prefixes (the table is
    /// too big to scan but fits the stride table); 0 sends lookups to the trie.
    pub stride: u32,
    pub _pad: u32,
    /// Network address and mask, host byte order.
    pub net: [u32; SMALL4],
    pub mask: [u32; SMALL4],
    pub bits: [u64; SMALL4],
}

pub const SMALL4: usize = 8;

/// The IPv4 stride table (16-8-8), one per buffer: an address's set bits in at most three array
/// loads however many prefixes there are, where a trie walk grows with the trie. `STRIDE4_TOP`
/// is indexed by the address's top 16 bits; an entry is a leaf (an index into
/// `STRIDE4_LEAVES`, which holds the bits) or, with `STRIDE_BLOCK` set, the index of a block of
/// `STRIDE4_BLOCKS` indexed by the next 8 bits, whose entries are leaves or blocks for the last
/// 8 bits. Block and leaf indexes count from the buffer's own region of those maps.
pub const STRIDE_TOP: u32 = 1 << 16;
pub const STRIDE_SPAN: usize = 256;
/// Blocks per buffer: 1 KiB each, 8 MiB per buffer. A catalogue needing more uses the trie.
pub const STRIDE_BLOCKS: u32 = 8192;
/// Distinct set-bit combinations per buffer.
pub const STRIDE_LEAVES: u32 = 4096;
pub const STRIDE_BLOCK: u32 = 1 << 31;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StrideBlock {
    pub entries: [u32; STRIDE_SPAN],
}

impl Default for StrideBlock {
    fn default() -> Self {
        Self {
            entries: [0; STRIDE_SPAN],
        }
    }
}

/// The IPv6 twin of [`Small4`]. Addresses are compared as two 64-bit words: each word is eight
/// address bytes read in native byte order, for net and mask alike, so a masked compare of the
/// words is a masked compare of the bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Small6 {
    pub count: u32,
    /// As in [`Small4`].
    pub complete: u32,
    pub net: [[u64; 2]; SMALL6],
    pub mask: [[u64; 2]; SMALL6],
    pub bits: [u64; SMALL6],
}

pub const SMALL6: usize = 8;

/// Bits of an LPM key before the address: the buffer byte and three zero bytes.
pub const LPM_BUFFER_BITS: u32 = 32;

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for Counter {}
    unsafe impl aya::Pod for PolicyEntry {}
    unsafe impl aya::Pod for IfaceInfo {}
    unsafe impl aya::Pod for PortEntry {}
    unsafe impl aya::Pod for RuleMatch {}
    unsafe impl aya::Pod for RuleClass {}
    unsafe impl aya::Pod for Lpm4 {}
    unsafe impl aya::Pod for Lpm6 {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowKey4 {}
    unsafe impl aya::Pod for Locals {}
    unsafe impl aya::Pod for Small4 {}
    unsafe impl aya::Pod for Small6 {}
    unsafe impl aya::Pod for StrideBlock {}
    unsafe impl aya::Pod for FlowState {}
    unsafe impl aya::Pod for BufferRecord {}
    unsafe impl aya::Pod for InstanceRecord {}
    unsafe impl aya::Pod for RuleLimit {}
    unsafe impl aya::Pod for BucketKey {}
    unsafe impl aya::Pod for Bucket {}
    unsafe impl aya::Pod for AdmittedKey {}
    unsafe impl aya::Pod for ProxyState {}
}

// Padding would leak uninitialised bytes into map values and break byte-wise comparisons.
const _: () = {
    assert!(core::mem::size_of::<Counter>() == 16);
    assert!(core::mem::size_of::<ProxyState>() == 24);
    assert!(core::mem::size_of::<PolicyEntry>() == 96);
    assert!(core::mem::size_of::<FlowKey>() == 40);
    assert!(core::mem::size_of::<FlowKey4>() == 16);
    assert!(core::mem::size_of::<Small4>() == 16 + 4 * SMALL4 + 4 * SMALL4 + 8 * SMALL4);
    assert!(core::mem::size_of::<StrideBlock>() == 4 * STRIDE_SPAN);
    assert!(core::mem::size_of::<Small6>() == 8 + 16 * SMALL6 + 16 * SMALL6 + 8 * SMALL6);
    assert!(
        core::mem::size_of::<Locals>()
            == 8 + 4 * LOCALS_V4 + 8 * LOCALS_V4 + 16 * LOCALS_V6 + 8 * LOCALS_V6
    );
    assert!(core::mem::size_of::<FlowState>() == 24);
    assert!(core::mem::size_of::<IfaceInfo>() == 20);
    assert!(core::mem::offset_of!(IfaceInfo, block) == 8);
    assert!(core::mem::offset_of!(IfaceInfo, monitors) == 12);
    assert!(core::mem::size_of::<BufferRecord>() == 8 + 8 + 32 + 8 + 8);
    assert!(core::mem::size_of::<InstanceRecord>() == 24);
    assert!(core::mem::size_of::<PortEntry>() == 16 + 32);
    assert!(core::mem::size_of::<RuleMatch>() == 32);
    assert!(core::mem::size_of::<RuleClass>() == 8 + 32 * MAX_CANDIDATES);
    assert!(core::mem::size_of::<Lpm4>() == 8);
    assert!(core::mem::size_of::<Lpm6>() == 20);
    assert!(core::mem::size_of::<Budget>() == 32);
    assert!(core::mem::size_of::<RuleLimit>() == 8 + 8 + 8 + 16 + 32 + 32 + 8 + 32);
    assert!(core::mem::size_of::<BucketKey>() == 32);
    assert!(core::mem::size_of::<Bucket>() == 16);
    assert!(core::mem::size_of::<AdmittedKey>() == 32);
};
