//! The Debian package and its systemd unit, for real: a Debian bookworm root (debootstrap,
//! cached under the target dir) with the package installed by dpkg, booted with systemd as PID 1
//! by systemd-nspawn inside the lab's edge namespace, so the unit's XDP sits on the lab's NICs.
//! Frames from the lab's remote host check what passes: start → protected; `systemctl reload`
//! with an edited catalogue → the new rule in force; `systemctl restart` → XDP never leaves the
//! NIC and no forbidden connection completes; `systemctl stop` → still protected;
//! `edge-classifier stop` → detached; `dpkg --remove` → stopped and detached. The unit passes `systemd-analyze verify`, and `systemd-analyze
//! security` scores it. Root; needs the package path in EC_DEB (`cargo xtask test` builds it).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use edge_classifier_lab::*;

/// The most exposure `systemd-analyze security` may score the unit (0 best, 10 worst; it scored
/// 2.4–2.5 when the unit was written).
const MAX_EXPOSURE: f64 = 3.0;

fn sh(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A pristine bookworm root with systemd and the package's dependencies (libpcap0.8, which
/// `monitor` links; dpkg installs no dependency), made once per target dir. The name changes
/// with what it includes, so that a root made before is not taken for it.
fn root_cache() -> PathBuf {
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("bookworm-systemd-libpcap");
    if cache.join("lib/systemd/systemd").exists() {
        return cache;
    }
    let tmp = cache.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    let started = Instant::now();
    sh(Command::new("debootstrap")
        .args([
            "--variant=minbase",
            "--include=systemd,systemd-sysv,dbus,iproute2,libpcap0.8",
            "bookworm",
        ])
        .arg(&tmp)
        .arg("http://deb.debian.org/debian"));
    std::fs::rename(&tmp, &cache).unwrap();
    eprintln!("debootstrap: {:.0} s", started.elapsed().as_secs_f64());
    cache
}

/// A booted container; powered off and removed on drop, also when the test panics.
struct Container {
    root: PathBuf,
    bpffs: PathBuf,
    nspawn: Child,
    /// The container's PID 1, as the host sees it.
    init: u32,
}

impl Container {
    /// A command inside the booted container (every namespace of its PID 1).
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.args(["-t", &self.init.to_string(), "-a", "env", "-i"])
            .args([
                "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                "SYSTEMD_PAGER=",
                "SYSTEMD_COLORS=0",
                "LANG=C.UTF-8",
            ])
            .args(args);
        c
    }

    fn run(&self, args: &[&str]) -> String {
        sh(&mut self.cmd(args))
    }

    fn ok(&self, args: &[&str]) -> bool {
        self.cmd(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Boots `root` with systemd in network namespace `netns`.
    fn boot(root: PathBuf, netns: &str) -> Container {
        // systemd does not mount bpffs in a container: a private one is bound over
        // /sys/fs/bpf, and unmounting it at the end drops every pin the test made there.
        let bpffs = root.with_extension("bpffs");
        std::fs::create_dir_all(&bpffs).unwrap();
        sh(Command::new("mount")
            .args(["-t", "bpf", "-o", "mode=0700", "bpf"])
            .arg(&bpffs));
        let nspawn = Command::new("timeout")
            .args(["--kill-after=10", "900", "systemd-nspawn", "-q", "-D"])
            .arg(&root)
            .args([
                "--register=no",
                "--keep-unit",
                "--boot",
                "--console=read-only",
            ])
            .arg(format!(
                "--network-namespace-path={}",
                Lab::netns_path(netns)
            ))
            // What the unit's capability set draws from, and the bpf() syscall, which
            // nspawn's own seccomp filter otherwise refuses.
            .args([
                "--capability=CAP_BPF,CAP_NET_ADMIN,CAP_PERFMON,CAP_SYS_ADMIN",
                "--system-call-filter=bpf",
            ])
            .arg(format!("--bind={}:/sys/fs/bpf", bpffs.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("systemd-nspawn");
        let mut c = Container {
            root,
            bpffs,
            nspawn,
            init: 0,
        };
        // timeout → systemd-nspawn → systemd (the container's PID 1).
        let deadline = Instant::now() + Duration::from_secs(30);
        while c.init == 0 {
            assert!(
                Instant::now() < deadline,
                "the container's systemd never started"
            );
            c.init = children(c.nspawn.id())
                .into_iter()
                .flat_map(children)
                .find(|&p| comm(p) == "systemd")
                .unwrap_or(0);
            std::thread::sleep(Duration::from_millis(100));
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let state = c
                .cmd(&["systemctl", "is-system-running"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_default();
            if state == "running" || state == "degraded" {
                break;
            }
            assert!(Instant::now() < deadline, "boot did not finish: {state}");
            std::thread::sleep(Duration::from_millis(200));
        }
        c
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if self.init != 0 {
            let _ = self.cmd(&["systemctl", "poweroff"]).output();
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline && matches!(self.nspawn.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
        let _ = Command::new("umount").arg(&self.bpffs).status();
        let _ = std::fs::remove_dir(&self.bpffs);
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Removes a directory tree on drop (the container's root, whatever happens to the test).
struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn connects(lab: &Lab, from: std::net::IpAddr, port: u16, ms: u64) -> bool {
    tcp_exchange(
        &lab.remote,
        SocketAddr::new(from, 0),
        SocketAddr::new(EDGE_EXT_V4, port),
        Duration::from_millis(ms),
    )
    .expect("tcp exchange")
    .connected
}

#[test]
fn the_package_installs_and_its_unit_protects_across_reload_restart_and_stop() {
    let deb = std::env::var("EC_DEB")
        .expect("EC_DEB names the .deb to test: run through `cargo xtask test`, which builds it");
    assert!(
        Path::new(&deb).is_absolute() && Path::new(&deb).is_file(),
        "EC_DEB={deb}: an absolute path to the package (tests run in their crate's folder)"
    );
    let cache = root_cache();
    let lab = Lab::create("svc").expect("lab");
    let root =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("svc-root-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let _root_guard = RemoveDir(root.clone());
    sh(Command::new("cp")
        .args(["-a", "--reflink=auto"])
        .arg(&cache)
        .arg(&root));

    // dpkg -i in the root before it boots (no systemd running: the maintainer scripts skip
    // systemctl), as an image build would.
    sh(Command::new("systemd-nspawn")
        .args(["-q", "-D"])
        .arg(&root)
        .args(["--register=no", "--keep-unit", "--private-network"])
        .arg(format!("--bind-ro={deb}:/tmp/edge-classifier.deb"))
        .args(["dpkg", "-i", "/tmp/edge-classifier.deb"]));
    for f in [
        "usr/bin/edge-classifier",
        "etc/edge-classifier/edge.toml",
        "etc/default/edge-classifier",
        "usr/lib/systemd/system/edge-classifier.service",
        "usr/share/man/man1/edge-classifier.1.gz",
        "usr/share/bash-completion/completions/edge-classifier",
        "usr/share/edge-classifier/dashboards/edge-classifier.json",
        "usr/share/edge-classifier/dashboards/edge-classifier-pool.json",
        "usr/share/edge-classifier/prometheus/prometheus-agent.yml",
        "usr/share/edge-classifier/prometheus/alerts.yml",
    ] {
        assert!(root.join(f).exists(), "the package installs /{f}");
    }
    let conffiles =
        std::fs::read_to_string(root.join("var/lib/dpkg/info/edge-classifier.conffiles"))
            .expect("conffiles");
    assert!(
        conffiles.contains("/etc/edge-classifier/edge.toml"),
        "{conffiles}"
    );
    // The NICs, as an operator sets them.
    let default = root.join("etc/default/edge-classifier");
    let text = std::fs::read_to_string(&default).unwrap().replace(
        "EDGE_CLASSIFIER_IFACES=\"\"",
        "EDGE_CLASSIFIER_IFACES=\"--iface ext0=external --iface int0=internal\"",
    );
    std::fs::write(&default, text).unwrap();

    let started = Instant::now();
    let c = Container::boot(root.clone(), &lab.edge);
    eprintln!(
        "container booted in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let unit = "/usr/lib/systemd/system/edge-classifier.service";
    c.run(&["systemd-analyze", "verify", "--man=no", unit]);
    let security = c.run(&[
        "systemd-analyze",
        "security",
        "--no-pager",
        "edge-classifier.service",
    ]);
    let exposure: f64 = security
        .lines()
        .find_map(|l| l.split("edge-classifier.service: ").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in\n{security}"));
    eprintln!("systemd-analyze security: exposure {exposure}");
    assert!(exposure <= MAX_EXPOSURE, "exposure {exposure}:\n{security}");

    let listeners = Listeners::start(&lab.edge, &[22, 443, 5061], &[]).expect("listeners");
    assert!(
        connects(&lab, CLIENT_V4, 22, 2000),
        "control: 22 open before the service"
    );
    assert_eq!(xdp_prog(&lab.edge, EDGE_EXT), None);

    // start: Type=notify, so `systemctl start` returns once every NIC is protected.
    c.run(&["systemctl", "start", "edge-classifier"]);
    let status = c.run(&["systemctl", "show", "-P", "StatusText", "edge-classifier"]);
    assert!(
        status.starts_with("protecting ext0 (external), int0 (internal)"),
        "{status}"
    );
    assert!(
        xdp_prog(&lab.edge, EDGE_EXT).is_some(),
        "XDP on ext0 once started"
    );
    let before = listeners.tcp(22).connections.len();
    assert!(
        !connects(&lab, CLIENT_V4, 22, 500),
        "22 dropped once started"
    );
    assert!(
        connects(&lab, CLIENT_V4, 443, 2000),
        "P3 443 allowed from anywhere"
    );
    assert!(
        !connects(&lab, CLIENT_V4, 5061, 500),
        "5061 only from partners"
    );
    assert!(
        connects(&lab, PARTNER_V4, 5061, 2000),
        "5061 from a partner"
    );
    assert_eq!(listeners.tcp(22).connections.len(), before);
    assert!(
        c.ok(&["edge-classifier", "status"]),
        "status: every NIC protected"
    );

    // reload: the client's address becomes a partner, so 5061 opens to it.
    let cat = root.join("etc/edge-classifier/edge.toml");
    let edited = std::fs::read_to_string(&cat).unwrap().replacen(
        "public_im_partners = [",
        "public_im_partners = [\"198.51.100.1/32\", ",
        1,
    );
    std::fs::write(&cat, &edited).unwrap();
    c.run(&["systemctl", "reload", "edge-classifier"]);
    assert!(
        connects(&lab, CLIENT_V4, 5061, 2000),
        "the reloaded rule is in force"
    );
    assert!(!connects(&lab, CLIENT_V4, 22, 500), "22 still dropped");
    // A broken catalogue: reload fails, the service and the rules stay.
    std::fs::write(&cat, format!("{edited}\nthis is = = not toml\n")).unwrap();
    assert!(
        !c.ok(&["systemctl", "reload", "edge-classifier"]),
        "a bad catalogue fails reload"
    );
    assert!(c.ok(&["systemctl", "is-active", "-q", "edge-classifier"]));
    assert!(
        connects(&lab, CLIENT_V4, 5061, 2000),
        "the rules in force stay"
    );
    std::fs::write(&cat, &edited).unwrap();

    // restart: XDP never leaves ext0 and no connection to 22 completes meanwhile.
    let stop = Arc::new(AtomicBool::new(false));
    let (gaps, tries) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let watcher = {
        let (stop, gaps, tries, edge, remote) = (
            stop.clone(),
            gaps.clone(),
            tries.clone(),
            lab.edge.clone(),
            lab.remote.clone(),
        );
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                if xdp_prog(&edge, EDGE_EXT).is_none() {
                    gaps.fetch_add(1, Ordering::Relaxed);
                }
                let _ = tcp_exchange(
                    &remote,
                    SocketAddr::new(CLIENT_V4, 0),
                    SocketAddr::new(EDGE_EXT_V4, 22),
                    Duration::from_millis(50),
                );
                tries.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let prog_before = xdp_prog(&lab.edge, EDGE_EXT);
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    c.run(&["systemctl", "restart", "edge-classifier"]);
    let restart_s = t.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    watcher.join().unwrap();
    eprintln!(
        "restart took {restart_s:.2} s; {} probes of 22 meanwhile",
        tries.load(Ordering::Relaxed)
    );
    assert!(
        tries.load(Ordering::Relaxed) >= 5,
        "probes ran through the restart"
    );
    assert_eq!(
        gaps.load(Ordering::Relaxed),
        0,
        "XDP left ext0 during the restart"
    );
    assert_eq!(
        listeners.tcp(22).connections.len(),
        before,
        "no connection to 22 completed"
    );
    assert_ne!(
        xdp_prog(&lab.edge, EDGE_EXT),
        prog_before,
        "the new daemon's program replaced the old"
    );
    assert!(
        connects(&lab, CLIENT_V4, 5061, 2000),
        "the reloaded catalogue survives a restart"
    );

    // stop: the daemon exits, the NIC stays protected.
    c.run(&["systemctl", "stop", "edge-classifier"]);
    assert!(!c.ok(&["systemctl", "is-active", "-q", "edge-classifier"]));
    assert!(
        xdp_prog(&lab.edge, EDGE_EXT).is_some(),
        "XDP stays after systemctl stop"
    );
    assert!(
        !connects(&lab, CLIENT_V4, 22, 500),
        "22 still dropped after systemctl stop"
    );
    assert!(
        c.ok(&["edge-classifier", "status"]),
        "status without the daemon"
    );

    // The journal: every line of ours has a priority the journal understood, no timestamp of
    // our own, and the reload is there with who made it.
    let journal = c.run(&[
        "journalctl",
        "-u",
        "edge-classifier",
        "-o",
        "json",
        "--no-pager",
    ]);
    let mut reload_logged = false;
    for line in journal.lines() {
        let entry: serde_json::Value = serde_json::from_str(line).expect("journal json");
        let Some(msg) = entry["MESSAGE"].as_str() else {
            continue;
        };
        if entry["_PID"].is_null() || entry["SYSLOG_IDENTIFIER"] != "edge-classifier" {
            continue;
        }
        assert!(
            !msg.starts_with('<'),
            "a priority prefix the journal did not take: {msg}"
        );
        assert!(!msg.starts_with("[20"), "a timestamp of our own: {msg}");
        if msg.contains("reload by pid ") && msg.contains("in force") {
            assert_eq!(entry["PRIORITY"], "6", "{entry}");
            reload_logged = true;
        }
    }
    assert!(reload_logged, "the daemon logged the reload:\n{journal}");

    // `edge-classifier stop` really detaches.
    c.run(&["edge-classifier", "stop"]);
    assert_eq!(
        xdp_prog(&lab.edge, EDGE_EXT),
        None,
        "detached by edge-classifier stop"
    );
    assert!(
        connects(&lab, CLIENT_V4, 22, 2000),
        "22 reachable once detached"
    );

    // Removing the package stops the service and detaches: nothing could manage the pins after.
    c.run(&["systemctl", "start", "edge-classifier"]);
    assert!(xdp_prog(&lab.edge, EDGE_EXT).is_some(), "started again");
    c.run(&["dpkg", "--remove", "edge-classifier"]);
    assert!(!c.ok(&["systemctl", "is-active", "-q", "edge-classifier"]));
    assert_eq!(
        xdp_prog(&lab.edge, EDGE_EXT),
        None,
        "dpkg --remove detaches"
    );
    assert!(!root.join("usr/bin/edge-classifier").exists());
    assert!(
        root.join("etc/edge-classifier/edge.toml").exists(),
        "remove keeps the conffiles"
    );
    c.run(&["dpkg", "--purge", "edge-classifier"]);
    assert!(
        !root.join("etc/edge-classifier/edge.toml").exists(),
        "purge removes them"
    );
    drop(listeners);
    drop(c);
    drop(lab);
}
