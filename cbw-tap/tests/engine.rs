//! The copy-before-write engine driven directly (no processes): exact cost
//! counters, concurrent random writes against the instant, the failure
//! policies, and the stream it produces.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use cbw_tap::sink::StreamSink;
use cbw_tap::{BackupOptions, CaptureSink, Engine, Policy};
use nbd_server::{Backend, FileBackend, ZeroFlags};
use vma_format::stream::StreamReader;
use vma_format::{Cluster, ClusterBuf, CLUSTER_SIZE};

const CS: u64 = CLUSTER_SIZE as u64;

/// xorshift64*: deterministic per seed, no dependency.
struct Rng(u64);
impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Collects what the writer emits; `gate` (when closed) holds the writer
/// in `cluster`, to play a stalled consumer.
#[derive(Clone, Default)]
struct MemorySink {
    inner: Arc<(Mutex<MemState>, Condvar)>,
}

#[derive(Default)]
struct MemState {
    clusters: Vec<ClusterBuf>,
    finished: bool,
    aborted: Option<String>,
    stalled: bool,
    delay: Option<Duration>,
}

impl MemorySink {
    fn stall(&self, on: bool) {
        self.inner.0.lock().unwrap().stalled = on;
        self.inner.1.notify_all();
    }
    fn state(&self) -> std::sync::MutexGuard<'_, MemState> {
        self.inner.0.lock().unwrap()
    }
}

impl CaptureSink for MemorySink {
    fn cluster(&mut self, c: &Cluster<'_>) -> std::io::Result<()> {
        let (m, cv) = &*self.inner;
        let mut st = cv.wait_while(m.lock().unwrap(), |s| s.stalled).unwrap();
        if let Some(d) = st.delay {
            drop(st);
            thread::sleep(d);
            st = m.lock().unwrap();
        }
        st.clusters.push(c.to_owned_buf());
        Ok(())
    }
    fn finish(self) -> std::io::Result<()> {
        self.state().finished = true;
        Ok(())
    }
    fn abort(self, reason: &str) -> std::io::Result<()> {
        self.state().aborted = Some(reason.to_string());
        Ok(())
    }
}

/// Rebuilds each device's bytes from emitted clusters, checking that every
/// cluster came exactly once.
fn rebuild(clusters: &[ClusterBuf], sizes: &[u64]) -> Vec<Vec<u8>> {
    let mut seen: HashMap<(u8, u32), ()> = HashMap::new();
    let mut out: Vec<Vec<u8>> = sizes
        .iter()
        .map(|&s| vec![0u8; (s.div_ceil(CS) * CS) as usize])
        .collect();
    for c in clusters {
        assert!(
            seen.insert((c.dev_id, c.cluster_num), ()).is_none(),
            "cluster {} of device {} emitted twice",
            c.cluster_num,
            c.dev_id
        );
        let off = c.cluster_num as usize * CLUSTER_SIZE;
        c.as_cluster()
            .expand_into(&mut out[c.dev_id as usize - 1][off..off + CLUSTER_SIZE]);
    }
    let total: u64 = sizes.iter().map(|s| s.div_ceil(CS)).sum();
    assert_eq!(seen.len() as u64, total, "clusters missing");
    for (o, &s) in out.iter_mut().zip(sizes) {
        o.truncate(s as usize);
    }
    out
}

/// An image of `size` bytes: random data, with a hole at the clusters of
/// `hole` (left sparse).
fn make_image(path: &Path, size: u64, rng: &mut Rng, hole: std::ops::Range<u64>) {
    let f = fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut c = 0;
    use std::os::unix::fs::FileExt;
    while c * CS < size {
        if !hole.contains(&c) {
            let len = (size - c * CS).min(CS) as usize;
            let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            f.write_all_at(&data, c * CS).unwrap();
        }
        c += 1;
    }
}

fn open(path: &Path) -> Arc<dyn Backend> {
    Arc::new(FileBackend::open(path, false).unwrap())
}

