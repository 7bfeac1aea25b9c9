//! Compiles a validated catalogue into the contents of one buffer of the kernel maps.

pub mod stride;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use edge_classifier_common::{
    FIRST_NAMED_SET_BIT, MAX_CANDIDATES, MAX_CLASSES, MAX_PREFIXES_PER_BUFFER, MAX_RULES,
    MAX_RULES_PER_CATALOGUE, POLICY_DEFAULT_PASS, POLICY_DROP_EGRESS, POLICY_PASS_FRAGMENTS,
    POLICY_PASS_NON_IP, POLICY_PASS_UNPROTECTED, POLICY_PROTECT_IFACE_ADDRS, POLICY_TRACK_EGRESS,
    PORT_SPACE, PortEntry, RULE_LIMITED, RULE_OUTBOUND, RULE_SYN_PROXY, RuleClass, RuleLimit,
    RuleMatch, SET_ANY, SET_PROTECTED, TRACKED_SLOT, TRANSPORT_TCP, TRANSPORT_UDP, TRANSPORTS,
    layout,
};
use ipnet::IpNet;

use crate::{
    catalogue::{ANY, Action, Catalogue, Direction, Egress, PortSide, Transport},
    stride::Stride4,
};

#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error(
        "{location}: more than {max} rules cover {transport} port {port} ({kind}): {ids}; split the ranges or merge the rules"
    )]
    TooManyCandidates {
        location: String,
        max: usize,
        transport: Transport,
        port: u16,
        kind: &'static str,
        ids: String,
    },
    #[error(
        "{0} rules: a catalogue may have at most {MAX_RULES_PER_CATALOGUE} (a reload needs counter slots for the running rules and the new ones); merge rules that differ only in port into ranges"
    )]
    TooManyRules(usize),
    #[error(
        "{new} new rule ids beside the {running} rules running: the data plane has {MAX_RULES} counter slots for both; reload to a catalogue of at most {MAX_RULES_PER_CATALOGUE} rules first"
    )]
    NoFreeSlots { running: usize, new: usize },
    #[error(
        "{count} IPv{family} prefixes (with the built-in default route): the data plane holds at most {max} per family; merge adjacent prefixes into shorter ones"
    )]
    TooManyPrefixes { family: u8, count: usize, max: u32 },
    #[error("{0} distinct port classes: the data plane holds at most {MAX_CLASSES}")]
    TooManyClasses(usize),
    #[error("more than 32 interface roles have been used since the classifier started; restart it")]
    TooManyRoles,
}

/// Counter slots by rule id and role bits by role name. A reload keeps them for every id and
/// role it still has, so counters continue and the interface bindings stay valid.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Assignments {
    pub slots: BTreeMap<String, u32>,
    pub roles: BTreeMap<String, u32>,
}

impl Assignments {
    /// Keeps what `prev` gave to names still present and gives new names, in `names` order,
    /// the lowest numbers `prev` does not use: a slot freed by this change is still counted
    /// into by the rules running until the flip, so it is reused one change later at the
    /// earliest (and zeroed then).
    fn assign<'a>(
        prev: &BTreeMap<String, u32>,
        names: impl Iterator<Item = &'a str> + Clone,
        limit: u32,
    ) -> Option<BTreeMap<String, u32>> {
        let mut out: BTreeMap<String, u32> = names
            .clone()
            .filter_map(|n| prev.get(n).map(|v| (n.to_string(), *v)))
            .collect();
        let mut used: BTreeSet<u32> = prev.values().copied().collect();
        let mut next = 0u32;
        for n in names {
            if out.contains_key(n) {
                continue;
            }
            while used.contains(&next) {
                next += 1;
            }
            if next >= limit {
                return None;
            }
            used.insert(next);
            out.insert(n.to_string(), next);
        }
        Some(out)
    }
}

/// What one rule became, with what the exporter and `explain` need to name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledRule {
    pub id: String,
    pub seed_row: String,
    pub direction: Direction,
    pub transport: Transport,
    pub ports: String,
    pub interface: String,
    /// Counter slot.
    pub slot: u32,
    pub matcher: RuleMatch,
    /// The rule's limit on new flows, as the catalogue gives it and as `LIMITS` holds it.
    pub limit: Option<CompiledLimit>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledLimit {
    pub limit: crate::catalogue::Limit,
    pub entry: RuleLimit,
}

/// The contents of one buffer of the rule maps.
#[derive(Debug, Clone)]
pub struct Compiled {
    pub rules: Vec<CompiledRule>,
    /// Interface roles of the catalogue.
    pub roles: Vec<String>,
    pub policy: edge_classifier_common::PolicyEntry,
    /// `ports[layout::compiled_port(transport, port)]`; `port_entry` makes the map's entry.
    pub ports: Vec<PortClasses>,
    /// Class 0 is "no rule" and is stored empty.
    pub classes: Vec<RuleClass>,
    pub prefixes_v4: Vec<(IpNet, u64)>,
    pub prefixes_v6: Vec<(IpNet, u64)>,
    /// Size of the flow table; fixed once the program is loaded.
    pub flow_capacity: u32,
    /// The Edge's own host addresses, compared before the tries are walked.
    pub locals: edge_classifier_common::Locals,
    /// The whole IPv4 table when it is small enough to scan.
    pub small_v4: edge_classifier_common::Small4,
    pub small_v6: edge_classifier_common::Small6,
    /// The IPv4 stride table, when the IPv4 table is too big to scan and fits in one.
    pub stride_v4: Option<Stride4>,
    pub assignments: Assignments,
}

