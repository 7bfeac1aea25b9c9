//! One read of every counter of a running classifier: what `/metrics` renders and what
//! `edge-classifier stats` prints, so the two can never disagree.

use std::{
    collections::BTreeMap,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use edge_classifier_common::{SET_PROTECTED, reason};
use serde::{Deserialize, Serialize};

use crate::{
    compile::Compiled,
    instance::Reloads,
    loader::{Classifier, LoadError},
    maps::{FlowStats, Maps, MapsError},
};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub version: String,
    /// When the counters were read, in seconds since the Unix epoch.
    pub taken: f64,
    /// How long reading the maps took.
    pub read_seconds: f64,
    pub catalogue: CatalogueInfo,
    pub reloads: Reloads,
    pub interfaces: Vec<Interface>,
    pub flows: FlowStats,
    /// The sets' DNS names (`[sets.NAME] domains`, `hosts`) as the daemon resolves them.
    #[serde(default)]
    pub dns: Vec<NameStatus>,
    /// The monitors (`edge-classifier monitor`, `/events`) and the events they missed.
    #[serde(default)]
    pub monitors: MonitorStats,
    /// Rules with a `limit`, and the token-bucket table.
    #[serde(default)]
    pub limits: Limits,
}

/// Monitor slots in use and the events the kernel could not deliver to them, every slot
/// together, since the maps were created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MonitorStats {
    pub attached: u32,
    pub lost_rate_limit: u64,
    pub lost_ring_full: u64,
}

/// The limits on new flows: per limited rule, what was refused and how many sources are held
/// back now; the bucket table's occupancy and evictions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub rules: Vec<LimitedRule>,
    pub bucket_capacity: u32,
    pub buckets: u64,
    pub buckets_evicted: u64,
    /// UDP flows limited rules admitted, in all and recorded now.
    pub admitted_udp_flows: u64,
    pub admitted_udp_flows_present: u64,
    /// New flows from exempt sets, passed without a token.
    pub exempt: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitedRule {
    pub id: String,
    /// The limit as the catalogue gives it.
    pub limit: String,
    /// New flows over the limit (dropped, or passed in monitor mode), on every interface.
    pub limited: u64,
    /// Source prefixes whose bucket is empty now.
    pub limited_sources: u64,
    /// With `syn_proxy`: SYNs over the limit answered from XDP with a SYN cookie (not in
    /// `limited`); `None` without.
    #[serde(default)]
    pub syn_cookies: Option<u64>,
}

