//! Round trips through the library writer and reader: whatever devices,
//! sizes, zero patterns and cluster order, and whichever of the writer's
//! entry points (write_raw, write_cluster, raw_buffer + commit_raw,
//! write_zero_clusters), every device reads back byte for byte, and the
//! archive has the shape Proxmox's writer gives it.
//!
//! Cluster content is a pure function of (seed, device, cluster), so the
//! reading side regenerates what it expects cluster by cluster: nothing the
//! size of a device is ever held, and a 5 GiB sparse device costs a few MiB.

use proptest::prelude::*;
use vma_format::zero::is_zero_block;
use vma_format::{
    clusters_for, Archive, BlockInfo, BlockMask, Cluster, ClusterSink, Flow, HeaderBuilder, Writer,
    WriterOptions, BLOCKS_PER_CLUSTER, BLOCK_SIZE, CLUSTER_SIZE, EXTENT_HEADER_SIZE, EXTENT_SLOTS,
    WRITER_CLUSTERS_PER_EXTENT,
};

const GIB: u64 = 1 << 30;
/// The sizes every round trip must get right: around a block and a cluster.
const EDGE_SIZES: [u64; 7] = [1, 4095, 4096, 4097, 65535, 65536, 65537];

/// One device of a test archive.
#[derive(Clone, Debug)]
struct Dev {
    size: u64,
    /// Only a handful of clusters hold data (for multi-GiB devices).
    sparse: bool,
    /// The `vmstate` device: clusters in order, no clipping at its size.
    vmstate: bool,
}

#[derive(Clone, Debug)]
struct Case {
    devs: Vec<Dev>,
    seed: u64,
    checksums: bool,
}

