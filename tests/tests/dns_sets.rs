//! Address sets fed from DNS (issue 21), against a real authoritative server: BIND 9 (`named`,
//! Debian's bind9) in the peer lab's `wan` namespace on 198.51.100.1:53, the real daemon
//! (`edge-classifier run`) on the Edge's NICs, and P1 connections (TCP 5061 from
//! `public_im_partners`) from the partner's host through the kernel.
//!
//! The partner's host carries three addresses: 203.0.113.5 (a prefix of the set), and .6 and .7,
//! which only DNS puts in the set: `_sipfederationtls._tcp.dyn.example` names
//! `sip.dyn.example`, whose A record (TTL 2 s) moves between them.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use edge_classifier_lab::{
    in_netns, ip,
    peers::{self, Daemon, EdgeInstance, PeerLab, wait_for},
    tcp_connect,
};
use socket2::{Domain, Protocol, Socket, Type};

const OLD: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 6);
const NEW: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
/// The record TTL the zones carry.
const TTL: Duration = Duration::from_secs(2);
/// Targets of `big.example`'s SRV record.
const BIG: usize = 1000;
/// Where `named` listens: the router on the Edge's external segment.
const DNS: &str = "198.51.100.1";

/// `big.example`'s i-th target address: 100.64.0.0/22.
fn big_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(100, 64, (i / 250) as u8, (i % 250 + 1) as u8)
}

/// A zone file: SOA, NS and `records`, every record with TTL 2 s.
fn zone(origin: &str, serial: u32, records: &str) -> String {
    format!(
        "$TTL 2\n$ORIGIN {origin}.\n@ IN SOA ns.{origin}. admin.{origin}. {serial} 60 60 600 2\n@ IN NS ns.{origin}.\nns IN A {DNS}\n{records}"
    )
}

fn dyn_zone(serial: u32, sip: Ipv4Addr) -> String {
    zone(
        "dyn.example",
        serial,
        &format!("_sipfederationtls._tcp IN SRV 0 0 5061 sip.dyn.example.\nsip IN A {sip}\n"),
    )
}

/// BIND 9 serving `dyn.example`, `big.example` and `broken.example` (a zone that fails to load:
/// SERVFAIL); `gone.dyn.example` does not exist (NXDOMAIN). `max-records-per-type 0`: since
/// 9.18.28 BIND refuses to load more than 100 records of one type at a name, such as
/// big.example's 1,000 SRV records, unless told otherwise.
struct Named {
    dir: PathBuf,
    serial: u32,
    daemon: Option<Daemon>,
}

impl Named {
    fn start(lab: &PeerLab) -> Named {
        let dir = lab.subdir("named").expect("named dir");
        let d = dir.display();
        std::fs::write(
            dir.join("named.conf"),
            format!(
                "options {{\n  directory \"{d}\";\n  pid-file \"{d}/named.pid\";\n  session-keyfile \"{d}/session.key\";\n  listen-on port 53 {{ {DNS}; }};\n  listen-on-v6 {{ none; }};\n  recursion no;\n  dnssec-validation no;\n  max-records-per-type 0;\n}};\ncontrols {{ }};\nzone \"dyn.example\" {{ type primary; file \"{d}/dyn.zone\"; }};\nzone \"big.example\" {{ type primary; file \"{d}/big.zone\"; }};\nzone \"broken.example\" {{ type primary; file \"{d}/broken.zone\"; }};\n"
            ),
        )
        .expect("named.conf");
        std::fs::write(dir.join("dyn.zone"), dyn_zone(1, OLD)).expect("zone");
        let mut big = String::new();
        for i in 0..BIG {
            big.push_str(&format!(
                "_sipfederationtls._tcp IN SRV 0 0 5061 t{i}.big.example.\nt{i} IN A {}\n",
                big_addr(i)
            ));
        }
        std::fs::write(dir.join("big.zone"), zone("big.example", 1, &big)).expect("zone");
        std::fs::write(dir.join("broken.zone"), "this is not a zone file\n").expect("zone");
        let mut n = Named {
            dir,
            serial: 1,
            daemon: None,
        };
        n.run(lab);
        n
    }

