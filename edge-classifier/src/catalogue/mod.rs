//! The rule catalogue: TOML in, a validated [`Catalogue`] out, with every error pointing at the
//! file, line and column that caused it.

pub mod dns;
pub mod profiles;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
    ops::Range,
    path::Path,
};

use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

/// The default catalogue: the seed port matrix (S1, P1–P6, X1–X3) on documentation addresses.
pub const DEFAULT_CATALOGUE: &str = include_str!("default-catalogue.toml");
pub const DEFAULT_NAME: &str = "<default catalogue>";

/// The built-in set that holds every address.
pub const ANY: &str = "any";

#[derive(Debug, thiserror::Error)]
pub enum CatalogueError {
    /// Every error of the file, in source order, one `file:line:column: message` a line.
    #[error("{}", show_errors(.errors))]
    Invalid { errors: Vec<Problem> },
    #[error("{file}: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
}

/// At most this many errors are shown, then how many more there are: a screenful is what an
/// operator reads and fixes in one go.
const MAX_ERRORS: usize = 20;

fn show_errors(errors: &[Problem]) -> String {
    let mut lines: Vec<String> = errors
        .iter()
        .take(MAX_ERRORS)
        .map(Problem::to_string)
        .collect();
    if errors.len() > MAX_ERRORS {
        lines.push(format!("... and {} more errors", errors.len() - MAX_ERRORS));
    }
    lines.join("\n")
}

/// One error in a catalogue and where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub location: Location,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.location, self.message)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Tcp,
    Udp,
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Tcp => "tcp",
            Transport::Udp => "udp",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Remote → local:port, matched on ingress.
    Inbound,
    /// The Edge opens local → remote:port; ingress sees only the replies.
    Outbound,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        })
    }
}

/// `policy.egress`: what happens to a frame the Edge sends that no rule covers (neither an
/// outbound rule nor a reply to an inbound one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Egress {
    /// Sent and recorded in the flow table, so its replies pass (`tracked_reply`): the Edge's
    /// own DNS, NTP and CRL/OCSP lookups work, while inbound stays exactly the matrix.
    #[default]
    Track,
    /// Sent and counted; replies are dropped unless a rule allows them.
    Pass,
    /// Dropped: the matrix enforced on egress too.
    Drop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    #[default]
    Drop,
    Pass,
}

/// An inclusive port range; a single port is `lo == hi`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        self.lo <= port && port <= self.hi
    }
    pub fn overlaps(&self, other: &PortRange) -> bool {
        self.lo <= other.hi && other.lo <= self.hi
    }
    pub fn covers(&self, other: &PortRange) -> bool {
        self.lo <= other.lo && other.hi <= self.hi
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

/// `port = 5061` or `port = "50000-59999"` as written.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawPort {
    Number(i64),
    /// `port = 443.0`: a slip, caught with a message that says what to write.
    Float(f64),
    Text(String),
}

/// `tcp_idle = 600` (seconds) or `tcp_idle = "10m"`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum RawDuration {
    Seconds(i64),
    Text(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCatalogue {
    #[serde(default)]
    policy: RawPolicy,
    interfaces: BTreeMap<Spanned<String>, String>,
    #[serde(default)]
    sets: BTreeMap<Spanned<String>, dns::RawSet>,
    #[serde(default, rename = "rule")]
    rules: Vec<RawRule>,
    #[serde(default)]
    flows: RawFlows,
    #[serde(default)]
    dns: dns::RawDns,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawFlows {
    #[serde(default)]
    capacity: Option<Spanned<i64>>,
    #[serde(default)]
    tcp_idle: Option<Spanned<RawDuration>>,
    #[serde(default)]
    udp_idle: Option<Spanned<RawDuration>>,
    #[serde(default)]
    tcp_closing: Option<Spanned<RawDuration>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    default: Option<Action>,
    #[serde(default)]
    unprotected: Option<Action>,
    #[serde(default)]
    fragments: Option<Action>,
    #[serde(default)]
    non_ip: Option<Action>,
    #[serde(default)]
    protected: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    icmp: Option<Vec<Spanned<RawIcmp>>>,
    #[serde(default)]
    icmpv6: Option<Vec<Spanned<RawIcmp>>>,
    #[serde(default)]
    egress: Option<Egress>,
    #[serde(default)]
    protect_interface_addresses: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawIcmp {
    Number(i64),
    Name(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    id: Spanned<String>,
    #[serde(default)]
    seed_row: Option<Spanned<String>>,
    #[serde(default)]
    role: Option<String>,
    protocol: Spanned<String>,
    transport: Transport,
    direction: Direction,
    local: Spanned<String>,
    remote: Spanned<String>,
    #[serde(default)]
    port: Option<Spanned<RawPort>>,
    #[serde(default)]
    local_port: Option<Spanned<RawPort>>,
    interface: Spanned<String>,
    /// `overlaps = ["earlier-rule-id", ...]`: the operator's word that this rule overlaps those
    /// earlier rules on purpose (a narrower rule first counts its share, a broader one after it
    /// the rest), so `check` stays quiet about those pairs. Each must name an earlier rule. A
    /// pair that no longer overlaps is reported as a stale acknowledgement; a rule an earlier
    /// one shadows is still reported, since no acknowledgement makes it match.
    #[serde(default)]
    overlaps: Vec<Spanned<String>>,
    /// `limit = { per_source = "20/s", burst = 40, total = "5000/s" }`: new flows of an inbound
    /// rule, per source prefix and in total.
    #[serde(default)]
    limit: Option<Spanned<RawLimit>>,
    #[serde(default)]
    note: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimit {
    #[serde(default)]
    per_source: Option<Spanned<String>>,
    #[serde(default)]
    burst: Option<Spanned<i64>>,
    #[serde(default)]
    total: Option<Spanned<String>>,
    #[serde(default)]
    total_burst: Option<Spanned<i64>>,
    #[serde(default)]
    prefix_v4: Option<Spanned<i64>>,
    #[serde(default)]
    prefix_v6: Option<Spanned<i64>>,
    #[serde(default)]
    exempt: Vec<Spanned<String>>,
    #[serde(default)]
    own_budget: Option<Spanned<RawOwnBudget>>,
    #[serde(default)]
    syn_proxy: Option<Spanned<bool>>,
}

/// `own_budget = { sets = ["public_im_partners"], rate = "200/s", burst = 400 }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOwnBudget {
    sets: Vec<Spanned<String>>,
    rate: Spanned<String>,
    #[serde(default)]
    burst: Option<Spanned<i64>>,
}

/// A rate of new flows: `count` per `seconds`, and the burst a bucket holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rate {
    pub count: u32,
    pub seconds: u32,
    pub burst: u32,
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.seconds {
            1 => "s",
            60 => "m",
            _ => "h",
        };
        write!(f, "{}/{unit} burst {}", self.count, self.burst)
    }
}

/// A rule's limit on new flows (a TCP SYN, a UDP datagram of a flow not yet admitted).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Limit {
    /// Per source prefix (`prefix_v4`, `prefix_v6` bits).
    pub per_source: Option<Rate>,
    /// All sources together.
    pub total: Option<Rate>,
    pub prefix_v4: u8,
    pub prefix_v6: u8,
    /// Sets whose sources are never limited (federation partners).
    pub exempt: Vec<String>,
    /// Sets whose sources share a budget of their own instead of the per-source and total ones.
    pub own_budget: Option<OwnBudget>,
    /// A SYN over the budget is answered from XDP with a SYN cookie instead of dropped; only
    /// ACKs with a valid cookie reach the listener (TCP rules; `tcp_syncookies = 2`).
    pub syn_proxy: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OwnBudget {
    pub sets: Vec<String>,
    pub rate: Rate,
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(r) = &self.per_source {
            parts.push(format!(
                "per source /{} /{}: {r}",
                self.prefix_v4, self.prefix_v6
            ));
        }
        if let Some(r) = &self.total {
            parts.push(format!("total: {r}"));
        }
        if !self.exempt.is_empty() {
            parts.push(format!("exempt: {}", self.exempt.join(", ")));
        }
        if let Some(o) = &self.own_budget {
            parts.push(format!("own budget of {}: {}", o.sets.join(", "), o.rate));
        }
        if self.syn_proxy {
            parts.push("SYN proxy over the budget (SYN cookies from XDP)".to_owned());
        }
        write!(f, "{}", parts.join("; "))
    }
}

/// Bounds of a limit's numbers: a million new flows a second is beyond what one Edge accepts.
pub const MAX_LIMIT_RATE: u32 = 1_000_000;
pub const DEFAULT_LIMIT_PREFIX_V4: u8 = 32;
pub const DEFAULT_LIMIT_PREFIX_V6: u8 = 64;

/// `"20/s"`, `"600/m"`, `"1000/h"`: a count of new flows per second, minute or hour.
fn rate(key: &str, text: &str) -> Result<(u32, u32), String> {
    let bad = || {
        format!(
            "invalid rate `{text}` for limit.{key}: expected new flows per second, minute or hour, such as \"20/s\", \"600/m\" or \"1000/h\""
        )
    };
    let (n, unit) = text.trim().split_once('/').ok_or_else(bad)?;
    let seconds = match unit.trim() {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return Err(bad()),
    };
    let n: i64 = n.trim().parse().map_err(|_| bad())?;
    let count = in_range(n, MAX_LIMIT_RATE).ok_or_else(|| {
        format!(
            "limit.{key} = \"{text}\" is out of range: expected 1 to {MAX_LIMIT_RATE} new flows"
        )
    })?;
    Ok((count, seconds))
}

/// Which port of a flow a rule's port range names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PortSide {
    /// The service port: the Edge's own for inbound rules, the peer's for outbound rules.
    Service,
    /// The Edge's own (source) port of an outbound flow; the peer's port is unrestricted.
    Local,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub id: String,
    pub seed_row: Option<String>,
    pub role: Option<String>,
    pub protocol: String,
    pub transport: Transport,
    pub direction: Direction,
    pub local: String,
    pub remote: String,
    pub ports: PortRange,
    pub port_side: PortSide,
    pub interface: String,
    pub note: String,
    /// Earlier rules this one overlaps on purpose (`overlaps`): no warning for those pairs.
    pub overlaps: Vec<String>,
    /// A limit on new flows (inbound rules only).
    pub limit: Option<Limit>,
    /// Where the rule starts in the source, for warnings.
    pub location: Location,
}

