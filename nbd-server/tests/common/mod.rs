//! Helpers shared by the integration tests: an in-process server on a
//! temporary Unix socket, test images, and running external clients.
#![allow(dead_code)]

pub mod raw;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use nbd_server::{bind_unix_socket, Backend, FileBackend, Server, ServerHandle};

/// A server running in this process, shut down when dropped.
pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub handle: ServerHandle,
}

impl TestServer {
    /// Serves `exports` on `<tempdir>/nbd.sock`.
    pub fn start(exports: Vec<(&str, Arc<dyn Backend>)>) -> TestServer {
        let mut server = Server::new();
        for (name, backend) in exports {
            server.add_export(name, backend).unwrap();
        }
        TestServer::start_server(server)
    }

    /// Serves a configured `server` on `<tempdir>/nbd.sock`.
    pub fn start_server(server: Server) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nbd.sock");
        let listener = bind_unix_socket(&socket).unwrap();
        let handle = server.serve(vec![listener.into()]).unwrap();
        TestServer {
            dir,
            socket,
            handle,
        }
    }

    /// `nbd+unix:///EXPORT?socket=PATH`
    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.handle.shutdown();
    }
}

/// Deterministic, non-repeating test bytes (xorshift), never all zero.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Creates `path` of `size` bytes: sparse zeroes with `data` written at each
/// given offset.
pub fn make_image(path: &Path, size: u64, data: &[(u64, &[u8])]) {
    use std::os::unix::fs::FileExt;
    let f = fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    for (off, bytes) in data {
        f.write_all_at(bytes, *off).unwrap();
    }
}

/// A read-write file backend for `path`.
pub fn file_backend(path: &Path) -> Arc<dyn Backend> {
    Arc::new(FileBackend::open(path, false).unwrap())
}

/// A read-only file backend for `path`.
pub fn ro_backend(path: &Path) -> Arc<dyn Backend> {
    Arc::new(FileBackend::open(path, true).unwrap())
}

/// Path of an external client, or a panic naming the Debian package to
/// install: a missing tool fails the test, it never skips it.
pub fn tool(name: &str) -> PathBuf {
    let package = match name {
        "qemu-io" | "qemu-img" | "qemu-nbd" => "qemu-utils",
        "nbdinfo" | "nbdcopy" => "libnbd-bin",
        _ => "?",
    };
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "required client `{name}` not found in PATH: install it with `apt-get install {package}`"
    );
}

/// Runs `tool args...` and returns its output (stdout+stderr captured).
pub fn run(name: &str, args: &[&str]) -> Output {
    Command::new(tool(name))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {name}: {e}"))
}

/// Runs and asserts exit status 0, returning stdout as text.
pub fn run_ok(name: &str, args: &[&str]) -> String {
    let out = run(name, args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{name} {args:?} failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    stdout
}

/// Runs `qemu-io -f raw URI -c CMD...`, asserting success and that no
/// verification failed; returns stdout.
pub fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut args = vec!["-f", "raw", uri];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    let out = run_ok("qemu-io", &args);
    assert!(
        !out.contains("Pattern verification failed") && !out.contains("failed:"),
        "qemu-io reported a failure:\n{out}"
    );
    out
}
