//! [`Server`] (exports) and [`ServerHandle`] (running listeners and
//! connections).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use rustix::event::{poll, PollFd, PollFlags};

use crate::backend::Backend;
use crate::conn::{Connection, Export};
use crate::limits::Limits;
use crate::socket::{Listener, Stream};
use crate::sync::lock;
use crate::MAX_STRING;

/// Why an export could not be added to a [`Server`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExportError {
    /// The name is empty; the empty name is reserved for choosing the
    /// default export (see the crate documentation).
    #[error("export name must not be empty")]
    EmptyName,
    /// The name or description is longer than the protocol's 4096-byte
    /// string limit.
    #[error("export name or description of {0} bytes exceeds 4096 bytes")]
    TooLong(usize),
    /// The name or description contains a NUL byte, which NBD strings must not.
    #[error("export name or description contains a NUL byte")]
    ContainsNul,
    /// An export of that name already exists.
    #[error("export '{0}' already exists")]
    Duplicate(String),
}

/// A set of named exports, ready to be served.
///
/// ```no_run
/// use std::sync::Arc;
/// use nbd_server::{bind_unix_socket, FileBackend, Listener, Server};
///
/// let mut server = Server::new();
/// let disk = FileBackend::open("disk.raw".as_ref(), false)?;
/// server.add_export("disk", Arc::new(disk))?;
/// let listener = bind_unix_socket("/run/nbd.sock".as_ref())?;
/// let handle = server.serve(vec![Listener::Unix(listener)])?;
/// // ... qemu-io -f raw 'nbd+unix:///disk?socket=/run/nbd.sock' ...
/// handle.shutdown();
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Server {
    exports: Vec<Export>,
    handshake_timeout: Option<Duration>,
    request_timeout: Option<Duration>,
    max_connections: usize,
    payload_memory: usize,
}

impl Default for Server {
    fn default() -> Self {
        Server {
            exports: Vec::new(),
            handshake_timeout: Some(DEFAULT_HANDSHAKE_TIMEOUT),
            request_timeout: Some(DEFAULT_REQUEST_TIMEOUT),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            payload_memory: DEFAULT_PAYLOAD_MEMORY,
        }
    }
}

/// How long a client may take over the whole handshake by default.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long, by default, a request may take to arrive once its first byte
/// has (header and payload).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Connections served at once by default; more are closed at once.
pub const DEFAULT_MAX_CONNECTIONS: usize = 64;

/// Bytes that write payloads larger than [`crate::READ_CHUNK`] may take
/// together by default (all connections); more wait for room.
pub const DEFAULT_PAYLOAD_MEMORY: usize = 64 << 20;

/// How often a read waiting in the middle of a request checks its
/// deadline: a tenth of the request timeout, at most a second.
fn tick(request_timeout: Duration) -> Duration {
    (request_timeout / 10).clamp(Duration::from_millis(1), Duration::from_secs(1))
}

/// Counters of a running server (see [`ServerHandle::stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Connections open now.
    pub connections: usize,
    /// Connections closed at once because the maximum was reached.
    pub refused_connections: u64,
    /// Connections dropped because a request stopped arriving half-way.
    pub timed_out_requests: u64,
    /// Bytes of request and reply data buffers held now, all connections.
    pub buffered_bytes: usize,
    /// The most that were ever held at once.
    pub peak_buffered_bytes: usize,
}

impl Server {
    /// A server with no exports and the [`DEFAULT_HANDSHAKE_TIMEOUT`].
    pub fn new() -> Self {
        Server::default()
    }

    /// Limits how long a client may wait between bytes during the handshake
    /// (`None`: forever), so clients that connect and say nothing do not hold
    /// a thread forever. The transmission phase has no timeout: an idle
    /// client (e.g. a VM's drive) may stay connected indefinitely.
    /// A zero duration is treated as `None`.
    pub fn set_handshake_timeout(&mut self, timeout: Option<Duration>) -> &mut Self {
        self.handshake_timeout = timeout.filter(|d| !d.is_zero());
        self
    }

