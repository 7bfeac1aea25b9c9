//! Start (or adopt), reload and stop a pinned classifier instance. Every step that changes the
//! maps holds the instance lock and leaves the state file describing exactly what they hold.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::{
    catalogue::{
        Catalogue, DEFAULT_CATALOGUE, DEFAULT_NAME,
        dns::{Resolved, kept},
    },
    compile::{Compiled, compile_with},
    instance::{
        BoundIface, Instance, LAYOUT, Loaded, Lock, RELOAD_LOG, ReloadAttempt, Reloads, State,
    },
    loader::{AttachMode, Attached, Classifier, check_privileges},
    maps::{Holds, Maps},
    snapshot::unix_now,
};

/// Why a start, reload or stop did not happen. Each message says what to do; the ones that wrap
/// another error carry its text.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error(transparent)]
    Load(#[from] crate::loader::LoadError),
    #[error(transparent)]
    Instance(#[from] crate::instance::InstanceError),
    #[error(transparent)]
    Catalogue(#[from] crate::catalogue::CatalogueError),
    #[error(transparent)]
    Maps(#[from] crate::maps::MapsError),
    #[error("{what} catalogue {path}: {error}")]
    Read {
        what: &'static str,
        path: String,
        error: std::io::Error,
    },
    #[error("compiling {name}: {error}")]
    Compile {
        name: String,
        error: crate::compile::CompileError,
    },
    #[error("{name}: does not fit the data plane: {error}")]
    DoesNotFit {
        name: String,
        error: crate::compile::CompileError,
    },
    #[error("the instance's active rule buffer is unknown; restart it with `run`")]
    UnknownActive,
    #[error("the running catalogue no longer compiles: {0}")]
    RunningBroken(crate::instance::LoadedError),
    #[error(
        "{catalogue}: interface {iface} is bound to role `{role}`, which this catalogue does not declare under [interfaces]"
    )]
    RoleGone {
        catalogue: String,
        iface: String,
        role: String,
    },
    #[error("instance {0} is busy but names no process")]
    BusyNoPid(String),
    #[error("no classifier instance `{0}` is running: nothing to stop")]
    NothingToStop(String),
}

type Result<T> = std::result::Result<T, LifecycleError>;

/// A catalogue and the text it was parsed from (the state keeps the text), with the addresses
/// DNS gave its names.
pub struct Source {
    /// As parsed: its sets hold only the prefixes the text lists.
    pub catalogue: Catalogue,
    pub text: String,
    pub resolved: Resolved,
}

impl Source {
    /// Reads a catalogue file. The state records its absolute path, so a later `reload`
    /// without `--catalogue` finds it from any directory (a symlink stays a symlink: a
    /// configuration tool that repoints it is followed).
    pub fn read(path: &Path) -> Result<Source> {
        let path = std::path::absolute(path).map_err(|error| LifecycleError::Read {
            what: "resolving",
            path: path.display().to_string(),
            error,
        })?;
        let text = std::fs::read_to_string(&path).map_err(|error| LifecycleError::Read {
            what: "reading",
            path: path.display().to_string(),
            error,
        })?;
        let catalogue = Catalogue::parse(&path.display().to_string(), &text)?;
        Ok(Source {
            catalogue,
            text,
            resolved: Resolved::new(),
        })
    }

    pub fn default_catalogue() -> Source {
        Source {
            catalogue: Catalogue::default_catalogue(),
            text: DEFAULT_CATALOGUE.to_string(),
            resolved: Resolved::new(),
        }
    }

    fn from_loaded(l: &Loaded) -> Result<Source> {
        Ok(Source {
            catalogue: Catalogue::parse(&l.source, &l.text)?,
            text: l.text.clone(),
            resolved: l.resolved.clone(),
        })
    }

    /// Keeps the addresses `running` resolved for the names this catalogue still follows: a
    /// reload or a restart must not drop a partner's addresses until the next lookup.
    fn keep(mut self, running: Option<&Loaded>) -> Source {
        if let Some(l) = running {
            self.resolved = kept(&l.resolved, &self.catalogue.names);
        }
        self
    }

    /// What is compiled: the catalogue with the resolved addresses in its sets.
    pub fn merged(&self) -> Catalogue {
        self.catalogue.with_resolved(&self.resolved)
    }

    /// Compiled for a swap: rules keep the counter slots `active_old` gave them. `name` says
    /// what did not fit.
    fn compile_against(&self, active_old: &Compiled, name: &str) -> Result<Compiled> {
        compile_with(&self.merged(), &active_old.assignments).map_err(|error| {
            LifecycleError::DoesNotFit {
                name: name.to_string(),
                error,
            }
        })
    }

    fn loaded(&self, compiled: &Compiled) -> Loaded {
        Loaded::new(&self.catalogue, &self.text, compiled, self.resolved.clone())
    }
}

/// A running, pinned classifier as `run` holds it.
pub struct Started {
    pub classifier: Classifier,
    pub state: State,
    /// Held for the life of the process: one daemon per instance.
    pub claim: Lock,
    pub adopted: bool,
}

/// Starts instance `instance` on `ifaces`, or adopts it if an earlier run left it pinned: the
/// new programs replace the old ones in their links, maps (rules, counters, flows) are kept,
/// and `catalogue` (or, without one, the catalogue it was running) is swapped in.
///
/// A NIC the instance protected that `ifaces` leaves out stays protected (with a warning)
/// unless `detach_missing`: a restart with a shortened command line must not open a NIC.
pub fn start(
    instance: &Instance,
    catalogue: Option<&Path>,
    ifaces: &[(String, String)],
    mode: AttachMode,
    detach_missing: bool,
) -> Result<Started> {
    check_privileges()?;
    // What can be checked without touching the kernel is checked first: a typo in a NIC name
    // must not leave pins behind.
    for (name, _) in ifaces {
        crate::loader::ifindex(name)?;
    }
    if crate::maps::pinned_in(&instance.maps_dir()) {
        let _lock = instance.lock()?;
        repair_pins(instance)?;
    }
    let declared = match (
        catalogue,
        instance.read_state()?.as_ref().and_then(State::active),
    ) {
        (Some(path), _) => Source::read(path)?.catalogue,
        (None, Some(active)) => active.catalogue()?,
        (None, None) => Catalogue::default_catalogue(),
    };
    roles_declared(ifaces, declared.interfaces.keys())?;
    instance.prepare()?;
    let claim = instance.claim()?;
    let _lock = instance.lock()?;
    // The pins are the truth (`read_state` rebuilds from them when the file is missing or
    // wrong). Pins are never removed here: what an earlier run left stays as it is until this
    // start has replaced it, and a start that fails leaves it untouched.
    let pins_present = crate::maps::pinned_in(&instance.maps_dir());
    let mut prior = if pins_present {
        instance.read_state()?
    } else {
        None
    };
    if prior.is_none() && instance.read_state_file().ok().flatten().is_some() {
        log::warn!(
            "instance {}: a state file but no pinned maps (bpffs remounted?); starting afresh",
            instance.name
        );
    }
    if let Some(st) = &prior
        && st.active().is_none()
    {
        // The pins hold no complete, active catalogue (maps of a start that died before its
        // first buffer was recorded): nothing of them is worth adopting but their counters.
        log::warn!(
            "instance {}: its pinned maps record no complete catalogue; writing one afresh",
            instance.name
        );
        prior = None;
    }
    let source = match (catalogue, prior.as_ref().and_then(State::active)) {
        (Some(path), _) => Source::read(path)?,
        (None, Some(active)) => Source::from_loaded(active)?,
        (None, None) => Source::default_catalogue(),
    }
    .keep(prior.as_ref().and_then(State::active));
    let prev_assign = prior
        .as_ref()
        .and_then(State::active)
        .map(|l| l.assignments.clone())
        .unwrap_or_default();
    let compiled =
        compile_with(&source.merged(), &prev_assign).map_err(|error| LifecycleError::Compile {
            name: source.catalogue.source_name.clone(),
            error,
        })?;
    roles_declared(ifaces, compiled.roles.iter())?;
    let fresh = !pins_present;
    let result = bring_up(
        instance,
        prior,
        source,
        compiled,
        ifaces,
        mode,
        detach_missing,
    );
    if result.is_err() && fresh {
        // Nothing of a failed fresh start may stay pinned or attached: all its pins are its own.
        let _ = instance.remove();
    }
    let (classifier, state) = result?;
    Ok(Started {
        classifier,
        state,
        claim,
        adopted: !fresh,
    })
}

/// Pins an earlier run left, some of them lost (removed by hand, a clean-up gone wrong): the
/// missing maps are created and pinned afresh (loading the object does that; nothing is
/// attached), without touching the others. A lost `ACTIVE` word is pointed back at the buffer
/// the records say was active; a lost rule table empties what the records vouch for, so both
/// buffers are marked untrusted and rewritten by this start before anything reads them.
fn repair_pins(instance: &Instance) -> Result<()> {
    let missing = crate::maps::missing_pins(&instance.maps_dir());
    if missing.is_empty() {
        return Ok(());
    }
    log::warn!(
        "instance {}: pins of {} are missing; creating them afresh (the other pins are kept)",
        instance.name,
        missing.join(", ")
    );
    // Any catalogue will do to load the object: nothing is written or attached.
    let catalogue = Catalogue::default_catalogue();
    let compiled =
        compile_with(&catalogue, &Default::default()).map_err(|error| LifecycleError::Compile {
            name: catalogue.source_name.clone(),
            error,
        })?;
    drop(Classifier::load_pinned(compiled, instance)?);
    let mut maps = Maps::open_pinned(&instance.maps_dir())?;
    // Tables whose loss leaves nothing untrue behind: counters and flows start again, the
    // NICs' addresses are re-read by the daemon, the reply caches are per program anyway.
    const HARMLESS: &[&str] = &[
        "ACTIVE",
        "STATS",
        "FLOWS_V4",
        "FLOWS_V6",
        "FLOW_STATS",
        "TRACKED_PORTS",
        "IFACE_ADDRS_V4",
        "IFACE_ADDRS_V6",
        "INSTANCE_RECORD",
        // Token buckets start full again, admitted UDP flows are new once more: a burst's
        // worth of new flows more, nothing opened that a limit-free rule would not open.
        "BUCKETS",
        "ADMITTED",
        "LIMITED",
        "LIMIT_STATS",
        // An idle proxy: the next SYN over the budget goes to the listener, then it answers.
        "SYN_PROXY",
        "SYN_PROXIED",
    ];
    if missing.iter().any(|m| !HARMLESS.contains(m)) {
        maps.begin_buffer(0)?;
        maps.begin_buffer(1)?;
    } else {
        recover_active(&mut maps, missing.contains(&"ACTIVE"))?;
    }
    Ok(())
}

/// Every NIC's role is one the catalogue declares under `[interfaces]`.
fn roles_declared<'a>(
    ifaces: &[(String, String)],
    known: impl Iterator<Item = &'a String> + Clone,
) -> Result<()> {
    for (_, role) in ifaces {
        if !known.clone().any(|k| k == role) {
            return Err(crate::loader::LoadError::UnknownRole {
                role: role.clone(),
                known: known.cloned().collect::<Vec<_>>().join(", "),
            }
            .into());
        }
    }
    Ok(())
}