    fn run(&mut self, lab: &PeerLab) {
        let conf = self.dir.join("named.conf").display().to_string();
        let mut d = lab
            .spawn(&lab.wan, "named", "named", &["-g", "-c", &conf])
            .expect("named (Debian package bind9; `cargo xtask setup` installs it)");
        lab.wait_listening(&lab.wan, true, 53, &mut d);
        self.daemon = Some(d);
    }

    /// Points `sip.dyn.example` at `to` and has named load the zone again (SIGHUP).
    fn move_sip(&mut self, to: Ipv4Addr) {
        self.serial += 1;
        std::fs::write(self.dir.join("dyn.zone"), dyn_zone(self.serial, to)).expect("zone");
        let pid = self.daemon.as_ref().expect("named runs").pid() as i32;
        // `spawn` runs named under nsenter/unshare/sh, which exec it: the pid is named's.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0, "SIGHUP named");
    }

    fn stop(&mut self) {
        self.daemon.take();
    }
}

/// The lab's seed catalogue with `public_im_partners` fed from DNS next to its prefix, two
/// troubled domains, and the resolver pointed at named with short clamps.
fn catalogue(with_big: bool) -> String {
    let seed = PeerLab::catalogue_text();
    let line = "public_im_partners = [\"203.0.113.0/24\"]\n";
    assert!(
        seed.contains(line),
        "the lab's catalogue names its partners"
    );
    let mut text = seed.replace(line, "");
    text.push_str(
        r#"
[sets.public_im_partners]
prefixes = ["203.0.113.5/32"]
domains = ["dyn.example"]
srv = ["_sipfederationtls._tcp"]

[sets.troubled_partners]
domains = ["broken.example", "gone.dyn.example"]
srv = ["_sipfederationtls._tcp"]

[dns]
servers = ["198.51.100.1"]
min_ttl = 1
max_ttl = 60
stale_after = 4
timeout = 1
"#,
    );
    if with_big {
        text = text.replace(
            "domains = [\"dyn.example\"]",
            "domains = [\"dyn.example\", \"big.example\"]",
        );
    }
    text
}

/// P1 from `src`: a TCP connection to the Edge's 5061 completes.
fn p1(lab: &PeerLab, src: Ipv4Addr, timeout: Duration) -> bool {
    tcp_connect(
        &lab.partner,
        IpAddr::V4(src),
        SocketAddr::new(peers::EDGE_EXT.into(), 5061),
        timeout,
    )
    .expect("connect")
}

/// Polls P1 from `src` until it passes; the time it took.
fn until_p1(lab: &PeerLab, src: Ipv4Addr, within: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < within {
        if p1(lab, src, Duration::from_millis(100)) {
            return Some(t0.elapsed());
        }
    }
    None
}

/// One series' value in the metrics text (`name{labels} value`), by a substring of its labels.
fn metric(text: &str, name: &str, labels: &str) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(labels))
        .find_map(|l| l.rsplit_once(' ')?.1.parse().ok())
}

/// A TCP connection from `src` in `ns` to `dst`:5061 held open (an echo server answers there).
fn open_session(ns: &str, src: Ipv4Addr, dst: Ipv4Addr) -> std::net::TcpStream {
    in_netns(ns, move || {
        let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
        s.bind(&SocketAddr::new(src.into(), 0).into())?;
        s.connect_timeout(
            &SocketAddr::new(dst.into(), 5061).into(),
            Duration::from_secs(3),
        )?;
        let s: std::net::TcpStream = s.into();
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        Ok(s)
    })
    .expect("session")
}

