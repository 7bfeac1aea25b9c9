//! The kernel maps, however they were obtained: from a freshly loaded object, or opened from
//! their pins by another process (`reload`). Everything that reads or writes them lives here, so
//! the daemon and `reload` share one implementation of the double-buffered swap.

use std::collections::{BTreeSet, HashMap as StdHashMap, HashSet};

use aya::{
    Ebpf,
    maps::{
        Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, PerCpuValues, lpm_trie::Key,
    },
};
use edge_classifier_common::{
    AdmittedKey, BUFFERS, Bucket, BucketKey, BufferRecord, Counter, FlowKey, FlowKey4, FlowState,
    IFACE_SLOTS, IfaceInfo, InstanceRecord, LIMIT_BUCKETS, Locals, Lpm4, Lpm6, MAX_IFACES,
    PORT_SPACE, PolicyEntry, PortEntry, ProxyState, RECORD_CHUNK, RECORD_CHUNKS, RECORD_COMPLETE,
    RECORD_SETTLED, RECORD_WRITING, RuleClass, RuleLimit, Small4, Small6, StrideBlock,
    TRACKED_SLOT, TRANSPORTS, flow_stat, layout, limit_stat,
    monitor::{MONITOR_SLOTS, MonitorConfig, MonitorCpu},
    reason,
};
use ipnet::IpNet;

use crate::{
    compile::{AddressSets, Compiled},
    stride::Stride4,
};

/// Declares every map of the object once: its ELF name (the pin's name), the typed handle's
/// field, type and kind. The struct, the name list and both ways of opening the maps (from a
/// freshly loaded object, or from an instance's pins) come from this one list; aya checks the
/// key and value sizes against the kernel's once, when each handle is built.
macro_rules! maps {
    ($($name:literal => $field:ident: $ty:ty, $kind:ident;)*) => {
        /// Every map of the object, as typed handles.
        pub struct Maps {
            $($field: $ty,)*
        }

        /// Every map's name in the ELF, which is also its pin's name.
        pub const MAP_NAMES: &[&str] = &[$($name),*];

        impl Maps {
            /// Builds every handle from the map `open` gives for each name.
            fn build(mut open: impl FnMut(&'static str) -> Result<Map, MapsError>) -> Result<Maps, MapsError> {
                Ok(Maps {
                    $($field: <$ty>::try_from(open($name)?).map_err(err($name))?,)*
                })
            }

            /// Opens the maps pinned in `dir` (an instance's `maps/` directory).
            pub fn open_pinned(dir: &std::path::Path) -> Result<Maps, MapsError> {
                Maps::build(|name| {
                    let data = MapData::from_pin(dir.join(name)).map_err(err(name))?;
                    Ok(match name {
                        $($name => Map::$kind(data),)*
                        _ => unreachable!("every name is listed"),
                    })
                })
            }
        }
    };
}

/// The flow tables: the loader sizes them from the catalogue's `[flows] capacity` before load.
pub const FLOW_TABLES: [&str; 2] = ["FLOWS_V4", "FLOWS_V6"];

/// Whether `dir` holds an instance's pinned maps, all or some of them.
pub fn pinned_in(dir: &std::path::Path) -> bool {
    MAP_NAMES.iter().any(|n| dir.join(n).exists())
}

/// The maps of the object that have no pin in `dir`.
pub fn missing_pins(dir: &std::path::Path) -> Vec<&'static str> {
    MAP_NAMES
        .iter()
        .copied()
        .filter(|n| !dir.join(n).exists())
        .collect()
}

maps! {
    "ACTIVE" => active: Array<MapData, u32>, Array;
    "POLICY" => policy: Array<MapData, PolicyEntry>, Array;
    "IFACES" => ifaces: Array<MapData, IfaceInfo>, Array;
    "PORTS" => ports: Array<MapData, PortEntry>, Array;
    "CLASSES" => classes: Array<MapData, RuleClass>, Array;
    "SETS_V4" => sets_v4: LpmTrie<MapData, Lpm4, u64>, LpmTrie;
    "SETS_V6" => sets_v6: LpmTrie<MapData, Lpm6, u64>, LpmTrie;
    "LOCALS" => locals: Array<MapData, Locals>, Array;
    "SMALL_V4" => small_v4: Array<MapData, Small4>, Array;
    "SMALL_V6" => small_v6: Array<MapData, Small6>, Array;
    "STRIDE4_TOP" => stride4_top: Array<MapData, u32>, Array;
    "STRIDE4_BLOCKS" => stride4_blocks: Array<MapData, StrideBlock>, Array;
    "STRIDE4_LEAVES" => stride4_leaves: Array<MapData, u64>, Array;
    "STATS" => stats: PerCpuArray<MapData, Counter>, PerCpuArray;
    "FLOWS_V4" => flows_v4: HashMap<MapData, FlowKey4, FlowState>, LruHashMap;
    "FLOWS_V6" => flows_v6: HashMap<MapData, FlowKey, FlowState>, LruHashMap;
    "FLOW_STATS" => flow_stats: PerCpuArray<MapData, u64>, PerCpuArray;
    "IFACE_ADDRS_V4" => iface_addrs_v4: HashMap<MapData, u32, u32>, HashMap;
    "IFACE_ADDRS_V6" => iface_addrs_v6: HashMap<MapData, [u32; 4], u32>, HashMap;
    "TRACKED_PORTS" => tracked_ports: Array<MapData, u8>, Array;
    "RECORD" => record: Array<MapData, BufferRecord>, Array;
    "RECORD_TEXT" => record_text: HashMap<MapData, u32, [u8; RECORD_CHUNK]>, HashMap;
    "INSTANCE_RECORD" => instance_record: Array<MapData, InstanceRecord>, Array;
    "MONITOR_CONFIG" => monitor_config: Array<MapData, MonitorConfig>, Array;
    "MONITOR_CPU" => monitor_cpu: PerCpuArray<MapData, MonitorCpu>, PerCpuArray;
    "LIMITS" => limits: Array<MapData, RuleLimit>, Array;
    "BUCKETS" => buckets: HashMap<MapData, BucketKey, Bucket>, LruHashMap;
    "ADMITTED" => admitted: HashMap<MapData, AdmittedKey, u64>, LruHashMap;
    "LIMITED" => limited: PerCpuArray<MapData, u64>, PerCpuArray;
    "LIMIT_STATS" => limit_stats: PerCpuArray<MapData, u64>, PerCpuArray;
    "SYN_PROXY" => syn_proxy: Array<MapData, ProxyState>, Array;
    "SYN_PROXIED" => syn_proxied: PerCpuArray<MapData, u64>, PerCpuArray;
}

