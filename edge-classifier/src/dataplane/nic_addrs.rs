//! The addresses configured on the bound NICs, which the data plane protects under
//! `protect_interface_addresses` whatever the catalogue's sets say (an IPv6 link-local address,
//! an address added after the catalogue was written, the IPv4 subnet broadcast).
//!
//! The daemon writes them into `IFACE_ADDRS_V4/V6` before it reports ready and again whenever the
//! kernel announces an address or link change (an rtnetlink socket subscribed to those groups),
//! with a once-a-second re-read as a safety net for a lost notification. The same notifications
//! tell the daemon that a bound NIC went away or came back ([`Changes`]), and [`xdp_program`]
//! asks rtnetlink which XDP program a NIC runs.

use std::{
    collections::BTreeMap,
    io,
    net::IpAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

/// Every address on the NICs named, with the NIC's ifindex: unicast addresses of both families
/// (link-local included) and each IPv4 subnet's broadcast address.
pub fn configured(nics: &[&str]) -> io::Result<BTreeMap<IpAddr, u32>> {
    let mut out = BTreeMap::new();
    for i in if_addrs::get_if_addrs()? {
        if !nics.contains(&i.name.as_str()) {
            continue;
        }
        let index = i.index.unwrap_or(0);
        match &i.addr {
            if_addrs::IfAddr::V4(a) => {
                out.insert(IpAddr::V4(a.ip), index);
                if let Some(b) = a.broadcast {
                    out.insert(IpAddr::V4(b), index);
                }
                // The subnet-directed broadcast reaches this host whether or not a broadcast
                // address was configured with the address (`ip addr add` sets none by default).
                if a.prefixlen <= 30 {
                    let mask = u32::MAX << (32 - a.prefixlen as u32);
                    let b = u32::from(a.ip) | !mask;
                    out.insert(IpAddr::V4(b.into()), index);
                }
            }
            if_addrs::IfAddr::V6(a) => {
                out.insert(IpAddr::V6(a.ip), index);
            }
        }
    }
    Ok(out)
}

/// The name of NIC `ifindex` in this network namespace, if there is one.
pub fn ifname(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_str()
        .ok()
        .map(str::to_string)
}

/// A socket that becomes readable when an address or a link changes (rtnetlink multicast
/// groups); what changed is read again (the addresses with [`configured`], the NICs by name), so
/// the messages are only drained. A link appears, goes or is renamed as `RTM_NEWLINK` /
/// `RTM_DELLINK` on this socket, sent by the kernel as it happens (a NIC is announced before it
/// is up).
pub struct Changes {
    fd: tokio::io::unix::AsyncFd<OwnedFd>,
}

impl Changes {
    pub fn subscribe() -> io::Result<Changes> {
        const RTMGRP_LINK: u32 = 0x1;
        const RTMGRP_IPV4_IFADDR: u32 = 0x10;
        const RTMGRP_IPV6_IFADDR: u32 = 0x100;
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as u16;
        sa.nl_groups = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR;
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sa as *const libc::sockaddr_nl as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the OwnedFd is moved into the AsyncFd, which owns it (and so keeps it open
        // and unchanged) until it is dropped.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
        }
        .map_err(io::Error::from)?;
        Ok(Changes { fd })
    }

    /// Waits for the next notification and drains what is queued.
    pub async fn next(&mut self) -> io::Result<()> {
        loop {
            let mut guard = self.fd.readable().await?;
            let mut buf = [0u8; 8192];
            let mut got = false;
            loop {
                let n = unsafe {
                    libc::recv(
                        guard.get_inner().as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        libc::MSG_DONTWAIT,
                    )
                };
                if n > 0 {
                    got = true;
                    continue;
                }
                let e = io::Error::last_os_error();
                if n < 0 && e.kind() == io::ErrorKind::WouldBlock {
                    guard.clear_ready();
                    break;
                }
                // ENOBUFS: notifications were lost; a re-read covers whatever they said.
                if n < 0 && e.raw_os_error() == Some(libc::ENOBUFS) {
                    got = true;
                    continue;
                }
                return Err(e);
            }
            if got {
                return Ok(());
            }
        }
    }
}

/// The XDP program a NIC runs, as rtnetlink reports it (what `ip -d link` shows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XdpProgram {
    pub id: u32,
    /// `native`, `generic`, `offload` or `multi`.
    pub mode: &'static str,
}

