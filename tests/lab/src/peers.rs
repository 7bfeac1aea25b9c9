//! The peer lab of issue 17: real federation software (Prosody, Kamailio, coturn, dnsmasq, sipp,
//! openssl) in network namespaces around an Edge, found through a real DNS server, with a test
//! CA made at test time.
//!
//! Topology (names get a unique prefix per lab; every link is a veth pair):
//!
//! ```text
//!  fe (lan0) ─── (int0) edge (ext0) ─── (to-edge) wan (to-partner) ─── (eth0) partner
//!  192.0.2.20/24  192.0.2.10/24  198.51.100.10/24  198.51.100.1/24  203.0.113.1/24  203.0.113.5/24
//!                                                   (to-stranger) ─── (eth0) stranger
//!                                                   198.18.0.1/24      198.18.0.77/24
//! ```
//!
//! `wan` is the Internet: a router (ip_forward on) joining the Edge's external segment, the
//! partner's (a public IM / federation partner, in `public_im_partners`) and the stranger's (a
//! host in no named set). Every host's default route goes through it, the Front End's through
//! the Edge's internal address. `wan` also routes the Edge's internal subnet to the Edge's
//! external address, so that the stranger can try the internal address too.
//!
//! The partner runs dnsmasq on 203.0.113.5:53 with the SRV and A records of both domains
//! ([`DNS_RECORDS`]); every program started with [`PeerLab::command`] or [`PeerLab::spawn`]
//! resolves through it: it runs in a private mount namespace with the lab's `resolv.conf` bound
//! over `/etc/resolv.conf`. Programs enter the namespace with `nsenter --net`, not `ip netns
//! exec`, which remounts /sys and hides the host's bpffs.
//!
//! With the `classifier` feature, [`PeerLab::catalogue_text`] is the shipped `seed` profile
//! with the lab's addresses and [`PeerLab::attach`] attaches it to the Edge's NICs.

use std::{
    net::{IpAddr, Ipv4Addr},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::ip;

/// The Edge's external (Access Edge / XMPP proxy) address, on ext0.
pub const EDGE_EXT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
/// The Edge's internal address, on int0.
pub const EDGE_INT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
/// The router's address on the Edge's external segment.
pub const WAN_EDGE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
/// The federation partner (in `public_im_partners`), where the DNS server runs.
pub const PARTNER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 5);
pub const WAN_PARTNER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// A host on the Internet in no named set of the catalogue.
pub const STRANGER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 77);
pub const WAN_STRANGER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The Front End, on the Edge's internal segment.
pub const FE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 20);

/// The Edge's NICs inside the edge namespace.
pub const EXT: &str = "ext0";
pub const INT: &str = "int0";

/// The Edge's and the partner's domains and SIP host names.
pub const EDGE_DOMAIN: &str = "edge.example";
pub const EDGE_SIP_HOST: &str = "sip.edge.example";
pub const PARTNER_DOMAIN: &str = "partner.example";
pub const PARTNER_SIP_HOST: &str = "sip.partner.example";

/// What the partner's dnsmasq serves, as dnsmasq options.
pub const DNS_RECORDS: &[&str] = &[
    "--srv-host=_xmpp-server._tcp.partner.example,partner.example,5269,0,0",
    "--srv-host=_xmpp-server._tcp.edge.example,edge.example,5269,0,0",
    "--srv-host=_sipfederationtls._tcp.partner.example,sip.partner.example,5061,0,0",
    "--srv-host=_sipfederationtls._tcp.edge.example,sip.edge.example,5061,0,0",
    "--host-record=partner.example,203.0.113.5",
    "--host-record=sip.partner.example,203.0.113.5",
    "--host-record=edge.example,198.51.100.10",
    "--host-record=sip.edge.example,198.51.100.10",
    // The stranger runs a SIP/TLS endpoint too: the Edge federates with it (S1) through SRV.
    "--srv-host=_sipfederationtls._tcp.stranger.example,sip.stranger.example,5061,0,0",
    "--host-record=sip.stranger.example,198.18.0.77",
];

/// A program started in a namespace; killed (with its whole process group) on drop.
pub struct Daemon {
    pub name: String,
    /// Its stdout and stderr.
    pub output: PathBuf,
    child: Child,
}

