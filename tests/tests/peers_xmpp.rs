//! Issue 17, the XMPP rows with real peers: the partner's DNS server (dnsmasq) answering the
//! Edge through the classifier, Prosody federating with Prosody over s2s 5269 both ways (X1,
//! X2), and a TLS service with client certificates on the Edge's internal 23456 (X3). The lab
//! is `edge_classifier_lab::peers`.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use edge_classifier::{compile::compile, maps::Holds};
use edge_classifier_common::reason;
use edge_classifier_lab::{
    Listeners, Tap, count,
    peers::{self, Counters, Daemon, EXT, EdgeInstance, PeerLab, wait_for},
    tcp_connect, tcp_exchange, udp_send,
};

const DENIED: Duration = Duration::from_millis(500);

#[test]
fn dns_srv_lookups_from_the_edge_pass_the_classifier_and_unsolicited_dns_does_not() {
    let lab = PeerLab::create("dns").expect("peer lab");
    let classifier = lab
        .attach()
        .expect("classifier attached in the edge namespace");
    let c = Counters(&classifier);
    let tracked = c.reason(EXT, reason::PASS_TRACKED_REPLY);
    let egress = c.reason(EXT, reason::PASS_EGRESS_TRACKED);

    // dig reads /etc/resolv.conf: the lab's, naming the partner's dnsmasq.
    let srv = lab
        .dig(
            &lab.edge,
            &["+short", "SRV", "_xmpp-server._tcp.partner.example"],
        )
        .expect("SRV lookup from the edge");
    assert!(
        srv.contains("5269 partner.example."),
        "SRV answer from the edge: {srv:?}"
    );
    let a = lab
        .dig(&lab.edge, &["+short", "A", "sip.partner.example"])
        .expect("A lookup from the edge");
    assert_eq!(a.trim(), peers::PARTNER.to_string());
    assert!(
        c.reason(EXT, reason::PASS_EGRESS_TRACKED) >= egress + 2,
        "the queries left as tracked egress"
    );
    assert!(
        c.reason(EXT, reason::PASS_TRACKED_REPLY) >= tracked + 2,
        "the answers passed as replies to tracked flows"
    );

    // An unsolicited datagram from port 53 to an open port on the Edge never arrives.
    let listeners = Listeners::start(&lab.edge, &[], &[40053]).expect("edge listener");
    let dropped = c.reason(EXT, reason::DROP_NO_RULE) + c.reason(EXT, reason::DROP_NOT_ESTABLISHED);
    let answered = udp_send(
        &lab.stranger,
        SocketAddr::new(IpAddr::V4(peers::STRANGER), 53),
        SocketAddr::new(IpAddr::V4(peers::EDGE_EXT), 40053),
        DENIED,
    )
    .expect("udp from port 53");
    assert!(!answered, "an unsolicited DNS 'answer' was answered");
    assert!(listeners.udp(40053).datagrams.is_empty());
    assert!(
        c.reason(EXT, reason::DROP_NO_RULE) + c.reason(EXT, reason::DROP_NOT_ESTABLISHED) > dropped,
        "the unsolicited datagram was counted as dropped"
    );
    // The query still works afterwards, from the stranger's side too (DNS is no Edge rule).
    let srv = lab
        .dig(
            &lab.stranger,
            &["+short", "SRV", "_sipfederationtls._tcp.edge.example"],
        )
        .expect("SRV lookup from the stranger");
    assert!(srv.contains("5061 sip.edge.example."), "{srv:?}");
}

/// A Prosody server for `domain` in `ns`: config, data, pid file, certificate and log in a
/// directory of its own; c2s on 127.0.0.1:5222, s2s on `s2s_addr`:5269. s2s authenticates with
/// certificates from the lab's CA (`s2s_secure_auth`), found through `_xmpp-server._tcp`.
struct Prosody {
    daemon: Daemon,
    config: PathBuf,
    log: PathBuf,
}

