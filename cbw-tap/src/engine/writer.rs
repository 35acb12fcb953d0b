//! The stream writer: drains the queue into the sink, a batch at a time,
//! and returns the buffers for the next captures.

use std::sync::atomic::Ordering;

use super::{Aborted, Backup, CaptureSink};
use crate::queue::Captured;

impl Backup {
    /// Drains the queue into `sink` until the reader has closed it, then
    /// finishes the sink — or, if the backup was aborted, aborts the sink
    /// with the reason. A sink error (the consumer is gone) aborts the
    /// backup. Returns why it was aborted unless the sink was finished.
    /// Like the reader, the calling thread gets nice 10 (backup work yields
    /// to guest I/O) and the backup's `--cpus` for the rest of its life.
    pub fn run_writer<S: CaptureSink>(&self, mut sink: S) -> Result<(), Aborted> {
        self.enter_background_thread();
        let mut emitted = 0u64;
        let mut batch: Vec<Captured> = Vec::new();
        let drained = loop {
            match self.queue.pop_batch(&mut batch) {
                Err(e) => break Err(e.to_string()),
                Ok(false) => break Ok(()),
                Ok(true) => {
                    let written =
                        sink.clusters(batch.iter().map(|c| (c.as_cluster(), c.record_crc())));
                    if written.is_ok() {
                        emitted += batch.len() as u64;
                        self.counters
                            .emitted
                            .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    }
                    self.queue
                        .recycle(batch.drain(..).map(Captured::into_buffer));
                    if let Err(e) = written {
                        break Err(format!("writing the cluster stream failed: {e}"));
                    }
                }
            }
        };
        let fail = |reason: String, sink: S| {
            self.abort(reason);
            let reason = self.abort_reason().unwrap_or_default();
            let _ = sink.abort(&reason);
            Err(Aborted(reason))
        };
        if let Err(reason) = drained {
            return fail(reason, sink);
        }
        if let Some(reason) = self.abort_reason() {
            let _ = sink.abort(&reason);
            return Err(Aborted(reason));
        }
        if emitted != self.expected {
            return fail(
                format!(
                    "internal error: {emitted} clusters captured, {} expected",
                    self.expected
                ),
                sink,
            );
        }
        // Finish while still "running", so a late abort (client gone) is
        // not mistaken for success.
        match sink.finish() {
            Ok(()) => Ok(()),
            Err(e) => {
                let reason = format!("finishing the cluster stream failed: {e}");
                self.abort(reason.clone());
                Err(Aborted(reason))
            }
        }
    }
}
