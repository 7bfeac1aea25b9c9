//! NICs that come and go, and the daemon's signals and output, with the real binary on a
//! namespace lab under a stream of allowed and forbidden datagrams: a bound NIC deleted while
//! the daemon runs is reported (log, `interface_attached` 0) and attached again when a NIC of
//! that name appears (the time from `ip link add` to attached is measured, and what passes in
//! between); `run` after the namespace was recreated (the old links severed) and after a rename
//! attaches without failing and leaves no stale pin; another XDP program on the NIC is named
//! with how to remove it; SIGHUP reloads, SIGUSR1 into a full stdout pipe blocks neither
//! `/metrics` nor SIGTERM, and a closed stdout (`run | true`) does not stop the daemon. Root.

mod common;

use std::{
    net::SocketAddr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::PathBuf,
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use common::*;
use edge_classifier::{
    instance::Instance,
    loader::{FLOOR_OBJECT, pinned_link},
    nic_addrs::xdp_program,
};
use edge_classifier_lab::*;

/// `run` arguments for `instance` on the lab's NICs named `ifaces`.
fn args<'a>(instance: &'a str, ifaces: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec!["--instance", instance, "--metrics", METRICS];
    for i in ifaces {
        a.extend(["--iface", *i]);
    }
    a
}

/// `run ARGS` once it printed `ready`, with its stderr lines.
fn run_ready(ns: &str, args: &[&str]) -> (Process, Arc<std::sync::Mutex<Vec<String>>>) {
    let (mut proc, lines) = spawn_logged(ns, args, Stdio::piped());
    let stdout = proc.0.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for l in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if l == "ready" {
                let _ = tx.send(());
            }
        }
    });
    if rx.recv_timeout(Duration::from_secs(60)).is_err() {
        panic!(
            "run {args:?} did not print `ready`; stderr: {:#?}",
            lines.lock().unwrap()
        );
    }
    (proc, lines)
}

/// `edge_classifier_interface_attached` of `iface`: (value, xdp_mode).
fn attached(ns: &str, iface: &str) -> Option<(f64, String)> {
    let text = http_get(ns, METRICS, "/metrics".into());
    let line = text.lines().find(|l| {
        l.starts_with("edge_classifier_interface_attached{")
            && l.contains(&format!("interface=\"{iface}\""))
    })?;
    let at = line.find("xdp_mode=\"")? + "xdp_mode=\"".len();
    let mode = line[at..].split('"').next()?.to_string();
    Some((line.rsplit(' ').next()?.parse().ok()?, mode))
}

