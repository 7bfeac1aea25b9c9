//! The SYN proxy of a rule whose limit has `syn_proxy`: a SYN over the rule's budget is
//! answered here, from XDP, with a SYN-ACK carrying the kernel's own SYN cookie
//! (`bpf_tcp_raw_gen_syncookie_*`, the secret the listener checks with) and sent back with
//! XDP_TX, so the flood never reaches the stack; while that goes on, a bare ACK of the rule that
//! no socket knows is checked for a valid cookie (`bpf_tcp_raw_check_syncookie_*`) and only a
//! valid one reaches the listener, which completes the handshake from it.
//!
//! `limit::admit` and `classify::inbound` only mark the frame (`PROXY_ANSWER`, `PROXY_ACK`);
//! the entry point calls `finish` with the context, after `classify` has returned, so that this
//! subprogram's stack does not add to the classifier's. The frame is read again here at fixed
//! offsets: untagged or one VLAN tag, IPv4 without options or IPv6 without extension headers.
//! A SYN of another shape drops as `rate_limited` (as it would without the proxy); an ACK of
//! another shape is the rule's, as it would be without the proxy.

use aya_ebpf::{
    bindings::{BPF_F_CURRENT_NETNS, bpf_sock_tuple, iphdr, ipv6hdr, tcphdr},
    helpers::generated::{
        bpf_sk_release, bpf_skc_lookup_tcp, bpf_tcp_raw_check_syncookie_ipv4,
        bpf_tcp_raw_check_syncookie_ipv6, bpf_tcp_raw_gen_syncookie_ipv4,
        bpf_tcp_raw_gen_syncookie_ipv6, bpf_xdp_adjust_tail,
    },
    programs::XdpContext,
};
use edge_classifier_common::reason;

use crate::{
    classify::{PROXY_ACK, PROXY_ANSWER, Verdict},
    maps::{LIMITED, SYN_PROXIED},
    parse::{ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, IPPROTO_TCP},
};

/// `struct bpf_sock::state` of a listening socket.
const TCP_LISTEN: u32 = 10;
/// The window of the SYN-ACK: no window scaling is offered (the cookie carries none without
/// timestamps), so the largest unscaled one.
const WINDOW: u16 = 0xffff;
const TTL: u8 = 64;

/// What the frame-level functions found, as a word in a register.
const UNSUPPORTED: u32 = 0;
const DONE: u32 = 1;
/// ACK: a socket other than a listener holds the 4-tuple (a connection, a request, TIME-WAIT).
const CONNECTION: u32 = 2;
const INVALID: u32 = 3;

#[inline(always)]
unsafe fn rd8(p: usize) -> u8 {
    unsafe { *(p as *const u8) }
}
#[inline(always)]
unsafe fn wr8(p: usize, v: u8) {
    unsafe { *(p as *mut u8) = v }
}
#[inline(always)]
unsafe fn rd16(p: usize) -> u16 {
    unsafe { u16::from_be_bytes([rd8(p), rd8(p + 1)]) }
}
#[inline(always)]
unsafe fn wr16(p: usize, v: u16) {
    let b = v.to_be_bytes();
    unsafe {
        wr8(p, b[0]);
        wr8(p + 1, b[1]);
    }
}
#[inline(always)]
unsafe fn rd32(p: usize) -> u32 {
    unsafe { u32::from_be_bytes([rd8(p), rd8(p + 1), rd8(p + 2), rd8(p + 3)]) }
}
#[inline(always)]
unsafe fn wr32(p: usize, v: u32) {
    unsafe {
        wr16(p, (v >> 16) as u16);
        wr16(p + 2, v as u16);
    }
}
/// Swaps `n` bytes at `a` and `b` (addresses, ports, MACs).
#[inline(always)]
unsafe fn swap(a: usize, b: usize, n: usize) {
    for i in 0..n {
        unsafe {
            let x = rd8(a + i);
            wr8(a + i, rd8(b + i));
            wr8(b + i, x);
        }
    }
}