fn bring_up(
    instance: &Instance,
    prior: Option<State>,
    source: Source,
    compiled: Compiled,
    ifaces: &[(String, String)],
    mode: AttachMode,
    detach_missing: bool,
) -> Result<(Classifier, State)> {
    let mut classifier = Classifier::load_pinned(compiled.clone(), instance)?;
    let capacity = classifier.maps().flow_capacity()?;
    if capacity != compiled.flow_capacity {
        log::warn!(
            "the pinned flow table holds {capacity} flows; [flows] capacity = {} takes effect after `edge-classifier stop`",
            compiled.flow_capacity
        );
    }
    let loaded = source.loaded(&compiled);
    if prior.is_some() {
        recover_active(classifier.maps_mut(), false)?;
    }
    let mut state = match prior {
        Some(mut st) => {
            settle_interrupted(classifier.maps_mut(), &st)?;
            let running = st.active().cloned();
            if running.as_ref() != Some(&loaded) {
                let active_old = running.as_ref().and_then(|l| l.compile().ok()).map(|x| x.1);
                let reloads = st.reloads.succeeded + 1;
                swap_recorded(
                    instance,
                    &mut st,
                    classifier.maps_mut(),
                    &compiled,
                    loaded,
                    active_old.as_ref(),
                    reloads,
                )?;
                st.reloads.last = unix_now();
            }
            st
        }
        None => {
            let maps = classifier.maps_mut();
            let target = maps.active()?;
            // Maps this start created hold nothing; others (a start that died early) are
            // cleared first.
            let holds = if maps.record(target)?.state == 0 {
                Holds::Empty
            } else {
                Holds::Unknown
            };
            maps.prepare(target, &compiled, holds, None)?;
            maps.write_description(target, &description(&loaded), 0)?;
            maps.activate(target, &compiled)?;
            State {
                layout: LAYOUT,
                generation: classifier.maps().instance_record()?.generation,
                active: target,
                buffers: if target == 0 {
                    [Some(loaded), None]
                } else {
                    [None, Some(loaded)]
                },
                empty: [target != 0, target != 1],
                bindings: Vec::new(),
                reloads: Reloads {
                    last: unix_now(),
                    ..Reloads::default()
                },
                flow_capacity: capacity,
                reload_log: Vec::new(),
            }
        }
    };
    // NICs the instance protected that the command line leaves out: kept with the role and
    // mode they had, unless the operator asked to detach them.
    let mut wanted: Vec<(String, String, AttachMode)> = ifaces
        .iter()
        .map(|(n, r)| (n.clone(), r.clone(), mode))
        .collect();
    for gone in state
        .bindings
        .iter()
        .filter(|b| !ifaces.iter().any(|(n, _)| n == &b.name))
    {
        if let Some((new, _)) = ifaces
            .iter()
            .find(|(n, _)| crate::loader::ifindex(n).ok() == Some(gone.ifindex))
            && crate::loader::ifindex(&gone.name).is_err()
        {
            // Renamed: its links are adopted under the new name (the loader moves the pins).
            log::info!("{}: now named {new} (ifindex {})", gone.name, gone.ifindex);
        } else if detach_missing {
            log::warn!(
                "{}: protected by this instance as `{}` but not named by --iface; detaching it (--detach-missing)",
                gone.name,
                gone.role
            );
            classifier.forget_pinned(&gone.name);
            classifier.maps_mut().clear_iface(gone.ifindex)?;
        } else if crate::loader::ifindex(&gone.name).is_err() {
            log::warn!(
                "{}: protected by this instance as `{}`, not named by --iface, and no longer present; forgetting it",
                gone.name,
                gone.role
            );
            classifier.forget_pinned(&gone.name);
            classifier.maps_mut().clear_iface(gone.ifindex)?;
        } else if compiled.role_mask(&gone.role).is_none() {
            return Err(LifecycleError::RoleGone {
                catalogue: source.catalogue.source_name.clone(),
                iface: format!(
                    "{} (protected by this instance, not named by --iface: name it with --iface {}=ROLE or pass --detach-missing)",
                    gone.name, gone.name
                ),
                role: gone.role.clone(),
            });
        } else {
            log::warn!(
                "{}: protected by this instance as `{}` but not named by --iface; still protecting it (name it, or pass --detach-missing to detach it)",
                gone.name,
                gone.role
            );
            let kept_mode = match gone.mode.as_deref() {
                Some("native") => AttachMode::Native,
                Some("generic") => AttachMode::Generic,
                _ => mode,
            };
            wanted.push((gone.name.clone(), gone.role.clone(), kept_mode));
        }
    }
    for (name, role, mode) in &wanted {
        let before = state.bindings.iter().find(|b| &b.name == name);
        if let Some(b) = before
            && &b.role != role
        {
            log::warn!(
                "{name}: role changes from `{}` to `{role}`: the rules of `{role}` apply to it from now on",
                b.role
            );
        }
        match classifier.attach_keeping(name, role, *mode, before)? {
            Attached::Fresh(m) => log::info!("attached to {name} as {role} ({m} mode)"),
            Attached::Replaced => {
                log::info!(
                    "{name}: adopted the pinned attachment; the new program replaced the old one in place"
                );
                let kept = before.and_then(|b| b.mode.clone()).unwrap_or_default();
                let asked = match mode {
                    AttachMode::Native => Some("native"),
                    AttachMode::Generic => Some("generic"),
                    AttachMode::Auto => None,
                };
                if let Some(asked) = asked
                    && asked != kept
                {
                    log::warn!(
                        "{name}: --mode {asked} cannot be honoured on adoption: the pinned attachment stays in {kept} mode (run `edge-classifier stop` then `run --mode {asked}` to change it, which leaves a gap)"
                    );
                }
            }
        }
    }
    let nics: Vec<(&str, &str)> = wanted
        .iter()
        .map(|(n, r, _)| (n.as_str(), r.as_str()))
        .collect();
    crate::instance::guards::log_warnings(&source.merged(), &nics);
    state.bindings = record_bindings(&mut classifier)?;
    state.generation += 1;
    instance.write_state(&state)?;
    Ok((classifier, state))
}

