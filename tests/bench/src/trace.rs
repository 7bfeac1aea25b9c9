//! The BPF instructions on one frame's path, counted deterministically.
//!
//! Timings need a quiet host; an instruction count does not. This runs the program's own
//! bytecode (the ELF's instructions, relocated as the loader relocates them) in a small
//! interpreter, with every map lookup answered by the kernel maps of the loaded classifier
//! (`BPF_MAP_LOOKUP_ELEM`), so the branch decisions are those the kernel's run of the same frame
//! takes. Writes the program makes (counters, the reply cache, flow refreshes) go to an overlay
//! and never reach the kernel; running a frame twice therefore gives the steady state that
//! BPF_PROG_TEST_RUN's repeats time (the reply cache hit). The verdict is checked against the
//! kernel's, so a trace that took another path than the kernel cannot pass unnoticed.
//!
//! The count is of the instructions the program was compiled to, a helper call counting one.
//! The verifier's rewrites add a few per map lookup (an array lookup is inlined as about five
//! instructions, a hash lookup as a call and three); those are reported as the lookups made,
//! beside the count, rather than guessed into it.

use std::collections::{BTreeMap, HashMap, HashSet};

use anyhow::{Context, bail};
use aya_obj::{Object, generated::bpf_insn};

/// Where a value points: the tag above bit 40 names the region, the bits below the offset.
const REGION_SHIFT: u32 = 40;
const OFFSET_MASK: u64 = (1 << REGION_SHIFT) - 1;
const STACK_SIZE: usize = 512;
/// Map handles (the `LD_IMM64` of a map) are not addresses: a tag of their own.
const MAP_TAG: u64 = 0xffff_0000_0000_0000;
const CTX: usize = 0;
const PACKET: usize = 1;

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const MAP_PERCPU_HASH: u32 = 5;
const MAP_PERCPU_ARRAY: u32 = 6;
const MAP_LRU_PERCPU_HASH: u32 = 10;

struct MapRef {
    name: String,
    fd: i32,
    map_type: u32,
    key_size: usize,
    value_size: usize,
}

impl MapRef {
    fn percpu(&self) -> bool {
        matches!(
            self.map_type,
            MAP_PERCPU_ARRAY | MAP_PERCPU_HASH | MAP_LRU_PERCPU_HASH
        )
    }

    /// The kernel's value for `key` (CPU 0's of a per-CPU map), through the syscall.
    fn kernel_lookup(&self, key: &[u8]) -> Option<Vec<u8>> {
        let stride = self.value_size.div_ceil(8) * 8;
        let cpus = if self.percpu() { possible_cpus() } else { 1 };
        let mut value = vec![0u8; stride * cpus];
        #[repr(C)]
        struct Attr {
            map_fd: u32,
            _pad: u32,
            key: u64,
            value: u64,
            flags: u64,
        }
        let attr = Attr {
            map_fd: self.fd as u32,
            _pad: 0,
            key: key.as_ptr() as u64,
            value: value.as_mut_ptr() as u64,
            flags: 0,
        };
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_ELEM,
                &attr as *const Attr,
                std::mem::size_of::<Attr>(),
            )
        };
        (r == 0).then(|| value[..self.value_size].to_vec())
    }
}

fn possible_cpus() -> usize {
    // "0-1" or "0": the kernel sizes per-CPU values by possible CPUs.
    let s = std::fs::read_to_string("/sys/devices/system/cpu/possible").unwrap_or_default();
    s.trim()
        .rsplit(['-', ','])
        .next()
        .and_then(|n| n.parse::<usize>().ok())
        .map_or(1, |n| n + 1)
}

/// One frame's path: its verdict, the instructions run and the lookups made per map.
#[derive(Debug, Clone)]
pub struct Trace {
    pub verdict: u32,
    pub insns: u64,
    pub lookups: BTreeMap<String, u64>,
}

impl Trace {
    /// The map lookups made, in all.
    pub fn lookups_total(&self) -> u64 {
        self.lookups.values().sum()
    }
}

pub struct Tracer {
    insns: Vec<bpf_insn>,
    maps: Vec<MapRef>,
    /// (map, key) → the region holding the value the program sees, `None` once deleted.
    overlay: HashMap<(usize, Vec<u8>), Option<usize>>,
    regions: Vec<Vec<u8>>,
    jiffies: u64,
}

