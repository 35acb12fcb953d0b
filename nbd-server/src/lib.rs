//! A small NBD (Network Block Device) server that real clients use
//! unchanged: QEMU (`qemu-io`, `qemu-img`, `qemu-nbd --list`, a VM's drive)
//! and libnbd (`nbdinfo`, `nbdcopy`).
//!
//! It serves anything that implements [`Backend`]; [`FileBackend`] serves raw
//! image files and block devices. It knows nothing of VMA. Plain std threads,
//! no async runtime: one thread accepts on each listener, one thread reads
//! each connection's requests, and up to [`MAX_IN_FLIGHT`] workers of that
//! connection execute them concurrently, each reply written whole under a
//! lock as its request finishes, in any order (clients such as QEMU pipeline
//! requests and match replies by handle). So a request that waits — a write
//! a copy-before-write backend holds until it has saved the old data — does
//! not hold up reads and writes behind it.
//!
//! ```no_run
//! use std::sync::Arc;
//! use nbd_server::{bind_unix_socket, FileBackend, Server};
//!
//! let mut server = Server::new();
//! server.add_export("disk0", Arc::new(FileBackend::open("disk0.raw".as_ref(), false)?))?;
//! let handle = server.serve(vec![bind_unix_socket("/tmp/nbd.sock".as_ref())?.into()])?;
//! // qemu-img info 'nbd+unix:///disk0?socket=/tmp/nbd.sock'
//! handle.shutdown();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Protocol support
//!
//! Following the NBD specification (`doc/proto.md` of NetworkBlockDevice/nbd):
//!
//! - **Handshake:** fixed newstyle only; the server offers
//!   `NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES` and honours the client's
//!   flags: without `NBD_FLAG_C_NO_ZEROES` the 124 zero bytes follow
//!   `NBD_OPT_EXPORT_NAME`; without `NBD_FLAG_C_FIXED_NEWSTYLE` only
//!   `NBD_OPT_EXPORT_NAME` is accepted (any other option ends the connection,
//!   as plain newstyle cannot refuse options). Unknown client flags end the
//!   connection. No oldstyle, no TLS.
//! - **Options:** `EXPORT_NAME`, `GO`, `INFO`, `LIST`, `ABORT`,
//!   `STRUCTURED_REPLY`, `LIST_META_CONTEXT` and `SET_META_CONTEXT` (the only
//!   context is `base:allocation`; `base:` lists it; other queries are
//!   ignored). Everything else — `STARTTLS`, `EXTENDED_HEADERS` (which QEMU 10
//!   asks for first, then falls back), `BLOCK_SIZE`… — gets
//!   `NBD_REP_ERR_UNSUP`. `INFO`/`GO` always send `NBD_INFO_EXPORT` and
//!   `NBD_INFO_BLOCK_SIZE`, and `NBD_INFO_NAME` / `NBD_INFO_DESCRIPTION` when
//!   asked (the latter only if the export has a description). Unknown exports
//!   get `NBD_REP_ERR_UNKNOWN` (after `EXPORT_NAME`, which cannot carry an
//!   error, the connection is closed).
//! - **Default export:** the empty export name selects the only export when
//!   exactly one is served, and no export when there are several (so a
//!   client cannot silently get the wrong disk). Exports cannot be named "".
//! - **Block sizes:** minimum 1, preferred 4096, maximum payload
//!   [`MAX_PAYLOAD`] (32 MiB) — the protocol's defaults, advertised with
//!   `NBD_INFO_BLOCK_SIZE`. Reads and writes above the maximum get
//!   `NBD_EINVAL` (an oversized write's payload is read and discarded in
//!   small pieces, never buffered). Trim, write-zeroes, cache and block status
//!   may cover up to 4 GiB - 1 in one request.
//! - **Transmission flags:** `HAS_FLAGS`, `SEND_FLUSH`, `SEND_FUA`,
//!   `SEND_CACHE`; for writable exports `SEND_TRIM`, `SEND_WRITE_ZEROES`,
//!   `SEND_FAST_ZERO`; for read-only ones `READ_ONLY`. `CAN_MULTI_CONN` only
//!   when [`Backend::can_multi_conn`] says so (true for [`FileBackend`]).
//! - **Commands:** `READ`, `WRITE` (FUA), `FLUSH`, `TRIM` (FUA = flush
//!   after), `WRITE_ZEROES` (`NO_HOLE`, `FAST_ZERO`, FUA), `BLOCK_STATUS`
//!   (`REQ_ONE`), `CACHE`, `DISC`. With structured replies, a read is answered
//!   with one `NBD_REPLY_TYPE_OFFSET_DATA` chunk per [`READ_CHUNK`] (256 KiB)
//!   piece, in order, the last flagged `DONE` (holes are sent as data;
//!   `OFFSET_HOLE` is optional and not used), and errors with
//!   `NBD_REPLY_TYPE_ERROR` chunks carrying a message (also after some
//!   pieces of a read were sent); without, simple replies (a read error after
//!   the first piece of a simple reply closes the connection, the only way
//!   left to report it).
//!   Block status is clipped to the requested range, adjacent extents of equal
//!   status are merged, and at most 65536 descriptors are sent.
//! - **Errors:** out-of-range reads, trims, caches and block status get
//!   `NBD_EINVAL`, out-of-range writes and write-zeroes `NBD_ENOSPC`, writes of
//!   any kind on a read-only export `NBD_EPERM`, zero lengths, unknown
//!   commands and flags not valid for a command `NBD_EINVAL`, a fast zero the
//!   backend cannot do quickly `NBD_ENOTSUP`; backend errors map as described
//!   on [`Backend`]. A bad request magic, a client vanishing mid-request or
//!   mid-payload, or a protocol violation in the handshake closes that one
//!   connection; nothing a client sends can panic or stop the server.
//! - **Limits on clients:** option payloads above [`MAX_OPTION_PAYLOAD`]
//!   (64 KiB) are drained and refused with `NBD_REP_ERR_TOO_BIG` (above
//!   16 MiB the connection is dropped); export names above 4096 bytes in
//!   `EXPORT_NAME` drop the connection. At most [`DEFAULT_MAX_CONNECTIONS`]
//!   (64, [`Server::set_max_connections`]) are served at once; one more is
//!   closed as soon as it is accepted. Memory: per connection a 64 KiB read
//!   buffer and one data buffer of at most [`READ_CHUNK`] (256 KiB; reads are
//!   sent in pieces of that size) per request in flight (at most
//!   [`MAX_IN_FLIGHT`]); write payloads above it share one budget
//!   of [`DEFAULT_PAYLOAD_MEMORY`] (64 MiB, [`Server::set_payload_memory`])
//!   and wait for room — so 24 clients each reading 32 MiB hold 24 × 256 KiB,
//!   not 24 × 32 MiB ([`ServerHandle::stats`] counts the bytes). A client
//!   that stalls for [`DEFAULT_HANDSHAKE_TIMEOUT`] (30 s, see
//!   [`Server::set_handshake_timeout`]) during the handshake is dropped, and
//!   so is one whose request (header or write payload) stops arriving
//!   half-way for [`DEFAULT_REQUEST_TIMEOUT`] (30 s from its first byte, checked
//!   at least every second without a system call per request;
//!   [`Server::set_request_timeout`]); between requests a client may stay
//!   idle forever.
//!
//! # Serving
//!
//! [`Server`] holds the exports; [`Server::serve`] starts listening on Unix
//! sockets (create them with [`bind_unix_socket`], mode 0600) and, only if the
//! caller passes one, TCP sockets (with `TCP_NODELAY`); [`ServerHandle`] stops
//! accepting, disconnects clients and waits for the threads.
//!
//! Writing to a client that has gone away must fail with `EPIPE` rather than
//! kill the process: Rust programs ignore `SIGPIPE` by default, and a
//! program embedding this crate must not undo that.

