//! Faults around the flip, under a stream of allowed and forbidden datagrams: the state file
//! deleted, truncated or garbage; the `ACTIVE` pin removed; reloads killed at random instants
//! with a full flow table. The kernel's record is the truth: every `run`, `reload`, `status`
//! and `/metrics` goes by it, no forbidden datagram is delivered, no allowed one is lost, and
//! the state always names the catalogue the kernel runs. Root, on a namespace lab.

mod common;

use std::{
    net::{SocketAddr, UdpSocket},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use common::*;
use edge_classifier::{
    catalogue::DEFAULT_CATALOGUE,
    instance::{Instance, Loaded},
    maps::Maps,
};
use edge_classifier_lab::*;

/// P6 (UDP 3478 from anyone) is allowed by every catalogue here; UDP 9999 by none.
const ALLOWED: u16 = 3478;
const FORBIDDEN: u16 = 9999;

/// Datagrams from the remote host to the Edge, alternating allowed and forbidden, every 500 µs
/// until stopped; counts what it sent.
struct Stream {
    stop: Arc<AtomicBool>,
    sent: Arc<[AtomicU64; 2]>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Stream {
    fn start(lab: &Lab) -> Stream {
        let stop = Arc::new(AtomicBool::new(false));
        let sent: Arc<[AtomicU64; 2]> = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
        let (ns, s2, c2) = (lab.remote.clone(), stop.clone(), sent.clone());
        let thread = std::thread::spawn(move || {
            enter_netns(&ns).expect("remote namespace");
            let sock = UdpSocket::bind(SocketAddr::new(CLIENT_V4, 0)).expect("bind");
            while !s2.load(Ordering::Relaxed) {
                for (i, port) in [ALLOWED, FORBIDDEN].into_iter().enumerate() {
                    if sock
                        .send_to(b"probe", SocketAddr::new(EDGE_EXT_V4, port))
                        .is_ok()
                    {
                        c2[i].fetch_add(1, Ordering::Relaxed);
                    }
                }
                std::thread::sleep(Duration::from_micros(500));
            }
        });
        Stream {
            stop,
            sent,
            thread: Some(thread),
        }
    }

    /// Stops sending; (allowed, forbidden) datagrams sent.
    fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        (
            self.sent[0].load(Ordering::Relaxed),
            self.sent[1].load(Ordering::Relaxed),
        )
    }
}

/// Waits until the edge's listeners stop receiving, then checks the stream's outcome.
fn assert_stream(listeners: &Listeners, sent: (u64, u64), what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while listeners.udp(ALLOWED).datagrams.len() < sent.0 as usize && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(200));
    let got = listeners.udp(ALLOWED).datagrams.len() as u64;
    let leaked = listeners.udp(FORBIDDEN).datagrams.len();
    assert_eq!(leaked, 0, "{what}: forbidden datagrams delivered");
    assert_eq!(
        got, sent.0,
        "{what}: allowed datagrams delivered vs sent (none may be lost)"
    );
    assert!(sent.1 > 100, "{what}: only {} forbidden sent", sent.1);
}

/// The catalogue the kernel runs, read from the pins alone: the active buffer's record.
fn kernel_catalogue(instance: &str) -> Loaded {
    let i = Instance::new(instance).unwrap();
    let maps = Maps::open_pinned(&i.maps_dir()).expect("pinned maps");
    let active = maps.active().unwrap();
    let d = maps
        .read_description(active)
        .unwrap()
        .expect("the active buffer is recorded");
    serde_json::from_slice(&d).unwrap()
}

