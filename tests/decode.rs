//! vma-decode end to end: Proxmox's archives list and extract exactly as
//! Proxmox's own tool did (EXPECTED.txt is parsed, not copied), from files
//! and from stdin; damaged, hostile and unusual archives are handled.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use common::{bin, fixtures, parse_expected, sha256_file};
use vma_format::{HeaderBuilder, Writer, WriterOptions};

fn decode(args: &[&str]) -> Output {
    Command::new(bin("vma-decode"))
        .env("TZ", "UTC")
        .args(args)
        .output()
        .unwrap()
}

fn decode_stdin(args: &[&str], input: &[u8]) -> Output {
    let mut cmd = Command::new(bin("vma-decode"));
    cmd.env("TZ", "UTC").args(args);
    common::output_with_stdin(cmd, input)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Every file in `dir` with its sha256 and size.
fn dir_files(dir: &Path) -> BTreeMap<String, (String, u64)> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            (name, (sha256_file(&e.path()), e.metadata().unwrap().len()))
        })
        .collect()
}

#[test]
fn proxmox_fixtures_list_and_extract_exactly() {
    let expected = parse_expected();
    assert_eq!(
        expected.len(),
        4,
        "EXPECTED.txt sections: {:?}",
        expected.keys()
    );
    for (archive, want) in &expected {
        let path = fixtures().join("pve").join(archive);
        let path_s = path.to_str().unwrap();
        assert!(
            !want.list_stdout.is_empty() && !want.files.is_empty(),
            "{archive}: parse"
        );

        let o = decode(&["list", path_s]);
        assert_eq!(o.status.code(), Some(0), "{archive}: {}", stderr(&o));
        assert_eq!(
            String::from_utf8_lossy(&o.stdout),
            want.list_stdout,
            "{archive}: list"
        );

        let bytes = fs::read(&path).unwrap();
        let o = decode_stdin(&["list", "-"], &bytes);
        assert_eq!(
            String::from_utf8_lossy(&o.stdout),
            want.list_stdout,
            "{archive}: list from stdin"
        );

        for from_stdin in [false, true] {
            let tmp = tempfile::tempdir().unwrap();
            let out = tmp.path().join("OUT");
            let o = if from_stdin {
                decode_stdin(&["extract", "-", out.to_str().unwrap()], &bytes)
            } else {
                decode(&["extract", path_s, out.to_str().unwrap()])
            };
            assert_eq!(o.status.code(), Some(0), "{archive}: {}", stderr(&o));
            assert_eq!(stderr(&o), "");
            assert_eq!(
                &dir_files(&out),
                &want.files,
                "{archive} (stdin: {from_stdin})"
            );
        }

        for (name, (sha, _)) in want.files.iter().filter(|(n, _)| !n.starts_with("disk-")) {
            let o = decode(&["config", path_s, "-c", name]);
            assert_eq!(o.status.code(), Some(0));
            let tmp = tempfile::NamedTempFile::new().unwrap();
            fs::write(tmp.path(), &o.stdout).unwrap();
            assert_eq!(&sha256_file(tmp.path()), sha, "{archive}: config {name}");
        }
    }
}

#[test]
fn extract_output_is_sparse() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    let o = decode(&[
        "extract",
        fixtures().join("pve/multi-disk.vma").to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0));
    use std::os::unix::fs::MetadataExt;
    // The 256 KiB all-zero device takes no blocks; the 8 MiB sparse one few.
    assert_eq!(
        fs::metadata(out.join("disk-drive-sata2.raw"))
            .unwrap()
            .blocks(),
        0
    );
    assert!(
        fs::metadata(out.join("disk-drive-virtio1.raw"))
            .unwrap()
            .blocks()
            * 512
            < 1 << 20
    );
}