impl Prosody {
    fn start(lab: &PeerLab, ns: &str, domain: &str, s2s_addr: Ipv4Addr) -> Prosody {
        let dir = lab.subdir(&format!("prosody-{domain}")).expect("dir");
        std::fs::create_dir_all(dir.join("data")).expect("data dir");
        let cert = lab
            .cert(domain, &[domain], &[IpAddr::V4(s2s_addr)])
            .expect("certificate");
        let log = dir.join("prosody.log");
        let config = dir.join("prosody.cfg.lua");
        let d = dir.display();
        let text = format!(
            r#"-- peer lab: Prosody for {domain} (issue 17)
run_as_root = true
pidfile = "{d}/prosody.pid"
data_path = "{d}/data"
log = {{ {{ levels = {{ min = "debug" }}, to = "file", filename = "{log}" }} }}
modules_enabled = {{ "roster"; "saslauth"; "tls"; "dialback"; "disco"; "ping"; "posix" }}
modules_disabled = {{ "offline" }}
authentication = "internal_plain"
c2s_ports = {{ 5222 }}
c2s_interfaces = {{ "127.0.0.1" }}
s2s_ports = {{ 5269 }}
s2s_interfaces = {{ "{s2s_addr}" }}
c2s_require_encryption = true
s2s_require_encryption = true
s2s_secure_auth = true
ssl = {{ cafile = "{ca}"; key = "{key}"; certificate = "{cert}" }}
VirtualHost "{domain}"
    ssl = {{ cafile = "{ca}"; key = "{key}"; certificate = "{cert}" }}
"#,
            log = log.display(),
            ca = lab.ca.display(),
            key = cert.key.display(),
            cert = cert.cert.display(),
        );
        std::fs::write(&config, text).expect("prosody config");
        let cfg = config.to_str().expect("utf-8").to_string();
        for user in ["alice", "bob"] {
            lab.run_ok(
                ns,
                Duration::from_secs(20),
                "prosodyctl",
                &["--config", &cfg, "register", user, domain, PASSWORD],
            )
            .expect("prosodyctl register");
        }
        let daemon = lab
            .spawn(
                ns,
                &format!("prosody-{domain}"),
                "prosody",
                &["-F", "--config", &cfg],
            )
            .expect("start prosody");
        let p = Prosody {
            daemon,
            config,
            log,
        };
        p.wait_listening(lab, ns);
        p
    }

    fn wait_listening(&self, lab: &PeerLab, ns: &str) {
        let up = wait_for(Duration::from_secs(15), || {
            let ss = lab
                .run_ok(ns, Duration::from_secs(5), "ss", &["-Htln"])
                .unwrap_or_default();
            (ss.contains(":5269") && ss.contains("127.0.0.1:5222")).then_some(())
        });
        assert!(
            up.is_some(),
            "prosody ({}) did not listen: {}\n{}",
            self.config.display(),
            self.daemon.printed(),
            self.log_text()
        );
    }

