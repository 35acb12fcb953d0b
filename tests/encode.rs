//! vma-encode end to end: images from ../shared/fixtures/make_images.py and
//! cluster streams in shuffled order round-trip byte-exactly through
//! `vma-encode | vma-decode extract -` (and through the library reader,
//! in-process); archives are reproducible, shaped like Proxmox's, carry data
//! checksums that vma-verify checks; bad streams, bad inputs and failing
//! outputs give one-line errors, documented exit codes and no archive.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::{bin, make_images, sha256_file};
use vma_format::stream::{StreamDevice, StreamWriter};
use vma_format::{
    Archive, Cluster, ClusterBuf, ClusterSink, ExtentHeader, Flow, VmaHeader, CLUSTER_SIZE,
    EXTENT_HEADER_SIZE,
};

const UUID: &str = "0f8a6c34-9129-4fb6-944f-7852fc68351a";
const CTIME: &str = "1795689905";

fn run(cmd: &mut Command, input: Option<Vec<u8>>) -> Output {
    run_to(cmd, input, Stdio::piped())
}

/// Runs `cmd` with its stdout going to `stdout`, `input` on its stdin.
fn run_to(cmd: &mut Command, input: Option<Vec<u8>>, stdout: Stdio) -> Output {
    cmd.env("TZ", "UTC")
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(stdout)
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let feeder = input.map(|data| {
        let mut stdin = child.stdin.take().unwrap();
        std::thread::spawn(move || {
            let _ = stdin.write_all(&data);
        })
    });
    let out = child.wait_with_output().unwrap();
    if let Some(f) = feeder {
        f.join().unwrap();
    }
    out
}

/// `vma-encode ARGS` in `dir`.
fn encode(dir: &Path, args: &[&str]) -> Output {
    run(
        Command::new(bin("vma-encode"))
            .current_dir(dir)
            .env_remove("SOURCE_DATE_EPOCH")
            .args(args),
        None,
    )
}

/// `vma-encode ARGS` in `dir` with `input` on stdin.
fn encode_stdin(dir: &Path, args: &[&str], input: Vec<u8>) -> Output {
    run(
        Command::new(bin("vma-encode"))
            .current_dir(dir)
            .env_remove("SOURCE_DATE_EPOCH")
            .args(args),
        Some(input),
    )
}