#[test]
fn first_write_to_an_uncopied_cluster_costs_one_read_and_one_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.raw");
    let size = 32 * CS;
    make_image(&img, size, &mut Rng::new(1), 20..24);
    let before = fs::read(&img).unwrap();
    let engine = Engine::new(vec![("a".into(), open(&img))]);
    let disk = engine.backend(0);
    let backup = engine.begin(BackupOptions::default()).unwrap();
    // No background reader yet: every cluster is still uncopied.
    let s0 = backup.stats();
    assert_eq!(
        (s0.cbw_reads, s0.cbw_clusters, s0.bytes_read[0].1),
        (0, 0, 0)
    );

    disk.write_at(&[0xab; 100], 5 * CS + 10, false).unwrap();
    let s1 = backup.stats();
    assert_eq!(s1.cbw_reads, 1, "one extra read");
    assert_eq!(s1.cbw_clusters, 1, "one cluster emitted");
    assert_eq!(s1.bytes_read[0].1, CS);
    assert_eq!(s1.guest_writes_delayed, 1);

    // Writes to a copied cluster cost nothing extra.
    for i in 0..10 {
        disk.write_at(&[i; 4096], 5 * CS + 4096 * u64::from(i), i % 2 == 0)
            .unwrap();
    }
    disk.write_zeroes(5 * CS, 8192, ZeroFlags::default())
        .unwrap();
    disk.trim(5 * CS + 8192, 4096).unwrap();
    let s2 = backup.stats();
    assert_eq!(
        (
            s2.cbw_reads,
            s2.cbw_clusters,
            s2.bytes_read[0].1,
            s2.guest_writes_delayed
        ),
        (1, 1, CS, 1)
    );

    // A write over clusters 5..=7 copies only 6 and 7: one read each.
    disk.write_at(&vec![0xcd; 2 * CLUSTER_SIZE], 5 * CS + 100, false)
        .unwrap();
    let s3 = backup.stats();
    assert_eq!(
        (s3.cbw_reads, s3.cbw_clusters, s3.bytes_read[0].1),
        (3, 3, 3 * CS)
    );

    // A hole is captured without reading it.
    disk.write_at(&[1; 10], 21 * CS, false).unwrap();
    let s4 = backup.stats();
    assert_eq!(
        (s4.cbw_reads, s4.cbw_clusters, s4.cbw_hole_clusters),
        (3, 4, 1)
    );
    assert_eq!(s4.bytes_read[0].1, 3 * CS);

    // Reads never involve the backup.
    let mut buf = vec![0u8; 3 * CLUSTER_SIZE];
    disk.read_at(&mut buf, 0).unwrap();
    assert_eq!(backup.stats().cbw_reads, 3);

    // The reader copies the rest, each cluster once; holes are not read.
    let b2 = Arc::clone(&backup);
    let reader = thread::spawn(move || b2.run_reader());
    let sink = MemorySink::default();
    backup.run_writer(sink.clone()).unwrap();
    reader.join().unwrap();
    engine.end(&backup);
    let s = backup.stats();
    assert_eq!(s.clusters_emitted, 32);
    assert_eq!(s.reader_clusters, 28);
    assert_eq!(s.reader_hole_clusters, 3, "clusters 20, 22, 23");
    assert_eq!(
        s.bytes_read[0].1,
        (32 - 4) * CS,
        "every data cluster read once"
    );
    let st = sink.state();
    assert!(st.finished && st.aborted.is_none());
    assert_eq!(rebuild(&st.clusters, &[size])[0], before);

    // After the backup, writes cost nothing and a new backup may begin.
    drop(st);
    disk.write_at(&[9; 10], 0, false).unwrap();
    assert_eq!(backup.stats().cbw_reads, 3);
    let again = engine.begin(BackupOptions::default()).unwrap();
    assert_eq!(
        engine
            .begin(BackupOptions::default())
            .unwrap_err()
            .to_string(),
        format!(
            "a backup is already running (started at {})",
            vma_cli::listing::iso_time(again.time())
        )
    );
    again.abort("test over");
    engine.end(&again);
}

