//! The documented limits hold across any sequence of reloads (issue 16, item 5): catalogues at
//! the prefix limit of both address families, and at the rule limit, swapped in one after the
//! other with both buffers full, each reload replacing everything the buffer it writes held.
//! BPF_PROG_TEST_RUN checks after every flip that the new catalogue is the one in force. And
//! the kernel memory per prefix and per flow, from the kernel's own figures (printed).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use edge_classifier::catalogue::{Catalogue, PortRange};
use edge_classifier_common::{
    FlowKey, FlowState, MAX_PREFIXES_PER_BUFFER, MAX_RULES_PER_CATALOGUE,
};
use edge_classifier_tests::*;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

const EXT4: Ipv4Addr = edge_classifier_lab::v4_of(edge_classifier_lab::EDGE_EXT_V4);
const EXT6: Ipv6Addr = edge_classifier_lab::v6_of(edge_classifier_lab::EDGE_EXT_V6);

/// Prefixes of each family the default catalogue has besides its partners: the default
/// route and the Edge's two host addresses.
const OTHER_PREFIXES: u32 = 3;

/// The `i`th IPv4 partner of catalogue `variant`: a /32 in a /24 of its own, so that the table
/// needs far more stride blocks than a buffer has and goes to the trie. Variants are disjoint.
fn v4_net(variant: u32, i: u32) -> IpNet {
    let a = ((16 + 16 * variant) << 24) | (i << 8) | 1;
    Ipv4Net::new(Ipv4Addr::from(a), 32).unwrap().into()
}

/// The `i`th IPv6 partner of catalogue `variant`: a /64 of fd00:VARIANT::/32.
fn v6_net(variant: u32, i: u32) -> IpNet {
    let a = Ipv6Addr::new(
        0xfd00,
        variant as u16,
        (i >> 16) as u16,
        i as u16,
        0,
        0,
        0,
        1,
    );
    Ipv6Net::new(a, 64).unwrap().into()
}

/// The default catalogue with `n` partner prefixes of each family from `variant`.
fn with_partners(variant: u32, n: u32) -> Catalogue {
    let mut cat = Catalogue::default_catalogue();
    let nets = (0..n)
        .map(|i| v4_net(variant, i))
        .chain((0..n).map(|i| v6_net(variant, i)))
        .collect();
    cat.sets.insert("public_im_partners".into(), nets);
    cat
}

/// P1 from the first and last partner of catalogue `v` passes, in both families; from the
/// catalogue before it (`v - 1`, all replaced) it drops.
fn check_partners(h: &mut Harness, v: u32, n: u32, step: &str) {
    let p1 = |net: IpNet| {
        let dst = if net.addr().is_ipv4() {
            IpAddr::V4(EXT4)
        } else {
            IpAddr::V6(EXT6)
        };
        tcp(net.addr(), 40000, dst, 5061)
    };
    for i in [0, n - 1] {
        for net in [v4_net(v, i), v6_net(v, i)] {
            assert_eq!(h.run(&p1(net)), XDP_PASS, "{step}: P1 from {}", net.addr());
        }
    }
    let before = (v + 2) % 3;
    for net in [v4_net(before, 0), v6_net(before, n - 1)] {
        assert_eq!(
            h.run(&p1(net)),
            XDP_DROP,
            "{step}: P1 from {} (catalogue {before})",
            net.addr()
        );
    }
}

