//! Address sets fed from DNS: the names a set follows (`domains` with their `srv` services,
//! plain `hosts`), the resolver settings of `[dns]`, and the addresses resolved for them as
//! they are merged into the sets the compiler sees.
//!
//! The catalogue only says what to resolve; the daemon resolves (`crate::resolve`), and what it
//! found travels with the catalogue text in the kernel's record of each rule buffer, so that a
//! reload, a restart and `status` see the same addresses the kernel holds.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, SocketAddr},
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize, de};
use toml::Spanned;

use super::{Located, RawDuration, seconds_in};

/// What one set follows in DNS.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Names {
    /// Partner domains (`partner.example`), resolved through each of `srv`.
    pub domains: Vec<String>,
    /// SRV services (`_sipfederationtls._tcp`, `_xmpp-server._tcp`): `SERVICE.DOMAIN` is asked.
    pub srv: Vec<String>,
    /// Host names resolved for their A and AAAA records directly.
    pub hosts: Vec<String>,
}

impl Names {
    /// Every name this set resolves, as (the name the catalogue wrote, the query behind it).
    pub fn queries(&self) -> Vec<Query> {
        let srv = self.domains.iter().flat_map(|d| {
            self.srv.iter().map(move |s| Query::Srv {
                domain: d.clone(),
                service: s.clone(),
            })
        });
        let hosts = self.hosts.iter().map(|h| Query::Host { host: h.clone() });
        srv.chain(hosts).collect()
    }

    /// Whether `name` (a domain or a host) is one this set follows.
    pub fn follows(&self, name: &str) -> bool {
        self.domains.iter().chain(&self.hosts).any(|n| n == name)
    }
}

/// One lookup a set needs: an SRV service of a domain (then each target's A/AAAA), or a host.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Query {
    Srv { domain: String, service: String },
    Host { host: String },
}

impl Query {
    /// The catalogue's name it resolves for: the domain or the host (what metrics and `status`
    /// group by).
    pub fn name(&self) -> &str {
        match self {
            Query::Srv { domain, .. } => domain,
            Query::Host { host } => host,
        }
    }
}

impl fmt::Display for Query {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Query::Srv { domain, service } => write!(f, "{service}.{domain} SRV"),
            Query::Host { host } => write!(f, "{host} A/AAAA"),
        }
    }
}

/// `[dns]`: which servers to ask and how long answers are believed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dns {
    /// Servers to ask; empty: the system's (`/etc/resolv.conf`).
    pub servers: Vec<SocketAddr>,
    /// A record's TTL is clamped to `min_ttl..=max_ttl` seconds before it schedules a refresh:
    /// a TTL of 0 must not make the daemon spin, a week-long one must not hide a move.
    pub min_ttl: u32,
    pub max_ttl: u32,
    /// Seconds without a successful lookup after which a name's last good addresses are
    /// reported stale (kept all the same).
    pub stale_after: u32,
    /// Seconds one lookup may take.
    pub timeout: u32,
}

impl Default for Dns {
    fn default() -> Self {
        Dns {
            servers: Vec::new(),
            min_ttl: 30,
            max_ttl: 3600,
            stale_after: 3600,
            timeout: 5,
        }
    }
}

/// Where a resolved address came from: the catalogue's name and the records that led to it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Origin {
    /// The domain or host the catalogue names.
    pub name: String,
    /// The lookups, e.g. `_sipfederationtls._tcp.partner.example SRV → sip.partner.example A`.
    pub via: String,
}

/// The addresses DNS gave each set, with where each came from.
pub type Resolved = BTreeMap<String, BTreeMap<IpAddr, Origin>>;

/// What of `resolved` a catalogue still asks for: the sets it still has, the names each still
/// follows. A reload keeps these (so a partner's addresses do not vanish until the next
/// lookup) and drops the rest.
pub fn kept(resolved: &Resolved, names: &BTreeMap<String, Names>) -> Resolved {
    resolved
        .iter()
        .filter_map(|(set, addrs)| {
            let follows = names.get(set)?;
            let addrs: BTreeMap<IpAddr, Origin> = addrs
                .iter()
                .filter(|(_, o)| follows.follows(&o.name))
                .map(|(a, o)| (*a, o.clone()))
                .collect();
            (!addrs.is_empty()).then(|| (set.clone(), addrs))
        })
        .collect()
}

