//! Fuzz target `server_line`: see `fuzz_checks::server_line` (fuzz/src/checks.rs) for what
//! it checks. Crashes it finds go to fuzz/regressions/server_line/, which
//! tests/fuzz_regressions.rs replays under `cargo test`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| fuzz_checks::server_line(data));