/// Longest-prefix match of the compiled address sets, probing each prefix length: which sets an
/// address is in, as the data plane would say (the prefixes carry the bits of the shorter ones
/// that hold them, `push_down`).
pub struct AddressSets {
    v4: HashMap<(u8, u32), u64>,
    v6: HashMap<(u8, u128), u64>,
    v4_lens: Vec<u8>,
    v6_lens: Vec<u8>,
}

impl AddressSets {
    pub fn new(c: &Compiled) -> AddressSets {
        let mut s = AddressSets {
            v4: HashMap::new(),
            v6: HashMap::new(),
            v4_lens: Vec::new(),
            v6_lens: Vec::new(),
        };
        for (net, bits) in c.prefixes_v4.iter().chain(&c.prefixes_v6) {
            match net {
                IpNet::V4(n) => {
                    s.v4.insert((n.prefix_len(), u32::from(n.network())), *bits);
                    s.v4_lens.push(n.prefix_len());
                }
                IpNet::V6(n) => {
                    s.v6.insert((n.prefix_len(), u128::from(n.network())), *bits);
                    s.v6_lens.push(n.prefix_len());
                }
            }
        }
        for l in [&mut s.v4_lens, &mut s.v6_lens] {
            l.sort_unstable_by(|a, b| b.cmp(a));
            l.dedup();
        }
        s
    }

    /// The set bits of `addr` (0 when no prefix holds it).
    pub fn bits(&self, addr: IpAddr) -> u64 {
        match addr {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                self.v4_lens
                    .iter()
                    .find_map(|&len| {
                        let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
                        self.v4.get(&(len, a & mask)).copied()
                    })
                    .unwrap_or(0)
            }
            IpAddr::V6(a) => {
                let a = u128::from(a);
                self.v6_lens
                    .iter()
                    .find_map(|&len| {
                        let mask = if len == 0 {
                            0
                        } else {
                            u128::MAX << (128 - len)
                        };
                        self.v6.get(&(len, a & mask)).copied()
                    })
                    .unwrap_or(0)
            }
        }
    }
}

impl Compiled {
    pub fn role_mask(&self, role: &str) -> Option<u32> {
        self.assignments.roles.get(role).map(|bit| 1u32 << bit)
    }

    /// The IPv4 prefixes the program looks up in its trie: none when the small table or the
    /// stride table holds them all (the trie is then left empty, and a lookup that wrongly
    /// reached it would find nothing).
    pub fn trie_v4(&self) -> &[(IpNet, u64)] {
        if self.small_v4.complete != 0 || self.small_v4.stride != 0 {
            &[]
        } else {
            &self.prefixes_v4
        }
    }

    /// The IPv6 prefixes the program looks up in its trie: none when the small table holds them.
    pub fn trie_v6(&self) -> &[(IpNet, u64)] {
        if self.small_v6.complete != 0 {
            &[]
        } else {
            &self.prefixes_v6
        }
    }

    /// The slots flows may be recorded under: the outbound rules', and `TRACKED_SLOT` when the
    /// policy tracks the Edge's other flows. A reload keeps the flows of these slots only.
    pub fn flow_slots(&self) -> BTreeSet<u32> {
        let mut slots: BTreeSet<u32> = self
            .rules
            .iter()
            .filter(|r| r.direction == Direction::Outbound)
            .map(|r| r.slot)
            .collect();
        if self.policy.flags & POLICY_TRACK_EGRESS != 0 {
            slots.insert(TRACKED_SLOT);
        }
        slots
    }
}

fn transport_index(t: Transport) -> u32 {
    match t {
        Transport::Tcp => TRANSPORT_TCP,
        Transport::Udp => TRANSPORT_UDP,
    }
}

fn bitmap(types: &[u8]) -> [u64; 4] {
    let mut map = [0u64; 4];
    for &t in types {
        map[(t >> 6) as usize] |= 1 << (t & 63);
    }
    map
}

/// The bits each prefix must carry: LPM returns only the longest match, so a prefix also carries
/// the bits of every shorter prefix that contains it.
fn push_down(prefixes: BTreeMap<IpNet, u64>) -> Vec<(IpNet, u64)> {
    let mut out = Vec::with_capacity(prefixes.len());
    // BTreeMap order is by address then prefix length, so containing prefixes come first; a
    // stack of the chain of containing prefixes gives each prefix its inherited bits.
    let mut stack: Vec<(IpNet, u64)> = Vec::new();
    for (net, bits) in prefixes {
        while let Some((top, _)) = stack.last() {
            if top.contains(&net) {
                break;
            }
            stack.pop();
        }
        let inherited = stack.last().map_or(0, |(_, b)| *b);
        let total = bits | inherited;
        stack.push((net, total));
        out.push((net, total));
    }
    out
}

