//! The compiled tables against the catalogue itself.
//!
//! `differential.rs` checks the kernel program against the reference classifier, but both read
//! the same compiled tables (port → class arrays, class candidate lists, pushed-down prefix
//! bits), so a compiler bug — a range expanded one port short, a class holding the wrong rules
//! or in the wrong order, a nested prefix that lost its parent's set bits — is invisible there.
//! This test closes that gap: it writes the catalogue's meaning a third time, as a deliberately
//! naive evaluator over the *parsed* [`Catalogue`] (file-order rule walk, `ipnet` containment
//! on the catalogue's own prefixes, `PortRange` bounds compared directly), and never looks at
//! [`Compiled`] except to translate the reference's counter slot back into a rule id.
//!
//! Scope: ingress frames that are not replies to a recorded flow (the flow table stays empty),
//! TCP and UDP only, on every interface role the catalogue declares. Inbound rules decide by
//! first match; an outbound rule can only *claim* such a frame (from its remote service port,
//! or to its local port range), which without a flow is `not_established`
//! (`monitor_not_established` in monitor mode). No NIC addresses are configured, so
//! `protect_interface_addresses` and the DHCP exception never apply.
//!
//! Frames sit on every boundary: each rule's port range (start−1, start, start+1, end−1, end,
//! end+1, plus 0, 1 and 65535) as destination and as source port, and each prefix of each set
//! (network address, last address, one below, one above) as destination and as source. This
//! runs on the default catalogue (`default_catalogue_tables_match_the_catalogue`), on a
//! hand-written catalogue of nested sets and overlapping ranges
//! (`nested_catalogue_tables_match_the_catalogue`), and on seeded pseudo-random catalogues with
//! nested and duplicated prefixes (IPv4 and IPv6), overlapping port ranges whose first match
//! depends on file order, two or three roles, and both `default` policies
//! (`generated_catalogues_tables_match_the_catalogue`). `corrupted_tables_are_caught` keeps the
//! test honest: tables corrupted the way each kind of compiler bug would corrupt them must fail.
//!
//! `EC_SEMANTICS_SEED` and `EC_SEMANTICS_CATALOGUES` pick another seed or more catalogues for a
//! longer run; a failure prints the whole catalogue text and the frame, so it can be replayed
//! with `edge-classifier explain`.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Instant,
};

use edge_classifier::{
    catalogue::{
        ANY, Action, Catalogue, DEFAULT_CATALOGUE, DEFAULT_NAME, Direction, PortSide, Rule,
        Transport,
    },
    compile::{CompileError, Compiled, compile},
    reference::{Counted, FlowTable, Reference},
};
use edge_classifier_common::{SET_ANY, SET_PROTECTED, TRANSPORT_TCP, TRANSPORT_UDP, reason};
use edge_classifier_tests::{Rng, tcp, udp};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// Generated catalogues per run unless `EC_SEMANTICS_CATALOGUES` says otherwise.
const DEFAULT_GENERATED: usize = 24;
/// Seed of the first generated catalogue unless `EC_SEMANTICS_SEED` says otherwise.
const DEFAULT_SEED: u64 = 0x5eed_ca7a_1095_0001;

// ---------------------------------------------------------------------------------------------
// Frames and answers
// ---------------------------------------------------------------------------------------------

/// One ingress frame, described by the fields a rule can look at.
#[derive(Debug, Clone)]
struct Probe<'a> {
    transport: Transport,
    src: IpAddr,
    sport: u16,
    dst: IpAddr,
    dport: u16,
    role: &'a str,
}

impl fmt::Display for Probe<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `explain`'s argument order, so a failure can be pasted into it.
        let sock = |a: IpAddr, p: u16| match a {
            IpAddr::V4(a) => format!("{a}:{p}"),
            IpAddr::V6(a) => format!("[{a}]:{p}"),
        };
        write!(
            f,
            "{} {} {} on a NIC of role `{}`",
            self.transport,
            sock(self.src, self.sport),
            sock(self.dst, self.dport),
            self.role
        )
    }
}

impl Probe<'_> {
    fn frame(&self) -> Vec<u8> {
        match self.transport {
            Transport::Tcp => tcp(self.src, self.sport, self.dst, self.dport),
            Transport::Udp => udp(self.src, self.sport, self.dst, self.dport),
        }
    }
}

/// What a frame is counted under, in words both sides can produce independently: a rule id, or
/// a reason's counter label with the verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    Rule(String),
    Reason { name: &'static str, pass: bool },
}

impl fmt::Display for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Answer::Rule(id) => write!(f, "rule `{id}` (pass)"),
            Answer::Reason { name, pass: true } => write!(f, "pass `{name}`"),
            Answer::Reason { name, pass: false } => write!(f, "drop `{name}`"),
        }
    }
}

fn passed(name: &'static str) -> Answer {
    Answer::Reason { name, pass: true }
}

fn dropped(name: &'static str) -> Answer {
    Answer::Reason { name, pass: false }
}

