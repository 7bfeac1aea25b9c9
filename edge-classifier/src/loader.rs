//! Loads the embedded eBPF object (XDP ingress classifier and TC egress flow recorder), fills its
//! maps from a compiled catalogue, binds NICs to roles and attaches.

use std::{ffi::CString, fmt, io};

pub use aya::programs::XdpMode;
use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapError, PerCpuArray, lpm_trie::Key},
    programs::{
        ProgramError, SchedClassifier, TcAttachType, Xdp, tc::SchedClassifierLinkId, xdp::XdpLinkId,
    },
};
use edge_classifier_common::{
    BUFFERS, Counter, FlowKey, FlowState, IFACE_SLOTS, IfaceInfo, LPM_BUFFER_BITS, Lpm4, Lpm6,
    MAX_CLASSES, MAX_IFACES, PORT_SPACE, PortEntry, RULE_COUNTER_BASE, STATS_STRIDE, TRANSPORTS,
    flow_stat, reason,
};
use ipnet::IpNet;

use crate::compile::Compiled;

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
        "permission denied: loading XDP programs needs root, or CAP_BPF + CAP_NET_ADMIN (+ CAP_PERFMON); run as root (this process has {0})"
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
    #[error("writing map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
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

/// Counters of one interface, summed over CPUs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IfaceStats {
    pub reasons: Vec<Counter>,
    /// By rule slot.
    pub rules: Vec<Counter>,
}

/// The flow table's state, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FlowStats {
    pub capacity: u32,
    /// Entries in the table now (live or idle but not yet removed).
    pub present: u64,
    pub created: u64,
    pub expired: u64,
    pub insert_failed: u64,
    /// Flows pushed out by the LRU to make room: neither expired nor present.
    pub evicted: u64,
}

/// One recorded outbound flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    pub key: FlowKey,
    pub state: FlowState,
}

impl Flow {
    pub fn local(&self) -> std::net::SocketAddr {
        sock(self.key.family, &self.key.local, self.key.local_port)
    }
    pub fn remote(&self) -> std::net::SocketAddr {
        sock(self.key.family, &self.key.remote, self.key.remote_port)
    }
}

fn sock(family: u8, addr: &[u8; 16], port: u16) -> std::net::SocketAddr {
    let ip: std::net::IpAddr = if family == 4 {
        std::net::Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]).into()
    } else {
        std::net::Ipv6Addr::from(*addr).into()
    };
    std::net::SocketAddr::new(ip, port)
}

