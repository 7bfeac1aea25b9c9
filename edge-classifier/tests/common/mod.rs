//! What the root-only tests of the binary share: processes that stop with the test, the daemon
//! started in a lab namespace, and HTTP from inside a namespace.
#![allow(dead_code)]

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use edge_classifier_lab::{Lab, in_netns};

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
