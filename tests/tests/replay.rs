//! `replay` against a capture taken live. In the namespace lab the classifier is attached to the
//! edge host's ext0; the edge opens flows (S1 TCP to 5061, a DNS query, P5 STUN to 3478) and
//! serves one (P3, TCP 443), while the remote host also sends what the catalogue forbids. Every
//! frame on the ext0 <-> wan0 link is recorded both ways with its kernel timestamp, into a
//! pcapng with nanosecond times, and the capture is replayed with the same catalogue: the
//! edge's frames go through TC egress, the replies to its flows pass as they did live, kernel
//! and reference agree, the counts are the live counters' own, the dropped frames keep their
//! times, and the verdict lines say all of it frame by frame.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::bail;
use edge_classifier::{
    catalogue::Catalogue,
    compile::compile,
    explain::Way,
    loader::{AttachMode, Classifier},
    maps::IfaceStats,
    replay::{Counter, Outcome, replay, write_verdicts},
};
use edge_classifier_common::reason;
use edge_classifier_lab::*;
use pcap_file::{
    DataLink, TsResolution,
    pcap::PcapReader,
    pcapng::{
        PcapNgWriter,
        blocks::{
            enhanced_packet::EnhancedPacketBlock,
            interface_description::{InterfaceDescriptionBlock, InterfaceDescriptionOption},
        },
    },
};

const ALLOWED: Duration = Duration::from_secs(3);
const DENIED: Duration = Duration::from_millis(300);
const QUIET: Duration = Duration::from_millis(500);

/// A frame on the link and when the recorder saw it.
struct Captured {
    time: Duration,
    /// Sent by the edge (received on wan0), else sent by the remote host.
    from_edge: bool,
    data: Vec<u8>,
}

/// An AF_PACKET socket on the remote end of the link, with kernel timestamps. It records on
/// wan0 rather than ext0 because the edge's own tap would miss what XDP dropped: wan0 sends
/// every frame ext0 receives (before XDP) and receives every frame ext0 sends (after TC egress,
/// which drops none with `egress = "track"`).
struct Recorder {
    sock: OwnedFd,
}

impl Recorder {
    fn open(ns: &str, iface: &str) -> anyhow::Result<Recorder> {
        let iface = iface.to_string();
        in_netns(ns, move || {
            let proto = (libc::ETH_P_ALL as u16).to_be();
            // SAFETY: a plain socket call; the descriptor is owned at once.
            let fd = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_NONBLOCK,
                    i32::from(proto),
                )
            };
            if fd < 0 {
                bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
            }
            // SAFETY: `fd` is a new descriptor nothing else owns.
            let sock = unsafe { OwnedFd::from_raw_fd(fd) };
            let on: libc::c_int = 1;
            // SAFETY: the option value is a live c_int of the size given.
            let rc = unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_TIMESTAMPNS,
                    (&on as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as u32,
                )
            };
            if rc != 0 {
                bail!("SO_TIMESTAMPNS: {}", std::io::Error::last_os_error());
            }
            let name = std::ffi::CString::new(iface.clone())?;
            // SAFETY: `name` is a NUL-terminated string.
            let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
            if ifindex == 0 {
                bail!("no interface {iface}");
            }
            // SAFETY: sockaddr_ll is plain data.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = proto;
            sll.sll_ifindex = ifindex as i32;
            // SAFETY: `sll` is a sockaddr_ll of the size given.
            let rc = unsafe {
                libc::bind(
                    fd,
                    (&sll as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            if rc != 0 {
                bail!("bind AF_PACKET: {}", std::io::Error::last_os_error());
            }
            Ok(Recorder { sock })
        })
    }

    /// The frames waiting, in the order the link carried them, read until `quiet` passes with
    /// none.
    fn drain(&self, quiet: Duration) -> Vec<Captured> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 65536];
        // u64s: cmsg headers want their alignment.
        let mut control = [0u64; 16];
        let mut last = Instant::now();
        while last.elapsed() < quiet {
            // SAFETY: plain data.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            // SAFETY: plain data.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_name = (&mut sll as *mut libc::sockaddr_ll).cast();
            msg.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&control);
            // SAFETY: every pointer in `msg` is to a live buffer of the length given.
            let n = unsafe { libc::recvmsg(self.sock.as_raw_fd(), &mut msg, 0) };
            if n < 0 {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
            let mut time = None;
            // SAFETY: the cmsg walk stays within `control` as recvmsg filled it in.
            unsafe {
                let mut c = libc::CMSG_FIRSTHDR(&msg);
                while !c.is_null() {
                    if (*c).cmsg_level == libc::SOL_SOCKET
                        && (*c).cmsg_type == libc::SCM_TIMESTAMPNS
                    {
                        let ts =
                            std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::timespec);
                        time = Some(Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32));
                    }
                    c = libc::CMSG_NXTHDR(&msg, c);
                }
            }
            out.push(Captured {
                time: time.expect("SO_TIMESTAMPNS gives every frame a time"),
                from_edge: sll.sll_pkttype != libc::PACKET_OUTGOING,
                data: buf[..n as usize].to_vec(),
            });
            last = Instant::now();
        }
        out
    }
}