fn mix(mut z: u64) -> u64 {
    // splitmix64
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn key(seed: u64, dev: usize, n: u32) -> u64 {
    mix(seed ^ mix(((dev as u64) << 32) | n as u64))
}

fn fill_random(buf: &mut [u8], mut state: u64) {
    for chunk in buf.chunks_mut(8) {
        state = mix(state);
        let bytes = state.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
}

impl Case {
    fn clusters(&self, d: usize) -> u64 {
        clusters_for(self.devs[d].size)
    }

    /// Bytes of cluster `n` of device `d` that lie inside the device.
    fn valid(&self, d: usize, n: u32) -> usize {
        let dev = &self.devs[d];
        if dev.vmstate {
            return CLUSTER_SIZE;
        }
        (dev.size - n as u64 * CLUSTER_SIZE as u64).min(CLUSTER_SIZE as u64) as usize
    }

    /// The raw 64 KiB handed to the writer for cluster `n` of device `d`,
    /// `None` when it is all zero. Bytes past the device end are garbage the
    /// writer must drop.
    fn raw(&self, d: usize, n: u32) -> Option<Vec<u8>> {
        let dev = &self.devs[d];
        let clusters = self.clusters(d);
        let k = key(self.seed, d, n);
        let last = n as u64 + 1 == clusters;
        if dev.sparse {
            let hot = [0, 1, clusters / 3, clusters / 2, clusters - 1, 65537];
            if !hot.contains(&(n as u64)) {
                return None;
            }
        }
        let mut raw = vec![0u8; CLUSTER_SIZE];
        let k2 = mix(k);
        match k % 8 {
            0 => {}
            1 => fill_random(&mut raw, k2),
            2 => {
                // Random blocks, some of them zero.
                fill_random(&mut raw, k2);
                for b in 0..BLOCKS_PER_CLUSTER {
                    if k2 >> b & 1 == 0 {
                        raw[b * BLOCK_SIZE..(b + 1) * BLOCK_SIZE].fill(0);
                    }
                }
            }
            3 => {
                // Single non-zero bytes at block edges.
                for b in 0..BLOCKS_PER_CLUSTER {
                    match k2 >> (2 * b) & 3 {
                        1 => raw[b * BLOCK_SIZE] = 1,
                        2 => raw[b * BLOCK_SIZE + BLOCK_SIZE - 1] = 0x80,
                        3 => {
                            raw[b * BLOCK_SIZE] = 0xff;
                            raw[b * BLOCK_SIZE + BLOCK_SIZE - 1] = 0xff;
                        }
                        _ => {}
                    }
                }
            }
            4 => {
                // One byte, at the very start or end of the cluster.
                let at = if k2 & 1 == 0 { 0 } else { CLUSTER_SIZE - 1 };
                raw[at] = 0x42;
            }
            5 => raw.fill(0xff),
            6 => fill_random(&mut raw[15 * BLOCK_SIZE..], k2),
            _ => {
                // Every block non-zero in one byte in its middle.
                for b in 0..BLOCKS_PER_CLUSTER {
                    raw[b * BLOCK_SIZE + 2048] = b as u8 + 1;
                }
            }
        }
        if last && !dev.vmstate {
            // Garbage past the device end, whatever the pattern.
            let valid = self.valid(d, n);
            fill_random(&mut raw[valid..], k2 ^ 0x5555);
            for b in &mut raw[valid..] {
                *b |= 1;
            }
        }
        (!raw.iter().all(|&b| b == 0)).then_some(raw)
    }

    /// Packs `raw` as a source of packed clusters might: every block inside
    /// the device that is not all zero counting the garbage past the end, so
    /// the writer has to zero the stored bytes past the end.
    fn pack(&self, d: usize, n: u32, raw: &[u8]) -> (BlockMask, Vec<u8>) {
        let allowed = if self.devs[d].vmstate {
            BlockMask::FULL
        } else {
            BlockMask::in_device(n as u64, self.devs[d].size)
        };
        let mut mask = 0u16;
        let mut data = Vec::new();
        for b in 0..BLOCKS_PER_CLUSTER {
            let block = &raw[b * BLOCK_SIZE..(b + 1) * BLOCK_SIZE];
            if allowed.has(b) && !is_zero_block(block) {
                mask |= 1 << b;
                data.extend_from_slice(block);
            }
        }
        (BlockMask(mask), data)
    }

    /// What reading must give for cluster `n` of device `d`: its 64 KiB,
    /// zero past the device end; and the mask the writer must have stored.
    fn expected(&self, d: usize, n: u32, how: How) -> (Vec<u8>, BlockMask) {
        let Some(raw) = self.raw(d, n) else {
            return (vec![0u8; CLUSTER_SIZE], BlockMask::EMPTY);
        };
        let mask = if how == How::Packed {
            self.pack(d, n, &raw).0
        } else {
            let valid = self.valid(d, n);
            let mut m = 0u16;
            for b in 0..BLOCKS_PER_CLUSTER {
                let start = b * BLOCK_SIZE;
                if start < valid && !is_zero_block(&raw[start..(start + BLOCK_SIZE).min(valid)]) {
                    m |= 1 << b;
                }
            }
            BlockMask(m)
        };
        let mut content = raw;
        content[self.valid(d, n)..].fill(0);
        (content, mask)
    }

    fn header(&self) -> HeaderBuilder {
        let mut h = HeaderBuilder::new(
            mix(self.seed).to_be_bytes().repeat(2).try_into().unwrap(),
            0,
        );
        for (i, dev) in self.devs.iter().enumerate() {
            let name = if dev.vmstate {
                "vmstate".to_string()
            } else {
                format!("drive-scsi{i}")
            };
            h.add_device(&name, dev.size).unwrap();
        }
        h
    }

    /// How the archive is written: every device cut into runs of 1 to 70
    /// consecutive clusters (so runs cross extent boundaries), the runs
    /// shuffled across devices (vmstate runs renumbered so its clusters
    /// still come in order), each run written one way.
    fn plan(&self) -> Plan {
        let mut state = mix(self.seed ^ 0x1234);
        let mut next = || {
            state = mix(state);
            state
        };
        let mut runs = Vec::new();
        for d in 0..self.devs.len() {
            let clusters = self.clusters(d);
            // Long runs on big devices, to stay fast.
            let longest = if clusters > 10_000 { 4000 } else { 70 };
            let mut n = 0u64;
            while n < clusters {
                let count = (1 + next() % longest).min(clusters - n);
                runs.push((d, n as u32, count as u32));
                n += count;
            }
        }
        for i in (1..runs.len()).rev() {
            runs.swap(i, (next() % (i as u64 + 1)) as usize);
        }
        let mut vmstate_next = 0;
        let mut how: Vec<Vec<How>> = (0..self.devs.len())
            .map(|d| vec![How::Raw; self.clusters(d) as usize])
            .collect();
        let mut plan = Vec::with_capacity(runs.len());
        for (d, mut first, count) in runs {
            if self.devs[d].vmstate {
                first = vmstate_next;
                vmstate_next += count;
            }
            let all_zero = (first..first + count).all(|n| self.raw(d, n).is_none());
            let h = match next() % 4 {
                0 => How::Raw,
                1 => How::Packed,
                2 => How::Buffer,
                _ if all_zero => How::Zero,
                _ => How::Buffer,
            };
            for n in first..first + count {
                how[d][n as usize] = h;
            }
            plan.push((d, first, count, h));
        }
        Plan { runs: plan, how }
    }

    fn write(&self, plan: &Plan) -> Vec<u8> {
        let options = WriterOptions {
            data_checksums: self.checksums,
        };
        let mut w = Writer::new(Vec::new(), &self.header(), options).unwrap();
        for &(d, first, count, how) in &plan.runs {
            let id = d as u8 + 1;
            match how {
                How::Zero => {
                    w.write_zero_clusters(id, first, count as u64).unwrap();
                }
                How::Buffer => {
                    // Straight into the writer's extent buffer, as many
                    // clusters at a time as it offers.
                    let mut n = first;
                    while n < first + count {
                        let buf = w.raw_buffer((first + count - n) as usize).unwrap();
                        let k = buf.len() / CLUSTER_SIZE;
                        for (i, c) in buf.chunks_mut(CLUSTER_SIZE).enumerate() {
                            match self.raw(d, n + i as u32) {
                                Some(raw) => c.copy_from_slice(&raw),
                                None => c.fill(0),
                            }
                        }
                        w.commit_raw(id, n, k).unwrap();
                        n += k as u32;
                    }
                }
                How::Raw | How::Packed => {
                    for n in first..first + count {
                        self.write_one(&mut w, d, n, how);
                    }
                }
            }
        }
        w.finish().unwrap()
    }

    fn write_one(&self, w: &mut Writer<Vec<u8>>, d: usize, n: u32, how: How) {
        let id = d as u8 + 1;
        match (self.raw(d, n), how) {
            (None, How::Packed) => w.write_cluster(&Cluster {
                dev_id: id,
                cluster_num: n,
                mask: BlockMask::EMPTY,
                data: &[],
            }),
            (None, _) => w.write_raw(id, n, &[]),
            (Some(raw), How::Packed) => {
                let (mask, data) = self.pack(d, n, &raw);
                w.write_cluster(&Cluster {
                    dev_id: id,
                    cluster_num: n,
                    mask,
                    data: &data,
                })
            }
            (Some(raw), _) => w.write_raw(id, n, &raw),
        }
        .unwrap();
    }
}

/// How a run of clusters is handed to the writer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum How {
    /// `write_raw`, one cluster at a time (the writer finds zero blocks).
    Raw,
    /// `write_cluster`, packed here (blocks past the device end never
    /// named, but the stored tail block carries garbage past the end).
    Packed,
    /// `raw_buffer` + `commit_raw`: packed in place in the extent buffer.
    Buffer,
    /// `write_zero_clusters` (all-zero runs only).
    Zero,
}

/// The runs (device index, first cluster, count, how) in writing order, and
/// how each cluster was written, by device index and cluster.
struct Plan {
    runs: Vec<(usize, u32, u32, How)>,
    how: Vec<Vec<How>>,
}

/// Compares every delivered cluster with what the case generates.
struct Check<'a> {
    case: &'a Case,
    plan: &'a Plan,
    clusters: Vec<u64>,
    buf: Vec<u8>,
}