/// A set's value: a list of prefixes, or a table naming prefixes and what to resolve.
#[derive(Debug)]
pub(super) enum RawSet {
    List(Vec<Spanned<String>>),
    Table(RawSetTable),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSetTable {
    #[serde(default)]
    prefixes: Vec<Spanned<String>>,
    #[serde(default)]
    domains: Vec<Spanned<String>>,
    #[serde(default)]
    srv: Vec<Spanned<String>>,
    #[serde(default)]
    hosts: Vec<Spanned<String>>,
}

// Not `#[serde(untagged)]`: that buffers the value and loses the spans every error needs.
impl<'de> Deserialize<'de> for RawSet {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = RawSet;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "a list of prefixes, or a table of `prefixes`, `domains`, `srv`, `hosts`",
                )
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<RawSet, A::Error> {
                let mut v = Vec::new();
                while let Some(p) = seq.next_element()? {
                    v.push(p);
                }
                Ok(RawSet::List(v))
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<RawSet, A::Error> {
                RawSetTable::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(RawSet::Table)
            }
        }
        d.deserialize_any(V)
    }
}

/// A set's prefixes (each with its span) and what it follows in DNS, once validated.
pub(super) struct SetSource {
    pub prefixes: Vec<Spanned<String>>,
    pub names: Option<Names>,
}

/// Validates a set's names; the prefixes are left to the caller, which checks them as it
/// always has.
pub(super) fn set_source(src: &mut Located, set: &str, raw: RawSet) -> SetSource {
    let t = match raw {
        RawSet::List(prefixes) => {
            return SetSource {
                prefixes,
                names: None,
            };
        }
        RawSet::Table(t) => t,
    };
    let mut names = Names::default();
    for d in &t.domains {
        if let Some(n) = src.check(d.span(), host_name(d.get_ref(), "domain")) {
            names.domains.push(n);
        }
    }
    for h in &t.hosts {
        if let Some(n) = src.check(h.span(), host_name(h.get_ref(), "host")) {
            names.hosts.push(n);
        }
    }
    for s in &t.srv {
        if let Some(n) = src.check(s.span(), srv_service(s.get_ref())) {
            names.srv.push(n);
        }
    }
    if let (Some(first), true) = (t.domains.first(), t.srv.is_empty()) {
        src.error(
            first.span(),
            format!(
                "set `{set}` lists domains but no `srv` services to follow: add e.g. srv = [\"_sipfederationtls._tcp\", \"_xmpp-server._tcp\"], or list plain names under `hosts`"
            ),
        );
    }
    if let (Some(first), true) = (t.srv.first(), t.domains.is_empty()) {
        src.error(
            first.span(),
            format!("set `{set}` lists `srv` services but no `domains` to ask them of"),
        );
    }
    let follows = !t.domains.is_empty() || !t.hosts.is_empty();
    SetSource {
        prefixes: t.prefixes,
        names: follows.then_some(names),
    }
}

/// A DNS name as the catalogue may write it: letters, digits, `-` in dot-separated labels of at
/// most 63 characters, 253 in all; lowercased, without a trailing dot.
fn host_name(text: &str, what: &str) -> Result<String, String> {
    let name = text.trim().trim_end_matches('.').to_ascii_lowercase();
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    };
    if name.len() > 253 || !name.contains('.') || !name.split('.').all(label_ok) {
        return Err(format!(
            "invalid {what} `{text}`: expected a fully qualified DNS name such as partner.example"
        ));
    }
    if name.parse::<IpAddr>().is_ok() || name.parse::<IpNet>().is_ok() {
        return Err(format!(
            "{what} `{text}` is an address: list it under `prefixes`"
        ));
    }
    Ok(name)
}

