//! Issue 20's SYN-cookie question, asked of the real kernel: can a SYN cookie made at XDP
//! (`bpf_tcp_raw_gen_syncookie_ipv4`, what an XDP SYN proxy puts in its SYN-ACK) be completed by
//! the kernel's own listener, without netfilter's SYNPROXY?
//!
//! A listener on the Edge's 198.51.100.10:5061, first with `net.ipv4.tcp_syncookies = 1` (the
//! default: cookies once a listener's queue overflows), then 2 (cookies for every SYN). The
//! probe program (`syncookie_probe`, BPF_PROG_TEST_RUN) makes the cookie for a
//! SYN the listener never sees, as a SYN proxy at XDP would; the client's ACK carrying it is
//! sent from the remote host with a raw socket. Found here (Linux 6.18):
//!
//! - a listener that has not sent a cookie itself in the last two minutes refuses the ACK
//!   (`cookie_v4_check` → `cookie_tcp_check` gives up while `tcp_synq_no_recent_overflow`):
//!   an Edge that answers every SYN at XDP starves its listeners of the SYNs that would keep
//!   that stamp fresh, and the handshakes it proxies fail; with `tcp_syncookies = 1` a listener
//!   whose queue does not overflow never sends a cookie, so real SYNs reaching it do not help;
//! - once one real SYN has reached the listener (with `tcp_syncookies = 2` it answered with a
//!   cookie and stamped the listener), the same kind of ACK is accepted: the XDP cookie and the
//!   kernel's share the secret.
//!
//! So an XDP SYN proxy works only while some SYNs keep reaching each listener (at least one
//! every two minutes) and `tcp_syncookies = 2`: the Edge's (`limit.syn_proxy`,
//! `tests/syn_proxy.rs`) lets one SYN over the budget per rule and family through every 30 s,
//! and `run` asks for 2 when a rule has it (1 otherwise).

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use aya::{
    Ebpf,
    maps::Array,
    programs::{TestRun as _, TestRunOptions, Xdp},
};
use edge_classifier::loader::SYNCOOKIE_PROBE_OBJECT;
use edge_classifier_lab::{EDGE_EXT, Lab, RawSender, in_netns, mac, tcp_ext};

const EDGE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const PORT: u16 = 5061;

/// The cookie the probe program makes for `syn`.
fn xdp_cookie(probe: &mut Ebpf, syn: &[u8]) -> u32 {
    let prog: &mut Xdp = probe
        .program_mut("syncookie_probe")
        .expect("the probe program")
        .try_into()
        .expect("an XDP program");
    prog.test_run(TestRunOptions {
        data_in: Some(syn),
        ..TestRunOptions::new()
    })
    .expect("BPF_PROG_TEST_RUN");
    let map: Array<_, i64> = Array::try_from(probe.map("COOKIE").expect("COOKIE")).unwrap();
    let r = map.get(&0, 0).unwrap();
    assert!(r >= 0, "bpf_tcp_raw_gen_syncookie_ipv4 failed: {r}");
    r as u32
}

/// A SYN from CLIENT:`sport` with sequence `isn` (`ack` None), or the client's ACK completing
/// the handshake whose SYN-ACK carried `ack`'s cookie; as frames from wan0 to ext0.
fn frame(lab: &Lab, sport: u16, isn: u32, ack: Option<u32>) -> Vec<u8> {
    let (wan, ext) = (
        mac(&lab.remote, "wan0").unwrap(),
        mac(&lab.edge, EDGE_EXT).unwrap(),
    );
    let ip =
        etherparse::PacketBuilder::ethernet2(wan, ext).ipv4(CLIENT.octets(), EDGE.octets(), 64);
    let b = match ack {
        None => ip.tcp(sport, PORT, isn, 64240).syn(),
        Some(cookie) => ip
            .tcp(sport, PORT, isn.wrapping_add(1), 64240)
            .ack(cookie.wrapping_add(1)),
    };
    let mut out = Vec::new();
    b.write(&mut out, &[]).unwrap();
    out
}

