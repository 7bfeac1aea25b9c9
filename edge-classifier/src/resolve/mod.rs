//! Resolving the catalogue's DNS names (catalogue → resolve → compile): each set's domains
//! through their SRV services to the targets' A/AAAA records, and its plain hosts, each lookup
//! refreshed when its records' TTL runs out (clamped to `[dns] min_ttl..=max_ttl`).
//!
//! A lookup that fails keeps the addresses it last gave: DNS being down must never empty a
//! partner's set, which would cut federation both ways. Addresses not confirmed for
//! `[dns] stale_after` are reported stale (logs, `edge_classifier_dns_stale`), and still kept.
//! An NXDOMAIN or an empty answer is treated the same way: a partner whose zone is broken for a
//! moment keeps federating; one that really left is removed from the catalogue by the operator.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use hickory_resolver::{
    TokioResolver,
    config::{NameServerConfig, ResolverConfig},
    net::{DnsError, NetError, runtime::TokioRuntimeProvider},
    proto::{op::ResponseCode, rr::RData, rr::RecordType},
};

use crate::{
    catalogue::{
        Catalogue,
        dns::{Dns, Origin, Query, Resolved},
    },
    snapshot::{NameStatus, unix_now},
};

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("setting up the DNS resolver: {0}")]
    Setup(#[from] NetError),
}

/// Why one lookup failed, as the metrics label it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// `nxdomain`, `nodata`, `servfail`, `refused`, `timeout` or `error`.
    pub kind: &'static str,
    pub message: String,
}

fn failure(e: &NetError) -> Failure {
    let kind = match e {
        NetError::Dns(DnsError::NoRecordsFound(nr))
            if nr.response_code == ResponseCode::NXDomain =>
        {
            "nxdomain"
        }
        NetError::Dns(DnsError::NoRecordsFound(_)) => "nodata",
        NetError::Dns(DnsError::ResponseCode(ResponseCode::ServFail)) => "servfail",
        NetError::Dns(DnsError::ResponseCode(ResponseCode::Refused)) => "refused",
        NetError::Timeout => "timeout",
        _ => "error",
    };
    Failure {
        kind,
        message: e.to_string(),
    }
}

/// One lookup of one set, and what it last gave.
struct Entry {
    /// Names the lookup in flight for it: a reload may reorder or drop entries meanwhile.
    id: u64,
    set: String,
    query: Query,
    addrs: BTreeMap<IpAddr, Origin>,
    /// When the next lookup is due; `None` while one is in flight.
    due: Option<Instant>,
    last_success: Option<f64>,
    /// When the failing streak began (or the daemon started, for addresses inherited from the
    /// running catalogue): staleness counts from the last success, or from here.
    since: Instant,
    failures: BTreeMap<String, u64>,
    error: Option<String>,
    stale_logged: bool,
}

/// Every lookup the running catalogue needs, and the resolver that makes them. Each lookup runs
/// on its own: a server that times out for one name delays no other.
pub struct Tracker {
    resolver: TokioResolver,
    dns: Dns,
    entries: Vec<Entry>,
    next_id: u64,
    inflight: tokio::task::JoinSet<(u64, Result<Answer, Failure>)>,
}

/// A resolver for `dns`: its servers, or the system's; no cache of its own (each refresh must
/// ask the server, or a changed record would be seen a TTL late), the lookup timeout.
fn resolver(dns: &Dns) -> Result<TokioResolver, ResolveError> {
    let mut builder = if dns.servers.is_empty() {
        TokioResolver::builder_tokio()?
    } else {
        let servers = dns
            .servers
            .iter()
            .map(|s| {
                let mut ns = NameServerConfig::udp_and_tcp(s.ip());
                for c in &mut ns.connections {
                    c.port = s.port();
                }
                ns
            })
            .collect();
        TokioResolver::builder_with_config(
            ResolverConfig::from_name_servers(servers),
            TokioRuntimeProvider::default(),
        )
    };
    let o = builder.options_mut();
    o.cache_size = 0;
    o.timeout = Duration::from_secs(dns.timeout.into());
    o.attempts = 2;
    Ok(builder.build()?)
}

