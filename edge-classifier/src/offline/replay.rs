//! `edge-classifier replay`: a capture through the real kernel programs (BPF_PROG_TEST_RUN) with
//! a catalogue, beside the reference classifier: a dry run of a catalogue against real traffic.
//!
//! A capture taken on an Edge NIC holds both directions. A frame from an address the catalogue
//! protects is one the Edge sent: it goes through the TC egress program (and the reference's
//! `egress`), which records the flows the Edge opens; every other frame through XDP (the
//! reference's `ingress`). In capture order, so the replies to those flows pass as they did
//! live instead of counting as `not_established`.

use std::{
    io::{self, Write},
    net::IpAddr,
};

use aya::programs::{TestRun as _, TestRunOptions};
use edge_classifier_common::reason;
use etherparse::{EtherType, LaxNetSlice, LaxSlicedPacket};

use crate::{
    capture::Frame,
    compile::Compiled,
    explain::Way,
    loader::{Classifier, LoadError},
    reference::{Counted, FlowTable, Reference},
};

/// TC_ACT_UNSPEC (-1) as BPF_PROG_TEST_RUN returns it: the egress program lets the frame go.
const TC_ACT_UNSPEC: u32 = u32::MAX;
/// The kernel's test run refuses anything shorter than an Ethernet header.
const ETH_HLEN: usize = 14;

/// A counter the kernel moved for a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Counter {
    Rule(String),
    Reason(&'static str),
}

/// What the kernel did with one frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Shorter than an Ethernet header: not run.
    TooShort,
    Ran {
        way: Way,
        pass: bool,
        /// The counters that moved: exactly one, unless the report lists a disagreement here.
        counted: Vec<Counter>,
    },
}

/// The frames of one way and the counters they moved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    pub frames: u64,
    /// (rule id, frames) in catalogue order, every rule.
    pub rules: Vec<(String, u64)>,
    /// (verdict, reason, frames) for the reasons that moved, in reason order.
    pub reasons: Vec<(&'static str, &'static str, u64)>,
}

/// A frame the kernel and the reference classifier judged differently.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disagreement {
    /// Index in the capture (0-based).
    pub frame: usize,
    pub way: Way,
    /// What the kernel did (`pass rule ID`, `drop REASON`; several when more than one counter
    /// moved, nothing when none did).
    pub kernel: String,
    pub reference: String,
}

#[derive(Debug, Default)]
pub struct Report {
    /// One per frame, in capture order.
    pub outcomes: Vec<Outcome>,
    /// Frames that arrived (XDP).
    pub ingress: Counts,
    /// Frames the Edge sent (TC egress).
    pub egress: Counts,
    pub disagreements: Vec<Disagreement>,
}

impl Report {
    pub fn too_short(&self) -> usize {
        self.outcomes
            .iter()
            .filter(|o| **o == Outcome::TooShort)
            .count()
    }

    /// Indices (0-based) of the frames the kernel dropped, in capture order.
    pub fn dropped(&self) -> impl Iterator<Item = usize> + '_ {
        self.outcomes
            .iter()
            .enumerate()
            .filter(|(_, o)| matches!(o, Outcome::Ran { pass: false, .. }))
            .map(|(i, _)| i)
    }
}

/// `in` or `out`, as the verdict lines and the report write a way.
pub fn way_name(way: Way) -> &'static str {
    match way {
        Way::In => "in",
        Way::Out => "out",
    }
}

fn counter(compiled: &Compiled, c: Counted) -> Counter {
    match c {
        Counted::Rule(slot) => Counter::Rule(
            compiled
                .rules
                .iter()
                .find(|r| r.slot == slot)
                .map_or("?", |r| r.id.as_str())
                .to_string(),
        ),
        Counted::Reason(r) => Counter::Reason(reason::NAMES[r as usize].0),
    }
}

