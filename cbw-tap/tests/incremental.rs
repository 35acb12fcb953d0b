//! Changed-cluster tracking and incremental backups, driven through the
//! engine: exact counters (only changed clusters are read), the stream's
//! identity, failed backups and the state file.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use cbw_tap::engine::changed::{StateError, StateProblem};
use cbw_tap::sink::StreamSink;
use cbw_tap::{BackupOptions, Engine};
use nbd_server::{Backend, FileBackend, ZeroFlags};
use vma_format::stream::StreamReader;
use vma_format::CLUSTER_SIZE;

const CS: u64 = CLUSTER_SIZE as u64;

fn image(path: &Path, clusters: u64) {
    let f = fs::File::create(path).unwrap();
    for c in 0..clusters {
        f.write_all_at(&vec![(c as u8) | 1; CLUSTER_SIZE], c * CS)
            .unwrap();
    }
}

fn open(path: &Path) -> Arc<dyn Backend> {
    Arc::new(FileBackend::open(path, false).unwrap())
}

/// Runs a backup to a stream in memory; returns the stream (or the abort).
fn run(engine: &Arc<Engine>, options: BackupOptions) -> (Vec<u8>, cbw_tap::Stats, bool) {
    let backup = engine.begin(options).unwrap();
    let out = Arc::new(std::sync::Mutex::new(Vec::new()));
    struct Shared(Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let o2 = Arc::clone(&out);
    let ok = engine
        .run(&backup, move |b| StreamSink::new(Shared(o2), b))
        .is_ok();
    let bytes = out.lock().unwrap().clone();
    (bytes, backup.stats(), ok)
}

fn clusters_of(stream: &[u8]) -> Vec<(u8, u32, Vec<u8>)> {
    let mut r = StreamReader::new(stream).unwrap();
    let mut v = Vec::new();
    while let Some(c) = r.next_cluster().unwrap() {
        let mut full = vec![0u8; CLUSTER_SIZE];
        c.expand_into(&mut full);
        v.push((c.dev_id, c.cluster_num, full));
    }
    v.sort_by_key(|x| (x.0, x.1));
    v
}

fn incremental() -> BackupOptions {
    BackupOptions {
        incremental: true,
        ..BackupOptions::default()
    }
}

#[test]
fn incremental_reads_only_changed_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.raw"), dir.path().join("b.raw"));
    image(&a, 64);
    image(&b, 16);
    let engine = Engine::new(vec![("a".into(), open(&a)), ("b".into(), open(&b))]);
    let (da, db) = (engine.backend(0), engine.backend(1));

    // No base yet: an incremental request is full.
    let (s1, st1, ok) = run(&engine, incremental());
    assert!(ok);
    assert_eq!(st1.clusters_emitted, 80);
    let r1 = StreamReader::new(&s1[..]).unwrap();
    let id1 = *r1.identity().unwrap();
    assert!(id1.base.is_none());
    let base = engine.changes().base().unwrap();
    assert_eq!(base.uuid, id1.uuid);
    assert_eq!(base.time, r1.backup_time());
    assert_eq!(engine.changes().changed_count(0), 0);

    // Writes, write-zeroes and trims after it are recorded, each cluster once.
    da.write_at(&[0xee; 10], 3 * CS + 5, false).unwrap();
    da.write_at(&[0xee; 10], 3 * CS + 500, false).unwrap();
    da.write_at(&vec![0xdd; CLUSTER_SIZE], 10 * CS + 1, false)
        .unwrap(); // clusters 10 and 11
    da.write_zeroes(40 * CS, 2 * CS, ZeroFlags::default())
        .unwrap(); // 40, 41
    db.trim(15 * CS, 4096).unwrap(); // b: 15
    assert_eq!(engine.changes().changed_count(0), 5);
    assert_eq!(engine.changes().changed_count(1), 1);
    let now_a = fs::read(&a).unwrap();
    let now_b = fs::read(&b).unwrap();

    let (s2, st2, ok) = run(&engine, incremental());
    assert!(ok);
    // Exactly the changed clusters were read and emitted.
    assert_eq!(st2.clusters_emitted, 6);
    assert_eq!(st2.reader_clusters + st2.cbw_clusters, 6);
    let read: u64 = st2.bytes_read.iter().map(|(_, n)| n).sum();
    assert!(read <= 6 * CS, "read {read} bytes for 6 changed clusters");
    let r2 = StreamReader::new(&s2[..]).unwrap();
    let id2 = *r2.identity().unwrap();
    assert_eq!(id2.base.unwrap(), base);
    assert!(r2.backup_time() > base.time, "instants differ");
    let got = clusters_of(&s2);
    let names: Vec<(u8, u32)> = got.iter().map(|x| (x.0, x.1)).collect();
    assert_eq!(names, [(1, 3), (1, 10), (1, 11), (1, 40), (1, 41), (2, 15)]);
    for (dev, c, data) in &got {
        let img = if *dev == 1 { &now_a } else { &now_b };
        let off = *c as usize * CLUSTER_SIZE;
        assert_eq!(&data[..], &img[off..off + CLUSTER_SIZE]);
    }

    // Nothing changed since: an empty incremental.
    let (_, st3, ok) = run(&engine, incremental());
    assert!(ok);
    assert_eq!(st3.clusters_emitted, 0);

    // A failed backup: the next one is full.
    da.write_at(&[1; 10], 0, false).unwrap();
    let backup = engine.begin(incremental()).unwrap();
    assert!(backup.is_incremental());
    backup.abort("test: consumer gone");
    let _ = engine.run(&backup, |b| StreamSink::new(Vec::new(), b));
    assert!(engine.changes().base().is_none());
    let (s4, st4, ok) = run(&engine, incremental());
    assert!(ok);
    assert_eq!(st4.clusters_emitted, 80);
    assert!(StreamReader::new(&s4[..])
        .unwrap()
        .identity()
        .unwrap()
        .base
        .is_none());

    // A full request after all that also resets the base to itself.
    da.write_at(&[2; 10], 0, false).unwrap();
    let (s5, st5, _) = run(&engine, BackupOptions::default());
    assert_eq!(st5.clusters_emitted, 80);
    let id5 = *StreamReader::new(&s5[..]).unwrap().identity().unwrap();
    assert_eq!(engine.changes().base().unwrap().uuid, id5.uuid);
}

