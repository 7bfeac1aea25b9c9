//! Issue 17, rows S1/P1/P2, P3, P5/P6 and P4 with the real programs an Edge talks to, through the
//! classifier attached to the lab's edge host (seed catalogue on the lab's addresses):
//!
//! - Kamailio with its TLS module on the Edge (`tls:198.51.100.10:5061`, mutual TLS with a test
//!   CA made by openssl at test time, and `tls:198.51.100.10:443` for clients), a second
//!   Kamailio on the partner (`203.0.113.5:5061`) and a third on the non-partner Internet host
//!   (`198.51.100.1:5061`). Each forwards what `sipp` hands it on its loopback to the domain in
//!   the request URI, found through `_sipfederationtls._tcp.<domain>` (ipops `srv_query`) asked
//!   of a dnsmasq on the remote host, and answers OPTIONS, MESSAGE and REGISTER for its own
//!   domain itself.
//! - coturn (`turnserver`) on the Edge and on the remote host, asked by `turnutils_stunclient`.
//! - socat opening TCP from the Edge's media range (P4).
//!
//! Every process runs inside the lab's namespaces (programs that resolve names in a private
//! mount namespace with the lab's resolv.conf bound over /etc/resolv.conf) and is killed with its
//! process group on drop.

use std::{
    fs,
    net::SocketAddr,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use edge_classifier::{
    compile::{compile, compile_with},
    loader::{AttachMode, Classifier},
    maps::Holds,
};
use edge_classifier_common::reason;
use edge_classifier_lab::*;
use edge_classifier_tests::edited_default_catalogue;

/// The non-partner Internet host: the lab's remote client address.
const STRANGER: &str = "198.51.100.1";
const PARTNER: &str = "203.0.113.5";
const EDGE: &str = "198.51.100.10";

/// A scratch directory for one test, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("ec-peers-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path(name);
        if let Some(d) = p.parent() {
            fs::create_dir_all(d).expect("mkdir");
        }
        fs::write(&p, text).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::env::var_os("EC_KEEP_SCRATCH").is_none() {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// `prog ARGS` inside `ns`, in a private mount namespace with `resolv` bound over
/// /etc/resolv.conf when given.
fn in_ns(ns: &str, resolv: Option<&Path>, prog: &str, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]);
    if let Some(r) = resolv {
        c.args([
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &format!(
                "mount --bind {} /etc/resolv.conf && exec \"$@\"",
                r.display()
            ),
            "sh",
        ]);
    }
    c.arg(prog).args(args);
    c
}