    /// Limits how long a request may take to arrive once its first byte has
    /// (`None`: forever): a client that stops half-way through a request
    /// header or a write payload is disconnected then, so it cannot hold a
    /// thread and a buffer forever. Between requests there is no limit.
    /// Default [`DEFAULT_REQUEST_TIMEOUT`]; zero means `None`.
    pub fn set_request_timeout(&mut self, timeout: Option<Duration>) -> &mut Self {
        self.request_timeout = timeout.filter(|d| !d.is_zero());
        self
    }

    /// Most connections served at once (at least 1); a client connecting
    /// beyond it is accepted and closed at once. Default
    /// [`DEFAULT_MAX_CONNECTIONS`].
    pub fn set_max_connections(&mut self, max: usize) -> &mut Self {
        self.max_connections = max.max(1);
        self
    }

    /// Bytes that write payloads larger than [`crate::READ_CHUNK`] may
    /// occupy at once, all connections together (at least
    /// [`crate::MAX_PAYLOAD`], so every valid write fits); a large write
    /// waits for room before its payload is read. With reads sent in
    /// pieces, the server's data buffers stay below this plus
    /// [`crate::READ_CHUNK`] per connection. Default
    /// [`DEFAULT_PAYLOAD_MEMORY`].
    pub fn set_payload_memory(&mut self, bytes: usize) -> &mut Self {
        self.payload_memory = bytes.max(crate::MAX_PAYLOAD);
        self
    }

    /// Serves one client over `reader` and `writer` on the calling thread,
    /// with this server's exports and payload memory, until the client
    /// disconnects, the input ends or the connection fails. Requests are
    /// executed in order, one at a time (no worker pool), and no timeouts
    /// apply (they belong to sockets). For clients that are not on a
    /// socket the server listens on: a test, the `nbd` fuzz target
    /// (in-memory input), inetd-style service over stdin/stdout.
    ///
    /// # Errors
    /// What ended the connection if it was not a clean disconnect: an I/O
    /// error of `reader` or `writer`, or a protocol violation.
    pub fn serve_stream<R: Read, W: Write + Send>(&self, reader: R, writer: W) -> io::Result<()> {
        let stopping = AtomicBool::new(false);
        let limits = Limits::new(None, self.payload_memory);
        let kill = || {};
        Connection::new(reader, writer, &self.exports, &stopping, &limits, &kill)
            .serial()
            .run(|| {})
    }

    /// Adds an export named `name`. Exports are listed (`NBD_OPT_LIST`) in
    /// the order they were added.
    ///
    /// # Errors
    /// [`ExportError`] if the name is empty, longer than 4096 bytes, contains
    /// NUL, or is already taken.
    pub fn add_export(
        &mut self,
        name: impl Into<String>,
        backend: Arc<dyn Backend>,
    ) -> Result<&mut Self, ExportError> {
        self.add(name.into(), None, backend)
    }

    /// Adds an export with a human-readable description, sent to clients in
    /// `NBD_OPT_LIST` replies and as `NBD_INFO_DESCRIPTION` (e.g. shown by
    /// `nbdinfo`).
    ///
    /// # Errors
    /// As [`add_export`](Self::add_export); the description obeys the same
    /// length and NUL rules.
    pub fn add_export_with_description(
        &mut self,
        name: impl Into<String>,
        description: impl Into<String>,
        backend: Arc<dyn Backend>,
    ) -> Result<&mut Self, ExportError> {
        self.add(name.into(), Some(description.into()), backend)
    }

    fn add(
        &mut self,
        name: String,
        description: Option<String>,
        backend: Arc<dyn Backend>,
    ) -> Result<&mut Self, ExportError> {
        if name.is_empty() {
            return Err(ExportError::EmptyName);
        }
        for s in std::iter::once(&name).chain(description.as_ref()) {
            if s.len() > MAX_STRING {
                return Err(ExportError::TooLong(s.len()));
            }
            if s.contains('\0') {
                return Err(ExportError::ContainsNul);
            }
        }
        if self.exports.iter().any(|e| e.name == name) {
            return Err(ExportError::Duplicate(name));
        }
        self.exports.push(Export {
            name,
            description,
            backend,
        });
        Ok(self)
    }