/// The ring buffers of the monitor slots, by slot. Pinned with the maps, but no `Maps` handle
/// holds them: each is read by the one monitor that holds its slot (the `monitor` module).
pub const MONITOR_RINGS: [&str; MONITOR_SLOTS as usize] = [
    "MONITOR_RING_0",
    "MONITOR_RING_1",
    "MONITOR_RING_2",
    "MONITOR_RING_3",
];

#[derive(Debug, thiserror::Error)]
#[error("map {map}: {source}")]
pub struct MapsError {
    pub map: &'static str,
    #[source]
    pub source: MapError,
}

fn err(map: &'static str) -> impl FnOnce(MapError) -> MapsError {
    move |source| MapsError { map, source }
}

/// Counters of one interface, summed over CPUs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IfaceStats {
    pub reasons: Vec<Counter>,
    /// In the order of the slots asked for.
    pub rules: Vec<Counter>,
}

/// The flow table's state, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FlowStats {
    /// Flows each family's table holds (IPv4 and IPv6 flows have a table each).
    pub capacity: u32,
    /// Entries in both tables now (live or idle but not yet removed).
    pub present: u64,
    pub present_v4: u64,
    pub present_v6: u64,
    pub created: u64,
    /// Removed: idled out, closed and replaced, or purged because a reload removed its rule.
    pub expired: u64,
    pub insert_failed: u64,
    /// Flows pushed out by the LRU to make room: neither expired nor present.
    pub evicted: u64,
}

/// The limits' token-bucket table, summed over CPUs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LimitStats {
    pub capacity: u32,
    /// Buckets held now (source prefixes and rules' totals).
    pub present: u64,
    pub created: u64,
    /// Buckets the LRU pushed out to make room: `created - present`.
    pub evicted: u64,
    /// UDP flows limited rules admitted, and those recorded now.
    pub admitted: u64,
    pub admitted_present: u64,
    /// New flows from exempt sets, passed without a token.
    pub exempt: u64,
    /// Per rule slot, the source prefixes whose bucket is empty now.
    pub limited_sources: StdHashMap<u32, u64>,
}

/// `bpf_jiffies64` as userspace estimates it: jiffies start at `INITIAL_JIFFIES` (5 minutes of
/// ticks before the 32-bit wrap) and advance with the coarse monotonic clock. The estimate runs
/// a fraction of a second ahead of the kernel's count (60 ticks at HZ 250 after 8 hours
/// here), so a bucket is read a little fuller than it is: a source is reported as limited only
/// while it clearly is.
fn jiffies() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    let hz = crate::compile::ticks_per_second();
    let initial = u64::from((-(300 * hz as i64)) as u32);
    initial + ts.tv_sec as u64 * hz + ts.tv_nsec as u64 * hz / 1_000_000_000
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

/// What a rule buffer holds before it is written.
#[derive(Clone, Copy)]
pub enum Holds<'a> {
    /// Nothing: freshly created maps.
    Empty,
    /// Unknown (an interrupted reload): cleared before writing.
    Unknown,
    Compiled(&'a Compiled),
}

impl<'a> Holds<'a> {
    pub fn from(c: Option<&'a Compiled>) -> Holds<'a> {
        c.map_or(Holds::Unknown, Holds::Compiled)
    }
    fn compiled(self) -> Option<&'a Compiled> {
        match self {
            Holds::Compiled(c) => Some(c),
            _ => None,
        }
    }
}

impl Maps {
    /// Takes every map out of a loaded object (the programs keep their references).
    pub fn take(ebpf: &mut Ebpf) -> Result<Maps, MapsError> {
        Maps::build(|name| {
            ebpf.take_map(name).ok_or_else(|| {
                err(name)(MapError::InvalidName {
                    name: name.to_string(),
                })
            })
        })
    }

    pub fn active(&self) -> Result<u32, MapsError> {
        let a = &self.active;
        Ok(a.get(&0, 0).map_err(err("ACTIVE"))? & 1)
    }

    /// Flips the program to `buffer`. The bits above bit 0 count flips and flow purges: the
    /// program's per-CPU reply caches drop what they hold when the word changes.
    pub fn set_active(&mut self, buffer: u32) -> Result<(), MapsError> {
        self.bump_active(|word| (word & !1).wrapping_add(2) | buffer)
    }

    fn bump_active(&mut self, next: impl Fn(u32) -> u32) -> Result<(), MapsError> {
        let a = &mut self.active;
        let word = a.get(&0, 0).map_err(err("ACTIVE"))?;
        a.set(0, next(word), 0).map_err(err("ACTIVE"))
    }

