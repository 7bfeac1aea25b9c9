//! Where every index into a buffered or blocked map points: the one statement of each map's
//! layout. The XDP program, the compiler, the map writer and the reference classifier all index
//! through these functions, so a layout change is made here once.

use crate::{
    LPM_BUFFER_BITS, MAX_CLASSES, PORT_SPACE, RULE_COUNTER_BASE, STATS_STRIDE, STRIDE_BLOCKS,
    STRIDE_LEAVES, STRIDE_TOP, TRANSPORTS,
};

/// `PORTS[buffer][transport][port]`.
#[inline(always)]
pub const fn port(buffer: u32, transport: u32, port: u32) -> u32 {
    (buffer * TRANSPORTS + transport) * PORT_SPACE + port
}

/// `TRACKED_PORTS[transport][remote port]`: not buffered, it follows the flows.
#[inline(always)]
pub const fn tracked_port(transport: u32, port: u16) -> u32 {
    transport * PORT_SPACE + port as u32
}

/// A compiled catalogue's own port table: one buffer's worth, `[transport][port]`.
#[inline(always)]
pub const fn compiled_port(transport: u32, port: u16) -> usize {
    self::port(0, transport, port as u32) as usize
}

/// `CLASSES[buffer][class]`.
#[inline(always)]
pub const fn class(buffer: u32, class: u32) -> u32 {
    buffer * MAX_CLASSES + class
}

/// `STATS[block][counter]`: a counter block per interface, reasons first, then rule slots.
#[inline(always)]
pub const fn stats(block: u32, counter: u32) -> u32 {
    block * STATS_STRIDE + counter
}

/// The counter of rule slot `slot` within a block.
#[inline(always)]
pub const fn rule_counter(slot: u32) -> u32 {
    RULE_COUNTER_BASE + slot
}

/// `LIMITS[buffer][slot]`: a limited rule's budgets, by counter slot.
#[inline(always)]
pub const fn limit(buffer: u32, slot: u32) -> u32 {
    buffer * crate::MAX_RULES + slot
}

/// `STRIDE4_TOP[buffer][top 16 bits]`.
#[inline(always)]
pub const fn stride_top(buffer: u32, top: u32) -> u32 {
    buffer * STRIDE_TOP + top
}

/// `STRIDE4_BLOCKS[buffer][block]`.
#[inline(always)]
pub const fn stride_block(buffer: u32, block: u32) -> u32 {
    buffer * STRIDE_BLOCKS + block
}

/// `STRIDE4_LEAVES[buffer][leaf]`.
#[inline(always)]
pub const fn stride_leaf(buffer: u32, leaf: u32) -> u32 {
    buffer * STRIDE_LEAVES + leaf
}

/// The LPM key's prefix length for an address prefix of `len` bits: the buffer byte and its
/// padding come first in every key.
#[inline(always)]
pub const fn lpm_prefix_len(len: u32) -> u32 {
    LPM_BUFFER_BITS + len
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BUFFERS, PORT_ENTRIES, STATS_ENTRIES};

    #[test]
    fn the_last_index_of_each_map_is_its_last_entry() {
        assert_eq!(
            port(BUFFERS - 1, TRANSPORTS - 1, PORT_SPACE - 1),
            PORT_ENTRIES - 1
        );
        assert_eq!(
            class(BUFFERS - 1, MAX_CLASSES - 1),
            BUFFERS * MAX_CLASSES - 1
        );
        assert_eq!(
            stats(crate::MAX_IFACES - 1, rule_counter(crate::MAX_RULES - 1)),
            STATS_ENTRIES - 1
        );
        assert_eq!(
            stride_leaf(1, STRIDE_LEAVES - 1),
            BUFFERS * STRIDE_LEAVES - 1
        );
        assert_eq!(compiled_port(1, 0), PORT_SPACE as usize);
    }
}