// ---------------------------------------------------------------------------------------------
// The independent evaluator: the catalogue's meaning, from the parsed catalogue only
// ---------------------------------------------------------------------------------------------

/// Whether `addr` is in the named set, by plain containment in the catalogue's own prefixes
/// (no longest-prefix match, no set bits: nesting and duplicates need no special case here).
fn in_set(cat: &Catalogue, set: &str, addr: IpAddr) -> bool {
    set == ANY || cat.sets[set].iter().any(|net| net.contains(&addr))
}

/// Protected addresses: the `protected` sets and every rule's local set.
fn protected(cat: &Catalogue, addr: IpAddr) -> bool {
    cat.policy.protected.iter().any(|s| in_set(cat, s, addr))
        || cat.rules.iter().any(|r| in_set(cat, &r.local, addr))
}

/// Every inbound rule that allows the frame, in file order.
fn inbound_matches<'c>(cat: &'c Catalogue, p: &Probe) -> Vec<&'c Rule> {
    cat.rules
        .iter()
        .filter(|r| {
            r.direction == Direction::Inbound
                && r.transport == p.transport
                && r.interface == p.role
                && r.ports.contains(p.dport)
                && in_set(cat, &r.local, p.dst)
                && in_set(cat, &r.remote, p.src)
        })
        .collect()
}

/// Whether an outbound rule takes the frame for one of its replies: from the remote service
/// port, or (`local_port`) to the Edge's own port range. With no flow recorded, that is not an
/// allowance but `not_established`.
fn claimed_as_reply(cat: &Catalogue, p: &Probe) -> bool {
    cat.rules.iter().any(|r| {
        r.direction == Direction::Outbound
            && r.transport == p.transport
            && r.interface == p.role
            && match r.port_side {
                PortSide::Service => r.ports.contains(p.sport),
                PortSide::Local => r.ports.contains(p.dport),
            }
            && in_set(cat, &r.local, p.dst)
            && in_set(cat, &r.remote, p.src)
    })
}

/// The catalogue's verdict for a frame that is not a reply to a recorded flow.
fn evaluate(cat: &Catalogue, p: &Probe) -> Answer {
    let monitor = cat.policy.default == Action::Pass;
    if !protected(cat, p.dst) {
        return match cat.policy.unprotected {
            Action::Pass => passed("unprotected"),
            Action::Drop => dropped("unprotected"),
        };
    }
    // First match wins: the rule earliest in the file.
    if let Some(rule) = inbound_matches(cat, p).first() {
        return Answer::Rule(rule.id.clone());
    }
    match (claimed_as_reply(cat, p), monitor) {
        (true, false) => dropped("not_established"),
        (true, true) => passed("monitor_not_established"),
        (false, false) => dropped("no_rule"),
        (false, true) => passed("monitor"),
    }
}

// ---------------------------------------------------------------------------------------------
// Boundaries
// ---------------------------------------------------------------------------------------------

/// Network address, last address, and the addresses just outside either end.
fn prefix_boundaries(net: &IpNet) -> Vec<IpAddr> {
    match net {
        IpNet::V4(n) => {
            let (lo, hi) = (u32::from(n.network()), u32::from(n.broadcast()));
            [lo.checked_sub(1), Some(lo), Some(hi), hi.checked_add(1)]
                .into_iter()
                .flatten()
                .map(|a| IpAddr::V4(Ipv4Addr::from(a)))
                .collect()
        }
        IpNet::V6(n) => {
            let (lo, hi) = (u128::from(n.network()), u128::from(n.broadcast()));
            [lo.checked_sub(1), Some(lo), Some(hi), hi.checked_add(1)]
                .into_iter()
                .flatten()
                .map(|a| IpAddr::V6(Ipv6Addr::from(a)))
                .collect()
        }
    }
}

/// Addresses no generated or default set is built around, at the ends of each family too.
fn outside_addresses() -> Vec<IpAddr> {
    [
        "0.0.0.0",
        "10.200.0.1",
        "255.255.255.255",
        "::",
        "2001:db8:ffff::1",
        "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
    ]
    .iter()
    .map(|a| a.parse().expect("valid address"))
    .collect()
}

/// Every prefix boundary of every set, plus the outside addresses.
fn boundary_addresses(cat: &Catalogue) -> Vec<IpAddr> {
    let mut out: BTreeSet<IpAddr> = outside_addresses().into_iter().collect();
    for net in cat.sets.values().flatten() {
        out.extend(prefix_boundaries(net));
    }
    out.into_iter().collect()
}

/// Each prefix's first and last address plus the outside ones: one address inside every
/// prefix (so every set, and every nesting level, is reached) without the full boundary list,
/// for the sweeps that vary ports.
fn representative_addresses(cat: &Catalogue) -> Vec<IpAddr> {
    let mut out: BTreeSet<IpAddr> = outside_addresses().into_iter().collect();
    for net in cat.sets.values().flatten() {
        out.insert(net.network());
        out.insert(net.broadcast());
    }
    out.into_iter().collect()
}

