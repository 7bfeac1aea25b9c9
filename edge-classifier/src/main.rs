use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand, ValueEnum};
use edge_classifier::{
    catalogue::{Catalogue, DEFAULT_CATALOGUE},
    compile::compile,
    loader::{AttachMode, Classifier},
    metrics::{self, DEFAULT_METRICS_ADDR},
    report,
    snapshot::{CatalogueInfo, Reloads, Snapshot, unix_now},
};
use tokio::signal::unix::{SignalKind, signal};

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
    /// Attach the classifier to NICs and run until SIGINT/SIGTERM, then detach.
    ///
    /// On each NIC: XDP on ingress, and a TC egress program that records the flows outbound
    /// rules allow, so that only their replies pass. Sending SIGUSR1 prints the per-rule counter
    /// table and the flow table's state.
    Run {
        /// Rule catalogue (TOML); the embedded default catalogue when omitted.
        #[arg(long, value_name = "FILE")]
        catalogue: Option<PathBuf>,
        /// NIC to attach to and its role in the catalogue (`eth0=external`); role defaults to
        /// `external`. Repeat for each NIC.
        #[arg(long = "iface", value_name = "NAME[=ROLE]", required = true)]
        ifaces: Vec<String>,
        /// XDP mode: native with a fallback to generic (auto), or exactly one.
        #[arg(long, value_enum, default_value_t = Mode::Auto)]
        mode: Mode,
        /// Where to serve Prometheus `/metrics` (and `/snapshot` for `stats`).
        #[arg(long, value_name = "ADDR", default_value = DEFAULT_METRICS_ADDR)]
        metrics: String,
    },
    /// Print the counters of a running classifier: per rule, per reason, the flow table.
    Stats {
        /// The running classifier's --metrics address.
        #[arg(long, value_name = "ADDR", default_value = DEFAULT_METRICS_ADDR)]
        metrics: String,
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
    /// Print a catalogue: `--default` prints the embedded one.
    Catalogue {
        #[arg(long, required = true)]
        default: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    Auto,
    Native,
    Generic,
}

fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    match cli.command {
        Command::Catalogue { .. } => {
            print!("{DEFAULT_CATALOGUE}");
            Ok(())
        }
        Command::Check { file } => check(&file),
        Command::Run {
            catalogue,
            ifaces,
            mode,
            metrics,
        } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(run(catalogue, ifaces, mode, metrics))
        }
        Command::Stats {
            metrics,
            watch,
            count,
        } => stats(&metrics, watch, count),
    }
}

