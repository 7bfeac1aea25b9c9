//! A classifier instance outlives the process that started it: its maps and links are pinned
//! under `/sys/fs/bpf/edge-classifier/NAME/`, and what the maps hold (the catalogue text of
//! each rule buffer, slots, bindings, reload counts) is kept in `/run/edge-classifier/NAME.json`.
//! Both vanish at reboot, together.

pub mod guards;
pub mod lifecycle;
pub mod status;

use std::{
    collections::BTreeMap,
    fs::File,
    io,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{
    catalogue::{Catalogue, CatalogueError, dns::Resolved},
    compile::{Assignments, CompileError, Compiled, compile_with},
};

pub const BPFFS: &str = "/sys/fs/bpf";
pub const PIN_ROOT: &str = "/sys/fs/bpf/edge-classifier";
pub const STATE_ROOT: &str = "/run/edge-classifier";
pub const DEFAULT_INSTANCE: &str = "default";
/// Bumped whenever map layouts change: pins of another layout are not adopted.
pub const LAYOUT: u32 = 7;

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error("instance name `{0}`: expected letters, digits, `-` or `_`")]
    BadName(String),
    #[error(
        "no classifier instance `{0}` is running (no state in {STATE_ROOT}): start one with `edge-classifier run`"
    )]
    NotRunning(String),
    #[error(
        "instance `{name}` was pinned by an incompatible version (layout {found}, this one uses {LAYOUT}): run `edge-classifier stop --instance {name}` first"
    )]
    Layout { name: String, found: u32 },
    #[error("instance `{name}` is already served by process {pid}; stop it first")]
    Busy { name: String, pid: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path}: unreadable state ({source}); `edge-classifier stop --instance NAME` clears it"
    )]
    State {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("mounting bpffs on {BPFFS}: {0}")]
    Mount(io::Error),
    #[error("instance {name}: reading its pinned maps: {source}")]
    Pins {
        name: String,
        #[source]
        source: crate::maps::MapsError,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> InstanceError + '_ {
    move |source| InstanceError::Io {
        path: path.display().to_string(),
        source,
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
/// Reloads of an instance, as its state keeps them.
pub struct Reloads {
    pub succeeded: u64,
    pub failed: u64,
    /// When the running rules were loaded (start or last successful reload), Unix seconds.
    pub last: f64,
}

/// Why a rule buffer's recorded catalogue cannot be compiled again (another version's syntax, or
/// limits that changed).
#[derive(Debug, thiserror::Error)]
pub enum LoadedError {
    #[error(transparent)]
    Catalogue(#[from] CatalogueError),
    #[error(transparent)]
    Compile(#[from] CompileError),
}

/// What one rule buffer holds: enough to compile it again, bit for bit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Loaded {
    pub source: String,
    pub text: String,
    pub assignments: Assignments,
    /// The addresses DNS gave the catalogue's names when this buffer was written: part of what
    /// the buffer holds, so recorded with it (a reload and a restart keep them, `status` and
    /// `explain` say which name each came from).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub resolved: Resolved,
}

impl Loaded {
    /// `cat` as parsed from `text` (without resolved addresses), with `resolved` merged.
    pub fn new(cat: &Catalogue, text: &str, compiled: &Compiled, resolved: Resolved) -> Loaded {
        Loaded {
            source: cat.source_name.clone(),
            text: text.to_string(),
            assignments: compiled.assignments.clone(),
            resolved,
        }
    }

    /// The catalogue with the resolved addresses merged into its sets.
    pub fn catalogue(&self) -> Result<Catalogue, CatalogueError> {
        Ok(Catalogue::parse(&self.source, &self.text)?.with_resolved(&self.resolved))
    }

    pub fn compile(&self) -> Result<(Catalogue, Compiled), LoadedError> {
        let cat = self.catalogue()?;
        let compiled = compile_with(&cat, &self.assignments)?;
        Ok((cat, compiled))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BoundIface {
    pub name: String,
    pub ifindex: u32,
    pub role: String,
    pub block: u32,
    pub mode: Option<String>,
}

/// What the pinned maps hold, kept beside them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub layout: u32,
    /// Bumped by every change, so a daemon sees a reload another process made.
    pub generation: u64,
    pub active: u32,
    /// By buffer. `None`: empty (see `empty`), or left half-written by an interrupted reload.
    pub buffers: [Option<Loaded>; 2],
    /// By buffer: never written since the maps were created.
    #[serde(default)]
    pub empty: [bool; 2],
    pub bindings: Vec<BoundIface>,
    pub reloads: Reloads,
    pub flow_capacity: u32,
    /// The latest reloads (at most `RELOAD_LOG` of them, oldest first), so the daemon can log
    /// each one, who made it and what came of it, even when several come between two looks.
    #[serde(default)]
    pub reload_log: Vec<ReloadAttempt>,
}

/// How many reloads the state remembers for the daemon's log.
pub const RELOAD_LOG: usize = 16;

/// One `reload` as the daemon logs it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReloadAttempt {
    /// Its number among the instance's reloads (succeeded + failed, this one included).
    pub seq: u64,
    /// The reloading process and its user.
    pub pid: u32,
    pub uid: u32,
    /// Unix seconds.
    pub at: f64,
    /// The catalogue it read (absolute path, or the embedded default's name).
    pub source: String,
    /// SHA-256 of the catalogue text and its rule count, when it parsed.
    pub digest: Option<String>,
    pub rules: Option<usize>,
    /// Why it failed; `None` when the new rules are in force.
    pub error: Option<String>,
}

impl State {
    /// Whether this state (the file) says what `kernel` (rebuilt from the pins) says: same
    /// generation, active buffer, buffer contents, bindings and counts.
    fn agrees_with(&self, kernel: &State) -> bool {
        self.generation == kernel.generation
            && self.active == kernel.active
            && self.buffers == kernel.buffers
            && self.reloads.succeeded == kernel.reloads.succeeded
            && self.reloads.failed == kernel.reloads.failed
            && {
                let key = |s: &State| {
                    let mut v: Vec<(u32, String, u32)> = s
                        .bindings
                        .iter()
                        .map(|b| (b.ifindex, b.role.clone(), b.block))
                        .collect();
                    v.sort();
                    v
                };
                key(self) == key(kernel)
            }
    }

    pub fn active(&self) -> Option<&Loaded> {
        self.buffers[self.active as usize & 1].as_ref()
    }

    /// What `buffer` holds, compiled again for diffing.
    pub fn holds(&self, buffer: u32) -> Option<Compiled> {
        self.buffers[buffer as usize & 1]
            .as_ref()
            .and_then(|l| l.compile().ok())
            .map(|x| x.1)
    }
}

/// Paths of one instance.
#[derive(Debug, Clone)]
pub struct Instance {
    pub name: String,
}

impl Instance {
    pub fn new(name: &str) -> Result<Instance, InstanceError> {
        let ok = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !ok {
            return Err(InstanceError::BadName(name.to_string()));
        }
        Ok(Instance {
            name: name.to_string(),
        })
    }

    pub fn pin_dir(&self) -> PathBuf {
        Path::new(PIN_ROOT).join(&self.name)
    }
    pub fn maps_dir(&self) -> PathBuf {
        self.pin_dir().join("maps")
    }
    pub fn map_pin(&self, map: &str) -> PathBuf {
        self.maps_dir().join(map)
    }
    pub fn links_dir(&self) -> PathBuf {
        self.pin_dir().join("links")
    }
    /// `xdp` or `tc` link of an interface. bpffs reserves names with a dot, which interface
    /// names may have (`eth0.100`); `:` never occurs in one, so it stands in.
    pub fn link_pin(&self, iface: &str, kind: &str) -> PathBuf {
        self.links_dir()
            .join(format!("{}-{kind}", iface.replace('.', ":")))
    }
    pub fn state_file(&self) -> PathBuf {
        Path::new(STATE_ROOT).join(format!("{}.json", self.name))
    }
    fn lock_file(&self) -> PathBuf {
        Path::new(STATE_ROOT).join(format!("{}.lock", self.name))
    }
    /// Held (flock) by the monitor that has slot `slot` (`monitor`), for as long as it runs.
    pub fn monitor_lock(&self, slot: u32) -> PathBuf {
        Path::new(STATE_ROOT).join(format!("{}.monitor-{slot}.lock", self.name))
    }
    fn pid_file(&self) -> PathBuf {
        Path::new(STATE_ROOT).join(format!("{}.pid", self.name))
    }

    /// Mounts bpffs if needed and creates the pin and state directories.
    pub fn prepare(&self) -> Result<(), InstanceError> {
        ensure_bpffs()?;
        for dir in [self.maps_dir(), self.links_dir(), PathBuf::from(STATE_ROOT)] {
            std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        }
        Ok(())
    }

    /// The instance's state. The kernel is the source of truth: what each rule buffer holds,
    /// which one is active, the bound NICs and the reload counts are recorded in the pinned
    /// maps themselves. The state file is a cache of them: used when it agrees with the pins,
    /// rebuilt from them when it is missing, truncated, garbage or stale (a writer killed
    /// between the kernel and the file). `Ok(None)`: no such instance.
    pub fn read_state(&self) -> Result<Option<State>, InstanceError> {
        let file = self.read_state_file();
        if !crate::maps::pinned_in(&self.maps_dir()) {
            // No pins (bpffs remounted, or never started): the file alone, if it reads.
            return file;
        }
        let cached = match &file {
            Ok(f) => f.as_ref(),
            Err(InstanceError::Layout { .. }) => return file,
            Err(e) => {
                log::warn!("{e}; rebuilding the state from the pinned maps");
                None
            }
        };
        let maps = crate::maps::Maps::open_pinned(&self.maps_dir()).map_err(|source| {
            InstanceError::Pins {
                name: self.name.clone(),
                source,
            }
        })?;
        let kernel = self.state_from_pins(&maps, cached)?;
        match cached {
            Some(f) if f.agrees_with(&kernel) => Ok(Some(f.clone())),
            Some(_) => {
                // A writer at work (it holds the lock) updates the kernel first and the file
                // last: that is expected. One that died between them is worth a warning.
                if !self.writer_active() {
                    log::warn!(
                        "{}: the state file disagrees with the pinned maps (a writer stopped between them); using the maps",
                        self.state_file().display()
                    );
                }
                Ok(Some(kernel))
            }
            None => Ok(Some(kernel)),
        }
    }

    /// The state file as written, without looking at the pins.
    pub fn read_state_file(&self) -> Result<Option<State>, InstanceError> {
        let path = self.state_file();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let state: State = serde_json::from_str(&text).map_err(|source| InstanceError::State {
            path: path.display().to_string(),
            source,
        })?;
        if state.layout != LAYOUT {
            return Err(InstanceError::Layout {
                name: self.name.clone(),
                found: state.layout,
            });
        }
        Ok(Some(state))
    }

    /// The state as the pinned maps record it. `cached` (the file, when it reads) only lends
    /// what the kernel does not keep: the reload log, and the names of NICs that are gone.
    pub fn state_from_pins(
        &self,
        maps: &crate::maps::Maps,
        cached: Option<&State>,
    ) -> Result<State, InstanceError> {
        use edge_classifier_common::{IFACE_MODE_GENERIC, IFACE_MODE_NATIVE};
        let pins = |source| InstanceError::Pins {
            name: self.name.clone(),
            source,
        };
        let active = maps.active().map_err(pins)?;
        let mut buffers: [Option<Loaded>; 2] = [None, None];
        let mut empty = [false; 2];
        for b in 0..2u32 {
            let record = maps.record(b).map_err(pins)?;
            empty[b as usize] = record.state == 0;
            buffers[b as usize] = maps
                .read_description(b)
                .map_err(pins)?
                .and_then(|d| serde_json::from_slice::<Loaded>(&d).ok());
        }
        let inst = maps.instance_record().map_err(pins)?;
        let record = maps.record(active).map_err(pins)?;
        let roles: Vec<(String, u32)> = buffers[active as usize]
            .as_ref()
            .map(|l| {
                l.assignments
                    .roles
                    .iter()
                    .map(|(name, bit)| (name.clone(), 1u32 << bit))
                    .collect()
            })
            .unwrap_or_default();
        let mut bindings = Vec::new();
        for info in maps.ifaces().map_err(pins)? {
            let name = crate::nic_addrs::ifname(info.ifindex)
                .or_else(|| {
                    cached?
                        .bindings
                        .iter()
                        .find(|b| b.ifindex == info.ifindex)
                        .map(|b| b.name.clone())
                })
                .unwrap_or_else(|| format!("ifindex{}", info.ifindex));
            let Some((role, _)) = roles.iter().find(|(_, m)| *m == info.role_mask) else {
                continue;
            };
            bindings.push(BoundIface {
                name,
                ifindex: info.ifindex,
                role: role.clone(),
                block: info.block,
                mode: match info.mode {
                    IFACE_MODE_NATIVE => Some("native".to_string()),
                    IFACE_MODE_GENERIC => Some("generic".to_string()),
                    _ => None,
                },
            });
        }
        bindings.sort_by_key(|b| b.block);
        Ok(State {
            layout: LAYOUT,
            generation: inst.generation,
            active,
            buffers,
            empty,
            bindings,
            reloads: Reloads {
                succeeded: inst.reloads_succeeded.max(record.reloads),
                failed: inst.reloads_failed,
                last: record.loaded_at_ms as f64 / 1000.0,
            },
            flow_capacity: maps.flow_capacity().map_err(pins)?,
            reload_log: cached.map(|c| c.reload_log.clone()).unwrap_or_default(),
        })
    }

    pub fn require_state(&self) -> Result<State, InstanceError> {
        self.read_state()?
            .ok_or_else(|| InstanceError::NotRunning(self.name.clone()))
    }

    /// Records `state`: the counters the kernel keeps first (the pinned maps hold everything
    /// else already), then the file, replaced atomically (write, fsync, rename).
    pub fn write_state(&self, state: &State) -> Result<(), InstanceError> {
        if crate::maps::pinned_in(&self.maps_dir()) {
            let pins = |source| InstanceError::Pins {
                name: self.name.clone(),
                source,
            };
            let mut maps = crate::maps::Maps::open_pinned(&self.maps_dir()).map_err(pins)?;
            maps.set_instance_record(edge_classifier_common::InstanceRecord {
                reloads_succeeded: state.reloads.succeeded,
                reloads_failed: state.reloads.failed,
                generation: state.generation,
            })
            .map_err(pins)?;
        }
        let path = self.state_file();
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(state).expect("state serialises");
        {
            use std::io::Write as _;
            let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
            f.write_all(text.as_bytes()).map_err(io_err(&tmp))?;
            f.sync_all().map_err(io_err(&tmp))?;
        }
        std::fs::rename(&tmp, &path).map_err(io_err(&path))
    }

    /// Serialises writers of the pinned maps and the state (run start-up, reload, stop).
    pub fn lock(&self) -> Result<Lock, InstanceError> {
        std::fs::create_dir_all(STATE_ROOT).map_err(io_err(Path::new(STATE_ROOT)))?;
        let path = self.lock_file();
        let f = File::create(&path).map_err(io_err(&path))?;
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io_err(&path)(io::Error::last_os_error()));
        }
        Ok(Lock(f))
    }

    /// Whether a writer (run start-up, reload, stop) holds the lock right now.
    fn writer_active(&self) -> bool {
        let Ok(f) = File::open(self.lock_file()) else {
            return false;
        };
        let free = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } == 0;
        !free
    }

    /// Held by the process that serves the instance for as long as it runs.
    pub fn claim(&self) -> Result<Lock, InstanceError> {
        std::fs::create_dir_all(STATE_ROOT).map_err(io_err(Path::new(STATE_ROOT)))?;
        let path = self.pid_file();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err(&path))?;
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let pid = std::fs::read_to_string(&path).unwrap_or_default();
            return Err(InstanceError::Busy {
                name: self.name.clone(),
                pid: pid.trim().to_string(),
            });
        }
        f.set_len(0).map_err(io_err(&path))?;
        std::fs::write(&path, std::process::id().to_string()).map_err(io_err(&path))?;
        Ok(Lock(f))
    }

    /// The process serving the instance, as its pid file says, and whether it still runs (it
    /// holds the file's lock for as long as it does; a pid alone could be reused).
    pub fn daemon(&self) -> Option<(u32, bool)> {
        let path = self.pid_file();
        let f = File::open(&path).ok()?;
        let pid = std::fs::read_to_string(&path).ok()?.trim().parse().ok()?;
        let free = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } == 0;
        Some((pid, !free))
    }

    /// Removes the pins and the state. Links whose last reference was the pin detach.
    pub fn remove(&self) -> Result<(), InstanceError> {
        let dir = self.pin_dir();
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
        }
        let monitor_locks =
            (0..edge_classifier_common::monitor::MONITOR_SLOTS).map(|slot| self.monitor_lock(slot));
        for f in [self.state_file(), self.pid_file(), self.lock_file()]
            .into_iter()
            .chain(monitor_locks)
        {
            match std::fs::remove_file(&f) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&f)(e)),
            }
        }
        Ok(())
    }
}

/// An flock held until dropped.
pub struct Lock(#[allow(dead_code)] File);

fn ensure_bpffs() -> Result<(), InstanceError> {
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    let c = std::ffi::CString::new(BPFFS).expect("no NUL");
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0 && st.f_type as i64 == BPF_FS_MAGIC {
        return Ok(());
    }
    let fstype = std::ffi::CString::new("bpf").expect("no NUL");
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            c.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(InstanceError::Mount(io::Error::last_os_error()));
    }
    Ok(())
}
