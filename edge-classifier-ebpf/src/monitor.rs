//! Events for `edge-classifier monitor`: a copy of a frame and its verdict, written into the
//! ring buffer of each monitor slot that wants it. The entry points call in here only when the
//! `monitors` word of the frame's `IFACES` entry is non-zero; with no monitor attached the
//! whole cost is that test. Everything here is out of line (one subprogram per program).

use aya_ebpf::{
    helpers::{
        bpf_jiffies64, bpf_ktime_get_ns,
        generated::{bpf_skb_load_bytes, bpf_xdp_load_bytes},
    },
    maps::RingBuf,
    programs::{TcContext, XdpContext},
};
use edge_classifier_common::{
    IFACE_SLOTS, RULE_COUNTER_BASE,
    monitor::{
        EVENT_EGRESS, EVENT_PASS, LOST_RATE_LIMIT, LOST_RING_FULL, MONITOR_DROP, MONITOR_PASS,
        MONITOR_RULES, MONITOR_SNAPLEN, MonitorEvent,
    },
};

use crate::maps::*;

/// A verdict as one word (pass in bit 32, the counter below), so that it travels in a register.
#[inline(always)]
pub(crate) fn word(pass: bool, counter: u32) -> u64 {
    (pass as u64) << 32 | counter as u64
}

/// Ingress: the frame as XDP sees it.
#[inline(never)]
pub(crate) fn xdp_event(ctx: &XdpContext, monitors: u32, pass: bool, counter: u32) {
    // Read again rather than kept from the entry point: a value live across `classify` costs
    // its frame a slot, and the frames of the call chain share 512 bytes.
    let ifindex = ctx.ingress_ifindex() as u32;
    let len = (ctx.data_end() - ctx.data()) as u32;
    let raw = ctx.ctx;
    emit(
        ifindex,
        monitors,
        word(pass, counter),
        len,
        0,
        |buf, n| unsafe { bpf_xdp_load_bytes(raw.cast(), 0, buf, n) },
    );
}

/// Egress: the skb as TC sees it (its length is that of the whole skb, GSO segments included).
#[inline(never)]
pub(crate) fn tc_event(ctx: &TcContext, ifindex: u32, monitors: u32, pass: bool, counter: u32) {
    let len = ctx.len();
    let raw = ctx.skb.skb;
    emit(
        ifindex,
        monitors,
        word(pass, counter),
        len,
        EVENT_EGRESS,
        |buf, n| unsafe { bpf_skb_load_bytes(raw.cast(), 0, buf, n) },
    );
}

#[inline(always)]
fn emit(
    ifindex: u32,
    monitors: u32,
    verdict: u64,
    len: u32,
    flags: u32,
    copy: impl Fn(*mut core::ffi::c_void, u32) -> i64,
) {
    let pass = verdict >> 32 != 0;
    let counter = verdict as u32;
    let flags = flags | if pass { EVENT_PASS } else { 0 };
    // Written out per slot: each has its own ring map, and the verifier wants to know which.
    if monitors & 1 != 0 {
        slot(
            0,
            &MONITOR_RING_0,
            ifindex,
            pass,
            counter,
            flags,
            len,
            &copy,
        );
    }
    if monitors & 2 != 0 {
        slot(
            1,
            &MONITOR_RING_1,
            ifindex,
            pass,
            counter,
            flags,
            len,
            &copy,
        );
    }
    if monitors & 4 != 0 {
        slot(
            2,
            &MONITOR_RING_2,
            ifindex,
            pass,
            counter,
            flags,
            len,
            &copy,
        );
    }
    if monitors & 8 != 0 {
        slot(
            3,
            &MONITOR_RING_3,
            ifindex,
            pass,
            counter,
            flags,
            len,
            &copy,
        );
    }
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn slot(
    slot: u32,
    ring: &RingBuf,
    ifindex: u32,
    pass: bool,
    counter: u32,
    flags: u32,
    len: u32,
    copy: &impl Fn(*mut core::ffi::c_void, u32) -> i64,
) {
    let Some(conf) = MONITOR_CONFIG.get(slot) else {
        return;
    };
    let Some(cpu) = MONITOR_CPU.get_ptr_mut(slot) else {
        return;
    };
    // Per-CPU: this CPU's alone, so plain stores are enough.
    let cpu = unsafe { &mut *cpu };
    // The lease, on every frame of a watched NIC: jiffies cost no helper call.
    let jiffies = unsafe { bpf_jiffies64() };
    if conf.renewals != cpu.seen_renewals {
        cpu.seen_renewals = conf.renewals;
        cpu.renewed_at = jiffies;
    } else if conf.flags == 0 || jiffies.wrapping_sub(cpu.renewed_at) > conf.lease_ticks {
        // The monitor is gone (or has let go): stop spending anything on it on this NIC. A
        // monitor that renews its lease sets the bit again.
        if let Some(iface) = IFACES.get_ptr_mut(ifindex % IFACE_SLOTS) {
            unsafe {
                if (*iface).ifindex == ifindex {
                    (*iface).monitors &= !(1u32 << slot);
                }
            }
        }
        return;
    }
    let want = if pass { MONITOR_PASS } else { MONITOR_DROP };
    if conf.flags & want == 0 || !selected(conf.reasons, &conf.rules, conf.rules_len, counter) {
        return;
    }
    // The clock for the event and the rate limit: a helper call, so only for a selected frame.
    let now = unsafe { bpf_ktime_get_ns() };
    if now.wrapping_sub(cpu.window_start_ns) >= 1_000_000_000 {
        cpu.window_start_ns = now;
        cpu.in_window = 0;
    }
    if cpu.in_window >= conf.rate_per_cpu as u64 {
        cpu.lost[LOST_RATE_LIMIT] += 1;
        return;
    }
    cpu.in_window += 1;
    let Some(mut entry) = ring.reserve::<MonitorEvent>(0) else {
        cpu.lost[LOST_RING_FULL] += 1;
        return;
    };
    let ev = entry.as_mut_ptr();
    let cap = if len > MONITOR_SNAPLEN as u32 {
        MONITOR_SNAPLEN as u32
    } else {
        len
    };
    unsafe {
        (*ev).ts_ns = now;
        (*ev).ifindex = ifindex;
        (*ev).counter = counter;
        (*ev).flags = flags;
        (*ev).len = len;
        (*ev)._pad = 0;
        // The mask shows the verifier what `cap != 0` already says: 1..=256 bytes, within the
        // record. LLVM knows it too and would drop the mask, so it is made to forget (the
        // volatile read). A failed copy records no bytes.
        let opaque = core::ptr::read_volatile(&cap);
        let n = (opaque.wrapping_sub(1) & (MONITOR_SNAPLEN as u32 - 1)) + 1;
        let copied = cap != 0 && copy((*ev).data.as_mut_ptr().cast(), n) == 0;
        (*ev).caplen = if copied { cap } else { 0 };
    }
    entry.submit(0);
}

#[inline(always)]
fn selected(reasons: u32, rules: &[u32; MONITOR_RULES], rules_len: u32, counter: u32) -> bool {
    if reasons == 0 && rules_len == 0 {
        return true;
    }
    if counter < RULE_COUNTER_BASE {
        return reasons & (1u32 << counter) != 0;
    }
    let mut i = 0;
    while i < MONITOR_RULES {
        if (i as u32) < rules_len && rules[i] == counter {
            return true;
        }
        i += 1;
    }
    false
}