#[inline(always)]
fn fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// The marked frame's verdict, as one word (`Verdict::word`): `counter` is `PROXY_ANSWER` or
/// `PROXY_ACK` with the rule slot below.
#[inline(never)]
pub(crate) fn finish(ctx: &XdpContext, counter: u32) -> u64 {
    let slot = counter & !(PROXY_ANSWER | PROXY_ACK);
    let ack = counter & PROXY_ACK != 0;
    let (start, end) = (ctx.data(), ctx.data_end());
    let mut found = UNSUPPORTED;
    if start + 18 <= end {
        let et = unsafe { rd16(start + 12) };
        let tagged = et == ETH_P_8021Q || et == ETH_P_8021AD;
        let et = if tagged {
            unsafe { rd16(start + 16) }
        } else {
            et
        };
        found = match (tagged, et, ack) {
            (false, ETH_P_IP, false) => answer_v4::<14>(ctx),
            (true, ETH_P_IP, false) => answer_v4::<18>(ctx),
            (false, ETH_P_IPV6, false) => answer_v6::<14>(ctx),
            (true, ETH_P_IPV6, false) => answer_v6::<18>(ctx),
            (false, ETH_P_IP, true) => ack_v4::<14>(ctx),
            (true, ETH_P_IP, true) => ack_v4::<18>(ctx),
            (false, ETH_P_IPV6, true) => ack_v6::<14>(ctx),
            (true, ETH_P_IPV6, true) => ack_v6::<18>(ctx),
            _ => UNSUPPORTED,
        };
    }
    if ack {
        match found {
            DONE => Verdict::pass(reason::PASS_SYN_COOKIE_ACK).word(),
            INVALID => Verdict::drop(reason::DROP_SYN_COOKIE_INVALID).word(),
            _ => Verdict::rule(slot).word(),
        }
    } else if found == DONE {
        if let Some(c) = SYN_PROXIED.get_ptr_mut(slot) {
            // Per-CPU slot: no other writer.
            unsafe { *c += 1 };
        }
        Verdict::tx(reason::TX_SYN_COOKIE).word()
    } else {
        // Not answered: dropped over the budget as it would be without the proxy.
        if let Some(c) = LIMITED.get_ptr_mut(slot) {
            // Per-CPU slot: no other writer.
            unsafe { *c += 1 };
        }
        Verdict::drop(reason::DROP_RATE_LIMITED).word()
    }
}

/// The cookie for a SYN whose TCP header is `N` bytes, or negative: the helper reads the MSS
/// option from the whole header, and its length must be a constant the verifier sees checked.
#[inline(always)]
fn gen4<const N: usize>(ip: usize, th: usize, end: usize) -> i64 {
    if th + N > end {
        return -1;
    }
    unsafe { bpf_tcp_raw_gen_syncookie_ipv4(ip as *mut iphdr, th as *mut tcphdr, N as u32) }
}

#[inline(always)]
fn gen6<const N: usize>(ip: usize, th: usize, end: usize) -> i64 {
    if th + N > end {
        return -1;
    }
    unsafe { bpf_tcp_raw_gen_syncookie_ipv6(ip as *mut ipv6hdr, th as *mut tcphdr, N as u32) }
}

macro_rules! by_doff {
    ($gen:ident, $doff:expr, $ip:expr, $th:expr, $end:expr) => {
        match $doff {
            5 => $gen::<20>($ip, $th, $end),
            6 => $gen::<24>($ip, $th, $end),
            7 => $gen::<28>($ip, $th, $end),
            8 => $gen::<32>($ip, $th, $end),
            9 => $gen::<36>($ip, $th, $end),
            10 => $gen::<40>($ip, $th, $end),
            11 => $gen::<44>($ip, $th, $end),
            12 => $gen::<48>($ip, $th, $end),
            13 => $gen::<52>($ip, $th, $end),
            14 => $gen::<56>($ip, $th, $end),
            15 => $gen::<60>($ip, $th, $end),
            _ => -1,
        }
    };
}

