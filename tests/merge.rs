//! `vma-encode --base PREV -` and `--sorted`/`--uuid-from` with streams
//! made in-process: the merge is the base with the stream's clusters in
//! their place, even when the stream spills to the temporary file; wrong
//! bases and other devices are refused; consecutive sorted archives with
//! a fixed uuid share every extent the changes did not touch.

mod common;

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use vma_format::identity::{uuid_from_name, BackupIdentity, BaseRef};
use vma_format::reader::{Archive, ClusterSink, Flow};
use vma_format::stream::{StreamDevice, StreamWriter};
use vma_format::{Cluster, ClusterBuf, CLUSTER_SIZE};

const SIZES: [usize; 2] = [200 * CLUSTER_SIZE + 5000, 8 * CLUSTER_SIZE];

fn images(seed: u64) -> Vec<Vec<u8>> {
    let mut x = seed | 1;
    SIZES
        .iter()
        .map(|&s| {
            (0..s)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x >> 24) as u8 | 1
                })
                .collect()
        })
        .collect()
}

fn devices(sizes: &[usize]) -> Vec<StreamDevice> {
    ["drive-scsi0", "drive-scsi1"]
        .iter()
        .zip(sizes)
        .map(|(n, &s)| StreamDevice::new(*n, s.div_ceil(512) as u64 * 512))
        .collect()
}

/// A stream of the given clusters of `imgs` (device index, cluster), in
/// the order given.
fn stream(
    imgs: &[Vec<u8>],
    which: &[(usize, usize)],
    time: i64,
    id: &BackupIdentity,
    sizes: &[usize],
) -> Vec<u8> {
    let mut w = StreamWriter::with_identity(Vec::new(), time, &devices(sizes), Some(id)).unwrap();
    for &(d, n) in which {
        let size = imgs[d].len().div_ceil(512) * 512;
        let raw = &imgs[d][n * CLUSTER_SIZE..((n + 1) * CLUSTER_SIZE).min(imgs[d].len())];
        let c = ClusterBuf::from_raw(d as u8 + 1, n as u32, raw, size - n * CLUSTER_SIZE);
        w.write_cluster(&c.as_cluster()).unwrap();
    }
    w.finish().unwrap()
}

fn all(imgs: &[Vec<u8>]) -> Vec<(usize, usize)> {
    let mut v = Vec::new();
    for (d, img) in imgs.iter().enumerate() {
        for n in 0..img.len().div_ceil(CLUSTER_SIZE) {
            v.push((d, n));
        }
    }
    v
}

/// `one` with the clusters `changed` ((device index, cluster)) taken from
/// `images(2)`, and the identity of an incremental stream onto the backup
/// `u` made at time 1000.
fn changes_onto(
    one: &[Vec<u8>],
    changed: &[(usize, usize)],
    u: [u8; 16],
) -> (Vec<Vec<u8>>, BackupIdentity) {
    let mut two = one.to_vec();
    let other = images(2);
    for &(dv, n) in changed {
        let end = ((n + 1) * CLUSTER_SIZE).min(two[dv].len());
        two[dv][n * CLUSTER_SIZE..end].copy_from_slice(&other[dv][n * CLUSTER_SIZE..end]);
    }
    let inc = BackupIdentity {
        uuid: u,
        base: Some(BaseRef {
            uuid: u,
            time: 1000,
        }),
    };
    (two, inc)
}

/// `o` is a successful `-v` merge of 6 stream clusters onto 203 of the
/// base, spooled to a temporary file, `whole` extents of the base written
/// on as they came.
fn assert_merged_6_onto_203(o: &Output, whole: usize) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("merged 6 clusters from the stream onto 203 from"),
        "{err}"
    );
    assert!(!err.contains("(0 bytes spooled"), "{err}");
    assert!(
        err.contains(&format!(
            "; {whole} extents of the base written on as they came)"
        )),
        "{err}"
    );
}

