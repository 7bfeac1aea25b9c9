//! Addresses to set bits: the small tables, the Edge's own host addresses, the IPv4 stride
//! table and the LPM tries, cheapest first.

use aya_ebpf::maps::lpm_trie::Key;
use edge_classifier_common::{
    LOCALS_V4, LOCALS_V6, Lpm4, Lpm6, SMALL4, SMALL6, STRIDE_BLOCK, layout,
};

use crate::{maps::*, parse::Addr};

/// The peer's set bits, looked up only when a candidate rule narrows the remote side.
pub(crate) struct Remote<'a> {
    pub(crate) addr: &'a Addr,
    pub(crate) bits: Option<u64>,
    pub(crate) active: u32,
}

impl Remote<'_> {
    #[inline(always)]
    pub(crate) fn bits(&mut self) -> u64 {
        match self.bits {
            Some(b) => b,
            None => {
                let b = set_bits(self.active, self.addr);
                self.bits = Some(b);
                b
            }
        }
    }
}

/// Set bits of an address the Edge sends from or receives on: a small table answers when the
/// catalogue has one; otherwise the Edge's own host addresses are compared directly before the
/// stride table or a trie is consulted.
#[inline(always)]
pub(crate) fn local_bits(active: u32, addr: &Addr) -> u64 {
    if let Some(bits) = small_bits(active, addr) {
        return bits;
    }
    if let Some(l) = LOCALS.get(active) {
        match addr {
            Addr::V4(a) => {
                for i in 0..LOCALS_V4 {
                    if i as u32 >= l.v4_count {
                        break;
                    }
                    if l.v4[i] == *a {
                        return l.v4_bits[i];
                    }
                }
            }
            Addr::V6(a) => {
                for i in 0..LOCALS_V6 {
                    if i as u32 >= l.v6_count {
                        break;
                    }
                    if l.v6[i] == *a {
                        return l.v6_bits[i];
                    }
                }
            }
        }
    }
    large_bits(active, addr)
}

/// Set bits of any address (a peer's).
#[inline(always)]
pub(crate) fn set_bits(active: u32, addr: &Addr) -> u64 {
    match small_bits(active, addr) {
        Some(bits) => bits,
        None => large_bits(active, addr),
    }
}

/// The longest match from the small table of the address's family, when the catalogue's
/// prefixes of that family fit one (no match there is then no match at all: bits 0). `None`:
/// the table is too big to scan.
#[inline(always)]
pub(crate) fn small_bits(active: u32, addr: &Addr) -> Option<u64> {
    match addr {
        Addr::V4(a) => {
            let t = SMALL_V4.get(active)?;
            if t.complete == 0 {
                return None;
            }
            let a = u32::from_be_bytes(*a);
            for i in 0..SMALL4 {
                if i as u32 >= t.count {
                    break;
                }
                if a & t.mask[i] == t.net[i] {
                    return Some(t.bits[i]);
                }
            }
        }
        Addr::V6(a) => {
            let t = SMALL_V6.get(active)?;
            if t.complete == 0 {
                return None;
            }
            let (hi, lo) = a.split_at(8);
            let w = [
                u64::from_ne_bytes(hi.try_into().ok()?),
                u64::from_ne_bytes(lo.try_into().ok()?),
            ];
            for i in 0..SMALL6 {
                if i as u32 >= t.count {
                    break;
                }
                if w[0] & t.mask[i][0] == t.net[i][0] && w[1] & t.mask[i][1] == t.net[i][1] {
                    return Some(t.bits[i]);
                }
            }
        }
    }
    Some(0)
}

/// The longest match from a table too big to scan: the IPv4 stride table when the catalogue
/// fits one, else the trie.
#[inline(always)]
pub(crate) fn large_bits(active: u32, addr: &Addr) -> u64 {
    if let Addr::V4(a) = addr
        && let Some(t) = SMALL_V4.get(active)
        && t.stride != 0
        && let Some(bits) = stride_v4(active, u32::from_be_bytes(*a))
    {
        return bits;
    }
    trie_bits(active, addr)
}

/// The set bits of an IPv4 address from the stride table: at most three array loads.
#[inline(always)]
pub(crate) fn stride_v4(active: u32, a: u32) -> Option<u64> {
    let mut e = *STRIDE4_TOP.get(layout::stride_top(active, a >> 16))?;
    if e & STRIDE_BLOCK != 0 {
        let block = STRIDE4_BLOCKS.get(layout::stride_block(active, e & !STRIDE_BLOCK))?;
        e = block.entries[((a >> 8) & 0xff) as usize];
        if e & STRIDE_BLOCK != 0 {
            let block = STRIDE4_BLOCKS.get(layout::stride_block(active, e & !STRIDE_BLOCK))?;
            e = block.entries[(a & 0xff) as usize];
        }
    }
    STRIDE4_LEAVES.get(layout::stride_leaf(active, e)).copied()
}

#[inline(always)]
pub(crate) fn trie_bits(active: u32, addr: &Addr) -> u64 {
    let buffer = active as u8;
    let found = match addr {
        Addr::V4(a) => SETS_V4.get(Key::new(
            layout::lpm_prefix_len(32),
            Lpm4 {
                buffer,
                _pad: [0; 3],
                addr: *a,
            },
        )),
        Addr::V6(a) => SETS_V6.get(Key::new(
            layout::lpm_prefix_len(128),
            Lpm6 {
                buffer,
                _pad: [0; 3],
                addr: *a,
            },
        )),
    };
    match found {
        Some(bits) => *bits,
        None => 0,
    }
}
