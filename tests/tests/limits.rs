//! The documented limits hold across any sequence of reloads (issue 16, item 5): catalogues at
//! the prefix limit of both address families, and at the rule limit, swapped in one after the
//! other with both buffers full, each reload replacing everything the buffer it writes held.
//! BPF_PROG_TEST_RUN checks after every flip that the new catalogue is the one in force.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Instant,
};

use edge_classifier::{
    catalogue::{Catalogue, PortRange},
    compile::{Compiled, compile_with},
    maps::Holds,
};
use edge_classifier_common::{MAX_PREFIXES_PER_BUFFER, MAX_RULES_PER_CATALOGUE};
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

/// What each buffer holds, as the reload code tracks it, and the reload itself.
struct Reloads {
    h: Harness,
    held: [Option<Compiled>; 2],
}

impl Reloads {
    fn new(first: &Catalogue) -> Reloads {
        let h = Harness::new(first, "external");
        let mut held = [None, None];
        held[h.classifier.maps().active().unwrap() as usize] =
            Some(h.classifier.compiled().clone());
        Reloads { h, held }
    }

    /// Compiles `cat` keeping the running slots and swaps it in; panics naming `step` on error.
    fn reload(&mut self, cat: &Catalogue, step: &str) {
        let c = &mut self.h.classifier;
        let next = compile_with(cat, &c.compiled().assignments)
            .unwrap_or_else(|e| panic!("{step}: compile: {e}"));
        let running = c.compiled().clone();
        let target = 1 - c.maps().active().unwrap() as usize;
        let holds = self.held[target]
            .as_ref()
            .map_or(Holds::Empty, Holds::Compiled);
        let now = c
            .maps_mut()
            .swap_in(&next, holds, Some(&running))
            .unwrap_or_else(|e| panic!("{step}: swap_in: {e} ({:?})", e.source));
        assert_eq!(now as usize, target, "{step}");
        self.held[target] = Some(next.clone());
        c.set_compiled(next);
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
    let n = MAX_PREFIXES_PER_BUFFER - OTHER_PREFIXES;
    let started = Instant::now();
    let cats: Vec<Catalogue> = (0..3).map(|v| with_partners(v, n)).collect();
    let mut r = Reloads::new(&cats[0]);
    let c = r.h.classifier.compiled();
    assert_eq!(c.prefixes_v4.len(), MAX_PREFIXES_PER_BUFFER as usize);
    assert_eq!(c.prefixes_v6.len(), MAX_PREFIXES_PER_BUFFER as usize);
    assert_eq!(
        c.trie_v4().len(),
        MAX_PREFIXES_PER_BUFFER as usize,
        "the IPv4 table is in the trie"
    );
    assert_eq!(c.trie_v6().len(), MAX_PREFIXES_PER_BUFFER as usize);
    eprintln!("loaded in {:?}", started.elapsed());
    check_partners(&mut r.h, 0, n, "loaded");
    for (step, v) in [1u32, 2].into_iter().enumerate() {
        let name = format!("reload {} (catalogue {v})", step + 1);
        let t = Instant::now();
        r.reload(&cats[v as usize], &name);
        eprintln!("{name} in {:?}", t.elapsed());
        check_partners(&mut r.h, v, n, &name);
    }
    eprintln!("{:?} in all", started.elapsed());
}

/// Catalogues of `MAX_RULES_PER_CATALOGUE` rules whose ids are all new at each reload: the
/// running rules keep their counter slots until the flip, so the new ones need as many others.
#[test]
fn reloads_of_catalogues_at_the_rule_limit_fit_with_every_id_new() {
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
    let mut r = Reloads::new(&at_limit(0));
    for (step, v) in [1u32, 2, 0, 1].into_iter().enumerate() {
        let name = format!("reload {} (catalogue {v})", step + 1);
        r.reload(&at_limit(v), &name);
        for i in [0, MAX_RULES_PER_CATALOGUE - 1] {
            let id: &'static str = Box::leak(format!("v{v}-r{i}").into_boxed_str());
            r.h.expect(
                &format!("{name}: rule {i}"),
                &tcp(partner, 40000, IpAddr::V4(EXT4), 10000 + i as u16),
                XDP_PASS,
                &Expected::Rule(id),
            );
        }
    }
}