/// Each rule's range start and end, one port either side and one inside, plus 0, 1 and 65535.
fn boundary_ports(cat: &Catalogue) -> Vec<u16> {
    let mut out: BTreeSet<u16> = [0, 1, 65535].into_iter().collect();
    for r in &cat.rules {
        let (lo, hi) = (r.ports.lo, r.ports.hi);
        out.extend(
            [
                lo.checked_sub(1),
                Some(lo),
                lo.checked_add(1),
                hi.checked_sub(1),
                Some(hi),
                hi.checked_add(1),
            ]
            .into_iter()
            .flatten(),
        );
    }
    out.into_iter().collect()
}

/// One port inside each rule's range (its start and end) and 0, which no range holds: a
/// destination port for each rule when the sweep varies addresses.
fn representative_ports(cat: &Catalogue) -> Vec<u16> {
    let mut out: BTreeSet<u16> = [0].into_iter().collect();
    for r in &cat.rules {
        out.insert(r.ports.lo);
        out.insert(r.ports.hi);
    }
    out.into_iter().collect()
}

// ---------------------------------------------------------------------------------------------
// Running a catalogue
// ---------------------------------------------------------------------------------------------

/// What one catalogue's run covered, so that a test which checks nothing cannot pass.
#[derive(Debug, Default)]
struct Stats {
    frames: u64,
    /// Frames by answer kind: rule, no_rule/monitor, not_established, unprotected.
    by_kind: BTreeMap<&'static str, u64>,
    /// Frames that two or more inbound rules allow, where file order decides.
    contested: u64,
    /// Frames whose destination lies in prefixes of two or more sets (nesting or duplicates).
    nested_dst: u64,
    /// Rules the evaluator saw match at least once.
    rules_hit: BTreeSet<String>,
}

impl Stats {
    fn add(&mut self, o: Stats) {
        self.frames += o.frames;
        for (k, v) in o.by_kind {
            *self.by_kind.entry(k).or_default() += v;
        }
        self.contested += o.contested;
        self.nested_dst += o.nested_dst;
        self.rules_hit.extend(o.rules_hit);
    }
}

struct Checker<'a> {
    name: &'a str,
    text: &'a str,
    cat: &'a Catalogue,
    compiled: &'a Compiled,
    reference: Reference<'a>,
    /// Stays empty: ingress never records a flow, and no frame here is a reply.
    flows: FlowTable,
    stats: Stats,
}

impl<'a> Checker<'a> {
    fn new(name: &'a str, text: &'a str, cat: &'a Catalogue, compiled: &'a Compiled) -> Self {
        Checker {
            name,
            text,
            cat,
            compiled,
            reference: Reference::new(compiled),
            flows: FlowTable::default(),
            stats: Stats::default(),
        }
    }

    /// The reference's verdict in the evaluator's words. The rule id comes from the compiled
    /// rule list only because the counter slot is all the reference returns.
    fn reference_answer(&mut self, p: &Probe) -> Answer {
        let role_mask = self
            .compiled
            .role_mask(p.role)
            .unwrap_or_else(|| panic!("{}: role `{}` has no bit", self.name, p.role));
        let v = self
            .reference
            .ingress(&p.frame(), role_mask, &mut self.flows, 0);
        match v.counted {
            Counted::Rule(slot) => {
                let id = self
                    .compiled
                    .rules
                    .iter()
                    .find(|r| r.slot == slot)
                    .map_or_else(|| format!("<unknown slot {slot}>"), |r| r.id.clone());
                // A rule counter on a dropped frame would be a disagreement of its own.
                if v.pass {
                    Answer::Rule(id)
                } else {
                    Answer::Reason {
                        name: "<rule counter on a drop>",
                        pass: false,
                    }
                }
            }
            Counted::Reason(r) => Answer::Reason {
                name: reason::NAMES[r as usize].0,
                pass: v.pass,
            },
        }
    }

    /// One frame both ways; a disagreement is returned (not panicked) so that
    /// `corrupted_tables_are_caught` can expect one.
    fn check(&mut self, p: &Probe) -> Result<(), String> {
        let want = evaluate(self.cat, p);
        let got = self.reference_answer(p);
        if got != want {
            let all: Vec<&str> = inbound_matches(self.cat, p)
                .iter()
                .map(|r| r.id.as_str())
                .collect();
            return Err(format!(
                "catalogue `{}` disagrees with its compiled tables\n\
                 frame: {p}\n\
                 catalogue semantics: {want} (inbound rules matching, in file order: {all:?})\n\
                 reference classifier over the compiled tables: {got}\n\
                 --- catalogue text ---\n{}\n--- end ---",
                self.name, self.text
            ));
        }
        let s = &mut self.stats;
        s.frames += 1;
        let kind = match &want {
            Answer::Rule(id) => {
                s.rules_hit.insert(id.clone());
                "rule"
            }
            Answer::Reason { name, .. } => match *name {
                "no_rule" | "monitor" => "no_rule",
                "not_established" | "monitor_not_established" => "not_established",
                "unprotected" => "unprotected",
                other => panic!("evaluator answered {other}"),
            },
        };
        *s.by_kind.entry(kind).or_default() += 1;
        if inbound_matches(self.cat, p).len() > 1 {
            s.contested += 1;
        }
        if self
            .cat
            .sets
            .values()
            .filter(|nets| nets.iter().any(|n| n.contains(&p.dst)))
            .count()
            > 1
        {
            s.nested_dst += 1;
        }
        Ok(())
    }

