//! The project's own test hosts: network namespaces joined by veth pairs, sockets opened inside
//! them, and AF_PACKET taps that see what XDP passed.
//!
//! Topology (names get a unique prefix per lab):
//!
//! ```text
//!  remote (wan0)  ─── veth ───  (ext0) edge (int0)  ─── veth ───  (lan0) fe
//!  198.51.100.1/24                198.51.100.10/24    192.0.2.10/24      192.0.2.20/24
//!  203.0.113.5/32 (IM partner)    2001:db8:100::10/64 2001:db8:200::10/64 2001:db8:200::20/64
//!  2001:db8:100::1/64
//!  2001:db8:203::5/128 (IM partner)
//! ```
//!
//! Traffic only ever goes to addresses inside these namespaces.

use std::{
    fs::File,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket},
    os::fd::AsRawFd,
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

pub mod peers;
pub mod seed;
pub use seed::{Peer, SEED_ROWS, SeedRow, seed};

pub const EDGE_EXT_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 10));
pub const EDGE_EXT_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x10));
pub const EDGE_INT_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10));
pub const EDGE_INT_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0x200, 0, 0, 0, 0, 0x10));
/// A remote client that is in no named set.
pub const CLIENT_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1));
pub const CLIENT_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 1));
/// A public IM connectivity partner (in `public_im_partners` of the default catalogue).
pub const PARTNER_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 5));
pub const PARTNER_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0x203, 0, 0, 0, 0, 5));
pub const FE_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 20));
pub const FE_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0x200, 0, 0, 0, 0, 0x20));

/// Interface names inside the namespaces.
pub const EDGE_EXT: &str = "ext0";
pub const EDGE_INT: &str = "int0";

/// `ip ARGS`, failing with its stderr.
pub fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (iproute2; `cargo xtask setup` installs it)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Three namespaces and two veth pairs; removed on drop, also when a test panics.
pub struct Lab {
    pub edge: String,
    pub remote: String,
    pub fe: String,
}

