//! Packet captures in and out: pcap or pcapng (detected by magic number) read into frames, and
//! frames written as pcap.

use std::{fs::File, io::Read as _, path::Path, time::Duration};

use anyhow::{Context as _, bail};
use pcap_file::{
    pcap::{PcapPacket, PcapReader, PcapWriter},
    pcapng::{Block, PcapNgReader},
};

/// The link-layer frames of a capture, in order. Only Ethernet captures make sense to the
/// classifier; pcapng interfaces of another link type are refused.
pub fn read_frames(path: &Path) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut magic = [0u8; 4];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .with_context(|| format!("reading {}", path.display()))?;
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut frames = Vec::new();
    if magic == [0x0a, 0x0d, 0x0d, 0x0a] {
        let mut r = PcapNgReader::new(file)
            .with_context(|| format!("{}: not a pcapng file", path.display()))?;
        while let Some(block) = r.next_block() {
            match block.with_context(|| format!("{}: bad pcapng block", path.display()))? {
                Block::InterfaceDescription(i) if i.linktype != pcap_file::DataLink::ETHERNET => {
                    bail!(
                        "{}: interface of link type {:?}; only Ethernet captures can be replayed",
                        path.display(),
                        i.linktype
                    )
                }
                Block::EnhancedPacket(p) => frames.push(p.data.into_owned()),
                Block::SimplePacket(p) => frames.push(p.data.into_owned()),
                Block::Packet(p) => frames.push(p.data.into_owned()),
                _ => {}
            }
        }
    } else {
        let mut r = PcapReader::new(file)
            .with_context(|| format!("{}: not a pcap file", path.display()))?;
        if r.header().datalink != pcap_file::DataLink::ETHERNET {
            bail!(
                "{}: link type {:?}; only Ethernet captures can be replayed",
                path.display(),
                r.header().datalink
            );
        }
        while let Some(p) = r.next_packet() {
            let p = p.with_context(|| format!("{}: bad pcap record", path.display()))?;
            frames.push(p.data.into_owned());
        }
    }
    Ok(frames)
}

/// Writes `frames` as an Ethernet pcap, a millisecond apart.
pub fn write_pcap<'a>(
    path: &Path,
    frames: impl IntoIterator<Item = &'a [u8]>,
) -> anyhow::Result<()> {
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut w = PcapWriter::new(file)?;
    for (i, f) in frames.into_iter().enumerate() {
        w.write_packet(&PcapPacket::new(
            Duration::from_millis(i as u64),
            f.len() as u32,
            f,
        ))?;
    }
    Ok(())
}