/// Which rules a (transport, direction, port) reaches, as class ids per port.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Kind {
    Inbound,
    ReplyFrom,
    ReplyTo,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Inbound => "inbound service port",
            Kind::ReplyFrom => "outbound remote port",
            Kind::ReplyTo => "outbound local port",
        }
    }
}

pub fn compile(cat: &Catalogue) -> Result<Compiled, CompileError> {
    compile_with(cat, &Assignments::default())
}

/// Compiles keeping `prev`'s slots and role bits for the ids and roles `cat` still has.
pub fn compile_with(cat: &Catalogue, prev: &Assignments) -> Result<Compiled, CompileError> {
    if cat.rules.len() > MAX_RULES_PER_CATALOGUE as usize {
        return Err(CompileError::TooManyRules(cat.rules.len()));
    }
    let roles: Vec<String> = cat.interfaces.keys().cloned().collect();
    let assignments = Assignments {
        slots: Assignments::assign(
            &prev.slots,
            cat.rules.iter().map(|r| r.id.as_str()),
            MAX_RULES,
        )
        // Only a running catalogue over today's limit (loaded by an older version) can leave
        // too few slots.
        .ok_or_else(|| CompileError::NoFreeSlots {
            running: prev.slots.len(),
            new: cat
                .rules
                .iter()
                .filter(|r| !prev.slots.contains_key(&r.id))
                .count(),
        })?,
        roles: Assignments::assign(&prev.roles, roles.iter().map(String::as_str), 32)
            .ok_or(CompileError::TooManyRoles)?,
    };
    let set_bit = set_bits(cat);
    let (v4, v6) = prefix_tables(cat, &set_bit)?;
    let rules = compile_rules(cat, &assignments, &set_bit);

    let (classes, ports) = port_classes(cat, &rules)?;

    let prefixes_v4 = push_down(v4);
    let prefixes_v6 = push_down(v6);
    let locals = locals(&prefixes_v4, &prefixes_v6);

    let mut small_v4 = small_v4(&prefixes_v4);
    let small_v6 = small_v6(&prefixes_v6);
    let stride_v4 = if small_v4.complete == 0 {
        Stride4::build(&prefixes_v4)
    } else {
        None
    };
    small_v4.stride = u32::from(stride_v4.is_some());

    let policy = policy(cat);

    Ok(Compiled {
        rules,
        roles,
        policy,
        ports,
        classes,
        prefixes_v4,
        prefixes_v6,
        flow_capacity: cat.flows.capacity,
        assignments,
        locals,
        small_v4,
        small_v6,
        stride_v4,
    })
}

/// Each named set's bit, in name order after the built-in bits.
fn set_bits(cat: &Catalogue) -> HashMap<&str, u64> {
    cat.sets
        .keys()
        .enumerate()
        .map(|(i, name)| (name.as_str(), 1u64 << (FIRST_NAMED_SET_BIT as usize + i)))
        .collect()
}

/// Every prefix of every set with the bits of the sets that name it (and the protected bit),
/// per family; `any` is the default route of each.
type PrefixTables = (BTreeMap<IpNet, u64>, BTreeMap<IpNet, u64>);

fn prefix_tables(
    cat: &Catalogue,
    set_bit: &HashMap<&str, u64>,
) -> Result<PrefixTables, CompileError> {
    let mut protected: BTreeSet<&str> = cat.policy.protected.iter().map(String::as_str).collect();
    protected.extend(cat.rules.iter().map(|r| r.local.as_str()));

    let mut v4: BTreeMap<IpNet, u64> = BTreeMap::new();
    let mut v6: BTreeMap<IpNet, u64> = BTreeMap::new();
    // Every address carries `any`, so a lookup never misses.
    v4.insert("0.0.0.0/0".parse().expect("valid"), SET_ANY);
    v6.insert("::/0".parse().expect("valid"), SET_ANY);
    for (name, nets) in &cat.sets {
        let mut bits = set_bit[name.as_str()];
        if protected.contains(name.as_str()) {
            bits |= SET_PROTECTED;
        }
        for net in nets {
            let table = match net.addr() {
                IpAddr::V4(_) => &mut v4,
                IpAddr::V6(_) => &mut v6,
            };
            *table.entry(*net).or_default() |= bits;
        }
    }
    for (family, table) in [(4u8, &v4), (6u8, &v6)] {
        if table.len() > MAX_PREFIXES_PER_BUFFER as usize {
            return Err(CompileError::TooManyPrefixes {
                family,
                count: table.len(),
                max: MAX_PREFIXES_PER_BUFFER,
            });
        }
    }

    Ok((v4, v6))
}