impl Rule {
    /// The `ports` label: `5061`, `50000-59999`, or `local:50000-59999` for an Edge-side range.
    pub fn ports_label(&self) -> String {
        match self.port_side {
            PortSide::Service => self.ports.to_string(),
            PortSide::Local => format!("local:{}", self.ports),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub file: String,
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.column)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub default: Action,
    pub unprotected: Action,
    pub fragments: Action,
    pub non_ip: Action,
    /// Sets whose addresses are protected; rules' local sets always are.
    pub protected: Vec<String>,
    pub icmp: Vec<u8>,
    pub icmpv6: Vec<u8>,
    /// Egress frames from protected addresses that no rule allows (neither an outbound rule nor
    /// a reply to an inbound one): always counted; tracked (the default), passed or dropped.
    pub egress: Egress,
    /// Every address configured on a bound NIC (link-local included) is protected too.
    pub protect_interface_addresses: bool,
}

/// The egress flow table that makes outbound rows stateful.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flows {
    /// Flows held at most; beyond it the least recently used are evicted.
    pub capacity: u32,
    /// Seconds a flow may idle before its replies stop passing.
    pub tcp_idle: u32,
    pub udp_idle: u32,
    /// Seconds a TCP flow lives on after FIN both ways or a RST (late ACKs, retransmissions).
    pub tcp_closing: u32,
}

impl Default for Flows {
    fn default() -> Self {
        // TCP: beyond the 2 h default keepalive, so an idle SIP/XMPP connection with keepalives
        // stays open; UDP: like nf_conntrack's assured UDP stream; closing: like its TCP CLOSE.
        Flows {
            capacity: DEFAULT_FLOW_CAPACITY,
            tcp_idle: 7440,
            udp_idle: 180,
            tcp_closing: 10,
        }
    }
}

/// The flow tables' default size: the one the eBPF object declares (the loader resizes them).
pub use edge_classifier_common::DEFAULT_FLOW_CAPACITY;
/// Bounds of `[flows]` values: capacity is kernel memory (about 104 bytes per IPv4 flow and 128
/// per IPv6 flow, for each family's table), idle time beyond ten days keeps dead flows.
pub const MAX_FLOW_CAPACITY: u32 = 16 * 1024 * 1024;
pub const MAX_FLOW_TIMEOUT: u32 = 10 * 24 * 3600;

/// A validated catalogue. Sets and roles keep their names; compiling turns them into bits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Catalogue {
    pub source_name: String,
    /// SHA-256 of the source text, hex: tells which catalogue a running classifier holds.
    pub digest: String,
    pub policy: Policy,
    /// Interface roles and what they are for.
    pub interfaces: BTreeMap<String, String>,
    /// Each set's prefixes: those the catalogue lists, plus (once merged by
    /// [`Catalogue::with_resolved`]) the addresses DNS gave for its names.
    pub sets: BTreeMap<String, Vec<IpNet>>,
    /// Sets that also follow DNS names (`domains` with `srv`, `hosts`).
    pub names: BTreeMap<String, dns::Names>,
    pub rules: Vec<Rule>,
    pub flows: Flows,
    pub dns: dns::Dns,
}

const ICMP_NAMES: &[(&str, u8)] = &[
    ("echo-reply", 0),
    ("destination-unreachable", 3),
    ("redirect", 5),
    ("echo-request", 8),
    ("router-advertisement", 9),
    ("router-solicitation", 10),
    ("time-exceeded", 11),
    ("parameter-problem", 12),
    ("timestamp-request", 13),
    ("timestamp-reply", 14),
];

const ICMPV6_NAMES: &[(&str, u8)] = &[
    ("destination-unreachable", 1),
    ("packet-too-big", 2),
    ("time-exceeded", 3),
    ("parameter-problem", 4),
    ("echo-request", 128),
    ("echo-reply", 129),
    ("mld-query", 130),
    ("mld-report", 131),
    ("mld-done", 132),
    ("mld2-report", 143),
];

/// What passes when the catalogue says nothing: errors, PMTU discovery and ping.
const DEFAULT_ICMP: &[u8] = &[0, 3, 8, 11, 12];
const DEFAULT_ICMPV6: &[u8] = &[1, 2, 3, 4, 128, 129];

/// An ICMP (`v6` false) or ICMPv6 type by the name the catalogue's `icmp`/`icmpv6` lists use,
/// or by number.
pub fn icmp_type(v6: bool, name: &str) -> Option<u8> {
    let names = if v6 { ICMPV6_NAMES } else { ICMP_NAMES };
    names
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, t)| *t)
        .or_else(|| name.parse().ok())
}

/// The catalogue text with its line index, and the errors found in it so far: validation
/// records every error and goes on, so that one `check` shows all of them.
struct Located<'a> {
    name: &'a str,
    text: &'a str,
    /// Byte offset where each line starts: every rule records its location, and rescanning
    /// the text for each of 10,000 rules would be quadratic.
    line_starts: Vec<usize>,
    errors: Vec<Problem>,
}

impl<'a> Located<'a> {
    fn new(name: &'a str, text: &'a str) -> Self {
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Located {
            name,
            text,
            line_starts,
            errors: Vec::new(),
        }
    }

    fn location(&self, offset: usize) -> Location {
        let offset = offset.min(self.text.len());
        let line = self.line_starts.partition_point(|&start| start <= offset);
        let start = self.line_starts[line - 1];
        Location {
            file: self.name.to_string(),
            line,
            column: self.text[start..offset].chars().count() + 1,
        }
    }

    fn error(&mut self, span: Range<usize>, message: impl Into<String>) {
        self.errors.push(Problem {
            location: self.location(span.start),
            message: message.into(),
        });
    }

    /// The value of a check, or `None` with its error recorded at `span`.
    fn check<T>(&mut self, span: Range<usize>, result: Result<T, String>) -> Option<T> {
        result.map_err(|message| self.error(span, message)).ok()
    }

    /// The errors in source order (validation finds them table by table).
    fn into_error(mut self) -> CatalogueError {
        self.errors
            .sort_by_key(|p| (p.location.line, p.location.column));
        CatalogueError::Invalid {
            errors: self.errors,
        }
    }
}

impl Catalogue {
    pub fn default_catalogue() -> Self {
        Self::parse(DEFAULT_NAME, DEFAULT_CATALOGUE)
            .expect("the embedded default catalogue is valid")
    }

    pub fn load(path: &Path) -> Result<Self, CatalogueError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| CatalogueError::Read {
            file: name.clone(),
            source,
        })?;
        Self::parse(&name, &text)
    }

    /// Every error of the file, or the catalogue. A TOML syntax or type error stops there
    /// (serde cannot go on past it), so it comes alone, or with the other `[rule]` headers.
    pub fn parse(name: &str, text: &str) -> Result<Self, CatalogueError> {
        let mut src = Located::new(name, text);
        let raw: RawCatalogue = match toml::from_str(text) {
            Ok(raw) => raw,
            Err(e) => {
                toml_error(&mut src, &e);
                return Err(src.into_error());
            }
        };
        let cat = validate(&mut src, raw);
        if src.errors.is_empty() {
            Ok(cat)
        } else {
            Err(src.into_error())
        }
    }

    /// This catalogue with the addresses DNS gave its sets' names added to the sets (what the
    /// compiler and the reference classifier see). Addresses for sets or names the catalogue no
    /// longer has are left out.
    pub fn with_resolved(&self, resolved: &dns::Resolved) -> Catalogue {
        let mut cat = self.clone();
        dns::merge(&mut cat.sets, &dns::kept(resolved, &self.names));
        cat
    }

    pub fn rule(&self, id: &str) -> Option<&Rule> {
        self.rules.iter().find(|r| r.id == id)
    }
}

