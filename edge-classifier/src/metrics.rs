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
use prometheus::{Encoder as _, GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::snapshot::Snapshot;

/// Where `run` serves metrics unless told otherwise: loopback only, a port of its own.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9477";

/// Takes a snapshot of the running classifier (blocking: it reads kernel maps).
pub type SnapshotFn = Arc<dyn Fn() -> anyhow::Result<Snapshot> + Send + Sync>;

fn counter(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> prometheus::Result<GaugeVec> {
    let g = GaugeVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

fn int_gauge(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntGaugeVec> {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The snapshot as Prometheus text exposition format.
pub fn render(s: &Snapshot) -> prometheus::Result<String> {
    let r = Registry::new();
    let rule_labels = [
        "rule",
        "seed_row",
        "direction",
        "transport",
        "ports",
        "interface",
    ];
    let rule_packets = counter(
        &r,
        "edge_classifier_rule_packets_total",
        "Frames a rule allowed (outbound rules: their flows both ways), by rule and interface.",
        &rule_labels,
    )?;
    let rule_bytes = counter(
        &r,
        "edge_classifier_rule_bytes_total",
        "Bytes of the frames a rule allowed, by rule and interface.",
        &rule_labels,
    )?;
    let dropped = counter(
        &r,
        "edge_classifier_dropped_packets_total",
        "Frames dropped, by reason and interface.",
        &["reason", "interface"],
    )?;
    let dropped_bytes = counter(
        &r,
        "edge_classifier_dropped_bytes_total",
        "Bytes of the frames dropped, by reason and interface.",
        &["reason", "interface"],
    )?;
    let passed = counter(
        &r,
        "edge_classifier_passed_packets_total",
        "Frames passed without a rule (ARP, ICMP, unprotected, egress, ...), by reason and interface.",
        &["reason", "interface"],
    )?;
    let passed_bytes = counter(
        &r,
        "edge_classifier_passed_bytes_total",
        "Bytes of the frames passed without a rule, by reason and interface.",
        &["reason", "interface"],
    )?;
    let attached = int_gauge(
        &r,
        "edge_classifier_interface_attached",
        "1 when the classifier is attached to the interface (XDP ingress and TC egress), else 0.",
        &["interface", "role", "xdp_mode"],
    )?;
    for i in &s.interfaces {
        for rule in &i.rules {
            let l = [
                rule.id.as_str(),
                &rule.seed_row,
                &rule.direction,
                &rule.transport,
                &rule.ports,
                &i.name,
            ];
            rule_packets.with_label_values(&l).inc_by(rule.packets);
            rule_bytes.with_label_values(&l).inc_by(rule.bytes);
        }
        for c in &i.reasons {
            let l = [c.reason.as_str(), &i.name];
            if c.drop {
                dropped.with_label_values(&l).inc_by(c.packets);
                dropped_bytes.with_label_values(&l).inc_by(c.bytes);
            } else {
                passed.with_label_values(&l).inc_by(c.packets);
                passed_bytes.with_label_values(&l).inc_by(c.bytes);
            }
        }
        attached
            .with_label_values(&[
                i.name.as_str(),
                &i.role,
                i.mode.as_deref().unwrap_or("none"),
            ])
            .set(i64::from(i.mode.is_some()));
    }

    let f = &s.flows;
    int_gauge(
        &r,
        "edge_classifier_flow_table_entries",
        "Outbound flows in the flow table now.",
        &[],
    )?
    .with_label_values::<&str>(&[])
    .set(f.present as i64);
    int_gauge(
        &r,
        "edge_classifier_flow_table_capacity",
        "Flows the flow table holds before it evicts the least recently used.",
        &[],
    )?
    .with_label_values::<&str>(&[])
    .set(i64::from(f.capacity));
    for (name, help, v) in [
        (
            "edge_classifier_flows_created_total",
            "Outbound flows recorded on egress.",
            f.created,
        ),
        (
            "edge_classifier_flows_expired_total",
            "Flows that idled out or closed and were removed or replaced.",
            f.expired,
        ),
        (
            "edge_classifier_flows_evicted_total",
            "Flows pushed out of a full table (least recently used first).",
            f.evicted,
        ),
        (
            "edge_classifier_flow_insert_failures_total",
            "Outbound flows the kernel could not record (replies to them drop as not_established).",
            f.insert_failed,
        ),
    ] {
        counter(&r, name, help, &[])?
            .with_label_values::<&str>(&[])
            .inc_by(v);
    }

    let reloads = counter(
        &r,
        "edge_classifier_reloads_total",
        "Catalogue reloads, by result (success: swapped in; failure: rejected, old rules kept).",
        &["result"],
    )?;
    reloads
        .with_label_values(&["success"])
        .inc_by(s.reloads.succeeded);
    reloads
        .with_label_values(&["failure"])
        .inc_by(s.reloads.failed);
    gauge(
        &r,
        "edge_classifier_last_reload_timestamp_seconds",
        "When the running rules were loaded (start or last successful reload), Unix time.",
        &[],
    )?
    .with_label_values::<&str>(&[])
    .set(s.reloads.last);
    int_gauge(
        &r,
        "edge_classifier_catalogue_info",
        "The running catalogue: its source and SHA-256 (value is always 1).",
        &["source", "hash"],
    )?
    .with_label_values(&[s.catalogue.source.as_str(), &s.catalogue.digest])
    .set(1);
    int_gauge(
        &r,
        "edge_classifier_catalogue_rules",
        "Rules in the running catalogue.",
        &[],
    )?
    .with_label_values::<&str>(&[])
    .set(s.catalogue.rules as i64);
    int_gauge(
        &r,
        "edge_classifier_build_info",
        "Version of edge-classifier, of aya, and the kernel release (value is always 1).",
        &["version", "aya_version", "kernel"],
    )?
    .with_label_values(&[s.version.as_str(), "0.14.0", &kernel_release()])
    .set(1);
    gauge(
        &r,
        "edge_classifier_scrape_read_seconds",
        "Time this scrape spent reading the kernel maps.",
        &[],
    )?
    .with_label_values::<&str>(&[])
    .set(s.read_seconds);

    let mut out = Vec::new();
    TextEncoder::new().encode(&r.gather(), &mut out)?;
    Ok(String::from_utf8(out).expect("the text encoder writes UTF-8"))
}

async fn take(f: SnapshotFn) -> Result<Snapshot, Response> {
    match tokio::task::spawn_blocking(move || f()).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err((StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}\n")).into_response()),
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
    "edge-classifier: /metrics (Prometheus), /snapshot (JSON for `edge-classifier stats`)\n"
}

/// Serves `/metrics` and `/snapshot` on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, f: SnapshotFn) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/snapshot", get(snapshot))
        .route("/", get(index))
        .with_state(f);
    axum::serve(listener, app).await
}

/// A snapshot from a running classifier's `/snapshot` endpoint.
pub fn fetch(addr: &str) -> anyhow::Result<Snapshot> {
    use anyhow::Context as _;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    let url = format!("http://{addr}/snapshot");
    let body = agent
        .get(&url)
        .call()
        .with_context(|| {
            format!("no classifier answers at {url}: is `edge-classifier run` running with --metrics {addr}?")
        })?
        .body_mut()
        .read_to_string()
        .with_context(|| format!("reading {url}"))?;
    serde_json::from_str(&body).with_context(|| format!("{url} did not return a snapshot"))
}
