//! The Prometheus exporter: `/metrics` in the text format (prometheus crate registry and
//! encoder, served by axum), and `/snapshot`, the same numbers as JSON for `edge-classifier
//! stats`. Counters are read from the per-CPU maps at scrape time.

use std::{sync::Arc, time::Duration};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header::CONTENT_TYPE},
    response::{IntoResponse, Response},
    routing::get,
};
use prometheus::{
    Encoder as _, TextEncoder,
    proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType},
};

use crate::snapshot::Snapshot;

/// Where `run` serves metrics unless told otherwise: loopback only, a port of its own.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9477";

/// Takes a snapshot of the running classifier (blocking: it reads kernel maps).
/// Reads one snapshot for a scrape; the error is the whole chain, as text for the HTTP 500 body.
pub type SnapshotFn = Arc<dyn Fn() -> Result<Snapshot, String> + Send + Sync>;

/// One metric family being filled. Families are built directly (no registry): a scrape is a
/// fresh read of the maps, and with 10,000 rules the registry's per-series label hashing cost
/// more than reading the kernel.
struct Family(MetricFamily);

impl Family {
    fn new(name: &str, help: &str, kind: MetricType) -> Family {
        let mut mf = MetricFamily::default();
        mf.set_name(name.to_string());
        mf.set_help(help.to_string());
        mf.set_field_type(kind);
        Family(mf)
    }
    fn counter(name: &str, help: &str) -> Family {
        Family::new(name, help, MetricType::COUNTER)
    }
    fn gauge(name: &str, help: &str) -> Family {
        Family::new(name, help, MetricType::GAUGE)
    }
    fn push(&mut self, labels: &[(&str, &str)], value: f64) -> &mut Self {
        let labels = labels
            .iter()
            .map(|(n, v)| {
                let mut l = LabelPair::default();
                l.set_name(n.to_string());
                l.set_value(v.to_string());
                l
            })
            .collect();
        let mut m = Metric::from_label(labels);
        if self.0.get_field_type() == MetricType::COUNTER {
            let mut c = Counter::default();
            c.set_value(value);
            m.set_counter(c);
        } else {
            let mut g = Gauge::default();
            g.set_value(value);
            m.set_gauge(g);
        }
        self.0.mut_metric().push(m);
        self
    }
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The snapshot as Prometheus text exposition format.
pub fn render(s: &Snapshot) -> prometheus::Result<String> {
    let mut families = interface_families(s);
    families.extend(flow_families(&s.flows));
    families.extend(limit_families(&s.limits));
    families.extend(instance_families(s));
    families.extend(dns_families(&s.dns));
    families.extend(monitor_families(&s.monitors));
    let families: Vec<MetricFamily> = families.into_iter().map(|f| f.0).collect();
    let mut out = Vec::new();
    TextEncoder::new().encode(&families, &mut out)?;
    Ok(String::from_utf8(out).expect("the text encoder writes UTF-8"))
}

/// A family holding one series without labels.
fn one(mut fam: Family, v: f64) -> Family {
    fam.push(&[], v);
    fam
}

/// Per interface: the rule counters, the reason counters and whether it is attached.
fn interface_families(s: &Snapshot) -> Vec<Family> {
    let mut rule_packets = Family::counter(
        "edge_classifier_rule_packets_total",
        "Frames a rule allowed (outbound rules: their flows both ways), by rule and interface.",
    );
    let mut rule_bytes = Family::counter(
        "edge_classifier_rule_bytes_total",
        "Bytes of the frames a rule allowed, by rule and interface.",
    );
    let mut dropped = Family::counter(
        "edge_classifier_dropped_packets_total",
        "Frames dropped, by reason and interface.",
    );
    let mut dropped_bytes = Family::counter(
        "edge_classifier_dropped_bytes_total",
        "Bytes of the frames dropped, by reason and interface.",
    );
    let mut passed = Family::counter(
        "edge_classifier_passed_packets_total",
        "Frames passed without a rule (ARP, ICMP, unprotected, egress, ...; syn_cookie: SYNs answered from XDP, sent back rather than passed to the stack), by reason and interface.",
    );
    let mut passed_bytes = Family::counter(
        "edge_classifier_passed_bytes_total",
        "Bytes of the frames passed without a rule, by reason and interface.",
    );
    let mut attached = Family::gauge(
        "edge_classifier_interface_attached",
        "1 when the classifier is attached to the interface (XDP ingress and TC egress), else 0: also when a bound NIC went away (xdp_mode=\"none\"), until a NIC of that name appears and is attached again.",
    );
    let mut protected = Family::gauge(
        "edge_classifier_protected_addresses_configured",
        "Addresses configured on the interface that the catalogue's protected sets hold; 0 means its rules protect nothing there.",
    );
    for i in &s.interfaces {
        protected.push(
            &[("interface", i.name.as_str())],
            i.protected_addresses as f64,
        );
        for rule in &i.rules {
            let l = [
                ("rule", rule.id.as_str()),
                ("seed_row", &rule.seed_row),
                ("direction", &rule.direction),
                ("transport", &rule.transport),
                ("ports", &rule.ports),
                ("interface", &i.name),
            ];
            rule_packets.push(&l, rule.packets as f64);
            rule_bytes.push(&l, rule.bytes as f64);
        }
        for c in &i.reasons {
            let l = [("reason", c.reason.as_str()), ("interface", &i.name)];
            let (p, b) = if c.drop {
                (&mut dropped, &mut dropped_bytes)
            } else {
                (&mut passed, &mut passed_bytes)
            };
            p.push(&l, c.packets as f64);
            b.push(&l, c.bytes as f64);
        }
        attached.push(
            &[
                ("interface", i.name.as_str()),
                ("role", &i.role),
                ("xdp_mode", i.mode.as_deref().unwrap_or("none")),
            ],
            if i.mode.is_some() { 1.0 } else { 0.0 },
        );
    }

    vec![
        rule_packets,
        rule_bytes,
        dropped,
        dropped_bytes,
        passed,
        passed_bytes,
        attached,
        protected,
    ]
}

/// The monitors attached and the events they missed.
fn monitor_families(m: &crate::snapshot::MonitorStats) -> Vec<Family> {
    let mut lost = Family::counter(
        "edge_classifier_monitor_events_lost_total",
        "Events for monitors (`edge-classifier monitor`, /events) the kernel did not deliver: over the monitor's rate limit, or its ring buffer full.",
    );
    lost.push(&[("reason", "rate_limit")], m.lost_rate_limit as f64)
        .push(&[("reason", "ring_full")], m.lost_ring_full as f64);
    vec![
        one(
            Family::gauge(
                "edge_classifier_monitors",
                "Monitor slots in use (of 4): each costs the data plane an event per frame it selects.",
            ),
            m.attached as f64,
        ),
        lost,
    ]
}

/// The flow tables: occupancy, capacity and their event counters.
fn flow_families(f: &crate::maps::FlowStats) -> Vec<Family> {
    let mut families = Vec::new();
    let mut entries = Family::gauge(
        "edge_classifier_flow_table_entries",
        "Outbound flows in the flow table of each address family now.",
    );
    let mut capacity = Family::gauge(
        "edge_classifier_flow_table_capacity",
        "Flows each family's table holds before it evicts the least recently used.",
    );
    for (family, present) in [("ipv4", f.present_v4), ("ipv6", f.present_v6)] {
        entries.push(&[("family", family)], present as f64);
        capacity.push(&[("family", family)], f64::from(f.capacity));
    }
    families.extend([
        entries,
        capacity,
        one(
            Family::counter(
                "edge_classifier_flows_created_total",
                "Flows recorded on egress (outbound rules, and tracked flows under policy.egress = \"track\").",
            ),
            f.created as f64,
        ),
        one(
            Family::counter(
                "edge_classifier_flows_expired_total",
                "Flows that idled out or closed and were removed or replaced.",
            ),
            f.expired as f64,
        ),
        one(
            Family::counter(
                "edge_classifier_flows_evicted_total",
                "Flows pushed out of a full table (least recently used first).",
            ),
            f.evicted as f64,
        ),
        one(
            Family::counter(
                "edge_classifier_flow_insert_failures_total",
                "Outbound flows the kernel could not record (replies to them drop as not_established).",
            ),
            f.insert_failed as f64,
        ),
    ]);
    families
}

/// The limits on new flows: per limited rule, the frames refused and the sources held back
/// now; the token-bucket table. Present only while a rule has a limit.
fn limit_families(l: &crate::snapshot::Limits) -> Vec<Family> {
    if l.rules.is_empty() {
        return Vec::new();
    }
    let mut limited = Family::counter(
        "edge_classifier_rate_limited_packets_total",
        "New flows (TCP SYN, UDP datagrams of a flow not yet admitted) over a rule's limit, dropped as rate_limited (passed in monitor mode), by rule.",
    );
    let mut sources = Family::gauge(
        "edge_classifier_rate_limited_sources",
        "Source prefixes whose token bucket for the rule is empty now: the sources being limited.",
    );
    let mut cookies = Family::counter(
        "edge_classifier_syn_cookies_sent_total",
        "SYNs over a syn_proxy rule's limit answered from XDP with a SYN-ACK carrying a SYN cookie, by rule (only rules with syn_proxy).",
    );
    for r in &l.rules {
        limited.push(&[("rule", r.id.as_str())], r.limited as f64);
        sources.push(&[("rule", r.id.as_str())], r.limited_sources as f64);
        if let Some(c) = r.syn_cookies {
            cookies.push(&[("rule", r.id.as_str())], c as f64);
        }
    }
    let cookies = if l.rules.iter().all(|r| r.syn_cookies.is_none()) {
        // A family without a metric does not render; no rule has the proxy.
        Vec::new()
    } else {
        vec![cookies]
    };
    let mut out = vec![
        limited,
        sources,
        one(
            Family::gauge(
                "edge_classifier_limit_buckets",
                "Token buckets held now (per source prefix and per rule's total).",
            ),
            l.buckets as f64,
        ),
        one(
            Family::gauge(
                "edge_classifier_limit_buckets_capacity",
                "Token buckets the table holds before it evicts the least recently used (a source evicted starts again with a full bucket).",
            ),
            f64::from(l.bucket_capacity),
        ),
        one(
            Family::counter(
                "edge_classifier_limit_buckets_evicted_total",
                "Token buckets pushed out of the full table (least recently used first).",
            ),
            l.buckets_evicted as f64,
        ),
        one(
            Family::gauge(
                "edge_classifier_limit_admitted_udp_flows",
                "UDP flows limited rules admitted and remember now (their later datagrams are not new flows).",
            ),
            l.admitted_udp_flows_present as f64,
        ),
        one(
            Family::counter(
                "edge_classifier_limit_exempt_total",
                "New flows from a limit's exempt sets, passed without a token.",
            ),
            l.exempt as f64,
        ),
    ];
    out.extend(cookies);
    out
}

/// Per set and DNS name: addresses in force, last success, failures by kind, staleness. Every
/// failure kind is present from the first scrape, so `increase()` sees the first failure.
fn dns_families(names: &[crate::snapshot::NameStatus]) -> Vec<Family> {
    const KINDS: &[&str] = &[
        "nxdomain", "nodata", "servfail", "refused", "timeout", "error",
    ];
    let mut addresses = Family::gauge(
        "edge_classifier_dns_addresses",
        "Addresses a set's DNS name puts in the set (the last good ones while lookups fail).",
    );
    let mut success = Family::gauge(
        "edge_classifier_dns_last_success_timestamp_seconds",
        "When every lookup of the name last succeeded (the oldest of them), Unix time; 0 before.",
    );
    let mut failures = Family::counter(
        "edge_classifier_dns_failures_total",
        "Failed lookups of the name since the daemon started, by kind.",
    );
    let mut stale = Family::gauge(
        "edge_classifier_dns_stale",
        "1 when the name's addresses have not been confirmed for [dns] stale_after (they are kept).",
    );
    for n in names {
        let labels = [("set", n.set.as_str()), ("domain", n.name.as_str())];
        addresses.push(&labels, n.addresses as f64);
        success.push(&labels, n.last_success.unwrap_or(0.0));
        stale.push(&labels, if n.stale { 1.0 } else { 0.0 });
        for kind in KINDS {
            failures.push(
                &[labels[0], labels[1], ("kind", kind)],
                n.failures.get(*kind).copied().unwrap_or(0) as f64,
            );
        }
    }
    // The text encoder refuses a family without series: a catalogue without DNS names has none.
    if names.is_empty() {
        return Vec::new();
    }
    vec![addresses, success, failures, stale]
}

/// The instance: reloads, the running catalogue, the build, and this scrape's read time.
fn instance_families(s: &Snapshot) -> Vec<Family> {
    let mut families = Vec::new();
    let mut reloads = Family::counter(
        "edge_classifier_reloads_total",
        "Catalogue reloads, by result (success: swapped in; failure: rejected, old rules kept).",
    );
    reloads
        .push(&[("result", "success")], s.reloads.succeeded as f64)
        .push(&[("result", "failure")], s.reloads.failed as f64);
    families.push(reloads);
    let mut info = Family::gauge(
        "edge_classifier_catalogue_info",
        "The running catalogue: its source and SHA-256 (value is always 1).",
    );
    info.push(
        &[
            ("source", s.catalogue.source.as_str()),
            ("hash", &s.catalogue.digest),
        ],
        1.0,
    );
    families.push(info);
    let mut build = Family::gauge(
        "edge_classifier_build_info",
        "Version of edge-classifier, of aya, and the kernel release (value is always 1).",
    );
    build.push(
        &[
            ("version", s.version.as_str()),
            ("aya_version", "0.14.0"),
            ("kernel", &kernel_release()),
        ],
        1.0,
    );
    families.push(build);
    families.extend([
        one(
            Family::gauge(
                "edge_classifier_last_reload_timestamp_seconds",
                "When the running rules were loaded (start or last successful reload), Unix time.",
            ),
            s.reloads.last,
        ),
        one(
            Family::gauge(
                "edge_classifier_catalogue_rules",
                "Rules in the running catalogue.",
            ),
            s.catalogue.rules as f64,
        ),
        one(
            Family::gauge(
                "edge_classifier_scrape_read_seconds",
                "Time this scrape spent reading the kernel maps.",
            ),
            s.read_seconds,
        ),
    ]);

    families
}

async fn take(f: SnapshotFn) -> Result<Snapshot, Response> {
    match tokio::task::spawn_blocking(move || f()).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err((StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response()),
        Err(e) => Err((StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response()),
    }
}

async fn metrics(State(f): State<SnapshotFn>) -> Response {
    let s = match take(f).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    match render(&s) {
        Ok(text) => (
            [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
            text,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

async fn snapshot(State(f): State<SnapshotFn>) -> Response {
    match take(f).await {
        Ok(s) => (
            [(CONTENT_TYPE, "application/json")],
            serde_json::to_string(&s).expect("a snapshot serialises"),
        )
            .into_response(),
        Err(r) => r,
    }
}

async fn index() -> &'static str {
    "edge-classifier: /metrics (Prometheus), /snapshot (JSON for `edge-classifier stats`), /events (live drop events as JSON lines, the selection of `edge-classifier monitor` as query parameters)\n"
}

/// Serves `/metrics`, `/snapshot` and, for `instance`, `/events` on `listener` until the task
/// is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    f: SnapshotFn,
    instance: Option<crate::instance::Instance>,
) -> std::io::Result<()> {
    let mut app = Router::new()
        .route("/metrics", get(metrics))
        .route("/snapshot", get(snapshot))
        .route("/", get(index))
        .with_state(f);
    if let Some(instance) = instance {
        app = app.merge(
            Router::new()
                .route("/events", get(crate::telemetry::events::stream))
                .with_state(instance),
        );
    }
    axum::serve(listener, app).await
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(
        "no classifier answers at {url}: is `edge-classifier run` running with --metrics {addr}?: {source}"
    )]
    Unreachable {
        url: String,
        addr: String,
        #[source]
        source: ureq::Error,
    },
    #[error("reading {url}: {source}")]
    Read {
        url: String,
        #[source]
        source: ureq::Error,
    },
    #[error("{url} did not return a snapshot: {source}")]
    NotSnapshot {
        url: String,
        #[source]
        source: serde_json::Error,
    },
}

/// A snapshot from a running classifier's `/snapshot` endpoint.
pub fn fetch(addr: &str) -> Result<Snapshot, FetchError> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    let url = format!("http://{addr}/snapshot");
    let body = agent
        .get(&url)
        .call()
        .map_err(|source| FetchError::Unreachable {
            url: url.clone(),
            addr: addr.to_string(),
            source,
        })?
        .body_mut()
        .read_to_string()
        .map_err(|source| FetchError::Read {
            url: url.clone(),
            source,
        })?;
    serde_json::from_str(&body).map_err(|source| FetchError::NotSnapshot { url, source })
}
