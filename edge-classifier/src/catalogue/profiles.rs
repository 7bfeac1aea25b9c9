//! The catalogues the project ships, by profile name. Each is a complete, commented catalogue
//! on documentation addresses; an operator prints one (`catalogue --profile NAME`), edits its
//! sets and checks it.

use super::DEFAULT_CATALOGUE;

/// A shipped catalogue.
#[derive(Debug, Clone, Copy)]
pub struct Profile {
    pub name: &'static str,
    /// One line on what it covers.
    pub summary: &'static str,
    pub text: &'static str,
}

/// Every profile; `seed` (the embedded default) first.
pub const PROFILES: &[Profile] = &[
    Profile {
        name: "seed",
        summary: "the seed port matrix: SIP federation, public IM connectivity and XMPP federation (S1, P1-P6, X1-X3)",
        text: DEFAULT_CATALOGUE,
    },
    Profile {
        name: "sfb-edge",
        summary: "the whole Lync Server 2013 / Skype for Business Edge role: Access, Web Conferencing and A/V Edge, XMPP proxy, the internal side",
        text: include_str!("profiles/sfb-edge.toml"),
    },
    Profile {
        name: "sip-xmpp-edge",
        summary: "a Kamailio + Prosody + coturn edge: SIP (5060/5061), XMPP (5222/5223/5269/5347), STUN/TURN (3478/5349, relay ports)",
        text: include_str!("profiles/sip-xmpp-edge.toml"),
    },
];

/// The profile called `name`.
pub fn profile(name: &str) -> Option<&'static Profile> {
    PROFILES.iter().find(|p| p.name == name)
}

/// The profiles' names, for messages and `--help`.
pub fn names() -> String {
    PROFILES
        .iter()
        .map(|p| p.name)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{catalogue::Catalogue, compile::compile};

    /// The limits the profiles suggest in comments stay true to the catalogue language: with
    /// them uncommented, each profile still parses and compiles, and the rule under the
    /// comment carries the limit.
    #[test]
    fn the_suggested_limits_hold_when_uncommented() {
        let mut suggested = Vec::new();
        for p in PROFILES {
            let text = p.text.replace("\n# limit = ", "\nlimit = ");
            if text == p.text {
                continue;
            }
            let cat = Catalogue::parse(p.name, &text).unwrap_or_else(|e| panic!("{}: {e}", p.name));
            compile(&cat).unwrap_or_else(|e| panic!("{}: {e}", p.name));
            suggested.extend(
                cat.rules
                    .iter()
                    .filter(|r| r.limit.is_some())
                    .map(|r| format!("{}: {}", p.name, r.id)),
            );
        }
        assert_eq!(
            suggested,
            [
                "sfb-edge: access-sip-federation-in",
                "sip-xmpp-edge: sip-tls-in"
            ],
            "the rules under the suggested limits"
        );
    }
}