#[test]
fn extract_verbose_prints_proxmox_progress_and_stats() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    let o = decode(&[
        "extract",
        "-v",
        fixtures().join("pve/one-disk.vma").to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0));
    let text = String::from_utf8(o.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0],
        format!("DEVINFO {}/tmp-disk-drive-scsi0.raw 1061376", out.display())
    );
    let progress: Vec<_> = lines
        .iter()
        .filter(|l| l.starts_with("progress "))
        .collect();
    // EXPECTED.txt: 17 progress lines, first 6%, last 106%.
    assert_eq!(progress.len(), 17);
    assert_eq!(
        *progress[0],
        "progress 6% (read 65536 bytes, duration 0 sec)"
    );
    assert_eq!(
        *progress[16],
        "progress 106% (read 1114112 bytes, duration 0 sec)"
    );
    assert_eq!(
        lines[lines.len() - 2],
        "total bytes read 1114112, sparse bytes 184320 (16.5%)"
    );
    assert_eq!(
        lines[lines.len() - 1],
        "space reduction due to 4K zero blocks 5.73%"
    );
}

fn fragment() -> Vec<u8> {
    let mut bytes = Vec::new();
    let gz = fs::File::open(fixtures().join("real/proxmox-fragment.vma.gz")).unwrap();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(gz), &mut bytes).unwrap();
    bytes
}

