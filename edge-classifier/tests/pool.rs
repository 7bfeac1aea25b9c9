//! An Edge pool rolled out with Ansible, for real: ansible-core (from PyPI, in the virtualenv
//! `cargo xtask setup` makes) runs the role `deploy/ansible/roles/edge_classifier` through the
//! local connection against two classifier instances, each a node: its own lab (namespaces and
//! veth NICs), its own `--instance`, its own catalogue file and daemon. The role checks the
//! rendered catalogue on the node, reloads it through the CLI (no systemd here), and verifies the
//! running hash and probe frames through the live kernel program. The test then looks for itself:
//! `status --json`, `/metrics`' `hash` label, the file's SHA-256, and TCP connections from each
//! lab's remote host through the attached classifier.
//!
//! Run 1 rolls a new catalogue (one more inbound rule, node 2's own address) out to both nodes.
//! Run 2 rolls another one out with a broken catalogue for node 2: it stops there, node 1 runs
//! the new catalogue, node 2 its previous one, and ansible-playbook fails.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

mod common;

use common::*;
use edge_classifier_lab::*;
use serde_json::Value;
use sha2::Digest as _;

/// The virtualenv `cargo xtask setup` makes (xtask's `PYTHON_VENV`), with ansible-core and
/// kubernetes-validate at pinned versions.
const VENV: &str = "/opt/edge-classifier-dev/venv";
const ANSIBLE_PLAYBOOK: &str = "/opt/edge-classifier-dev/venv/bin/ansible-playbook";

const DAEMONSET: &str = "deploy/kubernetes/edge-classifier-daemonset.yaml";

/// The shell script of the DaemonSet's `reload` container, pointed at `catalogue` and `bin`, and
/// made to run its loop `rounds` times (PyYAML, from the virtualenv, reads the manifest).
fn reload_script(catalogue: &Path, rounds: u32) -> String {
    let out = Command::new(format!("{VENV}/bin/python"))
        .args([
            "-c",
            "import sys, yaml\n\
             for d in yaml.safe_load_all(open(sys.argv[1])):\n\
             \x20   if d and d['kind'] == 'DaemonSet':\n\
             \x20       c = [c for c in d['spec']['template']['spec']['containers'] if c['name'] == 'reload'][0]\n\
             \x20       print(c['args'][0], end='')",
        ])
        .arg(repo().join(DAEMONSET))
        .output()
        .expect("python from the virtualenv");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let script = String::from_utf8(out.stdout).unwrap();
    assert!(script.contains("while sleep 10; do"), "{script}");
    script
        .replace(
            "while sleep 10; do",
            &format!("for round in $(seq {rounds}); do sleep 1"),
        )
        .replace("; do sleep 1", "; do\n  sleep 1")
        .replace(
            "/etc/edge-classifier/edge.toml",
            catalogue.to_str().unwrap(),
        )
        .replace("/usr/bin/edge-classifier", BIN)
}

/// Node 2's own external addresses, added to its lab's ext0 (node 1 has only the lab's).
const NODE2_EXT_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 11));

