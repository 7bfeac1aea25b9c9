//! The `run` daemon: attach (or adopt) the pinned instance, tell systemd it is ready, serve
//! `/metrics`, follow reloads other processes make, the NICs' addresses and the NICs themselves
//! (one that goes away is reported, one that comes back under a bound name is attached again),
//! answer signals. The CLI in `main.rs` only parses arguments and calls [`run`].

use std::{
    collections::BTreeMap,
    io::Write as _,
    path::PathBuf,
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use edge_classifier::{
    catalogue::Catalogue,
    compile::{Compiled, compile},
    instance::{BoundIface, Instance, Loaded, Reloads, State},
    lifecycle,
    loader::{self, AttachMode, Classifier},
    metrics, report,
    resolve::Tracker,
    snapshot::{CatalogueInfo, NameStatus, Snapshot},
};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};

/// What the exporter reads: the classifier and what it knows of its catalogue and reloads.
struct Daemon {
    classifier: Classifier,
    instance: Instance,
    catalogue: CatalogueInfo,
    reloads: Reloads,
    /// The state generation `classifier` reflects.
    generation: u64,
    /// Evictions are derived from a walk that is not atomic: never report fewer than before.
    evicted_floor: u64,
    /// Reloads (by number) already logged: those before this daemon started count as logged.
    reloads_logged: u64,
    /// What the kernel's record said at the last refresh (generation, failures, active buffer,
    /// its reload count and load time).
    stamp: Option<(u64, u64, u32, u64, u64)>,
    /// How NICs that come back are attached (`run --mode`).
    mode: AttachMode,
    /// Bound NICs not protected now, and what was last logged about each (so a state is
    /// logged once, not every second).
    unprotected: BTreeMap<String, String>,
    /// The running catalogue, for the DNS follower ([`follow_dns`]): sent when a reload
    /// changes it.
    running: watch::Sender<Loaded>,
    /// The DNS names' status as the follower last left it.
    dns: Arc<Mutex<Vec<NameStatus>>>,
    /// The `tcp_syncookies` advice last logged: a reload that adds or removes `limit.syn_proxy`
    /// changes the setting the Edge needs, and says so once.
    syncookie_warning: Option<String>,
}

fn catalogue_info(state: &State) -> anyhow::Result<(CatalogueInfo, Compiled)> {
    let loaded = state
        .active()
        .context("no active rule buffer in the state")?;
    let (cat, compiled) = loaded
        .compile()
        .context("the running catalogue does not compile")?;
    Ok((
        CatalogueInfo {
            source: cat.source_name.clone(),
            digest: cat.digest.clone(),
            rules: cat.rules.len(),
        },
        compiled,
    ))
}

impl Daemon {
    /// Catches up with reloads other processes made (`edge-classifier reload`), and logs each
    /// one it sees: who reloaded, and the catalogue now in force or why the reload failed.
    /// The kernel's record says whether anything changed (a few map reads); only then is the
    /// state read, from the file or, when that is stale or gone, rebuilt from the pins.
    fn refresh(&mut self) -> anyhow::Result<()> {
        let maps = self.classifier.maps();
        let inst = maps.instance_record()?;
        let active = maps.active()?;
        let record = maps.record(active)?;
        let stamp = (
            inst.generation,
            inst.reloads_failed,
            active,
            record.reloads,
            record.loaded_at_ms,
        );
        if self.stamp == Some(stamp) {
            return Ok(());
        }
        let Some(state) = self.instance.read_state()? else {
            return Ok(());
        };
        self.stamp = Some(stamp);
        self.reloads = state.reloads;
        // The record changed: the running catalogue may have (a reload another process made,
        // or completed after it was killed past its flip).
        let (info, compiled) = catalogue_info(&state)?;
        if let Some(l) = state.active() {
            // Only a new catalogue text retargets the DNS follower; the addresses it put in
            // force itself are no news to it.
            self.running.send_if_modified(|r| {
                let new = r.source != l.source || r.text != l.text;
                if new {
                    *r = l.clone();
                }
                new
            });
        }
        self.warn_syncookies(compiled.has_syn_proxy());
        self.classifier.set_compiled(compiled);
        self.catalogue = info;
        self.generation = state.generation;
        for attempt in state
            .reload_log
            .iter()
            .filter(|a| a.seq > self.reloads_logged)
        {
            log_reload(attempt);
        }
        self.reloads_logged = state.reloads.succeeded + state.reloads.failed;
        Ok(())
    }