/// Waits up to `timeout` for `attached(iface)` to be `want`.
fn attached_becomes(ns: &str, iface: &str, want: f64, timeout: Duration) -> (f64, String) {
    let deadline = Instant::now() + timeout;
    loop {
        let got = attached(ns, iface).unwrap_or_else(|| panic!("no interface_attached{{{iface}}}"));
        if got.0 == want {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "{iface}: interface_attached {got:?}, expected {want} within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The instance's link pins (file names).
fn pins(instance: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(Instance::new(instance).unwrap().links_dir())
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The kernel's id of the link pinned as `instance`'s `kind` link of `nic`.
fn link_id(instance: &str, nic: &str, kind: &str) -> Option<u32> {
    pinned_link(&Instance::new(instance).unwrap().link_pin(nic, kind)).map(|l| l.id)
}

/// The ifindex of `nic` in `ns`.
fn ifindex_in(ns: &str, nic: &str) -> Option<u32> {
    let nic = nic.to_string();
    in_netns(ns, move || Ok(edge_classifier::loader::ifindex(&nic).ok())).unwrap()
}

/// Spins in `ns` until a NIC named `nic` runs an XDP program: the time since `t0`.
fn watch_attach(ns: &str, nic: &str, t0: Instant) -> std::thread::JoinHandle<Duration> {
    let (ns, nic) = (ns.to_string(), nic.to_string());
    std::thread::spawn(move || {
        enter_netns(&ns).expect("netns");
        loop {
            if let Ok(i) = edge_classifier::loader::ifindex(&nic)
                && let Ok(Some(_)) = xdp_program(i)
            {
                return t0.elapsed();
            }
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "{nic} not attached within 5 s"
            );
            std::thread::sleep(Duration::from_micros(100));
        }
    })
}

/// ext0 and its peer wan0 as `Lab::create` makes them, the pair created anew (after it was
/// deleted) with a fixed MAC address: `up` creates ext0 already up (its peer is brought up by
/// whoever sends on it).
fn create_ext0(lab: &Lab, up: bool) {
    let mut extra = vec!["address", EXT_MAC];
    if up {
        extra.push("up");
    }
    lab.add_ext0(&extra).expect("ip link add ext0");
}

/// ext0's MAC address once re-created (locally administered), so frames can be sent to it
/// before anything else is known of it.
const EXT_MAC: &str = "02:00:5e:00:00:10";
const EXT_MAC_BYTES: [u8; 6] = [0x02, 0x00, 0x5e, 0x00, 0x00, 0x10];

/// A UDP datagram from the remote client to the Edge's external address, port `FORBIDDEN_UDP`.
fn forbidden_frame(src_mac: [u8; 6]) -> Vec<u8> {
    let mut out = Vec::new();
    etherparse::PacketBuilder::ethernet2(src_mac, EXT_MAC_BYTES)
        .ipv4(v4_of(CLIENT_V4).octets(), v4_of(EDGE_EXT_V4).octets(), 64)
        .udp(41000, FORBIDDEN_UDP)
        .write(&mut out, b"probe")
        .unwrap();
    out
}

/// An AF_PACKET socket on every NIC of `ns` (opened before the NIC it watches exists), with a
/// receive buffer large enough for a burst.
fn tap_all(ns: &str) -> OwnedFd {
    in_netns(ns, || {
        let proto = (libc::ETH_P_ALL as u16).to_be() as i32;
        let fd =
            unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_NONBLOCK, proto) };
        assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
        let size: libc::c_int = 16 << 20;
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                &size as *const libc::c_int as *const libc::c_void,
                4,
            )
        };
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    })
    .unwrap()
}

