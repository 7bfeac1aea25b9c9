mod daemon;

use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand, ValueEnum};
use edge_classifier::{
    catalogue::{Catalogue, CatalogueError, DEFAULT_CATALOGUE, DEFAULT_NAME, profiles},
    compile::compile,
    instance::{DEFAULT_INSTANCE, Instance},
    lifecycle,
    loader::AttachMode,
    metrics::{self, DEFAULT_METRICS_ADDR},
    report,
    snapshot::Snapshot,
};

/// XDP classifier for the NICs of a SIP/XMPP federation edge server (Lync/Skype for Business
/// Edge, Kamailio, Prosody, ejabberd): drops what the port matrix does not allow, at line rate.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Attach the classifier to NICs and serve metrics until SIGINT/SIGTERM.
    ///
    /// On each NIC: XDP on ingress, and a TC egress program that records the flows outbound
    /// rules allow, so that only their replies pass. Maps and links are pinned under
    /// /sys/fs/bpf/edge-classifier/INSTANCE/: when this process ends (even killed) the NICs stay
    /// protected, and the next `run` adopts them without a gap. `stop` (or --detach-on-exit)
    /// detaches. SIGUSR1 prints the per-rule counter table and the flow table's state.
    ///
    /// Sets that name DNS `domains` (with their `srv` services) or `hosts` are resolved here
    /// and refreshed on each record's TTL (clamped by `[dns] min_ttl`/`max_ttl`); changed
    /// addresses go in through the same double-buffered flip as `reload`. A failed lookup keeps
    /// the last good addresses (stale after `[dns] stale_after`, logged and in the metrics).
    Run {
        /// Rule catalogue (TOML). Without it: the catalogue a pinned instance is running, else
        /// the embedded default.
        #[arg(long, value_name = "FILE")]
        catalogue: Option<PathBuf>,
        /// NIC to attach to and its role in the catalogue (`eth0=external`); role defaults to
        /// `external`. Repeat for each NIC.
        #[arg(long = "iface", value_name = "NAME[=ROLE]", required = true)]
        ifaces: Vec<String>,
        /// XDP mode: native with a fallback to generic (auto), or exactly one.
        #[arg(long, value_enum, default_value_t = Mode::Auto)]
        mode: Mode,
        /// Where to serve Prometheus `/metrics` (and `/snapshot` for `stats`, and `/events`: live
        /// drop events as JSON lines, the selection of `monitor` as query parameters).
        #[arg(long, value_name = "ADDR", default_value = DEFAULT_METRICS_ADDR)]
        metrics: String,
        /// Name of this classifier instance (its pin directory and state file).
        #[arg(long, value_name = "NAME", default_value = DEFAULT_INSTANCE)]
        instance: String,
        /// Detach and remove the pins on SIGINT/SIGTERM instead of leaving the NICs protected.
        #[arg(long)]
        detach_on_exit: bool,
        /// Detach NICs this instance protected that no --iface names. Without it they stay
        /// protected, with their role and mode, and a warning says so.
        #[arg(long)]
        detach_missing: bool,
    },
    /// Swap a new catalogue into a running instance atomically; an invalid one changes nothing.
    ///
    /// Without --catalogue, the file the instance runs from is read again.
    Reload {
        #[arg(long, value_name = "FILE")]
        catalogue: Option<PathBuf>,
        #[arg(long, value_name = "NAME", default_value = DEFAULT_INSTANCE)]
        instance: String,
    },
    /// Say what the classifier would do with a flow's first frame, and why (no kernel needed).
    /// A drop names the nearest rule and what differed. Exit status: 0 pass, 1 drop, 2 error.
    ///
    /// Examples: explain --instance edge tcp 203.0.113.5:40000 198.51.100.10:5061;
    /// explain icmp 203.0.113.5 198.51.100.10 --icmp-type echo-request
    Explain {
        /// Rule catalogue. Without it (or --instance) the embedded default answers, and says so.
        #[arg(long, value_name = "FILE", conflicts_with = "instance")]
        catalogue: Option<PathBuf>,
        /// Answer with the catalogue instance NAME is running (from its state).
        #[arg(long, value_name = "NAME")]
        instance: Option<String>,
        /// Role of the NIC the frame is on.
        #[arg(long = "iface", value_name = "ROLE", default_value = "external")]
        role: String,
        /// The Edge sends the frame (egress) instead of receiving it.
        #[arg(long)]
        out: bool,
        /// The Edge has opened the reverse flow first (for replies to outbound rules).
        #[arg(long)]
        established: bool,
        /// ICMP/ICMPv6 type, by number or by the name the catalogue's icmp lists use.
        #[arg(long, value_name = "TYPE", default_value = "echo-request")]
        icmp_type: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Also run the frame through the instance's live XDP program as if it arrived on this
        /// bound NIC (BPF_PROG_TEST_RUN against the kernel's maps; nothing is sent, the frame
        /// counts on the NIC) and report the kernel's verdict beside the reference's; they must
        /// agree (exit 2 otherwise). The role is the NIC's. Needs --instance, root, and the NIC's
        /// network namespace.
        #[arg(long, value_name = "NIC", requires = "instance", conflicts_with_all = ["out", "established"])]
        probe: Option<String>,
        /// tcp, udp, icmp or icmpv6.
        #[arg(value_enum)]
        protocol: Protocol,
        /// Source: `ADDR:PORT` or `[ADDR6]:PORT` (just ADDR for ICMP).
        src: String,
        /// Destination, the same way.
        dst: String,
    },
    /// Run every frame of a capture through the kernel programs with a catalogue (a dry run):
    /// per-rule and per-reason counts each way, and any frame where the kernel and the reference
    /// classifier disagree.
    ///
    /// A frame from an address the catalogue protects (for ARP, the sender's address) is one the
    /// Edge sent: it goes through the TC egress program, which records the flows the Edge opens.
    /// Every other frame goes through XDP. In capture order, so the replies to the Edge's flows
    /// pass as they did live. Flow idle timeouts are not replayed: the kernel ages flows by its
    /// own clock, not the capture's.
    Replay {
        /// Rule catalogue; the embedded default when omitted.
        #[arg(long, value_name = "FILE")]
        catalogue: Option<PathBuf>,
        /// Role of the NIC the capture was taken on.
        #[arg(long = "iface", value_name = "ROLE", default_value = "external")]
        role: String,
        /// Write the frames the kernel dropped to this pcap, with their capture times.
        #[arg(long, value_name = "PCAP")]
        write_dropped: Option<PathBuf>,
        /// Write one tab-separated line per frame: its number (from 1, as Wireshark counts), its
        /// capture time (seconds since the epoch, with microseconds), `in` or `out`, `pass` or
        /// `drop`, and `rule:ID` or `reason:NAME`. A frame too short to run has `-`, `skipped`,
        /// `too_short`.
        #[arg(long, value_name = "FILE")]
        verdicts: Option<PathBuf>,
        /// pcap or pcapng capture of Ethernet frames.
        capture: PathBuf,
    },
    /// Detach an instance from its NICs and remove its pins and state (stopping its daemon).
    Stop {
        #[arg(long, value_name = "NAME", default_value = DEFAULT_INSTANCE)]
        instance: String,
    },
    /// Print the counters of a running classifier: per rule, per reason, the flow table.
    ///
    /// From the daemon's metrics address, or with --instance from the instance's pins (root;
    /// works while the daemon is down).
    Stats {
        /// The running classifier's --metrics address.
        #[arg(long, value_name = "ADDR", default_value = DEFAULT_METRICS_ADDR)]
        metrics: String,
        /// Read the counters from this instance's pinned maps instead of asking the daemon.
        #[arg(long, value_name = "NAME", conflicts_with = "metrics")]
        instance: Option<String>,
        /// Refresh every second, with per-second rates.
        #[arg(long)]
        watch: bool,
        /// With --watch: stop after this many refreshes.
        #[arg(long, value_name = "N")]
        count: Option<u64>,
    },
    /// Validate a catalogue; report errors as file:line:column, and overlapping or shadowed rules.
    Check {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Print a catalogue: a shipped profile (on documentation addresses: edit its sets, then
    /// `check` it), or the one an instance runs.
    #[command(group(clap::ArgGroup::new("which").required(true).args(["default", "profile", "instance"])))]
    Catalogue {
        /// The embedded default: the `seed` profile.
        #[arg(long)]
        default: bool,
        /// A shipped profile: seed (the seed matrix), sfb-edge (the whole Lync 2013 / Skype for
        /// Business Edge role), sip-xmpp-edge (a Kamailio + Prosody + coturn edge).
        #[arg(long, value_name = "NAME", value_parser = clap::builder::PossibleValuesParser::new(["seed", "sfb-edge", "sip-xmpp-edge"]))]
        profile: Option<String>,
        /// The catalogue text instance NAME is running (from its state).
        #[arg(long, value_name = "NAME")]
        instance: Option<String>,
    },
    /// Show the frames the classifier drops (or passes), live, from the programs themselves:
    /// XDP runs before every packet tap, so tcpdump never sees a dropped frame.
    ///
    /// One line per frame: time, NIC, in/out, verdict, rule or reason, protocol, source and
    /// destination address:port, length. Reason, rule, NIC and verdict are selected in the
    /// kernel; FILTER (a pcap-filter expression, as tcpdump takes) is applied here by libpcap
    /// to the frame's first 256 bytes. The kernel writes at most --rate events a second; what
    /// it could not deliver is counted, and the summary at the end (stderr) says how many were
    /// missed. Reads the instance's pinned maps: works whether or not the daemon runs (root).
    /// Up to 4 monitors at once; one that ends, even killed, leaves nothing running.
    ///
    /// The daemon serves the same events as JSON lines on its --metrics address: `/events`,
    /// with these options as query parameters (reason, rule, iface, verdict, filter, count,
    /// duration, rate).
    ///
    /// Examples: monitor --reason no_rule 'src net 203.0.113.0/24 and tcp port 5061';
    /// monitor --iface ext0 --verdict all --write /tmp/ext0.pcap --duration 60
    Monitor {
        #[arg(long, value_name = "NAME", default_value = DEFAULT_INSTANCE)]
        instance: String,
        /// Only frames counted under this reason (no_rule, not_established, unprotected,
        /// malformed, fragment, icmp, …); repeatable.
        #[arg(long, value_name = "R")]
        reason: Vec<String>,
        /// Only frames counted under this rule id of the running catalogue; repeatable (8 at
        /// most). With --reason: frames either selects.
        #[arg(long, value_name = "ID")]
        rule: Vec<String>,
        /// Only frames on this bound NIC; repeatable. Without it, every bound NIC.
        #[arg(long = "iface", value_name = "NIC")]
        iface: Vec<String>,
        #[arg(long, value_enum, default_value = "drop")]
        verdict: edge_classifier::monitor::Verdicts,
        /// Write the frames to this pcap file (original length recorded, up to 256 bytes of
        /// each) instead of printing them.
        #[arg(long, value_name = "FILE.pcap")]
        write: Option<PathBuf>,
        /// One JSON object per line.
        #[arg(long, conflicts_with = "write")]
        json: bool,
        /// Stop after N frames (that pass FILTER).
        #[arg(long, value_name = "N")]
        count: Option<u64>,
        /// Stop after S seconds.
        #[arg(long, value_name = "S")]
        duration: Option<f64>,
        /// Events per second the kernel may write for this monitor (all CPUs together, each
        /// CPU its share).
        #[arg(long, value_name = "N", default_value_t = edge_classifier_common::monitor::MONITOR_DEFAULT_RATE,
              value_parser = clap::value_parser!(u32).range(1..))]
        rate: u32,
        /// pcap-filter expression, e.g. `src net 203.0.113.0/24 and tcp port 5061`.
        #[arg(value_name = "FILTER", trailing_var_arg = true)]
        filter: Vec<String>,
    },
    /// Show an instance from its pins and state, whether or not its daemon runs: per NIC the
    /// role, XDP mode, program and whether the link is live; the daemon; the running catalogue;
    /// the counters. Exits 0 when every bound NIC is protected, 3 otherwise.
    Status {
        #[arg(long, value_name = "NAME", default_value = DEFAULT_INSTANCE)]
        instance: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), generated from this command line's definition.
    #[command(hide = true)]
    Manpage,
}