/// A long-running program in its own process group, killed with the group on drop.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Proc {
        let out = fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = cmd
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Proc {
            name: name.to_string(),
            child,
            log,
        }
    }
    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
    /// Panics with the log when the program has exited.
    fn alive(&mut self) {
        if let Ok(Some(st)) = self.child.try_wait() {
            panic!("{} exited ({st}):\n{}", self.name, self.log());
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let pgid = self.child.id() as i32;
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// A one-shot program, killed after `limit`.
fn run(cmd: Command, limit: Duration) -> Output {
    let mut t = Command::new("timeout");
    t.args(["-s", "KILL", &format!("{}", limit.as_secs_f64())]);
    t.arg(cmd.get_program()).args(cmd.get_args());
    t.output().expect("run")
}

fn text(o: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Waits until something listens on `proto`/`port` in `ns`.
fn wait_listening(ns: &str, proto: &str, port: u16, p: &mut Proc) {
    let flag = if proto == "udp" { "-Hlun" } else { "-Hltn" };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        p.alive();
        let o = run(
            in_ns(ns, None, "ss", &[flag, &format!("sport = :{port}")]),
            Duration::from_secs(3),
        );
        if !String::from_utf8_lossy(&o.stdout).trim().is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} never listened on {proto}/{port}:\n{}",
            p.name,
            p.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The test CA and one certificate per host (server and client use), made with openssl.
fn make_pki(s: &Scratch) {
    let sh = |script: &str| {
        let o = Command::new("sh")
            .current_dir(&s.0)
            .args(["-ec", script])
            .output()
            .expect("sh");
        assert!(o.status.success(), "openssl: {}", text(&o));
    };
    sh(
        "openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 \
        -subj '/CN=edge-classifier lab CA' 2>/dev/null",
    );
    for (name, domain, ip) in [
        ("edge", "edge.example", EDGE),
        ("partner", "partner.example", PARTNER),
        ("stranger", "stranger.example", STRANGER),
    ] {
        s.write(
            &format!("{name}.ext"),
            &format!(
                "subjectAltName=DNS:sip.{domain},DNS:{domain},IP:{ip}\n\
                 extendedKeyUsage=serverAuth,clientAuth\n"
            ),
        );
        sh(&format!(
            "openssl req -newkey rsa:2048 -nodes -keyout {name}.key -out {name}.csr \
             -subj '/CN=sip.{domain}' 2>/dev/null && \
             openssl x509 -req -in {name}.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
             -out {name}.pem -days 2 -extfile {name}.ext 2>/dev/null"
        ));
    }
}

const DNSMASQ: &str = "no-resolv
no-hosts
bind-interfaces
listen-address=@STRANGER@
port=53
srv-host=_sipfederationtls._tcp.partner.example,sip.partner.example,5061
srv-host=_sipfederationtls._tcp.edge.example,sip.edge.example,5061
srv-host=_sipfederationtls._tcp.stranger.example,sip.stranger.example,5061
address=/sip.partner.example/@PARTNER@
address=/sip.edge.example/@EDGE@
address=/sip.stranger.example/@STRANGER@
";

/// One Kamailio: answers OPTIONS, MESSAGE and REGISTER for its own domain; forwards what comes
/// from its loopback (sipp) to another domain over TLS, to the target of that domain's
/// `_sipfederationtls._tcp` SRV record, or to `host:443` for a client registration.
const KAMAILIO_CFG: &str = r#"#!KAMAILIO
debug=2
log_stderror=yes
children=2
tcp_children=2
auto_aliases=no
dns_try_naptr=no
tcp_connect_timeout=2
listen=udp:127.0.0.1:@LOOP@
listen=tls:@IP@:5061
@EXTRA_LISTEN@
alias=@DOMAIN@
alias=sip.@DOMAIN@
enable_tls=yes
tcp_connection_lifetime=3600
loadmodule "tm.so"
loadmodule "sl.so"
loadmodule "tls.so"
loadmodule "pv.so"
loadmodule "xlog.so"
loadmodule "textops.so"
loadmodule "siputils.so"
loadmodule "maxfwd.so"
loadmodule "ipops.so"
loadmodule "usrloc.so"
loadmodule "registrar.so"
modparam("tls", "config", "@DIR@/@NAME@-tls.cfg")
modparam("tm", "fr_timer", 4000)
request_route {
    xlog("L_NOTICE", "request $rm $ru from $proto:$si:$sp\n");
    if (!mf_process_maxfwd_header("10")) { sl_send_reply("483", "Too Many Hops"); exit; }
    if (is_method("ACK")) { exit; }
    if ($rd == "@DOMAIN@" || $rd == "sip.@DOMAIN@" || $rd == "@IP@") {
        if (is_method("REGISTER")) { save("location"); exit; }
        sl_send_reply("200", "OK");
        exit;
    }
    if ($si != "127.0.0.1") { sl_send_reply("403", "Not Relaying"); exit; }
    if ($rp == 443) {
        $du = "sip:" + $rd + ":443;transport=tls";
    } else {
        $var(srv) = "_sipfederationtls._tcp." + $rd;
        if (srv_query("$var(srv)", "fed") < 1 || $srvquery(fed=>count) < 1) {
            xlog("L_ERR", "no SRV $var(srv)\n");
            sl_send_reply("404", "No SRV");
            exit;
        }
        $du = "sip:" + $srvquery(fed=>target[0]) + ":" + $srvquery(fed=>port[0]) + ";transport=tls";
    }
    xlog("L_NOTICE", "relaying $rm to $du\n");
    force_send_socket(tls:@IP@:5061);
    if (!t_relay()) { sl_reply_error(); }
}
"#;

const TLS_CFG: &str = "[server:default]
method = TLSv1.2+
verify_certificate = yes
require_certificate = yes
private_key = @DIR@/@NAME@.key
certificate = @DIR@/@NAME@.pem
ca_list = @DIR@/ca.pem

[client:default]
method = TLSv1.2+
verify_certificate = yes
require_certificate = yes
private_key = @DIR@/@NAME@.key
certificate = @DIR@/@NAME@.pem
ca_list = @DIR@/ca.pem
";

/// Clients on 443 (P3) bring no certificate.
const TLS_CFG_443: &str = "
[server:@IP@:443]
method = TLSv1.2+
verify_certificate = no
require_certificate = no
private_key = @DIR@/@NAME@.key
certificate = @DIR@/@NAME@.pem
ca_list = @DIR@/ca.pem
";

/// An OPTIONS and then a MESSAGE to bob@[service], each expecting 200.
const SIPP_OPTIONS_MESSAGE: &str = r#"<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="OPTIONS and MESSAGE">
<send retrans="500"><![CDATA[
OPTIONS sip:bob@[service] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
From: <sip:alice@lab.invalid>;tag=[pid]SIPpTag00[call_number]
To: <sip:bob@[service]>
Call-ID: [call_id]
CSeq: 1 OPTIONS
Contact: <sip:alice@[local_ip]:[local_port]>
Max-Forwards: 70
Content-Length: [len]

]]></send>
<recv response="200"/>
<send retrans="500"><![CDATA[
MESSAGE sip:bob@[service] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
From: <sip:alice@lab.invalid>;tag=[pid]SIPpTag00[call_number]
To: <sip:bob@[service]>
Call-ID: [call_id]
CSeq: 2 MESSAGE
Max-Forwards: 70
Content-Type: text/plain
Content-Length: [len]

hello over federation
]]></send>
<recv response="200"/>
</scenario>
"#;

/// A REGISTER of carol@[service] to [service]:443, expecting 200.
const SIPP_REGISTER: &str = r#"<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="REGISTER">
<send retrans="500"><![CDATA[
REGISTER sip:[service]:443 SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
From: <sip:carol@[service]>;tag=[pid]SIPpTag00[call_number]
To: <sip:carol@[service]>
Call-ID: [call_id]
CSeq: 1 REGISTER
Contact: <sip:carol@[local_ip]:[local_port]>
Expires: 300
Max-Forwards: 70
Content-Length: [len]

]]></send>
<recv response="200"/>
</scenario>
"#;

fn fill(template: &str, vars: &[(&str, &str)]) -> String {
    let mut t = template.to_string();
    for (k, v) in vars {
        t = t.replace(k, v);
    }
    t
}

/// A Kamailio for `name` (`edge`, `partner`, `stranger`) on `ip`, taking sipp's requests on
/// UDP `127.0.0.1:loop_port`.
fn kamailio(s: &Scratch, ns: &str, resolv: &Path, name: &str, ip: &str, loop_port: u16) -> Proc {
    let dir = s.0.display().to_string();
    let domain = format!("{name}.example");
    let loop_s = loop_port.to_string();
    let vars = [
        ("@IP@", ip),
        ("@DOMAIN@", domain.as_str()),
        ("@DIR@", dir.as_str()),
        ("@NAME@", name),
        ("@LOOP@", loop_s.as_str()),
    ];
    let (listen, tls443) = if name == "edge" {
        (format!("listen=tls:{ip}:443"), fill(TLS_CFG_443, &vars))
    } else {
        (String::new(), String::new())
    };
    let rt = s.path(&format!("{name}-run"));
    fs::create_dir_all(&rt).expect("runtime dir");
    let cfg = s.write(
        &format!("{name}-kamailio.cfg"),
        &fill(KAMAILIO_CFG, &vars).replace("@EXTRA_LISTEN@", &listen),
    );
    let tls = fill(TLS_CFG, &vars) + &tls443;
    s.write(&format!("{name}-tls.cfg"), &tls);
    let mut p = Proc::spawn(
        &format!("kamailio ({name})"),
        in_ns(
            ns,
            Some(resolv),
            "kamailio",
            &[
                "-DD",
                "-E",
                "-f",
                &cfg.display().to_string(),
                "-Y",
                &rt.display().to_string(),
                "-P",
                &rt.join("pid").display().to_string(),
                "-m",
                "32",
                "-M",
                "4",
            ],
        ),
        s.path(&format!("{name}-kamailio.log")),
    );
    wait_listening(ns, "tcp", 5061, &mut p);
    wait_listening(ns, "udp", loop_port, &mut p);
    p
}

/// sipp on `ns`'s loopback running `scenario` once against the Kamailio on `loop_port`, with
/// `[service]` = `service`. `Ok` when every step got its 200.
fn sipp(
    s: &Scratch,
    ns: &str,
    scenario: &str,
    loop_port: u16,
    service: &str,
    limit: Duration,
) -> Result<(), String> {
    let sf = s.path(scenario);
    let o = run(
        in_ns(
            ns,
            None,
            "sipp",
            &[
                "-sf",
                &sf.display().to_string(),
                "-s",
                service,
                "-m",
                "1",
                "-i",
                "127.0.0.1",
                "-p",
                "5070",
                &format!("127.0.0.1:{loop_port}"),
                "-timeout",
                &format!("{}s", limit.as_secs()),
                "-timeout_error",
                "-nostdin",
                "-nd",
            ],
        ),
        limit + Duration::from_secs(2),
    );
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "sipp {scenario} to {service}: {}\n{}",
            o.status,
            text(&o)
        ))
    }
}

