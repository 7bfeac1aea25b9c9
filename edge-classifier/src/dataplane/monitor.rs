//! `edge-classifier monitor`: live events from the programs' monitor rings.
//!
//! A [`Monitor`] claims a free slot (an flock per slot under the state directory, so two
//! monitors never take the same one; a killed monitor's lock goes with it), empties the slot's
//! ring of what a dead predecessor left, writes its selection and lease into `MONITOR_CONFIG`
//! and sets its slot's bit on the NICs it watches. Reason, rule, NIC and verdict are selected
//! in the kernel; a pcap-filter expression is applied here, to the frame's bytes, by libpcap.
//! The lease is renewed every second; dropping the monitor clears its bits and the lease, and
//! a monitor killed outright costs nothing once its lease has passed (the programs clear its
//! bits themselves).

use std::{
    collections::HashMap,
    fs::File,
    os::fd::{AsFd as _, AsRawFd as _},
    time::{Duration, Instant, SystemTime},
};

use aya::maps::{Map, MapData, RingBuf};
use edge_classifier_common::{
    RULE_COUNTER_BASE,
    monitor::{
        EVENT_EGRESS, EVENT_PASS, MONITOR_DROP, MONITOR_LEASE_SECONDS, MONITOR_PASS, MONITOR_RULES,
        MONITOR_SLOTS, MonitorConfig, MonitorEvent,
    },
    reason,
};

use crate::{
    instance::{Instance, InstanceError, STATE_ROOT},
    maps::{MONITOR_RINGS, Maps, MapsError},
};

#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error(transparent)]
    Instance(#[from] InstanceError),
    #[error(
        "no classifier instance `{0}` is pinned: start one with `edge-classifier run` (monitor reads its pinned maps)"
    )]
    NotPinned(String),
    #[error("reading the pinned maps of instance `{instance}` (are you root?): {source}")]
    Maps {
        instance: String,
        #[source]
        source: MapsError,
    },
    #[error(
        "opening the monitor ring {path} (run as root, or with CAP_BPF): {source}; an instance started by an older version has no monitor rings: restart it with `edge-classifier stop` then `run`"
    )]
    Ring {
        path: String,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("all {MONITOR_SLOTS} monitor slots of instance `{0}` are in use: stop a monitor first")]
    Busy(String),
    #[error("unknown reason `{0}`: expected one of {1}")]
    UnknownReason(String, String),
    #[error("rule `{0}` is not in the running catalogue")]
    UnknownRule(String),
    #[error("at most {MONITOR_RULES} --rule selections")]
    TooManyRules,
    #[error("NIC `{0}` is not bound to instance `{1}`: expected one of {2}")]
    UnknownIface(String, String, String),
    #[error("filter `{0}`: {1}")]
    Filter(String, String),
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
}

/// Which verdicts a monitor wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdicts {
    Drop,
    Pass,
    All,
}

/// What a monitor asks the kernel for.
#[derive(Debug, Clone)]
pub struct Selection {
    /// Reason labels (`no_rule`, `not_established`, …); a label both a pass and a drop reason
    /// have selects both, and `verdicts` then chooses.
    pub reasons: Vec<String>,
    /// Rule ids of the running catalogue.
    pub rules: Vec<String>,
    /// Bound NICs; empty: all of them.
    pub ifaces: Vec<String>,
    pub verdicts: Verdicts,
    /// Events per second, all CPUs together.
    pub rate: u32,
}

/// One frame the programs reported.
#[derive(Debug, Clone)]
pub struct Event {
    pub time: SystemTime,
    pub iface: String,
    pub ifindex: u32,
    pub egress: bool,
    pub pass: bool,
    /// `rule` or `reason`.
    pub kind: &'static str,
    /// The rule id or the reason's label.
    pub name: String,
    /// The frame's length on the wire.
    pub len: u32,
    /// Its first bytes (at most 256).
    pub data: Vec<u8>,
}

/// Events not delivered, since the monitor attached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lost {
    pub rate_limit: u64,
    pub ring_full: u64,
}

impl Lost {
    pub fn total(&self) -> u64 {
        self.rate_limit + self.ring_full
    }
}