#[derive(Clone, Copy, ValueEnum)]
enum Protocol {
    Tcp,
    Udp,
    Icmp,
    Icmpv6,
}

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    Auto,
    Native,
    Generic,
}

/// One arm per subcommand, each handing its arguments to a function or the library; it is as
/// long as the command list, which is the point of reading it in one place.
fn main() -> anyhow::Result<()> {
    edge_classifier::logging::init();
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run { .. }) {
        // The one-shot commands behave like any Unix tool in a pipeline: `reload | head` ends
        // quietly when the reader goes. The daemon keeps Rust's SIGPIPE-ignored default and
        // handles a closed stdout itself.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    match cli.command {
        Command::Catalogue {
            instance, profile, ..
        } => catalogue(instance.as_deref(), profile.as_deref()),
        Command::Status { instance, json } => status(&instance, json),
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "edge-classifier", &mut std::io::stdout());
            Ok(())
        }
        Command::Manpage => {
            let cmd = <Cli as clap::CommandFactory>::command();
            clap_mangen::Man::new(cmd).render(&mut std::io::stdout())?;
            Ok(())
        }
        Command::Check { file } => check(&file),
        Command::Run {
            catalogue,
            ifaces,
            mode,
            metrics,
            instance,
            detach_on_exit,
            detach_missing,
        } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(daemon::run(daemon::RunArgs {
                catalogue,
                ifaces,
                mode: match mode {
                    Mode::Auto => AttachMode::Auto,
                    Mode::Native => AttachMode::Native,
                    Mode::Generic => AttachMode::Generic,
                },
                metrics_addr: metrics,
                instance: Instance::new(&instance)?,
                detach_on_exit,
                detach_missing,
            }))
        }
        Command::Reload {
            catalogue,
            instance,
        } => {
            let r = lifecycle::reload(&Instance::new(&instance)?, catalogue.as_deref())?;
            println!(
                "reloaded instance {instance}: {} rules from {}, buffer {} active, in {:.1} ms",
                r.rules,
                r.source,
                r.active,
                r.elapsed.as_secs_f64() * 1000.0
            );
            Ok(())
        }
        Command::Explain {
            catalogue,
            instance,
            role,
            out,
            established,
            icmp_type,
            json,
            probe,
            protocol,
            src,
            dst,
        } => {
            let which = match (catalogue, instance) {
                (Some(path), _) => Which::File(path),
                (None, Some(name)) => Which::Instance(name),
                (None, None) => Which::Default,
            };
            let ask = Ask {
                role,
                out,
                established,
                icmp_type,
                json,
                probe,
                protocol,
                src,
                dst,
            };
            // 0 pass, 1 drop: scripts test a verdict with the exit status; errors are 2.
            match explain(which, ask) {
                Ok(true) => Ok(()),
                Ok(false) => std::process::exit(1),
                Err(e) => {
                    eprintln!("Error: {e:#}");
                    std::process::exit(2);
                }
            }
        }
        Command::Replay {
            catalogue,
            role,
            write_dropped,
            verdicts,
            capture,
        } => replay(catalogue, &role, write_dropped, verdicts, &capture),
        Command::Stop { instance } => {
            let names = lifecycle::stop(&Instance::new(&instance)?)?;
            println!(
                "stopped instance {instance}: detached from {}",
                if names.is_empty() {
                    "no interface".to_string()
                } else {
                    names.join(", ")
                }
            );
            Ok(())
        }
        Command::Monitor {
            instance,
            reason,
            rule,
            iface,
            verdict,
            write,
            json,
            count,
            duration,
            rate,
            filter,
        } => {
            let run = edge_classifier::monitor::Run {
                selection: edge_classifier::monitor::Selection {
                    reasons: reason,
                    rules: rule,
                    ifaces: iface,
                    verdicts: verdict,
                    rate,
                },
                filter: filter.join(" "),
                count,
                duration: duration.map(Duration::from_secs_f64),
            };
            let out = match write {
                Some(path) => MonitorOut::Pcap(path),
                None if json => MonitorOut::Json,
                None => MonitorOut::Lines,
            };
            monitor(&Instance::new(&instance)?, &run, out)
        }
        Command::Stats {
            metrics,
            instance,
            watch,
            count,
        } => {
            let from = match instance {
                Some(name) => StatsFrom::Pins(Instance::new(&name)?),
                None => StatsFrom::Daemon(metrics),
            };
            stats(&from, watch, count)
        }
    }
}

