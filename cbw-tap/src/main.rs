//! `cbw-tap`: flags in, server or backup out. The work is in the library.

use std::ffi::OsString;
use std::io::{self, IsTerminal};
use std::os::fd::AsFd;
use std::time::Duration;

mod consumer;

use clap::Parser;
use serde_json::json;

use cbw_tap::cli::{Args, Cmd, PolicyArg, WatchedOutput};
use cbw_tap::control::BackupClient;
use cbw_tap::serve::{default_control, ServeConfig, Tap};
use cbw_tap::{BackupOptions, Policy};
use vma_cli::exit;
use vma_cli::signals::TermSignals;

fn main() {
    let args = Args::parse();
    let code = match args.command {
        Cmd::Serve {
            socket,
            control,
            tcp,
            assume_raw,
            state_dir,
            exports,
        } => serve(ServeConfig {
            state_dir,
            control: control.unwrap_or_else(|| default_control(&socket)),
            socket,
            tcp,
            exports,
            assume_raw,
        }),
        Cmd::Backup {
            control,
            buffer,
            bwlimit,
            cpus,
            fleecing,
            cbw_timeout,
            on_cbw_error,
            pre,
            post,
            json,
            verbose,
            incremental,
            uuid_from,
            consumer,
        } => {
            if !(cbw_timeout.is_finite() && cbw_timeout > 0.0) {
                eprintln!("cbw-tap backup: --cbw-timeout must be a positive number of seconds");
                std::process::exit(exit::USAGE);
            }
            if buffer < cbw_tap::MIN_BUFFER {
                eprintln!(
                    "cbw-tap backup: --buffer must be at least {} bytes",
                    cbw_tap::MIN_BUFFER
                );
                std::process::exit(exit::USAGE);
            }
            // Our own threads (the progress watcher) and the consumer we run
            // inherit the binding; the server binds its backup threads.
            if let Some(cpus) = &cpus {
                let bound = cpus
                    .check_available()
                    .map_err(|e| e.to_string())
                    .and_then(|()| cpus.bind_current_thread().map_err(|e| e.to_string()));
                if let Err(e) = bound {
                    eprintln!("cbw-tap backup: --cpus {cpus}: {e}");
                    std::process::exit(exit::USAGE);
                }
            }
            let client = BackupClient {
                control,
                options: BackupOptions {
                    buffer,
                    cbw_timeout: Duration::from_secs_f64(cbw_timeout),
                    policy: match on_cbw_error {
                        PolicyArg::BreakSnapshot => Policy::BreakSnapshot,
                        PolicyArg::BreakGuestWrite => Policy::BreakGuestWrite,
                    },
                    bwlimit: bwlimit.map(|b| b as u64).filter(|&b| b > 0),
                    fleecing: match fleecing.map(|f| std::path::absolute(&f)) {
                        None => None,
                        Some(Ok(f)) => Some(f),
                        Some(Err(e)) => {
                            eprintln!("cbw-tap backup: --fleecing: {e}");
                            std::process::exit(exit::USAGE);
                        }
                    },
                    incremental,
                    uuid: uuid_from
                        .as_deref()
                        .map(vma_format::identity::uuid_from_name),
                    confirm: !consumer.is_empty(),
                    cpus,
                },
                pre,
                post,
                total: None,
            };
            backup(&client, &consumer, json, verbose)
        }
    };
    std::process::exit(code);
}

fn serve(cfg: ServeConfig) -> i32 {
    let signals = TermSignals::block();
    let tap = match Tap::start(&cfg) {
        Ok(t) => t,
        Err(f) => {
            eprintln!("cbw-tap serve: {f}");
            return f.code;
        }
    };
    eprintln!(
        "cbw-tap serve: {} export(s) on {} (control {})",
        cfg.exports.len(),
        cfg.socket.display(),
        cfg.control.display()
    );
    let sig = signals.wait();
    eprintln!(
        "cbw-tap serve: {}, shutting down",
        vma_cli::signals::signal_name(sig)
    );
    tap.shutdown();
    exit::OK
}

fn backup(client: &BackupClient, consumer: &[OsString], json: bool, verbose: bool) -> i32 {
    if !consumer.is_empty() {
        return consumer::backup(client, consumer, json, verbose);
    }
    let stdout = io::stdout();
    if stdout.is_terminal() {
        eprintln!("cbw-tap backup: stdout is a terminal; pipe it into vma-encode -");
        return exit::USAGE;
    }
    // The server writes the stream into our stdout itself; to show
    // progress (a bar on a terminal, or -v's lines) the stream passes
    // through a pipe and a thread of ours that watches it instead.
    let bar = vma_cli::bar::wanted(verbose);
    if !bar && !verbose {
        return outcome(client.run(stdout.as_fd()), json);
    }
    let out = match stdout.as_fd().try_clone_to_owned() {
        Ok(fd) => std::fs::File::from(fd),
        Err(e) => {
            eprintln!("cbw-tap backup: stdout: {e}");
            return exit::IO;
        }
    };
    let watched = match WatchedOutput::start(out, bar, verbose) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("cbw-tap backup: stdout: cannot watch the stream: {e}");
            return exit::IO;
        }
    };
    let client = BackupClient {
        total: Some(watched.total()),
        ..client.clone()
    };
    let result = client.run(watched.input());
    watched.finish();
    outcome(result, json)
}

/// Prints the outcome of a backup and returns the exit code.
pub(crate) fn outcome(
    result: Result<cbw_tap::stats::Stats, cbw_tap::control::BackupFailure>,
    json: bool,
) -> i32 {
    let (code, error, stats) = match result {
        Ok(stats) => (exit::OK, None, Some(stats)),
        Err(f) => (f.failure.code, Some(f.failure.message), f.stats.map(|s| *s)),
    };
    if json {
        let v = json!({
            "ok": error.is_none(),
            "error": error,
            "stats": stats.as_ref().map(|s| s.to_json()),
        });
        eprintln!("{v}");
    } else {
        if let Some(s) = &stats {
            for line in s.to_string().lines() {
                eprintln!("cbw-tap backup: {line}");
            }
        }
        if let Some(e) = &error {
            eprintln!("cbw-tap backup: {e}");
        }
    }
    code
}
