//! Packet captures in and out: pcap or pcapng (detected by magic number) read into frames with
//! their capture time and length on the wire, and frames written as pcap.

use std::{fs::File, io::Read as _, ops::Deref, path::Path, time::Duration};

use pcap_file::{
    TsResolution,
    pcap::{PcapHeader, PcapPacket, PcapReader, PcapWriter},
    pcapng::{
        Block, PcapNgReader,
        blocks::interface_description::{InterfaceDescriptionBlock, InterfaceDescriptionOption},
    },
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
    #[error(
        "{path}: a packet names interface {id}, which no interface block of its section describes"
    )]
    UnknownInterface { path: String, id: u32 },
}

fn io(path: &Path, what: &'static str) -> impl FnOnce(std::io::Error) -> CaptureError {
    let path = path.display().to_string();
    move |source| CaptureError::Io { path, what, source }
}

fn format(path: &Path, what: &'static str) -> impl FnOnce(pcap_file::PcapError) -> CaptureError {
    let path = path.display().to_string();
    move |source| CaptureError::Format { path, what, source }
}

/// One frame of a capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The bytes captured, from the Ethernet header on.
    pub data: Vec<u8>,
    /// When it was captured, since the Unix epoch (zero for a pcapng Simple Packet Block, which
    /// carries no time).
    pub time: Duration,
    /// Its length on the wire: more than `data.len()` when the capture cut it short (snaplen).
    pub orig_len: u32,
}

/// A frame reads as its bytes: the classifier and most callers want nothing else.
impl Deref for Frame {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.data
    }
}

/// How a pcapng interface counts time: ticks of `if_tsresol` (microseconds when the option is
/// absent), plus `if_tsoffset` seconds.
struct Clock {
    resolution: u8,
    offset_secs: i64,
}

impl Clock {
    fn of(interface: &InterfaceDescriptionBlock) -> Clock {
        let mut clock = Clock {
            resolution: 6,
            offset_secs: 0,
        };
        for option in &interface.options {
            match option {
                InterfaceDescriptionOption::IfTsResol(r) => clock.resolution = *r,
                // A signed number of seconds on the wire; pcap-file hands over its bits.
                InterfaceDescriptionOption::IfTsOffset(o) => clock.offset_secs = *o as i64,
                _ => {}
            }
        }
        clock
    }

    /// The time of `ticks`: with the top bit of `if_tsresol` clear a tick is 10^-n seconds,
    /// with it set 2^-n (pcapng, section "if_tsresol").
    fn time(&self, ticks: u64) -> Duration {
        let ticks = u128::from(ticks);
        let n = u32::from(self.resolution & 0x7f);
        let nanos = if self.resolution & 0x80 != 0 {
            (ticks * 1_000_000_000) >> n
        } else if n <= 9 {
            ticks * 10u128.pow(9 - n)
        } else {
            // Finer than a nanosecond: 10^(n-9) ticks a nanosecond, if that fits at all.
            10u128.checked_pow(n - 9).map_or(0, |d| ticks / d)
        };
        let nanos = nanos as i128 + i128::from(self.offset_secs) * 1_000_000_000;
        Duration::from_nanos(u64::try_from(nanos.max(0)).unwrap_or(u64::MAX))
    }
}

