//! `edge-classifier explain`: what the classifier would do with one flow's first frame (or one
//! ICMP message), and why, from the reference classifier (no kernel, no privileges). A drop also
//! names the nearest rule and what kept it from matching.

use std::{fmt, net::IpAddr};

use edge_classifier_common::reason;
use etherparse::PacketBuilder;
use serde::Serialize;

use crate::{
    catalogue::{ANY, Catalogue, Direction, PortSide, Rule, Transport, dns::Resolved},
    compile::Compiled,
    reference::{Counted, FlowTable, Reference, Verdict},
};

/// Which way the frame goes through the Edge's NIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Way {
    /// Arriving (XDP).
    In,
    /// Sent by the Edge (TC egress).
    Out,
}

/// What is sent: a TCP SYN or a UDP datagram between two sockets, or an ICMP/ICMPv6 message of
/// a type between two addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    L4 {
        transport: Transport,
        src: (IpAddr, u16),
        dst: (IpAddr, u16),
    },
    Icmp {
        ty: u8,
        src: IpAddr,
        dst: IpAddr,
    },
}

impl Probe {
    fn addrs(&self) -> (IpAddr, IpAddr) {
        match *self {
            Probe::L4 { src, dst, .. } => (src.0, dst.0),
            Probe::Icmp { src, dst, .. } => (src, dst),
        }
    }
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sock = |(a, p): (IpAddr, u16)| match a {
            IpAddr::V4(_) => format!("{a}:{p}"),
            IpAddr::V6(_) => format!("[{a}]:{p}"),
        };
        match *self {
            Probe::L4 {
                transport: Transport::Tcp,
                src,
                dst,
            } => write!(f, "TCP SYN {} -> {}", sock(src), sock(dst)),
            Probe::L4 { src, dst, .. } => write!(f, "UDP datagram {} -> {}", sock(src), sock(dst)),
            Probe::Icmp { ty, src, dst } => write!(
                f,
                "{} type {ty} {src} -> {dst}",
                if src.is_ipv6() { "ICMPv6" } else { "ICMP" }
            ),
        }
    }
}

/// The rule closest to matching a dropped frame, and what differed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NearMiss {
    pub rule: String,
    pub seed_row: Option<String>,
    /// What the rule covers: `tcp 5061 on external`.
    pub covers: String,
    /// Each difference, e.g. `192.0.2.77 is not in public_im_partners`.
    pub differs: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Explanation {
    /// The catalogue answering: its source and whether it is the running one or the default.
    pub catalogue: String,
    pub way: Way,
    #[serde(serialize_with = "display")]
    pub probe: Probe,
    pub role: String,
    pub pass: bool,
    /// The rule that decided (id, seed row, direction, ports), if a rule did.
    pub rule: Option<(String, String, String, String)>,
    /// The reason counted, when no rule decided.
    pub reason: Option<&'static str>,
    pub why: &'static str,
    pub near_miss: Option<NearMiss>,
    /// The reply was checked against the flow the Edge would have recorded sending the
    /// reverse frame (`--established`).
    pub established: bool,
    /// For each of the frame's addresses that DNS put in a set: the set, the catalogue's
    /// domain or host, and the records that led to it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub from_dns: Vec<String>,
    /// The deciding rule's limit on new flows: this frame, the first of its source, is within
    /// it; beyond the limit such frames drop as `rate_limited`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<String>,
}

fn display<S: serde::Serializer>(p: &Probe, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(p)
}

#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error("{src} and {dst} are of different address families")]
    MixedFamilies { src: IpAddr, dst: IpAddr },
    #[error("interface role `{role}` is not in the catalogue: expected one of {known}")]
    UnknownRole { role: String, known: String },
    #[error("--established is for a TCP or UDP reply, not ICMP")]
    EstablishedIcmp,
    #[error("building the frame: {0}")]
    Build(#[from] etherparse::err::packet::BuildWriteError),
}

/// The frame of `probe`: a TCP SYN, a UDP datagram, or an ICMP message of its type (code 0).
pub fn frame(probe: &Probe) -> Result<Vec<u8>, ExplainError> {
    let eth = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
    let (s, d) = probe.addrs();
    let ip = match (s, d) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), 64),
        _ => return Err(ExplainError::MixedFamilies { src: s, dst: d }),
    };
    let mut out = Vec::new();
    match *probe {
        Probe::L4 {
            transport: Transport::Tcp,
            src,
            dst,
        } => ip.tcp(src.1, dst.1, 1, 64240).syn().write(&mut out, &[])?,
        Probe::L4 { src, dst, .. } => ip.udp(src.1, dst.1).write(&mut out, &[])?,
        Probe::Icmp { ty, src, .. } if src.is_ipv6() => {
            ip.icmpv6_raw(ty, 0, [0; 4]).write(&mut out, &[])?
        }
        Probe::Icmp { ty, .. } => ip.icmpv4_raw(ty, 0, [0; 4]).write(&mut out, &[])?,
    }
    Ok(out)
}