pub struct Monitor {
    maps: Maps,
    ring: RingBuf<MapData>,
    slot: u32,
    config: MonitorConfig,
    ifindexes: Vec<u32>,
    names: HashMap<u32, String>,
    rules: HashMap<u32, String>,
    lost_base: [u64; 2],
    renewed: Instant,
    /// Wall clock minus `CLOCK_MONOTONIC`, to date the kernel's timestamps.
    wall_offset_ns: i128,
    _slot_lock: File,
}

fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

/// The reason bits that `labels` name.
pub fn reason_bits(labels: &[String]) -> Result<u32, MonitorError> {
    let mut bits = 0u32;
    for l in labels {
        let mut found = false;
        for (i, (name, _)) in reason::NAMES.iter().enumerate() {
            if name == l {
                bits |= 1 << i;
                found = true;
            }
        }
        if !found {
            let mut known: Vec<&str> = reason::NAMES.iter().map(|(n, _)| *n).collect();
            known.sort();
            known.dedup();
            return Err(MonitorError::UnknownReason(l.clone(), known.join(", ")));
        }
    }
    Ok(bits)
}

/// A slot lock file: held (flock) for as long as its monitor runs.
fn slot_lock(instance: &Instance, slot: u32) -> Result<Option<File>, MonitorError> {
    let path = instance.monitor_lock(slot);
    let f = File::create(&path).map_err(|e| MonitorError::Io(path.display().to_string(), e))?;
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Ok(None);
    }
    Ok(Some(f))
}

impl Monitor {
    /// Claims a slot of `instance` and starts the kernel writing events for `sel`.
    pub fn attach(instance: &Instance, sel: &Selection) -> Result<Monitor, MonitorError> {
        let state = instance
            .read_state()?
            .ok_or_else(|| MonitorError::NotPinned(instance.name.clone()))?;
        if !crate::maps::pinned_in(&instance.maps_dir()) {
            return Err(MonitorError::NotPinned(instance.name.clone()));
        }
        let maps_err = |source| MonitorError::Maps {
            instance: instance.name.clone(),
            source,
        };
        let mut maps = Maps::open_pinned(&instance.maps_dir()).map_err(maps_err)?;

        // Rule ids of the running catalogue, both ways.
        let mut rules = HashMap::new();
        if let Some(Ok((_, compiled))) = state.active().map(|l| l.compile()) {
            for r in &compiled.rules {
                rules.insert(
                    edge_classifier_common::layout::rule_counter(r.slot),
                    r.id.clone(),
                );
            }
        }
        let mut config = MonitorConfig {
            flags: match sel.verdicts {
                Verdicts::Drop => MONITOR_DROP,
                Verdicts::Pass => MONITOR_PASS,
                Verdicts::All => MONITOR_DROP | MONITOR_PASS,
            },
            reasons: reason_bits(&sel.reasons)?,
            ..Default::default()
        };
        if sel.rules.len() > MONITOR_RULES {
            return Err(MonitorError::TooManyRules);
        }
        for (i, id) in sel.rules.iter().enumerate() {
            let counter = rules
                .iter()
                .find(|(_, rid)| *rid == id)
                .map(|(c, _)| *c)
                .ok_or_else(|| MonitorError::UnknownRule(id.clone()))?;
            config.rules[i] = counter;
        }
        config.rules_len = sel.rules.len() as u32;
        let cpus = aya::util::nr_cpus().map(|n| n as u32).unwrap_or(1).max(1);
        config.rate_per_cpu = sel.rate.div_ceil(cpus);

        let names: HashMap<u32, String> = state
            .bindings
            .iter()
            .map(|b| (b.ifindex, b.name.clone()))
            .collect();
        let mut ifindexes = Vec::new();
        for want in &sel.ifaces {
            match state.bindings.iter().find(|b| &b.name == want) {
                Some(b) => ifindexes.push(b.ifindex),
                None => {
                    let known: Vec<&str> = state.bindings.iter().map(|b| b.name.as_str()).collect();
                    return Err(MonitorError::UnknownIface(
                        want.clone(),
                        instance.name.clone(),
                        known.join(", "),
                    ));
                }
            }
        }
        if sel.ifaces.is_empty() {
            ifindexes = state.bindings.iter().map(|b| b.ifindex).collect();
        }

        std::fs::create_dir_all(STATE_ROOT)
            .map_err(|e| MonitorError::Io(STATE_ROOT.to_string(), e))?;
        let mut claimed = None;
        for slot in 0..MONITOR_SLOTS {
            if let Some(lock) = slot_lock(instance, slot)? {
                claimed = Some((slot, lock));
                break;
            }
        }
        let (slot, lock) = claimed.ok_or_else(|| MonitorError::Busy(instance.name.clone()))?;
        let path = instance.map_pin(MONITOR_RINGS[slot as usize]);
        let ring_err = |source| MonitorError::Ring {
            path: path.display().to_string(),
            source,
        };
        let data = MapData::from_pin(&path).map_err(ring_err)?;
        let mut ring = RingBuf::try_from(Map::RingBuf(data)).map_err(ring_err)?;
        // What a monitor killed before us left unread is not ours to show.
        while ring.next().is_some() {}

        let lost_base = maps.monitor_lost(slot).map_err(maps_err)?;
        // A count no earlier holder of the slot had: the programs see the lease renewed.
        let before = maps.monitor_config(slot).map_err(maps_err)?;
        config.renewals = before.renewals.wrapping_add(1);
        config.lease_ticks = MONITOR_LEASE_SECONDS * crate::compile::ticks_per_second();
        maps.set_monitor_config(slot, config).map_err(maps_err)?;
        let mut m = Monitor {
            maps,
            ring,
            slot,
            config,
            ifindexes,
            names,
            rules,
            lost_base,
            renewed: Instant::now(),
            wall_offset_ns: clock_ns(libc::CLOCK_REALTIME) - clock_ns(libc::CLOCK_MONOTONIC),
            _slot_lock: lock,
        };
        m.set_bits(true).map_err(maps_err)?;
        Ok(m)
    }

