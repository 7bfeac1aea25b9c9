//! Every map of the object, declared once, one line of purpose each. The loader names the same
//! maps (pins, typed handles); the indices into the buffered ones are in
//! `edge_classifier_common::layout`.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray, RingBuf},
};
use edge_classifier_common::{
    ADMITTED_FLOWS, AdmittedKey, BUFFERS, Bucket, BucketKey, BufferRecord, Counter,
    DEFAULT_FLOW_CAPACITY, FlowKey, FlowKey4, FlowState, IFACE_ADDRS_MAX, IFACE_SLOTS, IfaceInfo,
    InstanceRecord, LIMIT_BUCKETS, Locals, Lpm4, Lpm6, MAX_CLASSES, MAX_PREFIXES, MAX_RULES,
    PORT_ENTRIES, PORT_SPACE, PolicyEntry, PortEntry, ProxyState, RECORD_CHUNK, RECORD_CHUNKS,
    RuleClass, RuleLimit, STATS_ENTRIES, STRIDE_BLOCKS, STRIDE_LEAVES, STRIDE_TOP, Small4, Small6,
    StrideBlock, TRANSPORTS, flow_stat, limit_stat,
    monitor::{MONITOR_RING_BYTES, MONITOR_SLOTS, MonitorConfig, MonitorCpu},
};

use crate::{
    classify::Protected,
    flow::{CachedReply, REPLY_CACHE_SLOTS},
    limit::Scratch,
};

/// The active rule buffer (bit 0) and a generation that every flip and flow purge changes.
#[map]
pub(crate) static ACTIVE: Array<u32> = Array::with_max_entries(1, 0);
/// Per buffer: the policy flags, ICMP type bitmaps and flow timeouts.
#[map]
pub(crate) static POLICY: Array<PolicyEntry> = Array::with_max_entries(BUFFERS, 0);
/// Bound interfaces by `ifindex % IFACE_SLOTS`: counter block and role bit.
#[map]
pub(crate) static IFACES: Array<IfaceInfo> = Array::with_max_entries(IFACE_SLOTS, 0);
/// Per buffer and transport, each port's rule classes (inbound, reply-from, reply-to).
#[map]
pub(crate) static PORTS: Array<PortEntry> = Array::with_max_entries(PORT_ENTRIES, 0);
/// Per buffer, the rule classes: up to `MAX_CANDIDATES` rules in file order with set masks.
#[map]
pub(crate) static CLASSES: Array<RuleClass> = Array::with_max_entries(BUFFERS * MAX_CLASSES, 0);
/// IPv4 prefixes → set bits, for catalogues no small or stride table holds (both buffers).
#[map]
pub(crate) static SETS_V4: LpmTrie<Lpm4, u64> = LpmTrie::with_max_entries(MAX_PREFIXES, 0);
/// IPv6 prefixes → set bits, for catalogues no small table holds (both buffers).
#[map]
pub(crate) static SETS_V6: LpmTrie<Lpm6, u64> = LpmTrie::with_max_entries(MAX_PREFIXES, 0);
/// Per buffer, the Edge's own host addresses, compared directly before a table walk.
#[map]
pub(crate) static LOCALS: Array<Locals> = Array::with_max_entries(BUFFERS, 0);
/// Per buffer, the IPv4 prefixes of a small catalogue, scanned.
#[map]
pub(crate) static SMALL_V4: Array<Small4> = Array::with_max_entries(BUFFERS, 0);
/// Per buffer, the IPv6 prefixes of a small catalogue, scanned.
#[map]
pub(crate) static SMALL_V6: Array<Small6> = Array::with_max_entries(BUFFERS, 0);
/// Per buffer, the IPv4 stride table's first level (the top 16 bits).
#[map]
pub(crate) static STRIDE4_TOP: Array<u32> = Array::with_max_entries(BUFFERS * STRIDE_TOP, 0);
/// Per buffer, the stride table's 256-entry blocks (the next 8 bits, then the last 8).
#[map]
pub(crate) static STRIDE4_BLOCKS: Array<StrideBlock> =
    Array::with_max_entries(BUFFERS * STRIDE_BLOCKS, 0);
/// Per buffer, the stride table's leaves: set bits.
#[map]
pub(crate) static STRIDE4_LEAVES: Array<u64> = Array::with_max_entries(BUFFERS * STRIDE_LEAVES, 0);
/// Per CPU, per interface block: packets and bytes per reason and per rule slot.
#[map]
pub(crate) static STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(STATS_ENTRIES, 0);
/// Addresses configured on the bound NICs (link-local included), kept current by the daemon;
/// protected under `POLICY_PROTECT_IFACE_ADDRS`. Not double-buffered: they follow the NICs.
#[map]
pub(crate) static IFACE_ADDRS_V4: HashMap<u32, u32> = HashMap::with_max_entries(IFACE_ADDRS_MAX, 0);
/// The same for IPv6, keyed by the address in four words.
#[map]
pub(crate) static IFACE_ADDRS_V6: HashMap<[u32; 4], u32> =
    HashMap::with_max_entries(IFACE_ADDRS_MAX, 0);
/// IPv4 flows the Edge opened (16-byte key); sized by the loader from `[flows] capacity`.
#[map]
pub(crate) static FLOWS_V4: LruHashMap<FlowKey4, FlowState> =
    LruHashMap::with_max_entries(DEFAULT_FLOW_CAPACITY, 0);
/// IPv6 flows the Edge opened (40-byte key); sized the same way.
#[map]
pub(crate) static FLOWS_V6: LruHashMap<FlowKey, FlowState> =
    LruHashMap::with_max_entries(DEFAULT_FLOW_CAPACITY, 0);
