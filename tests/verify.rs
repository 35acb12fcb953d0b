//! vma-verify end to end: Proxmox's archives verify (from files and stdin),
//! the truncated real backup and damaged copies fail with their exact line
//! and exit code, archives with our data checksums say so, and the output
//! formats (-q, -v, --json) and exit codes are exactly as documented.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{bin, fixtures};
use vma_format::HeaderBuilder;

fn verify(args: &[&str]) -> Output {
    Command::new(bin("vma-verify")).args(args).output().unwrap()
}

fn verify_stdin(args: &[&str], input: &[u8]) -> Output {
    let mut cmd = Command::new(bin("vma-verify"));
    cmd.args(args);
    common::output_with_stdin(cmd, input)
}

fn text(b: &[u8]) -> String {
    String::from_utf8(b.to_vec()).unwrap()
}

/// Asserts exit code, stdout and stderr exactly.
#[track_caller]
fn assert_output(out: &Output, code: i32, stdout: &str, stderr: &str) {
    assert_eq!(
        (
            out.status.code(),
            text(&out.stdout).as_str(),
            text(&out.stderr).as_str()
        ),
        (Some(code), stdout, stderr)
    );
}

fn pve(name: &str) -> PathBuf {
    fixtures().join("pve").join(name)
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Clusters per archive, summed from the "N extent(s): @off clusters=C …"
/// structure lines of EXPECTED.txt.
fn expected_clusters() -> BTreeMap<String, u64> {
    let text = fs::read_to_string(pve("EXPECTED.txt")).unwrap();
    let mut out = BTreeMap::new();
    let mut current = None;
    for line in text.lines() {
        if let Some(name) = line.strip_prefix("ARCHIVE ") {
            current = Some(name.trim().to_string());
        } else if line.contains("extent(s):") {
            let total = line
                .split("clusters=")
                .skip(1)
                .map(|s| {
                    s.split(|c: char| !c.is_ascii_digit())
                        .next()
                        .unwrap()
                        .parse::<u64>()
                        .unwrap()
                })
                .sum();
            out.insert(current.clone().unwrap(), total);
        }
    }
    out
}

fn pve_archives() -> Vec<(String, u64)> {
    let clusters = expected_clusters();
    let mut names: Vec<String> = fs::read_dir(fixtures().join("pve"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".vma"))
        .collect();
    names.sort();
    assert!(names.len() >= 4, "fixtures missing: {names:?}");
    names
        .into_iter()
        .map(|n| {
            let c = clusters[&n];
            (n, c)
        })
        .collect()
}

#[test]
fn proxmox_archives_verify_from_files() {
    for (name, clusters) in pve_archives() {
        let path = pve(&name);
        let out = verify(&[path_str(&path)]);
        assert_output(
            &out,
            0,
            &format!(
                "{}: ok ({clusters} clusters, data checksums: absent)\n",
                path.display()
            ),
            "",
        );
        // -q: silent, like Proxmox's `vma verify`.
        assert_output(&verify(&["-q", path_str(&path)]), 0, "", "");
    }
}

#[test]
fn proxmox_archives_verify_from_stdin() {
    for (name, clusters) in pve_archives() {
        let bytes = fs::read(pve(&name)).unwrap();
        let out = verify_stdin(&["-"], &bytes);
        assert_output(
            &out,
            0,
            &format!("<stdin>: ok ({clusters} clusters, data checksums: absent)\n"),
            "",
        );
    }
}

#[test]
fn several_archives_in_one_call() {
    let archives = pve_archives();
    let paths: Vec<PathBuf> = archives.iter().map(|(n, _)| pve(n)).collect();
    let mut args: Vec<&str> = paths.iter().map(|p| path_str(p)).collect();
    let multi = fs::read(pve("multi-disk.vma")).unwrap();
    args.insert(1, "-");
    let out = verify_stdin(&args, &multi);
    let mut want = String::new();
    for (i, (_, clusters)) in archives.iter().enumerate() {
        if i == 1 {
            want += "<stdin>: ok (150 clusters, data checksums: absent)\n";
        }
        want += &format!(
            "{}: ok ({clusters} clusters, data checksums: absent)\n",
            paths[i].display()
        );
    }
    assert_output(&out, 0, &want, "");
}

#[test]
fn verbose_prints_a_summary_per_device() {
    let path = pve("multi-disk.vma");
    let p = path.display();
    assert_output(
        &verify(&["-v", path_str(&path)]),
        0,
        &format!(
            "{p}: ok (150 clusters, data checksums: absent)
  dev 1 drive-scsi0: size 1061376, 17 of 17 clusters, stored 880640 bytes, zero 184320 bytes (17.4% sparse)
  dev 2 drive-virtio1: size 8388608, 128 of 128 clusters, stored 24576 bytes, zero 8364032 bytes (99.7% sparse)
  dev 3 drive-sata2: size 262144, 4 of 4 clusters, stored 0 bytes, zero 262144 bytes (100% sparse)
  dev 4 drive-ide0: size 4608, 1 of 1 clusters, stored 8192 bytes, zero 0 bytes (0% sparse)
"
        ),
        "",
    );
    // An archive without devices: the ok line only.
    let path = pve("empty.vma");
    assert_output(
        &verify(&["-v", path_str(&path)]),
        0,
        &format!(
            "{}: ok (0 clusters, data checksums: absent)\n",
            path.display()
        ),
        "",
    );
}

#[test]
fn json_reports_one_object_per_line() {
    let multi = fs::read(pve("multi-disk.vma")).unwrap();
    let out = verify_stdin(&["--json", "-"], &multi);
    assert_output(
        &out,
        0,
        concat!(
            r#"{"archive":"<stdin>","bytes_read":928768,"clusters":150,"#,
            r#""configs":[{"name":"qemu-server.conf","size":832},{"name":"pve-firewall.fw","size":321}],"#,
            r#""ctime":1795689905,"data_checksums":"absent","devices":["#,
            r#"{"clusters":17,"clusters_total":17,"id":1,"name":"drive-scsi0","size":1061376,"stored_bytes":880640,"vmstate":false,"zero_bytes":184320},"#,
            r#"{"clusters":128,"clusters_total":128,"id":2,"name":"drive-virtio1","size":8388608,"stored_bytes":24576,"vmstate":false,"zero_bytes":8364032},"#,
            r#"{"clusters":4,"clusters_total":4,"id":3,"name":"drive-sata2","size":262144,"stored_bytes":0,"vmstate":false,"zero_bytes":262144},"#,
            r#"{"clusters":1,"clusters_total":1,"id":4,"name":"drive-ide0","size":4608,"stored_bytes":8192,"vmstate":false,"zero_bytes":0}],"#,
            r#""error":null,"error_offset":null,"extents":3,"status":"ok","uuid":"65647e75-97bf-49b2-9f15-5f0bbe960e62"}"#,
            "\n"
        ),
        "",
    );

    // A damaged archive and one that cannot be opened: an object each, the
    // error lines on stderr, the worst exit code.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.vma");
    let mut bytes = multi.clone();
    bytes[903168 + 100] ^= 1;
    fs::write(&bad, &bytes).unwrap();
    let missing = dir.path().join("missing.vma");
    let out = verify(&["--json", path_str(&bad), path_str(&missing)]);
    let (b, m) = (bad.display(), missing.display());
    assert_output(
        &out,
        3,
        &format!(
            concat!(
                r#"{{"archive":"{b}","bytes_read":903680,"clusters":58,"#,
                r#""configs":[{{"name":"qemu-server.conf","size":832}},{{"name":"pve-firewall.fw","size":321}}],"#,
                r#""ctime":1795689905,"data_checksums":null,"devices":["#,
                r#"{{"clusters":17,"clusters_total":17,"id":1,"name":"drive-scsi0","size":1061376,"stored_bytes":880640,"vmstate":false,"zero_bytes":184320}},"#,
                r#"{{"clusters":36,"clusters_total":128,"id":2,"name":"drive-virtio1","size":8388608,"stored_bytes":0,"vmstate":false,"zero_bytes":2359296}},"#,
                r#"{{"clusters":4,"clusters_total":4,"id":3,"name":"drive-sata2","size":262144,"stored_bytes":0,"vmstate":false,"zero_bytes":262144}},"#,
                r#"{{"clusters":1,"clusters_total":1,"id":4,"name":"drive-ide0","size":4608,"stored_bytes":8192,"vmstate":false,"zero_bytes":0}}],"#,
                r#""error":"extent 1 at byte 903168: header checksum mismatch","error_offset":903168,"#,
                r#""extents":1,"status":"damaged","uuid":"65647e75-97bf-49b2-9f15-5f0bbe960e62"}}"#,
                "\n",
                r#"{{"archive":"{m}","bytes_read":0,"clusters":0,"configs":null,"ctime":null,"#,
                r#""data_checksums":null,"devices":null,"#,
                r#""error":"cannot open: No such file or directory (os error 2)","error_offset":null,"#,
                r#""extents":null,"status":"error","uuid":null}}"#,
                "\n"
            ),
            b = b,
            m = m
        ),
        &format!(
            "vma-verify: {b}: extent 1 at byte 903168: header checksum mismatch\n\
             vma-verify: {m}: cannot open: No such file or directory (os error 2)\n"
        ),
    );
}

fn fragment() -> Vec<u8> {
    let gz = fs::File::open(fixtures().join("real/proxmox-fragment.vma.gz")).unwrap();
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(gz)
        .read_to_end(&mut bytes)
        .unwrap();
    assert_eq!(bytes.len(), 538_112);
    bytes
}

#[test]
fn the_truncated_real_backup_fails_naming_device_and_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxmox-fragment.vma");
    fs::write(&path, fragment()).unwrap();
    assert_output(
        &verify(&[path_str(&path)]),
        1,
        "",
        &format!(
            "vma-verify: {}: drive-scsi0: cluster 23 missing (163724 of 163840 clusters missing)\n",
            path.display()
        ),
    );
    assert_output(
        &verify_stdin(&["-q", "-"], &fragment()),
        1,
        "",
        "vma-verify: <stdin>: drive-scsi0: cluster 23 missing (163724 of 163840 clusters missing)\n",
    );
}

