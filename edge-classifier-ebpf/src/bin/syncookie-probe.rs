//! A probe for the SYN-cookie test (`tests/tests/syncookies.rs`): the cookie the kernel's
//! `bpf_tcp_raw_gen_syncookie_ipv4` makes for a SYN, as an XDP SYN proxy would put it in its
//! SYN-ACK. Run with BPF_PROG_TEST_RUN on an untagged IPv4 SYN without IP options; the result
//! (cookie in the low 32 bits, MSS above; negative on error) is left in `COOKIE`.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{iphdr, tcphdr, xdp_action},
    helpers::generated::bpf_tcp_raw_gen_syncookie_ipv4,
    macros::{map, xdp},
    maps::Array,
    programs::XdpContext,
};

#[map]
static COOKIE: Array<i64> = Array::with_max_entries(1, 0);

const ETH: usize = 14;
const IP: usize = 20;
const TCP: usize = 20;

#[xdp]
pub fn syncookie_probe(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + ETH + IP + TCP > end {
        return xdp_action::XDP_ABORTED;
    }
    let iph = (start + ETH) as *mut iphdr;
    let th = (start + ETH + IP) as *mut tcphdr;
    let cookie = unsafe { bpf_tcp_raw_gen_syncookie_ipv4(iph, th, TCP as u32) };
    if let Some(slot) = COOKIE.get_ptr_mut(0) {
        unsafe { *slot = cookie };
    }
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