/// Catalogues of exactly `MAX_PREFIXES_PER_BUFFER` IPv4 and IPv6 prefixes (the default route
/// included), each disjoint from the one before: after the first reload both buffers are full,
/// and the second replaces every entry of the buffer it writes while the running buffer's stay,
/// so the trie must never hold more than two buffers' worth (writing the new entries before
/// removing the stale ones failed here with ENOSPC). Every later reload is that case again with
/// the buffers' roles swapped; two keep the test at about 35 s (a reload writes 2 million trie
/// entries and removes as many, a few µs each).
#[test]
fn reloads_of_catalogues_at_the_prefix_limit_fit_with_both_buffers_full() {
    let _one = one_at_a_time();
    let n = MAX_PREFIXES_PER_BUFFER - OTHER_PREFIXES;
    let started = Instant::now();
    let cats: Vec<Catalogue> = (0..3).map(|v| with_partners(v, n)).collect();
    let mut h = Harness::new(&cats[0], "external");
    let c = h.classifier.compiled();
    assert_eq!(c.prefixes_v4.len(), MAX_PREFIXES_PER_BUFFER as usize);
    assert_eq!(c.prefixes_v6.len(), MAX_PREFIXES_PER_BUFFER as usize);
    assert_eq!(
        c.trie_v4().len(),
        MAX_PREFIXES_PER_BUFFER as usize,
        "the IPv4 table is in the trie"
    );
    assert_eq!(c.trie_v6().len(), MAX_PREFIXES_PER_BUFFER as usize);
    eprintln!("loaded in {:?}", started.elapsed());
    check_partners(&mut h, 0, n, "loaded");
    for (step, v) in [1u32, 2].into_iter().enumerate() {
        let name = format!("reload {} (catalogue {v})", step + 1);
        let t = Instant::now();
        h.reload(&cats[v as usize], &name);
        eprintln!("{name} in {:?}", t.elapsed());
        check_partners(&mut h, v, n, &name);
    }
    eprintln!("{:?} in all", started.elapsed());
}

/// Catalogues of `MAX_RULES_PER_CATALOGUE` rules whose ids are all new at each reload: the
/// running rules keep their counter slots until the flip, so the new ones need as many others.
#[test]
fn reloads_of_catalogues_at_the_rule_limit_fit_with_every_id_new() {
    let _one = one_at_a_time();
    let at_limit = |variant: u32| {
        let mut cat = Catalogue::default_catalogue();
        let template = cat.rules[0].clone();
        cat.rules = (0..MAX_RULES_PER_CATALOGUE)
            .map(|i| {
                let mut r = template.clone();
                r.id = format!("v{variant}-r{i}");
                r.seed_row = None;
                let port = 10000 + i as u16;
                r.ports = PortRange { lo: port, hi: port };
                r
            })
            .collect();
        cat
    };
    let partner = IpAddr::V4(edge_classifier_lab::v4_of(edge_classifier_lab::PARTNER_V4));
    let mut h = Harness::new(&at_limit(0), "external");
    for (step, v) in [1u32, 2, 0, 1].into_iter().enumerate() {
        let name = format!("reload {} (catalogue {v})", step + 1);
        h.reload(&at_limit(v), &name);
        for i in [0, MAX_RULES_PER_CATALOGUE - 1] {
            let id: &'static str = Box::leak(format!("v{v}-r{i}").into_boxed_str());
            h.expect(
                &format!("{name}: rule {i}"),
                &tcp(partner, 40000, IpAddr::V4(EXT4), 10000 + i as u16),
                XDP_PASS,
                &Expected::Rule(id),
            );
        }
    }
}

/// The tests here load big tables: one at a time, so that a memory reading sees only its own.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// Bytes of the objects in use in the kmalloc caches (`/proc/slabinfo`, active objects ×
/// object size): all of them, and the memcg-accounted `kmalloc-cg-*` alone. The BPF memory
/// allocator takes the LPM tries' nodes from the latter; each slab of those also has a vector
/// of 8-byte cgroup pointers, one per object, from the plain kmalloc caches.
fn kmalloc_bytes() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/slabinfo").expect("/proc/slabinfo (root)");
    let mut all = 0;
    let mut cg = 0;
    for l in text.lines().skip(2).filter(|l| l.starts_with("kmalloc-")) {
        let f: Vec<&str> = l.split_whitespace().collect();
        let bytes = f[1].parse::<u64>().unwrap() * f[3].parse::<u64>().unwrap();
        all += bytes;
        if l.starts_with("kmalloc-cg-") {
            cg += bytes;
        }
    }
    (all, cg)
}

