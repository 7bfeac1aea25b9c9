//! Loads the embedded eBPF object (XDP ingress classifier and TC egress flow recorder), fills its
//! maps from a compiled catalogue, binds NICs to roles and attaches.

use std::{
    ffi::CString,
    fmt, io,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

pub use aya::programs::XdpMode;
use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{MapError, ProgramArray},
    programs::{
        ProgramError, SchedClassifier, TcAttachType, Xdp,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, SchedClassifierLinkId},
        xdp::{XdpLink, XdpLinkId},
    },
};
use edge_classifier_common::{IFACE_SLOTS, IfaceInfo, MAX_IFACES};

use crate::maps::IfaceStats;
use crate::{
    compile::Compiled,
    instance::{BoundIface, Instance},
    maps::{MAP_NAMES, MONITOR_RINGS, Maps, MapsError},
};

/// The XDP program, as built by build.rs from `edge-classifier-ebpf`.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/edge-classifier"));
pub const PROGRAM_NAME: &str = "edge_classifier";
/// The TC egress program that records outbound flows.
pub const EGRESS_PROGRAM_NAME: &str = "edge_egress";
/// The copies of both that also write monitor events, tail-called for a monitored NIC's frames.
pub const MONITORED_PROGRAM_NAME: &str = "edge_classifier_monitored";
pub const MONITORED_EGRESS_PROGRAM_NAME: &str = "edge_egress_monitored";
/// The program arrays the entry points tail-call them through.
pub const MONITOR_PROGRAM_ARRAYS: [&str; 2] = ["MONITOR_XDP", "MONITOR_TC"];
/// An empty XDP_PASS program (`xdp_pass`): the floor benchmarks measure against.
pub static FLOOR_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdp-pass"));
/// `syncookie_probe`: the SYN cookie `bpf_tcp_raw_gen_syncookie_ipv4` makes for a SYN, for the
/// test of whether the kernel's listener completes cookies made at XDP (`tests/syncookies.rs`).
pub static SYNCOOKIE_PROBE_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/syncookie-probe"));

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "permission denied: loading XDP programs needs root, or CAP_BPF + CAP_NET_ADMIN + CAP_PERFMON (the verifier refuses the program's pointer arithmetic without CAP_PERFMON); run as root or grant all three (this process has {0})"
    )]
    NotPrivileged(String),
    #[error("no network interface named `{0}`: check the name with `ip link show`")]
    UnknownInterface(String),
    #[error(
        "the kernel verifier rejected the {program} program ({io_error}); verifier log:\n{log}"
    )]
    Verifier {
        program: &'static str,
        io_error: io::Error,
        log: String,
    },
    #[error("interface role `{role}` is not in the catalogue: expected one of {known}")]
    UnknownRole { role: String, known: String },
    #[error("at most {} interfaces can be bound", MAX_IFACES - 1)]
    TooManyInterfaces,
    #[error(
        "interface `{name}` (ifindex {ifindex}) shares a lookup slot with `{other}`; rename or recreate one of them"
    )]
    SlotCollision {
        name: String,
        ifindex: u32,
        other: String,
    },
    #[error("attaching the TC egress flow recorder to `{iface}` failed: {detail}")]
    AttachEgress {
        iface: String,
        /// The error with its causes (the errno last).
        detail: String,
    },
    #[error("attaching XDP to `{iface}` in {mode} mode failed: {detail}")]
    Attach {
        iface: String,
        mode: ModeName,
        /// The error with its causes (the errno last).
        detail: String,
    },
    #[error("{0}")]
    XdpTaken(Box<XdpTaken>),
    #[error("loading the eBPF object failed: {0}")]
    Ebpf(#[from] EbpfError),
    #[error("eBPF program: {0}")]
    Program(#[source] ProgramError),
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error("pinning {what} at {path}: {message}")]
    Pin {
        what: String,
        path: String,
        message: String,
    },
}

/// Another XDP program holds the NIC: which, and how an operator removes it.
#[derive(Debug)]
pub struct XdpTaken {
    pub iface: String,
    pub program: u32,
    /// The program's name as the kernel keeps it (at most 15 characters); `None` when it
    /// cannot be read (looking a program up by id needs CAP_SYS_ADMIN).
    pub name: Option<String>,
    pub mode: &'static str,
    /// The BPF link holding it, if it was attached through one (rather than rtnetlink).
    pub link: Option<u32>,
    /// What the kernel said to our attach.
    pub errno: String,
    /// The pin of that link, when it is an edge-classifier instance's.
    pub pin: Option<PathBuf>,
    /// Whether the kernel's links could be listed (CAP_SYS_ADMIN): if so, `link: None` means
    /// the program was attached through rtnetlink.
    pub links_listed: bool,
}

