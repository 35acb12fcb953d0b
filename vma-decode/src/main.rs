//! `vma-decode`: list VMA archives, print their configs, extract them.
//! Called `vma` (a symlink or hard link), it is Proxmox's `vma` instead:
//! see `vma_decode::proxmox`.

use std::io::{IsTerminal, Write};

use clap::Parser;
use std::sync::{mpsc, Arc, Mutex};
use vma_cli::input::Input;
use vma_cli::signals::{signal_name, TermSignals};
use vma_cli::{exit, listing, Failure};
use vma_decode::cli::{Cli, Command};
use vma_decode::extract::{extract, missing_line, ExtractOptions, SALVAGE_REPORT};
use vma_decode::serve::{self, ServeOptions, LOG};
use vma_decode::stdout::extract_to_stdout;
use vma_format::{Archive, ReadOptions};

fn main() {
    let mut args = std::env::args_os();
    let argv0 = args.next().unwrap_or_default();
    let called = std::path::Path::new(&argv0)
        .file_name()
        .unwrap_or_default()
        .to_owned();
    if called == "vma" {
        std::process::exit(vma_decode::proxmox::main(args.collect()));
    }
    let cli = Cli::parse();
    if let Command::Serve {
        archive,
        socket,
        tcp,
        cache,
        save_index,
        no_space_check,
    } = cli.command
    {
        let opts = ServeOptions {
            socket,
            tcp,
            cache,
            save_index,
            no_space_check,
        };
        if let Err(f) = serve(&archive, &opts) {
            fail(&f);
        }
        return;
    }
    if matches!(cli.command, Command::Extract { .. }) {
        // Partial images and configs are removed on SIGINT/SIGTERM/SIGHUP.
        if let Err(e) = vma_cli::signals::install("vma-decode") {
            fail(&Failure::io("signal handling", &e));
        }
    }
    let result = run(cli);
    clear_bar();
    if let Err(f) = result {
        fail(&f);
    }
}

/// Prints the failure's message as `vma-decode: MESSAGE` (the message names
/// the input first) and exits with its code.
fn fail(f: &Failure) -> ! {
    clear_bar();
    if !f.message.is_empty() {
        eprintln!("vma-decode: {}", f.message);
    }
    std::process::exit(f.code)
}

/// The progress bar of `extract` on a terminal (archive bytes read, rate,
/// ETA), cleared before anything else is printed on stderr.
static BAR: std::sync::OnceLock<vma_cli::bar::ProgressBar> = std::sync::OnceLock::new();

fn clear_bar() {
    if let Some(bar) = BAR.get() {
        bar.finish_and_clear();
    }
}

/// `serve`: index, listen, print the URIs, wait for a signal, stop.
fn serve(archive: &str, opts: &ServeOptions) -> Result<(), Failure> {
    // Blocked before any thread starts, so every thread inherits the mask.
    let signals = TermSignals::block();
    // While indexing (a decompressing pass may take long), a signal ends the
    // process at once: nothing is listening yet, the cache has no name, and
    // an index being saved is removed (vma_cli::signals' registry). Once
    // listening, it stops the server cleanly.
    let listening = Arc::new(Mutex::new(false));
    let (stop_tx, stop_rx) = mpsc::channel();
    {
        let listening = Arc::clone(&listening);
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || loop {
                let sig = signals.wait();
                let serving = listening.lock().unwrap_or_else(|e| e.into_inner());
                if !*serving {
                    vma_cli::signals::exit_removing_partials(LOG, sig);
                }
                let _ = stop_tx.send(sig);
            })
            .map_err(|e| Failure::io("cannot start a thread", &e))?;
    }
    let prepared = serve::prepare(archive, opts)?;
    let serving = {
        let mut state = listening.lock().unwrap_or_else(|e| e.into_inner());
        let serving = prepared.listen(opts)?;
        *state = true;
        serving
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for uri in &serving.uris {
        // A closed stdout is no reason to stop serving.
        let _ = writeln!(out, "{uri}");
    }
    let _ = out.flush();
    drop(out);
    let sig = stop_rx.recv().unwrap_or(0);
    eprintln!("{LOG}: {}: shutting down", signal_name(sig));
    serving.shutdown();
    Ok(())
}

fn open(path: &str, options: ReadOptions) -> Result<(String, Archive<Input>), Failure> {
    let input = Input::open_with_bar(path, BAR.get()).map_err(|e| Failure::io(path, &e))?;
    let name = input.name.clone();
    let archive = Archive::with_options(input, options).map_err(|e| Failure::format(&name, &e))?;
    Ok((name, archive))
}

