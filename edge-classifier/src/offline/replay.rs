//! `edge-classifier replay`: a capture through the real kernel program (BPF_PROG_TEST_RUN) with
//! a catalogue, beside the reference classifier: a dry run of a catalogue against real traffic.

use aya::programs::{TestRun as _, TestRunOptions};
use edge_classifier_common::reason;

use crate::{
    compile::Compiled,
    loader::{Classifier, LoadError},
    reference::{Counted, FlowTable, Reference},
};

const XDP_PASS: u32 = 2;

#[derive(Debug, Default)]
pub struct Report {
    pub frames: usize,
    /// Shorter than an Ethernet header: the kernel's test run refuses them.
    pub too_short: usize,
    /// (rule id, frames) in catalogue order.
    pub rules: Vec<(String, u64)>,
    /// (verdict, reason, frames) for reasons that moved.
    pub reasons: Vec<(&'static str, &'static str, u64)>,
    /// Indices (0-based) of the frames the kernel dropped.
    pub dropped: Vec<usize>,
    /// (index, what the kernel did, what the reference said).
    pub disagreements: Vec<(usize, String, String)>,
}

fn name(compiled: &Compiled, pass: bool, c: Counted) -> String {
    let what = match c {
        Counted::Rule(slot) => format!(
            "rule {}",
            compiled
                .rules
                .iter()
                .find(|r| r.slot == slot)
                .map_or("?", |r| r.id.as_str())
        ),
        Counted::Reason(r) => reason::NAMES[r as usize].0.to_string(),
    };
    format!("{} {what}", if pass { "pass" } else { "drop" })
}

/// Runs `frames` as if they arrived on a NIC of `role`. The kernel program is loaded privately
/// (nothing is attached) and bound to the loopback device, where test runs arrive.
pub fn replay(compiled: Compiled, role: &str, frames: &[Vec<u8>]) -> Result<Report, LoadError> {
    let reference_compiled = compiled.clone();
    let reference = Reference::new(&reference_compiled);
    let role_mask = compiled
        .role_mask(role)
        .ok_or_else(|| LoadError::UnknownRole {
            role: role.to_string(),
            known: compiled.roles.join(", "),
        })?;
    let mut c = Classifier::load(compiled)?;
    let binding = c.bind("lo", role)?.clone();
    let slots: Vec<u32> = reference_compiled.rules.iter().map(|r| r.slot).collect();
    let mut flows = FlowTable::default();
    let mut report = Report {
        frames: frames.len(),
        ..Report::default()
    };
    let mut last = c.maps().iface_stats(binding.block, &slots)?;
    let first = last.clone();
    for (i, f) in frames.iter().enumerate() {
        let want = reference.ingress(f, role_mask, &mut flows, 0);
        if f.len() < 14 {
            report.too_short += 1;
            continue;
        }
        let opts = TestRunOptions {
            data_in: Some(f),
            ..TestRunOptions::new()
        };
        let got = c
            .program()
            .test_run(opts)
            .map_err(LoadError::Program)?
            .return_value;
        let now = c.maps().iface_stats(binding.block, &slots)?;
        let mut moved = Vec::new();
        for (r, (b, a)) in last.reasons.iter().zip(&now.reasons).enumerate() {
            if a.packets != b.packets {
                moved.push(Counted::Reason(r as u32));
            }
        }
        for (r, (b, a)) in last.rules.iter().zip(&now.rules).enumerate() {
            if a.packets != b.packets {
                moved.push(Counted::Rule(slots[r]));
            }
        }
        last = now;
        let pass = got == XDP_PASS;
        if !pass {
            report.dropped.push(i);
        }
        if pass != want.pass || moved != [want.counted] {
            report.disagreements.push((
                i,
                moved
                    .iter()
                    .map(|m| name(&reference_compiled, pass, *m))
                    .collect::<Vec<_>>()
                    .join(", "),
                name(&reference_compiled, want.pass, want.counted),
            ));
        }
    }
    report.rules = reference_compiled
        .rules
        .iter()
        .zip(last.rules.iter().zip(&first.rules))
        .map(|(r, (a, b))| (r.id.clone(), a.packets - b.packets))
        .collect();
    report.reasons = last
        .reasons
        .iter()
        .zip(&first.reasons)
        .enumerate()
        .filter(|(_, (a, b))| a.packets != b.packets)
        .map(|(i, (a, b))| {
            let (n, drop) = reason::NAMES[i];
            (if drop { "drop" } else { "pass" }, n, a.packets - b.packets)
        })
        .collect();
    Ok(report)
}