/// Each rule as the data plane matches it: its set masks, counter slot, role bit and direction.
fn compile_rules(
    cat: &Catalogue,
    assignments: &Assignments,
    set_bit: &HashMap<&str, u64>,
) -> Vec<CompiledRule> {
    let mask_of = |set: &str| -> u64 { if set == ANY { SET_ANY } else { set_bit[set] } };
    cat.rules
        .iter()
        .map(|r| {
            let slot = assignments.slots[&r.id];
            let limit = r.limit.as_ref().map(|l| CompiledLimit {
                limit: l.clone(),
                entry: rule_limit(&r.id, l, set_bit, ticks_per_second()),
            });
            let mut flags = if r.direction == Direction::Outbound {
                RULE_OUTBOUND
            } else {
                0
            };
            if let Some(l) = &limit {
                flags |= RULE_LIMITED;
                if l.limit.syn_proxy {
                    flags |= RULE_SYN_PROXY;
                }
            }
            let matcher = RuleMatch {
                local_mask: mask_of(&r.local),
                remote_mask: mask_of(&r.remote),
                slot,
                role_mask: 1 << assignments.roles[&r.interface],
                flags,
                _pad: 0,
            };
            CompiledRule {
                id: r.id.clone(),
                seed_row: r.seed_row.clone().unwrap_or_default(),
                direction: r.direction,
                transport: r.transport,
                ports: r.ports_label(),
                interface: r.interface.clone(),
                slot,
                matcher,
                limit,
            }
        })
        .collect()
}

impl Compiled {
    /// Whether a rule answers SYNs over its budget from XDP (`limit.syn_proxy`), which needs
    /// `net.ipv4.tcp_syncookies = 2`.
    pub fn has_syn_proxy(&self) -> bool {
        self.rules
            .iter()
            .any(|r| r.limit.as_ref().is_some_and(|l| l.limit.syn_proxy))
    }
}

/// With `syn_proxy`, a SYN over the budget goes through to the listener once in this many
/// seconds: the kernel accepts the ACK of a cookie only from a listener that sent a cookie of
/// its own within the last two minutes, and with `tcp_syncookies = 2` the SYN let through gets
/// one. Half a minute leaves a lost or refused one three more chances in those two minutes.
pub const SYN_PROXY_PASS_SECONDS: u64 = 30;

/// A rule's limit as the program reads it: budgets in kernel ticks at `hz`, source prefixes
/// as masks over the address words, exempt sets as bits.
pub fn rule_limit(
    id: &str,
    l: &crate::catalogue::Limit,
    set_bit: &HashMap<&str, u64>,
    hz: u64,
) -> RuleLimit {
    let budget = |r: &Option<crate::catalogue::Rate>| match r {
        None => edge_classifier_common::Budget::default(),
        Some(r) => {
            let cost = u64::from(r.seconds) * hz;
            let refill = u64::from(r.count);
            let cap = u64::from(r.burst) * cost;
            edge_classifier_common::Budget {
                cost,
                refill,
                cap,
                fill_ticks: cap.div_ceil(refill),
            }
        }
    };
    let v4 = std::net::Ipv4Addr::from(
        u32::MAX
            .checked_shl(32 - u32::from(l.prefix_v4))
            .unwrap_or(0),
    );
    let v6 = std::net::Ipv6Addr::from(
        u128::MAX
            .checked_shl(128 - u32::from(l.prefix_v6))
            .unwrap_or(0),
    )
    .octets();
    let mut entry = RuleLimit {
        exempt_mask: l
            .exempt
            .iter()
            .map(|s| set_bit[s.as_str()])
            .fold(0, |a, b| a | b),
        generation: 0,
        syn_proxy_ticks: if l.syn_proxy {
            (SYN_PROXY_PASS_SECONDS * hz) as u32
        } else {
            0
        },
        mask_v4: u64::from(u32::from_ne_bytes(v4.octets())),
        mask_v6: [
            u64::from_ne_bytes(v6[..8].try_into().expect("8 bytes")),
            u64::from_ne_bytes(v6[8..].try_into().expect("8 bytes")),
        ],
        per_source: budget(&l.per_source),
        total: budget(&l.total),
        own_mask: l.own_budget.as_ref().map_or(0, |o| {
            o.sets
                .iter()
                .map(|s| set_bit[s.as_str()])
                .fold(0, |a, b| a | b)
        }),
        own: budget(&l.own_budget.as_ref().map(|o| o.rate)),
    };
    // FNV-1a over the id and the limit as the program reads it: the same rule with the same
    // limit keeps its buckets across reloads; any change starts new ones.
    let mut h: u32 = 0x811c_9dc5;
    for b in id.bytes().chain(limit_bytes(&entry)) {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    entry.generation = h;
    entry
}

/// The bytes of a limit's numbers, for its generation hash.
fn limit_bytes(e: &RuleLimit) -> impl Iterator<Item = u8> {
    let b = |x: &edge_classifier_common::Budget| [x.cost, x.refill, x.cap, x.fill_ticks];
    [
        e.exempt_mask,
        u64::from(e.syn_proxy_ticks),
        e.mask_v4,
        e.mask_v6[0],
        e.mask_v6[1],
        e.own_mask,
    ]
    .into_iter()
    .chain(b(&e.per_source))
    .chain(b(&e.total))
    .chain(b(&e.own))
    .flat_map(u64::to_le_bytes)
}

/// The rules on one (transport, kind) port line, in file order.
fn line_members(cat: &Catalogue, transport: Transport, kind: Kind) -> Vec<usize> {
    cat.rules
        .iter()
        .enumerate()
        .filter(|(_, r)| {
            r.transport == transport
                && match kind {
                    Kind::Inbound => r.direction == Direction::Inbound,
                    Kind::ReplyFrom => {
                        r.direction == Direction::Outbound && r.port_side == PortSide::Service
                    }
                    Kind::ReplyTo => {
                        r.direction == Direction::Outbound && r.port_side == PortSide::Local
                    }
                }
        })
        .map(|(i, _)| i)
        .collect()
}

/// A port's rule classes, as compiled. The map's `PortEntry` adds a copy of a single-rule
/// inbound class's rule (`port_entry`); kept out of the compiled catalogue, whose port table
/// every compile allocates whole and every reload compares whole, three times smaller so.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortClasses {
    pub inbound: u32,
    pub reply_from: u32,
    pub reply_to: u32,
}

