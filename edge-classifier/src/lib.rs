//! edge-classifier: an XDP classifier for the NICs of a SIP/XMPP federation edge server.
//!
//! The folders follow the data flow, from the operator's file to the kernel and back out as
//! numbers:
//!
//! - [`catalogue`]: the TOML rule catalogue, validated with file:line:column errors.
//! - [`resolve`]: the sets' DNS names (SRV → A/AAAA) resolved and refreshed on their TTL, the
//!   last good addresses kept when DNS fails.
//! - [`compile`]: catalogue → contents of the kernel maps ([`compile::stride`]: the IPv4 stride
//!   table large catalogues compile to).
//! - [`dataplane`]: the kernel side as userspace sees it: [`dataplane::maps`] (every read and
//!   write of the maps, typed, the double-buffered swap), [`dataplane::loader`] (the embedded
//!   eBPF object, NICs bound to roles, attach and pin), [`dataplane::nic_addrs`] (the bound NICs'
//!   own addresses, followed as they change).
//! - [`instance`]: a pinned instance across processes: pins and state, [`instance::lifecycle`]
//!   (start or adopt, reload, stop) and [`instance::status`] (read from the pins alone).
//! - [`telemetry`]: [`telemetry::snapshot`] (one read of every counter),
//!   [`telemetry::metrics`] (Prometheus `/metrics` and `/snapshot`), [`telemetry::report`]
//!   (tables for people), [`telemetry::logging`] (terminal or journal lines).
//! - [`offline`]: no kernel attachment: [`offline::reference`] (the classifier written a second
//!   time, parsing with etherparse), [`offline::explain`], [`offline::replay`] (a capture through
//!   the kernel program beside the reference), [`offline::capture`] (pcap/pcapng).
//!
//! Each leaf module is also re-exported at the crate root (`edge_classifier::maps`, …), the
//! paths the CLI, the tests and the fuzz targets use.
pub mod catalogue;
pub mod compile;
pub mod dataplane;
pub mod instance;
pub mod offline;
pub mod resolve;
pub mod telemetry;

pub use compile::stride;
pub use dataplane::{loader, maps, monitor, nic_addrs};
pub use instance::{lifecycle, status};
pub use offline::{capture, explain, reference, replay};
pub use telemetry::{logging, metrics, report, snapshot};