/// `kmalloc_bytes` once it stops moving (a map dropped before is freed after an RCU grace
/// period).
fn settled_kmalloc_bytes() -> (u64, u64) {
    let mut last = kmalloc_bytes();
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(250));
        let now = kmalloc_bytes();
        if now.0.abs_diff(last.0) < 256 << 10 {
            return now;
        }
        last = now;
    }
    last
}

/// The BPF maps this process holds open: (map id, name, the kernel's `memlock` figure, which
/// is what `bpftool map show` prints and its JSON calls `bytes_memlock`).
fn open_maps() -> BTreeMap<u32, (String, u64)> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir("/proc/self/fdinfo").expect("fdinfo") {
        let Ok(text) = std::fs::read_to_string(e.expect("fdinfo entry").path()) else {
            continue;
        };
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        let (Some(id), Some(memlock)) = (field("map_id:"), field("memlock:")) else {
            continue;
        };
        let name = aya::maps::MapInfo::from_id(id as u32)
            .ok()
            .and_then(|i| i.name_as_str().map(str::to_string))
            .unwrap_or_default();
        out.insert(id as u32, (name, memlock));
    }
    out
}

/// What loading a catalogue took: the classifier, the `memlock` of each map it brought, the
/// kmalloc caches' growth (all, `kmalloc-cg-*`) and the time.
struct Measured {
    h: Harness,
    maps: BTreeMap<String, u64>,
    slab: u64,
    slab_cg: u64,
    took: Duration,
}

fn load_measured(cat: &Catalogue) -> Measured {
    let before_maps = open_maps();
    let before = settled_kmalloc_bytes();
    let t = Instant::now();
    let h = Harness::new(cat, "external");
    let took = t.elapsed();
    let after = kmalloc_bytes();
    let maps = open_maps()
        .into_iter()
        .filter(|(id, _)| !before_maps.contains_key(id))
        .map(|(_, (name, memlock))| (name, memlock))
        .collect();
    Measured {
        h,
        maps,
        slab: after.0.saturating_sub(before.0),
        slab_cg: after.1.saturating_sub(before.1),
        took,
    }
}

fn mb(b: u64) -> String {
    format!("{:.1} MB", b as f64 / 1e6)
}