    /// The slot this monitor holds.
    pub fn slot(&self) -> u32 {
        self.slot
    }

    fn set_bits(&mut self, on: bool) -> Result<(), MapsError> {
        for i in &self.ifindexes {
            self.maps.set_iface_monitor(*i, self.slot, on)?;
        }
        Ok(())
    }

    /// Moves the lease on, and sets the slot's bits again (a daemon that rebound a NIC, or the
    /// programs racing a previous holder's expiry, may have cleared one).
    fn renew(&mut self) -> Result<(), MapsError> {
        self.config.renewals = self.config.renewals.wrapping_add(1);
        self.maps.set_monitor_config(self.slot, self.config)?;
        self.set_bits(true)?;
        self.renewed = Instant::now();
        Ok(())
    }

    /// Events not delivered since this monitor attached.
    pub fn lost(&self) -> Result<Lost, MapsError> {
        let now = self.maps.monitor_lost(self.slot)?;
        Ok(Lost {
            rate_limit: now[0] - self.lost_base[0],
            ring_full: now[1] - self.lost_base[1],
        })
    }

    /// The next event, waiting at most `timeout`; renews the lease as it goes.
    pub fn next(&mut self, timeout: Duration) -> Result<Option<Event>, MapsError> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.renewed.elapsed() >= Duration::from_secs(1) {
                self.renew()?;
            }
            let read = self.ring.next().map(|item| {
                (item.len() >= std::mem::size_of::<MonitorEvent>())
                    .then(|| unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) })
            });
            match read {
                Some(Some(ev)) => return Ok(Some(self.event(&ev))),
                // A record of another size: not one of ours; skipped.
                Some(None) => continue,
                None => {}
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let wait = (deadline - now).min(Duration::from_millis(200));
            let mut pfd = libc::pollfd {
                fd: self.ring.as_fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            unsafe { libc::poll(&mut pfd, 1, wait.as_millis() as i32) };
        }
    }

    fn event(&self, ev: &MonitorEvent) -> Event {
        let ns = ev.ts_ns as i128 + self.wall_offset_ns;
        let time = SystemTime::UNIX_EPOCH + Duration::from_nanos(ns.max(0) as u64);
        let (kind, name) = if ev.counter < RULE_COUNTER_BASE {
            (
                "reason",
                reason::NAMES
                    .get(ev.counter as usize)
                    .map_or_else(|| format!("reason_{}", ev.counter), |(n, _)| n.to_string()),
            )
        } else {
            (
                "rule",
                self.rules
                    .get(&ev.counter)
                    .cloned()
                    .unwrap_or_else(|| format!("slot_{}", ev.counter - RULE_COUNTER_BASE)),
            )
        };
        let cap = (ev.caplen as usize).min(ev.data.len());
        Event {
            time,
            iface: self
                .names
                .get(&ev.ifindex)
                .cloned()
                .unwrap_or_else(|| format!("ifindex{}", ev.ifindex)),
            ifindex: ev.ifindex,
            egress: ev.flags & EVENT_EGRESS != 0,
            pass: ev.flags & EVENT_PASS != 0,
            kind,
            name,
            len: ev.len,
            data: ev.data[..cap].to_vec(),
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        // Bits first: the programs stop calling in before the lease says the slot is free.
        let _ = self.set_bits(false);
        // Free (no verdict wanted), with a count of its own: a frame that still finds a bit
        // clears it.
        let _ = self.maps.set_monitor_config(
            self.slot,
            MonitorConfig {
                renewals: self.config.renewals.wrapping_add(1),
                ..Default::default()
            },
        );
    }
}

