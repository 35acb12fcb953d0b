#!/usr/bin/env bash
# Soak test of cbw-tap: the randomized live-backup test of tests/cbw.rs
# (3 exports, qemu-io writes / write-zeroes / discards at random offsets
# while `cbw-tap backup | vma-encode -` runs throttled; the archive must be
# the disks at the instant, the live disks must hold every write), for many
# seeds, plus the engine's concurrent-writer test, repeated.
#
#   scripts/cbw-soak.sh [RUNS] [FIRST_SEED]     (default 500 runs from a
#                                               seed taken from the clock)
#
# A failure prints the seed; rerun it alone with
#   CBW_SEED=S CBW_RUNS=1 cargo test --release --test cbw live_backup
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
runs=${1:-500}
seed=${2:-$(date +%s)}
cd "$root"
echo "== cbw soak: $runs randomized runs from seed $seed"
CBW_RUNS=$runs CBW_SEED=$seed cargo test --release --test cbw \
  live_backup_during_random_writes_is_the_instant -- --nocapture 2>&1 \
  | grep -E "clusters captured|panicked|seed [0-9]+:|test result|rerun" | tail -n 20
rounds=$(( runs / 50 + 1 ))
echo "== engine: concurrent random writers, $rounds rounds of 12 seeds"
for r in $(seq "$rounds"); do
  CBW_SEED=$(( seed + 12 * r )) cargo test --release -q -p cbw-tap --test engine concurrent_random_writes 2>&1 | grep -E "test result|panicked"
done
echo "cbw soak: OK"
