//! `status`, `stats --instance` and `catalogue --instance` read an instance from its pins and
//! state with the daemon running, killed, and with a NIC gone; the state keeps the catalogue's
//! absolute path, so `reload` without `--catalogue` works from any directory; under systemd
//! (JOURNAL_STREAM set) every log line carries a priority and the daemon logs each reload with
//! who made it. Root, on a namespace lab.

mod common;

use std::{
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::*;
use edge_classifier::catalogue::DEFAULT_CATALOGUE;
use edge_classifier_lab::*;

/// `edge-classifier ARGS` inside namespace `ns`, from directory `cwd`: (exit code, stdout, stderr).
fn cli_in(ns: &str, cwd: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let out = in_ns(ns, BIN)
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("edge-classifier");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn status_json(ns: &str, instance: &str) -> (i32, serde_json::Value) {
    let (code, out, err) = cli_in(
        ns,
        std::path::Path::new("/"),
        &["status", "--instance", instance, "--json"],
    );
    let v = serde_json::from_str(&out).unwrap_or_else(|e| panic!("status --json: {e}: {out}{err}"));
    (code, v)
}

fn nic<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["interfaces"]
        .as_array()
        .expect("interfaces")
        .iter()
        .find(|n| n["name"] == name)
        .unwrap_or_else(|| panic!("no interface {name} in {status:#}"))
}

/// Every line `child` writes to stdout and stderr, as it comes (read by threads of their own).
fn capture_lines(child: &mut std::process::Child) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    for stream in [
        Box::new(child.stdout.take().expect("stdout piped")) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().expect("stderr piped")),
    ] {
        let lines = lines.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(stream).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(l);
            }
        });
    }
    lines
}

