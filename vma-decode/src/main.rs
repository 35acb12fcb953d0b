//! `vma-decode`: list VMA archives, print their configs, extract them.

use std::io::Write;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use vma_cli::input::Input;
use vma_cli::{exit, listing, Failure, EXIT_CODES_HELP};
use vma_decode::extract::{extract, missing_line, ExtractOptions, SALVAGE_REPORT};
use vma_format::{Archive, ReadOptions};

#[derive(Parser)]
#[command(name = "vma-decode", version, about = "Lists and extracts Proxmox VMA archives", after_help = EXIT_CODES_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the configs, devices and creation time, exactly as Proxmox's `vma list`.
    List {
        /// The archive, or `-` for standard input.
        archive: String,
    },
    /// Print one config file, like `vma config`.
    Config {
        /// The archive, or `-` for standard input.
        archive: String,
        /// The config's name.
        #[arg(short = 'c', long = "config", default_value = "qemu-server.conf")]
        name: String,
    },
    /// Write each device as DIR/disk-<name>.raw (sparse), vmstate as DIR/vmstate.bin, and the config files.
    #[command(after_help = EXIT_CODES_HELP)]
    Extract {
        /// The archive, or `-` for standard input.
        archive: String,
        /// Output directory: created if missing; refused if not empty unless --force.
        dir: PathBuf,
        /// Only these devices (comma-separated names, e.g. drive-scsi0,drive-virtio1).
        #[arg(short = 'd', long = "devices", value_delimiter = ',')]
        devices: Option<Vec<String>>,
        /// Print Proxmox-style progress and statistics.
        #[arg(short = 'v', long)]
        verbose: bool,
        /// Recover what a damaged or truncated archive still holds; exit 4 if anything is missing.
        #[arg(long)]
        salvage: bool,
        /// Write into an existing non-empty directory.
        #[arg(long)]
        force: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    if let Err(f) = run(cli) {
        f.exit();
    }
}

fn open(path: &str, options: ReadOptions) -> Result<(String, Archive<Input>), Failure> {
    let input = Input::open(path).map_err(|e| Failure::io(path, &e))?;
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
        Command::List { archive } => {
            let (_, archive) = open(&archive, ReadOptions::default())?;
            listing::write_listing(&mut out, archive.header()).map_err(out_err)?;
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
            dir,
            devices,
            verbose,
            salvage,
            force,
        } => {
            let (input, archive) = open(&archive, ReadOptions { salvage })?;
            let opts = ExtractOptions {
                devices,
                force,
                verbose,
                salvage,
            };
            let report = extract(archive, &input, &dir, &opts, &mut out)?;
            out.flush().map_err(out_err)?;
            if !report.is_complete() {
                let summary = &report.summary;
                for d in summary.damage.iter().take(20) {
                    eprintln!("{input}: skipped: {d}");
                }
                if summary.damage_count > 20 {
                    eprintln!(
                        "{input}: skipped: … {} more problems",
                        summary.damage_count - 20
                    );
                }
                for m in &summary.missing {
                    eprintln!("{input}: {}", missing_line(m, 50));
                }
                eprintln!(
                    "{input}: partial extract: missing clusters are zero; full list in {}",
                    dir.join(SALVAGE_REPORT).display()
                );
                std::process::exit(exit::PARTIAL);
            }
        }
    }
    out.flush().map_err(out_err)
}