impl Compiled {
    /// The PORTS map's entry of `ports[i]`: its classes, and the rule of an inbound class of
    /// one rule, which the data plane then matches without reading CLASSES.
    pub fn port_entry(&self, i: usize) -> PortEntry {
        let p = self.ports[i];
        let mut e = PortEntry {
            inbound: p.inbound,
            reply_from: p.reply_from,
            reply_to: p.reply_to,
            ..Default::default()
        };
        if let Some(class) = self.classes.get(p.inbound as usize)
            && p.inbound != 0
            && class.count == 1
        {
            e.inbound_single = 1;
            e.inbound_rule = class.rules[0];
        }
        e
    }
}

/// The class of an ordered list of rules: the one made for the same list before, or a new one.
fn class_for(
    list: Vec<usize>,
    rules: &[CompiledRule],
    classes: &mut Vec<RuleClass>,
    class_ids: &mut HashMap<Vec<usize>, u32>,
) -> Result<u32, CompileError> {
    Ok(match class_ids.get(&list) {
        Some(id) => *id,
        None => {
            let mut class = RuleClass {
                count: list.len() as u32,
                ..Default::default()
            };
            for (n, &i) in list.iter().enumerate() {
                class.rules[n] = rules[i].matcher;
            }
            let id = classes.len() as u32;
            if id >= MAX_CLASSES {
                return Err(CompileError::TooManyClasses(id as usize + 1));
            }
            classes.push(class);
            class_ids.insert(list, id);
            id
        }
    })
}