enum MonitorOut {
    Lines,
    Json,
    Pcap(PathBuf),
}

/// Set by SIGINT/SIGTERM: `monitor` ends as if its count were reached, and says what it missed.
static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn stop(_: libc::c_int) {
    STOP.store(true, std::sync::atomic::Ordering::Relaxed);
}

fn monitor(
    instance: &Instance,
    run: &edge_classifier::monitor::Run,
    out: MonitorOut,
) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::sync::atomic::Ordering;

    unsafe {
        libc::signal(libc::SIGINT, stop as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, stop as *const () as libc::sighandler_t);
    }
    let mut pcap = match &out {
        MonitorOut::Pcap(path) => {
            let file = std::fs::File::create(path)
                .with_context(|| format!("creating {}", path.display()))?;
            Some(
                pcap_file::pcap::PcapWriter::with_header(
                    std::io::BufWriter::new(file),
                    pcap_file::pcap::PcapHeader {
                        // Records hold at most 256 bytes, but the header says 65535: readers
                        // built on pcap-file (`replay` among them) refuse a record whose
                        // length on the wire exceeds the header's snaplen.
                        snaplen: 65535,
                        ts_resolution: pcap_file::TsResolution::NanoSecond,
                        ..Default::default()
                    },
                )
                .with_context(|| format!("writing {}", path.display()))?,
            )
        }
        _ => None,
    };
    let stdout = std::io::stdout();
    let mut stdout = stdout.lock();
    let outcome = edge_classifier::monitor::run(
        instance,
        run,
        &|| STOP.load(Ordering::Relaxed),
        // On stderr, so that stdout holds events alone; a script waits for this line to send.
        &mut |slot| {
            eprintln!(
                "monitor: attached to instance {} (slot {slot})",
                instance.name
            )
        },
        &mut |ev| {
            match (&out, pcap.as_mut()) {
                (_, Some(w)) => {
                    let ts = ev
                        .time
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap_or_default();
                    w.write_packet(&pcap_file::pcap::PcapPacket::new(
                        ts,
                        ev.len.max(ev.data.len() as u32),
                        &ev.data,
                    ))
                    .map_err(std::io::Error::other)?;
                }
                (MonitorOut::Json, None) => writeln!(stdout, "{}", ev.json())?,
                (_, None) => writeln!(stdout, "{}", ev.line())?,
            }
            stdout.flush()
        },
    )?;
    if let Some(w) = pcap {
        w.into_writer()
            .into_inner()
            .map_err(|e| e.into_error())
            .context("writing the pcap")?;
    }
    eprintln!("monitor: {outcome}");
    Ok(())
}

