//! Fuzz target `dns_reply`: see `fuzz_checks::dns_reply` (fuzz/src/checks.rs) for what
//! it checks. Crashes it finds go to fuzz/regressions/dns_reply/, which
//! tests/fuzz_regressions.rs replays under `cargo test`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| fuzz_checks::dns_reply(data));