    /// Names of the exports, in order.
    pub fn export_names(&self) -> impl Iterator<Item = &str> {
        self.exports.iter().map(|e| e.name.as_str())
    }

    /// Starts serving: one thread accepts on each listener, and one thread
    /// serves each connection. Returns at once.
    ///
    /// Serving a TCP listener exposes the exports to whoever can reach it
    /// (there is no TLS and no authentication); pass one only on purpose.
    ///
    /// # Errors
    /// If a helper thread or the internal wake-up socket cannot be created.
    pub fn serve(self, listeners: Vec<Listener>) -> io::Result<ServerHandle> {
        let (wake_tx, wake_rx) = UnixStream::pair()?;
        let shared = Arc::new(Shared {
            exports: self.exports,
            handshake_timeout: self.handshake_timeout,
            max_connections: self.max_connections,
            limits: Limits::new(self.request_timeout, self.payload_memory),
            stopping: AtomicBool::new(false),
            wake_rx,
            next_id: AtomicU64::new(0),
            open: Mutex::new(HashMap::new()),
            threads: Mutex::new(Vec::new()),
        });
        let mut accept_threads = Vec::new();
        for listener in listeners {
            let shared2 = Arc::clone(&shared);
            let spawned = thread::Builder::new()
                .name("nbd-accept".into())
                .spawn(move || accept_loop(&shared2, listener));
            match spawned {
                Ok(t) => accept_threads.push(t),
                Err(e) => {
                    shared.stopping.store(true, Ordering::SeqCst);
                    let _ = wake_tx.shutdown(Shutdown::Both);
                    for t in accept_threads {
                        let _ = t.join();
                    }
                    return Err(e);
                }
            }
        }
        Ok(ServerHandle {
            shared,
            wake_tx,
            accept_threads: Mutex::new(accept_threads),
        })
    }
}