fn encode(args: &[&str], input: &[u8]) -> Output {
    let mut cmd = Command::new(common::bin("vma-encode"));
    cmd.args(args).arg("-");
    common::output_with_stdin(cmd, input)
}

#[derive(Default)]
struct Decoded {
    images: Vec<Vec<u8>>,
    order: Vec<(u8, u32)>,
}

impl ClusterSink for Decoded {
    fn begin(&mut self, h: &vma_format::VmaHeader) -> std::io::Result<()> {
        self.images = h
            .devices()
            .iter()
            .map(|d| vec![0; d.size as usize])
            .collect();
        Ok(())
    }
    fn cluster(&mut self, c: &Cluster<'_>) -> std::io::Result<Flow> {
        let img = &mut self.images[c.dev_id as usize - 1];
        let mut full = vec![0u8; CLUSTER_SIZE];
        c.expand_into(&mut full);
        let at = c.cluster_num as usize * CLUSTER_SIZE;
        let end = (at + CLUSTER_SIZE).min(img.len());
        img[at..end].copy_from_slice(&full[..end - at]);
        self.order.push((c.dev_id, c.cluster_num));
        Ok(Flow::Continue)
    }
}

fn decode(path: &Path) -> (vma_format::VmaHeader, Decoded) {
    let bytes = fs::read(path).unwrap();
    let mut a = Archive::new(&bytes[..]).unwrap();
    let mut d = Decoded::default();
    assert!(a.run(&mut d).unwrap().is_complete());
    (a.header().clone(), d)
}