/// The link-layer frames of a capture, in order, each with its capture time and length on the
/// wire. Only Ethernet captures make sense to the classifier; pcapng interfaces of another link
/// type are refused.
pub fn read_frames(path: &Path) -> Result<Vec<Frame>, CaptureError> {
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
        // The clocks of the current section's interfaces, by interface id: a new section
        // describes its interfaces afresh.
        let mut clocks: Vec<Clock> = Vec::new();
        let clock = |clocks: &[Clock], id: u32, ticks: u64| {
            clocks
                .get(id as usize)
                .map(|c| c.time(ticks))
                .ok_or_else(|| CaptureError::UnknownInterface {
                    path: path.display().to_string(),
                    id,
                })
        };
        while let Some(block) = r.next_block() {
            match block.map_err(format(path, "bad pcapng block"))? {
                Block::SectionHeader(_) => clocks.clear(),
                Block::InterfaceDescription(i) => {
                    if i.linktype != pcap_file::DataLink::ETHERNET {
                        return Err(link(i.linktype));
                    }
                    clocks.push(Clock::of(&i));
                }
                Block::EnhancedPacket(p) => frames.push(Frame {
                    // pcap-file hands over the raw tick count as a Duration of that many
                    // nanoseconds, whatever the interface's resolution.
                    time: clock(
                        &clocks,
                        p.interface_id,
                        u64::try_from(p.timestamp.as_nanos()).unwrap_or(u64::MAX),
                    )?,
                    orig_len: p.original_len,
                    data: p.data.into_owned(),
                }),
                Block::Packet(p) => frames.push(Frame {
                    time: clock(&clocks, u32::from(p.interface_id), p.timestamp)?,
                    orig_len: p.original_len,
                    data: p.data.into_owned(),
                }),
                Block::SimplePacket(p) => frames.push(Frame {
                    time: Duration::ZERO,
                    orig_len: p.original_len,
                    data: p.data.into_owned(),
                }),
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
            frames.push(Frame {
                time: p.timestamp,
                orig_len: p.orig_len,
                data: p.data.into_owned(),
            });
        }
    }
    Ok(frames)
}

/// Writes `frames` as an Ethernet pcap with their own times and lengths on the wire. The classic
/// microsecond format, which every tool reads, unless a time has finer digits (a pcapng capture
/// often has nanoseconds): then the nanosecond variant, so that no time changes.
pub fn write_frames<'a>(
    path: &Path,
    frames: impl IntoIterator<Item = &'a Frame>,
) -> Result<(), CaptureError> {
    let frames: Vec<&Frame> = frames.into_iter().collect();
    let ts_resolution = if frames.iter().all(|f| f.time.subsec_nanos() % 1000 == 0) {
        TsResolution::MicroSecond
    } else {
        TsResolution::NanoSecond
    };
    // A frame longer than the snapshot length is an error to the writer (and to readers).
    let snaplen = frames
        .iter()
        .map(|f| f.data.len() as u32)
        .fold(65535, u32::max);
    let file = File::create(path).map_err(io(path, "creating"))?;
    let mut w = PcapWriter::with_header(
        file,
        PcapHeader {
            snaplen,
            ts_resolution,
            ..PcapHeader::default()
        },
    )
    .map_err(format(path, "writing the header"))?;
    for f in frames {
        w.write_packet(&PcapPacket::new(
            f.time,
            // A record claiming fewer bytes on the wire than it holds is refused by readers.
            f.orig_len.max(f.data.len() as u32),
            &f.data,
        ))
        .map_err(format(path, "writing a record"))?;
    }
    Ok(())
}

/// Writes `frames` (made up, with no time of their own) as an Ethernet pcap, a millisecond
/// apart from the epoch.
pub fn write_pcap<'a>(
    path: &Path,
    frames: impl IntoIterator<Item = &'a [u8]>,
) -> Result<(), CaptureError> {
    let frames: Vec<Frame> = frames
        .into_iter()
        .enumerate()
        .map(|(i, f)| Frame {
            data: f.to_vec(),
            time: Duration::from_millis(i as u64),
            orig_len: f.len() as u32,
        })
        .collect();
    write_frames(path, &frames)
}

#[cfg(test)]
mod tests {
    use pcap_file::{
        DataLink, Endianness,
        pcapng::{PcapNgWriter, blocks::enhanced_packet::EnhancedPacketBlock},
    };

    use super::*;