/// Random writes, write-zeroes and trims from several threads per export
/// while the backup runs with a small buffer and a slow consumer: the
/// emitted clusters rebuild the images as they were at the instant, every
/// cluster exactly once, and the live images hold every write.
#[test]
fn concurrent_random_writes_capture_the_instant() {
    // CBW_SEED moves the seeds (scripts/cbw-soak.sh).
    let first: u64 = std::env::var("CBW_SEED").map_or(0, |v| v.parse().unwrap());
    let mut cbw = 0;
    for seed in first..first + 12 {
        cbw += run_random(seed).cbw_clusters;
    }
    // The slow consumer makes guest writes overtake the reader.
    assert!(cbw > 0, "no copy-before-write happened in any run");
}

fn run_random(seed: u64) -> cbw_tap::Stats {
    let mut rng = Rng::new(seed + 100);
    let dir = tempfile::tempdir().unwrap();
    let sizes = [
        64 * CS,
        40 * CS + 12_345, // a short last cluster
        8 * CS,
    ];
    let mut paths = Vec::new();
    for (i, &size) in sizes.iter().enumerate() {
        let p = dir.path().join(format!("d{i}.raw"));
        let h = rng.below(size.div_ceil(CS));
        make_image(&p, size, &mut rng, h..h + 3);
        paths.push(p);
    }
    let snapshot: Vec<Vec<u8>> = paths.iter().map(|p| fs::read(p).unwrap()).collect();
    let engine = Engine::new(
        paths
            .iter()
            .enumerate()
            .map(|(i, p)| (format!("d{i}"), open(p)))
            .collect(),
    );
    let options = BackupOptions {
        buffer: cbw_tap::MIN_BUFFER + (rng.below(4) * CS) as usize,
        cbw_timeout: Duration::from_secs(30),
        policy: Policy::BreakSnapshot,
        bwlimit: None,
        fleecing: None,
        ..BackupOptions::default()
    };
    let backup = engine.begin(options).unwrap();
    let sink = MemorySink::default();
    sink.state().delay = Some(Duration::from_micros(200));
    let b2 = Arc::clone(&backup);
    let reader = thread::spawn(move || b2.run_reader());
    let b3 = Arc::clone(&backup);
    let s2 = sink.clone();
    let writer = thread::spawn(move || b3.run_writer(s2));

    // Two writer threads per export, on disjoint halves, each keeping its
    // own expected image.
    let mut threads = Vec::new();
    for (dev, &size) in sizes.iter().enumerate() {
        for half in 0..2u64 {
            let disk = engine.backend(dev);
            let mut expect = snapshot[dev].clone();
            let tseed = rng.next();
            threads.push(thread::spawn(move || {
                let mut r = Rng::new(tseed);
                let lo = if half == 0 { 0 } else { size / 2 };
                let hi = if half == 0 { size / 2 } else { size };
                for _ in 0..40 {
                    let off = lo + r.below(hi - lo);
                    let len = 1 + r.below((hi - off).min(3 * CS));
                    let (o, l) = (off as usize, len as usize);
                    match r.below(10) {
                        0 => {
                            disk.write_zeroes(off, len, ZeroFlags::default()).unwrap();
                            expect[o..o + l].fill(0);
                        }
                        1 => {
                            disk.write_zeroes(
                                off,
                                len,
                                ZeroFlags {
                                    may_punch_hole: false,
                                    fast_only: false,
                                },
                            )
                            .unwrap();
                            expect[o..o + l].fill(0);
                        }
                        _ => {
                            let b = r.next() as u8 | 1;
                            disk.write_at(&vec![b; l], off, r.below(4) == 0).unwrap();
                            expect[o..o + l].fill(b);
                        }
                    }
                    if r.below(8) == 0 {
                        thread::sleep(Duration::from_micros(r.below(2000)));
                    }
                }
                (dev, half, expect)
            }));
        }
    }
    let mut expected: Vec<Vec<u8>> = snapshot.clone();
    for t in threads {
        let (dev, half, e) = t.join().unwrap();
        let mid = (sizes[dev] / 2) as usize;
        if half == 0 {
            expected[dev][..mid].copy_from_slice(&e[..mid]);
        } else {
            expected[dev][mid..].copy_from_slice(&e[mid..]);
        }
    }
    writer.join().unwrap().unwrap();
    reader.join().unwrap();
    engine.end(&backup);
    let st = sink.state();
    assert!(st.finished, "seed {seed}: not finished");
    let rebuilt = rebuild(&st.clusters, &sizes);
    for dev in 0..sizes.len() {
        assert!(
            rebuilt[dev] == snapshot[dev],
            "seed {seed}: device {dev} differs from the instant"
        );
        assert!(
            fs::read(&paths[dev]).unwrap() == expected[dev],
            "seed {seed}: device {dev} lost a write"
        );
    }
    let s = backup.stats();
    assert_eq!(
        s.reader_clusters + s.cbw_clusters,
        s.clusters_emitted,
        "seed {seed}"
    );
    assert_eq!(s.snapshot_breaks + s.guest_writes_failed, 0, "seed {seed}");
    eprintln!(
        "seed {seed}: {} by reader, {} by copy-before-write, {} writes delayed",
        s.reader_clusters, s.cbw_clusters, s.guest_writes_delayed
    );
    s
}

