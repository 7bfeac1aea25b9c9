//! `edge-classifier explain`: what the classifier would do with one flow's first frame, and
//! why, from the reference classifier (no kernel, no privileges).

use std::{fmt, net::SocketAddr};

use edge_classifier_common::reason;
use etherparse::PacketBuilder;

use crate::{
    catalogue::Transport,
    compile::Compiled,
    reference::{Counted, FlowTable, Reference, Verdict},
};

/// Which way the frame goes through the Edge's NIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    /// Arriving (XDP).
    In,
    /// Sent by the Edge (TC egress).
    Out,
}

#[derive(Debug)]
pub struct Explanation {
    pub way: Way,
    pub transport: Transport,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub role: String,
    pub verdict: Verdict,
    /// (id, seed row, direction, ports) of the rule that decided, if a rule did.
    pub rule: Option<(String, String, String, String)>,
    /// The reply was checked against the flow the Edge would have recorded sending the
    /// reverse frame (`--established`).
    pub established: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error("{src} and {dst} are of different address families")]
    MixedFamilies { src: SocketAddr, dst: SocketAddr },
    #[error("interface role `{role}` is not in the catalogue: expected one of {known}")]
    UnknownRole { role: String, known: String },
    #[error("building the frame: {0}")]
    Build(#[from] etherparse::err::packet::BuildWriteError),
}

/// A TCP SYN (or a UDP datagram) from `src` to `dst`.
pub fn frame(
    transport: Transport,
    src: SocketAddr,
    dst: SocketAddr,
) -> Result<Vec<u8>, ExplainError> {
    let eth = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
    let ip = match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => eth.ipv4(s.ip().octets(), d.ip().octets(), 64),
        (SocketAddr::V6(s), SocketAddr::V6(d)) => eth.ipv6(s.ip().octets(), d.ip().octets(), 64),
        _ => return Err(ExplainError::MixedFamilies { src, dst }),
    };
    let mut out = Vec::new();
    match transport {
        Transport::Tcp => ip
            .tcp(src.port(), dst.port(), 1, 64240)
            .syn()
            .write(&mut out, &[])?,
        Transport::Udp => ip.udp(src.port(), dst.port()).write(&mut out, &[])?,
    }
    Ok(out)
}

pub fn explain(
    compiled: &Compiled,
    role: &str,
    way: Way,
    transport: Transport,
    src: SocketAddr,
    dst: SocketAddr,
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
    let f = frame(transport, src, dst)?;
    let verdict = match way {
        Way::In => {
            if established {
                // The frame the Edge would have sent to open this flow.
                let reverse = frame(transport, dst, src)?;
                reference.egress(&reverse, role_mask, &mut flows, 0);
            }
            reference.ingress(&f, role_mask, &mut flows, 0)
        }
        Way::Out => reference.egress(&f, role_mask, &mut flows, 0),
    };
    let rule = match verdict.counted {
        Counted::Rule(slot) => compiled.rules.iter().find(|r| r.slot == slot).map(|r| {
            (
                r.id.clone(),
                r.seed_row.clone(),
                r.direction.to_string(),
                r.ports.clone(),
            )
        }),
        Counted::Reason(_) => None,
    };
    Ok(Explanation {
        way,
        transport,
        src,
        dst,
        role: role.to_string(),
        verdict,
        rule,
        established,
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
        _ => "",
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.verdict.pass { "pass" } else { "drop" };
        let way = match self.way {
            Way::In => "arriving on",
            Way::Out => "sent from",
        };
        let first = if self.transport == Transport::Tcp {
            "TCP SYN"
        } else {
            "UDP datagram"
        };
        writeln!(
            f,
            "{first} {} -> {}, {way} an {} NIC{}:",
            self.src,
            self.dst,
            self.role,
            if self.established {
                ", after the Edge opened the reverse flow"
            } else {
                ""
            }
        )?;
        match (&self.rule, self.verdict.counted) {
            (Some((id, row, direction, ports)), _) => {
                let row = if row.is_empty() {
                    String::new()
                } else {
                    format!(", seed row {row}")
                };
                write!(
                    f,
                    "{verdict}: rule {id}{row} ({direction} {} {ports})",
                    self.transport
                )
            }
            (None, Counted::Reason(r)) => {
                let (name, _) = reason::NAMES[r as usize];
                let why = why(r);
                if why.is_empty() {
                    write!(f, "{verdict}: {name}")
                } else {
                    write!(f, "{verdict}: {name}: {why}")
                }
            }
            (None, Counted::Rule(slot)) => write!(f, "{verdict}: rule slot {slot}"),
        }
    }
}
