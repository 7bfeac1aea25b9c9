//! Deployment guards: what a catalogue that validates can still get wrong on the host it runs
//! on. Checked on every `run` and `reload` against the bound NICs' configured addresses, and
//! reported as warnings (the catalogue is still put in force: refusing it could leave the Edge
//! on an older, equally wrong one, or unprotected).

use std::{collections::BTreeMap, net::IpAddr};

use ipnet::IpNet;

use crate::catalogue::{ANY, Catalogue};

/// The documentation ranges (RFC 5737, RFC 3849): the shipped catalogues' placeholder addresses.
const DOCUMENTATION: [&str; 4] = [
    "192.0.2.0/24",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "2001:db8::/32",
];

/// The sets whose addresses the Edge protects: `policy.protected` and every rule's local set.
pub fn protected_sets(cat: &Catalogue) -> Vec<String> {
    let mut sets: Vec<String> = cat.policy.protected.clone();
    for r in &cat.rules {
        if r.local != ANY && !sets.contains(&r.local) {
            sets.push(r.local.clone());
        }
    }
    sets
}

/// Addresses of `addrs` (a NIC's configured addresses) that a protected set holds.
pub fn protected_count(cat: &Catalogue, addrs: impl IntoIterator<Item = IpAddr>) -> usize {
    let nets: Vec<&IpNet> = protected_sets(cat)
        .iter()
        .filter_map(|s| cat.sets.get(s))
        .flatten()
        .collect();
    addrs
        .into_iter()
        .filter(|a| nets.iter().any(|n| n.contains(a)))
        .count()
}

/// The warnings for `cat` on the NICs `bound` (name, role), whose configured addresses are
/// `configured` (address → ifindex, as [`crate::nic_addrs::configured`] reads them). A set is
/// expected on them when a rule of a bound role names it as its local side (a set only the
/// rules of an unbound role use belongs to another host or instance).
pub fn warnings(
    cat: &Catalogue,
    bound: &[(&str, &str)],
    configured: &BTreeMap<IpAddr, u32>,
) -> Vec<String> {
    let mut out = Vec::new();
    let nics: Vec<&str> = bound.iter().map(|(n, _)| *n).collect();
    let mut sets: Vec<String> = Vec::new();
    for r in &cat.rules {
        if r.local != ANY
            && bound.iter().any(|(_, role)| *role == r.interface)
            && !sets.contains(&r.local)
        {
            sets.push(r.local.clone());
        }
    }
    if sets.is_empty() {
        sets = protected_sets(cat);
    }
    let on_nics = |set: &str| {
        cat.sets.get(set).is_some_and(|nets| {
            configured
                .keys()
                .any(|a| nets.iter().any(|n| n.contains(a)))
        })
    };
    let nic_list = || {
        let addrs: Vec<String> = configured.keys().map(IpAddr::to_string).collect();
        format!(
            "{} (configured: {})",
            nics.join(", "),
            if addrs.is_empty() {
                "no address".to_string()
            } else {
                addrs.join(", ")
            }
        )
    };
    let missing: Vec<&String> = sets.iter().filter(|s| !on_nics(s)).collect();
    if !sets.is_empty() && missing.len() == sets.len() {
        out.push(format!(
            "{}: no address of the protected sets ({}) is configured on the bound NICs {}: no rule of this catalogue can match here, so every service the Edge offers is unreachable{}; edit the sets to the Edge's own addresses",
            cat.source_name,
            sets.join(", "),
            nic_list(),
            if cat.policy.protect_interface_addresses {
                " (the NICs' own addresses stay closed: protect_interface_addresses)"
            } else {
                " and, with protect_interface_addresses = false, nothing on these NICs is protected"
            }
        ));
    } else {
        for s in missing {
            let nets: Vec<String> = cat.sets[s.as_str()].iter().map(IpNet::to_string).collect();
            out.push(format!(
                "{}: protected set `{s}` ({}) holds no address configured on the bound NICs {}: its rules cannot match here",
                cat.source_name,
                nets.join(", "),
                nic_list()
            ));
        }
    }
    let documentation: Vec<IpNet> = DOCUMENTATION
        .iter()
        .map(|d| d.parse().expect("a prefix"))
        .collect();
    let placeholders: Vec<&String> = cat
        .sets
        .iter()
        .filter(|(_, nets)| {
            !nets.is_empty()
                && nets
                    .iter()
                    .all(|n| documentation.iter().any(|d| d.contains(n)))
        })
        .map(|(name, _)| name)
        .collect();
    if !placeholders.is_empty() {
        out.push(format!(
            "{}: set{} {} still hold{} only documentation prefixes (RFC 5737 / RFC 3849, the shipped catalogues' placeholders): replace them with the real addresses",
            cat.source_name,
            if placeholders.len() == 1 { "" } else { "s" },
            placeholders
                .iter()
                .map(|s| format!("`{s}`"))
                .collect::<Vec<_>>()
                .join(", "),
            if placeholders.len() == 1 { "s" } else { "" },
        ));
    }
    out
}

