//! [`Writer::write_extent`]: a whole extent of packed clusters whose data
//! already lies together in the caller's buffer (an untouched extent of the
//! base of a merge) written from there, without copying it into the extent
//! buffer, and with the caller's verified CRC-32 of it instead of a new one.

use std::io::{IoSlice, Write};

use super::{write_error, Writer};
use crate::cluster::Cluster;
use crate::error::Error;
use crate::extent::BlockInfo;
use crate::{BLOCKS_PER_CLUSTER, BLOCK_SIZE, EXTENT_HEADER_SIZE, WRITER_CLUSTERS_PER_EXTENT};

impl<W: Write> Writer<W> {
    /// Writes `clusters` (packed, as for [`write_cluster`](Self::write_cluster))
    /// whose data are consecutive parts of `data`, in order, covering it;
    /// `data_crc`, if known, is the CRC-32 of `data`. The archive bytes are
    /// exactly those of `write_cluster` for each cluster in turn, but when
    /// they fill one extent of their own (the writer between extents, 58
    /// clusters) the extent's data is written straight from `data` (no copy)
    /// with `data_crc` as its checksum (none computed). Else, or when a
    /// cluster's last block holds bytes past its device's end that are not
    /// zero (the writer zeroes them), it falls back to `write_cluster`.
    /// Every cluster is checked as `write_cluster` checks it. Returns the
    /// bytes of zero blocks.
    pub fn write_extent(
        &mut self,
        clusters: &[Cluster<'_>],
        data: &[u8],
        data_crc: Option<u32>,
    ) -> Result<u64, Error> {
        if self.failed {
            return Err(Error::invalid("writer failed earlier"));
        }
        self.make_room()?;
        if !(self.slots.is_empty() && self.used == 0 && self.whole_and_clean(clusters, data)?) {
            let mut zero = 0;
            for c in clusters {
                zero += self.write_cluster(c)?;
            }
            return Ok(zero);
        }
        let crc = match (self.options.data_checksums, data_crc) {
            (false, _) => None,
            (true, Some(crc)) => Some(crc),
            (true, None) => Some(crc32fast::hash(data)),
        };
        self.slots.extend(clusters.iter().map(|c| BlockInfo {
            mask: c.mask,
            reserved: 0,
            dev_id: c.dev_id,
            cluster_num: c.cluster_num,
        }));
        self.encode_extent_header(data.len(), crc);
        self.slots.clear();
        let (head, data) = (&self.buf[..EXTENT_HEADER_SIZE], data);
        if let Err(e) = write_all_two(&mut self.out, head, data) {
            self.failed = true;
            return Err(write_error(e));
        }
        self.bytes_written += (EXTENT_HEADER_SIZE + data.len()) as u64;
        self.extents += 1;
        let mut zero = 0;
        for c in clusters {
            self.devices.record(c.dev_id, c.cluster_num as u64);
            let z = (BLOCKS_PER_CLUSTER - c.mask.count()) as u64 * BLOCK_SIZE as u64;
            self.zero_bytes[c.dev_id as usize - 1] += z;
            zero += z;
        }
        Ok(zero)
    }

    /// Whether `clusters` fill an extent of their own with `data` as its
    /// data, each may be written now (an error if one may not), and no
    /// byte past a device end needs zeroing.
    fn whole_and_clean(&self, clusters: &[Cluster<'_>], data: &[u8]) -> Result<bool, Error> {
        if clusters.len() != WRITER_CLUSTERS_PER_EXTENT {
            return Ok(false);
        }
        let mut at = data.as_ptr() as usize;
        for (i, c) in clusters.iter().enumerate() {
            if c.data.as_ptr() as usize != at && !c.data.is_empty() {
                return Ok(false);
            }
            at += c.data.len();
            let tail = self.check_packed(c.dev_id, c.cluster_num, c.mask)?;
            if clusters[..i]
                .iter()
                .any(|e| (e.dev_id, e.cluster_num) == (c.dev_id, c.cluster_num))
            {
                // write_cluster refuses the second: let it.
                return Ok(false);
            }
            if c.data.len() != c.mask.data_len() {
                return Ok(false);
            }
            if let Some(end) = tail {
                let block = end / BLOCK_SIZE;
                if c.mask.has(block) {
                    let before = crate::cluster::BlockMask(c.mask.0 & ((1u16 << block) - 1));
                    let from = before.count() * BLOCK_SIZE + end % BLOCK_SIZE;
                    let to = (before.count() + 1) * BLOCK_SIZE;
                    if c.data[from..to].iter().any(|&b| b != 0) {
                        return Ok(false);
                    }
                }
            }
        }
        Ok(at == data.as_ptr() as usize + data.len())
    }
}

/// Writes `a` then `b`, vectored (one system call where the output takes
/// both).
fn write_all_two<W: Write>(out: &mut W, a: &[u8], b: &[u8]) -> std::io::Result<()> {
    let mut bufs = [IoSlice::new(a), IoSlice::new(b)];
    let mut bufs = &mut bufs[..];
    while !bufs.is_empty() {
        match out.write_vectored(bufs) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::cluster::ClusterBuf;
    use crate::{HeaderBuilder, Writer, WriterOptions, CLUSTER_SIZE};

    /// 174 clusters (the last one ends inside a block, with bytes past
    /// the device end that are not zero), written one by one and with
    /// write_extent by runs of `run`: the same archive, with and without
    /// data checksums.
    #[test]
    fn write_extent_writes_what_write_cluster_writes() {
        let size = 174 * CLUSTER_SIZE as u64 - 1000;
        let mut h = HeaderBuilder::new([5; 16], 9);
        h.add_device("drive-scsi0", size).unwrap();
        let mut clusters: Vec<ClusterBuf> = (0..174u32)
            .map(|n| {
                let raw: Vec<u8> = (0..CLUSTER_SIZE)
                    .map(|i| {
                        if (i / 4096 + n as usize).is_multiple_of(3) {
                            0
                        } else {
                            n as u8 | 1
                        }
                    })
                    .collect();
                ClusterBuf::from_raw(1, n, &raw, (size - n as u64 * CLUSTER_SIZE as u64) as usize)
            })
            .collect();
        *clusters[173].data.last_mut().unwrap() = 0xff;
        for checksums in [true, false] {
            let opts = WriterOptions {
                data_checksums: checksums,
            };
            let mut one = Writer::new(Vec::new(), &h, opts).unwrap();
            for c in &clusters {
                one.write_cluster(&c.as_cluster()).unwrap();
            }
            let one = one.finish().unwrap();
            // The given CRC is the one written: the data went straight out.
            let mut w = Writer::new(Vec::new(), &h, opts).unwrap();
            let data: Vec<u8> = clusters[..58].iter().flat_map(|c| c.data.clone()).collect();
            let mut at = 0;
            let parts: Vec<crate::Cluster<'_>> = clusters[..58]
                .iter()
                .map(|c| {
                    at += c.data.len();
                    crate::Cluster {
                        data: &data[at - c.data.len()..at],
                        ..c.as_cluster()
                    }
                })
                .collect();
            w.write_extent(&parts, &data, Some(crc32fast::hash(&data) ^ 1))
                .unwrap();
            let mut out = Vec::new();
            for c in &clusters[58..] {
                w.write_cluster(&c.as_cluster()).unwrap();
            }
            out.extend(w.finish().unwrap());
            assert_eq!(out.len(), one.len());
            assert_eq!(out != one, checksums, "the CRC given is used");
            for (run, skip) in [(58usize, 0usize), (58, 3), (20, 0)] {
                let mut w = Writer::new(Vec::new(), &h, opts).unwrap();
                let mut zero = 0;
                for c in &clusters[..skip] {
                    zero += w.write_cluster(&c.as_cluster()).unwrap();
                }
                for group in clusters[skip..].chunks(run) {
                    let data: Vec<u8> = group.iter().flat_map(|c| c.data.clone()).collect();
                    let mut at = 0;
                    let parts: Vec<crate::Cluster<'_>> = group
                        .iter()
                        .map(|c| {
                            let len = c.data.len();
                            at += len;
                            crate::Cluster {
                                data: &data[at - len..at],
                                ..c.as_cluster()
                            }
                        })
                        .collect();
                    let crc = checksums.then(|| crc32fast::hash(&data));
                    zero += w.write_extent(&parts, &data, crc).unwrap();
                }
                let stats = w.device_stats();
                assert_eq!(w.finish().unwrap(), one, "run {run} after {skip}");
                assert_eq!(stats[0].clusters_written, 174);
                assert_eq!(stats[0].zero_bytes, zero);
            }
        }
    }
}
