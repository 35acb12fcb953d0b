//! `cbw-tap backup -- CONSUMER…`: the client runs the consumer itself, so
//! it knows whether the consumer succeeded after the stream ended (a
//! merge that fails on its base, a full disk when the archive is put in
//! place) and only then lets the server record the backup as completed.

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::process::{Child, Command, ExitStatus, Stdio};

use cbw_tap::cli::WatchedOutput;
use cbw_tap::control::BackupClient;
use vma_cli::exit;

/// The consumer running on the stream, and what feeds it.
struct Consumer {
    name: String,
    child: Child,
    /// The progress watcher copying the stream into its stdin, if any.
    watched: Option<WatchedOutput>,
    status: Option<std::io::Result<ExitStatus>>,
}

impl Consumer {
    /// Closes what feeds it and waits for it (once; later calls say the same).
    fn end(&mut self) -> Result<(), String> {
        if let Some(w) = self.watched.take() {
            w.finish();
        }
        let status = self.status.get_or_insert_with(|| self.child.wait());
        match status {
            Ok(s) if s.success() => Ok(()),
            Ok(s) => Err(format!("consumer `{}` failed ({s})", self.name)),
            Err(e) => Err(format!("consumer `{}`: cannot wait for it: {e}", self.name)),
        }
    }
}

/// Runs the backup into `consumer`'s stdin; returns the exit code.
pub fn backup(client: &BackupClient, consumer: &[OsString], json: bool, verbose: bool) -> i32 {
    let name = consumer[0].to_string_lossy().into_owned();
    let mut child = match Command::new(&consumer[0])
        .args(&consumer[1..])
        .stdin(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cbw-tap backup: consumer `{name}`: cannot run it: {e}");
            return exit::IO;
        }
    };
    let stdin: OwnedFd = child.stdin.take().expect("piped").into();
    let bar = vma_cli::bar::wanted(verbose);
    let mut client = client.clone();
    // The descriptor the server writes into: the consumer's stdin, or the
    // watcher's pipe in front of it.
    let (out, watched) = if bar || verbose {
        match WatchedOutput::start(std::fs::File::from(stdin), bar, verbose) {
            Ok(w) => {
                client.total = Some(w.total());
                match w.input().try_clone_to_owned() {
                    Ok(fd) => (fd, Some(w)),
                    Err(e) => {
                        eprintln!("cbw-tap backup: cannot watch the stream: {e}");
                        return exit::IO;
                    }
                }
            }
            Err(e) => {
                eprintln!("cbw-tap backup: cannot watch the stream: {e}");
                return exit::IO;
            }
        }
    } else {
        (stdin, None)
    };
    let mut consumer = Consumer {
        name,
        child,
        watched,
        status: None,
    };
    let result = client.run_with(out, &mut || consumer.end());
    // Reaped whatever happened (an aborted stream fails it too).
    let _ = consumer.end();
    crate::outcome(result, json)
}
