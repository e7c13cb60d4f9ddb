#!/usr/bin/env bash
# Runs the cargo-fuzz targets of fuzz/ (libFuzzer), each for a bounded time.
#
#   scripts/fuzz.sh                    every target, FUZZ_SECONDS (30) each
#   scripts/fuzz.sh state_file         one target
#   FUZZ_SECONDS=300 scripts/fuzz.sh   longer
#
# Environment:
#   FUZZ_SECONDS    seconds per target (default 30)
#   FUZZ_SANITIZER  cargo-fuzz -s value: address (default), none, ...
#   FUZZ_TOOLCHAIN  force a toolchain: nightly, stable, ... (default: nightly
#                   if rustup has one, else stable with RUSTC_BOOTSTRAP=1)
#   FUZZ_JOBS       passed as -fork=N to libFuzzer when > 1 (default 1)
#
# Needs cargo-fuzz, which it installs from crates.io when it is missing.
# cargo-fuzz uses nightly-only rustc flags (-Zsanitizer, sancov passes); on a
# machine with only a stable toolchain they are unlocked with
# RUSTC_BOOTSTRAP=1, which works with the sanitizers on x86_64 Linux. If the
# build with a sanitizer fails anyway, the script retries with `-s none`.
#
# Seeds are in fuzz/corpus/<target>/ (new inputs libFuzzer finds go there too,
# under 40-hex-digit names that .gitignore leaves out). A crash is saved in
# fuzz/artifacts/<target>/; minimise it (the script prints how), copy it to
# fuzz/regressions/<target>/ and `cargo test` replays it from then on
# (tests/fuzz_regressions.rs).
set -euo pipefail

cd "$(dirname "$0")/.."
say() { echo "fuzz: $*"; }

if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
  say "adding $HOME/.cargo/bin to PATH"
  export PATH="$HOME/.cargo/bin:$PATH"
fi

seconds="${FUZZ_SECONDS:-30}"
case "$seconds" in
  '' | *[!0-9]*) say "FUZZ_SECONDS must be a whole number of seconds, not '$seconds'"; exit 2 ;;
esac

all_targets=()
for f in fuzz/fuzz_targets/*.rs; do
  all_targets+=("$(basename "$f" .rs)")
done
if [ "$#" -gt 0 ]; then targets=("$@"); else targets=("${all_targets[@]}"); fi
for t in "${targets[@]}"; do
  if [ ! -f "fuzz/fuzz_targets/$t.rs" ]; then
    say "no target '$t' (targets: ${all_targets[*]})"
    exit 2
  fi
done

# cargo-fuzz itself.
if ! cargo fuzz --version >/dev/null 2>&1; then
  say "cargo-fuzz is missing: cargo install cargo-fuzz --locked"
  cargo install cargo-fuzz --locked
fi
say "$(cargo fuzz --version)"

# The toolchain: nightly when there is one, else stable + RUSTC_BOOTSTRAP=1.
toolchain="${FUZZ_TOOLCHAIN:-}"
have_rustup=0
command -v rustup >/dev/null 2>&1 && have_rustup=1
if [ -z "$toolchain" ]; then
  if [ "$have_rustup" = 1 ] && rustup toolchain list | grep -q '^nightly'; then
    toolchain=nightly
  else
    toolchain=stable
  fi
fi
cargo_cmd=(cargo)
if [ "$have_rustup" = 1 ]; then
  cargo_cmd=(cargo "+$toolchain")
fi
if [ "$toolchain" != nightly ]; then
  # cargo-fuzz passes -Z flags; a stable rustc takes them with this set.
  export RUSTC_BOOTSTRAP=1
  say "toolchain: $toolchain with RUSTC_BOOTSTRAP=1 ($(rustc "${cargo_cmd[@]:1}" --version 2>/dev/null || rustc --version))"
else
  say "toolchain: nightly ($(rustc +nightly --version))"
fi

sanitizer="${FUZZ_SANITIZER:-address}"
build() {
  say "build: ${cargo_cmd[*]} fuzz build --fuzz-dir fuzz -s $sanitizer ${targets[*]}"
  for t in "${targets[@]}"; do
    "${cargo_cmd[@]}" fuzz build --fuzz-dir fuzz -s "$sanitizer" "$t" || return 1
  done
}
if ! build; then
  if [ "$sanitizer" = none ]; then
    say "build failed"
    exit 1
  fi
  say "build with -s $sanitizer failed; retrying with -s none"
  sanitizer=none
  build || { say "build failed"; exit 1; }
fi

# -timeout: an input that runs 5 s is a hang; -rss_limit_mb (and the malloc
# limit it implies): more than 512 MiB is an unbounded allocation.
# ASan's quarantine of freed memory (256 MiB by default) would count against
# that limit and leave a long run little room: keep it smaller.
export ASAN_OPTIONS="quarantine_size_mb=64${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
lf_flags=(-max_total_time="$seconds" -timeout=5 -rss_limit_mb=512 -print_final_stats=1)
jobs="${FUZZ_JOBS:-1}"
if [ "$jobs" -gt 1 ]; then
  lf_flags+=(-fork="$jobs")
fi

failed=()
summary=()
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t"
  log="fuzz/target/fuzz-$t.log"
  mkdir -p fuzz/target
  say "run: ${cargo_cmd[*]} fuzz run --fuzz-dir fuzz -s $sanitizer $t fuzz/corpus/$t -- ${lf_flags[*]}"
  set +e
  "${cargo_cmd[@]}" fuzz run --fuzz-dir fuzz -s "$sanitizer" "$t" "fuzz/corpus/$t" -- "${lf_flags[@]}" \
    >"$log" 2>&1
  rc=$?
  set -e
  runs="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)"
  rate="$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)"
  cov="$(grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+' "$log" | tail -1)"
  if [ "$rc" -eq 0 ]; then
    summary+=("$t: ok, ${runs:-?} runs, ${rate:-?} exec/s, ${cov:-?}")
    say "$t: ok (${runs:-?} runs, ${rate:-?} exec/s; log $log)"
  else
    failed+=("$t")
    summary+=("$t: FAILED (exit $rc), ${runs:-?} runs; log $log")
    grep -E 'panicked at|ERROR: libFuzzer|SUMMARY|Test unit written to' "$log" | head -20 || true
    tail -40 "$log"
    artifact="$(grep -o 'Test unit written to [^ ]*' "$log" | head -1 | sed 's/^Test unit written to //' || true)"
    if [ -n "$artifact" ]; then
      say "$t: crash saved in $artifact. Minimise and keep it:"
      say "  ${cargo_cmd[*]} fuzz tmin --fuzz-dir fuzz -s $sanitizer $t $artifact"
      say "  cp fuzz/artifacts/$t/minimized-from-* fuzz/regressions/$t/  # then cargo test"
    fi
  fi
done

say "summary (${seconds}s per target, -s $sanitizer, toolchain $toolchain):"
for line in "${summary[@]}"; do say "  $line"; done
if [ "${#failed[@]}" -gt 0 ]; then
  say "failed: ${failed[*]}"
  exit 1
fi