/// Writes `bytes` to DIR/NAME and returns the path.
fn put(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn damaged_copies_of_a_proxmox_archive() {
    let dir = tempfile::tempdir().unwrap();
    let multi = fs::read(pve("multi-disk.vma")).unwrap();
    let mut cases: Vec<(PathBuf, String)> = Vec::new();

    let mut b = multi.clone();
    b[40] ^= 0x10;
    cases.push((
        put(dir.path(), "header.vma", &b),
        "header: header checksum mismatch".into(),
    ));

    let mut b = multi.clone();
    b[903168 + 40 + 8 * 3 + 1] ^= 0x10;
    cases.push((
        put(dir.path(), "slot.vma", &b),
        "extent 1 at byte 903168: header checksum mismatch".into(),
    ));

    cases.push((
        put(
            dir.path(),
            "cut-data.vma",
            &multi[..13824 + 512 + 4096 * 100],
        ),
        "extent 0 at byte 13824: truncated: got 409600 of 888832 data bytes".into(),
    ));

    cases.push((
        put(dir.path(), "cut-boundary.vma", &multi[..903168]),
        "drive-virtio1: cluster 36 missing (92 of 128 clusters missing)".into(),
    ));

    let mut b = multi.clone();
    b.extend_from_slice(&multi[920064..]);
    cases.push((
        put(dir.path(), "dup.vma", &b),
        "extent 3 at byte 928768: slot 0: cluster 94 of drive-virtio1 appears twice".into(),
    ));

    cases.push((
        put(dir.path(), "cut-header.vma", &multi[..9000]),
        "header: truncated: got 9000 of 12288 bytes".into(),
    ));

    for (path, message) in &cases {
        assert_output(
            &verify(&[path_str(path)]),
            1,
            "",
            &format!("vma-verify: {}: {message}\n", path.display()),
        );
    }

    // All at once, between two sound archives: each line in order, exit 1.
    let one = pve("one-disk.vma");
    let mut args = vec![path_str(&one)];
    args.extend(cases.iter().map(|(p, _)| path_str(p)));
    args.push(path_str(&one));
    let ok = format!(
        "{}: ok (17 clusters, data checksums: absent)\n",
        one.display()
    );
    let errors: String = cases
        .iter()
        .map(|(p, m)| format!("vma-verify: {}: {m}\n", p.display()))
        .collect();
    assert_output(&verify(&args), 1, &format!("{ok}{ok}"), &errors);
}

/// An archive written by the library writer: two devices, with or without
/// data checksums. drive-scsi0 stores 16 + 16 + 16 + 1 blocks (its last
/// cluster holds 512 bytes), drive-scsi1 is one zero cluster.
fn our_archive(checksums: bool) -> Vec<u8> {
    let mut h = HeaderBuilder::new([3; 16], 1_700_000_000);
    h.add_config("qemu-server.conf", b"memory: 1024\n".to_vec())
        .unwrap();
    h.add_device("drive-scsi0", 3 * 65536 + 512).unwrap();
    h.add_device("drive-scsi1", 65536).unwrap();
    let data = (0..4).map(|n| (1, n, vec![n as u8 + 1; 65536]));
    test_support::write_archive(&h, checksums, data.chain([(2, 0, vec![])]))
}

#[test]
fn data_checksums_verified_and_caught() {
    let dir = tempfile::tempdir().unwrap();
    let good = put(dir.path(), "ours.vma", &our_archive(true));
    let plain = put(dir.path(), "plain.vma", &our_archive(false));
    assert_output(
        &verify(&["-v", path_str(&good), path_str(&plain)]),
        0,
        &format!(
            "{g}: ok (5 clusters, data checksums: verified)
  dev 1 drive-scsi0: size 197120, 4 of 4 clusters, stored 200704 bytes, zero 0 bytes (0% sparse)
  dev 2 drive-scsi1: size 65536, 1 of 1 clusters, stored 0 bytes, zero 65536 bytes (100% sparse)
{p}: ok (5 clusters, data checksums: absent)
  dev 1 drive-scsi0: size 197120, 4 of 4 clusters, stored 200704 bytes, zero 0 bytes (0% sparse)
  dev 2 drive-scsi1: size 65536, 1 of 1 clusters, stored 0 bytes, zero 65536 bytes (100% sparse)
",
            g = good.display(),
            p = plain.display()
        ),
        "",
    );
    let mut bytes = our_archive(true);
    let header_size = u32::from_be_bytes(bytes[56..60].try_into().unwrap()) as usize;
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    let bad = put(dir.path(), "flipped.vma", &bytes);
    assert_output(
        &verify(&[path_str(&bad)]),
        1,
        "",
        &format!(
            "vma-verify: {}: extent 0 at byte {header_size}: data checksum mismatch\n",
            bad.display()
        ),
    );
}

#[test]
fn usage_and_io_errors() {
    // No archive, an unknown flag, conflicting flags, stdin twice: usage (2).
    for args in [
        &[][..],
        &["--frobnicate", "x"],
        &["-q", "-v", "x"],
        &["--json", "-v", "x"],
    ] {
        let out = verify(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(out.stdout.is_empty());
        assert!(!out.stderr.is_empty());
    }
    assert_output(
        &verify(&["-", "-"]),
        2,
        "",
        "vma-verify: standard input (`-`) can be read only once\n",
    );
    // A directory and a missing file: I/O (3), each named.
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.vma");
    assert_output(
        &verify(&[path_str(dir.path()), path_str(&missing)]),
        3,
        "",
        &format!(
            "vma-verify: {}: cannot open: is a directory\nvma-verify: {}: cannot open: No such file or directory (os error 2)\n",
            dir.path().display(),
            missing.display()
        ),
    );
    // Not an archive at all, from stdin.
    assert_output(
        &verify_stdin(&["-"], b"hello"),
        1,
        "",
        "vma-verify: <stdin>: header: not a VMA archive (wrong magic number)\n",
    );
    assert_output(
        &verify_stdin(&["-"], b""),
        1,
        "",
        "vma-verify: <stdin>: header: not a VMA archive: the input is empty\n",
    );
}

#[test]
fn help_documents_the_exit_codes_and_formats() {
    let out = verify(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = text(&out.stdout);
    assert!(help.contains(vma_cli_exit_codes()), "{help}");
    assert!(help.contains("NAME: ok (N clusters, data checksums: verified|absent|partial)"));
    assert!(help.contains("--json"));
}

/// vma_cli::EXIT_CODES_HELP, spelled out: the table every tool documents.
fn vma_cli_exit_codes() -> &'static str {
    "Exit codes: 0 ok, 1 archive damaged or invalid, 2 usage, 3 I/O or environment error, 4 partial result (salvage)."
}
