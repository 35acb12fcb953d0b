//! Writes the seed corpora of the fuzz targets (`fuzz/`), from the Proxmox
//! fixtures and from small archives and streams made here, so that no large
//! file is committed: `scripts/fuzz.sh` runs it.
//!
//! ```text
//! fuzz_seeds OUTDIR [FIXTURES_DIR]   # default ../shared/fixtures
//! ```
//!
//! Writes `OUTDIR/header/*`, `OUTDIR/archive/*`, `OUTDIR/stream/*`, each
//! seed once per mode (the first byte: see fuzz/src/lib.rs), at most 60 KB.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use vma_format::stream::{StreamDevice, StreamWriter};
use vma_format::{
    BlockMask, Cluster, HeaderBuilder, VmaHeader, Writer, WriterOptions, CLUSTER_SIZE,
};

const MAX_SEED: usize = 60 * 1024;

fn put(dir: &Path, name: &str, modes: &[u8], bytes: &[u8]) {
    fs::create_dir_all(dir).unwrap();
    let bytes = &bytes[..bytes.len().min(MAX_SEED)];
    for &m in modes {
        let mut seed = vec![m];
        seed.extend_from_slice(bytes);
        fs::write(dir.join(format!("{name}-m{m}")), seed).unwrap();
    }
}

/// A small archive: `sizes` devices (named by index; "vmstate" for a size
/// of 0, which then holds 2 clusters), clusters with varied masks.
fn archive(sizes: &[u64], checksums: bool, configs: usize) -> Vec<u8> {
    let mut h = HeaderBuilder::new([0x5a; 16], 1_700_000_000);
    for i in 0..configs {
        h.add_config(
            &format!("conf{i}.conf"),
            format!("memory: {i}\n").into_bytes(),
        )
        .unwrap();
    }
    for (i, &s) in sizes.iter().enumerate() {
        if s == 0 {
            h.add_device("vmstate", 4096).unwrap();
        } else {
            h.add_device(&format!("drive-scsi{i}"), s).unwrap();
        }
    }
    let mut w = Writer::new(
        Vec::new(),
        &h,
        WriterOptions {
            data_checksums: checksums,
        },
    )
    .unwrap();
    for (i, &s) in sizes.iter().enumerate() {
        let dev = i as u8 + 1;
        let clusters = if s == 0 {
            2
        } else {
            vma_format::clusters_for(s)
        };
        for n in 0..clusters {
            let mut raw = vec![0u8; CLUSTER_SIZE];
            for b in 0..16 {
                if (n as usize + b + i).is_multiple_of(7) {
                    raw[b * 4096] = (b + 1) as u8;
                }
            }
            w.write_raw(dev, n as u32, &raw).unwrap();
        }
    }
    w.finish().unwrap()
}

fn stream(sizes: &[u64], end: bool) -> Vec<u8> {
    let devs: Vec<StreamDevice> = sizes
        .iter()
        .enumerate()
        .map(|(i, &s)| {
            if s == 0 {
                StreamDevice::new("vmstate", 4096)
            } else {
                StreamDevice::new(format!("drive-virtio{i}"), s)
            }
        })
        .collect();
    let mut w = StreamWriter::new(Vec::new(), 1_700_000_000, &devs).unwrap();
    for (i, &s) in sizes.iter().enumerate() {
        let clusters = if s == 0 {
            2
        } else {
            vma_format::clusters_for(s)
        };
        for n in (0..clusters).rev() {
            let allowed = if s == 0 {
                BlockMask::FULL
            } else {
                BlockMask::in_device(n, s)
            };
            let mask = BlockMask(allowed.0 & (0x8421u16.rotate_left(n as u32 + i as u32)));
            let data = vec![n as u8 | 1; mask.data_len()];
            let n = if s == 0 { clusters - 1 - n } else { n };
            w.write_cluster(&Cluster {
                dev_id: i as u8 + 1,
                cluster_num: n as u32,
                mask,
                data: &data,
            })
            .unwrap();
        }
    }
    if end {
        w.finish().unwrap()
    } else {
        w.abort("the guest disk went away").unwrap()
    }
}

fn main() {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let Some(out) = args.first() else {
        eprintln!("usage: fuzz_seeds OUTDIR [FIXTURES_DIR]");
        std::process::exit(2);
    };
    let fixtures = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| PathBuf::from("../shared/fixtures"));
    let (hdir, adir, sdir) = (out.join("header"), out.join("archive"), out.join("stream"));

    // Proxmox's archives: whole headers, and archives cut after 60 KB.
    let mut pve: Vec<(String, Vec<u8>)> = Vec::new();
    if let Ok(entries) = fs::read_dir(fixtures.join("pve")) {
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "vma") {
                let name = p.file_stem().unwrap().to_string_lossy().into_owned();
                pve.push((format!("pve-{name}"), fs::read(&p).unwrap()));
            }
        }
    }
    let frag = fixtures.join("real/proxmox-fragment.vma.gz");
    if let Ok(f) = fs::File::open(&frag) {
        let mut bytes = Vec::new();
        flate2::read::GzDecoder::new(f)
            .take(MAX_SEED as u64)
            .read_to_end(&mut bytes)
            .unwrap();
        pve.push(("real-fragment".into(), bytes));
    }
    pve.sort();
    for (name, bytes) in &pve {
        if let Ok(h) = VmaHeader::parse(bytes) {
            put(&hdir, name, &[0, 1], &bytes[..h.header_size() as usize]);
        }
        put(&adir, name, &[0, 1, 2, 3], bytes);
    }

    // Ours: small archives of every shape the reader knows.
    let shapes: [(&str, Vec<u8>); 6] = [
        ("one-cluster", archive(&[4096], true, 1)),
        ("tail", archive(&[3 * 65536 + 4608], true, 2)),
        ("two-devices", archive(&[65536, 2 * 65536 + 512], false, 1)),
        ("vmstate", archive(&[65536, 0], true, 1)),
        ("plain", archive(&[5 * 65536], false, 0)),
        ("empty", archive(&[], true, 3)),
    ];
    for (name, bytes) in &shapes {
        let h = VmaHeader::parse(bytes).unwrap();
        put(&hdir, name, &[0, 1], &bytes[..h.header_size() as usize]);
        put(&adir, name, &[0, 1, 2, 3], bytes);
    }

    let streams: [(&str, Vec<u8>); 4] = [
        ("one", stream(&[4096], true)),
        ("three", stream(&[3 * 65536 + 4608, 65536, 0], true)),
        ("abort", stream(&[65536 * 2], false)),
        ("none", stream(&[], true)),
    ];
    for (name, bytes) in &streams {
        put(&sdir, name, &[0, 1], bytes);
    }
    println!("seeds written to {}", out.display());
}