/// The classifier's bindings as the state keeps them. The mode each NIC runs in goes into the
/// kernel's binding too: a start that has only the pins to go by adopts each NIC in the mode it
/// had.
pub fn record_bindings(c: &mut Classifier) -> Result<Vec<BoundIface>> {
    let bound: Vec<BoundIface> = c
        .bindings()
        .iter()
        .map(|b| BoundIface {
            name: b.name.clone(),
            ifindex: b.ifindex,
            role: b.role.clone(),
            block: b.block,
            mode: b.mode.map(|m| m.to_string()),
        })
        .collect();
    for b in &bound {
        let mode = match b.mode.as_deref() {
            Some("native") => edge_classifier_common::IFACE_MODE_NATIVE,
            Some("generic") => edge_classifier_common::IFACE_MODE_GENERIC,
            _ => edge_classifier_common::IFACE_MODE_UNKNOWN,
        };
        c.maps_mut().set_iface_mode(b.ifindex, mode)?;
    }
    Ok(bound)
}

/// What a reload did.
#[derive(Debug)]
pub struct Reloaded {
    pub source: String,
    /// SHA-256 of the catalogue text.
    pub digest: String,
    pub rules: usize,
    pub active: u32,
    pub elapsed: Duration,
}

/// Validates and compiles `catalogue` (without one: the file the instance runs from, read
/// again), writes it into the inactive buffer of the pinned maps and flips to it. Any error
/// leaves the running rules untouched; failures and successes are counted in the state.
pub fn reload(instance: &Instance, catalogue: Option<&Path>) -> Result<Reloaded> {
    check_privileges()?;
    let _lock = instance.lock()?;
    let mut state = instance.require_state()?;
    let started = Instant::now();
    let result = swap(instance, &mut state, catalogue);
    let mut attempt = ReloadAttempt {
        seq: state.reloads.succeeded + state.reloads.failed + 1,
        pid: std::process::id(),
        uid: unsafe { libc::getuid() },
        at: unix_now(),
        source: catalogue
            .map(|p| {
                std::path::absolute(p)
                    .unwrap_or_else(|_| p.to_path_buf())
                    .display()
                    .to_string()
            })
            .or_else(|| state.active().map(|l| l.source.clone()))
            .unwrap_or_default(),
        digest: None,
        rules: None,
        error: None,
    };
    match &result {
        Ok(s) => {
            state.reloads.succeeded += 1;
            state.reloads.last = unix_now();
            attempt.source = s.source.clone();
            attempt.digest = Some(s.digest.clone());
            attempt.rules = Some(s.rules);
        }
        Err(e) => {
            state.reloads.failed += 1;
            attempt.error = Some(format!("{e:#}"));
        }
    }
    state.reload_log.push(attempt);
    let excess = state.reload_log.len().saturating_sub(RELOAD_LOG);
    state.reload_log.drain(..excess);
    state.generation += 1;
    match (instance.write_state(&state), &result) {
        (Ok(()), _) => {}
        // The new rules are in force and recorded in the pinned maps: a state file that cannot
        // be written (a full /run) is rebuilt from them by the next reader.
        (Err(e), Ok(_)) => log::warn!(
            "the new catalogue is in force, but recording it outside the kernel failed ({e}); the state is rebuilt from the pinned maps"
        ),
        (Err(e), Err(_)) => log::warn!("recording the failed reload: {e}"),
    }
    let swapped = result?;
    for w in crate::loader::unprotected(instance, &state.bindings) {
        log::warn!("{w}");
    }
    Ok(Reloaded {
        source: swapped.source,
        digest: swapped.digest,
        rules: swapped.rules,
        active: swapped.active,
        elapsed: started.elapsed(),
    })
}