impl Tracer {
    /// The program `name` of `object`, its maps resolved by name among `map_ids` (the loaded
    /// program's maps).
    pub fn new(object: &[u8], name: &str, map_ids: &[u32]) -> anyhow::Result<Tracer> {
        let mut obj = Object::parse(object).context("parse the BPF object")?;
        let mut kernel = HashMap::new();
        for id in map_ids {
            let data = aya::maps::MapData::from_id(*id).context("map by id")?;
            let info = data.info().context("map info")?;
            let n = info.name_as_str().unwrap_or_default().to_string();
            kernel.insert(n, data);
        }
        let mut maps = Vec::new();
        let mut handles = Vec::new();
        for (mname, m) in &obj.maps {
            // The kernel keeps 15 bytes of a map's name.
            let short: String = mname.chars().take(15).collect();
            let fd = match kernel.get(&short) {
                Some(d) => {
                    use std::os::fd::{AsFd, AsRawFd};
                    d.fd().as_fd().as_raw_fd()
                }
                None => -1,
            };
            handles.push((mname.clone(), maps.len() as i32, m.clone()));
            maps.push(MapRef {
                name: mname.clone(),
                fd,
                map_type: m.map_type(),
                key_size: m.key_size() as usize,
                value_size: m.value_size() as usize,
            });
        }
        // Relocate with each map's index in place of its fd: an LD_IMM64 of a map then names
        // the entry of `maps`.
        let text: HashSet<usize> = obj.functions.keys().map(|(s, _)| *s).collect();
        obj.relocate_maps(handles.iter().map(|(n, i, m)| (n.as_str(), *i, m)), &text)
            .context("relocate maps")?;
        obj.relocate_calls(&text).context("relocate calls")?;
        let key = obj
            .programs
            .get(name)
            .with_context(|| format!("no program {name}"))?
            .function_key();
        let insns = obj.functions[&key].instructions.clone();
        // The kernel maps must outlive the fds taken from them.
        std::mem::forget(kernel);
        Ok(Tracer {
            insns,
            maps,
            overlay: HashMap::new(),
            regions: Vec::new(),
            jiffies: jiffies(),
        })
    }

    /// Runs `frame` as arriving on `ifindex`; writes stay in this tracer's overlay.
    pub fn run(&mut self, frame: &[u8], ifindex: u32) -> anyhow::Result<Trace> {
        let mut ctx = vec![0u8; 24];
        ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
        let keep = self.regions.len();
        // Regions 0 and 1 are this run's context and packet; map values follow and persist.
        if self.regions.len() < 2 {
            self.regions.resize(2, Vec::new());
        }
        self.regions[CTX] = ctx;
        self.regions[PACKET] = frame.to_vec();
        let _ = keep;
        let mut vm = Vm {
            t: self,
            regs: [0; 11],
            frames: Vec::new(),
            stacks: Vec::new(),
            insns: 0,
            lookups: BTreeMap::new(),
        };
        let verdict = vm.exec()?;
        let (insns, lookups) = (vm.insns, vm.lookups);
        // Stacks are per run.
        Ok(Trace {
            verdict,
            insns,
            lookups,
        })
    }

    fn alloc(&mut self, bytes: Vec<u8>) -> usize {
        self.regions.push(bytes);
        self.regions.len() - 1
    }
}

/// The kernel's jiffies now, so that flow ages come out as the kernel's run sees them.
fn jiffies() -> u64 {
    std::fs::read_to_string("/proc/timer_list")
        .ok()
        .and_then(|s| {
            s.lines()
                .filter_map(|l| l.trim().strip_prefix(".last_jiffies"))
                .filter_map(|r| r.trim_start_matches([' ', ':']).trim().parse::<u64>().ok())
                .max()
        })
        .unwrap_or(0)
}

fn addr(region: usize, offset: u64) -> u64 {
    ((region as u64 + 1) << REGION_SHIFT) | offset
}

struct Frame {
    ret: usize,
    saved: [u64; 4],
    fp: u64,
}

struct Vm<'a> {
    t: &'a mut Tracer,
    regs: [u64; 11],
    frames: Vec<Frame>,
    /// Regions of this run's stack frames (freed with the run).
    stacks: Vec<usize>,
    insns: u64,
    lookups: BTreeMap<String, u64>,
}