    /// Logs the kernel's SYN-cookie setting when it does not suit the running catalogue, unless
    /// the same advice was the last one logged.
    fn warn_syncookies(&mut self, syn_proxy: bool) {
        let w = edge_classifier::nic_addrs::syncookie_warning(syn_proxy);
        if w != self.syncookie_warning
            && let Some(w) = &w
        {
            log::warn!("{w}");
        }
        self.syncookie_warning = w;
    }

    /// Makes the kernel's table of the bound NICs' own addresses match what is configured now;
    /// logs what changed.
    fn sync_nic_addrs(&mut self) -> anyhow::Result<()> {
        let names: Vec<String> = self
            .classifier
            .bindings()
            .iter()
            .map(|b| b.name.clone())
            .collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let now = edge_classifier::nic_addrs::configured(&names)
            .context("reading the NICs' addresses")?;
        let before = self.classifier.maps().iface_addrs()?;
        if before == now {
            return Ok(());
        }
        self.classifier.maps_mut().set_iface_addrs(&now)?;
        let added: Vec<String> = now
            .keys()
            .filter(|a| !before.contains_key(a))
            .map(|a| a.to_string())
            .collect();
        let removed: Vec<String> = before
            .keys()
            .filter(|a| !now.contains_key(a))
            .map(|a| a.to_string())
            .collect();
        log::info!(
            "addresses of {} protected as the NICs' own: {} now{}{}",
            names.join(", "),
            now.len(),
            if added.is_empty() {
                String::new()
            } else {
                format!("; added {}", added.join(", "))
            },
            if removed.is_empty() {
                String::new()
            } else {
                format!("; removed {}", removed.join(", "))
            },
        );
        Ok(())
    }

    /// Follows the bound NICs, on every link notification and every second. A NIC that went
    /// away is logged (WARN) and shows as not attached (`edge_classifier_interface_attached`
    /// 0); a NIC that appears under a bound name (a new ifindex), or whose XDP link stopped
    /// protecting it, is attached again at once: XDP and TC egress, the same role and counters,
    /// fresh links whose pins replace the stale ones. `since`: when the kernel's notification
    /// came (or the re-check began). Returns the bindings to record when one was attached again.
    fn sync_links(&mut self, since: Instant) -> Option<Vec<BoundIface>> {
        let bound: Vec<(String, u32)> = self
            .classifier
            .bindings()
            .iter()
            .map(|b| (b.name.clone(), b.ifindex))
            .collect();
        let mut attached = false;
        for (name, was) in bound {
            let why = match loader::ifindex(&name).ok() {
                None => {
                    self.classifier.mark_detached(&name);
                    let note = match edge_classifier::nic_addrs::ifname(was) {
                        Some(now) => format!(
                            "{name} (ifindex {was}) was renamed to {now}: no NIC named {name} is protected now (the program stays on {now} until a NIC named {name} appears, which is then attached)"
                        ),
                        None => format!(
                            "{name} (ifindex {was}) went away: it is not protected; a NIC named {name} that appears is attached again"
                        ),
                    };
                    self.note(&name, note);
                    continue;
                }
                Some(now) if now != was => format!(
                    "a NIC named {name} appeared (ifindex {now}; the one protected had ifindex {was})"
                ),
                Some(_) => match self.classifier.xdp_live(&name) {
                    Ok(()) => {
                        // Renamed away and back: its link never left it.
                        self.classifier.mark_attached(&name);
                        if self.unprotected.remove(&name).is_some() {
                            log::info!("{name}: protected again (its XDP link is live on it)");
                        }
                        continue;
                    }
                    Err(why) => format!("{name} is not protected: {why}"),
                },
            };
            match self.classifier.reattach(&name, self.mode) {
                Ok(m) => {
                    log::info!(
                        "{why}: attached again (XDP in {m} mode, TC egress) {:.1} ms after it was noticed",
                        since.elapsed().as_secs_f64() * 1000.0
                    );
                    self.unprotected.remove(&name);
                    attached = true;
                }
                Err(e) => self.note(
                    &name,
                    format!(
                        "{why}; attaching it again failed, it is NOT protected (tried again at every link change and every second): {e}"
                    ),
                ),
            }
        }
        if !attached {
            return None;
        }
        match lifecycle::record_bindings(&mut self.classifier) {
            Ok(bound) => Some(bound),
            Err(e) => {
                log::warn!("recording the bindings' XDP modes: {e}");
                None
            }
        }
    }

