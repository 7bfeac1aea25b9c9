//! The outbound flow table: egress records the flows outbound rules allow, ingress lets a reply
//! through only while its flow is recorded and alive. Ingress never creates an entry.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::bpf_jiffies64,
    maps::{LruHashMap, PerCpuArray},
};
use edge_classifier_common::{
    FLOW_FIN_IN, FLOW_FIN_OUT, FLOW_RST, FlowKey, FlowKey4, FlowState, PolicyEntry, TRANSPORT_TCP,
    flow_stat, layout,
};

use crate::{
    maps::{FLOW_STATS, FLOWS_V4, FLOWS_V6, POLICY, REPLY_CACHE_V4, REPLY_CACHE_V6, TRACKED_PORTS},
    parse::{Addr, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

const EEXIST: i32 = 17;

/// A flow's key in the table of its family, as the words of `FlowKey4` or `FlowKey`: built from
/// the parsed fields in registers, it is compared with the reply cache's words as it is, where a
/// key written field by field (u16, u16, u32) and read back as u64 stalls store forwarding.
pub enum Key {
    V4([u64; 2]),
    V6([u64; 5]),
}

const _: () = assert!(core::mem::size_of::<FlowKey4>() == 16);
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);

#[inline(always)]
pub fn key(
    transport: u32,
    local: &Addr,
    remote: &Addr,
    local_port: u16,
    remote_port: u16,
) -> Option<Key> {
    // FlowKey4: local, remote (4 bytes each), local_port, remote_port, transport (u32).
    // FlowKey: local, remote (16 bytes each), local_port, remote_port, transport (u8),
    // family (u8, 6), padding. Little-endian: the first field is the low end of its word.
    let ports = local_port as u64 | (remote_port as u64) << 16;
    match (local, remote) {
        (Addr::V4(l), Addr::V4(r)) => Some(Key::V4([
            *l as u64 | (*r as u64) << 32,
            ports | (transport as u64) << 32,
        ])),
        (Addr::V6(l), Addr::V6(r)) => Some(Key::V6([
            l[0],
            l[1],
            r[0],
            r[1],
            ports | (transport as u64 & 0xff) << 32 | 6 << 40,
        ])),
        // Both addresses come from one IP header.
        _ => None,
    }
}

/// The key's words as the table's key type (8-aligned, the same size, no padding unset).
#[inline(always)]
fn as_key<K, const N: usize>(words: &[u64; N]) -> &K {
    const { assert!(core::mem::size_of::<K>() == N * 8) };
    unsafe { &*(words.as_ptr() as *const K) }
}

#[inline(always)]
fn stat(index: u32) {
    if let Some(c) = FLOW_STATS.get_ptr_mut(index) {
        // Per-CPU slot: no other writer.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn now() -> u64 {
    // A tick is plenty for second-scale timeouts, and the verifier inlines this helper into one
    // load, where bpf_ktime_get_coarse_ns is a call that cost 13 ns of a 105 ns reply.
    unsafe { bpf_jiffies64() }
}

#[inline(always)]
fn closing(flags: u32) -> bool {
    flags & FLOW_RST != 0 || flags & (FLOW_FIN_OUT | FLOW_FIN_IN) == FLOW_FIN_OUT | FLOW_FIN_IN
}

#[inline(always)]
fn expired(state: &FlowState, now: u64, policy: &PolicyEntry, transport: u32) -> bool {
    let timeout = if transport != TRANSPORT_TCP {
        policy.udp_idle_ticks
    } else if closing(state.flags) {
        policy.tcp_closing_ticks
    } else {
        policy.tcp_idle_ticks
    };
    // Another CPU may have stamped a later time than ours: that is not idle.
    now.saturating_sub(state.last_seen) > timeout
}

#[inline(always)]
fn touch(state: &mut FlowState, now: u64) {
    // Skip the store when the clock has not moved: saves dirtying a shared cache line
    // on every frame of a busy flow.
    if state.last_seen < now {
        state.last_seen = now;
    }
}

/// Egress: records (or refreshes) the flow an outbound rule allowed.
#[inline(always)]
pub fn record(
    key: &Key,
    slot: u32,
    role_mask: u32,
    policy: &PolicyEntry,
    transport: u32,
    tcp_flags: u8,
) {
    match key {
        Key::V4(k) => record_in(
            &FLOWS_V4,
            as_key(k),
            slot,
            role_mask,
            policy,
            transport,
            tcp_flags,
        ),
        Key::V6(k) => record_in(
            &FLOWS_V6,
            as_key(k),
            slot,
            role_mask,
            policy,
            transport,
            tcp_flags,
        ),
    }
}

/// Ingress: the rule slot of the recorded, live flow a reply belongs to (refreshing the flow),
/// or `None`.
#[inline(always)]
pub fn reply(
    key: &Key,
    generation: u32,
    role_mask: u32,
    transport: u32,
    tcp_flags: u8,
) -> Option<u32> {
    let r = Reply {
        generation,
        role_mask,
        transport,
        tcp_flags,
        now: now(),
    };
    match key {
        Key::V4(k) => cached_reply(&REPLY_CACHE_V4, &FLOWS_V4, as_key(k), *k, &r),
        Key::V6(k) => cached_reply(&REPLY_CACHE_V6, &FLOWS_V6, as_key(k), *k, &r),
    }
}

/// What a reply lookup needs besides the key.
struct Reply {
    /// The `ACTIVE` word: it changes with every flip and flow purge. Bit 0 is the buffer whose
    /// policy holds the timeouts.
    generation: u32,
    role_mask: u32,
    transport: u32,
    tcp_flags: u8,
    now: u64,
}

/// Per-CPU exact-match caches of the replies found live in the flow tables this tick, in front
/// of them (the idea of Open vSwitch's EMC): a hit costs a few loads where the table lookup is a
/// kernel call (about 25 ns here). Within one tick a live flow stays live, since timeouts are
/// whole seconds and a lookup raises `last_seen` to this tick, so a hit is the table's answer.
/// A reload's flip and flow purge change the `ACTIVE` word, which every entry records, so a
/// purged flow is forgotten at once. What a hit cannot see is a flow evicted from a full table
/// earlier in the same tick (the LRU has no hook to tell): its replies pass on that CPU until
/// the tick ends, 1/HZ s at most. That flow was the Edge's own a moment before.
pub(crate) const REPLY_CACHE_SLOTS: u32 = 256;

/// A flow key as `N` words, the tick it was found live, and what the table said of it.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct CachedReply<const N: usize> {
    key: [u64; N],
    /// `bpf_jiffies64` when the table said the flow was live; the entry is good for that tick.
    tick: u64,
    slot: u32,
    /// The flow's: a reply must arrive on a NIC of that role.
    role_mask: u32,
    /// The `ACTIVE` word then.
    generation: u32,
    _pad: u32,
}

#[inline(always)]
fn cached_reply<K, const N: usize>(
    cache: &PerCpuArray<CachedReply<N>>,
    flows: &LruHashMap<K, FlowState>,
    key: &K,
    words: [u64; N],
    r: &Reply,
) -> Option<u32> {
    // The timeouts matter only to the table's answer, not to a cache hit.
    let lookup = || {
        reply_in(
            flows,
            key,
            r.role_mask,
            POLICY.get(r.generation & 1)?,
            r.transport,
            r.tcp_flags,
            r.now,
        )
    };
    // FIN and RST change the flow: they always go to the table, which records them.
    if r.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        return lookup().map(|s| s.slot);
    }
    let mut x = 0u64;
    for w in words {
        x = x.rotate_left(29) ^ w;
    }
    let index = (x.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u32 % REPLY_CACHE_SLOTS;
    let Some(c) = cache.get_ptr_mut(index) else {
        return lookup().map(|s| s.slot);
    };
    // Per-CPU slot: no other writer.
    let c = unsafe { &mut *c };
    // Word by word: `==` on the arrays becomes a call to a BPF memcmp, which costs as much as
    // the table lookup the cache is there to skip.
    let mut same = c.tick == r.now && c.generation == r.generation;
    for (a, b) in c.key.iter().zip(&words) {
        same &= a == b;
    }
    if same {
        return (c.role_mask & r.role_mask != 0).then_some(c.slot);
    }
    let state = lookup()?;
    *c = CachedReply {
        key: words,
        tick: r.now,
        slot: state.slot,
        role_mask: state.role_mask,
        generation: r.generation,
        _pad: 0,
    };
    Some(state.slot)
}

#[inline(always)]
fn record_in<K>(
    flows: &LruHashMap<K, FlowState>,
    key: &K,
    slot: u32,
    role_mask: u32,
    policy: &PolicyEntry,
    transport: u32,
    tcp_flags: u8,
) {
    let now = now();
    let tcp = transport == TRANSPORT_TCP;
    let mut teardown = 0;
    if tcp && tcp_flags & TCP_FIN != 0 {
        teardown |= FLOW_FIN_OUT;
    }
    if tcp && tcp_flags & TCP_RST != 0 {
        teardown |= FLOW_RST;
    }
    if let Some(p) = flows.get_ptr_mut(key) {
        let state = unsafe { &mut *p };
        let syn = tcp && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
        if expired(state, now, policy, transport) || (syn && closing(state.flags)) {
            // The old flow is over; this frame starts a new one on the same 5-tuple.
            stat(flow_stat::EXPIRED);
            stat(flow_stat::CREATED);
            state.flags = 0;
        }
        state.slot = slot;
        state.role_mask = role_mask;
        touch(state, now);
        if teardown != 0 {
            // A plain read-modify-write: a FIN lost to a concurrent update on another CPU only
            // leaves the flow to its idle timeout, which fails safe.
            state.flags |= teardown;
        }
        return;
    }
    // A RST for a flow we do not know opens nothing.
    if teardown & FLOW_RST != 0 {
        return;
    }
    let state = FlowState {
        last_seen: now,
        slot,
        flags: teardown,
        role_mask,
        _pad: 0,
    };
    match flows.insert(key, state, BPF_NOEXIST as u64) {
        Ok(()) => stat(flow_stat::CREATED),
        // Another CPU recorded the same flow a moment ago.
        Err(e) if e == -EEXIST => {}
        Err(_) => stat(flow_stat::INSERT_FAILED),
    }
}

#[inline(always)]
fn reply_in<K>(
    flows: &LruHashMap<K, FlowState>,
    key: &K,
    role_mask: u32,
    policy: &PolicyEntry,
    transport: u32,
    tcp_flags: u8,
    now: u64,
) -> Option<FlowState> {
    let state = unsafe { &mut *flows.get_ptr_mut(key)? };
    if state.role_mask & role_mask == 0 {
        return None;
    }
    if expired(state, now, policy, transport) {
        if flows.remove(key).is_ok() {
            stat(flow_stat::EXPIRED);
        }
        return None;
    }
    touch(state, now);
    if transport == TRANSPORT_TCP {
        let mut teardown = 0;
        if tcp_flags & TCP_FIN != 0 {
            teardown |= FLOW_FIN_IN;
        }
        if tcp_flags & TCP_RST != 0 {
            teardown |= FLOW_RST;
        }
        if teardown != 0 && state.flags & teardown != teardown {
            state.flags |= teardown;
        }
    }
    Some(*state)
}

/// Egress tracking recorded a flow to `port`: replies from it are worth a flow lookup.
#[inline(always)]
pub fn mark_tracked_port(transport: u32, port: u16) {
    if let Some(p) = TRACKED_PORTS.get_ptr_mut(layout::tracked_port(transport, port)) {
        // Read first: a store on every frame would keep the line bouncing between CPUs.
        unsafe {
            if *p == 0 {
                *p = 1;
            }
        }
    }
}

/// Whether egress tracking ever recorded a flow to `port` (its replies come from it).
#[inline(always)]
pub fn tracked_port(transport: u32, port: u16) -> bool {
    match TRACKED_PORTS.get(layout::tracked_port(transport, port)) {
        Some(p) => *p != 0,
        None => false,
    }
}
