//! One disk to standard output, as a raw image in order: `extract --stdout
//! DEVNAME ARCHIVE | dd of=/dev/zvol/…` (or `| ssh host 'dd of=…'`,
//! `| zstd`, `| qemu-img dd`).
//!
//! An archive may hold a device's clusters in any order (a live backup
//! copies a cluster out of turn when the guest writes to it). Clusters that
//! arrive ahead of the next one to write wait in a reorder buffer of a
//! bounded size ([`DEFAULT_REORDER_BUFFER`] unless told otherwise: their
//! stored bytes plus [`ENTRY_COST`] each); beyond it they go to a temporary
//! file in `$TMPDIR`, created unnamed (`O_TMPFILE`), so it is gone when the
//! process ends however it ends. The whole archive is read and checked; the
//! exit status says whether it was sound, though what came before a problem
//! has been written already.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;

use vma_cli::{exit, Failure};
use vma_format::{
    Archive, BlockMask, Cluster, ClusterSink, Flow, Summary, BLOCK_SIZE, CLUSTER_SIZE,
};

/// Reorder buffer unless `--reorder-buffer` says otherwise: 64 MiB.
pub const DEFAULT_REORDER_BUFFER: usize = 64 << 20;
/// What a buffered cluster costs beyond its stored bytes.
pub const ENTRY_COST: usize = 64;

static ZEROS: [u8; CLUSTER_SIZE] = [0; CLUSTER_SIZE];

/// A cluster waiting in memory.
struct Held {
    mask: BlockMask,
    data: Box<[u8]>,
}

/// Clusters waiting in the spill file, each at its own offset.
struct Spill {
    file: File,
    present: BTreeSet<u32>,
    /// The file's length: it covers every cluster in it, holes included.
    len: u64,
}

struct StreamSink<W: Write> {
    dev_id: u8,
    size: u64,
    next: u32,
    held: BTreeMap<u32, Held>,
    held_bytes: usize,
    limit: usize,
    spill: Option<Spill>,
    spill_buf: Vec<u8>,
    out: W,
}

impl<W: Write> StreamSink<W> {
    /// Writes cluster `n` (`mask`, stored blocks `data`), clipped at the
    /// device end.
    fn emit(&mut self, n: u32, mask: BlockMask, data: &[u8]) -> io::Result<()> {
        let start = n as u64 * CLUSTER_SIZE as u64;
        let len = (self.size - start).min(CLUSTER_SIZE as u64) as usize;
        let mut at = 0;
        let mut stored = data.chunks_exact(BLOCK_SIZE);
        for i in 0..CLUSTER_SIZE / BLOCK_SIZE {
            if at >= len {
                break;
            }
            let take = (len - at).min(BLOCK_SIZE);
            if mask.has(i) {
                let block = stored.next().expect("the mask counts the blocks");
                self.out.write_all(&block[..take])?;
            } else {
                self.out.write_all(&ZEROS[..take])?;
            }
            at += take;
        }
        Ok(())
    }

    /// Writes whatever waits from `self.next` on.
    fn drain(&mut self) -> io::Result<()> {
        loop {
            let n = self.next;
            if let Some(h) = self.held.remove(&n) {
                self.held_bytes -= h.data.len() + ENTRY_COST;
                self.emit(n, h.mask, &h.data)?;
            } else if self.spill.as_mut().is_some_and(|s| s.present.remove(&n)) {
                let spill = self.spill.as_ref().expect("checked");
                let mut buf = std::mem::take(&mut self.spill_buf);
                buf.resize(CLUSTER_SIZE, 0);
                spill
                    .file
                    .read_exact_at(&mut buf, n as u64 * CLUSTER_SIZE as u64)
                    .map_err(|e| io::Error::new(e.kind(), format!("reorder spill file: {e}")))?;
                let r = self.emit(n, BlockMask::FULL, &buf);
                self.spill_buf = buf;
                r?;
            } else {
                return Ok(());
            }
            self.next += 1;
        }
    }