/// `catalogue`: a profile (the embedded default without one), or the text instance `name` runs.
fn catalogue(instance: Option<&str>, profile: Option<&str>) -> anyhow::Result<()> {
    match instance {
        None => {
            let text = match profile {
                None => DEFAULT_CATALOGUE,
                Some(name) => {
                    profiles::profile(name)
                        .with_context(|| {
                            format!("no profile `{name}`: expected one of {}", profiles::names())
                        })?
                        .text
                }
            };
            print!("{text}");
        }
        Some(name) => {
            let state = Instance::new(name)?.require_state()?;
            let running = state
                .active()
                .context("the instance's active rule buffer is unknown")?;
            print!("{}", running.text);
        }
    }
    Ok(())
}

/// `status`: exits 3 when a bound NIC is not protected.
fn status(instance: &str, json: bool) -> anyhow::Result<()> {
    let status = edge_classifier::status::read(&Instance::new(instance)?)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{status}");
    }
    if !status.protected {
        std::process::exit(3);
    }
    Ok(())
}

/// `explain`: one flow's first frame through the reference classifier.
/// Which catalogue `explain` answers with.
enum Which {
    File(PathBuf),
    Instance(String),
    Default,
}

/// What `explain` is asked.
struct Ask {
    role: String,
    out: bool,
    established: bool,
    icmp_type: String,
    json: bool,
    /// `--probe NIC`: the instance's kernel program answers too.
    probe: Option<String>,
    protocol: Protocol,
    src: String,
    dst: String,
}

