//! The operator's view, proven with real parts: the `edge-classifier run` binary on a namespace
//! lab, Debian's Prometheus server scraping it over loopback inside the edge namespace, known
//! traffic, and every query of the Grafana dashboard and the alert rules evaluated through
//! Prometheus' HTTP API. promtool checks the rules, their unit tests and the scrape config.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

mod common;

use common::*;
use edge_classifier_lab::*;
use serde_json::Value;

fn dashboards() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboards")
}

/// Whether Prometheus answers and has scraped the classifier successfully (no panics: it is
/// polled while Prometheus starts).
fn scraped_up(ns: &str) -> bool {
    in_netns(ns, || {
        let url = format!(
            "http://{PROMETHEUS}/api/v1/query?query={}",
            urlencode("up{job=\"edge-classifier\"} == 1")
        );
        let body = ureq::get(&url).call()?.body_mut().read_to_string()?;
        let v: Value = serde_json::from_str(&body)?;
        Ok(v["data"]["result"]
            .as_array()
            .is_some_and(|r| !r.is_empty()))
    })
    .unwrap_or(false)
}

fn promtool(args: &[&str]) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dashboards())
        .output()
        .expect("promtool (Debian package prometheus; `cargo xtask setup` installs it)");
    assert!(
        out.status.success(),
        "promtool {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `edge_classifier_…` and `edge_classifier:…` names in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("edge_classifier") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

/// Dashboard variables as the whole range of values.
fn expand(expr: &str) -> String {
    expr.replace("$__rate_interval", "15s")
        .replace("$instance", ".*")
        .replace("$interface", ".*")
        .replace("$pool", ".*")
        .replace("$node", ".*")
}

/// A Grafana dashboard of `dashboards/`: its structure, each variable in `variables` has values,
/// and every panel's query returns data through Prometheus and names only exported or recorded
/// metrics. Row panels (a repeated row per value of a variable) hold no query; the variable they
/// repeat by must exist.
fn check_dashboard(
    ns: &str,
    file: &str,
    variables: &[&str],
    families: &BTreeSet<String>,
    recorded: &BTreeSet<String>,
) {
    let dash: Value =
        serde_json::from_str(&std::fs::read_to_string(dashboards().join(file)).unwrap())
            .unwrap_or_else(|e| panic!("{file}: JSON: {e}"));
    let vars: Vec<&Value> = dash["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .collect();
    let mut ids = BTreeSet::new();
    let mut exprs = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        let id = p["id"].as_u64().expect("panel id");
        assert!(ids.insert(id), "{file}: duplicate panel id {id}");
        if p["type"] == "row" {
            if let Some(by) = p["repeat"].as_str() {
                assert!(
                    vars.iter().any(|v| v["name"] == by),
                    "{file}: row {id} repeats by an unknown variable {by}"
                );
            }
            continue;
        }
        assert_eq!(
            p["datasource"]["uid"], "${datasource}",
            "{file}: panel {id} datasource"
        );
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{file}: panel {id} has no targets");
        for t in targets {
            let expr = t["expr"].as_str().unwrap_or_default();
            assert!(
                !expr.trim().is_empty(),
                "{file}: panel {id} target without expr"
            );
            exprs.push((p["title"].as_str().unwrap().to_string(), expr.to_string()));
        }
    }
    assert!(
        vars.iter()
            .any(|v| v["type"] == "datasource" && v["query"] == "prometheus"),
        "{file}: datasource variable"
    );
    for var in variables {
        let v = vars
            .iter()
            .find(|v| v["name"] == *var)
            .unwrap_or_else(|| panic!("{file}: variable {var}"));
        let q = v["query"]["query"].as_str().unwrap();
        // label_values(SELECTOR, LABEL): Grafana asks the series API.
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|s| s.strip_suffix(')'))
            .expect("label_values query");
        let (selector, label) = inner.rsplit_once(',').unwrap();
        let body = http_get(
            ns,
            PROMETHEUS,
            format!("/api/v1/series?match[]={}", urlencode(&expand(selector))),
        );
        let series: Value = serde_json::from_str(&body).unwrap();
        let values: BTreeSet<&str> = series["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|s| s[label.trim()].as_str())
            .collect();
        assert!(
            !values.is_empty(),
            "{file}: variable {var}: no values for {q}"
        );
    }
    for (title, expr) in &exprs {
        for metric in metric_names(expr) {
            assert!(
                families.contains(&metric) || recorded.contains(&metric),
                "{file}: panel {title}: {metric} is neither exported nor recorded"
            );
        }
        let result = query(ns, &expand(expr));
        assert!(
            !result.is_empty(),
            "{file}: panel {title}: `{expr}` returned no data"
        );
    }
}

/// TCP frames to `port` that the tap saw pass.
fn tcp_frames_to(frames: &[Vec<u8>], port: u16) -> u64 {
    frames
        .iter()
        .filter(|f| {
            // Ethernet + IPv4/IPv6 without options (what the lab's stacks send).
            let (proto, l4) = match u16::from_be_bytes([f[12], f[13]]) {
                0x0800 => (f[23], 14 + ((f[14] & 0x0f) as usize) * 4),
                0x86dd => (f[20], 54),
                _ => return false,
            };
            proto == 6 && f.len() >= l4 + 4 && u16::from_be_bytes([f[l4 + 2], f[l4 + 3]]) == port
        })
        .count() as u64
}

#[test]
fn prometheus_scrapes_the_exporter_and_every_dashboard_and_alert_query_returns_data() {
    promtool(&["check", "rules", "alerts.yml"]);
    promtool(&["test", "rules", "alerts.test.yml"]);
    promtool(&["check", "config", "prometheus.yml"]);
    promtool(&["check", "config", "--agent", "prometheus-agent.yml"]);

    let lab = Lab::create("obs").expect("lab");
    // The daemon as an operator starts it, inside the edge namespace (nsenter keeps the host's
    // /sys/fs/bpf visible, unlike `ip netns exec`).
    let instance = format!("obs{}", std::process::id());
    // The default catalogue with a partner set fed from DNS, so that the DNS series the alerts
    // and the dashboard read exist. No server answers in the lab: its lookups fail, counted.
    let catalogue = std::env::temp_dir().join(format!("ec-obs-{}.toml", std::process::id()));
    std::fs::write(
        &catalogue,
        format!(
            "{}\n[sets.dns_partners]\nhosts = [\"sip.partner.example\"]\n\n[dns]\nservers = [\"127.0.0.1\"]\ntimeout = 1\n",
            // A limit on P3, so that the limits' series the dashboard and alerts read exist.
            edge_classifier::catalogue::DEFAULT_CATALOGUE.replacen(
                "id = \"client-sip-tls-in\"",
                "id = \"client-sip-tls-in\"\nlimit = { per_source = \"20/s\", burst = 40 }",
                1
            )
        ),
    )
    .unwrap();
    let daemon = start_daemon(
        &lab.edge,
        &[
            "--catalogue",
            catalogue.to_str().unwrap(),
            "--iface",
            "ext0=external",
            "--iface",
            "int0=internal",
            "--metrics",
            METRICS,
            "--instance",
            &instance,
            "--detach-on-exit",
        ],
    );

    let dir = std::env::temp_dir().join(format!("ec-prom-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: edge-classifier\n    static_configs:\n      - targets: [\"{METRICS}\"]\n        labels:\n          pool: obs\n",
            dashboards().join("alerts.yml").display()
        ),
    )
    .unwrap();
    let config_arg = format!("--config.file={}", config.display());
    let storage_arg = format!("--storage.tsdb.path={}", dir.join("data").display());
    let listen_arg = format!("--web.listen-address={PROMETHEUS}");
    let prometheus = prometheus(&lab.edge, &[config_arg, storage_arg, listen_arg]);
    wait_for(
        "Prometheus to scrape the classifier",
        Duration::from_secs(30),
        || scraped_up(&lab.edge),
    );

    // Known traffic: UDP is one frame per datagram, TCP is counted against a packet tap.
    let tap = Tap::open(&lab.edge, EDGE_EXT).expect("tap ext0");
    const STUN_IN: u64 = 5;
    const STUN_OUT: u64 = 3;
    let mut tcp_conns = 0u64;
    for (client, partner, ext) in [
        (CLIENT_V4, PARTNER_V4, EDGE_EXT_V4),
        (CLIENT_V6, PARTNER_V6, EDGE_EXT_V6),
    ] {
        let listeners = Listeners::start(&lab.edge, &[443, 5061], &[3478]).expect("listeners");
        for i in 0..STUN_IN {
            let src = SocketAddr::new(client, 41000 + i as u16);
            assert!(
                udp_send(
                    &lab.remote,
                    src,
                    SocketAddr::new(ext, 3478),
                    Duration::from_secs(3)
                )
                .unwrap(),
                "P6 datagram {i} answered"
            );
        }
        for (src, port) in [(partner, 5061u16), (client, 443), (client, 443)] {
            let x = tcp_exchange(
                &lab.remote,
                SocketAddr::new(src, 0),
                SocketAddr::new(ext, port),
                Duration::from_secs(3),
            )
            .unwrap();
            assert!(x.answered, "TCP {src} -> {ext}:{port}: {x:?}");
            tcp_conns += 1;
        }
        for port in [22u16, 3389] {
            let x = tcp_exchange(
                &lab.remote,
                SocketAddr::new(client, 0),
                SocketAddr::new(ext, port),
                Duration::from_millis(300),
            )
            .unwrap();
            assert!(!x.connected, "denied port {port} connected");
        }
        drop(listeners);
        let peers = Listeners::start(&lab.remote, &[], &[3478]).expect("remote stun");
        for _ in 0..STUN_OUT {
            assert!(
                udp_send(
                    &lab.edge,
                    SocketAddr::new(ext, 0),
                    SocketAddr::new(client, 3478),
                    Duration::from_secs(3)
                )
                .unwrap(),
                "P5 exchange answered"
            );
        }
        drop(peers);
    }
    std::thread::sleep(Duration::from_millis(500));
    let frames = tap.drain(Duration::from_millis(300));
    let p1 = tcp_frames_to(&frames, 5061);
    let p3 = tcp_frames_to(&frames, 443);
    assert!(
        p1 >= 2 * 3 && p3 >= 4 * 3,
        "tap saw P1 {p1}, P3 {p3} frames for {tcp_conns} connections"
    );

    // What Prometheus stored equals what was sent, once it has scraped after the traffic.
    let rule = |id: &str| {
        format!("edge_classifier_rule_packets_total{{rule=\"{id}\",interface=\"ext0\"}}")
    };
    wait_for(
        "a scrape after the traffic",
        Duration::from_secs(20),
        || scalar(&lab.edge, &rule("messenger-stun-in")) == (2 * STUN_IN) as f64,
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        scalar(&lab.edge, &rule("messenger-stun-in")),
        (2 * STUN_IN) as f64
    );
    // Each P5 exchange: the request out (egress) and the answer in, both under the rule.
    assert_eq!(
        scalar(&lab.edge, &rule("messenger-stun-out")),
        (2 * 2 * STUN_OUT) as f64
    );
    assert_eq!(scalar(&lab.edge, &rule("public-im-sip-in")), p1 as f64);
    assert_eq!(scalar(&lab.edge, &rule("client-sip-tls-in")), p3 as f64);
    let denied = scalar(
        &lab.edge,
        "edge_classifier_dropped_packets_total{reason=\"no_rule\",interface=\"ext0\"}",
    );
    assert!(denied >= 4.0, "no_rule drops {denied}");
    assert_eq!(scalar(&lab.edge, "edge_classifier_catalogue_rules"), 10.0);
    assert_eq!(
        scalar(
            &lab.edge,
            "sum(edge_classifier_interface_attached{xdp_mode=\"native\"})"
        ),
        2.0
    );

    // The exposition itself: HELP and TYPE for every family; counters end in _total.
    let text = http_get(&lab.edge, METRICS, "/metrics".into());
    let mut families = BTreeSet::new();
    for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let mut it = line["# TYPE ".len()..].split(' ');
        let (name, kind) = (it.next().unwrap(), it.next().unwrap());
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "family {name} has no HELP"
        );
        assert_eq!(
            kind,
            if name.ends_with("_total") {
                "counter"
            } else {
                "gauge"
            },
            "family {name}"
        );
        families.insert(name.to_string());
    }
    for required in [
        "edge_classifier_rule_packets_total",
        "edge_classifier_rule_bytes_total",
        "edge_classifier_dropped_packets_total",
        "edge_classifier_passed_packets_total",
        "edge_classifier_flow_table_entries",
        "edge_classifier_flows_evicted_total",
        "edge_classifier_reloads_total",
        "edge_classifier_last_reload_timestamp_seconds",
        "edge_classifier_catalogue_info",
        "edge_classifier_catalogue_rules",
        "edge_classifier_interface_attached",
        "edge_classifier_build_info",
        "edge_classifier_dns_addresses",
        "edge_classifier_dns_last_success_timestamp_seconds",
        "edge_classifier_dns_failures_total",
        "edge_classifier_dns_stale",
    ] {
        assert!(
            families.contains(required),
            "{required} not exported: {families:?}"
        );
    }

    // The alert rules as Prometheus loaded and evaluated them: all healthy, every name they use
    // has data, and each expression evaluates. (promtool's unit tests above show them firing.)
    let body = http_get(&lab.edge, PROMETHEUS, "/api/v1/rules".into());
    let rules: Value = serde_json::from_str(&body).unwrap();
    let mut recorded = BTreeSet::new();
    let mut rule_exprs = Vec::new();
    for group in rules["data"]["groups"].as_array().expect("groups") {
        for r in group["rules"].as_array().expect("rules") {
            let name = r["name"].as_str().unwrap().to_string();
            assert_eq!(r["health"], "ok", "rule {name}: {r}");
            if r["type"] == "recording" {
                recorded.insert(name.clone());
            }
            rule_exprs.push((name, r["query"].as_str().unwrap().to_string()));
        }
    }
    assert_eq!(rule_exprs.len(), 13, "rules loaded: {rule_exprs:?}");
    for (name, expr) in &rule_exprs {
        query(&lab.edge, expr);
        for metric in metric_names(expr) {
            assert!(
                !query(&lab.edge, &metric).is_empty(),
                "rule {name}: {metric} has no data"
            );
        }
        if recorded.contains(name) {
            assert!(
                !query(&lab.edge, expr).is_empty(),
                "recording rule {name} has no data"
            );
        }
    }
    assert!(
        !query(&lab.edge, "up{job=\"edge-classifier\"}").is_empty(),
        "the series EdgeClassifierNotScraped/Absent watch"
    );

    // The dashboards: structure, and every query returns data through Prometheus. The pool
    // view's queries group by the `pool` target label the scrape config gives.
    check_dashboard(
        &lab.edge,
        "edge-classifier.json",
        &["instance", "interface"],
        &families,
        &recorded,
    );
    check_dashboard(
        &lab.edge,
        "edge-classifier-pool.json",
        &["pool", "node"],
        &families,
        &recorded,
    );
    // One node runs one catalogue and one version: the pool counts show 1 (the drift alert's
    // expression is the same count, compared with 1).
    for expr in [
        "count by (pool) (count by (pool, hash) (edge_classifier_catalogue_info))",
        "count by (pool) (count by (pool, version) (edge_classifier_build_info))",
    ] {
        assert_eq!(scalar(&lab.edge, expr), 1.0, "{expr}");
    }

    // `edge-classifier stats` prints the same numbers; `--watch` adds per-second rates.
    let stats = |args: &[&str]| -> String {
        let out = in_ns(&lab.edge, env!("CARGO_BIN_EXE_edge-classifier"))
            .args(["stats", "--metrics", METRICS])
            .args(args)
            .output()
            .expect("run stats");
        assert!(
            out.status.success(),
            "stats {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let row = |text: &str, id: &str| -> Vec<String> {
        text.lines()
            .rfind(|l| l.starts_with(&format!("{id} ")))
            .unwrap_or_else(|| panic!("no row for {id} in:\n{text}"))
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    let text = stats(&[]);
    for (id, packets) in [
        ("messenger-stun-in", 2 * STUN_IN),
        ("messenger-stun-out", 4 * STUN_OUT),
        ("public-im-sip-in", p1),
        ("client-sip-tls-in", p3),
    ] {
        assert_eq!(
            row(&text, id)[6],
            packets.to_string(),
            "stats row {id}:\n{text}"
        );
    }
    assert!(
        text.contains("interface ext0 (external): attached, XDP native mode"),
        "{text}"
    );
    let watched = stats(&["--watch", "--count", "2"]);
    let r = row(&watched, "messenger-stun-in");
    assert!(
        r[8].parse::<f64>().is_ok(),
        "a rate after the first refresh: {r:?}"
    );

    drop(prometheus);
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
    drop(lab);
}
