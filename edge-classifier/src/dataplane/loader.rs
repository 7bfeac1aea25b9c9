//! Loads the embedded eBPF object (XDP ingress classifier and TC egress flow recorder), fills its
//! maps from a compiled catalogue, binds NICs to roles and attaches.

use std::{ffi::CString, fmt, io};

pub use aya::programs::XdpMode;
use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::MapError,
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
    maps::{MAP_NAMES, Maps, MapsError},
};

/// The XDP program, as built by build.rs from `edge-classifier-ebpf`.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/edge-classifier"));
pub const PROGRAM_NAME: &str = "edge_classifier";
/// The TC egress program that records outbound flows.
pub const EGRESS_PROGRAM_NAME: &str = "edge_egress";
/// An empty XDP_PASS program (`xdp_pass`): the floor benchmarks measure against.
pub static FLOOR_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdp-pass"));

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
    #[error("attaching the TC egress flow recorder to `{iface}` failed: {source}")]
    AttachEgress {
        iface: String,
        #[source]
        source: ProgramError,
    },
    #[error("attaching XDP to `{iface}` in {mode} mode failed: {source}")]
    Attach {
        iface: String,
        mode: ModeName,
        #[source]
        source: ProgramError,
    },
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
    links: Vec<XdpLinkId>,
    egress_links: Vec<SchedClassifierLinkId>,
    /// Set when maps and links are pinned: they then outlive this process.
    instance: Option<Instance>,
    pinned_links: Vec<PinnedLink>,
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
        let pins: Vec<(&str, std::path::PathBuf)> = instance
            .map(|i| MAP_NAMES.iter().map(|n| (*n, i.map_pin(n))).collect())
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
        })
    }

    pub fn maps(&self) -> &Maps {
        &self.maps
    }

    pub fn maps_mut(&mut self) -> &mut Maps {
        &mut self.maps
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

    /// `attach` for a pinned instance, adopting `before` (this interface as the pinned state
    /// knows it) when its links are still there.
    pub fn attach_keeping(
        &mut self,
        name: &str,
        role: &str,
        mode: AttachMode,
        before: Option<&BoundIface>,
    ) -> Result<Attached, LoadError> {
        let ifindex = ifindex(name)?;
        let before = before.filter(|b| b.ifindex == ifindex);
        self.bind_block(name, role, before.map(|b| b.block))?;
        if let (Some(instance), Some(before)) = (self.instance.clone(), before) {
            if self.adopt_links(&instance, name, before)? {
                return Ok(Attached::Replaced);
            }
            log::warn!("{name}: pinned links are gone; attaching afresh");
        }
        self.attach_egress(name)?;
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
                    let b = self
                        .bindings
                        .iter_mut()
                        .find(|b| b.name == name)
                        .expect("bound above");
                    b.mode = Some(ModeName(m));
                    return Ok(Attached::Fresh(ModeName(m)));
                }
                Err(e) => {
                    if m == XdpMode::Driver && mode == AttachMode::Auto {
                        log::warn!(
                            "{name}: native XDP attach failed ({e}); falling back to generic (skb) mode, which runs after the kernel allocated the skb"
                        );
                    }
                    last = Some((m, e));
                }
            }
        }
        let (m, source) = last.expect("at least one mode tried");
        Err(LoadError::Attach {
            iface: name.to_string(),
            mode: ModeName(m),
            source,
        })
    }

    /// Puts this process's programs into the links an earlier run pinned for NIC `name`
    /// (`BPF_LINK_UPDATE`: the old program is replaced in place, no gap). `false` when the
    /// pins are gone.
    fn adopt_links(
        &mut self,
        instance: &Instance,
        name: &str,
        before: &BoundIface,
    ) -> Result<bool, LoadError> {
        let xdp_pin = instance.link_pin(name, "xdp");
        let tc_pin = instance.link_pin(name, "tc");
        if let (Ok(xdp), Ok(tc)) = (
            PinnedLink::from_pin(&xdp_pin),
            PinnedLink::from_pin(&tc_pin),
        ) {
            // Egress first, as on a fresh attach.
            let tc: SchedClassifierLink = FdLink::from(tc)
                .try_into()
                .map_err(|e| pin_err(name, &tc_pin, e))?;
            let id = self.egress_program().attach_to_link(tc).map_err(|source| {
                LoadError::AttachEgress {
                    iface: name.to_string(),
                    source,
                }
            })?;
            self.egress_links.push(id);
            let xdp: XdpLink = FdLink::from(xdp)
                .try_into()
                .map_err(|e| pin_err(name, &xdp_pin, e))?;
            let mode_name = before.mode.clone().unwrap_or_default();
            let id = self
                .program()
                .attach_to_link(xdp)
                .map_err(|source| LoadError::Attach {
                    iface: name.to_string(),
                    mode: ModeName(XdpMode::Default),
                    source,
                })?;
            self.links.push(id);
            let b = self
                .bindings
                .iter_mut()
                .find(|b| b.name == name)
                .expect("bound");
            b.mode = Some(ModeName(match mode_name.as_str() {
                "generic" => XdpMode::Skb,
                "offload" => XdpMode::Hardware,
                _ => XdpMode::Driver,
            }));
            return Ok(true);
        }
        Ok(false)
    }

    fn keep_xdp_link(&mut self, name: &str, id: XdpLinkId) -> Result<(), LoadError> {
        if self.instance.is_none() {
            self.links.push(id);
            return Ok(());
        }
        let link = self.program().take_link(id).map_err(LoadError::Program)?;
        self.pin_link(name, "xdp", link)
    }

    fn keep_tc_link(&mut self, name: &str, id: SchedClassifierLinkId) -> Result<(), LoadError> {
        if self.instance.is_none() {
            self.egress_links.push(id);
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
        let pinned = fd.pin(&path).map_err(|e| pin_err(name, &path, e))?;
        self.pinned_links.push(pinned);
        Ok(())
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
                    .map_err(|source| LoadError::AttachEgress {
                        iface: name.to_string(),
                        source,
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
        for link in std::mem::take(&mut self.links) {
            if let Err(e) = self.program().detach(link) {
                log::warn!("detach XDP: {e}");
            }
        }
        for link in std::mem::take(&mut self.egress_links) {
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

fn pin_err(iface: &str, path: &std::path::Path, e: impl std::error::Error) -> LoadError {
    // aya's pin errors keep the errno in their source.
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message.push_str(&format!(": {s}"));
        source = s.source();
    }
    LoadError::Pin {
        what: format!("the link of {iface}"),
        path: path.display().to_string(),
        message,
    }
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