/// Kernel memory per prefix and per flow, from the kernel's own figures: each map's `memlock`
/// (what `bpftool map show` prints) and, for the LPM tries, whose nodes come from the BPF
/// memory allocator and whose `memlock` this kernel reports as 0, how much the kmalloc caches
/// of `/proc/slabinfo` grow when the catalogue is written. Prints the figures the README
/// gives: `cargo test -p edge-classifier-tests --test limits kernel_memory -- --nocapture`.
#[test]
fn kernel_memory_per_prefix_and_per_flow() {
    let _one = one_at_a_time();
    let cpus = std::fs::read_to_string("/sys/devices/system/cpu/possible").unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!("kernel {}, possible CPUs {}", kernel.trim(), cpus.trim());

    // What every classifier takes, whatever its catalogue.
    let m = load_measured(&Catalogue::default_catalogue());
    let total: u64 = m.maps.values().sum();
    println!(
        "\nthe default catalogue loaded: {} in {} maps (memlock), {} in kmalloc slabs",
        mb(total),
        m.maps.len(),
        mb(m.slab)
    );
    let mut by_size: Vec<_> = m.maps.iter().collect();
    by_size.sort_by_key(|(_, b)| std::cmp::Reverse(**b));
    for (name, memlock) in by_size.iter().take(8) {
        println!("  {name:<16} {:>9}", mb(**memlock));
    }
    assert_eq!(
        m.maps.get("SETS_V4"),
        Some(&0),
        "the tries' memlock: {:?}",
        m.maps
    );
    let capacity = m.h.classifier.compiled().flow_capacity;
    let per_flow = |name: &str| m.maps[name] as f64 / f64::from(capacity);
    println!(
        "  flow tables ({capacity} flows each): {:.1} B per IPv4 flow, {:.1} B per IPv6 flow",
        per_flow("FLOWS_V4"),
        per_flow("FLOWS_V6")
    );
    drop(m);
    // The hash's buckets are rounded up to a power of two.
    let mut cat = Catalogue::default_catalogue();
    cat.flows.capacity = 1_000_000;
    let m = load_measured(&cat);
    println!(
        "  flow tables of 1,000,000 flows each: {} (IPv4), {} (IPv6)",
        mb(m.maps["FLOWS_V4"]),
        mb(m.maps["FLOWS_V6"])
    );
    drop(m);

    // Prefixes, by where they go: the stride table is allocated whole at load, a trie grows.
    type Layout = (&'static str, fn(u32) -> IpNet, &'static [u32]);
    let layouts: [Layout; 3] = [
        (
            "IPv4 /28s, consecutive",
            |i| {
                Ipv4Net::new(Ipv4Addr::from(0x0a00_0000u32 + (i << 4)), 28)
                    .unwrap()
                    .into()
            },
            &[100_000, 1_000_000],
        ),
        ("IPv4 /32s, one per /24", |i| v4_net(0, i), &[100_000]),
        ("IPv6 /64s", |i| v6_net(0, i), &[100_000, 1_000_000]),
    ];
    println!("\nprefixes (P1's partners), kmalloc slabs grown when written (of which kmalloc-cg):");
    for (what, net, counts) in layouts {
        for &n in counts {
            let mut cat = Catalogue::default_catalogue();
            cat.sets
                .insert("public_im_partners".into(), (0..n).map(net).collect());
            let m = load_measured(&cat);
            let stride = what.starts_with("IPv4") && m.h.classifier.compiled().stride_v4.is_some();
            println!(
                "  {what:<24} {n:>9} in the {:<6} {:>9} ({:>9}): {:>5.1} B per prefix; written in {:.1?} (debug build)",
                if stride { "stride" } else { "trie" },
                mb(m.slab),
                mb(m.slab_cg),
                m.slab as f64 / f64::from(n),
                m.took
            );
            if !stride {
                assert!(
                    m.slab_cg >= 40 * u64::from(n),
                    "{what} {n}: the trie took only {} bytes",
                    m.slab_cg
                );
            }
        }
    }

    // Flows: the tables are preallocated, so a full one takes what an empty one does.
    let mut h = Harness::new(&Catalogue::default_catalogue(), "external");
    let before = settled_kmalloc_bytes();
    let state = FlowState::default();
    // One CPU for the whole fill: the LRU hands each CPU a list of free elements of its own, and
    // a thread that moves to the other CPU midway strands the rest of its list there, so the
    // table evicts its 128 oldest flows before it is full (seen on a busy host: 262,016).
    let all_cpus = pin_to_cpu(0).expect("pin to CPU 0");
    for i in 0..capacity {
        let mut key = FlowKey {
            local_port: 5061,
            remote_port: i as u16,
            family: 4,
            ..Default::default()
        };
        key.local[..4].copy_from_slice(&EXT4.octets());
        key.remote[..4].copy_from_slice(&(0x0a00_0000 + (i >> 16)).to_be_bytes());
        h.classifier.maps_mut().insert_flow(&key, &state).unwrap();
        key.family = 6;
        key.local = EXT6.octets();
        let IpAddr::V6(remote) = v6_net(0, i).addr() else {
            unreachable!("v6")
        };
        key.remote = remote.octets();
        h.classifier.maps_mut().insert_flow(&key, &state).unwrap();
    }
    set_affinity(&all_cpus).expect("restore the CPU mask");
    let stats = h.classifier.maps().flow_stats().unwrap();
    let grown = kmalloc_bytes().0.saturating_sub(before.0);
    println!(
        "\nflow tables filled ({} IPv4 and {} IPv6 flows present): kmalloc slabs grew by {}",
        stats.present_v4,
        stats.present_v6,
        mb(grown)
    );
    assert_eq!(stats.present_v4, u64::from(capacity));
    assert!(
        grown < u64::from(capacity) * 8,
        "a full flow table took {grown} bytes more than an empty one"
    );
}
