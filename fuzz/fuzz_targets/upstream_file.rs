//! Fuzz target `upstream_file`: see `fuzz_checks::upstream_file` (fuzz/src/checks.rs) for what
//! it checks. Crashes it finds go to fuzz/regressions/upstream_file/, which
//! tests/fuzz_regressions.rs replays under `cargo test`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| fuzz_checks::upstream_file(data));