impl ClusterSink for Check<'_> {
    fn cluster(&mut self, c: &Cluster<'_>) -> std::io::Result<Flow> {
        let d = c.dev_id as usize - 1;
        let how = self.plan.how[d][c.cluster_num as usize];
        let (content, mask) = self.case.expected(d, c.cluster_num, how);
        assert_eq!(
            c.mask, mask,
            "mask of cluster {} of device {}",
            c.cluster_num, c.dev_id
        );
        c.expand_into(&mut self.buf);
        assert!(
            self.buf == content,
            "content of cluster {} of device {} differs",
            c.cluster_num,
            c.dev_id
        );
        self.clusters[d] += 1;
        Ok(Flow::Continue)
    }
}

/// Writes the case, checks the archive's shape, reads it back and compares.
fn round_trip(case: &Case) {
    let plan = case.plan();
    let bytes = case.write(&plan);
    check_shape(case, &bytes);
    let mut archive = Archive::new(&bytes[..]).unwrap();
    let mut check = Check {
        case,
        plan: &plan,
        clusters: vec![0; case.devs.len()],
        buf: vec![0u8; CLUSTER_SIZE],
    };
    let summary = archive.run(&mut check).unwrap();
    for d in 0..case.devs.len() {
        assert_eq!(
            check.clusters[d],
            case.clusters(d),
            "clusters of device {d}"
        );
    }
    assert!(summary.is_complete());
    assert_eq!(summary.bytes_read, bytes.len() as u64);
    let sums = summary.data_checksums;
    if case.checksums {
        assert_eq!((sums.verified, sums.absent), (summary.extents, 0));
    } else {
        assert_eq!((sums.verified, sums.absent), (0, summary.extents));
    }
}

