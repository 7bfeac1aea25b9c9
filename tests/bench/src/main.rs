//! `cargo xtask bench`: every benchmark side by side in one run, written to
//! `benchmarks/RESULTS.md` with SVG plots. A measurement for people: nothing here passes or
//! fails. Needs root. Usage: `edge-classifier-bench OUT_DIR EDGE_CLASSIFIER_BINARY`,
//! `edge-classifier-bench --paths` for the BPF instructions on each frame's path alone, or
//! `edge-classifier-bench --monitor` for each frame's time with and without a monitor attached.

use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf,
    programs::{TestRun, TestRunAttrs, TestRunOptions, TestRunResult, Xdp},
};
use edge_classifier::{
    catalogue::{Catalogue, DEFAULT_CATALOGUE},
    compile::compile,
    loader::{AttachMode, Classifier, EBPF_OBJECT, FLOOR_OBJECT, PROGRAM_NAME},
};
use edge_classifier_lab::*;
use edge_classifier_tests::*;
use ipnet::IpNet;
use trace::{Trace, Tracer};

mod trace;

const RUNS: usize = 5;

struct Stat {
    median: f64,
    min: f64,
    max: f64,
}

impl Stat {
    fn of(mut v: Vec<f64>) -> Stat {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        Stat {
            median: v[v.len() / 2],
            min: v[0],
            max: v[v.len() - 1],
        }
    }
    fn cell(&self) -> String {
        format!("{:.0} ({:.0}–{:.0})", self.median, self.min, self.max)
    }
}

fn ns_per_frame<P>(prog: &P, frame: &[u8], repeat: u32) -> f64
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let opts = TestRunOptions {
        data_in: Some(frame),
        repeat,
        ..TestRunOptions::new()
    };
    prog.test_run(opts)
        .expect("BPF_PROG_TEST_RUN")
        .duration
        .as_nanos() as f64
}

fn measure<P>(prog: &P, frame: &[u8], repeat: u32) -> Stat
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    // One run first, not counted: it warms the caches, and gives the kernel time to finish
    // the work the set-up left behind (freeing the previous catalogue's maps, RCU callbacks),
    // which otherwise lands inside the first timed runs.
    ns_per_frame(prog, frame, repeat);
    Stat::of(
        (0..RUNS)
            .map(|_| ns_per_frame(prog, frame, repeat))
            .collect(),
    )
}

fn sh(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn nsenter(ns: &str, program: &str) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net={}", Lab::netns_path(ns))).arg(program);
    c
}

/// A namespace with one veth pair (v0 with the Edge's address, v1 its peer), removed on drop.
struct Bed {
    ns: String,
}

