//! The addresses configured on the bound NICs, which the data plane protects under
//! `protect_interface_addresses` whatever the catalogue's sets say (an IPv6 link-local address,
//! an address added after the catalogue was written, the IPv4 subnet broadcast).
//!
//! The daemon writes them into `IFACE_ADDRS_V4/V6` before it reports ready and again whenever the
//! kernel announces an address or link change (an rtnetlink socket subscribed to those groups),
//! with a once-a-second re-read as a safety net for a lost notification.

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

/// A socket that becomes readable when an address or a link changes (rtnetlink multicast
/// groups); what changed is read again with [`configured`], so the messages are only drained.
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
