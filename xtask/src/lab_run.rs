//! `cargo xtask run` without NICs: the classifier on a namespace lab, with traffic to look at.

use std::{
    io::{BufRead as _, BufReader},
    net::{IpAddr, SocketAddr},
    path::Path,
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use edge_classifier_lab::{
    CLIENT_V4, CLIENT_V6, EDGE_EXT, EDGE_EXT_V4, EDGE_EXT_V6, EDGE_INT, EDGE_INT_V4, EDGE_INT_V6,
    FE_V4, FE_V6, Lab, Listeners, PARTNER_V4, PARTNER_V6, tcp_connect, udp_send,
};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

struct Probe {
    what: &'static str,
    ns_is_fe: bool,
    udp: bool,
    src: IpAddr,
    dst: IpAddr,
    port: u16,
    allowed: bool,
}

fn probes() -> Vec<Probe> {
    let mut v = Vec::new();
    for (client, partner, ext, int, fe) in [
        (CLIENT_V4, PARTNER_V4, EDGE_EXT_V4, EDGE_INT_V4, FE_V4),
        (CLIENT_V6, PARTNER_V6, EDGE_EXT_V6, EDGE_INT_V6, FE_V6),
    ] {
        let p = |what, ns_is_fe, udp, src, dst, port, allowed| Probe {
            what,
            ns_is_fe,
            udp,
            src,
            dst,
            port,
            allowed,
        };
        v.extend([
            p(
                "P1 IM partner -> SIP/MTLS 5061",
                false,
                false,
                partner,
                ext,
                5061,
                true,
            ),
            p(
                "P3 client -> SIP/TLS 443",
                false,
                false,
                client,
                ext,
                443,
                true,
            ),
            p(
                "P6 client -> STUN udp 3478",
                false,
                true,
                client,
                ext,
                3478,
                true,
            ),
            p(
                "X1 XMPP peer -> 5269",
                false,
                false,
                client,
                ext,
                5269,
                true,
            ),
            p(
                "X3 front end -> internal 23456",
                true,
                false,
                fe,
                int,
                23456,
                true,
            ),
            p(
                "non-partner -> 5061",
                false,
                false,
                client,
                ext,
                5061,
                false,
            ),
            p("client -> ssh 22", false, false, client, ext, 22, false),
            p("client -> rdp 3389", false, false, client, ext, 3389, false),
            p("client -> udp 5061", false, true, client, ext, 5061, false),
        ]);
    }
    v
}

pub fn run(bin: &Path, extra: &[String], duration: Option<u64>) -> anyhow::Result<()> {
    let lab = Lab::create("run")?;
    println!("lab: namespaces {}, {}, {}", lab.remote, lab.edge, lab.fe);
    let _listeners = Listeners::start(
        &lab.edge,
        &[443, 5061, 5269, 23456, 22, 3389],
        &[3478, 5061],
    )?;

    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    // nsenter, not `ip netns exec`: the latter remounts /sys and would hide /sys/fs/bpf.
    let mut child = Command::new("nsenter")
        .arg(format!("--net={}", Lab::netns_path(&lab.edge)))
        .arg(bin)
        .arg("run")
        .args(["--iface", &format!("{EDGE_EXT}=external")])
        .args(["--iface", &format!("{EDGE_INT}=internal")])
        .args(extra)
        .stdout(Stdio::piped())
        .spawn()
        .context("starting edge-classifier in the edge namespace")?;
    let stdout = child.stdout.take().context("stdout")?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let relay = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line == "ready" {
                let _ = ready_tx.send(());
            } else {
                println!("{line}");
            }
        }
    });
    if ready_rx.recv_timeout(Duration::from_secs(30)).is_err() {
        let _ = child.kill();
        let _ = child.wait();
        bail!("edge-classifier did not attach (see its messages above)");
    }

    println!(
        "\n{:<34} {:<22} {:<9} {:<8}",
        "PROBE", "TO", "EXPECTED", "RESULT"
    );
    let mut wrong = 0;
    for p in probes() {
        let ns = if p.ns_is_fe { &lab.fe } else { &lab.remote };
        let dst = SocketAddr::new(p.dst, p.port);
        let t = Duration::from_millis(if p.allowed { 2000 } else { 400 });
        let ok = if p.udp {
            udp_send(ns, SocketAddr::new(p.src, 40000), dst, t)?
        } else {
            tcp_connect(ns, p.src, dst, t)?
        };
        let mark = if ok == p.allowed {
            ""
        } else {
            "  <-- unexpected"
        };
        if ok != p.allowed {
            wrong += 1;
        }
        println!(
            "{:<34} {:<22} {:<9} {:<8}{mark}",
            p.what,
            format!("{}/{}", if p.udp { "udp" } else { "tcp" }, dst),
            if p.allowed { "pass" } else { "drop" },
            if ok { "answered" } else { "silent" },
        );
    }
    println!();
    unsafe { libc::kill(child.id() as i32, libc::SIGUSR1) };
    std::thread::sleep(Duration::from_millis(300));

    let deadline = duration.map(|s| Instant::now() + Duration::from_secs(s));
    match deadline {
        Some(_) => println!("running; stops by itself (--duration) or on Ctrl-C"),
        None => println!("running; Ctrl-C detaches and removes the lab"),
    }
    while !STOP.load(Ordering::SeqCst) && deadline.is_none_or(|d| Instant::now() < d) {
        if let Some(status) = child.try_wait()? {
            bail!("edge-classifier exited early: {status}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait()?;
    let _ = relay.join();
    drop(lab);
    println!("lab removed");
    if !status.success() {
        bail!("edge-classifier exited with {status}");
    }
    if wrong > 0 {
        bail!("{wrong} probes did not get the expected verdict");
    }
    Ok(())
}