impl Bed {
    fn new(tag: &str) -> anyhow::Result<Bed> {
        let ns = format!("ecb{}-{tag}", std::process::id() % 100_000);
        let _ = sh(Command::new("ip").args(["netns", "del", &ns]));
        sh(Command::new("ip").args(["netns", "add", &ns]))?;
        for args in [
            vec!["link", "set", "lo", "up"],
            vec!["link", "add", "v0", "type", "veth", "peer", "name", "v1"],
            vec!["addr", "add", "198.51.100.10/24", "dev", "v0"],
            vec!["link", "set", "v0", "up"],
            vec!["link", "set", "v1", "up"],
        ] {
            sh(Command::new("ip").args(["-n", &ns]).args(&args))?;
        }
        Ok(Bed { ns })
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

/// xdp-filter's own object, loaded by its own CLI (deny policy, the seed's service ports
/// allowed), run with `bpftool prog run`: the same BPF_PROG_TEST_RUN as ours.
struct XdpFilter {
    bed: Bed,
    prog_id: u32,
    dir: PathBuf,
}

impl XdpFilter {
    fn new() -> anyhow::Result<XdpFilter> {
        let bed = Bed::new("xf")?;
        sh(nsenter(&bed.ns, "xdp-filter")
            .args(["load", "-p", "deny", "v0"])
            .env("LIBXDP_SKIP_DISPATCHER", "1"))?;
        for p in ["443", "5061", "5269", "3478", "23456"] {
            sh(nsenter(&bed.ns, "xdp-filter").args(["port", p]))?;
        }
        let link = sh(Command::new("ip").args(["-n", &bed.ns, "-d", "link", "show", "v0"]))?;
        let at = link.find("prog/xdp id ").context("xdp-filter attached")? + 12;
        let prog_id = link[at..].split_whitespace().next().unwrap().parse()?;
        let dir = std::env::temp_dir().join(format!("ecb-xf-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(XdpFilter { bed, prog_id, dir })
    }

    /// One BPF_PROG_TEST_RUN of xdp-filter's program through bpftool: mean ns per frame.
    fn once(&self, frame: &[u8], repeat: u32) -> anyhow::Result<f64> {
        let f = self.dir.join("frame");
        std::fs::write(&f, frame)?;
        let out = sh(Command::new("bpftool").args([
            "prog",
            "run",
            "id",
            &self.prog_id.to_string(),
            "data_in",
            f.to_str().unwrap(),
            "repeat",
            &repeat.to_string(),
        ]))?;
        let at = out.find("duration (average): ").context("bpftool output")? + 20;
        Ok(out[at..]
            .trim_start()
            .trim_end_matches(|c: char| !c.is_ascii_digit())
            .split("ns")
            .next()
            .unwrap()
            .trim()
            .parse()?)
    }
}

impl Drop for XdpFilter {
    fn drop(&mut self) {
        let _ = nsenter(&self.bed.ns, "xdp-filter")
            .args(["unload", "v0"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn ext(a: &str) -> IpAddr {
    a.parse().unwrap()
}

/// The frame mix: (name, frame, role).
/// A frame of the benchmark: what it is, the NIC role it arrives on, and the verdict it must get
/// (checked before it is timed, so a reply really hits the flow table).
struct MixFrame {
    name: &'static str,
    frame: Vec<u8>,
    role: &'static str,
    pass: bool,
}

fn frame(name: &'static str, frame: Vec<u8>, role: &'static str, pass: bool) -> MixFrame {
    MixFrame {
        name,
        frame,
        role,
        pass,
    }
}

/// The issue's mix: an allowed frame of every inbound seed row (X3 on the internal NIC), a reply
/// of an outbound flow the Edge opened (S1), TCP 22 denied, IPv6, VLAN-tagged, non-IP.
fn mix() -> Vec<MixFrame> {
    let edge = ext("198.51.100.10");
    let partner = ext("203.0.113.5");
    let client = ext("198.51.100.1");
    let edge6 = ext("2001:db8:100::10");
    let partner6 = ext("2001:db8:203::5");
    let mut lldp = vec![0x01, 0x80, 0xc2, 0, 0, 0x0e, 2, 0, 0, 0, 0, 1, 0x88, 0xcc];
    lldp.resize(60, 0);
    // Every inbound seed row's first frame, from the shared fixture table.
    let mut mix: Vec<MixFrame> = SEED_ROWS
        .iter()
        .filter(|r| r.inbound)
        .map(|r| {
            let (src, sport, dst, dport) = r.first(false);
            let name = format!(
                "{} {} {}{}",
                r.row,
                if r.udp { "UDP" } else { "TCP" },
                r.port,
                match (r.peer, r.role) {
                    (_, "internal") => " on the internal NIC",
                    (edge_classifier_lab::Peer::Partner, _) => " from a partner",
                    _ => "",
                }
            );
            let f = if r.udp {
                udp(src, sport, dst, dport)
            } else {
                tcp(src, sport, dst, dport)
            };
            frame(Box::leak(name.into_boxed_str()), f, r.role, true)
        })
        .collect();
    mix.extend([
        frame(
            "S1 reply (flow table hit)",
            tcp_segment(client, 5061, edge, 41000, ACK),
            "external",
            true,
        ),
        frame(
            "TCP 22 (denied)",
            tcp(client, 40000, edge, 22),
            "external",
            false,
        ),
        frame(
            "P1 over IPv6",
            tcp(partner6, 40000, edge6, 5061),
            "external",
            true,
        ),
        frame(
            "P1 with a VLAN tag",
            with_vlans(&tcp(partner, 40000, edge, 5061), &[(0x8100, 10)]),
            "external",
            true,
        ),
        frame("LLDP (non-IP)", lldp, "external", true),
    ]);
    mix
}

/// Replies of the other outbound rows, timed beside the mix but not in it: every outbound row's
/// replies take the flow-table path the S1 reply in the mix takes.
fn other_replies() -> Vec<MixFrame> {
    let edge = ext("198.51.100.10");
    let partner = ext("203.0.113.5");
    let client = ext("198.51.100.1");
    vec![
        frame(
            "P2 reply (partner, TCP 5061)",
            tcp_segment(partner, 5061, edge, 41001, ACK),
            "external",
            true,
        ),
        frame(
            "P4 reply (TCP to media port 50010)",
            tcp_segment(client, 7000, edge, 50010, ACK),
            "external",
            true,
        ),
        frame(
            "P5 reply (UDP from 3478)",
            udp(client, 3478, edge, 41002),
            "external",
            true,
        ),
        frame(
            "X2 reply (TCP 5269)",
            tcp_segment(client, 5269, edge, 41003, ACK),
            "external",
            true,
        ),
        frame(
            "S1 reply over IPv6",
            tcp_segment(
                ext("2001:db8:100::1"),
                5061,
                ext("2001:db8:100::10"),
                41004,
                ACK,
            ),
            "external",
            true,
        ),
        // FIN always goes to the table (it records the teardown), so this is the cost of a reply
        // the cache does not hold: a flow's first reply in a tick on that CPU.
        frame(
            "S1 reply with FIN (the flow table, past the cache)",
            tcp_segment(client, 5061, edge, 41005, FIN | ACK),
            "external",
            true,
        ),
        // egress = "track": the answer to the Edge's own DNS query, and a denied datagram from
        // a port the Edge has sent tracked traffic to (UDP 53), which costs a flow lookup (a
        // miss) where a frame from any other port (TCP 22 above) costs none.
        frame(
            "DNS answer (tracked reply, UDP from 53)",
            udp(client, 53, edge, 41006),
            "external",
            true,
        ),
        frame(
            "UDP from 53 to a closed port (denied after a flow lookup)",
            udp(client, 53, edge, 9999),
            "external",
            false,
        ),
    ]
}

/// New flows of rules with a `limit` (role "limited": the external NIC of `limited_catalogue`),
/// timed beside the mix: TestRun repeats one frame, so each is the steady state of its path.
fn limited_frames() -> Vec<MixFrame> {
    let edge = ext("198.51.100.10");
    let client = ext("198.51.100.1");
    vec![
        frame(
            "P3 SYN under a limit (source and total bucket, admitted)",
            tcp(client, 40000, edge, 443),
            "limited",
            true,
        ),
        frame(
            "X1 SYN over a limit (dropped as rate_limited)",
            tcp(client, 40000, edge, 5269),
            "limited",
            false,
        ),
        frame(
            "P6 UDP of an admitted flow under a limit",
            udp(client, 40000, edge, 3478),
            "limited",
            true,
        ),
    ]
}

/// The default catalogue with limits: P3 and P6 so high that the repeated frame is always
/// admitted, X1 one flow an hour so that it is always refused.
fn limited_catalogue() -> Catalogue {
    let mut text = DEFAULT_CATALOGUE.to_string();
    for (id, limit) in [
        (
            "client-sip-tls-in",
            r#"{ per_source = "1000000/s", burst = 1000000, total = "1000000/s" }"#,
        ),
        ("xmpp-federation-in", r#"{ per_source = "1/h", burst = 1 }"#),
        ("messenger-stun-in", r#"{ per_source = "1/h", burst = 1 }"#),
    ] {
        let from = format!("id = \"{id}\"");
        assert!(text.contains(&from), "default catalogue has rule {id}");
        text = text.replacen(&from, &format!("{from}\nlimit = {limit}"), 1);
    }
    Catalogue::parse("limited.toml", &text).expect("the limited catalogue parses")
}

/// The harness bound to the NIC role a frame arrives on.
fn harness<'a>(
    f: &MixFrame,
    external: &'a mut Harness,
    internal: &'a mut Harness,
) -> &'a mut Harness {
    if f.role == "internal" {
        internal
    } else {
        external
    }
}

/// Opens the outbound flows the replies belong to, through the TC egress program as the Edge's
/// own frames would.
fn open_flows(h: &mut Harness) {
    let edge = ext("198.51.100.10");
    let partner = ext("203.0.113.5");
    let client = ext("198.51.100.1");
    for request in [
        tcp_segment(edge, 41000, client, 5061, SYN),
        tcp_segment(edge, 41001, partner, 5061, SYN),
        tcp_segment(edge, 50010, client, 7000, SYN),
        udp(edge, 41002, client, 3478),
        tcp_segment(edge, 41003, client, 5269, SYN),
        tcp_segment(
            ext("2001:db8:100::10"),
            41004,
            ext("2001:db8:100::1"),
            5061,
            SYN,
        ),
        tcp_segment(edge, 41005, client, 5061, SYN),
        udp(edge, 41006, client, 53),
    ] {
        assert_eq!(h.run_dir(Dir::Out, &request), TC_NEXT, "egress request");
    }
}

/// A frame's name and its cost: ours, the empty program's, xdp-filter's; and its path.
type Row = (&'static str, Stat, Stat, Option<Stat>, Trace);

/// A tracer of the XDP program as `h` loaded it, reading `h`'s maps.
fn tracer(h: &mut Harness) -> anyhow::Result<Tracer> {
    let ids = h
        .classifier
        .program()
        .info()?
        .map_ids()?
        .context("the kernel lists no maps of the program")?;
    Tracer::new(EBPF_OBJECT, PROGRAM_NAME, &ids)
}

/// Each frame's path through the program, traced against the maps of the harness it runs on.
/// Each frame gets a fresh overlay and runs twice: the second run is the steady state that
/// TestRun's repeats time (a reply's cache hit). The verdict must be the one the frame gets.
fn paths(
    frames: &[MixFrame],
    ext_h: &mut Harness,
    int_h: &mut Harness,
) -> anyhow::Result<Vec<Trace>> {
    frames
        .iter()
        .map(|f| {
            let mut t = tracer(harness(f, ext_h, int_h))?;
            // BPF_PROG_TEST_RUN delivers frames on the loopback device (ifindex 1).
            t.run(&f.frame, 1)
                .with_context(|| format!("{}: first trace", f.name))?;
            let path = t
                .run(&f.frame, 1)
                .with_context(|| format!("{}: trace", f.name))?;
            let want = if f.pass { XDP_PASS } else { XDP_DROP };
            if path.verdict != want {
                bail!(
                    "{}: the trace ends in verdict {}, the kernel's is {want}",
                    f.name,
                    path.verdict
                );
            }
            Ok(path)
        })
        .collect()
}

struct PerFrame {
    rows: Vec<Row>,
    replies: Vec<Row>,
    /// New flows of rules with a `limit`.
    limited: Vec<Row>,
}

/// The per-frame table's header and rows (the caller adds any summary row).
fn per_frame_table(md: &mut String, rows: &[Row]) -> std::fmt::Result {
    writeln!(
        md,
        "| frame | edge-classifier ns | xdp-filter ns | empty XDP_PASS ns | ours / floor | ours / xdp-filter | ns above floor | BPF insns | map lookups |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|---|---|")?;
    for (name, ours, floor, xf, path) in rows {
        writeln!(
            md,
            "| {name} | {} | {} | {} | {:.2}× | {} | {:.0} | {} | {} |",
            ours.cell(),
            xf.as_ref().map_or("–".into(), Stat::cell),
            floor.cell(),
            ours.median / floor.median,
            xf.as_ref()
                .map_or("–".into(), |x| format!("{:.2}×", ours.median / x.median)),
            ours.median - floor.median,
            path.insns,
            path.lookups_total(),
        )?;
    }
    Ok(())
}

fn per_frame(repeat: u32) -> anyhow::Result<PerFrame> {
    let mut ext_h = Harness::default_catalogue("external");
    let mut int_h = Harness::default_catalogue("internal");
    open_flows(&mut ext_h);
    let mut floor = Ebpf::load(FLOOR_OBJECT)?;
    let fp: &mut Xdp = floor.program_mut("xdp_pass").unwrap().try_into()?;
    fp.load()?;
    // Without xdp-filter there is no comparison to make: an error, not an `inf×` ratio.
    let xf = Some(XdpFilter::new().context(
        "xdp-filter, the comparison the targets are set against, cannot be loaded (`cargo xtask bench` installs xdp-tools)",
    )?);
    // Rounds, each timing every frame with every program once: a burst of noise from the
    // host then lands on one sample of many frames, not on all samples of one frame, and each
    // frame's three programs are timed seconds apart. Round 0 warms up and is not counted.
    let mut time = |frames: Vec<MixFrame>| -> anyhow::Result<Vec<Row>> {
        for f in &frames {
            let h = harness(f, &mut ext_h, &mut int_h);
            let want = if f.pass { XDP_PASS } else { XDP_DROP };
            assert_eq!(h.run(&f.frame), want, "{}: verdict", f.name);
        }
        let traced = paths(&frames, &mut ext_h, &mut int_h)?;
        let mut samples = vec![(Vec::new(), Vec::new(), Vec::new()); frames.len()];
        for round in 0..=RUNS {
            eprintln!("per-frame: round {round} of {RUNS}");
            for (f, (ours, base, theirs)) in frames.iter().zip(samples.iter_mut()) {
                let h = harness(f, &mut ext_h, &mut int_h);
                let o = ns_per_frame(h.classifier.program(), &f.frame, repeat);
                let b = ns_per_frame(&*fp, &f.frame, repeat);
                let t = xf.as_ref().map(|x| x.once(&f.frame, repeat)).transpose()?;
                if round > 0 {
                    ours.push(o);
                    base.push(b);
                    theirs.extend(t);
                }
            }
        }
        Ok(frames
            .iter()
            .zip(samples)
            .zip(traced)
            .map(|((f, (ours, base, theirs)), path)| {
                let theirs = (!theirs.is_empty()).then(|| Stat::of(theirs));
                (f.name, Stat::of(ours), Stat::of(base), theirs, path)
            })
            .collect())
    };
    let rows = time(mix())?;
    let replies = time(other_replies())?;
    // The limited frames on a harness of their own, timed the same way.
    let mut lim_h = Harness::new(&limited_catalogue(), "external");
    let frames = limited_frames();
    let traced = paths(&frames, &mut lim_h, &mut int_h)?;
    let mut samples = vec![(Vec::new(), Vec::new()); frames.len()];
    for round in 0..=RUNS {
        eprintln!("per-frame (limited): round {round} of {RUNS}");
        for (f, (ours, base)) in frames.iter().zip(samples.iter_mut()) {
            let o = ns_per_frame(lim_h.classifier.program(), &f.frame, repeat);
            let b = ns_per_frame(&*fp, &f.frame, repeat);
            if round > 0 {
                ours.push(o);
                base.push(b);
            }
        }
    }
    let limited = frames
        .iter()
        .zip(samples)
        .zip(traced)
        .map(|((f, (ours, base)), path)| (f.name, Stat::of(ours), Stat::of(base), None, path))
        .collect();
    Ok(PerFrame {
        rows,
        replies,
        limited,
    })
}

/// Cost of the P1 frame (which needs both address lookups) with `prefixes` partner prefixes
/// and `rules` extra inbound rules.
fn scaled(prefixes: usize, rules: usize, repeat: u32) -> anyhow::Result<Stat> {
    let mut cat = Catalogue::default_catalogue();
    let mut nets: Vec<IpNet> = (0..prefixes as u32)
        .map(|i| {
            IpNet::new(
                std::net::Ipv4Addr::from(0x0a00_0000u32 + (i << 4)).into(),
                28,
            )
            .unwrap()
        })
        .collect();
    nets.push("203.0.113.0/24".parse().unwrap());
    cat.sets.insert("public_im_partners".into(), nets);
    let template = cat.rules[3].clone();
    for i in 0..rules {
        let mut r = template.clone();
        r.id = format!("bench-{i}");
        r.ports = edge_classifier::catalogue::PortRange {
            lo: 10000 + i as u16,
            hi: 10000 + i as u16,
        };
        cat.rules.push(r);
    }
    let mut h = Harness::new(&cat, "external");
    std::thread::sleep(Duration::from_secs(1));
    // A partner address inside the last of the generated prefixes.
    let src: IpAddr = if prefixes > 0 {
        std::net::Ipv4Addr::from(0x0a00_0000u32 + (((prefixes - 1) as u32) << 4) + 1).into()
    } else {
        ext("203.0.113.5")
    };
    let frame = tcp(src, 40000, ext("198.51.100.10"), 5061);
    assert_eq!(h.run(&frame), XDP_PASS, "the scaled P1 frame passes");
    Ok(measure(h.classifier.program(), &frame, repeat))
}

/// Wall time per frame of BPF_PROG_TEST_RUN with live frames into v0's stack.
fn live_run(ns: &str, prog_ctor: LiveProg, repeat: u32) -> anyhow::Result<Stat> {
    let v0 = mac(ns, "v0")?;
    in_netns(ns, move || {
        let ifindex = edge_classifier::loader::ifindex("v0")?;
        let frame = {
            let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 9], v0)
                .ipv4([198, 51, 100, 1], [198, 51, 100, 10], 64)
                .tcp(40000, 22, 1, 64240)
                .syn();
            let mut f = Vec::new();
            b.write(&mut f, &[])?;
            f
        };
        // struct xdp_md: data 0, data_end the frame's length (the kernel insists), ingress_ifindex.
        let mut ctx = [0u8; 24];
        ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
        ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
        // Each live run sets up a page pool first: runs of N and 2N frames, differenced, leave
        // the cost of N frames alone.
        let wall = |prog: &Xdp, n: u32| -> anyhow::Result<f64> {
            let opts = TestRunOptions {
                data_in: Some(&frame),
                ctx_in: Some(&ctx),
                repeat: n,
                attrs: TestRunAttrs::new().xdp_live_frames(64),
                ..TestRunOptions::new()
            };
            let t = Instant::now();
            prog.test_run(opts)?;
            Ok(t.elapsed().as_nanos() as f64)
        };
        let run = |prog: &Xdp| -> anyhow::Result<Stat> {
            let mut per = Vec::new();
            for _ in 0..RUNS {
                let one = wall(prog, repeat)?;
                let two = wall(prog, 2 * repeat)?;
                per.push((two - one) / repeat as f64);
            }
            Ok(Stat::of(per))
        };
        match prog_ctor {
            LiveProg::Ours => {
                let mut c = Classifier::load(compile(&Catalogue::default_catalogue())?)?;
                c.bind("v0", "external")?;
                run(c.program())
            }
            LiveProg::Floor | LiveProg::FloorDrop => {
                let name = if matches!(prog_ctor, LiveProg::Floor) {
                    "xdp_pass"
                } else {
                    "xdp_drop"
                };
                let mut floor = Ebpf::load(FLOOR_OBJECT)?;
                let fp: &mut Xdp = floor.program_mut(name).unwrap().try_into()?;
                fp.load()?;
                run(fp)
            }
        }
    })
}

#[derive(Clone, Copy)]
enum LiveProg {
    Ours,
    /// The empty XDP_PASS program: what follows it is the stack.
    Floor,
    /// The empty XDP_DROP program: the cost of a drop with no decision.
    FloorDrop,
}

fn live(repeat: u32) -> anyhow::Result<Vec<(&'static str, Stat)>> {
    let mut out = Vec::new();
    let bed = Bed::new("live")?;
    out.push((
        "edge-classifier (XDP_DROP)",
        live_run(&bed.ns, LiveProg::Ours, repeat)?,
    ));
    out.push((
        "empty XDP_DROP program (a drop with no decision)",
        live_run(&bed.ns, LiveProg::FloorDrop, repeat)?,
    ));
    out.push((
        "XDP_PASS, no filter (the stack answers with RST)",
        live_run(&bed.ns, LiveProg::Floor, repeat)?,
    ));
    for (name, setup, teardown) in [
        (
            "XDP_PASS + nftables netdev ingress drop",
            "table netdev ecb {\n chain c {\n  type filter hook ingress device v0 priority 0;\n  tcp dport 22 drop\n }\n}\n",
            "delete table netdev ecb",
        ),
        (
            "XDP_PASS + nftables inet input drop",
            "table inet ecb {\n chain c {\n  type filter hook input priority 0;\n  tcp dport 22 drop\n }\n}\n",
            "delete table inet ecb",
        ),
    ] {
        pipe(nsenter(&bed.ns, "nft").args(["-f", "-"]), setup)?;
        out.push((name, live_run(&bed.ns, LiveProg::Floor, repeat)?));
        pipe(nsenter(&bed.ns, "nft").args(["-f", "-"]), teardown)?;
    }
    sh(nsenter(&bed.ns, "iptables").args([
        "-t",
        "raw",
        "-A",
        "PREROUTING",
        "-p",
        "tcp",
        "--dport",
        "22",
        "-j",
        "DROP",
    ]))?;
    out.push((
        "XDP_PASS + iptables raw PREROUTING drop",
        live_run(&bed.ns, LiveProg::Floor, repeat)?,
    ));
    Ok(out)
}

fn pipe(cmd: &mut Command, input: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut child = cmd.stdin(Stdio::piped()).spawn()?;
    child.stdin.take().unwrap().write_all(input.as_bytes())?;
    let st = child.wait()?;
    if !st.success() {
        bail!("{cmd:?} failed");
    }
    Ok(())
}

struct Flood {
    veth_dropped: u64,
    sent: u64,
    seconds: f64,
    dropped: u64,
    connects: usize,
    failed: usize,
    p50_ms: f64,
    p99_ms: f64,
}

/// A bounded trafgen flood of TCP 22 SYNs into the edge while TCP exchanges with 5061 go on.
fn flood(frames: u64) -> anyhow::Result<Flood> {
    let lab = Lab::create("flood")?;
    let mut c = in_netns(&lab.edge, || {
        let mut c = Classifier::load(compile(&Catalogue::default_catalogue())?)?;
        c.attach(EDGE_EXT, "external", AttachMode::Native)?;
        Ok(c)
    })?;
    let _listeners = Listeners::start(&lab.edge, &[5061], &[])?;
    let (wan, ext0) = (mac(&lab.remote, "wan0")?, mac(&lab.edge, EDGE_EXT)?);
    let frame = {
        let b = etherparse::PacketBuilder::ethernet2(wan, ext0)
            .ipv4([198, 51, 100, 1], [198, 51, 100, 10], 64)
            .tcp(40000, 22, 1, 64240)
            .syn();
        let mut f = Vec::new();
        b.write(&mut f, &[])?;
        f
    };
    let conf = std::env::temp_dir().join(format!("ecb-trafgen-{}.cfg", std::process::id()));
    let bytes: Vec<String> = frame.iter().map(|b| format!("0x{b:02x}")).collect();
    std::fs::write(&conf, format!("{{ {} }}\n", bytes.join(", ")))?;
    let before = c.iface_stats(&c.bindings()[0].clone())?;
    let started = Instant::now();
    let mut trafgen = nsenter(&lab.remote, "timeout")
        .args([
            "60",
            "trafgen",
            "--dev",
            "wan0",
            "--cpus",
            "1",
            "--rate",
            "400000pps",
            "--conf",
        ])
        .arg(&conf)
        .args(["-n", &frames.to_string()])
        // trafgen's closing lines say how many frames really left ("N packets outgoing").
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning trafgen (`apt-get install netsniff-ng`)")?;
    let mut times = Vec::new();
    let mut failed = 0;
    while trafgen.try_wait()?.is_none() {
        let t = Instant::now();
        let x = tcp_exchange(
            &lab.remote,
            SocketAddr::new(PARTNER_V4, 0),
            SocketAddr::new(EDGE_EXT_V4, 5061),
            Duration::from_secs(3),
        )?;
        if x.answered {
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        } else {
            failed += 1;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let out = trafgen.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "trafgen failed ({}): {}{}",
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let sent: u64 = stdout
        .lines()
        .find_map(|l| l.trim().strip_suffix(" packets outgoing"))
        .and_then(|n| n.trim().parse().ok())
        .with_context(|| format!("trafgen did not say how many frames it sent:\n{stdout}"))?;
    let after = c.iface_stats(&c.bindings()[0].clone())?;
    let wan = sh(Command::new("ip").args(["-n", &lab.remote, "-s", "link", "show", "wan0"]))?;
    // TX line: bytes packets errors dropped ...: the frames the veth could not hand to the
    // peer's XDP ring.
    let veth_dropped: u64 = wan
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("TX:"))
        .nth(1)
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let dropped = after.reasons[edge_classifier_common::reason::DROP_NO_RULE as usize].packets
        - before.reasons[edge_classifier_common::reason::DROP_NO_RULE as usize].packets;
    let _ = std::fs::remove_file(&conf);
    c.detach_all();
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| {
        times
            .get(((times.len() as f64 * p) as usize).min(times.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
    };
    Ok(Flood {
        veth_dropped,
        sent,
        seconds,
        dropped,
        connects: times.len(),
        failed,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
    })
}

/// Reload latency as `edge-classifier reload` reports it, for partner sets of each size.
fn reloads(bin: &Path) -> anyhow::Result<Vec<(usize, Vec<f64>)>> {
    let bed = Bed::new("rl")?;
    let dir = std::env::temp_dir().join(format!("ecb-rl-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let instance = format!("ecb{}", std::process::id());
    let mut daemon = nsenter(&bed.ns, bin.to_str().unwrap())
        .args([
            "run",
            "--iface",
            "v0=external",
            "--instance",
            &instance,
            "--metrics",
            "127.0.0.1:19480",
            "--detach-on-exit",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = daemon.stdout.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
    while let Some(Ok(l)) = lines.next() {
        if l == "ready" {
            break;
        }
    }
    let mut out = Vec::new();
    let old = "public_im_partners = [\"203.0.113.0/24\", \"2001:db8:203::/48\"]";
    for n in [10usize, 10_000, 100_000] {
        let mut times = Vec::new();
        for variant in 0..6u32 {
            let nets: Vec<String> = (0..n as u32)
                .map(|i| {
                    let a = 0x0a00_0000u32 + ((variant % 2) << 24) + (i << 4);
                    format!("\"{}/28\"", std::net::Ipv4Addr::from(a))
                })
                .collect();
            let text = DEFAULT_CATALOGUE
                .replace(old, &format!("public_im_partners = [{}]", nets.join(", ")));
            let file = dir.join(format!("c{n}-{variant}.toml"));
            std::fs::write(&file, text)?;
            let out = sh(Command::new(bin)
                .args(["reload", "--instance", &instance, "--catalogue"])
                .arg(&file))?;
            let at = out.rfind(" in ").context("reload output")? + 4;
            let ms: f64 = out[at..].trim().trim_end_matches(" ms").parse()?;
            times.push(ms);
        }
        out.push((n, times));
    }
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let _ = daemon.wait();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(out)
}

fn plot_per_frame(path: &Path, pf: &PerFrame) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (900, 60 + 45 * pf.rows.len() as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let max = pf
        .rows
        .iter()
        .flat_map(|(_, a, b, c, _)| [a.median, b.median, c.as_ref().map_or(0.0, |s| s.median)])
        .fold(0.0, f64::max)
        * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "ns per frame (BPF_PROG_TEST_RUN, median of 5 × 1,000,000)",
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(230)
        .build_cartesian_2d(0.0..max, 0.0..pf.rows.len() as f64)?;
    let names: Vec<&str> = pf.rows.iter().map(|r| r.0).collect();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(pf.rows.len() * 2 + 1)
        .y_label_formatter(&|y| {
            let i = (*y - 0.5).round();
            if (y - 0.5 - i).abs() < 0.01 && i >= 0.0 && (i as usize) < names.len() {
                names[names.len() - 1 - i as usize].to_string()
            } else {
                String::new()
            }
        })
        .x_desc("ns per frame")
        .draw()?;
    let n = pf.rows.len();
    for (i, (_, ours, floor, xf, _)) in pf.rows.iter().enumerate() {
        let y = (n - 1 - i) as f64;
        for (k, (v, color)) in [
            (Some(ours.median), RGBColor(31, 119, 180)),
            (xf.as_ref().map(|s| s.median), RGBColor(255, 127, 14)),
            (Some(floor.median), RGBColor(150, 150, 150)),
        ]
        .into_iter()
        .enumerate()
        {
            if let Some(v) = v {
                let y0 = y + 0.1 + 0.27 * k as f64;
                chart.draw_series(std::iter::once(Rectangle::new(
                    [(0.0, y0), (v, y0 + 0.25)],
                    color.filled(),
                )))?;
            }
        }
    }
    for (k, (label, color)) in [
        ("edge-classifier", RGBColor(31, 119, 180)),
        ("xdp-filter", RGBColor(255, 127, 14)),
        ("empty XDP_PASS", RGBColor(150, 150, 150)),
    ]
    .into_iter()
    .enumerate()
    {
        root.draw(&Rectangle::new(
            [(700, 40 + 20 * k as i32), (715, 52 + 20 * k as i32)],
            color.filled(),
        ))?;
        root.draw(&Text::new(
            label,
            (720, 40 + 20 * k as i32),
            ("sans-serif", 13),
        ))?;
    }
    root.present()?;
    Ok(())
}

fn plot_scaling(
    path: &Path,
    prefixes: &[(usize, Stat)],
    rules: &[(usize, Stat)],
) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (800, 450)).into_drawing_area();
    root.fill(&WHITE)?;
    let max = prefixes
        .iter()
        .chain(rules)
        .map(|(_, s)| s.max)
        .fold(0.0, f64::max)
        * 1.2;
    let mut chart = ChartBuilder::on(&root)
        .caption("P1 frame cost as the catalogue grows", ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0.5f64..6.5, 0.0..max)?;
    chart
        .configure_mesh()
        .x_desc("log10(count)")
        .y_desc("ns per frame")
        .draw()?;
    for (data, color, label) in [
        (prefixes, RGBColor(31, 119, 180), "address-set prefixes"),
        (rules, RGBColor(214, 39, 40), "rules"),
    ] {
        chart
            .draw_series(LineSeries::new(
                data.iter().map(|(n, s)| ((*n as f64).log10(), s.median)),
                color.stroke_width(2),
            ))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart.draw_series(
            data.iter()
                .map(|(n, s)| Circle::new(((*n as f64).log10(), s.median), 4, color.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE)
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// `--paths`: only each frame's path (instructions and lookups), no timing: a change's effect
/// on a quiet or a busy host alike, in seconds.
fn print_paths() -> anyhow::Result<()> {
    let mut ext_h = Harness::default_catalogue("external");
    let mut int_h = Harness::default_catalogue("internal");
    open_flows(&mut ext_h);
    let mut lim_h = Harness::new(&limited_catalogue(), "external");
    for (frames, limited) in [
        (mix(), false),
        (other_replies(), false),
        (limited_frames(), true),
    ] {
        let ext_h = if limited { &mut lim_h } else { &mut ext_h };
        for f in &frames {
            let want = if f.pass { XDP_PASS } else { XDP_DROP };
            let h = harness(f, ext_h, &mut int_h);
            // The first of a flow is admitted; the steady state is what the repeats see.
            h.run(&f.frame);
            assert_eq!(h.run(&f.frame), want, "{}: verdict", f.name);
        }
        let traced = paths(&frames, ext_h, &mut int_h)?;
        for (f, t) in frames.iter().zip(&traced) {
            let lookups: Vec<String> = t.lookups.iter().map(|(m, n)| format!("{m}×{n}")).collect();
            println!("{:>5}  {:<60} {}", t.insns, f.name, lookups.join(" "));
        }
        let mean = traced.iter().map(|t| t.insns).sum::<u64>() as f64 / traced.len() as f64;
        println!("{mean:>7.1}  mean\n");
    }
    Ok(())
}

/// `--monitor`: each mix frame's time (BPF_PROG_TEST_RUN, median of the rounds) with no
/// monitor, with a monitor attached to the NIC that selects nothing (the tail call into the
/// monitored copy and the slot's test), and with one that selects every frame, its ring read
/// between runs so that every event is delivered (1,000 frames a run: the ring holds 3,542).
fn print_monitor() -> anyhow::Result<()> {
    use edge_classifier_common::monitor::{MONITOR_DROP, MONITOR_PASS, MonitorConfig};
    const REPEAT: u32 = 1000;
    let mut ext_h = Harness::default_catalogue("external");
    let mut int_h = Harness::default_catalogue("internal");
    open_flows(&mut ext_h);
    let frames = mix();
    // (none, attached selecting nothing, attached selecting all): samples per frame.
    let mut samples = vec![[Vec::new(), Vec::new(), Vec::new()]; frames.len()];
    // A live slot whose selection (verdicts, reasons) is `Some`, or none.
    let set = |h: &mut Harness, sel: Option<(u32, u32)>| -> anyhow::Result<()> {
        let ifindex = h.binding.ifindex;
        let maps = h.classifier.maps_mut();
        let (flags, reasons) = sel.unwrap_or((0, 0));
        let config = MonitorConfig {
            renewals: 1,
            lease_ticks: u64::MAX,
            flags,
            reasons,
            rate_per_cpu: u32::MAX,
            ..Default::default()
        };
        maps.set_monitor_config(0, config)?;
        maps.set_iface_monitor(ifindex, 0, sel.is_some())?;
        Ok(())
    };
    let all = MONITOR_DROP | MONITOR_PASS;
    // No frame of the mix is a DHCP reply: this monitor selects none of them.
    let nothing = (all, 1 << edge_classifier_common::reason::PASS_DHCP_CLIENT);
    for round in 0..=RUNS {
        eprintln!("monitor: round {round} of {RUNS}");
        for (f, s) in frames.iter().zip(samples.iter_mut()) {
            for (state, sel) in [None, Some(nothing), Some((all, 0))]
                .into_iter()
                .enumerate()
            {
                let h = harness(f, &mut ext_h, &mut int_h);
                set(h, sel)?;
                let ns = ns_per_frame(h.classifier.program(), &f.frame, REPEAT);
                let mut ring = h.classifier.monitor_ring(0)?;
                let mut events = 0u32;
                while ring.next().is_some() {
                    events += 1;
                }
                let want = if state == 2 { REPEAT } else { 0 };
                anyhow::ensure!(events == want, "{}: {events} events, not {want}", f.name);
                set(h, None)?;
                if round > 0 {
                    s[state].push(ns);
                }
            }
        }
    }
    println!("{:>8} {:>10} {:>10}  frame", "none", "attached", "selected");
    let mut sums = [0.0; 3];
    for (f, s) in frames.iter().zip(samples) {
        let m: Vec<f64> = s.into_iter().map(|v| Stat::of(v).median).collect();
        for (sum, v) in sums.iter_mut().zip(&m) {
            *sum += v;
        }
        println!("{:>8.1} {:>10.1} {:>10.1}  {}", m[0], m[1], m[2], f.name);
    }
    let n = frames.len() as f64;
    println!(
        "{:>8.1} {:>10.1} {:>10.1}  mean (ns per frame)",
        sums[0] / n,
        sums[1] / n,
        sums[2] / n
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    if std::env::args().nth(1).as_deref() == Some("--paths") {
        return print_paths();
    }
    if std::env::args().nth(1).as_deref() == Some("--monitor") {
        return print_monitor();
    }
    let mut args = std::env::args().skip(1);
    let out_dir = PathBuf::from(args.next().unwrap_or_else(|| "benchmarks".into()));
    let bin = PathBuf::from(
        args.next()
            .context("usage: edge-classifier-bench OUT_DIR EDGE_CLASSIFIER_BINARY")?,
    );
    let repeat: u32 = std::env::var("EC_BENCH_REPEAT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    std::fs::create_dir_all(&out_dir)?;
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut md = String::new();
    writeln!(md, "# edge-classifier benchmarks\n")?;
    writeln!(
        md,
        "Made by `cargo xtask bench` on {} (kernel {}, {} CPUs, CPU `{}`, spec_rstack_overflow: `{}`), all in one run. Medians of {RUNS} runs, (min–max) beside them. Benchmarks are measurements, never pass/fail tests. Ratios hold for this kind of host only: with the SRSO \"safe RET\" mitigation every kernel call is dear and the empty program costs several times what it does without.\n",
        sh(Command::new("date").arg("-u").arg("+%Y-%m-%d %H:%M UTC"))?.trim(),
        kernel.trim(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model(),
        std::fs::read_to_string("/sys/devices/system/cpu/vulnerabilities/spec_rstack_overflow")
            .map_or_else(|_| "unknown".to_string(), |s| s.trim().to_string()),
    )?;

    // The TestRun comparisons run on one CPU, bpftool's runs of xdp-filter included (children
    // inherit the mask): otherwise the columns of a row may come from different CPUs, and one
    // of them may be the vCPU the host is busy on.
    let all_cpus = pin_to_cpu(0)?;
    let pf = per_frame(repeat)?;
    writeln!(
        md,
        "## Per-frame cost (BPF_PROG_TEST_RUN, repeat {repeat})\n"
    )?;
    writeln!(
        md,
        "xdp-filter is its own `xdpfilt_dny_all` object, loaded by `xdp-filter load -p deny` with ports 443, 5061, 5269, 3478 and 23456 allowed, run with `bpftool prog run` (the same BPF_PROG_TEST_RUN). It filters on ports only: no address sets, no roles, no flow table. The frames are timed in {RUNS} rounds after a warm-up round; each round runs every frame once through each of the three programs, so the three columns of a row are measured seconds apart.\n"
    )?;
    writeln!(md, "![per-frame cost](per-frame.svg)\n")?;
    per_frame_table(&mut md, &pf.rows)?;
    let sum = |f: fn(&Row) -> f64| pf.rows.iter().map(f).sum::<f64>();
    let sum_ours = sum(|r| r.1.median);
    let sum_floor = sum(|r| r.2.median);
    let sum_xf = sum(|r| r.3.as_ref().map_or(0.0, |s| s.median));
    let n = pf.rows.len() as f64;
    let insns = pf.rows.iter().map(|r| r.4.insns).sum::<u64>() as f64 / n;
    let lookups = pf.rows.iter().map(|r| r.4.lookups_total()).sum::<u64>() as f64 / n;
    writeln!(
        md,
        "| **mix (mean)** | **{:.0}** | **{:.0}** | **{:.0}** | **{:.2}×** | **{:.2}×** | **{:.0}** | **{insns:.0}** | **{lookups:.1}** |\n",
        sum_ours / n,
        sum_xf / n,
        sum_floor / n,
        sum_ours / sum_floor,
        sum_ours / sum_xf,
        (sum_ours - sum_floor) / n,
    )?;
    writeln!(
        md,
        "The mix has an allowed frame of each inbound seed row and one reply of an outbound flow. TestRun repeats one frame, so a reply hits the per-CPU reply cache after the first repetition of each tick. The replies of the other outbound rows, an IPv6 reply, a FIN reply (which always goes to the flow table, as a flow's first reply of a tick does), the answer to the Edge's own DNS query (`egress = \"track\"`) and a denied datagram from a port the Edge sent tracked traffic to (a flow lookup that misses) are timed here, outside the mix:\n"
    )?;
    per_frame_table(&mut md, &pf.replies)?;
    writeln!(
        md,
        "\nNew flows of rules with a `limit` (the default catalogue with limits on P3, X1 and P6): a SYN that takes a token from its source's and the rule's total bucket, a SYN refused (`rate_limited`), a datagram of a UDP flow the limit admitted. A frame of a rule without a limit pays one flag test (the mix above):\n"
    )?;
    per_frame_table(&mut md, &pf.limited)?;
    writeln!(md)?;
    plot_per_frame(&out_dir.join("per-frame.svg"), &pf)?;

    eprintln!("scaling");
    let mut by_prefixes = Vec::new();
    for p in [10usize, 1_000, 100_000, 1_000_000] {
        eprintln!("  {p} prefixes");
        by_prefixes.push((p, scaled(p, 0, repeat)?));
    }
    let mut by_rules = Vec::new();
    // Up to the largest a catalogue may have (MAX_RULES_PER_CATALOGUE, 8,192) with the seed's.
    for r in [10usize, 100, 1_000, 8_000] {
        eprintln!("  {r} rules");
        by_rules.push((r, scaled(0, r, repeat)?));
    }
    writeln!(
        md,
        "## Scaling (P1 frame, which needs both address lookups)\n"
    )?;
    writeln!(md, "![scaling](scaling.svg)\n")?;
    writeln!(md, "| address-set prefixes | ns | | extra rules | ns |")?;
    writeln!(md, "|---|---|---|---|---|")?;
    for ((p, ps), (r, rs)) in by_prefixes.iter().zip(&by_rules) {
        writeln!(md, "| {p} | {} | | {r} | {} |", ps.cell(), rs.cell())?;
    }
    let growth = by_prefixes[2].1.median / by_prefixes[0].1.median;
    writeln!(
        md,
        "\nGrowth from 10 to 100,000 prefixes: {growth:.2}×; to 1,000,000: {:.2}×. From 10 to 8,000 rules: {:.2}×.\n",
        by_prefixes[3].1.median / by_prefixes[0].1.median,
        by_rules[3].1.median / by_rules[0].1.median
    )?;
    plot_scaling(&out_dir.join("scaling.svg"), &by_prefixes, &by_rules)?;

    set_affinity(&all_cpus)?;
    eprintln!("live frames");
    let live_repeat = repeat;
    let lv = live(live_repeat)?;
    writeln!(
        md,
        "## Through the stack (BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES into a veth, TCP 22 SYN, {live_repeat} frames, one CPU)\n"
    )?;
    writeln!(
        md,
        "Wall time per frame on one CPU, stack included where the frame reaches it: runs of N and 2N frames, differenced, so that the page-pool set-up of each run drops out. Median of {RUNS}.\n"
    )?;
    writeln!(md, "| setup | ns per frame | vs edge-classifier |")?;
    writeln!(md, "|---|---|---|")?;
    let ours = lv[0].1.median;
    for (name, v) in &lv {
        writeln!(md, "| {name} | {} | {:.1}× |", v.cell(), v.median / ours)?;
    }
    writeln!(md)?;

    eprintln!("flood");
    let fl = flood(3_000_000)?;
    writeln!(md, "## A bounded trafgen flood over veth\n")?;
    writeln!(
        md,
        "{} TCP 22 SYNs sent by trafgen (one CPU, at most 400,000 frames/s) on the remote host's veth in {:.1} s ({:.0} frames/s). The classifier dropped {} of them as `no_rule`; the veth dropped {} before XDP saw them (it does when its ring to the peer's native XDP is full). Meanwhile {} TCP exchanges (connect, request, answer) with P1 on 5061 completed, {} failed; exchange time p50 {:.2} ms, p99 {:.2} ms.\n",
        fl.sent,
        fl.seconds,
        fl.sent as f64 / fl.seconds,
        fl.dropped,
        fl.veth_dropped,
        fl.connects,
        fl.failed,
        fl.p50_ms,
        fl.p99_ms
    )?;

    eprintln!("reloads");
    let rl = reloads(&bin)?;
    writeln!(
        md,
        "## Reload latency (`edge-classifier reload`, lock to state written, flip included)\n"
    )?;
    writeln!(md, "| partner prefixes | median ms | min–max ms |")?;
    writeln!(md, "|---|---|---|")?;
    for (n, times) in &rl {
        let s = Stat::of(times.clone());
        writeln!(md, "| {n} | {:.1} | {:.1}–{:.1} |", s.median, s.min, s.max)?;
    }
    writeln!(md)?;

    writeln!(md, "## Targets\n")?;
    let mix_xf = sum_ours / sum_xf;
    let mix_floor = sum_ours / sum_floor;
    let nft_best = lv
        .iter()
        .filter(|(n, _)| n.contains("nftables"))
        .map(|(_, v)| v.median)
        .fold(f64::MAX, f64::min);
    for (what, got, target, ok) in [
        (
            "mix cost vs xdp-filter",
            format!("{mix_xf:.2}×"),
            "≤ 0.5×",
            mix_xf <= 0.5,
        ),
        (
            "mix cost vs empty program",
            format!("{mix_floor:.2}×"),
            "≤ 2×",
            mix_floor <= 2.0,
        ),
        (
            "growth 10 → 100,000 prefixes",
            format!("{growth:.2}×"),
            "≤ 1.3×",
            growth <= 1.3,
        ),
        (
            "CPU per dropped frame, nftables / ours",
            format!("{:.1}×", nft_best / ours),
            "≥ 4×",
            nft_best / ours >= 4.0,
        ),
    ] {
        writeln!(
            md,
            "- {what}: **{got}** (target {target}) — {}",
            if ok { "met" } else { "not met" }
        )?;
    }
    std::fs::write(out_dir.join("RESULTS.md"), &md)?;
    println!("{md}");
    Ok(())
}

/// The CPU's model name, as /proc/cpuinfo gives it.
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string())
        })
        .unwrap_or_else(|| "unknown".to_string())
}