    fn temp(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("ec-capture-{}-{name}", std::process::id()))
    }

    fn interface(
        options: Vec<InterfaceDescriptionOption<'static>>,
    ) -> InterfaceDescriptionBlock<'static> {
        InterfaceDescriptionBlock {
            options,
            ..InterfaceDescriptionBlock::new(DataLink::ETHERNET, 65535)
        }
    }

    /// An Enhanced Packet Block of `ticks` on `interface` (pcap-file writes a Duration's
    /// nanoseconds as the raw tick count).
    fn packet(interface_id: u32, ticks: u64, original_len: u32) -> EnhancedPacketBlock<'static> {
        EnhancedPacketBlock {
            interface_id,
            timestamp: Duration::from_nanos(ticks),
            original_len,
            data: vec![0xab; 60].into(),
            options: Vec::new(),
        }
    }

    #[test]
    fn pcapng_times_follow_each_interfaces_resolution_and_offset() {
        let path = temp("resolutions.pcapng");
        let mut w = PcapNgWriter::new(File::create(&path).unwrap()).unwrap();
        // Microseconds (no option), nanoseconds, 2^-10 s, microseconds 1000 s on.
        for options in [
            vec![],
            vec![InterfaceDescriptionOption::IfTsResol(9)],
            vec![InterfaceDescriptionOption::IfTsResol(0x80 | 10)],
            vec![InterfaceDescriptionOption::IfTsOffset(1000)],
        ] {
            w.write_pcapng_block(interface(options)).unwrap();
        }
        for p in [
            packet(0, 1_700_000_000_123_456, 60),
            packet(1, 1_700_000_000_123_456_789, 1514),
            packet(2, 1_700_000_000 * 1024 + 512, 60),
            packet(3, 5_000_000, 60),
        ] {
            w.write_pcapng_block(p).unwrap();
        }
        drop(w);
        let frames = read_frames(&path).unwrap();
        let times: Vec<Duration> = frames.iter().map(|f| f.time).collect();
        assert_eq!(
            times,
            [
                Duration::new(1_700_000_000, 123_456_000),
                Duration::new(1_700_000_000, 123_456_789),
                Duration::new(1_700_000_000, 500_000_000),
                Duration::from_secs(1005),
            ]
        );
        assert_eq!(frames[1].orig_len, 1514, "length on the wire kept");
        assert_eq!(frames[1].data, vec![0xab; 60]);

        // A packet of an interface no block described (pcap-file will not write one: the
        // interface id is patched in, 8 bytes into the block).
        let mut w = PcapNgWriter::with_endianness(Vec::new(), Endianness::Big).unwrap();
        w.write_pcapng_block(interface(vec![])).unwrap();
        let at = w.get_ref().len() + 8;
        w.write_pcapng_block(packet(0, 0, 60)).unwrap();
        let mut bytes = w.into_inner();
        bytes[at..at + 4].copy_from_slice(&1u32.to_be_bytes());
        std::fs::write(&path, bytes).unwrap();
        assert!(matches!(
            read_frames(&path),
            Err(CaptureError::UnknownInterface { id: 1, .. })
        ));
        std::fs::remove_file(&path).ok();
    }

    #[test]
    fn written_pcaps_keep_times_and_lengths() {
        let path = temp("written.pcap");
        let frame = |time: Duration, orig_len: u32| Frame {
            data: vec![0xcd; 60],
            time,
            orig_len,
        };
        // Whole microseconds: the classic format; finer: the nanosecond one.
        for (frames, resolution) in [
            (
                vec![
                    frame(Duration::new(1_700_000_000, 1_000), 60),
                    frame(Duration::new(1_700_000_001, 999_999_000), 9000),
                ],
                TsResolution::MicroSecond,
            ),
            (
                vec![
                    frame(Duration::new(1_700_000_000, 1_000), 60),
                    frame(Duration::new(1_700_000_000, 1_001), 60),
                ],
                TsResolution::NanoSecond,
            ),
        ] {
            write_frames(&path, &frames).unwrap();
            let r = PcapReader::new(File::open(&path).unwrap()).unwrap();
            assert_eq!(r.header().ts_resolution, resolution);
            assert_eq!(read_frames(&path).unwrap(), frames);
        }
        std::fs::remove_file(&path).ok();
    }
}