impl Vm<'_> {
    fn mem(&mut self, a: u64, len: usize) -> anyhow::Result<&mut [u8]> {
        let region = ((a >> REGION_SHIFT) as usize)
            .checked_sub(1)
            .with_context(|| format!("access to non-pointer {a:#x}"))?;
        let off = (a & OFFSET_MASK) as usize;
        let r = self
            .t
            .regions
            .get_mut(region)
            .with_context(|| format!("no region {region}"))?;
        if off + len > r.len() {
            bail!("access {off}+{len} beyond region {region} of {}", r.len());
        }
        Ok(&mut r[off..off + len])
    }

    fn load(&mut self, a: u64, size: usize) -> anyhow::Result<u64> {
        // The context's packet pointers are 32-bit loads the verifier rewrites to pointers.
        if (a >> REGION_SHIFT) as usize == CTX + 1 {
            let off = a & OFFSET_MASK;
            let len = self.t.regions[PACKET].len() as u64;
            match off {
                0 | 8 => return Ok(addr(PACKET, 0)),
                4 => return Ok(addr(PACKET, len)),
                _ => {}
            }
        }
        let b = self.mem(a, size)?;
        let mut v = [0u8; 8];
        v[..size].copy_from_slice(b);
        Ok(u64::from_le_bytes(v))
    }

    fn store(&mut self, a: u64, size: usize, v: u64) -> anyhow::Result<()> {
        self.mem(a, size)?.copy_from_slice(&v.to_le_bytes()[..size]);
        Ok(())
    }

    fn new_stack(&mut self) -> u64 {
        let r = self.t.alloc(vec![0u8; STACK_SIZE]);
        self.stacks.push(r);
        addr(r, STACK_SIZE as u64)
    }

    fn map_of(&self, v: u64) -> anyhow::Result<usize> {
        if v & MAP_TAG != MAP_TAG {
            bail!("helper given {v:#x} for a map");
        }
        Ok((v & !MAP_TAG) as usize)
    }

    /// The region of (map, key) the program sees, from the overlay or the kernel.
    fn value_region(&mut self, m: usize, key: Vec<u8>) -> Option<usize> {
        if let Some(r) = self.t.overlay.get(&(m, key.clone())) {
            return *r;
        }
        let found = self.t.maps[m].kernel_lookup(&key).map(|v| self.t.alloc(v));
        self.t.overlay.insert((m, key), found);
        found
    }

    fn helper(&mut self, id: i32) -> anyhow::Result<u64> {
        let [_, r1, r2, r3, r4, ..] = self.regs;
        Ok(match id {
            // map_lookup_elem
            1 => {
                let m = self.map_of(r1)?;
                let ks = self.t.maps[m].key_size;
                let key = self.mem(r2, ks)?.to_vec();
                *self.lookups.entry(self.t.maps[m].name.clone()).or_default() += 1;
                match self.value_region(m, key) {
                    Some(r) => addr(r, 0),
                    None => 0,
                }
            }
            // map_update_elem
            2 => {
                let m = self.map_of(r1)?;
                let (ks, vs) = (self.t.maps[m].key_size, self.t.maps[m].value_size);
                let key = self.mem(r2, ks)?.to_vec();
                let value = self.mem(r3, vs)?.to_vec();
                let exists = self.value_region(m, key.clone());
                const NOEXIST: u64 = 1;
                const EXIST: u64 = 2;
                if r4 == NOEXIST && exists.is_some() {
                    (-17i64) as u64
                } else if r4 == EXIST && exists.is_none() {
                    (-2i64) as u64
                } else {
                    let r = match exists {
                        Some(r) => {
                            self.t.regions[r] = value;
                            r
                        }
                        None => self.t.alloc(value),
                    };
                    self.t.overlay.insert((m, key), Some(r));
                    0
                }
            }
            // map_delete_elem
            3 => {
                let m = self.map_of(r1)?;
                let ks = self.t.maps[m].key_size;
                let key = self.mem(r2, ks)?.to_vec();
                let existed = self.value_region(m, key.clone()).is_some();
                self.t.overlay.insert((m, key), None);
                if existed { 0 } else { (-2i64) as u64 }
            }
            // ktime_get_ns, ktime_get_coarse_ns, ktime_get_boot_ns: a fixed time.
            5 | 125 | 160 => self.t.jiffies * 4_000_000,
            // get_smp_processor_id: the per-CPU values read are CPU 0's.
            8 => 0,
            // jiffies64
            118 => self.t.jiffies,
            other => bail!("helper {other} is not modelled"),
        })
    }

    fn exec(&mut self) -> anyhow::Result<u32> {
        self.regs = [0; 11];
        self.regs[1] = addr(CTX, 0);
        self.regs[10] = self.new_stack();
        let mut pc = 0usize;
        let n = self.t.insns.len();
        loop {
            if pc >= n {
                bail!("pc {pc} past the program's {n} instructions");
            }
            self.insns += 1;
            if self.insns > 1_000_000 {
                bail!("more than 1,000,000 instructions: a loop the interpreter got wrong");
            }
            let i = self.t.insns[pc];
            let (code, dst, src) = (i.code, i.dst_reg() as usize, i.src_reg() as usize);
            let (off, imm) = (i.off as i64, i.imm as i64);
            let class = code & 7;
            pc += 1;
            match class {
                // LD: only LD_IMM64.
                0 => {
                    if code != 0x18 {
                        bail!("unsupported LD {code:#x}");
                    }
                    let hi = self.t.insns[pc].imm as u32 as u64;
                    pc += 1;
                    self.regs[dst] = match src {
                        0 => (imm as u32 as u64) | (hi << 32),
                        // A map, by the index relocation wrote in place of its fd.
                        1 => MAP_TAG | imm as u32 as u64,
                        // A map's value (global data): the value of key 0, at an offset.
                        2 => {
                            let m = imm as usize;
                            let key = 0u32.to_ne_bytes().to_vec();
                            let r = self
                                .value_region(m, key)
                                .with_context(|| format!("no value in map {m}"))?;
                            addr(r, hi)
                        }
                        s => bail!("LD_IMM64 with src {s}"),
                    };
                }
                // LDX
                1 => {
                    let size = [4, 2, 1, 8][((code >> 3) & 3) as usize];
                    let mode = code & 0xe0;
                    let a = self.regs[src].wrapping_add(off as u64);
                    let v = self.load(a, size)?;
                    self.regs[dst] = if mode == 0x80 {
                        // MEMSX: sign-extend.
                        let sh = 64 - 8 * size as u32;
                        (((v << sh) as i64) >> sh) as u64
                    } else {
                        v
                    };
                }
                // ST, STX
                2 | 3 => {
                    let size = [4, 2, 1, 8][((code >> 3) & 3) as usize];
                    let a = self.regs[dst].wrapping_add(off as u64);
                    if code & 0xe0 == 0xc0 {
                        self.atomic(a, size, src, imm)?;
                    } else {
                        let v = if class == 2 {
                            imm as u64
                        } else {
                            self.regs[src]
                        };
                        self.store(a, size, v)?;
                    }
                }
                4 | 7 => {
                    let x = if code & 8 != 0 {
                        self.regs[src]
                    } else {
                        imm as u64
                    };
                    self.regs[dst] = alu(
                        class == 7,
                        code & 0xf0,
                        code & 8 != 0,
                        off,
                        self.regs[dst],
                        x,
                        imm,
                    )?;
                }
                5 | 6 => {
                    let op = code & 0xf0;
                    match op {
                        0x80 => {
                            if src == 1 {
                                // bpf-to-bpf call
                                let saved =
                                    [self.regs[6], self.regs[7], self.regs[8], self.regs[9]];
                                self.frames.push(Frame {
                                    ret: pc,
                                    saved,
                                    fp: self.regs[10],
                                });
                                self.regs[10] = self.new_stack();
                                pc = (pc as i64 + imm) as usize;
                            } else {
                                self.regs[0] = self.helper(imm as i32)?;
                                for r in 1..=5 {
                                    self.regs[r] = 0xdead_0000 + r as u64;
                                }
                            }
                        }
                        0x90 => match self.frames.pop() {
                            Some(f) => {
                                pc = f.ret;
                                [self.regs[6], self.regs[7], self.regs[8], self.regs[9]] = f.saved;
                                self.regs[10] = f.fp;
                            }
                            None => return Ok(self.regs[0] as u32),
                        },
                        0x00 => {
                            // JA (JMP32 JA takes imm)
                            let d = if class == 6 { imm } else { off };
                            pc = (pc as i64 + d) as usize;
                        }
                        _ => {
                            let y = if code & 8 != 0 {
                                self.regs[src]
                            } else {
                                imm as u64
                            };
                            let x = self.regs[dst];
                            let (x, y) = if class == 6 {
                                (x as u32 as u64, y as u32 as u64)
                            } else {
                                (x, y)
                            };
                            let (sx, sy) = if class == 6 {
                                (x as u32 as i32 as i64, y as u32 as i32 as i64)
                            } else {
                                (x as i64, y as i64)
                            };
                            let taken = match op {
                                0x10 => x == y,
                                0x20 => x > y,
                                0x30 => x >= y,
                                0x40 => x & y != 0,
                                0x50 => x != y,
                                0x60 => sx > sy,
                                0x70 => sx >= sy,
                                0xa0 => x < y,
                                0xb0 => x <= y,
                                0xc0 => sx < sy,
                                0xd0 => sx <= sy,
                                o => bail!("jump op {o:#x}"),
                            };
                            if taken {
                                pc = (pc as i64 + off) as usize;
                            }
                        }
                    }
                }
                c => bail!("class {c}"),
            }
        }
    }

    fn atomic(&mut self, a: u64, size: usize, src: usize, imm: i64) -> anyhow::Result<()> {
        let old = self.load(a, size)?;
        let x = self.regs[src];
        let fetch = imm & 1 != 0;
        let new = match imm & !1 {
            0x00 => old.wrapping_add(x),
            0x40 => old | x,
            0x50 => old & x,
            0xa0 => old ^ x,
            0xe0 => x,
            0xf0 => {
                // cmpxchg: compares with r0, old value to r0.
                let r = if old == self.regs[0] { x } else { old };
                self.regs[0] = old;
                self.store(a, size, r)?;
                return Ok(());
            }
            o => bail!("atomic op {o:#x}"),
        };
        self.store(a, size, new)?;
        if fetch || imm & !1 == 0xe0 {
            self.regs[src] = old;
        }
        Ok(())
    }
}