struct Counters<'a> {
    c: &'a Classifier,
}

impl Counters<'_> {
    fn ext(&self) -> edge_classifier::maps::IfaceStats {
        let b = self
            .c
            .bindings()
            .iter()
            .find(|b| b.name == EDGE_EXT)
            .expect("ext0 bound");
        self.c.iface_stats(b).expect("stats")
    }
    fn reason(&self, r: u32) -> u64 {
        self.ext().reasons[r as usize].packets
    }
    fn rule(&self, id: &str) -> u64 {
        let ix = self
            .c
            .compiled()
            .rules
            .iter()
            .position(|r| r.id == id)
            .expect("rule id");
        self.ext().rules[ix].packets
    }
}

fn attach(lab: &Lab) -> Classifier {
    let catalogue = edited_default_catalogue(&[]);
    in_netns(&lab.edge, move || {
        let mut c = Classifier::load(compile(&catalogue)?)?;
        c.attach(EDGE_EXT, "external", AttachMode::Native)?;
        c.attach(EDGE_INT, "internal", AttachMode::Native)?;
        Ok(c)
    })
    .expect("load and attach in the edge namespace")
}

/// Swaps an edited catalogue (a different UDP idle time) into the running classifier, the way
/// `edge-classifier reload` does.
fn reload(c: &mut Classifier) {
    let cat = edited_default_catalogue(&[("udp_idle = 180", "udp_idle = 170")]);
    let next = compile_with(&cat, &c.compiled().assignments).expect("compile");
    let running = c.compiled().clone();
    c.maps_mut()
        .swap_in(&next, Holds::Empty, Some(&running))
        .expect("swap_in");
    c.set_compiled(next);
}