/// `probe` on a NIC of `role` as `cat` (compiled as `compiled`) decides it; `catalogue` says
/// which catalogue that is, for the answer.
pub fn explain(
    cat: &Catalogue,
    compiled: &Compiled,
    catalogue: &str,
    role: &str,
    way: Way,
    probe: Probe,
    established: bool,
) -> Result<Explanation, ExplainError> {
    let role_mask = compiled
        .role_mask(role)
        .ok_or_else(|| ExplainError::UnknownRole {
            role: role.to_string(),
            known: compiled.roles.join(", "),
        })?;
    let reference = Reference::new(compiled);
    let mut flows = FlowTable::default();
    let f = frame(&probe)?;
    let verdict: Verdict = match way {
        Way::In => {
            if established {
                // The frame the Edge would have sent to open this flow.
                let reverse = match probe {
                    Probe::L4 {
                        transport,
                        src,
                        dst,
                    } => Probe::L4 {
                        transport,
                        src: dst,
                        dst: src,
                    },
                    Probe::Icmp { .. } => return Err(ExplainError::EstablishedIcmp),
                };
                reference.egress(&frame(&reverse)?, role_mask, &mut flows, 0);
            }
            reference.ingress(&f, role_mask, &mut flows, 0)
        }
        Way::Out => reference.egress(&f, role_mask, &mut flows, 0),
    };
    let limit = match verdict.counted {
        Counted::Rule(slot) => compiled
            .rules
            .iter()
            .find(|r| r.slot == slot)
            .and_then(|r| r.limit.as_ref())
            .map(|l| l.limit.to_string()),
        Counted::Reason(_) => None,
    };
    let (rule, reason_name, why) = match verdict.counted {
        Counted::Rule(slot) => (
            compiled.rules.iter().find(|r| r.slot == slot).map(|r| {
                (
                    r.id.clone(),
                    r.seed_row.clone(),
                    r.direction.to_string(),
                    r.ports.clone(),
                )
            }),
            None,
            "",
        ),
        Counted::Reason(r) => (None, Some(reason::NAMES[r as usize].0), why(r)),
    };
    let near_miss = if verdict.pass {
        None
    } else {
        nearest(cat, role, way, &probe)
    };
    Ok(Explanation {
        catalogue: catalogue.to_string(),
        way,
        probe,
        role: role.to_string(),
        pass: verdict.pass,
        rule,
        reason: reason_name,
        why,
        near_miss,
        established,
        from_dns: Vec::new(),
        limit,
    })
}

/// Which of `probe`'s addresses DNS put in which set, and through which records (what
/// `resolved`, the running buffer's record, says).
pub fn dns_origins(resolved: &Resolved, probe: &Probe) -> Vec<String> {
    let (s, d) = probe.addrs();
    let mut out = Vec::new();
    for a in [s, d] {
        for (set, addrs) in resolved {
            if let Some(o) = addrs.get(&a) {
                out.push(format!("{a} is in {set} from DNS: {} ({})", o.name, o.via));
            }
        }
    }
    out
}

fn in_set(cat: &Catalogue, set: &str, a: IpAddr) -> bool {
    set == ANY
        || cat
            .sets
            .get(set)
            .is_some_and(|nets| nets.iter().any(|n| n.contains(&a)))
}

/// The rule that differs least from `probe`, read the way the frame goes: an arriving frame
/// against inbound rules and outbound rules' replies, a sent one against outbound rules. The
/// transport and port say which service a frame is for, so they weigh most, then the NIC's
/// role, then each address set. An arriving frame is read as a first frame before it is read as
/// a reply, and a reply whose only fault is the missing flow is the nearest of all; file order
/// breaks ties.
/// ICMP has no rules: the policy's type lists decide it.
fn nearest(cat: &Catalogue, role: &str, way: Way, probe: &Probe) -> Option<NearMiss> {
    let Probe::L4 {
        transport,
        src,
        dst,
    } = *probe
    else {
        return None;
    };
    // (the Edge's side, the peer's side) of the frame.
    let (edge, peer) = match way {
        Way::In => (dst, src),
        Way::Out => (src, dst),
    };
    let mut best: Option<(usize, &Rule, Vec<String>)> = None;
    const NO_FLOW: &str = "the Edge opened no such flow (a reply needs one)";
    for r in &cat.rules {
        // Inbound rules cover arriving first frames; outbound rules cover what the Edge sends
        // and (as replies) what arrives from their service port.
        let reply = way == Way::In && r.direction == Direction::Outbound;
        if way == Way::Out && r.direction == Direction::Inbound {
            continue;
        }
        let mut differs = Vec::new();
        let mut weight = 0;
        if r.interface != role {
            differs.push(format!("it is for {} NICs, not {role}", r.interface));
            weight += 2;
        }
        if r.transport != transport {
            differs.push(format!("it is {}, not {transport}", r.transport));
            weight += 3;
        }
        let port = match (r.direction, r.port_side) {
            (Direction::Inbound, _) | (Direction::Outbound, PortSide::Local) => edge.1,
            (Direction::Outbound, PortSide::Service) => peer.1,
        };
        if !r.ports.contains(port) {
            differs.push(format!("port {port} is not {}", r.ports_label()));
            weight += 3;
        }
        if !in_set(cat, &r.local, edge.0) {
            differs.push(format!("{} is not in {}", edge.0, r.local));
            weight += 1;
        }
        if !in_set(cat, &r.remote, peer.0) {
            differs.push(format!("{} is not in {}", peer.0, r.remote));
            weight += 1;
        }
        let score = if reply && differs.is_empty() {
            differs.push(NO_FLOW.to_string());
            1
        } else {
            2 * weight + usize::from(reply)
        };
        if differs.is_empty() {
            // It matches: whatever dropped the frame is not this rule's business (an earlier
            // verdict such as a fragment or malformed header).
            continue;
        }
        if best.as_ref().is_none_or(|(n, ..)| score < *n) {
            best = Some((score, r, differs));
        }
    }
    best.map(|(_, r, differs)| NearMiss {
        rule: r.id.clone(),
        seed_row: r.seed_row.clone(),
        covers: format!(
            "{} {} {} on {}",
            r.direction,
            r.transport,
            r.ports_label(),
            r.interface
        ),
        differs,
    })
}