/// The port tables and their rule classes. Each (transport, kind) port line is swept: at every
/// range boundary the set of covering rules changes, and each distinct ordered set of rules
/// becomes one class (first match wins within it).
fn port_classes(
    cat: &Catalogue,
    rules: &[CompiledRule],
) -> Result<(Vec<RuleClass>, Vec<PortClasses>), CompileError> {
    let mut classes: Vec<RuleClass> = vec![RuleClass::default()];
    let mut class_ids: HashMap<Vec<usize>, u32> = HashMap::new();
    let mut ports = vec![PortClasses::default(); layout::compiled_port(TRANSPORTS, 0)];
    for transport in [Transport::Tcp, Transport::Udp] {
        for kind in [Kind::Inbound, Kind::ReplyFrom, Kind::ReplyTo] {
            let members = line_members(cat, transport, kind);
            let mut events: BTreeMap<u32, (Vec<usize>, Vec<usize>)> = BTreeMap::new();
            for &i in &members {
                let p = cat.rules[i].ports;
                events.entry(p.lo as u32).or_default().0.push(i);
                events.entry(p.hi as u32 + 1).or_default().1.push(i);
            }
            let mut active: BTreeSet<usize> = BTreeSet::new();
            let bounds: Vec<u32> = events.keys().copied().collect();
            for (k, start) in bounds.iter().enumerate() {
                let (add, remove) = &events[start];
                for i in remove {
                    active.remove(i);
                }
                active.extend(add.iter().copied());
                let end = bounds.get(k + 1).copied().unwrap_or(PORT_SPACE);
                if active.is_empty() || *start >= PORT_SPACE {
                    continue;
                }
                let list: Vec<usize> = active.iter().copied().collect();
                if list.len() > MAX_CANDIDATES {
                    let first = &cat.rules[list[MAX_CANDIDATES]];
                    return Err(CompileError::TooManyCandidates {
                        location: first.location.to_string(),
                        max: MAX_CANDIDATES,
                        transport,
                        port: *start as u16,
                        kind: kind.name(),
                        ids: list
                            .iter()
                            .map(|&i| cat.rules[i].id.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                    });
                }
                let id = class_for(list, rules, &mut classes, &mut class_ids)?;
                for port in *start..end {
                    let e =
                        &mut ports[layout::compiled_port(transport_index(transport), port as u16)];
                    match kind {
                        Kind::Inbound => e.inbound = id,
                        Kind::ReplyFrom => e.reply_from = id,
                        Kind::ReplyTo => e.reply_to = id,
                    }
                }
            }
        }
    }

    Ok((classes, ports))
}

/// The Edge's own host addresses (protected /32 and /128 prefixes), compared directly by the
/// data plane before any table walk; as many as the map holds.
fn locals(
    prefixes_v4: &[(IpNet, u64)],
    prefixes_v6: &[(IpNet, u64)],
) -> edge_classifier_common::Locals {
    let mut locals = edge_classifier_common::Locals::default();
    for (net, bits) in prefixes_v4.iter().chain(prefixes_v6) {
        if bits & SET_PROTECTED == 0 || net.prefix_len() != net.max_prefix_len() {
            continue;
        }
        match net {
            IpNet::V4(n) if (locals.v4_count as usize) < edge_classifier_common::LOCALS_V4 => {
                let i = locals.v4_count as usize;
                locals.v4[i] = n.addr().octets();
                locals.v4_bits[i] = *bits;
                locals.v4_count += 1;
            }
            IpNet::V6(n) if (locals.v6_count as usize) < edge_classifier_common::LOCALS_V6 => {
                let i = locals.v6_count as usize;
                locals.v6[i] = n.addr().octets();
                locals.v6_bits[i] = *bits;
                locals.v6_count += 1;
            }
            _ => {}
        }
    }

    locals
}

/// The policy word, ICMP bitmaps and flow timeouts in kernel ticks.
fn policy(cat: &Catalogue) -> edge_classifier_common::PolicyEntry {
    let p = &cat.policy;
    let mut flags = 0;
    if p.default == Action::Pass {
        flags |= POLICY_DEFAULT_PASS;
    }
    if p.unprotected == Action::Pass {
        flags |= POLICY_PASS_UNPROTECTED;
    }
    if p.fragments == Action::Pass {
        flags |= POLICY_PASS_FRAGMENTS;
    }
    if p.non_ip == Action::Pass {
        flags |= POLICY_PASS_NON_IP;
    }
    match p.egress {
        Egress::Drop => flags |= POLICY_DROP_EGRESS,
        Egress::Track => flags |= POLICY_TRACK_EGRESS,
        Egress::Pass => {}
    }
    if p.protect_interface_addresses {
        flags |= POLICY_PROTECT_IFACE_ADDRS;
    }
    let hz = ticks_per_second();
    edge_classifier_common::PolicyEntry {
        flags,
        _pad: 0,
        icmp4: bitmap(&p.icmp),
        icmp6: bitmap(&p.icmpv6),
        tcp_idle_ticks: cat.flows.tcp_idle as u64 * hz,
        udp_idle_ticks: cat.flows.udp_idle as u64 * hz,
        tcp_closing_ticks: cat.flows.tcp_closing as u64 * hz,
    }
}

/// Prefixes longest first, so the first match of a scan is the longest-prefix match; `None`
/// when there are more than `fits`, and the tries must answer.
fn longest_first(prefixes: &[(IpNet, u64)], fits: usize) -> Option<Vec<&(IpNet, u64)>> {
    if prefixes.len() > fits {
        return None;
    }
    let mut by_len: Vec<&(IpNet, u64)> = prefixes.iter().collect();
    by_len.sort_by_key(|(n, _)| std::cmp::Reverse(n.prefix_len()));
    Some(by_len)
}

fn small_v4(prefixes: &[(IpNet, u64)]) -> edge_classifier_common::Small4 {
    let mut t = edge_classifier_common::Small4::default();
    let Some(prefixes) = longest_first(prefixes, edge_classifier_common::SMALL4) else {
        return t;
    };
    t.complete = 1;
    for (i, (net, bits)) in prefixes.into_iter().enumerate() {
        let IpNet::V4(n) = net else { continue };
        t.net[i] = u32::from(n.network());
        t.mask[i] = u32::from(n.netmask());
        t.bits[i] = *bits;
        t.count += 1;
    }
    t
}

fn small_v6(prefixes: &[(IpNet, u64)]) -> edge_classifier_common::Small6 {
    // The program reads each half of an address as a native-endian word; so do we.
    let words = |a: std::net::Ipv6Addr| {
        let o = a.octets();
        let (hi, lo) = o.split_at(8);
        [
            u64::from_ne_bytes(hi.try_into().expect("8 bytes")),
            u64::from_ne_bytes(lo.try_into().expect("8 bytes")),
        ]
    };
    let mut t = edge_classifier_common::Small6::default();
    let Some(prefixes) = longest_first(prefixes, edge_classifier_common::SMALL6) else {
        return t;
    };
    t.complete = 1;
    for (i, (net, bits)) in prefixes.into_iter().enumerate() {
        let IpNet::V6(n) = net else { continue };
        t.net[i] = words(n.network());
        t.mask[i] = words(n.netmask());
        t.bits[i] = *bits;
        t.count += 1;
    }
    t
}

/// The kernel's HZ: `bpf_jiffies64` ticks per second, which flow timeouts are counted in. The
/// coarse clocks advance once per tick, so their resolution is one jiffy (`TICK_NSEC`).
pub fn ticks_per_second() -> u64 {
    static HZ: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *HZ.get_or_init(|| {
        let mut res = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_getres only writes the timespec it is given.
        let ok = unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut res) } == 0;
        let tick_ns = res.tv_sec as u64 * 1_000_000_000 + res.tv_nsec as u64;
        if ok && tick_ns > 0 {
            (1_000_000_000 + tick_ns / 2) / tick_ns
        } else {
            // Every kernel since 2.6 has the coarse clocks; 1000 is the largest HZ, so timeouts
            // err long rather than short.
            1000
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalogue::Catalogue;

    #[test]
    fn a_limit_becomes_whole_number_budgets_masks_and_a_generation() {
        use crate::catalogue::{Limit, Rate};
        let limit = Limit {
            per_source: Some(Rate {
                count: 20,
                seconds: 1,
                burst: 40,
            }),
            total: Some(Rate {
                count: 100,
                seconds: 60,
                burst: 100,
            }),
            prefix_v4: 24,
            prefix_v6: 48,
            exempt: vec!["partners".into()],
            own_budget: None,
            syn_proxy: false,
        };
        let bits: HashMap<&str, u64> = [("partners", 1u64 << 5)].into();
        let e = rule_limit("r", &limit, &bits, 250);
        // 20 a second at HZ 250: a flow costs 250 units, a tick adds 20, 40 flows fill it.
        assert_eq!(
            (e.per_source.cost, e.per_source.refill, e.per_source.cap),
            (250, 20, 40 * 250)
        );
        assert_eq!(e.per_source.fill_ticks, 500);
        // 100 a minute: 60 s of ticks a flow, 100 units a tick.
        assert_eq!(
            (
                e.total.cost,
                e.total.refill,
                e.total.cap,
                e.total.fill_ticks
            ),
            (15_000, 100, 1_500_000, 15_000)
        );
        assert_eq!(e.exempt_mask, 1 << 5);
        assert_eq!(
            e.mask_v4.to_ne_bytes()[..4],
            [255, 255, 255, 0],
            "the mask over the address bytes as the program loads them"
        );
        let m6: Vec<u8> = e.mask_v6.iter().flat_map(|w| w.to_ne_bytes()).collect();
        assert_eq!(m6, [[0xff; 6].as_slice(), &[0; 10]].concat());
        assert_eq!(rule_limit("r", &limit, &bits, 250).generation, e.generation);
        let mut wider = limit.clone();
        wider.prefix_v4 = 16;
        assert_ne!(rule_limit("r", &wider, &bits, 250).generation, e.generation);
        assert_ne!(rule_limit("s", &limit, &bits, 250).generation, e.generation);
        assert_eq!(e.syn_proxy_ticks, 0, "no proxy unless asked");
        let mut proxied = limit.clone();
        proxied.syn_proxy = true;
        let p = rule_limit("r", &proxied, &bits, 250);
        // One SYN over the budget in 30 s goes through: 7,500 ticks at HZ 250.
        assert_eq!(p.syn_proxy_ticks, 7_500);
        assert_ne!(p.generation, e.generation);
    }

    #[test]
    fn default_catalogue_compiles_with_every_seed_row() {
        let cat = Catalogue::default_catalogue();
        let c = compile(&cat).expect("default compiles");
        let rows: BTreeSet<&str> = c.rules.iter().map(|r| r.seed_row.as_str()).collect();
        for row in ["S1", "P1", "P2", "P3", "P4", "P5", "P6", "X1", "X2", "X3"] {
            assert!(rows.contains(row), "seed row {row} missing: {rows:?}");
        }
        let tcp = |port: u16| c.ports[layout::compiled_port(TRANSPORT_TCP, port)];
        assert_ne!(tcp(443).inbound, 0);
        assert_eq!(tcp(22).inbound, 0);
        assert_ne!(tcp(50000).reply_to, 0);
        assert_ne!(tcp(59999).reply_to, 0);
        assert_eq!(tcp(60000).reply_to, 0);
        assert_eq!(tcp(49999).reply_to, 0);
        assert_ne!(tcp(5061).reply_from, 0);
    }

    #[test]
    fn a_single_rule_inbound_class_travels_in_the_port_entry() {
        let c = compile(&Catalogue::default_catalogue()).expect("default compiles");
        let mut single = 0;
        for i in 0..c.ports.len() {
            let (p, e) = (c.ports[i], c.port_entry(i));
            assert_eq!(
                (e.inbound, e.reply_from, e.reply_to),
                (p.inbound, p.reply_from, p.reply_to),
                "entry {i}: the classes as compiled"
            );
            let class = &c.classes[p.inbound as usize];
            if p.inbound != 0 && class.count == 1 {
                assert_eq!(e.inbound_single, 1, "entry {i}: one rule");
                assert_eq!(e.inbound_rule, class.rules[0], "entry {i}: that rule");
                single += 1;
            } else {
                assert_eq!(e.inbound_single, 0, "entry {i}: no single rule");
                assert_eq!(
                    e.inbound_rule,
                    RuleMatch::default(),
                    "entry {i}: nothing copied"
                );
            }
        }
        // P3 (443), X1 (5269), P6 (3478/udp) and X3 (23456) each have a port of their own.
        assert!(single >= 4, "only {single} single-rule ports");
        let tcp443 = c.port_entry(layout::compiled_port(TRANSPORT_TCP, 443));
        assert_eq!(tcp443.inbound_single, 1, "P3's port carries P3");
    }

    #[test]
    fn slots_and_role_bits_survive_a_recompile() {
        let a = compile(&Catalogue::default_catalogue()).unwrap();
        let text = crate::catalogue::DEFAULT_CATALOGUE
            .replace("id = \"public-im-sip-in\"", "id = \"public-im-sip-in-v2\"")
            .replace(
                "internal = \"NIC facing",
                "dmz = \"x\"\ninternal = \"NIC facing",
            );
        let cat = Catalogue::parse("b.toml", &text).unwrap();
        let b = compile_with(&cat, &a.assignments).unwrap();
        for r in &b.rules {
            match a.rules.iter().find(|x| x.id == r.id) {
                Some(old) => assert_eq!(old.slot, r.slot, "{} keeps its slot", r.id),
                None => {
                    assert_eq!(r.id, "public-im-sip-in-v2");
                    // Not the removed id's slot: the old rules count into it until the flip.
                    assert_eq!(r.slot, 10, "{r:?}");
                }
            }
        }
        let slots: BTreeSet<u32> = b.rules.iter().map(|r| r.slot).collect();
        assert_eq!(slots.len(), b.rules.len(), "slots are distinct");
        for role in ["external", "internal"] {
            assert_eq!(
                a.role_mask(role),
                b.role_mask(role),
                "role {role} keeps its bit"
            );
        }
        assert_eq!(
            b.role_mask("dmz"),
            Some(1 << 2),
            "a new role gets a free bit"
        );
    }

    #[test]
    fn limits_are_errors_with_numbers() {
        let mut cat = Catalogue::default_catalogue();
        // 2^20 - 1 prefixes plus the built-in 0.0.0.0/0 fit exactly; one more does not.
        let fit = (1u32 << 20)
            - 1
            - cat
                .sets
                .values()
                .flatten()
                .filter(|n| n.addr().is_ipv4())
                .count() as u32;
        let many: Vec<IpNet> = (0..fit)
            .map(|i| {
                IpNet::new(
                    std::net::Ipv4Addr::from(0x0a00_0000u32 + (i << 4)).into(),
                    28,
                )
                .unwrap()
            })
            .collect();
        cat.sets.insert("big".into(), many.clone());
        let c = compile(&cat).expect("2^20 IPv4 prefixes fit");
        assert_eq!(c.prefixes_v4.len(), 1 << 20);
        let mut more = many;
        more.push("11.0.0.0/28".parse().unwrap());
        cat.sets.insert("big".into(), more);
        let e = compile(&cat).unwrap_err().to_string();
        assert!(
            e.starts_with("1048577 IPv4 prefixes (with the built-in default route): the data plane holds at most 1048576 per family"),
            "{e}"
        );
        let rules = |tag: &str, n: u32| {
            let mut cat = Catalogue::default_catalogue();
            let template = cat.rules[0].clone();
            cat.rules = (0..n)
                .map(|i| {
                    let mut r = template.clone();
                    r.id = format!("{tag}{i}");
                    let port = 10000 + i as u16;
                    r.ports = crate::catalogue::PortRange { lo: port, hi: port };
                    r
                })
                .collect();
            cat
        };
        let e = compile(&rules("r", MAX_RULES_PER_CATALOGUE + 1))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("8193 rules: a catalogue may have at most 8192"),
            "{e}"
        );
        // At the limit, a catalogue whose every id is new fits beside the running one.
        let running = compile(&rules("a", MAX_RULES_PER_CATALOGUE)).unwrap();
        let next = compile_with(&rules("b", MAX_RULES_PER_CATALOGUE), &running.assignments)
            .expect("a whole new catalogue at the limit fits");
        let slots = |c: &Compiled| c.rules.iter().map(|r| r.slot).collect::<BTreeSet<_>>();
        assert!(slots(&running).is_disjoint(&slots(&next)));
        // A running catalogue over the limit (loaded by an older version) leaves too few.
        let over = Assignments {
            slots: (0..MAX_RULES).map(|s| (format!("old{s}"), s)).collect(),
            roles: running.assignments.roles.clone(),
        };
        let e = compile_with(&rules("c", 1), &over).unwrap_err().to_string();
        assert_eq!(
            e,
            "1 new rule ids beside the 16384 rules running: the data plane has 16384 counter slots for both; reload to a catalogue of at most 8192 rules first"
        );
    }

    #[test]
    fn push_down_carries_shorter_prefix_bits() {
        let mut m = BTreeMap::new();
        m.insert("0.0.0.0/0".parse().unwrap(), 1);
        m.insert("10.0.0.0/8".parse().unwrap(), 2);
        m.insert("10.1.0.0/16".parse().unwrap(), 4);
        m.insert("11.0.0.0/8".parse().unwrap(), 8);
        let out: HashMap<IpNet, u64> = push_down(m).into_iter().collect();
        assert_eq!(out[&"10.1.0.0/16".parse().unwrap()], 7);
        assert_eq!(out[&"11.0.0.0/8".parse().unwrap()], 9);
        assert_eq!(out[&"10.0.0.0/8".parse().unwrap()], 3);
    }
}
