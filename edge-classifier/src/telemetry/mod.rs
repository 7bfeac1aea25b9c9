//! What comes out of a running instance: one snapshot of every counter, rendered for
//! Prometheus, for people, and the log lines.
pub mod events;
pub mod logging;
pub mod metrics;
pub mod report;
pub mod snapshot;