/// Events not delivered since the maps were created, every slot together (the metric).
pub fn lost_total(maps: &Maps) -> Result<Lost, MapsError> {
    let mut out = Lost::default();
    for slot in 0..MONITOR_SLOTS {
        let l = maps.monitor_lost(slot)?;
        out.rate_limit += l[0];
        out.ring_full += l[1];
    }
    Ok(out)
}

/// Monitor slots of `instance` held now (their lock is taken: a monitor runs).
pub fn attached(instance: &Instance) -> u32 {
    (0..MONITOR_SLOTS)
        .filter(|slot| {
            let Ok(f) = File::open(instance.monitor_lock(*slot)) else {
                return false;
            };
            unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) != 0 }
        })
        .count() as u32
}

/// A compiled pcap-filter expression (libpcap), run on an event's bytes.
pub struct Filter(pcap::BpfProgram);

impl Filter {
    pub fn new(expr: &str) -> Result<Filter, MonitorError> {
        let dead = pcap::Capture::dead(pcap::Linktype::ETHERNET)
            .map_err(|e| MonitorError::Filter(expr.to_string(), e.to_string()))?;
        let prog = dead
            .compile(expr, true)
            .map_err(|e| MonitorError::Filter(expr.to_string(), e.to_string()))?;
        Ok(Filter(prog))
    }

    pub fn matches(&self, frame: &[u8]) -> bool {
        self.0.filter(frame)
    }
}

/// The frame's protocol and endpoints, for the line and JSON forms.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Summary {
    pub protocol: String,
    pub src: Option<String>,
    pub sport: Option<u16>,
    pub dst: Option<String>,
    pub dport: Option<u16>,
}

/// Lax: an event holds the first 256 bytes, so a longer frame's IP length exceeds them.
pub fn summarize(frame: &[u8]) -> Summary {
    use etherparse::{LaxNetSlice, LaxSlicedPacket, TransportSlice};
    let Ok(p) = LaxSlicedPacket::from_ethernet(frame) else {
        return Summary {
            protocol: "malformed".to_string(),
            ..Default::default()
        };
    };
    let mut s = Summary::default();
    match &p.net {
        Some(LaxNetSlice::Ipv4(ip)) => {
            s.src = Some(ip.header().source_addr().to_string());
            s.dst = Some(ip.header().destination_addr().to_string());
            s.protocol = format!("ip-proto-{}", ip.header().protocol().0);
        }
        Some(LaxNetSlice::Ipv6(ip)) => {
            s.src = Some(ip.header().source_addr().to_string());
            s.dst = Some(ip.header().destination_addr().to_string());
            s.protocol = format!("ip-proto-{}", ip.payload().ip_number.0);
        }
        Some(LaxNetSlice::Arp(_)) => s.protocol = "arp".to_string(),
        None => {
            s.protocol = match p.link.as_ref() {
                Some(etherparse::LinkSlice::Ethernet2(e)) => {
                    format!("ethertype-0x{:04x}", e.ether_type().0)
                }
                _ => "non-ip".to_string(),
            }
        }
    }
    match &p.transport {
        Some(TransportSlice::Tcp(t)) => {
            s.protocol = "tcp".to_string();
            s.sport = Some(t.source_port());
            s.dport = Some(t.destination_port());
        }
        Some(TransportSlice::Udp(u)) => {
            s.protocol = "udp".to_string();
            s.sport = Some(u.source_port());
            s.dport = Some(u.destination_port());
        }
        Some(TransportSlice::Icmpv4(_)) => s.protocol = "icmp".to_string(),
        Some(TransportSlice::Icmpv6(_)) => s.protocol = "icmpv6".to_string(),
        None => {}
    }
    s
}