/// Whether a line sent over the session comes back.
fn echoes(s: &mut std::net::TcpStream) -> bool {
    let mut buf = [0u8; 5];
    s.write_all(b"ping\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"ping\n"
}

#[test]
fn partner_sets_follow_dns_srv_and_a_records() {
    let lab = PeerLab::create("dns").expect("peer lab");
    // The partner's host answers from .6 and .7 too, and from big.example's last target; the
    // router knows where the 100.64.0.0/22 targets live.
    for a in [OLD, NEW] {
        ip(&[
            "-n",
            &lab.partner,
            "addr",
            "add",
            &format!("{a}/24"),
            "dev",
            "eth0",
        ])
        .unwrap();
    }
    let big_last = big_addr(BIG - 1);
    ip(&[
        "-n",
        &lab.partner,
        "addr",
        "add",
        &format!("{big_last}/32"),
        "dev",
        "eth0",
    ])
    .unwrap();
    ip(&[
        "-n",
        &lab.wan,
        "route",
        "add",
        "100.64.0.0/22",
        "via",
        &peers::PARTNER.to_string(),
    ])
    .unwrap();
    let mut named = Named::start(&lab);
    // Echo servers on the Edge's 5061 (P1) and the partner's (P2, S1).
    let _echo = [&lab.edge, &lab.partner].map(|ns| {
        lab.spawn(
            ns,
            &format!("echo-5061-{ns}"),
            "socat",
            &["TCP-LISTEN:5061,fork,reuseaddr", "EXEC:cat"],
        )
        .expect("socat")
    });
    let edge = EdgeInstance::new(&lab, "dns-sets");
    let file = lab.dir.join("edge.toml");
    std::fs::write(&file, catalogue(false)).unwrap();
    let check = lab
        .command(&lab.edge, &edge.bin)
        .args(["check", file.to_str().unwrap()])
        .output()
        .expect("edge-classifier check");
    let mut daemon = edge.run(&file, "daemon-1");

    // 1. SRV → target → A: .6 joins the set; P1 from it passes, from .7 it is dropped.
    let resolved = until_p1(&lab, OLD, Duration::from_secs(10));
    assert!(
        resolved.is_some(),
        "P1 from {OLD} never passed:\n{}",
        daemon.printed()
    );
    assert!(
        !p1(&lab, NEW, Duration::from_millis(500)),
        "{NEW} is in no set yet"
    );
    assert!(
        check.status.success()
            && String::from_utf8_lossy(&check.stdout).contains("3 DNS names in 2 sets"),
        "check: {check:?}"
    );
    let text = edge.metrics();
    assert_eq!(
        metric(
            &text,
            "edge_classifier_dns_addresses",
            "domain=\"dyn.example\""
        ),
        Some(1.0),
        "{text}"
    );
    assert!(
        metric(
            &text,
            "edge_classifier_dns_last_success_timestamp_seconds",
            "domain=\"dyn.example\""
        )
        .unwrap()
            > 0.0
    );
    // SERVFAIL (a zone named cannot load) and NXDOMAIN: counted by kind, nothing in the set.
    let failing = wait_for(Duration::from_secs(5), || {
        let t = edge.metrics();
        let servfail = metric(
            &t,
            "edge_classifier_dns_failures_total",
            "domain=\"broken.example\",kind=\"servfail\"",
        )?;
        let nx = metric(
            &t,
            "edge_classifier_dns_failures_total",
            "domain=\"gone.dyn.example\",kind=\"nxdomain\"",
        )?;
        (servfail >= 1.0 && nx >= 1.0).then_some(t)
    });
    let t = failing.unwrap_or_else(|| panic!("no SERVFAIL/NXDOMAIN counted:\n{}", edge.metrics()));
    for d in ["broken.example", "gone.dyn.example"] {
        assert_eq!(
            metric(
                &t,
                "edge_classifier_dns_addresses",
                &format!("domain=\"{d}\"")
            ),
            Some(0.0)
        );
    }
    assert!(daemon.printed().contains("SERVFAIL") || daemon.printed().contains("servfail"));
    // `status` and `explain` say where the address came from.
    let status = edge.cli(&["status"]);
    assert!(
        status.contains("203.0.113.6") && status.contains("dyn.example"),
        "status:\n{status}"
    );
    let explained = edge.try_cli(&[
        "explain",
        "tcp",
        &format!("{OLD}:40000"),
        &format!("{}:5061", peers::EDGE_EXT),
    ]);
    let explained_text = String::from_utf8_lossy(&explained.stdout).into_owned();
    assert!(
        explained.status.success() && explained_text.contains("dyn.example"),
        "explain: {explained:?}"
    );

    // 2. The record moves (TTL 2 s): the set follows within TTL + 1 s, the old address drops,
    // and a session open from the old address ends (its next segment is dropped).
    let mut session = open_session(&lab.partner, OLD, peers::EDGE_EXT);
    assert!(echoes(&mut session), "a session from {OLD} before the move");
    // A flow the Edge opened to the partner's address under P2 (remote public_im_partners).
    let mut outbound = open_session(&lab.edge, peers::EDGE_EXT, OLD);
    assert!(echoes(&mut outbound), "the Edge's P2 session to {OLD}");
    let p2 = edge.rule("public-im-sip-out");
    let s1 = edge.rule("sip-federation-out");
    assert!(p2 > 0, "the Edge's session to {OLD} counts as P2");
    let mut latencies = Vec::new();
    let (mut from, mut to) = (OLD, NEW);
    for round in 0..4 {
        named.move_sip(to);
        let took = until_p1(&lab, to, TTL + Duration::from_secs(3)).unwrap_or_else(|| {
            panic!(
                "round {round}: P1 from {to} never passed:\n{}",
                daemon.printed()
            )
        });
        assert!(
            took <= TTL + Duration::from_secs(1),
            "round {round}: the set followed the record after {took:?}, more than TTL + 1 s"
        );
        latencies.push(took);
        assert!(
            !p1(&lab, from, Duration::from_millis(500)),
            "round {round}: {from} left the set but P1 from it still passes"
        );
        if round == 0 {
            assert!(
                !echoes(&mut session),
                "a session from {from}, which left the set, still passes"
            );
            // The P2 flow to the address that left the set was purged at the flip, as a removed
            // rule's flows are; the Edge's next segment is classified afresh and recorded
            // under S1 (remote "any"), so in this catalogue the session goes on under S1.
            assert!(
                daemon
                    .printed()
                    .contains("1 flows to addresses that left their rule's remote set ended"),
                "{}",
                daemon.printed()
            );
            assert!(
                echoes(&mut outbound),
                "the Edge's session to {from} under S1"
            );
            assert!(edge.rule("sip-federation-out") > s1, "S1 counts it now");
            assert_eq!(edge.rule("public-im-sip-out"), p2, "P2 no longer counts it");
        }
        std::mem::swap(&mut from, &mut to);
    }
    eprintln!("refresh latency after a record change (TTL 2 s), per round: {latencies:?}");
    // The record ends on OLD after an even number of moves.
    assert_eq!(to, NEW);

    // 3. The server stops: the last good address stays, the failures are counted, the name
    // turns stale after [dns] stale_after (4 s), and the alert rule fires in Prometheus.
    let prom = Prometheus::start(&lab);
    named.stop();
    let stopped = Instant::now();
    let dyn_failures = |t: &str| -> f64 {
        t.lines()
            .filter(|l| {
                l.starts_with("edge_classifier_dns_failures_total{")
                    && l.contains("domain=\"dyn.example\"")
            })
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    };
    let stale = wait_for(Duration::from_secs(15), || {
        let t = edge.metrics();
        let stale = metric(&t, "edge_classifier_dns_stale", "domain=\"dyn.example\"")?;
        (stale == 1.0 && dyn_failures(&t) >= 1.0).then_some(t)
    })
    .unwrap_or_else(|| panic!("never stale with failures counted:\n{}", edge.metrics()));
    assert!(
        stopped.elapsed() >= Duration::from_secs(3),
        "stale too early"
    );
    assert_eq!(
        metric(
            &stale,
            "edge_classifier_dns_addresses",
            "domain=\"dyn.example\""
        ),
        Some(1.0)
    );
    assert!(
        p1(&lab, OLD, Duration::from_secs(2)),
        "the last good address must stay"
    );
    assert!(
        daemon.printed().contains("are stale"),
        "{}",
        daemon.printed()
    );
    let fired = wait_for(Duration::from_secs(30), || {
        prom.firing("EdgeClassifierPartnerSetStale").then_some(())
    });
    assert!(
        fired.is_some(),
        "the stale alert did not fire: {}",
        prom.alerts()
    );

    // 4. A reload while DNS is down keeps the resolved address (it is not resolved again).
    edge.cli(&["reload", "--catalogue", file.to_str().unwrap()]);
    assert!(
        p1(&lab, OLD, Duration::from_secs(2)),
        "the reload dropped the resolved address"
    );

    // 5. A restart of the daemon while DNS is down adopts the pins with the resolved address
    // (recorded with the rule buffer): it stays in force and is reported stale again.
    daemon.kill();
    let mut daemon = edge.run(&file, "daemon-2");
    assert!(
        p1(&lab, OLD, Duration::from_secs(2)),
        "the restart dropped the resolved address"
    );
    let restarted = wait_for(Duration::from_secs(15), || {
        let t = edge.metrics();
        (metric(
            &t,
            "edge_classifier_dns_addresses",
            "domain=\"dyn.example\"",
        )? == 1.0
            && metric(&t, "edge_classifier_dns_stale", "domain=\"dyn.example\"")? == 1.0)
            .then_some(())
    });
    assert!(
        restarted.is_some(),
        "after the restart:\n{}",
        edge.metrics()
    );

    // 6. A domain with 1,000 SRV targets, added by a reload once DNS is back: every target's
    // address is in the set (P1 from the last one passes).
    named.run(&lab);
    std::fs::write(&file, catalogue(true)).unwrap();
    let t0 = Instant::now();
    edge.cli(&["reload", "--catalogue", file.to_str().unwrap()]);
    let big = until_p1(&lab, big_last, Duration::from_secs(30));
    assert!(
        big.is_some(),
        "P1 from {big_last} never passed:\n{}",
        daemon.printed()
    );
    let took = t0.elapsed();
    let t = edge.metrics();
    assert_eq!(
        metric(
            &t,
            "edge_classifier_dns_addresses",
            "domain=\"big.example\""
        ),
        Some(BIG as f64),
        "{t}"
    );
    eprintln!("big.example ({BIG} SRV targets) resolved and in force {took:?} after the reload");
    assert!(
        p1(&lab, OLD, Duration::from_secs(2)),
        "dyn.example's address stays"
    );
    assert!(daemon.alive(), "{}", daemon.printed());
    daemon.kill();
}

/// Prometheus in the edge namespace scraping the daemon with the shipped alert rules.
struct Prometheus<'a> {
    lab: &'a PeerLab,
    _daemon: Daemon,
}

