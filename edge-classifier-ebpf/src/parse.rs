//! Bounds-checked header parsing. Every read goes through `ptr_at`; every length a header claims
//! is checked against both the frame and the IP datagram it sits in, so Ethernet padding or a
//! short capture is never read as a port.

use aya_ebpf::programs::{TcContext, XdpContext};

/// What the parser needs of a program context. `data..data_end` is what can be read directly;
/// `len` is the whole packet, which on egress may go on in skb fragments (GSO), so IP lengths
/// are checked against `len` while every read is checked against `data_end`.
pub trait Frame {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    fn len(&self) -> usize;
}

impl Frame for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }
    #[inline(always)]
    fn len(&self) -> usize {
        XdpContext::data_end(self) - XdpContext::data(self)
    }
}

impl Frame for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }
    #[inline(always)]
    fn len(&self) -> usize {
        TcContext::len(self) as usize
    }
}

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_ICMPV6: u8 = 58;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const ETH_HLEN: usize = 14;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;
const VLAN_HLEN: usize = 4;
const MAX_VLAN_TAGS: usize = 2;

/// IPv6 extension headers walked before giving up (fail closed): a frame may carry this many,
/// and the walk takes one step more to reach the upper-layer header.
const MAX_IPV6_EXT: usize = 8;
/// Bytes of IPv6 extension headers accepted; keeps offsets bounded for the verifier.
const MAX_IPV6_EXT_BYTES: usize = 512;

/// A frame the parser could not make sense of.
pub struct Malformed;

pub enum Addr {
    V4([u8; 4]),
    V6([u8; 16]),
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fragment {
    /// Not fragmented (or an IPv6 atomic fragment).
    No,
    /// Offset 0 with more to come: the L4 header must be whole in this frame.
    First,
    /// Offset > 0: no L4 header here, only payload.
    Later,
}

pub struct Ip {
    pub is_v6: bool,
    pub proto: u8,
    pub src: Addr,
    pub dst: Addr,
    /// Offset of the L4 header and end of the IP datagram within the frame.
    pub l4_off: usize,
    pub l4_end: usize,
    pub fragment: Fragment,
}

pub enum L3 {
    Arp,
    Other,
    Ip(Ip),
}

pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    Icmp {
        ty: u8,
    },
    /// A first fragment that does not carry the whole L4 header.
    ShortFragment,
    Other,
}

#[inline(always)]
fn ptr_at<T>(ctx: &impl Frame, offset: usize) -> Result<*const T, Malformed> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return Err(Malformed);
    }
    Ok((start + offset) as *const T)
}

#[inline(always)]
fn u16_at(ctx: &impl Frame, offset: usize) -> Result<u16, Malformed> {
    Ok(u16::from_be_bytes(unsafe {
        *ptr_at::<[u8; 2]>(ctx, offset)?
    }))
}

#[inline(always)]
pub fn l3(ctx: &impl Frame) -> Result<L3, Malformed> {
    let mut ethertype = u16_at(ctx, ETH_HLEN - 2)?;
    let mut off = ETH_HLEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        ethertype = u16_at(ctx, off + 2)?;
        off += VLAN_HLEN;
    }
    match ethertype {
        ETH_P_IP => ipv4(ctx, off).map(L3::Ip),
        ETH_P_IPV6 => ipv6(ctx, off).map(L3::Ip),
        ETH_P_ARP => Ok(L3::Arp),
        // A third tag: we cannot see what it carries, so it is not trusted.
        ETH_P_8021Q | ETH_P_8021AD => Err(Malformed),
        _ => Ok(L3::Other),
    }
}

#[inline(always)]
fn ipv4(ctx: &impl Frame, off: usize) -> Result<Ip, Malformed> {
    let hdr = unsafe { &*ptr_at::<[u8; 20]>(ctx, off)? };
    if hdr[0] >> 4 != 4 {
        return Err(Malformed);
    }
    let ihl = ((hdr[0] & 0x0f) as usize) * 4;
    let total = u16::from_be_bytes([hdr[2], hdr[3]]) as usize;
    if ihl < 20 || total < ihl {
        return Err(Malformed);
    }
    let end = off + total;
    // The whole datagram must be in the frame; anything after it is link-layer padding.
    if end > ctx.len() {
        return Err(Malformed);
    }
    let frag = u16::from_be_bytes([hdr[6], hdr[7]]);
    let fragment = if frag & 0x1fff != 0 {
        Fragment::Later
    } else if frag & 0x2000 != 0 {
        Fragment::First
    } else {
        Fragment::No
    };
    Ok(Ip {
        is_v6: false,
        proto: hdr[9],
        src: Addr::V4([hdr[12], hdr[13], hdr[14], hdr[15]]),
        dst: Addr::V4([hdr[16], hdr[17], hdr[18], hdr[19]]),
        l4_off: off + ihl,
        l4_end: end,
        fragment,
    })
}