fn hyphenated(u: &[u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

fn padded(img: &[u8]) -> Vec<u8> {
    let mut v = img.to_vec();
    v.resize(img.len().div_ceil(512) * 512, 0);
    v
}

fn gzip(from: &Path, to: &Path) {
    use std::io::Write;
    let mut z = flate2::write::GzEncoder::new(fs::File::create(to).unwrap(), Default::default());
    z.write_all(&fs::read(from).unwrap()).unwrap();
    z.finish().unwrap();
}

/// The clusters' (device, cluster) in the extents of `archive`, in order,
/// and where each extent with data lies: read from its extent headers.
fn extents(archive: &[u8]) -> (Vec<(u8, u32)>, Vec<usize>) {
    use vma_format::reader::{IndexSink, IndexedExtent};
    struct Walk(Vec<(u8, u32)>, Vec<usize>);
    impl IndexSink for Walk {
        fn extent(&mut self, e: &IndexedExtent<'_>) -> std::io::Result<Flow> {
            self.0
                .extend(e.clusters.iter().map(|c| (c.dev_id, c.cluster_num)));
            if e.block_count > 0 {
                self.1.push(e.data_offset() as usize);
            }
            Ok(Flow::Continue)
        }
    }
    let mut w = Walk(Vec::new(), Vec::new());
    let seekable = vma_format::reader::Seekable::new(std::io::Cursor::new(archive)).unwrap();
    Archive::new(seekable).unwrap().index(&mut w).unwrap();
    (w.0, w.1)
}

#[test]
fn sorted_merge_of_an_unsorted_base() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let p = |n: &str| d.join(n).to_str().unwrap().to_string();
    let one = images(1);
    let u = uuid_from_name("vm-100");
    let full = BackupIdentity {
        uuid: u,
        base: None,
    };
    // The same content twice: in a random order (a live backup's archive)
    // and sorted.
    let mut random = all(&one);
    test_support::shuffle(&mut random, 13);
    let o = encode(
        &["-o", &p("live.vma")],
        &stream(&one, &random, 1000, &full, &SIZES),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let live = fs::read(d.join("live.vma")).unwrap();
    let (live_order, _) = extents(&live);
    let mapped: Vec<(u8, u32)> = random
        .iter()
        .map(|&(d, n)| (d as u8 + 1, n as u32))
        .collect();
    assert_eq!(live_order, mapped, "the base is in the stream's order");
    let o = encode(
        &["--sorted", "-o", &p("sorted.vma")],
        &stream(&one, &random, 1000, &full, &SIZES),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let changed = [(1usize, 7usize), (0, 0), (0, 200), (0, 17), (1, 2), (1, 3)];
    let (two, inc) = changes_onto(&one, &changed, u);
    let s2 = stream(&two, &changed, 2000, &inc, &SIZES);
    let merge = |base: &str, out: &str| {
        encode(
            &[
                "-v",
                "--sorted",
                "--uuid-from",
                "vm-100",
                "--ctime",
                "2500",
                "--spool-memory",
                "65536",
                "--base",
                &p(base),
                "-o",
                &p(out),
            ],
            &s2,
        )
    };
    let o = merge("live.vma", "from-live.vma");
    assert_merged_6_onto_203(&o, 0);
    let merged = fs::read(d.join("from-live.vma")).unwrap();
    let (order, _) = extents(&merged);
    let mut sorted = mapped.clone();
    sorted.sort();
    assert_eq!(
        order, sorted,
        "(device, cluster) order in the extent headers"
    );
    let (h, b) = decode(&d.join("from-live.vma"));
    assert_eq!((h.uuid(), h.ctime()), (u, 2500));
    assert!(b.images[0] == padded(&two[0]) && b.images[1] == padded(&two[1]));
    // The same bytes as the merge from the sorted base.
    let o = merge("sorted.vma", "from-sorted.vma");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(fs::read(d.join("from-sorted.vma")).unwrap() == merged);

    // A data byte of the base changed: its data checksum, checked as its
    // clusters are read out of order, refuses it, as the merge in the
    // base's order does, with the same message; nothing is written.
    let (_, data_at) = extents(&live);
    let mut bad = live.clone();
    bad[data_at[1] + 100] ^= 1;
    fs::write(d.join("bad.vma"), &bad).unwrap();
    let o = merge("bad.vma", "x.vma");
    assert_eq!(o.status.code(), Some(1));
    let unsorted = encode(&["--base", &p("bad.vma"), "-o", &p("y.vma")], &s2);
    assert_eq!(unsorted.status.code(), Some(1));
    let msg = String::from_utf8_lossy(&unsorted.stderr).into_owned();
    assert!(msg.contains(": data checksum mismatch"), "{msg}");
    assert_eq!(
        String::from_utf8_lossy(&o.stderr).lines().last(),
        msg.lines().last()
    );
    assert!(!d.join("x.vma").exists() && !d.join("y.vma").exists());
}

#[test]
fn merge_sorted_and_refusals() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let p = |n: &str| d.join(n).to_str().unwrap().to_string();
    let one = images(1);
    let u = uuid_from_name("vm-100");
    // The first backup, in a scrambled order, written --sorted.
    let mut order = all(&one);
    order.reverse();
    order.swap(3, 30);
    let full = BackupIdentity {
        uuid: u,
        base: None,
    };
    let o = encode(
        &["--sorted", "--spool-memory", "100000", "-o", &p("a.vma")],
        &stream(&one, &order, 1000, &full, &SIZES),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (h, a) = decode(&d.join("a.vma"));
    assert_eq!((h.uuid(), h.ctime()), (u, 1000));
    let mut sorted = a.order.clone();
    sorted.sort();
    assert_eq!(a.order, sorted, "--sorted writes (device, cluster) order");
    assert!(a.images[0] == padded(&one[0]) && a.images[1] == padded(&one[1]));

    // Changes: three clusters of each device.
    let changed = [(0usize, 0usize), (0, 17), (0, 200), (1, 2), (1, 3), (1, 7)];
    let (two, inc) = changes_onto(&one, &changed, u);
    let s2 = stream(&two, &changed, 2000, &inc, &SIZES);
    // Without the base: refused, nothing written.
    let o = encode(&["-o", &p("x.vma")], &s2);
    assert_eq!(o.status.code(), Some(2));
    assert!(!d.join("x.vma").exists());
    // The merge, its stream spilled to the temporary file beyond 64 KiB.
    let o = encode(
        &[
            "-v",
            "--spool-memory",
            "65536",
            "--base",
            &p("a.vma"),
            "-o",
            &p("b.vma"),
        ],
        &s2,
    );
    // Extents 1 and 2 (clusters 58..174 of drive-scsi0) are untouched and
    // hold 58 clusters each: their data and checksum go out as they came.
    assert_merged_6_onto_203(&o, 2);
    let (h, b) = decode(&d.join("b.vma"));
    assert_eq!((h.uuid(), h.ctime()), (u, 2000));
    assert!(b.images[0] == padded(&two[0]) && b.images[1] == padded(&two[1]));
    assert_eq!(b.order, sorted, "the merge keeps the base's order");

    // Consecutive archives share every extent no change touched.
    let (x, y) = (
        fs::read(d.join("a.vma")).unwrap(),
        fs::read(d.join("b.vma")).unwrap(),
    );
    assert_eq!(x.len(), y.len());
    // The headers differ (ctime, MD5); then only the changed clusters'
    // bytes and their extents' headers (MD5, data checksum).
    let hs = h.header_size() as usize;
    let differing = (hs..x.len()).filter(|&i| x[i] != y[i]).count();
    assert!(
        differing <= 6 * CLUSTER_SIZE + 4 * 512,
        "{differing} bytes differ of {}",
        x.len()
    );
    assert!(differing > 5 * CLUSTER_SIZE, "the changes are there");

    // --sorted --base: a merge-join of the sorted base with the spool, the
    // same archive as the merge in the base's order.
    let o = encode(
        &[
            "--json",
            "--sorted",
            "--spool-memory",
            "65536",
            "--base",
            &p("a.vma"),
            "-o",
            &p("bs.vma"),
        ],
        &s2,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // --json counts every cluster written, those of extents written on
    // whole too: the same devices' figures as encoding the content anew.
    let devices = |o: &Output| -> serde_json::Value {
        let err = String::from_utf8_lossy(&o.stderr);
        let v: serde_json::Value = serde_json::from_str(err.lines().last().unwrap()).unwrap();
        v["devices"].clone()
    };
    let anew = encode(
        &["--json", "--sorted", "-o", &p("anew.vma")],
        &stream(&two, &all(&two), 2000, &full, &SIZES),
    );
    assert!(anew.status.success());
    assert_eq!(devices(&o), devices(&anew));
    assert_eq!(devices(&o)[0]["clusters"], 201);
    let (_, bs) = decode(&d.join("bs.vma"));
    assert_eq!(
        bs.order, sorted,
        "--sorted --base writes (device, cluster) order"
    );
    assert!(bs.images[0] == padded(&two[0]) && bs.images[1] == padded(&two[1]));
    assert!(fs::read(d.join("bs.vma")).unwrap() == y);
    // A compressed base in another order (a live backup's archive):
    // refused with --sorted, nothing written (a plain file is read in
    // order through its index: `sorted_merge_of_an_unsorted_base`).
    let o = encode(
        &["-o", &p("live.vma")],
        &stream(&one, &order, 1000, &full, &SIZES),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    gzip(&d.join("live.vma"), &d.join("live.vma.gz"));
    let o = encode(
        &["--sorted", "--base", &p("live.vma.gz"), "-o", &p("ls.vma")],
        &s2,
    );
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&o.stderr).trim_end(),
        format!(
            "vma-encode: {}: not in (device, cluster) order (device 2 cluster 6 after device 2 cluster 7): --sorted reads a compressed or piped base as it comes, so it must have been written with --sorted (merge without --sorted, decompress the base to a file, or write it again with vma-encode --sorted)",
            p("live.vma.gz")
        )
    );
    assert!(!d.join("ls.vma").exists());
    // Nor can a plain base on a pipe be read out of its order.
    let fifo = d.join("live.fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let (from, to) = (d.join("live.vma"), fifo.clone());
    let feeder = std::thread::spawn(move || {
        let _ = std::io::copy(
            &mut fs::File::open(from).unwrap(),
            &mut fs::OpenOptions::new().write(true).open(to).unwrap(),
        );
    });
    let o = encode(
        &["--sorted", "--base", &p("live.fifo"), "-o", &p("ls.vma")],
        &s2,
    );
    feeder.join().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&o.stderr).trim_end(),
        format!(
            "vma-encode: {}: not in (device, cluster) order (device 2 cluster 6 after device 2 cluster 7): --sorted reads a compressed or piped base as it comes, so it must have been written with --sorted (merge without --sorted, decompress the base to a file, or write it again with vma-encode --sorted)",
            p("live.fifo")
        )
    );
    assert!(!d.join("ls.vma").exists());

    // The wrong base: the stream of the third backup on the first archive.
    let inc3 = BackupIdentity {
        uuid: u,
        base: Some(BaseRef {
            uuid: u,
            time: 2000,
        }),
    };
    let s3 = stream(&two, &[(0, 5)], 3000, &inc3, &SIZES);
    let o = encode(&["--base", &p("a.vma"), "-o", &p("c.vma")], &s3);
    assert_eq!(o.status.code(), Some(2));
    let uuid = hyphenated(&u);
    assert_eq!(
        String::from_utf8_lossy(&o.stderr).trim_end(),
        format!(
            "vma-encode: {}: the stream applies to the backup {uuid} of 2000, not to this archive ({uuid} of 1000)",
            p("a.vma")
        )
    );
    assert!(!d.join("c.vma").exists());
    let o = encode(&["--base", &p("b.vma"), "-o", &p("c.vma")], &s3);
    assert!(o.status.success());
    // Two consecutive --sorted merges: every extent but the changed one's
    // is byte-identical (the headers differ in ctime and MD5).
    let mut three = two.clone();
    let other3 = images(3);
    three[0][5 * CLUSTER_SIZE..6 * CLUSTER_SIZE]
        .copy_from_slice(&other3[0][5 * CLUSTER_SIZE..6 * CLUSTER_SIZE]);
    let o = encode(
        &["--sorted", "--base", &p("bs.vma"), "-o", &p("cs.vma")],
        &stream(&three, &[(0, 5)], 3000, &inc3, &SIZES),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (hc, cs) = decode(&d.join("cs.vma"));
    assert_eq!(cs.order, sorted);
    assert!(cs.images[0] == padded(&three[0]) && cs.images[1] == padded(&three[1]));
    let z = fs::read(d.join("cs.vma")).unwrap();
    assert_eq!(z.len(), y.len());
    let hs = hc.header_size() as usize;
    // Only the changed cluster's bytes and its extent's header differ.
    let differing = (hs..z.len()).filter(|&i| y[i] != z[i]).count();
    assert!(
        differing <= CLUSTER_SIZE + 512 && differing > CLUSTER_SIZE / 2,
        "{differing} bytes differ of {}",
        z.len()
    );

    // Other devices: refused.
    let s4 = stream(&two, &[(0, 5)], 3000, &inc3, &[SIZES[0], SIZES[1] + 512]);
    let o = encode(&["--base", &p("b.vma"), "-o", &p("d.vma")], &s4);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&o.stderr).trim_end(),
        format!(
            "vma-encode: {}: its devices differ from the stream's: device 2: drive-scsi1 of 524288 bytes in the archive, drive-scsi1 of 524800 bytes in the stream",
            p("b.vma")
        )
    );
    // --base without a stream, --sorted with --base: usage errors.
    let o = Command::new(common::bin("vma-encode"))
        .args(["--base", &p("b.vma"), "-o", &p("e.vma"), &p("a.vma")])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
}
