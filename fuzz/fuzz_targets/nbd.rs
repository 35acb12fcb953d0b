#![no_main]
//! Fuzz target `nbd`: see fuzz/src/lib.rs for the mode byte.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((mode, input)) = vma_tools_fuzz::split_mode(data) {
        vma_tools_fuzz::run_nbd(mode, input);
    }
});