    /// Logs (WARN) what is wrong with NIC `name`, once until it changes.
    fn note(&mut self, name: &str, what: String) {
        if self.unprotected.get(name) != Some(&what) {
            log::warn!("{what}");
            self.unprotected.insert(name.to_string(), what);
        }
    }

    fn snapshot(&mut self) -> anyhow::Result<Snapshot> {
        self.refresh()?;
        let mut s = Snapshot::read(&self.classifier, self.catalogue.clone(), self.reloads)?;
        s.dns = self.dns.lock().map(|d| d.clone()).unwrap_or_default();
        s.flows.evicted = s.flows.evicted.max(self.evicted_floor);
        self.evicted_floor = s.flows.evicted;
        Ok(s)
    }
}

/// Records the bindings after a NIC was attached again, as every writer of the state does: under
/// the instance lock, the state as the pinned maps hold it (the kernel's binding table already
/// has the new NIC) with the bindings under their bound names, written by the instance's own
/// `write_state`.
fn record_bindings(instance: &Instance, bound: Vec<BoundIface>) -> anyhow::Result<()> {
    let _lock = instance.lock()?;
    let maps = edge_classifier::maps::Maps::open_pinned(&instance.maps_dir())?;
    let cached = instance.read_state_file().ok().flatten();
    let mut state = instance.state_from_pins(&maps, cached.as_ref())?;
    state.bindings = bound;
    state.generation += 1;
    instance.write_state(&state)?;
    Ok(())
}

/// One log line per reload the daemon sees, made by any process.
fn log_reload(a: &edge_classifier::instance::ReloadAttempt) {
    let who = format!("pid {} uid {}", a.pid, a.uid);
    match (&a.error, &a.digest, a.rules) {
        (None, Some(digest), Some(rules)) => log::info!(
            "reload by {who}: {rules} rules from {} (sha256 {digest}) in force",
            a.source
        ),
        (None, ..) => log::info!("reload by {who}: {} in force", a.source),
        (Some(error), ..) => log::warn!(
            "reload by {who} of {} failed, the running rules stay: {error}",
            a.source
        ),
    }
}

fn parse_iface(spec: &str) -> anyhow::Result<(String, String)> {
    let (name, role) = spec.split_once('=').unwrap_or((spec, "external"));
    if name.is_empty() || role.is_empty() {
        bail!("--iface `{spec}`: expected NAME or NAME=ROLE, e.g. eth0=external");
    }
    Ok((name.to_string(), role.to_string()))
}

/// What `edge-classifier run` was asked to do.
pub struct RunArgs {
    pub catalogue: Option<PathBuf>,
    /// `NAME[=ROLE]` as given.
    pub ifaces: Vec<String>,
    pub mode: AttachMode,
    pub metrics_addr: String,
    pub instance: Instance,
    pub detach_on_exit: bool,
    pub detach_missing: bool,
}

/// The signals the daemon handles, registered before anything is attached so that none of
/// them can kill it half-way (SIGHUP's default action is to terminate).
struct Signals {
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    usr1: tokio::signal::unix::Signal,
}