/// How long a successful answer is believed: its smallest TTL, clamped (never under a second).
fn clamp(dns: &Dns, ttl: u32) -> Duration {
    Duration::from_secs(
        ttl.clamp(dns.min_ttl, dns.max_ttl.max(dns.min_ttl))
            .max(1)
            .into(),
    )
}

/// What one lookup gave: its addresses with their origins, and the smallest TTL on the way.
type Answer = (BTreeMap<IpAddr, Origin>, u32);

/// Fully qualified, so no search domain is tried.
fn fqdn(name: &str) -> String {
    format!("{}.", name.trim_end_matches('.'))
}

async fn lookup_host(
    r: &TokioResolver,
    name: &str,
    host: &str,
    via: &str,
) -> Result<Answer, Failure> {
    let l = r.lookup_ip(fqdn(host)).await.map_err(|e| failure(&e))?;
    let ttl = l
        .as_lookup()
        .answers()
        .iter()
        .map(|r| r.ttl)
        .min()
        .unwrap_or(0);
    let addrs = l
        .as_lookup()
        .answers()
        .iter()
        .filter_map(|rec| {
            let a = rec.data.ip_addr()?;
            let kind = if a.is_ipv4() { "A" } else { "AAAA" };
            Some((
                a,
                Origin {
                    name: name.to_string(),
                    via: format!("{via}{host} {kind}"),
                },
            ))
        })
        .collect();
    Ok((addrs, ttl))
}

/// One query: an SRV service of a domain (every target resolved; one that fails fails the
/// query, whose last good addresses then stay whole), or a host.
async fn lookup(r: TokioResolver, q: Query) -> Result<Answer, Failure> {
    match &q {
        Query::Host { host } => lookup_host(&r, host, host, "").await,
        Query::Srv { domain, service } => {
            let name = format!("{service}.{domain}");
            let l = r
                .lookup(fqdn(&name), RecordType::SRV)
                .await
                .map_err(|e| failure(&e))?;
            let mut ttl = u32::MAX;
            let mut targets = BTreeSet::new();
            for rec in l.answers() {
                if let RData::SRV(srv) = &rec.data {
                    ttl = ttl.min(rec.ttl);
                    let t = srv.target.to_ascii().trim_end_matches('.').to_string();
                    // "." says the service is not offered there (RFC 2782).
                    if !t.is_empty() {
                        targets.insert(t);
                    }
                }
            }
            if targets.is_empty() {
                return Err(Failure {
                    kind: "nodata",
                    message: format!("{name} SRV names no target"),
                });
            }
            let mut set = tokio::task::JoinSet::new();
            for t in targets {
                let (r, domain, via) = (r.clone(), domain.clone(), format!("{name} SRV → "));
                set.spawn(async move { lookup_host(&r, &domain, &t, &via).await });
            }
            let mut addrs = BTreeMap::new();
            let mut failed = None;
            while let Some(done) = set.join_next().await {
                match done {
                    Ok(Ok((a, t))) => {
                        ttl = ttl.min(t);
                        addrs.extend(a);
                    }
                    Ok(Err(f)) => failed = Some(f),
                    Err(e) => {
                        failed = Some(Failure {
                            kind: "error",
                            message: e.to_string(),
                        })
                    }
                }
            }
            match failed {
                Some(f) => Err(f),
                None => Ok((addrs, ttl)),
            }
        }
    }
}

impl Tracker {
    /// The lookups `cat` needs, each due now; `running` (the addresses in force) is each
    /// lookup's last good answer until it gets a new one.
    pub fn new(cat: &Catalogue, running: &Resolved) -> Result<Tracker, ResolveError> {
        let mut t = Tracker {
            resolver: resolver(&cat.dns)?,
            dns: cat.dns.clone(),
            entries: Vec::new(),
            next_id: 0,
            inflight: tokio::task::JoinSet::new(),
        };
        t.retarget(cat, running)?;
        Ok(t)
    }

