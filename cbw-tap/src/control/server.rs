//! The server's side of a control connection.

use std::io::{self, IoSliceMut, Read};
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use rustix::net::{recvmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};

use super::{parse_request, write_line, DeviceInfo, Reply, Status, MAX_LINE};
use crate::engine::{Aborted, Engine};
use crate::output::{ConsumerOutput, OutputReport};
use crate::sink::StreamSink;
use crate::stats::Stats;

/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How a backup requested over the control socket ended.
#[derive(Debug)]
pub struct Outcome {
    /// Its instant (Unix time).
    pub time: i64,
    /// Why it was aborted, if it was.
    pub result: Result<(), Aborted>,
    /// Its counters.
    pub stats: Stats,
}

/// Reads the request line and the descriptor sent with it (the first one,
/// if several came; the others are closed).
fn receive_request(stream: &UnixStream) -> io::Result<(Vec<u8>, Option<OwnedFd>)> {
    let mut line = Vec::new();
    let mut fd = None;
    let mut chunk = [0u8; 4096];
    loop {
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let got = recvmsg(
            stream,
            &mut [IoSliceMut::new(&mut chunk)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        );
        let n = match got {
            Ok(m) => m.bytes,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        };
        for msg in control.drain() {
            if let RecvAncillaryMessage::ScmRights(fds) = msg {
                for f in fds {
                    fd.get_or_insert(f);
                }
            }
        }
        line.extend_from_slice(&chunk[..n]);
        if let Some(end) = line.iter().position(|&b| b == b'\n') {
            line.truncate(end + 1);
            return Ok((line, fd));
        }
        if n == 0 || line.len() > super::MAX_LINE {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the request line is missing, cut short or longer than {MAX_LINE} bytes"),
            ));
        }
    }
}

/// Serves one control connection on the server side: reads the request
/// and the client's stdout, takes the instant, streams the backup into that
/// stdout, sends the final status. Returns when the backup has ended, with
/// its outcome (`None` if none began: a bad request, or refused).
pub fn handle_control(engine: &Arc<Engine>, stream: UnixStream) -> Option<Outcome> {
    let _ = stream.set_read_timeout(Some(REQUEST_TIMEOUT));
    let mut out = &stream;
    let refuse = |error: String| {
        let reply = Reply {
            ok: false,
            error: Some(error),
            ..Reply::default()
        };
        let _ = write_line(&mut &stream, &reply);
    };
    let (options, fd) = match receive_request(&stream) {
        Err(e) => {
            refuse(e.to_string());
            return None;
        }
        Ok((line, fd)) => match parse_request(&line) {
            Err(e) => {
                refuse(e.to_string());
                return None;
            }
            Ok(o) => (o, fd),
        },
    };
    let Some(fd) = fd else {
        refuse("the request came without the client's stdout (SCM_RIGHTS): use a cbw-tap backup of the same version".into());
        return None;
    };
    let backup = match engine.begin(options) {
        Ok(b) => b,
        Err(e) => {
            refuse(e.to_string());
            return None;
        }
    };
    // From here on the backup must end whatever happens.
    let reply = Reply {
        ok: true,
        error: None,
        time: Some(backup.time()),
        devices: Some(
            backup
                .devices()
                .into_iter()
                .map(|(name, size)| DeviceInfo { name, size })
                .collect(),
        ),
        uuid: Some(super::hex(&backup.identity().uuid)),
        base: backup
            .identity()
            .base
            .map(|b| (super::hex(&b.uuid), b.time)),
        bytes: Some(backup.expected_bytes()),
    };
    if write_line(&mut out, &reply).is_err() {
        backup.abort("the backup client went away before the backup started");
    }

    // Any byte or EOF from the client means it is gone (it sends nothing).
    let _ = stream.set_read_timeout(None);
    let watcher = stream.try_clone().ok().and_then(|mut reader| {
        let backup = Arc::clone(&backup);
        thread::Builder::new()
            .name("cbw-watch".into())
            .spawn(move || {
                let mut b = [0u8; 1];
                let got = reader.read(&mut b);
                backup.abort("the backup client went away (control connection closed)");
                // After a finished stream: the client's confirmation.
                matches!(got, Ok(1)).then_some(b[0])
            })
            .ok()
    });
    let report = Arc::new(OutputReport::default());
    let result = {
        let (backup2, report2) = (Arc::clone(&backup), Arc::clone(&report));
        engine.run(&backup, move |b| {
            StreamSink::new(ConsumerOutput::new(fd, backup2, report2), b)
        })
    };
    // The consumer's descriptor is closed by now (the sink is gone): the
    // consumer sees the end of the stream once the client exits too.
    let stats = backup.stats();
    let status = Status {
        ok: result.is_ok(),
        error: result.as_ref().err().map(|a| a.0.clone()),
        stats: Some(stats.clone()),
        output_error: report.error(),
        output_stalled: report.stalled(),
    };
    let sent = write_line(&mut out, &status).is_ok();
    let confirm = backup.options().confirm;
    if confirm && sent && result.is_ok() {
        // The client runs the consumer: completed only once it says the
        // consumer succeeded (`Y`); recorded before the connection closes.
        let said = watcher.and_then(|w| w.join().ok().flatten());
        if said == Some(b'Y') && !engine.confirm(&backup) {
            eprintln!("cbw-tap serve: a later backup began before this one was confirmed: not recorded as the base");
        }
        let _ = stream.shutdown(std::net::Shutdown::Both);
    } else {
        let _ = stream.shutdown(std::net::Shutdown::Both);
        if let Some(w) = watcher {
            let _ = w.join();
        }
    }
    Some(Outcome {
        time: backup.time(),
        result,
        stats,
    })
}
