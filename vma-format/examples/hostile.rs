//! Writes hostile archives and cluster streams: small inputs whose headers
//! claim huge devices, naming clusters far apart (issue 8). For the memory
//! tests and `benches/memory.sh`.
//!
//! ```text
//! hostile archive DEVICES STRIDE_LOG COUNT   > a.vma
//! hostile archive-worst MEGABYTES            > a.vma
//! hostile stream DEVICES STRIDE_LOG COUNT    > s.stream
//! hostile stream-worst MEGABYTES             > s.stream
//! ```
//!
//! `archive`/`stream`: DEVICES devices of 2^48 bytes (2^32 clusters), each
//! with COUNT empty clusters, one every 2^STRIDE_LOG clusters, the devices
//! interleaved. The `-worst` kinds fill about MEGABYTES with as many lone
//! clusters as fit (59 per 512-byte extent header; 16 bytes per stream
//! record), spread evenly over 254 devices so that each costs a tracker as
//! much as it can, in a scrambled order. The archive has no end: every reader
//! must refuse it (clusters missing), after reading it all.

use std::io::{self, BufWriter, Write};

use vma_format::extent::ExtentHeader;
use vma_format::stream::{StreamDevice, StreamWriter};
use vma_format::{
    BlockInfo, BlockMask, Cluster, HeaderBuilder, EXTENT_HEADER_SIZE, EXTENT_SLOTS, MAX_DEVICES,
    MAX_DEVICE_SIZE,
};

const UUID: [u8; 16] = *b"hostile-archive!";

/// The clusters to name, as (device id, cluster number), in order.
pub fn lone(devices: u64, stride_log: u32, count: u64) -> impl Iterator<Item = (u8, u32)> {
    (0..count).flat_map(move |i| (0..devices).map(move |d| (d as u8 + 1, (i << stride_log) as u32)))
}

/// `total` lone clusters over 254 devices, each device's spread evenly over
/// its 2^32 clusters, visited in a scrambled order (a bit-reversal of the
/// index), the devices interleaved.
pub fn worst(total: u64) -> impl Iterator<Item = (u8, u32)> {
    let devices = MAX_DEVICES as u64;
    let per = total.div_ceil(devices).next_power_of_two();
    let bits = per.trailing_zeros();
    let gap = (1u64 << 32) / per;
    (0..per)
        .flat_map(move |i| {
            let j = if bits == 0 {
                0
            } else {
                i.reverse_bits() >> (64 - bits)
            };
            (0..devices).map(move |d| (d as u8 + 1, (j * gap + d % gap.max(1)) as u32))
        })
        .take(total as usize)
}

/// Writes an archive of `devices` devices holding `clusters` (device, cluster)
/// as empty clusters, every device as large as the format allows.
pub fn write_archive(
    out: &mut impl Write,
    devices: u64,
    clusters: impl Iterator<Item = (u8, u32)>,
) -> io::Result<()> {
    let mut h = HeaderBuilder::new(UUID, 0);
    for d in 0..devices {
        h.add_device(&format!("drive-scsi{d}"), MAX_DEVICE_SIZE)
            .expect("device");
    }
    out.write_all(&h.encode().expect("header"))?;
    let mut slots = Vec::with_capacity(EXTENT_SLOTS);
    let mut raw = [0u8; EXTENT_HEADER_SIZE];
    let mut flush = |slots: &mut Vec<BlockInfo>, out: &mut dyn Write| -> io::Result<()> {
        ExtentHeader::encode(&UUID, 0, slots, &mut raw);
        slots.clear();
        out.write_all(&raw)
    };
    for (dev_id, cluster_num) in clusters {
        slots.push(BlockInfo {
            mask: BlockMask::EMPTY,
            reserved: 0,
            dev_id,
            cluster_num,
        });
        if slots.len() == EXTENT_SLOTS {
            flush(&mut slots, out)?;
        }
    }
    if !slots.is_empty() {
        flush(&mut slots, out)?;
    }
    Ok(())
}

/// Writes a cluster stream of `devices` devices holding `clusters` as empty
/// cluster records.
pub fn write_stream(
    out: &mut impl Write,
    devices: u64,
    clusters: impl Iterator<Item = (u8, u32)>,
) -> io::Result<()> {
    let devs: Vec<StreamDevice> = (0..devices)
        .map(|d| StreamDevice::new(format!("drive-scsi{d}"), MAX_DEVICE_SIZE))
        .collect();
    let mut w = StreamWriter::new(Vec::new(), 0, &devs).map_err(io::Error::other)?;
    for (dev_id, cluster_num) in clusters {
        let c = Cluster {
            dev_id,
            cluster_num,
            mask: BlockMask::EMPTY,
            data: &[],
        };
        w.write_cluster(&c).map_err(io::Error::other)?;
    }
    let mut bytes = w.finish().map_err(io::Error::other)?;
    // Without its end record: cut short, as a hostile producer may.
    bytes.truncate(bytes.len() - (12 + 8 * devices as usize + 4));
    out.write_all(&bytes)
}

fn main() -> io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize| -> u64 {
        args.get(i).and_then(|a| a.parse().ok()).unwrap_or_else(|| {
            eprintln!("usage: hostile archive|stream DEVICES STRIDE_LOG COUNT | archive-worst|stream-worst MEGABYTES");
            std::process::exit(2)
        })
    };
    let stdout = io::stdout();
    let mut out = BufWriter::with_capacity(1 << 20, stdout.lock());
    match args.first().map(String::as_str) {
        Some("archive") => write_archive(&mut out, num(1), lone(num(1), num(2) as u32, num(3)))?,
        Some("stream") => write_stream(&mut out, num(1), lone(num(1), num(2) as u32, num(3)))?,
        Some("archive-worst") => {
            let extents = num(1) * 1_000_000 / EXTENT_HEADER_SIZE as u64;
            write_archive(
                &mut out,
                MAX_DEVICES as u64,
                worst(extents * EXTENT_SLOTS as u64),
            )?
        }
        Some("stream-worst") => {
            let records = num(1) * 1_000_000 / 16;
            write_stream(&mut out, MAX_DEVICES as u64, worst(records))?
        }
        _ => {
            num(usize::MAX);
        }
    }
    out.flush()
}