/// The shape Proxmox's writer gives an archive, checked on the raw bytes:
/// extents of 58 clusters (the last one fewer), block_count equal to the
/// mask bits, the 59th slot empty or our data checksum, no mask bit past a
/// device end, and the stored bytes past a device end zero.
fn check_shape(case: &Case, bytes: &[u8]) {
    let header_size = u32::from_be_bytes(bytes[56..60].try_into().unwrap()) as usize;
    let mut off = header_size;
    let mut extents = Vec::new();
    while off < bytes.len() {
        let head = &bytes[off..off + EXTENT_HEADER_SIZE];
        assert_eq!(&head[..4], b"VMAE");
        let slots: Vec<BlockInfo> = (0..EXTENT_SLOTS)
            .map(|i| {
                let at = 40 + 8 * i;
                BlockInfo::from_u64(u64::from_be_bytes(head[at..at + 8].try_into().unwrap()))
            })
            .collect();
        let used = slots.iter().filter(|s| s.dev_id != 0).count();
        assert!(slots[..used].iter().all(|s| s.dev_id != 0), "gap in slots");
        assert!(used <= WRITER_CLUSTERS_PER_EXTENT);
        let last = slots[EXTENT_SLOTS - 1];
        if case.checksums {
            assert!(last.as_data_checksum().is_some());
        } else {
            assert_eq!(last, BlockInfo::default());
        }
        let blocks: usize = slots[..used].iter().map(|s| s.mask.count()).sum();
        assert_eq!(u16::from_be_bytes([head[6], head[7]]) as usize, blocks);
        let mut data = off + EXTENT_HEADER_SIZE;
        for s in &slots[..used] {
            let dev = &case.devs[s.dev_id as usize - 1];
            if !dev.vmstate {
                let allowed = BlockMask::in_device(s.cluster_num as u64, dev.size);
                assert_eq!(s.mask.0 & !allowed.0, 0, "mask bit past the device end");
                let start = s.cluster_num as u64 * CLUSTER_SIZE as u64;
                let end_in_cluster = dev.size - start;
                let tail = end_in_cluster % BLOCK_SIZE as u64;
                let block = (end_in_cluster / BLOCK_SIZE as u64) as usize;
                if end_in_cluster < CLUSTER_SIZE as u64 && tail != 0 && s.mask.has(block) {
                    let before = BlockMask(s.mask.0 & ((1u16 << block) - 1)).count();
                    let at = data + before * BLOCK_SIZE;
                    assert!(
                        bytes[at + tail as usize..at + BLOCK_SIZE]
                            .iter()
                            .all(|&b| b == 0),
                        "non-zero bytes stored past the device end"
                    );
                }
            }
            data += s.mask.data_len();
        }
        extents.push(used);
        off = data;
    }
    assert_eq!(off, bytes.len());
    let (last, full) = extents.split_last().unwrap();
    assert!(full.iter().all(|&n| n == WRITER_CLUSTERS_PER_EXTENT));
    assert!(*last >= 1 || extents.len() == 1);
}

