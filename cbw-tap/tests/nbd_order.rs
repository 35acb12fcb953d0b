//! Issue 10: a guest write waiting for its copy-before-write does not hold
//! up the requests behind it on the same NBD connection.
//!
//! The consumer is stopped and the queue full, so a write to a cluster the
//! backup has not copied must wait; a read and a write to an already copied
//! cluster, sent after it on the same connection, are answered first. Only
//! the order of the replies and the counters are asserted, never times.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use cbw_tap::{BackupOptions, CaptureSink, Engine, Policy};
use nbd_server::{bind_unix_socket, Backend, FileBackend, Server};
use vma_format::{Cluster, ClusterBuf, CLUSTER_SIZE};

const CS: u64 = CLUSTER_SIZE as u64;
const CLUSTERS: u64 = 32;

/// A sink that holds the stream writer in `cluster` until opened.
#[derive(Clone, Default)]
struct GateSink {
    inner: Arc<(Mutex<GateState>, Condvar)>,
}

#[derive(Default)]
struct GateState {
    open: bool,
    /// The writer is inside `cluster`, held.
    held: bool,
    clusters: Vec<ClusterBuf>,
    finished: bool,
}

impl GateSink {
    fn open(&self) {
        self.inner.0.lock().unwrap().open = true;
        self.inner.1.notify_all();
    }
    fn held(&self) -> bool {
        self.inner.0.lock().unwrap().held
    }
}

impl CaptureSink for GateSink {
    fn cluster(&mut self, c: &Cluster<'_>) -> std::io::Result<()> {
        let (m, cv) = &*self.inner;
        let mut st = m.lock().unwrap();
        while !st.open {
            st.held = true;
            st = cv.wait(st).unwrap();
        }
        st.held = false;
        st.clusters.push(c.to_owned_buf());
        Ok(())
    }
    fn finish(self) -> std::io::Result<()> {
        self.inner.0.lock().unwrap().finished = true;
        Ok(())
    }
    fn abort(self, _reason: &str) -> std::io::Result<()> {
        Ok(())
    }
}

/// Fixed newstyle, NBD_OPT_GO, simple replies; the timeout only keeps a
/// broken build from hanging the test run.
fn nbd_connect(sock: &Path, name: &str) -> UnixStream {
    test_support::nbd_connect(sock, name, Duration::from_secs(120))
}

fn request(cmd: u16, handle: u64, offset: u64, data_or_len: Result<&[u8], u32>) -> Vec<u8> {
    let len = match data_or_len {
        Ok(d) => d.len() as u32,
        Err(l) => l,
    };
    let mut r = Vec::new();
    r.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    r.extend_from_slice(&0u16.to_be_bytes());
    r.extend_from_slice(&cmd.to_be_bytes());
    r.extend_from_slice(&handle.to_be_bytes());
    r.extend_from_slice(&offset.to_be_bytes());
    r.extend_from_slice(&len.to_be_bytes());
    if let Ok(d) = data_or_len {
        r.extend_from_slice(d);
    }
    r
}

/// Reads one simple reply: (handle, error), with `read_len` bytes of data
/// after it when the handle is `read_handle`.
fn reply(s: &mut UnixStream, read_handle: u64, read_len: usize) -> (u64, u32, Vec<u8>) {
    let mut r = [0u8; 16];
    s.read_exact(&mut r).unwrap();
    assert_eq!(u32::from_be_bytes(r[..4].try_into().unwrap()), 0x6744_6698);
    let errno = u32::from_be_bytes(r[4..8].try_into().unwrap());
    let handle = u64::from_be_bytes(r[8..16].try_into().unwrap());
    let mut data = Vec::new();
    if handle == read_handle && errno == 0 {
        data = vec![0u8; read_len];
        s.read_exact(&mut data).unwrap();
    }
    (handle, errno, data)
}

