//! Writes the seeds of the targets whose parsers live outside vma-format
//! (`restore_map`; vma-format's `fuzz_seeds` example writes the others):
//! `seeds OUTDIR` makes `OUTDIR/TARGET/NAME-mMODE`. Run by scripts/fuzz.sh.

use std::fs;
use std::path::PathBuf;

fn main() {
    let out = PathBuf::from(std::env::args_os().nth(1).expect("usage: seeds OUTDIR"));
    let dir = out.join("restore_map");
    fs::create_dir_all(&dir).expect("create the seed directory");
    for (name, seed) in vma_tools_fuzz::restore_map_seeds() {
        fs::write(dir.join(format!("{name}-m{}", seed[0])), &seed).expect("write a seed");
    }
}