fn endpoint(addr: &Option<String>, port: Option<u16>) -> String {
    match (addr, port) {
        (Some(a), Some(p)) if a.contains(':') => format!("[{a}]:{p}"),
        (Some(a), Some(p)) => format!("{a}:{p}"),
        (Some(a), None) => a.clone(),
        (None, _) => "-".to_string(),
    }
}

impl Event {
    /// `TIME NIC in|out VERDICT rule:ID|reason:NAME PROTO SRC -> DST len N`.
    pub fn line(&self) -> String {
        let s = summarize(&self.data);
        let t = jiff::Timestamp::try_from(self.time)
            .and_then(|t| t.round(jiff::Unit::Microsecond))
            .map_or_else(|_| "-".to_string(), |t| t.to_string());
        format!(
            "{t} {} {} {} {}:{} {} {} -> {} len {}",
            self.iface,
            if self.egress { "out" } else { "in" },
            if self.pass { "pass" } else { "drop" },
            self.kind,
            self.name,
            s.protocol,
            endpoint(&s.src, s.sport),
            endpoint(&s.dst, s.dport),
            self.len
        )
    }

    pub fn json(&self) -> serde_json::Value {
        let s = summarize(&self.data);
        let secs = self
            .time
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        serde_json::json!({
            "time": secs,
            "iface": self.iface,
            "ifindex": self.ifindex,
            "direction": if self.egress { "out" } else { "in" },
            "verdict": if self.pass { "pass" } else { "drop" },
            "rule": (self.kind == "rule").then(|| self.name.clone()),
            "reason": (self.kind == "reason").then(|| self.name.clone()),
            "protocol": s.protocol,
            "src": s.src,
            "sport": s.sport,
            "dst": s.dst,
            "dport": s.dport,
            "len": self.len,
            "caplen": self.data.len(),
        })
    }
}

/// How a monitoring run ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Outcome {
    /// Events that passed the filter and were handed on.
    pub shown: u64,
    /// Events the kernel selected that the filter did not match.
    pub filtered: u64,
    pub lost_rate_limit: u64,
    pub lost_ring_full: u64,
}

impl Outcome {
    pub fn missed(&self) -> u64 {
        self.lost_rate_limit + self.lost_ring_full
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} events shown, {} not matching the filter, {} missed (rate_limit {}, ring_full {})",
            self.shown,
            self.filtered,
            self.missed(),
            self.lost_rate_limit,
            self.lost_ring_full
        )
    }
}