/// Reads the NICs' addresses and logs every warning for `cat` on the NICs `bound` (name, role).
pub fn log_warnings(cat: &Catalogue, bound: &[(&str, &str)]) {
    let nics: Vec<&str> = bound.iter().map(|(n, _)| *n).collect();
    match crate::nic_addrs::configured(&nics) {
        Ok(configured) => {
            for w in warnings(cat, bound, &configured) {
                log::warn!("{w}");
            }
        }
        Err(e) => log::warn!("reading the addresses of {}: {e}", nics.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cat() -> Catalogue {
        Catalogue::default_catalogue()
    }

    fn addrs(list: &[&str]) -> BTreeMap<IpAddr, u32> {
        list.iter().map(|a| (a.parse().unwrap(), 2)).collect()
    }

    #[test]
    fn no_protected_address_on_the_nics_names_every_set() {
        let w = warnings(
            &cat(),
            &[("ext0", "external"), ("int0", "internal")],
            &addrs(&["10.0.0.5", "fe80::1"]),
        );
        assert!(
            w[0].contains("no address of the protected sets (access_edge, internal_edge) is configured on the bound NICs ext0, int0 (configured: 10.0.0.5, fe80::1)"),
            "{w:?}"
        );
        assert_eq!(protected_count(&cat(), addrs(&["10.0.0.5"]).into_keys()), 0);
    }

    #[test]
    fn one_missing_set_is_named_alone() {
        let both = [("ext0", "external"), ("int0", "internal")];
        let w = warnings(&cat(), &both, &addrs(&["198.51.100.10"]));
        assert!(
            w[0].contains("protected set `internal_edge` (192.0.2.10/32, 2001:db8:200::10/128) holds no address"),
            "{w:?}"
        );
        assert_eq!(w.len(), 2, "{w:?}");
        // With only the external NIC bound, the internal set is not expected here.
        let w = warnings(&cat(), &[("ext0", "external")], &addrs(&["198.51.100.10"]));
        assert_eq!(w.len(), 1, "only the placeholders: {w:?}");
        assert_eq!(
            protected_count(&cat(), addrs(&["198.51.100.10", "10.0.0.1"]).into_keys()),
            1
        );
    }

    #[test]
    fn documentation_prefixes_are_named_and_real_ones_are_not() {
        let all = warnings(
            &cat(),
            &[("ext0", "external"), ("int0", "internal")],
            &addrs(&["198.51.100.10", "192.0.2.10"]),
        );
        assert_eq!(all.len(), 1, "{all:?}");
        assert!(
            all[0].contains("sets `access_edge`, `internal_edge`, `public_im_partners` still hold only documentation prefixes"),
            "{all:?}"
        );
        let text = crate::catalogue::DEFAULT_CATALOGUE
            .replace(
                "\"198.51.100.10/32\", \"2001:db8:100::10/128\"",
                "\"100.64.0.10/32\"",
            )
            .replace(
                "\"192.0.2.10/32\", \"2001:db8:200::10/128\"",
                "\"10.1.0.10/32\"",
            )
            .replace(
                "\"203.0.113.0/24\", \"2001:db8:203::/48\"",
                "\"100.65.0.0/16\"",
            );
        let real = Catalogue::parse("real.toml", &text).unwrap();
        let w = warnings(
            &real,
            &[("ext0", "external"), ("int0", "internal")],
            &addrs(&["100.64.0.10", "10.1.0.10"]),
        );
        assert!(w.is_empty(), "{w:?}");
    }
}