/// Sets up one export and a backup whose consumer is stalled, with the
/// reader not started: the queue holds one cluster, so the second guest
/// copy has to wait.
fn stalled(
    policy: Policy,
) -> (
    tempfile::TempDir,
    Arc<Engine>,
    Arc<cbw_tap::Backup>,
    MemorySink,
    Vec<u8>,
) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.raw");
    make_image(&img, 8 * CS, &mut Rng::new(7), 0..0);
    let before = fs::read(&img).unwrap();
    let engine = Engine::new(vec![("a".into(), open(&img))]);
    let backup = engine
        .begin(BackupOptions {
            buffer: cbw_tap::MIN_BUFFER,
            cbw_timeout: Duration::from_millis(200),
            policy,
            bwlimit: None,
            fleecing: None,
            ..BackupOptions::default()
        })
        .unwrap();
    let sink = MemorySink::default();
    sink.stall(true);
    (dir, engine, backup, sink, before)
}

#[test]
fn break_guest_write_fails_the_write_and_keeps_the_backup() {
    let (dir, engine, backup, sink, before) = stalled(Policy::BreakGuestWrite);
    let disk = engine.backend(0);
    let b2 = Arc::clone(&backup);
    let s2 = sink.clone();
    let writer = thread::spawn(move || b2.run_writer(s2));
    // Fills the writer's hands and the queue.
    disk.write_at(&[1; 10], 0, false).unwrap();
    disk.write_at(&[1; 10], CS, false).unwrap();
    let t0 = Instant::now();
    let err = disk.write_at(&[2; 10], 2 * CS, false).unwrap_err();
    assert!(t0.elapsed() >= Duration::from_millis(200));
    assert_eq!(
        err.to_string(),
        "copy-before-write on a timed out after 0.2 s (the consumer does not keep up)"
    );
    assert!(!backup.is_over());
    let s = backup.stats();
    assert_eq!((s.guest_writes_failed, s.snapshot_breaks), (1, 0));
    // The failed write did not happen; once the consumer moves, the
    // backup completes with the instant's content.
    sink.stall(false);
    let b3 = Arc::clone(&backup);
    thread::spawn(move || b3.run_reader()).join().unwrap();
    writer.join().unwrap().unwrap();
    engine.end(&backup);
    assert!(sink.state().finished);
    assert_eq!(rebuild(&sink.state().clusters, &[8 * CS])[0], before);
    let now = fs::read(dir.path().join("a.raw")).unwrap();
    assert_eq!(
        &now[2 * CLUSTER_SIZE..2 * CLUSTER_SIZE + 10],
        &before[2 * CLUSTER_SIZE..2 * CLUSTER_SIZE + 10]
    );
    assert_eq!(&now[..10], &[1; 10]);
}