/// The port run 1's catalogue opens to the partners, and run 2's.
const RUN1_PORT: u16 = 8443;
const RUN2_PORT: u16 = 8444;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn sha256_file(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    sha2::Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The pool's label in the agents' external labels (dashboards/prometheus-agent.yml).
const POOL: &str = "sip-edge";

/// The pool's metrics as a site without central scraping collects them: on each node
/// Prometheus in agent mode, configured with the documented example
/// (`dashboards/prometheus-agent.yml`, its URL pointed at the lab and its password dropped),
/// scrapes the classifier on the node's loopback and remote-writes to a central Prometheus (in
/// node 1's namespace, reached from node 2 over a management link between the two) that loads
/// alerts.yml.
struct Monitoring {
    _central: Process,
    _agents: Vec<Process>,
    /// The namespace the central Prometheus listens in (on PROMETHEUS).
    ns: String,
}

impl Monitoring {
    fn start(nodes: [&Node; 2], dir: &Path) -> Monitoring {
        let (central_ns, other_ns) = (&nodes[0].lab.edge, &nodes[1].lab.edge);
        ip(&[
            "link", "add", "mgmt0", "netns", central_ns, "type", "veth", "peer", "name", "mgmt0",
            "netns", other_ns,
        ])
        .unwrap();
        for (ns, addr) in [(central_ns, "10.99.0.1/24"), (other_ns, "10.99.0.2/24")] {
            ip(&["-n", ns, "addr", "add", addr, "dev", "mgmt0"]).unwrap();
            ip(&["-n", ns, "link", "set", "mgmt0", "up"]).unwrap();
        }
        let dashboards = repo().join("dashboards");
        let central_yml = dir.join("central.yml");
        std::fs::write(
            &central_yml,
            format!(
                "global:\n  evaluation_interval: 1s\nrule_files:\n  - {}\n",
                dashboards.join("alerts.yml").display()
            ),
        )
        .unwrap();
        let central = prometheus(
            central_ns,
            &[
                format!("--config.file={}", central_yml.display()),
                format!("--storage.tsdb.path={}", dir.join("central").display()),
                "--web.listen-address=0.0.0.0:9090".into(),
                "--web.enable-remote-write-receiver".into(),
            ],
        );
        let example = std::fs::read_to_string(dashboards.join("prometheus-agent.yml")).unwrap();
        let mut agents = Vec::new();
        for (n, central_at) in [(nodes[0], "127.0.0.1"), (nodes[1], "10.99.0.1")] {
            let mut yml = example
                .replace("scrape_interval: 15s", "scrape_interval: 1s")
                .replace("edge: edge1", &format!("edge: {}", n.name))
                .replace("instance: edge1", &format!("instance: {}", n.name))
                .replace(
                    "https://prometheus.example.net/api/v1/write",
                    &format!("http://{central_at}:9090/api/v1/write"),
                );
            let auth = yml
                .find("    basic_auth:")
                .expect("the example's basic_auth");
            let end = yml[auth..].find("    # Only").expect("after basic_auth") + auth;
            yml.replace_range(
                auth..end,
                "    queue_config:\n      batch_send_deadline: 1s\n",
            );
            assert!(yml.contains(&format!("pool: {POOL}")), "{yml}");
            let file = dir.join(format!("agent-{}.yml", n.name));
            std::fs::write(&file, yml).unwrap();
            agents.push(prometheus(
                &n.lab.edge,
                &[
                    "--enable-feature=agent".into(),
                    format!("--config.file={}", file.display()),
                    format!(
                        "--storage.agent.path={}",
                        dir.join(format!("agent-{}", n.name)).display()
                    ),
                    "--web.listen-address=127.0.0.1:9091".into(),
                ],
            ));
        }
        let listening =
            || in_netns(central_ns, || Ok(std::net::TcpStream::connect(PROMETHEUS)?)).is_ok();
        wait_for("the central Prometheus", Duration::from_secs(30), listening);
        let m = Monitoring {
            _central: central,
            _agents: agents,
            ns: central_ns.clone(),
        };
        wait_for(
            "both nodes' metrics at the central Prometheus",
            Duration::from_secs(60),
            || m.hashes_by_node().len() == 2,
        );
        m
    }

    /// Each node's catalogue hash as the central Prometheus has it now.
    fn hashes_by_node(&self) -> std::collections::BTreeMap<String, String> {
        query(
            &self.ns,
            &format!("edge_classifier_catalogue_info{{pool=\"{POOL}\"}}"),
        )
        .iter()
        .map(|s| {
            (
                s["metric"]["instance"].as_str().unwrap().to_string(),
                s["metric"]["hash"].as_str().unwrap().to_string(),
            )
        })
        .collect()
    }

    /// Waits until the central Prometheus sees `want` (node → hash).
    fn wait_hashes(&self, want: &[(&str, &str)]) {
        let want: std::collections::BTreeMap<String, String> = want
            .iter()
            .map(|(n, h)| (n.to_string(), h.to_string()))
            .collect();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = self.hashes_by_node();
            if got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the central Prometheus has {got:?}, not {want:?}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The drift alert's expression as the central Prometheus evaluates it: catalogues per pool.
    fn catalogues_in_pool(&self) -> f64 {
        scalar(
            &self.ns,
            "count by (pool) (count by (pool, hash) (edge_classifier_catalogue_info))",
        )
    }

    /// The drift alert's state at the central Prometheus (`pending` during its 15 minutes).
    fn drift_alert(&self) -> Option<String> {
        query(
            &self.ns,
            &format!("ALERTS{{alertname=\"EdgeClassifierPoolCatalogueDrift\", pool=\"{POOL}\"}}"),
        )
        .first()
        .map(|a| a["metric"]["alertstate"].as_str().unwrap().to_string())
    }
}

/// One node of the pool: a lab, an instance and its daemon, the catalogue file it runs from.
struct Node {
    // Fields drop in order: the daemon, then `stop` (pins), then the lab (namespaces).
    _daemon: Process,
    _stop: Stop,
    name: &'static str,
    lab: Lab,
    instance: String,
    catalogue: PathBuf,
    ext_v4: IpAddr,
}

impl Node {
    fn status(&self) -> Value {
        let out = in_ns(&self.lab.edge, BIN)
            .args(["status", "--json", "--instance", &self.instance])
            .output()
            .expect("status");
        assert!(
            out.status.success(),
            "{} status: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    /// The hash the node runs, checked to be the same in `status --json` and `/metrics`.
    fn running_hash(&self) -> String {
        let status = self.status()["catalogue"]["sha256"]
            .as_str()
            .expect("a running catalogue")
            .to_string();
        let text = http_get(&self.lab.edge, METRICS, "/metrics".into());
        assert_eq!(
            metric(
                &text,
                "edge_classifier_catalogue_info",
                &[("hash", &status)]
            ),
            Some(1.0),
            "{}: /metrics' catalogue hash is not status' {status}:\n{}",
            self.name,
            text.lines()
                .filter(|l| l.starts_with("edge_classifier_catalogue_info"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        status
    }

    /// Packets counted under `rule` on ext0.
    fn ext0_rule_packets(&self, rule: &str) -> u64 {
        let status = self.status();
        status["counters"]["interfaces"]
            .as_array()
            .expect("interfaces")
            .iter()
            .find(|i| i["name"] == EDGE_EXT)
            .and_then(|i| i["rules"].as_array())
            .and_then(|rules| rules.iter().find(|r| r["id"] == rule))
            .and_then(|r| r["packets"].as_u64())
            .unwrap_or_else(|| panic!("{}: no counter for {rule} on ext0", self.name))
    }

    /// `explain --probe ext0` on the node: (reference pass, kernel pass).
    fn probe(&self, port: u16) -> (bool, bool) {
        let out = in_ns(&self.lab.edge, BIN)
            .args([
                "explain",
                "--instance",
                &self.instance,
                "--probe",
                EDGE_EXT,
                "--json",
                "tcp",
            ])
            .arg(format!("{PARTNER_V4}:40000"))
            .arg(format!("{}:{port}", self.ext_v4))
            .output()
            .expect("explain --probe");
        let v: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
        (
            v["pass"].as_bool().unwrap(),
            v["kernel"]["pass"].as_bool().unwrap(),
        )
    }

    /// Whether a partner's TCP connection to `port` on the node's external address completes.
    fn partner_connects(&self, port: u16) -> bool {
        let listeners = Listeners::start(&self.lab.edge, &[port], &[]).expect("listener");
        let x = tcp_exchange(
            &self.lab.remote,
            SocketAddr::new(PARTNER_V4, 0),
            SocketAddr::new(self.ext_v4, port),
            Duration::from_millis(700),
        )
        .expect("tcp exchange");
        drop(listeners);
        x.connected
    }
}

fn node(name: &'static str, dir: &Path, extra_ext: Option<IpAddr>) -> Node {
    let lab = Lab::create(name).expect("lab");
    if let Some(a) = extra_ext {
        ip(&[
            "-n",
            &lab.edge,
            "addr",
            "add",
            &format!("{a}/24"),
            "dev",
            EDGE_EXT,
        ])
        .unwrap();
    }
    let instance = format!("{name}-{}", std::process::id());
    let stop = Stop(instance.clone());
    // The node's old catalogue: the shipped default, as the package installs it.
    let catalogue = dir.join(name).join("edge.toml");
    std::fs::create_dir_all(catalogue.parent().unwrap()).unwrap();
    let (ok, text, err) = cli(&["catalogue", "--default"]);
    assert!(ok, "{err}");
    std::fs::write(&catalogue, text).unwrap();
    let daemon = start_daemon(
        &lab.edge,
        &[
            "--instance",
            &instance,
            "--catalogue",
            catalogue.to_str().unwrap(),
            "--iface",
            "ext0=external",
            "--iface",
            "int0=internal",
            "--metrics",
            METRICS,
            "--detach-on-exit",
        ],
    );
    Node {
        _daemon: daemon,
        _stop: stop,
        name,
        ext_v4: extra_ext.unwrap_or(EDGE_EXT_V4),
        lab,
        instance,
        catalogue,
    }
}

/// The pool template: the default catalogue with its Edge sets drawn from every pool member's
/// addresses (so that every node runs the same file, and the pool shows one hash), and an
/// inbound rule per port of `ports` for the partners.
fn pool_template(ports: &[u16]) -> String {
    let (ok, text, err) = cli(&["catalogue", "--default"]);
    assert!(ok, "{err}");
    let mut out = String::new();
    for line in text.lines() {
        let set = ["access_edge", "internal_edge"]
            .into_iter()
            .find(|s| line.starts_with(&format!("{s} = ")));
        match set {
            Some(s) => out.push_str(&format!(
                "{s} = {{{{ edge_classifier_pool_members | map('extract', hostvars, ['edge_classifier_addresses', '{s}']) | flatten | unique | to_json }}}}\n"
            )),
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    assert_eq!(
        out.matches("edge_classifier_pool_members").count(),
        2,
        "the default catalogue's sets moved:\n{text}"
    );
    for port in ports {
        out.push_str(&format!(
            "\n[[rule]]\nid = \"pool-partner-{port}-in\"\nrole = \"Access\"\nprotocol = \"HTTPS\"\ntransport = \"tcp\"\ndirection = \"inbound\"\nlocal = \"access_edge\"\nremote = \"public_im_partners\"\nport = {port}\ninterface = \"external\"\nnote = \"A pool-wide rule rolled out by the Ansible test.\"\n"
        ));
    }
    out
}

/// The inventory: the two nodes, reached through the local connection, each with its own
/// addresses, instance, catalogue file, namespace and probes.
fn inventory(
    nodes: &[&Node],
    template: &Path,
    node2_template: Option<&Path>,
    node2_extra_probes: &[(u16, &str)],
) -> String {
    let mut hosts = String::new();
    for n in nodes {
        let ext6 = if n.ext_v4 == EDGE_EXT_V4 {
            "2001:db8:100::10"
        } else {
            "2001:db8:100::11"
        };
        let extra = if n.name == "node2" {
            node2_extra_probes
        } else {
            &[]
        };
        let probes = [(5061, "pass"), (RUN1_PORT, "pass"), (22, "drop")]
            .iter()
            .chain(extra)
        .map(|(port, expect)| {
            format!(
                "          - {{nic: ext0, protocol: tcp, src: \"{PARTNER_V4}:40000\", dst: \"{}:{port}\", expect: {expect}}}\n",
                n.ext_v4
            )
        })
        .collect::<String>();
        let override_template = match (n.name, node2_template) {
            ("node2", Some(t)) => format!(
                "        edge_classifier_catalogue_template: {}\n",
                t.display()
            ),
            _ => String::new(),
        };
        hosts.push_str(&format!(
            "      {name}:\n        edge_classifier_instance: {instance}\n        edge_classifier_catalogue_path: {path}\n        edge_classifier_command_prefix: [nsenter, \"--net={netns}\"]\n        edge_classifier_addresses:\n          access_edge: [\"{v4}/32\", \"{ext6}/128\"]\n          internal_edge: [\"192.0.2.10/32\", \"2001:db8:200::10/128\"]\n        edge_classifier_probes:\n{probes}{override_template}",
            name = n.name,
            instance = n.instance,
            path = n.catalogue.display(),
            netns = Lab::netns_path(&n.lab.edge),
            v4 = n.ext_v4,
        ));
    }
    format!(
        "edge_classifier_pool:\n  vars:\n    ansible_connection: local\n    ansible_python_interpreter: \"{{{{ ansible_playbook_python }}}}\"\n    edge_classifier_bin: {bin}\n    edge_classifier_catalogue_template: {template}\n    edge_classifier_reload_with: cli\n  hosts:\n{hosts}",
        bin = BIN,
        template = template.display(),
    )
}

/// `ansible-playbook site.yml` with `inventory`; (success, output, seconds).
fn playbook(dir: &Path, inventory: &str, run: &str) -> (bool, String, f64) {
    let inv = dir.join(format!("inventory-{run}.yml"));
    std::fs::write(&inv, inventory).unwrap();
    let started = Instant::now();
    let out = Command::new(ANSIBLE_PLAYBOOK)
        .arg("-i")
        .arg(&inv)
        .arg(repo().join("deploy/ansible/site.yml"))
        .env("ANSIBLE_ROLES_PATH", repo().join("deploy/ansible/roles"))
        .env("ANSIBLE_LOCAL_TEMP", dir.join("ansible-tmp"))
        .env("ANSIBLE_REMOTE_TMP", dir.join("ansible-tmp"))
        .env("ANSIBLE_NOCOLOR", "1")
        .env("RUST_BACKTRACE", "0")
        .env("ANSIBLE_FORCE_COLOR", "0")
        .env("ANSIBLE_RETRY_FILES_ENABLED", "0")
        .output()
        .unwrap_or_else(|e| {
            panic!("{ANSIBLE_PLAYBOOK}: {e} (`cargo xtask setup` installs ansible-core there)")
        });
    let seconds = started.elapsed().as_secs_f64();
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), output, seconds)
}

#[test]
fn the_role_rolls_a_catalogue_out_node_by_node_and_stops_at_a_broken_one() {
    // Dropped last: the nodes' catalogues live in it.
    let tmp = TempDir::new("pool");
    let dir = tmp.0.clone();
    let node1 = node("node1", &dir, None);
    let node2 = node("node2", &dir, Some(NODE2_EXT_V4));
    let old = node1.running_hash();
    assert_eq!(old, sha256_file(&node1.catalogue));
    assert_eq!(node2.running_hash(), old, "both start on the default");
    let monitoring = Monitoring::start([&node1, &node2], &dir);
    monitoring.wait_hashes(&[("node1", &old), ("node2", &old)]);
    for n in [&node1, &node2] {
        assert!(
            !n.partner_connects(RUN1_PORT),
            "{}: {RUN1_PORT} open before the rollout",
            n.name
        );
    }
    // The default names node 1's address only: node 2's own address is not yet a rule's.
    assert!(
        !node2.partner_connects(5061),
        "node2: 5061 on its own address before the rollout"
    );

    // Run 1: the new pool catalogue to both nodes.
    let template1 = dir.join("pool-1.toml.j2");
    std::fs::write(&template1, pool_template(&[RUN1_PORT])).unwrap();
    let (ok, output, seconds) = playbook(
        &dir,
        &inventory(&[&node1, &node2], &template1, None, &[]),
        "1",
    );
    eprintln!("run 1 ({seconds:.1} s):\n{output}");
    assert!(ok, "run 1 failed:\n{output}");
    let new = node1.running_hash();
    assert_ne!(new, old);
    assert_eq!(new, sha256_file(&node1.catalogue), "node1 runs its file");
    assert_eq!(node2.running_hash(), new, "one catalogue across the pool");
    assert_eq!(new, sha256_file(&node2.catalogue), "node2 runs its file");
    for n in [&node1, &node2] {
        assert!(
            n.partner_connects(RUN1_PORT),
            "{}: {RUN1_PORT} closed after run 1",
            n.name
        );
        assert!(n.partner_connects(5061), "{}: 5061 on its address", n.name);
        assert!(!n.partner_connects(22), "{}: 22 open", n.name);
    }
    println!("rollout of a new catalogue to two nodes: {seconds:.1} s");
    monitoring.wait_hashes(&[("node1", &new), ("node2", &new)]);
    assert_eq!(monitoring.catalogues_in_pool(), 1.0);
    assert_eq!(
        monitoring.drift_alert(),
        None,
        "no drift after a complete rollout"
    );
    // The probes ran through the kernel program with the live maps: each counted on ext0.
    let rule = format!("pool-partner-{RUN1_PORT}-in");
    let counted = node2.ext0_rule_packets(&rule);
    assert_eq!(node2.probe(RUN1_PORT), (true, true));
    assert_eq!(
        node2.ext0_rule_packets(&rule),
        counted + 1,
        "the probe counted"
    );
    assert_eq!(
        node2.probe(RUN2_PORT),
        (false, false),
        "a port no rule opens"
    );

    // A second run with nothing to change reloads nothing and still verifies both nodes.
    let reloads = |n: &Node| n.status()["reloads"]["succeeded"].as_u64().unwrap();
    let before = (reloads(&node1), reloads(&node2));
    let (ok, output, idle) = playbook(
        &dir,
        &inventory(&[&node1, &node2], &template1, None, &[]),
        "1b",
    );
    assert!(ok, "an unchanged run failed:\n{output}");
    assert_eq!(
        (reloads(&node1), reloads(&node2)),
        before,
        "an unchanged run reloaded"
    );
    println!("run with nothing to change: {idle:.1} s");

    // Run 2: the next pool catalogue, and a broken one for node 2 (a typo in its copy).
    let template2 = dir.join("pool-2.toml.j2");
    std::fs::write(&template2, pool_template(&[RUN1_PORT, RUN2_PORT])).unwrap();
    let broken = dir.join("pool-2-node2.toml.j2");
    std::fs::write(
        &broken,
        pool_template(&[RUN1_PORT, RUN2_PORT]).replace(
            &format!("port = {RUN2_PORT}"),
            &format!("port = {RUN2_PORT}.0"),
        ),
    )
    .unwrap();
    let (ok, output, seconds) = playbook(
        &dir,
        &inventory(&[&node1, &node2], &template2, Some(&broken), &[]),
        "2",
    );
    eprintln!("run 2 ({seconds:.1} s):\n{output}");
    assert!(
        !ok,
        "run 2 succeeded with a broken catalogue for node 2:\n{output}"
    );
    assert!(
        output.contains("node2") && output.contains("failed=1"),
        "the recap names node 2 as failed:\n{output}"
    );
    assert!(
        output.contains("ok: [node1] => {") || output.contains("node1 runs "),
        "node 1 was verified before node 2 was reached:\n{output}"
    );
    let newer = node1.running_hash();
    assert_ne!(newer, new, "node 1 took run 2's catalogue");
    assert_eq!(newer, sha256_file(&node1.catalogue));
    assert_eq!(node2.running_hash(), new, "node 2 keeps run 1's catalogue");
    assert_eq!(
        sha256_file(&node2.catalogue),
        new,
        "node 2's file was not replaced"
    );
    assert!(
        node1.partner_connects(RUN2_PORT),
        "node1: {RUN2_PORT} closed after run 2"
    );
    assert!(
        !node2.partner_connects(RUN2_PORT),
        "node2: {RUN2_PORT} open after its failed run"
    );
    assert!(
        node2.partner_connects(RUN1_PORT),
        "node2: still runs run 1's rules"
    );
    // The central Prometheus sees the pool drift apart, and the drift alert is pending (it
    // fires after 15 minutes, which promtool's unit test covers).
    monitoring.wait_hashes(&[("node1", &newer), ("node2", &new)]);
    assert_eq!(monitoring.catalogues_in_pool(), 2.0);
    wait_for(
        "the drift alert to be pending",
        Duration::from_secs(10),
        || monitoring.drift_alert().as_deref() == Some("pending"),
    );
    println!(
        "central Prometheus after the stopped rollout: catalogues in pool {POOL}: {}; EdgeClassifierPoolCatalogueDrift {}",
        monitoring.catalogues_in_pool(),
        monitoring.drift_alert().unwrap()
    );
    let excerpt: Vec<&str> = output
        .lines()
        .filter(|l| {
            l.contains("fatal:")
                || l.contains("error")
                || l.starts_with("node")
                || l.contains("PLAY RECAP")
        })
        .collect();
    println!("failed run ({seconds:.1} s):\n{}", excerpt.join("\n"));

    // Run 3: run 2's catalogue is good for node 2 too, but a probe on node 2 expects a port
    // open that no rule opens: the verify step fails after the reload, and node 2 is put back
    // on its previous catalogue (file and kernel) before the play fails.
    let node2_reloads = reloads(&node2);
    let (ok, output, seconds) = playbook(
        &dir,
        &inventory(&[&node1, &node2], &template2, None, &[(9999, "pass")]),
        "3",
    );
    eprintln!("run 3 ({seconds:.1} s):\n{output}");
    assert!(!ok, "run 3 succeeded with a failing probe:\n{output}");
    assert!(
        output.contains("Stop the rollout here") && output.contains("was put back"),
        "the rescue ran:\n{output}"
    );
    assert_eq!(node1.running_hash(), newer, "node 1 unchanged");
    assert_eq!(
        node2.running_hash(),
        new,
        "node 2 back on run 1's catalogue"
    );
    assert_eq!(sha256_file(&node2.catalogue), new, "node 2's file put back");
    assert!(
        !node2.partner_connects(RUN2_PORT),
        "node2: {RUN2_PORT} open after the put-back"
    );
    assert_eq!(
        reloads(&node2),
        node2_reloads + 2,
        "node 2 reloaded run 2's catalogue, then its previous one"
    );

    // The DaemonSet's reload loop, for real against node 2: its file changes (as the kubelet
    // swaps in an updated ConfigMap), and the loop reloads it; a broken file is refused once.
    let reload_loop = || {
        in_ns(&node2.lab.edge, "sh")
            .args(["-c", &reload_script(&node2.catalogue, 3)])
            .env("EDGE_CLASSIFIER_INSTANCE", &node2.instance)
            .output()
            .expect("reload script")
    };
    std::fs::copy(&node1.catalogue, &node2.catalogue).unwrap();
    let out = reload_loop();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(said.matches("reloading").count(), 1, "one reload:\n{said}");
    assert_eq!(
        node2.running_hash(),
        newer,
        "the loop reloaded node 2's changed file"
    );
    std::fs::write(
        &node2.catalogue,
        std::fs::read_to_string(&broken)
            .unwrap()
            .replace("{{", "#")
            .replace("}}", ""),
    )
    .unwrap();
    let out = reload_loop();
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        said.matches("reloading").count(),
        1,
        "a refused file is tried once:\n{said}"
    );
    assert_eq!(
        node2.running_hash(),
        newer,
        "a refused catalogue changes nothing"
    );

    drop(monitoring);
    drop(node2);
    drop(node1);
}

/// The DaemonSet manifest against the Kubernetes API schemas (kubernetes-validate, strict: no
/// unknown field), with the ConfigMap an operator makes from the `sip-xmpp-edge` profile, whose
/// catalogue `check` accepts. No cluster is needed, nor root.
#[test]
fn the_daemonset_manifest_validates_against_the_kubernetes_schemas() {
    let tmp = TempDir::new("k8s");
    let dir = &tmp.0;
    let (ok, text, err) = cli(&["catalogue", "--profile", "sip-xmpp-edge"]);
    assert!(ok, "{err}");
    let toml = dir.join("edge.toml");
    std::fs::write(&toml, &text).unwrap();
    let (ok, _, err) = cli(&["check", toml.to_str().unwrap()]);
    assert!(ok, "the ConfigMap's catalogue: {err}");
    // JSON is YAML: the ConfigMap as `kubectl create configmap --from-file=edge.toml` makes it.
    let configmap = dir.join("configmap.yaml");
    std::fs::write(
        &configmap,
        serde_json::json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "edge-classifier-catalogue", "namespace": "edge-classifier"},
            "data": {"edge.toml": text},
        })
        .to_string(),
    )
    .unwrap();
    let validate = |file: &Path| {
        Command::new(format!("{VENV}/bin/kubernetes-validate"))
            .args(["--strict", "--no-warn"])
            .arg(file)
            .output()
            .expect("kubernetes-validate (`cargo xtask setup` installs it)")
    };
    for file in [repo().join(DAEMONSET), configmap] {
        let out = validate(&file);
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}: {said}{}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(said.contains("passed"), "{said}");
    }
    // The validator refuses what it should: a wrongly typed field.
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        std::fs::read_to_string(repo().join(DAEMONSET))
            .unwrap()
            .replace("hostNetwork: true", "hostNetwork: \"yes\""),
    )
    .unwrap();
    assert!(
        !validate(&bad).status.success(),
        "a string hostNetwork passed"
    );
}
