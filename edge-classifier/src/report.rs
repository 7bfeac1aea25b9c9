//! Counter tables as a person reads them in a terminal.

use std::fmt::Write as _;

use edge_classifier_common::reason;

use crate::{
    compile::Compiled,
    loader::{Binding, FlowStats, IfaceStats},
};

/// The flow table in one line.
pub fn flows(s: &FlowStats) -> String {
    format!(
        "flow table: {} of {} entries; {} created, {} expired, {} evicted, {} not recorded (table busy)\n",
        s.present, s.capacity, s.created, s.expired, s.evicted, s.insert_failed
    )
}

/// One table: a row per rule and interface of the rule's role, then non-zero reasons.
pub fn table(compiled: &Compiled, stats: &[(Binding, IfaceStats)]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<26} {:<4} {:<9} {:<4} {:<18} {:<12} {:>10} {:>12}",
        "RULE", "ROW", "DIRECTION", "L4", "PORTS", "INTERFACE", "PACKETS", "BYTES"
    );
    for (rule_ix, rule) in compiled.rules.iter().enumerate() {
        for (binding, s) in stats.iter().filter(|(b, _)| b.role == rule.interface) {
            let c = s.rules[rule_ix];
            let _ = writeln!(
                out,
                "{:<26} {:<4} {:<9} {:<4} {:<18} {:<12} {:>10} {:>12}",
                rule.id,
                rule.seed_row,
                rule.direction.to_string(),
                rule.transport.to_string(),
                rule.ports,
                binding.name,
                c.packets,
                c.bytes
            );
        }
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<8} {:<22} {:<12} {:>10} {:>12}",
        "VERDICT", "REASON", "INTERFACE", "PACKETS", "BYTES"
    );
    for (binding, s) in stats {
        for (i, c) in s.reasons.iter().enumerate() {
            if c.packets == 0 {
                continue;
            }
            let (name, drop) = reason::NAMES[i];
            let _ = writeln!(
                out,
                "{:<8} {:<22} {:<12} {:>10} {:>12}",
                if drop { "drop" } else { "pass" },
                name,
                binding.name,
                c.packets,
                c.bytes
            );
        }
    }
    out
}
