//! edge-classifier: an XDP classifier for the NICs of a SIP/XMPP federation edge server.
//!
//! - [`catalogue`]: the TOML rule catalogue, validated with file:line:column errors.
//! - [`compile`]: catalogue → contents of the kernel maps.
//! - [`loader`]: loads the embedded XDP object, fills the maps, binds NICs to roles, attaches.
//! - [`report`]: counter tables for people.
pub mod catalogue;
pub mod compile;
pub mod loader;
pub mod report;