impl fmt::Display for XdpTaken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` already runs another XDP program: id {} {}({} mode{}), so the classifier cannot attach ({}). {}",
            self.iface,
            self.program,
            self.name
                .as_ref()
                .map_or(String::new(), |n| format!("`{n}` ")),
            self.mode,
            self.link
                .map_or(String::new(), |l| format!(", held by BPF link {l}")),
            self.errno,
            remedy(
                &self.iface,
                self.link,
                self.pin.as_deref(),
                self.links_listed
            )
        )
    }
}

/// How an operator removes the XDP program that holds `iface`.
fn remedy(iface: &str, link: Option<u32>, pin: Option<&Path>, links_listed: bool) -> String {
    // An instance's pin: /sys/fs/bpf/edge-classifier/INSTANCE/links/NIC-xdp.
    let instance = pin
        .and_then(|p| p.parent()?.parent()?.file_name())
        .map(|i| i.to_string_lossy().into_owned());
    match (link, instance) {
        (Some(_), Some(i)) => format!(
            "It is edge-classifier instance `{i}`'s ({}): `edge-classifier stop --instance {i}` detaches it, then start again; or run that instance instead.",
            pin.expect("an instance has a pin").display()
        ),
        (None, _) if links_listed => format!(
            "Remove it with `ip link set dev {iface} xdp off` (or `bpftool net detach xdp dev {iface}`), then start again."
        ),
        (None, _) => format!(
            "Remove it with `ip link set dev {iface} xdp off` (or `bpftool net detach xdp dev {iface}`), then start again; if that says a BPF link holds it, `bpftool link show` names the link (`bpftool link detach id N` detaches it)."
        ),
        (Some(l), None) => format!(
            "A BPF link holds it (pinned on a bpffs, or kept open by a running process): `bpftool link show id {l}` names it; remove its pin or stop its owner (`bpftool link detach id {l}` detaches it), then start again."
        ),
    }
}

/// An error and its causes on one line: aya keeps the errno in the source of its errors.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !message.ends_with(&text) {
            message.push_str(&format!(": {text}"));
        }
        source = s.source();
    }
    message
}

/// Display name of an XDP mode as operators say it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModeName(pub XdpMode);

impl fmt::Display for ModeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.0 {
            XdpMode::Driver => "native",
            XdpMode::Skb => "generic",
            XdpMode::Hardware => "offload",
            XdpMode::Default => "default",
        })
    }
}

/// How to attach: native with a fallback to generic, or exactly one mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    Auto,
    Native,
    Generic,
}

#[derive(Debug, Clone)]
pub struct Binding {
    pub name: String,
    pub ifindex: u32,
    pub role: String,
    /// Counter block.
    pub block: u32,
    /// The mode the program runs in on this NIC, once attached.
    pub mode: Option<ModeName>,
}

pub struct Classifier {
    ebpf: Ebpf,
    maps: Maps,
    compiled: Compiled,
    bindings: Vec<Binding>,
    /// Links the programs own, by NIC name.
    links: Vec<(String, XdpLinkId)>,
    egress_links: Vec<(String, SchedClassifierLinkId)>,
    /// Set when maps and links are pinned: they then outlive this process.
    instance: Option<Instance>,
    /// By pin path.
    pinned_links: Vec<(PathBuf, PinnedLink)>,
    /// The XDP mode of bound NICs marked detached while their name is gone (a NIC renamed
    /// away and back keeps its attachment).
    parked: Vec<(String, ModeName)>,
}

/// How the program reached an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attached {
    /// Newly attached.
    Fresh(ModeName),
    /// Already attached (pinned link): the new program replaced the old one atomically.
    Replaced,
}

/// Effective capabilities, from /proc/self/status.
fn effective_caps() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
    u64::from_str_radix(line.trim_start_matches("CapEff:").trim(), 16).ok()
}

/// Fails early, with what to do, when the process cannot load BPF or attach XDP.
pub fn check_privileges() -> Result<(), LoadError> {
    const CAP_NET_ADMIN: u64 = 1 << 12;
    const CAP_SYS_ADMIN: u64 = 1 << 21;
    const CAP_PERFMON: u64 = 1 << 38;
    const CAP_BPF: u64 = 1 << 39;
    let Some(caps) = effective_caps() else {
        return Ok(());
    };
    // CAP_SYS_ADMIN stands in for CAP_BPF and CAP_PERFMON, as the kernel's bpf_capable() and
    // perfmon_capable() allow.
    let missing: Vec<&str> = [
        (CAP_BPF | CAP_SYS_ADMIN, "CAP_BPF"),
        (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
        (CAP_PERFMON | CAP_SYS_ADMIN, "CAP_PERFMON"),
    ]
    .into_iter()
    .filter(|(mask, _)| caps & mask == 0)
    .map(|(_, name)| name)
    .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(LoadError::NotPrivileged(format!(
        "uid {} without {}",
        unsafe { libc::geteuid() },
        missing.join(" and ")
    )))
}

pub fn ifindex(name: &str) -> Result<u32, LoadError> {
    let c = CString::new(name).map_err(|_| LoadError::UnknownInterface(name.to_string()))?;
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(LoadError::UnknownInterface(name.to_string())),
        i => Ok(i),
    }
}

fn is_eperm(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES))
}

impl Classifier {
    /// Loads the programs and writes `compiled` into buffer 0. Nothing is attached or pinned.
    pub fn load(compiled: Compiled) -> Result<Self, LoadError> {
        let mut c = Self::load_object(compiled, None)?;
        let compiled = c.compiled.clone();
        c.maps
            .write_buffer(0, &compiled, crate::maps::Holds::Empty)?;
        c.maps.set_active(0)?;
        Ok(c)
    }

    /// Loads the programs with every map pinned under the instance's directory: maps pinned by
    /// an earlier run are reused as they are (rules, counters, flows). The caller decides what
    /// to write into them.
    pub fn load_pinned(compiled: Compiled, instance: &Instance) -> Result<Self, LoadError> {
        Self::load_object(compiled, Some(instance))
    }

    fn load_object(compiled: Compiled, instance: Option<&Instance>) -> Result<Self, LoadError> {
        check_privileges()?;
        let mut loader = EbpfLoader::new();
        for table in crate::maps::FLOW_TABLES {
            loader.map_max_entries(table, compiled.flow_capacity);
        }
        // The monitor rings are pinned too, so that `monitor` finds them without the daemon,
        // and the program arrays, whose entries the kernel clears when no file holds them.
        let pins: Vec<(&str, std::path::PathBuf)> = instance
            .map(|i| {
                MAP_NAMES
                    .iter()
                    .chain(MONITOR_RINGS.iter())
                    .chain(MONITOR_PROGRAM_ARRAYS.iter())
                    .map(|n| (*n, i.map_pin(n)))
                    .collect()
            })
            .unwrap_or_default();
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = match loader.load(EBPF_OBJECT) {
            Ok(e) => e,
            Err(EbpfError::MapError(MapError::CreateError { io_error, .. }))
                if is_eperm(&io_error) =>
            {
                return Err(LoadError::NotPrivileged(format!(
                    "map creation refused: {io_error}"
                )));
            }
            Err(e) => return Err(e.into()),
        };
        let xdp: &mut Xdp = ebpf
            .program_mut(PROGRAM_NAME)
            .expect("the object has the XDP program")
            .try_into()
            .map_err(LoadError::Program)?;
        verified("XDP", xdp.load())?;
        let egress: &mut SchedClassifier = ebpf
            .program_mut(EGRESS_PROGRAM_NAME)
            .expect("the object has the egress program")
            .try_into()
            .map_err(LoadError::Program)?;
        verified("TC egress", egress.load())?;
        fill_monitor_programs(&mut ebpf)?;
        let maps = Maps::take(&mut ebpf)?;
        Ok(Self {
            ebpf,
            maps,
            compiled,
            bindings: Vec::new(),
            links: Vec::new(),
            egress_links: Vec::new(),
            instance: instance.cloned(),
            pinned_links: Vec::new(),
            parked: Vec::new(),
        })
    }

    pub fn maps(&self) -> &Maps {
        &self.maps
    }

    pub fn maps_mut(&mut self) -> &mut Maps {
        &mut self.maps
    }

    /// The ring buffer of monitor slot `slot` (the bench reads it to time delivered events).
    pub fn monitor_ring(
        &mut self,
        slot: u32,
    ) -> Result<aya::maps::RingBuf<&mut aya::maps::MapData>, MapsError> {
        let name = MONITOR_RINGS[slot as usize];
        let map = self
            .ebpf
            .map_mut(name)
            .expect("the object has the monitor rings");
        aya::maps::RingBuf::try_from(map).map_err(|source| MapsError { map: name, source })
    }

    /// Replaces what the exporter and `bind` consider the running rules (after a reload that
    /// another process made, or one this process made through [`Maps::swap_in`]).
    pub fn set_compiled(&mut self, compiled: Compiled) {
        self.compiled = compiled;
    }

    pub fn compiled(&self) -> &Compiled {
        &self.compiled
    }

    pub fn bindings(&self) -> &[Binding] {
        &self.bindings
    }

    pub fn program(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(PROGRAM_NAME)
            .expect("loaded")
            .try_into()
            .expect("XDP program")
    }

    /// The TC egress program (for BPF_PROG_TEST_RUN).
    pub fn egress_program(&mut self) -> &mut SchedClassifier {
        self.ebpf
            .program_mut(EGRESS_PROGRAM_NAME)
            .expect("loaded")
            .try_into()
            .expect("TC program")
    }

    /// Tells the programs that frames on `name` are on a NIC of `role`.
    pub fn bind(&mut self, name: &str, role: &str) -> Result<&Binding, LoadError> {
        self.bind_block(name, role, None)
    }

    /// `bind`, keeping counter block `block` when it is free (an adopted interface keeps its
    /// counters).
    pub fn bind_block(
        &mut self,
        name: &str,
        role: &str,
        block: Option<u32>,
    ) -> Result<&Binding, LoadError> {
        let role_mask = self
            .compiled
            .role_mask(role)
            .ok_or_else(|| LoadError::UnknownRole {
                role: role.to_string(),
                known: self.compiled.roles.join(", "),
            })?;
        let ifindex = ifindex(name)?;
        if let Some(i) = self.bindings.iter().position(|b| b.ifindex == ifindex) {
            self.bindings.remove(i);
        } else if let Some(other) = self
            .bindings
            .iter()
            .find(|b| b.ifindex % IFACE_SLOTS == ifindex % IFACE_SLOTS)
        {
            return Err(LoadError::SlotCollision {
                name: name.to_string(),
                ifindex,
                other: other.name.clone(),
            });
        }
        let free = |b: &u32| self.bindings.iter().all(|x| x.block != *b);
        let block = match block.filter(|b| (1..MAX_IFACES).contains(b) && free(b)) {
            Some(b) => b,
            None => (1..MAX_IFACES)
                .find(free)
                .ok_or(LoadError::TooManyInterfaces)?,
        };
        self.maps.set_iface(IfaceInfo {
            ifindex,
            role_mask,
            block,
            // Recorded once attached (`Maps::set_iface_mode`).
            mode: 0,
            // Kept from the entry by `set_iface` when the NIC is the same (a monitor runs).
            monitors: 0,
        })?;
        self.bindings.push(Binding {
            name: name.to_string(),
            ifindex,
            role: role.to_string(),
            block,
            mode: None,
        });
        Ok(self.bindings.last().expect("just pushed"))
    }

    /// Binds and attaches XDP on ingress and the flow recorder on egress. `Auto` tries native
    /// XDP first and falls back to generic with a warning. When pinned, the links are pinned
    /// too; links an earlier run pinned for this interface get the new programs in place.
    pub fn attach(
        &mut self,
        name: &str,
        role: &str,
        mode: AttachMode,
    ) -> Result<ModeName, LoadError> {
        match self.attach_keeping(name, role, mode, None)? {
            Attached::Fresh(m) => Ok(m),
            Attached::Replaced => Ok(self
                .binding(name)
                .and_then(|b| b.mode)
                .unwrap_or(ModeName(XdpMode::Default))),
        }
    }

    fn binding(&self, name: &str) -> Option<&Binding> {
        self.bindings.iter().find(|b| b.name == name)
    }

    /// `attach` for a pinned instance, adopting the links an earlier run pinned when they are
    /// live on this NIC: under its name, or under a name the NIC had before (a renamed NIC; the
    /// pins move to the new name). `before` is this interface as the pinned state knows it.
    ///
    /// A pin that protects nothing here (its NIC went away and the name or ifindex is now
    /// another NIC's, or it is attached in another network namespace) is replaced by a fresh
    /// attachment. On failure, the pins this call created are removed again.
    pub fn attach_keeping(
        &mut self,
        name: &str,
        role: &str,
        mode: AttachMode,
        before: Option<&BoundIface>,
    ) -> Result<Attached, LoadError> {
        self.attach_links(name, role, mode, before, false)
    }

    /// `attach_keeping`; `xdp_first` attaches XDP before TC egress, for a NIC that just
    /// appeared: it has no flows yet, and the kernel takes milliseconds over each attachment.
    fn attach_links(
        &mut self,
        name: &str,
        role: &str,
        mode: AttachMode,
        before: Option<&BoundIface>,
        xdp_first: bool,
    ) -> Result<Attached, LoadError> {
        let ifindex = ifindex(name)?;
        let before = before.filter(|b| b.ifindex == ifindex);
        // What the kernel's binding table records for this NIC: a NIC renamed since keeps its
        // counter block and mode.
        let recorded = self
            .maps
            .iface(ifindex)
            .ok()
            .filter(|i| i.ifindex == ifindex);
        self.bind_block(
            name,
            role,
            before.map(|b| b.block).or(recorded.map(|r| r.block)),
        )?;
        let Some(instance) = self.instance.clone() else {
            if !xdp_first {
                self.attach_egress(name)?;
            }
            let m = self.attach_xdp(name, mode)?;
            if xdp_first {
                self.attach_egress(name)?;
            }
            if let Some(b) = self.bindings.iter_mut().find(|b| b.name == name) {
                b.mode = Some(m);
            }
            return Ok(Attached::Fresh(m));
        };
        let kept_mode = before.and_then(|b| b.mode.clone()).or_else(|| {
            recorded.and_then(|r| match r.mode {
                edge_classifier_common::IFACE_MODE_NATIVE => Some("native".to_string()),
                edge_classifier_common::IFACE_MODE_GENERIC => Some("generic".to_string()),
                _ => None,
            })
        });
        let pinned = ["tc", "xdp"]
            .iter()
            .any(|k| std::fs::symlink_metadata(instance.link_pin(name, k)).is_ok());
        let tc_live = claim_pin(&instance, name, "tc", ifindex);
        let xdp_live = claim_pin(&instance, name, "xdp", ifindex);
        if before.is_some() && !pinned && !tc_live && !xdp_live {
            log::warn!("{name}: no live pinned link of this instance on it; attaching afresh");
        } else if tc_live != xdp_live {
            log::warn!(
                "{name}: its pinned {} link is live but the {} one is not: attaching that one afresh",
                if tc_live { "TC egress" } else { "XDP" },
                if tc_live { "XDP" } else { "TC egress" },
            );
        }
        // Egress first, as on a fresh attach: flows are recorded before XDP judges replies.
        let tc_pin = instance.link_pin(name, "tc");
        let egress = |c: &mut Self| {
            if tc_live {
                c.adopt(&instance, name, "tc")
            } else {
                c.attach_egress(name)
            }
        };
        if !xdp_first {
            egress(self)?;
        }
        let mut attached = if xdp_live {
            self.adopt(&instance, name, "xdp")
                .map(|()| Attached::Replaced)
        } else {
            self.attach_xdp(name, mode).map(Attached::Fresh)
        };
        // Whether this call pinned a fresh egress link (to be removed again on failure).
        let mut fresh_tc = !xdp_first && !tc_live;
        let mut xdp_mode = None;
        if xdp_first && let Ok(a) = &attached {
            // XDP protects the NIC already: a failed egress attach is reported, the XDP link
            // stays and the NIC counts as attached.
            xdp_mode = Some(*a);
            match egress(self) {
                Ok(()) => {}
                Err(e) => attached = Err(e),
            }
            fresh_tc = false;
        }
        let b = self
            .bindings
            .iter_mut()
            .find(|b| b.name == name)
            .expect("bound above");
        match attached.as_ref().ok().or(xdp_mode.as_ref()) {
            Some(Attached::Fresh(m)) => b.mode = Some(*m),
            Some(Attached::Replaced) => {
                b.mode = Some(ModeName(match kept_mode.as_deref() {
                    Some("generic") => XdpMode::Skb,
                    Some("offload") => XdpMode::Hardware,
                    _ => XdpMode::Driver,
                }))
            }
            None if fresh_tc => {
                // The egress link this call pinned goes again: no pin outlives a failed attach.
                self.unpin(&tc_pin);
                self.drop_links(name);
            }
            None => {}
        }
        attached
    }

    /// Attaches NIC `name` again after it was bound with another ifindex (it went away and a
    /// NIC of that name appeared) or its XDP link stopped protecting it: the same role and
    /// counter block, fresh links whose pins replace the stale ones. The binding stays (without
    /// a mode) when this fails, so it can be tried again.
    pub fn reattach(&mut self, name: &str, mode: AttachMode) -> Result<ModeName, LoadError> {
        self.parked.retain(|(n, _)| n != name);
        let at = self
            .bindings
            .iter()
            .position(|b| b.name == name)
            .ok_or_else(|| LoadError::UnknownInterface(name.to_string()))?;
        let old = self.bindings.remove(at);
        self.drop_links(name);
        let now = ifindex(name);
        if now.as_ref().ok() != Some(&old.ifindex)
            && !self.bindings.iter().any(|b| b.ifindex == old.ifindex)
        {
            // The programs must not treat whatever gets the old ifindex as this NIC.
            self.maps.clear_iface(old.ifindex)?;
        }
        let before = now.as_ref().ok().map(|&ifindex| BoundIface {
            name: name.to_string(),
            ifindex,
            role: old.role.clone(),
            block: old.block,
            mode: None,
        });
        let result = match now {
            Ok(_) => self.attach_links(name, &old.role, mode, before.as_ref(), true),
            Err(e) => Err(e),
        };
        match result {
            Ok(Attached::Fresh(m)) => Ok(m),
            Ok(Attached::Replaced) => Ok(self
                .binding(name)
                .and_then(|b| b.mode)
                .unwrap_or(ModeName(XdpMode::Default))),
            Err(e) => {
                if self.binding(name).is_none() {
                    self.bindings.push(Binding { mode: None, ..old });
                }
                Err(e)
            }
        }
    }

    /// Records that NIC `name` is not protected any more (it went away): it stays bound, with
    /// its counters, and shows as not attached. `true` when it was attached until now.
    pub fn mark_detached(&mut self, name: &str) -> bool {
        let Some(mode) = self
            .bindings
            .iter_mut()
            .find(|b| b.name == name)
            .and_then(|b| b.mode.take())
        else {
            return false;
        };
        self.parked.retain(|(n, _)| n != name);
        self.parked.push((name.to_string(), mode));
        true
    }

    /// Undoes `mark_detached` for a NIC found protected again under its name (renamed away
    /// and back: the same ifindex, its link live). `true` when it was marked detached.
    pub fn mark_attached(&mut self, name: &str) -> bool {
        let Some(at) = self.parked.iter().position(|(n, _)| n == name) else {
            return false;
        };
        let (_, mode) = self.parked.remove(at);
        if let Some(b) = self.bindings.iter_mut().find(|b| b.name == name)
            && b.mode.is_none()
        {
            b.mode = Some(mode);
        }
        true
    }

    /// Whether the instance's XDP link of bound NIC `name` is live on it in this network
    /// namespace: `Err` says why not. Without pins (an unpinned classifier) it is taken to be.
    pub fn xdp_live(&self, name: &str) -> Result<(), String> {
        let Some(instance) = &self.instance else {
            return Ok(());
        };
        let b = self
            .binding(name)
            .ok_or_else(|| format!("{name} is not bound"))?;
        match pin_state(&instance.link_pin(name, "xdp"), "xdp", b.ifindex) {
            PinState::Live => Ok(()),
            PinState::Missing => Err("its XDP link pin is missing".to_string()),
            PinState::Stale(why) => Err(why),
        }
    }

    /// Puts this process's program into the `kind` link pinned for NIC `name`
    /// (`BPF_LINK_UPDATE`: the old program is replaced in place, no gap).
    fn adopt(&mut self, instance: &Instance, name: &str, kind: &str) -> Result<(), LoadError> {
        let pin = instance.link_pin(name, kind);
        let link = PinnedLink::from_pin(&pin).map_err(|e| pin_err(name, &pin, e))?;
        if kind == "tc" {
            let tc: SchedClassifierLink = FdLink::from(link)
                .try_into()
                .map_err(|e| pin_err(name, &pin, e))?;
            let id =
                self.egress_program()
                    .attach_to_link(tc)
                    .map_err(|e| LoadError::AttachEgress {
                        iface: name.to_string(),
                        detail: chain(&e),
                    })?;
            self.egress_links.push((name.to_string(), id));
        } else {
            let xdp: XdpLink = FdLink::from(link)
                .try_into()
                .map_err(|e| pin_err(name, &pin, e))?;
            let id = self
                .program()
                .attach_to_link(xdp)
                .map_err(|e| LoadError::Attach {
                    iface: name.to_string(),
                    mode: ModeName(XdpMode::Default),
                    detail: chain(&e),
                })?;
            self.links.push((name.to_string(), id));
        }
        Ok(())
    }

    /// A fresh XDP attachment to `name`: native first under `Auto`, generic after a warning.
    /// Another program on the NIC is named, with how to remove it.
    fn attach_xdp(&mut self, name: &str, mode: AttachMode) -> Result<ModeName, LoadError> {
        let tries: &[XdpMode] = match mode {
            AttachMode::Auto => &[XdpMode::Driver, XdpMode::Skb],
            AttachMode::Native => &[XdpMode::Driver],
            AttachMode::Generic => &[XdpMode::Skb],
        };
        let mut last = None;
        for &m in tries {
            match self.program().attach(name, m) {
                Ok(link) => {
                    self.keep_xdp_link(name, link)?;
                    return Ok(ModeName(m));
                }
                Err(e) => {
                    let detail = chain(&e);
                    if let Some(taken) = xdp_taken(name, &detail) {
                        // No mode attaches beside another program: say whose it is.
                        return Err(taken);
                    }
                    if m == XdpMode::Driver && mode == AttachMode::Auto {
                        log::warn!(
                            "{name}: native XDP attach failed ({detail}); falling back to generic (skb) mode, which runs after the kernel allocated the skb"
                        );
                    }
                    last = Some((m, detail));
                }
            }
        }
        let (m, detail) = last.expect("at least one mode tried");
        Err(LoadError::Attach {
            iface: name.to_string(),
            mode: ModeName(m),
            detail,
        })
    }

    fn keep_xdp_link(&mut self, name: &str, id: XdpLinkId) -> Result<(), LoadError> {
        if self.instance.is_none() {
            self.links.push((name.to_string(), id));
            return Ok(());
        }
        let link = self.program().take_link(id).map_err(LoadError::Program)?;
        self.pin_link(name, "xdp", link)
    }

    fn keep_tc_link(&mut self, name: &str, id: SchedClassifierLinkId) -> Result<(), LoadError> {
        if self.instance.is_none() {
            self.egress_links.push((name.to_string(), id));
            return Ok(());
        }
        let link = self
            .egress_program()
            .take_link(id)
            .map_err(LoadError::Program)?;
        self.pin_link(name, "tc", link)
    }

    /// Pins a link of NIC `name` as the instance's `kind` link, replacing a stale pin.
    fn pin_link<L>(&mut self, name: &str, kind: &str, link: L) -> Result<(), LoadError>
    where
        L: TryInto<FdLink>,
        L::Error: std::error::Error,
    {
        let instance = self
            .instance
            .clone()
            .expect("only pinned classifiers pin links");
        let path = instance.link_pin(name, kind);
        let fd: FdLink = link.try_into().map_err(|e| pin_err(name, &path, e))?;
        let _ = std::fs::remove_file(&path);
        self.pinned_links.retain(|(p, _)| p != &path);
        let pinned = fd.pin(&path).map_err(|e| pin_err(name, &path, e))?;
        self.pinned_links.push((path, pinned));
        Ok(())
    }

    /// Removes a pin this process made (the link detaches once nothing holds it).
    fn unpin(&mut self, path: &Path) {
        let _ = std::fs::remove_file(path);
        self.pinned_links.retain(|(p, _)| p != path);
    }

    /// Lets go of the link handles of NIC `name` that the programs own (a pinned link stays
    /// attached while its pin does).
    fn drop_links(&mut self, name: &str) {
        let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.links)
            .into_iter()
            .partition(|(n, _)| n == name);
        self.links = kept;
        for (_, id) in gone {
            let _ = self.program().detach(id);
        }
        let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.egress_links)
            .into_iter()
            .partition(|(n, _)| n == name);
        self.egress_links = kept;
        for (_, id) in gone {
            let _ = self.egress_program().detach(id);
        }
    }

    fn attach_egress(&mut self, name: &str) -> Result<(), LoadError> {
        let first = self.egress_program().attach(name, TcAttachType::Egress);
        let link = match first {
            Ok(link) => link,
            // Kernels before tcx (6.6) attach through a clsact qdisc, which may be missing.
            Err(_) => {
                let _ = aya::programs::tc::qdisc_add_clsact(name);
                self.egress_program()
                    .attach(name, TcAttachType::Egress)
                    .map_err(|e| LoadError::AttachEgress {
                        iface: name.to_string(),
                        detail: chain(&e),
                    })?
            }
        };
        self.keep_tc_link(name, link)
    }

    /// Detaches from every NIC and, for a pinned instance, removes its pins. Without pins this
    /// also happens on drop; a pinned instance stays attached when the process ends.
    pub fn detach_all(&mut self) {
        if let Some(instance) = &self.instance {
            // A pinned link lives as long as its pin: remove the pins first.
            let _ = std::fs::remove_dir_all(instance.links_dir());
        }
        self.pinned_links.clear();
        // XDP first, so no reply is judged against a flow table that stopped being filled.
        for (_, link) in std::mem::take(&mut self.links) {
            if let Err(e) = self.program().detach(link) {
                log::warn!("detach XDP: {e}");
            }
        }
        for (_, link) in std::mem::take(&mut self.egress_links) {
            if let Err(e) = self.egress_program().detach(link) {
                log::warn!("detach TC egress: {e}");
            }
        }
        for b in &mut self.bindings {
            b.mode = None;
        }
    }

    /// Removes the binding of an interface that an earlier run attached and this one does not
    /// want any more: its pinned links go, so it is detached.
    pub fn forget_pinned(&mut self, name: &str) {
        if let Some(instance) = &self.instance {
            for kind in ["xdp", "tc"] {
                let _ = std::fs::remove_file(instance.link_pin(name, kind));
            }
        }
    }

    /// Counters of one bound interface, summed over CPUs; `rules` in catalogue order.
    pub fn iface_stats(&self, binding: &Binding) -> Result<IfaceStats, LoadError> {
        let slots: Vec<u32> = self.compiled.rules.iter().map(|r| r.slot).collect();
        Ok(self.maps.iface_stats(binding.block, &slots)?)
    }

    pub fn instance(&self) -> Option<&Instance> {
        self.instance.as_ref()
    }
}

/// Loads the programs that write monitor events and puts them where the entry points
/// tail-call them. A pinned array an earlier run filled gets this run's programs.
fn fill_monitor_programs(ebpf: &mut Ebpf) -> Result<(), LoadError> {
    let xdp: &mut Xdp = ebpf
        .program_mut(MONITORED_PROGRAM_NAME)
        .expect("the object has the monitored XDP program")
        .try_into()
        .map_err(LoadError::Program)?;
    verified("monitored XDP", xdp.load())?;
    let xdp_fd = xdp
        .fd()
        .and_then(|f| f.try_clone().map_err(ProgramError::from))
        .map_err(LoadError::Program)?;
    let tc: &mut SchedClassifier = ebpf
        .program_mut(MONITORED_EGRESS_PROGRAM_NAME)
        .expect("the object has the monitored egress program")
        .try_into()
        .map_err(LoadError::Program)?;
    verified("monitored TC egress", tc.load())?;
    let tc_fd = tc
        .fd()
        .and_then(|f| f.try_clone().map_err(ProgramError::from))
        .map_err(LoadError::Program)?;
    for (name, fd) in MONITOR_PROGRAM_ARRAYS.iter().zip([xdp_fd, tc_fd]) {
        let map = ebpf
            .map_mut(name)
            .expect("the object has the program arrays");
        let mut array =
            ProgramArray::try_from(map).map_err(|source| MapsError { map: name, source })?;
        array
            .set(0, &fd, 0)
            .map_err(|source| MapsError { map: name, source })?;
    }
    Ok(())
}

fn pin_err(iface: &str, path: &std::path::Path, e: impl std::error::Error) -> LoadError {
    LoadError::Pin {
        what: format!("the link of {iface}"),
        path: path.display().to_string(),
        message: chain(&e),
    }
}

/// A BPF link as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelLink {
    pub id: u32,
    pub program_id: u32,
    /// The interface it is attached to (XDP, tcx); 0 once that NIC went away (a defunct link).
    pub ifindex: u32,
}

fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> libc::c_long {
    unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr),
        )
    }
}

/// `BPF_OBJ_GET` then `BPF_OBJ_GET_INFO_BY_FD` on a pinned link: its id, program id and the
/// ifindex of its XDP or tcx attachment (aya 0.14's `LinkInfo` gives no ifindex).
pub fn pinned_link(pin: &Path) -> Option<KernelLink> {
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    let path = CString::new(pin.as_os_str().as_bytes()).ok()?;
    // union bpf_attr, BPF_OBJ_GET: { u64 pathname; u32 bpf_fd; u32 file_flags; s32 path_fd }.
    let mut attr = [0u64; 16];
    attr[0] = path.as_ptr() as u64;
    let fd = bpf(BPF_OBJ_GET, &mut attr);
    if fd < 0 {
        return None;
    }
    let fd = fd as i32;
    // struct bpf_link_info: { u32 type; u32 id; u32 prog_id; union (8-aligned, at 16) }; the
    // xdp and tcx members both start with u32 ifindex.
    let mut info = [0u32; 32];
    let mut attr = [0u64; 16];
    attr[0] = (fd as u32 as u64) | ((std::mem::size_of_val(&info) as u64) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    let rc = bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr);
    unsafe { libc::close(fd) };
    (rc == 0).then_some(KernelLink {
        id: info[1],
        program_id: info[2],
        ifindex: info[4],
    })
}

/// The XDP action that lets a frame on to the stack (`enum xdp_action`), as BPF_PROG_TEST_RUN
/// returns it.
pub const XDP_PASS: u32 = 2;

/// Runs `frame` once through the program behind the pinned XDP link `pin`, as if it had
/// arrived on NIC `ifindex` (`BPF_PROG_TEST_RUN` with an `xdp_md` naming that NIC, which must be
/// in this network namespace), and returns its XDP action. The program runs against the live
/// maps, so the answer is the running catalogue's and the frame counts on that NIC like a real
/// one; nothing is transmitted. This is how a rollout checks the kernel, not only the catalogue.
pub fn probe_pinned_xdp(pin: &Path, ifindex: u32, frame: &[u8]) -> io::Result<u32> {
    const BPF_PROG_TEST_RUN: libc::c_long = 10;
    const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
    let link = pinned_link(pin).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("no live pinned XDP link at {}", pin.display()),
        )
    })?;
    // union bpf_attr, BPF_PROG_GET_FD_BY_ID: { u32 prog_id; u32 next_id; u32 open_flags }.
    let mut attr = [0u64; 16];
    attr[0] = u64::from(link.program_id);
    let fd = bpf(BPF_PROG_GET_FD_BY_ID, &mut attr);
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = fd as i32;
    // struct xdp_md { u32 data; u32 data_end; u32 data_meta; u32 ingress_ifindex;
    // u32 rx_queue_index; u32 egress_ifindex }: the kernel wants data_end = the frame's length.
    let ctx: [u32; 6] = [0, frame.len() as u32, 0, ifindex, 0, 0];
    let mut out = vec![0u8; frame.len() + 256];
    // The test member of union bpf_attr: { u32 prog_fd; u32 retval; u32 data_size_in;
    // u32 data_size_out; u64 data_in; u64 data_out; u32 repeat; u32 duration;
    // u32 ctx_size_in; u32 ctx_size_out; u64 ctx_in; u64 ctx_out; ... }.
    let mut attr = [0u64; 16];
    attr[0] = fd as u32 as u64;
    attr[1] = frame.len() as u64 | ((out.len() as u64) << 32);
    attr[2] = frame.as_ptr() as u64;
    attr[3] = out.as_mut_ptr() as u64;
    attr[4] = 1;
    attr[5] = std::mem::size_of_val(&ctx) as u64;
    attr[6] = ctx.as_ptr() as u64;
    let rc = bpf(BPF_PROG_TEST_RUN, &mut attr);
    let err = io::Error::last_os_error();
    unsafe { libc::close(fd) };
    if rc < 0 {
        return Err(err);
    }
    Ok((attr[0] >> 32) as u32)
}

/// The ids of the links on NIC `ifindex`'s tcx egress hook, in this network namespace
/// (`BPF_PROG_QUERY`).
fn tcx_egress_links(ifindex: u32) -> io::Result<Vec<u32>> {
    const BPF_PROG_QUERY: libc::c_long = 16;
    const BPF_TCX_EGRESS: u64 = 47;
    const MAX: usize = 64;
    let mut prog_ids = [0u32; MAX];
    let mut link_ids = [0u32; MAX];
    // The query member of union bpf_attr: { u32 target_ifindex; u32 attach_type; u32
    // query_flags; u32 attach_flags; u64 prog_ids; u32 count; u32 pad; u64 prog_attach_flags;
    // u64 link_ids; ... }.
    let mut attr = [0u64; 16];
    attr[0] = u64::from(ifindex) | (BPF_TCX_EGRESS << 32);
    attr[2] = prog_ids.as_mut_ptr() as u64;
    attr[3] = MAX as u64;
    attr[5] = link_ids.as_mut_ptr() as u64;
    if bpf(BPF_PROG_QUERY, &mut attr) < 0 {
        return Err(io::Error::last_os_error());
    }
    let count = (attr[3] as u32 as usize).min(MAX);
    Ok(link_ids[..count].to_vec())
}

/// What the kernel says of one of an instance's link pins, for NIC `ifindex` here.
enum PinState {
    Missing,
    /// Attached to that NIC, in this network namespace.
    Live,
    /// Pinned, but protecting nothing here: why, in words.
    Stale(String),
}

fn pin_state(pin: &Path, kind: &str, ifindex: u32) -> PinState {
    if std::fs::symlink_metadata(pin).is_err() {
        return PinState::Missing;
    }
    let Some(link) = pinned_link(pin) else {
        return PinState::Stale("the kernel does not answer for its pin".to_string());
    };
    if link.ifindex == 0 {
        return PinState::Stale(format!(
            "link {} is defunct: attached to no NIC any more (its NIC or namespace was deleted, or the link was detached)",
            link.id
        ));
    }
    if link.ifindex != ifindex {
        return PinState::Stale(format!(
            "link {} is attached to ifindex {}, not to this NIC (ifindex {ifindex})",
            link.id, link.ifindex
        ));
    }
    let here = if kind == "xdp" {
        crate::nic_addrs::xdp_program(ifindex).map(|p| p.is_some_and(|p| p.id == link.program_id))
    } else {
        tcx_egress_links(ifindex).map(|l| l.contains(&link.id))
    };
    match here {
        Ok(false) => PinState::Stale(format!(
            "link {} is attached to ifindex {ifindex} of another network namespace",
            link.id
        )),
        // A kernel that cannot be asked (tc before tcx): the ifindex is all there is to go by.
        Ok(true) | Err(_) => PinState::Live,
    }
}

fn kind_name(kind: &str) -> &'static str {
    if kind == "xdp" { "XDP" } else { "TC egress" }
}

/// Makes `instance`'s `kind` pin of NIC `name` that of a link live on it (`ifindex`), when
/// there is one: its own pin, or the pin of a name the NIC had before it was renamed, which
/// moves to the new name. `false`: none is, and a fresh attachment is needed (a stale pin under
/// `name` is left for it to replace).
fn claim_pin(instance: &Instance, name: &str, kind: &str, ifindex: u32) -> bool {
    let own = instance.link_pin(name, kind);
    match pin_state(&own, kind, ifindex) {
        PinState::Live => return true,
        PinState::Stale(why) => log::warn!(
            "{name}: the pinned {} link protects nothing here ({why}); attaching afresh and replacing the pin",
            kind_name(kind)
        ),
        PinState::Missing => {}
    }
    let suffix = format!("-{kind}");
    let Ok(dir) = std::fs::read_dir(instance.links_dir()) else {
        return false;
    };
    for entry in dir.flatten() {
        let path = entry.path();
        let Some(old) = path
            .file_name()
            .and_then(|f| f.to_str())
            .and_then(|f| f.strip_suffix(&suffix))
            .map(|o| o.replace(':', "."))
        else {
            continue;
        };
        if path == own || !matches!(pin_state(&path, kind, ifindex), PinState::Live) {
            continue;
        }
        match std::fs::rename(&path, &own) {
            Ok(()) => {
                log::info!(
                    "{name}: the {} link pinned for `{old}` is on this NIC (ifindex {ifindex}: it was renamed); adopted under its new name",
                    kind_name(kind)
                );
                return true;
            }
            Err(e) => log::warn!(
                "{name}: moving the pin of its {} link from `{old}`: {e}",
                kind_name(kind)
            ),
        }
    }
    false
}

/// When an XDP attach to `iface` failed because another program holds the NIC: that program,
/// its link and how to remove it. `errno` is what the attach got.
fn xdp_taken(iface: &str, errno: &str) -> Option<LoadError> {
    let ifindex = ifindex(iface).ok()?;
    let held = crate::nic_addrs::xdp_program(ifindex).ok()??;
    // Looking programs and links up by id needs CAP_SYS_ADMIN; without it (the unit's
    // capabilities) the name is left out.
    let name = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == held.id)
        .and_then(|p| p.name_as_str().map(str::to_string));
    // An edge-classifier instance's pin of a link running that program (CAP_BPF reads it).
    let pinned = std::fs::read_dir(crate::instance::PIN_ROOT)
        .into_iter()
        .flat_map(|d| d.flatten())
        .filter_map(|i| std::fs::read_dir(i.path().join("links")).ok())
        .flat_map(|d| d.flatten().map(|e| e.path()))
        .find_map(|p| {
            pinned_link(&p)
                .filter(|l| l.program_id == held.id && l.ifindex == ifindex)
                .map(|l| (p, l.id))
        });
    let links: Vec<_> = aya::programs::loaded_links().collect();
    let links_listed = links.iter().all(Result::is_ok);
    let link = pinned.as_ref().map(|(_, id)| *id).or_else(|| {
        links
            .iter()
            .flatten()
            .find(|l| {
                l.program_id() == held.id
                    && matches!(l.link_type(), Ok(aya::programs::links::LinkType::Xdp))
            })
            .map(|l| l.id())
    });
    let pin = pinned.map(|(p, _)| p);
    Some(LoadError::XdpTaken(Box::new(XdpTaken {
        iface: iface.to_string(),
        program: held.id,
        name,
        mode: held.mode,
        link,
        errno: errno.to_string(),
        pin,
        links_listed,
    })))
}

/// Why bound NICs are not protected, as far as the pins tell wherever this runs: a pinned XDP
/// link that is gone, unreadable or defunct (its NIC went away). One line per NIC, naming it.
pub fn unprotected(instance: &Instance, bindings: &[BoundIface]) -> Vec<String> {
    bindings
        .iter()
        .filter_map(|b| {
            let pin = instance.link_pin(&b.name, "xdp");
            let why = if std::fs::symlink_metadata(&pin).is_err() {
                "its XDP link is not pinned".to_string()
            } else {
                match pinned_link(&pin) {
                    None => "the kernel does not answer for its pinned XDP link".to_string(),
                    Some(l) if l.ifindex == 0 => format!(
                        "its XDP link {} is defunct: attached to no NIC (its NIC or namespace was deleted, or the link was detached)",
                        l.id
                    ),
                    Some(_) => return None,
                }
            };
            Some(format!(
                "{}: NOT PROTECTED: {why}; `edge-classifier run` attaches it again (a running daemon does so when the NIC appears)",
                b.name
            ))
        })
        .collect()
}

impl Drop for Classifier {
    fn drop(&mut self) {
        if self.instance.is_none() {
            self.detach_all();
        }
    }
}

/// Maps a program load failure to what an operator can act on.
fn verified(program: &'static str, result: Result<(), ProgramError>) -> Result<(), LoadError> {
    match result {
        Ok(()) => Ok(()),
        Err(ProgramError::LoadError {
            io_error,
            verifier_log,
        }) => {
            if is_eperm(&io_error) && verifier_log.to_string().trim().is_empty() {
                return Err(LoadError::NotPrivileged(io_error.to_string()));
            }
            Err(LoadError::Verifier {
                program,
                io_error,
                log: verifier_log.to_string(),
            })
        }
        Err(e) => Err(LoadError::Program(e)),
    }
}