impl Lab {
    /// `tag` makes the names unique per test; the process id per run.
    pub fn create(tag: &str) -> anyhow::Result<Lab> {
        let p = format!("ec{}-{tag}", std::process::id() % 100_000);
        let lab = Lab {
            edge: format!("{p}-edge"),
            remote: format!("{p}-remote"),
            fe: format!("{p}-fe"),
        };
        for ns in [&lab.edge, &lab.remote, &lab.fe] {
            // A leftover from a killed run of the same pid would make `add` fail.
            let _ = ip(&["netns", "del", ns]);
            ip(&["netns", "add", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        lab.add_ext0(&[])?;
        ip(&[
            "link", "add", EDGE_INT, "netns", &lab.edge, "type", "veth", "peer", "name", "lan0",
            "netns", &lab.fe,
        ])?;
        lab.configure_ext0()?;
        for (ns, dev, addr) in [
            (&lab.edge, EDGE_INT, "192.0.2.10/24"),
            (&lab.edge, EDGE_INT, "2001:db8:200::10/64"),
            (&lab.fe, "lan0", "192.0.2.20/24"),
            (&lab.fe, "lan0", "2001:db8:200::20/64"),
        ] {
            add_addr(ns, dev, addr)?;
        }
        for (ns, dev) in [(&lab.edge, EDGE_INT), (&lab.fe, "lan0")] {
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        Ok(lab)
    }

    /// The external veth pair: `ext0` in the Edge's namespace, `wan0` in the remote host's.
    /// `extra` are link options for ext0 (`address MAC`, `up`); a test that re-creates the NIC
    /// uses this as the lab does.
    pub fn add_ext0(&self, extra: &[&str]) -> anyhow::Result<()> {
        let mut a = vec!["link", "add", EDGE_EXT];
        a.extend_from_slice(extra);
        a.extend([
            "netns",
            &self.edge,
            "type",
            "veth",
            "peer",
            "name",
            "wan0",
            "netns",
            &self.remote,
        ]);
        ip(&a)
    }

    /// ext0's and wan0's addresses, both up, and the Edge's routes to the partner through wan0.
    pub fn configure_ext0(&self) -> anyhow::Result<()> {
        for (ns, dev, addr) in [
            (&self.edge, EDGE_EXT, "198.51.100.10/24"),
            (&self.edge, EDGE_EXT, "2001:db8:100::10/64"),
            (&self.remote, "wan0", "198.51.100.1/24"),
            (&self.remote, "wan0", "203.0.113.5/32"),
            (&self.remote, "wan0", "2001:db8:100::1/64"),
            (&self.remote, "wan0", "2001:db8:203::5/128"),
        ] {
            add_addr(ns, dev, addr)?;
        }
        ip(&["-n", &self.edge, "link", "set", EDGE_EXT, "up"])?;
        ip(&["-n", &self.remote, "link", "set", "wan0", "up"])?;
        ip(&[
            "-n",
            &self.edge,
            "route",
            "add",
            "203.0.113.0/24",
            "via",
            "198.51.100.1",
        ])?;
        ip(&[
            "-n",
            &self.edge,
            "-6",
            "route",
            "add",
            "2001:db8:203::/48",
            "via",
            "2001:db8:100::1",
        ])
    }

    pub fn netns_path(ns: &str) -> String {
        format!("/run/netns/{ns}")
    }
}

/// An address on a device; IPv6 without duplicate-address detection, so it is usable at once.
fn add_addr(ns: &str, dev: &str, addr: &str) -> anyhow::Result<()> {
    let mut a = vec!["-n", ns, "addr", "add", addr, "dev", dev];
    if addr.contains(':') {
        a.push("nodad");
    }
    ip(&a)
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in [&self.edge, &self.remote, &self.fe] {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

/// Moves the calling thread into `ns`; sockets it opens from then on live there.
pub fn enter_netns(ns: &str) -> anyhow::Result<()> {
    let f = File::open(Lab::netns_path(ns)).with_context(|| format!("open netns {ns}"))?;
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns({ns}): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` on a thread inside `ns`.
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        enter_netns(&ns)?;
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread in netns panicked"))?
}

/// What a listener saw, by remote address.
#[derive(Default, Debug, Clone)]
pub struct Seen {
    pub connections: Vec<SocketAddr>,
    pub datagrams: Vec<SocketAddr>,
}

/// TCP and UDP listeners on a set of ports inside a namespace (dual-stack `[::]`).
pub struct Listeners {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<std::collections::BTreeMap<(char, u16), Seen>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Listeners {
    pub fn start(ns: &str, tcp: &[u16], udp: &[u16]) -> anyhow::Result<Listeners> {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(std::collections::BTreeMap::new()));
        let mut threads = Vec::new();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
        for (&port, kind) in tcp
            .iter()
            .map(|p| (p, 't'))
            .chain(udp.iter().map(|p| (p, 'u')))
        {
            let (ns, stop, seen, ready) =
                (ns.to_string(), stop.clone(), seen.clone(), ready_tx.clone());
            threads.push(std::thread::spawn(move || {
                let setup = || -> anyhow::Result<Socket> {
                    enter_netns(&ns)?;
                    let domain = Domain::IPV6;
                    let sock = if kind == 't' {
                        Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?
                    } else {
                        Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?
                    };
                    sock.set_only_v6(false)?;
                    sock.set_reuse_address(true)?;
                    let addr: SocketAddr = (Ipv6Addr::UNSPECIFIED, port).into();
                    sock.bind(&addr.into())?;
                    if kind == 't' {
                        sock.listen(128)?;
                    }
                    sock.set_nonblocking(true)?;
                    Ok(sock)
                };
                let sock = match setup() {
                    Ok(s) => {
                        let _ = ready.send(Ok(()));
                        s
                    }
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        return;
                    }
                };
                let (tcp, udp): (Option<TcpListener>, Option<UdpSocket>) = if kind == 't' {
                    (Some(sock.into()), None)
                } else {
                    (None, Some(sock.into()))
                };
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    let got = if let Some(l) = &tcp {
                        match l.accept() {
                            Ok((mut s, peer)) => {
                                let _ = s.set_nonblocking(false);
                                let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                                let _ = s.read(&mut buf);
                                let _ = s.write_all(b"ok");
                                Some(peer)
                            }
                            Err(_) => None,
                        }
                    } else if let Some(u) = &udp {
                        match u.recv_from(&mut buf) {
                            Ok((_, peer)) => {
                                let _ = u.send_to(b"ok", peer);
                                Some(peer)
                            }
                            Err(_) => None,
                        }
                    } else {
                        None
                    };
                    match got {
                        Some(peer) => {
                            let peer = unmap(peer);
                            let mut seen = seen.lock().expect("lock");
                            let e: &mut Seen = seen.entry((kind, port)).or_default();
                            if kind == 't' {
                                e.connections.push(peer)
                            } else {
                                e.datagrams.push(peer)
                            }
                        }
                        None => std::thread::sleep(Duration::from_millis(2)),
                    }
                }
            }));
        }
        drop(ready_tx);
        for _ in 0..threads.len() {
            ready_rx.recv().context("listener thread died")??;
        }
        Ok(Listeners {
            stop,
            seen,
            threads,
        })
    }

    pub fn tcp(&self, port: u16) -> Seen {
        self.seen
            .lock()
            .expect("lock")
            .get(&('t', port))
            .cloned()
            .unwrap_or_default()
    }

    pub fn udp(&self, port: u16) -> Seen {
        self.seen
            .lock()
            .expect("lock")
            .get(&('u', port))
            .cloned()
            .unwrap_or_default()
    }
}

impl Drop for Listeners {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn unmap(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => a,
        },
        _ => a,
    }
}

/// A TCP connect from `src` (port chosen by the kernel) to `dst` inside `ns`, sending a line and
/// waiting for the answer. `Ok(true)` when the connection completed.
pub fn tcp_connect(
    ns: &str,
    src: IpAddr,
    dst: SocketAddr,
    timeout: Duration,
) -> anyhow::Result<bool> {
    Ok(tcp_exchange(ns, SocketAddr::new(src, 0), dst, timeout)?.connected)
}

/// What a TCP exchange got to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exchange {
    pub connected: bool,
    /// The listener's answer came back over the connection.
    pub answered: bool,
}

/// A TCP connect from `src` (port 0: chosen by the kernel) to `dst` inside `ns`, sending a line
/// and reading the answer.
pub fn tcp_exchange(
    ns: &str,
    src: SocketAddr,
    dst: SocketAddr,
    timeout: Duration,
) -> anyhow::Result<Exchange> {
    in_netns(ns, move || {
        let domain = if dst.is_ipv4() {
            Domain::IPV4
        } else {
            Domain::IPV6
        };
        let sock = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
        sock.set_reuse_address(true)?;
        sock.bind(&SockAddr::from(src))
            .with_context(|| format!("bind {src}"))?;
        if sock.connect_timeout(&dst.into(), timeout).is_err() {
            return Ok(Exchange {
                connected: false,
                answered: false,
            });
        }
        let mut s: std::net::TcpStream = sock.into();
        s.set_read_timeout(Some(timeout))?;
        s.write_all(b"hello\n")?;
        let mut buf = [0u8; 2];
        let answered = s.read_exact(&mut buf).is_ok() && &buf == b"ok";
        Ok(Exchange {
            connected: true,
            answered,
        })
    })
}

/// A UDP datagram from `src:sport` to `dst`; returns whether an answer came back.
pub fn udp_send(
    ns: &str,
    src: SocketAddr,
    dst: SocketAddr,
    timeout: Duration,
) -> anyhow::Result<bool> {
    in_netns(ns, move || {
        let sock = UdpSocket::bind(src)?;
        sock.set_read_timeout(Some(timeout))?;
        sock.send_to(b"probe", dst)?;
        let mut buf = [0u8; 16];
        Ok(sock.recv_from(&mut buf).is_ok())
    })
}

/// An AF_PACKET socket on an interface: sees every frame the interface received and XDP passed.
/// Its receive buffer is [`TAP_RCVBUF`], so that frames can wait while a test is busy; what
/// the kernel still had to drop is counted ([`Tap::statistics`]), and [`Tap::record`] reads on a
/// thread of its own while traffic runs.
pub struct Tap {
    sock: std::os::fd::OwnedFd,
}

/// A tap's receive buffer: 64 MiB (set with `SO_RCVBUFFORCE`, which root may set beyond
/// `net.core.rmem_max`). A queued frame costs its skb's truesize, about 1 KiB for a short one, so
/// tens of thousands of frames fit; a default buffer kept 256 of 5,000 frames on a veth.
pub const TAP_RCVBUF: usize = 64 << 20;

/// (received, sent) frames of a tap.
type Frames = (Vec<Vec<u8>>, Vec<Vec<u8>>);

/// `PACKET_STATISTICS` (linux/if_packet.h), which the libc crate does not name.
const PACKET_STATISTICS: libc::c_int = 6;

/// The kernel's counts for a tap, from `PACKET_STATISTICS`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TapStats {
    /// Frames the socket was given (received and sent, dropped ones included).
    pub packets: u64,
    /// Frames the kernel dropped because the receive buffer was full.
    pub drops: u64,
}

impl std::ops::AddAssign for TapStats {
    fn add_assign(&mut self, o: TapStats) {
        self.packets += o.packets;
        self.drops += o.drops;
    }
}

impl Tap {
    pub fn open(ns: &str, iface: &str) -> anyhow::Result<Tap> {
        let proto = (libc::ETH_P_ALL as u16).to_be() as i32;
        let sock = af_packet(ns, iface, libc::SOCK_RAW | libc::SOCK_NONBLOCK, proto)?;
        let fd = sock.as_raw_fd();
        let size = TAP_RCVBUF as libc::c_int;
        let set = |opt| unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                &size as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as u32,
            )
        };
        if set(libc::SO_RCVBUFFORCE) != 0 && set(libc::SO_RCVBUF) != 0 {
            bail!("tap receive buffer: {}", std::io::Error::last_os_error());
        }
        let tap = Tap { sock };
        // Counts start now.
        tap.statistics()?;
        Ok(tap)
    }

    /// The kernel's counts since the last call (reading them resets them) or since `open`.
    pub fn statistics(&self) -> anyhow::Result<TapStats> {
        let mut st: libc::tpacket_stats = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tpacket_stats>() as u32;
        let rc = unsafe {
            libc::getsockopt(
                self.sock.as_raw_fd(),
                libc::SOL_PACKET,
                PACKET_STATISTICS,
                &mut st as *mut _ as *mut libc::c_void,
                &mut len,
            )
        };
        if rc != 0 {
            bail!("PACKET_STATISTICS: {}", std::io::Error::last_os_error());
        }
        Ok(TapStats {
            packets: u64::from(st.tp_packets),
            drops: u64::from(st.tp_drops),
        })
    }

    /// Received (not sent) frames waiting in the socket, drained until `quiet` passes with none.
    pub fn drain(&self, quiet: Duration) -> Vec<Vec<u8>> {
        self.drain_split(quiet).0
    }

    /// (received, sent) frames waiting in the socket. Sent frames are seen after TC egress, so
    /// a frame TC dropped is not among them.
    pub fn drain_split(&self, quiet: Duration) -> Frames {
        let mut out = (Vec::new(), Vec::new());
        let mut last = Instant::now();
        let mut buf = vec![0u8; 65536];
        while last.elapsed() < quiet {
            if self.read_one(&mut buf, &mut out, Duration::from_millis(2)) {
                last = Instant::now();
            }
        }
        out
    }

    /// Reads one frame into (received, sent), waiting up to `wait` for it; false when none came.
    fn read_one(&self, buf: &mut [u8], (received, sent): &mut Frames, wait: Duration) -> bool {
        let fd = self.sock.as_raw_fd();
        for attempt in 0..2 {
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            let n = unsafe {
                libc::recvfrom(
                    fd,
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    0,
                    &mut sll as *mut _ as *mut libc::sockaddr,
                    &mut len,
                )
            };
            if n >= 0 {
                let frame = buf[..n as usize].to_vec();
                if sll.sll_pkttype != libc::PACKET_OUTGOING {
                    received.push(frame);
                } else {
                    sent.push(frame);
                }
                return true;
            }
            if attempt == 0 {
                let mut pfd = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                unsafe { libc::poll(&mut pfd, 1, wait.as_millis() as i32) };
            }
        }
        false
    }

    /// Reads on a thread of its own from now on, so that no frame waits in the buffer while
    /// traffic runs; [`Recording::finish`] returns what it saw.
    pub fn record(self) -> Recording {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut out = (Vec::new(), Vec::new());
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    self.read_one(&mut buf, &mut out, Duration::from_millis(10));
                }
                (self, out)
            })
        };
        Recording { stop, thread }
    }
}

/// A tap read on a thread of its own ([`Tap::record`]).
pub struct Recording {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<(Tap, Frames)>,
}

/// Everything a recording tap saw, and the kernel's counts for it over the whole recording.
#[derive(Debug, Default)]
pub struct Recorded {
    pub received: Vec<Vec<u8>>,
    pub sent: Vec<Vec<u8>>,
    pub stats: TapStats,
}

impl Recording {
    /// Stops the thread, drains what is left until `quiet` passes with no frame, and returns
    /// every frame with the kernel's counts since the tap was opened (or last asked).
    pub fn finish(self, quiet: Duration) -> anyhow::Result<Recorded> {
        self.stop.store(true, Ordering::Relaxed);
        let (tap, (mut received, mut sent)) = self
            .thread
            .join()
            .map_err(|_| anyhow::anyhow!("tap thread panicked"))?;
        let (r, s) = tap.drain_split(quiet);
        received.extend(r);
        sent.extend(s);
        Ok(Recorded {
            received,
            sent,
            stats: tap.statistics()?,
        })
    }
}

/// The MAC address of `iface` in `ns`.
pub fn mac(ns: &str, iface: &str) -> anyhow::Result<[u8; 6]> {
    let out = Command::new("ip")
        .args(["-n", ns, "-o", "link", "show", "dev", iface])
        .output()
        .context("running `ip`")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let at = text
        .find("link/ether ")
        .with_context(|| format!("no MAC for {iface} in {ns}: {text}"))?
        + "link/ether ".len();
    let mut mac = [0u8; 6];
    for (i, part) in text[at..at + 17].split(':').enumerate() {
        mac[i] = u8::from_str_radix(part, 16)?;
    }
    Ok(mac)
}

/// An AF_PACKET socket that sends whole Ethernet frames out of an interface in a namespace:
/// frames reach the peer veth as if from a NIC, so the peer's XDP program sees them first.
pub struct RawSender {
    sock: std::os::fd::OwnedFd,
}

impl RawSender {
    pub fn open(ns: &str, iface: &str) -> anyhow::Result<RawSender> {
        // Protocol 0: this socket only sends.
        Ok(RawSender {
            sock: af_packet(ns, iface, libc::SOCK_RAW, 0)?,
        })
    }

    /// Sends one frame; blocks while the device queue is full, so nothing is lost here.
    pub fn send(&self, frame: &[u8]) -> anyhow::Result<()> {
        let n = unsafe {
            libc::send(
                self.sock.as_raw_fd(),
                frame.as_ptr() as *const libc::c_void,
                frame.len(),
                0,
            )
        };
        if n != frame.len() as isize {
            bail!("AF_PACKET send: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// An AF_PACKET socket of `kind` and `proto` (network byte order) bound to `iface` in `ns`.
fn af_packet(ns: &str, iface: &str, kind: i32, proto: i32) -> anyhow::Result<std::os::fd::OwnedFd> {
    let iface = iface.to_string();
    in_netns(ns, move || {
        let fd = unsafe { libc::socket(libc::AF_PACKET, kind, proto) };
        if fd < 0 {
            bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
        }
        let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let name = std::ffi::CString::new(iface.clone())?;
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            bail!("no interface {iface}");
        }
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto as u16;
        sll.sll_ifindex = ifindex as i32;
        let rc = unsafe {
            libc::bind(
                fd,
                &sll as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc != 0 {
            bail!("bind AF_PACKET: {}", std::io::Error::last_os_error());
        }
        Ok(sock)
    })
}

/// The id of the XDP program on `dev` in `ns`, as `ip -d link` shows it; None when there is none.
pub fn xdp_prog(ns: &str, dev: &str) -> Option<u32> {
    let out = std::process::Command::new("ip")
        .args(["-n", ns, "-d", "link", "show", "dev", dev])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let at = text.find("prog/xdp id ")? + "prog/xdp id ".len();
    text[at..].split_whitespace().next()?.parse().ok()
}

/// The IPv4 address inside one of the `IpAddr` constants above, for tests that build frames
/// from `Ipv4Addr` (so that no test restates an address the lab defines).
pub const fn v4_of(a: IpAddr) -> Ipv4Addr {
    match a {
        IpAddr::V4(a) => a,
        IpAddr::V6(_) => panic!("an IPv4 constant"),
    }
}

/// The IPv6 counterpart of [`v4_of`].
pub const fn v6_of(a: IpAddr) -> Ipv6Addr {
    match a {
        IpAddr::V6(a) => a,
        IpAddr::V4(_) => panic!("an IPv6 constant"),
    }
}

/// The 5-tuple of a TCP/UDP frame as a tap sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuple {
    pub udp: bool,
    pub src: SocketAddr,
    pub dst: SocketAddr,
}

/// The 5-tuple of an Ethernet frame carrying TCP or UDP over IPv4/IPv6.
pub fn tuple(frame: &[u8]) -> Option<Tuple> {
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};
    let p = SlicedPacket::from_ethernet(frame).ok()?;
    let (src, dst): (IpAddr, IpAddr) = match p.net? {
        NetSlice::Ipv4(v4) => (
            v4.header().source_addr().into(),
            v4.header().destination_addr().into(),
        ),
        NetSlice::Ipv6(v6) => (
            v6.header().source_addr().into(),
            v6.header().destination_addr().into(),
        ),
        _ => return None,
    };
    let (udp, sport, dport) = match p.transport? {
        TransportSlice::Tcp(t) => (false, t.source_port(), t.destination_port()),
        TransportSlice::Udp(u) => (true, u.source_port(), u.destination_port()),
        _ => return None,
    };
    Some(Tuple {
        udp,
        src: SocketAddr::new(src, sport),
        dst: SocketAddr::new(dst, dport),
    })
}

/// How many of `frames` are TCP/UDP frames whose 5-tuple satisfies `pred`.
pub fn count(frames: &[Vec<u8>], pred: impl Fn(&Tuple) -> bool) -> u64 {
    frames
        .iter()
        .filter_map(|f| tuple(f))
        .filter(|t| pred(t))
        .count() as u64
}

/// Counters of `TcpExt:` in `/proc/net/netstat` of namespace `ns`, in the order `names` gives
/// them (the kernel's own SYN-cookie counters, say).
pub fn tcp_ext(ns: &str, names: &[&str]) -> Vec<u64> {
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", Lab::netns_path(ns)))
        .args(["cat", "/proc/net/netstat"])
        .output()
        .expect("nsenter cat /proc/net/netstat");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(header), Some(values)) = (lines.next(), lines.next()) else {
        panic!("no TcpExt lines in {ns}'s /proc/net/netstat: {text}");
    };
    let header: Vec<&str> = header.split_whitespace().collect();
    let values: Vec<&str> = values.split_whitespace().collect();
    names
        .iter()
        .map(|n| {
            let i = header
                .iter()
                .position(|h| h == n)
                .unwrap_or_else(|| panic!("no TcpExt counter {n} in {ns}"));
            values[i]
                .parse()
                .unwrap_or_else(|e| panic!("TcpExt {n} = {:?}: {e}", values[i]))
        })
        .collect()
}