    /// Follows a reloaded catalogue: lookups it still needs keep their state, new ones are due
    /// now, and the resolver is rebuilt if `[dns]` changed.
    pub fn retarget(&mut self, cat: &Catalogue, running: &Resolved) -> Result<(), ResolveError> {
        if cat.dns != self.dns {
            self.resolver = resolver(&cat.dns)?;
            self.dns = cat.dns.clone();
        }
        let now = Instant::now();
        let mut old: Vec<Entry> = std::mem::take(&mut self.entries);
        for (set, names) in &cat.names {
            for query in names.queries() {
                if let Some(i) = old.iter().position(|e| e.set == *set && e.query == query) {
                    self.entries.push(old.swap_remove(i));
                    continue;
                }
                let shown = query.to_string();
                let addrs = running
                    .get(set)
                    .map(|m| {
                        m.iter()
                            .filter(|(_, o)| o.name == query.name() && inherited(&query, o, &shown))
                            .map(|(a, o)| (*a, o.clone()))
                            .collect()
                    })
                    .unwrap_or_default();
                self.next_id += 1;
                self.entries.push(Entry {
                    id: self.next_id,
                    set: set.clone(),
                    query,
                    addrs,
                    due: Some(now),
                    last_success: None,
                    since: now,
                    failures: BTreeMap::new(),
                    error: None,
                    stale_logged: false,
                });
            }
        }
        Ok(())
    }

    /// When the next lookup is due (none while every lookup is in flight).
    pub fn next_due(&self) -> Option<Instant> {
        self.entries.iter().filter_map(|e| e.due).min()
    }

    /// Starts every lookup that is due and not in flight.
    pub fn start_due(&mut self) {
        let now = Instant::now();
        for e in &mut self.entries {
            if e.due.is_some_and(|d| d <= now) {
                e.due = None;
                let (r, q, id) = (self.resolver.clone(), e.query.clone(), e.id);
                self.inflight.spawn(async move { (id, lookup(r, q).await) });
            }
        }
    }

    /// Waits for the next lookup to finish (forever when none is in flight), records what it
    /// gave, logs what changed and what failed. Returns whether the addresses in force should
    /// change.
    pub async fn next_result(&mut self) -> bool {
        let Some(done) = self.inflight.join_next().await else {
            return std::future::pending().await;
        };
        let (id, result) = match done {
            Ok(r) => r,
            Err(e) => {
                // A lookup task that panicked: its entry would never be due again.
                log::warn!("a DNS lookup did not finish: {e}");
                let now = Instant::now();
                for e in self.entries.iter_mut().filter(|e| e.due.is_none()) {
                    e.due = Some(now);
                }
                return false;
            }
        };
        // An entry a reload removed meanwhile: its answer is no longer wanted.
        let Some(e) = self.entries.iter_mut().find(|e| e.id == id) else {
            return false;
        };
        let at = Instant::now();
        let mut changed = false;
        match result {
            Ok((addrs, ttl)) => {
                if addrs != e.addrs {
                    let (added, gone) = diff(&e.addrs, &addrs);
                    log::info!(
                        "set {}: {} now gives {} addresses (added: {}; removed: {})",
                        e.set,
                        e.query,
                        addrs.len(),
                        list(&added),
                        list(&gone)
                    );
                    e.addrs = addrs;
                    changed = true;
                }
                if e.error.is_some() || e.stale_logged {
                    log::info!("set {}: {} resolves again", e.set, e.query);
                }
                e.error = None;
                e.stale_logged = false;
                e.last_success = Some(unix_now());
                e.since = at;
                e.due = Some(at + clamp(&self.dns, ttl));
            }
            Err(f) => {
                *e.failures.entry(f.kind.to_string()).or_default() += 1;
                if e.error.is_none() {
                    log::warn!(
                        "set {}: {} failed ({}: {}); keeping its last {} addresses",
                        e.set,
                        e.query,
                        f.kind,
                        f.message,
                        e.addrs.len()
                    );
                }
                e.error = Some(format!("{}: {}", f.kind, f.message));
                // Retried at the shortest interval allowed: a partner back up is followed soon.
                e.due = Some(at + clamp(&self.dns, 0));
            }
        }
        changed
    }