    /// Capacity of each flow table as the kernel made it.
    pub fn flow_capacity(&self) -> Result<u32, MapsError> {
        use aya::maps::IterableMap as _;
        Ok(self
            .flows_v4
            .map()
            .info()
            .map_err(err("FLOWS_V4"))?
            .max_entries())
    }

    /// What `buffer` is recorded to hold.
    pub fn record(&self, buffer: u32) -> Result<BufferRecord, MapsError> {
        self.record.get(&(buffer & 1), 0).map_err(err("RECORD"))
    }

    /// Marks `buffer` as being written: from now until [`Maps::write_description`] it holds
    /// nothing anyone may trust or flip to.
    pub fn begin_buffer(&mut self, buffer: u32) -> Result<(), MapsError> {
        let mut r = self.record(buffer)?;
        r.state = RECORD_WRITING;
        self.record.set(buffer & 1, r, 0).map_err(err("RECORD"))
    }

    /// Records what `buffer` now holds: `description` (its chunks first, then the record that
    /// vouches for them with their digest), and the reload count once it is active.
    pub fn write_description(
        &mut self,
        buffer: u32,
        description: &[u8],
        reloads: u64,
    ) -> Result<(), MapsError> {
        use sha2::Digest as _;
        let buffer = buffer & 1;
        let before = self.record(buffer)?;
        let chunks = description.len().div_ceil(RECORD_CHUNK) as u32;
        if chunks > RECORD_CHUNKS {
            return Err(err("RECORD_TEXT")(MapError::OutOfBounds {
                index: chunks,
                max_entries: RECORD_CHUNKS,
            }));
        }
        for (i, part) in description.chunks(RECORD_CHUNK).enumerate() {
            let mut chunk = [0u8; RECORD_CHUNK];
            chunk[..part.len()].copy_from_slice(part);
            self.record_text
                .insert(chunk_key(buffer, i as u32), chunk, 0)
                .map_err(err("RECORD_TEXT"))?;
        }
        for stale in chunks..before.chunks {
            let _ = self.record_text.remove(&chunk_key(buffer, stale));
        }
        let record = BufferRecord {
            state: RECORD_COMPLETE,
            chunks,
            len: description.len() as u64,
            digest: sha2::Sha256::digest(description).into(),
            reloads,
            loaded_at_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        };
        self.record.set(buffer, record, 0).map_err(err("RECORD"))
    }

    /// The description `buffer` holds, if it is complete and its chunks match their digest.
    pub fn read_description(&self, buffer: u32) -> Result<Option<Vec<u8>>, MapsError> {
        use sha2::Digest as _;
        let buffer = buffer & 1;
        let r = self.record(buffer)?;
        if r.state < RECORD_COMPLETE || r.chunks > RECORD_CHUNKS {
            return Ok(None);
        }
        let mut out = Vec::with_capacity(r.len as usize);
        for i in 0..r.chunks {
            match self.record_text.get(&chunk_key(buffer, i), 0) {
                Ok(chunk) => out.extend_from_slice(&chunk),
                Err(MapError::KeyNotFound) => return Ok(None),
                Err(e) => return Err(err("RECORD_TEXT")(e)),
            }
        }
        out.truncate(r.len as usize);
        let digest: [u8; 32] = sha2::Sha256::digest(&out).into();
        Ok((digest == r.digest).then_some(out))
    }

    /// `buffer` is active and the flows of the rules it dropped are gone.
    pub fn settle(&mut self, buffer: u32) -> Result<(), MapsError> {
        let mut r = self.record(buffer)?;
        if r.state == RECORD_COMPLETE {
            r.state = RECORD_SETTLED;
            self.record.set(buffer & 1, r, 0).map_err(err("RECORD"))?;
        }
        Ok(())
    }

    pub fn instance_record(&self) -> Result<InstanceRecord, MapsError> {
        self.instance_record
            .get(&0, 0)
            .map_err(err("INSTANCE_RECORD"))
    }

    pub fn set_instance_record(&mut self, r: InstanceRecord) -> Result<(), MapsError> {
        self.instance_record
            .set(0, r, 0)
            .map_err(err("INSTANCE_RECORD"))
    }

    /// Every bound interface the program knows (ifindex, role bit, counter block, mode).
    pub fn ifaces(&self) -> Result<Vec<IfaceInfo>, MapsError> {
        let mut out = Vec::new();
        for i in 0..IFACE_SLOTS {
            let info = self.ifaces.get(&i, 0).map_err(err("IFACES"))?;
            if info.ifindex != 0 {
                out.push(info);
            }
        }
        Ok(out)
    }

    /// Forgets a binding: the program treats `ifindex` as unbound again.
    pub fn clear_iface(&mut self, ifindex: u32) -> Result<(), MapsError> {
        if self.iface(ifindex)?.ifindex == ifindex {
            let a = &mut self.ifaces;
            a.set(ifindex % IFACE_SLOTS, IfaceInfo::default(), 0)
                .map_err(err("IFACES"))?;
        }
        Ok(())
    }

    /// Records the XDP mode `ifindex` was attached in.
    pub fn set_iface_mode(&mut self, ifindex: u32, mode: u32) -> Result<(), MapsError> {
        let mut info = self.iface(ifindex)?;
        if info.ifindex == ifindex {
            info.mode = mode;
            self.set_iface(info)?;
        }
        Ok(())
    }

