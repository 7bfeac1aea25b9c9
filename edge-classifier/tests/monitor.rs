//! `edge-classifier monitor` against the real programs on the namespace lab: frames the
//! remote host sends that the catalogue does not allow appear exactly (5-tuple, reason, count),
//! in JSON lines and in a pcap that tshark reads with the sent bytes; a pcap-filter selects
//! exactly its frames; egress verdicts come from the TC program and a rule selects its frames;
//! several monitors run at once, a fifth is refused, and one killed with SIGKILL leaves nothing
//! behind; /events streams the same with the daemon up, `monitor` reads the pins with it down;
//! a bounded flood is dropped and every event missed is counted. Root.

mod common;

use std::{
    io::{BufRead as _, BufReader},
    net::{IpAddr, SocketAddr},
    process::{Child, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use common::*;
use edge_classifier::{instance::Instance, maps::Maps};
use edge_classifier_lab::*;
use etherparse::PacketBuilder;

/// A monitor process, once it said it is attached; its stdout lines arrive on `lines`.
struct Mon {
    proc: Process,
    lines: mpsc::Receiver<String>,
    stderr: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

/// `edge-classifier monitor --instance INSTANCE ARGS…` in `ns`, once it says it is attached.
fn start_monitor(ns: &str, instance: &str, args: &[&str]) -> Mon {
    let mut child: Child = in_ns(ns, BIN)
        .args(["monitor", "--instance", instance])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start monitor");
    let (tx, lines) = mpsc::channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let stderr = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let err = child.stderr.take().unwrap();
    let keep = stderr.clone();
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            keep.lock().unwrap().push(l);
        }
    });
    let mut m = Mon {
        proc: Process(child, "edge-classifier monitor"),
        lines,
        stderr,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if m.stderr_has("monitor: attached") {
            return m;
        }
        if let Ok(Some(st)) = m.proc.0.try_wait() {
            panic!(
                "monitor {args:?} exited {st}: {:?}",
                m.stderr.lock().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "monitor {args:?} never attached: {:?}",
        m.stderr.lock().unwrap()
    );
}

impl Mon {
    fn stderr_has(&self, s: &str) -> bool {
        self.stderr.lock().unwrap().iter().any(|l| l.contains(s))
    }

    /// Waits for the process to end by itself (--count or --duration) and returns its lines.
    fn finish(mut self, within: Duration) -> (Vec<String>, Vec<String>) {
        let deadline = Instant::now() + within;
        loop {
            match self.proc.0.try_wait() {
                Ok(Some(st)) => {
                    assert!(
                        st.success(),
                        "monitor: {st}: {:?}",
                        self.stderr.lock().unwrap()
                    );
                    break;
                }
                _ if Instant::now() > deadline => {
                    panic!("monitor did not end: {:?}", self.stderr.lock().unwrap())
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        let lines: Vec<String> = self.lines.try_iter().collect();
        let err = self.stderr.lock().unwrap().clone();
        (lines, err)
    }
}

/// Frames from the remote host to the Edge's external address that the default catalogue
/// drops as `no_rule`, each (frame, protocol, src, dst).
fn disallowed(
    remote_mac: [u8; 6],
    edge_mac: [u8; 6],
) -> Vec<(Vec<u8>, &'static str, SocketAddr, SocketAddr)> {
    let (src, dst) = (v4_of(PARTNER_V4), v4_of(EDGE_EXT_V4));
    let (src6, dst6) = (v6_of(PARTNER_V6), v6_of(EDGE_EXT_V6));
    let mut out = Vec::new();
    let mut push = |frame: Vec<u8>, proto, s: IpAddr, sp, d: IpAddr, dp| {
        out.push((frame, proto, SocketAddr::new(s, sp), SocketAddr::new(d, dp)));
    };
    for i in 0..5u16 {
        let b = PacketBuilder::ethernet2(remote_mac, edge_mac)
            .ipv4(src.octets(), dst.octets(), 64)
            .tcp(40000 + i, 22, 1000 + i as u32, 64240)
            .syn();
        let mut f = Vec::new();
        b.write(&mut f, &[]).unwrap();
        push(f, "tcp", src.into(), 40000 + i, dst.into(), 22);
    }
    for i in 0..3u16 {
        let b = PacketBuilder::ethernet2(remote_mac, edge_mac)
            .ipv6(src6.octets(), dst6.octets(), 64)
            .udp(50000 + i, 9999);
        let mut f = Vec::new();
        b.write(&mut f, b"hello").unwrap();
        push(f, "udp", src6.into(), 50000 + i, dst6.into(), 9999);
    }
    // Longer than an event carries: the pcap keeps 256 bytes and the length on the wire.
    let b = PacketBuilder::ethernet2(remote_mac, edge_mac)
        .ipv4(src.octets(), dst.octets(), 64)
        .udp(51000, 9998);
    let mut f = Vec::new();
    b.write(&mut f, &[0x5a; 1000]).unwrap();
    push(f, "udp", src.into(), 51000, dst.into(), 9998);
    out
}

fn key(proto: &str, src: &str, sport: u64, dst: &str, dport: u64) -> String {
    format!("{proto} {src}:{sport} -> {dst}:{dport}")
}

/// The `key` of a JSON event (`monitor --json`, `/events`).
fn event_key(v: &serde_json::Value) -> String {
    key(
        v["protocol"].as_str().unwrap_or("-"),
        v["src"].as_str().unwrap_or("-"),
        v["sport"].as_u64().unwrap_or(0),
        v["dst"].as_str().unwrap_or("-"),
        v["dport"].as_u64().unwrap_or(0),
    )
}

#[test]
fn disallowed_frames_appear_exactly_in_json_pcap_and_filtered() {
    let lab = Lab::create("mon").expect("lab");
    let instance = format!("mon{}", std::process::id());
    let _stop = Stop(instance.clone());
    let daemon = start_on_ext0(&lab.edge, &instance, None);
    let dir = TempDir::new("monitor");
    let pcap = dir.0.join("drops.pcap");
    let pcap_s = pcap.display().to_string();

    let frames = disallowed(
        mac(&lab.remote, "wan0").unwrap(),
        mac(&lab.edge, EDGE_EXT).unwrap(),
    );
    let n = frames.len().to_string();
    let mut want: Vec<String> = frames
        .iter()
        .map(|(_, p, s, d)| {
            key(
                p,
                &s.ip().to_string(),
                s.port() as u64,
                &d.ip().to_string(),
                d.port() as u64,
            )
        })
        .collect();
    want.sort();
    let sender = RawSender::open(&lab.remote, "wan0").expect("raw sender");

    // Through the daemon's HTTP endpoint: the same events as JSON lines, then a summary.
    let ext = ifindex_of(&lab.edge, EDGE_EXT);
    let maps = || Maps::open_pinned(&Instance::new(&instance).unwrap().maps_dir()).unwrap();
    let ns = lab.edge.clone();
    let path = format!("/events?reason=no_rule&iface={EDGE_EXT}&count={n}&duration=20");
    let remote = std::thread::spawn(move || http_get(&ns, METRICS, path));
    let deadline = Instant::now() + Duration::from_secs(10);
    while maps().iface(ext).unwrap().monitors == 0 {
        assert!(
            Instant::now() < deadline,
            "/events never attached a monitor"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    for (f, ..) in &frames {
        sender.send(f).expect("send");
    }
    let body = remote.join().expect("/events");
    let mut lines: Vec<serde_json::Value> = body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let summary = lines.pop().expect("a summary line");
    assert_eq!(summary["summary"]["shown"], frames.len(), "{body}");
    assert_eq!(summary["summary"]["lost_rate_limit"], 0, "{body}");
    let mut got: Vec<String> = lines.iter().map(event_key).collect();
    got.sort();
    assert_eq!(got, want, "/events saw exactly the frames sent: {body}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while maps().iface(ext).unwrap().monitors != 0 {
        assert!(
            Instant::now() < deadline,
            "/events left its monitor bit behind"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // The daemon down (the instance stays attached): `monitor` reads the pins alone.
    drop(daemon);
    let all = start_monitor(
        &lab.edge,
        &instance,
        &["--json", "--count", &n, "--duration", "30"],
    );
    let written = start_monitor(
        &lab.edge,
        &instance,
        &["--write", &pcap_s, "--count", &n, "--duration", "30"],
    );
    let ssh = start_monitor(
        &lab.edge,
        &instance,
        &[
            "--json",
            "--reason",
            "no_rule",
            "--iface",
            EDGE_EXT,
            "--duration",
            "6",
            "tcp",
            "dst",
            "port",
            "22",
        ],
    );

    for (f, ..) in &frames {
        sender.send(f).expect("send");
    }

    // The JSON monitor: every frame once, with its 5-tuple and reason.
    let (lines, err) = all.finish(Duration::from_secs(30));
    let mut got: Vec<String> = lines
        .iter()
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            assert_eq!(v["verdict"], "drop", "{l}");
            assert_eq!(v["reason"], "no_rule", "{l}: all lines {lines:#?}");
            assert_eq!(v["iface"], EDGE_EXT, "{l}");
            assert_eq!(v["direction"], "in", "{l}");
            event_key(&v)
        })
        .collect();
    got.sort();
    assert_eq!(got, want, "monitor --json saw exactly the frames sent");
    assert!(
        err.iter()
            .any(|l| l.contains(&format!("{n} events shown")) && l.contains(" 0 missed")),
        "summary: {err:?}"
    );

    // The pcap: the sent bytes (256 at most) with the length on the wire, in tshark too.
    written.finish(Duration::from_secs(30));
    let file = std::fs::File::open(&pcap).expect("pcap written");
    let mut reader = pcap_file::pcap::PcapReader::new(file).expect("pcap header");
    let mut recorded = Vec::new();
    while let Some(p) = reader.next_packet() {
        let p = p.expect("pcap record");
        recorded.push((p.data.to_vec(), p.orig_len));
    }
    let mut sent: Vec<(Vec<u8>, u32)> = frames
        .iter()
        .map(|(f, ..)| (f[..f.len().min(256)].to_vec(), f.len() as u32))
        .collect();
    recorded.sort();
    sent.sort();
    assert_eq!(
        recorded, sent,
        "the pcap holds the sent frames' bytes and lengths"
    );
    let tshark = std::process::Command::new("tshark")
        .args([
            "-r",
            &pcap_s,
            "-T",
            "fields",
            "-e",
            "frame.len",
            "-e",
            "frame.cap_len",
        ])
        .output()
        .expect("tshark");
    assert!(
        tshark.status.success(),
        "tshark: {}",
        String::from_utf8_lossy(&tshark.stderr)
    );
    let mut lens: Vec<String> = String::from_utf8_lossy(&tshark.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    let mut want_lens: Vec<String> = frames
        .iter()
        .map(|(f, ..)| format!("{}\t{}", f.len(), f.len().min(256)))
        .collect();
    lens.sort();
    want_lens.sort();
    assert_eq!(lens, want_lens, "tshark reads the pcap's lengths");

    // The filtered monitor: the five TCP frames to port 22 alone.
    let (lines, err) = ssh.finish(Duration::from_secs(30));
    let mut got: Vec<u64> = lines
        .iter()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["dport"], 22, "{l}");
            v["sport"].as_u64().unwrap()
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        (40000..40005).collect::<Vec<u64>>(),
        "filter `tcp dst port 22`"
    );
    assert!(
        err.iter()
            .any(|l| l.contains(&format!("{} not matching the filter", frames.len() - 5))),
        "the kernel selected all of them, the filter kept five: {err:?}"
    );
}

fn ifindex_of(ns: &str, dev: &str) -> u32 {
    let dev = dev.to_string();
    in_netns(ns, move || {
        let name = std::ffi::CString::new(dev)?;
        Ok(unsafe { libc::if_nametoindex(name.as_ptr()) })
    })
    .unwrap()
}

#[test]
fn egress_and_rule_events_four_monitors_and_a_killed_one_leaves_nothing() {
    let lab = Lab::create("mon2").expect("lab");
    let instance = format!("mon2{}", std::process::id());
    let _stop = Stop(instance.clone());
    let _daemon = start_on_ext0(&lab.edge, &instance, None);
    let _listeners = Listeners::start(&lab.edge, &[5061], &[]).expect("listeners");
    let ext = ifindex_of(&lab.edge, EDGE_EXT);
    let maps = || Maps::open_pinned(&Instance::new(&instance).unwrap().maps_dir()).unwrap();
    assert_eq!(maps().iface(ext).unwrap().monitors, 0, "no monitor yet");

    // The Edge's SYN-ACK to an allowed connection: an egress pass from the TC program.
    let egress = start_monitor(
        &lab.edge,
        &instance,
        &[
            "--json",
            "--verdict",
            "pass",
            "--reason",
            "egress_inbound_reply",
            "--count",
            "1",
            "--duration",
            "20",
        ],
    );
    // The allowed SYN itself, selected by its rule in the kernel.
    let by_rule = start_monitor(
        &lab.edge,
        &instance,
        &[
            "--json",
            "--verdict",
            "pass",
            "--rule",
            "public-im-sip-in",
            "--count",
            "1",
            "--duration",
            "20",
        ],
    );
    let others: Vec<Mon> = (0..2)
        .map(|_| start_monitor(&lab.edge, &instance, &["--duration", "60"]))
        .collect();
    assert_eq!(
        maps().iface(ext).unwrap().monitors,
        0b1111,
        "four slots watch ext0"
    );
    let (code, _, err) = {
        let out = in_ns(&lab.edge, BIN)
            .args(["monitor", "--instance", &instance, "--duration", "1"])
            .output()
            .unwrap();
        (
            out.status.code(),
            out.stdout,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert_ne!(code, Some(0));
    assert!(
        err.contains("monitor slots") && err.contains("in use"),
        "{err}"
    );

    assert!(
        tcp_connect(
            &lab.remote,
            PARTNER_V4,
            SocketAddr::new(EDGE_EXT_V4, 5061),
            Duration::from_secs(3)
        )
        .unwrap()
    );
    let (lines, _) = egress.finish(Duration::from_secs(20));
    assert_eq!(lines.len(), 1, "{lines:?}");
    let v: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(v["direction"], "out", "{v}");
    assert_eq!(v["verdict"], "pass", "{v}");
    assert_eq!(v["reason"], "egress_inbound_reply", "{v}");
    assert_eq!(v["protocol"], "tcp", "{v}");
    assert_eq!(v["sport"], 5061, "{v}");
    assert_eq!(v["dst"], PARTNER_V4.to_string(), "{v}");
    let (lines, _) = by_rule.finish(Duration::from_secs(20));
    assert_eq!(lines.len(), 1, "{lines:?}");
    let v: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(v["direction"], "in", "{v}");
    assert_eq!(v["verdict"], "pass", "{v}");
    assert_eq!(v["rule"], "public-im-sip-in", "{v}");
    assert_eq!(v["dport"], 5061, "{v}");
    assert_eq!(v["src"], PARTNER_V4.to_string(), "{v}");
    // Their slots' bits went with them.
    assert_eq!(maps().iface(ext).unwrap().monitors.count_ones(), 2);

    // SIGKILL: no chance to clean up. The NIC's frames go on (one every 50 ms); each CPU that
    // handles them sees the lease's count stop and, 3 s after the last renewal, clears the bit: the killed
    // monitor costs nothing more and the slot is free for the next monitor.
    let mut killed = others;
    let victim = killed.remove(0);
    unsafe { libc::kill(victim.proc.pid(), libc::SIGKILL) };
    let killed_at = Instant::now();
    let sender = RawSender::open(&lab.remote, "wan0").unwrap();
    let frame = disallowed(
        mac(&lab.remote, "wan0").unwrap(),
        mac(&lab.edge, EDGE_EXT).unwrap(),
    )
    .remove(0)
    .0;
    while maps().iface(ext).unwrap().monitors.count_ones() != 1 {
        assert!(
            killed_at.elapsed() < Duration::from_secs(10),
            "the killed monitor's bit is still set"
        );
        sender.send(&frame).unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    let cleared = killed_at.elapsed();
    // The lease runs from the last renewal, made at most a second before the kill.
    assert!(
        cleared >= Duration::from_secs(2),
        "cleared after {cleared:?}, before the lease could pass"
    );
    eprintln!("the killed monitor's bit was cleared {cleared:?} after SIGKILL");
    drop(killed);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        maps().iface(ext).unwrap().monitors,
        0,
        "nothing left behind"
    );
    let again = start_monitor(&lab.edge, &instance, &["--duration", "1"]);
    again.finish(Duration::from_secs(10));
    assert_eq!(maps().iface(ext).unwrap().monitors, 0);

    // `stop` takes the slots' lock files with the rest of the instance.
    let slot0 = Instance::new(&instance).unwrap().monitor_lock(0);
    assert!(slot0.exists(), "{} was made", slot0.display());
    let (ok, _, err) = cli(&["stop", "--instance", &instance]);
    assert!(ok, "stop: {err}");
    assert!(!slot0.exists(), "{} outlived stop", slot0.display());
}

/// `trafgen`'s configuration for one UDP frame from the partner to a port no rule opens.
fn trafgen_conf(remote_mac: [u8; 6], edge_mac: [u8; 6]) -> String {
    let mac = |m: [u8; 6]| {
        m.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    format!(
        "{{\n  eth(da={}, sa={}),\n  ipv4(saddr={}, daddr={}, ttl=64),\n  udp(sp=40000, dp={FORBIDDEN_UDP}),\n  fill(0x5a, 18)\n}}\n",
        mac(edge_mac),
        mac(remote_mac),
        PARTNER_V4,
        EDGE_EXT_V4
    )
}

fn dropped_no_rule(text: &str) -> f64 {
    metric(
        text,
        "edge_classifier_dropped_packets_total",
        &[("reason", "no_rule"), ("interface", EDGE_EXT)],
    )
    .unwrap_or(0.0)
}

fn lost_metric(text: &str) -> f64 {
    ["rate_limit", "ring_full"]
        .iter()
        .map(|r| {
            metric(
                text,
                "edge_classifier_monitor_events_lost_total",
                &[("reason", r)],
            )
            .unwrap_or_else(|| panic!("no monitor loss series {r} in {text}"))
        })
        .sum()
}

/// What one flood showed.
struct Flood {
    time: Duration,
    /// Flood frames XDP dropped (its `no_rule` counter on ext0).
    dropped: u64,
    /// Events the monitor wrote to its pcap.
    received: u64,
    /// What the monitor said it missed.
    missed: u64,
    /// The loss metric's increase.
    lost_metric: u64,
    /// The slowest /metrics answer during the flood.
    slowest: Duration,
}

/// `frames` frames from the remote host (trafgen, bounded in frames and by a 60 s timeout) with
/// a monitor of `rate` events a second attached, writing a pcap; `stalled`: the monitor is
/// stopped (SIGSTOP) while the flood runs, as a monitor on a starved CPU would be.
fn flood(
    lab: &Lab,
    instance: &str,
    dir: &std::path::Path,
    frames: u64,
    rate: u32,
    stalled: bool,
) -> Flood {
    let conf = dir.join("flood.cfg");
    std::fs::write(
        &conf,
        trafgen_conf(
            mac(&lab.remote, "wan0").unwrap(),
            mac(&lab.edge, EDGE_EXT).unwrap(),
        ),
    )
    .unwrap();
    let pcap = dir.join(format!("flood-{rate}.pcap"));
    let before = http_get(&lab.edge, METRICS, "/metrics".to_string());
    let veth_before = veth_drops(&lab.remote, "wan0") + veth_drops(&lab.edge, EDGE_EXT);
    let mon = start_monitor(
        &lab.edge,
        instance,
        &[
            "--reason",
            "no_rule",
            "--iface",
            EDGE_EXT,
            "--write",
            &pcap.display().to_string(),
            "--duration",
            "60",
            "--rate",
            &rate.to_string(),
        ],
    );

    if stalled {
        unsafe { libc::kill(mon.proc.pid(), libc::SIGSTOP) };
    }
    let started = Instant::now();
    let conf_s = conf.display().to_string();
    let trafgen = std::thread::spawn({
        let ns = lab.remote.clone();
        move || {
            // The qdisc path: the sender waits for the veth rather than losing frames. A rate
            // makes trafgen send frame by frame (a blocking sendto): its TX ring, used without
            // one, gives up with EAGAIN ("Flushing TX_RING failed") whenever the socket's send
            // buffer is full as a flush starts, which a busy host makes likely. 2 Mpps is beyond
            // what one core sends here, so the veth is still the limit.
            in_ns(&ns, "timeout")
                .args([
                    "60", "taskset", "-c", "1", "trafgen", "--dev", "wan0", "--conf",
                ])
                .args([
                    &conf_s,
                    "--num",
                    &frames.to_string(),
                    "--cpus",
                    "1",
                    "--qdisc-path",
                    "--rate",
                    "2000000pps",
                ])
                .output()
                .expect("trafgen")
        }
    });
    // The daemon answers while the flood runs.
    let mut slowest = Duration::ZERO;
    while !trafgen.is_finished() {
        let t = Instant::now();
        let text = http_get(&lab.edge, METRICS, "/metrics".to_string());
        assert!(text.contains("edge_classifier_monitors 1"), "{text}");
        slowest = slowest.max(t.elapsed());
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = trafgen.join().unwrap();
    let time = started.elapsed();
    assert!(
        out.status.success(),
        "trafgen: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Every flood frame that reached ext0 was dropped, and there was no other.
    let after = http_get(&lab.edge, METRICS, "/metrics".to_string());
    let dropped = (dropped_no_rule(&after) - dropped_no_rule(&before)) as u64;
    let veth_lost = veth_drops(&lab.remote, "wan0") + veth_drops(&lab.edge, EDGE_EXT) - veth_before;
    assert_eq!(
        dropped + veth_lost,
        frames,
        "trafgen sent {frames}; XDP dropped {dropped}, the veth pair lost {veth_lost}"
    );

    if stalled {
        unsafe { libc::kill(mon.proc.pid(), libc::SIGCONT) };
    }
    // Let the monitor drain its ring, then stop it as an operator would (Ctrl-C).
    std::thread::sleep(Duration::from_millis(500));
    unsafe { libc::kill(mon.proc.pid(), libc::SIGINT) };
    let (_, err) = mon.finish(Duration::from_secs(20));
    let mut reader = pcap_file::pcap::PcapReader::new(std::fs::File::open(&pcap).unwrap()).unwrap();
    let mut received = 0u64;
    while let Some(p) = reader.next_packet() {
        p.expect("pcap record");
        received += 1;
    }
    let summary = err
        .iter()
        .find(|l| l.contains("events shown"))
        .unwrap_or_else(|| panic!("no summary: {err:?}"));
    assert!(
        summary.starts_with(&format!("monitor: {received} events shown")),
        "{summary}"
    );
    // "… N not matching the filter, M missed (rate_limit …, ring_full …)".
    let missed: u64 = summary
        .split(", ")
        .find_map(|p| {
            p.split_once(" missed")
                .and_then(|(n, _)| n.trim().parse().ok())
        })
        .unwrap_or_else(|| panic!("no missed count in {summary}"));
    let lost_metric = (lost_metric(&http_get(&lab.edge, METRICS, "/metrics".to_string()))
        - lost_metric(&before)) as u64;
    eprintln!(
        "flood at --rate {rate}: {frames} frames in {time:?}, {dropped} dropped by XDP; monitor received {received}, {summary}; /metrics at worst {slowest:?}"
    );
    Flood {
        time,
        dropped,
        received,
        missed,
        lost_metric,
        slowest,
    }
}

/// A flood of 1,000,000 frames with a monitor attached: the daemon answers /metrics
/// throughout, the data plane drops every flood frame, and what the monitor did not get is
/// exactly what the loss counters (its own summary and the metric) say it missed, under the
/// default rate limit; then with no practical limit, where the ring fills and that is counted
/// the same way.
#[test]
fn a_flood_with_a_monitor_attached_is_dropped_and_its_losses_counted() {
    let lab = Lab::create("monf").expect("lab");
    let instance = format!("monf{}", std::process::id());
    let _stop = Stop(instance.clone());
    let _daemon = start_on_ext0(&lab.edge, &instance, None);
    let dir = TempDir::new("monflood");

    let f = flood(&lab, &instance, &dir.0, 1_000_000, 10_000, false);
    assert!(
        f.slowest < Duration::from_secs(2),
        "/metrics took {:?}",
        f.slowest
    );
    assert_eq!(f.dropped, 1_000_000, "the veth pair lost none of the flood");
    assert_eq!(f.missed, f.dropped - f.received, "missed = sent - received");
    assert_eq!(f.lost_metric, f.missed, "the metric counts the same losses");
    // The rate limit held: 10,000 events a second (all CPUs), per one-second window.
    let windows = f.time.as_secs_f64().ceil() as u64 + 1;
    assert!(
        f.received <= 10_000 * windows,
        "{} events in {:?}",
        f.received,
        f.time
    );
    assert!(f.received > 0, "the monitor saw the flood");

    // No practical rate limit: the monitor keeps up or the ring fills, counted alike.
    let f = flood(&lab, &instance, &dir.0, 300_000, 100_000_000, false);
    assert!(
        f.slowest < Duration::from_secs(2),
        "/metrics took {:?}",
        f.slowest
    );
    assert_eq!(f.missed, f.dropped - f.received, "missed = sent - received");
    assert_eq!(f.lost_metric, f.missed, "the metric counts the same losses");
    assert!(f.received > 0, "the monitor saw the flood");

    // The monitor stalled: the ring (1 MiB, 296 bytes a record) fills and the rest is lost as
    // ring_full, every one of them counted.
    let f = flood(&lab, &instance, &dir.0, 100_000, 100_000_000, true);
    assert_eq!(f.missed, f.dropped - f.received, "missed = sent - received");
    assert_eq!(f.lost_metric, f.missed, "the metric counts the same losses");
    let ring = (1 << 20)
        / (std::mem::size_of::<edge_classifier_common::monitor::MonitorEvent>() as u64 + 8);
    assert_eq!(
        f.received, ring,
        "a stalled monitor gets what its ring holds"
    );
}

/// Frames the veth driver dropped on `dev` (its peer's ring full), from its statistics.
fn veth_drops(ns: &str, dev: &str) -> u64 {
    let out = std::process::Command::new("ip")
        .args(["-n", ns, "-s", "-j", "link", "show", "dev", dev])
        .output()
        .expect("ip -s link");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j");
    let s = &v[0]["stats64"];
    s["tx"]["dropped"].as_u64().unwrap_or(0) + s["rx"]["dropped"].as_u64().unwrap_or(0)
}
