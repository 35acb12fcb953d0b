//! The client's side of the stream: frames from the control connection to
//! stdout, with stdout written by a thread of its own.
//!
//! Why a thread: a consumer can be alive but stuck (`| sleep 1000`, a
//! wedged pipeline). The server then aborts the backup (a guest write's
//! copy timed out) and, as the consumer makes no progress, gives up on the
//! connection and closes it. A client blocked in `write(stdout)` would
//! never see that. Here the calling thread only reads the connection and
//! hands frames over through a small bounded buffer; while that buffer is
//! full it watches the connection for the server's hang-up (`POLLRDHUP`).
//! Once the server has hung up, what it sent is all in the socket buffer:
//! the client reads it to the end and, if the stream is incomplete or the
//! backup failed, returns at once instead of waiting for the consumer.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Stream bytes held for the consumer at most, besides the kernel's pipe
/// and socket buffers.
pub const RELAY_BUFFER: usize = 1 << 20;

/// How often a full buffer checks whether the server hung up.
const HANGUP_POLL: Duration = Duration::from_millis(200);

struct State {
    chunks: VecDeque<Vec<u8>>,
    bytes: usize,
    /// No more chunks will come.
    closed: bool,
    /// The writer stopped: `Some(Err)` if stdout failed.
    ended: Option<io::Result<()>>,
    /// Bytes written to stdout so far.
    written: u64,
    free: Vec<Vec<u8>>,
}

/// Frames in, stdout out.
pub struct Relay {
    state: Mutex<State>,
    cond: Condvar,
    writer: Mutex<Option<JoinHandle<()>>>,
}

/// Why a chunk could not be handed over.
#[derive(Debug)]
pub enum Blocked {
    /// Writing stdout failed (the consumer is gone).
    Output(io::Error),
    /// The buffer is full (stdout does not move) and the server has hung
    /// up: nothing more is coming but what is already in the socket.
    ServerHungUp,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether the peer of `sock` has shut down its sending side or closed.
fn peer_hung_up(sock: &UnixStream) -> bool {
    let mut fd = libc::pollfd {
        fd: sock.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let n = unsafe { libc::poll(&mut fd, 1, 0) };
    n > 0 && fd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

impl Relay {
    /// Starts the stdout thread writing to `out`. If writing fails, the
    /// thread shuts `conn` down, so a read of the connection blocked on a
    /// silent server wakes up.
    pub fn start<W: Write + Send + 'static>(out: W, conn: &UnixStream) -> io::Result<Arc<Relay>> {
        let relay = Arc::new(Relay {
            state: Mutex::new(State {
                chunks: VecDeque::new(),
                bytes: 0,
                closed: false,
                ended: None,
                written: 0,
                free: Vec::new(),
            }),
            cond: Condvar::new(),
            writer: Mutex::new(None),
        });
        let conn = conn.try_clone()?;
        let r2 = Arc::clone(&relay);
        let t = std::thread::Builder::new()
            .name("cbw-stdout".into())
            .spawn(move || r2.write_loop(out, &conn))?;
        *relay.writer.lock().unwrap_or_else(|e| e.into_inner()) = Some(t);
        Ok(relay)
    }

    fn write_loop<W: Write>(&self, mut out: W, conn: &UnixStream) {
        let result = loop {
            let chunk = {
                let mut st = lock(&self.state);
                loop {
                    if let Some(c) = st.chunks.pop_front() {
                        st.bytes -= c.len();
                        break Some(c);
                    }
                    if st.closed {
                        break None;
                    }
                    st = self.cond.wait(st).unwrap_or_else(|e| e.into_inner());
                }
            };
            self.cond.notify_all();
            let Some(chunk) = chunk else {
                break out.flush();
            };
            if let Err(e) = out.write_all(&chunk) {
                break Err(e);
            }
            let mut st = lock(&self.state);
            st.written += chunk.len() as u64;
            if st.free.len() < 8 {
                st.free.push(chunk);
            }
        };
        if result.is_err() {
            let _ = conn.shutdown(std::net::Shutdown::Both);
        }
        lock(&self.state).ended = Some(result);
        self.cond.notify_all();
    }

    /// A buffer of `len` bytes for the next chunk (reused when possible).
    pub fn buffer(&self, len: usize) -> Vec<u8> {
        let mut b = lock(&self.state).free.pop().unwrap_or_default();
        b.resize(len, 0);
        b
    }

    /// The stdout error, if writing failed.
    pub fn output_error(&self) -> Option<io::Error> {
        match &lock(&self.state).ended {
            Some(Err(e)) => Some(io::Error::new(e.kind(), e.to_string())),
            _ => None,
        }
    }

    /// Hands `chunk` to the stdout thread. With `conn`, waits while the
    /// buffer holds [`RELAY_BUFFER`] bytes, watching `conn` for the server's
    /// hang-up; without, never waits (the caller knows the rest is
    /// finite: it is already in the socket).
    pub fn push(&self, chunk: Vec<u8>, conn: Option<&UnixStream>) -> Result<(), Blocked> {
        let mut st = lock(&self.state);
        loop {
            if let Some(Err(e)) = &st.ended {
                return Err(Blocked::Output(io::Error::new(e.kind(), e.to_string())));
            }
            let Some(conn) = conn else { break };
            if st.bytes == 0 || st.bytes + chunk.len() <= RELAY_BUFFER {
                break;
            }
            let (g, timeout) = self
                .cond
                .wait_timeout(st, HANGUP_POLL)
                .unwrap_or_else(|e| e.into_inner());
            st = g;
            if timeout.timed_out() && st.bytes + chunk.len() > RELAY_BUFFER && peer_hung_up(conn) {
                // Keep the chunk: it is part of what the server sent.
                st.bytes += chunk.len();
                st.chunks.push_back(chunk);
                return Err(Blocked::ServerHungUp);
            }
        }
        st.bytes += chunk.len();
        st.chunks.push_back(chunk);
        drop(st);
        self.cond.notify_all();
        Ok(())
    }

    /// No more chunks. Waits for the stdout thread to write what it holds:
    /// as long as that takes if `patience` is `None`, else until stdout
    /// makes no progress for `patience`. Returns the stdout error, if any,
    /// or `Err(TimedOut)` if it gave up on a consumer that does not read.
    pub fn finish(&self, patience: Option<Duration>) -> io::Result<()> {
        let mut st = lock(&self.state);
        st.closed = true;
        self.cond.notify_all();
        let mut last = (st.written, Instant::now());
        loop {
            if let Some(r) = &st.ended {
                let r = match r {
                    Ok(()) => Ok(()),
                    Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
                };
                drop(st);
                if let Some(t) = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take() {
                    let _ = t.join();
                }
                return r;
            }
            match patience {
                None => st = self.cond.wait(st).unwrap_or_else(|e| e.into_inner()),
                Some(p) => {
                    if st.written != last.0 {
                        last = (st.written, Instant::now());
                    } else if last.1.elapsed() >= p {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "the consumer does not read",
                        ));
                    }
                    st = self
                        .cond
                        .wait_timeout(st, HANGUP_POLL)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
    }
}
