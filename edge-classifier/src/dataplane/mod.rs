//! The kernel side as userspace sees it: the maps, the loaded object and its attachments, and
//! the NIC addresses the daemon keeps in the kernel.
pub mod loader;
pub mod maps;
pub mod monitor;
pub mod nic_addrs;