fn ok(o: &Output) -> &Output {
    assert!(
        o.status.success(),
        "exit {:?}, stderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `vma-decode extract - OUT` with `archive` on stdin; returns OUT's files.
fn decode_pipeline(archive: &[u8], out: &Path) -> BTreeMap<String, Vec<u8>> {
    let o = run(
        Command::new(bin("vma-decode")).args(["extract", "-", out.to_str().unwrap()]),
        Some(archive.to_vec()),
    );
    ok(&o);
    fs::read_dir(out)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().into_string().unwrap(),
                fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

/// Every device rebuilt in memory by the library reader, plus per-device
/// stored block counts.
#[derive(Default)]
struct Images {
    images: BTreeMap<String, Vec<u8>>,
    names: BTreeMap<u8, String>,
    blocks: BTreeMap<String, u64>,
    clusters: BTreeMap<String, u64>,
}

impl ClusterSink for Images {
    fn begin(&mut self, header: &VmaHeader) -> std::io::Result<()> {
        for d in header.devices() {
            let name = d.display_name();
            self.images.insert(name.clone(), vec![0; d.size as usize]);
            self.names.insert(d.id, name);
        }
        Ok(())
    }

    fn cluster(&mut self, c: &Cluster<'_>) -> std::io::Result<Flow> {
        let name = &self.names[&c.dev_id];
        *self.blocks.entry(name.clone()).or_default() += c.mask.count() as u64;
        *self.clusters.entry(name.clone()).or_default() += 1;
        let img = self.images.get_mut(name).unwrap();
        let mut full = vec![0u8; CLUSTER_SIZE];
        c.expand_into(&mut full);
        let start = c.offset() as usize;
        let end = (start + CLUSTER_SIZE).min(img.len());
        img[start..end].copy_from_slice(&full[..end - start]);
        Ok(Flow::Continue)
    }
}

/// Decodes `archive` in-process with the library reader.
fn decode_in_process(archive: &[u8]) -> (VmaHeader, Images) {
    let mut a = Archive::new(archive).unwrap();
    let mut sink = Images::default();
    let summary = a.run(&mut sink).unwrap();
    assert!(summary.is_complete());
    (a.header().clone(), sink)
}

/// The extracted image is the source zero-padded to a multiple of 512.
fn assert_image(what: &str, extracted: &[u8], source: &[u8]) {
    let want = source.len().div_ceil(512) * 512;
    assert_eq!(extracted.len(), want, "{what}: size");
    assert!(
        extracted[..source.len()] == *source,
        "{what}: content differs"
    );
    assert!(
        extracted[source.len()..].iter().all(|&b| b == 0),
        "{what}: padding not zero"
    );
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// The default image set, and the archive of all of it (named as in the
/// fixtures' multi-disk.vma, plus full.raw as a bare path).
fn default_set() -> (tempfile::TempDir, Vec<u8>) {
    let src = tempdir();
    make_images(src.path(), &[]);
    let o = encode(
        src.path(),
        &[
            "--uuid",
            UUID,
            "--ctime",
            CTIME,
            "-c",
            "qemu-server.conf",
            "-c",
            "pve-firewall.fw",
            "drive-scsi0=small.raw",
            "drive-virtio1=sparse.raw",
            "drive-sata2=zeros.raw",
            "drive-ide0=tiny.raw",
            "full.raw",
        ],
    );
    let archive = ok(&o).stdout.clone();
    (src, archive)
}

/// (device name, source file) of `default_set`.
const DEFAULT_DEVICES: [(&str, &str); 5] = [
    ("drive-scsi0", "small.raw"),
    ("drive-virtio1", "sparse.raw"),
    ("drive-sata2", "zeros.raw"),
    ("drive-ide0", "tiny.raw"),
    ("disk4", "full.raw"),
];

#[test]
fn default_images_round_trip_through_vma_decode() {
    let (src, archive) = default_set();
    let out = tempdir();
    let files = decode_pipeline(&archive, &out.path().join("x"));
    let mut names: Vec<&str> = files.keys().map(|s| s.as_str()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "disk-disk4.raw",
            "disk-drive-ide0.raw",
            "disk-drive-sata2.raw",
            "disk-drive-scsi0.raw",
            "disk-drive-virtio1.raw",
            "pve-firewall.fw",
            "qemu-server.conf"
        ]
    );
    for (dev, file) in DEFAULT_DEVICES {
        let source = fs::read(src.path().join(file)).unwrap();
        assert_image(dev, &files[&format!("disk-{dev}.raw")], &source);
    }
    for conf in ["qemu-server.conf", "pve-firewall.fw"] {
        assert_eq!(files[conf], fs::read(src.path().join(conf)).unwrap());
    }
    // The images Proxmox's `vma extract` produced from its own archive of the
    // same sources (EXPECTED.txt, multi-disk.vma).
    for (file, sha) in [
        (
            "disk-drive-scsi0.raw",
            "d67e78f478af5f3118c457c8ecc0c3f026ca3bfd2ed70bcd68867d42eb64dadd",
        ),
        (
            "disk-drive-virtio1.raw",
            "b57fb5c55e3b124fd824004b1abbb884170e71a1cf5b2d372760a5c3238de6f1",
        ),
        (
            "disk-drive-sata2.raw",
            "8a39d2abd3999ab73c34db2476849cddf303ce389b35826850f9a700589b4a90",
        ),
        (
            "disk-drive-ide0.raw",
            "f7ae5cd690328cd8290b37d5028850244265907a2a528df9cb2962c8069fd185",
        ),
    ] {
        assert_eq!(sha256_file(&out.path().join("x").join(file)), sha, "{file}");
    }
}

#[test]
fn default_images_round_trip_in_process() {
    let (src, archive) = default_set();
    let (header, images) = decode_in_process(&archive);
    for (dev, file) in DEFAULT_DEVICES {
        let source = fs::read(src.path().join(file)).unwrap();
        assert_image(dev, &images.images[dev], &source);
    }
    let configs: Vec<(String, usize)> = header
        .configs()
        .iter()
        .map(|c| (String::from_utf8(c.name.clone()).unwrap(), c.data.len()))
        .collect();
    assert_eq!(
        configs,
        [
            ("qemu-server.conf".to_string(), 832),
            ("pve-firewall.fw".to_string(), 321)
        ]
    );
    assert_eq!(header.ctime(), 1795689905);
    assert_eq!(
        uuid_str(&header.uuid()),
        UUID.replace('-', ""),
        "the uuid given"
    );
}

fn uuid_str(u: &[u8; 16]) -> String {
    u.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn more_kinds_and_sizes_round_trip() {
    let src = tempdir();
    make_images(
        src.path(),
        &[
            "--seed",
            "7",
            "--image",
            "a.raw:5M+511:mixed",
            "--image",
            "b.raw:65536*7+1:sparse",
            "--image",
            "c.raw:1M:nearzero",
            "--image",
            "d.raw:300K:pattern",
            "--image",
            "e.raw:64K*3:random",
            "--image",
            "f.raw:4095:random",
            "--image",
            "g.raw:1:random",
            "--image",
            "h.raw:3M:zero",
        ],
    );
    let files = [
        "a.raw", "b.raw", "c.raw", "d.raw", "e.raw", "f.raw", "g.raw", "h.raw",
    ];
    let mut args = vec!["-c", "qemu-server.conf"];
    args.extend(files);
    let archive = ok(&encode(src.path(), &args)).stdout.clone();
    let out = tempdir();
    let extracted = decode_pipeline(&archive, &out.path().join("x"));
    let (_, images) = decode_in_process(&archive);
    for (i, file) in files.iter().enumerate() {
        let source = fs::read(src.path().join(file)).unwrap();
        let dev = format!("disk{i}");
        assert_image(&dev, &extracted[&format!("disk-{dev}.raw")], &source);
        assert_image(&dev, &images.images[&dev], &source);
    }
    assert_eq!(
        extracted["qemu-server.conf"],
        fs::read(src.path().join("qemu-server.conf")).unwrap()
    );
}

/// Every cluster of the images, packed, in a shuffled order (xorshift).
fn shuffled_clusters(images: &[(String, Vec<u8>)], seed: u64) -> Vec<ClusterBuf> {
    let mut clusters = Vec::new();
    for (i, (_, data)) in images.iter().enumerate() {
        let size = data.len().div_ceil(512) * 512;
        for (n, raw) in data.chunks(CLUSTER_SIZE).enumerate() {
            let valid = size - n * CLUSTER_SIZE;
            clusters.push(ClusterBuf::from_raw(i as u8 + 1, n as u32, raw, valid));
        }
    }
    test_support::shuffle(&mut clusters, seed);
    clusters
}

fn stream_devices(images: &[(String, Vec<u8>)]) -> Vec<StreamDevice> {
    images
        .iter()
        .map(|(n, d)| StreamDevice::new(n.clone(), d.len().div_ceil(512) as u64 * 512))
        .collect()
}

fn stream_of(images: &[(String, Vec<u8>)], clusters: &[ClusterBuf]) -> Vec<u8> {
    let mut w = StreamWriter::new(Vec::new(), 1700000000, &stream_devices(images)).unwrap();
    for c in clusters {
        w.write_cluster(&c.as_cluster()).unwrap();
    }
    w.finish().unwrap()
}

fn default_images(dir: &Path) -> Vec<(String, Vec<u8>)> {
    DEFAULT_DEVICES
        .iter()
        .map(|(dev, file)| (dev.to_string(), fs::read(dir.join(file)).unwrap()))
        .collect()
}

#[test]
fn shuffled_cluster_stream_round_trips() {
    let src = tempdir();
    make_images(src.path(), &[]);
    let images = default_images(src.path());
    let clusters = shuffled_clusters(&images, 0x5eed);
    // Really out of order.
    assert!(clusters
        .windows(2)
        .any(|w| w[0].cluster_num > w[1].cluster_num));
    let stream = stream_of(&images, &clusters);
    let o = encode_stdin(src.path(), &["-c", "qemu-server.conf", "-"], stream);
    let archive = ok(&o).stdout.clone();
    let out = tempdir();
    let files = decode_pipeline(&archive, &out.path().join("x"));
    let (header, mem) = decode_in_process(&archive);
    for (dev, data) in &images {
        assert_image(dev, &files[&format!("disk-{dev}.raw")], data);
        assert_image(dev, &mem.images[dev], data);
    }
    assert_eq!(
        files["qemu-server.conf"],
        fs::read(src.path().join("qemu-server.conf")).unwrap()
    );
    // The creation time is the stream's backup instant.
    assert_eq!(header.ctime(), 1700000000);
}

#[test]
fn same_uuid_and_ctime_give_identical_archives() {
    let src = tempdir();
    make_images(src.path(), &[]);
    let args = |out: &str| {
        vec![
            "--uuid".to_string(),
            UUID.to_string(),
            "--ctime".to_string(),
            CTIME.to_string(),
            "-c".to_string(),
            "qemu-server.conf".to_string(),
            "-o".to_string(),
            out.to_string(),
            "small.raw".to_string(),
            "sparse.raw".to_string(),
            "tiny.raw".to_string(),
        ]
    };
    let a1 = args("one.vma");
    let a2 = args("two.vma");
    ok(&encode(
        src.path(),
        &a1.iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    ok(&encode(
        src.path(),
        &a2.iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    let one = sha256_file(&src.path().join("one.vma"));
    assert_eq!(one, sha256_file(&src.path().join("two.vma")));
    // SOURCE_DATE_EPOCH stands in for --ctime.
    let o = run(
        Command::new(bin("vma-encode"))
            .current_dir(src.path())
            .env("SOURCE_DATE_EPOCH", CTIME)
            .args([
                "--uuid",
                UUID,
                "-c",
                "qemu-server.conf",
                "-o",
                "three.vma",
                "small.raw",
                "sparse.raw",
                "tiny.raw",
            ]),
        None,
    );
    ok(&o);
    assert_eq!(one, sha256_file(&src.path().join("three.vma")));
    // Without --uuid, a fresh one each time.
    ok(&encode(
        src.path(),
        &["--ctime", CTIME, "-o", "r1.vma", "small.raw"],
    ));
    ok(&encode(
        src.path(),
        &["--ctime", CTIME, "-o", "r2.vma", "small.raw"],
    ));
    assert_ne!(
        sha256_file(&src.path().join("r1.vma")),
        sha256_file(&src.path().join("r2.vma"))
    );
    // Nothing but the archives is left in the directory.
    let mut left: Vec<String> = fs::read_dir(src.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".vma") || n.starts_with('.'))
        .collect();
    left.sort();
    assert_eq!(
        left,
        ["one.vma", "r1.vma", "r2.vma", "three.vma", "two.vma"]
    );
}

/// (clusters per extent, data checksum per extent) of an archive, every
/// extent header checked (magic, uuid, MD5).
fn extents(archive: &[u8]) -> Vec<(usize, Option<u32>)> {
    let header = VmaHeader::parse(archive).unwrap();
    let mut pos = header.header_size() as usize;
    let mut out = Vec::new();
    while pos < archive.len() {
        let raw: &[u8; EXTENT_HEADER_SIZE] =
            archive[pos..pos + EXTENT_HEADER_SIZE].try_into().unwrap();
        let ext = ExtentHeader::parse(raw, &header.uuid()).unwrap();
        let clusters = ext.slots().iter().filter(|s| s.dev_id != 0).count();
        // The data checksum covers exactly the data that follows.
        let data = &archive[pos + EXTENT_HEADER_SIZE..][..ext.block_count() as usize * 4096];
        if let Some(crc) = ext.data_checksum() {
            assert_eq!(crc, crc32(data));
        }
        out.push((clusters, ext.data_checksum()));
        pos += EXTENT_HEADER_SIZE + data.len();
    }
    assert_eq!(pos, archive.len());
    out
}

/// CRC-32 (IEEE), bit by bit: an independent check of the writer's crc32fast.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn archives_are_shaped_like_proxmox_ones() {
    // The sources and command of the fixtures' multi-disk.vma.
    let src = tempdir();
    make_images(src.path(), &[]);
    let args = [
        "--ctime",
        CTIME,
        "-c",
        "qemu-server.conf",
        "-c",
        "pve-firewall.fw",
        "drive-scsi0=small.raw",
        "drive-virtio1=sparse.raw",
        "drive-sata2=zeros.raw",
        "drive-ide0=tiny.raw",
    ];
    let archive = ok(&encode(src.path(), &args)).stdout.clone();
    let header = VmaHeader::parse(&archive).unwrap();
    // Proxmox's archive: header 13824 bytes, blob buffer 1252 bytes, 3
    // extents of 58, 58 and 34 clusters.
    assert_eq!(header.header_size(), 13824);
    assert_eq!(header.blob_buffer_size(), 1252);
    let ext = extents(&archive);
    assert_eq!(ext.iter().map(|e| e.0).collect::<Vec<_>>(), [58, 58, 34]);
    assert!(ext.iter().all(|e| e.1.is_some()), "data checksums");
    // Without data checksums: the same extents, no checksum slot.
    let mut plain_args = vec!["--no-data-checksums"];
    plain_args.extend(args);
    let plain = ok(&encode(src.path(), &plain_args)).stdout.clone();
    let ext = extents(&plain);
    assert_eq!(ext.iter().map(|e| e.0).collect::<Vec<_>>(), [58, 58, 34]);
    assert!(ext.iter().all(|e| e.1.is_none()));
    assert_eq!(plain.len(), archive.len());
    // `vma-decode list` prints what Proxmox's `vma list` printed for
    // multi-disk.vma (EXPECTED.txt).
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(&archive).unwrap();
    let o = run(
        Command::new(bin("vma-decode")).args(["list", f.path().to_str().unwrap()]),
        None,
    );
    assert_eq!(
        String::from_utf8_lossy(&ok(&o).stdout),
        "CFG: size: 832 name: qemu-server.conf
CFG: size: 321 name: pve-firewall.fw
DEV: dev_id=1 size: 1061376 devname: drive-scsi0
DEV: dev_id=2 size: 8388608 devname: drive-virtio1
DEV: dev_id=3 size: 262144 devname: drive-sata2
DEV: dev_id=4 size: 4608 devname: drive-ide0
CTIME: Thu Nov 26 10:45:05 2026
"
    );
    // Every extent of a bigger archive holds at most 58 clusters.
    let big = tempdir();
    make_images(
        big.path(),
        &["--image", "m.raw:20M+3:mixed", "--no-configs"],
    );
    let archive = ok(&encode(big.path(), &["m.raw"])).stdout.clone();
    let ext = extents(&archive);
    assert_eq!(ext.iter().map(|e| e.0).sum::<usize>(), 321);
    assert!(ext.iter().all(|e| e.0 <= 58 && e.1.is_some()));
}

#[test]
fn a_flipped_data_byte_fails_verification() {
    let (src, archive) = default_set();
    let header = VmaHeader::parse(&archive).unwrap();
    let good = src.path().join("good.vma");
    fs::write(&good, &archive).unwrap();
    let o = run(Command::new(bin("vma-verify")).arg(&good), None);
    assert_eq!(
        String::from_utf8_lossy(&ok(&o).stdout),
        format!(
            "{}: ok (182 clusters, data checksums: verified)\n",
            good.display()
        )
    );
    let mut bad = archive.clone();
    let at = header.header_size() as usize + EXTENT_HEADER_SIZE + 5000;
    bad[at] ^= 0x01;
    let bad_path = src.path().join("bad.vma");
    fs::write(&bad_path, &bad).unwrap();
    let o = run(Command::new(bin("vma-verify")).arg(&bad_path), None);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o),
        format!(
            "vma-verify: {}: extent 0 at byte {}: data checksum mismatch\n",
            bad_path.display(),
            header.header_size()
        )
    );
    // The library reader says the same.
    let err = Archive::new(&bad[..])
        .unwrap()
        .run(&mut Images::default())
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "extent 0 at byte {}: data checksum mismatch",
            header.header_size()
        )
    );
}

/// A stream failure: exit 1, one line naming stdin and ending with `tail`,
/// no archive (nor temporary file) left.
fn assert_stream_fails(stream: Vec<u8>, tail: &str) {
    let dir = tempdir();
    let o = encode_stdin(dir.path(), &["-o", "out.vma", "-"], stream);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with("vma-encode: <stdin>: ") && err.ends_with(&format!("{tail}\n")),
        "{err:?} does not end with {tail:?}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0, "files left");
}

#[test]
fn damaged_streams_fail_each_with_its_message() {
    let src = tempdir();
    make_images(src.path(), &[]);
    let images = default_images(src.path());
    let clusters = shuffled_clusters(&images, 42);
    let good = stream_of(&images, &clusters);
    // The good stream works with -o.
    let dir = tempdir();
    ok(&encode_stdin(
        dir.path(),
        &["-o", "out.vma", "-"],
        good.clone(),
    ));
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);

    // A missing cluster (the producer's end record agrees with what it sent).
    let i = clusters
        .iter()
        .position(|c| c.dev_id == 1 && c.cluster_num == 3)
        .unwrap();
    let mut missing = clusters.clone();
    missing.remove(i);
    assert_stream_fails(
        stream_of(&images, &missing),
        "device drive-scsi0: cluster 3 missing (1 of 17 clusters missing)",
    );
    // A duplicated cluster.
    let mut dup = clusters.clone();
    dup.push(clusters[i].clone());
    assert_stream_fails(
        stream_of(&images, &dup),
        "duplicate cluster 3 of drive-scsi0",
    );
    // A flipped byte: the record CRC (the last byte of the first record).
    let preamble = stream_of(&images, &[]).len() - (12 + 8 * images.len() + 4);
    let mut bad = good.clone();
    bad[preamble + 12 + clusters[0].data.len() + 3] ^= 0x80;
    assert_stream_fails(bad, "record checksum mismatch");
    // Truncated.
    assert_stream_fails(good[..good.len() - 10].to_vec(), "without its end record");
    // Aborted by the producer.
    let mut w = StreamWriter::new(Vec::new(), 0, &stream_devices(&images)).unwrap();
    for c in &clusters[..20] {
        w.write_cluster(&c.as_cluster()).unwrap();
    }
    assert_stream_fails(
        w.abort("guest disk: read error at sector 12").unwrap(),
        "the producer aborted the stream: guest disk: read error at sector 12",
    );
    // Not a stream at all.
    assert_stream_fails(
        b"VMA\0not a stream".to_vec(),
        "not a cluster stream (wrong magic number)",
    );
}

/// A failure before anything is written: exit `code`, exactly `line` on
/// stderr, nothing on stdout and no file in the output directory.
fn assert_refused(dir: &Path, args: &[&str], code: i32, line: &str) {
    let out_dir = dir.join("out");
    fs::create_dir_all(&out_dir).unwrap();
    let mut full = vec!["-o", "out/a.vma"];
    full.extend(args);
    let o = encode(dir, &full);
    assert_eq!(o.status.code(), Some(code), "{}", stderr(&o));
    assert_eq!(stderr(&o), format!("vma-encode: {line}\n"));
    assert!(o.stdout.is_empty());
    assert_eq!(fs::read_dir(&out_dir).unwrap().count(), 0, "files left");
}

#[test]
fn bad_inputs_are_refused_naming_them() {
    let src = tempdir();
    make_images(src.path(), &[]);
    let d = src.path();
    fs::create_dir(d.join("adir")).unwrap();
    fs::write(d.join("empty.raw"), b"").unwrap();
    fs::write(d.join("big.conf"), vec![b'x'; 65536]).unwrap();
    assert_refused(
        d,
        &["missing.raw"],
        3,
        "missing.raw: No such file or directory (os error 2)",
    );
    assert_refused(d, &["adir"], 2, "adir: is a directory");
    assert_refused(
        d,
        &["empty.raw"],
        2,
        "empty.raw: is empty (the format has no 0-byte devices)",
    );
    assert_refused(
        d,
        &["-c", "missing.conf", "small.raw"],
        3,
        "missing.conf: No such file or directory (os error 2)",
    );
    assert_refused(
        d,
        &["-c", "big.conf", "small.raw"],
        2,
        "big.conf: config larger than the format's 65535 bytes",
    );
    assert_refused(
        d,
        &["../x=small.raw"],
        2,
        "small.raw: device \"../x\": name \"../x\" contains '/'",
    );
    assert_refused(
        d,
        &["a=small.raw", "a=tiny.raw"],
        2,
        "tiny.raw: device a: declared twice",
    );
    assert_refused(
        d,
        &["small.raw", "-"],
        2,
        "'-' (a cluster stream on standard input) must be the only source",
    );
    let long = format!("{}=small.raw", "n".repeat(70000));
    assert_refused(
        d,
        &[&long],
        2,
        "small.raw: device name of 70000 bytes is longer than the format's 65534",
    );
    let many: Vec<String> = (0..255).map(|i| format!("d{i}=tiny.raw")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    assert_refused(
        d,
        &many,
        2,
        "too many devices: 255 given, the format holds 254",
    );
    // Names that fit one by one but not together in Proxmox's 512 KiB header.
    let names: Vec<String> = (0..200)
        .map(|i| format!("{i:03}{}=tiny.raw", "n".repeat(3000)))
        .collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    assert_refused(
        d,
        &names,
        2,
        "the configs and device names need a 614400-byte header, more than 524288",
    );
    // A bad flag: clap's usage error, exit 2.
    let o = encode(d, &["--bogus"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn output_errors_stop_with_a_message() {
    let src = tempdir();
    make_images(src.path(), &["--image", "r.raw:16M:random", "--no-configs"]);
    // Disk full.
    let o = run_to(
        Command::new(bin("vma-encode"))
            .current_dir(src.path())
            .arg("r.raw"),
        None,
        fs::File::create("/dev/full").unwrap().into(),
    );
    assert_eq!(o.status.code(), Some(3));
    assert_eq!(
        stderr(&o),
        "vma-encode: stdout: write failed: No space left on device (os error 28)\n"
    );
    // The reader goes away: EPIPE, not a crash.
    let mut child = Command::new(bin("vma-encode"))
        .current_dir(src.path())
        .arg("r.raw")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut head = [0u8; 100];
    child
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut head)
        .unwrap();
    assert_eq!(&head[..4], b"VMA\0");
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(3));
    assert_eq!(
        stderr(&o),
        "vma-encode: stdout: write failed: Broken pipe (os error 32)\n"
    );
    // -o into a directory that does not exist.
    let o = encode(src.path(), &["-o", "nodir/a.vma", "r.raw"]);
    assert_eq!(o.status.code(), Some(3));
    assert_eq!(
        stderr(&o),
        "vma-encode: nodir/a.vma: No such file or directory (os error 2)\n"
    );
}

#[test]
fn verbose_prints_proxmox_style_lines() {
    let src = tempdir();
    make_images(src.path(), &[]);
    let o = encode(
        src.path(),
        &[
            "-v",
            "-c",
            "qemu-server.conf",
            "drive-scsi0=small.raw",
            "drive-ide0=tiny.raw",
            "zeros.raw",
        ],
    );
    let archive = ok(&o).stdout.clone();
    let (_, images) = decode_in_process(&archive);
    let err = stderr(&o);
    let lines: Vec<&str> = err.lines().collect();
    // Zero bytes as Proxmox counts them: whole 4 KiB blocks not stored.
    let zeros = |dev: &str| images.clusters[dev] * 65536 - images.blocks[dev] * 4096;
    let total = 1061376 + 4608 + 262144;
    let all_zeros = zeros("drive-scsi0") + zeros("drive-ide0") + zeros("disk2");
    let n = lines.len();
    assert_eq!(
        lines[n - 4],
        format!("progress 100% {total}/{total} {all_zeros}")
    );
    assert_eq!(
        &lines[n - 3..],
        [
            format!(
                "image drive-scsi0: size=1061376 zeros={} saved={}",
                zeros("drive-scsi0"),
                1061376 - zeros("drive-scsi0") as i64
            ),
            format!(
                "image drive-ide0: size=4608 zeros={} saved={}",
                zeros("drive-ide0"),
                4608 - zeros("drive-ide0") as i64
            ),
            "image disk2: size=262144 zeros=262144 saved=0".to_string(),
        ]
    );
    let mut last = -1;
    for l in &lines[..n - 3] {
        let pct: i64 = l
            .strip_prefix("progress ")
            .and_then(|r| r.split('%').next())
            .unwrap()
            .parse()
            .unwrap();
        assert!(pct > last, "{l}");
        last = pct;
    }
    // Without -v (and stderr not a terminal): silent.
    let o = encode(src.path(), &["-c", "qemu-server.conf", "small.raw"]);
    assert!(ok(&o).stderr.is_empty());
}

#[test]
fn help_documents_exit_codes() {
    let o = run(Command::new(bin("vma-encode")).arg("--help"), None);
    let text = String::from_utf8_lossy(&ok(&o).stdout).into_owned();
    let text = text.replace('\n', " ");
    for needle in [
        "Exit codes: 0 ok; 1 the cluster stream",
        "; 2 usage",
        "; 3 I/O",
    ] {
        assert!(text.contains(needle), "{needle:?} not in --help");
    }
}