fn stats(addr: &str, watch: bool, count: Option<u64>) -> anyhow::Result<()> {
    let mut prev: Option<Snapshot> = None;
    let mut shown = 0u64;
    loop {
        let s = metrics::fetch(addr)?;
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

/// What the exporter reads: the classifier and what it knows of its catalogue and reloads.
struct Daemon {
    classifier: Classifier,
    catalogue: CatalogueInfo,
    reloads: Reloads,
    /// Evictions are derived from a walk that is not atomic: never report fewer than before.
    evicted_floor: u64,
}

impl Daemon {
    fn snapshot(&mut self) -> anyhow::Result<Snapshot> {
        let mut s = Snapshot::read(&self.classifier, self.catalogue.clone(), self.reloads)?;
        s.flows.evicted = s.flows.evicted.max(self.evicted_floor);
        self.evicted_floor = s.flows.evicted;
        Ok(s)
    }
}

fn check(file: &std::path::Path) -> anyhow::Result<()> {
    let cat = Catalogue::load(file)?;
    let compiled = compile(&cat)?;
    for w in cat.warnings() {
        eprintln!("{w}");
    }
    println!(
        "{}: ok: {} rules, {} address sets, {} IPv4 and {} IPv6 prefixes, {} port classes",
        file.display(),
        cat.rules.len(),
        cat.sets.len(),
        compiled.prefixes_v4.len(),
        compiled.prefixes_v6.len(),
        compiled.classes.len() - 1
    );
    Ok(())
}

fn parse_iface(spec: &str) -> anyhow::Result<(String, String)> {
    let (name, role) = spec.split_once('=').unwrap_or((spec, "external"));
    if name.is_empty() || role.is_empty() {
        bail!("--iface `{spec}`: expected NAME or NAME=ROLE, e.g. eth0=external");
    }
    Ok((name.to_string(), role.to_string()))
}

async fn run(
    catalogue: Option<PathBuf>,
    ifaces: Vec<String>,
    mode: Mode,
    metrics_addr: String,
) -> anyhow::Result<()> {
    let cat = match &catalogue {
        Some(path) => Catalogue::load(path)?,
        None => Catalogue::default_catalogue(),
    };
    let compiled = compile(&cat).with_context(|| format!("compiling {}", cat.source_name))?;
    let specs = ifaces
        .iter()
        .map(|s| parse_iface(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    // Bind before attaching: a taken port is an error to fix before any NIC is touched.
    let listener = tokio::net::TcpListener::bind(&metrics_addr)
        .await
        .with_context(|| format!("--metrics {metrics_addr}: cannot listen there"))?;
    let mut classifier = Classifier::load(compiled)?;
    let mode = match mode {
        Mode::Auto => AttachMode::Auto,
        Mode::Native => AttachMode::Native,
        Mode::Generic => AttachMode::Generic,
    };
    for (name, role) in &specs {
        let m = classifier.attach(name, role, mode)?;
        log::info!("attached to {name} as {role} ({m} mode)");
    }
    log::info!(
        "classifying with {} rules from {}; SIGUSR1 prints counters, SIGINT/SIGTERM detaches",
        cat.rules.len(),
        cat.source_name
    );
    let daemon = Arc::new(Mutex::new(Daemon {
        classifier,
        catalogue: CatalogueInfo {
            source: cat.source_name.clone(),
            digest: cat.digest.clone(),
            rules: cat.rules.len(),
        },
        reloads: Reloads {
            last: unix_now(),
            ..Reloads::default()
        },
        evicted_floor: 0,
    }));
    let for_exporter = daemon.clone();
    let snapshot: metrics::SnapshotFn = Arc::new(move || {
        for_exporter
            .lock()
            .map_err(|_| anyhow::anyhow!("classifier state poisoned"))?
            .snapshot()
    });
    log::info!(
        "serving metrics on http://{}/metrics",
        listener.local_addr()?
    );
    let server = tokio::spawn(metrics::serve(listener, snapshot));
    // Tells a supervisor (and the lab) that every NIC is protected.
    println!("ready");

    let mut term = signal(SignalKind::terminate())?;
    let mut usr1 = signal(SignalKind::user_defined1())?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = usr1.recv() => print_table(&daemon.lock().expect("lock").classifier),
        }
    }
    server.abort();
    let mut d = daemon.lock().expect("lock");
    print_table(&d.classifier);
    d.classifier.detach_all();
    log::info!("detached");
    Ok(())
}

/// Prints the counter tables. Best effort: a reader that went away (closed pipe) must not stop
/// the classifier from detaching cleanly.
fn print_table(classifier: &Classifier) {
    let text =
        (|| -> anyhow::Result<String> {
            let stats = classifier
                .bindings()
                .iter()
                .map(|b| Ok((b.clone(), classifier.iface_stats(b)?)))
                .collect::<anyhow::Result<Vec<_>>>()?;
            Ok(report::table(classifier.compiled(), &stats)
                + &report::flows(&classifier.flow_stats()?))
        })();
    use std::io::Write as _;
    let written = match text {
        Ok(t) => {
            let mut out = std::io::stdout().lock();
            out.write_all(t.as_bytes()).and_then(|()| out.flush())
        }
        Err(e) => {
            log::warn!("reading counters: {e:#}");
            Ok(())
        }
    };
    if let Err(e) = written {
        log::warn!("printing counters: {e}");
    }
}