impl<'a> Prometheus<'a> {
    fn start(lab: &'a PeerLab) -> Prometheus<'a> {
        let dir = lab.subdir("prometheus").unwrap();
        let rules =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboards/alerts.yml");
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: edge-classifier\n    static_configs:\n      - targets: [\"127.0.0.1:9477\"]\n",
                rules.display()
            ),
        )
        .unwrap();
        let d = lab
            .spawn(
                &lab.edge,
                "prometheus",
                "prometheus",
                &[
                    &format!("--config.file={}", config.display()),
                    &format!("--storage.tsdb.path={}", dir.join("data").display()),
                    "--web.listen-address=127.0.0.1:9090",
                ],
            )
            .expect("prometheus (Debian package prometheus)");
        Prometheus { lab, _daemon: d }
    }

    /// `/api/v1/alerts` as text.
    fn alerts(&self) -> String {
        self.lab
            .http_get(&self.lab.edge, "http://127.0.0.1:9090/api/v1/alerts")
            .unwrap_or_default()
    }

    fn firing(&self, name: &str) -> bool {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&self.alerts()) else {
            return false;
        };
        v["data"]["alerts"].as_array().is_some_and(|a| {
            a.iter()
                .any(|x| x["labels"]["alertname"] == name && x["state"] == "firing")
        })
    }
}
