//! Raw images and block devices as sources of clusters, read sparse-aware.
//!
//! Holes are found with `SEEK_DATA` / `SEEK_HOLE` and never read: every
//! cluster wholly inside a hole goes to the writer as an all-zero cluster
//! without a byte of I/O, so an 8 TiB image with 1 GiB of data costs the
//! reads of 1 GiB.
//! //! Data is read with `pread`, up to 1 MiB at a time, straight into the
//! writer's extent buffer, where zero blocks are found and the others packed
//! in place: the only copy of the data is the kernel's.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::ops::Range;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use holes::HoleFinder;
use vma_format::stream::StreamDevice;
use vma_format::{clusters_for, ClusterSource, Piece, RawRoom, CLUSTER_SIZE};

use crate::{EncodeError, SECTOR};

/// Clusters read with one `pread` at most (1 MiB).
pub const CHUNK_CLUSTERS: usize = 16;

/// One image file or block device to back up.
#[derive(Debug)]
pub struct ImageSource {
    /// The device name stored in the archive.
    pub name: String,
    /// The path as given.
    pub path: PathBuf,
    file: File,
    /// Its real size in bytes.
    pub real_size: u64,
    /// The size recorded in the archive: `real_size` rounded up to a multiple
    /// of 512, as Proxmox records it. The bytes past `real_size` read as zero.
    pub size: u64,
    /// Whether it is a block device (no `SEEK_DATA` there: read it all).
    pub block_device: bool,
}

impl ImageSource {
    /// Opens `path` and finds its size. Refused (as usage errors): a
    /// directory, anything that is neither a regular file nor a block device,
    /// an empty source (the format has no 0-byte devices), and unless
    /// `assume_raw` an image in a format such as qcow2
    /// (`vma_cli::image_format`).
    pub fn open(name: String, path: &Path, assume_raw: bool) -> Result<ImageSource, EncodeError> {
        let shown = path.display().to_string();
        let mut file = File::open(path).map_err(|e| EncodeError::io(&shown, &e))?;
        let meta = file.metadata().map_err(|e| EncodeError::io(&shown, &e))?;
        let kind = meta.file_type();
        if kind.is_dir() {
            return Err(EncodeError::usage(format!("{shown}: is a directory")));
        }
        let block_device = kind.is_block_device();
        if !kind.is_file() && !block_device {
            return Err(EncodeError::usage(format!(
                "{shown}: not a regular file or block device"
            )));
        }
        let real_size = if block_device {
            file.seek(SeekFrom::End(0))
                .map_err(|e| EncodeError::io(&shown, &e))?
        } else {
            meta.len()
        };
        if real_size == 0 {
            return Err(EncodeError::usage(format!(
                "{shown}: is empty (the format has no 0-byte devices)"
            )));
        }
        if !assume_raw {
            vma_cli::image_format::refuse_images(
                &shown,
                &file,
                "; --assume-raw takes it as a raw disk",
            )?;
        }
        Ok(ImageSource {
            name,
            path: path.to_path_buf(),
            file,
            real_size,
            size: real_size.div_ceil(SECTOR) * SECTOR,
            block_device,
        })
    }

    fn shown(&self) -> String {
        self.path.display().to_string()
    }

    /// Its data and holes (block devices: all data).
    fn hole_finder(&self) -> HoleFinder<'_> {
        if self.block_device {
            HoleFinder::all_data(self.real_size)
        } else {
            HoleFinder::new(&self.file, self.real_size)
        }
    }

    /// Reads `buf.len()` bytes at `offset`; bytes past the end of the file
    /// are zero.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut got = 0;
        while got < buf.len() {
            match self.file.read_at(&mut buf[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        buf[got..].fill(0);
        Ok(())
    }
}

/// The images of one archive as a [`ClusterSource`], device 1 first, each in
/// ascending cluster order: holes as runs of zero clusters without a byte of
/// I/O, data read with `pread` (up to [`CHUNK_CLUSTERS`] at a time) straight
/// into the writer's extent buffer ([`RawRoom`]).
pub struct ImageSources<'a> {
    images: &'a [ImageSource],
    /// The image being read (index), its next cluster, its holes and the
    /// data range found last.
    at: usize,
    next: u64,
    holes: Option<HoleFinder<'a>>,
    data: Option<Range<u64>>,
}

impl<'a> ImageSources<'a> {
    /// The images, as devices 1, 2, … in this order.
    pub fn new(images: &'a [ImageSource]) -> ImageSources<'a> {
        ImageSources {
            images,
            at: 0,
            next: 0,
            holes: None,
            data: None,
        }
    }
}

impl ClusterSource for ImageSources<'_> {
    type Error = EncodeError;

    fn devices(&self) -> Vec<StreamDevice> {
        self.images
            .iter()
            .map(|i| StreamDevice::new(i.name.clone(), i.size))
            .collect()
    }

    fn next_piece<'p>(
        &'p mut self,
        room: &mut RawRoom<'_>,
    ) -> Result<Option<Piece<'p>>, EncodeError> {
        let cs = CLUSTER_SIZE as u64;
        loop {
            let Some(image) = self.images.get(self.at) else {
                return Ok(None);
            };
            let read_err =
                |e: io::Error| EncodeError::io(&format!("{}: read failed", image.shown()), &e);
            let clusters = clusters_for(image.size);
            let dev_id = self.at as u8 + 1;
            let holes = match &mut self.holes {
                Some(h) => h,
                None => {
                    let mut h = image.hole_finder();
                    self.data = h.next_data(0).map_err(read_err)?;
                    self.next = 0;
                    self.holes.insert(h)
                }
            };
            let c = self.next;
            if c >= clusters {
                self.at += 1;
                self.holes = None;
                continue;
            }
            let Some(Range { start, end }) = self.data.clone() else {
                // Only holes follow.
                self.next = clusters;
                return Ok(Some(zeros(dev_id, c, clusters)));
            };
            let first_data = (start / cs).min(clusters);
            if c < first_data {
                self.next = first_data;
                return Ok(Some(zeros(dev_id, c, first_data)));
            }
            let data_end = end.div_ceil(cs).min(clusters);
            if c < data_end {
                let want = ((data_end - c) as usize).min(CHUNK_CLUSTERS);
                let buf = room.clusters(want);
                let n = buf.len() / CLUSTER_SIZE;
                image.read_at(buf, c * cs).map_err(read_err)?;
                self.next = c + n as u64;
                return Ok(Some(Piece::Raw {
                    dev_id,
                    first: c as u32,
                    count: n,
                }));
            }
            self.data = holes.next_data(c * cs).map_err(read_err)?;
        }
    }
}

/// Clusters `from..to` of `dev_id` lie in a hole: all zero, nothing to read.
fn zeros<'p>(dev_id: u8, from: u64, to: u64) -> Piece<'p> {
    Piece::Zeros {
        dev_id,
        first: from as u32,
        count: to - from,
    }
}