    /// Writes a binding. The monitor slots watching the NIC stay as they are (they are the
    /// monitors' to set, `set_iface_monitors`), unless the slot held another NIC.
    pub fn set_iface(&mut self, mut info: IfaceInfo) -> Result<(), MapsError> {
        let old = self.iface(info.ifindex)?;
        info.monitors = if old.ifindex == info.ifindex {
            old.monitors
        } else {
            0
        };
        let a = &mut self.ifaces;
        a.set(info.ifindex % IFACE_SLOTS, info, 0)
            .map_err(err("IFACES"))
    }

    /// Sets or clears monitor slot `slot`'s bit on NIC `ifindex`; false when it is not bound.
    pub fn set_iface_monitor(
        &mut self,
        ifindex: u32,
        slot: u32,
        on: bool,
    ) -> Result<bool, MapsError> {
        let mut info = self.iface(ifindex)?;
        if info.ifindex != ifindex || info.block == 0 {
            return Ok(false);
        }
        let bit = 1u32 << slot;
        let want = if on {
            info.monitors | bit
        } else {
            info.monitors & !bit
        };
        if want != info.monitors {
            info.monitors = want;
            let a = &mut self.ifaces;
            a.set(ifindex % IFACE_SLOTS, info, 0)
                .map_err(err("IFACES"))?;
        }
        Ok(true)
    }

    pub fn monitor_config(&self, slot: u32) -> Result<MonitorConfig, MapsError> {
        let a = &self.monitor_config;
        a.get(&slot, 0).map_err(err("MONITOR_CONFIG"))
    }

    pub fn set_monitor_config(&mut self, slot: u32, c: MonitorConfig) -> Result<(), MapsError> {
        let a = &mut self.monitor_config;
        a.set(slot, c, 0).map_err(err("MONITOR_CONFIG"))
    }

    /// Events a monitor slot did not deliver, by `LOST_*`, summed over CPUs.
    pub fn monitor_lost(&self, slot: u32) -> Result<[u64; 2], MapsError> {
        let a = &self.monitor_cpu;
        let per_cpu = a.get(&slot, 0).map_err(err("MONITOR_CPU"))?;
        let mut out = [0u64; 2];
        for c in per_cpu.iter() {
            out[0] += c.lost[0];
            out[1] += c.lost[1];
        }
        Ok(out)
    }

    /// Makes `IFACE_ADDRS_V4/V6` hold exactly `addrs` (address → ifindex): new ones are added
    /// before stale ones go, so an address that stays is never missing. Returns (added, removed).
    pub fn set_iface_addrs(
        &mut self,
        addrs: &std::collections::BTreeMap<std::net::IpAddr, u32>,
    ) -> Result<(usize, usize), MapsError> {
        use std::net::IpAddr;
        let want4: StdHashMap<u32, u32> = addrs
            .iter()
            .filter_map(|(a, i)| match a {
                IpAddr::V4(v4) => Some((u32::from_ne_bytes(v4.octets()), *i)),
                IpAddr::V6(_) => None,
            })
            .collect();
        let want6: StdHashMap<[u32; 4], u32> = addrs
            .iter()
            .filter_map(|(a, i)| match a {
                IpAddr::V6(v6) => Some((v6_words(v6.octets()), *i)),
                IpAddr::V4(_) => None,
            })
            .collect();
        let (a4, r4) = sync_hash(&mut self.iface_addrs_v4, "IFACE_ADDRS_V4", &want4)?;
        let (a6, r6) = sync_hash(&mut self.iface_addrs_v6, "IFACE_ADDRS_V6", &want6)?;
        Ok((a4 + a6, r4 + r6))
    }

