//! `vma-decode serve`: every device of an archive as a read-only NBD
//! export, read straight from the archive through an index — no extract.
//!
//! Two steps, so a caller can stop between them: [`prepare`] indexes the
//! archive (or loads the index saved beside it), [`Prepared::listen`] binds
//! the sockets and serves.
//!
//! * A plain archive file (or block device) is indexed by reading only its
//!   extent headers and seeking over the data, with every check of the
//!   reader but those of the data ([`Archive::index`]); the index can be
//!   saved beside it as `ARCHIVE.vmaidx` and is used by later runs while the
//!   archive's uuid, size and modification time are those it was saved for.
//! * A compressed archive, or one on a pipe, is decompressed once into an
//!   unnamed file in `--cache DIR` and indexed as it is written
//!   ([`crate::cache`]); serving starts when the whole archive is in.
//!
//! Data checksums (ours) are checked the first time each extent's data is
//! read; see [`crate::archive_export`].

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use nbd_server::{bind_unix_socket, Listener, Server, ServerHandle};
use vma_cli::decompress::{Compression, MAGIC_LEN};
use vma_cli::input::{pread_up_to, Input};
use vma_cli::{exit, Failure};
use vma_format::{Archive, Seekable, VmaHeader};

use crate::archive_export::ServedArchive;
use crate::cache::{free_space, space_needed, CacheWriter};
use crate::index::{index_path, ArchiveIndex, ArchiveStamp, IndexBuilder, Loaded};

/// Prefix of every line `serve` logs on stderr.
pub const LOG: &str = "vma-decode serve";

/// How to serve.
#[derive(Clone, Debug, Default)]
pub struct ServeOptions {
    /// The NBD Unix socket (mode 0600).
    pub socket: PathBuf,
    /// Also serve on this TCP address (no TLS, no authentication).
    pub tcp: Option<SocketAddr>,
    /// Where to decompress a compressed archive, or copy one from a pipe.
    pub cache: Option<PathBuf>,
    /// Save the index beside a plain archive (`ARCHIVE.vmaidx`).
    pub save_index: bool,
    /// Start even if the cache directory may be too small.
    pub no_space_check: bool,
}

/// An archive indexed, not served yet.
pub struct Prepared {
    name: String,
    archive: Arc<ServedArchive>,
}

/// A running server.
pub struct Serving {
    handle: ServerHandle,
    socket: PathBuf,
    /// The archive being served.
    pub archive: Arc<ServedArchive>,
    /// One URI per export and listener, for clients:
    /// `nbd+unix:///drive-scsi0?socket=/run/vm.sock`, `nbd://127.0.0.1:10809/drive-scsi0`.
    pub uris: Vec<String>,
}

/// Opens and indexes `path` (`-`: standard input), as `opts` say.
///
/// # Errors
/// A one-line [`Failure`]: exit 1 for a damaged archive (the reader's
/// message), 2 for an archive without devices or a compressed archive or
/// pipe without `--cache` (or with `--save-index`), 3 for I/O errors, a
/// cache directory with too little space, or an index that cannot be saved.
pub fn prepare(path: &str, opts: &ServeOptions) -> Result<Prepared, Failure> {
    if path != "-" {
        let file = File::open(path).map_err(|e| Failure::io(path, &e))?;
        let meta = file.metadata().map_err(|e| Failure::io(path, &e))?;
        let ft = meta.file_type();
        if ft.is_dir() {
            return Err(Failure::new(exit::IO, format!("{path}: is a directory")));
        }
        if ft.is_file() || ft.is_block_device() {
            let mut prefix = [0u8; MAGIC_LEN];
            let got = pread_up_to(&file, &mut prefix).map_err(|e| Failure::io(path, &e))?;
            if Compression::detect(&prefix[..got]).is_none() {
                return prepare_plain(path, file, &meta, opts);
            }
        }
    }
    prepare_cached(path, opts)
}

fn no_devices(name: &str, header: &VmaHeader) -> Result<(), Failure> {
    if header.devices().is_empty() {
        return Err(Failure::new(
            exit::USAGE,
            format!("{name}: the archive holds no devices: nothing to serve"),
        ));
    }
    Ok(())
}

fn indexed_line(name: &str, index: &ArchiveIndex, what: &str, started: Instant) {
    eprintln!(
        "{LOG}: {name}: {what}: {} extents, {} clusters of {} devices in {:.3} s",
        index.extents.len(),
        index.cluster_count(),
        index.devices.len(),
        started.elapsed().as_secs_f64()
    );
}