    /// Two sweeps per (transport, role):
    /// - addresses: every boundary destination × every boundary source (same family) × a port
    ///   at each end of each rule's range (prefix push-down, set masks, role masks);
    /// - ports: every port boundary × representative addresses both ways, once as destination
    ///   port (range expansion into the port array, class membership and order) and once as
    ///   source port (outbound rules' reply claims; inbound rules must ignore it).
    ///
    /// The other port of a frame walks the boundary list too, so that no sweep pins it to one
    /// value the compiler might happen to get right.
    fn run(mut self) -> Result<Stats, String> {
        let boundary = boundary_addresses(self.cat);
        let reps = representative_addresses(self.cat);
        let ports = boundary_ports(self.cat);
        let rep_ports = representative_ports(self.cat);
        let cat = self.cat;
        let roles: Vec<&str> = cat.interfaces.keys().map(String::as_str).collect();
        let same_family = |a: &IpAddr, b: &IpAddr| a.is_ipv4() == b.is_ipv4();
        let mut turn = 0usize;
        let other_port = |turn: &mut usize| {
            *turn = turn.wrapping_add(7919);
            ports[*turn % ports.len()]
        };
        for transport in [Transport::Tcp, Transport::Udp] {
            for &role in &roles {
                for &dst in &boundary {
                    for &src in boundary.iter().filter(|s| same_family(s, &dst)) {
                        for &dport in &rep_ports {
                            let sport = other_port(&mut turn);
                            self.check(&Probe {
                                transport,
                                src,
                                sport,
                                dst,
                                dport,
                                role,
                            })?;
                        }
                    }
                }
                for &dst in &reps {
                    for &src in reps.iter().filter(|s| same_family(s, &dst)) {
                        for &port in &ports {
                            let other = other_port(&mut turn);
                            for (sport, dport) in [(other, port), (port, other)] {
                                self.check(&Probe {
                                    transport,
                                    src,
                                    sport,
                                    dst,
                                    dport,
                                    role,
                                })?;
                            }
                        }
                    }
                }
            }
        }
        assert!(
            self.flows.flows.is_empty(),
            "{}: ingress recorded a flow",
            self.name
        );
        Ok(self.stats)
    }
}

/// Compiles `cat` and checks every frame; panics with the first disagreement.
fn check_catalogue(name: &str, text: &str, cat: &Catalogue) -> Stats {
    let compiled = compile(cat).unwrap_or_else(|e| panic!("{name}: {e}\n{text}"));
    Checker::new(name, text, cat, &compiled)
        .run()
        .unwrap_or_else(|e| panic!("{e}"))
}

// ---------------------------------------------------------------------------------------------
// A hand-written catalogue of nested sets and overlapping ranges
// ---------------------------------------------------------------------------------------------

/// Every rule here overlaps another in ports, and its sets nest inside another rule's
/// (203.0.113.0/24 ⊃ 203.0.113.128/25 ⊃ 203.0.113.200/32, the same in IPv6), so a frame's rule
/// depends on file order, on prefix push-down and on the exact range ends. Only `edge_wide` is
/// protected by policy; the nested sets are protected by being rules' local sets. The generated
/// catalogues cover the same ground at random; this one makes sure of it, and is the one
/// `corrupted_tables_are_caught` corrupts.
const NESTED: &str = r#"[policy]
default = "drop"
unprotected = "pass"
protected = ["edge_wide"]

[interfaces]
external = "public NIC"
internal = "NIC facing the inside"

[sets]
edge_wide = ["203.0.113.0/24", "2001:db8:203::/48"]
edge_half = ["203.0.113.128/25", "2001:db8:203:8000::/49"]
edge_host = ["203.0.113.200/32", "2001:db8:203:8000::c8/128"]
partners = ["198.51.100.0/24", "2001:db8:100::/48"]
partner_host = ["198.51.100.7/32", "2001:db8:100::7/128"]
inside = ["10.0.0.0/8", "fd00::/8"]

[[rule]]
id = "host-media"
protocol = "RTP"
transport = "tcp"
direction = "inbound"
local = "edge_host"
remote = "partner_host"
port = "50000-59999"
interface = "external"

[[rule]]
id = "half-media"
protocol = "RTP"
transport = "tcp"
direction = "inbound"
local = "edge_half"
remote = "partners"
port = "40000-54999"
interface = "external"

[[rule]]
id = "wide-media"
protocol = "RTP"
transport = "tcp"
direction = "inbound"
local = "edge_wide"
remote = "any"
port = "54000-60000"
interface = "external"