fn is_kebab(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && !s.ends_with('-')
        && !s.contains("--")
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

fn is_set_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

fn port_number(n: i64) -> Result<u16, String> {
    if (1..=65535).contains(&n) {
        Ok(n as u16)
    } else {
        Err(format!(
            "port {n} is out of range: expected a port from 1 to 65535"
        ))
    }
}

/// The value of `key` (`port` or `local_port`).
fn port_range(key: &str, raw: &RawPort) -> Result<PortRange, String> {
    match raw {
        RawPort::Number(n) => {
            let p = port_number(*n)?;
            Ok(PortRange { lo: p, hi: p })
        }
        RawPort::Float(f) if f.fract() == 0.0 && (1.0..=65535.0).contains(f) => Err(format!(
            "invalid port `{f:?}`: ports are integers, write `{key} = {f}`"
        )),
        RawPort::Float(f) => Err(format!(
            "invalid port `{f:?}`: ports are integers from 1 to 65535"
        )),
        RawPort::Text(t) => {
            let parse = |s: &str| -> Result<u16, String> {
                let n: i64 = s.trim().parse().map_err(|_| {
                    format!(
                        "invalid port `{t}`: expected a port (5061) or a range (\"50000-59999\")"
                    )
                })?;
                port_number(n)
            };
            let (lo, hi) = match t.split_once('-') {
                Some((a, b)) => (parse(a)?, parse(b)?),
                None => {
                    let p = parse(t)?;
                    (p, p)
                }
            };
            if lo > hi {
                return Err(format!(
                    "reversed port range `{t}`: expected low-high with low <= high"
                ));
            }
            Ok(PortRange { lo, hi })
        }
    }
}

/// An ICMP type list; without one, `default`. Invalid entries are left out.
fn parse_icmp(
    src: &mut Located,
    list: Option<Vec<Spanned<RawIcmp>>>,
    names: &[(&str, u8)],
    default: &[u8],
    what: &str,
) -> Vec<u8> {
    let Some(list) = list else {
        return default.to_vec();
    };
    let mut out = Vec::new();
    for item in list {
        let ty = match item.get_ref() {
            RawIcmp::Number(n) if (0..=255).contains(n) => Ok(*n as u8),
            RawIcmp::Number(n) => Err(format!(
                "{what} type {n} is out of range: expected 0 to 255"
            )),
            RawIcmp::Name(name) => match names.iter().find(|(n, _)| n == name) {
                Some((_, t)) => Ok(*t),
                None => {
                    let known: Vec<&str> = names.iter().map(|(n, _)| *n).collect();
                    Err(format!(
                        "unknown {what} type `{name}`: {}expected a number or one of {}",
                        did_you_mean(name, known.iter().copied()),
                        known.join(", ")
                    ))
                }
            },
        };
        if let Some(ty) = src.check(item.span(), ty)
            && !out.contains(&ty)
        {
            out.push(ty);
        }
    }
    out
}

/// Validates every table, recording each error in `src`; what is invalid is left out of the
/// catalogue returned, which `parse` then discards.
fn validate(src: &mut Located, raw: RawCatalogue) -> Catalogue {
    let sets = parse_sets(src, raw.sets);
    let interfaces = parse_interfaces(src, raw.interfaces);
    let rules = parse_rules(src, raw.rules, &sets, &interfaces);
    let policy = parse_policy(src, raw.policy, &sets);
    let names = sets.names;
    let sets = sets.nets;
    let flows = parse_flows(src, raw.flows);
    let dns = dns::parse_dns(src, raw.dns);
    Catalogue {
        source_name: src.name.to_string(),
        digest: {
            use sha2::Digest as _;
            sha2::Sha256::digest(src.text.as_bytes())
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        },
        policy,
        interfaces,
        sets,
        names,
        rules,
        flows,
        dns,
    }
}

/// `[interfaces]`: role names. An invalid name is kept, so that the rules naming it are not
/// reported as well.
fn parse_interfaces(
    src: &mut Located,
    raw: BTreeMap<Spanned<String>, String>,
) -> BTreeMap<String, String> {
    let mut by_position: Vec<&Spanned<String>> = raw.keys().collect();
    by_position.sort_by_key(|role| role.span().start);
    for role in &by_position {
        if !is_set_name(role.get_ref()) {
            src.error(
                role.span(),
                format!(
                    "invalid interface role `{}`: expected lowercase letters, digits, `_` or `-`",
                    role.get_ref()
                ),
            );
        }
    }
    if let Some(role) = by_position.get(32) {
        src.error(role.span(), "more than 32 interface roles");
    }
    raw.into_iter()
        .map(|(role, what)| (role.into_inner(), what))
        .collect()
}

/// `[sets]` as validated, with what the checks of the rules need to know about them.
struct Sets {
    nets: BTreeMap<String, Vec<IpNet>>,
    /// Sets that lost a prefix to an error: their address families are unknown, so no rule is
    /// reported for pairing them.
    damaged: BTreeSet<String>,
    /// Sets that follow DNS names: what families they hold is known only once resolved.
    names: BTreeMap<String, dns::Names>,
}

/// The address families a set holds.
#[derive(Clone, Copy)]
struct Families {
    v4: bool,
    v6: bool,
}

impl Families {
    fn shared_with(self, other: Families) -> bool {
        (self.v4 && other.v4) || (self.v6 && other.v6)
    }

    /// For a set of one family: its name.
    fn only(self) -> &'static str {
        if self.v4 { "IPv4" } else { "IPv6" }
    }
}

impl Sets {
    /// `None` when unknown, or for an empty set (an error of its own).
    fn families(&self, name: &str) -> Option<Families> {
        if name == ANY {
            return Some(Families { v4: true, v6: true });
        }
        if self.damaged.contains(name) {
            return None;
        }
        if self.names.contains_key(name) {
            return Some(Families { v4: true, v6: true });
        }
        let nets = self.nets.get(name)?;
        let f = Families {
            v4: nets.iter().any(|n| matches!(n, IpNet::V4(_))),
            v6: nets.iter().any(|n| matches!(n, IpNet::V6(_))),
        };
        (f.v4 || f.v6).then_some(f)
    }
}

/// `[sets]`: named lists of prefixes (a bare address is its /32 or /128), or tables of
/// `prefixes` and the DNS names to follow. A set with an invalid name or prefix is kept, so that
/// the rules naming it are not reported as well.
fn parse_sets(src: &mut Located, raw: BTreeMap<Spanned<String>, dns::RawSet>) -> Sets {
    let mut sets = BTreeMap::new();
    let mut damaged = BTreeSet::new();
    let mut names = BTreeMap::new();
    let mut starts = Vec::with_capacity(raw.len());
    for (name, value) in raw {
        let set_name = name.get_ref();
        let dns::SetSource {
            prefixes,
            names: follows,
        } = dns::set_source(src, set_name, value);
        starts.push(name.span());
        if set_name == ANY {
            src.error(name.span(), "set `any` is built in and cannot be redefined");
            continue;
        }
        if !is_set_name(set_name) {
            src.error(
                name.span(),
                format!(
                    "invalid set name `{set_name}`: expected lowercase letters, digits, `_` or `-`"
                ),
            );
        }
        if prefixes.is_empty() && follows.is_none() {
            src.error(
                name.span(),
                format!("set `{set_name}` is empty: a rule naming it could never match; list its prefixes"),
            );
        }
        if let Some(follows) = follows {
            names.insert(set_name.clone(), follows);
        }
        let mut nets = Vec::with_capacity(prefixes.len());
        for p in prefixes {
            match src.check(p.span(), prefix(p.get_ref())) {
                Some(net) => nets.push(net),
                None => {
                    damaged.insert(set_name.clone());
                }
            }
        }
        sets.insert(set_name.clone(), nets);
    }
    starts.sort_by_key(|span| span.start);
    if let Some(span) = starts.get(edge_classifier_common::MAX_NAMED_SETS as usize) {
        src.error(
            span.clone(),
            format!(
                "{} address sets defined: at most {} fit the set bitmask",
                starts.len(),
                edge_classifier_common::MAX_NAMED_SETS
            ),
        );
    }
    Sets {
        nets: sets,
        damaged,
        names,
    }
}

/// One prefix of a set.
fn prefix(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    let net: IpNet = match text.parse::<IpNet>() {
        Ok(n) => n,
        Err(_) => match text.parse::<IpAddr>() {
            Ok(a) => IpNet::from(a),
            Err(_) => {
                return Err(format!(
                    "invalid CIDR prefix `{text}`: expected an IPv4 or IPv6 address or prefix such as 198.51.100.0/24 or 2001:db8::/32"
                ));
            }
        },
    };
    if net.trunc() != net {
        return Err(format!(
            "prefix `{text}` has host bits set: expected {}",
            net.trunc()
        ));
    }
    Ok(net)
}

/// A set a rule or the policy names: one of `[sets]`, or `any`.
fn known_set(sets: &Sets, name: &str, what: &str) -> Result<String, String> {
    if name == ANY || sets.nets.contains_key(name) {
        Ok(name.to_string())
    } else {
        let mut known: Vec<&str> = sets.nets.keys().map(String::as_str).collect();
        known.push(ANY);
        Err(format!(
            "unknown {what} set `{name}`: {}expected one of {}",
            did_you_mean(name, known.iter().copied()),
            known.join(", ")
        ))
    }
}

/// `[[rule]]`s in file order: ids kebab-case and unique, `overlaps` naming earlier rules, the
/// rest checked by [`parse_rule`].
fn parse_rules(
    src: &mut Located,
    raw: Vec<RawRule>,
    sets: &Sets,
    interfaces: &BTreeMap<String, String>,
) -> Vec<Rule> {
    let mut rules: Vec<Rule> = Vec::with_capacity(raw.len());
    // Where each id is first declared: `overlaps` may name only the earlier ones.
    let declared: std::collections::HashMap<String, usize> = raw
        .iter()
        .rev()
        .map(|r| (r.id.get_ref().clone(), r.id.span().start))
        .collect();
    // Ordered, so that the closest id suggested for a slip does not vary from run to run.
    let mut seen_ids: BTreeMap<String, Location> = BTreeMap::new();
    for r in raw {
        let id = r.id.get_ref();
        if !is_kebab(id) {
            src.error(
                r.id.span(),
                format!("invalid rule id `{id}`: expected kebab-case (lowercase letters, digits, single dashes)"),
            );
        }
        if let Some(first) = seen_ids.get(id) {
            src.error(
                r.id.span(),
                format!("duplicate rule id `{id}`: already used at {first}"),
            );
        } else {
            seen_ids.insert(id.clone(), src.location(r.id.span().start));
        }
        let mut overlaps = Vec::with_capacity(r.overlaps.len());
        for other in &r.overlaps {
            let name = other.get_ref();
            let problem = if name == id {
                format!(
                    "rule `{id}` names itself in `overlaps`: name the earlier rules it overlaps"
                )
            } else if seen_ids.contains_key(name) {
                overlaps.push(name.clone());
                continue;
            } else if let Some(&at) = declared.get(name) {
                format!(
                    "`overlaps` names rule `{name}`, which comes later ({}): acknowledge an overlap on the later rule of the two",
                    src.location(at)
                )
            } else {
                format!(
                    "unknown rule `{name}` in `overlaps`: {}expected the id of an earlier rule",
                    did_you_mean(name, seen_ids.keys().map(String::as_str))
                )
            };
            src.error(other.span(), problem);
        }
        rules.extend(parse_rule(src, r, overlaps, sets, interfaces));
    }
    rules
}

