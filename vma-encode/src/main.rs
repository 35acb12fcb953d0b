//! `vma-encode`: flags in, archive out. The work is in the library.

use std::io::IsTerminal;

use clap::Parser;

fn main() {
    let args = vma_encode::Args::parse();
    // SIGINT, SIGTERM, SIGHUP: remove the temporary archive, exit 128+signal.
    if let Err(e) = vma_cli::signals::install("vma-encode") {
        eprintln!("vma-encode: cannot handle signals: {e}");
        std::process::exit(vma_cli::exit::IO);
    }
    match vma_encode::run(&args, std::io::stderr().is_terminal()) {
        Ok(stats) => {
            if args.json {
                eprintln!("{}", serde_json::to_string(&stats).expect("serializable"));
            }
        }
        Err(failure) => {
            eprintln!("vma-encode: {failure}");
            std::process::exit(failure.code);
        }
    }
}
