//! `cbw-tap serve`: the NBD server with a copy-before-write backend per
//! export, and the control socket that takes backup requests.

use std::collections::HashSet;
use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nbd_server::{bind_unix_socket, Backend, FileBackend, Listener, Server, ServerHandle};
use vma_cli::{exit, Failure};
use vma_format::{MAX_DEVICES, MAX_DEVICE_SIZE, VMSTATE_NAME};

use crate::control::{handle_control, Outcome};
use crate::engine::Engine;

/// What to serve.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// The NBD Unix socket (created with mode 0600).
    pub socket: PathBuf,
    /// The control socket (mode 0600).
    pub control: PathBuf,
    /// Also serve NBD on this TCP address (no TLS, no authentication).
    pub tcp: Option<SocketAddr>,
    /// Exports: (name, image path), in device order.
    pub exports: Vec<(String, PathBuf)>,
    /// Serve images that start like another image format (qcow2, …) as
    /// raw disks instead of refusing them (`--assume-raw`).
    pub assume_raw: bool,
    /// Where the changed-cluster tracking is kept across clean restarts
    /// (`--state-dir`, see [`crate::engine::changed`]).
    pub state_dir: Option<PathBuf>,
}

/// The default control socket for an NBD socket path: `PATH.ctl`.
pub fn default_control(socket: &Path) -> PathBuf {
    let mut s = socket.as_os_str().to_owned();
    s.push(".ctl");
    PathBuf::from(s)
}

/// An `--export` argument that is not `NAME=IMAGE` (it is quoted in the
/// message).
#[derive(Debug, thiserror::Error)]
#[error("{0:?}: expected NAME=IMAGE")]
pub struct ExportArgError(pub String);

/// Parses `NAME=IMAGE`: the name ends at the first `=` (the image path may
/// hold more); neither may be empty.
pub fn parse_export(arg: &str) -> Result<(String, PathBuf), ExportArgError> {
    match arg.split_once('=') {
        Some((name, path)) if !name.is_empty() && !path.is_empty() => {
            Ok((name.to_string(), PathBuf::from(path)))
        }
        _ => Err(ExportArgError(arg.to_string())),
    }
}

/// A running server: NBD exports plus the control socket.
pub struct Tap {
    engine: Arc<Engine>,
    nbd: ServerHandle,
    control_path: PathBuf,
    socket_path: PathBuf,
    stopping: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
    state_dir: Option<PathBuf>,
    names: Vec<String>,
    images: Vec<fs::File>,
}

impl Tap {
    /// Opens the images, binds the sockets (control first, so a client
    /// that sees the NBD socket also finds the control socket) and starts
    /// serving.
    ///
    /// # Errors
    /// A one-line [`Failure`]: usage (code 2) for a bad export name (empty,
    /// unsafe as a file name, `vmstate`, repeated), the same image twice,
    /// an image in a format such as qcow2 unless `assume_raw` (see
    /// `vma_cli::image_format`),
    /// too many exports; I/O (code 3) for an image that cannot be opened,
    /// is in use (QEMU's image locks, see [`crate::lock`]), is empty or too
    /// large, or a socket that cannot be bound.
    pub fn start(cfg: &ServeConfig) -> Result<Tap, Failure> {
        if cfg.exports.is_empty() {
            return Err(Failure::new(exit::USAGE, "no exports given (NAME=IMAGE)"));
        }
        if cfg.exports.len() > MAX_DEVICES {
            return Err(Failure::new(
                exit::USAGE,
                format!(
                    "{} exports, more than the {MAX_DEVICES} a VMA archive holds",
                    cfg.exports.len()
                ),
            ));
        }
        let mut names = HashSet::new();
        let mut inodes = HashSet::new();
        let mut backends: Vec<(String, Arc<dyn Backend>)> = Vec::new();
        let mut images = Vec::new();
        for (name, path) in &cfg.exports {
            vma_format::names::check_file_name(name.as_bytes())
                .map_err(|why| Failure::new(exit::USAGE, format!("export {name:?}: {why}")))?;
            if name == VMSTATE_NAME {
                return Err(Failure::new(
                    exit::USAGE,
                    format!("export {name:?}: the name is reserved for VM state"),
                ));
            }
            if !names.insert(name.clone()) {
                return Err(Failure::new(
                    exit::USAGE,
                    format!("export {name:?} given twice"),
                ));
            }
            let p = path.display();
            let backend = FileBackend::open(path, false)
                .map_err(|e| Failure::new(exit::IO, format!("{p}: {e}")))?;
            // A qcow2 (or other) container would be served as its bytes.
            if !cfg.assume_raw {
                vma_cli::image_format::refuse_images(
                    &p.to_string(),
                    backend.file(),
                    "; --assume-raw serves it as a raw disk",
                )?;
            }
            let meta = backend
                .file()
                .metadata()
                .map_err(|e| Failure::new(exit::IO, format!("{p}: {e}")))?;
            if !inodes.insert((meta.dev(), meta.ino())) {
                return Err(Failure::new(
                    exit::USAGE,
                    format!("{p}: the same image is given twice"),
                ));
            }
            // QEMU's locks (after the check above: our own second open of
            // the same image would conflict with the first).
            crate::lock::lock_for_writing(backend.file())
                .map_err(|e| Failure::new(exit::IO, format!("{p}: {e}")))?;
            let size = backend.size();
            if size == 0 || size > MAX_DEVICE_SIZE {
                return Err(Failure::new(
                    exit::IO,
                    format!("{p}: size {size} outside 1..={MAX_DEVICE_SIZE} bytes"),
                ));
            }
            images.push(
                backend
                    .file()
                    .try_clone()
                    .map_err(|e| Failure::new(exit::IO, format!("{p}: {e}")))?,
            );
            backends.push((name.clone(), Arc::new(backend)));
        }
        let engine = Engine::new(backends);
        let names: Vec<String> = cfg.exports.iter().map(|(n, _)| n.clone()).collect();
        if let Some(dir) = &cfg.state_dir {
            if !dir.is_dir() {
                return Err(Failure::new(
                    exit::USAGE,
                    format!("--state-dir {}: not a directory", dir.display()),
                ));
            }
            match engine.changes().load(dir, &names, &images) {
                Ok(Some(())) => {}
                Ok(None) => eprintln!(
                    "cbw-tap serve: {}: no saved state (first start or unclean stop): the next backup is full",
                    crate::engine::changed::state_path(dir).display()
                ),
                Err(why) => eprintln!("cbw-tap serve: {why}: discarded, the next backup is full"),
            }
        }
        let mut server = Server::new();
        for (index, name) in cfg.exports.iter().map(|(n, _)| n).enumerate() {
            server
                .add_export(name.clone(), Arc::new(engine.backend(index)))
                .map_err(|e| Failure::new(exit::USAGE, format!("export {name:?}: {e}")))?;
        }
        let sock_err = |p: &Path, e: std::io::Error| {
            Failure::new(exit::IO, format!("{}: cannot listen: {e}", p.display()))
        };
        let control = bind_unix_socket(&cfg.control).map_err(|e| sock_err(&cfg.control, e))?;
        let mut listeners: Vec<Listener> = Vec::new();
        if let Some(addr) = cfg.tcp {
            let l = TcpListener::bind(addr)
                .map_err(|e| Failure::new(exit::IO, format!("{addr}: cannot listen: {e}")))?;
            listeners.push(l.into());
        }
        let nbd_listener = match bind_unix_socket(&cfg.socket) {
            Ok(l) => l,
            Err(e) => {
                let _ = fs::remove_file(&cfg.control);
                return Err(sock_err(&cfg.socket, e));
            }
        };
        listeners.push(nbd_listener.into());
        let nbd = server
            .serve(listeners)
            .map_err(|e| Failure::new(exit::IO, format!("cannot start serving: {e}")))?;
        let stopping = Arc::new(AtomicBool::new(false));
        let accept = {
            let engine = Arc::clone(&engine);
            let stopping = Arc::clone(&stopping);
            thread::Builder::new()
                .name("cbw-control".into())
                .spawn(move || control_loop(&engine, control, &stopping))
                .map_err(|e| Failure::new(exit::IO, format!("cannot start a thread: {e}")))?
        };
        Ok(Tap {
            engine,
            nbd,
            control_path: cfg.control.clone(),
            socket_path: cfg.socket.clone(),
            stopping,
            accept: Some(accept),
            state_dir: cfg.state_dir.clone(),
            names,
            images,
        })
    }