[[rule]]
id = "wide-sip"
protocol = "SIP/TLS"
transport = "tcp"
direction = "inbound"
local = "edge_wide"
remote = "any"
port = 5061
interface = "external"

[[rule]]
id = "half-sip-internal"
protocol = "SIP/TLS"
transport = "tcp"
direction = "inbound"
local = "edge_half"
remote = "inside"
port = "5060-5061"
interface = "internal"

[[rule]]
id = "half-stun"
protocol = "STUN/MSTURN"
transport = "udp"
direction = "inbound"
local = "edge_half"
remote = "any"
port = 3478
interface = "external"

[[rule]]
id = "wide-stun-internal"
protocol = "STUN/MSTURN"
transport = "udp"
direction = "inbound"
local = "edge_wide"
remote = "inside"
port = "3478-3479"
interface = "internal"

[[rule]]
id = "host-sip-out"
protocol = "SIP/MTLS"
transport = "tcp"
direction = "outbound"
local = "edge_host"
remote = "partners"
port = 5061
interface = "external"

[[rule]]
id = "half-media-out"
protocol = "RTP"
transport = "udp"
direction = "outbound"
local = "edge_half"
remote = "any"
local_port = "50000-50100"
interface = "external"
"#;

/// Rewrites correct tables the way one compiler bug would have written them.
type Corruption = fn(&Catalogue, &mut Compiled);

/// Compiler bugs, simulated by corrupting correct tables the way each bug would: the test must
/// notice every one.
fn corruptions() -> Vec<(&'static str, Corruption)> {
    vec![
        ("range expanded one port short", |cat, c| {
            // Each rule's last port gets the class of the port after it.
            for r in &cat.rules {
                if r.ports.hi == u16::MAX {
                    continue;
                }
                let base = transport_base(r.transport);
                let next = c.ports[base + r.ports.hi as usize + 1];
                let e = &mut c.ports[base + r.ports.hi as usize];
                match (r.direction, r.port_side) {
                    (Direction::Inbound, _) => e.inbound = next.inbound,
                    (Direction::Outbound, PortSide::Service) => e.reply_from = next.reply_from,
                    (Direction::Outbound, PortSide::Local) => e.reply_to = next.reply_to,
                }
            }
        }),
        ("candidates in reverse file order", |_, c| {
            for class in &mut c.classes {
                class.rules[..class.count as usize].reverse();
            }
        }),
        ("prefix bits not pushed down to nested prefixes", |_, c| {
            for table in [&mut c.prefixes_v4, &mut c.prefixes_v6] {
                *table = unpushed(table);
            }
        }),
        ("interface role ignored", |_, c| {
            for class in &mut c.classes {
                for m in &mut class.rules {
                    m.role_mask = u32::MAX;
                }
            }
        }),
        ("local and remote masks swapped", |_, c| {
            for class in &mut c.classes {
                for m in &mut class.rules {
                    std::mem::swap(&mut m.local_mask, &mut m.remote_mask);
                }
            }
        }),
        ("outbound local port ranges dropped", |_, c| {
            for e in &mut c.ports {
                e.reply_to = 0;
            }
        }),
    ]
}

fn transport_base(t: Transport) -> usize {
    edge_classifier_common::layout::compiled_port(
        match t {
            Transport::Tcp => TRANSPORT_TCP,
            Transport::Udp => TRANSPORT_UDP,
        },
        0,
    )
}