/// What `swap` put in force.
struct Swapped {
    source: String,
    digest: String,
    rules: usize,
    active: u32,
}

fn swap(instance: &Instance, state: &mut State, catalogue: Option<&Path>) -> Result<Swapped> {
    let running = state
        .active()
        .cloned()
        .ok_or(LifecycleError::UnknownActive)?;
    let source = match catalogue {
        Some(path) => Source::read(path)?,
        None if running.source == DEFAULT_NAME => Source::default_catalogue(),
        None => Source::read(&PathBuf::from(&running.source))?,
    }
    .keep(Some(&running));
    let (_, active_old) = running.compile().map_err(LifecycleError::RunningBroken)?;
    let compiled = source.compile_against(&active_old, &source.catalogue.source_name)?;
    for b in &state.bindings {
        if compiled.role_mask(&b.role).is_none() {
            return Err(LifecycleError::RoleGone {
                catalogue: source.catalogue.source_name.clone(),
                iface: b.name.clone(),
                role: b.role.clone(),
            });
        }
    }
    if compiled.flow_capacity != state.flow_capacity {
        log::warn!(
            "[flows] capacity {} differs from the running table's {}: it takes effect after `edge-classifier stop` and `run`",
            compiled.flow_capacity,
            state.flow_capacity
        );
    }
    let reloads = state.reloads.succeeded + 1;
    let (_, now) = write_and_flip(instance, state, &source, &compiled, &active_old, reloads)?;
    let bound: Vec<(&str, &str)> = state
        .bindings
        .iter()
        .map(|b| (b.name.as_str(), b.role.as_str()))
        .collect();
    crate::instance::guards::log_warnings(&source.merged(), &bound);
    Ok(Swapped {
        source: source.catalogue.source_name.clone(),
        digest: source.catalogue.digest.clone(),
        rules: compiled.rules.len(),
        active: now,
    })
}