/// Writes the capture as pcapng with nanosecond timestamps (`if_tsresol` 9), as dumpcap would.
fn write_pcapng(path: &Path, frames: &[Captured]) {
    let file = std::fs::File::create(path).expect("create capture");
    let mut w = PcapNgWriter::new(file).expect("pcapng header");
    let mut idb = InterfaceDescriptionBlock::new(DataLink::ETHERNET, 65535);
    idb.options.push(InterfaceDescriptionOption::IfTsResol(9));
    w.write_pcapng_block(idb).expect("interface block");
    for f in frames {
        w.write_pcapng_block(EnhancedPacketBlock {
            interface_id: 0,
            // pcap-file writes the duration's nanoseconds as the tick count: with if_tsresol 9
            // that is the time itself.
            timestamp: f.time,
            original_len: f.data.len() as u32,
            data: f.data.as_slice().into(),
            options: Vec::new(),
        })
        .expect("packet block");
    }
}

/// Counters that moved between two readings, labelled `rule ID` or `pass|drop REASON`.
fn moved(c: &Classifier, before: &IfaceStats, after: &IfaceStats) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (i, (b, a)) in before.reasons.iter().zip(&after.reasons).enumerate() {
        if a.packets != b.packets {
            let (name, drop) = reason::NAMES[i];
            let verdict = if drop { "drop" } else { "pass" };
            *out.entry(format!("{verdict} {name}")).or_default() += a.packets - b.packets;
        }
    }
    for (r, (b, a)) in c
        .compiled()
        .rules
        .iter()
        .zip(before.rules.iter().zip(&after.rules))
    {
        if a.packets != b.packets {
            out.insert(format!("rule {}", r.id), a.packets - b.packets);
        }
    }
    out
}

