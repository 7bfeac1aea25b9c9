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

pub(crate) const ETH_P_IP: u16 = 0x0800;
pub(crate) const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_ARP: u16 = 0x0806;
pub(crate) const ETH_P_8021Q: u16 = 0x8100;
pub(crate) const ETH_P_8021AD: u16 = 0x88a8;
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

/// An address as its bytes lie in the header, read as native-endian words: word-sized and
/// word-aligned wherever it is kept (a byte array in an enum lands at odd stack offsets, which
/// the verifier refuses for the wide stores LLVM merges its bytes into), and compared, hashed
/// and masked a word at a time.
pub enum Addr {
    V4(u32),
    V6([u64; 2]),
}

#[inline(always)]
fn v6_words(b: &[u8]) -> [u64; 2] {
    [
        u64::from_ne_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
        u64::from_ne_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
    ]
}

#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Fragment {
    /// Not fragmented (or an IPv6 atomic fragment).
    No,
    /// Offset 0 with more to come: the L4 header must be whole in this frame.
    First,
    /// Offset > 0: no L4 header here, only payload.
    Later,
}

/// Every field is set whatever the family (an IPv4 address in the low half of the first word,
/// the rest zero): the full parser returns it from a subprogram through memory, and the
/// verifier refuses to copy a register that was never set.
#[repr(C)]
pub struct Ip {
    pub is_v6: bool,
    pub proto: u8,
    pub src: [u64; 2],
    pub dst: [u64; 2],
    /// Offset of the L4 header and end of the IP datagram within the frame.
    pub l4_off: usize,
    pub l4_end: usize,
    pub fragment: Fragment,
}

impl Ip {
    /// An IPv4 header's facts; the caller has checked the header and found where L4 lies.
    #[inline(always)]
    fn v4(hdr: &[u8; 20], l4_off: usize, l4_end: usize, fragment: Fragment) -> Ip {
        Ip {
            is_v6: false,
            proto: hdr[9],
            src: [
                u32::from_ne_bytes([hdr[12], hdr[13], hdr[14], hdr[15]]) as u64,
                0,
            ],
            dst: [
                u32::from_ne_bytes([hdr[16], hdr[17], hdr[18], hdr[19]]) as u64,
                0,
            ],
            l4_off,
            l4_end,
            fragment,
        }
    }

    #[inline(always)]
    fn addr(&self, w: &[u64; 2]) -> Addr {
        if self.is_v6 {
            Addr::V6(*w)
        } else {
            Addr::V4(w[0] as u32)
        }
    }
    #[inline(always)]
    pub fn src(&self) -> Addr {
        self.addr(&self.src)
    }
    #[inline(always)]
    pub fn dst(&self) -> Addr {
        self.addr(&self.dst)
    }
}

pub enum L3 {
    Arp,
    Other,
    Ip(Ip),
}

/// The transport header's facts, every field set whatever the kind (see `Ip`).
#[repr(C)]
pub struct L4 {
    /// `L4_*`.
    pub kind: u8,
    /// TCP flags, or the ICMP type.
    pub flags: u8,
    pub sport: u16,
    pub dport: u16,
}

pub const L4_TCP: u8 = 0;
pub const L4_UDP: u8 = 1;
pub const L4_ICMP: u8 = 2;
/// A first fragment that does not carry the whole L4 header.
pub const L4_SHORT_FRAGMENT: u8 = 3;
pub const L4_OTHER: u8 = 4;

impl L4 {
    #[inline(always)]
    const fn of(kind: u8, sport: u16, dport: u16, flags: u8) -> L4 {
        L4 {
            kind,
            flags,
            sport,
            dport,
        }
    }

    /// The ports and flags of a TCP header whose length has been checked.
    #[inline(always)]
    fn tcp(h: &[u8; 20]) -> L4 {
        L4::of(
            L4_TCP,
            u16::from_be_bytes([h[0], h[1]]),
            u16::from_be_bytes([h[2], h[3]]),
            h[13],
        )
    }

    /// The ports of a UDP header whose length has been checked.
    #[inline(always)]
    fn udp(h: &[u8; 8]) -> L4 {
        L4::of(
            L4_UDP,
            u16::from_be_bytes([h[0], h[1]]),
            u16::from_be_bytes([h[2], h[3]]),
            0,
        )
    }
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
    Ok(Ip::v4(hdr, off + ihl, end, fragment))
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
    let src = v6_words(&hdr[8..24]);
    let dst = v6_words(&hdr[24..40]);

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
        src,
        dst,
        l4_off: cur,
        l4_end: end,
        fragment,
    })
}

/// What the fixed-offset read of a frame found.
pub enum Quick {
    /// The common frame, with what `l3` and `l4` would say of it.
    Ip(Ip, L4),
    Arp,
    /// Neither IP nor ARP nor a VLAN tag.
    NonIp,
    /// Anything else: for the full parser.
    Full,
}