#[test]
fn a_write_waiting_for_its_copy_does_not_hold_up_reads_and_copied_writes() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.raw");
    let original: Vec<u8> = (0..CLUSTERS * CS)
        .map(|i| (i / 4096 * 31 + i % 251) as u8 | 1)
        .collect();
    std::fs::write(&img, &original).unwrap();
    let disk: Arc<dyn Backend> = Arc::new(FileBackend::open(&img, false).unwrap());
    let engine = Engine::new(vec![("a".into(), disk)]);
    let mut server = Server::new();
    server.add_export("a", Arc::new(engine.backend(0))).unwrap();
    let sock = dir.path().join("nbd.sock");
    let handle = server
        .serve(vec![bind_unix_socket(&sock).unwrap().into()])
        .unwrap();

    // The smallest buffer, a consumer that does not take anything.
    let backup = engine
        .begin(BackupOptions {
            buffer: cbw_tap::MIN_BUFFER,
            cbw_timeout: Duration::from_secs(60),
            policy: Policy::BreakSnapshot,
            bwlimit: None,
            fleecing: None,
            ..BackupOptions::default()
        })
        .unwrap();
    let sink = GateSink::default();
    let run = {
        let (engine, backup, sink) = (Arc::clone(&engine), Arc::clone(&backup), sink.clone());
        thread::spawn(move || engine.run(&backup, move |_| Ok(sink)))
    };
    // Wait until the writer is held with a cluster in hand and another
    // queued: the queue stays full until the sink opens, so any copy must
    // wait. (The deadline only keeps a broken build from hanging.)
    let t0 = Instant::now();
    while !(sink.held() && backup.queued_bytes() > 0) {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the queue never filled"
        );
        thread::sleep(Duration::from_millis(5));
    }
    // The reader copied its first batch (clusters 0..4) before queueing
    // any of it, and is stuck long before the last cluster.
    let s0 = backup.stats();
    assert!(s0.reader_bytes_read >= 4 * CS, "{s0:?}");
    assert_eq!((s0.cbw_reads, s0.cbw_clusters), (0, 0));

    let mut c = nbd_connect(&sock, "a");
    let last = (CLUSTERS - 1) * CS;
    let mut wire = Vec::new();
    // 1: a write to the uncopied last cluster: waits for its copy.
    wire.extend(request(1, 1, last, Ok(&[0xaa; 4096])));
    // 2: a read, 3: a write to copied cluster 1 — sent after it.
    wire.extend(request(0, 2, 0, Err(4096)));
    wire.extend(request(1, 3, CS, Ok(&[0xbb; 4096])));
    c.write_all(&wire).unwrap();

    let first = reply(&mut c, 2, 4096);
    let second = reply(&mut c, 2, 4096);
    let mut answered = [first.0, second.0];
    answered.sort();
    assert_eq!(answered, [2, 3], "the read and the copied write come first");
    assert_eq!((first.1, second.1), (0, 0));
    let read = if first.0 == 2 { &first.2 } else { &second.2 };
    assert!(read[..] == original[..4096], "the read sees the image");
    // The waiting write read its cluster and waits for room to queue it;
    // the copied write was not delayed.
    let s1 = backup.stats();
    assert_eq!(
        (s1.cbw_reads, s1.cbw_clusters, s1.guest_writes_delayed),
        (1, 0, 0),
        "{s1:?}"
    );

    // The consumer goes on: the write completes, and the backup holds the
    // image as it was at the instant.
    sink.open();
    assert_eq!(reply(&mut c, 2, 4096).0, 1);
    run.join().unwrap().unwrap();
    let s = backup.stats();
    assert_eq!(
        (s.cbw_reads, s.cbw_clusters, s.guest_writes_delayed),
        (1, 1, 1),
        "{s:?}"
    );
    assert_eq!(s.clusters_emitted, CLUSTERS);
    let st = sink.inner.0.lock().unwrap();
    assert!(st.finished);
    let mut rebuilt = vec![0u8; (CLUSTERS * CS) as usize];
    for cl in &st.clusters {
        let at = cl.cluster_num as usize * CLUSTER_SIZE;
        cl.as_cluster()
            .expand_into(&mut rebuilt[at..at + CLUSTER_SIZE]);
    }
    assert!(rebuilt == original, "the backup is not the instant");
    let now = std::fs::read(&img).unwrap();
    assert!(now[last as usize..last as usize + 4096] == [0xaa; 4096]);
    assert!(now[CLUSTER_SIZE..CLUSTER_SIZE + 4096] == [0xbb; 4096]);
    drop(c);
    handle.shutdown();
}