/// One rule: seed row, protocol label, sets, interface role and ports; `None` when any of
/// them is invalid (each error recorded). `overlaps` is checked already.
fn parse_rule(
    src: &mut Located,
    r: RawRule,
    overlaps: Vec<String>,
    sets: &Sets,
    interfaces: &BTreeMap<String, String>,
) -> Option<Rule> {
    let id = r.id.get_ref();
    let errors_before = src.errors.len();
    if let Some(row) = &r.seed_row {
        let s = row.get_ref();
        let ok = s.len() <= 8
            && s.starts_with(|c: char| c.is_ascii_uppercase())
            && s[1..].chars().all(|c| c.is_ascii_digit())
            && s.len() > 1;
        if !ok {
            src.error(
                row.span(),
                format!("invalid seed row `{s}`: expected a row name such as S1, P4 or X3"),
            );
        }
    }
    let protocol = r.protocol.get_ref().trim();
    if protocol.is_empty() {
        src.error(
            r.protocol.span(),
            "empty protocol label: expected e.g. SIP/MTLS, SIP/TLS, RTP, STUN/MSTURN, XMPP",
        );
    }
    let local = src.check(r.local.span(), known_set(sets, r.local.get_ref(), "local"));
    if local.as_deref() == Some(ANY) {
        src.error(
            r.local.span(),
            format!(
                "rule `{id}` has local = \"any\": the local side must name the Edge's own addresses"
            ),
        );
    }
    let remote = src.check(
        r.remote.span(),
        known_set(sets, r.remote.get_ref(), "remote"),
    );
    if let (Some(l), Some(rm)) = (&local, &remote)
        && let (Some(lf), Some(rf)) = (sets.families(l), sets.families(rm))
        && !lf.shared_with(rf)
    {
        src.error(
            r.remote.span(),
            format!(
                "rule `{id}` can never match: local set `{l}` holds only {} prefixes and remote set `{rm}` only {} ones",
                lf.only(),
                rf.only()
            ),
        );
    }
    let iface = r.interface.get_ref();
    if !interfaces.contains_key(iface) {
        let known: Vec<&str> = interfaces.keys().map(String::as_str).collect();
        src.error(
            r.interface.span(),
            format!(
                "unknown interface role `{iface}`: {}expected one of {} (declare it under [interfaces])",
                did_you_mean(iface, known.iter().copied()),
                known.join(", ")
            ),
        );
    }
    let ports = match (&r.port, &r.local_port) {
        (Some(p), None) => src
            .check(p.span(), port_range("port", p.get_ref()))
            .map(|range| (range, PortSide::Service)),
        (None, Some(p)) if r.direction == Direction::Outbound => src
            .check(p.span(), port_range("local_port", p.get_ref()))
            .map(|range| (range, PortSide::Local)),
        (None, Some(p)) => {
            src.error(
                p.span(),
                "`local_port` is for outbound rules (the Edge's own source port range): an inbound rule names its service port with `port`",
            );
            None
        }
        (Some(_), Some(p)) => {
            src.error(
                p.span(),
                "a rule has either `port` (the service port) or `local_port` (the Edge's own port range), not both",
            );
            None
        }
        (None, None) => {
            src.error(
                r.id.span(),
                format!("rule `{id}` has no port: expected `port = N` or `port = \"LO-HI\"`"),
            );
            None
        }
    };
    let limit = r
        .limit
        .and_then(|l| parse_limit(src, l, r.direction, r.transport, sets));
    let (Some(local), Some(remote), Some((ports, port_side))) = (local, remote, ports) else {
        return None;
    };
    if src.errors.len() > errors_before {
        return None;
    }
    Some(Rule {
        id: id.clone(),
        seed_row: r.seed_row.map(|s| s.into_inner()),
        role: r.role,
        protocol: protocol.to_string(),
        transport: r.transport,
        direction: r.direction,
        local,
        remote,
        ports,
        port_side,
        interface: iface.clone(),
        note: r.note,
        overlaps,
        limit,
        location: src.location(r.id.span().start),
    })
}

/// A rule's `limit`; `None` with each error recorded.
fn parse_limit(
    src: &mut Located,
    raw: Spanned<RawLimit>,
    direction: Direction,
    transport: Transport,
    sets: &Sets,
) -> Option<Limit> {
    let span = raw.span();
    let l = raw.into_inner();
    let errors_before = src.errors.len();
    if direction == Direction::Outbound {
        src.error(
            span.clone(),
            "`limit` is for inbound rules: it limits the new flows peers open to the Edge",
        );
        return None;
    }
    let burst = |src: &mut Located, b: Option<Spanned<i64>>, key: &str, count: u32| match b {
        None => Some(count),
        Some(b) => src.check(
            b.span(),
            in_range(*b.get_ref(), MAX_LIMIT_RATE).ok_or_else(|| {
                format!(
                    "limit.{key} = {} is out of range: expected 1 to {MAX_LIMIT_RATE} new flows",
                    b.get_ref()
                )
            }),
        ),
    };
    let budget = |src: &mut Located,
                  r: Option<Spanned<String>>,
                  b: Option<Spanned<i64>>,
                  key: &str,
                  burst_key: &str| {
        match r {
            None => {
                if let Some(b) = b {
                    src.error(
                        b.span(),
                        format!("limit.{burst_key} without limit.{key}: give the rate it is the burst of"),
                    );
                }
                None
            }
            Some(r) => {
                let (count, seconds) = src.check(r.span(), rate(key, r.get_ref()))?;
                let burst = burst(src, b, burst_key, count)?;
                Some(Rate {
                    count,
                    seconds,
                    burst,
                })
            }
        }
    };
    let per_source = budget(src, l.per_source, l.burst, "per_source", "burst");
    let total = budget(src, l.total, l.total_burst, "total", "total_burst");
    let mut prefix = |p: Option<Spanned<i64>>, key: &str, max: u8, default: u8| match p {
        None => default,
        Some(p) => src
            .check(
                p.span(),
                in_range(*p.get_ref(), max.into()).ok_or_else(|| {
                    format!(
                        "limit.{key} = {} is out of range: expected a prefix length of 1 to {max}",
                        p.get_ref()
                    )
                }),
            )
            .map_or(default, |n| n as u8),
    };
    let prefix_v4 = prefix(l.prefix_v4, "prefix_v4", 32, DEFAULT_LIMIT_PREFIX_V4);
    let prefix_v6 = prefix(l.prefix_v6, "prefix_v6", 128, DEFAULT_LIMIT_PREFIX_V6);
    let named = |src: &mut Located, list: Vec<Spanned<String>>, what: &str| {
        let mut out: Vec<String> = Vec::new();
        for s in list {
            let Some(name) = src.check(s.span(), known_set(sets, s.get_ref(), what)) else {
                continue;
            };
            if name == ANY {
                src.error(
                    s.span(),
                    format!(
                        "`any` cannot be {what}: that is no limit at all; name the partners' sets"
                    ),
                );
                continue;
            }
            out.push(name);
        }
        out
    };
    let exempt = named(src, l.exempt, "exempt");
    let own_budget = match l.own_budget {
        None => None,
        Some(o) => {
            let o = o.into_inner();
            let own_sets = named(src, o.sets, "given an own budget");
            for set in &own_sets {
                if exempt.contains(set) {
                    src.error(
                        span.clone(),
                        format!("set `{set}` is both exempt and given an own budget: name it in one of them"),
                    );
                }
            }
            let rate = src
                .check(o.rate.span(), rate("own_budget.rate", o.rate.get_ref()))
                .and_then(|(count, seconds)| {
                    burst(src, o.burst, "own_budget.burst", count).map(|burst| Rate {
                        count,
                        seconds,
                        burst,
                    })
                });
            rate.map(|rate| OwnBudget {
                sets: own_sets,
                rate,
            })
        }
    };
    let syn_proxy = match l.syn_proxy {
        Some(p) if *p.get_ref() => {
            if transport == Transport::Udp {
                src.error(
                    p.span(),
                    "limit.syn_proxy is for TCP rules: it answers SYNs with SYN cookies",
                );
            }
            true
        }
        _ => false,
    };
    if src.errors.len() == errors_before && per_source.is_none() && total.is_none() {
        src.error(
            span,
            "a limit needs `per_source` or `total` (or both), such as { per_source = \"20/s\", burst = 40, total = \"5000/s\" }",
        );
    }
    if src.errors.len() > errors_before {
        return None;
    }
    Some(Limit {
        per_source,
        total,
        prefix_v4,
        prefix_v6,
        exempt,
        own_budget,
        syn_proxy,
    })
}

/// `[policy]`; an invalid entry is left out.
fn parse_policy(src: &mut Located, p: RawPolicy, sets: &Sets) -> Policy {
    let mut protected = Vec::new();
    for s in p.protected.unwrap_or_default() {
        let Some(name) = src.check(s.span(), known_set(sets, s.get_ref(), "protected")) else {
            continue;
        };
        if name == ANY {
            src.error(
                s.span(),
                "`any` cannot be protected: name the Edge's own address sets",
            );
            continue;
        }
        protected.push(name);
    }
    Policy {
        default: p.default.unwrap_or(Action::Drop),
        unprotected: p.unprotected.unwrap_or(Action::Pass),
        fragments: p.fragments.unwrap_or(Action::Drop),
        non_ip: p.non_ip.unwrap_or(Action::Pass),
        protected,
        icmp: parse_icmp(src, p.icmp, ICMP_NAMES, DEFAULT_ICMP, "ICMP"),
        icmpv6: parse_icmp(src, p.icmpv6, ICMPV6_NAMES, DEFAULT_ICMPV6, "ICMPv6"),
        egress: p.egress.unwrap_or_default(),
        protect_interface_addresses: p.protect_interface_addresses.unwrap_or(true),
    }
}