fn why(r: u32) -> &'static str {
    match r {
        reason::DROP_NO_RULE => "no rule of the catalogue allows it",
        reason::DROP_NOT_ESTABLISHED => {
            "it claims to answer a flow of an outbound rule, and the Edge opened no such flow (try --established)"
        }
        reason::PASS_UNPROTECTED | reason::DROP_UNPROTECTED => {
            "the destination is not one of the Edge's protected addresses; policy.unprotected decides"
        }
        reason::PASS_MONITOR => "no rule allows it, but policy.default is pass (monitor mode)",
        reason::PASS_ICMP => "its type is in the policy's icmp/icmpv6 list",
        reason::DROP_ICMP => "its type is not in the policy's icmp/icmpv6 list",
        reason::PASS_NEIGHBOUR_DISCOVERY => "IPv6 neighbour discovery always passes",
        reason::PASS_EGRESS_REPLY => "it answers from an inbound rule's service port",
        reason::PASS_EGRESS_UNPROTECTED => {
            "the source is not one of the Edge's protected addresses"
        }
        reason::PASS_EGRESS_NO_RULE | reason::DROP_EGRESS_NO_RULE => {
            "no outbound rule allows it; policy.egress decides"
        }
        reason::PASS_EGRESS_TRACKED => {
            "no outbound rule covers it; policy.egress = \"track\" records its flow, so its replies pass"
        }
        reason::PASS_TRACKED_REPLY => {
            "it answers a flow the Edge opened outside the rules (policy.egress = \"track\")"
        }
        reason::DROP_RATE_LIMITED => {
            "a new flow of a rule with a limit, over its source's or the rule's total budget"
        }
        reason::PASS_MONITOR_RATE_LIMITED => {
            "a new flow over its rule's limit, passed because policy.default is pass (monitor mode)"
        }
        reason::TX_SYN_COOKIE => {
            "a SYN over its rule's limit, which has syn_proxy: answered from XDP with a SYN-ACK carrying a SYN cookie (sent back, never reaching the stack)"
        }
        reason::PASS_SYN_COOKIE_ACK => {
            "an ACK of no connection carrying a valid SYN cookie while its rule's SYN proxy answers SYNs"
        }
        reason::DROP_SYN_COOKIE_INVALID => {
            "an ACK of no connection without a valid SYN cookie while its rule's SYN proxy answers SYNs"
        }
        _ => "",
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.pass { "pass" } else { "drop" };
        let way = match self.way {
            Way::In => "arriving on",
            Way::Out => "sent from",
        };
        writeln!(f, "catalogue: {}", self.catalogue)?;
        writeln!(
            f,
            "{} {way} an {} NIC{}:",
            self.probe,
            self.role,
            if self.established {
                ", after the Edge opened the reverse flow"
            } else {
                ""
            }
        )?;
        match (&self.rule, self.reason) {
            (Some((id, row, direction, ports)), _) => {
                let row = if row.is_empty() {
                    String::new()
                } else {
                    format!(", seed row {row}")
                };
                let transport = match self.probe {
                    Probe::L4 { transport, .. } => transport.to_string(),
                    Probe::Icmp { .. } => String::new(),
                };
                write!(
                    f,
                    "{verdict}: rule {id}{row} ({direction} {transport} {ports})"
                )?;
            }
            (None, Some(name)) if self.why.is_empty() => write!(f, "{verdict}: {name}")?,
            (None, Some(name)) => write!(f, "{verdict}: {name}: {}", self.why)?,
            (None, None) => write!(f, "{verdict}")?,
        }
        if let Some(n) = &self.near_miss {
            let row = n
                .seed_row
                .as_ref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default();
            write!(
                f,
                "\nnearest rule: {}{row} covers {}, but {}",
                n.rule,
                n.covers,
                n.differs.join(" and ")
            )?;
        }
        if let Some(l) = &self.limit {
            write!(
                f,
                "\nlimit on new flows: {l}; beyond it a new flow drops as rate_limited"
            )?;
        }
        for line in &self.from_dns {
            write!(f, "\n{line}")?;
        }
        Ok(())
    }
}