/// Waits up to `secs` for a line of `lines` that `pred` accepts; panics with them all if none
/// comes.
fn wait_for_line(lines: &Mutex<Vec<String>>, what: &str, secs: u64, pred: &dyn Fn(&str) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if lines.lock().unwrap().iter().any(|l| pred(l)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("no log line {what} in {:#?}", lines.lock().unwrap());
}

/// `net.ipv4.tcp_syncookies` in namespace `ns`.
fn set_syncookies(ns: &str, value: &'static str) {
    in_netns(ns, move || {
        Ok(std::fs::write("/proc/sys/net/ipv4/tcp_syncookies", value)?)
    })
    .expect("tcp_syncookies in the lab")
}

#[test]
fn status_reads_pins_with_and_without_the_daemon_and_reload_finds_the_file_from_anywhere() {
    let lab = Lab::create("st").expect("lab");
    let instance = format!("st{}", std::process::id());
    let _stop = Stop(instance.clone());
    let tmp = TempDir::new("status");
    let dir = tmp.0.clone();
    std::fs::write(dir.join("edge.toml"), DEFAULT_CATALOGUE).unwrap();
    let _listeners = Listeners::start(&lab.edge, &[443], &[]).expect("listeners");

    // Segment routing on for ext0: the daemon must warn that routing headers are classified on
    // the header's destination.
    in_netns(&lab.edge, || {
        Ok(std::fs::write(
            "/proc/sys/net/ipv6/conf/ext0/seg6_enabled",
            "1",
        )?)
    })
    .expect("seg6_enabled in the lab");
    // No SYN cookies in the Edge's namespace: the daemon must say to turn them on.
    set_syncookies(&lab.edge, "0");
    // The daemon as systemd runs it: output to the journal (JOURNAL_STREAM), started from the
    // catalogue's directory with a relative path.
    let mut child = in_ns(&lab.edge, BIN)
        .args(["run", "--instance", &instance, "--metrics", METRICS])
        .args(["--catalogue", "edge.toml", "--iface", "ext0=external"])
        .args(["--iface", "int0=internal"])
        .current_dir(&dir)
        .env("JOURNAL_STREAM", "8:12345")
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run");
    let lines = capture_lines(&mut child);
    let daemon = Process(child, "edge-classifier");
    let wait_for = |what: &str, pred: &dyn Fn(&str) -> bool| wait_for_line(&lines, what, 60, pred);
    wait_for("serving metrics", &|l| l.contains("serving metrics"));
    wait_for("the seg6_enabled warning", &|l| {
        l.starts_with("<4>") && l.contains("ext0") && l.contains("seg6_enabled is on")
    });
    wait_for("the tcp_syncookies warning", &|l| {
        l.starts_with("<4>")
            && l.contains("net.ipv4.tcp_syncookies is 0")
            && l.contains("set it to 1")
    });

    let (code, st) = status_json(&lab.edge, &instance);
    assert_eq!(code, 0, "protected: {st:#}");
    assert_eq!(st["protected"], true);
    assert!(
        st["warnings"][0]
            .as_str()
            .is_some_and(|w| w.contains("net.ipv4.tcp_syncookies is 0")),
        "status shows the tcp_syncookies warning: {st:#}"
    );
    assert_eq!(st["daemon"]["running"], true, "{st:#}");
    assert_eq!(st["daemon"]["pid"], daemon.pid());
    let source = dir.join("edge.toml").display().to_string();
    assert_eq!(
        st["catalogue"]["source"],
        source.as_str(),
        "absolute path kept"
    );
    assert_eq!(st["catalogue"]["rules"], 10);
    let ext = nic(&st, EDGE_EXT);
    assert_eq!(ext["role"], "external");
    assert_eq!(ext["present"], true);
    assert_eq!(ext["xdp"]["live"], true);
    assert_eq!(ext["tc"]["live"], true);
    assert_eq!(
        ext["xdp"]["program_id"].as_u64(),
        xdp_prog(&lab.edge, EDGE_EXT).map(u64::from),
        "the program the kernel runs on ext0: {st:#}"
    );

    // Traffic is counted in what status reads from the maps.
    let x = tcp_exchange(
        &lab.remote,
        SocketAddr::new(CLIENT_V4, 0),
        SocketAddr::new(EDGE_EXT_V4, 443),
        Duration::from_secs(3),
    )
    .unwrap();
    assert!(x.answered);
    let (_, st) = status_json(&lab.edge, &instance);
    let p3 = st["counters"]["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == EDGE_EXT)
        .and_then(|i| {
            i["rules"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["id"] == "client-sip-tls-in")
                .cloned()
        })
        .expect("P3 counter");
    assert!(p3["packets"].as_u64().unwrap() >= 3, "{p3:#}");

    // `reload` without --catalogue from another directory reads the same file again.
    let (code, out, err) = cli_in(
        &lab.edge,
        std::path::Path::new("/"),
        &["reload", "--instance", &instance],
    );
    assert_eq!(code, 0, "reload from /: {out}{err}");
    assert!(out.contains(&source), "{out}");
    wait_for("logging the reload", &|l| {
        l.starts_with("<6>") && l.contains("reload by pid ") && l.contains(&source)
    });
    // SIGHUP reads the catalogue file again (the daemon reloads, and logs itself as who), and
    // the daemon lives on.
    let before = status_json(&lab.edge, &instance).1["reloads"]["succeeded"]
        .as_u64()
        .expect("reloads");
    unsafe { libc::kill(daemon.pid(), libc::SIGHUP) };
    let by_itself = format!("reload by pid {} ", daemon.pid());
    wait_for("the SIGHUP reload", &|l| {
        l.contains(&by_itself) && l.contains(&source)
    });
    let after = status_json(&lab.edge, &instance).1["reloads"]["succeeded"]
        .as_u64()
        .expect("reloads");
    assert_eq!(after, before + 1, "SIGHUP made one reload");
    // A failed reload is logged as a warning, with the reason.
    std::fs::write(dir.join("bad.toml"), "[policy]\ndefault = \"maybe\"\n").unwrap();
    let (code, _, _) = cli_in(
        &lab.edge,
        &dir,
        &["reload", "--instance", &instance, "--catalogue", "bad.toml"],
    );
    assert_ne!(code, 0);
    wait_for("logging the failed reload", &|l| {
        l.starts_with("<4>") && l.contains("failed, the running rules stay")
    });
    {
        let lines = lines.lock().unwrap();
        for l in lines.iter() {
            assert!(
                l.len() > 3 && l.starts_with('<') && l.as_bytes()[2] == b'>',
                "every journal line carries a priority: {l:?}"
            );
            assert!(
                !l.contains("Z INFO") && !l.contains("Z WARN"),
                "no timestamp of our own: {l:?}"
            );
        }
    }

    // Killed daemon: the kernel keeps protecting; status says so from the pins.
    unsafe { libc::kill(daemon.pid(), libc::SIGKILL) };
    drop(daemon);
    let (code, st) = status_json(&lab.edge, &instance);
    assert_eq!(code, 0, "{st:#}");
    assert_eq!(st["daemon"]["running"], false, "{st:#}");
    assert_eq!(st["protected"], true);
    let (code, out, err) = cli_in(
        &lab.edge,
        std::path::Path::new("/"),
        &["stats", "--instance", &instance],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("client-sip-tls-in"), "{out}");
    let (code, out, _) = cli_in(
        &lab.edge,
        std::path::Path::new("/"),
        &["catalogue", "--instance", &instance],
    );
    assert_eq!(code, 0);
    assert_eq!(out, DEFAULT_CATALOGUE, "the running catalogue's text");

    // The NIC goes away: its pinned link is defunct, and status says ext0 is not protected.
    ip(&["-n", &lab.edge, "link", "del", EDGE_EXT]).expect("delete ext0");
    let (code, st) = status_json(&lab.edge, &instance);
    assert_eq!(code, 3, "not every NIC protected: {st:#}");
    assert_eq!(st["protected"], false);
    let ext = nic(&st, EDGE_EXT);
    assert_eq!(ext["present"], false);
    assert_eq!(ext["xdp"]["live"], false, "{ext:#}");
    assert_eq!(nic(&st, EDGE_INT)["xdp"]["live"], true);
    let (_, text, _) = cli_in(
        &lab.edge,
        std::path::Path::new("/"),
        &["status", "--instance", &instance],
    );
    assert!(text.contains("NOT every bound NIC is protected"), "{text}");
    drop(lab);
}

/// The NIC's IPv6 link-local address of `dev` in `ns`, once duplicate address detection is done.
fn link_local(ns: &str, dev: &str) -> std::net::Ipv6Addr {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = Command::new("ip")
            .args(["-n", ns, "-6", "addr", "show", "dev", dev, "scope", "link"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if let Some(addr) = text
            .lines()
            .find(|l| l.trim_start().starts_with("inet6 ") && !l.contains("tentative"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
        {
            return addr;
        }
        assert!(
            Instant::now() < deadline,
            "no link-local address on {dev}: {text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn ifindex_in(ns: &str, dev: &str) -> u32 {
    let out = Command::new("ip")
        .args(["-n", ns, "-o", "link", "show", "dev", dev])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split(':')
        .next()
        .and_then(|n| n.trim().parse().ok())
        .expect("ifindex")
}

#[test]
fn the_nics_own_addresses_are_protected_and_followed_as_they_change() {
    let lab = Lab::create("na").expect("lab");
    let instance = format!("na{}", std::process::id());
    let _stop = Stop(instance.clone());
    let listeners = Listeners::start(&lab.edge, &[22], &[]).expect("listeners");
    let edge_ll = link_local(&lab.edge, EDGE_EXT);
    let _ = link_local(&lab.remote, "wan0");
    let wan0 = ifindex_in(&lab.remote, "wan0");
    let to = |addr: std::net::IpAddr, ms: u64| {
        let dst = match addr {
            std::net::IpAddr::V6(a) if a.is_unicast_link_local() => {
                SocketAddr::V6(std::net::SocketAddrV6::new(a, 22, 0, wan0))
            }
            a => SocketAddr::new(a, 22),
        };
        let src = if dst.is_ipv6() {
            SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), 0)
        } else {
            SocketAddr::new(CLIENT_V4, 0)
        };
        tcp_exchange(&lab.remote, src, dst, Duration::from_millis(ms))
            .unwrap()
            .connected
    };
    let added: std::net::IpAddr = "198.51.100.77".parse().unwrap();
    assert!(
        to(edge_ll.into(), 2000),
        "control: link-local 22 open before the daemon"
    );

    let _daemon = start_daemon(
        &lab.edge,
        &[
            "--instance",
            &instance,
            "--metrics",
            METRICS,
            "--iface",
            "ext0=external",
        ],
    );
    let seen = listeners.tcp(22).connections.len();
    assert!(
        !to(edge_ll.into(), 500),
        "TCP 22 to the NIC's link-local address is dropped"
    );

    // An address added while the daemon runs is protected within a second or so.
    ip(&[
        "-n",
        &lab.edge,
        "addr",
        "add",
        "198.51.100.77/24",
        "dev",
        EDGE_EXT,
    ])
    .expect("ip addr add");
    let pinned = || {
        edge_classifier::maps::Maps::open_pinned(
            &edge_classifier::instance::Instance::new(&instance)
                .unwrap()
                .maps_dir(),
        )
        .expect("pinned maps")
        .iface_addrs()
        .expect("IFACE_ADDRS")
    };
    let t = Instant::now();
    while !pinned().contains_key(&added) {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "198.51.100.77 not protected 5 s after it was added"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    eprintln!(
        "added address in the kernel's table after {:.1} ms",
        t.elapsed().as_secs_f64() * 1000.0
    );
    assert!(!to(added, 300), "TCP 22 to the added address is dropped");
    let table = pinned();
    assert!(table.contains_key(&added), "{table:?}");
    assert!(
        table.contains_key(&std::net::IpAddr::V6(edge_ll)),
        "{table:?}"
    );
    assert!(
        table.contains_key(&"198.51.100.255".parse().unwrap()),
        "the subnet broadcast: {table:?}"
    );

    // Removed again: it leaves the table (another host may take the address).
    ip(&[
        "-n",
        &lab.edge,
        "addr",
        "del",
        "198.51.100.77/24",
        "dev",
        EDGE_EXT,
    ])
    .expect("ip addr del");
    let deadline = Instant::now() + Duration::from_secs(5);
    while pinned().contains_key(&added) {
        assert!(
            Instant::now() < deadline,
            "198.51.100.77 still protected after removal"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        listeners.tcp(22).connections.len(),
        seen,
        "no connection to 22 completed while the addresses were the Edge's"
    );
    drop(lab);
}

/// A catalogue with `limit.syn_proxy` needs `net.ipv4.tcp_syncookies = 2`: `run` warns at 1 (the
/// kernel's default, which the advice without a proxy asks for), `status` shows it while it
/// stays so and no longer once it is 2.
#[test]
fn a_catalogue_with_a_syn_proxy_asks_for_tcp_syncookies_2() {
    let lab = Lab::create("stp").expect("lab");
    let instance = format!("stp{}", std::process::id());
    let _stop = Stop(instance.clone());
    let tmp = TempDir::new("status-proxy");
    let dir = tmp.0.clone();
    let text = DEFAULT_CATALOGUE.replacen(
        "id = \"client-sip-tls-in\"",
        "id = \"client-sip-tls-in\"\nlimit = { per_source = \"20/s\", syn_proxy = true }",
        1,
    );
    std::fs::write(dir.join("edge.toml"), text).unwrap();
    let syncookies = |v: &'static str| set_syncookies(&lab.edge, v);
    syncookies("1");
    let mut child = in_ns(&lab.edge, BIN)
        .args(["run", "--instance", &instance, "--metrics", METRICS])
        .args(["--catalogue", "edge.toml", "--iface", "ext0=external"])
        .current_dir(&dir)
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run");
    let lines = capture_lines(&mut child);
    let _daemon = Process(child, "edge-classifier");
    wait_for_line(
        &lines,
        "warning that the proxy needs tcp_syncookies = 2",
        60,
        &|l| {
            l.contains("net.ipv4.tcp_syncookies is 1 but a rule has limit.syn_proxy")
                && l.contains("set it to 2")
        },
    );
    let (_, st) = status_json(&lab.edge, &instance);
    assert!(
        st["warnings"][0]
            .as_str()
            .is_some_and(|w| w.contains("limit.syn_proxy")),
        "status shows it: {st:#}"
    );
    let (_, text, _) = cli_in(&lab.edge, &dir, &["status", "--instance", &instance]);
    assert!(
        text.contains("WARNING: net.ipv4.tcp_syncookies is 1 but a rule has limit.syn_proxy"),
        "{text}"
    );
    syncookies("2");
    let (_, st) = status_json(&lab.edge, &instance);
    assert_eq!(st["warnings"], serde_json::json!([]), "{st:#}");

    // A reload that takes the proxy away changes the advice (2 costs every connection its TCP
    // options): the running daemon says so then, not only at its start.
    std::fs::write(dir.join("edge.toml"), DEFAULT_CATALOGUE).unwrap();
    let (code, out, err) = cli_in(&lab.edge, &dir, &["reload", "--instance", &instance]);
    assert_eq!(code, 0, "reload: {out}{err}");
    wait_for_line(&lines, "with the new advice after the reload", 30, &|l| {
        l.contains("net.ipv4.tcp_syncookies is 2") && l.contains("set it to 1")
    });
}
