#!/usr/bin/env bash
# Decode-side benchmark (issue 2). Prints, in one run, against baselines
# measured in the same run on the same bytes (page cache warm for all):
#   - vma-verify throughput as a ratio to `cat ARCHIVE > /dev/null`
#   - vma-decode extract throughput as a ratio to `cp ARCHIVE DIR/`, and to
#     `cp ARCHIVE DIR/ && sync FILE` (extract fsyncs each image before it
#     renames it, as a restore must; cp alone does not)
#   - vma-decode extract max RSS on the 1 GiB archives and on a 100 GiB
#     mostly-sparse device (RSS must not grow with the archive)
# Archives: A = 1 GiB of random data (full clusters), B = a 2 GiB image whose
# 4 KiB blocks alternate random / zero (1 GiB archive; the worst case for a
# sparse extract: one write per block). Ratios > 1 mean faster than the baseline.
# Usage: benches/decode.sh [WORKDIR]   (needs ~6 GiB free; python3, /usr/bin/time)
# Env:   VMA_BIN=DIR with vma-encode, vma-verify, vma-decode (default: cargo build --release)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d /var/tmp/vma-bench.XXXXXX)}
mkdir -p "$work"
trap 'rm -rf "$work"/out-* "$work"/cp-*' EXIT

# VMA_BIN=DIR: binaries to measure (default: built here, in CARGO_TARGET_DIR if set)
. "$root/scripts/vma-bin.sh"
bin=$VMA_BIN
[ -x /usr/bin/time ] || { echo "needs /usr/bin/time (apt-get install time)" >&2; exit 3; }

# best of 3 wall-clock seconds of a shell command (its output discarded)
best() {
  local best="" s e t
  for _ in 1 2 3; do
    s=$(date +%s.%N); bash -c "$1" >/dev/null; e=$(date +%s.%N)
    t=$(awk -v a="$s" -v b="$e" 'BEGIN { printf "%.6f", b - a }')
    if [ -z "$best" ] || awk -v t="$t" -v b="$best" 'BEGIN { exit !(t < b) }'; then best=$t; fi
  done
  echo "$best"
}
rss_kib() { /usr/bin/time -f %M bash -c "$1" 2>&1 >/dev/null | tail -1; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
mibs() { awk -v s="$1" -v t="$2" 'BEGIN { printf "%.0f", s / 1048576 / t }'; }

[ "$(stat -c %s "$work/rnd.raw" 2>/dev/null)" = 1073741824 ] || head -c 1G /dev/urandom > "$work/rnd.raw"
if [ "$(stat -c %s "$work/half.raw" 2>/dev/null)" != 2147483648 ]; then
  python3 - "$work/half.raw" <<'PY'
import os, sys
blk = 4096
with open(sys.argv[1], "wb") as f:
    for i in range(1 << 16):  # 65536 chunks of 32 KiB = 2 GiB
        rnd = os.urandom(4 * blk)
        f.write(b"".join(rnd[j*blk:(j+1)*blk] + bytes(blk) for j in range(4)))
PY
fi
rm -f "$work/A.vma" "$work/B.vma"
"$bin/vma-encode" --uuid 00000000-0000-0000-0000-000000000001 --ctime 0 -o "$work/A.vma" "drive-scsi0=$work/rnd.raw"
"$bin/vma-encode" --uuid 00000000-0000-0000-0000-000000000002 --ctime 0 -o "$work/B.vma" "drive-scsi0=$work/half.raw"

echo "== decode benchmark ($(nproc) cores, page cache warm, best of 3)"
for name in A B; do
  arch="$work/$name.vma"
  size=$(stat -c %s "$arch")
  cat "$arch" > /dev/null
  t_cat=$(best "cat '$arch'")
  t_verify=$(best "'$bin/vma-verify' -q '$arch'")
  t_cp=$(best "rm -rf '$work/cp-1'; mkdir '$work/cp-1'; cp '$arch' '$work/cp-1/'")
  t_cps=$(best "rm -rf '$work/cp-1'; mkdir '$work/cp-1'; cp '$arch' '$work/cp-1/' && sync '$work/cp-1/$name.vma'")
  t_ext=$(best "rm -rf '$work/out-1'; '$bin/vma-decode' extract '$arch' '$work/out-1'")
  rss=$(rss_kib "rm -rf '$work/out-2'; '$bin/vma-decode' extract '$arch' '$work/out-2'")
  echo "archive $name: $((size / 1048576)) MiB"
  printf '  %-36s %7.3f s %6s MiB/s\n' "cat ARCHIVE > /dev/null" "$t_cat" "$(mibs "$size" "$t_cat")"
  printf '  %-36s %7.3f s %6s MiB/s   ratio to cat: %s\n' "vma-verify -q ARCHIVE" "$t_verify" "$(mibs "$size" "$t_verify")" "$(ratio "$t_cat" "$t_verify")"
  printf '  %-36s %7.3f s\n' "cp ARCHIVE DIR/" "$t_cp"
  printf '  %-36s %7.3f s\n' "cp ARCHIVE DIR/ && sync FILE" "$t_cps"
  printf '  %-36s %7.3f s %6s MiB/s   ratio to cp: %s, to cp+sync: %s\n' "vma-decode extract ARCHIVE DIR" "$t_ext" "$(mibs "$size" "$t_ext")" "$(ratio "$t_cp" "$t_ext")" "$(ratio "$t_cps" "$t_ext")"
  printf '  %-36s %7s KiB\n' "vma-decode extract max RSS" "$rss"
done

sparse="$work/sparse100g.raw"
rm -f "$sparse"; truncate -s 100G "$sparse"
for off in 0 7 33 61 99; do  # five 16 MiB data regions, GiBs apart
  dd if=/dev/urandom of="$sparse" bs=1M count=16 seek=$((off * 1024)) conv=notrunc status=none
done
rm -f "$work/C.vma"
"$bin/vma-encode" -o "$work/C.vma" "drive-scsi0=$sparse"
rm -f "$sparse"
rss=$(rss_kib "rm -rf '$work/out-3'; '$bin/vma-decode' extract '$work/C.vma' '$work/out-3'")
t_ext=$(best "rm -rf '$work/out-3'; '$bin/vma-decode' extract '$work/C.vma' '$work/out-3'")
echo "archive C: 100 GiB device, 80 MiB of data ($(( $(stat -c %s "$work/C.vma") / 1048576 )) MiB archive)"
printf '  %-36s %7.3f s\n' "vma-decode extract ARCHIVE DIR" "$t_ext"
printf '  %-36s %7s KiB\n' "vma-decode extract max RSS" "$rss"