/// Attaches (or adopts), serves metrics and follows reloads and NIC addresses until SIGINT or
/// SIGTERM.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let mut signals = Signals {
        term: signal(SignalKind::terminate())?,
        hup: signal(SignalKind::hangup())?,
        usr1: signal(SignalKind::user_defined1())?,
    };
    let specs = args
        .ifaces
        .iter()
        .map(|s| parse_iface(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if let Some(path) = &args.catalogue {
        // Fail on a bad catalogue before touching anything.
        let cat = Catalogue::load(path)?;
        compile(&cat).with_context(|| format!("compiling {}", cat.source_name))?;
    }
    // Bind before attaching: a taken port is an error to fix before any NIC is touched.
    let listener = tokio::net::TcpListener::bind(&args.metrics_addr)
        .await
        .with_context(|| format!("--metrics {}: cannot listen there", args.metrics_addr))?;
    let mode = args.mode;
    // Subscribed before attaching: a NIC that goes or comes from here on is seen.
    let nic_changes = edge_classifier::nic_addrs::Changes::subscribe()
        .map_err(|e| {
            log::warn!("following NIC and address changes (re-read every second instead): {e}")
        })
        .ok();
    let started = lifecycle::start(
        &args.instance,
        args.catalogue.as_deref(),
        &specs,
        mode,
        args.detach_missing,
    )?;
    let (info, _) = catalogue_info(&started.state)?;
    log::info!(
        "{} instance {} with {} rules from {}; SIGUSR1 prints counters; on SIGINT/SIGTERM {}",
        if started.adopted {
            "adopted"
        } else {
            "started"
        },
        args.instance.name,
        info.rules,
        info.source,
        if args.detach_on_exit {
            "detaches"
        } else {
            "the NICs stay protected (`edge-classifier stop` detaches)"
        }
    );
    let _claim = started.claim;
    let (running, running_rx) = watch::channel(
        started
            .state
            .active()
            .cloned()
            .context("no active rule buffer in the state")?,
    );
    let dns_status = Arc::new(Mutex::new(Vec::new()));
    let daemon = Arc::new(Mutex::new(Daemon {
        classifier: started.classifier,
        instance: args.instance.clone(),
        catalogue: info,
        reloads: started.state.reloads,
        generation: started.state.generation,
        evicted_floor: 0,
        reloads_logged: started.state.reloads.succeeded + started.state.reloads.failed,
        stamp: None,
        mode,
        unprotected: BTreeMap::new(),
        running,
        dns: dns_status.clone(),
        syncookie_warning: None,
    }));
    for (nic, _) in &specs {
        for w in edge_classifier::nic_addrs::routing_warnings(nic) {
            log::warn!("{nic}: {w}");
        }
    }
    daemon.lock().expect("lock").warn_syncookies(
        started
            .state
            .active()
            .and_then(|l| l.compile().ok())
            .is_some_and(|(_, c)| c.has_syn_proxy()),
    );
    // The NICs' own addresses are in the kernel before the service says it is ready, and are
    // followed from then on.
    daemon
        .lock()
        .expect("lock")
        .sync_nic_addrs()
        .context("protecting the NICs' own addresses")?;
    let for_exporter = daemon.clone();
    let snapshot: metrics::SnapshotFn = Arc::new(move || {
        for_exporter
            .lock()
            .map_err(|_| "classifier state poisoned".to_string())?
            .snapshot()
            .map_err(|e| format!("{e:#}"))
    });
    log::info!(
        "serving metrics on http://{}/metrics",
        listener.local_addr()?
    );
    let server = tokio::spawn(metrics::serve(
        listener,
        snapshot,
        Some(args.instance.clone()),
    ));
    let dns = tokio::spawn(follow_dns(args.instance.clone(), running_rx, dns_status));
    let output = Output::start();
    notify_ready(&specs, &daemon.lock().expect("lock").catalogue, &output);
    follow(&daemon, &mut signals, &args.instance, nic_changes, &output).await;
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    server.abort();
    dns.abort();
    shut_down(&args, &mut daemon.lock().expect("lock"), &output)
}

/// The daemon's stdout (the `ready` line, the counter tables): written by a thread of its own,
/// so a reader that stops reading (a full pipe) blocks that thread and never the daemon:
/// `/metrics`, signals and NIC changes go on. Text that comes while an earlier one is still
/// pending is dropped, with a log line. A closed stdout (`run | true`: EPIPE, SIGPIPE being
/// ignored) is logged once; the daemon goes on.
struct Output {
    tx: mpsc::SyncSender<(String, Option<mpsc::Sender<()>>)>,
}

impl Output {
    fn start() -> Output {
        let (tx, rx) = mpsc::sync_channel::<(String, Option<mpsc::Sender<()>>)>(1);
        let spawned = std::thread::Builder::new()
            .name("stdout".to_string())
            .spawn(move || {
                let mut closed = false;
                for (text, done) in rx {
                    if !closed {
                        let mut out = std::io::stdout().lock();
                        match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
                            Ok(()) => {}
                            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                                closed = true;
                                log::warn!(
                                    "stdout is closed (nobody reads it: {e}): the counter tables are not printed; the NICs stay protected and `edge-classifier stats` shows the counters"
                                );
                            }
                            Err(e) => log::warn!("writing to stdout: {e}"),
                        }
                    }
                    if let Some(done) = done {
                        let _ = done.send(());
                    }
                }
            });
        if let Err(e) = spawned {
            log::warn!("no thread for stdout ({e}): nothing is printed there");
        }
        Output { tx }
    }

    /// Queues `text` (`what`, for the log) for stdout; `Some` is told when it was written (or
    /// failed to be).
    fn write(&self, what: &str, text: String) -> Option<mpsc::Receiver<()>> {
        let (done, written) = mpsc::channel();
        let len = text.len();
        match self.tx.try_send((text, Some(done))) {
            Ok(()) => Some(written),
            Err(mpsc::TrySendError::Full(_)) => {
                log::warn!(
                    "stdout is not being read (a full pipe?): {what} not printed ({len} bytes dropped); `edge-classifier stats` shows the counters"
                );
                None
            }
            Err(mpsc::TrySendError::Disconnected(_)) => None,
        }
    }
}