fn dev(size: u64) -> Dev {
    Dev {
        size,
        sparse: false,
        vmstate: false,
    }
}

#[test]
fn every_edge_size_round_trips() {
    for seed in 0..4 {
        for checksums in [true, false] {
            let case = Case {
                devs: EDGE_SIZES.iter().map(|&s| dev(s)).take(6).collect(),
                seed,
                checksums,
            };
            round_trip(&case);
            let case = Case {
                devs: vec![dev(65537), dev(1)],
                seed,
                checksums,
            };
            round_trip(&case);
        }
    }
}

#[test]
fn a_five_gib_sparse_device_round_trips_in_little_memory() {
    // 81920 clusters, six of them with data, shuffled with two small disks
    // and a vmstate device.
    let case = Case {
        devs: vec![
            Dev {
                size: 5 * GIB,
                sparse: true,
                vmstate: false,
            },
            dev(4097),
            Dev {
                size: 3 * CLUSTER_SIZE as u64 + 1,
                sparse: false,
                vmstate: true,
            },
            dev(20 * CLUSTER_SIZE as u64 + 512),
        ],
        seed: 7,
        checksums: true,
    };
    let bytes = case.write(&case.plan());
    // Headers of about 1400 extents and 30 clusters of data at most: well
    // under the 5 GiB the device holds.
    assert!(bytes.len() < 4 << 20, "{} bytes", bytes.len());
    round_trip(&case);
}

/// Devices for the property test: edge sizes, any size up to 40 clusters,
/// and now and then a multi-GiB sparse one or a vmstate device.
fn dev_strategy() -> impl Strategy<Value = Dev> {
    prop_oneof![
        6 => prop::sample::select(EDGE_SIZES.to_vec()).prop_map(dev),
        6 => (1u64..=40 * CLUSTER_SIZE as u64, any::<bool>()).prop_map(|(size, sparse)| Dev {
            size,
            sparse,
            vmstate: false,
        }),
        1 => (4 * GIB..=6 * GIB).prop_map(|size| Dev {
            size,
            sparse: true,
            vmstate: false,
        }),
        1 => (1u64..=5 * CLUSTER_SIZE as u64).prop_map(|size| Dev {
            size,
            sparse: false,
            vmstate: true,
        }),
    ]
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (
        prop::collection::vec(dev_strategy(), 1..=6),
        any::<u64>(),
        any::<bool>(),
    )
        .prop_filter("one vmstate device at most", |(devs, _, _)| {
            devs.iter().filter(|d| d.vmstate).count() <= 1
        })
        .prop_filter(
            "one multi-GiB device at most, to stay fast",
            |(devs, _, _)| devs.iter().filter(|d| d.size > GIB).count() <= 1,
        )
        .prop_map(|(devs, seed, checksums)| Case {
            devs,
            seed,
            checksums,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn any_devices_any_order_round_trip(case in case_strategy()) {
        round_trip(&case);
    }
}