/// Turns the SYN at `th` into the SYN-ACK (ports swapped, the cookie as its sequence number,
/// the SYN's plus one acknowledged, an MSS option when the SYN had options, which the cookie
/// encodes) and returns its header length and the checksum of its TCP header without the
/// pseudo header.
#[inline(always)]
unsafe fn syn_ack(th: usize, end: usize, cookie: i64, doff: u8) -> Option<(usize, u64)> {
    let mss = (cookie >> 32) as u16;
    let cookie = cookie as u32;
    let hl: usize = if doff >= 6 { 24 } else { 20 };
    if th + 24 > end && hl == 24 {
        return None;
    }
    if th + 20 > end {
        return None;
    }
    unsafe {
        let isn = rd32(th + 4);
        let (sport, dport) = (rd16(th), rd16(th + 2));
        wr16(th, dport);
        wr16(th + 2, sport);
        let ack = isn.wrapping_add(1);
        wr32(th + 4, cookie);
        wr32(th + 8, ack);
        let off_flags = ((hl as u16 / 4) << 12) | 0x12;
        wr16(th + 12, off_flags);
        wr16(th + 14, WINDOW);
        wr16(th + 16, 0);
        wr16(th + 18, 0);
        let mut sum = sport as u64
            + dport as u64
            + (cookie >> 16) as u64
            + (cookie & 0xffff) as u64
            + (ack >> 16) as u64
            + (ack & 0xffff) as u64
            + off_flags as u64
            + WINDOW as u64;
        if hl == 24 {
            if th + 24 > end {
                return None;
            }
            wr16(th + 20, 0x0204);
            wr16(th + 22, mss);
            sum += 0x0204 + mss as u64;
        }
        Some((hl, sum))
    }
}

/// Shrinks the frame to `len` bytes (the SYN's other options, any payload and Ethernet
/// padding go).
#[inline(always)]
fn trim(ctx: &XdpContext, len: usize) -> bool {
    let have = ctx.data_end() - ctx.data();
    if have == len {
        return true;
    }
    let delta = len as i32 - have as i32;
    unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta) == 0 }
}

#[inline(always)]
fn answer_v4<const L3: usize>(ctx: &XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    let ip = start + L3;
    let th = ip + 20;
    if th + 20 > end {
        return UNSUPPORTED;
    }
    unsafe {
        if rd8(ip) != 0x45 || rd8(ip + 9) != IPPROTO_TCP || rd16(ip + 6) & 0x3fff != 0 {
            return UNSUPPORTED;
        }
        let doff = rd8(th + 12) >> 4;
        let cookie = by_doff!(gen4, doff, ip, th, end);
        if cookie < 0 {
            return UNSUPPORTED;
        }
        // The helper call ends what the verifier knew of the packet's bounds.
        let (start, end) = (ctx.data(), ctx.data_end());
        let ip = start + L3;
        let th = ip + 20;
        if th + 20 > end {
            return UNSUPPORTED;
        }
        let Some((hl, tcp_sum)) = syn_ack(th, end, cookie, doff) else {
            return UNSUPPORTED;
        };
        swap(start, start + 6, 6);
        swap(ip + 12, ip + 16, 4);
        wr16(ip + 2, (20 + hl) as u16);
        wr16(ip + 4, 0);
        wr16(ip + 6, 0x4000);
        wr8(ip + 8, TTL);
        wr16(ip + 10, 0);
        let mut sum = 0u64;
        for i in 0..10 {
            sum += rd16(ip + 2 * i) as u64;
        }
        wr16(ip + 10, fold(sum));
        let mut pseudo = IPPROTO_TCP as u64 + hl as u64;
        for i in 0..4 {
            pseudo += rd16(ip + 12 + 2 * i) as u64;
        }
        wr16(th + 16, fold(pseudo + tcp_sum));
        if !trim(ctx, L3 + 20 + hl) {
            return UNSUPPORTED;
        }
    }
    DONE
}

