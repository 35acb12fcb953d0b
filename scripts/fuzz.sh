#!/usr/bin/env bash
# Runs the cargo-fuzz targets of fuzz/ on the stable toolchain
# (RUSTC_BOOTSTRAP=1 lets stable rustc take cargo-fuzz's -Z flags).
#
# Usage: scripts/fuzz.sh SECONDS [TARGET…]     (default: every target)
# Env:   SANITIZER=address|none   (default address: AddressSanitizer)
#        RUNS=N                   stop a target after N executions instead
#        JOBS=N                   parallel fuzzing processes per target (default 1)
#        CARGO_TARGET_DIR         where to build (default fuzz/target)
#        FUZZ_FIXTURES            the fixtures for the seeds (default ../shared/fixtures)
#
# Seeds are generated into fuzz/seeds/TARGET (vma-format's fuzz_seeds example,
# from the Proxmox fixtures and small archives and streams made on the spot;
# the fuzz crate's `seeds` binary for restore_map and nbd);
# the growing corpus is fuzz/corpus/TARGET, findings land in
# fuzz/artifacts/TARGET. Neither is committed: a finding is turned into a
# file under fuzz/regressions/TARGET/, which tests/fuzz_regressions.rs replays.
# Exit status: non-zero if a target found a crash.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
targets_all=(header archive stream restore_map nbd)
secs=${1:?usage: scripts/fuzz.sh SECONDS [TARGET…]}
shift
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=("${targets_all[@]}")
sanitizer=${SANITIZER:-address}
jobs=${JOBS:-1}
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz
fi

fixtures=${FUZZ_FIXTURES:-$root/../shared/fixtures}
seeds=$root/fuzz/seeds
if [[ ! -d $seeds/stream ]]; then
  echo "== generating seeds into $seeds"
  (cd "$root" && cargo run -q --release -p vma-format --example fuzz_seeds -- "$seeds" "$fixtures")
fi
if [[ ! -d $seeds/restore_map || ! -d $seeds/nbd ]]; then
  (cd "$root/fuzz" && cargo run -q --release --bin seeds -- "$seeds")
fi

target_dir=()
[[ -n ${CARGO_TARGET_DIR:-} ]] && target_dir=(--target-dir "$CARGO_TARGET_DIR/fuzz-$sanitizer")
status=0
for t in "${targets[@]}"; do
  mkdir -p "$root/fuzz/corpus/$t" "$root/fuzz/artifacts/$t"
  case $t in header) max_len=32768 ;; restore_map) max_len=16384 ;; *) max_len=65536 ;; esac
  limit=(-max_total_time="$secs" -max_len="$max_len")
  [[ -n ${RUNS:-} ]] && limit+=(-runs="$RUNS")
  [[ $jobs -gt 1 ]] && limit+=(-jobs="$jobs" -workers="$jobs")
  echo "== fuzz $t: ${secs}s, sanitizer $sanitizer, $jobs job(s)"
  (cd "$root/fuzz" && cargo fuzz run "${target_dir[@]}" -s "$sanitizer" "$t" \
      "$root/fuzz/corpus/$t" "$seeds/$t" -- \
      -artifact_prefix="$root/fuzz/artifacts/$t/" -timeout=20 \
      -rss_limit_mb=2048 -print_final_stats=1 "${limit[@]}") || status=1
done
exit $status
