//! What the root-only tests of the binary share: processes that stop with the test, the daemon
//! started in a lab namespace, and HTTP from inside a namespace.
#![allow(dead_code)]

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use edge_classifier_lab::{Lab, in_netns};
use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_edge-classifier");
pub const METRICS: &str = "127.0.0.1:9477";

/// A child process stopped (SIGTERM, then waited for) when the test ends, also on panic.
pub struct Process(pub Child, pub &'static str);

impl Process {
    pub fn pid(&self) -> i32 {
        self.0.id() as i32
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.0.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            eprintln!("{} did not stop on SIGTERM; killing it", self.1);
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Stops instance `.0` when the test ends, also on panic: no pins or attachment outlive a test.
pub struct Stop(pub String);

impl Drop for Stop {
    fn drop(&mut self) {
        let _ = cli(&["stop", "--instance", &self.0]);
    }
}

/// A fresh directory under the system's temporary directory, removed when the test ends, also
/// on panic.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    /// `ec-{tag}-{pid}`, emptied first (a leftover of a killed run of the same pid).
    pub fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("ec-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the test's directory");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `program` inside namespace `ns`. nsenter, not `ip netns exec`: the latter remounts /sys
/// and would hide the host's /sys/fs/bpf, where the daemon pins.
pub fn in_ns(ns: &str, program: &str) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net={}", Lab::netns_path(ns))).arg(program);
    c
}

/// `edge-classifier run ARGS` in `ns`, returned once it printed `ready`.
pub fn start_daemon(ns: &str, args: &[&str]) -> Process {
    let mut child = in_ns(ns, BIN)
        .arg("run")
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start edge-classifier");
    let stdout = child.stdout.take().expect("daemon stdout");
    let proc = Process(child, "edge-classifier");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line == "ready" {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("edge-classifier {args:?} did not print `ready`"));
    proc
}

/// `run` for `instance` on the lab's external NIC (`ext0=external`), metrics on `METRICS`,
/// with `catalogue` (or, without, the one the instance runs), once ready.
pub fn start_on_ext0(ns: &str, instance: &str, catalogue: Option<&str>) -> Process {
    let mut args = vec![
        "--instance",
        instance,
        "--metrics",
        METRICS,
        "--iface",
        "ext0=external",
    ];
    if let Some(c) = catalogue {
        args.extend(["--catalogue", c]);
    }
    start_daemon(ns, &args)
}

/// The binary with `args`, in the host namespace; (success, stdout, stderr).
pub fn cli(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .output()
        .expect("run edge-classifier");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// GET `http://{addr}{path}` from inside `ns`; the body.
pub fn http_get(ns: &str, addr: &'static str, path: String) -> String {
    let shown = path.clone();
    in_netns(ns, move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(10)))
            .http_status_as_error(false)
            .build()
            .into();
        let url = format!("http://{addr}{path}");
        Ok(agent.get(&url).call()?.body_mut().read_to_string()?)
    })
    .unwrap_or_else(|e| panic!("GET {addr}{shown}: {e:#}"))
}

/// The value of the one series of `/metrics` text whose line starts with `name{` and holds
/// every `label="value"` of `labels`.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let prefix = format!("{name}{{");
    text.lines()
        .filter(|l| {
            l.starts_with(&prefix) || (labels.is_empty() && l.starts_with(&format!("{name} ")))
        })
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// `run ARGS` in `ns` with stdout going to `stdout`, waiting for nothing: the process and its
/// stderr lines, so far and to come.
pub fn spawn_logged(
    ns: &str,
    args: &[&str],
    stdout: Stdio,
) -> (Process, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let mut child = in_ns(ns, BIN)
        .arg("run")
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start edge-classifier");
    let stderr = child.stderr.take().expect("stderr");
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        for l in BufReader::new(stderr).lines().map_while(Result::ok) {
            // A test that panicked while reading the lines poisoned them: keep collecting.
            sink.lock().unwrap_or_else(|e| e.into_inner()).push(l);
        }
    });
    (Process(child, "edge-classifier"), lines)
}

