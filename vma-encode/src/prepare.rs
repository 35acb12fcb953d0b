//! Everything checked before the first byte is written: the sources opened
//! and sized (images, or the cluster stream on standard input and, for an
//! incremental one, its base archive), the configs read, the header
//! declared, the creation time and uuid chosen ([`prepare`]).

use std::ffi::OsStr;
use std::fs::File;
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use vma_cli::{exit, Failure};
use vma_format::reader::Archive;
use vma_format::stream::StreamReader;
use vma_format::{HeaderBuilder, MAX_BLOB_SIZE, MAX_CONFIGS, MAX_DEVICES};

use crate::source::ImageSource;
use crate::{merge, stats, Args};

/// What the sources are.
pub(crate) enum Sources {
    Images(Vec<ImageSource>),
    Stream(StreamReader<File>),
    /// An incremental stream and its base archive (name, archive, map of
    /// the base's device ids to the stream's).
    Merge(Box<Merging>),
}

/// An incremental stream, and the base archive it applies to.
pub(crate) struct Merging {
    pub(crate) stream: StreamReader<File>,
    pub(crate) base_name: String,
    pub(crate) base: Archive<vma_cli::input::Input>,
    /// The base's device ids to the stream's.
    pub(crate) map: [u8; 256],
    /// The base's path, and whether it is a plain (uncompressed) regular
    /// file, which `--sorted` can read in any order.
    pub(crate) base_path: PathBuf,
    pub(crate) plain: bool,
}

/// What [`prepare`] learnt that the statistics report.
pub(crate) struct Meta {
    pub(crate) uuid: [u8; 16],
    pub(crate) ctime: i64,
    pub(crate) configs: Vec<stats::ConfigStats>,
}

/// Opens every source and config and declares them in a header. The
/// creation time: `--ctime`, else the stream's backup instant, else
/// `ctime_env` (SOURCE_DATE_EPOCH), else now.
pub(crate) fn prepare(
    args: &Args,
    ctime_env: Option<i64>,
) -> Result<(Sources, HeaderBuilder, Meta), Failure> {
    let stream = args.sources.len() == 1 && args.sources[0] == "-";
    if !stream && args.sources.iter().any(|s| s == "-") {
        return Err(Failure::new(
            exit::USAGE,
            "'-' (a cluster stream on standard input) must be the only source",
        ));
    }
    let at_most = |what: &str, given: usize, max: usize| {
        if given > max {
            Err(Failure::new(
                exit::USAGE,
                format!("too many {what}: {given} given, the format holds {max}"),
            ))
        } else {
            Ok(())
        }
    };
    at_most("configs", args.configs.len(), MAX_CONFIGS)?;
    at_most("devices", args.sources.len(), MAX_DEVICES)?;
    let reader = if stream {
        let stdin = std::io::stdin()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| Failure::io("<stdin>", &e))?;
        Some(StreamReader::new(File::from(stdin)).map_err(|e| Failure::format("<stdin>", &e))?)
    } else {
        None
    };
    let ctime = args
        .ctime
        .or(reader.as_ref().map(|r| r.backup_time()))
        .or(ctime_env)
        .unwrap_or_else(now);
    if args.base.is_some() && !stream {
        return Err(Failure::new(
            exit::USAGE,
            "--base needs '-' (an incremental cluster stream on standard input)",
        ));
    }
    let mut base = None;
    if let (Some(path), Some(r)) = (&args.base, reader.as_ref()) {
        let name = path.display().to_string();
        if r.is_incremental() {
            let input = vma_cli::input::Input::open(&name).map_err(|e| Failure::io(&name, &e))?;
            let plain =
                input.compression().is_none() && std::fs::metadata(path).is_ok_and(|m| m.is_file());
            let archive = Archive::new(input).map_err(|e| Failure::format(&name, &e))?;
            let map = merge::check_base(&name, archive.header(), r)?;
            base = Some((name, archive, map, path.clone(), plain));
        } else {
            eprintln!("vma-encode: the stream is a full backup: --base {name} is not needed");
        }
    }
    if let Some(r) = reader
        .as_ref()
        .filter(|r| r.is_incremental() && base.is_none())
    {
        let base = r.identity().and_then(|i| i.base).expect("incremental");
        return Err(Failure::new(
            exit::USAGE,
            format!(
                "<stdin>: an incremental cluster stream (only the clusters changed since the backup {} of {}): give that backup's archive with --base",
                uuid::Uuid::from_bytes(base.uuid),
                base.time
            ),
        ));
    }
    // A stream that names its archive's uuid (cbw-tap's) gets it, so that
    // the next incremental backup can name this archive as its base.
    let uuid = args
        .uuid
        .map(uuid::Uuid::into_bytes)
        .or(args
            .uuid_from
            .as_deref()
            .map(vma_format::identity::uuid_from_name))
        .or(reader.as_ref().and_then(|r| r.identity()).map(|i| i.uuid))
        .unwrap_or_else(|| uuid::Uuid::new_v4().into_bytes());
    if let Some(id) = reader.as_ref().and_then(|r| r.identity()) {
        if id.uuid != uuid {
            eprintln!(
                "vma-encode: warning: the archive's uuid is not the one the stream names ({}): it cannot be the base of the next incremental backup (give --uuid-from to cbw-tap backup instead)",
                uuid::Uuid::from_bytes(id.uuid)
            );
        }
    }
    let mut builder = HeaderBuilder::new(uuid, ctime);
    let mut meta = Meta {
        uuid,
        ctime,
        configs: Vec::new(),
    };
    for arg in &args.configs {
        let (name, path) = split_config(arg.as_os_str());
        let (base, data) = read_config(&path)?;
        let name = name.unwrap_or(base);
        meta.configs.push(stats::ConfigStats {
            name: vma_format::names::escape(name.as_bytes()),
            size: data.len() as u64,
        });
        builder.add_config(&name, data).map_err(|e| {
            Failure::new(exit::USAGE, format!("{}: {}", path.display(), e.message()))
        })?;
    }
    if let (true, Some((name, archive, ..))) = (args.configs.is_empty(), &base) {
        // The merged archive keeps the base's configs unless given others.
        for c in archive.header().configs() {
            let cname = String::from_utf8(c.c_name().to_vec()).map_err(|_| {
                Failure::new(
                    exit::DAMAGED,
                    format!("{name}: config {} is not UTF-8", c.display_name()),
                )
            })?;
            meta.configs.push(stats::ConfigStats {
                name: vma_format::names::escape(cname.as_bytes()),
                size: c.data.len() as u64,
            });
            builder
                .add_config(&cname, c.data.clone())
                .map_err(|e| Failure::format(name, &e))?;
        }
    }
    if let Some(reader) = reader {
        for d in reader.devices() {
            builder
                .add_device(&d.name, d.size)
                .map_err(|e| Failure::format("<stdin>", &e))?;
        }
        if let Some((name, archive, map, base_path, plain)) = base {
            return Ok((
                Sources::Merge(Box::new(Merging {
                    stream: reader,
                    base_name: name,
                    base: archive,
                    map,
                    base_path,
                    plain,
                })),
                builder,
                meta,
            ));
        }
        return Ok((Sources::Stream(reader), builder, meta));
    }
    let mut images = Vec::with_capacity(args.sources.len());
    for (i, arg) in args.sources.iter().enumerate() {
        let (name, path) = split_source(arg, i)?;
        let image = ImageSource::open(name, &path, args.assume_raw)
            .map_err(|e| e.into_failure("<source>"))?;
        builder.add_device(&image.name, image.size).map_err(|e| {
            Failure::new(exit::USAGE, format!("{}: {}", path.display(), e.message()))
        })?;
        images.push(image);
    }
    Ok((Sources::Images(images), builder, meta))
}