    /// Killed with -9 and started again with the same config and data.
    fn restart(&mut self, lab: &PeerLab, ns: &str) {
        self.daemon.kill();
        let cfg = self.config.to_str().expect("utf-8").to_string();
        self.daemon = lab
            .spawn(
                ns,
                &self.daemon.name.clone(),
                "prosody",
                &["-F", "--config", &cfg],
            )
            .expect("start prosody again");
        self.wait_listening(lab, ns);
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

const PASSWORD: &str = "peer-lab-secret";

/// The XMPP client: slixmpp. `recv` stays connected and prints `GOT <from> <type> <body>` for
/// every message; `send` sends one chat message and leaves.
const CLIENT_PY: &str = r#"
import asyncio, sys, pathlib, slixmpp
mode, jid, password, ca, peer, body = sys.argv[1:7]

class Client(slixmpp.ClientXMPP):
    def __init__(self):
        super().__init__(jid, password)
        self.ca_certs = pathlib.Path(ca)
        self.add_event_handler("session_start", self.start)
        self.add_event_handler("message", self.message)
        self.add_event_handler("failed_auth", lambda *_: (print("AUTH FAILED", flush=True), sys.exit(2)))

    async def start(self, _):
        self.send_presence()
        await self.get_roster()
        print("READY", flush=True)
        if mode == "send":
            self.send_message(mto=peer, mbody=body, mtype="chat")
            print("SENT", flush=True)
            await asyncio.sleep(1.5)
            self.disconnect()

    def message(self, msg):
        print("GOT", msg["from"].bare, msg["type"], msg["body"], flush=True)

c = Client()
done = c.loop.create_future()
c.add_event_handler("disconnected", lambda _: done.done() or done.set_result(None))
c.connect(address=("127.0.0.1", 5222))
if mode == "send":
    # (process(timeout=) of slixmpp 1.8.3 fails on Python 3.11: it passes asyncio.wait a coroutine)
    c.loop.run_until_complete(asyncio.wait_for(done, 30))
else:
    c.process(forever=True)
"#;

struct Xmpp<'a> {
    lab: &'a PeerLab,
    script: PathBuf,
}

impl Xmpp<'_> {
    /// A client of `jid`'s server in `ns` that prints every message it gets; returned once online.
    fn receiver(&self, ns: &str, jid: &str) -> Daemon {
        let mut d = self
            .lab
            .spawn(
                ns,
                &format!("recv-{jid}"),
                PYTHON,
                &[
                    self.script.to_str().expect("utf-8"),
                    "recv",
                    jid,
                    PASSWORD,
                    self.lab.ca.to_str().expect("utf-8"),
                    "-",
                    "-",
                ],
            )
            .expect("start receiver");
        let ready = wait_for(Duration::from_secs(20), || {
            d.printed().contains("READY").then_some(())
        });
        assert!(
            ready.is_some() && d.alive(),
            "{jid} did not come online: {}",
            d.printed()
        );
        d
    }