    /// Logs, once per failing streak, each lookup whose addresses have gone stale.
    pub fn log_stale(&mut self) {
        let stale_after = Duration::from_secs(self.dns.stale_after.into());
        for e in &mut self.entries {
            if !e.addrs.is_empty() && e.since.elapsed() >= stale_after && !e.stale_logged {
                e.stale_logged = true;
                log::warn!(
                    "set {}: the {} addresses of {} are stale: not confirmed for {} s ({}); they stay in force",
                    e.set,
                    e.addrs.len(),
                    e.query,
                    e.since.elapsed().as_secs(),
                    e.error.as_deref().unwrap_or("no answer yet")
                );
            }
        }
    }

    /// The addresses in force: each lookup's last good answer.
    pub fn resolved(&self) -> Resolved {
        let mut out = Resolved::new();
        for e in &self.entries {
            let m = out.entry(e.set.clone()).or_default();
            for (a, o) in &e.addrs {
                m.entry(*a).or_insert_with(|| o.clone());
            }
        }
        out.retain(|_, m| !m.is_empty());
        out
    }

    /// Per set and name: addresses, last success, failures, staleness.
    pub fn status(&self) -> Vec<NameStatus> {
        let stale_after = Duration::from_secs(self.dns.stale_after.into());
        let mut out: BTreeMap<(String, String), NameStatus> = BTreeMap::new();
        let mut addrs: BTreeMap<(String, String), BTreeSet<IpAddr>> = BTreeMap::new();
        for e in &self.entries {
            let key = (e.set.clone(), e.query.name().to_string());
            let s = out.entry(key.clone()).or_insert_with(|| NameStatus {
                set: e.set.clone(),
                name: e.query.name().to_string(),
                addresses: 0,
                last_success: e.last_success,
                failures: BTreeMap::new(),
                error: None,
                stale: false,
            });
            addrs.entry(key).or_default().extend(e.addrs.keys());
            s.last_success = match (s.last_success, e.last_success) {
                (Some(a), Some(b)) => Some(a.min(b)),
                _ => None,
            };
            for (k, n) in &e.failures {
                *s.failures.entry(k.clone()).or_default() += n;
            }
            if let Some(err) = &e.error {
                s.error = Some(format!("{}: {err}", e.query));
            }
            s.stale |= !e.addrs.is_empty() && e.since.elapsed() >= stale_after;
        }
        for (key, s) in &mut out {
            s.addresses = addrs.get(key).map_or(0, BTreeSet::len);
        }
        out.into_values().collect()
    }
}

/// Whether an address `running` holds came from `query` (its origin names the same lookup):
/// only those are a restarted lookup's last good answer.
fn inherited(query: &Query, o: &Origin, shown: &str) -> bool {
    match query {
        Query::Host { .. } => !o.via.contains(" SRV → "),
        Query::Srv { .. } => o.via.starts_with(shown),
    }
}

fn diff(
    before: &BTreeMap<IpAddr, Origin>,
    after: &BTreeMap<IpAddr, Origin>,
) -> (Vec<IpAddr>, Vec<IpAddr>) {
    (
        after
            .keys()
            .filter(|a| !before.contains_key(a))
            .copied()
            .collect(),
        before
            .keys()
            .filter(|a| !after.contains_key(a))
            .copied()
            .collect(),
    )
}

/// At most ten addresses, then how many more.
fn list(addrs: &[IpAddr]) -> String {
    if addrs.is_empty() {
        return "none".to_string();
    }
    let mut s: Vec<String> = addrs.iter().take(10).map(IpAddr::to_string).collect();
    if addrs.len() > 10 {
        s.push(format!("and {} more", addrs.len() - 10));
    }
    s.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_are_clamped_and_never_zero() {
        let dns = Dns {
            min_ttl: 0,
            max_ttl: 60,
            ..Dns::default()
        };
        assert_eq!(clamp(&dns, 0), Duration::from_secs(1));
        assert_eq!(clamp(&dns, 30), Duration::from_secs(30));
        assert_eq!(clamp(&dns, 86_400), Duration::from_secs(60));
        let dns = Dns { min_ttl: 30, ..dns };
        assert_eq!(clamp(&dns, 2), Duration::from_secs(30));
    }
}
