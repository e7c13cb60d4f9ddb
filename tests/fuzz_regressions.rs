//! Replays every input saved under `fuzz/regressions/<target>/` (crashes the
//! fuzzers found once) and the hand-written seeds of `fuzz/corpus/<target>/`
//! through the very checks the fuzz targets run (`fuzz/src/checks.rs`), so a
//! crash found once stays fixed without cargo-fuzz or a nightly toolchain.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

#[path = "../fuzz/src/checks.rs"]
mod checks;

/// The files of `dir`, without dotfiles; with `seeds_only`, without the
/// 40-hex-digit names libFuzzer gives the inputs it adds to a corpus.
fn inputs(dir: &Path, seeds_only: bool) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let generated = name.len() == 40 && name.bytes().all(|b| b.is_ascii_hexdigit());
            !name.starts_with('.') && (!seeds_only || !generated)
        })
        .collect();
    files.sort();
    files
}

/// Runs every input of `kind` (regressions or corpus) through its target's
/// check; fails naming each input that panics.
fn replay(kind: &str, seeds_only: bool) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(kind);
    let mut failed = Vec::new();
    let mut count = 0;
    for (target, check) in checks::TARGETS {
        for file in inputs(&root.join(target), seeds_only) {
            let data = std::fs::read(&file).unwrap();
            count += 1;
            if catch_unwind(AssertUnwindSafe(|| check(&data))).is_err() {
                failed.push(file.display().to_string());
            }
        }
    }
    assert!(
        failed.is_empty(),
        "inputs that fail their check: {failed:#?}"
    );
    count
}

#[test]
fn every_saved_fuzz_crash_stays_fixed() {
    let n = replay("regressions", false);
    assert!(n > 0, "no input under fuzz/regressions/");
}

#[test]
fn every_seed_passes_its_target() {
    let n = replay("corpus", true);
    assert!(n > 0, "no seed under fuzz/corpus/");
}

/// After a change to the state file's format, rebuild the seed with
/// `DYUPS_WRITE_SEED=1 cargo test --test fuzz_regressions`.
#[test]
fn the_state_seed_is_a_valid_image() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/state_file/valid_min_image");
    if std::env::var_os("DYUPS_WRITE_SEED").is_some() {
        std::fs::write(&path, checks::valid_image()).unwrap();
    }
    let seed = std::fs::read(&path).unwrap();
    let snap = checks::check_image(&seed).expect("the committed seed image is valid");
    assert!(snap.fallback.is_none());
    assert_eq!(snap.version, 3);
    // It has an extension, so the fuzzer mutates one.
    let local = snap.table.get("local").unwrap();
    assert_eq!(local.servers[0].max_conns, 7);
    assert_eq!(local.servers[0].slow_start, 20);
    assert!(local.check.line.is_some());
}

/// `format3_min_image` is the seed image as the build of format version 3
/// wrote it (72-byte peer cells, before the statistics): refused by its
/// version number, as version 2 is, and never read with its cells taken
/// for the longer ones.
#[test]
fn a_format_3_state_file_is_refused_by_its_version() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/state_file/format3_min_image");
    let image = std::fs::read(&path).unwrap();
    assert_eq!(u32::from_le_bytes(image[8..12].try_into().unwrap()), 3);
    let err = ngx_dyups::store::inspect_image(&image, "old")
        .map(|_| ())
        .expect_err("a version-3 file is refused");
    assert!(
        err.to_string()
            .contains("format version 3, this build reads version 4"),
        "{err}"
    );
}

/// `format2_min_image` is the seed image as the build of format version 2
/// wrote it (32-byte peer cells, before the active-check words): this build
/// refuses it by its version number, with a message that says so, and never
/// reads its cells as the longer ones.
#[test]
fn a_format_2_state_file_is_refused_by_its_version() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/state_file/format2_min_image");
    let image = std::fs::read(&path).unwrap();
    assert_eq!(u32::from_le_bytes(image[8..12].try_into().unwrap()), 2);
    let err = ngx_dyups::store::inspect_image(&image, "old")
        .map(|_| ())
        .expect_err("a version-2 file is refused");
    assert!(
        err.to_string()
            .contains("format version 2, this build reads version 4"),
        "{err}"
    );
}

/// The hand-written upstream-file seeds are files nginx takes: a seed the
/// parser refuses would start the fuzzer from an error.
#[test]
fn the_upstream_file_seeds_parse() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/upstream_file");
    let seeds = inputs(&dir, true);
    assert!(!seeds.is_empty());
    for file in seeds {
        let text = std::fs::read_to_string(&file).unwrap();
        if let Err(e) = ngx_dyups::table::syntax::parse_upstream_file(&text) {
            panic!("{}: {e}", file.display());
        }
    }
}

/// The SRV seed is an answer the check reads to its records (so the
/// fuzzer starts from inputs that reach them).
#[test]
fn the_srv_seed_reads_as_two_records() {
    use ngx_dyups::dns::wire::{query, read_reply, Reply, TYPE_SRV};
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/dns_reply/srv_two_priorities");
    let seed = std::fs::read(path).unwrap();
    let q = query(0x5157, "_http._tcp.svc.internal", TYPE_SRV);
    match read_reply(&q, &seed[1..]) {
        Ok(Reply::Services { records, ttl: 30 }) => assert_eq!(records.len(), 2),
        other => panic!("{other:?}"),
    }
}
