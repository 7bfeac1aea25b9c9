//! Packet captures in and out: pcap or pcapng (detected by magic number) read into frames, and
//! frames written as pcap.

use std::{fs::File, io::Read as _, path::Path, time::Duration};

use pcap_file::{
    pcap::{PcapPacket, PcapReader, PcapWriter},
    pcapng::{Block, PcapNgReader},
};

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("{path}: {what}: {source}")]
    Io {
        path: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {what}: {source}")]
    Format {
        path: String,
        what: &'static str,
        #[source]
        source: pcap_file::PcapError,
    },
    #[error("{path}: link type {linktype}; only Ethernet captures can be replayed")]
    LinkType { path: String, linktype: String },
}

fn io(path: &Path, what: &'static str) -> impl FnOnce(std::io::Error) -> CaptureError {
    let path = path.display().to_string();
    move |source| CaptureError::Io { path, what, source }
}

fn format(path: &Path, what: &'static str) -> impl FnOnce(pcap_file::PcapError) -> CaptureError {
    let path = path.display().to_string();
    move |source| CaptureError::Format { path, what, source }
}

/// The link-layer frames of a capture, in order. Only Ethernet captures make sense to the
/// classifier; pcapng interfaces of another link type are refused.
pub fn read_frames(path: &Path) -> Result<Vec<Vec<u8>>, CaptureError> {
    let mut magic = [0u8; 4];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .map_err(io(path, "reading"))?;
    let file = File::open(path).map_err(io(path, "opening"))?;
    let link = |linktype: pcap_file::DataLink| CaptureError::LinkType {
        path: path.display().to_string(),
        linktype: format!("{linktype:?}"),
    };
    let mut frames = Vec::new();
    if magic == [0x0a, 0x0d, 0x0d, 0x0a] {
        let mut r = PcapNgReader::new(file).map_err(format(path, "not a pcapng file"))?;
        while let Some(block) = r.next_block() {
            match block.map_err(format(path, "bad pcapng block"))? {
                Block::InterfaceDescription(i) if i.linktype != pcap_file::DataLink::ETHERNET => {
                    return Err(link(i.linktype));
                }
                Block::EnhancedPacket(p) => frames.push(p.data.into_owned()),
                Block::SimplePacket(p) => frames.push(p.data.into_owned()),
                Block::Packet(p) => frames.push(p.data.into_owned()),
                _ => {}
            }
        }
    } else {
        let mut r = PcapReader::new(file).map_err(format(path, "not a pcap file"))?;
        if r.header().datalink != pcap_file::DataLink::ETHERNET {
            return Err(link(r.header().datalink));
        }
        while let Some(p) = r.next_packet() {
            let p = p.map_err(format(path, "bad pcap record"))?;
            frames.push(p.data.into_owned());
        }
    }
    Ok(frames)
}

/// Writes `frames` as an Ethernet pcap, a millisecond apart.
pub fn write_pcap<'a>(
    path: &Path,
    frames: impl IntoIterator<Item = &'a [u8]>,
) -> Result<(), CaptureError> {
    let file = File::create(path).map_err(io(path, "creating"))?;
    let mut w = PcapWriter::new(file).map_err(format(path, "writing the header"))?;
    for (i, f) in frames.into_iter().enumerate() {
        w.write_packet(&PcapPacket::new(
            Duration::from_millis(i as u64),
            f.len() as u32,
            f,
        ))
        .map_err(format(path, "writing a record"))?;
    }
    Ok(())
}
