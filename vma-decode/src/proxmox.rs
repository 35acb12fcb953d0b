//! Proxmox's `vma` command line, for `vma-decode` called as `vma` (a
//! symlink or hard link): `ln -s vma-decode /usr/local/bin/vma` lets
//! Proxmox's `qmrestore` (which runs `vma extract -v -r FIFO - DIR`) and
//! scripts written for Proxmox's tool work unchanged.
//!
//! ```text
//! vma list FILE
//! vma config FILE [-c NAME]
//! vma extract [-v] [-d DEV,DEV…] [-r MAPFILE] FILE DIR
//! vma verify [-v] FILE
//! ```
//!
//! Options are parsed as Proxmox's tool parses them (GNU `getopt`: options
//! and arguments in any order, `-vd X` and `-dX` alike, `--` ends options).
//! FILE may be `-` (standard input) and compressed. What is printed is what
//! Proxmox's tool prints: the listing (`CFG:`, `DEV:`, `VMSTATE:`, `CTIME:`
//! lines), `DEVINFO` lines, `progress N% (read R bytes, duration D sec)` and
//! the closing statistics with `-v`; `verify` prints nothing unless `-v`.
//!
//! Exit status, as Proxmox's tool: 0 on success; 1 for a usage error (the
//! usage text on standard output) and for any failure (one line on
//! standard error; Proxmox's tool aborts there instead); 255 when `config`
//! finds no such config.
//!
//! `vma create` is not offered under this name: use `vma-encode`.

use std::ffi::OsString;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use vma_cli::input::Input;
use vma_cli::progress::ProxmoxProgress;
use vma_cli::{listing, Failure};
use vma_format::{Archive, Cluster, ClusterSink, Flow, ReadOptions};

use crate::extract::{extract, ExtractOptions};

/// The usage text, printed for `-h` and any usage error (as Proxmox's tool, on stdout).
pub const USAGE: &str = "\
usage: vma command [command options]

vma list <filename>
vma config <filename> [-c <config>]
vma extract <filename> [-d <drive-list>] [-r <fifo>] <targetdir>
vma verify <filename> [-v]

(vma-tools' vma-decode under the name vma; to create archives use vma-encode)
";

/// Exit status of a failure (Proxmox's tool aborts there).
pub const FAILED: i32 = 1;
/// Exit status of `config` when the archive has no such config.
pub const NO_SUCH_CONFIG: i32 = 255;

/// Runs `vma ARGS…` (the arguments after the program name); returns the
/// exit status.
pub fn main(args: Vec<OsString>) -> i32 {
    let Some((command, rest)) = args.split_first() else {
        return usage();
    };
    let result = match command.as_bytes() {
        b"list" => list(rest),
        b"config" => config(rest),
        b"extract" => extract_cmd(rest),
        b"verify" => verify(rest),
        b"create" => Err(Outcome::Failed(Failure::new(
            FAILED,
            "vma create: not offered by vma-tools' vma: use vma-encode",
        ))),
        _ => Err(Outcome::Usage),
    };
    match result {
        Ok(()) => 0,
        Err(Outcome::Usage) => usage(),
        Err(Outcome::Failed(f)) => {
            eprintln!("{}", f.message);
            FAILED
        }
        Err(Outcome::Exit(code)) => code,
    }
}

enum Outcome {
    Usage,
    Failed(Failure),
    Exit(i32),
}

impl From<Failure> for Outcome {
    fn from(f: Failure) -> Outcome {
        Outcome::Failed(f)
    }
}

fn usage() -> i32 {
    let mut out = io::stdout().lock();
    let _ = out.write_all(USAGE.as_bytes()).and_then(|()| out.flush());
    FAILED
}

/// Options with their values, and operands.
type Parsed = (Vec<(char, OsString)>, Vec<OsString>);

/// Options and operands, as GNU `getopt` with `spec` (`"hvd:r:"`) sorts
/// them. An unknown option or a missing argument is printed as `getopt`
/// prints it and is a usage error; so is `-h`.
fn getopt(args: &[OsString], spec: &str) -> Result<Parsed, Outcome> {
    let takes_arg = |c: char| -> Option<bool> {
        let i = spec.find(c)?;
        Some(spec[i + c.len_utf8()..].starts_with(':'))
    };
    let mut opts = Vec::new();
    let mut operands = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_bytes();
        i += 1;
        if a == b"--" {
            operands.extend(args[i..].iter().cloned());
            break;
        }
        if a.len() < 2 || a[0] != b'-' {
            operands.push(args[i - 1].clone());
            continue;
        }
        let mut j = 1;
        while j < a.len() {
            let c = a[j] as char;
            j += 1;
            match takes_arg(c).filter(|_| c != ':' && a[j - 1].is_ascii()) {
                None => {
                    eprintln!("vma: invalid option -- '{c}'");
                    return Err(Outcome::Usage);
                }
                Some(false) => opts.push((c, OsString::new())),
                Some(true) => {
                    let value = if j < a.len() {
                        OsString::from(std::ffi::OsStr::from_bytes(&a[j..]))
                    } else if i < args.len() {
                        i += 1;
                        args[i - 1].clone()
                    } else {
                        eprintln!("vma: option requires an argument -- '{c}'");
                        return Err(Outcome::Usage);
                    };
                    opts.push((c, value));
                    break;
                }
            }
        }
    }
    if opts.iter().any(|(c, _)| *c == 'h') {
        return Err(Outcome::Usage);
    }
    Ok((opts, operands))
}