const SIP: Duration = Duration::from_secs(8);
/// The Kamailios' loopback ports for sipp: the partner and the stranger share the remote host.
const EDGE_LOOP: u16 = 5060;
const PARTNER_LOOP: u16 = 5060;
const STRANGER_LOOP: u16 = 5062;

#[test]
fn sip_federation_over_mutual_tls_with_kamailio_and_sipp() {
    let started = Instant::now();
    let lab = Lab::create("psip").expect("lab");
    let s = Scratch::new("sip");
    make_pki(&s);
    s.write("options-message.xml", SIPP_OPTIONS_MESSAGE);
    s.write("register.xml", SIPP_REGISTER);
    let resolv = s.write("resolv.conf", &format!("nameserver {STRANGER}\n"));
    let vars = [
        ("@STRANGER@", STRANGER),
        ("@PARTNER@", PARTNER),
        ("@EDGE@", EDGE),
    ];
    let dnsmasq_conf = s.write("dnsmasq.conf", &fill(DNSMASQ, &vars));
    let mut dns = Proc::spawn(
        "dnsmasq",
        in_ns(
            &lab.remote,
            None,
            "dnsmasq",
            &[
                "-k",
                "-C",
                &dnsmasq_conf.display().to_string(),
                &format!("--pid-file={}", s.path("dnsmasq.pid").display()),
                "--log-facility=-",
                "--log-queries",
            ],
        ),
        s.path("dnsmasq.log"),
    );
    wait_listening(&lab.remote, "udp", 53, &mut dns);

    let mut classifier = attach(&lab);
    // A forged segment from the stranger's 5061 to an Edge ephemeral port never reaches it (sent
    // before the stranger's Kamailio holds the port).
    {
        let listeners = Listeners::start(&lab.edge, &[40000], &[]).expect("edge listener");
        let n = Counters { c: &classifier };
        let ne = n.reason(reason::DROP_NOT_ESTABLISHED);
        let x = tcp_exchange(
            &lab.remote,
            SocketAddr::new(CLIENT_V4, 5061),
            SocketAddr::new(EDGE_EXT_V4, 40000),
            Duration::from_millis(500),
        )
        .expect("forged");
        assert!(!x.connected, "a forged 5061 reply connected");
        assert!(
            n.reason(reason::DROP_NOT_ESTABLISHED) > ne,
            "not_established"
        );
        assert!(listeners.tcp(40000).connections.is_empty());
    }

    let edge = kamailio(&s, &lab.edge, &resolv, "edge", EDGE, EDGE_LOOP);
    let partner = kamailio(&s, &lab.remote, &resolv, "partner", PARTNER, PARTNER_LOOP);
    let stranger = kamailio(
        &s,
        &lab.remote,
        &resolv,
        "stranger",
        STRANGER,
        STRANGER_LOOP,
    );
    let logs = || {
        format!(
            "--- edge\n{}\n--- partner\n{}\n--- stranger\n{}\n--- dnsmasq\n{}",
            edge.log(),
            partner.log(),
            stranger.log(),
            dns.log()
        )
    };

    // Both ways with the partner, and the Edge to the stranger, each checked against its rule.
    let exchange = |c: &Classifier, what: &str| {
        let n = Counters { c };
        let before = |ids: &[&str]| ids.iter().map(|id| n.rule(id)).collect::<Vec<_>>();
        let ids = [
            "public-im-sip-out",
            "public-im-sip-in",
            "sip-federation-out",
        ];
        for (ns, port, service, rule) in [
            (&lab.edge, EDGE_LOOP, "partner.example", "public-im-sip-out"),
            (
                &lab.remote,
                PARTNER_LOOP,
                "edge.example",
                "public-im-sip-in",
            ),
            (
                &lab.edge,
                EDGE_LOOP,
                "stranger.example",
                "sip-federation-out",
            ),
        ] {
            // Delayed ACKs of the exchange before land first.
            std::thread::sleep(Duration::from_millis(300));
            let b = before(&ids);
            if let Err(e) = sipp(&s, ns, "options-message.xml", port, service, SIP) {
                panic!("{what}: OPTIONS+MESSAGE to {service}: {e}\n{}", logs());
            }
            std::thread::sleep(Duration::from_millis(300));
            let a = before(&ids);
            for (j, id) in ids.iter().enumerate() {
                if *id == rule {
                    assert!(a[j] > b[j], "{what}: {service}: rule {rule} did not count");
                } else {
                    assert_eq!(a[j], b[j], "{what}: {service}: rule {id} moved");
                }
            }
        }
    };
    exchange(&classifier, "first");

    // The stranger: its Kamailio cannot reach the Edge's 5061 (P1 is for partners).
    {
        let n = Counters { c: &classifier };
        let (p1, no_rule) = (n.rule("public-im-sip-in"), n.reason(reason::DROP_NO_RULE));
        let r = sipp(
            &s,
            &lab.remote,
            "options-message.xml",
            STRANGER_LOOP,
            "edge.example",
            SIP,
        );
        assert!(r.is_err(), "the stranger's OPTIONS reached the Edge");
        assert_eq!(n.rule("public-im-sip-in"), p1, "P1 counted the stranger");
        assert!(
            n.reason(reason::DROP_NO_RULE) > no_rule,
            "the stranger's SYNs to 5061 count as no_rule"
        );
        assert!(
            stranger
                .log()
                .contains("relaying OPTIONS to sip:sip.edge.example:5061"),
            "the stranger tried through SRV:\n{}",
            stranger.log()
        );
        assert!(
            !edge.log().contains(&format!("from tls:{STRANGER}")),
            "the Edge's Kamailio saw the stranger:\n{}",
            edge.log()
        );
    }

    // P3: a REGISTER over TLS from the stranger to the Edge's 443.
    {
        let n = Counters { c: &classifier };
        let p3 = n.rule("client-sip-tls-in");
        if let Err(e) = sipp(&s, &lab.remote, "register.xml", STRANGER_LOOP, EDGE, SIP) {
            panic!("P3: REGISTER to {EDGE}:443: {e}\n{}", logs());
        }
        assert!(n.rule("client-sip-tls-in") > p3, "P3 counted");
        assert!(
            edge.log().contains(&format!(
                "request REGISTER sip:{EDGE}:443 from tls:{STRANGER}"
            )),
            "{}",
            edge.log()
        );
    }

    // A reload: the Kamailios' next requests (on the TLS connections they hold) go through.
    reload(&mut classifier);
    exchange(&classifier, "after a reload");

    // Detached and attached again: a fresh flow table that knows none of the connections the
    // Edge's Kamailio holds.
    drop(classifier);
    let classifier = attach(&lab);
    exchange(&classifier, "after detach and re-attach");

    drop(classifier);
    drop((edge, partner, stranger, dns));
    assert!(
        started.elapsed() < Duration::from_secs(120),
        "took {:?}",
        started.elapsed()
    );
}
