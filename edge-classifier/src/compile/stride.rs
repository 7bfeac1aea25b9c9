//! The IPv4 stride table (16-8-8) a catalogue compiles to when its IPv4 prefixes are too many to
//! scan: every address resolves in at most three array loads, so the cost of a lookup does not
//! grow with the number of prefixes the way a trie walk does. The layout is described with
//! [`edge_classifier_common::STRIDE_TOP`].

use std::collections::HashMap;

use edge_classifier_common::{
    STRIDE_BLOCK, STRIDE_BLOCKS, STRIDE_LEAVES, STRIDE_SPAN, STRIDE_TOP, StrideBlock,
};
use ipnet::{IpNet, Ipv4Net};

/// One buffer's stride table, with block and leaf indexes relative to the buffer's region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stride4 {
    /// `STRIDE_TOP` entries.
    pub top: Vec<u32>,
    pub blocks: Vec<StrideBlock>,
    /// Set bits by leaf; leaf 0 is "no prefix matches" (bits 0).
    pub leaves: Vec<u64>,
}

impl Stride4 {
    /// Builds the table for `prefixes` (each carrying the bits of every prefix containing it, as
    /// an LPM lookup would return them), or `None` when it needs more blocks or leaves than a
    /// buffer has.
    pub fn build(prefixes: &[(IpNet, u64)]) -> Option<Stride4> {
        let mut v4: Vec<(Ipv4Net, u64)> = prefixes
            .iter()
            .filter_map(|(n, bits)| match n {
                IpNet::V4(n) => Some((n.trunc(), *bits)),
                IpNet::V6(_) => None,
            })
            .collect();
        // Shorter prefixes first: a longer one then overwrites the part of them it covers, which
        // is the longest-prefix match.
        v4.sort_by_key(|(n, _)| n.prefix_len());
        let mut t = Stride4 {
            top: vec![0; STRIDE_TOP as usize],
            blocks: Vec::new(),
            leaves: vec![0],
        };
        let mut leaf_of: HashMap<u64, u32> = HashMap::from([(0, 0)]);
        for (net, bits) in v4 {
            let leaf = match leaf_of.get(&bits) {
                Some(l) => *l,
                None => {
                    let l = t.leaves.len() as u32;
                    if l >= STRIDE_LEAVES {
                        return None;
                    }
                    t.leaves.push(bits);
                    leaf_of.insert(bits, l);
                    l
                }
            };
            let addr = u32::from(net.network());
            let len = net.prefix_len();
            if len <= 16 {
                let first = (addr >> 16) as usize;
                let count = 1usize << (16 - len);
                t.top[first..first + count].fill(leaf);
                continue;
            }
            let hi = (addr >> 16) as usize;
            let b2 = t.block_under(Slot::Top(hi))?;
            let mid = ((addr >> 8) & 0xff) as usize;
            if len <= 24 {
                let count = 1usize << (24 - len);
                t.blocks[b2].entries[mid..mid + count].fill(leaf);
                continue;
            }
            let b3 = t.block_under(Slot::Block(b2, mid))?;
            let low = (addr & 0xff) as usize;
            let count = 1usize << (32 - len);
            t.blocks[b3].entries[low..low + count].fill(leaf);
        }
        Some(t)
    }

    /// The block an entry points to, made (holding the entry's leaf everywhere) if the entry is
    /// still a leaf. `None` when the buffer's blocks are used up.
    fn block_under(&mut self, slot: Slot) -> Option<usize> {
        let entry = match slot {
            Slot::Top(i) => self.top[i],
            Slot::Block(b, i) => self.blocks[b].entries[i],
        };
        if entry & STRIDE_BLOCK != 0 {
            return Some((entry & !STRIDE_BLOCK) as usize);
        }
        let index = self.blocks.len();
        if index >= STRIDE_BLOCKS as usize {
            return None;
        }
        self.blocks.push(StrideBlock {
            entries: [entry; STRIDE_SPAN],
        });
        let pointer = index as u32 | STRIDE_BLOCK;
        match slot {
            Slot::Top(i) => self.top[i] = pointer,
            Slot::Block(b, i) => self.blocks[b].entries[i] = pointer,
        }
        Some(index)
    }