/// Each prefix with only its own named-set bits: what a compiler that forgot that LPM returns
/// only the longest match (and so must copy the containing prefixes' bits down) would emit.
/// The `any` and protected bits stay, so that only set membership changes.
fn unpushed(prefixes: &[(IpNet, u64)]) -> Vec<(IpNet, u64)> {
    prefixes
        .iter()
        .map(|(net, bits)| {
            let parent = prefixes
                .iter()
                .filter(|(p, _)| p != net && p.prefix_len() > 0 && p.contains(net))
                .max_by_key(|(p, _)| p.prefix_len());
            let kept = bits & (SET_ANY | SET_PROTECTED);
            match parent {
                Some((_, inherited)) => (*net, (bits & !inherited) | kept),
                None => (*net, *bits),
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Generated catalogues
// ---------------------------------------------------------------------------------------------

/// A prefix of length `len` at a random place inside `parent` (`len >= parent`'s length).
fn inside(rng: &mut Rng, parent: IpNet, len: u8) -> IpNet {
    match parent {
        IpNet::V4(p) => {
            let host = !u32::from(p.netmask());
            let a = u32::from(p.network()) | (rng.next_u64() as u32 & host);
            IpNet::V4(
                Ipv4Net::new(Ipv4Addr::from(a), len)
                    .expect("length")
                    .trunc(),
            )
        }
        IpNet::V6(p) => {
            let host = !u128::from(p.netmask());
            let r = (u128::from(rng.next_u64()) << 64) | u128::from(rng.next_u64());
            let a = u128::from(p.network()) | (r & host);
            IpNet::V6(
                Ipv6Net::new(Ipv6Addr::from(a), len)
                    .expect("length")
                    .trunc(),
            )
        }
    }
}

/// A random prefix under one of a few shared bases, so prefixes of different sets often nest,
/// overlap or coincide. Now and then the whole address family (`0.0.0.0/0`, `::/0`), which
/// coincides with the built-in `any` entry of the tables.
fn random_prefix(rng: &mut Rng, v6: bool) -> IpNet {
    let net = |s: &str| s.parse::<IpNet>().expect("valid base");
    if rng.chance(40) {
        return net(if v6 { "::/0" } else { "0.0.0.0/0" });
    }
    let (base, lens): (IpNet, &[u8]) = if v6 {
        match rng.below(3) {
            0 => (net("2001:db8:100::/48"), &[48, 56, 64, 96, 120, 127, 128]),
            1 => (net("2001:db8:203::/48"), &[48, 52, 64, 112, 126, 128]),
            _ => (net("2001:db8::/32"), &[32, 36, 40, 48]),
        }
    } else {
        match rng.below(4) {
            0 => (net("203.0.113.0/24"), &[24, 25, 26, 27, 28, 30, 31, 32]),
            1 => (net("198.51.100.0/24"), &[24, 25, 28, 29, 32]),
            2 => (net("192.0.2.0/24"), &[24, 26, 31, 32]),
            _ => (net("10.0.0.0/8"), &[8, 12, 16, 24, 32]),
        }
    };
    let len = *rng.pick(lens);
    inside(rng, base, len)
}

/// A strictly longer prefix inside `parent` (or `parent` itself for a host prefix).
fn nested_in(rng: &mut Rng, parent: IpNet) -> IpNet {
    let max = parent.max_prefix_len();
    if parent.prefix_len() == max {
        return parent;
    }
    let len = parent.prefix_len() + 1 + rng.below((max - parent.prefix_len()) as usize) as u8;
    inside(rng, parent, len)
}

/// Ports rules are built around: shared anchors make ranges of different rules overlap, nest
/// and touch; the ends of the port space are among them.
const ANCHORS: &[u16] = &[
    1, 22, 80, 443, 1024, 3478, 5060, 5061, 5269, 23456, 49999, 50000, 59999, 60000, 65534, 65535,
];

/// `port = …` text: a single port or a range, near an anchor.
fn random_ports(rng: &mut Rng) -> String {
    let anchor = *rng.pick(ANCHORS);
    let lo = anchor.saturating_add(*rng.pick(&[0u16, 0, 0, 1, 2])).max(1);
    match rng.below(6) {
        0 | 1 => lo.to_string(),
        2 => "\"1-65535\"".to_string(),
        _ => {
            let width = *rng.pick(&[1u16, 2, 3, 10, 100, 1000, 10000, 20000]);
            let hi = lo.saturating_add(width);
            if rng.chance(3) {
                // Ranges ending on another anchor: ends that touch or nest.
                let end = (*rng.pick(ANCHORS)).max(lo);
                format!("\"{lo}-{end}\"")
            } else {
                format!("\"{lo}-{hi}\"")
            }
        }
    }
}

/// A catalogue's text: 2–6 sets (set `s1` always nests inside `s0` in both families), 3–12
/// rules (mostly inbound, some outbound with `port` or `local_port`), overlapping port ranges,
/// two or three roles, and random `default` / `unprotected` / `protected` policies.
fn random_catalogue(rng: &mut Rng) -> String {
    let mut t = String::new();
    let default = if rng.chance(2) { "drop" } else { "pass" };
    let unprotected = if rng.chance(3) { "drop" } else { "pass" };

    let n_sets = 2 + rng.below(5);
    let mut sets: Vec<Vec<IpNet>> = Vec::new();
    for i in 0..n_sets {
        let mut nets: Vec<IpNet> = Vec::new();
        if i == 1 {
            // The nested case by construction: s1 holds a longer prefix inside each of s0's
            // first prefixes per family (203.0.113.0/24 and 203.0.113.128/25, say).
            for v6 in [false, true] {
                if let Some(parent) = sets[0].iter().find(|n| n.addr().is_ipv6() == v6) {
                    nets.push(nested_in(rng, *parent));
                }
            }
        }
        let extra = if i == 0 { 2 } else { rng.below(4) };
        for k in 0..extra {
            // Set s0 gets one prefix per family; others a mix.
            let v6 = if i == 0 { k == 1 } else { rng.chance(2) };
            if i > 0 && rng.chance(4) {
                // Another set's prefix, or one inside it: duplicates and nesting across sets,
                // not only between s0 and s1.
                let other = rng.below(i);
                if let Some(&n) = sets[other].get(rng.below(sets[other].len().max(1))) {
                    nets.push(if rng.chance(2) { n } else { nested_in(rng, n) });
                    continue;
                }
            }
            nets.push(random_prefix(rng, v6));
        }
        if nets.is_empty() {
            let v6 = rng.chance(2);
            nets.push(random_prefix(rng, v6));
        }
        nets.sort();
        nets.dedup();
        sets.push(nets);
    }
    let protected: Vec<String> = (0..n_sets)
        .filter(|_| rng.chance(3))
        .map(|i| format!("\"s{i}\""))
        .collect();

    t.push_str(&format!(
        "[policy]\ndefault = \"{default}\"\nunprotected = \"{unprotected}\"\nprotected = [{}]\n\n",
        protected.join(", ")
    ));
    let mut roles = vec!["external", "internal"];
    if rng.chance(4) {
        roles.push("dmz");
    }
    t.push_str("[interfaces]\n");
    for r in &roles {
        t.push_str(&format!("{r} = \"generated\"\n"));
    }
    t.push_str("\n[sets]\n");
    for (i, nets) in sets.iter().enumerate() {
        let list: Vec<String> = nets.iter().map(|n| format!("\"{n}\"")).collect();
        t.push_str(&format!("s{i} = [{}]\n", list.join(", ")));
    }

    let n_rules = 3 + rng.below(10);
    for i in 0..n_rules {
        let transport = if rng.chance(2) { "tcp" } else { "udp" };
        let outbound = rng.chance(5);
        let l = rng.below(n_sets);
        let local = format!("s{l}");
        // A remote set sharing no address family with the local one could never match, which
        // the catalogue rejects: such a draw becomes `any`.
        let shares = |r: usize| {
            sets[l].iter().any(|a| {
                sets[r]
                    .iter()
                    .any(|b| a.addr().is_ipv6() == b.addr().is_ipv6())
            })
        };
        let remote = match rng.chance(3) {
            true => "any".to_string(),
            false => {
                let r = rng.below(n_sets);
                if shares(r) {
                    format!("s{r}")
                } else {
                    "any".to_string()
                }
            }
        };
        let port_key = if outbound && rng.chance(2) {
            "local_port"
        } else {
            "port"
        };
        t.push_str(&format!(
            "\n[[rule]]\nid = \"r{i}\"\nprotocol = \"GEN\"\ntransport = \"{transport}\"\n\
             direction = \"{}\"\nlocal = \"{local}\"\nremote = \"{remote}\"\n{port_key} = {}\n\
             interface = \"{}\"\n",
            if outbound { "outbound" } else { "inbound" },
            random_ports(rng),
            *rng.pick(&roles),
        ));
    }
    t
}

/// A generated catalogue that parses and compiles. A catalogue with more than the compiler's
/// candidates per port is a legitimate rejection and is drawn again; any other error means the
/// generator writes something invalid, which is a bug in this test.
fn generated(rng: &mut Rng, n: usize) -> (String, String, Catalogue, usize) {
    let mut redraws = 0;
    loop {
        let text = random_catalogue(rng);
        let name = format!("generated-{n}.toml");
        let cat = Catalogue::parse(&name, &text)
            .unwrap_or_else(|e| panic!("generator wrote an invalid catalogue: {e}\n{text}"));
        match compile(&cat) {
            Ok(_) => return (name, text, cat, redraws),
            Err(CompileError::TooManyCandidates { .. }) => redraws += 1,
            Err(e) => panic!("generated catalogue does not compile: {e}\n{text}"),
        }
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v} is not a number")),
        Err(_) => default,
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn default_catalogue_tables_match_the_catalogue() {
    let started = Instant::now();
    let cat = Catalogue::default_catalogue();
    let stats = check_catalogue(DEFAULT_NAME, DEFAULT_CATALOGUE, &cat);
    eprintln!(
        "default catalogue: {} frames in {:.1?}; {:?}; {} contested by file order; {} to nested \
         or shared prefixes; rules seen matching: {:?}",
        stats.frames,
        started.elapsed(),
        stats.by_kind,
        stats.contested,
        stats.nested_dst,
        stats.rules_hit
    );
    assert!(stats.frames >= 20_000, "only {} frames", stats.frames);
    // Every inbound rule of the default catalogue is reachable (none is shadowed), and the
    // outbound rows' reply claims, the no-rule drop and unprotected pass all occur.
    for r in cat
        .rules
        .iter()
        .filter(|r| r.direction == Direction::Inbound)
    {
        assert!(
            stats.rules_hit.contains(&r.id),
            "rule {} never matched",
            r.id
        );
    }
    for kind in ["rule", "no_rule", "not_established", "unprotected"] {
        assert!(
            stats.by_kind.get(kind).copied().unwrap_or(0) > 0,
            "no `{kind}` frame: {:?}",
            stats.by_kind
        );
    }
}

/// The shipped profiles (sfb-edge, sip-xmpp-edge; the seed is the default above): every
/// inbound rule matches some frame (none is shadowed by an earlier one), and tables agree with
/// the catalogue on every boundary frame.
#[test]
fn profile_tables_match_the_catalogue() {
    for p in edge_classifier::catalogue::profiles::PROFILES {
        let cat = Catalogue::parse(p.name, p.text).expect("profile parses");
        let stats = check_catalogue(p.name, p.text, &cat);
        eprintln!(
            "profile {}: {} frames; {:?}; rules seen matching: {}",
            p.name,
            stats.frames,
            stats.by_kind,
            stats.rules_hit.len()
        );
        for r in cat
            .rules
            .iter()
            .filter(|r| r.direction == Direction::Inbound)
        {
            assert!(
                stats.rules_hit.contains(&r.id),
                "profile {}: rule {} never matched",
                p.name,
                r.id
            );
        }
    }
}

#[test]
fn generated_catalogues_tables_match_the_catalogue() {
    let started = Instant::now();
    let seed: u64 = env_or("EC_SEMANTICS_SEED", DEFAULT_SEED);
    let count: usize = env_or("EC_SEMANTICS_CATALOGUES", DEFAULT_GENERATED);
    let mut rng = Rng(seed.max(1));
    let mut total = Stats::default();
    let (mut redraws, mut rules, mut monitor) = (0, 0, 0);
    for n in 0..count {
        let (name, text, cat, r) = generated(&mut rng, n);
        redraws += r;
        rules += cat.rules.len();
        monitor += usize::from(cat.policy.default == Action::Pass);
        let stats = check_catalogue(&name, &text, &cat);
        // A catalogue whose every rule is shadowed or unreachable would check little: at least
        // one rule must have been seen matching in each.
        assert!(
            !stats.rules_hit.is_empty()
                || cat.rules.iter().all(|r| r.direction == Direction::Outbound),
            "{name}: no frame matched any rule\n{text}"
        );
        total.add(stats);
    }
    eprintln!(
        "{count} generated catalogues (seed {seed:#x}, {rules} rules, {monitor} in monitor mode, \
         {redraws} redrawn for too many candidates): {} frames in {:.1?}; {:?}; {} contested by \
         file order; {} to nested or shared prefixes",
        total.frames,
        started.elapsed(),
        total.by_kind,
        total.contested,
        total.nested_dst
    );
    assert!(
        total.frames >= 20_000 * count as u64 / 4,
        "only {} frames",
        total.frames
    );
    // The properties the compiler could get wrong must actually have been exercised.
    assert!(total.contested >= 1_000, "{} contested", total.contested);
    assert!(total.nested_dst >= 1_000, "{} nested", total.nested_dst);
    for kind in ["rule", "no_rule", "not_established", "unprotected"] {
        assert!(
            total.by_kind.get(kind).copied().unwrap_or(0) > 0,
            "no `{kind}` frame: {:?}",
            total.by_kind
        );
    }
}

#[test]
fn nested_catalogue_tables_match_the_catalogue() {
    let cat = Catalogue::parse("nested.toml", NESTED).expect("NESTED parses");
    let stats = check_catalogue("nested.toml", NESTED, &cat);
    eprintln!(
        "nested catalogue: {} frames; {:?}; {} contested by file order; {} to nested prefixes",
        stats.frames, stats.by_kind, stats.contested, stats.nested_dst
    );
    assert!(stats.frames >= 20_000, "only {} frames", stats.frames);
    for r in cat
        .rules
        .iter()
        .filter(|r| r.direction == Direction::Inbound)
    {
        assert!(
            stats.rules_hit.contains(&r.id),
            "rule {} never matched",
            r.id
        );
    }
    assert!(stats.contested > 0 && stats.nested_dst > 0, "{stats:?}");
}

/// The test's own sensitivity: correct tables pass, and tables corrupted as each kind of
/// compiler bug would corrupt them are caught (on `NESTED`, and on the default catalogue where
/// the bug can show there).
#[test]
fn corrupted_tables_are_caught() {
    let nested = Catalogue::parse("nested.toml", NESTED).expect("NESTED parses");
    let default = Catalogue::default_catalogue();
    for (name, text, cat) in [
        ("nested.toml", NESTED, &nested),
        (DEFAULT_NAME, DEFAULT_CATALOGUE, &default),
    ] {
        let good = compile(cat).expect("compiles");
        Checker::new(name, text, cat, &good)
            .run()
            .unwrap_or_else(|e| panic!("uncorrupted tables: {e}"));
        for (bug, corrupt) in corruptions() {
            let mut bad = good.clone();
            corrupt(cat, &mut bad);
            let caught = Checker::new(name, text, cat, &bad).run();
            // The default catalogue has no overlapping inbound rules and no nested sets, so
            // reversed candidates and missing push-down change nothing there.
            let can_show = name == "nested.toml"
                || !matches!(
                    bug,
                    "candidates in reverse file order"
                        | "prefix bits not pushed down to nested prefixes"
                );
            match caught {
                Err(e) => {
                    let frame = e.lines().nth(1).unwrap_or_default();
                    eprintln!("{name}: {bug}: caught, {frame}");
                }
                Ok(_) if !can_show => eprintln!("{name}: {bug}: cannot show, as expected"),
                Ok(stats) => panic!(
                    "{name}: tables with `{bug}` went unnoticed over {} frames",
                    stats.frames
                ),
            }
        }
    }
}
