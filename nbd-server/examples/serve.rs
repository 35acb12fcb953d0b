//! Serves raw images over NBD until interrupted, for trying clients by hand:
//!
//! ```text
//! cargo run -p nbd-server --example serve -- --socket /tmp/nbd.sock disk=disk.raw [ro:cd=cd.iso]
//! qemu-img info 'nbd+unix:///disk?socket=/tmp/nbd.sock'
//! ```
//!
//! `NAME=FILE` serves FILE read-write, `ro:NAME=FILE` read-only.

use std::process::ExitCode;
use std::sync::Arc;

use nbd_server::{bind_unix_socket, FileBackend, Server};

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut socket = None;
    let mut server = Server::new();
    while let Some(arg) = args.next() {
        if arg == "--socket" {
            socket = args.next();
            continue;
        }
        let (read_only, spec) = match arg.strip_prefix("ro:") {
            Some(rest) => (true, rest),
            None => (false, arg.as_str()),
        };
        let Some((name, file)) = spec.split_once('=') else {
            eprintln!("serve: expected NAME=FILE, got '{arg}'");
            return ExitCode::from(2);
        };
        let backend = match FileBackend::open(file.as_ref(), read_only) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("serve: {file}: {e}");
                return ExitCode::from(1);
            }
        };
        if let Err(e) = server.add_export(name, Arc::new(backend)) {
            eprintln!("serve: {e}");
            return ExitCode::from(2);
        }
    }
    let Some(socket) = socket else {
        eprintln!("usage: serve --socket PATH [ro:]NAME=FILE...");
        return ExitCode::from(2);
    };
    let listener = match bind_unix_socket(socket.as_ref()) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("serve: {socket}: {e}");
            return ExitCode::from(1);
        }
    };
    match server.serve(vec![listener.into()]) {
        Ok(handle) => {
            handle.wait();
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("serve: {e}");
            ExitCode::from(1)
        }
    }
}