/// The config qmrestore restores a VM from.
pub const QEMU_SERVER_CONF: &str = "qemu-server.conf";

/// The warning for an archive with disks but no `qemu-server.conf`, if
/// one with these configs and devices is one.
pub fn config_warning(configs: &[String], devices: &[(String, u64)]) -> Option<String> {
    let disks = devices.iter().any(|(n, _)| n != vma_format::VMSTATE_NAME);
    let has = configs.iter().any(|n| n == QEMU_SERVER_CONF);
    (disks && !has).then(|| {
        format!(
            "warning: no config named {QEMU_SERVER_CONF} in the archive: Proxmox's qmrestore \
             will not restore it (add -c {QEMU_SERVER_CONF}=PATH)"
        )
    })
}

/// `-c NAME=PATH` → (Some(NAME), PATH) when NAME is not empty and holds no
/// `/`; anything else is a PATH stored under its base name.
fn split_config(arg: &OsStr) -> (Option<String>, PathBuf) {
    let bytes = arg.as_bytes();
    if let Some(eq) = bytes.iter().position(|&b| b == b'=') {
        let name = &bytes[..eq];
        if !name.is_empty() && !name.contains(&b'/') {
            if let Ok(name) = std::str::from_utf8(name) {
                return (
                    Some(name.to_string()),
                    PathBuf::from(OsStr::from_bytes(&bytes[eq + 1..])),
                );
            }
        }
    }
    (None, PathBuf::from(arg))
}

