//! `vma-encode`: flags in, archive out. The work is in the library.

use std::io::IsTerminal;

use clap::Parser;

fn main() {
    let args = vma_encode::Args::parse();
    if let Err(failure) = vma_encode::run(&args, std::io::stderr().is_terminal()) {
        eprintln!("vma-encode: {failure}");
        std::process::exit(failure.code);
    }
}
