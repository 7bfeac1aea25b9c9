//! `cargo xtask run`: with `--iface`, `edge-classifier run` on real NICs; without, the
//! classifier on a namespace lab, with traffic to look at.

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
    CLIENT_V4, CLIENT_V6, EDGE_EXT, EDGE_EXT_V4, EDGE_EXT_V6, EDGE_INT, Lab, Listeners, Peer,
    SEED_ROWS, tcp_exchange, udp_send,
};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Which host a probe starts on.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Host {
    Remote,
    FrontEnd,
    /// The edge itself opens the flow (outbound rows).
    Edge,
}

struct Probe {
    what: &'static str,
    from: Host,
    udp: bool,
    src: IpAddr,
    /// Source port; 0 lets the kernel choose.
    sport: u16,
    dst: IpAddr,
    port: u16,
    allowed: bool,
}

/// Every probe of the walkthrough, allowed and refused, both families: a table written out,
/// long because the list is.
fn probes() -> Vec<Probe> {
    let mut v = Vec::new();
    // The seed rows' addresses come from the table; the refused probes use these.
    for (client, ext) in [(CLIENT_V4, EDGE_EXT_V4), (CLIENT_V6, EDGE_EXT_V6)] {
        let p = |what, from, udp, src, dst, port, allowed| Probe {
            what,
            from,
            udp,
            src,
            sport: if udp { 40000 } else { 0 },
            dst,
            port,
            allowed,
        };
        let forged = |what, udp, sport, dport| Probe {
            what,
            from: Host::Remote,
            udp,
            src: client,
            sport,
            dst: ext,
            port: dport,
            allowed: false,
        };
        use Host::*;
        let v6 = client.is_ipv6();
        // Every seed row, from the shared fixture table: an inbound row's peer connects to the
        // Edge; for an outbound row the edge opens the flow, and the replies pass because
        // egress recorded it.
        for r in SEED_ROWS {
            let (src, sport, dst, port) = r.first(v6);
            let from = match (r.inbound, r.peer) {
                (false, _) => Edge,
                (true, Peer::FrontEnd) => FrontEnd,
                (true, _) => Remote,
            };
            let what = format!(
                "{} {}{} {} -> {} {}",
                r.row,
                if r.inbound { "" } else { "edge " },
                if r.udp { "udp" } else { "tcp" },
                src,
                dst,
                port
            );
            v.push(Probe {
                // The kernel picks TCP source ports, except P4's, which is the Edge's media port.
                sport: if r.udp || r.row == "P4" { sport } else { 0 },
                ..p(
                    Box::leak(what.into_boxed_str()),
                    from,
                    r.udp,
                    src,
                    dst,
                    port,
                    true,
                )
            });
        }
        v.extend([
            p(
                "non-partner -> 5061",
                Remote,
                false,
                client,
                ext,
                5061,
                false,
            ),
            p("client -> ssh 22", Remote, false, client, ext, 22, false),
            p(
                "client -> rdp 3389",
                Remote,
                false,
                client,
                ext,
                3389,
                false,
            ),
            p("client -> udp 5061", Remote, true, client, ext, 5061, false),
            // Claimed replies to flows the edge never opened.
            forged("forged reply from 5061", false, 5061, 40000),
            forged("forged reply from 5269", false, 5269, 40000),
            forged("forged reply from udp 3478", true, 3478, 40001),
            forged("unsolicited -> media port 50020", false, 33000, 50020),
        ]);
    }
    // The forged probes borrow the remote peers' service ports as source ports: all of them go
    // before the remote listeners of the outbound probes take those ports.
    v.sort_by_key(|p| p.from == Host::Edge);
    v
}

/// The daemon, stopped (SIGTERM, then waited for) however `run` ends.
struct Daemon(std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
            let _ = self.0.wait();
        }
    }
}

pub fn run(args: &[String], duration: Option<u64>) -> anyhow::Result<()> {
    crate::setup::setup()?;
    let bin = crate::build_binary()?;
    if args
        .iter()
        .any(|a| a == "--iface" || a.starts_with("--iface="))
    {
        let status = Command::new(&bin).arg("run").args(args).status()?;
        std::process::exit(status.code().unwrap_or(1));
    }
    lab(&bin, args, duration)
}

/// The lab: three namespaces, the classifier on the edge one, traffic for every seed row. A
/// walkthrough an operator reads from top to bottom (set up, attach, probe, print, wait, clean
/// up), kept in one function for that reason.
fn lab(bin: &Path, extra: &[String], duration: Option<u64>) -> anyhow::Result<()> {
    let lab = Lab::create("run")?;
    println!("lab: namespaces {}, {}, {}", lab.remote, lab.edge, lab.fe);
    let _listeners = Listeners::start(
        &lab.edge,
        &[443, 5061, 5269, 23456, 22, 3389, 40000, 50020],
        &[3478, 5061, 40001],
    )?;
    // Peers for the outbound rows; started once the forged probes (which borrow these source
    // ports on the remote host) are done.
    let mut remote_listeners = None;

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
        // The default instance, so that `cargo xtask reload` reaches it; the lab's NICs vanish
        // with the lab, so nothing may stay pinned for them.
        .arg("--detach-on-exit")
        .args(extra)
        .stdout(Stdio::piped())
        .spawn()
        .context("starting edge-classifier in the edge namespace")?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut child = Daemon(child);
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
        let _ = child.0.kill();
        let _ = child.0.wait();
        bail!("edge-classifier did not attach (see its messages above)");
    }

    println!(
        "\n{:<34} {:<22} {:<9} {:<8}",
        "PROBE", "TO", "EXPECTED", "RESULT"
    );
    let mut wrong = 0;
    for p in probes() {
        let ns = match p.from {
            Host::Remote => &lab.remote,
            Host::FrontEnd => &lab.fe,
            Host::Edge => &lab.edge,
        };
        if p.from == Host::Edge && remote_listeners.is_none() {
            // The outbound seed rows' remote ports.
            let ports = |udp: bool| -> Vec<u16> {
                SEED_ROWS
                    .iter()
                    .filter(|r| !r.inbound && r.udp == udp)
                    .map(|r| r.first(false).3)
                    .collect::<std::collections::BTreeSet<u16>>()
                    .into_iter()
                    .collect()
            };
            remote_listeners = Some(Listeners::start(&lab.remote, &ports(false), &ports(true))?);
        }
        let src = SocketAddr::new(p.src, p.sport);
        let dst = SocketAddr::new(p.dst, p.port);
        let t = Duration::from_millis(if p.allowed { 2000 } else { 400 });
        let ok = if p.udp {
            udp_send(ns, src, dst, t)?
        } else {
            tcp_exchange(ns, src, dst, t)?.answered
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
    unsafe { libc::kill(child.0.id() as i32, libc::SIGUSR1) };
    std::thread::sleep(Duration::from_millis(300));

    let deadline = duration.map(|s| Instant::now() + Duration::from_secs(s));
    match deadline {
        Some(_) => println!(
            "running; `cargo xtask reload --catalogue FILE` swaps rules in; stops by itself (--duration) or on Ctrl-C"
        ),
        None => println!(
            "running; `cargo xtask reload --catalogue FILE` swaps rules in; Ctrl-C detaches and removes the lab"
        ),
    }
    while !STOP.load(Ordering::SeqCst) && deadline.is_none_or(|d| Instant::now() < d) {
        if let Some(status) = child.0.try_wait()? {
            bail!("edge-classifier exited early: {status}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    let status = child.0.wait()?;
    let _ = relay.join();
    drop(remote_listeners);
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