/// `NAME=SOURCE` → (NAME, SOURCE); a bare SOURCE gets `disk{index}`. Split at
/// the first `=`, as Proxmox does.
fn split_source(arg: &OsStr, index: usize) -> Result<(String, PathBuf), Failure> {
    let bytes = arg.as_bytes();
    match bytes.iter().position(|&b| b == b'=') {
        Some(eq) => {
            let path = PathBuf::from(OsStr::from_bytes(&bytes[eq + 1..]));
            let name = std::str::from_utf8(&bytes[..eq]).map_err(|_| {
                Failure::new(
                    exit::USAGE,
                    format!("{}: device name is not UTF-8", path.display()),
                )
            })?;
            if path.as_os_str().is_empty() {
                return Err(Failure::new(
                    exit::USAGE,
                    format!("{}: no source after '='", arg.to_string_lossy()),
                ));
            }
            Ok((name.to_string(), path))
        }
        None => Ok((format!("disk{index}"), PathBuf::from(arg))),
    }
}

/// Reads a config file: its base name and content, at most 65535 bytes
/// (checked before reading it all).
fn read_config(path: &Path) -> Result<(String, Vec<u8>), Failure> {
    let shown = path.display().to_string();
    let file = File::open(path).map_err(|e| Failure::io(&shown, &e))?;
    let meta = file.metadata().map_err(|e| Failure::io(&shown, &e))?;
    if meta.is_dir() {
        return Err(Failure::new(
            exit::USAGE,
            format!("{shown}: is a directory"),
        ));
    }
    let mut data = Vec::new();
    file.take(MAX_BLOB_SIZE as u64 + 1)
        .read_to_end(&mut data)
        .map_err(|e| Failure::io(&shown, &e))?;
    if data.len() > MAX_BLOB_SIZE {
        return Err(Failure::new(
            exit::USAGE,
            format!("{shown}: config larger than the format's {MAX_BLOB_SIZE} bytes"),
        ));
    }
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Failure::new(exit::USAGE, format!("{shown}: no UTF-8 base name")))?;
    Ok((name.to_string(), data))
}

/// `$SOURCE_DATE_EPOCH`, if set (an integer, or it is a usage error).
pub(crate) fn source_date_epoch() -> Result<Option<i64>, Failure> {
    match std::env::var_os("SOURCE_DATE_EPOCH") {
        None => Ok(None),
        Some(v) if v.is_empty() => Ok(None),
        Some(v) => v
            .to_str()
            .and_then(|s| s.trim().parse::<i64>().ok())
            .filter(|&t| t >= 0)
            .map(Some)
            .ok_or_else(|| {
                Failure::new(
                    exit::USAGE,
                    format!(
                        "SOURCE_DATE_EPOCH={}: not a number of seconds since the epoch (0 or more)",
                        v.to_string_lossy()
                    ),
                )
            }),
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_named_like_proxmox() {
        let split = |a: &str, i| split_source(OsStr::new(a), i).map_err(|f| f.message);
        assert_eq!(
            split("drive-scsi0=/dev/sdb", 0),
            Ok(("drive-scsi0".into(), PathBuf::from("/dev/sdb")))
        );
        assert_eq!(
            split("a.raw", 3),
            Ok(("disk3".into(), PathBuf::from("a.raw")))
        );
        // Split at the first '=', as Proxmox does.
        assert_eq!(
            split("x=a=b.raw", 0),
            Ok(("x".into(), PathBuf::from("a=b.raw")))
        );
        assert_eq!(split("x=", 0), Err("x=: no source after '='".into()));
    }

    #[test]
    fn configs_are_named_like_proxmox_or_as_told() {
        let s = |a: &str| split_config(OsStr::new(a));
        assert_eq!(
            s("qemu-server.conf=/tmp/vm100.conf"),
            (
                Some("qemu-server.conf".into()),
                PathBuf::from("/tmp/vm100.conf")
            )
        );
        assert_eq!(
            s("/etc/pve/qemu-server/100.conf"),
            (None, PathBuf::from("/etc/pve/qemu-server/100.conf"))
        );
        // A '/' before the '=' makes it a path; so does an empty name.
        assert_eq!(s("./a=b.conf"), (None, PathBuf::from("./a=b.conf")));
        assert_eq!(s("dir/a=b"), (None, PathBuf::from("dir/a=b")));
        assert_eq!(s("=x"), (None, PathBuf::from("=x")));
        assert_eq!(s("a=b=c"), (Some("a".into()), PathBuf::from("b=c")));
    }

    #[test]
    fn warns_when_qmrestore_would_find_no_config() {
        let mut configs = Vec::new();
        let mut devices = Vec::new();
        assert_eq!(
            config_warning(&configs, &devices),
            None,
            "no disks, nothing to restore"
        );
        devices.push(("vmstate".to_string(), 4096));
        assert_eq!(config_warning(&configs, &devices), None);
        devices.push(("drive-scsi0".to_string(), 4096));
        assert!(config_warning(&configs, &devices)
            .unwrap()
            .starts_with("warning: no config named qemu-server.conf"));
        configs.push("vm.conf".to_string());
        assert!(config_warning(&configs, &devices).is_some());
        configs.push("qemu-server.conf".to_string());
        assert_eq!(config_warning(&configs, &devices), None);
    }
}
