//! Writes the seeds of the targets whose parsers live outside vma-format
//! (`restore_map`, `nbd`; vma-format's `fuzz_seeds` example writes the others):
//! `seeds OUTDIR` makes `OUTDIR/TARGET/NAME-mMODE`. Run by scripts/fuzz.sh.

use std::fs;
use std::path::PathBuf;

fn main() {
    let out = PathBuf::from(std::env::args_os().nth(1).expect("usage: seeds OUTDIR"));
    let targets = [
        ("restore_map", vma_tools_fuzz::restore_map_seeds()),
        ("nbd", vma_tools_fuzz::nbd_seeds()),
    ];
    for (target, seeds) in targets {
        let dir = out.join(target);
        fs::create_dir_all(&dir).expect("create the seed directory");
        for (i, (name, seed)) in seeds.iter().enumerate() {
            fs::write(dir.join(format!("{name}-{i}-m{}", seed[0])), seed).expect("write a seed");
        }
    }
}