#[test]
fn uuid_from_a_name_is_used() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.raw");
    image(&a, 4);
    let engine = Engine::new(vec![("a".into(), open(&a))]);
    let u = vma_format::identity::uuid_from_name("vm-100");
    let (s, _, ok) = run(
        &engine,
        BackupOptions {
            uuid: Some(u),
            ..BackupOptions::default()
        },
    );
    assert!(ok);
    assert_eq!(
        StreamReader::new(&s[..]).unwrap().identity().unwrap().uuid,
        u
    );
}

#[test]
fn state_file_round_trip_and_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.raw");
    image(&a, 32);
    let state = dir.path().join("state");
    fs::create_dir(&state).unwrap();
    let names = vec!["a".to_string()];
    let engine = Engine::new(vec![("a".into(), open(&a))]);
    let (_, _, ok) = run(&engine, BackupOptions::default());
    assert!(ok);
    let base = engine.changes().base().unwrap();
    engine
        .backend(0)
        .write_at(&[5; 100], 7 * CS, false)
        .unwrap();
    engine
        .backend(0)
        .write_at(&[5; 100], 20 * CS, false)
        .unwrap();
    let files = || vec![fs::File::open(&a).unwrap()];
    engine.changes().save(&state, &names, &files()).unwrap();
    let file = state.join("cbw-tap.state");
    assert!(file.exists());

    // A new server on the same image picks it up, and removes the file.
    let e2 = Engine::new(vec![("a".into(), open(&a))]);
    assert_eq!(
        e2.changes()
            .load(&state, &names, &files())
            .map_err(|e| e.to_string()),
        Ok(Some(()))
    );
    assert!(!file.exists(), "a kill -9 from here on leaves no state");
    assert_eq!(e2.changes().base(), Some(base));
    assert_eq!(e2.changes().changed_count(0), 2);
    let (_, st, ok) = run(&e2, incremental());
    assert!(ok);
    assert_eq!(st.clusters_emitted, 2);

    // No file (unclean stop): nothing loaded, the next backup is full.
    let e3 = Engine::new(vec![("a".into(), open(&a))]);
    assert_eq!(
        e3.changes()
            .load(&state, &names, &files())
            .map_err(|e| e.to_string()),
        Ok(None)
    );
    let (_, st, _) = run(&e3, incremental());
    assert_eq!(st.clusters_emitted, 32);

    // The image modified while not served: discarded.
    e3.changes().save(&state, &names, &files()).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    fs::OpenOptions::new()
        .write(true)
        .open(&a)
        .unwrap()
        .write_all_at(b"x", 0)
        .unwrap();
    let e4 = Engine::new(vec![("a".into(), open(&a))]);
    let err = e4.changes().load(&state, &names, &files()).unwrap_err();
    assert!(
        matches!(
            &err,
            StateError::Unfit {
                problem: StateProblem::Changed { .. },
                ..
            }
        ),
        "{err:?}"
    );
    let err = err.to_string();
    assert!(
        err.ends_with("the image of export \"a\" changed while it was not served (modified since)"),
        "{err}"
    );
    assert!(e4.changes().base().is_none());
    assert!(!file.exists());

    // Another export name: discarded.
    let (_, _, ok) = run(&e4, BackupOptions::default());
    assert!(ok);
    e4.changes().save(&state, &names, &files()).unwrap();
    let err = e4
        .changes()
        .load(&state, &["b".to_string()], &files())
        .unwrap_err();
    assert!(
        matches!(
            &err,
            StateError::Unfit {
                problem: StateProblem::ExportName { .. },
                ..
            }
        ),
        "{err:?}"
    );
    let err = err.to_string();
    assert!(err.ends_with("export \"a\" saved, \"b\" served"), "{err}");
}