fn alu(wide: bool, op: u8, reg: bool, off: i64, d: u64, x: u64, imm: i64) -> anyhow::Result<u64> {
    let _ = reg;
    if wide {
        Ok(match op {
            0x00 => d.wrapping_add(x),
            0x10 => d.wrapping_sub(x),
            0x20 => d.wrapping_mul(x),
            0x30 if off == 0 => d.checked_div(x).unwrap_or(0),
            0x30 => (d as i64).checked_div(x as i64).unwrap_or(0) as u64,
            0x40 => d | x,
            0x50 => d & x,
            0x60 => d.wrapping_shl(x as u32 & 63),
            0x70 => d.wrapping_shr(x as u32 & 63),
            0x80 => (d as i64).wrapping_neg() as u64,
            0x90 if off == 0 => d.checked_rem(x).unwrap_or(d),
            0x90 => (d as i64).checked_rem(x as i64).unwrap_or(d as i64) as u64,
            0xa0 => d ^ x,
            0xb0 => match off {
                8 => x as i8 as i64 as u64,
                16 => x as i16 as i64 as u64,
                32 => x as i32 as i64 as u64,
                _ => x,
            },
            0xc0 => ((d as i64) >> (x as u32 & 63)) as u64,
            // bswap
            0xd0 => match imm {
                16 => (d as u16).swap_bytes() as u64,
                32 => (d as u32).swap_bytes() as u64,
                _ => d.swap_bytes(),
            },
            o => bail!("alu64 op {o:#x}"),
        })
    } else {
        let (d32, x32) = (d as u32, x as u32);
        Ok(match op {
            0x00 => d32.wrapping_add(x32) as u64,
            0x10 => d32.wrapping_sub(x32) as u64,
            0x20 => d32.wrapping_mul(x32) as u64,
            0x30 if off == 0 => d32.checked_div(x32).unwrap_or(0) as u64,
            0x30 => (d32 as i32).checked_div(x32 as i32).unwrap_or(0) as u32 as u64,
            0x40 => (d32 | x32) as u64,
            0x50 => (d32 & x32) as u64,
            0x60 => d32.wrapping_shl(x32 & 31) as u64,
            0x70 => d32.wrapping_shr(x32 & 31) as u64,
            0x80 => (d32 as i32).wrapping_neg() as u32 as u64,
            0x90 if off == 0 => d32.checked_rem(x32).unwrap_or(d32) as u64,
            0x90 => (d32 as i32).checked_rem(x32 as i32).unwrap_or(d32 as i32) as u32 as u64,
            0xa0 => (d32 ^ x32) as u64,
            0xb0 => match off {
                8 => x32 as i8 as i32 as u32 as u64,
                16 => x32 as i16 as i32 as u32 as u64,
                _ => x32 as u64,
            },
            0xc0 => ((d32 as i32) >> (x32 & 31)) as u32 as u64,
            // BPF_END: to little endian truncates, to big endian swaps (the host is LE).
            0xd0 => {
                let to_be = reg;
                match (imm, to_be) {
                    (16, false) => d as u16 as u64,
                    (32, false) => d as u32 as u64,
                    (_, false) => d,
                    (16, true) => (d as u16).swap_bytes() as u64,
                    (32, true) => (d as u32).swap_bytes() as u64,
                    (_, true) => d.swap_bytes(),
                }
            }
            o => bail!("alu op {o:#x}"),
        })
    }
}