pub struct Classifier {
    ebpf: Ebpf,
    compiled: Compiled,
    active: u32,
    bindings: Vec<Binding>,
    links: Vec<XdpLinkId>,
    egress_links: Vec<SchedClassifierLinkId>,
}

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> LoadError {
    move |source| LoadError::Map { map, source }
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
    const CAP_BPF: u64 = 1 << 39;
    let Some(caps) = effective_caps() else {
        return Ok(());
    };
    let bpf = caps & (CAP_BPF | CAP_SYS_ADMIN) != 0;
    let net = caps & CAP_NET_ADMIN != 0;
    if bpf && net {
        return Ok(());
    }
    let mut missing = Vec::new();
    if !bpf {
        missing.push("CAP_BPF");
    }
    if !net {
        missing.push("CAP_NET_ADMIN");
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
    /// Loads the program and writes `compiled` into buffer 0. Nothing is attached yet.
    pub fn load(compiled: Compiled) -> Result<Self, LoadError> {
        check_privileges()?;
        let mut ebpf = match EbpfLoader::new()
            .map_max_entries("FLOWS", compiled.flow_capacity)
            .load(EBPF_OBJECT)
        {
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
        write_buffer(&mut ebpf, 0, &compiled, None)?;
        let mut c = Self {
            ebpf,
            compiled,
            active: 0,
            bindings: Vec::new(),
            links: Vec::new(),
            egress_links: Vec::new(),
        };
        c.set_active(0)?;
        Ok(c)
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
        let block = (1..MAX_IFACES)
            .find(|b| self.bindings.iter().all(|x| x.block != *b))
            .ok_or(LoadError::TooManyInterfaces)?;
        let mut ifaces: Array<_, IfaceInfo> =
            Array::try_from(self.ebpf.map_mut("IFACES").expect("IFACES"))
                .map_err(map_err("IFACES"))?;
        ifaces
            .set(
                ifindex % IFACE_SLOTS,
                IfaceInfo {
                    ifindex,
                    role_mask,
                    block,
                    _pad: 0,
                },
                0,
            )
            .map_err(map_err("IFACES"))?;
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
    /// XDP first and falls back to generic with a warning.
    pub fn attach(
        &mut self,
        name: &str,
        role: &str,
        mode: AttachMode,
    ) -> Result<ModeName, LoadError> {
        self.bind(name, role)?;
        // Egress first: once XDP drops unrecorded replies, every outbound flow must already be
        // recorded, or connections opened in between would stall.
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
                    self.links.push(link);
                    let b = self
                        .bindings
                        .iter_mut()
                        .find(|b| b.name == name)
                        .expect("bound above");
                    b.mode = Some(ModeName(m));
                    return Ok(ModeName(m));
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
        self.egress_links.push(link);
        Ok(())
    }

    /// Detaches from every NIC (also done on drop).
    pub fn detach_all(&mut self) {
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
    }

    /// The flow table: occupancy and events, summed over CPUs.
    pub fn flow_stats(&self) -> Result<FlowStats, LoadError> {
        let stats: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map("FLOW_STATS").expect("FLOW_STATS"))
                .map_err(map_err("FLOW_STATS"))?;
        let read = |i: u32| -> Result<u64, LoadError> {
            Ok(stats
                .get(&i, 0)
                .map_err(map_err("FLOW_STATS"))?
                .iter()
                .sum())
        };
        let flows: HashMap<_, FlowKey, FlowState> =
            HashMap::try_from(self.ebpf.map("FLOWS").expect("FLOWS")).map_err(map_err("FLOWS"))?;
        // Keys may vanish while we walk; a failed step just ends the count.
        let present = flows.keys().take_while(Result::is_ok).count() as u64;
        let created = read(flow_stat::CREATED)?;
        let expired = read(flow_stat::EXPIRED)?;
        Ok(FlowStats {
            capacity: self.compiled.flow_capacity,
            present,
            created,
            expired,
            insert_failed: read(flow_stat::INSERT_FAILED)?,
            evicted: created.saturating_sub(expired).saturating_sub(present),
        })
    }

    /// Every recorded flow (a walk of the table: for inspection, not the hot path).
    pub fn flows(&self) -> Result<Vec<Flow>, LoadError> {
        let flows: HashMap<_, FlowKey, FlowState> =
            HashMap::try_from(self.ebpf.map("FLOWS").expect("FLOWS")).map_err(map_err("FLOWS"))?;
        Ok(flows
            .iter()
            .filter_map(Result::ok)
            .map(|(key, state)| Flow { key, state })
            .collect())
    }

    fn set_active(&mut self, buffer: u32) -> Result<(), LoadError> {
        let mut active: Array<_, u32> =
            Array::try_from(self.ebpf.map_mut("ACTIVE").expect("ACTIVE"))
                .map_err(map_err("ACTIVE"))?;
        active.set(0, buffer, 0).map_err(map_err("ACTIVE"))?;
        self.active = buffer;
        Ok(())
    }

    /// Counters of one bound interface, summed over CPUs.
    pub fn iface_stats(&self, binding: &Binding) -> Result<IfaceStats, LoadError> {
        let stats: PerCpuArray<_, Counter> =
            PerCpuArray::try_from(self.ebpf.map("STATS").expect("STATS"))
                .map_err(map_err("STATS"))?;
        let base = binding.block * STATS_STRIDE;
        let read = |i: u32| -> Result<Counter, LoadError> {
            let per_cpu = stats.get(&(base + i), 0).map_err(map_err("STATS"))?;
            Ok(per_cpu.iter().fold(Counter::default(), |a, c| Counter {
                packets: a.packets + c.packets,
                bytes: a.bytes + c.bytes,
            }))
        };
        let reasons = (0..reason::COUNT).map(read).collect::<Result<_, _>>()?;
        let rules = self
            .compiled
            .rules
            .iter()
            .map(|r| read(RULE_COUNTER_BASE + r.slot))
            .collect::<Result<_, _>>()?;
        Ok(IfaceStats { reasons, rules })
    }

    pub fn active_buffer(&self) -> u32 {
        self.active
    }
}

impl Drop for Classifier {
    fn drop(&mut self) {
        self.detach_all();
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

/// Writes `new` into `buffer`, touching only what differs from `old` (what the buffer holds).
fn write_buffer(
    ebpf: &mut Ebpf,
    buffer: u32,
    new: &Compiled,
    old: Option<&Compiled>,
) -> Result<(), LoadError> {
    debug_assert!(buffer < BUFFERS);
    {
        let mut policy: Array<_, edge_classifier_common::Policy> =
            Array::try_from(ebpf.map_mut("POLICY").expect("POLICY")).map_err(map_err("POLICY"))?;
        policy
            .set(buffer, new.policy, 0)
            .map_err(map_err("POLICY"))?;
    }
    {
        let mut classes: Array<_, edge_classifier_common::RuleClass> =
            Array::try_from(ebpf.map_mut("CLASSES").expect("CLASSES"))
                .map_err(map_err("CLASSES"))?;
        for (id, class) in new.classes.iter().enumerate().skip(1) {
            let unchanged = old.and_then(|o| o.classes.get(id)) == Some(class);
            if !unchanged {
                classes
                    .set(buffer * MAX_CLASSES + id as u32, class, 0)
                    .map_err(map_err("CLASSES"))?;
            }
        }
    }
    {
        let mut ports: Array<_, PortEntry> =
            Array::try_from(ebpf.map_mut("PORTS").expect("PORTS")).map_err(map_err("PORTS"))?;
        let base = buffer * TRANSPORTS * PORT_SPACE;
        let zero = PortEntry::default();
        for (i, entry) in new.ports.iter().enumerate() {
            let before = old.map_or(&zero, |o| &o.ports[i]);
            if entry != before {
                ports
                    .set(base + i as u32, entry, 0)
                    .map_err(map_err("PORTS"))?;
            }
        }
    }
    let buffer_byte = buffer as u8;
    {
        let mut trie: LpmTrie<_, Lpm4, u64> =
            LpmTrie::try_from(ebpf.map_mut("SETS_V4").expect("SETS_V4"))
                .map_err(map_err("SETS_V4"))?;
        let key = |net: &IpNet| {
            let IpNet::V4(n) = net else {
                unreachable!("v4 list")
            };
            Key::new(
                LPM_BUFFER_BITS + n.prefix_len() as u32,
                Lpm4 {
                    buffer: buffer_byte,
                    addr: n.addr().octets(),
                },
            )
        };
        sync_trie(
            &mut trie,
            &new.prefixes_v4,
            old.map(|o| &o.prefixes_v4[..]),
            key,
            "SETS_V4",
        )?;
    }
    {
        let mut trie: LpmTrie<_, Lpm6, u64> =
            LpmTrie::try_from(ebpf.map_mut("SETS_V6").expect("SETS_V6"))
                .map_err(map_err("SETS_V6"))?;
        let key = |net: &IpNet| {
            let IpNet::V6(n) = net else {
                unreachable!("v6 list")
            };
            Key::new(
                LPM_BUFFER_BITS + n.prefix_len() as u32,
                Lpm6 {
                    buffer: buffer_byte,
                    addr: n.addr().octets(),
                },
            )
        };
        sync_trie(
            &mut trie,
            &new.prefixes_v6,
            old.map(|o| &o.prefixes_v6[..]),
            key,
            "SETS_V6",
        )?;
    }
    Ok(())
}

fn sync_trie<K: aya::Pod>(
    trie: &mut LpmTrie<&mut aya::maps::MapData, K, u64>,
    new: &[(IpNet, u64)],
    old: Option<&[(IpNet, u64)]>,
    key: impl Fn(&IpNet) -> Key<K>,
    name: &'static str,
) -> Result<(), LoadError> {
    let old: std::collections::HashMap<&IpNet, u64> = old
        .unwrap_or_default()
        .iter()
        .map(|(n, b)| (n, *b))
        .collect();
    for (net, bits) in new {
        if old.get(net) != Some(bits) {
            trie.insert(&key(net), bits, 0).map_err(map_err(name))?;
        }
    }
    let keep: std::collections::HashSet<&IpNet> = new.iter().map(|(n, _)| n).collect();
    for net in old.keys() {
        if !keep.contains(net) {
            trie.remove(&key(net)).map_err(map_err(name))?;
        }
    }
    Ok(())
}
