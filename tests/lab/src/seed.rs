//! The ten seed rows of the port matrix (`shared/seed/port-matrix.md`) as the default catalogue
//! carries them, on the lab's addresses: the one fixture table that the TestRun fixtures, the lab
//! run, the benchmarks and `per_frame_cost` all draw their seed-row frames from.

use std::net::IpAddr;

use crate::{
    CLIENT_V4, CLIENT_V6, EDGE_EXT_V4, EDGE_EXT_V6, EDGE_INT_V4, EDGE_INT_V6, FE_V4, FE_V6,
    PARTNER_V4, PARTNER_V6,
};

/// One seed row.
#[derive(Debug, Clone, Copy)]
pub struct SeedRow {
    /// `P1`, `S1`, …
    pub row: &'static str,
    /// The default catalogue's rule id for it (its counters are keyed by it).
    pub rule: &'static str,
    pub udp: bool,
    /// The peer connects to the Edge (`true`), or the Edge opens the flow (`false`).
    pub inbound: bool,
    /// The role of the NIC it uses.
    pub role: &'static str,
    /// The service port: the Edge's for an inbound row, the remote's for an outbound one; for
    /// P4, whose fixed port is the Edge's media range, a port of that range.
    pub port: u16,
    /// Who may use it: a partner of `public_im_partners`, anyone, or the Front End.
    pub peer: Peer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    Partner,
    Anyone,
    FrontEnd,
}

impl SeedRow {
    /// The Edge's address on this row's NIC.
    pub fn edge(&self, v6: bool) -> IpAddr {
        match (self.role, v6) {
            ("internal", false) => EDGE_INT_V4,
            ("internal", true) => EDGE_INT_V6,
            (_, false) => EDGE_EXT_V4,
            (_, true) => EDGE_EXT_V6,
        }
    }

    /// A peer allowed on this row.
    pub fn peer(&self, v6: bool) -> IpAddr {
        match (self.peer, v6) {
            (Peer::Partner, false) => PARTNER_V4,
            (Peer::Partner, true) => PARTNER_V6,
            (Peer::Anyone, false) => CLIENT_V4,
            (Peer::Anyone, true) => CLIENT_V6,
            (Peer::FrontEnd, false) => FE_V4,
            (Peer::FrontEnd, true) => FE_V6,
        }
    }

    /// (source, source port, destination, destination port) of the row's first frame: the
    /// peer's to the Edge for an inbound row, the Edge's to the peer for an outbound one.
    pub fn first(&self, v6: bool) -> (IpAddr, u16, IpAddr, u16) {
        let (edge, peer) = (self.edge(v6), self.peer(v6));
        match (self.inbound, self.row) {
            (true, _) => (peer, 40000, edge, self.port),
            // P4: the Edge's media port is the fixed one; the Messenger client's is any (7000
            // here, clear of the ports the lab's remote host uses as sources).
            (false, "P4") => (edge, self.port, peer, 7000),
            (false, _) => (edge, 41000, peer, self.port),
        }
    }
}

/// The seed rows, in the order of the seed page.
pub const SEED_ROWS: [SeedRow; 10] = [
    row(
        "S1",
        "sip-federation-out",
        false,
        false,
        "external",
        5061,
        Peer::Anyone,
    ),
    row(
        "P1",
        "public-im-sip-in",
        false,
        true,
        "external",
        5061,
        Peer::Partner,
    ),
    row(
        "P2",
        "public-im-sip-out",
        false,
        false,
        "external",
        5061,
        Peer::Partner,
    ),
    row(
        "P3",
        "client-sip-tls-in",
        false,
        true,
        "external",
        443,
        Peer::Anyone,
    ),
    row(
        "P4",
        "messenger-rtp-tcp-out",
        false,
        false,
        "external",
        50010,
        Peer::Anyone,
    ),
    row(
        "P5",
        "messenger-stun-out",
        true,
        false,
        "external",
        3478,
        Peer::Anyone,
    ),
    row(
        "P6",
        "messenger-stun-in",
        true,
        true,
        "external",
        3478,
        Peer::Anyone,
    ),
    row(
        "X1",
        "xmpp-federation-in",
        false,
        true,
        "external",
        5269,
        Peer::Anyone,
    ),
    row(
        "X2",
        "xmpp-federation-out",
        false,
        false,
        "external",
        5269,
        Peer::Anyone,
    ),
    row(
        "X3",
        "xmpp-gateway-internal-in",
        false,
        true,
        "internal",
        23456,
        Peer::FrontEnd,
    ),
];

const fn row(
    row: &'static str,
    rule: &'static str,
    udp: bool,
    inbound: bool,
    role: &'static str,
    port: u16,
    peer: Peer,
) -> SeedRow {
    SeedRow {
        row,
        rule,
        udp,
        inbound,
        role,
        port,
        peer,
    }
}

/// A seed row by its name.
pub fn seed(row: &str) -> SeedRow {
    *SEED_ROWS
        .iter()
        .find(|r| r.row == row)
        .unwrap_or_else(|| panic!("no seed row {row}"))
}