/// The common frame, read at fixed offsets: untagged or with one VLAN tag, IPv4 without options
/// or IPv6 without extension headers, not fragmented, carrying a whole TCP or UDP header within
/// the datagram. For every frame it accepts, the full parser (`l3`, `l4`) says the same (the
/// differential test holds the kernel to the reference on frames at each of these edges);
/// everything else is `Full`, for the full parser to read. The readers below are inlined at
/// each of the two Ethernet layouts, so that every offset is a constant.
#[inline(always)]
pub fn fast(ctx: &XdpContext) -> Quick {
    let data = Frame::data(ctx);
    let end = Frame::data_end(ctx);
    if data + ETH_HLEN > end {
        return Quick::Full;
    }
    let ethertype = u16::from_be_bytes(unsafe { *((data + 12) as *const [u8; 2]) });
    match ethertype {
        ETH_P_IP => ipv4_at(data, end, ETH_HLEN),
        ETH_P_IPV6 => ipv6_at(data, end, ETH_HLEN),
        ETH_P_ARP => Quick::Arp,
        ETH_P_8021Q | ETH_P_8021AD => {
            if data + ETH_HLEN + VLAN_HLEN > end {
                return Quick::Full;
            }
            match u16::from_be_bytes(unsafe { *((data + 16) as *const [u8; 2]) }) {
                ETH_P_IP => ipv4_at(data, end, ETH_HLEN + VLAN_HLEN),
                ETH_P_IPV6 => ipv6_at(data, end, ETH_HLEN + VLAN_HLEN),
                _ => Quick::Full,
            }
        }
        _ => Quick::NonIp,
    }
}

/// IPv4 without options at `off`, not fragmented, its datagram within the frame.
#[inline(always)]
fn ipv4_at(data: usize, end: usize, off: usize) -> Quick {
    // The header and a UDP header: the shortest datagram taken here.
    if data + off + 20 + 8 > end {
        return Quick::Full;
    }
    let hdr = unsafe { &*((data + off) as *const [u8; 20]) };
    let total = u16::from_be_bytes([hdr[2], hdr[3]]) as usize;
    // Version 4 with a 20-byte header; no more fragments and offset 0 (DF may be set). The
    // datagram's end is checked against the frame's in `l4_at`.
    if hdr[0] != 0x45 || total < 20 || hdr[6] & 0x3f != 0 || hdr[7] != 0 {
        return Quick::Full;
    }
    let ip = Ip::v4(hdr, off + 20, off + total, Fragment::No);
    l4_at(ip, data, end, total - 20)
}

/// IPv6 without extension headers at `off`, its payload within the frame.
#[inline(always)]
fn ipv6_at(data: usize, end: usize, off: usize) -> Quick {
    if data + off + 40 + 8 > end {
        return Quick::Full;
    }
    let hdr = unsafe { &*((data + off) as *const [u8; 40]) };
    let payload = u16::from_be_bytes([hdr[4], hdr[5]]) as usize;
    if hdr[0] >> 4 != 6 {
        return Quick::Full;
    }
    let ip = Ip {
        is_v6: true,
        proto: hdr[6],
        src: v6_words(&hdr[8..24]),
        dst: v6_words(&hdr[24..40]),
        l4_off: off + 40,
        l4_end: off + 40 + payload,
        fragment: Fragment::No,
    };
    l4_at(ip, data, end, payload)
}

/// A whole TCP or UDP header at `ip.l4_off`, within the `avail` bytes the datagram has left,
/// and the datagram within the frame. That last check comes last: LLVM drops a constant-offset
/// bounds check that a variable one before it implies, and the verifier learns a packet range
/// only from the constant one.
#[inline(always)]
fn l4_at(ip: Ip, data: usize, end: usize, avail: usize) -> Quick {
    let off = ip.l4_off;
    let l4 = match ip.proto {
        IPPROTO_TCP => {
            if avail < 20 || data + off + 20 > end {
                return Quick::Full;
            }
            let h = unsafe { &*((data + off) as *const [u8; 20]) };
            let doff = ((h[12] >> 4) as usize) * 4;
            if doff < 20 || doff > avail {
                return Quick::Full;
            }
            L4::tcp(h)
        }
        IPPROTO_UDP => {
            // The caller checked the frame holds 8 bytes here.
            if avail < 8 {
                return Quick::Full;
            }
            let h = unsafe { &*((data + off) as *const [u8; 8]) };
            let ulen = u16::from_be_bytes([h[4], h[5]]) as usize;
            if ulen < 8 || ulen > avail {
                return Quick::Full;
            }
            L4::udp(h)
        }
        _ => return Quick::Full,
    };
    if data + ip.l4_end > end {
        return Quick::Full;
    }
    Quick::Ip(ip, l4)
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
            Ok(L4::tcp(h))
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
            Ok(L4::udp(h))
        }
        IPPROTO_ICMP if !ip.is_v6 => Ok(L4::of(L4_ICMP, 0, 0, icmp_type(ctx, ip)?)),
        IPPROTO_ICMPV6 if ip.is_v6 => Ok(L4::of(L4_ICMP, 0, 0, icmp_type(ctx, ip)?)),
        _ => Ok(L4::of(L4_OTHER, 0, 0, 0)),
    }
}

#[inline(always)]
fn short(fragmented: bool) -> Result<L4, Malformed> {
    if fragmented {
        Ok(L4::of(L4_SHORT_FRAGMENT, 0, 0, 0))
    } else {
        Err(Malformed)
    }
}