/// `source` written into the inactive buffer of the pinned maps and flipped to (an interrupted
/// reload settled first), recorded with `reloads` as the reload count it brings: what a reload
/// and a DNS refresh share. Returns the maps and the buffer now active.
fn write_and_flip(
    instance: &Instance,
    state: &mut State,
    source: &Source,
    compiled: &Compiled,
    active_old: &Compiled,
    reloads: u64,
) -> Result<(Maps, u32)> {
    let mut maps = Maps::open_pinned(&instance.maps_dir())?;
    settle_interrupted(&mut maps, state)?;
    let now = swap_recorded(
        instance,
        state,
        &mut maps,
        compiled,
        source.loaded(compiled),
        Some(active_old),
        reloads,
    )?;
    Ok((maps, now))
}

/// Puts the addresses DNS gave the running catalogue's names in force: the same catalogue,
/// with `resolved` in its sets, written into the inactive buffer and flipped to, as a reload
/// does. The rules compile to the same slots, so counters continue; flows of outbound rules to
/// an address that left the rule's remote set are purged, as a removed rule's are. It is not
/// counted as a reload. `None` when the running buffer holds these addresses already.
pub fn apply_resolved(instance: &Instance, resolved: &Resolved) -> Result<Option<u32>> {
    let _lock = instance.lock()?;
    let mut state = instance.require_state()?;
    let running = state
        .active()
        .cloned()
        .ok_or(LifecycleError::UnknownActive)?;
    let mut source = Source::from_loaded(&running)?;
    source.resolved = kept(resolved, &source.catalogue.names);
    if source.resolved == running.resolved {
        return Ok(None);
    }
    let (_, active_old) = running.compile().map_err(LifecycleError::RunningBroken)?;
    let compiled = source.compile_against(
        &active_old,
        &format!(
            "{} with its resolved addresses",
            source.catalogue.source_name
        ),
    )?;
    // The rules are those of the running buffer: the reload count stays.
    let reloads = state.reloads.succeeded;
    let (mut maps, now) = write_and_flip(
        instance,
        &mut state,
        &source,
        &compiled,
        &active_old,
        reloads,
    )?;
    match maps.purge_flows_left(&compiled) {
        Ok(0) => {}
        Ok(n) => log::info!(
            "{n} flows to addresses that left their rule's remote set ended (purged, as a removed rule's)"
        ),
        Err(e) => log::warn!("purging the flows to addresses that left their sets: {e}"),
    }
    state.generation += 1;
    if let Err(e) = instance.write_state(&state) {
        log::warn!(
            "the resolved addresses are in force, but recording them outside the kernel failed ({e}); the state is rebuilt from the pinned maps"
        );
    }
    Ok(Some(now))
}