fn prepare_plain(
    path: &str,
    file: File,
    meta: &std::fs::Metadata,
    opts: &ServeOptions,
) -> Result<Prepared, Failure> {
    let started = Instant::now();
    let input = Seekable::new(&file).map_err(|e| Failure::io(path, &e))?;
    let size = input.len();
    let mut archive = Archive::new(input).map_err(|e| Failure::format(path, &e))?;
    let header = archive.header().clone();
    no_devices(path, &header)?;
    let stamp = ArchiveStamp {
        size,
        ..ArchiveStamp::of(meta, &header).map_err(|e| Failure::io(path, &e))?
    };
    let saved = index_path(Path::new(path));
    let shown = saved.display().to_string();
    let (index, fresh) = match ArchiveIndex::load(&saved, &header, &stamp) {
        Loaded::Index(index) => {
            indexed_line(path, &index, &format!("index read from {shown}"), started);
            (index, false)
        }
        other => {
            if let Loaded::Refused(why) = other {
                eprintln!("{LOG}: {shown}: refused: {why}; indexing the archive instead");
            }
            let mut builder = IndexBuilder::new(&header);
            archive
                .index(&mut builder)
                .map_err(|e| Failure::format(path, &e))?;
            let index = builder.finish().map_err(|e| Failure::io(path, &e))?;
            indexed_line(path, &index, "indexed", started);
            if opts.save_index {
                index
                    .save(&saved, &stamp)
                    .map_err(|e| Failure::io(&format!("{shown}: cannot save the index"), &e))?;
                eprintln!("{LOG}: {path}: index saved as {shown}");
            }
            (index, true)
        }
    };
    drop(archive);
    Ok(Prepared {
        name: path.to_string(),
        archive: ServedArchive::new(path, file, index, fresh),
    })
}

fn prepare_cached(path: &str, opts: &ServeOptions) -> Result<Prepared, Failure> {
    let input = Input::open(path).map_err(|e| Failure::io(path, &e))?;
    let name = input.name.clone();
    let (what, verb, doing, done) = match input.compression() {
        Some(c) => (
            format!("compressed ({c})"),
            "decompress",
            "decompressing",
            "decompressed",
        ),
        None => (
            "not a file that can be read at random".to_string(),
            "copy",
            "copying",
            "copied",
        ),
    };
    if opts.save_index {
        return Err(Failure::new(
            exit::USAGE,
            format!(
                "{name}: --save-index needs a plain archive file; this one is {what} \
                 (decompress it into a file and serve that to keep its index)"
            ),
        ));
    }
    let Some(dir) = &opts.cache else {
        return Err(Failure::new(
            exit::USAGE,
            format!("{name}: {what}: serving it needs --cache DIR to {verb} it into"),
        ));
    };
    let dir_shown = dir.display().to_string();
    let started = Instant::now();
    let cache = tempfile::tempfile_in(dir)
        .map_err(|e| Failure::io(&format!("{dir_shown}: cannot create the cache"), &e))?;
    let writer = CacheWriter::new(
        input,
        cache.try_clone().map_err(|e| Failure::io(&dir_shown, &e))?,
    );
    let cache_failure = |w: &CacheWriter<Input>| {
        w.write_error()
            .map(|e| Failure::io(&format!("{dir_shown}: cannot write the cache"), e))
    };
    let mut archive = match Archive::new(writer) {
        Ok(a) => a,
        Err(e) => return Err(Failure::format(&name, &e)),
    };
    let header = archive.header().clone();
    no_devices(&name, &header)?;
    let need = space_needed(&header);
    let free = free_space(dir).map_err(|e| Failure::io(&dir_shown, &e))?;
    if need > free && !opts.no_space_check {
        return Err(Failure::new(
            exit::IO,
            format!(
                "{dir_shown}: {free} bytes free, but {name} may need up to {need} bytes \
                 there (its devices' size): refusing to start (--no-space-check \
                 starts anyway; a full disk then stops it)"
            ),
        ));
    }
    eprintln!("{LOG}: {name}: {what}: {doing} it into an unnamed file in {dir_shown}");
    let mut builder = IndexBuilder::new(&header);
    let result = archive.index(&mut builder);
    let writer = archive.into_inner();
    if let Err(e) = result {
        return Err(cache_failure(&writer).unwrap_or_else(|| Failure::format(&name, &e)));
    }
    let written = writer.written();
    writer
        .finish()
        .map_err(|e| Failure::io(&format!("{dir_shown}: cannot write the cache"), &e))?;
    let index = builder.finish().map_err(|e| Failure::io(&name, &e))?;
    indexed_line(
        &name,
        &index,
        &format!("{done} {written} bytes and indexed"),
        started,
    );
    Ok(Prepared {
        archive: ServedArchive::new(&name, cache, index, true),
        name,
    })
}