#[test]
fn truncated_real_backup() {
    let bytes = fragment();
    let tmp = tempfile::tempdir().unwrap();
    let frag = tmp.path().join("frag.vma");
    fs::write(&frag, &bytes).unwrap();
    let frag_s = frag.to_str().unwrap();

    let o = decode(&["list", frag_s]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "CFG: size: 417 name: qemu-server.conf\nDEV: dev_id=1 size: 10737418240 devname: drive-scsi0\nCTIME: Sun Oct 31 11:43:42 2021\n"
    );
    let o = decode(&["config", frag_s]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(o.stdout.len(), 417);

    // A normal extract fails, names the device and its first missing
    // cluster, and leaves no image behind.
    let out = tmp.path().join("plain");
    let o = decode(&["extract", frag_s, out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o),
        format!("vma-decode: {frag_s}: drive-scsi0: cluster 23 missing (163724 of 163840 clusters missing)\n")
    );
    assert_eq!(
        fs::read_dir(&out).unwrap().count(),
        0,
        "extract left files behind"
    );

    // Salvage, from stdin: what is there, zeros elsewhere, exit 4.
    let out = tmp.path().join("salvage");
    let o = decode_stdin(
        &["extract", "--salvage", "-", out.to_str().unwrap()],
        &bytes,
    );
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert_eq!(
        stderr(&o),
        format!(
            "vma-decode: <stdin>: drive-scsi0: 163724 of 163840 clusters missing: 23-31, 55-63, 104-111, 120-127, 136-143, 151-159, 167-163839\n\
             vma-decode: <stdin>: partial extract: missing clusters are zero; full list in {}/salvage-report.txt\n",
            out.display()
        )
    );
    let img = out.join("disk-drive-scsi0.raw");
    let meta = fs::metadata(&img).unwrap();
    assert_eq!(meta.len(), 10737418240);
    use std::os::unix::fs::MetadataExt;
    assert!(
        meta.blocks() * 512 < 16 << 20,
        "salvaged image is not sparse"
    );
    let mut head = vec![0u8; 167 * 65536];
    std::io::Read::read_exact(&mut fs::File::open(&img).unwrap(), &mut head).unwrap();
    let t = tmp.path().join("head");
    fs::write(&t, &head).unwrap();
    assert_eq!(
        sha256_file(&t),
        "aab5065ff973dd7d21c09e966546635e95c28be6dd1e4e01ae742420a1fbd825"
    );
    let report = fs::read_to_string(out.join("salvage-report.txt")).unwrap();
    assert!(report.contains("drive-scsi0: 163724 of 163840 clusters missing: 23-31, 55-63"));
}

/// Builds an archive with the library writer; `patch` may alter the header
/// bytes (the MD5 is recomputed afterwards).
fn build_archive(
    configs: &[(&str, &[u8])],
    devices: &[(&str, Vec<u8>)],
    patch: impl Fn(&mut Vec<u8>),
) -> Vec<u8> {
    let mut h = HeaderBuilder::new([9; 16], 1_700_000_000);
    for (n, d) in configs {
        h.add_config(n, d.to_vec()).unwrap();
    }
    for (n, d) in devices {
        h.add_device(n, d.len() as u64).unwrap();
    }
    let mut w = Writer::new(Vec::new(), &h, WriterOptions::default()).unwrap();
    for (i, (_, data)) in devices.iter().enumerate() {
        for (n, chunk) in data.chunks(65536).enumerate() {
            w.write_raw(i as u8 + 1, n as u32, chunk).unwrap();
        }
    }
    let mut bytes = w.finish().unwrap();
    let header_size = u32::from_be_bytes(bytes[56..60].try_into().unwrap()) as usize;
    let mut header = bytes[..header_size].to_vec();
    patch(&mut header);
    vma_format::header::update_checksum(&mut header);
    bytes[..header_size].copy_from_slice(&header);
    bytes
}

fn replace(buf: &mut [u8], from: &[u8], to: &[u8]) {
    assert_eq!(from.len(), to.len());
    let pos = buf.windows(from.len()).position(|w| w == from).unwrap();
    buf[pos..pos + from.len()].copy_from_slice(to);
}

#[test]
fn hostile_names_are_refused() {
    let cases: [(&[u8], &[u8], &str); 4] = [
        (
            b"qemu-server.conf",
            b"../../../evil.sh",
            "config 0: name \"../../../evil.sh\" contains '/'",
        ),
        (
            b"drive-scsi0",
            b"../../x/y01",
            "device 1: name \"../../x/y01\" contains '/'",
        ),
        (
            b"drive-scsi0",
            b"..\0\0\0\0\0\0\0\0\0",
            "device 1: name \"..\\0\\0\\0\\0\\0\\0\\0\\0\\0\" contains NUL",
        ),
        (
            b"qemu-server.conf",
            b"bad\nname.conf!!!",
            "config 0: name \"bad\\nname.conf!!!\" contains a control character",
        ),
    ];
    for (from, to, why) in cases {
        let bytes = build_archive(
            &[("qemu-server.conf", b"x")],
            &[("drive-scsi0", vec![1u8; 5000])],
            |h| replace(h, from, to),
        );
        let tmp = tempfile::tempdir().unwrap();
        let a = tmp.path().join("a.vma");
        fs::write(&a, &bytes).unwrap();
        let out = tmp.path().join("deep/out");
        let o = decode(&["extract", a.to_str().unwrap(), out.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(1), "{why}");
        assert_eq!(
            stderr(&o),
            format!("vma-decode: {}: header: {why}\n", a.display())
        );
        assert!(
            !out.exists() && !tmp.path().join("evil.sh").exists() && !tmp.path().join("x").exists()
        );
    }
}

#[test]
fn output_directory_rules_and_device_selection() {
    let bytes = build_archive(
        &[("qemu-server.conf", b"conf")],
        &[
            ("drive-scsi0", vec![1u8; 70000]),
            ("drive-scsi1", vec![2u8; 4096]),
        ],
        |_| {},
    );
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a.vma");
    fs::write(&a, &bytes).unwrap();
    let a_s = a.to_str().unwrap();
    let out = tmp.path().join("out");
    fs::create_dir(&out).unwrap();
    fs::write(out.join("other"), b"keep").unwrap();
    let o = decode(&["extract", a_s, out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        stderr(&o),
        format!(
            "vma-decode: {}: directory exists and is not empty (use --force to write into it)\n",
            out.display()
        )
    );
    let o = decode(&[
        "extract",
        "--force",
        "-d",
        "drive-scsi1",
        a_s,
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let names: Vec<_> = dir_files(&out).into_keys().collect();
    assert_eq!(names, ["disk-drive-scsi1.raw", "other", "qemu-server.conf"]);
    assert!(fs::read(out.join("disk-drive-scsi1.raw")).unwrap() == vec![2u8; 4096]);

    let o = decode(&[
        "extract",
        "-d",
        "drive-nope",
        a_s,
        tmp.path().join("o2").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        stderr(&o),
        format!("vma-decode: {a_s}: no device named \"drive-nope\" in the archive\n")
    );

    let o = decode(&["config", a_s, "-c", "missing.conf"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o),
        format!("vma-decode: {a_s}: no config named \"missing.conf\"\n")
    );

    let o = decode(&["list", tmp.path().join("nope.vma").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(3));
    assert_eq!(
        stderr(&o),
        format!(
            "vma-decode: {}: No such file or directory (os error 2)\n",
            tmp.path().join("nope.vma").display()
        )
    );
}

#[test]
fn vmstate_is_written_in_place() {
    // Three clusters of RAM state; the middle one has zero blocks that
    // Proxmox's extract would drop (shifting the rest).
    let mut state = vec![0u8; 3 * 65536 - 1000];
    state[..65536].fill(0x11);
    state[65536 + 4096 * 5..65536 + 4096 * 6].fill(0x22);
    state[2 * 65536..].fill(0x33);
    let bytes = build_archive(
        &[],
        &[("drive-scsi0", vec![5u8; 512]), ("vmstate", state.clone())],
        |_| {},
    );
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a.vma");
    fs::write(&a, &bytes).unwrap();
    let o = decode(&["list", a.to_str().unwrap()]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "DEV: dev_id=1 size: 512 devname: drive-scsi0\nVMSTATE: dev_id=2 memory: 195608\nCTIME: Tue Nov 14 22:13:20 2023\n"
    );
    let out = tmp.path().join("o");
    let o = decode(&["extract", a.to_str().unwrap(), out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let got = fs::read(out.join("vmstate.bin")).unwrap();
    assert_eq!(got.len(), state.len());
    assert!(got == state, "vmstate.bin differs from the state written");
    assert!(fs::read(out.join("disk-drive-scsi0.raw")).unwrap() == vec![5u8; 512]);
}

#[test]
fn empty_archives() {
    // No configs, no devices: Proxmox's own reader refuses the header its
    // writer makes for this; we list and extract it.
    let bytes = build_archive(&[], &[], |_| {});
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a.vma");
    fs::write(&a, &bytes).unwrap();
    let o = decode(&["list", a.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "CTIME: Tue Nov 14 22:13:20 2023\n"
    );
    let o = decode(&[
        "extract",
        "-v",
        a.to_str().unwrap(),
        tmp.path().join("o").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "vma archive contains no image data\n"
    );

    // The header alone, no extent at all: fine without devices…
    let header_size = u32::from_be_bytes(bytes[56..60].try_into().unwrap()) as usize;
    let o = decode_stdin(
        &["extract", "-", tmp.path().join("o2").to_str().unwrap()],
        &bytes[..header_size],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    // …and a device's clusters missing with one.
    let with_dev = build_archive(&[], &[("drive-scsi0", vec![1u8; 100])], |_| {});
    let hs = u32::from_be_bytes(with_dev[56..60].try_into().unwrap()) as usize;
    let o = decode_stdin(
        &["extract", "-", tmp.path().join("o3").to_str().unwrap()],
        &with_dev[..hs],
    );
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o),
        "vma-decode: <stdin>: drive-scsi0: cluster 0 missing (1 of 1 clusters missing)\n"
    );
    assert_eq!(fs::read_dir(tmp.path().join("o3")).unwrap().count(), 0);
}

#[test]
fn damaged_data_leaves_no_image() {
    let mut bytes = build_archive(
        &[("qemu-server.conf", b"c")],
        &[("drive-scsi0", vec![7u8; 200_000])],
        |_| {},
    );
    let len = bytes.len();
    bytes[len - 100] ^= 1; // inside the data of the only extent
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    let o = decode_stdin(&["extract", "-", out.to_str().unwrap()], &bytes);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o),
        "vma-decode: <stdin>: extent 0 at byte 12800: data checksum mismatch\n"
    );
    assert_eq!(fs::read_dir(&out).unwrap().count(), 0);
    // Salvage drops the extent it cannot trust: everything is missing.
    let o = decode_stdin(
        &[
            "extract",
            "--salvage",
            "-",
            tmp.path().join("s").to_str().unwrap(),
        ],
        &bytes,
    );
    assert_eq!(o.status.code(), Some(4));
    assert!(stderr(&o).starts_with(
        "vma-decode: <stdin>: skipped: extent 0 at byte 12800: data checksum mismatch\nvma-decode: <stdin>: drive-scsi0: 4 of 4 clusters missing: 0-3\n"
    ));
}