/// Tells a supervisor that every NIC is protected: systemd (Type=notify) through sd_notify,
/// the lab and scripts through the `ready` line.
fn notify_ready(specs: &[(String, String)], running: &CatalogueInfo, output: &Output) {
    let status = format!(
        "protecting {} with {} rules from {}",
        specs
            .iter()
            .map(|(n, r)| format!("{n} ({r})"))
            .collect::<Vec<_>>()
            .join(", "),
        running.rules,
        running.source,
    );
    if let Err(e) = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&status),
    ]) {
        log::warn!("telling systemd the service is ready: {e}");
    }
    if !edge_classifier::logging::to_journal() {
        output.write("the `ready` line", "ready\n".to_string());
    }
}

/// Until SIGINT or SIGTERM: logs the reloads other processes make (within a second), keeps the
/// NICs' addresses in the kernel, follows the NICs (gone, back), reloads on SIGHUP and prints
/// the counters on SIGUSR1. Nothing here waits on stdout.
async fn follow(
    daemon: &Mutex<Daemon>,
    signals: &mut Signals,
    instance: &Instance,
    mut nic_changes: Option<edge_classifier::nic_addrs::Changes>,
    output: &Output,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut reattached = None;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = signals.term.recv() => break,
            _ = tick.tick() => {
                let mut d = daemon.lock().expect("lock");
                if let Err(e) = d.refresh() {
                    log::warn!("reading the instance state: {e:#}");
                }
                reattached = d.sync_links(Instant::now());
                if let Err(e) = d.sync_nic_addrs() {
                    log::warn!("{e:#}");
                }
            }
            changed = async {
                match nic_changes.as_mut() {
                    Some(c) => c.next().await,
                    None => std::future::pending().await,
                }
            } => {
                let since = Instant::now();
                if let Err(e) = changed {
                    log::warn!("NIC and address notifications: {e}; re-reading every second instead");
                    nic_changes = None;
                }
                let mut d = daemon.lock().expect("lock");
                // NICs first: a NIC that came back is protected before its addresses are.
                reattached = d.sync_links(since);
                if let Err(e) = d.sync_nic_addrs() {
                    log::warn!("{e:#}");
                }
            }
            _ = signals.hup.recv() => {
                // As nginx and most daemons: SIGHUP reads the catalogue file again.
                log::info!("SIGHUP: reloading the catalogue file");
                let instance = instance.clone();
                let reloaded =
                    tokio::task::spawn_blocking(move || lifecycle::reload(&instance, None)).await;
                match reloaded {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => log::debug!("SIGHUP reload failed: {e:#}"),
                    Err(e) => log::warn!("SIGHUP reload did not finish: {e}"),
                }
                if let Err(e) = daemon.lock().expect("lock").refresh() {
                    log::warn!("reading the instance state: {e:#}");
                }
            }
            _ = signals.usr1.recv() => {
                let text = {
                    let mut d = daemon.lock().expect("lock");
                    if let Err(e) = d.refresh() {
                        log::warn!("reading the instance state: {e:#}");
                    }
                    table(&mut d)
                };
                if let Some(t) = text {
                    output.write("the counter table", t);
                }
            }
        }
        if let Some(bound) = reattached {
            // Off the daemon's lock (the instance lock may wait for a reload in progress).
            let instance = instance.clone();
            match tokio::task::spawn_blocking(move || record_bindings(&instance, bound)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => log::warn!("recording the NICs attached again: {e:#}"),
                Err(e) => log::warn!("recording the NICs attached again: {e}"),
            }
        }
    }
}