    /// `from` (a user of the server in `ns`) sends `body` to `to`.
    fn send(&self, ns: &str, from: &str, to: &str, body: &str) {
        let out = self
            .lab
            .run(
                ns,
                Duration::from_secs(40),
                PYTHON,
                &[
                    self.script.to_str().expect("utf-8"),
                    "send",
                    from,
                    PASSWORD,
                    self.lab.ca.to_str().expect("utf-8"),
                    to,
                    body,
                ],
            )
            .expect("run sender");
        let printed = String::from_utf8_lossy(&out.stdout);
        assert!(
            printed.contains("SENT"),
            "{from} could not send: {printed}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The Debian Python, where python3-slixmpp is installed (not a pyenv on PATH).
const PYTHON: &str = "/usr/bin/python3";

/// Waits until `receiver` printed `body` from `from`.
fn delivered(receiver: &Daemon, from: &str, body: &str, timeout: Duration) -> bool {
    let want = format!("GOT {from} chat {body}");
    wait_for(timeout, || receiver.printed().contains(&want).then_some(())).is_some()
}

/// The local port of the Edge's TCP connection to `remote`, from `ss`.
fn edge_local_port(lab: &PeerLab, remote: SocketAddr) -> Option<u16> {
    let ss = lab
        .run_ok(
            &lab.edge,
            Duration::from_secs(5),
            "ss",
            &["-Htn", "state", "established"],
        )
        .ok()?;
    ss.lines().find_map(|l| {
        let cols: Vec<&str> = l.split_whitespace().collect();
        let (local, peer) = (cols.get(cols.len().checked_sub(2)?)?, cols.last()?);
        (*peer == remote.to_string().as_str())
            .then(|| local.rsplit(':').next()?.parse().ok())
            .flatten()
    })
}

#[test]
fn xmpp_federation_with_prosody_both_ways_through_srv() {
    let lab = PeerLab::create("xmpp").expect("peer lab");
    let mut classifier = lab
        .attach()
        .expect("classifier attached in the edge namespace");
    let script = lab.dir.join("xmpp_client.py");
    std::fs::write(&script, CLIENT_PY).expect("client script");
    let xmpp = Xmpp { lab: &lab, script };

    let tap = Tap::open(&lab.edge, EXT).expect("tap ext0").record();
    let mut edge_prosody = Prosody::start(&lab, &lab.edge, "edge.example", peers::EDGE_EXT);
    let mut partner_prosody = Prosody::start(&lab, &lab.partner, "partner.example", peers::PARTNER);
    let bob_partner = xmpp.receiver(&lab.partner, "bob@partner.example");
    let bob_edge = xmpp.receiver(&lab.edge, "bob@edge.example");

    let (x1, x2) = {
        let c = Counters(&classifier);
        (
            c.rule(EXT, "xmpp-federation-in"),
            c.rule(EXT, "xmpp-federation-out"),
        )
    };

    // X2: the Edge's Prosody finds partner.example through _xmpp-server._tcp and connects.
    xmpp.send(
        &lab.edge,
        "alice@edge.example",
        "bob@partner.example",
        "edge-to-partner-1",
    );
    assert!(
        delivered(
            &bob_partner,
            "alice@edge.example",
            "edge-to-partner-1",
            MESSAGE
        ),
        "edge -> partner not delivered\nreceiver: {}\nedge prosody log:\n{}\npartner prosody log:\n{}",
        bob_partner.printed(),
        edge_prosody.log_text(),
        partner_prosody.log_text()
    );
    // X1: the partner's Prosody finds edge.example the same way and connects to the Edge.
    xmpp.send(
        &lab.partner,
        "alice@partner.example",
        "bob@edge.example",
        "partner-to-edge-1",
    );
    assert!(
        delivered(
            &bob_edge,
            "alice@partner.example",
            "partner-to-edge-1",
            MESSAGE
        ),
        "partner -> edge not delivered\nreceiver: {}\nedge prosody log:\n{}\npartner prosody log:\n{}",
        bob_edge.printed(),
        edge_prosody.log_text(),
        partner_prosody.log_text()
    );
    let dns = lab.dns_log();
    for name in [
        "_xmpp-server._tcp.partner.example",
        "_xmpp-server._tcp.edge.example",
    ] {
        assert!(dns.contains(name), "nobody asked for {name}:\n{dns}");
    }
    let recorded = tap.finish(Duration::from_millis(300)).expect("tap");
    let (dx1, dx2) = {
        let c = Counters(&classifier);
        (
            c.rule(EXT, "xmpp-federation-in") - x1,
            c.rule(EXT, "xmpp-federation-out") - x2,
        )
    };
    let partner_s2s = SocketAddr::new(IpAddr::V4(peers::PARTNER), 5269);
    let edge_s2s = SocketAddr::new(IpAddr::V4(peers::EDGE_EXT), 5269);
    // X2 is counted on both paths: the Edge's segments on TC egress, the replies on XDP.
    let seen_x2 = count(&recorded.received, |t| !t.udp && t.src == partner_s2s)
        + count(&recorded.sent, |t| !t.udp && t.dst == partner_s2s);
    let seen_x1 = count(&recorded.received, |t| !t.udp && t.dst == edge_s2s);
    eprintln!("X1 rule +{dx1} (tap {seen_x1}), X2 rule +{dx2} (tap {seen_x2})");
    assert!(dx1 > 0 && dx2 > 0, "X1 +{dx1}, X2 +{dx2}");
    assert_eq!(
        dx2, seen_x2,
        "X2 counted = the s2s segments to and from the partner's 5269 the tap saw on ext0"
    );
    assert_eq!(
        dx1, seen_x1,
        "X1 counted = the segments to the Edge's 5269 the tap saw arrive on ext0"
    );

    // The stranger reaches 5269 (X1 is for anyone) ...
    assert!(
        tcp_connect(
            &lab.stranger,
            IpAddr::V4(peers::STRANGER),
            edge_s2s,
            Duration::from_secs(3)
        )
        .expect("stranger connect"),
        "the stranger could not reach the Edge's 5269"
    );
    // ... but a forged 'reply' from its port 5269 reaches no socket of the Edge: neither an
    // open port nor the port of the Edge's live s2s connection to the partner.
    let listeners = Listeners::start(&lab.edge, &[40269], &[]).expect("edge listener");
    let c = Counters(&classifier);
    let not_established = c.reason(EXT, reason::DROP_NOT_ESTABLISHED);
    let forged = tcp_exchange(
        &lab.stranger,
        SocketAddr::new(IpAddr::V4(peers::STRANGER), 5269),
        SocketAddr::new(IpAddr::V4(peers::EDGE_EXT), 40269),
        DENIED,
    )
    .expect("forged segment");
    assert!(!forged.connected && listeners.tcp(40269).connections.is_empty());
    if let Some(port) = edge_local_port(&lab, partner_s2s) {
        let forged = tcp_exchange(
            &lab.stranger,
            SocketAddr::new(IpAddr::V4(peers::STRANGER), 5269),
            SocketAddr::new(IpAddr::V4(peers::EDGE_EXT), port),
            DENIED,
        )
        .expect("forged segment");
        assert!(!forged.connected, "forged segment to the s2s port {port}");
    }
    assert!(
        c.reason(EXT, reason::DROP_NOT_ESTABLISHED) > not_established,
        "forged segments counted as not_established"
    );

    // A reload (the same catalogue compiled again, swapped in): the next messages still pass.
    let running = classifier.compiled().clone();
    let next = compile(&PeerLab::catalogue()).expect("compile");
    classifier
        .maps_mut()
        .swap_in(&next, Holds::Empty, Some(&running))
        .expect("swap_in");
    classifier.set_compiled(next);
    xmpp.send(
        &lab.edge,
        "alice@edge.example",
        "bob@partner.example",
        "edge-to-partner-2",
    );
    xmpp.send(
        &lab.partner,
        "alice@partner.example",
        "bob@edge.example",
        "partner-to-edge-2",
    );
    assert!(delivered(
        &bob_partner,
        "alice@edge.example",
        "edge-to-partner-2",
        MESSAGE
    ));
    assert!(delivered(
        &bob_edge,
        "alice@partner.example",
        "partner-to-edge-2",
        MESSAGE
    ));

    // Prosody's own reconnects through the reloaded classifier: the Edge's Prosody killed (-9)
    // and started again. Its s2s connections die with it; the new Edge opens a new X2 flow and
    // the partner, whose connection to the Edge was closed under it, connects anew (X1).
    edge_prosody.restart(&lab, &lab.edge);
    let bob_edge = xmpp.receiver(&lab.edge, "bob@edge.example");
    xmpp.send(
        &lab.edge,
        "alice@edge.example",
        "bob@partner.example",
        "edge-to-partner-3",
    );
    xmpp.send(
        &lab.partner,
        "alice@partner.example",
        "bob@edge.example",
        "partner-to-edge-3",
    );
    assert!(
        delivered(
            &bob_partner,
            "alice@edge.example",
            "edge-to-partner-3",
            MESSAGE
        ),
        "edge -> partner after the Edge's Prosody restarted\n{}",
        edge_prosody.log_text()
    );
    assert!(
        delivered(
            &bob_edge,
            "alice@partner.example",
            "partner-to-edge-3",
            MESSAGE
        ),
        "partner -> edge after the Edge's Prosody restarted\n{}",
        partner_prosody.log_text()
    );

    // The classifier as the daemon runs it: this process's copy detached (its flows gone),
    // `edge-classifier run` started in the edge namespace, killed with -9 while the s2s
    // connections are up (the pinned programs keep the NICs protected), started again (it
    // adopts the pins and flows): messages pass at each step, with no manual step.
    drop(classifier);
    let daemon = EdgeInstance::new(&lab, "peers-xmpp");
    let catalogue = lab.dir.join("edge.toml");
    std::fs::write(&catalogue, PeerLab::catalogue_text()).expect("catalogue file");
    let mut run = daemon.run(&catalogue, "edge-classifier");
    xmpp.send(
        &lab.edge,
        "alice@edge.example",
        "bob@partner.example",
        "edge-to-partner-4",
    );
    xmpp.send(
        &lab.partner,
        "alice@partner.example",
        "bob@edge.example",
        "partner-to-edge-4",
    );
    assert!(delivered(
        &bob_partner,
        "alice@edge.example",
        "edge-to-partner-4",
        MESSAGE
    ));
    assert!(delivered(
        &bob_edge,
        "alice@partner.example",
        "partner-to-edge-4",
        MESSAGE
    ));
    run.kill();
    assert!(
        peers::xdp_attached(&lab.edge, EXT),
        "ext0 lost its XDP program when the daemon was killed"
    );
    xmpp.send(
        &lab.edge,
        "alice@edge.example",
        "bob@partner.example",
        "edge-to-partner-5",
    );
    assert!(
        delivered(
            &bob_partner,
            "alice@edge.example",
            "edge-to-partner-5",
            MESSAGE
        ),
        "edge -> partner while the daemon is dead (pinned programs)"
    );
    let _run = daemon.run(&catalogue, "edge-classifier-2");
    // The partner's Prosody killed and started too: a new X1 connection through the restarted
    // daemon, and the Edge's outbound connection to the old partner replaced.
    partner_prosody.restart(&lab, &lab.partner);
    let bob_partner = xmpp.receiver(&lab.partner, "bob@partner.example");
    xmpp.send(
        &lab.partner,
        "alice@partner.example",
        "bob@edge.example",
        "partner-to-edge-6",
    );
    xmpp.send(
        &lab.edge,
        "alice@edge.example",
        "bob@partner.example",
        "edge-to-partner-6",
    );
    assert!(
        delivered(
            &bob_edge,
            "alice@partner.example",
            "partner-to-edge-6",
            MESSAGE
        ),
        "partner -> edge after the daemon's restart\n{}",
        partner_prosody.log_text()
    );
    assert!(
        delivered(
            &bob_partner,
            "alice@edge.example",
            "edge-to-partner-6",
            MESSAGE
        ),
        "edge -> partner after the daemon's restart\n{}",
        edge_prosody.log_text()
    );
    let table = daemon.cli(&["stats"]);
    eprintln!("daemon's counters at the end:\n{table}");
    let packets = |id: &str| -> u64 {
        table
            .lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .and_then(|l| l.split_whitespace().nth(6)?.parse().ok())
            .unwrap_or_else(|| panic!("no counters for {id} in:\n{table}"))
    };
    assert!(packets("xmpp-federation-in") > 0 && packets("xmpp-federation-out") > 0);
    assert!(
        !table.contains("not_established"),
        "the daemon dropped s2s segments as not established:\n{table}"
    );
}

const MESSAGE: Duration = Duration::from_secs(20);

/// A TLS client with an optional client certificate: sends `ping`, expects the server's `-rev`
/// answer `gnip`. Prints `GOT …` or `FAILED …`; exits 0 only on the right answer.
const TLS_CLIENT_PY: &str = r#"
import socket, ssl, sys
host, port, ca, cert, key = sys.argv[1:6]
ctx = ssl.create_default_context(cafile=ca)
if cert != "-":
    ctx.load_cert_chain(cert, key)
try:
    with socket.create_connection((host, int(port)), timeout=3) as s:
        with ctx.wrap_socket(s, server_hostname=host) as t:
            t.settimeout(3)
            t.sendall(b"ping\n")
            data = t.recv(100)
            print("GOT", data.decode(errors="replace").strip(), flush=True)
            sys.exit(0 if data.strip() == b"gnip" else 1)
except Exception as e:
    print("FAILED", type(e).__name__, e, flush=True)
    sys.exit(1)
"#;

#[test]
fn x3_tls_with_client_certificates_from_the_front_end_only() {
    let lab = PeerLab::create("x3").expect("peer lab");
    let server = lab
        .cert(
            "edge-internal",
            &["edge.example"],
            &[IpAddr::V4(peers::EDGE_INT), IpAddr::V4(peers::EDGE_EXT)],
        )
        .expect("server certificate");
    let fe = lab
        .cert("fe", &["fe.edge.example"], &[IpAddr::V4(peers::FE)])
        .expect("Front End certificate");
    let stranger = lab
        .cert(
            "stranger",
            &["stranger.example"],
            &[IpAddr::V4(peers::STRANGER)],
        )
        .expect("stranger certificate");
    let script = lab.dir.join("tls_client.py");
    std::fs::write(&script, TLS_CLIENT_PY).expect("client script");
    let ca = lab.ca.to_str().expect("utf-8");
    // openssl s_server on every address of the Edge, so that what keeps the Internet side out
    // is the classifier (the X3 row is the internal NIC's), not the socket.
    let _s_server = lab
        .spawn(
            &lab.edge,
            "s_server",
            "openssl",
            &[
                "s_server",
                "-accept",
                "23456",
                "-4",
                "-cert",
                server.cert.to_str().expect("utf-8"),
                "-key",
                server.key.to_str().expect("utf-8"),
                "-CAfile",
                ca,
                "-Verify",
                "1",
                "-verify_return_error",
                "-rev",
            ],
        )
        .expect("openssl s_server");
    let listening = wait_for(Duration::from_secs(10), || {
        lab.run_ok(&lab.edge, Duration::from_secs(5), "ss", &["-Htln"])
            .ok()?
            .contains(":23456")
            .then_some(())
    });
    assert!(listening.is_some(), "s_server did not listen");
    let tls = |ns: &str, to: Ipv4Addr, cert: Option<&peers::Cert>| -> (bool, String) {
        let (c, k) = cert.map_or(("-".into(), "-".into()), |c| {
            (c.cert.display().to_string(), c.key.display().to_string())
        });
        let out = lab
            .run(
                ns,
                Duration::from_secs(10),
                PYTHON,
                &[
                    script.to_str().expect("utf-8"),
                    &to.to_string(),
                    "23456",
                    ca,
                    &c,
                    &k,
                ],
            )
            .expect("tls client");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };

    // Without the classifier the stranger gets an answer on both addresses (the Internet routes
    // the internal subnet to the Edge): the control.
    for to in [peers::EDGE_EXT, peers::EDGE_INT] {
        let (ok, out) = tls(&lab.stranger, to, Some(&stranger));
        assert!(
            ok,
            "control, no classifier: the stranger reaches {to}:23456: {out}"
        );
    }

    let classifier = lab
        .attach()
        .expect("classifier attached in the edge namespace");
    let c = Counters(&classifier);
    let x3 = c.rule(peers::INT, "xmpp-gateway-internal-in");
    let no_rule = c.reason(EXT, reason::DROP_NO_RULE);

    let (ok, out) = tls(&lab.fe, peers::EDGE_INT, Some(&fe));
    assert!(ok, "the Front End with its certificate: {out}");
    assert!(
        c.rule(peers::INT, "xmpp-gateway-internal-in") > x3,
        "X3 counted the Front End's connection"
    );
    // The server really asks for a certificate: without one the handshake fails.
    let (ok, out) = tls(&lab.fe, peers::EDGE_INT, None);
    assert!(
        !ok,
        "the Front End without a client certificate got through: {out}"
    );

    for to in [peers::EDGE_EXT, peers::EDGE_INT] {
        let (ok, out) = tls(&lab.stranger, to, Some(&stranger));
        assert!(!ok, "the stranger reached {to}:23456 through ext0: {out}");
        assert!(
            out.contains("timed out") || out.contains("Timeout"),
            "the stranger's connection to {to} was dropped, not refused: {out}"
        );
    }
    assert!(
        c.reason(EXT, reason::DROP_NO_RULE) > no_rule,
        "the stranger's SYNs counted as no_rule on ext0"
    );
}