/// The fixed header and the extension-header walk in one function: the walk is one bounded loop
/// whose offsets the verifier must follow from the header it starts at, and each check in it is
/// one rule of RFC 8200 §4 (bound, chaining, length within the payload, fragment offset).
#[inline(always)]
fn ipv6(ctx: &impl Frame, off: usize) -> Result<Ip, Malformed> {
    let hdr = unsafe { &*ptr_at::<[u8; 40]>(ctx, off)? };
    if hdr[0] >> 4 != 6 {
        return Err(Malformed);
    }
    let payload = u16::from_be_bytes([hdr[4], hdr[5]]) as usize;
    let start = off + 40;
    let end = start + payload;
    // Payload length 0 means a jumbogram only with a hop-by-hop header next (RFC 2675), which an
    // edge NIC does not carry: that fails closed. With any other next header it is an ordinary
    // empty datagram, classified (and its missing headers found missing) as any other.
    if payload == 0 && hdr[6] == 0 {
        return Err(Malformed);
    }
    if end > ctx.len() {
        return Err(Malformed);
    }
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src.copy_from_slice(&hdr[8..24]);
    dst.copy_from_slice(&hdr[24..40]);

    let mut next = hdr[6];
    let mut cur = start;
    let mut fragment = Fragment::No;
    let mut done = false;
    let mut walked = 0;
    for _ in 0..MAX_IPV6_EXT + 1 {
        let len = match next {
            // Hop-by-hop, routing, destination options: (len + 1) * 8 bytes.
            0 | 43 | 60 => {
                let h = unsafe { &*ptr_at::<[u8; 2]>(ctx, cur)? };
                next = h[0];
                (h[1] as usize + 1) * 8
            }
            44 => {
                let h = unsafe { &*ptr_at::<[u8; 8]>(ctx, cur)? };
                next = h[0];
                let fo = u16::from_be_bytes([h[2], h[3]]);
                if fo >> 3 != 0 {
                    fragment = Fragment::Later;
                } else if fo & 1 != 0 {
                    fragment = Fragment::First;
                }
                8
            }
            // Authentication header: (len + 2) * 4 bytes.
            51 => {
                let h = unsafe { &*ptr_at::<[u8; 2]>(ctx, cur)? };
                next = h[0];
                (h[1] as usize + 2) * 4
            }
            _ => {
                done = true;
                0
            }
        };
        if done {
            break;
        }
        // The header must lie within the datagram before anything it says is believed: one that
        // reaches past the payload length sits (partly) in link-layer padding.
        cur += len;
        if cur > start + MAX_IPV6_EXT_BYTES || cur > end {
            return Err(Malformed);
        }
        // The last step is for the upper-layer header only: a ninth extension header is one too
        // many, a later fragment's included.
        walked += 1;
        if walked > MAX_IPV6_EXT {
            return Err(Malformed);
        }
        if fragment == Fragment::Later {
            done = true;
            break;
        }
    }
    if !done {
        return Err(Malformed);
    }
    Ok(Ip {
        is_v6: true,
        proto: next,
        src: Addr::V6(src),
        dst: Addr::V6(dst),
        l4_off: cur,
        l4_end: end,
        fragment,
    })
}

/// The ICMP/ICMPv6 type byte, for the neighbour-discovery check.
#[inline(always)]
pub fn icmp_type(ctx: &impl Frame, ip: &Ip) -> Result<u8, Malformed> {
    if ip.l4_off + 4 > ip.l4_end {
        return Err(Malformed);
    }
    // The whole 4-byte header is read (and bounds-checked) as one: a 1-byte read lets LLVM
    // turn `data + off + 1 > data_end` into `data + off >= data_end`, a form the verifier does
    // not learn a packet range from.
    let h = unsafe { &*ptr_at::<[u8; 4]>(ctx, ip.l4_off)? };
    Ok(h[0])
}

#[inline(always)]
pub fn l4(ctx: &impl Frame, ip: &Ip) -> Result<L4, Malformed> {
    let off = ip.l4_off;
    let avail = ip.l4_end.saturating_sub(off);
    let fragmented = ip.fragment == Fragment::First;
    match ip.proto {
        IPPROTO_TCP => {
            if avail < 20 {
                return short(fragmented);
            }
            let h = unsafe { &*ptr_at::<[u8; 20]>(ctx, off)? };
            let doff = ((h[12] >> 4) as usize) * 4;
            if doff < 20 {
                return Err(Malformed);
            }
            if doff > avail {
                return short(fragmented);
            }
            Ok(L4::Tcp {
                sport: u16::from_be_bytes([h[0], h[1]]),
                dport: u16::from_be_bytes([h[2], h[3]]),
                flags: h[13],
            })
        }
        IPPROTO_UDP => {
            if avail < 8 {
                return short(fragmented);
            }
            let h = unsafe { &*ptr_at::<[u8; 8]>(ctx, off)? };
            let len = u16::from_be_bytes([h[4], h[5]]) as usize;
            if len < 8 || (!fragmented && len > avail) {
                return Err(Malformed);
            }
            Ok(L4::Udp {
                sport: u16::from_be_bytes([h[0], h[1]]),
                dport: u16::from_be_bytes([h[2], h[3]]),
            })
        }
        IPPROTO_ICMP if !ip.is_v6 => Ok(L4::Icmp {
            ty: icmp_type(ctx, ip)?,
        }),
        IPPROTO_ICMPV6 if ip.is_v6 => Ok(L4::Icmp {
            ty: icmp_type(ctx, ip)?,
        }),
        _ => Ok(L4::Other),
    }
}

#[inline(always)]
fn short(fragmented: bool) -> Result<L4, Malformed> {
    if fragmented {
        Ok(L4::ShortFragment)
    } else {
        Err(Malformed)
    }
}