/// What a run watches for and how long.
#[derive(Debug, Clone)]
pub struct Run {
    pub selection: Selection,
    /// A pcap-filter expression; empty: every event the kernel selected.
    pub filter: String,
    pub count: Option<u64>,
    pub duration: Option<Duration>,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Monitor(#[from] Box<MonitorError>),
    #[error("reading the monitor maps: {0}")]
    Maps(#[from] Box<MapsError>),
    #[error("{0}")]
    Sink(#[source] std::io::Error),
}

/// Runs a monitor of `instance` until `run.count` events, `run.duration`, or `stop` says so,
/// handing each event that passes the filter to `sink`. `attached` is called once the kernel
/// writes events (with the slot), so that a caller can say so before traffic is sent.
pub fn run(
    instance: &Instance,
    run: &Run,
    stop: &dyn Fn() -> bool,
    attached: &mut dyn FnMut(u32),
    sink: &mut dyn FnMut(&Event) -> std::io::Result<()>,
) -> Result<Outcome, RunError> {
    let filter = (!run.filter.trim().is_empty())
        .then(|| Filter::new(&run.filter))
        .transpose()
        .map_err(Box::new)?;
    let mut mon = Monitor::attach(instance, &run.selection).map_err(Box::new)?;
    attached(mon.slot());
    let started = Instant::now();
    let mut out = Outcome::default();
    while !stop() && run.count.is_none_or(|c| out.shown < c) {
        let wait = match run.duration {
            Some(d) => match d.checked_sub(started.elapsed()) {
                Some(left) => left.min(Duration::from_millis(250)),
                None => break,
            },
            None => Duration::from_millis(250),
        };
        let Some(ev) = mon.next(wait).map_err(Box::new)? else {
            continue;
        };
        if filter.as_ref().is_some_and(|f| !f.matches(&ev.data)) {
            out.filtered += 1;
            continue;
        }
        out.shown += 1;
        sink(&ev).map_err(RunError::Sink)?;
    }
    let lost = mon.lost().map_err(Box::new)?;
    out.lost_rate_limit = lost.rate_limit;
    out.lost_ring_full = lost.ring_full;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reason_label_selects_every_reason_of_that_name() {
        let bits = reason_bits(&["no_rule".to_string(), "icmp".to_string()]).unwrap();
        let want =
            (1 << reason::DROP_NO_RULE) | (1 << reason::PASS_ICMP) | (1 << reason::DROP_ICMP);
        assert_eq!(bits, want);
        let e = reason_bits(&["nope".to_string()]).unwrap_err().to_string();
        assert!(
            e.contains("unknown reason `nope`") && e.contains("not_established"),
            "{e}"
        );
    }

    fn udp6_truncated() -> Vec<u8> {
        let mut f = Vec::new();
        etherparse::PacketBuilder::ethernet2([2; 6], [4; 6])
            .ipv6(
                [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5],
                [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10],
                64,
            )
            .udp(5060, 9999)
            .write(&mut f, &[0u8; 600])
            .unwrap();
        f.truncate(256);
        f
    }

    #[test]
    fn an_event_reads_as_a_line_and_as_json_even_cut_at_256_bytes() {
        let ev = Event {
            time: SystemTime::UNIX_EPOCH + Duration::from_micros(1_764_529_889_512_204),
            iface: "ext0".to_string(),
            ifindex: 7,
            egress: false,
            pass: false,
            kind: "reason",
            name: "no_rule".to_string(),
            len: 662,
            data: udp6_truncated(),
        };
        assert_eq!(
            ev.line(),
            "2025-11-30T19:11:29.512204Z ext0 in drop reason:no_rule udp [2001:db8::5]:5060 -> [2001:db8::10]:9999 len 662"
        );
        let j = ev.json();
        assert_eq!(j["reason"], "no_rule");
        assert_eq!(j["rule"], serde_json::Value::Null);
        assert_eq!(j["protocol"], "udp");
        assert_eq!(j["src"], "2001:db8::5");
        assert_eq!(j["dport"], 9999);
        assert_eq!(j["len"], 662);
        assert_eq!(j["caplen"], 256);
    }

    #[test]
    fn a_frame_that_is_not_ethernet_ip_says_what_it_is() {
        assert_eq!(summarize(&[0u8; 5]).protocol, "malformed");
        let mut lldp = vec![0u8; 60];
        lldp[12] = 0x88;
        lldp[13] = 0xcc;
        assert_eq!(summarize(&lldp).protocol, "ethertype-0x88cc");
    }

    #[test]
    fn the_filter_is_libpcap_s() {
        let f = Filter::new("udp dst port 9999 and src net 2001:db8::/64").unwrap();
        assert!(f.matches(&udp6_truncated()));
        assert!(!Filter::new("tcp").unwrap().matches(&udp6_truncated()));
        let e = Filter::new("port banana")
            .err()
            .expect("a bad expression")
            .to_string();
        assert!(e.starts_with("filter `port banana`"), "{e}");
    }
}