/// The first of `lines` that satisfies `pred`, waiting up to `timeout` for it; panics naming
/// `what` and showing the lines.
pub fn wait_line(
    lines: &std::sync::Mutex<Vec<String>>,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(l) = lines.lock().unwrap().iter().find(|l| pred(l)) {
            return l.clone();
        }
        if Instant::now() > deadline {
            let seen = lines.lock().unwrap().clone();
            panic!("no log line {what} in {seen:#?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// UDP the default catalogue allows to the Edge's external address from anyone (P6, STUN 3478),
/// and a port no rule opens.
pub const ALLOWED_UDP: u16 = 3478;
pub const FORBIDDEN_UDP: u16 = 9999;

/// Datagrams from the lab's remote host (`CLIENT_V4`) to the Edge's external address,
/// alternating allowed and forbidden, every 500 µs until finished; counts those the remote's
/// stack took (a send while the NIC is gone fails and is not counted). Listen for them with
/// `Listeners` on `ALLOWED_UDP` and `FORBIDDEN_UDP`: what they receive passed XDP.
pub struct Datagrams {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    sent: std::sync::Arc<[std::sync::atomic::AtomicU64; 2]>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Datagrams {
    pub fn start(lab: &Lab) -> Datagrams {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let sent = std::sync::Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
        let (ns, s2, c2) = (lab.remote.clone(), stop.clone(), sent.clone());
        let thread = std::thread::spawn(move || {
            edge_classifier_lab::enter_netns(&ns).expect("remote namespace");
            let to = |port| std::net::SocketAddr::new(edge_classifier_lab::EDGE_EXT_V4, port);
            let mut sock = None;
            while !s2.load(Ordering::Relaxed) {
                // The socket is bound to the remote's address, which goes with its NIC: bound
                // again when it is back.
                if sock.is_none() {
                    sock = std::net::UdpSocket::bind(std::net::SocketAddr::new(
                        edge_classifier_lab::CLIENT_V4,
                        0,
                    ))
                    .ok();
                }
                if let Some(s) = &sock {
                    for (i, port) in [ALLOWED_UDP, FORBIDDEN_UDP].into_iter().enumerate() {
                        if s.send_to(b"probe", to(port)).is_ok() {
                            c2[i].fetch_add(1, Ordering::Relaxed);
                        } else if i == 0 {
                            sock = None;
                            break;
                        }
                    }
                }
                std::thread::sleep(Duration::from_micros(500));
            }
        });
        Datagrams {
            stop,
            sent,
            thread: Some(thread),
        }
    }

    /// Stops sending; (allowed, forbidden) datagrams sent.
    pub fn finish(mut self) -> (u64, u64) {
        use std::sync::atomic::Ordering;
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        (
            self.sent[0].load(Ordering::Relaxed),
            self.sent[1].load(Ordering::Relaxed),
        )
    }
}

impl Drop for Datagrams {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Waits until `listeners` stop receiving, then checks what a `Datagrams` stream that sent
/// `sent` delivered: no forbidden datagram, and every allowed one (unless `lossy`: across a
/// NIC's re-creation the remote's neighbour cache may drop a few; then at least one).
pub fn assert_datagrams(
    listeners: &edge_classifier_lab::Listeners,
    sent: (u64, u64),
    what: &str,
    lossy: bool,
) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while listeners.udp(ALLOWED_UDP).datagrams.len() < sent.0 as usize && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(200));
    let got = listeners.udp(ALLOWED_UDP).datagrams.len() as u64;
    let leaked = listeners.udp(FORBIDDEN_UDP).datagrams.len();
    assert_eq!(
        leaked, 0,
        "{what}: forbidden datagrams delivered ({} sent)",
        sent.1
    );
    if lossy {
        assert!(
            got > 0,
            "{what}: no allowed datagram delivered of {}",
            sent.0
        );
    } else {
        assert_eq!(
            got, sent.0,
            "{what}: allowed datagrams delivered vs sent (none may be lost)"
        );
    }
    assert!(sent.1 > 100, "{what}: only {} forbidden sent", sent.1);
}

/// Where the tests' Prometheus servers listen (inside a lab namespace).
pub const PROMETHEUS: &str = "127.0.0.1:9090";

/// Percent-encoding for a query string.
pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An instant query through Prometheus' HTTP API: the `data.result` array.
pub fn query(ns: &str, promql: &str) -> Vec<Value> {
    let body = http_get(
        ns,
        PROMETHEUS,
        format!("/api/v1/query?query={}", urlencode(promql)),
    );
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{promql}: {e}: {body}"));
    assert_eq!(v["status"], "success", "query `{promql}` failed: {body}");
    v["data"]["result"]
        .as_array()
        .unwrap_or_else(|| panic!("{promql}: no result array: {body}"))
        .clone()
}

/// The single value of a query that must return one series.
pub fn scalar(ns: &str, promql: &str) -> f64 {
    let r = query(ns, promql);
    assert_eq!(r.len(), 1, "`{promql}` returned {r:?}");
    r[0]["value"][1]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("`{promql}`: no value in {r:?}"))
}

/// Polls `ok` every 250 ms until it holds; panics naming `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Debian's `prometheus` in namespace `ns` with `args`, stopped when the test ends.
pub fn prometheus(ns: &str, args: &[String]) -> Process {
    Process(
        in_ns(ns, "prometheus")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus (Debian package prometheus)"),
        "prometheus",
    )
}
