//! Every rule of every shipped profile, through the compiled programs (BPF_PROG_TEST_RUN): an
//! inbound rule's first frame passes and counts under it from an address of its remote set; an
//! outbound rule's first frame is recorded on egress and its reply passes, both under the rule;
//! the same port from outside a named remote set drops. Both address families, both ends of a
//! port range, on a NIC of the rule's role.

use std::net::IpAddr;

use edge_classifier::catalogue::{
    ANY, Catalogue, Direction, PortSide, Rule, Transport, profiles::PROFILES,
};
use edge_classifier_tests::*;
use ipnet::IpNet;

/// Addresses in no set of any profile (RFC 2544 benchmarking, and an unused 2001:db8 corner):
/// they stand for "anyone on the Internet".
const OUTSIDE_V4: &str = "198.18.0.77";
const OUTSIDE_V6: &str = "2001:db8:ffff::77";
/// The peer's port of a flow whose rule names the Edge's own port, and the Edge's ephemeral
/// port of a flow whose rule names the peer's.
const PEER_PORT: u16 = 40000;
const EDGE_PORT: u16 = 41000;

/// A host address of `set` in the family of `v6`: the prefix's first host.
fn host_of(cat: &Catalogue, set: &str, v6: bool) -> Option<IpAddr> {
    if set == ANY {
        let a: IpAddr = if v6 { OUTSIDE_V6 } else { OUTSIDE_V4 }.parse().unwrap();
        assert!(
            cat.sets.values().flatten().all(|n| !n.contains(&a)),
            "{a} must be outside every set"
        );
        return Some(a);
    }
    let net: &IpNet = cat.sets[set].iter().find(|n| n.addr().is_ipv6() == v6)?;
    Some(match net {
        IpNet::V4(n) if n.prefix_len() < 31 => IpAddr::V4((u32::from(n.network()) + 1).into()),
        IpNet::V6(n) if n.prefix_len() < 127 => IpAddr::V6((u128::from(n.network()) + 1).into()),
        n => n.addr(),
    })
}

fn frame(t: Transport, src: IpAddr, sport: u16, dst: IpAddr, dport: u16, first: bool) -> Vec<u8> {
    match t {
        Transport::Tcp => tcp_segment(src, sport, dst, dport, if first { SYN } else { SYN | ACK }),
        Transport::Udp => udp(src, sport, dst, dport),
    }
}

/// An earlier-or-later inbound rule of the same NIC role that lets anyone reach this port of
/// this local set: then "from outside the remote set" is not a drop.
fn open_to_anyone(cat: &Catalogue, r: &Rule, port: u16) -> bool {
    cat.rules.iter().any(|o| {
        o.direction == Direction::Inbound
            && o.interface == r.interface
            && o.transport == r.transport
            && o.remote == ANY
            && o.local == r.local
            && o.port_side == PortSide::Service
            && o.ports.contains(port)
    })
}

fn leak(s: &str) -> &'static str {
    Box::leak(s.to_string().into_boxed_str())
}

#[test]
fn every_rule_of_every_profile_matches_its_own_frames() {
    let mut checked = 0usize;
    for profile in PROFILES {
        let cat = Catalogue::parse(&format!("{}.toml", profile.name), profile.text)
            .unwrap_or_else(|e| panic!("profile {}: {e}", profile.name));
        for role in cat.interfaces.keys() {
            let mut h = Harness::new(&cat, role);
            for r in cat.rules.iter().filter(|r| &r.interface == role) {
                let id = leak(&r.id);
                let mut families = 0;
                for v6 in [false, true] {
                    let (Some(local), Some(remote)) =
                        (host_of(&cat, &r.local, v6), host_of(&cat, &r.remote, v6))
                    else {
                        continue;
                    };
                    families += 1;
                    for port in [r.ports.lo, r.ports.hi] {
                        let name = format!("{} {id} [{local}]:{port} <-> [{remote}]", profile.name);
                        match (r.direction, r.port_side) {
                            (Direction::Inbound, _) => {
                                h.expect(
                                    &format!("{name}: first frame in"),
                                    &frame(r.transport, remote, PEER_PORT, local, port, true),
                                    XDP_PASS,
                                    &Expected::Rule(id),
                                );
                                let outsider = host_of(&cat, ANY, v6).unwrap();
                                if r.remote != ANY && !open_to_anyone(&cat, r, port) {
                                    h.expect(
                                        &format!("{name}: from outside `{}`", r.remote),
                                        &frame(r.transport, outsider, PEER_PORT, local, port, true),
                                        XDP_DROP,
                                        &drop_reason("no_rule"),
                                    );
                                }
                            }
                            (Direction::Outbound, side) => {
                                let (lport, rport) = match side {
                                    PortSide::Service => (EDGE_PORT, port),
                                    PortSide::Local => (port, PEER_PORT),
                                };
                                h.expect_dir(
                                    Dir::Out,
                                    &format!("{name}: first frame out"),
                                    &frame(r.transport, local, lport, remote, rport, true),
                                    TC_NEXT,
                                    &Expected::Rule(id),
                                );
                                h.expect(
                                    &format!("{name}: its reply"),
                                    &frame(r.transport, remote, rport, local, lport, false),
                                    XDP_PASS,
                                    &Expected::Rule(id),
                                );
                            }
                        }
                        checked += 1;
                    }
                }
                assert!(
                    families > 0,
                    "{} {id}: no address family to test",
                    profile.name
                );
            }
        }
    }
    eprintln!(
        "{checked} rule/family/port cases across {} profiles",
        PROFILES.len()
    );
}

#[test]
fn every_profile_checks_clean_and_tracks_the_edges_own_flows() {
    for profile in PROFILES {
        let cat = Catalogue::parse(profile.name, profile.text)
            .unwrap_or_else(|e| panic!("profile {}: {e}", profile.name));
        assert_eq!(
            cat.policy.egress,
            edge_classifier::catalogue::Egress::Track,
            "profile {} must track the Edge's own flows",
            profile.name
        );
        for r in &cat.rules {
            assert!(
                r.note.len() > 40,
                "profile {} rule {}: the note must say where the rule comes from and how it is read",
                profile.name,
                r.id
            );
        }
        let warnings: Vec<String> = cat.warnings().iter().map(|w| w.to_string()).collect();
        assert!(
            warnings.is_empty(),
            "profile {}: `check` must be quiet (acknowledge intended overlaps): {warnings:#?}",
            profile.name
        );
        edge_classifier::compile::compile(&cat)
            .unwrap_or_else(|e| panic!("profile {} compiles: {e}", profile.name));
    }
}