    /// The set bits of `addr`, walked the way the program walks the maps.
    pub fn lookup(&self, addr: std::net::Ipv4Addr) -> u64 {
        let a = u32::from(addr);
        let mut e = self.top[(a >> 16) as usize];
        for shift in [8, 0] {
            if e & STRIDE_BLOCK == 0 {
                break;
            }
            e = self.blocks[(e & !STRIDE_BLOCK) as usize].entries[((a >> shift) & 0xff) as usize];
        }
        self.leaves[e as usize]
    }
}

enum Slot {
    Top(usize),
    Block(usize, usize),
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("prefix")
    }

    /// Longest-prefix match by brute force.
    fn lpm(prefixes: &[(IpNet, u64)], a: Ipv4Addr) -> u64 {
        prefixes
            .iter()
            .filter(|(n, _)| n.contains(&std::net::IpAddr::from(a)))
            .max_by_key(|(n, _)| n.prefix_len())
            .map_or(0, |(_, b)| *b)
    }

    #[test]
    fn every_prefix_length_and_nesting_resolves_to_the_longest_match() {
        // Nested at every level of the table, and across its 16- and 24-bit boundaries.
        let prefixes = vec![
            (net("0.0.0.0/0"), 1),
            (net("10.0.0.0/8"), 1 | 2),
            (net("10.1.0.0/16"), 1 | 2 | 4),
            (net("10.1.2.0/23"), 1 | 2 | 4 | 8),
            (net("10.1.2.0/24"), 1 | 2 | 4 | 8 | 16),
            (net("10.1.2.128/25"), 1 | 2 | 4 | 8 | 16 | 32),
            (net("10.1.2.130/32"), 1 | 2 | 4 | 8 | 16 | 32 | 64),
            (net("10.1.3.7/32"), 1 | 2 | 4 | 8 | 128),
            (net("10.2.0.0/15"), 1 | 2 | 256),
            (net("192.168.0.0/17"), 1 | 512),
            (net("255.255.255.255/32"), 1 | 1024),
        ];
        let t = Stride4::build(&prefixes).expect("fits");
        let probes = [
            "0.0.0.0",
            "9.255.255.255",
            "10.0.0.1",
            "10.1.0.0",
            "10.1.1.255",
            "10.1.2.0",
            "10.1.2.127",
            "10.1.2.128",
            "10.1.2.129",
            "10.1.2.130",
            "10.1.2.131",
            "10.1.3.6",
            "10.1.3.7",
            "10.1.3.8",
            "10.2.0.0",
            "10.3.255.255",
            "10.4.0.0",
            "192.168.127.255",
            "192.168.128.0",
            "255.255.255.254",
            "255.255.255.255",
        ];
        for p in probes {
            let a: Ipv4Addr = p.parse().unwrap();
            assert_eq!(t.lookup(a), lpm(&prefixes, a), "{p}");
        }
        // A pseudo-random sweep as well.
        let mut x = 0x1234_5678u32;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            // Half the probes land in 10.0.0.0/8, where the prefixes nest.
            let a = Ipv4Addr::from((x & 0x0f0f_ffff) | (0x0a00_0000 * (x & 1)));
            assert_eq!(t.lookup(a), lpm(&prefixes, a), "{a}");
        }
    }

    #[test]
    fn too_many_blocks_or_leaves_fall_back() {
        // /32s in distinct /16s: two blocks each.
        let many: Vec<(IpNet, u64)> = (0..(STRIDE_BLOCKS / 2 + 1))
            .map(|i| (IpNet::new(Ipv4Addr::from(i << 16).into(), 32).unwrap(), 1))
            .collect();
        assert!(Stride4::build(&many).is_none());
        let distinct: Vec<(IpNet, u64)> = (0..STRIDE_LEAVES)
            .map(|i| {
                (
                    IpNet::new(Ipv4Addr::from(i << 8).into(), 24).unwrap(),
                    i as u64 + 1,
                )
            })
            .collect();
        assert!(Stride4::build(&distinct).is_none());
        assert!(Stride4::build(&distinct[..STRIDE_LEAVES as usize - 1]).is_some());
    }
}