#[test]
fn break_snapshot_aborts_the_backup_and_lets_the_write_through() {
    let (dir, engine, backup, sink, _before) = stalled(Policy::BreakSnapshot);
    let disk = engine.backend(0);
    let b2 = Arc::clone(&backup);
    let s2 = sink.clone();
    let writer = thread::spawn(move || b2.run_writer(s2));
    disk.write_at(&[1; 10], 0, false).unwrap();
    disk.write_at(&[1; 10], CS, false).unwrap();
    let t0 = Instant::now();
    disk.write_at(&[2; 10], 2 * CS, false).unwrap();
    assert!(t0.elapsed() >= Duration::from_millis(200));
    assert!(backup.is_over());
    let reason = "copy-before-write on a timed out after 0.2 s (the consumer does not keep up)";
    assert_eq!(backup.abort_reason().as_deref(), Some(reason));
    sink.stall(false);
    assert_eq!(writer.join().unwrap(), Err(reason.into()));
    // The reader stops at once.
    backup.run_reader();
    engine.end(&backup);
    assert_eq!(sink.state().aborted.as_deref(), Some(reason));
    assert!(!sink.state().finished);
    // Later writes pass straight through, and a new backup may start.
    disk.write_at(&[3; 10], 3 * CS, false).unwrap();
    let now = fs::read(dir.path().join("a.raw")).unwrap();
    assert_eq!(&now[2 * CLUSTER_SIZE..2 * CLUSTER_SIZE + 10], &[2; 10]);
    assert_eq!(&now[3 * CLUSTER_SIZE..3 * CLUSTER_SIZE + 10], &[3; 10]);
    let next = engine.begin(BackupOptions::default()).unwrap();
    next.abort("done");
    engine.end(&next);
}

/// The real stream: what StreamSink writes, StreamReader accepts, and it
/// rebuilds the instant.
#[test]
fn stream_sink_output_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.raw");
    let b = dir.path().join("b.raw");
    make_image(&a, 10 * CS + 700, &mut Rng::new(3), 2..4);
    make_image(&b, 3 * CS, &mut Rng::new(4), 0..0);
    let snap = [fs::read(&a).unwrap(), fs::read(&b).unwrap()];
    let engine = Engine::new(vec![
        ("disk-a".into(), open(&a)),
        ("disk-b".into(), open(&b)),
    ]);
    let backup = engine.begin(BackupOptions::default()).unwrap();
    engine
        .backend(0)
        .write_at(&[5; 3000], 9 * CS, false)
        .unwrap();
    let b2 = Arc::clone(&backup);
    let reader = thread::spawn(move || b2.run_reader());
    let mut bytes = Vec::new();
    let sink = StreamSink::new(&mut bytes, &backup).unwrap();
    backup.run_writer(sink).unwrap();
    reader.join().unwrap();
    engine.end(&backup);
    let mut rd = StreamReader::new(&bytes[..]).unwrap();
    assert_eq!(rd.backup_time(), backup.time());
    let devs: Vec<(String, u64)> = rd
        .devices()
        .iter()
        .map(|d| (d.name.clone(), d.size))
        .collect();
    assert_eq!(
        devs,
        vec![
            ("disk-a".into(), (10 * CS + 700).div_ceil(512) * 512),
            ("disk-b".into(), 3 * CS)
        ]
    );
    let mut got = Vec::new();
    while let Some(c) = rd.next_cluster().unwrap() {
        got.push(c.to_owned_buf());
    }
    let rebuilt = rebuild(&got, &[10 * CS + 700, 3 * CS]);
    assert!(rebuilt[0] == snap[0] && rebuilt[1] == snap[1]);
    // Aborted: the reader fails with the reason.
    let backup = engine.begin(BackupOptions::default()).unwrap();
    backup.abort("operator cancelled");
    let mut bytes = Vec::new();
    let sink = StreamSink::new(&mut bytes, &backup).unwrap();
    assert_eq!(backup.run_writer(sink), Err("operator cancelled".into()));
    engine.end(&backup);
    let mut rd = StreamReader::new(&bytes[..]).unwrap();
    let err = rd.next_cluster().unwrap_err().to_string();
    assert!(
        err.contains("the producer aborted the stream: operator cancelled"),
        "{err}"
    );
    let _ = std::io::stdout().flush();
}

