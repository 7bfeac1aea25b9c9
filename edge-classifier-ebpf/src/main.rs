//! The data plane's entry points. XDP ingress: every frame is matched against the port matrix
//! held in the maps (`maps.rs`) and passed or dropped. TC egress: frames the Edge sends on
//! outbound rules are recorded in the flow table that ingress replies must match. Every frame is
//! counted under the rule or reason that decided it. The flow of a frame: `parse` (headers) →
//! `addr` (set bits of its addresses) → `classify` (rule or reason) → `flow` (the outbound flow
//! table) → the counter here.
#![no_std]
#![no_main]

mod addr;
mod classify;
mod flow;
mod limit;
mod maps;
mod monitor;
mod parse;
mod synproxy;

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use classify::{Verdict, classify, try_egress};
use edge_classifier_common::{IFACE_SLOTS, layout, reason};
use maps::*;
use parse::{Frame, Malformed};

/// The binding of the interface a frame is on: (counter block, role bit, monitor slots
/// watching it); block 0 is unbound.
#[inline(always)]
fn binding(ifindex: u32) -> (u32, u32, u32) {
    match IFACES.get(ifindex % IFACE_SLOTS) {
        Some(iface) if iface.ifindex == ifindex && iface.block != 0 => {
            (iface.block, iface.role_mask, iface.monitors)
        }
        _ => (0, 0, 0),
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
    let (block, role_mask, monitors) = binding(ctx.ingress_ifindex() as u32);
    // The unbound case returns on its own path (as LLVM laid it out before monitors), so that
    // the test below costs the common path one load and a branch, and nothing more.
    if block == 0 {
        return ingress(&ctx, 0, 0).action;
    }
    if monitors != 0 {
        // A monitor watches this NIC: the frame goes to the copy of this program that also
        // writes events (`MONITOR_XDP`), so that this one carries nothing of them but this
        // test. A tail call keeps the stack frames apart; one that fails (the slot not filled
        // yet) falls through to classify here without an event.
        unsafe { MONITOR_XDP.tail_call(&ctx, 0) };
    }
    ingress(&ctx, block, role_mask).action
}

/// `edge_classifier` with events: what the frames of a monitored NIC run (tail-called).
#[xdp]
pub fn edge_classifier_monitored(ctx: XdpContext) -> u32 {
    let (block, role_mask, monitors) = binding(ctx.ingress_ifindex() as u32);
    let verdict = ingress(&ctx, block, role_mask);
    if monitors != 0 {
        monitor::xdp_event(&ctx, monitors, verdict.passes(), verdict.counter);
    }
    verdict.action
}

/// Classifies and counts one frame on ingress.
#[inline(always)]
fn ingress(ctx: &XdpContext, block: u32, role_mask: u32) -> Verdict {
    let verdict = if block == 0 {
        Verdict::pass(reason::PASS_UNBOUND_INTERFACE)
    } else {
        classify(ctx, active_word(), role_mask)
    };
    // `syn_cookie` counts the SYN-ACK's bytes: the frame is trimmed to its headers by then.
    count(block, verdict.counter, 1, Frame::len(ctx));
    verdict
}

/// Bytes pulled into the linear area so the parser can read up to the ports of a frame with two
/// VLAN tags and IPv6 extension headers.
const EGRESS_PULL: u32 = 14 + 8 + 40 + 512 + 20;

#[classifier]
pub fn edge_egress(ctx: TcContext) -> i32 {
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let (block, role_mask, monitors) = binding(ifindex);
    if block == 0 {
        return tc_action(egress(&ctx, 0, 0));
    }
    if monitors != 0 {
        // As on ingress: the monitored copy, `MONITOR_TC`, writes the events.
        unsafe { MONITOR_TC.tail_call(&ctx, 0) };
    }
    let verdict = egress(&ctx, block, role_mask);
    tc_action(verdict)
}

/// `edge_egress` with events (tail-called for the frames of a monitored NIC).
#[classifier]
pub fn edge_egress_monitored(ctx: TcContext) -> i32 {
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let (block, role_mask, monitors) = binding(ifindex);
    let verdict = egress(&ctx, block, role_mask);
    if monitors != 0 {
        monitor::tc_event(&ctx, ifindex, monitors, verdict.passes(), verdict.counter);
    }
    tc_action(verdict)
}

/// Records and counts one frame on egress.
#[inline(always)]
fn egress(ctx: &TcContext, block: u32, role_mask: u32) -> Verdict {
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
            Some(policy) => match try_egress(ctx, active, role_mask, policy) {
                Ok(v) => v,
                // Egress is the Edge's own traffic: what it cannot parse is not ours to stop.
                Err(Malformed) => Verdict::pass(reason::PASS_EGRESS_UNTRACKED),
            },
            None => Verdict::pass(reason::PASS_EGRESS_UNTRACKED),
        }
    };
    count(block, verdict.counter, segs as u64, Frame::len(ctx));
    verdict
}

#[inline(always)]
fn tc_action(verdict: Verdict) -> i32 {
    if verdict.passes() {
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
