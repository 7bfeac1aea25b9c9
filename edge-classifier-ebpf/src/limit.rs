//! Limits on new flows: a limited rule's new flows (a TCP SYN, a UDP datagram of a flow it has
//! not admitted yet) take a token from their source prefix's bucket, then from the rule's total
//! one. Established flows never get here: TCP frames other than a bare SYN are not new, a UDP
//! flow once admitted is recorded in `ADMITTED`, and replies to the Edge's own flows are
//! decided by the flow table before any limit.

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_jiffies64};
use edge_classifier_common::{
    AdmittedKey, Bucket, BucketKey, Budget, POLICY_DEFAULT_PASS, RuleLimit, TRANSPORT_TCP,
    TRANSPORT_UDP, layout, limit_stat, reason,
};

use crate::{
    addr::set_bits,
    classify::{PROXY_ANSWER, Policy, Verdict},
    maps::{ADMITTED, BUCKETS, LIMIT_SCRATCH, LIMIT_STATS, LIMITED, LIMITS, SYN_PROXY},
    parse::Addr,
};

/// What the limit needs of a frame, as `admit` takes it in registers.
#[repr(C)]
struct NewFlow {
    word: u32,
    slot: u32,
    transport: u32,
    is_v6: u32,
    sport: u32,
    dport: u32,
    /// The source address words as `parse::Ip` holds them (IPv4 in the low half of the first).
    src: [u64; 2],
}

#[inline(always)]
fn now() -> u64 {
    // Token buckets refill per tick: at HZ 250 a 4 ms step, finer than any rate a catalogue
    // may give per source, and the verifier inlines this helper to one load.
    unsafe { bpf_jiffies64() }
}

#[inline(always)]
fn stat(index: u32) {
    if let Some(c) = LIMIT_STATS.get_ptr_mut(index) {
        // Per-CPU slot: no other writer.
        unsafe { *c += 1 };
    }
}

/// `LIMIT_SCRATCH`: the keys `admit` builds, in map memory rather than on the stack (map
/// helpers take a map value as a key; the frames of the call chain must fit the verifier's 512
/// bytes together).
#[repr(C)]
pub(crate) struct Scratch {
    flow: AdmittedKey,
    key: BucketKey,
}

/// Takes one flow's cost from the bucket at `key`, made full on first use. Buckets are shared
/// by the CPUs without a lock: two CPUs updating one bucket at once may lose one's update,
/// which admits a flow more, never fewer.
#[inline(always)]
fn take(key: &BucketKey, budget: &Budget, now: u64) -> bool {
    if let Some(b) = BUCKETS.get_ptr_mut(key) {
        let b = unsafe { &mut *b };
        // Another CPU may have stamped a later tick: no time has passed for us.
        let elapsed = now.saturating_sub(b.stamp);
        let mut tokens = if elapsed >= budget.fill_ticks {
            budget.cap
        } else {
            let t = b.tokens + elapsed * budget.refill;
            if t > budget.cap { budget.cap } else { t }
        };
        let ok = tokens >= budget.cost;
        if ok {
            tokens -= budget.cost;
        }
        if elapsed != 0 || ok {
            b.tokens = tokens;
            if b.stamp < now {
                b.stamp = now;
            }
        }
        ok
    } else {
        let fresh = Bucket {
            tokens: budget.cap.saturating_sub(budget.cost),
            stamp: now,
        };
        // Another CPU may have made it meanwhile: then its bucket stands, and this flow is
        // admitted as the first of a full bucket would be.
        if BUCKETS.insert(key, fresh, BPF_NOEXIST as u64).is_ok() {
            stat(limit_stat::BUCKET_CREATED);
        }
        budget.cap >= budget.cost
    }
}

/// The per-source budget, then the rule's total: whether both admit the flow.
#[inline(always)]
fn shared(f: &NewFlow, key: &mut BucketKey, limit: &RuleLimit, now: u64) -> bool {
    if limit.per_source.cost != 0 {
        let (family, addr) = if f.is_v6 == 0 {
            (4, [f.src[0] & limit.mask_v4, 0])
        } else {
            (
                6,
                [f.src[0] & limit.mask_v6[0], f.src[1] & limit.mask_v6[1]],
            )
        };
        *key = BucketKey {
            slot: f.slot,
            generation: limit.generation,
            family,
            addr,
        };
        if !take(key, &limit.per_source, now) {
            return false;
        }
    }
    // The total is asked only once the source's own budget admits the flow: a source over its
    // limit does not spend the rule's total.
    if limit.total.cost != 0 {
        *key = BucketKey {
            slot: f.slot,
            generation: limit.generation,
            family: 0,
            addr: [0, 0],
        };
        if !take(key, &limit.total, now) {
            return false;
        }
    }
    true
}