    /// What `IFACE_ADDRS_V4/V6` hold.
    pub fn iface_addrs(
        &self,
    ) -> Result<std::collections::BTreeMap<std::net::IpAddr, u32>, MapsError> {
        let mut out = std::collections::BTreeMap::new();
        let v4 = &self.iface_addrs_v4;
        for kv in v4.iter() {
            let (k, v) = kv.map_err(err("IFACE_ADDRS_V4"))?;
            out.insert(std::net::IpAddr::from(k.to_ne_bytes()), v);
        }
        let v6 = &self.iface_addrs_v6;
        for kv in v6.iter() {
            let (k, v) = kv.map_err(err("IFACE_ADDRS_V6"))?;
            let mut octets = [0u8; 16];
            for (i, w) in k.iter().enumerate() {
                octets[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            out.insert(std::net::IpAddr::from(octets), v);
        }
        Ok(out)
    }

    pub fn iface(&self, ifindex: u32) -> Result<IfaceInfo, MapsError> {
        let a = &self.ifaces;
        a.get(&(ifindex % IFACE_SLOTS), 0).map_err(err("IFACES"))
    }

    /// Counters of one counter block, summed over CPUs: every reason, then `slots` in order.
    pub fn iface_stats(&self, block: u32, slots: &[u32]) -> Result<IfaceStats, MapsError> {
        let stats = &self.stats;
        let read = |i: u32| -> Result<Counter, MapsError> {
            let per_cpu = stats
                .get(&layout::stats(block, i), 0)
                .map_err(err("STATS"))?;
            Ok(per_cpu.iter().fold(Counter::default(), |a, c| Counter {
                packets: a.packets + c.packets,
                bytes: a.bytes + c.bytes,
            }))
        };
        Ok(IfaceStats {
            reasons: (0..reason::COUNT).map(read).collect::<Result<_, _>>()?,
            rules: slots
                .iter()
                .map(|s| read(layout::rule_counter(*s)))
                .collect::<Result<_, _>>()?,
        })
    }

    /// Zeroes the counters of `slots` in every block, and their rate-limited counts: a slot given
    /// to a new rule starts at 0.
    pub fn zero_slots(&mut self, slots: &BTreeSet<u32>) -> Result<(), MapsError> {
        if slots.is_empty() {
            return Ok(());
        }
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| {
            err("STATS")(MapError::SyscallError(aya::sys::SyscallError {
                call: "nr_cpus",
                io_error: e,
            }))
        })?;
        let stats = &mut self.stats;
        for block in 0..MAX_IFACES {
            for slot in slots {
                let zero = PerCpuValues::try_from(vec![Counter::default(); cpus]).map_err(|e| {
                    err("STATS")(MapError::SyscallError(aya::sys::SyscallError {
                        call: "per-cpu values",
                        io_error: e,
                    }))
                })?;
                stats
                    .set(layout::stats(block, layout::rule_counter(*slot)), zero, 0)
                    .map_err(err("STATS"))?;
            }
        }
        // The new flows a limit refused, per slot (not per interface).
        for slot in slots {
            let zero = || {
                PerCpuValues::try_from(vec![0u64; cpus]).map_err(|e| {
                    err("LIMITED")(MapError::SyscallError(aya::sys::SyscallError {
                        call: "per-cpu values",
                        io_error: e,
                    }))
                })
            };
            self.limited
                .set(*slot, zero()?, 0)
                .map_err(err("LIMITED"))?;
            // The SYNs its proxy answered, and its stamps: a new rule's proxy starts idle.
            self.syn_proxied
                .set(*slot, zero()?, 0)
                .map_err(err("SYN_PROXIED"))?;
            self.syn_proxy
                .set(*slot, ProxyState::default(), 0)
                .map_err(err("SYN_PROXY"))?;
        }
        Ok(())
    }

    /// The flow table: occupancy and events, summed over CPUs.
    pub fn flow_stats(&self) -> Result<FlowStats, MapsError> {
        let stats = &self.flow_stats;
        let read = |i: u32| -> Result<u64, MapsError> {
            Ok(stats.get(&i, 0).map_err(err("FLOW_STATS"))?.iter().sum())
        };
        // Keys may vanish while we walk; a failed step just ends the count.
        let v4 = &self.flows_v4;
        let present_v4 = v4.keys().take_while(Result::is_ok).count() as u64;
        let v6 = &self.flows_v6;
        let present_v6 = v6.keys().take_while(Result::is_ok).count() as u64;
        let present = present_v4 + present_v6;
        let created = read(flow_stat::CREATED)?;
        let expired = read(flow_stat::EXPIRED)?;
        Ok(FlowStats {
            capacity: self.flow_capacity()?,
            present,
            present_v4,
            present_v6,
            created,
            expired,
            insert_failed: read(flow_stat::INSERT_FAILED)?,
            evicted: created.saturating_sub(expired).saturating_sub(present),
        })
    }

    /// Every recorded flow of both families (a walk of the tables: for inspection, not the hot
    /// path).
    pub fn flows(&self) -> Result<Vec<Flow>, MapsError> {
        let v4 = &self.flows_v4;
        let v6 = &self.flows_v6;
        Ok(v4
            .iter()
            .filter_map(Result::ok)
            .map(|(key, state)| Flow {
                key: key.into(),
                state,
            })
            .chain(
                v6.iter()
                    .filter_map(Result::ok)
                    .map(|(key, state)| Flow { key, state }),
            )
            .collect())
    }

    /// Records a flow as the egress program would (for tests and dry runs).
    pub fn insert_flow(&mut self, key: &FlowKey, state: &FlowState) -> Result<(), MapsError> {
        if state.slot == TRACKED_SLOT {
            // As egress tracking does: the program looks up flows no rule covers only from
            // ports marked here.
            let transport = u32::from(key.transport);
            self.tracked_ports
                .set(layout::tracked_port(transport, key.remote_port), 1, 0)
                .map_err(err("TRACKED_PORTS"))?;
        }
        match key.v4() {
            Some(k) => {
                let flows = &mut self.flows_v4;
                flows.insert(k, state, 0).map_err(err("FLOWS_V4"))
            }
            None => {
                let flows = &mut self.flows_v6;
                flows.insert(key, state, 0).map_err(err("FLOWS_V6"))
            }
        }
    }

    /// Removes the flows of rules that are gone (their slot may be given to a new rule), and
    /// counts them as expired so evictions stay `created - expired - present`.
    pub fn purge_flows(&mut self, keep_slots: &BTreeSet<u32>) -> Result<u64, MapsError> {
        self.purge_flows_where(|f| !keep_slots.contains(&f.state.slot))
    }

    /// Removes the flows of `new`'s outbound rules whose remote address is no longer in the
    /// rule's remote set (a DNS refresh took it out), as a removed rule's flows are: their
    /// replies are dropped as `not_established` from then on.
    pub fn purge_flows_left(&mut self, new: &Compiled) -> Result<u64, MapsError> {
        let remote: StdHashMap<u32, u64> = new
            .rules
            .iter()
            .filter(|r| r.matcher.flags & edge_classifier_common::RULE_OUTBOUND != 0)
            .map(|r| (r.slot, r.matcher.remote_mask))
            .collect();
        let sets = AddressSets::new(new);
        self.purge_flows_where(|f| {
            remote
                .get(&f.state.slot)
                .is_some_and(|mask| sets.bits(f.remote().ip()) & mask == 0)
        })
    }

    /// Removes the flows `stale` picks, counted as expired.
    fn purge_flows_where(&mut self, stale: impl Fn(&Flow) -> bool) -> Result<u64, MapsError> {
        let stale: Vec<FlowKey> = self
            .flows()?
            .into_iter()
            .filter(|f| stale(f))
            .map(|f| f.key)
            .collect();
        let mut removed = 0u64;
        {
            let v4 = &mut self.flows_v4;
            for k in stale.iter().filter_map(FlowKey::v4) {
                if v4.remove(&k).is_ok() {
                    removed += 1;
                }
            }
        }
        {
            let v6 = &mut self.flows_v6;
            for k in stale.iter().filter(|k| k.family == 6) {
                if v6.remove(k).is_ok() {
                    removed += 1;
                }
            }
        }
        if removed > 0 {
            // Replies of the removed flows may sit in the program's reply caches.
            self.bump_active(|word| word.wrapping_add(2))?;
            let stats = &mut self.flow_stats;
            let mut values: Vec<u64> = stats
                .get(&flow_stat::EXPIRED, 0)
                .map_err(err("FLOW_STATS"))?
                .iter()
                .copied()
                .collect();
            values[0] += removed;
            let values = PerCpuValues::try_from(values).expect("one value per CPU, as read");
            stats
                .set(flow_stat::EXPIRED, values, 0)
                .map_err(err("FLOW_STATS"))?;
        }
        Ok(removed)
    }

    /// Writes `new` into `buffer`, touching only what differs from what the buffer holds.
    /// A buffer of unknown contents is cleared first.
    pub fn write_buffer(
        &mut self,
        buffer: u32,
        new: &Compiled,
        holds: Holds,
    ) -> Result<(), MapsError> {
        debug_assert!(buffer < BUFFERS);
        if let Holds::Unknown = holds {
            self.clear_buffer(buffer)?;
        }
        let old = holds.compiled();
        self.policy
            .set(buffer, new.policy, 0)
            .map_err(err("POLICY"))?;
        self.locals
            .set(buffer, new.locals, 0)
            .map_err(err("LOCALS"))?;
        self.small_v4
            .set(buffer, new.small_v4, 0)
            .map_err(err("SMALL_V4"))?;
        self.small_v6
            .set(buffer, new.small_v6, 0)
            .map_err(err("SMALL_V6"))?;
        if let Some(stride) = &new.stride_v4 {
            self.write_stride(buffer, stride, old.and_then(|o| o.stride_v4.as_ref()))?;
        }
        Self::write_changed(
            &mut self.classes,
            "CLASSES",
            layout::class(buffer, 0),
            &new.classes,
            old.map(|o| &o.classes[..]),
        )?;
        {
            let ports = &mut self.ports;
            let base = layout::port(buffer, 0, 0);
            for i in 0..new.ports.len() {
                // The entry carries a copy of a class's rule: compared whole, so that a class
                // whose rule changed under the same id is written too.
                let entry = new.port_entry(i);
                if old.map_or(PortEntry::default(), |o| o.port_entry(i)) != entry {
                    ports.set(base + i as u32, entry, 0).map_err(err("PORTS"))?;
                }
            }
        }
        self.write_limits(buffer, new)?;
        self.write_tries(buffer, new, old)
    }

    /// Writes the limited rules' budgets. Only rules flagged `RULE_LIMITED` in this buffer are
    /// read, so an entry a rule no longer needs is harmless; it is zeroed all the same.
    fn write_limits(&mut self, buffer: u32, new: &Compiled) -> Result<(), MapsError> {
        let limits = &mut self.limits;
        for r in &new.rules {
            let entry = r.limit.as_ref().map_or(RuleLimit::default(), |l| l.entry);
            let index = layout::limit(buffer, r.slot);
            if limits.get(&index, 0).map_err(err("LIMITS"))? != entry {
                limits.set(index, entry, 0).map_err(err("LIMITS"))?;
            }
        }
        Ok(())
    }

    /// Every token bucket (a walk of the table: for inspection and tests, not the hot path).
    pub fn buckets(&self) -> Vec<(BucketKey, Bucket)> {
        self.buckets.iter().map_while(Result::ok).collect()
    }

    /// Writes a token bucket as the program would (for tests: a bucket primed with an older
    /// stamp shows the refill without waiting for the clock).
    pub fn set_bucket(&mut self, key: &BucketKey, bucket: &Bucket) -> Result<(), MapsError> {
        self.buckets.insert(key, bucket, 0).map_err(err("BUCKETS"))
    }

    /// New flows each rule slot's limit refused, summed over CPUs, in the order of `slots`.
    pub fn limited(&self, slots: &[u32]) -> Result<Vec<u64>, MapsError> {
        slots
            .iter()
            .map(|s| Ok(self.limited.get(s, 0).map_err(err("LIMITED"))?.iter().sum()))
            .collect()
    }

    /// SYNs each rule slot's proxy answered from XDP with a SYN cookie, summed over CPUs, in
    /// the order of `slots`.
    pub fn syn_proxied(&self, slots: &[u32]) -> Result<Vec<u64>, MapsError> {
        slots
            .iter()
            .map(|s| {
                Ok(self
                    .syn_proxied
                    .get(s, 0)
                    .map_err(err("SYN_PROXIED"))?
                    .iter()
                    .sum())
            })
            .collect()
    }

    /// A rule slot's proxy state (`active_until`, `syn_passed` in `bpf_jiffies64` ticks).
    pub fn syn_proxy_state(&self, slot: u32) -> Result<ProxyState, MapsError> {
        self.syn_proxy.get(&slot, 0).map_err(err("SYN_PROXY"))
    }

    /// Writes a rule slot's proxy state (for tests: an older stamp shows the pass-through
    /// without waiting for the clock).
    pub fn set_syn_proxy_state(&mut self, slot: u32, st: ProxyState) -> Result<(), MapsError> {
        self.syn_proxy.set(slot, st, 0).map_err(err("SYN_PROXY"))
    }

    /// The token-bucket table: occupancy, evictions, and per rule slot the source prefixes
    /// whose bucket is empty now (sources being limited).
    pub fn limit_stats(&self, limits: &[(u32, RuleLimit)]) -> Result<LimitStats, MapsError> {
        let read = |i: u32| -> Result<u64, MapsError> {
            Ok(self
                .limit_stats
                .get(&i, 0)
                .map_err(err("LIMIT_STATS"))?
                .iter()
                .sum())
        };
        let now = jiffies();
        let mut present = 0u64;
        let mut empty: StdHashMap<u32, u64> = StdHashMap::new();
        // Entries may vanish while we walk; a failed step just ends the walk.
        for (key, bucket) in self.buckets.iter().map_while(Result::ok) {
            present += 1;
            if key.family == 0 {
                continue;
            }
            let Some((_, l)) = limits
                .iter()
                .find(|(s, l)| *s == key.slot && l.generation == key.generation)
            else {
                continue;
            };
            let b = &l.per_source;
            let elapsed = now.saturating_sub(bucket.stamp);
            let tokens = if elapsed >= b.fill_ticks {
                b.cap
            } else {
                (bucket.tokens + elapsed * b.refill).min(b.cap)
            };
            if tokens < b.cost {
                *empty.entry(key.slot).or_default() += 1;
            }
        }
        let created = read(limit_stat::BUCKET_CREATED)?;
        Ok(LimitStats {
            capacity: LIMIT_BUCKETS,
            present,
            created,
            evicted: created.saturating_sub(present),
            admitted: read(limit_stat::ADMITTED)?,
            admitted_present: self.admitted.keys().map_while(Result::ok).count() as u64,
            exempt: read(limit_stat::EXEMPT)?,
            limited_sources: empty,
        })
    }

    /// Writes a buffer's prefixes into the LPM tries: what a buffer's trie holds is always
    /// `trie_v4()`/`trie_v6()` of its last catalogue, so only the difference is written.
    fn write_tries(
        &mut self,
        buffer: u32,
        new: &Compiled,
        old: Option<&Compiled>,
    ) -> Result<(), MapsError> {
        let b = buffer as u8;
        {
            let trie = &mut self.sets_v4;
            let key = |net: &IpNet| {
                let IpNet::V4(n) = net else {
                    unreachable!("v4 list")
                };
                Key::new(
                    layout::lpm_prefix_len(n.prefix_len() as u32),
                    Lpm4 {
                        buffer: b,
                        _pad: [0; 3],
                        addr: n.addr().octets(),
                    },
                )
            };
            sync_trie(
                trie,
                new.trie_v4(),
                old.map(Compiled::trie_v4),
                key,
                "SETS_V4",
            )?;
        }
        {
            let trie = &mut self.sets_v6;
            let key = |net: &IpNet| {
                let IpNet::V6(n) = net else {
                    unreachable!("v6 list")
                };
                Key::new(
                    layout::lpm_prefix_len(n.prefix_len() as u32),
                    Lpm6 {
                        buffer: b,
                        _pad: [0; 3],
                        addr: n.addr().octets(),
                    },
                )
            };
            sync_trie(
                trie,
                new.trie_v6(),
                old.map(Compiled::trie_v6),
                key,
                "SETS_V6",
            )?;
        }
        Ok(())
    }

    /// Writes a buffer's IPv4 stride table: only what differs from `old`, when the region
    /// holds that (its last catalogue had a stride table too), else all of it (the region may
    /// hold an older table; and with `0.0.0.0/0` always in the table no entry is ever zero).
    fn write_stride(
        &mut self,
        buffer: u32,
        new: &Stride4,
        old: Option<&Stride4>,
    ) -> Result<(), MapsError> {
        Self::write_changed(
            &mut self.stride4_top,
            "STRIDE4_TOP",
            layout::stride_top(buffer, 0),
            &new.top,
            old.map(|o| &o.top[..]),
        )?;
        Self::write_changed(
            &mut self.stride4_blocks,
            "STRIDE4_BLOCKS",
            layout::stride_block(buffer, 0),
            &new.blocks,
            old.map(|o| &o.blocks[..]),
        )?;
        Self::write_changed(
            &mut self.stride4_leaves,
            "STRIDE4_LEAVES",
            layout::stride_leaf(buffer, 0),
            &new.leaves,
            old.map(|o| &o.leaves[..]),
        )
    }

    /// Writes `new` into `array` (named `name`) from index `base`, skipping the entries equal to what
    /// `old` says is there.
    fn write_changed<T: aya::Pod + PartialEq>(
        array: &mut Array<MapData, T>,
        name: &'static str,
        base: u32,
        new: &[T],
        old: Option<&[T]>,
    ) -> Result<(), MapsError> {
        for (i, v) in new.iter().enumerate() {
            if old.and_then(|o| o.get(i)) != Some(v) {
                array.set(base + i as u32, v, 0).map_err(err(name))?;
            }
        }
        Ok(())
    }

    /// Empties a buffer whose contents are unknown (an interrupted reload): no port leads to a
    /// class and no prefix of it is left in the tries.
    fn clear_buffer(&mut self, buffer: u32) -> Result<(), MapsError> {
        {
            let ports = &mut self.ports;
            let base = layout::port(buffer, 0, 0);
            for i in 0..TRANSPORTS * PORT_SPACE {
                if ports.get(&(base + i), 0).map_err(err("PORTS"))? != PortEntry::default() {
                    ports
                        .set(base + i, PortEntry::default(), 0)
                        .map_err(err("PORTS"))?;
                }
            }
        }
        {
            let trie = &mut self.sets_v4;
            let stale: Vec<Key<Lpm4>> = trie
                .keys()
                .filter_map(Result::ok)
                .filter(|k| k.data().buffer == buffer as u8)
                .collect();
            for k in stale {
                trie.remove(&k).map_err(err("SETS_V4"))?;
            }
        }
        {
            let trie = &mut self.sets_v6;
            let stale: Vec<Key<Lpm6>> = trie
                .keys()
                .filter_map(Result::ok)
                .filter(|k| k.data().buffer == buffer as u8)
                .collect();
            for k in stale {
                trie.remove(&k).map_err(err("SETS_V6"))?;
            }
        }
        Ok(())
    }

    /// The first half of a reload: `new` goes into `target` (the inactive buffer, which holds
    /// `inactive_old`) and the slots new to it are zeroed. The buffer is recorded as being
    /// written until the caller records what it holds ([`Maps::write_description`]).
    pub fn prepare(
        &mut self,
        target: u32,
        new: &Compiled,
        inactive_old: Holds,
        active_old: Option<&Compiled>,
    ) -> Result<(), MapsError> {
        self.begin_buffer(target)?;
        self.write_buffer(target, new, inactive_old)?;
        let before: HashSet<u32> = active_old
            .map(|o| o.rules.iter().map(|r| r.slot).collect())
            .unwrap_or_default();
        let fresh: BTreeSet<u32> = new
            .rules
            .iter()
            .map(|r| r.slot)
            .filter(|s| !before.contains(s))
            .collect();
        self.zero_slots(&fresh)
    }

    /// The second half: one word flips the program to `target`, then the flows of rules that
    /// are gone are purged and the buffer is recorded as settled. Every step may be repeated:
    /// a reload killed after the flip is completed by running this again.
    pub fn activate(&mut self, target: u32, new: &Compiled) -> Result<(), MapsError> {
        if self.active()? != target {
            self.set_active(target)?;
        }
        // The buffer flipped away from is no longer the settled one.
        let mut other = self.record(1 - target)?;
        if other.state == RECORD_SETTLED {
            other.state = RECORD_COMPLETE;
            self.record
                .set(1 - target, other, 0)
                .map_err(err("RECORD"))?;
        }
        self.purge_flows(&new.flow_slots())?;
        self.settle(target)
    }

    /// The whole reload, for callers that keep no description (tests, dry runs). Returns the
    /// buffer now active.
    pub fn swap_in(
        &mut self,
        new: &Compiled,
        inactive_old: Holds,
        active_old: Option<&Compiled>,
    ) -> Result<u32, MapsError> {
        let target = 1 - self.active()?;
        self.prepare(target, new, inactive_old, active_old)?;
        self.activate(target, new)?;
        Ok(target)
    }
}

/// `RECORD_TEXT` key of chunk `i` of `buffer`'s description.
fn chunk_key(buffer: u32, i: u32) -> u32 {
    (buffer << 16) | i
}

/// Takes an inactive buffer's entries in `trie` from `old` to `new`. What goes or changes is
/// removed first, then what comes or changed is inserted: the trie is shared by both buffers
/// and sized for two full ones, so it never holds more than the running buffer's entries and
/// the new ones (inserting first took it to three buffers' worth, and ENOSPC, with both full).
/// A changed entry is removed and inserted rather than replaced, since a full trie refuses
/// even a replacement on kernels before 6.14. Nothing looks the buffer up meanwhile.
fn sync_trie<K: aya::Pod>(
    trie: &mut LpmTrie<MapData, K, u64>,
    new: &[(IpNet, u64)],
    old: Option<&[(IpNet, u64)]>,
    key: impl Fn(&IpNet) -> Key<K>,
    name: &'static str,
) -> Result<(), MapsError> {
    let want: StdHashMap<&IpNet, u64> = new.iter().map(|(n, b)| (n, *b)).collect();
    let old: StdHashMap<&IpNet, u64> = old
        .unwrap_or_default()
        .iter()
        .map(|(n, b)| (n, *b))
        .collect();
    for (net, bits) in &old {
        if want.get(net) != Some(bits) {
            trie.remove(&key(net)).map_err(err(name))?;
        }
    }
    for (net, bits) in new {
        if old.get(net) != Some(bits) {
            trie.insert(&key(net), bits, 0).map_err(err(name))?;
        }
    }
    Ok(())
}

/// An IPv6 address as the data plane's `IFACE_ADDRS_V6` key: its bytes in four u32 words.
fn v6_words(o: [u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
        u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
        u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
        u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
    ]
}

/// Makes a hash map hold exactly `want`: inserts first, then removes what is not wanted.
fn sync_hash<K: aya::Pod + Eq + std::hash::Hash>(
    h: &mut HashMap<MapData, K, u32>,
    name: &'static str,
    want: &StdHashMap<K, u32>,
) -> Result<(usize, usize), MapsError> {
    let have: StdHashMap<K, u32> = h.iter().collect::<Result<_, _>>().map_err(err(name))?;
    let mut added = 0;
    for (k, v) in want {
        if have.get(k) != Some(v) {
            h.insert(k, v, 0).map_err(err(name))?;
            added += 1;
        }
    }
    let mut removed = 0;
    for k in have.keys().filter(|k| !want.contains_key(k)) {
        h.remove(k).map_err(err(name))?;
        removed += 1;
    }
    Ok((added, removed))
}