/// `[flows]`; an invalid value is reported and its default kept.
fn parse_flows(src: &mut Located, raw: RawFlows) -> Flows {
    let d = Flows::default();
    let capacity = match raw.capacity {
        None => d.capacity,
        Some(v) => {
            let n = *v.get_ref();
            let capacity = in_range(n, MAX_FLOW_CAPACITY).ok_or_else(|| {
                format!(
                    "flows.capacity = {n} is out of range: expected 1 to {MAX_FLOW_CAPACITY} flows"
                )
            });
            src.check(v.span(), capacity).unwrap_or(d.capacity)
        }
    };
    let mut timeout = |v: Option<Spanned<RawDuration>>, default: u32, what: &str| match v {
        None => default,
        Some(v) => src
            .check(v.span(), flow_timeout(v.get_ref(), what))
            .unwrap_or(default),
    };
    Flows {
        capacity,
        tcp_idle: timeout(raw.tcp_idle, d.tcp_idle, "tcp_idle"),
        udp_idle: timeout(raw.udp_idle, d.udp_idle, "udp_idle"),
        tcp_closing: timeout(raw.tcp_closing, d.tcp_closing, "tcp_closing"),
    }
}

fn in_range(n: i64, max: u32) -> Option<u32> {
    (1..=i64::from(max)).contains(&n).then_some(n as u32)
}

/// What a `[flows]` timeout may be, for the messages about one that is not.
const DURATION_FORMS: &str =
    "expected seconds (600) or a string such as \"90s\", \"15m\", \"2h\", \"1d\" or \"2h4m\"";

/// A `[flows]` timeout in seconds, written as seconds or as a duration string.
fn flow_timeout(raw: &RawDuration, what: &str) -> Result<u32, String> {
    seconds_in(raw, &format!("flows.{what}"), 1, MAX_FLOW_TIMEOUT)
}

/// A duration `key` (`flows.tcp_idle`, `dns.max_ttl`) in seconds, written as seconds or as a
/// duration string, within `min..=max`.
pub(crate) fn seconds_in(raw: &RawDuration, key: &str, min: u32, max: u32) -> Result<u32, String> {
    let (seconds, shown) = match raw {
        RawDuration::Seconds(n) => (*n, n.to_string()),
        RawDuration::Text(t) => {
            let seconds = duration_seconds(t)
                .ok_or_else(|| format!("invalid duration `{t}` for {key}: {DURATION_FORMS}"))?;
            (
                i64::try_from(seconds).unwrap_or(i64::MAX),
                format!("\"{t}\""),
            )
        }
    };
    (i64::from(min)..=i64::from(max))
        .contains(&seconds)
        .then_some(seconds as u32)
        .ok_or_else(|| format!("{key} = {shown} is out of range: expected {min} to {max} seconds"))
}

/// `"90s"`, `"15m"`, `"2h"`, `"1d"`, `"2h4m"`, `"1d 12h"`: whole days, hours, minutes and seconds,
/// largest unit first, each at most once. A bare number is not accepted as a string: the
/// integer form says seconds already, and `"90"` is more likely a unit left out.
fn duration_seconds(text: &str) -> Option<u64> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    let (mut total, mut previous_unit) = (0u64, u64::MAX);
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let n: u64 = rest[..digits].parse().ok()?;
        let mut after = rest[digits..].chars();
        let unit = match after.next()? {
            'd' => 86_400,
            'h' => 3_600,
            'm' => 60,
            's' => 1,
            _ => return None,
        };
        if unit >= previous_unit {
            return None;
        }
        previous_unit = unit;
        total = total.saturating_add(n.saturating_mul(unit));
        rest = after.as_str().trim_start();
    }
    Some(total)
}

/// The closest of `known` to `name`, when it is close enough to be a slip of the keyboard:
/// at most one edit per three characters (a swap of two neighbours is one edit).
fn closest<'a>(name: &str, known: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (name.chars().count() / 3).max(1);
    known
        .into_iter()
        .map(|k| (edit_distance(name, k), k))
        .filter(|&(d, _)| d <= limit)
        .min_by_key(|&(d, _)| d)
        .map(|(_, k)| k)
}

/// `did you mean `x`? ` before an "expected ..." list, or nothing.
fn did_you_mean<'a>(name: &str, known: impl IntoIterator<Item = &'a str>) -> String {
    closest(name, known)
        .map(|k| format!("did you mean `{k}`? "))
        .unwrap_or_default()
}

/// Edits (insert, delete, substitute, swap two neighbours) from `a` to `b`, ignoring case.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.to_lowercase().chars().collect();
    let b: Vec<char> = b.to_lowercase().chars().collect();
    // Three rows of the table: two back (for swaps), the previous one and this one.
    let mut before: Vec<usize> = vec![0; b.len() + 1];
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for i in 1..=a.len() {
        let mut row = vec![i; b.len() + 1];
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            row[j] = (previous[j] + 1)
                .min(row[j - 1] + 1)
                .min(previous[j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                row[j] = row[j].min(before[j - 2] + 1);
            }
        }
        before = std::mem::replace(&mut previous, row);
    }
    previous[b.len()]
}

/// The one error serde stops at, said in the catalogue's terms where it is a common slip.
fn toml_error(src: &mut Located, e: &toml::de::Error) {
    let span = e.span().unwrap_or(0..0);
    let message = e.message().trim();
    let value = src.text.get(span.clone()).unwrap_or_default();
    // `[ rule ]` and `["rule"]` are `[rule]` too.
    let bare = |s: &str| -> String {
        s.chars()
            .filter(|c| !c.is_whitespace() && *c != '"' && *c != '\'')
            .collect()
    };
    let before = src.text[..span.start].trim_end();
    // Serde sees the `[rule]` table where a list was declared, or (after another `[rule]` or
    // a `[[rule]]`) the key `rule` twice.
    let about_rule_headers = (message.starts_with("invalid type: map, expected a sequence")
        && bare(value) == "[rule]")
        || (message == "duplicate key" && bare(value) == "rule" && before.ends_with('['));
    if about_rule_headers {
        // Every `[rule]` header is the same slip: say so at each.
        let headers: Vec<Range<usize>> = src
            .line_starts
            .iter()
            .filter_map(|&start| {
                let line = src.text[start..].lines().next().unwrap_or_default();
                let code = line.split('#').next().unwrap_or_default();
                let indent = line.len() - line.trim_start().len();
                (bare(code) == "[rule]").then_some(start + indent..start + line.len())
            })
            .collect();
        if !headers.is_empty() {
            for header in headers {
                src.error(header, RULE_AS_TABLE);
            }
            return;
        }
    }
    let message = if let Some(rest) = message.strip_prefix("unknown field `")
        && let Some((name, expected)) = rest.split_once("`, ")
        && let Some(guess) = closest(name, expected.split('`').skip(1).step_by(2))
    {
        format!("unknown field `{name}`: did you mean `{guess}`? {expected}")
    } else if let Some(raw) =
        message.strip_prefix("data did not match any variant of untagged enum ")
    {
        match raw {
            "RawPort" => {
                format!("invalid port {value}: expected a port (5061) or a range (\"50000-59999\")")
            }
            "RawDuration" => format!("invalid duration {value}: {DURATION_FORMS}"),
            // Serde's span is the whole list here.
            "RawIcmp" => format!(
                "invalid ICMP types {value}: expected numbers or names such as \"echo-request\""
            ),
            _ => message.to_string(),
        }
    } else {
        message.to_string()
    };
    src.error(span, message);
}

/// For `[rule]` where `[[rule]]` was meant: TOML reads it as one table, not a list of rules.
const RULE_AS_TABLE: &str = "`[rule]` is a single table, but rules are a list: write `[[rule]]` (one `[[rule]]` header per rule)";

/// A finding of `check` that is not an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    pub location: Location,
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: warning: {}", self.location, self.message)
    }
}

impl Catalogue {
    fn set_covers(&self, outer: &str, inner: &str) -> bool {
        if outer == ANY || outer == inner {
            return true;
        }
        if inner == ANY {
            return false;
        }
        let (o, i) = (&self.sets[outer], &self.sets[inner]);
        i.iter().all(|n| o.iter().any(|m| m.contains(n)))
    }

    fn sets_overlap(&self, a: &str, b: &str) -> bool {
        if a == ANY || b == ANY || a == b {
            return true;
        }
        let (x, y) = (&self.sets[a], &self.sets[b]);
        x.iter()
            .any(|n| y.iter().any(|m| m.contains(n) || n.contains(m)))
    }