#[inline(always)]
fn answer_v6<const L3: usize>(ctx: &XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    let ip = start + L3;
    let th = ip + 40;
    if th + 20 > end {
        return UNSUPPORTED;
    }
    unsafe {
        if rd8(ip + 6) != IPPROTO_TCP {
            return UNSUPPORTED;
        }
        let doff = rd8(th + 12) >> 4;
        let cookie = by_doff!(gen6, doff, ip, th, end);
        if cookie < 0 {
            return UNSUPPORTED;
        }
        let (start, end) = (ctx.data(), ctx.data_end());
        let ip = start + L3;
        let th = ip + 40;
        if th + 20 > end {
            return UNSUPPORTED;
        }
        let Some((hl, tcp_sum)) = syn_ack(th, end, cookie, doff) else {
            return UNSUPPORTED;
        };
        swap(start, start + 6, 6);
        swap(ip + 8, ip + 24, 16);
        wr16(ip + 4, hl as u16);
        wr8(ip + 7, TTL);
        let mut pseudo = IPPROTO_TCP as u64 + hl as u64;
        for i in 0..16 {
            pseudo += rd16(ip + 8 + 2 * i) as u64;
        }
        wr16(th + 16, fold(pseudo + tcp_sum));
        if !trim(ctx, L3 + 40 + hl) {
            return UNSUPPORTED;
        }
    }
    DONE
}

/// Whether a socket other than a listener holds the tuple (`tuple` as `bpf_sock_tuple` wants
/// it: addresses and ports in network order, source first).
#[inline(always)]
fn connection(ctx: &XdpContext, tuple: &mut [u32; 9], size: u32) -> bool {
    let sk = unsafe {
        bpf_skc_lookup_tcp(
            ctx.ctx as *mut _,
            tuple.as_mut_ptr() as *mut bpf_sock_tuple,
            size,
            BPF_F_CURRENT_NETNS as i64 as u64,
            0,
        )
    };
    if sk.is_null() {
        return false;
    }
    let state = unsafe { (*sk).state };
    unsafe { bpf_sk_release(sk as *mut _) };
    state != TCP_LISTEN
}

#[inline(always)]
fn ne32(p: usize) -> u32 {
    unsafe { u32::from_ne_bytes([rd8(p), rd8(p + 1), rd8(p + 2), rd8(p + 3)]) }
}

#[inline(always)]
fn ack_v4<const L3: usize>(ctx: &XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    let ip = start + L3;
    let th = ip + 20;
    if th + 20 > end {
        return UNSUPPORTED;
    }
    if unsafe { rd8(ip) != 0x45 || rd8(ip + 9) != IPPROTO_TCP } {
        return UNSUPPORTED;
    }
    let mut tuple = [0u32; 9];
    tuple[0] = ne32(ip + 12);
    tuple[1] = ne32(ip + 16);
    tuple[2] = ne32(th);
    if connection(ctx, &mut tuple, 12) {
        return CONNECTION;
    }
    let (start, end) = (ctx.data(), ctx.data_end());
    let ip = start + L3;
    let th = ip + 20;
    if th + 20 > end {
        return UNSUPPORTED;
    }
    if unsafe { bpf_tcp_raw_check_syncookie_ipv4(ip as *mut iphdr, th as *mut tcphdr) } == 0 {
        DONE
    } else {
        INVALID
    }
}

#[inline(always)]
fn ack_v6<const L3: usize>(ctx: &XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    let ip = start + L3;
    let th = ip + 40;
    if th + 20 > end {
        return UNSUPPORTED;
    }
    if unsafe { rd8(ip + 6) } != IPPROTO_TCP {
        return UNSUPPORTED;
    }
    let mut tuple = [0u32; 9];
    for (i, w) in tuple.iter_mut().enumerate().take(8) {
        *w = ne32(ip + 8 + 4 * i);
    }
    tuple[8] = ne32(th);
    if connection(ctx, &mut tuple, 36) {
        return CONNECTION;
    }
    let (start, end) = (ctx.data(), ctx.data_end());
    let ip = start + L3;
    let th = ip + 40;
    if th + 20 > end {
        return UNSUPPORTED;
    }
    if unsafe { bpf_tcp_raw_check_syncookie_ipv6(ip as *mut ipv6hdr, th as *mut tcphdr) } == 0 {
        DONE
    } else {
        INVALID
    }
}
