//! An archive read back as a [`ClusterSource`]: the base an incremental
//! change stream will be merged onto, or simply an archive re-encoded
//! (another uuid, with or without data checksums).

use std::io::Read;

use super::{Archive, ExtentRead, ReadState, Summary};
use crate::cluster::Cluster;
use crate::error::Error;
use crate::extent::ExtentHeader;
use crate::source::{ClusterSource, Piece, RawRoom};
use crate::stream::StreamDevice;
use crate::EXTENT_SLOTS;

/// The clusters of an archive, pulled one by one with every check of
/// [`Archive::run`] (at the end, too: a source that ends without error was
/// complete). Devices are renumbered 1, 2, … in the order of their ids in
/// the archive's header, names taken as lossy UTF-8.
pub struct ArchiveClusters<R> {
    archive: Archive<R>,
    state: ReadState,
    summary: Summary,
    /// Source device id of each archive device id (0: not declared).
    ids: [u8; 256],
    devices: Vec<StreamDevice>,
    /// The extent being handed out: its header, usable slots, data length.
    current: Option<(ExtentHeader, [bool; EXTENT_SLOTS], usize)>,
    /// The next slot of `current` and where its data starts.
    slot: usize,
    at: usize,
    /// The input was truncated (salvage) or has ended.
    last: bool,
    done: bool,
}

impl<R: Read> ArchiveClusters<R> {
    /// The clusters of `archive` (whose header is read).
    pub fn new(archive: Archive<R>) -> ArchiveClusters<R> {
        let mut ids = [0u8; 256];
        let mut devices = Vec::new();
        for d in archive.header().devices() {
            devices.push(StreamDevice::new(d.display_name(), d.size));
            ids[d.id as usize] = devices.len() as u8;
        }
        ArchiveClusters {
            archive,
            state: ReadState::default(),
            summary: Summary::default(),
            ids,
            devices,
            current: None,
            slot: 0,
            at: 0,
            last: false,
            done: false,
        }
    }

    /// What the read found so far (complete once the source is exhausted).
    pub fn summary(&self) -> &Summary {
        &self.summary
    }

    /// The archive back.
    pub fn into_archive(self) -> Archive<R> {
        self.archive
    }

    /// The next cluster, `None` once the archive is read and found complete.
    pub fn next_cluster(&mut self) -> Result<Option<Cluster<'_>>, Error> {
        loop {
            if let Some((extent, usable, len)) = &self.current {
                while self.slot < EXTENT_SLOTS {
                    let i = self.slot;
                    let slot = extent.slots()[i];
                    self.slot += 1;
                    if slot.dev_id == 0 {
                        continue;
                    }
                    let (start, end) = (self.at, self.at + slot.mask.data_len());
                    if end > *len {
                        break;
                    }
                    self.at = end;
                    if usable[i] {
                        self.archive.record(&slot);
                        self.summary.clusters += 1;
                        self.summary.data_blocks += slot.mask.count() as u64;
                        return Ok(Some(Cluster {
                            dev_id: self.ids[slot.dev_id as usize],
                            cluster_num: slot.cluster_num,
                            mask: slot.mask,
                            data: &self.state.data[start..end],
                        }));
                    }
                }
                self.current = None;
            }
            if self.done {
                return Ok(None);
            }
            let found = if self.last {
                ExtentRead::End
            } else {
                self.archive
                    .read_extent(&mut self.state, &mut self.summary)?
            };
            match found {
                ExtentRead::End => {
                    self.done = true;
                    self.summary.bytes_read = self.archive.pos;
                    self.archive.check_complete(&mut self.summary)?;
                    return Ok(None);
                }
                ExtentRead::Skipped => {}
                ExtentRead::Data(extent, usable, len, whole) => {
                    self.current = Some((extent, usable, len));
                    self.slot = 0;
                    self.at = 0;
                    self.last = !whole;
                }
            }
        }
    }
}