/// What a buffer's record says it holds: the `Loaded` as JSON.
fn description(loaded: &Loaded) -> Vec<u8> {
    serde_json::to_vec(loaded).expect("a Loaded serialises")
}

/// Swaps `new` into the inactive buffer and flips to it, the kernel's record true at every
/// step: the target buffer is recorded as being written before it is touched, what it holds is
/// recorded (with the reload count it brings) before the flip, and settled once the flows of
/// the rules it drops are purged. A writer killed at any instant leaves either the old buffer
/// active and the new one unrecorded, or the new one active and recorded; the next `reload`
/// or `run` settles it (`settle_interrupted`).
fn swap_recorded(
    _instance: &Instance,
    state: &mut State,
    maps: &mut Maps,
    new: &Compiled,
    loaded: Loaded,
    active_old: Option<&Compiled>,
    reloads: u64,
) -> Result<u32> {
    use edge_classifier_common::RECORD_COMPLETE;
    let target = 1 - maps.active()?;
    let record = maps.record(target)?;
    // What the buffer holds is known only when its record vouches for it.
    let known = if record.state >= RECORD_COMPLETE {
        state.holds(target)
    } else {
        None
    };
    let holds = match (&known, record.state) {
        (Some(c), _) => Holds::Compiled(c),
        (None, 0) => Holds::Empty,
        (None, _) => Holds::Unknown,
    };
    maps.prepare(target, new, holds, active_old)?;
    finish_swap(state, maps, target, new, loaded, reloads)
}