fn text(s: &OsString) -> Result<String, Outcome> {
    s.to_str().map(str::to_string).ok_or_else(|| {
        Outcome::Failed(Failure::new(
            FAILED,
            format!("{}: not UTF-8", s.to_string_lossy()),
        ))
    })
}

fn open(path: &OsString) -> Result<(String, Archive<Input>), Outcome> {
    let path = text(path)?;
    let input = Input::open(&path).map_err(|e| Failure::io(&path, &e))?;
    let name = input.name.clone();
    let archive = Archive::with_options(input, ReadOptions::default())
        .map_err(|e| Failure::format(&name, &e))?;
    Ok((name, archive))
}

fn stdout_failed(e: io::Error) -> Outcome {
    Outcome::Failed(Failure::io("stdout", &e))
}

fn list(args: &[OsString]) -> Result<(), Outcome> {
    let (_, operands) = getopt(args, "h")?;
    let [file] = operands.as_slice() else {
        return Err(Outcome::Usage);
    };
    let (_, archive) = open(file)?;
    let mut out = io::stdout().lock();
    listing::write_listing(&mut out, archive.header())
        .and_then(|()| out.flush())
        .map_err(stdout_failed)
}

fn config(args: &[OsString]) -> Result<(), Outcome> {
    let (opts, operands) = getopt(args, "hc:")?;
    let [file] = operands.as_slice() else {
        return Err(Outcome::Usage);
    };
    let name = match opts.iter().rev().find(|(c, _)| *c == 'c') {
        Some((_, v)) => v.as_bytes().to_vec(),
        None => b"qemu-server.conf".to_vec(),
    };
    let (_, archive) = open(file)?;
    let Some(config) = archive.header().config(&name) else {
        eprintln!(
            "unable to find configuration data '{}'",
            String::from_utf8_lossy(&name)
        );
        return Err(Outcome::Exit(NO_SUCH_CONFIG));
    };
    let mut out = io::stdout().lock();
    out.write_all(&config.data)
        .and_then(|()| out.flush())
        .map_err(stdout_failed)
}

fn extract_cmd(args: &[OsString]) -> Result<(), Outcome> {
    let (opts, operands) = getopt(args, "hvd:r:")?;
    let [file, dir] = operands.as_slice() else {
        return Err(Outcome::Usage);
    };
    let mut options = ExtractOptions::default();
    for (c, v) in opts {
        match c {
            'v' => options.verbose = true,
            'd' => {
                options.devices = Some(
                    text(&v)?
                        .split(',')
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                        .collect(),
                )
            }
            'r' => options.map = Some(PathBuf::from(v)),
            _ => {}
        }
    }
    crate::outdir::OutputDir::check_arg(std::path::Path::new(dir))?;
    // Partial images and configs are removed on SIGINT/SIGTERM/SIGHUP.
    vma_cli::signals::install("vma").map_err(|e| Failure::io("signal handling", &e))?;
    let (input, archive) = open(file)?;
    let mut out = io::stdout().lock();
    extract(
        archive,
        &input,
        std::path::Path::new(dir),
        &options,
        &mut out,
    )?;
    out.flush().map_err(stdout_failed)
}

/// Counts clusters for Proxmox's progress lines and checks nothing more
/// than the reader does.
struct ProgressSink<'a> {
    progress: ProxmoxProgress,
    out: Option<&'a mut dyn Write>,
}

impl ClusterSink for ProgressSink<'_> {
    fn cluster(&mut self, c: &Cluster<'_>) -> io::Result<Flow> {
        if let Some(out) = &mut self.out {
            self.progress.cluster(c, &mut **out)?;
        }
        Ok(Flow::Continue)
    }
}

fn verify(args: &[OsString]) -> Result<(), Outcome> {
    let (opts, operands) = getopt(args, "hv")?;
    let [file] = operands.as_slice() else {
        return Err(Outcome::Usage);
    };
    let verbose = opts.iter().any(|(c, _)| *c == 'v');
    let (input, mut archive) = open(file)?;
    let mut out = io::stdout().lock();
    if verbose {
        listing::write_listing(&mut out, archive.header())
            .and_then(|()| out.flush())
            .map_err(stdout_failed)?;
    }
    let mut sink = ProgressSink {
        progress: ProxmoxProgress::new(archive.header()),
        out: verbose.then_some(&mut out as &mut dyn Write),
    };
    let result = archive.run(&mut sink);
    let ProgressSink { progress, out: o } = sink;
    let summary = result.map_err(|e| Failure::format(&input, &e))?;
    debug_assert!(summary.is_complete());
    if let Some(o) = o {
        progress
            .finish(o)
            .and_then(|()| o.flush())
            .map_err(stdout_failed)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn getopt_sorts_like_gnu() {
        let (o, a) = getopt(&os(&["-v", "-r", "/f", "-", "dir"]), "hvd:r:")
            .ok()
            .unwrap();
        assert_eq!(o, vec![('v', "".into()), ('r', "/f".into())]);
        assert_eq!(a, os(&["-", "dir"]));
        // Operands first, clustered flags, attached values, `--`.
        let (o, a) = getopt(&os(&["a.vma", "out", "-vdx,y", "--", "-r"]), "hvd:r:")
            .ok()
            .unwrap();
        assert_eq!(o, vec![('v', "".into()), ('d', "x,y".into())]);
        assert_eq!(a, os(&["a.vma", "out", "-r"]));
        assert!(matches!(getopt(&os(&["-x"]), "hv"), Err(Outcome::Usage)));
        assert!(matches!(getopt(&os(&["-r"]), "r:"), Err(Outcome::Usage)));
        assert!(matches!(
            getopt(&os(&["f", "-h"]), "h"),
            Err(Outcome::Usage)
        ));
    }
}
