//! Addresses to set bits: the small tables, the Edge's own host addresses, the IPv4 stride
//! table and the LPM tries, cheapest first.

use aya_ebpf::maps::{LpmTrie, lpm_trie::Key};
use edge_classifier_common::{LOCALS_V4, LOCALS_V6, SMALL4, SMALL6, STRIDE_BLOCK, layout};

use crate::{maps::*, parse::Addr};

/// The peer's set bits, looked up only when a candidate rule narrows the remote side. Plain
/// fields, not an `Option`: LLVM may spill a `None`'s unset payload, and the verifier refuses a
/// register that was never written.
pub(crate) struct Remote<'a> {
    addr: &'a Addr,
    bits: u64,
    known: bool,
    active: u32,
}

impl<'a> Remote<'a> {
    #[inline(always)]
    pub(crate) fn new(active: u32, addr: &'a Addr) -> Self {
        Remote {
            addr,
            bits: 0,
            known: false,
            active,
        }
    }

    #[inline(always)]
    pub(crate) fn bits(&mut self) -> u64 {
        if !self.known {
            self.bits = set_bits(self.active, self.addr);
            self.known = true;
        }
        self.bits
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
                    if u32::from_ne_bytes(l.v4[i]) == *a {
                        return l.v4_bits[i];
                    }
                }
            }
            Addr::V6(a) => {
                for i in 0..LOCALS_V6 {
                    if i as u32 >= l.v6_count {
                        break;
                    }
                    // The table's addresses lie at 8-byte offsets in the map value.
                    let w = unsafe { *(l.v6[i].as_ptr() as *const [u64; 2]) };
                    if w[0] == a[0] && w[1] == a[1] {
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
            let a = u32::from_be(*a);
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
            let w = a;
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
/// fits one (inline: at most three array loads, and a call is dear where the kernel's return
/// thunk guards every return), else the trie, out of line with the address passed by value:
/// inlined, LLVM hoists the trie keys' set-up into the common path, which a small catalogue
/// never needs, and the trie walk is a kernel call anyway.
#[inline(always)]
pub(crate) fn large_bits(active: u32, addr: &Addr) -> u64 {
    match addr {
        Addr::V4(a) => {
            if let Some(t) = SMALL_V4.get(active)
                && t.stride != 0
                && let Some(bits) = stride_v4(active, u32::from_be(*a))
            {
                return bits;
            }
            trie_v4(active, *a)
        }
        Addr::V6(a) => trie_v6(active, a[0], a[1]),
    }
}

#[inline(never)]
fn trie_v4(active: u32, a: u32) -> u64 {
    // The key as words: prefix length, the buffer byte (and its padding), the address.
    trie_get(&SETS_V4, [layout::lpm_prefix_len(32), active, a])
}

#[inline(never)]
fn trie_v6(active: u32, w0: u64, w1: u64) -> u64 {
    // Each u64 word holds two u32 words of the address, the first in its low half.
    trie_get(
        &SETS_V6,
        [
            layout::lpm_prefix_len(128),
            active,
            w0 as u32,
            (w0 >> 32) as u32,
            w1 as u32,
            (w1 >> 32) as u32,
        ],
    )
}

/// A trie lookup with the key written as `N` u32 words (`Key<K>`'s layout: prefix length, then
/// `K`). Each word is stored on its own: LLVM would merge neighbours into 8-byte stores at
/// 4-byte offsets, a misaligned stack access the verifier refuses.
#[inline(always)]
fn trie_get<K, const N: usize>(trie: &LpmTrie<K, u64>, words: [u32; N]) -> u64 {
    const { assert!(core::mem::size_of::<Key<K>>() == N * 4) };
    let mut key = Aligned([0u32; N]);
    for (i, w) in words.iter().enumerate() {
        unsafe { core::ptr::write_volatile(&mut key.0[i], *w) };
    }
    let key = unsafe { &*(key.0.as_ptr() as *const Key<K>) };
    match trie.get(key) {
        Some(bits) => *bits,
        None => 0,
    }
}

/// A key built on the stack with word stores must sit at a word-aligned offset: the verifier
/// refuses misaligned stack access.
#[repr(C, align(8))]
struct Aligned<T>(T);

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
