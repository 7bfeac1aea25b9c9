//! `edge-classifier status`: an instance as its pins and state file show it, read directly so it
//! answers while the daemon is down (which is exactly when an operator asks).
//!
//! Per NIC it asks the kernel about the pinned links themselves: a link whose NIC went away
//! stays pinned but reports interface 0 ("defunct"), so "pinned" alone would say protected when
//! nothing is.

use std::fmt::Write as _;

use serde::Serialize;

use crate::{
    instance::{Instance, InstanceError, Reloads, State},
    maps::{Maps, MapsError},
    snapshot::{Bound, CatalogueInfo, Snapshot},
};

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(transparent)]
    Instance(#[from] InstanceError),
    #[error("reading the pinned maps of instance `{instance}` (are you root?): {source}")]
    Maps {
        instance: String,
        #[source]
        source: MapsError,
    },
    #[error("the running catalogue of instance `{instance}` does not compile: {error}")]
    Catalogue {
        instance: String,
        error: crate::instance::LoadedError,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub instance: String,
    /// The serving process (`run`), if one ever wrote its pid.
    pub daemon: Option<Daemon>,
    /// The running catalogue: what the active rule buffer holds.
    pub catalogue: Option<Catalogue>,
    pub reloads: Reloads,
    pub active_buffer: Option<u32>,
    pub interfaces: Vec<Nic>,
    /// Per-rule and per-reason counters and the flow tables, read from the pinned maps.
    pub counters: Option<Snapshot>,
    /// True when every bound NIC has a live XDP link.
    pub protected: bool,
    /// The addresses DNS put in the running catalogue's sets, and where each came from.
    pub resolved: crate::catalogue::dns::Resolved,
    /// Kernel settings the running catalogue needs otherwise (`net.ipv4.tcp_syncookies`).
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Daemon {
    pub pid: u32,
    pub running: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Catalogue {
    /// Absolute path of the file (or the embedded default's name).
    pub source: String,
    pub sha256: String,
    pub rules: usize,
    /// When these rules were put in force, Unix seconds.
    pub loaded: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Nic {
    pub name: String,
    pub ifindex: u32,
    pub role: String,
    /// XDP mode at attach (`native`, `generic`).
    pub xdp_mode: Option<String>,
    pub xdp: Link,
    pub tc: Link,
    /// The NIC exists under this name with the bound ifindex.
    pub present: bool,
}

/// A pinned link as the kernel reports it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Link {
    pub pinned: bool,
    pub link_id: Option<u32>,
    pub program_id: Option<u32>,
    /// The interface the kernel has the link on (0: the NIC is gone, the link is defunct).
    pub kernel_ifindex: Option<u32>,
    /// Pinned, and on the bound NIC.
    pub live: bool,
}

fn link(instance: &Instance, nic: &str, kind: &str, ifindex: u32) -> Link {
    let pin = instance.link_pin(nic, kind);
    let Some(crate::loader::KernelLink {
        id,
        program_id: prog,
        ifindex: on,
    }) = crate::loader::pinned_link(&pin)
    else {
        return Link {
            pinned: pin.exists(),
            ..Link::default()
        };
    };
    Link {
        pinned: true,
        link_id: Some(id),
        program_id: Some(prog),
        kernel_ifindex: Some(on),
        live: on != 0 && on == ifindex,
    }
}

/// Reads instance `instance`. Without a state file it reports what the pins alone say.
pub fn read(instance: &Instance) -> Result<Status, StatusError> {
    let state: Option<State> = instance.read_state()?;
    let daemon = instance
        .daemon()
        .map(|(pid, running)| Daemon { pid, running });
    let compiled = match state.as_ref().and_then(State::active) {
        Some(l) => Some(l.compile().map_err(|error| StatusError::Catalogue {
            instance: instance.name.clone(),
            error,
        })?),
        None => None,
    };
    let reloads = state.as_ref().map(|s| s.reloads).unwrap_or_default();
    let resolved = state
        .as_ref()
        .and_then(State::active)
        .map(|l| l.resolved.clone())
        .unwrap_or_default();
    let catalogue = compiled.as_ref().map(|(cat, c)| Catalogue {
        source: cat.source_name.clone(),
        sha256: cat.digest.clone(),
        rules: c.rules.len(),
        loaded: reloads.last,
    });
    let bindings = state
        .as_ref()
        .map(|s| s.bindings.clone())
        .unwrap_or_default();
    let interfaces: Vec<Nic> = bindings
        .iter()
        .map(|b| Nic {
            name: b.name.clone(),
            ifindex: b.ifindex,
            role: b.role.clone(),
            xdp_mode: b.mode.clone(),
            xdp: link(instance, &b.name, "xdp", b.ifindex),
            tc: link(instance, &b.name, "tc", b.ifindex),
            present: crate::loader::ifindex(&b.name).ok() == Some(b.ifindex),
        })
        .collect();
    let maps = if crate::maps::pinned_in(&instance.maps_dir()) {
        Some(
            Maps::open_pinned(&instance.maps_dir()).map_err(|source| StatusError::Maps {
                instance: instance.name.clone(),
                source,
            })?,
        )
    } else {
        None
    };
    let maps_err = |source| StatusError::Maps {
        instance: instance.name.clone(),
        source,
    };
    let active_buffer = maps
        .as_ref()
        .map(Maps::active)
        .transpose()
        .map_err(maps_err)?;
    let counters = match (&maps, &compiled) {
        (Some(maps), Some((cat, c))) => {
            let bound: Vec<Bound> = bindings
                .iter()
                .map(|b| Bound {
                    name: &b.name,
                    role: &b.role,
                    ifindex: b.ifindex,
                    block: b.block,
                    mode: b.mode.clone(),
                })
                .collect();
            let info = CatalogueInfo {
                source: cat.source_name.clone(),
                digest: cat.digest.clone(),
                rules: cat.rules.len(),
            };
            Some(
                Snapshot::read_maps(maps, c, &bound, info, reloads)
                    .map_err(maps_err)?
                    .with_instance(instance),
            )
        }
        _ => None,
    };
    let protected = !interfaces.is_empty() && interfaces.iter().all(|n| n.xdp.live);
    let warnings = crate::nic_addrs::syncookie_warning(
        compiled.as_ref().is_some_and(|(_, c)| c.has_syn_proxy()),
    )
    .into_iter()
    .collect();
    Ok(Status {
        instance: instance.name.clone(),
        daemon,
        catalogue,
        reloads,
        active_buffer,
        interfaces,
        counters,
        protected,
        resolved,
        warnings,
    })
}

/// Addresses from DNS listed per set in the text form.
const MAX_LISTED: usize = 20;

fn when(unix: f64) -> String {
    let ago = crate::snapshot::unix_now() - unix;
    format!("{:.0} s ago (Unix time {unix:.0})", ago.max(0.0))
}

fn link_text(l: &Link) -> String {
    match (l.pinned, l.link_id, l.program_id, l.kernel_ifindex) {
        (false, ..) => "not pinned".to_string(),
        (true, Some(id), Some(prog), Some(on)) if l.live => {
            format!("live (link {id}, program {prog}, ifindex {on})")
        }
        (true, Some(id), Some(prog), Some(0)) => {
            format!("DEFUNCT: the NIC went away (link {id}, program {prog})")
        }
        (true, Some(id), Some(prog), Some(on)) => {
            format!("ON ANOTHER NIC: ifindex {on} (link {id}, program {prog})")
        }
        _ => "pinned, but the kernel does not answer for it".to_string(),
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "instance {}: {}",
            self.instance,
            if self.protected {
                "every bound NIC protected"
            } else if self.interfaces.is_empty() {
                "no NIC bound"
            } else {
                "NOT every bound NIC is protected"
            }
        );
        let _ = writeln!(
            out,
            "daemon: {}",
            match &self.daemon {
                Some(Daemon { pid, running: true }) => format!("running, pid {pid}"),
                Some(Daemon {
                    pid,
                    running: false,
                }) => format!(
                    "not running (last pid {pid}); the pinned programs keep filtering, counters are still counted"
                ),
                None => "never started".to_string(),
            }
        );
        match &self.catalogue {
            Some(c) => {
                let _ = writeln!(
                    out,
                    "catalogue: {} ({} rules, sha256 {}), loaded {}, buffer {}",
                    c.source,
                    c.rules,
                    c.sha256,
                    when(c.loaded),
                    self.active_buffer
                        .map_or("unknown".to_string(), |b| b.to_string())
                );
            }
            None => {
                let _ = writeln!(out, "catalogue: unknown (no state)");
            }
        }
        let _ = writeln!(
            out,
            "reloads: {} succeeded, {} failed",
            self.reloads.succeeded, self.reloads.failed
        );
        for n in &self.interfaces {
            let _ = writeln!(
                out,
                "interface {} (ifindex {}{}), role {}, XDP {} mode\n  xdp: {}\n  tc egress: {}",
                n.name,
                n.ifindex,
                if n.present { "" } else { ", NOT PRESENT" },
                n.role,
                n.xdp_mode.as_deref().unwrap_or("unknown"),
                link_text(&n.xdp),
                link_text(&n.tc)
            );
        }
        for w in &self.warnings {
            let _ = writeln!(out, "WARNING: {w}");
        }
        for (set, addrs) in &self.resolved {
            let _ = writeln!(out, "set {set}: {} addresses from DNS", addrs.len());
            // A partner with a thousand targets would bury the rest: `--json` lists them all.
            for (a, o) in addrs.iter().take(MAX_LISTED) {
                let _ = writeln!(out, "  {a} from {} ({})", o.name, o.via);
            }
            if addrs.len() > MAX_LISTED {
                let _ = writeln!(
                    out,
                    "  and {} more (`status --json` lists them all)",
                    addrs.len() - MAX_LISTED
                );
            }
        }
        if let Some(s) = &self.counters {
            let _ = writeln!(out);
            out.push_str(&crate::report::snapshot_table(s, None));
        }
        f.write_str(&out)
    }
}