/// Resolves the DNS names of the running catalogue's sets, each when its TTL runs out, and
/// puts the addresses they give in force through the same double-buffered flip as a reload
/// (`lifecycle::apply_resolved`). Follows reloads: names a reload removes stop being resolved
/// (the reload already dropped their addresses), new ones are resolved at once.
async fn follow_dns(
    instance: Instance,
    mut running: watch::Receiver<Loaded>,
    status: Arc<Mutex<Vec<NameStatus>>>,
) {
    let mut tracker: Option<Tracker> = None;
    let mut retarget = true;
    // Lookups changed the addresses and they are not in force yet.
    let mut dirty = false;
    loop {
        if retarget {
            retarget = false;
            let loaded = running.borrow_and_update().clone();
            match Catalogue::parse(&loaded.source, &loaded.text) {
                // Nothing to resolve: no resolver either (a catalogue without names must not
                // depend on /etc/resolv.conf).
                Ok(cat) if cat.names.is_empty() => {
                    tracker = None;
                    status.lock().expect("lock").clear();
                }
                Ok(cat) => {
                    let result = match tracker.as_mut() {
                        Some(t) => t.retarget(&cat, &loaded.resolved),
                        None => Tracker::new(&cat, &loaded.resolved).map(|t| {
                            tracker = Some(t);
                        }),
                    };
                    if let Err(e) = result {
                        log::warn!(
                            "DNS names of the catalogue's sets: {e}; the addresses in force are kept"
                        );
                    }
                }
                Err(e) => log::warn!("the running catalogue does not parse: {e}"),
            }
            if let Some(t) = &tracker {
                *status.lock().expect("lock") = t.status();
            }
        }
        let due = tracker
            .as_ref()
            .and_then(Tracker::next_due)
            .map(tokio::time::Instant::from_std);
        // Staleness is a matter of time passing: looked at every second too.
        let tick = tokio::time::sleep(Duration::from_secs(1));
        tokio::select! {
            changed = running.changed() => {
                if changed.is_err() {
                    return;
                }
                retarget = true;
            }
            _ = async {
                match due {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {
                if let Some(t) = tracker.as_mut() {
                    t.start_due();
                }
            }
            changed = async {
                match tracker.as_mut() {
                    Some(t) => t.next_result().await,
                    None => std::future::pending().await,
                }
            } => dirty |= changed,
            _ = tick => {}
        }
        if let Some(t) = tracker.as_mut() {
            if dirty {
                let resolved = t.resolved();
                let instance = instance.clone();
                let started = Instant::now();
                let applied = tokio::task::spawn_blocking(move || {
                    lifecycle::apply_resolved(&instance, &resolved)
                })
                .await;
                match applied {
                    Ok(Ok(buffer)) => {
                        dirty = false;
                        if let Some(buffer) = buffer {
                            log::info!(
                                "resolved addresses in force (buffer {buffer}, written and flipped in {:.1} ms)",
                                started.elapsed().as_secs_f64() * 1000.0
                            );
                        }
                    }
                    // The addresses already in force stay; tried again within a second.
                    Ok(Err(e)) => log::warn!("putting the resolved addresses in force: {e:#}"),
                    Err(e) => log::warn!("putting the resolved addresses in force: {e}"),
                }
            }
            t.log_stale();
            *status.lock().expect("lock") = t.status();
        }
    }
}

/// What `run` leaves behind: the counters printed once more (if stdout takes them within two
/// seconds), and the NICs protected (or, with --detach-on-exit, detached and the pins removed).
fn shut_down(args: &RunArgs, d: &mut Daemon, output: &Output) -> anyhow::Result<()> {
    let _ = d.refresh();
    if let Some(written) = table(d).and_then(|t| output.write("the final counter table", t))
        && written.recv_timeout(Duration::from_secs(2)).is_err()
    {
        log::warn!("stdout is not being read: the final counter table was not printed");
    }
    if args.detach_on_exit {
        let _lock = args.instance.lock()?;
        d.classifier.detach_all();
        args.instance.remove()?;
        log::info!(
            "detached and removed the pins of instance {}",
            args.instance.name
        );
    } else {
        log::info!(
            "exiting; instance {} stays attached (`edge-classifier stop --instance {}` detaches)",
            args.instance.name,
            args.instance.name
        );
    }
    Ok(())
}

/// The counter tables from one snapshot, the read `/metrics`, `stats` and `status` use, as
/// stdout takes them.
fn table(daemon: &mut Daemon) -> Option<String> {
    match daemon.snapshot() {
        Ok(s) => Some(edge_classifier::logging::stdout_text(
            &report::snapshot_table(&s, None),
        )),
        Err(e) => {
            log::warn!("reading counters: {e:#}");
            None
        }
    }
}