/// `explain`: prints the answer; `Ok(true)` when the frame passes.
fn explain(which: Which, mut ask: Ask) -> anyhow::Result<bool> {
    use edge_classifier::explain::{Probe, Way};
    use std::net::{IpAddr, SocketAddr};
    // The addresses DNS gave the running catalogue's names (a file or the default has none:
    // only the daemon resolves).
    let mut resolved = Default::default();
    // With --probe: the NIC's pin and ifindex, and its role replaces --iface.
    let mut probe_at = None;
    let (cat, label) = match which {
        Which::File(p) => {
            let cat = Catalogue::load(&p)?;
            let label = cat.source_name.clone();
            (cat, label)
        }
        Which::Instance(name) => {
            let state = Instance::new(&name)?.require_state()?;
            let running = state
                .active()
                .context("the instance's active rule buffer is unknown")?;
            let cat = running.catalogue()?;
            resolved = running.resolved.clone();
            let label = format!("{} (running in instance {name})", cat.source_name);
            if let Some(nic) = &ask.probe {
                let bound = state
                    .bindings
                    .iter()
                    .find(|b| &b.name == nic)
                    .with_context(|| format!("instance {name} has no NIC `{nic}` bound"))?;
                ask.role = bound.role.clone();
                let pin = Instance::new(&name)?.link_pin(nic, "xdp");
                probe_at = Some((nic.clone(), pin, edge_classifier::loader::ifindex(nic)?));
            }
            (cat, label)
        }
        Which::Default => {
            let label = format!(
                "{DEFAULT_NAME}: the seed matrix on documentation addresses (no --catalogue or --instance given)"
            );
            if !ask.json {
                eprintln!(
                    "explain: answering for the embedded default catalogue; pass --catalogue FILE or --instance NAME for yours"
                );
            }
            (Catalogue::default_catalogue(), label)
        }
    };
    let compiled = compile(&cat)?;
    let sock = |s: &str| -> anyhow::Result<(IpAddr, u16)> {
        let a: SocketAddr = s
            .parse()
            .with_context(|| format!("`{s}`: expected ADDR:PORT or [ADDR6]:PORT"))?;
        Ok((a.ip(), a.port()))
    };
    let addr = |s: &str| -> anyhow::Result<IpAddr> {
        s.parse()
            .with_context(|| format!("`{s}`: expected an address (ICMP has no ports)"))
    };
    let probe = match ask.protocol {
        Protocol::Tcp | Protocol::Udp => Probe::L4 {
            transport: if matches!(ask.protocol, Protocol::Tcp) {
                edge_classifier::catalogue::Transport::Tcp
            } else {
                edge_classifier::catalogue::Transport::Udp
            },
            src: sock(&ask.src)?,
            dst: sock(&ask.dst)?,
        },
        Protocol::Icmp | Protocol::Icmpv6 => {
            let v6 = matches!(ask.protocol, Protocol::Icmpv6);
            let (src, dst) = (addr(&ask.src)?, addr(&ask.dst)?);
            if src.is_ipv6() != v6 || dst.is_ipv6() != v6 {
                bail!(
                    "{} needs {} addresses",
                    if v6 { "icmpv6" } else { "icmp" },
                    if v6 { "IPv6" } else { "IPv4" }
                );
            }
            let ty = edge_classifier::catalogue::icmp_type(v6, &ask.icmp_type)
                .with_context(|| format!("unknown ICMP type `{}`", ask.icmp_type))?;
            Probe::Icmp { ty, src, dst }
        }
    };
    let frame = match probe_at {
        Some(_) => Some(edge_classifier::explain::frame(&probe)?),
        None => None,
    };
    let mut e = edge_classifier::explain::explain(
        &cat,
        &compiled,
        &label,
        &ask.role,
        if ask.out { Way::Out } else { Way::In },
        probe,
        ask.established,
    )?;
    e.from_dns = edge_classifier::explain::dns_origins(&resolved, &e.probe);
    let kernel = match &probe_at {
        Some((nic, pin, ifindex)) => {
            let frame = frame.as_deref().expect("built for --probe");
            let action = edge_classifier::loader::probe_pinned_xdp(pin, *ifindex, frame)
                .with_context(|| format!("running the probe frame through the program on {nic}"))?;
            Some((nic, action == edge_classifier::loader::XDP_PASS, action))
        }
        None => None,
    };
    if ask.json {
        let mut v = serde_json::to_value(&e)?;
        if let Some((nic, pass, action)) = kernel {
            v["kernel"] = serde_json::json!({ "nic": nic, "pass": pass, "xdp_action": action });
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{e}");
        if let Some((nic, pass, _)) = kernel {
            println!(
                "  kernel (the program on {nic}): {}",
                if pass { "pass" } else { "drop" }
            );
        }
    }
    if let Some((nic, pass, _)) = kernel
        && pass != e.pass
    {
        bail!(
            "the kernel program on {nic} {} the probe frame, the reference classifier {} it: the running rules are not the catalogue's",
            if pass { "passes" } else { "drops" },
            if e.pass { "passes" } else { "drops" }
        );
    }
    Ok(e.pass)
}

fn replay(
    catalogue: Option<PathBuf>,
    role: &str,
    write_dropped: Option<PathBuf>,
    verdicts: Option<PathBuf>,
    capture: &std::path::Path,
) -> anyhow::Result<()> {
    let cat = match &catalogue {
        Some(p) => Catalogue::load(p)?,
        None => Catalogue::default_catalogue(),
    };
    let compiled = compile(&cat)?;
    let frames = edge_classifier::capture::read_frames(capture)?;
    let r = edge_classifier::replay::replay(compiled, role, &frames)?;
    println!(
        "{}: {} frames through the kernel programs with {} on a NIC of role {role}: {} arriving \
         (XDP), {} sent by the Edge (TC egress: from a protected address)",
        capture.display(),
        frames.len(),
        cat.source_name,
        r.ingress.frames,
        r.egress.frames,
    );
    if r.too_short() > 0 {
        println!(
            "{} frames shorter than an Ethernet header skipped",
            r.too_short()
        );
    }
    println!("\n{:<34} {:>10} {:>10}", "RULE", "IN", "OUT");
    for ((id, i), (_, o)) in r.ingress.rules.iter().zip(&r.egress.rules) {
        println!("{id:<34} {i:>10} {o:>10}");
    }
    println!(
        "\n{:<4} {:<8} {:<25} {:>10}",
        "WAY", "VERDICT", "REASON", "FRAMES"
    );
    for (way, counts) in [("in", &r.ingress), ("out", &r.egress)] {
        for (v, name, n) in &counts.reasons {
            println!("{way:<4} {v:<8} {name:<25} {n:>10}");
        }
    }
    if let Some(path) = write_dropped {
        let dropped: Vec<_> = r.dropped().map(|i| &frames[i]).collect();
        edge_classifier::capture::write_frames(&path, dropped.iter().copied())?;
        println!(
            "\n{} dropped frames written to {} with their capture times",
            dropped.len(),
            path.display()
        );
    }
    if let Some(path) = verdicts {
        let file =
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let mut out = std::io::BufWriter::new(file);
        edge_classifier::replay::write_verdicts(&mut out, &frames, &r)
            .and_then(|()| std::io::Write::flush(&mut out))
            .with_context(|| format!("writing {}", path.display()))?;
        println!(
            "verdicts of {} frames written to {}",
            frames.len(),
            path.display()
        );
    }
    if r.disagreements.is_empty() {
        println!("\nkernel and reference classifier agree on every frame");
        Ok(())
    } else {
        for d in r.disagreements.iter().take(20) {
            println!(
                "frame {} ({}): kernel {}, reference {}",
                d.frame + 1,
                edge_classifier::replay::way_name(d.way),
                d.kernel,
                d.reference
            );
        }
        bail!(
            "kernel and reference classifier disagree on {} frames",
            r.disagreements.len()
        )
    }
}

/// Where `stats` reads the counters.
enum StatsFrom {
    /// The daemon's `/snapshot`, at its --metrics address.
    Daemon(String),
    /// The instance's pinned maps.
    Pins(Instance),
}

fn stats(from: &StatsFrom, watch: bool, count: Option<u64>) -> anyhow::Result<()> {
    let mut prev: Option<Snapshot> = None;
    let mut shown = 0u64;
    loop {
        let s = match from {
            StatsFrom::Daemon(addr) => metrics::fetch(addr)?,
            StatsFrom::Pins(instance) => edge_classifier::status::read(instance)?
                .counters
                .with_context(|| {
                    format!(
                        "instance {} has no pinned maps or no known catalogue: is it running?",
                        instance.name
                    )
                })?,
        };
        if watch {
            // Clear the screen and go home, as `watch` does.
            print!("\x1b[2J\x1b[H");
        }
        print!("{}", report::snapshot_table(&s, prev.as_ref()));
        shown += 1;
        if !watch || count.is_some_and(|n| shown >= n) {
            return Ok(());
        }
        prev = Some(s);
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn check(file: &std::path::Path) -> anyhow::Result<()> {
    let cat = match Catalogue::load(file) {
        Ok(cat) => cat,
        // One error a line as they are, not the first behind anyhow's `Error: `; the count
        // ends the output and sets the exit status.
        Err(e) => {
            if let CatalogueError::Invalid { errors } = &e {
                eprintln!("{e}");
                bail!(
                    "{}: {} error{}",
                    file.display(),
                    errors.len(),
                    if errors.len() == 1 { "" } else { "s" }
                );
            }
            return Err(e.into());
        }
    };
    let compiled = compile(&cat)?;
    for w in cat.warnings() {
        eprintln!("{w}");
    }
    let names: usize = cat
        .names
        .values()
        .map(|n| n.domains.len() + n.hosts.len())
        .sum();
    println!(
        "{}: ok: {} rules, {} address sets, {} IPv4 and {} IPv6 prefixes, {} port classes{}",
        file.display(),
        cat.rules.len(),
        cat.sets.len(),
        compiled.prefixes_v4.len(),
        compiled.prefixes_v6.len(),
        compiled.classes.len() - 1,
        if names == 0 {
            String::new()
        } else {
            let sets = cat.names.len();
            format!(
                ", {names} DNS name{} in {sets} set{} (resolved by `run`)",
                if names == 1 { "" } else { "s" },
                if sets == 1 { "" } else { "s" }
            )
        }
    );
    Ok(())
}