mod backend;
mod conn;
mod file;
mod limits;
mod proto;
mod server;
mod socket;
pub mod sync;

pub use backend::{Backend, Extent, ZeroFlags};
pub use conn::MAX_IN_FLIGHT;
pub use file::FileBackend;
pub use server::{
    ExportError, Server, ServerHandle, ServerStats, DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS, DEFAULT_PAYLOAD_MEMORY, DEFAULT_REQUEST_TIMEOUT,
};
pub use socket::{bind_unix_socket, Listener};

/// Largest read or write payload accepted in one request: 32 MiB, advertised
/// as the maximum block size.
pub const MAX_PAYLOAD: usize = 32 * 1024 * 1024;

/// Largest piece of data a connection reads from its backend and sends at
/// once (256 KiB): larger reads are sent in pieces, so memory does not grow
/// with the size of the requests clients make.
pub const READ_CHUNK: usize = 256 * 1024;

/// Preferred block size advertised to clients.
pub const PREFERRED_BLOCK_SIZE: u32 = 4096;

/// Largest option payload read during the handshake: 64 KiB.
pub const MAX_OPTION_PAYLOAD: usize = 64 * 1024;

/// Longest NBD string (export name, description), per the protocol.
pub(crate) const MAX_STRING: usize = 4096;