/// Per transport and remote port: set once a flow to that port was recorded by egress tracking.
/// It keeps the flow lookup off the path of frames no rule covers (a SYN flood to TCP 22) unless
/// they come from a port the Edge talks to. Never cleared: a stale entry costs only a lookup.
#[map]
pub(crate) static TRACKED_PORTS: Array<u8> = Array::with_max_entries(TRANSPORTS * PORT_SPACE, 0);
/// Per buffer, what it holds (`BufferRecord`), and the description's chunks: the catalogue the
/// kernel runs, recorded with it. Userspace alone reads and writes these; they are here so that
/// they are created and pinned with the rest.
#[map]
pub(crate) static RECORD: Array<BufferRecord> = Array::with_max_entries(BUFFERS, 0);
#[map]
pub(crate) static RECORD_TEXT: HashMap<u32, [u8; RECORD_CHUNK]> =
    HashMap::with_max_entries(BUFFERS * RECORD_CHUNKS, BPF_F_NO_PREALLOC);
/// The instance's reload counters and change generation (`InstanceRecord`).
#[map]
pub(crate) static INSTANCE_RECORD: Array<InstanceRecord> = Array::with_max_entries(1, 0);
/// Per CPU: flows created, expired, not recorded (`flow_stat`).
#[map]
pub(crate) static FLOW_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(flow_stat::COUNT, 0);
/// Per CPU, the IPv4 replies found live in the flow table this tick (see `flow::cached_reply`).
#[map]
pub(crate) static REPLY_CACHE_V4: PerCpuArray<CachedReply<2>> =
    PerCpuArray::with_max_entries(REPLY_CACHE_SLOTS, 0);
/// The same for IPv6.
#[map]
pub(crate) static REPLY_CACHE_V6: PerCpuArray<CachedReply<5>> =
    PerCpuArray::with_max_entries(REPLY_CACHE_SLOTS, 0);
/// Per CPU, what the full parser hands back to the entry point (`classify::full`).
#[map]
pub(crate) static FULL_PARSE: PerCpuArray<Protected> = PerCpuArray::with_max_entries(1, 0);
/// Per monitor slot, what that monitor asks for and its lease (`monitor.rs`).
#[map]
pub(crate) static MONITOR_CONFIG: Array<MonitorConfig> = Array::with_max_entries(MONITOR_SLOTS, 0);
/// Per CPU and monitor slot: the rate limiter's window and the events not delivered.
#[map]
pub(crate) static MONITOR_CPU: PerCpuArray<MonitorCpu> =
    PerCpuArray::with_max_entries(MONITOR_SLOTS, 0);
/// One ring buffer per monitor slot: a ring has one consumer position, so monitors cannot
/// share one. Four statics rather than a map of maps: aya-ebpf 0.2 has no map-in-map.
#[map]
pub(crate) static MONITOR_RING_0: RingBuf = RingBuf::with_byte_size(MONITOR_RING_BYTES, 0);
#[map]
pub(crate) static MONITOR_RING_1: RingBuf = RingBuf::with_byte_size(MONITOR_RING_BYTES, 0);
#[map]
pub(crate) static MONITOR_RING_2: RingBuf = RingBuf::with_byte_size(MONITOR_RING_BYTES, 0);
#[map]
pub(crate) static MONITOR_RING_3: RingBuf = RingBuf::with_byte_size(MONITOR_RING_BYTES, 0);
/// The programs that also write events (`edge_classifier_monitored`, `edge_egress_monitored`),
/// tail-called for the frames of a monitored NIC; the loader fills them. One each: a program
/// array holds programs of one type.
#[map]
pub(crate) static MONITOR_XDP: ProgramArray = ProgramArray::with_max_entries(1, 0);
#[map]
pub(crate) static MONITOR_TC: ProgramArray = ProgramArray::with_max_entries(1, 0);
/// Per buffer and rule slot, a limited rule's budgets and exempt sets (`RuleLimit`).
#[map]
pub(crate) static LIMITS: Array<RuleLimit> = Array::with_max_entries(BUFFERS * MAX_RULES, 0);
/// Token buckets of limited rules: per (rule, source prefix) and per rule in total.
#[map]
pub(crate) static BUCKETS: LruHashMap<BucketKey, Bucket> =
    LruHashMap::with_max_entries(LIMIT_BUCKETS, 0);
/// UDP flows a limited rule admitted (`AdmittedKey` → `bpf_jiffies64` last seen): their later
/// datagrams are not new flows.
#[map]
pub(crate) static ADMITTED: LruHashMap<AdmittedKey, u64> =
    LruHashMap::with_max_entries(ADMITTED_FLOWS, 0);
/// Per CPU, per rule slot: new flows dropped (or, in monitor mode, passed) over a limit.
#[map]
pub(crate) static LIMITED: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_RULES, 0);
/// Per CPU: buckets made, UDP flows admitted, exempt new flows (`limit_stat`).
#[map]
pub(crate) static LIMIT_STATS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(limit_stat::COUNT, 0);
/// Per CPU, a limited rule's new flow and the keys its limit looks up (`limit::admit`).
#[map]
pub(crate) static LIMIT_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);
/// Per rule slot, a `syn_proxy` rule's state: answering SYNs until when, and when a SYN over
/// the budget last went through to the listener (`ProxyState`).
#[map]
pub(crate) static SYN_PROXY: Array<ProxyState> = Array::with_max_entries(MAX_RULES, 0);
/// Per CPU, per rule slot: SYNs over the budget answered from XDP with a SYN cookie.
#[map]
pub(crate) static SYN_PROXIED: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_RULES, 0);