fn sysctl(ns: &str, key: &str, value: &str) {
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "sysctl",
            "-qw",
            &format!("{key}={value}"),
        ])
        .output()
        .expect("ip netns exec sysctl");
    assert!(
        out.status.success(),
        "sysctl {key}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_two_way_capture_replays_as_it_ran_live() {
    let lab = Lab::create("replay").expect("lab");
    // The edge's router solicitations come from its link-local address, which no set names:
    // replay could not tell them from arriving frames, and the link must be quiet between the
    // counter readings and the capture.
    sysctl(
        &lab.edge,
        &format!("net.ipv6.conf.{EDGE_EXT}.router_solicitations"),
        "0",
    );
    let catalogue = Catalogue::default_catalogue();
    let compiled = compile(&catalogue).expect("default catalogue compiles");
    let live_compiled = compiled.clone();
    let classifier = in_netns(&lab.edge, move || {
        let mut c = Classifier::load(live_compiled)?;
        c.attach(EDGE_EXT, "external", AttachMode::Native)?;
        Ok(c)
    })
    .expect("load and attach in the edge namespace");
    let ext = classifier
        .bindings()
        .iter()
        .find(|b| b.name == EDGE_EXT)
        .expect("ext0 bound")
        .clone();
    let stats = || classifier.iface_stats(&ext).expect("stats");
    // Edge sockets the forbidden frames would reach if they passed, and the P3 service.
    let edge_listeners =
        Listeners::start(&lab.edge, &[443, 40000, 22], &[40001]).expect("edge listeners");

    let recorder = Recorder::open(&lab.remote, "wan0").expect("recorder on wan0");
    // Whatever the lab's setup still sends (MLD reports, neighbour discovery) is not ours.
    let _ = recorder.drain(Duration::from_secs(2));
    let before = stats();

    let families = [(CLIENT_V4, EDGE_EXT_V4), (CLIENT_V6, EDGE_EXT_V6)];
    // 1. Forbidden, from the remote host: "replies" to flows the edge never opened (S1's 5061,
    // X2's 5269), TCP to port 22 and UDP to 40001, which no rule allows.
    for (client, ext) in families {
        for (sport, dport) in [(5061u16, 40000u16), (5269, 40000), (41022, 22)] {
            let x = tcp_exchange(
                &lab.remote,
                SocketAddr::new(client, sport),
                SocketAddr::new(ext, dport),
                DENIED,
            )
            .expect("tcp probe");
            assert!(!x.connected, "[{client}]:{sport} -> [{ext}]:{dport} passed");
        }
        let answered = udp_send(
            &lab.remote,
            SocketAddr::new(client, 41999),
            SocketAddr::new(ext, 40001),
            DENIED,
        )
        .expect("udp probe");
        assert!(!answered, "[{client}]:41999 -> [{ext}]:40001 passed");
    }
    // 2. Flows the edge opens: S1 (TCP 5061 to a peer that is no IM partner), a DNS query
    // (`egress = "track"`) and P5 (UDP 3478); and P3, which the remote opens to the edge's 443.
    // Fixed source ports keep the edge's outside the P4 media range.
    let remote_listeners =
        Listeners::start(&lab.remote, &[5061], &[53, 3478]).expect("remote listeners");
    for (client, ext) in families {
        let x = tcp_exchange(
            &lab.edge,
            SocketAddr::new(ext, 41061),
            SocketAddr::new(client, 5061),
            ALLOWED,
        )
        .expect("tcp");
        assert!(
            x.connected && x.answered,
            "S1 edge -> [{client}]:5061: {x:?}"
        );
        for port in [53u16, 3478] {
            let answered = udp_send(
                &lab.edge,
                SocketAddr::new(ext, 41000 + port),
                SocketAddr::new(client, port),
                ALLOWED,
            )
            .expect("udp");
            assert!(answered, "edge -> [{client}]:{port} answered");
        }
        let x = tcp_exchange(
            &lab.remote,
            SocketAddr::new(client, 41443),
            SocketAddr::new(ext, 443),
            ALLOWED,
        )
        .expect("tcp");
        assert!(
            x.connected && x.answered,
            "P3 [{client}] -> edge:443: {x:?}"
        );
    }
    let captured = recorder.drain(QUIET * 2);
    let live = moved(&classifier, &before, &stats());
    drop(remote_listeners);
    drop(edge_listeners);

    let dir = std::env::temp_dir().join(format!("ec-replay-lab-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let capture = dir.join("two-way.pcapng");
    write_pcapng(&capture, &captured);
    eprintln!(
        "{} frames captured ({} from the edge) in {}; live counters on ext0: {live:?}",
        captured.len(),
        captured.iter().filter(|c| c.from_edge).count(),
        capture.display()
    );

    let frames = edge_classifier::capture::read_frames(&capture).expect("read the capture");
    assert_eq!(frames.len(), captured.len());
    for (f, c) in frames.iter().zip(&captured) {
        assert_eq!((f.time, &f.data), (c.time, &c.data), "read back as written");
    }
    let report = replay(compiled, "external", &frames).expect("replay runs");
    let outcome = |i: usize| match &report.outcomes[i] {
        Outcome::Ran { way, pass, counted } => (*way, *pass, counted.clone()),
        Outcome::TooShort => panic!("frame {} too short", i + 1),
    };

    // (a) The edge's frames went through TC egress, and the replies to the flows it opened pass
    // under their rule (S1, P5) or as `tracked_reply` (DNS), as they did live.
    let mut replies = 0;
    for (i, c) in captured.iter().enumerate() {
        let (way, pass, counted) = outcome(i);
        assert_eq!(
            way,
            if c.from_edge { Way::Out } else { Way::In },
            "frame {}: the way it went through ext0",
            i + 1
        );
        let Some(Tuple { src, dst, .. }) = tuple(&c.data) else {
            continue;
        };
        let want = match (src.port(), dst.port()) {
            (5061, 41061) => Counter::Rule("sip-federation-out".into()),
            (3478, 44478) => Counter::Rule("messenger-stun-out".into()),
            (53, 41053) => Counter::Reason("tracked_reply"),
            _ => continue,
        };
        replies += 1;
        assert!(
            pass && counted == [want.clone()],
            "frame {} (reply {src} -> {dst}): pass {pass}, {counted:?}, want {want:?}",
            i + 1
        );
    }
    assert!(replies >= 12, "replies captured: {replies}");
    let claimed: u64 = captured
        .iter()
        .filter(|c| tuple(&c.data).is_some_and(|t| [5061, 5269].contains(&t.src.port())))
        .filter(|c| tuple(&c.data).is_some_and(|t| t.dst.port() == 40000))
        .count() as u64;
    assert!(
        claimed >= 4,
        "forbidden claimed replies captured: {claimed}"
    );
    let not_established = report
        .ingress
        .reasons
        .iter()
        .find(|(_, name, _)| *name == "not_established")
        .map_or(0, |r| r.2);
    assert_eq!(
        not_established, claimed,
        "only the forbidden claimed replies are not_established"
    );

    // (b) Kernel and reference agree on every frame.
    assert!(
        report.disagreements.is_empty(),
        "disagreements: {:?}",
        report.disagreements
    );

    // (c) The replay counts what the live classifier counted on ext0, both ways together (the
    // two programs count into one block). The recorder sees every frame on the link, so
    // nothing is missing from the capture: the live counters add up to its length.
    let mut replayed = BTreeMap::new();
    for counts in [&report.ingress, &report.egress] {
        for (id, n) in &counts.rules {
            if *n > 0 {
                *replayed.entry(format!("rule {id}")).or_default() += *n;
            }
        }
        for (verdict, name, n) in &counts.reasons {
            *replayed.entry(format!("{verdict} {name}")).or_default() += *n;
        }
    }
    assert_eq!(replayed, live, "replayed counts vs live counters on ext0");
    assert_eq!(
        live.values().sum::<u64>(),
        captured.len() as u64,
        "live counters vs frames captured"
    );
    assert_eq!(
        (report.ingress.frames, report.egress.frames),
        (
            captured.iter().filter(|c| !c.from_edge).count() as u64,
            captured.iter().filter(|c| c.from_edge).count() as u64
        ),
        "frames each way"
    );

    // (d) The dropped frames are written with their capture times and lengths, nanoseconds
    // kept.
    let dropped: Vec<usize> = report.dropped().collect();
    let forbidden: Vec<usize> = captured
        .iter()
        .enumerate()
        .filter(|(_, c)| {
            !c.from_edge
                && tuple(&c.data).is_some_and(|t| [40000, 22, 40001].contains(&t.dst.port()))
        })
        .map(|(i, _)| i)
        .collect();
    assert_eq!(dropped, forbidden, "dropped: exactly the forbidden frames");
    let dropped_pcap = dir.join("dropped.pcap");
    edge_classifier::capture::write_frames(&dropped_pcap, dropped.iter().map(|&i| &frames[i]))
        .expect("write dropped");
    let mut r = PcapReader::new(std::fs::File::open(&dropped_pcap).expect("open")).expect("pcap");
    assert_eq!(r.header().ts_resolution, TsResolution::NanoSecond);
    let mut written = Vec::new();
    while let Some(p) = r.next_packet() {
        let p = p.expect("record");
        written.push((p.timestamp, p.orig_len, p.data.into_owned()));
    }
    let want: Vec<_> = dropped
        .iter()
        .map(|&i| {
            let c = &captured[i];
            (c.time, c.data.len() as u32, c.data.clone())
        })
        .collect();
    assert_eq!(written, want, "dropped frames: time, length, bytes");

    // (e) One verdict line per frame: number, capture time, way, verdict, counter.
    let mut out = Vec::new();
    write_verdicts(&mut out, &frames, &report).expect("write verdicts");
    let text = String::from_utf8(out).expect("utf-8");
    let lines: Vec<Vec<&str>> = text.lines().map(|l| l.split('\t').collect()).collect();
    assert_eq!(lines.len(), captured.len(), "{text}");
    for (i, (fields, c)) in lines.iter().zip(&captured).enumerate() {
        let (way, pass, counted) = outcome(i);
        let counter = match &counted[..] {
            [Counter::Rule(id)] => format!("rule:{id}"),
            [Counter::Reason(name)] => format!("reason:{name}"),
            other => panic!("frame {}: counted {other:?}", i + 1),
        };
        let want = [
            (i + 1).to_string(),
            format!("{}.{:06}", c.time.as_secs(), c.time.subsec_micros()),
            if way == Way::Out { "out" } else { "in" }.to_string(),
            if pass { "pass" } else { "drop" }.to_string(),
            counter,
        ];
        assert_eq!(fields[..], want[..], "verdict line {}", i + 1);
    }
    std::fs::remove_dir_all(&dir).ok();
    drop(classifier);
    drop(lab);
}