/// Which XDP program NIC `ifindex` (of this network namespace) runs, if any: `RTM_GETLINK` and
/// its `IFLA_XDP` attributes.
pub fn xdp_program(ifindex: u32) -> io::Result<Option<XdpProgram>> {
    const RTM_GETLINK: u16 = 18;
    const IFLA_XDP: u16 = 43;
    const IFLA_XDP_ATTACHED: u16 = 2;
    const IFLA_XDP_PROG_ID: u16 = 4;
    const NLA_TYPE_MASK: u16 = 0x3fff;
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // A receive timeout: the kernel answers at once, but a daemon must never hang on it.
    let tv = libc::timeval {
        tv_sec: 1,
        tv_usec: 0,
    };
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    // struct nlmsghdr (16 bytes) + struct ifinfomsg (16 bytes).
    let mut req = [0u8; 32];
    req[0..4].copy_from_slice(&32u32.to_ne_bytes());
    req[4..6].copy_from_slice(&RTM_GETLINK.to_ne_bytes());
    req[6..8].copy_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes());
    req[16] = libc::AF_UNSPEC as u8;
    req[20..24].copy_from_slice(&(ifindex as i32).to_ne_bytes());
    if unsafe { libc::send(fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 65536];
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let msg = &buf[..n as usize];
    let u16_at = |b: &[u8], at: usize| u16::from_ne_bytes([b[at], b[at + 1]]);
    let u32_at = |b: &[u8], at: usize| u32::from_ne_bytes(b[at..at + 4].try_into().expect("4"));
    if msg.len() < 16 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "short netlink answer",
        ));
    }
    if u16_at(msg, 4) == libc::NLMSG_ERROR as u16 {
        let errno = if msg.len() >= 20 {
            -(u32_at(msg, 16) as i32)
        } else {
            libc::EIO
        };
        return Err(io::Error::from_raw_os_error(errno));
    }
    let len = (u32_at(msg, 0) as usize).min(msg.len());
    // Attributes after the header and the ifinfomsg, each 4-byte aligned.
    let attrs = |b: &[u8]| -> Vec<(u16, std::ops::Range<usize>)> {
        let mut out = Vec::new();
        let mut at = 0;
        while at + 4 <= b.len() {
            let l = u16_at(b, at) as usize;
            if l < 4 || at + l > b.len() {
                break;
            }
            out.push((u16_at(b, at + 2) & NLA_TYPE_MASK, at + 4..at + l));
            at += (l + 3) & !3;
        }
        out
    };
    let body = &msg[32.min(len)..len];
    let Some((_, xdp)) = attrs(body).into_iter().find(|(t, _)| *t == IFLA_XDP) else {
        return Ok(None);
    };
    let xdp = &body[xdp];
    let mut attached = 0u8;
    let mut id = 0u32;
    for (t, r) in attrs(xdp) {
        match t {
            IFLA_XDP_ATTACHED if !r.is_empty() => attached = xdp[r.start],
            IFLA_XDP_PROG_ID if r.len() >= 4 => id = u32_at(xdp, r.start),
            _ => {}
        }
    }
    let mode = match attached {
        0 => return Ok(None),
        1 => "native",
        2 => "generic",
        3 => "offload",
        _ => "multi",
    };
    Ok(Some(XdpProgram { id, mode }))
}

/// The kernel's own SYN-cookie setting (`net.ipv4.tcp_syncookies`, per network namespace), read
/// when `run` starts and by `status`; the advice depends on whether a rule of the catalogue has
/// `limit.syn_proxy`. Without a proxy it should be 1: the limits at XDP bound the SYNs a flood
/// gets through, and those must not fill a listener's queue and lock out the partners, which
/// the kernel's cookies prevent when a queue overflows. With a proxy it must be 2: a listener
/// completes a cookie made at XDP only while it sent cookies itself within two minutes
/// (`tests/syncookies.rs`), and with 1 a listener whose queue never overflows sends none, so
/// every handshake the proxy answered would be refused.
pub fn syncookie_warning(syn_proxy: bool) -> Option<String> {
    let value = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_syncookies").ok();
    syncookie_advice(value.as_deref().map(str::trim), syn_proxy)
}