fn run(cli: Cli) -> Result<(), Failure> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    // list, config and extract's -v lines are informational: a reader that
    // went away ends the tool quietly (vma_cli::pipe).
    let out_err = |e: std::io::Error| vma_cli::pipe::info_failure(&e);
    match cli.command {
        Command::List { archive, json } => {
            let (input, archive) = open(&archive, ReadOptions::default())?;
            if json {
                let doc = vma_decode::json::Listing::new(&input, archive.header());
                writeln!(
                    out,
                    "{}",
                    serde_json::to_string(&doc).expect("serializable")
                )
                .map_err(out_err)?;
            } else {
                listing::write_listing(&mut out, archive.header()).map_err(out_err)?;
            }
        }
        Command::Config { archive, name } => {
            let (input, archive) = open(&archive, ReadOptions::default())?;
            let config = archive.header().config(name.as_bytes()).ok_or_else(|| {
                Failure::new(exit::DAMAGED, format!("{input}: no config named {name:?}"))
            })?;
            out.write_all(&config.data).map_err(out_err)?;
        }
        Command::Extract {
            archive,
            stdout: Some(devname),
            dir,
            reorder_buffer,
            ..
        } => {
            if let Some(dir) = dir {
                return Err(Failure::new(
                    exit::USAGE,
                    format!(
                        "{}: no output directory with --stdout (the image goes to standard output)",
                        dir.display()
                    ),
                ));
            }
            if std::io::stdout().is_terminal() {
                return Err(Failure::new(
                    exit::USAGE,
                    "stdout: refusing to write a disk image to a terminal (redirect or pipe it)",
                ));
            }
            if vma_cli::bar::wanted(false) {
                let _ = BAR.set(vma_cli::bar::bytes(
                    &vma_format::names::escape(archive.as_bytes()),
                    None,
                ));
            }
            let (input, archive) = open(&archive, ReadOptions::default())?;
            extract_to_stdout(archive, &input, &devname, reorder_buffer, &mut out)?;
        }
        Command::Serve { .. } => unreachable!("handled in main"),
        Command::Extract {
            archive,
            dir,
            devices,
            map,
            verbose,
            salvage,
            force,
            json,
            ..
        } => {
            let Some(dir) = dir else {
                return Err(Failure::new(
                    exit::USAGE,
                    "extract: an output directory (or --stdout DEVNAME) is required",
                ));
            };
            vma_decode::outdir::OutputDir::check_arg(&dir)?;
            if vma_cli::bar::wanted(verbose) {
                let _ = BAR.set(vma_cli::bar::bytes(
                    &vma_format::names::escape(archive.as_bytes()),
                    None,
                ));
            }
            let (input, archive) = open(&archive, ReadOptions { salvage })?;
            let opts = ExtractOptions {
                devices,
                force,
                verbose,
                salvage,
                map,
            };
            let started = std::time::Instant::now();
            let header = json.then(|| archive.header().clone());
            // With --json the DEVINFO lines give way to the JSON document.
            let mut sink = std::io::sink();
            let lines: &mut dyn Write = if json { &mut sink } else { &mut out };
            let report = extract(archive, &input, &dir, &opts, lines)?;
            clear_bar();
            if let Some(header) = header {
                let doc = vma_decode::json::Extracted::new(
                    &input,
                    &dir,
                    &header,
                    &report,
                    started.elapsed().as_secs_f64(),
                );
                writeln!(
                    out,
                    "{}",
                    serde_json::to_string(&doc).expect("serializable")
                )
                .map_err(out_err)?;
            }
            out.flush().map_err(out_err)?;
            if !report.is_complete() {
                let summary = &report.summary;
                for d in summary.damage.iter().take(20) {
                    eprintln!("vma-decode: {input}: skipped: {d}");
                }
                if summary.damage_count > 20 {
                    eprintln!(
                        "vma-decode: {input}: skipped: … {} more problems",
                        summary.damage_count - 20
                    );
                }
                for m in &summary.missing {
                    eprintln!("vma-decode: {input}: {}", missing_line(m, 50));
                }
                eprintln!(
                    "vma-decode: {input}: partial extract: missing clusters are zero; full list in {}",
                    dir.join(SALVAGE_REPORT).display()
                );
                std::process::exit(exit::PARTIAL);
            }
        }
    }
    out.flush().map_err(out_err)
}