#[test]
fn fleecing_spills_instead_of_stalling_the_guest() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.raw");
    make_image(&img, 8 * CS, &mut Rng::new(17), 6..7);
    let before = fs::read(&img).unwrap();
    let fleece = dir.path().join("fleece");
    let engine = Engine::new(vec![("a".into(), open(&img))]);
    let backup = engine
        .begin(BackupOptions {
            buffer: cbw_tap::MIN_BUFFER,
            cbw_timeout: Duration::from_millis(200),
            policy: Policy::BreakSnapshot,
            bwlimit: None,
            fleecing: Some(fleece.clone()),
            ..BackupOptions::default()
        })
        .unwrap();
    assert!(fleece.exists());
    let sink = MemorySink::default();
    sink.stall(true);
    let b2 = Arc::clone(&backup);
    let s2 = sink.clone();
    let writer = thread::spawn(move || b2.run_writer(s2));
    let disk = engine.backend(0);
    for c in 0..8 {
        disk.write_at(&[0x77; 5000], c * CS + 100, false).unwrap();
    }
    // The consumer is stalled all along: a guest copy that had waited for
    // room in the queue would have timed out (200 ms) and, with
    // break-snapshot, aborted the backup. None did: every copy that found
    // the queue full went to the file instead.
    let s = backup.stats();
    assert!(!backup.is_over(), "{:?}", backup.abort_reason());
    assert_eq!(s.snapshot_breaks, 0);
    assert_eq!(s.cbw_clusters, 8);
    assert!(s.spilled_clusters >= 5, "{s:?}");
    assert_eq!(s.cbw_hole_clusters, 1);
    sink.stall(false);
    let b3 = Arc::clone(&backup);
    thread::spawn(move || b3.run_reader()).join().unwrap();
    writer.join().unwrap().unwrap();
    engine.end(&backup);
    assert!(!fleece.exists(), "the fleecing file is removed at the end");
    assert!(sink.state().finished);
    assert_eq!(rebuild(&sink.state().clusters, &[8 * CS])[0], before);

    // A fleecing path that exists is refused.
    fs::write(&fleece, b"x").unwrap();
    let err = engine
        .begin(BackupOptions {
            fleecing: Some(fleece.clone()),
            ..BackupOptions::default()
        })
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "fleecing file {}: File exists (os error 17)",
            fleece.display()
        )
    );
    assert!(engine.current().is_none());
}

/// A sink that panics at its `n`th cluster.
struct PanickingSink {
    at: usize,
    seen: usize,
}

impl CaptureSink for PanickingSink {
    fn cluster(&mut self, _c: &Cluster<'_>) -> std::io::Result<()> {
        if self.seen == self.at {
            panic!("boom at cluster {}", self.seen);
        }
        self.seen += 1;
        Ok(())
    }
    fn finish(self) -> std::io::Result<()> {
        Ok(())
    }
    fn abort(self, _reason: &str) -> std::io::Result<()> {
        Ok(())
    }
}

/// Issue 8, item 12: a panic in the stream writer (or in making its sink)
/// aborts that backup with a reason and ends it; the engine is not left
/// "running", guest writes pass through, and the next backup is complete.
#[test]
fn a_panic_in_the_stream_writer_ends_the_backup_and_the_next_one_works() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.raw");
    make_image(&img, 16 * CS, &mut Rng::new(31), 3..5);
    let engine = Engine::new(vec![("a".into(), open(&img))]);
    let disk = engine.backend(0);

    let backup = engine.begin(BackupOptions::default()).unwrap();
    let result = engine.run(&backup, |_| Ok(PanickingSink { at: 3, seen: 0 }));
    assert_eq!(
        result,
        Err("internal error: the stream writer panicked: boom at cluster 3".into())
    );
    assert!(backup.is_over());
    assert!(engine.current().is_none(), "the backup is still running");

    // The sink's constructor panicking is no different.
    let backup = engine.begin(BackupOptions::default()).unwrap();
    let result = engine.run(&backup, |_| -> std::io::Result<MemorySink> {
        panic!("no sink today")
    });
    assert_eq!(
        result,
        Err("internal error: the stream writer panicked: no sink today".into())
    );
    assert!(engine.current().is_none());

    // Writes pass straight through (no copy is made for an ended backup).
    disk.write_at(&[0x42; 4096], 7 * CS, false).unwrap();
    assert_eq!(backup.stats().cbw_clusters, 0);

    // The next backup runs to its end and holds the image as it is now.
    let now = fs::read(&img).unwrap();
    let backup = engine.begin(BackupOptions::default()).unwrap();
    let sink = MemorySink::default();
    let s2 = sink.clone();
    engine.run(&backup, move |_| Ok(s2)).unwrap();
    assert!(engine.current().is_none());
    let st = sink.state();
    assert!(st.finished);
    assert_eq!(rebuild(&st.clusters, &[16 * CS])[0], now);
}