fn describe(pass: bool, counted: &[Counter]) -> String {
    counted
        .iter()
        .map(|c| {
            let what = match c {
                Counter::Rule(id) => format!("rule {id}"),
                Counter::Reason(name) => name.to_string(),
            };
            format!("{} {what}", if pass { "pass" } else { "drop" })
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Frames and counter movements of one way, by rule (catalogue order) and by reason.
struct Tally {
    frames: u64,
    rules: Vec<u64>,
    reasons: Vec<u64>,
}

impl Tally {
    fn new(rules: usize) -> Tally {
        Tally {
            frames: 0,
            rules: vec![0; rules],
            reasons: vec![0; reason::COUNT as usize],
        }
    }

    fn counts(&self, compiled: &Compiled) -> Counts {
        Counts {
            frames: self.frames,
            rules: compiled
                .rules
                .iter()
                .zip(&self.rules)
                .map(|(r, n)| (r.id.clone(), *n))
                .collect(),
            reasons: self
                .reasons
                .iter()
                .enumerate()
                .filter(|(_, n)| **n > 0)
                .map(|(r, n)| {
                    let (name, drop) = reason::NAMES[r];
                    (if drop { "drop" } else { "pass" }, name, *n)
                })
                .collect(),
        }
    }
}

/// Which way `frame` went through the NIC, read from its source address: one the catalogue
/// protects (for ARP, the sender's address) is the Edge's own. A frame with no source to read
/// (non-IP, or cut short before it) goes through XDP, which has a verdict for such frames
/// (`non_ip`, `malformed`) where egress lets them go uncounted as `egress_untracked`.
fn way(reference: &Reference, frame: &[u8]) -> Way {
    let source = match LaxSlicedPacket::from_ethernet(frame)
        .ok()
        .and_then(|p| p.net)
    {
        Some(LaxNetSlice::Ipv4(ip)) => IpAddr::from(ip.header().source_addr()),
        Some(LaxNetSlice::Ipv6(ip)) => IpAddr::from(ip.header().source_addr()),
        Some(LaxNetSlice::Arp(arp)) if arp.proto_addr_type() == EtherType::IPV4 => {
            match <[u8; 4]>::try_from(arp.sender_protocol_addr()) {
                Ok(a) => IpAddr::from(a),
                Err(_) => return Way::In,
            }
        }
        _ => return Way::In,
    };
    if reference.protects(source) {
        Way::Out
    } else {
        Way::In
    }
}

/// Runs `frames` as seen on a NIC of `role`, each through the program of its way. The kernel
/// programs are loaded privately (nothing is attached) and bound to the loopback device, where
/// test runs arrive.
pub fn replay(compiled: Compiled, role: &str, frames: &[Frame]) -> Result<Report, LoadError> {
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
    // Both programs count into the NIC's one block, so each frame's share is read off the
    // counters it moved and added up per way.
    let mut ingress = Tally::new(slots.len());
    let mut egress = Tally::new(slots.len());
    let mut report = Report::default();
    let mut last = c.maps().iface_stats(binding.block, &slots)?;
    for (i, f) in frames.iter().enumerate() {
        if f.len() < ETH_HLEN {
            report.outcomes.push(Outcome::TooShort);
            continue;
        }
        let way = way(&reference, f);
        let opts = TestRunOptions {
            data_in: Some(f),
            ..TestRunOptions::new()
        };
        // The kernel's flows age by jiffies, which a test run cannot set and a capture's times
        // do not give: the reference sees one instant (0) for every frame, and neither side
        // expires a flow within the replay (as long as it runs for less than the shortest
        // timeout).
        let (want, got) = match way {
            Way::In => (
                reference.ingress(f, role_mask, &mut flows, 0),
                c.program().test_run(opts),
            ),
            Way::Out => (
                reference.egress(f, role_mask, &mut flows, 0),
                c.egress_program().test_run(opts),
            ),
        };
        let ret = got.map_err(LoadError::Program)?.return_value;
        let pass = match way {
            Way::In => ret == crate::loader::XDP_PASS,
            Way::Out => ret == TC_ACT_UNSPEC,
        };
        let tally = match way {
            Way::In => &mut ingress,
            Way::Out => &mut egress,
        };
        tally.frames += 1;
        let now = c.maps().iface_stats(binding.block, &slots)?;
        let mut moved = Vec::new();
        for (r, (b, a)) in last.reasons.iter().zip(&now.reasons).enumerate() {
            if a.packets != b.packets {
                moved.push(Counted::Reason(r as u32));
                tally.reasons[r] += a.packets - b.packets;
            }
        }
        for (r, (b, a)) in last.rules.iter().zip(&now.rules).enumerate() {
            if a.packets != b.packets {
                moved.push(Counted::Rule(slots[r]));
                tally.rules[r] += a.packets - b.packets;
            }
        }
        last = now;
        let counted: Vec<Counter> = moved
            .iter()
            .map(|m| counter(&reference_compiled, *m))
            .collect();
        if pass != want.pass || moved != [want.counted] {
            report.disagreements.push(Disagreement {
                frame: i,
                way,
                kernel: describe(pass, &counted),
                reference: describe(want.pass, &[counter(&reference_compiled, want.counted)]),
            });
        }
        report.outcomes.push(Outcome::Ran { way, pass, counted });
    }
    report.ingress = ingress.counts(&reference_compiled);
    report.egress = egress.counts(&reference_compiled);
    Ok(report)
}

/// Writes one line per frame, in capture order, with five fields separated by tabs (shown here
/// as spaces):
///
/// ```text
/// 1  1718000000.123456  out  pass     rule:sip-federation-out
/// 2  1718000000.123901  in   drop     reason:not_established
/// 3  1718000000.124002  -    skipped  too_short
/// ```
///
/// The frame's number, from 1 as Wireshark counts; its capture time in seconds since the Unix
/// epoch, with microseconds; its way, `in` (XDP) or `out` (TC egress); the kernel's verdict,
/// `pass` or `drop`; the counter the kernel moved, `rule:ID` or `reason:NAME` (reason names as
/// the metrics label them). A frame shorter than an Ethernet header was not run: `-`,
/// `skipped`, `too_short`. Where the kernel moved other than one counter (the report lists a
/// disagreement for that frame) the last field lists them with commas, or says `none`.
pub fn write_verdicts(out: &mut impl Write, frames: &[Frame], report: &Report) -> io::Result<()> {
    for (i, (f, o)) in frames.iter().zip(&report.outcomes).enumerate() {
        let n = i + 1;
        let time = format!("{}.{:06}", f.time.as_secs(), f.time.subsec_micros());
        match o {
            Outcome::TooShort => writeln!(out, "{n}\t{time}\t-\tskipped\ttoo_short")?,
            Outcome::Ran { way, pass, counted } => {
                let counter = if counted.is_empty() {
                    "none".to_string()
                } else {
                    counted
                        .iter()
                        .map(|c| match c {
                            Counter::Rule(id) => format!("rule:{id}"),
                            Counter::Reason(name) => format!("reason:{name}"),
                        })
                        .collect::<Vec<_>>()
                        .join(",")
                };
                writeln!(
                    out,
                    "{n}\t{time}\t{}\t{}\t{counter}",
                    way_name(*way),
                    if *pass { "pass" } else { "drop" }
                )?;
            }
        }
    }
    Ok(())
}