fn finish_swap(
    state: &mut State,
    maps: &mut Maps,
    target: u32,
    new: &Compiled,
    loaded: Loaded,
    reloads: u64,
) -> Result<u32> {
    state.buffers[target as usize] = None;
    state.empty[target as usize] = false;
    maps.write_description(target, &description(&loaded), reloads)?;
    // Up to here nothing the program reads has changed. The flip is one map write; after it
    // the reload has happened, whatever fails next.
    maps.set_active(target)?;
    if let Err(e) = maps.activate(target, new) {
        log::warn!(
            "the new catalogue is in force; purging the flows of removed rules failed ({e}): the next reload or run completes it"
        );
    }
    state.active = target;
    state.buffers[target as usize] = Some(loaded);
    Ok(target)
}

/// Completes a reload that was killed after its flip: the active buffer is recorded complete
/// but its purge never finished. Purging is idempotent, so it is simply done again.
fn settle_interrupted(maps: &mut Maps, state: &State) -> Result<()> {
    use edge_classifier_common::RECORD_COMPLETE;
    let active = maps.active()?;
    if maps.record(active)?.state == RECORD_COMPLETE {
        let (_, compiled) = state
            .active()
            .ok_or(LifecycleError::UnknownActive)?
            .compile()
            .map_err(LifecycleError::RunningBroken)?;
        log::warn!(
            "completing an interrupted reload: buffer {active} is active; purging the flows of the rules it dropped"
        );
        maps.activate(active, &compiled)?;
    }
    let other = maps.record(1 - active)?;
    if other.state >= RECORD_COMPLETE && other.reloads > maps.record(active)?.reloads {
        log::warn!(
            "a reload interrupted before its flip never took effect: buffer {} holds it, unused",
            1 - active
        );
    }
    Ok(())
}