/// One name of one set as `status`, the logs and `/metrics` report it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NameStatus {
    pub set: String,
    /// The domain or host the catalogue names.
    pub name: String,
    /// Addresses in force for it (the last good ones when lookups fail).
    pub addresses: usize,
    /// When every lookup of this name last succeeded (the oldest of them), Unix seconds; `None`
    /// until each has once.
    pub last_success: Option<f64>,
    /// Failed lookups since the daemon started, by kind.
    pub failures: BTreeMap<String, u64>,
    /// The last error, while the name is failing.
    pub error: Option<String>,
    /// Its addresses have not been confirmed for `stale_after`.
    pub stale: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogueInfo {
    pub source: String,
    /// SHA-256 of the catalogue text.
    pub digest: String,
    pub rules: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    pub role: String,
    /// XDP mode (`native`, `generic`) when attached.
    pub mode: Option<String>,
    /// The rules of this interface's role.
    pub rules: Vec<RuleCounter>,
    /// Every reason, zero or not, so rates exist from the first scrape.
    pub reasons: Vec<ReasonCounter>,
    /// Addresses configured on this NIC that the catalogue's protected sets hold: 0 means its
    /// rules protect nothing on it (the sets name other addresses).
    #[serde(default)]
    pub protected_addresses: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleCounter {
    pub id: String,
    pub seed_row: String,
    pub direction: String,
    pub transport: String,
    pub ports: String,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReasonCounter {
    pub reason: String,
    pub drop: bool,
    pub packets: u64,
    pub bytes: u64,
}

pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// A bound NIC as a snapshot needs it: from the daemon's classifier, or from the state file.
pub struct Bound<'a> {
    pub name: &'a str,
    pub role: &'a str,
    pub ifindex: u32,
    /// Counter block.
    pub block: u32,
    pub mode: Option<String>,
}

impl Snapshot {
    /// Reads every counter of `classifier` (one syscall per counter, summed over CPUs).
    pub fn read(
        classifier: &Classifier,
        catalogue: CatalogueInfo,
        reloads: Reloads,
    ) -> Result<Snapshot, LoadError> {
        let bound: Vec<Bound> = classifier
            .bindings()
            .iter()
            .map(|b| Bound {
                name: &b.name,
                role: &b.role,
                ifindex: b.ifindex,
                block: b.block,
                mode: b.mode.map(|m| m.to_string()),
            })
            .collect();
        let snap = Snapshot::read_maps(
            classifier.maps(),
            classifier.compiled(),
            &bound,
            catalogue,
            reloads,
        )?;
        Ok(match classifier.instance() {
            Some(i) => snap.with_instance(i),
            None => snap,
        })
    }

    /// The snapshot with what only the instance knows: the monitors attached to it.
    pub fn with_instance(mut self, instance: &crate::instance::Instance) -> Snapshot {
        self.monitors.attached = crate::monitor::attached(instance);
        self
    }

    /// Reads every counter from the maps alone: what `status` and `stats --instance` do with the
    /// pins of an instance whose daemon may not be running.
    pub fn read_maps(
        maps: &Maps,
        compiled: &Compiled,
        bound: &[Bound],
        catalogue: CatalogueInfo,
        reloads: Reloads,
    ) -> Result<Snapshot, MapsError> {
        let started = Instant::now();
        let slots: Vec<u32> = compiled.rules.iter().map(|r| r.slot).collect();
        let mut interfaces = Vec::new();
        // The NICs' addresses as the daemon keeps them in the kernel (address -> ifindex).
        let nic_addrs = maps.iface_addrs()?;
        let protected = |a: &std::net::IpAddr| {
            let prefixes = match a {
                std::net::IpAddr::V4(_) => &compiled.prefixes_v4,
                std::net::IpAddr::V6(_) => &compiled.prefixes_v6,
            };
            prefixes
                .iter()
                .any(|(n, bits)| bits & SET_PROTECTED != 0 && n.contains(a))
        };
        for b in bound {
            let stats = maps.iface_stats(b.block, &slots)?;
            let rules = compiled
                .rules
                .iter()
                .zip(&stats.rules)
                .filter(|(r, _)| r.interface == b.role)
                .map(|(r, c)| RuleCounter {
                    id: r.id.clone(),
                    seed_row: r.seed_row.clone(),
                    direction: r.direction.to_string(),
                    transport: r.transport.to_string(),
                    ports: r.ports.clone(),
                    packets: c.packets,
                    bytes: c.bytes,
                })
                .collect();
            let reasons = stats
                .reasons
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let (name, drop) = reason::NAMES[i];
                    ReasonCounter {
                        reason: name.to_string(),
                        drop,
                        packets: c.packets,
                        bytes: c.bytes,
                    }
                })
                .collect();
            interfaces.push(Interface {
                name: b.name.to_string(),
                role: b.role.to_string(),
                mode: b.mode.clone(),
                rules,
                reasons,
                protected_addresses: nic_addrs
                    .iter()
                    .filter(|(a, ifindex)| **ifindex == b.ifindex && protected(a))
                    .count() as u64,
            });
        }
        let flows = maps.flow_stats()?;
        let lost = crate::monitor::lost_total(maps)?;
        let monitors = MonitorStats {
            // Monitors are known by their slot locks, which an instance has (`with_instance`).
            attached: 0,
            lost_rate_limit: lost.rate_limit,
            lost_ring_full: lost.ring_full,
        };
        let limits = read_limits(maps, compiled)?;
        Ok(Snapshot {
            version: env!("CARGO_PKG_VERSION").to_string(),
            taken: unix_now(),
            read_seconds: started.elapsed().as_secs_f64(),
            catalogue,
            reloads,
            interfaces,
            flows,
            dns: Vec::new(),
            monitors,
            limits,
        })
    }
}

/// The limits' counters; the bucket table is walked only when a rule has a limit.
fn read_limits(maps: &Maps, compiled: &Compiled) -> Result<Limits, MapsError> {
    let limited: Vec<_> = compiled
        .rules
        .iter()
        .filter_map(|r| r.limit.as_ref().map(|l| (r, l)))
        .collect();
    if limited.is_empty() {
        return Ok(Limits::default());
    }
    let slots: Vec<u32> = limited.iter().map(|(r, _)| r.slot).collect();
    let counts = maps.limited(&slots)?;
    let cookies = maps.syn_proxied(&slots)?;
    let entries: Vec<_> = limited.iter().map(|(r, l)| (r.slot, l.entry)).collect();
    let t = maps.limit_stats(&entries)?;
    Ok(Limits {
        rules: limited
            .iter()
            .zip(counts.into_iter().zip(cookies))
            .map(|((r, l), (n, c))| LimitedRule {
                id: r.id.clone(),
                limit: l.limit.to_string(),
                limited: n,
                limited_sources: t.limited_sources.get(&r.slot).copied().unwrap_or(0),
                syn_cookies: l.limit.syn_proxy.then_some(c),
            })
            .collect(),
        bucket_capacity: t.capacity,
        buckets: t.present,
        buckets_evicted: t.evicted,
        admitted_udp_flows: t.admitted,
        admitted_udp_flows_present: t.admitted_present,
        exempt: t.exempt,
    })
}