/// Simulated time for the reader's pacing: `sleep` advances it at once.
#[derive(Default)]
struct SimClock {
    ns: std::sync::atomic::AtomicU64,
}

impl cbw_tap::pace::Clock for SimClock {
    fn now(&self) -> Duration {
        Duration::from_nanos(self.ns.load(std::sync::atomic::Ordering::SeqCst))
    }
    fn sleep(&self, d: Duration) {
        self.ns
            .fetch_add(d.as_nanos() as u64, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A backend that logs every read: (simulated time, length, whether the
/// background reader's thread made it).
struct LoggingBackend {
    inner: FileBackend,
    clock: Arc<SimClock>,
    reads: Mutex<Vec<(Duration, u64, bool)>>,
}

impl Backend for LoggingBackend {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        use cbw_tap::pace::Clock;
        let reader = thread::current().name() == Some("paced-reader");
        self.reads
            .lock()
            .unwrap()
            .push((self.clock.now(), buf.len() as u64, reader));
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> std::io::Result<()> {
        self.inner.write_at(buf, offset, fua)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn trim(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.trim(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> std::io::Result<()> {
        self.inner.write_zeroes(offset, len, flags)
    }
    fn block_status(&self, offset: u64, len: u64) -> std::io::Result<Vec<nbd_server::Extent>> {
        self.inner.block_status(offset, len)
    }
}

/// Issue 14: with `--bwlimit`, the background reader's own bytes never
/// exceed the budget (`limit × t` from its start, `cap + limit × Δt` over
/// any stretch), at 64 KiB/s as at 8 MiB/s; copy-before-write reads are not
/// charged to it, so the reader's time is its own bytes / limit exactly.
#[test]
fn bwlimit_charges_only_the_readers_bytes_and_holds_at_any_rate() {
    for (rate, rewritten) in [
        (64 * 1024u64, true),
        (64 * 1024, false),
        (512 * 1024, true),
        (8 << 20, true),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("a.raw");
        let clusters = 64;
        // Clusters 10..12 are a hole: captured without a read, not charged.
        make_image(&img, clusters * CS, &mut Rng::new(rate), 10..12);
        let before = fs::read(&img).unwrap();
        let clock = Arc::new(SimClock::default());
        let backend = Arc::new(LoggingBackend {
            inner: FileBackend::open(&img, false).unwrap(),
            clock: Arc::clone(&clock),
            reads: Mutex::new(Vec::new()),
        });
        let engine = Engine::new(vec![("a".into(), Arc::clone(&backend) as Arc<dyn Backend>)]);
        let backup = engine
            .begin(BackupOptions {
                bwlimit: Some(rate),
                ..BackupOptions::default()
            })
            .unwrap();
        // Right after the instant the guest rewrites the second half:
        // copy-before-write reads it, unlimited.
        let disk = engine.backend(0);
        if rewritten {
            for c in clusters / 2..clusters {
                disk.write_at(&[0xee; 100], c * CS, false).unwrap();
            }
        }
        let b2 = Arc::clone(&backup);
        let c2 = Arc::clone(&clock);
        thread::Builder::new()
            .name("paced-reader".into())
            .spawn(move || b2.run_reader_with_clock(&*c2))
            .unwrap()
            .join()
            .unwrap();
        let sink = MemorySink::default();
        backup.run_writer(sink.clone()).unwrap();
        engine.end(&backup);
        assert_eq!(rebuild(&sink.state().clusters, &[clusters * CS])[0], before);

        let s = backup.stats();
        let data_clusters = clusters - 2;
        let cbw = if rewritten { clusters / 2 } else { 0 };
        assert_eq!(s.cbw_bytes_read, cbw * CS, "rate {rate}");
        assert_eq!(
            s.reader_bytes_read,
            (data_clusters - cbw) * CS,
            "rate {rate}"
        );
        let reads = backend.reads.lock().unwrap();
        let reader: Vec<(Duration, u64)> =
            reads.iter().filter(|r| r.2).map(|r| (r.0, r.1)).collect();
        assert_eq!(reader.iter().map(|r| r.1).sum::<u64>(), s.reader_bytes_read);
        assert_eq!(
            reads.iter().filter(|r| !r.2).map(|r| r.1).sum::<u64>(),
            s.cbw_bytes_read
        );
        // The budget: bytes read up to and including a read started at t
        // are at most rate × t; over any stretch of reads at most the
        // bucket's cap (256 KiB, or 50 ms worth) more than rate × Δt.
        let cap = (4 * CS).max(rate / 20);
        let budget = |ns: u128| ns * u128::from(rate) / 1_000_000_000;
        let mut total = 0u64;
        for (i, &(t, len)) in reader.iter().enumerate() {
            total += len;
            assert!(
                u128::from(total) <= budget(t.as_nanos()),
                "rate {rate}: {total} bytes read by {t:?}"
            );
            let mut stretch = 0u64;
            for &(u, l) in reader[..=i].iter().rev() {
                stretch += l;
                assert!(
                    u128::from(stretch) <= u128::from(cap) + budget((t - u).as_nanos()),
                    "rate {rate}: {stretch} bytes between {u:?} and {t:?}"
                );
            }
        }
        // And the reader took exactly as long as its own bytes need at the
        // limit: nothing was charged for copy-before-write or holes.
        let own = Duration::from_nanos(
            (u128::from(s.reader_bytes_read) * 1_000_000_000).div_ceil(u128::from(rate)) as u64,
        );
        let last = reader.last().unwrap().0;
        assert!(
            last <= own && own - last < Duration::from_micros(1),
            "rate {rate}: last read at {last:?}, own bytes need {own:?}"
        );
        assert_eq!(
            s.reader_pace_wait,
            cbw_tap::pace::Clock::now(&*clock),
            "rate {rate}"
        );
    }
}

/// Issue 14: a pacing sleep, however long, ends when the backup is aborted.
#[test]
fn abort_wakes_a_pacing_reader() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.raw");
    make_image(&img, 8 * CS, &mut Rng::new(3), 0..0);
    let engine = Engine::new(vec![("a".into(), open(&img))]);
    let backup = engine
        .begin(BackupOptions {
            bwlimit: Some(1), // one byte per second: days per batch
            ..BackupOptions::default()
        })
        .unwrap();
    let b2 = Arc::clone(&backup);
    let reader = thread::spawn(move || b2.run_reader());
    // Give the reader time to fall asleep (not needed for correctness).
    thread::sleep(Duration::from_millis(100));
    backup.abort("operator cancelled");
    reader.join().unwrap();
    assert_eq!(backup.stats().reader_bytes_read, 0);
    assert_eq!(
        backup.run_writer(MemorySink::default()),
        Err("operator cancelled".into())
    );
    engine.end(&backup);
}

#[test]
fn a_backup_on_cpus_the_server_may_not_use_is_refused_before_the_instant() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.raw");
    make_image(&img, 4 * CS, &mut Rng::new(3), 0..0);
    let engine = Engine::new(vec![("a".into(), open(&img))]);
    let allowed = cbw_tap::cpus::CpuList::allowed().unwrap();
    let options = BackupOptions {
        cpus: cbw_tap::cpus::CpuList::new([1023]),
        ..BackupOptions::default()
    };
    assert_eq!(
        engine.begin(options).unwrap_err().to_string(),
        format!("cpus: CPU 1023 is not available (this process may use CPUs {allowed})")
    );
    // Nothing began: a backup on CPUs it may use starts at once.
    let options = BackupOptions {
        cpus: Some(allowed),
        ..BackupOptions::default()
    };
    engine.begin(options).unwrap().abort("test over");
}
