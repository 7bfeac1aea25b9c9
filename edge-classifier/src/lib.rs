//! edge-classifier: an XDP classifier for the NICs of a SIP/XMPP federation edge server.
//!
//! - [`catalogue`]: the TOML rule catalogue, validated with file:line:column errors.
//! - [`compile`]: catalogue → contents of the kernel maps.
//! - [`stride`]: the IPv4 stride table large catalogues compile to.
//! - [`maps`]: every read and write of the kernel maps, including the double-buffered swap.
//! - [`loader`]: loads the embedded eBPF object, binds NICs to roles, attaches (and pins).
//! - [`nic_addrs`]: the bound NICs' own addresses, followed as they change.
//! - [`instance`]: where a pinned instance keeps its pins and state, across processes.
//! - [`lifecycle`]: start (or adopt), reload and stop a pinned instance.
//! - [`snapshot`]: one read of every counter, as the exporter and `stats` see it.
//! - [`metrics`]: the Prometheus exporter (`/metrics`) and its JSON twin (`/snapshot`).
//! - [`reference`]: the classifier written a second time in plain Rust (`explain`, and the
//!   differential test of the kernel program).
//! - [`explain`]: one flow's verdict and why, from the reference classifier.
//! - [`replay`]: a capture through the kernel program beside the reference classifier.
//! - [`capture`]: pcap/pcapng in and out.
//! - [`report`]: counter tables for people.
//! - [`status`]: an instance read from its pins and state, with or without its daemon.
//! - [`logging`]: log lines for a terminal or the systemd journal.
pub mod capture;
pub mod catalogue;
pub mod compile;
pub mod explain;
pub mod instance;
pub mod lifecycle;
pub mod loader;
pub mod logging;
pub mod maps;
pub mod metrics;
pub mod nic_addrs;
pub mod reference;
pub mod replay;
pub mod report;
pub mod snapshot;
pub mod status;
pub mod stride;
