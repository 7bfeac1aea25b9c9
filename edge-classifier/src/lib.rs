//! edge-classifier: an XDP classifier for the NICs of a SIP/XMPP federation edge server.
//!
//! - [`catalogue`]: the TOML rule catalogue, validated with file:line:column errors.
//! - [`compile`]: catalogue → contents of the kernel maps.
//! - [`loader`]: loads the embedded XDP object, fills the maps, binds NICs to roles, attaches.
//! - [`snapshot`]: one read of every counter, as the exporter and `stats` see it.
//! - [`metrics`]: the Prometheus exporter (`/metrics`) and its JSON twin (`/snapshot`).
//! - [`report`]: counter tables for people.
pub mod catalogue;
pub mod compile;
pub mod loader;
pub mod metrics;
pub mod report;
pub mod snapshot;