/// `s` with everything but unreserved characters (and `/` where `slash`)
/// percent-encoded, for a URI.
fn uri_escape(s: &str, slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Prepared {
    /// The archive, indexed.
    pub fn archive(&self) -> &Arc<ServedArchive> {
        &self.archive
    }

    /// Binds the sockets and starts serving every device (export names are
    /// the device names; the only device is also the default export).
    ///
    /// # Errors
    /// Exit 3 if a socket cannot be bound (the Unix socket's path exists and
    /// is not a dead socket, or is in use), exit 2 for a device name an NBD
    /// export cannot have.
    pub fn listen(self, opts: &ServeOptions) -> Result<Serving, Failure> {
        let mut server = Server::new();
        let index = self.archive.index();
        for (i, d) in index.devices.iter().enumerate() {
            let description = format!(
                "{} of {}{}",
                d.name,
                self.name,
                if d.vmstate { " (RAM state)" } else { "" }
            );
            server
                .add_export_with_description(
                    d.name.clone(),
                    description,
                    Arc::new(self.archive.export(i)),
                )
                .map_err(|e| {
                    Failure::new(
                        exit::USAGE,
                        format!("{}: device {:?}: {e}", self.name, d.name),
                    )
                })?;
        }
        let socket = std::path::absolute(&opts.socket).unwrap_or_else(|_| opts.socket.clone());
        let mut listeners: Vec<Listener> = Vec::new();
        let mut uris = Vec::new();
        if let Some(addr) = opts.tcp {
            let l = TcpListener::bind(addr)
                .map_err(|e| Failure::new(exit::IO, format!("{addr}: cannot listen: {e}")))?;
            let bound = l.local_addr().unwrap_or(addr);
            for d in &index.devices {
                uris.push(format!("nbd://{bound}/{}", uri_escape(&d.name, false)));
            }
            listeners.push(l.into());
        }
        let shown = socket.display().to_string();
        let unix = bind_unix_socket(&socket)
            .map_err(|e| Failure::new(exit::IO, format!("{shown}: cannot listen: {e}")))?;
        listeners.push(unix.into());
        let mut unix_uris: Vec<String> = index
            .devices
            .iter()
            .map(|d| {
                format!(
                    "nbd+unix:///{}?socket={}",
                    uri_escape(&d.name, false),
                    uri_escape(&shown, true)
                )
            })
            .collect();
        unix_uris.append(&mut uris);
        let handle = match server.serve(listeners) {
            Ok(h) => h,
            Err(e) => {
                let _ = std::fs::remove_file(&socket);
                return Err(Failure::new(exit::IO, format!("cannot start serving: {e}")));
            }
        };
        let exports: Vec<String> = index
            .devices
            .iter()
            .map(|d| format!("{} ({} bytes)", d.name, d.export_size()))
            .collect();
        eprintln!(
            "{LOG}: {}: serving {} read-only on {shown}{}",
            self.name,
            exports.join(", "),
            opts.tcp.map(|a| format!(" and {a}")).unwrap_or_default()
        );
        Ok(Serving {
            handle,
            socket,
            archive: self.archive,
            uris: unix_uris,
        })
    }
}

impl Serving {
    /// Stops accepting, disconnects the clients, waits for their threads and
    /// removes the socket file.
    pub fn shutdown(self) {
        self.handle.shutdown();
        let _ = std::fs::remove_file(&self.socket);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_escape_what_a_uri_cannot_hold() {
        assert_eq!(uri_escape("drive-scsi0", false), "drive-scsi0");
        assert_eq!(uri_escape("a b?c#d%", false), "a%20b%3Fc%23d%25");
        assert_eq!(uri_escape("/run/x y.sock", true), "/run/x%20y.sock");
        assert_eq!(uri_escape("Ü", false), "%C3%9C");
    }
}
