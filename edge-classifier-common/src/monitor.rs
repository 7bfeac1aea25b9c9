//! Live drop/pass events (`edge-classifier monitor`): the slots monitors claim, what each
//! asks the kernel for, and the event records the programs write into a slot's ring buffer.
//!
//! A monitor claims one of [`MONITOR_SLOTS`] slots, writes its selection into
//! `MONITOR_CONFIG[slot]` and sets the slot's bit in the `monitors` word of each `IFACES` entry
//! it watches. The programs test that word (already loaded with the binding) and only then
//! enter the event path. The lease: the monitor bumps `renewals` every second, and the event
//! path, which notes on each CPU when it last saw the count change (in jiffies, which the
//! verifier inlines: no helper call), clears the slot's bit itself once it has not changed for
//! `lease_ticks`. So a monitor that dies, even by SIGKILL, stops costing anything.

/// Monitors that can run at once per instance; each has a ring buffer of its own (a ring has
/// one consumer position).
pub const MONITOR_SLOTS: u32 = 4;
/// Bytes of each frame an event carries.
pub const MONITOR_SNAPLEN: usize = 256;
/// Rule slots one monitor may select (`--rule`).
pub const MONITOR_RULES: usize = 8;
/// Bytes of each slot's ring buffer (a power of two and a multiple of the page size).
pub const MONITOR_RING_BYTES: u32 = 1 << 20;
/// Events per second a monitor gets unless it asks otherwise (all CPUs together).
pub const MONITOR_DEFAULT_RATE: u32 = 10_000;
/// How long a lease lasts after the monitor last renewed it, in seconds.
pub const MONITOR_LEASE_SECONDS: u64 = 3;

/// `MonitorConfig::flags`: the verdicts the monitor wants; 0 is a free slot.
pub const MONITOR_DROP: u32 = 1 << 0;
pub const MONITOR_PASS: u32 = 1 << 1;

/// `MonitorEvent::flags`.
pub const EVENT_PASS: u32 = 1 << 0;
/// The TC egress program wrote it (a frame the Edge sends).
pub const EVENT_EGRESS: u32 = 1 << 1;

/// Per-CPU `MONITOR_CPU` fields counted for each slot: events not delivered.
pub const LOST_RATE_LIMIT: usize = 0;
pub const LOST_RING_FULL: usize = 1;
pub const LOST_REASONS: [&str; 2] = ["rate_limit", "ring_full"];

/// What one monitor asks for (`MONITOR_CONFIG[slot]`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MonitorConfig {
    /// Bumped by the monitor every second, and by each monitor that takes the slot (so that no
    /// two holders share a value).
    pub renewals: u64,
    /// `MONITOR_DROP` / `MONITOR_PASS`.
    pub flags: u32,
    /// Reasons selected, one bit per reason index; with `rules` empty and this 0, every counter.
    pub reasons: u32,
    /// Events per second each CPU may write.
    pub rate_per_cpu: u32,
    /// Entries of `rules` in use.
    pub rules_len: u32,
    /// Counters (`layout::rule_counter(slot)`) of the rules selected.
    pub rules: [u32; MONITOR_RULES],
    /// Jiffies `renewals` may stay unchanged before the slot is taken for dead.
    pub lease_ticks: u64,
}

/// Per CPU and slot: the rate limiter's window and the events not delivered.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MonitorCpu {
    pub window_start_ns: u64,
    pub in_window: u64,
    /// Indexed by `LOST_*`; never reset, a monitor reads the difference.
    pub lost: [u64; 2],
    /// The slot's `renewals` as this CPU last saw it, and when it saw it change (jiffies).
    pub seen_renewals: u64,
    pub renewed_at: u64,
}

/// One frame, as the programs hand it to a monitor.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct MonitorEvent {
    /// `bpf_ktime_get_ns` (`CLOCK_MONOTONIC`).
    pub ts_ns: u64,
    pub ifindex: u32,
    /// The counter that recorded the frame: a reason, or `layout::rule_counter(slot)`.
    pub counter: u32,
    /// `EVENT_*`.
    pub flags: u32,
    /// The frame's length on the wire (an skb's length on egress).
    pub len: u32,
    /// Bytes of `data` that hold the frame's first bytes.
    pub caplen: u32,
    pub _pad: u32,
    pub data: [u8; MONITOR_SNAPLEN],
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for MonitorConfig {}
    unsafe impl aya::Pod for MonitorCpu {}
}

const _: () = {
    assert!(core::mem::size_of::<MonitorConfig>() == 8 + 16 + 4 * MONITOR_RULES + 8);
    assert!(core::mem::size_of::<MonitorCpu>() == 48);
    assert!(core::mem::size_of::<MonitorEvent>() == 32 + MONITOR_SNAPLEN);
    assert!(MONITOR_RING_BYTES.is_power_of_two());
};