/// Points `ACTIVE` at the buffer the records say was active (the settled one, else the newest
/// complete one) when it names one that holds no complete catalogue, or always when `lost`: an
/// `ACTIVE` created afresh after its pin was lost says buffer 0, whatever ran.
fn recover_active(maps: &mut Maps, lost: bool) -> Result<()> {
    use edge_classifier_common::{RECORD_COMPLETE, RECORD_SETTLED};
    let records = [maps.record(0)?, maps.record(1)?];
    let active = maps.active()?;
    if !lost && records[active as usize].state >= RECORD_COMPLETE {
        return Ok(());
    }
    let best = (0..2u32)
        .filter(|&b| records[b as usize].state >= RECORD_COMPLETE)
        .max_by_key(|&b| {
            let r = &records[b as usize];
            (r.state == RECORD_SETTLED, r.reloads)
        });
    if let Some(b) = best.filter(|&b| b != active || !lost) {
        if lost {
            log::warn!("the active-buffer word was created afresh; buffer {b} was the active one");
        } else {
            log::warn!(
                "the active-buffer word names buffer {active}, which holds no complete catalogue; buffer {b} was the active one"
            );
        }
        maps.set_active(b)?;
    }
    Ok(())
}

/// Stops instance `instance`: asks its daemon (if any) to exit, removes the link pins (which
/// detaches the programs), the map pins and the state.
pub fn stop(instance: &Instance) -> Result<Vec<String>> {
    check_privileges()?;
    // Read first: a daemon started with --detach-on-exit cleans up itself when signalled.
    let state = instance.read_state().ok().flatten();
    let pinned = instance.pin_dir().exists();
    let mut signalled = false;
    let claim = match instance.claim() {
        Ok(c) => c,
        Err(crate::instance::InstanceError::Busy { pid, .. }) => {
            let pid: i32 = pid
                .parse()
                .map_err(|_| LifecycleError::BusyNoPid(instance.name.clone()))?;
            unsafe { libc::kill(pid, libc::SIGTERM) };
            signalled = true;
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match instance.claim() {
                    Ok(c) => break c,
                    Err(_) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Err(e) => return Err(e.into()),
    };
    let _lock = instance.lock()?;
    if state.is_none() && !pinned && !signalled {
        drop(claim);
        instance.remove()?;
        return Err(LifecycleError::NothingToStop(instance.name.clone()));
    }
    let names = state
        .map(|s| s.bindings.into_iter().map(|b| b.name).collect())
        .unwrap_or_default();
    drop(claim);
    instance.remove()?;
    Ok(names)
}