    /// Keeps a cluster that came early: in memory while the buffer has
    /// room, else in the spill file.
    fn hold(&mut self, c: &Cluster<'_>) -> io::Result<()> {
        let cost = c.data.len() + ENTRY_COST;
        if self.held_bytes + cost <= self.limit {
            self.held_bytes += cost;
            self.held.insert(
                c.cluster_num,
                Held {
                    mask: c.mask,
                    data: c.data.into(),
                },
            );
            return Ok(());
        }
        if self.spill.is_none() {
            let file = tempfile::tempfile().map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "cannot create the reorder spill file in {}: {e}",
                        std::env::temp_dir().display()
                    ),
                )
            })?;
            self.spill = Some(Spill {
                file,
                present: BTreeSet::new(),
                len: 0,
            });
        }
        let spill = self.spill.as_mut().expect("created");
        // At the cluster's own offset: zero blocks stay holes and read back as zeros.
        for (block, bytes) in c.runs() {
            spill
                .file
                .write_all_at(bytes, c.offset() + (block * BLOCK_SIZE) as u64)
                .map_err(|e| io::Error::new(e.kind(), format!("reorder spill file: {e}")))?;
        }
        // Trailing zero blocks are holes past the end unless the file covers them.
        let end = c.offset() + CLUSTER_SIZE as u64;
        if spill.len < end {
            spill
                .file
                .set_len(end)
                .map_err(|e| io::Error::new(e.kind(), format!("reorder spill file: {e}")))?;
            spill.len = end;
        }
        spill.present.insert(c.cluster_num);
        Ok(())
    }
}

impl<W: Write> ClusterSink for StreamSink<W> {
    fn cluster(&mut self, c: &Cluster<'_>) -> io::Result<Flow> {
        if c.dev_id != self.dev_id {
            return Ok(Flow::Continue);
        }
        if c.cluster_num == self.next {
            self.emit(c.cluster_num, c.mask, c.data)?;
            self.next += 1;
            self.drain()?;
            if self.held.is_empty() {
                // Caught up: let the consumer have it now.
                self.out.flush()?;
            }
        } else {
            self.hold(c)?;
        }
        Ok(Flow::Continue)
    }

    fn finish(&mut self, _: &vma_format::Summary) -> io::Result<()> {
        self.out.flush()
    }
}

/// Writes device `devname` of `archive` (named `input`) to `out` as a raw
/// image, buffering at most `buffer` bytes of early clusters in memory.
pub fn extract_to_stdout<R: Read, W: Write>(
    mut archive: Archive<R>,
    input: &str,
    devname: &str,
    buffer: usize,
    out: W,
) -> Result<Summary, Failure> {
    let Some(dev) = archive
        .header()
        .devices()
        .iter()
        .find(|d| d.c_name() == devname.as_bytes())
    else {
        return Err(Failure::new(
            exit::USAGE,
            format!("{input}: no device named {devname:?} in the archive"),
        ));
    };
    if dev.is_vmstate() {
        return Err(Failure::new(
            exit::USAGE,
            format!(
                "{input}: {devname:?} is the VM's RAM state, not a disk: extract it into a directory"
            ),
        ));
    }
    let mut sink = StreamSink {
        dev_id: dev.id,
        size: dev.size,
        next: 0,
        held: BTreeMap::new(),
        held_bytes: 0,
        limit: buffer,
        spill: None,
        spill_buf: Vec::new(),
        out: BufWriter::with_capacity(1 << 20, out),
    };
    match archive.run(&mut sink) {
        Ok(summary) => Ok(summary),
        Err(e) => Err(match e.io_error() {
            Some(io) if io.kind() == io::ErrorKind::BrokenPipe => Failure::new(
                exit::IO,
                format!("stdout: broken pipe: the reader of {devname}'s image stopped reading"),
            ),
            _ => Failure::format(input, &e),
        }),
    }
}