    /// The engine (backup state) behind the exports.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Stops: refuses new control and NBD clients, aborts a running backup
    /// (its client gets an abort record), waits up to 10 s for it to end,
    /// disconnects the NBD clients, and removes both socket files.
    pub fn shutdown(mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = UnixStream::connect(&self.control_path);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        self.nbd.stop();
        if let Some(b) = self.engine.current() {
            b.abort("the server is shutting down");
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.engine.current().is_some() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(10));
            }
        }
        self.nbd.shutdown();
        if let Some(dir) = &self.state_dir {
            // No guest write can come any more: the record is complete.
            let saved = if self.engine.current().is_some() {
                Err(std::io::Error::other("a backup is still running"))
            } else {
                self.engine.changes().save(dir, &self.names, &self.images)
            };
            if let Err(e) = saved {
                eprintln!(
                    "cbw-tap serve: {}: cannot save the changed clusters: {e}; the next backup is full",
                    crate::engine::changed::state_path(dir).display()
                );
            }
        }
        let _ = fs::remove_file(&self.control_path);
        let _ = fs::remove_file(&self.socket_path);
    }
}

/// One line on stderr per backup, for the server's log.
fn log_outcome(o: &Outcome) {
    let s = &o.stats;
    match &o.result {
        Ok(()) => eprintln!(
            "cbw-tap serve: backup of {} finished: {} clusters ({} by copy-before-write), {} bytes emitted, {} guest writes delayed (longest {:.3} ms), {:.3} s",
            vma_cli::listing::iso_time(o.time),
            s.clusters_emitted,
            s.cbw_clusters,
            s.bytes_emitted,
            s.guest_writes_delayed,
            s.longest_delay.as_secs_f64() * 1000.0,
            s.elapsed.as_secs_f64()
        ),
        Err(reason) => eprintln!(
            "cbw-tap serve: backup of {} aborted: {reason}",
            vma_cli::listing::iso_time(o.time)
        ),
    }
}

fn control_loop(engine: &Arc<Engine>, listener: UnixListener, stopping: &AtomicBool) {
    for conn in listener.incoming() {
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        match conn {
            Ok(stream) => {
                let engine = Arc::clone(engine);
                let spawned = thread::Builder::new()
                    .name("cbw-backup".into())
                    .spawn(move || {
                        if let Some(o) = handle_control(&engine, stream) {
                            log_outcome(&o);
                        }
                    });
                if spawned.is_err() {
                    thread::sleep(Duration::from_millis(50));
                }
            }
            Err(_) => thread::sleep(Duration::from_millis(50)),
        }
    }
}