/// Frames received by `tap` that are forbidden datagrams to the Edge (on any NIC), draining
/// until 200 ms pass without one.
fn count_forbidden(tap: &OwnedFd) -> u64 {
    let mut buf = vec![0u8; 65536];
    let mut n_seen = 0;
    let mut last = Instant::now();
    while last.elapsed() < Duration::from_millis(200) {
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
        let n = unsafe {
            libc::recvfrom(
                tap.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                &mut sll as *mut libc::sockaddr_ll as *mut libc::sockaddr,
                &mut len,
            )
        };
        if n < 0 {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        last = Instant::now();
        if sll.sll_pkttype == libc::PACKET_OUTGOING {
            continue;
        }
        if let Some(t) = tuple(&buf[..n as usize])
            && t.udp
            && t.dst == SocketAddr::new(EDGE_EXT_V4, FORBIDDEN_UDP)
        {
            n_seen += 1;
        }
    }
    n_seen
}

/// Brings `dev` up from inside the calling thread's namespace (an ioctl: no process to start).
fn set_up(dev: &str) -> bool {
    unsafe {
        let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (i, b) in dev.bytes().enumerate() {
            ifr.ifr_name[i] = b as libc::c_char;
        }
        let ok = libc::ioctl(s, libc::SIOCGIFFLAGS, &mut ifr) == 0 && {
            ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            libc::ioctl(s, libc::SIOCSIFFLAGS, &ifr) == 0
        };
        libc::close(s);
        ok
    }
}

#[test]
fn a_nic_deleted_and_created_again_is_reported_then_protected_again() {
    let lab = Lab::create("nre").expect("lab");
    let instance = format!("nre{}", std::process::id());
    let _stop = Stop(instance.clone());
    let (daemon, lines) = run_ready(
        &lab.edge,
        &args(&instance, &["ext0=external", "int0=internal"]),
    );
    assert_eq!(
        attached(&lab.edge, EDGE_EXT),
        Some((1.0, "native".to_string()))
    );
    let listeners =
        Listeners::start(&lab.edge, &[22, 443], &[ALLOWED_UDP, FORBIDDEN_UDP]).expect("listeners");
    // One stream across everything below: not one forbidden datagram may get through.
    let across = Datagrams::start(&lab);
    std::thread::sleep(Duration::from_millis(300));

    // Deleted: reported within a second, by name, and exported as not attached.
    let was = ifindex_in(&lab.edge, EDGE_EXT).unwrap();
    ip(&["-n", &lab.edge, "link", "del", EDGE_EXT]).unwrap();
    wait_line(&lines, "reporting ext0 gone", Duration::from_secs(1), |l| {
        l.contains("WARN") && l.contains(&format!("ext0 (ifindex {was}) went away"))
    });
    let gone = attached_becomes(&lab.edge, EDGE_EXT, 0.0, Duration::from_secs(1));
    assert_eq!(gone.1, "none", "a NIC that went away has no XDP mode");
    assert_eq!(
        attached(&lab.edge, EDGE_INT),
        Some((1.0, "native".to_string())),
        "int0 is untouched"
    );

    // Created again, down, as a NIC appears: attached within a second of `ip link add`.
    let t0 = Instant::now();
    let watch = watch_attach(&lab.edge, EDGE_EXT, t0);
    create_ext0(&lab, false);
    let added = t0.elapsed();
    let took = watch.join().unwrap();
    eprintln!(
        "re-created ext0 (down): `ip link add` returned after {:.1} ms, XDP attached {:.1} ms after it was started",
        added.as_secs_f64() * 1000.0,
        took.as_secs_f64() * 1000.0
    );
    assert!(took < Duration::from_secs(1), "re-attached after {took:?}");
    let now = ifindex_in(&lab.edge, EDGE_EXT).unwrap();
    assert_ne!(now, was);
    let logged = wait_line(&lines, "the re-attach", Duration::from_secs(2), |l| {
        l.contains(&format!("a NIC named ext0 appeared (ifindex {now};"))
            && l.contains("attached again")
    });
    eprintln!("{logged}");
    // Brought up and addressed afterwards (as udev and the network configuration do).
    lab.configure_ext0().expect("ext0's addresses and routes");
    assert_eq!(
        attached_becomes(&lab.edge, EDGE_EXT, 1.0, Duration::from_secs(1)),
        (1.0, "native".to_string())
    );
    // The state names the new NIC, and the stale pins were replaced, none left over.
    let state = Instance::new(&instance)
        .unwrap()
        .read_state_file()
        .unwrap()
        .unwrap();
    let b = state.bindings.iter().find(|b| b.name == EDGE_EXT).unwrap();
    assert_eq!((b.ifindex, b.mode.as_deref()), (now, Some("native")));
    assert_eq!(
        pins(&instance),
        ["ext0-tc", "ext0-xdp", "int0-tc", "int0-xdp"]
    );
    assert_eq!(
        pinned_link(&Instance::new(&instance).unwrap().link_pin(EDGE_EXT, "xdp"))
            .map(|l| l.ifindex),
        Some(now)
    );
    // TCP 22 to the Edge is dropped, TCP 443 (P3) passes, on the new NIC.
    let ssh = tcp_exchange(
        &lab.remote,
        SocketAddr::new(CLIENT_V4, 0),
        SocketAddr::new(EDGE_EXT_V4, 22),
        Duration::from_secs(1),
    )
    .unwrap();
    assert!(
        !ssh.connected,
        "TCP 22 reached the Edge on the re-created NIC"
    );
    let https = tcp_exchange(
        &lab.remote,
        SocketAddr::new(CLIENT_V4, 0),
        SocketAddr::new(EDGE_EXT_V4, 443),
        Duration::from_secs(3),
    )
    .unwrap();
    assert!(
        https.answered,
        "TCP 443 (P3) does not pass on the re-created NIC"
    );
    std::thread::sleep(Duration::from_millis(500));
    let sent = across.finish();
    assert_datagrams(&listeners, sent, "across delete and re-create", true);
    assert!(listeners.tcp(22).connections.is_empty());
    drop(listeners);

    // A steady stream on the new NIC: nothing forbidden passes, nothing allowed is lost.
    let listeners =
        Listeners::start(&lab.edge, &[], &[ALLOWED_UDP, FORBIDDEN_UDP]).expect("listeners");
    let steady = Datagrams::start(&lab);
    std::thread::sleep(Duration::from_secs(1));
    assert_datagrams(&listeners, steady.finish(), "on the re-created NIC", false);
    drop(listeners);

    // The worst case: a NIC created already up, a sender on its peer from the first instant.
    // What passes before the attach is measured; nothing passes after it.
    ip(&["-n", &lab.edge, "link", "del", EDGE_EXT]).unwrap();
    attached_becomes(&lab.edge, EDGE_EXT, 0.0, Duration::from_secs(1));
    let tap = tap_all(&lab.edge);
    let stop = Arc::new(AtomicBool::new(false));
    let is_attached = Arc::new(AtomicBool::new(false));
    let counts: Arc<[AtomicU64; 2]> = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let sender = {
        let (ns, stop, is_attached, counts) = (
            lab.remote.clone(),
            stop.clone(),
            is_attached.clone(),
            counts.clone(),
        );
        std::thread::spawn(move || {
            enter_netns(&ns).unwrap();
            let c = std::ffi::CString::new("wan0").unwrap();
            while unsafe { libc::if_nametoindex(c.as_ptr()) } == 0 {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                std::hint::spin_loop();
            }
            assert!(
                set_up("wan0"),
                "wan0 up: {}",
                std::io::Error::last_os_error()
            );
            let tx = RawSender::open(&ns, "wan0").unwrap();
            let frame = forbidden_frame([0x02, 0, 0x5e, 0, 0, 0x01]);
            while !stop.load(Ordering::Relaxed) {
                let after = is_attached.load(Ordering::Relaxed) as usize;
                if tx.send(&frame).is_ok() {
                    counts[after].fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_micros(50));
            }
        })
    };
    let t0 = Instant::now();
    let watch = watch_attach(&lab.edge, EDGE_EXT, t0);
    create_ext0(&lab, true);
    let took = watch.join().unwrap();
    is_attached.store(true, Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    sender.join().unwrap();
    let passed = count_forbidden(&tap);
    let (before, after) = (
        counts[0].load(Ordering::Relaxed),
        counts[1].load(Ordering::Relaxed),
    );
    eprintln!(
        "re-created ext0 already up: XDP attached {:.1} ms after `ip link add` was started; {passed} forbidden frames passed unfiltered, of {before} sent before the attach was seen ({after} sent after it, all dropped)",
        took.as_secs_f64() * 1000.0
    );
    assert!(took < Duration::from_secs(1), "re-attached after {took:?}");
    assert!(after > 1000, "only {after} frames sent after the attach");
    assert!(
        passed <= before,
        "{passed} forbidden frames passed, but only {before} were sent before the attach"
    );
    attached_becomes(&lab.edge, EDGE_EXT, 1.0, Duration::from_secs(1));
    drop(daemon);
}

#[test]
fn run_after_the_namespace_was_recreated_attaches_and_reload_warns_until_then() {
    let mut lab = Lab::create("nns").expect("lab");
    let instance = format!("nns{}", std::process::id());
    let _stop = Stop(instance.clone());
    let ifaces = ["ext0=external", "int0=internal"];
    let first = start_daemon(&lab.edge, &args(&instance, &ifaces));
    let ext0 = ifindex_in(&lab.edge, EDGE_EXT).unwrap();
    let xdp_pin = Instance::new(&instance).unwrap().link_pin(EDGE_EXT, "xdp");
    drop(first);
    // The namespaces go (the NICs with them: the pinned links are severed), and come again
    // with the same names; ext0 gets the same ifindex in the new namespace.
    drop(lab);
    let deadline = Instant::now() + Duration::from_secs(20);
    while pinned_link(&xdp_pin).map(|l| l.ifindex) != Some(0) {
        assert!(Instant::now() < deadline, "the old link never went defunct");
        std::thread::sleep(Duration::from_millis(50));
    }
    lab = Lab::create("nns").expect("lab again");
    assert_eq!(
        ifindex_in(&lab.edge, EDGE_EXT),
        Some(ext0),
        "the scenario: the ifindex is reused"
    );

    // `reload` on the stale instance says which NICs it does not protect.
    let (ok, out, err) = cli(&["reload", "--instance", &instance]);
    assert!(ok, "{out}{err}");
    for nic in [EDGE_EXT, EDGE_INT] {
        assert!(
            err.lines()
                .any(|l| l.contains("WARN") && l.contains(&format!("{nic}: NOT PROTECTED"))),
            "reload does not warn that {nic} is not protected: {err}"
        );
    }

    let listeners =
        Listeners::start(&lab.edge, &[], &[ALLOWED_UDP, FORBIDDEN_UDP]).expect("listeners");
    let (_daemon, lines) = run_ready(&lab.edge, &args(&instance, &ifaces));
    let stream = Datagrams::start(&lab);
    assert!(
        lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("ext0: the pinned XDP link protects nothing here")),
        "{:#?}",
        lines.lock().unwrap()
    );
    assert_eq!(
        pins(&instance),
        ["ext0-tc", "ext0-xdp", "int0-tc", "int0-xdp"]
    );
    for nic in [EDGE_EXT, EDGE_INT] {
        assert_eq!(
            attached(&lab.edge, nic),
            Some((1.0, "native".to_string())),
            "{nic}"
        );
        for kind in ["xdp", "tc"] {
            let l = pinned_link(&Instance::new(&instance).unwrap().link_pin(nic, kind));
            assert_eq!(
                l.map(|l| l.ifindex),
                ifindex_in(&lab.edge, nic),
                "{nic} {kind}"
            );
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    assert_datagrams(&listeners, stream.finish(), "after run", false);
    let (ok, out, err) = cli(&["reload", "--instance", &instance]);
    assert!(ok && !err.contains("NOT PROTECTED"), "{out}{err}");
}

#[test]
fn run_after_a_rename_adopts_the_renamed_nic_in_place() {
    let lab = Lab::create("nrn").expect("lab");
    let instance = format!("nrn{}", std::process::id());
    let _stop = Stop(instance.clone());
    drop(start_daemon(
        &lab.edge,
        &args(&instance, &["ext0=external"]),
    ));
    let link = link_id(&instance, EDGE_EXT, "xdp").expect("ext0's XDP link");
    let listeners =
        Listeners::start(&lab.edge, &[], &[ALLOWED_UDP, FORBIDDEN_UDP]).expect("listeners");
    let mut old = EDGE_EXT.to_string();
    // Renamed once with the state file in place, then again with it gone (the pins alone).
    for (new, state) in [("ext9", true), ("ext8", false)] {
        ip(&["-n", &lab.edge, "link", "set", &old, "down"]).unwrap();
        ip(&["-n", &lab.edge, "link", "set", &old, "name", new]).unwrap();
        ip(&["-n", &lab.edge, "link", "set", new, "up"]).unwrap();
        if !state {
            std::fs::remove_file(Instance::new(&instance).unwrap().state_file()).unwrap();
        }
        let stream = Datagrams::start(&lab);
        std::thread::sleep(Duration::from_millis(300));
        let iface = format!("{new}=external");
        let (daemon, lines) = run_ready(&lab.edge, &args(&instance, &[iface.as_str()]));
        std::thread::sleep(Duration::from_millis(300));
        let what = format!("renamed {old} to {new} (state file kept: {state})");
        assert_eq!(
            pins(&instance),
            [format!("{new}-tc"), format!("{new}-xdp")],
            "{what}: {:#?}",
            lines.lock().unwrap()
        );
        assert_eq!(
            link_id(&instance, new, "xdp"),
            Some(link),
            "{what}: the XDP link was not adopted in place (a new link means a gap)"
        );
        assert_eq!(
            attached(&lab.edge, new),
            Some((1.0, "native".to_string())),
            "{what}"
        );
        let st = Instance::new(&instance)
            .unwrap()
            .read_state()
            .unwrap()
            .unwrap();
        assert_eq!(
            st.bindings
                .iter()
                .map(|b| b.name.as_str())
                .collect::<Vec<_>>(),
            [new],
            "{what}"
        );
        drop(daemon);
        let sent = stream.finish();
        let got = listeners.udp(ALLOWED_UDP).datagrams.len();
        assert_eq!(listeners.udp(FORBIDDEN_UDP).datagrams.len(), 0, "{what}");
        assert!(got > 0 && sent.1 > 100, "{what}: {got} of {sent:?}");
        old = new.to_string();
    }
}

/// `ip -d link show dev` of `dev` in `ns`: the XDP program's id and name.
fn xdp_id_and_name(ns: &str, dev: &str) -> (u32, String) {
    let out = std::process::Command::new("ip")
        .args(["-n", ns, "-d", "link", "show", "dev", dev])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let at = text.find("prog/xdp id ").expect("an XDP program") + "prog/xdp id ".len();
    let mut words = text[at..].split_whitespace();
    let id = words.next().unwrap().parse().unwrap();
    assert_eq!(words.next(), Some("name"), "{text}");
    (id, words.next().unwrap().to_string())
}

#[test]
fn another_xdp_program_on_the_nic_is_named_with_how_to_remove_it() {
    let lab = Lab::create("nxp").expect("lab");
    let dir = std::env::temp_dir().join(format!("ec-nics-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let obj: PathBuf = dir.join("floor.o");
    std::fs::write(&obj, FLOOR_OBJECT).unwrap();
    // Attached through rtnetlink, as `ip` and most tools do.
    ip(&[
        "-n",
        &lab.edge,
        "link",
        "set",
        "dev",
        EDGE_EXT,
        "xdp",
        "obj",
        obj.to_str().unwrap(),
        "sec",
        "xdp",
    ])
    .expect("an XDP program on ext0");
    let (id, name) = xdp_id_and_name(&lab.edge, EDGE_EXT);
    let instance = format!("nxp{}", std::process::id());
    let _stop = Stop(instance.clone());
    let out = in_ns(&lab.edge, BIN)
        .arg("run")
        .args(args(&instance, &["ext0=external"]))
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    for want in [
        format!("`ext0` already runs another XDP program: id {id} `{name}` (native mode)"),
        "ip link set dev ext0 xdp off".to_string(),
        "bpftool net detach xdp dev ext0".to_string(),
        "(os error ".to_string(),
    ] {
        assert!(err.contains(&want), "no {want:?} in: {err}");
    }
    assert!(
        !Instance::new(&instance).unwrap().pin_dir().exists(),
        "the failed start left pins"
    );
    assert_eq!(
        xdp_id_and_name(&lab.edge, EDGE_EXT).0,
        id,
        "the other program stays"
    );

    // Held by a link of another instance: that instance is named.
    ip(&[
        "-n", &lab.edge, "link", "set", "dev", EDGE_EXT, "xdp", "off",
    ])
    .unwrap();
    let holder = format!("nxh{}", std::process::id());
    let _stop_holder = Stop(holder.clone());
    let first = start_daemon(&lab.edge, &args(&holder, &["ext0=external"]));
    let held = xdp_id_and_name(&lab.edge, EDGE_EXT).0;
    let out = in_ns(&lab.edge, BIN)
        .arg("run")
        .args(["--instance", &instance, "--metrics", "127.0.0.1:9478"])
        .args(["--iface", "ext0=external"])
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let link = link_id(&holder, EDGE_EXT, "xdp").unwrap();
    for want in [
        format!("id {held} `edge_classifier` (native mode, held by BPF link {link})"),
        format!("edge-classifier instance `{holder}`"),
        format!("edge-classifier stop --instance {holder}"),
        "(os error ".to_string(),
    ] {
        assert!(err.contains(&want), "no {want:?} in: {err}");
    }
    assert_eq!(
        xdp_id_and_name(&lab.edge, EDGE_EXT).0,
        held,
        "the holder stays"
    );
    drop(first);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A pipe: (read end, write end); the write end's capacity is one page.
fn small_pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };
    (r, w)
}

/// Waits up to `timeout` for `proc` to exit.
fn exits_within(proc: &mut Process, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(s)) = proc.0.try_wait() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

#[test]
fn sighup_reloads_and_sigusr1_into_a_full_stdout_blocks_neither_metrics_nor_sigterm() {
    let lab = Lab::create("nsg").expect("lab");
    let instance = format!("nsg{}", std::process::id());
    let _stop = Stop(instance.clone());
    let (read, write) = small_pipe();
    let (mut daemon, lines) = spawn_logged(
        &lab.edge,
        &args(&instance, &["ext0=external"]),
        Stdio::from(write),
    );
    // Read the `ready` line, then never again.
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !got.ends_with(b"ready\n") {
        assert!(
            Instant::now() < deadline,
            "no `ready`: {:#?}",
            lines.lock().unwrap()
        );
        let mut b = [0u8; 1];
        if unsafe { libc::read(read.as_raw_fd(), b.as_mut_ptr().cast(), 1) } == 1 {
            got.push(b[0]);
        }
    }
    let listeners =
        Listeners::start(&lab.edge, &[], &[ALLOWED_UDP, FORBIDDEN_UDP]).expect("listeners");
    let stream = Datagrams::start(&lab);

    // SIGHUP reloads (the catalogue file again) and the daemon goes on.
    unsafe { libc::kill(daemon.pid(), libc::SIGHUP) };
    wait_line(&lines, "the SIGHUP reload", Duration::from_secs(10), |l| {
        l.contains(&format!("reload by pid {} ", daemon.pid())) && l.contains("in force")
    });
    let text = http_get(&lab.edge, METRICS, "/metrics".into());
    assert_eq!(
        metric(
            &text,
            "edge_classifier_reloads_total",
            &[("result", "success")]
        ),
        Some(1.0)
    );

    // Counter tables into a pipe nobody reads: it fills after two or three.
    for _ in 0..6 {
        unsafe { libc::kill(daemon.pid(), libc::SIGUSR1) };
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(300));
    let asked = Instant::now();
    let text = http_get(&lab.edge, METRICS, "/metrics".into());
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "/metrics took {:?} with stdout full",
        asked.elapsed()
    );
    assert_eq!(
        metric(
            &text,
            "edge_classifier_interface_attached",
            &[("interface", EDGE_EXT)]
        ),
        Some(1.0)
    );
    wait_line(&lines, "a dropped table", Duration::from_secs(1), |l| {
        l.contains("stdout is not being read")
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_datagrams(
        &listeners,
        stream.finish(),
        "through SIGHUP and SIGUSR1",
        false,
    );

    let asked = Instant::now();
    unsafe { libc::kill(daemon.pid(), libc::SIGTERM) };
    let status = exits_within(&mut daemon, Duration::from_secs(5))
        .unwrap_or_else(|| panic!("SIGTERM did not stop the daemon with stdout full"));
    eprintln!("stopped {:?} after SIGTERM: {status}", asked.elapsed());
    assert!(status.success(), "{status}: {:#?}", lines.lock().unwrap());
    drop(read);
}

#[test]
fn a_closed_stdout_does_not_stop_the_daemon() {
    let lab = Lab::create("npp").expect("lab");
    let instance = format!("npp{}", std::process::id());
    let _stop = Stop(instance.clone());
    // `run | true`: the reader is gone before the daemon writes anything.
    let (read, write) = small_pipe();
    drop(read);
    let (mut daemon, lines) = spawn_logged(
        &lab.edge,
        &args(&instance, &["ext0=external"]),
        Stdio::from(write),
    );
    wait_line(&lines, "serving metrics", Duration::from_secs(60), |l| {
        l.contains("serving metrics")
    });
    wait_line(&lines, "the closed stdout", Duration::from_secs(5), |l| {
        l.contains("stdout is closed")
    });
    let listeners =
        Listeners::start(&lab.edge, &[22], &[ALLOWED_UDP, FORBIDDEN_UDP]).expect("listeners");
    let stream = Datagrams::start(&lab);
    unsafe { libc::kill(daemon.pid(), libc::SIGUSR1) };
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        exits_within(&mut daemon, Duration::from_millis(100)).is_none(),
        "the daemon died with stdout closed: {:#?}",
        lines.lock().unwrap()
    );
    assert_eq!(
        attached(&lab.edge, EDGE_EXT),
        Some((1.0, "native".to_string()))
    );
    let ssh = tcp_exchange(
        &lab.remote,
        SocketAddr::new(CLIENT_V4, 0),
        SocketAddr::new(EDGE_EXT_V4, 22),
        Duration::from_secs(1),
    )
    .unwrap();
    assert!(!ssh.connected, "TCP 22 reached the Edge");
    assert_datagrams(&listeners, stream.finish(), "with stdout closed", false);
    unsafe { libc::kill(daemon.pid(), libc::SIGTERM) };
    let status = exits_within(&mut daemon, Duration::from_secs(5)).expect("stops on SIGTERM");
    assert!(status.success(), "{status}: {:#?}", lines.lock().unwrap());
    assert!(
        !lines.lock().unwrap().iter().any(|l| l.contains("panicked")),
        "{:#?}",
        lines.lock().unwrap()
    );
}
