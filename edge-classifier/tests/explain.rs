//! `explain` through the real binary: which catalogue answers (a file, a running instance's, or
//! the embedded default, which it says), exit status 0 on pass and 1 on drop (2 on an error),
//! the nearest rule of a drop and what differed, ICMP/ICMPv6 types, and `--json`.

mod common;

use std::process::Command;

use common::*;
use edge_classifier_lab::*;

/// `explain ARGS`: (exit code, stdout, stderr).
fn explain(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .arg("explain")
        .args(args)
        .output()
        .expect("run explain");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn explain_names_the_rule_or_the_reason_and_exits_with_the_verdict() {
    // (args, exit status, what stdout holds)
    let cases: &[(&[&str], i32, &str)] = &[
        (
            &["tcp", "203.0.113.5:40000", "198.51.100.10:5061"],
            0,
            "pass: rule public-im-sip-in, seed row P1 (inbound tcp 5061)",
        ),
        (
            &["tcp", "198.51.100.1:40000", "198.51.100.10:5061"],
            1,
            "drop: no_rule",
        ),
        (
            &["udp", "[2001:db8:100::1]:40000", "[2001:db8:100::10]:3478"],
            0,
            "pass: rule messenger-stun-in, seed row P6",
        ),
        (
            &["tcp", "198.51.100.1:5269", "198.51.100.10:41000"],
            1,
            "drop: not_established",
        ),
        (
            &[
                "--established",
                "tcp",
                "198.51.100.1:5269",
                "198.51.100.10:41000",
            ],
            0,
            "pass: rule xmpp-federation-out, seed row X2",
        ),
        (
            &["--out", "tcp", "198.51.100.10:50010", "198.51.100.1:7000"],
            0,
            "pass: rule messenger-rtp-tcp-out, seed row P4",
        ),
        (
            &[
                "--iface",
                "internal",
                "tcp",
                "192.0.2.20:40000",
                "192.0.2.10:23456",
            ],
            0,
            "pass: rule xmpp-gateway-internal-in, seed row X3",
        ),
        (
            &["tcp", "192.0.2.20:40000", "192.0.2.10:23456"],
            1,
            "nearest rule: xmpp-gateway-internal-in (X3) covers inbound tcp 23456 on internal, but it is for internal NICs, not external",
        ),
        // The near miss of the issue: a non-partner on P1's port.
        (
            &["tcp", "192.0.2.77:40000", "198.51.100.10:5061"],
            1,
            "nearest rule: public-im-sip-in (P1) covers inbound tcp 5061 on external, but 192.0.2.77 is not in public_im_partners",
        ),
        // The Edge's own DNS query is tracked (the default egress policy) ...
        (
            &["--out", "udp", "198.51.100.10:40053", "198.51.100.1:53"],
            0,
            "pass: egress_tracked",
        ),
        // ... and its answer passes once it was sent, and only then.
        (
            &[
                "--established",
                "udp",
                "198.51.100.1:53",
                "198.51.100.10:40053",
            ],
            0,
            "pass: tracked_reply",
        ),
        (
            &["udp", "198.51.100.1:53", "198.51.100.10:40053"],
            1,
            "drop: no_rule",
        ),
        (
            &["icmp", "203.0.113.5", "198.51.100.10"],
            0,
            "ICMP type 8 203.0.113.5 -> 198.51.100.10 arriving on an external NIC:\npass: icmp",
        ),
        (
            &[
                "--icmp-type",
                "timestamp-request",
                "icmp",
                "203.0.113.5",
                "198.51.100.10",
            ],
            1,
            "drop: icmp: its type is not in the policy's icmp/icmpv6 list",
        ),
        (
            &[
                "--icmp-type",
                "packet-too-big",
                "icmpv6",
                "2001:db8::5",
                "2001:db8:100::10",
            ],
            0,
            "pass: icmp",
        ),
        (
            &[
                "--icmp-type",
                "130",
                "icmpv6",
                "2001:db8::5",
                "2001:db8:100::10",
            ],
            1,
            "drop: icmp",
        ),
    ];
    for (args, code, want) in cases {
        let (got, out, err) = explain(args);
        assert_eq!(got, *code, "explain {args:?}: exit status\n{out}{err}");
        assert!(out.contains(want), "explain {args:?}: {out}");
        // Without --catalogue or --instance it says whose rules answered.
        assert!(
            out.starts_with(
                "catalogue: <default catalogue>: the seed matrix on documentation addresses"
            ),
            "{out}"
        );
        assert!(
            err.contains("answering for the embedded default catalogue"),
            "{err}"
        );
    }
    for bad in [
        &["tcp", "203.0.113.5:1", "[2001:db8::1]:2"][..],
        &["icmp", "2001:db8::5", "198.51.100.10"],
        &[
            "--icmp-type",
            "bogus",
            "icmp",
            "203.0.113.5",
            "198.51.100.10",
        ],
        &["--iface", "dmz", "tcp", "203.0.113.5:1", "198.51.100.10:2"],
    ] {
        let (code, _, err) = explain(bad);
        assert_eq!(code, 2, "explain {bad:?}: an error exits 2: {err}");
        assert!(err.contains("Error:"), "{err}");
    }
}

#[test]
fn explain_json_carries_the_verdict_and_the_near_miss() {
    let (code, out, err) = explain(&[
        "--json",
        "--catalogue",
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/src/catalogue/profiles/sfb-edge.toml"
        ),
        "tcp",
        "198.51.100.99:40000",
        "192.0.2.10:8057",
    ]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.is_empty(),
        "--json with a catalogue writes nothing else: {err}"
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["pass"], false);
    assert_eq!(v["reason"], "no_rule");
    assert_eq!(v["near_miss"]["rule"], "internal-psom-in", "{v:#}");
    let differs: Vec<&str> = v["near_miss"]["differs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap())
        .collect();
    assert_eq!(
        differs,
        [
            "it is for internal NICs, not external",
            "198.51.100.99 is not in front_end_pool"
        ],
        "{v:#}"
    );
    assert!(v["catalogue"].as_str().unwrap().ends_with("sfb-edge.toml"));
}

/// `--instance` answers with the catalogue the instance runs, not the default: here one that
/// moved P3 from 443 to 8443.
#[test]
fn explain_instance_answers_with_the_running_catalogue() {
    let lab = Lab::create("ex").expect("lab");
    let instance = format!("ex{}", std::process::id());
    let _stop = Stop(instance.clone());
    let dir = std::env::temp_dir().join(format!("ec-explain-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("moved.toml");
    std::fs::write(
        &path,
        edge_classifier::catalogue::DEFAULT_CATALOGUE.replacen("port = 443\n", "port = 8443\n", 1),
    )
    .unwrap();
    let daemon = start_on_ext0(&lab.edge, &instance, path.to_str());
    let probe = ["tcp", "198.51.100.1:40000", "198.51.100.10:8443"];
    let (code, out, err) = explain(&[&["--instance", instance.as_str()][..], &probe[..]].concat());
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!(
            "catalogue: {} (running in instance {instance})",
            path.display()
        )),
        "{out}"
    );
    assert!(out.contains("pass: rule client-sip-tls-in"), "{out}");
    let (code, out, _) = explain(&probe);
    assert_eq!(code, 1, "the default catalogue has P3 on 443: {out}");
    // --probe: the same frame through the program attached to ext0, with the live maps, in the
    // NIC's namespace; the kernel's verdict comes beside the reference's.
    let probe_ext0 = |dst: &str| {
        let out = in_ns(&lab.edge, BIN)
            .args([
                "explain",
                "--instance",
                &instance,
                "--probe",
                "ext0",
                "--json",
            ])
            .args(["tcp", "198.51.100.1:40000", dst])
            .output()
            .expect("explain --probe");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
        (out.status.code(), v["pass"].clone(), v["kernel"].clone())
    };
    let (code, pass, kernel) = probe_ext0("198.51.100.10:8443");
    assert_eq!((code, pass), (Some(0), true.into()));
    assert_eq!(kernel["pass"], true, "{kernel}");
    assert_eq!(kernel["nic"], "ext0");
    let (code, pass, kernel) = probe_ext0("198.51.100.10:443");
    assert_eq!((code, pass), (Some(1), false.into()));
    assert_eq!(kernel["pass"], false, "{kernel}");
    let (code, _, err) = explain(
        &[
            &["--instance", instance.as_str(), "--probe", "eth9"][..],
            &probe[..],
        ]
        .concat(),
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("has no NIC `eth9` bound"), "{err}");
    let (code, _, err) = explain(&[&["--probe", "ext0"][..], &probe[..]].concat());
    assert_eq!(code, 2, "--probe needs --instance: {err}");
    drop(daemon);
    let (code, _, err) = explain(&[
        "--instance",
        "no-such-instance",
        "tcp",
        "1.2.3.4:1",
        "5.6.7.8:2",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("no classifier instance `no-such-instance`"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// A rule's limit on new flows is shown with the rule that decides (`limit`), in text and JSON.
#[test]
fn explain_shows_the_deciding_rules_limit() {
    let dir = TempDir::new("explain-limit");
    let path = dir.0.join("limited.toml");
    let text = edge_classifier::catalogue::DEFAULT_CATALOGUE.replacen(
        "id = \"client-sip-tls-in\"",
        "id = \"client-sip-tls-in\"\nlimit = { per_source = \"20/s\", burst = 40, total = \"5000/s\", exempt = [\"public_im_partners\"] }",
        1,
    );
    std::fs::write(&path, text).unwrap();
    let cat = path.to_str().unwrap();
    let (code, out, err) = explain(&[
        "--catalogue",
        cat,
        "tcp",
        "198.51.100.1:40000",
        "198.51.100.10:443",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("pass: rule client-sip-tls-in, seed row P3 (inbound tcp 443)\nlimit on new flows: per source /32 /64: 20/s burst 40; total: 5000/s burst 5000; exempt: public_im_partners; beyond it a new flow drops as rate_limited"),
        "{out}"
    );
    let (_, out, _) = explain(&[
        "--json",
        "--catalogue",
        cat,
        "tcp",
        "198.51.100.1:40000",
        "198.51.100.10:443",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v["limit"],
        "per source /32 /64: 20/s burst 40; total: 5000/s burst 5000; exempt: public_im_partners"
    );
    // A rule without a limit shows none.
    let (_, out, _) = explain(&["tcp", "203.0.113.5:40000", "198.51.100.10:5061"]);
    assert!(!out.contains("limit on new flows"), "{out}");
}