/// The limit's verdict on a new flow of a limited rule: the rule's own when admitted,
/// `rate_limited` (counted per rule in `LIMITED`) when over a budget. Out of line: only limited
/// rules' new flows pay for the call. The verdict comes back as one word (`Verdict::word`), in
/// a register.
///
/// The frame comes in four words, so that the caller only packs registers: `word_slot` is the
/// `ACTIVE` word and the rule slot above it; `ports` the source port, the destination port
/// above it, then the transport (bits 32..40) and 1 for IPv6 (bit 40); `src0`, `src1` the
/// source address words.
#[inline(never)]
pub(crate) fn admit(word_slot: u64, ports: u64, src0: u64, src1: u64) -> u64 {
    let f = NewFlow {
        word: word_slot as u32,
        slot: (word_slot >> 32) as u32,
        transport: (ports >> 32) as u32 & 0xff,
        is_v6: (ports >> 40) as u32 & 1,
        sport: ports as u32 & 0xffff,
        dport: (ports >> 16) as u32 & 0xffff,
        src: [src0, src1],
    };
    let f = &f;
    let admitted = Verdict::rule(f.slot).word();
    let Some(limit) = LIMITS.get(layout::limit(f.word & 1, f.slot)) else {
        return admitted;
    };
    let Some(s) = LIMIT_SCRATCH.get_ptr_mut(0) else {
        return admitted;
    };
    // Per-CPU: this frame's alone.
    if check(f, unsafe { &mut *s }, limit) {
        return admitted;
    }
    let monitor = Policy(f.word & 1).flags() & POLICY_DEFAULT_PASS != 0;
    if limit.syn_proxy_ticks != 0 && f.transport == TRANSPORT_TCP && !monitor {
        return proxy(f.slot, f.is_v6, limit.syn_proxy_ticks as u64, admitted);
    }
    if let Some(c) = LIMITED.get_ptr_mut(f.slot) {
        // Per-CPU slot: no other writer.
        unsafe { *c += 1 };
    }
    if monitor {
        // Monitor mode drops nothing a rule decides: counted as what it would have been.
        Verdict::pass(reason::PASS_MONITOR_RATE_LIMITED).word()
    } else {
        Verdict::drop(reason::DROP_RATE_LIMITED).word()
    }
}

#[inline(always)]
fn check(f: &NewFlow, s: &mut Scratch, limit: &RuleLimit) -> bool {
    let now = now();
    let udp = f.transport == TRANSPORT_UDP;
    s.flow = AdmittedKey {
        slot: f.slot,
        family: if f.is_v6 != 0 { 6 } else { 4 },
        remote_port: f.sport as u16,
        local_port: f.dport as u16,
        generation: limit.generation,
        remote: f.src,
    };
    let flow = &s.flow;
    if udp && let Some(seen) = ADMITTED.get_ptr_mut(flow) {
        let seen = unsafe { &mut *seen };
        let idle = match Policy(f.word & 1).entry() {
            Some(p) => p.udp_idle_ticks,
            None => 0,
        };
        if now.saturating_sub(*seen) <= idle {
            if *seen < now {
                *seen = now;
            }
            return true;
        }
    }
    let src = if f.is_v6 != 0 {
        Addr::V6(f.src)
    } else {
        Addr::V4(f.src[0] as u32)
    };
    let sets = limit.exempt_mask | limit.own_mask;
    let bits = if sets != 0 {
        set_bits(f.word & 1, &src) & sets
    } else {
        0
    };
    if bits & limit.exempt_mask != 0 {
        stat(limit_stat::EXEMPT);
        return true;
    }
    if bits & limit.own_mask != 0 {
        // A set with a budget of its own: its sources share it, and neither the per-source nor
        // the rule's total budget applies to them.
        s.key = BucketKey {
            slot: f.slot,
            generation: limit.generation,
            family: 1,
            addr: [0, 0],
        };
        if !take(&s.key, &limit.own, now) {
            return false;
        }
    } else if !shared(f, &mut s.key, limit, now) {
        return false;
    }
    if udp && ADMITTED.insert(flow, now, 0).is_ok() {
        stat(limit_stat::ADMITTED);
    }
    true
}

/// A SYN over a `syn_proxy` rule's budget: answered from XDP (`synproxy::finish`), except one
/// every `ticks` per address family that goes through to the listener, which answers it with a cookie of its own
/// (`tcp_syncookies = 2`): the kernel accepts a cookie's ACK only from a listener that sent a
/// cookie itself in the last two minutes (`tcp_synq_no_recent_overflow`).
#[inline(always)]
fn proxy(slot: u32, is_v6: u32, ticks: u64, admitted: u64) -> u64 {
    let now = now();
    let Some(st) = SYN_PROXY.get_ptr_mut(slot) else {
        return admitted;
    };
    // Shared by the CPUs: a lost update lets a second SYN through or moves a stamp a tick.
    let st = unsafe { &mut *st };
    let passed = if is_v6 != 0 {
        &mut st.syn_passed_v6
    } else {
        &mut st.syn_passed_v4
    };
    if now.saturating_sub(*passed) >= ticks {
        *passed = now;
        return admitted;
    }
    // The ACKs are checked for twice the pass-through interval after the last SYN answered;
    // written only when it moves by half that, so a flood does not bounce the line each SYN.
    if st.active_until < now + ticks {
        st.active_until = now + 2 * ticks;
    }
    Verdict::proxy(PROXY_ANSWER | slot).word()
}

/// Whether the rule's proxy answered a SYN lately, so that its ACKs of no socket are checked.
#[inline(always)]
pub(crate) fn proxy_active(slot: u32) -> bool {
    match SYN_PROXY.get(slot) {
        Some(st) => st.active_until > now(),
        None => false,
    }
}