impl Daemon {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Still running (not exited, not killed).
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// What it printed so far.
    pub fn printed(&self) -> String {
        std::fs::read_to_string(&self.output).unwrap_or_default()
    }

    /// SIGKILL to its process group, and reaped.
    pub fn kill(&mut self) {
        if self.alive() {
            let pid = self.child.id() as i32;
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
                libc::kill(pid, libc::SIGKILL);
            }
        }
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A leaf certificate and its key, signed by the lab's CA (PEM files).
#[derive(Debug, Clone)]
pub struct Cert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The namespaces of the peer lab, its temp dir and its DNS server; removed on drop, also when
/// a test panics.
pub struct PeerLab {
    pub edge: String,
    pub wan: String,
    pub partner: String,
    pub stranger: String,
    pub fe: String,
    /// A temp dir of this lab's own: configs, data, logs, certificates.
    pub dir: PathBuf,
    /// The `resolv.conf` every program of the lab reads (`nameserver 203.0.113.5`).
    pub resolv: PathBuf,
    /// The test CA's certificate (PEM).
    pub ca: PathBuf,
    ca_key: PathBuf,
    dns: Option<Daemon>,
}

fn check(what: &str, out: std::io::Result<Output>) -> anyhow::Result<Output> {
    let out = out.with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

impl PeerLab {
    /// Builds the namespaces, the CA and the DNS server. `tag` makes the names unique per
    /// test; the process id per run.
    pub fn create(tag: &str) -> anyhow::Result<PeerLab> {
        let p = format!("ec{}-{tag}", std::process::id() % 100_000);
        let dir = std::env::temp_dir().join(format!("{p}-peers"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut lab = PeerLab {
            edge: format!("{p}-edge"),
            wan: format!("{p}-wan"),
            partner: format!("{p}-partner"),
            stranger: format!("{p}-stranger"),
            fe: format!("{p}-fe"),
            resolv: dir.join("resolv.conf"),
            ca: dir.join("ca.pem"),
            ca_key: dir.join("ca.key"),
            dir,
            dns: None,
        };
        std::fs::write(
            &lab.resolv,
            format!("nameserver {PARTNER}\noptions timeout:2 attempts:3\n"),
        )?;
        lab.build_network()?;
        lab.make_ca()?;
        lab.start_dns()?;
        Ok(lab)
    }

    fn namespaces(&self) -> [&String; 5] {
        [
            &self.edge,
            &self.wan,
            &self.partner,
            &self.stranger,
            &self.fe,
        ]
    }

    fn build_network(&self) -> anyhow::Result<()> {
        for ns in self.namespaces() {
            // A leftover from a killed run of the same pid would make `add` fail.
            let _ = ip(&["netns", "del", ns]);
            ip(&["netns", "add", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        let veth = |a_ns: &str, a: &str, b_ns: &str, b: &str| {
            ip(&[
                "link", "add", a, "netns", a_ns, "type", "veth", "peer", "name", b, "netns", b_ns,
            ])
        };
        veth(&self.edge, EXT, &self.wan, "to-edge")?;
        veth(&self.edge, INT, &self.fe, "lan0")?;
        veth(&self.partner, "eth0", &self.wan, "to-partner")?;
        veth(&self.stranger, "eth0", &self.wan, "to-stranger")?;
        let addrs: [(&str, &str, String); 8] = [
            (&self.edge, EXT, format!("{EDGE_EXT}/24")),
            (&self.edge, INT, format!("{EDGE_INT}/24")),
            (&self.fe, "lan0", format!("{FE}/24")),
            (&self.wan, "to-edge", format!("{WAN_EDGE}/24")),
            (&self.wan, "to-partner", format!("{WAN_PARTNER}/24")),
            (&self.wan, "to-stranger", format!("{WAN_STRANGER}/24")),
            (&self.partner, "eth0", format!("{PARTNER}/24")),
            (&self.stranger, "eth0", format!("{STRANGER}/24")),
        ];
        for (ns, dev, addr) in &addrs {
            ip(&["-n", ns, "addr", "add", addr, "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        for (ns, via) in [
            (&self.edge, WAN_EDGE),
            (&self.partner, WAN_PARTNER),
            (&self.stranger, WAN_STRANGER),
            (&self.fe, EDGE_INT),
        ] {
            ip(&["-n", ns, "route", "add", "default", "via", &via.to_string()])?;
        }
        // The stranger may try the Edge's internal address: the Internet routes it to the Edge.
        ip(&[
            "-n",
            &self.wan,
            "route",
            "add",
            "192.0.2.0/24",
            "via",
            &EDGE_EXT.to_string(),
        ])?;
        check(
            "sysctl ip_forward in wan",
            self.command(&self.wan, "sysctl")
                .args(["-qw", "net.ipv4.ip_forward=1"])
                .output(),
        )?;
        Ok(())
    }

    pub fn netns_path(ns: &str) -> String {
        format!("/run/netns/{ns}")
    }

    /// `program` inside `ns`, in a private mount namespace where `/etc/resolv.conf` is the
    /// lab's. The caller adds arguments and runs or spawns it.
    pub fn command(&self, ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", Self::netns_path(ns)))
            .args(["unshare", "-m", "--propagation", "private", "sh", "-c"])
            .arg(r#"mount --bind "$0" /etc/resolv.conf && exec "$@""#)
            .arg(&self.resolv)
            .arg(program);
        c
    }

    /// Runs `program ARGS` in `ns` to its end, killed after `timeout`; its output whatever its
    /// exit status.
    pub fn run(
        &self,
        ns: &str,
        timeout: Duration,
        program: &str,
        args: &[&str],
    ) -> anyhow::Result<Output> {
        self.command(ns, "timeout")
            .args(["-s", "KILL", &format!("{}", timeout.as_secs_f64())])
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {program} in {ns}"))
    }

    /// As [`PeerLab::run`], failing unless it exits 0; returns its stdout.
    pub fn run_ok(
        &self,
        ns: &str,
        timeout: Duration,
        program: &str,
        args: &[&str],
    ) -> anyhow::Result<String> {
        let out = self.run(ns, timeout, program, args)?;
        if !out.status.success() {
            bail!(
                "{program} {} in {ns}: {}\n{}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts `program ARGS` in `ns` as a [`Daemon`] (its own process group, killed on drop),
    /// stdout and stderr to `DIR/NAME.out`.
    pub fn spawn(
        &self,
        ns: &str,
        name: &str,
        program: impl AsRef<std::ffi::OsStr>,
        args: &[&str],
    ) -> anyhow::Result<Daemon> {
        let output = self.dir.join(format!("{name}.out"));
        let out = std::fs::File::create(&output)?;
        let child = self
            .command(ns, program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {name} in {ns}"))?;
        Ok(Daemon {
            name: name.to_string(),
            output,
            child,
        })
    }

    /// A sub-directory of the lab's temp dir, created.
    pub fn subdir(&self, name: &str) -> anyhow::Result<PathBuf> {
        let d = self.dir.join(name);
        std::fs::create_dir_all(&d)?;
        Ok(d)
    }

    fn openssl(&self, args: &[&str]) -> anyhow::Result<()> {
        check(
            &format!("openssl {}", args.join(" ")),
            Command::new("openssl")
                .args(args)
                .current_dir(&self.dir)
                .output(),
        )?;
        Ok(())
    }

    fn make_ca(&self) -> anyhow::Result<()> {
        self.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            path_str(&self.ca_key)?,
            "-out",
            path_str(&self.ca)?,
            "-days",
            "2",
            "-subj",
            "/CN=edge-classifier peer lab test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ])
    }

    /// A certificate for `name` signed by the lab's CA, for servers and clients alike, with
    /// `dns` names and `ips` as subject alternative names (the first DNS name is the CN).
    pub fn cert(&self, name: &str, dns: &[&str], ips: &[IpAddr]) -> anyhow::Result<Cert> {
        let certs = self.subdir("certs")?;
        let c = Cert {
            cert: certs.join(format!("{name}.pem")),
            key: certs.join(format!("{name}.key")),
        };
        let csr = certs.join(format!("{name}.csr"));
        let ext = certs.join(format!("{name}.ext"));
        let san: Vec<String> = dns
            .iter()
            .map(|d| format!("DNS:{d}"))
            .chain(ips.iter().map(|i| format!("IP:{i}")))
            .collect();
        std::fs::write(
            &ext,
            format!(
                "subjectAltName={}\nbasicConstraints=CA:FALSE\n\
                 keyUsage=critical,digitalSignature,keyEncipherment,keyAgreement\n\
                 extendedKeyUsage=serverAuth,clientAuth\n",
                san.join(",")
            ),
        )?;
        let cn = format!("/CN={}", dns.first().copied().unwrap_or(name));
        self.openssl(&[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            path_str(&c.key)?,
            "-out",
            path_str(&csr)?,
            "-subj",
            &cn,
        ])?;
        let serial = format!(
            "0x{:x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_nanos()
        );
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            path_str(&csr)?,
            "-CA",
            path_str(&self.ca)?,
            "-CAkey",
            path_str(&self.ca_key)?,
            "-set_serial",
            &serial,
            "-days",
            "2",
            "-out",
            path_str(&c.cert)?,
            "-extfile",
            path_str(&ext)?,
        ])?;
        Ok(c)
    }

    fn start_dns(&mut self) -> anyhow::Result<()> {
        let log = self.dir.join("dnsmasq.log");
        let log_opt = format!("--log-facility={}", log.display());
        let listen = format!("--listen-address={PARTNER}");
        let pid = format!("--pid-file={}", self.dir.join("dnsmasq.pid").display());
        let mut args = vec![
            "--no-daemon",
            "--no-resolv",
            "--no-hosts",
            "--conf-file=/dev/null",
            "--bind-interfaces",
            "--user=root",
            &pid,
            "--local=/example/",
            "--log-queries",
            &listen,
            &log_opt,
        ];
        args.extend(DNS_RECORDS);
        let mut dns = self.spawn(&self.partner.clone(), "dnsmasq", "dnsmasq", &args)?;
        // Ready once it answers.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let answer = self.dig(
                &self.partner,
                &["+short", "SRV", "_xmpp-server._tcp.partner.example"],
            );
            if answer
                .as_deref()
                .is_ok_and(|a| a.contains("partner.example"))
            {
                break;
            }
            if !dns.alive() || Instant::now() > deadline {
                bail!(
                    "dnsmasq in {} did not answer: {answer:?}\n{}",
                    self.partner,
                    dns.printed()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.dns = Some(dns);
        Ok(())
    }

    /// `dig ARGS` in `ns` through the lab's resolv.conf (one try, two seconds); its stdout.
    pub fn dig(&self, ns: &str, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["+time=2", "+tries=1"];
        all.extend(args);
        self.run_ok(ns, Duration::from_secs(5), "dig", &all)
    }

    /// The body of an HTTP GET of `url` from inside `ns` (Python's urllib, which the lab's
    /// slixmpp needs anyway).
    pub fn http_get(&self, ns: &str, url: &str) -> anyhow::Result<String> {
        self.run_ok(
            ns,
            Duration::from_secs(5),
            "python3",
            &[
                "-c",
                "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=3).read().decode())",
                url,
            ],
        )
    }

    /// What dnsmasq logged (every query with `--log-queries`).
    pub fn dns_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("dnsmasq.log")).unwrap_or_default()
    }
}

impl Drop for PeerLab {
    fn drop(&mut self) {
        self.dns.take();
        for ns in self.namespaces() {
            let _ = ip(&["netns", "del", ns]);
        }
        if std::env::var_os("EC_KEEP_PEER_DIR").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}

impl PeerLab {
    /// Waits until something listens on TCP or UDP `port` in `ns`; panics, with what `d`
    /// printed, if nothing does within 10 s or `d` exits first.
    pub fn wait_listening(&self, ns: &str, udp: bool, port: u16, d: &mut Daemon) {
        let flag = if udp { "-Hlun" } else { "-Hltn" };
        let up = wait_for(Duration::from_secs(10), || {
            if !d.alive() {
                return Some(false);
            }
            let o = self
                .run(
                    ns,
                    Duration::from_secs(3),
                    "ss",
                    &[flag, &format!("sport = :{port}")],
                )
                .ok()?;
            (!String::from_utf8_lossy(&o.stdout).trim().is_empty()).then_some(true)
        });
        assert!(
            up == Some(true),
            "{} never listened on {port}:\n{}",
            d.name,
            d.printed()
        );
    }
}

/// The daemon binary cargo built next to the running test (`target/debug/edge-classifier`;
/// `cargo test` of the workspace builds it, since edge-classifier's own tests run it).
pub fn daemon_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("edge-classifier");
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build -p edge-classifier`",
        bin.display()
    );
    bin
}

/// An instance of the real daemon (`edge-classifier run`) in the lab's edge namespace, ext0
/// external and int0 internal, metrics on the namespace's 127.0.0.1:9477; stopped (detached,
/// pins removed) on drop.
pub struct EdgeInstance<'a> {
    pub lab: &'a PeerLab,
    pub bin: PathBuf,
    pub name: String,
}

impl<'a> EdgeInstance<'a> {
    /// An instance named for `tag` and this process.
    pub fn new(lab: &'a PeerLab, tag: &str) -> EdgeInstance<'a> {
        EdgeInstance {
            lab,
            bin: daemon_binary(),
            name: format!("{tag}-{}", std::process::id()),
        }
    }

    /// `edge-classifier run` with `catalogue`, once it printed `ready` (every NIC protected,
    /// started afresh or adopting the pins of a daemon before it); its output goes to
    /// `DIR/LOG.out`.
    pub fn run(&self, catalogue: &Path, log: &str) -> Daemon {
        let mut d = self
            .lab
            .spawn(
                &self.lab.edge,
                log,
                &self.bin,
                &[
                    "run",
                    "--catalogue",
                    &catalogue.display().to_string(),
                    "--iface",
                    "ext0=external",
                    "--iface",
                    "int0=internal",
                    "--instance",
                    &self.name,
                    "--metrics",
                    "127.0.0.1:9477",
                ],
            )
            .expect("edge-classifier run");
        let up = wait_for(Duration::from_secs(60), || {
            if !d.alive() {
                return Some(false);
            }
            d.printed().lines().any(|l| l == "ready").then_some(true)
        });
        assert_eq!(up, Some(true), "the daemon did not start:\n{}", d.printed());
        d
    }

    /// `edge-classifier ARGS --instance NAME` in the edge namespace, whatever its exit status.
    pub fn try_cli(&self, args: &[&str]) -> Output {
        let mut all = args.to_vec();
        all.extend(["--instance", &self.name]);
        self.lab
            .command(&self.lab.edge, &self.bin)
            .args(&all)
            .output()
            .expect("edge-classifier")
    }

    /// [`EdgeInstance::try_cli`], which must succeed: its stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let o = self.try_cli(args);
        assert!(
            o.status.success(),
            "edge-classifier {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Packets of rule `id` on ext0, from `edge-classifier stats --instance` (the pinned maps).
    pub fn rule(&self, id: &str) -> u64 {
        let out = self.cli(&["stats"]);
        out.lines()
            .find_map(|l| {
                let t: Vec<&str> = l.split_whitespace().collect();
                if t.first() != Some(&id) {
                    return None;
                }
                let at = t.iter().position(|x| *x == EXT)?;
                t.get(at + 1)?.parse().ok()
            })
            .unwrap_or_else(|| panic!("no counter of {id} on {EXT} in:\n{out}"))
    }

    /// The daemon's `/metrics` text, fetched inside the edge namespace.
    pub fn metrics(&self) -> String {
        self.lab
            .http_get(&self.lab.edge, "http://127.0.0.1:9477/metrics")
            .unwrap_or_default()
    }
}

impl Drop for EdgeInstance<'_> {
    fn drop(&mut self) {
        let _ = self.try_cli(&["stop"]);
    }
}

/// Polls `f` every 100 ms until it returns `Some`, for at most `timeout`.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(t) = f() {
            return Some(t);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(feature = "classifier")]
mod classifier {
    use edge_classifier::{
        catalogue::Catalogue,
        compile::compile,
        loader::{AttachMode, Classifier},
        maps::IfaceStats,
    };

    use super::{EXT, INT, PeerLab};

    impl PeerLab {
        /// The shipped `seed` profile with the lab's addresses in its sets (IPv4 only: the
        /// peer lab has no IPv6).
        pub fn catalogue_text() -> String {
            let seed = edge_classifier::catalogue::profiles::profile("seed")
                .expect("the seed profile ships");
            let mut text = seed.text.to_string();
            for (set, value) in [
                ("access_edge", "[\"198.51.100.10/32\"]"),
                ("internal_edge", "[\"192.0.2.10/32\"]"),
                ("public_im_partners", "[\"203.0.113.0/24\"]"),
            ] {
                let start = text
                    .find(&format!("\n{set} = ["))
                    .unwrap_or_else(|| panic!("the seed profile has no set {set}"))
                    + 1;
                let end = start + text[start..].find('\n').expect("a line end");
                text.replace_range(start..end, &format!("{set} = {value}"));
            }
            text
        }

        /// [`PeerLab::catalogue_text`], parsed.
        pub fn catalogue() -> Catalogue {
            Catalogue::parse("peer-lab.toml", &Self::catalogue_text())
                .unwrap_or_else(|e| panic!("the peer lab's catalogue: {e}"))
        }

        /// The classifier loaded with [`PeerLab::catalogue`] and attached inside the edge
        /// namespace: ext0 external, int0 internal (XDP native on the veths, TC egress).
        pub fn attach(&self) -> anyhow::Result<Classifier> {
            let catalogue = Self::catalogue();
            crate::in_netns(&self.edge, move || {
                let mut c = Classifier::load(compile(&catalogue)?)?;
                c.attach(EXT, "external", AttachMode::Native)?;
                c.attach(INT, "internal", AttachMode::Native)?;
                Ok(c)
            })
        }
    }

    /// Counters of an attached classifier, by NIC name, rule id and reason.
    pub struct Counters<'a>(pub &'a Classifier);

    impl Counters<'_> {
        pub fn stats(&self, iface: &str) -> IfaceStats {
            let b = self
                .0
                .bindings()
                .iter()
                .find(|b| b.name == iface)
                .unwrap_or_else(|| panic!("{iface} is not bound"));
            self.0.iface_stats(b).expect("iface stats")
        }

        /// Packets counted under rule `id` on `iface`.
        pub fn rule(&self, iface: &str, id: &str) -> u64 {
            let ix = self
                .0
                .compiled()
                .rules
                .iter()
                .position(|r| r.id == id)
                .unwrap_or_else(|| panic!("no rule {id}"));
            self.stats(iface).rules[ix].packets
        }

        /// Packets counted under reason `r` (edge_classifier_common::reason) on `iface`.
        pub fn reason(&self, iface: &str, r: u32) -> u64 {
            self.stats(iface).reasons[r as usize].packets
        }
    }
}

#[cfg(feature = "classifier")]
pub use classifier::Counters;

/// Whether `dev` in `ns` has an XDP program attached.
pub fn xdp_attached(ns: &str, dev: &str) -> bool {
    crate::xdp_prog(ns, dev).is_some()
}

// The real servers an Edge's peers run, shared by the peer tests.

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
listen=udp:127.0.0.1:5060
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
modparam("tls", "config", "@TLS_CFG@")
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
    $var(srv) = "_sipfederationtls._tcp." + $rd;
    if (srv_query("$var(srv)", "fed") < 1 || $srvquery(fed=>count) < 1) {
        xlog("L_ERR", "no SRV $var(srv)\n");
        sl_send_reply("404", "No SRV");
        exit;
    }
    $du = "sip:" + $srvquery(fed=>target[0]) + ":" + $srvquery(fed=>port[0]) + ";transport=tls";
    xlog("L_NOTICE", "relaying $rm to $du\n");
    force_send_socket(tls:@IP@:5061);
    if (!t_relay()) { sl_reply_error(); }
}
"#;

const TLS_CFG: &str = "[server:default]
method = TLSv1.2+
verify_certificate = yes
require_certificate = yes
private_key = @KEY@
certificate = @CERT@
ca_list = @CA@

[client:default]
method = TLSv1.2+
verify_certificate = yes
require_certificate = yes
private_key = @KEY@
certificate = @CERT@
ca_list = @CA@
";

/// Clients on 443 (P3) bring no certificate.
const TLS_CFG_443: &str = "
[server:@IP@:443]
method = TLSv1.2+
verify_certificate = no
require_certificate = no
private_key = @KEY@
certificate = @CERT@
ca_list = @CA@
";

pub fn fill(template: &str, vars: &[(&str, &str)]) -> String {
    let mut t = template.to_string();
    for (k, v) in vars {
        t = t.replace(k, v);
    }
    t
}

impl PeerLab {
    /// A Kamailio for `name` (`edge`, `partner`, `stranger`) on `ip` in `ns`, taking sipp's
    /// requests on UDP `127.0.0.1:5060`, with a certificate of the lab's CA for `sip.NAME.example`.
    pub fn kamailio(&self, ns: &str, name: &str, ip: IpAddr) -> Daemon {
        let lab = self;
        let dir = lab.subdir(&format!("kamailio-{name}")).expect("dir");
        let domain = format!("{name}.example");
        let cert = lab
            .cert(name, &[&format!("sip.{domain}"), &domain], &[ip])
            .expect("certificate");
        let ip = ip.to_string();
        let show = |p: &Path| p.display().to_string();
        let (cert_s, key_s, ca_s) = (show(&cert.cert), show(&cert.key), show(&lab.ca));
        let tls_path = dir.join("tls.cfg");
        let tls_s = show(&tls_path);
        let vars = [
            ("@IP@", ip.as_str()),
            ("@DOMAIN@", domain.as_str()),
            ("@TLS_CFG@", tls_s.as_str()),
            ("@CERT@", cert_s.as_str()),
            ("@KEY@", key_s.as_str()),
            ("@CA@", ca_s.as_str()),
        ];
        let (listen, tls443) = if name == "edge" {
            (format!("listen=tls:{ip}:443"), fill(TLS_CFG_443, &vars))
        } else {
            (String::new(), String::new())
        };
        let cfg = dir.join("kamailio.cfg");
        std::fs::write(
            &cfg,
            fill(KAMAILIO_CFG, &vars).replace("@EXTRA_LISTEN@", &listen),
        )
        .expect("kamailio.cfg");
        std::fs::write(&tls_path, fill(TLS_CFG, &vars) + &tls443).expect("tls.cfg");
        let mut d = lab
            .spawn(
                ns,
                &format!("kamailio-{name}"),
                "kamailio",
                &[
                    "-DD",
                    "-E",
                    "-f",
                    &show(&cfg),
                    "-Y",
                    &show(&dir),
                    "-P",
                    &show(&dir.join("pid")),
                    "-m",
                    "32",
                    "-M",
                    "4",
                ],
            )
            .expect("kamailio");
        lab.wait_listening(ns, false, 5061, &mut d);
        lab.wait_listening(ns, true, 5060, &mut d);
        d
    }

    /// coturn (`turnserver`) for `name` on `ip`:3478 in `ns`, UDP and TCP, relaying from
    /// 50000-59999, no TLS.
    pub fn turnserver(&self, ns: &str, name: &str, ip: IpAddr) -> Daemon {
        let lab = self;
        let dir = lab.subdir(name).expect("dir");
        let ip = ip.to_string();
        let mut d = lab
            .spawn(
                ns,
                name,
                "turnserver",
                &[
                    "-n",
                    "--listening-ip",
                    &ip,
                    "--listening-port",
                    "3478",
                    "--relay-ip",
                    &ip,
                    "--min-port",
                    "50000",
                    "--max-port",
                    "59999",
                    "--no-tls",
                    "--no-dtls",
                    "--no-cli",
                    "--simple-log",
                    "--log-file",
                    "stdout",
                    "--pidfile",
                    &dir.join("pid").display().to_string(),
                    "--db",
                    &dir.join("turndb.sqlite").display().to_string(),
                ],
            )
            .expect("turnserver");
        lab.wait_listening(ns, true, 3478, &mut d);
        d
    }

    /// `turnutils_stunclient` in `ns` asking `server`: the reflexive address it got.
    pub fn stun(&self, ns: &str, server: IpAddr) -> Result<String, String> {
        let lab = self;
        let o = lab
            .run(
                ns,
                Duration::from_secs(5),
                "turnutils_stunclient",
                &["-p", "3478", &server.to_string()],
            )
            .expect("turnutils_stunclient");
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        match out.lines().find(|l| l.contains("UDP reflexive addr:")) {
            Some(l) if o.status.success() => Ok(l.to_string()),
            _ => Err(format!(
                "{}: {out}{}",
                o.status,
                String::from_utf8_lossy(&o.stderr)
            )),
        }
    }
}