    /// Overlapping and shadowed rules (same transport, direction, port side and interface
    /// role), and outbound rules that look like they name the Edge's own port range as the
    /// peer's.
    pub fn warnings(&self) -> Vec<Warning> {
        let mut out = Vec::new();
        for (j, later) in self.rules.iter().enumerate() {
            // The seed matrix writes the A/V Edge's own media range (50000-59999) where the
            // peer's port goes; copied as `port`, it allows the wrong flows.
            if later.direction == Direction::Outbound
                && later.port_side == PortSide::Service
                && later.ports.lo < later.ports.hi
            {
                out.push(Warning {
                    location: later.location.clone(),
                    message: format!(
                        "rule `{}` is outbound with `port = \"{}\"`, the remote peer's port: if the range is the Edge's own source port range, write `local_port = \"{}\"`",
                        later.id, later.ports, later.ports
                    ),
                });
            }
            for earlier in &self.rules[..j] {
                let acknowledged = later.overlaps.contains(&earlier.id);
                let overlap = earlier.transport == later.transport
                    && earlier.direction == later.direction
                    && earlier.port_side == later.port_side
                    && earlier.interface == later.interface
                    && earlier.ports.overlaps(&later.ports)
                    && self.sets_overlap(&earlier.local, &later.local)
                    && self.sets_overlap(&earlier.remote, &later.remote);
                let shadowed = overlap
                    && earlier.ports.covers(&later.ports)
                    && self.set_covers(&earlier.local, &later.local)
                    && self.set_covers(&earlier.remote, &later.remote);
                let message = if shadowed {
                    format!(
                        "rule `{}` is shadowed by `{}` ({}): it can never match, so its counters stay at zero",
                        later.id, earlier.id, earlier.location
                    )
                } else if overlap && !acknowledged {
                    format!(
                        "rule `{}` overlaps `{}` ({}): frames in the overlap count against `{}` (if intended, say so with `overlaps = [\"{}\"]`)",
                        later.id, earlier.id, earlier.location, earlier.id, earlier.id
                    )
                } else if !overlap && acknowledged {
                    format!(
                        "rule `{}` lists `{}` ({}) in `overlaps`, but they do not overlap: remove it from `overlaps`",
                        later.id, earlier.id, earlier.location
                    )
                } else {
                    continue;
                };
                out.push(Warning {
                    location: later.location.clone(),
                    message,
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"[interfaces]
external = "x"
[sets]
edge = ["198.51.100.10/32"]
"#;

    fn rule(body: &str) -> String {
        format!(
            "{BASE}[[rule]]\nid = \"r1\"\nprotocol = \"SIP/TLS\"\ntransport = \"tcp\"\ndirection = \"inbound\"\nlocal = \"edge\"\nremote = \"any\"\ninterface = \"external\"\n{body}\n"
        )
    }

    /// Parses `text` and returns "line:column: message" of each error.
    fn errors(text: &str) -> Vec<String> {
        match Catalogue::parse("t.toml", text) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(CatalogueError::Invalid { errors }) => errors
                .iter()
                .map(|p| {
                    assert_eq!(p.location.file, "t.toml");
                    format!("{}:{}: {}", p.location.line, p.location.column, p.message)
                })
                .collect(),
            Err(e) => panic!("unexpected error {e}"),
        }
    }

    /// Parses `text` and returns "line:column: message" of its one error.
    fn error(text: &str) -> String {
        let mut all = errors(text);
        assert_eq!(all.len(), 1, "one error expected: {all:#?}");
        all.remove(0)
    }

    #[test]
    fn default_catalogue_carries_every_seed_row_with_its_reading() {
        let cat = Catalogue::default_catalogue();
        let rows: Vec<&str> = cat
            .rules
            .iter()
            .filter_map(|r| r.seed_row.as_deref())
            .collect();
        for row in ["S1", "P1", "P2", "P3", "P4", "P5", "P6", "X1", "X2", "X3"] {
            assert_eq!(
                rows.iter().filter(|r| **r == row).count(),
                1,
                "seed row {row}"
            );
        }
        for r in &cat.rules {
            assert!(
                r.note.contains("Read as:"),
                "rule {} says how its row is read",
                r.id
            );
        }
        let p4 = cat
            .rules
            .iter()
            .find(|r| r.seed_row.as_deref() == Some("P4"))
            .unwrap();
        assert_eq!(p4.port_side, PortSide::Local);
        assert_eq!(
            p4.ports,
            PortRange {
                lo: 50000,
                hi: 59999
            }
        );
        assert_eq!(p4.direction, Direction::Outbound);
        // `check` has nothing to say about it: S1's overlap with P2 is acknowledged.
        assert_eq!(cat.warnings(), []);
    }

    #[test]
    fn flows_and_egress_policy_parse_with_defaults_and_bounds() {
        let cat = Catalogue::parse("t.toml", BASE).unwrap();
        assert_eq!(cat.flows, Flows::default());
        assert_eq!(cat.policy.egress, Egress::Track);
        let text = format!(
            "{BASE}[policy]\negress = \"drop\"\n[flows]\ncapacity = 1024\ntcp_idle = 600\nudp_idle = 30\ntcp_closing = 5\n"
        );
        let cat = Catalogue::parse("t.toml", &text).unwrap();
        assert_eq!(cat.policy.egress, Egress::Drop);
        assert_eq!(
            cat.flows,
            Flows {
                capacity: 1024,
                tcp_idle: 600,
                udp_idle: 30,
                tcp_closing: 5
            }
        );
        let e = error(&format!("{BASE}[flows]\ncapacity = 0\n"));
        assert!(
            e.starts_with("6:12: flows.capacity = 0 is out of range: expected 1 to 16777216 flows"),
            "{e}"
        );
        let e = error(&format!("{BASE}[flows]\nudp_idle = 864001\n"));
        assert!(
            e.starts_with("6:12: flows.udp_idle = 864001 is out of range"),
            "{e}"
        );
        let e = error(&format!("{BASE}[flows]\nudp_timeout = 5\n"));
        assert!(e.starts_with("6:1: unknown field `udp_timeout`"), "{e}");
        let e = error(&format!("{BASE}[policy]\negress = \"count\"\n"));
        assert!(e.starts_with("6:10: unknown variant `count`"), "{e}");
    }

    #[test]
    fn valid_rule_with_range_parses() {
        let cat = Catalogue::parse("t.toml", &rule("port = \"5060-5061\"")).unwrap();
        assert_eq!(cat.rules[0].ports, PortRange { lo: 5060, hi: 5061 });
        assert!(cat.warnings().is_empty());
    }

    #[test]
    fn errors_name_line_column_and_what_was_expected() {
        // Unknown key at the top level and inside a rule.
        let e = error(&format!("bogus = 1\n{BASE}"));
        assert!(e.starts_with("1:1: unknown field `bogus`"), "{e}");
        let e = error(&rule("port = 443\ncolour = \"red\""));
        assert!(e.starts_with("14:1: unknown field `colour`"), "{e}");
        // Bad CIDR, host bits.
        let e = error(&BASE.replace("198.51.100.10/32", "198.51.100.300/32"));
        assert!(
            e.starts_with("4:9: invalid CIDR prefix `198.51.100.300/32`"),
            "{e}"
        );
        let e = error(&BASE.replace("198.51.100.10/32", "198.51.100.10/24"));
        assert!(e.contains("host bits set: expected 198.51.100.0/24"), "{e}");
        // Ports.
        let e = error(&rule("port = 0"));
        assert!(e.starts_with("13:8: port 0 is out of range"), "{e}");
        let e = error(&rule("port = 65536"));
        assert!(e.starts_with("13:8: port 65536 is out of range"), "{e}");
        let e = error(&rule("port = \"6000-5000\""));
        assert!(
            e.starts_with("13:8: reversed port range `6000-5000`"),
            "{e}"
        );
        let e = error(&rule("port = \"http\""));
        assert!(e.contains("invalid port `http`"), "{e}");
        let e = error(&rule(""));
        assert!(e.contains("has no port"), "{e}");
        // Unknown set and role.
        let e = error(&rule("port = 443").replace("remote = \"any\"", "remote = \"partners\""));
        assert!(
            e.starts_with("11:10: unknown remote set `partners`: expected one of edge, any"),
            "{e}"
        );
        let e =
            error(&rule("port = 443").replace("interface = \"external\"", "interface = \"dmz\""));
        assert!(e.starts_with("12:13: unknown interface role `dmz`"), "{e}");
        // Duplicate id.
        let two = format!(
            "{}{}",
            rule("port = 443"),
            rule("port = 444").replace(BASE, "")
        );
        let e = error(&two);
        assert!(
            e.starts_with("15:6: duplicate rule id `r1`: already used at t.toml:6:6"),
            "{e}"
        );
        // Transport and direction enums.
        let e = error(&rule("port = 443").replace("\"tcp\"", "\"sctp\""));
        assert!(
            e.contains("unknown variant `sctp`, expected `tcp` or `udp`"),
            "{e}"
        );
        let e = error(&rule("port = 443").replace("\"inbound\"", "\"in\""));
        assert!(e.contains("expected `inbound` or `outbound`"), "{e}");
        // Ids are kebab-case.
        let e = error(&rule("port = 443").replace("\"r1\"", "\"Rule_1\""));
        assert!(e.contains("expected kebab-case"), "{e}");
        // local_port only for outbound rules.
        let e = error(&rule("local_port = \"50000-59999\""));
        assert!(e.contains("`local_port` is for outbound rules"), "{e}");
        // TOML syntax.
        let e = error(&format!("{BASE}[[rule]\n"));
        assert!(e.starts_with("5:"), "{e}");
    }

    #[test]
    fn every_error_of_a_file_is_reported_in_source_order() {
        // [flows] is validated after the rules and the sets, yet comes first in the file; the
        // set with a bad prefix is still known to the rule that names it.
        let text = format!(
            "[flows]\nudp_idle = 0\n{}",
            rule("port = 0").replace("remote = \"any\"", "remote = \"partners\"")
        )
        .replace("198.51.100.10/32", "198.51.100.300/32");
        let e = errors(&text);
        assert_eq!(e.len(), 4, "{e:#?}");
        assert!(
            e[0].starts_with("2:12: flows.udp_idle = 0 is out of range"),
            "{e:#?}"
        );
        assert!(
            e[1].starts_with("6:9: invalid CIDR prefix `198.51.100.300/32`"),
            "{e:#?}"
        );
        assert!(
            e[2].starts_with("13:10: unknown remote set `partners`"),
            "{e:#?}"
        );
        assert!(e[3].starts_with("15:8: port 0 is out of range"), "{e:#?}");
        let shown = Catalogue::parse("t.toml", &text).unwrap_err().to_string();
        let lines: Vec<&str> = shown.lines().collect();
        assert_eq!(lines.len(), 4, "{shown}");
        assert!(
            lines[2].starts_with("t.toml:13:10: unknown remote set"),
            "{shown}"
        );
    }

    #[test]
    fn at_most_twenty_errors_are_shown() {
        let mut text = BASE.to_string();
        for i in 0..25 {
            text += &rule("port = 0")
                .replace(BASE, "")
                .replace("\"r1\"", &format!("\"r{i}\""));
        }
        assert_eq!(errors(&text).len(), 25);
        let shown = Catalogue::parse("t.toml", &text).unwrap_err().to_string();
        let lines: Vec<&str> = shown.lines().collect();
        assert_eq!(lines.len(), MAX_ERRORS + 1, "{shown}");
        assert!(
            lines[0].starts_with("t.toml:13:8: port 0 is out of range"),
            "{shown}"
        );
        assert_eq!(lines[MAX_ERRORS], "... and 5 more errors");
    }

    #[test]
    fn an_empty_set_is_an_error() {
        let e = error(&format!("{BASE}nobody = []\n"));
        assert_eq!(
            e,
            "5:1: set `nobody` is empty: a rule naming it could never match; list its prefixes"
        );
    }

    #[test]
    fn a_rule_whose_sets_share_no_address_family_is_an_error() {
        let with_v6 = |remote: &str| {
            rule("port = 443")
                .replace("[[rule]]", "peers6 = [\"2001:db8::/32\"]\n[[rule]]")
                .replace("remote = \"any\"", &format!("remote = \"{remote}\""))
        };
        assert_eq!(
            error(&with_v6("peers6")),
            "12:10: rule `r1` can never match: local set `edge` holds only IPv4 prefixes and remote set `peers6` only IPv6 ones"
        );
        // `any` holds both families, and so does a mixed set.
        Catalogue::parse("t.toml", &with_v6("any")).unwrap();
        let mixed = with_v6("peers6").replace(
            "[\"198.51.100.10/32\"]",
            "[\"198.51.100.10/32\", \"2001:db8:100::10/128\"]",
        );
        Catalogue::parse("t.toml", &mixed).unwrap();
        // A set whose prefix is invalid has no known family: only the prefix is reported.
        let e = errors(&with_v6("peers6").replace("2001:db8::/32", "2001:db8::/300"));
        assert_eq!(e.len(), 1, "{e:#?}");
        assert!(e[0].starts_with("5:11: invalid CIDR prefix"), "{e:#?}");
    }

    #[test]
    fn an_outbound_port_range_gets_a_hint_about_local_port() {
        let outbound = |ports: &str| {
            let text = rule(ports).replace("\"inbound\"", "\"outbound\"");
            Catalogue::parse("t.toml", &text).unwrap().warnings()
        };
        let w = outbound("port = \"50000-59999\"");
        assert_eq!(w.len(), 1, "{w:?}");
        assert_eq!(
            w[0].to_string(),
            "t.toml:6:6: warning: rule `r1` is outbound with `port = \"50000-59999\"`, the remote peer's port: if the range is the Edge's own source port range, write `local_port = \"50000-59999\"`"
        );
        // One port, or the range already on the Edge's side: nothing to say.
        assert!(outbound("port = 5061").is_empty());
        assert!(outbound("local_port = \"50000-59999\"").is_empty());
        // Inbound, the range is the Edge's own.
        let inbound = Catalogue::parse("t.toml", &rule("port = \"50000-59999\"")).unwrap();
        assert!(inbound.warnings().is_empty());
    }

    #[test]
    fn rule_written_as_a_table_says_to_write_an_array_of_tables() {
        let want = "`[rule]` is a single table, but rules are a list: write `[[rule]]` (one `[[rule]]` header per rule)";
        let one = rule("port = 443").replace("[[rule]]", "[rule]");
        assert_eq!(error(&one), format!("5:1: {want}"));
        // Twice (TOML calls the second a duplicate key), and after a `[[rule]]`: each header.
        let second = rule("port = 444")
            .replace(BASE, "")
            .replace("\"r1\"", "\"r2\"");
        let e = errors(&format!(
            "{one}{}",
            second.replace("[[rule]]", "  [ rule ] # two")
        ));
        assert_eq!(e, [format!("5:1: {want}"), format!("14:3: {want}")]);
        let e = errors(&format!(
            "{}{}",
            rule("port = 443"),
            second.replace("[[rule]]", "[rule]")
        ));
        assert_eq!(e, [format!("14:1: {want}")]);
        let e = errors(&format!("{one}{second}"));
        assert_eq!(e, [format!("5:1: {want}")]);
        let e = error(&one.replace("[rule]", "[\"rule\"]"));
        assert_eq!(e, format!("5:1: {want}"));
    }

    #[test]
    fn a_port_written_as_a_float_says_ports_are_integers() {
        assert_eq!(
            error(&rule("port = 443.0")),
            "13:8: invalid port `443.0`: ports are integers, write `port = 443`"
        );
        let outbound = rule("local_port = 50000.0").replace("\"inbound\"", "\"outbound\"");
        assert_eq!(
            error(&outbound),
            "13:14: invalid port `50000.0`: ports are integers, write `local_port = 50000`"
        );
        assert_eq!(
            error(&rule("port = 443.5")),
            "13:8: invalid port `443.5`: ports are integers from 1 to 65535"
        );
        // Neither a number nor a string.
        assert_eq!(
            error(&rule("port = true")),
            "13:8: invalid port true: expected a port (5061) or a range (\"50000-59999\")"
        );
    }

    #[test]
    fn a_limit_parses_with_defaults_and_shows_itself() {
        let limited = |limit: &str| {
            let text = rule(&format!("port = 443\nlimit = {limit}"));
            let text = text.replace("[sets]\n", "[sets]\npartners = [\"203.0.113.0/24\"]\n");
            Catalogue::parse("t.toml", &text)
                .unwrap_or_else(|e| panic!("{limit}: {e}"))
                .rules[0]
                .limit
                .clone()
                .expect("a limit")
        };
        let l = limited(r#"{ per_source = "20/s", burst = 40, total = "5000/s" }"#);
        let rate = |count, seconds, burst| Rate {
            count,
            seconds,
            burst,
        };
        assert_eq!(l.per_source, Some(rate(20, 1, 40)));
        // A total's burst defaults to one period's worth.
        assert_eq!(l.total, Some(rate(5000, 1, 5000)));
        assert_eq!((l.prefix_v4, l.prefix_v6), (32, 64));
        assert_eq!(
            l.to_string(),
            "per source /32 /64: 20/s burst 40; total: 5000/s burst 5000"
        );
        let l = limited(
            r#"{ per_source = "600/m", prefix_v4 = 24, prefix_v6 = 48, exempt = ["partners"] }"#,
        );
        assert_eq!(l.per_source, Some(rate(600, 60, 600)));
        assert_eq!(l.total, None);
        assert_eq!((l.prefix_v4, l.prefix_v6), (24, 48));
        assert_eq!(l.exempt, vec!["partners".to_string()]);
        assert_eq!(
            limited(r#"{ total = "100/h", total_burst = 7 }"#).total,
            Some(rate(100, 3600, 7))
        );
        let l = limited(
            r#"{ total = "100/s", own_budget = { sets = ["partners"], rate = "200/s", burst = 400 } }"#,
        );
        assert_eq!(
            l.own_budget,
            Some(OwnBudget {
                sets: vec!["partners".into()],
                rate: rate(200, 1, 400)
            })
        );
        assert_eq!(
            l.to_string(),
            "total: 100/s burst 100; own budget of partners: 200/s burst 400"
        );
        assert!(!l.syn_proxy);
        let l = limited(r#"{ per_source = "20/s", syn_proxy = true }"#);
        assert!(l.syn_proxy);
        assert_eq!(
            l.to_string(),
            "per source /32 /64: 20/s burst 20; SYN proxy over the budget (SYN cookies from XDP)"
        );
        assert!(!limited(r#"{ per_source = "20/s", syn_proxy = false }"#).syn_proxy);
    }

    #[test]
    fn limit_errors_name_line_column_and_what_was_expected() {
        let limited = |limit: &str| error(&rule(&format!("port = 443\nlimit = {limit}")));
        assert_eq!(
            limited(r#"{ per_source = "20/x" }"#),
            r#"14:24: invalid rate `20/x` for limit.per_source: expected new flows per second, minute or hour, such as "20/s", "600/m" or "1000/h""#
        );
        assert_eq!(
            limited(r#"{ total = "0/s" }"#),
            r#"14:19: limit.total = "0/s" is out of range: expected 1 to 1000000 new flows"#
        );
        assert_eq!(
            limited(r#"{ per_source = "1/s", burst = 0 }"#),
            "14:39: limit.burst = 0 is out of range: expected 1 to 1000000 new flows"
        );
        assert_eq!(
            limited(r#"{ burst = 4 }"#),
            "14:19: limit.burst without limit.per_source: give the rate it is the burst of"
        );
        assert_eq!(
            limited(r#"{ exempt = [] }"#),
            r#"14:9: a limit needs `per_source` or `total` (or both), such as { per_source = "20/s", burst = 40, total = "5000/s" }"#
        );
        assert_eq!(
            limited(r#"{ per_source = "1/s", prefix_v4 = 33 }"#),
            "14:43: limit.prefix_v4 = 33 is out of range: expected a prefix length of 1 to 32"
        );
        assert_eq!(
            limited(r#"{ per_source = "1/s", exempt = ["any"] }"#),
            "14:41: `any` cannot be exempt: that is no limit at all; name the partners' sets"
        );
        assert!(
            limited(r#"{ per_source = "1/s", exempt = ["partner"] }"#)
                .starts_with("14:41: unknown exempt set `partner`"),
        );
        assert!(limited(r#"{ per_sauce = "1/s" }"#).contains("unknown field `per_sauce`"));
        assert_eq!(
            limited(r#"{ total = "1/s", own_budget = { sets = ["edge"], rate = "1/x" } }"#),
            r#"14:65: invalid rate `1/x` for limit.own_budget.rate: expected new flows per second, minute or hour, such as "20/s", "600/m" or "1000/h""#
        );
        assert_eq!(
            limited(
                r#"{ total = "1/s", exempt = ["edge"], own_budget = { sets = ["edge"], rate = "1/s" } }"#
            ),
            "14:9: set `edge` is both exempt and given an own budget: name it in one of them"
        );
        assert!(
            limited(r#"{ total = "1/s", syn_proxy = "yes" }"#)
                .starts_with("14:38: invalid type: string \"yes\", expected a boolean"),
            "{}",
            limited(r#"{ total = "1/s", syn_proxy = "yes" }"#)
        );
        let udp = rule("port = 3478\nlimit = { total = \"1/s\", syn_proxy = true }")
            .replace("transport = \"tcp\"", "transport = \"udp\"");
        assert_eq!(
            error(&udp),
            "14:38: limit.syn_proxy is for TCP rules: it answers SYNs with SYN cookies"
        );
        let outbound = rule("port = 443\nlimit = { total = \"1/s\", syn_proxy = true }")
            .replace("direction = \"inbound\"", "direction = \"outbound\"");
        assert_eq!(
            error(&outbound),
            "14:9: `limit` is for inbound rules: it limits the new flows peers open to the Edge"
        );
        let outbound = rule("port = 443\nlimit = { total = \"1/s\" }")
            .replace("direction = \"inbound\"", "direction = \"outbound\"");
        assert_eq!(
            error(&outbound),
            "14:9: `limit` is for inbound rules: it limits the new flows peers open to the Edge"
        );
    }

    #[test]
    fn flow_timeouts_are_seconds_or_durations() {
        let flows = |value: &str| format!("{BASE}[flows]\ntcp_idle = {value}\n");
        for (value, seconds) in [
            ("7440", 7440),
            ("\"90s\"", 90),
            ("\"15m\"", 900),
            ("\"2h\"", 7200),
            ("\"1d\"", 86_400),
            ("\"2h4m\"", 7440),
            ("\" 1d 12h \"", 129_600),
        ] {
            let cat = Catalogue::parse("t.toml", &flows(value)).unwrap();
            assert_eq!(cat.flows.tcp_idle, seconds, "tcp_idle = {value}");
        }
        let forms =
            r#"expected seconds (600) or a string such as "90s", "15m", "2h", "1d" or "2h4m""#;
        for bad in ["2x", "4m2h", "1h1h", "90", "h", "", "1.5h", "-2h"] {
            assert_eq!(
                error(&flows(&format!("\"{bad}\""))),
                format!("6:12: invalid duration `{bad}` for flows.tcp_idle: {forms}")
            );
        }
        assert_eq!(
            error(&flows("\"11d\"")),
            "6:12: flows.tcp_idle = \"11d\" is out of range: expected 1 to 864000 seconds"
        );
        assert!(error(&flows("\"0s\"")).contains("is out of range"));
        assert_eq!(
            error(&flows("2.5")),
            format!("6:12: invalid duration 2.5: {forms}")
        );
    }

    #[test]
    fn unknown_names_get_the_closest_known_one() {
        // A key, serde's message kept and the suggestion added.
        let e = error(&rule("prot = 443"));
        assert!(
            e.starts_with("13:1: unknown field `prot`: did you mean `port`? expected one of `id`,"),
            "{e}"
        );
        let e = error(&format!("{BASE}[flows]\ntcp_idel = 5\n"));
        assert!(
            e.starts_with(
                "6:1: unknown field `tcp_idel`: did you mean `tcp_idle`? expected one of"
            ),
            "{e}"
        );
        // Far from every key: no guess.
        let e = error(&rule("port = 443\ncolour = \"red\""));
        assert!(
            e.starts_with("14:1: unknown field `colour`, expected one of"),
            "{e}"
        );
        // A set.
        let text = rule("port = 443")
            .replace(
                "[[rule]]",
                "public_im_partners = [\"203.0.113.0/24\"]\n[[rule]]",
            )
            .replace("remote = \"any\"", "remote = \"publc_im_partners\"");
        assert_eq!(
            error(&text),
            "12:10: unknown remote set `publc_im_partners`: did you mean `public_im_partners`? expected one of edge, public_im_partners, any"
        );
        // An interface role.
        let text =
            rule("port = 443").replace("interface = \"external\"", "interface = \"externl\"");
        assert_eq!(
            error(&text),
            "12:13: unknown interface role `externl`: did you mean `external`? expected one of external (declare it under [interfaces])"
        );
        // An ICMP type.
        let e = error(&format!("{BASE}[policy]\nicmp = [\"echo-requst\"]\n"));
        assert!(
            e.starts_with("6:9: unknown ICMP type `echo-requst`: did you mean `echo-request`?"),
            "{e}"
        );
        let e = error(&format!("{BASE}[policy]\nicmp = [true]\n"));
        assert_eq!(
            e,
            "6:8: invalid ICMP types [true]: expected numbers or names such as \"echo-request\""
        );
    }

    #[test]
    fn edit_distance_counts_a_swap_as_one_edit() {
        assert_eq!(edit_distance("port", "port"), 0);
        assert_eq!(edit_distance("prot", "port"), 1);
        assert_eq!(edit_distance("Port", "port"), 0);
        assert_eq!(edit_distance("externl", "external"), 1);
        assert_eq!(edit_distance("", "any"), 3);
        assert_eq!(edit_distance("dmz", "external"), 8);
        assert_eq!(edit_distance("sctp", "tcp"), 2);
        assert_eq!(closest("udpp", ["tcp", "udp"]), Some("udp"));
        assert_eq!(closest("dmz", ["external", "internal"]), None);
    }

    /// The warnings of `text`, as `check` prints them.
    fn warnings(text: &str) -> Vec<String> {
        let cat = Catalogue::parse("t.toml", text).unwrap();
        cat.warnings().iter().map(|w| w.to_string()).collect()
    }

    /// `rule(body)` with its id `id`, without `BASE`: a second or third rule.
    fn another(id: &str, body: &str) -> String {
        rule(body)
            .replace(BASE, "")
            .replace("id = \"r1\"", &format!("id = \"{id}\""))
    }

    #[test]
    fn overlaps_acknowledges_an_intended_overlap() {
        // r2 (443-600) overlaps r1 (400-500); r3 (450) is shadowed by both.
        let three = |r2: &str, r3: &str| {
            format!(
                "{}{}{}",
                rule("port = \"400-500\""),
                another("r2", &format!("port = \"443-600\"\n{r2}")),
                another("r3", &format!("port = 450\n{r3}")),
            )
        };
        let w = warnings(&three("", ""));
        assert_eq!(w.len(), 3, "{w:#?}");
        assert!(
            w[0].ends_with(
                "rule `r2` overlaps `r1` (t.toml:6:6): frames in the overlap count against `r1` (if intended, say so with `overlaps = [\"r1\"]`)"
            ),
            "{w:#?}"
        );
        // Acknowledged pairs are quiet; a shadowed rule is still reported, as it never matches.
        let w = warnings(&three("overlaps = [\"r1\"]", "overlaps = [\"r1\", \"r2\"]"));
        assert_eq!(w.len(), 2, "{w:#?}");
        assert!(w[0].contains("`r3` is shadowed by `r1`"), "{w:#?}");
        assert!(w[1].contains("`r3` is shadowed by `r2`"), "{w:#?}");
        // Stale: on udp, r2 overlaps nothing.
        let stale = format!(
            "{}{}",
            rule("port = 443"),
            another("r2", "port = 443\noverlaps = [\"r1\"]").replace("\"tcp\"", "\"udp\"")
        );
        assert_eq!(
            warnings(&stale),
            [
                "t.toml:15:6: warning: rule `r2` lists `r1` (t.toml:6:6) in `overlaps`, but they do not overlap: remove it from `overlaps`"
            ]
        );
    }

    #[test]
    fn overlaps_names_earlier_rules() {
        let three = |overlaps: &str| {
            format!(
                "{}{}{}",
                rule("port = 443").replace("\"r1\"", "\"public-im-sip-out\""),
                another("r2", &format!("port = 444\noverlaps = [{overlaps}]")),
                another("r3", "port = 445"),
            )
        };
        Catalogue::parse("t.toml", &three("\"public-im-sip-out\"")).unwrap();
        assert_eq!(
            error(&three("\"publc-im-sip-out\"")),
            "23:13: unknown rule `publc-im-sip-out` in `overlaps`: did you mean `public-im-sip-out`? expected the id of an earlier rule"
        );
        assert_eq!(
            error(&three("\"r3\"")),
            "23:13: `overlaps` names rule `r3`, which comes later (t.toml:25:6): acknowledge an overlap on the later rule of the two"
        );
        assert_eq!(
            error(&three("\"public-im-sip-out\", \"r2\"")),
            "23:34: rule `r2` names itself in `overlaps`: name the earlier rules it overlaps"
        );
    }

    #[test]
    fn check_reports_shadowed_and_overlapping_rules() {
        let text = format!(
            "{}{}{}",
            rule("port = \"400-500\""),
            rule("port = 443")
                .replace(BASE, "")
                .replace("\"r1\"", "\"r2\""),
            rule("port = \"500-600\"")
                .replace(BASE, "")
                .replace("\"r1\"", "\"r3\""),
        );
        let cat = Catalogue::parse("t.toml", &text).unwrap();
        let w: Vec<String> = cat.warnings().iter().map(|w| w.to_string()).collect();
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains("`r2` is shadowed by `r1`"), "{w:?}");
        assert!(w[1].contains("`r3` overlaps `r1`"), "{w:?}");
    }
}
