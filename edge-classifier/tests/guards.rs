//! Deployment guards on a namespace lab, with the real binary: a catalogue whose protected sets
//! hold none of the bound NICs' addresses is named on `run` and on `reload` and shows in
//! `edge_classifier_protected_addresses_configured`; placeholder (documentation) prefixes are
//! named; a restart that leaves a NIC out keeps protecting it unless `--detach-missing`; a role
//! change and a `--mode` adoption cannot honour are warnings naming old and new. Root.

mod common;

use std::{
    io::{BufRead as _, BufReader},
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::*;
use edge_classifier::catalogue::DEFAULT_CATALOGUE;
use edge_classifier_lab::*;

/// `run ARGS` in `ns`, once ready: the process and its stderr lines so far and to come.
fn run(ns: &str, args: &[&str]) -> (Process, Arc<Mutex<Vec<String>>>) {
    let mut child = in_ns(ns, BIN)
        .arg("run")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start edge-classifier");
    let stdout = child.stdout.take().expect("stdout");
    let stderr = child.stderr.take().expect("stderr");
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        for l in BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(l);
        }
    });
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            if l == "ready" {
                let _ = tx.send(());
            }
        }
    });
    let proc = Process(child, "edge-classifier");
    rx.recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| {
            panic!(
                "run {args:?} did not print `ready`; stderr: {:#?}",
                lines.lock().unwrap()
            )
        });
    (proc, lines)
}

fn assert_logged(lines: &Arc<Mutex<Vec<String>>>, want: &str) {
    let l = lines.lock().unwrap();
    assert!(
        l.iter().any(|l| l.contains(want)),
        "no stderr line contains {want:?}: {l:#?}"
    );
}

fn gauge(ns: &str, iface: &str) -> f64 {
    let text = http_get(ns, METRICS, "/metrics".into());
    metric(
        &text,
        "edge_classifier_protected_addresses_configured",
        &[("interface", iface)],
    )
    .unwrap_or_else(|| panic!("no protected_addresses_configured for {iface}: {text}"))
}

/// Waits for the daemon to pick a reload up (it re-reads the state every second).
fn gauge_becomes(ns: &str, iface: &str, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = gauge(ns, iface);
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{iface}: protected addresses {got}, expected {want}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn deployment_mistakes_are_named_and_no_nic_is_opened_by_a_restart() {
    let lab = Lab::create("gd").expect("lab");
    let instance = format!("gd{}", std::process::id());
    let _stop = Stop(instance.clone());
    let dir = std::env::temp_dir().join(format!("ec-guards-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.toml");
    std::fs::write(&good, DEFAULT_CATALOGUE).unwrap();
    // The operator edited a copy but left the Edge's own sets pointing elsewhere.
    let wrong = dir.join("wrong.toml");
    std::fs::write(
        &wrong,
        DEFAULT_CATALOGUE
            .replace(
                "access_edge = [\"198.51.100.10/32\", \"2001:db8:100::10/128\"]",
                "access_edge = [\"100.64.0.10/32\"]",
            )
            .replace(
                "internal_edge = [\"192.0.2.10/32\", \"2001:db8:200::10/128\"]",
                "internal_edge = [\"10.1.0.10/32\"]",
            ),
    )
    .unwrap();
    let good = good.to_str().unwrap();
    let wrong = wrong.to_str().unwrap();
    let base = [
        "--instance",
        &instance,
        "--metrics",
        METRICS,
        "--mode",
        "native",
    ];
    let both = ["--iface", "ext0=external", "--iface", "int0=internal"];

    // 1. The right sets: both NICs hold protected addresses; the placeholders are named.
    let (daemon, lines) = run(
        &lab.edge,
        &[&base[..], &both[..], &["--catalogue", good]].concat(),
    );
    assert_logged(
        &lines,
        "sets `access_edge`, `internal_edge`, `public_im_partners` still hold only documentation prefixes",
    );
    assert_eq!(
        gauge(&lab.edge, EDGE_EXT),
        2.0,
        "198.51.100.10 and 2001:db8:100::10"
    );
    assert_eq!(
        gauge(&lab.edge, EDGE_INT),
        2.0,
        "192.0.2.10 and 2001:db8:200::10"
    );

    // 2. A reload with the wrong sets: named by the reload, and the gauges fall to 0.
    let out = in_ns(&lab.edge, BIN)
        .args(["reload", "--instance", &instance, "--catalogue", wrong])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "reload: {err}");
    assert!(
        err.contains("no address of the protected sets (access_edge, internal_edge) is configured on the bound NICs"),
        "reload stderr: {err}"
    );
    gauge_becomes(&lab.edge, EDGE_EXT, 0.0);
    gauge_becomes(&lab.edge, EDGE_INT, 0.0);
    drop(daemon);

    // 3. Restarted with the wrong catalogue: named by `run` too.
    let (daemon, lines) = run(
        &lab.edge,
        &[&base[..], &both[..], &["--catalogue", wrong]].concat(),
    );
    assert_logged(
        &lines,
        "no address of the protected sets (access_edge, internal_edge) is configured on the bound NICs ext0, int0",
    );
    drop(daemon);

    // 4. A restart that names only ext0: int0 stays protected, and says so.
    assert!(
        xdp_prog(&lab.edge, EDGE_INT).is_some(),
        "int0 attached before"
    );
    let (daemon, lines) = run(
        &lab.edge,
        &[
            &base[..],
            &["--iface", "ext0=external", "--catalogue", good],
        ]
        .concat(),
    );
    assert_logged(
        &lines,
        "int0: protected by this instance as `internal` but not named by --iface; still protecting it",
    );
    assert!(
        xdp_prog(&lab.edge, EDGE_INT).is_some(),
        "int0 must stay attached"
    );
    assert_eq!(gauge(&lab.edge, EDGE_INT), 2.0, "int0 still reported");
    drop(daemon);

    // 5. A role change and a mode adoption cannot honour: both named, old and new.
    let (daemon, lines) = run(
        &lab.edge,
        &[
            "--instance",
            &instance,
            "--metrics",
            METRICS,
            "--mode",
            "generic",
            "--iface",
            "ext0=internal",
            "--iface",
            "int0=internal",
            "--catalogue",
            good,
        ],
    );
    assert_logged(&lines, "ext0: role changes from `external` to `internal`");
    assert_logged(
        &lines,
        "ext0: --mode generic cannot be honoured on adoption: the pinned attachment stays in native mode",
    );
    drop(daemon);

    // 6. --detach-missing detaches what is left out.
    let (daemon, lines) = run(
        &lab.edge,
        &[
            &base[..],
            &[
                "--iface",
                "ext0=external",
                "--catalogue",
                good,
                "--detach-missing",
            ],
        ]
        .concat(),
    );
    assert_logged(
        &lines,
        "int0: protected by this instance as `internal` but not named by --iface; detaching it (--detach-missing)",
    );
    assert!(xdp_prog(&lab.edge, EDGE_INT).is_none(), "int0 detached");
    assert!(xdp_prog(&lab.edge, EDGE_EXT).is_some(), "ext0 attached");
    drop(daemon);
    std::fs::remove_dir_all(&dir).ok();
}
