//! The `--json` outputs of `vma-decode list`, `vma-decode extract` and
//! `vma-encode` hold exactly the fields docs/JSON.md documents, with the
//! documented types (read from its tables, so the document and the tools
//! cannot drift apart), and their values are right.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use common::{bin, fixtures, sha256_file};
use serde_json::Value;

/// The fields of the section of docs/JSON.md whose heading starts with
/// `heading`: path -> type.
fn documented(heading: &str) -> BTreeMap<String, String> {
    let doc = std::fs::read_to_string(common::root().join("docs/JSON.md")).unwrap();
    let section = doc
        .split("\n## ")
        .find(|s| s.starts_with(heading))
        .unwrap_or_else(|| panic!("docs/JSON.md has no section {heading}"));
    let mut fields = BTreeMap::new();
    for line in section.lines() {
        let cells: Vec<&str> = line.split(" | ").collect();
        if cells.len() < 3 || !cells[0].starts_with("| `") {
            continue;
        }
        let name = cells[0].trim_start_matches("| ").trim_matches('`');
        fields.insert(name.to_string(), cells[1].replace("\\|", "|"));
    }
    assert!(!fields.is_empty(), "no fields documented under {heading}");
    fields
}

/// Every field path of `v` with the documented type it has.
fn fields_of(v: &Value, prefix: &str, out: &mut BTreeMap<String, Vec<String>>) {
    let Value::Object(map) = v else {
        panic!("{prefix}: not an object: {v}")
    };
    for (k, v) in map {
        let path = format!("{prefix}{k}");
        out.entry(path.clone())
            .or_default()
            .push(type_of(v).to_string());
        match v {
            Value::Array(items) => {
                for item in items {
                    fields_of(item, &format!("{path}[]."), out);
                }
            }
            Value::Object(_) => fields_of(v, &format!("{path}."), out),
            _ => {}
        }
    }
}

fn type_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_u64() || n.is_i64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// `v` has exactly the fields documented under `heading`, each of its
/// documented type. Arrays in `v` must not be empty, so that their
/// elements' fields are checked too.
fn check_against_doc(v: &Value, heading: &str) {
    let want = documented(heading);
    let mut got = BTreeMap::new();
    fields_of(v, "", &mut got);
    let want_names: Vec<&String> = want.keys().collect();
    let got_names: Vec<&String> = got.keys().collect();
    assert_eq!(got_names, want_names, "{heading}: fields of {v}");
    for (name, types) in &got {
        let doc_type = &want[name];
        for t in types {
            let ok = match doc_type.as_str() {
                "number" => t == "number" || t == "integer",
                "string|null" => t == "string" || t == "null",
                other => t == other,
            };
            assert!(ok, "{heading}: {name} is {t}, documented {doc_type}");
        }
    }
}

fn json_line(bytes: &[u8]) -> Value {
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    assert!(
        text.ends_with('\n') && text.matches('\n').count() == 1,
        "{text:?}"
    );
    serde_json::from_str(&text).unwrap()
}

#[test]
fn list_json_is_the_documented_header() {
    let archive = fixtures().join("pve/multi-disk.vma");
    let out = Command::new(bin("vma-decode"))
        .args(["list", "--json"])
        .arg(&archive)
        .env("TZ", "UTC")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v = json_line(&out.stdout);
    check_against_doc(&v, "`vma-decode list --json");
    // The same facts as Proxmox's `vma list` lines.
    let text = Command::new(bin("vma-decode"))
        .arg("list")
        .arg(&archive)
        .env("TZ", "UTC")
        .output()
        .unwrap();
    let mut lines = Vec::new();
    for c in v["configs"].as_array().unwrap() {
        lines.push(format!(
            "CFG: size: {} name: {}",
            c["size"],
            c["name"].as_str().unwrap()
        ));
    }
    for d in v["devices"].as_array().unwrap() {
        assert_eq!(d["vmstate"], false);
        lines.push(format!(
            "DEV: dev_id={} size: {} devname: {}",
            d["id"],
            d["size"],
            d["name"].as_str().unwrap()
        ));
    }
    let text = String::from_utf8(text.stdout).unwrap();
    let want: Vec<&str> = text.lines().filter(|l| !l.starts_with("CTIME:")).collect();
    assert_eq!(lines, want);
    assert_eq!(v["archive"], archive.to_str().unwrap());
    assert_eq!(v["ctime"], 1795689905);
    assert_eq!(v["ctime_iso"], "2026-11-26T10:45:05+00:00");
    // vma-verify reads the same uuid.
    let verify = Command::new(bin("vma-verify"))
        .arg("--json")
        .arg(&archive)
        .output()
        .unwrap();
    assert_eq!(json_line(&verify.stdout)["uuid"], v["uuid"]);
}

