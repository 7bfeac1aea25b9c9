//! Counter tables as a person reads them in a terminal.

use std::fmt::Write as _;

use crate::{maps::FlowStats, snapshot::Snapshot};

/// The flow table in one line.
pub fn flows(s: &FlowStats) -> String {
    format!(
        "flow tables: IPv4 {} and IPv6 {} of {} entries each; {} created, {} expired, {} evicted, {} not recorded (table busy)\n",
        s.present_v4, s.present_v6, s.capacity, s.created, s.expired, s.evicted, s.insert_failed
    )
}

/// The limits on new flows: a line per limited rule and one for the bucket table; nothing when
/// no rule has a limit.
pub fn limits(l: &crate::snapshot::Limits) -> String {
    let mut out = String::new();
    for r in &l.rules {
        let _ = writeln!(
            out,
            "limit of {} ({}): {} new flows refused, {} sources limited now{}",
            r.id,
            r.limit,
            r.limited,
            r.limited_sources,
            match r.syn_cookies {
                Some(c) => format!(", {c} SYNs answered with a SYN cookie"),
                None => String::new(),
            }
        );
    }
    if !l.rules.is_empty() {
        let _ = writeln!(
            out,
            "limit buckets: {} of {}, {} evicted; {} UDP flows admitted ({} remembered), {} exempt new flows",
            l.buckets,
            l.bucket_capacity,
            l.buckets_evicted,
            l.admitted_udp_flows,
            l.admitted_udp_flows_present,
            l.exempt
        );
    }
    out
}

/// `edge-classifier stats`: a snapshot as tables; with the previous snapshot, per-second rates.
pub fn snapshot_table(s: &Snapshot, prev: Option<&Snapshot>) -> String {
    let mut out = String::new();
    let rates = Rates {
        dt: prev.map(|p| s.taken - p.taken).filter(|d| *d > 0.0),
        prev,
    };
    let _ = writeln!(
        out,
        "catalogue {} ({} rules, sha256 {}), edge-classifier {}",
        s.catalogue.source,
        s.catalogue.rules,
        &s.catalogue.digest[..s.catalogue.digest.len().min(12)],
        s.version
    );
    for i in &s.interfaces {
        let _ = writeln!(
            out,
            "interface {} ({}): {}",
            i.name,
            i.role,
            match &i.mode {
                Some(m) => format!("attached, XDP {m} mode"),
                None => "not attached".to_string(),
            }
        );
    }
    let _ = writeln!(out);
    rules_table(&mut out, s, &rates);
    let _ = writeln!(out);
    reasons_table(&mut out, s, &rates);
    let _ = writeln!(out);
    out.push_str(&flows(&s.flows));
    out.push_str(&limits(&s.limits));
    let _ = writeln!(
        out,
        "reloads: {} succeeded, {} failed",
        s.reloads.succeeded, s.reloads.failed
    );
    let m = &s.monitors;
    if m.attached > 0 || m.lost_rate_limit + m.lost_ring_full > 0 {
        let _ = writeln!(
            out,
            "monitors: {} attached; events missed: {} over the rate limit, {} ring full",
            m.attached, m.lost_rate_limit, m.lost_ring_full
        );
    }
    out
}

/// Per-second rates against the previous snapshot, when there is one.
struct Rates<'a> {
    dt: Option<f64>,
    prev: Option<&'a Snapshot>,
}

impl Rates<'_> {
    fn rate(&self, now: u64, before: Option<u64>) -> String {
        match (self.dt, before) {
            (Some(dt), Some(b)) => format!("{:.1}", now.saturating_sub(b) as f64 / dt),
            _ => "-".to_string(),
        }
    }

    fn before(&self, iface: &str) -> Option<&crate::snapshot::Interface> {
        self.prev
            .and_then(|p| p.interfaces.iter().find(|i| i.name == iface))
    }
}

/// A row per rule and interface of the rule's role.
fn rules_table(out: &mut String, s: &Snapshot, rates: &Rates) {
    let _ = writeln!(
        out,
        "{:<26} {:<4} {:<9} {:<4} {:<18} {:<10} {:>10} {:>12} {:>10} {:>12}",
        "RULE",
        "ROW",
        "DIRECTION",
        "L4",
        "PORTS",
        "INTERFACE",
        "PACKETS",
        "BYTES",
        "PKT/S",
        "BYTES/S"
    );
    for i in &s.interfaces {
        let p = rates.before(&i.name);
        for r in &i.rules {
            let pr = p.and_then(|p| p.rules.iter().find(|x| x.id == r.id));
            let _ = writeln!(
                out,
                "{:<26} {:<4} {:<9} {:<4} {:<18} {:<10} {:>10} {:>12} {:>10} {:>12}",
                r.id,
                r.seed_row,
                r.direction,
                r.transport,
                r.ports,
                i.name,
                r.packets,
                r.bytes,
                rates.rate(r.packets, pr.map(|x| x.packets)),
                rates.rate(r.bytes, pr.map(|x| x.bytes)),
            );
        }
    }
}

/// A row per reason that counted anything, and interface.
fn reasons_table(out: &mut String, s: &Snapshot, rates: &Rates) {
    let _ = writeln!(
        out,
        "{:<8} {:<22} {:<10} {:>10} {:>12} {:>10}",
        "VERDICT", "REASON", "INTERFACE", "PACKETS", "BYTES", "PKT/S"
    );
    for i in &s.interfaces {
        let p = rates.before(&i.name);
        for c in i.reasons.iter().filter(|c| c.packets > 0) {
            let pc = p.and_then(|p| {
                p.reasons
                    .iter()
                    .find(|x| x.reason == c.reason && x.drop == c.drop)
            });
            let _ = writeln!(
                out,
                "{:<8} {:<22} {:<10} {:>10} {:>12} {:>10}",
                if c.drop { "drop" } else { "pass" },
                c.reason,
                i.name,
                c.packets,
                c.bytes,
                rates.rate(c.packets, pc.map(|x| x.packets)),
            );
        }
    }
}