fn sha256(text: &str) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `status --json` of `instance` (the daemon may be down).
fn status(ns: &str, instance: &str) -> serde_json::Value {
    let out = in_ns(ns, BIN)
        .args(["status", "--instance", instance, "--json"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "status --json: {e}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn metrics_hash(ns: &str) -> String {
    let text = http_get(ns, METRICS, "/metrics".into());
    let line = text
        .lines()
        .find(|l| l.starts_with("edge_classifier_catalogue_info{"))
        .unwrap_or_else(|| panic!("no catalogue_info: {text}"));
    let at = line.find("hash=\"").expect("hash label") + 6;
    line[at..at + 64].to_string()
}

fn p6_packets(ns: &str) -> f64 {
    let text = http_get(ns, METRICS, "/metrics".into());
    metric(
        &text,
        "edge_classifier_rule_packets_total",
        &[("rule", "messenger-stun-in"), ("interface", EDGE_EXT)],
    )
    .unwrap_or_else(|| panic!("no P6 series: {text}"))
}

/// Two catalogues that differ (P3 on 443 or on 8443) and both allow P6.
fn catalogues(dir: &std::path::Path) -> [String; 2] {
    let a = dir.join("a.toml");
    let b = dir.join("b.toml");
    std::fs::write(&a, DEFAULT_CATALOGUE).unwrap();
    std::fs::write(
        &b,
        DEFAULT_CATALOGUE.replacen("port = 443\n", "port = 8443\n", 1),
    )
    .unwrap();
    [a, b].map(|p| p.display().to_string())
}

fn workdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("ec-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn a_lost_or_broken_state_file_changes_nothing() {
    let lab = Lab::create("sf").expect("lab");
    let instance = format!("sf{}", std::process::id());
    let _stop = Stop(instance.clone());
    let dir = workdir("sf");
    let [a, b] = catalogues(&dir);
    let listeners = Listeners::start(&lab.edge, &[], &[ALLOWED, FORBIDDEN]).expect("listeners");
    let run = |cat: Option<&str>| start_on_ext0(&lab.edge, &instance, cat);
    let daemon = run(Some(&a));
    let stream = Stream::start(&lab);
    // Buffer 1 active, so that a state rebuilt wrongly (or a fresh ACTIVE word) would show.
    let (ok, _, err) = cli(&["reload", "--instance", &instance, "--catalogue", &b]);
    assert!(ok, "reload: {err}");
    let b_hash = sha256(&std::fs::read_to_string(&b).unwrap());
    // A flow the Edge opened (S1): it must outlive every restart below. Nobody listens on
    // the remote side; the SYN going out is what records the flow.
    let _ = tcp_exchange(
        &lab.edge,
        SocketAddr::new(EDGE_EXT_V4, 0),
        SocketAddr::new(CLIENT_V4, 5061),
        Duration::from_millis(300),
    );
    let flows = || {
        Maps::open_pinned(&Instance::new(&instance).unwrap().maps_dir())
            .unwrap()
            .flows()
            .unwrap()
            .into_iter()
            .filter(|f| f.remote().port() == 5061)
            .count()
    };
    assert!(flows() >= 1, "the S1 flow is recorded");
    drop(daemon);
    let state_file = Instance::new(&instance).unwrap().state_file();
    let mut counted = 0.0;
    for (fault, damage) in [
        ("deleted", None),
        ("truncated", Some(&b"{\"layout\": 3, \"gener"[..])),
        ("garbage", Some(&b"\x00\xffnot json at all"[..])),
    ] {
        match damage {
            None => std::fs::remove_file(&state_file).unwrap(),
            Some(bytes) => std::fs::write(&state_file, bytes).unwrap(),
        }
        // Read while the daemon is down: status and the kernel agree on B.
        let st = status(&lab.edge, &instance);
        assert_eq!(
            st["catalogue"]["sha256"], b_hash,
            "{fault}: status names the running catalogue: {st:#}"
        );
        // run without --catalogue adopts what the kernel runs, not the embedded default.
        let daemon = run(None);
        assert_eq!(metrics_hash(&lab.edge), b_hash, "{fault}: /metrics");
        assert_eq!(sha256(&kernel_catalogue(&instance).text), b_hash, "{fault}");
        let p6 = p6_packets(&lab.edge);
        assert!(p6 >= counted, "{fault}: counters kept ({p6} < {counted})");
        assert!(flows() >= 1, "{fault}: flows kept");
        counted = p6;
        drop(daemon);
    }
    // A reload with the state file garbage works, and says so in the kernel and the file.
    std::fs::write(&state_file, b"garbage").unwrap();
    let (ok, _, err) = cli(&["reload", "--instance", &instance, "--catalogue", &a]);
    assert!(ok, "reload over a garbage state file: {err}");
    assert_eq!(
        sha256(&kernel_catalogue(&instance).text),
        sha256(DEFAULT_CATALOGUE)
    );
    let file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state_file).unwrap()).unwrap();
    assert_eq!(file["reloads"]["succeeded"], 2, "{file:#}");
    let sent = stream.finish();
    assert_stream(&listeners, sent, "state file faults");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_lost_active_pin_is_pointed_back_at_the_running_buffer() {
    let lab = Lab::create("ap").expect("lab");
    let instance = format!("ap{}", std::process::id());
    let _stop = Stop(instance.clone());
    let dir = workdir("ap");
    let [a, b] = catalogues(&dir);
    let listeners = Listeners::start(&lab.edge, &[], &[ALLOWED, FORBIDDEN]).expect("listeners");
    let daemon = start_on_ext0(&lab.edge, &instance, Some(&a));
    let stream = Stream::start(&lab);
    let (ok, _, err) = cli(&["reload", "--instance", &instance, "--catalogue", &b]);
    assert!(ok, "reload: {err}");
    drop(daemon);
    let i = Instance::new(&instance).unwrap();
    std::fs::remove_file(i.map_pin("ACTIVE")).unwrap();
    let daemon = start_on_ext0(&lab.edge, &instance, None);
    let b_hash = sha256(&std::fs::read_to_string(&b).unwrap());
    assert_eq!(
        metrics_hash(&lab.edge),
        b_hash,
        "after the ACTIVE pin was lost"
    );
    assert_eq!(sha256(&kernel_catalogue(&instance).text), b_hash);
    assert!(i.map_pin("ACTIVE").exists(), "ACTIVE pinned again");
    // B moved P3 to 8443: the kernel runs B, 443 is closed and 8443 open.
    let x = tcp_exchange(
        &lab.remote,
        SocketAddr::new(CLIENT_V4, 0),
        SocketAddr::new(EDGE_EXT_V4, 443),
        Duration::from_millis(300),
    )
    .unwrap();
    assert!(!x.connected, "443 must be closed under B");
    drop(daemon);
    let sent = stream.finish();
    assert_stream(&listeners, sent, "ACTIVE pin lost");
    std::fs::remove_dir_all(&dir).ok();
}

/// Reloads killed (SIGKILL) at random instants, alternating two catalogues, with a full flow
/// table (so a reload spends a while purging after its flip): after each, the state, `/metrics`
/// and the kernel name the same catalogue; then a plain reload completes.
#[test]
fn reloads_killed_at_random_instants_leave_state_and_kernel_agreeing() {
    let kills: usize = std::env::var("EC_RELOAD_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let lab = Lab::create("rk").expect("lab");
    let instance = format!("rk{}", std::process::id());
    let _stop = Stop(instance.clone());
    let dir = workdir("rk");
    let cats = catalogues(&dir);
    let listeners = Listeners::start(&lab.edge, &[], &[ALLOWED, FORBIDDEN]).expect("listeners");
    let daemon = start_on_ext0(&lab.edge, &instance, Some(&cats[0]));
    // A full flow table: flows of S1, which both catalogues keep, so they survive every purge
    // and every purge walks them all.
    let i = Instance::new(&instance).unwrap();
    {
        let mut maps = Maps::open_pinned(&i.maps_dir()).unwrap();
        let slot = kernel_catalogue(&instance).assignments.slots["sip-federation-out"];
        let capacity = maps.flow_capacity().unwrap();
        for n in 0..capacity {
            let mut key = edge_classifier_common::FlowKey {
                family: 4,
                transport: 0,
                local_port: (n % 60000) as u16 + 1024,
                remote_port: 5061,
                ..Default::default()
            };
            key.local[..4].copy_from_slice(&[198, 51, 100, 10]);
            key.remote[..4].copy_from_slice(&(0x0a00_0000u32 + n / 60000).to_be_bytes());
            let state = edge_classifier_common::FlowState {
                last_seen: u64::MAX / 2,
                slot,
                flags: 0,
                role_mask: 1,
                _pad: 0,
            };
            maps.insert_flow(&key, &state).unwrap();
        }
    }
    let stream = Stream::start(&lab);
    let mut rng = 0x5eed_u64 ^ std::process::id() as u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let hashes = [
        sha256(&std::fs::read_to_string(&cats[0]).unwrap()),
        sha256(&std::fs::read_to_string(&cats[1]).unwrap()),
    ];
    let mut killed_after_flip = 0;
    for k in 0..kills {
        let cat = &cats[k % 2];
        let mut child = Command::new(BIN)
            .args(["reload", "--instance", &instance, "--catalogue", cat])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_micros(next() % 600_000));
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        let _ = child.wait();
        let running = sha256(&kernel_catalogue(&instance).text);
        assert!(hashes.contains(&running), "kill {k}: kernel runs {running}");
        if running == hashes[k % 2] {
            killed_after_flip += 1;
        }
        let st = status(&lab.edge, &instance);
        assert_eq!(
            st["catalogue"]["sha256"], running,
            "kill {k}: status names what the kernel runs"
        );
    }
    // The daemon follows within its refresh.
    std::thread::sleep(Duration::from_millis(1500));
    let running = sha256(&kernel_catalogue(&instance).text);
    assert_eq!(metrics_hash(&lab.edge), running, "/metrics after the kills");
    // A plain reload completes whatever was left half done.
    let (ok, out, err) = cli(&["reload", "--instance", &instance, "--catalogue", &cats[0]]);
    assert!(ok, "reload after the kills: {out}{err}");
    assert_eq!(sha256(&kernel_catalogue(&instance).text), hashes[0]);
    let st = status(&lab.edge, &instance);
    assert_eq!(st["catalogue"]["sha256"], hashes[0]);
    drop(daemon);
    let sent = stream.finish();
    assert_stream(&listeners, sent, "killed reloads");
    eprintln!(
        "{kills} reloads killed, {killed_after_flip} of them after their flip; {} allowed and {} forbidden datagrams sent",
        sent.0, sent.1
    );
    assert!(
        killed_after_flip > 0 && killed_after_flip < kills,
        "the kills must land on both sides of the flip: {killed_after_flip} of {kills}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