/// State shared by the handle, the accept threads and the connections.
struct Shared {
    exports: Vec<Export>,
    handshake_timeout: Option<Duration>,
    max_connections: usize,
    limits: Limits,
    stopping: AtomicBool,
    /// Becomes readable (EOF) when the handle shuts `wake_tx` down.
    wake_rx: UnixStream,
    next_id: AtomicU64,
    /// Sockets of open connections, to shut them down on request.
    open: Mutex<HashMap<u64, Stream>>,
    /// Connection threads not yet joined.
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// Waits until `listener` has a client or the server stops; `true` if the
/// server stops.
fn wait_readable(shared: &Shared, listener: &impl AsFd) -> bool {
    loop {
        if shared.stopping.load(Ordering::SeqCst) {
            return true;
        }
        let mut fds = [
            PollFd::new(listener, PollFlags::IN),
            PollFd::new(&shared.wake_rx, PollFlags::IN),
        ];
        match poll(&mut fds, None) {
            Ok(_) => {
                if !fds[1].revents().is_empty() || shared.stopping.load(Ordering::SeqCst) {
                    return true;
                }
                if !fds[0].revents().is_empty() {
                    return false;
                }
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(_) => thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn accept_loop(shared: &Arc<Shared>, listener: Listener) {
    loop {
        let stop = match &listener {
            Listener::Unix(l) => wait_readable(shared, l),
            Listener::Tcp(l) => wait_readable(shared, l),
        };
        if stop {
            return;
        }
        let accepted = match &listener {
            Listener::Unix(l) => l.accept().map(|(s, _)| Stream::Unix(s)),
            Listener::Tcp(l) => l.accept().and_then(|(s, _)| {
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }),
        };
        match accepted {
            Ok(stream) => spawn_connection(shared, stream),
            // Out of file descriptors and the like: back off instead of spinning.
            Err(e) if e.kind() != io::ErrorKind::Interrupted => {
                thread::sleep(Duration::from_millis(50))
            }
            Err(_) => {}
        }
    }
}

/// Removes the connection from the open set when its thread ends, however it
/// ends.
struct OpenGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        lock(&self.shared.open).remove(&self.id);
    }
}

fn spawn_connection(shared: &Arc<Shared>, stream: Stream) {
    if lock(&shared.open).len() >= shared.max_connections {
        shared.limits.refused.fetch_add(1, Ordering::Relaxed);
        stream.shutdown();
        return;
    }
    // Two handles on the socket for the connection (reader, writer) and one
    // kept to shut it down from `disconnect_all`.
    let (Ok(reader), Ok(control)) = (stream.try_clone(), stream.try_clone()) else {
        return;
    };
    // The timeout belongs to the socket, so setting it on one handle covers
    // all three.
    if stream.set_read_timeout(shared.handshake_timeout).is_err() {
        return;
    }
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    lock(&shared.open).insert(id, control);
    let shared2 = Arc::clone(shared);
    let spawned = thread::Builder::new()
        .name("nbd-conn".into())
        .spawn(move || {
            let _guard = OpenGuard {
                shared: &shared2,
                id,
            };
            // A connection's end, clean or not, concerns only that client.
            let timeouts = stream.try_clone();
            let killer = stream.try_clone();
            let kill = || {
                if let Ok(s) = &killer {
                    s.shutdown();
                }
            };
            let conn = Connection::new(
                reader,
                stream,
                &shared2.exports,
                &shared2.stopping,
                &shared2.limits,
                &kill,
            );
            let _ = conn.run(|| {
                // In transmission the receive timeout is a tick at which a
                // blocked read checks the request deadline (idle waits just
                // go on): no system call per request.
                if let Ok(s) = timeouts {
                    let _ = s.set_read_timeout(shared2.limits.request_timeout.map(tick));
                }
            });
        });
    match spawned {
        Ok(t) => {
            let mut threads = lock(&shared.threads);
            threads.retain(|t| !t.is_finished());
            threads.push(t);
        }
        Err(_) => {
            // The closure was dropped with the socket; forget it.
            if let Some(s) = lock(&shared.open).remove(&id) {
                s.shutdown();
            }
        }
    }
}

/// Controls a running [`Server`]. Dropping the handle does not stop the
/// server; its threads then run until the process ends.
pub struct ServerHandle {
    shared: Arc<Shared>,
    wake_tx: UnixStream,
    accept_threads: Mutex<Vec<JoinHandle<()>>>,
}

impl ServerHandle {
    /// Stops accepting new connections (the listeners are closed once their
    /// threads notice, which is immediate). Open connections go on; clients
    /// still negotiating get `NBD_REP_ERR_SHUTDOWN` to further options.
    /// Idempotent.
    pub fn stop(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        let _ = self.wake_tx.shutdown(Shutdown::Both);
    }

    /// Hard-disconnects every open connection: a request being executed
    /// completes, but its reply and any later requests are lost. Clients that
    /// connect afterwards are not affected (call [`stop`](Self::stop) first).
    pub fn disconnect_all(&self) {
        for s in lock(&self.shared.open).values() {
            s.shutdown();
        }
    }

    /// Number of connections currently open.
    pub fn connection_count(&self) -> usize {
        lock(&self.shared.open).len()
    }

    /// The server's counters: connections, refused connections, requests
    /// that timed out half-way, and buffered data bytes (now and peak).
    pub fn stats(&self) -> ServerStats {
        let l = &self.shared.limits;
        let (buffered_bytes, peak_buffered_bytes) = l.buffered();
        ServerStats {
            connections: self.connection_count(),
            refused_connections: l.refused.load(Ordering::Relaxed),
            timed_out_requests: l.timed_out.load(Ordering::Relaxed),
            buffered_bytes,
            peak_buffered_bytes,
        }
    }

    /// Waits until the server is stopped and every connection has ended.
    /// Without a [`stop`](Self::stop) (from another thread) this waits
    /// forever.
    pub fn wait(&self) {
        for t in lock(&self.accept_threads).drain(..) {
            let _ = t.join();
        }
        loop {
            let threads: Vec<_> = lock(&self.shared.threads).drain(..).collect();
            if threads.is_empty() {
                return;
            }
            for t in threads {
                let _ = t.join();
            }
        }
    }

    /// Stops accepting, disconnects every client and waits for all threads:
    /// `stop`, `disconnect_all`, `wait`.
    pub fn shutdown(&self) {
        self.stop();
        self.disconnect_all();
        self.wait();
    }
}