impl<R: Read> ClusterSource for ArchiveClusters<R> {
    type Error = Error;

    fn devices(&self) -> Vec<StreamDevice> {
        self.devices.clone()
    }

    fn next_piece<'a>(&'a mut self, _room: &mut RawRoom<'_>) -> Result<Option<Piece<'a>>, Error> {
        Ok(self.next_cluster()?.map(Piece::Cluster))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::ClusterBuf;
    use crate::reader::{ClusterSink, Flow};
    use crate::{HeaderBuilder, Writer, WriterOptions, CLUSTER_SIZE};

    struct Collect(Vec<ClusterBuf>);
    impl ClusterSink for Collect {
        fn cluster(&mut self, c: &Cluster<'_>) -> std::io::Result<Flow> {
            self.0.push(c.to_owned_buf());
            Ok(Flow::Continue)
        }
    }

    fn clusters_of(archive: &[u8]) -> Vec<ClusterBuf> {
        let mut sink = Collect(Vec::new());
        Archive::new(archive).unwrap().run(&mut sink).unwrap();
        sink.0
    }

    /// Two devices, clusters written in a scrambled order, some zero.
    fn archive(uuid: u8) -> Vec<u8> {
        let mut h = HeaderBuilder::new([uuid; 16], 7);
        h.add_device("drive-scsi0", 5 * CLUSTER_SIZE as u64 - 512)
            .unwrap();
        h.add_device("vmstate", 100).unwrap();
        let mut w = Writer::new(Vec::new(), &h, WriterOptions::default()).unwrap();
        for n in [3u32, 0, 4, 1, 2] {
            let raw: Vec<u8> = (0..CLUSTER_SIZE)
                .map(|i| if (i / 4096) % 3 == 0 { n as u8 + 1 } else { 0 })
                .collect();
            w.write_raw(1, n, &raw).unwrap();
        }
        for n in 0..3 {
            w.write_raw(2, n, &[n as u8 + 9; 5000]).unwrap();
        }
        w.finish().unwrap()
    }

    #[test]
    fn an_archive_re_encoded_through_pull_holds_the_same_clusters() {
        let first = archive(1);
        let mut source = ArchiveClusters::new(Archive::new(&first[..]).unwrap());
        assert_eq!(
            source.devices(),
            vec![
                StreamDevice::new("drive-scsi0", 5 * CLUSTER_SIZE as u64 - 512),
                StreamDevice::new("vmstate", 100)
            ]
        );
        let mut h = HeaderBuilder::new([2; 16], 7);
        for d in source.devices() {
            h.add_device(&d.name, d.size).unwrap();
        }
        let mut w = Writer::new(Vec::new(), &h, WriterOptions::default()).unwrap();
        let mut pulled = 0;
        while let Some(p) = w.pull(&mut source).unwrap() {
            pulled += p.count;
        }
        assert_eq!(pulled, 8);
        assert_eq!(source.summary().clusters, 8);
        assert!(source.summary().is_complete());
        let second = w.finish().unwrap();
        assert_eq!(clusters_of(&first), clusters_of(&second));
        // Same order and content, another uuid: equal but for the uuid and MD5s.
        assert_eq!(first.len(), second.len());
        assert_ne!(first, second);
    }

    #[test]
    fn an_incomplete_archive_fails_at_its_end() {
        // The last data byte cut off: the last extent is truncated.
        let cut = archive(1);
        let mut source = ArchiveClusters::new(Archive::new(&cut[..cut.len() - 1]).unwrap());
        let mut n = 0;
        let err = loop {
            match source.next_cluster() {
                Ok(Some(_)) => n += 1,
                Ok(None) => panic!("a cut archive read as complete"),
                Err(e) => break e,
            }
        };
        assert!(n < 8);
        assert_eq!(err.class(), crate::ErrorClass::Damaged, "{err}");
    }
}
