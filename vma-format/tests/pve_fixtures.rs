//! The reader against archives written by Proxmox's own `vma` tool
//! (../shared/fixtures): every image decodes to the sha256 Proxmox's
//! `vma extract` produced, and the truncated real backup fails as it must.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;

use sha2::{Digest, Sha256};
use vma_format::{Archive, Cluster, ClusterSink, Flow, ReadOptions, CLUSTER_SIZE};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures")
}

/// Rebuilds every device in memory.
#[derive(Default)]
struct Images(BTreeMap<u8, Vec<u8>>, BTreeMap<u8, u64>);

impl ClusterSink for Images {
    fn begin(&mut self, header: &vma_format::VmaHeader) -> std::io::Result<()> {
        for d in header.devices() {
            self.0.insert(d.id, vec![0; d.size as usize]);
            self.1.insert(d.id, d.size);
        }
        Ok(())
    }

    fn cluster(&mut self, c: &Cluster<'_>) -> std::io::Result<Flow> {
        let img = self.0.get_mut(&c.dev_id).unwrap();
        let mut full = vec![0u8; CLUSTER_SIZE];
        c.expand_into(&mut full);
        let start = c.offset() as usize;
        let end = (start + CLUSTER_SIZE).min(img.len());
        img[start..end].copy_from_slice(&full[..end - start]);
        Ok(Flow::Continue)
    }
}

fn sha256(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

#[test]
fn multi_disk_decodes_like_proxmox() {
    let file = std::fs::File::open(fixtures().join("pve/multi-disk.vma")).unwrap();
    let mut archive = Archive::new(std::io::BufReader::new(file)).unwrap();
    let h = archive.header().clone();
    assert_eq!(h.configs().len(), 2);
    assert_eq!(h.header_size(), 13824);
    let mut images = Images::default();
    let summary = archive.run(&mut images).unwrap();
    assert_eq!(summary.extents, 3);
    assert_eq!(summary.clusters, 150);
    assert_eq!(summary.data_checksums.describe(), "absent");
    let want = [
        (
            1,
            "d67e78f478af5f3118c457c8ecc0c3f026ca3bfd2ed70bcd68867d42eb64dadd",
        ),
        (
            2,
            "b57fb5c55e3b124fd824004b1abbb884170e71a1cf5b2d372760a5c3238de6f1",
        ),
        (
            3,
            "8a39d2abd3999ab73c34db2476849cddf303ce389b35826850f9a700589b4a90",
        ),
        (
            4,
            "f7ae5cd690328cd8290b37d5028850244265907a2a528df9cb2962c8069fd185",
        ),
    ];
    for (id, sum) in want {
        assert_eq!(sha256(&images.0[&id]), sum, "device {id}");
    }
    assert_eq!(
        sha256(&h.config(b"pve-firewall.fw").unwrap().data),
        "72643af1e3432dbc4ff80a149de1e856202a25aa89a947af4bdf4382ce881ce1"
    );
}

#[test]
fn truncated_real_backup() {
    let gz = std::fs::File::open(fixtures().join("real/proxmox-fragment.vma.gz")).unwrap();
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(gz)
        .read_to_end(&mut bytes)
        .unwrap();
    let mut archive = Archive::new(&bytes[..]).unwrap();
    let err = archive.run(&mut Images::default()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "drive-scsi0: cluster 23 missing (163724 of 163840 clusters missing)"
    );

    let mut archive = Archive::with_options(&bytes[..], ReadOptions { salvage: true }).unwrap();
    let mut images = Images::default();
    let summary = archive.run(&mut images).unwrap();
    assert_eq!(summary.clusters, 116);
    assert_eq!(summary.missing.len(), 1);
    let ranges: Vec<_> = summary.missing[0].ranges().take(7).collect();
    assert_eq!(
        ranges,
        vec![
            23..32,
            55..64,
            104..112,
            120..128,
            136..144,
            151..160,
            167..163840
        ]
    );
    let img = &images.0[&1];
    assert_eq!(
        sha256(&img[..167 * CLUSTER_SIZE]),
        "aab5065ff973dd7d21c09e966546635e95c28be6dd1e4e01ae742420a1fbd825"
    );
}