/// The advice for a `tcp_syncookies` value as the file reads (`None`: no such file), for a
/// catalogue with (`syn_proxy`) or without a SYN proxy.
pub fn syncookie_advice(value: Option<&str>, syn_proxy: bool) -> Option<String> {
    if syn_proxy {
        return match value {
            Some("2") => None,
            Some(v) => Some(format!(
                "net.ipv4.tcp_syncookies is {v} but a rule has limit.syn_proxy: the listeners complete the handshakes the SYN proxy answers at XDP only while they send SYN cookies themselves (within two minutes), which they do for every SYN only with 2; set it to 2"
            )),
            None => Some(
                "net.ipv4.tcp_syncookies cannot be read (a kernel without CONFIG_SYN_COOKIES?) but a rule has limit.syn_proxy: the listeners cannot complete the handshakes the SYN proxy answers".to_string(),
            ),
        };
    }
    match value {
        Some("1") => None,
        Some("0") => Some(
            "net.ipv4.tcp_syncookies is 0: a SYN flood within the limits can fill a listener's queue, and the kernel then drops every new SYN, partners' too; set it to 1".to_string(),
        ),
        Some("2") => Some(
            "net.ipv4.tcp_syncookies is 2: every connection gets a SYN cookie, which drops its TCP options (window scaling, SACK) unless the client sends timestamps; set it to 1 (cookies only when a listener's queue overflows), or give a rule limit.syn_proxy, which needs 2".to_string(),
        ),
        Some(other) => Some(format!(
            "net.ipv4.tcp_syncookies is {other}: expected 1 (SYN cookies when a listener's queue overflows)"
        )),
        None => Some(
            "net.ipv4.tcp_syncookies cannot be read (a kernel without CONFIG_SYN_COOKIES?): a SYN flood within the limits can fill a listener's queue and lock out partners".to_string(),
        ),
    }
}

/// Kernel settings under which a frame's IP destination is not where it is delivered: the data
/// plane classifies a routing header or an IPv4 source route on the destination in the header,
/// which Linux only honours with these on. One warning each, naming the sysctl to turn off.
pub fn routing_warnings(nic: &str) -> Vec<String> {
    let read =
        |path: String| -> Option<i64> { std::fs::read_to_string(path).ok()?.trim().parse().ok() };
    let mut out = Vec::new();
    for scope in ["all", nic] {
        if read(format!("/proc/sys/net/ipv6/conf/{scope}/seg6_enabled")).unwrap_or(0) != 0 {
            out.push(format!(
                "net.ipv6.conf.{scope}.seg6_enabled is on: the kernel processes IPv6 segment routing headers, and a frame is classified on the header's destination, not the segment it is delivered to; set it to 0"
            ));
        }
    }
    let all = read("/proc/sys/net/ipv4/conf/all/accept_source_route".to_string()).unwrap_or(0);
    let this = read(format!("/proc/sys/net/ipv4/conf/{nic}/accept_source_route")).unwrap_or(0);
    if all != 0 && this != 0 {
        out.push(format!(
            "net.ipv4.conf.all.accept_source_route and net.ipv4.conf.{nic}.accept_source_route are on: IPv4 source-routed frames are forwarded on their route, and the classifier judges them by the header's destination; set them to 0"
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::syncookie_advice;

    #[test]
    fn only_tcp_syncookies_1_goes_without_a_warning() {
        assert_eq!(syncookie_advice(Some("1"), false), None);
        for (value, says) in [
            (Some("0"), "is 0"),
            (Some("2"), "every connection gets a SYN cookie"),
            (Some("3"), "expected 1"),
            (None, "cannot be read"),
        ] {
            let w =
                syncookie_advice(value, false).unwrap_or_else(|| panic!("{value:?}: no warning"));
            assert!(w.contains(says), "{value:?}: {w}");
        }
    }

    #[test]
    fn with_a_syn_proxy_only_tcp_syncookies_2_goes_without_a_warning() {
        assert_eq!(syncookie_advice(Some("2"), true), None);
        for value in [Some("0"), Some("1"), Some("3"), None] {
            let w =
                syncookie_advice(value, true).unwrap_or_else(|| panic!("{value:?}: no warning"));
            assert!(w.contains("limit.syn_proxy"), "{value:?}: {w}");
        }
        assert!(
            syncookie_advice(Some("1"), true)
                .unwrap()
                .contains("set it to 2")
        );
    }
}