/// Whether the listener accepts a connection within `wait`.
fn accepted(listener: &TcpListener, wait: Duration) -> Option<SocketAddr> {
    let deadline = Instant::now() + wait;
    loop {
        match listener.accept() {
            Ok((_, peer)) => return Some(peer),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("accept: {e}"),
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// TcpExt counters of the Edge's namespace: SyncookiesSent, SyncookiesRecv, SyncookiesFailed.
fn cookie_counters(lab: &Lab) -> (u64, u64, u64) {
    let c = tcp_ext(
        &lab.edge,
        &["SyncookiesSent", "SyncookiesRecv", "SyncookiesFailed"],
    );
    (c[0], c[1], c[2])
}

#[test]
fn a_cookie_made_at_xdp_is_completed_by_the_listener_only_after_it_sent_cookies_itself() {
    let lab = Lab::create("sc").expect("lab");
    let syncookies = |value: u8| {
        let sysctl = std::process::Command::new("nsenter")
            .arg(format!("--net={}", Lab::netns_path(&lab.edge)))
            .args(["sysctl", "-qw", &format!("net.ipv4.tcp_syncookies={value}")])
            .status()
            .expect("sysctl");
        assert!(sysctl.success());
    };
    // The kernel's default, and what `run` asks for: cookies only when a queue overflows.
    syncookies(1);
    let listener = in_netns(&lab.edge, || {
        let l = TcpListener::bind(SocketAddr::new(IpAddr::V4(EDGE), PORT))?;
        l.set_nonblocking(true)?;
        Ok(l)
    })
    .expect("listener");
    let mut probe = Ebpf::load(SYNCOOKIE_PROBE_OBJECT).expect("load the probe object");
    {
        let prog: &mut Xdp = probe
            .program_mut("syncookie_probe")
            .unwrap()
            .try_into()
            .unwrap();
        prog.load().expect("the verifier takes the probe");
    }
    let raw = RawSender::open(&lab.remote, "wan0").expect("raw socket on wan0");
    // The neighbours learn each other first, so the ACK is not held for ARP.
    let _ = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.remote,
            "ping",
            "-c1",
            "-W1",
            "198.51.100.10",
        ])
        .output();

    // 1. A fresh listener (no cookie sent by it): the XDP cookie is refused.
    let isn = 1_000_000;
    let cookie = xdp_cookie(&mut probe, &frame(&lab, 40001, isn, None));
    let before = cookie_counters(&lab);
    raw.send(&frame(&lab, 40001, isn, Some(cookie))).unwrap();
    let first = accepted(&listener, Duration::from_secs(2));
    let after = cookie_counters(&lab);
    eprintln!(
        "fresh listener: XDP cookie ACK {}; TcpExt SyncookiesSent/Recv/Failed {before:?} -> {after:?}",
        if first.is_some() {
            "accepted"
        } else {
            "refused"
        }
    );
    assert_eq!(
        first, None,
        "a listener that sent no cookie accepted an XDP cookie"
    );

    let connect = || {
        let stream = in_netns(&lab.remote, || {
            Ok(TcpStream::connect_timeout(
                &SocketAddr::new(IpAddr::V4(EDGE), PORT),
                Duration::from_secs(2),
            )?)
        })
        .expect("a real connect");
        assert!(accepted(&listener, Duration::from_secs(2)).is_some());
        drop(stream);
    };

    // 2. With tcp_syncookies = 1 a real SYN gets an ordinary SYN-ACK (the queue is far from
    // full): the listener sends no cookie, and still refuses the XDP cookie. An XDP SYN proxy
    // in front of listeners whose queues never overflow (the point of having one) never works.
    connect();
    let plain = cookie_counters(&lab);
    assert_eq!(plain.0, after.0, "no cookie under tcp_syncookies = 1");
    let isn = 1_500_000;
    let cookie = xdp_cookie(&mut probe, &frame(&lab, 40003, isn, None));
    raw.send(&frame(&lab, 40003, isn, Some(cookie))).unwrap();
    let still = accepted(&listener, Duration::from_secs(2));
    eprintln!(
        "tcp_syncookies = 1, after a real connect: XDP cookie ACK {}; {after:?} -> {:?}",
        if still.is_some() {
            "accepted"
        } else {
            "refused"
        },
        cookie_counters(&lab)
    );
    assert_eq!(
        still, None,
        "the listener accepted an XDP cookie under tcp_syncookies = 1"
    );

    // 3. One real SYN reaches the listener with tcp_syncookies = 2: it answers with a cookie of
    // its own, which stamps it.
    syncookies(2);
    let after = cookie_counters(&lab);
    connect();
    let stamped = cookie_counters(&lab);
    assert!(
        stamped.0 > after.0,
        "the listener sent no cookie of its own: {after:?} -> {stamped:?}"
    );

    // 4. Now the same kind of ACK, for a SYN the listener never saw, completes.
    let isn = 2_000_000;
    let cookie = xdp_cookie(&mut probe, &frame(&lab, 40002, isn, None));
    raw.send(&frame(&lab, 40002, isn, Some(cookie))).unwrap();
    let second = accepted(&listener, Duration::from_secs(2));
    let last = cookie_counters(&lab);
    eprintln!(
        "stamped listener: XDP cookie ACK {}; TcpExt SyncookiesSent/Recv/Failed {stamped:?} -> {last:?}",
        if second.is_some() {
            "accepted"
        } else {
            "refused"
        }
    );
    assert_eq!(
        second,
        Some(SocketAddr::new(IpAddr::V4(CLIENT), 40002)),
        "the stamped listener refused the XDP cookie"
    );
}