#[test]
fn extract_json_names_every_file_written() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("out");
    let archive = fixtures().join("pve/multi-disk.vma");
    let out = Command::new(bin("vma-decode"))
        .args(["extract", "--json"])
        .arg(&archive)
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v = json_line(&out.stdout);
    check_against_doc(&v, "`vma-decode extract --json");
    assert_eq!(v["complete"], true);
    assert_eq!(v["missing_clusters"], 0);
    assert_eq!(v["directory"], dir.to_str().unwrap());
    assert_eq!(v["stats"]["data_checksums"], "absent");
    let expected = &common::parse_expected()["multi-disk.vma"];
    let files = v["files"].as_array().unwrap();
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    on_disk.sort();
    let mut named: Vec<String> = files
        .iter()
        .map(|f| {
            let p = Path::new(f["path"].as_str().unwrap());
            assert_eq!(p.parent().unwrap(), dir);
            p.file_name().unwrap().to_string_lossy().into_owned()
        })
        .collect();
    named.sort();
    assert_eq!(named, on_disk);
    for f in files {
        let p = Path::new(f["path"].as_str().unwrap());
        let name = p.file_name().unwrap().to_str().unwrap();
        let (sha, size) = &expected.files[name];
        assert_eq!(f["size"], *size, "{name}");
        assert_eq!(&sha256_file(p), sha, "{name}");
        let meta = std::fs::metadata(p).unwrap();
        assert_eq!(
            f["allocated"],
            std::os::unix::fs::MetadataExt::blocks(&meta) * 512
        );
        match f["kind"].as_str().unwrap() {
            "disk" => assert_eq!(format!("disk-{}.raw", f["device"].as_str().unwrap()), name),
            "config" => assert!(f["device"].is_null()),
            k => panic!("{name}: kind {k}"),
        }
    }
    // The read's counters are vma-verify's.
    let verify = Command::new(bin("vma-verify"))
        .arg("--json")
        .arg(&archive)
        .output()
        .unwrap();
    let verify = json_line(&verify.stdout);
    assert_eq!(v["stats"]["clusters"], verify["clusters"]);
    assert_eq!(v["stats"]["extents"], verify["extents"]);
    assert_eq!(v["stats"]["bytes_read"], verify["bytes_read"]);
    let stored: u64 = verify["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["stored_bytes"].as_u64().unwrap())
        .sum();
    assert_eq!(v["stats"]["stored_bytes"], stored);
}

#[test]
fn extract_json_of_a_salvage_says_what_is_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("out");
    let out = Command::new(bin("vma-decode"))
        .args(["extract", "--json", "--salvage"])
        .arg(fixtures().join("real/proxmox-fragment.vma.gz"))
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let v = json_line(&out.stdout);
    check_against_doc(&v, "`vma-decode extract --json");
    assert_eq!(v["complete"], false);
    // 116 of 163840 clusters are in the fragment (shared/fixtures/real/EXPECTED.md).
    assert_eq!(v["missing_clusters"], 163840 - 116);
    assert_eq!(v["stats"]["clusters"], 116);
    let kinds: Vec<(&str, &str)> = v["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let p = f["path"].as_str().unwrap();
            (&p[p.rfind('/').unwrap() + 1..], f["kind"].as_str().unwrap())
        })
        .collect();
    for want in [
        ("disk-drive-scsi0.raw", "disk"),
        ("qemu-server.conf", "config"),
        ("salvage-report.txt", "salvage-report"),
    ] {
        assert!(kinds.contains(&want), "{want:?} not in {kinds:?}");
    }
}

#[test]
fn encode_json_reports_the_archive_made() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    common::make_images(d, &[]);
    let archive = d.join("a.vma");
    let out = Command::new(bin("vma-encode"))
        .args(["--json", "--ctime", "1700000000"])
        .args(["--uuid", "01234567-89ab-cdef-0123-456789abcdef"])
        .arg("-c")
        .arg(d.join("qemu-server.conf"))
        .arg("-o")
        .arg(&archive)
        .arg(format!("drive-scsi0={}", d.join("sparse.raw").display()))
        .arg(format!("drive-scsi1={}", d.join("tiny.raw").display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v = json_line(&out.stderr);
    check_against_doc(&v, "`vma-encode --json");
    assert_eq!(v["output"], archive.to_str().unwrap());
    assert_eq!(v["uuid"], "01234567-89ab-cdef-0123-456789abcdef");
    assert_eq!(v["ctime"], 1700000000);
    assert_eq!(v["data_checksums"], true);
    assert_eq!(
        v["archive_bytes"],
        std::fs::metadata(&archive).unwrap().len()
    );
    assert_eq!(v["configs"][0]["name"], "qemu-server.conf");
    assert_eq!(
        v["configs"][0]["size"],
        std::fs::metadata(d.join("qemu-server.conf")).unwrap().len()
    );
    // Against vma-verify's reading of the archive.
    let verify = Command::new(bin("vma-verify"))
        .arg("--json")
        .arg(&archive)
        .output()
        .unwrap();
    let verify = json_line(&verify.stdout);
    assert_eq!(verify["status"], "ok");
    let devices = v["devices"].as_array().unwrap();
    let vdevices = verify["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 2);
    for (e, r) in devices.iter().zip(vdevices) {
        for k in ["id", "name", "size", "stored_bytes"] {
            assert_eq!(e[k], r[k], "{k}");
        }
        assert_eq!(e["clusters"], r["clusters_total"]);
        assert_eq!(
            e["stored_bytes"].as_u64().unwrap() + e["zero_bytes"].as_u64().unwrap(),
            e["clusters"].as_u64().unwrap() * 65536
        );
    }
    assert_eq!(
        devices[1]["size"], 4608,
        "tiny.raw's 4097 bytes round up to 512"
    );
}