/// `_service._tcp` or `_service._udp` (RFC 2782).
fn srv_service(text: &str) -> Result<String, String> {
    let s = text.trim().trim_end_matches('.').to_ascii_lowercase();
    let ok = match s.split_once('.') {
        Some((service, proto)) => {
            service.len() > 1
                && service.starts_with('_')
                && service[1..]
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-')
                && matches!(proto, "_tcp" | "_udp")
        }
        None => false,
    };
    if ok {
        Ok(s)
    } else {
        Err(format!(
            "invalid SRV service `{text}`: expected `_service._tcp` or `_service._udp`, e.g. \"_sipfederationtls._tcp\" or \"_xmpp-server._tcp\""
        ))
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDns {
    #[serde(default)]
    servers: Vec<Spanned<String>>,
    #[serde(default)]
    min_ttl: Option<Spanned<RawDuration>>,
    #[serde(default)]
    max_ttl: Option<Spanned<RawDuration>>,
    #[serde(default)]
    stale_after: Option<Spanned<RawDuration>>,
    #[serde(default)]
    timeout: Option<Spanned<RawDuration>>,
}

/// The longest any `[dns]` duration may be: a day. Beyond it a moved partner stays broken.
const MAX_DNS_SECONDS: u32 = 86_400;

pub(super) fn parse_dns(src: &mut Located, raw: RawDns) -> Dns {
    let d = Dns::default();
    let mut servers = Vec::new();
    for s in &raw.servers {
        if let Some(a) = src.check(s.span(), server(s.get_ref())) {
            servers.push(a);
        }
    }
    let mut seconds = |v: &Option<Spanned<RawDuration>>, default: u32, what: &str, min: u32| match v
    {
        None => default,
        Some(v) => src
            .check(
                v.span(),
                seconds_in(v.get_ref(), &format!("dns.{what}"), min, MAX_DNS_SECONDS),
            )
            .unwrap_or(default),
    };
    let min_ttl = seconds(&raw.min_ttl, d.min_ttl, "min_ttl", 0);
    let max_ttl = seconds(&raw.max_ttl, d.max_ttl, "max_ttl", 1);
    let stale_after = seconds(&raw.stale_after, d.stale_after, "stale_after", 1);
    let timeout = seconds(&raw.timeout, d.timeout, "timeout", 1);
    if let Some(v) = &raw.max_ttl
        && max_ttl < min_ttl
    {
        src.error(
            v.span(),
            format!("dns.max_ttl ({max_ttl} s) is below dns.min_ttl ({min_ttl} s)"),
        );
    }
    Dns {
        servers,
        min_ttl,
        max_ttl,
        stale_after,
        timeout,
    }
}

fn server(text: &str) -> Result<SocketAddr, String> {
    let t = text.trim();
    t.parse::<SocketAddr>()
        .or_else(|_| t.parse::<IpAddr>().map(|a| SocketAddr::new(a, 53)))
        .map_err(|_| {
            format!(
                "invalid DNS server `{text}`: expected an address, with a port if not 53 (192.0.2.53, \"192.0.2.53:5353\", \"[2001:db8::53]:53\")"
            )
        })
}

/// The sets with the resolved addresses added (each as its /32 or /128).
pub(super) fn merge(sets: &mut BTreeMap<String, Vec<IpNet>>, resolved: &Resolved) {
    for (set, addrs) in resolved {
        if let Some(nets) = sets.get_mut(set) {
            let have: BTreeSet<IpNet> = nets.iter().copied().collect();
            nets.extend(
                addrs
                    .keys()
                    .map(|a| IpNet::from(*a))
                    .filter(|n| !have.contains(n)),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::catalogue::{Catalogue, CatalogueError};

    const HEAD: &str = "[interfaces]\nexternal = \"x\"\n";

    fn errors(text: &str) -> Vec<String> {
        match Catalogue::parse("t.toml", text) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(CatalogueError::Invalid { errors }) => errors
                .iter()
                .map(|p| format!("{}:{}: {}", p.location.line, p.location.column, p.message))
                .collect(),
            Err(e) => panic!("unexpected error {e}"),
        }
    }

    #[test]
    fn a_set_lists_prefixes_domains_srv_and_hosts() {
        let text = format!(
            "{HEAD}[sets.partners]\nprefixes = [\"192.0.2.0/24\"]\ndomains = [\"Partner.Example.\"]\nsrv = [\"_sipfederationtls._tcp\", \"_xmpp-server._tcp\"]\nhosts = [\"sip.other.example\"]\n[sets.only_dns]\nhosts = [\"a.example\"]\n[dns]\nservers = [\"198.51.100.1\", \"[2001:db8::53]:5353\"]\nmin_ttl = 1\nmax_ttl = \"10m\"\nstale_after = \"5m\"\n"
        );
        let cat = Catalogue::parse("t.toml", &text).unwrap();
        assert_eq!(cat.sets["partners"], vec!["192.0.2.0/24".parse().unwrap()]);
        assert!(cat.sets["only_dns"].is_empty());
        let n = &cat.names["partners"];
        assert_eq!(n.domains, ["partner.example"]);
        assert_eq!(n.srv, ["_sipfederationtls._tcp", "_xmpp-server._tcp"]);
        assert_eq!(n.hosts, ["sip.other.example"]);
        assert_eq!(n.queries().len(), 3);
        assert_eq!(
            cat.dns.servers,
            vec![
                "198.51.100.1:53".parse().unwrap(),
                "[2001:db8::53]:5353".parse().unwrap()
            ]
        );
        assert_eq!(
            (cat.dns.min_ttl, cat.dns.max_ttl, cat.dns.stale_after),
            (1, 600, 300)
        );
    }

    #[test]
    fn resolved_addresses_join_their_set_while_it_follows_the_name() {
        let text = format!(
            "{HEAD}[sets.p]\ndomains = [\"partner.example\"]\nsrv = [\"_xmpp-server._tcp\"]\n"
        );
        let cat = Catalogue::parse("t.toml", &text).unwrap();
        let origin = |name: &str| super::Origin {
            name: name.to_string(),
            via: "x".to_string(),
        };
        let mut resolved = super::Resolved::new();
        let p = resolved.entry("p".to_string()).or_default();
        p.insert("203.0.113.5".parse().unwrap(), origin("partner.example"));
        // A name the set no longer follows, and a set that is gone: left out.
        p.insert("203.0.113.6".parse().unwrap(), origin("old.example"));
        resolved
            .entry("gone".to_string())
            .or_default()
            .insert("203.0.113.7".parse().unwrap(), origin("partner.example"));
        let merged = cat.with_resolved(&resolved);
        assert_eq!(merged.sets["p"], vec!["203.0.113.5/32".parse().unwrap()]);
        assert!(!merged.sets.contains_key("gone"));
    }

    #[test]
    fn dns_errors_name_line_and_column() {
        let text = format!(
            "{HEAD}[sets.p]\ndomains = [\"partner.example\", \"bad_name.example\"]\nsrv = [\"sipfederationtls._tcp\"]\nhosts = [\"192.0.2.1\"]\n[sets.q]\nsrv = [\"_xmpp-server._tcp\"]\n[sets.r]\ndomains = [\"r.example\"]\n"
        );
        let all = errors(&text);
        assert_eq!(
            all,
            [
                "4:31: invalid domain `bad_name.example`: expected a fully qualified DNS name such as partner.example",
                "5:8: invalid SRV service `sipfederationtls._tcp`: expected `_service._tcp` or `_service._udp`, e.g. \"_sipfederationtls._tcp\" or \"_xmpp-server._tcp\"",
                "6:10: host `192.0.2.1` is an address: list it under `prefixes`",
                "7:7: set `q` is empty: a rule naming it could never match; list its prefixes",
                "8:8: set `q` lists `srv` services but no `domains` to ask them of",
                "10:12: set `r` lists domains but no `srv` services to follow: add e.g. srv = [\"_sipfederationtls._tcp\", \"_xmpp-server._tcp\"], or list plain names under `hosts`",
            ],
            "{all:#?}"
        );
        let typo = errors(&format!("{HEAD}[sets.s]\nprefix = [\"192.0.2.0/24\"]\n"));
        assert_eq!(typo.len(), 1);
        assert!(
            typo[0].starts_with("4:1: unknown field `prefix`: did you mean `prefixes`?"),
            "{typo:?}"
        );
        let dns = errors(&format!(
            "{HEAD}[sets.s]\nhosts = [\"a.example\"]\n[dns]\nservers = [\"dns.example\"]\nmin_ttl = 60\nmax_ttl = 30\nstale_after = \"soon\"\n"
        ));
        assert_eq!(dns.len(), 3, "{dns:#?}");
        assert!(
            dns[0].starts_with("6:12: invalid DNS server `dns.example`"),
            "{dns:?}"
        );
        assert_eq!(
            dns[1],
            "8:11: dns.max_ttl (30 s) is below dns.min_ttl (60 s)"
        );
        assert!(
            dns[2].starts_with("9:15: invalid duration `soon` for dns.stale_after"),
            "{dns:?}"
        );
    }
}
